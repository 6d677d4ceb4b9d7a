"""Public jet ops: dispatch to the selected backend, plus fake kernels and autograd formulas.

Native ops ``torch.ops.taylor_kernels.jet_unary(u, fn)`` / ``jet_mul(a, b)`` are defined in C++
(``csrc/ops.cpp``); the Triton ops are ``*_triton`` ``triton_op``s. All get the fake kernels and
autograd formulas of :func:`register_jet_meta`:

- ``jet_mul``: ``c_k = sum_j a_j b_{k-j}``, so ``dL/da_j = sum_{k>=j} g_k b_{k-j}``, which is
  ``flip(jet_mul(flip(g), b))_j``: the backward is again a ``jet_mul`` (differentiable to any
  order, and runs on the same backend).
- ``jet_unary``: the backward re-runs the reference recurrences under autograd and pulls the
  cotangent through them (``create_graph`` when the caller asks for higher derivatives), so
  it is exact to every order at the cost of one reference forward.
"""
from __future__ import annotations

import torch

from taylor_kernels import _native, backends
from taylor_kernels.op_checks import check_same_device
from taylor_kernels.reference import jet as ref
from taylor_kernels.reference.jet import (FNS, check_jet, check_jet_pair, check_polarize_args,
                                          fn_code, polarization_rule)


def _fake_jet_unary(u, fn):
    check_jet(u)  # (the real op's checks: shape inference took 40 coefficients, fn code 99)
    fn_code(fn)
    return torch.empty_like(u, memory_format=torch.contiguous_format)


def _fake_jet_mul(a, b):
    check_jet_pair(a, b)
    return torch.empty_like(a, memory_format=torch.contiguous_format)


def _setup_unary(ctx, inputs, output):
    u, fn = inputs
    ctx.save_for_backward(u)
    ctx.fn = fn


def _backward_unary(ctx, grad_out):
    (u,) = ctx.saved_tensors
    create = torch.is_grad_enabled()  # true under create_graph: keep the backward differentiable
    with torch.enable_grad():
        leaf = u if (create and u.requires_grad) else u.detach().requires_grad_(True)
        y = ref.jet_unary(ctx.fn, leaf)
        (gu,) = torch.autograd.grad(y, leaf, grad_out, create_graph=create)
    return gu, None


def _setup_mul(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward_mul(ctx, grad_out):
    a, b = ctx.saved_tensors
    g = grad_out.flip(0)
    ga = jet_mul(g, b).flip(0) if ctx.needs_input_grad[0] else None
    gb = jet_mul(g, a).flip(0) if ctx.needs_input_grad[1] else None
    return ga, gb


def _fake_polarize(c, gamma, order):
    check_polarize_args(c, gamma, order)
    check_same_device(c=c, gamma=gamma)
    return c.new_empty(c.shape[2])


def _setup_polarize(ctx, inputs, output):
    c, gamma, order = inputs
    ctx.save_for_backward(c, gamma)
    ctx.order = order


def _backward_polarize(ctx, grad_out):
    """``out_n = sum_m g_m c[d, m, n]``: ``dc[d] = g (x) grad``, ``dg_m = sum_n c[d, m, n] grad_n``
    (both linear in the saved tensors, so the backward is differentiable again)."""
    c, gamma = ctx.saved_tensors
    gc = gg = None
    if ctx.needs_input_grad[0]:
        gc = torch.zeros_like(c)
        gc[ctx.order] = (gamma.to(grad_out.dtype)[:, None] * grad_out[None, :]).to(c.dtype)
    if ctx.needs_input_grad[1]:
        gg = (c[ctx.order].to(grad_out.dtype) * grad_out).sum(-1).to(gamma.dtype)
    return gc, gg, None


def register_jet_meta(unary_op: str, mul_op: str, polarize_op: str) -> None:
    """Register fake kernels and autograd formulas for a backend's jet ops."""
    torch.library.register_fake(unary_op)(_fake_jet_unary)
    torch.library.register_fake(mul_op)(_fake_jet_mul)
    torch.library.register_fake(polarize_op)(_fake_polarize)
    torch.library.register_autograd(unary_op, _backward_unary, setup_context=_setup_unary)
    torch.library.register_autograd(mul_op, _backward_mul, setup_context=_setup_mul)
    torch.library.register_autograd(polarize_op, _backward_polarize,
                                    setup_context=_setup_polarize)


def _native_has_jet() -> bool:
    return _native.has_cpp() and hasattr(torch.ops.taylor_kernels, "polarize_contract")


if _native_has_jet():
    register_jet_meta("taylor_kernels::jet_unary", "taylor_kernels::jet_mul",
                      "taylor_kernels::polarize_contract")


def _reference_unary(u, code):
    return ref.jet_unary(code, u)


def _backend_fns(op: str, *tensors: torch.Tensor):
    name = backends.resolve_for(op, *tensors)
    if name == "reference" or (name in ("cpp", "cuda") and not _native_has_jet()):
        return _reference_unary, ref.jet_mul, ref.polarize_contract
    if name == "triton":
        from taylor_kernels.triton import jet as triton_jet
        return triton_jet.jet_unary, triton_jet.jet_mul, triton_jet.polarize_contract
    ops = torch.ops.taylor_kernels
    return ops.jet_unary, ops.jet_mul, ops.polarize_contract


def jet_unary(fn: str | int, u: torch.Tensor) -> torch.Tensor:
    """Taylor coefficients of ``fn(u(t))`` for all orders in one pass.

    Args: ``fn`` a name in ``FNS`` (tanh, sigmoid, exp, log, softplus, gelu, gelu_tanh, silu,
    sin, cos, relu, square, reciprocal, sqrt, rsqrt) or its code; ``u [J+1, N]`` normalized
    coefficients ``u_k = u^(k)(0)/k!`` (any strides), ``J <= 15``.
    Returns: ``[J+1, N]`` in ``u.dtype`` (computed in float32, float64 for float64), contiguous.
    Recurrences: :mod:`taylor_kernels.reference.jet`. Differentiable in ``u`` (any order).
    """
    code = fn_code(fn)
    check_jet(u)
    return _backend_fns("jet_unary", u)[0](u, code)


def jet_mul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Truncated Cauchy product ``c_k = sum_{j=0..k} a_j b_{k-j}`` of two ``[J+1, N]`` jets.

    Returns ``[J+1, N]`` in the inputs' dtype (float32 / float64 arithmetic), contiguous.
    Differentiable in both arguments (the backward is a ``jet_mul``).
    """
    check_jet_pair(a, b)
    return _backend_fns("jet_mul", a, b)[1](a, b)


def polarize_contract(c: torch.Tensor, gamma: torch.Tensor, order: int) -> torch.Tensor:
    """``out [N] = sum_m gamma_m c[order, m, :]`` for directional jets ``c [J+1, M, N]`` and
    polarization weights ``gamma [M]`` (float32 arithmetic, float64 for float64 ``c``).
    Differentiable in ``c`` and ``gamma``."""
    check_polarize_args(c, gamma, order)
    return _backend_fns("polarize_contract", c, gamma)[2](c, gamma.to(c.device), int(order))


def polarize(c: torch.Tensor, pattern) -> torch.Tensor:
    """Mixed partial ``D^d f[v_1^{i_1}, ..., v_p^{i_p}]`` from jets ``c [J+1, M, ...]`` along
    the ``M`` directions of :func:`polarization_rule` (``pattern``): the Griewank-Utke-Walther
    contraction ``sum_m gamma_m c[d, m, ...]`` on the selected backend. Returns ``[...]``."""
    return ref.polarize(c, pattern, contract=polarize_contract)


__all__ = ["FNS", "jet_mul", "jet_unary", "polarization_rule", "polarize", "polarize_contract",
           "register_jet_meta"]
