// Operator schemas of torch.ops.deltacomp.*, declared once here; the kernels register per backend
// (csrc/cpu/*.cpp: CPU, csrc/cuda/*.cu: CUDA) and the fake (meta) kernels live in deltacomp/ops.py.
//
// Layouts are documented in deltacomp/ops.py. SIGNS: uint8 (N, ceil(K/8)); bit i (LSB = 0) of byte j
// is element 8*j + i of the row; 1 means value >= 0 (+1), 0 means value < 0 (-1); pad bits are 0.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(deltacomp, m) {
  // x float32 (N, K) -> SIGNS uint8 (N, ceil(K/8))
  m.def("pack_signs(Tensor x) -> Tensor");
  // SIGNS uint8 (N, ceil(k/8)) -> float32 (N, k) of +1/-1
  m.def("unpack_signs(Tensor packed, int k) -> Tensor");
  // y (M, N) = x (M, K) @ (scale * sign)^T; x fp32/bf16/fp16 (accumulated in fp32, y in x.dtype),
  // packed SIGNS (N, ceil(k/8)), scale fp32 () / (1,) per tensor or (N,) per output row
  m.def("sign_matmul(Tensor x, Tensor packed, Tensor scale, int k) -> Tensor");
}

// `from deltacomp import _C` only has to load this library (which runs the registrations above); the
// module itself is empty, so no pybind11 is needed.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", "deltacomp native ops (torch.ops.deltacomp)",
                                   -1, nullptr, nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&def);
}
