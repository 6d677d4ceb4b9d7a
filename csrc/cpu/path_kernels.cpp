// Vectorized loops of the path ops, compiled once per CPU capability (kernels.h).
//
// path_points:     out[n - start, :] = bl[b|0, k] + alpha_n * (x[b] - bl[b|0, k])
// path_accumulate: out[b, :] = sum_{n in chunk, b(n) = b} w_n * g[n - start] * (x[b] - bl[b|0, k]) / K
// with n = (b*K + k)*S + s, alpha_n / w_n = nodes[s] ([S]) or nodes[n] ([B, K, S]).
// Both are memory bound: one pass over the [count, D] tensor, vectors over D, (b, k, s)
// advanced per row without divisions. path_accumulate is deterministic: each output element
// is owned by one (b, D-block) tile that adds the chunk's rows in ascending n. Floating-point
// contraction is off for the kernel TUs (CMake), so every capability gives bitwise the same
// results (and path_points those of the reference).
#include "vec_io.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>

namespace taylor_kernels::cpu::CPU_CAPABILITY {
namespace {

constexpr int64_t kMinParallelWork = 1 << 15;  // elements below which one thread is faster
constexpr int64_t kPointsBlock = 8192;          // D-block of path_points when rows are few
constexpr int64_t kAccBlock = 2048;             // largest D-block of a path_accumulate tile
constexpr int64_t kAccMinBlock = 256;           // smallest, when few rows are touched
constexpr int64_t kCascadeRows = 32;            // rows summed before a partial joins the total

// at::parallel_for over [0, tasks) when the whole op touches at least kMinParallelWork elements.
template <typename F>
void parallel_tasks(int64_t tasks, int64_t work, const F& f) {
  const int64_t per_task = std::max<int64_t>(1, work / std::max<int64_t>(1, tasks));
  at::parallel_for(0, tasks, (kMinParallelWork + per_task - 1) / per_task, f);
}

// Tasks [t0, t1) of path_points: task t is row r = t / nblk, D-block t % nblk.
template <typename T>
void points_tasks(const T* x, const T* bl, const acc_t<T>* nodes, T* out, const PathShape& p,
                  int64_t nblk, int64_t blk_len, int64_t t0, int64_t t1) {
  const int64_t D = p.D, K = p.K, S = p.S;
  int64_t r = t0 / nblk, blk = t0 % nblk;
  const int64_t n = p.start + r;
  int64_t b = n / (K * S), k = (n / S) % K, s = n % S;
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t d0 = blk * blk_len, len = std::min(D - d0, blk_len);
    const VecA<T> a(nodes[p.per_point ? r : s]);
    at::vec::map2<T>([a](VecA<T> xv, VecA<T> bv) { return bv + a * (xv - bv); },
                     out + r * D + d0, x + b * D + d0,
                     bl + ((p.Bb > 1 ? b : 0) * K + k) * D + d0, len);
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

// Tiles [t0, t1) of path_accumulate: tile t is touched row b_first + t / nblk, D-block
// t % nblk; it sums the chunk's rows of that b in ascending n (deterministic). A run of rows
// sharing the baseline k sums w_n g_n, in partial sums of kCascadeRows rows (a two-level
// cascade), and adds that sum times (x - b_k) to the total: one running float32 sum of
// w g (x - b) over 500 steps was 2.8e-5 off a float64 sum, 70x Captum's pairwise torch.sum.
template <typename T, typename G>
void accumulate_tiles(const G* g, const T* x, const T* bl, const acc_t<T>* w, acc_t<T>* out,
                      const PathShape& p, int64_t b_first, int64_t nblk, int64_t blk_len,
                      int64_t t0, int64_t t1) {
  using A = acc_t<T>;
  using Vec = VecA<T>;
  constexpr int64_t W = Vec::size();
  const int64_t D = p.D, K = p.K, S = p.S, KS = K * S, end = p.start + p.count;
  __at_align__ A sum[kAccBlock];  // kAccBlock is a multiple of W: whole vectors fit
  __at_align__ A run[kAccBlock];
  __at_align__ A total[kAccBlock];
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t b = b_first + t / nblk;
    const int64_t d0 = (t % nblk) * blk_len, len = std::min(D - d0, blk_len);
    const T* xr = x + b * D + d0;
    for_vectors<W>(len, [&](int64_t d, int64_t) { Vec(0).store(total + d); });
    int64_t n = std::max(p.start, b * KS);
    const int64_t n_end = std::min(end, (b + 1) * KS);
    while (n < n_end) {  // one run of rows sharing the baseline k
      const int64_t q = n / S, k = q % K, run_end = std::min(n_end, (q + 1) * S);
      const T* br = bl + ((p.Bb > 1 ? b : 0) * K + k) * D + d0;
      for_vectors<W>(len, [&](int64_t d, int64_t) {
        Vec(0).store(sum + d);
        Vec(0).store(run + d);
      });
      int64_t in_sum = 0;  // rows in the partial sum
      auto flush = [&]() {  // the partial sum joins the run's
        for_vectors<W>(len, [&](int64_t d, int64_t) {
          (Vec::loadu(run + d) + Vec::loadu(sum + d)).store(run + d);
          Vec(0).store(sum + d);
        });
        in_sum = 0;
      };
      int64_t s = n - q * S;
      // four rows per pass over the block (same additions, same order: fewer sum loads/stores)
      for (; n + 4 <= run_end; n += 4, s += 4) {
        const A* wn = w + (p.per_point ? n - p.start : s);
        const Vec c0(wn[0]), c1(wn[1]), c2(wn[2]), c3(wn[3]);
        const G* g0 = g + (n - p.start) * D + d0;
        for_vectors<W>(len, [&](int64_t d, int64_t m) {
          Vec v = Vec::loadu(sum + d);
          v += c0 * load(g0 + d, m);
          v += c1 * load(g0 + D + d, m);
          v += c2 * load(g0 + 2 * D + d, m);
          v += c3 * load(g0 + 3 * D + d, m);
          v.store(sum + d);
        });
        if ((in_sum += 4) >= kCascadeRows) flush();
      }
      for (; n < run_end; ++n, ++s) {
        const Vec c(w[p.per_point ? n - p.start : s]);
        const G* gr = g + (n - p.start) * D + d0;
        for_vectors<W>(len, [&](int64_t d, int64_t m) {
          (Vec::loadu(sum + d) + c * load(gr + d, m)).store(sum + d);
        });
        if (++in_sum >= kCascadeRows) flush();
      }
      flush();
      for_vectors<W>(len, [&](int64_t d, int64_t m) {  // total += run * (x - b_k)
        (Vec::loadu(total + d) + Vec::loadu(run + d) * (load(xr + d, m) - load(br + d, m)))
            .store(total + d);
      });
    }
    const Vec k_vec(static_cast<A>(K));
    for_vectors<W>(len, [&](int64_t d, int64_t m) {
      (Vec::loadu(total + d) / k_vec).store(out + b * D + d0 + d, m);
    });
  }
}

}  // namespace

void path_points(const PathInputs& in, const PathShape& p, const at::Tensor& out) {
  // Tasks are rows, or (row, D-block) pairs when rows are too few to feed every thread.
  const int64_t nblk = (p.count >= 4 * at::get_num_threads() || p.D <= kPointsBlock)
                           ? 1
                           : (p.D + kPointsBlock - 1) / kPointsBlock;
  const int64_t blk_len = nblk == 1 ? p.D : kPointsBlock;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, in.work, "path_points_cpu", [&] {
    const auto* x = in.x.const_data_ptr<scalar_t>();
    const auto* bl = in.baselines.const_data_ptr<scalar_t>();
    const auto* nodes = in.nodes.const_data_ptr<acc_t<scalar_t>>();
    auto* o = out.mutable_data_ptr<scalar_t>();
    parallel_tasks(p.count * nblk, p.count * p.D, [&](int64_t t0, int64_t t1) {
      points_tasks<scalar_t>(x, bl, nodes, o, p, nblk, blk_len, t0, t1);
    });
  });
}

void path_accumulate(const at::Tensor& g, const PathInputs& in, const PathShape& p,
                     const at::Tensor& out) {
  int64_t b_first, nb;
  touched_rows(p, &b_first, &nb);
  // D-blocks: at most kAccBlock (the tile's sums stay in L1), smaller when few rows are touched
  // so that every thread gets tiles. The blocking does not change any sum (bitwise).
  const int64_t tiles_per_row = (2 * at::get_num_threads() + nb - 1) / nb;
  int64_t blk_len = ((p.D + tiles_per_row - 1) / tiles_per_row + 15) / 16 * 16;
  blk_len = std::clamp(blk_len, kAccMinBlock, kAccBlock);
  const int64_t nblk = (p.D + blk_len - 1) / blk_len;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, in.work, "path_accumulate_cpu", [&] {
    using A = acc_t<scalar_t>;
    const auto* x = in.x.const_data_ptr<scalar_t>();
    const auto* bl = in.baselines.const_data_ptr<scalar_t>();
    const auto* w = in.nodes.const_data_ptr<A>();
    auto* o = out.mutable_data_ptr<A>();
    parallel_tasks(nb * nblk, p.count * p.D, [&](int64_t t0, int64_t t1) {
      if (g.scalar_type() == in.work) {
        accumulate_tiles<scalar_t, scalar_t>(g.const_data_ptr<scalar_t>(), x, bl, w, o, p,
                                             b_first, nblk, blk_len, t0, t1);
      } else {
        accumulate_tiles<scalar_t, A>(g.const_data_ptr<A>(), x, bl, w, o, p, b_first, nblk,
                                      blk_len, t0, t1);
      }
    });
  });
}

}  // namespace taylor_kernels::cpu::CPU_CAPABILITY
