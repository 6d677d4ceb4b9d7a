// CPU ops path_points and path_accumulate (formulas in path_kernels.cpp): argument checks,
// input preparation, the output, and the kernel for this CPU's capability (kernels.h).
#include "kernels.h"

#include <ATen/ops/zeros.h>
#include <torch/library.h>

namespace taylor_kernels::cpu {
namespace {

at::Tensor path_points_cpu(const at::Tensor& x, const at::Tensor& baselines,
                           const at::Tensor& alphas, int64_t start, int64_t count) {
  const PathShape p = check_path_args(x, baselines, alphas, start, count, "path_points", "alphas");
  TORCH_CHECK(x.device().is_cpu(), "path_points (CPU kernel): expected CPU tensors, got ",
              x.device());
  const PathInputs in = prepare_inputs(x, baselines, alphas, p);
  at::Tensor out = empty_huge_pages({count, p.D}, in.x.options());
  if (count > 0 && p.D > 0) TK_CPU_KERNEL(path_points)(in, p, out);
  // Mixed x / baselines dtypes were computed in the accumulation dtype: round like the reference.
  return out.scalar_type() == x.scalar_type() ? out : out.to(x.scalar_type());
}

at::Tensor path_accumulate_cpu(const at::Tensor& grads, const at::Tensor& x,
                               const at::Tensor& baselines, const at::Tensor& weights,
                               int64_t start) {
  const int64_t count = grads.dim() == 2 ? grads.size(0) : 0;
  const PathShape p =
      check_path_args(x, baselines, weights, start, count, "path_accumulate", "weights");
  TORCH_CHECK(x.device().is_cpu(), "path_accumulate (CPU kernel): expected CPU tensors, got ",
              x.device());
  const PathInputs in = prepare_inputs(x, baselines, weights, p);
  const at::Tensor g = prepare_grads(grads, p, in, "path_accumulate");
  at::Tensor out = at::zeros({p.B, p.D}, in.x.options().dtype(in.acc));
  if (count > 0 && p.D > 0) TK_CPU_KERNEL(path_accumulate)(g, in, p, out);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(taylor_kernels, CPU, m) {
  m.impl("path_points", &path_points_cpu);
  m.impl("path_accumulate", &path_accumulate_cpu);
}

}  // namespace taylor_kernels::cpu
