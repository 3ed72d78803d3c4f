"""Checks of the one-shot and copy-engine all-reduces on real GPUs, one process per GPU
(tests/test_parallel_cuda.py runs this under torchrun and reads its exit code and output).

    torchrun --standalone --nproc-per-node 2 tests/gpu_workers/one_shot_check.py exact|timeout|one_gpu

one_gpu: the exact checks with every rank on GPU 0 and gloo for torch.distributed (the ranks map each
other's buffers by CUDA IPC on one device): the protocols run where only one GPU is lent; their speed
means nothing there.
"""

import os
import sys

import torch
import torch.distributed as dist

from cqil_kernels.parallel import init_from_env
from cqil_kernels.parallel.comm import GroupReducer


def reference(x: torch.Tensor) -> torch.Tensor:
    """dist.all_reduce of a copy of x; through the host where the backend is gloo."""
    if dist.get_backend() == "nccl":
        ref = x.clone()
        dist.all_reduce(ref)
        return ref
    ref = x.cpu()
    dist.all_reduce(ref)
    return ref.to(x.device)


def exact(device) -> None:
    """Integer-valued inputs (exact in any summation order): one-shot == dist.all_reduce bit for bit,
    eagerly and replayed from a CUDA graph with new inputs, in every dtype; fallbacks say why."""
    rank = dist.get_rank()
    reducer = GroupReducer(device, one_shot=True, timeout_s=60)
    limit = reducer.one_shot_policy.max_bytes
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        size = torch.finfo(dtype).bits // 8
        # odd counts of 16-byte units (slices that end inside a thread's 4-unit step) up to the largest
        # message the policy sends through the one-shot kernel
        sizes = (8, 4096, 4104, 65536, 16 * 12_345 + 8, 2_000_008, limit // size)
        for numel in sorted({n for n in sizes if n * size <= limit}):
            g = torch.Generator(device=device).manual_seed(1000 * rank + numel)
            x = torch.randint(-64, 64, (numel,), generator=g, device=device).to(dtype)
            expected = reference(x)
            path, why = reducer.policy(x)
            assert path == "one_shot", (dtype, numel, why)
            got = x.clone()
            reducer.all_reduce(got)
            assert torch.equal(got, expected), (dtype, numel, "eager")
            # in a CUDA graph: capture 3 calls, replay with fresh inputs
            static = x.clone()
            outs = []
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for _ in range(3):
                    y = static * 1
                    reducer.all_reduce(y)
                    outs.append(y)
            for trial in range(4):
                new = torch.randint(-64, 64, (numel,), generator=g, device=device).to(dtype)
                static.copy_(new)
                graph.replay()
                ref = reference(new)
                for y in outs:
                    assert torch.equal(y, ref), (dtype, numel, "graph", trial)
    big = torch.ones(limit // 4 + 4, dtype=torch.float32, device=device)
    path, why = reducer.policy(big)
    assert path == reducer.backend and "one-shot limit" in why, why
    assert reducer.policy(torch.ones(4097, dtype=torch.bfloat16, device=device)[1:])[0] == reducer.backend
    if reducer.backend == "nccl":  # the fallback itself (one_gpu's gloo is not run on CUDA tensors)
        reducer.all_reduce(big)
        assert torch.equal(big, torch.full_like(big, dist.get_world_size()))
    partials(device, reducer)
    copy_engine(device)
    reducer.check_health()
    print(f"rank {rank}: one-shot exact OK, calls {reducer.calls}", flush=True)


def copy_engine(device) -> None:
    """all_reduce_async through the copy engines (csrc/copy_engine.cu): integer-valued inputs equal
    dist.all_reduce bit for bit in every dtype, with several calls in flight at once (more than the
    two slots, so the busy flags must hold a sender back), beside compute on the current stream,
    eagerly and replayed from a CUDA graph with new inputs; larger messages fall back, saying why."""
    rank = dist.get_rank()
    reducer = GroupReducer(device, one_shot=True, copy_engine=True, timeout_s=60)
    limit = reducer.copy_engine_policy.max_bytes
    a = torch.randn(2048, 2048, device=device)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        size = torch.finfo(dtype).bits // 8
        for numel in (8, 4104, 16 * 12_345 + 8, 256 * 4096, limit // size):
            g = torch.Generator(device=device).manual_seed(7000 * rank + numel)
            fresh = lambda: [torch.randint(-64, 64, (numel,), generator=g, device=device).to(dtype)  # noqa: E731
                             for _ in range(5)]

            def expected(xs):
                return [reference(x) for x in xs]

            xs = fresh()
            assert all(reducer.policy(x, overlapped=True)[0] == "copy_engine" for x in xs), (dtype, numel)
            refs = expected(xs)
            got = [x.clone() for x in xs]
            pending = []
            for y in got:
                pending.append(reducer.all_reduce_async(y))
                a = torch.tanh(a @ a)  # compute on the current stream while the reductions run
            for p in pending:
                p.wait()
            assert all(torch.equal(y, ref) for y, ref in zip(got, refs)), (dtype, numel, "eager")
            static = fresh()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                outs = [x * 1 for x in static]
                pending = [reducer.all_reduce_async(y) for y in outs]
                for p in pending:
                    p.wait()
            for trial in range(3):
                new = fresh()
                for x, n in zip(static, new):
                    x.copy_(n)
                graph.replay()
                refs = expected(new)
                assert all(torch.equal(y, ref) for y, ref in zip(outs, refs)), (dtype, numel, "graph", trial)
    big = torch.ones(limit // 2 + 8, dtype=torch.bfloat16, device=device)
    path, why = reducer.policy(big, overlapped=True)
    assert path != "copy_engine" and "copy-engine limit" in why, why
    if reducer.backend == "nccl":
        reducer.all_reduce_async(big).wait()
        assert torch.equal(big, torch.full_like(big, dist.get_world_size()))
    assert reducer.calls["copy_engine"] > 0
    print(f"rank {rank}: copy-engine exact OK", flush=True)


def partials(device, reducer) -> None:
    """all_reduce_sum: each rank's term residual + parts[0] + ... formed inside the kernel (fp32, in that
    order, rounded once) and the terms summed over the ranks in rank order in fp32, rounded once — the
    same bits as forming the terms with torch and summing the gathered terms so; eagerly and replayed from
    a CUDA graph with new inputs; random (not integer) values."""
    rank, world = dist.get_rank(), dist.get_world_size()

    def expected(parts, residual, dtype):
        term = residual.clone()
        for part in parts:
            term += part
        on = "cpu" if dist.get_backend() == "gloo" else term.device
        every = [torch.empty_like(term.to(dtype), device=on) for _ in range(world)]
        dist.all_gather(every, term.to(dtype).to(on))
        total = torch.zeros_like(term)
        for t in every:
            total += t.to(term.device).float()
        return total.to(dtype)

    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for numel in (576, 4096, 4104, 3 * 4096 + 8):
            for n in (1, 2, 3):
                g = torch.Generator(device=device).manual_seed(100 * rank + 10 * n + numel)
                fresh = lambda: (torch.randn(n, numel, generator=g, device=device),  # noqa: E731
                                 torch.randn(numel, generator=g, device=device) * 4)
                parts, residual = fresh()
                got = torch.full((numel,), float("nan"), dtype=dtype, device=device)
                reducer.all_reduce_sum(parts, residual, got)
                assert torch.equal(got, expected(parts, residual, dtype)), (dtype, numel, n, "eager")
                static = fresh()
                outs = [torch.empty(numel, dtype=dtype, device=device) for _ in range(2)]
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    for out in outs:
                        reducer.all_reduce_sum(static[0] * 1, static[1] * 1, out)
                for trial in range(3):
                    new = fresh()
                    static[0].copy_(new[0]), static[1].copy_(new[1])
                    graph.replay()
                    ref = expected(*new, dtype)
                    assert all(torch.equal(out, ref) for out in outs), (dtype, numel, n, "graph", trial)
    print(f"rank {rank}: one-shot partial sums exact", flush=True)


def timeout(device) -> None:
    """Rank 1 never calls: rank 0's one-shot kernel gives up after its timeout instead of hanging."""
    reducer = GroupReducer(device, one_shot=True, timeout_s=2.0)
    x = torch.ones(4096, dtype=torch.bfloat16, device=device)
    if dist.get_rank() == 0:
        reducer.all_reduce(x)
        torch.cuda.synchronize()
        assert reducer._one_shot.timed_out()
        try:
            reducer.check_health()
        except RuntimeError as e:
            print(f"rank 0: {e}", flush=True)
        else:
            raise AssertionError("check_health did not raise")
    else:
        import time

        time.sleep(8)  # stay alive (own buffer mapped) while rank 0 waits in vain
    print(f"rank {dist.get_rank()}: timeout OK", flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "one_gpu":
        from datetime import timedelta

        device = torch.device("cuda", 0)
        torch.cuda.set_device(device)
        dist.init_process_group("gloo", init_method="env://", timeout=timedelta(seconds=300))
        exact(device)
    else:
        device = init_from_env()
        {"exact": exact, "timeout": timeout}[sys.argv[1]](device)
    sys.stdout.flush()
    os._exit(0)
