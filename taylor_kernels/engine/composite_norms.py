"""Layer and instance normalisation as composite ops, for derivatives of order three and up.

PyTorch's own derivative formulas for ``layer_norm`` and ``instance_norm`` are right to second
order by reverse mode (Hessians, HVPs, the double backward of DAPr) but not beyond, nor under
nested forward mode: on a ``Linear -> LayerNorm -> Tanh -> Linear`` net in float64 (torch
2.13), nested ``jvp`` is 35% off finite differences at second order and 85% at third, reverse
mode cubed 6%; ``instance_norm`` is off by factors (``group_norm``, ``rms_norm``, softmax,
``normalize`` and the math attention are right). Within :func:`composite_norms`, calls of
``torch.nn.functional.layer_norm`` / ``instance_norm`` (what ``nn.LayerNorm``,
``nn.InstanceNorm*d`` and Hugging Face models call) run as ``mean``, ``rsqrt`` and products,
whose derivatives autograd composes exactly at every order. Low-precision inputs are
normalised in float32 as the fused kernels do. :func:`composite_group_norm` does the same for
``group_norm``, for Hessian-vector products batched over directions (see there).
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode


def _normalize(x: torch.Tensor, dims: tuple[int, ...], eps: float) -> torch.Tensor:
    """``(x - mean) / sqrt(var + eps)`` over ``dims`` (biased variance), in float32 or wider."""
    work = x if x.dtype in (torch.float32, torch.float64) else x.float()
    centred = work - work.mean(dims, keepdim=True)
    var = (centred * centred).mean(dims, keepdim=True)
    return (centred * torch.rsqrt(var + eps)).to(x.dtype)


def layer_norm(input, normalized_shape, weight=None, bias=None, eps: float = 1e-5):
    """``F.layer_norm`` from composite ops (same arguments)."""
    n = len(normalized_shape) if isinstance(normalized_shape, (tuple, list, torch.Size)) else 1
    y = _normalize(input, tuple(range(-n, 0)), eps)
    if weight is not None:
        y = y * weight
    return y if bias is None else y + bias


def instance_norm(input, running_mean=None, running_var=None, weight=None, bias=None,
                  use_input_stats: bool = True, momentum: float = 0.1, eps: float = 1e-5):
    """``F.instance_norm`` with the input's statistics from composite ops (``[N, C, ...]``,
    per sample and channel); with ``use_input_stats=False`` the original (linear in the
    input). Running statistics are not updated here (attribution keeps buffers as they were)."""
    if not use_input_stats:
        return F.instance_norm(input, running_mean, running_var, weight, bias, False,
                               momentum, eps)
    y = _normalize(input, tuple(range(2, input.dim())), eps)
    shape = (1, -1) + (1,) * (input.dim() - 2)
    if weight is not None:
        y = y * weight.reshape(shape)
    return y if bias is None else y + bias.reshape(shape)


def group_norm(input, num_groups: int, weight=None, bias=None, eps: float = 1e-5):
    """``F.group_norm`` from composite ops (same arguments; ``[N, C, ...]``, statistics per
    sample over each group of ``C / num_groups`` channels and all positions)."""
    N, C = input.shape[:2]
    y = _normalize(input.reshape(N, num_groups, -1), (2,), eps).reshape(input.shape)
    shape = (1, -1) + (1,) * (input.dim() - 2)
    if weight is not None:
        y = y * weight.reshape(shape)
    return y if bias is None else y + bias.reshape(shape)


def _torch_layer_norm(input, normalized_shape, weight=None, bias=None, eps: float = 1e-5,
                      cudnn_enable: bool = True):
    return layer_norm(input, normalized_shape, weight, bias, eps)


def _torch_group_norm(input, num_groups: int, weight=None, bias=None, eps: float = 1e-5,
                      cudnn_enabled: bool = True):
    return group_norm(input, num_groups, weight, bias, eps)


_LAYER_INSTANCE = {F.layer_norm: layer_norm, torch.layer_norm: _torch_layer_norm,
                   F.instance_norm: instance_norm}
_GROUP = {F.group_norm: group_norm, torch.group_norm: _torch_group_norm}


class _Composite(TorchFunctionMode):
    def __init__(self, replaced: dict):
        super().__init__()
        self.replaced = replaced

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return self.replaced.get(func, func)(*args, **(kwargs or {}))


@contextlib.contextmanager
def composite_norms():
    """Within the block, layer and instance normalisation run as composite ops (see the
    module docstring); nothing else changes."""
    with _Composite(_LAYER_INSTANCE):
        yield


@contextlib.contextmanager
def composite_group_norm():
    """Within the block, group normalisation runs as composite ops: vmap batches the double
    backward of ``group_norm`` wrongly (``is_grads_batched`` Hessian-vector products of a
    ``GroupNorm(2, 4)`` on ``[4, 2]`` maps 2.8 off one backward per direction, torch 2.13, no
    error; a spatial size of 1 raised a shape mismatch instead), while autograd composes the
    composite ops' exactly."""
    with _Composite(_GROUP):
        yield
