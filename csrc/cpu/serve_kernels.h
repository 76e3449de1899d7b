// Raw-pointer CPU kernels for serving a delta next to its base (no torch here; csrc/cpu/serve_ops.cpp
// wraps them). Layouts are documented in deltacomp/ops.py.
#pragma once
#include <cstdint>

namespace deltacomp {
namespace cpu {

// Fused base + sign delta: y (m, n) = x (m, k) @ (w + scale * sign)^T, fp32 accumulation, in one pass
// over w and the signs. w (n, k) is float32 (WT = float) or bfloat16 bit patterns (WT = uint16_t,
// widened on the fly); nothing is rounded to w's dtype: the AVX-512 path forms w + scale * sign in fp32,
// the AVX2 / NEON / portable paths (simd8_body.inc) add x . w and scale * (x . sign), both fp32 sums of
// one tile of rows. packed is SIGNS (n, ceil(k/8)); scale has n entries when per_row, else 1.
template <typename WT>
void sign_matmul_fused(const float* x, int64_t m, int64_t k, const WT* w, const uint8_t* packed,
                       int64_t n, const float* scale, bool per_row, float* y);

// The sign delta at one x row by int8 lookup tables (inexact; AVX2 + F16C): y (n,) = x (k,) @ (w +
// scale * sign)^T, or the delta alone when w is null. s_tl holds the signs as 1-bit codes in the TL4
// layout (deltacomp/quant/tl4.py, one RTN group per row: gs = k, k % 4 == 0) of sign_tl_bytes(n, k)
// bytes; sign . x = 2 (bits . x) - sum(x), the bit dots by the low-rank kernel's stage-1 tables
// (lowrank_tl_avx2.cpp), the base by the fused op's dense pass. False (nothing written) when this CPU
// or build has no such loops.
int64_t sign_tl_bytes(int64_t n, int64_t k);
template <typename WT>
bool sign_matmul_tl(const float* x, int64_t k, const WT* w, const uint8_t* s_tl, int64_t n, const float* scale,
                    bool per_row, float* y);

// Ternary matmul on the TERNARY_CSR runtime form: y (m, n) = x @ (scale * T)^T with T in {-1, 0, +1}.
// Row r of T is +1 at cols[row_ptr[r] .. neg_start[r]) and -1 at cols[neg_start[r] .. row_ptr[r+1]).
// xt is x transposed, (k, m) row-major, so the m values of one column are contiguous (one gather of
// a column serves every x row). Indices must be in bounds (the caller checks).
void ternary_matmul_f32(const float* xt, int64_t m, int64_t k, const int64_t* row_ptr,
                        const int64_t* neg_start, const int32_t* cols, int64_t n, const float* scale,
                        bool per_row, float* y);

}  // namespace cpu
}  // namespace deltacomp
