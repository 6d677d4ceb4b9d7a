// Vectorized loops of the jet ops, compiled once per CPU capability (kernels.h).
//
// jet_unary(u [J+1, N], fn) -> [J+1, N]: coefficients of fn(u(t)), all orders in one pass per
//   element (recurrences in ../jet_common.h) from the order-0 seeds the caller computed.
// jet_mul(a [J+1, N], b [J+1, N]) -> [J+1, N]: c_k = sum_{j<=k} a_j b_{k-j}.
// Elements are processed W at a time as at::vec::Vectorized (the recurrences' loops over
// orders run on whole vectors); threads split N. Inputs are read through their strides; the
// output is contiguous. Arithmetic in float (double for double inputs).
#include "../jet_common.h"
#include "vec_io.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>

namespace taylor_kernels::cpu::CPU_CAPABILITY {
namespace {

constexpr int64_t kMinParallelElems = 4096;  // N * (J+1) below which one thread is faster
constexpr int64_t kSplit = 64;               // threads get whole multiples of kSplit elements

// A jet operand [J+1, N]: data and strides.
template <typename T>
struct Operand {
  const T* p = nullptr;
  int64_t s0 = 0, s1 = 0;
};

template <typename T>
Operand<T> operand(const at::Tensor& t) {
  return {t.const_data_ptr<T>(), t.stride(0), t.stride(1)};
}

// Elements [n0, n1) of one jet op: loads n <= W elements' coefficients of a (and b) into
// vectors, their order-0 seeds (contiguous, may be null), runs op(J, x, y, seed0, seed1, r)
// and stores the n valid lanes of r. JT is int (any order) or std::integral_constant<int, J>
// (the recurrences' loops unrolled at compile time).
template <typename T, typename JT, typename Op>
void run_lanes(Operand<T> a, Operand<T> b, const acc_t<T>* seed0, const acc_t<T>* seed1,
               T* out, int64_t N, JT Jt, int64_t n0, int64_t n1, const Op& op) {
  using Vec = VecA<T>;
  constexpr int64_t W = Vec::size();
  const int J = Jt;
  Vec x[jet::kMaxCoeffs], y[jet::kMaxCoeffs], r[jet::kMaxCoeffs];
  auto gather = [&](Vec* dst, Operand<T> src, int64_t base, int64_t n) {
    for (int k = 0; k <= J; ++k) {
      const T* p = src.p + k * src.s0 + base * src.s1;
      if (src.s1 == 1) {
        dst[k] = load(p, n);
      } else {
        __at_align__ acc_t<T> lanes[W] = {};
        for (int64_t l = 0; l < n; ++l) lanes[l] = static_cast<acc_t<T>>(p[l * src.s1]);
        dst[k] = Vec::loadu(lanes);
      }
    }
  };
  auto seed = [](const acc_t<T>* s, int64_t base, int64_t n) {
    return s == nullptr ? Vec(0) : Vec::loadu(s + base, n);
  };
  for (int64_t base = n0; base < n1; base += W) {
    const int64_t n = std::min(W, n1 - base);
    gather(x, a, base, n);
    if (b.p != nullptr) gather(y, b, base, n);
    op(Jt, x, y, seed(seed0, base, n), seed(seed1, base, n), r);
    for (int k = 0; k <= J; ++k) store(out + k * N + base, r[k], n);
  }
}

// run_lanes over [0, N) on at::parallel_for's threads, for out's order as a compile-time
// constant where jet::with_order has one.
template <typename T, typename Op>
void run_jet(Operand<T> a, Operand<T> b, const at::Tensor& seed0, const at::Tensor& seed1,
             const at::Tensor& out, const Op& op) {
  const int64_t N = out.size(1), J1 = out.size(0);
  const acc_t<T>* s0 = seed0.defined() ? seed0.const_data_ptr<acc_t<T>>() : nullptr;
  const acc_t<T>* s1 = seed1.defined() ? seed1.const_data_ptr<acc_t<T>>() : nullptr;
  T* o = out.mutable_data_ptr<T>();
  const int64_t blocks = (N + kSplit - 1) / kSplit;
  const int64_t grain = (kMinParallelElems + kSplit * J1 - 1) / (kSplit * J1);
  jet::with_order(static_cast<int>(J1 - 1), [&](auto Jt) {
    at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
      run_lanes<T>(a, b, s0, s1, o, N, Jt, b0 * kSplit, std::min(N, b1 * kSplit), op);
    });
  });
}

}  // namespace

void jet_unary(const at::Tensor& u, int fn, const at::Tensor& seed0, const at::Tensor& seed1,
               const at::Tensor& out) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, u.scalar_type(), "jet_unary", [&] {
    using Vec = VecA<scalar_t>;
    auto op = [fn](auto Jt, const Vec* x, const Vec*, Vec s0, Vec s1, Vec* r) {
      Vec w1[jet::kMaxCoeffs], w2[jet::kMaxCoeffs], w3[jet::kMaxCoeffs];
      jet::unary_series<acc_t<scalar_t>>(fn, static_cast<int>(Jt), x, s0, s1, r, w1, w2, w3);
    };
    run_jet<scalar_t>(operand<scalar_t>(u), {}, seed0, seed1, out, op);
  });
}

void jet_mul(const at::Tensor& a, const at::Tensor& b, const at::Tensor& out) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "jet_mul", [&] {
    using Vec = VecA<scalar_t>;
    auto op = [](auto Jt, const Vec* x, const Vec* y, Vec, Vec, Vec* r) {
      for (int k = 0; k <= static_cast<int>(Jt); ++k) r[k] = jet::cauchy(x, y, k);
    };
    run_jet<scalar_t>(operand<scalar_t>(a), operand<scalar_t>(b), {}, {}, out, op);
  });
}

}  // namespace taylor_kernels::cpu::CPU_CAPABILITY
