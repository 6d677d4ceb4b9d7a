"""Triton kernels of the jet ops, exposed as ``triton_op``s ``taylor_kernels::jet_*_triton``.

Same contract as :mod:`taylor_kernels.reference.jet` (recurrence table there):

- ``jet_unary(u [J+1, N], fn)``: one program per block of ``N``; the function code ``fn`` is a
  compile-time constant. The series a recurrence carries (the output ``y`` and up to three
  auxiliary series: ``1 - y^2``, ``sigmoid(u)``, ``phi(u)``, ...) live in a float32 (float64)
  workspace ``[3, J+1, N]``; coefficient ``k`` of each is written once and re-read by the
  later orders of the same program (same offsets, same threads).
- ``jet_mul(a, b)``: ``c_k = sum_j a_j b_{k-j}`` straight from the inputs.
- ``polarize_contract(c [J+1, M, N], gamma [M], order)``: ``sum_m gamma_m c[order, m, :]``, one
  program per block of ``N``, ``m`` ascending.

``u``, ``a``, ``b`` are read through their strides; outputs are contiguous. The order-0 tanh
uses Lambert's continued fraction below |x| = 1 (no ``expm1`` in Triton's portable math), so
small arguments keep full relative precision. Runs on CUDA tensors, and on CPU tensors under
``TRITON_INTERPRET=1``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from taylor_kernels.numerics import FN_CODES, accumulation_dtype
from taylor_kernels.op_checks import check_jet, check_jet_pair, check_polarize_args, fn_code
from taylor_kernels.ops.jet import register_jet_meta
from taylor_kernels.triton.index import off, row_block
from taylor_kernels.triton.launch import launcher

_BLOCK = 256
_F = {name.upper(): tl.constexpr(code) for name, code in FN_CODES.items()}
TANH, SIGMOID, EXP, LOG, SOFTPLUS = (_F["TANH"], _F["SIGMOID"], _F["EXP"], _F["LOG"],
                                     _F["SOFTPLUS"])
GELU, GELU_TANH, SILU, SIN, COS = _F["GELU"], _F["GELU_TANH"], _F["SILU"], _F["SIN"], _F["COS"]
RELU, SQUARE, RECIPROCAL, SQRT = _F["RELU"], _F["SQUARE"], _F["RECIPROCAL"], _F["SQRT"]


@triton.jit
def _get(p, s, o, k, mask, ACC: tl.constexpr):
    return tl.load(p + off(k, s) + o, mask=mask, other=0.0).to(ACC)


@triton.jit
def _put(p, s, o, k, val, mask):
    tl.store(p + off(k, s) + o, val, mask=mask)


@triton.jit
def _cauchy(ap, as_, ao, bp, bs, bo, k, mask, ACC: tl.constexpr, BLOCK: tl.constexpr):
    acc = tl.zeros([BLOCK], dtype=ACC)
    for j in range(0, k + 1):
        acc += _get(ap, as_, ao, j, mask, ACC) * _get(bp, bs, bo, k - j, mask, ACC)
    return acc


@triton.jit
def _integral(up, us, uo, zp, zs, zo, k, mask, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """(1/k) sum_{j=1..k} j u_j z_{k-j}."""
    acc = tl.zeros([BLOCK], dtype=ACC)
    for j in range(1, k + 1):
        acc += j * _get(up, us, uo, j, mask, ACC) * _get(zp, zs, zo, k - j, mask, ACC)
    return acc / k


@triton.jit
def _log1p(v):
    """``log(1 + v)`` accurate for small ``v`` (Goldberg's correction: ``1 + v`` rounds, the
    ratio ``v / (w - 1)`` restores what rounding lost; ``log(1 + v)`` lost softplus(-40))."""
    w = 1.0 + v
    exact = w == 1.0
    return tl.where(exact, v, tl.log(w) * (v / tl.where(exact, 1.0, w - 1.0)))


@triton.jit
def _tanh0(x):
    ax = tl.abs(x)
    x2 = x * x
    r = x2 * 0 + 19.0
    for i in tl.static_range(8):
        r = (17 - 2 * i) + x2 / r
    small = x / (1 + x2 / r)
    e = tl.exp(-2 * ax)
    big = (1 - e) / (1 + e)
    return tl.where(ax < 1, small, tl.where(x < 0, -big, big))


@triton.jit
def _tanh_series(up, us, uo, yp, zp, wo, N, J, u0, mask, ACC: tl.constexpr,
                 BLOCK: tl.constexpr):
    y0 = _tanh0(u0)
    tl.store(yp + wo, y0, mask=mask)
    tl.store(zp + wo, 1 - y0 * y0, mask=mask)
    for k in range(1, J + 1):
        tl.debug_barrier()
        _put(yp, N, wo, k, _integral(up, us, uo, zp, N, wo, k, mask, ACC, BLOCK), mask)
        tl.debug_barrier()
        _put(zp, N, wo, k, -_cauchy(yp, N, wo, yp, N, wo, k, mask, ACC, BLOCK), mask)


@triton.jit
def _sigmoid_series(up, us, uo, yp, zp, wo, N, J, u0, mask, ACC: tl.constexpr,
                    BLOCK: tl.constexpr):
    y0 = tl.sigmoid(u0)
    tl.store(yp + wo, y0, mask=mask)
    tl.store(zp + wo, y0 - y0 * y0, mask=mask)
    for k in range(1, J + 1):
        tl.debug_barrier()
        yk = _integral(up, us, uo, zp, N, wo, k, mask, ACC, BLOCK)
        _put(yp, N, wo, k, yk, mask)
        tl.debug_barrier()
        _put(zp, N, wo, k, yk - _cauchy(yp, N, wo, yp, N, wo, k, mask, ACC, BLOCK), mask)


@triton.jit
def _gelu_series(up, us, uo, yp, pp, Pp, qp, wo, N, J, u0, mask, ACC: tl.constexpr,
                 BLOCK: tl.constexpr):
    """p = phi(u), P = Phi(u), q = u p: p' = -q u', P' = p u'; y = u P."""
    p0 = tl.exp(-0.5 * u0 * u0) * 0.3989422804014327
    tl.store(pp + wo, p0, mask=mask)
    tl.store(Pp + wo, 0.5 * (1 + tl.erf(u0 * 0.7071067811865476)), mask=mask)
    tl.store(qp + wo, u0 * p0, mask=mask)
    for k in range(1, J + 1):
        tl.debug_barrier()
        _put(Pp, N, wo, k, _integral(up, us, uo, pp, N, wo, k, mask, ACC, BLOCK), mask)
        _put(pp, N, wo, k, -_integral(up, us, uo, qp, N, wo, k, mask, ACC, BLOCK), mask)
        tl.debug_barrier()
        _put(qp, N, wo, k, _cauchy(up, us, uo, pp, N, wo, k, mask, ACC, BLOCK), mask)
    tl.debug_barrier()
    for k in range(0, J + 1):
        _put(yp, N, wo, k, _cauchy(up, us, uo, Pp, N, wo, k, mask, ACC, BLOCK), mask)


@triton.jit
def _gelu_tanh_series(up, us, uo, yp, ap, Tp, zp, wo, N, J, mask, ACC: tl.constexpr,
                      BLOCK: tl.constexpr):
    """a = c (u + 0.044715 u^3), T = tanh(a), y = (u + u T) / 2."""
    for k in range(0, J + 1):
        _put(zp, N, wo, k, _cauchy(up, us, uo, up, us, uo, k, mask, ACC, BLOCK), mask)
    tl.debug_barrier()
    for k in range(0, J + 1):
        cube = _cauchy(zp, N, wo, up, us, uo, k, mask, ACC, BLOCK)
        ak = 0.7978845608028654 * (_get(up, us, uo, k, mask, ACC) + 0.044715 * cube)
        _put(ap, N, wo, k, ak, mask)
    tl.debug_barrier()
    a0 = _get(ap, N, wo, 0, mask, ACC)
    _tanh_series(ap, N, wo, Tp, zp, wo, N, J, a0, mask, ACC, BLOCK)
    tl.debug_barrier()
    for k in range(0, J + 1):
        uT = _cauchy(up, us, uo, Tp, N, wo, k, mask, ACC, BLOCK)
        _put(yp, N, wo, k, 0.5 * (_get(up, us, uo, k, mask, ACC) + uT), mask)


@triton.jit
def _sincos_series(up, us, uo, sp, cp, wo, N, J, u0, mask, ACC: tl.constexpr,
                   BLOCK: tl.constexpr):
    tl.store(sp + wo, tl.sin(u0), mask=mask)
    tl.store(cp + wo, tl.cos(u0), mask=mask)
    for k in range(1, J + 1):
        tl.debug_barrier()
        sk = _integral(up, us, uo, cp, N, wo, k, mask, ACC, BLOCK)
        ck = -_integral(up, us, uo, sp, N, wo, k, mask, ACC, BLOCK)
        _put(sp, N, wo, k, sk, mask)
        _put(cp, N, wo, k, ck, mask)


@triton.jit
def _log_series(up, us, uo, yp, wo, N, J, u0, mask, ACC: tl.constexpr, BLOCK: tl.constexpr):
    tl.store(yp + wo, tl.log(u0), mask=mask)
    for k in range(1, J + 1):
        tl.debug_barrier()
        acc = tl.zeros([BLOCK], dtype=ACC)
        for j in range(1, k):
            acc += j * _get(yp, N, wo, j, mask, ACC) * _get(up, us, uo, k - j, mask, ACC)
        _put(yp, N, wo, k, (_get(up, us, uo, k, mask, ACC) - acc / k) / u0, mask)


@triton.jit
def _power_series(up, us, uo, yp, wo, N, J, u0, p, mask, ACC: tl.constexpr,
                  BLOCK: tl.constexpr):
    """u^p: y_k = sum_{j=1..k} ((p+1) j - k) u_j y_{k-j} / (k u_0); y_0 stored by the caller."""
    for k in range(1, J + 1):
        tl.debug_barrier()
        acc = tl.zeros([BLOCK], dtype=ACC)
        for j in range(1, k + 1):
            acc += ((p + 1) * j - k) * _get(up, us, uo, j, mask, ACC) * \
                _get(yp, N, wo, k - j, mask, ACC)
        _put(yp, N, wo, k, acc / (k * u0), mask)


@triton.jit
def _jet_unary_kernel(u_ptr, su0, su1, y_ptr, w_ptr, N, J, FN: tl.constexpr,
                      ACC: tl.constexpr, BLOCK: tl.constexpr):
    offs = row_block(tl.program_id(0), BLOCK)
    mask = offs < N
    uo = off(offs, su1)
    SL = off(J + 1, N)  # one workspace series
    w1 = w_ptr
    w2 = w_ptr + SL
    w3 = w_ptr + 2 * SL
    u0 = tl.load(u_ptr + uo, mask=mask, other=1.0).to(ACC)
    if FN == TANH:
        _tanh_series(u_ptr, su0, uo, y_ptr, w1, offs, N, J, u0, mask, ACC, BLOCK)
    elif FN == SIGMOID:
        _sigmoid_series(u_ptr, su0, uo, y_ptr, w1, offs, N, J, u0, mask, ACC, BLOCK)
    elif FN == EXP:
        tl.store(y_ptr + offs, tl.exp(u0), mask=mask)
        for k in range(1, J + 1):
            tl.debug_barrier()
            _put(y_ptr, N, offs, k,
                 _integral(u_ptr, su0, uo, y_ptr, N, offs, k, mask, ACC, BLOCK), mask)
    elif FN == LOG:
        _log_series(u_ptr, su0, uo, y_ptr, offs, N, J, u0, mask, ACC, BLOCK)
    elif FN == SOFTPLUS or FN == SILU:
        _sigmoid_series(u_ptr, su0, uo, w1, w2, offs, N, J, u0, mask, ACC, BLOCK)
        tl.debug_barrier()
        if FN == SOFTPLUS:
            tl.store(y_ptr + offs, tl.maximum(u0, 0.0) + _log1p(tl.exp(-tl.abs(u0))),
                     mask=mask)
            for k in range(1, J + 1):
                _put(y_ptr, N, offs, k,
                     _integral(u_ptr, su0, uo, w1, N, offs, k, mask, ACC, BLOCK), mask)
        else:
            for k in range(0, J + 1):
                _put(y_ptr, N, offs, k,
                     _cauchy(u_ptr, su0, uo, w1, N, offs, k, mask, ACC, BLOCK), mask)
    elif FN == GELU:
        _gelu_series(u_ptr, su0, uo, y_ptr, w1, w2, w3, offs, N, J, u0, mask, ACC, BLOCK)
    elif FN == GELU_TANH:
        _gelu_tanh_series(u_ptr, su0, uo, y_ptr, w1, w2, w3, offs, N, J, mask, ACC, BLOCK)
    elif FN == SIN:
        _sincos_series(u_ptr, su0, uo, y_ptr, w1, offs, N, J, u0, mask, ACC, BLOCK)
    elif FN == COS:
        _sincos_series(u_ptr, su0, uo, w1, y_ptr, offs, N, J, u0, mask, ACC, BLOCK)
    elif FN == RELU:
        on = tl.where(u0 > 0, 1.0, 0.0).to(ACC)
        for k in range(0, J + 1):
            _put(y_ptr, N, offs, k, _get(u_ptr, su0, uo, k, mask, ACC) * on, mask)
    elif FN == SQUARE:
        for k in range(0, J + 1):
            _put(y_ptr, N, offs, k,
                 _cauchy(u_ptr, su0, uo, u_ptr, su0, uo, k, mask, ACC, BLOCK), mask)
    else:  # reciprocal, sqrt, rsqrt: powers -1, 1/2, -1/2
        if FN == RECIPROCAL:
            tl.store(y_ptr + offs, 1 / u0, mask=mask)
            p = -1.0
        elif FN == SQRT:
            tl.store(y_ptr + offs, tl.sqrt(u0), mask=mask)
            p = 0.5
        else:
            tl.store(y_ptr + offs, 1 / tl.sqrt(u0), mask=mask)
            p = -0.5
        _power_series(u_ptr, su0, uo, y_ptr, offs, N, J, u0, p, mask, ACC, BLOCK)


@triton.jit
def _jet_mul_kernel(a_ptr, sa0, sa1, b_ptr, sb0, sb1, out_ptr, N, J, ACC: tl.constexpr,
                    BLOCK: tl.constexpr):
    offs = row_block(tl.program_id(0), BLOCK)
    mask = offs < N
    for k in range(0, J + 1):
        acc = _cauchy(a_ptr, sa0, off(offs, sa1), b_ptr, sb0, off(offs, sb1), k, mask, ACC, BLOCK)
        _put(out_ptr, N, offs, k, acc.to(out_ptr.dtype.element_ty), mask)


def _acc(dtype: torch.dtype):
    return tl.float64 if accumulation_dtype(dtype) == torch.float64 else tl.float32


def _block(N: int) -> int:
    return min(_BLOCK, triton.next_power_of_2(max(N, 16)))


@triton_op("taylor_kernels::jet_unary_triton", mutates_args=())
def jet_unary(u: torch.Tensor, fn: int) -> torch.Tensor:
    """Triton ``jet_unary``: ``[J+1, N]`` coefficients of ``fn(u(t))`` (module docstring)."""
    fn = fn_code(fn)
    check_jet(u)
    J1, N = u.shape
    acc = accumulation_dtype(u.dtype)
    y = torch.empty(J1, N, dtype=acc, device=u.device)
    if N == 0:
        return y.to(u.dtype)
    work = torch.empty(3, J1, N, dtype=acc, device=u.device)
    block = _block(N)
    launcher(_jet_unary_kernel)[(triton.cdiv(N, block),)](
        u, u.stride(0), u.stride(1), y, work, N, J1 - 1, FN=fn, ACC=_acc(u.dtype), BLOCK=block)
    return y if y.dtype == u.dtype else y.to(u.dtype)


@triton_op("taylor_kernels::jet_mul_triton", mutates_args=())
def jet_mul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Triton ``jet_mul``: truncated Cauchy product ``[J+1, N]``."""
    check_jet_pair(a, b)
    J1, N = a.shape
    out = torch.empty(J1, N, dtype=a.dtype, device=a.device)
    if N == 0:
        return out
    block = _block(N)
    launcher(_jet_mul_kernel)[(triton.cdiv(N, block),)](
        a, a.stride(0), a.stride(1), b, b.stride(0), b.stride(1), out, N, J1 - 1,
        ACC=_acc(a.dtype), BLOCK=block)
    return out


@triton.jit
def _polarize_kernel(c_ptr, sm, sn, w_ptr, out_ptr, M, N, ACC: tl.constexpr,
                     BLOCK: tl.constexpr):
    offs = row_block(tl.program_id(0), BLOCK)
    mask = offs < N
    acc = tl.zeros([BLOCK], dtype=ACC)
    for m in range(0, M):  # ascending m: deterministic
        acc += tl.load(w_ptr + m).to(ACC) * _get(c_ptr, sm, off(offs, sn), m, mask, ACC)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton_op("taylor_kernels::polarize_contract_triton", mutates_args=())
def polarize_contract(c: torch.Tensor, gamma: torch.Tensor, order: int) -> torch.Tensor:
    """Triton ``polarize_contract``: ``[N] = sum_m gamma_m c[order, m, :]``."""
    check_polarize_args(c, gamma, order)
    M, N = c.shape[1], c.shape[2]
    out = torch.empty(N, dtype=c.dtype, device=c.device)
    if N == 0:
        return out
    w = gamma.to(device=c.device, dtype=accumulation_dtype(c.dtype)).contiguous()
    slice_ = c[order]
    block = _block(N)
    launcher(_polarize_kernel)[(triton.cdiv(N, block),)](
        slice_, slice_.stride(0), slice_.stride(1), w, out, M, N, ACC=_acc(c.dtype), BLOCK=block)
    return out


register_jet_meta("taylor_kernels::jet_unary_triton", "taylor_kernels::jet_mul_triton",
                  "taylor_kernels::polarize_contract_triton")
