#!/usr/bin/env python
"""Resident peak of an IG call whose ``max_memory`` is too small for one path point, over the
budget: the call must raise ``MemoryError``; how far past the budget it got first.

A 2-conv tanh CNN (``B`` images of ``size x size``), 16 steps, one thread, in a fresh
interpreter per budget: a warm-up call on a tiny input, ``VmHWM`` reset through
``/proc/self/clear_refs``, ``VmRSS`` as the baseline, the call, ``VmHWM`` - baseline.
``python bench/too_small_budget.py [--batch 8] [--size 256] [--budgets 4MB,16MB]``; Linux.
"""
import argparse
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout without install


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))


def one(budget: str, batch: int, size: int) -> str:
    import torch
    from torch import nn

    import taylor_kernels as tk
    from taylor_kernels.engine import memory
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.Tanh(),
                          nn.Conv2d(16, 16, 3, padding=1), nn.Tanh(), nn.AdaptiveAvgPool2d(4),
                          nn.Flatten(), nn.Linear(256, 10)).eval()
    x = torch.randn(batch, 3, size, size)
    tk.integrated_gradients(model, torch.randn(1, 3, 8, 8), target=0, steps=4)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _status("VmRSS:")
    limit = memory.parse_budget(budget, torch.device("cpu"))
    try:
        tk.integrated_gradients(model, x, target=0, steps=16, max_memory=budget)
        outcome = "ran"
    except MemoryError as exc:
        outcome = "MemoryError: " + str(exc)[:90]
    peak = _status("VmHWM:") - base
    return (f"{budget:>6}  B={batch} {size}x{size}  peak {peak / 2**20:7.2f} MiB  "
            f"{peak / limit:4.1f}x  {outcome}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8, help="images per call")
    p.add_argument("--size", type=int, default=256, help="image side")
    p.add_argument("--budgets", default="4MB,16MB", help="comma-separated max_memory values")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # (a child's budget)
    a = p.parse_args()
    if a.one:
        print(one(a.one, a.batch, a.size))
        return
    for budget in a.budgets.split(","):
        out = subprocess.run([sys.executable, __file__, "--one", budget, "--batch",
                              str(a.batch), "--size", str(a.size)], capture_output=True,
                             text=True, check=True)
        print(out.stdout.strip())


if __name__ == "__main__":
    main()
