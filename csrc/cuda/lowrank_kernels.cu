// CUDA kernels of kbit_lowrank_matmul (svd-mixed, one bit-width group): y = x @ (U diag(s) V)^T with the
// KBITS codes of V (r, k) and U^T (r, n) decoded on the fly; U, V and the delta are never built.
//
// KBITS: code i of a stream sits at bits [i*bits, (i+1)*bits), LSB first; row j of V holds codes
// [j*k, (j+1)*k), row j of U^T codes [j*n, (j+1)*n). Value = zero[g] + code * scale[g], g = column / gs.
//
//   stage 1  tmp (m, r) = (x V^T) * s     grid (ceil(r / kWarps), ceil(m / kTile)): one warp per row j of V,
//                                         lanes over 32-code chunks (`bits` 32-bit words, coalesced)
//   stage 2  acc (m, n) += tmp U^T        grid (ceil(chunks / 128), splits of r, m): one thread per 32
//                                         output columns and a slice of r, fp32 atomics into acc
//   finish   y = acc in x's dtype         (skipped when x is fp32: acc is y)
// The 32-code chunk path needs bits in {2, 3, 4, 8}, the row length and gs multiples of 32 and 4-byte
// aligned streams (then every row starts on a word); anything else takes the one-code-at-a-time kernels.
#include "common.cuh"

namespace deltacomp {
namespace cuda {
namespace {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kTile = 4;          // x rows per stage-1 block
constexpr int kJPerSplit = 16;    // rows of U^T per stage-2 thread (at least)
constexpr int64_t kMaxGrid = 65535;

__device__ __forceinline__ float half_bits(uint16_t h) { return __half2float(__ushort_as_half(h)); }

// float(code) for code < 2^23 without the slow integer-convert unit: 2^23 + code, minus 2^23 (exact).
__device__ __forceinline__ float code_to_f32(uint32_t code) { return __uint_as_float(0x4B000000u | code) - 8388608.f; }

// The 32 codes held by BITS consecutive words, as floats.
template <int BITS>
__device__ __forceinline__ void decode32(const uint32_t (&w)[BITS], float (&q)[32]) {
#pragma unroll
  for (int i = 0; i < 32; ++i) {
    const int bit = i * BITS, wi = bit >> 5, off = bit & 31;
    uint32_t code = w[wi] >> off;
    if (off + BITS > 32) code |= w[wi + 1] << (32 - off);
    q[i] = code_to_f32(code & ((1u << BITS) - 1u));
  }
}

// Code `idx` of a KBITS stream of `nbytes` bytes (any bits in 1..8, any alignment).
__device__ __forceinline__ uint32_t code_at(const uint8_t* __restrict__ q, int64_t nbytes, int64_t idx, int bits) {
  const int64_t bit = idx * bits, byte = bit >> 3;
  uint32_t v = q[byte];
  if (byte + 1 < nbytes) v |= static_cast<uint32_t>(q[byte + 1]) << 8;
  return (v >> (bit & 7)) & ((1u << bits) - 1u);
}

// Stage 1's end: each x row's warp total times s_j into tmp[(m0 + mm) * r + j] (out = tmp + m0*r + j).
__device__ __forceinline__ void store_t(const float (&acc)[kTile], float sj, int lane, int64_t rows_left,
                                        float* __restrict__ out, int64_t r) {
#pragma unroll
  for (int mm = 0; mm < kTile; ++mm) {
    const float v = warp_sum(acc[mm]);
    if (lane == 0 && mm < rows_left) out[mm * r] = v * sj;
  }
}

// Stage 1, chunk path: block = kWarps rows j of V; the k axis in tiles of 1024 x values staged in shared
// memory (fp32, padded: conflict-free 16-byte reads) for kTile x rows, shared by the block's 8 V rows;
// lane l takes chunk l of the tile (32 codes = BITS words, coalesced across lanes).
template <typename T, int BITS>
__global__ void __launch_bounds__(kThreads) stage1_fast(
    const T* __restrict__ x, int64_t m, int64_t k, int64_t r, int64_t gs,
    const uint32_t* __restrict__ vq,      // KBITS stream of V as words
    const uint16_t* __restrict__ vsc, const uint16_t* __restrict__ vz,   // fp16 (r, ceil(k / gs))
    const float* __restrict__ s, float* __restrict__ tmp) {
  constexpr int kKT = 1024, kKTP = padded_len(kKT);
  __shared__ __align__(16) float sx[kTile * kKTP];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kWarps + warp;
  const bool live = j < r;  // warps past r still help stage x and meet the barriers
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kTile;
  const int rows_left = static_cast<int>(m - m0 < kTile ? m - m0 : kTile);
  const int64_t chunks = k >> 5, groups = (k + gs - 1) / gs;
  const uint32_t* row = vq + (live ? j : 0) * chunks * BITS;
  float acc[kTile] = {0.f, 0.f, 0.f, 0.f};
  for (int64_t kt = 0; kt < k; kt += kKT) {
    __syncthreads();
    for (int i = threadIdx.x; i < kTile * kKT; i += kThreads) {
      const int mm = i / kKT, kk = i % kKT;
      const int64_t kg = kt + kk;
      sx[mm * kKTP + padded(kk)] = (mm < rows_left && kg < k) ? to_f32(x[(m0 + mm) * k + kg]) : 0.f;
    }
    __syncthreads();
    const int64_t c = (kt >> 5) + lane;
    if (!live || c >= chunks) continue;
    uint32_t w[BITS];
#pragma unroll
    for (int b = 0; b < BITS; ++b) w[b] = __ldg(row + c * BITS + b);
    const int64_t g = (c << 5) / gs;
    const float sc = half_bits(vsc[j * groups + g]), z = half_bits(vz[j * groups + g]);
    float q[32];
    decode32<BITS>(w, q);
#pragma unroll
    for (int mm = 0; mm < kTile; ++mm) {
      if (mm < rows_left) {
        const float4* xs = reinterpret_cast<const float4*>(sx + mm * kKTP + lane * 36);
        float sxs = 0.f, sxq = 0.f;
#pragma unroll
        for (int h = 0; h < 8; ++h) {
          const float4 v = xs[h];
          sxs += (v.x + v.y) + (v.z + v.w);
          sxq = fmaf(v.x, q[4 * h], sxq);
          sxq = fmaf(v.y, q[4 * h + 1], sxq);
          sxq = fmaf(v.z, q[4 * h + 2], sxq);
          sxq = fmaf(v.w, q[4 * h + 3], sxq);
        }
        acc[mm] += sc * sxq + z * sxs;
      }
    }
  }
  if (!live) return;
  store_t(acc, s[j], lane, rows_left, tmp + m0 * r + j, r);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) stage1_generic(
    const T* __restrict__ x, int64_t m, int64_t k, int64_t r, int64_t gs, int bits,
    const uint8_t* __restrict__ vq, int64_t vbytes, const uint16_t* __restrict__ vsc,
    const uint16_t* __restrict__ vz, const float* __restrict__ s, float* __restrict__ tmp) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kWarps + warp;
  if (j >= r) return;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kTile, rows_left = m - m0;
  const int64_t groups = (k + gs - 1) / gs;
  float acc[kTile] = {0.f, 0.f, 0.f, 0.f};
  for (int64_t c = lane; c < k; c += 32) {
    const int64_t g = c / gs;
    const float v = half_bits(vz[j * groups + g]) +
                    static_cast<float>(code_at(vq, vbytes, j * k + c, bits)) * half_bits(vsc[j * groups + g]);
#pragma unroll
    for (int mm = 0; mm < kTile; ++mm)
      if (mm < rows_left) acc[mm] = fmaf(to_f32(x[(m0 + mm) * k + c]), v, acc[mm]);
  }
  store_t(acc, s[j], lane, rows_left, tmp + m0 * r + j, r);
}

template <int BITS>
__global__ void __launch_bounds__(128) stage2_fast(
    const float* __restrict__ tmp, int64_t r, int64_t n, int64_t gs, int64_t j_per,
    const uint32_t* __restrict__ uq, const uint16_t* __restrict__ usc, const uint16_t* __restrict__ uz,
    float* __restrict__ acc) {         // (m, n), zeroed; x row = blockIdx.z
  const int64_t chunks = n >> 5;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= chunks) return;
  const int64_t mm = blockIdx.z;
  const int64_t j0 = static_cast<int64_t>(blockIdx.y) * j_per;
  const int64_t j1 = j0 + j_per < r ? j0 + j_per : r;
  const int64_t groups = (n + gs - 1) / gs, g = (c << 5) / gs;
  float a[32];
#pragma unroll
  for (int i = 0; i < 32; ++i) a[i] = 0.f;
  float bsum = 0.f;  // sum over j of t_j * zero_j: the same for all 32 columns of the chunk
  for (int64_t j = j0; j < j1; ++j) {
    uint32_t w[BITS];
#pragma unroll
    for (int b = 0; b < BITS; ++b) w[b] = __ldg(uq + (j * chunks + c) * BITS + b);
    const float t = __ldg(tmp + mm * r + j);
    const float sc = t * half_bits(usc[j * groups + g]);
    bsum = fmaf(t, half_bits(uz[j * groups + g]), bsum);
    float q[32];
    decode32<BITS>(w, q);
#pragma unroll
    for (int i = 0; i < 32; ++i) a[i] = fmaf(sc, q[i], a[i]);
  }
  float* out = acc + mm * n + (c << 5);
#pragma unroll
  for (int i = 0; i < 32; ++i) atomicAdd(out + i, a[i] + bsum);
}

__global__ void stage2_generic(const float* __restrict__ tmp, int64_t m, int64_t r, int64_t n, int64_t gs, int bits,
                               const uint8_t* __restrict__ uq, int64_t ubytes, const uint16_t* __restrict__ usc,
                               const uint16_t* __restrict__ uz, float* __restrict__ acc) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= m * n) return;
  const int64_t mm = i / n, col = i % n, groups = (n + gs - 1) / gs, g = col / gs;
  float v = 0.f;
  for (int64_t j = 0; j < r; ++j) {
    const float u = half_bits(uz[j * groups + g]) +
                    static_cast<float>(code_at(uq, ubytes, j * n + col, bits)) * half_bits(usc[j * groups + g]);
    v = fmaf(tmp[mm * r + j], u, v);
  }
  acc[i] = v;
}

template <typename T>
__global__ void to_dtype(const float* __restrict__ acc, int64_t count, T* __restrict__ y) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < count) y[i] = from_f32<T>(acc[i]);
}

bool fast_bits(int bits) { return bits == 2 || bits == 3 || bits == 4 || bits == 8; }

template <typename T, int BITS>
void launch_stage1_fast(const void* x, int64_t m, int64_t k, int64_t r, int64_t gs, const uint8_t* vq,
                        const uint16_t* vsc, const uint16_t* vz, const float* s, float* tmp, cudaStream_t st) {
  const int64_t tiles = (m + kTile - 1) / kTile;
  for (int64_t t0 = 0; t0 < tiles; t0 += kMaxGrid) {
    const int64_t ty = tiles - t0 < kMaxGrid ? tiles - t0 : kMaxGrid;
    stage1_fast<T, BITS><<<dim3(ceil_div(r, kWarps), static_cast<unsigned>(ty)), kThreads, 0, st>>>(
        static_cast<const T*>(x) + t0 * kTile * k, m - t0 * kTile, k, r, gs,
        reinterpret_cast<const uint32_t*>(vq), vsc, vz, s, tmp + t0 * kTile * r);
  }
}

template <typename T>
cudaError_t stage1(const void* x, int64_t m, int64_t k, int64_t r, int bits, int64_t gs, const uint8_t* vq,
                   const uint16_t* vsc, const uint16_t* vz, const float* s, float* tmp, cudaStream_t st) {
  if (fast_bits(bits) && k % 32 == 0 && gs % 32 == 0 && aligned4(vq)) {
    switch (bits) {
      case 2: launch_stage1_fast<T, 2>(x, m, k, r, gs, vq, vsc, vz, s, tmp, st); break;
      case 3: launch_stage1_fast<T, 3>(x, m, k, r, gs, vq, vsc, vz, s, tmp, st); break;
      case 4: launch_stage1_fast<T, 4>(x, m, k, r, gs, vq, vsc, vz, s, tmp, st); break;
      default: launch_stage1_fast<T, 8>(x, m, k, r, gs, vq, vsc, vz, s, tmp, st); break;
    }
    return cudaGetLastError();
  }
  const int64_t vbytes = (r * k * bits + 7) / 8, tiles = (m + kTile - 1) / kTile;
  for (int64_t t0 = 0; t0 < tiles; t0 += kMaxGrid) {
    const int64_t ty = tiles - t0 < kMaxGrid ? tiles - t0 : kMaxGrid;
    stage1_generic<T><<<dim3(ceil_div(r, kWarps), static_cast<unsigned>(ty)), kThreads, 0, st>>>(
        static_cast<const T*>(x) + t0 * kTile * k, m - t0 * kTile, k, r, gs, bits, vq, vbytes, vsc, vz, s,
        tmp + t0 * kTile * r);
  }
  return cudaGetLastError();
}

template <int BITS>
void launch_stage2_fast(const float* tmp, int64_t m, int64_t r, int64_t n, int64_t gs, const uint8_t* uq,
                        const uint16_t* usc, const uint16_t* uz, float* acc, cudaStream_t st) {
  static int sms = 0;
  if (sms == 0) {
    int dev = 0;
    cudaGetDevice(&dev);
    cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
    if (sms <= 0) sms = 100;
  }
  const int64_t chunks = n / 32;
  // Enough r-slices for about 8 warps of work per multiprocessor, each slice at least kJPerSplit rows.
  const int64_t want = (static_cast<int64_t>(sms) * 256 + chunks * m - 1) / (chunks * m);
  int64_t splits = (r + kJPerSplit - 1) / kJPerSplit;
  if (splits > want) splits = want < 1 ? 1 : want;
  if (splits > kMaxGrid) splits = kMaxGrid;
  const int64_t j_per = (r + splits - 1) / splits;
  splits = (r + j_per - 1) / j_per;
  for (int64_t m0 = 0; m0 < m; m0 += kMaxGrid) {
    const int64_t mz = m - m0 < kMaxGrid ? m - m0 : kMaxGrid;
    stage2_fast<BITS><<<dim3(ceil_div(chunks, 128), static_cast<unsigned>(splits), static_cast<unsigned>(mz)), 128,
                        0, st>>>(tmp + m0 * r, r, n, gs, j_per, reinterpret_cast<const uint32_t*>(uq), usc, uz,
                                 acc + m0 * n);
  }
}

cudaError_t stage2(const float* tmp, int64_t m, int64_t r, int64_t n, int bits, int64_t gs, const uint8_t* uq,
                   const uint16_t* usc, const uint16_t* uz, float* acc, cudaStream_t st) {
  if (fast_bits(bits) && n % 32 == 0 && gs % 32 == 0 && aligned4(uq) && r > 0) {
    cudaError_t err = cudaMemsetAsync(acc, 0, sizeof(float) * m * n, st);
    if (err != cudaSuccess) return err;
    switch (bits) {
      case 2: launch_stage2_fast<2>(tmp, m, r, n, gs, uq, usc, uz, acc, st); break;
      case 3: launch_stage2_fast<3>(tmp, m, r, n, gs, uq, usc, uz, acc, st); break;
      case 4: launch_stage2_fast<4>(tmp, m, r, n, gs, uq, usc, uz, acc, st); break;
      default: launch_stage2_fast<8>(tmp, m, r, n, gs, uq, usc, uz, acc, st); break;
    }
    return cudaGetLastError();
  }
  const unsigned blocks = ceil_div(m * n, 256);
  stage2_generic<<<blocks, 256, 0, st>>>(tmp, m, r, n, gs, bits, uq, (r * n * bits + 7) / 8, usc, uz, acc);
  return cudaGetLastError();
}

template <typename T>
cudaError_t run(const void* x, int64_t m, int64_t k, int64_t n, int64_t r, int bits, int64_t gs, const uint8_t* vq,
                const uint16_t* vsc, const uint16_t* vz, const uint8_t* uq, const uint16_t* usc, const uint16_t* uz,
                const float* s, float* tmp, float* acc, void* y, cudaStream_t st) {
  if (r == 0 || k == 0) {  // an empty group or an empty reduction: the term is zero
    cudaError_t err = cudaMemsetAsync(acc, 0, sizeof(float) * m * n, st);
    if (err != cudaSuccess) return err;
  } else {
    cudaError_t err = stage1<T>(x, m, k, r, bits, gs, vq, vsc, vz, s, tmp, st);
    if (err != cudaSuccess) return err;
    err = stage2(tmp, m, r, n, bits, gs, uq, usc, uz, acc, st);
    if (err != cudaSuccess) return err;
  }
  if (static_cast<void*>(acc) != y) {
    to_dtype<T><<<ceil_div(m * n, 256), 256, 0, st>>>(acc, m * n, static_cast<T*>(y));
    return cudaGetLastError();
  }
  return cudaSuccess;
}

}  // namespace

cudaError_t kbit_lowrank_matmul(DType t, const void* x, int64_t m, int64_t k, int64_t n, int64_t r, int bits,
                                int64_t group_size, const uint8_t* v_q, const uint16_t* v_scale,
                                const uint16_t* v_zero, const uint8_t* u_q, const uint16_t* u_scale,
                                const uint16_t* u_zero, const float* s, float* tmp, float* acc, void* y,
                                cudaStream_t stream) {
  if (m == 0 || n == 0) return cudaSuccess;
  switch (t) {
    case DType::kFloat16:
      return run<__half>(x, m, k, n, r, bits, group_size, v_q, v_scale, v_zero, u_q, u_scale, u_zero, s, tmp, acc,
                         y, stream);
    case DType::kBFloat16:
      return run<__nv_bfloat16>(x, m, k, n, r, bits, group_size, v_q, v_scale, v_zero, u_q, u_scale, u_zero, s, tmp,
                                acc, y, stream);
    default:
      return run<float>(x, m, k, n, r, bits, group_size, v_q, v_scale, v_zero, u_q, u_scale, u_zero, s, tmp, acc, y,
                        stream);
  }
}

}  // namespace cuda
}  // namespace deltacomp
