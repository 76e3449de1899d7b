// Ternary matmul on the TERNARY_CSR runtime form (see serve_kernels.h and deltacomp/ops.py).
// Raw pointers only, no torch.
//
// Each output row r is a sparse signed gather-add: positives first, then negatives, so no sign is
// decided inside the loops (the split is made once, when the runtime form is built):
//   y[i][r] = scale_r * (sum_{j in pos(r)} x[i][cols[j]] - sum_{j in neg(r)} x[i][cols[j]])
// x is given transposed (k, m): one gathered column feeds all m accumulators with contiguous loads.
#include <algorithm>
#include <vector>

#include "common.h"
#include "serve_kernels.h"

namespace deltacomp {
namespace cpu {
namespace {

// One x row: four independent partial sums hide the add latency of the gathers.
inline float gather_sum(const float* x, const int32_t* cols, int64_t begin, int64_t end) {
  float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f;
  int64_t j = begin;
  for (; j + 4 <= end; j += 4) {
    a0 += x[cols[j]];
    a1 += x[cols[j + 1]];
    a2 += x[cols[j + 2]];
    a3 += x[cols[j + 3]];
  }
  for (; j < end; ++j) a0 += x[cols[j]];
  return (a0 + a1) + (a2 + a3);
}

}  // namespace

void ternary_matmul_f32(const float* xt, int64_t m, int64_t k, const int64_t* row_ptr,
                        const int64_t* neg_start, const int32_t* cols, int64_t n, const float* scale,
                        bool per_row, float* y) {
  (void)k;
  if (m == 0 || n == 0) return;
  const int64_t work = m * row_ptr[n];
  if (m == 1) {
    for_each_index(n, 64, work, [&](int64_t r) {
      const float pos = gather_sum(xt, cols, row_ptr[r], neg_start[r]);
      const float neg = gather_sum(xt, cols, neg_start[r], row_ptr[r + 1]);
      y[r] = scale[per_row ? r : 0] * (pos - neg);
    });
    return;
  }
  region(work, [&] {
    std::vector<float> acc(static_cast<size_t>(m));  // one accumulator per x row, per thread
#pragma omp for schedule(dynamic, 16)
    for (int64_t r = 0; r < n; ++r) {
      std::fill(acc.begin(), acc.end(), 0.f);
      float* a = acc.data();
      for (int64_t j = row_ptr[r]; j < neg_start[r]; ++j) {
        const float* v = xt + static_cast<int64_t>(cols[j]) * m;
        for (int64_t i = 0; i < m; ++i) a[i] += v[i];
      }
      for (int64_t j = neg_start[r]; j < row_ptr[r + 1]; ++j) {
        const float* v = xt + static_cast<int64_t>(cols[j]) * m;
        for (int64_t i = 0; i < m; ++i) a[i] -= v[i];
      }
      const float s = scale[per_row ? r : 0];
      for (int64_t i = 0; i < m; ++i) y[i * n + r] = s * a[i];
    }
  });
}

}  // namespace cpu
}  // namespace deltacomp
