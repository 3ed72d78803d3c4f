// Runtime facts about the CUDA side of the extension, for cqil_kernels._ext to report.
//
// Only plain C++ types cross this header, so bindings.cpp can be compiled by the host compiler alone
// and the CUDA sources never see pybind11 or Python headers.
#pragma once

#include <string>

namespace cqil {

struct CudaProbe {
  int device_count = 0;   // devices the CUDA runtime can use; 0 when it cannot use any
  int runtime_version = 0;  // cudaRuntimeGetVersion, e.g. 13000
  int driver_version = 0;   // cudaDriverGetVersion; 0 when no driver is loaded
  std::string error;      // empty when the runtime works; else the CUDA error text
};

// Version of the CUDA toolkit this extension was compiled with, e.g. 13000 (CUDART_VERSION).
int compiled_cuda_version();

// Asks the CUDA runtime which devices it sees. Never throws: a machine without a driver or a GPU is
// reported through CudaProbe::error.
CudaProbe probe_cuda();

}  // namespace cqil
