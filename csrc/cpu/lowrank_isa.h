// Internal to the low-rank kernel (lowrank_kernels.cpp, lowrank_simd.cpp): the table of per-ISA inner
// loops the driver calls, and the scalar helpers both files use. Raw pointers only, no torch.
#pragma once
#include <cstdint>
#include <cstring>
#include <algorithm>

#include "common.h"

namespace deltacomp {
namespace cpu {
namespace lowrank {

// IEEE fp16 bit pattern -> float (scales and zeros are read once per group, so scalar is enough).
inline float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
  uint32_t out;
  if (exp == 0) {
    const float f = static_cast<float>(man) * 5.9604644775390625e-8f;  // subnormal: man * 2^-24
    return sign ? -f : f;
  } else if (exp == 31) {
    out = sign | 0x7f800000u | (man << 13);  // inf / nan
  } else {
    out = sign | ((exp + 112u) << 23) | (man << 13);
  }
  float f;
  std::memcpy(&f, &out, sizeof f);
  return f;
}

// out[i] = fp16 bit pattern h[i] as float, i < count: the same values as half_to_float, branch-free (one
// select per case) so the compiler vectorizes it on every target.
inline void halves_to_floats(const uint16_t* h, int64_t count, float* out) {
  for (int64_t i = 0; i < count; ++i) {
    const uint32_t sign = static_cast<uint32_t>(h[i] & 0x8000u) << 16, em = h[i] & 0x7fffu;
    uint32_t normal = (em << 13) + (112u << 23);  // exponent rebiased 15 -> 127
    normal = em >= 0x7c00u ? (em << 13) | 0x7f800000u : normal;  // inf / nan
    const float sub = static_cast<float>(static_cast<int32_t>(em)) * 5.9604644775390625e-8f;  // em * 2^-24
    float f;
    std::memcpy(&f, &normal, sizeof f);
    f = em < 0x400u ? sub : f;  // zero and subnormals
    uint32_t bits;
    std::memcpy(&bits, &f, sizeof bits);
    bits |= sign;
    std::memcpy(out + i, &bits, sizeof bits);
  }
}

// Code `idx` of a KBITS stream, reading no byte past the one holding its last bit.
inline uint32_t code_at(const uint8_t* stream, int bits, int64_t idx) {
  const int64_t p = idx * bits;
  const int64_t byte = p >> 3;
  const int sh = static_cast<int>(p & 7);
  uint32_t v = stream[byte];
  if (sh + bits > 8) v |= static_cast<uint32_t>(stream[byte + 1]) << 8;
  return (v >> sh) & ((1u << bits) - 1u);
}

// One switch over the code width per call (`bits`, 1..8 in scope): fn<B> sees B as a constant.
#define DELTACOMP_BY_WIDTH(fn, ...)    \
  switch (bits) {                      \
    case 1: return fn<1>(__VA_ARGS__); \
    case 2: return fn<2>(__VA_ARGS__); \
    case 3: return fn<3>(__VA_ARGS__); \
    case 4: return fn<4>(__VA_ARGS__); \
    case 5: return fn<5>(__VA_ARGS__); \
    case 6: return fn<6>(__VA_ARGS__); \
    case 7: return fn<7>(__VA_ARGS__); \
    default: return fn<8>(__VA_ARGS__); \
  }

// U^T rows one axpy_codes call adds at most.
constexpr int kAxpyRows = 4;

// Function table of one code path: decode codes to floats, per-group dot products, per-group axpy.
// `stream` holds `nbytes` bytes: a loop may read whole words past a code only while inside them.
struct Isa {
  // out[i] = code first + i, i < count
  void (*decode)(const uint8_t* stream, int64_t nbytes, int bits, int64_t first, int64_t count, float* out);
  // sum over the ceil(len / gs) groups g of [0, len) of scale[g] * <a[g*gs : (g+1)*gs], b[same]>
  float (*scaled_dot)(const float* a, const float* b, int64_t len, int64_t gs, const float* scale);
  // out[i] = fp16 bit pattern h[i] as float, i < count
  void (*halves)(const uint16_t* h, int64_t count, float* out);
  // v[c] *= scale[(off + c) / gs - off / gs], c < len (a block starting at column off of a row)
  void (*scale_groups)(float* v, int64_t len, int64_t off, int64_t gs, const float* scale);
  // acc (m, len) += tt^T (m, rows) @ panel (rows, len); tt is (rows, m) row-major
  void (*panel_gemm)(const float* panel, int64_t rows, int64_t len, const float* tt, int64_t m, float* acc);
  // out[jj * m + i] = <panel[jj], x[i]> for the rows x m pairs; panel (rows, k), x (m, k)
  void (*panel_dots)(const float* panel, int64_t rows, int64_t k, const float* x, int64_t m, float* out);
  // One x row (m = 1), stage 3: acc[c] += sum over rows q < `rows` (1..kAxpyRows) of
  // coef[q * cstride + (off + c) / gs - off / gs] * code(first + q * stride + c), c < len, straight from
  // the packed bytes (several U^T rows per pass over the accumulators). Needs first, stride, off, len
  // and gs multiples of 16; nullptr when the path has none.
  void (*axpy_codes)(const uint8_t* stream, int64_t nbytes, int bits, int64_t first, int64_t stride, int rows,
                     int64_t len, int64_t off, int64_t gs, const float* coef, int64_t cstride, float* acc);
  // One x row (m = 1), stage 1: sum over the groups g of [0, len) of scale[g] * <codes first + [g*gs,
  // (g+1)*gs), x[same]>, straight from the packed bytes. Needs first and gs multiples of dot_block;
  // nullptr when the path has none (then decode + scaled_dot).
  float (*dot_codes)(const uint8_t* stream, int64_t nbytes, int bits, int64_t first, int64_t len, const float* x,
                     int64_t gs, const float* scale);
  int64_t dot_block;  // codes per dot_codes step
  // One x row (m = 1), stage 1 by lookup tables: dots[j] = sum over the groups g of scale[j][g] * <codes
  // of V row j in group g, x>, j < r (scale: v_scale, fp16 (r, ceil(k / gs))). Needs bits <= kLutMaxBits,
  // k * bits and gs * bits multiples of 32; nullptr when the path has none.
  void (*row_dots)(const uint8_t* v_q, int bits, int64_t r, int64_t k, const float* x, int64_t gs,
                   const uint16_t* v_scale, float* dots);
};

// Widths row_dots takes: its cost grows with the bits, dot_codes' with the codes (one x row, 4096 x
// 11008, rank 256: 1 bit 0.17 against 0.26 ms, 2 bits 0.23 against 0.27, 3 bits 0.29 against 0.27).
constexpr int kLutMaxBits = 2;

// The portable decode, one-row axpy_codes and one-row dot_codes (lowrank_generic.cpp: byte tables and GCC
// vector extensions; dot_block 8), which every path without its own loops takes.
struct GenericLoops {
  decltype(Isa::decode) decode;
  decltype(Isa::axpy_codes) axpy_codes;
  decltype(Isa::dot_codes) dot_codes;
};
GenericLoops generic_loops();

// The AVX-512 (F + BW + VL) table, or nullptr when not compiled in (lowrank_simd.cpp).
const Isa* avx512_isa();
// The AVX2 + FMA loops (lowrank_avx2.cpp): decode, one-row axpy_codes and dot_codes, and halves and
// row_dots (F16C; nullptr on a CPU without it); all nullptr when not compiled in. The other AVX2 loops are the portable
// ones compiled as AVX2 clones.
struct Avx2Loops {
  decltype(Isa::decode) decode;
  decltype(Isa::axpy_codes) axpy_codes;
  decltype(Isa::dot_codes) dot_codes;
  decltype(Isa::halves) halves;
  decltype(Isa::row_dots) row_dots;  // F16C too (nullptr without it)
};
Avx2Loops avx2_loops();

// ---- stage 1 at one x row by int8 tables (TL4 layout, deltacomp/ops.py; lowrank_tl_avx2.cpp) ----------
constexpr int64_t kTlRows = 32;    // V rows per tile
constexpr int64_t kTlChunk = 128;  // positions per table scale (a chunk never crosses an RTN group)
// Position groups (of 4 positions) a chunk of len positions takes: rounded up to even (1 bit: pairs).
inline int64_t tl_chunk_groups(int64_t len) { return ((len + 3) / 4 + 1) / 2 * 2; }
// f(c0, len, npp, p, c) for every chunk of a row of k positions (every RTN group of gs cut into chunks of
// <= kTlChunk), in order: its first position c0, its length, its position groups npp, and the position
// groups p and chunks c before it.
template <typename F>
inline void for_each_tl_chunk(int64_t k, int64_t gs, const F& f) {
  int64_t p = 0, c = 0;
  for (int64_t g0 = 0; g0 < k; g0 += gs)
    for (int64_t c0 = g0, g1 = std::min(k, g0 + gs); c0 < g1; c0 += kTlChunk, ++c) {
      const int64_t len = std::min(kTlChunk, g1 - c0), npp = tl_chunk_groups(len);
      f(c0, len, npp, p, c);
      p += npp;
    }
}
// Position groups of a row of k positions, and its chunks.
inline int64_t tl_groups(int64_t k, int64_t gs, int64_t* chunks = nullptr) {
  int64_t groups = 0, count = 0;
  for_each_tl_chunk(k, gs, [&](int64_t, int64_t, int64_t npp, int64_t, int64_t) { groups += npp, ++count; });
  if (chunks != nullptr) *chunks = count;
  return groups;
}
// dots[j], j < r, from the 32-row tiles of V in the TL4 layout (v_tl, scales v_tl_scale): tile(src, sc, out)
// writes one tile's 32 dots; the tiles split over the threads (for_each_index). The dots loop of every path.
template <typename Tile>
inline void tl_dots_tiles(const uint8_t* v_tl, const uint16_t* v_tl_scale, int bits, int64_t r, int64_t k,
                          int64_t gs, float* dots, const Tile& tile) {
  const int64_t tiles = (r + kTlRows - 1) / kTlRows, gk = (k + gs - 1) / gs;
  const int64_t tile_bytes = tl_groups(k, gs) * 16 * bits;
  for_each_index(tiles, 2, r * k, [&](int64_t ti) {
    alignas(32) float out[kTlRows];
    tile(v_tl + ti * tile_bytes, v_tl_scale + ti * gk * kTlRows, out);
    const int64_t rows = std::min<int64_t>(kTlRows, r - ti * kTlRows);
    std::memcpy(dots + ti * kTlRows, out, static_cast<size_t>(rows) * sizeof(float));
  });
}
struct TlLoops {
  // tab int8 (tl_groups(k, gs), 16): the quantized tables of x (k,), delta (chunks,) their scales
  void (*tables)(const float* x, int64_t k, int64_t gs, int8_t* tab, float* delta);
  // dots[j] ~ sum over the RTN groups g of scale[j][g] * <codes of V row j in group g, x>, j < r, from the
  // TL4 bytes v_tl and scales v_tl_scale (tiles, ceil(k / gs), kTlRows) fp16 of a group of `bits` (1, 2)
  void (*dots)(const uint8_t* v_tl, const uint16_t* v_tl_scale, int bits, int64_t r, int64_t k, int64_t gs,
               const int8_t* tab, const float* delta, float* dots);
  // y[c] += sum_j t[j] (scale[j][c / gs] code(j, c) + zero[j][c / gs]), c < n, j < r: stage 3 of one group
  // from U^T in the TL4 layout (output columns as rows, the rank as positions; gs % 32 == 0) and its
  // scales / zeros transposed, fp16 (ceil(n / gs), r)
  void (*axpy)(const uint8_t* u_tl, const uint16_t* scale_t, const uint16_t* zero_t, int bits, int64_t r, int64_t n,
               int64_t gs, const float* t, float* y);
};
// The loops of code path `isa`: AVX2 + F16C (lowrank_tl_avx2.cpp; nullptrs where not compiled in or the CPU
// lacks them), NEON and portable (lowrank_tl_generic.cpp); nullptrs for AVX-512, whose one-row kernels stay
// exact.
TlLoops tl_loops(cpu::Isa isa);
TlLoops tl_loops_avx2();
TlLoops tl_loops_generic();

}  // namespace lowrank
}  // namespace cpu
}  // namespace deltacomp
