// The CPU kernels' entry points, compiled once per CPU capability, and the pick at run time.
//
// CMakeLists.txt compiles every csrc/cpu/*_kernels.cpp once per capability, as ATen compiles
// its own native/cpu kernels: DEFAULT (the baseline ISA) and, on x86-64, AVX2 and AVX512, with
// torch's -m flags and -DCPU_CAPABILITY=<name> -DCPU_CAPABILITY_<name>, so that
// at::vec::Vectorized is 256 / 512 bits wide there. A kernel TU defines its entry points in
// namespace taylor_kernels::cpu::CPU_CAPABILITY (one namespace per build: no symbol is shared
// between ISAs); TK_CPU_KERNEL(name) is the one for the capability ATen runs its own kernels
// with (at::get_cpu_capability(): the best the CPU has, or ATEN_CPU_CAPABILITY when set).
// Entry points take validated, prepared inputs (the *_common.h helpers) and a preallocated out.
#pragma once

#include "../hessian_common.h"

namespace taylor_kernels::cpu {

// out [count, D] (work dtype) = the chunk's path points.
using PathPointsFn = void(const PathInputs& in, const PathShape& p, const at::Tensor& out);
// out [B, D] (accumulation dtype, zeros) = the chunk's path_accumulate; g [count, D] contiguous,
// work or accumulation dtype.
using PathAccumulateFn = void(const at::Tensor& g, const PathInputs& in, const PathShape& p,
                              const at::Tensor& out);
// out [B, R, D] (zeros) = the chunk's ih_accumulate.
using IhAccumulateFn = void(const IhInputs& in, const PathShape& p, int64_t R,
                            const at::Tensor& out);
// out [J+1, N] contiguous = the jet of fn(u), u [J+1, N] any strides; seed0 / seed1 are the
// order-0 values (../jet_common.h) as contiguous [N] accumulation-dtype tensors, or undefined.
using JetUnaryFn = void(const at::Tensor& u, int fn, const at::Tensor& seed0,
                        const at::Tensor& seed1, const at::Tensor& out);
// out [J+1, N] contiguous = the truncated Cauchy product of a and b (any strides).
using JetMulFn = void(const at::Tensor& a, const at::Tensor& b, const at::Tensor& out);
// out [N] = sum_m gamma[m] * c[m, :] (m ascending); c [M, N] any strides, gamma [M]
// contiguous in the accumulation dtype.
using PolarizeFn = void(const at::Tensor& c, const at::Tensor& gamma, const at::Tensor& out);

#define TK_CPU_DECLARE_ALL(ns)                 \
  namespace ns {                               \
  PathPointsFn path_points;                    \
  PathAccumulateFn path_accumulate;            \
  IhAccumulateFn ih_accumulate;                \
  JetUnaryFn jet_unary;                        \
  JetMulFn jet_mul;                            \
  PolarizeFn polarize_contract;                \
  }
TK_CPU_DECLARE_ALL(DEFAULT)
#ifdef TK_CPU_X86
TK_CPU_DECLARE_ALL(AVX2)
TK_CPU_DECLARE_ALL(AVX512)
#define TK_CPU_KERNEL(name) \
  (::taylor_kernels::cpu::pick(DEFAULT::name, AVX2::name, AVX512::name))
#else
#define TK_CPU_KERNEL(name) (DEFAULT::name)
#endif
#undef TK_CPU_DECLARE_ALL

enum class Capability { kDefault, kAvx2, kAvx512 };

// ATen's CPU capability, limited to the builds above (read once).
Capability capability();
const char* capability_name();

template <typename F>
F* pick(F* fallback, F* avx2, F* avx512) {
  switch (capability()) {
    case Capability::kAvx512: return avx512;
    case Capability::kAvx2: return avx2;
    default: return fallback;
  }
}

// at::empty(sizes, options), with transparent huge pages asked for on the 2 MiB-aligned
// interior of a large buffer before its first touch: the page faults of a fresh buffer
// otherwise cost more than the memory-bound kernels writing it (torch's allocator does the same
// when THP_MEM_ALLOC_ENABLE=1). Harmless where THP is off.
at::Tensor empty_huge_pages(at::IntArrayRef sizes, const at::TensorOptions& options);

}  // namespace taylor_kernels::cpu
