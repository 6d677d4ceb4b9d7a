"""The small forwards of a layer attribution: row 0 alone, then inputs and baselines together.

Layer IG needs the layers' activations at the inputs ``a(x)`` and at the baselines ``a(b)``,
the model's outputs ``F(x)``, ``F(b)`` (completeness gap) and check R (a row's output alone
equals its output beside other rows, :mod:`~taylor_kernels.engine.guards`). Captum runs two
forwards (inputs, baselines); capturing both and then letting the engine probe the output
shape and batch the endpoints costs four. :func:`layer_ends` gets everything from two:

1. row 0 of the inputs alone: ``a(x_0)`` and ``F(x_0)`` in a batch of one (check R's "alone",
   and the engine's shape probe);
2. ``[x; b]`` in one batch of ``2B`` rows: ``a(x)``, ``a(b)``, ``F(x)``, ``F(b)``, with row 0
   beside the others (check R's "beside"); for ``2B > PAIR_ROWS`` the inputs and the baselines
   run as two batches of ``B`` rows instead (no forward larger than Captum's), row 0 beside
   the other inputs.

Row 0's activations *and* output must agree between the two: coupling before the layer
would change the captured activations, coupling after it the outputs. When they differ a third
forward of row 0 alone tells a random model from a row-mixing one
(:func:`~taylor_kernels.engine.guards.check_alone_beside`).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from taylor_kernels.attr.layer_capture import Layers
from taylor_kernels.engine import guards
from taylor_kernels.models.outputs import model_output


@dataclass
class LayerEnds:
    """Activations ``acts_x``/``acts_b`` (flat, as :meth:`Layers.capture`, each ``[B, ...]``),
    the model's output tensors ``out_x``/``out_b [B, ...]`` and row 0's output alone
    ``alone [1, ...]`` with check R done (None: not checked yet)."""

    acts_x: tuple[torch.Tensor, ...]
    acts_b: tuple[torch.Tensor, ...]
    out_x: torch.Tensor
    out_b: torch.Tensor
    alone: torch.Tensor | None


PAIR_ROWS = 256  # up to this many rows, inputs and baselines share one forward (as the
# endpoint batch of path_engine.endpoint_values); beyond it, one forward each, as Captum's


def _row_arg(a, B: int) -> bool:
    return isinstance(a, torch.Tensor) and a.dim() > 0 and a.shape[0] == B


def layer_ends(model, spec: Layers, inputs: tuple[torch.Tensor, ...],
               baselines: tuple[torch.Tensor, ...], fargs: tuple) -> LayerEnds:
    """Activations and outputs at the inputs and baselines of ``model(*inputs, *fargs)``.

    Two forwards with check R (see the module docstring; ``ValueError`` when it fails).
    Forward args whose first dimension is ``B`` are per row (as the engine treats them).
    Where those forwards could not show row mixing (every row beside row 0 equals it, in
    value and per-row args), inside :func:`~taylor_kernels.allow_row_coupling`, or when the
    outputs or activations have no batch dimension, the inputs and the baselines run as two
    plain batches (as Captum's) and ``alone`` is None: the caller's probe then runs check R
    (and words any error)."""
    paired = _paired_ends(model, spec, inputs, baselines, fargs)
    if paired is not None:
        return paired
    acts_x, out_x = spec.capture(model, inputs + fargs, output=True)
    acts_b, out_b = spec.capture(model, baselines + fargs, output=True)
    return LayerEnds(acts_x, acts_b, model_output(out_x), model_output(out_b), None)


def _paired_ends(model, spec: Layers, inputs, baselines, fargs) -> LayerEnds | None:
    B = inputs[0].shape[0]
    together = 2 * B <= PAIR_ROWS
    if guards.row_coupling_allowed() or not _rows_differ(
            inputs, baselines if together else (), fargs, B):
        return None
    first = tuple(t[:1] for t in inputs) + tuple(a[:1] if _row_arg(a, B) else a for a in fargs)
    if together:
        batches = [tuple(torch.cat([x, b]) for x, b in zip(inputs, baselines)) + tuple(
            torch.cat([a, a]) if _row_arg(a, B) else a for a in fargs)]
    else:
        batches = [inputs + fargs, baselines + fargs]

    def alone_run():
        acts, out = spec.capture(model, first, output=True)
        return acts + (model_output(out),)

    alone = alone_run()
    runs = []
    for args in batches:
        acts, out = spec.capture(model, args, output=True)
        run = acts + (model_output(out),)
        rows = args[0].shape[0]
        if not all(isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == rows
                   for t in run):
            return None
        runs.append(run)
    guards.check_alone_beside(alone, tuple(t[:1] for t in runs[0]), alone_run)
    x_run, b_run = (tuple(t[:B] for t in runs[0]), tuple(t[B:] for t in runs[0])) \
        if together else runs
    if len(x_run) != len(b_run):
        raise ValueError("the layers return a different number of activation tensors at the "
                         "inputs and at the baselines")
    return LayerEnds(x_run[:-1], b_run[:-1], x_run[-1], b_run[-1], alone[-1])


def _rows_differ(inputs, baselines, fargs, B: int) -> bool:
    """Whether some row of the inputs or ``baselines`` (``()`` for none; stacked under the
    inputs), or of the per-row forward args, differs from row 0."""
    for x, b in itertools.zip_longest(inputs, baselines):
        flat = x if b is None else torch.cat([x, b])
        flat = flat.reshape(flat.shape[0], -1)
        if bool((flat[1:] != flat[:1]).any()):
            return True
    return any(bool((a[1:] != a[:1]).any()) for a in fargs if _row_arg(a, B))
