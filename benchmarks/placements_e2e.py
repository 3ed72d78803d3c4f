"""Decode on W GPUs, placement against placement, in one process per GPU (run under torchrun):

    torchrun --standalone --nproc-per-node 2 benchmarks/placements_e2e.py --shape llama-7b --groups 12-30:2 \\
        --placements one-gpu,tp,cqil,hybrid --rounds 4 --out placements_7b_2.json
    torchrun --standalone --nproc-per-node 4 benchmarks/placements_e2e.py --shape llama-7b --groups 14-30:4 \\
        --split-groups 12-30:2 --rounds 4 --out placements_7b_4.json

Every placement of parallel/placement.py is built on the ranks from the same random weights (bench.
random_model; rank 0 also holds the one-GPU model), checked against the one-GPU model (the last prompt
position's logits, max difference; greedy tokens over --greedy, identical or not), then decode (bs
--batch, graph-replayed) is timed in alternated rounds: the one-GPU model on rank 0, then each placement
on all ranks, the order reversed every other round; medians. Also the 8 KB group reduction inside a CUDA
graph (our one-shot kernel and NCCL) and, per placement, the reductions per step and each rank's weight and
KV-cache bytes. Rank 0 writes the record. --one-gpu-shared: every rank on GPU 0 (protocol check; the
timings then mean nothing). Without CUDA the ranks run on the CPU over gloo (tests/test_tensor_parallel.py:
a small config through --config, --backend torch, --dtype float32; wall-clock timings, no reduction timed).
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from cqil_kernels import CQILConfig
from cqil_kernels.bench import SHAPES, _commit, _time_ours, _warm_up_gpu, card, random_model, shape_args
from cqil_kernels.demo import parse_groups
from cqil_kernels.parallel import Placement, RankModel, end_rank, init_from_env
from cqil_kernels.parallel.comm import GroupReducer
from parallel_e2e import graph_us


def log(*parts) -> None:
    if dist.get_rank() == 0:
        print(*parts, flush=True)


@torch.inference_mode()
def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama-7b", choices=sorted(SHAPES))
    ap.add_argument("--groups", default="12-30:2", help="CQIL groups of the cqil and hybrid placements")
    ap.add_argument("--split-groups", default=None,
                    help="also the hybrid with these groups, each layer over world / P ranks")
    ap.add_argument("--placements", default="one-gpu,tp,cqil,hybrid")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--greedy", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--one-gpu-shared", action="store_true", help="every rank on GPU 0, gloo (protocols only)")
    ap.add_argument("--config", action="append", default=[], metavar="KEY=INT",
                    help="a config field of --shape replaced (num_hidden_layers=2); repeated")
    ap.add_argument("--backend", default="triton", choices=["triton", "torch"])
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args(argv)
    try:
        overrides = {key: int(value) for key, value in (item.split("=", 1) for item in a.config)}
    except ValueError:
        raise SystemExit(f"--config takes KEY=INT, got {a.config}")
    if a.one_gpu_shared:
        init_from_env(backend="gloo")
        device = torch.device("cuda", 0)
        torch.cuda.set_device(device)
    else:
        device = init_from_env()
    rank, world = dist.get_rank(), dist.get_world_size()
    dtype, args = getattr(torch, a.dtype), shape_args(a.shape, **overrides)
    names = [n for n in a.placements.split(",") if n]
    wanted = {"tp": (CQILConfig(), True), "cqil": (parse_groups(a.groups), False),
              "hybrid": (parse_groups(a.groups), True)}
    if a.split_groups:
        names.append("hybrid-split")
        wanted["hybrid-split"] = (parse_groups(a.split_groups), True)
    reduce_us = dict(one_shot=None, backend=None)
    if device.type == "cuda":
        _warm_up_gpu(device)
        reducer = GroupReducer(device)
        x = torch.ones(4096, dtype=dtype, device=device)
        reduce_us.update(one_shot=graph_us(lambda: reducer.all_reduce(x)) if reducer.one_shot_policy.enabled else None,
                         backend=graph_us(lambda: dist.all_reduce(x)) if not a.one_gpu_shared else None)
    log(f"8 KB all-reduce in a graph: {reduce_us}")
    ids = torch.randint(0, args.vocab_size, (a.batch, a.prompt), generator=torch.Generator().manual_seed(0)).to(device)
    base = None
    if rank == 0 and "one-gpu" in names:
        base = random_model(a.shape, dtype, device, **overrides)
        base.backend = a.backend
    ranked = {}
    for name in (n for n in names if n != "one-gpu"):
        cqil, tp = wanted[name]
        placement = Placement.build(rank, world, args, cqil, tensor_parallel=tp)
        part = random_model(a.shape, dtype, device, placement=placement, **overrides)
        part.cqil, part.backend = cqil, a.backend
        ranked[name] = RankModel(part, placement)
    checks = {}
    for name, model in ranked.items():
        logits = model(ids)[:, -1].float()
        tokens = model.generate(ids, a.greedy)
        if base is not None:
            base.cqil = model.cqil
            expected = base(ids)[:, -1].float()
            checks[name] = dict(logits_max_abs_diff=(logits - expected).abs().max().item(),
                                logits_scale=expected.abs().max().item(),
                                greedy_tokens_identical=bool(torch.equal(tokens, base.generate(ids, a.greedy))))
            base.cqil = CQILConfig()
    times = {name: [] for name in names}
    for r in range(a.rounds):
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            dist.barrier()
            if name == "one-gpu":
                if base is not None:
                    times[name].append(_time_ours(base, ids, a.new, 2)[1])
                continue
            times[name].append(_time_ours(ranked[name], ids, a.new, 2)[1])
        log(f"round {r}: " + ", ".join(f"{n} {times[n][-1]:.4f}" for n in names if times[n]))
    stats = {}
    for name, model in ranked.items():
        cache = model.new_cache(a.batch, a.prompt + a.new)
        mine = dict(parameter_bytes=model.parameter_bytes(),
                    kv_cache_bytes=sum(t.numel() * t.element_size() for t in (*cache.k, *cache.v)))
        everyone: list = [None] * world
        dist.all_gather_object(everyone, mine)
        stats[name] = dict(ranks=everyone, reductions_per_step=model.placement.reductions_per_step(model.cqil.bypass),
                           placement=model.placement.describe()["kind"])
    if rank == 0:
        one = statistics.median(times["one-gpu"]) if times.get("one-gpu") else None
        rows = []
        for name in names:
            ms = statistics.median(times[name])
            s = stats.get(name, {})
            rows.append([name, world if name != "one-gpu" else 1, s.get("reductions_per_step", 0), round(ms, 4),
                         f"{one / ms:.2f}x" if one else None, checks.get(name, {}).get("greedy_tokens_identical")])
        record = dict(title=f"Decode on {world} GPUs, by placement: {a.shape}",
                      what=(f"{a.dtype}, batch {a.batch}, {a.prompt}-token prompt, "
                            f"{'graph-replayed' if device.type == 'cuda' else 'eager'} decode, {a.rounds} "
                            f"alternated rounds (medians); groups {a.groups}"
                            + (f", split groups {a.split_groups}" if a.split_groups else "")
                            + (f"; config {overrides}" if overrides else "") + f"; {a.backend} backend"),
                      card=card(device),
                      date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
                      commit=_commit(), command=f"torchrun --nproc-per-node {world} benchmarks/placements_e2e.py "
                      + " ".join(sys.argv[1:]), source="this file",
                      columns=["placement", "GPUs", "reductions per step", "decode ms/token", "speed-up",
                               "greedy tokens = one GPU's"], rows=rows, reduce_8kb_us=reduce_us,
                      checks=checks, per_rank=stats, times_ms=times)
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(record, indent=1) + "\n")
        for row in rows:
            log(" | ".join(str(v) for v in row))
        log(f"wrote {a.out}")
    dist.barrier()
    end_rank()


if __name__ == "__main__":
    main()
