"""Twin of cqil_kernels.ops.rope_kv."""

from __future__ import annotations

import torch


def rope_kv_write_ref(qkv, positions, inv_freq, k_cache, v_cache, start, *, num_heads, num_kv_heads):
    """Same contract as ops.rope_kv.rope_kv_write (in place on qkv, k_cache, v_cache)."""
    P, _, Hkv, _, Dh = k_cache.shape
    B, T = positions.shape
    acc = torch.float64 if qkv.dtype == torch.float64 else torch.float32
    angle = positions.to(acc)[..., None] * inv_freq.to(acc)  # [B, T, Dh/2]
    cos, sin = angle.cos()[None, :, :, None], angle.sin()[None, :, :, None]
    x = qkv.view(P, B, T, num_heads + 2 * num_kv_heads, Dh)
    qk = x[:, :, :, :num_heads + num_kv_heads].to(acc)
    x1, x2 = qk[..., :Dh // 2], qk[..., Dh // 2:]
    rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), -1).to(qkv.dtype)
    x[:, :, :, :num_heads] = rotated[:, :, :, :num_heads]
    s = int(start.item())
    k_cache[:, :, :, s:s + T] = rotated[:, :, :, num_heads:].transpose(2, 3)
    v_cache[:, :, :, s:s + T] = x[:, :, :, num_heads + num_kv_heads:].transpose(2, 3)
