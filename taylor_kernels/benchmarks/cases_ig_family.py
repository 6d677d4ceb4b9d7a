"""Family ``ig_family``: EG, SIG and layer IG, ours vs the equivalent Captum computation.

Per (case, method): time (median of repeats) and peak memory in a fresh subprocess
(:mod:`memprobe`), and the max difference of the attributions from Captum's:

* EG vs Captum ``GradientShap(stdevs=0)`` (the same estimator; different random draws, so the
  difference is Monte Carlo noise, reported but not expected to be small);
* SIG vs a loop of ``M`` Captum ``IntegratedGradients`` calls over the same coalition
  baselines (same draws: the difference is rounding);
* layer IG (first layer's output) vs Captum's ``LayerIntegratedGradients``, same rule/steps.

Reported per input: ``time / B``. Captum runs without ``internal_batch_size``.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from taylor_kernels.benchmarks.cases_ig import CNN, MLP, TINY, run_probe
from taylor_kernels.benchmarks.report import error_text, fmt_bytes, fmt_time, format_table

# (case name, model spec, batch, {method: extra spec})
CASES = {
    "smoke": [("mlp_tiny", TINY, 4, {"eg": {"samples": 8, "steps": 1},
                                    "sig": {"coalitions": 3, "steps": 4},
                                    "layer_ig": {"steps": 8}})],
    "quick": [("mlp_784-256-256-10", MLP, 32, {"eg": {"samples": 64, "steps": 1},
                                              "sig": {"coalitions": 16, "steps": 16},
                                              "layer_ig": {"steps": 50}}),
              ("cnn_3x32x32", CNN, 16, {"eg": {"samples": 64, "steps": 1},
                                        "sig": {"coalitions": 8, "steps": 16},
                                        "layer_ig": {"steps": 50}})],
}
CASES["full"] = CASES["quick"]
REPEATS = {"smoke": 1, "quick": 3, "full": 7}


def _row(tmp: str, name: str, spec: dict, batch: int, method: str, extra: dict, who: str,
         device, repeats: int) -> tuple[dict, torch.Tensor | None]:
    path = Path(tmp) / f"{name}-{who}-{method}.pt"
    probe = {"model_spec": spec, "batch": batch, "method": f"{who}_{method}", "device":
             str(device), "dtype": "float32", "warmup": 1, "repeats": repeats,
             "attr_path": str(path), "memory_repeats": 1, **extra}
    row = {"case": name, "family": method, "who": who, "batch": batch, **extra}
    try:
        row.update(run_probe(probe))
    except Exception as exc:  # noqa: BLE001  (a failed probe is reported, not fatal)
        row["error"] = error_text(exc, 400)
        return row, None
    row["per_input_s"] = row["median_s"] / batch
    return row, torch.load(path)


def run(tier: str, device: torch.device, log=print) -> dict:
    rows = []
    with tempfile.TemporaryDirectory(prefix="tk-bench-") as tmp:
        for name, spec, batch, methods in CASES[tier]:
            for method, extra in methods.items():
                captum, ref = _row(tmp, name, spec, batch, method, extra, "captum", device,
                                   REPEATS[tier])
                ours, attr = _row(tmp, name, spec, batch, method, extra, "ours", device,
                                  REPEATS[tier])
                if ref is not None and attr is not None:
                    diff = (attr.double() - ref.double()).abs().max().item()
                    ours["max_rel_diff_vs_captum"] = diff / max(ref.abs().max().item(), 1e-300)
                    ours["time_ratio_vs_captum"] = ours["median_s"] / captum["median_s"]
                    if captum["peak_bytes"] > 0:
                        ours["mem_ratio_vs_captum"] = ours["peak_bytes"] / captum["peak_bytes"]
                rows += [captum, ours]
                log(f"[ig_family] {name} {method}: captum "
                    f"{fmt_time(captum.get('median_s'))}, ours {fmt_time(ours.get('median_s'))}")
    notes = ["EG: Captum GradientShap(stdevs=0) is the same estimator with other random draws "
             "(rel diff = Monte Carlo noise); SIG: Captum = a loop of M IG calls over our "
             "coalition baselines; layer IG: first layer's output",
             "time/captum, mem/captum = ours / Captum (fresh subprocess per measurement)"]
    return {"rows": rows, "notes": notes}


def tables(result: dict) -> list[str]:
    cols = [("case", "case", ""), ("family", "method", ""), ("who", "impl", ""),
            ("median_s", "median", fmt_time), ("per_input_s", "per input", fmt_time),
            ("time_ratio_vs_captum", "time/captum", ".2f"), ("peak_bytes", "peak mem", fmt_bytes),
            ("mem_ratio_vs_captum", "mem/captum", ".2f"),
            ("max_rel_diff_vs_captum", "rel diff", ".1e")]
    if any("error" in r for r in result["rows"]):
        cols.append(("error", "error", ""))
    return [format_table("ig_family: EG, SIG, layer IG vs Captum (float32)", result["rows"],
                         cols, result["notes"])]
