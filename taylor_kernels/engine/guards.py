"""Checks run before any attribution touches the model, and probes that leave it as it was.

Every method batches rows of different inputs, or of different points of one input, into one
forward, so a model whose output for a row depends on the other rows of its batch (batch
statistics, batch mixing) gets wrong results by construction, and a random model (train-mode
dropout) makes them noise. Per method, what shares a batch and which checks run:

=======================================================  ==========================  ========
method                                                    rows in one forward         checks
=======================================================  ==========================  ========
integrated_gradients, noise_tunnel, captum IG/NoiseTunnel path points of all inputs    M, R
expected_gradients, shapley_integrated_gradients,         path points of all inputs    M, R
captum GradientShap                                       and references
layer_integrated_gradients, captum Layer*/Neuron*/        path points in the layer's   M, R
InternalInfluence, taylor_cam                             space, all inputs
integrated_hessians, expected_hessians,                   path points x HVP            M, R
group_integrated_hessians                                 directions
interactions, greedy_interaction_sets,                    inputs x jet/HVP directions  M, R
global_interactions, taylor_decomposition
fourteen_methods, unification_table                       perturbations, path points   M, R
jet, mixed_partials                                       inputs x directions          M, R
hvp, hessian, hessian_diagonal, third_order               inputs (grad of sum_b f_b)   M, R
=======================================================  ==========================  ========

M (:func:`check_model`, before the first forward) raises ``RuntimeError`` inside
``torch.inference_mode()`` (no autograd there) or for inference tensors as inputs (the public
functions copy them first: :func:`public_call`), and
``ValueError`` when a module of the model (the model itself, the module of a bound method, or
modules a function closes over) has batch norm using batch statistics or dropout ``p > 0`` in
train mode: call ``model.eval()``. R (:func:`check_rows_independent`, in
:func:`~taylor_kernels.engine.problem.make_problem` on the output-shape probe; for IG, EG,
SIG and GradientShap on their first batch of real points whose rows differ,
:meth:`~taylor_kernels.engine.problem.PathProblem.finish_row_check`;
:func:`~taylor_kernels.attr.layer_ends.layer_ends` on layer IG's two capturing forwards, and
:func:`check_function_rows` for ``jet`` and the derivative engine) runs the
model on one row alone and on that row beside others in a batch, and raises
``ValueError`` when the two outputs of the row differ beyond ``sqrt(eps)`` of the dtype times
the output scale; a third call on the row alone then says whether the model mixes rows (the
same output again) or is random (yet another one).
For ``jet``/``hvp`` on a plain function, only modules it closes over are seen.

Opting in: inside ``with taylor_kernels.allow_row_coupling(model):`` (this thread/task) both
checks pass and the model runs as it is, so results depend on how rows were batched: the shape
probe takes two rows (batch norm in train mode needs more than one), and without
``chunk_size`` / ``max_memory`` the path runs as one batch, as Captum's does; the model's
buffers (running statistics, ``num_batches_tracked``) are restored when the block exits.

Probes (the one-row shape probe, check R, layer activations) run under
:func:`preserved_buffers`, so they leave buffers as they were; :func:`cuda_peak_bytes` measures
a probe's CUDA memory and leaves the caller's peak statistic as it was.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import re
import threading
import types
import warnings
from typing import Callable

import torch
from torch import nn

from taylor_kernels.engine.row_args import RowFunction, at_rows
from taylor_kernels.models.module_kinds import runs_torch_forward
from taylor_kernels.shared_setting import SharedSetting

_ALLOWED: contextvars.ContextVar[bool] = contextvars.ContextVar("taylor_kernels_row_coupling",
                                                                  default=False)


def row_coupling_allowed() -> bool:
    """Whether this thread/task is inside :func:`allow_row_coupling`."""
    return _ALLOWED.get()


def cell_values(f) -> list:
    """The values in the closure cells of function ``f`` (empty cells skipped)."""
    values = []
    for cell in getattr(f, "__closure__", None) or ():
        try:
            values.append(cell.cell_contents)
        except ValueError:  # an empty cell
            continue
    return values


def named_globals(f) -> list[tuple[str, object]]:
    """``(name, value)`` of each global that function ``f``'s code names (empty for other
    callables)."""
    code, glb = getattr(f, "__code__", None), getattr(f, "__globals__", None)
    if code is None or not isinstance(glb, dict):
        return []
    return [(n, glb[n]) for n in code.co_names if n in glb]


def modules_of(f, depth: int = 3) -> list[nn.Module]:
    """The modules ``f`` is or reaches: ``f`` itself, the object of a bound method and its
    ``model`` attribute (an Inseq attribution model's ``forward``), what a
    ``functools.partial`` binds, the modules, functions and library objects in a function's
    closure cells and the modules among the globals its code names (a lambda calling a
    module-level model: its train-mode dropout, batch norm and buffers went unseen by the
    derivative engine and the jet), and the ``model`` of the library's own objects, followed
    ``depth`` levels deep. (One level
    missed a model behind the wrapper that Captum's ``multiply_by_inputs=False`` runs
    through, so train-mode dropout there passed unseen; the ``model`` of any object in a
    closure, e.g. a trainer's training model beside the EMA copy a lambda calls, is not
    followed.)"""
    return [v for v in reached(f, depth) if isinstance(v, nn.Module)]


def reached(f, depth: int = 3) -> list:
    """Every object :func:`modules_of` visits from ``f`` (the modules, and the functions,
    partials, bound methods and library objects it goes through), ``f`` first."""
    seen: dict[int, object] = {}  # id -> object, kept alive so that no id is reused

    def visit(v, left: int, owner: bool = False) -> None:
        if id(v) in seen:
            return
        seen[id(v)] = v
        if isinstance(v, RowFunction):  # (a wrapper: no level of its own)
            visit(v.model, left)
            return
        if isinstance(v, nn.Module):
            return
        if left == 0 or isinstance(v, (torch.Tensor, str, bytes, int, float, type,
                                       types.ModuleType)):
            return
        nxt: list = []
        if owner or type(v).__module__.startswith("taylor_kernels."):
            nxt.append(_attribute(v, "model"))
        if isinstance(v, functools.partial):
            nxt += [v.func, *v.args, *v.keywords.values()]
        nxt += [c for c in cell_values(v)
                    if isinstance(c, nn.Module) or callable(c) and not isinstance(c, type)
                    or type(c).__module__.startswith("taylor_kernels.")]  # e.g. a PathProblem
        # (a global compiled function: the derivative engine runs compiled code eagerly)
        nxt += [g for _, g in named_globals(v) if isinstance(g, nn.Module)
                or hasattr(g, "_torchdynamo_orig_callable")]
        for r in nxt:
            if r is not None:
                visit(r, left - 1)
        self_ = _attribute(v, "__self__")
        if self_ is not None:
            visit(self_, left - 1, owner=True)

    visit(f, depth)
    return list(seen.values())


def module_sizes(f) -> tuple:
    """``(id, elements)`` of each module ``f`` reaches (:func:`modules_of`; its parameters'
    and buffers' elements): part of the key of a cost cached per owner, so that a model whose
    layers were replaced by wider ones, or another model through a layer both share (the
    layer owns layer IG's cost), is measured anew (either reused a cost: 12x a budget)."""
    return tuple((id(m), sum(t.numel() for t in (*m.parameters(), *m.buffers())))
                 for m in modules_of(f))


def _attribute(v, name: str):
    """``getattr(v, name, None)``, also None when the attribute raises (a property)."""
    try:
        return getattr(v, name, None)
    except Exception:  # noqa: BLE001 - any failing property means "no such attribute" here
        return None


def _check_autograd_available(inputs) -> None:
    if torch.is_inference_mode_enabled():
        raise RuntimeError("taylor_kernels cannot run inside torch.inference_mode(): attribution "
                           "needs autograd, which inference mode turns off; call it outside the "
                           "`with torch.inference_mode():` block")
    for i, t in enumerate(inputs):
        if isinstance(t, torch.Tensor) and t.is_inference():
            raise RuntimeError(f"input {i} is an inference tensor (created under "
                               "torch.inference_mode()), which autograd cannot use; pass "
                               "x.clone() made outside inference mode")


def without_inference_tensors(value):
    """``value`` with each tensor made under ``torch.inference_mode()`` (one of an eval
    loop's) replaced by a normal copy, through tuples, lists and dicts (a container with none
    is returned as it is): autograd cannot use an inference tensor, and Captum attributes
    them. The public API (:func:`public_call`), the Captum front's arguments and
    token ids (``hf.check_ids``: a custom backward saved them) go through it."""
    if isinstance(value, torch.Tensor):
        if not value.is_inference():
            return value
        with torch.inference_mode(False):
            return value.clone()
    if isinstance(value, (tuple, list)) and not hasattr(value, "_fields"):
        copied = [without_inference_tensors(v) for v in value]
        same = all(c is v for c, v in zip(copied, value))
        return value if same else type(value)(copied)
    if type(value) is dict:
        copied = {k: without_inference_tensors(v) for k, v in value.items()}
        return value if all(copied[k] is v for k, v in value.items()) else copied
    return value


def public_call(fn: Callable) -> Callable:
    """Decorator of a public function: its tensor arguments (also inside tuples, lists and
    dicts) made under ``torch.inference_mode()`` are replaced by normal copies
    (:func:`without_inference_tensors`) before it runs, as the Captum front's are (the
    engines refused them with "input 0 is an inference tensor"; a call *inside* inference
    mode is still refused by :func:`check_model`: autograd is off there), and the call is
    opaque to ``torch.compile``: a compiled caller graph-breaks around it and runs it
    eagerly, as Captum's (Dynamo traced into the engine and failed on its memory
    arithmetic over symbolic sizes, or on its closures)."""
    @functools.wraps(fn)
    def call(*args, **kwargs):
        return fn(*without_inference_tensors(args), **without_inference_tensors(kwargs))
    return torch.compiler.disable(call)


def coupling_submodules(model: nn.Module, recurse: bool = True,
                        dropout: bool = True) -> list[str]:
    """Names of submodules (``recurse=False``: of ``model`` alone) that couple rows or are
    random in their current mode: batch norm using batch statistics (train mode, or no running
    statistics), dropout with ``p > 0`` in train mode (``dropout=False``: batch norm only)."""
    bad = []
    for name, m in model.named_modules() if recurse else [("", model)]:
        batch_stats = isinstance(m, nn.modules.batchnorm._BatchNorm) and (
            m.training or m.running_mean is None)
        random = dropout and isinstance(m, nn.modules.dropout._DropoutNd) and m.training and \
            m.p > 0
        if batch_stats or random:
            bad.append(f"{name or ('<model>' if recurse else 'a module it calls')} "
                       f"({type(m).__name__}"
                       f"{', train mode' if m.training else ', batch statistics'})")
    return bad


def coupling_modules_of(f) -> list[str]:
    """:func:`coupling_submodules` of every module ``f`` reaches (:func:`modules_of`)."""
    return [n for m in modules_of(f) for n in coupling_submodules(m)]


def check_model(f, inputs=(), higher_order: str | None = None) -> None:
    """Raise before any forward when autograd is off (inference mode, inference tensors in
    ``inputs``) or a module of ``f`` (see :func:`modules_of`) has train-mode batch norm or
    dropout, unless inside :func:`allow_row_coupling`, which covers batch statistics for
    first-order path methods only: a ``higher_order`` method (its name) runs one-row forwards
    and functorch transforms, where batch norm on batch statistics failed with torch's
    "Expected more than 1 value per channel" or functorch's "would mutate a captured
    Tensor"."""
    _check_autograd_available(inputs)
    if _ALLOWED.get():
        if higher_order is None:
            return
        bad = [n for m in modules_of(f) for n in coupling_submodules(m, dropout=False)]
        if bad:  # (train-mode dropout runs there: the opt-in accepts random models)
            raise ValueError(f"{higher_order} cannot attribute a model whose batch norm uses "
                             f"batch statistics ({_listed(bad)}), also inside "
                             "allow_row_coupling, which covers first-order path methods (IG "
                             "and its family): it runs forwards of one row and functorch "
                             "transforms; call model.eval() first")
        return
    bad = coupling_modules_of(f)
    if bad:
        raise ValueError(_COUPLING_ERROR.format(_listed(bad)))


def _listed(names: list[str]) -> str:
    return ", ".join(names[:6]) + (" ..." if len(names) > 6 else "")


NO_GRADIENT_PATH = ("the model output does not depend on the inputs (no gradient path); "
                    "check that the model uses its inputs and is not under torch.no_grad "
                    "(or detaches them)")
IN_PLACE_ERROR = ("the model changes its input in place (e.g. x.mul_(2) in forward); "
                  "attribution evaluates it at many points built from one tensor: make forward "
                  "compute on a copy (x = x * 2)")
_COUPLING_ERROR = ("the model has modules that couple rows or are random: {}. Attribution "
                   "batches rows of different inputs and path points together, so batch "
                   "statistics or dropout make it wrong: call model.eval() first, or opt in "
                   "with `with taylor_kernels.allow_row_coupling(model):`")


def _close(a: torch.Tensor, b: torch.Tensor, precision: torch.dtype | None = None) -> bool:
    """Equal within ``sqrt(eps)`` times ``1 + max |finite value|``, ``eps`` of ``a``'s dtype or
    of ``precision`` (the inputs' dtype) if coarser: a float32 model's output cast to float64
    rounds like float32 (not the parameters' dtype: one bf16 parameter, or a bf16 model's
    upcast logits, would loosen the check past real coupling) (NaN and infinities must sit at
    the same places: the model's own non-finite values are no sign of coupling)."""
    if a.shape != b.shape:
        return False
    eps = torch.finfo(a.dtype if a.is_floating_point() else torch.float64).eps
    if precision is not None:
        eps = max(eps, torch.finfo(precision).eps)
    a, b = a.detach().double(), b.detach().double()
    finite = torch.isfinite(a) & torch.isfinite(b)
    same = (a == b) | (a.isnan() & b.isnan())
    vals = torch.cat([a[finite].abs(), b[finite].abs(), a.new_zeros(1)])
    tol = eps ** 0.5 * (1.0 + vals.max().item())
    return bool((same | (finite & ((a - b).abs() <= tol))).all())


def check_rows_independent(run: Callable, row: torch.Tensor, other: torch.Tensor | None,
                           other_index: int, alone: torch.Tensor | None = None,
                           beside: torch.Tensor | None = None) -> torch.Tensor | None:
    """Raise ``ValueError`` if ``run(points [N, D], rows [N])`` (the model's output ``[N, ...]``)
    gives row ``row [D]`` a different output alone than beside ``other [D]`` in a batch of two
    (run it under :func:`preserved_buffers`), compared at the row's dtype where coarser
    than the output's.

    Two forwards: the row alone (or ``alone``, its output ``[1, ...]`` from an earlier call),
    then beside ``other`` (or ``beside``, its output ``[1, ...]`` computed in a batch with
    other rows). Equal outputs from two separate calls also rule out a random model; only when
    they differ does a third call on the row alone tell randomness (it differs again) from
    batch mixing. Returns the row's output alone (None inside :func:`allow_row_coupling`)."""
    if _ALLOWED.get():
        return None
    first = torch.zeros(1, dtype=torch.long, device=row.device)
    with torch.no_grad():
        alone = run(row.unsqueeze(0), first) if alone is None else alone
        if beside is None:
            pair_rows = torch.tensor([0, other_index], dtype=torch.long, device=row.device)
            beside = run(torch.stack([row, other]), pair_rows)
    check_alone_beside(alone, beside, lambda: run(row.unsqueeze(0), first),
                       row.dtype if row.is_floating_point() else None)
    return alone


def check_alone_beside(alone, beside, again: Callable[[], torch.Tensor],
                       precision: torch.dtype | None = None) -> None:
    """Check R's verdict: raise ``ValueError`` unless a row's output ``alone [1, ...]`` (its
    own batch) equals ``beside [1, ...]`` (computed in a batch with other rows; compared as
    :func:`_close` does, at ``precision`` where coarser than a tensor's own dtype);
    ``again()`` recomputes the row alone (no grad; called only when they differ) to tell a
    random model from one that mixes rows. Tuples compare entry by entry."""
    alone_t, beside_t = _tensors(alone), _tensors(beside)
    if alone_t is None or beside_t is None:
        return  # not a batch of outputs: the caller's own checks say what is wrong
    if len(alone_t) == len(beside_t) and all(_close(a[0], b[0], precision)
                                             for a, b in zip(alone_t, beside_t)):
        return
    with torch.no_grad():
        again_t = _tensors(again())
    random = again_t is None or not all(_close(a, b, precision)
                                        for a, b in zip(alone_t, again_t))
    why = ("gives different outputs for the same input in two calls (random, e.g. "
           "dropout in train mode, or a forward that changes the model's state, e.g. "
           "torch.nn.utils.spectral_norm's power iteration in train mode, which "
           "torch.nn.utils.parametrizations.spectral_norm or eval mode avoids)" if random
           else "gives an input a different output "
           "when another input shares its batch (it mixes rows, e.g. batch statistics)")
    raise ValueError(f"the model {why}; attribution batches rows of different inputs and "
                     "path points together, so its results would be wrong. Make the model "
                     "treat rows independently (model.eval()), or opt in with "
                     "`with taylor_kernels.allow_row_coupling(model):`. A function closing over "
                     "tensors of the whole batch (a padding mask) sees them beside fewer rows "
                     "here: pass them per row with additional_forward_args (where the API takes "
                     "it), or attribute one input at a time")


def _tensors(value) -> tuple[torch.Tensor, ...] | None:
    """``value`` (a tensor or a tuple of tensors, each with a batch dimension) as a tuple;
    ``None`` for anything else."""
    vals = value if isinstance(value, tuple) else (value,)
    if vals and all(isinstance(t, torch.Tensor) and t.dim() > 0 for t in vals):
        return vals
    return None


def is_row_tensor(value, B: int) -> bool:
    """Whether ``value`` is a tensor whose first dimension is the batch ``B`` (a per-row
    forward arg)."""
    return isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == B


def rows_differing(tensors, ref: int = 0) -> torch.Tensor:
    """Mask ``[N]`` (on the first tensor's device) of the rows that differ from row ``ref``
    in any of ``tensors`` (``[N, ...]`` each, the same ``N``)."""
    tensors = list(tensors)
    device = tensors[0].device
    differs = torch.zeros(tensors[0].shape[0], dtype=torch.bool, device=device)
    for t in tensors:
        differs |= (t != t[ref:ref + 1]).reshape(t.shape[0], -1).any(1).to(device)
    return differs


def distinct_row(x: torch.Tensor, fallback: torch.Tensor, *row_data) -> tuple[torch.Tensor, int]:
    """A partner for row 0 of ``x [B, ...]`` in check R, and its row index: the first row that
    differs from row 0 in ``x`` or in any per-row tensor of ``row_data`` (``[B, ...]``, e.g.
    forward args; identical rows cannot show batch mixing), else ``fallback [...]`` (e.g. a
    baseline) with index 0, else row 0 plus one."""
    differs = rows_differing((x,) + tuple(row_data))
    if differs.any():
        i = int(differs.nonzero()[0, 0])
        return x[i], i
    if not torch.equal(fallback, x[0]):
        return fallback, 0
    return x[0] + 1, 0


def check_function_rows(f: Callable, x: torch.Tensor, other: torch.Tensor) -> torch.Tensor | None:
    """Check R for ``f`` mapping a batch ``[N, ...] -> [N, ...]`` (``jet``, ``hvp``): row 0 of
    ``x`` beside another (:func:`distinct_row` with ``other [...]``), within :func:`probing`.
    Returns ``f(x[:1])`` (None inside :func:`allow_row_coupling`)."""
    row_data = f.row_data if isinstance(f, RowFunction) else ()  # (rows may differ in their
    partner, index = distinct_row(x, other, *row_data)  # arguments; the index picks them)
    with probing(f):  # on copies: the caller's x must not change (a forward changing it
        # was blamed on randomness)
        return check_rows_independent(lambda points, rows: on_a_copy(at_rows(f, rows), points),
                                      x[0], partner, index)


@contextlib.contextmanager
def random_state_kept():
    """Inside :func:`allow_row_coupling`: the global torch generators (the CPU's, and each
    CUDA device's once CUDA is initialized) put back on exit. A probe forward of a model
    with dropout in train mode (attributed as Captum does) drew its masks before the path,
    so the path's draws, and the caller's after the call, were not those of Captum's call
    under the same seed. (Elsewhere a random model is refused, by outputs that differ
    between a probe and a later forward: a replayed generator would hide it.)"""
    if not _ALLOWED.get():
        yield
        return
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        yield


@contextlib.contextmanager
def probing(f: Callable):
    """The block probes ``f`` (the function APIs' check R): the buffers of its modules are
    put back on exit, also those of modules it reaches where :func:`modules_of` finds none (a
    model behind a global), whose train-mode batch norm or dropout is then refused by name
    (:func:`modules_run`; outside :func:`allow_row_coupling`), also when the block failed on
    them (a one-row probe of BatchNorm1d raised torch's "Expected more than 1 value per
    channel"). Rows allowed to couple, the probes draw no random numbers of the caller's
    (:func:`random_state_kept`)."""
    ran: dict[int, nn.Module] = {}
    failure = None
    hidden = modules_run(ran) if not modules_of(f) else contextlib.nullcontext()  # (only
    # then: torch.compile warns about global hooks, and modules_of's models are kept anyway)
    with preserved_buffers(f), hidden, random_state_kept():
        try:
            yield
        except Exception as exc:  # noqa: BLE001 - re-raised below unless a module explains it
            failure = exc
    if not _ALLOWED.get():
        bad = [n for m in ran.values() for n in coupling_submodules(m, recurse=False)]
        if bad:
            raise ValueError(_COUPLING_ERROR.format(", ".join(bad[:6]))) from failure
    if isinstance(failure, ValueError) and "more than 1 value per channel" in str(failure):
        raise ValueError(_COUPLING_ERROR.format(  # (torch's words: a one-row probe of batch
            "it normalizes over the batch (batch statistics, e.g. F.batch_norm(..., "  # norm)
            "training=True))")) from failure
    if failure is not None:
        raise failure


def on_a_copy(run: Callable, points: torch.Tensor):
    """``run(copy of points)``, raising ``ValueError`` (:data:`IN_PLACE_ERROR`) when it changed
    its input: the probes run a model on rows of the caller's own tensors."""
    copy = points.clone()
    out = run(copy)
    if not torch.equal(copy, points):
        raise ValueError(IN_PLACE_ERROR)
    return out


_RECORDING = threading.local()  # this thread's callback while on_module_calls' block runs
def ignored_warning(pattern: str) -> SharedSetting:
    """A :class:`SharedSetting` ignoring warnings whose message matches ``pattern`` while any
    of its blocks runs: one filter entry that overlapping blocks share, added and removed by
    identity (``warnings.catch_warnings`` restores a snapshot of the whole list: two threads'
    blocks left the filter behind, and undid filters other threads set meanwhile;
    ``filterwarnings`` replaces a user's equal filter, which the removal then took away)."""
    entry = ("ignore", re.compile(pattern, re.I), Warning, None, 0)
    added: list = []  # our entry while blocks run, unless the user's equal one was there

    def add() -> None:
        if entry not in warnings.filters:  # (compiled patterns compare by pattern)
            warnings.filters.insert(0, entry)
            added.append(entry)

    def remove() -> None:
        while added:
            mine = added.pop()
            for i, f in enumerate(warnings.filters):
                if f is mine:
                    del warnings.filters[i]
                    break

    return SharedSetting(add, remove)


# torch's warning that a compiled module runs with global hooks, ignored while probes record
# modules
_global_hook_warning_ignored = ignored_warning(".*global hooks on modules")
# torch's warning that a module with a full backward hook returned a non-tensor, which every
# such module does while torch.fx traces it (its output is a Proxy)
proxy_hook_warning_ignored = ignored_warning(
    "For backward hooks to be called, module output should be a Tensor")


def _record_module(module, args):
    """The global pre-hook of :func:`modules_run`: one function object, under one key per
    thread, so a ``torch.compile``d model behind a global sees the same hooks on every probe
    (a new hook and key per probe made dynamo recompile it on every call)."""
    record = getattr(_RECORDING, "record", None)
    if record is not None and not torch.compiler.is_compiling():  # (dynamo traces the hook:
        record(module)  # it must not mutate there)


def foreign_global_hooks() -> bool:
    """Whether global module forward (pre-)hooks besides :func:`modules_run`'s recorder are
    registered: they run on every module call and may change what it computes (the recorder
    of another thread's probe only records)."""
    mod = nn.modules.module
    return bool(mod._global_forward_hooks) or any(
        h is not _record_module for h in mod._global_forward_pre_hooks.values())


@contextlib.contextmanager
def modules_run(into: dict):
    """Within the block, in this thread: every module called is recorded in ``into``
    (id -> module) and its buffers are put back on exit (a function may reach a model through
    a global, which :func:`modules_of` cannot see: a probe of train-mode batch norm there
    moved its running statistics although the call was then refused)."""
    saved: list = []

    def record(module):
        if id(module) not in into:
            into[id(module)] = module
            saved.extend(_module_state(module))

    try:
        with on_module_calls(record):
            yield into
    finally:
        _restore(saved)


@contextlib.contextmanager
def on_module_calls(callback: Callable[[nn.Module], None]):
    """Within the block, in this thread: ``callback(module)`` before every module call, after
    the callback of an enclosing block (a probe inside another block of this thread must not
    turn the outer one off)."""
    hooks = torch.nn.modules.module._global_forward_pre_hooks
    key = -1 - threading.get_ident() % 2**62  # (handles' ids are >= 0: no clash)
    outer = getattr(_RECORDING, "record", None)

    def chained(module):
        outer(module)
        callback(module)

    _RECORDING.record = callback if outer is None else chained
    hooks[key] = _record_module
    try:
        with _global_hook_warning_ignored():  # torch warns that a compiled module sees
            yield  # global hooks
    finally:
        _RECORDING.record = outer
        if outer is None:
            hooks.pop(key, None)


@contextlib.contextmanager
def preserved_buffers(f):
    """Snapshot the buffers of the modules of ``f`` and put them back on exit (success or
    exception), values and tensor objects (a buffer reassigned in ``forward`` is reattached),
    with the plain number and tensor attributes a forward may update beside them
    (:func:`_module_state`): probes cannot change running statistics, counters or caches."""
    saved = [entry for root in modules_of(f) for m in root.modules()
             for entry in _module_state(m)]
    try:
        yield
    finally:
        _restore(saved)


def _module_state(m: nn.Module) -> list:
    """``(module, name, object, value)`` snapshots of ``m``'s buffers and, for a module with
    buffers, of its public plain attributes holding a number or a tensor (``None`` for a
    number's value): the state a forward updates with them. Transformers' dynamic RoPE keeps
    ``max_seq_len_cached`` and ``attention_scaling`` beside its ``inv_freq`` buffer; restoring
    the buffer alone left them apart (a later forward of the same length used the unscaled
    frequencies: 0.77 off). A module without buffers keeps its attributes as its forwards
    leave them (a plain call counter counts the probes). None for torch's own batch norm in
    eval mode with running statistics, which its forward only reads (copying them cost 2-3 ms
    per probe on a MobileNet's 52 batch norms)."""
    if isinstance(m, nn.modules.batchnorm._BatchNorm) and not m.training and \
            m.running_mean is not None and runs_torch_forward(m):
        return []
    state = [(m, name, b, b.detach().clone()) for name, b in m._buffers.items() if b is not None]
    if not state:
        return state
    for name, v in vars(m).items():
        if name.startswith("_") or isinstance(v, bool):
            continue
        if isinstance(v, torch.Tensor) and not isinstance(v, nn.Parameter):
            state.append((m, name, v, v.detach().clone()))
        elif isinstance(v, (int, float)):
            state.append((m, name, v, None))
    return state


def _restore(saved: list) -> None:
    """Put ``(module, name, object, value)`` snapshots back: a buffer object and its value, a
    plain tensor attribute likewise, a number attribute as it was."""
    with torch.no_grad():
        for m, name, b, value in saved:
            if value is None:
                setattr(m, name, b)
                continue
            if name in m._buffers:
                m._buffers[name] = b
            else:
                object.__setattr__(m, name, b)
            # the values come back without a version bump: eval batch norm saved its running
            # stats for a backward still to come, and they hold the same values (train batch
            # norm updates them in its kernel without a bump either)
            with torch.autograd._unsafe_preserve_version_counter(b):
                b.copy_(value)


@contextlib.contextmanager
def allow_row_coupling(model: nn.Module):
    """Opt in to attributing a model that couples rows or is random (train-mode batch norm or
    dropout, batch-mixing layers): inside the block, in this thread/task, the row-coupling
    checks pass, and results depend on how the rows were batched. ``model``'s buffers are
    restored when the block exits."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"allow_row_coupling needs the nn.Module whose buffers to keep, got "
                        f"{type(model).__name__}")
    token = _ALLOWED.set(True)
    try:
        with preserved_buffers(model):
            yield
    finally:
        _ALLOWED.reset(token)


def cuda_peak_bytes(run: Callable, device: torch.device):
    """``(run(), bytes)``: the CUDA allocator's peak during ``run()`` above what was live
    before it, measured with ``torch.cuda.reset_peak_memory_stats``. The caller's peak
    statistic is then raised back to exactly its old value (:func:`_raise_cuda_peak`), so
    ``torch.cuda.max_memory_allocated`` reads as it did."""
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    try:
        out = run()
        return out, float(torch.cuda.max_memory_allocated(device) - before)
    finally:
        _raise_cuda_peak(peak, device)


_SMALL_BLOCK = 2**20  # the caching allocator's small pool: requests up to 1 MiB


def _raise_cuda_peak(peak: int, device: torch.device) -> None:
    """Allocate (then free) blocks until ``max_memory_allocated`` reaches ``peak`` exactly.

    Live bytes must grow by ``peak - memory_allocated()``. A large request can be served whole
    by a cached block up to 1 MiB bigger (the allocator splits off no smaller remainder), so
    while more than 2 MiB are missing each request stops 1 MiB short; requests are powers of
    two (which ``roundup_power2_divisions`` never rounds up) below ``max_split_size`` (blocks
    from there are never split), so every block counts as asked or less than 1 MiB more, and
    the last requests, in the small pool, land exactly on 512-byte multiples (all that the
    allocator counts). About log2 of the gap rounds. Skipped when that memory is not free on
    the device or in the allocator's cache (found by an out-of-memory error, the allocator
    first freed every cached block, counted an OOM and ran its OOM observers: a user who had
    freed a large model paid that on every probe). Only the allocated-bytes peak is kept: the
    reserved, active and per-pool peaks read from the probe on, and the blocks the restore
    took stay in the cache."""
    gap = peak - torch.cuda.memory_allocated(device)
    free, _ = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if gap > 0 and gap + 2 * _SMALL_BLOCK > free + cached:
        return
    stats = torch.cuda.memory_stats(device)
    max_split = stats.get("max_split_size", -1)
    max_split = max_split if max_split and max_split > 0 else None
    held = []
    with contextlib.suppress(torch.cuda.OutOfMemoryError):
        for _ in range(128):  # bounded: each round adds at least half of what the room allows
            need = peak - torch.cuda.memory_allocated(device)
            if torch.cuda.max_memory_allocated(device) >= peak or need <= 0:
                break
            room = need - _SMALL_BLOCK if need > 2 * _SMALL_BLOCK else min(need, _SMALL_BLOCK)
            size = 1 << (int(room).bit_length() - 1)
            while max_split is not None and size >= max_split and size > 512:
                size //= 2
            held.append(torch.empty(size, dtype=torch.uint8, device=device))
    del held


__all__ = ["allow_row_coupling", "cell_values", "check_model", "check_function_rows",
           "distinct_row", "check_alone_beside", "check_rows_independent",
           "coupling_modules_of", "coupling_submodules", "foreign_global_hooks",
           "row_coupling_allowed", "cuda_peak_bytes", "is_row_tensor", "modules_of",
           "modules_run", "on_a_copy", "preserved_buffers", "probing", "rows_differing"]
