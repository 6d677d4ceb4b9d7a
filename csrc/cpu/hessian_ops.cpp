// CPU op ih_accumulate (formula in ../hessian_common.h): argument checks, input preparation,
// the output, and the kernel for this CPU's capability (hessian_kernels.cpp, kernels.h).
#include "kernels.h"

#include <ATen/ops/zeros.h>
#include <torch/library.h>

namespace taylor_kernels::cpu {
namespace {

at::Tensor ih_accumulate_cpu(const at::Tensor& hrows, const at::Tensor& x,
                             const at::Tensor& baselines, const at::Tensor& weights,
                             const at::Tensor& index, int64_t start) {
  const IhShape s = check_ih_args(hrows, x, baselines, weights, index, start);
  const PathShape& p = s.p;
  TORCH_CHECK(x.device().is_cpu(), "ih_accumulate (CPU kernel): expected CPU tensors, got ",
              x.device());
  const IhInputs in = prepare_ih_inputs(hrows, x, baselines, weights, index, p);
  TORCH_CHECK_VALUE(s.R == 0 || (in.index.min().item<int64_t>() >= 0 &&
                                 in.index.max().item<int64_t>() < p.D),
                    "ih_accumulate: index entries must lie in [0, ", p.D, ")");
  at::Tensor out = at::zeros({p.B, s.R, p.D}, in.x.options());
  if (p.count > 0 && p.D > 0 && s.R > 0) TK_CPU_KERNEL(ih_accumulate)(in, p, s.R, out);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(taylor_kernels, CPU, m) { m.impl("ih_accumulate", &ih_accumulate_cpu); }

}  // namespace taylor_kernels::cpu
