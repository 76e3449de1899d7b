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
constexpr int64_t kMaxGridY = 65535;      // CUDA's limit on gridDim.y (and gridDim.z)

// Word `wi` (32 weights, LSB first) of a SIGNS row of `bpr` bytes; 0 past the row. words_ok: the row is
// 4-byte aligned and bpr % 4 == 0, so one 32-bit load reads it; else it is assembled from bytes.
__device__ __forceinline__ uint32_t load_word(const uint8_t* __restrict__ row, int64_t wi, int64_t bpr, bool words_ok) {
  const int64_t b0 = wi * 4;
  if (b0 >= bpr) return 0u;
  if (words_ok) return __ldg(reinterpret_cast<const uint32_t*>(row) + wi);
  uint32_t w = 0;
#pragma unroll
  for (int i = 0; i < 4; ++i)
    if (b0 + i < bpr) w |= static_cast<uint32_t>(__ldg(row + b0 + i)) << (8 * i);
  return w;
}

// Small-M sign matmul. Block: kWarps warps x R output rows each; MT rows of x. The reduction axis is
// walked in tiles of 32 * WPL words (1024 * WPL weights): the block stages the tile of its MT x rows in
// shared memory as fp32 (coalesced loads, padded layout: conflict-free 16-byte reads), each lane takes
// words lane, lane+32, ... of the tile for each of its warp's R rows (coalesced 128-byte warp loads,
// prefetched one tile ahead) and sums the x values whose bit is 1 (pos) and all x values (all):
// x . sign = 2 * pos - all, so a weight costs one predicated add instead of a sign flip and an add.
template <typename T, int MT, int R, int WPL>
__global__ void __launch_bounds__(kThreads) sign_gemv_kernel(
    const T* __restrict__ x,              // (m, k) row-major, this launch's first row
    int64_t m, int64_t k,                 // rows of x in this launch, reduction length
    const uint8_t* __restrict__ packed,   // SIGNS (n, bpr), or a stack (tenants, n, bpr) with index
    int64_t n,                            // output columns (rows of packed)
    const float* __restrict__ scale,      // (1,) or (n,) [stack: (tenants,) or (tenants, n)]
    bool per_row,                         // scale has one entry per output row
    const int64_t* __restrict__ index,    // null, or (m,) delta of each x row (-1: zero row); MT == 1
    int64_t tenants,                      // deltas in the stack (index mode)
    bool words_ok,                        // 32-bit loads of sign words are aligned and in bounds
    T* __restrict__ y) {                  // (m, n)
  constexpr int kTileWords = 32 * WPL, kTile = 32 * kTileWords, kTileP = padded_len(kTile);
  __shared__ __align__(16) float sx[MT * kTileP];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t row0 = (static_cast<int64_t>(blockIdx.x) * kWarps + warp) * R;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * MT;
  const int rows_left = static_cast<int>(m - m0 < MT ? m - m0 : MT);
  const int64_t bpr = (k + 7) >> 3;
  const uint8_t* base = packed;
  const float* sc = scale;
  if (index != nullptr) {  // one x row per block (MT == 1): the branch is uniform over the block
    const int64_t t = index[m0];
    if (t < 0 || t >= tenants) {  // -1: no delta; out of range (not checked on the host, which would need a
      // sync): NaN, never a read outside the stack
      const float v = t == -1 ? 0.f : __int_as_float(0x7fc00000);
      for (int r = lane; r < R; r += 32)
        if (row0 + r < n) y[m0 * n + row0 + r] = from_f32<T>(v);
      return;
    }
    base += t * n * bpr;
    sc += per_row ? t * n : t;
  }
  float pos[R][MT], all[MT];
#pragma unroll
  for (int mm = 0; mm < MT; ++mm) {
    all[mm] = 0.f;
#pragma unroll
    for (int r = 0; r < R; ++r) pos[r][mm] = 0.f;
  }
  uint32_t cur[R][WPL];
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int j = 0; j < WPL; ++j)
      cur[r][j] = row0 + r < n ? load_word(base + (row0 + r) * bpr, lane + 32 * j, bpr, words_ok) : 0u;

  for (int64_t kt = 0; kt < k; kt += kTile) {
    __syncthreads();  // the previous tile is consumed
    for (int i = threadIdx.x; i < MT * kTile; i += kThreads) {
      const int mm = i / kTile, kk = i % kTile;  // compile-time powers of two: shifts
      const int64_t kg = kt + kk;
      sx[mm * kTileP + padded(kk)] = (mm < rows_left && kg < k) ? to_f32(x[(m0 + mm) * k + kg]) : 0.f;
    }
    __syncthreads();
    uint32_t nxt[R][WPL];  // next tile's words, in flight while this tile is summed
    const int64_t w_next = (kt + kTile) >> 5;
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int j = 0; j < WPL; ++j)
        nxt[r][j] = (row0 + r < n && kt + kTile < k)
                        ? load_word(base + (row0 + r) * bpr, w_next + lane + 32 * j, bpr, words_ok) : 0u;
#pragma unroll
    for (int j = 0; j < WPL; ++j) {
#pragma unroll
      for (int mm = 0; mm < MT; ++mm) {
        if (mm < rows_left) {
          const float4* xs = reinterpret_cast<const float4*>(sx + mm * kTileP + (lane + 32 * j) * 36);
#pragma unroll
          for (int q = 0; q < 8; ++q) {
            const float4 v4 = xs[q];
            const float v[4] = {v4.x, v4.y, v4.z, v4.w};
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              all[mm] += v[e];
#pragma unroll
              for (int r = 0; r < R; ++r)
                if ((cur[r][j] >> (q * 4 + e)) & 1u) pos[r][mm] += v[e];
            }
          }
        }
      }
    }
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int j = 0; j < WPL; ++j) cur[r][j] = nxt[r][j];
  }
#pragma unroll
  for (int mm = 0; mm < MT; ++mm) {
    const float a = warp_sum(all[mm]);
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const float p = warp_sum(pos[r][mm]);
      if (lane == 0 && mm < rows_left && row0 + r < n)
        y[(m0 + mm) * n + row0 + r] = from_f32<T>((2.f * p - a) * (per_row ? sc[row0 + r] : sc[0]));
    }
  }
}

template <typename T, int MT, int R, int WPL>
cudaError_t launch_gemv(const T* x, int64_t m, int64_t k, const uint8_t* packed, int64_t n, const float* scale,
                        bool per_row, const int64_t* index, int64_t tenants, T* y, cudaStream_t stream) {
  const int64_t bpr = (k + 7) / 8;
  const bool words_ok = aligned4(packed) && bpr % 4 == 0;
  const int64_t tiles = (m + MT - 1) / MT;
  for (int64_t t0 = 0; t0 < tiles; t0 += kMaxGridY) {  // gridDim.y is capped: launch in slices
    const int64_t ty = tiles - t0 < kMaxGridY ? tiles - t0 : kMaxGridY;
    const int64_t r0 = t0 * MT;
    const dim3 grid(ceil_div(n, kWarps * R), static_cast<unsigned>(ty));
    sign_gemv_kernel<T, MT, R, WPL><<<grid, kThreads, 0, stream>>>(
        x + r0 * k, m - r0, k, packed, n, scale, per_row, index ? index + r0 : nullptr, tenants, words_ok, y + r0 * n);
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
  // (MT, R, WPL): fewer x rows leave room for more words in flight per lane
  if (index != nullptr || m == 1)
    return launch_gemv<T, 1, 2, 4>(xt, m, k, packed, n, scale, per_row, index, tenants, yt, stream);
  if (m == 2) return launch_gemv<T, 2, 2, 2>(xt, m, k, packed, n, scale, per_row, nullptr, tenants, yt, stream);
  if (m <= 4) return launch_gemv<T, 4, 4, 1>(xt, m, k, packed, n, scale, per_row, nullptr, tenants, yt, stream);
  return launch_gemv<T, kSignMaxTile, 4, 1>(xt, m, k, packed, n, scale, per_row, nullptr, tenants, yt, stream);
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

// grid (n, ceil(bpr / 256)): one thread per sign byte, 8 outputs each (no 64-bit division per element).
__global__ void unpack_signs_kernel(const uint8_t* __restrict__ packed, int64_t n, int64_t k, float* __restrict__ out) {
  const int64_t r = blockIdx.x, b = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  const int64_t bpr = (k + 7) >> 3;
  if (b >= bpr) return;
  const uint32_t byte = packed[r * bpr + b];
  for (int i = 0; i < 8 && b * 8 + i < k; ++i) out[r * k + b * 8 + i] = (byte >> i) & 1u ? 1.f : -1.f;
}

template <typename W, typename O>
__global__ void sign_dequant_kernel(const uint8_t* __restrict__ packed, int64_t n, int64_t k,
                                    const float* __restrict__ scale, bool per_row, const W* __restrict__ w_base,
                                    O* __restrict__ out) {
  const int64_t r = blockIdx.x, b = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  const int64_t bpr = (k + 7) >> 3;
  if (b >= bpr) return;
  const float s = per_row ? scale[r] : scale[0];
  const uint32_t byte = packed[r * bpr + b];
  const int64_t o = r * k + b * 8;
  for (int i = 0; i < 8 && b * 8 + i < k; ++i) {
    const float base = w_base != nullptr ? to_f32(w_base[o + i]) : 0.f;
    out[o + i] = from_f32<O>(base + ((byte >> i) & 1u ? s : -s));
  }
}

template <typename W>
cudaError_t dequant_out(const uint8_t* packed, int64_t n, int64_t k, const float* scale, bool per_row,
                        const W* w_base, void* out, DType out_t, cudaStream_t stream) {
  if (n == 0 || k == 0) return cudaSuccess;
  const dim3 blocks(static_cast<unsigned>(n), ceil_div((k + 7) / 8, 256));
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
  if (n == 0 || k == 0) return cudaSuccess;
  const dim3 blocks(static_cast<unsigned>(n), ceil_div((k + 7) / 8, 256));
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
