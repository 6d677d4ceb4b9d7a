"""Noise tunnel: SmoothGrad, SmoothGrad-squared and VarGrad over any path method.

``SG(x) = mean_j A(x + e_j)``, ``SG^2(x) = mean_j A(x + e_j)^2``,
``VG(x) = mean_j A(x + e_j)^2 - SG(x)^2``, ``e_j ~ N(0, stdev^2)``. All ``B * nt_samples``
noisy inputs go through ONE call of the method, so the path engine's chunking and memory
budget bound the whole computation (Captum's NoiseTunnel over IG batches them all at once).

Integer inputs (token ids) cannot take Gaussian noise. Over
:func:`~taylor_kernels.attr.layer.layer_integrated_gradients` the noise then goes on the
layer's activation (the embeddings): ``A_j = LIG`` from ``a(b)`` to ``a(x) + e_j``,
``e_j ~ N(0, stdev^2)`` of the activation's shape; any other method raises ``TypeError``.
"""
from __future__ import annotations

import inspect
import math
import numbers

import torch

from taylor_kernels.attr.integrated_gradients import AttributionResult
from taylor_kernels.attr.layer import layer_integrated_gradients
from taylor_kernels.engine import memory
from taylor_kernels.engine.guards import public_call, is_row_tensor
from taylor_kernels.engine.problem import as_tuple
from taylor_kernels.engine.thread_hooks import this_thread
from taylor_kernels.numerics import seeded_generator

NT_TYPES = ("smoothgrad", "smoothgrad_sq", "vargrad")


def _repeat_rows(value, B: int, n: int):
    """Repeat per-input values (tensors with batch dim B, lists of length B) n times each."""
    if is_row_tensor(value, B) and B > 1:
        return value.repeat_interleave(n, dim=0)
    if isinstance(value, list) and len(value) == B:
        return [v for v in value for _ in range(n)]
    if isinstance(value, tuple):
        return tuple(_repeat_rows(v, B, n) for v in value)
    return value


def _repeat_ends(value, tup: tuple[torch.Tensor, ...], n: int):
    """Baselines or references repeated ``n`` times per row where they are per row: a
    tensor with the batch first and at least its input's dimensions (``[B, ...]`` or
    ``[B, K, ...]``); one shaped like a single input (``[D]``, even with ``D == B``) or
    broadcast (``[1, ...]``) is shared by every copy."""
    if isinstance(value, tuple) and len(value) == len(tup):
        return tuple(_repeat_ends(v, (t,), n) for v, t in zip(value, tup))
    B = tup[0].shape[0]
    if is_row_tensor(value, B) and B > 1 and value.dim() >= tup[0].dim():
        return value.repeat_interleave(n, dim=0)
    return value


# the library methods' parameters that never hold per-row values
_SHARED = frozenset({"layer", "steps", "rule", "tol", "samples", "seed", "coalitions",
                     "feature_mask", "max_memory", "chunk_size", "backend", "progress"})


def _per_row_arguments(method, args: tuple, kwargs: dict, tup: tuple, n: int
                       ) -> tuple[tuple, dict]:
    """``args`` and ``kwargs`` of ``method(model, inputs, *args, **kwargs)`` (of
    ``layer_integrated_gradients``: ``layer`` first in ``args``) with their per-row values
    repeated for the ``n`` copies of each row: baselines and references by their shape
    (:func:`_repeat_ends`), a background set and the library's settings never; any other
    positional value (a user method's own names too) when it has ``B`` rows, and the
    keywords ``target`` and ``additional_forward_args`` so."""
    try:
        params = inspect.signature(method).parameters
    except (TypeError, ValueError):  # (no signature to read)
        params = {}
    names = [k for k, p in params.items() if p.kind in (p.POSITIONAL_ONLY,
                                                         p.POSITIONAL_OR_KEYWORD)]
    names = ["layer"] + names[3:] if method is layer_integrated_gradients else names[2:]
    B = tup[0].shape[0]

    def positional(name, value):
        if name in ("baselines", "reference"):
            return _repeat_ends(value, tup, n)
        if name == "background" or name in _SHARED:
            return value  # (a set of references, settings: shared by every copy)
        return _repeat_rows(value, B, n)  # (any other: per row if it has B rows, as before)

    def keyword(name, value):
        if name in ("baselines", "reference"):
            return _repeat_ends(value, tup, n)
        return _repeat_rows(value, B, n) if name in ("target", "additional_forward_args") \
            else value

    return (tuple(positional(names[i] if i < len(names) else None, a)
                  for i, a in enumerate(args)),
            {k: keyword(k, v) for k, v in kwargs.items()})


def _check_first_order(method, model) -> None:
    """Refuse, before any forward, a model given as the method (``noise_tunnel(model,
    tk.integrated_gradients, ...)`` failed inside the model's forward on ``target=``) and the
    second-order methods: they return interactions, not attributions (the call ran all of
    its noisy copies, then failed on ``.attributions``)."""
    import taylor_kernels
    public = getattr(taylor_kernels, getattr(model, "__name__", ""), None) is model
    if isinstance(method, torch.nn.Module) or not callable(method) or public:
        raise TypeError(f"noise_tunnel(method, model, inputs, ...) takes the attribution "
                        f"method first, e.g. noise_tunnel(tk.integrated_gradients, model, x); "
                        f"got method={_called(method)} and model={_called(model)}")
    from taylor_kernels.attr.group_hessians import group_integrated_hessians
    from taylor_kernels.attr.integrated_hessians import expected_hessians, integrated_hessians
    if method in (integrated_hessians, expected_hessians, group_integrated_hessians):
        raise TypeError(f"noise_tunnel averages attributions; {method.__name__} returns "
                        "interactions: smooth them by calling it on noisy inputs yourself, or "
                        "use a first-order method (integrated_gradients, expected_gradients, "
                        "layer_integrated_gradients, ...)")


def _called(v) -> str:
    """``v`` named for a message: a function's name, else its type's."""
    return getattr(v, "__name__", None) or type(v).__name__


@public_call
def noise_tunnel(method, model, inputs, *args, nt_type: str = "smoothgrad",
                 nt_samples: int = 5, stdevs=1.0, seed: int | None = None,
                 **kwargs) -> AttributionResult:
    """Average ``method`` (e.g. :func:`integrated_gradients`) over noisy copies of the inputs.

    Args:
        method: attribution function ``method(model, inputs, *args, **kwargs)``.
        nt_type: ``smoothgrad`` | ``smoothgrad_sq`` | ``vargrad``; nt_samples: noisy copies
            per input; stdevs: noise std (one per input tensor, or one for all; each a
            non-negative number, or a ``[B]`` tensor of per-row stds); seed: seeds the noise. Per-input arguments (baselines/reference ``[B, ...]``, target lists and
            tensors, ``additional_forward_args``) are repeated for each copy. Integer inputs
            (token ids) need ``method=layer_integrated_gradients`` and one stdev: the noise
            then goes on the layer's activation (module docstring).
    Returns:
        :class:`AttributionResult` aggregated over copies (``gap`` averaged over copies).
    """
    if nt_type not in NT_TYPES:
        raise ValueError(f"unknown nt_type {nt_type!r}; choose one of {NT_TYPES}")
    _check_first_order(method, model)
    if int(nt_samples) != nt_samples or nt_samples < 1:
        raise ValueError(f"nt_samples must be a positive integer, got {nt_samples}")
    tup, was_tuple = as_tuple(inputs)
    stds = stdevs if isinstance(stdevs, (tuple, list)) else (stdevs,) * len(tup)
    if len(stds) != len(tup):
        raise ValueError(f"{len(stds)} stdevs for {len(tup)} inputs")
    B = tup[0].shape[0]
    for s in stds:
        _check_stdev(s, B)
    gen = seeded_generator(seed)
    args, kwargs = _per_row_arguments(method, args, kwargs, tup, nt_samples)
    ids = [i for i, t in enumerate(tup) if not t.is_floating_point()]
    if ids:
        if method is not layer_integrated_gradients:
            raise TypeError(
                f"input {ids[0]} holds integer ids ({tup[ids[0]].dtype}); Gaussian noise cannot "
                "be added to ids: use noise_tunnel(tk.layer_integrated_gradients, model, ids, "
                "embedding_layer, ...) to put the noise on the embeddings")
        if any(isinstance(s, torch.Tensor) and s.dim() for s in stds) or \
                len(set(float(s) for s in stds)) != 1:
            raise ValueError("with integer ids the noise goes on the layer's activation: give "
                             f"one stdev, got {stdevs}")
        repeated = tuple(t.repeat_interleave(nt_samples, 0) for t in tup)
        res = _layer_ig_with_activation_noise(model, repeated, float(stds[0]), gen, args, kwargs)
        was_tuple = isinstance(res.attributions, tuple)
        return _aggregate(res, nt_type, B, nt_samples, was_tuple)
    noisy = tuple(t.detach().repeat_interleave(nt_samples, 0) + _per_copy(s, nt_samples, t) *
                  torch.randn((B * nt_samples,) + tuple(t.shape[1:]), generator=gen,
                              dtype=t.dtype).to(t.device)
                  for t, s in zip(tup, stds))
    inputs_n = noisy if was_tuple else noisy[0]
    if kwargs.get("max_memory") is not None:  # the copies are held beside the method's budget
        kwargs["max_memory"] = memory.beside(kwargs["max_memory"], (noisy, kwargs.get(
            "baselines"), kwargs.get("reference")), tup[0].device)
    if method is layer_integrated_gradients:  # its layer comes before the inputs: the call
        # form noise_tunnel(method, model, inputs, layer, ...) is the one of ids (noise on
        # the inputs here, as Captum's NoiseTunnel over LayerIntegratedGradients)
        if "layer" in kwargs:
            layer, rest = kwargs.pop("layer"), args
        elif args:
            layer, rest = args[0], args[1:]
        else:
            raise TypeError("noise_tunnel(layer_integrated_gradients, model, inputs, layer, "
                            "...): give the layer after the inputs (or layer=)")
        res = method(model, layer, inputs_n, *rest, **kwargs)
    else:
        res = method(model, inputs_n, *args, **kwargs)
    return _aggregate(res, nt_type, B, nt_samples, was_tuple)


def _check_stdev(s, B: int) -> None:
    """``ValueError`` unless ``s`` is a finite real >= 0 or a ``[B]`` tensor of them."""
    if isinstance(s, torch.Tensor) and s.dim() == 1 and s.shape[0] == B:
        ok = bool(torch.isfinite(s).all() and (s >= 0).all())
    elif isinstance(s, torch.Tensor) and s.dim() == 0 or isinstance(s, numbers.Real) and \
            not isinstance(s, bool):
        ok = math.isfinite(float(s)) and float(s) >= 0
    else:
        ok = False
    if not ok:
        raise ValueError(f"each stdev must be a finite number >= 0 or a [B] = [{B}] tensor of "
                         f"them, got {s!r}")


def _per_copy(s, n: int, t: torch.Tensor):
    """A stdev as the factor of the ``[B * n, ...]`` noise: a float, or a ``[B]`` tensor
    repeated per copy and shaped to broadcast over ``t``'s feature dimensions."""
    if isinstance(s, torch.Tensor) and s.dim() == 1:
        return s.to(t.device, t.dtype).repeat_interleave(n).reshape(-1, *[1] * (t.dim() - 1))
    return float(s)


def _aggregate(res: AttributionResult, nt_type: str, B: int, n: int,
               was_tuple: bool) -> AttributionResult:
    """Per-input statistics over the ``n`` copies of each of the ``B`` rows."""
    attrs = as_tuple(res.attributions)[0]
    out = []
    for a in attrs:
        a = a.reshape(B, n, *a.shape[1:])
        if nt_type == "smoothgrad":
            out.append(a.mean(1))
        elif nt_type == "smoothgrad_sq":
            out.append(a.pow(2).mean(1))
        else:
            out.append(a.pow(2).mean(1) - a.mean(1).pow(2))
    gap = res.gap.reshape(B, n).mean(1)
    return AttributionResult(tuple(out) if was_tuple else out[0], gap, res.evaluations)


def _layer_ig_with_activation_noise(model, ids: tuple, stdev: float, gen: torch.Generator,
                                    args: tuple, kwargs: dict) -> AttributionResult:
    """Layer IG of ``model`` at integer ``ids`` (copies already repeated) with ``e`` added to
    the layer's activation at the inputs only: from ``a(b)`` to ``a(x) + e``.

    The model gets one extra float input, ``copy`` (``r + 1`` at input row ``r``, 0 at its
    baseline), and a hook adds ``stdev * e[copy - 1]`` to the layer's activation of every row
    with ``copy > 0``, ``e [R, ...]`` drawn once from ``gen`` in the activation's shape (so the
    rows may come in any batch: alone, inputs beside baselines). Layer IG's own hook,
    registered after this one, replaces the activation on the path, so the path runs from
    ``a(b)`` to ``a(x) + e``.
    """
    names = ("layer", "baselines", "target")
    if len(args) > len(names):
        raise TypeError(f"layer_integrated_gradients takes at most {len(names)} positional "
                        f"arguments after the inputs, got {len(args)}")
    kwargs = dict(kwargs, **dict(zip(names, args)))
    layer, of_input = kwargs.pop("layer"), kwargs.get("attribute_to_layer_input", False)
    bls = kwargs.pop("baselines", None)
    bls = bls if isinstance(bls, tuple) else (bls,) * len(ids)
    rows = ids[0].shape[0]
    copy = torch.arange(1, rows + 1, dtype=torch.float64, device=ids[0].device)
    state: dict = {"copy": None, "noise": None}

    def with_copy(*inputs_copy_rest):
        state["copy"] = inputs_copy_rest[len(ids)]
        try:
            return model(*inputs_copy_rest[:len(ids)], *inputs_copy_rest[len(ids) + 1:])
        finally:
            state["copy"] = None

    def noisy(a: torch.Tensor) -> torch.Tensor:
        c = state["copy"]
        if c is None or c.shape[0] != a.shape[0]:
            return a  # not a forward of rows of this call
        if state["noise"] is None:  # row 0 is the baselines' (copy 0): no noise
            e = torch.randn((rows,) + tuple(a.shape[1:]), generator=gen, dtype=a.dtype)
            state["noise"] = torch.cat([torch.zeros_like(e[:1]), e]).to(a.device)
        return a + stdev * state["noise"][c.round().long().to(a.device)]

    hook = (layer.register_forward_pre_hook(this_thread(
                lambda m, inp: (noisy(inp[0]),) + tuple(inp[1:])))
            if of_input else layer.register_forward_hook(this_thread(lambda m, inp, out: noisy(out))))
    try:
        return layer_integrated_gradients(with_copy, layer, ids + (copy,),
                                          baselines=bls + (0.0,), **kwargs)
    finally:
        hook.remove()
