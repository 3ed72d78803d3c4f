#include "runtime_info.h"

#include <cuda_runtime.h>

namespace cqil {

int compiled_cuda_version() { return CUDART_VERSION; }

CudaProbe probe_cuda() {
  CudaProbe probe;
  cudaRuntimeGetVersion(&probe.runtime_version);
  // cudaDriverGetVersion reports 0 (and succeeds) when no driver is installed.
  cudaDriverGetVersion(&probe.driver_version);
  const cudaError_t status = cudaGetDeviceCount(&probe.device_count);
  if (status != cudaSuccess) {
    probe.device_count = 0;
    probe.error = std::string(cudaGetErrorName(status)) + ": " + cudaGetErrorString(status);
    // This error is not sticky; clear it so the next CUDA call in the process starts clean.
    cudaGetLastError();
  }
  return probe;
}

}  // namespace cqil
