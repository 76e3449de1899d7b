// CUDA kernels of the SIGNS ops: pack / unpack, dequantize (the GEMM path for large M), and the small-M
// sign matmul shared by the single-delta and multi-tenant (BGMV-style) ops.
//
// SIGNS: uint8 (n, bpr = ceil(k/8)); bit i of byte j is weight 8j+i of the row, 1 = +1, 0 = -1.
//
// sign_gemv_kernel work split (one warp per output row, MT rows of x per launch tile):
//
//     grid.x = ceil(n / kWarps)  ->  block b owns output rows [b*kWarps, (b+1)*kWarps), one per warp
//     grid.y = ceil(m / MT)      ->  x rows [y*MT, y*MT+MT)  (multi-tenant: MT = 1, one x row each)
//     lane l of a warp reads 16-byte words c = l, l+32, ... of its row (128 weights each, coalesced
//     512-byte warp loads, two in flight), and the matching 128 x values of each of its MT rows through
//     L1; the warp sums its lanes with shuffles and lane 0 writes y[m, row] * scale.
#include "common.cuh"

namespace deltacomp {
namespace cuda {
namespace {

constexpr int kWarps = 8;                 // warps (output rows) per block
constexpr int kThreads = kWarps * 32;
constexpr int64_t kMaxGridY = 65535;      // CUDA's limit on gridDim.y

// One 16-byte chunk of signs (128 weights from k0) against MT rows of x. Loops run weight-slot outer,
// x row inner, so only one 8-value slice of x per row is live (no spills at MT = 8); two accumulator
// chains per row keep the FADDs of a row from waiting on each other.
template <typename T, int MT>
__device__ __forceinline__ void sign_chunk(const T* __restrict__ x, int64_t rows_left, int64_t k, int64_t k0,
                                           const uint4& v, float (&acc)[MT][2]) {
  const uint32_t words[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int w = 0; w < 4; ++w) {
#pragma unroll
    for (int q = 0; q < 4; ++q) {
#pragma unroll
      for (int mm = 0; mm < MT; ++mm) {
        if (mm < rows_left) {
          float xv[8];
          load8<T>(x + mm * k + k0 + w * 32 + q * 8, xv);
#pragma unroll
          for (int i = 0; i < 8; ++i) acc[mm][i & 1] += signed_by_bit(xv[i], words[w], q * 8 + i);
        }
      }
    }
  }
}

template <typename T, int MT>
__global__ void __launch_bounds__(kThreads, MT == 1 ? 4 : 2) sign_gemv_kernel(
    const T* __restrict__ x,              // (m, k) row-major, this launch's first row
    int64_t m, int64_t k,                 // rows of x in this launch, reduction length
    const uint8_t* __restrict__ packed,   // SIGNS (n, bpr), or a stack (tenants, n, bpr) with index
    int64_t n,                            // output columns (rows of packed)
    const float* __restrict__ scale,      // (1,) or (n,) [stack: (tenants,) or (tenants, n)]
    bool per_row,                         // scale has one entry per output row
    const int64_t* __restrict__ index,    // null, or (m,) delta of each x row (-1: zero row); MT == 1
    int64_t tenants,                      // deltas in the stack (index mode)
    bool vec,                             // rows 16-byte aligned, x rows 16-byte aligned: chunk path
    T* __restrict__ y) {                  // (m, n)
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + warp;
  if (row >= n) return;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * MT;
  const int64_t rows_left = m - m0;
  const int64_t bpr = (k + 7) >> 3;
  const uint8_t* prow = packed + row * bpr;
  const float* sc = scale;
  if (index != nullptr) {
    const int64_t t = index[m0];
    if (t < 0 || t >= tenants) {  // -1: no delta; out of range (not checked on the host, to avoid a sync):
      // NaN, never a read outside the stack
      if (lane == 0) y[m0 * n + row] = from_f32<T>(t == -1 ? 0.f : __int_as_float(0x7fc00000));
      return;
    }
    prow += t * n * bpr;
    sc += per_row ? t * n : t;
  }
  const T* xm = x + m0 * k;
  float acc[MT][2];
#pragma unroll
  for (int mm = 0; mm < MT; ++mm) acc[mm][0] = acc[mm][1] = 0.f;

  int64_t done = 0;  // bytes of the row handled by the 16-byte chunk path
  if (vec) {
    const int64_t nfull = k >> 7;
    const uint4* p4 = reinterpret_cast<const uint4*>(prow);
    for (int64_t c = lane; c < nfull; c += 64) {
      const bool has_b = c + 32 < nfull;
      const uint4 a = __ldg(p4 + c);
      const uint4 b = has_b ? __ldg(p4 + c + 32) : make_uint4(0u, 0u, 0u, 0u);
      sign_chunk<T, MT>(xm, rows_left, k, c << 7, a, acc);
      if (has_b) sign_chunk<T, MT>(xm, rows_left, k, (c + 32) << 7, b, acc);
    }
    done = nfull << 4;
  }
  for (int64_t bi = done + lane; bi < bpr; bi += 32) {  // the rest, 8 weights (one byte) a lane
    const uint32_t byte = prow[bi];
    const int64_t k0 = bi << 3;
    const int kn = static_cast<int>(k - k0 < 8 ? k - k0 : 8);
#pragma unroll
    for (int mm = 0; mm < MT; ++mm) {
      if (mm >= rows_left) break;
      const T* xr = xm + mm * k + k0;
      for (int i = 0; i < kn; ++i) acc[mm][0] += signed_by_bit(to_f32(xr[i]), byte, i);
    }
  }
  const float s = per_row ? sc[row] : sc[0];
#pragma unroll
  for (int mm = 0; mm < MT; ++mm) {
    const float v = warp_sum(acc[mm][0] + acc[mm][1]);
    if (lane == 0 && mm < rows_left) y[(m0 + mm) * n + row] = from_f32<T>(v * s);
  }
}

template <typename T, int MT>
cudaError_t launch_gemv(const T* x, int64_t m, int64_t k, const uint8_t* packed, int64_t n, const float* scale,
                        bool per_row, const int64_t* index, int64_t tenants, T* y, cudaStream_t stream) {
  const int64_t bpr = (k + 7) / 8;
  const bool vec = aligned16(packed) && bpr % 16 == 0 && aligned16(x) && k % 8 == 0;
  const int64_t tiles = (m + MT - 1) / MT;
  for (int64_t t0 = 0; t0 < tiles; t0 += kMaxGridY) {  // gridDim.y is capped: launch in slices
    const int64_t ty = tiles - t0 < kMaxGridY ? tiles - t0 : kMaxGridY;
    const int64_t r0 = t0 * MT;
    const dim3 grid(ceil_div(n, kWarps), static_cast<unsigned>(ty));
    sign_gemv_kernel<T, MT><<<grid, kThreads, 0, stream>>>(x + r0 * k, m - r0, k, packed, n, scale, per_row,
                                                           index ? index + r0 : nullptr, tenants, vec,
                                                           y + r0 * n);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

template <typename T>
cudaError_t dispatch_gemv(const void* x, int64_t m, int64_t k, const uint8_t* packed, int64_t n,
                          const float* scale, bool per_row, const int64_t* index, int64_t tenants, void* y,
                          cudaStream_t stream) {
  const T* xt = static_cast<const T*>(x);
  T* yt = static_cast<T*>(y);
  if (index != nullptr || m == 1) return launch_gemv<T, 1>(xt, m, k, packed, n, scale, per_row, index, tenants, yt, stream);
  if (m == 2) return launch_gemv<T, 2>(xt, m, k, packed, n, scale, per_row, nullptr, tenants, yt, stream);
  if (m <= 4) return launch_gemv<T, 4>(xt, m, k, packed, n, scale, per_row, nullptr, tenants, yt, stream);
  return launch_gemv<T, kSignMaxTile>(xt, m, k, packed, n, scale, per_row, nullptr, tenants, yt, stream);
}

__global__ void pack_signs_kernel(const float* __restrict__ x, int64_t n, int64_t k, uint8_t* __restrict__ out) {
  const int64_t bpr = (k + 7) >> 3;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n * bpr) return;
  const int64_t r = i / bpr, b = i % bpr, k0 = b * 8;
  uint32_t byte = 0;
  for (int j = 0; j < 8 && k0 + j < k; ++j) byte |= static_cast<uint32_t>(x[r * k + k0 + j] >= 0.f) << j;
  out[i] = static_cast<uint8_t>(byte);
}

__global__ void unpack_signs_kernel(const uint8_t* __restrict__ packed, int64_t n, int64_t k, float* __restrict__ out) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n * k) return;
  const int64_t r = i / k, c = i % k;
  out[i] = (packed[r * ((k + 7) >> 3) + (c >> 3)] >> (c & 7)) & 1 ? 1.f : -1.f;
}

template <typename W, typename O>
__global__ void sign_dequant_kernel(const uint8_t* __restrict__ packed, int64_t n, int64_t k,
                                    const float* __restrict__ scale, bool per_row, const W* __restrict__ w_base,
                                    O* __restrict__ out) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n * k) return;
  const int64_t r = i / k, c = i % k;
  const float s = per_row ? scale[r] : scale[0];
  const bool plus = (packed[r * ((k + 7) >> 3) + (c >> 3)] >> (c & 7)) & 1;
  const float base = w_base != nullptr ? to_f32(w_base[i]) : 0.f;
  out[i] = from_f32<O>(base + (plus ? s : -s));
}

template <typename W>
cudaError_t dequant_out(const uint8_t* packed, int64_t n, int64_t k, const float* scale, bool per_row,
                        const W* w_base, void* out, DType out_t, cudaStream_t stream) {
  const unsigned blocks = ceil_div(n * k, 256);
  if (blocks == 0) return cudaSuccess;
  switch (out_t) {
    case DType::kFloat32:
      sign_dequant_kernel<W, float><<<blocks, 256, 0, stream>>>(packed, n, k, scale, per_row, w_base,
                                                                static_cast<float*>(out));
      break;
    case DType::kFloat16:
      sign_dequant_kernel<W, __half><<<blocks, 256, 0, stream>>>(packed, n, k, scale, per_row, w_base,
                                                                 static_cast<__half*>(out));
      break;
    case DType::kBFloat16:
      sign_dequant_kernel<W, __nv_bfloat16><<<blocks, 256, 0, stream>>>(packed, n, k, scale, per_row, w_base,
                                                                        static_cast<__nv_bfloat16*>(out));
      break;
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t pack_signs(const float* x, int64_t n, int64_t k, uint8_t* out, cudaStream_t stream) {
  const unsigned blocks = ceil_div(n * ((k + 7) / 8), 256);
  if (blocks == 0) return cudaSuccess;
  pack_signs_kernel<<<blocks, 256, 0, stream>>>(x, n, k, out);
  return cudaGetLastError();
}

cudaError_t unpack_signs(const uint8_t* packed, int64_t n, int64_t k, float* out, cudaStream_t stream) {
  const unsigned blocks = ceil_div(n * k, 256);
  if (blocks == 0) return cudaSuccess;
  unpack_signs_kernel<<<blocks, 256, 0, stream>>>(packed, n, k, out);
  return cudaGetLastError();
}

cudaError_t sign_dequant(const uint8_t* packed, int64_t n, int64_t k, const float* scale, bool per_row,
                         const void* w_base, DType w_t, void* out, DType out_t, cudaStream_t stream) {
  switch (w_t) {
    case DType::kFloat16:
      return dequant_out(packed, n, k, scale, per_row, static_cast<const __half*>(w_base), out, out_t, stream);
    case DType::kBFloat16:
      return dequant_out(packed, n, k, scale, per_row, static_cast<const __nv_bfloat16*>(w_base), out, out_t,
                         stream);
    default:
      return dequant_out(packed, n, k, scale, per_row, static_cast<const float*>(w_base), out, out_t, stream);
  }
}

cudaError_t sign_matmul(DType t, const void* x, int64_t m, int64_t k, const uint8_t* packed, int64_t n,
                        const float* scale, bool per_row, const int64_t* index, int64_t tenants, void* y,
                        cudaStream_t stream) {
  if (m == 0 || n == 0) return cudaSuccess;
  switch (t) {
    case DType::kFloat16: return dispatch_gemv<__half>(x, m, k, packed, n, scale, per_row, index, tenants, y, stream);
    case DType::kBFloat16:
      return dispatch_gemv<__nv_bfloat16>(x, m, k, packed, n, scale, per_row, index, tenants, y, stream);
    default: return dispatch_gemv<float>(x, m, k, packed, n, scale, per_row, index, tenants, y, stream);
  }
}

}  // namespace cuda
}  // namespace deltacomp
