// CPU (OpenMP) kernels of the jet ops, registered for the CPU dispatch key.
//
// jet_unary(u [J+1, N], fn) -> [J+1, N]: coefficients of fn(u(t)), all orders in one pass per
//   element (recurrences in ../jet_common.h).
// jet_mul(a [J+1, N], b [J+1, N]) -> [J+1, N]: c_k = sum_{j<=k} a_j b_{k-j}.
// Elements are processed W at a time as GCC vectors (SIMD over N, the recurrences' loops over
// orders run on whole vectors); OpenMP threads split N. The order-0 function values (seeds)
// come first from ATen's vectorized math (one extra pass over u_0). Inputs are read through their
// strides; outputs are contiguous. Arithmetic in float (double for double inputs).
#include "../jet_common.h"
#include "../path_common.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ATen.h>  // the seeds use ATen's vectorized math (tanh, erf, ...)
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <type_traits>

#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace taylor_kernels {
namespace {

constexpr int64_t kVectorBytes = 16;  // SSE2 registers: baseline x86-64, one instruction per op
constexpr int64_t kMinParallelElems = 4096;

template <typename A>
struct Lanes {
  static constexpr int W = kVectorBytes / sizeof(A);
  typedef A V __attribute__((vector_size(kVectorBytes)));
};

template <typename T>
inline acc_t<T> load(T v) {
  return static_cast<acc_t<T>>(v);
}

// Elements [n0, n1) of one jet op: gathers W elements' coefficients into vectors (one vector
// load per coefficient when the elements are contiguous) and their order-0 seeds (contiguous,
// may be null), runs op(in0, in1, seed0, seed1, out) on them and stores the valid lanes.
// JT is int (any order) or std::integral_constant<int, J> (loops unrolled at compile time).
template <typename scalar_t, typename JT, typename Op>
void run_lanes(const scalar_t* a, int64_t sa0, int64_t sa1, const scalar_t* b, int64_t sb0,
               int64_t sb1, const acc_t<scalar_t>* seed0, const acc_t<scalar_t>* seed1,
               scalar_t* out, int64_t N, JT Jt, int64_t n0, int64_t n1, const Op& op) {
  const int J = Jt;
  using A = acc_t<scalar_t>;
  using V = typename Lanes<A>::V;
  constexpr int W = Lanes<A>::W;
  constexpr bool kPlain = std::is_same_v<scalar_t, A>;
  V x[jet::kMaxCoeffs], y[jet::kMaxCoeffs], r[jet::kMaxCoeffs];
  auto gather = [&](V* dst, const scalar_t* src, int64_t s0, int64_t s1, int64_t base,
                    int valid) {
    for (int k = 0; k <= J; ++k) {
      if constexpr (kPlain) {
        if (s1 == 1 && valid == W) {
          std::memcpy(&dst[k], src + k * s0 + base, sizeof(V));
          continue;
        }
      }
      for (int l = 0; l < W; ++l)  // padded lanes repeat the last element (finite inputs)
        dst[k][l] = load(src[k * s0 + (base + std::min(l, valid - 1)) * s1]);
    }
  };
  auto seed = [&](const A* src, int64_t base, int valid) {
    V v = {};
    if (src == nullptr) return v;
    if (valid == W) {
      std::memcpy(&v, src + base, sizeof(V));
    } else {
      for (int l = 0; l < W; ++l) v[l] = src[base + std::min(l, valid - 1)];
    }
    return v;
  };
  for (int64_t base = n0; base < n1; base += W) {
    const int valid = static_cast<int>(std::min<int64_t>(W, n1 - base));
    gather(x, a, sa0, sa1, base, valid);
    if (b != nullptr) gather(y, b, sb0, sb1, base, valid);
    op(Jt, x, y, seed(seed0, base, valid), seed(seed1, base, valid), r);
    for (int k = 0; k <= J; ++k) {
      if constexpr (kPlain) {
        if (valid == W) {
          std::memcpy(out + k * N + base, &r[k], sizeof(V));
          continue;
        }
      }
      for (int l = 0; l < valid; ++l) out[k * N + base + l] = static_cast<scalar_t>(r[k][l]);
    }
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

// A fresh [J+1, N] output: large ones get transparent huge pages on their 2 MiB-aligned
// interior before the first touch (the page faults of a fresh buffer otherwise cost more than
// the kernel on small machines; a no-op where THP is off).
at::Tensor new_output(int64_t J1, int64_t N, const at::TensorOptions& options) {
  at::Tensor out = at::empty({J1, N}, options);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(1) << 21;
  const auto begin = reinterpret_cast<uintptr_t>(out.data_ptr());
  const uintptr_t first = (begin + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t last = (begin + out.nbytes()) & ~(kHuge - 1);
  if (last > first + kHuge) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#endif
  return out;
}

void check_jet_tensor(const at::Tensor& u, const char* op, const char* name) {
  check_floating(u, op, name);
  TORCH_CHECK_VALUE(u.dim() == 2 && u.size(0) >= 1 && u.size(0) <= jet::kMaxCoeffs, op, ": ",
                    name, " must be [J+1, N] with 1 <= J+1 <= ", jet::kMaxCoeffs, ", got ",
                    u.sizes());
}

// The order-0 seeds of fn (table in ../jet_common.h) with ATen's vectorized math, in the
// accumulation dtype; undefined tensors where fn needs fewer than two.
std::array<at::Tensor, 2> order0_seeds(const at::Tensor& u0, int fn) {
  switch (fn) {
    case jet::kTanh: return {at::tanh(u0), {}};
    case jet::kSigmoid:
    case jet::kSilu: return {at::sigmoid(u0), {}};
    case jet::kExp: return {at::exp(u0), {}};
    case jet::kLog: return {at::log(u0), {}};
    case jet::kSoftplus: return {at::softplus(u0, 1, 20), at::sigmoid(u0)};
    case jet::kGelu:
      return {at::exp(u0 * u0 * -0.5) * jet::kInvSqrt2Pi, (at::erf(u0 * jet::kInvSqrt2) + 1) * 0.5};
    case jet::kGeluTanh: return {at::tanh((u0 + u0 * u0 * u0 * 0.044715) * jet::kGeluTanhC), {}};
    case jet::kSin:
    case jet::kCos: return {at::sin(u0), at::cos(u0)};
    case jet::kRelu: return {(u0 > 0).to(u0.scalar_type()), {}};
    case jet::kSquare: return {};
    case jet::kReciprocal: return {at::reciprocal(u0), {}};
    case jet::kSqrt: return {at::sqrt(u0), {}};
    default: return {at::rsqrt(u0), {}};
  }
}

at::Tensor jet_unary_cpu(const at::Tensor& u, int64_t fn) {
  check_jet_tensor(u, "jet_unary", "u");
  TORCH_CHECK_VALUE(fn >= 0 && fn < jet::kNumFns, "jet_unary: fn code ", fn, " out of range [0, ",
                    int(jet::kNumFns), ")");
  TORCH_CHECK(u.device().is_cpu(), "jet_unary (cpu kernel): u must be a CPU tensor");
  const int64_t N = u.size(1);
  const int J = static_cast<int>(u.size(0) - 1);
  at::Tensor out = new_output(J + 1, N, u.options());
  if (N == 0) return out;
  const auto seeds = order0_seeds(
      u.select(0, 0).to(accumulation_dtype(u.scalar_type())).contiguous(), static_cast<int>(fn));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, u.scalar_type(), "jet_unary", [&] {
    using A = acc_t<scalar_t>;
    using V = typename Lanes<A>::V;
    const auto f = static_cast<int>(fn);
    auto op = [f](auto Jt, const V* x, const V*, V s0, V s1, V* r) {
      V w1[jet::kMaxCoeffs], w2[jet::kMaxCoeffs], w3[jet::kMaxCoeffs];
      jet::unary_series<A>(f, static_cast<int>(Jt), x, s0, s1, r, w1, w2, w3);
    };
    const A* s0 = seeds[0].defined() ? seeds[0].const_data_ptr<A>() : nullptr;
    const A* s1 = seeds[1].defined() ? seeds[1].const_data_ptr<A>() : nullptr;
    jet::with_order(J, [&](auto Jt) {
      parallel_elems(N, J + 1, [&](int64_t n0, int64_t n1) {
        run_lanes<scalar_t>(u.const_data_ptr<scalar_t>(), u.stride(0), u.stride(1), nullptr, 0,
                            0, s0, s1, out.mutable_data_ptr<scalar_t>(), N, Jt, n0, n1, op);
      });
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
  at::Tensor out = new_output(J + 1, N, a.options());
  if (N == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "jet_mul", [&] {
    using V = typename Lanes<acc_t<scalar_t>>::V;
    auto op = [](auto Jt, const V* x, const V* y, V, V, V* r) {
      for (int k = 0; k <= static_cast<int>(Jt); ++k) r[k] = jet::cauchy(x, y, k);
    };
    jet::with_order(J, [&](auto Jt) {
      parallel_elems(N, J + 1, [&](int64_t n0, int64_t n1) {
        run_lanes<scalar_t>(a.const_data_ptr<scalar_t>(), a.stride(0), a.stride(1),
                            b.const_data_ptr<scalar_t>(), b.stride(0), b.stride(1), nullptr,
                            nullptr, out.mutable_data_ptr<scalar_t>(), N, Jt, n0, n1, op);
      });
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
