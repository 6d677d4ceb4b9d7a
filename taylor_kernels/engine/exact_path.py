"""Exact path engine: the linear regions a straight path crosses in a piecewise-linear network.

For ``p(t) = b + t (x - b)`` the gradient of a network built from affine maps, ReLU-like units
and max pooling is constant between breakpoints, so
``IG = (x - b) * sum_r (t_{r+1} - t_r) grad f((t_r + t_{r+1}) / 2)`` exactly. :func:`plan`
finds the breakpoints and returns that sum as a path plan (per-path nodes = region midpoints,
weights = region lengths, ``[B, K, S]`` padded with zero weights) for the path engine.

Breakpoint search (float64, whatever the model's dtype): the model is traced with ``torch.fx``
and a (value, slope) :class:`~.exact_rules.Pair` is pushed through the graph by the rules of
:mod:`.exact_rules`; one forward gives each row's next breakpoint. Tensors that are affine on
the whole path (the input and the affine layers before the first kink) are computed once per
path and then read as ``v(0) + t s``; their kinks (first-layer ReLUs) are all known after that
first pass and split every path into segments that are searched side by side, so the number
of sequential forwards is the largest number of deeper kinks inside one segment, not the
number of regions. A first pass at ``t = 0`` and ``t = 1`` checks that the traced graph
reproduces the model's outputs (a model with hooks or value-dependent Python is refused).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn
from torch.fx._symbolic_trace import PH
from torch.utils import _pytree as pytree

from taylor_kernels.engine import exact_rules as rules
from taylor_kernels.engine import guards, memory
from taylor_kernels.engine.exact_rules import ETA, Kinks, NotPiecewiseLinear, Pair
from taylor_kernels.engine.graph_mutation import mutated_then_read
from taylor_kernels.engine.held_root import HeldRoot
from taylor_kernels.engine.jet import _has_hooks, _trace_key, _Tracer
from taylor_kernels.engine.problem import PathProblem, select_target
from taylor_kernels.engine.trace_cache import MISS, TraceCache

DEFAULT_MAX_REGIONS = 10_000


class _Root(nn.Module):
    """``forward(*args) -> f(*args)``: a root to trace any callable with a fixed arity."""

    def __init__(self, f):
        super().__init__()
        self.f = f

    def forward(self, *args):
        return self.f(*args)


_TRACES = TraceCache(8)  # traced models kept (the model's modules held weakly)


def trace(model, n_args: int, fresh: bool = False) -> tuple[nn.Module, fx.Graph, bool]:
    """``model`` traced by ``torch.fx`` with ``n_args`` positional inputs: ``(root, graph,
    cached)`` (cached per model unless ``fresh``, without keeping the model alive; the model
    itself is not modified, weights are read at run time). Raises :class:`NotPiecewiseLinear`
    when it cannot be traced."""
    key = (id(model), n_args)
    state = _trace_key(model)  # the modules' trees, closure cells and globals a forward reads
    hit = MISS if fresh else _TRACES.lookup(key, model, state)
    root = None if hit is MISS else hit[0].root()
    if root is not None:
        return root, hit[1], True
    if isinstance(model, (torch.jit.ScriptModule, torch.jit.ScriptFunction)):
        raise NotPiecewiseLinear("torch.fx cannot trace a TorchScript model (torch.jit.script "
                                 "or torch.jit.trace); pass the Python module")
    tracer = _Tracer()
    try:
        with guards.proxy_hook_warning_ignored():
            graph = tracer.trace(_Root(model), concrete_args=(PH,) * n_args)
    except Exception as exc:  # noqa: BLE001 - any tracing failure means: no exact rule
        raise NotPiecewiseLinear(f"torch.fx cannot trace the model ({type(exc).__name__}: "
                                 f"{str(exc)[:200]})") from exc
    _refuse_visible_mutation(graph, tracer.root)
    held = HeldRoot(tracer.root, graph)
    try:
        ref = held.released_with(model)
    except TypeError:  # not weak-referenceable: trace again next time
        return tracer.root, graph, False
    _TRACES.store(key, ref, state, (held, graph))
    return tracer.root, graph, False


def _refuse_visible_mutation(graph: fx.Graph, root: nn.Module) -> None:
    """:class:`NotPiecewiseLinear` when an in-place op changes a tensor that a later node
    still reads (:mod:`~taylor_kernels.engine.graph_mutation`): the pair rules return new
    values, so the later read saw the unchanged one (wrong numbers, and the check of the ends
    passed when the op changed neither end)."""
    node = mutated_then_read(graph, root)
    if node is not None:
        raise NotPiecewiseLinear(f"in-place {_name(node.target)!s} changes a tensor that "
                                 "the forward reads again")


def _name(target) -> str:
    """A node's target as the user knows it (a module's path without the ``f.`` of the
    tracing root :class:`_Root`)."""
    name = getattr(target, "__name__", str(target))
    return name.removeprefix("f.") if isinstance(target, str) else name


class _PairInterpreter(fx.Interpreter):
    """Runs the graph on pairs. ``cache``: globally affine nodes read as ``v0[path] + t s``
    (rows given by ``rows = (path, t0)``); ``skip``: affine nodes only those need."""

    def __init__(self, root: nn.Module, graph: fx.Graph):
        super().__init__(root, graph=graph)
        self._f64: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.kinks: Kinks | None = None
        self.cache: dict[fx.Node, tuple[torch.Tensor, torch.Tensor]] = {}
        self.skip: set[fx.Node] = set()
        self.rows: tuple[torch.Tensor, torch.Tensor] | None = None
        self.record: dict[fx.Node, list[Pair]] | None = None
        self.pair_bytes = 0
        self.node: fx.Node | None = None  # the node being run (rules name their kinks by it)

    def const(self, t):
        """Float tensors as float64 (cached per tensor for the call)."""
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            return t
        hit = self._f64.get(id(t))
        if hit is None or hit[0] is not t:
            hit = (t, t.detach().to(torch.float64))
            self._f64[id(t)] = hit
        return hit[1]

    def run_node(self, n):
        self.node = n
        if n in self.skip:
            return None
        if n in self.cache:
            v0, s = self.cache[n]
            path, t0 = self.rows
            s = s[path]
            return Pair(v0[path] + t0.view((-1,) + (1,) * (s.dim() - 1)) * s, s, True)
        out = super().run_node(n)
        if isinstance(out, Pair) and out.s.shape != out.v.shape:  # a constant broadcast the
            try:  # value (h.unsqueeze(1) + pos): the slope is broadcast with it (it was not:
                out = Pair(out.v, torch.broadcast_to(out.s, out.v.shape), out.affine)  # wrong
            except RuntimeError as exc:  # slopes downstream)
                raise NotPiecewiseLinear(f"{_name(n.target)}: slope of shape "
                                         f"{tuple(out.s.shape)} for a value of shape "
                                         f"{tuple(out.v.shape)}") from exc
        if isinstance(out, Pair):
            self.pair_bytes += 2 * out.v.numel() * out.v.element_size()
            if self.record is not None and out.affine:
                self.record.setdefault(n, []).append(out)
        return out

    def get_attr(self, target, args, kwargs):
        return self.const(super().get_attr(target, args, kwargs))

    def call_function(self, target, args, kwargs):
        if not rules.has_pair(args, kwargs):
            return super().call_function(target, args, kwargs)
        if target is getattr:  # .T, .mT move value and slope alike (read off the value, the
            p, name = args[0], args[1]  # slope was lost: a kink downstream went unseen)
            if isinstance(p, Pair) and name in ("T", "mT", "H", "mH", "real"):
                return Pair(getattr(p.v, name), getattr(p.s, name), p.affine)
            value = getattr(p.v if isinstance(p, Pair) else p, name)
            if isinstance(value, torch.Tensor) and isinstance(p, Pair):
                raise NotPiecewiseLinear(f"attribute .{name} has no exact rule")
            return value
        rule = rules.FUNCTIONS.get(target)
        if rule is None:
            raise NotPiecewiseLinear(f"function {_name(target)!r} is not piecewise-linear "
                                     "(or has no exact rule)")
        return rule(self, *args, **kwargs)

    def call_method(self, target, args, kwargs):
        if not rules.has_pair(args, kwargs):
            return super().call_method(target, args, kwargs)
        rule = rules.METHODS.get(target) if isinstance(args[0], Pair) else None
        if target in rules.SHAPE_METHODS and isinstance(args[0], Pair):
            return getattr(args[0].v, target)(*args[1:], **kwargs)
        if rule is None:
            raise NotPiecewiseLinear(f"method .{target}() is not piecewise-linear (or has no "
                                     "exact rule)")
        return rule(self, *args, **kwargs)

    def call_module(self, target, args, kwargs):
        mod = self.fetch_attr(target)
        if rules.has_pair(args, kwargs) and (_has_hooks(mod) or guards.foreign_global_hooks()):
            raise NotPiecewiseLinear(f"module {type(mod).__name__} has forward hooks, which "
                                     "the traced graph does not run")
        if not rules.has_pair(args, kwargs):
            try:  # constants along the path, in float64
                return mod(*args, **kwargs)
            except RuntimeError as exc:  # e.g. float32 weights (a float32 layer IG's model,
                if memory.is_oom(exc):  # kept whole by the trace): float64 inputs fail
                    raise
                raise NotPiecewiseLinear(f"module {type(mod).__name__} of the trace does not "
                                         f"run on float64 values ({str(exc)[:80]})") from exc
        rule = (rules.module_rule(mod, self.const)
                if len(args) == 1 and not kwargs and isinstance(args[0], Pair) else None)
        if rule is None:
            raise NotPiecewiseLinear(f"module {type(mod).__name__} is not piecewise-linear "
                                     "(or has no exact rule)")
        return rule(self, args[0])


@dataclass
class ExactPlan:
    """Region midpoints ``alphas [B, K, S]`` and lengths ``weights [B, K, S]`` (zero-padded),
    ``regions [B, K]`` crossed per path (``-1`` where more than ``max_regions``), and the
    search cost: ``search_rows`` (value-slope rows pushed through the model), ``passes``
    (sequential forwards)."""

    alphas: torch.Tensor
    weights: torch.Tensor
    regions: torch.Tensor
    search_rows: int
    passes: int


# Bytes of a search row over its (value, slope) pairs: the pairs, the rules' kink distances
# and masks, and allocator slack (a 784-256-10 ReLU MLP's search held 2-2.8x its budget at
# twice the pairs; resident peak, fresh process, 2-core AMD EPYC, 2026-12-01).
SEARCH_ROW_FACTOR = 5.0


class _Search:
    """The (value, slope) forward of rows ``(path, t0)``, chunked to a memory budget."""

    def __init__(self, problem: PathProblem, traced: tuple[nn.Module, fx.Graph], budget: int):
        self.problem, self.budget = problem, budget
        self.interp = _PairInterpreter(*traced)
        self.x = problem.x.double()
        self.bl = problem.baselines.double()
        self.chunk: int | None = None
        self.rows_run = 0
        self.passes = 0
        self.terminal: frozenset = frozenset()
        self.kink_nodes: dict[fx.Node, bool] = {}

    def _inputs(self, path: torch.Tensor, t0: torch.Tensor) -> list:
        K = self.problem.K
        inp = path // K
        b = self.bl[inp if self.bl.shape[0] > 1 else torch.zeros_like(inp), path % K]
        d = self.x[inp] - b
        vs = self.problem.split(b + t0[:, None] * d)
        ss = self.problem.split(d)
        args = [a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                for a in self.problem._rows_args(inp)]
        return [Pair(v, s, True) for v, s in zip(vs, ss)] + args

    def _one(self, path, t0, splits: bool, outputs: bool, end=None):
        self.interp.kinks = Kinks(path.shape[0], path.device, splits, self.terminal,
                                  None if end is None else end - t0)
        self.interp.rows = (path, t0)
        out = self.interp.run(*self._inputs(path, t0))
        if outputs:
            v = pytree.tree_map(lambda a: a.v if isinstance(a, Pair) else a, out)
            out = select_target(v, self.problem.target, path // self.problem.K)
        return self.interp.kinks, out

    def run(self, path: torch.Tensor, t0: torch.Tensor, splits: bool = False,
            outputs: bool = False, end: torch.Tensor | None = None):
        """Distances ``dt [N]`` to each row's next non-terminal kink; the kinks found as
        ``[(rows, dt)]`` (with ``splits``: the global kinks, else the terminal ones, those
        before the row's ``end`` when given); the selected outputs when ``outputs``."""
        dts, found, outs = [], [], []
        for i in range(0, path.shape[0], self.chunk):
            kinks, out = self._one(path[i:i + self.chunk], t0[i:i + self.chunk], splits,
                                   outputs, None if end is None else end[i:i + self.chunk])
            dts.append(kinks.dt)
            outs.append(out)
            found += [(r + i, t) for r, t in (kinks.splits if splits else kinks.multi)]
            self.kink_nodes.update(kinks.nodes)
        self.rows_run += path.shape[0]
        self.passes += 1
        dt = torch.cat(dts) if dts else t0.new_zeros(0)
        return dt, found, (torch.cat(outs) if outputs and outs else None)

    def build_cache(self, P: int, device) -> tuple[list, torch.Tensor]:
        """Pass 0: every path at ``t = 0``. Sizes the chunks from one row's pair bytes, finds
        the global kinks (returned as ``[(paths, t)]``, with the outputs ``[P]``) and keeps,
        as ``(v0, s) [P, ...]``, the globally affine nodes that some other node reads; the
        rest of the affine prefix is skipped from then on."""
        path = torch.arange(P, device=device)
        t0 = torch.zeros(P, dtype=torch.float64, device=device)
        self.interp.pair_bytes = 0
        self._one(path[:1], t0[:1], False, False)
        per_row = SEARCH_ROW_FACTOR * self.interp.pair_bytes
        self.chunk = memory.chunk_size_for(memory.chunk_room(self.budget, device, per_row),
                                           per_row, 2**31)  # (a share, as the path engine's)
        rec = self.interp.record = {}
        _, found, out = self.run(path, t0, splits=True, outputs=True)
        self.interp.record = None
        affine = {n for n in rec if n.op != "output"}  # (the output runs always: skipped,
        # an affine model with no kink at all returned None)
        keep = {n for n in affine if n.op != "placeholder" and any(
            u not in affine for u in n.users)}
        self.interp.skip = {n for n in affine if n.op != "placeholder" and n not in keep}
        self.interp.cache = {n: (torch.cat([p.v for p in rec[n]]),
                                 torch.cat([p.s for p in rec[n]])) for n in keep}
        self.terminal = _terminal(self.kink_nodes)
        return found, out


def _terminal(kink_nodes: dict) -> frozenset:
    """Elementwise kink nodes with no kink node downstream: a switch there changes no other
    unit's piece, so all of their crossings inside a region are breakpoints at once."""
    def reaches_kink(node) -> bool:
        seen, todo = set(), list(node.users)
        while todo:
            n = todo.pop()
            if n in kink_nodes:
                return True
            if n not in seen:
                seen.add(n)
                todo.extend(n.users)
        return False

    return frozenset(n for n, elementwise in kink_nodes.items()
                     if elementwise and not reaches_kink(n))


def _sorted(path: torch.Tensor, t: torch.Tensor):
    """Sort ``(path, t)`` pairs by path, then t."""
    order = torch.sort(t, stable=True).indices
    path, t = path[order], t[order]
    order = torch.sort(path, stable=True).indices
    return path[order], t[order]


def _distinct_counts(path: torch.Tensor, t: torch.Tensor, P: int) -> torch.Tensor:
    """Breakpoints per path ``[P]``, those within ``ETA`` of the one before counted once
    (units whose kinks coincide, as a uniform image's channels do, counted once each: a
    62-region path was refused at max_regions=100)."""
    if path.numel() == 0:
        return torch.zeros(P, dtype=torch.long, device=path.device)
    path, t = _sorted(path, t)
    new = torch.ones_like(path, dtype=torch.bool)
    new[1:] = (path[1:] != path[:-1]) | (t[1:] - t[:-1] > ETA)
    return torch.bincount(path[new], minlength=P)


def _segments(P: int, split_path, split_t, device):
    """Segments ``(path, start, end)`` between consecutive split points (0 and 1 added)."""
    ar = torch.arange(P, device=device)
    path = torch.cat([ar, split_path, ar])
    t = torch.cat([torch.zeros(P, dtype=torch.float64, device=device), split_t,
                   torch.ones(P, dtype=torch.float64, device=device)])
    path, t = _sorted(path, t)
    same = (path[:-1] == path[1:]) & (t[1:] - t[:-1] > ETA)
    return path[:-1][same], t[:-1][same], t[1:][same]


def _checked_search(problem, fx_, fb, max_memory, fresh: bool):
    """``(search, global kinks, outputs at t = 0)`` on the model's (cached unless ``fresh``)
    trace, checked against its outputs at both ends; :class:`NotPiecewiseLinear` otherwise
    (``cached`` set when a cached trace failed that check of the ends)."""
    device = problem.x.device
    *traced, cached = trace(problem.model, len(problem.inputs) + len(problem.forward_args),
                            fresh)
    search = _Search(problem, tuple(traced), memory.parse_budget(max_memory, device))
    with graph_errors():
        found, start_out = search.build_cache(problem.B * problem.K, device)
    try:
        with graph_errors():
            _check_trace(search, start_out, fx_, fb, device)
    except NotPiecewiseLinear as exc:  # only this failure can mean a stale cached trace (a
        exc.cached = cached  # model without an exact rule was traced twice on every call)
        raise
    return search, found, start_out


@contextlib.contextmanager
def graph_errors():
    """Errors of the traced graph run on path pairs as :class:`NotPiecewiseLinear` (the
    caller falls back): a ``TypeError`` from inside the graph, or a layout the pair rules do
    not follow (a sequence-first residual stream, ``[T, N, C]`` beside ``[N, T, C]``: a shape
    error from the cached affine nodes, which read dim 0 as the batch, crashed the call).
    Out-of-memory and device errors stay the user's to see."""
    try:
        yield
    except (TypeError, ValueError, RuntimeError, IndexError, AttributeError) as exc:
        if memory.is_oom(exc) or isinstance(exc, getattr(torch, "AcceleratorError", ())):
            raise
        raise NotPiecewiseLinear(
            f"the traced graph does not run on these arguments ({type(exc).__name__}: "
            f"{str(exc)[:160]}; a forward that branches on an argument, as on `mask is not "
            "None`, or a layout whose first dimension is not the batch?)") from exc


def _check_trace(search: _Search, start_out: torch.Tensor, fx_, fb, device) -> None:
    """The traced graph must give the model's outputs at both ends of every path
    (``start_out``: its outputs at the baselines, from pass 0)."""
    K = search.problem.K
    P = start_out.shape[0]
    _, _, end_out = search.run(torch.arange(P, device=device),
                               torch.ones(P, dtype=torch.float64, device=device), outputs=True)
    want = [fb.reshape(P, *fb.shape[2:]), fx_.repeat_interleave(K, dim=0)]
    dtypes = [search.problem.x.dtype] + [p.dtype for p in search.interp.module.parameters()
                                         if p.is_floating_point()]
    eps = max(torch.finfo(d).eps for d in dtypes)
    for got, ref in zip((start_out, end_out), want):
        ref = ref.to(got.dtype).reshape(got.shape)
        scale = ref.abs().max().clamp_min(1e-30)
        if ((got - ref).abs() > eps ** 0.5 * scale).any():
            raise NotPiecewiseLinear(
                "the traced graph does not reproduce the model's outputs ("
                + ("torch.autocast is on: the graph runs without it" if
                   torch.is_autocast_enabled("cpu") or torch.is_autocast_enabled("cuda")
                   else "forward hooks, or Python that depends on values?") + ")")


def plan(problem: PathProblem, fx_: torch.Tensor, fb: torch.Tensor, *,
         max_regions: int = DEFAULT_MAX_REGIONS, max_memory=None) -> ExactPlan:
    """Breakpoints of every path ``b_k -> x_b`` and its exact path plan.

    Args: ``problem`` (model, ``x [B, D]``, baselines ``[Bb, K, D]``); ``fx_ [B]`` and
    ``fb [B, K]`` the model's outputs at the inputs and baselines (checked against the traced
    graph); ``max_regions``: paths crossing more regions are marked ``-1`` and get no nodes;
    ``max_memory``: budget for one chunk of search rows (as the path engine's).
    Returns: :class:`ExactPlan`. Raises :class:`NotPiecewiseLinear` for unsupported models.
    """
    if int(max_regions) != max_regions or max_regions < 1:
        raise ValueError(f"max_regions must be a positive integer, got {max_regions}")
    device = problem.x.device
    B, K = problem.B, problem.K
    P = B * K
    try:
        search, found, start_out = _checked_search(problem, fx_, fb, max_memory, False)
    except NotPiecewiseLinear as exc:
        if not exc.cached:
            raise
        # a cached trace stale through state its key cannot see (a module-level constant a
        # forward reads: every later call fell back): trace once more
        search, found, start_out = _checked_search(problem, fx_, fb, max_memory, True)
    sp = torch.cat([r for r, _ in found]) if found else torch.zeros(0, dtype=torch.long,
                                                                    device=device)
    st = torch.cat([t for _, t in found]) if found else torch.zeros(0, dtype=torch.float64,
                                                                    device=device)
    counts = _distinct_counts(sp, st, P)
    over = counts + 1 > max_regions
    path, t0, end = _segments(P, sp, st, device)
    keep = ~over[path]
    path, t0, end = path[keep], t0[keep], end[keep]
    new_p, new_t = [sp], [st]
    while path.numel():
        with graph_errors():
            dt, multi, _ = search.run(path, t0, end=end)
        stop = torch.minimum(t0 + dt, end)
        for r, d in multi:  # terminal kinks before the row's next other kink are breakpoints
            inside = t0[r] + d < stop[r] - ETA
            new_p.append(path[r[inside]])
            new_t.append(t0[r[inside]] + d[inside])
        more = t0 + dt < end - ETA
        new_p.append(path[more])
        new_t.append(t0[more] + dt[more])
        counts += _distinct_counts(torch.cat(new_p[-len(multi) - 1:]),
                                   torch.cat(new_t[-len(multi) - 1:]), P)
        over |= counts + 1 > max_regions
        more &= ~over[path]
        path, t0, end = path[more], t0[more] + dt[more], end[more]
    bp_p, bp_t = torch.cat(new_p), torch.cat(new_t)
    inside = ~over[bp_p]
    return _region_plan(P, bp_p[inside], bp_t[inside], over, (B, K),
                        search.rows_run, search.passes)


def _region_plan(P, bp_path, bp_t, over, shape, rows_run, passes) -> ExactPlan:
    """Breakpoints -> midpoints and lengths per path, padded to the longest path."""
    device = bp_t.device
    ar = torch.arange(P, device=device)
    path = torch.cat([ar, bp_path, ar])
    t = torch.cat([torch.zeros(P, dtype=torch.float64, device=device), bp_t.clamp(0, 1),
                   torch.ones(P, dtype=torch.float64, device=device)])
    path, t = _sorted(path, t)
    new = path[1:] != path[:-1]
    true = torch.ones(1, dtype=torch.bool, device=device)
    gap = torch.cat([torch.full((1,), torch.inf, dtype=t.dtype, device=device), t[1:] - t[:-1]])
    keep = torch.cat([true, new]) | torch.cat([new, true]) | (gap > ETA)  # first, last, apart
    path, t = path[keep], t[keep]
    n = torch.bincount(path, minlength=P)
    starts = torch.cumsum(n, 0) - n
    pos = torch.arange(path.numel(), device=device) - starts[path]
    S = int(n.max()) - 1
    grid = torch.ones(P, S + 1, dtype=torch.float64, device=device)
    grid[path, pos] = t
    regions = torch.where(over, -1, n - 1)
    grid[over] = 1.0  # no nodes for paths that went over the cap
    alphas = 0.5 * (grid[:, 1:] + grid[:, :-1])
    weights = grid[:, 1:] - grid[:, :-1]
    B, K = shape
    return ExactPlan(alphas.reshape(B, K, S), weights.reshape(B, K, S), regions.reshape(B, K),
                     rows_run, passes)
