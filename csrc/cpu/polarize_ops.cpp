// CPU op polarize_contract: out[n] = sum_m gamma[m] * c[order, m, n]; argument checks, the
// output, and the kernel for this CPU's capability (polarize_kernels.cpp, kernels.h).
#include "../polarize_common.h"
#include "kernels.h"

#include <ATen/ops/empty.h>
#include <torch/library.h>

namespace taylor_kernels::cpu {
namespace {

at::Tensor polarize_contract_cpu(const at::Tensor& c, const at::Tensor& gamma, int64_t order) {
  check_polarize_args(c, gamma, order, "polarize_contract");
  TORCH_CHECK(c.device().is_cpu(), "polarize_contract (cpu kernel): c must be a CPU tensor");
  at::Tensor out = at::empty({c.size(2)}, c.options());
  if (out.numel() == 0) return out;
  const at::Tensor g = gamma.to(accumulation_dtype(c.scalar_type())).contiguous();
  TK_CPU_KERNEL(polarize_contract)(c.select(0, order), g, out);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(taylor_kernels, CPU, m) {
  m.impl("polarize_contract", &polarize_contract_cpu);
}

}  // namespace taylor_kernels::cpu
