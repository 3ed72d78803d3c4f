// Copy-engine all-reduce: see copy_engine.h for the protocol.

#include "copy_engine.h"

#include <cuda.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <mutex>
#include <stdexcept>

#include "cuda_check.h"
#include "pack.cuh"

namespace cqil {
namespace {

constexpr std::size_t kFlagBytes = 2 * sizeof(std::uint32_t) * CopyEngineAllReduce::kSlots * kMaxRanks;
constexpr int kThreads = 256;
constexpr int kSumBlocks = 64;  // enough to stream a few MB from local memory in a few microseconds

// The driver's stream memory operations, found through the runtime (no link against libcuda, so the
// module still imports on machines without a driver).
using WaitValue32 = CUresult (*)(CUstream, CUdeviceptr, cuuint32_t, unsigned int);
using WriteValue32 = CUresult (*)(CUstream, CUdeviceptr, cuuint32_t, unsigned int);

struct MemOps {
  WaitValue32 wait = nullptr;
  WriteValue32 write = nullptr;
};

const MemOps& mem_ops() {
  static MemOps ops;
  static std::once_flag once;
  std::call_once(once, [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult found;
    if (cudaGetDriverEntryPointByVersion("cuStreamWaitValue32", &fn, 12000, cudaEnableDefault, &found) ==
            cudaSuccess && found == cudaDriverEntryPointSuccess) {
      ops.wait = reinterpret_cast<WaitValue32>(fn);
    }
    fn = nullptr;
    if (cudaGetDriverEntryPointByVersion("cuStreamWriteValue32", &fn, 12000, cudaEnableDefault, &found) ==
            cudaSuccess && found == cudaDriverEntryPointSuccess) {
      ops.write = reinterpret_cast<WriteValue32>(fn);
    }
    cudaGetLastError();
  });
  return ops;
}

void check_driver(CUresult status, const char* what) {
  if (status != CUDA_SUCCESS) {
    throw std::runtime_error(std::string(what) + " failed (CUresult " + std::to_string(status) + ")");
  }
}

// out[i] = sum over r of (r == rank ? own : slots[r])[i], in rank order, in fp32; `out` may be `own`.
template <typename T>
__global__ void __launch_bounds__(kThreads) sum_kernel(const uint4* own, const char* slots, std::size_t slot_stride,
                                                       uint4* out, std::size_t n16, int rank, int world) {
  for (std::size_t i = blockIdx.x * static_cast<std::size_t>(blockDim.x) + threadIdx.x; i < n16;
       i += static_cast<std::size_t>(gridDim.x) * blockDim.x) {
    float acc[Pack<T>::N] = {};
    for (int r = 0; r < world; ++r) {
      const uint4* src = r == rank ? own : reinterpret_cast<const uint4*>(slots + r * slot_stride);
      Pack<T>::add(acc, src[i]);
    }
    out[i] = Pack<T>::pack(acc);
  }
}

}  // namespace

CopyEngineAllReduce::CopyEngineAllReduce(int device, int rank, int world, std::size_t max_bytes)
    : memory_(device, rank, world, kFlagBytes + kSlots * world * max_bytes, kFlagBytes), max_bytes_(max_bytes) {
  if (max_bytes == 0 || max_bytes % 16) throw std::runtime_error("copy-engine all-reduce: max_bytes % 16 != 0");
  const MemOps& ops = mem_ops();
  if (ops.wait == nullptr || ops.write == nullptr) {
    throw std::runtime_error("the CUDA driver offers no stream memory operations (cuStreamWaitValue32)");
  }
}

std::uint32_t* CopyEngineAllReduce::ready(int owner, int slot, int src) const {
  return reinterpret_cast<std::uint32_t*>(memory_.base(owner)) + slot * kMaxRanks + src;
}

std::uint32_t* CopyEngineAllReduce::busy(int owner, int slot, int dst) const {
  return reinterpret_cast<std::uint32_t*>(memory_.base(owner)) + (kSlots + slot) * kMaxRanks + dst;
}

char* CopyEngineAllReduce::data(int owner, int slot, int src) const {
  return memory_.base(owner) + kFlagBytes + (static_cast<std::size_t>(slot) * memory_.world() + src) * max_bytes_;
}

void CopyEngineAllReduce::all_reduce(std::uintptr_t message, std::size_t numel, const std::string& dtype,
                                     std::uintptr_t stream_handle) {
  const std::size_t n16 = memory_.check_message(message, numel, dtype, max_bytes_, "copy-engine all-reduce");
  if (n16 == 0 || memory_.world() == 1) return;
  const std::size_t bytes = n16 * 16;
  const MemOps& ops = mem_ops();
  const auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  const auto cu = reinterpret_cast<CUstream>(stream);
  const auto at = [](std::uint32_t* p) { return reinterpret_cast<CUdeviceptr>(p); };
  const int me = memory_.rank(), world = memory_.world(), s = next_slot_;
  next_slot_ = (next_slot_ + 1) % kSlots;
  for (int p = 0; p < world; ++p) {
    if (p == me) continue;
    check_driver(ops.wait(cu, at(busy(me, s, p)), 0, CU_STREAM_WAIT_VALUE_EQ), "cuStreamWaitValue32");
    check_driver(ops.write(cu, at(busy(me, s, p)), 1, CU_STREAM_WRITE_VALUE_DEFAULT), "cuStreamWriteValue32");
    check(cudaMemcpyAsync(data(p, s, me), reinterpret_cast<const void*>(message), bytes, cudaMemcpyDeviceToDevice,
                          stream),
          "cudaMemcpyAsync (to a peer)");
    check_driver(ops.write(cu, at(ready(p, s, me)), 1, CU_STREAM_WRITE_VALUE_DEFAULT), "cuStreamWriteValue32");
  }
  for (int p = 0; p < world; ++p) {
    if (p == me) continue;
    check_driver(ops.wait(cu, at(ready(me, s, p)), 1, CU_STREAM_WAIT_VALUE_EQ), "cuStreamWaitValue32");
    check_driver(ops.write(cu, at(ready(me, s, p)), 0, CU_STREAM_WRITE_VALUE_DEFAULT), "cuStreamWriteValue32");
  }
  const int blocks = static_cast<int>(std::min<std::size_t>(kSumBlocks, (n16 + kThreads - 1) / kThreads));
  auto* io = reinterpret_cast<uint4*>(message);
  with_element_type(dtype, [&](auto tag) {
    sum_kernel<typename decltype(tag)::type><<<blocks, kThreads, 0, stream>>>(
        io, data(me, s, 0), max_bytes_, io, n16, me, world);
  });
  check(cudaGetLastError(), "copy-engine all-reduce: sum launch");
  for (int p = 0; p < world; ++p) {
    if (p == me) continue;
    check_driver(ops.write(cu, at(busy(p, s, me)), 0, CU_STREAM_WRITE_VALUE_DEFAULT), "cuStreamWriteValue32");
  }
}

}  // namespace cqil
