"""Rules written for ``torch.nn`` layers apply only to modules that run torch's own forward: a
subclass that overrides ``forward`` (a scaled head, a LoRA layer) is not taken for its base
class by exact IG's rules, the rule-based methods or the cached activation derivative (the LM
head's case is in test_generation)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from taylor_kernels.attr.methods_rules import sequential_layers
from taylor_kernels.engine import exact_rules
from taylor_kernels.models.elementwise import is_elementwise
from taylor_kernels.models.module_kinds import runs_torch_forward


class ScaledLinear(nn.Linear):
    def forward(self, x):
        return super().forward(x) * 3.0


class PlainLinear(nn.Linear):  # a subclass that keeps torch's forward
    pass


class DoubledTanh(nn.Tanh):
    def forward(self, x):
        return 2.0 * torch.tanh(x)


def test_runs_torch_forward():
    assert runs_torch_forward(nn.Linear(2, 2)) and runs_torch_forward(nn.ReLU6())
    assert runs_torch_forward(PlainLinear(2, 2))
    assert not runs_torch_forward(ScaledLinear(2, 2)) and not runs_torch_forward(DoubledTanh())


def test_exact_rules_skip_a_subclass_with_its_own_forward():
    const = lambda t: t  # noqa: E731
    assert exact_rules.module_rule(nn.Linear(2, 2), const) is not None
    assert exact_rules.module_rule(PlainLinear(2, 2), const) is not None
    assert exact_rules.module_rule(ScaledLinear(2, 2), const) is None


def test_rule_based_methods_refuse_a_subclass_with_its_own_forward():
    assert len(sequential_layers(nn.Sequential(PlainLinear(2, 2), nn.Tanh()))) == 2
    for layer in (ScaledLinear(2, 2), DoubledTanh()):
        with pytest.raises(TypeError, match="own forward"):
            sequential_layers(nn.Sequential(nn.Linear(2, 2), layer))


def test_cached_derivative_skips_a_subclass_with_its_own_forward():
    assert is_elementwise(nn.Tanh()) and not is_elementwise(DoubledTanh())


def test_a_forward_set_on_the_instance_is_not_torchs():
    """accelerate's hooks (and a user's patch) replace ``forward`` on the instance."""
    head = nn.Linear(2, 2)
    head.forward = lambda x: 3.0 * nn.Linear.forward(head, x)
    assert not runs_torch_forward(head)
