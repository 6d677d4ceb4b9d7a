"""Layer Integrated Gradients: IG in the space of a module's output (or input).

``LIG_j = (a_j(x) - a_j(b)) int_0^1 d f / d a_j (a(b) + t (a(x) - a(b))) dt`` where ``a`` is the
layer's activation. Activations and outputs at the inputs and baselines are captured by two
small forwards that also run check R (:mod:`~taylor_kernels.attr.layer_ends`); path points
are built in activation space by the path ops and fed to the model through a forward hook
that replaces the layer's output (or input), so chunking, memory budget and every quadrature
rule (adaptive included) come from the IG engine. The network before the layer still runs
for every path point (as in Captum): its output is overwritten by the hook.

A layer called ``n > 1`` times in one forward (shared weights, ``layer(layer(x))``) has one
activation per call, ``a = (a^1, ..., a^n)``: call ``k``'s output is replaced by its own path
``a^k(b) + t (a^k(x) - a^k(b))``, so the replaced forward equals ``f`` at both ends and
``sum_k sum_j LIG^k_j = f(x) - f(b)`` (up to quadrature); the attributions are then a tuple
with one tensor per call, in call order (their sum is Captum's attribution when every call
sees the same activation, or when the last call's output is the only one that reaches ``f``).
"""
from __future__ import annotations

from typing import Callable

import torch

from taylor_kernels.attr.arguments import refuse_create_graph
from taylor_kernels.attr.integrated_gradients import AttributionResult, check_rule_args
from taylor_kernels.attr.layer_budget import check_held, layer_ig_bytes
from taylor_kernels.attr.layer_capture import layer_reaches_output, refuse_recomputed_layer
from taylor_kernels.attr.layer_ends import integrate_from_ends, layer_ends
from taylor_kernels.engine.chunking import call_threads
from taylor_kernels.engine import guards
from taylor_kernels.engine.derivative import flex_runs_eager_on_cpu
from taylor_kernels.engine.problem import as_tuple
from taylor_kernels.engine.thread_hooks import WORKER_THREADS, hookable, this_thread
from taylor_kernels.user_warnings import warn
from taylor_kernels.numerics import check_dense_real


def named_layer(model, layer) -> torch.nn.Module:
    """``layer`` as a module: itself, or a dotted submodule name of ``model`` (``"0"``,
    ``"encoder.layer.3"``; a name gave ``'str' object has no attribute
    'register_forward_hook'``). ``ValueError`` for a name ``model`` lacks, ``TypeError``
    for anything else or a name with a model that is not a module."""
    if isinstance(layer, torch.nn.Module):
        return layer
    if not isinstance(layer, str):
        raise TypeError(f"layer must be a module the model calls, or its submodule name, got "
                        f"{type(layer).__name__}")
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"layer {layer!r} is a submodule name, which needs the model to be an "
                        f"nn.Module (got {type(model).__name__}): pass the layer module itself")
    try:
        return model.get_submodule(layer)
    except AttributeError as exc:
        raise ValueError(f"model has no submodule {layer!r}") from exc


def layer_activations(model, layer, inputs: tuple, args: tuple, of_input: bool):
    """Run the model once (no grad, buffers kept) and return ``(activations, output)``: the
    layer's output (or first input) at each of its calls, in call order, and the model's
    output."""
    seen: list = []

    def grab(module, inp, out=None):
        a = inp[0] if of_input else out
        # a copy: an in-place op later in the forward (ReLU(inplace=True)), or the layer
        # itself on its input, would otherwise change the endpoint read here
        seen.append(a.detach().clone() if isinstance(a, torch.Tensor) else a)

    guards.check_model(model, inputs)
    hook = (layer.register_forward_pre_hook(this_thread(grab)) if of_input
            else layer.register_forward_hook(this_thread(grab)))
    try:
        with torch.no_grad(), guards.preserved_buffers(model):
            out = hookable(model)(*inputs, *args)
    finally:
        hook.remove()
    if not seen:
        raise ValueError(f"layer {type(layer).__name__} was not called by the model's forward "
                         + WORKER_THREADS)
    for a in seen:
        if not isinstance(a, torch.Tensor):
            raise ValueError(f"layer {type(layer).__name__} {'input' if of_input else 'output'} "
                             f"is a {type(a).__name__}; layer attribution needs a single tensor")
    return seen, out


def _activation(model, layer, inputs: tuple, args: tuple, of_input: bool) -> torch.Tensor:
    """The layer's output (or first input) for a layer called exactly once."""
    acts, _ = layer_activations(model, layer, inputs, args, of_input)
    if len(acts) > 1:
        raise ValueError(f"layer {type(layer).__name__} is called {len(acts)} times in one "
                         "forward; this method needs a layer called once")
    return acts[0]


def _baseline_inputs(baselines, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """Input-space baselines expanded to the batch (None = zeros, numbers, tensors)."""
    bls = baselines if isinstance(baselines, tuple) else (baselines,) * len(inputs)
    if len(bls) != len(inputs):
        raise ValueError(f"{len(bls)} baselines for {len(inputs)} inputs")
    out = []
    for i, (b, x) in enumerate(zip(bls, inputs)):
        if not x.is_floating_point() and (isinstance(b, float) or isinstance(
                b, torch.Tensor) and b.is_floating_point()):
            raise TypeError(f"input {i} holds integer ids ({x.dtype}) but its baseline is "
                            "floating: give baseline ids (an int or an integer tensor)")
        if b is None or isinstance(b, (int, float)):
            out.append(torch.full_like(x, 0 if b is None else b))
            continue
        check_dense_real(b, f"baseline {i}")  # (before the cast: it dropped an imaginary part)
        try:
            out.append(b.to(device=x.device, dtype=x.dtype).expand_as(x))
        except RuntimeError as exc:
            raise ValueError(f"baseline {i} of shape {tuple(b.shape)} does not broadcast to "
                             f"input {i} of shape {tuple(x.shape)}") from exc
    return tuple(out)


def layer_replaced_forward(model: Callable, layer: torch.nn.Module, of_input: bool,
                           calls: int = 1, later_calls: bool = False) -> Callable:
    """``g(p_1, ..., p_calls, *inputs, *args) = model(*inputs, *args)`` with the output (or
    first input, when ``of_input``) of ``layer``'s ``k``-th call replaced by a copy of ``p_k``;
    inputs and args are passed through. More calls than ``calls`` raise ``RuntimeError`` unless
    ``later_calls`` (they then run unchanged)."""
    def through_layer(*points_and_rest):
        points, rest = points_and_rest[:calls], points_and_rest[calls:]
        count = [0]

        def next_points():
            refuse_recomputed_layer(layer)
            k = count[0]
            count[0] += 1
            if k >= calls:
                if later_calls:
                    return None
                raise RuntimeError(f"layer {type(layer).__name__} was called more than the "
                                   f"{calls} time(s) it was called at the inputs")
            # a copy: the engine's points are leaves, and a model may scale what the layer
            # gives it in place (CTRL: inputs_embeds *= sqrt(d)); autograd refuses that on a leaf
            return points[k].clone()

        def replace_out(module, inp, out):
            return next_points()

        def replace_in(module, inp):
            p = next_points()
            return None if p is None else (p,) + tuple(inp[1:])

        hook = (layer.register_forward_pre_hook(this_thread(replace_in)) if of_input
                else layer.register_forward_hook(this_thread(replace_out)))
        try:
            return hookable(model)(*rest)
        finally:
            hook.remove()

    through_layer.cost_owner = layer  # the engine caches its chunk choice per layer, not per closure
    return through_layer


def without_exact_rule(ig_kwargs: dict) -> dict:
    """``ig_kwargs`` with ``rule='exact'`` replaced by ``'adaptive'``, with a warning: layer
    IG replaces the layer's output by a hook, which the traced graph cannot follow (its
    "exact" numbers were wrong wherever the check of the ends passed, f(x) = f(b); the
    multi-layer path fell back blaming torch.fx)."""
    if ig_kwargs.get("rule") != "exact":
        return ig_kwargs
    warn("rule='exact': layer IG replaces the layer's output by a hook, which the traced "
         "graph cannot follow; falling back to rule='adaptive'", RuntimeWarning)
    return {**ig_kwargs, "rule": "adaptive"}


@guards.public_call
@flex_runs_eager_on_cpu  # (no backward through it on the CPU)
@call_threads()  # fewer threads while the machine is oversubscribed (engine/chunking.py)
def layer_integrated_gradients(model, layer: torch.nn.Module | str, inputs, baselines=None,
                               target=None, *, attribute_to_layer_input: bool = False,
                               additional_forward_args=None, **ig_kwargs) -> AttributionResult:
    """IG with respect to ``layer``'s output (default) or input.

    Args:
        model: callable ``model(*inputs, *additional_forward_args)``; inputs may be any dtype
            (e.g. token ids: attribute to the embedding layer).
        layer: a module the forward calls (once, or ``n`` times: see the module docstring),
            or its submodule name in ``model``; its output (input) must be one tensor.
        baselines: input-space baselines (None = zeros, a number, or a tensor broadcastable to
            the inputs; a tuple for tuple inputs), mapped through the network to the layer.
        target: the output per row, as in :func:`integrated_gradients`;
        attribute_to_layer_input: attribute to the layer's (first) input instead of its
            output; additional_forward_args: passed to ``model`` after the inputs.
        ig_kwargs: ``steps``, ``rule``, ``tol``, ``max_memory``, ``chunk_size``, ``backend``,
            ``progress``, ``gap``: as :func:`integrated_gradients` (``gap=False``: no
            completeness gap; the forwards at the inputs and baselines still run, for the
            layer's activations there).
    Returns:
        :class:`AttributionResult` with attributions shaped like the layer activation
        ``[B, ...]`` (a tuple of one per call for a layer called ``n > 1`` times);
        ``gap = sum(attr) - (f(x) - f(b))`` with ``f`` the model's own outputs (NaN with
        ``gap=False``).
    Raises:
        ``ValueError`` for a model that couples rows or is random (train-mode batch norm or
        dropout, batch mixing; opt in with ``tk.allow_row_coupling(model)``), ``RuntimeError``
        inside ``torch.inference_mode()`` (:mod:`taylor_kernels.engine.guards`).
    """
    layer = named_layer(model, layer)
    tup, _ = as_tuple(inputs) if not isinstance(inputs, torch.Tensor) or inputs.is_floating_point() \
        else ((inputs,), False)
    fargs = (() if additional_forward_args is None else additional_forward_args
             if isinstance(additional_forward_args, tuple) else (additional_forward_args,))
    check_rule_args(ig_kwargs.get("rule", "gausslegendre"), ig_kwargs.get("tol"))
    refuse_create_graph("layer_integrated_gradients", ig_kwargs)
    ig_kwargs = without_exact_rule(ig_kwargs)

    def capture(args):
        acts, out = layer_activations(model, layer, args[:len(tup)], args[len(tup):],
                                      attribute_to_layer_input)
        return tuple(acts), out

    bls = _baseline_inputs(baselines, tup)
    check_held(lambda args: capture(args)[0], tup, bls, fargs, ig_kwargs.get("max_memory"),
               layer_ig_bytes, chunk_size=ig_kwargs.get("chunk_size"))
    ends = layer_ends(capture, tup, bls, fargs)
    acts_x, acts_b = ends.acts_x, ends.acts_b
    if len(acts_b) != len(acts_x):
        raise ValueError(f"layer {type(layer).__name__} is called {len(acts_x)} times at the "
                         f"inputs but {len(acts_b)} times at the baselines; layer IG needs the "
                         "same calls at both")
    n = len(acts_x)
    through_layer = layer_replaced_forward(model, layer, attribute_to_layer_input, calls=n)
    with layer_reaches_output([layer], attribute_to_layer_input):
        return integrate_from_ends(through_layer, acts_x[0] if n == 1 else acts_x,
                                   acts_b[0] if n == 1 else acts_b, ends, target, tup + fargs,
                                   **ig_kwargs)
