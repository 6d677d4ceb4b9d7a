"""Captum-compatible ``NeuronIntegratedGradients`` and ``NeuronConductance`` on the path engine.

Same constructors, ``attribute`` signatures, defaults (``gausslegendre`` for neuron IG,
``riemann_trapezoid`` for neuron conductance) and return forms as Captum 0.9; both run through
:mod:`taylor_kernels.attr.neuron` (IG of the neuron, or of ``stop(dF/dn) * n``), so every
rule, chunking and the memory budget apply. ``neuron_selector``: an int or a tuple of ints /
slices indexing the layer activation past the batch (slices are summed), or a callable.
"""
from __future__ import annotations

from typing import Callable

import torch

from taylor_kernels.attr.neuron import neuron_conductance, neuron_integrated_gradients
from taylor_kernels.captum_front._common import (CaptumAttribution, captum_method,
                                                 check_grad_kwargs, dense_baselines,
                                                 float32_path, format_inputs,
                                                 points_per_chunk, promoted,
                                                 tracks_inputs, with_factor_graph)
from taylor_kernels.user_warnings import warn


class _NeuronMethod(CaptumAttribution):
    HAS_DELTA = False
    INTERPOLATES_INPUTS = True

    def __init__(self, forward_func: Callable, layer: torch.nn.Module, device_ids=None,
                 multiply_by_inputs: bool = True) -> None:
        if not isinstance(layer, torch.nn.Module):
            raise TypeError(f"layer must be a torch.nn.Module, got {type(layer).__name__}")
        self.forward_func, self.layer, self.device_ids = forward_func, layer, device_ids
        self._multiply_by_inputs = multiply_by_inputs
        self.last_result = None

    def _run(self, fn, inputs, neuron_selector, baselines, *args, n_steps, method,
             internal_batch_size, attribute_to_neuron_input, additional_forward_args, **extras):
        tup, was_tuple = format_inputs(inputs)
        forward, fargs = self.engine_forward(tup, additional_forward_args)
        # inputs requiring grad: Captum's graph through the (x - b) factor, as IG's front
        graph = self._multiply_by_inputs and tracks_inputs(tup, method)
        model, points = float32_path(forward, tup) if graph or not self._multiply_by_inputs \
            else (forward, tup)  # (the unscaled path: bf16/fp16 points as Captum's)
        res = fn(model, self.layer, points if graph or was_tuple else points[0],
                 neuron_selector, baselines, *args,
                 attribute_to_neuron_input=attribute_to_neuron_input,
                 additional_forward_args=fargs,
                 multiply_by_inputs=self._multiply_by_inputs and not graph, steps=n_steps,
                 rule=method, chunk_size=points_per_chunk(internal_batch_size, tup), **extras)
        if graph:
            res = with_factor_graph(res, tup, dense_baselines(baselines, tup), was_tuple)
        self.last_result = res
        return res.attributions


def _warn_callable(neuron_selector) -> None:
    if callable(neuron_selector):
        warn("neuron_selector is a callable: it should select neurons of the layer, "
             "not aggregate them otherwise, or the result is not the neuron's "
             "attribution", UserWarning)


class NeuronIntegratedGradients(_NeuronMethod):
    """Drop-in for ``captum.attr.NeuronIntegratedGradients``: IG of one neuron's value."""

    @captum_method
    def attribute(self, inputs, neuron_selector, baselines=None, additional_forward_args=None,
                  n_steps: int = 50, method: str = "gausslegendre",
                  internal_batch_size: int | None = None,
                  attribute_to_neuron_input: bool = False, *, max_memory=None,
                  backend: str | None = None, progress: bool = False):
        """Attributions shaped like ``inputs`` (a tuple for a tuple)."""
        return self._run(neuron_integrated_gradients, inputs, neuron_selector, baselines,
                         n_steps=n_steps, method=method, internal_batch_size=internal_batch_size,
                         attribute_to_neuron_input=attribute_to_neuron_input,
                         additional_forward_args=additional_forward_args,
                         max_memory=max_memory, backend=backend, progress=progress)


class NeuronConductance(_NeuronMethod):
    """Drop-in for ``captum.attr.NeuronConductance``: the part of the target output's IG that
    flows through one neuron."""

    BATCHES_AS_CAPTUM = False  # (its own passes over the path, unlike Captum's one batch)

    @captum_method
    def attribute(self, inputs, neuron_selector, baselines=None, target=None,
                  additional_forward_args=None, n_steps: int = 50,
                  method: str = "riemann_trapezoid", internal_batch_size: int | None = None,
                  attribute_to_neuron_input: bool = False, grad_kwargs=None, *,
                  max_memory=None, backend: str | None = None, progress: bool = False):
        """Attributions shaped like ``inputs`` (a tuple for a tuple)."""
        check_grad_kwargs(grad_kwargs)
        _warn_callable(neuron_selector)
        return promoted(self._run(
            neuron_conductance, inputs, neuron_selector, baselines, target, n_steps=n_steps,
            method=method, internal_batch_size=internal_batch_size,
            attribute_to_neuron_input=attribute_to_neuron_input,
            additional_forward_args=additional_forward_args, max_memory=max_memory,
            backend=backend, progress=progress))
