// Torch-facing CPU wrappers of the SIGNS ops: check inputs (messages carry the actual values), then
// call the raw kernels in sign_kernels.cpp. Schemas are in csrc/ops.cpp.
// Narrow ATen headers (not ATen/ATen.h): they halve the compile time of this file.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "sign_kernels.h"

namespace deltacomp {
namespace {

int64_t sign_bytes(int64_t k) { return (k + 7) / 8; }

void check_cpu_2d(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be on the CPU, got ", t.device());
  TORCH_CHECK(t.dim() == 2, op, ": ", name, " must be 2-D, got shape ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous (shape ", t.sizes(), ", strides ",
              t.strides(), "); call .contiguous()");
}

void check_packed(const at::Tensor& packed, int64_t k, const char* op) {
  check_cpu_2d(packed, op, "packed");
  TORCH_CHECK(packed.scalar_type() == at::kByte, op, ": packed must be uint8, got ", packed.scalar_type());
  TORCH_CHECK(k >= 0, op, ": k must be >= 0, got ", k);
  TORCH_CHECK(packed.size(1) == sign_bytes(k), op, ": k=", k, " needs ", sign_bytes(k),
              " bytes per row, but packed has ", packed.size(1), " (shape ", packed.sizes(), ")");
}

at::Tensor pack_signs_cpu(const at::Tensor& x) {
  check_cpu_2d(x, "pack_signs", "x");
  TORCH_CHECK(x.scalar_type() == at::kFloat, "pack_signs: x must be float32, got ", x.scalar_type());
  const int64_t n = x.size(0), k = x.size(1);
  at::Tensor out = at::empty({n, sign_bytes(k)}, x.options().dtype(at::kByte));
  cpu::pack_signs_f32(x.data_ptr<float>(), n, k, out.data_ptr<uint8_t>());
  return out;
}

at::Tensor unpack_signs_cpu(const at::Tensor& packed, int64_t k) {
  check_packed(packed, k, "unpack_signs");
  const int64_t n = packed.size(0);
  at::Tensor out = at::empty({n, k}, packed.options().dtype(at::kFloat));
  cpu::unpack_signs_f32(packed.data_ptr<uint8_t>(), n, k, out.data_ptr<float>());
  return out;
}

at::Tensor sign_matmul_cpu(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale, int64_t k) {
  check_cpu_2d(x, "sign_matmul", "x");
  const auto xt = x.scalar_type();
  TORCH_CHECK(xt == at::kFloat || xt == at::kBFloat16 || xt == at::kHalf,
              "sign_matmul: x must be float32, bfloat16 or float16, got ", xt);
  check_packed(packed, k, "sign_matmul");
  TORCH_CHECK(x.size(1) == k, "sign_matmul: x has ", x.size(1), " columns (shape ", x.sizes(), ") but k=", k);
  const int64_t m = x.size(0), n = packed.size(0);
  TORCH_CHECK(scale.device().is_cpu(), "sign_matmul: scale must be on the CPU, got ", scale.device());
  TORCH_CHECK(scale.scalar_type() == at::kFloat, "sign_matmul: scale must be float32, got ", scale.scalar_type());
  const bool per_tensor = scale.dim() <= 1 && scale.numel() == 1;
  const bool per_row = scale.dim() == 1 && scale.numel() == n;
  TORCH_CHECK(per_tensor || per_row, "sign_matmul: scale must have shape () or (1,) (per tensor) or (", n,
              ",) (one per row of packed), got ", scale.sizes());
  TORCH_CHECK(scale.is_contiguous(), "sign_matmul: scale must be contiguous, got strides ", scale.strides());

  // bf16/fp16 x: widened once (M x K is small next to the weights); the kernel accumulates in fp32.
  const at::Tensor xf = xt == at::kFloat ? x : x.to(at::kFloat);
  at::Tensor y = at::empty({m, n}, x.options().dtype(at::kFloat));
  cpu::sign_matmul_f32(xf.data_ptr<float>(), m, k, packed.data_ptr<uint8_t>(), n, scale.data_ptr<float>(),
                       per_row && !per_tensor, y.data_ptr<float>());
  return xt == at::kFloat ? y : y.to(xt);
}

}  // namespace
}  // namespace deltacomp

TORCH_LIBRARY_IMPL(deltacomp, CPU, m) {
  m.impl("pack_signs", &deltacomp::pack_signs_cpu);
  m.impl("unpack_signs", &deltacomp::unpack_signs_cpu);
  m.impl("sign_matmul", &deltacomp::sign_matmul_cpu);
}
