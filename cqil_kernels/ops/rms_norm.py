"""RMSNorm of the rows of x for each of the P layers of a group, in one launch: the input norm of the
cuBLAS prefill form (fused.linear), which otherwise takes torch's seven elementwise launches.

    x: [M, D]; weight: [P, D] -> out [P, M, D] in x's dtype:
    out[p, m] = weight[p] * round(x[m] / sqrt(mean(x[m]^2) + eps))

with the normalisation in fp32, rounded to x's dtype, then scaled by the weight (the product in fp32,
rounded once): the rounding of the torch backend's RMSNorm (model.rms_norm) and of the reference LLaMA
code. Only the order of the mean's fp32 sum differs from torch's. One program per row reads it once and
writes it P times.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check_runnable, check_tensor, next_pow2
from ._pdl import pdl_options, release_consumer, wait_for_producer


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, P, D, eps, stride_xm, stride_wp, stride_op, stride_om,
                     BLOCK_D: tl.constexpr, USE_GDC: tl.constexpr):
    wait_for_producer(USE_GDC)  # _pdl.py: before any memory access
    m = tl.program_id(0)
    offs = tl.arange(0, BLOCK_D)
    ok = offs < D
    x = tl.load(x_ptr + m * stride_xm + offs, mask=ok, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=0) / D + eps)
    xn = (x * rstd).to(out_ptr.dtype.element_ty).to(tl.float32)
    release_consumer(USE_GDC)
    for p in range(0, P):
        w = tl.load(w_ptr + p * stride_wp + offs, mask=ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + p * stride_op + m * stride_om + offs, (w * xn).to(out_ptr.dtype.element_ty), mask=ok)


def group_rms_norm(x: torch.Tensor, weight: torch.Tensor, *, eps: float,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """x: [M, D]; weight: [P, D] (x's dtype) -> [P, M, D] in x's dtype (module docstring).
    out: optional preallocated [P, M, D] to write into."""
    check_tensor("x", x, ndim=2)
    check_runnable(x)
    check_tensor("weight", weight, ndim=2, dtype=x.dtype, device=x.device)
    M, D = x.shape
    P = weight.shape[0]
    if weight.shape[1] != D:
        raise ValueError(f"weight {tuple(weight.shape)} does not match x {tuple(x.shape)} ([P, D] vs [M, D])")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"eps must be a number >= 0, got {eps!r}")
    if out is None:
        out = torch.empty((P, M, D), device=x.device, dtype=x.dtype)
    check_tensor("out", out, ndim=3, dtype=x.dtype, device=x.device)
    if tuple(out.shape) != (P, M, D):
        raise ValueError(f"out must have shape {(P, M, D)}, got {tuple(out.shape)}")
    if out.numel() == 0:
        return out
    _rms_norm_kernel[(M,)](x, weight, out, P, D, float(eps), x.stride(0), weight.stride(0), out.stride(0),
                           out.stride(1), BLOCK_D=next_pow2(D), num_warps=4 if D <= 2048 else 8,
                           **pdl_options(x))
    return out
