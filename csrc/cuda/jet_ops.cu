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

__device__ __forceinline__ float dexp(float x) { return ::expf(x); }
__device__ __forceinline__ double dexp(double x) { return ::exp(x); }
__device__ __forceinline__ float dtanh(float x) { return ::tanhf(x); }
__device__ __forceinline__ double dtanh(double x) { return ::tanh(x); }
__device__ __forceinline__ float dlog(float x) { return ::logf(x); }
__device__ __forceinline__ double dlog(double x) { return ::log(x); }
__device__ __forceinline__ float dlog1p(float x) { return ::log1pf(x); }
__device__ __forceinline__ double dlog1p(double x) { return ::log1p(x); }
__device__ __forceinline__ float dsin(float x) { return ::sinf(x); }
__device__ __forceinline__ double dsin(double x) { return ::sin(x); }
__device__ __forceinline__ float dcos(float x) { return ::cosf(x); }
__device__ __forceinline__ double dcos(double x) { return ::cos(x); }
__device__ __forceinline__ float derf(float x) { return ::erff(x); }
__device__ __forceinline__ double derf(double x) { return ::erf(x); }
__device__ __forceinline__ float dsqrt(float x) { return ::sqrtf(x); }
__device__ __forceinline__ double dsqrt(double x) { return ::sqrt(x); }

// The order-0 seeds of fn at u0 (table in ../jet_common.h).
template <typename A>
__device__ __forceinline__ void order0_seeds(int fn, A u0, A& s0, A& s1) {
  const A sig = A(1) / (A(1) + dexp(-u0));
  s1 = A(0);
  switch (fn) {
    case jet::kTanh: s0 = dtanh(u0); break;
    case jet::kSigmoid:
    case jet::kSilu: s0 = sig; break;
    case jet::kExp: s0 = dexp(u0); break;
    case jet::kLog: s0 = dlog(u0); break;
    case jet::kSoftplus:  // log(1 + e^u) without a threshold: its derivative is sigmoid(u)
      s0 = (u0 > A(0) ? u0 : A(0)) + dlog1p(dexp(-(u0 < A(0) ? -u0 : u0)));
      s1 = sig;
      break;
    case jet::kGelu:
      s0 = dexp(A(-0.5) * u0 * u0) * A(jet::kInvSqrt2Pi);
      s1 = A(0.5) * (A(1) + derf(u0 * A(jet::kInvSqrt2)));
      break;
    case jet::kGeluTanh: s0 = dtanh(A(jet::kGeluTanhC) * (u0 + A(0.044715) * u0 * u0 * u0)); break;
    case jet::kSin:
    case jet::kCos:
      s0 = dsin(u0);
      s1 = dcos(u0);
      break;
    case jet::kRelu: s0 = u0 > A(0) ? A(1) : A(0); break;
    case jet::kSquare: s0 = A(0); break;
    case jet::kReciprocal: s0 = A(1) / u0; break;
    case jet::kSqrt: s0 = dsqrt(u0); break;
    default: s0 = A(1) / dsqrt(u0); break;
  }
}

// JT: int, or std::integral_constant<int, J> (the per-thread series then live in registers).
template <typename scalar_t, typename JT>
__global__ void __launch_bounds__(kThreads)
    jet_kernel(const scalar_t* __restrict__ a, int64_t sa0, int64_t sa1,
               const scalar_t* __restrict__ b, int64_t sb0, int64_t sb1,
               scalar_t* __restrict__ out, int64_t N, JT Jt, int fn) {
  using A = acc_t<scalar_t>;
  const int J = Jt;
  A x[jet::kMaxCoeffs], y[jet::kMaxCoeffs], r[jet::kMaxCoeffs];
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t n = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; n < N;
       n += step) {
    for (int k = 0; k <= J; ++k) x[k] = static_cast<A>(a[k * sa0 + n * sa1]);
    if (b != nullptr) {  // jet_mul
      for (int k = 0; k <= J; ++k) y[k] = static_cast<A>(b[k * sb0 + n * sb1]);
      for (int k = 0; k <= J; ++k) r[k] = jet::cauchy(x, y, k);
    } else {
      A w2[jet::kMaxCoeffs], w3[jet::kMaxCoeffs], s0, s1;
      order0_seeds(fn, x[0], s0, s1);
      jet::unary_series<A>(fn, J, x, s0, s1, r, y, w2, w3);  // y is free: scratch
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
    jet::with_order(J, [&](auto Jt) {
      jet_kernel<scalar_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
          a.const_data_ptr<scalar_t>(), a.stride(0), a.stride(1),
          b ? b->const_data_ptr<scalar_t>() : nullptr, b ? b->stride(0) : 0,
          b ? b->stride(1) : 0, out.mutable_data_ptr<scalar_t>(), N, Jt, fn);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
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
