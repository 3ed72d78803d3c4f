"""What every launcher checks and every kernel needs to know about where it runs."""

from __future__ import annotations

import contextlib
import functools
import os
import threading

import torch

from .. import envs

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# Triton decides between compiling and interpreting as each kernel is defined (triton.jit reads
# TRITON_INTERPRET then), so the mode is the one in force when cqil_kernels.ops was imported; setting
# the variable later changes nothing. Read once: the launchers ask at every launch.
_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def interpreting() -> bool:
    """True when Triton runs our kernels in its CPU interpreter (TRITON_INTERPRET=1 at import)."""
    return _INTERPRETED


def autotuning() -> bool:
    """Whether kernels autotune over several configs (envs: CQIL_AUTOTUNE)."""
    return envs.get("CQIL_AUTOTUNE")


def autotune_disk_cache() -> dict:
    """triton.autotune's keyword that keeps each key's config timings on disk, where Triton has it (3.4 and
    later: `cache_results`, in Triton's cache dir, keyed by the kernel's source, the GPU target, the tuning
    key and the configs), so that a later process (`cqil eval` after `cqil calibrate`, a restarted server)
    takes the config without timing every one again; {} on older Triton. Only keys with more than one
    config after pruning are timed and cached (never under the interpreter or with CQIL_AUTOTUNE=0)."""
    import inspect

    import triton

    return {"cache_results": True} if "cache_results" in inspect.signature(triton.autotune).parameters else {}


def untimed_bench():
    """The autotuner's do_bench under the interpreter, which has no device to time on: there every
    launch's pruned config list holds one config (one per row class), so the figure is never compared.
    None (Triton's own timer) elsewhere."""
    if not interpreting():
        return None
    return lambda kernel_call, quantiles: [0.0] * len(quantiles)


def input_copies(nbytes: int, calls: int, device: torch.device | None = None) -> int:
    """How many copies of `nbytes` of inputs `calls` back-to-back launches cycle over so that each launch reads
    them from memory, not from L2: enough for 2.5 times the device's L2 cache (at most `calls`, at least 1)."""
    props = torch.cuda.get_device_properties(device) if torch.cuda.is_available() else None
    l2 = getattr(props, "L2_cache_size", 0) or 50 * 2**20  # (the H100's 50 MiB where torch does not say)
    return max(1, min(calls, -(-5 * l2 // max(2 * nbytes, 1))))


# Every CUDA graph of the package is captured in torch's "thread_local" capture mode: the capturing thread's own
# unsafe calls (a read of the device, a cudaMalloc) still fail its capture; another thread's do not. Under torch's
# default, "global", a serving thread that reads a tensor to the host or pins memory while this one captures a prompt
# bucket, a decode step or a tuning graph fails ("operation not permitted when stream is capturing"), and so does the
# capture.
CAPTURE_MODE = "thread_local"

# One capture at a time in the process, and no warm-up on a side stream while one is under way: torch.cuda.graph
# captures on one side stream shared by every capture that names none, and torch.cuda.Stream() hands out the streams
# of a pool of 32 in turn, so a second thread's capture or warm-up could run on the stream being captured and be
# recorded into its graph (which the global mode would not prevent either: kernel launches are never refused).
# Held by cuda_graph and around the package's warm-ups before a capture; re-entrant (a decode key is tuned, with
# captures of its own, inside a step's warm-up).
CAPTURE_LOCK = threading.RLock()


@contextlib.contextmanager
def cuda_graph(graph: torch.cuda.CUDAGraph):
    """torch.cuda.graph(graph) in CAPTURE_MODE under CAPTURE_LOCK: the context every capture of the package runs in."""
    with CAPTURE_LOCK, torch.cuda.graph(graph, capture_error_mode=CAPTURE_MODE):
        yield


@contextlib.contextmanager
def before_capture():
    """Its body on a new side stream under CAPTURE_LOCK, the current stream then waiting for it (also when the body
    raised: what it launched comes before what follows): the eager run before a capture, as torch.cuda.graphs
    recommends."""
    with CAPTURE_LOCK:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        try:
            with torch.cuda.stream(side):
                yield
        finally:
            torch.cuda.current_stream().wait_stream(side)


def capture_launches(launch, calls: int) -> torch.cuda.CUDAGraph:
    """A CUDA graph of launch(0), ..., launch(calls - 1) back to back, as a decode step's graph runs its kernels.
    Each runs once first on a side stream (before_capture); launch(0) must have run once already, eagerly
    (compiled, autotuned)."""
    with CAPTURE_LOCK:  # the warm-up and its capture together
        with before_capture():
            for i in range(calls):
                launch(i)
        graph = torch.cuda.CUDAGraph()
        with cuda_graph(graph):
            for i in range(calls):
                launch(i)
    return graph


def replay_median_us(graph: torch.cuda.CUDAGraph, calls: int, rounds: int) -> float:
    """Median microseconds per launch of a graph of `calls` launches, over `rounds` replays timed with CUDA events
    (three replays first, untimed)."""
    import statistics

    for _ in range(3):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(rounds):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    return statistics.median(times)


def triton_unavailable_reason(device: torch.device | None = None) -> str | None:
    """None when Triton kernels can run on `device`, else a sentence saying why not."""
    return _unavailable_reason(None if device is None else device.type, interpreting())


@functools.lru_cache(maxsize=None)  # every launcher asks; the answer depends on these two only
def _unavailable_reason(device_type: str | None, interpreted: bool) -> str | None:
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return f"Triton is not installed ({e}); pip install triton"
    if device_type is None:
        return None
    if device_type == "cuda":
        return None if not interpreted else (
            "TRITON_INTERPRET=1 is set, which runs kernels on the CPU only")
    if device_type == "cpu":
        return None if interpreted else (
            "Triton kernels need a CUDA device; on the CPU they run only under TRITON_INTERPRET=1 "
            "(set before cqil_kernels is imported)")
    return f"Triton kernels do not run on {device_type} tensors"


def check_tensor(name: str, t: torch.Tensor, *, ndim: int, dtype: torch.dtype | None = None,
                 device: torch.device | None = None) -> None:
    """TypeError / ValueError naming `name` when t is not a tensor of this rank, dtype and device."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{name} must be {dtype}, got {t.dtype}")
    if dtype is None and t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name}: dtype {t.dtype} is not supported (float32, float16, bfloat16)")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device}")
    if t.numel() and t.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous in its last dimension (stride {t.stride()})")


def check_runnable(t: torch.Tensor) -> None:
    reason = triton_unavailable_reason(t.device)
    if reason is not None:
        raise ValueError(reason)


def dot_flags(dtype: torch.dtype) -> tuple[bool, str]:
    """(UPCAST, DOT_PRECISION) for kernels computing in `dtype`.

    The interpreter stores bf16 as raw integers and gets its arithmetic wrong, so there every bf16 operand
    is converted to fp32 before a dot; fp32 dots use full IEEE precision rather than TF32 so fp32 stays
    the accuracy reference it is meant to be.
    """
    upcast = interpreting() and dtype == torch.bfloat16
    return upcast, ("ieee" if dtype == torch.float32 or upcast else "tf32")


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for the host's grids: triton.cdiv is a constexpr function in Triton 3.6 and costs
    ~6 us per call from Python on the development machine (10 calls per stage of an eager step)."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


@functools.lru_cache(maxsize=None)
def multiprocessor_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


_TICKETS: dict = {}  # (device, stream) -> int32 counters, zero between launches
_RETIRED: list = []  # outgrown counters stay alive: captured CUDA graphs may still point at them


def ticket_counters(device: torch.device, n: int) -> torch.Tensor:
    """At least n int32 counters on `device` for the current stream, zero between launches: the kernels
    that finish with "the last program to arrive reduces" (attention's split merge, argmax) take a
    ticket and the last program sets the counter back to zero. Kernels of one stream run one after
    another, so they can share them; other streams get their own."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (str(device), stream)
    have = _TICKETS.get(key)
    if have is None or have.numel() < n:
        if have is not None:
            _RETIRED.append(have)
        _TICKETS[key] = have = torch.zeros(max(n, 1024), dtype=torch.int32, device=device)
    return have
