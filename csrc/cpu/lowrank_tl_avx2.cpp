// Stage 1 of the low-rank kernel at one x row by int8 lookup tables and vpshufb (T-MAC / bitnet.cpp
// style), for codes of 1 and 2 bits in the TL4 layout (deltacomp/ops.py; repacked once at load time by
// ops.pack_tl4). Inexact: x is quantized through its tables. Raw pointers only, AVX2 + F16C.
//
// Math. A code c = sum_b 2^b bit_b (bit planes), so <codes, x> over a run of positions is
// sum_b 2^b sum over the position groups p (4 consecutive positions) of T_p[nibble_b,p], with
// T_p[i] = sum over the set bits t of i of x[4p + t]: one 16-entry table per position group, shared by
// every row and every plane. The tables of one chunk (at most kTlChunk positions inside one RTN group)
// are quantized to int8 with one scale, delta = max |T| / 127 over the chunk: T ~ delta * round(T / delta).
// vpshufb looks up 32 nibbles per instruction in a 16-byte table (the same table in both 128-bit lanes),
// so the TL4 layout puts, per position group, the nibbles of 32 rows (x 2 planes, or x 2 position
// groups at 1 bit) in 32 bytes: no transposes at run time.
//   2 bits: byte 16L + 2e + h (lane L, e < 8, plane h) = nibble of plane h of row 8L + e (low half) and
//           of row 16 + 8L + e (high half); vpmaddubsw with weights (1, 2) adds the two planes of a row
//           into one int16: the low halves give rows 0..15 in order, the high halves rows 16..31.
//   1 bit:  byte 16L + 2e + h = row 16h + 8L + e at position groups 2s (low half) and 2s + 1 (high half),
//           two tables; the even bytes (h = 0) sign-extended give rows 0..15, the odd ones rows 16..31.
// int16 sums never overflow: a chunk has at most 32 position groups, each adding at most 127 * 3 (2 bits)
// or 127 (1 bit); at the chunk's end they are flushed to fp32 times delta * the rows' RTN scale.
//
// Error: each lookup is off by at most delta / 2 (round to nearest; the fp32 table sums and 1 / delta
// add ~1e-7 relative), so per row and chunk |error| <= scale * delta / 2 * (2^B - 1) * (position groups).
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "lowrank_isa.h"

namespace deltacomp {
namespace cpu {
namespace lowrank {
namespace {

#if DELTACOMP_X86_GCC
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")

// Bytes ahead of the lookups the loops prefetch (the tiles are one contiguous stream, but the hardware
// prefetcher alone left stage 1 at about half the read bandwidth; 4 KiB ahead read 3.5 MB from memory
// in 0.28-0.34 ms against 0.34-0.41 at 1 KiB, noisy runs on the Zen 3 machine).
constexpr int64_t kTlPrefetch = 4096;

inline float hmax(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}

// One chunk's tables: positions [c0, c0 + len) of x, npp position groups (the ones past len: zero tables).
void chunk_tables(const float* x, int64_t c0, int64_t len, int64_t npp, int8_t* tab, float* delta) {
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  __m256 bit[3];
  for (int i = 0; i < 3; ++i)
    bit[i] = _mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_and_si256(lane, _mm256_set1_epi32(1 << i)),
                                                    _mm256_set1_epi32(1 << i)));
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  alignas(32) float buf[kTlChunk / 4][16];  // the chunk's fp32 tables (entries 0..7, then 8..15)
  __m256 vmax = _mm256_setzero_ps(), bad = _mm256_setzero_ps();
  const int64_t full = len / 4;
  for (int64_t p = 0; p < (len + 3) / 4; ++p) {
    float q[4] = {0.f, 0.f, 0.f, 0.f};  // the last group of a row may be partial: missing x are 0
    const float* xp = x + c0 + 4 * p;
    if (p < full) {
      std::memcpy(q, xp, sizeof q);
    } else {
      for (int64_t t = 0; t < len - 4 * p; ++t) q[t] = xp[t];
    }
    __m256 lo = _mm256_and_ps(_mm256_set1_ps(q[0]), bit[0]);
    lo = _mm256_add_ps(lo, _mm256_and_ps(_mm256_set1_ps(q[1]), bit[1]));
    lo = _mm256_add_ps(lo, _mm256_and_ps(_mm256_set1_ps(q[2]), bit[2]));
    const __m256 hi = _mm256_add_ps(lo, _mm256_set1_ps(q[3]));
    vmax = _mm256_max_ps(vmax, _mm256_max_ps(_mm256_and_ps(lo, absmask), _mm256_and_ps(hi, absmask)));
    bad = _mm256_or_ps(bad, _mm256_cmp_ps(hi, hi, _CMP_UNORD_Q));  // entry 15 sums all 4: NaN if any x is
    _mm256_store_ps(buf[p], lo);
    _mm256_store_ps(buf[p] + 8, hi);
  }
  float d = hmax(vmax) / 127.f;
  // a NaN or infinite x: delta NaN, so every dot of the chunk comes out NaN (as the exact sums would
  // be NaN or inf), not the zero tables that 1 / delta would give
  if (_mm256_movemask_ps(bad) != 0 || !(d <= std::numeric_limits<float>::max()))
    d = std::numeric_limits<float>::quiet_NaN();
  *delta = d;
  const __m256 inv = _mm256_set1_ps(d > 0.f ? 1.f / d : 0.f);
  for (int64_t p = 0; p < (len + 3) / 4; ++p) {
    // round to nearest (MXCSR default), |q| <= 127 (+1 ulp of the product: packs saturates to 127)
    const __m256i a = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_load_ps(buf[p]), inv));
    const __m256i b = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_load_ps(buf[p] + 8), inv));
    // packs works per 128-bit lane: [a0-3 b0-3 | a4-7 b4-7] -> [a0-3 a4-7 | b0-3 b4-7]
    const __m256i w = _mm256_permute4x64_epi64(_mm256_packs_epi32(a, b), 0xd8);
    const __m128i t8 = _mm_packs_epi16(_mm256_castsi256_si128(w), _mm256_extracti128_si256(w, 1));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(tab + 16 * p), t8);
  }
  std::memset(tab + 16 * ((len + 3) / 4), 0, static_cast<size_t>(16 * (npp - (len + 3) / 4)));
}

void tl_tables_avx2(const float* x, int64_t k, int64_t gs, int8_t* tab, float* delta) {
  for_each_tl_chunk(k, gs, [&](int64_t c0, int64_t len, int64_t npp, int64_t p, int64_t c) {
    chunk_tables(x, c0, len, npp, tab + 16 * p, delta + c);
  });
}

// tot[q] (rows 8q .. 8q + 7) += int16 sums of rows 0..15 (a) and 16..31 (b) * delta * the rows' scales
inline void flush(__m256i a, __m256i b, const uint16_t* sc, float delta, __m256* tot) {
  const __m256 d = _mm256_set1_ps(delta);
  const __m128i parts[4] = {_mm256_castsi256_si128(a), _mm256_extracti128_si256(a, 1), _mm256_castsi256_si128(b),
                            _mm256_extracti128_si256(b, 1)};
  for (int q = 0; q < 4; ++q) {
    const __m256 s = _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sc + 8 * q))), d);
    tot[q] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(parts[q])), s, tot[q]);
  }
}

// one 16-entry table in both 128-bit lanes
inline __m256i table(const int8_t* p) {
  return _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// The 32 rows of one tile: src its TL4 bytes, sc its scales (gk, 32) fp16; out: 32 dots.
template <int B>
void tl_tile(const uint8_t* src, const uint16_t* sc, int64_t k, int64_t gs, const int8_t* tab, const float* delta,
             float* out) {
  const __m256i nib = _mm256_set1_epi8(0x0f);
  const __m256i wts = _mm256_set1_epi16(0x0201);  // vpmaddubsw weights: plane 0 x 1, plane 1 x 2
  __m256 tot[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
  int64_t c = 0;
  for (int64_t g0 = 0, g = 0; g0 < k; g0 += gs, ++g) {
    const int64_t g1 = std::min(k, g0 + gs);
    for (int64_t c0 = g0; c0 < g1; c0 += kTlChunk, ++c) {
      const int64_t npp = tl_chunk_groups(std::min(kTlChunk, g1 - c0));
      __m256i a = _mm256_setzero_si256(), b = _mm256_setzero_si256();
      if constexpr (B == 2) {
        for (int64_t p = 0; p < npp; ++p) {
          _mm_prefetch(reinterpret_cast<const char*>(src + 32 * p + kTlPrefetch), _MM_HINT_T0);
          const __m256i t = table(tab + 16 * p);
          const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + 32 * p));
          const __m256i lo = _mm256_and_si256(w, nib), hi = _mm256_and_si256(_mm256_srli_epi16(w, 4), nib);
          a = _mm256_add_epi16(a, _mm256_maddubs_epi16(wts, _mm256_shuffle_epi8(t, lo)));
          b = _mm256_add_epi16(b, _mm256_maddubs_epi16(wts, _mm256_shuffle_epi8(t, hi)));
        }
        src += 32 * npp;
      } else {
        for (int64_t p = 0; p < npp; p += 2) {
          _mm_prefetch(reinterpret_cast<const char*>(src + 16 * p + kTlPrefetch), _MM_HINT_T0);
          const __m256i t0 = table(tab + 16 * p), t1 = table(tab + 16 * p + 16);
          const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + 16 * p));
          const __m256i v0 = _mm256_shuffle_epi8(t0, _mm256_and_si256(w, nib));
          const __m256i v1 = _mm256_shuffle_epi8(t1, _mm256_and_si256(_mm256_srli_epi16(w, 4), nib));
          // even bytes sign-extended (shift up, arithmetic shift down), odd bytes (arithmetic shift down)
          a = _mm256_add_epi16(a, _mm256_add_epi16(_mm256_srai_epi16(_mm256_slli_epi16(v0, 8), 8),
                                                   _mm256_srai_epi16(_mm256_slli_epi16(v1, 8), 8)));
          b = _mm256_add_epi16(b, _mm256_add_epi16(_mm256_srai_epi16(v0, 8), _mm256_srai_epi16(v1, 8)));
        }
        src += 16 * npp;
      }
      tab += 16 * npp;
      flush(a, b, sc + 32 * g, delta[c], tot);
    }
  }
  for (int q = 0; q < 4; ++q) _mm256_storeu_ps(out + 8 * q, tot[q]);
}

void tl_dots_avx2(const uint8_t* v_tl, const uint16_t* v_tl_scale, int bits, int64_t r, int64_t k, int64_t gs,
                  const int8_t* tab, const float* delta, float* dots) {
  tl_dots_tiles(v_tl, v_tl_scale, bits, r, k, gs, dots, [&](const uint8_t* src, const uint16_t* sc, float* out) {
    if (bits == 2) tl_tile<2>(src, sc, k, gs, tab, delta, out);
    else tl_tile<1>(src, sc, k, gs, tab, delta, out);
  });
}

// Stage 3 of one group at one x row: y[c] += sum_j t[j] (scale[j][G] code(j, c) + zero[j][G]), G = c / gs,
// from U^T in the TL4 layout with the output columns as rows (tiles of 32 columns) and the rank as the
// positions (one RTN group of r): per column group G, the tables of a[j] = t[j] scale[j][G].
void tl_axpy_avx2(const uint8_t* u_tl, const uint16_t* scale_t, const uint16_t* zero_t, int bits, int64_t r,
                  int64_t n, int64_t gs, const float* t, float* y) {
  alignas(16) static const uint16_t kOnes[kTlRows] = {  // fp16 1.0: stage 3's rows (columns) have no scale here
      0x3c00, 0x3c00, 0x3c00, 0x3c00, 0x3c00, 0x3c00, 0x3c00, 0x3c00, 0x3c00, 0x3c00, 0x3c00,
      0x3c00, 0x3c00, 0x3c00, 0x3c00, 0x3c00, 0x3c00, 0x3c00, 0x3c00, 0x3c00, 0x3c00, 0x3c00,
      0x3c00, 0x3c00, 0x3c00, 0x3c00, 0x3c00, 0x3c00, 0x3c00, 0x3c00, 0x3c00, 0x3c00};
  int64_t chunks = 0;
  const int64_t pg = tl_groups(r, r, &chunks), gn = (n + gs - 1) / gs, tiles = (n + kTlRows - 1) / kTlRows;
  const int64_t tile_bytes = pg * 16 * bits, per_group = gs / kTlRows;
  region(r * n, [&] {
    thread_local std::vector<float> a_buf, delta_buf;
    thread_local std::vector<int8_t> tab_buf;
    Kept<float> a(a_buf, static_cast<size_t>(r)), delta(delta_buf, static_cast<size_t>(chunks));
    Kept<int8_t> tab(tab_buf, static_cast<size_t>(16 * pg));
    alignas(32) float out[kTlRows];
#pragma omp for schedule(dynamic, 1)
    for (int64_t g = 0; g < gn; ++g) {
      const uint16_t* sc = scale_t + g * r;
      const uint16_t* zr = zero_t + g * r;
      __m256 zacc = _mm256_setzero_ps();
      int64_t j = 0;
      for (; j + 8 <= r; j += 8) {
        const __m256 tj = _mm256_loadu_ps(t + j);
        _mm256_storeu_ps(a.data() + j,
                         _mm256_mul_ps(tj, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sc + j)))));
        zacc = _mm256_fmadd_ps(tj, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(zr + j))), zacc);
      }
      alignas(32) float zl[8];
      _mm256_store_ps(zl, zacc);
      float z = ((zl[0] + zl[4]) + (zl[1] + zl[5])) + ((zl[2] + zl[6]) + (zl[3] + zl[7]));
      for (; j < r; ++j) {
        a[j] = t[j] * half_to_float(sc[j]);
        z += t[j] * half_to_float(zr[j]);
      }
      // the next group's tiles (per_group * tile_bytes, one run of the stream; this group's too for the
      // first) prefetched into L2, so they arrive while this group builds its tables and looks up: with
      // no prefetch no load is in flight while tables are built (0.77 against 0.30 ms hot, 8192 x 8192,
      // rank 1711, from memory)
      const int64_t t0 = (g == 0 ? 0 : g + 1) * per_group, t1 = std::min(tiles, (g + 2) * per_group);
      for (int64_t b = t0 * tile_bytes, e = t1 * tile_bytes; b < e; b += 64)
        _mm_prefetch(reinterpret_cast<const char*>(u_tl + b), _MM_HINT_T1);
      tl_tables_avx2(a.data(), r, r, tab.data(), delta.data());
      for (int64_t ti = g * per_group; ti < std::min(tiles, (g + 1) * per_group); ++ti) {
        if (bits == 2) tl_tile<2>(u_tl + ti * tile_bytes, kOnes, r, r, tab.data(), delta.data(), out);
        else tl_tile<1>(u_tl + ti * tile_bytes, kOnes, r, r, tab.data(), delta.data(), out);
        const int64_t c0 = ti * kTlRows, cols = std::min<int64_t>(kTlRows, n - c0);
        for (int64_t c = 0; c < cols; ++c) y[c0 + c] += out[c] + z;
      }
    }
  });
}
#pragma GCC pop_options
#endif  // DELTACOMP_X86_GCC

}  // namespace

#if DELTACOMP_X86_GCC
TlLoops tl_loops_avx2() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
  return ok ? TlLoops{tl_tables_avx2, tl_dots_avx2, tl_axpy_avx2} : TlLoops{nullptr, nullptr, nullptr};
}
#else
TlLoops tl_loops_avx2() { return {nullptr, nullptr, nullptr}; }
#endif

TlLoops tl_loops(cpu::Isa isa) {
  switch (isa) {
    case cpu::Isa::kAvx2: return tl_loops_avx2();
    case cpu::Isa::kAvx512: return {nullptr, nullptr, nullptr};
    default: return tl_loops_generic();
  }
}

}  // namespace lowrank
}  // namespace cpu
}  // namespace deltacomp
