// The CPU kernels' entry points, compiled once per CPU capability, and the pick at run time.
//
// CMakeLists.txt compiles every csrc/cpu/*_kernels.cpp once per capability, as ATen compiles
// its own native/cpu kernels: DEFAULT (the baseline ISA) and, on x86-64, AVX2 and AVX512, with
// torch's -m flags and -DCPU_CAPABILITY=<name> -DCPU_CAPABILITY_<name>, so that
// at::vec::Vectorized is 256 / 512 bits wide there. A kernel TU defines its entry points in
// namespace taylor_kernels::cpu::CPU_CAPABILITY (one namespace per build: no symbol is shared
// between ISAs); TK_CPU_KERNEL(name) is the one for the capability ATen runs its own kernels
// with (at::get_cpu_capability(): the best the CPU has, or ATEN_CPU_CAPABILITY when set).
#pragma once

#include "../hessian_common.h"

#include <initializer_list>

namespace taylor_kernels::cpu {

// Entry points (inputs validated and prepared by the *_common.h helpers, outputs preallocated):
//   path_points      out [count, D] (work dtype) = the chunk's path points
//   path_accumulate  out [B, D] (accumulation dtype, zeros) += the chunk's sum; g [count, D]
//                    contiguous, work or accumulation dtype
//   ih_accumulate    out [B, R, D] (zeros) += the chunk's sum
//   jet_unary        out [J+1, N] contiguous = the jet of fn(u), u [J+1, N] any strides; seeds:
//                    order-0 values (../jet_common.h), contiguous [N] accumulation dtype, or undefined
//   jet_mul          out [J+1, N] contiguous = truncated Cauchy product of a and b (any strides)
//   polarize_contract  out [N] = sum_m gamma[m] * c[m, :], m ascending; c [M, N] any strides,
//                    gamma [M] contiguous accumulation dtype
#define TK_CPU_DECLARE_ALL(ns)                                                                  \
  namespace ns {                                                                                \
  void path_points(const PathInputs& in, const PathShape& p, const at::Tensor& out);            \
  void path_accumulate(const at::Tensor& g, const PathInputs& in, const PathShape& p,           \
                       const at::Tensor& out);                                                  \
  void ih_accumulate(const IhInputs& in, const PathShape& p, int64_t R, const at::Tensor& out); \
  void jet_unary(const at::Tensor& u, int fn, const at::Tensor& seed0, const at::Tensor& seed1, \
                 const at::Tensor& out);                                                        \
  void jet_mul(const at::Tensor& a, const at::Tensor& b, const at::Tensor& out);                \
  void polarize_contract(const at::Tensor& c, const at::Tensor& gamma, const at::Tensor& out);  \
  }
TK_CPU_DECLARE_ALL(DEFAULT)
#ifdef TK_CPU_X86
TK_CPU_DECLARE_ALL(AVX2)
TK_CPU_DECLARE_ALL(AVX512)
#define TK_CPU_KERNEL(name) (::taylor_kernels::cpu::pick({DEFAULT::name, AVX2::name, AVX512::name}))
#else
#define TK_CPU_KERNEL(name) (DEFAULT::name)
#endif
#undef TK_CPU_DECLARE_ALL

// ATen's CPU capability, limited to the builds above (read once): 0 DEFAULT, 1 AVX2, 2 AVX512.
int capability();
const char* capability_name();

template <typename F>
F* pick(std::initializer_list<F*> by_capability) {
  return by_capability.begin()[capability()];
}

// at::empty(sizes, options), with transparent huge pages asked for on the 2 MiB-aligned
// interior of a large buffer before its first touch: the page faults of a fresh buffer
// otherwise cost more than the memory-bound kernels writing it (torch's allocator does the same
// when THP_MEM_ALLOC_ENABLE=1). Harmless where THP is off.
at::Tensor empty_huge_pages(at::IntArrayRef sizes, const at::TensorOptions& options);

}  // namespace taylor_kernels::cpu
