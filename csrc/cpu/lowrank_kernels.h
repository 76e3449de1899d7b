// Raw-pointer CPU kernel of the svd-mixed low-rank k-bit factor matmul (no torch here;
// csrc/cpu/lowrank_ops.cpp wraps it). Layouts: KBITS (deltacomp/quant/bitpack.py) and RTN groups
// (deltacomp/quant/rtn.py), as documented in deltacomp/ops.py.
#pragma once
#include <cstdint>

namespace deltacomp {
namespace cpu {

// One bit-width group of an svd-mixed delta: y (m, n) = x (m, k) @ (U diag(s) V)^T, fp32 accumulation,
// with U (n, r) and V (r, k) never built:
//   v_q  KBITS stream of r*k `bits`-bit codes, row j of V = codes [j*k, (j+1)*k)
//   v_scale, v_zero  fp16 bit patterns (r, ceil(k / group_size)): V[j][c] = zero[j][g] + code * scale[j][g],
//                    g = c / group_size
//   u_q  KBITS stream of r*n codes, row j of U^T = codes [j*n, (j+1)*n); u_scale, u_zero (r, ceil(n / gs))
//   s    fp32 (r,)
// Stage 1: t (m, r) = x V^T (parallel over the r rows of V); stage 2: t *= s; stage 3: y = t U^T^T
// (parallel over blocks of output columns n). Code path (active_isa(), common.h): AVX-512 (F+BW+VL),
// AVX2 (decode and one-row axpy), or the portable loops; DELTACOMP_ISA forces one.
void kbit_lowrank_matmul_f32(const float* x, int64_t m, int64_t k, int64_t n, int64_t r, int bits,
                             int64_t group_size, const uint8_t* v_q, const uint16_t* v_scale,
                             const uint16_t* v_zero, const uint8_t* u_q, const uint16_t* u_scale,
                             const uint16_t* u_zero, const float* s, float* y);

// One bit-width group of an svd-mixed delta, as kbit_lowrank_matmul_f32 takes it (r = 0: an empty group).
struct KbitGroup {
  int bits;
  int64_t r;
  const uint8_t* v_q;
  const uint16_t* v_scale;
  const uint16_t* v_zero;
  const uint8_t* u_q;
  const uint16_t* u_scale;
  const uint16_t* u_zero;
  const float* s;  // this group's r singular values
  // Optional, 1- and 2-bit groups: V repacked once at load time in the TL4 layout (deltacomp/ops.py,
  // ops.pack_tl4) and its scales (tiles, ceil(k / group_size), 32) fp16; with them, stage 1 at one x row
  // on AVX2 goes through int8 tables of x (inexact, see lowrank_tl_avx2.cpp) unless
  // DELTACOMP_LOWRANK_KERNEL is exact or direct. nullptr: the exact paths.
  const uint8_t* v_tl = nullptr;
  const uint16_t* v_tl_scale = nullptr;
  // The same for stage 3 (group_size % 32 == 0): U^T in the TL4 layout with the output columns as rows
  // and u_scale / u_zero transposed, fp16 (ceil(n / group_size), r).
  const uint8_t* u_tl = nullptr;
  const uint16_t* u_tl_scale = nullptr;
  const uint16_t* u_tl_zero = nullptr;
};

// Every group of an svd-mixed delta in one call: y (m, n) = sum over the groups of x @ (U_g diag(s_g) V_g)^T.
// Stage 1 runs group by group into one t; stage 3 walks every group's U^T rows per output block, adding
// into one set of accumulators, so y is written once (no per-group output and sum).
void kbit_lowrank_matmul_groups_f32(const float* x, int64_t m, int64_t k, int64_t n, int64_t group_size,
                                    const KbitGroup* groups, int64_t count, float* y);

}  // namespace cpu
}  // namespace deltacomp
