"""Integrated gradients without the ``(x - b)`` factor (Captum's ``multiply_by_inputs=False``).

``IGrad_i = int_0^1 d_i f(b + t (x - b)) dt`` on the path engine, exact where ``x_i == b_i``
(no division by ``x - b``), with every rule, chunking and budget of
:func:`~taylor_kernels.attr.integrated_gradients.integrated_gradients`.
"""
from __future__ import annotations

from typing import Callable

import torch

from taylor_kernels.attr.integrated_gradients import AttributionResult, integrated_gradients
from taylor_kernels.engine import chunking
from taylor_kernels.numerics import all_finite


class Unscaled:
    """Model in path-fraction coordinates: integrated gradients without the ``(x - b)`` factor.

    The path engine returns ``(x - b) * int_0^1 grad f(b + t (x - b)) dt`` (it multiplies by
    ``x - b`` in the fused accumulation). Captum's ``multiply_by_inputs=False`` wants the
    integral alone. Dividing by ``x - b`` is wrong where ``x == b``; instead we integrate in
    coordinates ``e`` running from ``0`` to ``1`` (so the engine's factor ``1 - 0`` is exactly
    one) and evaluate the model at ``p = b + stop(e) * (x - b) + (e - stop(e))``: its value is
    ``f(b + e (x - b))`` and its gradient with respect to ``e`` is ``grad f(p)`` itself
    (``e - stop(e)`` is zero with unit derivative). The engine then computes exactly
    ``sum_s w_s grad f(b + t_s (x - b))`` with every rule, chunking and budget it has.

    Call signature (as the engine calls models): ``(*e, *b, *d, *rest)`` with ``n`` tensors
    each of ``e`` (path coordinates), ``b`` (baselines) and ``d = x - b`` (rows of the batch,
    passed as additional forward args so the engine selects each point's rows), then the
    model's own additional arguments.
    """

    def __init__(self, model: Callable, n: int):
        self.model, self.n = model, n

    @property
    def cost_owner(self):
        """The owner of this wrapper's chunk choices: one per wrapped model
        (:func:`~taylor_kernels.engine.chunking.owner_for`), apart from the model's own (a
        point here carries its baseline and difference too)."""
        return chunking.owner_for(self.model, "unscaled") or self

    def path_factor(self, problem) -> torch.Tensor:
        """``d = x - b`` flattened like the problem's points, ``[B, D]``: its gradients are
        not those of its values (by construction), so a path's sums add up to
        ``f(x) - f(b)`` only times ``d``, which ``rule="exact"`` checks (its sums were not
        checked at all: an in-place op the trace missed went 4x off silently)."""
        ds = problem.forward_args[self.n:2 * self.n]
        return torch.cat([d.reshape(d.shape[0], -1) for d in ds], dim=1)

    def __call__(self, *args):
        n = self.n
        es, bs, ds, rest = args[:n], args[n:2 * n], args[2 * n:3 * n], args[3 * n:]
        points = tuple(b + e.detach() * d + (e - e.detach()) for e, b, d in zip(es, bs, ds))
        return self.model(*points, *rest)

    @staticmethod
    def arguments(inputs: tuple[torch.Tensor, ...], baselines: tuple[torch.Tensor, ...],
                  rest: tuple) -> tuple[tuple[torch.Tensor, ...], tuple]:
        """``(e_inputs, additional_forward_args)`` for the engine: ``e = 1`` per input (the
        engine's baseline is 0), and ``(*b, *(x - b), *rest)``; baselines dense ``[B, ...]``."""
        ones = tuple(torch.ones_like(x) for x in inputs)
        diffs = tuple((x.detach() - b).contiguous() for x, b in zip(inputs, baselines))
        return ones, tuple(b.contiguous() for b in baselines) + diffs + tuple(rest)


def unscaled_integrated_gradients(model: Callable, inputs: tuple[torch.Tensor, ...],
                                  baselines: tuple[torch.Tensor, ...], target=None,
                                  rest: tuple = (), was_tuple: bool = True,
                                  **ig_kwargs) -> AttributionResult:
    """``int_0^1 grad f(b + t (x - b)) dt`` per input tensor (see :class:`Unscaled`).

    Args: ``inputs`` and dense ``baselines`` (tuples of ``[B, ...]`` tensors), ``rest`` the
    model's additional forward args; ``ig_kwargs`` as :func:`integrated_gradients` (fixed
    rules only: the adaptive rule stops on the completeness gap, which needs the factor).
    Returns: :class:`AttributionResult` shaped like ``inputs`` (a tuple when ``was_tuple``);
    ``gap = sum(attr) - (f(x) - f(b))`` as Captum reports it for this mode.
    """
    if ig_kwargs.get("rule") == "adaptive" or ig_kwargs.get("tol") is not None:
        raise ValueError("method='adaptive' and tol= stop on the completeness gap "
                         "sum(attr) - (f(x) - f(b)), which does not apply when "
                         "multiply_by_inputs=False; use a fixed rule")
    for i, x in enumerate(inputs):
        if not all_finite(x):
            raise ValueError(f"input {i} contains NaN or Inf values")
    ones, args = Unscaled.arguments(inputs, baselines, rest)
    return integrated_gradients(Unscaled(model, len(inputs)), ones if was_tuple else ones[0],
                                0.0, target, additional_forward_args=args, **ig_kwargs)
