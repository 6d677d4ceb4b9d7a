"""Family ``adaptive_evals``: model evaluations needed for ``|gap| <= 1e-4 |f(x) - f(b)|``.

For every input of a batch (zero baseline, target = the predicted class):

* ours: ``rule="adaptive", tol=1e-4`` (nested Patterson levels 1, 3, 7, 15, 31, 63 nodes,
  refined per input) -> ``res.evaluations``, per-input nodes, and whether each input meets
  the tolerance (checked strictly here, without the rounding floor ``_check_gap_tolerance``
  allows);
* Captum's default (gausslegendre, ``n_steps=50``: 50 evaluations per input), with
  ``return_convergence_delta=True`` to see whether it meets the tolerance;
* the smallest Captum gausslegendre step count at which every input meets it (scanned).

Models are smooth (tanh, GELU) and trained for a few hundred Adam steps on a synthetic
teacher task (a scaled random network of the same architecture) so their weights look
trained; float64 and float32 (the same float32-trained weights).
"""
from __future__ import annotations

import copy
import warnings

import torch

import taylor_kernels as tk
from taylor_kernels.benchmarks import models
from taylor_kernels.benchmarks.report import error_text, fmt_time, format_table
from taylor_kernels.benchmarks.timing import measure

TOL = 1e-4
CAPTUM_STEPS = 50
SCAN = list(range(1, 65)) + [80, 96, 128, 160, 192, 256]

MLP_TANH = {"model": "mlp", "d_in": 64, "hidden": 128, "classes": 10, "act": "tanh", "seed": 0}
MLP_GELU = {**MLP_TANH, "act": "gelu"}
CNN_TANH = {"model": "cnn", "channels": 1, "size": 16, "classes": 10, "widths": [8, 16],
            "act": "tanh", "seed": 0}
TINY = {"model": "mlp", "d_in": 8, "hidden": 16, "classes": 3, "act": "tanh", "seed": 0}

# (name, model spec, training steps, dtypes, batch)
CASES = {
    "smoke": [("mlp_tanh_tiny", TINY, 20, ("float64",), 4)],
    "quick": [("mlp_tanh", MLP_TANH, 300, ("float64", "float32"), 32),
              ("mlp_gelu", MLP_GELU, 300, ("float64", "float32"), 32),
              ("cnn_tanh", CNN_TANH, 400, ("float64", "float32"), 32)],
    "full": [("mlp_tanh", MLP_TANH, 600, ("float64", "float32"), 64),
             ("mlp_gelu", MLP_GELU, 600, ("float64", "float32"), 64),
             ("cnn_tanh", CNN_TANH, 800, ("float64", "float32"), 64)],
}


def _meets(gap: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    return gap.abs() <= TOL * delta.abs()


def _rel(gap: torch.Tensor, delta: torch.Tensor) -> float:
    return (gap.abs() / delta.abs().clamp_min(1e-300)).max().item()


def run_case(name, spec, train_steps, dtype_name, batch, device, trained=None, log=print):
    """One row: the model (trained once per case, cast per dtype) on one seeded batch."""
    from captum.attr import IntegratedGradients

    dtype = getattr(torch, dtype_name)
    model = (copy.deepcopy(trained).to(dtype) if trained is not None
             else models.build(spec, device, dtype))
    x, _ = models.batch(spec, batch, device, dtype, seed=5)
    with torch.no_grad():
        target = model(x).argmax(1)
        delta = (model(x) - model(torch.zeros_like(x))).gather(1, target[:, None])[:, 0]
    row = {"case": name, "dtype": dtype_name, "batch": batch, "train_steps": train_steps,
           "model_spec": spec, "tol": TOL}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = tk.integrated_gradients(model, x, target=target, rule="adaptive", tol=TOL)
    row["ours_warnings"] = [str(w.message) for w in caught]
    met = _meets(res.gap, delta)
    nodes = res.nodes_per_input
    row.update({"ours_evaluations": res.evaluations,
                "ours_evals_per_input": res.evaluations / batch,
                "ours_nodes_per_input": nodes.tolist() if nodes is not None else None,
                "ours_max_nodes": int(nodes.max()) if nodes is not None else None,
                "ours_met_fraction": met.double().mean().item(),
                "ours_worst_rel_gap": _rel(res.gap, delta)})
    ig = IntegratedGradients(model)
    _, cdelta = ig.attribute(x, target=target, n_steps=CAPTUM_STEPS, method="gausslegendre",
                             return_convergence_delta=True)
    row.update({"captum_evals_per_input": CAPTUM_STEPS,
                "captum_met_fraction": _meets(cdelta, delta).double().mean().item(),
                "captum_worst_rel_gap": _rel(cdelta, delta)})
    row["min_gl_steps"] = None
    for n in SCAN:
        _, d = ig.attribute(x, target=target, n_steps=n, method="gausslegendre",
                            return_convergence_delta=True)
        if bool(_meets(d, delta).all()):
            row["min_gl_steps"] = n
            break
    row["min_gl_scanned_up_to"] = SCAN[-1]
    t_ours = measure(lambda: tk.integrated_gradients(model, x, target=target, rule="adaptive",
                                                     tol=TOL), warmup=0, repeats=3,
                     device=device)
    t_cap = measure(lambda: ig.attribute(x, target=target, n_steps=CAPTUM_STEPS,
                                         method="gausslegendre"), warmup=0, repeats=3,
                    device=device)
    row.update({"ours_time": t_ours.as_dict(), "captum_time": t_cap.as_dict(),
                "ours_median_s": t_ours.median, "captum_median_s": t_cap.median,
                "eval_ratio_vs_captum": row["ours_evals_per_input"] / CAPTUM_STEPS})
    log(f"[adaptive_evals]   {name} {dtype_name}: ours {row['ours_evals_per_input']:.1f} "
        f"evals/input (max {row['ours_max_nodes']}), captum 50 meets "
        f"{row['captum_met_fraction']:.0%}, min GL n = {row['min_gl_steps']}")
    return row


def run(tier: str, device: torch.device, log=print) -> dict:
    rows = []
    for name, spec, train_steps, dtypes, batch in CASES[tier]:
        model = models.build(spec, device, torch.float32)  # trained in float32, then cast
        acc = models.train_synthetic(model, spec, train_steps)
        log(f"[adaptive_evals] {name}: trained {train_steps} steps (train acc {acc:.2f})")
        for dtype_name in dtypes:
            try:
                row = run_case(name, spec, train_steps, dtype_name, batch, device,
                               trained=model, log=log)
            except Exception as exc:  # noqa: BLE001
                row = {"case": name, "dtype": dtype_name, "error": error_text(exc)}
                log(f"[adaptive_evals]   {name} {dtype_name}: FAILED {row['error']}")
            row["train_accuracy"] = acc
            rows.append(row)
    notes = [f"criterion, per input: |sum(attr) - (f(x) - f(0))| <= {TOL:g} |f(x) - f(0)| "
             "(zero baseline, target = predicted class)",
             "evals/in = model forward+backward evaluations per input; ours = adaptive, "
             "Captum = 50 (its default n_steps)",
             f"min GL n = smallest Captum gausslegendre n_steps meeting it for every input "
             f"(scanned 1..64, then up to {SCAN[-1]})"]
    return {"rows": rows, "notes": notes}


def tables(result: dict) -> list[str]:
    pct = ".0%"
    cols = [("case", "case", ""), ("dtype", "dtype", ""), ("batch", "B", "d"),
            ("ours_evals_per_input", "ours evals/in", ".1f"),
            ("ours_max_nodes", "ours max nodes", "d"), ("ours_met_fraction", "ours met", pct),
            ("ours_worst_rel_gap", "ours worst", ".1e"),
            ("captum_evals_per_input", "captum evals/in", "d"),
            ("captum_met_fraction", "captum50 met", pct),
            ("captum_worst_rel_gap", "captum50 worst", ".1e"),
            ("min_gl_steps", "min GL n", "d"),
            ("eval_ratio_vs_captum", "evals ours/captum", ".2f"),
            ("ours_median_s", "ours time", fmt_time), ("captum_median_s", "captum time", fmt_time)]
    if any("error" in r for r in result["rows"]):
        cols.append(("error", "error", ""))
    return [format_table(f"adaptive_evals (tol {TOL:g}, relative completeness gap)",
                         result["rows"], cols, result["notes"])]
