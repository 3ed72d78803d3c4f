"""Attention of all P layers of a group in one launch, each layer over its own KV cache.

    q:        [P, B, T, H, Dh]      (a strided view of the QKV buffer, rotated in place by rope_kv)
    k/v cache [P, B, Hkv, S, Dh]    the group's caches, filled up to start + T
    key_valid [B, S] bool           False at left-padding positions
    out:      [P, B, T, H, Dh]

Query t of row b sits at cache position start + t and may attend to key j when j <= start + t and key j
is valid, or j == start + t (a padding query attends to itself, so no row is empty; its output is never
used). This is the torch backend's mask exactly.

One program handles one (layer, batch row, kv head) and BLOCK_M query rows of the T*G rows that share
that kv head (G = H / Hkv): GQA heads are packed into the rows of one tile, so decode (T = 1) fills a
16-row tile with G heads instead of wasting 15 rows per head. Prefill is causal flash attention (online
softmax, fp32 state, exp2). Decode splits the keys over NUM_SPLITS programs per head (flash decoding), so
a short batch still fills the GPU, and the partial softmaxes are merged in the same launch: each split
program stores its partial state, then takes a ticket from a per-head counter (a CTA barrier, then an
acq_rel atomic: the usual "last block reduces" pattern); the program that draws the last ticket merges
all splits in split order (deterministic) and resets the counter for the next launch or graph replay. A
separate merge kernel (merge="separate") is kept as the plain two-launch form; it cost ~3 us per group
and layer in decode on the H100. `start` is read from device memory: a captured CUDA graph replays the
step at any position.

The counters are one int32 per (layer, batch row, kv head), zero between launches, kept per device and
stream (`_common.ticket_counters`): two decode attentions must not run at the same time on one stream's
counters — which cannot happen within a stream, and streams have their own.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._common import (check_runnable, check_tensor, dot_flags, interpreting, multiprocessor_count,
                      next_pow2, ticket_counters)
from ._pdl import pdl_options, release_consumer, wait_for_producer
from .rope_kv import check_cache, check_start


@triton.jit
def _merge_splits(part_ptr, stat_ptr, out_ptr, pid_h, num_splits, B, T, HKV, G,
                  stride_op, stride_ob, stride_ot, stride_oh,
                  HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    """out rows of head pid_h = the splits' partial softmaxes combined in split order. The partials
    are read at L2 (.cg): other programs wrote them, and L1 is not coherent."""
    p, b, kv_head = pid_h // (B * HKV), (pid_h // HKV) % B, pid_h % HKV
    rows = tl.arange(0, BLOCK_M)
    t, g = rows // G, rows % G
    offs_d = tl.arange(0, BLOCK_D)
    m = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    row_ok = rows < T * G
    for s in range(0, num_splits):
        m = tl.maximum(m, tl.load(stat_ptr + ((pid_h * num_splits + s) * BLOCK_M + rows) * 2, mask=row_ok,
                                  other=float("-inf"), cache_modifier=".cg"))
    m_use = tl.where(m == float("-inf"), 0.0, m)
    l_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for s in range(0, num_splits):
        split_row = (pid_h * num_splits + s) * BLOCK_M + rows
        scale = tl.exp2(tl.load(stat_ptr + split_row * 2, mask=row_ok, other=float("-inf"),
                                cache_modifier=".cg") - m_use)
        l_sum += scale * tl.load(stat_ptr + split_row * 2 + 1, mask=row_ok, other=0.0, cache_modifier=".cg")
        acc += scale[:, None] * tl.load(part_ptr + split_row[:, None] * BLOCK_D + offs_d[None, :],
                                        mask=row_ok[:, None], other=0.0, cache_modifier=".cg")
    out = acc / tl.where(l_sum == 0.0, 1.0, l_sum)[:, None]
    o_rows = out_ptr + p * stride_op + b * stride_ob + t * stride_ot + (kv_head * G + g) * stride_oh
    ok = row_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    tl.store(o_rows[:, None] + offs_d[None, :], out.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _attention_kernel(
    q_ptr, k_ptr, v_ptr, valid_ptr, start_ptr, out_ptr, part_ptr, stat_ptr, ticket_ptr,
    B, T, HKV, G, split_len, sm_scale_log2,
    stride_qp, stride_qb, stride_qt, stride_qh,
    stride_kp, stride_kb, stride_kh, stride_ks,
    stride_vb,
    stride_op, stride_ob, stride_ot, stride_oh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    SPLIT: tl.constexpr, MERGE_HERE: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    USE_GDC: tl.constexpr,
):
    wait_for_producer(USE_GDC)  # _pdl.py: before any memory access
    pid_m, pid_h, pid_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    p, b, kv_head = pid_h // (B * HKV), (pid_h // HKV) % B, pid_h % HKV
    start = tl.load(start_ptr)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    t, g = rows // G, rows % G
    row_ok = rows < T * G
    q_pos = start + t
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM

    q_rows = q_ptr + p * stride_qp + b * stride_qb + t * stride_qt + (kv_head * G + g) * stride_qh
    q = tl.load(q_rows[:, None] + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)

    # Keys this program reads: its split of the cache, up to the last query's position in this tile.
    last_t = tl.minimum((pid_m * BLOCK_M + BLOCK_M - 1) // G, T - 1)
    lo = pid_s * split_len
    hi = tl.minimum(lo + split_len, start + last_t + 1)
    kv = p * stride_kp + b * stride_kb + kv_head * stride_kh

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for n0 in range(lo, hi, BLOCK_N):
        k_pos = n0 + tl.arange(0, BLOCK_N)
        k_ok = k_pos < hi
        k = tl.load(k_ptr + kv + k_pos[None, :] * stride_ks + offs_d[:, None],
                    mask=k_ok[None, :] & d_ok[:, None], other=0.0)
        v = tl.load(v_ptr + kv + k_pos[:, None] * stride_ks + offs_d[None, :],
                    mask=k_ok[:, None] & d_ok[None, :], other=0.0)
        if UPCAST:
            k, v = k.to(tl.float32), v.to(tl.float32)
        s = tl.dot(q, k, input_precision=DOT_PRECISION) * sm_scale_log2
        valid = tl.load(valid_ptr + b * stride_vb + k_pos, mask=k_ok, other=0) != 0
        diag = k_pos[None, :] == q_pos[:, None]
        allowed = (k_pos[None, :] <= q_pos[:, None]) & (valid[None, :] | diag) & k_ok[None, :]
        s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing allowed yet stays 0
        alpha = tl.exp2(m_i - m_use)
        prob = tl.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(prob, axis=1)
        acc = acc * alpha[:, None] + tl.dot(prob.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    release_consumer(USE_GDC)
    if SPLIT:  # unnormalised partial state of this split; _merge_kernel combines the splits
        # only the real rows: with one query head per kv head (MHA) 15 of 16 rows are padding
        split_row = (pid_h * tl.num_programs(2) + pid_s) * BLOCK_M + tl.arange(0, BLOCK_M)
        tl.store(part_ptr + split_row[:, None] * BLOCK_D + offs_d[None, :], acc, mask=row_ok[:, None])
        tl.store(stat_ptr + split_row * 2, m_i, mask=row_ok)
        tl.store(stat_ptr + split_row * 2 + 1, l_i, mask=row_ok)
        if MERGE_HERE:  # the last split of this head to finish merges them all
            tl.debug_barrier()  # every thread's partial stores precede the ticket (acq_rel, GPU scope)
            ticket = tl.atomic_add(ticket_ptr + pid_h, 1, sem="acq_rel")
            if ticket == tl.num_programs(2) - 1:
                _merge_splits(part_ptr, stat_ptr, out_ptr, pid_h, tl.num_programs(2), B, T, HKV, G,
                              stride_op, stride_ob, stride_ot, stride_oh,
                              HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D, BLOCK_M=BLOCK_M)
                tl.atomic_xchg(ticket_ptr + pid_h, 0)  # ready for the next launch
    else:
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        o_rows = out_ptr + p * stride_op + b * stride_ob + t * stride_ot + (kv_head * G + g) * stride_oh
        tl.store(o_rows[:, None] + offs_d[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _merge_kernel(
    part_ptr, stat_ptr, out_ptr, B, T, HKV, G, NUM_SPLITS,
    stride_op, stride_ob, stride_ot, stride_oh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, USE_GDC: tl.constexpr,
):
    wait_for_producer(USE_GDC)
    release_consumer(USE_GDC)  # one small wave: nothing to hold the next kernel for
    _merge_splits(part_ptr, stat_ptr, out_ptr, tl.program_id(0), NUM_SPLITS, B, T, HKV, G,
                  stride_op, stride_ob, stride_ot, stride_oh, HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D, BLOCK_M=BLOCK_M)


def _plan(P: int, B: int, Hkv: int, T: int, G: int, S: int, dtype: torch.dtype, num_splits: int | None):
    """(BLOCK_M, BLOCK_N, NUM_SPLITS, num_warps) for this shape."""
    rows = T * G
    if interpreting():
        return max(16, min(64, next_pow2(rows))), 32, num_splits or 1, 4
    if rows <= 16:  # decode: one tile of rows; spread the keys over about 2 programs per SM
        # (H100, LLaMA-7B shape, 512 cached keys: P = 1 in 2 splits of 256 keys 13.6 us, 4 of 128
        # keys 11.6 us; P = 4 in 2 splits 21.1 us, in 4 splits 25.6 us)
        block_n = 64
        if num_splits is None:
            sms = multiprocessor_count(torch.cuda.current_device())
            num_splits = max(1, min(triton.cdiv(2 * sms, P * B * Hkv), triton.cdiv(S, 128)))
        return 16, block_n, num_splits, 4
    return (128 if rows >= 1024 else 64), 64, 1, 4 if dtype != torch.float32 else 8


def group_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    key_valid: torch.Tensor, start: torch.Tensor, *, out: torch.Tensor | None = None,
                    num_splits: int | None = None, merge: str = "fused") -> torch.Tensor:
    """q: [P, B, T, H, Dh] (Dh contiguous); k_cache, v_cache: [P, B, Hkv, S, Dh]; key_valid: [B, S] bool;
    start: int32 [1] on the device (cache position of q's first token) -> out [P, B, T, H, Dh].

    num_splits: key splits for decode (T * H/Hkv <= 16 rows per kv head); default fills the GPU.
    merge: how split partials are combined: "fused" (by the last split program of each head, one launch)
        or "separate" (a second kernel).
    The caller guarantees start + T <= S (a device-side value cannot be checked without a sync).
    """
    check_tensor("q", q, ndim=5)
    check_runnable(q)
    check_cache(k_cache, v_cache, q)
    check_start(start, q.device)
    P, B, T, H, Dh = q.shape
    Pk, Bk, Hkv, S, Dhk = k_cache.shape
    if (Pk, Bk, Dhk) != (P, B, Dh):
        raise ValueError(f"q {tuple(q.shape)} does not match the caches {tuple(k_cache.shape)} "
                         f"(P, B and head_dim must agree)")
    if H % Hkv:
        raise ValueError(f"{H} query heads are not a multiple of {Hkv} kv heads")
    if not isinstance(key_valid, torch.Tensor) or key_valid.dtype != torch.bool:
        raise TypeError("key_valid must be a bool tensor [B, S]")
    if key_valid.shape != (B, S) or key_valid.device != q.device or key_valid.stride(-1) != 1:
        raise ValueError(f"key_valid must be [B={B}, S={S}] with contiguous rows on {q.device}, got "
                         f"{tuple(key_valid.shape)} on {key_valid.device}")
    if T > S:
        raise ValueError(f"{T} queries do not fit a cache of {S} positions")
    if num_splits is not None and (not isinstance(num_splits, int) or num_splits < 1):
        raise ValueError(f"num_splits must be an int >= 1, got {num_splits!r}")
    if merge not in ("fused", "separate"):
        raise ValueError(f"merge must be 'fused' or 'separate', got {merge!r}")
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    check_tensor("out", out, ndim=5, dtype=q.dtype, device=q.device)
    if out.shape != q.shape:
        raise ValueError(f"out must have shape {tuple(q.shape)}, got {tuple(out.shape)}")
    if q.numel() == 0:
        return out

    G = H // Hkv
    block_m, block_n, splits, warps = _plan(P, B, Hkv, T, G, S, q.dtype, num_splits)
    if T * G > block_m:
        splits = 1  # only a single tile of rows per head is split over the keys
    block_d = max(16, next_pow2(Dh))
    split_len = triton.cdiv(triton.cdiv(S, splits), block_n) * block_n
    splits = triton.cdiv(S, split_len)
    upcast, precision = dot_flags(q.dtype)
    heads = P * B * Hkv
    if splits > 1:
        part = torch.empty((heads * splits * block_m, block_d), device=q.device, dtype=torch.float32)
        stat = torch.empty((heads * splits * block_m, 2), device=q.device, dtype=torch.float32)
    else:
        part = stat = out  # unused
    merge_here = splits > 1 and merge == "fused"
    tickets = ticket_counters(q.device, heads) if merge_here else out  # out: unused
    valid = key_valid.view(torch.uint8)
    pdl = pdl_options(q)  # the same for both launches
    o_strides = (out.stride(0), out.stride(1), out.stride(2), out.stride(3))
    _attention_kernel[(triton.cdiv(T * G, block_m), heads, splits)](
        q, k_cache, v_cache, valid, start, out, part, stat, tickets,
        B, T, Hkv, G, split_len, math.log2(math.e) / math.sqrt(Dh),
        q.stride(0), q.stride(1), q.stride(2), q.stride(3),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), k_cache.stride(3),
        valid.stride(0), *o_strides,
        HEAD_DIM=Dh, BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n, SPLIT=splits > 1,
        MERGE_HERE=merge_here, UPCAST=upcast, DOT_PRECISION=precision, num_warps=warps, **pdl,
    )
    if splits > 1 and not merge_here:
        _merge_kernel[(heads,)](part, stat, out, B, T, Hkv, G, splits, *o_strides,
                                HEAD_DIM=Dh, BLOCK_D=block_d, BLOCK_M=block_m, **pdl)
    return out
