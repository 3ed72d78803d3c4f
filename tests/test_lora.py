"""lora.py: merging a PEFT LoRA adapter equals PEFT's own merge_and_unload."""

import json

import pytest
import torch

from cqil_kernels import CQILConfig, CQILLlama

from conftest import random_hf_model

peft = pytest.importorskip("peft")
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _adapter(tmp_path, seed=0, targets=ALL, rslora=False, base=None, safetensors=True, **lora_kw):
    base = base or random_hf_model(seed=31)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_rslora=rslora, **lora_kw)
    model = peft.get_peft_model(base, config)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(0.2 * torch.randn_like(p))
    model.save_pretrained(tmp_path, safe_serialization=safetensors)
    return model


@pytest.mark.parametrize("targets,rslora,safetensors", [(ALL, False, True), (["q_proj", "down_proj"], True, False)])
def test_merge_equals_peft_merge_and_unload(tmp_path, targets, rslora, safetensors):
    adapter = _adapter(tmp_path, targets=targets, rslora=rslora, safetensors=safetensors)
    assert (tmp_path / ("adapter_model.safetensors" if safetensors else "adapter_model.bin")).is_file()
    merged = adapter.merge_and_unload()
    ours = CQILLlama.from_pretrained(random_hf_model(seed=31), lora=tmp_path,
                                     cqil=CQILConfig(groups=((2, 3),)))
    ids = torch.randint(0, 97, (2, 11))
    for name, p in merged.named_parameters():
        key = name.removeprefix("model.")
        torch.testing.assert_close(ours.get_parameter(key), p, atol=1e-6, rtol=1e-6, msg=key)
    ours.cqil = CQILConfig()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), merged(ids).logits, atol=1e-4, rtol=1e-4)


def test_merge_leaves_a_transformers_source_untouched(tmp_path):
    _adapter(tmp_path)
    hf = random_hf_model(seed=31)
    before = hf.model.layers[0].self_attn.q_proj.weight.clone()
    CQILLlama.from_pretrained(hf, lora=tmp_path)
    torch.testing.assert_close(hf.model.layers[0].self_attn.q_proj.weight, before, rtol=0, atol=0)


def test_bad_adapters_are_refused(tmp_path):
    _adapter(tmp_path / "other", base=random_hf_model(seed=31, hidden_size=40, num_attention_heads=4,
                                                      num_key_value_heads=2))
    with pytest.raises(ValueError, match="another base model"):
        CQILLlama.from_pretrained(random_hf_model(seed=31), lora=tmp_path / "other")
    _adapter(tmp_path / "embed", targets=["q_proj", "embed_tokens"])
    with pytest.raises(ValueError, match="embed_tokens"):
        CQILLlama.from_pretrained(random_hf_model(seed=31), lora=tmp_path / "embed")
    _adapter(tmp_path / "saved", modules_to_save=["lm_head"])
    with pytest.raises(ValueError, match="modules_to_save"):
        CQILLlama.from_pretrained(random_hf_model(seed=31), lora=tmp_path / "saved")
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        CQILLlama.from_pretrained(random_hf_model(seed=31), lora=tmp_path / "nothing")
    (tmp_path / "prefix").mkdir()
    (tmp_path / "prefix" / "adapter_config.json").write_text(json.dumps({"peft_type": "PREFIX_TUNING"}))
    with pytest.raises(ValueError, match="only LORA"):
        CQILLlama.from_pretrained(random_hf_model(seed=31), lora=tmp_path / "prefix")


# --------------------------------------------------------------------------------------------------
# What PEFT honours in adapter_config.json is honoured; a config that disagrees with its tensors is refused


@pytest.mark.parametrize("lora_kw", [
    dict(target_modules=r".*\.(q_proj|down_proj)"),  # a regex, matched against the whole module name
    dict(target_modules=["q_proj", "up_proj"], layers_to_transform=[1, 4]),
    dict(target_modules=["q_proj", "v_proj", "up_proj"], layers_to_transform=[0, 3], layers_pattern="layers"),
    dict(target_modules=ALL, rank_pattern={"q_proj": 2, "layers.3.mlp.up_proj": 6},
         alpha_pattern={"down_proj": 3.0}),
    dict(target_modules="all-linear", exclude_modules=["k_proj", "o_proj"]),
    dict(target_modules=["q_proj", "v_proj"], fan_in_fan_out=True),  # PEFT ignores it for nn.Linear
])
def test_merge_honours_what_peft_honours(tmp_path, lora_kw):
    targets = lora_kw.pop("target_modules")
    adapter = _adapter(tmp_path, targets=targets, **lora_kw)
    merged = adapter.merge_and_unload()
    ours = CQILLlama.from_pretrained(random_hf_model(seed=31), lora=tmp_path)
    changed = 0
    base = random_hf_model(seed=31)
    for name, p in merged.named_parameters():
        key = name.removeprefix("model.")
        torch.testing.assert_close(ours.get_parameter(key), p, atol=1e-6, rtol=1e-6, msg=key)
        changed += not torch.equal(p, base.get_parameter(name))
    assert changed > 0


def _edit_config(path, **changes):
    config = json.loads((path / "adapter_config.json").read_text())
    for key, value in changes.items():
        if value is _DROP:
            config.pop(key, None)
        else:
            config[key] = value
    (path / "adapter_config.json").write_text(json.dumps(config))


_DROP = object()


@pytest.mark.parametrize("changes, message", [
    (dict(r=16), r"must have rank r = 16"),
    (dict(r=-4), "r must be an int >= 1, got -4"),
    (dict(r=0), "r must be an int >= 1, got 0"),
    (dict(r=4.0), "r must be an int >= 1, got 4.0"),
    (dict(r=_DROP), r"must have rank r = 8"),  # PEFT's default r
    (dict(lora_alpha=float("nan")), "lora_alpha must be a finite number"),
    (dict(target_modules=["k_proj"]), "not select"),
    (dict(target_modules=r".*\.k_proj"), "not select"),
    (dict(target_modules=r".*"), "selects lm_head"),
    (dict(target_modules=["q_proj", "v_proj"], layers_to_transform=[0]), "layers.1.self_attn.q_proj, which its"),
    (dict(target_modules=["q_proj", "v_proj", "k_proj"]), "selects model.layers.0.self_attn.k_proj"),
    (dict(target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2}), r"must have rank r = 2"),
    (dict(target_modules="(unclosed"), "not a valid regular expression"),
    (dict(use_dora=True), "use_dora=True is not supported"),
    (dict(bias="all"), "bias='all' is not supported"),
    (dict(init_lora_weights="pissa"), "init_lora_weights='pissa' changes the base weights"),
    (dict(layers_to_transform="0"), "layers_to_transform must be"),
])
def test_adapter_configs_that_disagree_with_their_tensors_are_refused(tmp_path, changes, message):
    _adapter(tmp_path, targets=["q_proj", "v_proj"])
    _edit_config(tmp_path, **changes)
    base = random_hf_model(seed=31)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        CQILLlama.from_pretrained(base, lora=tmp_path)
    for k, v in base.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_adapter_tensors_are_checked(tmp_path):
    from safetensors.torch import load_file, save_file

    _adapter(tmp_path, targets=["q_proj", "v_proj"])
    good = load_file(str(tmp_path / "adapter_model.safetensors"))
    a_key = next(k for k in good if k.endswith("layers.2.self_attn.q_proj.lora_A.weight"))
    b_key = a_key.replace("lora_A", "lora_B")
    for tensors, message in (
        ({**good, a_key: good[a_key][:3]}, r"must have rank r = 4"),  # A and B of different ranks
        ({**good, a_key: good[a_key][None]}, "must be a 2-D floating-point matrix, got 3-D"),
        ({**good, b_key: good[b_key].clone().fill_(float("nan"))}, "NaN or infinite"),
        ({**good, b_key: torch.full_like(good[b_key], float("inf"))}, "NaN or infinite"),
        ({k: v for k, v in good.items() if k != b_key}, "lora_A without its pair"),
    ):
        save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
        with pytest.raises(ValueError, match=message):
            CQILLlama.from_pretrained(random_hf_model(seed=31), lora=tmp_path)


def test_adapter_files_never_run_code_or_block(tmp_path):
    from conftest import make_fifo, write_malicious_pickle

    _adapter(tmp_path, targets=["q_proj", "v_proj"], safetensors=False)
    write_malicious_pickle(tmp_path / "adapter_model.bin", tmp_path / "pwned")
    with pytest.raises(ValueError, match="refused: the adapter file holds objects other than tensors"):
        CQILLlama.from_pretrained(random_hf_model(seed=31), lora=tmp_path)
    assert not (tmp_path / "pwned").exists()
    (tmp_path / "adapter_config.json").unlink()
    make_fifo(tmp_path / "adapter_config.json")
    with pytest.raises(ValueError, match="the adapter config is a FIFO"):
        CQILLlama.from_pretrained(random_hf_model(seed=31), lora=tmp_path)
