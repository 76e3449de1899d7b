// Torch-facing CPU wrappers of the serving ops (fused base + signs, multi-tenant signs, ternary CSR):
// check inputs (messages carry the actual values), then call the raw kernels in sign_kernels.cpp,
// fused_kernels.cpp and ternary_kernels.cpp. Schemas are in csrc/ops.cpp, layouts in deltacomp/ops.py.
#include <vector>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "serve_kernels.h"
#include "sign_kernels.h"

namespace deltacomp {
namespace {

int64_t sign_bytes(int64_t k) { return (k + 7) / 8; }

void check_cpu(const at::Tensor& t, const char* op, const char* name, int64_t dim) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be on the CPU, got ", t.device());
  TORCH_CHECK(t.dim() == dim, op, ": ", name, " must be ", dim, "-D, got shape ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous (shape ", t.sizes(), ", strides ",
              t.strides(), "); call .contiguous()");
}

void check_x(const at::Tensor& x, int64_t k, const char* op) {
  check_cpu(x, op, "x", 2);
  const auto xt = x.scalar_type();
  TORCH_CHECK(xt == at::kFloat || xt == at::kBFloat16 || xt == at::kHalf, op,
              ": x must be float32, bfloat16 or float16, got ", xt);
  TORCH_CHECK(k >= 0, op, ": k must be >= 0, got ", k);
  TORCH_CHECK(x.size(1) == k, op, ": x has ", x.size(1), " columns (shape ", x.sizes(), ") but k=", k);
}

// Returns true for one scale per row (n entries), false for one per tensor.
bool check_scale(const at::Tensor& scale, int64_t n, const char* op) {
  TORCH_CHECK(scale.device().is_cpu(), op, ": scale must be on the CPU, got ", scale.device());
  TORCH_CHECK(scale.scalar_type() == at::kFloat, op, ": scale must be float32, got ", scale.scalar_type());
  TORCH_CHECK(scale.is_contiguous(), op, ": scale must be contiguous, got strides ", scale.strides());
  const bool per_tensor = scale.dim() <= 1 && scale.numel() == 1;
  const bool per_row = scale.dim() == 1 && scale.numel() == n;
  TORCH_CHECK(per_tensor || per_row, op, ": scale must have shape () or (1,) (per tensor) or (", n,
              ",) (one per output row), got ", scale.sizes());
  return per_row && !per_tensor;
}

at::Tensor finish(const at::Tensor& y, const at::Tensor& x) {
  return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
}

at::Tensor sign_matmul_fused_cpu(const at::Tensor& x, const at::Tensor& w_base, const at::Tensor& packed,
                                 const at::Tensor& scale, int64_t k) {
  const char* op = "sign_matmul_fused";
  check_x(x, k, op);
  check_cpu(w_base, op, "w_base", 2);
  const auto wt = w_base.scalar_type();
  TORCH_CHECK(wt == at::kFloat || wt == at::kBFloat16, op, ": w_base must be float32 or bfloat16, got ", wt);
  TORCH_CHECK(w_base.size(1) == k, op, ": w_base has ", w_base.size(1), " columns (shape ", w_base.sizes(),
              ") but k=", k);
  check_cpu(packed, op, "packed", 2);
  TORCH_CHECK(packed.scalar_type() == at::kByte, op, ": packed must be uint8, got ", packed.scalar_type());
  const int64_t m = x.size(0), n = w_base.size(0);
  TORCH_CHECK(packed.size(0) == n && packed.size(1) == sign_bytes(k), op, ": packed must have shape (", n, ", ",
              sign_bytes(k), ") for w_base ", w_base.sizes(), " and k=", k, ", got ", packed.sizes());
  const bool per_row = check_scale(scale, n, op);
  const at::Tensor xf = x.scalar_type() == at::kFloat ? x : x.to(at::kFloat);
  at::Tensor y = at::empty({m, n}, x.options().dtype(at::kFloat));
  if (wt == at::kFloat) {
    cpu::sign_matmul_fused<float>(xf.data_ptr<float>(), m, k, w_base.data_ptr<float>(), packed.data_ptr<uint8_t>(),
                                  n, scale.data_ptr<float>(), per_row, y.data_ptr<float>());
  } else {
    const auto* w = reinterpret_cast<const uint16_t*>(w_base.data_ptr<at::BFloat16>());
    cpu::sign_matmul_fused<uint16_t>(xf.data_ptr<float>(), m, k, w, packed.data_ptr<uint8_t>(), n,
                                     scale.data_ptr<float>(), per_row, y.data_ptr<float>());
  }
  return finish(y, x);
}

at::Tensor sign_matmul_tl_cpu(const at::Tensor& x, const at::Tensor& w_base, const at::Tensor& s_tl,
                              const at::Tensor& scale, int64_t n, int64_t k) {
  const char* op = "sign_matmul_tl";
  check_x(x, k, op);
  TORCH_CHECK(x.size(0) == 1, op, ": x must have one row, got shape ", x.sizes());
  TORCH_CHECK(k > 0 && k % 4 == 0, op, ": k must be a positive multiple of 4, got ", k);
  TORCH_CHECK(n >= 0, op, ": n must be >= 0, got ", n);
  const bool base = w_base.numel() != 0;
  if (base) {
    check_cpu(w_base, op, "w_base", 2);
    TORCH_CHECK(w_base.scalar_type() == at::kFloat || w_base.scalar_type() == at::kBFloat16, op,
                ": w_base must be float32 or bfloat16, got ", w_base.scalar_type());
    TORCH_CHECK(w_base.size(0) == n && w_base.size(1) == k, op, ": w_base must have shape (", n, ", ", k,
                "), got ", w_base.sizes());
  }
  check_cpu(s_tl, op, "s_tl", 1);
  TORCH_CHECK(s_tl.scalar_type() == at::kByte, op, ": s_tl must be uint8, got ", s_tl.scalar_type());
  TORCH_CHECK(s_tl.numel() == cpu::sign_tl_bytes(n, k), op, ": s_tl must have ", cpu::sign_tl_bytes(n, k),
              " bytes for n=", n, ", k=", k, ", got ", s_tl.numel());
  const bool per_row = check_scale(scale, n, op);
  const at::Tensor xf = x.scalar_type() == at::kFloat ? x : x.to(at::kFloat);
  at::Tensor y = at::empty({1, n}, x.options().dtype(at::kFloat));
  bool ok;
  if (!base || w_base.scalar_type() == at::kFloat) {
    ok = cpu::sign_matmul_tl<float>(xf.data_ptr<float>(), k, base ? w_base.data_ptr<float>() : nullptr,
                                    s_tl.data_ptr<uint8_t>(), n, scale.data_ptr<float>(), per_row, y.data_ptr<float>());
  } else {
    ok = cpu::sign_matmul_tl<uint16_t>(xf.data_ptr<float>(), k,
                                       reinterpret_cast<const uint16_t*>(w_base.data_ptr<at::BFloat16>()),
                                       s_tl.data_ptr<uint8_t>(), n, scale.data_ptr<float>(), per_row,
                                       y.data_ptr<float>());
  }
  TORCH_CHECK(ok, op, ": the AVX-512 path has no int8 tables (DELTACOMP_ISA=avx512, or the CPU's best); use "
              "sign_matmul_fused");
  return finish(y, x);
}

at::Tensor sign_matmul_tl_rows_cpu(const at::Tensor& x, at::TensorList s_tl, at::TensorList scale, int64_t n,
                                   int64_t k) {
  const char* op = "sign_matmul_tl_rows";
  check_x(x, k, op);
  const int64_t m = x.size(0);
  TORCH_CHECK(k > 0 && k % 4 == 0, op, ": k must be a positive multiple of 4, got ", k);
  TORCH_CHECK(n >= 0, op, ": n must be >= 0, got ", n);
  TORCH_CHECK(static_cast<int64_t>(s_tl.size()) == m && static_cast<int64_t>(scale.size()) == m, op, ": x has ",
              m, " rows, but s_tl and scale have ", s_tl.size(), " and ", scale.size(), " entries");
  std::vector<char> per_row(static_cast<size_t>(m), 0);
  for (int64_t i = 0; i < m; ++i) {
    if (s_tl[i].numel() == 0) continue;
    check_cpu(s_tl[i], op, "s_tl", 1);
    TORCH_CHECK(s_tl[i].scalar_type() == at::kByte && s_tl[i].numel() == cpu::sign_tl_bytes(n, k), op, ": s_tl[",
                i, "] must be uint8 of ", cpu::sign_tl_bytes(n, k), " bytes for n=", n, ", k=", k, ", got ",
                s_tl[i].scalar_type(), " of ", s_tl[i].numel());
    per_row[i] = check_scale(scale[i], n, op);
  }
  const at::Tensor xf = (x.scalar_type() == at::kFloat ? x : x.to(at::kFloat)).contiguous();
  at::Tensor y = at::zeros({m, n}, x.options().dtype(at::kFloat));
  for (int64_t i = 0; i < m; ++i) {
    if (s_tl[i].numel() == 0 || n == 0) continue;
    const bool ok = cpu::sign_matmul_tl<float>(xf.data_ptr<float>() + i * k, k, nullptr, s_tl[i].data_ptr<uint8_t>(),
                                               n, scale[i].data_ptr<float>(), per_row[i], y.data_ptr<float>() + i * n);
    TORCH_CHECK(ok, op, ": the AVX-512 path has no int8 tables (DELTACOMP_ISA=avx512, or the CPU's best); use "
                "sign_matmul_multi");
  }
  return finish(y, x);
}

at::Tensor sign_matmul_multi_cpu(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales,
                                 const at::Tensor& index, int64_t k) {
  const char* op = "sign_matmul_multi";
  check_x(x, k, op);
  check_cpu(packed, op, "packed", 3);
  TORCH_CHECK(packed.scalar_type() == at::kByte, op, ": packed must be uint8, got ", packed.scalar_type());
  TORCH_CHECK(packed.size(2) == sign_bytes(k), op, ": k=", k, " needs ", sign_bytes(k),
              " bytes per row, but packed has ", packed.size(2), " (shape ", packed.sizes(), ")");
  const int64_t m = x.size(0), t_count = packed.size(0), n = packed.size(1);
  TORCH_CHECK(scales.device().is_cpu(), op, ": scales must be on the CPU, got ", scales.device());
  TORCH_CHECK(scales.scalar_type() == at::kFloat, op, ": scales must be float32, got ", scales.scalar_type());
  TORCH_CHECK(scales.is_contiguous(), op, ": scales must be contiguous, got strides ", scales.strides());
  const bool per_tensor = scales.dim() == 1 && scales.size(0) == t_count;
  const bool per_row = scales.dim() == 2 && scales.size(0) == t_count && scales.size(1) == n;
  TORCH_CHECK(per_tensor || per_row, op, ": scales must have shape (", t_count, ",) (one per delta) or (",
              t_count, ", ", n, ") (one per delta and output row), got ", scales.sizes());
  check_cpu(index, op, "index", 1);
  TORCH_CHECK(index.scalar_type() == at::kLong, op, ": index must be int64, got ", index.scalar_type());
  TORCH_CHECK(index.size(0) == m, op, ": index has ", index.size(0), " entries but x has ", m, " rows");
  const int64_t* idx = index.data_ptr<int64_t>();
  for (int64_t i = 0; i < m; ++i) {
    TORCH_CHECK(idx[i] >= -1 && idx[i] < t_count, op, ": index[", i, "]=", idx[i], " is outside [-1, ",
                t_count, ") (", t_count, " deltas in packed; -1 means no delta)");
  }
  const at::Tensor xf = x.scalar_type() == at::kFloat ? x : x.to(at::kFloat);
  at::Tensor y = at::empty({m, n}, x.options().dtype(at::kFloat));
  cpu::sign_matmul_multi_f32(xf.data_ptr<float>(), m, k, packed.data_ptr<uint8_t>(), t_count, n,
                             scales.data_ptr<float>(), per_row && !per_tensor, idx, y.data_ptr<float>());
  return finish(y, x);
}

at::Tensor ternary_matmul_cpu(const at::Tensor& x, const at::Tensor& row_ptr, const at::Tensor& neg_start,
                              const at::Tensor& cols, const at::Tensor& scale, int64_t k) {
  const char* op = "ternary_matmul";
  check_x(x, k, op);
  check_cpu(row_ptr, op, "row_ptr", 1);
  check_cpu(neg_start, op, "neg_start", 1);
  check_cpu(cols, op, "cols", 1);
  TORCH_CHECK(row_ptr.scalar_type() == at::kLong && neg_start.scalar_type() == at::kLong, op,
              ": row_ptr and neg_start must be int64, got ", row_ptr.scalar_type(), " and ", neg_start.scalar_type());
  TORCH_CHECK(cols.scalar_type() == at::kInt, op, ": cols must be int32, got ", cols.scalar_type());
  TORCH_CHECK(row_ptr.size(0) >= 1, op, ": row_ptr must have N + 1 >= 1 entries, got 0");
  const int64_t n = row_ptr.size(0) - 1, nnz = cols.size(0), m = x.size(0);
  TORCH_CHECK(neg_start.size(0) == n, op, ": neg_start has ", neg_start.size(0), " entries, row_ptr says N=", n);
  const bool per_row = check_scale(scale, n, op);
  // Bounds of the runtime form, checked here so a bad one can never read outside x (O(N + nnz)).
  const int64_t* rp = row_ptr.data_ptr<int64_t>();
  const int64_t* ns = neg_start.data_ptr<int64_t>();
  const int32_t* cl = cols.data_ptr<int32_t>();
  TORCH_CHECK(rp[0] == 0 && rp[n] == nnz, op, ": row_ptr must start at 0 and end at nnz=", nnz, ", got ", rp[0],
              " and ", rp[n]);
  for (int64_t r = 0; r < n; ++r) {
    TORCH_CHECK(rp[r] <= ns[r] && ns[r] <= rp[r + 1], op, ": row ", r, ": need row_ptr[r] <= neg_start[r] <= ",
                "row_ptr[r+1], got ", rp[r], ", ", ns[r], ", ", rp[r + 1]);
  }
  for (int64_t j = 0; j < nnz; ++j) {
    TORCH_CHECK(cl[j] >= 0 && cl[j] < k, op, ": cols[", j, "]=", cl[j], " is outside [0, k=", k, ")");
  }
  // x transposed to (k, m): the m values of a column are contiguous (for m == 1 it is x itself)
  const at::Tensor xt = (x.scalar_type() == at::kFloat ? x : x.to(at::kFloat)).t().contiguous();
  at::Tensor y = at::empty({m, n}, x.options().dtype(at::kFloat));
  cpu::ternary_matmul_f32(xt.data_ptr<float>(), m, k, rp, ns, cl, n, scale.data_ptr<float>(), per_row,
                          y.data_ptr<float>());
  return finish(y, x);
}

}  // namespace
}  // namespace deltacomp

TORCH_LIBRARY_IMPL(deltacomp, CPU, m) {
  m.impl("sign_matmul_fused", &deltacomp::sign_matmul_fused_cpu);
  m.impl("sign_matmul_tl", &deltacomp::sign_matmul_tl_cpu);
  m.impl("sign_matmul_tl_rows", &deltacomp::sign_matmul_tl_rows_cpu);
  m.impl("sign_matmul_multi", &deltacomp::sign_matmul_multi_cpu);
  m.impl("ternary_matmul", &deltacomp::ternary_matmul_cpu);
}
