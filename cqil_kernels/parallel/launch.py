"""Joining a process group, and the environment every multi-GPU process runs with (NVLink multicast off)."""

from __future__ import annotations

import os
import sys
from datetime import timedelta

MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def disable_multicast() -> None:
    """Set the variables that keep NVLink multicast off, where the user has not set them."""
    for key, value in MULTICAST_OFF.items():
        os.environ.setdefault(key, value)


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


def end_rank(code: int = 0) -> None:
    """End a torchrun rank's process once its work is done: flush the output, then leave without the
    interpreter's shutdown. At that shutdown torch.distributed's threads have aborted the process (gloo:
    "terminate called without an active exception") or hung (NCCL, after destroy_process_group) while a
    peer was already gone; the driver's rank processes end the same way."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
