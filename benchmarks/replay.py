"""What the kernel benchmarks time: CALLS back-to-back calls of an op captured in one CUDA graph (decode runs from
graphs, so launch gaps are not what they compare), cycling over enough copies of the inputs that they do not
stay in L2. Shared by benchmarks/conftest.py (pytest-benchmark), gemm_configs.py and attention_plans.py (median_us:
CUDA events)."""

from __future__ import annotations

import json
import time

import torch

from cqil_kernels.ops._common import capture_launches, input_copies, replay_median_us

CALLS = 24


def capture_calls(make_inputs, op, nbytes: int) -> tuple[torch.cuda.CUDAGraph, int]:
    """(graph of CALLS calls of op, the number of input copies it cycles over); make_inputs() builds one input
    set of `nbytes` moved bytes. op runs once first, outside the graph (compiles, autotunes)."""
    copies = input_copies(nbytes, CALLS)
    sets = [make_inputs() for _ in range(copies)]
    op(*sets[0])
    graph = capture_launches(lambda i: op(*sets[i % copies]), CALLS)
    graph.inputs = sets  # the graph reads them: kept as long as it is
    return graph, copies


def median_us(op, make_inputs, nbytes: int, rounds: int) -> float:
    """Median microseconds per call over `rounds` replays of capture_calls' graph, timed with CUDA events (three
    replays first, untimed)."""
    graph, _ = capture_calls(make_inputs, op, nbytes)
    return replay_median_us(graph, CALLS, rounds)


def write_record(out, *, title: str, doc: str, script: str, argv: list[str], columns: list[str], rows: list) -> None:
    """A sweep's table record (benchmarks/tables.py draws it) at `out`: its title, `doc` (the script's docstring) as
    what it measures, the card, today's date, CQIL_COMMIT and the command line."""
    from cqil_kernels import envs

    out.write_text(json.dumps(dict(
        title=title, what=" ".join(doc.split()), card=torch.cuda.get_device_name(), date=time.strftime("%Y-%m-%d"),
        commit=envs.get("CQIL_COMMIT") or "unknown", source="this file", command=" ".join([script, *argv]),
        columns=columns, rows=rows), indent=1) + "\n")
    print(f"wrote {out}")
