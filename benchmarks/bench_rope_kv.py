"""ops.rope_kv vs the torch backend's per-layer RoPE on q and k plus the two cache writes."""

import torch

from cqil_kernels.model import apply_rope

from conftest import SHAPES, gpu_benchmark, op_cases, randn

S = 1024


@op_cases()
def test_rope_kv(benchmark, shape, P, T, impl):
    from cqil_kernels.ops.rope_kv import rope_kv_write

    s = SHAPES[shape]
    H, Hkv, Dh = s["H"], s["Hkv"], s["Dh"]
    N = (H + 2 * Hkv) * Dh
    pos = torch.arange(T, device="cuda")[None]
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, Dh, 2, device="cuda").float() / Dh))
    start = torch.zeros(1, dtype=torch.int32, device="cuda")
    ang = torch.cat([pos[..., None].float() * inv_freq] * 2, -1)
    cos, sin = ang.cos().bfloat16()[:, None], ang.sin().bfloat16()[:, None]

    def make():
        return randn(P, T, N), randn(P, 1, Hkv, S, Dh), randn(P, 1, Hkv, S, Dh)

    def fused(qkv, kc, vc):
        rope_kv_write(qkv, pos, inv_freq, kc, vc, start, num_heads=H, num_kv_heads=Hkv)

    def torch_rope(qkv, kc, vc):
        for p in range(P):
            x = qkv[p].view(1, T, H + 2 * Hkv, Dh).transpose(1, 2)
            apply_rope(x[:, :H], cos, sin)
            kc[p][:, :, :T] = apply_rope(x[:, H:H + Hkv], cos, sin)
            vc[p][:, :, :T] = x[:, H + Hkv:]

    nbytes = 2 * P * T * (N + (H + 2 * Hkv) * Dh)
    gpu_benchmark(benchmark, make, fused if impl == "fused" else torch_rope, nbytes=nbytes)
