"""Captum-compatible ``IntegratedGradients`` and ``LayerIntegratedGradients`` on the path engine.

Same constructors, ``attribute`` signatures, argument forms and outputs as Captum 0.9; the work
runs through :func:`taylor_kernels.integrated_gradients` / :func:`layer_integrated_gradients`
(chunked, memory-budgeted, every backend). Differences a user may notice:

* ``internal_batch_size`` is the number of path points (expanded rows) per forward+backward
  pass, as in Captum; Captum rounds it to whole steps of all examples (at least one step, so at
  least ``B`` rows), we honour it exactly. Without it Captum runs all ``B * n_steps`` rows in
  one pass, we chunk to a memory budget (``max_memory=``).
* Extras: ``method="adaptive"`` (with ``tol=``) and ``"trapezoid"``, ``max_memory=``,
  ``backend=``, ``progress=``; ``self.last_result`` holds the last
  :class:`~taylor_kernels.AttributionResult` (evaluations spent, nodes per input).
* Riemann nodes are exact float64 (Captum rounds them through float32): differences ~1e-7.
"""
from __future__ import annotations

from typing import Callable

import torch

from taylor_kernels.attr.integrated_gradients import integrated_gradients
from taylor_kernels.attr.layer import (_activation, _baseline_inputs, layer_integrated_gradients,
                                      layer_replaced_forward)
from taylor_kernels.captum_front._common import (Unscaled, captum_method, dense_baselines,
                                                 format_args, format_inputs)


def _check_unscaled_options(method: str, tol) -> None:
    if method == "adaptive" or tol is not None:
        raise ValueError("method='adaptive' and tol= stop on the completeness gap "
                         "sum(attr) - (f(x) - f(b)), which does not apply when "
                         "multiply_by_inputs=False; use a fixed rule")


def _unscaled_ig(model: Callable, inputs: tuple, baselines: tuple, target, rest: tuple,
                 was_tuple: bool, **ig_kwargs):
    """Integrated gradients without the ``(x - b)`` factor (see :class:`Unscaled`)."""
    for i, x in enumerate(inputs):
        if not torch.isfinite(x).all():
            raise ValueError(f"input {i} contains NaN or Inf values")
    ones, args = Unscaled.arguments(inputs, baselines, rest)
    return integrated_gradients(Unscaled(model, len(inputs)), ones if was_tuple else ones[0],
                                0.0, target, additional_forward_args=args, **ig_kwargs)


class IntegratedGradients:
    """Drop-in for ``captum.attr.IntegratedGradients`` running on the taylor-kernels engine."""

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
        kw = dict(steps=n_steps, rule=method, tol=tol, max_memory=max_memory, backend=backend,
                  progress=progress, chunk_size=internal_batch_size)
        if self._multiply_by_inputs:
            res = integrated_gradients(self.forward_func, inputs, baselines, target,
                                       additional_forward_args=additional_forward_args, **kw)
        else:
            _check_unscaled_options(method, tol)
            res = _unscaled_ig(self.forward_func, tup, dense_baselines(baselines, tup), target,
                               format_args(additional_forward_args), was_tuple, **kw)
        self.last_result = res
        if return_convergence_delta:
            return res.attributions, res.gap
        return res.attributions

    def has_convergence_delta(self) -> bool:
        return True

    @property
    def multiplies_by_inputs(self) -> bool:
        return self._multiply_by_inputs


class LayerIntegratedGradients:
    """Drop-in for ``captum.attr.LayerIntegratedGradients`` (one layer) on our engine.

    Attributions are to the layer's output (or, with ``attribute_to_layer_input=True``, its
    first input), which must be a single tensor; ``delta`` is
    ``sum(attributions) - (f(inputs) - f(baselines))``.
    """

    def __init__(self, forward_func: Callable, layer, device_ids=None,
                 multiply_by_inputs: bool = True) -> None:
        if isinstance(layer, (list, tuple)) and len(layer) != 1:
            raise NotImplementedError(
                f"taylor_kernels.captum.LayerIntegratedGradients attributes to one layer; got "
                f"a list of {len(layer)} layers. Use one instance per layer (or "
                "captum.attr.LayerIntegratedGradients for joint multi-layer attribution)")
        self.forward_func = forward_func
        self.layer = layer
        self._module = layer[0] if isinstance(layer, (list, tuple)) else layer
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
        if grad_kwargs:
            raise NotImplementedError("grad_kwargs is not supported by the taylor-kernels "
                                      "engine")
        kw = dict(steps=n_steps, rule=method, tol=tol, max_memory=max_memory, backend=backend,
                  progress=progress, chunk_size=internal_batch_size)
        if self._multiply_by_inputs:
            res = layer_integrated_gradients(
                self.forward_func, self._module, inputs, baselines, target,
                attribute_to_layer_input=attribute_to_layer_input,
                additional_forward_args=additional_forward_args, **kw)
        else:
            _check_unscaled_options(method, tol)
            res = self._unscaled(inputs, baselines, target, additional_forward_args,
                                 attribute_to_layer_input, kw)
        self.last_result = res
        attrs = [res.attributions] if isinstance(self.layer, (list, tuple)) else res.attributions
        if return_convergence_delta:
            return attrs, res.gap
        return attrs

    def _unscaled(self, inputs, baselines, target, additional_forward_args, of_input, kw):
        """Layer IG without the ``(a(x) - a(b))`` factor, through :class:`Unscaled`."""
        tup = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
        fargs = format_args(additional_forward_args)
        layer, model = self._module, self.forward_func
        act_x = _activation(model, layer, tup, fargs, of_input)
        act_b = _activation(model, layer, _baseline_inputs(baselines, tup), fargs, of_input)
        through_layer = layer_replaced_forward(model, layer, of_input)
        return _unscaled_ig(through_layer, (act_x,), (act_b,), target, tup + fargs, False, **kw)

    def has_convergence_delta(self) -> bool:
        return True

    @property
    def multiplies_by_inputs(self) -> bool:
        return self._multiply_by_inputs
