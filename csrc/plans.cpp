// Layer plans: one patched linear layer's CPU forward, base matmul and delta term, in one call from Python.
//
// A decode step calls every patched layer once per token, and at small widths (SmolLM2-135M: 576-wide
// rows, 210 layers) the Python around the kernels costs as much as they do: a torch op call converts
// every argument (a svd-mixed layer passes 33 tensors in 11 lists), the module adds and reshapes with
// further op calls. A LayerPlan checks the layer's tensors once, when it is built, keeps them (and the raw
// pointers into them), and then serves x (..., K) -> y (..., N) with one Python call:
//
//   "torch":  y = linear(x, weight, bias) + term(x)   (the base by torch's at::linear, as the nn.Linear it
//             replaces computes it; the term by the op's raw kernel)
//   "own":    y = (x @ weight^T + bias) + term(x)     (one x row; the base by this extension's SIMD matvec,
//             simd8::dense_m1, which streams the weight faster than MKL's generic path on some CPUs)
//   "fused":  y = x @ (weight + delta)^T + bias       (bitdelta's sign_matmul_tl, one x row)
//   "rows":   as "torch", the term computed x row by x row (several rows: each row then takes the int8
//             tables, which serve one row; a few rows on small layers run faster so than the exact kernels)
//   then      y += extra                              (a tenant's bias delta, MultiDeltaLinear)
//
// "torch" and "fused" do the Python path's arithmetic (serve/modules.py with the term's op), so a call
// through such a plan returns the same values; "own" sums the base in another order (the serving module
// takes it where measured faster, as it takes a fused kernel). A call the plan does not serve returns None and the caller takes its Python
// path: x not a contiguous CPU tensor of K columns and a dtype the plan takes, autograd recording, a
// source tensor changed in place since the plan was built (a repack derived from it would be stale), or
// (fused, sign terms) more than one x row.
//
// This file is the extension module's init too (PYBIND11_MODULE): the ops themselves register through
// TORCH_LIBRARY (csrc/ops.cpp, csrc/cpu/*_ops.cpp) when the library loads.
#include <torch/extension.h>
#include <pybind11/stl.h>

#include <ATen/ops/linear.h>

#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "cpu/lowrank_kernels.h"
#include "cpu/lowrank_ops.h"
#include "cpu/serve_kernels.h"
#include "cpu/simd8.h"

namespace deltacomp {
namespace {

namespace py = pybind11;
using OptTensor = std::optional<at::Tensor>;

class LayerPlan {
 public:
  enum class Term { kLowrank, kSignTl };
  enum class Base { kTorch, kOwn, kFused };

  static Base base_mode(const char* op, const std::string& mode) {
    if (mode == "torch" || mode == "rows") return Base::kTorch;
    if (mode == "own") return Base::kOwn;
    TORCH_CHECK(mode == "fused", op, ": mode must be torch, own, fused or rows, got '", mode, "'");
    return Base::kFused;
  }

  // svd-mixed: the arguments of kbit_lowrank_matmul_groups(_tl) after x (tl: the five TL4 lists, or none)
  static std::shared_ptr<LayerPlan> lowrank(at::Tensor weight, OptTensor bias, OptTensor extra, std::string mode,
                                            std::vector<std::vector<at::Tensor>> lists, at::Tensor s,
                                            std::vector<int64_t> bits, int64_t n, int64_t k, int64_t group_size,
                                            std::optional<std::vector<std::vector<at::Tensor>>> tl) {
    const char* op = "LayerPlan.lowrank";
    TORCH_CHECK(lists.size() == 6, op, ": expected the six factor lists, got ", lists.size());
    const Base base = base_mode(op, mode);
    TORCH_CHECK(base != Base::kFused, op, ": a low-rank term has no fused pass (mode torch or own)");
    auto plan = std::make_shared<LayerPlan>(op, Term::kLowrank, base, std::move(weight), std::move(bias),
                                            std::move(extra), n, k);
    TlLists tls{};
    if (tl) {
      TORCH_CHECK(tl->size() == 5, op, ": expected the five TL4 lists, got ", tl->size());
      tls = TlLists{(*tl)[0], (*tl)[1], (*tl)[2], (*tl)[3], (*tl)[4]};
    }
    plan->groups_ = checked_groups(op, lists[0], lists[1], lists[2], lists[3], lists[4], lists[5], s, bits, n, k,
                                   group_size, tl ? &tls : nullptr);
    plan->group_size_ = group_size;
    plan->term_rows_ = mode == "rows";
    for (auto* ls : {&lists, tl ? &*tl : nullptr}) {
      if (ls == nullptr) continue;
      for (auto& l : *ls) plan->keep_.insert(plan->keep_.end(), l.begin(), l.end());
    }
    plan->keep_.push_back(s);
    return plan;
  }

  // bitdelta, one mask: s_tl the signs' TL4 repack (sign_tl_bytes(n, k) bytes) and scale, made from
  // `sources` (the SIGNS and the stored scale, whose in-place changes end the plan)
  static std::shared_ptr<LayerPlan> sign_tl(at::Tensor weight, OptTensor bias, OptTensor extra, std::string mode,
                                            at::Tensor s_tl, at::Tensor scale, std::vector<at::Tensor> sources,
                                            int64_t n, int64_t k) {
    const char* op = "LayerPlan.sign_tl";
    auto plan = std::make_shared<LayerPlan>(op, Term::kSignTl, base_mode(op, mode), std::move(weight), std::move(bias),
                                            std::move(extra), n, k);
    TORCH_CHECK(k > 0 && k % 4 == 0, op, ": k must be a positive multiple of 4, got ", k);
    TORCH_CHECK(s_tl.device().is_cpu() && s_tl.scalar_type() == at::kByte && s_tl.dim() == 1 && s_tl.is_contiguous()
                    && s_tl.numel() == cpu::sign_tl_bytes(n, k),
                op, ": s_tl must be contiguous CPU uint8 of ", cpu::sign_tl_bytes(n, k), " bytes for n=", n, ", k=", k,
                ", got ", s_tl.scalar_type(), " ", s_tl.sizes());
    TORCH_CHECK(scale.device().is_cpu() && scale.scalar_type() == at::kFloat && scale.is_contiguous() &&
                    (scale.numel() == 1 || (scale.dim() == 1 && scale.numel() == n)),
                op, ": scale must be contiguous CPU float32 of shape () / (1,) / (", n, ",), got ",
                scale.scalar_type(), " ", scale.sizes());
    plan->per_row_ = scale.numel() == n && scale.numel() != 1;
    plan->term_rows_ = mode == "rows";
    plan->s_tl_ = std::move(s_tl);
    plan->scale_ = std::move(scale);
    for (auto& t : sources) plan->sources_.emplace_back(t, t._version());
    return plan;
  }

  LayerPlan(const char* op, Term term, Base base, at::Tensor weight, OptTensor bias, OptTensor extra, int64_t n,
            int64_t k)
      : term_(term), base_(base), weight_(std::move(weight)), n_(n), k_(k) {
    TORCH_CHECK(n >= 0 && k >= 0, op, ": n and k must be >= 0, got n=", n, " k=", k);
    const auto wt = weight_.scalar_type();
    TORCH_CHECK(weight_.device().is_cpu() && weight_.dim() == 2 && weight_.size(0) == n && weight_.size(1) == k,
                op, ": weight must be a CPU (", n, ", ", k, ") tensor, got ", weight_.device(), " ", weight_.sizes());
    TORCH_CHECK(base == Base::kTorch || ((wt == at::kFloat || wt == at::kBFloat16) && weight_.is_contiguous()), op,
                ": modes own and fused take a contiguous float32 or bfloat16 weight, got ", wt);
    for (auto* t : {&bias, &extra}) {
      TORCH_CHECK(!*t || ((*t)->device().is_cpu() && (*t)->dim() == 1 && (*t)->numel() == n), op,
                  ": bias and extra must be CPU (", n, ",) tensors, got ", (*t)->sizes());
    }
    bias_ = bias ? *bias : at::Tensor();
    extra_ = extra ? *extra : at::Tensor();
  }

  // y (..., N) for x (..., K), or None where the plan does not serve x (see the top of this file)
  OptTensor run(const at::Tensor& x) const {
    if (!serves(x)) return std::nullopt;
    const int64_t m = x.numel() / k_;
    const at::Tensor x2 = x.view({m, k_});
    const auto xt = x.scalar_type();
    at::Tensor y;
    if (base_ == Base::kFused) {
      y = at::empty({1, n_}, x.options().dtype(at::kFloat));
      if (!sign_fused(x2, y)) return std::nullopt;
      if (xt != at::kFloat) y = y.to(xt);
      if (bias_.defined()) add(y, bias_);
    } else {
      if (base_ == Base::kOwn) {
        y = at::empty({1, n_}, x.options().dtype(at::kFloat));
        own_base(x2, y);
        if (bias_.defined()) add(y, bias_);
        if (xt != at::kFloat) y = y.to(xt);
      } else {
        y = at::linear(x2, weight_, bias_.defined() ? std::optional<at::Tensor>(bias_) : std::nullopt);
      }
      at::Tensor t = at::empty({m, n_}, x.options().dtype(at::kFloat));
      if (!term(x2, t)) return std::nullopt;
      add(y, xt == at::kFloat ? t : t.to(xt));
    }
    if (extra_.defined()) add(y, extra_);
    std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
    shape.back() = n_;
    return y.view(shape);
  }

  // false once a source tensor changed in place since the plan was built (its derived data is stale)
  bool current() const {
    for (const auto& [t, version] : sources_) {
      if (t._version() != version) return false;
    }
    return true;
  }

  std::string repr() const {
    static const char* const kModes[] = {"torch", "own", "fused"};
    return std::string("LayerPlan(") + (term_ == Term::kLowrank ? "lowrank" : "sign_tl") + ", " +
           (term_rows_ ? "rows" : kModes[static_cast<int>(base_)]) + ", n=" + std::to_string(n_) +
           ", k=" + std::to_string(k_) + ")";
  }

 private:
  bool serves(const at::Tensor& x) const {
    if (!x.device().is_cpu() || x.layout() != at::kStrided || x.dim() < 1 || x.size(-1) != k_ || !x.is_contiguous() ||
        x.numel() == 0)
      return false;
    const auto xt = x.scalar_type();
    if (base_ == Base::kFused ? (xt != at::kFloat && xt != at::kBFloat16 && xt != at::kHalf)
                              : xt != weight_.scalar_type())
      return false;
    // sign_matmul_tl (but row by row) and the own matvec: one x row
    if ((base_ != Base::kTorch || (term_ == Term::kSignTl && !term_rows_)) && x.numel() != k_) return false;
    if (at::GradMode::is_enabled() &&
        (x.requires_grad() || weight_.requires_grad() || (bias_.defined() && bias_.requires_grad())))
      return false;  // autograd records the Python path's ops
    return current();
  }

  // the term alone into t (m, n) fp32
  bool term(const at::Tensor& x2, at::Tensor& t) const {
    const int64_t m = x2.size(0), rows = term_rows_ ? m : 1, per = m / rows;  // kernel calls, rows per call
    if (term_ == Term::kSignTl && per != 1) return false;
    const at::Tensor xf = x2.scalar_type() == at::kFloat ? x2 : x2.to(at::kFloat);
    const float* xp = xf.data_ptr<float>();
    float* tp = t.data_ptr<float>();
    for (int64_t i = 0; i < rows; ++i) {
      if (term_ == Term::kSignTl) {
        if (!cpu::sign_matmul_tl<float>(xp + i * k_, k_, nullptr, s_tl_.data_ptr<uint8_t>(), n_,
                                        scale_.data_ptr<float>(), per_row_, tp + i * n_))
          return false;
      } else {
        cpu::kbit_lowrank_matmul_groups_f32(xp + i * per * k_, per, k_, n_, group_size_, groups_.data(),
                                            static_cast<int64_t>(groups_.size()), tp + i * per * n_);
      }
    }
    return true;
  }

  // y (1, n) fp32 = x2 (1, k) @ weight^T by simd8::dense_m1 on the active code path
  void own_base(const at::Tensor& x2, at::Tensor& y) const {
    const at::Tensor xf = x2.scalar_type() == at::kFloat ? x2 : x2.to(at::kFloat);
    const cpu::Isa active = cpu::active_isa();  // (simd8 has no AVX-512 body: AVX-512 CPUs take the AVX2 one)
    const cpu::Isa isa = active == cpu::Isa::kAvx512 ? cpu::Isa::kAvx2 : active;
    if (weight_.scalar_type() == at::kBFloat16) {
      const auto* w = reinterpret_cast<const uint16_t*>(weight_.data_ptr<at::BFloat16>());
      cpu::simd8::dense_m1(isa, xf.data_ptr<float>(), k_, w, n_, y.data_ptr<float>());
    } else {
      cpu::simd8::dense_m1(isa, xf.data_ptr<float>(), k_, weight_.data_ptr<float>(), n_, y.data_ptr<float>());
    }
  }

  // the fused pass: sign_matmul_tl with the base weight into y (1, n) fp32
  bool sign_fused(const at::Tensor& x2, at::Tensor& y) const {
    const at::Tensor xf = x2.scalar_type() == at::kFloat ? x2 : x2.to(at::kFloat);
    const float* xp = xf.data_ptr<float>();
    const uint8_t* s = s_tl_.data_ptr<uint8_t>();
    const float* sc = scale_.data_ptr<float>();
    if (weight_.scalar_type() == at::kBFloat16) {
      const auto* w = reinterpret_cast<const uint16_t*>(weight_.data_ptr<at::BFloat16>());
      return cpu::sign_matmul_tl<uint16_t>(xp, k_, w, s, n_, sc, per_row_, y.data_ptr<float>());
    }
    return cpu::sign_matmul_tl<float>(xp, k_, weight_.data_ptr<float>(), s, n_, sc, per_row_, y.data_ptr<float>());
  }

  // y (m, n) += v, v (m, n) or (n,) (broadcast over the rows): y + v as torch computes it
  static void add(at::Tensor& y, const at::Tensor& v) {
    if (y.scalar_type() == at::kFloat && v.scalar_type() == at::kFloat && y.is_contiguous() && v.is_contiguous()) {
      float* yp = y.data_ptr<float>();
      const float* vp = v.data_ptr<float>();
      const int64_t total = y.numel(), len = v.numel();
      for (int64_t i = 0; i < total; i += len) {
        for (int64_t j = 0; j < len; ++j) yp[i + j] += vp[j];
      }
      return;
    }
    y.add_(v.scalar_type() == y.scalar_type() ? v : v.to(y.scalar_type()));
  }

  Term term_;
  Base base_;
  at::Tensor weight_, bias_, extra_;
  int64_t n_, k_;
  // lowrank
  std::vector<cpu::KbitGroup> groups_;
  int64_t group_size_ = 1;
  std::vector<at::Tensor> keep_;  // the tensors groups_ points into
  // sign_tl
  at::Tensor s_tl_, scale_;
  bool per_row_ = false;
  bool term_rows_ = false;  // mode "rows": the term x row by x row
  std::vector<std::pair<at::Tensor, uint32_t>> sources_;  // (tensor, its version when the plan was built)
};

}  // namespace
}  // namespace deltacomp

PYBIND11_MODULE(_C, m) {
  namespace py = pybind11;
  using deltacomp::LayerPlan;
  m.doc() = "deltacomp native ops (torch.ops.deltacomp) and layer plans";
  py::class_<LayerPlan, std::shared_ptr<LayerPlan>>(
      m, "LayerPlan", "One patched linear layer's CPU forward in one call (csrc/plans.cpp; built by deltacomp.plans)")
      .def_static("lowrank", &LayerPlan::lowrank, py::arg("weight"), py::arg("bias"), py::arg("extra"),
                  py::arg("mode"), py::arg("lists"), py::arg("s"), py::arg("bits"), py::arg("n"), py::arg("k"),
                  py::arg("group_size"), py::arg("tl"))
      .def_static("sign_tl", &LayerPlan::sign_tl, py::arg("weight"), py::arg("bias"), py::arg("extra"),
                  py::arg("mode"), py::arg("s_tl"), py::arg("scale"), py::arg("sources"), py::arg("n"),
                  py::arg("k"))
      .def("__call__", &LayerPlan::run, py::arg("x"), py::call_guard<py::gil_scoped_release>())
      .def("current", &LayerPlan::current)
      .def("__repr__", &LayerPlan::repr);
}
