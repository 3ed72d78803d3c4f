"""CQIL over several GPUs: one process per GPU, rank r runs layer l_r of every group (docs/design.md).

* placement.py — which layers each rank holds;
* comm.py      — the group reduction (one-shot CUDA kernel or NCCL/gloo, on a communication stream)
                 and the bypass exchange;
* rank.py      — RankModel, one rank's model (SPMD: every rank runs the same program);
* driver.py    — ParallelCQILLlama, which starts and drives the ranks from one ordinary process:
                 `parallel.load(src, cqil, devices=[0, 1])` (also `CQILLlama.from_pretrained(..., devices=...)`).

Under torchrun: `device = init_from_env()`, then `RankModel.from_pretrained(src, cqil, device=device)`.
NVLink multicast (NVLS) is kept off in this process and every process it starts (launch.py).
"""

from __future__ import annotations

from .launch import MULTICAST_OFF, disable_multicast, end_rank, init_from_env

disable_multicast()

from .driver import ParallelCQILLlama, RankError, RemoteCache  # noqa: E402
from .placement import Placement  # noqa: E402
from .rank import RankModel  # noqa: E402


def load(src, cqil=None, *, devices, **options) -> ParallelCQILLlama:
    """A model whose group layers run on several devices, one process each (driver.ParallelCQILLlama):
    `src` a checkpoint path every rank can read, `devices` e.g. [0, 1] or ["cpu", "cpu"]; `options` are
    ParallelCQILLlama's (dtype, lora, backend, one_shot, output_device, timeout_s, ...)."""
    return ParallelCQILLlama(src, cqil, devices=devices, **options)


__all__ = ["ParallelCQILLlama", "Placement", "RankError", "RankModel", "RemoteCache", "disable_multicast",
           "end_rank", "init_from_env", "load", "MULTICAST_OFF"]
