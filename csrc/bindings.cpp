// The one boundary between C++ and Python: every function of cqil_kernels._C is registered here.
// Python code never imports _C directly; cqil_kernels/_ext.py does, and says why it is unavailable.

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <vector>

#ifdef CQIL_WITH_CUDA
#include "copy_engine.h"
#include "one_shot.h"
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
// The peer-buffer methods both all-reduces share (peer_memory.h): export this rank's buffer, open the
// others'.
template <typename Reduce>
void def_peer_memory(py::class_<Reduce>& cls) {
  cls.def("ipc_handle", [](Reduce& self) { return py::bytes(self.memory().ipc_handle()); })
      .def("pci_bus_id", [](Reduce& self) { return self.memory().pci_bus_id(); })
      .def("open_peers", [](Reduce& self, const std::vector<std::string>& handles,
                            const std::vector<std::string>& bus_ids) { self.memory().open_peers(handles, bus_ids); },
           py::arg("handles"), py::arg("bus_ids"));
}

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
  py::class_<cqil::OneShotAllReduce> one_shot(m, "OneShotAllReduce",
                                              "One-shot all-reduce through peer-accessible buffers (csrc/one_shot.h).");
  def_peer_memory(one_shot);
  one_shot.def(py::init<int, int, int, std::size_t, double>(), py::arg("device"), py::arg("rank"),
           py::arg("world"), py::arg("max_bytes"), py::arg("timeout_s"))
      .def("all_reduce", &cqil::OneShotAllReduce::all_reduce, py::arg("input"), py::arg("output"),
           py::arg("numel"), py::arg("dtype"), py::arg("stream"), py::arg("pdl") = false,
           "output = sum over ranks of input (device pointers), launched on `stream` (a cudaStream_t "
           "as an integer); no host synchronisation, so it can be captured in a CUDA graph. pdl: launch "
           "with programmatic dependent launch (compute capability 9.0+).")
      .def("all_reduce_sum", &cqil::OneShotAllReduce::all_reduce_sum, py::arg("parts"), py::arg("n_parts"),
           py::arg("residual"), py::arg("output"), py::arg("numel"), py::arg("dtype"), py::arg("stream"),
           py::arg("pdl") = false,
           "all_reduce of each rank's residual + parts[0] + ... (fp32 device pointers; n_parts rows of "
           "numel), formed in the kernel and rounded once to dtype, as one launch.")
      .def("timed_out", &cqil::OneShotAllReduce::timed_out)
      .def_property_readonly("max_bytes", &cqil::OneShotAllReduce::max_bytes);
  py::class_<cqil::CopyEngineAllReduce> copy_engine(m, "CopyEngineAllReduce",
                                                    "All-reduce through the copy engines and stream memory "
                                                    "operations (csrc/copy_engine.h).");
  def_peer_memory(copy_engine);
  copy_engine.def(py::init<int, int, int, std::size_t>(), py::arg("device"), py::arg("rank"), py::arg("world"),
           py::arg("max_bytes"))
      .def("all_reduce", &cqil::CopyEngineAllReduce::all_reduce, py::arg("data"), py::arg("numel"),
           py::arg("dtype"), py::arg("stream"),
           "data = sum over ranks of data (a device pointer, in place), enqueued on `stream` (a "
           "cudaStream_t as an integer): copies to the peers by DMA, waits through stream memory "
           "operations, one small sum kernel; capturable in a CUDA graph.")
      .def_property_readonly("max_bytes", &cqil::CopyEngineAllReduce::max_bytes);
#endif
}
