// CPU ops jet_unary and jet_mul (formulas in jet_kernels.cpp, recurrences in ../jet_common.h):
// argument checks, the order-0 seeds (from ATen's vectorized math: one extra pass over u_0),
// the output, and the kernel for this CPU's capability (kernels.h).
#include "../jet_common.h"
#include "kernels.h"

#include <ATen/ATen.h>  // the seeds use ATen's vectorized math (tanh, erf, ...)
#include <torch/library.h>

#include <array>

namespace taylor_kernels::cpu {
namespace {

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
    case jet::kSoftplus:  // log(1 + e^u) without torch's threshold (u above 20: its value
      // u was 2e-9 off in float64, inconsistent with the sigmoid(u) of order 1)
      return {at::clamp_min(u0, 0) + at::log1p(at::exp(-at::abs(u0))), at::sigmoid(u0)};
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
  at::Tensor out = empty_huge_pages(u.sizes(), u.options());
  if (u.size(1) == 0) return out;
  const auto seeds = order0_seeds(
      u.select(0, 0).to(accumulation_dtype(u.scalar_type())).contiguous(), static_cast<int>(fn));
  TK_CPU_KERNEL(jet_unary)(u, static_cast<int>(fn), seeds[0], seeds[1], out);
  return out;
}

at::Tensor jet_mul_cpu(const at::Tensor& a, const at::Tensor& b) {
  check_jet_tensor(a, "jet_mul", "a");
  check_jet_tensor(b, "jet_mul", "b");
  TORCH_CHECK_VALUE(a.sizes() == b.sizes() && a.scalar_type() == b.scalar_type(),
                    "jet_mul: a and b must have one shape and dtype, got ", a.sizes(), " ",
                    a.scalar_type(), " and ", b.sizes(), " ", b.scalar_type());
  TORCH_CHECK(a.device().is_cpu() && b.device().is_cpu(), "jet_mul (cpu kernel): CPU tensors");
  at::Tensor out = empty_huge_pages(a.sizes(), a.options());
  if (a.size(1) > 0) TK_CPU_KERNEL(jet_mul)(a, b, out);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(taylor_kernels, CPU, m) {
  m.impl("jet_unary", &jet_unary_cpu);
  m.impl("jet_mul", &jet_mul_cpu);
}

}  // namespace taylor_kernels::cpu
