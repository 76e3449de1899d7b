// CPU kernel of the svd-mixed low-rank k-bit factor matmul (see lowrank_kernels.h). Raw pointers only.
//
// The RTN dequantization is folded into the products, so codes are only ever turned into floats:
//   stage 1  t[i][j] = s[j] * sum_g ( scale_V[j][g] * <codes_V[j][g], x[i][g]>  +  zero_V[j][g] * sum(x[i][g]) )
//   stage 3  y[i][c] = sum_j t[i][j] * scale_U[j][g(c)] * code_U[j][c]  +  sum_j t[i][j] * zero_U[j][g(c)]
// (g: the group_size run of the row a code sits in). The second sum of stage 3 is one number per
// (x row, group), added once at the end.
//
// Work split:
//   stage 1: one V row j at a time (OpenMP over j): its k codes are decoded once into a thread-local
//            float row, then dotted group by group with every x row (x rows share the decode).
//   stage 3: output columns in blocks (OpenMP over blocks, see block_columns); a block keeps its
//            m x block accumulators in cache and walks the r rows of U^T a few at a time: their codes in
//            the block are decoded and scaled into a small panel, then acc += t^T panel with register
//            tiles (4 x rows by 16 columns), so accumulators are loaded/stored once per panel.
// Either way each packed byte is read once per call; no dense U or V exists at any point.
//
// Decoding: in a KBITS stream, 8 consecutive codes starting at a code index that is a multiple of 8
// fill exactly `bits` bytes, byte-aligned. So after a scalar head (up to the next multiple of 8, or 16
// for AVX-512), codes come in fixed byte patterns: the AVX-512 path loads the 2*bits bytes of 16 codes,
// broadcasts them to the four 128-bit lanes, byte-shuffles the (up to) 4 bytes holding code i into
// 32-bit lane i, shifts right by (i*bits) % 8 and masks: 16 codes in 5 instructions.
#include "lowrank_kernels.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <vector>

#include <omp.h>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define DELTACOMP_X86_GCC 1
#include <immintrin.h>
#endif

namespace deltacomp {
namespace cpu {
namespace {

// Below this many code-multiply-adds a call runs on one thread: waking the OpenMP team costs more.
constexpr int64_t kParallelMinWork = 1 << 16;
// Stage-3 panel: U^T rows x block columns of fp32, at most this many floats (32 KiB, L1/L2).
constexpr int64_t kPanelFloats = 8192;
constexpr int64_t kMaxPanelRows = 16;
// Stage-1 V rows decoded per panel when there are several x rows (register tiles of 4 V x 4 x rows).
constexpr int64_t kDotRows = 4;

// Output columns per stage-3 block (a multiple of 16). Each (U^T row, block) pair costs a fixed
// overhead (calls, a scalar head, the group scales), so blocks are as wide as keeps >= 2 blocks per
// thread (load balance) and the m x block accumulators in L1/L2 (narrower for larger m).
int64_t block_columns(int64_t n, int64_t m, int threads) {
  const int64_t cap = m <= 2 ? 4096 : (m <= 8 ? 1024 : 512);
  const int64_t want = ((n + 2 * threads - 1) / (2 * threads) + 15) / 16 * 16;
  return std::max<int64_t>(256, std::min(want, cap));
}

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

// Code `idx` of a KBITS stream, reading no byte past the one holding its last bit.
inline uint32_t code_at(const uint8_t* stream, int bits, int64_t idx) {
  const int64_t p = idx * bits;
  const int64_t byte = p >> 3;
  const int sh = static_cast<int>(p & 7);
  uint32_t v = stream[byte];
  if (sh + bits > 8) v |= static_cast<uint32_t>(stream[byte + 1]) << 8;
  return (v >> sh) & ((1u << bits) - 1u);
}

// Function table of one code path: decode codes to floats, per-group dot products, per-group axpy.
struct Isa {
  // out[i] = code first + i, i < count
  void (*decode)(const uint8_t* stream, int bits, int64_t first, int64_t count, float* out);
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
  // One x row (m = 1): acc[c] += coef[(off + c) / gs - off / gs] * code(first + c), c < len, straight
  // from the packed bytes. Needs first, off, len and gs multiples of 16; nullptr when the path has none.
  void (*axpy_codes)(const uint8_t* stream, int bits, int64_t first, int64_t len, int64_t off, int64_t gs,
                     const float* coef, float* acc);
};

// ---- portable path: compiled for AVX2 and baseline x86-64 (GCC picks at load time) ---------------
#if DELTACOMP_X86_GCC
__attribute__((target_clones("avx2", "default")))
#endif
void decode_generic(const uint8_t* stream, int bits, int64_t first, int64_t count, float* out) {
  int64_t i = 0;
  for (; i < count && ((first + i) & 7); ++i) out[i] = static_cast<float>(code_at(stream, bits, first + i));
  const uint64_t mask = (1u << bits) - 1u;
  for (; i + 8 <= count; i += 8) {  // 8 codes = `bits` whole bytes
    uint64_t w = 0;
    std::memcpy(&w, stream + ((first + i) >> 3) * bits, static_cast<size_t>(bits));  // little-endian host
    for (int t = 0; t < 8; ++t) out[i + t] = static_cast<float>((w >> (t * bits)) & mask);
  }
  for (; i < count; ++i) out[i] = static_cast<float>(code_at(stream, bits, first + i));
}

#if DELTACOMP_X86_GCC
__attribute__((target_clones("avx2", "default")))
#endif
float scaled_dot_generic(const float* a, const float* b, int64_t len, int64_t gs, const float* scale) {
  // 16 fixed lanes: the fixed-length inner loops vectorize without reassociating a float sum; one
  // horizontal sum per call, the group scales applied lane-wise
  float tot[16] = {0.f};
  float tail = 0.f;
  for (int64_t g = 0, c0 = 0; c0 < len; ++g, c0 += gs) {
    const int64_t c1 = std::min(len, c0 + gs);
    float acc[16] = {0.f};
    int64_t c = c0;
    for (; c + 16 <= c1; c += 16)
      for (int l = 0; l < 16; ++l) acc[l] += a[c + l] * b[c + l];
    float rest = 0.f;
    for (; c < c1; ++c) rest += a[c] * b[c];
    for (int l = 0; l < 16; ++l) tot[l] += scale[g] * acc[l];
    tail += scale[g] * rest;
  }
  for (int l = 0; l < 16; ++l) tail += tot[l];
  return tail;
}

void halves_generic(const uint16_t* h, int64_t count, float* out) {
  for (int64_t i = 0; i < count; ++i) out[i] = half_to_float(h[i]);
}

#if DELTACOMP_X86_GCC
__attribute__((target_clones("avx2", "default")))
#endif
void scale_groups_generic(float* v, int64_t len, int64_t off, int64_t gs, const float* scale) {
  // one division per call (a 64-bit divide costs as much as a group of multiplies)
  for (int64_t c0 = 0, g = 0, end = (off / gs + 1) * gs - off; c0 < len; ++g, end += gs) {
    const int64_t c1 = std::min(len, end);
    const float a = scale[g];
    for (int64_t c = c0; c < c1; ++c) v[c] *= a;
    c0 = c1;
  }
}

#if DELTACOMP_X86_GCC
__attribute__((target_clones("avx2", "default")))
#endif
void panel_gemm_generic(const float* panel, int64_t rows, int64_t len, const float* tt, int64_t m, float* acc) {
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < rows; ++j) {
      const float a = tt[j * m + i];
      const float* p = panel + j * len;
      float* y = acc + i * len;
      for (int64_t c = 0; c < len; ++c) y[c] += a * p[c];
    }
}

void panel_dots_generic(const float* panel, int64_t rows, int64_t k, const float* x, int64_t m, float* out) {
  const float one = 1.f;
  for (int64_t q = 0; q < rows; ++q)
    for (int64_t i = 0; i < m; ++i) out[q * m + i] = scaled_dot_generic(panel + q * k, x + i * k, k, k, &one);
}

constexpr Isa kGeneric{decode_generic, scaled_dot_generic, halves_generic, scale_groups_generic, panel_gemm_generic,
                       panel_dots_generic, nullptr};

// ---- AVX-512 path ---------------------------------------------------------------------------------
#if DELTACOMP_X86_GCC
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl")
#pragma GCC diagnostic push
// GCC 12 false positive: _mm512_reduce_add_ps starts from _mm256_undefined_pd() on purpose.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"

// Per width b: pshufb control putting bytes (i*b)/8 .. +3 of a 16-code block into 32-bit lane i
// (0x80, a zero byte, past the block), and the right shift (i*b) % 8 of lane i.
struct DecodeTables {
  alignas(64) uint8_t ctl[9][64];
  alignas(64) int32_t shift[9][16];
  constexpr DecodeTables() : ctl(), shift() {
    for (int b = 1; b <= 8; ++b)
      for (int i = 0; i < 16; ++i) {
        const int first = (i * b) >> 3;
        for (int t = 0; t < 4; ++t) {
          const int byte = first + t;
          ctl[b][4 * i + t] = static_cast<uint8_t>(byte < 2 * b ? byte : 0x80);
        }
        shift[b][i] = (i * b) & 7;
      }
  }
};
constexpr DecodeTables kDecode{};

// 16 codes starting at a code index that is a multiple of 16 (see decode_avx512), as floats.
struct Decode16 {
  __m512i ctl, shift, mask;
  __mmask16 bytes;
  explicit Decode16(int bits)
      : ctl(_mm512_load_si512(kDecode.ctl[bits])), shift(_mm512_load_si512(kDecode.shift[bits])),
        mask(_mm512_set1_epi32((1 << bits) - 1)), bytes(static_cast<__mmask16>((1u << (2 * bits)) - 1u)) {}
  __m512 operator()(const uint8_t* block) const {  // the 2*bits bytes of the 16 codes; reads no more
    const __m128i blk = _mm_maskz_loadu_epi8(bytes, block);
    const __m512i v = _mm512_shuffle_epi8(_mm512_broadcast_i32x4(blk), ctl);
    return _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srlv_epi32(v, shift), mask));
  }
};

void decode_avx512(const uint8_t* stream, int bits, int64_t first, int64_t count, float* out) {
  int64_t i = 0;
  for (; i < count && ((first + i) & 15); ++i) out[i] = static_cast<float>(code_at(stream, bits, first + i));
  const Decode16 dec(bits);  // 16 codes = 2*bits bytes; the masked load reads no byte past them
  for (; i + 16 <= count; i += 16) _mm512_storeu_ps(out + i, dec(stream + ((first + i) >> 3) * bits));
  for (; i < count; ++i) out[i] = static_cast<float>(code_at(stream, bits, first + i));
}

void axpy_codes_avx512(const uint8_t* stream, int bits, int64_t first, int64_t len, int64_t off, int64_t gs,
                       const float* coef, float* acc) {
  const Decode16 dec(bits);
  for (int64_t c0 = 0, g = 0, end = (off / gs + 1) * gs - off; c0 < len; ++g, end += gs) {
    const int64_t c1 = std::min(len, end);
    const __m512 a = _mm512_set1_ps(coef[g]);
    for (int64_t c = c0; c < c1; c += 16) {
      const __m512 f = dec(stream + ((first + c) >> 3) * bits);
      _mm512_storeu_ps(acc + c, _mm512_fmadd_ps(a, f, _mm512_loadu_ps(acc + c)));
    }
    c0 = c1;
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
                      panel_dots_avx512, axpy_codes_avx512};

const Isa& pick_isa() {
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl");
  const char* force = std::getenv("DELTACOMP_CPU_ISA");  // read per call so tests can switch paths
  return has && !(force && std::strcmp(force, "generic") == 0) ? kAvx512 : kGeneric;
}
#else
const Isa& pick_isa() { return kGeneric; }
#endif

inline int64_t n_groups(int64_t len, int64_t gs) { return (len + gs - 1) / gs; }

// Stage 1 + 2: t (r, m) = s * (V x^T), t stored row j = the m values of V row j (stage 3 reads them so).
void stage_v(const Isa& isa, const float* x, int64_t m, int64_t k, int64_t r, int bits, int64_t gs,
             const uint8_t* v_q, const uint16_t* v_scale, const uint16_t* v_zero, const float* s, float* t) {
  const int64_t gk = n_groups(k, gs);
  std::vector<float> xsum(static_cast<size_t>(m * gk));  // sum of x over each group (the zero term)
  for (int64_t i = 0; i < m; ++i)
    for (int64_t g = 0; g < gk; ++g) {
      double acc = 0.0;
      for (int64_t c = g * gs; c < std::min(k, (g + 1) * gs); ++c) acc += x[i * k + c];
      xsum[i * gk + g] = static_cast<float>(acc);
    }
  // One x row: each decoded V row is dotted once, group scales applied to the partial sums. More x
  // rows: kDotRows V rows are decoded and scaled (code * scale: exact in fp32) into a panel, then
  // dotted with all x rows in register tiles.
  const int64_t tile = m == 1 ? 1 : kDotRows;
#pragma omp parallel if (m * r * k >= kParallelMinWork)
  {
    std::vector<float> panel(static_cast<size_t>(tile * k)), sc(static_cast<size_t>(gk)), zr(static_cast<size_t>(gk));
    std::vector<float> dots(static_cast<size_t>(tile * m));
    const float one = 1.f;
#pragma omp for schedule(dynamic, 2)
    for (int64_t j0 = 0; j0 < r; j0 += tile) {
      const int64_t rows = std::min(tile, r - j0);
      for (int64_t q = 0; q < rows; ++q) {
        const int64_t j = j0 + q;
        float* row = panel.data() + q * k;
        isa.decode(v_q, bits, j * k, k, row);
        isa.halves(v_scale + j * gk, gk, sc.data());
        if (m == 1) {
          dots[q] = isa.scaled_dot(row, x, k, gs, sc.data());
        } else {
          isa.scale_groups(row, k, 0, gs, sc.data());
        }
      }
      if (m > 1) isa.panel_dots(panel.data(), rows, k, x, m, dots.data());
      for (int64_t q = 0; q < rows; ++q) {
        const int64_t j = j0 + q;
        isa.halves(v_zero + j * gk, gk, zr.data());
        for (int64_t i = 0; i < m; ++i) {
          const float zero_term = isa.scaled_dot(zr.data(), xsum.data() + i * gk, gk, gk, &one);
          t[j * m + i] = (dots[q * m + i] + zero_term) * s[j];
        }
      }
    }
  }
}

// Stage 3: y (m, n) = t^T U^T, U^T rows decoded block by block.
void stage_u(const Isa& isa, const float* t, int64_t m, int64_t n, int64_t r, int bits, int64_t gs,
             const uint8_t* u_q, const uint16_t* u_scale, const uint16_t* u_zero, float* y) {
  const int64_t gn = n_groups(n, gs);
  const bool parallel = m * r * n >= kParallelMinWork;
  const int64_t block = block_columns(n, m, parallel ? omp_get_max_threads() : 1);
  const int64_t panel_rows = std::max<int64_t>(1, std::min(kMaxPanelRows, kPanelFloats / block));
  const int64_t blocks = (n + block - 1) / block;
  // block is a multiple of 16, so n % 16 == 0 makes every block start and length one too
  const bool fused = m == 1 && isa.axpy_codes != nullptr && n % 16 == 0 && gs % 16 == 0;
#pragma omp parallel if (parallel)
  {
    std::vector<float> panel(static_cast<size_t>(panel_rows * block)), acc, zsum, sc, zr;
#pragma omp for schedule(dynamic, 1)
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t n0 = b * block, len = std::min(block, n - n0);
      const int64_t g0 = n0 / gs, ng = (n0 + len - 1) / gs - g0 + 1;  // groups the block touches
      acc.assign(static_cast<size_t>(m * len), 0.f);
      zsum.assign(static_cast<size_t>(m * ng), 0.f);
      sc.resize(static_cast<size_t>(ng));
      zr.resize(static_cast<size_t>(ng));
      for (int64_t j = 0; fused && j < r; ++j) {  // one x row: codes straight into the accumulators
        isa.halves(u_scale + j * gn + g0, ng, sc.data());
        isa.halves(u_zero + j * gn + g0, ng, zr.data());
        for (int64_t g = 0; g < ng; ++g) {
          zsum[g] += t[j] * zr[g];
          sc[g] *= t[j];
        }
        isa.axpy_codes(u_q, bits, j * n + n0, len, n0, gs, sc.data(), acc.data());
      }
      for (int64_t j0 = 0; !fused && j0 < r; j0 += panel_rows) {
        const int64_t rows = std::min(panel_rows, r - j0);
        for (int64_t jj = 0; jj < rows; ++jj) {  // panel row jj = scale * code of U^T row j0 + jj
          const int64_t j = j0 + jj;
          float* row = panel.data() + jj * len;
          isa.decode(u_q, bits, j * n + n0, len, row);
          isa.halves(u_scale + j * gn + g0, ng, sc.data());
          isa.halves(u_zero + j * gn + g0, ng, zr.data());
          isa.scale_groups(row, len, n0, gs, sc.data());
          for (int64_t i = 0; i < m; ++i)
            for (int64_t g = 0; g < ng; ++g) zsum[i * ng + g] += t[j * m + i] * zr[g];
        }
        isa.panel_gemm(panel.data(), rows, len, t + j0 * m, m, acc.data());
      }
      for (int64_t i = 0; i < m; ++i)
        for (int64_t g = 0; g < ng; ++g) {  // group by group: no division per element
          const int64_t c0 = std::max<int64_t>(0, (g0 + g) * gs - n0), c1 = std::min(len, (g0 + g + 1) * gs - n0);
          const float z = zsum[i * ng + g];
          for (int64_t c = c0; c < c1; ++c) y[i * n + n0 + c] = acc[i * len + c] + z;
        }
    }
  }
}

}  // namespace

void kbit_lowrank_matmul_f32(const float* x, int64_t m, int64_t k, int64_t n, int64_t r, int bits,
                             int64_t group_size, const uint8_t* v_q, const uint16_t* v_scale,
                             const uint16_t* v_zero, const uint8_t* u_q, const uint16_t* u_scale,
                             const uint16_t* u_zero, const float* s, float* y) {
  if (m == 0 || n == 0) return;
  if (r == 0 || k == 0) {  // an empty factor: the product is exactly zero
    std::fill(y, y + m * n, 0.f);
    return;
  }
  const Isa& isa = pick_isa();
  std::vector<float> t(static_cast<size_t>(r * m));
  stage_v(isa, x, m, k, r, bits, group_size, v_q, v_scale, v_zero, s, t.data());
  stage_u(isa, t.data(), m, n, r, bits, group_size, u_q, u_scale, u_zero, y);
}

}  // namespace cpu
}  // namespace deltacomp
