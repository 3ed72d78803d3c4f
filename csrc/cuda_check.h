// check(): CUDA runtime errors as std::runtime_error, for the .cu files (headers that bindings.cpp
// includes must not need the CUDA headers).
#pragma once

#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

namespace cqil {

// Throws std::runtime_error naming `what` and the CUDA error.
inline void check(cudaError_t status, const char* what) {
  if (status != cudaSuccess) {
    throw std::runtime_error(std::string(what) + ": " + cudaGetErrorName(status) + " (" +
                             cudaGetErrorString(status) + ")");
  }
}

}  // namespace cqil
