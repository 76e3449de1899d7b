// Launchers of the CUDA kernels (csrc/cuda/*.cu): raw pointers, an element-type tag and the stream;
// each returns the launch's cudaError_t so the torch-facing wrapper (cuda_ops.cpp) can report it with the
// shapes. Layouts are those of deltacomp/ops.py (SIGNS, SIGNS stack, TERNARY_CSR, KBITS).
#pragma once
#include <cuda_runtime.h>
#include <stdint.h>

namespace deltacomp {
namespace cuda {

// Element type of x / y / w_base, chosen by the wrapper (no torch dtype in kernel code).
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// -- SIGNS (sign_kernels.cu) -------------------------------------------------------------------------
cudaError_t pack_signs(const float* x, int64_t n, int64_t k, uint8_t* out, cudaStream_t stream);
cudaError_t unpack_signs(const uint8_t* packed, int64_t n, int64_t k, float* out, cudaStream_t stream);
// out (n, k) in `out_t` = w_base (may be null; type `w_t`) + scale * sign, for the GEMM path of large M.
cudaError_t sign_dequant(const uint8_t* packed, int64_t n, int64_t k, const float* scale, bool per_row,
                         const void* w_base, DType w_t, void* out, DType out_t, cudaStream_t stream);
// y (m, n) = x (m, k) @ (scale * sign)^T. With `index` (m,) non-null: multi-tenant, packed is a stack
// (tenants, n, ceil(k/8)), scale (tenants,) or (tenants, n), row i uses delta index[i] (-1: zeros).
cudaError_t sign_matmul(DType t, const void* x, int64_t m, int64_t k, const uint8_t* packed, int64_t n,
                        const float* scale, bool per_row, const int64_t* index, int64_t tenants, void* y,
                        cudaStream_t stream);
// Largest m the small-M kernels take in one launch tile; sign_matmul tiles any m over it.
constexpr int64_t kSignMaxTile = 8;

// -- fused base + signs (fused_kernels.cu) -----------------------------------------------------------
// y (m, n) = x (m, k) @ (w_base + scale * sign)^T; x type `x_t` is w_t or float32; m <= kFusedMaxRows.
cudaError_t sign_matmul_fused(DType x_t, const void* x, int64_t m, int64_t k, DType w_t, const void* w_base,
                              const uint8_t* packed, int64_t n, const float* scale, bool per_row, void* y,
                              cudaStream_t stream);
constexpr int64_t kFusedMaxRows = 4;

// -- ternary CSR (ternary_kernels.cu) ----------------------------------------------------------------
cudaError_t ternary_matmul(DType t, const void* x, int64_t m, int64_t k, const int64_t* row_ptr,
                           const int64_t* neg_start, const int32_t* cols, int64_t nnz, int64_t n,
                           const float* scale, bool per_row, void* y, cudaStream_t stream);

// -- KBITS low-rank factors (lowrank_kernels.cu) -----------------------------------------------------
// y (m, n) = x (m, k) @ (U diag(s) V)^T. `tmp` fp32 (m, r) and `acc` fp32 (m, n) are workspaces (acc may
// be y itself when t is float32); scales / zeros are fp16 bit patterns.
cudaError_t kbit_lowrank_matmul(DType t, const void* x, int64_t m, int64_t k, int64_t n, int64_t r, int bits,
                                int64_t group_size, const uint8_t* v_q, const uint16_t* v_scale,
                                const uint16_t* v_zero, const uint8_t* u_q, const uint16_t* u_scale,
                                const uint16_t* u_zero, const float* s, float* tmp, float* acc, void* y,
                                cudaStream_t stream);

}  // namespace cuda
}  // namespace deltacomp
