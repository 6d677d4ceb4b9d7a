"""Triton kernels of the path ops, exposed as ``triton_op``s ``taylor_kernels::*_triton``.

Same contract as :mod:`taylor_kernels.reference.path` (``n = (b*K + k)*S + s``):

- ``path_points``: ``out[n - start] = bl[b|0, k] + alpha_n (x[b] - bl[b|0, k])``, one program
  per (point, D-block); alpha is read at ``s`` (``[S]`` nodes) or at ``n`` (``[B, K, S]``).
- ``path_accumulate``: ``out[b] = sum_n w_n g[n - start] (x[b] - bl[b|0, k]) / K``. Each
  touched row's points are cut into ``splits`` runs (:func:`accumulate_plan`, from the shapes
  alone), one program per (run, touched row, D-block); a program walks its run path by path
  (``x[b] - bl[k]`` loaded once per path), 16 points per step. With several runs a second
  kernel adds the partial sums in run order: no atomics, bitwise equal run to run.

Both are memory bound: ``path_points`` reads ``x`` and the baselines (cached across the ``S``
points of a path) and writes ``count*D`` elements; ``path_accumulate`` reads ``count*D``
gradients and writes ``B*D``. Arithmetic is in float32 (float64 for float64 inputs); offsets are int64 (:mod:`.index`).
Strided inputs are read through their strides; outputs are contiguous.
Runs on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from taylor_kernels.numerics import accumulation_dtype
from taylor_kernels.op_checks import check_accumulate_args, check_path_args
from taylor_kernels.ops.path import register_path_meta
from taylor_kernels.triton.index import grid_cell, off, row_block, split_bounds
from taylor_kernels.triton.launch import launcher

_BLOCK_D = 1024          # path_points / reduction: features per program
_BLOCK_ACC = 256         # path_accumulate: features per program ...
_BLOCK_N = 16            # ... times points per step (a [16, 256] tile in registers)
_TARGET_PROGRAMS = 1024  # path_accumulate: split rows until this many programs (132 SMs x ~8)
_MIN_POINTS_PER_SPLIT = 16
_MAX_SPLITS = 256


def _block(D: int, cap: int = _BLOCK_D) -> int:
    return min(cap, triton.next_power_of_2(max(D, 16)))


@triton.jit
def _path_points_kernel(x_ptr, bl_ptr, nodes_ptr, out_ptr, start, D, K, S,
                        sx_b, sx_d, sbl_b, sbl_k, sbl_d, s_nodes, per_point_nodes: tl.constexpr,
                        shared_baseline: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    row, d = grid_cell(D, BLOCK)
    mask = d < D
    n = start + row
    b = n // off(K, S)
    k = (n // S) % K
    if per_point_nodes:
        alpha = tl.load(nodes_ptr + off(n, s_nodes)).to(ACC)
    else:
        alpha = tl.load(nodes_ptr + off(n % S, s_nodes)).to(ACC)
    bb = 0 if shared_baseline else b
    base = tl.load(bl_ptr + off(bb, sbl_b) + off(k, sbl_k) + off(d, sbl_d), mask=mask).to(ACC)
    xv = tl.load(x_ptr + off(b, sx_b) + off(d, sx_d), mask=mask).to(ACC)
    val = base + alpha * (xv - base)
    tl.store(out_ptr + off(row, D) + d, val.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _path_partial_kernel(g_ptr, x_ptr, bl_ptr, w_ptr, dst_ptr, start, count, first_row, nb,
                         splits, D, K, S, sg_n, sg_d, sx_b, sx_d, sbl_b, sbl_k, sbl_d, s_w,
                         per_point_weights: tl.constexpr, shared_baseline: tl.constexpr,
                         ACC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK: tl.constexpr):
    """Program ``(j*nb + bi, d-block)`` (:func:`grid_cell`): split ``j`` of touched row
    ``b = first_row + bi``.
    Sums its points path by path (``x[b] - bl[k]`` loaded once per path), ``BLOCK_N`` points
    per step in a fixed tree; writes ``sum / K`` into ``out[b]`` (``splits == 1``) or the raw
    sum into ``partial[j*nb + bi]``."""
    pid, d = grid_cell(D, BLOCK)
    bi = pid % nb
    b = first_row + bi
    mask = d < D
    KS = off(K, S)
    end = off(start, 1) + count  # (start + count in int32 wraps past 2**31)
    lo, hi = split_bounds(tl.maximum(start, b * KS), tl.minimum(end, (b + 1) * KS), pid // nb,
                          splits)
    xv = tl.load(x_ptr + off(b, sx_b) + off(d, sx_d), mask=mask).to(ACC)
    bb = 0 if shared_baseline else b
    acc = tl.zeros([BLOCK], dtype=ACC)
    for p in range(lo // S, (hi + S - 1) // S):
        k = p % K
        base = tl.load(bl_ptr + off(bb, sbl_b) + off(k, sbl_k) + off(d, sbl_d),
                       mask=mask).to(ACC)
        p_hi = tl.minimum(hi, off(p + 1, S))
        gsum = tl.zeros([BLOCK], dtype=ACC)
        for n0 in range(tl.maximum(lo, off(p, S)), p_hi, BLOCK_N):
            n = off(n0, 1) + tl.arange(0, BLOCK_N)  # (loop counters: int32 where they fit)
            n_mask = n < p_hi
            if per_point_weights:
                w = tl.load(w_ptr + off(n, s_w), mask=n_mask, other=0.0).to(ACC)
            else:
                w = tl.load(w_ptr + off(n % S, s_w), mask=n_mask, other=0.0).to(ACC)
            g = tl.load(g_ptr + off(n - start, sg_n)[:, None] + off(d, sg_d)[None, :],
                        mask=n_mask[:, None] & mask[None, :], other=0.0).to(ACC)
            gsum += tl.sum(w[:, None] * g, axis=0)
        acc += gsum * (xv - base)
    if splits == 1:
        tl.store(dst_ptr + off(b, D) + d, acc / K, mask=mask)
    else:
        tl.store(dst_ptr + off(pid, D) + d, acc, mask=mask)


@triton.jit
def _reduce_splits_kernel(part_ptr, out_ptr, size, splits, K, ACC: tl.constexpr,
                          BLOCK: tl.constexpr):
    """``out[i] = (sum_j partial[j, i]) / K`` over ``size`` elements, ``j`` ascending."""
    i = row_block(tl.program_id(0), BLOCK)
    mask = i < size
    total = tl.zeros([BLOCK], dtype=ACC)
    for j in range(0, splits):
        total += tl.load(part_ptr + off(j, size) + i, mask=mask, other=0.0)
    tl.store(out_ptr + i, total / K, mask=mask)


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
    check_path_args(x, baselines, alphas, start, count)
    D = x.shape[1]
    K, S = baselines.shape[1], alphas.shape[-1]
    out = torch.empty(count, D, dtype=x.dtype, device=x.device)
    if count == 0 or D == 0:
        return out
    nodes, s_nodes = _flat_nodes(alphas.to(device=x.device))
    block = _block(D)
    grid = (count * triton.cdiv(D, block),)
    launcher(_path_points_kernel)[grid](
        x, baselines, nodes, out, start, D, K, S, x.stride(0), x.stride(1),
        baselines.stride(0), baselines.stride(1), baselines.stride(2), s_nodes,
        per_point_nodes=alphas.dim() == 3, shared_baseline=baselines.shape[0] == 1,
        ACC=_acc_tl(x.dtype), BLOCK=block)
    return out


def accumulate_plan(nb: int, D: int, count: int, K: int, S: int) -> tuple[int, int, int]:
    """``(splits, BLOCK_D, programs)`` of ``path_accumulate`` for ``nb`` touched rows: each row's
    points are cut into ``splits`` equal runs (one program each per ``BLOCK_D`` features) until
    ``_TARGET_PROGRAMS`` programs run, keeping ``>= _MIN_POINTS_PER_SPLIT`` points per run.
    Depends on the shapes only (not on the GPU), so equal inputs give bitwise equal sums."""
    block = _block(D, _BLOCK_ACC)
    units = nb * triton.cdiv(D, block)
    splits = 1
    if units < _TARGET_PROGRAMS:
        rows = min(count, K * S)  # most points one row has in the chunk
        splits = max(1, min(triton.cdiv(_TARGET_PROGRAMS, units), rows // _MIN_POINTS_PER_SPLIT,
                            _MAX_SPLITS))
    return splits, block, splits * units


@triton_op("taylor_kernels::path_accumulate_triton", mutates_args=())
def path_accumulate(grads: torch.Tensor, x: torch.Tensor, baselines: torch.Tensor,
                    weights: torch.Tensor, start: int) -> torch.Tensor:
    """Triton ``path_accumulate``: ``[B, D]`` chunk reduction (see the module docstring)."""
    check_accumulate_args(grads, x, baselines, weights, start)
    B, D = x.shape
    K, S = baselines.shape[1], weights.shape[-1]
    count = grads.shape[0]
    acc = accumulation_dtype(x.dtype)
    out = torch.zeros(B, D, dtype=acc, device=x.device)
    if count == 0 or D == 0:
        return out
    first_row = start // (K * S)
    nb = (start + count - 1) // (K * S) - first_row + 1
    w, s_w = _flat_nodes(weights.to(device=x.device))
    splits, block, _ = accumulate_plan(nb, D, count, K, S)
    dst = out if splits == 1 else torch.empty(splits * nb, D, dtype=acc, device=x.device)
    launcher(_path_partial_kernel)[(splits * nb * triton.cdiv(D, block),)](
        grads, x, baselines, w, dst, start, count, first_row, nb, splits, D, K, S,
        grads.stride(0), grads.stride(1), x.stride(0), x.stride(1),
        baselines.stride(0), baselines.stride(1), baselines.stride(2), s_w,
        per_point_weights=weights.dim() == 3, shared_baseline=baselines.shape[0] == 1,
        ACC=_acc_tl(x.dtype), BLOCK_N=_BLOCK_N, BLOCK=block)
    if splits > 1:
        rows = out[first_row:first_row + nb]  # contiguous [nb, D] view
        size = nb * D
        launcher(_reduce_splits_kernel)[(triton.cdiv(size, _BLOCK_D),)](
            dst, rows, size, splits, K, ACC=_acc_tl(x.dtype), BLOCK=_BLOCK_D)
    return out


register_path_meta("taylor_kernels::path_points_triton", "taylor_kernels::path_accumulate_triton")
