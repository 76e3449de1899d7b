// Internal to the SIGNS kernels (sign_kernels.cpp, fused_kernels.cpp, simd8_kernels.cpp): the 8-lane
// paths, AVX2 (x86-64), NEON (aarch64) and portable, one kernel body (simd8_body.inc) compiled once
// per ISA. Raw pointers only, no torch.
#pragma once
#include <cstdint>
#include <vector>

#include "common.h"

namespace deltacomp {
namespace cpu {

// Multi-tenant row grouping: `order` lists the x rows with a delta, grouped by tenant; segment s is
// rows [seg_start[s], seg_start[s+1]) of the gathered x (xs), all using tenant seg_t[s]; y rows are
// scattered back through `order`.
struct Segments {
  std::vector<int64_t> order, seg_t, seg_start;
};

namespace simd8 {

// Every entry point runs the AVX2 body for Isa::kAvx2 (x86-64 GCC builds), the NEON one for Isa::kNeon
// (aarch64), and the portable body (GCC vector extensions) for anything else.

// y (m, n) = x (m, k) @ (scale * sign)^T (see sign_kernels.h). lookup: on AVX2 with one x row (and
// k >= 32), the lookup-table kernel (simd8_kernels.cpp) instead of the plain SIMD loop.
void sign_matmul(Isa isa, const float* x, int64_t m, int64_t k, const uint8_t* packed, int64_t n,
                 const float* scale, bool per_row, float* y, bool lookup);

// Multi-tenant sign matmul over gathered rows xs (see Segments); y rows through sg.order.
// lookup: on AVX2, tenants with one row take the one-row lookup-table kernel.
void sign_matmul_multi(Isa isa, const float* xs, int64_t k, const uint8_t* packed, int64_t n, const float* scales,
                       bool per_row, const Segments& sg, float* y, int64_t work, bool lookup);

// y (m, n) = x (m, k) @ (w + scale * sign)^T, w fp32 or bf16 bit patterns (see serve_kernels.h).
// lookup: on AVX2 with one x row (and k >= 32), the sign pass of each tile by the lookup tables of the
// sign matmul instead of the byte-table loop.
void sign_matmul_fused(Isa isa, const float* x, int64_t m, int64_t k, const float* w, const uint8_t* packed,
                       int64_t n, const float* scale, bool per_row, float* y, bool lookup);
void sign_matmul_fused(Isa isa, const float* x, int64_t m, int64_t k, const uint16_t* w, const uint8_t* packed,
                       int64_t n, const float* scale, bool per_row, float* y, bool lookup);

// y (n,) = w (n, k) @ x (k,): one x row, fp32 or bf16 bit patterns w, fp32 sums (the dense pass of the
// fused op alone).
void dense_m1(Isa isa, const float* x, int64_t k, const float* w, int64_t n, float* y);
void dense_m1(Isa isa, const float* x, int64_t k, const uint16_t* w, int64_t n, float* y);

}  // namespace simd8
}  // namespace cpu
}  // namespace deltacomp
