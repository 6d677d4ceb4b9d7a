// Shared host-side pieces of ih_accumulate (the Integrated Hessians accumulation):
// argument checks and input preparation for the CPU (.cpp) and CUDA (.cu) kernels.
//
// out[b, r, j] = sum_{n in chunk, b(n) = b} w_n * hrows[n - start, r, j]
//                * Delta_n[index[r]] * Delta_n[j] / K,   Delta_n = x[b] - bl[b|0, k(n)],
// hrows [count, R, D], x [B, D], baselines [Bb, K, D], weights [S] or [B, K, S], index [R] int64.
#pragma once

#include "path_common.h"

namespace taylor_kernels {

struct IhShape {
  PathShape p;
  int64_t R;
};

// Every input made contiguous in the accumulation dtype (what the reference computes in);
// weights become [S], or the chunk's [count] slice of the flattened [B, K, S].
struct IhInputs {
  at::Tensor hrows, x, baselines, weights, index;
  at::ScalarType acc;
};

inline IhShape check_ih_args(const at::Tensor& hrows, const at::Tensor& x,
                             const at::Tensor& baselines, const at::Tensor& weights,
                             const at::Tensor& index, int64_t start) {
  const char* op = "ih_accumulate";
  TORCH_CHECK_VALUE(hrows.dim() == 3 && x.dim() == 2 && hrows.size(2) == x.size(1), op,
                    ": hrows must be [count, R, D] matching x [B, D]; got ", hrows.sizes(),
                    " and ", x.sizes());
  check_floating(hrows, op, "hrows");
  TORCH_CHECK_TYPE(index.dim() == 1 && index.scalar_type() == at::kLong, op,
                   ": index must be a 1-d int64 tensor, got ", index.scalar_type(), " ",
                   index.sizes());
  TORCH_CHECK_VALUE(index.size(0) == hrows.size(1), op, ": index has ", index.size(0),
                    " entries for ", hrows.size(1), " Hessian rows");
  TORCH_CHECK(hrows.device() == x.device() && index.device() == x.device(), op,
              ": hrows, index and x must be on the same device");
  IhShape s{check_path_args(x, baselines, weights, start, hrows.size(0), op, "weights"),
            hrows.size(1)};
  return s;
}

inline IhInputs prepare_ih_inputs(const at::Tensor& hrows, const at::Tensor& x,
                                  const at::Tensor& baselines, const at::Tensor& weights,
                                  const at::Tensor& index, const PathShape& p) {
  IhInputs in;
  in.acc = accumulation_dtype(x.scalar_type());
  in.hrows = hrows.to(in.acc).contiguous();
  in.x = x.to(in.acc).contiguous();
  in.baselines = baselines.to(in.acc).contiguous();
  at::Tensor w = p.per_point ? weights.reshape({-1}).slice(0, p.start, p.start + p.count) : weights;
  in.weights = w.to(in.acc).contiguous();
  in.index = index.contiguous();
  return in;
}

}  // namespace taylor_kernels
