// Element types of the all-reduces (one_shot.cu, copy_engine.cu): fp32 / fp16 / bf16 values moved 16
// bytes at a time and summed in an fp32 accumulator, rounded to nearest even on the way back.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstddef>
#include <stdexcept>
#include <string>

namespace cqil {

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// 16 bytes of T as fp32 values (4 floats or 8 halves) and back.
template <typename T>
struct Pack {
  static constexpr int N = sizeof(uint4) / sizeof(T);
  __device__ static void add(float (&acc)[N], const uint4& v) {
    const T* e = reinterpret_cast<const T*>(&v);
#pragma unroll
    for (int i = 0; i < N; ++i) acc[i] += to_float(e[i]);
  }
  __device__ static uint4 pack(const float (&acc)[N]) {
    uint4 v;
    T* e = reinterpret_cast<T*>(&v);
#pragma unroll
    for (int i = 0; i < N; ++i) e[i] = from_float<T>(acc[i]);
    return v;
  }
};

inline std::size_t element_bytes(const std::string& dtype, const char* what) {
  if (dtype == "float32") return 4;
  if (dtype == "float16" || dtype == "bfloat16") return 2;
  throw std::runtime_error(std::string(what) + ": unsupported dtype " + dtype);
}

template <typename T>
struct Tag {
  using type = T;
};

// f(Tag<T>{}) for the element type T that dtype names (element_bytes has checked it).
template <typename F>
void with_element_type(const std::string& dtype, F&& f) {
  if (dtype == "float32") {
    f(Tag<float>{});
  } else if (dtype == "float16") {
    f(Tag<__half>{});
  } else {
    f(Tag<__nv_bfloat16>{});
  }
}

}  // namespace cqil
