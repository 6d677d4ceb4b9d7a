"""What a layer method's path will hold, sized from one row before the whole-batch captures.

Layer methods capture the layer's activations for every row (and baseline) before their path
runs; under an explicit ``max_memory`` those captures ran first and reached 3.4-4.5x of an
8 MB budget before the path engine's own check refused the call. :func:`check_held` captures
the first row only, prices what the call will hold per activation element, and raises
``MemoryError`` before any whole-batch capture.
"""
from __future__ import annotations

from typing import Callable

import torch

from taylor_kernels.engine import guards, memory
from taylor_kernels.engine.row_args import select_rows


def capture_first_rows(capture: Callable[[tuple], tuple], tup: tuple, fargs: tuple) -> tuple:
    """``capture(args)`` on the first row of the inputs and their per-row forward args (two
    rows inside ``allow_row_coupling``: train-mode batch norm refuses a batch of one): what
    one row's layer activations look like, and how often the layer is called, without a
    whole-batch forward."""
    R = tup[0].shape[0]
    n = 2 if R >= 2 and guards.row_coupling_allowed() else 1
    rows = torch.arange(n, device=tup[0].device)
    return capture(tuple(t[:n] for t in tup) + select_rows(fargs, rows, R))


def check_held(capture: Callable[[tuple], tuple], tup: tuple, bls: tuple, fargs: tuple,
               max_memory, per_element: Callable[[torch.Tensor], int], *,
               chunk_size: int | None = None, rows_are: str = "rows",
               advice: str = "attribute fewer rows per call") -> tuple[tuple, int] | None:
    """``(one row's activations, bytes held)`` under an explicit ``max_memory`` (None when
    there is none, or when ``chunk_size`` fixes the chunks instead): ``capture(args)`` (the
    layer's activation tensors for ``model(*args)``) run on the first row (two inside
    ``allow_row_coupling``), and ``R * sum(numel * per_element)`` over those tensors plus the
    inputs' and baselines' bytes (the path's copies). ``MemoryError`` naming ``rows_are``
    and ``advice`` when that fills the budget."""
    if max_memory is None or chunk_size is not None:
        return None
    budget = memory.parse_budget(max_memory, tup[0].device)
    R = tup[0].shape[0]
    one = tuple(a[:1] for a in capture_first_rows(capture, tup, fargs))
    held = R * sum(a.numel() * per_element(a) for a in one) + sum(
        t.numel() * t.element_size() for t in tup + bls)
    if held >= budget:
        raise MemoryError(f"max_memory of {budget} bytes cannot hold the layer activations of "
                          f"the {R} {rows_are}: the call holds {held} bytes (the activations, "
                          "the path's coordinates and sums, its inputs); raise max_memory or "
                          f"{advice}")
    return one, held


def layer_space_bytes(a: torch.Tensor) -> int:
    """Held per activation element by a layer-space path (conductance, internal influence,
    layer GradientSHAP): the activation, and the path's float64 coordinates and sums."""
    return a.element_size() + 16


def layer_ig_bytes(a: torch.Tensor) -> int:
    """Held per activation element by layer IG: the two ends' activations and the path's
    sums (float64 at most)."""
    return 2 * a.element_size() + 8
