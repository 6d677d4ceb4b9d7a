"""Jet engine: Taylor mode through a traced model.

``jet(f, x, directions, order)`` returns the normalized coefficients
``c_k = D^k f(x)[v^k] / k!`` of ``t -> f(x + t v)`` for every input and direction. The model is
traced with ``torch.fx``; each node maps jets by a rule of :mod:`.jet_rules` (linear, conv,
matmul/bmm, add/mul/div, elementwise activations, softmax, layer/batch norm, pooling,
reshapes, embedding (constant: integer inputs carry no direction), attention). A node with no
rule is evaluated by nested forward-mode AD (``torch.func.jvp`` nested ``order`` times) with a
one-time warning naming the op; a custom module with no rule is traced and propagated on its
own first. Cost: ``O(order^2)`` per elementwise op instead of ``O(2^order)`` for nested jvp.

The ``M`` directions of each input are folded into the batch (``B*M`` rows): the model must
treat rows independently (eval mode; batch norm with running statistics).

Trace cache: the traced graph of ``f`` is reused while nothing it was traced from changed. The
key holds, for every module ``f`` is, is bound to or closes over and all their submodules: the
module objects and their names (``model.head = nn.Linear(...)`` retraces), the identity of
every parameter and buffer, the hooks, and the plain attributes ``forward`` may read (numbers,
strings, flags, the ``training`` mode, one level into config objects); for a plain function
also its closure cells and the globals its code names, for a bound method of another object
its object's plain attributes. Python branches on the *values* of
tensors cannot be traced: ``torch.fx`` refuses them (``if x.sum() > 0``, ``.item()``), and such
a model (or custom submodule) runs by nested forward-mode AD, which executes the real Python
every call. State the key does not hold (a module-level constant a ``forward`` reads, a dict
attribute, a file, a random draw) is caught by value: a call on a cached trace compares its
``c_0`` at row 0 with one real forward of that row (to ``sqrt(eps)``) and traces again when
they differ (not inside ``allow_row_coupling``: a random model has no one value); a change that
keeps ``f(x_0)`` but not its derivatives needs ``cache=False``.
"""
from __future__ import annotations

import contextlib
import operator
import sys
import threading
import types
import weakref
from typing import NamedTuple

import torch
import torch.fx as fx
from torch.fx._symbolic_trace import PH
from torch.utils.checkpoint import CheckpointFunction
from torch import nn
from torch.utils import _pytree as pytree

from taylor_kernels.engine import jet_rules as rules
from taylor_kernels.engine import memory
from taylor_kernels.engine.buffer_copies import nested_jvp_writing_copies
from taylor_kernels.engine.derivative import higher_order_ops
from taylor_kernels.engine.graph_mutation import mutated_then_read
from taylor_kernels.engine.held_root import HeldRoot
from taylor_kernels.engine.guards import (_close, cell_values, check_function_rows,
                                          check_model, public_call, modules_of,
                                          named_globals,
                                          proxy_hook_warning_ignored, row_coupling_allowed)
from taylor_kernels.engine.jet_rules import Jet
from taylor_kernels.engine.no_grad_blocks import respecting_no_grad, warn_if_backward_hooks
from taylor_kernels.engine.problem import class_indices
from taylor_kernels.engine.row_args import at_rows, forward_args, select_rows, with_forward_args
from taylor_kernels.engine.trace_cache import MISS, TraceCache
from taylor_kernels.models.outputs import default_output
from taylor_kernels.numerics import (MAX_ORDER, all_finite, check_dense_real,
                                     polarization_rule, polarization_size)
from taylor_kernels.progress import progress_bar
from taylor_kernels.user_warnings import warn

_WARNED_OPS: set[str] = set()
_TRACES = TraceCache(16)  # traced functions kept (modules held weakly: HeldRoot)
_SIMPLE = (bool, int, float, complex, str, bytes, type(None), torch.dtype, torch.device)
_OPAQUE = (type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType,
           types.MethodType, torch.Tensor, nn.Module)
_SKIP = frozenset(("_parameters", "_buffers", "_modules", "_non_persistent_buffers_set"))
_FX_TRACE_LOCK = threading.RLock()  # one torch.fx trace at a time (see _Tracer.trace)


def _autocast_state() -> tuple:
    """This thread's autocast settings (on/off and dtype) for the CPU and CUDA."""
    return tuple((torch.is_autocast_enabled(d), torch.get_autocast_dtype(d))
                 for d in ("cpu", "cuda"))


class _Tracer(fx.Tracer):
    """Traces ``x -> f(x)`` for a function or module ``f``: the root is a fresh module and the
    modules ``f`` calls are attached to it on the fly (the user's model is never modified).
    ``leaf_children``: the children of those modules are leaves (a coarser trace)."""

    def __init__(self, leaf_children: bool = False):
        super().__init__()
        self.leaf_children = leaf_children
        self._extra: dict[int, str] = {}
        self._thread: int | None = None

    def trace(self, root, concrete_args=None) -> fx.Graph:
        """The graph of ``root``, traced under one process-wide lock. While it traces, FX
        replaces ``nn.Module.__call__`` and ``__getattr__`` for the whole process: another
        thread's module calls went through this tracer (``NameError: module is not installed
        as a submodule`` in a plain forward), and two interleaved traces could leave one's
        wrapper installed for good. Calls from other threads now pass through
        (:meth:`call_module`, :meth:`getattr`)."""
        with _FX_TRACE_LOCK:
            self._thread = threading.get_ident()
            self._autocast, self.autocast_changed = _autocast_state(), False
            try:
                return super().trace(root, concrete_args)
            finally:
                self._thread = None

    def _foreign(self) -> bool:
        return threading.get_ident() != self._thread

    def call_module(self, m, forward, args, kwargs):
        return forward(*args, **kwargs) if self._foreign() else \
            super().call_module(m, forward, args, kwargs)

    def getattr(self, attr, attr_val, parameter_proxy_cache):
        return attr_val if self._foreign() else \
            super().getattr(attr, attr_val, parameter_proxy_cache)

    def path_of_module(self, mod: nn.Module) -> str:
        try:
            return super().path_of_module(mod)
        except NameError:
            if id(mod) not in self._extra:
                name = f"_jet_external_{len(self._extra)}"
                self.root.add_module(name, mod)
                self._extra[id(mod)] = name
            return self._extra[id(mod)]

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return super().is_leaf_module(m, qualname) or _has_hooks(m) or (
            self.leaf_children and qualname.count(".") == 1)

    def create_node(self, kind, target, args, kwargs, name=None, type_expr=None):
        """A node, marked ``meta["no_grad"]`` when the forward made it with grad disabled
        (inside ``torch.no_grad()``; the trace runs with grad enabled): FX keeps no trace of
        the block, and the jets propagated through it where reverse mode holds it constant
        (a Hessian entry 30.8, its mixed partial 141.6). FX keeps no ``torch.autocast`` block
        either: a node made while the forward's autocast is on sets ``autocast_changed`` (the
        trace computed it in the input's precision: c_1 1.7% off a bf16 block's, silently)."""
        if _autocast_state() != self._autocast:
            self.autocast_changed = True
        node = super().create_node(kind, target, args, kwargs, name, type_expr)
        if not torch.is_grad_enabled():
            function = _custom_function_running()
            if function is None:
                node.meta["no_grad"] = True
            elif function is not CheckpointFunction:  # (checkpoint: f itself, differentiable)
                raise _CustomFunctionTraced(function.__name__)
        return node


class _CustomFunctionTraced(Exception):
    """An ``autograd.Function``'s forward was traced: its derivative is its own ``backward``
    / ``jvp``, not the forward's ops (which run with grad disabled, as a ``no_grad`` block
    would), so the graph is refused and the module runs by nested forward-mode AD."""


_FUNCTION_APPLY = torch.autograd.Function.apply.__func__.__code__


def _custom_function_running() -> type | None:
    """The ``autograd.Function`` whose ``apply`` is on the Python stack (the trace is inside
    its forward), else None."""
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code is _FUNCTION_APPLY:
            return frame.f_locals.get("cls")
        frame = frame.f_back
    return None


def _has_hooks(m: nn.Module) -> bool:
    """Forward (pre-)hooks change what calling ``m`` computes; tracing would skip them."""
    return bool(m._forward_hooks or m._forward_pre_hooks)


def _value_key(v, deep: bool = True):
    """Plain values by value, containers of them elementwise, other objects by identity (and,
    when ``deep``, their plain attributes one level down: config objects)."""
    if isinstance(v, _SIMPLE):
        return v
    if isinstance(v, (tuple, list, frozenset)) and len(v) <= 64:
        return (type(v).__name__,) + tuple(_value_key(u, False) for u in v)
    if deep and not isinstance(v, _OPAQUE) and hasattr(v, "__dict__"):
        attrs = tuple((k, _value_key(u, False)) for k, u in sorted(vars(v).items())
                      if isinstance(u, _SIMPLE + (tuple, list)))
        return (id(v),) + attrs
    return id(v)


def _module_key(root: nn.Module) -> tuple:
    """Everything of ``root``'s module tree a trace can depend on (see the module docstring)."""
    key = []
    for name, m in root.named_modules(remove_duplicate=False):
        own = tuple((k, _value_key(v)) for k, v in m.__dict__.items() if k not in _SKIP
                    and not (k.endswith("hooks") and isinstance(v, dict)))
        hooks = tuple((k, tuple(v)) for k, v in m.__dict__.items()
                      if k.endswith("hooks") and isinstance(v, dict))
        tensors = tuple((k, id(v)) for k, v in (*m._parameters.items(), *m._buffers.items()))
        key.append((name, id(m), type(m), own, hooks, tensors))
    return tuple(key)


def _trace_key(f) -> tuple:
    """Invalidation key of ``f``'s trace: its modules' trees, for a function its closure
    cells and the globals its code names, and for a bound method of another object than a
    module that object's plain attributes (an explainer's ``temperature``: the trace kept
    the old value, and inside ``allow_row_coupling``, where the value check is off, the
    call returned the old function's coefficients)."""
    key = [_module_key(m) for m in modules_of(f)]
    owner = getattr(f, "__self__", None)
    if owner is not None and not isinstance(owner, nn.Module):
        key.append(_value_key(owner))
    code = getattr(f, "__code__", None)
    if code is not None:
        key.append(tuple(_value_key(v) for v in cell_values(f) if not isinstance(v, nn.Module)))
        key.append(tuple((n, _value_key(g)) for n, g in named_globals(f)))
    return tuple(key)


class Traced(NamedTuple):
    """A traced function: the graph and the root its ``get_attr``/``call_module`` nodes
    name."""
    root: nn.Module
    graph: fx.Graph


def _trace(f, cache: bool = True, args: tuple = ()) -> Traced | None:
    """``x -> f(x, *args)`` traced, else with child modules as leaves, else None;
    cached (``cache=True``) until :func:`_trace_key` of ``f`` or the form of ``args`` changes.
    The tensors of ``args`` are inputs of the graph after ``x`` (:func:`_tensor_args`); their
    values are not traced, the rest of ``args`` is."""
    return _trace_cached(f, cache, args)[0]


def _tensor_args(args: tuple) -> tuple[torch.Tensor, ...]:
    """The tensors of forward ``args``: the graph's inputs after ``x``, in order."""
    return tuple(a for a in args if isinstance(a, torch.Tensor))


def _args_form(args: tuple) -> tuple:
    """What a trace takes from forward ``args``: where the tensors are and the other values."""
    return tuple(None if isinstance(a, torch.Tensor) else ("value", _value_key(a))
                 for a in args)


def _trace_cached(f, cache: bool = True, args: tuple = ()) -> tuple[Traced | None, bool]:
    """:func:`_trace` and whether the graph came from the cache. A model that inspects a
    tensor argument (``mask.dim()``, ``.dtype``, a shape) cannot be traced with the tensors as
    graph inputs (the tracer's proxies have no values): it is traced with this call's tensors
    as constants instead (still taking, and ignoring, the tensor inputs), and that graph is
    not cached (the cache remembers only that the model needs it). Entries hold the
    modules the graph calls weakly (:class:`~taylor_kernels.engine.held_root.HeldRoot`)."""
    key = (_trace_key(f), _args_form(args)) if cache else None
    hit = _TRACES.lookup(id(f), f, key) if cache else MISS
    if hit is None:  # (it does not trace)
        return None, True
    if hit is not MISS and hit is not _BY_VALUE:
        root = hit[0].root()
        if root is not None:
            return Traced(root, hit[1]), True
        hit = MISS  # a module the graph calls is gone: trace again
    by_value = hit is _BY_VALUE
    traced = None if by_value else _trace_graph(f, args, by_value=False)
    if traced is None and _tensor_args(args):
        traced = _trace_graph(f, args, by_value=True)
        by_value = traced is not None
    if not cache:
        return traced, False
    held = None if traced is None or by_value else HeldRoot(*traced)
    try:
        ref = weakref.ref(f) if held is None else held.released_with(f)
    except TypeError:  # not weak-referenceable: trace again next time
        return traced, False
    _TRACES.store(id(f), ref, key, None if traced is None else _BY_VALUE if by_value else
                  (held, traced.graph))
    return traced, False


_BY_VALUE = object()  # a cache entry: the model traces only with its tensor arguments' values


def _trace_graph(f, args: tuple, by_value: bool) -> Traced | None:
    """``(x, *tensors) -> f(x, *args)`` traced (whole, else with child modules as leaves; None
    when neither traces): the tensors of ``args`` are the graph's later inputs, or, when
    ``by_value``, constants of the graph (the inputs are then unused)."""
    def call(x, *tensors):
        if by_value:
            return f(x, *args)
        it = iter(tensors)
        return f(x, *(next(it) if isinstance(a, torch.Tensor) else a for a in args))

    placeholders = (PH,) * (1 + len(_tensor_args(args)))
    for leaf_children in (False, True):
        tracer = _Tracer(leaf_children)
        try:
            # (only the forward's own no_grad blocks mark nodes)
            with torch.enable_grad(), proxy_hook_warning_ignored():
                graph = tracer.trace(call, concrete_args=placeholders)
        except Exception:  # noqa: BLE001 - any tracing failure: try coarser, then fall back
            continue
        if tracer.autocast_changed:  # (FX has no node for the block: run f whole)
            if ("autocast", "") not in _WARNED_OPS:
                _WARNED_OPS.add(("autocast", ""))
                warn("tk.jet: the forward enters torch.autocast, which a trace cannot keep; "
                     "the whole function runs in nested forward-mode AD (exact, O(2^order) "
                     "cost)", RuntimeWarning)
            return None
        changed = mutated_then_read(graph, tracer.root)
        if changed is not None:  # the rules' new values would hide the change: run f whole
            name = changed.target if changed.op == "call_module" else \
                _op_name(changed.op, changed.target)
            if ("in-place", name) not in _WARNED_OPS:
                _WARNED_OPS.add(("in-place", name))
                warn(f"tk.jet: in-place {name!r} changes a tensor the forward reads again; "
                     "the whole function runs in nested forward-mode AD (exact, O(2^order) "
                     "cost)", RuntimeWarning)
            return None
        return Traced(tracer.root, graph)
    return None


def _primal_matches(f, x: torch.Tensor, row0, out: torch.Tensor) -> bool:
    """Whether the jet's value ``c_0`` at row 0 equals ``f(x[:1])`` from a real forward
    (``row0``, check R's, else run here; ``f`` a function of row 0's points), compared over
    the whole output row (every target form alike): a cached trace can be stale through state
    its key cannot see (a module-level constant or helper a ``forward`` reads, a dict attribute
    changed in place), and then returned the old function's coefficients, ``c_0`` included."""
    if row0 is None:
        with torch.no_grad():
            row0 = f(x[:1])
    if not torch.is_tensor(row0) or row0.numel() != out[0, 0].numel():
        return True  # not a [B] / [B, C] output: _select words the error just after
    return _close(out[0, 0].reshape(-1), row0.reshape(-1).to(out.dtype))


def _op_name(kind: str, target) -> str:
    if isinstance(target, nn.Module):
        return type(target).__name__
    return getattr(target, "__name__", str(target)) if kind == "call_function" else f".{target}"


def _warn_once(name: str, why: str) -> None:
    if name not in _WARNED_OPS:
        _WARNED_OPS.add(name)
        warn(f"tk.jet: {why} {name!r}; using nested forward-mode AD for it (exact, "
             f"O(2^order) cost)", RuntimeWarning)


def _fallback(kind: str, target, args, kwargs, order: int, why: str = "no jet rule for"):
    """Nested forward-mode AD through one node (warns once per op)."""
    _warn_once(_op_name(kind, target), why)
    flat, spec = pytree.tree_flatten((args, kwargs))
    slots = [i for i, v in enumerate(flat) if isinstance(v, Jet)]

    def call(values):
        vals = list(flat)
        for i, v in zip(slots, values):
            vals[i] = v
        a, kw = pytree.tree_unflatten(vals, spec)
        if kind == "call_method":
            return getattr(a[0], target)(*a[1:], **kw)
        return target(*a, **kw)

    # The output's floating tensors get jets; its structure (tuples, named tuples, dicts,
    # ModelOutputs) and anything else in it (None, caches, indices) come from the primal call.
    with torch.no_grad():  # structure and constants only
        primal = call([flat[i].c[0].detach() for i in slots])
    out_flat, out_spec = pytree.tree_flatten(primal)
    moving = [j for j, v in enumerate(out_flat)
              if isinstance(v, torch.Tensor) and (v.is_floating_point() or v.is_complex())]

    def fn(*values):
        leaves = pytree.tree_leaves(call(values))
        return tuple(leaves[j] for j in moving)

    with higher_order_ops(call):
        coeffs = nested_jvp_writing_copies(fn, target, [flat[i].c for i in slots], order) \
            if moving else ()
    for j, c in zip(moving, coeffs):
        out_flat[j] = Jet(c)
    return pytree.tree_unflatten(out_flat, out_spec)


def _primal(tree):
    """``tree`` with every jet replaced by its value (order-0 coefficient)."""
    return pytree.tree_map(lambda v: v.c[0] if isinstance(v, Jet) else v, tree)


# tensor attributes linear in the tensor (each coefficient's is the coefficient of the result)
LINEAR_ATTRIBUTES = frozenset({"T", "mT", "H", "mH", "real", "imag"})


class _OutputDict(dict):
    """A traced submodule's dict output read as the ``ModelOutput`` it was: ``torch.fx``
    records a returned ``ModelOutput`` as a plain dict, and the parent's
    ``out.last_hidden_state`` / ``out[0]`` failed on it (HF ConvNext's encoder). By attribute
    (a field not returned is None, as a ``ModelOutput``'s) and by position (the entries that
    are not None, in order)."""

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        return self.get(name)

    def __getitem__(self, key):
        if isinstance(key, (int, slice)):
            return tuple(v for v in self.values() if v is not None)[key]
        return super().__getitem__(key)


def _as_model_output(out):
    """``out`` of a traced submodule, a dict of it as :class:`_OutputDict`."""
    return _OutputDict(out) if isinstance(out, dict) else out


class _JetInterpreter(fx.Interpreter):
    def __init__(self, traced: Traced, order: int, cache: bool = True):
        super().__init__(traced.root, graph=traced.graph)
        self.order, self.cache = order, cache

    def _has_jet(self, args, kwargs) -> bool:
        return any(isinstance(v, Jet) for v in pytree.tree_leaves((args, kwargs)))

    def run_node(self, n: fx.Node):
        """As traced; a node the forward ran without grad sees its jets' values only (a
        constant, as reverse mode holds it)."""
        if not n.meta.get("no_grad") or n.op not in ("call_function", "call_method",
                                                     "call_module"):
            return super().run_node(n)
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        with torch.no_grad():
            return getattr(self, n.op)(n.target, _primal(args), _primal(kwargs))

    def call_function(self, target, args, kwargs):
        if not self._has_jet(args, kwargs):
            return super().call_function(target, args, kwargs)
        if target is getattr:
            if not isinstance(args[0], Jet):  # .values of a named tuple of jets
                return getattr(args[0], args[1])
            value = getattr(args[0].c[0], args[1])  # .shape, .dtype: the value's
            if not isinstance(value, torch.Tensor):
                return value
            if args[1] in LINEAR_ATTRIBUTES:  # .T, .mT per coefficient (read off the
                return rules.per_coefficient(getattr, args, {})  # value, they lost them)
            return _fallback("call_function", target, args, kwargs, self.order)
        if target is operator.getitem and not isinstance(args[0], Jet):  # an entry of a
            return target(*args, **kwargs)  # container of jets (a ModelOutput's outputs[1])
        if target in rules.CONSTANT_FUNCTIONS:  # comparisons, argmax...: the primal's
            return target(*_primal(args), **_primal(kwargs))
        if target in rules.LINEAR_FUNCTIONS:
            return rules.per_coefficient(target, args, kwargs)
        rule = rules.FUNCTION_RULES.get(target)
        return self._apply(rule, "call_function", target, args, kwargs)

    def call_method(self, target, args, kwargs):
        if not self._has_jet(args, kwargs):
            return super().call_method(target, args, kwargs)
        if target in ("size", "dim") and isinstance(args[0], Jet):
            return getattr(args[0].c[0], target)(*args[1:], **kwargs)
        if target in rules.CONSTANT_METHODS:  # comparisons, argmax...: the primal's
            a = _primal(args)
            return getattr(a[0], target)(*a[1:], **_primal(kwargs))
        if target in rules.CAST_METHODS and isinstance(args[0], Jet):
            value = getattr(args[0].c[0], target)(*_primal(args[1:]), **_primal(kwargs))
            if not (value.is_floating_point() or value.is_complex()):
                return value  # (to an integer or bool: piecewise constant, no derivatives)
        if target in rules.LINEAR_METHODS and isinstance(args[0], Jet):
            return rules.per_coefficient(lambda s, *a, **kw: getattr(s, target)(*a, **kw),
                                         args, kwargs)
        # a constant's arithmetic with a jet (``W.sub(h)``: FX's ``W - h``) takes the rule too
        takes = isinstance(args[0], Jet) or target in rules.ARITHMETIC_METHODS
        rule = rules.METHOD_RULES.get(target) if takes else None
        return self._apply(rule, "call_method", target, args, kwargs)

    def call_module(self, target, args, kwargs):
        mod = self.fetch_attr(target)
        if not self._has_jet(args, kwargs):
            return mod(*args, **kwargs)
        if _has_hooks(mod):  # run it as called, hooks included
            return _fallback("call_module", mod, args, kwargs, self.order, "forward hooks on")
        rule = rules.module_rule(mod) if len(args) == 1 and not kwargs else None
        if rule is not None:
            return rule(args[0])
        if type(mod).__module__.startswith("torch.nn"):
            return self._apply(None, "call_module", mod, args, kwargs)
        # a custom module that is a leaf here: propagate through its own graph
        sub = _trace(mod, self.cache) if len(args) == 1 and not kwargs else None
        if sub is not None:
            return _as_model_output(_JetInterpreter(sub, self.order, self.cache).run(args[0]))
        return self._apply(None, "call_module", mod, args, kwargs)

    def _apply(self, rule, kind, target, args, kwargs):
        if rule is not None:
            try:
                return rule(*args, **kwargs)
            except (NotImplementedError, TypeError, RuntimeError, IndexError,
                    AttributeError) as exc:
                # no rule for this case (or arguments a rule does not know, as a constant
                # where it reads a jet: F.linear(constant, jet)): run it exactly; running out
                # of memory or a device error is the user's to see
                if memory.is_oom(exc) or isinstance(exc, getattr(torch, "AcceleratorError", ())):
                    raise
        return _fallback(kind, target, args, kwargs, self.order)


def _check_jet_args(x, directions, order):
    """``directions`` as ``[B, M, ...]`` after checking the arguments of :func:`jet`:
    ``order`` in ``[0, MAX_ORDER]``, dense real tensors
    (:func:`~taylor_kernels.numerics.check_dense_real`), floating directions only for a
    floating ``x``, matching shapes, at least one row and direction, finite values."""
    if not isinstance(order, int) or isinstance(order, bool) or not 0 <= order <= MAX_ORDER:
        raise ValueError(f"order must be an int in [0, {MAX_ORDER}], got {order!r}")
    if not torch.is_tensor(x) or not torch.is_tensor(directions):
        raise TypeError("x and directions must be tensors")
    check_dense_real(x, "x")
    check_dense_real(directions, "directions")
    if directions.is_floating_point() and not x.is_floating_point():
        raise TypeError(f"x has dtype {x.dtype} and directions {directions.dtype}: integer "
                        "inputs carry no direction (token ids into an embedding: every "
                        "coefficient above order 0 is zero, pass integer directions); for a "
                        f"model of real features pass x.to({directions.dtype})")
    if x.dim() < 1:
        raise ValueError("x must have a batch dimension: [B, ...]")
    if directions.shape == x.shape:
        directions = directions.unsqueeze(1)
    if directions.dim() != x.dim() + 1 or directions.shape[0] != x.shape[0] or \
            directions.shape[2:] != x.shape[1:]:
        raise ValueError(f"directions must be [B, M, ...] (or shaped like x) for x of shape "
                         f"{tuple(x.shape)}; got {tuple(directions.shape)}")
    if directions.shape[0] == 0 or directions.shape[1] == 0:
        raise ValueError(f"need at least one input and one direction, got directions of shape "
                         f"{tuple(directions.shape)}")
    for name, t in (("x", x), ("directions", directions)):
        if t.is_floating_point() and not all_finite(t):
            raise ValueError(f"{name} contains NaN or Inf values")
    return directions


def _select(out, target, B: int, M: int) -> torch.Tensor:
    """``[J+1, B*M]`` or ``[J+1, B*M, C]`` model output -> ``[J+1, B, M]``."""
    if not torch.is_tensor(out):
        raise TypeError(f"f must return a tensor, got {type(out).__name__}")
    J1 = out.shape[0]
    if out.dim() == 3 and out.shape[2] == 1 and target is None:
        target = 0
    if out.dim() == 3:
        if target is None:
            raise ValueError(f"f returns [B, C] with C = {out.shape[2]}: pass target= (an int "
                             f"or a [B] tensor of class indices)")
        idx = class_indices(target, B, out.shape[2], out.device).repeat_interleave(M)
        out = out.gather(2, idx.view(1, -1, 1).expand(J1, -1, 1)).squeeze(2)
    elif out.dim() != 2:
        raise ValueError(f"f must return [B] or [B, C]; it returned "
                         f"{(B,) + tuple(out.shape[2:])}: select one output per row or "
                         "class, e.g. lambda z: model(z)[:, i, j]")
    return out.reshape(J1, B, M)


@public_call
def jet(f, x: torch.Tensor, directions: torch.Tensor, order: int, *, target=None,
        additional_forward_args=None, fallback: bool = False, cache: bool = True,
        max_memory=None, progress: bool = False) -> torch.Tensor:
    """Normalized Taylor coefficients of ``t -> f(x + t v)`` for ``M`` directions per input.

    Args:
        f: model or function ``[B, ...] -> [B]`` or ``[B, C]`` (rows independent; eval mode).
        x: ``[B, ...]`` expansion points (integer inputs carry no direction).
        directions: ``[B, M, ...]`` (or shaped like ``x`` for ``M = 1``).
        order: ``J`` in ``[0, 15]``.
        target: class index (int or ``[B]`` tensor) when ``f`` returns ``[B, C]``.
        additional_forward_args: more arguments, ``f(x, *args)``: a tensor ``[B, ...]`` goes
            with its rows (a padding mask; repeated for each direction), ``[1, ...]`` to every
            row, anything else as is (as in Captum). The tensors carry no direction.
        fallback: skip tracing and use nested forward-mode AD for the whole of ``f``.
        cache: reuse the traced graph while ``f``'s modules, parameters and attributes are
            unchanged (module docstring); ``False`` traces anew (state the key cannot see).
        max_memory: bytes (or ``"512MB"``) for the directions of one pass: the ``M``
            directions then run in passes (:func:`directions_per_pass`); None: all at once.
            A result with a graph (grad on, parameters requiring grad) keeps every pass's
            graph for the caller's backward: they are counted, and ``MemoryError`` raised once
            they would pass the budget (run under ``torch.no_grad()`` for a result without
            them).
        progress: a tqdm bar over the ``M`` directions, counted per pass.
    Returns:
        ``[J+1, B, M]`` with ``c_k = D^k f(x)[v^k] / k!``, differentiable in ``x`` and
        ``directions`` (reverse mode through the jet gives ``D^{k+1} f[v^k, .]``).
    Raises ``ValueError`` for a model that couples rows or is random, ``RuntimeError`` inside
    ``torch.inference_mode()`` (checks of :mod:`taylor_kernels.engine.guards`).
    """
    directions = _check_jet_args(x, directions, order)
    fa = with_forward_args(f, additional_forward_args, directions.shape[0])
    row0 = _model_checks(f, fa, x, directions)
    per_pass = None if max_memory is None else directions_per_pass(fa, x, order, max_memory)
    kept = _kept_graphs(max_memory, x, directions.shape[1])
    with kept or contextlib.nullcontext(), progress_bar(
            progress, total=directions.shape[1], desc="jet directions", unit="dir") as bar:
        return _finite(_jet_in_passes(per_pass, kept, _trim(max_memory, x), f, fa, row0, x,
                                      directions, order, target, additional_forward_args,
                                      fallback, cache, bar=bar), x)


def _trim(max_memory, x: torch.Tensor) -> memory.ResidentTrim | None:
    """The heap trimming between passes under ``max_memory`` (None without one)."""
    return None if max_memory is None else memory.ResidentTrim(
        memory.parse_budget(max_memory, x.device), x.device)


def _finite(coefficients: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``coefficients``, or ``FloatingPointError`` when one is NaN or Inf (the inputs and
    directions are checked finite: the model or its derivatives are not there), as the
    Hessian and IG calls raise (a NaN result was returned silently)."""
    if coefficients.is_floating_point() and not all_finite(coefficients.detach()):
        raise FloatingPointError(
            f"non-finite Taylor coefficients of the model at finite points ({x.dtype}): the "
            "model or one of its derivatives is NaN or Inf there (a square root or log of a "
            "negative number, a pole, an overflow)")
    return coefficients


def _model_checks(f, fa, x: torch.Tensor, directions: torch.Tensor):
    """The checks of a jet call, run once whatever its passes: ``check_model`` and the row
    check of ``fa`` (``f`` with its forward arguments) at row 0 and ``x_0 + v_0``; returns
    row 0's output (None for integer ``x``)."""
    check_model(f, (x, directions), higher_order="a forward-mode (jet) method")
    warn_if_backward_hooks(f, "tk.jet")
    return check_function_rows(fa, x, x[0] + directions[0, 0].to(x.dtype)) \
        if x.is_floating_point() else None


def _jet_in_passes(per_pass: int | None, kept: memory.KeptGraphs | None,
                   trim: memory.ResidentTrim | None, f, fa, row0, x, directions,
                   *rest, bar=None) -> torch.Tensor:
    """:func:`_jet_pass` over the directions ``[B, M, ...]``, ``per_pass`` at a time (None:
    all at once), joined along ``M``; ``kept`` (grad on under a budget) counts each pass's
    kept graph; ``trim`` (under a budget) trims the heap between passes; ``bar`` (a progress
    bar, or None) counts each pass's directions."""
    M = directions.shape[1]
    step = M if per_pass is None else per_pass
    parts = []
    for i in range(0, M, step):
        parts.append(_jet_pass(f, fa, row0, x, directions[:, i:i + step], *rest))
        if bar is not None:
            bar.update(parts[-1].shape[2])
        if kept is not None:
            kept.advance(parts[-1].shape[2])
        if trim is not None:
            trim.after_pass()
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)


def _kept_graphs(max_memory, x: torch.Tensor, directions: int) -> memory.KeptGraphs | None:
    """With grad on and a ``max_memory``: the count of the graphs a differentiable result
    keeps over all passes (each pass's graph stays for the caller's backward, so passes do not
    bound them), raising ``MemoryError`` once they would pass the budget (all pairs of 128
    features of a 128-512-512-1 MLP on 4 rows kept 2.8 GB under 16 MB); None otherwise."""
    if max_memory is None or not torch.is_grad_enabled():
        return None
    return memory.KeptGraphs(
        memory.parse_budget(max_memory, x.device), 0, directions, x.device,
        what="the autograd graphs the jet passes keep (grad mode is on and the result is "
             "differentiable: run under torch.no_grad() for a result without them)",
        unit="direction")


def _jet_pass(f, fa, row0, x: torch.Tensor, directions: torch.Tensor, order: int, target,
              additional_forward_args, fallback: bool, cache: bool) -> torch.Tensor:
    """One pass of :func:`jet` over ``directions [B, M, ...]`` (checked): traced, else nested
    forward mode. Returns ``[J+1, B, M]``."""
    B, M = directions.shape[:2]
    args = select_rows(forward_args(additional_forward_args),
                       torch.arange(B, device=x.device).repeat_interleave(M), B)
    x0 = x.unsqueeze(1).expand(directions.shape).reshape((B * M,) + x.shape[1:])
    if x.is_floating_point():
        parts = [x0.unsqueeze(0), directions.reshape((1,) + x0.shape).to(x.dtype),
                 x0.new_zeros((max(order - 1, 0),) + x0.shape)]
        arg = Jet(torch.cat(parts[:order + 1] if order < 2 else parts))
    else:
        arg = x0
    traced, cached = (None, False) if fallback else _trace_cached(f, cache, args)
    out = None if traced is None else _run_traced(traced, arg, order, cache, args)
    row0_f = at_rows(fa, torch.zeros(1, dtype=torch.long, device=x.device))
    checks = not row_coupling_allowed()  # (a random model's c0 differs anyway)
    if out is not None and cached and checks and not _primal_matches(row0_f, x, row0, out):
        _TRACES.clear()  # stale (submodule traces too): trace everything again
        traced = _trace(f, cache, args)
        out = None if traced is None else _run_traced(traced, arg, order, cache, args)
    why = "could not trace"
    if out is not None and checks and row0 is not None and \
            not _primal_matches(row0_f, x, row0, out):  # a fresh trace that is not f
        out, why = None, "the traced forward does not give f(x) (a tensor changed in place " \
            "through another name, as h += 1 after g = h?) for"
    if out is None and isinstance(arg, Jet):
        if not fallback:
            _warn_once(_op_name("call_function", f), why)
        with higher_order_ops(f):
            out = nested_jvp_writing_copies(
                respecting_no_grad(lambda z: _plain_output(f(z, *args))), f, [arg.c], order)
    elif out is None:
        out = rules.as_jet(_plain_output(f(arg, *args)), order).c
    return _select(out, target, B, M)


# Resident growth of a jet pass over (order + 2) x the bytes a reverse-mode forward of its rows
# saves (with the row's input and output): 0.9-1.3 on a 256-512-512-10 MLP and a 2-conv CNN,
# orders 1-4, 256-1024 directions, with and without grad (2-core Xeon, 2026-12-02).
JET_PASS_FACTOR = 2.0


def directions_per_pass(fa, x: torch.Tensor, order: int, max_memory) -> int:
    """Directions per jet pass within ``max_memory``: each costs, for every one of the ``B``
    rows, ``JET_PASS_FACTOR * (order + 2)`` times the bytes a forward of one row saves for a
    backward (measured once, on row 0). ``fa`` is ``f`` with its forward arguments
    (:func:`~taylor_kernels.engine.row_args.with_forward_args`). Raises ``MemoryError`` when
    not even one direction fits."""
    acts = memory.SavedBytes()
    with acts, torch.enable_grad():
        z = x[:1].detach().clone().requires_grad_(x.is_floating_point())
        out = _plain_output(at_rows(fa, torch.zeros(1, dtype=torch.long, device=x.device))(z))
    row = acts.total + z.numel() * z.element_size() + out.numel() * out.element_size()
    per_direction = JET_PASS_FACTOR * (order + 2) * row * x.shape[0]
    budget = memory.parse_budget(max_memory, x.device)
    if per_direction > budget:
        raise MemoryError(f"max_memory of {budget} bytes is too small for one direction of an "
                          f"order-{order} jet over these {x.shape[0]} rows (estimated "
                          f"{int(per_direction)} bytes); raise max_memory or pass fewer rows")
    # (a CPU pass gets memory.CPU_CHUNK_SHARE of the budget, as a path chunk does: the
    # allocator's freed blocks of one pass fit the next only in part; with the whole budget
    # a 32 MB call peaked at 1.4-2.4x it, QA 2026-12-03)
    room = memory.chunk_room(budget, x.device, per_direction)
    return max(1, int(room // per_direction))


def _run_traced(traced: Traced, arg, order: int, cache: bool, args: tuple = ()
                ) -> torch.Tensor:
    """The jet coefficients ``[J+1, B*M, ...]`` of a traced model at ``arg`` with forward
    ``args`` (their tensors the graph's later inputs) (a mapping's, ``ModelOutput``'s or
    tuple's output by the rule of :func:`~taylor_kernels.models.outputs.model_output`: it
    raised "Could not infer dtype")."""
    res = _JetInterpreter(traced, order, cache).run(arg, *_tensor_args(args))
    if not isinstance(res, (Jet, torch.Tensor)):
        res = _output_jet(res)
    return res.c if isinstance(res, Jet) else rules.as_jet(res, order).c


def _plain_output(out):
    """A plain forward's output tensor (structured outputs as :func:`_output_jet`)."""
    return out if isinstance(out, torch.Tensor) else _output_jet(out)


def _output_jet(out):
    """The jet (or constant tensor) a structured output holds, by the rule of
    :func:`~taylor_kernels.models.outputs.model_output` (a mapping's ``"logits"``, else its
    first; a tuple's first)."""
    picked = default_output(out, (Jet, torch.Tensor))
    if picked is None:
        raise ValueError(f"f must return a tensor [B] or [B, C] (or a mapping or tuple "
                         f"holding one), got {type(out).__name__}; select one, e.g. "
                         "lambda z: f(z).logits")
    return picked


def feature_index(i) -> int:
    """A flat feature index as an int: Python's, numpy's or a 0-d integer tensor;
    ``TypeError`` for anything else (a float index was truncated, ``1.5`` read as 1)."""
    if isinstance(i, bool) or isinstance(i, torch.Tensor) and (
            i.dim() != 0 or i.is_floating_point() or i.dtype == torch.bool):
        raise TypeError(f"index sets hold ints (flat feature indices), got {i!r}")
    try:
        return operator.index(i)
    except TypeError:
        raise TypeError(f"index sets hold ints (flat feature indices), got {i!r}") from None


def _counts(index_set) -> tuple[list[int], tuple[int, ...]]:
    """Feature indices with repeats -> (distinct features, multiplicities)."""
    index_set = [feature_index(i) for i in index_set]
    feats = list(dict.fromkeys(index_set))
    return feats, tuple(index_set.count(i) for i in feats)


@public_call
def mixed_partials(f, x: torch.Tensor, sets, *, target=None, additional_forward_args=None,
                   cache: bool = True, max_memory=None, progress: bool = False
                   ) -> torch.Tensor:
    """Mixed partial derivatives ``d^|S| f / d x_{i_1} ... d x_{i_k}`` for index tuples S.

    Args: ``x [B, ...]``; ``sets`` a list of tuples of 1 to 4 flat feature indices (repeats
    allowed: ``(3, 3)`` is ``d^2 f / d x_3^2``); ``target``, ``additional_forward_args`` and
    ``max_memory`` (bytes for one jet pass and its directions; None: one pass per order) as
    in :func:`jet`; ``progress``: a tqdm bar over the sets, counted per pass.
    Returns: ``[B, len(sets)]``. Each set costs one jet of order ``|S|`` along the
    Griewank-Utke-Walther directions ``sum_l j_l e_{i_l}`` (:func:`polarization_rule`), all
    sets batched into one :func:`jet` call per order, or per pass within ``max_memory``.
    """
    if isinstance(sets, torch.Tensor):  # [n_sets, k] integer rows
        sets = [tuple(int(i) for i in row) for row in sets.reshape(sets.shape[0], -1)] \
            if sets.dim() > 0 else sets
    if not isinstance(sets, (list, tuple)) or not sets:
        raise ValueError("sets must hold at least one tuple of feature indices")
    if not torch.is_tensor(x) or x.dim() < 1 or x.shape[0] == 0:
        raise ValueError("x must be a batch [B, ...] with at least one row, got "
                         + (f"shape {tuple(x.shape)}" if torch.is_tensor(x)
                            else type(x).__name__))
    D = x[0].numel()
    plans = []
    for s in sets:
        s = tuple(s) if isinstance(s, (tuple, list)) else (s,)
        if not 1 <= len(s) <= 4:
            raise ValueError(f"each set holds 1 to 4 indices, got {s!r}")
        feats, pattern = _counts(s)
        if any(not 0 <= i < D for i in feats):
            raise ValueError(f"index out of range [0, {D}) in {s!r} (x of shape "
                             f"{tuple(x.shape)}: its first dimension is the batch, the "
                             "features are the rest, flattened)")
        plans.append((len(s), feats, pattern))
    fa = with_forward_args(f, additional_forward_args, x.shape[0])
    per_pass = {d: None if max_memory is None else directions_per_pass(fa, x, d, max_memory)
                for d in sorted({p[0] for p in plans})}
    kept = _kept_graphs(max_memory, x, sum(polarization_size(p[2]) for p in plans))
    with kept or contextlib.nullcontext(), progress_bar(
            progress, total=len(sets), desc="mixed partials", unit="set") as bar:
        out = _mixed_partials(f, fa, x, plans, target, additional_forward_args, cache,
                              per_pass, kept, _trim(max_memory, x), bar)
    return _finite(out, x)


def _mixed_partials(f, fa, x: torch.Tensor, plans: list, target, additional_forward_args,
                    cache: bool, per_pass_of: dict, kept: memory.KeptGraphs | None,
                    trim: memory.ResidentTrim | None, bar) -> torch.Tensor:
    """:func:`mixed_partials`' jets, per order and pass, contracted into ``[B, n_sets]`` in
    the jets' dtype (the output's: a float64 output of a float32 ``x`` failed in the
    contraction with "addmv input tensors must have the same dtype") (``plans``: ``(order,
    features, multiplicities)`` per set; ``per_pass_of``: directions per pass for each
    order, None for one pass)."""
    D = x[0].numel()
    out = None
    checked = False  # (the model's checks run on the first pass's directions, once)
    for d, per_pass in per_pass_of.items():
        members = [m for m, p in enumerate(plans) if p[0] == d]
        sizes = [polarization_size(plans[m][2]) for m in members]
        for part in _passes(members, sizes, per_pass):
            rules = [polarization_rule(plans[m][2]) for m in part]  # (per pass: a tensor pair
            dirs = torch.zeros(sum(w.shape[0] for w, _ in rules), D, dtype=x.dtype,  # per set
                               device=x.device)  # held for every set took more than the jets)
            start = 0
            for m, (weights, _) in zip(part, rules):
                dirs[start:start + weights.shape[0], plans[m][1]] = \
                    weights.to(x.dtype).to(x.device)
                start += weights.shape[0]
            V = _check_jet_args(x, dirs.reshape((1, -1) + x.shape[1:]).expand(
                (x.shape[0], -1) + x.shape[1:]), d)
            if not checked:
                row0, checked = _model_checks(f, fa, x, V), True
            c = _jet_in_passes(per_pass if len(part) == 1 else None, kept, trim, f, fa, row0,
                               x, V, d, target, additional_forward_args, False, cache)[d]
            if trim is not None:
                trim.after_pass()
            if out is None:
                out = c.new_empty(x.shape[0], len(plans))
            start = 0
            for m, (_, gamma) in zip(part, rules):
                gamma = gamma.to(device=c.device, dtype=c.dtype)
                out[:, m] = c[:, start:start + gamma.numel()] @ gamma
                start += gamma.numel()
            bar.update(len(part))
    return out


def _passes(members: list, sizes: list, per_pass: int | None) -> list[list]:
    """``members`` in consecutive groups whose ``sizes`` (directions) sum to at most
    ``per_pass`` (a set with more gets a group of its own, its directions then chunked by
    :func:`jet`); one group for None."""
    if per_pass is None:
        return [members]
    groups, total = [[]], 0
    for m, n in zip(members, sizes):
        if groups[-1] and total + n > per_pass:
            groups.append([])
            total = 0
        groups[-1].append(m)
        total += n
    return groups
