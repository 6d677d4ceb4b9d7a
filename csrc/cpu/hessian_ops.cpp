// CPU kernel of ih_accumulate (see csrc/hessian_common.h for the formula), registered for the
// CPU dispatch key. One task per (touched input b, Hessian row r): it walks the chunk's points
// of b in ascending n, recomputes Delta once per run of points sharing a baseline k, and adds
// (w_n / K) Delta[index[r]] * hrows[n, r, :] * Delta into its own output row: deterministic,
// no atomics, inner loop over D vectorizable. Memory bound (reads count*R*D once).
#include "../hessian_common.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

namespace taylor_kernels {
namespace {

template <typename acc>
void ih_tasks(const IhInputs& in, const PathShape& p, int64_t R, int64_t b_first, acc* out,
              int64_t t0, int64_t t1) {
  const acc* h = in.hrows.const_data_ptr<acc>();
  const acc* x = in.x.const_data_ptr<acc>();
  const acc* bl = in.baselines.const_data_ptr<acc>();
  const acc* w = in.weights.const_data_ptr<acc>();
  const int64_t* idx = in.index.const_data_ptr<int64_t>();
  const int64_t D = p.D, K = p.K, S = p.S, KS = K * S, end = p.start + p.count;
  std::vector<acc> delta(D);
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t b = b_first + t / R, r = t % R, i = idx[r];
    acc* __restrict__ o = out + (b * R + r) * D;
    const acc* __restrict__ xr = x + b * D;
    int64_t n = std::max(p.start, b * KS);
    const int64_t n_end = std::min(end, (b + 1) * KS);
    while (n < n_end) {  // one run of points sharing the baseline k
      const int64_t q = n / S, k = q % K, run_end = std::min(n_end, (q + 1) * S);
      const acc* __restrict__ br = bl + ((p.Bb > 1 ? b : 0) * K + k) * D;
      acc* __restrict__ dl = delta.data();
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) dl[d] = xr[d] - br[d];
      for (int64_t s = n - q * S; n < run_end; ++n, ++s) {
        const acc c = w[p.per_point ? n - p.start : s] / static_cast<acc>(K);
        const acc a = c * dl[i];
        const acc* __restrict__ hr = h + ((n - p.start) * R + r) * D;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) o[d] += a * hr[d] * dl[d];
      }
    }
  }
}

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
  if (p.count == 0 || p.D == 0 || s.R == 0) return out;
  int64_t b_first, nb;
  touched_rows(p, &b_first, &nb);
  const int64_t grain = std::max<int64_t>(1, (1 << 15) / std::max<int64_t>(1, p.D * p.count / nb));
  AT_DISPATCH_FLOATING_TYPES(in.acc, "ih_accumulate_cpu", [&] {
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, nb * s.R, grain, [&](int64_t t0, int64_t t1) {
      ih_tasks<scalar_t>(in, p, s.R, b_first, o, t0, t1);
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(taylor_kernels, CPU, m) { m.impl("ih_accumulate", &ih_accumulate_cpu); }

}  // namespace taylor_kernels
