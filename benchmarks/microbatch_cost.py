"""What running a prefill's grouped stages as two micro-batches (parallel/rank.py) costs one rank in
compute, measured on one GPU (P6's bound where no second GPU is lent):

    python benchmarks/microbatch_cost.py --shape llama-7b --groups 12-30:2 --prompt 512 --out cost.json

Rank 0 of a P-rank placement is built in a one-process group, its reductions skipped (the ranks' work
without communication: the prefill P GPUs would take if every reduction were hidden and the ranks
never waited for each other). Its CUDA-graph prefill, unsplit and in micro-batches of each
--microbatch-rows, is timed in alternated rounds against the one-GPU prefill (same random weights, no
groups, fused.step from a CUDA graph), the order reversed every other round. "Lower by" per round is
1 - rank / one GPU; the ideal is the saved layer steps x one measured prefill layer step / one GPU.
The micro-batched figure bounds what P GPUs can reach with micro-batches; its gap to the unsplit one
is the compute they cost (smaller GEMMs, a second pass over the stage's weights, attention split in two).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

from cqil_kernels import envs, fused
from cqil_kernels.bench import SHAPES, _commit, _warm_up_gpu, random_model, shape_args
from cqil_kernels.demo import parse_groups
from cqil_kernels.parallel import Placement, RankModel
from parallel_e2e import graph_prefill_ms, layer_step_ms


@torch.inference_mode()
def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--shape", default="llama-7b", choices=sorted(SHAPES))
    ap.add_argument("--groups", default="12-30:2")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--microbatch-rows", type=int, action="append",
                    help="micro-batch row minimums to time (default 256); 0 = unsplit is always timed")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("microbatch_cost measures GPU time and needs a CUDA device")
    rows_list = a.microbatch_rows or [256]
    if a.rounds < 1 or a.prompt < 2 or min(rows_list) < 1:
        raise SystemExit("--rounds >= 1, --prompt >= 2 and --microbatch-rows >= 1")
    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    cqil = parse_groups(a.groups)
    world = max(len(g) for g in cqil.groups)
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=0, world_size=1)
        try:
            record = run(a, cqil, world, rows_list, device)
        finally:
            dist.destroy_process_group()
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {a.out}", flush=True)


def run(a, cqil, world: int, rows_list: list[int], device: torch.device) -> dict:
    dtype = torch.bfloat16
    props = torch.cuda.get_device_properties(device)
    _warm_up_gpu(device)
    ids = torch.randint(0, SHAPES[a.shape]["vocab_size"], (1, a.prompt),
                        generator=torch.Generator().manual_seed(0)).to(device)
    base = random_model(a.shape, dtype, device)
    base.backend = "triton"
    placement = Placement.build(0, world, shape_args(a.shape), cqil)
    part = random_model(a.shape, dtype, device, held_layers=placement.held_layers)
    part.cqil, part.backend = cqil, "triton"
    ranked = RankModel(part, placement, one_shot=False, copy_engine=False)
    ranked.reducer.skip_for_benchmark = True  # timing only: the outputs are wrong
    t_layer = layer_step_ms(base, cqil.groups[0][0], 0, a.prompt)
    ideal_ms = cqil.layers_saved * t_layer

    def one_gpu():
        return graph_prefill_ms(functools.partial(fused.step, base), base.new_cache, ids, together=False)

    def rank0(rows):
        ranked.microbatch_rows = rows
        return graph_prefill_ms(ranked._triton_step, ranked.new_cache, ids, together=False)

    variants = [0, *rows_list]
    times = {"one_gpu": [], **{f"rank0_rows{r}": [] for r in variants}}
    for i in range(a.rounds):
        order = [("one_gpu", one_gpu)] + [(f"rank0_rows{r}", functools.partial(rank0, r)) for r in variants]
        for name, fn in (order if i % 2 == 0 else order[::-1]):
            times[name].append(fn())
    lower = {name: [1 - t / o for t, o in zip(ts, times["one_gpu"])] for name, ts in times.items()
             if name != "one_gpu"}
    one = statistics.median(times["one_gpu"])
    record = dict(card=props.name, date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
                  commit=_commit(), command="python benchmarks/microbatch_cost.py " + " ".join(sys.argv[1:]),
                  shape=a.shape, groups=a.groups, ranks=world, prompt=a.prompt, rounds=a.rounds,
                  torch=torch.__version__, layer_step_prefill_ms=t_layer, layers_saved=cqil.layers_saved,
                  ideal_reduction=ideal_ms / one, times_ms=times,
                  microbatch_span=[ranked.microbatch_span(1, a.prompt) if r else None for r in variants],
                  lower_by_median={k: statistics.median(v) for k, v in lower.items()}, lower_by=lower,
                  settings={k: envs.get(k) for k in ("CQIL_PDL", "CQIL_PREFILL_BLAS_ROWS")})
    print(f"{props.name}: {a.shape} {a.groups}, prompt {a.prompt}: one GPU {one:.3f} ms; prefill layer step "
          f"{t_layer:.3f} ms, ideal {100 * record['ideal_reduction']:.1f}% lower", flush=True)
    for name, v in lower.items():
        print(f"  {name}: median {statistics.median(times[name]):.3f} ms, lower by "
              f"{', '.join(f'{100 * x:.1f}%' for x in v)}; median {100 * statistics.median(v):.1f}%", flush=True)
    return record


if __name__ == "__main__":
    main()
