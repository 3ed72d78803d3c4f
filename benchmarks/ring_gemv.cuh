// The batch-1 GEMV pieces the ring prototypes share (ring_chain.cu, ring_layer.cu): bf16 halves of a 32-bit word as
// fp32, eight products of a 16-byte chunk into two sums, and a warp's copy of an activation vector into shared
// memory. sm_90. ring_chain.py's build hashes this file with the source that includes it.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

namespace ring {

__device__ __forceinline__ float lo(unsigned u) { return __uint_as_float(u << 16); }
__device__ __forceinline__ float hi(unsigned u) { return __uint_as_float(u & 0xffff0000u); }

// Two chains per row (even and odd elements of each 16-byte chunk) for twice the FMAs in flight; a row's sum
// does not depend on how many rows its task has.
__device__ __forceinline__ void dot8(uint4 w, const float (&x)[8], float& even, float& odd) {
  even = fmaf(lo(w.x), x[0], even);
  odd = fmaf(hi(w.x), x[1], odd);
  even = fmaf(lo(w.y), x[2], even);
  odd = fmaf(hi(w.y), x[3], odd);
  even = fmaf(lo(w.z), x[4], even);
  odd = fmaf(hi(w.z), x[5], odd);
  even = fmaf(lo(w.w), x[6], even);
  odd = fmaf(hi(w.w), x[7], odd);
}

// x (K bf16, global, written by other blocks of this launch) into shared memory by one warp: through L2
// (ld.global.cg), never a stale L1 line; kStageLoads loads in flight per lane, so the 22 KB of an 11008-wide x
// take three L2 round trips. The block's consumers wait on them at every layer boundary (the ring does not).
// With kSquares, returns the lane's fp32 sum of squares of the elements it copied (RMSNorm's), else 0.
constexpr int kStageLoads = 16;

template <bool kSquares = false>
__device__ float stage_x(uint4* dst, const __nv_bfloat16* x, int K, int lane) {
  const uint4* src = reinterpret_cast<const uint4*>(x);
  const int chunks = K / 8;
  float sq = 0.f;
  for (int c0 = 0; c0 < chunks; c0 += 32 * kStageLoads) {
    uint4 v[kStageLoads];
#pragma unroll
    for (int u = 0; u < kStageLoads; ++u) {
      const int c = c0 + u * 32 + lane;
      if (c < chunks) v[u] = __ldcg(src + c);
    }
#pragma unroll
    for (int u = 0; u < kStageLoads; ++u) {
      const int c = c0 + u * 32 + lane;
      if (c < chunks) {
        dst[c] = v[u];
        if (kSquares) {
          const unsigned e[4] = {v[u].x, v[u].y, v[u].z, v[u].w};
#pragma unroll
          for (int k = 0; k < 4; ++k) sq = fmaf(hi(e[k]), hi(e[k]), fmaf(lo(e[k]), lo(e[k]), sq));
        }
      }
    }
  }
  return sq;
}

}  // namespace ring
