// Raw-pointer CPU kernels for the SIGNS layout (no torch here; csrc/cpu/sign_ops.cpp wraps them).
//
// SIGNS: row r of a (N, K) matrix is nb = ceil(K/8) bytes; bit i (LSB = 0) of byte j is element
// 8*j + i; 1 means value >= 0 (+1), 0 means value < 0 or NaN (-1); pad bits past K are written 0 and
// ignored on read. All arrays are dense row-major.
#pragma once
#include <cstdint>

namespace deltacomp {
namespace cpu {

// x (n, k) float32 -> out (n, ceil(k/8)) uint8
void pack_signs_f32(const float* x, int64_t n, int64_t k, uint8_t* out);

// packed (n, ceil(k/8)) uint8 -> out (n, k) float32 of +1/-1
void unpack_signs_f32(const uint8_t* packed, int64_t n, int64_t k, float* out);

// y (m, n) = x (m, k) @ (scale * sign)^T, fp32 accumulation; scale has n entries when per_row, else 1.
// The dense sign matrix is never built: for each 16 weights one masked add per x row accumulates the
// x values whose sign is +1 ("pos"), and y = scale * (2 * pos - sum(x)).
// Code path (active_isa(), common.h): AVX-512 (16 weights per masked add), AVX2 / NEON (simd8.h: a
// table of +1/-1 per sign byte, one FMA per 8 weights), or a portable loop; DELTACOMP_ISA forces one.
// At m = 1 the AVX2 path uses 3-bit lookup tables (simd8_kernels.cpp), the portable path byte tables
// (sign_kernels.cpp); DELTACOMP_SIGN_KERNEL=simd forces the plain loop, =lut8 the byte tables.
void sign_matmul_f32(const float* x, int64_t m, int64_t k, const uint8_t* packed, int64_t n,
                     const float* scale, bool per_row, float* y);

// Multi-tenant (BGMV-style) sign matmul: row i of y (m, n) is x[i] @ (scale_t * sign_t)^T with
// t = index[i], or zeros where index[i] == -1. packed is a stack (t_count, n, ceil(k/8)) of SIGNS
// matrices; scales has t_count entries (per tensor) or t_count * n (per_row, row-major (t_count, n)).
// index values must be in [-1, t_count) (the caller checks). Rows sharing a tenant are gathered and
// run together, so x rows of one tenant share each load of its sign bytes.
void sign_matmul_multi_f32(const float* x, int64_t m, int64_t k, const uint8_t* packed, int64_t t_count,
                           int64_t n, const float* scales, bool per_row, const int64_t* index, float* y);


}  // namespace cpu
}  // namespace deltacomp
