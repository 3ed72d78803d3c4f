"""The decode prototype of benchmarks/rope_attention.py (issue 26): RoPE and the KV-cache write inside the
decode attention kernel give what rope_kv_write then group_attention give — the same bits under the
interpreter (the same inputs to the same loop), and within rounding on CUDA, where the rotation may be
contracted differently — and the whole decode step, with the prototype swapped in, the fused step's
tokens."""

import contextlib

import pytest
import torch

from cqil_kernels import CQILConfig, CQILLlama, fused
from cqil_kernels.ops.attention import group_attention
from cqil_kernels.ops.rope_kv import rope_kv_write

from conftest import import_benchmark, interpreter, left_padding_mask, random_hf_model

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module")
def module():
    return import_benchmark("rope_attention")


def _inputs(P, B, H, Hkv, Dh, S, start, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(P, B, (H + 2 * Hkv) * Dh, generator=g).to(DEVICE, dtype)
    k_cache = torch.randn(P, B, Hkv, S, Dh, generator=g).to(DEVICE, dtype)
    v_cache = torch.randn(P, B, Hkv, S, Dh, generator=g).to(DEVICE, dtype)
    key_valid = torch.zeros(B, S, dtype=torch.bool, device=DEVICE)
    key_valid[:, :start + 1] = True
    key_valid[0, :min(3, start)] = False  # a left-padded row
    positions = (torch.arange(B, device=DEVICE)[:, None] + start - 2).clamp(min=0)  # each row its own position
    inv_freq = 1.0 / (10000 ** (torch.arange(0, Dh, 2, dtype=torch.float32, device=DEVICE) / Dh))
    return qkv, positions, inv_freq, k_cache, v_cache, key_valid, torch.tensor([start], dtype=torch.int32,
                                                                                device=DEVICE)


def _both(module, P, B, H, Hkv, Dh, S, start, dtype, splits):
    qkv, positions, inv_freq, k_cache, v_cache, key_valid, start_t = _inputs(P, B, H, Hkv, Dh, S, start, dtype)
    k2, v2, qkv2 = k_cache.clone(), v_cache.clone(), qkv.clone()
    got = module.rope_attention(qkv, positions, inv_freq, k_cache, v_cache, key_valid, start_t, num_heads=H,
                                num_kv_heads=Hkv, num_splits=splits)
    rope_kv_write(qkv2.view(P, B, -1), positions, inv_freq, k2, v2, start_t, num_heads=H, num_kv_heads=Hkv)
    q = qkv2.view(P, B, 1, -1)[..., :H * Dh].unflatten(-1, (H, Dh))
    want = group_attention(q, k2, v2, key_valid, start_t, num_splits=splits)
    return got, want, (k_cache, v_cache), (k2, v2), qkv


@interpreter
@pytest.mark.skipif(DEVICE == "cuda", reason="the interpreter's bits; on CUDA test_rope_attention_cuda")
@pytest.mark.parametrize("P, B, H, Hkv, Dh, S, start, splits", [
    (1, 1, 4, 4, 16, 40, 17, 3),    # MHA, the slot in the last of 3 splits of 32-key blocks
    (2, 3, 6, 2, 32, 70, 33, 2),    # a group of 2 layers, GQA 3 heads per kv head, 3 rows
    (1, 2, 8, 2, 16, 20, 0, 1),     # the first position: the new key alone, no split
    (1, 2, 4, 1, 16, 80, 64, 4),    # the slot opens a block; one split left empty
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_attention_gives_rope_kv_then_attention_bit_for_bit(module, P, B, H, Hkv, Dh, S, start, splits, dtype):
    before = _inputs(P, B, H, Hkv, Dh, S, start, dtype)[0].clone()
    got, want, (k, v), (k2, v2), qkv = _both(module, P, B, H, Hkv, Dh, S, start, dtype, splits)
    assert torch.equal(got, want)
    assert torch.equal(k, k2) and torch.equal(v, v2)  # the slot's key (rotated) and value, the rest untouched
    assert torch.equal(qkv, before)  # the QKV output is read, never written


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("splits", [None, 1])
def test_rope_attention_cuda(module, splits):
    got, want, (k, v), (k2, v2), _ = _both(module, 2, 3, 32, 8, 128, 600, 517, torch.bfloat16, splits)
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(k, k2, rtol=1e-2, atol=1e-2)
    assert torch.equal(v, v2)


def test_bad_input_is_refused(module):
    qkv, positions, inv_freq, k_cache, v_cache, key_valid, start = _inputs(1, 2, 4, 2, 16, 20, 5, torch.float32)
    with pytest.raises(ValueError, match="decode"):  # two tokens per row
        module.rope_attention(qkv.repeat(1, 2, 1), positions.repeat(1, 2), inv_freq, k_cache, v_cache, key_valid,
                              start, num_heads=4, num_kv_heads=2)
    with pytest.raises(ValueError, match="key_valid"):
        module.rope_attention(qkv, positions, inv_freq, k_cache, v_cache, key_valid[:, :5], start, num_heads=4,
                              num_kv_heads=2)
    with pytest.raises(ValueError, match="num_heads"):
        module.rope_attention(qkv, positions, inv_freq, k_cache, v_cache, key_valid, start, num_heads=4,
                              num_kv_heads=4)


@interpreter
@pytest.mark.parametrize("cqil", [CQILConfig(), CQILConfig(groups=((1, 2, 3),), bypass=1)], ids=["none", "P3-d1"])
def test_decode_steps_with_rope_in_attention_follow_the_fused_step(module, cqil, monkeypatch):
    """Greedy decode with the prototype swapped into fused.step gives the fused step's tokens, and logits
    within fp32 rounding (interpreter: the same bits), on left-padded rows; every stage of every step went
    through the prototype."""
    calls = []
    rope_attention = module.rope_attention
    monkeypatch.setattr(module, "rope_attention", lambda *a, **k: calls.append(1) or rope_attention(*a, **k))
    hf = random_hf_model(seed=8, num_hidden_layers=5)
    model = CQILLlama.from_pretrained(hf, cqil=cqil, device=DEVICE, dtype=torch.float32)
    model.backend = "triton"
    ids = torch.randint(0, model.args.vocab_size, (2, 7), generator=torch.Generator().manual_seed(3)).to(DEVICE)
    mask = left_padding_mask(ids, [0, 3])
    runs = []
    with torch.no_grad():
        for swapped in (False, True):
            cache = model.new_cache(2, 16)
            model.accelerator.prefill_graphs = False
            tok = model.argmax(model(ids, mask, cache=cache)[:, -1])
            logits = []
            with module.fused_decode_attention(fused) if swapped else contextlib.nullcontext():
                for _ in range(5):
                    out = fused.step(model, tok[:, None], None, cache, 1)[:, -1]
                    cache.length += 1
                    logits.append(out.clone())
                    tok = out.argmax(-1)
            runs.append((torch.stack(logits), cache))
    (want, cache_a), (got, cache_b) = runs
    assert len(calls) == 5 * len(model.stages)
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    if DEVICE == "cpu":
        assert torch.equal(got, want)
        n = cache_a.length  # the positions written (the rest is unwritten memory: model.allocate)
        assert n == cache_b.length == 12
        for (ka, va), (kb, vb) in zip(cache_a.runs, cache_b.runs):
            assert torch.equal(ka[..., :n, :], kb[..., :n, :]) and torch.equal(va[..., :n, :], vb[..., :n, :])
    else:
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
