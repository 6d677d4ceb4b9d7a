// Vectorized loop of ih_accumulate (formula in ../hessian_common.h), compiled once per CPU
// capability (kernels.h). One task per (touched input b, Hessian row r): it walks the chunk's
// points of b in ascending n, recomputes Delta once per run of points sharing a baseline k, and
// adds (w_n / K) Delta[index[r]] * hrows[n, r, :] * Delta into its own output row:
// deterministic, no atomics, vectors over D. Memory bound (reads count*R*D once).
#include "vec_io.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <memory>

namespace taylor_kernels::cpu::CPU_CAPABILITY {
namespace {

template <typename A>
void ih_tasks(const IhInputs& in, const PathShape& p, int64_t R, int64_t b_first, A* out,
              int64_t t0, int64_t t1) {
  using Vec = at::vec::Vectorized<A>;
  constexpr int64_t W = Vec::size();
  const A* h = in.hrows.const_data_ptr<A>();
  const A* x = in.x.const_data_ptr<A>();
  const A* bl = in.baselines.const_data_ptr<A>();
  const A* w = in.weights.const_data_ptr<A>();
  const int64_t* idx = in.index.const_data_ptr<int64_t>();
  const int64_t D = p.D, K = p.K, S = p.S, KS = K * S, end = p.start + p.count;
  const std::unique_ptr<A[]> delta(new A[D + W]);  // whole vectors fit
  A* dl = delta.get();
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t b = b_first + t / R, r = t % R, i = idx[r];
    A* o = out + (b * R + r) * D;
    const A* xr = x + b * D;
    int64_t n = std::max(p.start, b * KS);
    const int64_t n_end = std::min(end, (b + 1) * KS);
    while (n < n_end) {  // one run of points sharing the baseline k
      const int64_t q = n / S, k = q % K, run_end = std::min(n_end, (q + 1) * S);
      const A* br = bl + ((p.Bb > 1 ? b : 0) * K + k) * D;
      for_vectors<W>(D, [&](int64_t d, int64_t m) {
        (Vec::loadu(xr + d, m) - Vec::loadu(br + d, m)).store(dl + d);
      });
      for (int64_t s = n - q * S; n < run_end; ++n, ++s) {
        const Vec a(w[p.per_point ? n - p.start : s] / static_cast<A>(K) * dl[i]);
        const A* hr = h + ((n - p.start) * R + r) * D;
        for_vectors<W>(D, [&](int64_t d, int64_t m) {
          (Vec::loadu(o + d, m) + a * Vec::loadu(hr + d, m) * Vec::loadu(dl + d)).store(o + d, m);
        });
      }
    }
  }
}

}  // namespace

void ih_accumulate(const IhInputs& in, const PathShape& p, int64_t R, const at::Tensor& out) {
  int64_t b_first, nb;
  touched_rows(p, &b_first, &nb);
  const int64_t grain = std::max<int64_t>(1, (1 << 15) / std::max<int64_t>(1, p.D * p.count / nb));
  AT_DISPATCH_FLOATING_TYPES(in.acc, "ih_accumulate_cpu", [&] {
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, nb * R, grain, [&](int64_t t0, int64_t t1) {
      ih_tasks<scalar_t>(in, p, R, b_first, o, t0, t1);
    });
  });
}

}  // namespace taylor_kernels::cpu::CPU_CAPABILITY
