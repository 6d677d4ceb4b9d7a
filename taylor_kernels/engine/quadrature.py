"""Quadrature rules on [0, 1] for path integrals ``int_0^1 g(t) dt ~ sum_s w_s g(t_s)``.

Captum-compatible rules (nodes and weights identical to ``captum.attr._utils.
approximation_methods``): ``riemann_left``, ``riemann_right``, ``riemann_middle``,
``riemann_trapezoid`` and ``gausslegendre``. Note that Captum's ``riemann_trapezoid`` uses
weights ``1/n`` with halved end points, which sum to ``1 - 1/n``; we keep that for
compatibility and offer ``trapezoid``, the composite trapezoid rule with spacing ``1/(n-1)``.

The ``adaptive`` rule uses the nested Gauss-Kronrod-Patterson sequence with 1, 3, 7, 15, 31,
63 nodes: every level contains all nodes of the previous one, so refining reuses every
gradient already computed. Level ``L+1`` adds ``|L| + 1`` nodes chosen so that the new rule
integrates polynomials of the highest possible degree (Patterson, Math. Comp. 1968); nodes are
computed here in 50-digit arithmetic (mpmath) and cached, not read from a table.
"""
from __future__ import annotations

import functools
import math
import numbers

import numpy as np
import torch

from taylor_kernels.engine import memory

CAPTUM_RULES = ("riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid",
                "gausslegendre")
RULES = CAPTUM_RULES + ("trapezoid", "adaptive", "exact")
PATTERSON_SIZES = (1, 3, 7, 15, 31, 63)


def check_rule(rule: str) -> str:
    """Return ``rule`` if known, else raise ``ValueError`` listing the known rules."""
    if rule not in RULES:
        raise ValueError(f"unknown quadrature rule {rule!r}; choose one of {RULES}")
    return rule


class NotWholeError(TypeError, ValueError):
    """A step count that is a number but not a whole one: the ``TypeError`` Captum's rule
    builders raise for it, and the ``ValueError`` of a bad value."""


def check_steps(steps, minimum: int = 1, name: str = "steps") -> int:
    """``steps`` as an int; ``TypeError`` for a string or another non-number,
    :class:`NotWholeError` (both) for a number not whole, ``ValueError`` below ``minimum``."""
    if isinstance(steps, str):
        hint = f"; pass {name}={steps.strip()}" if steps.strip().isdigit() else ""
        raise TypeError(f"{name} must be an integer, got the string {steps!r}{hint}")
    if isinstance(steps, bool) or not isinstance(steps, numbers.Real):
        raise TypeError(f"{name} must be an integer, got {type(steps).__name__} {steps!r}")
    if math.isfinite(steps) and int(steps) != steps:
        raise NotWholeError(f"{name} must be an integer >= {minimum}, got {steps!r}")
    if not math.isfinite(steps) or steps < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {steps!r}")
    return int(steps)


def _legendre_and_derivative(n: int, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``P_n(x)`` and ``P_n'(x)`` by the three-term recurrence: ``O(n len(x))`` time,
    ``O(len(x))`` memory."""
    prev, cur = np.ones_like(x), x.copy()
    for k in range(1, n):
        prev, cur = cur, ((2 * k + 1) * x * cur - k * prev) / (k + 1)
    return cur, n * (x * cur - prev) / (x * x - 1)


@functools.lru_cache(maxsize=16)
def _gauss_legendre(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gauss-Legendre nodes and weights on [0, 1] (float64 ``[n]`` each) in ``O(n)`` memory:
    Newton on the Legendre recurrence from Tricomi's asymptotic nodes
    ``x_k ~ (1 - (n-1)/(8n^3)) cos(pi (4k-1)/(4n+2))`` for the ``ceil(n/2)`` nonnegative nodes
    (the rule is symmetric); weights ``2 / ((1 - x^2) P_n'(x)^2)``. (numpy's ``leggauss``
    builds an ``n x n`` companion matrix instead.) Time ``O(n^2)``."""
    k = np.arange(1, (n + 1) // 2 + 1, dtype=np.float64)
    x = (1 - (n - 1) / (8.0 * n**3)) * np.cos(np.pi * (4 * k - 1) / (4 * n + 2))
    if n % 2:
        x[-1] = 0.0
    for _ in range(100):
        p, dp = _legendre_and_derivative(n, x)
        step = p / dp
        x = x - step
        if np.abs(step).max() <= 4 * np.finfo(np.float64).eps:
            break
    _, dp = _legendre_and_derivative(n, x)
    w = 2 / ((1 - x * x) * dp * dp)
    inner = slice(None, n // 2)  # mirrored; an odd rule's middle node 0 appears once
    nodes = np.concatenate([-x, x[inner][::-1]])
    weights = np.concatenate([w, w[inner][::-1]])
    return torch.from_numpy(0.5 * (1 + nodes)), torch.from_numpy(0.5 * weights)


def _check_node_memory(n: int) -> None:
    """Raise ``MemoryError`` when ``n`` nodes (float64 nodes, weights and the recurrence's
    work arrays, about 64 bytes a node) do not fit the free memory."""
    need, free = 64 * n, memory.free_memory(torch.device("cpu"))
    if need > free:
        raise MemoryError(f"steps={n} needs about {need} bytes for the quadrature nodes but "
                          f"only {free} bytes are free; use fewer steps or rule='adaptive'")


def nodes_and_weights(rule: str, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Nodes ``t_s`` in [0, 1] and weights ``w_s`` (float64 tensors ``[steps]``) of a fixed rule."""
    check_rule(rule)
    if rule in ("adaptive", "exact"):
        raise ValueError(f"{rule!r} has no fixed nodes (adaptive: patterson_levels(); exact: "
                         "engine.exact_path.plan())")
    n = check_steps(steps, 1 if rule == "gausslegendre" else 2)
    _check_node_memory(n)
    if rule == "gausslegendre":
        t, w = _gauss_legendre(n)
        return t.clone(), w.clone()
    if rule == "trapezoid":
        w = torch.full((n,), 1.0 / (n - 1), dtype=torch.float64)
        w[0] = w[-1] = 0.5 / (n - 1)
        return torch.linspace(0, 1, n, dtype=torch.float64), w
    w = torch.full((n,), 1.0 / n, dtype=torch.float64)
    # Captum builds riemann nodes with float32 linspace; we use float64 (differences ~6e-8).
    if rule == "riemann_trapezoid":
        w[0] = w[-1] = 0.5 / n
        t = torch.linspace(0, 1, n, dtype=torch.float64)
    elif rule == "riemann_left":
        t = torch.linspace(0, 1 - 1 / n, n, dtype=torch.float64)
    elif rule == "riemann_right":
        t = torch.linspace(1 / n, 1, n, dtype=torch.float64)
    else:
        t = torch.linspace(1 / (2 * n), 1 - 1 / (2 * n), n, dtype=torch.float64)
    return t, w


def _mp():
    import mpmath

    ctx = mpmath.mp.clone() if hasattr(mpmath.mp, "clone") else mpmath.mp
    ctx.dps = 50
    return ctx


def _legendre_all(mp, n: int, x):
    """[L_0(x), ..., L_n(x)] by the three-term recurrence (mp precision)."""
    vals = [mp.mpf(1), x]
    for k in range(1, n):
        vals.append(((2 * k + 1) * x * vals[k] - k * vals[k - 1]) / (k + 1))
    return vals[: n + 1]


def _gauss_rule(mp, n: int):
    """n-point Gauss-Legendre nodes and weights on [-1, 1], Newton-refined in mp precision."""
    xs, ws = [], []
    for guess in (2 * _gauss_legendre(n)[0] - 1).tolist():
        x = mp.mpf(float(guess))
        for _ in range(100):
            L = _legendre_all(mp, n, x)
            dL = n * (x * L[n] - L[n - 1]) / (x * x - 1)
            step = L[n] / dL
            x -= step
            if abs(step) < mp.mpf(10) ** (-mp.dps + 5):
                break
        L = _legendre_all(mp, n, x)
        dL = n * (x * L[n] - L[n - 1]) / (x * x - 1)
        xs.append(x)
        ws.append(2 / ((1 - x * x) * dL * dL))
    return xs, ws


def _extend(mp, nodes: list) -> list:
    """Patterson extension: the ``m+1`` new nodes for the ``m`` existing ones.

    The new node polynomial ``q`` (degree m+1, Legendre basis) satisfies
    ``int_{-1}^{1} p(x) q(x) L_j(x) dx = 0`` for j = 0..m, with ``p(x) = prod (x - node)``.
    """
    m = len(nodes)
    gx, gw = _gauss_rule(mp, (3 * m + 4) // 2 + 1)  # exact for degree <= 3m + 2
    p = [mp.fprod([x - a for a in nodes]) for x in gx]
    L = [_legendre_all(mp, m + 1, x) for x in gx]
    A = mp.matrix(m + 1, m + 1)
    rhs = mp.matrix(m + 1, 1)
    for j in range(m + 1):
        for i in range(m + 1):
            A[j, i] = mp.fsum(w * pv * Lx[i] * Lx[j] for w, pv, Lx in zip(gw, p, L))
        rhs[j] = -mp.fsum(w * pv * Lx[m + 1] * Lx[j] for w, pv, Lx in zip(gw, p, L))
    c = mp.lu_solve(A, rhs)
    coeffs = [c[i] for i in range(m + 1)] + [mp.mpf(1)]
    guesses = np.polynomial.legendre.legroots([float(v) for v in coeffs])
    if np.abs(np.imag(guesses)).max(initial=0) > 1e-8 or np.abs(guesses).max() >= 1:
        raise ArithmeticError("Patterson extension has nodes off (-1, 1)")
    roots = []
    for g in np.real(guesses):
        x = mp.mpf(float(g))
        for _ in range(60):
            vals = _legendre_all(mp, m + 1, x)
            f = mp.fsum(ck * v for ck, v in zip(coeffs, vals))
            # derivative through L_k' = k (x L_k - L_{k-1}) / (x^2 - 1)
            df = mp.fsum(ck * k * (x * vals[k] - vals[k - 1]) / (x * x - 1)
                         for k, ck in enumerate(coeffs) if k > 0)
            step = f / df
            x -= step
            if abs(step) < mp.mpf(10) ** (-mp.dps + 8):
                break
        roots.append(x)
    return roots


def _interpolatory_weights(mp, nodes: list) -> list:
    """Weights w_i with sum_i w_i L_j(x_i) = int L_j = 2 [j == 0], j < len(nodes)."""
    n = len(nodes)
    A = mp.matrix(n, n)
    for i, x in enumerate(nodes):
        for j, v in enumerate(_legendre_all(mp, n - 1, x)[:n]):
            A[j, i] = v
    rhs = mp.matrix(n, 1)
    rhs[0] = 2
    w = mp.lu_solve(A, rhs)
    return [w[i] for i in range(n)]


@functools.lru_cache(maxsize=None)
def patterson_levels(max_nodes: int = 63) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """Nested Patterson rules on [0, 1].

    Returns ``(nodes, weights_per_level)``: ``nodes`` float64 ``[N]`` ordered by the level that
    introduces them (level sizes ``PATTERSON_SIZES`` up to ``max_nodes``), and for each level
    ``L`` a float64 ``[N]`` weight vector that is zero on nodes introduced after ``L``.
    """
    if max_nodes not in PATTERSON_SIZES:
        raise ValueError(f"max_nodes must be one of {PATTERSON_SIZES}")
    mp = _mp()
    nodes = [mp.mpf(0)]
    per_level = [[mp.mpf(2)]]
    while len(nodes) < max_nodes:
        nodes = nodes + _extend(mp, nodes)
        per_level.append(_interpolatory_weights(mp, nodes))
    t = torch.tensor([float((x + 1) / 2) for x in nodes], dtype=torch.float64)
    weights = []
    for w in per_level:
        full = torch.zeros(len(nodes), dtype=torch.float64)
        full[: len(w)] = torch.tensor([float(v / 2) for v in w], dtype=torch.float64)
        weights.append(full)
    return t, tuple(weights)
