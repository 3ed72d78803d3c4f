"""Twin of cqil_kernels.ops.cache_advance."""

from __future__ import annotations

import torch


def cache_advance_ref(valid, key_valid, n_tokens, position, start, T: int) -> torch.Tensor:
    """The same in-place updates and returned positions [B, T] int64 as ops.cache_advance, as torch ops."""
    B = key_valid.shape[0]
    if valid is None:
        valid = torch.ones(B, T, dtype=torch.bool, device=key_valid.device)
    start.copy_(position)
    slots = position.long() + torch.arange(T, device=key_valid.device)
    key_valid.index_copy_(1, slots, valid)
    positions = (n_tokens[:, None] + valid.long().cumsum(1) - 1).clamp(min=0)
    n_tokens += valid.long().sum(1)
    position += T
    return positions
