"""Models and inputs of the IG benchmarks, built deterministically from a seed (so a fresh
subprocess builds exactly the same model and batch as its parent)."""
from __future__ import annotations

import torch
from torch import nn

ACTIVATIONS = {"tanh": nn.Tanh, "gelu": nn.GELU, "relu": nn.ReLU}


def mlp(d_in: int, hidden: int, classes: int, act: str = "tanh", layers: int = 2) -> nn.Module:
    """``d_in -> hidden (x layers) -> classes`` with a smooth activation."""
    mods, width = [], d_in
    for _ in range(layers):
        mods += [nn.Linear(width, hidden), ACTIVATIONS[act]()]
        width = hidden
    return nn.Sequential(*mods, nn.Linear(width, classes))


def cnn(channels: int, size: int, classes: int, widths=(16, 32), act: str = "tanh") -> nn.Module:
    """Two ``conv3x3 -> act -> avgpool2`` stages and a linear head; input ``[B, C, size, size]``."""
    c1, c2 = widths
    return nn.Sequential(
        nn.Conv2d(channels, c1, 3, padding=1), ACTIVATIONS[act](), nn.AvgPool2d(2),
        nn.Conv2d(c1, c2, 3, padding=1), ACTIVATIONS[act](), nn.AvgPool2d(2),
        nn.Flatten(), nn.Linear(c2 * (size // 4) ** 2, classes))


def build(spec: dict, device: torch.device | str = "cpu", dtype=torch.float32) -> nn.Module:
    """Model from a spec ``{"model": "mlp"|"cnn", ...}`` with seeded default initialisation."""
    torch.manual_seed(spec.get("seed", 0))
    if spec["model"] == "mlp":
        m = mlp(spec["d_in"], spec["hidden"], spec["classes"], spec.get("act", "tanh"),
                spec.get("layers", 2))
    elif spec["model"] == "cnn":
        m = cnn(spec["channels"], spec["size"], spec["classes"],
                tuple(spec.get("widths", (16, 32))), spec.get("act", "tanh"))
    else:
        raise ValueError(f"unknown model {spec['model']!r}")
    return m.to(device=device, dtype=dtype).eval()


def input_shape(spec: dict) -> tuple[int, ...]:
    if spec["model"] == "mlp":
        return (spec["d_in"],)
    return (spec["channels"], spec["size"], spec["size"])


def batch(spec: dict, n: int, device="cpu", dtype=torch.float32, seed: int = 1):
    """``n`` seeded standard-normal inputs and seeded integer targets."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *input_shape(spec), generator=g, dtype=torch.float64)
    target = torch.randint(0, spec["classes"], (n,), generator=g)
    return x.to(device=device, dtype=dtype), target.to(device)


def train_synthetic(model: nn.Module, spec: dict, steps: int, *, n_train: int = 2048,
                    lr: float = 1e-2, batch_size: int = 128, teacher_scale: float = 2.0,
                    seed: int = 2) -> float:
    """Fit ``model`` for ``steps`` Adam steps to the labels of a teacher: a network of the same
    architecture, another seed, weights scaled by ``teacher_scale`` (learnable by the student,
    so the student ends up with trained-looking weights: larger, structured, confident).
    Runs in the model's dtype and device; returns the final training accuracy."""
    p = next(model.parameters())
    g = torch.Generator().manual_seed(seed)
    teacher = build({**spec, "seed": spec.get("seed", 0) + 1000}, p.device, p.dtype)
    with torch.no_grad():
        for t in teacher.parameters():
            t.mul_(teacher_scale)
        x = torch.randn(n_train, *input_shape(spec), generator=g, dtype=torch.float64)
        x = x.to(device=p.device, dtype=p.dtype)
        y = teacher(x).argmax(1)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, n_train, (batch_size,), generator=g).to(p.device)
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        return (model(x).argmax(1) == y).double().mean().item()
