// Shared host-side pieces of the path ops: argument checks and input preparation.
//
// Shapes: x [B, D]; baselines [Bb, K, D] with Bb in {1, B}; nodes (alphas / weights) [S]
// (one rule for every path, read at s) or [B, K, S] (one value per point, read at n).
// A path point has the flattened index n = (b*K + k)*S + s; a chunk is [start, start+count).
// Included by the CPU (.cpp) and the CUDA (.cu) translation units: keep it light.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>

namespace taylor_kernels {

// Accumulation type: double for double, float for float / bfloat16 / half.
template <typename T>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};
template <typename T>
using acc_t = typename AccType<T>::type;

inline at::ScalarType accumulation_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// A validated chunk of path points.
struct PathShape {
  int64_t B, D, Bb, K, S;
  int64_t start, count;
  bool per_point;  // nodes are [B, K, S] (read at n - start after slicing), else [S] (read at s)
};

inline void check_floating(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()), op, ": ", name,
                   " must be a floating point tensor, got ", t.scalar_type());
}

// Validates shapes, the chunk range and devices; raises ValueError / TypeError / RuntimeError.
inline PathShape check_path_args(const at::Tensor& x, const at::Tensor& baselines,
                                 const at::Tensor& nodes, int64_t start, int64_t count,
                                 const char* op, const char* nodes_name) {
  TORCH_CHECK_VALUE(x.dim() == 2 && baselines.dim() == 3 && (nodes.dim() == 1 || nodes.dim() == 3),
                    op, ": expected x [B, D], baselines [Bb, K, D], ", nodes_name,
                    " [S] or [B, K, S]; got ", x.sizes(), ", ", baselines.sizes(), ", ",
                    nodes.sizes());
  check_floating(x, op, "x");
  check_floating(baselines, op, "baselines");
  check_floating(nodes, op, nodes_name);
  PathShape p{};
  p.B = x.size(0);
  p.D = x.size(1);
  p.Bb = baselines.size(0);
  p.K = baselines.size(1);
  p.S = nodes.size(-1);
  p.start = start;
  p.count = count;
  p.per_point = nodes.dim() == 3;
  TORCH_CHECK_VALUE(baselines.size(2) == p.D && (p.Bb == 1 || p.Bb == p.B), op, ": baselines ",
                    baselines.sizes(), " do not match x ", x.sizes(), " (need [1 or B, K, D])");
  TORCH_CHECK_VALUE(!p.per_point || (nodes.size(0) == p.B && nodes.size(1) == p.K), op,
                    ": per-path ", nodes_name, " ", nodes.sizes(), " must be [", p.B, ", ", p.K,
                    ", S]");
  const int64_t total = p.B * p.K * p.S;
  TORCH_CHECK_VALUE(start >= 0 && count >= 0 && start <= total && count <= total - start, op,
                    ": chunk [", start, ", ", start, " + ", count, ") outside [0, ", total, ")");
  TORCH_CHECK(baselines.device() == x.device() && nodes.device() == x.device(), op,
              ": x, baselines and ", nodes_name, " must be on the same device; got ", x.device(),
              ", ", baselines.device(), ", ", nodes.device());
  return p;
}

// Contiguous inputs in the dtype the kernel reads them in ("work" dtype): x.dtype when x and
// baselines agree, else both are cast to the accumulation dtype (what the reference computes
// in). Nodes become contiguous accumulation-dtype values: [S], or the chunk's [count] slice of
// the flattened [B, K, S] tensor.
struct PathInputs {
  at::Tensor x, baselines, nodes;
  at::ScalarType work, acc;
};

inline PathInputs prepare_inputs(const at::Tensor& x, const at::Tensor& baselines,
                                 const at::Tensor& nodes, const PathShape& p) {
  PathInputs in;
  in.acc = accumulation_dtype(x.scalar_type());
  in.work = baselines.scalar_type() == x.scalar_type() ? x.scalar_type() : in.acc;
  in.x = x.to(in.work).contiguous();
  in.baselines = baselines.to(in.work).contiguous();
  at::Tensor n = p.per_point ? nodes.reshape({-1}).slice(0, p.start, p.start + p.count) : nodes;
  in.nodes = n.to(in.acc).contiguous();
  return in;
}

// Gradients in the dtype the accumulate kernel reads: the work dtype, else the accumulation
// dtype (the reference casts grads to it).
inline at::Tensor prepare_grads(const at::Tensor& grads, const PathShape& p,
                                const PathInputs& in, const char* op) {
  TORCH_CHECK_VALUE(grads.dim() == 2 && grads.size(1) == p.D, op, ": grads ", grads.sizes(),
                    " do not match x [", p.B, ", ", p.D, "]");
  check_floating(grads, op, "grads");
  TORCH_CHECK(grads.device() == in.x.device(), op, ": grads must be on the device of x; got ",
              grads.device(), " and ", in.x.device());
  const at::ScalarType t = grads.scalar_type();
  return (t == in.work ? grads : grads.to(in.acc)).contiguous();
}

// Index of the first input row a chunk touches, and how many rows it touches.
inline void touched_rows(const PathShape& p, int64_t* b_first, int64_t* nb) {
  const int64_t KS = p.K * p.S;
  *b_first = p.start / KS;
  *nb = (p.start + p.count - 1) / KS - *b_first + 1;
}

}  // namespace taylor_kernels
