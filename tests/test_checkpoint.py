"""Loading from HF directories (safetensors / .bin, sharded), transformers models and GGUF files."""

import json

import numpy as np
import pytest
import torch

from cqil_kernels import CQILConfig, CQILLlama
from cqil_kernels.checkpoint import unpermute_rope_rows

from conftest import make_fifo, random_hf_model, write_malicious_pickle


def _logits(model, ids):
    with torch.no_grad():
        out = model(ids)
        return out.logits if hasattr(out, "logits") else out


@pytest.fixture
def ids():
    return torch.randint(0, 97, (2, 13), generator=torch.Generator().manual_seed(0))


def _save_bin(hf, path, shards: int):
    """A pytorch_model*.bin checkpoint as older transformers wrote it (v5 writes only safetensors)."""
    hf.config.save_pretrained(path)
    state = hf.state_dict()
    if shards == 1:
        torch.save(state, path / "pytorch_model.bin")
        return
    keys = list(state)
    weight_map = {}
    for i in range(shards):
        name = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = keys[i::shards]
        torch.save({k: state[k] for k in part}, path / name)
        weight_map.update({k: name for k in part})
    (path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))


@pytest.mark.parametrize("fmt", ["safetensors", "safetensors-sharded", "bin", "bin-sharded"])
def test_hf_directory(tmp_path, ids, fmt):
    hf = random_hf_model(seed=20)
    if fmt == "safetensors":
        hf.save_pretrained(tmp_path)
        assert (tmp_path / "model.safetensors").exists()
    elif fmt == "safetensors-sharded":
        hf.save_pretrained(tmp_path, max_shard_size="20KB")
        assert (tmp_path / "model.safetensors.index.json").exists()
    else:
        _save_bin(hf, tmp_path, shards=3 if fmt == "bin-sharded" else 1)
    model = CQILLlama.from_pretrained(tmp_path, device="cpu")
    assert model.dtype == torch.float32 and model.device.type == "cpu"
    assert not any(p.requires_grad for p in model.parameters())
    torch.testing.assert_close(_logits(model, ids), _logits(hf, ids), atol=1e-4, rtol=1e-4)


def test_hf_directory_tied_embeddings_and_dtype(tmp_path, ids):
    hf = random_hf_model(seed=21, tie_word_embeddings=True)
    hf.save_pretrained(tmp_path)
    model = CQILLlama.from_pretrained(tmp_path, device="cpu", dtype=torch.bfloat16)
    assert model.lm_head.weight is model.embed_tokens.weight
    assert model.dtype == torch.bfloat16


def test_transformers_model_object_shares_weights(ids):
    hf = random_hf_model(seed=22)
    model = CQILLlama.from_pretrained(hf)
    assert model.layers[3].mlp.up_proj.weight.data_ptr() == hf.model.layers[3].mlp.up_proj.weight.data_ptr()
    torch.testing.assert_close(_logits(model, ids), _logits(hf, ids), atol=1e-4, rtol=1e-4)
    half = CQILLlama.from_pretrained(hf, dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16 and hf.dtype == torch.float32


def test_directory_with_authors_cqil_keys(tmp_path, ids):
    hf = random_hf_model(seed=23)
    hf.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.update({"cqil_layers": [[1, 2], [3, 4]], "d": 1})
    (tmp_path / "config.json").write_text(json.dumps(config))
    model = CQILLlama.from_pretrained(tmp_path, device="cpu")
    assert model.cqil == CQILConfig([[1, 2], [3, 4]], bypass=1)
    explicit = CQILConfig([[2, 3]])
    assert CQILLlama.from_pretrained(tmp_path, cqil=explicit, device="cpu").cqil == explicit
    assert CQILLlama.from_pretrained(tmp_path, cqil=CQILConfig(), device="cpu").cqil.groups == ()
    groups_file = tmp_path / "groups.json"
    explicit.save(groups_file)
    assert CQILLlama.from_pretrained(tmp_path, cqil=groups_file, device="cpu").cqil == explicit
    assert CQILLlama.from_pretrained(tmp_path, cqil={"cqil_layers": [[2, 3]]}, device="cpu").cqil == explicit


# --------------------------------------------------------------------------------------------------
# GGUF


def _permute_like_llama_cpp(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's converter: per head, interleave the two rotate-half halves."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path, hf, qtype_name="F32", arch="llama"):
    gguf = pytest.importorskip("gguf")  # optional (the demo extra); the GPU image lacks it

    c = hf.config
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_rope_freq_base(c.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_vocab_size(c.vocab_size)
    writer.add_rope_dimension_count(c.head_dim)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    names = {"embed_tokens": "token_embd", "norm": "output_norm", "input_layernorm": "attn_norm",
             "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    qtype = getattr(gguf.GGMLQuantizationType, qtype_name)
    for key, tensor in hf.state_dict().items():
        w = tensor.float().numpy()
        if key == "lm_head.weight":
            name = "output.weight"
        else:
            key = key.removeprefix("model.")
            if key.startswith("layers."):
                _, i, rest = key.split(".", 2)
                name = f"blk.{i}.{names[rest.rsplit('.', 1)[0]]}.weight"
            else:
                name = f"{names[key.rsplit('.', 1)[0]]}.weight"
        if name.endswith("attn_q.weight"):
            w = _permute_like_llama_cpp(w, c.num_attention_heads)
        elif name.endswith("attn_k.weight"):
            w = _permute_like_llama_cpp(w, c.num_key_value_heads)
        if w.ndim == 2 and qtype_name not in ("F32", "F16"):
            writer.add_tensor(name, gguf.quants.quantize(w, qtype), raw_dtype=qtype)
        elif w.ndim == 2 and qtype_name == "F16":
            writer.add_tensor(name, w.astype(np.float16))
        else:
            writer.add_tensor(name, w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_unpermute_inverts_llama_cpp_permutation():
    w = torch.randn(6 * 8, 5)
    permuted = torch.from_numpy(_permute_like_llama_cpp(w.numpy(), 6))
    assert not torch.equal(permuted, w)
    assert torch.equal(unpermute_rope_rows(permuted, 6), w)


@pytest.mark.parametrize("qtype", ["F32", "F16", "Q8_0"])
def test_gguf_matches_transformers_gguf_load(tmp_path, ids, qtype):
    from transformers import AutoModelForCausalLM

    hf = random_hf_model(seed=24, hidden_size=64, intermediate_size=96, num_attention_heads=4,
                         num_key_value_heads=2)  # Q8_0 packs rows in blocks of 32
    write_gguf(tmp_path / "tiny.gguf", hf, qtype)
    model = CQILLlama.from_pretrained(tmp_path / "tiny.gguf", device="cpu")
    reference = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="tiny.gguf",
                                                     dtype=torch.float32).eval()
    torch.testing.assert_close(_logits(model, ids), _logits(reference, ids), atol=1e-4, rtol=1e-4)
    if qtype == "F32":  # lossless: equals the original weights too
        torch.testing.assert_close(_logits(model, ids), _logits(hf, ids), atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------------------------------
# Bad checkpoints


def test_missing_things(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        CQILLlama.from_pretrained(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        CQILLlama.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(random_hf_model().config.to_dict()))
    with pytest.raises(FileNotFoundError, match="no weights found"):
        CQILLlama.from_pretrained(tmp_path)
    with pytest.raises(TypeError, match="src must be"):
        CQILLlama.from_pretrained(42)


def test_wrong_shape_names_tensor_and_shapes(tmp_path):
    from safetensors.torch import save_file

    hf = random_hf_model()
    hf.save_pretrained(tmp_path)
    state = {k: v.clone() for k, v in hf.state_dict().items()}
    state["model.layers.2.mlp.up_proj.weight"] = torch.zeros(80, 48)
    del state["lm_head.weight"]
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"'layers.2.mlp.up_proj.weight' has shape \(80, 48\), but the "
                                         r"model config expects \(83, 48\)"):
        CQILLlama.from_pretrained(tmp_path, device="cpu")


def test_missing_tensor_is_named(tmp_path):
    from safetensors.torch import save_file

    hf = random_hf_model()
    hf.save_pretrained(tmp_path)
    state = {k: v.clone() for k, v in hf.state_dict().items() if "layers.4.self_attn.v_proj" not in k}
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="no tensor for layers.4.self_attn.v_proj.weight"):
        CQILLlama.from_pretrained(tmp_path, device="cpu")


def test_non_llama_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(
        {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": 10}))
    with pytest.raises(ValueError, match="not a LLaMA checkpoint: model_type='gpt2'"):
        CQILLlama.from_pretrained(tmp_path)


def test_gguf_of_another_architecture(tmp_path):
    hf = random_hf_model()
    write_gguf(tmp_path / "other.gguf", hf, "F32", arch="qwen2")
    with pytest.raises(ValueError, match="GGUF architecture is 'qwen2'"):
        CQILLlama.from_pretrained(tmp_path / "other.gguf")


def test_not_a_gguf_file(tmp_path):
    pytest.importorskip("gguf")
    (tmp_path / "broken.gguf").write_bytes(b"definitely not gguf" * 10)
    with pytest.raises(ValueError, match="not a readable GGUF file"):
        CQILLlama.from_pretrained(tmp_path / "broken.gguf")


def test_grouping_checked_before_weights_are_read(tmp_path):
    hf = random_hf_model()
    hf.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"group \[5, 6, 7\]: layer index 6 is outside the model"):
        CQILLlama.from_pretrained(tmp_path, cqil=CQILConfig([[5, 6, 7]]))


# --------------------------------------------------------------------------------------------------
# Files a user may have been handed: no code runs, nothing blocks, nothing big is built before the
# checkpoint is known to match its config


def test_a_malicious_pickle_never_runs(tmp_path):
    hf = random_hf_model()
    hf.config.save_pretrained(tmp_path)
    write_malicious_pickle(tmp_path / "pytorch_model.bin", tmp_path / "pwned")
    with pytest.raises(ValueError, match="refused: the weight file holds objects other than tensors"):
        CQILLlama.from_pretrained(tmp_path, device="cpu")
    assert not (tmp_path / "pwned").exists()


def test_a_fifo_named_like_a_weight_file_is_refused(tmp_path):
    hf = random_hf_model()
    hf.config.save_pretrained(tmp_path)
    make_fifo(tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="model.safetensors: the weight file is a FIFO"):
        CQILLlama.from_pretrained(tmp_path, device="cpu")
    (tmp_path / "model.safetensors").unlink()
    (tmp_path / "config.json").unlink()
    make_fifo(tmp_path / "config.json")
    with pytest.raises(ValueError, match="config.json: the model config is a FIFO"):
        CQILLlama.from_pretrained(tmp_path, device="cpu")
    make_fifo(tmp_path / "model.gguf")
    with pytest.raises(ValueError, match="the GGUF file is a FIFO"):
        CQILLlama.from_pretrained(tmp_path / "model.gguf", device="cpu")


def test_a_config_that_disagrees_with_the_tensors_is_refused_before_building(tmp_path):
    """A 1 KB edit of config.json ("num_hidden_layers": 100000) must not build and allocate 100000
    layers before saying the tensors are missing."""
    import time

    hf = random_hf_model()
    hf.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(dict(config, num_hidden_layers=100000)))
    start = time.monotonic()
    with pytest.raises(ValueError, match="no tensor for layers.6.input_layernorm.weight.* and 899941 more"):
        CQILLlama.from_pretrained(tmp_path, device="cpu")
    assert time.monotonic() - start < 10
    (tmp_path / "config.json").write_text(json.dumps(dict(config, intermediate_size=64)))
    with pytest.raises(ValueError, match=r"'layers.0.mlp.\w+_proj.weight' has shape \(\d+, \d+\), but the model "
                                         r"config expects \((64, 48|48, 64)\)"):
        CQILLlama.from_pretrained(tmp_path, device="cpu")


@pytest.mark.parametrize("change, message", [
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 0}}, "rope_theta must be a finite number > 0, "
                                                                      "got 0"),
    ({"rope_theta": -1.0, "rope_parameters": None}, "rope_theta must be a finite number > 0"),
    ({"rms_norm_eps": 0.0}, "rms_norm_eps must be a finite number > 0"),
    ({"rms_norm_eps": float("nan")}, "rms_norm_eps must be a finite number > 0, got nan"),
    ({"num_attention_heads": 0}, "num_attention_heads must be a positive int, got 0"),
    ({"hidden_size": "48"}, "hidden_size must be a positive int, got '48'"),
    ({"intermediate_size": 83.0}, "intermediate_size must be a positive int, got 83.0"),
    ({"num_key_value_heads": 0}, "num_key_value_heads must be a positive int, got 0"),
    ({"head_dim": 0}, "head_dim must be a positive int, got 0"),
    ({"num_hidden_layers": True}, "num_hidden_layers must be a positive int, got True"),
    ({"tie_word_embeddings": "yes"}, "tie_word_embeddings must be true or false"),
    ({"eos_token_id": "2"}, "eos_token_id must be a token id"),
    ({"rope_parameters": {"rope_type": "linear", "factor": 0, "rope_theta": 1e4}}, "needs factor"),
    ({"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "rope_theta": 1e4}}, "needs low_freq_factor"),
    ({"rope_parameters": "linear"}, "must be an object"),
])
def test_config_values_that_would_give_garbage_are_refused(tmp_path, change, message):
    hf = random_hf_model()
    hf.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.update(change)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=f"config.json: model config: {message}|config.json: .*{message}"):
        CQILLlama.from_pretrained(tmp_path, device="cpu")


def test_null_kv_heads_and_head_dim_take_the_transformers_defaults(tmp_path, ids):
    hf = random_hf_model(num_key_value_heads=6)
    hf.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(dict(config, num_key_value_heads=None, head_dim=None)))
    model = CQILLlama.from_pretrained(tmp_path, device="cpu")
    assert model.args.num_key_value_heads == 6 and model.args.head_dim == 8
    torch.testing.assert_close(_logits(model, ids), _logits(hf, ids), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("config_bytes, message", [
    (b"\x89PNG\r\n\x1a\n" + bytes(range(256)), "config.json: the model config is not UTF-8"),
    (b"[1, 2, 3]", "config.json: the model config must hold a JSON object at the top level, got array"),
    (b"{", "config.json: the model config is not valid JSON"),
])
def test_unreadable_configs_name_the_file(tmp_path, config_bytes, message):
    random_hf_model().save_pretrained(tmp_path)
    (tmp_path / "config.json").write_bytes(config_bytes)
    with pytest.raises(ValueError, match=message):
        CQILLlama.from_pretrained(tmp_path, device="cpu")


def _sharded(tmp_path, hf):
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    return index


def test_shard_index_that_escapes_or_lacks_its_map_is_refused(tmp_path):
    index = _sharded(tmp_path, random_hf_model())
    path = tmp_path / "model.safetensors.index.json"
    for shard in ("../outside.safetensors", "/etc/passwd", "sub/../../x.safetensors"):
        key = next(iter(index["weight_map"]))
        path.write_text(json.dumps({"weight_map": {**index["weight_map"], key: shard}}))
        with pytest.raises(ValueError, match="points outside the checkpoint directory"):
            CQILLlama.from_pretrained(tmp_path, device="cpu")
    path.write_text(json.dumps({"metadata": {}}))
    with pytest.raises(ValueError, match="the shard index has no weight_map"):
        CQILLlama.from_pretrained(tmp_path, device="cpu")
    path.write_text("[]")
    with pytest.raises(ValueError, match="must hold a JSON object"):
        CQILLlama.from_pretrained(tmp_path, device="cpu")


def test_a_tensor_in_two_shards_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    index = _sharded(tmp_path, random_hf_model())
    first, second = sorted(set(index["weight_map"].values()))[:2]
    a, b = load_file(str(tmp_path / first)), load_file(str(tmp_path / second))
    key = next(iter(a))
    save_file({**b, key: a[key] + 1}, str(tmp_path / second))
    with pytest.raises(ValueError, match=f"tensor '{key}' is also in {first}"):
        CQILLlama.from_pretrained(tmp_path, device="cpu")


_PEAK_MEMORY_SCRIPT = r"""
import sys, threading, time
import torch
from cqil_kernels import CQILLlama

def anon_kb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1])

base, peak, done = anon_kb(), [0], False
def sample():
    while not done:
        peak[0] = max(peak[0], anon_kb())
        time.sleep(0.002)
thread = threading.Thread(target=sample)
thread.start()
model = CQILLlama.from_pretrained(sys.argv[1], device="cpu", dtype=torch.float32)
done = True
thread.join()
peak[0] = max(peak[0], anon_kb())
print((peak[0] - base) * 1024)
"""


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/status"), reason="needs Linux /proc")
def test_loading_holds_no_second_copy_of_the_weights(tmp_path):
    """Peak anonymous memory while loading stays near one copy of the weights (a loader that reads the
    whole state dict first, then copies it into the model, needs two)."""
    import subprocess
    import sys

    from safetensors.torch import save_file

    from cqil_kernels.config import LlamaArgs

    args = LlamaArgs(vocab_size=4096, hidden_size=1024, intermediate_size=2816, num_hidden_layers=6,
                     num_attention_heads=8, num_key_value_heads=8, head_dim=128)
    (tmp_path / "config.json").write_text(json.dumps(args.to_hf_dict()))
    with torch.device("meta"):
        shapes = {f"model.{k}" if k != "lm_head.weight" else k: v.shape
                  for k, v in CQILLlama(args).state_dict().items()}
    state = {k: torch.full(shape, 0.5) for k, shape in shapes.items()}
    model_bytes = sum(t.numel() * 4 for t in state.values())
    save_file(state, str(tmp_path / "model.safetensors"))
    del state
    out = subprocess.run([sys.executable, "-c", _PEAK_MEMORY_SCRIPT, str(tmp_path)], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    peak = int(out.stdout.strip().splitlines()[-1])
    assert model_bytes > 300e6
    assert peak < 1.4 * model_bytes, f"peak {peak / 1e6:.0f} MB for {model_bytes / 1e6:.0f} MB of weights"
