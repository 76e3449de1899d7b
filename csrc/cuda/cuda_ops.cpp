// Torch-facing CUDA wrappers of torch.ops.deltacomp.*: check inputs (messages carry the values), pick the
// kernel path, launch on the current stream and report a failed launch with the shapes. The kernels
// (csrc/cuda/*.cu) take raw pointers only. Schemas are in csrc/ops.cpp, layouts in deltacomp/ops.py.
//
// Paths: small M runs the packed kernels; for M of kGemmMinRows and more (prefill) the sign ops
// dequantize the weight in row chunks and hand them to cuBLAS (at::mm), which is faster there.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "kernels.h"

namespace deltacomp {
namespace {

using cuda::DType;
constexpr int64_t kGemmMinRows = 16;                 // sign ops: M >= this takes the dequantize + cuBLAS path
constexpr int64_t kDequantChunkBytes = int64_t(1) << 28;  // 256 MiB of dequantized weight at a time

int64_t sign_bytes(int64_t k) { return (k + 7) / 8; }

void check_cuda(const at::Tensor& t, const char* op, const char* name, int64_t dim, const at::Tensor& ref) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be on a CUDA device, got ", t.device());
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but x is on ", ref.device());
  TORCH_CHECK(dim < 0 || t.dim() == dim, op, ": ", name, " must be ", dim, "-D, got shape ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous (shape ", t.sizes(), ", strides ",
              t.strides(), "); call .contiguous()");
}

DType dtype_of(const at::Tensor& t, const char* op, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: TORCH_CHECK(false, op, ": ", name, " must be float32, float16 or bfloat16, got ", t.scalar_type());
  }
  return DType::kFloat32;
}

void check_x(const at::Tensor& x, int64_t k, const char* op) {
  TORCH_CHECK(x.is_cuda(), op, ": x must be on a CUDA device, got ", x.device());
  check_cuda(x, op, "x", 2, x);
  dtype_of(x, op, "x");
  TORCH_CHECK(k >= 0, op, ": k must be >= 0, got ", k);
  TORCH_CHECK(x.size(1) == k, op, ": x has ", x.size(1), " columns (shape ", x.sizes(), ") but k=", k);
}

bool check_scale(const at::Tensor& scale, int64_t n, const char* op, const at::Tensor& x) {
  check_cuda(scale, op, "scale", -1, x);
  TORCH_CHECK(scale.scalar_type() == at::kFloat, op, ": scale must be float32, got ", scale.scalar_type());
  const bool per_tensor = scale.dim() <= 1 && scale.numel() == 1;
  const bool per_row = scale.dim() == 1 && scale.numel() == n;
  TORCH_CHECK(per_tensor || per_row, op, ": scale must have shape () or (1,) (per tensor) or (", n,
              ",) (one per output row), got ", scale.sizes());
  return per_row && !per_tensor;
}

void check_launch(cudaError_t err, const char* op, int64_t m, int64_t n, int64_t k) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel failed for m=", m, ", n=", n, ", k=", k, ": ",
              cudaGetErrorString(err));
}

void check_packed(const at::Tensor& packed, int64_t n, int64_t k, const char* op, const at::Tensor& x) {
  check_cuda(packed, op, "packed", 2, x);
  TORCH_CHECK(packed.scalar_type() == at::kByte, op, ": packed must be uint8, got ", packed.scalar_type());
  TORCH_CHECK((n < 0 || packed.size(0) == n) && packed.size(1) == sign_bytes(k), op, ": packed must have shape (",
              n < 0 ? packed.size(0) : n, ", ", sign_bytes(k), ") for k=", k, ", got ", packed.sizes());
}

// y (m, n) = x @ (w_base + scale * sign)^T by dequantizing row chunks of the weight into x's dtype and
// multiplying them with cuBLAS. w_base may be undefined (the plain sign matmul).
at::Tensor gemm_path(const at::Tensor& x, const at::Tensor& w_base, const at::Tensor& packed, const at::Tensor& scale,
                     bool per_row, int64_t n, int64_t k, const char* op) {
  const int64_t m = x.size(0);
  at::Tensor y = at::empty({m, n}, x.options());
  const int64_t rows = std::max<int64_t>(1, kDequantChunkBytes / std::max<int64_t>(1, k * x.element_size()));
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const DType xt = dtype_of(x, op, "x");
  const DType wt = w_base.defined() ? dtype_of(w_base, op, "w_base") : DType::kFloat32;
  for (int64_t r0 = 0; r0 < n; r0 += rows) {
    const int64_t rn = std::min(rows, n - r0);
    at::Tensor w = at::empty({rn, k}, x.options());
    const void* base = w_base.defined() ? static_cast<const char*>(w_base.data_ptr()) + r0 * k * w_base.element_size()
                                        : nullptr;
    const float* sc = scale.data_ptr<float>() + (per_row ? r0 : 0);
    check_launch(cuda::sign_dequant(packed.data_ptr<uint8_t>() + r0 * sign_bytes(k), rn, k, sc, per_row, base, wt,
                                    w.data_ptr(), xt, stream),
                 op, m, n, k);
    if (rn == n) return at::mm(x, w.t());
    y.narrow(1, r0, rn).copy_(at::mm(x, w.t()));
  }
  return y;
}

at::Tensor pack_signs_cuda(const at::Tensor& x) {
  check_cuda(x, "pack_signs", "x", 2, x);
  TORCH_CHECK(x.scalar_type() == at::kFloat, "pack_signs: x must be float32, got ", x.scalar_type());
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t n = x.size(0), k = x.size(1);
  at::Tensor out = at::empty({n, sign_bytes(k)}, x.options().dtype(at::kByte));
  check_launch(cuda::pack_signs(x.data_ptr<float>(), n, k, out.data_ptr<uint8_t>(),
                                c10::cuda::getCurrentCUDAStream()), "pack_signs", 0, n, k);
  return out;
}

at::Tensor unpack_signs_cuda(const at::Tensor& packed, int64_t k) {
  TORCH_CHECK(k >= 0, "unpack_signs: k must be >= 0, got ", k);
  check_packed(packed, -1, k, "unpack_signs", packed);
  const c10::cuda::CUDAGuard guard(packed.device());
  const int64_t n = packed.size(0);
  at::Tensor out = at::empty({n, k}, packed.options().dtype(at::kFloat));
  check_launch(cuda::unpack_signs(packed.data_ptr<uint8_t>(), n, k, out.data_ptr<float>(),
                                  c10::cuda::getCurrentCUDAStream()), "unpack_signs", 0, n, k);
  return out;
}

at::Tensor sign_matmul_cuda(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale, int64_t k) {
  const char* op = "sign_matmul";
  check_x(x, k, op);
  check_packed(packed, -1, k, op, x);
  const int64_t m = x.size(0), n = packed.size(0);
  const bool per_row = check_scale(scale, n, op, x);
  const c10::cuda::CUDAGuard guard(x.device());
  if (m >= kGemmMinRows) return gemm_path(x, at::Tensor(), packed, scale, per_row, n, k, op);
  at::Tensor y = at::empty({m, n}, x.options());
  check_launch(cuda::sign_matmul(dtype_of(x, op, "x"), x.data_ptr(), m, k, packed.data_ptr<uint8_t>(), n,
                                 scale.data_ptr<float>(), per_row, nullptr, 1, y.data_ptr(),
                                 c10::cuda::getCurrentCUDAStream()), op, m, n, k);
  return y;
}

at::Tensor sign_matmul_fused_cuda(const at::Tensor& x, const at::Tensor& w_base, const at::Tensor& packed,
                                  const at::Tensor& scale, int64_t k) {
  const char* op = "sign_matmul_fused";
  check_x(x, k, op);
  check_cuda(w_base, op, "w_base", 2, x);
  const DType wt = dtype_of(w_base, op, "w_base");
  TORCH_CHECK(w_base.size(1) == k, op, ": w_base has ", w_base.size(1), " columns (shape ", w_base.sizes(),
              ") but k=", k);
  const int64_t m = x.size(0), n = w_base.size(0);
  check_packed(packed, n, k, op, x);
  const bool per_row = check_scale(scale, n, op, x);
  const c10::cuda::CUDAGuard guard(x.device());
  if (m > cuda::kFusedMaxRows) {
    // Past a few rows the CUDA-core kernel loses to cuBLAS on the base (tensor cores) plus the packed
    // sign term: y = x @ w_base^T + x @ (scale * sign)^T (each rounded to x's dtype once).
    const bool same = x.scalar_type() == w_base.scalar_type();
    at::Tensor y = same ? at::mm(x, w_base.t()) : at::mm(x.to(at::kFloat), w_base.to(at::kFloat).t());
    if (y.scalar_type() != x.scalar_type()) y = y.to(x.scalar_type());
    return y.add_(sign_matmul_cuda(x, packed, scale, k));
  }
  // x of another type than the base is widened to fp32 (exactly); y keeps x's dtype.
  const bool widen = dtype_of(x, op, "x") != wt && x.scalar_type() != at::kFloat;
  const at::Tensor xk = widen ? x.to(at::kFloat) : x;
  at::Tensor y = at::empty({m, n}, xk.options());
  check_launch(cuda::sign_matmul_fused(dtype_of(xk, op, "x"), xk.data_ptr(), m, k, wt, w_base.data_ptr(),
                                       packed.data_ptr<uint8_t>(), n, scale.data_ptr<float>(), per_row, y.data_ptr(),
                                       c10::cuda::getCurrentCUDAStream()), op, m, n, k);
  return widen ? y.to(x.scalar_type()) : y;
}

at::Tensor sign_matmul_multi_cuda(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales,
                                  const at::Tensor& index, int64_t k) {
  const char* op = "sign_matmul_multi";
  check_x(x, k, op);
  check_cuda(packed, op, "packed", 3, x);
  TORCH_CHECK(packed.scalar_type() == at::kByte, op, ": packed must be uint8, got ", packed.scalar_type());
  TORCH_CHECK(packed.size(2) == sign_bytes(k), op, ": k=", k, " needs ", sign_bytes(k),
              " bytes per row, but packed has ", packed.size(2), " (shape ", packed.sizes(), ")");
  const int64_t m = x.size(0), tenants = packed.size(0), n = packed.size(1);
  check_cuda(scales, op, "scales", -1, x);
  TORCH_CHECK(scales.scalar_type() == at::kFloat, op, ": scales must be float32, got ", scales.scalar_type());
  const bool per_tensor = scales.dim() == 1 && scales.size(0) == tenants;
  const bool per_row = scales.dim() == 2 && scales.size(0) == tenants && scales.size(1) == n;
  TORCH_CHECK(per_tensor || per_row, op, ": scales must have shape (", tenants, ",) (one per delta) or (", tenants,
              ", ", n, ") (one per delta and output row), got ", scales.sizes());
  check_cuda(index, op, "index", 1, x);
  TORCH_CHECK(index.scalar_type() == at::kLong, op, ": index must be int64, got ", index.scalar_type());
  TORCH_CHECK(index.size(0) == m, op, ": index has ", index.size(0), " entries but x has ", m, " rows");
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::empty({m, n}, x.options());
  check_launch(cuda::sign_matmul(dtype_of(x, op, "x"), x.data_ptr(), m, k, packed.data_ptr<uint8_t>(), n,
                                 scales.data_ptr<float>(), per_row && !per_tensor, index.data_ptr<int64_t>(), tenants,
                                 y.data_ptr(), c10::cuda::getCurrentCUDAStream()), op, m, n, k);
  return y;
}

at::Tensor ternary_matmul_cuda(const at::Tensor& x, const at::Tensor& row_ptr, const at::Tensor& neg_start,
                               const at::Tensor& cols, const at::Tensor& scale, int64_t k) {
  const char* op = "ternary_matmul";
  check_x(x, k, op);
  check_cuda(row_ptr, op, "row_ptr", 1, x);
  check_cuda(neg_start, op, "neg_start", 1, x);
  check_cuda(cols, op, "cols", 1, x);
  TORCH_CHECK(row_ptr.scalar_type() == at::kLong && neg_start.scalar_type() == at::kLong, op,
              ": row_ptr and neg_start must be int64, got ", row_ptr.scalar_type(), " and ", neg_start.scalar_type());
  TORCH_CHECK(cols.scalar_type() == at::kInt, op, ": cols must be int32, got ", cols.scalar_type());
  TORCH_CHECK(row_ptr.size(0) >= 1, op, ": row_ptr must have N + 1 >= 1 entries, got 0");
  const int64_t n = row_ptr.size(0) - 1, m = x.size(0);
  TORCH_CHECK(neg_start.size(0) == n, op, ": neg_start has ", neg_start.size(0), " entries, row_ptr says N=", n);
  const bool per_row = check_scale(scale, n, op, x);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::empty({m, n}, x.options());
  check_launch(cuda::ternary_matmul(dtype_of(x, op, "x"), x.data_ptr(), m, k, row_ptr.data_ptr<int64_t>(),
                                    neg_start.data_ptr<int64_t>(), cols.data_ptr<int32_t>(), cols.size(0), n,
                                    scale.data_ptr<float>(), per_row, y.data_ptr(), c10::cuda::getCurrentCUDAStream()),
               op, m, n, k);
  return y;
}

void check_factor(const at::Tensor& q, const at::Tensor& sc, const at::Tensor& z, const char* which, int64_t rows,
                  int64_t len, int64_t bits, int64_t gs, const at::Tensor& x) {
  const char* op = "kbit_lowrank_matmul";
  const std::string qn = std::string(which) + "_q", sn = std::string(which) + "_scale",
                    zn = std::string(which) + "_zero";
  check_cuda(q, op, qn.c_str(), 1, x);
  TORCH_CHECK(q.scalar_type() == at::kByte, op, ": ", qn, " must be uint8, got ", q.scalar_type());
  const int64_t need = (rows * len * bits + 7) / 8;
  TORCH_CHECK(q.numel() == need, op, ": ", rows, " x ", len, " codes of ", bits, " bits need ", need, " bytes, but ",
              qn, " has ", q.numel());
  const int64_t groups = (len + gs - 1) / gs;
  for (const auto* p : {&sc, &z}) {
    const std::string& nm = p == &sc ? sn : zn;
    check_cuda(*p, op, nm.c_str(), 2, x);
    TORCH_CHECK(p->scalar_type() == at::kHalf, op, ": ", nm, " must be float16, got ", p->scalar_type());
    TORCH_CHECK(p->size(0) == rows && p->size(1) == groups, op, ": ", nm, " must have shape (", rows, ", ", groups,
                ") (r, ceil(", len, " / group_size=", gs, ")), got ", p->sizes());
  }
}

at::Tensor kbit_lowrank_matmul_cuda(const at::Tensor& x, const at::Tensor& v_q, const at::Tensor& v_scale,
                                    const at::Tensor& v_zero, const at::Tensor& u_q, const at::Tensor& u_scale,
                                    const at::Tensor& u_zero, const at::Tensor& s, int64_t bits, int64_t n, int64_t k,
                                    int64_t group_size) {
  const char* op = "kbit_lowrank_matmul";
  TORCH_CHECK(bits >= 1 && bits <= 8, op, ": bits must be in 1..8, got ", bits);
  TORCH_CHECK(n >= 0 && k >= 0, op, ": n and k must be >= 0, got n=", n, " k=", k);
  TORCH_CHECK(group_size >= 1, op, ": group_size must be >= 1, got ", group_size);
  check_x(x, k, op);
  check_cuda(s, op, "s", 1, x);
  TORCH_CHECK(s.scalar_type() == at::kFloat, op, ": s must be float32, got ", s.scalar_type());
  const int64_t r = s.size(0), m = x.size(0);
  check_factor(v_q, v_scale, v_zero, "v", r, k, bits, group_size, x);
  check_factor(u_q, u_scale, u_zero, "u", r, n, bits, group_size, x);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::empty({m, n}, x.options());
  at::Tensor tmp = at::empty({m, std::max<int64_t>(r, 1)}, x.options().dtype(at::kFloat));
  at::Tensor acc = x.scalar_type() == at::kFloat ? y : at::empty({m, n}, x.options().dtype(at::kFloat));
  const auto h = [](const at::Tensor& t) { return reinterpret_cast<const uint16_t*>(t.data_ptr<at::Half>()); };
  check_launch(cuda::kbit_lowrank_matmul(dtype_of(x, op, "x"), x.data_ptr(), m, k, n, r, static_cast<int>(bits),
                                         group_size, v_q.data_ptr<uint8_t>(), h(v_scale), h(v_zero),
                                         u_q.data_ptr<uint8_t>(), h(u_scale), h(u_zero), s.data_ptr<float>(),
                                         tmp.data_ptr<float>(), acc.data_ptr<float>(), y.data_ptr(),
                                         c10::cuda::getCurrentCUDAStream()), op, m, n, k);
  return y;
}

}  // namespace
}  // namespace deltacomp

TORCH_LIBRARY_IMPL(deltacomp, CUDA, m) {
  m.impl("pack_signs", &deltacomp::pack_signs_cuda);
  m.impl("unpack_signs", &deltacomp::unpack_signs_cuda);
  m.impl("sign_matmul", &deltacomp::sign_matmul_cuda);
  m.impl("sign_matmul_fused", &deltacomp::sign_matmul_fused_cuda);
  m.impl("sign_matmul_multi", &deltacomp::sign_matmul_multi_cuda);
  m.impl("ternary_matmul", &deltacomp::ternary_matmul_cuda);
  m.impl("kbit_lowrank_matmul", &deltacomp::kbit_lowrank_matmul_cuda);
}
