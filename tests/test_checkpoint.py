"""Loading from HF directories (safetensors / .bin, sharded), transformers models and GGUF files."""

import json

import numpy as np
import pytest
import torch

from cqil_kernels import CQILConfig, CQILLlama
from cqil_kernels.checkpoint import unpermute_rope_rows

from conftest import random_hf_model


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
    import gguf

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
    (tmp_path / "broken.gguf").write_bytes(b"definitely not gguf" * 10)
    with pytest.raises(ValueError, match="not a readable GGUF file"):
        CQILLlama.from_pretrained(tmp_path / "broken.gguf")


def test_grouping_checked_before_weights_are_read(tmp_path):
    hf = random_hf_model()
    hf.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"group \[5, 6, 7\]: layer index 6 is outside the model"):
        CQILLlama.from_pretrained(tmp_path, cqil=CQILConfig([[5, 6, 7]]))


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
