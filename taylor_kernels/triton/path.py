"""Triton kernels of the path ops, exposed as ``triton_op``s ``taylor_kernels::*_triton``.

Same contract as :mod:`taylor_kernels.reference.path` (``n = (b*K + k)*S + s``):

- ``path_points``: ``out[n - start] = bl[b|0, k] + alpha_n (x[b] - bl[b|0, k])``, one program
  per (point, D-block); alpha is read at ``s`` (``[S]`` nodes) or at ``n`` (``[B, K, S]``).
- ``path_accumulate``: ``out[b] = sum_n w_n g[n - start] (x[b] - bl[b|0, k]) / K``, one program
  per (touched row, D-block). It walks the chunk's points of its row in ascending ``n``, path
  by path, so that ``x[b] - bl[k]`` is loaded once per path: deterministic, no atomics.

Both are memory bound: ``path_points`` reads ``x`` and the baselines (cached across the ``S``
points of a path) and writes ``count*D`` elements; ``path_accumulate`` reads ``count*D``
gradients and writes ``B*D``. Arithmetic is in float32 (float64 for float64 inputs).
Strided inputs are read through their strides; outputs are contiguous.
Runs on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from taylor_kernels.ops.path import register_path_meta
from taylor_kernels.reference.path import accumulation_dtype

_BLOCK_D = 1024


def _block(D: int) -> int:
    return min(_BLOCK_D, triton.next_power_of_2(max(D, 16)))


@triton.jit
def _path_points_kernel(x_ptr, bl_ptr, nodes_ptr, out_ptr, start, D, K, S,
                        sx_b, sx_d, sbl_b, sbl_k, sbl_d, s_nodes, per_point_nodes: tl.constexpr,
                        shared_baseline: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    d = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = d < D
    n = start + row
    b = n // (K * S)
    k = (n // S) % K
    if per_point_nodes:
        alpha = tl.load(nodes_ptr + n * s_nodes).to(ACC)
    else:
        alpha = tl.load(nodes_ptr + (n % S) * s_nodes).to(ACC)
    bb = 0 if shared_baseline else b
    base = tl.load(bl_ptr + bb * sbl_b + k * sbl_k + d * sbl_d, mask=mask).to(ACC)
    xv = tl.load(x_ptr + b * sx_b + d * sx_d, mask=mask).to(ACC)
    val = base + alpha * (xv - base)
    tl.store(out_ptr + row * D + d, val.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _path_accumulate_kernel(g_ptr, x_ptr, bl_ptr, w_ptr, out_ptr, start, count, first_row,
                            D, K, S, sg_n, sg_d, sx_b, sx_d, sbl_b, sbl_k, sbl_d, s_w,
                            per_point_weights: tl.constexpr, shared_baseline: tl.constexpr,
                            ACC: tl.constexpr, BLOCK: tl.constexpr):
    b = first_row + tl.program_id(0).to(tl.int64)
    d = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = d < D
    lo = tl.maximum(start, b * K * S)
    hi = tl.minimum(start + count, (b + 1) * K * S)
    xv = tl.load(x_ptr + b * sx_b + d * sx_d, mask=mask).to(ACC)
    bb = 0 if shared_baseline else b
    acc = tl.zeros([BLOCK], dtype=ACC)
    for p in range(lo // S, (hi + S - 1) // S):
        k = p % K
        base = tl.load(bl_ptr + bb * sbl_b + k * sbl_k + d * sbl_d, mask=mask).to(ACC)
        gsum = tl.zeros([BLOCK], dtype=ACC)
        for n in range(tl.maximum(lo, p * S), tl.minimum(hi, (p + 1) * S)):
            if per_point_weights:
                w = tl.load(w_ptr + n * s_w).to(ACC)
            else:
                w = tl.load(w_ptr + (n % S) * s_w).to(ACC)
            g = tl.load(g_ptr + (n - start) * sg_n + d * sg_d, mask=mask).to(ACC)
            gsum += w * g
        acc += gsum * (xv - base)
    acc = acc / K
    tl.store(out_ptr + b * D + d, acc, mask=mask)


def _acc_tl(dtype: torch.dtype):
    return tl.float64 if accumulation_dtype(dtype) == torch.float64 else tl.float32


def _flat_nodes(nodes: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``[S]`` nodes with their stride, or ``[B, K, S]`` as a contiguous flat view (stride 1)."""
    if nodes.dim() == 1:
        return nodes, nodes.stride(0)
    return nodes.contiguous().view(-1), 1


@triton_op("taylor_kernels::path_points_triton", mutates_args=())
def path_points(x: torch.Tensor, baselines: torch.Tensor, alphas: torch.Tensor,
                start: int, count: int) -> torch.Tensor:
    """Triton ``path_points``: ``[count, D]`` path points (see the module docstring)."""
    D = x.shape[1]
    K, S = baselines.shape[1], alphas.shape[-1]
    out = torch.empty(count, D, dtype=x.dtype, device=x.device)
    if count == 0 or D == 0:
        return out
    nodes, s_nodes = _flat_nodes(alphas.to(device=x.device))
    block = _block(D)
    grid = (count, triton.cdiv(D, block))
    wrap_triton(_path_points_kernel)[grid](
        x, baselines, nodes, out, start, D, K, S, x.stride(0), x.stride(1),
        baselines.stride(0), baselines.stride(1), baselines.stride(2), s_nodes,
        per_point_nodes=alphas.dim() == 3, shared_baseline=baselines.shape[0] == 1,
        ACC=_acc_tl(x.dtype), BLOCK=block)
    return out


@triton_op("taylor_kernels::path_accumulate_triton", mutates_args=())
def path_accumulate(grads: torch.Tensor, x: torch.Tensor, baselines: torch.Tensor,
                    weights: torch.Tensor, start: int) -> torch.Tensor:
    """Triton ``path_accumulate``: ``[B, D]`` chunk reduction (see the module docstring)."""
    B, D = x.shape
    K, S = baselines.shape[1], weights.shape[-1]
    count = grads.shape[0]
    out = torch.zeros(B, D, dtype=accumulation_dtype(x.dtype), device=x.device)
    if count == 0 or D == 0:
        return out
    first_row, last_row = start // (K * S), (start + count - 1) // (K * S)
    w, s_w = _flat_nodes(weights.to(device=x.device))
    block = _block(D)
    grid = (last_row - first_row + 1, triton.cdiv(D, block))
    wrap_triton(_path_accumulate_kernel)[grid](
        grads, x, baselines, w, out, start, count, first_row, D, K, S,
        grads.stride(0), grads.stride(1), x.stride(0), x.stride(1),
        baselines.stride(0), baselines.stride(1), baselines.stride(2), s_w,
        per_point_weights=weights.dim() == 3, shared_baseline=baselines.shape[0] == 1,
        ACC=_acc_tl(x.dtype), BLOCK=block)
    return out


register_path_meta("taylor_kernels::path_points_triton", "taylor_kernels::path_accumulate_triton")
