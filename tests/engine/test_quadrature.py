"""Quadrature rules: Captum's nodes/weights, and the nested Patterson sequence."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from captum.attr._utils.approximation_methods import approximation_parameters

from taylor_kernels.engine import quadrature


@pytest.mark.parametrize("rule", quadrature.CAPTUM_RULES)
@pytest.mark.parametrize("steps", [2, 7, 50])
def test_captum_rules_identical(rule, steps):
    step_sizes, alphas = approximation_parameters(rule)
    t, w = quadrature.nodes_and_weights(rule, steps)
    np.testing.assert_allclose(t.numpy(), alphas(steps), rtol=0, atol=1e-7)
    np.testing.assert_allclose(w.numpy(), step_sizes(steps), rtol=1e-12, atol=0)


def test_trapezoid_is_exact_on_lines():
    t, w = quadrature.nodes_and_weights("trapezoid", 5)
    assert torch.isclose((w * (3 * t + 1)).sum(), torch.tensor(2.5, dtype=torch.float64))


@pytest.mark.parametrize("bad", [("nope", 5), ("gausslegendre", 0), ("riemann_left", 1),
                                 ("gausslegendre", 2.5), ("adaptive", 5)])
def test_bad_rule_or_steps(bad):
    with pytest.raises(ValueError):
        quadrature.nodes_and_weights(*bad)


def test_patterson_nested_and_exact():
    nodes, levels = quadrature.patterson_levels()
    assert [int((w != 0).sum()) for w in levels] == list(quadrature.PATTERSON_SIZES)
    assert ((nodes > 0) & (nodes < 1)).all() and len(set(nodes.tolist())) == len(nodes)
    x = (2 * nodes - 1).numpy()

    def error(w, k):  # |rule(L_k) - int L_k| on [-1, 1] scaled to [0, 1]
        return abs(float((w.numpy() * np.polynomial.legendre.legval(x, [0] * k + [1])).sum())
                   - (1.0 if k == 0 else 0.0))

    # Known degrees of exactness of the Patterson sequence: 1, 5, 11, 23, 47, 95.
    for w, degree in zip(levels, (1, 5, 11, 23, 47, 95)):
        assert (w[w != 0] > 0).all()
        assert max(error(w, k) for k in range(degree + 1)) < 1e-13
        assert error(w, degree + 1) > 1e-11  # and not one degree more
