// CPU (OpenMP) kernels of the path ops, registered for the CPU dispatch key.
//
// path_points:     out[n - start, :] = bl[b|0, k] + alpha_n * (x[b] - bl[b|0, k])
// path_accumulate: out[b, :] = sum_{n in chunk, b(n) = b} w_n * g[n - start] * (x[b] - bl[b|0, k]) / K
// with n = (b*K + k)*S + s, alpha_n / w_n = nodes[s] ([S]) or nodes[n] ([B, K, S]).
// Both are memory bound: one pass over the [count, D] tensor, vectorizable inner loops over D,
// (b, k, s) advanced per row without divisions. path_accumulate is deterministic: each output
// element is owned by one (b, D-block) tile that adds the chunk's rows in ascending n.
#include "../path_common.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <bit>

#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__linux__)
#include <sys/mman.h>
#endif

// The row / tile loops are compiled for AVX-512 and AVX2 as well and picked at load time (GCC
// function multi-versioning). Floating-point contraction is off for this file (CMake), so
// every version gives bitwise the same results.
#if defined(__GNUC__) && __GNUC__ >= 12 && !defined(__clang__) && defined(__x86_64__) && \
    defined(__linux__)
#define TK_TARGET_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define TK_TARGET_CLONES
#endif

namespace taylor_kernels {
namespace {

constexpr int64_t kMinParallelWork = 1 << 15;  // elements below which one thread is faster
constexpr int64_t kPointsBlock = 8192;          // D-block of path_points when rows are few
constexpr int64_t kAccBlock = 2048;             // largest D-block of a path_accumulate tile
constexpr int64_t kAccMinBlock = 256;           // smallest, when few rows are touched

// Loads to / stores from the accumulation type. float / double are plain casts; bfloat16 and
// half use branch-free bit arithmetic (round to nearest even, NaN -> quiet NaN, like c10's
// conversions, bitwise) so that the loops over D vectorize.
template <typename T>
struct Convert {
  static inline acc_t<T> load(T v) { return static_cast<acc_t<T>>(v); }
  static inline T store(acc_t<T> v) { return static_cast<T>(v); }
};

template <>
struct Convert<c10::BFloat16> {
  static inline float load(c10::BFloat16 v) { return std::bit_cast<float>(uint32_t(v.x) << 16); }
  static inline c10::BFloat16 store(float f) {
    const uint32_t u = std::bit_cast<uint32_t>(f);
    const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    const bool nan = (u & 0x7FFFFFFFu) > 0x7F800000u;
    return c10::BFloat16(static_cast<uint16_t>(nan ? 0x7FC0u : rounded),
                         c10::BFloat16::from_bits());
  }
};

template <>
struct Convert<c10::Half> {
  static inline float load(c10::Half v) {
    const uint32_t em = v.x & 0x7FFFu, sign = uint32_t(v.x & 0x8000u) << 16;
    // normal: rebias the exponent by 127 - 15 (inf / NaN: exponent 31 -> 255)
    const uint32_t normal = (em << 13) + (em >= 0x7C00u ? 0x70000000u : 0x38000000u);
    // subnormal: em * 2^-24, exactly, as (0.5 + em * 2^-24) - 0.5
    const uint32_t sub = std::bit_cast<uint32_t>(std::bit_cast<float>(0x3F000000u | em) - 0.5f);
    return std::bit_cast<float>(sign | (em < 0x400u ? sub : normal));
  }
  static inline c10::Half store(float f) {
    const uint32_t u = std::bit_cast<uint32_t>(f);
    const uint32_t sign = (u >> 16) & 0x8000u, a = u & 0x7FFFFFFFu;
    // normal: round the mantissa to 10 bits (ties to even), rebias; overflow saturates to inf
    const uint32_t normal = ((a + 0xFFFu + ((a >> 13) & 1u)) >> 13) - 0x1C000u;
    // below 2^-14: adding 0.5 rounds |f| to a multiple of 2^-24 = the subnormal's bits
    const uint32_t sub = std::bit_cast<uint32_t>(std::bit_cast<float>(a) + 0.5f) - 0x3F000000u;
    uint32_t h = a < 0x38800000u ? sub : std::min(normal, 0x7C00u);
    h = a > 0x7F800000u ? 0x7E00u : h;
    return c10::Half(static_cast<uint16_t>(sign | h), c10::Half::from_bits());
  }
};

// Runs f(begin, end) over contiguous ranges of [0, n), one per OpenMP thread (torch's thread
// count), or serially when the work is small or we already are inside a parallel region.
template <typename F>
void parallel_ranges(int64_t n, int64_t work, const F& f) {
  if (n <= 0) return;
#ifdef _OPENMP
  int64_t nt = std::min<int64_t>(at::get_num_threads(), n);
  if (nt > 1 && work >= kMinParallelWork && !omp_in_parallel()) {
#pragma omp parallel num_threads(static_cast<int>(nt))
    {
      const int64_t tid = omp_get_thread_num(), nth = omp_get_num_threads();
      const int64_t begin = n * tid / nth, end = n * (tid + 1) / nth;
      if (begin < end) f(begin, end);
    }
    return;
  }
#endif
  f(0, n);
}

// Asks Linux for transparent huge pages on the 2 MiB-aligned interior of a large, not yet
// touched buffer: first-touch page faults otherwise cost more than writing it (torch's
// allocator does the same when THP_MEM_ALLOC_ENABLE=1). Harmless where THP is off.
void advise_huge_pages(void* ptr, int64_t nbytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  if (nbytes < int64_t(4 * kHuge)) return;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(ptr) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(ptr) + nbytes) & ~(kHuge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)ptr;
  (void)nbytes;
#endif
}

// Tasks [t0, t1) of path_points: task t is row r = t / nblk, D-block t % nblk.
template <typename scalar_t>
TK_TARGET_CLONES void points_tasks(const scalar_t* __restrict__ x, const scalar_t* __restrict__ bl,
                                   const acc_t<scalar_t>* __restrict__ nodes,
                                   scalar_t* __restrict__ out, const PathShape& p, int64_t nblk,
                                   int64_t blk_len, int64_t t0, int64_t t1) {
  using acc = acc_t<scalar_t>;
  const int64_t D = p.D, K = p.K, S = p.S;
  int64_t r = t0 / nblk, blk = t0 % nblk;
  const int64_t n = p.start + r;
  int64_t b = n / (K * S), k = (n / S) % K, s = n % S;
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t d0 = blk * blk_len, d1 = std::min(D, d0 + blk_len);
    const acc a = nodes[p.per_point ? r : s];
    const scalar_t* __restrict__ xr = x + b * D;
    const scalar_t* __restrict__ br = bl + ((p.Bb > 1 ? b : 0) * K + k) * D;
    scalar_t* __restrict__ o = out + r * D;
#pragma omp simd
    for (int64_t d = d0; d < d1; ++d) {
      const acc bv = Convert<scalar_t>::load(br[d]);
      o[d] = Convert<scalar_t>::store(bv + a * (Convert<scalar_t>::load(xr[d]) - bv));
    }
    if (++blk == nblk) {  // next row: advance (b, k, s) without dividing
      blk = 0;
      ++r;
      if (++s == S) {
        s = 0;
        if (++k == K) {
          k = 0;
          ++b;
        }
      }
    }
  }
}

template <typename scalar_t>
void points_kernel(const scalar_t* x, const scalar_t* bl, const acc_t<scalar_t>* nodes,
                   scalar_t* out, const PathShape& p) {
  // Tasks are rows, or (row, D-block) pairs when rows are too few to feed every thread.
  const int64_t nblk = (p.count >= 4 * at::get_num_threads() || p.D <= kPointsBlock)
                           ? 1
                           : (p.D + kPointsBlock - 1) / kPointsBlock;
  const int64_t blk_len = nblk == 1 ? p.D : kPointsBlock;
  parallel_ranges(p.count * nblk, p.count * p.D, [&](int64_t t0, int64_t t1) {
    points_tasks<scalar_t>(x, bl, nodes, out, p, nblk, blk_len, t0, t1);
  });
}

// Tiles [t0, t1) of path_accumulate: tile t is touched row b_first + t / nblk, D-block
// t % nblk; it sums the chunk's rows of that b in ascending n (deterministic).
template <typename scalar_t, typename grad_t>
TK_TARGET_CLONES void accumulate_tiles(const grad_t* __restrict__ g,
                                       const scalar_t* __restrict__ x,
                                       const scalar_t* __restrict__ bl,
                                       const acc_t<scalar_t>* __restrict__ w,
                                       acc_t<scalar_t>* __restrict__ out, const PathShape& p,
                                       int64_t b_first, int64_t nblk, int64_t blk_len,
                                       int64_t t0, int64_t t1) {
  using acc = acc_t<scalar_t>;
  const int64_t D = p.D, K = p.K, S = p.S, KS = K * S, end = p.start + p.count;
  acc sum[kAccBlock];
  acc delta[kAccBlock];
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t b = b_first + t / nblk;
    const int64_t d0 = (t % nblk) * blk_len, len = std::min(D - d0, blk_len);
    const scalar_t* __restrict__ xr = x + b * D + d0;
    std::fill(sum, sum + len, acc(0));
    int64_t n = std::max(p.start, b * KS);
    const int64_t n_end = std::min(end, (b + 1) * KS);
    while (n < n_end) {  // one run of rows sharing the baseline k
      const int64_t q = n / S, k = q % K, run_end = std::min(n_end, (q + 1) * S);
      const scalar_t* __restrict__ br = bl + ((p.Bb > 1 ? b : 0) * K + k) * D + d0;
#pragma omp simd
      for (int64_t d = 0; d < len; ++d)
        delta[d] = Convert<scalar_t>::load(xr[d]) - Convert<scalar_t>::load(br[d]);
      int64_t s = n - q * S;
      // four rows per pass over the block (same additions, same order: fewer sum loads/stores)
      for (; n + 4 <= run_end; n += 4, s += 4) {
        const acc* __restrict__ wn = w + (p.per_point ? n - p.start : s);
        const acc c0 = wn[0], c1 = wn[1], c2 = wn[2], c3 = wn[3];
        const grad_t* __restrict__ g0 = g + (n - p.start) * D + d0;
        const grad_t* __restrict__ g1 = g0 + D;
        const grad_t* __restrict__ g2 = g1 + D;
        const grad_t* __restrict__ g3 = g2 + D;
#pragma omp simd
        for (int64_t d = 0; d < len; ++d) {
          const acc dd = delta[d];
          acc v = sum[d];
          v += c0 * Convert<grad_t>::load(g0[d]) * dd;
          v += c1 * Convert<grad_t>::load(g1[d]) * dd;
          v += c2 * Convert<grad_t>::load(g2[d]) * dd;
          v += c3 * Convert<grad_t>::load(g3[d]) * dd;
          sum[d] = v;
        }
      }
      for (; n < run_end; ++n, ++s) {
        const acc c = w[p.per_point ? n - p.start : s];
        const grad_t* __restrict__ gr = g + (n - p.start) * D + d0;
#pragma omp simd
        for (int64_t d = 0; d < len; ++d) sum[d] += c * Convert<grad_t>::load(gr[d]) * delta[d];
      }
    }
    acc* __restrict__ o = out + b * D + d0;
#pragma omp simd
    for (int64_t d = 0; d < len; ++d) o[d] = sum[d] / static_cast<acc>(K);
  }
}

template <typename scalar_t, typename grad_t>
void accumulate_kernel(const grad_t* g, const scalar_t* x, const scalar_t* bl,
                       const acc_t<scalar_t>* w, acc_t<scalar_t>* out, const PathShape& p) {
  int64_t b_first, nb;
  touched_rows(p, &b_first, &nb);
  // D-blocks: at most kAccBlock (the tile's sums stay in L1), smaller when few rows are touched
  // so that every thread gets tiles. The blocking does not change any sum (bitwise).
  const int64_t tiles_per_row = (2 * at::get_num_threads() + nb - 1) / nb;
  int64_t blk_len = ((p.D + tiles_per_row - 1) / tiles_per_row + 15) / 16 * 16;
  blk_len = std::clamp(blk_len, kAccMinBlock, kAccBlock);
  const int64_t nblk = (p.D + blk_len - 1) / blk_len;
  parallel_ranges(nb * nblk, p.count * p.D, [&](int64_t t0, int64_t t1) {
    accumulate_tiles<scalar_t, grad_t>(g, x, bl, w, out, p, b_first, nblk, blk_len, t0, t1);
  });
}

at::Tensor path_points_cpu(const at::Tensor& x, const at::Tensor& baselines,
                           const at::Tensor& alphas, int64_t start, int64_t count) {
  const PathShape p = check_path_args(x, baselines, alphas, start, count, "path_points", "alphas");
  TORCH_CHECK(x.device().is_cpu(), "path_points (CPU kernel): expected CPU tensors, got ",
              x.device());
  const PathInputs in = prepare_inputs(x, baselines, alphas, p);
  at::Tensor out = at::empty({count, p.D}, in.x.options());
  advise_huge_pages(out.data_ptr(), out.nbytes());
  if (count > 0 && p.D > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, in.work, "path_points_cpu", [&] {
      points_kernel<scalar_t>(in.x.const_data_ptr<scalar_t>(),
                              in.baselines.const_data_ptr<scalar_t>(),
                              in.nodes.const_data_ptr<acc_t<scalar_t>>(),
                              out.mutable_data_ptr<scalar_t>(), p);
    });
  }
  // Mixed x / baselines dtypes were computed in the accumulation dtype: round like the reference.
  return out.scalar_type() == x.scalar_type() ? out : out.to(x.scalar_type());
}

at::Tensor path_accumulate_cpu(const at::Tensor& grads, const at::Tensor& x,
                               const at::Tensor& baselines, const at::Tensor& weights,
                               int64_t start) {
  const int64_t count = grads.dim() == 2 ? grads.size(0) : 0;
  const PathShape p =
      check_path_args(x, baselines, weights, start, count, "path_accumulate", "weights");
  TORCH_CHECK(x.device().is_cpu(), "path_accumulate (CPU kernel): expected CPU tensors, got ",
              x.device());
  const PathInputs in = prepare_inputs(x, baselines, weights, p);
  const at::Tensor g = prepare_grads(grads, p, in, "path_accumulate");
  at::Tensor out = at::zeros({p.B, p.D}, in.x.options().dtype(in.acc));
  if (count == 0 || p.D == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, in.work, "path_accumulate_cpu", [&] {
    using acc = acc_t<scalar_t>;
    const auto* xp = in.x.const_data_ptr<scalar_t>();
    const auto* bp = in.baselines.const_data_ptr<scalar_t>();
    const auto* wp = in.nodes.const_data_ptr<acc>();
    auto* op = out.mutable_data_ptr<acc>();
    if (g.scalar_type() == in.work) {
      accumulate_kernel<scalar_t, scalar_t>(g.const_data_ptr<scalar_t>(), xp, bp, wp, op, p);
    } else {
      accumulate_kernel<scalar_t, acc>(g.const_data_ptr<acc>(), xp, bp, wp, op, p);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(taylor_kernels, CPU, m) {
  m.impl("path_points", &path_points_cpu);
  m.impl("path_accumulate", &path_accumulate_cpu);
}

}  // namespace taylor_kernels
