"""``torch.func`` transforms and forward-mode AD through the ``tk.ops`` wrappers: the compiled
ops carry backward formulas only (a custom op gets no forward-mode rule), so under a transform
the wrappers run the reference composite. Every backend then gives the reference's tangents
and gradients (the C++ and Triton ops gave a zero tangent, silently, and ``torch.func.grad``
refused them); plus shape propagation of ``ih_accumulate`` on fake and meta tensors."""
from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch._subclasses.fake_tensor import FakeTensorMode

import taylor_kernels as tk
from tests.ops.test_compile_wrappers import CASES, IDS


def _reference(fn, args, transform):
    with tk.backends.using("reference"):
        return transform(fn, args)


def _jvp(fn, args):
    tangents = tuple(torch.ones_like(a) if a.is_floating_point() else None for a in args)
    primals = tuple(a for a in args if a.is_floating_point())
    ints = [i for i, a in enumerate(args) if not a.is_floating_point()]

    def on_floats(*floats):
        full = list(floats)
        for i in ints:
            full.insert(i, args[i])
        return fn(*full)

    return torch.func.jvp(on_floats, primals, tuple(t for t in tangents if t is not None))[1]


def _forward_ad(fn, args):
    with fwAD.dual_level():
        duals = tuple(fwAD.make_dual(a, torch.full_like(a, 0.5)) if a.is_floating_point()
                      else a for a in args)
        return fwAD.unpack_dual(fn(*duals)).tangent


def _func_grad(fn, args):
    return torch.func.grad(lambda a0: fn(a0, *args[1:]).square().sum())(args[0])


@pytest.mark.parametrize("transform", [_jvp, _forward_ad, _func_grad],
                         ids=["func.jvp", "forward_ad", "func.grad"])
@pytest.mark.parametrize("name, fn, args", CASES, ids=IDS)
def test_transforms_through_every_backend_equal_the_reference(cpu_backend, name, fn, args,
                                                              transform):
    got = transform(fn, args)
    want = _reference(fn, args, transform)
    assert got is not None and float(want.abs().max()) > 0
    torch.testing.assert_close(got, want)


def test_ih_accumulate_propagates_fake_and_meta_tensors():
    """Its index range check read the values (``.item()``) of fake and meta tensors."""
    def args(device="cpu"):
        return (torch.randn(7, 2, 5, device=device), torch.randn(3, 5, device=device),
                torch.randn(1, 2, 5, device=device), torch.rand(4, device=device),
                torch.tensor([4, 0], device=device), 2)
    assert tk.ops.ih_accumulate(*args("meta")).shape == (3, 2, 5)
    with FakeTensorMode():
        assert tk.ops.ih_accumulate(*args()).shape == (3, 2, 5)
