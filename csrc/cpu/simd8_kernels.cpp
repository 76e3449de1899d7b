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

inline float widen(float v) { return v; }
inline float widen(uint16_t v) {  // bf16 bit pattern -> float32 (exact)
  const uint32_t u = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

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
                 const float* scale, bool per_row, float* y) {
  DELTACOMP_SIMD8_CALL(isa, sign_entry, x, m, k, packed, n, scale, per_row, y);
}

void sign_matmul_multi(Isa isa, const float* xs, int64_t k, const uint8_t* packed, int64_t n, const float* scales,
                       bool per_row, const Segments& sg, float* y, int64_t work) {
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
