"""Programmatic dependent launch (PDL, Hopper and later): the next kernel of a decode step is launched
while the current one finishes, instead of after it.

A kernel launched with `launch_pdl` may start before its predecessor on the stream has finished; it
must therefore wait (`wait_for_producer`, griddepcontrol.wait: the predecessor has completed and its
writes are visible) before it touches any memory — every kernel here calls it first thing, so reads and
writes alike are ordered, and the guarantee carries down the chain. Each kernel calls
`release_consumer` (griddepcontrol.launch_dependents) once its main loop is done, which lets the
hardware launch the next kernel's programs while this one stores its results and drains: the next
kernel's launch latency and ramp hide behind this one's tail. Kernels that are not ours (cuBLAS, torch
ops, the one-shot all-reduce) are launched without the attribute and order the stream as usual.

Two uses of the early start:
* a kernel whose grid fits on the GPU in one wave (at most two programs per SM: RoPE, attention in decode, the residual/norm, the
  merges: latency-bound, most SMs idle) releases its consumer right after its own wait
  (`EARLY_RELEASE`), so the next kernel's programs become resident on the idle SMs at once;
* a GEMM that starts early prefetches the first weight rows of its tile into L2 (`prefetch_l2`,
  PTX prefetch.global.L2) before it waits — weights are never written by a kernel, so this is safe —
  turning the memory bandwidth the small kernels leave idle into weight streaming.

On by default on CUDA devices of compute capability 9.0 and later; CQIL_PDL=0 turns both off and
CQIL_PREFETCH=0 only the prefetch (read at each launch, so a benchmark can compare them in one
process). Never under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from ._common import interpreting


@triton.jit
def wait_for_producer(USE_GDC: tl.constexpr):
    if USE_GDC:
        tl.extra.cuda.gdc_wait()


@triton.jit
def release_consumer(USE_GDC: tl.constexpr):
    if USE_GDC:
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def prefetch_l2(ptrs, mask, fallback):
    """Ask L2 for the lines at ptrs (masked-off lanes ask for `fallback`, a valid address)."""
    tl.inline_asm_elementwise("prefetch.global.L2 [$1];\n\tmov.b32 $0, 0;", "=r,l",
                              [tl.where(mask, ptrs, fallback)], dtype=tl.int32, is_pure=False, pack=1)


@functools.lru_cache(maxsize=None)
def _capable(index: int) -> bool:
    return torch.cuda.get_device_capability(index) >= (9, 0)


def pdl_enabled(device: torch.device) -> bool:
    if device.type != "cuda" or interpreting() or os.environ.get("CQIL_PDL", "1") == "0":
        return False
    return _capable(device.index if device.index is not None else torch.cuda.current_device())


def pdl_options(t: torch.Tensor, programs: int | None = None) -> dict:
    """Keyword arguments for a launch of one of our kernels on t's device: the USE_GDC constexpr and
    the launch attribute where PDL is on; with `programs` (the grid size), also EARLY_RELEASE: True
    when the grid fits in one wave (at most two programs per SM: every such kernel here fits two)."""
    on = pdl_enabled(t.device)
    options = {"USE_GDC": True, "launch_pdl": True} if on else {"USE_GDC": False}
    if programs is not None:
        options["EARLY_RELEASE"] = on and programs <= 2 * _sm_count(t.device.index)
    return options


def prefetch_enabled(t: torch.Tensor) -> bool:
    return pdl_enabled(t.device) and os.environ.get("CQIL_PREFETCH", "1") != "0"


@functools.lru_cache(maxsize=None)
def _sm_count(index: int | None) -> int:
    return torch.cuda.get_device_properties(index if index is not None else torch.cuda.current_device()
                                            ).multi_processor_count
