"""The KV cache's bookkeeping for a step of T new tokens per row, in one launch.

    start[0]            = position[0]                        the step's first cache slot
    key_valid[b, start + t] = valid[b, t]                    False at left padding
    positions[b, t]     = max(n_tokens[b] + cumsum_t(valid[b])[t] - 1, 0)    RoPE position of each token
    n_tokens[b]        += sum_t valid[b, t]
    position[0]        += T

The step's kernels read `start` (not `position`, which this launch has already moved on), so a captured
CUDA graph replays the whole step — bookkeeping included — at each new position. As torch ops this was
about a dozen small kernels per step (~20 us of a SmolLM2 decode step on the H100); here it is one
program: the work is B*T flags, taken as tiles of rows by blocks of T.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check_runnable, next_pow2
from ._pdl import pdl_options, release_consumer, wait_for_producer
from .rope_kv import check_start


@triton.jit
def _cache_advance_kernel(
    valid_ptr, key_valid_ptr, n_tokens_ptr, position_ptr, start_ptr, pos_ptr,
    B, T, stride_vb, stride_kb, stride_pb,
    HAS_VALID: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_T: tl.constexpr, USE_GDC: tl.constexpr,
):
    wait_for_producer(USE_GDC)  # _pdl.py: before any memory access
    start = tl.load(position_ptr)
    # BLOCK_B rows at a time, as [BLOCK_B, BLOCK_T] tiles: a batch's decode step loads every row's count and
    # flags before its first store, one round trip where a loop row by row made B of them
    for b0 in range(0, B, BLOCK_B):
        b = b0 + tl.arange(0, BLOCK_B)
        b_ok = b < B
        seen = tl.load(n_tokens_ptr + b, mask=b_ok, other=0)
        for t0 in range(0, T, BLOCK_T):
            t = t0 + tl.arange(0, BLOCK_T)
            ok = b_ok[:, None] & (t < T)[None, :]
            if HAS_VALID:
                real = tl.load(valid_ptr + b[:, None] * stride_vb + t[None, :], mask=ok, other=0).to(tl.int64)
            else:
                real = ok.to(tl.int64)
            tl.store(pos_ptr + b[:, None] * stride_pb + t[None, :],
                     tl.maximum(seen[:, None] + tl.cumsum(real, axis=1) - 1, 0), mask=ok)
            tl.store(key_valid_ptr + b[:, None] * stride_kb + start + t[None, :], real.to(tl.uint8), mask=ok)
            seen += tl.sum(real, axis=1)
        tl.store(n_tokens_ptr + b, seen, mask=b_ok)
    release_consumer(USE_GDC)
    tl.store(start_ptr, start)
    tl.store(position_ptr, start + T)


TILE = 1024  # flags a program takes at once: [BLOCK_B, BLOCK_T], BLOCK_T >= 16


def _tile(B: int, T: int) -> dict:
    """BLOCK_T covers a row's T flags (up to TILE), BLOCK_B as many rows as the rest of the tile holds."""
    block_t = min(TILE, max(16, next_pow2(T)))
    return dict(BLOCK_B=min(next_pow2(B), TILE // block_t), BLOCK_T=block_t)


def cache_advance(valid: torch.Tensor | None, key_valid: torch.Tensor, n_tokens: torch.Tensor,
                  position: torch.Tensor, start: torch.Tensor, T: int,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """valid: [B, T] bool (None: every token real); key_valid: [B, S] bool; n_tokens: [B] int64;
    position, start: int32 [1] on the device -> positions [B, T] int64 (see the module docstring).

    key_valid, n_tokens, position and start are updated in place. The caller guarantees
    position + T <= S (a device-side value cannot be checked without a sync).
    """
    if not isinstance(key_valid, torch.Tensor) or key_valid.dtype != torch.bool or key_valid.ndim != 2:
        raise TypeError("key_valid must be a bool tensor [B, S]")
    check_runnable(key_valid)
    device = key_valid.device
    B, S = key_valid.shape
    if key_valid.stride(-1) != 1 and S > 1:
        raise ValueError(f"key_valid rows must be contiguous, got strides {key_valid.stride()}")
    if not isinstance(n_tokens, torch.Tensor) or n_tokens.dtype != torch.int64:
        raise TypeError("n_tokens must be an int64 tensor [B]")
    if n_tokens.shape != (B,) or n_tokens.device != device:
        raise ValueError(f"n_tokens must be [B={B}] on {device}, got {tuple(n_tokens.shape)} on {n_tokens.device}")
    check_start(position, device)
    check_start(start, device)
    if isinstance(T, bool) or not isinstance(T, int) or not 0 < T <= S:
        raise ValueError(f"T must be an int in [1, {S}] (the cache's positions), got {T!r}")
    if valid is not None:
        if not isinstance(valid, torch.Tensor) or valid.dtype != torch.bool:
            raise TypeError("valid must be a bool tensor [B, T]")
        if valid.shape != (B, T) or valid.device != device or (valid.stride(-1) != 1 and T > 1):
            raise ValueError(f"valid must be [B={B}, T={T}] with contiguous rows on {device}, got "
                             f"{tuple(valid.shape)} on {valid.device}")
    if out is None:
        out = torch.empty((B, T), dtype=torch.int64, device=device)
    elif out.dtype != torch.int64 or out.shape != (B, T) or out.device != device or out.stride(-1) != 1:
        raise ValueError(f"out must be a contiguous int64 [B={B}, T={T}] on {device}")
    flags = key_valid.view(torch.uint8)
    vflags = valid.view(torch.uint8) if valid is not None else flags  # flags: unused when valid is None
    _cache_advance_kernel[(1,)](
        vflags, flags, n_tokens, position, start, out,
        B, T, vflags.stride(0), flags.stride(0), out.stride(0),
        HAS_VALID=valid is not None, **_tile(B, T), **pdl_options(key_valid),
    )
    return out
