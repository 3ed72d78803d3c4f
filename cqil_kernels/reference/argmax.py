"""Twin of cqil_kernels.ops.argmax."""

from __future__ import annotations

import torch


def row_argmax_ref(logits: torch.Tensor) -> torch.Tensor:
    """logits: [B, V] -> [B] int64: torch.argmax's rules (first of equal maxima, NaN above everything)."""
    return logits.argmax(dim=-1)
