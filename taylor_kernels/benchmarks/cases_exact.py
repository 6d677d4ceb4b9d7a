"""Family ``exact``: ``rule="exact"`` on ReLU networks vs 50-step quadrature and our adaptive rule.

For every input (zero baseline, target = the predicted class):

* ours exact: ``tk.integrated_gradients(rule="exact")`` -> regions crossed per input, the
  relative completeness gap ``|sum(attr) - (f(x) - f(0))| / |f(x) - f(0)|``, time;
* Captum ``IntegratedGradients`` with ``gausslegendre`` and ``riemann_trapezoid`` at
  ``n_steps=50`` (one batch), and ours ``rule="adaptive", tol=1e-4``: time, completeness gap
  and the attribution error against the exact rule, ``max_i |A_i - A^exact_i| / max_i
  |A^exact_i|`` per input (the worst input reported).

Models: the ReLU version of the demo's digits CNN (trained on scikit-learn's digits, test
images; skipped without scikit-learn) and ReLU MLPs ``784 -> w -> w -> 10`` (w = 256, 512,
1024; a narrow ``64 -> 32 -> 32 -> 10`` shows the few-regions regime), trained a few hundred
Adam steps on a synthetic teacher task, standard-normal inputs; float64 and float32.
"""
from __future__ import annotations

import copy
import warnings

import torch

import taylor_kernels as tk
from taylor_kernels.benchmarks import models
from taylor_kernels.benchmarks.report import error_text, fmt_time, format_table
from taylor_kernels.benchmarks.timing import measure

STEPS = 50
TOL = 1e-4
NARROW = {"model": "mlp", "d_in": 64, "hidden": 32, "classes": 10, "act": "relu", "seed": 0}
TINY = {"model": "mlp", "d_in": 8, "hidden": 16, "classes": 3, "act": "relu", "seed": 0}


def _mlp(width: int) -> dict:
    return {"model": "mlp", "d_in": 784, "hidden": width, "classes": 10, "act": "relu",
            "seed": 0}


# (name, model spec or "digits", training steps / epochs, dtypes, batch)
CASES = {
    "smoke": [("mlp_relu_tiny", TINY, 20, ("float64",), 2)],
    "quick": [("digits_relu_cnn", "digits", 10, ("float64", "float32"), 8),
              ("mlp_64-32x2", NARROW, 300, ("float64", "float32"), 16),
              ("mlp_784-256x2", _mlp(256), 300, ("float64", "float32"), 8),
              ("mlp_784-512x2", _mlp(512), 300, ("float32",), 8),
              ("mlp_784-1024x2", _mlp(1024), 300, ("float32",), 4)],
    "full": [("digits_relu_cnn", "digits", 20, ("float64", "float32"), 32),
             ("mlp_64-32x2", NARROW, 600, ("float64", "float32"), 64),
             ("mlp_784-256x2", _mlp(256), 600, ("float64", "float32"), 32),
             ("mlp_784-512x2", _mlp(512), 600, ("float64", "float32"), 16),
             ("mlp_784-1024x2", _mlp(1024), 600, ("float64", "float32"), 16)],
}
REPEATS = {"smoke": 1, "quick": 3, "full": 5}


def _digits(epochs: int):
    """The ReLU digits CNN and the first test images (None without scikit-learn)."""
    try:
        import sklearn  # noqa: F401
    except ImportError:
        return None
    from taylor_kernels.demo import digits
    from taylor_kernels.demo.exact import DigitsReluCNN
    x_tr, y_tr, x_te, _ = digits.load_data(0.2, seed=0)
    model = digits.train(digits.TrainConfig(epochs=epochs), x_tr, y_tr, arch=DigitsReluCNN)
    return model, x_te


def _build(spec, train, batch: int, device):
    """``(float32 model, inputs [batch, ...])``, or None when the case cannot run here."""
    if spec == "digits":
        got = _digits(train)
        if got is None:
            return None
        model, x = got
        return model.to(device), x[:batch].to(device)
    model = models.build(spec, device, torch.float32)
    models.train_synthetic(model, spec, train)
    x, _ = models.batch(spec, batch, device, torch.float32, seed=5)
    return model, x


def _rel_error(attr: torch.Tensor, exact: torch.Tensor) -> float:
    a, e = attr.detach().flatten(1).double(), exact.detach().flatten(1).double()
    return ((a - e).abs().amax(1) / e.abs().amax(1).clamp_min(1e-300)).max().item()


def _rel_gap(gap: torch.Tensor, delta: torch.Tensor) -> float:
    return (gap.detach().abs().double() / delta.abs().double().clamp_min(1e-300)).max().item()


def run_case(name, model, x, dtype_name, repeats, device, log=print) -> dict:
    """One row: every method on one model and batch in one dtype."""
    from captum.attr import IntegratedGradients
    dtype = getattr(torch, dtype_name)
    model, x = copy.deepcopy(model).to(dtype).eval(), x.to(dtype)
    with torch.no_grad():
        out = model(x)
        target = out.argmax(1)
        delta = (out - model(torch.zeros_like(x))).gather(1, target[:, None])[:, 0]
    row = {"case": name, "dtype": dtype_name, "batch": x.shape[0]}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ex = tk.integrated_gradients(model, x, target=target, rule="exact")
        ada = tk.integrated_gradients(model, x, target=target, rule="adaptive", tol=TOL)
    row["warnings"] = [str(w.message)[:200] for w in caught]
    regions = ex.regions.double()
    row.update({"regions_mean": regions.mean().item(), "regions_max": int(regions.max()),
                "exact_rel_gap": _rel_gap(ex.gap, delta),
                "adaptive_evals_per_input": ada.evaluations / x.shape[0],
                "adaptive_rel_gap": _rel_gap(ada.gap, delta),
                "adaptive_err": _rel_error(ada.attributions, ex.attributions)})
    ig = IntegratedGradients(model)
    for key, method in (("gl", "gausslegendre"), ("trap", "riemann_trapezoid")):
        attr, cdelta = ig.attribute(x, target=target, n_steps=STEPS, method=method,
                                    return_convergence_delta=True)
        row[f"{key}_rel_gap"] = _rel_gap(cdelta, delta)
        row[f"{key}_err"] = _rel_error(attr, ex.attributions)
    calls = {
        "exact": lambda: tk.integrated_gradients(model, x, target=target, rule="exact"),
        "gl": lambda: ig.attribute(x, target=target, n_steps=STEPS, method="gausslegendre"),
        "trap": lambda: ig.attribute(x, target=target, n_steps=STEPS,
                                     method="riemann_trapezoid"),
        "adaptive": lambda: tk.integrated_gradients(model, x, target=target, rule="adaptive",
                                                    tol=TOL)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for key, fn in calls.items():
            t = measure(fn, warmup=1 if repeats > 1 else 0, repeats=repeats, device=device)
            row[f"{key}_s"] = t.median
            row[f"{key}_time"] = t.as_dict()
    row["exact_vs_gl_time"] = row["exact_s"] / row["gl_s"]
    log(f"[exact]   {name} {dtype_name}: regions mean {row['regions_mean']:.0f} (max "
        f"{row['regions_max']}), exact gap {row['exact_rel_gap']:.1e}, GL-50 error "
        f"{row['gl_err']:.1e}, exact {fmt_time(row['exact_s'])} vs GL-50 "
        f"{fmt_time(row['gl_s'])}")
    return row


def run(tier: str, device: torch.device, log=print) -> dict:
    rows = []
    for name, spec, train, dtypes, batch in CASES[tier]:
        built = _build(spec, train, batch, device)
        if built is None:
            rows.append({"case": name, "skipped": True,
                         "error": "needs scikit-learn (digits data set)"})
            log(f"[exact] {name}: skipped (needs scikit-learn)")
            continue
        log(f"[exact] {name}: batch {batch}")
        for dtype_name in dtypes:
            try:
                rows.append(run_case(name, *built, dtype_name, REPEATS[tier], device, log))
            except Exception as exc:  # noqa: BLE001
                rows.append({"case": name, "dtype": dtype_name, "error": error_text(exc)})
                log(f"[exact]   {name} {dtype_name}: FAILED {rows[-1]['error']}")
    notes = ["regions = linear regions the path from the zero baseline crosses (per input); "
             "rel gap = max over inputs of |sum(attr) - (f(x) - f(0))| / |f(x) - f(0)|",
             "err = max over inputs of max|A - A_exact| / max|A_exact| (attribution error "
             "against rule='exact' in the same dtype)",
             f"GL-50 / trap-50: Captum IntegratedGradients, gausslegendre / riemann_trapezoid, "
             f"n_steps={STEPS}, one batch; adaptive: ours, tol={TOL:g}",
             "exact/GL-50 = time of rule='exact' over Captum GL-50 (target: <= 1 when fewer "
             "than 50 regions are crossed)"]
    return {"rows": rows, "notes": notes}


def tables(result: dict) -> list[str]:
    e = ".1e"
    cols = [("case", "case", ""), ("dtype", "dtype", ""), ("batch", "B", "d"),
            ("regions_mean", "regions", ".0f"), ("regions_max", "max", "d"),
            ("exact_rel_gap", "exact gap", e), ("exact_s", "exact time", fmt_time),
            ("gl_s", "GL-50 time", fmt_time), ("exact_vs_gl_time", "exact/GL-50", ".2f"),
            ("gl_rel_gap", "GL-50 gap", e), ("gl_err", "GL-50 err", e),
            ("trap_s", "trap-50 time", fmt_time), ("trap_rel_gap", "trap-50 gap", e),
            ("trap_err", "trap-50 err", e), ("adaptive_s", "adapt time", fmt_time),
            ("adaptive_evals_per_input", "adapt evals/in", ".1f"),
            ("adaptive_rel_gap", "adapt gap", e), ("adaptive_err", "adapt err", e)]
    if any("error" in r for r in result["rows"]):
        cols.append(("error", "error", ""))
    return [format_table("exact (rule='exact' on ReLU networks vs 50-step quadrature)",
                         result["rows"], cols, result["notes"])]
