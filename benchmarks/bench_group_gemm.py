"""ops.group_gemm vs the P separate torch (cuBLAS) calls each fused GEMM replaces."""

import torch
import torch.nn.functional as F

from conftest import SHAPES, gpu_benchmark, op_cases, randn, rms_norm


def _qkv(s, P, T):
    N = (s["H"] + 2 * s["Hkv"]) * s["Dh"]
    return lambda: (randn(T, s["D"]), randn(P, N, s["D"], scale=0.02), 1 + randn(P, s["D"], scale=0.1))


@op_cases()
def test_qkv(benchmark, shape, P, T, impl):
    from cqil_kernels.ops.group_gemm import group_linear

    s = SHAPES[shape]
    nq, nkv = s["H"] * s["Dh"], s["Hkv"] * s["Dh"]

    def torch_qkv(h, w, nw):  # per layer: RMSNorm, then q, k, v projections
        for p in range(P):
            x = rms_norm(h, nw[p])
            F.linear(x, w[p, :nq]), F.linear(x, w[p, nq:nq + nkv]), F.linear(x, w[p, nq + nkv:])

    op = (lambda h, w, nw: group_linear(h, w, norm_weight=nw)) if impl == "fused" else torch_qkv
    N = nq + 2 * nkv
    gpu_benchmark(benchmark, _qkv(s, P, T), op, nbytes=2 * (P * N * s["D"] + T * s["D"] + P * T * N))


@op_cases()
def test_o_proj(benchmark, shape, P, T, impl):
    from cqil_kernels.ops.group_gemm import group_linear

    s = SHAPES[shape]
    K = s["H"] * s["Dh"]

    def torch_o(x, w):
        for p in range(P):
            F.linear(x[p], w[p])

    op = group_linear if impl == "fused" else torch_o
    gpu_benchmark(benchmark, lambda: (randn(P, T, K), randn(P, s["D"], K, scale=0.02)), op,
                  nbytes=2 * (P * s["D"] * K + P * T * K + P * T * s["D"]))


@op_cases()
def test_gate_up_swiglu(benchmark, shape, P, T, impl):
    from cqil_kernels.ops.group_gemm import group_swiglu

    s = SHAPES[shape]

    def torch_swiglu(x, wg, wu):
        for p in range(P):
            F.silu(F.linear(x[p], wg[p])) * F.linear(x[p], wu[p])

    op = group_swiglu if impl == "fused" else torch_swiglu
    make = lambda: (randn(P, T, s["D"]), randn(P, s["F"], s["D"], scale=0.02),  # noqa: E731
                    randn(P, s["F"], s["D"], scale=0.02))
    gpu_benchmark(benchmark, make, op, nbytes=2 * (2 * P * s["F"] * s["D"] + P * T * (s["D"] + s["F"])))


@op_cases()
def test_down_sum(benchmark, shape, P, T, impl):
    from cqil_kernels.ops.group_gemm import group_down_sum

    s = SHAPES[shape]

    def torch_down(x, w, res):
        out = res
        for p in range(P):
            out = out + F.linear(x[p], w[p])
        return out.to(x.dtype)

    op = group_down_sum if impl == "fused" else torch_down
    make = lambda: (randn(P, T, s["F"]), randn(P, s["D"], s["F"], scale=0.02),  # noqa: E731
                    randn(T, s["D"], dtype=torch.float32))
    gpu_benchmark(benchmark, make, op, nbytes=2 * (P * s["F"] * s["D"] + P * T * s["F"] + 3 * T * s["D"]))


@op_cases(P_values=(1,))
def test_head(benchmark, shape, P, T, impl):
    """The final RMSNorm + lm_head: group_linear with the norm in its prologue vs RMSNorm and cuBLAS."""
    from cqil_kernels.ops.group_gemm import group_linear

    s = SHAPES[shape]
    op = ((lambda h, w, nw: group_linear(h, w, norm_weight=nw)) if impl == "fused"
          else (lambda h, w, nw: F.linear(rms_norm(h, nw[0]), w[0])))
    make = lambda: (randn(T, s["D"]), randn(1, s["V"], s["D"], scale=0.02),  # noqa: E731
                    1 + randn(1, s["D"], scale=0.1))
    gpu_benchmark(benchmark, make, op, nbytes=2 * (s["V"] * s["D"] + T * s["D"] + T * s["V"]))


@op_cases(T_values=(128, 512, 2048))
def test_silu_mul(benchmark, shape, P, T, impl):
    """The cuBLAS prefill form's SwiGLU on the gate and up products: one launch vs torch's silu, then *."""
    from cqil_kernels.ops.group_gemm import silu_mul

    n = SHAPES[shape]["F"]
    op = silu_mul if impl == "fused" else (lambda g, u: F.silu(g) * u)
    make = lambda: (randn(P, T, n), randn(P, T, n))  # noqa: E731
    gpu_benchmark(benchmark, make, op, nbytes=2 * 3 * P * T * n)


@op_cases(T_values=(128, 512, 2048))
def test_sum_parts(benchmark, shape, P, T, impl):
    """The cuBLAS prefill form's down epilogue, residual (fp32) + the P products: one launch vs torch's
    .float(), sum(0), + and the cast."""
    from cqil_kernels.ops.group_gemm import sum_parts

    D = SHAPES[shape]["D"]

    def fused(parts, residual):
        sum_parts(parts, residual, dtype=torch.bfloat16)

    def torch_sum(parts, residual):
        return (residual + parts.float().sum(0)).to(torch.bfloat16)

    make = lambda: (randn(P, T, D), randn(T, D, dtype=torch.float32))  # noqa: E731
    nbytes = 2 * P * T * D + 4 * T * D + 2 * T * D  # the products, the fp32 residual, the output
    gpu_benchmark(benchmark, make, fused if impl == "fused" else torch_sum, nbytes=nbytes)
