// CPU kernel of the svd-mixed low-rank k-bit factor matmul (see lowrank_kernels.h). Raw pointers only.
//
// The RTN dequantization is folded into the products, so codes are only ever turned into floats:
//   stage 1  t[i][j] = s[j] * sum_g ( scale_V[j][g] * <codes_V[j][g], x[i][g]>  +  zero_V[j][g] * sum(x[i][g]) )
//   stage 3  y[i][c] = sum_j t[i][j] * scale_U[j][g(c)] * code_U[j][c]  +  sum_j t[i][j] * zero_U[j][g(c)]
// (g: the group_size run of the row a code sits in). The second sum of stage 3 is one number per
// (x row, group), added once at the end.
//
// Work split:
//   stage 1: rows of V (OpenMP over them; at M = 1 this is the parallel axis): each V row's k codes
//            are decoded once into a thread-local float row and dotted with x (AVX2 / AVX-512, k and
//            group_size multiples of 8 / 16: dotted straight from the packed bytes); with several x rows,
//            4 decoded V rows are dotted with all x rows in 4 x 4 register tiles.
//   stage 3: output columns in blocks (OpenMP over blocks, see block_columns); a block keeps its
//            m x block accumulators in cache and walks the r rows of U^T: at M = 1 each row's codes
//            go straight from the packed bytes into the accumulators (AVX-512 and AVX2, n and
//            group_size multiples of 16); otherwise a few rows are decoded and scaled into a small panel and
//            acc += t^T panel runs in register tiles, accumulators loaded/stored once per panel.
// Either way each packed byte is read once per call; no dense U or V exists at any point.
// At one x row on the AVX2, NEON and portable paths, a 1- or 2-bit group that carries its TL4 repack
// (KbitGroup::v_tl / u_tl, built at load time by svd-mixed's serving term) takes stages 1 and 3 through int8
// lookup tables instead (lowrank_tl_avx2.cpp, lowrank_tl_generic.cpp; inexact, DELTACOMP_LOWRANK_KERNEL=exact
// turns it off).
//
// This file: the driver (stages, threads, the choice of code path) and the portable inner loops;
// lowrank_simd.cpp: the AVX-512 loops; lowrank_avx2.cpp: the AVX2 ones (each says how it decodes codes).
#include "lowrank_kernels.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <vector>

#include "lowrank_isa.h"

namespace deltacomp {
namespace cpu {
namespace lowrank {
namespace {

// Stage-3 panel: U^T rows x block columns of fp32, at most this many floats (32 KiB, L1/L2).
constexpr int64_t kPanelFloats = 8192;
constexpr int64_t kMaxPanelRows = 16;
// Stage-1 V rows decoded per panel when there are several x rows (register tiles of 4 V x 4 x rows).
constexpr int64_t kDotRows = 4;

// Output columns per stage-3 block (a multiple of 16). Each (U^T row, block) pair costs a fixed
// overhead (calls, a scalar head, the group scales), so blocks are as wide as keeps >= 2 blocks per
// thread (load balance; at one x row and one thread, one block: then the U^T rows of a pass are one
// contiguous run of the stream) and the m x block accumulators in L1/L2 (narrower for larger m).
int64_t block_columns(int64_t n, int64_t m, int threads) {
  const int64_t cap = m <= 2 ? 4096 : (m <= 8 ? 1024 : 512);
  const int64_t per = threads > 1 || m > 1 ? 2 * threads : 1;
  const int64_t want = ((n + per - 1) / per + 15) / 16 * 16;
  return std::max<int64_t>(256, std::min(want, cap));
}

// ---- portable path: compiled for AVX2 and baseline x86-64 (GCC picks at load time) ---------------
// 8 floats as a GCC/Clang vector: one AVX register in the AVX2 clones, two SSE ones in the baseline.
typedef float V8 __attribute__((vector_size(32)));
// a[c..c+8) * b[c..c+8), unaligned loads (vectors passed by reference: no AVX-dependent call ABI)
inline void mul8(const float* a, const float* b, V8& out) {
  V8 x, y;
  std::memcpy(&x, a, sizeof x);
  std::memcpy(&y, b, sizeof y);
  out += x * y;
}

#if DELTACOMP_X86_GCC
__attribute__((target_clones("avx2", "default")))
#endif
float scaled_dot_generic(const float* a, const float* b, int64_t len, int64_t gs, const float* scale) {
  float tot = 0.f;
  for (int64_t g = 0, c0 = 0; c0 < len; ++g, c0 += gs) {
    const int64_t c1 = std::min(len, c0 + gs);
    V8 acc0 = {}, acc1 = {};  // two chains hide the add latency
    int64_t c = c0;
    for (; c + 16 <= c1; c += 16) {
      mul8(a + c, b + c, acc0);
      mul8(a + c + 8, b + c + 8, acc1);
    }
    for (; c + 8 <= c1; c += 8) mul8(a + c, b + c, acc0);
    const V8 v = acc0 + acc1;
    float sum = ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
    for (; c < c1; ++c) sum += a[c] * b[c];
    tot += scale[g] * sum;
  }
  return tot;
}

#if DELTACOMP_X86_GCC
__attribute__((target_clones("avx2", "default")))
#endif
void halves_generic(const uint16_t* h, int64_t count, float* out) { halves_to_floats(h, count, out); }

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

// The portable path: the loops above, with lowrank_generic.cpp's decode and one-row loops.
const Isa& generic_isa() {
  static const Isa table = [] {
    const GenericLoops g = generic_loops();
    return Isa{g.decode, scaled_dot_generic, halves_generic, scale_groups_generic, panel_gemm_generic,
               panel_dots_generic, g.axpy_codes, g.dot_codes, 8, nullptr};
  }();
  return table;
}

// The path active_isa() (common.h) names, read per call so tests can switch: avx512 = the AVX-512
// table; avx2 = the portable loops (AVX2 clones) with the AVX2 decode, one-row axpy, one-row dot and
// F16C halves; anything else (portable, neon) = the portable loops, which GCC vectorizes for the
// target (NEON on aarch64).
const Isa& pick_isa() {
#if DELTACOMP_X86_GCC
  static const Avx2Loops loops = avx2_loops();
  static const Isa kAvx2 = [] {
    Isa t = generic_isa();
    t.decode = loops.decode;
    t.axpy_codes = loops.axpy_codes;
    t.dot_codes = loops.dot_codes;
    if (loops.halves != nullptr) t.halves = loops.halves;
    t.row_dots = loops.row_dots;
    t.dot_block = 8;
    return t;
  }();
  const cpu::Isa want = active_isa();
  if (want == cpu::Isa::kAvx512 && avx512_isa() != nullptr) return *avx512_isa();
  if (want == cpu::Isa::kAvx2 && loops.decode != nullptr) return kAvx2;
#endif
  return generic_isa();
}

inline int64_t n_groups(int64_t len, int64_t gs) { return (len + gs - 1) / gs; }

// Stages 1 and 3 at one x row (DELTACOMP_LOWRANK_KERNEL, read per call like DELTACOMP_ISA): int8 (unset,
// or any other value) = the int8 tables where a group carries its TL4 repack, else as exact; exact = stage
// 1 by the exact fp32 lookup tables (1-2 bits) or the byte-direct dot, stage 3 by the direct axpy;
// direct = as exact with the byte-direct dot everywhere (for measurements and tests).
enum class TableMode { kInt8, kExact, kDirect };
TableMode table_mode() {
  const char* v = std::getenv("DELTACOMP_LOWRANK_KERNEL");
  if (v && std::strcmp(v, "direct") == 0) return TableMode::kDirect;
  if (v && std::strcmp(v, "exact") == 0) return TableMode::kExact;
  return TableMode::kInt8;
}

// The int8 tables of x (one x row) for every TL4 group of a call, built on first use.
struct TlState {
  TlLoops loops;
  int64_t k, gs;
  TlState(TlLoops l, int64_t k_, int64_t gs_) : loops(l), k(k_), gs(gs_) {}
  bool built = false;
  int8_t* tab = nullptr;  // this thread's kept buffers (Kept), valid while the state lives
  float* delta = nullptr;
  void build(const float* x) {
    if (built) return;
    int64_t chunks = 0;
    tab_.emplace(tab_buf(), static_cast<size_t>(16 * tl_groups(k, gs, &chunks)));
    delta_.emplace(delta_buf(), static_cast<size_t>(chunks));
    tab = tab_->data();
    delta = delta_->data();
    loops.tables(x, k, gs, tab, delta);
    built = true;
  }

 private:
  static std::vector<int8_t>& tab_buf() {
    thread_local std::vector<int8_t> buf;
    return buf;
  }
  static std::vector<float>& delta_buf() {
    thread_local std::vector<float> buf;
    return buf;
  }
  std::optional<Kept<int8_t>> tab_;
  std::optional<Kept<float>> delta_;
};

// Sum of x over each group of gs columns (the zero term of stage 1), (m, ceil(k / gs)).
void group_sums(const float* x, int64_t m, int64_t k, int64_t gs, std::vector<float>& xsum) {
  const int64_t gk = n_groups(k, gs);
  for (int64_t i = 0; i < m; ++i)
    for (int64_t g = 0; g < gk; ++g) {
      // four double chains: with one, the add latency bounds the loop (one call per bit width of each
      // svd-mixed layer; the 8-bit rank-2 call of 4096 x 11008 went from 15 to 12 us, data in cache)
      double acc[4] = {0.0, 0.0, 0.0, 0.0};
      const int64_t c1 = std::min(k, (g + 1) * gs);
      int64_t c = g * gs;
      for (; c + 4 <= c1; c += 4)
        for (int q = 0; q < 4; ++q) acc[q] += x[i * k + c + q];
      for (; c < c1; ++c) acc[0] += x[i * k + c];
      xsum[i * gk + g] = static_cast<float>((acc[0] + acc[1]) + (acc[2] + acc[3]));
    }
}

// Stage 1 + 2 of one group: t (r, m) = s * (V x^T), t stored row j = the m values of V row j (stage 3
// reads them so); xsum from group_sums.
void stage_v(const Isa& isa, const float* x, int64_t m, int64_t k, const KbitGroup& grp, int64_t gs,
             const std::vector<float>& xsum, TlState* tl, float* t) {
  const int64_t gk = n_groups(k, gs), r = grp.r;
  const int bits = grp.bits;
  const uint8_t* v_q = grp.v_q;
  const uint16_t *v_scale = grp.v_scale, *v_zero = grp.v_zero;
  const float* s = grp.s;
  const TableMode mode = m == 1 ? table_mode() : TableMode::kDirect;
  const bool int8 = tl != nullptr && mode == TableMode::kInt8 && grp.v_tl != nullptr && bits <= 2 && gs % 4 == 0;
  const bool lut = isa.row_dots != nullptr && mode != TableMode::kDirect && bits <= kLutMaxBits && k * bits % 32 == 0 &&
                   gs * bits % 32 == 0;
  if (m == 1 && (int8 || lut)) {  // one x row by lookup tables: every row's scaled dot, then the zero terms
    thread_local std::vector<float> dots_buf, zr_buf;
    Kept<float> dots(dots_buf, static_cast<size_t>(r)), zr(zr_buf, static_cast<size_t>(r * gk));
    if (int8) {
      tl->build(x);
      tl->loops.dots(grp.v_tl, grp.v_tl_scale, bits, r, k, gs, tl->tab, tl->delta, dots.data());
    } else {
      isa.row_dots(v_q, bits, r, k, x, gs, v_scale, dots.data());
    }
    // the zero terms of every row: v_zero (r, gk) widened in one call, each row's gk products summed in
    // order (gk = ceil(k / gs) is small: one call per row cost more than the sum)
    isa.halves(v_zero, r * gk, zr.data());
    for (int64_t j = 0; j < r; ++j) {
      const float* z = zr.data() + j * gk;
      float zero_term = 0.f;
      for (int64_t g = 0; g < gk; ++g) zero_term += z[g] * xsum[g];
      t[j] = (dots[j] + zero_term) * s[j];
    }
    return;
  }
  // One x row: each decoded V row is dotted once, group scales applied to the partial sums. More x
  // rows: kDotRows V rows are decoded and scaled (code * scale: exact in fp32) into a panel, then
  // dotted with all x rows in register tiles.
  const int64_t tile = m == 1 ? 1 : kDotRows;
  const int64_t nbytes = (r * k * bits + 7) / 8;
  // one x row, whole blocks of codes per row and group: the codes are dotted straight from the bytes
  const bool direct = m == 1 && isa.dot_codes != nullptr && k % isa.dot_block == 0 && gs % isa.dot_block == 0;
  region(m * r * k, [&] {
    thread_local std::vector<float> panel_buf, sc_buf, zr_buf, dots_buf;
    Kept<float> panel(panel_buf, static_cast<size_t>(tile * k)), sc(sc_buf, static_cast<size_t>(gk));
    Kept<float> zr(zr_buf, static_cast<size_t>(gk)), dots(dots_buf, static_cast<size_t>(tile * m));
    const float one = 1.f;
#pragma omp for schedule(dynamic, 2)
    for (int64_t j0 = 0; j0 < r; j0 += tile) {
      const int64_t rows = std::min(tile, r - j0);
      for (int64_t q = 0; q < rows; ++q) {
        const int64_t j = j0 + q;
        float* row = panel.data() + q * k;
        isa.halves(v_scale + j * gk, gk, sc.data());
        if (direct) {
          dots[q] = isa.dot_codes(v_q, nbytes, bits, j * k, k, x, gs, sc.data());
          continue;
        }
        isa.decode(v_q, nbytes, bits, j * k, k, row);
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
  });
}

// Stage 3 of one group over one block of output columns [n0, n0 + len): acc (m, len) += t^T U^T and
// zsum (m, ng) += the zero terms of the ng groups of gs columns the block touches (from group g0).
// Scratch: panel (panel_rows * len floats), sc, zr.
void block_u(const Isa& isa, const float* t, int64_t m, int64_t n, const KbitGroup& grp, int64_t gs, int64_t n0,
             int64_t len, int64_t g0, int64_t ng, int64_t panel_rows, bool fused, float* panel, float* sc, float* zr,
             float* acc, float* zsum) {
  const int64_t gn = n_groups(n, gs), r = grp.r;
  const int bits = grp.bits;
  const int64_t nbytes = (r * n * bits + 7) / 8;
  const uint8_t* u_q = grp.u_q;
  const uint16_t *u_scale = grp.u_scale, *u_zero = grp.u_zero;
  // one x row: codes straight into the accumulators, kAxpyRows U^T rows per pass over them
  for (int64_t j0 = 0; fused && j0 < r; j0 += kAxpyRows) {
    const int rows = static_cast<int>(std::min<int64_t>(kAxpyRows, r - j0));
    for (int q = 0; q < rows; ++q) {  // coefficient row q = t[j] * scale of U^T row j = j0 + q
      const int64_t j = j0 + q;
      float* coef = sc + q * ng;
      isa.halves(u_scale + j * gn + g0, ng, coef);
      isa.halves(u_zero + j * gn + g0, ng, zr);
      for (int64_t g = 0; g < ng; ++g) {
        zsum[g] += t[j] * zr[g];
        coef[g] *= t[j];
      }
    }
    // the next pass's rows of this block (short runs of len * bits / 8 bytes at a stride of n * bits / 8:
    // too short for the hardware prefetcher to pick up from memory)
    for (int64_t j = j0 + kAxpyRows; j < std::min(r, j0 + 2 * kAxpyRows); ++j)
      for (int64_t b0 = (j * n + n0) * bits / 8, b1 = std::min(nbytes, b0 + (len * bits + 7) / 8); b0 < b1; b0 += 64)
        __builtin_prefetch(u_q + b0);
    isa.axpy_codes(u_q, nbytes, bits, j0 * n + n0, n, rows, len, n0, gs, sc, ng, acc);
  }
  for (int64_t j0 = 0; !fused && j0 < r; j0 += panel_rows) {
    const int64_t rows = std::min(panel_rows, r - j0);
    for (int64_t jj = 0; jj < rows; ++jj) {  // panel row jj = scale * code of U^T row j0 + jj
      const int64_t j = j0 + jj;
      float* row = panel + jj * len;
      isa.decode(u_q, nbytes, bits, j * n + n0, len, row);
      isa.halves(u_scale + j * gn + g0, ng, sc);
      isa.halves(u_zero + j * gn + g0, ng, zr);
      isa.scale_groups(row, len, n0, gs, sc);
      for (int64_t i = 0; i < m; ++i)
        for (int64_t g = 0; g < ng; ++g) zsum[i * ng + g] += t[j * m + i] * zr[g];
    }
    isa.panel_gemm(panel, rows, len, t + j0 * m, m, acc);
  }
}

// Stage 3 of every group: y (m, n) = sum over the groups of t_g^T U_g^T, U^T rows decoded block by
// block; t holds the groups' t (r_g, m) one after the other. Each block's accumulators take every
// group's rows before y is written.
void stage_u(const Isa& isa, const float* t, int64_t m, int64_t n, int64_t gs, const KbitGroup* groups,
             int64_t count, const std::vector<char>& skip, float* y) {
  int64_t r_total = 0;
  for (int64_t q = 0; q < count; ++q) r_total += skip[q] ? 0 : groups[q].r;
  const bool parallel = m * r_total * n >= kParallelMinWork;
  const int64_t block = block_columns(n, m, parallel ? max_threads() : 1);
  const int64_t panel_rows = std::max<int64_t>(1, std::min(kMaxPanelRows, kPanelFloats / block));
  const int64_t blocks = (n + block - 1) / block;
  // block is a multiple of 16, so n % 16 == 0 makes every block start and length one too
  const bool fused = m == 1 && isa.axpy_codes != nullptr && n % 16 == 0 && gs % 16 == 0;
  region(parallel ? kParallelMinWork : 0, [&] {
    // the panel of decoded U^T rows: only without the one-row axpy (which adds codes straight into acc)
    thread_local std::vector<float> panel_buf, acc_buf, zsum_buf, sc_buf, zr_buf;
    Kept<float> panel(panel_buf, static_cast<size_t>(fused ? 0 : panel_rows * block)), acc_k(acc_buf, 0);
    Kept<float> zsum_k(zsum_buf, 0), sc_k(sc_buf, 0), zr_k(zr_buf, 0);
    std::vector<float>&acc = acc_k.vec(), &zsum = zsum_k.vec(), &sc = sc_k.vec(), &zr = zr_k.vec();
#pragma omp for schedule(dynamic, 1)
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t n0 = b * block, len = std::min(block, n - n0);
      const int64_t g0 = n0 / gs, ng = (n0 + len - 1) / gs - g0 + 1;  // groups the block touches
      acc.assign(static_cast<size_t>(m * len), 0.f);
      zsum.assign(static_cast<size_t>(m * ng), 0.f);
      sc.resize(static_cast<size_t>(std::max<int64_t>(kAxpyRows, 1) * ng));
      zr.resize(static_cast<size_t>(ng));
      const float* tg = t;
      for (int64_t q = 0; q < count; ++q) {
        if (groups[q].r > 0 && !skip[q])
          block_u(isa, tg, m, n, groups[q], gs, n0, len, g0, ng, panel_rows, fused, panel.data(), sc.data(),
                  zr.data(), acc.data(), zsum.data());
        tg += groups[q].r * m;
      }
      for (int64_t i = 0; i < m; ++i)
        for (int64_t g = 0; g < ng; ++g) {  // group by group: no division per element
          const int64_t c0 = std::max<int64_t>(0, (g0 + g) * gs - n0), c1 = std::min(len, (g0 + g + 1) * gs - n0);
          const float z = zsum[i * ng + g];
          for (int64_t c = c0; c < c1; ++c) y[i * n + n0 + c] = acc[i * len + c] + z;
        }
    }
  });
}

}  // namespace
}  // namespace lowrank

void kbit_lowrank_matmul_groups_f32(const float* x, int64_t m, int64_t k, int64_t n, int64_t group_size,
                                    const KbitGroup* groups, int64_t count, float* y) {
  if (m == 0 || n == 0) return;
  int64_t r_total = 0;
  for (int64_t q = 0; q < count; ++q) r_total += groups[q].r;
  if (r_total == 0 || k == 0) {  // no factor rows, or empty ones: the product is exactly zero
    std::fill(y, y + m * n, 0.f);
    return;
  }
  const lowrank::Isa& isa = lowrank::pick_isa();
  thread_local std::vector<float> xsum_buf, t_buf;
  Kept<float> xsum(xsum_buf, static_cast<size_t>(m * lowrank::n_groups(k, group_size)));
  Kept<float> t(t_buf, static_cast<size_t>(r_total * m));
  lowrank::group_sums(x, m, k, group_size, xsum.vec());
  // the int8 tables: the AVX2, NEON and portable paths (the AVX-512 path stays exact)
  const bool int8 = m == 1 && lowrank::table_mode() == lowrank::TableMode::kInt8;
  lowrank::TlState tl{int8 ? lowrank::tl_loops(active_isa()) : lowrank::TlLoops{nullptr, nullptr, nullptr}, k,
                      group_size};
  float* tg = t.data();
  for (int64_t q = 0; q < count; ++q) {
    const KbitGroup& g = groups[q];
    if (g.r > 0) lowrank::stage_v(isa, x, m, k, g, group_size, xsum.vec(), tl.loops.dots ? &tl : nullptr, tg);
    tg += g.r * m;
  }
  // stage 3 of the groups with a TL4 U^T by int8 tables, added after the others' blocks wrote y
  std::vector<char> skip(static_cast<size_t>(count), 0);
  for (int64_t q = 0; q < count; ++q) {
    const KbitGroup& g = groups[q];
    skip[q] = tl.loops.axpy != nullptr && g.r > 0 && g.u_tl != nullptr && g.bits <= 2 && group_size % 32 == 0;
  }
  lowrank::stage_u(isa, t.data(), m, n, group_size, groups, count, skip, y);
  tg = t.data();
  for (int64_t q = 0; q < count; ++q) {
    const KbitGroup& g = groups[q];
    if (skip[q]) tl.loops.axpy(g.u_tl, g.u_tl_scale, g.u_tl_zero, g.bits, g.r, n, group_size, tg, y);
    tg += g.r;
  }
}

void kbit_lowrank_matmul_f32(const float* x, int64_t m, int64_t k, int64_t n, int64_t r, int bits,
                             int64_t group_size, const uint8_t* v_q, const uint16_t* v_scale,
                             const uint16_t* v_zero, const uint8_t* u_q, const uint16_t* u_scale,
                             const uint16_t* u_zero, const float* s, float* y) {
  const KbitGroup g{bits, r, v_q, v_scale, v_zero, u_q, u_scale, u_zero, s};
  kbit_lowrank_matmul_groups_f32(x, m, k, n, group_size, &g, 1, y);
}

}  // namespace cpu
}  // namespace deltacomp
