// Declares every vitops op from the one schema list, vitops/ops/schemas.def. Kernels register themselves per
// dispatch key from csrc/cpu/ and csrc/cuda/; fake kernels, autograd and the Python backends are registered
// beside each public function in vitops/ops/.
#include <torch/library.h>

TORCH_LIBRARY(vitops, m) {
#define VITOPS_OP(schema) m.def(schema);
#include "../vitops/ops/schemas.def"
#undef VITOPS_OP
}

#ifdef TORCH_EXTENSION_NAME
#include <Python.h>
// `import vitops._C` only has to load this library so that the static registrations run. There are no Python
// bindings: every op is reached through torch.ops.vitops, which torch.compile can trace.
PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
#endif
