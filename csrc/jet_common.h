// Taylor-coefficient recurrences of the jet ops, shared by the CPU (.cpp) and CUDA (.cu) kernels.
//
// A jet holds the normalized coefficients u_0..u_J (u_k = u^(k)(0)/k!) of one curve u(t).
// For y = fn(u), y' = fn'(u) u' gives, with D(u, z)_k = (1/k) sum_{j=1..k} j u_j z_{k-j} and the
// Cauchy product (a*b)_k = sum_{j=0..k} a_j b_{k-j} (the table of taylor_kernels/reference/jet.py):
//   exp: y_k = D(u, y)_k            tanh: y_k = D(u, 1 - y*y)_k      sigmoid: y_k = D(u, y - y*y)_k
//   softplus: D(u, sigmoid(u))      silu: u * sigmoid(u)             gelu: u * Phi(u), with
//   phi_k = -D(u, u*phi)_k, Phi_k = D(u, phi)_k;  gelu_tanh: (u + u * tanh(c (u + 0.044715 u^3)))/2
//   sin/cos: s_k = D(u, c)_k, c_k = -D(u, s)_k
//   log: y_k = (u_k - (1/k) sum_{j<k} j y_j u_{k-j}) / u_0
//   u^p (reciprocal, sqrt, rsqrt): y_k = sum_{j=1..k} ((p+1) j - k) u_j y_{k-j} / (k u_0)
//   square: u*u      relu: y_k = u_k [u_0 > 0]
// The code is generic in the value type V: a scalar (CUDA: one element per thread) or an
// at::vec::Vectorized of elements (CPU); S is the scalar type, and scalars enter as V(S(...))
// (Vectorized has no mixed scalar-vector operators). The order-0 values of the elementary functions
// ("seeds", see order0_seeds) come from the caller: the CPU kernel computes them with ATen's
// vectorized math, the CUDA kernel with the device's.
#pragma once

#include <type_traits>

#ifdef __CUDACC__
#define TK_HD __host__ __device__ __forceinline__
#elif defined(__GNUC__)
// forced inlining lets the CPU kernel's compile-time orders unroll every recurrence loop
#define TK_HD inline __attribute__((always_inline))
#else
#define TK_HD inline
#endif

namespace taylor_kernels {
namespace jet {

constexpr int kMaxOrder = 15;  // J; keep in sync with taylor_kernels/reference/jet.py MAX_ORDER
constexpr int kMaxCoeffs = kMaxOrder + 1;

// Function codes: the order of FNS in taylor_kernels/reference/jet.py.
enum Fn : int {
  kTanh, kSigmoid, kExp, kLog, kSoftplus, kGelu, kGeluTanh, kSilu,
  kSin, kCos, kRelu, kSquare, kReciprocal, kSqrt, kRsqrt, kNumFns
};

constexpr double kGeluTanhC = 0.7978845608028654;  // sqrt(2/pi)
constexpr double kInvSqrt2Pi = 0.3989422804014327;
constexpr double kInvSqrt2 = 0.7071067811865476;

template <class V>
TK_HD V cauchy(const V* a, const V* b, int k) {
  V acc = a[0] * b[k];
  for (int j = 1; j <= k; ++j) acc += a[j] * b[k - j];
  return acc;
}

// D(u, z)_k: coefficient k of y with y' = z u'.
template <class S, class V>
TK_HD V integral(const V* u, const V* z, int k) {
  V acc = u[1] * z[k - 1];
  for (int j = 2; j <= k; ++j) acc += V(S(j)) * u[j] * z[k - j];
  return acc / V(S(k));
}

template <class S, class V>
TK_HD void tanh_series(const V* u, int J, V t0, V* y, V* z) {  // t0 = tanh(u_0)
  y[0] = t0;
  z[0] = V(S(1)) - y[0] * y[0];
  for (int k = 1; k <= J; ++k) {
    y[k] = integral<S>(u, z, k);
    z[k] = -cauchy(y, y, k);
  }
}

template <class S, class V>
TK_HD void sigmoid_series(const V* u, int J, V s0, V* y, V* z) {  // s0 = sigmoid(u_0)
  y[0] = s0;
  z[0] = y[0] - y[0] * y[0];
  for (int k = 1; k <= J; ++k) {
    y[k] = integral<S>(u, z, k);
    z[k] = y[k] - cauchy(y, y, k);
  }
}

template <class S, class V>
TK_HD void gelu_series(const V* u, int J, V p0, V P0, V* y, V* p, V* P, V* up) {
  p[0] = p0;  // phi(u_0)
  P[0] = P0;  // Phi(u_0)
  up[0] = u[0] * p[0];
  for (int k = 1; k <= J; ++k) {
    P[k] = integral<S>(u, p, k);
    p[k] = -integral<S>(u, up, k);
    up[k] = cauchy(u, p, k);
  }
  for (int k = 0; k <= J; ++k) y[k] = cauchy(u, P, k);
}

template <class S, class V>
TK_HD void gelu_tanh_series(const V* u, int J, V t0, V* y, V* a, V* T, V* z) {  // t0 = tanh(a_0)
  for (int k = 0; k <= J; ++k) z[k] = cauchy(u, u, k);  // u^2
  for (int k = 0; k <= J; ++k)
    a[k] = V(S(kGeluTanhC)) * (u[k] + V(S(0.044715)) * cauchy(z, u, k));
  tanh_series<S>(a, J, t0, T, z);
  for (int k = 0; k <= J; ++k) y[k] = V(S(0.5)) * (u[k] + cauchy(u, T, k));
}

template <class S, class V>
TK_HD void sincos_series(const V* u, int J, V s0, V c0, V* s, V* c) {
  s[0] = s0;
  c[0] = c0;
  for (int k = 1; k <= J; ++k) {
    s[k] = integral<S>(u, c, k);
    c[k] = -integral<S>(u, s, k);
  }
}

template <class S, class V>
TK_HD void log_series(const V* u, int J, V l0, V* y) {  // l0 = log(u_0)
  y[0] = l0;
  for (int k = 1; k <= J; ++k) {
    V acc = u[k];
    for (int j = 1; j < k; ++j) acc -= V(S(j) / S(k)) * y[j] * u[k - j];
    y[k] = acc / u[0];
  }
}

template <class S, class V>
TK_HD void power_series(const V* u, int J, S p, V* y) {  // y[0] set by the caller
  for (int k = 1; k <= J; ++k) {
    V acc = V((p + S(1)) - S(k)) * u[1] * y[k - 1];
    for (int j = 2; j <= k; ++j) acc += V((p + S(1)) * S(j) - S(k)) * u[j] * y[k - j];
    y[k] = acc / (V(S(k)) * u[0]);
  }
}

// Order-0 values the recurrences start from, as a function of the scalar u_0 (2 at most):
//   tanh: tanh u0 | sigmoid, silu: sigmoid u0 | exp: exp u0 | log: log u0
//   softplus: softplus u0, sigmoid u0 | gelu: phi(u0), Phi(u0)
//   gelu_tanh: tanh(c (u0 + 0.044715 u0^3)) | sin, cos: sin u0, cos u0 | relu: [u0 > 0]
//   square: - | reciprocal: 1/u0 | sqrt: sqrt u0 | rsqrt: 1/sqrt u0

// y[0..J] = coefficients of fn(u) given the seeds s0, s1 of fn at u_0; w1..w3 are scratch
// series of kMaxCoeffs values.
template <class S, class V>
TK_HD void unary_series(int fn, int J, const V* u, V s0, V s1, V* y, V* w1, V* w2, V* w3) {
  switch (fn) {
    case kTanh: tanh_series<S>(u, J, s0, y, w1); break;
    case kSigmoid: sigmoid_series<S>(u, J, s0, y, w1); break;
    case kExp:
      y[0] = s0;
      for (int k = 1; k <= J; ++k) y[k] = integral<S>(u, y, k);
      break;
    case kLog: log_series<S>(u, J, s0, y); break;
    case kSoftplus:
      sigmoid_series<S>(u, J, s1, w1, w2);
      y[0] = s0;
      for (int k = 1; k <= J; ++k) y[k] = integral<S>(u, w1, k);
      break;
    case kGelu: gelu_series<S>(u, J, s0, s1, y, w1, w2, w3); break;
    case kGeluTanh: gelu_tanh_series<S>(u, J, s0, y, w1, w2, w3); break;
    case kSilu:
      sigmoid_series<S>(u, J, s0, w1, w2);
      for (int k = 0; k <= J; ++k) y[k] = cauchy(u, w1, k);
      break;
    case kSin: sincos_series<S>(u, J, s0, s1, y, w1); break;
    case kCos: sincos_series<S>(u, J, s0, s1, w1, y); break;
    case kRelu:
      for (int k = 0; k <= J; ++k) y[k] = u[k] * s0;
      break;
    case kSquare:
      for (int k = 0; k <= J; ++k) y[k] = cauchy(u, u, k);
      break;
    case kReciprocal:
      y[0] = s0;
      power_series<S>(u, J, S(-1), y);
      break;
    case kSqrt:
      y[0] = s0;
      power_series<S>(u, J, S(0.5), y);
      break;
    default:  // kRsqrt
      y[0] = s0;
      power_series<S>(u, J, S(-0.5), y);
      break;
  }
}

// Host side: f(order) with the order as a compile-time constant (std::integral_constant) for
// the common orders 1..6, so that the kernels' recurrence loops unroll; f(int) otherwise.
template <typename F>
inline void with_order(int J, const F& f) {
  switch (J) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 5: f(std::integral_constant<int, 5>{}); break;
    case 6: f(std::integral_constant<int, 6>{}); break;
    default: f(J); break;
  }
}

}  // namespace jet
}  // namespace taylor_kernels
