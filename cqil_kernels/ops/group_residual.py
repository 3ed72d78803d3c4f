"""Bypass prefix sums + residual + post-attention RMSNorm of a CQIL group, in one launch.

Given the group input h: [M, D] and the P attention outputs a: [P, M, D] (after o_proj), with bypass
distance d (docs/design.md):
    b_j  = a_{j-1} + ... + a_{j-min(d, j)}
    x_j  = RMSNorm^post_j(h + a_j + b_j)                      -> xn [P, M, D], the MLP inputs
    R    = h + sum_j (a_j + b_j)     ("residual" mode)
         = h + sum_j a_j             ("mlp_input" mode)        -> residual [M, D] float32
The down-projection kernel adds sum_j m_j to R, giving the group's output h'. R stays fp32 so the
group's output is rounded once. One program per row, the P layers' rows loaded at once where their [P, D]
tile fits a program (TILE_ELEMENTS), else layer by layer; arithmetic in fp32.

rank_residual is the same for one layer j of a group spread over ranks (parallel/rank.py): the bypass
b_j arrives summed from the other ranks (`received`), and only rank 0 puts h into its R:
    x_j = RMSNorm^post_j(h + a_j + b_j);   R_j = [h] + a_j + b_j ("residual") or [h] + a_j ("mlp_input").
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check_runnable, check_tensor, next_pow2
from ._pdl import pdl_options, release_consumer, wait_for_producer


@triton.jit
def _row(tile, layers, j):
    """Row j of tile [BLOCK_P, BLOCK_D] as fp32 [BLOCK_D] (a sum of the row and zeros: exact)."""
    return tl.sum(tl.where((layers == j)[:, None], tile, 0.0).to(tl.float32), axis=0)


@triton.jit
def _layer(h, a_j, bypass, total, nw_j, xn_row, offs, ok, D, eps, RESIDUAL_MODE: tl.constexpr):
    """Layer j of the group: its normed input x_j stored at xn_row; returns the residual sum with its terms."""
    r = h + a_j + bypass
    rstd = tl.rsqrt(tl.sum(r * r, axis=0) / D + eps)
    tl.store(xn_row + offs, (r * rstd * nw_j).to(xn_row.dtype.element_ty), mask=ok)
    return total + (a_j + bypass if RESIDUAL_MODE else a_j)


@triton.jit
def _group_residual_kernel(
    h_ptr, a_ptr, nw_ptr, xn_ptr, res_ptr, recv_ptr,
    D, P, BYPASS, eps,
    stride_hm, stride_ap, stride_am, stride_nwp, stride_xp, stride_xm, stride_rm, stride_bm,
    RESIDUAL_MODE: tl.constexpr, HAS_RECV: tl.constexpr, INCLUDE_H: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_P: tl.constexpr, TILED: tl.constexpr, USE_GDC: tl.constexpr,
):
    wait_for_producer(USE_GDC)  # _pdl.py: before any memory access
    m = tl.program_id(0)
    offs = tl.arange(0, BLOCK_D)
    ok = offs < D
    if TILED:
        # Every load before the first store, the P layers' rows as [BLOCK_P, BLOCK_D] tiles in their own dtype: they
        # go out together. Loaded layer by layer between the stores of x_j, each layer's loads came a round trip
        # after the last (the compiler keeps a load after a store it cannot tell apart from it).
        layers = tl.arange(0, BLOCK_P)
        tile_ok = (layers < P)[:, None] & ok[None, :]
        a = tl.load(a_ptr + layers[:, None] * stride_ap + m * stride_am + offs[None, :], mask=tile_ok, other=0.0)
        nw = tl.load(nw_ptr + layers[:, None] * stride_nwp + offs[None, :], mask=tile_ok, other=0.0)
    h = tl.load(h_ptr + m * stride_hm + offs, mask=ok, other=0.0).to(tl.float32)
    if HAS_RECV:  # P == 1: b_j summed on the other ranks
        received = tl.load(recv_ptr + m * stride_bm + offs, mask=ok, other=0.0).to(tl.float32)
    total = h if INCLUDE_H else tl.zeros((BLOCK_D,), dtype=tl.float32)
    if TILED:
        for j in tl.static_range(BLOCK_P):
            if j < P:
                bypass = tl.zeros((BLOCK_D,), dtype=tl.float32)
                if HAS_RECV:
                    bypass += received
                for i in tl.static_range(j):
                    if i >= j - BYPASS:
                        bypass += _row(a, layers, i)
                total = _layer(h, _row(a, layers, j), bypass, total, _row(nw, layers, j),
                               xn_ptr + j * stride_xp + m * stride_xm, offs, ok, D, eps, RESIDUAL_MODE)
    else:  # groups whose tiles would not fit a program's registers (_launch): layer by layer
        for j in range(0, P):
            a_j = tl.load(a_ptr + j * stride_ap + m * stride_am + offs, mask=ok, other=0.0).to(tl.float32)
            bypass = tl.zeros((BLOCK_D,), dtype=tl.float32)
            if HAS_RECV:
                bypass += received
            for i in range(tl.maximum(j - BYPASS, 0), j):
                bypass += tl.load(a_ptr + i * stride_ap + m * stride_am + offs, mask=ok, other=0.0).to(tl.float32)
            nw_j = tl.load(nw_ptr + j * stride_nwp + offs, mask=ok, other=0.0).to(tl.float32)
            total = _layer(h, a_j, bypass, total, nw_j, xn_ptr + j * stride_xp + m * stride_xm, offs, ok, D, eps,
                           RESIDUAL_MODE)
    release_consumer(USE_GDC)
    tl.store(res_ptr + m * stride_rm + offs, total, mask=ok)


# The largest [BLOCK_P, BLOCK_D] tile loaded at once, and the most layers (rows extracted from it: O(P^2) with a
# bypass). sm_90 ptxas at 16 warps: P 4 x D 4096, P 8 x D 2048 and P 2 x D 8192 take 120-128 registers, no spills;
# P 8 x D 4096 spilled 136 bytes, P 16 x D 4096 4.6 KB and P 32 x D 4096 13.5 KB (and compiled for 29 s).
TILE_ELEMENTS, TILE_LAYERS = 16384, 8


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
    _launch(h, a, norm_weight, xn, residual, None, eps, bypass, bypass_mode, include_h=True)
    return xn, residual


def rank_residual(h: torch.Tensor, a: torch.Tensor, norm_weight: torch.Tensor, *, eps: float,
                  received: torch.Tensor | None = None, include_h: bool = True,
                  bypass_mode: str = "residual"):
    """One layer of a group spread over ranks. h, a: [M, D]; norm_weight: [D]; received: [M, D] (b_j,
    the bypassed attention outputs summed from the other ranks) or None -> (xn [M, D] in h's dtype,
    residual [M, D] fp32), see the module docstring."""
    check_tensor("h", h, ndim=2)
    check_runnable(h)
    check_tensor("a", a, ndim=2, dtype=h.dtype, device=h.device)
    check_tensor("norm_weight", norm_weight, ndim=1, device=h.device)
    if a.shape != h.shape:
        raise ValueError(f"a {tuple(a.shape)} does not match h {tuple(h.shape)}")
    if tuple(norm_weight.shape) != (h.shape[1],):
        raise ValueError(f"norm_weight must have shape {(h.shape[1],)}, got {tuple(norm_weight.shape)}")
    if received is not None:
        check_tensor("received", received, ndim=2, dtype=h.dtype, device=h.device)
        if received.shape != h.shape:
            raise ValueError(f"received {tuple(received.shape)} does not match h {tuple(h.shape)}")
    if bypass_mode not in BYPASS_MODES:
        raise ValueError(f"bypass_mode must be one of {BYPASS_MODES}, got {bypass_mode!r}")
    xn = torch.empty_like(h, memory_format=torch.contiguous_format)
    residual = torch.empty(h.shape, device=h.device, dtype=torch.float32)
    _launch(h, a[None], norm_weight[None], xn[None], residual, received, eps, 0, bypass_mode,
            include_h=bool(include_h))
    return xn, residual


def _plan(D: int, P: int) -> dict:
    """BLOCK_D, BLOCK_P, TILED and the warps of a launch for P layers of width D."""
    block_d, block_p = next_pow2(D), next_pow2(P)
    tiled = block_p <= TILE_LAYERS and block_p * block_d <= TILE_ELEMENTS
    if not tiled:
        block_p = 1  # unused: one compile for every such group
    # about 32 elements a thread in each [BLOCK_P, BLOCK_D] tile (sm_90 ptxas: P 4, D 4096 take 217 registers
    # with 8 warps, 120 with 16)
    warps = min(16, max(4 if D <= 2048 else 8, next_pow2(block_p * block_d // 1024)))
    return dict(BLOCK_D=block_d, BLOCK_P=block_p, TILED=tiled, num_warps=warps)


def _launch(h, a, norm_weight, xn, residual, received, eps, bypass, bypass_mode, include_h):
    M, D = h.shape
    if M == 0:
        return
    _group_residual_kernel[(M,)](
        h, a, norm_weight, xn, residual, received if received is not None else h, D, a.shape[0], bypass,
        float(eps), h.stride(0), a.stride(0), a.stride(1), norm_weight.stride(0), xn.stride(0), xn.stride(1),
        residual.stride(0), received.stride(0) if received is not None else 0,
        RESIDUAL_MODE=bypass_mode == "residual", HAS_RECV=received is not None, INCLUDE_H=include_h,
        **_plan(D, a.shape[0]), **pdl_options(h),
    )
