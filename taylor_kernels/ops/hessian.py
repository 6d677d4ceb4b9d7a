"""Public ``ih_accumulate`` op: dispatch to the selected backend, fake kernel, autograd formula.

The native op ``torch.ops.taylor_kernels.ih_accumulate`` (schema in ``csrc/ops.cpp``; C++ and
CUDA kernels) and the Triton op ``taylor_kernels::ih_accumulate_triton`` share the fake kernel
and the backward registered by :func:`register_ih_meta`.
"""
from __future__ import annotations

import torch

from taylor_kernels import _native, backends
from taylor_kernels.op_checks import check_ih_args, values_readable
from taylor_kernels.ops.path import baseline_grad
from taylor_kernels.reference import hessian as ref
from taylor_kernels.reference.path import accumulation_dtype, node_values, path_indices


def _fake_ih_accumulate(hrows, x, baselines, weights, index, start):
    check_ih_args(hrows, x, baselines, weights, index, start, index_values=False)
    return x.new_empty(x.shape[0], hrows.shape[1], x.shape[1], dtype=accumulation_dtype(x.dtype))


def _setup(ctx, inputs, output):
    hrows, x, baselines, weights, index, start = inputs
    ctx.save_for_backward(hrows, x, baselines, weights, index)
    ctx.start = start


def _backward(ctx, grad_out):
    """``out[b,r,j] = sum_n c_n h[n,r,j] Delta_n[i_r] Delta_n[j]``, ``c_n = w_n / K``:
    ``dh = c G Delta_i Delta_j``; ``dDelta_n[m] = c sum_r h G Delta_i (j = m) + c sum_{r: i_r = m}
    sum_j h G Delta_j``; ``dx_b = sum_n dDelta_n``, ``dbl_k = -sum_n dDelta_n``;
    ``dw_n = sum_{r,j} h G Delta_i Delta_j / K``."""
    hrows, x, baselines, weights, index = ctx.saved_tensors
    K, S, dt = baselines.shape[1], weights.shape[-1], grad_out.dtype
    b, k, s = path_indices(ctx.start, hrows.shape[0], K, S, x.device)
    bi = b if baselines.shape[0] > 1 else torch.zeros_like(b)
    delta = x.to(dt)[b] - baselines.to(dt)[bi, k]
    c = (node_values(weights.to(dt), ctx.start, s) / K)[:, None, None]
    G, h, di = grad_out[b], hrows.to(dt), delta[:, index]
    out = [None] * 6
    if ctx.needs_input_grad[0]:
        out[0] = (c * G * di.unsqueeze(2) * delta.unsqueeze(1)).to(hrows.dtype)
    if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
        hG = c * h * G
        dd = (hG * di.unsqueeze(2)).sum(1)
        dd = dd.index_add(1, index, (hG * delta.unsqueeze(1)).sum(2))
        if ctx.needs_input_grad[1]:
            out[1] = torch.zeros_like(x).index_add(0, b, dd.to(x.dtype))
        if ctx.needs_input_grad[2]:
            out[2] = baseline_grad(baselines, bi, k, -dd)
    if ctx.needs_input_grad[3]:
        terms = (h * G * di.unsqueeze(2) * delta.unsqueeze(1)).sum((1, 2)) / K
        if weights.dim() == 1:
            out[3] = torch.zeros_like(weights).index_add(0, s, terms.to(weights.dtype))
        else:
            flat = torch.zeros(weights.numel(), dtype=weights.dtype, device=weights.device)
            n = torch.arange(ctx.start, ctx.start + s.shape[0], device=weights.device)
            out[3] = flat.index_add(0, n, terms.to(weights.dtype)).view_as(weights)
    return tuple(out)


def register_ih_meta(op_name: str) -> None:
    """Register the fake kernel and the autograd formula of one backend's ``ih_accumulate``."""
    torch.library.register_fake(op_name)(_fake_ih_accumulate)
    torch.library.register_autograd(op_name, _backward, setup_context=_setup)


if _native.has_cpp() and hasattr(torch.ops.taylor_kernels, "ih_accumulate"):
    register_ih_meta("taylor_kernels::ih_accumulate")


def _backend_fn(*tensors: torch.Tensor):
    name = backends.resolve_for("ih_accumulate", *tensors)
    if name == "reference":
        return ref.ih_accumulate
    if name == "triton":
        from taylor_kernels.triton import hessian as triton_hessian
        return triton_hessian.ih_accumulate
    return torch.ops.taylor_kernels.ih_accumulate


def ih_accumulate(hrows: torch.Tensor, x: torch.Tensor, baselines: torch.Tensor,
                  weights: torch.Tensor, index: torch.Tensor, start: int) -> torch.Tensor:
    """Integrated Hessians reduction of a chunk of Hessian rows from the HVP stream.

    ``out[b, r, j] = sum_{n in chunk, b(n)=b} w_n hrows[n-start, r, j] Delta[index[r]] Delta[j]
    / K`` with ``Delta = x_b - baselines[b|0, k(n)]``, ``n = (b*K + k)*S + s``.

    Args: hrows ``[count, R, D]`` (rows ``index`` of the Hessians at the chunk's path points),
    x ``[B, D]``, baselines ``[Bb, K, D]``, weights ``[S]`` or ``[B, K, S]``, index ``[R]``
    int64 feature numbers, start (first point of the chunk).
    Returns: ``[B, R, D]`` in float32 (float64 for float64 x); untouched rows are zero.
    Differentiable in hrows, x, baselines and weights.

    ``index`` entries outside ``[0, D)`` raise ``ValueError`` for CPU tensors (inside
    ``torch.compile``, where the values are unknown at trace time, the C++ kernel's own check
    raises it, and the reference backend's compiled range check a ``RuntimeError`` with the
    same message). On a GPU they
    are checked inside the kernel instead (a host-side check would synchronize on every chunk):
    nothing is read out of bounds and output row ``out[:, r]`` of a bad entry is NaN (so
    also the Triton backend on CPU tensors under ``TRITON_INTERPRET=1`` called directly
    with values the host check cannot read; Triton's interpreter does not run inside
    ``torch.compile``, :func:`~taylor_kernels.backends.resolve`). A
    device-side assert was not chosen because it leaves the CUDA context unusable for the rest
    of the process (and Triton compiles ``tl.device_assert`` only in debug mode); an error-flag
    tensor would still need a synchronizing read, which is what the check removes.
    """
    ref.check_ih_args(hrows, x, baselines, weights, index, start,
                      index_values=x.device.type == "cpu" and values_readable(index))
    return _backend_fn(x, hrows, baselines, weights)(hrows, x, baselines, weights, index, start)
