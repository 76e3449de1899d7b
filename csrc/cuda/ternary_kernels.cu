// CUDA kernel of ternary_matmul on the TERNARY_CSR runtime form: y[m, r] = scale_r * (sum of x[m, c] over
// the row's +1 columns - sum over its -1 columns). Row r's +1 columns are cols[row_ptr[r] : neg_start[r]],
// its -1 columns cols[neg_start[r] : row_ptr[r+1]] (positives first, so no lane branches on a sign).
//
// Work split: grid.x = ceil(n / kWarps), one warp per output row; grid.y = ceil(m / MT). Lanes take
// consecutive nonzeros (coalesced 4-byte column loads) and gather x through L1, where a decode-sized x
// stays resident.
#include "common.cuh"

namespace deltacomp {
namespace cuda {
namespace {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int64_t kMaxGridY = 65535;

template <typename T, int MT>
__global__ void __launch_bounds__(kThreads) ternary_kernel(
    const T* __restrict__ x, int64_t m, int64_t k,     // x (m, k)
    const int64_t* __restrict__ row_ptr,               // (n + 1)
    const int64_t* __restrict__ neg_start,             // (n)
    const int32_t* __restrict__ cols,                  // (nnz)
    int64_t nnz, int64_t n, const float* __restrict__ scale, bool per_row,
    T* __restrict__ y) {                               // (m, n)
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + warp;
  if (row >= n) return;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * MT;
  const int64_t rows_left = m - m0;
  const T* xm = x + m0 * k;
  // The form is not re-validated on the host (that would need a sync): clamp the ranges into [0, nnz] and
  // turn a column outside [0, k) into NaN, so a bad form is visible and never reads outside x.
  const int64_t p1 = min(max(row_ptr[row + 1], int64_t(0)), nnz), p0 = min(max(row_ptr[row], int64_t(0)), p1);
  const int64_t pn = min(max(neg_start[row], p0), p1);
  const float bad = __int_as_float(0x7fc00000);
  float acc[MT];
#pragma unroll
  for (int mm = 0; mm < MT; ++mm) acc[mm] = 0.f;
  for (int64_t p = p0 + lane; p < pn; p += 32) {
    const int64_t c = __ldg(cols + p);
    const bool ok = c >= 0 && c < k;
#pragma unroll
    for (int mm = 0; mm < MT; ++mm)
      if (mm < rows_left) acc[mm] += ok ? to_f32(xm[mm * k + c]) : bad;
  }
  for (int64_t p = pn + lane; p < p1; p += 32) {
    const int64_t c = __ldg(cols + p);
    const bool ok = c >= 0 && c < k;
#pragma unroll
    for (int mm = 0; mm < MT; ++mm)
      if (mm < rows_left) acc[mm] -= ok ? to_f32(xm[mm * k + c]) : bad;
  }
  const float s = per_row ? scale[row] : scale[0];
#pragma unroll
  for (int mm = 0; mm < MT; ++mm) {
    const float v = warp_sum(acc[mm]);
    if (lane == 0 && mm < rows_left) y[(m0 + mm) * n + row] = from_f32<T>(v * s);
  }
}

template <typename T, int MT>
cudaError_t launch(const void* x, int64_t m, int64_t k, const int64_t* row_ptr, const int64_t* neg_start,
                   const int32_t* cols, int64_t nnz, int64_t n, const float* scale, bool per_row, void* y,
                   cudaStream_t stream) {
  const int64_t tiles = (m + MT - 1) / MT;
  for (int64_t t0 = 0; t0 < tiles; t0 += kMaxGridY) {
    const int64_t ty = tiles - t0 < kMaxGridY ? tiles - t0 : kMaxGridY;
    const int64_t r0 = t0 * MT;
    const dim3 grid(ceil_div(n, kWarps), static_cast<unsigned>(ty));
    ternary_kernel<T, MT><<<grid, kThreads, 0, stream>>>(static_cast<const T*>(x) + r0 * k, m - r0, k, row_ptr,
                                                         neg_start, cols, nnz, n, scale, per_row,
                                                         static_cast<T*>(y) + r0 * n);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

template <typename T>
cudaError_t dispatch(const void* x, int64_t m, int64_t k, const int64_t* row_ptr, const int64_t* neg_start,
                     const int32_t* cols, int64_t nnz, int64_t n, const float* scale, bool per_row, void* y,
                   cudaStream_t stream) {
  if (m == 1) return launch<T, 1>(x, m, k, row_ptr, neg_start, cols, nnz, n, scale, per_row, y, stream);
  if (m <= 4) return launch<T, 4>(x, m, k, row_ptr, neg_start, cols, nnz, n, scale, per_row, y, stream);
  return launch<T, 8>(x, m, k, row_ptr, neg_start, cols, nnz, n, scale, per_row, y, stream);
}

}  // namespace

cudaError_t ternary_matmul(DType t, const void* x, int64_t m, int64_t k, const int64_t* row_ptr,
                           const int64_t* neg_start, const int32_t* cols, int64_t nnz, int64_t n,
                           const float* scale, bool per_row, void* y, cudaStream_t stream) {
  if (m == 0 || n == 0) return cudaSuccess;
  switch (t) {
    case DType::kFloat16: return dispatch<__half>(x, m, k, row_ptr, neg_start, cols, nnz, n, scale, per_row, y, stream);
    case DType::kBFloat16:
      return dispatch<__nv_bfloat16>(x, m, k, row_ptr, neg_start, cols, nnz, n, scale, per_row, y, stream);
    default: return dispatch<float>(x, m, k, row_ptr, neg_start, cols, nnz, n, scale, per_row, y, stream);
  }
}

}  // namespace cuda
}  // namespace deltacomp
