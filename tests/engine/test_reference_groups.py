"""Drawn references integrated a group at a time (engine/reference_groups.py): the same
attributions as all at once, groups sized by the budget."""
import pytest
import torch

import taylor_kernels as tk
from taylor_kernels.engine import path_engine, reference_groups
from taylor_kernels.engine.problem import make_problem
from tests import models


def _count_integrals(monkeypatch) -> list:
    """Record the references' count ``K`` of every path integral of the call."""
    seen, real = [], path_engine.integrate

    def spy(problem, *a, **kw):
        seen.append(problem.baselines.shape[1])
        return real(problem, *a, **kw)
    monkeypatch.setattr(path_engine, "integrate", spy)
    return seen


def test_group_size_fits_the_share_of_the_budget():
    x = torch.zeros(4, 3, 16, 16)                                  # D = 768, 3 KB per row
    problem = make_problem(models.cnn(torch.float32, channels=3, size=16), x, None, 0)
    per_reference = 4 * 768 * 4                                    # B D itemsize
    budget = 40 * per_reference                                    # fits 10 references
    assert reference_groups.group_size(problem, 64, budget) == 10  # 7 groups: 10 x 6 + 4
    assert reference_groups.group_size(problem, 8, budget) == 8    # all at once
    assert reference_groups.group_size(problem, 64, 4) == 1        # at least one
    assert reference_groups.group_size(problem, 21, 40 * per_reference) == 7  # 3 equal groups


@pytest.mark.parametrize("rule", [None, "exact"])
def test_expected_gradients_in_groups_equal_one_group(monkeypatch, rule):
    model = models.mlp(d_in=6, act=torch.nn.ReLU if rule else torch.nn.Tanh)
    g = torch.Generator().manual_seed(3)
    x, bg = torch.randn(3, 6, generator=g, dtype=torch.float64), torch.randn(
        40, 6, generator=g, dtype=torch.float64)
    whole = tk.expected_gradients(model, x, bg, target=1, samples=12, seed=5, rule=rule)
    seen = _count_integrals(monkeypatch) if rule is None else []
    monkeypatch.setattr(reference_groups, "REFERENCE_SHARE", 5 * 3 * 6 * 8 / 2**40)
    groups = tk.expected_gradients(model, x, bg, target=1, samples=12, seed=5, rule=rule,
                                   max_memory="1024GB")
    if rule is None:
        assert seen == [4, 4, 4]                  # 5 fit: three groups of four
    torch.testing.assert_close(groups.attributions, whole.attributions, rtol=1e-12,
                               atol=1e-12)
    torch.testing.assert_close(groups.gap, whole.gap, rtol=1e-10, atol=1e-12)
    if rule is None:
        assert groups.evaluations == whole.evaluations
    else:  # the exact rule pads a batch of paths to its longest: fewer pads in small groups
        assert torch.equal(groups.regions, whole.regions)
        assert groups.evaluations <= whole.evaluations


def test_expected_gradients_groups_keep_the_graph(monkeypatch):
    """DAPr trains through EG's attributions: the groups' weighted sum keeps the graph."""
    model = models.mlp(d_in=5)
    g = torch.Generator().manual_seed(0)
    x, bg = torch.randn(2, 5, generator=g, dtype=torch.float64), torch.randn(
        9, 5, generator=g, dtype=torch.float64)

    def weight_grad():
        model.zero_grad()
        res = tk.expected_gradients(model, x, bg, target=0, samples=6, seed=1,
                                    create_graph=True, max_memory="1024GB")
        res.attributions.pow(2).sum().backward()
        return model[0].weight.grad.clone()
    whole = weight_grad()
    monkeypatch.setattr(reference_groups, "REFERENCE_SHARE", 2 * 2 * 5 * 8 / 2**40)
    torch.testing.assert_close(weight_grad(), whole, rtol=1e-10, atol=1e-12)


def test_shapley_ig_in_groups_equal_one_group(monkeypatch):
    model = models.cnn(channels=1, size=4)
    x = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(2),
                    dtype=torch.float64)
    whole = tk.shapley_integrated_gradients(model, x, target=2, coalitions=10, seed=7,
                                            steps=8)
    seen = _count_integrals(monkeypatch)
    monkeypatch.setattr(reference_groups, "REFERENCE_SHARE", 3 * 2 * 16 * 8 / 2**40)
    groups = tk.shapley_integrated_gradients(model, x, target=2, coalitions=10, seed=7,
                                             steps=8, max_memory="1024GB")
    assert seen == [3, 3, 3, 1]                   # 3 fit: four groups (ceil(10 / 4) = 3)
    torch.testing.assert_close(groups.attributions, whole.attributions, rtol=1e-12,
                               atol=1e-12)
    torch.testing.assert_close(groups.gap, whole.gap, rtol=1e-10, atol=1e-12)


def test_expected_gradients_checks_each_groups_drawn_rows(monkeypatch):
    model = models.mlp(d_in=4)
    bg = torch.randn(6, 4, dtype=torch.float64)
    bg[4, 2] = float("nan")
    monkeypatch.setattr(reference_groups, "REFERENCE_SHARE", 1e-12)
    with pytest.raises(ValueError, match="background row 4 contains NaN"):
        tk.expected_gradients(model, torch.randn(2, 4, dtype=torch.float64), bg, target=0,
                              samples=40, seed=0)


def test_expected_gradients_refuses_an_unknown_rule():
    model = models.mlp(d_in=4)
    with pytest.raises(ValueError, match="rule must be None or 'exact'"):
        tk.expected_gradients(model, torch.randn(2, 4, dtype=torch.float64),
                              torch.randn(5, 4, dtype=torch.float64), target=0, samples=3,
                              rule="adaptive")
