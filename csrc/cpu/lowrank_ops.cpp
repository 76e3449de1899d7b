// Torch-facing CPU wrappers of kbit_lowrank_matmul (svd-mixed, one bit-width group),
// kbit_lowrank_matmul_groups (every group of a layer in one call), its _tl variant and tl4_pack (the TL4
// repack, tl4_pack.cpp): check the inputs (messages carry the actual values), then call the raw kernels
// in lowrank_kernels.cpp and tl4_pack.cpp. Schemas in csrc/ops.cpp, layouts in deltacomp/ops.py.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <string>
#include <vector>

#include "lowrank_isa.h"
#include "lowrank_kernels.h"
#include "lowrank_ops.h"
#include "tl4_pack.h"

namespace deltacomp {
namespace {

constexpr const char* kOp = "kbit_lowrank_matmul";

void check_cpu(const at::Tensor& t, const char* name, int64_t dim, const char* op = kOp) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be on the CPU, got ", t.device());
  TORCH_CHECK(t.dim() == dim, op, ": ", name, " must be ", dim, "-D, got shape ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous (shape ", t.sizes(), ", strides ",
              t.strides(), "); call .contiguous()");
}

// One factor: packed KBITS codes of `rows` x `len` values and fp16 (rows, ceil(len / gs)) scale / zero.
void check_factor(const at::Tensor& q, const at::Tensor& scale, const at::Tensor& zero, const char* which,
                  int64_t rows, int64_t len, int64_t bits, int64_t gs, const char* op = kOp) {
  const std::string qn = std::string(which) + "_q", sn = std::string(which) + "_scale",
                    zn = std::string(which) + "_zero";
  check_cpu(q, qn.c_str(), 1, op);
  TORCH_CHECK(q.scalar_type() == at::kByte, op, ": ", qn, " must be uint8, got ", q.scalar_type());
  const int64_t need = (rows * len * bits + 7) / 8;
  TORCH_CHECK(q.numel() == need, op, ": ", rows, " x ", len, " codes of ", bits, " bits need ", need,
              " bytes, but ", qn, " has ", q.numel());
  const int64_t groups = (len + gs - 1) / gs;
  for (const auto* p : {&scale, &zero}) {
    const std::string& nm = p == &scale ? sn : zn;
    check_cpu(*p, nm.c_str(), 2, op);
    TORCH_CHECK(p->scalar_type() == at::kHalf, op, ": ", nm, " must be float16, got ", p->scalar_type());
    TORCH_CHECK(p->size(0) == rows && p->size(1) == groups, op, ": ", nm, " must have shape (", rows, ", ",
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

// The TL4 lists' checks (TlLists: lowrank_ops.h).
void check_tl(const char* op, const TlLists& tl, at::IntArrayRef bits, std::vector<cpu::KbitGroup>& groups, int64_t n,
              int64_t k, int64_t gs) {
  namespace lr = cpu::lowrank;
  const size_t count = bits.size();
  TORCH_CHECK(tl.v_tl.size() == count && tl.v_tl_scale.size() == count && tl.u_tl.size() == count &&
                  tl.u_tl_scale.size() == count && tl.u_tl_zero.size() == count,
              op, ": bits has ", count, " groups, but the TL4 lists have ", tl.v_tl.size(), ", ", tl.v_tl_scale.size(),
              ", ", tl.u_tl.size(), ", ", tl.u_tl_scale.size(), ", ", tl.u_tl_zero.size(), " entries");
  const auto name = [](const char* what, size_t g) { return std::string(what) + "[" + std::to_string(g) + "]"; };
  const auto check_half = [&](const at::Tensor& t, const std::string& nm, std::vector<int64_t> shape) {
    check_cpu(t, nm.c_str(), static_cast<int64_t>(shape.size()), op);
    TORCH_CHECK(t.scalar_type() == at::kHalf && t.sizes() == at::IntArrayRef(shape), op, ": ", nm,
                " must be float16 of shape ", at::IntArrayRef(shape), ", got ", t.scalar_type(), " ", t.sizes(),
                "; repack with quant.tl4");
  };
  const auto check_codes = [&](const at::Tensor& t, const std::string& nm, int64_t need) {
    check_cpu(t, nm.c_str(), 1, op);
    TORCH_CHECK(t.scalar_type() == at::kByte && t.numel() == need, op, ": ", nm, " must be uint8 of ", need,
                " bytes, got ", t.scalar_type(), " of ", t.numel(), "; repack with quant.tl4");
  };
  for (size_t g = 0; g < count; ++g) {
    const int64_t r = groups[g].r, b = bits[g];
    if (tl.v_tl[g].numel() != 0 || tl.v_tl_scale[g].numel() != 0) {
      TORCH_CHECK((b == 1 || b == 2) && gs % 4 == 0, op, ": group ", g, " (", b, " bits, group_size ", gs,
                  ") has no TL4 layout of V (1 or 2 bits, group_size % 4 == 0); pass empty tensors");
      const int64_t tiles = (r + lr::kTlRows - 1) / lr::kTlRows;
      check_codes(tl.v_tl[g], name("v_tl", g), tiles * lr::tl_groups(k, gs) * 16 * b);
      check_half(tl.v_tl_scale[g], name("v_tl_scale", g), {tiles, (k + gs - 1) / gs, lr::kTlRows});
      groups[g].v_tl = tl.v_tl[g].data_ptr<uint8_t>();
      groups[g].v_tl_scale = reinterpret_cast<const uint16_t*>(tl.v_tl_scale[g].data_ptr<at::Half>());
    }
    if (tl.u_tl[g].numel() != 0 || tl.u_tl_scale[g].numel() != 0 || tl.u_tl_zero[g].numel() != 0) {
      TORCH_CHECK((b == 1 || b == 2) && gs % 32 == 0 && r > 0, op, ": group ", g, " (", b, " bits, group_size ", gs,
                  ", rank ", r, ") has no TL4 layout of U (1 or 2 bits, group_size % 32 == 0); pass empty tensors");
      const int64_t tiles = (n + lr::kTlRows - 1) / lr::kTlRows;
      check_codes(tl.u_tl[g], name("u_tl", g), tiles * lr::tl_groups(r, r) * 16 * b);
      check_half(tl.u_tl_scale[g], name("u_tl_scale", g), {(n + gs - 1) / gs, r});
      check_half(tl.u_tl_zero[g], name("u_tl_zero", g), {(n + gs - 1) / gs, r});
      groups[g].u_tl = tl.u_tl[g].data_ptr<uint8_t>();
      groups[g].u_tl_scale = reinterpret_cast<const uint16_t*>(tl.u_tl_scale[g].data_ptr<at::Half>());
      groups[g].u_tl_zero = reinterpret_cast<const uint16_t*>(tl.u_tl_zero[g].data_ptr<at::Half>());
    }
  }
}

}  // namespace

std::vector<cpu::KbitGroup> checked_groups(const char* op, at::TensorList v_q, at::TensorList v_scale,
                                           at::TensorList v_zero, at::TensorList u_q, at::TensorList u_scale,
                                           at::TensorList u_zero, const at::Tensor& s, at::IntArrayRef bits,
                                           int64_t n, int64_t k, int64_t group_size, const TlLists* tl) {
  TORCH_CHECK(n >= 0 && k >= 0, op, ": n and k must be >= 0, got n=", n, " k=", k);
  TORCH_CHECK(group_size >= 1, op, ": group_size must be >= 1, got ", group_size);
  const size_t count = bits.size();
  TORCH_CHECK(v_q.size() == count && v_scale.size() == count && v_zero.size() == count && u_q.size() == count &&
                  u_scale.size() == count && u_zero.size() == count,
              op, ": bits has ", count, " groups, but the factor lists have ", v_q.size(), ", ", v_scale.size(), ", ",
              v_zero.size(), ", ", u_q.size(), ", ", u_scale.size(), ", ", u_zero.size(), " entries");
  check_cpu(s, "s", 1, op);
  TORCH_CHECK(s.scalar_type() == at::kFloat, op, ": s must be float32, got ", s.scalar_type());
  std::vector<cpu::KbitGroup> groups(count);
  const auto half = [](const at::Tensor& t) { return reinterpret_cast<const uint16_t*>(t.data_ptr<at::Half>()); };
  int64_t r_total = 0;
  for (size_t g = 0; g < count; ++g) {
    TORCH_CHECK(bits[g] >= 1 && bits[g] <= 8, op, ": bits[", g, "] must be in 1..8, got ", bits[g]);
    TORCH_CHECK(v_scale[g].dim() == 2, op, ": v_scale[", g, "] must be 2-D (r, groups), got shape ", v_scale[g].sizes());
    const int64_t r = v_scale[g].size(0);
    check_factor(v_q[g], v_scale[g], v_zero[g], "v", r, k, bits[g], group_size, op);
    check_factor(u_q[g], u_scale[g], u_zero[g], "u", r, n, bits[g], group_size, op);
    groups[g] = {static_cast<int>(bits[g]), r, v_q[g].data_ptr<uint8_t>(), half(v_scale[g]), half(v_zero[g]),
                 u_q[g].data_ptr<uint8_t>(), half(u_scale[g]), half(u_zero[g]), nullptr};
    r_total += r;
  }
  TORCH_CHECK(s.size(0) == r_total, op, ": the groups have ", r_total, " rows in all (v_scale sizes), but s has ",
              s.size(0));
  if (tl != nullptr) check_tl(op, *tl, bits, groups, n, k, group_size);
  int64_t off = 0;
  for (auto& g : groups) {
    g.s = s.data_ptr<float>() + off;
    off += g.r;
  }
  return groups;
}

namespace {

// Every bit-width group of a layer in one call (checked_groups); x may be strided (copied once here, so the
// caller makes no Python-side tensor call).
at::Tensor groups_impl(const char* op, const at::Tensor& x, at::TensorList v_q, at::TensorList v_scale,
                       at::TensorList v_zero, at::TensorList u_q, at::TensorList u_scale, at::TensorList u_zero,
                       const at::Tensor& s, at::IntArrayRef bits, int64_t n, int64_t k, int64_t group_size,
                       const TlLists* tl) {
  TORCH_CHECK(x.device().is_cpu(), op, ": x must be on the CPU, got ", x.device());
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D, got shape ", x.sizes());
  const auto xt = x.scalar_type();
  TORCH_CHECK(xt == at::kFloat || xt == at::kBFloat16 || xt == at::kHalf, op,
              ": x must be float32, bfloat16 or float16, got ", xt);
  TORCH_CHECK(x.size(1) == k, op, ": x has ", x.size(1), " columns (shape ", x.sizes(), ") but k=", k);
  const std::vector<cpu::KbitGroup> groups =
      checked_groups(op, v_q, v_scale, v_zero, u_q, u_scale, u_zero, s, bits, n, k, group_size, tl);
  // bf16/fp16 x: widened once (M x K is small next to the factors); the kernel accumulates in fp32.
  const at::Tensor xf = (xt == at::kFloat ? x : x.to(at::kFloat)).contiguous();
  at::Tensor y = at::empty({x.size(0), n}, x.options().dtype(at::kFloat));
  cpu::kbit_lowrank_matmul_groups_f32(xf.data_ptr<float>(), x.size(0), k, n, group_size, groups.data(),
                                      static_cast<int64_t>(groups.size()), y.data_ptr<float>());
  return xt == at::kFloat ? y : y.to(xt);
}


at::Tensor kbit_lowrank_matmul_groups_cpu(const at::Tensor& x, at::TensorList v_q, at::TensorList v_scale,
                                          at::TensorList v_zero, at::TensorList u_q, at::TensorList u_scale,
                                          at::TensorList u_zero, const at::Tensor& s, at::IntArrayRef bits,
                                          int64_t n, int64_t k, int64_t group_size) {
  return groups_impl("kbit_lowrank_matmul_groups", x, v_q, v_scale, v_zero, u_q, u_scale, u_zero, s, bits, n, k,
                     group_size, nullptr);
}

// The same with the TL4 repacks (quant.tl4) of the 1- and 2-bit groups: entry g of each list is group g's,
// or an empty tensor for a group without one.
at::Tensor kbit_lowrank_matmul_groups_tl_cpu(const at::Tensor& x, at::TensorList v_q, at::TensorList v_scale,
                                             at::TensorList v_zero, at::TensorList u_q, at::TensorList u_scale,
                                             at::TensorList u_zero, const at::Tensor& s, at::IntArrayRef bits,
                                             int64_t n, int64_t k, int64_t group_size, at::TensorList v_tl,
                                             at::TensorList v_tl_scale, at::TensorList u_tl, at::TensorList u_tl_scale,
                                             at::TensorList u_tl_zero) {
  const TlLists tl{v_tl, v_tl_scale, u_tl, u_tl_scale, u_tl_zero};
  return groups_impl("kbit_lowrank_matmul_groups_tl", x, v_q, v_scale, v_zero, u_q, u_scale, u_zero, s, bits, n, k,
                     group_size, &tl);
}

// The TL4 repack of one group's V (or, transposed, U^T) codes at load time (tl4_pack.h).
at::Tensor tl4_pack_cpu(const at::Tensor& q, int64_t bits, int64_t rows, int64_t length, int64_t group_size,
                        bool transposed) {
  const char* op = "tl4_pack";
  check_cpu(q, "q", 1, op);
  TORCH_CHECK(q.scalar_type() == at::kByte, op, ": q must be uint8, got ", q.scalar_type());
  TORCH_CHECK(bits == 1 || bits == 2, op, ": no TL4 layout for ", bits, "-bit codes (1 or 2 bits)");
  TORCH_CHECK(rows >= 0 && length >= 0, op, ": rows and length must be >= 0, got rows=", rows, " length=", length);
  TORCH_CHECK(group_size >= 1, op, ": group_size must be >= 1, got ", group_size);
  const int64_t need = (rows * length * bits + 7) / 8;
  TORCH_CHECK(q.numel() == need, op, ": ", rows, " x ", length, " codes of ", bits, " bits need ", need,
              " bytes, but q has ", q.numel());
  namespace lr = cpu::lowrank;
  const int64_t tiles = (rows + lr::kTlRows - 1) / lr::kTlRows;
  at::Tensor out = at::empty({tiles * lr::tl_groups(length, group_size) * 16 * bits}, q.options());
  cpu::tl4_pack(q.data_ptr<uint8_t>(), q.numel(), static_cast<int>(bits), rows, length, group_size, transposed,
                out.data_ptr<uint8_t>());
  return out;
}

}  // namespace
}  // namespace deltacomp

TORCH_LIBRARY_IMPL(deltacomp, CPU, m) {
  m.impl("kbit_lowrank_matmul", &deltacomp::kbit_lowrank_matmul_cpu);
  m.impl("kbit_lowrank_matmul_groups", &deltacomp::kbit_lowrank_matmul_groups_cpu);
  m.impl("kbit_lowrank_matmul_groups_tl", &deltacomp::kbit_lowrank_matmul_groups_tl_cpu);
  m.impl("tl4_pack", &deltacomp::tl4_pack_cpu);
}
