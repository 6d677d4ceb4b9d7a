// CUDA kernels of the jet ops, registered for the CUDA dispatch key.
//
// jet_unary(u [J+1, N], fn) -> [J+1, N] and jet_mul(a, b [J+1, N]) -> [J+1, N]: one thread per
// element (grid-stride), all J+1 orders in one pass with the recurrences of ../jet_common.h held
// in per-thread arrays. Consecutive threads read consecutive elements of each coefficient row
// (coalesced for row-major u); inputs are read through their strides, outputs are contiguous.
// Arithmetic in float (double for double inputs).
#include "../jet_common.h"
#include "../path_common.h"

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

constexpr int kThreads = 128;
constexpr int64_t kMaxBlocks = 1 << 16;

struct DevMath {
  static __device__ __forceinline__ float exp(float x) { return ::expf(x); }
  static __device__ __forceinline__ double exp(double x) { return ::exp(x); }
  static __device__ __forceinline__ float tanh(float x) { return ::tanhf(x); }
  static __device__ __forceinline__ double tanh(double x) { return ::tanh(x); }
  static __device__ __forceinline__ float log(float x) { return ::logf(x); }
  static __device__ __forceinline__ double log(double x) { return ::log(x); }
  static __device__ __forceinline__ float sin(float x) { return ::sinf(x); }
  static __device__ __forceinline__ double sin(double x) { return ::sin(x); }
  static __device__ __forceinline__ float cos(float x) { return ::cosf(x); }
  static __device__ __forceinline__ double cos(double x) { return ::cos(x); }
  static __device__ __forceinline__ float erf(float x) { return ::erff(x); }
  static __device__ __forceinline__ double erf(double x) { return ::erf(x); }
  static __device__ __forceinline__ float sqrt(float x) { return ::sqrtf(x); }
  static __device__ __forceinline__ double sqrt(double x) { return ::sqrt(x); }
  template <typename A>
  static __device__ __forceinline__ A sigmoid(A x) { return A(1) / (A(1) + exp(-x)); }
  template <typename A>
  static __device__ __forceinline__ A softplus(A x) {
    return (x > A(0) ? x : A(0)) + log(A(1) + exp(x > A(0) ? -x : x));
  }
  template <typename A>
  static __device__ __forceinline__ A positive(A x) { return x > A(0) ? A(1) : A(0); }
};

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    jet_kernel(const scalar_t* __restrict__ a, int64_t sa0, int64_t sa1,
               const scalar_t* __restrict__ b, int64_t sb0, int64_t sb1,
               scalar_t* __restrict__ out, int64_t N, int J, int fn) {
  using A = acc_t<scalar_t>;
  A x[jet::kMaxCoeffs], y[jet::kMaxCoeffs], r[jet::kMaxCoeffs];
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t n = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; n < N;
       n += step) {
    for (int k = 0; k <= J; ++k) x[k] = static_cast<A>(a[k * sa0 + n * sa1]);
    if (b != nullptr) {  // jet_mul
      for (int k = 0; k <= J; ++k) y[k] = static_cast<A>(b[k * sb0 + n * sb1]);
      for (int k = 0; k <= J; ++k) r[k] = jet::cauchy(x, y, k);
    } else {
      A w2[jet::kMaxCoeffs], w3[jet::kMaxCoeffs];
      jet::unary_series<A, DevMath>(fn, J, x, r, y, w2, w3);  // y is free: scratch
    }
    for (int k = 0; k <= J; ++k) out[k * N + n] = static_cast<scalar_t>(r[k]);
  }
}

void check_jet_tensor(const at::Tensor& u, const char* op, const char* name) {
  check_floating(u, op, name);
  TORCH_CHECK_VALUE(u.dim() == 2 && u.size(0) >= 1 && u.size(0) <= jet::kMaxCoeffs, op, ": ",
                    name, " must be [J+1, N] with 1 <= J+1 <= ", jet::kMaxCoeffs, ", got ",
                    u.sizes());
  TORCH_CHECK(u.is_cuda(), op, " (cuda kernel): ", name, " must be a CUDA tensor");
}

at::Tensor launch(const at::Tensor& a, const at::Tensor* b, int fn, const char* op) {
  const int64_t N = a.size(1);
  const int J = static_cast<int>(a.size(0) - 1);
  const c10::cuda::CUDAGuard guard(a.device());
  at::Tensor out = at::empty({J + 1, N}, a.options());
  if (N == 0) return out;
  const int64_t blocks = std::min<int64_t>((N + kThreads - 1) / kThreads, kMaxBlocks);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "jet_op", [&] {
    jet_kernel<scalar_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        a.const_data_ptr<scalar_t>(), a.stride(0), a.stride(1),
        b ? b->const_data_ptr<scalar_t>() : nullptr, b ? b->stride(0) : 0, b ? b->stride(1) : 0,
        out.mutable_data_ptr<scalar_t>(), N, J, fn);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor jet_unary_cuda(const at::Tensor& u, int64_t fn) {
  check_jet_tensor(u, "jet_unary", "u");
  TORCH_CHECK_VALUE(fn >= 0 && fn < jet::kNumFns, "jet_unary: fn code ", fn, " out of range [0, ",
                    int(jet::kNumFns), ")");
  return launch(u, nullptr, static_cast<int>(fn), "jet_unary");
}

at::Tensor jet_mul_cuda(const at::Tensor& a, const at::Tensor& b) {
  check_jet_tensor(a, "jet_mul", "a");
  check_jet_tensor(b, "jet_mul", "b");
  TORCH_CHECK_VALUE(a.sizes() == b.sizes() && a.scalar_type() == b.scalar_type() &&
                        a.device() == b.device(),
                    "jet_mul: a and b must have one shape, dtype and device, got ", a.sizes(),
                    " ", a.scalar_type(), " and ", b.sizes(), " ", b.scalar_type());
  return launch(a, &b, 0, "jet_mul");
}

}  // namespace

TORCH_LIBRARY_IMPL(taylor_kernels, CUDA, m) {
  m.impl("jet_unary", &jet_unary_cuda);
  m.impl("jet_mul", &jet_mul_cuda);
}

}  // namespace taylor_kernels
