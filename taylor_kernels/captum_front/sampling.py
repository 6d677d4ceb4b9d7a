"""Captum-compatible ``NoiseTunnel`` and ``GradientShap`` on the path engine.

Both draw their random numbers exactly as Captum 0.9 does, from the same global generators in
the same order: Gaussian input noise from torch's global RNG (``torch.normal``, default dtype),
baselines from the distribution with ``numpy.random.choice`` and GradientShap's interpolation
coefficients with ``numpy.random.uniform``. Under the same ``torch.manual_seed`` and
``numpy.random.seed`` the results equal Captum's up to rounding.

What differs is the batching: all noisy copies (``B * nt_samples`` rows) go through ONE call of
the wrapped method and GradientShap's ``B * n_samples`` points through one engine pass, chunked
to the memory budget (``max_memory=`` / ``internal_batch_size=``). ``nt_samples_batch_size``
therefore only groups the random draws as Captum does (which matters for reproducing its
numbers); memory is bounded by the engine. The exception: a wrapped method that draws its own
random numbers (GradientShap, LayerGradientShap) runs once per block, as in Captum, since its
draws come between the blocks' noise.
"""
from __future__ import annotations

from typing import Callable

import torch

from taylor_kernels import backends
from taylor_kernels.engine import memory
from taylor_kernels.attr.gradient_shap import gradient_shap_rows
from taylor_kernels.captum_front._common import (CaptumAttribution, CaptumNamed,
                                                 CaptumRuntimeError,
                                                 CaptumZeroDivisionError,
                                                 attribute_future_unsupported,
                                                 bind_unbatched_args, captum_method,
                                                 captum_noise, check_stdevs, draw_baselines,
                                                 draw_gradient_shap, expand_args, expand_rows,
                                                 expand_target, format_inputs,
                                                 refuse_noise_on_token_ids)

NT_TYPES = ("smoothgrad", "smoothgrad_sq", "vargrad")


def _concat_rows(parts: list):
    """Per-block results (tensors, or tuples / lists of them) joined along the rows."""
    if len(parts) == 1:
        return parts[0]
    if isinstance(parts[0], (tuple, list)):
        return type(parts[0])(_concat_rows([p[i] for p in parts]) for i in range(len(parts[0])))
    return torch.cat(parts)


class NoiseTunnel(CaptumNamed):
    """Drop-in for ``captum.attr.NoiseTunnel`` over any :mod:`taylor_kernels.captum` class
    (SmoothGrad, SmoothGrad-squared, VarGrad). Over any other method (Captum's ``Saliency``,
    which ``from taylor_kernels.captum import Saliency`` gives) it is Captum's NoiseTunnel."""

    def __new__(cls, attribution_method=None, *args, **kwargs):
        if isinstance(attribution_method, CaptumAttribution):
            return super().__new__(cls)
        if cls is not NoiseTunnel or attribution_method is None:  # a subclass keeps its own
            raise TypeError(f"{cls.__name__} wraps the taylor_kernels.captum classes "
                            "(IntegratedGradients, LayerIntegratedGradients, ...), got "
                            f"{type(attribution_method).__name__}")
        try:
            import captum.attr
        except ImportError:
            raise TypeError(
                "taylor_kernels.captum.NoiseTunnel wraps the taylor_kernels.captum classes "
                "(IntegratedGradients, LayerIntegratedGradients, LayerConductance, ...), got "
                f"{type(attribution_method).__module__}.{type(attribution_method).__name__}, "
                "which needs Captum's NoiseTunnel: install captum") from None
        return captum.attr.NoiseTunnel(attribution_method, *args, **kwargs)

    def __getnewargs__(self):
        """``copy``/``pickle`` rebuild the object by ``__new__`` with these arguments (without
        them, ``__new__`` got no method to wrap and raised)."""
        return (self.attribution_method,)

    def __init__(self, attribution_method) -> None:
        self.attribution_method = attribution_method
        self.forward_func = attribution_method.forward_func
        self.is_delta_supported = attribution_method.has_convergence_delta()
        self._multiply_by_inputs = attribution_method.multiplies_by_inputs
        self.is_gradient_method = True

    @captum_method
    def attribute(self, inputs, nt_type: str = "smoothgrad", nt_samples: int = 5,
                  nt_samples_batch_size: int | None = None, stdevs=1.0,
                  draw_baseline_from_distrib: bool = False, **kwargs):
        """Aggregate the wrapped method over ``nt_samples`` noisy copies of each input.

        ``smoothgrad``: mean; ``smoothgrad_sq``: mean of squares; ``vargrad``: mean of squares
        minus squared mean. ``kwargs`` go to the wrapped ``attribute`` (per-example
        baselines, targets and additional forward args are expanded like Captum's). With
        ``return_convergence_delta=True`` the delta of every noisy copy is returned,
        ``[B * nt_samples]`` in Captum's order.
        """
        if nt_type not in NT_TYPES:
            raise ValueError(f"unknown nt_type {nt_type!r}; choose one of {NT_TYPES}")
        if isinstance(nt_samples, bool) or int(nt_samples) != nt_samples or nt_samples < 1:
            error = CaptumZeroDivisionError if nt_samples == 0 else \
                CaptumRuntimeError if nt_samples < 0 else ValueError  # (Captum's types)
            raise error(f"nt_samples must be a positive integer, got {nt_samples}")
        if nt_samples_batch_size is not None and nt_samples_batch_size < 1:
            error = CaptumZeroDivisionError if nt_samples_batch_size == 0 else ValueError
            raise error(f"nt_samples_batch_size must be positive, got {nt_samples_batch_size}")
        tup, was_tuple = format_inputs(inputs)
        refuse_noise_on_token_ids(
            "NoiseTunnel", getattr(self.attribution_method, "forward_func", None), tup,
            "for noise on the embeddings use tk.noise_tunnel(tk.layer_integrated_gradients, "
            "model, ids, model.get_input_embeddings(), ...)")
        stds = check_stdevs(stdevs, len(tup))
        B = tup[0].shape[0]
        per_block = nt_samples if nt_samples_batch_size is None else min(nt_samples,
                                                                         nt_samples_batch_size)
        sizes = [per_block] * (nt_samples // per_block)
        if nt_samples % per_block:
            sizes.append(nt_samples % per_block)
        has_bl = "baselines" in kwargs
        bls = kwargs.get("baselines")
        bl_tuple = (tuple(bls) if isinstance(bls, tuple) else (bls,) * len(tup)) if has_bl \
            else None
        # A method that draws random numbers itself (GradientShap) runs block by block, as
        # Captum's does, so its draws interleave with the noise in Captum's order; the others
        # run all blocks in one call.
        groups = [[n] for n in sizes] if self.attribution_method.DRAWS_RANDOM else [sizes]
        drawn, outs, deltas = {}, [], []
        with torch.no_grad():  # Captum: numpy baselines for a full block (shared by every
            if has_bl and draw_baseline_from_distrib:  # full block), then per block the
                drawn[per_block] = draw_baselines(bl_tuple, B, per_block)  # noise, and the
        for group in groups:  # rest's baselines after its noise
            noisy = []
            with torch.no_grad():
                for n in group:
                    noisy.append(tuple(captum_noise(x, s, n) for x, s in zip(tup, stds)))
                    if has_bl and draw_baseline_from_distrib and n not in drawn:
                        drawn[n] = draw_baselines(bl_tuple, B, n)
            call_kwargs = {k: v for k, v in kwargs.items() if k != "baselines"}
            if "target" in call_kwargs:
                call_kwargs["target"] = expand_target(call_kwargs["target"], B, group)
            if "additional_forward_args" in call_kwargs:
                call_kwargs["additional_forward_args"] = expand_args(
                    call_kwargs["additional_forward_args"], B, group)
            if has_bl:
                call_kwargs["baselines"] = self._expand_baselines(bl_tuple, drawn, tup, group,
                                                                  isinstance(bls, tuple))
            batch = tuple(torch.cat([blk[i] for blk in noisy]) for i in range(len(tup)))
            del noisy  # (the blocks were a second copy of the batch through the call)
            if call_kwargs.get("max_memory") is not None:  # the batch and its baselines are
                call_kwargs["max_memory"] = memory.beside(  # held beside the method's budget
                    call_kwargs["max_memory"], (batch, call_kwargs.get("baselines")),
                    tup[0].device)
            with torch.no_grad():  # as Captum's whole call: results carry no graph (a
                # baseline requiring grad left one through x - b; the methods enable grad)
                out = self.attribution_method.attribute(batch if was_tuple else batch[0],
                                                        **call_kwargs)
            if kwargs.get("return_convergence_delta", False):
                out, delta = out
                deltas.append(delta)
            outs.append(out)
        out = _concat_rows(outs)
        delta = torch.cat(deltas) if deltas else None

        def smooth(value):  # a tensor, a tuple (per input) or a list (per layer) of those
            if isinstance(value, (tuple, list)):
                return type(value)(smooth(v) for v in value)
            return self._smooth(value, B, sizes, nt_type, nt_samples)

        with torch.no_grad():
            result = smooth(out)
        if delta is not None:
            return result, delta
        return result

    @staticmethod
    def _expand_baselines(bl_tuple, drawn, inputs, sizes, was_tuple):
        """Baselines for the concatenated blocks: drawn rows, or per-example ones repeated."""
        if drawn:
            out = tuple(torch.cat([drawn[n][i] for n in sizes]) if isinstance(bl, torch.Tensor)
                        else bl for i, bl in enumerate(bl_tuple))
        else:
            out = tuple(expand_rows(bl, sizes)
                        if isinstance(bl, torch.Tensor) and bl.shape[0] == x.shape[0] > 1
                        else bl for bl, x in zip(bl_tuple, inputs))
        return out if was_tuple else out[0]

    @staticmethod
    def _smooth(a: torch.Tensor, B: int, sizes: list[int], nt_type: str,
                total: int) -> torch.Tensor:
        """Sum (and sum of squares) over each example's copies, block by block, then average."""
        s = sq = 0
        start = 0
        for n in sizes:
            blk = a[start:start + B * n].reshape(B, n, *a.shape[1:])
            s = s + blk.sum(dim=1)
            sq = sq + blk.pow(2).sum(dim=1)
            start += B * n
        mean, mean_sq = s * (1 / total), sq * (1 / total)
        if nt_type == "smoothgrad":
            return mean
        if nt_type == "smoothgrad_sq":
            return mean_sq
        return mean_sq - mean * mean

    def has_convergence_delta(self) -> bool:
        return self.is_delta_supported

    attribute_future = attribute_future_unsupported

    @property
    def multiplies_by_inputs(self) -> bool:
        return self._multiply_by_inputs


class GradientShap(CaptumAttribution):
    """Drop-in for ``captum.attr.GradientShap`` on the path engine.

    For each of ``n_samples`` draws per example: a baseline drawn uniformly from the
    ``baselines`` distribution, Gaussian noise (``stdevs``) added to the input, ``alpha ~
    U(0, 1)``; the attribution ``(x_noisy - b) * grad f(b + alpha (x_noisy - b))`` (without the
    factor when ``multiply_by_inputs=False``) is averaged over the draws. All ``B * n_samples``
    points are one engine pass (per-path nodes ``[B * n, 1, 1]``), chunked to the budget.
    """

    DRAWS_RANDOM = True
    BASELINE_CALLABLES = True
    attribute_future = attribute_future_unsupported

    def __init__(self, forward_func: Callable, multiply_by_inputs: bool = True) -> None:
        self.forward_func = forward_func
        self._multiply_by_inputs = multiply_by_inputs
        self.last_result = None

    @captum_method
    def attribute(self, inputs, baselines, n_samples: int = 5, stdevs=0.0, target=None,
                  additional_forward_args=None, return_convergence_delta: bool = False, *,
                  internal_batch_size: int | None = None, max_memory=None,
                  backend: str | None = None, progress: bool = False):
        """GradientShap attributions (Captum's arguments); with
        ``return_convergence_delta=True`` also ``delta [B * n_samples]``: per draw,
        ``sum(attr) - (f(x_noisy) - f(b))``, in Captum's order."""
        refuse_noise_on_token_ids("GradientShap", self.forward_func, inputs,
                                  "attribute through the embedding layer with "
                                  "LayerIntegratedGradients, or pass the embeddings "
                                  "(inputs_embeds) as the inputs")
        d = draw_gradient_shap(inputs, baselines, n_samples, stdevs, target,
                               additional_forward_args)
        forward, fargs = bind_unbatched_args(self.forward_func, len(d.noisy), d.forward_args,
                                             d.noisy[0].shape[0])
        with backends.selected(backend):
            res = gradient_shap_rows(
                forward, d.noisy, d.drawn, d.alphas, d.target, fargs,
                multiply_by_inputs=self._multiply_by_inputs, was_tuple=d.was_tuple,
                with_gap=return_convergence_delta,
                max_memory=memory.beside(max_memory, (d.noisy, d.drawn), d.noisy[0].device),
                chunk_size=internal_batch_size, progress=progress)
        self.last_result = res
        attrs = tuple(d.mean(a) for a in (res.attributions if d.was_tuple
                                          else (res.attributions,)))
        attrs = attrs if d.was_tuple else attrs[0]
        if return_convergence_delta:
            return attrs, res.gap
        return attrs
