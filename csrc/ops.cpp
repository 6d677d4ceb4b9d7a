// The extension module taylor_kernels._C: the op schemas (defined once, here) and the module
// object. Kernels are registered per dispatch key in csrc/cpu/*.cpp and csrc/cuda/*.cu;
// fake kernels and autograd formulas are registered from Python (taylor_kernels/ops/path.py).
// The module object uses only Python's stable ABI (Py_LIMITED_API, set in CMakeLists.txt), so
// no pybind11 and no libtorch_python: one _C.abi3.so serves every CPython >= 3.10.
#include <Python.h>

#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu/kernels.h"

TORCH_LIBRARY(taylor_kernels, m) {
  // Fake kernels live in this Python module (imported on demand by fake-tensor tracing).
  m.set_python_module("taylor_kernels.ops.path");
  // x [B, D], baselines [Bb, K, D] (Bb in {1, B}), alphas [S] or [B, K, S] -> [count, D] x.dtype
  // start/count are SymInts: torch.compile traces them symbolically (one graph for every
  // chunk; an int is specialized per value); the kernels take them as int64_t.
  m.def("path_points(Tensor x, Tensor baselines, Tensor alphas, SymInt start, SymInt count) "
        "-> Tensor",
        {at::Tag::pt2_compliant_tag});
  // grads [count, D], x, baselines, weights [S] or [B, K, S] -> [B, D] accumulation dtype
  m.def("path_accumulate(Tensor grads, Tensor x, Tensor baselines, Tensor weights, "
        "SymInt start) -> Tensor",
        {at::Tag::pt2_compliant_tag});
}

// Jet ops: fake kernels and autograd in taylor_kernels/ops/jet.py.
TORCH_LIBRARY_FRAGMENT(taylor_kernels, m) {
  m.set_python_module("taylor_kernels.ops.jet");
  // u [J+1, N] normalized Taylor coefficients, fn a code of reference/jet.py FNS -> [J+1, N]
  m.def("jet_unary(Tensor u, int fn) -> Tensor", {at::Tag::pt2_compliant_tag});
  // a, b [J+1, N] -> truncated Cauchy product [J+1, N]
  m.def("jet_mul(Tensor a, Tensor b) -> Tensor", {at::Tag::pt2_compliant_tag});
  // c [J+1, M, N] directional jets, gamma [M] -> [N] = sum_m gamma[m] c[order, m, :]
  m.def("polarize_contract(Tensor c, Tensor gamma, int order) -> Tensor",
        {at::Tag::pt2_compliant_tag});
}

// A fragment per op family whose fake kernels live in another Python module: torch requires
// register_fake to be called from the module the schema's set_python_module names.
TORCH_LIBRARY_FRAGMENT(taylor_kernels, m) {
  m.set_python_module("taylor_kernels.ops.hessian");
  // hrows [count, R, D], x, baselines, weights, index [R] int64 -> [B, R, D] accumulation dtype
  // (Integrated Hessians; fake kernel and autograd in taylor_kernels/ops/hessian.py)
  m.def("ih_accumulate(Tensor hrows, Tensor x, Tensor baselines, Tensor weights, Tensor index, "
        "SymInt start) -> Tensor",
        {at::Tag::pt2_compliant_tag});
}

namespace {

PyObject* built_with_cuda(PyObject*, PyObject*) {
#ifdef TK_WITH_CUDA
  Py_RETURN_TRUE;
#else
  Py_RETURN_FALSE;
#endif
}

PyObject* cpu_threads(PyObject*, PyObject*) { return PyLong_FromLong(at::get_num_threads()); }

PyObject* cpu_capability(PyObject*, PyObject*) {
  return PyUnicode_FromString(taylor_kernels::cpu::capability_name());
}

PyMethodDef tk_methods[] = {
    {"built_with_cuda", built_with_cuda, METH_NOARGS,
     "True when the CUDA kernels were compiled into this extension."},
    {"cpu_threads", cpu_threads, METH_NOARGS,
     "Threads the CPU kernels use (torch's intra-op thread count)."},
    {"cpu_capability", cpu_capability, METH_NOARGS,
     "ISA the CPU kernels run with: DEFAULT, AVX2 or AVX512 (ATen's, csrc/cpu/kernels.h)."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef tk_module = {PyModuleDef_HEAD_INIT, "_C",
                         "taylor_kernels native kernels (registers torch.ops.taylor_kernels.*)",
                         -1, tk_methods};

}  // namespace

// Importing the module runs the TORCH_LIBRARY registrations above (static initialisers).
PyMODINIT_FUNC PyInit__C() { return PyModule_Create(&tk_module); }
