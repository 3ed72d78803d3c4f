"""What one kernel launch costs the host by each way of making it (issue 24: where no CUDA graph serves a step
— its first run, its capture, an odd batch, the graphs turned off — could a launch cost a few us instead
of the ~40 us our op wrappers take?).

    python benchmarks/launch_paths.py --out launch_paths.json

One small kernel of ours (group_rms_norm's, [M, D] -> [P, M, D], PDL attribute as the product launches it)
launched N times in a row while the GPU sleeps (so no launch waits for the device and the queue never fills),
the host's median us per launch over --rounds rounds, by:
* op: the public op (cqil_kernels.ops.group_rms_norm: argument checks, then Triton's JIT launch);
* jit: the Triton kernel called directly (Triton's binder: specialisation key, cache lookup, launch);
* launcher: the compiled kernel's launcher called with the arguments bound once (what "the compiled
  kernels' launcher called directly with arguments prepared once per shape" would cost);
* graph: a CUDA graph of one launch, replayed;
* torch add: a torch elementwise op on a small tensor (the floor of a launch from Python).
Every path's output is compared with the op's (the same kernel: equal bit for bit).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def per_launch_us(fn, n: int, rounds: int, sleep_cycles: int) -> float:
    """Median over `rounds` of the host us per call of n calls of fn(), queued behind a GPU sleep."""
    per = []
    for _ in range(rounds):
        torch.cuda.synchronize()
        torch.cuda._sleep(sleep_cycles)
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        per.append((time.perf_counter() - t0) * 1e6 / n)
        torch.cuda.synchronize()
    return statistics.median(per)


def main(argv=None) -> None:
    from cqil_kernels.bench import _commit, _warm_up_gpu, write_record
    from cqil_kernels.ops import rms_norm as rms
    from cqil_kernels.ops._common import next_pow2
    from cqil_kernels.ops._pdl import pdl_options

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--dim", type=int, default=576)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--n", type=int, default=200, help="launches per round")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("launch_paths measures CUDA launches and needs a CUDA device")
    if min(a.rows, a.dim, a.layers, a.n, a.rounds) < 1:
        raise SystemExit("rows, dim, layers, n and rounds must be >= 1")
    device, commit = torch.device("cuda"), _commit()
    _warm_up_gpu(device, 1.0)
    x = torch.randn(a.rows, a.dim, device=device, dtype=torch.bfloat16)
    w = torch.randn(a.layers, a.dim, device=device, dtype=torch.bfloat16)
    out = torch.empty(a.layers, a.rows, a.dim, device=device, dtype=torch.bfloat16)
    eps = 1e-5
    want = rms.group_rms_norm(x, w, eps=eps)
    meta = dict(BLOCK_D=next_pow2(a.dim), num_warps=4 if a.dim <= 2048 else 8, **pdl_options(x))
    args = (x, w, out, a.layers, a.dim, float(eps), x.stride(0), w.stride(0), out.stride(0), out.stride(1))

    def jit():
        return rms._rms_norm_kernel[(a.rows,)](*args, **meta)

    compiled = jit()
    stream = torch.cuda.current_stream().cuda_stream
    # the launcher's arguments: every kernel argument in signature order, constexprs included (ignored)
    bound = (*args, meta["BLOCK_D"], meta["USE_GDC"])

    def launcher():
        compiled.run(a.rows, 1, 1, stream, compiled.function, compiled.packed_metadata, None, None, None, *bound)

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        rms.group_rms_norm(x, w, eps=eps, out=out)
    small = torch.zeros(256, device=device)
    paths = {"op": lambda: rms.group_rms_norm(x, w, eps=eps, out=out), "jit": jit, "launcher": launcher,
             "graph": graph.replay, "torch add": lambda: small.add_(1)}
    rows = []
    sleep_cycles = 400_000 * a.n  # ~0.2 ms a launch at H100 clocks: longer than any path's host time
    for name, fn in paths.items():
        out.zero_()
        fn()
        torch.cuda.synchronize()
        same = None if name == "torch add" else bool(torch.equal(out, want))
        us = per_launch_us(fn, a.n, a.rounds, sleep_cycles)
        rows.append([name, round(us, 2), same])
        print(f"{name:10s} {us:8.2f} us per launch  output equal to the op's: {same}", flush=True)
    if any(same is False for _, _, same in rows):
        raise SystemExit("a launch path wrote something other than the op's output")
    columns = ["path", "host us per launch", "output equal to the op's"]
    if a.out:
        write_record(a.out, device=device, commit=commit, title="What one kernel launch costs the host, by path",
                     what=f"group_rms_norm's kernel, bf16 [{a.rows}, {a.dim}] -> [{a.layers}, {a.rows}, {a.dim}], "
                          f"median over {a.rounds} rounds of {a.n} launches queued behind a GPU sleep; see "
                          "benchmarks/launch_paths.py's docstring", columns=columns, rows=rows)


if __name__ == "__main__":
    main()
