"""Family ``hessian``: batched Hessians and Integrated Hessians against the usual tools.

Model: a tanh MLP ``D -> 64 -> 64 -> 1`` (float32, seeded), inputs ``x ~ N(0, 1)``.

* Batched Hessian ``[B, D, D]`` of the scalar output: ``tk.hessian`` (forward-over-reverse,
  vmapped over unit directions), ``torch.autograd.functional.hessian`` in its default mode
  (one call per sample: ``D`` reverse-over-reverse passes each), ``torch.func.hessian``
  vmapped over the batch (``jacfwd(jacrev)``), and an exact layer-by-layer Hessian for
  ``Linear``/``Tanh`` sequentials (``H = sum_l sum_k (df/da_lk) tanh''(z_lk) grad z_lk
  grad z_lk^T``: forward Jacobians of the pre-activations, one backward for ``df/da``).
  Error: ``max |H - H_ref| / max |H_ref|`` with ``H_ref`` from torch.func in float64.
* Integrated Hessians (zero baseline): ``tk.integrated_hessians`` (``gausslog`` rule, ``steps``
  nodes) against path_explain's ``PathExplainerTorch.interactions`` (``use_expectation=False``:
  ``sqrt(n) x sqrt(n)`` Riemann points of the double integral, a Python loop over features;
  its torch module is loaded from the installed package file because the package's
  ``__init__`` imports TensorFlow). Error: ``max |Gamma - Gamma_ref| / max |Gamma_ref|`` with
  ``Gamma_ref`` = our rule at 48 nodes in float64 (checked against 32 nodes: ``ref_selfcheck``).
  For each path_explain setting, ``speedup`` = its time / the fastest of our settings whose
  error is at most its error.
* The fused ``ih_accumulate`` op on one chunk of the HVP stream (``hrows [B*S, D, D]``) per
  backend that runs on the device, against the eager reference (same formula in PyTorch ops);
  GB/s counts the Hessian rows read once.
"""
from __future__ import annotations

import importlib.util
import math

import torch
from torch import nn

import taylor_kernels as tk
from taylor_kernels.benchmarks import models
from taylor_kernels.benchmarks.report import fmt_time, format_table
from taylor_kernels.benchmarks.timing import measure

HIDDEN = 64
# per tier: (features, Hessian batch, IH batch, path_explain samples, our steps, repeats)
CASES = {
    "smoke": [(4, 2, 2, (4,), (2,), 1)],
    "quick": [(16, 32, 8, (16, 64, 256), (1, 2, 4, 8), 7),
              (64, 32, 8, (16, 64, 256), (1, 2, 4, 8), 7)],
    "full": [(16, 128, 32, (16, 64, 256, 1024), (1, 2, 4, 8, 16), 5),
             (64, 128, 32, (16, 64, 256, 1024), (1, 2, 4, 8, 16), 5),
             (256, 64, 8, (16, 64, 256), (1, 2, 4, 8), 3)],
}


def build_mlp(D: int, device, dtype=torch.float32) -> nn.Module:
    return models.build({"model": "mlp", "d_in": D, "hidden": HIDDEN, "classes": 1,
                         "act": "tanh", "seed": 0}, device, dtype)


def scalar_fn(model: nn.Module):
    return lambda z: model(z).squeeze(-1)


def sequential_hessian(model: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """Exact ``[B, D, D]`` Hessian of a ``Linear``/``Tanh`` sequential with one output, layer
    by layer: ``H = sum_l sum_k g_lk tanh''(z_lk) J_lk J_lk^T`` where ``J_l = dz_l/dx`` (carried
    forward) and ``g_l = df/da_l`` (one backward sweep)."""
    B, D = x.shape
    a, J = x, torch.eye(D, dtype=x.dtype, device=x.device).expand(B, D, D)
    saved = []  # (tanh'(z), tanh''(z), J of z) per activation
    for layer in model:
        if isinstance(layer, nn.Linear):
            a, J = layer(a), torch.einsum("od,bdk->bok", layer.weight, J)
        elif isinstance(layer, nn.Tanh):
            y = torch.tanh(a)
            d1 = 1 - y * y
            saved.append((d1, -2 * y * d1, J))
            a, J = y, d1.unsqueeze(2) * J
        else:
            raise TypeError(f"sequential_hessian supports Linear and Tanh, got {type(layer)}")
    g = torch.ones(B, 1, dtype=x.dtype, device=x.device)
    H = torch.zeros(B, D, D, dtype=x.dtype, device=x.device)
    act = len(saved)
    for layer in reversed(model):
        if isinstance(layer, nn.Linear):
            g = g @ layer.weight
        else:
            act -= 1
            d1, d2, Jz = saved[act]
            H += torch.einsum("bk,bkd,bke->bde", g * d2, Jz, Jz)
            g = g * d1
    return H


def _hessian_methods(model, x):
    f = scalar_fn(model)
    one = lambda z: model(z.unsqueeze(0)).squeeze()  # noqa: E731
    return {
        "tk.hessian": lambda: tk.hessian(f, x),
        "autograd.functional (per sample)": lambda: torch.stack(
            [torch.autograd.functional.hessian(one, x[i]) for i in range(x.shape[0])]),
        "torch.func vmap(hessian)": lambda: torch.vmap(torch.func.hessian(one))(x),
        "layer-by-layer (Linear/Tanh)": lambda: sequential_hessian(model, x),
    }


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref).abs().max() / ref.abs().max()).item()


def run_hessian(D, B, repeats, device, log) -> list[dict]:
    model = build_mlp(D, device)
    x, _ = models.batch({"model": "mlp", "d_in": D, "classes": 1}, B, device)
    m64 = build_mlp(D, device, torch.float64)
    one64 = lambda z: m64(z.unsqueeze(0)).squeeze()  # noqa: E731
    ref = torch.vmap(torch.func.hessian(one64))(x.double()).detach()
    rows = []
    with torch.no_grad():
        for name, fn in _hessian_methods(model, x).items():
            with torch.enable_grad():
                # twice the repeats: these calls take milliseconds, medians need more samples
                t = measure(fn, warmup=1, repeats=2 * repeats, device=device)
                err = _rel_err(fn().detach(), ref)
            rows.append({"D": D, "B": B, "method": name, "median_s": t.median,
                         "time": t.as_dict(), "rel_err": err})
            log(f"[hessian]   D={D} {name}: {fmt_time(t.median)}, rel err {err:.1e}")
    base = next(r["median_s"] for r in rows if r["method"].startswith("autograd"))
    func = next(r["median_s"] for r in rows if r["method"].startswith("torch.func"))
    for r in rows:
        r["speedup_vs_autograd"] = base / r["median_s"]
        r["speedup_vs_func"] = func / r["median_s"]
    return rows


def load_path_explain():
    """``PathExplainerTorch`` from the installed path-explain, or None if not installed."""
    spec = importlib.util.find_spec("path_explain")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = f"{list(spec.submodule_search_locations)[0]}/explainers/path_explainer_torch.py"
    mod_spec = importlib.util.spec_from_file_location("_path_explainer_torch", path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    return mod.PathExplainerTorch


def _ih_reference(D, x, device):
    m64 = build_mlp(D, device, torch.float64)
    ref = tk.integrated_hessians(m64, x.double(), steps=48).interactions
    check = tk.integrated_hessians(m64, x.double(), steps=32).interactions
    return ref, _rel_err(check, ref)


def run_ih(D, B, pe_samples, steps_list, repeats, device, log) -> list[dict]:
    model = build_mlp(D, device)
    x, _ = models.batch({"model": "mlp", "d_in": D, "classes": 1}, B, device, seed=3)
    ref, selfcheck = _ih_reference(D, x, device)
    rows = []
    for steps in steps_list:
        fn = lambda: tk.integrated_hessians(model, x, steps=steps)  # noqa: E731
        t = measure(fn, warmup=1, repeats=repeats, device=device)
        res = fn()
        rows.append({"D": D, "B": B, "method": "tk.integrated_hessians", "setting":
                     f"gausslog {steps}", "median_s": t.median, "time": t.as_dict(),
                     "rel_err": _rel_err(res.interactions, ref),
                     "completeness_gap": res.completeness_gap.max().item(),
                     "ref_selfcheck": selfcheck})
        log(f"[hessian]   IH D={D} ours steps={steps}: {fmt_time(t.median)}, "
            f"rel err {rows[-1]['rel_err']:.1e}")
    explainer_cls = load_path_explain()
    if explainer_cls is None:
        log("[hessian]   path-explain not installed: its rows are skipped")
        return rows
    explainer = explainer_cls(model)
    baseline = torch.zeros(1, D, device=device)
    for n in pe_samples:
        def fn(n=n):
            xi = x.clone().requires_grad_(True)
            return explainer.interactions(xi, baseline, num_samples=n, use_expectation=False,
                                          verbose=False)
        t = measure(fn, warmup=0, repeats=min(2, repeats), device=device)  # seconds each
        err = _rel_err(fn().detach(), ref)
        ours = [r for r in rows if r["method"].startswith("tk") and r["rel_err"] <= err]
        best = min(ours, key=lambda r: r["median_s"]) if ours else None
        rows.append({"D": D, "B": B, "method": "path_explain interactions",
                     "setting": f"{int(round(math.sqrt(n)))}x{int(round(math.sqrt(n)))} "
                                f"(num_samples={n})", "median_s": t.median,
                     "time": t.as_dict(), "rel_err": err,
                     "speedup": t.median / best["median_s"] if best else None,
                     "matched_by": best["setting"] if best else None})
        log(f"[hessian]   IH D={D} path_explain n={n}: {fmt_time(t.median)}, rel err {err:.1e}")
    return rows


def run_op(D, B, S, repeats, device, log) -> list[dict]:
    """``ih_accumulate`` on a whole ``[B*S, D, D]`` chunk, per backend, vs the reference."""
    from taylor_kernels.ops.hessian import ih_accumulate
    from taylor_kernels.reference.hessian import ih_accumulate as reference

    g = torch.Generator().manual_seed(4)
    h = torch.randn(B * S, D, D, generator=g).to(device)
    x, bl = torch.randn(B, D, generator=g).to(device), torch.zeros(1, 1, D, device=device)
    w, idx = torch.rand(S, dtype=torch.float64).to(device), torch.arange(D, device=device)
    expect = reference(h, x, bl, w, idx, 0)
    rows = []
    for name in ("reference", "cpp", "cuda", "triton"):
        if not tk.backends.runs_on(name, device) or (name == "triton" and device.type == "cpu"):
            continue
        with tk.backends.using(name):
            t = measure(lambda: ih_accumulate(h, x, bl, w, idx, 0), warmup=1, repeats=repeats,
                        device=device)
            err = _rel_err(ih_accumulate(h, x, bl, w, idx, 0), expect.double())
        rows.append({"D": D, "B": B, "S": S, "backend": name, "median_s": t.median,
                     "time": t.as_dict(), "GB/s": h.numel() * h.element_size() / t.median / 1e9,
                     "rel_err": err})
        log(f"[hessian]   ih_accumulate D={D} {name}: {fmt_time(t.median)}")
    ref_t = rows[0]["median_s"]
    for r in rows:
        r["speedup_vs_reference"] = ref_t / r["median_s"]
    return rows


def run(tier: str, device: torch.device, log=print) -> dict:
    hess_rows, ih_rows, op_rows = [], [], []
    for D, B_h, B_ih, pe_samples, steps_list, repeats in CASES[tier]:
        if device.type == "cuda":  # path_explain builds its sums on the CPU: one host copy
            pe_samples = pe_samples[:2]  # per sample, ~8 s at 256 samples; the gpu_check's
            repeats = min(repeats, 5)    # step has 60-90 s for the whole family
        hess_rows += run_hessian(D, B_h, repeats, device, log)
        ih_rows += run_ih(D, B_ih, pe_samples, steps_list, repeats, device, log)
        op_rows += run_op(D, B_ih, max(steps_list), repeats, device, log)
    notes = [f"model: tanh MLP D -> {HIDDEN} -> {HIDDEN} -> 1, float32; rel err = "
             "max|out - ref| / max|ref| (ref in float64)",
             "IH speedup = path_explain time / fastest tk setting with rel err <= its rel err "
             "(matched_by); ours includes a 32-node IG for completeness_gap"]
    return {"hessian_rows": hess_rows, "ih_rows": ih_rows, "op_rows": op_rows, "notes": notes}


def tables(result: dict) -> list[str]:
    hcols = [("D", "D", "d"), ("B", "B", "d"), ("method", "method", ""),
             ("median_s", "time", fmt_time), ("speedup_vs_autograd", "x vs autograd", ".1f"),
             ("speedup_vs_func", "x vs torch.func", ".2f"), ("rel_err", "rel err", ".1e")]
    icols = [("D", "D", "d"), ("B", "B", "d"), ("method", "method", ""),
             ("setting", "setting", ""), ("median_s", "time", fmt_time),
             ("rel_err", "rel err", ".1e"), ("completeness_gap", "gap", ".1e"),
             ("speedup", "speedup", ".1f"), ("matched_by", "matched by", "")]
    ocols = [("D", "D", "d"), ("B", "B", "d"), ("S", "S", "d"), ("backend", "backend", ""),
             ("median_s", "time", fmt_time), ("GB/s", "GB/s", ".2f"),
             ("speedup_vs_reference", "x vs reference", ".2f"), ("rel_err", "rel err", ".1e")]
    return [format_table("hessian: batched [B, D, D] Hessians", result["hessian_rows"], hcols,
                         result["notes"][:1]),
            format_table("hessian: Integrated Hessians (zero baseline) vs path_explain",
                         result["ih_rows"], icols, result["notes"][1:]),
            format_table("hessian: ih_accumulate op, one [B*S, D, D] chunk", result["op_rows"],
                         ocols, [])]
