// SIMD inner loops of the low-rank kernel (see lowrank_kernels.cpp for the driver and the math):
// AVX-512 (F + BW + VL), compiled with target attributes and picked at run time (AVX2: lowrank_avx2.cpp).
//
// Decoding: in a KBITS stream, 8 consecutive codes starting at a code index that is a multiple of 8
// fill exactly `bits` bytes, byte-aligned. So after a scalar head, codes come in fixed byte patterns:
// load the bytes of 16 codes, broadcast them to every 128-bit lane, byte-shuffle
// the (up to) 4 bytes holding code i into 32-bit lane i, shift right by (i*bits) % 8 and mask.
#include <algorithm>

#include "lowrank_isa.h"

namespace deltacomp {
namespace cpu {
namespace lowrank {
namespace {

#if DELTACOMP_X86_GCC
// Per width b and block of C = 16 codes: pshufb control putting bytes
// (i*b)/8 .. +3 of the block into 32-bit lane i (0x80, a zero byte, past the block's C*b/8 bytes), and
// the right shift (i*b) % 8 of lane i.
template <int C>
struct DecodeTables {
  alignas(64) uint8_t ctl[9][4 * C];
  alignas(64) int32_t shift[9][C];
  constexpr DecodeTables() : ctl(), shift() {
    for (int b = 1; b <= 8; ++b)
      for (int i = 0; i < C; ++i) {
        for (int t = 0; t < 4; ++t) {
          const int byte = ((i * b) >> 3) + t;
          ctl[b][4 * i + t] = static_cast<uint8_t>(byte < C * b / 8 ? byte : 0x80);
        }
        shift[b][i] = (i * b) & 7;
      }
  }
};
constexpr DecodeTables<16> kDecode16{};

// ---- AVX-512 path ---------------------------------------------------------------------------------
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl")
#pragma GCC diagnostic push
// GCC 12 false positive: _mm512_reduce_add_ps starts from _mm256_undefined_pd() on purpose.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"

// 16 codes starting at a code index that is a multiple of 16 (see decode_avx512), as floats.
struct Decode16 {
  __m512i ctl, shift, mask;
  __mmask16 bytes;
  explicit Decode16(int bits)
      : ctl(_mm512_load_si512(kDecode16.ctl[bits])), shift(_mm512_load_si512(kDecode16.shift[bits])),
        mask(_mm512_set1_epi32((1 << bits) - 1)), bytes(static_cast<__mmask16>((1u << (2 * bits)) - 1u)) {}
  __m512 operator()(const uint8_t* block) const {  // the 2*bits bytes of the 16 codes; reads no more
    const __m128i blk = _mm_maskz_loadu_epi8(bytes, block);
    const __m512i v = _mm512_shuffle_epi8(_mm512_broadcast_i32x4(blk), ctl);
    return _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srlv_epi32(v, shift), mask));
  }
};

void decode_avx512(const uint8_t* stream, int64_t /*nbytes: masked loads*/, int bits, int64_t first, int64_t count, float* out) {
  int64_t i = 0;
  for (; i < count && ((first + i) & 15); ++i) out[i] = static_cast<float>(code_at(stream, bits, first + i));
  const Decode16 dec(bits);  // 16 codes = 2*bits bytes; the masked load reads no byte past them
  for (; i + 16 <= count; i += 16) _mm512_storeu_ps(out + i, dec(stream + ((first + i) >> 3) * bits));
  for (; i < count; ++i) out[i] = static_cast<float>(code_at(stream, bits, first + i));
}

// Isa::axpy_codes for R rows: the accumulators loaded and stored once per R rows.
template <int R>
void axpy_rows_avx512(const Decode16& dec, const uint8_t* stream, int bits, int64_t first, int64_t stride,
                      int64_t len, int64_t off, int64_t gs, const float* coef, int64_t cstride, float* acc) {
  for (int64_t c0 = 0, g = 0, end = (off / gs + 1) * gs - off; c0 < len; ++g, end += gs) {
    const int64_t c1 = std::min(len, end);
    __m512 a[R];
    for (int q = 0; q < R; ++q) a[q] = _mm512_set1_ps(coef[q * cstride + g]);
    for (int64_t c = c0; c < c1; c += 16) {
      __m512 y = _mm512_loadu_ps(acc + c);
      for (int q = 0; q < R; ++q) y = _mm512_fmadd_ps(a[q], dec(stream + ((first + q * stride + c) >> 3) * bits), y);
      _mm512_storeu_ps(acc + c, y);
    }
    c0 = c1;
  }
}

void axpy_codes_avx512(const uint8_t* stream, int64_t /*nbytes: masked loads*/, int bits, int64_t first,
                       int64_t stride, int rows, int64_t len, int64_t off, int64_t gs, const float* coef,
                       int64_t cstride, float* acc) {
  const Decode16 dec(bits);
  switch (rows) {
    case 1: return axpy_rows_avx512<1>(dec, stream, bits, first, stride, len, off, gs, coef, cstride, acc);
    case 2: return axpy_rows_avx512<2>(dec, stream, bits, first, stride, len, off, gs, coef, cstride, acc);
    case 3: return axpy_rows_avx512<3>(dec, stream, bits, first, stride, len, off, gs, coef, cstride, acc);
    default: return axpy_rows_avx512<4>(dec, stream, bits, first, stride, len, off, gs, coef, cstride, acc);
  }
}

// Isa::dot_codes, 16 codes per step (first and gs multiples of 16). Widths 1 and 2: the 16 codes fill one
// 32-bit word, so a broadcast, a shift per lane and a mask decode them without the byte shuffle.
template <int B>
float dot_codes_b(const uint8_t* stream, int64_t first, int64_t len, const float* x, int64_t gs, const float* scale) {
  const Decode16 dec(B);
  const __m512i shift = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                           _mm512_set1_epi32(B));
  const __m512i mask = _mm512_set1_epi32((1 << B) - 1);
  const auto codes = [&](const uint8_t* p) {
    if constexpr (B <= 2) {
      uint32_t w = 0;
      std::memcpy(&w, p, 2 * B);  // exactly the block's bytes
      return _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srlv_epi32(_mm512_set1_epi32(static_cast<int>(w)), shift), mask));
    } else {
      return dec(p);
    }
  };
  const uint8_t* row = stream + (first >> 3) * B;  // block c / 16 starts at row + (c / 8) * B
  __m512 tot = _mm512_setzero_ps();
  float extra = 0.f;  // the partial last block, scaled
  for (int64_t g = 0, c0 = 0; c0 < len; ++g, c0 += gs) {
    const int64_t c1 = std::min(len, c0 + gs), full = c0 + (c1 - c0) / 16 * 16;
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
    int64_t c = c0;
    for (; c + 64 <= full; c += 64) {  // four chains hide the FMA latency
      a0 = _mm512_fmadd_ps(codes(row + (c >> 3) * B), _mm512_loadu_ps(x + c), a0);
      a1 = _mm512_fmadd_ps(codes(row + ((c + 16) >> 3) * B), _mm512_loadu_ps(x + c + 16), a1);
      a2 = _mm512_fmadd_ps(codes(row + ((c + 32) >> 3) * B), _mm512_loadu_ps(x + c + 32), a2);
      a3 = _mm512_fmadd_ps(codes(row + ((c + 48) >> 3) * B), _mm512_loadu_ps(x + c + 48), a3);
    }
    for (; c < full; c += 16) a0 = _mm512_fmadd_ps(codes(row + (c >> 3) * B), _mm512_loadu_ps(x + c), a0);
    float part = 0.f;
    for (; c < c1; ++c) part += x[c] * static_cast<float>(code_at(stream, B, first + c));
    extra += scale[g] * part;
    tot = _mm512_fmadd_ps(_mm512_set1_ps(scale[g]), _mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)), tot);
  }
  return _mm512_reduce_add_ps(tot) + extra;
}

float dot_codes_avx512(const uint8_t* stream, int64_t /*nbytes: reads only the codes' bytes*/, int bits,
                       int64_t first, int64_t len, const float* x, int64_t gs, const float* scale) {
  switch (bits) {
    case 1: return dot_codes_b<1>(stream, first, len, x, gs, scale);
    case 2: return dot_codes_b<2>(stream, first, len, x, gs, scale);
    case 3: return dot_codes_b<3>(stream, first, len, x, gs, scale);
    case 4: return dot_codes_b<4>(stream, first, len, x, gs, scale);
    case 5: return dot_codes_b<5>(stream, first, len, x, gs, scale);
    case 6: return dot_codes_b<6>(stream, first, len, x, gs, scale);
    case 7: return dot_codes_b<7>(stream, first, len, x, gs, scale);
    default: return dot_codes_b<8>(stream, first, len, x, gs, scale);
  }
}

inline __mmask16 tail_mask(int64_t n) { return static_cast<__mmask16>((1u << n) - 1u); }


float scaled_dot_avx512(const float* a, const float* b, int64_t len, int64_t gs, const float* scale) {
  __m512 tot = _mm512_setzero_ps();  // scale[g] * group partials, lane-wise: one reduction per call
  for (int64_t g = 0, c0 = 0; c0 < len; ++g, c0 += gs) {
    const int64_t c1 = std::min(len, c0 + gs);
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();  // two chains hide the FMA latency
    int64_t c = c0;
    for (; c + 32 <= c1; c += 32) {
      acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + c), _mm512_loadu_ps(b + c), acc0);
      acc1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + c + 16), _mm512_loadu_ps(b + c + 16), acc1);
    }
    for (; c < c1; c += 16) {
      const __mmask16 msk = c1 - c >= 16 ? static_cast<__mmask16>(0xffff) : tail_mask(c1 - c);
      acc0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(msk, a + c), _mm512_maskz_loadu_ps(msk, b + c), acc0);
    }
    tot = _mm512_fmadd_ps(_mm512_set1_ps(scale[g]), _mm512_add_ps(acc0, acc1), tot);
  }
  return _mm512_reduce_add_ps(tot);
}

void halves_avx512(const uint16_t* h, int64_t count, float* out) {  // vcvtph2ps, 16 at a time
  for (int64_t i = 0; i < count; i += 16) {
    const __mmask16 msk = count - i >= 16 ? static_cast<__mmask16>(0xffff) : tail_mask(count - i);
    _mm512_mask_storeu_ps(out + i, msk, _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(msk, h + i)));
  }
}

void scale_groups_avx512(float* v, int64_t len, int64_t off, int64_t gs, const float* scale) {
  for (int64_t c0 = 0, g = 0, end = (off / gs + 1) * gs - off; c0 < len; ++g, end += gs) {
    const int64_t c1 = std::min(len, end);
    const __m512 a = _mm512_set1_ps(scale[g]);
    for (int64_t c = c0; c < c1; c += 16) {
      const __mmask16 msk = c1 - c >= 16 ? static_cast<__mmask16>(0xffff) : tail_mask(c1 - c);
      _mm512_mask_storeu_ps(v + c, msk, _mm512_mul_ps(a, _mm512_maskz_loadu_ps(msk, v + c)));
    }
    c0 = c1;
  }
}

// Register tile: MB x rows by NC * 16 columns (the last vector masked by msk); each panel vector load
// feeds MB FMAs, MB * NC independent chains hide the FMA latency, and the accumulators are loaded and
// stored once per panel (not once per U^T row).
template <int MB, int NC>
inline void panel_tile(const float* panel, int64_t rows, int64_t len, const float* tt, int64_t m, float* acc,
                       int64_t c, __mmask16 msk) {
  constexpr __mmask16 kAll = 0xffff;
  __m512 a[MB][NC];
  for (int mm = 0; mm < MB; ++mm)
    for (int v = 0; v < NC; ++v) a[mm][v] = _mm512_maskz_loadu_ps(v == NC - 1 ? msk : kAll, acc + mm * len + c + 16 * v);
  for (int64_t j = 0; j < rows; ++j) {
    __m512 p[NC];
    for (int v = 0; v < NC; ++v) p[v] = _mm512_maskz_loadu_ps(v == NC - 1 ? msk : kAll, panel + j * len + c + 16 * v);
    for (int mm = 0; mm < MB; ++mm) {
      const __m512 b = _mm512_set1_ps(tt[j * m + mm]);
      for (int v = 0; v < NC; ++v) a[mm][v] = _mm512_fmadd_ps(b, p[v], a[mm][v]);
    }
  }
  for (int mm = 0; mm < MB; ++mm)
    for (int v = 0; v < NC; ++v) _mm512_mask_storeu_ps(acc + mm * len + c + 16 * v, v == NC - 1 ? msk : kAll, a[mm][v]);
}

void panel_gemm_avx512(const float* panel, int64_t rows, int64_t len, const float* tt, int64_t m, float* acc) {
  int64_t c = 0;
  for (; c + 32 <= len; c += 32) {  // 4 x rows x 32 columns: 8 chains; one x row: 4 x 16 columns
    int64_t i = 0;
    for (; i + 4 <= m; i += 4) panel_tile<4, 2>(panel, rows, len, tt + i, m, acc + i * len, c, 0xffff);
    for (; i < m; ++i) panel_tile<1, 2>(panel, rows, len, tt + i, m, acc + i * len, c, 0xffff);
  }
  for (; c < len; c += 16) {
    const __mmask16 msk = len - c >= 16 ? static_cast<__mmask16>(0xffff) : tail_mask(len - c);
    int64_t i = 0;
    for (; i + 4 <= m; i += 4) panel_tile<4, 1>(panel, rows, len, tt + i, m, acc + i * len, c, msk);
    for (; i < m; ++i) panel_tile<1, 1>(panel, rows, len, tt + i, m, acc + i * len, c, msk);
  }
}

// out[jj * m + i] = <panel[jj], x[i]> for an R x MB tile: R * MB independent chains, each panel and x
// vector load feeds MB (R) FMAs.
template <int R, int MB>
void dots_tile(const float* panel, int64_t k, const float* x, int64_t m, float* out) {
  __m512 a[R][MB];
  for (int q = 0; q < R; ++q)
    for (int mm = 0; mm < MB; ++mm) a[q][mm] = _mm512_setzero_ps();
  for (int64_t c = 0; c < k; c += 16) {
    const __mmask16 msk = k - c >= 16 ? static_cast<__mmask16>(0xffff) : tail_mask(k - c);
    __m512 xv[MB];
    for (int mm = 0; mm < MB; ++mm) xv[mm] = _mm512_maskz_loadu_ps(msk, x + mm * k + c);
    for (int q = 0; q < R; ++q) {
      const __m512 p = _mm512_maskz_loadu_ps(msk, panel + q * k + c);
      for (int mm = 0; mm < MB; ++mm) a[q][mm] = _mm512_fmadd_ps(p, xv[mm], a[q][mm]);
    }
  }
  for (int q = 0; q < R; ++q)
    for (int mm = 0; mm < MB; ++mm) out[q * m + mm] = _mm512_reduce_add_ps(a[q][mm]);
}

template <int R>
void dots_rows(const float* panel, int64_t k, const float* x, int64_t m, float* out) {
  int64_t i = 0;
  for (; i + 4 <= m; i += 4) dots_tile<R, 4>(panel, k, x + i * k, m, out + i);
  switch (m - i) {
    case 3: dots_tile<R, 3>(panel, k, x + i * k, m, out + i); break;
    case 2: dots_tile<R, 2>(panel, k, x + i * k, m, out + i); break;
    case 1: dots_tile<R, 1>(panel, k, x + i * k, m, out + i); break;
    default: break;
  }
}

void panel_dots_avx512(const float* panel, int64_t rows, int64_t k, const float* x, int64_t m, float* out) {
  int64_t q = 0;
  for (; q + 4 <= rows; q += 4) dots_rows<4>(panel + q * k, k, x, m, out + q * m);
  for (; q < rows; ++q) dots_rows<1>(panel + q * k, k, x, m, out + q * m);
}

#pragma GCC diagnostic pop
#pragma GCC pop_options

constexpr Isa kAvx512{decode_avx512, scaled_dot_avx512, halves_avx512, scale_groups_avx512, panel_gemm_avx512,
                      panel_dots_avx512, axpy_codes_avx512, dot_codes_avx512, 16, nullptr};
#endif  // DELTACOMP_X86_GCC

}  // namespace

#if DELTACOMP_X86_GCC
const Isa* avx512_isa() { return &kAvx512; }
#else
const Isa* avx512_isa() { return nullptr; }
#endif

}  // namespace lowrank
}  // namespace cpu
}  // namespace deltacomp
