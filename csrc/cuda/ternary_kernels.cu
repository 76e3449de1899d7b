// CUDA kernel of ternary_matmul on the TERNARY_CSR runtime form: y[m, r] = scale_r * (sum of x[m, c] over
// the row's +1 columns - sum over its -1 columns). Row r's +1 columns are cols[row_ptr[r] : neg_start[r]],
// its -1 columns cols[neg_start[r] : row_ptr[r+1]] (positives first, so no lane branches on a sign).
//
// Work split: grid.x = ceil(n / (kWarps * kRowsPerWarp)), each warp takes kRowsPerWarp output rows in
// turn; grid.y = ceil(m / MT). Lanes take
// consecutive nonzeros (coalesced 4-byte column loads) and gather x through L1, where a decode-sized x
// stays resident.
#include "common.cuh"

namespace deltacomp {
namespace cuda {
namespace {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int64_t kMaxGridY = 65535;
constexpr int kRowsPerWarp = 4;  // rows a warp takes in turn: fewer blocks, so x is staged fewer times

// SMEM: the block first copies its MT rows of x into shared memory as fp32 (dynamic, MT * k floats), so the
// random column gathers hit shared-memory banks instead of L1 lines (a 32-lane gather touches up to 32
// lines but only a few banks twice).
template <typename T, int MT, bool SMEM>
__global__ void __launch_bounds__(kThreads) ternary_kernel(
    const T* __restrict__ x, int64_t m, int64_t k,     // x (m, k)
    const int64_t* __restrict__ row_ptr,               // (n + 1)
    const int64_t* __restrict__ neg_start,             // (n)
    const int32_t* __restrict__ cols,                  // (nnz)
    int64_t nnz, int64_t n, const float* __restrict__ scale, bool per_row,
    T* __restrict__ y) {                               // (m, n)
  extern __shared__ float sx[];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * MT;
  const int64_t rows_left = m - m0;
  const T* xm = x + m0 * k;
  if (SMEM) {
#pragma unroll
    for (int mm = 0; mm < MT; ++mm)
      for (int64_t c = threadIdx.x; c < k; c += kThreads) sx[mm * k + c] = mm < rows_left ? to_f32(xm[mm * k + c]) : 0.f;
    __syncthreads();
  }
  const float bad = __int_as_float(0x7fc00000);
  for (int rr = 0; rr < kRowsPerWarp; ++rr) {
  const int64_t row = (static_cast<int64_t>(blockIdx.x) * kWarps + warp) * kRowsPerWarp + rr;
  if (row >= n) return;
  // The form is not re-validated on the host (that would need a sync): clamp the ranges into [0, nnz] and
  // turn a column outside [0, k) into NaN, so a bad form is visible and never reads outside x.
  const int64_t p1 = min(max(row_ptr[row + 1], int64_t(0)), nnz), p0 = min(max(row_ptr[row], int64_t(0)), p1);
  const int64_t pn = min(max(neg_start[row], p0), p1);
  float acc[MT];
#pragma unroll
  for (int mm = 0; mm < MT; ++mm) acc[mm] = 0.f;
  for (int64_t p = p0 + lane; p < pn; p += 32) {
    const int64_t c = __ldg(cols + p);
    const bool ok = c >= 0 && c < k;
#pragma unroll
    for (int mm = 0; mm < MT; ++mm)
      if (mm < rows_left) acc[mm] += ok ? (SMEM ? sx[mm * k + c] : to_f32(xm[mm * k + c])) : bad;
  }
  for (int64_t p = pn + lane; p < p1; p += 32) {
    const int64_t c = __ldg(cols + p);
    const bool ok = c >= 0 && c < k;
#pragma unroll
    for (int mm = 0; mm < MT; ++mm)
      if (mm < rows_left) acc[mm] -= ok ? (SMEM ? sx[mm * k + c] : to_f32(xm[mm * k + c])) : bad;
  }
  const float s = per_row ? scale[row] : scale[0];
#pragma unroll
  for (int mm = 0; mm < MT; ++mm) {
    const float v = warp_sum(acc[mm]);
    if (lane == 0 && mm < rows_left) y[(m0 + mm) * n + row] = from_f32<T>(v * s);
  }
  }
}

constexpr int64_t kSmemMax = 96 * 1024;  // bytes of x staged per block (opt-in above the default 48 KiB)

template <typename T, int MT>
cudaError_t launch(const void* x, int64_t m, int64_t k, const int64_t* row_ptr, const int64_t* neg_start,
                   const int32_t* cols, int64_t nnz, int64_t n, const float* scale, bool per_row, void* y,
                   cudaStream_t stream) {
  const int64_t smem = MT * k * static_cast<int64_t>(sizeof(float));
  const bool use_smem = smem <= kSmemMax;
  if (use_smem && smem > 48 * 1024) {
    const cudaError_t err = cudaFuncSetAttribute(ternary_kernel<T, MT, true>,
                                                 cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (err != cudaSuccess) return err;
  }
  const int64_t tiles = (m + MT - 1) / MT;
  for (int64_t t0 = 0; t0 < tiles; t0 += kMaxGridY) {
    const int64_t ty = tiles - t0 < kMaxGridY ? tiles - t0 : kMaxGridY;
    const int64_t r0 = t0 * MT;
    const dim3 grid(ceil_div(n, kWarps * kRowsPerWarp), static_cast<unsigned>(ty));
    const T* xs = static_cast<const T*>(x) + r0 * k;
    T* ys = static_cast<T*>(y) + r0 * n;
    if (use_smem)
      ternary_kernel<T, MT, true><<<grid, kThreads, smem, stream>>>(xs, m - r0, k, row_ptr, neg_start, cols, nnz, n,
                                                                     scale, per_row, ys);
    else
      ternary_kernel<T, MT, false><<<grid, kThreads, 0, stream>>>(xs, m - r0, k, row_ptr, neg_start, cols, nnz, n,
                                                                   scale, per_row, ys);
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
