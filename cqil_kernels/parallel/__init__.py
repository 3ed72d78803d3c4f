"""CQIL over several GPUs: one process per GPU, rank r runs layer l_r of every group (DESIGN.md, "P GPUs").

* placement.py — which layers each rank holds;
* comm.py      — the group reduction (one-shot CUDA kernel or NCCL/gloo, on a communication stream)
                 and the bypass exchange;
* rank.py      — RankModel, one rank's model (SPMD: every rank runs the same program);
* driver.py    — ParallelCQILLlama, which starts and drives the ranks from one ordinary process
                 (`CQILLlama.from_pretrained(..., devices=[0, 1])`).

Under torchrun: `device = init_from_env()`, then `RankModel.from_pretrained(src, cqil, device=device)`.
NVLink multicast (NVLS) is kept off in this process and every process it starts (see DESIGN.md).
"""

from __future__ import annotations

import os
from datetime import timedelta

MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def disable_multicast() -> None:
    """Set the variables that keep NVLink multicast off, where the user has not set them."""
    for key, value in MULTICAST_OFF.items():
        os.environ.setdefault(key, value)


disable_multicast()


def init_from_env(backend: str | None = None, timeout_s: float = 600.0):
    """Join the process group described by torch.distributed's launch variables (torchrun: RANK,
    WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT; env://) and return this rank's device: cuda:LOCAL_RANK
    when CUDA is available (backend NCCL), else cpu (gloo). ValueError before joining when LOCAL_RANK is
    not a visible GPU."""
    import torch
    import torch.distributed as dist

    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise ValueError(f"not launched by torchrun (or another env:// launcher): {', '.join(missing)} unset")
    local_rank = int(os.environ.get("LOCAL_RANK", os.environ["RANK"]))
    use_cuda = torch.cuda.is_available() and backend != "gloo"
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPU(s) are visible: "
                             f"more ranks per node than GPUs")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend or ("nccl" if use_cuda else "gloo"), init_method="env://",
                                timeout=timedelta(seconds=timeout_s))
    return device


from .driver import ParallelCQILLlama, RankError, RemoteCache  # noqa: E402
from .placement import Placement  # noqa: E402
from .rank import RankModel  # noqa: E402

__all__ = ["ParallelCQILLlama", "Placement", "RankError", "RankModel", "RemoteCache", "disable_multicast",
           "init_from_env"]
