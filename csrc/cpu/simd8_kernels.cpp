// The 8-lane SIMD paths of the SIGNS kernels (see simd8.h): the vector primitives of each ISA, then
// the shared kernel body simd8_body.inc compiled once per ISA inside its namespace:
//   avx2: x86-64 GCC, compiled with target("avx2,fma") (run only when the CPU has them);
//   neon: aarch64 (NEON is baseline there), V = two float32x4_t.
// Raw pointers only, no torch.
#include "simd8.h"

#include <algorithm>
#include <cstring>

namespace deltacomp {
namespace cpu {
namespace simd8 {
namespace {

// kSignPM.v[b][i] = +1.0f if bit i of b is set, else -1.0f (8 KiB, stays in L1): one SIGNS byte -> the
// 8 signed weights in one load.
struct SignTable {
  alignas(32) float v[256][8];
  constexpr SignTable() : v() {
    for (int b = 0; b < 256; ++b)
      for (int i = 0; i < 8; ++i) v[b][i] = ((b >> i) & 1) ? 1.f : -1.f;
  }
};
constexpr SignTable kSignPM{};

}  // namespace

// Portable: GCC/Clang vector extensions, two 4-float halves (16-byte vectors have a baseline ABI on
// every target), lowered to whatever the build target has: SSE on baseline x86-64, NEON on aarch64,
// scalar elsewhere. What DELTACOMP_ISA=portable runs.
namespace portable {
namespace {
typedef float V4 __attribute__((vector_size(16)));
struct V {
  V4 lo, hi;
};
inline V vzero() { return V{V4{}, V4{}}; }
inline V vload(const float* p) {
  V v;
  std::memcpy(&v, p, sizeof v);  // unaligned
  return v;
}
inline V vload(const uint16_t* p) {
  float f[8];
  for (int i = 0; i < 8; ++i) f[i] = widen(p[i]);
  return vload(f);
}
inline V vset1(float a) { return V{V4{a, a, a, a}, V4{a, a, a, a}}; }
inline V vfma(V a, V b, V c) { return V{a.lo * b.lo + c.lo, a.hi * b.hi + c.hi}; }
inline float vsum(V v) {
  const V4 q = v.lo + v.hi;
  return (q[0] + q[2]) + (q[1] + q[3]);
}
inline V vsigns(uint8_t b) { return vload(kSignPM.v[b]); }
#include "simd8_body.inc"
}  // namespace
}  // namespace portable

#if DELTACOMP_X86_GCC
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
namespace {
using V = __m256;
inline V vzero() { return _mm256_setzero_ps(); }
inline V vload(const float* p) { return _mm256_loadu_ps(p); }
inline V vload(const uint16_t* p) {  // 8 bf16 -> 8 fp32: zero-extend to 32 bits, shift into the high half
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
inline V vset1(float a) { return _mm256_set1_ps(a); }
inline V vfma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
inline float vsum(V v) {
  __m128 q = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  q = _mm_add_ps(q, _mm_movehl_ps(q, q));
  return _mm_cvtss_f32(_mm_add_ss(q, _mm_movehdup_ps(q)));
}
inline V vsigns(uint8_t b) { return _mm256_load_ps(kSignPM.v[b]); }
#include "simd8_body.inc"

// ---- lookup-table sign matmul, one x row (T-MAC / bitnet.cpp TL style, exact fp32) ------------------
// Tables: for each group g of 4 consecutive x values, the 16 signed sums t[g][b] = sum_i (bit i of b ?
// +x : -x)[4g + i], as two registers (entries 0-7, 8-15). Weights: 8 output rows at once, one 32-bit
// lane per row holding that row's 32 sign bits of a 32-weight block (its 4 SIGNS bytes); nibble j of a
// lane is the 4 signs of group j of the block. Per group: two vpermps look up all 8 rows' nibbles
// (index = the low 3 bits), a blend on bit 3 picks the half, one add: about 8 instructions per 32
// signed weights, where the plain loop (simd8_body.inc) spends 4 per 8. Rows come out one per lane, so
// there is no horizontal sum either. x must have k >= 32 (one whole block); the last k % 32 weights are
// added from the bytes, one row at a time.
void lut_tables(const float* x, int64_t groups, float* t) {
  for (int64_t g = 0; g < groups; ++g) {
    const float* xg = x + 4 * g;
    float* tg = t + 16 * g;
    tg[0] = -((xg[0] + xg[1]) + (xg[2] + xg[3]));
    for (int b = 1; b < 16; ++b) {  // b = (b with its lowest set bit cleared) + that bit flipped to +
      const int low = __builtin_ctz(b);
      tg[b] = tg[b & (b - 1)] + 2.f * xg[low];
    }
  }
}

// 8 x 8 transpose of 32-bit lanes: in[r] lane b -> out[b] lane r.
inline void transpose8(__m256i* v) {
  const __m256i t0 = _mm256_unpacklo_epi32(v[0], v[1]), t1 = _mm256_unpackhi_epi32(v[0], v[1]);
  const __m256i t2 = _mm256_unpacklo_epi32(v[2], v[3]), t3 = _mm256_unpackhi_epi32(v[2], v[3]);
  const __m256i t4 = _mm256_unpacklo_epi32(v[4], v[5]), t5 = _mm256_unpackhi_epi32(v[4], v[5]);
  const __m256i t6 = _mm256_unpacklo_epi32(v[6], v[7]), t7 = _mm256_unpackhi_epi32(v[6], v[7]);
  const __m256i u0 = _mm256_unpacklo_epi64(t0, t2), u1 = _mm256_unpackhi_epi64(t0, t2);
  const __m256i u2 = _mm256_unpacklo_epi64(t1, t3), u3 = _mm256_unpackhi_epi64(t1, t3);
  const __m256i u4 = _mm256_unpacklo_epi64(t4, t6), u5 = _mm256_unpackhi_epi64(t4, t6);
  const __m256i u6 = _mm256_unpacklo_epi64(t5, t7), u7 = _mm256_unpackhi_epi64(t5, t7);
  v[0] = _mm256_permute2x128_si256(u0, u4, 0x20);
  v[1] = _mm256_permute2x128_si256(u1, u5, 0x20);
  v[2] = _mm256_permute2x128_si256(u2, u6, 0x20);
  v[3] = _mm256_permute2x128_si256(u3, u7, 0x20);
  v[4] = _mm256_permute2x128_si256(u0, u4, 0x31);
  v[5] = _mm256_permute2x128_si256(u1, u5, 0x31);
  v[6] = _mm256_permute2x128_si256(u2, u6, 0x31);
  v[7] = _mm256_permute2x128_si256(u3, u7, 0x31);
}

// acc[s] lane r += the 8 groups of one 32-weight block for S sets of 8 rows, whose sign lanes are v[s];
// each table load (tb: 8 groups x 16 floats) serves all S sets.
template <int S>
inline void lut_block(const __m256i* v, const float* tb, __m256* acc) {
  for (int j = 0; j < 8; ++j) {
    const __m256 tlo = _mm256_loadu_ps(tb + 16 * j), thi = _mm256_loadu_ps(tb + 16 * j + 8);
    for (int q = 0; q < S; ++q) {
      const __m256i idx = _mm256_srli_epi32(v[q], 4 * j);  // vpermps reads the low 3 bits of each lane
      const __m256 lo = _mm256_permutevar8x32_ps(tlo, idx), hi = _mm256_permutevar8x32_ps(thi, idx);
      const __m256 pick = _mm256_castsi256_ps(_mm256_slli_epi32(v[q], 28 - 4 * j));  // bit 4j+3 -> sign bit
      acc[2 * q + (j & 1)] = _mm256_add_ps(acc[2 * q + (j & 1)], _mm256_blendv_ps(lo, hi, pick));
    }
  }
}

// Lanes of 8 rows for blocks b .. b+7: row r's 32 bytes at b, transposed so out[q] lane r = block b + q.
inline void load_lanes8(const uint8_t* const* row, int64_t b, __m256i* out) {
  for (int r = 0; r < 8; ++r) out[r] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row[r] + 4 * b));
  transpose8(out);
}

inline __m256i load_lanes1(const uint8_t* const* row, int64_t b) {
  uint32_t lane[8];
  for (int r = 0; r < 8; ++r) std::memcpy(&lane[r], row[r] + 4 * b, 4);
  return _mm256_setr_epi32(static_cast<int>(lane[0]), static_cast<int>(lane[1]), static_cast<int>(lane[2]),
                           static_cast<int>(lane[3]), static_cast<int>(lane[4]), static_cast<int>(lane[5]),
                           static_cast<int>(lane[6]), static_cast<int>(lane[7]));
}

// out[r] = x . sign[r] for 8 * S rows over `blocks` 32-weight blocks (row stride nb), tables t. Rows are
// read 256 weights (32 bytes) at a time and transposed in registers, so each lane holds one row.
template <int S>
void lut_tile(const float* t, int64_t blocks, const uint8_t* packed, int64_t nb, int rows, float* out) {
  __m256 acc[2 * S];  // two chains per set of 8 rows hide the add latency
  for (auto& a : acc) a = _mm256_setzero_ps();
  const uint8_t* row[8 * S];
  for (int r = 0; r < 8 * S; ++r) row[r] = packed + (r < rows ? r : 0) * nb;  // a ragged tile repeats row 0
  int64_t b = 0;
  for (; b + 8 <= blocks; b += 8) {
    __m256i v[S][8];
    for (int q = 0; q < S; ++q) load_lanes8(row + 8 * q, b, v[q]);
    for (int i = 0; i < 8; ++i) {
      __m256i vi[S];
      for (int q = 0; q < S; ++q) vi[q] = v[q][i];
      lut_block<S>(vi, t + 128 * (b + i), acc);
    }
  }
  for (; b < blocks; ++b) {
    __m256i vi[S];
    for (int q = 0; q < S; ++q) vi[q] = load_lanes1(row + 8 * q, b);
    lut_block<S>(vi, t + 128 * b, acc);
  }
  for (int q = 0; q < S; ++q) _mm256_storeu_ps(out + 8 * q, _mm256_add_ps(acc[2 * q], acc[2 * q + 1]));
}

void sign_lut_m1(const float* x, int64_t k, const uint8_t* packed, int64_t n, const float* scale, bool per_row,
                 float* y, float* tables) {
  const int64_t nb = bytes_per_row(k), blocks = k / 32;
  lut_tables(x, 8 * blocks, tables);
  constexpr int kSets = 2;  // 8-row sets per tile: each table load serves 16 rows (measured: 1 -> 2 sets, 3% faster)
  const int64_t tiles = (n + 8 * kSets - 1) / (8 * kSets);
#pragma omp parallel for schedule(dynamic, 2) if (n * k >= kParallelMinWork)
  for (int64_t ti = 0; ti < tiles; ++ti) {
    const int64_t n0 = 8 * kSets * ti;
    const int rows = static_cast<int>(std::min<int64_t>(8 * kSets, n - n0));
    float out[8 * kSets];
    lut_tile<kSets>(tables, blocks, packed + n0 * nb, nb, rows, out);
    for (int r = 0; r < rows; ++r) {
      const uint8_t* pr = packed + (n0 + r) * nb;
      float v = out[r];
      for (int64_t c = 32 * blocks; c < k; ++c) v += ((pr[c >> 3] >> (c & 7)) & 1u) ? x[c] : -x[c];
      y[n0 + r] = scale[per_row ? n0 + r : 0] * v;
    }
  }
}
}  // namespace
}  // namespace avx2
#pragma GCC pop_options
#endif

#if DELTACOMP_NEON
namespace neon {
namespace {
struct V {
  float32x4_t lo, hi;
};
inline V vzero() { return {vdupq_n_f32(0.f), vdupq_n_f32(0.f)}; }
inline V vload(const float* p) { return {vld1q_f32(p), vld1q_f32(p + 4)}; }
inline V vload(const uint16_t* p) {  // 8 bf16 -> 8 fp32: widening shift left by 16
  const uint16x8_t h = vld1q_u16(p);
  return {vreinterpretq_f32_u32(vshll_n_u16(vget_low_u16(h), 16)), vreinterpretq_f32_u32(vshll_high_n_u16(h, 16))};
}
inline V vset1(float a) { return {vdupq_n_f32(a), vdupq_n_f32(a)}; }
inline V vfma(V a, V b, V c) { return {vfmaq_f32(c.lo, a.lo, b.lo), vfmaq_f32(c.hi, a.hi, b.hi)}; }
inline float vsum(V v) { return vaddvq_f32(vaddq_f32(v.lo, v.hi)); }
inline V vsigns(uint8_t b) { return vload(kSignPM.v[b]); }
#include "simd8_body.inc"
}  // namespace
}  // namespace neon
#endif

// One entry point per op: AVX2 or NEON where asked for and compiled in, else the portable body.
#if DELTACOMP_X86_GCC
#define DELTACOMP_SIMD8_CALL(isa, fn, ...) \
  if ((isa) == Isa::kAvx2) avx2::fn(__VA_ARGS__); \
  else portable::fn(__VA_ARGS__)
#elif DELTACOMP_NEON
#define DELTACOMP_SIMD8_CALL(isa, fn, ...) \
  if ((isa) == Isa::kNeon) neon::fn(__VA_ARGS__); \
  else portable::fn(__VA_ARGS__)
#else
#define DELTACOMP_SIMD8_CALL(isa, fn, ...) \
  (void)(isa);                             \
  portable::fn(__VA_ARGS__)
#endif

void sign_matmul(Isa isa, const float* x, int64_t m, int64_t k, const uint8_t* packed, int64_t n,
                 const float* scale, bool per_row, float* y, bool lookup) {
#if DELTACOMP_X86_GCC
  if (isa == Isa::kAvx2 && lookup && m == 1 && k >= 32) {
    std::vector<float> tables(static_cast<size_t>(k / 32) * 128);
    avx2::sign_lut_m1(x, k, packed, n, scale, per_row, y, tables.data());
    return;
  }
#endif
  (void)lookup;
  DELTACOMP_SIMD8_CALL(isa, sign_entry, x, m, k, packed, n, scale, per_row, y);
}

void sign_matmul_multi(Isa isa, const float* xs, int64_t k, const uint8_t* packed, int64_t n, const float* scales,
                       bool per_row, const Segments& sg, float* y, int64_t work, bool lookup) {
#if DELTACOMP_X86_GCC
  if (isa == Isa::kAvx2 && lookup && k >= 32) {
    // Decode batches: a tenant with one row takes the one-row lookup-table kernel (its output row is
    // contiguous in y); tenants with several rows keep the tiled loop, which shares each sign load.
    std::vector<float> tables(static_cast<size_t>(k / 32) * 128);
    const int64_t nb = bytes_per_row(k);
    Segments one;  // a tenant with several rows, alone
    one.order = sg.order;
    for (size_t s = 0; s < sg.seg_t.size(); ++s) {
      const int64_t t = sg.seg_t[s], j0 = sg.seg_start[s], j1 = sg.seg_start[s + 1];
      if (j1 - j0 == 1) {
        avx2::sign_lut_m1(xs + j0 * k, k, packed + t * n * nb, n, scales + (per_row ? t * n : t), per_row,
                          y + sg.order[j0] * n, tables.data());
      } else {
        one.seg_t = {t};
        one.seg_start = {j0, j1};
        avx2::multi(xs, k, packed, n, scales, per_row, one, y, work);
      }
    }
    return;
  }
#endif
  (void)lookup;
  DELTACOMP_SIMD8_CALL(isa, multi, xs, k, packed, n, scales, per_row, sg, y, work);
}

void sign_matmul_fused(Isa isa, const float* x, int64_t m, int64_t k, const float* w, const uint8_t* packed,
                       int64_t n, const float* scale, bool per_row, float* y) {
  DELTACOMP_SIMD8_CALL(isa, fused_f32, x, m, k, w, packed, n, scale, per_row, y);
}

void sign_matmul_fused(Isa isa, const float* x, int64_t m, int64_t k, const uint16_t* w, const uint8_t* packed,
                       int64_t n, const float* scale, bool per_row, float* y) {
  DELTACOMP_SIMD8_CALL(isa, fused_bf16, x, m, k, w, packed, n, scale, per_row, y);
}

}  // namespace simd8
}  // namespace cpu
}  // namespace deltacomp
