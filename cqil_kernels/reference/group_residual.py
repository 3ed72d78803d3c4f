"""Twin of cqil_kernels.ops.group_residual."""

from __future__ import annotations

import torch


def group_residual_ref(h, a, norm_weight, *, eps, bypass=0, bypass_mode="residual"):
    """Same contract as ops.group_residual.group_residual -> (xn [P, M, D], residual [M, D])."""
    acc = torch.float64 if h.dtype == torch.float64 else torch.float32
    h32, a32 = h.to(acc), a.to(acc)
    total = h32.clone()
    xn = []
    for j in range(a.shape[0]):
        b = sum((a32[i] for i in range(max(0, j - bypass), j)), torch.zeros_like(h32))
        r = h32 + a32[j] + b
        total += a32[j] + b if bypass_mode == "residual" else a32[j]
        xn.append(r * torch.rsqrt(r.pow(2).mean(-1, keepdim=True) + eps) * norm_weight[j].to(acc))
    return torch.stack(xn).to(h.dtype), total.to(torch.float32 if acc == torch.float32 else acc)


def rank_residual_ref(h, a, norm_weight, *, eps, received=None, include_h=True, bypass_mode="residual"):
    """Same contract as ops.group_residual.rank_residual -> (xn [M, D], residual [M, D])."""
    acc = torch.float64 if h.dtype == torch.float64 else torch.float32
    h32, a32 = h.to(acc), a.to(acc)
    b = received.to(acc) if received is not None else torch.zeros_like(h32)
    r = h32 + a32 + b
    total = (h32 if include_h else torch.zeros_like(h32)) + (a32 + b if bypass_mode == "residual" else a32)
    xn = r * torch.rsqrt(r.pow(2).mean(-1, keepdim=True) + eps) * norm_weight.to(acc)
    return xn.to(h.dtype), total.to(torch.float32 if acc == torch.float32 else acc)
