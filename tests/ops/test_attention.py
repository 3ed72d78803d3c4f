"""ops.attention against reference.attention and float64 (CPU: TRITON_INTERPRET=1)."""

import pytest
import torch

from cqil_kernels.ops.attention import group_attention
from cqil_kernels.reference.attention import group_attention_ref

from conftest import assert_kernel_close, poisoned

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _inputs(P, B, T, H, Hkv, Dh, S, start, dtype, pads=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(P, B, T, H, Dh, generator=g, dtype=torch.float64)
    kc = torch.randn(P, B, Hkv, S, Dh, generator=g, dtype=torch.float64)
    vc = torch.randn(P, B, Hkv, S, Dh, generator=g, dtype=torch.float64)
    valid = torch.ones(B, S, dtype=torch.bool)
    for b, n in enumerate(pads or []):
        valid[b, :n] = False  # left padding of row b
    start_t = torch.tensor([start], dtype=torch.int32)
    return [t.to(DEVICE, dtype) for t in (q, kc, vc)] + [valid.to(DEVICE), start_t.to(DEVICE)]


CASES = {  # P, B, T, H, Hkv, Dh, S, start, pads
    "decode-gqa3": (1, 1, 1, 9, 3, 64, 70, 69, None),
    "decode-P4-padded": (4, 3, 1, 6, 2, 8, 40, 33, [0, 5, 30]),
    "decode-mha-odd-dh": (2, 2, 1, 4, 4, 26, 37, 20, [3, 0]),
    "prefill-gqa3": (2, 2, 19, 6, 2, 16, 19, 0, [0, 7]),
    "prefill-mha": (3, 1, 33, 2, 2, 64, 40, 0, None),
    "chunk-after-cache": (2, 2, 5, 4, 1, 32, 30, 11, [2, 0]),
    "prefill-gqa4-long": (1, 1, 70, 8, 2, 16, 75, 3, None),
    "decode-long-cache": (2, 2, 1, 4, 2, 16, 300, 100, [0, 40]),  # splits cover the 101 keys, not S
    # left padding across several 32-key tiles: each tile's flags are loaded a tile ahead of its keys
    "decode-pads-span-tiles": (1, 2, 1, 4, 2, 16, 160, 150, [97, 33]),
    "chunk-pads-span-tiles": (1, 2, 9, 4, 1, 16, 140, 120, [0, 70]),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("splits,merge", [(None, "fused"), (3, "fused"), (3, "separate")])
def test_group_attention(dtype, case, splits, merge):
    P, B, T, H, Hkv, Dh, S, start, pads = CASES[case]
    q, kc, vc, valid, start_t = _inputs(P, B, T, H, Hkv, Dh, S, start, dtype, pads, seed=len(case))
    out = group_attention(q, kc, vc, valid, start_t, out=poisoned(q.shape, dtype, DEVICE),
                          num_splits=splits, merge=merge)
    twin = group_attention_ref(q, kc, vc, valid, start_t)
    exact = group_attention_ref(q.double(), kc.double(), vc.double(), valid, start_t)
    assert_kernel_close(out, twin, exact)


def test_fused_merge_equals_the_merge_kernel_and_leaves_the_tickets_at_zero():
    """The last split program merges in split order, as the separate kernel does: same bits. Its ticket
    counters are back to zero after every launch, so the next launch (or graph replay) starts clean."""
    from cqil_kernels.ops._common import ticket_counters

    q, kc, vc, valid, start_t = _inputs(3, 2, 1, 6, 2, 16, 90, 77, torch.float32, pads=[0, 9], seed=5)
    separate = group_attention(q, kc, vc, valid, start_t, num_splits=5, merge="separate")
    for _ in range(3):
        fused = group_attention(q, kc, vc, valid, start_t, num_splits=5)
        assert torch.equal(fused, separate)
        assert int(ticket_counters(q.device, 3 * 2 * 2).abs().sum()) == 0


@pytest.mark.parametrize("merge", ["fused", "separate"])
def test_merge_of_more_splits_than_one_tile_holds(merge):
    """16 rows x head dim 128 fill the merge's 16K-value tile with 8 splits; 21 splits take three chunks
    (the last one part-filled), and row 1's left padding leaves every split of the first chunk empty."""
    P, B, T, H, Hkv, Dh, S, start = 1, 2, 2, 16, 2, 128, 21 * 32, 21 * 32 - 2
    q, kc, vc, valid, start_t = _inputs(P, B, T, H, Hkv, Dh, S, start, torch.float32, pads=[0, 300], seed=7)
    out = group_attention(q, kc, vc, valid, start_t, out=poisoned(q.shape, torch.float32, DEVICE),
                          num_splits=21, merge=merge)
    twin = group_attention_ref(q, kc, vc, valid, start_t)
    exact = group_attention_ref(q.double(), kc.double(), vc.double(), valid, start_t)
    assert_kernel_close(out, twin, exact)


def test_keys_beyond_the_queries_are_not_read():
    """Cache slots after start + T (stale or garbage) must not leak into the result."""
    q, kc, vc, valid, start_t = _inputs(2, 2, 1, 4, 2, 16, 50, 20, torch.float32, seed=3)
    expected = group_attention(q, kc, vc, valid, start_t, num_splits=4)
    kc[:, :, :, 21:] = float("nan")
    vc[:, :, :, 21:] = float("nan")
    torch.testing.assert_close(group_attention(q, kc, vc, valid, start_t, num_splits=4), expected)


def test_q_may_be_a_strided_view_of_the_qkv_buffer():
    P, B, T, H, Hkv, Dh = 2, 2, 3, 4, 2, 16
    qkv = torch.randn(P, B * T, (H + 2 * Hkv) * Dh, device=DEVICE)
    q = qkv[..., :H * Dh].view(P, B, T, H, Dh)
    _, kc, vc, valid, start_t = _inputs(P, B, T, H, Hkv, Dh, 8, 0, torch.float32)
    torch.testing.assert_close(group_attention(q, kc, vc, valid, start_t),
                               group_attention_ref(q, kc, vc, valid, start_t), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("splits", [None, 3])
def test_the_steps_own_key_is_read_after_rope_kv_writes_it(splits):
    """Decode attention told that rope_kv wrote just before it (keys_before_wait, as the fused backend
    calls it) loads its first tile of older keys before it waits for rope_kv (with PDL on CUDA the two
    overlap), and the step's own key and value after. Each step's slots are
    NaN until rope_kv writes them, so reading one too early fails. With 3 splits (and with the 5 of the
    default on CUDA) the new key at positions 64-95 is in its split's first tile, from 96 on in a later one."""
    from cqil_kernels.ops.rope_kv import rope_kv_write

    P, B, H, Hkv, Dh, S = 2, 2, 8, 2, 64, 160
    steps = range(88, 100) if DEVICE == "cuda" else range(94, 98)
    g = torch.Generator().manual_seed(11)
    kc = torch.randn(P, B, Hkv, S, Dh, generator=g).to(DEVICE, torch.bfloat16)
    vc = torch.randn(P, B, Hkv, S, Dh, generator=g).to(DEVICE, torch.bfloat16)
    kc[:, :, :, steps[0]:] = float("nan")
    vc[:, :, :, steps[0]:] = float("nan")
    valid = torch.ones(B, S, dtype=torch.bool, device=DEVICE)
    valid[1, :7] = False
    inv_freq = (10000.0 ** (-torch.arange(0, Dh, 2, dtype=torch.float32) / Dh)).to(DEVICE)
    start = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    for pos in steps:
        start.fill_(pos)
        qkv = torch.randn(P, B, (H + 2 * Hkv) * Dh, generator=g).to(DEVICE, torch.bfloat16)
        rope_kv_write(qkv, torch.full((B, 1), pos, device=DEVICE), inv_freq, kc, vc, start,
                      num_heads=H, num_kv_heads=Hkv)
        q = qkv.view(P, B, 1, -1)[..., :H * Dh].unflatten(-1, (H, Dh))
        out = group_attention(q, kc, vc, valid, start, num_splits=splits, keys_before_wait=True)
        twin = group_attention_ref(q, kc, vc, valid, start)
        exact = group_attention_ref(q.double(), kc.double(), vc.double(), valid, start)
        assert_kernel_close(out, twin, exact)


def test_bad_input_is_refused():
    q, kc, vc, valid, start = _inputs(2, 1, 3, 4, 2, 16, 8, 0, torch.float32)
    with pytest.raises(ValueError, match="must agree"):
        group_attention(q[:1], kc, vc, valid, start)
    with pytest.raises(ValueError, match="not a multiple"):
        group_attention(q[:, :, :, :3], kc, vc, valid, start)
    with pytest.raises(TypeError, match="key_valid must be a bool"):
        group_attention(q, kc, vc, valid.int(), start)
    with pytest.raises(ValueError, match="key_valid must be"):
        group_attention(q, kc, vc, valid[:, :5], start)
    with pytest.raises(TypeError, match="start must be"):
        group_attention(q, kc, vc, valid, 0)
    with pytest.raises(ValueError, match="num_splits"):
        group_attention(q, kc, vc, valid, start, num_splits=0)
    with pytest.raises(ValueError, match="merge must be"):
        group_attention(q, kc, vc, valid, start, merge="atomic")
    with pytest.raises(TypeError, match="keys_before_wait must be a bool"):
        group_attention(q, kc, vc, valid, start, keys_before_wait=1)
    with pytest.raises(ValueError, match="last dimension"):
        group_attention(q.transpose(3, 4).contiguous().transpose(3, 4), kc, vc, valid, start)
    with pytest.raises(TypeError, match="v_cache must be torch.float32"):
        group_attention(q, kc, vc.half(), valid, start)
