"""Programmatic dependent launch (PDL, Hopper and later): the next kernel of a decode step is launched
while the current one finishes, instead of after it.

A kernel launched with `launch_pdl` may start before its predecessor on the stream has finished; it
must therefore wait (`wait_for_producer`, griddepcontrol.wait: the predecessor has completed and its
writes are visible) before it touches any memory — every kernel here calls it first thing, so reads and
writes alike are ordered, and the guarantee carries down the chain. One exception, argued where it is
made: decode attention, when its caller vouches for it, reads what its predecessor (rope_kv) never
writes before it waits (ops/attention.py, "Keys read before the wait"). A kernel's programs start only
once every program of the one before has passed its own wait, so everything launched two or more
kernels back is complete by then. tests/ops/test_pdl.py reads both orders in every kernel's compiled code.
Each kernel calls `release_consumer` (griddepcontrol.launch_dependents) once its main loop is done
(rope_kv in decode: as soon as it has waited), which lets the hardware launch the next kernel's programs
while this one stores its results and drains: the next kernel's launch latency and ramp hide behind this
one's tail. Kernels that are not ours (cuBLAS, torch ops, the one-shot all-reduce) are launched without the
attribute and order the stream as usual.

On by default on CUDA devices of compute capability 9.0 and later; CQIL_PDL=0 turns it off (envs.py).
Never under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .. import envs
from ._common import interpreting


@triton.jit
def wait_for_producer(USE_GDC: tl.constexpr):
    if USE_GDC:
        tl.extra.cuda.gdc_wait()


@triton.jit
def release_consumer(USE_GDC: tl.constexpr):
    if USE_GDC:
        tl.extra.cuda.gdc_launch_dependents()


@functools.lru_cache(maxsize=None)
def _capable(index: int) -> bool:
    return torch.cuda.get_device_capability(index) >= (9, 0)


def pdl_enabled(device: torch.device) -> bool:
    if device.type != "cuda" or interpreting() or not envs.get("CQIL_PDL"):
        return False
    return _capable(device.index if device.index is not None else torch.cuda.current_device())


def pdl_options(t: torch.Tensor) -> dict:
    """Keyword arguments for a launch of one of our kernels on t's device: the USE_GDC constexpr, and
    the launch attribute where PDL is on."""
    return {"USE_GDC": True, "launch_pdl": True} if pdl_enabled(t.device) else {"USE_GDC": False}
