"""Taylor decomposition of ``f(x) - f(b)`` into first-order, independent and interaction terms.

Around the baseline ``b`` with ``Delta = x - b`` (Deng et al., PAPERS.md section 1)::

    f(x) - f(b) = sum_{|kappa| >= 1} (1/kappa!) d^kappa f(b) Delta^kappa

Terms are grouped by order ``k = |kappa|`` through the directional coefficients
``c_k(v) = D^k f(b)[v^k] / k!`` of ``t -> f(b + t v)``:

* first order of feature i: ``c_1(Delta_i e_i) = d_i f(b) Delta_i``;
* independent term of i at order k >= 2: ``c_k(Delta_i e_i) = d_i^k f(b) Delta_i^k / k!``;
* interactions at order 2, per pair i < j: ``H_ij(b) Delta_i Delta_j`` (from Hessian-vector
  products), and aggregated per order k >= 2: ``c_k(Delta) - sum_i c_k(Delta_i e_i)``;
* residual ``f(x) - f(b) - sum_{k<=J} c_k(Delta)`` (zero for polynomials of degree <= J).

The per-order split of IG: ``c_k`` is a homogeneous polynomial of degree k in ``Delta``, so by
Euler's theorem ``sum_i Delta_i d c_k / d Delta_i = k c_k``. Feature i's IG share of the order-k
terms is ``Delta_i (d c_k / d Delta_i) / k``: on a monomial term ``a Delta^kappa`` it is
``kappa_i / |kappa|`` of the term, IG's allocation, and summed over all orders it is IG
(``d_i f(b + t Delta) = sum_m t^m / m! d_i D^m f(b)[Delta^m]`` integrated over t). The
gradient is reverse mode through the jet with the expansion point held fixed.
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import torch

from taylor_kernels.engine.derivative import hessian
from taylor_kernels.engine.jet import jet
from taylor_kernels.engine.problem import PathProblem, make_problem
from taylor_kernels.numerics import accumulation_dtype
from taylor_kernels.progress import progress_bar
from taylor_kernels.engine.guards import public_call


def _ig_by_order(model, b: torch.Tensor, delta: torch.Tensor, order: int, target, args: tuple,
                 cache: bool = True) -> torch.Tensor:
    """``[order, B, ...]``: ``Delta_i (d c_k / d Delta_i) / k`` for k = 1..order (reverse mode
    through the jet along ``Delta``, expansion point ``b`` held fixed)."""
    direction = delta.detach().clone().requires_grad_(True)
    coeffs = jet(model, b, direction.unsqueeze(1), order, target=target,
                 additional_forward_args=args, cache=cache)[1:, :, 0]               # [J, B]
    shares = []
    for k in range(1, order + 1):
        (g,) = torch.autograd.grad(coeffs[k - 1].sum(), direction, retain_graph=k < order)
        shares.append(delta * g / k)
    return torch.stack(shares)


def _pair_terms(problem: PathProblem, b: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """``[B, D, D]`` symmetric, zero diagonal: ``H_ij(b) Delta_i Delta_j`` for every pair, from
    the Hessian at the baselines ``b [B, D]`` (``D`` Hessian-vector products, chunked within
    the default memory limit; until 2026-12-02 the pairs were order-2 jets, three directions
    each for all ``D (D - 1) / 2`` pairs in one call: 4.6 GB for 256 features)."""
    acc = accumulation_dtype(delta.dtype)
    flat = delta.reshape(delta.shape[0], -1).to(acc)
    h = hessian(problem.row_function(), b).to(acc)
    upper = (h + h.transpose(1, 2)).triu_(diagonal=1).mul_(0.5)  # (i < j; exactly symmetric:
    del h                                                         # each pair computed once)
    upper.mul_(flat[:, :, None]).mul_(flat[:, None, :])
    return upper + upper.transpose(1, 2)


@dataclass
class TaylorDecomposition:
    """Terms of the expansion of ``f(x) - f(b)`` to order ``J`` around ``b`` (``B`` inputs,
    ``D`` flattened features; per-feature fields are shaped like the inputs).

    first_order ``[B, ...]``; independent ``[J-1, B, ...]`` (orders 2..J); pairwise ``[B, D, D]``
    symmetric, zero diagonal, entry (i, j) the order-2 interaction ``H_ij Delta_i Delta_j`` of
    the pair {i, j} (count each pair once); interactions ``[J-1, B]`` aggregated per order
    2..J; order_totals ``[J, B]`` = ``c_k(Delta)``; residual ``[B]``; fx, fb ``[B]``;
    ig_by_order ``[J, B, ...]`` feature i's IG share of each order's terms. Every field is
    float32 for bf16/fp16 inputs (the coefficients come in the model's precision, the sums and
    the residual are taken in float32), float64 for float64.
    """

    order: int
    first_order: torch.Tensor
    independent: torch.Tensor
    pairwise: torch.Tensor
    interactions: torch.Tensor
    order_totals: torch.Tensor
    residual: torch.Tensor
    fx: torch.Tensor
    fb: torch.Tensor
    ig_by_order: torch.Tensor

    def summary(self) -> str:
        """One block per input: ``f(x) - f(b)``, first-order sum, independent and interaction
        sums per order, the residual and its size relative to ``|f(x) - f(b)|``."""
        lines = []
        B = self.fx.shape[0]
        first = self.first_order.reshape(B, -1).sum(1)
        indep = self.independent.reshape(self.order - 1, B, -1).sum(2) if self.order > 1 \
            else None  # (order 1: no terms of higher order)
        for n in range(self.fx.shape[0]):
            delta = float(self.fx[n] - self.fb[n])
            lines.append(f"input {n}: f(x) - f(b) = {delta:.6g}")
            lines.append(f"  order 1: first-order {float(first[n]):.6g}")
            for k in range(2, self.order + 1):
                lines.append(f"  order {k}: independent {float(indep[k - 2, n]):.6g}, "
                             f"interaction {float(self.interactions[k - 2, n]):.6g}")
            rel = abs(float(self.residual[n])) / max(abs(delta), 1e-300)
            lines.append(f"  residual {float(self.residual[n]):.3g} "
                         f"({rel:.3g} of |f(x) - f(b)|)")
        return "\n".join(lines)


def _jet_target(problem: PathProblem):
    """The problem's per-input target in the form :func:`jet` takes (None or a ``[B]`` tensor)."""
    if problem.target is None or isinstance(problem.target, torch.Tensor):
        return problem.target
    raise ValueError("taylor_decomposition takes an int or [B] tensor target (one class index "
                     "per input of a [B, C] output); tuple targets are not supported")


@contextlib.contextmanager
def _step(bar, name: str, directions: int):
    """Name the step in ``bar``'s postfix; count its ``directions`` once it is done."""
    bar.set_postfix_str(name)
    yield
    bar.update(directions)


@public_call
def taylor_decomposition(model, inputs, baselines=None, target=None, *,
                         order: int = 3, cache: bool = True,
                         additional_forward_args=None,
                         progress: bool = False) -> TaylorDecomposition:
    """Expand ``f(x) - f(b)`` around the baseline into Taylor terms up to ``order``.

    Args:
        model: callable ``[B, ...] -> [B]`` or ``[B, C]``; rows must be independent (eval
            mode) and the model differentiable ``order + 1`` times (ReLU kinks count as zero
            second derivative). Coefficients come from the jet engine (:func:`tk.jet`).
        inputs: tensor ``[B, ...]``; baselines: None (zeros), a number, or a tensor shaped
            like one input or the batch (one baseline per input).
        target: class index (int or ``[B]`` tensor) when the model returns ``[B, C]``.
        order: highest order ``J`` expanded, ``1 <= J <= 15``; cost: jets of order ``J``
            along ``B * (D + 1)`` directions, and ``B * D`` Hessian-vector products for the
            pairs.
        cache: reuse the jet engine's traced graph (``False``: trace anew; see :func:`tk.jet`).
        additional_forward_args: more arguments of ``model(inputs, *args)``, as in Captum: a
            tensor ``[B, ...]`` goes with its rows (a padding mask), ``[1, ...]`` to every
            row, anything else as is.
        progress: a tqdm bar over the directions of its steps (the step in its postfix):
            ``B`` each for the jets along ``Delta``, the IG split and ``f(x)``, ``B * D`` for
            the independent terms and (``order >= 2``) for the Hessian of the pairs.
    Returns:
        :class:`TaylorDecomposition` (see its fields); ``summary()`` returns it as text.
    """
    if not isinstance(order, int) or isinstance(order, bool) or not 1 <= order <= 15:
        raise ValueError(f"order must be an integer in [1, 15], got {order!r}")
    if not isinstance(inputs, torch.Tensor):
        raise TypeError("taylor_decomposition takes one input tensor [B, ...]")
    problem = make_problem(model, inputs, baselines, target, additional_forward_args,
                           higher_order="taylor_decomposition")
    if problem.K != 1:
        raise ValueError(f"taylor_decomposition expands around one baseline per input; got "
                         f"{problem.K} baselines per input")
    tgt = _jet_target(problem)
    B, D = problem.x.shape
    feat = tuple(inputs.shape[1:])
    b = problem.baselines[:, 0].expand(B, D).reshape(B, *feat).contiguous()
    delta = problem.x.reshape(B, *feat) - b
    acc = accumulation_dtype(delta.dtype)  # bf16/fp16 terms summed in float32
    with torch.enable_grad(), progress_bar(progress, total=B * (D + 3 + D * (order >= 2)),
                                           desc="Taylor decomposition", unit="dir") as bar:
        args = problem.forward_args
        jet_ = functools.partial(jet, target=tgt, additional_forward_args=args, cache=cache)
        with _step(bar, "jet along Delta", B):
            along = jet_(model, b, delta.unsqueeze(1), order)[:, :, 0].detach().to(acc)
        with _step(bar, "independent terms", B * D):
            V = torch.diag_embed(delta.reshape(B, D)).reshape(B, D, *feat)         # Delta_i e_i
            indep = jet_(model, b, V, order).detach().to(acc)                      # [J+1, B, D]
        with _step(bar, "IG by order", B):
            ig_split = _ig_by_order(model, b, delta, order, tgt, args, cache).detach().to(acc)
        with _step(bar, "f(x)", B):
            fx = jet_(model, problem.x.reshape(B, *feat), delta.unsqueeze(1), 0)[0, :, 0]
            fx = fx.detach().to(acc)
        with _step(bar, "pair terms", B * D * (order >= 2)):
            pairs = (_pair_terms(problem, problem.baselines[:, 0].expand(B, D), delta).detach()
                     if order >= 2
                     else delta.new_zeros(B, D, D, dtype=acc))
    fb = along[0]
    return TaylorDecomposition(
        order=order, first_order=indep[1].reshape(B, *feat),
        independent=indep[2:].reshape(order - 1, B, *feat), pairwise=pairs,
        interactions=along[2:] - indep[2:].sum(-1), order_totals=along[1:],
        residual=fx - fb - along[1:].sum(0), fx=fx, fb=fb, ig_by_order=ig_split)
