"""Prototype for issue 26, after the persistent step lost: one kernel fewer per decode layer step.

Today a decode stage runs QKV GEMM -> rope_kv (RoPE on q and k, k and v into the cache) -> attention ->
o_proj -> gate/up -> down. On the H100 (docs/performance.md, 42b5305) every layer step pays ~22 us over
its bytes, and a chain of GEMV launches only ~4 us per boundary: the fixed cost is the number of kernels.
Here decode attention (T = 1) does rope_kv's work itself: each program rotates its q heads and its kv
head's new key as it loads them from the QKV output (in fp32, rounded once, as rope_kv does), takes the
new key and value for the step's slot from there instead of the cache, and the program whose split of
the keys holds the slot writes them into the cache for later steps (no other program reads that slot of
the cache in this launch). Everything else is ops/attention.py's decode path: the same key splits, the
same online softmax, the same merge (its `_merge_splits`, by the last split to arrive). So the attention
sees the same inputs as after rope_kv, and on the interpreter gives the same bits. Its key loop repeats
attention.py's on purpose until the measurement decides: if it wins it becomes attention.py's decode path,
if it loses this file goes to the record.

    python benchmarks/rope_attention.py --shape smollm2-135m --shape llama-7b --out ra.json

measures the whole decode step both ways (fused.step, 20 steps per CUDA graph, alternated rounds, same
process): today's against the step whose stages call this kernel instead of rope_kv + attention.
tests/test_rope_attention.py checks it against rope_kv_write + group_attention.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import statistics

import torch
import triton
import triton.language as tl

from cqil_kernels.ops._common import cdiv, dot_flags, next_pow2, ticket_counters
from cqil_kernels.ops._pdl import pdl_options, release_consumer, wait_for_producer
from cqil_kernels.ops.attention import _block_d, _merge_chunk, _merge_splits, _plan
from cqil_kernels.ops.rope_kv import check_rope_kv


@triton.jit
def _rotated(base, rows_ok, offs_d, partner, cos, sin, HALF: tl.constexpr):
    """Rows of Dh values at base [R] (+ d): rotate-half RoPE in fp32, as rope_kv computes it, [R, BLOCK_D]."""
    x = tl.load(base[:, None] + offs_d[None, :], mask=rows_ok, other=0.0).to(tl.float32)
    xp = tl.load(base[:, None] + partner[None, :], mask=rows_ok, other=0.0).to(tl.float32)
    first = (offs_d < HALF)[None, :]
    return tl.where(first, x * cos[None, :] - xp * sin[None, :], x * cos[None, :] + xp * sin[None, :])


@triton.jit
def _rope_attention_kernel(
    qkv_ptr, pos_ptr, inv_freq_ptr, k_ptr, v_ptr, valid_ptr, start_ptr, out_ptr, part_ptr, stat_ptr, ticket_ptr,
    B, H, HKV, G, sm_scale_log2,
    stride_qp, stride_qb, stride_pb,
    stride_kp, stride_kb, stride_kh, stride_ks, stride_vb,
    stride_op, stride_ob, stride_oh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    SPLIT: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    SPLIT_CHUNK: tl.constexpr, ROWS_P2: tl.constexpr, USE_GDC: tl.constexpr,
):
    wait_for_producer(USE_GDC)
    pid_h, pid_s = tl.program_id(0), tl.program_id(1)
    p, b, kv_head = pid_h // (B * HKV), (pid_h // HKV) % B, pid_h % HKV
    HALF: tl.constexpr = HEAD_DIM // 2
    dtype = qkv_ptr.dtype.element_ty
    slot = tl.load(start_ptr)  # the step's position in the cache: the only query's
    g = tl.arange(0, BLOCK_M)
    g_ok = g < G
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    partner = tl.where(offs_d < HALF, offs_d + HALF, offs_d - HALF)
    angle = tl.load(pos_ptr + b * stride_pb).to(tl.float32) * tl.load(
        inv_freq_ptr + tl.where(offs_d < HALF, offs_d, offs_d - HALF), mask=d_ok, other=0.0)
    cos, sin = tl.cos(angle), tl.sin(angle)
    row = qkv_ptr + p * stride_qp + b * stride_qb
    # the G query heads of this kv head, rotated and rounded as rope_kv leaves them in the QKV buffer
    q = _rotated(row + (kv_head * G + g) * HEAD_DIM, g_ok[:, None] & d_ok[None, :], offs_d, partner, cos, sin,
                 HALF).to(dtype)
    one = tl.arange(0, 1)  # the new key as a one-row tile
    k_new = tl.sum(_rotated(row + (H + kv_head) * HEAD_DIM + one, d_ok[None, :], offs_d, partner, cos, sin,
                            HALF), axis=0).to(dtype)
    v_new = tl.load(row + (H + HKV + kv_head) * HEAD_DIM + offs_d, mask=d_ok, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)

    n_keys = slot + 1
    if SPLIT:
        split_len = tl.cdiv(tl.cdiv(n_keys, tl.num_programs(1)), BLOCK_N) * BLOCK_N
        lo = pid_s * split_len
        hi = tl.minimum(lo + split_len, n_keys)
    else:
        lo = 0
        hi = n_keys
    kv = p * stride_kp + b * stride_kb + kv_head * stride_kh
    if (lo <= slot) & (slot < hi):  # this split holds the step's slot: the cache gets the new key and value
        tl.store(k_ptr + kv + slot * stride_ks + offs_d, k_new, mask=d_ok)
        tl.store(v_ptr + kv + slot * stride_ks + offs_d, v_new, mask=d_ok)

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for n0 in range(lo, hi, BLOCK_N):
        k_pos = n0 + tl.arange(0, BLOCK_N)
        k_ok = k_pos < hi
        cached = k_ok & (k_pos != slot)  # the slot's key and value come from the QKV output
        k = tl.load(k_ptr + kv + k_pos[None, :] * stride_ks + offs_d[:, None],
                    mask=cached[None, :] & d_ok[:, None], other=0.0)
        v = tl.load(v_ptr + kv + k_pos[:, None] * stride_ks + offs_d[None, :],
                    mask=cached[:, None] & d_ok[None, :], other=0.0)
        k = tl.where((k_pos == slot)[None, :], k_new[:, None], k)
        v = tl.where((k_pos == slot)[:, None], v_new[None, :], v)
        if UPCAST:
            k, v = k.to(tl.float32), v.to(tl.float32)
        s = tl.dot(q, k, input_precision=DOT_PRECISION) * sm_scale_log2
        valid = tl.load(valid_ptr + b * stride_vb + k_pos, mask=k_ok, other=0) != 0
        allowed = (valid | (k_pos == slot)) & k_ok  # every key is at or before the query
        s = tl.where(allowed[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_use)
        prob = tl.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(prob, axis=1)
        acc = acc * alpha[:, None] + tl.dot(prob.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    release_consumer(USE_GDC)
    if SPLIT:  # as ops/attention.py: partial state, the last split of the head to arrive merges
        split_row = (pid_h * tl.num_programs(1) + pid_s) * BLOCK_M + g
        tl.store(part_ptr + split_row[:, None] * BLOCK_D + offs_d[None, :], acc, mask=g_ok[:, None])
        tl.store(stat_ptr + split_row * 2, m_i, mask=g_ok)
        tl.store(stat_ptr + split_row * 2 + 1, l_i, mask=g_ok)
        tl.debug_barrier()
        ticket = tl.atomic_add(ticket_ptr + pid_h, 1, sem="acq_rel")
        if ticket == tl.num_programs(1) - 1:
            _merge_splits(part_ptr, stat_ptr, out_ptr, pid_h, tl.num_programs(1), B, 1, HKV, G,
                          stride_op, stride_ob, 0, stride_oh, HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D, BLOCK_M=BLOCK_M,
                          SPLIT_CHUNK=SPLIT_CHUNK, ROWS_P2=ROWS_P2)
            tl.atomic_xchg(ticket_ptr + pid_h, 0)
    else:
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        o_rows = out_ptr + p * stride_op + b * stride_ob + (kv_head * G + g) * stride_oh
        tl.store(o_rows[:, None] + offs_d[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=g_ok[:, None] & d_ok[None, :])


def rope_attention(qkv: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, k_cache: torch.Tensor,
                   v_cache: torch.Tensor, key_valid: torch.Tensor, start: torch.Tensor, *, num_heads: int,
                   num_kv_heads: int, num_splits: int | None = None) -> torch.Tensor:
    """rope_kv_write then group_attention of one decode token per row, in one launch. qkv: [P, B, (H +
    2 Hkv) Dh], not rotated (left so); positions [B, 1]; caches [P, B, Hkv, S, Dh] (the step's slot, start,
    written here) -> out [P, B, 1, H, Dh], as group_attention returns it."""
    P, B, T = check_rope_kv(qkv, tuple(qkv.shape), positions, inv_freq, k_cache, v_cache, start,
                            num_heads=num_heads, num_kv_heads=num_kv_heads)
    if T != 1:
        raise ValueError(f"rope_attention is for decode (one token per row), got {T}")
    if key_valid.dtype != torch.bool or key_valid.shape != (B, k_cache.shape[3]):
        raise ValueError(f"key_valid must be bool [{B}, {k_cache.shape[3]}]")
    H, Hkv, S, Dh = num_heads, num_kv_heads, k_cache.shape[3], k_cache.shape[4]
    G = H // Hkv
    block_m, block_n, splits, warps = _plan(P, B, Hkv, 1, G, Dh, qkv.dtype, num_splits)
    if G > block_m:
        raise ValueError(f"{G} query heads per kv head exceed one tile of {block_m} rows")
    splits = min(splits, cdiv(S, block_n))
    block_d = _block_d(Dh)
    out = torch.empty((P, B, 1, H, Dh), device=qkv.device, dtype=qkv.dtype)
    heads = P * B * Hkv
    if splits > 1:
        part = torch.empty((heads * splits * block_m, block_d), device=qkv.device, dtype=torch.float32)
        stat = torch.empty((heads * splits * block_m, 2), device=qkv.device, dtype=torch.float32)
        rows_p2 = next_pow2(min(G, block_m))
        tile = dict(SPLIT_CHUNK=min(next_pow2(splits), _merge_chunk(rows_p2, block_d)), ROWS_P2=rows_p2)
        tickets = ticket_counters(qkv.device, heads)
    else:
        part = stat = tickets = out
        tile = dict(SPLIT_CHUNK=1, ROWS_P2=1)
    upcast, precision = dot_flags(qkv.dtype)
    valid = key_valid.view(torch.uint8)
    _rope_attention_kernel[(heads, splits)](
        qkv, positions, inv_freq, k_cache, v_cache, valid, start, out, part, stat, tickets,
        B, H, Hkv, G, math.log2(math.e) / math.sqrt(Dh),
        qkv.stride(0), qkv.stride(1), positions.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), k_cache.stride(3), valid.stride(0),
        out.stride(0), out.stride(1), out.stride(3),
        HEAD_DIM=Dh, BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n, SPLIT=splits > 1, UPCAST=upcast,
        DOT_PRECISION=precision, num_warps=warps, enable_fp_fusion=splits == 1, **tile, **pdl_options(qkv))
    return out


@contextlib.contextmanager
def fused_decode_attention(fused_module):
    """Within: fused.step's decode stages (one token per row) call rope_attention instead of rope_kv_write
    and group_attention (the prototype's way into the real step; prompts keep both)."""
    rope_kv, attention = fused_module.rope_kv_write, fused_module.group_attention
    held = {}

    def rope_kv_write(qkv, positions, inv_freq, k_cache, v_cache, start, *, num_heads, num_kv_heads):
        if positions.shape[1] != 1:
            return rope_kv(qkv, positions, inv_freq, k_cache, v_cache, start, num_heads=num_heads,
                           num_kv_heads=num_kv_heads)
        held[k_cache.data_ptr()] = (qkv, positions, inv_freq, num_heads, num_kv_heads)

    def group_attention(q, k_cache, v_cache, key_valid, start, **kwargs):
        pending = held.pop(k_cache.data_ptr(), None)
        if pending is None:
            return attention(q, k_cache, v_cache, key_valid, start, **kwargs)
        qkv, positions, inv_freq, num_heads, num_kv_heads = pending
        P, B = qkv.shape[0], positions.shape[0]
        return rope_attention(qkv.view(P, B, -1), positions, inv_freq, k_cache, v_cache, key_valid, start,
                              num_heads=num_heads, num_kv_heads=num_kv_heads)

    fused_module.rope_kv_write, fused_module.group_attention = rope_kv_write, group_attention
    try:
        yield
    finally:
        fused_module.rope_kv_write, fused_module.group_attention = rope_kv, attention
        if held:
            raise RuntimeError("a decode stage's rope_kv_write was not followed by its attention")


def main(argv=None) -> None:
    from cqil_kernels import fused
    from cqil_kernels.bench import _commit, _warm_up_gpu, random_model, write_record
    from persistent_chain import replay_ms

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", action="append", help="default smollm2-135m and llama-7b; repeated")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--steps", type=int, default=20, help="decode steps per CUDA graph")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("rope_attention measures GPU time and needs a CUDA device")
    device, dtype, commit = torch.device("cuda"), torch.bfloat16, _commit()
    _warm_up_gpu(device, 1.0)
    rows, times_all = [], {}
    for shape in a.shape or ["smollm2-135m", "llama-7b"]:
        model = random_model(shape, dtype, device)
        model.backend = "triton"
        layers = model.args.num_hidden_layers
        ids = torch.randint(0, model.args.vocab_size, (a.batch, a.prompt), device=device)
        graphs, first, kept = {}, {}, {}
        with torch.inference_mode():
            for variant in ("today", "rope in attention"):
                cache = model.new_cache(a.batch, a.prompt + a.steps * (2 * a.rounds + 4) + 8)
                tok = model.argmax(model(ids, cache=cache)[:, -1])
                patch = fused_decode_attention(fused) if variant != "today" else contextlib.nullcontext()
                with patch:
                    side = torch.cuda.Stream()
                    side.wait_stream(torch.cuda.current_stream())
                    with torch.cuda.stream(side):
                        first[variant] = fused.step(model, tok.view(-1, 1), None, cache, 1)[:, -1].float()
                        fused.step(model, tok.view(-1, 1), None, cache, 1)
                    torch.cuda.current_stream().wait_stream(side)
                    g = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(g):
                        for _ in range(a.steps):
                            fused.step(model, tok.view(-1, 1), None, cache, 1)
                graphs[variant] = g
                kept[variant] = cache, tok  # a graph's inputs and cache must outlive it (capture frees memory)
            times = {v: [ms / a.steps for ms in t] for v, t in replay_ms(graphs, a.rounds).items()}
        diff = (first["today"] - first["rope in attention"]).abs().max().item()
        scale = first["today"].abs().max().item()
        base = statistics.median(times["today"])
        for variant, t in times.items():
            ms = statistics.median(t)
            rows.append([shape, variant, layers, round(ms, 4), round(1000 * (base - ms) / layers, 2)])
            print(f"{shape:>14} {variant:>18}: {ms:.4f} ms/token ({1000 * (base - ms) / layers:+.2f} us per layer "
                  f"saved)", flush=True)
        print(f"{shape:>14} first step's logits: max difference {diff:.3g} (of max |logit| {scale:.3g})", flush=True)
        times_all[shape] = times
        del model, graphs, kept, cache, tok
        torch.cuda.empty_cache()
    write_record(a.out, device=device, commit=commit,
                 title="Decode with rope_kv's work inside attention (one kernel fewer per layer step)",
                 what=(f"bf16, batch {a.batch}, {a.prompt}-token prompt, random weights, no groups; fused.step, "
                       f"{a.steps} steps per CUDA graph, both variants in one process, alternated, medians of "
                       f"{a.rounds} rounds"),
                 columns=["shape", "variant", "layers", "ms/token", "us per layer saved"], rows=rows,
                 times_ms=times_all)


if __name__ == "__main__":
    main()
