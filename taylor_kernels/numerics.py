"""Numeric conventions and small exact-math helpers shared by every layer (attr, engine, ops,
backends, reference): a neutral module that imports nothing from the package, so any layer may
use it (calls go attr -> engine -> ops -> backends; see tests/test_import_direction.py).

Contents: the check of a tensor argument's form (dense, real, with values) and the
finiteness checks; the accumulation dtype; the elementwise jet functions' names and codes
(shared with the native kernels) and the highest jet order; the polarization rule of mixed
partials and the nested-jvp Taylor coefficients (the jet engine's fallback and the jet
kernels' oracle).
"""
from __future__ import annotations

import functools
import math
import threading
from itertools import product

import torch

FNS = ("tanh", "sigmoid", "exp", "log", "softplus", "gelu", "gelu_tanh", "silu", "sin", "cos",
       "relu", "square", "reciprocal", "sqrt", "rsqrt")
FN_CODES = {name: code for code, name in enumerate(FNS)}
MAX_ORDER = 15  # J; the native kernels keep the J+1 coefficients of a few series in registers


class TensorFormError(TypeError, ValueError):
    """A tensor argument in a form the library cannot compute with (sparse, nested, meta,
    complex, 8-bit float): a ``TypeError`` by kind, and a ``ValueError`` as every other
    malformed argument of the attribution calls."""


def check_dense_real(t: torch.Tensor, name: str) -> None:
    """``TensorFormError`` naming ``name`` unless ``t`` is a dense strided tensor with values
    (not ``meta``) of a real dtype other than an 8-bit float (integer dtypes pass: callers
    that need floating values check that). Reads attributes only, never the data: it runs
    before the finiteness checks, whose ``aminmax`` failed inside torch on these forms."""
    if t.is_nested:
        why = ("is a nested tensor; pass a dense padded one (.to_padded_tensor(0.0)) and the "
               "padding mask as an additional forward argument")
    elif t.layout != torch.strided:
        why = f"has layout {t.layout}; pass a dense strided tensor (.to_dense())"
    elif t.is_meta:
        why = ("is on the meta device (a shape without values); pass a tensor on a real "
               "device (.to('cpu') or .to('cuda'))")
    elif t.is_complex():
        why = (f"has dtype {t.dtype}; only real values are supported (the imaginary part "
               "would be dropped): pass a real floating tensor (.real or .abs())")
    elif t.is_floating_point() and t.dtype.itemsize == 1:
        why = (f"has dtype {t.dtype}, an 8-bit storage float without the arithmetic needed; "
               "pass a float32 or bfloat16 copy (.float() or .bfloat16())")
    else:
        return
    raise TensorFormError(f"{name} {why}")


def finite_rows(t: torch.Tensor) -> torch.Tensor:
    """``[*t.shape[:-1]]`` bool: True where the last dimension holds no NaN or Inf. Through
    ``aminmax`` (NaN propagates, an Inf is a minimum or maximum), so it allocates only the
    ``[rows]`` outputs: ``isfinite(t).all(-1)`` held 1.75x ``t`` in temporaries (measured
    10.5 MB for a 6 MB tensor, an expected-gradients call's references)."""
    if t.shape[-1] == 0:
        return torch.ones(t.shape[:-1], dtype=torch.bool, device=t.device)
    lo, hi = torch.aminmax(t, dim=-1)
    return torch.isfinite(lo) & torch.isfinite(hi)


def all_finite(t: torch.Tensor) -> bool:
    """True when the floating tensor ``t`` holds no NaN or Inf (:func:`finite_rows`: no
    tensor-sized temporaries, also for an expanded ``t``)."""
    return t.numel() == 0 or bool(finite_rows(t.reshape(1) if t.dim() == 0 else t).all())


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 inputs, float32 for everything else (float32, bf16, fp16)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def gen_binom(r: float, j: int) -> float:
    """Generalized binomial coefficient ``r (r-1) ... (r-j+1) / j!``."""
    out = 1.0
    for m in range(j):
        out *= (r - m) / (m + 1)
    return out


def check_pattern(pattern) -> tuple[int, ...]:
    """A multi-index ``(i_1, ..., i_p)`` of positive ints as a tuple; raises otherwise."""
    pattern = tuple(pattern) if isinstance(pattern, (tuple, list)) else (pattern,)
    if not pattern or any(isinstance(i, bool) or not isinstance(i, int) or i < 1
                          for i in pattern):
        raise ValueError(f"pattern must be a non-empty multi-index of positive ints "
                         f"(how often each direction is differentiated), got {pattern!r}")
    return pattern


def polarization_rule(pattern) -> tuple[torch.Tensor, torch.Tensor]:
    """Directions and weights of the Griewank-Utke-Walther interpolation for ``pattern``.

    For a multi-index ``i = (i_1..i_p)``, ``d = |i|``, the mixed partial
    ``D^d f(x)[v_1^{i_1}, ..., v_p^{i_p}] = sum_j gamma_ij c_d(sum_l j_l v_l)`` over the integer
    multi-indices ``j`` with ``|j| = d``, where ``c_d(w)`` is the order-``d`` normalized Taylor
    coefficient of ``t -> f(x + t w)`` and
    ``gamma_ij = sum_{0 < k <= i} (-1)^{|i - k|} binom(i, k) binom(d k / |k|, j) (|k| / d)^d``
    (multi-index binomials are products; ``binom(r, j)`` is generalized for real ``r``).
    Only the ``j`` with ``gamma_ij != 0`` are returned.

    Returns: ``weights`` (int64 ``[M, p]``: direction m is ``sum_l weights[m, l] v_l``) and
    ``gamma`` (float64 ``[M]``).
    """
    dirs, gammas = _polarization_table(tuple(check_pattern(pattern)))
    return torch.tensor(dirs, dtype=torch.int64), torch.tensor(gammas, dtype=torch.float64)


def polarization_size(pattern) -> int:
    """``M``, the number of directions of :func:`polarization_rule` for ``pattern``."""
    return len(_polarization_table(tuple(check_pattern(pattern)))[0])


@torch.compiler.assume_constant_result  # plain numbers of the pattern: constants when traced
def _polarization_table(i: tuple[int, ...]) -> tuple[tuple, tuple]:
    """``(directions, gammas)`` of :func:`polarization_rule` as tuples, for a checked pattern."""
    return _polarization_numbers(i)


@functools.lru_cache(maxsize=64)
def _polarization_numbers(i: tuple[int, ...]) -> tuple[tuple, tuple]:
    d = sum(i)
    ks = [k for k in product(*(range(n + 1) for n in i)) if sum(k) > 0]
    dirs, gammas = [], []
    for j in product(*(range(d + 1) for _ in i)):
        if sum(j) != d:
            continue
        g = 0.0
        for k in ks:
            sign = (-1) ** (d - sum(k))
            c_ik = math.prod(math.comb(n, m) for n, m in zip(i, k))
            c_j = math.prod(gen_binom(d * m / sum(k), jl) for m, jl in zip(k, j))
            g += sign * c_ik * c_j * (sum(k) / d) ** d
        if abs(g) > 1e-12:
            dirs.append(j)
            gammas.append(g)
    return tuple(dirs), tuple(gammas)


FORWARD_AD_LOCK = threading.RLock()
"""Held around every forward-mode AD computation (``torch.func.jvp``): torch numbers its
forward-AD levels per process, not per thread, so two threads' nested jvps interleaved raised
"Trying to access a forward AD level with an invalid index", or returned another thread's
tangents (a QA run: 15-27 of 60 overlapping third-order calls failed, some off by 0.1)."""


def nested_jvp_coefficients(fn, coeffs, order: int):
    """Normalized Taylor coefficients of ``t -> fn(*[sum_k c_k t^k for c in coeffs])`` at 0.

    Nested ``torch.func.jvp`` (``order`` levels, ``O(2^order)`` cost): the independent check of
    the jet recurrences, and the engine's fallback for ops it has no rule for. ``coeffs`` is a
    list of ``[J+1, ...]`` tensors (``J <= order`` is padded with zeros); ``fn`` returns a tensor
    or a tuple of tensors. Returns ``[order+1, ...]`` (a tuple of them for tuple outputs).
    """
    def curve(t):
        args = []
        for c in coeffs:
            acc = c[-1]
            for k in range(c.shape[0] - 2, -1, -1):  # Horner in t
                acc = c[k] + t * acc
            args.append(acc)
        return fn(*args)

    def derivs(n):
        if n == 0:
            return lambda t: (curve(t),)
        inner = derivs(n - 1)

        def g(t):
            outs, tangents = torch.func.jvp(inner, (t,), (torch.ones_like(t),))
            return (outs[0],) + tuple(tangents)
        return g

    t0 = torch.zeros((), dtype=coeffs[0].dtype, device=coeffs[0].device)
    with FORWARD_AD_LOCK:
        ds = derivs(order)(t0)
    fact = [math.factorial(k) for k in range(order + 1)]
    if isinstance(ds[0], tuple):
        return tuple(torch.stack([ds[k][m] / fact[k] for k in range(order + 1)])
                     for m in range(len(ds[0])))
    return torch.stack([ds[k] / fact[k] for k in range(order + 1)])


def seeded_generator(seed, default: int | None = None) -> torch.Generator:
    """A private CPU generator seeded with ``seed`` (an int), else with ``default``, else with
    a seed drawn from the global RNG; ``TypeError`` for a seed that is not an int,
    ``ValueError`` for one outside ``[0, 2**64)``."""
    if seed is None:
        seed = default if default is not None else int(torch.randint(0, 2**62, (1,)))
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int or None, got {type(seed).__name__} {seed!r}")
    if not 0 <= seed < 2**64:  # (torch's range; 2**70 raised a bare overflow)
        raise ValueError(f"seed must be in [0, 2**64), got {seed}")
    return torch.Generator(device="cpu").manual_seed(seed)
