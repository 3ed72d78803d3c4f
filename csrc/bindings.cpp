// The one boundary between C++ and Python: every function of cqil_kernels._C is registered here.
// Python code never imports _C directly; cqil_kernels/_ext.py does, and says why it is unavailable.

#include <pybind11/pybind11.h>

#include <string>

#ifdef CQIL_WITH_CUDA
#include "runtime_info.h"
#endif

namespace py = pybind11;

namespace {

py::dict build_info() {
  py::dict info;
  info["version"] = CQIL_VERSION;
  info["cxx_compiler"] = CQIL_CXX_COMPILER;
#ifdef CQIL_WITH_CUDA
  info["cuda"] = true;
  info["cuda_version"] = cqil::compiled_cuda_version();
  info["cuda_architectures"] = CQIL_CUDA_ARCHITECTURES;
#else
  info["cuda"] = false;
  info["cuda_version"] = 0;
  info["cuda_architectures"] = "";
#endif
  return info;
}

#ifdef CQIL_WITH_CUDA
py::dict probe_cuda() {
  const cqil::CudaProbe probe = cqil::probe_cuda();
  py::dict out;
  out["device_count"] = probe.device_count;
  out["runtime_version"] = probe.runtime_version;
  out["driver_version"] = probe.driver_version;
  out["error"] = probe.error;
  return out;
}
#endif

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "cqil_kernels compiled extension (import through cqil_kernels._ext)";
  m.def("build_info", &build_info,
        "How this extension was built: version, compiler, whether CUDA sources were compiled, "
        "the CUDA toolkit version and target architectures.");
#ifdef CQIL_WITH_CUDA
  m.def("probe_cuda", &probe_cuda,
        "Ask the CUDA runtime for its devices; never raises. Returns device_count, runtime_version, "
        "driver_version and error (empty when the runtime works).");
#endif
}
