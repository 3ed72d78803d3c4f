// The synchronization the ring prototypes share (ring_chain.cu, ring_batch.cu, ring_layer.cu): shared-memory
// mbarriers with transaction counts, bulk copies (TMA) into shared memory, a gpu-scope acquire load and release
// add for the per-layer counters, the profiles' timer, and the watchdog's report. sm_90. ring_chain.py's build
// hashes this file with the source that includes it.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace ring {

__device__ __forceinline__ unsigned smem_addr(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void mbar_init(std::uint64_t* bar, unsigned count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_addr(bar)), "r"(count) : "memory");
}

__device__ __forceinline__ void mbar_expect_tx(std::uint64_t* bar, unsigned bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_addr(bar)), "r"(bytes)
               : "memory");
}

__device__ __forceinline__ void mbar_arrive(std::uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(smem_addr(bar)) : "memory");
}

// Whether the phase of this parity has completed (it cannot tell phase k from k +/- 2).
__device__ __forceinline__ bool mbar_try_wait(std::uint64_t* bar, unsigned parity) {
  unsigned done;
  asm volatile(
      "{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n selp.u32 %0, 1, 0, p;\n}"
      : "=r"(done)
      : "r"(smem_addr(bar)), "r"(parity)
      : "memory");
  return done;
}

__device__ __forceinline__ void mbar_wait(std::uint64_t* bar, unsigned parity) {
  while (!mbar_try_wait(bar, parity)) {
  }
}

__device__ __forceinline__ void bulk_copy(void* dst, const void* src, unsigned bytes, std::uint64_t* bar) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(
          smem_addr(dst)),
      "l"(src), "r"(bytes), "r"(smem_addr(bar))
      : "memory");
}

__device__ __forceinline__ unsigned load_acquire(const unsigned* p) {
  unsigned v;
  asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ void red_release(unsigned* p, unsigned v) {
  asm volatile("red.release.gpu.global.add.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}

// The global timer in ns (the per-task profiles).
__device__ __forceinline__ long long global_ns() {
  long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

// mbar_wait with a deadline (globaltimer ns): false if the phase has not completed by then.
__device__ __forceinline__ bool mbar_wait_until(std::uint64_t* bar, unsigned parity, long long deadline) {
  while (!mbar_try_wait(bar, parity)) {
    if (global_ns() > deadline) return false;
  }
  return true;
}

// The watchdog's report of a wait that gave up (ring_batch.cu, ring_layer.cu): the first to give up writes diag[0..7]
// = {what, block, warp, item (a page or task of the block), where, the value seen, the value wanted, the block's
// items}; what names the wait (each prototype's own codes).
__device__ inline void give_up(long long* diag, int what, int warp, int item, long long where,
                               long long have, long long want, int items) {
  if (atomicCAS(reinterpret_cast<unsigned long long*>(diag), 0ull, static_cast<unsigned long long>(what)) == 0) {
    diag[1] = blockIdx.x;
    diag[2] = warp;
    diag[3] = item;
    diag[4] = where;
    diag[5] = have;
    diag[6] = want;
    diag[7] = items;
    __threadfence();
  }
}

}  // namespace ring
