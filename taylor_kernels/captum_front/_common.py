"""Helpers shared by the Captum drop-in classes.

* Argument formatting the way Captum reads it (a tuple in gives a tuple out; baselines as
  None / numbers / tensors / tuples of these; additional forward args as one value or a tuple).
* Captum's row expansion for sampled methods: every per-example value (tensor with the batch
  as first dimension, list of length ``B``) is repeated ``n`` times per example
  (``repeat_interleave``), block by block.
* Captum's noise draw (``torch.normal`` on the global RNG, noise in the default dtype).
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import numbers
import threading
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from taylor_kernels.attr.arguments import forward_args as format_args
from taylor_kernels.attr.completeness import completeness_gap
from taylor_kernels.attr.layer_capture import UnusedLayerOutput
from taylor_kernels.engine import chunking, guards
from taylor_kernels.engine.guards import is_row_tensor, without_inference_tensors
from taylor_kernels.engine.problem import NoBatchOutputError
from taylor_kernels.models.hf import ID_DTYPES
from taylor_kernels.numerics import check_dense_real
from taylor_kernels.user_warnings import warn


class CaptumValueError(ValueError, AssertionError):
    """Bad input to a Captum front method: our ``ValueError`` with its message, and also the
    ``AssertionError`` Captum raises for the same input (so either ``except`` catches it)."""


class CaptumTypeError(TypeError, AssertionError):
    """As :class:`CaptumValueError`, for inputs of the wrong type (e.g. float targets)."""


class CaptumIndexError(CaptumValueError, IndexError):
    """As :class:`CaptumValueError`, for input Captum fails on with an ``IndexError`` (an empty
    batch, a model returning a 0-d output)."""


class CaptumZeroDivisionError(CaptumValueError, ZeroDivisionError):
    """As :class:`CaptumValueError`, for input Captum fails on with a ``ZeroDivisionError``
    (zero samples)."""


class CaptumRuntimeError(CaptumValueError, RuntimeError):
    """As :class:`CaptumValueError`, for input Captum fails on with a ``RuntimeError``
    (negative ``stdevs``, a negative sample count)."""


_FOR_CAPTUM = threading.local()


def constructing_for_captum() -> bool:
    """True while ``patch()`` builds our twin of a Captum instance in this thread (whose own
    constructor has already warned about what it got: ours stays quiet)."""
    return getattr(_FOR_CAPTUM, "active", False)


@contextlib.contextmanager
def for_captum():
    """The block builds our twin of a Captum instance (see :func:`constructing_for_captum`):
    a thread's flag, where a ``warnings`` filter would be the whole process's."""
    outer = constructing_for_captum()
    _FOR_CAPTUM.active = True
    try:
        yield
    finally:
        _FOR_CAPTUM.active = outer


def customised(inst, cls) -> bool:
    """Whether ``inst`` changes how ``cls`` (one of its classes) computes: a subclass
    overriding one of the class's methods (other than ``__init__``), a method replaced on the
    instance (``inst._attribute = ...``), or an instance ``gradient_func`` of its own
    (Captum's instances). Those run the instance's own code:
    our replacement (under ``patch()``) or the generation one pass could not honour the
    change."""
    if "gradient_func" in inst.__dict__:
        from captum._utils.gradient import compute_gradients
        if inst.__dict__["gradient_func"] is not compute_gradients:
            return True
    inherited = {n for c in cls.__mro__ for n, v in vars(c).items() if callable(v)}
    if any(n in inherited and n not in ("__init__", "gradient_func") and callable(v)
           for n, v in vars(inst).items()):  # a method replaced on the instance itself
        return True
    for sub in type(inst).__mro__:
        if sub is cls:
            return False
        if any(n in inherited and n != "__init__" for n in vars(sub)):
            return True
    return False


def captum_method(fn: Callable) -> Callable:
    """Wrap ``attribute`` so that it carries ``__wrapped__`` like Captum's ``@log_usage``
    methods (Captum's own ``NoiseTunnel`` calls ``attribute.__wrapped__`` on what it wraps),
    so that our ``ValueError`` / ``TypeError`` for bad input are also the
    ``AssertionError`` Captum raises (:class:`CaptumValueError`, :class:`CaptumTypeError`),
    and so that a model in train mode runs as in Captum (:func:`train_mode_as_captum`)."""

    signature = inspect.signature(fn)

    @functools.wraps(fn)
    @captum_errors
    def attribute(*args, **kwargs):
        args = tuple(without_inference_tensors(a) for a in args)
        kwargs = {k: without_inference_tensors(v) for k, v in kwargs.items()}
        method = args[0] if args else None
        try:
            bound = signature.bind(*args, **kwargs)
        except TypeError:
            bound = None  # (the method's own call then raises its error)
        if bound is not None:
            _check_baseline_forms(method, signature, bound)
            if getattr(method, "INTERPOLATES_INPUTS", False) and _interpolable(bound):
                args, kwargs = bound.args, bound.kwargs
        with rng_kept_on_error(), train_mode_as_captum(
                method, bound is not None and _splits_batches(signature, bound)):
            return fn(*args, **kwargs)

    return attribute


@contextlib.contextmanager
def rng_kept_on_error():
    """The global torch (CPU and initialized CUDA) and numpy generators put back when the
    block raises: a call that fails leaves the caller's random state as it was (NoiseTunnel
    drew its noise before the wrapped method refused the baselines; Captum checks first)."""
    cpu, np_state = torch.get_rng_state(), np.random.get_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    try:
        yield
    except BaseException:
        torch.set_rng_state(cpu)
        np.random.set_state(np_state)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        raise


def _splits_batches(signature: inspect.Signature, bound: inspect.BoundArguments) -> bool:
    """Whether Captum would run the call's path points in more than one batch: an
    ``internal_batch_size`` under ``B * n_steps`` (Captum's batches hold whole steps of all
    ``B`` examples; ours follow the examples: other rows share a batch)."""
    size, inputs = bound.arguments.get("internal_batch_size"), bound.arguments.get("inputs")
    first = inputs[0] if isinstance(inputs, tuple) and inputs else inputs
    if size is None or not isinstance(first, torch.Tensor) or first.dim() == 0:
        return False
    param = signature.parameters.get("n_steps")
    steps = bound.arguments.get("n_steps", 1 if param is None else param.default)
    try:
        return size < first.shape[0] * steps
    except TypeError:
        return False


def captum_errors(fn: Callable) -> Callable:
    """``fn`` raising our ``ValueError`` / ``TypeError`` for bad input as also the
    ``AssertionError`` Captum raises (:class:`CaptumValueError`, :class:`CaptumTypeError`; the
    engine's for a 0-d model output as Captum's ``IndexError`` too, :class:`CaptumIndexError`;
    a layer whose activation does not reach the output as Captum's ``RuntimeError`` too,
    :class:`CaptumRuntimeError`); ``IndexError`` (out-of-range targets) and
    ``AssertionError`` pass as they are. Opaque to ``torch.compile``, as the core API's
    calls (:func:`~taylor_kernels.engine.guards.public_call`): a compiled caller
    graph-breaks around it (Dynamo traced into the front and failed on fake tensors)."""
    @functools.wraps(fn)
    def call(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except NoBatchOutputError as exc:  # (an IndexError, as Captum's, but not ours yet)
            raise CaptumIndexError(str(exc)) from exc
        except UnusedLayerOutput as exc:  # (Captum: autograd's RuntimeError)
            raise CaptumRuntimeError(str(exc)) from exc
        except (AssertionError, IndexError):  # Captum's types already (out-of-range targets)
            raise
        except (TypeError, ValueError) as exc:
            if not _ours_to_convert(exc):  # (the model's own: `except ModelInputError` must
                raise  # still catch it, as under Captum)
            if isinstance(exc, TypeError):  # (first: a non-whole step count is both)
                raise CaptumTypeError(str(exc)) from exc
            raise CaptumValueError(str(exc)) from exc
    return torch.compiler.disable(call)


def _ours_to_convert(exc: Exception) -> bool:
    """Whether :func:`captum_errors` re-raises ``exc`` as Captum's type: a plain
    ``ValueError`` / ``TypeError`` or one of the library's own subclasses; a subclass defined
    elsewhere (a model's ``ModelInputError(ValueError)``) passes as it is."""
    kind = type(exc)
    return kind in (TypeError, ValueError) or kind.__module__.split(".")[0] == "taylor_kernels"


def _check_baseline_forms(method, signature: inspect.Signature,
                          bound: inspect.BoundArguments) -> None:
    """``ValueError`` (Captum's ``AssertionError``) for ``baselines`` (or an entry of a tuple
    of them) that is none of Captum's forms: None, a number, a tensor, or (GradientSHAP's
    distributions, ``BASELINE_CALLABLES``) a callable. Ours read a list ``[0.5]`` as a tuple,
    and layer IG failed on a string or a dict with an ``AttributeError``."""
    if "baselines" not in signature.parameters:
        return
    value = bound.arguments.get("baselines")
    for b in value if isinstance(value, tuple) else (value,):
        if not (b is None or isinstance(b, (int, float, torch.Tensor)) or callable(b) and
                getattr(method, "BASELINE_CALLABLES", False)):
            raise ValueError("baseline input argument must be either a torch.Tensor or a "
                             "number (a tuple of them for tuple inputs), however "
                             f"{type(b).__name__} detected: {b!r:.60}")


def _interpolable(bound: inspect.BoundArguments) -> bool:
    """Put integer ``inputs`` and ``baselines`` tensors (uint8 images, int64 counts) of the
    call ``bound`` in the default float dtype (True when it changed one), as Captum's interpolation ``b + t (x - b)``
    makes them for the model (it raised here). Not int64/int32 tensors for a model with an
    embedding: those are token ids, which the method's own check refuses by name (floats fail
    inside the embedding); an embedding indexes with no other integer dtype, so a uint8 image
    beside an embedded label is interpolated."""
    def tensors(value) -> list:
        return [t for v in (value if isinstance(value, tuple) else (value,))
                for t in ([v] if isinstance(v, torch.Tensor) else [])]

    def integer(t: torch.Tensor) -> bool:
        return not (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool)

    names = [n for n in ("inputs", "baselines")
             if any(integer(t) for t in tensors(bound.arguments.get(n)))]
    if not names:
        return False
    keep_ids = token_ids_of_an_embedding(getattr(bound.args[0], "forward_func", None),
                                         [t for n in names for t in tensors(bound.arguments[n])])

    def to_float(value):
        if isinstance(value, tuple):
            return tuple(to_float(v) for v in value)
        if not isinstance(value, torch.Tensor) or not integer(value) or (
                keep_ids and value.dtype in ID_DTYPES):
            return value
        return value.to(torch.get_default_dtype())

    for name in names:
        bound.arguments[name] = to_float(bound.arguments[name])
    return True


def token_ids_of_an_embedding(forward_func, tensors) -> bool:
    """Whether some of ``tensors`` are int64/int32 (token ids) and the modules
    ``forward_func`` reaches hold an embedding (the walk only when there are such tensors)."""
    return any(isinstance(t, torch.Tensor) and t.dtype in ID_DTYPES for t in tensors) and any(
        isinstance(sub, (torch.nn.Embedding, torch.nn.EmbeddingBag))
        for m in guards.modules_of(forward_func) for sub in m.modules())


def refuse_noise_on_token_ids(method: str, forward_func, inputs, instead: str) -> None:
    """:class:`CaptumRuntimeError` naming ``instead`` when ``inputs`` (a tensor or tuple) are
    token ids of a model with an embedding: ``method`` adds Gaussian noise to its inputs, so
    the ids became floats and the embedding failed inside PyTorch (as in Captum)."""
    tensors = inputs if isinstance(inputs, tuple) else (inputs,)
    if token_ids_of_an_embedding(forward_func, tensors):
        raise CaptumRuntimeError(f"{method} adds Gaussian noise to its inputs, and these are "
                                 "token ids (int64/int32) of a model with an embedding; "
                                 f"{instead}")


@contextlib.contextmanager
def train_mode_as_captum(method, splits_batches: bool = False):
    """Run ``method``'s model as Captum does when it is in train mode (dropout active, batch
    norm on batch statistics): the engine refuses such a model (its rows would not be
    independent), so the block runs inside :func:`taylor_kernels.allow_row_coupling` for each
    such model, in one batch as Captum's, with a warning. Inseq's ``mc_dropout_prob_avg``
    step score leaves its model in train mode and raised here. Unlike Captum, the model's
    buffers (batch norm's running statistics) are left as they were. Batch statistics make
    the numbers depend on which rows share a batch: a ``ValueError`` where ours are batched
    unlike Captum's (``splits_batches``: an ``internal_batch_size``; a class whose
    ``BATCHES_AS_CAPTUM`` is False: conductance), which gave other numbers silently (0.66
    and 2.3 off Captum's conductance)."""
    forward = getattr(method, "forward_func", None)
    forward = getattr(method, "model", None) if forward is None else forward
    roots = [] if forward is None else [m for m in guards.modules_of(forward)
                                        if guards.coupling_submodules(m)]
    if not roots:
        yield
        return
    stats = [n for m in roots for n in guards.coupling_submodules(m, dropout=False)]
    if stats and (splits_batches or not getattr(method, "BATCHES_AS_CAPTUM", True)):
        how = ("internal_batch_size splits the path points" if splits_batches else
               f"{type(method).__name__} batches its path points")
        raise ValueError(
            f"the model normalizes over the batch ({', '.join(stats[:4])}"
            f"{' ...' if len(stats) > 4 else ''}), so its numbers depend on which rows share "
            f"a batch, and {how} unlike Captum: the result would differ from Captum's; call "
            "model.eval() for the model's deterministic attributions"
            + ("" if not splits_batches else ", or leave internal_batch_size out (one batch, "
               "as Captum's)"))
    if not guards.row_coupling_allowed():  # (an outer call, or the user's block, said so)
        names = [n for m in roots for n in guards.coupling_submodules(m)]
        warn(f"the model has modules in train mode ({', '.join(names[:4])}"
             f"{' ...' if len(names) > 4 else ''}): attributed as Captum does, with "
             "dropout active and batch norm on the batch's statistics, so the result "
             "is random or depends on the batch; call model.eval() for the model's "
             "deterministic attributions", RuntimeWarning)
    with contextlib.ExitStack() as stack:  # its buffers kept, also inside another's opt-in
        for m in roots:
            stack.enter_context(guards.allow_row_coupling(m))
        yield


def promoted(value):
    """A tensor (or a tuple of them) promoted to at least the default float dtype (Captum
    scales gradients by default-dtype step sizes in internal influence and neuron
    conductance: bf16 layers give float32, float64 under a float64 default)."""
    if isinstance(value, tuple):
        return tuple(promoted(v) for v in value)
    return value.to(torch.promote_types(value.dtype, torch.get_default_dtype()))


class CaptumNamed:
    """Captum's ``Attribution.get_name`` on the front's classes."""

    @classmethod
    def get_name(cls) -> str:
        """The class name with a space before each character after the first that is not a
        lower-case letter (Captum's rule: ``"Integrated Gradients"``,
        ``"L L M Gradient Attribution"``)."""
        return "".join(c if i == 0 or c.islower() else " " + c
                       for i, c in enumerate(cls.__name__))


def format_inputs(inputs) -> tuple[tuple[torch.Tensor, ...], bool]:
    """``(tuple_of_tensors, was_tuple)``; Captum returns a tuple exactly when given one."""
    if isinstance(inputs, torch.Tensor):
        return _non_empty((inputs,)), False
    if isinstance(inputs, tuple) and inputs and all(isinstance(t, torch.Tensor) for t in inputs):
        return _non_empty(inputs), True
    raise ValueError("inputs must be a tensor or a non-empty tuple of tensors, got "
                     f"{type(inputs).__name__}")


def _non_empty(inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """``inputs``; :class:`CaptumIndexError` (Captum's ``IndexError``) for an empty batch."""
    if inputs[0].dim() and not inputs[0].shape[0]:
        raise CaptumIndexError(f"input 0 has shape {tuple(inputs[0].shape)}: an empty batch; "
                               "give at least one row")
    return inputs


def per_input(value, n_inputs: int, name: str) -> tuple:
    """A per-input tuple: a tuple must have one entry per input; a single value is shared."""
    if isinstance(value, tuple):
        if len(value) != n_inputs:
            raise ValueError(f"{len(value)} {name} given for {n_inputs} inputs")
        return value
    return (value,) * n_inputs


def tracks_inputs(tup: tuple[torch.Tensor, ...], method: str, tol=None) -> bool:
    """Whether Captum would return attributions with a graph: grad mode on and an input
    requiring grad (fixed rules only: the adaptive and exact rules keep theirs detached)."""
    return (torch.is_grad_enabled() and any(x.requires_grad for x in tup)
            and method not in ("adaptive", "exact") and tol is None)


def with_factor_graph(res, tup: tuple[torch.Tensor, ...], bls: tuple[torch.Tensor, ...],
                      was_tuple: bool):
    """Captum's graph on path attributions: ``res`` holds the unscaled integrals ``I`` (a
    tuple, ``multiply_by_inputs=False``); returns it with attributions
    ``I.detach() * (x - b)``, autograd tracking the factor, and the gap of those
    (``sum(I) - gap_I = f(x) - f(b)``). ``I`` keeps its dtype (float32 for bf16/fp16 inputs,
    as the attributions without a graph): Captum's integral is in at least float32 (its step
    sizes are), and so are its attributions (cast to the inputs' bf16 they were 2.5e-3 off)."""
    attrs = tuple(i * (x - b) for i, x, b in zip(res.attributions, tup, bls))
    change = sum(i.reshape(i.shape[0], -1).sum(1) for i in res.attributions) - res.gap
    res.gap = sum(a.detach().reshape(a.shape[0], -1).sum(1).to(change.dtype)
                  for a in attrs) - change
    res.attributions = attrs if was_tuple else attrs[0]
    return res


HALF_DTYPES = (torch.bfloat16, torch.float16)


def float32_path(forward: Callable, tup: tuple[torch.Tensor, ...]
                 ) -> tuple[Callable, tuple[torch.Tensor, ...]]:
    """``(forward, inputs)`` for the unscaled path (``multiply_by_inputs=False``, and the
    inputs-require-grad graph of :func:`with_factor_graph`): bf16/fp16 inputs ``tup`` as
    float32, and ``forward`` fed the points ``b + t (x - b)`` rounded once to the inputs'
    dtypes, as the engine's IG points (and Captum's from zero baselines) are. In bf16 the
    unscaled path's own coordinates rounded ``t`` first: 4.5e-4 off Captum. Unchanged when
    no input is bf16/fp16."""
    dtypes = tuple(x.dtype for x in tup)
    if not any(d in HALF_DTYPES for d in dtypes):
        return forward, tup
    n = len(tup)

    def at_input_dtypes(*args):
        return forward(*(p.to(d) for p, d in zip(args[:n], dtypes)), *args[n:])

    at_input_dtypes.cost_owner = chunking.owner_for(forward, "float32_path") or at_input_dtypes
    return at_input_dtypes, tuple(x.float() if x.dtype in HALF_DTYPES else x for x in tup)


def dense_baselines(baselines, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """Each input's baseline as a tensor of the input's shape (None = zeros, a number, or a
    tensor broadcastable to the input: ``[B|1, ...]`` or one example's shape)."""
    out = []
    for i, (b, x) in enumerate(zip(per_input(baselines, len(inputs), "baselines"), inputs)):
        if b is None or isinstance(b, (int, float)):
            out.append(torch.full_like(x, 0 if b is None else b))
        elif isinstance(b, torch.Tensor):
            check_dense_real(b, f"baseline {i}")  # (before the cast: it dropped an imaginary part)
            try:
                out.append(b.to(device=x.device, dtype=x.dtype).expand_as(x))
            except RuntimeError as exc:
                raise ValueError(f"baseline {i} of shape {tuple(b.shape)} does not broadcast to "
                                 f"input {i} of shape {tuple(x.shape)}") from exc
        else:
            raise ValueError(f"baseline {i} must be None, a number or a tensor, got "
                             f"{type(b).__name__}")
    return tuple(out)


def expand_rows(t: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Captum's per-example expansion over blocks of ``sizes`` samples, concatenated: within
    a block of ``n`` samples row ``b`` becomes rows ``b*n .. b*n + n-1``
    (``repeat_interleave``); the blocks follow each other."""
    return torch.cat([t.repeat_interleave(n, dim=0) for n in sizes], dim=0)


def expand_target(target: Any, B: int, sizes: list[int]) -> Any:
    """``target`` for the expanded rows, as Captum's ``_expand_target``: a list (one entry per
    row) or a ``[B, ...]`` tensor of more than one element by :func:`expand_rows`; an int, an
    index tuple or a one-element tensor (``[[c]]`` for one example) shared.
    A list or a tensor of more than one entry whose length is not ``B`` is
    :class:`CaptumValueError`, as Captum's check of the target against the output (one of
    ``B * n`` entries was taken per draw, silently)."""
    if is_row_tensor(target, B) and target.numel() > 1:
        return expand_rows(target, sizes)
    if isinstance(target, list) and len(target) == B:
        return [v for n in sizes for v in target for _ in range(n)]
    if isinstance(target, list) or isinstance(target, torch.Tensor) and target.numel() > 1:
        raise CaptumValueError(f"target has {len(target)} entries for {B} inputs: give one "
                               "per input (it is repeated for each sample) or one for all")
    return target


def expand_args(additional_forward_args: Any, B: int, sizes: list[int]) -> tuple:
    """The forward args as a tuple for the expanded rows, as Captum's
    ``_expand_additional_forward_args``: each top-level tensor with the batch first by
    :func:`expand_rows`; lists, nested tuples, numbers and ``[1, ...]`` tensors passed as they
    are (a list of ``B`` numbers was once repeated per sample: 50x off Captum)."""
    return tuple(expand_rows(a, sizes) if is_row_tensor(a, B) else a
                 for a in format_args(additional_forward_args))


def captum_noise(x: torch.Tensor, stdev: float, n: int) -> torch.Tensor:
    """``x`` repeated ``n`` times per row plus Gaussian noise, drawn exactly as Captum's
    ``NoiseTunnel`` draws it: one ``torch.normal(0, std)`` call on the global RNG with ``std``
    a tensor of the *default* dtype shaped like the expanded input (so under the same
    ``torch.manual_seed`` the noise is the same as Captum's, in the same order)."""
    size = (x.shape[0] * n,) + tuple(x.shape[1:])
    std = torch.full(size, float(stdev), dtype=torch.get_default_dtype(), device=x.device)
    return x.detach().repeat_interleave(n, dim=0) + torch.normal(0.0, std)


def check_stdevs(stdevs, n_inputs: int) -> tuple[float, ...]:
    """One non-negative float per input (a tuple, or one number for all); a negative one is
    :class:`CaptumRuntimeError` (Captum's ``torch.normal`` raises ``RuntimeError``)."""
    stds = per_input(stdevs, n_inputs, "stdevs")
    for s in stds:
        if isinstance(s, bool) or not isinstance(s, (int, float)):
            raise ValueError(f"stdevs must be non-negative numbers, got {stdevs!r}")
        if s < 0:
            raise CaptumRuntimeError(f"stdevs must be non-negative numbers, got {stdevs!r}")
    return tuple(float(s) for s in stds)


def resolve_baselines(baselines, inputs, n_inputs: int) -> tuple:
    """A GradientSHAP baseline distribution as a tuple of ``[N, ...]`` tensors: a tensor, a
    tuple, or a callable (called with no argument, or with ``inputs`` if it takes one)."""
    if callable(baselines) and not isinstance(baselines, torch.Tensor):
        baselines = baselines() if not inspect.signature(baselines).parameters \
            else baselines(inputs)
    bls = baselines if isinstance(baselines, tuple) else (baselines,)
    if len(bls) != n_inputs or not isinstance(bls[0], torch.Tensor):
        raise ValueError("GradientShap needs a baseline distribution: a tensor [N, ...] (a tuple "
                         "with one entry per input for tuple inputs), or a callable returning "
                         f"one; got {type(baselines).__name__}")
    xs = (inputs,) if isinstance(inputs, torch.Tensor) else inputs
    for i, (bl, x) in enumerate(zip(bls, xs)):
        if isinstance(bl, torch.Tensor) and tuple(bl.shape[1:]) != tuple(x.shape[1:]):
            raise ValueError(f"baseline distribution {i} of shape {tuple(bl.shape)} must be "
                             f"[N, *{tuple(x.shape[1:])}]")
    return bls


def draw_baselines(baselines: tuple, B: int, n: int) -> tuple:
    """Captum's ``draw_baseline_from_distrib``: ``n * B`` rows drawn uniformly (with
    replacement) from each baseline tensor by ``numpy.random.choice``, one draw per tensor in
    order; numbers are kept."""
    return tuple(bl[np.random.choice(bl.shape[0], n * B).tolist()]
                 if isinstance(bl, torch.Tensor) else bl for bl in baselines)


@dataclass
class ShapDraws:
    """GradientSHAP's samples: ``B * n`` rows of noisy inputs, drawn (dense) baselines and
    nodes ``alphas``, with the target and forward args expanded to those rows."""

    inputs: tuple
    was_tuple: bool
    noisy: tuple
    drawn: tuple
    alphas: torch.Tensor
    target: Any
    forward_args: tuple
    B: int
    n: int

    def mean(self, rows: torch.Tensor) -> torch.Tensor:
        """``[B * n, ...]`` per-draw rows averaged to ``[B, ...]``."""
        return rows.reshape(self.B, self.n, *rows.shape[1:]).sum(dim=1) * (1 / self.n)


def draw_gradient_shap(inputs, baselines, n_samples, stdevs, target,
                       additional_forward_args) -> ShapDraws:
    """Captum's GradientSHAP draws, same generators in the same order: baselines by
    ``numpy.random.choice``, input noise by ``torch.normal``, nodes by
    ``numpy.random.uniform`` (in the noisy inputs' dtype, as Captum, whose nodes take the
    dtype of the inputs it interpolates: the noisy ones, floating even for integer inputs)."""
    tup, was_tuple = format_inputs(inputs)
    bls = resolve_baselines(baselines, inputs, len(tup))
    if isinstance(n_samples, bool) or int(n_samples) != n_samples or n_samples < 1:
        error = CaptumZeroDivisionError if n_samples == 0 else ValueError  # (Captum's types)
        raise error(f"n_samples must be a positive integer, got {n_samples}")
    stds = check_stdevs(stdevs, len(tup))
    B, n = tup[0].shape[0], int(n_samples)
    with torch.no_grad():
        drawn = draw_baselines(bls, B, n)
        noisy = tuple(captum_noise(x, s, n) for x, s in zip(tup, stds))
        alphas = torch.tensor(np.random.uniform(0.0, 1.0, B * n), dtype=noisy[0].dtype)
    return ShapDraws(tup, was_tuple, noisy, dense_baselines(drawn, noisy), alphas,
                     expand_target(target, B, [n]), expand_args(additional_forward_args, B, [n]),
                     B, n)


_UNEXPANDED_WARNED: set[str] = set()  # (the warnings _warn_unexpanded gave in this process)


def _warn_unexpanded(index: int, arg: torch.Tensor, batch: int) -> None:
    """A one-time ``UserWarning`` (per message) that forward arg ``index``, a tensor whose
    first dimension is not the batch, is passed unchanged to every forward, where Captum
    repeats every tensor forward arg along dim 0 (one copy per step or sample)."""
    message = (f"additional_forward_args[{index}] of shape {tuple(arg.shape)} is passed "
               f"unchanged to every forward (its first dimension is not the batch size "
               f"{batch}), while Captum repeats every tensor forward argument along dim 0, one "
               "copy per step or sample: where the model's result depends on that dimension "
               "(e.g. a softmax over a bank of prototypes), Captum's numbers differ from these")
    if message not in _UNEXPANDED_WARNED:
        _UNEXPANDED_WARNED.add(message)
        warn(message, UserWarning)


def _captums_llm_forward(forward_func) -> bool:
    """Whether ``forward_func`` is the forward of Captum's ``LLMGradientAttribution``, which
    reads its ``[T]`` target tokens by position: Captum's repetition of them changes nothing
    (no warning needed)."""
    try:
        from captum.attr._core.llm_attr import GradientForwardFunc
    except ImportError:
        return False
    return isinstance(forward_func, GradientForwardFunc)


def bind_unbatched_args(forward_func: Callable, n_inputs: int, args: tuple,
                        batch: int) -> tuple[Callable, tuple]:
    """``(forward, args)`` with the tensor arguments that have no batch dimension bound in.

    Captum hands every additional forward argument to every expanded row as it is; the engine
    selects each row of a tensor argument ``[B, ...]`` (or broadcasts ``[1, ...]``). A tensor
    whose first dimension is neither ``batch`` nor 1 (e.g. the ``[T]`` target tokens that
    Captum's ``LLMGradientAttribution`` passes with a batch of one) has no rows to select: it
    is bound into the returned forward function, which calls
    ``forward_func(*inputs, *args_with_the_bound_ones_back_in_place)``, and left out of the
    returned ``args``. Without such arguments both come back unchanged.
    """
    bound = {i: a for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.dim() > 0
             and a.shape[0] not in (batch, 1)}
    if not bound:
        return forward_func, args
    if not _captums_llm_forward(forward_func):
        for i, a in sorted(bound.items()):
            _warn_unexpanded(i, a, batch)

    def with_bound_args(*call_args):
        rest = list(call_args[n_inputs:])
        for i in sorted(bound):
            rest.insert(i, bound[i])
        return forward_func(*call_args[:n_inputs], *rest)

    # (the bound tensors' shapes are part of the cost: a context of 1024 rows ran on a
    # choice made for 16)
    with_bound_args.cost_owner = chunking.owner_for(
        forward_func, "bound", *((i, tuple(a.shape)) for i, a in sorted(bound.items()))) or \
        with_bound_args
    return with_bound_args, tuple(a for i, a in enumerate(args) if i not in bound)


def points_per_chunk(internal_batch_size, inputs: tuple[torch.Tensor, ...]):
    """Captum's ``internal_batch_size`` as the engine's ``chunk_size`` (path points per pass).

    Captum warns when it is below the number of examples ``B = inputs[0].shape[0]`` and then
    runs batches of ``B`` rows (whole steps). From 1 up we honour it exactly instead (smaller
    passes, the same numbers), a real number rounded down; below 1, where the engine has no
    such chunk, we do as Captum: its warning, then ``B``."""
    if internal_batch_size is None or isinstance(internal_batch_size, bool) or \
            not isinstance(internal_batch_size, numbers.Real):
        return internal_batch_size  # None, or what the engine's check refuses with a message
    if internal_batch_size < 1:
        num_examples = inputs[0].shape[0]
        warn("Internal batch size cannot be less than the number of input examples. "
             f"Defaulting to internal batch size of {num_examples} equal to the number "
             "of examples.", UserWarning)
        return num_examples
    return int(internal_batch_size)


# options of torch.autograd.grad that cannot change the attributions (value: the only one
# accepted, None for any): the engine keeps its own graphs and gives unused tensors zeros
_NEUTRAL_GRAD_KWARGS = {"retain_graph": None, "allow_unused": None, "materialize_grads": None,
                        "create_graph": False, "is_grads_batched": False}


def engine_takes_grad_kwargs(grad_kwargs) -> bool:
    """Whether the engine can honour Captum's ``grad_kwargs`` (keyword arguments of
    ``torch.autograd.grad``): none, or only options that cannot change the attributions
    (``retain_graph``, ``allow_unused``, ``materialize_grads``, ``create_graph=False``,
    ``is_grads_batched=False``). A non-dict counts as taken (the check names it)."""
    if not grad_kwargs or not isinstance(grad_kwargs, dict):
        return True
    return all(key in _NEUTRAL_GRAD_KWARGS and (
        _NEUTRAL_GRAD_KWARGS[key] is None or value == _NEUTRAL_GRAD_KWARGS[key])
        for key, value in grad_kwargs.items())


def check_grad_kwargs(grad_kwargs) -> None:
    """``TypeError`` for ``grad_kwargs`` that is not a dict, ``NotImplementedError`` naming an
    option the engine cannot honour (e.g. ``create_graph=True``, ``grad_outputs``; see
    :func:`engine_takes_grad_kwargs`; under ``patch()`` such calls run Captum's own code)."""
    if grad_kwargs and not isinstance(grad_kwargs, dict):
        raise TypeError(f"grad_kwargs must be a dict, got {type(grad_kwargs).__name__}")
    if engine_takes_grad_kwargs(grad_kwargs):
        return
    key, value = next((k, v) for k, v in grad_kwargs.items()
                      if not engine_takes_grad_kwargs({k: v}))
    raise NotImplementedError(
        f"grad_kwargs {key}={value!r} is not supported by the taylor-kernels engine (it "
        "takes one gradient per path point itself); accepted, as having no effect on "
        "the attributions: retain_graph, allow_unused, materialize_grads, "
        "create_graph=False, is_grads_batched=False (under taylor_kernels.captum.patch() "
        "such a call runs Captum's own code)")


def attribute_future_unsupported(self, *args, **kwargs):
    """``attribute_future`` of the classes whose Captum counterpart has one (IG,
    GradientShap, NoiseTunnel, LLMGradientAttribution): not implemented there either; the
    other classes have none, as in Captum (``hasattr`` answers the same)."""
    raise NotImplementedError(f"attribute_future is not implemented for {type(self).__name__} "
                              "(nor by Captum for this method); call attribute(), which "
                              "returns the result directly")


class LayerInterpolation:
    """Captum's ``LayerAttribution.interpolate`` on the layer classes."""

    @staticmethod
    def interpolate(layer_attribution: torch.Tensor, interpolate_dims,
                    interpolate_mode: str = "nearest") -> torch.Tensor:
        """``layer_attribution [B, C, *S]`` resized to ``interpolate_dims`` (an int or one
        size per spatial dimension) by ``torch.nn.functional.interpolate`` with
        ``interpolate_mode`` (a Grad-CAM map brought to the input's size)."""
        return torch.nn.functional.interpolate(layer_attribution, size=interpolate_dims,
                                               mode=interpolate_mode)


class CaptumAttribution(CaptumNamed):
    """What every Captum path-integral class offers besides ``attribute``: Captum's
    ``has_convergence_delta``, ``multiplies_by_inputs`` and ``compute_convergence_delta``."""

    HAS_DELTA = True
    BATCHES_AS_CAPTUM = True  # one batch of all path points when Captum's is one (batch norm
    # on batch statistics then gives Captum's numbers: train_mode_as_captum)
    DRAWS_RANDOM = False  # draws random numbers itself (NoiseTunnel then runs it per block)
    INTERPOLATES_INPUTS = False  # runs the model on b + t (x - b): integer inputs made floats
    BASELINE_CALLABLES = False  # baselines may be callables (GradientSHAP's distributions)
    forward_func: Callable
    _multiply_by_inputs = True

    def has_convergence_delta(self) -> bool:
        return self.HAS_DELTA

    @property
    def multiplies_by_inputs(self) -> bool:
        return self._multiply_by_inputs

    @property
    def gradient_func(self) -> Callable:
        """Captum's default gradient function, which the engine's gradients equal (read for
        Captum code that inspects it; AttributeError when Captum is not installed)."""
        try:
            from captum._utils.gradient import compute_gradients
        except ImportError as exc:
            raise AttributeError("gradient_func is Captum's compute_gradients, and Captum is "
                                 "not installed") from exc
        return compute_gradients

    @gradient_func.setter
    def gradient_func(self, fn: Callable) -> None:
        """Only Captum's default is accepted: a custom one was silently ignored."""
        if fn is not self.gradient_func:
            raise TypeError(f"taylor_kernels.captum.{type(self).__name__} computes its "
                            "gradients in the engine and cannot use a custom gradient_func; "
                            f"use captum.attr.{type(self).__name__} for it (under "
                            "taylor_kernels.captum.patch() an instance given its own "
                            "gradient_func runs Captum's code)")

    def engine_forward(self, inputs: tuple, additional_forward_args) -> tuple[Callable, tuple]:
        """``(forward, args)`` to hand the engine for ``inputs`` (a tuple of ``[B, ...]``
        tensors): Captum's ``additional_forward_args`` as a tuple, with the tensors that have
        no batch dimension bound into ``self.forward_func`` (:func:`bind_unbatched_args`), as
        Captum passes them unchanged to every row."""
        return bind_unbatched_args(self.forward_func, len(inputs),
                                   format_args(additional_forward_args), inputs[0].shape[0])

    @captum_errors
    def compute_convergence_delta(self, attributions, start_point, end_point, target=None,
                                  additional_forward_args=None) -> torch.Tensor:
        """``delta [B] = sum(attributions) - (F(end_point) - F(start_point))`` per example
        (Captum's definition; attributions of any shape with the batch first)."""
        return completeness_gap(self.forward_func, attributions, start_point, end_point, target,
                                additional_forward_args)

