// What every CUDA kernel file shares: element types, fp32 widening, warp reductions, 128-bit loads.
// Raw pointers only, no torch types, so each .cu file compiles with plain nvcc (CI does that, GPU or not).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "kernels.h"

namespace deltacomp {
namespace cuda {

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Sum over the 32 lanes of a warp; every lane gets the total.
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// 8 consecutive elements of type T widened to fp32, from one 16-byte (fp16/bf16) or two 16-byte (fp32)
// loads; p must be 16-byte aligned.
template <typename T> __device__ __forceinline__ void load8(const T* p, float (&out)[8]);
template <> __device__ __forceinline__ void load8<float>(const float* p, float (&out)[8]) {
  const float4 a = __ldg(reinterpret_cast<const float4*>(p));
  const float4 b = __ldg(reinterpret_cast<const float4*>(p) + 1);
  out[0] = a.x; out[1] = a.y; out[2] = a.z; out[3] = a.w; out[4] = b.x; out[5] = b.y; out[6] = b.z; out[7] = b.w;
}
template <> __device__ __forceinline__ void load8<__half>(const __half* p, float (&out)[8]) {
  const uint4 v = __ldg(reinterpret_cast<const uint4*>(p));
  const __half2* h = reinterpret_cast<const __half2*>(&v);
#pragma unroll
  for (int i = 0; i < 4; ++i) { const float2 f = __half22float2(h[i]); out[2 * i] = f.x; out[2 * i + 1] = f.y; }
}
template <> __device__ __forceinline__ void load8<__nv_bfloat16>(const __nv_bfloat16* p, float (&out)[8]) {
  const uint4 v = __ldg(reinterpret_cast<const uint4*>(p));
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&v);
#pragma unroll
  for (int i = 0; i < 4; ++i) { const float2 f = __bfloat1622float2(h[i]); out[2 * i] = f.x; out[2 * i + 1] = f.y; }
}

// x * (+1 if bit else -1) without a branch: flip the fp32 sign bit when the weight's bit is 0.
__device__ __forceinline__ float signed_by_bit(float x, uint32_t word, int bit) {
  return __uint_as_float(__float_as_uint(x) ^ ((~word << (31 - bit)) & 0x80000000u));
}

// x tiles in shared memory (fp32): 4 pad floats after every 32 values, so the 32 values of word w start at
// w * 36 floats: 16-byte aligned for LDS.128, and 8 lanes reading words l..l+7 hit 8 distinct bank quads.
__host__ __device__ __forceinline__ int padded(int i) { return i + (i >> 5) * 4; }
__host__ __device__ constexpr int padded_len(int n) { return n + (n / 32) * 4; }

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }
inline bool aligned4(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 3u) == 0; }
inline unsigned ceil_div(int64_t a, int64_t b) { return static_cast<unsigned>((a + b - 1) / b); }

}  // namespace cuda
}  // namespace deltacomp
