"""A/B in one process of the ranks' decode (LLaMA-7B, P=2 over [12,30)): head = one-shot without PDL and
partial products summed first (the code before); pdl = one-shot launched with PDL; fused = PDL + the
reduction forming residual + partials itself (CQIL_REDUCE_PARTIALS=1, the new default). Alternated
rounds; a new graph is captured per generate. Run from /tmp:
    torchrun --standalone --nproc-per-node 2 /tmp/partials_ab.py OUT.json
"""
import json, os, statistics, sys
import torch
import torch.distributed as dist
from cqil_kernels.bench import _time_ours, _warm_up_gpu, random_model, shape_args
from cqil_kernels.demo import parse_groups
from cqil_kernels.parallel import Placement, RankModel, init_from_env
import cqil_kernels.parallel.comm as comm
from cqil_kernels.ops._pdl import pdl_enabled

device = init_from_env()
rank, world = dist.get_rank(), dist.get_world_size()
_warm_up_gpu(device)
cqil = parse_groups("12-30:2", 0)
placement = Placement.build(rank, world, shape_args("llama-7b"), cqil)
model = random_model("llama-7b", torch.bfloat16, device, held_layers=placement.held_layers)
model.cqil, model.backend = cqil, "triton"
ranked = RankModel(model, placement)
ids = torch.randint(0, 32000, (1, 512), generator=torch.Generator().manual_seed(0)).to(device)
with torch.inference_mode():
    _time_ours(ranked, ids, 64, 1)
    # setting: (one-shot PDL, CQIL_REDUCE_PARTIALS)
    settings = {"head": (False, "0"), "pdl": (True, "0"), "fused": (True, "1"), "fused_nopdl": (False, "1")}
    rounds = {k: [] for k in settings}
    for _ in range(6):
        for name, (pdl, fuse) in settings.items():
            comm.pdl_enabled = pdl_enabled if pdl else (lambda d: False)
            os.environ["CQIL_REDUCE_PARTIALS"] = fuse
            dist.barrier()
            rounds[name].append(_time_ours(ranked, ids, 64, 2)[1])
    tokens = {}
    for name, (pdl, fuse) in settings.items():
        comm.pdl_enabled = pdl_enabled if pdl else (lambda d: False)
        os.environ["CQIL_REDUCE_PARTIALS"] = fuse
        tokens[name] = ranked.generate(ids, 32)
ranked.reducer.check_health()
if rank == 0:
    out = dict(card=torch.cuda.get_device_name(), rounds=rounds,
               median={k: statistics.median(v) for k, v in rounds.items()},
               calls=dict(ranked.reducer.calls), same_tokens=all(bool(torch.equal(tokens["head"], t)) for t in tokens.values()))
    print(json.dumps(out), flush=True)
    json.dump(out, open(sys.argv[1], "w"), indent=1)
dist.barrier()
sys.stdout.flush()
os._exit(0)
