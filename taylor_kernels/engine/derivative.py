"""The derivative engine: batched Hessian-vector products, Hessian rows, diagonals, D^3 f.

``f`` maps a batch ``x [B, ...]`` to one scalar per row ``[B]`` and rows must not interact
(eval-mode models), so ``grad_x sum_b f(x)_b`` is the per-row gradient. With ``D`` the number
of features per row (``prod(x.shape[1:])``):

- ``hvp(f, x, v)``: ``H(x_b) v_bm`` for ``M`` directions per row, ``v [B, M, ...] -> [B, M, ...]``,
  by reverse-over-reverse: a backward with ``create_graph`` and one backward of it batched over
  the directions (``is_grads_batched``: faster on the CPU than torch.func's jvp-of-grad);
- ``hessian(f, x, index)``: rows ``H_{i, :}`` for ``i`` in ``index`` (all ``D`` by default):
  the HVPs with unit vectors ``e_i`` (``H`` is symmetric, so ``H e_i`` is row ``i``);
- ``hessian_diagonal``: exact (``e_i^T H e_i`` from chunks of unit directions) or Hutchinson
  (``E[v * H v]`` over Rademacher ``v``);
- ``third_order(f, x, u, v) = D^3 f(x)[u, v, .] = grad_x (v^T H(x) u)``.

Work is split into chunks of (row, direction) pairs sized to a memory budget from a measured
cost per pair (:func:`pair_cost`). Only the cotangents are batched (``x`` is not), so Python
control flow and ``.item()`` on activations work; backward graphs that cannot be vmapped (ops
without batching rules) fall back, with a one-time warning, to one backward pass per direction
(same numbers, slower). Scaled dot-product attention runs with the math backend, the only one
with forward AD and double backward.
"""
from __future__ import annotations

import contextlib
import functools
import math
import weakref
from dataclasses import dataclass
from typing import Callable

import torch
from torch.func import grad, jvp
from torch.nn.attention import SDPBackend, sdpa_kernel

from taylor_kernels.backends import transformed
from taylor_kernels.engine import guards, memory
from taylor_kernels.engine.compiled_code import compiled_runs_eager
from taylor_kernels.engine.composite_norms import composite_group_norm, composite_norms
from taylor_kernels.engine.row_args import at_rows, mapped, with_forward_args
from taylor_kernels.numerics import (FORWARD_AD_LOCK, accumulation_dtype, all_finite,
                                     check_dense_real, seeded_generator)
from taylor_kernels.progress import progress_bar
from taylor_kernels.shared_setting import SharedSetting
from taylor_kernels.user_warnings import warn

PROBE_ROWS = 8
_warned: set[str] = set()
_COSTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # f -> {shape key: bytes}


def _math_attention_setting() -> SharedSetting:
    """The process's SDPA backend flags set to math only."""
    block: list = []

    def apply() -> None:
        block.append(sdpa_kernel(SDPBackend.MATH))
        block[-1].__enter__()

    return SharedSetting(apply, lambda: block.pop().__exit__(None, None, None))


_MATH_ATTENTION = _math_attention_setting()


@contextlib.contextmanager
def math_attention(f: Callable | None = None):
    """Context: attention runs on kernels with a second derivative and forward AD, and
    compiled code ``f`` reaches runs eagerly
    (:func:`~taylor_kernels.engine.compiled_code.compiled_runs_eager`). Scaled
    dot-product attention runs on its math backend; the backend flags are the process's, not
    the thread's: overlapping blocks of several threads share one setting
    (:class:`~taylor_kernels.shared_setting.SharedSetting`; nested ``sdpa_kernel`` blocks in two
    threads restored each other's saved flags and left the fused kernels off for good).
    ``f``, the function differentiated: each ``transformers`` model it reaches with
    ``"sdpa"`` attention is named in a warning once per model class
    (:func:`say_math_attention`), and one with another fused implementation (flash, flex)
    runs ``"eager"`` attention in the block (``set_attn_implementation``, restored on exit)."""
    fused = []
    for m, impl in _attention_models(f):
        say_math_attention(type(m).__name__, impl)
        if impl != "sdpa":
            fused.append((m, impl))
    # (dynamo traces sdpa_kernel itself, not our block)
    sdpa_math = sdpa_kernel(SDPBackend.MATH) if torch.compiler.is_compiling() \
        else _MATH_ATTENTION()
    with eager_attention(fused, sdpa_math) if fused else sdpa_math, compiled_runs_eager(f):
        yield


def _attention_models(f: Callable | None) -> list:
    """``(model, implementation)`` of the ``transformers`` models ``f`` reaches with a fused
    attention implementation (not ``"eager"``), outermost only (the model, not also its
    base model, which shares its config)."""
    return [] if f is None else _fused_attention(guards.modules_of(f))


def _fused_attention(modules: list) -> list:
    """:func:`_attention_models` among ``modules`` (those :func:`guards.modules_of` found)."""
    found = [(m, getattr(getattr(m, "config", None), "_attn_implementation", None))
             for m in modules]
    found = [(m, impl) for m, impl in found if isinstance(impl, str) and impl != "eager"]
    inner = {id(s) for m, _ in found for s in m.modules() if s is not m} if len(found) > 1 \
        else set()
    return [(m, impl) for m, impl in found if id(m) not in inner]


@contextlib.contextmanager
def eager_attention(models: list, sdpa_math=None):
    """Run ``models`` (``(model, implementation)``) on eager attention and ``sdpa_math``
    (a context, or None) inside; each model's implementation is set back on exit."""
    switched = []
    try:
        for m, impl in models:
            m.set_attn_implementation("eager")
            switched.append((m, impl))
        with sdpa_math or contextlib.nullcontext():
            yield
    finally:
        for m, impl in reversed(switched):
            m.set_attn_implementation(impl)


def cpu_flex_as_eager(f: Callable | None):
    """Context: each ``transformers`` model ``f`` reaches with ``"flex_attention"`` and its
    weights on the CPU runs ``"eager"`` attention inside (said once per model class; set back
    on exit). PyTorch's flex attention has no backward on the CPU: every gradient through it
    raised "FlexAttention does not support backward on CPU". When :func:`guards.modules_of`
    finds no module in ``f`` (a model behind a global), such a model is switched when the
    block first calls it (:func:`guards.on_module_calls`)."""
    models = [] if f is None else guards.modules_of(f)
    if f is not None and not models:
        return _flex_switched_when_called()
    flex = [(m, impl) for m, impl in _fused_attention(models) if _cpu_flex(m, impl)]
    for m, _ in flex:
        _say_flex_eager(m)
    return eager_attention(flex) if flex else contextlib.nullcontext()


def _cpu_flex(model: torch.nn.Module, impl) -> bool:
    return impl == "flex_attention" and \
        next(model.parameters(), torch.empty(0)).device.type == "cpu"


def _say_flex_eager(model: torch.nn.Module) -> None:
    warn_once(f"{type(model).__name__}: flex attention has no backward on the CPU; "
              "attribution runs it on eager attention (set back after the call)")


@contextlib.contextmanager
def _flex_switched_when_called():
    """:func:`cpu_flex_as_eager` for the models the block calls: a ``transformers`` model
    with CPU flex attention runs eager from its first call on (its attention layers read the
    implementation when called, after the model's pre-hook), and is set back on exit."""
    switched: list = []

    def switch(module: torch.nn.Module) -> None:
        impl = getattr(getattr(module, "config", None), "_attn_implementation", None)
        if callable(getattr(module, "set_attn_implementation", None)) and \
                _cpu_flex(module, impl):
            _say_flex_eager(module)
            module.set_attn_implementation("eager")
            switched.append((module, impl))

    try:
        with guards.on_module_calls(switch):
            yield
    finally:
        for m, impl in reversed(switched):
            m.set_attn_implementation(impl)


def flex_runs_eager_on_cpu(fn: Callable) -> Callable:
    """Decorator: ``fn(model, ...)`` inside :func:`cpu_flex_as_eager` of ``model``."""
    @functools.wraps(fn)
    def call(model, *args, **kwargs):
        with cpu_flex_as_eager(model):
            return fn(model, *args, **kwargs)
    return call


def say_math_attention(model_class: str, impl: str) -> None:
    """Warn once per model class and attention implementation that second and higher
    derivatives run it on the math SDPA backend (``impl == "sdpa"``) or on eager attention."""
    how = "the math SDPA backend" if impl == "sdpa" else "eager attention"
    warn_once(f"second-order attribution (or create_graph=True): {model_class} attention "
              f"{impl!r} runs on {how} "
               "(fused kernels have no second derivative); first-order methods keep the fused "
               "kernels")


@contextlib.contextmanager
def higher_order_ops(f: Callable | None = None):
    """For derivatives above second order or by nested forward mode: the math attention
    backend (the fused kernels have no forward-mode AD) and composite layer / instance norms
    (PyTorch's own formulas are wrong there: :mod:`~taylor_kernels.engine.composite_norms`).
    ``f`` as :func:`math_attention`'s."""
    with math_attention(f), composite_norms():
        yield


def warn_once(msg: str) -> None:
    """A ``RuntimeWarning`` of ``msg``, once per process."""
    if msg not in _warned:
        _warned.add(msg)
        warn(msg, RuntimeWarning)


def _row_scalars(f: Callable, x: torch.Tensor) -> torch.Tensor:
    """``f(x)`` as ``[B]``, group norms composite (:func:`composite_group_norm`: the batched
    second backward gets theirs wrong)."""
    with composite_group_norm():
        out = f(x)
    if not isinstance(out, torch.Tensor) or out.numel() != x.shape[0]:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out)
        raise ValueError(f"f must return one scalar per row ([N] for N rows); for "
                         f"{x.shape[0]} row(s) it returned {shape}: select one output, e.g. "
                         "lambda z: model(z)[:, k] (f is called on fewer rows than the batch: "
                         "a closure over the batch's own tensors, a padding mask, cannot follow "
                         "them; pass such tensors as additional_forward_args)")
    return out.reshape(x.shape[0])


def _check_batch(x) -> None:
    """``ValueError`` / ``TypeError`` unless ``x`` is a dense floating ``[B, ...]`` tensor,
    B >= 1 (:func:`~taylor_kernels.numerics.check_dense_real` first: no shape to read from a
    nested tensor)."""
    if isinstance(x, torch.Tensor):
        check_dense_real(x, "x")
    if not isinstance(x, torch.Tensor) or x.dim() < 2 or x.shape[0] < 1:
        raise ValueError(f"x must be a tensor [B, ...] with B >= 1 and feature dims, got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x)}")
    if not x.is_floating_point():
        raise TypeError(f"x must be floating point, got {x.dtype}")


def _with_args(f: Callable, x, additional_forward_args) -> Callable:
    """``f`` with its forward args matched to the rows of ``x`` (:func:`with_forward_args`),
    after ``x`` itself is checked (a bad ``x`` is named, not the arguments it mismatches)."""
    _check_batch(x)
    return with_forward_args(f, additional_forward_args, x.shape[0])


def _check_x(f, x, **directions) -> None:
    """Refuse before any forward: inference mode, a model that couples rows
    (:func:`guards.check_model`), ``x`` that is not a finite floating ``[B, ...]`` batch, and
    ``directions`` (by their argument names; None skipped) that are not dense and real
    (complex ones were cast to real) or not finite."""
    given = {name: t for name, t in directions.items() if t is not None}
    guards.check_model(f, (x,) + tuple(given.values()), higher_order="a second-order method")
    _check_batch(x)
    for name, t in given.items():
        if isinstance(t, torch.Tensor):
            check_dense_real(t, name)
    for name, t in {"x": x, **given}.items():
        if isinstance(t, torch.Tensor) and not all_finite(t):
            raise ValueError(f"{name} contains NaN or Inf values")
    guards.check_function_rows(f, x, x[0] + 1)


def _functorch_unsupported(exc: BaseException) -> bool:
    """Errors meaning torch.func cannot transform the model (not bugs in the user's model)."""
    msg = str(exc).lower()
    keys = ("vmap", "functorch", "torch.func", "batching rule", "data-dependent",
            "data dependent", ".item()", "inplace", "in-place", "saved tensor hooks")
    return isinstance(exc, (RuntimeError, NotImplementedError)) and any(k in msg for k in keys)


def _batched(f: Callable, x: torch.Tensor, V: torch.Tensor):
    """Gradient ``[B, ...]`` and ``H V`` ``[B, M, ...]`` by reverse-over-reverse: one backward
    with ``create_graph``, then one backward of it batched over the ``M`` directions
    (``is_grads_batched``, vmapped inside autograd). Measured 2.3-3.3x faster on the CPU than
    ``torch.func`` jvp-of-grad vmapped over directions for tanh MLPs (D = 16, 64)."""
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        g = _first_gradient(f, xg)
        if not g.requires_grad:  # f is linear in x: zero Hessian
            return g.detach(), torch.zeros_like(V)
        if V.shape[1] == 1:
            (h,) = torch.autograd.grad(g, xg, grad_outputs=V[:, 0], allow_unused=True)
            return g.detach(), (torch.zeros_like(xg) if h is None else h).unsqueeze(1)
        # directions leading and contiguous: the batched cotangents are dense
        try:
            (h,) = torch.autograd.grad(g, xg, grad_outputs=V.transpose(0, 1).contiguous(),
                                       is_grads_batched=True, allow_unused=True)
        except Exception as exc:  # noqa: BLE001 - vmap's limitations and bugs, see below
            if _batching_failed(exc):
                raise BatchingFailed(exc) from exc
            raise
    return g.detach(), (torch.zeros_like(V) if h is None else h.transpose(0, 1))


def _first_gradient(f: Callable, xg: torch.Tensor) -> torch.Tensor:
    """``grad_x sum_b f(x)_b`` with ``create_graph`` at ``xg`` (requiring grad); the
    ``ValueError`` of the path engine when the output does not reach ``x`` (detached, under
    ``no_grad``, unused): its derivatives would read 0 while its values change."""
    out = _row_scalars(f, xg).sum()
    g = torch.autograd.grad(out, xg, create_graph=True, allow_unused=True)[0] \
        if out.requires_grad else None
    if g is None:
        raise ValueError(guards.NO_GRADIENT_PATH)
    return g


class BatchingFailed(Exception):
    """The backward batched over directions failed where one backward per direction may not:
    vmap cannot transform it, or transforms it wrongly (group norm's double backward raised a
    shape mismatch, torch 2.13)."""


def _batching_failed(exc: BaseException) -> bool:
    """Whether ``exc`` from the batched second backward (the forward and first backward ran
    before it) is vmap's: any ``RuntimeError`` / ``NotImplementedError`` but running out of
    memory or a device error (a broken CUDA context is not retried)."""
    device_error = getattr(torch, "AcceleratorError", ())
    return isinstance(exc, (RuntimeError, NotImplementedError)) and not isinstance(
        exc, device_error) and not memory.is_oom(exc)


def _double_backward(f: Callable, x: torch.Tensor, V: torch.Tensor):
    """Same as :func:`_batched` without vmap: one forward and backward with ``create_graph``,
    then one more backward per direction (rows keep their positions: per-row targets hold)."""
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        g = _first_gradient(f, xg)
        if not g.requires_grad:  # f is linear in x: zero Hessian
            return g.detach(), torch.zeros_like(V)
        hv = []
        for m in range(V.shape[1]):
            (h,) = torch.autograd.grad(g, xg, grad_outputs=V[:, m], allow_unused=True,
                                       retain_graph=m + 1 < V.shape[1])
            hv.append(torch.zeros_like(xg) if h is None else h)
    return g.detach(), torch.stack(hv, dim=1)


def grad_and_hvp(f: Callable, x: torch.Tensor, V: torch.Tensor):
    """Unchunked core: ``(grad f(x) [B, ...], H(x) V [B, M, ...])``.

    Reverse-over-reverse batched over directions; falls back to one backward per direction
    (warning once) when the batched backward fails (cannot be vmapped, or vmap gets it wrong:
    group norm).
    """
    x = x.detach()
    V = V.to(dtype=x.dtype, device=x.device)
    with math_attention(f), _low_precision_norms(x.dtype):
        try:
            g, hv = _batched(f, x, V)
        except BatchingFailed as failed:
            exc = failed.__cause__
            why = " under torch.autograd.set_detect_anomaly(True), which vmap cannot " \
                "batch" if torch.is_anomaly_enabled() else " for this model"
            warn_once(f"the batched backward failed{why} "
                       f"({type(exc).__name__}: {str(exc).splitlines()[0][:160]}); using "
                       "autograd double backward, one pass per direction")
            g, hv = _double_backward(f, x, V)
    # checked where it costs no host sync (the chunk loops stay sync-free on CUDA), by one
    # float64 sum each (NaN and Inf survive a sum; float64 cannot overflow on finite float32
    # values): a per-element check added 15-136% to small models' calls
    if x.device.type == "cpu" and not bool(torch.isfinite(
            g.sum(dtype=torch.float64) + hv.sum(dtype=torch.float64))):
        raise FloatingPointError(
            f"non-finite gradients or Hessian-vector products of the model at finite points "
            f"({x.dtype}); the model's own second derivatives overflow there"
            + (": run it in float32 or bfloat16" if x.dtype == torch.float16 else ""))
    return g.detach(), hv.detach()


def _low_precision_norms(dtype: torch.dtype):
    """Composite layer / instance norms for float16 and bfloat16 second derivatives: PyTorch's
    fp16 ``layer_norm`` double backward overflows for inputs of small norm (a GPT-2's
    embeddings near a zero baseline: every token interaction NaN); the composite normalises in
    float32 as the fused forward does."""
    return composite_norms() if dtype in (torch.float16, torch.bfloat16) else \
        contextlib.nullcontext()


def _probe_bytes(f: Callable, xs: torch.Tensor, budget: int | None = None) -> float:
    """Bytes one double backward on rows ``xs`` needs (CUDA: allocator peak; CPU: the
    first-order estimate :func:`memory.cpu_point_cost` of the bytes autograd saves, which
    here include the first backward's graph). ``budget``: an explicit limit for one row; on
    the CPU the probe stops with ``MemoryError`` once it saved more than a row within it
    could (:func:`memory.saved_limit`)."""
    v = torch.ones_like(xs).unsqueeze(1)
    if xs.device.type == "cuda":
        with math_attention(f):
            return guards.cuda_peak_bytes(lambda: _double_backward(f, xs, v), xs.device)[1]
    limit = None if budget is None else memory.saved_limit(budget, xs.shape[0])
    try:
        with memory.SavedBytes(limit) as saved, math_attention(f):
            _double_backward(f, xs, v)
    except memory.SavedPastLimit as past:
        raise MemoryError(f"{budget} bytes are too small for one Hessian-vector product (its "
                          f"probe saved {past.saved} bytes before it was stopped); raise "
                          "max_memory") from None
    return memory.cpu_point_cost(saved.total, xs.numel() * xs.element_size())


@dataclass(frozen=True)
class PairCost:
    """Measured bytes of an HVP chunk: ``per_pair`` for each (row, direction) pair and
    ``fixed`` whatever the chunk's size (saved weights and the like)."""

    per_pair: float
    fixed: float


def pair_cost(f: Callable, x: torch.Tensor, owner=None, budget: int | None = None,
              held: int = 0, model=None) -> PairCost:
    """Measured cost of HVP pairs: :func:`_probe_bytes` on 1 row and on up to ``PROBE_ROWS``
    rows gives the slope ``per_pair`` and the rest of the one-row cost, ``fixed`` (a single-row
    batch: all of it per pair). An explicit ``budget`` bounds the probe: ``MemoryError`` if one
    row does not fit, and no more rows than fit. Measured once per ``owner`` (default ``f``;
    e.g. the model when ``f`` is a fresh closure around it), feature shape/dtype/device and the
    form of ``f``'s forward args (a :class:`RowFunction`'s ``cost_key``) and the sizes of the
    modules ``model`` (default ``f``) reaches, cached while the owner lives."""
    x = x.detach()
    n = min(PROBE_ROWS, x.shape[0])
    key = (tuple(x.shape[1:]), x.dtype, str(x.device), n, getattr(f, "cost_key", ()),
           guards.module_sizes(f if model is None else model))
    try:
        cached = _COSTS.setdefault(getattr(f, "cost_owner", f) if owner is None else owner,
                                   {})
    except TypeError:  # not weak-referenceable: measure every time
        cached = {}
    explicit = budget is not None and not isinstance(budget, memory.DefaultBudget)

    def check_fits(one: float) -> None:
        if explicit and one > budget:
            beside = (f" of max_memory={budget + held}, beside the {held} bytes the call "
                      "holds (its result and directions)") if held else ""
            raise MemoryError(f"{budget} bytes{beside} are too small for one Hessian-vector "
                              f"product (measured {int(one)} bytes); raise max_memory")

    if key not in cached:
        one = _probe_bytes(at_rows(f, slice(0, 1), x.device), x[:1],
                           budget if explicit else None)
        check_fits(one)  # before the larger probe
        rows = n
        if explicit and n > 1:  # chunks take a share of a CPU budget: so does the probe
            rows = max(2, min(n, int(memory.chunk_room(budget, x.device) // max(one, 1.0))))
        many = _probe_bytes(at_rows(f, slice(0, rows), x.device), x[:rows]) if rows > 1 \
            else one
        per = (many - one) / (rows - 1) if many > one else many / rows
        cached[key] = PairCost(per, max(0.0, one - per))
    cost = cached[key]
    check_fits(cost.per_pair + cost.fixed)  # a cached cost against this call's budget
    return cost


def plan(B: int, M: int, cost: PairCost, budget: int) -> tuple[int, int]:
    """``(rows, directions)`` per chunk with ``fixed + rows * directions * per_pair <=
    budget``: every row and as many directions as fit; rows are split only when one direction
    over all rows does not fit (so a function with per-row state is rarely called on a subset
    of rows)."""
    if not isinstance(budget, memory.DefaultBudget):
        budget = budget - int(cost.fixed)
    per_pair = cost.per_pair
    if per_pair * B <= budget:
        return B, max(1, min(M, int(budget // (per_pair * B))))
    return memory.chunk_size_for(budget, per_pair, B), 1


def _as_directions(x: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, bool]:
    if not isinstance(v, torch.Tensor):
        raise TypeError(f"v must be a tensor, got {type(v)}")
    feat = tuple(x.shape[1:])
    if tuple(v.shape) == tuple(x.shape):
        return v.unsqueeze(1), True
    if v.dim() == x.dim() + 1 and v.shape[0] == x.shape[0] and tuple(v.shape[2:]) == feat:
        if v.shape[1] == 0:
            raise ValueError(f"v of shape {tuple(v.shape)} holds zero directions per row; pass "
                             f"at least one: [{x.shape[0]}, M >= 1, *{feat}]")
        return v, False
    raise ValueError(f"v of shape {tuple(v.shape)} must be shaped like x {tuple(x.shape)} or "
                     f"[{x.shape[0]}, M, *{feat}]")


def _chunked(f, x, V, max_memory, chunk_size, reduce=None, cost_of=None, held: int = 0,
             reduced: tuple[int, ...] | None = None, progress: bool = False):
    """Stream ``(rows, directions)`` chunks through :func:`grad_and_hvp`; ``reduce(hv, r0, m0)``
    maps each chunk's products to ``[rows, dirs, *reduced]`` (written into one
    ``[B, M, *reduced]`` result), or folds them into the caller's own sums and returns None
    (``reduced`` None: the call then returns None); default: keep the products, written into
    one ``[B, M, ...]`` result. An explicit budget holds the result beside the chunks, with
    ``held`` bytes more the caller allocated for the call, e.g. its directions; ``cost_of``
    ``(f, x)`` to measure the pair cost with (the caller's own function, so the cache hits);
    ``progress``: a tqdm bar over the ``B M`` products."""
    B, M = V.shape[:2]
    chunk_size = memory.check_chunk_size(chunk_size)
    budget = memory.chunk_budget(chunk_size, max_memory, x.device)
    shape = (B, M) + (tuple(x.shape[1:]) if reduce is None else reduced or ())
    if reduce is None or reduced is not None:
        held += math.prod(shape) * x.element_size()
    if budget is not None and not isinstance(budget, memory.DefaultBudget):
        if held >= budget:
            raise MemoryError(f"max_memory of {budget} bytes cannot hold the call's result and "
                              f"directions ({held} bytes); raise max_memory")
        budget -= held
    if chunk_size is not None:
        rows, dirs = (B, max(1, chunk_size // B)) if chunk_size >= B else (chunk_size, 1)
    else:
        explicit = not isinstance(budget, memory.DefaultBudget)
        cost = pair_cost(*(cost_of or (f, x)), budget=budget, held=held if explicit else 0)
        # freed chunks stay with glibc: chunks take a share of a CPU budget, as the path
        # engine's (at least one pair); a CNN's Hutchinson diagonal peaked at 2x of 8-16 MB
        budget = memory.chunk_room(budget, x.device,
                                   math.ceil(cost.per_pair) + math.ceil(cost.fixed))
        rows, dirs = plan(B, M, cost, budget)
    # one result written chunk by chunk (hessian_block's parts list and two cats held it
    # three times, uncounted: 7x an 8 MB budget)
    out = torch.empty(shape, dtype=x.dtype, device=x.device) \
        if reduce is None or reduced is not None else None
    with progress_bar(progress, total=B * M, desc="Hessian-vector products", unit="HVP") as bar:
        for r0 in range(0, B, rows):
            for m0 in range(0, M, dirs):
                _, hv = grad_and_hvp(at_rows(f, slice(r0, r0 + rows), x.device),
                                     x[r0:r0 + rows], V[r0:r0 + rows, m0:m0 + dirs])
                part = hv if reduce is None else reduce(hv, r0, m0)
                if out is not None:
                    out[r0:r0 + rows, m0:m0 + dirs] = part
                bar.update(hv.shape[0] * hv.shape[1])
    return out


@guards.public_call
def hvp(f: Callable, x: torch.Tensor, v: torch.Tensor, *, max_memory=None,
        chunk_size: int | None = None, additional_forward_args=None,
        progress: bool = False) -> torch.Tensor:
    """Hessian-vector products ``out[b, m] = H(x_b) v[b, m]`` with ``H = d^2 f_b / dx_b^2``.

    Args:
        f: callable ``[N, ...] -> [N]`` (one scalar per row; rows independent). It is called
            on all rows, or on row subsets ``x[r0:r1]`` when one direction over the whole
            batch exceeds the budget (see :func:`plan`).
        x: ``[B, ...]`` finite floating inputs (NaN/Inf raise ``ValueError``).
        v: ``[B, M, ...]`` finite directions (``M >= 1`` per row), or shaped like ``x`` for
            one each.
        max_memory: bytes or e.g. ``"256MB"`` per chunk (default as the path engine);
        chunk_size: fixed (row, direction) pairs per chunk instead.
        additional_forward_args: more arguments, ``f(x, *args)``; a tensor ``[B, ...]`` goes
            with its rows (a padding mask), ``[1, ...]`` to every row, anything else as is.
        progress: a tqdm bar over the ``B M`` products (also for :func:`hessian_block`,
            :func:`hessian`, :func:`hessian_diagonal`).
    Returns:
        ``[B, M, ...]`` (or shaped like ``x`` when ``v`` was), dtype of ``x``.
    Raises ``ValueError`` for non-finite ``x``/``v``, zero directions, or a model that couples
    rows or is random; ``RuntimeError`` inside ``torch.inference_mode()`` (also for
    :func:`hessian`, :func:`hessian_diagonal`, :func:`third_order`).
    """
    f = _with_args(f, x, additional_forward_args)
    _check_x(f, x, v=v)
    V, single = _as_directions(x, v)
    out = _chunked(f, x, V, max_memory, chunk_size, progress=progress)
    return out[:, 0] if single else out


@guards.public_call
def hessian_block(f: Callable, x: torch.Tensor, U: torch.Tensor, W: torch.Tensor | None = None,
                  *, scale: torch.Tensor | None = None, max_memory=None,
                  chunk_size: int | None = None, additional_forward_args=None,
                  progress: bool = False) -> torch.Tensor:
    """The Hessian contracted on both sides: ``out[b, m, n] = (s_b * W[b, n]) . H(x_b) U[b, m]``.

    Args: ``f [B, ...] -> [B]``; ``x [B, ...]``; ``U [B, M, ...]`` and ``W [B, N, ...]``
    (``W`` None: ``U``; either may be an expanded view); ``scale`` ``s [B, ...]`` (None: 1)
    weights ``W`` elementwise without a copy. Each chunk's products ``H U`` are contracted as
    they come, so the ``[B, M, D]`` products are never held (group interactions and Taylor-CAM
    held them, and a scaled copy of their directions, beside the budget: Taylor-CAM at
    1.8-2.7x of 10-16 MB); an explicit ``max_memory`` holds the directions' storage;
    ``additional_forward_args``, ``progress`` as :func:`hvp`.
    Returns ``[B, M, N]`` in ``x.dtype``.
    """
    f = _with_args(f, x, additional_forward_args)
    _check_x(f, x, U=U, W=W)
    V, _ = _as_directions(x, U)
    Wd = V if W is None else _as_directions(x, W)[0]
    B = x.shape[0]
    Wf = Wd.reshape(B, Wd.shape[1], -1).to(x.dtype)  # (as hvp casts its directions)
    s = torch.ones_like(x).reshape(B, -1) if scale is None else scale.reshape(B, -1).to(x)

    def take(hv, r0, m0):
        rows = slice(r0, r0 + hv.shape[0])
        return torch.einsum("bmd,bd,bnd->bmn", hv.reshape(hv.shape[0], hv.shape[1], -1),
                            s[rows], Wf[rows])

    held = sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in (V, Wd)}.values())
    return _chunked(f, x, V, max_memory, chunk_size, reduce=take, held=held,
                    reduced=(Wf.shape[1],), progress=progress)


def index_rows(index, D: int, device) -> torch.Tensor:
    """Flattened feature numbers ``[R]`` (long) from ``index`` (None: all ``D``): integers in
    ``[0, D)``, not empty (``TypeError`` / ``ValueError`` otherwise)."""
    if index is None:
        return torch.arange(D, device=device)
    idx = torch.as_tensor(index, device=device).reshape(-1)
    if idx.numel() == 0:
        raise ValueError("index is empty: give at least one feature number")
    if idx.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise TypeError(f"index must hold integers, got {idx.dtype}")
    if (idx < 0).any() or (idx >= D).any():
        raise ValueError(f"index must be non-empty feature numbers in [0, {D}), got "
                         f"{idx.tolist()[:8]}")
    return idx.long()


def unit_directions(index: torch.Tensor, B: int, D: int, dtype, device) -> torch.Tensor:
    """One-hot directions ``[B, R, D]`` with ``e_{index[r]}`` in row ``r`` (expanded view)."""
    eye = torch.zeros(index.shape[0], D, dtype=dtype, device=device)
    eye[torch.arange(index.shape[0], device=device), index] = 1
    return eye.unsqueeze(0).expand(B, -1, -1)


class ChunkDirections:
    """Directions ``[B, M, D]`` built a chunk at a time (``V[rows, dirs]`` with two slices), as
    :func:`_chunked` reads them, so the call never holds all ``M``: ``build(rows, dirs)``
    returns the chunk; the last chunk is kept for the reduction that reads it again."""

    def __init__(self, shape: tuple[int, int, int], build: Callable):
        self.shape, self._build, self._last = shape, build, (None, None)

    def __getitem__(self, key) -> torch.Tensor:
        rows, dirs = key
        marker = (rows.indices(self.shape[0]), dirs.indices(self.shape[1]))  # (normalised:
        # a chunk read with a stop past the end is the same chunk)
        if self._last[0] != marker:
            self._last = (marker, self._build(rows, dirs))
        return self._last[1]


def _unit_chunks(B: int, D: int, dtype, device) -> ChunkDirections:
    """``e_m`` for direction ``m`` of every row, per chunk (``D x D`` one-hot directions took
    2.4 MB of a 4 MB budget for a 784-wide MLP's diagonal; 38 MB for a 3x32x32 input)."""
    def build(rows: slice, dirs: slice) -> torch.Tensor:
        return unit_directions(torch.arange(D, device=device)[dirs], len(range(B)[rows]), D,
                               dtype, device)
    return ChunkDirections((B, D, D), build)


def _logical_shift(z: torch.Tensor, bits: int) -> torch.Tensor:
    """``z >>> bits`` for int64 ``z`` (torch shifts signed integers arithmetically)."""
    return torch.bitwise_right_shift(z, bits) & ((1 << (64 - bits)) - 1)


def _mix64(z: torch.Tensor) -> torch.Tensor:
    """SplitMix64's finalizer on int64 keys (products wrap modulo 2^64)."""
    z = (z ^ _logical_shift(z, 30)) * -4658895280553007687   # 0xbf58476d1ce4e5b9
    z = (z ^ _logical_shift(z, 27)) * -7723592293110705685   # 0x94d049bb133111eb
    return z ^ _logical_shift(z, 31)


def _rademacher_chunks(B: int, M: int, D: int, dtype, device,
                       gen: torch.Generator) -> ChunkDirections:
    """``M`` Rademacher vectors ``[B, D]`` per chunk: entry ``(b, m, d)`` is a bit of a hash
    of its index and a key drawn from ``gen``, so a seed gives the same vectors however the
    call is chunked and a chunk builds only its own entries (all ``[B, M, D]`` at once took
    6.3 MB of an 8 MB budget; a generator per sample redrew all ``B`` rows for every chunk of
    rows: 4.6x the time of a small model's call)."""
    key = int(torch.randint(0, 2**62, (1,), generator=gen))

    def build(rows: slice, dirs: slice) -> torch.Tensor:
        b = torch.arange(B, device=device)[rows].view(-1, 1, 1)
        m = torch.arange(M, device=device)[dirs].view(1, -1, 1)
        d = torch.arange(D, device=device).view(1, 1, -1)
        bit = _logical_shift(_mix64((b * M + m) * D + d + key), 40) & 1
        return (1 - 2 * bit).to(dtype)
    return ChunkDirections((B, M, D), build)


def _flat_f(f: Callable, x: torch.Tensor) -> Callable:
    feat = tuple(x.shape[1:])
    return mapped(f, lambda z: z.reshape(z.shape[0], *feat))


@guards.public_call
def hessian(f: Callable, x: torch.Tensor, index=None, *, max_memory=None,
            chunk_size: int | None = None, additional_forward_args=None,
            progress: bool = False) -> torch.Tensor:
    """Hessian rows ``H[b, r, :] = d^2 f_b / dx_{index[r]} dx`` over flattened features.

    Args: f ``[B, ...] -> [B]``; x ``[B, ...]`` with ``D = prod(x.shape[1:])``; index: feature
    numbers (flattened, ``R`` of them; a block ``H[I, J]`` is ``out[:, :, J]``), None for all;
    max_memory: a hard limit for the HVP chunks (default: a fraction of the free memory);
    chunk_size: fixed (row, direction) pairs per chunk instead; additional_forward_args,
    progress: as :func:`hvp`.
    Returns: ``[B, D, D]`` or ``[B, R, D]`` in ``x.dtype``.
    """
    f = _with_args(f, x, additional_forward_args)
    _check_x(f, x)
    B, D = x.shape[0], x[0].numel()
    idx = index_rows(index, D, x.device)
    V = unit_directions(idx, B, D, x.dtype, x.device)
    return _chunked(_flat_f(f, x), x.reshape(B, D), V, max_memory, chunk_size, cost_of=(f, x),
                    held=idx.shape[0] * D * x.element_size(),  # the one-hot directions
                    progress=progress)


@guards.public_call
def hessian_diagonal(f: Callable, x: torch.Tensor, method: str = "exact", *,
                     samples: int = 64, seed: int | None = None, max_memory=None,
                     chunk_size: int | None = None, additional_forward_args=None,
                     progress: bool = False) -> torch.Tensor:
    """Diagonal ``d^2 f_b / dx_i^2`` over flattened features: ``[B, D]``.

    ``method="exact"``: ``e_i^T H e_i`` from ``D`` unit-direction HVPs (only the diagonal of
    each chunk is kept). ``method="hutchinson"``: ``mean_m v_m * (H v_m)`` over ``samples``
    Rademacher vectors ``v_m`` (unbiased; variance ``sum_{j != i} H_ij^2 / samples``), drawn
    from a private generator seeded with ``seed``. ``f [B, ...] -> [B]``, ``x [B, ...]``;
    ``max_memory`` / ``chunk_size`` / ``additional_forward_args`` / ``progress`` as
    :func:`hessian`.
    """
    f = _with_args(f, x, additional_forward_args)
    _check_x(f, x)
    B, D = x.shape[0], x[0].numel()
    ff, xf = _flat_f(f, x), x.reshape(B, D)
    if method == "exact":
        V = _unit_chunks(B, D, x.dtype, x.device)
        # each chunk's diagonal is copied into the result (a view kept the chunk's whole
        # [rows, dirs, D] products alive to the end: a 4 MB budget peaked at 13 MB)
        take = lambda hv, r0, m0: torch.diagonal(  # noqa: E731
            hv[:, :, m0:m0 + hv.shape[1]], dim1=1, dim2=2).unsqueeze(-1)
        return _chunked(ff, xf, V, max_memory, chunk_size, reduce=take, cost_of=(f, x),
                        reduced=(1,), progress=progress).squeeze(-1)
    if method != "hutchinson":
        raise ValueError(f"method must be 'exact' or 'hutchinson', got {method!r}")
    if isinstance(samples, bool) or int(samples) != samples or samples < 1:
        raise ValueError(f"samples must be a positive integer, got {samples!r}")
    V = _rademacher_chunks(B, int(samples), D, xf.dtype, xf.device, seeded_generator(seed))
    total = torch.zeros(B, D, dtype=accumulation_dtype(xf.dtype), device=xf.device)

    def fold(hv: torch.Tensor, r0: int, m0: int) -> None:
        """Adds the chunk's sum of ``v * Hv`` into ``total`` (the chunks' sums kept to the end
        were ``[B, chunks, D]``: 6.3 MB of an 8 MB budget for 64 samples of a CNN input)."""
        total[r0:r0 + hv.shape[0]] += (V[r0:r0 + hv.shape[0], m0:m0 + hv.shape[1]]
                                       * hv).sum(dim=1)
    _chunked(ff, xf, V, max_memory, chunk_size, reduce=fold, cost_of=(f, x),
             held=total.nbytes, progress=progress)
    return (total / int(samples)).to(xf.dtype)


@guards.public_call
def third_order(f: Callable, x: torch.Tensor, u: torch.Tensor, v: torch.Tensor, *,
                additional_forward_args=None) -> torch.Tensor:
    """Third-order contraction ``D^3 f(x_b)[u_b, v_b, .] = grad_x (v_b^T H(x_b) u_b)``: ``[B, D]``.

    Args: f ``[B, ...] -> [B]``; x, u, v ``[B, ...]`` (one pair of directions per row);
    ``additional_forward_args`` as :func:`hvp`.
    """
    if transformed(x, u, v):
        raise RuntimeError("third_order cannot run inside a torch.func transform or on dual "
                           "tensors (it detaches x, u and v for its own nested transforms: "
                           "their tangents and gradients came out zero); jet and "
                           "mixed_partials compose with torch.func")
    f = _with_args(f, x, additional_forward_args)
    _check_x(f, x, v=v, u=u)
    for name, t in (("u", u), ("v", v)):
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(x.shape):
            raise ValueError(f"{name} must be shaped like x {tuple(x.shape)}")
    # (contiguous: an expanded x, stride 0, made functorch's grad write one cell twice)
    x, u, v = (t.detach().contiguous() for t in (x, u.to(x), v.to(x)))
    g_fn = grad(lambda z: _row_scalars(f, z).sum())
    vhu = lambda z: (jvp(g_fn, (z,), (u,))[1] * v).sum()  # noqa: E731
    with higher_order_ops(f), FORWARD_AD_LOCK:  # (forward-AD levels are per process)
        try:
            out = grad(vhu)(x)
        except Exception as exc:  # noqa: BLE001 - only functorch limitations are caught
            if not _functorch_unsupported(exc):
                raise
            warn_once(f"torch.func cannot transform this model ({type(exc).__name__}); "
                       "using autograd triple backward")
            with torch.enable_grad():
                z = x.clone().requires_grad_(True)
                (g,) = torch.autograd.grad(_row_scalars(f, z).sum(), z, create_graph=True)
                (hu,) = torch.autograd.grad(g, z, grad_outputs=u, create_graph=True)
                (out,) = torch.autograd.grad((hu * v).sum(), z)
    return out.detach().reshape(x.shape[0], -1)


__all__ = ["grad_and_hvp", "hessian", "hessian_block", "hessian_diagonal", "higher_order_ops",
           "hvp", "index_rows", "math_attention", "pair_cost", "plan", "third_order",
           "unit_directions"]
