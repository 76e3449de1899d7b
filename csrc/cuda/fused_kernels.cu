// CUDA kernel of sign_matmul_fused: y = x @ (w_base + scale * sign)^T in one pass over the base weight
// and its signs (a base linear layer and its BitDelta term together), for small M (decode).
//
// Work split:
//     grid.x = ceil(n / (kWarps * kRows))  ->  each warp owns kRows consecutive output rows
//     (M > kFusedMaxRows: the wrapper runs cuBLAS on the base and adds the sign term instead)
//     grid.y = ceil(m / MT)                ->  MT rows of x per block
//     lane l takes 8-weight slots j = l, l+32, ... of the rows: one 16-byte load of w_base (fp16/bf16;
//     two for fp32) and one sign byte per row and slot, coalesced across the warp; the effective weights
//     w + s*sign are formed in fp32 once per slot and reused for every row of x (never rounded).
#include "common.cuh"

namespace deltacomp {
namespace cuda {
namespace {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
// kRows: output rows per warp; each x slice loaded once serves kRows weight rows, and kRows 16-byte loads
// of w_base per lane are in flight together (4 for one x row: decode is bound by bytes in flight).
template <typename TX, typename W, int MT, int kRows>
__global__ void __launch_bounds__(kThreads, 2) fused_gemv_kernel(
    const TX* __restrict__ x,             // (m, k)
    int64_t m, int64_t k,
    const W* __restrict__ w_base,         // (n, k)
    const uint8_t* __restrict__ packed,   // SIGNS (n, ceil(k/8))
    int64_t n,
    const float* __restrict__ scale,      // (1,) or (n,)
    bool per_row,
    bool vec,                             // k % 8 == 0 and x, w_base 16-byte aligned
    TX* __restrict__ y) {                 // (m, n)
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t row0 = (static_cast<int64_t>(blockIdx.x) * kWarps + warp) * kRows;
  if (row0 >= n) return;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * MT;
  const int64_t rows_left = m - m0;
  const int64_t bpr = (k + 7) >> 3;
  const TX* xm = x + m0 * k;
  float s[kRows];
  bool live[kRows];
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    live[r] = row0 + r < n;
    s[r] = live[r] ? (per_row ? scale[row0 + r] : scale[0]) : 0.f;
  }
  float acc[kRows][MT];
#pragma unroll
  for (int r = 0; r < kRows; ++r)
#pragma unroll
    for (int mm = 0; mm < MT; ++mm) acc[r][mm] = 0.f;

  if (vec) {
    const int64_t slots = k >> 3;
#pragma unroll 2
    for (int64_t j = lane; j < slots; j += 32) {
      float we[kRows][8];
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        if (!live[r]) {
#pragma unroll
          for (int i = 0; i < 8; ++i) we[r][i] = 0.f;
          continue;
        }
        load8<W>(w_base + (row0 + r) * k + j * 8, we[r]);
        const uint32_t byte = __ldg(packed + (row0 + r) * bpr + j);
#pragma unroll
        for (int i = 0; i < 8; ++i) we[r][i] += (byte >> i) & 1u ? s[r] : -s[r];
      }
#pragma unroll
      for (int mm = 0; mm < MT; ++mm) {
        if (mm < rows_left) {
          float xv[8];
          load8<TX>(xm + mm * k + j * 8, xv);
#pragma unroll
          for (int r = 0; r < kRows; ++r)
#pragma unroll
            for (int i = 0; i < 8; ++i) acc[r][mm] = fmaf(xv[i], we[r][i], acc[r][mm]);
        }
      }
    }
  } else {  // any k, any alignment: one weight a lane
    for (int64_t c = lane; c < k; c += 32) {
      float we[kRows];
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        we[r] = 0.f;
        if (live[r]) {
          const bool plus = (packed[(row0 + r) * bpr + (c >> 3)] >> (c & 7)) & 1;
          we[r] = to_f32(w_base[(row0 + r) * k + c]) + (plus ? s[r] : -s[r]);
        }
      }
#pragma unroll
      for (int mm = 0; mm < MT; ++mm) {
        if (mm < rows_left) {
          const float xv = to_f32(xm[mm * k + c]);
#pragma unroll
          for (int r = 0; r < kRows; ++r) acc[r][mm] = fmaf(xv, we[r], acc[r][mm]);
        }
      }
    }
  }
#pragma unroll
  for (int r = 0; r < kRows; ++r)
#pragma unroll
    for (int mm = 0; mm < MT; ++mm) {
      const float v = warp_sum(acc[r][mm]);
      if (lane == 0 && live[r] && mm < rows_left) y[(m0 + mm) * n + row0 + r] = from_f32<TX>(v);
    }
}

template <typename TX, typename W, int MT, int kRows>
cudaError_t launch_fused(const void* x, int64_t m, int64_t k, const void* w, const uint8_t* packed, int64_t n,
                         const float* scale, bool per_row, void* y, cudaStream_t stream) {
  const bool vec = k % 8 == 0 && aligned16(x) && aligned16(w);
  const dim3 grid(ceil_div(n, kWarps * kRows), ceil_div(m, MT));
  fused_gemv_kernel<TX, W, MT, kRows><<<grid, kThreads, 0, stream>>>(
      static_cast<const TX*>(x), m, k, static_cast<const W*>(w), packed, n, scale, per_row, vec, static_cast<TX*>(y));
  return cudaGetLastError();
}

template <typename TX, typename W>
cudaError_t dispatch_m(const void* x, int64_t m, int64_t k, const void* w, const uint8_t* packed, int64_t n,
                       const float* scale, bool per_row, void* y, cudaStream_t stream) {
  if (m == 1) return launch_fused<TX, W, 1, 4>(x, m, k, w, packed, n, scale, per_row, y, stream);
  if (m == 2) return launch_fused<TX, W, 2, 2>(x, m, k, w, packed, n, scale, per_row, y, stream);
  return launch_fused<TX, W, kFusedMaxRows, 2>(x, m, k, w, packed, n, scale, per_row, y, stream);
}

}  // namespace

cudaError_t sign_matmul_fused(DType x_t, const void* x, int64_t m, int64_t k, DType w_t, const void* w_base,
                              const uint8_t* packed, int64_t n, const float* scale, bool per_row, void* y,
                              cudaStream_t stream) {
  if (m == 0 || n == 0) return cudaSuccess;
  if (m > kFusedMaxRows || (x_t != w_t && x_t != DType::kFloat32)) return cudaErrorInvalidValue;
  if (x_t == DType::kFloat32) {
    switch (w_t) {
      case DType::kFloat16: return dispatch_m<float, __half>(x, m, k, w_base, packed, n, scale, per_row, y, stream);
      case DType::kBFloat16:
        return dispatch_m<float, __nv_bfloat16>(x, m, k, w_base, packed, n, scale, per_row, y, stream);
      default: return dispatch_m<float, float>(x, m, k, w_base, packed, n, scale, per_row, y, stream);
    }
  }
  if (x_t == DType::kFloat16) return dispatch_m<__half, __half>(x, m, k, w_base, packed, n, scale, per_row, y, stream);
  return dispatch_m<__nv_bfloat16, __nv_bfloat16>(x, m, k, w_base, packed, n, scale, per_row, y, stream);
}

}  // namespace cuda
}  // namespace deltacomp
