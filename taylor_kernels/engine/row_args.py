"""Per-row forward arguments (Captum's ``additional_forward_args``) for functions the engines
call on rows of a batch.

A call ``f(z, *args)`` at points ``z [N, ...]`` that belong to rows ``rows [N]`` of a batch of
``B`` inputs gets each tensor argument whose first dimension is ``B`` at those rows
(``a[rows]``), one whose first dimension is 1 expanded to ``N``, and everything else (numbers,
flags, 0-d tensors) as it is (a shared tensor of ``B`` rows is taken as per-row: close over
it instead). The derivative and jet engines call ``f`` on slices of the batch,
on probe rows and on rows repeated per direction; :class:`RowFunction` lets them say which.
"""
from __future__ import annotations

from typing import Callable

import torch


def forward_args(additional_forward_args) -> tuple:
    """Additional forward args as a tuple: None -> ``()``, a tuple as is, else a 1-tuple."""
    if additional_forward_args is None:
        return ()
    if isinstance(additional_forward_args, tuple):
        return additional_forward_args
    return (additional_forward_args,)


def check_row_args(args: tuple, B: int) -> None:
    """``ValueError`` for a tensor argument whose first dimension is neither ``B`` nor 1."""
    for a in args:
        if isinstance(a, torch.Tensor) and a.dim() > 0 and a.shape[0] not in (B, 1):
            raise ValueError(f"additional forward arg of shape {tuple(a.shape)}: its first "
                             f"dimension must be the batch ({B}, one per row) or 1 (shared); "
                             "close over a tensor of any other shape in the function")


def args_form(args: tuple, B: int | None) -> tuple:
    """What the cost of ``f(z, *args)`` per point can depend on in ``args``: each tensor's
    shape without its batch dimension of ``B`` rows (else whole) and dtype, and plain values
    (numbers, strings, flags) as they are; other objects by type."""
    form = []
    for a in args:
        if isinstance(a, torch.Tensor):
            shape = a.shape[1:] if a.dim() > 0 and a.shape[0] == B else a.shape
            form.append((tuple(shape), a.dtype))
        elif a is None or isinstance(a, (bool, int, float, str)):
            form.append(a)
        else:
            form.append(type(a).__name__)
    return tuple(form)


def select_rows(args: tuple, rows: torch.Tensor, B: int) -> tuple:
    """``args`` for the points of rows ``rows [N]`` (long) of a batch of ``B``: tensors
    ``[B, ...]`` index-selected, ``[1, ...]`` expanded to ``N``, the rest as they are."""
    check_row_args(args, B)
    out = []
    for a in args:
        if isinstance(a, torch.Tensor) and a.dim() > 0:
            a = a.index_select(0, rows.to(a.device)) if a.shape[0] == B \
                else a.expand(rows.shape[0], *a.shape[1:])
        out.append(a)
    return tuple(out)


class RowFunction:
    """``f(z, *args)`` for points of given rows of a batch of ``B``: ``run(z, rows)`` with
    ``rows [N]`` the batch rows of the ``N`` points. ``at(rows)`` is the one-argument function
    of those points; calling the object itself takes all ``B`` rows in order. ``model`` (what
    the engines' model checks look through) and ``cost_owner`` (what a measured cost is cached
    under) name the user's callable; ``cost_key`` (:func:`args_form`) is what of the arguments
    a measured cost depends on, cached beside the points' shape."""

    def __init__(self, run: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], B: int,
                 model, cost_owner=None, row_data: tuple = (), cost_key: tuple = ()):
        self.run, self.B, self.model = run, B, model
        self.cost_owner = model if cost_owner is None else cost_owner
        self.row_data = row_data  # per-row tensors [B, ...] (check R pairs rows that differ)
        self.cost_key = cost_key

    def at(self, rows: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        return lambda z: self.run(z, rows)

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        if z.shape[0] != self.B:
            raise ValueError(f"called on {z.shape[0]} rows of a batch of {self.B} without "
                             "naming them (RowFunction.at)")
        return self.run(z, torch.arange(self.B, device=z.device))

    def mapped(self, g: Callable[[torch.Tensor], torch.Tensor]) -> "RowFunction":
        """``z -> f(g(z))`` at the same rows (e.g. flattened points reshaped)."""
        return RowFunction(lambda z, rows: self.run(g(z), rows), self.B, self.model,
                           self.cost_owner, self.row_data, self.cost_key)


def with_forward_args(f: Callable, additional_forward_args, B: int) -> Callable:
    """``f`` itself without forward args, else the :class:`RowFunction` of ``f(z, *args)``
    (``ValueError`` at once for a tensor argument that is not per row or shared)."""
    args = forward_args(additional_forward_args)
    if not args:
        return f
    check_row_args(args, B)
    per_row = tuple(a for a in args if isinstance(a, torch.Tensor) and a.dim() > 0
                    and a.shape[0] == B)
    return RowFunction(lambda z, rows: f(z, *select_rows(args, rows, B)), B, f,
                       row_data=per_row, cost_key=args_form(args, B))


def at_rows(f: Callable, rows: torch.Tensor | slice, device=None) -> Callable:
    """The function of points of batch rows ``rows`` (a long tensor, or a slice of
    ``range(B)``): ``f.at(rows)`` for a :class:`RowFunction`, else ``f``."""
    if not isinstance(f, RowFunction):
        return f
    if isinstance(rows, slice):
        rows = torch.arange(f.B, device=device)[rows]
    return f.at(rows)


def mapped(f: Callable, g: Callable[[torch.Tensor], torch.Tensor]) -> Callable:
    """``z -> f(g(z))``, keeping a :class:`RowFunction`'s rows."""
    if isinstance(f, RowFunction):
        return f.mapped(g)
    return lambda z: f(g(z))
