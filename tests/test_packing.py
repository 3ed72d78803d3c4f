"""packing.py: layer weights in layer-major tensors that the model's parameters are views of."""

import pytest
import torch

from cqil_kernels import CQILConfig, CQILLlama
from cqil_kernels.packing import LAYOUT, pack_layers

from conftest import random_hf_model


def _storage_of(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


@pytest.mark.parametrize("bias", [False, True])
def test_loader_fills_the_packed_tensors_in_place(tmp_path, bias):
    hf = random_hf_model(seed=3, attention_bias=bias, mlp_bias=bias)
    hf.save_pretrained(tmp_path)
    model = CQILLlama.from_pretrained(tmp_path, device="cpu")
    packed = model.packed
    assert packed is not None and packed.is_current()
    layer = model.layers[4]
    assert _storage_of(layer.self_attn.k_proj.weight) == _storage_of(packed.qkv)
    assert _storage_of(layer.mlp.down_proj.weight) == _storage_of(packed.down)
    assert (packed.qkv_bias is not None) == bias and (packed.down_bias is not None) == bias
    # the packed rows are the checkpoint's tensors, in q, k, v order
    hf_layer = hf.model.layers[4].self_attn
    torch.testing.assert_close(packed.qkv[4], torch.cat([hf_layer.q_proj.weight, hf_layer.k_proj.weight,
                                                        hf_layer.v_proj.weight]), rtol=0, atol=0)
    torch.testing.assert_close(packed.norm_post[4], hf.model.layers[4].post_attention_layernorm.weight)
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, atol=1e-4, rtol=1e-4)


def test_a_group_is_a_view():
    model = CQILLlama.from_pretrained(random_hf_model(seed=4), device="cpu")
    packed = pack_layers(model.layers)
    group = packed.group(2, 3)
    for name in LAYOUT:
        whole = getattr(packed, name)
        if whole is not None:
            assert getattr(group, name).data_ptr() == whole[2].data_ptr()
            assert getattr(group, name).shape[0] == 3
    assert packed.group(2, 3) is group and packed.group(2, 2) is not group  # made once per (l0, P)
    with torch.no_grad():
        packed.gate[3].fill_(7.0)  # an in-place change shows through the kept views
    assert bool((group.gate[1] == 7.0).all())


def test_staleness_is_detected():
    model = CQILLlama.from_pretrained(random_hf_model(seed=5), device="cpu")
    packed = pack_layers(model.layers)
    assert packed.is_current()
    model.to(torch.float16)  # every parameter gets new storage
    assert not packed.is_current()
    packed = pack_layers(model.layers)
    model.layers[0].input_layernorm.weight = torch.nn.Parameter(torch.ones(48, dtype=torch.float16))
    assert not packed.is_current()
    packed = pack_layers(model.layers)
    mlp = model.layers[3].mlp
    mlp.load_state_dict({k: v.clone() for k, v in mlp.state_dict().items()}, assign=True)
    assert not packed.is_current()
    packed = pack_layers(model.layers)
    with torch.no_grad():
        model.layers[1].self_attn.o_proj.weight.mul_(2)  # in place: the packed view sees it, still current
    assert packed.is_current()


def test_rope_frequencies_stay_float32_through_dtype_changes():
    model = CQILLlama.from_pretrained(random_hf_model(seed=6), device="cpu", cqil=CQILConfig())
    expected = model.inv_freq.clone()
    model.to(torch.bfloat16)
    assert model.inv_freq.dtype == torch.float32
    torch.testing.assert_close(model.inv_freq, expected, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.int8, torch.bool, "bfloat16"], ids=str)
def test_packing_to_a_dtype_that_is_not_floating_is_refused_before_anything_moves(dtype):
    """model.pack(dtype=...) and pack_layers take floating dtypes only: int8 weights were packed, and the next
    forward failed inside a matmul."""
    model = CQILLlama.from_pretrained(random_hf_model(seed=5), device="cpu")
    before = model.layers[0].mlp.up_proj.weight
    with pytest.raises(TypeError, match="dtype must be a floating torch.dtype"):
        model.pack(dtype=dtype)
    assert model.layers[0].mlp.up_proj.weight is before and before.dtype == torch.float32
    assert model(torch.tensor([[1, 2]])).shape == (1, 2, model.args.vocab_size)
