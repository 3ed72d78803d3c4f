"""RoPE on the q and k heads of all P layers of a group, and the KV-cache write, in one launch.

The QKV GEMM leaves qkv: [P, B*T, (H + 2*Hkv) * Dh] (q heads, then k heads, then v heads per row). This
kernel rotates q in place (attention reads it from there) and writes rotated k and plain v into the
group's caches k_cache, v_cache: [P, B, Hkv, S, Dh] at slot start + t, where `start` is read from device
memory so a captured CUDA graph can replay the step at a new position. Angles are pos * inv_freq in fp32
(rotate-half convention of the HF checkpoints); the rotation is computed in fp32 and rounded once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check_runnable, check_tensor, next_pow2
from ._pdl import pdl_options, release_consumer, wait_for_producer


@triton.jit
def _rope_kv_kernel(
    qkv_ptr, pos_ptr, inv_freq_ptr, k_ptr, v_ptr, start_ptr,
    B, T, H, HKV,
    stride_qp, stride_qm, stride_pb, stride_cp, stride_cb, stride_ch, stride_cs,
    HEAD_DIM: tl.constexpr, HALF_BLOCK: tl.constexpr, HEAD_BLOCK: tl.constexpr, RELEASE_AT_ONCE: tl.constexpr,
    USE_GDC: tl.constexpr,
):
    wait_for_producer(USE_GDC)  # _pdl.py: before any memory access
    if RELEASE_AT_ONCE:  # decode: attention's programs start now and load older keys while this one works
        release_consumer(USE_GDC)
    # One program per token of one layer, all its q and k heads as one [heads, Dh/2] tile (one
    # program per head was 24 us per LLaMA-7B layer for a 512-token prefill on the H100).
    row = tl.program_id(0)  # over P*B*T
    p, bt = row // (B * T), row % (B * T)
    b, t = bt // T, bt % T
    half = HEAD_DIM // 2
    offs = tl.arange(0, HALF_BLOCK)
    heads = tl.arange(0, HEAD_BLOCK)
    d_ok = offs < half
    # Every load before the first store: they go out together, one round trip. The compiler keeps a load after a
    # store it cannot tell apart from it, and a store waits for the value it stores: the slot's and the values'
    # loads came one round trip after the q stores, another after the k stores. (Loading the angles' inputs before
    # the wait instead made SmolLM2 decode slower: docs/performance.md, tried and dropped.)
    pos = tl.load(pos_ptr + b * stride_pb + t).to(tl.float32)
    freq = tl.load(inv_freq_ptr + offs, mask=d_ok, other=0.0)
    slot = tl.load(start_ptr) + t
    src = qkv_ptr + p * stride_qp + bt * stride_qm + heads[:, None] * HEAD_DIM + offs[None, :]
    ok = (heads < H + HKV)[:, None] & d_ok[None, :]
    x1 = tl.load(src, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(src + half, mask=ok, other=0.0).to(tl.float32)
    kv = tl.arange(0, HEAD_BLOCK)
    kv_ok = (kv < HKV)[:, None] & d_ok[None, :]
    v_src = qkv_ptr + p * stride_qp + bt * stride_qm + (H + HKV + kv)[:, None] * HEAD_DIM + offs[None, :]
    v1 = tl.load(v_src, mask=kv_ok, other=0.0)
    v2 = tl.load(v_src + half, mask=kv_ok, other=0.0)
    angle = pos * freq
    cos, sin = tl.cos(angle)[None, :], tl.sin(angle)[None, :]
    y1, y2 = x1 * cos - x2 * sin, x2 * cos + x1 * sin
    if not RELEASE_AT_ONCE:
        release_consumer(USE_GDC)
    is_q = (heads < H)[:, None] & d_ok[None, :]
    tl.store(src, y1.to(qkv_ptr.dtype.element_ty), mask=is_q)
    tl.store(src + half, y2.to(qkv_ptr.dtype.element_ty), mask=is_q)
    # k heads (rotated) and v heads (as they are) go to the cache at slot start + t
    k_sel = (heads >= H)[:, None] & ok  # rows H .. H+HKV-1 of the tile are the k heads
    k_dst = k_ptr + p * stride_cp + b * stride_cb + (heads - H)[:, None] * stride_ch + slot * stride_cs \
        + offs[None, :]
    tl.store(k_dst, y1.to(k_ptr.dtype.element_ty), mask=k_sel)
    tl.store(k_dst + half, y2.to(k_ptr.dtype.element_ty), mask=k_sel)
    dst = p * stride_cp + b * stride_cb + kv[:, None] * stride_ch + slot * stride_cs + offs[None, :]
    tl.store(v_ptr + dst, v1.to(v_ptr.dtype.element_ty), mask=kv_ok)
    tl.store(v_ptr + dst + half, v2.to(v_ptr.dtype.element_ty), mask=kv_ok)


# At most this many programs (decode: P * B tokens) let the next kernel launch as soon as they have waited
# for theirs: one wave, so the next kernel's programs, which wait in turn, take no SM a program of this
# one still needs. Decode attention starts its loads of the older keys then (ops/attention.py). A prompt's
# thousands of programs release after their loads, as every kernel here does.
RELEASE_AT_ONCE_PROGRAMS = 128


def _tiles(num_heads: int, num_kv_heads: int, head_dim: int) -> dict:
    """A launch's tile of q and k heads by half a head, and its warps."""
    heads = num_heads + num_kv_heads
    return dict(HALF_BLOCK=next_pow2(head_dim // 2), HEAD_BLOCK=next_pow2(heads),
                num_warps=4 if heads * head_dim <= 4096 else 8)


def check_cache(k_cache: torch.Tensor, v_cache: torch.Tensor, like: torch.Tensor) -> None:
    """The group's caches: [P, B, Hkv, S, Dh] each, same dtype/device as `like`, rows contiguous."""
    check_tensor("k_cache", k_cache, ndim=5, dtype=like.dtype, device=like.device)
    check_tensor("v_cache", v_cache, ndim=5, dtype=like.dtype, device=like.device)
    if k_cache.shape != v_cache.shape or k_cache.stride() != v_cache.stride():
        raise ValueError(f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} must have "
                         f"the same shape and strides")


def check_start(start: torch.Tensor, device: torch.device) -> None:
    if not isinstance(start, torch.Tensor) or start.dtype != torch.int32 or start.numel() != 1:
        raise TypeError("start must be a one-element int32 tensor (the cache position of the first new "
                        "token, kept on the device so CUDA graphs can replay at new positions)")
    if start.device != device:
        raise ValueError(f"start is on {start.device}, expected {device}")


def check_rope_kv(like: torch.Tensor, qkv_shape: tuple[int, int, int], positions: torch.Tensor,
                  inv_freq: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, start: torch.Tensor,
                  *, num_heads: int, num_kv_heads: int) -> tuple[int, int, int]:
    """The arguments of a RoPE + KV-cache write of a QKV result of shape qkv_shape [P, B*T, (H+2Hkv)*Dh]
    (dtype and device those of `like`) -> (P, B, T); ValueError/TypeError naming what does not fit."""
    check_cache(k_cache, v_cache, like)
    check_start(start, like.device)
    P, Bk, Hkv, S, Dh = k_cache.shape
    if not isinstance(positions, torch.Tensor) or positions.ndim != 2 or positions.dtype not in (
            torch.int32, torch.int64):
        raise TypeError("positions must be an int32/int64 tensor [B, T]")
    B, T = positions.shape
    if positions.device != like.device or positions.stride(-1) != 1:
        raise ValueError("positions must be on the qkv's device with contiguous rows")
    if num_kv_heads != Hkv or num_heads % num_kv_heads:
        raise ValueError(f"num_heads {num_heads} / num_kv_heads {num_kv_heads} do not fit a cache of "
                         f"{Hkv} kv heads")
    if Dh % 2:
        raise ValueError(f"head_dim must be even for RoPE, got {Dh}")
    if qkv_shape != (P, B * T, (num_heads + 2 * Hkv) * Dh) or Bk != B:
        raise ValueError(f"qkv {qkv_shape} does not match P={P}, B*T={B * T}, "
                         f"(H + 2*Hkv)*Dh={(num_heads + 2 * Hkv) * Dh} and the cache's batch {Bk}")
    if inv_freq.shape != (Dh // 2,) or inv_freq.dtype != torch.float32 or inv_freq.device != like.device:
        raise ValueError(f"inv_freq must be float32 [{Dh // 2}] on {like.device}")
    if T > S:
        raise ValueError(f"{T} new tokens do not fit a cache of {S} positions")
    return P, B, T


def rope_kv_write(qkv: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor,
                  k_cache: torch.Tensor, v_cache: torch.Tensor, start: torch.Tensor,
                  *, num_heads: int, num_kv_heads: int) -> None:
    """qkv: [P, B*T, (H + 2*Hkv)*Dh] (q rotated in place); positions: [B, T] int RoPE positions;
    inv_freq: [Dh/2] fp32; k_cache, v_cache: [P, B, Hkv, S, Dh]; start: int32 [1] on the device.

    The caller guarantees start + T <= S (the kernel cannot check a device-side value without a sync).
    """
    check_tensor("qkv", qkv, ndim=3)
    check_runnable(qkv)
    P, B, T = check_rope_kv(qkv, tuple(qkv.shape), positions, inv_freq, k_cache, v_cache, start,
                            num_heads=num_heads, num_kv_heads=num_kv_heads)
    Hkv, Dh = k_cache.shape[2], k_cache.shape[4]
    if P * B * T == 0:
        return
    _rope_kv_kernel[(P * B * T,)](
        qkv, positions, inv_freq, k_cache, v_cache, start,
        B, T, num_heads, Hkv,
        qkv.stride(0), qkv.stride(1), positions.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), k_cache.stride(3),
        HEAD_DIM=Dh, RELEASE_AT_ONCE=P * B * T <= RELEASE_AT_ONCE_PROGRAMS, **_tiles(num_heads, Hkv, Dh),
        **pdl_options(qkv),
    )
