"""Pure-PyTorch references of the jet (Taylor-mode) primitives: the truth the kernels match.

A jet ``u[J+1, N]`` holds normalized Taylor coefficients ``u_k = u^(k)(0) / k!`` of ``N``
scalar curves ``u(t)``. Every elementwise ``y = fn(u)`` is propagated by a recurrence derived
from ``y' = fn'(u) u'``; with ``D(u, z)_k = (1/k) sum_{j=1..k} j u_j z_{k-j}`` (the coefficient
of ``t^k`` in ``int z du``) and the Cauchy product ``(a*b)_k = sum_{j=0..k} a_j b_{k-j}``:

- exp:           ``y_k = D(u, y)_k``
- tanh:          ``y_k = D(u, z)_k`` with ``z = 1 - y*y``: ``z_k = -(y*y)_k``
- sigmoid:       ``y_k = D(u, z)_k`` with ``z = y - y*y``: ``z_k = y_k - (y*y)_k``
- softplus:      ``y_k = D(u, s)_k``, ``s = sigmoid(u)`` (its series as above)
- silu:          ``y = u*s``, ``s = sigmoid(u)``
- gelu (erf):    ``p = phi(u)``, ``P = Phi(u)``: ``p_k = -D(u, u*p)_k``, ``P_k = D(u, p)_k``;
  ``y = u*P``
- gelu_tanh:     ``a = c (u + 0.044715 u*u*u)``, ``c = sqrt(2/pi)``, ``T = tanh(a)`` (series as
  tanh); ``y = (u + u*T) / 2``
- sin, cos:      ``s_k = D(u, c)_k``, ``c_k = -D(u, s)_k``
- log:           ``y_k = (u_k - (1/k) sum_{j=1..k-1} j y_j u_{k-j}) / u_0``
- square:        ``y = u*u``
- reciprocal, sqrt, rsqrt: ``y = u^p`` (p = -1, 1/2, -1/2), from ``u y' = p y u'``:
  ``y_k = sum_{j=1..k} ((p+1) j - k) u_j y_{k-j} / (k u_0)``
- relu:          ``y_k = u_k [u_0 > 0]`` (the kink is ignored: ``relu'(0)`` is taken as 0)

All orders come out of one pass, ``O(J^2)`` multiply-adds per element (nested forward-mode AD
costs ``O(2^J)``). Arithmetic is in float32 (float64 for float64 inputs); the result has the
input's dtype.
"""
from __future__ import annotations

import math

import torch

from taylor_kernels.numerics import (FN_CODES, FNS, MAX_ORDER,  # noqa: F401 (re-exported)
                                     accumulation_dtype, check_pattern,
                                     nested_jvp_coefficients, polarization_rule)
from taylor_kernels.op_checks import (check_jet, check_jet_pair,  # noqa: F401 (re-exported)
                                      check_polarize_args, fn_code)

_GELU_TANH_C = math.sqrt(2.0 / math.pi)
_POWERS = {"reciprocal": -1.0, "sqrt": 0.5, "rsqrt": -0.5}


def _cauchy(a: list, b: list, k: int) -> torch.Tensor:
    """Coefficient ``k`` of the product of two series: ``sum_{j=0..k} a_j b_{k-j}``."""
    out = a[0] * b[k]
    for j in range(1, k + 1):
        out = out + a[j] * b[k - j]
    return out


def _integral(u: list, z: list, k: int) -> torch.Tensor:
    """``D(u, z)_k = (1/k) sum_{j=1..k} j u_j z_{k-j}``: coefficient k of y with y' = z u'."""
    out = u[1] * z[k - 1]
    for j in range(2, k + 1):
        out = out + j * u[j] * z[k - j]
    return out / k


def _tanh_series(u: list, J: int) -> list:
    y, z = [torch.tanh(u[0])], [1 - torch.tanh(u[0]) ** 2]
    for k in range(1, J + 1):
        y.append(_integral(u, z, k))
        z.append(-_cauchy(y, y, k))
    return y


def _sigmoid_series(u: list, J: int) -> list:
    y = [torch.sigmoid(u[0])]
    z = [y[0] - y[0] * y[0]]
    for k in range(1, J + 1):
        y.append(_integral(u, z, k))
        z.append(y[k] - _cauchy(y, y, k))
    return y


def _product(a: list, b: list, J: int) -> list:
    return [_cauchy(a, b, k) for k in range(J + 1)]


def _exp(u, J):
    y = [torch.exp(u[0])]
    for k in range(1, J + 1):
        y.append(_integral(u, y, k))
    return y


def _softplus(u, J):
    s = _sigmoid_series(u, J - 1) if J > 0 else []
    u0 = u[0]  # log(1 + e^u) without torch's threshold (u0 itself above 20: 2e-9 off)
    value = u0.clamp_min(0) + torch.log1p(torch.exp(-u0.abs()))
    return [value] + [_integral(u, s, k) for k in range(1, J + 1)]


def _gelu(u, J):
    p = [torch.exp(-0.5 * u[0] * u[0]) / math.sqrt(2 * math.pi)]
    P = [0.5 * (1 + torch.erf(u[0] / math.sqrt(2.0)))]
    up = [u[0] * p[0]]
    for k in range(1, J + 1):
        P.append(_integral(u, p, k))
        p.append(-_integral(u, up, k))
        up.append(_cauchy(u, p, k))
    return _product(u, P, J)


def _gelu_tanh(u, J):
    sq = _product(u, u, J)
    cube = _product(sq, u, J)
    T = _tanh_series([_GELU_TANH_C * (u[k] + 0.044715 * cube[k]) for k in range(J + 1)], J)
    uT = _product(u, T, J)
    return [0.5 * (u[k] + uT[k]) for k in range(J + 1)]


def _sincos(u, J):
    s, c = [torch.sin(u[0])], [torch.cos(u[0])]
    for k in range(1, J + 1):
        s.append(_integral(u, c, k))
        c.append(-_integral(u, s, k))
    return s, c


def _log(u, J):
    y = [torch.log(u[0])]
    for k in range(1, J + 1):
        acc = u[k]
        for j in range(1, k):
            acc = acc - (j / k) * y[j] * u[k - j]
        y.append(acc / u[0])
    return y


def _power(u, J, p):
    y = [torch.pow(u[0], p)]
    for k in range(1, J + 1):
        acc = ((p + 1) - k) * u[1] * y[k - 1]
        for j in range(2, k + 1):
            acc = acc + ((p + 1) * j - k) * u[j] * y[k - j]
        y.append(acc / (k * u[0]))
    return y


def _series(name: str, u: list, J: int) -> list:
    if name in _POWERS:
        return _power(u, J, _POWERS[name])
    if name == "tanh":
        return _tanh_series(u, J)
    if name == "sigmoid":
        return _sigmoid_series(u, J)
    if name == "silu":
        return _product(u, _sigmoid_series(u, J), J)
    if name == "square":
        return _product(u, u, J)
    if name == "relu":
        on = (u[0] > 0).to(u[0].dtype)
        return [uk * on for uk in u]
    if name in ("sin", "cos"):
        return _sincos(u, J)[name == "cos"]
    return {"exp": _exp, "log": _log, "softplus": _softplus, "gelu": _gelu,
            "gelu_tanh": _gelu_tanh}[name](u, J)


def jet_unary(fn: str | int, u: torch.Tensor) -> torch.Tensor:
    """Taylor coefficients of ``fn(u(t))``: ``[J+1, N] -> [J+1, N]`` (recurrences: module doc).

    ``fn`` is a name in ``FNS`` or its code; ``u`` holds normalized coefficients
    ``u_k = u^(k)(0)/k!`` of ``N`` curves. Differentiable (plain autograd through the loops).
    """
    name = FNS[fn_code(fn)]
    check_jet(u)
    acc = accumulation_dtype(u.dtype)
    J = u.shape[0] - 1
    coeffs = list(u.to(acc).unbind(0))
    return torch.stack(_series(name, coeffs, J)).to(u.dtype)


def jet_mul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Truncated Cauchy product ``c_k = sum_{j=0..k} a_j b_{k-j}``: ``[J+1, N] x2 -> [J+1, N]``."""
    check_jet_pair(a, b)
    acc = accumulation_dtype(a.dtype)
    A, Bc = list(a.to(acc).unbind(0)), list(b.to(acc).unbind(0))
    return torch.stack(_product(A, Bc, a.shape[0] - 1)).to(a.dtype)


# ---- polarization: mixed partials from univariate jets -----------------------------------




def polarize_contract(c: torch.Tensor, gamma: torch.Tensor, order: int) -> torch.Tensor:
    """``out [N] = sum_m gamma_m c[order, m, :]`` for ``c [J+1, M, N]``, ``gamma [M]``: the
    contraction of directional jets behind :func:`polarize` (accumulation dtype, ``c.dtype``
    out)."""
    check_polarize_args(c, gamma, order)
    acc = accumulation_dtype(c.dtype)
    return (gamma.to(acc) @ c[int(order)].to(acc)).to(c.dtype)


def polarize(c: torch.Tensor, pattern, contract=None) -> torch.Tensor:
    """Mixed partial ``D^d f[v_1^{i_1}, ..., v_p^{i_p}]`` from univariate jets.

    Args: ``c [J+1, M, ...]`` normalized coefficients along the ``M`` directions of
    :func:`polarization_rule` (``pattern``), in that order, ``J >= d = sum(pattern)``.
    Returns: ``[...]`` = ``sum_m gamma_m c[d, m, ...]`` (the unnormalized derivative).
    ``contract``: the ``polarize_contract`` implementation (default: this reference).
    """
    i = check_pattern(pattern)
    d = sum(i)
    weights, gamma = polarization_rule(i)
    if not isinstance(c, torch.Tensor) or c.dim() < 2:
        raise ValueError("c must be a tensor [J+1, M, ...] of directional jets")
    if c.shape[0] <= d or c.shape[1] != weights.shape[0]:
        raise ValueError(f"pattern {i} needs jets of order >= {d} along the "
                         f"{weights.shape[0]} directions of polarization_rule; got c of "
                         f"shape {tuple(c.shape)}")
    flat = c.reshape(c.shape[0], c.shape[1], -1)
    out = (contract or polarize_contract)(flat, gamma.to(c.device), d)
    return out.reshape(c.shape[2:])
