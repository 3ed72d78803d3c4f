"""The only importer of the compiled extension cqil_kernels._C.

Everything else asks this module: `available()` / `cuda_available()` say whether the extension (and its
CUDA part) can be used, and `unavailable_reason()` / `cuda_unavailable_reason()` say why not, so callers
can fall back and tell the user something actionable.
"""

from __future__ import annotations

from functools import lru_cache

try:
    from . import _C
except ImportError as e:  # not built (CQIL_SKIP_EXTENSION=1, a source checkout) or broken
    _C = None
    _IMPORT_ERROR = f"cqil_kernels._C could not be imported ({e}); reinstall with `pip install .`"
else:
    _IMPORT_ERROR = None


def available() -> bool:
    return _C is not None


def unavailable_reason() -> str | None:
    return _IMPORT_ERROR


def build_info() -> dict:
    """How the extension was built (version, compiler, CUDA toolkit version and architectures)."""
    if _C is None:
        raise RuntimeError(_IMPORT_ERROR)
    return dict(_C.build_info())


@lru_cache(maxsize=1)
def cuda_probe() -> dict:
    """What the CUDA runtime linked into the extension sees: device_count, versions, error text."""
    if _C is None:
        raise RuntimeError(_IMPORT_ERROR)
    if not _C.build_info()["cuda"]:
        raise RuntimeError("cqil_kernels._C was built without CUDA (no nvcc found, or CQIL_WITH_CUDA=0)")
    return dict(_C.probe_cuda())


def cuda_unavailable_reason() -> str | None:
    """None when the CUDA part of the extension can run here; otherwise why it cannot."""
    if _C is None:
        return _IMPORT_ERROR
    if not _C.build_info()["cuda"]:
        return "cqil_kernels._C was built without CUDA (no nvcc found at build time, or CQIL_WITH_CUDA=0)"
    probe = cuda_probe()
    if probe["driver_version"] == 0:
        return f"no CUDA driver is installed (the CUDA runtime reports {probe['error'] or 'no driver'})"
    if probe["error"]:
        return f"the CUDA runtime reports {probe['error']} (driver version {probe['driver_version']})"
    if probe["device_count"] == 0:
        return "the CUDA runtime sees no device"
    return None


def cuda_available() -> bool:
    return cuda_unavailable_reason() is None


def _require_cuda() -> None:
    """RuntimeError saying why when the CUDA part of the extension cannot run here."""
    reason = cuda_unavailable_reason()
    if reason is not None:
        raise RuntimeError(reason)


def one_shot_all_reduce(device: int, rank: int, world: int, max_bytes: int, timeout_s: float):
    """The one-shot all-reduce of csrc/one_shot.cu for this rank (parallel/comm.py drives it):
    RuntimeError saying why when the CUDA part of the extension cannot run here."""
    _require_cuda()
    return _C.OneShotAllReduce(device, rank, world, max_bytes, timeout_s)


def copy_engine_all_reduce(device: int, rank: int, world: int, max_bytes: int):
    """The copy-engine all-reduce of csrc/copy_engine.cu for this rank (parallel/comm.py drives it):
    RuntimeError saying why when the CUDA part of the extension cannot run here."""
    _require_cuda()
    return _C.CopyEngineAllReduce(device, rank, world, max_bytes)
