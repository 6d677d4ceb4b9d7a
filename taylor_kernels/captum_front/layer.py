"""Captum-compatible ``LayerConductance``, ``InternalInfluence`` and ``LayerGradientShap``.

Same constructors, ``attribute`` signatures, defaults and return forms as Captum 0.9; the sums
run on the path engine through :mod:`taylor_kernels.attr.layer_paths` (layer gradients along
input-space paths, chunked to the memory budget). ``internal_batch_size`` is the number of
path points per forward+backward pass. Conductance additionally runs the network up to the
layer (no grad) at each next node, where Captum runs one more full step.
"""
from __future__ import annotations

from typing import Callable

import torch

from taylor_kernels.attr.layer_paths import (check_float_inputs, internal_influence,
                                             layer_conductance, layer_gradient_shap)
from taylor_kernels.captum_front._common import (CaptumAttribution, LayerInterpolation,
                                                 bind_unbatched_args, captum_method,
                                                 check_grad_kwargs,
                                                 dense_baselines, draw_gradient_shap,
                                                 format_inputs, points_per_chunk, promoted)
from taylor_kernels.engine import memory


class _LayerMethod(LayerInterpolation, CaptumAttribution):
    def __init__(self, forward_func: Callable, layer: torch.nn.Module | None,
                 device_ids=None) -> None:
        """``layer`` may be None and assigned later (``inst.layer = module``), as Captum's
        ``TCAV`` does with the method it is given."""
        if layer is not None and not isinstance(layer, torch.nn.Module):
            raise TypeError(f"layer must be a torch.nn.Module, got {type(layer).__name__}")
        self.forward_func, self.layer, self.device_ids = forward_func, layer, device_ids
        self.last_result = None

    def _layer(self) -> torch.nn.Module:
        """The layer to attribute; ``TypeError`` while it is None (constructed without one)."""
        if self.layer is None:
            raise TypeError(f"{type(self).__name__} has no layer (constructed with "
                            "layer=None): assign the module to attribute, inst.layer = "
                            "module, before calling attribute")
        return self.layer


class LayerConductance(_LayerMethod):
    """Drop-in for ``captum.attr.LayerConductance``: the flow of the output's change through
    each unit of the layer, ``sum_s dF/da (p_s) (a(p_{s+1}) - a(p_s))`` over ``n_steps + 1``
    nodes of ``method`` on ``p = b + t (x - b)``."""

    BATCHES_AS_CAPTUM = False  # (gradients and next-node activations in separate passes)
    INTERPOLATES_INPUTS = True

    @captum_method
    def attribute(self, inputs, baselines=None, target=None, additional_forward_args=None,
                  n_steps: int = 50, method: str = "gausslegendre",
                  internal_batch_size: int | None = None,
                  return_convergence_delta: bool = False,
                  attribute_to_layer_input: bool = False, grad_kwargs=None, *,
                  max_memory=None, backend: str | None = None, progress: bool = False):
        """Conductance of every unit of the layer, shaped like its activation (a tuple for
        tuple activations); with ``return_convergence_delta`` also ``delta [B] =
        sum(attributions) - (F(inputs) - F(baselines))``."""
        check_grad_kwargs(grad_kwargs)
        tup, _ = format_inputs(inputs)
        bls = dense_baselines(baselines, tup)
        forward, fargs = self.engine_forward(tup, additional_forward_args)
        res = layer_conductance(forward, self._layer(), tup, bls, target, steps=n_steps,
                                rule=method, attribute_to_layer_input=attribute_to_layer_input,
                                additional_forward_args=fargs,
                                max_memory=max_memory,
                                chunk_size=points_per_chunk(internal_batch_size, tup),
                                backend=backend, progress=progress)
        self.last_result = res
        if return_convergence_delta:
            delta = self.compute_convergence_delta(res.attributions, bls, tup, target,
                                                   additional_forward_args)
            return res.attributions, delta
        return res.attributions


class InternalInfluence(_LayerMethod):
    """Drop-in for ``captum.attr.InternalInfluence``: the layer gradient integrated along the
    input-space path, ``int_0^1 dF/da (b + t (x - b)) dt`` by ``method``."""

    HAS_DELTA = False
    INTERPOLATES_INPUTS = True
    _multiply_by_inputs = False

    @captum_method
    def attribute(self, inputs, baselines=None, target=None, additional_forward_args=None,
                  n_steps: int = 50, method: str = "gausslegendre",
                  internal_batch_size: int | None = None,
                  attribute_to_layer_input: bool = False, grad_kwargs=None, *,
                  max_memory=None, backend: str | None = None, progress: bool = False):
        """Internal influence of every unit of the layer, shaped like its activation."""
        check_grad_kwargs(grad_kwargs)
        tup, _ = format_inputs(inputs)
        forward, fargs = self.engine_forward(tup, additional_forward_args)
        res = internal_influence(forward, self._layer(), tup,
                                 dense_baselines(baselines, tup), target, steps=n_steps,
                                 rule=method, attribute_to_layer_input=attribute_to_layer_input,
                                 additional_forward_args=fargs,
                                 max_memory=max_memory,
                                 chunk_size=points_per_chunk(internal_batch_size, tup),
                                 backend=backend, progress=progress)
        # Captum scales the gradients by default-dtype step sizes: bf16/fp16 layers give float32
        res.attributions = promoted(res.attributions)
        self.last_result = res
        return res.attributions


class LayerGradientShap(_LayerMethod):
    """Drop-in for ``captum.attr.LayerGradientShap``: GradientSHAP in the layer's activation
    space. Draws its random numbers like Captum (baselines by ``numpy.random.choice``, noise by
    ``torch.normal``, nodes by ``numpy.random.uniform``, in that order), so under the same
    seeds the results equal Captum's; all ``B * n_samples`` draws are one engine pass."""

    DRAWS_RANDOM = True
    BASELINE_CALLABLES = True
    INTERPOLATES_INPUTS = True  # (Captum's noise makes integer inputs floats)

    def __init__(self, forward_func: Callable, layer: torch.nn.Module | None, device_ids=None,
                 multiply_by_inputs: bool = True) -> None:
        super().__init__(forward_func, layer, device_ids)
        self._multiply_by_inputs = multiply_by_inputs

    @captum_method
    def attribute(self, inputs, baselines, n_samples: int = 5, stdevs=0.0, target=None,
                  additional_forward_args=None, return_convergence_delta: bool = False,
                  attribute_to_layer_input: bool = False, *,
                  internal_batch_size: int | None = None, max_memory=None,
                  backend: str | None = None, progress: bool = False):
        """Layer GradientSHAP (Captum's arguments); ``baselines`` a distribution ``[N, ...]``
        (or a callable returning it); with ``return_convergence_delta`` also the delta of
        every draw, ``[B * n_samples]``."""
        layer = self._layer()  # (before the draws)
        check_float_inputs(format_inputs(inputs)[0])  # ids (kept by name): before the noise
        d = draw_gradient_shap(inputs, baselines, n_samples, stdevs, target,
                               additional_forward_args)
        forward, fargs = bind_unbatched_args(self.forward_func, len(d.noisy), d.forward_args,
                                             d.noisy[0].shape[0])
        res = layer_gradient_shap(forward, layer, d.noisy, d.drawn, d.alphas,
                                  d.target, multiply_by_inputs=self._multiply_by_inputs,
                                  attribute_to_layer_input=attribute_to_layer_input,
                                  additional_forward_args=fargs,
                                  max_memory=memory.beside(max_memory, (d.noisy, d.drawn),
                                                           d.noisy[0].device),
                                  chunk_size=internal_batch_size, backend=backend,
                                  progress=progress)
        self.last_result = res
        rows = res.attributions if isinstance(res.attributions, tuple) else (res.attributions,)
        attrs = tuple(d.mean(a) for a in rows)
        attrs = attrs if len(attrs) > 1 else attrs[0]
        if return_convergence_delta:
            delta = self.compute_convergence_delta(res.attributions, d.drawn, d.noisy, d.target,
                                                   d.forward_args)
            return attrs, delta
        return attrs
