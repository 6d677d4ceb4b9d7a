"""Helpers shared by the Captum drop-in classes.

* Argument formatting the way Captum reads it (a tuple in gives a tuple out; baselines as
  None / numbers / tensors / tuples of these; additional forward args as one value or a tuple).
* Captum's row expansion for sampled methods: every per-example value (tensor with the batch
  as first dimension, list of length ``B``) is repeated ``n`` times per example
  (``repeat_interleave``), block by block.
* Captum's noise draw (``torch.normal`` on the global RNG, noise in the default dtype).
* :class:`Unscaled`: the reparametrisation that makes the path engine return integrated
  *gradients* (Captum's ``multiply_by_inputs=False``) without dividing by ``x - b``.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import torch


def captum_method(fn: Callable) -> Callable:
    """Wrap ``attribute`` so that it carries ``__wrapped__`` like Captum's ``@log_usage``
    methods: Captum's own ``NoiseTunnel`` calls ``attribute.__wrapped__`` on what it wraps."""

    @functools.wraps(fn)
    def attribute(*args, **kwargs):
        return fn(*args, **kwargs)

    return attribute


def format_inputs(inputs) -> tuple[tuple[torch.Tensor, ...], bool]:
    """``(tuple_of_tensors, was_tuple)``; Captum returns a tuple exactly when given one."""
    if isinstance(inputs, torch.Tensor):
        return (inputs,), False
    if isinstance(inputs, tuple) and inputs and all(isinstance(t, torch.Tensor) for t in inputs):
        return inputs, True
    raise ValueError("inputs must be a tensor or a non-empty tuple of tensors, got "
                     f"{type(inputs).__name__}")


def format_args(additional_forward_args) -> tuple:
    """Captum's convention: None -> (), a tuple as is, anything else -> a 1-tuple."""
    if additional_forward_args is None:
        return ()
    if isinstance(additional_forward_args, tuple):
        return additional_forward_args
    return (additional_forward_args,)


def per_input(value, n_inputs: int, name: str) -> tuple:
    """A per-input tuple: a tuple must have one entry per input; a single value is shared."""
    if isinstance(value, tuple):
        if len(value) != n_inputs:
            raise ValueError(f"{len(value)} {name} given for {n_inputs} inputs")
        return value
    return (value,) * n_inputs


def dense_baselines(baselines, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """Each input's baseline as a tensor of the input's shape (None = zeros, a number, or a
    tensor broadcastable to the input: ``[B|1, ...]`` or one example's shape)."""
    out = []
    for i, (b, x) in enumerate(zip(per_input(baselines, len(inputs), "baselines"), inputs)):
        if b is None or isinstance(b, (int, float)):
            out.append(torch.full_like(x, 0 if b is None else b))
        elif isinstance(b, torch.Tensor):
            try:
                out.append(b.to(device=x.device, dtype=x.dtype).expand_as(x))
            except RuntimeError as exc:
                raise ValueError(f"baseline {i} of shape {tuple(b.shape)} does not broadcast to "
                                 f"input {i} of shape {tuple(x.shape)}") from exc
        else:
            raise ValueError(f"baseline {i} must be None, a number or a tensor, got "
                             f"{type(b).__name__}")
    return tuple(out)


def expand_blocks(value: Any, B: int, sizes: list[int]) -> Any:
    """Captum's per-example expansion over blocks of ``sizes`` samples, concatenated.

    Within a block of ``n`` samples, row ``b`` becomes rows ``b*n .. b*n + n-1``
    (``repeat_interleave``); the blocks follow each other. Tensors whose first dimension is
    the batch (and lists of length ``B``) are expanded; tuples element by element; anything
    else (numbers, index tuples, ``[1, ...]`` tensors, flags) is shared by every row.
    """
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == B:
        return torch.cat([value.repeat_interleave(n, dim=0) for n in sizes], dim=0)
    if isinstance(value, list) and len(value) == B:
        return [v for n in sizes for v in value for _ in range(n)]
    if isinstance(value, tuple):
        return tuple(expand_blocks(v, B, sizes) for v in value)
    return value


def captum_noise(x: torch.Tensor, stdev: float, n: int) -> torch.Tensor:
    """``x`` repeated ``n`` times per row plus Gaussian noise, drawn exactly as Captum's
    ``NoiseTunnel`` draws it: one ``torch.normal(0, std)`` call on the global RNG with ``std``
    a tensor of the *default* dtype shaped like the expanded input (so under the same
    ``torch.manual_seed`` the noise is the same as Captum's, in the same order)."""
    size = (x.shape[0] * n,) + tuple(x.shape[1:])
    std = torch.full(size, float(stdev), dtype=torch.get_default_dtype(), device=x.device)
    return x.detach().repeat_interleave(n, dim=0) + torch.normal(0.0, std)


def check_stdevs(stdevs, n_inputs: int) -> tuple[float, ...]:
    """One non-negative float per input (a tuple, or one number for all)."""
    stds = per_input(stdevs, n_inputs, "stdevs")
    for s in stds:
        if isinstance(s, bool) or not isinstance(s, (int, float)) or s < 0:
            raise ValueError(f"stdevs must be non-negative numbers, got {stdevs!r}")
    return tuple(float(s) for s in stds)


class Unscaled:
    """Model in path-fraction coordinates: integrated gradients without the ``(x - b)`` factor.

    The path engine returns ``(x - b) * int_0^1 grad f(b + t (x - b)) dt`` (it multiplies by
    ``x - b`` in the fused accumulation). Captum's ``multiply_by_inputs=False`` wants the
    integral alone. Dividing by ``x - b`` is wrong where ``x == b``; instead we integrate in
    coordinates ``e`` running from ``0`` to ``1`` (so the engine's factor ``1 - 0`` is exactly
    one) and evaluate the model at ``p = b + stop(e) * (x - b) + (e - stop(e))``: its value is
    ``f(b + e (x - b))`` and its gradient with respect to ``e`` is ``grad f(p)`` itself
    (``e - stop(e)`` is zero with unit derivative). The engine then computes exactly
    ``sum_s w_s grad f(b + t_s (x - b))`` with every rule, chunking and budget it has.

    Call signature (as the engine calls models): ``(*e, *b, *d, *rest)`` with ``n`` tensors
    each of ``e`` (path coordinates), ``b`` (baselines) and ``d = x - b`` (rows of the batch,
    passed as additional forward args so the engine selects each point's rows), then the
    model's own additional arguments.
    """

    def __init__(self, model: Callable, n: int):
        self.model, self.n = model, n

    def __call__(self, *args):
        n = self.n
        es, bs, ds, rest = args[:n], args[n:2 * n], args[2 * n:3 * n], args[3 * n:]
        points = tuple(b + e.detach() * d + (e - e.detach()) for e, b, d in zip(es, bs, ds))
        return self.model(*points, *rest)

    @staticmethod
    def arguments(inputs: tuple[torch.Tensor, ...], baselines: tuple[torch.Tensor, ...],
                  rest: tuple) -> tuple[tuple[torch.Tensor, ...], tuple]:
        """``(e_inputs, additional_forward_args)`` for the engine: ``e = 1`` per input (the
        engine's baseline is 0), and ``(*b, *(x - b), *rest)``; baselines dense ``[B, ...]``."""
        ones = tuple(torch.ones_like(x) for x in inputs)
        diffs = tuple((x.detach() - b).contiguous() for x, b in zip(inputs, baselines))
        return ones, tuple(b.contiguous() for b in baselines) + diffs + tuple(rest)
