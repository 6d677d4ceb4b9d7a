"""What a module computes, judged by its class: the rules written for ``torch.nn`` layers
(exact IG's piecewise-linear rules, the rule-based methods, the cached activation derivative,
the LM head's log-prob backward) hold only for a module that runs ``torch.nn``'s own
``forward``; a subclass that overrides it (Dory's LM head scales its logits per token, a LoRA
or quantized ``nn.Linear``) computes something else."""
from __future__ import annotations

from torch import nn


def runs_torch_forward(module: nn.Module) -> bool:
    """Whether ``module`` runs the ``forward`` that ``torch.nn`` itself defines for its class (a
    subclass that does not override it counts; a ``forward`` set on the instance, as
    accelerate's hooks do, does not)."""
    return "forward" not in module.__dict__ and getattr(
        type(module).forward, "__module__", "").startswith("torch.nn.")
