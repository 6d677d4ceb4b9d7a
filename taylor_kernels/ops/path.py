"""Public path ops: dispatch to the selected backend, plus fake kernels and autograd formulas.

Native ops (``torch.ops.taylor_kernels.path_points`` / ``path_accumulate``) are defined once, in
C++ (``csrc/ops.cpp``, ``TORCH_LIBRARY``); the Triton ops (``*_triton``) are ``triton_op``s. Both
get the same fake kernels and autograd formulas from :func:`register_path_meta`.
"""
from __future__ import annotations

import torch

from taylor_kernels import _native, backends
from taylor_kernels.op_checks import check_accumulate_args, check_path_args
from taylor_kernels.reference import path as ref
from taylor_kernels.reference.path import accumulation_dtype, node_values, path_indices


def _batch_index(baselines: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return b if baselines.shape[0] > 1 else torch.zeros_like(b)


def baseline_grad(baselines: torch.Tensor, bi: torch.Tensor, k: torch.Tensor,
                  rows: torch.Tensor) -> torch.Tensor:
    """Gradient ``[Bb, K, D]`` of the baselines: per-point rows ``[count, D]`` summed into
    baseline ``(bi, k)`` of each point."""
    flat = baselines.new_zeros(baselines.shape[0] * baselines.shape[1], baselines.shape[2])
    return flat.index_add(0, bi * baselines.shape[1] + k,  # (contiguous: zeros_like kept a
                          rows.to(baselines.dtype)).view(baselines.shape)  # transpose's strides)


def _node_grad(nodes: torch.Tensor, start: int, s: torch.Tensor, terms: torch.Tensor):
    """Scatter per-point ``terms [count]`` back to ``[S]`` or ``[B, K, S]`` nodes."""
    if nodes.dim() == 1:
        return torch.zeros_like(nodes).index_add(0, s, terms.to(nodes.dtype))
    flat = torch.zeros(nodes.numel(), dtype=nodes.dtype, device=nodes.device)
    idx = torch.arange(start, start + s.shape[0], device=nodes.device)
    return flat.index_add(0, idx, terms.to(nodes.dtype)).view_as(nodes)


def _fake_path_points(x, baselines, alphas, start, count):
    # the real op's checks: shape inference (torch.export, a direct call on meta tensors)
    check_path_args(x, baselines, alphas, start, count)  # took a chunk past the points
    return x.new_empty(count, x.shape[1])


def _fake_path_accumulate(grads, x, baselines, weights, start):
    check_accumulate_args(grads, x, baselines, weights, start)
    return x.new_empty(x.shape, dtype=accumulation_dtype(x.dtype))


def _setup_points(ctx, inputs, output):
    x, baselines, alphas, start, count = inputs
    ctx.save_for_backward(x, baselines, alphas)
    ctx.start = start


def _backward_points(ctx, grad_out):
    """p_n = bl + a_s (x_b - bl): dx_b = sum a_s G_n, dbl = sum (1 - a_s) G_n, da_s = sum D.G."""
    x, baselines, alphas = ctx.saved_tensors
    K, S = baselines.shape[1], alphas.shape[-1]
    b, k, s = path_indices(ctx.start, grad_out.shape[0], K, S, x.device)
    a = node_values(alphas.to(grad_out.dtype), ctx.start, s).unsqueeze(1)
    gx = gb = ga = None
    if ctx.needs_input_grad[0]:
        gx = torch.zeros_like(x).index_add(0, b, (a * grad_out).to(x.dtype))
    if ctx.needs_input_grad[1]:
        gb = baseline_grad(baselines, _batch_index(baselines, b), k, (1 - a) * grad_out)
    if ctx.needs_input_grad[2]:
        delta = x[b] - baselines[_batch_index(baselines, b), k]
        ga = _node_grad(alphas, ctx.start, s, (delta * grad_out).sum(1))
    return gx, gb, ga, None, None


def _setup_accumulate(ctx, inputs, output):
    grads, x, baselines, weights, start = inputs
    ctx.save_for_backward(grads, x, baselines, weights)
    ctx.start = start


def _backward_accumulate(ctx, grad_out):
    """out_b = sum_n c_n g_n (x_b - bl_k), c_n = w_s / K; gradients of each argument."""
    grads, x, baselines, weights = ctx.saved_tensors
    K, S = baselines.shape[1], weights.shape[-1]
    b, k, s = path_indices(ctx.start, grads.shape[0], K, S, x.device)
    bi = _batch_index(baselines, b)
    c = (node_values(weights.to(grad_out.dtype), ctx.start, s) / K).unsqueeze(1)
    delta = x.to(grad_out.dtype)[b] - baselines.to(grad_out.dtype)[bi, k]
    G = grad_out[b]
    out = [None] * 5
    if ctx.needs_input_grad[0]:
        out[0] = (c * delta * G).to(grads.dtype)
    cgG = c * grads.to(grad_out.dtype) * G
    if ctx.needs_input_grad[1]:
        out[1] = torch.zeros_like(x).index_add(0, b, cgG.to(x.dtype))
    if ctx.needs_input_grad[2]:
        out[2] = baseline_grad(baselines, bi, k, -cgG)
    if ctx.needs_input_grad[3]:
        out[3] = _node_grad(weights, ctx.start, s, (grads.to(grad_out.dtype) * delta * G).sum(1) / K)
    return tuple(out)


def register_path_meta(points_op: str, accumulate_op: str) -> None:
    """Register fake kernels and autograd formulas for a backend's pair of path ops."""
    torch.library.register_fake(points_op)(_fake_path_points)
    torch.library.register_fake(accumulate_op)(_fake_path_accumulate)
    torch.library.register_autograd(points_op, _backward_points, setup_context=_setup_points)
    torch.library.register_autograd(accumulate_op, _backward_accumulate,
                                    setup_context=_setup_accumulate)


if _native.has_cpp():
    register_path_meta("taylor_kernels::path_points", "taylor_kernels::path_accumulate")


def _backend_fns(op: str, *tensors: torch.Tensor):
    name = backends.resolve_for(op, *tensors)
    if name == "reference":
        return ref.path_points, ref.path_accumulate
    if name == "triton":
        from taylor_kernels.triton import path as triton_path
        return triton_path.path_points, triton_path.path_accumulate
    return torch.ops.taylor_kernels.path_points, torch.ops.taylor_kernels.path_accumulate


def path_points(x: torch.Tensor, baselines: torch.Tensor, alphas: torch.Tensor,
                start: int, count: int) -> torch.Tensor:
    """Path points ``p[n] = b_k + alpha_s (x_b - b_k)``, ``n = (b*K + k)*S + s``.

    Args: x ``[B, D]``; baselines ``[Bb, K, D]`` with ``Bb`` in {1, B}; alphas ``[S]``, or
    ``[B, K, S]`` for one node per path point (read at ``n``);
    the chunk ``[start, start+count)`` of the ``B*K*S`` flattened points.
    Returns: ``[count, D]`` in ``x.dtype`` (computed in float32, float64 for float64).
    """
    ref.check_path_args(x, baselines, alphas, start, count)
    return _backend_fns("path_points", x, baselines, alphas)[0](x, baselines, alphas, start,
                                                                count)


def path_accumulate(grads: torch.Tensor, x: torch.Tensor, baselines: torch.Tensor,
                    weights: torch.Tensor, start: int) -> torch.Tensor:
    """IG reduction of a chunk: ``out[b] = sum_n w_s g_n (x_b - b_k) / K`` over the chunk.

    Args: grads ``[count, D]`` (gradients at the chunk's path points), x ``[B, D]``,
    baselines ``[Bb, K, D]``, weights ``[S]`` or ``[B, K, S]``, start (first index of the chunk).
    Returns: ``[B, D]`` in float32 (float64 for float64 x); untouched rows are zero.
    Deterministic for a given chunking. Differentiable in grads, x, baselines and weights.
    """
    ref.check_accumulate_args(grads, x, baselines, weights, start)
    return _backend_fns("path_accumulate", x, grads, baselines, weights)[1](
        grads, x, baselines, weights, start)
