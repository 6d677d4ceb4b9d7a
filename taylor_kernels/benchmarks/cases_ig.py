"""Family ``ig_vs_captum``: ``tk.integrated_gradients`` vs Captum's ``IntegratedGradients``.

Same model, inputs, zero baseline, per-input targets, rule (gausslegendre) and steps (50).
Captum runs without ``internal_batch_size`` (all ``B * steps`` points in one batch), ours with
its defaults; ``ours max_memory=64MB`` shows the memory knob (not part of the comparison).
Each (case, method) runs in a fresh subprocess (:mod:`taylor_kernels.benchmarks.memprobe`):
warmup, one peak-memory call, timed repeats; attributions come back through a file.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from taylor_kernels.benchmarks.report import error_text, fmt_bytes, fmt_time, format_table

STEPS = 50
MLP = {"model": "mlp", "d_in": 784, "hidden": 256, "classes": 10, "act": "tanh", "seed": 0}
CNN = {"model": "cnn", "channels": 3, "size": 32, "classes": 10, "widths": [16, 32],
       "act": "tanh", "seed": 0}
TINY = {"model": "mlp", "d_in": 20, "hidden": 16, "classes": 3, "act": "tanh", "seed": 0}

CASES = {
    "smoke": [("mlp_tiny", TINY, 4)],
    "quick": [("mlp_784-256-256-10", MLP, 64), ("cnn_3x32x32", CNN, 32)],
    "full": [("mlp_784-256-256-10", MLP, 64), ("cnn_3x32x32", CNN, 32)],
}
REPEATS = {"smoke": 2, "quick": 3, "full": 10}
METHODS = {
    "smoke": [("captum", None), ("ours", None)],
    "quick": [("captum", None), ("ours", None), ("ours max_memory=64MB", {"max_memory": "64MB"})],
    "full": [("captum", None), ("ours", None), ("ours max_memory=64MB", {"max_memory": "64MB"})],
}


def run_probe(spec: dict, timeout: float = 900, worker: str = "memprobe") -> dict:
    """Run a worker (:mod:`memprobe`, or :mod:`interleaved`) in a fresh interpreter and parse
    its result line. A failure raises with the end of its stderr, whose last line is the
    cause (callers keep that end: :func:`report.error_text`)."""
    env = dict(os.environ)
    env.setdefault("PYTHONWARNINGS", "ignore")
    root = str(Path(__file__).resolve().parents[2])  # importable from a checkout, too
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    proc = subprocess.run([sys.executable, "-m", f"taylor_kernels.benchmarks.{worker}",
                           json.dumps(spec)], capture_output=True, text=True, timeout=timeout,
                          env=env)
    tag = f"{worker.upper()}_RESULT "
    for line in proc.stdout.splitlines()[::-1]:
        if line.startswith(tag):
            return json.loads(line[len(tag):])
    raise RuntimeError(f"{worker} failed (rc {proc.returncode}): {proc.stderr.strip()[-800:]}")


def run(tier: str, device: torch.device, log=print) -> dict:
    repeats = REPEATS[tier]
    rows = []
    with tempfile.TemporaryDirectory(prefix="tk-bench-") as tmp:
        for name, model_spec, batch in CASES[tier]:
            log(f"[ig_vs_captum] {name}: batch {batch}, {STEPS} steps gausslegendre")
            ref, captum_row = None, None
            for method, kwargs in METHODS[tier]:
                path = Path(tmp) / f"{name}-{method.replace(' ', '_')}.pt"
                spec = {"model_spec": model_spec, "batch": batch, "steps": STEPS,
                        "method": "captum" if method == "captum" else "ours",
                        "ours_kwargs": kwargs, "device": str(device), "dtype": "float32",
                        "warmup": 1, "repeats": repeats, "attr_path": str(path),
                        "memory_repeats": 1 if tier == "smoke" else 3}
                row = {"case": name, "method": method, "batch": batch, "steps": STEPS,
                       "points": batch * STEPS, "model_spec": model_spec, "kwargs": kwargs}
                try:
                    row.update(run_probe(spec))
                except Exception as exc:  # noqa: BLE001
                    row["error"] = error_text(exc)
                    log(f"[ig_vs_captum]   {method}: FAILED {row['error']}")
                    rows.append(row)
                    continue
                attr = torch.load(path)
                if method == "captum":
                    ref, captum_row = attr, row
                elif ref is not None:
                    diff = (attr.double() - ref.double()).abs().max().item()
                    row["max_abs_diff_vs_captum"] = diff
                    row["max_rel_diff_vs_captum"] = diff / max(ref.abs().max().item(), 1e-300)
                    row["time_ratio_vs_captum"] = row["median_s"] / captum_row["median_s"]
                    row["mem_ratio_vs_captum"] = (row["peak_bytes"] / captum_row["peak_bytes"]
                                                  if captum_row["peak_bytes"] > 0 else None)
                rows.append(row)
                log(f"[ig_vs_captum]   {method:22s} {row['median_s'] * 1e3:9.1f} ms  "
                    f"peak {fmt_bytes(row['peak_bytes'])}")
    notes = ["time ratio / memory ratio = ours / Captum (the issue's target: time <= 1, "
             "memory <= 0.5)",
             "peak = resident memory added by one call after warmup, in a fresh process "
             "(CPU: VmHWM reset via /proc/self/clear_refs; CUDA: max_memory_allocated)"]
    return {"rows": rows, "notes": notes, "repeats": repeats}


def tables(result: dict) -> list[str]:
    cols = [("case", "case", ""), ("method", "method", ""), ("median_s", "median", fmt_time),
            ("iqr_s", "IQR", fmt_time), ("time_ratio_vs_captum", "time/captum", ".2f"),
            ("peak_bytes", "peak mem", fmt_bytes),
            ("mem_ratio_vs_captum", "mem/captum", ".2f"),
            ("max_abs_diff_vs_captum", "max|diff|", ".1e"),
            ("max_rel_diff_vs_captum", "rel diff", ".1e"), ("ops_backend", "ops backend", "")]
    if any("error" in r for r in result["rows"]):
        cols.append(("error", "error", ""))
    return [format_table("ig_vs_captum (gausslegendre, 50 steps, float32)", result["rows"],
                         cols, result["notes"])]
