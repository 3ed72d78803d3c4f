"""pytest-benchmark helpers for the kernel comparisons (GPU only; every benchmark skips without one).

Run: pytest benchmarks --benchmark-json=out.json, then python benchmarks/summarize.py out.json.
Each benchmark replays a CUDA graph of CALLS back-to-back calls (decode runs from graphs, so launch
gaps are not what we compare) cycling over enough copies of the inputs that they do not stay in L2;
pytest-benchmark times rounds of one replay + synchronize, and extra_info holds the median
microseconds per call and the achieved GB/s over the bytes the op must move.
"""

from __future__ import annotations

import pytest
import torch

from cqil_kernels import envs
from replay import CALLS, capture_calls

SHAPES = {  # hidden D, heads H, kv heads Hkv, head dim Dh, intermediate F, vocabulary V
    "llama7b": dict(D=4096, H=32, Hkv=32, Dh=128, F=11008, V=32000),
    "smollm2": dict(D=576, H=9, Hkv=3, Dh=64, F=1536, V=49152),
}


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="kernel benchmarks need a CUDA GPU")
        for item in items:
            item.add_marker(skip)


def op_cases(P_values=(1, 2, 4), T_values=(1, 512)):
    """The grid every op benchmark runs over: shape x P x T x (fused | torch)."""
    def apply(bench):
        for name, values in [("impl", ["fused", "torch"]), ("T", list(T_values)), ("P", list(P_values)),
                             ("shape", list(SHAPES))]:
            bench = pytest.mark.parametrize(name, values)(bench)
        return bench
    return apply


def gpu_benchmark(benchmark, make_inputs, op, *, nbytes: int) -> None:
    """Benchmark op(*inputs) where make_inputs() builds one fresh input set of `nbytes` moved bytes."""
    graph, copies = capture_calls(make_inputs, op, nbytes)

    def replay():
        graph.replay()
        torch.cuda.synchronize()

    benchmark.pedantic(replay, rounds=40, warmup_rounds=5, iterations=1)
    us = benchmark.stats.stats.median / CALLS * 1e6
    benchmark.extra_info.update(us_per_call=round(us, 3), gbps=round(nbytes / us / 1e3, 1),
                                nbytes=nbytes, input_copies=copies, calls_per_round=CALLS,
                                card=torch.cuda.get_device_name(),
                                commit=envs.get("CQIL_COMMIT") or "unknown")


def randn(*shape, dtype=torch.bfloat16, scale=1.0):
    return scale * torch.randn(*shape, device="cuda", dtype=dtype)


def rms_norm(x, weight, eps=1e-5):
    """The torch backend's RMSNorm (model.RMSNorm), as a function."""
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
