// Helpers of the kernel TUs (csrc/cpu/*_kernels.cpp, compiled once per CPU capability, see
// kernels.h): T values loaded to / stored from at::vec::Vectorized<acc_t<T>> (bfloat16 / half
// through ATen's conversions: round to nearest even), and the loop over a row in vectors.
// Everything lives in the capability's namespace.
#pragma once

#ifndef CPU_CAPABILITY
#error "vec_io.h is for the per-capability kernel TUs (built with -DCPU_CAPABILITY=...)"
#endif

#include "kernels.h"

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <type_traits>

namespace taylor_kernels::cpu::CPU_CAPABILITY {

template <typename T>
using VecA = at::vec::Vectorized<acc_t<T>>;

// p[0..n) as accumulation-dtype lanes, n <= VecA<T>::size() (the lanes from n on are zero).
template <typename T>
inline VecA<T> load(const T* p, int64_t n) {
  if constexpr (std::is_same_v<T, acc_t<T>>) {
    return VecA<T>::loadu(p, n);
  } else {
    if (n == VecA<T>::size()) {
      VecA<T> v;
      at::vec::load_to_float(p, v);
      return v;
    }
    return at::vec::convert<float>(at::vec::Vectorized<T>::loadu(p, n));
  }
}

// p[0..n) = the first n lanes of v, rounded to T.
template <typename T>
inline void store(T* p, const VecA<T>& v, int64_t n) {
  if constexpr (std::is_same_v<T, acc_t<T>>) {
    v.store(p, n);
  } else {
    at::vec::convert<T>(v).store(p, n);
  }
}

// f(d, n) over [0, len) in vectors of W lanes: d = 0, W, 2W, ...; n = W but for the last.
template <int64_t W, typename F>
inline void for_vectors(int64_t len, const F& f) {
  int64_t d = 0;
  for (; d + W <= len; d += W) f(d, W);
  if (d < len) f(d, len - d);
}

}  // namespace taylor_kernels::cpu::CPU_CAPABILITY
