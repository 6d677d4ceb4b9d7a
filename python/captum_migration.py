"""Migrating from Captum: one import line, same code, same numbers; timings side by side.

The switch::

    # from captum.attr import (IntegratedGradients, LayerIntegratedGradients,
    #                          NoiseTunnel, GradientShap)
    from taylor_kernels.captum import (IntegratedGradients, LayerIntegratedGradients,
                                       NoiseTunnel, GradientShap)

Everything else stays: constructors, ``attribute`` arguments, tensor/tuple return forms,
``return_convergence_delta``; the other path methods (``LayerConductance``,
``InternalInfluence``, ``NeuronIntegratedGradients``, ``NeuronConductance``,
``LayerGradientShap``) switch the same way. Code you cannot edit (a library that creates
Captum's classes itself, such as Inseq) switches with ``taylor_kernels.captum.patch()``, or
``with taylor_kernels.captum.patched(): ...``. NoiseTunnel and GradientShap draw the same random numbers as
Captum under the same ``torch.manual_seed`` / ``numpy.random.seed``. This script runs the SAME
function ``explain`` once with ``captum.attr`` and once with ``taylor_kernels.captum`` on a
small CNN, and prints per method the time of each and the maximum absolute difference.
Extras ours accepts beyond Captum: ``max_memory=`` (chunking to a memory budget instead of one
huge batch), ``method="adaptive"`` with ``tol=``, ``backend=``, ``progress=``.

Usage: python python/captum_migration.py [--small] [--batch 16] [--size 32] [--steps 50]
       [--repeats 3] [--dtype float32|float64] [--device cpu|cuda] [--out results.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

try:
    import taylor_kernels  # noqa: F401
except ModuleNotFoundError:  # running from a source checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import captum.attr as captum_attr  # noqa: E402  (the library we migrate from)

import taylor_kernels.captum as tk_captum  # noqa: E402  (the drop-in)
from taylor_kernels.cli import device_arg, require_writable  # noqa: E402


class SmallCNN(nn.Module):
    """conv-relu-pool x2 -> linear: ``[B, 3, S, S] -> [B, 10]``."""

    def __init__(self, size: int):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                                      nn.MaxPool2d(2))
        self.head = nn.Linear(32 * (size // 4) ** 2, 10)

    def forward(self, x):
        return self.head(self.features(x).flatten(1))


def explain(lib, model, x, target, steps: int) -> dict:
    """The user's code: written once, run with either library namespace ``lib``."""
    out = {}
    ig = lib.IntegratedGradients(model)
    out["IntegratedGradients"] = lambda: ig.attribute(x, target=target, n_steps=steps,
                                                      return_convergence_delta=True)[0]
    lig = lib.LayerIntegratedGradients(model, model.features[0])
    out["LayerIntegratedGradients"] = lambda: lig.attribute(x, target=target, n_steps=steps)
    nt = lib.NoiseTunnel(lib.IntegratedGradients(model))
    out["NoiseTunnel(IG) smoothgrad"] = lambda: nt.attribute(
        x, nt_type="smoothgrad", nt_samples=4, stdevs=0.1, target=target,
        n_steps=max(2, steps // 5))
    conv = model.features[0]
    lc = lib.LayerConductance(model, conv)
    out["LayerConductance"] = lambda: lc.attribute(x, target=target, n_steps=steps)
    ii = lib.InternalInfluence(model, conv)
    out["InternalInfluence"] = lambda: ii.attribute(x, target=target, n_steps=steps)
    nig = lib.NeuronIntegratedGradients(model, conv)
    out["NeuronIntegratedGradients"] = lambda: nig.attribute(x, (3, 1, 1), n_steps=steps)
    gs = lib.GradientShap(model)
    background = torch.zeros(8, *x.shape[1:], dtype=x.dtype, device=x.device)
    background[4:] = 0.5
    out["GradientShap"] = lambda: gs.attribute(x, background, n_samples=20, stdevs=0.05,
                                               target=target)
    return out


def timed(fn, repeats: int, device: torch.device):
    """Best wall time of ``repeats`` runs (each from the same seeds) and the last result."""
    best, result = float("inf"), None
    for _ in range(repeats):
        torch.manual_seed(0)
        np.random.seed(0)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        result = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return best, result


def run(batch: int, size: int, steps: int, repeats: int, dtype: torch.dtype,
        device: torch.device) -> list[dict]:
    torch.manual_seed(0)
    model = SmallCNN(size).to(device=device, dtype=dtype).eval()
    x = torch.rand(batch, 3, size, size, dtype=dtype, device=device)
    target = torch.arange(batch, device=device) % 10
    theirs = explain(captum_attr, model, x, target, steps)
    ours = explain(tk_captum, model, x, target, steps)
    rows = []
    for name in theirs:
        t_ref, ref = timed(theirs[name], repeats, device)
        t_ours, got = timed(ours[name], repeats, device)
        diff = (got - ref).abs().max().item()
        rows.append({"method": name, "captum_s": t_ref, "ours_s": t_ours,
                     "speedup": t_ref / t_ours, "max_abs_diff": diff,
                     "max_abs_captum": ref.abs().max().item()})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=16, help="images per batch")
    p.add_argument("--size", type=int, default=32, help="image side (multiple of 4)")
    p.add_argument("--steps", type=int, default=50, help="IG steps (both libraries)")
    p.add_argument("--repeats", type=int, default=3,
                   help="timed runs per method (the best is reported)")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32",
                   help="model and input dtype")
    p.add_argument("--device", type=device_arg,
                   default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--small", action="store_true", help="tiny sizes (smoke test)")
    p.add_argument("--out", default=None, help="write the table as JSON here")
    a = p.parse_args(argv)
    if a.out:
        require_writable(Path(a.out), p.prog)  # before the run, not after it
    if a.small:
        a.batch, a.size, a.steps, a.repeats = 3, 8, 8, 1
    if a.size % 4:
        p.error("--size must be a multiple of 4")
    warnings.filterwarnings("ignore", category=UserWarning, module="captum")
    device, dtype = a.device, getattr(torch, a.dtype)
    rows = run(a.batch, a.size, a.steps, a.repeats, dtype, device)
    print(f"SmallCNN, batch {a.batch}, 3x{a.size}x{a.size}, n_steps {a.steps}, {a.dtype}, "
          f"{device}")
    print(f"{'method':<28} {'captum [s]':>10} {'ours [s]':>10} {'speedup':>8} "
          f"{'max |diff|':>11} {'max |attr|':>11}")
    for r in rows:
        print(f"{r['method']:<28} {r['captum_s']:10.4f} {r['ours_s']:10.4f} "
              f"{r['speedup']:7.2f}x {r['max_abs_diff']:11.3e} {r['max_abs_captum']:11.3e}")
    if a.out:
        with open(a.out, "w") as fh:
            settings = {k: str(v) if k == "device" else v for k, v in vars(a).items()
                        if k != "out"}
            json.dump({"settings": settings, "rows": rows}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
