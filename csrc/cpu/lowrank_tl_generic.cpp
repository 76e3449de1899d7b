// The int8 lookup-table loops of the low-rank kernel at one x row (stage 1 dots, stage 3 axpy, and the
// tables of x) in plain C++ and GCC vector extensions of 16 bytes: the NEON and portable paths' version of
// lowrank_tl_avx2.cpp (which has the math, the TL4 layout and the error bound; this file computes the same
// numbers: the same fp32 table sums and int8 rounding, the same int16 sums). The byte lookup takes 16 int8
// lanes at a time (lookup16): tbl on aarch64, pshufb on x86-64 with GCC (compiled as SSSE3 and AVX2 clones;
// the baseline clone, for x86 CPUs without SSSE3, emulates it). Where AVX2 handles 32 rows of a tile in
// one 32-byte register, this handles its two 16-byte halves (rows 8L + e and 16 + 8L + e, L = 0, 1) apart.
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
#define DELTACOMP_TL_CLONES __attribute__((target_clones("avx2", "ssse3", "default")))
#else
#define DELTACOMP_TL_CLONES
#endif
#define DELTACOMP_INLINE inline __attribute__((always_inline))

typedef int8_t S8x16 __attribute__((vector_size(16)));
typedef uint8_t U8x16 __attribute__((vector_size(16)));
typedef int16_t S16x8 __attribute__((vector_size(16)));
typedef float F32x8 __attribute__((vector_size(32)));  // two SSE / NEON registers

typedef int32_t S32x8 __attribute__((vector_size(32)));

// One chunk's int8 tables (positions [c0, c0 + len) of x, npp position groups, the ones past len zero) and
// its scale: entry i of group p = sum of x[4p + t] over the set bits t of i, summed in the order the AVX2
// loop sums it (bits 0, 1, 2, then bit 3 on top; an unset bit adds a zero), so both paths round alike.
DELTACOMP_TL_CLONES
void chunk_tables(const float* x, int64_t c0, int64_t len, int64_t npp, int8_t* tab, float* delta) {
  const F32x8 b0 = {0, 1, 0, 1, 0, 1, 0, 1}, b1 = {0, 0, 1, 1, 0, 0, 1, 1}, b2 = {0, 0, 0, 0, 1, 1, 1, 1};
  F32x8 buf[kTlChunk / 4][2];  // entries 0..7, 8..15 of each group
  F32x8 vmax = {};
  S32x8 bad = {};
  const int64_t groups = (len + 3) / 4;
  for (int64_t p = 0; p < groups; ++p) {
    float q[4] = {0.f, 0.f, 0.f, 0.f};  // the last group of a row may be partial: missing x are 0
    for (int64_t t = 0; t < std::min<int64_t>(4, len - 4 * p); ++t) q[t] = x[c0 + 4 * p + t];
    const F32x8 lo = (q[0] * b0 + q[1] * b1) + q[2] * b2;  // q * 0 = 0 for finite q (else the chunk is NaN)
    const F32x8 hi = lo + q[3];
    buf[p][0] = lo;
    buf[p][1] = hi;
    const F32x8 alo = lo < 0 ? -lo : lo, ahi = hi < 0 ? -hi : hi;
    vmax = vmax > alo ? vmax : alo;
    vmax = vmax > ahi ? vmax : ahi;
    bad |= hi != hi;  // entry 15 sums all 4: NaN if any x is
  }
  float d = 0.f;
  bool any_bad = false;
  for (int i = 0; i < 8; ++i) {
    d = std::max(d, vmax[i]);
    any_bad = any_bad || bad[i] != 0;
  }
  d /= 127.f;
  // a NaN or infinite x: delta NaN, so every dot of the chunk comes out NaN (as the exact sums would be)
  if (any_bad || !(d <= std::numeric_limits<float>::max())) d = std::numeric_limits<float>::quiet_NaN();
  *delta = d;
  const float inv = d > 0.f ? 1.f / d : 0.f;
  const float magic = 12582912.f;  // 1.5 * 2^23: adding it rounds |v| < 2^22 to an integer, nearest even
  for (int64_t p = 0; p < groups; ++p)
    for (int h = 0; h < 2; ++h) {  // |v| <= 127 (+1 ulp of the product: clamped); NaN tables: delta is NaN
      F32x8 v = (buf[p][h] * inv + magic) - magic;
      v = v > 127.f ? 127.f : v;
      v = v < -128.f ? -128.f : v;
      v = v == v ? v : 0.f;
      const S32x8 iv = __builtin_convertvector(v, S32x8);
      for (int i = 0; i < 8; ++i) tab[16 * p + 8 * h + i] = static_cast<int8_t>(iv[i]);
    }
  std::memset(tab + 16 * groups, 0, static_cast<size_t>(16 * (npp - groups)));
}

void tl_tables_generic(const float* x, int64_t k, int64_t gs, int8_t* tab, float* delta) {
  for_each_tl_chunk(k, gs, [&](int64_t c0, int64_t len, int64_t npp, int64_t p, int64_t c) {
    chunk_tables(x, c0, len, npp, tab + 16 * p, delta + c);
  });
}

DELTACOMP_INLINE S8x16 load16(const void* p) {
  S8x16 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
// t[idx[i]] in lane i (idx < 16): tbl on aarch64, GCC's __builtin_shuffle elsewhere (pshufb on x86 SSSE3 /
// AVX2), a plain loop for compilers without it (Clang has no variable-index shuffle builtin)
DELTACOMP_INLINE S8x16 lookup16(const S8x16& t, const U8x16& idx) {
#if defined(__aarch64__)
  return (S8x16)vqtbl1q_s8((int8x16_t)t, (uint8x16_t)idx);
#elif defined(__clang__)
  S8x16 out;
  for (int i = 0; i < 16; ++i) out[i] = t[idx[i] & 15];
  return out;
#else
  return __builtin_shuffle(t, idx);
#endif
}

// the low bytes of each int16 lane, sign-extended; the high bytes
DELTACOMP_INLINE S16x8 even_bytes(const S16x8& v) { return (v << 8) >> 8; }
DELTACOMP_INLINE S16x8 odd_bytes(const S16x8& v) { return v >> 8; }

// tot[q] (rows 8q .. 8q + 7) += the int16 sums of those rows (acc[q]) * delta * the rows' scales
DELTACOMP_INLINE void flush(const S16x8 (&acc)[4], const uint16_t* sc, float delta, F32x8 (&tot)[4]) {
  for (int q = 0; q < 4; ++q) {
    float s[8];
    halves_to_floats(sc + 8 * q, 8, s);
    F32x8 sv;
    std::memcpy(&sv, s, sizeof sv);
    tot[q] += __builtin_convertvector(acc[q], F32x8) * (sv * delta);
  }
}

// The 32 rows of one tile (TL4 bytes src, scales sc (gk, 32) fp16): 32 dots into out.
template <int B>
DELTACOMP_INLINE void tile_b(const uint8_t* src, const uint16_t* sc, int64_t k, int64_t gs, const int8_t* tab,
                             const float* delta, float* out) {
  const U8x16 nib = {15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15};
  F32x8 tot[4] = {};
  int64_t c = 0;
  for (int64_t g0 = 0, g = 0; g0 < k; g0 += gs, ++g) {
    const int64_t g1 = std::min(k, g0 + gs);
    for (int64_t c0 = g0; c0 < g1; c0 += kTlChunk, ++c) {
      const int64_t npp = tl_chunk_groups(std::min(kTlChunk, g1 - c0));
      S16x8 acc[4] = {};  // rows 0-7, 8-15 (half L = 0, 1: low nibbles / even bytes), 16-23, 24-31
      if constexpr (B == 2) {  // a row's two planes: byte 2e (x 1) and 2e + 1 (x 2) of its int16 lane
        for (int64_t p = 0; p < npp; ++p) {
          const S8x16 t = load16(tab + 16 * p);
          for (int h = 0; h < 2; ++h) {
            const U8x16 w = (U8x16)(load16(src + 32 * p + 16 * h));
            const S16x8 lo = (S16x8)(lookup16(t, w & nib));
            const S16x8 hi = (S16x8)(lookup16(t, (w >> 4) & nib));
            const S16x8 lo2 = odd_bytes(lo), hi2 = odd_bytes(hi);
            acc[h] += even_bytes(lo) + lo2 + lo2;
            acc[2 + h] += even_bytes(hi) + hi2 + hi2;
          }
        }
        src += 32 * npp;
      } else {  // two position groups per 32 bytes, two tables: even bytes rows 8L + e, odd ones 16 + 8L + e
        for (int64_t p = 0; p < npp; p += 2) {
          const S8x16 t0 = load16(tab + 16 * p), t1 = load16(tab + 16 * p + 16);
          for (int h = 0; h < 2; ++h) {
            const U8x16 w = (U8x16)(load16(src + 16 * p + 16 * h));
            const S16x8 v0 = (S16x8)(lookup16(t0, w & nib));
            const S16x8 v1 = (S16x8)(lookup16(t1, (w >> 4) & nib));
            acc[h] += even_bytes(v0) + even_bytes(v1);
            acc[2 + h] += odd_bytes(v0) + odd_bytes(v1);
          }
        }
        src += 16 * npp;
      }
      tab += 16 * npp;
      flush(acc, sc + 32 * g, delta[c], tot);
    }
  }
  std::memcpy(out, tot, sizeof tot);
}

DELTACOMP_TL_CLONES
void tile_generic(int bits, const uint8_t* src, const uint16_t* sc, int64_t k, int64_t gs, const int8_t* tab,
                  const float* delta, float* out) {
  if (bits == 2) tile_b<2>(src, sc, k, gs, tab, delta, out);
  else tile_b<1>(src, sc, k, gs, tab, delta, out);
}

void tl_dots_generic(const uint8_t* v_tl, const uint16_t* v_tl_scale, int bits, int64_t r, int64_t k, int64_t gs,
                     const int8_t* tab, const float* delta, float* dots) {
  tl_dots_tiles(v_tl, v_tl_scale, bits, r, k, gs, dots, [&](const uint8_t* src, const uint16_t* sc, float* out) {
    tile_generic(bits, src, sc, k, gs, tab, delta, out);
  });
}

// Stage 3 of one group at one x row, as tl_axpy_avx2: per column group G, the tables of a[j] = t[j]
// scale[j][G], then the tiles of U^T (columns as rows) of that group looked up through them.
void tl_axpy_generic(const uint8_t* u_tl, const uint16_t* scale_t, const uint16_t* zero_t, int bits, int64_t r,
                     int64_t n, int64_t gs, const float* t, float* y) {
  static const std::vector<uint16_t> ones(kTlRows, 0x3c00);  // fp16 1.0: the columns have no scale here
  int64_t chunks = 0;
  const int64_t pg = tl_groups(r, r, &chunks), gn = (n + gs - 1) / gs, tiles = (n + kTlRows - 1) / kTlRows;
  const int64_t tile_bytes = pg * 16 * bits, per_group = gs / kTlRows;
  region(r * n, [&] {
    thread_local std::vector<float> a_buf, z_buf, delta_buf;
    thread_local std::vector<int8_t> tab_buf;
    Kept<float> a(a_buf, static_cast<size_t>(r)), zr(z_buf, static_cast<size_t>(r));
    Kept<float> delta(delta_buf, static_cast<size_t>(chunks));
    Kept<int8_t> tab(tab_buf, static_cast<size_t>(16 * pg));
    alignas(32) float out[kTlRows];
#pragma omp for schedule(dynamic, 1)
    for (int64_t g = 0; g < gn; ++g) {
      halves_to_floats(scale_t + g * r, r, a.data());
      halves_to_floats(zero_t + g * r, r, zr.data());
      float z = 0.f;
      for (int64_t j = 0; j < r; ++j) {
        a[j] *= t[j];
        z += t[j] * zr[j];
      }
      tl_tables_generic(a.data(), r, r, tab.data(), delta.data());
      for (int64_t ti = g * per_group; ti < std::min(tiles, (g + 1) * per_group); ++ti) {
        tile_generic(bits, u_tl + ti * tile_bytes, ones.data(), r, r, tab.data(), delta.data(), out);
        const int64_t c0 = ti * kTlRows, cols = std::min<int64_t>(kTlRows, n - c0);
        for (int64_t c = 0; c < cols; ++c) y[c0 + c] += out[c] + z;
      }
    }
  });
}

#undef DELTACOMP_TL_CLONES
#undef DELTACOMP_INLINE

}  // namespace

TlLoops tl_loops_generic() { return {tl_tables_generic, tl_dots_generic, tl_axpy_generic}; }

}  // namespace lowrank
}  // namespace cpu
}  // namespace deltacomp
