// Operator schemas of torch.ops.deltacomp.*, declared once here; the kernels register per backend
// (csrc/cpu/*.cpp: CPU, csrc/cuda/*.cu: CUDA) and the fake (meta) kernels live in deltacomp/ops.py.
//
// Layouts are documented in deltacomp/ops.py. SIGNS: uint8 (N, ceil(K/8)); bit i (LSB = 0) of byte j
// is element 8*j + i of the row; 1 means value >= 0 (+1), 0 means value < 0 (-1); pad bits are 0.
#include <torch/library.h>

#include <string>

#include "cpu/common.h"

TORCH_LIBRARY(deltacomp, m) {
  // x float32 (N, K) -> SIGNS uint8 (N, ceil(K/8))
  m.def("pack_signs(Tensor x) -> Tensor");
  // SIGNS uint8 (N, ceil(k/8)) -> float32 (N, k) of +1/-1
  m.def("unpack_signs(Tensor packed, int k) -> Tensor");
  // y (M, N) = x (M, K) @ (scale * sign)^T; x fp32/bf16/fp16 (accumulated in fp32, y in x.dtype),
  // packed SIGNS (N, ceil(k/8)), scale fp32 () / (1,) per tensor or (N,) per output row
  m.def("sign_matmul(Tensor x, Tensor packed, Tensor scale, int k) -> Tensor");
  // y (M, N) = x (M, K) @ (w_base + scale * sign)^T in one pass over w_base and the signs; w_base
  // fp32/bf16 (N, K) (bf16 widened on the fly; the effective weight is fp32, never rounded), packed
  // SIGNS (N, ceil(k/8)), scale fp32 () / (1,) / (N,); x and y as in sign_matmul
  m.def("sign_matmul_fused(Tensor x, Tensor w_base, Tensor packed, Tensor scale, int k) -> Tensor");
  // one x row, inexact (int8 lookup tables; AVX2, NEON, portable): y (1, N) = x (1, K) @ (w_base + scale *
  // sign)^T, or the delta alone when w_base is empty; s_tl the signs as 1-bit codes in the TL4 layout
  // (quant/tl4.py, pack_tl4_signs; K % 4 == 0); w_base fp32/bf16 (N, K); scale and x as in sign_matmul
  m.def("sign_matmul_tl(Tensor x, Tensor w_base, Tensor s_tl, Tensor scale, int n, int k) -> Tensor");
  // the delta of sign_matmul_tl for several x rows, each its own: y[i] (N,) = x[i] @ (scale[i] * sign_i)^T
  // from the TL4 signs s_tl[i], zeros where s_tl[i] is empty (one entry per row in each list; a mixed-tenant
  // batch passes each row's tenant)
  m.def("sign_matmul_tl_rows(Tensor x, Tensor[] s_tl, Tensor[] scale, int n, int k) -> Tensor");
  // multi-tenant (decode, BGMV-style): y[i] = x[i] @ (scales[t] * sign_t)^T with t = index[i], zeros
  // where index[i] == -1; packed SIGNS stack (T, N, ceil(k/8)), scales fp32 (T,) or (T, N),
  // index int64 (M,) in [-1, T)
  m.def("sign_matmul_multi(Tensor x, Tensor packed, Tensor scales, Tensor index, int k) -> Tensor");
  // ternary on the TERNARY_CSR runtime form: y = x @ (scale * T)^T, T (N, k) in {-1, 0, +1};
  // row_ptr int64 (N+1), neg_start int64 (N), cols int32 (nnz), scale fp32 () / (1,) / (N,)
  m.def("ternary_matmul(Tensor x, Tensor row_ptr, Tensor neg_start, Tensor cols, Tensor scale, int k) -> Tensor");
  // svd-mixed, one bit-width group: y (M, n) = x (M, k) @ (U diag(s) V)^T with U, V never built.
  // v_q uint8 KBITS stream of r*k `bits`-bit codes (V rows), v_scale / v_zero fp16 (r, ceil(k/group_size));
  // u_q KBITS stream of r*n codes (rows of U^T), u_scale / u_zero fp16 (r, ceil(n/group_size)); s fp32 (r,).
  // RTN: value = zero + code * scale per group of group_size along each row. x fp32/bf16/fp16, fp32
  // accumulation, y in x.dtype.
  m.def("kbit_lowrank_matmul(Tensor x, Tensor v_q, Tensor v_scale, Tensor v_zero, Tensor u_q, Tensor u_scale, "
        "Tensor u_zero, Tensor s, int bits, int n, int k, int group_size) -> Tensor");
  // svd-mixed, every bit-width group of a layer in one call: y = sum over g of x @ (U_g diag(s_g) V_g)^T.
  // Entry g of each list is group g's tensor as above (rank r_g = v_scale[g].size(0), 0 allowed), bits[g]
  // its width, s fp32 (sum r_g,) the groups' singular values in order. x may be strided.
  m.def("kbit_lowrank_matmul_groups(Tensor x, Tensor[] v_q, Tensor[] v_scale, Tensor[] v_zero, Tensor[] u_q, "
        "Tensor[] u_scale, Tensor[] u_zero, Tensor s, int[] bits, int n, int k, int group_size) -> Tensor");
  // The same, with the 1- and 2-bit groups' V and U^T also repacked at load time in the TL4 layout
  // (deltacomp/quant/tl4.py; an empty tensor for a group without one): at one x row on AVX2, stages 1 and
  // 3 of those groups then go through int8 tables (inexact; DELTACOMP_LOWRANK_KERNEL=exact keeps the exact
  // path).
  m.def("kbit_lowrank_matmul_groups_tl(Tensor x, Tensor[] v_q, Tensor[] v_scale, Tensor[] v_zero, Tensor[] u_q, "
        "Tensor[] u_scale, Tensor[] u_zero, Tensor s, int[] bits, int n, int k, int group_size, Tensor[] v_tl, "
        "Tensor[] v_tl_scale, Tensor[] u_tl, Tensor[] u_tl_scale, Tensor[] u_tl_zero) -> Tensor");
  // The TL4 bytes (deltacomp/quant/tl4.py, whose torch version is the reference) of the (rows, length)
  // matrix of `bits`-bit codes (1, 2) in the KBITS stream q (uint8, ceil(rows * length * bits / 8) bytes),
  // its rows cut into RTN groups of group_size (>= 1) positions: element (j, x) is code j * length + x
  // (V: rows = r, length = k), or with transposed code x * rows + j (U^T stored (r, n): rows = n,
  // length = group_size = r). -> uint8 (ceil(rows / 32) * tl4.row_groups(length, group_size) * 16 * bits,).
  // The scales' TL4 forms are small transposes, left to quant.tl4.
  m.def("tl4_pack(Tensor q, int bits, int rows, int length, int group_size, bool transposed) -> Tensor");
  // The CPU code path the kernels take now ("avx512", "avx2", "neon", "portable"; DELTACOMP_ISA forces
  // one, see csrc/cpu/common.h). No tensor arguments, so one kernel for every backend.
  m.def("cpu_isa() -> str", []() -> std::string { return deltacomp::cpu::isa_name(deltacomp::cpu::active_isa()); });
}

// The extension module's init (PYBIND11_MODULE) is in csrc/plans.cpp; importing it loads this library,
// which runs the registrations above.
