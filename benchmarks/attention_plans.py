"""A prompt's attention timed alone under other tile plans than ops/attention.py's _plan (BLOCK_M, BLOCK_N,
warps), beside each plan's registers and spills (benchmarks/kernel_registers.py) and the shipped plan. For
LLaMA-7B's head dim of 128 the shipped 64-row tiles with 4 warps spill ~500 bytes a thread on sm_90a; the
same tiles with 8 warps spill nothing (docs/performance.md, "Registers and spills").

    python benchmarks/attention_plans.py --shape llama-7b --rows 512 --rows 2048 --rows 4096 \\
        --plan 64,64,8 --plan 64,128,8 --plan 128,64,8 --out attention_plans.json

One layer (P = 1), batch 1, bf16, a causal prompt of --rows tokens into an empty cache of as many positions.
Each plan, the shipped one first, is timed as replay.median_us times it (a CUDA graph of CALLS launches, CUDA
events, the median of --rounds replays), the plans alternated over --passes passes, the median taken.
Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
from pathlib import Path

import kernel_registers  # benchmarks/ (the script's folder)
import replay

DEVICE = "cuda"  # (tests run the loop on the CPU, with the timing replaced)


@contextlib.contextmanager
def forced_plan(block_m: int, block_n: int, warps: int):
    """ops.attention's plan for prompts (more than 16 query rows per kv head) replaced by these tiles and warps
    inside the block; decode's plan as it is."""
    from cqil_kernels.ops import attention

    shipped = attention._plan

    def plan(P, B, Hkv, T, G, Dh, dtype, num_splits, sms=None):
        if T * G <= 16:
            return shipped(P, B, Hkv, T, G, Dh, dtype, num_splits, sms)
        return block_m, block_n, 1, warps

    attention._plan = plan
    try:
        yield
    finally:
        attention._plan = shipped


def prompt_inputs(shape: dict, rows: int, device, dtype):
    """(op, make_inputs, bytes moved, flops) of one layer's prompt attention for a shape (H, Hkv, Dh)."""
    import torch

    from cqil_kernels.ops.attention import group_attention

    H, Hkv, Dh = shape["H"], shape["Hkv"], shape["Dh"]

    def make():
        q = torch.randn(1, 1, rows, H, Dh, device=device, dtype=dtype)
        k = torch.randn(1, 1, Hkv, rows, Dh, device=device, dtype=dtype)
        v = torch.randn(1, 1, Hkv, rows, Dh, device=device, dtype=dtype)
        valid = torch.ones(1, rows, dtype=torch.bool, device=device)
        return q, k, v, valid, torch.zeros(1, dtype=torch.int32, device=device), torch.empty_like(q)

    def op(q, k, v, valid, start, out):
        return group_attention(q, k, v, valid, start, out=out)

    nbytes = 2 * (2 * rows * H * Dh + 2 * rows * Hkv * Dh)
    flops = 2 * rows * rows * H * Dh  # QK^T and PV over the causal half: 2 x (2 T^2 H Dh) / 2
    return op, make, nbytes, flops


def parse_plan(text: str) -> tuple[int, int, int]:
    parts = tuple(int(v) for v in text.split(","))
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"a plan is BLOCK_M,BLOCK_N,warps, got {text!r}")
    return parts


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", action="append", help="cqil bench's shapes (default llama-7b)")
    parser.add_argument("--rows", action="append", type=int, help="prompt tokens (default 512 2048)")
    parser.add_argument("--plan", action="append", type=parse_plan, default=[],
                        help="BLOCK_M,BLOCK_N,warps to time beside the shipped plan (repeatable)")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--passes", type=int, default=2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)

    import torch

    from cqil_kernels.bench import shape_args
    from cqil_kernels.ops import attention

    if DEVICE == "cuda" and not torch.cuda.is_available():
        raise SystemExit("attention_plans.py times kernels: it needs a CUDA GPU")
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    rows_out = []
    for name in args.shape or ["llama-7b"]:
        a = shape_args(name)
        shape = dict(H=a.num_attention_heads, Hkv=a.num_key_value_heads, Dh=a.head_dim)
        G = shape["H"] // shape["Hkv"]
        for rows in args.rows or [512, 2048]:
            bm, bn, _, warps = attention._plan(1, 1, shape["Hkv"], rows, G, shape["Dh"], dtype, None)
            plans = list(dict.fromkeys([(bm, bn, warps), *args.plan]))
            op, make, nbytes, flops = prompt_inputs(shape, rows, DEVICE, dtype)
            times = {plan: [] for plan in plans}
            for _ in range(args.passes):
                for plan in plans:
                    with forced_plan(*plan):
                        times[plan].append(replay.median_us(op, make, nbytes, args.rounds))
            for plan in plans:
                constexprs = kernel_registers.attention_constexprs(shape["Dh"], plan[0], plan[1], split=False)
                facts = kernel_registers.compile_facts("attention", "_attention_kernel", constexprs,
                                                       kernel_registers.ATTENTION_POINTERS, plan[2], 3)
                us = statistics.median(times[plan])
                row = [name, rows, f"{plan[0]}x{plan[1]} w{plan[2]}", plan == (bm, bn, warps), round(us, 2),
                       round(flops / us / 1e6, 1), [round(t, 2) for t in times[plan]], facts["registers"],
                       facts["spill_stores"]]
                print(" | ".join(str(v) for v in row), flush=True)
                rows_out.append(row)
    if args.out:
        replay.write_record(
            args.out, title="A prompt's attention under other tile plans", doc=__doc__, script="attention_plans.py",
            argv=argv if argv is not None else sys.argv[1:], rows=rows_out,
            columns=["shape", "prompt tokens", "plan", "shipped", "us per launch", "TFLOP/s", "passes (us)",
                     "registers", "spill stores (bytes)"])


if __name__ == "__main__":
    main()
