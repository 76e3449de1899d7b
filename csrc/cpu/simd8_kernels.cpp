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
inline V4 vload4(const float* p) {
  V4 v;
  std::memcpy(&v, p, sizeof v);  // unaligned
  return v;
}
// Half by half: one memcpy into the whole struct made GCC copy the 8 floats through a stack slot.
inline V vload(const float* p) { return V{vload4(p), vload4(p + 4)}; }
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
// Rows of the one-row dense pass (dense_m1): R rows keep 2R four-float accumulators in registers, and x
// takes 4 more. x86-64 has 16 vector registers, so 8 rows spill (measured no faster than 4 here, about
// 10% slower at 4096-wide rows in one run); aarch64 has 32.
#if defined(__aarch64__)
constexpr int kDenseRows = 8;
#else
constexpr int kDenseRows = 4;
#endif
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
constexpr int kDenseRows = 8;  // 8 accumulators + 2 of x of the 16 ymm registers
#include "simd8_body.inc"

// ---- lookup-table sign matmul, one x row (T-MAC / bitnet.cpp TL style, exact fp32) ------------------
// Weights: 8 output rows at once, one 32-bit lane per row holding that row's 32 sign bits of a
// 32-weight block (its 4 SIGNS bytes). Each block is cut into 11 groups of bits: ten of 3 (bits 3g ..
// 3g+2, g < 10) and one of 2 (bits 30, 31). Tables: per block and group, the 8 signed sums t[b] =
// sum_i (bit i of b ? +x : -x)[32 * block + 3g + i] (the 2-bit group fills entries 4-7 with 0-3), one
// register each. Per group: one shift brings the group's bits to the bottom of every lane, one vpermps
// looks up all 8 rows (it reads the low 3 bits of each lane), one add: 32 instructions per 8 rows x 32
// weights. 4-bit groups (16-entry tables in two registers, what this kernel used first) take two
// vpermps, a blend and nearly two shifts per 4 weights, 46 instructions, and vpermps and the shifts
// compete for the same ports (README, "AVX2 sign matmul at one x row"). Rows come out one per lane,
// so there is no horizontal sum. x must have k >= 32 (one whole block); the last k % 32 weights are added
// from the bytes, one row at a time.
constexpr int kLutGroups = 11;               // bit groups per 32-weight block
constexpr int kLutBlockFloats = 8 * kLutGroups;  // table floats per block

void lut_tables(const float* x, int64_t blocks, float* t) {
  for (int64_t blk = 0; blk < blocks; ++blk) {
    for (int g = 0; g < kLutGroups; ++g) {
      const int bits = g < kLutGroups - 1 ? 3 : 2;
      const float* xg = x + 32 * blk + 3 * g;
      float* tg = t + kLutBlockFloats * blk + 8 * g;
      float total = 0.f;
      for (int i = 0; i < bits; ++i) total += xg[i];
      tg[0] = -total;
      for (int b = 1; b < (1 << bits); ++b)  // b = (b with its lowest set bit cleared) + that bit flipped to +
        tg[b] = tg[b & (b - 1)] + 2.f * xg[__builtin_ctz(b)];
      for (int b = 1 << bits; b < 8; ++b) tg[b] = tg[b & ((1 << bits) - 1)];
    }
  }
}

#include "transpose8_avx2.inc"

constexpr int kLutChains = 4;  // add chains: 11 adds per block over 4 chains hide the add latency

// acc lane r += the 11 groups of one 32-weight block of 8 rows, whose sign lanes are v; tables tb.
inline void lut_block(__m256i v, const float* tb, __m256* acc) {
  for (int g = 0; g < kLutGroups; ++g) {
    const __m256i idx = g ? _mm256_srli_epi32(v, 3 * g) : v;  // vpermps reads the low 3 bits of each lane
    __m256& a = acc[g % kLutChains];
    a = _mm256_add_ps(a, _mm256_permutevar8x32_ps(_mm256_loadu_ps(tb + 8 * g), idx));
  }
}

inline __m256i load_lanes1(const uint8_t* const* row, int64_t b) {
  uint32_t lane[8];
  for (int r = 0; r < 8; ++r) std::memcpy(&lane[r], row[r] + 4 * b, 4);
  return _mm256_setr_epi32(static_cast<int>(lane[0]), static_cast<int>(lane[1]), static_cast<int>(lane[2]),
                           static_cast<int>(lane[3]), static_cast<int>(lane[4]), static_cast<int>(lane[5]),
                           static_cast<int>(lane[6]), static_cast<int>(lane[7]));
}

// out[r] = x . sign[r] for 8 rows over `blocks` 32-weight blocks (row stride nb), tables t. Rows are
// read 256 weights (32 bytes) at a time and transposed in registers, so each lane holds one row.
// pf .. pf + pf_bytes (the next tile's rows, one contiguous range) is prefetched in even slices over
// the steps: the tile itself reads 8 streams 32 bytes at a time at a stride of nb, which the hardware
// prefetcher fetched late from DRAM (nb a power of two worst: 8192 x 8192 took 1.4x the time per
// weight of 4096 x 11008); one sequential range per tile keeps the rows in cache before they are read.
// Rows to prefetch during a sign pass: the first `per_row` bytes of `rows` rows at `base` (stride row_bytes).
struct RowsAhead {
  const char* base = nullptr;
  int64_t row_bytes = 0, per_row = 0;
  int rows = 0;
};

// `ahead` (used by the fused op): the heads of the next tile's w rows, prefetched line by line over the steps.
void lut_tile(const float* t, int64_t blocks, const uint8_t* packed, int64_t nb, int rows, float* out,
              const uint8_t* pf, int64_t pf_bytes, RowsAhead ahead = {}) {
  __m256 acc[kLutChains];
  for (auto& a : acc) a = _mm256_setzero_ps();
  const uint8_t* row[8];
  for (int r = 0; r < 8; ++r) row[r] = packed + (r < rows ? r : 0) * nb;  // a ragged tile repeats row 0
  const int64_t steps = blocks / 8;
  const int64_t pf_step = steps ? (pf_bytes / steps + 63) / 64 * 64 : 0;  // bytes prefetched per step
  int64_t pf_done = 0, b = 0;
  const int64_t w_lines = ahead.rows > 0 ? ahead.rows * (ahead.per_row / 64) : 0;
  const int64_t w_step = steps ? (w_lines + steps - 1) / steps : 0;  // w lines prefetched per step
  int64_t w_done = 0;
  for (; b + 8 <= blocks; b += 8) {
    for (int64_t o = 0; o < pf_step && pf_done < pf_bytes; o += 64, pf_done += 64)
      _mm_prefetch(reinterpret_cast<const char*>(pf + pf_done), _MM_HINT_T0);
    for (int64_t o = 0; o < w_step && w_done < w_lines; ++o, ++w_done)  // line w_done / rows of row w_done % rows
      _mm_prefetch(ahead.base + (w_done % ahead.rows) * ahead.row_bytes + (w_done / ahead.rows) * 64, _MM_HINT_T0);
    __m256i v[8];
    for (int r = 0; r < 8; ++r) v[r] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row[r] + 4 * b));
    transpose8(v);  // v[i] lane r = row r's block b + i
    for (int i = 0; i < 8; ++i) lut_block(v[i], t + kLutBlockFloats * (b + i), acc);
  }
  for (; b < blocks; ++b) lut_block(load_lanes1(row, b), t + kLutBlockFloats * b, acc);
  _mm256_storeu_ps(out, _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
}

// Floats of the tables sign_lut_m1 needs for k (k >= 32).
inline size_t lut_table_floats(int64_t k) { return static_cast<size_t>(k / 32) * kLutBlockFloats; }

void sign_lut_m1(const float* x, int64_t k, const uint8_t* packed, int64_t n, const float* scale, bool per_row,
                 float* y, float* tables) {
  const int64_t nb = bytes_per_row(k), blocks = k / 32;
  lut_tables(x, blocks, tables);
  const int64_t tiles = (n + 7) / 8;
  for_each_index(tiles, 4, n * k, [&](int64_t ti) {
    const int64_t n0 = 8 * ti;
    const int rows = static_cast<int>(std::min<int64_t>(8, n - n0));
    const int64_t next = std::min(n, n0 + 8), next_end = std::min(n, n0 + 16);  // the next tile's rows
    float out[8];
    lut_tile(tables, blocks, packed + n0 * nb, nb, rows, out, packed + next * nb, (next_end - next) * nb);
    for (int r = 0; r < rows; ++r) {
      const uint8_t* pr = packed + (n0 + r) * nb;
      float v = out[r];
      for (int64_t c = 32 * blocks; c < k; ++c) v += ((pr[c >> 3] >> (c & 7)) & 1u) ? x[c] : -x[c];
      y[n0 + r] = scale[per_row ? n0 + r : 0] * v;
    }
  });
}

// ---- fused base + signs at one x row: the dense pass, then the lookup-table sign pass ----------------
// y[r] = x . w[r] + s_r * (x . sign[r]), per tile of 8 rows: the plain dense pass over the tile's w rows
// (dense_pass, simd8_body.inc), then lut_tile over the same rows' signs (tables built once per call; the
// next tile's signs prefetched as one range) instead of the byte-table sign pass of the generic body.
// The dense pass streams w at the speed of torch's own matvec; the sign pass is compute-bound and does
// not overlap it, so what it costs shows: the 3-bit tables cut that cost (README, "Code paths"). While
// it runs, the first kFusedAheadBytes of each of the next tile's w rows are prefetched, so the memory is
// not idle meanwhile (3-7% off the op at 7B/70B widths on Zen 3). Tried and slower there: the sign pass of
// the previous tile interleaved into the dense loop (256 or 32 columns at a time: 5-10% slower; the extra
// work in the loop leaves fewer w loads in flight), column panels that keep the tables in L1 (1.3x-2x
// slower: short strided runs of w defeat the hardware prefetcher), software prefetch inside the dense
// loop, and prefetching 4-16 KB of each row or into L2 only.
constexpr int64_t kFusedAheadBytes = 2048;
// Only for rows of at least this many bytes: on shorter rows the next tile follows in one short run the
// hardware prefetcher covers, and the prefetches cost more than they save (576-wide layers took 1.6x-2x
// the time, hot in cache).
constexpr int64_t kFusedAheadMinRow = 8192;

template <typename WT>
void fused_lut_m1(const float* x, int64_t k, const WT* w, const uint8_t* packed, int64_t n, const float* scale,
                  bool per_row, float* y, float* tables) {
  const int64_t nb = bytes_per_row(k), blocks = k / 32;
  lut_tables(x, blocks, tables);
  const int64_t tiles = (n + 7) / 8;
  for_each_index(tiles, 4, n * k, [&](int64_t ti) {
    const int64_t n0 = 8 * ti;
    const int rows = static_cast<int>(std::min<int64_t>(8, n - n0));
    const WT* wt = w + n0 * k;
    float dense[8], sg[8];
    if (rows == 8) {
      dense_pass<WT, 8, 1>(x, k, wt, dense);
    } else {
      int r = 0;
      for (; r + 4 <= rows; r += 4) dense_pass<WT, 4, 1>(x, k, wt + r * k, dense + r);
      for (; r < rows; ++r) dense_pass<WT, 1, 1>(x, k, wt + r * k, dense + r);
    }
    const int64_t next = std::min(n, n0 + 8), next_end = std::min(n, n0 + 16);  // the next tile's rows
    RowsAhead ahead;
    if (next_end > next && k * static_cast<int64_t>(sizeof(WT)) >= kFusedAheadMinRow) {
      ahead.base = reinterpret_cast<const char*>(w + next * k);
      ahead.row_bytes = k * static_cast<int64_t>(sizeof(WT));
      ahead.per_row = std::min(kFusedAheadBytes, ahead.row_bytes);
      ahead.rows = static_cast<int>(next_end - next);
    }
    lut_tile(tables, blocks, packed + n0 * nb, nb, rows, sg, packed + next * nb, (next_end - next) * nb, ahead);
    for (int r = 0; r < rows; ++r) {
      const uint8_t* pr = packed + (n0 + r) * nb;
      float v = sg[r];
      for (int64_t c = 32 * blocks; c < k; ++c) v += ((pr[c >> 3] >> (c & 7)) & 1u) ? x[c] : -x[c];
      y[n0 + r] = dense[r] + scale[per_row ? n0 + r : 0] * v;
    }
  });
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
constexpr int kDenseRows = 8;  // 16 accumulators + 4 of x of the 32 vector registers
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
    std::vector<float> tables(avx2::lut_table_floats(k));
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
    std::vector<float> tables(avx2::lut_table_floats(k));
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

// The AVX2 one-row fused op with the sign pass by lookup tables, for fp32 or bf16 (uint16_t) W; false
// when this call is not for it (another path, more rows, k < 32 or lookup off).
template <typename W>
static bool fused_lut(Isa isa, const float* x, int64_t m, int64_t k, const W* w, const uint8_t* packed, int64_t n,
                      const float* scale, bool per_row, float* y, bool lookup) {
#if DELTACOMP_X86_GCC
  if (isa == Isa::kAvx2 && lookup && m == 1 && k >= 32) {
    std::vector<float> tables(avx2::lut_table_floats(k));
    avx2::fused_lut_m1(x, k, w, packed, n, scale, per_row, y, tables.data());
    return true;
  }
#endif
  (void)isa, (void)x, (void)m, (void)k, (void)w, (void)packed, (void)n, (void)scale, (void)per_row, (void)y,
      (void)lookup;
  return false;
}

void sign_matmul_fused(Isa isa, const float* x, int64_t m, int64_t k, const float* w, const uint8_t* packed,
                       int64_t n, const float* scale, bool per_row, float* y, bool lookup) {
  if (fused_lut(isa, x, m, k, w, packed, n, scale, per_row, y, lookup)) return;
  DELTACOMP_SIMD8_CALL(isa, fused_f32, x, m, k, w, packed, n, scale, per_row, y);
}

void sign_matmul_fused(Isa isa, const float* x, int64_t m, int64_t k, const uint16_t* w, const uint8_t* packed,
                       int64_t n, const float* scale, bool per_row, float* y, bool lookup) {
  if (fused_lut(isa, x, m, k, w, packed, n, scale, per_row, y, lookup)) return;
  DELTACOMP_SIMD8_CALL(isa, fused_bf16, x, m, k, w, packed, n, scale, per_row, y);
}

void dense_m1(Isa isa, const float* x, int64_t k, const float* w, int64_t n, float* y) {
  DELTACOMP_SIMD8_CALL(isa, dense_m1_f32, x, k, w, n, y);
}

void dense_m1(Isa isa, const float* x, int64_t k, const uint16_t* w, int64_t n, float* y) {
  DELTACOMP_SIMD8_CALL(isa, dense_m1_bf16, x, k, w, n, y);
}

}  // namespace simd8
}  // namespace cpu
}  // namespace deltacomp
