"""Argument checks of the registered ops, shared by every backend (the pure-PyTorch
reference, the public wrappers in ``ops/`` and the Triton ops, which are callable directly as
``torch.ops.taylor_kernels.*_triton`` and checked nothing: a chunk past the points wrote past
their outputs). Neutral: imports only torch and :mod:`taylor_kernels.numerics`. The native
C++ ops make the same checks in C++."""
from __future__ import annotations

import numbers

import torch

from taylor_kernels.numerics import FN_CODES, FNS, MAX_ORDER


def values_readable(t) -> bool:
    """Whether ``t``'s values can be read now: not while ``torch.compile`` traces, nor for
    ``meta`` or fake tensors (``FakeTensorMode``, ``make_fx``, ``torch.export``), whose shapes
    are all there is (a range check's ``.item()`` failed there). False for a non-tensor (the
    argument check names it)."""
    from torch._subclasses.fake_tensor import is_fake
    return isinstance(t, torch.Tensor) and not torch.compiler.is_compiling() and \
        t.device.type != "meta" and not is_fake(t)


def check_dense(name: str, t: torch.Tensor) -> None:
    """``TypeError`` unless the tensor ``t`` is dense and strided (the kernels index its
    memory by strides; a sparse or nested one failed in the dispatcher, naming no operand).
    Attributes only: ``meta`` and fake tensors pass (the fake kernels run on them)."""
    if t.is_nested or t.layout != torch.strided:
        form = "a nested tensor" if t.is_nested else f"of layout {t.layout}"
        raise TypeError(f"{name} is {form}; the ops take dense strided tensors: pass "
                        f"{name}.to_dense() (a nested one: .to_padded_tensor(0.0))")


def check_operands(**tensors: torch.Tensor) -> None:
    """``TypeError`` unless every operand is a dense real floating tensor
    (:func:`check_dense`), ``ValueError`` unless they share one device (a kernel would read
    the wrong memory otherwise)."""
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            got = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
            raise TypeError(f"{name} must be a real floating-point tensor, got {got}")
        check_dense(name, t)
    check_same_device(**tensors)


def check_same_device(**tensors: torch.Tensor) -> None:
    """``ValueError`` unless the tensors share one device. The ops' fake kernels check this
    too: an op called directly with one ``meta`` operand runs its fake kernel, which returned
    uninitialised memory on the other operands' device."""
    if len({t.device for t in tensors.values()}) > 1:
        raise ValueError(f"operands on different devices: "
                         f"{ {n: str(t.device) for n, t in tensors.items()} }")


def check_index_ints(**values) -> None:
    """``TypeError`` unless each value is an int (not a bool, float or None; a ``SymInt``
    while ``torch.compile`` traces an op)."""
    for name, v in values.items():
        if isinstance(v, bool) or not isinstance(v, (numbers.Integral, torch.SymInt)):
            raise TypeError(f"{name} must be an int, got {type(v).__name__} {v!r}")


def check_path_args(x: torch.Tensor, baselines: torch.Tensor, nodes: torch.Tensor,
                    start: int, count: int, nodes_name: str = "alphas") -> None:
    """Raise ``TypeError`` / ``ValueError`` unless the arguments describe a valid chunk of path
    points (floating operands on one device, int ``start`` and ``count``); ``nodes_name``
    names ``nodes`` in the errors as the op calls them (``alphas`` or ``weights``)."""
    check_operands(**{"x": x, "baselines": baselines, nodes_name: nodes})
    check_index_ints(start=start, count=count)
    if x.dim() != 2 or baselines.dim() != 3 or nodes.dim() not in (1, 3):
        raise ValueError(f"expected x [B, D], baselines [Bb, K, D], nodes [S] or [B, K, S]; "
                         f"got {tuple(x.shape)}, {tuple(baselines.shape)}, {tuple(nodes.shape)}")
    B, D = x.shape
    Bb, K, Db = baselines.shape
    if Db != D or Bb not in (1, B):
        raise ValueError(f"baselines {tuple(baselines.shape)} do not match x {tuple(x.shape)}")
    if nodes.dim() == 3 and tuple(nodes.shape[:2]) != (B, K):
        raise ValueError(f"per-path nodes/weights {tuple(nodes.shape)} must be [{B}, {K}, S]")
    total = B * K * nodes.shape[-1]
    if start < 0 or count < 0 or start + count > total:
        raise ValueError(f"chunk [{start}, {start + count}) outside [0, {total})")


def check_accumulate_args(grads: torch.Tensor, x: torch.Tensor, baselines: torch.Tensor,
                          weights: torch.Tensor, start: int) -> None:
    """:func:`check_path_args` for the chunk of ``grads`` ``[count, D]`` starting at ``start``."""
    check_operands(grads=grads, x=x)
    if grads.dim() != 2 or grads.shape[1] != x.shape[1]:
        raise ValueError(f"grads {tuple(grads.shape)} do not match x {tuple(x.shape)}")
    check_path_args(x, baselines, weights, start, grads.shape[0], "weights")


def check_ih_args(hrows: torch.Tensor, x: torch.Tensor, baselines: torch.Tensor,
                  weights: torch.Tensor, index: torch.Tensor, start: int,
                  index_values: bool = True) -> None:
    """Raise ``ValueError``/``TypeError`` unless the arguments describe a valid chunk
    (``index_values=False`` skips the range check of ``index``, a host sync on a GPU)."""
    check_operands(hrows=hrows, x=x)  # (first: a numpy hrows failed on .dim())
    if hrows.dim() != 3 or x.dim() != 2 or hrows.shape[2] != x.shape[1]:
        raise ValueError(f"hrows must be [count, R, D] matching x [B, D]; got "
                         f"{tuple(hrows.shape)} and {tuple(x.shape)}")
    if not isinstance(index, torch.Tensor) or index.dim() != 1 or index.dtype != torch.int64:
        raise TypeError("index must be a 1-d int64 tensor of feature numbers")
    if index.shape[0] != hrows.shape[1]:
        raise ValueError(f"index has {index.shape[0]} entries for {hrows.shape[1]} Hessian rows")
    if index.device != x.device:  # (before its values are read: a meta index has none)
        raise ValueError(f"index on device {index.device}, x on device {x.device}")
    check_path_args(x, baselines, weights, start, hrows.shape[0], "weights")
    if index_values and index.numel() and (int(index.min()) < 0 or int(index.max()) >= x.shape[1]):
        raise ValueError(f"index entries must lie in [0, {x.shape[1]})")


def fn_code(fn: str | int) -> int:
    """The integer code of an elementwise function given by name (``FNS``) or code."""
    if isinstance(fn, bool) or not isinstance(fn, (str, numbers.Integral, torch.SymInt)):
        raise TypeError(f"fn must be a name in {FNS} or its integer code, got {fn!r}")
    if not isinstance(fn, str):  # (a SymInt while torch.compile traces a Triton op)
        if not 0 <= fn < len(FNS):
            raise ValueError(f"fn code {fn} out of range [0, {len(FNS)}); names: {FNS}")
        return fn if isinstance(fn, torch.SymInt) else int(fn)  # (numpy's integers too)
    if fn not in FN_CODES:
        raise ValueError(f"unknown jet function {fn!r}; choose one of {FNS}")
    return FN_CODES[fn]


def check_jet(u: torch.Tensor, name: str = "u") -> None:
    """Raise unless ``u`` is a floating ``[J+1, N]`` jet with ``0 <= J <= MAX_ORDER``."""
    if not isinstance(u, torch.Tensor):
        raise TypeError(f"{name} must be a tensor [J+1, N], got {type(u).__name__}")
    if not u.is_floating_point():
        raise TypeError(f"{name} must be a floating point tensor, got {u.dtype}")
    check_dense(name, u)
    if u.dim() != 2 or not 1 <= u.shape[0] <= MAX_ORDER + 1:
        raise ValueError(f"{name} must be [J+1, N] with 1 <= J+1 <= {MAX_ORDER + 1}; "
                         f"got shape {tuple(u.shape)} (flatten other dims into N)")


def check_jet_pair(a: torch.Tensor, b: torch.Tensor) -> None:
    """Raise unless ``a`` and ``b`` are jets of the same shape, dtype and device."""
    check_jet(a, "a")
    check_jet(b, "b")
    if a.shape != b.shape or a.dtype != b.dtype or a.device != b.device:
        raise ValueError(f"jet_mul needs a and b of one shape/dtype/device; got "
                         f"{tuple(a.shape)} {a.dtype} {a.device} and "
                         f"{tuple(b.shape)} {b.dtype} {b.device}")


def check_polarize_args(c: torch.Tensor, gamma: torch.Tensor, order: int) -> None:
    """Raise unless ``c [J+1, M, N]``, ``gamma [M]`` (dense: :func:`check_dense`) and
    ``0 <= order <= J``."""
    for name, t in (("c", c), ("gamma", gamma)):
        if isinstance(t, torch.Tensor):
            check_dense(name, t)
    if not (isinstance(c, torch.Tensor) and c.dim() == 3 and c.is_floating_point()):
        raise ValueError(f"c must be a floating tensor [J+1, M, N], got "
                         f"{tuple(c.shape) if isinstance(c, torch.Tensor) else type(c)}")
    if not (isinstance(gamma, torch.Tensor) and gamma.dim() == 1
            and gamma.shape[0] == c.shape[1] and gamma.is_floating_point()):
        got = (f"{tuple(gamma.shape)} {gamma.dtype}" if isinstance(gamma, torch.Tensor)
               else type(gamma).__name__)
        raise ValueError(f"gamma must be a floating tensor [M] = [{c.shape[1]}], got {got}")
    if gamma.device != c.device and "meta" in (gamma.device.type, c.device.type):
        raise ValueError(f"gamma on {gamma.device}, c on {c.device}: it is copied to c's "
                         "device, and a meta tensor has no values to copy")
    check_index_ints(order=order)
    if not 0 <= order < c.shape[0]:
        raise ValueError(f"order {order} outside the jets' orders [0, {c.shape[0] - 1}]")
