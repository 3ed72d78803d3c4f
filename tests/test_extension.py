"""The compiled extension cqil_kernels._C: built by `pip install .`, imported only through _ext."""

import ast
import pathlib
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
