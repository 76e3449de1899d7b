// The input checks of kbit_lowrank_matmul_groups(_tl), shared with the layer plans (csrc/plans.cpp), which
// check a layer's groups once when the plan is built instead of on every call.
#pragma once
#include <ATen/core/Tensor.h>

#include <vector>

#include "lowrank_kernels.h"

namespace deltacomp {

// The TL4 repacks of the groups (kbit_lowrank_matmul_groups_tl), per group: v_tl / v_tl_scale empty, or,
// for 1 and 2 bits and group_size % 4 == 0, uint8 (tiles(r) * tl_groups(k, gs) * 16 * bits,) and fp16
// (tiles(r), ceil(k / gs), 32); u_tl / u_tl_scale / u_tl_zero empty, or, for 1 and 2 bits and
// group_size % 32 == 0, uint8 (tiles(n) * tl_groups(r, r) * 16 * bits,) and fp16 (ceil(n / gs), r) twice.
struct TlLists {
  at::TensorList v_tl, v_tl_scale, u_tl, u_tl_scale, u_tl_zero;
};

// Every bit-width group of a layer: list entry g is group g (its rank r_g = v_scale[g].size(0), 0 for an
// empty group), s the groups' singular values one after the other; tl nullptr, or the TL4 repacks.
// Checks every tensor (messages name the op, the tensor and the values) and returns the raw groups, whose
// pointers are valid while the tensors live.
std::vector<cpu::KbitGroup> checked_groups(const char* op, at::TensorList v_q, at::TensorList v_scale,
                                           at::TensorList v_zero, at::TensorList u_q, at::TensorList u_scale,
                                           at::TensorList u_zero, const at::Tensor& s, at::IntArrayRef bits,
                                           int64_t n, int64_t k, int64_t group_size, const TlLists* tl);

}  // namespace deltacomp
