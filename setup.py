"""Build of cqil_kernels: the Python package plus the compiled extension cqil_kernels._C.

`pip install .` runs CMake (CMakeLists.txt) with Ninja to build _C with pybind11. The extension does
not compile against torch headers, so building never needs (or pulls in) torch, and the build is the
same in an isolated build environment and with `pip install --no-build-isolation --no-deps .` on a
machine without a package registry.

Environment switches:
  CQIL_SKIP_EXTENSION=1   install the pure-Python package only (cqil_kernels._ext then says why _C
                          is unavailable; everything that does not need it keeps working)
  CQIL_WITH_CUDA=0|1      0: never compile the CUDA sources; 1: fail if no CUDA compiler is found;
                          unset: compile them when nvcc is found (on PATH, CUDACXX or CUDA_HOME)
  CQIL_CUDA_ARCHS="90"    nvcc target architectures (default "80;90")
  CQIL_BUILD_JOBS=N       parallel compile jobs
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _version() -> str:
    for line in (ROOT / "cqil_kernels" / "__init__.py").read_text().splitlines():
        if line.startswith("__version__"):
            return line.split("=", 1)[1].strip().strip("\"'")
    raise RuntimeError("cqil_kernels/__init__.py has no __version__")


def _find_nvcc() -> str | None:
    if os.environ.get("CUDACXX"):
        return os.environ["CUDACXX"]
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
        if home and (Path(home) / "bin" / "nvcc").exists():
            return str(Path(home) / "bin" / "nvcc")
    found = shutil.which("nvcc")
    if found:
        return found
    default = Path("/usr/local/cuda/bin/nvcc")
    return str(default) if default.exists() else None


def _find_tool(name: str, bin_dir_attr: str) -> str | None:
    """The binary that the PyPI package `name` (cmake, ninja) ships, else the one on PATH."""
    try:
        candidate = Path(getattr(__import__(name), bin_dir_attr)) / name
        if candidate.exists():
            return str(candidate)
    except (ImportError, AttributeError):
        pass
    return shutil.which(name)


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        import pybind11

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / ext.name
        build_dir.mkdir(parents=True, exist_ok=True)
        args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DCQIL_VERSION={_version()}",
            f"-DCMAKE_BUILD_TYPE={'Debug' if self.debug else 'Release'}",
        ]
        ninja = _find_tool("ninja", "BIN_DIR")
        if ninja:
            args += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]

        with_cuda = os.environ.get("CQIL_WITH_CUDA", "")
        if with_cuda == "0":
            args.append("-DCQIL_WITH_CUDA=OFF")
        else:
            nvcc = _find_nvcc()
            args.append(f"-DCQIL_WITH_CUDA={'ON' if with_cuda == '1' else 'AUTO'}")
            if nvcc:
                args.append(f"-DCMAKE_CUDA_COMPILER={nvcc}")
            archs = os.environ.get("CQIL_CUDA_ARCHS")
            if archs:
                args.append(f"-DCMAKE_CUDA_ARCHITECTURES={archs}")

        cmake = _find_tool("cmake", "CMAKE_BIN_DIR")
        if cmake is None:
            raise RuntimeError("building cqil_kernels._C needs CMake >= 3.24: pip install cmake")
        subprocess.run([cmake, "-S", str(ROOT), "-B", str(build_dir), *args], check=True)
        jobs = os.environ.get("CQIL_BUILD_JOBS", str(os.cpu_count() or 1))
        subprocess.run([cmake, "--build", str(build_dir), "--parallel", jobs], check=True)


ext_modules = [] if os.environ.get("CQIL_SKIP_EXTENSION") == "1" else [CMakeExtension("cqil_kernels._C")]

setup(
    version=_version(),
    ext_modules=ext_modules,
    cmdclass={"build_ext": CMakeBuild},
)
