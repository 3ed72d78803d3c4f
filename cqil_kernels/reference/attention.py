"""Twin of cqil_kernels.ops.attention."""

from __future__ import annotations

import math

import torch


def group_attention_ref(q, k_cache, v_cache, key_valid, start):
    """Same contract as ops.attention.group_attention: q [P, B, T, H, Dh] -> [P, B, T, H, Dh]."""
    P, B, T, H, Dh = q.shape
    Hkv = k_cache.shape[2]
    s0 = int(start.item())
    end = s0 + T
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    k = k_cache[:, :, :, :end].to(acc).repeat_interleave(H // Hkv, dim=2)  # [P, B, H, end, Dh]
    v = v_cache[:, :, :, :end].to(acc).repeat_interleave(H // Hkv, dim=2)
    qh = q.to(acc).transpose(2, 3)  # [P, B, H, T, Dh]
    scores = qh @ k.transpose(-1, -2) / math.sqrt(Dh)
    q_pos = torch.arange(s0, end, device=q.device)[:, None]
    k_pos = torch.arange(end, device=q.device)[None, :]
    allowed = (k_pos <= q_pos) & (key_valid[:, None, :end] | (k_pos == q_pos))  # [B, T, end]
    scores = scores.masked_fill(~allowed[None, :, None], float("-inf"))
    return (scores.softmax(-1) @ v).transpose(2, 3).to(q.dtype)
