// One output element of ih_accumulate (formula in csrc/hessian_common.h): the sum over the
// chunk's points n of input b of
//     (w_n / K) * Delta_n[i] * h[n - start, r, j] * Delta_n[j],   Delta_n = x[b] - bl[b|0, k(n)],
// walking the points in ascending n. The point's baseline k and node s are stepped along with
// n (one 64-bit division per element, none per point: the divisions per point bounded the CUDA
// kernel at 19% of copy bandwidth on an H200). Plain C++ as well as CUDA, so that the CPU tests
// compile this same loop and compare it with the reference (tests/ops/test_ih_point_sum.py).
#pragma once

#include <cstdint>

#ifdef __CUDACC__
#define TK_HOST_DEVICE __host__ __device__
#else
#define TK_HOST_DEVICE
#endif

namespace taylor_kernels {

// h [count, R, D], x [B, D], bl [Bb, K, D] (Bb = 1 when shared_bl), w [S] or [count] (per_point:
// the chunk's slice), i = index[r] (checked by the caller). Points of b: [b K S, (b + 1) K S).
template <typename acc>
TK_HOST_DEVICE inline acc ih_point_sum(const acc* h, const acc* x, const acc* bl, const acc* w,
                                       int64_t start, int64_t count, int64_t R, int64_t D,
                                       int64_t K, int64_t S, bool shared_bl, bool per_point,
                                       int64_t b, int64_t r, int64_t i, int64_t j) {
  const int64_t KS = K * S, end = start + count;
  const int64_t first = start > b * KS ? start : b * KS;
  const int64_t last = end < (b + 1) * KS ? end : (b + 1) * KS;  // exclusive
  acc sum = acc(0);
  if (first >= last) return sum;
  const int64_t local = first - b * KS;  // the first point's place among b's K S points
  int64_t k = local / S, s = local % S;
  const acc* blb = bl + (shared_bl ? 0 : b) * K * D;
  const acc xi = x[b * D + i], xj = x[b * D + j];
  acc di = xi - blb[k * D + i], dj = xj - blb[k * D + j];
  const acc* hp = h + ((first - start) * R + r) * D + j;
  const int64_t h_step = R * D;
  for (int64_t n = first; n < last; ++n, hp += h_step) {
    const acc c = w[per_point ? n - start : s] / static_cast<acc>(K);
    sum += c * di * *hp * dj;
    if (++s == S && n + 1 < last) {  // the next point starts baseline k + 1
      s = 0;
      ++k;
      di = xi - blb[k * D + i];
      dj = xj - blb[k * D + j];
    }
  }
  return sum;
}

}  // namespace taylor_kernels
