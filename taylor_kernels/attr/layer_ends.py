"""The small forwards of a layer attribution: one row alone, then inputs and baselines together.

Layer IG needs the layers' activations at the inputs ``a(x)`` and at the baselines ``a(b)``,
the model's outputs ``F(x)``, ``F(b)`` (completeness gap) and check R (a row's output alone
equals its output beside other rows, :mod:`~taylor_kernels.engine.guards`). Captum runs two
forwards (inputs, baselines); capturing both and then letting the engine probe the output
shape and batch the endpoints costs four. :func:`layer_ends` gets everything from two:

1. the first baseline row ``b_0`` alone: ``a(b_0)`` and ``F(b_0)`` in a batch of one (check
   R's "alone", and the engine's shape probe);
2. ``[x; b]`` in one batch of ``2B`` rows: ``a(x)``, ``a(b)``, ``F(x)``, ``F(b)``, with ``b_0``
   beside the inputs (check R's "beside").

The checked row is a baseline's because the baselines are what this batching moves: the
inputs' values are what the path's chunks see anyway, while a model whose control flow
depends on its whole batch (a branch on ``x.sum()``) would give the baselines, run beside the
inputs, other activations than Captum's separate baseline forward; that shows as a different
``b_0`` alone. For ``2B > PAIR_ROWS`` the inputs and the baselines run as two batches of ``B``
rows instead (no forward larger than Captum's) and the checked row is ``x_0``, beside the other
inputs. The checked row's activations *and* output must agree between the two forwards:
coupling before the layer would change the captured activations, coupling after it the
outputs. When they differ a third forward of that row alone tells a random model from a
row-mixing one (:func:`~taylor_kernels.engine.guards.check_alone_beside`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from taylor_kernels.attr.integrated_gradients import integrate_problem
from taylor_kernels.engine import guards
from taylor_kernels.engine.chunking import call_threads
from taylor_kernels.engine.problem import (check_batch, check_scalar_row, make_problem,
                                           one_row_batch, rows_twice, target_values)
from taylor_kernels.models.outputs import model_output
from taylor_kernels.numerics import accumulation_dtype


@dataclass
class LayerEnds:
    """Activations ``acts_x``/``acts_b`` (as the capture returns them, each ``[B, ...]``),
    the model's output tensors ``out_x``/``out_b [B, ...]`` and the checked row's output
    alone ``alone [1, ...]`` with check R done (None: not checked yet)."""

    acts_x: tuple[torch.Tensor, ...]
    acts_b: tuple[torch.Tensor, ...]
    out_x: torch.Tensor
    out_b: torch.Tensor
    alone: torch.Tensor | None


PAIR_ROWS = 256  # up to this many rows, inputs and baselines share one forward (as the
# endpoint batch of path_engine.endpoint_values); beyond it, one forward each, as Captum's


def layer_ends(capture: Callable[[tuple], tuple], inputs: tuple[torch.Tensor, ...],
               baselines: tuple[torch.Tensor, ...], fargs: tuple,
               chunk_size: int | None = None) -> LayerEnds:
    """Activations and outputs at the inputs and baselines of ``model(*inputs, *fargs)``.

    ``capture(args)`` runs ``model(*args)`` once (no grad, buffers kept) and returns
    ``(activations, output)``: a tuple of ``[N, ...]`` tensors and the model's raw output
    (:meth:`~taylor_kernels.attr.layer_capture.Layers.capture` with ``output=True``, or
    :func:`~taylor_kernels.attr.layer.layer_activations`). Two forwards with check R (see the
    module docstring; ``ValueError`` when it fails).
    Forward args whose first dimension is ``B`` are per row (as the engine treats them).
    ``chunk_size`` (path points per forward, Captum's ``internal_batch_size``) below ``2B``
    runs the inputs and the baselines apart, as Captum's forwards (a forward may accept only
    its own batch size); with one input there is then no row to check beside another, and
    the path's first batch does it.
    Where those forwards could not show row mixing (every row beside the checked one equals
    it, in value and per-row args), inside :func:`~taylor_kernels.allow_row_coupling`, or when the
    outputs or activations have no batch dimension, the inputs and the baselines run as two
    plain batches (as Captum's) and ``alone`` is None: the caller's probe then runs check R
    (and words any error)."""
    B = check_batch(inputs)
    pair_rows = PAIR_ROWS if chunk_size is None else min(PAIR_ROWS, max(chunk_size, B))
    paired = _paired_ends(capture, inputs, baselines, fargs, pair_rows)
    if paired is not None:
        return paired
    acts_x, out_x = capture(inputs + fargs)
    acts_b, out_b = capture(baselines + fargs)
    out_x, out_b = model_output(out_x), model_output(out_b)
    if B == 1 and out_x.dim() == 0:  # a squeezing forward, or one scalar for the whole batch
        check_scalar_row(capture(rows_twice(inputs + fargs))[1])
    return LayerEnds(acts_x, acts_b, one_row_batch(out_x, B), one_row_batch(out_b, B), None)


def _paired_ends(capture, inputs, baselines, fargs, pair_rows: int) -> LayerEnds | None:
    B = inputs[0].shape[0]
    n_in = len(inputs)
    row_args = [i for i, a in enumerate(fargs) if guards.is_row_tensor(a, B)]
    if 2 * B <= pair_rows:  # one batch [x; b]; the checked row is the first baseline's
        batches = [tuple(torch.cat([x, b]) for x, b in zip(inputs, baselines)) + tuple(
            torch.cat([a, a]) if i in row_args else a for i, a in enumerate(fargs))]
        check = B
    else:  # [x], [b]; the checked row is the first input's
        batches, check = [inputs + fargs, baselines + fargs], 0
    per_row = [batches[0][i] for i in range(n_in)] + [batches[0][n_in + i] for i in row_args]
    if guards.row_coupling_allowed() or not guards.rows_differing(per_row, check).any():
        return None
    first = tuple(a[check:check + 1] if i < n_in or i - n_in in row_args else a
                  for i, a in enumerate(batches[0]))

    def alone_run():
        acts, out = capture(first)
        return tuple(acts) + (one_row_batch(model_output(out), 1),)

    alone = alone_run()
    runs = []
    for args in batches:
        acts, out = capture(args)
        run = tuple(acts) + (model_output(out),)
        rows = args[0].shape[0]
        if not all(guards.is_row_tensor(t, rows) for t in run):
            return None
        runs.append(run)
    guards.check_alone_beside(alone, tuple(t[check:check + 1] for t in runs[0]), alone_run)
    x_run, b_run = (tuple(t[:B] for t in runs[0]), tuple(t[B:] for t in runs[0])) \
        if len(runs) == 1 else runs
    if len(x_run) != len(b_run):
        raise ValueError("the layers return a different number of activation tensors at the "
                         "inputs and at the baselines")
    return LayerEnds(x_run[:-1], b_run[:-1], x_run[-1], b_run[-1], alone[-1])


def integrate_from_ends(through: Callable, acts_x, acts_b, ends: LayerEnds, target, extra: tuple,
                        gap: bool = True, **ig_kwargs):
    """Layer IG on the path engine from :func:`layer_ends`: ``through(*acts, *extra)`` is the
    model with the layers' activations replaced, ``acts_x``/``acts_b`` its path ends (a tensor
    or a tuple); the endpoint outputs and, when done, check R come from ``ends`` (no probe
    forward then). ``ig_kwargs`` as :func:`~taylor_kernels.integrated_gradients` (``rule``
    and ``tol`` checked by the caller with ``check_rule_args``). Returns its
    :class:`~taylor_kernels.attr.integrated_gradients.AttributionResult`, ``gap`` against the
    model's own ``F(x) - F(b)``; with ``gap=False`` (as IG's) NaN and no gap warning, except
    for the adaptive rule and a ``tol``, which stop on it. (``ends``' forwards run anyway: the
    path starts and ends at their activations.)"""
    problem = make_problem(through, acts_x, acts_b, target, extra, checked_output=ends.alone,
                           defer_row_check=ends.alone is None)
    fx = fb = None
    if gap or ig_kwargs.get("rule") == "adaptive" or ig_kwargs.get("tol") is not None:
        acc = accumulation_dtype(problem.x.dtype)
        fx = target_values(ends.out_x, target).to(acc)
        fb = target_values(ends.out_b, target).to(acc).unsqueeze(1)
    with call_threads():
        return integrate_problem(problem, fx, fb, **ig_kwargs)
