"""ops.attention vs P separate torch scaled_dot_product_attention calls (one per layer's cache)."""

import torch
import torch.nn.functional as F

from conftest import SHAPES, gpu_benchmark, op_cases, randn

S = 512


@op_cases()
def test_attention(benchmark, shape, P, T, impl):
    from cqil_kernels.ops.attention import group_attention

    s = SHAPES[shape]
    H, Hkv, Dh = s["H"], s["Hkv"], s["Dh"]
    start = S - T  # decode: the last position of a 512-token cache; prefill: the whole cache
    valid = torch.ones(1, S, dtype=torch.bool, device="cuda")
    start_t = torch.tensor([start], dtype=torch.int32, device="cuda")

    def make():
        return randn(P, 1, T, H, Dh), randn(P, 1, Hkv, S, Dh), randn(P, 1, Hkv, S, Dh)

    def fused(q, k, v):
        group_attention(q, k, v, valid, start_t)

    def torch_attn(q, k, v):
        for p in range(P):
            F.scaled_dot_product_attention(q[p].transpose(1, 2), k[p], v[p], is_causal=T > 1,
                                           enable_gqa=H != Hkv)

    nbytes = 2 * P * (2 * Hkv * S * Dh + 2 * T * H * Dh)
    gpu_benchmark(benchmark, make, fused if impl == "fused" else torch_attn, nbytes=nbytes)


@op_cases(T_values=(1,))
def test_attention_merge(benchmark, shape, P, T, impl):
    """Decode: split partials merged by the last split program ("fused", the default) against the same
    kernel followed by the separate merge kernel (reported in the torch column)."""
    from cqil_kernels.ops.attention import group_attention

    s = SHAPES[shape]
    H, Hkv, Dh = s["H"], s["Hkv"], s["Dh"]
    valid = torch.ones(1, S, dtype=torch.bool, device="cuda")
    start_t = torch.tensor([S - 1], dtype=torch.int32, device="cuda")

    def make():
        return randn(P, 1, T, H, Dh), randn(P, 1, Hkv, S, Dh), randn(P, 1, Hkv, S, Dh)

    def run(q, k, v):
        group_attention(q, k, v, valid, start_t, merge="fused" if impl == "fused" else "separate")

    gpu_benchmark(benchmark, make, run, nbytes=2 * P * (2 * Hkv * S * Dh + 2 * T * H * Dh))
