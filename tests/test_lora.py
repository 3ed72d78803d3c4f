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
