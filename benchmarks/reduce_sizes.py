"""Group reduction latency by message size: our one-shot all-reduce vs NCCL, inside CUDA graphs, with a
bit-for-bit check against dist.all_reduce at every size (integer-valued bf16 inputs, so the sums are exact).

    torchrun --standalone --nproc-per-node N benchmarks/reduce_sizes.py --out reduce.json

Rank 0 prints one line per size and writes a record (card, date, commit, command, rows).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys

import torch
import torch.distributed as dist

from cqil_kernels.bench import _commit
from cqil_kernels.parallel import end_rank, init_from_env
from cqil_kernels.parallel.comm import GroupReducer
from parallel_e2e import graph_us

SIZES = [8 << 10, 64 << 10, 256 << 10, 512 << 10, 1 << 20, 2 << 20, 4 << 20, 8 << 20]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="JSON record (rank 0)")
    args = ap.parse_args()
    device = init_from_env()
    rank, world = dist.get_rank(), dist.get_world_size()
    reducer = GroupReducer(device, max_bytes=max(SIZES))
    rows = []
    for nbytes in SIZES:
        n = nbytes // 2
        gen = torch.Generator(device="cpu").manual_seed(rank * 1000 + n)
        x = torch.randint(-8, 9, (n,), generator=gen).to(device, torch.bfloat16)
        expected = x.clone()
        dist.all_reduce(expected)
        got = x.clone()
        reducer.all_reduce(got)
        torch.cuda.synchronize()
        y = torch.randn(n, device=device, dtype=torch.bfloat16)
        row = dict(bytes=nbytes, exact=bool(torch.equal(expected, got)), path=reducer.policy(y)[0],
                   nccl_us=round(graph_us(lambda: dist.all_reduce(y)), 2),
                   one_shot_us=round(graph_us(lambda: reducer.all_reduce(y)), 2))
        rows.append(row)
        if rank == 0:
            print(f"{nbytes:>8} B: exact {row['exact']}  NCCL {row['nccl_us']:7.2f} us  one-shot "
                  f"{row['one_shot_us']:7.2f} us", flush=True)
    reducer.check_health()
    if rank == 0 and args.out:
        record = dict(title=f"Group reduction latency by size, {world} GPUs",
                      what="bf16, inside a CUDA graph, median of 30 replays of 20 calls",
                      card=torch.cuda.get_device_name(), date=datetime.date.today().isoformat(), commit=_commit(),
                      command=f"torchrun --nproc-per-node {world} benchmarks/reduce_sizes.py {' '.join(sys.argv[1:])}",
                      source="this file", columns=["bytes", "exact", "path", "NCCL us", "one-shot us"],
                      rows=[[r["bytes"], r["exact"], r["path"], r["nccl_us"], r["one_shot_us"]] for r in rows])
        with open(args.out, "w") as f:
            json.dump(record, f, indent=1)
    end_rank()


if __name__ == "__main__":
    main()
