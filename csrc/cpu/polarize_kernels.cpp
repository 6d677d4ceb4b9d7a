// Vectorized loop of polarize_contract, out[n] = sum_m gamma[m] * c[m, n], compiled once per
// CPU capability (kernels.h). Memory bound (reads M*N, writes N): threads over blocks of n,
// m ascending inside (deterministic, independent of the thread count), vectors over n.
#include "vec_io.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>

namespace taylor_kernels::cpu::CPU_CAPABILITY {
namespace {

constexpr int64_t kBlock = 1024;  // n per tile: the accumulator row stays in L1

template <typename T>
void polarize_blocks(const at::Tensor& c, const acc_t<T>* w, T* dst, int64_t b0, int64_t b1) {
  using A = acc_t<T>;
  using Vec = VecA<T>;
  constexpr int64_t W = Vec::size();
  const T* src = c.const_data_ptr<T>();
  const int64_t M = c.size(0), N = c.size(1), sm = c.stride(0), sn = c.stride(1);
  __at_align__ A acc[kBlock];
  for (int64_t blk = b0; blk < b1; ++blk) {
    const int64_t n0 = blk * kBlock, len = std::min(kBlock, N - n0);
    for_vectors<W>(len, [&](int64_t d, int64_t) { Vec(0).store(acc + d); });
    for (int64_t m = 0; m < M; ++m) {
      const T* row = src + m * sm + n0 * sn;
      if (sn == 1) {
        const Vec wm(w[m]);
        for_vectors<W>(len, [&](int64_t d, int64_t k) {
          (Vec::loadu(acc + d) + wm * load(row + d, k)).store(acc + d);
        });
      } else {
        for (int64_t i = 0; i < len; ++i) acc[i] += w[m] * static_cast<A>(row[i * sn]);
      }
    }
    for_vectors<W>(len, [&](int64_t d, int64_t k) { store(dst + n0 + d, Vec::loadu(acc + d), k); });
  }
}

}  // namespace

void polarize_contract(const at::Tensor& c, const at::Tensor& gamma, const at::Tensor& out) {
  const int64_t M = c.size(0), N = c.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.scalar_type(), "polarize", [&] {
    const auto* w = gamma.const_data_ptr<acc_t<scalar_t>>();
    auto* dst = out.mutable_data_ptr<scalar_t>();
    const int64_t grain = std::max<int64_t>(1, (1 << 15) / std::max<int64_t>(M, 1));
    at::parallel_for(0, (N + kBlock - 1) / kBlock, std::max<int64_t>(1, grain / kBlock),
                     [&](int64_t b0, int64_t b1) {
                       polarize_blocks<scalar_t>(c, w, dst, b0, b1);
                     });
  });
}

}  // namespace taylor_kernels::cpu::CPU_CAPABILITY
