// One-shot all-reduce over peer-accessible buffers: see one_shot.h for the protocol.

#include "one_shot.h"

#include <cuda_runtime.h>

#include <stdexcept>

#include "cuda_check.h"
#include "pack.cuh"

namespace cqil {
namespace {

constexpr std::size_t kFlagBytes = sizeof(std::uint32_t) * kBlocks * kMaxRanks;
constexpr int kThreads = 256;
// 16-byte units each thread moves per loop step, loaded before any is used: the loads in flight, not
// NVLink's bandwidth, bound a large message (2 H200s, 4 MB: 52 us with 1 per step, 22 us with 4).
constexpr int kUnroll = 4;

struct Peers {
  char* base[kMaxRanks];
};

__device__ __forceinline__ std::uint32_t* flag(char* base, int block, int src) {
  return reinterpret_cast<std::uint32_t*>(base) + block * kMaxRanks + src;
}

__device__ __forceinline__ void store_release(std::uint32_t* p, std::uint32_t v) {
  asm volatile("st.release.sys.global.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}

__device__ __forceinline__ std::uint32_t load_acquire(const std::uint32_t* p) {
  std::uint32_t v;
  asm volatile("ld.acquire.sys.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ unsigned long long global_ns() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

// Where a rank's contribution to the sum comes from, one 16-byte unit of T at a time.
// CopySource: a message of T as it is (the plain all-reduce; also every rank's slot in step 4).
struct CopySource {
  const uint4* p;
  __device__ __forceinline__ uint4 operator()(std::size_t i) const { return p[i]; }
};

// SumSource: residual + parts[0] + parts[1] + ... in fp32, added in that order and rounded once to T, as
// ops/group_gemm.py's _sum_p_kernel forms a split-K GEMM's output from its fp32 partial products, bit for
// bit. parts: n_parts rows of fp32, part_stride float4s apart; residual: one row of fp32.
template <typename T>
struct SumSource {
  const float4* residual;
  const float4* parts;
  std::size_t part_stride;
  int n_parts;
  __device__ __forceinline__ uint4 operator()(std::size_t i) const {
    constexpr int F = Pack<T>::N / 4;  // float4s per 16-byte unit of T
    float acc[Pack<T>::N];
#pragma unroll
    for (int f = 0; f < F; ++f) {
      const float4 r = residual[i * F + f];
      acc[4 * f] = r.x, acc[4 * f + 1] = r.y, acc[4 * f + 2] = r.z, acc[4 * f + 3] = r.w;
    }
    for (int q = 0; q < n_parts; ++q) {
#pragma unroll
      for (int f = 0; f < F; ++f) {
        const float4 v = parts[q * part_stride + i * F + f];
        acc[4 * f] += v.x, acc[4 * f + 1] += v.y, acc[4 * f + 2] += v.z, acc[4 * f + 3] += v.w;
      }
    }
    return Pack<T>::pack(acc);
  }
};

// Units i, i + blockDim.x, ..., (kUnroll of them, those below hi) of src into v, all loads issued before
// any value is used.
template <typename Source>
__device__ __forceinline__ void load_units(uint4 (&v)[kUnroll], const Source& src, std::size_t i,
                                           std::size_t hi) {
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    if (i + u * blockDim.x < hi) v[u] = src(i + u * blockDim.x);
  }
}

// Programmatic dependent launch (Hopper and later; parallel/comm.py asks for it where the Triton kernels
// use it, ops/_pdl.py): the kernel may start while the previous one on the stream finishes, so it waits
// for it before touching memory, and lets the next one launch once its sum is done. Without the launch
// attribute both are no-ops.
__device__ __forceinline__ void wait_for_producer() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void release_consumer() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// n16: message size in 16-byte units. Block b of kBlocks owns units [b * per, min(n16, (b + 1) * per)).
template <typename T, typename Source>
__global__ void __launch_bounds__(kThreads) one_shot_kernel(Peers peers, Source in, uint4* out,
                                                            std::size_t n16, std::size_t slot_bytes,
                                                            int rank, int world, std::uint32_t* counters,
                                                            int* error, long long timeout_ns) {
  wait_for_producer();
  const int b = blockIdx.x;
  const std::uint32_t g = counters[b] + 1;  // every thread reads it before thread 0 updates it below
  const std::size_t slot_offset = kFlagBytes + (g & 1) * slot_bytes;
  const std::size_t per = (n16 + gridDim.x - 1) / gridDim.x;
  const std::size_t lo = b * per;
  const std::size_t hi = lo + per < n16 ? lo + per : n16;

  // Thread t visits units lo + t + k * blockDim.x for k = 0, 1, ..., kUnroll of them per step.
  const std::size_t step = static_cast<std::size_t>(blockDim.x) * kUnroll;

  // 1. my slice of my contribution into my own buffer
  uint4* mine = reinterpret_cast<uint4*>(peers.base[rank] + slot_offset);
  for (std::size_t i = lo + threadIdx.x; i < hi; i += step) {
    uint4 v[kUnroll];
    load_units(v, in, i, hi);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (i + u * blockDim.x < hi) mine[i + u * blockDim.x] = v[u];
    }
  }
  __syncthreads();
  // 2. tell every rank (myself included) that block b arrived at generation g
  if (threadIdx.x < world) store_release(flag(peers.base[threadIdx.x], b, rank), g);
  // 3. wait for every rank's block b
  if (threadIdx.x < world) {
    const std::uint32_t* f = flag(peers.base[rank], b, threadIdx.x);
    const unsigned long long start = global_ns();
    while (load_acquire(f) < g) {
      if (global_ns() - start > static_cast<unsigned long long>(timeout_ns)) {
        atomicExch(error, 1);
        __threadfence_system();
        break;
      }
    }
  }
  __syncthreads();
  // 4. sum the slice over the ranks, in rank order, in fp32 (each element's order is the same for
  //    every unit and every rank, so every rank gets the same bits)
  for (std::size_t i = lo + threadIdx.x; i < hi; i += step) {
    float acc[kUnroll][Pack<T>::N] = {};
    for (int r = 0; r < world; ++r) {
      const uint4* src = reinterpret_cast<const uint4*>(peers.base[r] + slot_offset);
      uint4 v[kUnroll];
      load_units(v, CopySource{src}, i, hi);
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if (i + u * blockDim.x < hi) Pack<T>::add(acc[u], v[u]);
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (i + u * blockDim.x < hi) out[i + u * blockDim.x] = Pack<T>::pack(acc[u]);
    }
  }
  release_consumer();  // the next kernel still waits for this grid's end (and its writes) to read them
  __syncthreads();
  if (threadIdx.x == 0) counters[b] = g;
}

}  // namespace

OneShotAllReduce::OneShotAllReduce(int device, int rank, int world, std::size_t max_bytes, double timeout_s)
    : memory_(device, rank, world, kFlagBytes + 2 * max_bytes, kFlagBytes), max_bytes_(max_bytes),
      timeout_ns_(static_cast<long long>(timeout_s * 1e9)) {
  if (max_bytes == 0 || max_bytes % 16) throw std::runtime_error("one-shot all-reduce: max_bytes % 16 != 0");
  check(cudaMalloc(&counters_, sizeof(std::uint32_t) * kBlocks), "cudaMalloc (one-shot counters)");
  check(cudaMemset(counters_, 0, sizeof(std::uint32_t) * kBlocks), "cudaMemset (one-shot counters)");
  check(cudaHostAlloc(&error_host_, sizeof(int), cudaHostAllocMapped), "cudaHostAlloc (error flag)");
  *error_host_ = 0;
  check(cudaHostGetDevicePointer(&error_device_, error_host_, 0), "cudaHostGetDevicePointer");
  check(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
}

OneShotAllReduce::~OneShotAllReduce() {
  cudaSetDevice(memory_.device());
  if (counters_ != nullptr) cudaFree(counters_);
  if (error_host_ != nullptr) cudaFreeHost(error_host_);
}

template <typename T, typename Source>
void OneShotAllReduce::launch(const Source& source, std::uintptr_t out, std::size_t n16, std::uintptr_t stream,
                              bool pdl) const {
  Peers peers;
  for (int r = 0; r < kMaxRanks; ++r) peers.base[r] = r < memory_.world() ? memory_.base(r) : nullptr;
  cudaLaunchConfig_t config = {};
  // Always all kBlocks blocks, so every block's generation counts every call and the data slot parity
  // is the same for the whole call (what makes the double buffering safe, one_shot.h).
  config.gridDim = dim3(kBlocks);
  config.blockDim = dim3(kThreads);
  config.stream = reinterpret_cast<cudaStream_t>(stream);
  cudaLaunchAttribute attribute[1];
  attribute[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute[0].val.programmaticStreamSerializationAllowed = 1;
  config.attrs = attribute;
  config.numAttrs = pdl ? 1 : 0;
  check(cudaLaunchKernelEx(&config, one_shot_kernel<T, Source>, peers, source, reinterpret_cast<uint4*>(out),
                           n16, max_bytes_, memory_.rank(), memory_.world(), counters_, error_device_, timeout_ns_),
        "one-shot all-reduce launch");
}

void OneShotAllReduce::all_reduce(std::uintptr_t in, std::uintptr_t out, std::size_t numel,
                                  const std::string& dtype, std::uintptr_t stream, bool pdl) {
  const char* what = "one-shot all-reduce";
  const std::size_t n16 = memory_.check_message(out, numel, dtype, max_bytes_, what);
  if (in % 16) throw std::runtime_error(std::string(what) + ": message must be 16-byte aligned");
  if (n16 == 0) return;
  with_element_type(dtype, [&](auto tag) {
    launch<typename decltype(tag)::type>(CopySource{reinterpret_cast<const uint4*>(in)}, out, n16, stream, pdl);
  });
}

void OneShotAllReduce::all_reduce_sum(std::uintptr_t parts, int n_parts, std::uintptr_t residual,
                                      std::uintptr_t out, std::size_t numel, const std::string& dtype,
                                      std::uintptr_t stream, bool pdl) {
  const char* what = "one-shot all-reduce of partial sums";
  const std::size_t n16 = memory_.check_message(out, numel, dtype, max_bytes_, what);
  if (n_parts < 1 || n_parts > kMaxParts) {
    throw std::runtime_error(std::string(what) + ": n_parts must be 1.." + std::to_string(kMaxParts));
  }
  if (parts % 16 || residual % 16) {
    throw std::runtime_error(std::string(what) + ": fp32 inputs must be 16-byte aligned");
  }
  if (n16 == 0) return;
  const std::size_t stride = numel / 4;  // float4s per row: numel * element size is a multiple of 16
  with_element_type(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const SumSource<T> source{reinterpret_cast<const float4*>(residual), reinterpret_cast<const float4*>(parts),
                              stride, n_parts};
    launch<T>(source, out, n16, stream, pdl);
  });
}

bool OneShotAllReduce::timed_out() const {
  return *reinterpret_cast<volatile int*>(error_host_) != 0;
}

}  // namespace cqil
