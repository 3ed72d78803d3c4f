"""Twins of cqil_kernels.ops.group_gemm."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _acc(t: torch.Tensor) -> torch.Tensor:
    """fp32 like the kernels' accumulators; float64 stays float64 (the tests' exact evaluation)."""
    return t if t.dtype == torch.float64 else t.float()


def _layers(x: torch.Tensor, P: int) -> torch.Tensor:
    return _acc(x).expand(P, *x.shape) if x.ndim == 2 else _acc(x)


def _normed(x, P, norm_weight, eps):
    xs = _layers(x, P)
    if norm_weight is not None:
        xs = xs * torch.rsqrt(xs.pow(2).mean(-1, keepdim=True) + eps) * _acc(norm_weight)[:, None]
    return xs


def group_linear_ref(x, w, *, norm_weight=None, eps=1e-6, bias=None, residual=None):
    """x: [M, K] or [P, M, K]; w: [P, N, K] -> [P, M, N] (see ops.group_gemm.group_linear)."""
    out = _normed(x, w.shape[0], norm_weight, eps) @ _acc(w).transpose(1, 2)
    if bias is not None:
        out = out + _acc(bias)[:, None]
    if residual is not None:
        out = out + _acc(residual)
    return out.to(x.dtype)


def group_swiglu_ref(x, w_gate, w_up, *, norm_weight=None, eps=1e-6, bias_gate=None, bias_up=None):
    """x: [P, M, K] or [M, K]; w_gate, w_up: [P, F, K] -> [P, M, F]."""
    xs = _normed(x, w_gate.shape[0], norm_weight, eps)
    g = xs @ _acc(w_gate).transpose(1, 2)
    u = xs @ _acc(w_up).transpose(1, 2)
    if bias_gate is not None:
        g, u = g + _acc(bias_gate)[:, None], u + _acc(bias_up)[:, None]
    return (F.silu(g) * u).to(x.dtype)


def group_down_sum_ref(x, w, residual=None, *, bias=None):
    """x: [P, M, F]; w: [P, D, F]; residual: [M, D] -> residual + sum_p x[p] @ w[p].T: [M, D]."""
    out = (_acc(x) @ _acc(w).transpose(1, 2)).sum(0)
    if bias is not None:
        out = out + _acc(bias).sum(0)
    if residual is not None:
        out = out + _acc(residual)
    return out.to(x.dtype)


def sum_parts_ref(parts, residual=None, *, dtype=None):
    """Same contract as ops.group_gemm.sum_parts: residual + parts[0] + parts[1] + ..., in order, in
    fp32 (float64 for float64 inputs), rounded once to dtype (default parts')."""
    acc = torch.float64 if parts.dtype == torch.float64 else torch.float32
    total = torch.zeros(parts.shape[1:], dtype=acc, device=parts.device) if residual is None else residual.to(acc)
    for part in parts:
        total = total + part.to(acc)
    return total.to(dtype or parts.dtype)


def silu_mul_ref(g, u):
    """Same contract as ops.group_gemm.silu_mul: silu(g) * u in fp32 (float64 for float64), rounded once."""
    return (F.silu(_acc(g)) * _acc(u)).to(g.dtype)
