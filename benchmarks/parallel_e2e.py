"""CQIL over several GPUs, end to end, and the group reduction alone (issue 6: P3-P7). Run under torchrun:

    torchrun --standalone --nproc-per-node 2 benchmarks/parallel_e2e.py --shape llama-7b --groups 12-30:2 \
        --out benchmarks/results/<dir>/parallel_llama-7b_P2.json

Every rank runs this file. In order:
1. the group reduction of one decode token (and larger messages) inside a CUDA graph: the one-shot kernel
   (csrc/one_shot.cu) through GroupReducer.all_reduce (current stream, as decode calls it), through
   all_reduce_async (communication stream + events, as the chunked prefill calls it), the kernel alone,
   and NCCL (dist.all_reduce) — median microseconds per call;
2. rank 0 alone: the one-GPU baseline — the same random weights, no groups, Triton backend, decode from
   a CUDA graph (what `cqil bench` calls triton-seq) — and one layer step (a single stage_forward replayed
   from a CUDA graph at the same cache length), for the ideal: saved layer steps x layer step / baseline;
   then the same grouping on one GPU, whose logits and greedy tokens the ranks must reproduce;
3. all ranks: the grouped model spread over the ranks (rank.py), decode ms/token and prefill ms, its
   logits and greedy tokens against the one-GPU grouped model's, and (P6) prefill from a CUDA graph as is,
   with the reductions skipped, and the reductions alone: the fraction of reduction time hidden under
   compute = 1 - (with - without) / alone.
4. with --alternate N: N more rounds of decode and graph-prefill timing, rank 0's one-GPU baseline then
   the ranks, in turn, and "of ideal" and "prefill lower by" per round from the pair (a baseline timed
   once can drift by several percent within a run; seen 3.5% on an H200); --prefill-variants adds, per
   round, the ranks' graph prefill run other ways (PREFILL_VARIANTS: unsplit, micro-batches reduced by
   the one-shot kernel instead of the copy engines), so they are compared in one process. The one-GPU
   model stays resident beside rank 0's part: too big for the LLaMA-33B shape on 80 GB cards.
Rank 0 writes the JSON record (card, date, commit, command, figures).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from cqil_kernels import CQILConfig, CQILLlama, fused
from cqil_kernels.bench import SHAPES, _commit, _events_ms, _time_ours, _warm_up_gpu, random_model, shape_args
from cqil_kernels.demo import parse_groups
from cqil_kernels.parallel import Placement, RankModel, init_from_env
from cqil_kernels.parallel.comm import GroupReducer
from cqil_kernels.parallel.rank import BYPASS_EXCHANGES


def log(*parts) -> None:
    if dist.get_rank() == 0:
        print(*parts, flush=True)


def graph_us(fn, calls: int = 20, replays: int = 30) -> float:
    """Median microseconds per fn() call, fn captured `calls` times in one CUDA graph."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    dist.barrier()
    ms = _events_ms(graph.replay, replays)
    return 1000 * ms / calls


def bench_reduction(device, sizes_bytes: list[int]) -> list[dict]:
    reducer = GroupReducer(device)
    rows = []
    for nbytes in sizes_bytes:
        x = torch.ones(nbytes // 2, dtype=torch.bfloat16, device=device)
        row = {"bytes": nbytes, "path": reducer.policy(x)[0]}
        row["nccl_us"] = graph_us(lambda: dist.all_reduce(x))
        if row["path"] == "one_shot":
            row["one_shot_us"] = graph_us(lambda: reducer.all_reduce(x))
            row["one_shot_comm_stream_us"] = graph_us(lambda: reducer.all_reduce_async(x).wait())
            row["one_shot_kernel_us"] = graph_us(lambda: reducer._one_shot.all_reduce(
                x.data_ptr(), x.data_ptr(), x.numel(), "bfloat16", torch.cuda.current_stream().cuda_stream))
        else:
            row["fallback_reason"] = reducer.policy(x)[1]
        log(f"  reduce {nbytes:>8} B: " + ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}"
                                                    for k, v in row.items() if k != "bytes"))
        rows.append(row)
    reducer.check_health()
    return rows


def graph_prefill_ms(step_fn, new_cache, ids, together: bool = True) -> float:
    """A prompt's prefill (step_fn(ids, None, cache)) replayed from a CUDA graph: the GPU time alone,
    without Python launch overhead (which, eager, is most of a 512-token prefill here)."""
    cache = new_cache(ids.shape[0], ids.shape[1] + 2)

    def run():
        cache.position.zero_()
        cache.n_tokens.zero_()
        step_fn(ids, None, cache)

    run()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    if together:  # all ranks start timing together
        dist.barrier()
    return _events_ms(graph.replay, 10)


@torch.inference_mode()
def layer_step_ms(model, layer: int, prompt: int, T: int) -> float:
    """One layer step (stage_forward, P = 1) for T tokens at cache length `prompt`, from a CUDA graph."""
    args = model.args
    cache = model.new_cache(1, prompt + T + 1)
    cache.position.fill_(prompt)
    positions = torch.arange(prompt, prompt + T, device=model.device)[None]
    h = torch.randn(T, args.hidden_size, device=model.device, dtype=model.dtype)
    cache.key_valid[:, :prompt + T] = True
    w = model.packed_weights().group(layer, 1)
    s = next(i for i, st in enumerate(model.stages) if st[0] == layer)

    def step():
        fused.stage_forward(w, h, positions, cache.k[s], cache.v[s], cache.key_valid, cache.position,
                            model.inv_freq, args=args, bypass=0, bypass_mode="residual")

    step()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(10):
            step()
    return _events_ms(graph.replay, 30) / 10


def tie_check(tokens, base_tokens, ranks_logits, base_logits, exact_logits, prompt: int) -> dict | None:
    """Where the ranks' greedy tokens first part from the one-GPU model's: both bf16 models' logit error
    against the float32 model on the same weights (for the shared prefix), and that exact model's margin
    between the two tokens. A tie: the margin is within the two errors (flat distributions of random
    weights have such ties); None when the tokens are identical."""
    if torch.equal(tokens, base_tokens):
        return None
    i = int((tokens != base_tokens).any(0).nonzero()[0]) - prompt  # new token i: logits row i
    ours, theirs = int(tokens[0, prompt + i]), int(base_tokens[0, prompt + i])
    out = dict(new_token=i, ranks_token=ours, one_gpu_token=theirs,
               ranks_vs_one_gpu=(ranks_logits[i] - base_logits[i]).abs().max().item())
    if exact_logits is None:
        return {**out, "exact": "float32 model does not fit next to the ranks' weights: not checked"}
    ref = exact_logits[i].to(ranks_logits.device)
    err_ranks = (ranks_logits[i] - ref).abs().max().item()
    err_one = (base_logits[i].to(ref.device) - ref).abs().max().item()
    margin = abs(ref[ours] - ref[theirs]).item()
    return {**out, "ranks_error_vs_fp32": err_ranks, "one_gpu_error_vs_fp32": err_one,
            "fp32_margin": margin, "tie": margin <= err_ranks + err_one}


# Other ways to run the ranks' prefill, for --prefill-variants: (microbatch_rows or None for the
# model's own, whether the copy-engine path may be taken)
PREFILL_VARIANTS = {"unsplit": (0, True), "microbatches-one-shot": (None, False)}


def prefill_variant_ms(ranked, name: str, ids) -> float:
    """The ranks' graph prefill with PREFILL_VARIANTS[name] in force, then the model's own settings back."""
    rows, copy_engine = PREFILL_VARIANTS[name]
    reducer = ranked.reducer
    own_rows, own_policy = ranked.microbatch_rows, reducer.copy_engine_policy
    if rows is not None:
        ranked.microbatch_rows = rows
    if not copy_engine:
        reducer.copy_engine_policy = dataclasses.replace(own_policy, enabled=False, reason="off (benchmark variant)")
    try:
        return graph_prefill_ms(ranked._triton_step, ranked.new_cache, ids)
    finally:
        ranked.microbatch_rows, reducer.copy_engine_policy = own_rows, own_policy


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--shape", default="llama-7b", choices=sorted(SHAPES))
    parser.add_argument("--groups", default="12-30:2")
    parser.add_argument("--bypass", type=int, default=0, help="the grouping's bypass d")
    parser.add_argument("--bypass-exchange", default="all_reduce", choices=BYPASS_EXCHANGES,
                        help="RankModel's bypass_exchange (with --bypass); all_reduce: decode in a graph")
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--greedy", type=int, default=32, help="greedy tokens compared with the baseline")
    parser.add_argument("--reduce-bytes", default="8192,16384,65536,262144,1048576")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--microbatch-rows", type=int, default=None,
                        help="RankModel's microbatch_rows: a prefill's grouped stages run as two micro-batches "
                             "of tokens when each has at least this many rows (0: never)")
    parser.add_argument("--alternate", type=int, default=0,
                        help="rounds of decode timing, one-GPU baseline and ranks in turn (step 4)")
    parser.add_argument("--prefill-variants", default="",
                        help="with --alternate: every round also times the ranks' graph prefill run these "
                             f"other ways, comma-separated, of {sorted(PREFILL_VARIANTS)} (step 4)")
    parser.add_argument("--profile-prefill", action="store_true",
                        help="print rank 0's CPU-time profile of one eager prefill")
    opts = parser.parse_args()
    variants = [v for v in opts.prefill_variants.split(",") if v]
    unknown = [v for v in variants if v not in PREFILL_VARIANTS]
    if unknown:
        parser.error(f"unknown --prefill-variants {unknown}; known: {sorted(PREFILL_VARIANTS)}")

    device = init_from_env()
    rank, world = dist.get_rank(), dist.get_world_size()
    dtype = torch.bfloat16
    cqil = parse_groups(opts.groups, opts.bypass)
    props = torch.cuda.get_device_properties(device)
    record = dict(card=props.name, gpus=world, date=datetime.datetime.now(datetime.timezone.utc).isoformat(
        timespec="minutes"), commit=_commit(), command="torchrun --standalone --nproc-per-node "
        f"{world} benchmarks/parallel_e2e.py " + " ".join(sys.argv[1:]), shape=opts.shape, groups=opts.groups,
        cqil=cqil.to_dict(), dtype="bfloat16", batch=1, prompt=opts.prompt, new_tokens=opts.new,
        repeats=opts.repeats, env={k: os.environ.get(k) for k in
                                   ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS")},
        torch=torch.__version__)
    _warm_up_gpu(device)
    log(f"{props.name} x{world}: group reduction inside a CUDA graph (bf16)")
    record["reduction"] = bench_reduction(device, [int(b) for b in opts.reduce_bytes.split(",")])

    vocab = SHAPES[opts.shape]["vocab_size"]
    ids = torch.randint(0, vocab, (1, opts.prompt), generator=torch.Generator().manual_seed(0)).to(device)

    # 2. the one-GPU baseline, on rank 0 while the others wait
    if rank == 0:
        t0 = time.perf_counter()
        base = random_model(opts.shape, dtype, device)
        base.backend = "triton"
        base_prefill, base_decode = _time_ours(base, ids, opts.new, opts.repeats)
        middle = cqil.groups[0][0] if cqil.groups else 0
        t_layer = layer_step_ms(base, middle, opts.prompt + opts.new // 2, 1)
        t_layer_prefill = layer_step_ms(base, middle, 0, opts.prompt)
        base_graph_prefill = graph_prefill_ms(functools.partial(fused.step, base), base.new_cache, ids, together=False)
        saved = cqil.layers_saved
        ideal = saved * t_layer / base_decode
        base.cqil = cqil  # the same grouping on one GPU: what the ranks' logits and tokens must match
        grouped_prefill, grouped_decode = _time_ours(base, ids, opts.new, opts.repeats)
        base_logits = base(ids)[:, -1].float()
        base_tokens = base.generate(ids, opts.greedy)
        # logits before every greedy token, for the tie check of step 3 (position i predicts token i + 1)
        base_seq_logits = base(base_tokens)[0, opts.prompt - 1:-1].double()
        record["baseline_1gpu"] = dict(decode_ms_per_token=base_decode, prefill_ms=base_prefill,
                                       prefill_graph_ms=base_graph_prefill,
                                       layer_step_ms=t_layer, layer_step_prefill_ms=t_layer_prefill,
                                       grouped_decode_ms_per_token=grouped_decode,
                                       grouped_prefill_ms=grouped_prefill, seconds=time.perf_counter() - t0)
        log(f"1 GPU: decode {base_decode:.4f} ms/token, prefill {base_prefill:.3f} ms (graph "
            f"{base_graph_prefill:.3f} ms), layer step {1000 * t_layer:.1f} us (decode) / {t_layer_prefill:.3f} "
            f"ms (prefill {opts.prompt}); grouped on 1 GPU: decode {grouped_decode:.4f}, prefill "
            f"{grouped_prefill:.3f} ms")
        if not opts.alternate:
            del base
            torch.cuda.empty_cache()
        # the same weights in float32 (torch backend): the exact logits a greedy difference is judged by
        exact_logits = None
        with torch.device("meta"):
            n_params = sum(p.numel() for p in CQILLlama(shape_args(opts.shape)).parameters())
        if 6 * n_params < 0.8 * torch.cuda.mem_get_info(device)[0]:  # float32 copy + the bf16 one it is cast from
            exact = random_model(opts.shape, dtype, device).float()
            exact.cqil, exact.backend = cqil, "torch"
            exact_logits = exact(base_tokens)[0, opts.prompt - 1:-1].double()
            del exact
            torch.cuda.empty_cache()
    dist.barrier()

    # 3. the grouped model over the ranks
    placement = Placement.build(rank, world, shape_args(opts.shape), cqil)
    model = random_model(opts.shape, dtype, device, held_layers=placement.held_layers)
    model.cqil = cqil
    model.backend = "triton"
    splitting = {} if opts.microbatch_rows is None else dict(microbatch_rows=opts.microbatch_rows)
    ranked = RankModel(model, placement, bypass_exchange=opts.bypass_exchange, **splitting)
    torch.cuda.reset_peak_memory_stats(device)
    prefill, decode = _time_ours(ranked, ids, opts.new, opts.repeats)
    if opts.profile_prefill:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            ranked(ids, cache=ranked.new_cache(1, opts.prompt + 2))
            torch.cuda.synchronize()
        log(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18))
    logits = ranked(ids)[:, -1].float()
    tokens = ranked.generate(ids, opts.greedy)
    ranks_seq_logits = ranked(tokens)[0, opts.prompt - 1:-1].double()  # every rank takes part
    # P6, from CUDA graphs (GPU time): prefill as is, with the reductions skipped (wrong results, timing
    # only), and the same reductions alone
    prefill_graph = graph_prefill_ms(ranked._triton_step, ranked.new_cache, ids)
    ranked.reducer.skip_for_benchmark = True
    prefill_graph_no_reduce = graph_prefill_ms(ranked._triton_step, ranked.new_cache, ids)
    ranked.reducer.skip_for_benchmark = False
    M, D = opts.prompt, model.args.hidden_size
    chunks = 1 if ranked.microbatch_span(1, M) is None else 2  # the messages of one group's reduction
    bufs = [torch.ones((M * (i + 1) // chunks - M * i // chunks, D), dtype=dtype, device=device)
            for i in range(chunks)]
    n_groups = len(cqil.groups)

    def reductions_alone():
        for _ in range(n_groups):
            for p in [ranked.reducer.all_reduce_async(b) for b in bufs]:
                p.wait()

    reductions_alone()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        reductions_alone()
    dist.barrier()
    reduce_alone = _events_ms(graph.replay, 10)
    rounds = []  # step 4: (one-GPU decode, ranks decode, one-GPU graph prefill, ranks graph prefill)
    other_ways = {v: [] for v in variants}  # step 4 with --prefill-variants: ranks graph prefill per round
    for _ in range(opts.alternate):
        dist.barrier()
        one = one_prefill = None
        if rank == 0:
            base.cqil = CQILConfig()
            one = _time_ours(base, ids, opts.new, 2)[1]
            one_prefill = graph_prefill_ms(functools.partial(fused.step, base), base.new_cache, ids, together=False)
        dist.barrier()
        ranks_decode = _time_ours(ranked, ids, opts.new, 2)[1]
        rounds.append((one, ranks_decode, one_prefill, graph_prefill_ms(ranked._triton_step, ranked.new_cache, ids)))
        for v in variants:
            other_ways[v].append(prefill_variant_ms(ranked, v, ids))
    everyone: list = [None] * world
    dist.all_gather_object(everyone, ranked.stats())
    if rank == 0:
        b = record["baseline_1gpu"]
        measured = 1 - decode / b["decode_ms_per_token"]
        exposed = prefill_graph - prefill_graph_no_reduce
        record["parallel"] = dict(
            decode_ms_per_token=decode, prefill_ms=prefill, prefill_graph_ms=prefill_graph,
            prefill_graph_no_reduce_ms=prefill_graph_no_reduce, reductions_alone_graph_ms=reduce_alone,
            prefill_microbatches=chunks, microbatch_rows=ranked.microbatch_rows, layer_steps_saved=saved,
            decode_reduction=measured, decode_ideal_reduction=ideal, decode_fraction_of_ideal=measured / ideal,
            prefill_reduction=1 - prefill / b["prefill_ms"],
            prefill_graph_reduction=1 - prefill_graph / b["prefill_graph_ms"],
            prefill_reduction_hidden=1 - max(exposed, 0.0) / reduce_alone,
            logits_max_abs_diff=(logits - base_logits).abs().max().item(),
            logits_scale=base_logits.abs().max().item(),
            greedy_tokens_identical=bool(torch.equal(tokens, base_tokens)),
            greedy_first_difference=int((tokens != base_tokens).any(0).nonzero()[0]) - opts.prompt
            if not torch.equal(tokens, base_tokens) else None,
            greedy_tie=tie_check(tokens, base_tokens, ranks_seq_logits, base_seq_logits, exact_logits,
                                 opts.prompt),
            ranks=everyone)
        if rounds:
            fractions = [(1 - r / o) / (saved * t_layer / o) for o, r, _, _ in rounds]
            prefill_lower = [1 - rp / op for _, _, op, rp in rounds]
            record["parallel"]["alternated"] = dict(
                rounds=[dict(one_gpu_decode_ms=o, ranks_decode_ms=r, one_gpu_prefill_graph_ms=op,
                             ranks_prefill_graph_ms=rp) for o, r, op, rp in rounds],
                decode_fraction_of_ideal_median=statistics.median(fractions),
                prefill_graph_reduction_median=statistics.median(prefill_lower))
            log("alternated decode, 1 GPU / ranks ms (of ideal): " + ", ".join(
                f"{o:.4f}/{r:.4f} ({100 * f:.0f}%)" for (o, r, _, _), f in zip(rounds, fractions))
                + f"; median {100 * statistics.median(fractions):.1f}% of ideal")
            log("alternated graph prefill, 1 GPU / ranks ms (lower by): " + ", ".join(
                f"{op:.3f}/{rp:.3f} ({100 * f:.1f}%)" for (_, _, op, rp), f in zip(rounds, prefill_lower))
                + f"; median {100 * statistics.median(prefill_lower):.1f}% lower")
        for v, times in other_ways.items():
            if not rounds:
                break
            lower = [1 - rp / op for (_, _, op, _), rp in zip(rounds, times)]
            record["parallel"]["alternated"].setdefault("prefill_variants", {})[v] = dict(
                ranks_prefill_graph_ms=times, prefill_graph_reduction_median=statistics.median(lower))
            log(f"  the same rounds, prefill {v}: ranks ms (lower by): " + ", ".join(
                f"{rp:.3f} ({100 * f:.1f}%)" for rp, f in zip(times, lower))
                + f"; median {100 * statistics.median(lower):.1f}% lower")
        p = record["parallel"]
        log(f"{world} GPUs {opts.groups}: decode {decode:.4f} ms/token ({100 * measured:.1f}% lower; ideal "
            f"{100 * ideal:.1f}%: {100 * measured / ideal:.0f}% of it), prefill {prefill:.3f} ms eager "
            f"({100 * p['prefill_reduction']:.1f}% lower), graph {prefill_graph:.3f} ms "
            f"({100 * p['prefill_graph_reduction']:.1f}% lower; without reductions {prefill_graph_no_reduce:.3f} ms, "
            f"reductions alone {reduce_alone:.3f} ms: {100 * p['prefill_reduction_hidden']:.0f}% hidden), "
            f"logits diff vs 1-GPU grouped {p['logits_max_abs_diff']:.3g} "
            f"(scale {p['logits_scale']:.3g}), greedy identical: {p['greedy_tokens_identical']}"
            + (f" (first difference: {p['greedy_tie']})" if p["greedy_tie"] else ""))
        opts.out.parent.mkdir(parents=True, exist_ok=True)
        opts.out.write_text(json.dumps(record, indent=1) + "\n")
        log(f"wrote {opts.out}")
    dist.barrier()


if __name__ == "__main__":
    main()
    sys.stdout.flush()
    os._exit(0)  # no destroy_process_group: seen to hang at exit on these machines (launch.end_rank)
