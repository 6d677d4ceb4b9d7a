"""Cross-derivative feature interactions (Lerman et al., ICCV 2021): local, greedy, global.

Local strength of a set ``I = (i_1, ..., i_k)`` at ``x``: ``|d^k f(x) / dx_i1 ... dx_ik|``.
All pairs (``k = 2``) come from the Hessian ``[B, D, D]`` of the derivative engine; chosen sets
of any order come from ``k`` nested forward-mode directional derivatives along unit vectors
``D^k f(x)[e_i1, ..., e_ik]``, vmapped over the sets (cost ``2^k`` forwards per set).

Groups: with a ``feature_mask`` of group ids ``0..m-1`` the directions are group indicators
``u_g = sum_{i in G_g} e_i`` and the group interaction is the derivative of
``t -> f(x + sum_g t_g u_g)``: ``d^k f / dt_g1 ... dt_gk = sum_{i1 in G_g1} ... sum_{ik in G_gk}
d^k f / dx_i1 ... dx_ik`` (the whole block of mixed partials summed, signs kept before the
absolute value). For pairs this is ``U^T H U`` with ``U [D, m]`` the indicator matrix.
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from taylor_kernels.engine import memory
from taylor_kernels.engine.derivative import hessian, hessian_block, higher_order_ops
from taylor_kernels.engine.jet import feature_index
from taylor_kernels.engine.no_grad_blocks import respecting_no_grad, warn_if_backward_hooks
from taylor_kernels.engine.problem import PathProblem, as_tuple, make_problem
from taylor_kernels.engine.row_args import check_row_args, forward_args, select_rows
from taylor_kernels.numerics import FORWARD_AD_LOCK, seeded_generator
from taylor_kernels.progress import extend, progress_bar
from taylor_kernels.engine.guards import public_call

MAX_SETS = 200_000
AGGREGATES = ("mean", "median", "max")


@dataclass
class LocalInteractions:
    """Signed mixed partials and the feature (or group) sets they belong to.

    ``derivatives``: ``[B, D, D]`` (all pairs; ``D`` = groups when a mask is given) or
    ``[B, n_sets]`` for ``sets`` (a list of index tuples, in the order of the last dimension).
    ``strengths`` is ``|derivatives|``, the local interaction strength.
    """

    derivatives: torch.Tensor
    sets: list[tuple[int, ...]] | None

    @property
    def strengths(self) -> torch.Tensor:
        return self.derivatives.abs()


def _group_directions(feature_mask, problem: PathProblem,
                      n_groups: int | None = None) -> torch.Tensor:
    """Group indicator directions ``[B|1, m, D]`` from integer masks shaped like the inputs'
    features ``[...]`` or ``[B|1, ...]`` (a tuple of masks for tuple inputs; ids shared);
    ``m = n_groups``, by default the largest id + 1."""
    if isinstance(feature_mask, torch.Tensor):
        masks = (feature_mask,)
    elif isinstance(feature_mask, (tuple, list)) and all(
            isinstance(m, torch.Tensor) for m in feature_mask):
        masks = tuple(feature_mask)
    else:
        raise ValueError("feature_mask must be an integer tensor or a tuple of them (one per "
                         "input)")
    if len(masks) != len(problem.inputs):
        raise ValueError(f"{len(masks)} feature masks for {len(problem.inputs)} inputs")
    flat = []
    for i, (m, x) in enumerate(zip(masks, problem.inputs)):
        if m.is_floating_point() or m.is_complex():
            raise ValueError(f"feature_mask {i} must hold integer group ids, got {m.dtype}")
        feat = tuple(x.shape[1:])
        if tuple(m.shape) == feat:
            m = m.unsqueeze(0)
        if tuple(m.shape[1:]) != feat or m.shape[0] not in (1, problem.B):
            raise ValueError(f"feature_mask {i} of shape {tuple(m.shape)} must be {feat} or "
                             f"({problem.B} or 1, *{feat}) to match input {i}")
        flat.append(m.reshape(m.shape[0], -1).to(problem.x.device))
    rows = max(m.shape[0] for m in flat)
    ids = torch.cat([m.expand(rows, -1) for m in flat], dim=1)
    if ids.min() < 0:
        raise ValueError("feature_mask group ids must be >= 0")
    m = int(ids.max()) + 1 if n_groups is None else n_groups
    return torch.nn.functional.one_hot(ids, m).transpose(1, 2).to(problem.x.dtype)


def _normalise_sets(sets, order: int, n: int) -> list[tuple[int, ...]]:
    """Validated index tuples; ``None`` gives every ``order``-subset of ``range(n)``."""
    if sets is None:
        count = math.comb(n, order)
        if count == 0:
            raise ValueError(f"order {order} over {n} features (or groups) has no {order}-subset "
                             "of distinct indices: lower the order, or pass sets= with repeats "
                             "(e.g. (0, 0, 1))")
        if count > MAX_SETS:
            raise ValueError(f"{count} sets of order {order} over {n} features: pass sets= or "
                             "use greedy_interaction_sets, or a feature_mask to group features")
        return list(itertools.combinations(range(n), order))
    out = [tuple(feature_index(i) for i in s) for s in sets]
    if not out:
        raise ValueError("sets is empty")
    for s in out:
        if len(s) != order:
            raise ValueError(f"set {s} has {len(s)} indices but order={order}; pass "
                             f"order={len(s)} (one call per order)")
        if any(not 0 <= i < n for i in s):
            raise ValueError(f"set {s} has an index outside 0..{n - 1}")
    return out


def _nested_jvp(f, x: torch.Tensor, *directions: torch.Tensor) -> torch.Tensor:
    """``D^k f(x)[v_1, ..., v_k]`` ``[B]`` for row-wise ``f: [B, D] -> [B]`` and ``v_j [B, D]``,
    by ``k`` nested forward-mode derivatives (a ``torch.no_grad()`` block of ``f`` a constant,
    as in reverse mode; no graph to the parameters: the results are detached)."""
    g = respecting_no_grad(f, graph_free=True)
    for v in directions:
        g = (lambda h, v: lambda y: torch.func.jvp(h, (y,), (v,))[1])(g, v)
    with FORWARD_AD_LOCK:  # (forward-AD levels are per process)
        return g(x)


# Resident growth per set over the estimate below (``2^order`` tangent copies of the saved
# activations, the rows and the outputs), fresh process, VmHWM over a warmed-up baseline,
# 2-core Xeon, 2026-12-02, after the nested forward stopped recording a backward graph
# (``graph_free``): orders 3-4, 1-32 sets per chunk, 0.5-1.1 on 784-, 1024- and 2048-wide tanh
# MLPs, 1.6 on a SiLU MLP, 1.75 (order 3) and 2.3 (order 4) on a 2-conv tanh CNN with a
# feature mask, 0.7 on a 2-layer BERT's token groups. (With the graph it was 3-5x; the factor
# was 5.)
NESTED_FORWARD_FACTOR = 2.5


def _weight_copies(acts: memory.SavedBytes, probe_input: torch.Tensor, order: int) -> int:
    """Bytes of the weight copies nested forward mode holds in one chunk: PyTorch's forward
    AD copies the matrix a product reads (``3^k - 2^k`` copies in a ``k``-fold nested
    forward, counted with the profiler, torch 2.13), and some are alive at once whatever the
    chunk's size. Resident over the sets, measured as above: up to 1, 5 and 9 times the
    weights' bytes at orders 2, 3 and 4 (one 1024- or 2048-wide layer; less spread over six
    512-wide layers); counted as ``2^k`` times the matrices the probe forward (``acts``) saved
    for a backward, but its input: the weights its products read, however ``f`` reaches them
    (a model behind a global too, which a walk of ``f``'s modules missed), and not embedding
    tables (a lookup saves its indices; a tied LM head's weight counts, once). (With the
    backward graph recorded, most of the ``3^k - 2^k`` copies stayed to the end: 54-60 MB for
    a 1024-wide MLP's 4 MB weights at order 3.)"""
    own = probe_input.untyped_storage().data_ptr()
    return 2 ** order * sum(n for ptr, n in acts.leaf_matrices.items() if ptr != own)


def _set_chunk(f, x: torch.Tensor, order: int, n_sets: int, max_memory) -> int:
    """Sets per chunk so that ``2^order`` tangent copies of the forward's activations (measured
    on one forward through the rows), times ``NESTED_FORWARD_FACTOR``, and the chunk's
    ``order`` directions fit the budget beside the weights' copies (:func:`_weight_copies`)."""
    acts, probe = memory.SavedBytes(), x.detach().clone().requires_grad_(True)
    with acts, torch.enable_grad():
        out = f(probe)
    item = x.element_size()
    per_set = (NESTED_FORWARD_FACTOR * (2 ** order)
               * (acts.total + x.numel() * item + out.numel() * out.element_size())
               + order * x.numel() * item)
    budget = memory.parse_budget(max_memory, x.device)
    if isinstance(budget, memory.DefaultBudget):
        return memory.chunk_size_for(budget, per_set, n_sets)
    copies = _weight_copies(acts, probe, order)
    if per_set + copies > budget:
        raise MemoryError(f"max_memory of {budget} bytes is too small for one set of order "
                          f"{order} over these {x.shape[0]} rows (estimated {int(per_set)} "
                          f"bytes: 2^{order} nested forward passes, beside {copies} bytes of "
                          f"the {2 ** order} weight copies counted for PyTorch's nested "
                          "forward mode); raise max_memory or attribute fewer rows per call")
    return memory.chunk_size_for(budget - copies, per_set, n_sets)


def _mixed_partials(f, x: torch.Tensor, directions: torch.Tensor | None,
                    sets: list[tuple[int, ...]], chunk: int, bar) -> torch.Tensor:
    """``D^k f(x)[d_{s_1}, ..., d_{s_k}]`` for every set ``s``: ``[B, n_sets]``.

    ``f: [B, D] -> [B]`` (rows independent), ``x [B, D]``, ``directions [B|1, n_dir, D]``
    (group indicators; None: unit vectors), ``sets`` tuples of ``k`` direction indices, vmapped
    ``chunk`` sets at a time (their directions are built per chunk; ``bar`` counts each
    chunk's ``B * chunk`` derivatives).
    """
    idx = torch.tensor(sets, dtype=torch.long, device=x.device)  # [n, k]
    B, D = x.shape
    nested = torch.func.vmap(lambda *vs: _nested_jvp(f, x, *vs))
    parts = []
    with higher_order_ops(f):  # nested forward mode: math attention, composite norms
        for part in idx.split(chunk):
            if directions is None:  # unit vectors of the chunk's features (a D x D identity
                # was built for every call: 38 MB for a 3x32x32 input)
                dirs = torch.nn.functional.one_hot(part.t(), D).to(x.dtype)  # [k, n, D]
                dirs = dirs.unsqueeze(2).expand(-1, -1, B, -1)                 # [k, n, B, D]
            else:
                dirs = directions.expand(B, -1, -1)[:, part].permute(2, 1, 0, 3)  # [k, n, B, D]
            parts.append(nested(*dirs.unbind(0)).detach())
            bar.update(B * part.shape[0])
    return torch.cat(parts).transpose(0, 1)


@dataclass
class _Batch:
    """One batch's interactions to compute: the row function ``f``, its points ``x [B, D]``,
    group ``directions`` (None: features), the ``order`` and the ``sets`` (None: all pairs,
    by the Hessian)."""

    f: Callable
    x: torch.Tensor
    directions: torch.Tensor | None
    order: int
    sets: list[tuple[int, ...]] | None

    @property
    def per_row(self) -> int:
        """Derivatives per row, a bar's unit: one per set, or per Hessian row (one HVP)."""
        if self.sets is not None:
            return len(self.sets)
        return self.x.shape[1] if self.directions is None else self.directions.shape[1]


def _local(batch: _Batch, max_memory, bar) -> torch.Tensor:
    """Derivatives at the batch's points ``[B, D]``: ``[B, D, D]`` / ``[B, m, m]`` or
    ``[B, n_sets]``, counted on ``bar`` (the Hessian's at its end, the sets' per chunk)."""
    f, x, directions = batch.f, batch.x, batch.directions
    if batch.sets is None:
        if directions is None:
            out = hessian(f, x, max_memory=max_memory)
        else:
            out = hessian_block(f, x, directions.expand(x.shape[0], -1, -1),
                                max_memory=max_memory)
        bar.update(x.shape[0] * batch.per_row)
        return out
    chunk = _set_chunk(f, x, batch.order, len(batch.sets), max_memory)
    return _mixed_partials(f, x, directions, batch.sets, chunk, bar)


@public_call
def interactions(model, inputs, target=None, *, order: int = 2, sets=None, feature_mask=None,
                 max_memory=None, additional_forward_args=None,
                 progress: bool = False) -> LocalInteractions:
    """Local cross-derivative interactions ``d^k f(x) / dx_i1 ... dx_ik`` (signed; take
    ``.strengths`` for ``|.|``).

    Args:
        model: callable ``model(*inputs) -> [B, ...]``; rows must be independent (no
            batch-norm in training mode).
        inputs: tensor ``[B, ...]`` or tuple of tensors; features are indexed in the flattened,
            concatenated order ``0..D-1``.
        target: output index per input (int, tuple, tensor ``[B]``, list); None for scalar
            outputs.
        order: ``k >= 2``. With ``sets=None`` and ``order=2`` the result is the Hessian
            ``[B, D, D]``; with ``sets=None`` and ``order > 2``, every ``k``-subset.
        sets: index tuples of length ``order`` (repeats allowed: ``(i, i, j)`` is
            ``d_i^2 d_j f``); result ``[B, n_sets]``.
        feature_mask: integer group ids (shaped like one input's features or ``[B|1, ...]``;
            a tuple for tuple inputs): indices in ``sets`` and the result then refer to groups,
            with the group-indicator definition of the module docstring.
        max_memory: bytes (or ``"512MB"``) for one chunk of HVPs or of vmapped sets.
        additional_forward_args: more arguments of ``model(*inputs, *args)``, as in Captum: a
            tensor ``[B, ...]`` goes with its rows (a padding mask), ``[1, ...]`` to every
            row, anything else as is.
        progress: a tqdm bar over the ``B * n_sets`` derivatives (``B * D``, one
            Hessian-vector product per Hessian row, for all pairs), counted per chunk of sets
            (all pairs: at the end).
    Returns:
        :class:`LocalInteractions` (``derivatives``, ``sets``, ``strengths``).
    """
    batch = _batch(model, inputs, target, order, sets, feature_mask, additional_forward_args)
    with progress_bar(progress, total=batch.x.shape[0] * batch.per_row, desc="interactions",
                      unit="deriv") as bar:
        return LocalInteractions(_local(batch, max_memory, bar), batch.sets)


def _batch(model, inputs, target, order, sets, feature_mask, additional_forward_args,
           n_groups: int | None = None) -> _Batch:
    """The checked work of :func:`interactions` on ``inputs``, with the number of feature
    groups given (``n_groups``: a batch of a global ranking whose per-row masks lack the
    highest id)."""
    if not isinstance(order, int) or order < 2:
        raise ValueError(f"order must be an integer >= 2, got {order!r}")
    problem = make_problem(model, inputs, None, target, additional_forward_args,
                           higher_order="interactions")
    directions = None if feature_mask is None else _group_directions(feature_mask, problem,
                                                                       n_groups)
    n = problem.x.shape[1] if directions is None else directions.shape[1]
    set_list = None if sets is None and order == 2 else _normalise_sets(sets, order, n)
    if set_list is not None:  # (forward mode; the Hessian of order 2 runs the hooks)
        warn_if_backward_hooks(model, "interactions")
    # one function of any rows' points: each row's target and forward args go with it
    return _Batch(problem.row_function(), problem.x, directions, order, set_list)


def _aggregate(strengths: torch.Tensor, how: str) -> torch.Tensor:
    """Reduce ``|d|`` over the rows (dim 0) by ``mean``, ``median`` or ``max``."""
    if how not in AGGREGATES:
        raise ValueError(f"aggregate must be one of {AGGREGATES}, got {how!r}")
    if how == "mean":
        return strengths.mean(dim=0)
    if how == "median":  # (the mean of the two middle values for an even count: torch's
        ordered = strengths.sort(dim=0).values  # median takes the lower one)
        n = ordered.shape[0]
        return (ordered[(n - 1) // 2] + ordered[n // 2]) / 2
    return strengths.amax(dim=0)


def _ranking(values: torch.Tensor, sets) -> list[tuple[tuple[int, ...], float]]:
    """``(set, strength)`` pairs, strongest first; a ``[n, n]`` matrix ranks its pairs i < j."""
    if sets is None:
        i, j = torch.triu_indices(values.shape[0], values.shape[1], offset=1)
        sets, values = list(zip(i.tolist(), j.tolist())), values[i, j]
    order = torch.argsort(values, descending=True, stable=True).tolist()
    return [(tuple(sets[k]), float(values[k])) for k in order]


@public_call
def greedy_interaction_sets(model, inputs, target=None, *, max_order: int = 3, beam: int = 5,
                            aggregate: str = "mean", feature_mask=None, max_memory=None,
                            additional_forward_args=None, progress: bool = False
                            ) -> dict[int, list[tuple[tuple[int, ...], float]]]:
    """Greedy search for strong higher-order interactions (Lerman et al.): rank all pairs by
    ``aggregate_b |d^2 f(x_b) / dx_i dx_j|``, then for ``k = 3..max_order`` extend each of the
    ``beam`` strongest ``(k-1)``-sets by one more feature (group) and rank the new sets by
    ``aggregate_b |d^k f(x_b) / dx_S|``.

    Args: as :func:`interactions`; ``inputs`` ``[B, ...]`` are the points aggregated over;
    ``progress``: one tqdm bar over the derivatives of every order (its total grows by each
    order's candidates as the beam finds them; the order in its postfix).
    Returns: ``{k: [(set, strength), ...]}`` for ``k = 2..max_order``, strongest first (order 2
    lists every pair; higher orders only the candidates the beam generated).
    """
    if not isinstance(max_order, int) or max_order < 2:
        raise ValueError(f"max_order must be an integer >= 2, got {max_order!r}")
    if not isinstance(beam, int) or beam < 1:
        raise ValueError(f"beam must be a positive integer, got {beam!r}")
    with progress_bar(progress, desc="greedy interaction sets", unit="deriv") as bar:
        def strengths(order: int, sets) -> torch.Tensor:  # one order's, counted on the bar
            batch = _batch(model, inputs, target, order, sets, feature_mask,
                           additional_forward_args)
            bar.set_postfix_str(f"order {order}/{max_order}", refresh=False)
            extend(bar, batch.x.shape[0] * batch.per_row)
            return _local(batch, max_memory, bar).abs()

        pairs = strengths(2, None)
        found = {2: _ranking(_aggregate(pairs, aggregate), None)}
        n = pairs.shape[1]
        for k in range(3, max_order + 1):
            grown = {tuple(sorted(s + (j,))) for s, _ in found[k - 1][:beam]
                     for j in range(n) if j not in s}
            if not grown:
                break
            cand = sorted(grown)
            found[k] = _ranking(_aggregate(strengths(k, cand), aggregate), cand)
    return found


@dataclass
class GlobalInteractions:
    """Interaction strengths aggregated over a data set: ``strengths`` ``[D, D]`` (pairs) or
    ``[n_sets]``, the ``sets`` (None for the pair matrix), the ``ranking`` (strongest first)
    and the data ``rows`` used."""

    strengths: torch.Tensor
    sets: list[tuple[int, ...]] | None
    ranking: list[tuple[tuple[int, ...], float]]
    rows: torch.Tensor


def representative_rows(data: torch.Tensor, n_random: int = 0, seed: int | None = None
                        ) -> torch.Tensor:
    """Indices of the rows of ``data [N, ...]`` nearest (Euclidean) to the feature-wise mean,
    median, minimum and maximum (Lerman et al.'s representative points; the mode is left out
    for continuous data), then ``n_random`` distinct random rows; duplicates dropped."""
    flat = data.reshape(data.shape[0], -1).double()
    targets = torch.stack([flat.mean(0), flat.median(0).values, flat.amin(0), flat.amax(0)])
    near = torch.cdist(targets, flat).argmin(dim=1).tolist()
    gen = seeded_generator(seed, default=0)
    extra = torch.randperm(data.shape[0], generator=gen)[:n_random].tolist()
    return torch.tensor(list(dict.fromkeys(near + extra)), dtype=torch.long)


def _slice_target(target, rows: torch.Tensor):
    if isinstance(target, torch.Tensor) and target.numel() > 1:
        return target[rows.to(target.device)]
    if isinstance(target, list):
        return [target[i] for i in rows.tolist()]
    return target


def _slice_mask(mask, rows: torch.Tensor, inputs: tuple[torch.Tensor, ...]):
    """A feature mask (or a tuple, one per input) with the batch's ``rows`` taken from its
    per-row masks ``[N, ...]`` (shaped like their input); shared masks unchanged."""
    if isinstance(mask, tuple):
        return tuple(_slice_mask(m, rows, (t,)) for m, t in zip(mask, inputs))
    t = inputs[0]
    if isinstance(mask, torch.Tensor) and mask.dim() == t.dim() and mask.shape[0] == t.shape[0]:
        return mask[rows.to(mask.device)]
    return mask


@public_call
def global_interactions(model, data, target=None, *, order: int = 2, sets=None,
                        feature_mask=None, aggregate: str = "mean", points: str = "all",
                        n_random: int = 0, seed: int | None = None, batch_size: int = 256,
                        max_memory=None, additional_forward_args=None,
                        progress: bool = False) -> GlobalInteractions:
    """Global ranking: ``aggregate_n |d^k f(x_n) / dx_S|`` over data rows ``x_n``.

    Args:
        data: tensor ``[N, ...]`` or tuple of tensors (the points); target as in
            :func:`interactions` (a ``[N]`` tensor or list is sliced with the rows).
        order, sets, feature_mask, max_memory, additional_forward_args: as
            :func:`interactions` (a per-row mask ``[N, ...]`` and per-row forward args are
            sliced with the rows).
        aggregate: ``mean``, ``median`` or ``max`` over the points.
        points: ``"all"`` rows of ``data``, or ``"representative"`` (:func:`representative_rows`
            of the first input, plus ``n_random`` random rows drawn with ``seed``).
        batch_size: rows per :func:`interactions` call.
        progress: one tqdm bar over the derivatives of all the points (rows times sets, or
            times Hessian rows for all pairs), counted per chunk of sets (all pairs: per
            batch).
    Returns: :class:`GlobalInteractions`.
    """
    tup, was_tuple = as_tuple(data)
    if points == "all":
        rows = torch.arange(tup[0].shape[0])
    elif points == "representative":
        rows = representative_rows(tup[0], n_random, seed)
    else:
        raise ValueError(f"points must be 'all' or 'representative', got {points!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if len(rows) == 0:
        raise ValueError("data holds no rows: pass at least one point, [N >= 1, ...]")
    fargs = forward_args(additional_forward_args)
    check_row_args(fargs, tup[0].shape[0])
    found_sets = None
    masks = (feature_mask if isinstance(feature_mask, (tuple, list)) else (feature_mask,)) \
        if feature_mask is not None else ()
    n_groups = 1 + max(int(m.max()) for m in masks) if masks and all(
        isinstance(m, torch.Tensor) and m.numel() for m in masks) else None
    strengths, done = None, 0  # [N, ...]: every batch's, held beside the later batches

    def beside_strengths():
        return memory.beside(max_memory, strengths, tup[0].device, "the strengths of every row",
                             "pass fewer rows (points='representative') or sets")

    def batch_of(chunk: torch.Tensor) -> _Batch:
        xs = tuple(t[chunk.to(t.device)] for t in tup)
        return _batch(model, xs if was_tuple else xs[0], _slice_target(target, chunk), order,
                      sets, _slice_mask(feature_mask, chunk, tup),
                      select_rows(fargs, chunk, tup[0].shape[0]), n_groups)

    batches = map(batch_of, rows.split(batch_size))
    first = next(batches)  # (its derivatives per row size the bar)
    with progress_bar(progress, total=len(rows) * first.per_row, desc="global interactions",
                      unit="deriv") as bar:
        for batch in itertools.chain([first], batches):
            part = _local(batch, max_memory if strengths is None else beside_strengths(),
                          bar).abs()
            if strengths is None:
                strengths = part.new_empty((len(rows),) + part.shape[1:])
                beside_strengths()  # (MemoryError when they alone fill the budget)
            strengths[done:done + part.shape[0]] = part
            done += part.shape[0]
            found_sets = batch.sets
            del part
    agg = _aggregate(strengths, aggregate)
    return GlobalInteractions(agg, found_sets, _ranking(agg, found_sets), rows)
