// CPU (OpenMP) kernels of the jet ops, registered for the CPU dispatch key.
//
// jet_unary(u [J+1, N], fn) -> [J+1, N]: coefficients of fn(u(t)), all orders in one pass per
//   element (recurrences in ../jet_common.h).
// jet_mul(a [J+1, N], b [J+1, N]) -> [J+1, N]: c_k = sum_{j<=k} a_j b_{k-j}.
// Elements are processed kLanes at a time as GCC vectors (SIMD over N, the recurrences' loops
// over orders run on whole vectors); OpenMP threads split N. Inputs are read through their
// strides; outputs are contiguous. Arithmetic in float (double for double inputs).
#include "../jet_common.h"
#include "../path_common.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace taylor_kernels {
namespace {

constexpr int64_t kVectorBytes = 64;
constexpr int64_t kMinParallelElems = 4096;

template <typename A>
struct Lanes {
  static constexpr int W = kVectorBytes / sizeof(A);
  typedef A V __attribute__((vector_size(kVectorBytes)));
};

// Order-0 elementary functions, lane by lane (only order 0 needs them).
template <typename A>
struct VecMath {
  using V = typename Lanes<A>::V;
  static constexpr int W = Lanes<A>::W;
  template <typename F>
  static V map(V x, F f) {
    V r;
    for (int l = 0; l < W; ++l) r[l] = f(x[l]);
    return r;
  }
  static V exp(V x) { return map(x, [](A v) { return std::exp(v); }); }
  static V tanh(V x) { return map(x, [](A v) { return std::tanh(v); }); }
  static V log(V x) { return map(x, [](A v) { return std::log(v); }); }
  static V sin(V x) { return map(x, [](A v) { return std::sin(v); }); }
  static V cos(V x) { return map(x, [](A v) { return std::cos(v); }); }
  static V erf(V x) { return map(x, [](A v) { return std::erf(v); }); }
  static V sqrt(V x) { return map(x, [](A v) { return std::sqrt(v); }); }
  static V sigmoid(V x) { return map(x, [](A v) { return A(1) / (A(1) + std::exp(-v)); }); }
  static V softplus(V x) {
    return map(x, [](A v) { return std::max(v, A(0)) + std::log1p(std::exp(-std::abs(v))); });
  }
  static V positive(V x) { return map(x, [](A v) { return v > A(0) ? A(1) : A(0); }); }
};

template <typename T>
inline acc_t<T> load(T v) {
  return static_cast<acc_t<T>>(v);
}

// Elements [n0, n1) of one jet op: gathers kLanes elements' coefficients into vectors, runs
// op(in0, in1, out) on them and scatters the valid lanes.
template <typename scalar_t, typename Op>
void run_lanes(const scalar_t* a, int64_t sa0, int64_t sa1, const scalar_t* b, int64_t sb0,
               int64_t sb1, scalar_t* out, int64_t N, int J, int64_t n0, int64_t n1,
               const Op& op) {
  using A = acc_t<scalar_t>;
  using V = typename Lanes<A>::V;
  constexpr int W = Lanes<A>::W;
  V x[jet::kMaxCoeffs], y[jet::kMaxCoeffs], r[jet::kMaxCoeffs];
  for (int64_t base = n0; base < n1; base += W) {
    const int valid = static_cast<int>(std::min<int64_t>(W, n1 - base));
    for (int k = 0; k <= J; ++k) {
      for (int l = 0; l < W; ++l) {  // padded lanes repeat the last element (finite inputs)
        const int64_t n = base + std::min(l, valid - 1);
        x[k][l] = load(a[k * sa0 + n * sa1]);
        if (b != nullptr) y[k][l] = load(b[k * sb0 + n * sb1]);
      }
    }
    op(x, y, r);
    for (int k = 0; k <= J; ++k)
      for (int l = 0; l < valid; ++l) out[k * N + base + l] = static_cast<scalar_t>(r[k][l]);
  }
}

template <typename F>
void parallel_elems(int64_t N, int64_t J1, const F& f) {
#ifdef _OPENMP
  const int64_t nt = std::min<int64_t>(at::get_num_threads(), (N + 63) / 64);
  if (nt > 1 && N * J1 >= kMinParallelElems && !omp_in_parallel()) {
#pragma omp parallel num_threads(static_cast<int>(nt))
    {
      const int64_t tid = omp_get_thread_num(), nth = omp_get_num_threads();
      // split on multiples of 64 elements so that thread ranges keep whole vectors
      const int64_t blocks = (N + 63) / 64;
      const int64_t begin = std::min(N, blocks * tid / nth * 64);
      const int64_t end = std::min(N, blocks * (tid + 1) / nth * 64);
      if (begin < end) f(begin, end);
    }
    return;
  }
#endif
  f(0, N);
}

void check_jet_tensor(const at::Tensor& u, const char* op, const char* name) {
  check_floating(u, op, name);
  TORCH_CHECK_VALUE(u.dim() == 2 && u.size(0) >= 1 && u.size(0) <= jet::kMaxCoeffs, op, ": ",
                    name, " must be [J+1, N] with 1 <= J+1 <= ", jet::kMaxCoeffs, ", got ",
                    u.sizes());
}

at::Tensor jet_unary_cpu(const at::Tensor& u, int64_t fn) {
  check_jet_tensor(u, "jet_unary", "u");
  TORCH_CHECK_VALUE(fn >= 0 && fn < jet::kNumFns, "jet_unary: fn code ", fn, " out of range [0, ",
                    int(jet::kNumFns), ")");
  TORCH_CHECK(u.device().is_cpu(), "jet_unary (cpu kernel): u must be a CPU tensor");
  const int64_t N = u.size(1);
  const int J = static_cast<int>(u.size(0) - 1);
  at::Tensor out = at::empty({J + 1, N}, u.options());
  if (N == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, u.scalar_type(), "jet_unary", [&] {
    using A = acc_t<scalar_t>;
    using V = typename Lanes<A>::V;
    const auto f = static_cast<int>(fn);
    auto op = [f, J](const V* x, const V*, V* r) {
      V w1[jet::kMaxCoeffs], w2[jet::kMaxCoeffs], w3[jet::kMaxCoeffs];
      jet::unary_series<A, VecMath<A>>(f, J, x, r, w1, w2, w3);
    };
    parallel_elems(N, J + 1, [&](int64_t n0, int64_t n1) {
      run_lanes<scalar_t>(u.const_data_ptr<scalar_t>(), u.stride(0), u.stride(1), nullptr, 0, 0,
                          out.mutable_data_ptr<scalar_t>(), N, J, n0, n1, op);
    });
  });
  return out;
}

at::Tensor jet_mul_cpu(const at::Tensor& a, const at::Tensor& b) {
  check_jet_tensor(a, "jet_mul", "a");
  check_jet_tensor(b, "jet_mul", "b");
  TORCH_CHECK_VALUE(a.sizes() == b.sizes() && a.scalar_type() == b.scalar_type(),
                    "jet_mul: a and b must have one shape and dtype, got ", a.sizes(), " ",
                    a.scalar_type(), " and ", b.sizes(), " ", b.scalar_type());
  TORCH_CHECK(a.device().is_cpu() && b.device().is_cpu(), "jet_mul (cpu kernel): CPU tensors");
  const int64_t N = a.size(1);
  const int J = static_cast<int>(a.size(0) - 1);
  at::Tensor out = at::empty({J + 1, N}, a.options());
  if (N == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "jet_mul", [&] {
    using V = typename Lanes<acc_t<scalar_t>>::V;
    auto op = [J](const V* x, const V* y, V* r) {
      for (int k = 0; k <= J; ++k) r[k] = jet::cauchy(x, y, k);
    };
    parallel_elems(N, J + 1, [&](int64_t n0, int64_t n1) {
      run_lanes<scalar_t>(a.const_data_ptr<scalar_t>(), a.stride(0), a.stride(1),
                          b.const_data_ptr<scalar_t>(), b.stride(0), b.stride(1),
                          out.mutable_data_ptr<scalar_t>(), N, J, n0, n1, op);
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(taylor_kernels, CPU, m) {
  m.impl("jet_unary", &jet_unary_cpu);
  m.impl("jet_mul", &jet_mul_cpu);
}

}  // namespace taylor_kernels
