"""scikit-learn's digits (8x8 images, 1797 samples, shipped with scikit-learn): a small smooth
CNN, its training, and a weight cache keyed by a hash of the training configuration."""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from taylor_kernels.engine.chunking import quiet_threads

ARCH = "digits-cnn-v1"


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 20
    batch_size: int = 64
    lr: float = 3e-3
    seed: int = 0
    test_fraction: float = 0.2

    def key(self) -> str:
        """Hash of the architecture and every training setting (the cache key)."""
        blob = json.dumps({"arch": ARCH, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


class DigitsCNN(nn.Module):
    """conv3x3(1->16) tanh, conv3x3(16->32) tanh, avgpool2, linear(512->10): smooth, so the
    integrated-gradient integrand is smooth and quadrature converges fast."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 16, 3, padding=1)
        self.c2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc = nn.Linear(32 * 4 * 4, 10)

    def forward(self, x):
        h = torch.tanh(self.c1(x))
        h = nn.functional.avg_pool2d(torch.tanh(self.c2(h)), 2)
        return self.fc(h.flatten(1))


def load_data(test_fraction: float = 0.2, seed: int = 0):
    """``(x_train, y_train, x_test, y_test)``: images ``[N, 1, 8, 8]`` scaled to [0, 1]."""
    from sklearn.datasets import load_digits  # optional dependency (checked by the caller)

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = int(round(test_fraction * len(y)))
    test, train = perm[:n_test], perm[n_test:]
    return x[train], y[train], x[test], y[test]


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def train(cfg: TrainConfig, x: torch.Tensor, y: torch.Tensor, arch=None) -> nn.Module:
    """Adam on cross-entropy, shuffled mini-batches, deterministic for a given config
    (``arch``: the model class, default :class:`DigitsCNN`)."""
    torch.manual_seed(cfg.seed)
    model = (arch or DigitsCNN)()
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    model.train()
    for _ in range(cfg.epochs):
        perm = torch.randperm(len(y), generator=gen)
        for i in range(0, len(y), cfg.batch_size):
            idx = perm[i:i + cfg.batch_size]
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def default_cache_dir() -> Path:
    """``$TAYLOR_KERNELS_CACHE``, else ``$XDG_CACHE_HOME/taylor_kernels``, else
    ``~/.cache/taylor_kernels``."""
    if os.environ.get("TAYLOR_KERNELS_CACHE"):
        return Path(os.environ["TAYLOR_KERNELS_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "taylor_kernels"


def trained_model(cfg: TrainConfig, x: torch.Tensor, y: torch.Tensor,
                  cache_dir: Path | None) -> tuple[nn.Module, dict]:
    """The trained model, from ``cache_dir/<arch>-<key>.pt`` when present (else trained and
    saved there; ``cache_dir=None`` disables the cache). Returns ``(model, info)``."""
    path = cache_dir / f"{ARCH}-{cfg.key()}.pt" if cache_dir is not None else None
    if path is not None and path.is_file():
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
            model = DigitsCNN()
            model.load_state_dict(blob["state_dict"])
            return model.eval(), {"cached": True, "cache_path": str(path), "train_s": 0.0}
        except Exception as exc:  # noqa: BLE001  (a corrupt or stale file: retrain)
            print(f"demo: ignoring unreadable cache {path} ({exc}); retraining")
    t0 = time.perf_counter()
    with quiet_threads():
        model = train(cfg, x, y)
    info = {"cached": False, "cache_path": None, "train_s": time.perf_counter() - t0}
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            torch.save({"state_dict": model.state_dict(), "config": asdict(cfg), "arch": ARCH},
                       tmp)
            tmp.replace(path)
            info["cache_path"] = str(path)
        except OSError as exc:
            print(f"demo: could not write the weight cache {path} ({exc})")
    return model, info
