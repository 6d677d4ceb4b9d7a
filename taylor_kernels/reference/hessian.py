"""Pure-PyTorch reference of the Integrated Hessians accumulation (the truth for every backend).

A chunk of the HVP stream holds, for path points ``n in [start, start+count)`` (flattened
``n = (b*K + k)*S + s`` as in :mod:`taylor_kernels.reference.path`), the Hessian rows
``hrows[n - start, r, :] = H(p_n)[index[r], :]`` for ``R`` chosen features. The op adds

``out[b, r, j] = sum_{n in chunk, b(n) = b} w_n * hrows[n - start, r, j]
                 * Delta_{b,k(n)}[index[r]] * Delta_{b,k(n)}[j] / K``,   ``Delta = x_b - bl_k``,

i.e. ``w_s H_s (.) (Delta outer Delta)`` restricted to rows ``index``, averaged over baselines.
Weights are ``[S]`` (read at ``s``) or ``[B, K, S]`` (read at ``n``).
"""
from __future__ import annotations

import torch

from taylor_kernels.op_checks import check_ih_args, values_readable  # noqa: F401 (re-exported)
from taylor_kernels.reference.path import accumulation_dtype, node_values, path_indices


def ih_accumulate(hrows: torch.Tensor, x: torch.Tensor, baselines: torch.Tensor,
                  weights: torch.Tensor, index: torch.Tensor, start: int) -> torch.Tensor:
    """Integrated Hessians reduction of one chunk (see the module docstring).

    Args: hrows ``[count, R, D]``, x ``[B, D]``, baselines ``[Bb, K, D]`` (``Bb`` in {1, B}),
    weights ``[S]`` or ``[B, K, S]``, index ``[R]`` int64, start (first point of the chunk).
    Returns: ``[B, R, D]`` in the accumulation dtype (float64 for float64 x, else float32);
    rows of inputs the chunk does not touch are zero.
    """
    traced = torch.compiler.is_compiling()
    check_ih_args(hrows, x, baselines, weights, index, start,
                  index_values=values_readable(index))
    if traced and x.device.type == "cpu":  # the range check as a graph op (values unknown)
        torch._assert_async(((index >= 0) & (index < x.shape[1])).all(),
                            f"ih_accumulate: index entries must lie in [0, {x.shape[1]})")
    count, R, D = hrows.shape
    B, K, S = x.shape[0], baselines.shape[1], weights.shape[-1]
    acc = accumulation_dtype(x.dtype)
    b, k, s = path_indices(start, count, K, S, x.device)
    bi = b if baselines.shape[0] > 1 else torch.zeros_like(b)
    xa, ba, index = x.to(acc), baselines.to(acc), index.to(x.device)
    delta = xa[b] - ba[bi, k]                                             # [count, D]
    c = node_values(weights.to(device=x.device, dtype=acc), start, s) / K  # [count]
    # the index columns taken before the rows, not from delta: inductor (torch 2.13, CPU)
    # compiled delta[:, index]'s backward wrongly (gradients off by their size, or heap
    # corruption); the same subtraction of the same entries
    left = c.unsqueeze(1) * (xa[:, index][b] - ba[:, :, index][bi, k])     # [count, R]
    terms = left.unsqueeze(2) * hrows.to(acc) * delta.unsqueeze(1)
    return torch.zeros(B, R, D, dtype=acc, device=x.device).index_add(0, b, terms)
