"""bf16/fp16 models: the model runs in its dtype, attributions accumulate in float32.

Documented bound (per input, ``eps`` = machine epsilon of the model dtype, 2^-7 for bf16,
2^-10 for fp16):

    ``|gap_lowp| <= |gap_64| + 2 eps (|f(x)| + |f(b)| + sum_i |attr_i|)``

where ``gap_64`` is the gap of the same weights and rule in float64 (the quadrature error).
Each gradient evaluation carries a relative rounding error of a few ``eps``; with float32
accumulation these errors average over the nodes instead of growing with the number of steps,
so the bound does not depend on ``steps`` (checked up to 128 nodes).
"""
from __future__ import annotations

import copy

import pytest
import torch

import taylor_kernels as tk
from tests.models import cnn, mlp

LOW = [torch.bfloat16, torch.float16]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Small models on a busy 2-core CI machine: two intra-op threads mostly spin (imported
    by the other attribution tests of this helper's files)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _pair(kind: str, dtype: torch.dtype):
    """The same weights in float64 and in ``dtype``; an input batch exact in ``dtype``."""
    gen = torch.Generator().manual_seed(4)
    if kind == "mlp":
        m64 = mlp(d_in=20, hidden=32, d_out=3, seed=2)
        x = torch.randn(5, 20, generator=gen, dtype=torch.float64)
    else:
        m64 = cnn(seed=2)
        x = torch.randn(3, 2, 8, 8, generator=gen, dtype=torch.float64)
    x = x.to(dtype).double()
    return m64, copy.deepcopy(m64).to(dtype), x


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("steps", [8, 128])
def test_gap_bound_and_float32_accumulation(kind, dtype, steps):
    m64, mlow, x = _pair(kind, dtype)
    seen = []
    mlow.register_forward_pre_hook(lambda mod, inp: seen.append(inp[0].dtype))
    res = tk.integrated_gradients(mlow, x.to(dtype), target=1, steps=steps)
    ref = tk.integrated_gradients(m64, x, target=1, steps=steps)
    assert set(seen) == {dtype}  # the model ran in its own precision
    attr = res.attributions
    assert attr.dtype == torch.float32 and res.gap.dtype == torch.float32
    with torch.no_grad():
        fx = mlow(x.to(dtype))[:, 1].float()
        fb = mlow(torch.zeros_like(x, dtype=dtype))[:, 1].float()
    eps = torch.finfo(dtype).eps
    bound = ref.gap.abs() + 2 * eps * (fx.abs() + fb.abs() + attr.flatten(1).abs().sum(1))
    assert (res.gap.abs() <= bound).all(), (res.gap, bound)
    # attributions are as close to float64 as the model's own rounding allows (not worse
    # with more steps, which low-precision accumulation would make)
    err = (attr.double() - ref.attributions).norm() / ref.attributions.norm()
    assert err <= 2 * eps, err


@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_layer_ig_low_precision(dtype):
    """Layer IG on a bf16/fp16 model's hidden layer: float32 attributions, bounded gap."""
    m64, mlow, x = _pair("mlp", dtype)
    res = tk.layer_integrated_gradients(mlow, mlow[2], x.to(dtype), target=0, steps=16)
    ref = tk.layer_integrated_gradients(m64, m64[2], x, target=0, steps=16)
    assert res.attributions.dtype == torch.float32
    eps = torch.finfo(dtype).eps
    scale = ref.attributions.abs().sum(1) + 1
    assert (res.gap.abs() <= ref.gap.abs() + 4 * eps * scale).all()
