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
a short batch still fills the GPU; each split's share is sized in the kernel from start (the keys
actually cached, not the cache's length), so a long, mostly empty cache still spreads its keys over
every program. The partial softmaxes are merged in the same launch: each split program stores its
partial state, then takes a ticket from a per-head counter (a CTA barrier, then an acq_rel atomic: the
usual "last block reduces" pattern); the program that draws the last ticket merges all splits (their
state loaded at once, summed in a fixed order: deterministic) and resets the counter for the next launch
or graph replay. A separate merge kernel (merge="separate") is kept as the plain two-launch form; it cost
~3 us per group and layer in decode on the H100. `start` is read from device memory: a captured CUDA
graph replays the step at any position.

Keys read before the wait. With programmatic dependent launch (_pdl.py) a decode attention's programs
start while rope_kv, the kernel before it on the stream (fused.stage_attention), still runs. rope_kv
writes q and the keys and values at cache positions start .. start + T - 1, nothing else; `start`, the
key-valid flags and the keys before start were written at least two kernels back (cache_advance, earlier
steps, the prompt), and the chain of waits has completed those. So each split program reads `start` and
its first tile of the older keys, values and flags before it waits, and only q and the step's own keys
after: the tile's memory traffic overlaps rope_kv instead of following it. The caller vouches for what
the launch before wrote (`keys_before_wait=True`, fused.stage_attention's call); other calls, and prompts
(no split), wait first.

The counters are one int32 per (layer, batch row, kv head), zero between launches, kept per device and
stream (`_common.ticket_counters`): two decode attentions must not run at the same time on one stream's
counters — which cannot happen within a stream, and streams have their own.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._common import (cdiv, check_runnable, check_tensor, dot_flags, interpreting, multiprocessor_count,
                      next_pow2, ticket_counters)
from ._pdl import pdl_options, release_consumer, wait_for_producer
from .rope_kv import check_cache, check_start


@triton.jit
def _merge_splits(part_ptr, stat_ptr, out_ptr, pid_h, num_splits, B, T, HKV, G,
                  stride_op, stride_ob, stride_ot, stride_oh,
                  HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                  SPLIT_CHUNK: tl.constexpr, ROWS_P2: tl.constexpr):
    """out rows of head pid_h = the splits' partial softmaxes combined (fixed order: the same bits every
    time). The state of SPLIT_CHUNK splits is loaded at once as [SPLIT_CHUNK, ROWS_P2(, BLOCK_D)] tiles
    of the T*G real rows — usually all splits in one round trip to L2 (a loop that loaded them split by
    split cost 0.6 us per launch for SmolLM2, 1.4 us for LLaMA-7B, H100). The partials are read at L2
    (.cg): other programs wrote them, and L1 is not coherent.

    The sums over splits are reduced across threads with butterfly shuffles, after which every thread
    of a row holds the result and all of them write it when it changes layout (through shared memory).
    Fused into a multiply-add, the shuffle steps round differently on each thread, the copies differ in
    the last bit and which one lands is a race (compute-sanitizer racecheck: write-write hazard at the
    final division; triton-lang/triton#7264). Launches that merge therefore compile with
    enable_fp_fusion=False: then the copies are the same sums in swapped order, bit for bit."""
    p, b, kv_head = pid_h // (B * HKV), (pid_h // HKV) % B, pid_h % HKV
    rows = tl.arange(0, ROWS_P2)
    t, g = rows // G, rows % G
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = rows < T * G
    m_run = tl.full((ROWS_P2,), float("-inf"), dtype=tl.float32)
    l_run = tl.zeros((ROWS_P2,), dtype=tl.float32)
    acc = tl.zeros((ROWS_P2, BLOCK_D), dtype=tl.float32)
    for s0 in range(0, num_splits, SPLIT_CHUNK):
        split = s0 + tl.arange(0, SPLIT_CHUNK)
        ok = (split < num_splits)[:, None] & row_ok[None, :]
        split_row = (pid_h * num_splits + split[:, None]) * BLOCK_M + rows[None, :]  # [SPLIT_CHUNK, ROWS_P2]
        m_s = tl.load(stat_ptr + split_row * 2, mask=ok, other=float("-inf"), cache_modifier=".cg")
        l_s = tl.load(stat_ptr + split_row * 2 + 1, mask=ok, other=0.0, cache_modifier=".cg")
        part = tl.load(part_ptr + split_row[:, :, None] * BLOCK_D + offs_d[None, None, :],
                       mask=ok[:, :, None], other=0.0, cache_modifier=".cg")
        m_new = tl.maximum(m_run, tl.max(m_s, axis=0))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # empty so far: every scale is 0
        alpha = tl.exp2(m_run - m_use)
        scale = tl.exp2(m_s - m_use[None, :])
        l_run = l_run * alpha + tl.sum(scale * l_s, axis=0)
        acc = acc * alpha[:, None] + tl.sum(scale[:, :, None] * part, axis=0)
        m_run = m_new
    out = acc / tl.where(l_run == 0.0, 1.0, l_run)[:, None]
    o_rows = out_ptr + p * stride_op + b * stride_ob + t * stride_ot + (kv_head * G + g) * stride_oh
    ok = row_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    tl.store(o_rows[:, None] + offs_d[None, :], out.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _load_kv(k_ptr, v_ptr, kv, k_pos, ok, offs_d, d_ok, stride_ks):
    """Keys [BLOCK_D, BLOCK_N] and values [BLOCK_N, BLOCK_D] at cache positions k_pos where ok, zero elsewhere
    (kv: the head's offset in the caches)."""
    k = tl.load(k_ptr + kv + k_pos[None, :] * stride_ks + offs_d[:, None], mask=ok[None, :] & d_ok[:, None],
                other=0.0)
    v = tl.load(v_ptr + kv + k_pos[:, None] * stride_ks + offs_d[None, :], mask=ok[:, None] & d_ok[None, :],
                other=0.0)
    return k, v


@triton.jit
def _load_keys(k_ptr, v_ptr, valid_ptr, kv, valid_row, k_pos, ok, offs_d, d_ok, stride_ks):
    """_load_kv's keys and values, and the key-valid flags (uint8) at k_pos (valid_row: the row's flags)."""
    k, v = _load_kv(k_ptr, v_ptr, kv, k_pos, ok, offs_d, d_ok, stride_ks)
    return k, v, tl.load(valid_ptr + valid_row + k_pos, mask=ok, other=0)


@triton.jit
def _attend_tile(q, k, v, valid, k_pos, q_pos, hi, m_i, l_i, acc, sm_scale_log2,
                 UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One tile of keys k [BLOCK_D, BLOCK_N], values v [BLOCK_N, BLOCK_D] at cache positions k_pos (those
    at hi or later are not this program's) into the online softmax state (m_i, l_i, acc) of q's rows."""
    if UPCAST:
        k, v = k.to(tl.float32), v.to(tl.float32)
    s = tl.dot(q, k, input_precision=DOT_PRECISION) * sm_scale_log2
    diag = k_pos[None, :] == q_pos[:, None]
    allowed = (k_pos[None, :] <= q_pos[:, None]) & (valid[None, :] | diag) & (k_pos < hi)[None, :]
    s = tl.where(allowed, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing allowed yet stays 0
    alpha = tl.exp2(m_i - m_use)
    prob = tl.exp2(s - m_use[:, None])
    l_i = l_i * alpha + tl.sum(prob, axis=1)
    acc = acc * alpha[:, None] + tl.dot(prob.to(v.dtype), v, input_precision=DOT_PRECISION)
    return m_new, l_i, acc


@triton.jit
def _attention_kernel(
    q_ptr, k_ptr, v_ptr, valid_ptr, start_ptr, out_ptr, part_ptr, stat_ptr, ticket_ptr,
    B, T, HKV, G, sm_scale_log2,
    stride_qp, stride_qb, stride_qt, stride_qh,
    stride_kp, stride_kb, stride_kh, stride_ks,
    stride_vb,
    stride_op, stride_ob, stride_ot, stride_oh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    SPLIT: tl.constexpr, MERGE_HERE: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    SPLIT_CHUNK: tl.constexpr, ROWS_P2: tl.constexpr, EARLY_KEYS: tl.constexpr, USE_GDC: tl.constexpr,
):
    if not EARLY_KEYS:
        wait_for_producer(USE_GDC)  # _pdl.py: before any memory access
    pid_m, pid_h, pid_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    p, b, kv_head = pid_h // (B * HKV), (pid_h // HKV) % B, pid_h % HKV
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    t, g = rows // G, rows % G
    row_ok = rows < T * G
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    kv = p * stride_kp + b * stride_kb + kv_head * stride_kh
    last_t = tl.minimum((pid_m * BLOCK_M + BLOCK_M - 1) // G, T - 1)  # the tile's last query
    if SPLIT:
        # Decode: this program's first tile of keys, loaded before the dependent-launch wait where
        # EARLY_KEYS: its memory traffic overlaps rope_kv, the kernel before ("Keys read before the wait").
        start = tl.load(start_ptr, cache_modifier=".cg")
        n_keys = start + last_t + 1
        # this split's share of the keys, sized from start: every split has work whatever the cache's length
        split_len = tl.cdiv(tl.cdiv(n_keys, tl.num_programs(2)), BLOCK_N) * BLOCK_N
        lo = pid_s * split_len
        hi = tl.minimum(lo + split_len, n_keys)
        first_pos = lo + tl.arange(0, BLOCK_N)
        old = first_pos < tl.minimum(hi, start)  # cached before this step: not rope_kv's to write
        first_k, first_v, first_valid = _load_keys(k_ptr, v_ptr, valid_ptr, kv, b * stride_vb, first_pos, old,
                                                   offs_d, d_ok, stride_ks)
    if EARLY_KEYS:
        wait_for_producer(USE_GDC)  # before any access to what the kernel before writes
    if not SPLIT:
        start = tl.load(start_ptr)
        lo = 0
        hi = start + last_t + 1  # keys up to the last query's position in this tile
    q_pos = start + t

    q_rows = q_ptr + p * stride_qp + b * stride_qb + t * stride_qt + (kv_head * G + g) * stride_qh
    q = tl.load(q_rows[:, None] + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    n_from = lo
    if SPLIT:  # the first tile: its step's keys (at start and after, rope_kv's) read now, the rest loaded
        new = (first_pos >= start) & (first_pos < hi)
        new_k, new_v, new_valid = _load_keys(k_ptr, v_ptr, valid_ptr, kv, b * stride_vb, first_pos, new, offs_d,
                                             d_ok, stride_ks)
        first_k = tl.where(new[None, :], new_k, first_k)
        first_v = tl.where(new[:, None], new_v, first_v)
        first_valid = tl.where(new, new_valid, first_valid)
        m_i, l_i, acc = _attend_tile(q, first_k, first_v, first_valid != 0, first_pos, q_pos, hi, m_i, l_i, acc,
                                     sm_scale_log2, UPCAST=UPCAST, DOT_PRECISION=DOT_PRECISION)
        n_from = lo + BLOCK_N
    # Each tile's key-valid flags are loaded one tile ahead. The pipeliner streams the keys and values (they
    # feed the dots) but loaded the flags in their own iteration, a round trip at the top of every tile.
    next_pos = n_from + tl.arange(0, BLOCK_N)
    next_valid = tl.load(valid_ptr + b * stride_vb + next_pos, mask=next_pos < hi, other=0)
    for n0 in range(n_from, hi, BLOCK_N):
        k_pos = n0 + tl.arange(0, BLOCK_N)
        valid = next_valid
        k, v = _load_kv(k_ptr, v_ptr, kv, k_pos, k_pos < hi, offs_d, d_ok, stride_ks)
        next_pos = k_pos + BLOCK_N
        next_valid = tl.load(valid_ptr + b * stride_vb + next_pos, mask=next_pos < hi, other=0)
        m_i, l_i, acc = _attend_tile(q, k, v, valid != 0, k_pos, q_pos, hi, m_i, l_i, acc, sm_scale_log2,
                                     UPCAST=UPCAST, DOT_PRECISION=DOT_PRECISION)

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
                              HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D, BLOCK_M=BLOCK_M, SPLIT_CHUNK=SPLIT_CHUNK,
                              ROWS_P2=ROWS_P2)
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
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, SPLIT_CHUNK: tl.constexpr,
    ROWS_P2: tl.constexpr, USE_GDC: tl.constexpr,
):
    wait_for_producer(USE_GDC)
    release_consumer(USE_GDC)  # one small wave: nothing to hold the next kernel for
    _merge_splits(part_ptr, stat_ptr, out_ptr, tl.program_id(0), NUM_SPLITS, B, T, HKV, G,
                  stride_op, stride_ob, stride_ot, stride_oh, HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D, BLOCK_M=BLOCK_M,
                  SPLIT_CHUNK=SPLIT_CHUNK, ROWS_P2=ROWS_P2)


DECODE_PROGRAMS_PER_SM = 2  # decode: key splits chosen so that about this many programs run per SM
DECODE_BLOCK_N = 32
MERGE_TILE = 16384  # fp32 values of split state the merge loads at once (a power of two)


def _block_d(Dh: int) -> int:
    return max(16, next_pow2(Dh))


def _merge_chunk(rows_p2: int, block_d: int) -> int:
    """How many splits' state the merge loads at once (a power of two, at most MERGE_TILE values)."""
    return max(1, MERGE_TILE // (rows_p2 * block_d))


def _merge_tile(rows: int, block_m: int, splits: int, block_d: int) -> dict:
    """SPLIT_CHUNK and ROWS_P2 of a launch of `splits` key splits over `rows` query rows per kv head: the merge's
    tile. Without a merge (one split) both are 1: one compiled kernel whatever the rows."""
    if splits <= 1:
        return dict(SPLIT_CHUNK=1, ROWS_P2=1)
    rows_p2 = next_pow2(min(rows, block_m))
    return dict(SPLIT_CHUNK=min(next_pow2(splits), _merge_chunk(rows_p2, block_d)), ROWS_P2=rows_p2)


def _plan(P: int, B: int, Hkv: int, T: int, G: int, Dh: int, dtype: torch.dtype, num_splits: int | None,
          sms: int | None = None):
    """(BLOCK_M, BLOCK_N, NUM_SPLITS, num_warps) for this shape (sms: the device's multiprocessors, default the
    current CUDA device's; benchmarks/kernel_registers.py plans for a device it does not have)."""
    rows = T * G
    if interpreting():
        return max(16, min(64, next_pow2(rows))), 32, num_splits or 1, 4
    if rows <= 16:  # decode: one tile of rows, the keys split over programs (at most as many splits as
        # the merge loads in one chunk). H100, bf16, 578-slot cache, 541 keys, us per launch, programs per
        # SM x BLOCK_N (the decode attention sweep, docs/performance.md): LLaMA-7B P = 1: 2 x 32
        # 9.97, 2 x 64 10.26, 2 x 128 12.34, 6 x 32 9.82; P = 4: 2 x 32 20.08, 2 x 64 20.45; SmolLM2
        # P = 1: 2 x 32 4.99, 2 x 64 5.67; P = 4: 2 x 32 6.67, 2 x 128 6.42; 2048-slot cache: 2 x 32 9.96
        if num_splits is None:
            sms = sms or multiprocessor_count(torch.cuda.current_device())
            one_chunk = _merge_chunk(next_pow2(rows), _block_d(Dh))
            num_splits = max(1, min(cdiv(DECODE_PROGRAMS_PER_SM * sms, P * B * Hkv), one_chunk))
        return 16, DECODE_BLOCK_N, num_splits, 4
    # prefill: 64-row tiles at every length, 128 keys per step for short ones (H200, bf16, LLaMA-7B heads,
    # us per launch, benchmarks/results/prefill_h200_2026-12-04.json): 2048 rows 274.8 with the
    # 128-row tiles used before -> 167.8, 1024 rows 93.4 -> 55.5 (keys at offset 1024: 199.1 -> 123.2),
    # 512 rows 19.1 either way, 256 rows 10.2 -> 7.6 with BLOCK_N 128 (at offset 256: 17.6 -> 11.9)
    if dtype == torch.float32:
        return 64, 64, 1, 8
    return 64, (128 if rows <= 256 else 64), 1, 4


def group_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    key_valid: torch.Tensor, start: torch.Tensor, *, out: torch.Tensor | None = None,
                    num_splits: int | None = None, merge: str = "fused",
                    keys_before_wait: bool = False) -> torch.Tensor:
    """q: [P, B, T, H, Dh] (Dh contiguous); k_cache, v_cache: [P, B, Hkv, S, Dh]; key_valid: [B, S] bool;
    start: int32 [1] on the device (cache position of q's first token) -> out [P, B, T, H, Dh].

    num_splits: key splits for decode (T * H/Hkv <= 16 rows per kv head); default fills the GPU.
    merge: how split partials are combined: "fused" (by the last split program of each head, one launch)
        or "separate" (a second kernel).
    keys_before_wait: the caller vouches that the launch just before this one on the stream wrote none of
        `start`, `key_valid` and the cache slots before start (fused.stage_attention: that launch is
        rope_kv_write, which writes only the step's own slots). With programmatic dependent launch, decode
        programs then load their first tile of the older keys while that launch still runs.
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
    if not isinstance(keys_before_wait, bool):
        raise TypeError(f"keys_before_wait must be a bool, got {keys_before_wait!r}")
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    check_tensor("out", out, ndim=5, dtype=q.dtype, device=q.device)
    if out.shape != q.shape:
        raise ValueError(f"out must have shape {tuple(q.shape)}, got {tuple(out.shape)}")
    if q.numel() == 0:
        return out

    G = H // Hkv
    block_m, block_n, splits, warps = _plan(P, B, Hkv, T, G, Dh, q.dtype, num_splits)
    if T * G > block_m:
        splits = 1  # only a single tile of rows per head is split over the keys
    block_d = _block_d(Dh)
    splits = min(splits, cdiv(S, block_n))  # more would leave splits empty at any position
    upcast, precision = dot_flags(q.dtype)
    heads = P * B * Hkv
    if splits > 1:
        part = torch.empty((heads * splits * block_m, block_d), device=q.device, dtype=torch.float32)
        stat = torch.empty((heads * splits * block_m, 2), device=q.device, dtype=torch.float32)
    else:
        part = stat = out  # unused
    merge_tile = _merge_tile(T * G, block_m, splits, block_d)
    merge_here = splits > 1 and merge == "fused"
    tickets = ticket_counters(q.device, heads) if merge_here else out  # out: unused
    valid = key_valid.view(torch.uint8)
    pdl = pdl_options(q)  # the same for both launches
    o_strides = (out.stride(0), out.stride(1), out.stride(2), out.stride(3))
    _attention_kernel[(cdiv(T * G, block_m), heads, splits)](
        q, k_cache, v_cache, valid, start, out, part, stat, tickets,
        B, T, Hkv, G, math.log2(math.e) / math.sqrt(Dh),
        q.stride(0), q.stride(1), q.stride(2), q.stride(3),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), k_cache.stride(3),
        valid.stride(0), *o_strides,
        HEAD_DIM=Dh, BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n, SPLIT=splits > 1,
        MERGE_HERE=merge_here, UPCAST=upcast, DOT_PRECISION=precision, EARLY_KEYS=splits > 1 and keys_before_wait,
        num_warps=warps, **merge_tile, **pdl,
        enable_fp_fusion=not merge_here,  # see _merge_splits
    )
    if splits > 1 and not merge_here:
        _merge_kernel[(heads,)](part, stat, out, B, T, Hkv, G, splits, *o_strides,
                                HEAD_DIM=Dh, BLOCK_D=block_d, BLOCK_M=block_m, **merge_tile, **pdl,
                                enable_fp_fusion=False)
    return out
