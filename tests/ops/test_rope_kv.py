"""ops.rope_kv against reference.rope_kv and float64 (CPU: TRITON_INTERPRET=1)."""

import pytest
import torch

from cqil_kernels.ops.rope_kv import rope_kv_write
from cqil_kernels.reference.rope_kv import rope_kv_write_ref

from conftest import assert_kernel_close, poisoned

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _inputs(P, B, T, H, Hkv, Dh, S, start, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(P, B * T, (H + 2 * Hkv) * Dh, generator=g, dtype=torch.float64)
    positions = torch.randint(0, 3000, (B, T), generator=g)
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, Dh, 2).float() / Dh))
    cache = [poisoned((P, B, Hkv, S, Dh), dtype, DEVICE) for _ in range(2)]
    return (qkv.to(DEVICE, dtype), positions.to(DEVICE), inv_freq.to(DEVICE), cache,
            torch.tensor([start], dtype=torch.int32, device=DEVICE))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("P,B,T,H,Hkv,Dh", [(1, 1, 1, 9, 3, 64), (3, 2, 5, 6, 2, 8),
                                            (4, 3, 7, 4, 4, 26), (2, 1, 17, 3, 1, 80)])
def test_rope_kv_write(dtype, P, B, T, H, Hkv, Dh):
    S, start = T + 6, 4
    qkv, pos, inv_freq, (kc, vc), start_t = _inputs(P, B, T, H, Hkv, Dh, S, start, dtype, seed=P + T)
    qkv_twin, kc_twin, vc_twin = qkv.clone(), kc.clone(), vc.clone()
    qkv64, kc64, vc64 = qkv.double(), kc.double(), vc.double()
    heads = dict(num_heads=H, num_kv_heads=Hkv)
    rope_kv_write(qkv, pos, inv_freq, kc, vc, start_t, **heads)
    rope_kv_write_ref(qkv_twin, pos, inv_freq, kc_twin, vc_twin, start_t, **heads)
    rope_kv_write_ref(qkv64, pos, inv_freq.double(), kc64, vc64, start_t, **heads)
    written = slice(start, start + T)
    assert_kernel_close(qkv, qkv_twin, qkv64)
    assert_kernel_close(kc[:, :, :, written], kc_twin[:, :, :, written], kc64[:, :, :, written])
    assert torch.equal(vc[:, :, :, written], vc_twin[:, :, :, written])  # v is copied, not rotated
    # nothing outside [start, start + T) is touched
    assert kc[:, :, :, :start].isnan().all() and kc[:, :, :, start + T:].isnan().all()
    assert vc[:, :, :, :start].isnan().all() and vc[:, :, :, start + T:].isnan().all()


def test_bad_input_is_refused():
    qkv, pos, inv_freq, (kc, vc), start = _inputs(2, 1, 3, 4, 2, 8, 8, 0, torch.float32, seed=0)
    heads = dict(num_heads=4, num_kv_heads=2)
    with pytest.raises(TypeError, match="start must be a one-element int32"):
        rope_kv_write(qkv, pos, inv_freq, kc, vc, 0, **heads)
    with pytest.raises(TypeError, match="start must be"):
        rope_kv_write(qkv, pos, inv_freq, kc, vc, start.long(), **heads)
    with pytest.raises(ValueError, match="do not fit a cache of 2 kv heads"):
        rope_kv_write(qkv, pos, inv_freq, kc, vc, start, num_heads=4, num_kv_heads=1)
    with pytest.raises(ValueError, match=r"qkv \(2, 3, 64\) does not match"):
        rope_kv_write(qkv, pos[:, :2], inv_freq, kc, vc, start, **heads)
    with pytest.raises(TypeError, match="k_cache must be torch.float32"):
        rope_kv_write(qkv, pos, inv_freq, kc.half(), vc, start, **heads)
    with pytest.raises(ValueError, match="same shape"):
        rope_kv_write(qkv, pos, inv_freq, kc, vc[:, :, :, :4], start, **heads)
    with pytest.raises(TypeError, match="positions must be"):
        rope_kv_write(qkv, pos.float(), inv_freq, kc, vc, start, **heads)
    with pytest.raises(ValueError, match="inv_freq"):
        rope_kv_write(qkv, pos, inv_freq.double(), kc, vc, start, **heads)
