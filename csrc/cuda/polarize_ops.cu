// CUDA kernel of polarize_contract: out[n] = sum_m gamma[m] * c[order, m, n].
// One thread per n (grid-stride), m ascending: coalesced reads of each row of the [M, N] slice,
// deterministic. Memory bound: reads M*N elements, writes N.
#include "../polarize_common.h"

#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

namespace taylor_kernels {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 65535;

template <typename scalar_t>
__global__ void polarize_kernel(const scalar_t* __restrict__ src, int64_t sm, int64_t sn,
                                const acc_t<scalar_t>* __restrict__ w, int64_t M, int64_t N,
                                scalar_t* __restrict__ out) {
  using A = acc_t<scalar_t>;
  for (int64_t n = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; n < N;
       n += int64_t(gridDim.x) * blockDim.x) {
    A acc = 0;
    for (int64_t m = 0; m < M; ++m) acc += w[m] * static_cast<A>(src[m * sm + n * sn]);
    out[n] = static_cast<scalar_t>(acc);
  }
}

at::Tensor polarize_contract_cuda(const at::Tensor& c, const at::Tensor& gamma, int64_t order) {
  check_polarize_args(c, gamma, order, "polarize_contract");
  TORCH_CHECK(c.is_cuda(), "polarize_contract (cuda kernel): c must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(c.device());
  const int64_t M = c.size(1), N = c.size(2);
  at::Tensor out = at::empty({N}, c.options());
  if (N == 0) return out;
  const at::Tensor g = gamma.to(accumulation_dtype(c.scalar_type())).contiguous();
  const at::Tensor slice = c.select(0, order);
  const int64_t blocks = std::min<int64_t>((N + kThreads - 1) / kThreads, kMaxBlocks);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.scalar_type(), "polarize", [&] {
    polarize_kernel<scalar_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        slice.const_data_ptr<scalar_t>(), slice.stride(0), slice.stride(1),
        g.const_data_ptr<acc_t<scalar_t>>(), M, N, out.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(taylor_kernels, CUDA, m) {
  m.impl("polarize_contract", &polarize_contract_cuda);
}

}  // namespace taylor_kernels
