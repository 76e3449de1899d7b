// Portable inner loops of the low-rank kernel at one x row (lowrank_kernels.cpp has the driver and the
// math): the decode of KBITS codes to floats and the one-row dot (stage 1) and axpy (stage 3) straight
// from the packed bytes. Plain C++ and GCC vector extensions: GCC compiles them as SSE2 and AVX2 clones
// on x86-64 and with NEON on aarch64; the AVX2 and AVX-512 paths have their own (lowrank_avx2.cpp,
// lowrank_simd.cpp).
//
// Decoding: 8 codes starting at a code index that is a multiple of 8 fill exactly B (the width) whole
// bytes, and each half (4 codes, 4B bits) fits a 32-bit word. Widths 1 and 2 take 4 codes at a time from
// small constant tables of floats (a nibble or a byte gives 4 codes); wider codes are the word broadcast
// to 4 lanes, shifted by t * B in lane t, masked and converted. Each 4 codes are built in a register and
// used there (the loop they replace decoded code by code through memory: about one code per ns, 20x the
// AVX2 path at 4096 x 11008).
#include <algorithm>
#include <type_traits>

#include "lowrank_isa.h"

namespace deltacomp {
namespace cpu {
namespace lowrank {
namespace {

struct ByteTables {
  float b1[16][4];   // nibble -> its 4 one-bit codes
  float b2[256][4];  // byte -> its 4 two-bit codes
  constexpr ByteTables() : b1(), b2() {
    for (int v = 0; v < 256; ++v)
      for (int t = 0; t < 4; ++t) {
        if (v < 16) b1[v][t] = static_cast<float>((v >> t) & 1);
        b2[v][t] = static_cast<float>((v >> (2 * t)) & 3);
      }
  }
};
alignas(64) constexpr ByteTables kTab{};

// 4 floats / 4 uint32 as GCC/Clang vectors: one SSE or NEON register. Only ever passed by reference
// (no ISA-dependent call ABI between the clones), and built in registers: a 16-byte load of values just
// stored as smaller pieces would stall on store forwarding.
typedef float V4 __attribute__((vector_size(16)));
typedef uint32_t U4 __attribute__((vector_size(16)));

// The B bytes at p as the low bytes of a word (byte i at bits 8i). Built in registers: a memcpy of B = 3,
// 5, 6 or 7 bytes into a zeroed word went through the stack, and the word's load then waited on the byte
// stores (a failed store forward, measured as half of the 3-bit dot's time).
template <int B>
inline __attribute__((always_inline)) uint64_t load_bytes(const uint8_t* p) {
  if constexpr (B == 4 || B == 8) {
    std::conditional_t<B == 4, uint32_t, uint64_t> w;
    std::memcpy(&w, p, B);  // one load (little-endian hosts: x86-64, aarch64)
    return w;
  } else {
    uint64_t w = 0;
    for (int i = 0; i < B; ++i) w |= static_cast<uint64_t>(p[i]) << (8 * i);
    return w;
  }
}

// The 8 codes of width B whose B bytes start at p: codes 0-3 into lo, 4-7 into hi.
template <int B>
inline __attribute__((always_inline)) void dec8(const uint8_t* p, V4& lo, V4& hi) {
  if constexpr (B == 1) {
    std::memcpy(&lo, kTab.b1[p[0] & 15], sizeof lo);
    std::memcpy(&hi, kTab.b1[p[0] >> 4], sizeof hi);
  } else if constexpr (B == 2) {
    std::memcpy(&lo, kTab.b2[p[0]], sizeof lo);
    std::memcpy(&hi, kTab.b2[p[1]], sizeof hi);
  } else {  // each half is 4B <= 32 bits: broadcast, shift lane t by t * B, mask
    const uint64_t w = load_bytes<B>(p);
    const uint32_t a = static_cast<uint32_t>(w), b = static_cast<uint32_t>(w >> (4 * B));
    const U4 sh = {0u, B, 2u * B, 3u * B};
    const U4 mask = {(1u << B) - 1u, (1u << B) - 1u, (1u << B) - 1u, (1u << B) - 1u};
    const U4 va = {a, a, a, a}, vb = {b, b, b, b};
    lo = __builtin_convertvector((va >> sh) & mask, V4);
    hi = __builtin_convertvector((vb >> sh) & mask, V4);
  }
}

// acc += a * p[0, 4)
inline __attribute__((always_inline)) void fma4(V4& acc, const V4& a, const float* p) {
  V4 v;
  std::memcpy(&v, p, sizeof v);
  acc += a * v;
}
inline __attribute__((always_inline)) float hsum(const V4& v) { return (v[0] + v[2]) + (v[1] + v[3]); }

// Stage 1, one V row: sum over the groups g of scale[g] * <codes first + [g*gs, (g+1)*gs), x[same]>
// (first, gs and len multiples of 8).
template <int B>
inline __attribute__((always_inline)) float dot_b(const uint8_t* stream, int64_t first, int64_t len,
                                                  const float* x, int64_t gs, const float* scale) {
  const uint8_t* p = stream + (first >> 3) * B;
  float tot = 0.f;
  for (int64_t g = 0, c0 = 0; c0 < len; ++g, c0 += gs) {
    const int64_t c1 = std::min(len, c0 + gs);
    V4 acc0 = {}, acc1 = {}, acc2 = {}, acc3 = {};  // four chains hide the add latency
    int64_t c = c0;
    for (; c + 16 <= c1; c += 16, p += 2 * B) {
      V4 lo, hi, lo2, hi2;
      dec8<B>(p, lo, hi);
      dec8<B>(p + B, lo2, hi2);
      fma4(acc0, lo, x + c);
      fma4(acc1, hi, x + c + 4);
      fma4(acc2, lo2, x + c + 8);
      fma4(acc3, hi2, x + c + 12);
    }
    if (c < c1) {
      V4 lo, hi;
      dec8<B>(p, lo, hi);
      fma4(acc0, lo, x + c);
      fma4(acc1, hi, x + c + 4);
      p += B;
    }
    acc0 += acc1;
    acc2 += acc3;
    acc0 += acc2;
    tot += scale[g] * hsum(acc0);
  }
  return tot;
}

// Stage 3, one x row: acc[c] += sum over the rows q of coef[q * cstride + group of c] * code(first + q *
// stride + c) (first, stride, off, len and gs multiples of 16: a 16-column step never crosses a group).
template <int B>
inline __attribute__((always_inline)) void axpy_b(const uint8_t* stream, int64_t first, int64_t stride, int rows,
                                                  int64_t len, int64_t off, int64_t gs, const float* coef,
                                                  int64_t cstride, float* acc) {
  for (int64_t c = 0, g = 0, end = (off / gs + 1) * gs - off; c < len; c += 16) {
    if (c == end) {
      ++g;
      end += gs;
    }
    V4 a[4];
    std::memcpy(a, acc + c, sizeof a);
    for (int q = 0; q < rows; ++q) {
      const float wq = coef[q * cstride + g];
      const V4 w = {wq, wq, wq, wq};
      const uint8_t* p = stream + ((first + q * stride + c) >> 3) * B;
      V4 lo, hi, lo2, hi2;
      dec8<B>(p, lo, hi);
      dec8<B>(p + B, lo2, hi2);
      a[0] += w * lo;
      a[1] += w * hi;
      a[2] += w * lo2;
      a[3] += w * hi2;
    }
    std::memcpy(acc + c, a, sizeof a);
  }
}

// codes [first, first + count) as floats into out
template <int B>
inline __attribute__((always_inline)) void decode_b(const uint8_t* stream, int64_t first, int64_t count, float* out) {
  int64_t i = 0;
  for (; i < count && ((first + i) & 7); ++i) out[i] = static_cast<float>(code_at(stream, B, first + i));
  for (const uint8_t* p = stream + ((first + i) >> 3) * B; i + 8 <= count; i += 8, p += B) {
    V4 lo, hi;
    dec8<B>(p, lo, hi);
    std::memcpy(out + i, &lo, sizeof lo);
    std::memcpy(out + i + 4, &hi, sizeof hi);
  }
  for (; i < count; ++i) out[i] = static_cast<float>(code_at(stream, B, first + i));
}


#if DELTACOMP_X86_GCC
__attribute__((target_clones("avx2", "default")))
#endif
void decode_generic(const uint8_t* stream, int64_t /*nbytes: reads only the codes' bytes*/, int bits, int64_t first,
                    int64_t count, float* out) {
  DELTACOMP_BY_WIDTH(decode_b, stream, first, count, out)
}

#if DELTACOMP_X86_GCC
__attribute__((target_clones("avx2", "default")))
#endif
float dot_codes_generic(const uint8_t* stream, int64_t /*nbytes*/, int bits, int64_t first, int64_t len,
                        const float* x, int64_t gs, const float* scale) {
  DELTACOMP_BY_WIDTH(dot_b, stream, first, len, x, gs, scale)
}

#if DELTACOMP_X86_GCC
__attribute__((target_clones("avx2", "default")))
#endif
void axpy_codes_generic(const uint8_t* stream, int64_t /*nbytes*/, int bits, int64_t first, int64_t stride, int rows,
                        int64_t len, int64_t off, int64_t gs, const float* coef, int64_t cstride, float* acc) {
  DELTACOMP_BY_WIDTH(axpy_b, stream, first, stride, rows, len, off, gs, coef, cstride, acc)
}


}  // namespace

GenericLoops generic_loops() { return {decode_generic, axpy_codes_generic, dot_codes_generic}; }

}  // namespace lowrank
}  // namespace cpu
}  // namespace deltacomp
