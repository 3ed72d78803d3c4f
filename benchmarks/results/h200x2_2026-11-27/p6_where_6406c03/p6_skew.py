"""EXPERIMENT: where the exposed cost of P6's reductions goes. The ranks' graph prefill (LLaMA-7B, P=2
over [12,30), 512 tokens) in three forms, alternated: full (the 4 MB reductions), skip (none: wrong
results), barrier (each reduction cut to its first 16 bytes: the ranks still meet at every stage).
Each rank reports its own times. Run from /tmp:  torchrun --standalone --nproc-per-node 2 /tmp/p6_skew.py OUT.json"""
import json, os, statistics, sys, types
import torch
import torch.distributed as dist
from cqil_kernels.bench import _warm_up_gpu, random_model, shape_args
from cqil_kernels.demo import parse_groups
from cqil_kernels.parallel import Placement, RankModel, init_from_env
from cqil_kernels.parallel.comm import GroupReducer
sys.path.insert(0, os.environ["REPO"] + "/benchmarks")
from parallel_e2e import graph_prefill_ms

device = init_from_env()
rank, world = dist.get_rank(), dist.get_world_size()
_warm_up_gpu(device)
cqil = parse_groups("12-30:2", 0)
placement = Placement.build(rank, world, shape_args("llama-7b"), cqil)
model = random_model("llama-7b", torch.bfloat16, device, held_layers=placement.held_layers)
model.cqil, model.backend = cqil, "triton"
ranked = RankModel(model, placement)
ids = torch.randint(0, 32000, (1, 512), generator=torch.Generator().manual_seed(0)).to(device)
reducer = ranked.reducer


def barrier_only(self, t):
    GroupReducer.all_reduce(self, t.view(-1)[:8])
    return t


rounds = {"full": [], "skip": [], "barrier": []}
with torch.inference_mode():
    graph_prefill_ms(ranked._triton_step, ranked.new_cache, ids)
    for _ in range(4):
        for mode in rounds:
            reducer.skip_for_benchmark = mode == "skip"
            if mode == "barrier":
                reducer.all_reduce = types.MethodType(barrier_only, reducer)
            rounds[mode].append(graph_prefill_ms(ranked._triton_step, ranked.new_cache, ids))
            reducer.__dict__.pop("all_reduce", None)
            reducer.skip_for_benchmark = False
mine = {k: statistics.median(v) for k, v in rounds.items()}
every = [None] * world
dist.all_gather_object(every, dict(rank=rank, rounds=rounds, median=mine))
if rank == 0:
    out = dict(card=torch.cuda.get_device_name(), ranks=every)
    for r in every:
        print(r["rank"], {k: round(v, 3) for k, v in r["median"].items()}, flush=True)
    json.dump(out, open(sys.argv[1], "w"), indent=1)
dist.barrier()
os._exit(0)
