"""The matmuls of a CQIL group of P layers, each family of P GEMMs as ONE launch.

    group_linear(x, w)                    out[p] = x[p] @ w[p].T               (o_proj; x may be shared)
    group_linear(x, w, residual=h)        out[p] = h + x[p] @ w[p].T           (o_proj giving h + a)
    group_linear(x, w, norm_weight=n)     out[p] = RMSNorm_n[p](x) @ w[p].T    (QKV with the input norm)
    group_swiglu(x, w_gate, w_up)         out[p] = silu(x[p] @ g[p].T) * (x[p] @ u[p].T)
    group_swiglu(x, g, u, norm_weight=n)  the same of RMSNorm_n[p](x[p])      (with the post-attention norm)
    group_down_sum(x, w, residual)        out    = residual + sum_p x[p] @ w[p].T   (one GEMM, K = P*F)
    group_down_partials(x, w)             decode: the fp32 partial products that group_down_sum sums

Weights keep nn.Linear's layout, [P, N, K] with K contiguous, so the model's parameters can be views of
the packed group tensors. The input norm is applied in the prologue: x * norm weight is formed as x is
loaded (weights are used as stored, no folding) and the row's 1/rms, which commutes with the matmul,
scales the fp32 accumulator at the end. In tiles of up to 32 rows the sums of squares come from the
tensor cores: each K tile adds x x^T into a [BLOCK_M, BLOCK_M] fp32 accumulator whose diagonal they are
(LLaMA-7B decode QKV on an H100: 37.6 us, against 39.6 with a second pass over x; at 32 rows part of
54.7 -> 41.2 us, see TUNED_BATCH). Larger tiles keep the second pass: an x x^T tile of 128 x 128 would
double a prefill tile's MMA work. Accumulation is fp32.

Decode (M <= 16) is a weight-streaming problem: small BLOCK_N gives enough programs to keep every SM's
loads in flight. For the down projection of a group in decode, each layer's partial product is computed
by its own programs (fp32, [P, M, D]) and a small kernel adds the P partials and the residual in a fixed
order, so results stay deterministic; one program per output tile walking K = P*F alone ran at 474 GB/s
(SmolLM2 P = 4, H100). Adding them in the GEMM instead, by the last program of each tile to take a ticket
(one launch fewer, the same bits), made LLaMA-7B decode slower: 5.183 -> 5.324 ms/token on an H100
(benchmarks/results/down_sum_one_launch_h100_a8d542d.json).
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

import torch
import triton
import triton.language as tl
from triton.compiler.errors import CompileTimeAssertionFailure
from triton.runtime.errors import OutOfResources, PTXASError

from .. import envs
from ..files import atomic_write_bytes
from ._common import (autotune_disk_cache, autotuning, capture_launches, cdiv, check_runnable, check_tensor, dot_flags,
                      input_copies, interpreting, next_pow2, replay_median_us, untimed_bench)
from ._pdl import pdl_options, release_consumer, wait_for_producer


# The autotuner's candidates, (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages), by row class (row_class).
# M <= 16 (decode): weight streaming; small BLOCK_N for enough programs, long BLOCK_K per load. 16x16x1024 (4 warps,
# 2 stages) left the list: it spills 8.9-12.8 KB in the norm forms and was never the fastest in any form of LLaMA-7B
# or SmolLM2 on an H100, the slowest or next to it in six of eight (benchmarks/results/gemm_configs_h100_c410143.json).
TUNED_DECODE = [(16, 16, 512, 4, 3), (16, 16, 256, 2, 6), (16, 32, 256, 4, 4), (16, 32, 512, 4, 3),
                (16, 32, 128, 4, 6), (16, 64, 256, 4, 4), (16, 64, 128, 4, 5), (16, 128, 128, 8, 4)]
# 17-64 rows (decode of a batch of 17-64 sequences): still weight streaming, in 32-row tiles. LLaMA-7B at
# 32 rows on an H100, us, the prefill candidates alone against these with the x x^T norm (BLOCK_M <= 32):
# QKV 54.7 -> 41.2, o_proj 16.6 -> 9.8, gate/up 90.5 -> 70.6, down 44.5 -> 36.9
# (benchmarks/results/batch_gemm_h100_99fa760.json); batch-32 decode as shipped, against the build before:
# 9.241 -> 8.448 ms/token, SmolLM2's 1.238 -> 1.088 (decode_ab_b32_h100_bba0ed4.json).
TUNED_BATCH = [(32, 32, 256, 4, 4), (32, 64, 256, 4, 3), (32, 128, 128, 4, 4)]
# more rows (and 17-64 too): prompts
TUNED_PREFILL = [(64, 64, 64, 4, 4), (64, 128, 64, 4, 4), (128, 128, 64, 8, 3), (128, 128, 64, 4, 4),
                 (128, 256, 64, 8, 3), (128, 64, 64, 4, 4), (32, 64, 128, 4, 4)]
_BATCH_TILES = {c[:3] for c in TUNED_BATCH}


# The kernel's flags that make a launch form (QKV's norm, gate/up's SwiGLU, ...): part of the tuning key, since two
# forms of equal sizes (a model whose F equals its QKV width) may want different tiles
FORM_FLAGS = ("NORM", "SWIGLU", "SUM_P", "HAS_BIAS", "HAS_RES")


def _config(bm: int, bn: int, bk: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=warps, num_stages=stages)


def _tuned() -> list[triton.Config]:
    """The GPU autotuner's candidates, every row class's (_prune keeps a launch's own)."""
    return [_config(*c) for c in TUNED_DECODE + TUNED_PREFILL + TUNED_BATCH]


def _configs():
    if interpreting():  # the interpreter cannot benchmark; large tiles keep it fast; one per row class
        return [_config(16, 32, 64, 4, 3), _config(32, 32, 64, 4, 3)]  # (stages: Triton's default, unused there)
    if not autotuning():  # one config per row class: tests compile fewer kernels
        return [_config(16, 32, 128, 4, 3), _config(64, 64, 64, 4, 3)]
    return _tuned()


def row_class(M: int) -> int:
    """The autotuner's row classes (its key holds this, not M): 0 for decode (M <= 16, BLOCK_M = 16
    tiles), then one class per factor of 4 in rows: 17-64, 65-256, 257-1024, more. With one class for
    every M > 16, the config tuned for the first prompt (often a short one) was reused for every later
    length: tuned at 32 rows, LLaMA-7B's 512-row prefill took 34.0 ms on the device against 14.1 ms
    through cuBLAS (H100; benchmarks/results/prefill_h100_2026-11-27.json)."""
    return 0 if M <= 16 else min(4, ((M - 1).bit_length() - 3) // 2)


def _prune(configs, named_args, **kwargs):
    """The candidates of a launch's row class: 16-row tiles for class 0, larger ones for the others, of which
    TUNED_BATCH's only for class 1 (timing them for long prompts would only lengthen the first run)."""
    m_class = named_args["M_CLASS"]
    kept = [c for c in configs if (c.kwargs["BLOCK_M"] == 16) == (m_class == 0)]
    if m_class >= 2:
        kept = [c for c in kept if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]) not in _BATCH_TILES]
    return kept or configs


@triton.autotune(configs=_configs(), key=["M_CLASS", "N", "K", "P_GRID", *FORM_FLAGS],
                 prune_configs_by={"early_config_prune": _prune}, do_bench=untimed_bench(), **autotune_disk_cache())
@triton.jit(do_not_specialize=["M_CLASS"])  # a key for the autotuner only: one compile for all classes
def _group_gemm_kernel(
    x_ptr, w_ptr, w2_ptr, nw_ptr, bias_ptr, bias2_ptr, res_ptr, out_ptr,
    M, N, K, P, P_GRID, M_CLASS,
    stride_xp, stride_xm, stride_wp, stride_wn, stride_nwp, stride_bp, stride_rm, stride_op, stride_om,
    eps,
    NORM: tl.constexpr, SWIGLU: tl.constexpr, SUM_P: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    USE_GDC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    wait_for_producer(USE_GDC)  # _pdl.py: before any memory access
    # m varies fastest over the launch order: the programs that share a weight tile run together, so in
    # prefill the weights stream from memory once instead of once per row block
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok, n_ok = offs_m < M, offs_n < N
    if SUM_P:  # one output for the whole group: the P matmuls are one reduction over K' = P*K
        p_lo, p_hi = 0, P
    else:
        p_lo = tl.program_id(2)
        p_hi = p_lo + 1
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # Decode tiles (16 rows) load the residual now, before the K loop: loaded after it, it was one more round
    # trip between the last product and the store at every program's tail (its LDG sat between the last HMMA
    # and the STG in the SASS). Larger tiles keep the load at the end. ptxas (sm_90), TUNED_DECODE's nine
    # configs then: -11 to +42 registers, and three spill more (8, 60, 68 bytes); the launcher times each as it is.
    EARLY_RES: tl.constexpr = BLOCK_M <= 16
    if HAS_RES:
        if EARLY_RES:
            res = tl.load(res_ptr + offs_m[:, None] * stride_rm + offs_n[None, :],
                          mask=m_ok[:, None] & n_ok[None, :], other=0.0).to(tl.float32)
    # NORM, tiles of up to 32 rows: x x^T, whose diagonal is each row's sum of squares; larger: a second pass
    SQ_MMA: tl.constexpr = BLOCK_M <= 32
    if SQ_MMA:
        sq = tl.zeros((BLOCK_M, BLOCK_M), dtype=tl.float32)
    else:
        sq = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for p in range(p_lo, p_hi):
        x_rows = x_ptr + p * stride_xp + offs_m[:, None] * stride_xm
        w_cols = p * stride_wp + offs_n[None, :] * stride_wn  # SWIGLU: the same columns of both weights
        for k0 in range(0, K, BLOCK_K):
            k = k0 + offs_k
            k_ok = k < K
            xk = tl.load(x_rows + k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            wk = tl.load(w_ptr + w_cols + k[:, None], mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            if NORM:  # (x x^T on the tensor cores), then x * norm weight rounded as the GEMM's operand
                if SQ_MMA:
                    x_raw = xk.to(tl.float32) if UPCAST else xk
                    sq = tl.dot(x_raw, tl.trans(x_raw), sq, input_precision=DOT_PRECISION)
                nw = tl.load(nw_ptr + p * stride_nwp + k, mask=k_ok, other=0.0).to(tl.float32)
                xk = (xk.to(tl.float32) * nw[None, :]).to(wk.dtype)
            if UPCAST:
                xk, wk = xk.to(tl.float32), wk.to(tl.float32)
            acc = tl.dot(xk, wk, acc, input_precision=DOT_PRECISION)
            if SWIGLU:
                w2k = tl.load(w2_ptr + w_cols + k[:, None], mask=k_ok[:, None] & n_ok[None, :], other=0.0)
                if UPCAST:
                    w2k = w2k.to(tl.float32)
                acc2 = tl.dot(xk, w2k, acc2, input_precision=DOT_PRECISION)
        if NORM:  # 1/rms of a row commutes with the matmul (NORM never runs with SUM_P: one p here)
            if SQ_MMA:
                sumsq = tl.sum(tl.where(offs_m[:, None] == offs_m[None, :], sq, 0.0), axis=1)
            else:  # x's rows again, from cache, after the main loop: the weight stream starts at once
                for k0 in range(0, K, BLOCK_K):
                    k = k0 + offs_k
                    x32 = tl.load(x_rows + k[None, :], mask=m_ok[:, None] & (k < K)[None, :],
                                  other=0.0).to(tl.float32)
                    sq += tl.sum(x32 * x32, axis=1)
                sumsq = sq
            rstd = tl.rsqrt(sumsq / K + eps)[:, None]
            acc = acc * rstd
            acc2 = acc2 * rstd
        if HAS_BIAS:
            acc += tl.load(bias_ptr + p * stride_bp + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            if SWIGLU:
                acc2 += tl.load(bias2_ptr + p * stride_bp + offs_n, mask=n_ok,
                                other=0.0).to(tl.float32)[None, :]
    release_consumer(USE_GDC)
    if SWIGLU:
        acc = acc * tl.sigmoid(acc) * acc2
    if HAS_RES:
        if EARLY_RES:
            acc += res
        else:
            acc += tl.load(res_ptr + offs_m[:, None] * stride_rm + offs_n[None, :],
                           mask=m_ok[:, None] & n_ok[None, :], other=0.0).to(tl.float32)
    out = out_ptr + p_lo * stride_op + offs_m[:, None] * stride_om + offs_n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def _check_weight(name: str, w: torch.Tensor, x: torch.Tensor) -> None:
    check_tensor(name, w, ndim=3, dtype=x.dtype, device=x.device)
    if w.stride(1) != w.shape[2] and w.shape[1] > 1:
        raise ValueError(f"{name} rows must be contiguous ([P, N, K] with K contiguous), "
                         f"got strides {w.stride()}")


def _check_x(x: torch.Tensor, w: torch.Tensor) -> tuple[int, int]:
    """x: [M, K] (shared by the group) or [P, M, K] -> (stride over P, stride over M)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim not in (2, 3):
        raise ValueError(f"x must be [M, K] or [P, M, K], got shape {tuple(x.shape)}")
    check_tensor("x", x, ndim=x.ndim)
    check_runnable(x)
    _check_weight("w", w, x)
    P, N, K = w.shape
    if x.shape[-1] != K:
        raise ValueError(f"x has {x.shape[-1]} features but the weights expect K = {K}")
    if x.ndim == 3 and x.shape[0] != P:
        raise ValueError(f"x holds {x.shape[0]} layers' inputs but w holds P = {P} layers")
    return (0 if x.ndim == 2 else x.stride(0)), x.stride(-2)


def _check_vector(name: str, v: torch.Tensor | None, P: int, n: int, x: torch.Tensor) -> None:
    if v is None:
        return
    check_tensor(name, v, ndim=2, dtype=None, device=x.device)
    if tuple(v.shape) != (P, n):
        raise ValueError(f"{name} must have shape {(P, n)}, got {tuple(v.shape)}")


def _check_residual(residual: torch.Tensor | None, M: int, N: int, x: torch.Tensor) -> None:
    if residual is None:
        return
    check_tensor("residual", residual, ndim=2, device=x.device)
    if tuple(residual.shape) != (M, N):
        raise ValueError(f"residual must have shape {(M, N)}, got {tuple(residual.shape)}")


# The config chosen per key (row class, N, K, P_GRID, the form's flags, the tensors' dtypes), by triton.autotune or,
# for decode keys on a GPU, by _tune_decode: launches after the first of a key go straight to the kernel with it.
# triton.autotune's own lookup rebuilds dicts of all ~45 arguments at every launch; on the lent H100's host a
# 37-argument kernel took 77 us per launch through it and 40 us without
# (benchmarks/results/prefill_h100_2026-11-27.json), and an eager step makes four GEMM launches per stage.
# Every config computes the same product (up to the order of its fp32 sums); the choice sets the speed (were
# two threads to tune at once and swap their best_config reads, a key would get a slower config, not a wrong
# result).
_CHOSEN: dict[tuple, dict] = {}

# Decode keys (row class 0) on a GPU are tuned here, not by triton.autotune: each candidate is timed as a decode
# step's CUDA graph runs it, TUNE_CALLS launches back to back cycling over copies of the weights that keep them out
# of L2 (a step reads each layer's weights from memory once per token). The autotuner's timer launches each call
# alone after zeroing a 256 MiB buffer; on an H100 it chose SmolLM2's QKV and down-projection configs 7% and 16%
# slower than the best timed this way (benchmarks/results/gemm_configs_h100_c410143.json).
TUNE_CALLS, TUNE_ROUNDS = 24, 10


def _graph_us(launch) -> float:
    return replay_median_us(capture_launches(launch, TUNE_CALLS), TUNE_CALLS, TUNE_ROUNDS)


def _tunes_here(x: torch.Tensor) -> bool:
    """Whether _launch times a decode key's candidates itself: on a GPU, outside a graph capture (a capture
    cannot time; there triton.autotune's path is taken, as before)."""
    return x.is_cuda and not torch.cuda.is_current_stream_capturing()


def _strided_copy(t: torch.Tensor) -> torch.Tensor:
    """A copy of t with t's strides (a weight may be a slice of a packed tensor; the launch passes its strides)."""
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device).copy_(t)


def _tune_decode(key: tuple, args: tuple, grid, flags: dict) -> dict:
    """The fastest of the decode candidates for a launch (the kwargs _CHOSEN keeps), each timed by _graph_us(launch),
    launch(i) running the candidate on the i-th set of arguments (the weights' copies in turn). One candidate
    (CQIL_AUTOTUNE=0) is taken untimed, and so is a choice an earlier process kept on disk (TUNED_FILE). A candidate
    that does not compile or fit on the GPU is never chosen."""
    candidates = _prune(_group_gemm_kernel.configs, {"M_CLASS": 0})
    if len(candidates) == 1:
        return candidates[0].all_kwargs()
    entry = _tuned_entry(key, flags, candidates, args[1].device)
    kept = _tuned_on_disk().get(entry)
    if isinstance(kept, int) and 0 <= kept < len(candidates):
        return candidates[kept].all_kwargs()
    w, w2 = args[1], args[2]  # w2 is w (a stand-in, never read) without SwiGLU
    weight_bytes = w.nbytes + (0 if w2 is w else w2.nbytes)
    sets = [args]
    try:
        for _ in range(input_copies(weight_bytes, TUNE_CALLS, w.device) - 1):
            w_copy = _strided_copy(w)
            sets.append((args[0], w_copy, w_copy if w2 is w else _strided_copy(w2), *args[3:]))
    except torch.cuda.OutOfMemoryError:  # fewer copies: times with the weights partly in L2, still a choice
        pass
    times = []
    for config in candidates:
        kwargs = config.all_kwargs()

        def launch(i, kwargs=kwargs):
            _group_gemm_kernel.fn[grid](*sets[i % len(sets)], **flags, **kwargs)
        try:
            launch(0)  # compiles
        except (OutOfResources, CompileTimeAssertionFailure, PTXASError):
            times.append(float("inf"))
            continue
        times.append(_graph_us(launch))
    fastest = times.index(min(times))
    _keep_tuned(entry, fastest)
    return candidates[fastest].all_kwargs()


# _tune_decode's choices, kept across processes (a restarted server, `cqil generate` run after run) in a JSON file
# of the cache dir (envs.cache_dir): {entry: the chosen candidate's index}, an entry naming the GPU, Triton's
# version, this file's source, the candidates, the launch key and the kernel's flags. Only JSON is read; an
# entry that is not an index of the candidates is timed again. An entry of an older source or Triton is never read
# again, and an entry cannot say which it is (a hash): the file keeps the TUNED_KEEP entries written last (~50
# bytes each), the oldest dropped first, so that upgrades do not grow it without bound.
TUNED_FILE, TUNED_KEEP = "decode_gemm_configs.json", 4096


@functools.lru_cache(maxsize=None)
def _source_hash() -> str:
    """This file's contents (the kernel and its launch forms), hashed."""
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()


def _tuned_entry(key: tuple, flags: dict, candidates: list, device: torch.device) -> str:
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    text = "\n".join([gpu, triton.__version__, _source_hash(),
                      repr([c.all_kwargs() for c in candidates]), repr(key), repr(sorted(flags.items()))])
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _tuned_on_disk() -> dict:
    """The file's choices ({} when it is absent, unreadable or not a JSON object of this form)."""
    try:
        kept = json.loads((envs.cache_dir() / TUNED_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return kept if isinstance(kept, dict) else {}


def _keep_tuned(entry: str, index: int) -> None:
    """Adds a choice to the file as its newest entry (merged with what other processes wrote meanwhile), the
    oldest dropped beyond TUNED_KEEP; a cache dir that cannot be written only costs a later process the timing."""
    path = envs.cache_dir() / TUNED_FILE
    kept = _tuned_on_disk()
    kept.pop(entry, None)
    kept[entry] = index
    kept = dict(list(kept.items())[-TUNED_KEEP:])
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, json.dumps(kept, indent=0).encode())
    except OSError:
        pass


def _autotuned(args: tuple, grid, flags: dict) -> dict:
    """Launches through triton.autotune, which picks the config (timing the candidates the first time it sees the
    launch's key): the kwargs _CHOSEN keeps."""
    _group_gemm_kernel[grid](*args, **flags)
    return _group_gemm_kernel.best_config.all_kwargs()


def _launch(x, w, out, *, sx, w2=None, norm_weight=None, eps=0.0, bias=None, bias2=None,
            residual=None, sum_p=False):
    P, N, K = w.shape
    M = x.shape[-2]
    if M == 0 or N == 0:
        return out
    upcast, precision = dot_flags(x.dtype)
    p_grid = 1 if sum_p else P
    m_class = row_class(M)
    dummy = w  # stands in for absent optional operands; never read (their flags are off)

    def grid(meta):
        return cdiv(M, meta["BLOCK_M"]), cdiv(N, meta["BLOCK_N"]), p_grid

    tensors = (x, w, w2 if w2 is not None else dummy, norm_weight if norm_weight is not None else dummy,
               bias if bias is not None else dummy, bias2 if bias2 is not None else dummy,
               residual if residual is not None else dummy, out)
    args = (*tensors, M, N, K, P, p_grid, m_class,
            sx[0], sx[1], w.stride(0), w.stride(1),
            norm_weight.stride(0) if norm_weight is not None else 0,
            bias.stride(0) if bias is not None else 0,
            residual.stride(0) if residual is not None else 0,
            out.stride(0) if out.ndim == 3 else 0, out.stride(-2),
            float(eps))
    # the form's flags (FORM_FLAGS) as locals: a dict built from them by zip cost 0.4 us more a launch (CPU)
    norm, swiglu, has_bias, has_res = norm_weight is not None, w2 is not None, bias is not None, residual is not None
    # the autotuner's own key: the row class, N, K, P_GRID, the form and every tensor argument's dtype
    key = (m_class, N, K, p_grid, norm, swiglu, sum_p, has_bias, has_res, *(t.dtype for t in tensors))
    flags = dict(NORM=norm, SWIGLU=swiglu, SUM_P=sum_p, HAS_BIAS=has_bias, HAS_RES=has_res, UPCAST=upcast,
                 DOT_PRECISION=precision, **pdl_options(x))
    chosen = _CHOSEN.get(key)
    if chosen is None and m_class == 0 and _tunes_here(x):
        chosen = _CHOSEN[key] = _tune_decode(key, args, grid, flags)
    if chosen is None:
        _CHOSEN[key] = _autotuned(args, grid, flags)
    else:
        _group_gemm_kernel.fn[grid](*args, **flags, **chosen)
    return out


def group_linear(x: torch.Tensor, w: torch.Tensor, *, norm_weight: torch.Tensor | None = None,
                 eps: float = 1e-6, bias: torch.Tensor | None = None, residual: torch.Tensor | None = None,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """x: [M, K] shared by the group, or [P, M, K]; w: [P, N, K] -> [P, M, N].

    norm_weight: [P, K] — apply each layer's RMSNorm (eps) to x first. bias: [P, N].
    residual: [M, N] (any float dtype), added to every layer's output in fp32 before it is rounded
    (o_proj's output as the new residual stream h + a).
    out: an optional preallocated [P, M, N] (rows contiguous) to write into.
    """
    sx = _check_x(x, w)
    P, N, K = w.shape
    _check_vector("norm_weight", norm_weight, P, K, x)
    _check_vector("bias", bias, P, N, x)
    _check_residual(residual, x.shape[-2], N, x)
    out = _out(out, (P, x.shape[-2], N), x)
    return _launch(x, w, out, sx=sx, norm_weight=norm_weight, eps=eps, bias=bias, residual=residual)


def group_swiglu(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, *,
                 norm_weight: torch.Tensor | None = None, eps: float = 1e-6,
                 bias_gate: torch.Tensor | None = None, bias_up: torch.Tensor | None = None,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """x: [P, M, K] (or [M, K] shared); w_gate, w_up: [P, F, K] -> silu(x g^T) * (x u^T): [P, M, F].

    norm_weight: [P, K] — apply each layer's RMSNorm (eps) to x first (the post-attention norm), as
    group_linear does."""
    sx = _check_x(x, w_gate)
    _check_weight("w_up", w_up, x)
    if w_up.shape != w_gate.shape or w_up.stride() != w_gate.stride():
        raise ValueError(f"w_up {tuple(w_up.shape)} / strides {w_up.stride()} must match w_gate "
                         f"{tuple(w_gate.shape)} / {w_gate.stride()}")
    P, F, _ = w_gate.shape
    if (bias_gate is None) != (bias_up is None):
        raise ValueError("pass both bias_gate and bias_up, or neither")
    _check_vector("norm_weight", norm_weight, P, w_gate.shape[2], x)
    _check_vector("bias_gate", bias_gate, P, F, x)
    _check_vector("bias_up", bias_up, P, F, x)
    if bias_gate is not None and bias_gate.stride() != bias_up.stride():
        raise ValueError("bias_gate and bias_up must have the same strides")
    out = _out(out, (P, x.shape[-2], F), x)
    return _launch(x, w_gate, out, sx=sx, w2=w_up, norm_weight=norm_weight, eps=eps, bias=bias_gate,
                   bias2=bias_up)


# Decode (M <= 16) with P = 1: from this F on, each output tile's K is walked by two programs, each
# writing an fp32 partial, and the partials are summed in order as a group's are. LLaMA-7B's down
# projection (F = 11008) on an H100: 34.7 -> 34.0 us with the extra launch (M = 4: 34.9 -> 33.7);
# SmolLM2's (F = 1536) and a 4096 x 4096 o_proj got slower (the norm_sq sweep, docs/performance.md).
SPLIT_K_MIN = 8192


def group_down_sum(x: torch.Tensor, w: torch.Tensor, residual: torch.Tensor | None = None, *,
                   bias: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """x: [P, M, F]; w: [P, D, F]; residual: [M, D] (any float dtype, e.g. fp32) -> [M, D]:
    residual + sum_p x[p] @ w[p].T (+ sum_p bias[p]) as one GEMM over K = P*F (decode: P partial
    products summed in order; see SPLIT_K_MIN for P = 1)."""
    sx = _check_down(x, w, bias)
    M, D = x.shape[1], w.shape[1]
    _check_residual(residual, M, D, x)
    out = _out(out, (M, D), x)
    partial = _partials(x, w, sx, bias)
    if partial is None:
        return _launch(x, w, out, sx=sx, bias=bias, residual=residual, sum_p=True)
    return _sum_parts(partial, residual, out)


def sum_parts(parts: torch.Tensor, residual: torch.Tensor | None = None, *, dtype: torch.dtype | None = None,
              out: torch.Tensor | None = None) -> torch.Tensor:
    """parts: [n, M, N] (fp32 partial products, or a batched matmul's P products); residual: [M, N] or
    None (any supported dtype) -> [M, N] in `dtype` (default parts'): residual + parts[0] + parts[1] + ...
    in fp32, added in that order, rounded once. The second launch of group_down_sum in decode, and the
    epilogue of fused.down_sum's cuBLAS form (one launch where torch takes four)."""
    check_tensor("parts", parts, ndim=3)
    check_runnable(parts)
    n, M, N = parts.shape
    if n < 1:
        raise ValueError("parts must hold at least one product ([n >= 1, M, N])")
    _check_residual(residual, M, N, parts)
    if out is None:
        out = torch.empty((M, N), device=parts.device, dtype=dtype or parts.dtype)
    check_tensor("out", out, ndim=2, dtype=dtype or out.dtype, device=parts.device)
    if tuple(out.shape) != (M, N):
        raise ValueError(f"out must have shape {(M, N)}, got {tuple(out.shape)}")
    return _sum_parts(parts, residual, out)


def _sum_parts(parts: torch.Tensor, residual: torch.Tensor | None, out: torch.Tensor) -> torch.Tensor:
    M, N = out.shape
    if out.numel() == 0:
        return out
    block = min(1024, next_pow2(N))
    _sum_p_kernel[(M, cdiv(N, block))](
        parts, residual if residual is not None else parts, out, N,
        parts.stride(0), parts.stride(1), residual.stride(0) if residual is not None else 0,
        out.stride(0), P=parts.shape[0], HAS_RES=residual is not None, BLOCK=block, **pdl_options(parts))
    return out


def group_down_partials(x: torch.Tensor, w: torch.Tensor, *, bias: torch.Tensor | None = None
                        ) -> torch.Tensor | None:
    """The fp32 partial products [n, M, D] that group_down_sum(x, w, residual, bias=bias) adds to the
    residual in a second launch: its output is (residual + parts[0] + parts[1] + ...) in fp32, in that
    order, rounded once to x's dtype. None where group_down_sum runs as one GEMM (more than 16 rows, or
    P = 1 below SPLIT_K_MIN). For a consumer that sums them itself (the one-shot all-reduce of a rank,
    parallel/comm.py's GroupReducer.all_reduce_sum)."""
    return _partials(x, w, _check_down(x, w, bias), bias)


def _check_down(x, w, bias):
    """The checks of a down projection's inputs; returns x's strides as _check_x does."""
    if isinstance(x, torch.Tensor) and x.ndim != 3:
        raise ValueError(f"x must be [P, M, F], got shape {tuple(x.shape)}")
    sx = _check_x(x, w)
    _check_vector("bias", bias, w.shape[0], w.shape[1], x)
    return sx


def _partials(x, w, sx, bias) -> torch.Tensor | None:
    P, D, F = w.shape
    M = x.shape[1]
    split = P == 1 and bias is None and F >= SPLIT_K_MIN and F % 16 == 0
    if M > 16 or M == 0 or (P == 1 and not split):
        return None
    if split:  # the two halves of K as two "layers" (each half starts 16-byte aligned)
        half = F // 2
        x = x.as_strided((2, M, half), (half, sx[1], 1))
        w = w.as_strided((2, D, half), (half, w.stride(1), 1))
        sx, P = (half, sx[1]), 2
    partial = torch.empty((P, M, D), device=x.device, dtype=torch.float32)
    _launch(x, w, partial, sx=sx, bias=bias)
    return partial


@triton.jit
def _sum_p_kernel(part_ptr, res_ptr, out_ptr, N, stride_pp, stride_pm, stride_rm, stride_om,
                  P: tl.constexpr, HAS_RES: tl.constexpr, BLOCK: tl.constexpr, USE_GDC: tl.constexpr):
    """out[m] = residual[m] + sum_p part[p, m], summed in order p = 0, 1, ...

    P is a constexpr and its loop is unrolled, so the P + 1 loads go out together: a loop over a run-time P
    waited for each part's load before it issued the next (one round trip per part, every decode step's
    down projection). One compile per group size."""
    wait_for_producer(USE_GDC)
    m = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    if HAS_RES:
        acc += tl.load(res_ptr + m * stride_rm + offs, mask=ok, other=0.0).to(tl.float32)
    for p in tl.static_range(P):
        acc += tl.load(part_ptr + p * stride_pp + m * stride_pm + offs, mask=ok, other=0.0).to(tl.float32)
    release_consumer(USE_GDC)
    tl.store(out_ptr + m * stride_om + offs, acc.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _silu_mul_kernel(g_ptr, u_ptr, out_ptr, n, BLOCK: tl.constexpr, USE_GDC: tl.constexpr):
    """out = silu(g) * u over n contiguous elements, in fp32, rounded once."""
    wait_for_producer(USE_GDC)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    g = tl.load(g_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    release_consumer(USE_GDC)
    tl.store(out_ptr + offs, (g / (1.0 + tl.exp(-g)) * u).to(out_ptr.dtype.element_ty), mask=ok)


def silu_mul(g: torch.Tensor, u: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """silu(g) * u elementwise (g, u: contiguous, one shape and dtype), in fp32, rounded once: the
    SwiGLU of fused.swiglu's cuBLAS form in one launch where torch takes two (and rounds twice)."""
    if not isinstance(g, torch.Tensor) or not isinstance(u, torch.Tensor):
        raise TypeError("g and u must be torch.Tensors")
    check_runnable(g)
    if g.shape != u.shape or g.dtype != u.dtype or g.device != u.device:
        raise ValueError(f"g {tuple(g.shape)} {g.dtype} and u {tuple(u.shape)} {u.dtype} must match in shape, "
                         f"dtype and device")
    if not (g.is_contiguous() and u.is_contiguous()):
        raise ValueError("g and u must be contiguous")
    if out is None:
        out = torch.empty_like(g)
    if out.shape != g.shape or out.dtype != g.dtype or out.device != g.device or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {tuple(g.shape)} {g.dtype} tensor on {g.device}")
    n = g.numel()
    if n:
        block = 2048
        _silu_mul_kernel[(cdiv(n, block),)](g, u, out, n, BLOCK=block, **pdl_options(g))
    return out


def _out(out: torch.Tensor | None, shape: tuple[int, ...], x: torch.Tensor) -> torch.Tensor:
    if out is None:
        return torch.empty(shape, device=x.device, dtype=x.dtype)
    check_tensor("out", out, ndim=len(shape), dtype=x.dtype, device=x.device)
    if tuple(out.shape) != shape:
        raise ValueError(f"out must have shape {shape}, got {tuple(out.shape)}")
    return out
