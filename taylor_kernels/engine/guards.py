"""Checks run before any attribution touches the model, and probes that leave it as it was.

Every method batches rows that belong to different inputs (and different path points of one
input) into one forward: IG, EG, SIG, noise tunnel, layer IG, Taylor-CAM, IH, EH, group IH and
the fourteen methods batch path points or perturbations of all inputs; ``interactions`` and
``taylor_decomposition`` fold directions into the batch (as :func:`taylor_kernels.jet` does);
``hvp``/``hessian`` treat ``grad sum_b f_b`` as the per-row gradient. A model whose output for
one row depends on the other rows of its batch therefore gets wrong attributions by
construction, and a random one (train-mode dropout) makes the path integral noise.

Before the first forward, :func:`check_model` raises

- ``RuntimeError`` inside ``torch.inference_mode()`` (no autograd there) or for inference
  tensors as inputs;
- ``ValueError`` when a submodule couples rows or is random: batch norm or dropout in train
  mode (call ``model.eval()``),

and :func:`check_rows_independent` (attr entry points, after the model's output shape is known)
runs the model on one row alone, on that row inside a batch of two, and on the row again, and
raises ``ValueError`` when the row's output differs (a batch-mixing model) or the two single-row
outputs differ (a random model), within ``sqrt(eps)`` of the dtype relative to the output scale.

Opting in: inside ``with allow_row_coupling(model):`` both checks pass silently and the model
runs as it is (the results then depend on how the rows were batched); the model's buffers
(batch-norm running statistics, ``num_batches_tracked``) are restored when the block exits.

Probes (the one-row shape probe, the check above, layer activations) run under
:func:`preserved_buffers`, so a model that updates buffers in ``forward`` is left as it was.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Callable

import torch
from torch import nn

_ALLOWED: contextvars.ContextVar[bool] = contextvars.ContextVar("taylor_kernels_row_coupling",
                                                                  default=False)


def cell_values(f) -> list:
    """The values in the closure cells of function ``f`` (empty cells skipped)."""
    values = []
    for cell in getattr(f, "__closure__", None) or ():
        try:
            values.append(cell.cell_contents)
        except ValueError:  # an empty cell
            continue
    return values


def modules_of(f) -> list[nn.Module]:
    """The modules ``f`` is or closes over: ``f`` itself, the module of a bound method, and
    modules held in the closure cells of a function (one level)."""
    if isinstance(f, nn.Module):
        return [f]
    owner = getattr(f, "__self__", None)
    if isinstance(owner, nn.Module):
        return [owner]
    return [v for v in cell_values(f) if isinstance(v, nn.Module)]


def _check_autograd_available(inputs) -> None:
    if torch.is_inference_mode_enabled():
        raise RuntimeError("taylor_kernels cannot run inside torch.inference_mode(): attribution "
                           "needs autograd, which inference mode turns off; call it outside the "
                           "`with torch.inference_mode():` block")
    for i, t in enumerate(inputs):
        if isinstance(t, torch.Tensor) and t.is_inference():
            raise RuntimeError(f"input {i} is an inference tensor (created under "
                               "torch.inference_mode()), which autograd cannot use; pass "
                               "x.clone() made outside inference mode")


def coupling_submodules(model: nn.Module) -> list[str]:
    """Names of submodules that couple rows or are random in their current mode: batch norm
    using batch statistics (train mode, or no running statistics), dropout with ``p > 0`` in
    train mode."""
    bad = []
    for name, m in model.named_modules():
        batch_stats = isinstance(m, nn.modules.batchnorm._BatchNorm) and (
            m.training or m.running_mean is None)
        dropout = isinstance(m, nn.modules.dropout._DropoutNd) and m.training and m.p > 0
        if batch_stats or dropout:
            bad.append(f"{name or '<model>'} ({type(m).__name__}"
                       f"{', train mode' if m.training else ', batch statistics'})")
    return bad


def check_model(f, inputs=()) -> None:
    """Raise before any forward when autograd is off (inference mode, inference tensors in
    ``inputs``) or a module of ``f`` (see :func:`modules_of`) has train-mode batch norm or
    dropout, unless inside :func:`allow_row_coupling`."""
    _check_autograd_available(inputs)
    if _ALLOWED.get():
        return
    bad = [n for m in modules_of(f) for n in coupling_submodules(m)]
    if bad:
        raise ValueError(f"the model has modules that couple rows or are random: {', '.join(bad[:6])}{' ...' if len(bad) > 6 else ''}. "
                         "Attribution batches rows of different inputs and path points "
                         "together, so batch statistics or dropout make it wrong: call "
                         "model.eval() first, or opt in with "
                         "`with taylor_kernels.allow_row_coupling(model):`")


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape:
        return False
    dtype = a.dtype if a.is_floating_point() else torch.float64
    a, b = a.detach().double(), b.detach().double()
    scale = 1.0 + max(a.abs().max().item() if a.numel() else 0.0,
                      b.abs().max().item() if b.numel() else 0.0)
    return bool(((a - b).abs() <= torch.finfo(dtype).eps ** 0.5 * scale).all())


def check_rows_independent(run: Callable, row: torch.Tensor, other: torch.Tensor,
                           other_index: int) -> None:
    """Raise ``ValueError`` if ``run(points [N, D], rows [N])`` (the model's output ``[N, ...]``)
    gives row ``row [D]`` a different output alone than beside ``other [D]`` in a batch of two,
    or differs between two calls on it alone (three forwards of at most two rows, a fourth
    to tell the two apart; run it under :func:`preserved_buffers`)."""
    if _ALLOWED.get():
        return
    first = torch.zeros(1, dtype=torch.long, device=row.device)
    pair_rows = torch.tensor([0, other_index], dtype=torch.long, device=row.device)
    with torch.no_grad():
        alone = run(row.unsqueeze(0), first)
        pair = run(torch.stack([row, other]), pair_rows)
        again = run(row.unsqueeze(0), first)
        random = not _close(alone, again)
        coupled = not random and not _close(alone[0], pair[0])
        if coupled:  # a random model may have drawn the same twice: one more draw decides
            random = not _close(alone, run(row.unsqueeze(0), first))
    if random or coupled:
        why = ("gives different outputs for the same input in two calls (random, e.g. "
               "dropout in train mode)" if random else "gives an input a different output "
               "when another input shares its batch (it mixes rows, e.g. batch statistics)")
        raise ValueError(f"the model {why}; attribution batches rows of different inputs and "
                         "path points together, so its results would be wrong. Make the model "
                         "treat rows independently (model.eval()), or opt in with "
                         "`with taylor_kernels.allow_row_coupling(model):`")


@contextlib.contextmanager
def preserved_buffers(f):
    """Snapshot the buffers of the modules of ``f`` and write them back on exit (success or
    exception): probes cannot change running statistics or counters."""
    saved = [(b, b.detach().clone()) for m in modules_of(f) for b in m.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, v in saved:
                if b.shape == v.shape:
                    b.copy_(v)


@contextlib.contextmanager
def allow_row_coupling(model: nn.Module):
    """Opt in to attributing a model that couples rows or is random (train-mode batch norm or
    dropout, batch-mixing layers): inside the block, in this thread/task, the row-coupling
    checks pass, and results depend on how the rows were batched. ``model``'s buffers are
    restored when the block exits."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"allow_row_coupling needs the nn.Module whose buffers to keep, got "
                        f"{type(model).__name__}")
    token = _ALLOWED.set(True)
    try:
        with preserved_buffers(model):
            yield
    finally:
        _ALLOWED.reset(token)


def cuda_peak_bytes(run: Callable, device: torch.device):
    """``(run(), bytes)``: the CUDA allocator's peak during ``run()`` above what was live
    before it, measured with ``torch.cuda.reset_peak_memory_stats``. The caller's peak
    statistic is then raised back to its old value (one allocation up to it, skipped if that
    memory is not free), so ``torch.cuda.max_memory_allocated`` reads as it did."""
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    try:
        out = run()
        return out, float(torch.cuda.max_memory_allocated(device) - before)
    finally:
        if torch.cuda.max_memory_allocated(device) < peak:
            with contextlib.suppress(torch.cuda.OutOfMemoryError):
                del_me = torch.empty(peak - torch.cuda.memory_allocated(device),
                                     dtype=torch.uint8, device=device)
                del del_me


__all__ = ["allow_row_coupling", "cell_values", "check_model", "check_rows_independent", "coupling_submodules",
           "cuda_peak_bytes", "modules_of", "preserved_buffers"]
