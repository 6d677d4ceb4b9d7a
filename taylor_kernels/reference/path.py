"""Pure-PyTorch references of the path primitives: the truth every backend is tested against.

Shapes: ``B`` inputs, ``K`` baselines per input, ``S`` quadrature nodes, ``D`` flattened
features. A path point is addressed by the flattened index ``n = (b * K + k) * S + s``; a chunk
is the index range ``[start, start + count)``. Baselines are ``[Bb, K, D]`` with ``Bb`` either
``B`` (per-input baselines) or ``1`` (shared by every input). Nodes (alphas) and weights are
``[S]`` (one quadrature rule shared by every path) or ``[B, K, S]`` (one value per path point,
e.g. a uniform ``t`` per sample for expected gradients); a per-point value is read at the
flattened index ``n`` itself.
"""
from __future__ import annotations

import torch

from taylor_kernels.numerics import accumulation_dtype  # noqa: F401 (re-exported)
from taylor_kernels.op_checks import (check_accumulate_args, check_index_ints,  # noqa: F401
                                      check_operands, check_path_args)  # (re-exported)


def path_indices(start: int, count: int, K: int, S: int, device=None):
    """Split flattened indices ``n in [start, start+count)`` into ``(b, k, s)`` index tensors."""
    n = torch.arange(start, start + count, device=device)
    return n // (K * S), (n // S) % K, n % S


def node_values(nodes: torch.Tensor, start: int, s: torch.Tensor) -> torch.Tensor:
    """Per-point values of ``[S]`` nodes (indexed by ``s``) or ``[B, K, S]`` (by ``n``)."""
    if nodes.dim() == 1:
        return nodes[s]
    return nodes.reshape(-1)[start: start + s.shape[0]]


def path_points(x: torch.Tensor, baselines: torch.Tensor, alphas: torch.Tensor,
                start: int, count: int) -> torch.Tensor:
    """Path points ``p[n] = b_k + alpha_s (x_b - b_k)`` for ``n in [start, start+count)``.

    Args: x ``[B, D]``, baselines ``[Bb, K, D]`` (``Bb`` in {1, B}), alphas ``[S]`` or
    ``[B, K, S]``.
    Returns: ``[count, D]`` in ``x.dtype``, computed in the accumulation dtype.
    """
    check_path_args(x, baselines, alphas, start, count)
    K, S = baselines.shape[1], alphas.shape[-1]
    acc = accumulation_dtype(x.dtype)
    b, k, s = path_indices(start, count, K, S, x.device)
    base = baselines.to(acc)[b if baselines.shape[0] > 1 else torch.zeros_like(b), k]
    alpha = node_values(alphas.to(device=x.device, dtype=acc), start, s).unsqueeze(1)
    return (base + alpha * (x.to(acc)[b] - base)).to(x.dtype)


def path_accumulate(grads: torch.Tensor, x: torch.Tensor, baselines: torch.Tensor,
                    weights: torch.Tensor, start: int) -> torch.Tensor:
    """Fused IG reduction of one chunk of path gradients.

    ``out[b] = sum_{n in chunk, b(n) = b} w_{s(n)} * grads[n - start] * (x_b - b_{k(n)}) / K``.

    Args: grads ``[count, D]``, x ``[B, D]``, baselines ``[Bb, K, D]``, weights ``[S]`` or
    ``[B, K, S]``.
    Returns: ``[B, D]`` in the accumulation dtype; rows the chunk does not touch are zero.
    Summed in float64 (``index_add`` adds in sequence: in float32 a 500-step IG drifted 2.8e-5
    from float64, more than the kernels' partial sums), then rounded once.
    """
    check_accumulate_args(grads, x, baselines, weights, start)
    count = grads.shape[0]
    B, D = x.shape
    K, S = baselines.shape[1], weights.shape[-1]
    acc, wide = accumulation_dtype(x.dtype), torch.float64
    b, k, s = path_indices(start, count, K, S, x.device)
    base = baselines.to(wide)[b if baselines.shape[0] > 1 else torch.zeros_like(b), k]
    w = node_values(weights.to(device=x.device, dtype=wide), start, s).unsqueeze(1)
    terms = w * grads.to(wide) * (x.to(wide)[b] - base) / K
    out = torch.zeros(B, D, dtype=wide, device=x.device)
    return out.index_add(0, b, terms).to(acc)
