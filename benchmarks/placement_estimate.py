"""How fast each way of using W GPUs would decode, estimated on one GPU: one-GPU, pure tensor parallelism,
CQIL alone and the hybrid (parallel/placement.py), from our own kernels.

    python benchmarks/placement_estimate.py --shape llama-7b --world 2 --groups 12-30:2 --reduce-us 5.0 \\
        --out est_7b_2.json
    python benchmarks/placement_estimate.py --shape llama-7b --world 4 --groups 14-30:4 \\
        --split-groups 12-30:2 --reduce-us 7.5 --out est_7b_4.json

For each placement, rank 0's part of the model (its layers, or its shards of them) is built on this GPU in
a one-process group with every reduction skipped, and its decode step is timed from a CUDA graph: the
rank's compute. The estimate adds the all-reduces one step makes on that placement times the latency of
one (--reduce-us: 8 KB in a CUDA graph, measured on several GPUs; benchmarks/results/reductions.json). The
one-GPU model is timed in the same rounds, alternated, order reversed every other round; medians. With
--one-at-a-time only one rank part is on the GPU beside the one-GPU model (LLaMA-33B on one H200):

    python benchmarks/placement_estimate.py --shape llama-33b --world 2 --groups 22-56:2 --reduce-us 5.0 \\
        --one-at-a-time --out est_33b_2.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

from cqil_kernels import CQILConfig, envs
from cqil_kernels.bench import SHAPES, _commit, _time_ours, _warm_up_gpu, random_model, shape_args
from cqil_kernels.demo import parse_groups
from cqil_kernels.parallel import Placement, RankModel
from cqil_kernels.parallel.comm import GroupReducer


def placements(world: int, groups: CQILConfig, split_groups: CQILConfig | None) -> dict:
    """name -> (grouping, tensor_parallel) of the placements compared."""
    out = {"tp": (CQILConfig(), True), "cqil": (groups, False), "hybrid": (groups, True)}
    if split_groups is not None:
        P = max(len(g) for g in split_groups.groups)
        out[f"hybrid P{P}xTP{world // P}"] = (split_groups, True)
    return out


@torch.inference_mode()
def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama-7b", choices=sorted(SHAPES))
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--groups", default="12-30:2", help="CQIL groups of the cqil and hybrid placements")
    ap.add_argument("--split-groups", default=None, help="groups whose layers are split over world / P ranks")
    ap.add_argument("--reduce-us", type=float, required=True, help="one all-reduce of 8 KB, microseconds")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--one-at-a-time", action="store_true",
                    help="build each placement's rank part only while it is timed (the one-GPU model beside one "
                         "part, not beside all: LLaMA-33B on one H200)")
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("placement_estimate measures GPU time and needs a CUDA device")
    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=0, world_size=1)
        try:
            record = run(a, device)
        finally:
            dist.destroy_process_group()
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {a.out}", flush=True)


def run(a, device: torch.device) -> dict:
    dtype, args = torch.bfloat16, shape_args(a.shape)
    groups = parse_groups(a.groups)
    split = parse_groups(a.split_groups) if a.split_groups else None
    _warm_up_gpu(device)
    ids = torch.randint(0, args.vocab_size, (a.batch, a.prompt), generator=torch.Generator().manual_seed(0)).to(device)
    base = random_model(a.shape, dtype, device)
    base.backend = "triton"
    skip = GroupReducer(device, one_shot=False, copy_engine=False)
    skip.skip_for_benchmark = True  # timing only: every reduction returns its input
    steps = {}

    def build(cqil, tp):
        placement = Placement.build(0, a.world, args, cqil, tensor_parallel=tp)
        part = random_model(a.shape, dtype, device, placement=placement)
        part.cqil, part.backend = cqil, "triton"
        return RankModel(part, placement, reducer=skip), placement.reductions_per_step(cqil.bypass)

    def time_round(r, order):
        for name, model in (order if r % 2 == 0 else order[::-1]):
            times[name].append(_time_ours(model, ids, 64, 3)[1])
            print(f"round {r} {name:>16}: {times[name][-1]:.4f} ms/token (compute)", flush=True)

    chosen = placements(a.world, groups, split)
    times = {"one-gpu": [], **{name: [] for name in chosen}}
    if a.one_at_a_time:  # each rank part built, timed against the one-GPU model and freed in turn
        for name, (cqil, tp) in chosen.items():
            part, steps[name] = build(cqil, tp)
            for r in range(a.rounds):
                time_round(r, [("one-gpu", base), (name, part)])
            del part
            torch.cuda.empty_cache()
    else:
        ranks = {}
        for name, (cqil, tp) in chosen.items():
            ranks[name], steps[name] = build(cqil, tp)
        for r in range(a.rounds):
            time_round(r, [("one-gpu", base), *ranks.items()])
    one = statistics.median(times["one-gpu"])
    rows = [["one-gpu", 1, 0, round(one, 4), round(one, 4), "1.00x"]]
    for name in chosen:
        compute = statistics.median(times[name])
        estimate = compute + steps[name] * a.reduce_us / 1000
        rows.append([name, a.world, steps[name], round(compute, 4), round(estimate, 4), f"{one / estimate:.2f}x"])
    for row in rows:
        print(f"{row[0]:>16}: {row[2]:>3} reductions, compute {row[3]:.3f} ms, estimate {row[4]:.3f} ms/token "
              f"({row[5]} one GPU)", flush=True)
    return dict(title=f"Decode on {a.world} GPUs estimated on one: {a.shape}",
                what=(f"bf16, batch {a.batch}, {a.prompt}-token prompt, graph-replayed decode; rank 0's compute "
                      f"(reductions skipped) + reductions per step x {a.reduce_us} us; CQIL groups {a.groups}"
                      + (f", split groups {a.split_groups}" if a.split_groups else "") + f"; {a.rounds} rounds"
                      + (" per placement, each rank part alternated with the one-GPU model alone"
                         if a.one_at_a_time else "")),
                card=torch.cuda.get_device_name(device),
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
                commit=_commit(), command="python benchmarks/placement_estimate.py " + " ".join(sys.argv[1:]),
                source="this file", settings={k: envs.get(k) for k in ("CQIL_PDL", "CQIL_AUTOTUNE")},
                columns=["placement", "GPUs", "reductions per step", "rank compute ms/token", "estimate ms/token",
                         "speed-up"], rows=rows, times_ms=times)


if __name__ == "__main__":
    main()
