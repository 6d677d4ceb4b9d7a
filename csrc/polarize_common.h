// Shared host-side check of polarize_contract (CPU and CUDA):
//   c [J+1, M, N] directional jets, gamma [M] polarization weights, 0 <= order <= J
//   out[n] = sum_m gamma[m] * c[order, m, n]   (accumulation dtype, ascending m)
#pragma once

#include "path_common.h"

namespace taylor_kernels {

inline void check_polarize_args(const at::Tensor& c, const at::Tensor& gamma, int64_t order,
                                const char* op) {
  check_floating(c, op, "c");
  check_floating(gamma, op, "gamma");
  TORCH_CHECK_VALUE(c.dim() == 3, op, ": c must be [J+1, M, N], got ", c.sizes());
  TORCH_CHECK_VALUE(gamma.dim() == 1 && gamma.size(0) == c.size(1), op, ": gamma must be [M] = [",
                    c.size(1), "], got ", gamma.sizes());
  TORCH_CHECK_VALUE(order >= 0 && order < c.size(0), op, ": order ", order,
                    " outside the jets' orders [0, ", c.size(0) - 1, "]");
  TORCH_CHECK(c.device() == gamma.device(), op, ": c and gamma must be on the same device");
}

}  // namespace taylor_kernels
