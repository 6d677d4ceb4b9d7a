#!/usr/bin/env python
"""Resident peak of calls under an explicit ``max_memory`` on the CPU, against the budget.

Each case runs in a fresh interpreter (``--case '<json>'``): a warm-up call on a twin model,
then the peak of a first call on a fresh model (probes included: "cold") and of a second
call ("warm"), each as ``taylor_kernels.benchmarks.memprobe`` measures it (``malloc_trim``,
``VmRSS`` baseline, ``VmHWM`` reset through ``/proc/self/clear_refs``, one call, ``VmHWM`` -
baseline). Models: a 2-conv tanh CNN on 3x32x32 (B = 8), a 2x64 GPT-2 config (B = 4,
16 tokens) and a 784-2048-2048-10 tanh MLP (a jet of order 4, 4 rows x 512 directions). ``python bench/max_memory_check.py [--only ig,eg,sig,tokig,jet]``; Linux only.
"""
import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout without install

BUDGETS = ("4MB", "8MB", "16MB", "32MB", "64MB")
CASES = [("ig", "cnn", {"K": 1}), ("ig", "cnn", {"K": 4}), ("eg", "cnn", {}),
         ("sig", "cnn", {}), ("tokig", "gpt2", {}), ("jet", "mlp", {})]


def _model(name: str):
    import torch
    torch.manual_seed(0)
    nn = torch.nn
    if name == "mlp":  # (a jet of order 4 over 512 directions of 4 rows: many passes)
        return nn.Sequential(nn.Linear(784, 2048), nn.Tanh(), nn.Linear(2048, 2048), nn.Tanh(),
                             nn.Linear(2048, 10)).eval()
    if name == "cnn":
        return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.Tanh(),
                             nn.Conv2d(16, 32, 3, padding=1), nn.Tanh(),
                             nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(512, 10)).eval()
    from transformers import GPT2Config, GPT2LMHeadModel
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=1000,
                                      n_positions=128)).eval()


def _call(case: dict, model):
    import torch

    import taylor_kernels as tk
    g = torch.Generator().manual_seed(1)
    kw = {"max_memory": case["budget"]}
    if case["model"] == "gpt2":
        ids = torch.randint(5, 1000, (4, 16), generator=g)
        return lambda: tk.token_integrated_gradients(model, ids, target=7, steps=50,
                                                     **kw).attributions
    if case["model"] == "mlp":
        x, v = torch.randn(4, 784, generator=g), torch.randn(4, 512, 784, generator=g)

        def jet():
            with torch.no_grad():
                return tk.jet(lambda z: model(z)[:, 3], x, v, order=4, **kw)
        return jet
    x = torch.randn(8, 3, 32, 32, generator=g)
    if case["entry"] == "ig":
        bl = 0.1 * torch.randn(1, case["K"], 3, 32, 32, generator=g)
        return lambda: tk.integrated_gradients(model, x, bl, target=3, steps=50,
                                               **kw).attributions
    if case["entry"] == "eg":
        bg = torch.randn(32, 3, 32, 32, generator=g)
        return lambda: tk.expected_gradients(model, x, bg, target=3, samples=64, seed=0,
                                             **kw).attributions
    return lambda: tk.shapley_integrated_gradients(model, x, reference=0.0, target=3,
                                                   coalitions=16, seed=0, **kw).attributions


def measure(case: dict) -> dict:
    """Peaks (bytes) of the cold and the warm call of ``case``, or its error."""
    import torch

    from taylor_kernels.benchmarks.memprobe import _reset_hwm, _status_kib, _trim
    torch.set_num_threads(1)
    out = dict(case)
    try:
        _call(case, _model(case["model"]))()  # warm-up on a twin (libraries, kernels)
        call = _call(case, _model(case["model"]))
        for name in ("cold", "warm"):
            _trim()
            base = _status_kib("VmRSS")
            if not _reset_hwm():
                raise RuntimeError("cannot reset VmHWM (/proc/self/clear_refs)")
            call()
            out[name] = (_status_kib("VmHWM") - base) * 1024
    except MemoryError as exc:
        out["error"] = f"MemoryError: {str(exc)[:90]}"
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--case", help=argparse.SUPPRESS)
    p.add_argument("--only", default="ig,eg,sig,tokig,jet")
    args = p.parse_args()
    if args.case:
        print("RESULT " + json.dumps(measure(json.loads(args.case))), flush=True)
        return
    only = set(args.only.split(","))
    print(f"{'case':18s} {'budget':>6s} {'cold':>8s} {'warm':>8s} {'peak/budget':>11s}")
    for entry, model, extra in CASES:
        if entry not in only:
            continue
        for budget in BUDGETS:
            case = {"entry": entry, "model": model, "budget": budget, **extra}
            run = subprocess.run([sys.executable, __file__, "--case", json.dumps(case)],
                                 capture_output=True, text=True, timeout=900)
            lines = [ln for ln in run.stdout.splitlines() if ln.startswith("RESULT ")]
            r = json.loads(lines[-1][7:]) if lines else {"error": run.stderr[-200:]}
            name = f"{entry} {model}" + (f" K={extra['K']}" if "K" in extra else "")
            if "error" in r:
                print(f"{name:18s} {budget:>6s} {r['error']}")
                continue
            limit = float(budget[:-2]) * 2**20
            print(f"{name:18s} {budget:>6s} {r['cold'] / 2**20:7.2f}M {r['warm'] / 2**20:7.2f}M"
                  f" {max(r['cold'], r['warm']) / limit:10.2f}x", flush=True)


if __name__ == "__main__":
    main()
