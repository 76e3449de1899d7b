// Torch-facing CPU wrapper of kbit_lowrank_matmul (svd-mixed, one bit-width group): checks the inputs
// (messages carry the actual values), then calls the raw kernel in lowrank_kernels.cpp. Schema in
// csrc/ops.cpp, layouts in deltacomp/ops.py.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "lowrank_kernels.h"

namespace deltacomp {
namespace {

constexpr const char* kOp = "kbit_lowrank_matmul";

void check_cpu(const at::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK(t.device().is_cpu(), kOp, ": ", name, " must be on the CPU, got ", t.device());
  TORCH_CHECK(t.dim() == dim, kOp, ": ", name, " must be ", dim, "-D, got shape ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), kOp, ": ", name, " must be contiguous (shape ", t.sizes(), ", strides ",
              t.strides(), "); call .contiguous()");
}

// One factor: packed KBITS codes of `rows` x `len` values and fp16 (rows, ceil(len / gs)) scale / zero.
void check_factor(const at::Tensor& q, const at::Tensor& scale, const at::Tensor& zero, const char* which,
                  int64_t rows, int64_t len, int64_t bits, int64_t gs) {
  const std::string qn = std::string(which) + "_q", sn = std::string(which) + "_scale",
                    zn = std::string(which) + "_zero";
  check_cpu(q, qn.c_str(), 1);
  TORCH_CHECK(q.scalar_type() == at::kByte, kOp, ": ", qn, " must be uint8, got ", q.scalar_type());
  const int64_t need = (rows * len * bits + 7) / 8;
  TORCH_CHECK(q.numel() == need, kOp, ": ", rows, " x ", len, " codes of ", bits, " bits need ", need,
              " bytes, but ", qn, " has ", q.numel());
  const int64_t groups = (len + gs - 1) / gs;
  for (const auto* p : {&scale, &zero}) {
    const std::string& nm = p == &scale ? sn : zn;
    check_cpu(*p, nm.c_str(), 2);
    TORCH_CHECK(p->scalar_type() == at::kHalf, kOp, ": ", nm, " must be float16, got ", p->scalar_type());
    TORCH_CHECK(p->size(0) == rows && p->size(1) == groups, kOp, ": ", nm, " must have shape (", rows, ", ",
                groups, ") (r, ceil(", len, " / group_size=", gs, ")), got ", p->sizes());
  }
}

at::Tensor kbit_lowrank_matmul_cpu(const at::Tensor& x, const at::Tensor& v_q, const at::Tensor& v_scale,
                                   const at::Tensor& v_zero, const at::Tensor& u_q, const at::Tensor& u_scale,
                                   const at::Tensor& u_zero, const at::Tensor& s, int64_t bits, int64_t n,
                                   int64_t k, int64_t group_size) {
  check_cpu(x, "x", 2);
  const auto xt = x.scalar_type();
  TORCH_CHECK(xt == at::kFloat || xt == at::kBFloat16 || xt == at::kHalf, kOp,
              ": x must be float32, bfloat16 or float16, got ", xt);
  TORCH_CHECK(bits >= 1 && bits <= 8, kOp, ": bits must be in 1..8, got ", bits);
  TORCH_CHECK(n >= 0 && k >= 0, kOp, ": n and k must be >= 0, got n=", n, " k=", k);
  TORCH_CHECK(group_size >= 1, kOp, ": group_size must be >= 1, got ", group_size);
  TORCH_CHECK(x.size(1) == k, kOp, ": x has ", x.size(1), " columns (shape ", x.sizes(), ") but k=", k);
  check_cpu(s, "s", 1);
  TORCH_CHECK(s.scalar_type() == at::kFloat, kOp, ": s must be float32, got ", s.scalar_type());
  const int64_t r = s.size(0), m = x.size(0);
  check_factor(v_q, v_scale, v_zero, "v", r, k, bits, group_size);
  check_factor(u_q, u_scale, u_zero, "u", r, n, bits, group_size);

  // bf16/fp16 x: widened once (M x K is small next to the factors); the kernel accumulates in fp32.
  const at::Tensor xf = xt == at::kFloat ? x : x.to(at::kFloat);
  at::Tensor y = at::empty({m, n}, x.options().dtype(at::kFloat));
  const auto half = [](const at::Tensor& t) { return reinterpret_cast<const uint16_t*>(t.data_ptr<at::Half>()); };
  cpu::kbit_lowrank_matmul_f32(xf.data_ptr<float>(), m, k, n, r, static_cast<int>(bits), group_size,
                               v_q.data_ptr<uint8_t>(), half(v_scale), half(v_zero), u_q.data_ptr<uint8_t>(),
                               half(u_scale), half(u_zero), s.data_ptr<float>(), y.data_ptr<float>());
  return xt == at::kFloat ? y : y.to(xt);
}

}  // namespace
}  // namespace deltacomp

TORCH_LIBRARY_IMPL(deltacomp, CPU, m) { m.impl("kbit_lowrank_matmul", &deltacomp::kbit_lowrank_matmul_cpu); }
