"""Neuron attributions as path integrals on the path engine.

For a neuron ``n(x) = sel(a(x))`` of a layer activation ``a`` (``sel`` an index, slices summed
over, or a function giving one value per example):

* neuron integrated gradients: IG of ``n`` itself,
  ``NIG_i = (x_i - b_i) int_0^1 d_i n(b + t (x - b)) dt``;
* neuron conductance: the part of the output's IG that flows through ``n``,
  ``NC_i = (x_i - b_i) int_0^1 sel(dF/da)(p(t)) d_i n(p(t)) dt``. It is IG of
  ``g(p) = stop(sel(dF/da)(p)) * n(p)``, whose gradient is exactly the integrand, so both run
  through :func:`~taylor_kernels.attr.integrated_gradients.integrated_gradients` (every rule,
  chunking and budget); ``multiply_by_inputs=False`` drops the ``x - b`` factor.
"""
from __future__ import annotations

import torch

from taylor_kernels.attr.arguments import forward_args
from taylor_kernels.attr.integrated_gradients import AttributionResult, integrated_gradients
from taylor_kernels.attr.layer import _baseline_inputs
from taylor_kernels.attr.layer_budget import capture_first_rows
from taylor_kernels.attr.layer_capture import Layers, select_neuron
from taylor_kernels.attr.unscaled import unscaled_integrated_gradients
from taylor_kernels.engine import chunking, guards
from taylor_kernels.engine.problem import (_target_rows, as_tuple, check_scalar_row,
                                           check_target, one_row_batch, rows_twice,
                                           select_target)
from taylor_kernels.engine.thread_hooks import hookable
from taylor_kernels.models.outputs import model_output


def _run(fn, inputs, baselines, rest: tuple, multiply_by_inputs: bool,
         ig_kwargs: dict) -> AttributionResult:
    if multiply_by_inputs:
        return integrated_gradients(fn, inputs, baselines, None,
                                    additional_forward_args=rest, **ig_kwargs)
    tup, was_tuple = as_tuple(inputs)
    return unscaled_integrated_gradients(fn, tup, _baseline_inputs(baselines, tup), None,
                                         rest, was_tuple, **ig_kwargs)


def _batched_output(model, raw, args: tuple, first: bool) -> torch.Tensor:
    """``raw``, the output of ``model(*args)`` (the points first: ``[N, ...]``), as a tensor
    with the batch dimension a forward ending in ``.squeeze()`` drops for one row put back
    (:func:`~taylor_kernels.engine.problem.one_row_batch`). On the ``first`` call a 0-d output
    of one row is told from one scalar for the whole batch by a forward of two rows (no grad,
    buffers kept; later calls follow the first)."""
    out, n = model_output(raw), args[0].shape[0]
    if first and out.dim() == 0 and n == 1:
        with torch.no_grad(), guards.preserved_buffers(model):
            check_scalar_row(hookable(model)(*rows_twice(args)))
    return one_row_batch(out, n)


def neuron_integrated_gradients(model, layer, inputs, neuron_selector, baselines=None, *,
                                attribute_to_neuron_input: bool = False,
                                additional_forward_args=None, multiply_by_inputs: bool = True,
                                **ig_kwargs) -> AttributionResult:
    """IG of one neuron's value (see the module docstring); ``ig_kwargs`` as
    :func:`integrated_gradients`. Returns attributions shaped like ``inputs``."""
    spec = Layers(layer, attribute_to_neuron_input)

    def neuron(*args):
        return select_neuron(spec.capture(model, args, grad=True), neuron_selector)

    neuron.cost_owner = chunking.owner_for(model, "neuron", *spec.key) or neuron

    return _run(neuron, inputs, baselines, forward_args(additional_forward_args),
                multiply_by_inputs, ig_kwargs)


def _output_gradients(f: torch.Tensor, acts: list, spec: Layers) -> tuple:
    """``d sum(f) / d a`` for each activation tensor of ``acts`` (zeros for one ``f`` does not
    use); :class:`~taylor_kernels.attr.layer_capture.UnusedLayerOutput` when ``f`` uses none
    of them (the layer's last call feeds nothing the output uses: torch's bare "appears to not
    have been used in the graph")."""
    grads = torch.autograd.grad(f.sum(), acts, retain_graph=True, allow_unused=True) \
        if f.requires_grad else (None,) * len(acts)
    if all(g is None for g in grads):
        raise spec.unused_error(last_call=True)
    return tuple(torch.zeros_like(a) if g is None else g for g, a in zip(grads, acts))


def neuron_conductance(model, layer, inputs, neuron_selector, baselines=None, target=None, *,
                       attribute_to_neuron_input: bool = False, additional_forward_args=None,
                       multiply_by_inputs: bool = True, rule: str = "riemann_trapezoid",
                       **ig_kwargs) -> AttributionResult:
    """Neuron conductance (see the module docstring); ``target`` picks ``F`` from the model
    output as in :func:`integrated_gradients`. Returns attributions shaped like ``inputs``,
    with ``gap`` NaN: conductance has no completeness to measure (the gap of ``g`` stays
    the same at any number of nodes), so only fixed rules run."""
    if rule in ("adaptive", "exact") or ig_kwargs.get("tol") is not None:
        raise ValueError(f"neuron conductance takes a fixed rule (it has no completeness gap "
                         f"for rule={rule!r} or tol to refine against); use one of "
                         "'riemann_trapezoid', 'gausslegendre', ...")
    tup, _ = as_tuple(inputs)
    B, n_in = tup[0].shape[0], len(tup)
    targets = _target_rows(target, B, tup[0].device)
    spec = Layers(layer, attribute_to_neuron_input)
    checked: list = []

    def conductance(*args):
        points, rows, rest = args[:n_in], args[n_in], args[n_in + 1:]
        found: dict = {}

        def keep(k, v):  # endpoint probes run without grad: give F something to differentiate
            v = v if v.requires_grad else v.detach().requires_grad_(True)
            found[k] = v
            return v.clone()  # the model goes on with a copy: in place, it changes that one

        with torch.enable_grad(), spec.edited(keep, last_call=True):
            raw = hookable(model)(*points, *rest)
        with torch.enable_grad():  # (the endpoint probes' graph from here on too)
            out = _batched_output(model, raw, points + rest, first=not checked)
            if not checked:  # out-of-range: TargetIndexError (an IndexError, as Captum)
                check_target(targets, tuple(out.shape))
                checked.append(True)
            kind = None if isinstance(raw, torch.Tensor) else type(raw).__name__
            f = select_target(out, targets, rows, kind)  # one scalar per row (or a target)
            acts = [found[k] for k in sorted(found)]
            weight = select_neuron(_output_gradients(f, acts, spec), neuron_selector).detach()
            value = weight * select_neuron(tuple(acts), neuron_selector)
        return value if torch.is_grad_enabled() else value.detach()

    conductance.cost_owner = chunking.owner_for(  # (the closure is new per call)
        model, "neuron_conductance", *spec.key) or conductance
    # counts the layer's calls (a whole-batch capture here went past small budgets: 1.8-2.5x
    # of 8 MB)
    capture_first_rows(lambda args: spec.capture(model, args), tup,
                       forward_args(additional_forward_args))
    rows = torch.arange(B, device=tup[0].device)
    res = _run(conductance, inputs, baselines, (rows,) + forward_args(additional_forward_args),
               multiply_by_inputs, dict(ig_kwargs, rule=rule))
    res.gap = torch.full_like(res.gap, float("nan"))
    return res
