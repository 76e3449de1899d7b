// Standalone check of the raw CPU kernels (csrc/cpu/*.cpp, no torch) against scalar double references,
// on random inputs and odd shapes, for each code path named on the command line (DELTACOMP_ISA values;
// default: the best path of this CPU, then portable). Built for aarch64 and run under qemu-user by
// tests/test_arm.py, so the NEON path is checked on an x86 machine; it builds natively as well:
//
//   aarch64-linux-gnu-g++ -std=c++17 -O2 -fopenmp -static -Icsrc/cpu tests/arm/kernel_check.cpp
//       csrc/cpu/{isa,sign_kernels,simd8_kernels,fused_kernels,ternary_kernels,lowrank_kernels,lowrank_generic,
//         lowrank_simd,lowrank_avx2,lowrank_tl_avx2}.cpp
//       -o /tmp/kernel_check && qemu-aarch64 /tmp/kernel_check neon portable
// (one command line; tests/test_arm.py runs exactly this)
//
// Prints one line per path and "FAIL ..." lines for each mismatch; exit status 1 on any mismatch.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "common.h"
#include "lowrank_isa.h"
#include "lowrank_kernels.h"
#include "serve_kernels.h"
#include "sign_kernels.h"
#include "simd8.h"
#include "tl4_pack.h"

using namespace deltacomp::cpu;

namespace {

std::mt19937 rng(1234);
int failures = 0;

std::vector<float> randn(size_t n) {
  std::normal_distribution<float> d;
  std::vector<float> v(n);
  for (auto& e : v) e = d(rng);
  return v;
}
std::vector<uint8_t> rand_bytes(size_t n) {
  std::vector<uint8_t> v(n);
  for (auto& e : v) e = static_cast<uint8_t>(rng());
  return v;
}
double sign_at(const uint8_t* row, int64_t t) { return ((row[t >> 3] >> (t & 7)) & 1u) ? 1.0 : -1.0; }
double bf16(uint16_t h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
double half(uint16_t h) {  // normal fp16 values only (the generator below makes no others)
  const int e = (h >> 10) & 31;
  const double m = 1.0 + (h & 1023) / 1024.0;
  return ((h & 0x8000) ? -1.0 : 1.0) * std::ldexp(m, e - 15);
}
uint16_t rand_half(int emin, int emax) {
  return static_cast<uint16_t>(((rng() & 1) << 15) | ((emin + rng() % (emax - emin + 1)) << 10) | (rng() & 1023));
}
uint32_t code_at(const uint8_t* s, int bits, int64_t idx) {
  uint32_t v = 0;
  for (int b = 0; b < bits; ++b) v |= ((s[(idx * bits + b) >> 3] >> ((idx * bits + b) & 7)) & 1u) << b;
  return v;
}

// y vs want within fp32 accumulation error of sums of `mag` (the |terms|), k terms per output.
void expect(const char* what, const std::string& where, const std::vector<float>& y, const std::vector<double>& want,
            const std::vector<double>& mag, int64_t k) {
  for (size_t i = 0; i < y.size(); ++i) {
    const double tol = mag[i] * (8 * std::ldexp(1.0, -23) * std::sqrt(static_cast<double>(k) + 1)) + 1e-30;
    if (!(std::fabs(y[i] - want[i]) <= tol)) {
      if (++failures <= 20)
        std::printf("FAIL %s %s [%zu]: got %.9g want %.9g (tol %.3g)\n", what, where.c_str(), i, y[i], want[i], tol);
      return;
    }
  }
}

// the one-row matvec of a layer plan's mode "own" (simd8::dense_m1): fp32 and bf16 weights, rows of any
// count (tiles of 4 or 8 and the rest), short rows (the next rows prefetched) and long ones
void check_dense(int64_t n, int64_t k) {
  auto x = randn(k);
  auto w = randn(n * k);
  std::vector<uint16_t> wb(n * k);
  for (int64_t i = 0; i < n * k; ++i) {
    uint32_t u;
    std::memcpy(&u, &w[i], 4);
    wb[i] = static_cast<uint16_t>(u >> 16);  // truncated to bf16: the reference widens the same bits
  }
  std::vector<float> yf(n), yb(n);
  simd8::dense_m1(active_isa(), x.data(), k, w.data(), n, yf.data());
  simd8::dense_m1(active_isa(), x.data(), k, wb.data(), n, yb.data());
  std::vector<double> wf(n), mf(n), wbv(n), mb(n);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t t = 0; t < k; ++t) {
      wf[i] += static_cast<double>(x[t]) * w[i * k + t];
      mf[i] += std::fabs(static_cast<double>(x[t]) * w[i * k + t]);
      wbv[i] += x[t] * bf16(wb[i * k + t]);
      mb[i] += std::fabs(x[t] * bf16(wb[i * k + t]));
    }
  const std::string where = "n=" + std::to_string(n) + " k=" + std::to_string(k);
  expect("dense_m1(f32)", where, yf, wf, mf, k);
  expect("dense_m1(bf16)", where, yb, wbv, mb, k);
}

void check_sign(int64_t m, int64_t n, int64_t k, bool per_row, bool zero_scale) {
  const int64_t nb = (k + 7) / 8;
  auto x = randn(m * k);
  auto p = rand_bytes(n * nb);
  auto w = randn(n * k);
  std::vector<uint16_t> wb(n * k);
  for (int64_t i = 0; i < n * k; ++i) wb[i] = static_cast<uint16_t>(rng());
  for (auto& v : wb) v = static_cast<uint16_t>((v & 0x807f) | 0x3f00);  // |bf16| in [0.5, 1)
  std::vector<float> sc(per_row ? n : 1);
  for (auto& s : sc) s = zero_scale ? 0.f : 0.1f + std::fabs(randn(1)[0]);
  std::vector<float> y(m * n), yf(m * n), yb(m * n);
  sign_matmul_f32(x.data(), m, k, p.data(), n, sc.data(), per_row, y.data());
  sign_matmul_fused<float>(x.data(), m, k, w.data(), p.data(), n, sc.data(), per_row, yf.data());
  sign_matmul_fused<uint16_t>(x.data(), m, k, wb.data(), p.data(), n, sc.data(), per_row, yb.data());
  std::vector<double> ws(m * n), ms(m * n), wf(m * n), mf(m * n), wbv(m * n), mb(m * n);
  for (int64_t i = 0; i < m; ++i)
    for (int64_t r = 0; r < n; ++r) {
      const double s = sc[per_row ? r : 0];
      double a = 0, am = 0, f = 0, fm = 0, b = 0, bm = 0;
      for (int64_t t = 0; t < k; ++t) {
        const double xv = x[i * k + t], sg = sign_at(p.data() + r * nb, t);
        a += xv * sg * s;
        am += std::fabs(xv * s);
        f += xv * (w[r * k + t] + s * sg);
        fm += std::fabs(xv) * (std::fabs(w[r * k + t]) + s);
        b += xv * (bf16(wb[r * k + t]) + s * sg);
        bm += std::fabs(xv) * (std::fabs(bf16(wb[r * k + t])) + s);
      }
      ws[i * n + r] = a, ms[i * n + r] = am, wf[i * n + r] = f, mf[i * n + r] = fm, wbv[i * n + r] = b,
                 mb[i * n + r] = bm;
    }
  const std::string where = "m=" + std::to_string(m) + " n=" + std::to_string(n) + " k=" + std::to_string(k) +
                            (per_row ? " per-row" : "") + (zero_scale ? " zero-scale" : "");
  expect("sign_matmul", where, y, ws, ms, k);
  expect("sign_matmul_fused(f32)", where, yf, wf, mf, k);
  expect("sign_matmul_fused(bf16)", where, yb, wbv, mb, k);
}

void check_multi(int64_t m, int64_t n, int64_t k, int64_t tenants) {
  const int64_t nb = (k + 7) / 8;
  auto x = randn(m * k);
  auto p = rand_bytes(tenants * n * nb);
  std::vector<float> sc(tenants);
  for (auto& s : sc) s = 0.5f + std::fabs(randn(1)[0]);
  std::vector<int64_t> idx(m);
  for (auto& v : idx) v = static_cast<int64_t>(rng() % (tenants + 1)) - 1;  // -1 = no delta
  std::vector<float> y(m * n);
  sign_matmul_multi_f32(x.data(), m, k, p.data(), tenants, n, sc.data(), false, idx.data(), y.data());
  std::vector<double> want(m * n, 0.0), mag(m * n, 0.0);
  for (int64_t i = 0; i < m; ++i)
    for (int64_t r = 0; idx[i] >= 0 && r < n; ++r)
      for (int64_t t = 0; t < k; ++t) {
        want[i * n + r] += x[i * k + t] * sc[idx[i]] * sign_at(p.data() + (idx[i] * n + r) * nb, t);
        mag[i * n + r] += std::fabs(x[i * k + t] * sc[idx[i]]);
      }
  expect("sign_matmul_multi", "m=" + std::to_string(m) + " k=" + std::to_string(k), y, want, mag, k);
}

void check_ternary(int64_t m, int64_t n, int64_t k) {
  std::vector<int64_t> row_ptr(n + 1, 0), neg(n);
  std::vector<int32_t> cols;
  std::vector<std::vector<int>> val(n, std::vector<int>(k, 0));
  for (int64_t r = 0; r < n; ++r) {
    for (int sgn : {1, -1}) {
      if (sgn == -1) neg[r] = static_cast<int64_t>(cols.size());
      for (int64_t c = 0; c < k; ++c)
        if (val[r][c] == 0 && rng() % 5 == 0) {
          val[r][c] = sgn;
          cols.push_back(static_cast<int32_t>(c));
        }
    }
    row_ptr[r + 1] = static_cast<int64_t>(cols.size());
  }
  auto x = randn(m * k);
  std::vector<float> xt(k * m), sc{0.7f}, y(m * n);
  for (int64_t i = 0; i < m; ++i)
    for (int64_t c = 0; c < k; ++c) xt[c * m + i] = x[i * k + c];
  ternary_matmul_f32(xt.data(), m, k, row_ptr.data(), neg.data(), cols.data(), n, sc.data(), false, y.data());
  std::vector<double> want(m * n, 0.0), mag(m * n, 0.0);
  for (int64_t i = 0; i < m; ++i)
    for (int64_t r = 0; r < n; ++r)
      for (int64_t c = 0; c < k; ++c) {
        want[i * n + r] += 0.7 * val[r][c] * x[i * k + c];
        mag[i * n + r] += std::fabs(0.7 * val[r][c] * x[i * k + c]);
      }
  expect("ternary_matmul", "m=" + std::to_string(m) + " k=" + std::to_string(k), y, want, mag, k);
}

// One random svd-mixed group of rank r (V (r, k), U^T (r, n) as KBITS codes, fp16 scales and zeros per
// group of gs) and its float64 product with x (m, k): want, and mag (the sums of |terms|, for expect).
struct RandGroup {
  int64_t n, k, r, gs, gk, gn;
  int bits;
  std::vector<uint8_t> vq, uq;
  std::vector<uint16_t> vs, vz, us, uz;
  std::vector<float> s;
  RandGroup(int64_t n_, int64_t k_, int64_t r_, int bits_, int64_t gs_)
      : n(n_), k(k_), r(r_), gs(gs_), gk((k_ + gs_ - 1) / gs_), gn((n_ + gs_ - 1) / gs_), bits(bits_),
        vq(rand_bytes((r_ * k_ * bits_ + 7) / 8)), uq(rand_bytes((r_ * n_ * bits_ + 7) / 8)), vs(r_ * gk),
        vz(r_ * gk), us(r_ * gn), uz(r_ * gn), s(randn(r_)) {
    for (auto* a : {&vs, &us})
      for (auto& h : *a) h = rand_half(10, 14);
    for (auto* a : {&vz, &uz})
      for (auto& h : *a) h = rand_half(8, 13);
  }
  KbitGroup group() const {
    return {bits, r, vq.data(), vs.data(), vz.data(), uq.data(), us.data(), uz.data(), s.data()};
  }
  void reference(const std::vector<float>& x, int64_t m, std::vector<double>& want, std::vector<double>& mag) const {
    want.assign(m * n, 0.0), mag.assign(m * n, 0.0);
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < r; ++j) {
        double t = 0, tm = 0;
        for (int64_t c = 0; c < k; ++c) {
          const double v = half(vz[j * gk + c / gs]) + code_at(vq.data(), bits, j * k + c) * half(vs[j * gk + c / gs]);
          t += x[i * k + c] * v;
          tm += std::fabs(x[i * k + c] * v);
        }
        for (int64_t c = 0; c < n; ++c) {
          const double u = half(uz[j * gn + c / gs]) + code_at(uq.data(), bits, j * n + c) * half(us[j * gn + c / gs]);
          want[i * n + c] += s[j] * t * u;
          mag[i * n + c] += std::fabs(s[j] * u) * (tm + std::fabs(t));
        }
      }
  }
};

void check_lowrank(int64_t m, int64_t n, int64_t k, int64_t r, int bits, int64_t gs) {
  const RandGroup g(n, k, r, bits, gs);
  auto x = randn(m * k);
  std::vector<float> y(m * n);
  kbit_lowrank_matmul_f32(x.data(), m, k, n, r, bits, gs, g.vq.data(), g.vs.data(), g.vz.data(), g.uq.data(),
                          g.us.data(), g.uz.data(), g.s.data(), y.data());
  std::vector<double> want, mag;
  g.reference(x, m, want, mag);
  expect("kbit_lowrank_matmul", "m=" + std::to_string(m) + " n=" + std::to_string(n) + " k=" + std::to_string(k) +
         " bits=" + std::to_string(bits), y, want, mag, k + n);
}

// y vs want (a kernel through int8 tables: inexact) within 5% of want's RMS, RMS over the outputs; and, where
// the path has the tables, not bit-equal to the exact kernel's exact (the tables were taken).
void expect_tables(const char* what, const std::string& where, const std::vector<float>& y,
                   const std::vector<double>& want, const std::vector<float>& exact) {
  double err = 0, ref = 0;
  bool same = true;
  for (size_t i = 0; i < y.size(); ++i) {
    err += (y[i] - want[i]) * (y[i] - want[i]);
    ref += want[i] * want[i];
    same = same && y[i] == exact[i];
  }
  const bool tables = active_isa() != Isa::kAvx512;  // the AVX-512 path stays exact
  if (!(err <= 0.0025 * ref) || same == tables) {
    if (++failures <= 20)
      std::printf("FAIL %s %s: rms error %.3g of rms %.3g, equal to the exact kernel: %d\n", what, where.c_str(),
                  std::sqrt(err / y.size()), std::sqrt(ref / y.size()), same);
  }
}

// svd-mixed at one x row with V and U^T in the TL4 layout (tl4_pack), against the float64 reference
void check_lowrank_tables(int64_t n, int64_t k, int64_t r, int bits, int64_t gs) {
  const RandGroup g(n, k, r, bits, gs);
  const int64_t gk = g.gk, gn = g.gn, tr = (r + 31) / 32, tn = (n + 31) / 32;
  auto x = randn(k);
  const int64_t pk = lowrank::tl_groups(k, gs), pr = lowrank::tl_groups(r, r);  // of a V row, of a U^T column
  std::vector<uint8_t> v_tl(tr * pk * 16 * bits), u_tl(tn * pr * 16 * bits);
  tl4_pack(g.vq.data(), static_cast<int64_t>(g.vq.size()), bits, r, k, gs, false, v_tl.data());
  tl4_pack(g.uq.data(), static_cast<int64_t>(g.uq.size()), bits, n, r, r, true, u_tl.data());
  std::vector<uint16_t> v_tl_scale(tr * gk * 32, 0), u_tl_scale(gn * r), u_tl_zero(gn * r);
  for (int64_t j = 0; j < r; ++j) {
    for (int64_t q = 0; q < gk; ++q) v_tl_scale[((j / 32) * gk + q) * 32 + j % 32] = g.vs[j * gk + q];
    for (int64_t q = 0; q < gn; ++q) u_tl_scale[q * r + j] = g.us[j * gn + q], u_tl_zero[q * r + j] = g.uz[j * gn + q];
  }
  KbitGroup grp = g.group();
  std::vector<float> exact(n), y(n);
  kbit_lowrank_matmul_groups_f32(x.data(), 1, k, n, gs, &grp, 1, exact.data());
  grp.v_tl = v_tl.data(), grp.v_tl_scale = v_tl_scale.data();
  grp.u_tl = u_tl.data(), grp.u_tl_scale = u_tl_scale.data(), grp.u_tl_zero = u_tl_zero.data();
  kbit_lowrank_matmul_groups_f32(x.data(), 1, k, n, gs, &grp, 1, y.data());
  std::vector<double> want, mag;
  g.reference(x, 1, want, mag);
  expect_tables("kbit_lowrank_matmul (int8 tables)", "n=" + std::to_string(n) + " k=" + std::to_string(k) +
                " r=" + std::to_string(r) + " bits=" + std::to_string(bits), y, want, exact);
}

// the 1-bit sign delta at one x row through the int8 tables, with an fp32 base
void check_sign_tables(int64_t n, int64_t k, bool per_row) {
  auto x = randn(k);
  auto p = rand_bytes(n * k / 8);  // k % 8 == 0: the SIGNS rows are one stream of 1-bit codes
  auto w = randn(n * k);
  std::vector<float> sc(per_row ? n : 1);
  for (auto& v : sc) v = 0.1f + std::fabs(randn(1)[0]);
  std::vector<uint8_t> s_tl(sign_tl_bytes(n, k));
  tl4_pack(p.data(), static_cast<int64_t>(p.size()), 1, n, k, k, false, s_tl.data());
  std::vector<float> y(n), exact(n);
  const bool ran = sign_matmul_tl<float>(x.data(), k, w.data(), s_tl.data(), n, sc.data(), per_row, y.data());
  sign_matmul_fused<float>(x.data(), 1, k, w.data(), p.data(), n, sc.data(), per_row, exact.data());
  const std::string where = "n=" + std::to_string(n) + " k=" + std::to_string(k);
  if (ran != (active_isa() != Isa::kAvx512)) {
    if (++failures <= 20) std::printf("FAIL sign_matmul_tl %s: ran %d on path %s\n", where.c_str(), ran,
                                      isa_name(active_isa()));
    return;
  }
  if (!ran) return;
  std::vector<double> want(n);  // the base's part is exact: the bound is on the delta's
  for (int64_t i = 0; i < n; ++i) {
    double d = 0, b = 0;
    for (int64_t t = 0; t < k; ++t) {
      d += x[t] * sign_at(p.data() + i * (k / 8), t);
      b += x[t] * w[i * k + t];
    }
    want[i] = sc[per_row ? i : 0] * d;
    y[i] -= static_cast<float>(b), exact[i] -= static_cast<float>(b);
  }
  expect_tables("sign_matmul_tl", where, y, want, exact);
}

// every fp16 bit pattern: the branch-free widening (halves_to_floats) equals the scalar one, bit for bit
void check_halves() {
  std::vector<uint16_t> h(65536);
  std::vector<float> out(65536);
  for (int i = 0; i < 65536; ++i) h[i] = static_cast<uint16_t>(i);
  lowrank::halves_to_floats(h.data(), 65536, out.data());
  for (int i = 0; i < 65536; ++i) {
    const float want = lowrank::half_to_float(h[i]);
    if (std::memcmp(&want, &out[i], 4) != 0 && !(std::isnan(want) && std::isnan(out[i]))) {
      if (++failures <= 20) std::printf("FAIL halves_to_floats %04x: got %g want %g\n", i, out[i], want);
      return;
    }
  }
}

void check_pack(int64_t n, int64_t k) {
  auto x = randn(n * k);
  std::vector<uint8_t> p((n * ((k + 7) / 8)));
  std::vector<float> back(n * k);
  pack_signs_f32(x.data(), n, k, p.data());
  unpack_signs_f32(p.data(), n, k, back.data());
  for (int64_t i = 0; i < n * k; ++i)
    if (back[i] != (x[i] >= 0 ? 1.f : -1.f)) {
      ++failures;
      std::printf("FAIL pack/unpack n=%lld k=%lld at %lld\n", (long long)n, (long long)k, (long long)i);
      return;
    }
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> paths;
  for (int i = 1; i < argc; ++i) paths.emplace_back(argv[i]);
  if (paths.empty()) paths = {isa_name(best_isa()), "portable"};
  for (const auto& path : paths) {
    setenv("DELTACOMP_ISA", path.c_str(), 1);
    const int before = failures;
    for (int64_t k : {1, 7, 8, 9, 17, 33, 100, 577})
      for (int64_t m : {1, 2, 3, 5, 17})
        for (int64_t n : {1, 5, 8, 13})
          for (bool per_row : {false, true}) check_sign(m, n, k, per_row, false);
    check_sign(4, 9, 40, true, true);  // all-zero delta (scale 0): y = the base alone
    for (int64_t n : {1, 3, 4, 5, 8, 13, 37})
      for (int64_t k : {1, 7, 16, 17, 100, 576, 1024, 1025, 2100}) check_dense(n, k);
    for (int64_t m : {1, 4, 9}) check_multi(m, 11, 45, 3);
    for (int64_t m : {1, 3}) check_ternary(m, 7, 37);
    for (int bits = 1; bits <= 8; ++bits)
      for (int64_t m : {1, 3}) {
        check_lowrank(m, 64, 48, 3, bits, 16);   // n, gs multiples of 16: the one-row axpy path
        check_lowrank(m, 37, 29, 2, bits, 5);    // odd sizes and groups
        check_lowrank(m, 96, 200, 5, bits, 8);   // k, gs multiples of 8: the one-row dot, groups of 8 codes
        check_lowrank(m, 160, 264, 4, bits, 32); // several groups each way, a group of 8 codes past 16s
      }
    for (int bits : {1, 2}) {
      check_lowrank_tables(96, 200, 40, bits, 8);    // V tables only (U^T needs groups of 32)
      check_lowrank_tables(160, 264, 70, bits, 32);  // both stages, partial tiles and chunks
    }
    for (bool per_row : {false, true}) {
      check_sign_tables(70, 264, per_row);
      check_sign_tables(32, 1024, per_row);
    }
    check_halves();
    for (int64_t k : {1, 9, 64}) check_pack(3, k);
    std::printf("%s: path %s, %s\n", path.c_str(), isa_name(active_isa()),
                failures == before ? "all kernels match" : "MISMATCHES");
  }
  return failures ? 1 : 0;
}
