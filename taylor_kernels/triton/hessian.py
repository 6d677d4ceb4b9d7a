"""Triton kernel of ``ih_accumulate``, exposed as the ``triton_op``
``taylor_kernels::ih_accumulate_triton`` (contract: :mod:`taylor_kernels.reference.hessian`).

``out[b, r, j] = sum_{n in chunk, b(n) = b} w_n hrows[n - start, r, j] Delta_n[index[r]]
Delta_n[j] / K``. One program per (touched input ``b``, Hessian row ``r``, D-block): it walks
the chunk's points of ``b`` in ascending ``n`` (deterministic, no atomics); ``Delta`` is
recomputed from ``x`` and the baselines (cached) per point. Memory bound: reads ``count*R*D``
Hessian entries once. Arithmetic in float32 (float64 for float64 x); strided inputs are read
through their strides; offsets are int64. An ``index`` entry outside ``[0, D)`` is checked in
the kernel (no host sync): nothing is read out of bounds and its output row ``out[:, r]`` is
NaN for every touched input (see :func:`taylor_kernels.ops.hessian.ih_accumulate`). Runs on
CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from taylor_kernels.numerics import accumulation_dtype
from taylor_kernels.op_checks import check_ih_args
from taylor_kernels.ops.hessian import register_ih_meta
from taylor_kernels.triton.index import grid_cell, off
from taylor_kernels.triton.launch import launcher
from taylor_kernels.triton.path import _acc_tl, _block, _flat_nodes


@triton.jit
def _ih_accumulate_kernel(h_ptr, x_ptr, bl_ptr, w_ptr, idx_ptr, out_ptr, start, count, first_row,
                          R, D, K, S, sh_n, sh_r, sh_d, sx_b, sx_d, sbl_b, sbl_k, sbl_d, s_w,
                          per_point_weights: tl.constexpr, shared_baseline: tl.constexpr,
                          ACC: tl.constexpr, BLOCK: tl.constexpr):
    cell, d = grid_cell(D, BLOCK)  # (a 1-d grid: R or D past 65535 programs per axis)
    b = first_row + cell // R
    r = cell % R
    mask = d < D
    i = tl.load(idx_ptr + r)
    valid = (i >= 0) & (i < D)  # out-of-range index: read feature 0, write NaN
    i = tl.where(valid, i, 0)
    lo = tl.maximum(start, b * off(K, S))
    hi = tl.minimum(off(start, 1) + count, (b + 1) * off(K, S))  # (start + count: int32)
    bb = 0 if shared_baseline else b
    xv = tl.load(x_ptr + off(b, sx_b) + off(d, sx_d), mask=mask).to(ACC)
    xi = tl.load(x_ptr + off(b, sx_b) + off(i, sx_d)).to(ACC)
    acc = tl.zeros([BLOCK], dtype=ACC)
    for n32 in range(lo, hi):
        n = off(n32, 1)  # (a loop counter is int32 where it fits; n // S, n % S, n - start)
        k = (n // S) % K
        if per_point_weights:
            w = tl.load(w_ptr + off(n, s_w)).to(ACC)
        else:
            w = tl.load(w_ptr + off(n % S, s_w)).to(ACC)
        bl_row = bl_ptr + off(bb, sbl_b) + off(k, sbl_k)
        base = tl.load(bl_row + off(d, sbl_d), mask=mask).to(ACC)
        di = xi - tl.load(bl_row + off(i, sbl_d)).to(ACC)
        h = tl.load(h_ptr + off(n - start, sh_n) + off(r, sh_r) + off(d, sh_d), mask=mask).to(ACC)
        acc += (w / K * di) * h * (xv - base)
    acc = tl.where(valid, acc, float("nan"))
    tl.store(out_ptr + off(b * R + r, D) + d, acc, mask=mask)


@triton_op("taylor_kernels::ih_accumulate_triton", mutates_args=())
def ih_accumulate(hrows: torch.Tensor, x: torch.Tensor, baselines: torch.Tensor,
                  weights: torch.Tensor, index: torch.Tensor, start: int) -> torch.Tensor:
    """Triton ``ih_accumulate``: ``[B, R, D]`` chunk reduction (see the module docstring)."""
    check_ih_args(hrows, x, baselines, weights, index, start, index_values=False)  # (the
    count, R, D = hrows.shape  # kernel checks index's values: no host sync)
    B, K, S = x.shape[0], baselines.shape[1], weights.shape[-1]
    out = torch.zeros(B, R, D, dtype=accumulation_dtype(x.dtype), device=x.device)
    if count == 0 or D == 0 or R == 0:
        return out
    first_row, last_row = start // (K * S), (start + count - 1) // (K * S)
    w, s_w = _flat_nodes(weights.to(device=x.device))
    block = _block(D)
    grid = ((last_row - first_row + 1) * R * triton.cdiv(D, block),)
    launcher(_ih_accumulate_kernel)[grid](
        hrows, x, baselines, w, index.contiguous(), out, start, count, first_row, R, D, K, S,
        hrows.stride(0), hrows.stride(1), hrows.stride(2), x.stride(0), x.stride(1),
        baselines.stride(0), baselines.stride(1), baselines.stride(2), s_w,
        per_point_weights=weights.dim() == 3, shared_baseline=baselines.shape[0] == 1,
        ACC=_acc_tl(x.dtype), BLOCK=block)
    return out


register_ih_meta("taylor_kernels::ih_accumulate_triton")
