"""Captum-compatible ``IntegratedGradients`` and ``LayerIntegratedGradients`` on the path engine.

Same constructors, ``attribute`` signatures, argument forms and outputs as Captum 0.9; the work
runs through :func:`taylor_kernels.integrated_gradients` /
:func:`~taylor_kernels.attr.layer_paths.multi_layer_integrated_gradients` (chunked,
memory-budgeted, every backend). Differences a user may notice:

* ``internal_batch_size`` is the number of path points (expanded rows) per forward+backward
  pass, as in Captum; Captum rounds it to whole steps of all examples (at least one step, so at
  least ``B`` rows), we honour it exactly. Without it Captum runs all ``B * n_steps`` rows in
  one pass, we chunk to a memory budget (``max_memory=``).
* Extras: ``method="adaptive"`` (with ``tol=``), ``"trapezoid"`` and ``"exact"`` (exact sum
  over the linear regions of a piecewise-linear model), ``max_memory=``,
  ``backend=``, ``progress=``; ``self.last_result`` holds the last
  :class:`~taylor_kernels.AttributionResult` (evaluations spent, nodes per input; its
  ``gap`` NaN when no delta was asked for: like Captum, a fixed rule then runs no forward of
  the inputs and baselines).
* Riemann nodes are exact float64 (Captum rounds them through float32): differences ~1e-7.
* Inputs that require grad (grad mode on, a fixed rule): the attributions carry Captum's
  graph, ``integral.detach() * (inputs - baselines)``, so ``attr.sum().backward()`` runs as
  with Captum (the gradient flows through the factor only; for the exact derivative of the
  attributions use :func:`taylor_kernels.integrated_gradients` with ``create_graph=True``).
"""
from __future__ import annotations

from typing import Callable

from taylor_kernels.attr.integrated_gradients import integrated_gradients
from taylor_kernels.attr.layer_paths import multi_layer_integrated_gradients
from taylor_kernels.attr.unscaled import unscaled_integrated_gradients
from taylor_kernels.engine import guards
from taylor_kernels.captum_front._common import (CaptumAttribution, LayerInterpolation,
                                                 attribute_future_unsupported, captum_method,
                                                 check_grad_kwargs, constructing_for_captum,
                                                 dense_baselines, float32_path,
                                                 format_inputs, points_per_chunk, tracks_inputs,
                                                 with_factor_graph)
from taylor_kernels.user_warnings import warn


class IntegratedGradients(CaptumAttribution):
    """Drop-in for ``captum.attr.IntegratedGradients`` running on the taylor-kernels engine."""

    INTERPOLATES_INPUTS = True

    attribute_future = attribute_future_unsupported

    def __init__(self, forward_func: Callable, multiply_by_inputs: bool = True) -> None:
        self.forward_func = forward_func
        self._multiply_by_inputs = multiply_by_inputs
        self.last_result = None

    @captum_method
    def attribute(self, inputs, baselines=None, target=None, additional_forward_args=None,
                  n_steps: int = 50, method: str = "gausslegendre",
                  internal_batch_size: int | None = None,
                  return_convergence_delta: bool = False, *, tol: float | None = None,
                  max_memory=None, backend: str | None = None, progress: bool = False):
        """Integrated gradients of ``forward_func`` (Captum's arguments and return forms).

        Returns the attributions (a tensor for a tensor input, a tuple for a tuple), and with
        ``return_convergence_delta=True`` the pair ``(attributions, delta)`` where ``delta [B]``
        is ``sum(attributions) - (f(inputs) - f(baselines))`` per example.
        """
        tup, was_tuple = format_inputs(inputs)
        # a train-mode model (rows coupled, as Captum runs it): the delta's two forwards come
        # after the path, as Captum's, so that dropout draws fall as under Captum's seed
        delta_after = return_convergence_delta and guards.row_coupling_allowed()
        kw = dict(steps=n_steps, rule=method, tol=tol, max_memory=max_memory, backend=backend,
                  progress=progress, chunk_size=points_per_chunk(internal_batch_size, tup),
                  gap=return_convergence_delta and not delta_after)  # (no f(x), f(b)
        # forward without a delta)
        forward, fargs = self.engine_forward(tup, additional_forward_args)
        if self._multiply_by_inputs and tracks_inputs(tup, method, tol):
            res = with_factor_graph(_unscaled(forward, tup, baselines, target, fargs, True, kw),
                                    tup, dense_baselines(baselines, tup), was_tuple)
        elif self._multiply_by_inputs:
            res = integrated_gradients(forward, inputs, baselines, target,
                                       additional_forward_args=fargs, **kw)
        else:
            res = _unscaled(forward, tup, baselines, target, fargs, was_tuple, kw)
        self.last_result = res
        if delta_after:
            res.gap = self.compute_convergence_delta(res.attributions, baselines, inputs, target,
                                                     additional_forward_args)
        if return_convergence_delta:
            return res.attributions, res.gap
        return res.attributions


def _unscaled(forward, tup: tuple, baselines, target, fargs: tuple, was_tuple: bool, kw: dict):
    """``int_0^1 grad f(b + t (x - b)) dt`` per input (:func:`unscaled_integrated_gradients`)
    on the points of the scaled path (:func:`float32_path`: bf16/fp16 inputs as Captum's)."""
    forward, points = float32_path(forward, tup)
    return unscaled_integrated_gradients(forward, points, dense_baselines(baselines, points),
                                         target, fargs, was_tuple, **kw)


class LayerIntegratedGradients(LayerInterpolation, CaptumAttribution):
    """Drop-in for ``captum.attr.LayerIntegratedGradients`` on our engine: one layer or a list
    (attributed jointly, every layer's activation replaced in the same forward), each layer's
    output (or inputs, ``attribute_to_layer_input=True``) a tensor or a tuple of tensors.
    Returns per layer a tensor, or a tuple for tuple activations; a list for a list of layers.
    ``delta`` is ``sum(all attributions) - (f(inputs) - f(baselines))`` (as in Captum, with the
    real inputs: where the network bypasses the layers, delta shows the bypassed part).
    """

    def __init__(self, forward_func: Callable, layer, device_ids=None,
                 multiply_by_inputs: bool = True) -> None:
        if isinstance(layer, list) and len(layer) > 1 and not constructing_for_captum():
            warn("Multiple layers are attributed jointly: make sure that no layer's "
                 "output depends only on another listed layer's output (its "
                 "replacement would hide the other's)", UserWarning)
        self.forward_func = forward_func
        self.layer = layer
        self.device_ids = device_ids
        self._multiply_by_inputs = multiply_by_inputs
        self.last_result = None

    @captum_method
    def attribute(self, inputs, baselines=None, target=None, additional_forward_args=None,
                  n_steps: int = 50, method: str = "gausslegendre",
                  internal_batch_size: int | None = None,
                  return_convergence_delta: bool = False,
                  attribute_to_layer_input: bool = False, grad_kwargs=None, *,
                  tol: float | None = None, max_memory=None, backend: str | None = None,
                  progress: bool = False):
        """Layer integrated gradients (Captum's arguments); inputs may be token ids."""
        check_grad_kwargs(grad_kwargs)
        tup, _ = format_inputs(inputs)
        forward, fargs = self.engine_forward(tup, additional_forward_args)
        res = multi_layer_integrated_gradients(
            forward, self.layer, inputs, baselines, target,
            attribute_to_layer_input=attribute_to_layer_input,
            additional_forward_args=fargs,
            multiply_by_inputs=self._multiply_by_inputs, steps=n_steps, rule=method, tol=tol,
            max_memory=max_memory, backend=backend, progress=progress,
            chunk_size=points_per_chunk(internal_batch_size, tup),
            # without the factor Captum's delta comes from the model below: no gap forward
            **({} if self._multiply_by_inputs else {"gap": False}))
        self.last_result = res
        attrs = res.attributions if isinstance(self.layer, list) else res.attributions[0]
        if return_convergence_delta and self._multiply_by_inputs and \
                not guards.row_coupling_allowed():
            return attrs, res.gap  # Captum's delta: F(inputs), F(baselines) from the model
        if return_convergence_delta:  # Captum's F(inputs) - F(baselines): paths that bypass
            # (and a train-mode model's: Captum's two forwards after the path draw dropout)
            flat = tuple(t for a in res.attributions  # the layers count too
                         for t in (a if isinstance(a, tuple) else (a,)))
            res.gap = self.compute_convergence_delta(flat, baselines, inputs, target,
                                                     additional_forward_args)
            return attrs, res.gap
        return attrs
