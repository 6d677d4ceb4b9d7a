"""The NaN/Inf checks of inputs, references and gradients (``numerics.finite_rows``,
``numerics.all_finite``): equal to ``torch.isfinite`` without its tensor-sized temporaries."""
from __future__ import annotations

import pytest
import torch

from taylor_kernels.numerics import all_finite, finite_rows


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_finite_rows_equals_isfinite(dtype):
    g = torch.Generator().manual_seed(0)
    t = torch.randn(40, 3, 17, generator=g).to(dtype)
    flat = t.view(-1)
    picks = torch.randperm(flat.numel(), generator=g)[:12]
    flat[picks[:4]] = float("nan")
    flat[picks[4:8]] = float("inf")
    flat[picks[8:]] = -float("inf")
    expected = torch.isfinite(t).all(-1)
    assert not expected.all() and expected.any()
    assert torch.equal(finite_rows(t), expected)
    assert torch.equal(finite_rows(t.transpose(0, 1)), torch.isfinite(t.transpose(0, 1)).all(-1))


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_all_finite_finds_one_bad_value_anywhere(value):
    t = torch.randn(5, 7, 3)
    assert all_finite(t) and all_finite(t[:, 1:]) and all_finite(t.transpose(0, 2))
    t[4, 6, 2] = value
    assert not all_finite(t) and not all_finite(t.transpose(0, 2)) and not all_finite(t[4:])
    assert not all_finite(torch.tensor(value)) and all_finite(torch.tensor(1.0))
    assert not all_finite(t[4:5, 6:7, 2:3].expand(3, 4, 5))  # an expanded view, not copied
    assert all_finite(torch.empty(0, 3)) and all_finite(torch.empty(2, 0))
