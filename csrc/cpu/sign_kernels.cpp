// CPU kernels for the SIGNS layout (see sign_kernels.h): packing, the AVX-512 sign matmuls and the
// lookup-table variant; the AVX2 / NEON / portable paths are in simd8_kernels.cpp. Raw pointers only.
//
// AVX-512 sign_matmul work split: output rows N are cut into tiles of R rows, tiles are spread over OpenMP
// threads; inside a tile, x rows go in blocks of MB, and R x MB accumulators stay in registers:
//
//            k ->  16 weights = 2 sign bytes = one __mmask16 per (row, chunk)
//   x block [MB x K] ---------------------------------------------+
//   tile    [R  x K/8 bytes]   acc[r][mm] += x[mm][chunk] where bit |  (one masked add)
//                                                                  v
//   y[m0+mm][n0+r] = scale * (2 * sum(acc[r][mm]) - sum(x[m0+mm]))
#include "sign_kernels.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "common.h"
#include "simd8.h"

namespace deltacomp {
namespace cpu {
namespace {

// Sum of each x row in double, so the final 2 * pos - total does not add the error of a float sum.
void row_totals(const float* x, int64_t m, int64_t k, double* totals) {
  for (int64_t i = 0; i < m; ++i) {
    double s = 0.0;
    const float* xr = x + i * k;
    for (int64_t t = 0; t < k; ++t) s += xr[t];
    totals[i] = s;
  }
}

inline float finish(float pos, double total, float scale) {
  return scale * static_cast<float>(2.0 * static_cast<double>(pos) - total);
}

// ---- AVX-512 path (multi-tenant: xs holds the rows with a delta grouped by tenant, Segments in simd8.h) ---------------------------------------------------------------------------------
#if DELTACOMP_X86_GCC
#pragma GCC push_options
#pragma GCC target("avx512f")
#pragma GCC diagnostic push
// GCC 12 false positive: _mm512_reduce_add_ps starts from _mm256_undefined_pd() on purpose.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"

// pos[r * MB + mm] = sum of x[mm][t] over the t where bit t of packed row r is 1.
// x: MB rows of k floats (row stride k); packed: R rows of nb bytes (row stride nb).
template <int R, int MB>
void tile_avx512(const float* x, int64_t k, const uint8_t* packed, int64_t nb, float* pos) {
  __m512 acc[R][MB];
  for (int r = 0; r < R; ++r)
    for (int mm = 0; mm < MB; ++mm) acc[r][mm] = _mm512_setzero_ps();
  const int64_t full = k / 16;  // whole 16-weight chunks: 2 sign bytes each, always inside the row
  for (int64_t c = 0; c < full; ++c) {
    __m512 xv[MB];
    for (int mm = 0; mm < MB; ++mm) xv[mm] = _mm512_loadu_ps(x + mm * k + 16 * c);
    for (int r = 0; r < R; ++r) {
      // kmovw straight from memory (a load, not a GPR->mask move competing with the adds for port 5);
      // x86 is little-endian, so bit t of the 16 is element 16c + t. Unaligned is fine for kmovw.
      const __mmask16 msk = _load_mask16(reinterpret_cast<__mmask16*>(const_cast<uint8_t*>(packed + r * nb + 2 * c)));
      for (int mm = 0; mm < MB; ++mm) acc[r][mm] = _mm512_mask_add_ps(acc[r][mm], msk, acc[r][mm], xv[mm]);
    }
  }
  const int rem = static_cast<int>(k - 16 * full);
  if (rem) {  // last 1..15 weights: masked loads never read past the row; pad bits are ignored
    const __mmask16 valid = static_cast<__mmask16>((1u << rem) - 1u);
    __m512 xv[MB];
    for (int mm = 0; mm < MB; ++mm) xv[mm] = _mm512_maskz_loadu_ps(valid, x + mm * k + 16 * full);
    for (int r = 0; r < R; ++r) {
      const uint8_t* p = packed + r * nb + 2 * full;
      unsigned bits = p[0];
      if (rem > 8) bits |= static_cast<unsigned>(p[1]) << 8;
      const __mmask16 msk = static_cast<__mmask16>(bits) & valid;
      for (int mm = 0; mm < MB; ++mm) acc[r][mm] = _mm512_mask_add_ps(acc[r][mm], msk, acc[r][mm], xv[mm]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int mm = 0; mm < MB; ++mm) pos[r * MB + mm] = _mm512_reduce_add_ps(acc[r][mm]);
}

template <int R>
void tile_avx512_mb(int mb, const float* x, int64_t k, const uint8_t* packed, int64_t nb, float* pos) {
  switch (mb) {
    case 1: tile_avx512<R, 1>(x, k, packed, nb, pos); break;
    case 2: tile_avx512<R, 2>(x, k, packed, nb, pos); break;
    case 3: tile_avx512<R, 3>(x, k, packed, nb, pos); break;
    default: tile_avx512<R, 4>(x, k, packed, nb, pos); break;
  }
}

void sign_matmul_avx512(const float* x, int64_t m, int64_t k, const uint8_t* packed, int64_t n,
                        const float* scale, bool per_row, float* y, const double* totals) {
  const int64_t nb = bytes_per_row(k);
  constexpr int kMaxMB = 4;
  // One x row: 8 rows per tile give 8 independent add chains (hides the add latency); more x rows
  // already give MB chains per row, so 4 rows x 4 x rows = 16 accumulators.
  const int R = (m == 1) ? 8 : 4;
  const int64_t tiles = (n + R - 1) / R;
  // dynamic: when a thread is descheduled (a busy or shared machine), the others take its tiles
  // instead of waiting for its static share; 4 tiles per grab keep the bookkeeping negligible.
  for_each_index(tiles, 4, m * n * k, [&](int64_t t) {
    const int64_t n0 = t * R;
    const int rows = static_cast<int>(std::min<int64_t>(R, n - n0));
    float pos[8 * kMaxMB];
    for (int64_t m0 = 0; m0 < m; m0 += kMaxMB) {
      const int mb = static_cast<int>(std::min<int64_t>(kMaxMB, m - m0));
      const float* xb = x + m0 * k;
      const uint8_t* pb = packed + n0 * nb;
      if (rows == 8) {
        tile_avx512<8, 1>(xb, k, pb, nb, pos);
      } else if (rows == 4) {
        tile_avx512_mb<4>(mb, xb, k, pb, nb, pos);
      } else {  // ragged last tile: one row at a time
        for (int r = 0; r < rows; ++r) tile_avx512_mb<1>(mb, xb, k, pb + r * nb, nb, pos + r * mb);
      }
      for (int r = 0; r < rows; ++r) {
        const float s = scale[per_row ? n0 + r : 0];
        for (int mm = 0; mm < mb; ++mm) y[(m0 + mm) * n + n0 + r] = finish(pos[r * mb + mm], totals[m0 + mm], s);
      }
    }
  });
}

void sign_matmul_multi_avx512(const float* xs, int64_t k, const uint8_t* packed, int64_t n,
                              const float* scales, bool per_row, const Segments& sg, float* y,
                              const double* totals, int64_t work) {
  const int64_t nb = bytes_per_row(k);
  constexpr int R = 8, kMaxMB = 4;
  const int64_t tiles = (n + R - 1) / R;
  const int64_t nseg = static_cast<int64_t>(sg.seg_t.size());
  for_each_index(tiles, 4, work, [&](int64_t tile) {
    const int64_t n0 = tile * R;
    const int rows = static_cast<int>(std::min<int64_t>(R, n - n0));
    float pos[R * kMaxMB];
    for (int64_t s = 0; s < nseg; ++s) {
      const int64_t t = sg.seg_t[s];
      const uint8_t* pb = packed + (t * n + n0) * nb;
      for (int64_t j0 = sg.seg_start[s]; j0 < sg.seg_start[s + 1]; j0 += kMaxMB) {
        const int mb = static_cast<int>(std::min<int64_t>(kMaxMB, sg.seg_start[s + 1] - j0));
        const float* xb = xs + j0 * k;
        if (rows == R && mb == 1) {  // decode: one row per tenant, 8 add chains over 8 weight rows
          tile_avx512<8, 1>(xb, k, pb, nb, pos);
        } else if (rows == R) {      // two 4-row tiles, mb x rows each: pos[r * mb + mm] as below
          tile_avx512_mb<4>(mb, xb, k, pb, nb, pos);
          tile_avx512_mb<4>(mb, xb, k, pb + 4 * nb, nb, pos + 4 * mb);
        } else {
          for (int r = 0; r < rows; ++r) tile_avx512_mb<1>(mb, xb, k, pb + r * nb, nb, pos + r * mb);
        }
        for (int r = 0; r < rows; ++r) {
          const float sc = scales[per_row ? t * n + n0 + r : t];
          for (int mm = 0; mm < mb; ++mm)
            y[sg.order[j0 + mm] * n + n0 + r] = finish(pos[r * mb + mm], totals[j0 + mm], sc);
        }
      }
    }
  });
}

#pragma GCC diagnostic pop
#pragma GCC pop_options

#else
void sign_matmul_avx512(const float*, int64_t, int64_t, const uint8_t*, int64_t, const float*, bool, float*,
                        const double*) {}
void sign_matmul_multi_avx512(const float*, int64_t, const uint8_t*, int64_t, const float*, bool, const Segments&,
                              float*, const double*, int64_t) {}
#endif

// ---- lookup-table variant (T-MAC / bitnet.cpp TL style), one x row --------------------------------
// For each byte position j of a row, a 256-entry table holds the sum of the x values of every subset
// of x[8j .. 8j+8): table[j][b] = sum of x[8j + i] over the set bits i of b. A weight row then costs one
// table load and one add per byte, no per-weight work: pos = sum_j table[j][packed[j]].
// Tables are (k/8) x 1 KiB (L2-sized for k <= 8192), built in 256 adds per byte position.
// The portable path's kernel at M = 1 (DELTACOMP_SIGN_KERNEL=lut8 forces it elsewhere): with fp32
// activations the lookups are scalar, so the AVX-512 / AVX2 kernels are faster, but the portable loop is
// slower still; benchmarks/kernels.py reports each (the README has the figures).
void sign_matmul_lut(const float* x, int64_t k, const uint8_t* packed, int64_t n, const float* scale,
                     bool per_row, float* y, double total) {
  const int64_t nb = bytes_per_row(k), full = k / 8;
  std::vector<float> table(static_cast<size_t>(full) * 256);
  for (int64_t j = 0; j < full; ++j) {
    float* tj = table.data() + j * 256;
    tj[0] = 0.f;
    for (int b = 1; b < 256; ++b) tj[b] = tj[b & (b - 1)] + x[8 * j + __builtin_ctz(b)];  // drop the low bit
  }
  for_each_index(n, 32, n * k, [&](int64_t r) {
    const uint8_t* pr = packed + r * nb;
    float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f;  // four chains hide the add latency
    int64_t j = 0;
    for (; j + 4 <= full; j += 4) {
      a0 += table[(j << 8) | pr[j]];
      a1 += table[((j + 1) << 8) | pr[j + 1]];
      a2 += table[((j + 2) << 8) | pr[j + 2]];
      a3 += table[((j + 3) << 8) | pr[j + 3]];
    }
    for (; j < full; ++j) a0 += table[(j << 8) | pr[j]];
    float pos = (a0 + a1) + (a2 + a3);
    for (int64_t t = 8 * full; t < k; ++t)
      if ((pr[full] >> (t - 8 * full)) & 1u) pos += x[t];
    y[r] = finish(pos, total, scale[per_row ? r : 0]);
  });
}

// DELTACOMP_SIGN_KERNEL (read per call, like DELTACOMP_ISA): "simd" = the plain SIMD loops everywhere,
// "lut8" = the byte-table variant above at m = 1; unset = the default per path at m = 1: AVX2 the 3-bit
// lookup-table kernel (simd8_kernels.cpp), portable the byte tables, each measured faster than the
// plain loop there.
bool kernel_is(const char* name) {
  const char* v = std::getenv("DELTACOMP_SIGN_KERNEL");
  return v && std::strcmp(v, name) == 0;
}

}  // namespace

void pack_signs_f32(const float* x, int64_t n, int64_t k, uint8_t* out) {
  const int64_t nb = bytes_per_row(k);
#pragma omp parallel for schedule(static) if (n * k >= kParallelMinWork)
  for (int64_t r = 0; r < n; ++r) {
    const float* xr = x + r * k;
    uint8_t* o = out + r * nb;
    for (int64_t j = 0; j < nb; ++j) {
      const int64_t base = 8 * j;
      const int cnt = static_cast<int>(std::min<int64_t>(8, k - base));
      unsigned b = 0;
      // `>= 0` (not the sign bit): -0.0 packs as +1 and NaN as -1, exactly like the reference
      for (int i = 0; i < cnt; ++i) b |= static_cast<unsigned>(xr[base + i] >= 0.f) << i;
      o[j] = static_cast<uint8_t>(b);
    }
  }
}

void unpack_signs_f32(const uint8_t* packed, int64_t n, int64_t k, float* out) {
  const int64_t nb = bytes_per_row(k);
#pragma omp parallel for schedule(static) if (n * k >= kParallelMinWork)
  for (int64_t r = 0; r < n; ++r) {
    const uint8_t* p = packed + r * nb;
    float* o = out + r * k;
    for (int64_t t = 0; t < k; ++t) o[t] = ((p[t >> 3] >> (t & 7)) & 1u) ? 1.f : -1.f;
  }
}

void sign_matmul_f32(const float* x, int64_t m, int64_t k, const uint8_t* packed, int64_t n,
                     const float* scale, bool per_row, float* y) {
  if (m == 0 || n == 0) return;
  const Isa isa = active_isa();
  // byte tables at one x row: asked for, or the portable path's default (measured 1.0x-1.2x faster than
  // its plain loop, README; on AVX-512 and AVX2 they were 1.6x-4.6x slower than those paths' kernels)
  const bool lut = m == 1 && (kernel_is("lut8") || (isa == Isa::kPortable && !kernel_is("simd")));
  if (isa != Isa::kAvx512 && !lut) {  // AVX2 / NEON / portable: signed weights, no row totals needed
    simd8::sign_matmul(isa, x, m, k, packed, n, scale, per_row, y, !kernel_is("simd"));
    return;
  }
  // one x row on an AVX-512 CPU (which has AVX2 and FMA): the AVX2 lookup-table kernel, measured 2x the
  // speed of the AVX-512 loop at 4096x11008 and 8192x8192 here (README, "Code paths")
  if (isa == Isa::kAvx512 && m == 1 && !lut && !kernel_is("simd")) {
    simd8::sign_matmul(Isa::kAvx2, x, m, k, packed, n, scale, per_row, y, true);
    return;
  }
  std::vector<double> totals(static_cast<size_t>(m));
  row_totals(x, m, k, totals.data());
  if (lut) {
    sign_matmul_lut(x, k, packed, n, scale, per_row, y, totals[0]);
  } else {
    sign_matmul_avx512(x, m, k, packed, n, scale, per_row, y, totals.data());
  }
}

void sign_matmul_multi_f32(const float* x, int64_t m, int64_t k, const uint8_t* packed, int64_t t_count,
                           int64_t n, const float* scales, bool per_row, const int64_t* index, float* y) {
  if (m == 0 || n == 0) return;
  // Counting sort of the rows by tenant (stable), rows without a delta get zeros.
  Segments sg;
  std::vector<int64_t> count(static_cast<size_t>(t_count) + 1, 0);
  for (int64_t i = 0; i < m; ++i) {
    if (index[i] < 0) {
      std::memset(y + i * n, 0, sizeof(float) * static_cast<size_t>(n));
    } else {
      ++count[static_cast<size_t>(index[i]) + 1];
    }
  }
  for (int64_t t = 0; t < t_count; ++t) count[t + 1] += count[t];
  const int64_t used = count[t_count];
  if (used == 0) return;
  sg.order.resize(static_cast<size_t>(used));
  {
    std::vector<int64_t> next(count.begin(), count.end() - 1);
    for (int64_t i = 0; i < m; ++i)
      if (index[i] >= 0) sg.order[next[index[i]]++] = i;
  }
  for (int64_t t = 0; t < t_count; ++t) {
    if (count[t + 1] > count[t]) {
      sg.seg_t.push_back(t);
      sg.seg_start.push_back(count[t]);
    }
  }
  sg.seg_start.push_back(used);
  // x rows gathered in segment order (m x k is small next to the T stacks of signs)
  std::vector<float> xs(static_cast<size_t>(used * k));
  for (int64_t j = 0; j < used; ++j) std::memcpy(xs.data() + j * k, x + sg.order[j] * k, sizeof(float) * k);
  const int64_t work = used * n * k;
  const Isa isa = active_isa();
  // every tenant one row (decode) on an AVX-512 CPU: the AVX2 path, whose one-row tenants take the
  // lookup-table kernel (2x the AVX-512 loop at one row)
  const bool one_row_each = used == static_cast<int64_t>(sg.seg_t.size());
  if (isa != Isa::kAvx512 || (one_row_each && !kernel_is("simd"))) {
    simd8::sign_matmul_multi(isa == Isa::kAvx512 ? Isa::kAvx2 : isa, xs.data(), k, packed, n, scales, per_row, sg,
                             y, work, !kernel_is("simd"));
    return;
  }
  std::vector<double> totals(static_cast<size_t>(used));
  row_totals(xs.data(), used, k, totals.data());
  sign_matmul_multi_avx512(xs.data(), k, packed, n, scales, per_row, sg, y, totals.data(), work);
}

}  // namespace cpu
}  // namespace deltacomp
