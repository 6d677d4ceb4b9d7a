"""Learned attribution priors (DAPr; Weinberger, Janizek and Lee, NeurIPS 2020).

A prediction model ``f_theta: [B, D] -> [B, C]`` and a prior model ``g_beta`` that maps each
feature's meta-features ``m_j [M]`` to a scalar are trained jointly on

    ``L = CE(f_theta(X), y) + lambda * mean_{i,j} |g_beta(m_j) - phi_ij|``

where ``phi [B, D]`` are expected-gradient attributions of the true class (one background
reference and one ``t ~ U(0, 1)`` per sample), computed by :func:`tk.expected_gradients` with
``create_graph=True`` so the penalty trains ``theta`` through the double backward of the path
ops. Training uses Adam on both networks and early stopping on validation accuracy (the best
state is restored).

Public API: :func:`feature_metadata`, :class:`PriorNet`, :func:`attribution_prior_penalty`,
:func:`dapr_loss`, :func:`fit`, :class:`FitResult`.
"""
from __future__ import annotations

import contextlib
import copy
import math
import numbers
from dataclasses import dataclass, field

import torch
from torch import nn

from taylor_kernels.attr.expected_gradients import expected_gradients
from taylor_kernels.engine.guards import allow_row_coupling
from taylor_kernels.models.outputs import model_output
from taylor_kernels.numerics import seeded_generator
from taylor_kernels.progress import progress_bar


def feature_metadata(x_train: torch.Tensor) -> torch.Tensor:
    """Meta-features ``m_j = (std_j, mean_j)`` of each column of ``x_train [N, D]``: ``[D, 2]``."""
    if x_train.dim() != 2 or x_train.shape[0] < 2:
        raise ValueError(f"x_train must be [N >= 2, D], got {tuple(x_train.shape)}")
    return torch.stack([x_train.std(0), x_train.mean(0)], dim=1)


class PriorNet(nn.Module):
    """``g_beta: [D, M] -> [D]``, a small MLP applied to each feature's meta-features."""

    def __init__(self, meta_dim: int = 2, hidden: int = 16):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(meta_dim, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, meta: torch.Tensor) -> torch.Tensor:
        if meta.dim() != 2:
            raise ValueError(f"meta-features must be [D, M], got {tuple(meta.shape)}")
        return self.net(meta).squeeze(1)


def attribution_prior_penalty(attributions: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
    """``mean_{i,j} |prior_j - phi_ij|`` for ``attributions phi [B, D]`` and ``prior [D]``."""
    if attributions.dim() != 2 or prior.shape != attributions.shape[1:]:
        raise ValueError(f"attributions [B, D] and prior [D] expected, got "
                         f"{tuple(attributions.shape)} and {tuple(prior.shape)}")
    return (prior.unsqueeze(0) - attributions).abs().mean()


def dapr_loss(model: nn.Module, prior_net: nn.Module | None, meta: torch.Tensor | None,
              x: torch.Tensor, y: torch.Tensor, background: torch.Tensor, lam: float,
              seed: int | None = None) -> tuple[torch.Tensor, dict]:
    """``CE(f(x), y) + lam * penalty`` for one batch ``x [B, D]``, labels ``y [B]``.

    ``phi`` = expected gradients of the true class, one reference from ``background [N, D]``
    and one ``t`` per input, differentiable (``create_graph``), of the model as it trains:
    in train mode its dropout is active and its batch norm uses the batch's statistics (the
    attribution runs inside :func:`taylor_kernels.allow_row_coupling`, which keeps the
    running statistics as they were; the cross-entropy forward updates them). ``lam = 0``
    (or no prior net) is plain cross-entropy. Returns ``(loss, {"ce", "penalty"} floats)``.
    """
    _check_lam(lam)
    if lam > 0 and prior_net is not None and not isinstance(meta, torch.Tensor):
        raise ValueError("lam > 0 with a prior_net needs the features' meta-data: meta "
                         f"[D, M] (feature_metadata), got {type(meta).__name__}")
    ce = nn.functional.cross_entropy(model_output(model(x)), y)
    if lam == 0 or prior_net is None:
        return ce, {"ce": ce.item(), "penalty": 0.0}
    with allow_row_coupling(model):  # a training model: refused there (dropout) before
        phi = expected_gradients(model, x, background, target=y, samples=1, seed=seed,
                                 chunk_size=x.shape[0], create_graph=True).attributions
    penalty = attribution_prior_penalty(phi, prior_net(meta))
    return ce + lam * penalty, {"ce": ce.item(), "penalty": penalty.item()}


def _check_prior(prior_net: nn.Module, meta, x: torch.Tensor) -> None:
    """``ValueError`` unless ``prior_net(meta)`` gives one prior per feature of ``x [N, D]``
    (a wrong ``meta`` failed inside the first batch's penalty with a bare shape error)."""
    if not isinstance(meta, torch.Tensor) or meta.dim() != 2 or meta.shape[0] != x[0].numel():
        what = tuple(meta.shape) if isinstance(meta, torch.Tensor) else type(meta).__name__
        raise ValueError(f"meta must be [D, M] with D = {x[0].numel()} features, got {what}")
    try:
        with torch.no_grad(), _modes_kept(prior_net):
            prior = prior_net.eval()(meta)
    except RuntimeError as exc:
        raise ValueError(f"prior_net cannot read meta of shape {tuple(meta.shape)}: {exc} "
                         f"(meta has {meta.shape[1]} columns; PriorNet(meta_dim="
                         f"{meta.shape[1]}) reads them)") from exc
    if prior.shape != (meta.shape[0],):
        raise ValueError(f"prior_net(meta) must give one prior per feature, [{meta.shape[0]}], "
                         f"got {tuple(prior.shape)}")


def _check_lam(lam) -> None:
    """``ValueError`` unless ``lam`` is a finite real >= 0 (NaN passed ``lam < 0`` and turned
    the weights into NaN at the first step)."""
    if isinstance(lam, bool) or not isinstance(lam, numbers.Real) or not math.isfinite(lam) \
            or lam < 0:
        raise ValueError(f"lam must be a finite number >= 0, got {lam!r}")


@dataclass
class FitResult:
    """Training history (per epoch: the mean cross-entropy and penalty over its batches, the
    validation accuracy), the best epoch and its validation accuracy."""

    best_epoch: int
    best_val_accuracy: float
    history: list[dict] = field(default_factory=list)


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Fraction of ``argmax f(x) == y`` for ``x [N, ...]`` and labels ``y [N]``, in eval mode
    (dropout off, batch norm on its running statistics; the model's modes are restored),
    without grad. A ``ModelOutput`` or dict output is read as the library reads it (its
    ``.logits``)."""
    _check_labels("y", x, y)
    with _modes_kept(model):
        model.eval()
        return (model_output(model(x)).argmax(1) == y).double().mean().item()


def _check_labels(name: str, x: torch.Tensor, y: torch.Tensor) -> None:
    """``ValueError`` unless ``y`` holds one integer class label per row of ``x``: ``[N]``
    (labels ``[N, 1]`` compared with ``[N]`` predictions broadcast to ``[N, N]``, and a
    perfect model scored 0.5)."""
    if not isinstance(y, torch.Tensor) or y.dim() != 1 or y.shape[0] != x.shape[0] \
            or y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        what = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
        raise ValueError(f"{name} must be integer class labels [N] for X of {x.shape[0]} "
                         f"rows, got {what}" + (f" {y.dtype}" if isinstance(y, torch.Tensor)
                                                else ""))


@contextlib.contextmanager
def _modes_kept(*nets: nn.Module):
    """Every submodule's train/eval mode put back on exit."""
    modes = [(m, m.training) for n in nets for m in n.modules()]
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


def _epoch(model, prior_net, meta, train: tuple, lam: float, starts: list[int], opt, gen,
           epoch: int) -> dict:
    """One epoch of Adam steps over ``train``'s rows in a random order (batches from
    ``starts``); returns the mean cross-entropy and penalty, weighted by batch size."""
    xt, yt = train
    order = torch.randperm(xt.shape[0], generator=gen)
    totals = {"ce": 0.0, "penalty": 0.0}
    for i, j in zip(starts, starts[1:] + [xt.shape[0]]):
        idx = order[i:j]
        loss, parts = dapr_loss(model, prior_net, meta, xt[idx], yt[idx], xt, lam,
                                seed=int(torch.randint(0, 2**31, (1,), generator=gen)))
        if not all(math.isfinite(v) for v in parts.values()):
            raise FloatingPointError(f"non-finite loss in epoch {epoch} ({parts}); the best "
                                     "states so far are restored: lower lr or lam")
        opt.zero_grad()
        loss.backward()
        opt.step()
        for k in totals:
            totals[k] += parts[k] * len(idx) / xt.shape[0]
    return totals


def _stopped_early(bar, epochs_run: int) -> None:
    """End ``bar`` at the epochs run, named an early stop."""
    bar.set_description_str("fit (early stop)", refresh=False)
    bar.total = epochs_run
    bar.refresh()


@torch.enable_grad()
def fit(model: nn.Module, train: tuple, val: tuple, *, prior_net: nn.Module | None = None,
        meta: torch.Tensor | None = None, lam: float = 0.0, epochs: int = 200,
        batch_size: int = 32, lr: float = 1e-3, patience: int = 20,
        seed: int = 0, progress: bool = False) -> FitResult:
    """Train ``model`` (and ``prior_net`` jointly when ``lam > 0``) with Adam and early stopping.

    Args: ``train = (X [N, D], y [N])``, ``val`` likewise; ``meta [D, M]`` the features'
    meta-data (:func:`feature_metadata`); the EG background is the training set. Stops after
    ``patience`` epochs without a better validation accuracy and restores the best states.
    Runs with grad enabled (also under the caller's ``torch.no_grad()``) and the networks in
    train mode (dropout on, batch norm on batch statistics), their modes restored after; a
    last batch of one row joins the batch before it. ``progress``: a tqdm bar over the epochs,
    the last epoch's losses and validation accuracy in its postfix (an early stop ends it at
    the epochs run, saying so). ``seed`` fixes the shuffling, the EG references and the
    dropout masks (drawn inside a fork of the global RNG, which is left as it was).
    """
    _check_lam(lam)
    for name, value, least in (("epochs", epochs, 1), ("batch_size", batch_size, 1),
                               ("patience", patience, 0)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < least:
            raise ValueError(f"{name} must be a {('non-negative', 'positive')[least]} "
                             f"integer, got {value!r}")
    if lam > 0 and (prior_net is None or meta is None):
        raise ValueError("lam > 0 needs a prior_net and the features' meta-data")
    xt, yt = train
    for name, (X, y) in (("train", train), ("val", val)):
        if X.shape[0] == 0 or X.shape[0] != y.shape[0]:
            raise ValueError(f"{name} must hold (X [N, D], y [N]) with N >= 1 rows in both, "
                             f"got {tuple(X.shape)} and {tuple(y.shape)}")
        _check_labels(f"{name} y", X, y)
        if X.shape[1:] != xt.shape[1:]:
            raise ValueError(f"val X has rows of shape {tuple(X.shape[1:])}, train X "
                             f"{tuple(xt.shape[1:])}")
        if X.is_floating_point() and not torch.isfinite(X).all():
            raise ValueError(f"{name} X holds NaN or Inf values")
    if lam > 0:
        _check_prior(prior_net, meta, xt)
    nets = [model] + ([prior_net] if lam > 0 else [])
    params = [p for n in nets for p in n.parameters()]
    opt = torch.optim.Adam(params, lr=lr)
    gen = seeded_generator(seed)
    best = (-1.0, 0, [copy.deepcopy(n.state_dict()) for n in nets])
    grads = [p.grad for p in params]  # the caller's .grad (None, usually), given back
    history = []
    starts = list(range(0, xt.shape[0], batch_size))
    if len(starts) > 1 and xt.shape[0] - starts[-1] == 1:
        starts.pop()  # (a last batch of one row joins the one before: batch norm needs two)
    cuda = sorted({p.device.index or 0 for p in params if p.is_cuda})
    with _modes_kept(*nets), progress_bar(progress, total=epochs, desc="fit",
                                          unit="epoch") as bar, \
            torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)  # (dropout's masks: reproducible, the caller's RNG kept)
        for net in nets:
            net.train()
        try:
            for epoch in range(epochs):
                totals = _epoch(model, prior_net, meta, train, lam, starts, opt, gen, epoch)
                val_acc = accuracy(model, *val)
                history.append({"epoch": epoch, **totals, "val_accuracy": val_acc})
                bar.set_postfix(ce=totals["ce"], penalty=totals["penalty"], val_acc=val_acc,
                                refresh=False)
                bar.update()
                if val_acc > best[0]:
                    best = (val_acc, epoch, [copy.deepcopy(n.state_dict()) for n in nets])
                elif epoch - best[1] >= patience:
                    _stopped_early(bar, epoch + 1)
                    break
        finally:  # (on an error too: the best states so far, at first the caller's)
            for net, state in zip(nets, best[2]):
                net.load_state_dict(state)
            for p, g in zip(params, grads):  # (zero_grad set them to None, never wrote them)
                p.grad = g
    return FitResult(best[1], best[0], history)
