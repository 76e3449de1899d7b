// AVX2 + FMA inner loops of the low-rank kernel (lowrank_kernels.cpp has the driver and the math):
// a decode of 8 KBITS codes with no byte shuffles for widths <= 4, the one-row dot of a V row with x
// (stage 1) and the one-row axpy of a U^T row into the accumulators (stage 3), both straight from the
// packed bytes. Compiled with target pragmas, picked at run time.
//
// Decoding: in a KBITS stream, 8 consecutive codes starting at a code index that is a multiple of 8
// fill exactly `bits` (B) whole bytes. B <= 4: the 4 bytes at the block's first byte, broadcast to the
// 8 lanes, shifted right by i*B in lane i and masked (3 instructions). B = 5..7: 8 bytes broadcast,
// a byte shuffle puts the (up to) 4 bytes holding code i into lane i, then shift by (i*B) % 8 and mask.
// B = 8: the 8 bytes zero-extended. The fast loads read up to 4 (B <= 4) or 8 bytes from the block's
// first byte; a block whose read would pass the end of the stream copies its B bytes first.
#include <algorithm>
#include <vector>

#include "lowrank_isa.h"

namespace deltacomp {
namespace cpu {
namespace lowrank {
namespace {

#if DELTACOMP_X86_GCC
// Per width B (5..7): pshufb control putting bytes (i*B)/8 .. +3 of the block into 32-bit lane i (0x80, a
// zero byte, past the block's B bytes; both 128-bit halves see the block, broadcast), and lane i's
// right shift; widths <= 4 use shift i*B on the whole 4-byte word instead.
struct Tables {
  alignas(32) uint8_t ctl[9][32];
  alignas(32) int32_t shift[9][8];
  constexpr Tables() : ctl(), shift() {
    for (int b = 1; b <= 8; ++b)
      for (int i = 0; i < 8; ++i) {
        for (int t = 0; t < 4; ++t) {
          const int byte = ((i * b) >> 3) + t;
          ctl[b][4 * i + t] = static_cast<uint8_t>(byte < b ? byte : 0x80);
        }
        shift[b][i] = b <= 4 ? i * b : (i * b) & 7;
      }
  }
};
constexpr Tables kTables{};

#pragma GCC push_options
#pragma GCC target("avx2,fma")

// 8 codes of width B as floats, from the block's first byte p.
template <int B>
struct Dec8 {
  static constexpr int kRead = B <= 4 ? 4 : 8;  // bytes the fast load reads from p
  __m256i ctl, shift, mask;
  Dec8()
      : ctl(_mm256_load_si256(reinterpret_cast<const __m256i*>(kTables.ctl[B]))),
        shift(_mm256_load_si256(reinterpret_cast<const __m256i*>(kTables.shift[B]))),
        mask(_mm256_set1_epi32((1 << B) - 1)) {}
  __m256 operator()(const uint8_t* p) const {
    if constexpr (B == 8) {
      return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
    } else if constexpr (B <= 4) {
      int32_t w;
      std::memcpy(&w, p, 4);
      return _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(w), shift), mask));
    } else {
      long long w;
      std::memcpy(&w, p, 8);
      const __m256i v = _mm256_shuffle_epi8(_mm256_set1_epi64x(w), ctl);
      return _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srlv_epi32(v, shift), mask));
    }
  }
  // the same from a copy of exactly the block's B bytes (the last blocks of a stream)
  __m256 copied(const uint8_t* p) const {
    alignas(8) uint8_t buf[8] = {};
    std::memcpy(buf, p, B);
    return (*this)(buf);
  }
  // B <= 3: lane i holds code i in its low B bits, the next codes' bits above (no mask: a vpermps over
  // a table of 8 entries repeating every 2^B reads only the low 3 bits)
  __m256i lanes(const uint8_t* p) const {
    static_assert(B <= 3, "lanes: codes of at most 3 bits");
    int32_t w;
    std::memcpy(&w, p, 4);
    return _mm256_srlv_epi32(_mm256_set1_epi32(w), shift);
  }
  __m256i lanes_copied(const uint8_t* p) const {
    alignas(8) uint8_t buf[8] = {};
    std::memcpy(buf, p, B);
    return lanes(buf);
  }
};

// Codes [0, end) relative to a row starting at code `first` (a multiple of 8) are in blocks whose fast
// read stays inside the nbytes-byte stream.
template <int B>
inline int64_t fast_end(int64_t nbytes, int64_t first) {
  if (nbytes < Dec8<B>::kRead) return 0;
  return std::max<int64_t>(0, ((nbytes - Dec8<B>::kRead) / B + 1 - first / 8) * 8);
}

inline float hsum(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
}

// sum over the groups g of [0, len) of scale[g] * <codes first + [g*gs, (g+1)*gs), x[same]>;
// first and gs multiples of 8, len any (a last partial block is read code by code).
template <int B>
float dot_codes_b(const uint8_t* stream, int64_t nbytes, int64_t first, int64_t len, const float* x,
                  int64_t gs, const float* scale) {
  const Dec8<B> dec;
  const uint8_t* row = stream + (first >> 3) * B;  // block c / 8 of the row starts at row + (c / 8) * B
  const int64_t safe = fast_end<B>(nbytes, first);
  __m256 tot = _mm256_setzero_ps();
  float extra = 0.f;  // the partial last block, scaled
  for (int64_t g = 0, c0 = 0; c0 < len; ++g, c0 += gs) {
    const int64_t c1 = std::min(len, c0 + gs), full = c0 + (c1 - c0) / 8 * 8;
    const int64_t fast = std::min(full, std::max(c0, safe));
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
    int64_t c = c0;
    for (; c + 32 <= fast; c += 32) {  // four chains hide the FMA latency
      const uint8_t* p = row + (c >> 3) * B;
      a0 = _mm256_fmadd_ps(dec(p), _mm256_loadu_ps(x + c), a0);
      a1 = _mm256_fmadd_ps(dec(p + B), _mm256_loadu_ps(x + c + 8), a1);
      a2 = _mm256_fmadd_ps(dec(p + 2 * B), _mm256_loadu_ps(x + c + 16), a2);
      a3 = _mm256_fmadd_ps(dec(p + 3 * B), _mm256_loadu_ps(x + c + 24), a3);
    }
    for (; c < fast; c += 8) a0 = _mm256_fmadd_ps(dec(row + (c >> 3) * B), _mm256_loadu_ps(x + c), a0);
    for (; c < full; c += 8) a1 = _mm256_fmadd_ps(dec.copied(row + (c >> 3) * B), _mm256_loadu_ps(x + c), a1);
    float part = 0.f;
    for (; c < c1; ++c) part += x[c] * static_cast<float>(code_at(stream, B, first + c));
    extra += scale[g] * part;
    tot = _mm256_fmadd_ps(_mm256_set1_ps(scale[g]), _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)), tot);
  }
  return hsum(tot) + extra;
}

// acc[c] += sum over the R rows q of coef[q * cstride + (off + c) / gs - off / gs] * code(first + q * stride
// + c), c < len (Isa::axpy_codes: first, stride, off, len and gs multiples of 16): the accumulators are
// loaded and stored once per R rows.
template <int B, int R>
void axpy_rows(const uint8_t* stream, int64_t nbytes, int64_t first, int64_t stride, int64_t len, int64_t off,
               int64_t gs, const float* coef, int64_t cstride, float* acc) {
  const Dec8<B> dec;
  const uint8_t* row[R];
  for (int q = 0; q < R; ++q) row[q] = stream + ((first + q * stride) >> 3) * B;
  const int64_t safe = fast_end<B>(nbytes, first + (R - 1) * stride);  // the last row ends last
  for (int64_t c0 = 0, g = 0, end = (off / gs + 1) * gs - off; c0 < len; ++g, end += gs) {
    const int64_t c1 = std::min(len, end), fast = std::min(c1, std::max(c0, safe));
    __m256 a[R];
    for (int q = 0; q < R; ++q) a[q] = _mm256_set1_ps(coef[q * cstride + g]);
    int64_t c = c0;
    if constexpr (B <= 3) {  // a * code looked up rather than decoded, converted and FMA'd
      // entry e: coef * (e mod 2^B). B <= 2: the in-lane vpermilps (2 index bits, the 4 entries repeated
      // in both halves), 2.6x the throughput of the cross-lane vpermps that 3 bits need.
      const __m256 codes = _mm256_setr_ps(0, 1 % (1 << B), 2 % (1 << B), 3 % (1 << B), 4 % (1 << B),
                                          5 % (1 << B), 6 % (1 << B), 7 % (1 << B));
      for (int q = 0; q < R; ++q) a[q] = _mm256_mul_ps(a[q], codes);
      const auto look = [](__m256 tab, __m256i idx) {
        if constexpr (B <= 2) return _mm256_permutevar_ps(tab, idx);
        else return _mm256_permutevar8x32_ps(tab, idx);
      };
      for (; c < fast; c += 8) {
        __m256 y = _mm256_loadu_ps(acc + c);
        for (int q = 0; q < R; ++q) y = _mm256_add_ps(y, look(a[q], dec.lanes(row[q] + (c >> 3) * B)));
        _mm256_storeu_ps(acc + c, y);
      }
      for (; c < c1; c += 8) {
        __m256 y = _mm256_loadu_ps(acc + c);
        for (int q = 0; q < R; ++q) y = _mm256_add_ps(y, look(a[q], dec.lanes_copied(row[q] + (c >> 3) * B)));
        _mm256_storeu_ps(acc + c, y);
      }
      c0 = c1;
      continue;
    }
    for (; c < fast; c += 8) {
      __m256 y = _mm256_loadu_ps(acc + c);
      for (int q = 0; q < R; ++q) y = _mm256_fmadd_ps(a[q], dec(row[q] + (c >> 3) * B), y);
      _mm256_storeu_ps(acc + c, y);
    }
    for (; c < c1; c += 8) {
      __m256 y = _mm256_loadu_ps(acc + c);
      for (int q = 0; q < R; ++q) y = _mm256_fmadd_ps(a[q], dec.copied(row[q] + (c >> 3) * B), y);
      _mm256_storeu_ps(acc + c, y);
    }
    c0 = c1;
  }
}

template <int B>
void axpy_b(const uint8_t* stream, int64_t nbytes, int64_t first, int64_t stride, int rows, int64_t len,
            int64_t off, int64_t gs, const float* coef, int64_t cstride, float* acc) {
  switch (rows) {
    case 1: return axpy_rows<B, 1>(stream, nbytes, first, stride, len, off, gs, coef, cstride, acc);
    case 2: return axpy_rows<B, 2>(stream, nbytes, first, stride, len, off, gs, coef, cstride, acc);
    case 3: return axpy_rows<B, 3>(stream, nbytes, first, stride, len, off, gs, coef, cstride, acc);
    default: return axpy_rows<B, 4>(stream, nbytes, first, stride, len, off, gs, coef, cstride, acc);
  }
}

// out[i] = code first + i, i < count (any first: a scalar head up to a block boundary, then blocks)
template <int B>
void decode_b(const uint8_t* stream, int64_t nbytes, int64_t first, int64_t count, float* out) {
  int64_t i = 0;
  for (; i < count && ((first + i) & 7); ++i) out[i] = static_cast<float>(code_at(stream, B, first + i));
  const Dec8<B> dec;
  const int64_t safe = fast_end<B>(nbytes, first + i) + i;  // relative to `first`
  const int64_t full = i + (count - i) / 8 * 8, fast = std::min(full, std::max(i, safe));
  for (; i < fast; i += 8) _mm256_storeu_ps(out + i, dec(stream + ((first + i) >> 3) * B));
  for (; i < full; i += 8) _mm256_storeu_ps(out + i, dec.copied(stream + ((first + i) >> 3) * B));
  for (; i < count; ++i) out[i] = static_cast<float>(code_at(stream, B, first + i));
}

#pragma GCC pop_options

// ---- stage 1 at one x row by lookup tables (the 3-bit tables of the AVX2 sign matmul) ---------------
// A V row's codes are one bitstream; bit p of the row (code p / B, bit p % B of it) contributes
// coef[p] = 2^(p % B) * x[p / B] when set, so <codes, x> over a run of bits is a linear function of the
// bits, whatever the width: per 32 bits of the row (a "lane block"), ten groups of 3 bits and one of 2,
// each with the table of its 8 sums (T[b] = sum of the coefs of the set bits of b). 8 V rows are read
// at once, transposed so that each 32-bit lane holds one row; per group one shift, one vpermps, one add
// (32 instructions per 8 rows x 32 bits), against about 5 per 8 codes of one row for the byte-direct
// dot above: fewer for B <= 4. The per-row group scales are applied per group of gs codes (gs * B / 32
// lane blocks): tot += (sum of the group's lookups) * (the 8 rows' scales). Needs k * B and gs * B
// multiples of 32 (each row and each group starts at a lane boundary).
constexpr int kLutGroups = 11;                  // bit groups per 32-bit lane block
constexpr int kLutBlockFloats = 8 * kLutGroups;  // table floats per lane block
constexpr int kLutChains = 4;                   // add chains: 11 adds per block over 4 chains

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")

// Tables of `blocks` lane blocks from the per-bit coefficients: T[b] = sum over the set bits i of b of
// coef[3g + i], as sum of coef broadcasts masked by bit i of the lane index.
void lut_tables(const float* coef, int64_t blocks, float* t) {
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  __m256 bit[3];
  for (int i = 0; i < 3; ++i)
    bit[i] = _mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_and_si256(lane, _mm256_set1_epi32(1 << i)),
                                                    _mm256_set1_epi32(1 << i)));
  for (int64_t blk = 0; blk < blocks; ++blk) {
    const float* c = coef + 32 * blk;
    float* tb = t + kLutBlockFloats * blk;
    for (int g = 0; g < kLutGroups; ++g) {
      __m256 v = _mm256_and_ps(_mm256_broadcast_ss(c + 3 * g), bit[0]);
      v = _mm256_add_ps(v, _mm256_and_ps(_mm256_broadcast_ss(c + 3 * g + 1), bit[1]));
      if (g < kLutGroups - 1) v = _mm256_add_ps(v, _mm256_and_ps(_mm256_broadcast_ss(c + 3 * g + 2), bit[2]));
      _mm256_storeu_ps(tb + 8 * g, v);  // the 2-bit group: entries 4-7 repeat 0-3 (bit 2 unused)
    }
  }
}

#include "transpose8_avx2.inc"

// acc lane r += the 11 groups of one lane block of 8 rows (sign lanes v), tables tb
inline void lut_block(__m256i v, const float* tb, __m256* acc) {
  for (int g = 0; g < kLutGroups; ++g) {
    const __m256i idx = g ? _mm256_srli_epi32(v, 3 * g) : v;  // vpermps reads the low 3 bits of each lane
    __m256& a = acc[g % kLutChains];
    a = _mm256_add_ps(a, _mm256_permutevar8x32_ps(_mm256_loadu_ps(tb + 8 * g), idx));
  }
}

// tot += (the 4 chains of one group's sums) * (the 8 rows' scales of group g); chains reset
inline void finish_group(__m256* acc, __m256& tot, const uint16_t* const* scale, int64_t g) {
  alignas(16) uint16_t h[8];
  for (int q = 0; q < 8; ++q) h[q] = scale[q][g];
  const __m256 sc = _mm256_cvtph_ps(_mm_load_si128(reinterpret_cast<const __m128i*>(h)));
  tot = _mm256_fmadd_ps(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])), sc, tot);
  for (int c = 0; c < kLutChains; ++c) acc[c] = _mm256_setzero_ps();
}

// dots[q] for the 8 rows of one tile (rows < 8: the missing ones repeat row 0 and are not stored):
// sum over groups g of scale[row][g] * <codes of the group, x>. row[q]: the rows' first bytes; lanes:
// 32-bit lane blocks per row; per_group: lane blocks per group; the next tile's bytes are prefetched.
void lut_rows(const uint8_t* const* row, int rows, int64_t lanes, int64_t per_group, const float* t,
              const uint16_t* const* scale, const uint8_t* pf, int64_t pf_bytes, float* dots) {
  __m256 acc[kLutChains], tot = _mm256_setzero_ps();
  for (auto& a : acc) a = _mm256_setzero_ps();
  const int64_t steps = lanes / 8;
  const int64_t pf_step = steps ? (pf_bytes / steps + 63) / 64 * 64 : 0;
  int64_t pf_done = 0, b = 0, g = 0, group_end = per_group;
  for (; b + 8 <= lanes; b += 8) {
    for (int64_t o = 0; o < pf_step && pf_done < pf_bytes; o += 64, pf_done += 64)
      _mm_prefetch(reinterpret_cast<const char*>(pf + pf_done), _MM_HINT_T0);
    __m256i v[8];
    for (int q = 0; q < 8; ++q) v[q] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row[q] + 4 * b));
    transpose8(v);  // v[i] lane q = row q's lane block b + i
    for (int i = 0; i < 8; ++i) {
      lut_block(v[i], t + kLutBlockFloats * (b + i), acc);
      if (b + i + 1 == group_end) {
        finish_group(acc, tot, scale, g++);
        group_end += per_group;
      }
    }
  }
  for (; b < lanes; ++b) {
    alignas(32) uint32_t w[8];
    for (int q = 0; q < 8; ++q) std::memcpy(&w[q], row[q] + 4 * b, 4);
    lut_block(_mm256_load_si256(reinterpret_cast<const __m256i*>(w)), t + kLutBlockFloats * b, acc);
    if (b + 1 == group_end) {
      finish_group(acc, tot, scale, g++);
      group_end += per_group;
    }
  }
  if (b != group_end - per_group) finish_group(acc, tot, scale, g);  // a last partial group (k % gs)
  alignas(32) float out[8];
  _mm256_store_ps(out, tot);
  for (int q = 0; q < rows; ++q) dots[q] = out[q];
}

// dots[j] = sum over groups g of scale[j][g] * <codes of V row j in group g, x>, j < r (see above).
void row_dots_lut_avx2(const uint8_t* v_q, int bits, int64_t r, int64_t k, const float* x, int64_t gs,
                       const uint16_t* v_scale, float* dots) {
  const int64_t row_bits = k * bits, lanes = row_bits / 32, nb = row_bits / 8, gk = (k + gs - 1) / gs;
  std::vector<float> coef(static_cast<size_t>(row_bits)), t(static_cast<size_t>(lanes * kLutBlockFloats));
  for (int64_t c = 0; c < k; ++c)
    for (int w = 0; w < bits; ++w) coef[c * bits + w] = x[c] * static_cast<float>(1 << w);
  lut_tables(coef.data(), lanes, t.data());
  const int64_t tiles = (r + 7) / 8;
  for_each_index(tiles, 4, r * k, [&](int64_t ti) {
    const int64_t j0 = 8 * ti;
    const int rows = static_cast<int>(std::min<int64_t>(8, r - j0));
    const uint8_t* row[8];
    const uint16_t* scale[8];
    for (int q = 0; q < 8; ++q) {
      const int64_t j = j0 + (q < rows ? q : 0);
      row[q] = v_q + j * nb;
      scale[q] = v_scale + j * gk;
    }
    const int64_t next = std::min(r, j0 + 8), next_end = std::min(r, j0 + 16);
    lut_rows(row, rows, lanes, gs * bits / 32, t.data(), scale, v_q + next * nb, (next_end - next) * nb, dots + j0);
  });
}
#pragma GCC pop_options

// fp16 bit patterns -> floats, 8 at a time (vcvtph2ps, F16C; exact, as half_to_float), the rest one by
// one. The scalar half_to_float took a fifth of the one-row op's time (two halves calls per V row and
// per U^T row and output block).
#pragma GCC push_options
#pragma GCC target("avx2,f16c")
void halves_f16c(const uint16_t* h, int64_t count, float* out) {
  int64_t i = 0;
  for (; i + 8 <= count; i += 8)
    _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h + i))));
  for (; i < count; ++i) out[i] = half_to_float(h[i]);
}
#pragma GCC pop_options


float dot_codes_avx2(const uint8_t* stream, int64_t nbytes, int bits, int64_t first, int64_t len, const float* x,
                     int64_t gs, const float* scale) {
  DELTACOMP_BY_WIDTH(dot_codes_b, stream, nbytes, first, len, x, gs, scale)
}

void axpy_codes_avx2(const uint8_t* stream, int64_t nbytes, int bits, int64_t first, int64_t stride, int rows,
                     int64_t len, int64_t off, int64_t gs, const float* coef, int64_t cstride, float* acc) {
  DELTACOMP_BY_WIDTH(axpy_b, stream, nbytes, first, stride, rows, len, off, gs, coef, cstride, acc)
}

void decode_avx2(const uint8_t* stream, int64_t nbytes, int bits, int64_t first, int64_t count, float* out) {
  DELTACOMP_BY_WIDTH(decode_b, stream, nbytes, first, count, out)
}
#endif  // DELTACOMP_X86_GCC

}  // namespace

#if DELTACOMP_X86_GCC
Avx2Loops avx2_loops() {
  const bool f16c = __builtin_cpu_supports("f16c");
  return {decode_avx2, axpy_codes_avx2, dot_codes_avx2, f16c ? halves_f16c : nullptr,
          f16c ? row_dots_lut_avx2 : nullptr};
}
#else
Avx2Loops avx2_loops() { return {nullptr, nullptr, nullptr, nullptr, nullptr}; }
#endif

}  // namespace lowrank
}  // namespace cpu
}  // namespace deltacomp
