"""EXPERIMENT for P6: one-shot all-reduce vs NCCL from 8 KB to 8 MB, inside CUDA graphs, plus a bit-for-bit
check against dist.all_reduce at every size. Run under torchrun from /tmp (not from .base: stale package):
    torchrun --standalone --nproc-per-node 2 /tmp/reduce_sizes.py OUT.json LABEL
"""
import json, statistics, sys
import torch
import torch.distributed as dist
from cqil_kernels.parallel import init_from_env
from cqil_kernels.parallel.comm import GroupReducer

SIZES = [8 << 10, 64 << 10, 256 << 10, 512 << 10, 1 << 20, 2 << 20, 4 << 20, 8 << 20]


def graph_us(fn, calls=20, replays=30):
    fn(); torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(calls):
            fn()
    dist.barrier()
    times = []
    for _ in range(replays):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); g.replay(); b.record(); b.synchronize()
        times.append(a.elapsed_time(b))
    return 1000 * statistics.median(times) / calls


device = init_from_env()
rank, world = dist.get_rank(), dist.get_world_size()
reducer = GroupReducer(device, max_bytes=max(SIZES))
rows = []
for nbytes in SIZES:
    n = nbytes // 2
    gen = torch.Generator(device="cpu").manual_seed(rank * 1000 + n)
    x = torch.randint(-8, 9, (n,), generator=gen).to(device, torch.bfloat16)  # exact sums in bf16
    ref = x.clone(); dist.all_reduce(ref)
    got = x.clone(); reducer.all_reduce(got); torch.cuda.synchronize()
    exact = bool(torch.equal(ref, got))
    y = torch.randn(n, device=device, dtype=torch.bfloat16)
    row = dict(bytes=nbytes, exact=exact, path=reducer.policy(y)[0],
               nccl_us=graph_us(lambda: dist.all_reduce(y)), one_shot_us=graph_us(lambda: reducer.all_reduce(y)))
    rows.append(row)
    if rank == 0:
        print(f"{nbytes:>8} B: exact {exact}  nccl {row['nccl_us']:7.2f} us  one-shot {row['one_shot_us']:7.2f} us",
              flush=True)
reducer.check_health()
if rank == 0:
    json.dump(dict(card=torch.cuda.get_device_name(), world=world, label=sys.argv[2], rows=rows),
              open(sys.argv[1], "w"), indent=1)
