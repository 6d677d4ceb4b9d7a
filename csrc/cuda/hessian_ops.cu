// CUDA kernel of ih_accumulate (see csrc/hessian_common.h for the formula), registered for the
// CUDA dispatch key. One thread per (touched input b, Hessian row r, feature j): it walks the
// chunk's points of b in ascending n and accumulates (w_n / K) Delta_n[index[r]] h[n, r, j]
// Delta_n[j] in a register (ih_point_sum.h: deterministic, no atomics, no division per point).
// Consecutive threads read consecutive j of the same Hessian row: coalesced loads of the
// [count, R, D] stream, read once. index entries are range-checked in the kernel: an entry
// outside [0, D) gives a NaN output row.
#include "../hessian_common.h"
#include "ih_point_sum.h"

#include <ATen/Dispatch.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace taylor_kernels {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 1 << 16;  // grid-stride loops cover the rest

template <typename acc>
__global__ void __launch_bounds__(kThreads)
    ih_accumulate_kernel(const acc* __restrict__ h, const acc* __restrict__ x,
                         const acc* __restrict__ bl, const acc* __restrict__ w,
                         const int64_t* __restrict__ idx, acc* __restrict__ out, int64_t start,
                         int64_t count, int64_t R, int64_t D, int64_t K, int64_t S,
                         bool shared_bl, bool per_point, int64_t b_first, int64_t nb) {
  const int64_t items = nb * R * D;
  for (int64_t item = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; item < items;
       item += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t j = item % D, q = item / D, r = q % R, b = b_first + q / R;
    // An index outside [0, D) is checked here, not on the host (no sync per chunk): feature 0
    // is read instead (never out of bounds) and the output element becomes NaN.
    const int64_t i_r = idx[r];
    const bool valid = i_r >= 0 && i_r < D;
    const acc sum = ih_point_sum(h, x, bl, w, start, count, R, D, K, S, shared_bl, per_point, b,
                                 r, valid ? i_r : 0, j);
    out[(b * R + r) * D + j] = valid ? sum : static_cast<acc>(NAN);
  }
}

at::Tensor ih_accumulate_cuda(const at::Tensor& hrows, const at::Tensor& x,
                              const at::Tensor& baselines, const at::Tensor& weights,
                              const at::Tensor& index, int64_t start) {
  const IhShape s = check_ih_args(hrows, x, baselines, weights, index, start);
  const PathShape& p = s.p;
  TORCH_CHECK(x.is_cuda(), "ih_accumulate (CUDA kernel): expected CUDA tensors, got ",
              x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  const IhInputs in = prepare_ih_inputs(hrows, x, baselines, weights, index, p);
  at::Tensor out = at::zeros({p.B, s.R, p.D}, in.x.options());
  if (p.count == 0 || p.D == 0 || s.R == 0) return out;
  int64_t b_first, nb;
  touched_rows(p, &b_first, &nb);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t items = nb * s.R * p.D;
  const int64_t blocks = std::min((items + kThreads - 1) / kThreads, kMaxBlocks);
  AT_DISPATCH_FLOATING_TYPES(in.acc, "ih_accumulate_cuda", [&] {
    ih_accumulate_kernel<scalar_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        in.hrows.const_data_ptr<scalar_t>(), in.x.const_data_ptr<scalar_t>(),
        in.baselines.const_data_ptr<scalar_t>(), in.weights.const_data_ptr<scalar_t>(),
        in.index.const_data_ptr<int64_t>(), out.mutable_data_ptr<scalar_t>(), p.start, p.count,
        s.R, p.D, p.K, p.S, p.Bb == 1, p.per_point, b_first, nb);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(taylor_kernels, CUDA, m) { m.impl("ih_accumulate", &ih_accumulate_cuda); }

}  // namespace taylor_kernels
