"""Twin of cqil_kernels.ops.rms_norm."""

from __future__ import annotations

from ..model import rms_norm


def group_rms_norm_ref(x, weight, *, eps):
    """Same contract as ops.rms_norm.group_rms_norm: x [M, D], weight [P, D] -> [P, M, D] (the torch
    backend's RMSNorm, once per layer; float64 inputs give the exact values)."""
    return rms_norm(x, weight[:, None, :], eps)
