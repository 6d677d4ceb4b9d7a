// CUDA kernels of the path ops, registered for the CUDA dispatch key.
//
// path_points:     out[n - start, :] = bl[b|0, k] + alpha_n * (x[b] - bl[b|0, k])
// path_accumulate: out[b, :] = sum_{n in chunk, b(n) = b} w_n * g[n - start] * (x[b] - bl[b|0, k]) / K
// with n = (b*K + k)*S + s, alpha_n / w_n = nodes[s] ([S]) or the chunk slice of [B, K, S].
// Loads and stores are 16-byte vectors when D and the pointers allow it, else scalars.
// path_accumulate is deterministic: each (split, b, vector of d) is owned by one thread that adds
// its rows in ascending n; with several splits per b a second kernel adds the partial sums in
// split order. The number of splits depends on the shapes only (not on the GPU).
//
// Only c10's CUDA headers are used (stream, guard, launch check), not ATen/cuda/CUDAContext.h,
// which needs the cuBLAS / cuSPARSE headers; at::cuda::getCurrentCUDAStream is this same
// c10::cuda::getCurrentCUDAStream.
#include "../path_common.h"

#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

namespace taylor_kernels {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 1 << 16;        // grid-stride loops cover the rest
constexpr int64_t kTargetThreads = 1 << 17;    // accumulate: split rows until this many threads
constexpr int64_t kMinRowsPerSplit = 32;       // ... but keep the partial sums small
constexpr int64_t kMaxSplits = 1024;
constexpr int kUnroll = 4;                     // accumulate: rows loaded per step

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

bool aligned(const void* p, int64_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % static_cast<uintptr_t>(bytes) == 0;
}

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kThreads)
    points_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ bl,
                  const acc_t<scalar_t>* __restrict__ nodes, scalar_t* __restrict__ out,
                  int64_t start, int64_t count, int64_t D, int64_t K, int64_t S, bool shared_bl,
                  bool per_point) {
  using acc = acc_t<scalar_t>;
  using P = Pack<scalar_t, VEC>;
  const int64_t nvec = D / VEC;
  const int64_t row_step = static_cast<int64_t>(gridDim.x) * blockDim.y;
  // threadIdx.y picks the row, threadIdx.x walks its vectors (blockDim.x fits D)
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y; r < count;
       r += row_step) {
    const int64_t n = start + r, q = n / S;
    const int64_t s = n - q * S, k = q % K, b = q / K;
    const acc a = nodes[per_point ? r : s];
    const P* __restrict__ xr = reinterpret_cast<const P*>(x + b * D);
    const P* __restrict__ br = reinterpret_cast<const P*>(bl + ((shared_bl ? 0 : b) * K + k) * D);
    P* __restrict__ o = reinterpret_cast<P*>(out + r * D);
    for (int64_t v = threadIdx.x; v < nvec; v += blockDim.x) {
      const P xv = xr[v], bv = br[v];
      P ov;
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        const acc bi = static_cast<acc>(bv.v[i]);
        ov.v[i] = static_cast<scalar_t>(bi + a * (static_cast<acc>(xv.v[i]) - bi));
      }
      o[v] = ov;
    }
  }
}

// One thread per (split j, touched row bi, vector v of D): sums rows [lo, hi) of its split in
// ascending n into registers; writes out[b] / K (one split) or partial[j, bi] (several).
template <typename scalar_t, typename grad_t, int VEC>
__global__ void __launch_bounds__(kThreads)
    accumulate_kernel(const grad_t* __restrict__ g, const scalar_t* __restrict__ x,
                      const scalar_t* __restrict__ bl, const acc_t<scalar_t>* __restrict__ w,
                      acc_t<scalar_t>* __restrict__ dst, int64_t start, int64_t count, int64_t D,
                      int64_t K, int64_t S, bool shared_bl, bool per_point, int64_t b_first,
                      int64_t nb, int64_t splits) {
  using acc = acc_t<scalar_t>;
  using PX = Pack<scalar_t, VEC>;
  using PG = Pack<grad_t, VEC>;
  const int64_t nvec = D / VEC, KS = K * S, end = start + count;
  const int64_t items = splits * nb * nvec;
  for (int64_t item = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; item < items;
       item += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t v = item % nvec, q = item / nvec, bi = q % nb, j = q / nb;
    const int64_t b = b_first + bi;
    const int64_t lo_b = start > b * KS ? start : b * KS;
    const int64_t len = (end < (b + 1) * KS ? end : (b + 1) * KS) - lo_b;
    const int64_t hi = lo_b + len * (j + 1) / splits;
    int64_t n = lo_b + len * j / splits;

    acc sum[VEC], xa[VEC], delta[VEC];
    const PX xv = reinterpret_cast<const PX*>(x + b * D)[v];
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      sum[i] = acc(0);
      xa[i] = static_cast<acc>(xv.v[i]);
    }
    while (n < hi) {  // one run of rows sharing the baseline k
      const int64_t qs = n / S, k = qs % K, run_end = hi < (qs + 1) * S ? hi : (qs + 1) * S;
      const PX bv = reinterpret_cast<const PX*>(bl + ((shared_bl ? 0 : b) * K + k) * D)[v];
#pragma unroll
      for (int i = 0; i < VEC; ++i) delta[i] = xa[i] - static_cast<acc>(bv.v[i]);
      int64_t s = n - qs * S;
      for (; n + kUnroll <= run_end; n += kUnroll, s += kUnroll) {  // loads first, then adds
        PG gv[kUnroll];
        acc c[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          gv[u] = reinterpret_cast<const PG*>(g + (n + u - start) * D)[v];
          c[u] = w[per_point ? n + u - start : s + u];
        }
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
          for (int i = 0; i < VEC; ++i) sum[i] += c[u] * static_cast<acc>(gv[u].v[i]) * delta[i];
        }
      }
      for (; n < run_end; ++n, ++s) {
        const PG gv = reinterpret_cast<const PG*>(g + (n - start) * D)[v];
        const acc c = w[per_point ? n - start : s];
#pragma unroll
        for (int i = 0; i < VEC; ++i) sum[i] += c * static_cast<acc>(gv.v[i]) * delta[i];
      }
    }
    if (splits == 1) {
      acc* __restrict__ o = dst + b * D + v * VEC;
#pragma unroll
      for (int i = 0; i < VEC; ++i) o[i] = sum[i] / static_cast<acc>(K);
    } else {
      acc* __restrict__ o = dst + (j * nb + bi) * D + v * VEC;
#pragma unroll
      for (int i = 0; i < VEC; ++i) o[i] = sum[i];
    }
  }
}

// out[i] = (sum_j partial[j, i]) / K over the nb*D touched elements, splits in order.
template <typename acc>
__global__ void __launch_bounds__(kThreads)
    reduce_splits_kernel(const acc* __restrict__ partial, acc* __restrict__ out, int64_t size,
                         int64_t splits, int64_t K) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < size;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    acc total = acc(0);
    for (int64_t j = 0; j < splits; ++j) total += partial[j * size + i];
    out[i] = total / static_cast<acc>(K);
  }
}

template <typename scalar_t>
void launch_points(const PathInputs& in, const PathShape& p, at::Tensor& out,
                   cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(scalar_t);
  const scalar_t* x = in.x.const_data_ptr<scalar_t>();
  const scalar_t* bl = in.baselines.const_data_ptr<scalar_t>();
  const acc_t<scalar_t>* nodes = in.nodes.const_data_ptr<acc_t<scalar_t>>();
  scalar_t* o = out.mutable_data_ptr<scalar_t>();
  auto run = [&](auto vec) {
    constexpr int V = decltype(vec)::value;
    const int64_t nvec = p.D / V;
    int tx = 32;
    while (tx < nvec && tx < kThreads) tx *= 2;
    const dim3 block(tx, kThreads / tx);
    const int64_t blocks = std::min(ceil_div(p.count, block.y), kMaxBlocks);
    points_kernel<scalar_t, V><<<static_cast<unsigned>(blocks), block, 0, stream>>>(
        x, bl, nodes, o, p.start, p.count, p.D, p.K, p.S, p.Bb == 1, p.per_point);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  if (p.D % kVec == 0 && aligned(x, 16) && aligned(bl, 16) && aligned(o, 16)) {
    run(std::integral_constant<int, kVec>{});
  } else {
    run(std::integral_constant<int, 1>{});
  }
}

template <typename scalar_t, typename grad_t>
void launch_accumulate(const at::Tensor& grads, const PathInputs& in, const PathShape& p,
                       at::Tensor& out, cudaStream_t stream) {
  using acc = acc_t<scalar_t>;
  constexpr int kVec = 16 / (sizeof(scalar_t) > sizeof(grad_t) ? sizeof(scalar_t) : sizeof(grad_t));
  const grad_t* g = grads.const_data_ptr<grad_t>();
  const scalar_t* x = in.x.const_data_ptr<scalar_t>();
  const scalar_t* bl = in.baselines.const_data_ptr<scalar_t>();
  const acc* w = in.nodes.const_data_ptr<acc>();
  int64_t b_first, nb;
  touched_rows(p, &b_first, &nb);
  auto run = [&](auto vec) {
    constexpr int V = decltype(vec)::value;
    // Splits per b: from the shapes alone (not V, i.e. not the alignment, nor the GPU), so
    // equal inputs always give bitwise equal sums.
    const int64_t units = nb * ceil_div(p.D, 4);
    const int64_t rows = std::min(p.count, p.K * p.S);  // most rows one b has in the chunk
    int64_t splits = 1;
    if (units < kTargetThreads) {
      splits = std::min({ceil_div(kTargetThreads, units),
                         std::max<int64_t>(1, rows / kMinRowsPerSplit), kMaxSplits});
    }
    const int64_t base = nb * (p.D / V);
    at::Tensor partial;
    acc* dst = out.mutable_data_ptr<acc>();
    if (splits > 1) {
      partial = at::empty({splits, nb, p.D}, out.options());
      dst = partial.mutable_data_ptr<acc>();
    }
    const int64_t blocks = std::min(ceil_div(splits * base, kThreads), kMaxBlocks);
    accumulate_kernel<scalar_t, grad_t, V><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        g, x, bl, w, dst, p.start, p.count, p.D, p.K, p.S, p.Bb == 1, p.per_point, b_first, nb,
        splits);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (splits > 1) {
      const int64_t size = nb * p.D;
      const int64_t rblocks = std::min(ceil_div(size, kThreads), kMaxBlocks);
      reduce_splits_kernel<acc><<<static_cast<unsigned>(rblocks), kThreads, 0, stream>>>(
          partial.const_data_ptr<acc>(), out.mutable_data_ptr<acc>() + b_first * p.D, size,
          splits, p.K);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  };
  if (p.D % kVec == 0 && aligned(g, 16) && aligned(x, kVec * sizeof(scalar_t)) &&
      aligned(bl, kVec * sizeof(scalar_t))) {
    run(std::integral_constant<int, kVec>{});
  } else {
    run(std::integral_constant<int, 1>{});
  }
}

at::Tensor path_points_cuda(const at::Tensor& x, const at::Tensor& baselines,
                            const at::Tensor& alphas, int64_t start, int64_t count) {
  const PathShape p = check_path_args(x, baselines, alphas, start, count, "path_points", "alphas");
  TORCH_CHECK(x.is_cuda(), "path_points (CUDA kernel): expected CUDA tensors, got ", x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  const PathInputs in = prepare_inputs(x, baselines, alphas, p);
  at::Tensor out = at::empty({count, p.D}, in.x.options());
  if (count > 0 && p.D > 0) {
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, in.work, "path_points_cuda", [&] {
      launch_points<scalar_t>(in, p, out, stream);
    });
  }
  return out.scalar_type() == x.scalar_type() ? out : out.to(x.scalar_type());
}

at::Tensor path_accumulate_cuda(const at::Tensor& grads, const at::Tensor& x,
                                const at::Tensor& baselines, const at::Tensor& weights,
                                int64_t start) {
  const int64_t count = grads.dim() == 2 ? grads.size(0) : 0;
  const PathShape p =
      check_path_args(x, baselines, weights, start, count, "path_accumulate", "weights");
  TORCH_CHECK(x.is_cuda(), "path_accumulate (CUDA kernel): expected CUDA tensors, got ",
              x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  const PathInputs in = prepare_inputs(x, baselines, weights, p);
  const at::Tensor g = prepare_grads(grads, p, in, "path_accumulate");
  at::Tensor out = at::zeros({p.B, p.D}, in.x.options().dtype(in.acc));
  if (count == 0 || p.D == 0) return out;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, in.work, "path_accumulate_cuda", [&] {
    using acc = acc_t<scalar_t>;
    if (g.scalar_type() == in.work) {
      launch_accumulate<scalar_t, scalar_t>(g, in, p, out, stream);
    } else {  // prepare_grads gave the accumulation dtype (never equal to a float/double work)
      TORCH_INTERNAL_ASSERT(g.scalar_type() == in.acc);
      if constexpr (!std::is_same_v<scalar_t, acc>) {
        launch_accumulate<scalar_t, acc>(g, in, p, out, stream);
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(taylor_kernels, CUDA, m) {
  m.impl("path_points", &path_points_cuda);
  m.impl("path_accumulate", &path_accumulate_cuda);
}

}  // namespace taylor_kernels
