"""Rules of the exact path engine: how each op maps an affine piece along a straight path.

Along ``p(t) = b + t (x - b)`` every tensor of a piecewise-linear network is affine in ``t``
between two kinks: ``h(t) = v + (t - t0) s``. A :class:`Pair` carries ``(v, s)`` at the row's
current ``t0``. Affine ops map pairs exactly (``s`` goes through the linear part only: no bias,
no additive constant). A piecewise op picks, per unit, the piece that holds just after ``t0``
(decided at ``t0 + ETA``, so a unit sitting on a kink at ``t0`` takes the piece it enters) and
reports the distance ``dt > ETA`` to its next kink (ReLU-like: ``v + dt s = threshold``; max
pooling: the next ``dt`` where another window entry overtakes the current argmax). The
smallest ``dt`` over all units of a row is the row's next breakpoint (:class:`Kinks`).

``affine`` marks tensors that are affine in ``t`` on the whole path (nothing piecewise
upstream); their kinks are known for the whole path at once and become split points.
Any op without a rule here raises :class:`NotPiecewiseLinear`.
"""
from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils import _pytree as pytree

from taylor_kernels.models.module_kinds import runs_torch_forward

ETA = 1e-12  # smallest region length in t; decides pieces at t0 + ETA (see module docstring)


class NotPiecewiseLinear(Exception):
    """The model contains an op that is not piecewise-linear (or not supported here);
    ``reason`` says which (``torch.fx`` appends graph details to the message itself)."""

    def __init__(self, reason: str, cached: bool = False):
        super().__init__(reason)
        self.reason, self.cached = reason, cached  # (cached: found on a cached trace)


class Pair:
    """``(v, s)``: value at the row's ``t0`` and slope ``d/dt``; ``affine``: affine on all of
    ``[0, 1]``."""

    __slots__ = ("v", "s", "affine")

    def __init__(self, v: torch.Tensor, s: torch.Tensor, affine: bool):
        self.v, self.s, self.affine = v, s, affine


class Kinks:
    """Kinks met by ``N`` rows in one forward.

    Pass 0 (``splits=True``, rows at ``t0 = 0``): records every kink of globally affine tensors
    in ``(ETA, 1 - ETA)`` as ``splits`` ``[(rows, t)]`` and which graph nodes have kinks
    (``nodes``: node -> elementwise). Later passes ignore globally affine kinks (the splits are
    segment boundaries) and collect, for the ``terminal`` nodes (elementwise, with no kink
    downstream: their switches change no other unit), every crossing as ``multi``
    ``[(rows, dt)]``; all other kinks give the per-row minimum ``dt [N]``.
    """

    def __init__(self, n: int, device, splits: bool = False, terminal=frozenset(),
                 limit: torch.Tensor | None = None):
        self.dt = torch.full((n,), float("inf"), dtype=torch.float64, device=device)
        self.splits: list[tuple[torch.Tensor, torch.Tensor]] | None = [] if splits else None
        self.terminal = terminal
        self.limit = limit  # [N] the rows' segment lengths: terminal crossings past them are
        # not kept (every crossing of the whole line was: 8 MB for a 256-unit MLP's segments)
        self.multi: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.nodes: dict = {}

    def add(self, node, affine: bool, distances, elementwise: bool = True) -> None:
        """Kinks of ``node``: ``distances()`` gives the candidate ``dt [N, ...]`` (``inf`` or
        ``<= ETA``: no kink); it is not called when the kinks are already known."""
        self.nodes[node] = elementwise and self.nodes.get(node, True)
        if affine and self.splits is None:
            return
        dt, n = distances(), self.dt.shape[0]
        if dt.dim() == 0 or dt.shape[0] != n:
            raise NotPiecewiseLinear(f"a tensor of shape {tuple(dt.shape)} lost the batch "
                                     f"dimension ({n} rows)")
        dt = torch.where(dt > ETA, dt, torch.inf).reshape(n, -1)
        if self.splits is not None:
            if affine:
                row, col = ((dt < 1 - ETA) & torch.isfinite(dt)).nonzero(as_tuple=True)
                self.splits.append((row, dt[row, col]))
        elif node in self.terminal:
            within = torch.isfinite(dt) if self.limit is None else dt < self.limit[:, None]
            row, col = within.nonzero(as_tuple=True)
            self.multi.append((row, dt[row, col]))
            return
        if dt.shape[1]:
            self.dt = torch.minimum(self.dt, dt.min(dim=1).values)


def has_pair(args, kwargs) -> bool:
    """Whether a pair is among the arguments (or inside a list/tuple argument)."""
    for a in (*args, *kwargs.values()):
        if isinstance(a, Pair) or isinstance(a, (list, tuple)) and any(
                isinstance(b, Pair) for b in a):
            return True
    return False


def _pairs(tree) -> list[Pair]:
    return [a for a in pytree.tree_leaves(tree) if isinstance(a, Pair)]


def _wrap(vo, so, affine: bool):
    """Zip value and slope outputs (tensor, or tuple/list of tensors) into pairs."""
    if isinstance(vo, torch.Tensor):
        return Pair(vo, so, affine)
    if isinstance(vo, (tuple, list)):
        return type(vo)(_wrap(a, b, affine) for a, b in zip(vo, so))
    return vo


def structural(fn):
    """A rule for an op linear in all its float tensor arguments (views, cat, pooling means,
    padding with zeros, sums): values through ``fn``; slopes through ``fn`` with every float
    constant replaced by zeros."""

    def rule(ctx, *args, **kwargs):
        vargs = pytree.tree_map(lambda a: a.v if isinstance(a, Pair) else a, (args, kwargs))
        sargs = pytree.tree_map(lambda a: a.s if isinstance(a, Pair) else (
            torch.zeros_like(a) if isinstance(a, torch.Tensor) and a.is_floating_point()
            else a), (args, kwargs))
        affine = all(p.affine for p in _pairs((args, kwargs)))
        return _wrap(fn(*vargs[0], **vargs[1]), fn(*sargs[0], **sargs[1]), affine)

    return rule


def constant_like(fn):
    """``zeros_like``/``new_zeros``...: a constant shaped like the pair (no slope)."""
    return lambda ctx, x, *args, **kwargs: fn(x.v, *args, **kwargs)


def identity(ctx, x, *args, **kwargs):
    """Dtype and device casts, eval-mode dropout, detach: the pair unchanged (float64)."""
    return x


def cast(ctx, x, *args, **kwargs):
    """``.to(...)``/``.type_as(other)``: the pair unchanged to a floating dtype (the path
    runs in float64); to an integer or bool dtype a step at every integer, which no piece
    here follows (:class:`NotPiecewiseLinear`)."""
    dtypes = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.dtype)] + \
        [a.dtype for a in args if isinstance(a, torch.Tensor)]
    if dtypes and not (dtypes[0].is_floating_point or dtypes[0].is_complex):
        raise NotPiecewiseLinear(f"a cast to {dtypes[0]} (piecewise constant, a step at every "
                                 "integer)")
    return x


def _add(ctx, a, b, alpha=1, sign=1):
    scale = alpha * sign
    if isinstance(a, Pair) and isinstance(b, Pair):
        return Pair(a.v + scale * b.v, a.s + scale * b.s, a.affine and b.affine)
    if isinstance(a, Pair):
        return Pair(a.v + scale * b, a.s, a.affine)
    return Pair(a + scale * b.v, scale * b.s, b.affine)


def add(ctx, a, b, *, alpha=1):
    return _add(ctx, a, b, alpha)


def sub(ctx, a, b, *, alpha=1):
    return _add(ctx, a, b, alpha, sign=-1)


def neg(ctx, a):
    return Pair(-a.v, -a.s, a.affine)


def _one_pair(a, b, what: str) -> tuple[Pair, object, bool]:
    if isinstance(a, Pair) and isinstance(b, Pair):
        raise NotPiecewiseLinear(f"{what} of two path-dependent tensors (not piecewise-linear)")
    return (a, b, True) if isinstance(a, Pair) else (b, a, False)


def mul(ctx, a, b):
    p, c, _ = _one_pair(a, b, "product")
    return Pair(p.v * c, p.s * c, p.affine)


def div(ctx, a, b, *, rounding_mode=None):
    if not isinstance(a, Pair) or isinstance(b, Pair) or rounding_mode is not None:
        raise NotPiecewiseLinear("division by a path-dependent tensor (not piecewise-linear)")
    return Pair(a.v / b, a.s / b, a.affine)


def matmul(ctx, a, b):
    p, c, left = _one_pair(a, b, "matrix product")
    if left:
        return Pair(p.v @ c, p.s @ c, p.affine)
    return Pair(c @ p.v, c @ p.s, p.affine)


def weighted(fn):
    """``fn(input, weight, bias=None, *rest)`` (linear, convolutions): slopes without bias."""

    def rule(ctx, x, weight, bias=None, *rest, **kwargs):
        if not isinstance(x, Pair) or isinstance(weight, Pair) or isinstance(bias, Pair):
            raise NotPiecewiseLinear(f"{fn.__name__} with a path-dependent weight")
        return Pair(fn(x.v, weight, bias, *rest, **kwargs), fn(x.s, weight, None, *rest,
                                                                **kwargs), x.affine)

    return rule


def batch_norm(ctx, x, mean, var, weight=None, bias=None, training=False, momentum=0.1,
               eps=1e-5):
    """Eval-mode batch norm: ``v`` normalised with the running statistics, ``s`` scaled."""
    if training or mean is None or var is None:
        raise NotPiecewiseLinear("batch norm with batch statistics (call model.eval())")
    v = F.batch_norm(x.v, mean, var, weight, bias, False, 0.0, eps)
    s = F.batch_norm(x.s, torch.zeros_like(mean), var, weight, None, False, 0.0, eps)
    return Pair(v, s, x.affine)


def pad(ctx, x, pad_, mode="constant", value=None):
    if mode != "constant":
        return structural(F.pad)(ctx, x, pad_, mode)
    return Pair(F.pad(x.v, pad_, value=value or 0.0), F.pad(x.s, pad_), x.affine)


def dropout(ctx, x, p=0.5, training=False, inplace=False):
    if training and p > 0:
        raise NotPiecewiseLinear("dropout in training mode (call model.eval())")
    return x


# ---- piecewise-linear elementwise ops --------------------------------------------------------

def _kink(ctx, x: Pair, threshold) -> None:
    """Record where ``v + dt s`` reaches ``threshold`` (a number or a broadcastable tensor)."""
    ctx.kinks.add(ctx.node, x.affine,
                  lambda: torch.where(x.s != 0, (threshold - x.v) / x.s, torch.inf))


def _ahead(x: Pair) -> torch.Tensor:
    return x.v + ETA * x.s


def _scaled_where(x: Pair, keep: torch.Tensor, other) -> Pair:
    """``keep``: identity; elsewhere multiply by ``other`` (a number or tensor)."""
    return Pair(torch.where(keep, x.v, other * x.v), torch.where(keep, x.s, other * x.s), False)


def relu(ctx, x, inplace=False):
    _kink(ctx, x, 0.0)
    return _scaled_where(x, _ahead(x) > 0, 0.0)


def leaky_relu(ctx, x, negative_slope=0.01, inplace=False):
    _kink(ctx, x, 0.0)
    return _scaled_where(x, _ahead(x) > 0, negative_slope)


def prelu(ctx, x, weight):
    if isinstance(weight, Pair):
        raise NotPiecewiseLinear("prelu with a path-dependent weight")
    w = weight.reshape((1, -1) + (1,) * (x.v.dim() - 2)) if x.v.dim() >= 2 else weight
    _kink(ctx, x, 0.0)
    return _scaled_where(x, _ahead(x) > 0, w)


def abs_(ctx, x):
    _kink(ctx, x, 0.0)
    return _scaled_where(x, _ahead(x) >= 0, -1.0)


def clamp(ctx, x, min=None, max=None):
    """``clamp``/``hardtanh``: constant ``min`` below, ``max`` above (either may be None)."""
    if isinstance(min, Pair) or isinstance(max, Pair):
        raise NotPiecewiseLinear("clamp with path-dependent bounds")
    ahead, v, s = _ahead(x), x.v, x.s
    for bound, outside in ((min, ahead < min if min is not None else None),
                           (max, ahead > max if max is not None else None)):
        if bound is None:
            continue
        _kink(ctx, x, bound)
        bound_t = torch.as_tensor(bound, dtype=v.dtype, device=v.device)
        v = torch.where(outside, bound_t, v)
        s = torch.where(outside, torch.zeros((), dtype=s.dtype, device=s.device), s)
    return Pair(v, s, False)


def hardtanh(ctx, x, min_val=-1.0, max_val=1.0, inplace=False):
    return clamp(ctx, x, min_val, max_val)


def relu6(ctx, x, inplace=False):
    return clamp(ctx, x, 0.0, 6.0)


def clamp_min(ctx, x, min):
    return clamp(ctx, x, min, None)


def clamp_max(ctx, x, max):
    return clamp(ctx, x, None, max)


# ---- max pooling ------------------------------------------------------------------------------

def _tuple(v, n: int) -> tuple[int, ...]:
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * n


def windows(t: torch.Tensor, kernel, stride, padding, dilation, ceil_mode: bool,
            fill: float) -> torch.Tensor:
    """``[N, C, *L]`` -> ``[N, C, *out, prod(kernel)]``: the pooling windows (padding ``fill``),
    with PyTorch's output sizes (``ceil_mode``: the last window starts inside the input)."""
    n = len(kernel)
    pads, sizes = [], []
    for i in range(n):
        L, k, s, p, d = t.shape[t.dim() - n + i], kernel[i], stride[i], padding[i], dilation[i]
        span = d * (k - 1) + 1
        num = L + 2 * p - span
        out = (-(-num // s) if ceil_mode else num // s) + 1
        if ceil_mode and (out - 1) * s >= L + p:
            out -= 1
        extra = max(0, (out - 1) * s + span - (L + 2 * p))
        pads.append((p, p + extra))
        sizes.append((span, s, d))
    t = F.pad(t, [v for pr in reversed(pads) for v in pr], value=fill)
    lead = t.dim() - n
    for i, (span, s, _) in enumerate(sizes):
        t = t.unfold(lead + i, span, s)
    index = (Ellipsis,) + tuple(slice(None, None, d) for _, _, d in sizes)
    t = t[index]
    return t.reshape(*t.shape[:t.dim() - n], -1)


def max_pool(n: int):
    """``max_pool{n}d``: the entry of each window that is largest just after ``t0``; kinks
    where another entry with a larger slope catches up with it."""

    def rule(ctx, x, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False,
             return_indices=False):
        if return_indices:
            raise NotPiecewiseLinear("max pooling with return_indices=True")
        k = _tuple(kernel_size, n)
        st = _tuple(stride if stride not in (None, []) else k, n)
        args = (k, st, _tuple(padding, n), _tuple(dilation, n), ceil_mode)
        vw = windows(x.v, *args, fill=-torch.inf)
        sw = windows(x.s, *args, fill=0.0)
        idx = (vw + ETA * sw).argmax(dim=-1, keepdim=True)
        vi, si = vw.gather(-1, idx), sw.gather(-1, idx)
        gain = sw - si
        ctx.kinks.add(ctx.node, False, lambda: torch.where(gain > 0, (vi - vw) / gain,
                                                             torch.inf), elementwise=False)
        return Pair(vi.squeeze(-1), si.squeeze(-1), False)

    return rule


# ---- tables -----------------------------------------------------------------------------------

_STRUCTURAL_FUNCTIONS = [
    torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze, torch.permute,
    torch.transpose, torch.cat, torch.stack, torch.split, torch.chunk, torch.unbind,
    torch.narrow, torch.flip, torch.roll, torch.sum, torch.mean, torch.t, torch.movedim,
    operator.getitem, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d,
    F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.interpolate]
FUNCTIONS = {f: structural(f) for f in _STRUCTURAL_FUNCTIONS}
FUNCTIONS.update({
    operator.add: add, operator.iadd: add, torch.add: add, operator.sub: sub,
    operator.isub: sub, torch.sub: sub, operator.neg: neg, torch.neg: neg,
    operator.mul: mul, operator.imul: mul, torch.mul: mul, operator.truediv: div,
    operator.itruediv: div, torch.div: div, operator.matmul: matmul, torch.matmul: matmul,
    torch.mm: matmul, torch.bmm: matmul, F.linear: weighted(F.linear),
    F.conv1d: weighted(F.conv1d), F.conv2d: weighted(F.conv2d), F.conv3d: weighted(F.conv3d),
    F.batch_norm: batch_norm, F.pad: pad, F.dropout: dropout, F.dropout1d: dropout,
    F.dropout2d: dropout, F.dropout3d: dropout, F.alpha_dropout: dropout,
    F.feature_alpha_dropout: dropout, torch.relu: relu, F.relu: relu, torch.relu_: relu,
    F.leaky_relu: leaky_relu, F.prelu: prelu, torch.prelu: prelu, F.hardtanh: hardtanh,
    F.relu6: relu6, torch.clamp: clamp, torch.clip: clamp, torch.clamp_min: clamp_min,
    torch.clamp_max: clamp_max, torch.abs: abs_, F.max_pool1d: max_pool(1),
    F.max_pool2d: max_pool(2), F.max_pool3d: max_pool(3)})
FUNCTIONS.update({f: constant_like(f) for f in (torch.zeros_like, torch.ones_like,
                                                torch.full_like, torch.empty_like)})

_STRUCTURAL_METHODS = ("view", "reshape", "flatten", "permute", "transpose", "t", "contiguous",
                       "squeeze", "unsqueeze", "expand", "expand_as", "repeat", "narrow",
                       "chunk", "split", "unbind", "flip", "roll", "sum", "mean", "movedim",
                       "view_as", "reshape_as", "unflatten")
METHODS = {m: structural(lambda t, *a, _m=m, **k: getattr(t, _m)(*a, **k))
           for m in _STRUCTURAL_METHODS}
METHODS.update({m: identity for m in ("detach", "clone", "float", "double", "half",
                                      "bfloat16", "cpu", "cuda")})
METHODS.update({"to": cast, "type_as": cast})
METHODS.update({"add": add, "add_": add, "sub": sub, "sub_": sub, "neg": neg, "mul": mul,
                "mul_": mul, "div": div, "div_": div, "matmul": matmul, "relu": relu,
                "relu_": relu, "clamp": clamp, "clamp_": clamp, "clip": clamp,
                "clamp_min": clamp_min, "clamp_max": clamp_max, "abs": abs_})
METHODS.update({m: constant_like(lambda t, *a, _m=m, **k: getattr(t, _m)(*a, **k))
                for m in ("new_zeros", "new_ones", "new_full", "new_empty")})
SHAPE_METHODS = ("size", "dim", "numel", "ndimension", "nelement")


def module_rule(mod: nn.Module, const):
    """The rule for a leaf module (``const`` casts its parameters to float64), or None (also
    for a subclass of a ``torch.nn`` layer that overrides its ``forward``)."""
    if not runs_torch_forward(mod):
        return None
    if isinstance(mod, nn.Linear):
        return lambda ctx, x: weighted(F.linear)(ctx, x, const(mod.weight), const(mod.bias))
    if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        conv = weighted(lambda i, w, b: mod._conv_forward(i, w, b))
        return lambda ctx, x: conv(ctx, x, const(mod.weight), const(mod.bias))
    if isinstance(mod, nn.modules.batchnorm._BatchNorm):
        if mod.training or mod.running_mean is None:
            raise NotPiecewiseLinear(f"{type(mod).__name__} uses batch statistics (training "
                                     "mode or track_running_stats=False)")
        return lambda ctx, x: batch_norm(ctx, x, const(mod.running_mean),
                                         const(mod.running_var), const(mod.weight),
                                         const(mod.bias), False, 0.0, mod.eps)
    if isinstance(mod, nn.ReLU):
        return relu
    if isinstance(mod, nn.LeakyReLU):
        return lambda ctx, x: leaky_relu(ctx, x, mod.negative_slope)
    if isinstance(mod, nn.PReLU):
        return lambda ctx, x: prelu(ctx, x, const(mod.weight))
    if isinstance(mod, nn.Hardtanh):  # ReLU6 included
        return lambda ctx, x: clamp(ctx, x, mod.min_val, mod.max_val)
    for n, cls in enumerate((nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d), start=1):
        if isinstance(mod, cls):
            return lambda ctx, x: max_pool(n)(ctx, x, mod.kernel_size, mod.stride, mod.padding,
                                              mod.dilation, mod.ceil_mode, mod.return_indices)
    if isinstance(mod, nn.modules.dropout._DropoutNd):
        return lambda ctx, x: dropout(ctx, x, mod.p, mod.training)
    if isinstance(mod, (nn.Flatten, nn.Unflatten, nn.Identity, nn.Upsample,
                        nn.modules.pooling._AvgPoolNd, nn.modules.pooling._AdaptiveAvgPoolNd,
                        nn.ZeroPad2d, nn.ReflectionPad1d, nn.ReflectionPad2d,
                        nn.ReplicationPad1d, nn.ReplicationPad2d)):
        return structural(mod)
    return None
