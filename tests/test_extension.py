"""The compiled extension cqil_kernels._C: built by `pip install .`, imported only through _ext."""

import ast
import pathlib
import re
import shutil

import pytest

import cqil_kernels
from cqil_kernels import _ext

PACKAGE = pathlib.Path(cqil_kernels.__file__).parent


def test_extension_is_built_and_reports_its_build():
    assert _ext.available(), _ext.unavailable_reason()
    info = _ext.build_info()
    assert info["version"] == cqil_kernels.__version__
    assert info["cxx_compiler"]
    if shutil.which("nvcc") or pathlib.Path("/usr/local/cuda/bin/nvcc").exists():
        # The toolkit was there at build time, so the CUDA sources must have been compiled.
        assert info["cuda"] is True
        assert info["cuda_version"] >= 11000
        assert info["cuda_architectures"]


def test_cuda_probe_agrees_with_torch():
    import torch

    if not _ext.build_info()["cuda"]:
        pytest.skip("extension built without CUDA")
    probe = _ext.cuda_probe()
    assert probe["runtime_version"] == _ext.build_info()["cuda_version"]
    if torch.cuda.is_available():
        assert probe["error"] == "" and probe["device_count"] == torch.cuda.device_count()
        assert _ext.cuda_available() and _ext.cuda_unavailable_reason() is None
    else:
        assert probe["device_count"] == 0
        reason = _ext.cuda_unavailable_reason()
        assert not _ext.cuda_available() and reason
        assert "driver" in reason or "device" in reason


def test_only_ext_imports_the_compiled_module():
    importers = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and any(a.name == "_C" for a in node.names):
                importers.append(path.name)
            if isinstance(node, ast.ImportFrom) and (node.module or "").endswith("_C"):
                importers.append(path.name)
    assert importers == ["_ext.py"]


def test_both_all_reduces_are_bound_with_the_peer_buffer_methods():
    """What parallel/comm.py calls on each all-reduce object exists (the GPU tests call it for real);
    without a device the constructors refuse through _ext with the reason, not a crash."""
    if not _ext.build_info()["cuda"]:
        pytest.skip("extension built without CUDA")
    shared = {"ipc_handle", "pci_bus_id", "open_peers", "all_reduce", "max_bytes"}
    assert shared | {"all_reduce_sum", "timed_out"} <= set(dir(_ext._C.OneShotAllReduce))
    assert shared <= set(dir(_ext._C.CopyEngineAllReduce))
    if not _ext.cuda_available():
        for make in (lambda: _ext.one_shot_all_reduce(0, 0, 2, 1 << 20, 1.0),
                     lambda: _ext.copy_engine_all_reduce(0, 0, 2, 1 << 20)):
            with pytest.raises(RuntimeError, match=re.escape(_ext.cuda_unavailable_reason())):
                make()
