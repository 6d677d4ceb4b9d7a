// CPU kernel of polarize_contract: out[n] = sum_m gamma[m] * c[order, m, n].
// Memory bound (reads M*N, writes N): OpenMP over blocks of n, m ascending inside (deterministic,
// independent of the thread count), a contiguous inner loop over n that vectorizes.
#include "../polarize_common.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

namespace taylor_kernels {
namespace {

constexpr int64_t kBlock = 1024;  // n per tile: the accumulator row stays in L1

at::Tensor polarize_contract_cpu(const at::Tensor& c, const at::Tensor& gamma, int64_t order) {
  check_polarize_args(c, gamma, order, "polarize_contract");
  TORCH_CHECK(c.device().is_cpu(), "polarize_contract (cpu kernel): c must be a CPU tensor");
  const int64_t M = c.size(1), N = c.size(2);
  at::Tensor out = at::empty({N}, c.options());
  if (N == 0) return out;
  const at::Tensor g = gamma.to(accumulation_dtype(c.scalar_type())).contiguous();
  const at::Tensor slice = c.select(0, order);  // [M, N], any strides
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.scalar_type(), "polarize", [&] {
    using A = acc_t<scalar_t>;
    const scalar_t* src = slice.const_data_ptr<scalar_t>();
    const int64_t sm = slice.stride(0), sn = slice.stride(1);
    const A* w = g.const_data_ptr<A>();
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    const int64_t grain = std::max<int64_t>(1, (1 << 15) / std::max<int64_t>(M, 1));
    at::parallel_for(0, (N + kBlock - 1) / kBlock, std::max<int64_t>(1, grain / kBlock),
                     [&](int64_t b0, int64_t b1) {
      A acc[kBlock];
      for (int64_t blk = b0; blk < b1; ++blk) {
        const int64_t n0 = blk * kBlock, len = std::min(kBlock, N - n0);
        std::fill(acc, acc + len, A(0));
        for (int64_t m = 0; m < M; ++m) {
          const scalar_t* row = src + m * sm + n0 * sn;
          const A wm = w[m];
          if (sn == 1) {
            for (int64_t i = 0; i < len; ++i) acc[i] += wm * static_cast<A>(row[i]);
          } else {
            for (int64_t i = 0; i < len; ++i) acc[i] += wm * static_cast<A>(row[i * sn]);
          }
        }
        for (int64_t i = 0; i < len; ++i) dst[n0 + i] = static_cast<scalar_t>(acc[i]);
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(taylor_kernels, CPU, m) {
  m.impl("polarize_contract", &polarize_contract_cpu);
}

}  // namespace taylor_kernels
