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


@pytest.mark.parametrize("steps", [1, 2, 3, 16, 17, 64, 301])
def test_gauss_legendre_matches_numpy_and_integrates_exactly(steps):
    t, w = quadrature.nodes_and_weights("gausslegendre", steps)
    x, v = np.polynomial.legendre.leggauss(steps)
    np.testing.assert_allclose(t.numpy(), 0.5 * (1 + x), rtol=0, atol=1e-15)
    np.testing.assert_allclose(w.numpy(), 0.5 * v, rtol=0, atol=1e-14)  # numpy's: ~1e-12 rel
    for deg in (0, 1, 2 * steps - 1):  # exact up to degree 2n - 1
        assert abs(float((w * t**deg).sum()) - 1 / (deg + 1)) < 1e-13


def test_gauss_legendre_nodes_need_no_square_matrix(monkeypatch):
    """Many nodes are built in O(steps) memory: numpy's companion-matrix route is not used."""
    quadrature._gauss_legendre.cache_clear()

    def forbidden(*a, **k):
        raise AssertionError("leggauss builds an n x n matrix")

    monkeypatch.setattr(np.polynomial.legendre, "leggauss", forbidden)
    t, w = quadrature.nodes_and_weights("gausslegendre", 3001)
    assert t.shape == (3001,) and bool((t.diff() > 0).all())
    assert abs(float(w.sum()) - 1) < 1e-13 and abs(float((w * t).sum()) - 0.5) < 1e-13


def test_steps_beyond_free_memory_are_refused(monkeypatch):
    from taylor_kernels.engine import memory
    monkeypatch.setattr(memory, "free_memory", lambda device: 10_000)
    with pytest.raises(MemoryError, match="steps=1000 needs"):
        quadrature.nodes_and_weights("gausslegendre", 1000)


@pytest.mark.parametrize("bad", ["50", b"50", None, [50], True])
def test_steps_of_the_wrong_type_name_it(bad):
    with pytest.raises(TypeError, match="steps must be an integer") as err:
        quadrature.nodes_and_weights("gausslegendre", bad)
    if bad == "50":
        assert "the string '50'" in str(err.value) and "steps=50" in str(err.value)


def test_string_steps_reach_the_user_as_type_error():
    import taylor_kernels as tk
    model = torch.nn.Linear(3, 1).double()
    x = torch.randn(2, 3, dtype=torch.float64)
    with pytest.raises(TypeError, match="string '50'"):
        tk.integrated_gradients(model, x, steps="50")
    with pytest.raises(TypeError, match="string '8'"):
        tk.integrated_hessians(model, x, steps="8")
