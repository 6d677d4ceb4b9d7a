"""Propagation rules of the jet engine: how one op maps truncated Taylor series.

A :class:`Jet` wraps ``c [J+1, *shape]``: the normalized coefficients of an activation of shape
``shape`` along a curve ``t -> x + t v``. Rules (``RULES`` by function / method name /
module type) receive the op's arguments with :class:`Jet` values where the activation depends
on ``t`` and plain tensors elsewhere, and return the output jet:

- linear maps (linear, conv, pooling, reshapes, sums, cat, ...) act per coefficient, their
  bias only on order 0; a max pool keeps the argmax of the order-0 term;
- products use the Cauchy product (``jet_mul``; matmul/bmm by the same sum over orders);
- elementwise functions use ``jet_unary`` (all orders in one pass);
- softmax = ``exp(x - max x_0) * reciprocal(sum exp)``; layer norm through ``rsqrt`` of the
  variance jet; batch norm (eval) is affine; scaled dot-product attention is composed from the
  matmul and softmax rules.
"""
from __future__ import annotations

import math
import operator

import torch
import torch.nn.functional as F
from torch import nn

from taylor_kernels import ops


class Jet:
    """Truncated Taylor series of one activation: ``c [J+1, *shape]``, normalized coefficients."""

    __slots__ = ("c",)

    def __init__(self, c: torch.Tensor):
        self.c = c

    @property
    def order(self) -> int:
        return self.c.shape[0] - 1

    def __repr__(self) -> str:
        return f"Jet(order={self.order}, shape={tuple(self.c.shape[1:])})"


def as_jet(x, order: int, like: torch.Tensor | None = None) -> Jet:
    """A constant (tensor or number) as a jet with zero coefficients of order >= 1."""
    if isinstance(x, Jet):
        return x
    x = torch.as_tensor(x, dtype=like.dtype if like is not None else None,
                        device=like.device if like is not None else None)
    c = torch.zeros((order + 1,) + tuple(x.shape), dtype=x.dtype, device=x.device)
    c[0] = x
    return Jet(c)


def _order_of(args) -> int:
    return next(a.order for a in args if isinstance(a, Jet))


def _broadcast(a: Jet, b: Jet) -> tuple[torch.Tensor, torch.Tensor]:
    shape = torch.broadcast_shapes(a.c.shape[1:], b.c.shape[1:])
    J = a.c.shape[0]
    return (a.c.reshape((J,) + (1,) * (len(shape) + 1 - a.c.dim()) + a.c.shape[1:]).expand(
                (J,) + shape),
            b.c.reshape((J,) + (1,) * (len(shape) + 1 - b.c.dim()) + b.c.shape[1:]).expand(
                (J,) + shape))


def unary(fn: str, x: Jet) -> Jet:
    """``fn`` elementwise on a jet, every order in one ``jet_unary`` call."""
    J = x.c.shape[0]
    return Jet(ops.jet_unary(fn, x.c.reshape(J, -1)).view(x.c.shape))


def _coefficients_for(c: torch.Tensor, const) -> torch.Tensor:
    """``c [J+1, *shape]`` with unit dims after the order axis so that a constant of higher
    rank than one coefficient broadcasts against the coefficients, not against the order
    axis (``x * W`` with ``W [H, 1, E]`` and ``x [L, E]``)."""
    extra = const.dim() - (c.dim() - 1) if torch.is_tensor(const) else 0
    return c.reshape(c.shape[0], *(1,) * extra, *c.shape[1:]) if extra > 0 else c


def mul(a, b) -> Jet:
    """Elementwise product; Cauchy product when both are jets, else per coefficient."""
    if not isinstance(a, Jet) or not isinstance(b, Jet):
        jet, const = (a, b) if isinstance(a, Jet) else (b, a)
        return Jet(_coefficients_for(jet.c, const) * const)
    ca, cb = _broadcast(a, b)
    J = ca.shape[0]
    return Jet(ops.jet_mul(ca.reshape(J, -1), cb.reshape(J, -1)).view(ca.shape))


def add(a, b, alpha=1) -> Jet:
    """``a + alpha b``; a constant only shifts order 0."""
    if not isinstance(a, Jet):
        return add(Jet(alpha * b.c), a)
    if isinstance(b, Jet):
        ca, cb = _broadcast(a, b)
        return Jet(ca + alpha * cb)
    shape = torch.broadcast_shapes(a.c.shape[1:], torch.as_tensor(b).shape)
    c = _coefficients_for(a.c, b).expand((a.c.shape[0],) + shape).clone()
    c[0] = c[0] + alpha * b
    return Jet(c)


def sub(a, b, alpha=1) -> Jet:
    """``a - alpha b``."""
    return add(a, b, alpha=-alpha)


def rsub(a, b, alpha=1) -> Jet:
    """``b - alpha a`` (``torch.rsub``, ``a.__rsub__(b)``)."""
    return sub(b, a, alpha=alpha)


def neg(a: Jet) -> Jet:
    return Jet(-a.c)


def div(a, b) -> Jet:
    """``a / b``: per coefficient for a constant divisor, else ``a * reciprocal(b)``."""
    if not isinstance(b, Jet):
        return Jet(_coefficients_for(a.c, b) / b)
    return mul(a, unary("reciprocal", b))


def power(a: Jet, p) -> Jet:
    """``a ** p``: integer exponents by products (and a reciprocal when negative: any sign of
    ``a``), 1/2 and -1/2 by their own rules, other exponents as ``exp(p log a)`` (``a > 0``, as
    ``torch.pow`` is NaN below 0 there too)."""
    named = {2: "square", -1: "reciprocal", 0.5: "sqrt", -0.5: "rsqrt"}
    if isinstance(p, Jet) or torch.is_tensor(p):
        raise NotImplementedError("jet of a tensor exponent")
    if p in named:
        return unary(named[p], a)
    if p == 1:
        return a
    if p == 0:
        return as_jet(torch.ones_like(a.c[0]), a.order)
    if float(p).is_integer() and p > 2:
        out = a
        for _ in range(int(p) - 1):
            out = mul(out, a)
        return out
    if float(p).is_integer():  # p <= -2: exp(p log a) was NaN for a < 0
        return unary("reciprocal", power(a, -int(p)))
    return unary("exp", Jet(p * unary("log", a).c))


def matmul(a, b) -> Jet:
    """``a @ b``: ``c_k = sum_j a_j @ b_{k-j}`` for two jets, per coefficient otherwise (in
    one batched product when the order axis can be a batch axis: a matrix constant against a
    jet of matrices; a constant with batch dimensions broadcast them against the order axis)."""
    if not isinstance(a, Jet) or not isinstance(b, Jet):
        jet, const = (a, b) if isinstance(a, Jet) else (b, a)
        if jet.c.dim() >= 3 and torch.as_tensor(const).dim() <= 2:
            return Jet(torch.matmul(a.c, b) if jet is a else torch.matmul(a, b.c))
        return per_coefficient(torch.matmul, (a, b), {})
    J = a.order
    out = [sum(torch.matmul(a.c[j], b.c[k - j]) for j in range(k + 1)) for k in range(J + 1)]
    return Jet(torch.stack(out))


def per_coefficient(fn, args, kwargs):
    """Apply an op that is linear in its jet arguments to each coefficient separately.

    Constant tensors inside list arguments (``torch.cat([jet, const])``) become zero-order jets.
    Tuple outputs (``chunk``, ``split``) come back as tuples of jets.
    """
    J = _order_of([a for a in args if isinstance(a, Jet)] +
                  [a for arg in args if isinstance(arg, (list, tuple)) for a in arg
                   if isinstance(a, Jet)])
    like = next(a.c for a in _iter_jets(args))

    def pick(v, k):
        if isinstance(v, Jet):
            return v.c[k]
        if isinstance(v, (list, tuple)) and any(isinstance(e, Jet) for e in v):
            return type(v)(pick(as_jet(e, J, like) if torch.is_tensor(e) else e, k) for e in v)
        return v

    outs = [fn(*[pick(a, k) for a in args], **{n: pick(v, k) for n, v in kwargs.items()})
            for k in range(J + 1)]
    if isinstance(outs[0], (tuple, list)):
        return tuple(Jet(torch.stack(parts)) if torch.is_tensor(parts[0]) else parts[0]
                     for parts in zip(*outs))
    if not torch.is_tensor(outs[0]):  # e.g. the None of attention's (output, None) indexed
        return outs[0]
    return Jet(torch.stack(outs))


def _iter_jets(args):
    for a in args:
        if isinstance(a, Jet):
            yield a
        elif isinstance(a, (list, tuple)):
            yield from _iter_jets(a)


def batched(fn, x: Jet) -> Jet:
    """A batch-first linear op (conv, pooling, linear without bias) on all orders at once."""
    J1, B = x.c.shape[0], x.c.shape[1]
    y = fn(x.c.reshape((J1 * B,) + x.c.shape[2:]))
    return Jet(y.reshape((J1, B) + y.shape[1:]))


def _add_bias(y: Jet, bias: torch.Tensor | None, view=None) -> Jet:
    if bias is None:
        return y
    c = y.c.clone()
    c[0] = c[0] + (bias if view is None else bias.view(view))
    return Jet(c)


def linear(x: Jet, weight, bias=None) -> Jet:
    return _add_bias(Jet(F.linear(x.c, weight)), bias)


def _conv(fn, x: Jet, weight, bias=None, *args, **kwargs) -> Jet:
    y = batched(lambda z: fn(z, weight, None, *args, **kwargs), x)
    return _add_bias(y, bias, (-1,) + (1,) * (y.c.dim() - 3))


def conv1d(x, weight, bias=None, *args, **kwargs):
    return _conv(F.conv1d, x, weight, bias, *args, **kwargs)


def conv2d(x, weight, bias=None, *args, **kwargs):
    return _conv(F.conv2d, x, weight, bias, *args, **kwargs)


def _max_pool(fn, x: Jet, *args, **kwargs) -> Jet:
    """Max pooling: every order is read at the argmax of the order-0 term."""
    kwargs = {k: v for k, v in kwargs.items() if k != "return_indices"}
    _, idx = fn(x.c[0], *args, return_indices=True, **kwargs)
    J1, B, C = x.c.shape[:3]
    flat = x.c.reshape(J1, B, C, -1)
    gathered = flat.gather(3, idx.reshape(1, B, C, -1).expand(J1, -1, -1, -1))
    return Jet(gathered.reshape((J1,) + idx.shape))


def max_pool1d(x, *args, **kwargs):
    return _max_pool(F.max_pool1d, x, *args, **kwargs)


def max_pool2d(x, *args, **kwargs):
    return _max_pool(F.max_pool2d, x, *args, **kwargs)


def _dims(x: Jet, dim) -> tuple[int, ...]:
    """Per-coefficient dims (as given to the op) as dims of the ``[J+1, ...]`` tensor."""
    nd = x.c.dim() - 1
    dims = dim if isinstance(dim, (tuple, list)) else (dim,)
    return tuple((d % nd) + 1 for d in dims)


def _jsum(x: Jet, dims, keepdim: bool = True) -> Jet:
    return Jet(x.c.sum(dim=dims, keepdim=keepdim))


def softmax(x: Jet, dim=None, _stacklevel=3, dtype=None, log=False) -> Jet:
    """``softmax(x)_i = e_i / sum e``, ``e = exp(x - max x_0)``; ``log``: ``x - m - log sum e``.
    ``dim=None`` is torch's implicit choice (``nn.Softmax()``: 0 for 0, 1 or 3 dims, else 1;
    torch's deprecation warning included)."""
    if dim is None:
        dim = F._get_softmax_dim("log_softmax" if log else "softmax", x.c.dim() - 1,
                                 _stacklevel + 2)
    if dtype is not None:  # softmax(w, -1, dtype=torch.float32): HF's eager attention
        x = Jet(x.c.to(dtype))
    d = _dims(x, dim)
    m = x.c[0].amax(dim=d[0] - 1, keepdim=True)
    shifted = add(x, -m)
    e = unary("exp", shifted)
    s = _jsum(e, d)
    if log:
        return sub(shifted, unary("log", s))
    return mul(e, unary("reciprocal", s))


def log_softmax(x, dim=None, _stacklevel=3, dtype=None):
    return softmax(x, dim, dtype=dtype, log=True)


def layer_norm(x: Jet, normalized_shape, weight=None, bias=None, eps=1e-5) -> Jet:
    """``(x - mean) * rsqrt(var + eps) * w + b`` over the last ``len(normalized_shape)`` dims."""
    n = len(normalized_shape) if isinstance(normalized_shape, (tuple, list, torch.Size)) else 1
    d = tuple(range(x.c.dim() - n, x.c.dim()))
    centered = Jet(x.c - x.c.mean(dim=d, keepdim=True))
    var = Jet(mul(centered, centered).c.mean(dim=d, keepdim=True))
    y = mul(centered, unary("rsqrt", add(var, eps)))
    if weight is not None:
        y = Jet(y.c * weight)
    return _add_bias(y, bias)


def _reduced_dims(x: Jet, dim) -> tuple[int, ...]:
    """Dims of ``x.c`` an op reduces over ``dim`` (None or ``()``: every dim of a
    coefficient)."""
    if dim is None or (isinstance(dim, (tuple, list)) and not dim):
        return tuple(range(1, x.c.dim()))
    return _dims(x, dim)


def _root(s: Jet) -> Jet:
    """``sqrt(s)`` of a sum of squares; where ``s`` is 0 its series has no square root (torch
    takes the derivative there as 0; NaN here, also through a ``where`` that drops it, in a
    reverse pass): the nested-jvp fallback."""
    if bool((s.c[0] == 0).any()):
        raise NotImplementedError("jet of a norm at zero")
    return unary("sqrt", s)


def _norm2(x: Jet, dim, keepdim: bool) -> Jet:
    return _root(_jsum(mul(x, x), _reduced_dims(x, dim), keepdim))


def vector_norm(x: Jet, ord=2, dim=None, keepdim=False, *, dtype=None, out=None) -> Jet:
    """The 2-norm ``sqrt(sum x^2)`` over ``dim`` (``torch.linalg.vector_norm``); other orders,
    and a norm that is 0 somewhere, take the nested-jvp fallback."""
    if ord not in (2, 2.0, "fro", None) or dtype is not None or out is not None:
        raise NotImplementedError(f"jet of a vector norm of order {ord!r}")
    return _norm2(x, dim, keepdim)


def norm(x: Jet, p="fro", dim=None, keepdim=False, out=None, dtype=None) -> Jet:
    """``torch.norm`` / ``Tensor.norm``: :func:`vector_norm` for the 2-norm."""
    return vector_norm(x, p, dim, keepdim, dtype=dtype, out=out)


def normalize(x: Jet, p=2.0, dim=1, eps=1e-12, out=None) -> Jet:
    """``x / max(||x||_2, eps)`` over ``dim`` (``F.normalize``): where the norm is below
    ``eps`` the divisor is the constant ``eps``."""
    if out is not None or p not in (2, 2.0):
        raise NotImplementedError("jet of normalize with out= or another order")
    return div(x, normalize_divisor(_norm2(x, dim, True), eps))


def var(x: Jet, dim=None, unbiased=None, keepdim=False, *, correction=None) -> Jet:
    """Variance over ``dim`` with ``correction`` (default 1; ``unbiased=False`` is 0), as
    ``torch.var`` / ``Tensor.var``."""
    if isinstance(dim, bool):  # the legacy var(x, unbiased)
        dim, unbiased = None, dim
    if correction is None:
        correction = 0 if unbiased is False else 1
    dims = _reduced_dims(x, dim)
    n = math.prod(x.c.shape[d] for d in dims)
    centered = Jet(x.c - x.c.mean(dim=dims, keepdim=True))
    return Jet(_jsum(mul(centered, centered), dims, keepdim).c / max(n - correction, 0))


def std(x: Jet, dim=None, unbiased=None, keepdim=False, *, correction=None) -> Jet:
    """``sqrt`` of :func:`var` (a zero variance takes the nested-jvp fallback)."""
    return _root(var(x, dim, unbiased, keepdim, correction=correction))


def cosine_similarity(x1, x2, dim=1, eps=1e-8) -> Jet:
    """``sum(x1 x2) / (max(||x1||, eps) max(||x2||, eps))`` over ``dim``
    (``F.cosine_similarity``)."""
    order = _order_of([x1, x2])
    a, b = as_jet(x1, order), as_jet(x2, order)
    if a.c.shape != b.c.shape:  # torch broadcasts before the norms: the fallback does that
        raise NotImplementedError("jet of cosine_similarity of broadcast inputs")
    dot = _jsum(mul(a, b), _dims(a, dim), False)
    na = normalize_divisor(_norm2(a, dim, False), eps)
    nb = normalize_divisor(_norm2(b, dim, False), eps)
    return div(dot, mul(na, nb))


def normalize_divisor(n: Jet, eps: float) -> Jet:
    """``max(n, eps)``: the constant ``eps`` where the value is at most ``eps``."""
    small = n.c[0] <= eps
    if not bool(small.any()):
        return n
    floor = torch.zeros_like(n.c)
    floor[0] = eps
    return Jet(torch.where(small, floor, n.c))


def batch_norm_eval(x: Jet, mean, var, weight, bias, eps) -> Jet:
    """Batch norm with running statistics: affine per channel (dim 1 of the activation)."""
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale = scale * weight
    shift = -mean * scale + (bias if bias is not None else 0)
    view = (-1,) + (1,) * (x.c.dim() - 3)
    return _add_bias(Jet(x.c * scale.view(view)), shift, view)


def scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False,
                                 scale=None, enable_gqa=False) -> Jet:
    """``softmax(q k^T * scale + mask) v`` from the matmul and softmax jet rules."""
    if dropout_p != 0.0 or enable_gqa:
        raise NotImplementedError("jet attention with dropout or grouped-query attention")
    q0 = q.c[0] if isinstance(q, Jet) else q
    kt = Jet(k.c.transpose(-1, -2)) if isinstance(k, Jet) else k.transpose(-1, -2)
    s = matmul(q, kt)
    s = s if isinstance(s, Jet) else as_jet(s, _order_of([q, k, v]))
    s = Jet(s.c * (scale if scale is not None else 1.0 / math.sqrt(q0.shape[-1])))
    L, S = s.c.shape[-2], s.c.shape[-1]
    if is_causal:
        attn_mask = torch.ones(L, S, dtype=torch.bool, device=s.c.device).tril()
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            c = s.c.masked_fill(~attn_mask, 0.0)  # masked scores: constant -inf
            c[0] = c[0].masked_fill(~attn_mask, float("-inf"))
            s = Jet(c)
        else:
            s = add(s, attn_mask)
    # as torch's SDPA: a query row with no allowed key attends to nothing (its output is 0;
    # a softmax over only -inf is NaN, and the matmul spread it to every row)
    dead = torch.isneginf(s.c[0]).all(dim=-1, keepdim=True)
    if s.c.device.type == "cpu" and not bool(dead.any()):  # (the copies cost 10-25% there)
        return matmul(softmax(s, -1), v)
    p = softmax(Jet(torch.where(dead, 0.0, s.c)), -1)
    return matmul(Jet(torch.where(dead, 0.0, p.c)), v)


def _activation_fn(name):
    return lambda x, *a, **kw: unary(name, x)


def _gelu(x, approximate="none"):
    return unary("gelu_tanh" if approximate == "tanh" else "gelu", x)


def _softplus(x, beta=1.0, threshold=20.0):
    """``softplus(beta x) / beta``, and ``x`` itself where ``beta x > threshold`` (torch's
    linear branch: the jet of the identity there, as the model computes)."""
    out = unary("softplus", x) if beta == 1 else \
        Jet(unary("softplus", Jet(beta * x.c)).c / beta)
    return Jet(torch.where(x.c[0] * beta > threshold, x.c, out.c))  # no host sync


def pad(x: Jet, pad, mode: str = "constant", value=None) -> Jet:
    """``F.pad``: affine in ``x``; a constant fill ``value`` is the value's (order 0) only,
    the coefficients of order ``k >= 1`` are padded with 0."""
    if mode != "constant" or not value:
        return per_coefficient(F.pad, (x, pad), {"mode": mode, "value": value})
    zeros = F.pad(x.c[1:], pad, value=0.0)  # (the leading order dim is not padded)
    return Jet(torch.cat([F.pad(x.c[:1], pad, value=value), zeros]))


def _dropout(x, *args, **kwargs):
    return x  # the engine runs models in eval mode: dropout is the identity


UNARY_FUNCTIONS = {
    torch.tanh: "tanh", torch.sigmoid: "sigmoid", torch.exp: "exp", torch.log: "log",
    torch.sin: "sin", torch.cos: "cos", torch.relu: "relu", torch.sqrt: "sqrt",
    torch.rsqrt: "rsqrt", torch.reciprocal: "reciprocal", torch.square: "square",
    F.tanh: "tanh", F.sigmoid: "sigmoid", F.relu: "relu", F.silu: "silu",
}
UNARY_METHODS = ("tanh", "sigmoid", "exp", "log", "sin", "cos", "relu", "sqrt", "rsqrt",
                 "reciprocal", "square")
# piecewise constant in their jet arguments (zero derivatives of every order): evaluated on
# the values, their results are constants (masks, indices) for the ops that use them
CONSTANT_FUNCTIONS = (operator.gt, operator.lt, operator.ge, operator.le, operator.eq,
                      operator.ne, torch.gt, torch.lt, torch.ge, torch.le, torch.eq, torch.ne,
                      torch.isnan, torch.isinf, torch.isfinite, torch.argmax, torch.argmin,
                      torch.sign, torch.signbit, torch.argsort)
CONSTANT_METHODS = ("gt", "lt", "ge", "le", "eq", "ne", "__gt__", "__lt__", "__ge__", "__le__",
                    "__eq__", "__ne__", "isnan", "isinf", "isfinite", "argmax", "argmin",
                    "sign", "signbit", "argsort", "long", "int", "short", "byte", "char",
                    "bool")
LINEAR_FUNCTIONS = (torch.flatten, torch.reshape, torch.permute, torch.transpose, torch.unsqueeze,
                    torch.squeeze, torch.cat, torch.stack, torch.sum, torch.mean, operator.getitem,
                    torch.chunk, torch.split, F.avg_pool1d, F.avg_pool2d, F.adaptive_avg_pool1d,
                    F.adaptive_avg_pool2d, torch.movedim, torch.narrow)
LINEAR_METHODS = ("view", "reshape", "flatten", "permute", "transpose", "contiguous", "unsqueeze",
                  "squeeze", "expand", "repeat", "sum", "mean", "chunk", "split", "narrow",
                  "movedim", "to", "float", "double", "type_as", "view_as", "reshape_as",
                  "expand_as", "t", "unflatten")
# linear to a floating dtype; to an integer or bool dtype a constant (the value's)
CAST_METHODS = ("to", "type_as")

FUNCTION_RULES = {
    **{fn: _activation_fn(name) for fn, name in UNARY_FUNCTIONS.items()},
    F.gelu: _gelu, F.softplus: _softplus, F.dropout: _dropout, F.pad: pad,
    operator.add: add, torch.add: add, operator.sub: sub, torch.sub: sub, torch.rsub: rsub,
    operator.mul: mul,
    torch.mul: mul, operator.truediv: div, torch.div: div, operator.neg: neg, torch.neg: neg,
    operator.pow: power, torch.pow: power, operator.matmul: matmul, torch.matmul: matmul,
    torch.bmm: matmul, F.linear: linear, F.conv1d: conv1d, F.conv2d: conv2d,
    F.max_pool1d: max_pool1d, F.max_pool2d: max_pool2d, F.softmax: softmax,
    torch.softmax: softmax, F.log_softmax: log_softmax, torch.log_softmax: log_softmax,
    F.layer_norm: layer_norm, F.scaled_dot_product_attention: scaled_dot_product_attention,
    torch.linalg.vector_norm: vector_norm, torch.norm: norm, F.normalize: normalize,
    torch.var: var, torch.std: std, F.cosine_similarity: cosine_similarity,
}
# method rules that also take a constant as ``self`` (and a jet as the other operand)
ARITHMETIC_METHODS = frozenset({"add", "sub", "mul", "div", "matmul", "__radd__", "__rsub__"})
METHOD_RULES = {
    **{name: _activation_fn(name) for name in UNARY_METHODS},
    "add": add, "sub": sub, "mul": mul, "div": div, "neg": neg, "pow": power,
    "matmul": matmul, "bmm": matmul, "softmax": softmax, "log_softmax": log_softmax,
    "__radd__": add, "__rsub__": rsub, "norm": norm, "var": var, "std": std,
}


_PAD_MODULES = {
    **{cls: "constant" for cls in (nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d)},
    **{cls: "reflect" for cls in (nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReflectionPad3d)},
    **{cls: "replicate" for cls in (nn.ReplicationPad1d, nn.ReplicationPad2d,
                                    nn.ReplicationPad3d)},
    **{cls: "circular" for cls in (nn.CircularPad1d, nn.CircularPad2d, nn.CircularPad3d)},
}


def module_rule(m: nn.Module):
    """The rule for a leaf module, or None when it has none (the engine then falls back)."""
    acts = {nn.Tanh: "tanh", nn.Sigmoid: "sigmoid", nn.ReLU: "relu", nn.SiLU: "silu"}
    for cls, name in acts.items():
        if type(m) is cls:
            return lambda x: unary(name, x)
    if type(m) is nn.GELU:
        return lambda x: _gelu(x, m.approximate)
    if type(m) is nn.Softplus:
        return lambda x: _softplus(x, m.beta, m.threshold)
    if type(m) is nn.Linear:
        return lambda x: linear(x, m.weight, m.bias)
    if type(m) in (nn.Conv1d, nn.Conv2d) and m.padding_mode == "zeros":
        return lambda x: _add_bias(batched(lambda z: m._conv_forward(z, m.weight, None), x),
                                   m.bias, (-1,) + (1,) * (x.c.dim() - 3))
    if type(m) in (nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
                   nn.Flatten, nn.Unflatten, nn.Identity):
        return lambda x: batched(m, x) if type(m) is not nn.Identity else x
    if type(m) in (nn.MaxPool1d, nn.MaxPool2d) and not m.return_indices:  # (a pair: the
        fn = F.max_pool1d if type(m) is nn.MaxPool1d else F.max_pool2d  # fallback's)
        return lambda x: _max_pool(fn, x, m.kernel_size, m.stride, m.padding, m.dilation,
                                   ceil_mode=m.ceil_mode)
    if type(m) is nn.Dropout:
        return _dropout
    for kind, mode in _PAD_MODULES.items():
        if isinstance(m, kind):  # (ZeroPad*d are ConstantPad*d with value 0)
            return lambda x: pad(x, m.padding, mode, getattr(m, "value", None))
    if type(m) is nn.Softmax:
        return lambda x: softmax(x, m.dim)
    if type(m) is nn.LayerNorm:
        return lambda x: layer_norm(x, m.normalized_shape, m.weight, m.bias, m.eps)
    if type(m) in (nn.BatchNorm1d, nn.BatchNorm2d) and not m.training and \
            m.running_mean is not None:
        return lambda x: batch_norm_eval(x, m.running_mean, m.running_var, m.weight, m.bias,
                                         m.eps)
    return None
