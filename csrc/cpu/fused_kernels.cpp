// Fused base + sign-delta matmul (see serve_kernels.h): y = x @ (w + scale * sign)^T in one pass over
// the base weight w and the packed signs. Raw pointers only, no torch.
//
// Work split as in sign_kernels.cpp: output rows in tiles of R, tiles over OpenMP threads, x rows in
// blocks of MB, R x MB fp32 accumulators in registers:
//
//   for each 16 weights of row r:  w16 = load w (bf16: widened, << 16)
//                                  d16 = blend(sign mask, -scale_r, +scale_r)   (select, no multiply)
//                                  acc[r][mm] += (w16 + d16) * x[mm][16 weights] (one FMA per x row)
//   y[m0+mm][n0+r] = sum(acc[r][mm]) (+ the scalar tail of the last k % 16 weights)
#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "serve_kernels.h"

#include "common.h"
#include "simd8.h"
#include "lowrank_isa.h"

namespace deltacomp {
namespace cpu {
namespace {

inline float sign_of(const uint8_t* pr, int64_t t) { return ((pr[t >> 3] >> (t & 7)) & 1u) ? 1.f : -1.f; }

// ---- AVX-512 path ---------------------------------------------------------------------------------
#if DELTACOMP_X86_GCC
#pragma GCC push_options
#pragma GCC target("avx512f")
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // _mm512_reduce_add_ps, as in sign_kernels.cpp
#pragma GCC diagnostic ignored "-Wuninitialized"

inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const uint16_t* p) {  // 16 bf16 -> 16 fp32: zero-extend to 32 bits, shift up
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// out[r * MB + mm] = x[mm] . (w[r] + s_r * sign[r]) over the k weights of R rows.
template <typename WT, int R, int MB>
void tile_fused(const float* x, int64_t k, const WT* w, const uint8_t* packed, int64_t nb, const float* s,
                float* out) {
  __m512 acc[R][MB];
  __m512 sp[R], sn[R];
  for (int r = 0; r < R; ++r) {
    sp[r] = _mm512_set1_ps(s[r]);
    sn[r] = _mm512_set1_ps(-s[r]);
    for (int mm = 0; mm < MB; ++mm) acc[r][mm] = _mm512_setzero_ps();
  }
  const int64_t full = k / 16;
  for (int64_t c = 0; c < full; ++c) {
    __m512 xv[MB];
    for (int mm = 0; mm < MB; ++mm) xv[mm] = _mm512_loadu_ps(x + mm * k + 16 * c);
    for (int r = 0; r < R; ++r) {
      const __mmask16 msk = _load_mask16(reinterpret_cast<__mmask16*>(const_cast<uint8_t*>(packed + r * nb + 2 * c)));
      const __m512 we = _mm512_add_ps(load16(w + r * k + 16 * c), _mm512_mask_blend_ps(msk, sn[r], sp[r]));
      for (int mm = 0; mm < MB; ++mm) acc[r][mm] = _mm512_fmadd_ps(we, xv[mm], acc[r][mm]);
    }
  }
  for (int r = 0; r < R; ++r) {
    const uint8_t* pr = packed + r * nb;
    const WT* wr = w + r * k;
    for (int mm = 0; mm < MB; ++mm) {
      float v = _mm512_reduce_add_ps(acc[r][mm]);
      for (int64_t t = 16 * full; t < k; ++t) v += x[mm * k + t] * (widen(wr[t]) + s[r] * sign_of(pr, t));
      out[r * MB + mm] = v;
    }
  }
}

template <typename WT, int R>
void tile_fused_mb(int mb, const float* x, int64_t k, const WT* w, const uint8_t* packed, int64_t nb,
                   const float* s, float* out) {
  switch (mb) {
    case 1: tile_fused<WT, R, 1>(x, k, w, packed, nb, s, out); break;
    case 2: tile_fused<WT, R, 2>(x, k, w, packed, nb, s, out); break;
    case 3: tile_fused<WT, R, 3>(x, k, w, packed, nb, s, out); break;
    default: tile_fused<WT, R, 4>(x, k, w, packed, nb, s, out); break;
  }
}

template <typename WT>
void fused_avx512(const float* x, int64_t m, int64_t k, const WT* w, const uint8_t* packed, int64_t n,
                  const float* scale, bool per_row, float* y) {
  const int64_t nb = bytes_per_row(k);
  constexpr int kMaxMB = 4;
  const int R = (m == 1) ? 8 : 4;  // as sign_kernels.cpp: 8 chains for one x row, 4 x MB otherwise
  const int64_t tiles = (n + R - 1) / R;
  for_each_index(tiles, 4, m * n * k, [&](int64_t t) {
    const int64_t n0 = t * R;
    const int rows = static_cast<int>(std::min<int64_t>(R, n - n0));
    float s[8], out[8 * kMaxMB];
    for (int r = 0; r < rows; ++r) s[r] = scale[per_row ? n0 + r : 0];
    const WT* wt = w + n0 * k;
    const uint8_t* pt = packed + n0 * nb;
    for (int64_t m0 = 0; m0 < m; m0 += kMaxMB) {
      const int mb = static_cast<int>(std::min<int64_t>(kMaxMB, m - m0));
      const float* xb = x + m0 * k;
      if (rows == 8) {
        tile_fused<WT, 8, 1>(xb, k, wt, pt, nb, s, out);
      } else if (rows == 4) {
        tile_fused_mb<WT, 4>(mb, xb, k, wt, pt, nb, s, out);
      } else {
        for (int r = 0; r < rows; ++r)
          tile_fused_mb<WT, 1>(mb, xb, k, wt + r * k, pt + r * nb, nb, s + r, out + r * mb);
      }
      for (int r = 0; r < rows; ++r)
        for (int mm = 0; mm < mb; ++mm) y[(m0 + mm) * n + n0 + r] = out[r * mb + mm];
    }
  });
}

#pragma GCC diagnostic pop
#pragma GCC pop_options

#else
template <typename WT>
void fused_avx512(const float*, int64_t, int64_t, const WT*, const uint8_t*, int64_t, const float*, bool, float*) {}
#endif

}  // namespace

template <typename WT>
void sign_matmul_fused(const float* x, int64_t m, int64_t k, const WT* w, const uint8_t* packed, int64_t n,
                       const float* scale, bool per_row, float* y) {
  if (m == 0 || n == 0) return;
  const Isa isa = active_isa();
  if (isa == Isa::kAvx512) {
    fused_avx512<WT>(x, m, k, w, packed, n, scale, per_row, y);
  } else {  // AVX2 / NEON / portable; DELTACOMP_SIGN_KERNEL=simd keeps the byte-table sign pass on AVX2 too
    const char* kernel = std::getenv("DELTACOMP_SIGN_KERNEL");
    const bool lookup = !(kernel && std::strcmp(kernel, "simd") == 0);
    simd8::sign_matmul_fused(isa, x, m, k, w, packed, n, scale, per_row, y, lookup);
  }
}

int64_t sign_tl_bytes(int64_t n, int64_t k) {
  return (n + lowrank::kTlRows - 1) / lowrank::kTlRows * lowrank::tl_groups(k, k) * 16;
}

template <typename WT>
bool sign_matmul_tl(const float* x, int64_t k, const WT* w, const uint8_t* s_tl, int64_t n, const float* scale,
                    bool per_row, float* y) {
  const Isa isa = active_isa();
  const lowrank::TlLoops tl = lowrank::tl_loops(isa);
  if (tl.dots == nullptr) return false;
  if (n == 0) return true;
  if (w != nullptr) simd8::dense_m1(isa, x, k, w, n, y);
  else std::fill(y, y + n, 0.f);
  int64_t chunks = 0;
  const int64_t groups = lowrank::tl_groups(k, k, &chunks), tiles = (n + lowrank::kTlRows - 1) / lowrank::kTlRows;
  thread_local std::vector<int8_t> tab_buf;
  thread_local std::vector<float> delta_buf, dots_buf;
  Kept<int8_t> tab(tab_buf, static_cast<size_t>(16 * groups));
  Kept<float> delta(delta_buf, static_cast<size_t>(chunks)), dots(dots_buf, static_cast<size_t>(n));
  // the TL4 rows' scales: fp16 1.0 (the fp32 sign scale is applied below, unrounded)
  thread_local std::vector<uint16_t> ones;
  if (ones.size() < static_cast<size_t>(tiles * lowrank::kTlRows)) ones.assign(tiles * lowrank::kTlRows, 0x3c00);
  tl.tables(x, k, k, tab.data(), delta.data());
  tl.dots(s_tl, ones.data(), 1, n, k, k, tab.data(), delta.data(), dots.data());
  double total = 0.0;  // sign . x = 2 (bits . x) - sum(x)
  for (int64_t c = 0; c < k; ++c) total += x[c];
  const float sx = static_cast<float>(total);
  for (int64_t i = 0; i < n; ++i) y[i] += scale[per_row ? i : 0] * (2.f * dots[i] - sx);
  return true;
}

template bool sign_matmul_tl<float>(const float*, int64_t, const float*, const uint8_t*, int64_t, const float*, bool,
                                    float*);
template bool sign_matmul_tl<uint16_t>(const float*, int64_t, const uint16_t*, const uint8_t*, int64_t, const float*,
                                       bool, float*);

template void sign_matmul_fused<float>(const float*, int64_t, int64_t, const float*, const uint8_t*, int64_t,
                                       const float*, bool, float*);
template void sign_matmul_fused<uint16_t>(const float*, int64_t, int64_t, const uint16_t*, const uint8_t*,
                                          int64_t, const float*, bool, float*);

}  // namespace cpu
}  // namespace deltacomp
