"""Bypass prefix sums + residual + post-attention RMSNorm of a CQIL group, in one launch.

Given the group input h: [M, D] and the P attention outputs a: [P, M, D] (after o_proj), with bypass
distance d (DESIGN.md):
    b_j  = a_{j-1} + ... + a_{j-min(d, j)}
    x_j  = RMSNorm^post_j(h + a_j + b_j)                      -> xn [P, M, D], the MLP inputs
    R    = h + sum_j (a_j + b_j)     ("residual" mode)
         = h + sum_j a_j             ("mlp_input" mode)        -> residual [M, D] float32
The down-projection kernel adds sum_j m_j to R, giving the group's output h'. R stays fp32 so the
group's output is rounded once. One program per row; everything in fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check_runnable, check_tensor, next_pow2


@triton.jit
def _group_residual_kernel(
    h_ptr, a_ptr, nw_ptr, xn_ptr, res_ptr,
    D, P, BYPASS, eps,
    stride_hm, stride_ap, stride_am, stride_nwp, stride_xp, stride_xm, stride_rm,
    RESIDUAL_MODE: tl.constexpr, BLOCK_D: tl.constexpr,
):
    m = tl.program_id(0)
    offs = tl.arange(0, BLOCK_D)
    ok = offs < D
    h = tl.load(h_ptr + m * stride_hm + offs, mask=ok, other=0.0).to(tl.float32)
    total = h
    for j in range(0, P):
        a = tl.load(a_ptr + j * stride_ap + m * stride_am + offs, mask=ok, other=0.0).to(tl.float32)
        bypass = tl.zeros((BLOCK_D,), dtype=tl.float32)
        for i in range(tl.maximum(j - BYPASS, 0), j):
            bypass += tl.load(a_ptr + i * stride_ap + m * stride_am + offs, mask=ok, other=0.0).to(tl.float32)
        r = h + a + bypass
        total += a + bypass if RESIDUAL_MODE else a
        rstd = tl.rsqrt(tl.sum(r * r, axis=0) / D + eps)
        nw = tl.load(nw_ptr + j * stride_nwp + offs, mask=ok, other=0.0).to(tl.float32)
        tl.store(xn_ptr + j * stride_xp + m * stride_xm + offs, (r * rstd * nw).to(xn_ptr.dtype.element_ty),
                 mask=ok)
    tl.store(res_ptr + m * stride_rm + offs, total, mask=ok)


BYPASS_MODES = ("residual", "mlp_input")


def group_residual(h: torch.Tensor, a: torch.Tensor, norm_weight: torch.Tensor, *, eps: float,
                   bypass: int = 0, bypass_mode: str = "residual",
                   out: tuple[torch.Tensor, torch.Tensor] | None = None):
    """h: [M, D]; a: [P, M, D]; norm_weight: [P, D] -> (xn [P, M, D] in h's dtype, residual [M, D] fp32).

    out: optional preallocated (xn, residual) to write into.
    """
    check_tensor("h", h, ndim=2)
    check_runnable(h)
    check_tensor("a", a, ndim=3, dtype=h.dtype, device=h.device)
    check_tensor("norm_weight", norm_weight, ndim=2, device=h.device)
    P, M, D = a.shape
    if tuple(h.shape) != (M, D):
        raise ValueError(f"h {tuple(h.shape)} does not match a {tuple(a.shape)} ([M, D] vs [P, M, D])")
    if tuple(norm_weight.shape) != (P, D):
        raise ValueError(f"norm_weight must have shape {(P, D)}, got {tuple(norm_weight.shape)}")
    if isinstance(bypass, bool) or not isinstance(bypass, int) or bypass < 0:
        raise ValueError(f"bypass must be an int >= 0, got {bypass!r}")
    if bypass_mode not in BYPASS_MODES:
        raise ValueError(f"bypass_mode must be one of {BYPASS_MODES}, got {bypass_mode!r}")
    if out is None:
        xn = torch.empty_like(a, memory_format=torch.contiguous_format)
        residual = torch.empty((M, D), device=h.device, dtype=torch.float32)
    else:
        xn, residual = out
        check_tensor("xn", xn, ndim=3, dtype=h.dtype, device=h.device)
        check_tensor("residual", residual, ndim=2, dtype=torch.float32, device=h.device)
        if xn.shape != a.shape or residual.shape != h.shape:
            raise ValueError("out must be (xn [P, M, D], residual [M, D])")
    if M == 0:
        return xn, residual
    _group_residual_kernel[(M,)](
        h, a, norm_weight, xn, residual, D, P, bypass, float(eps),
        h.stride(0), a.stride(0), a.stride(1), norm_weight.stride(0), xn.stride(0), xn.stride(1),
        residual.stride(0),
        RESIDUAL_MODE=bypass_mode == "residual", BLOCK_D=next_pow2(D),
        num_warps=4 if D <= 2048 else 8,
    )
    return xn, residual
