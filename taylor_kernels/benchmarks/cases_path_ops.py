"""Family ``path_ops``: the fused path ops on every backend that runs here vs eager PyTorch.

Each case is one full chunk (``start = 0``, ``count = B*K*S``) of float32 path points. The
eager sequences are what a user writes without the ops: broadcasting over ``[B, K, S, D]``.
Bytes moved (the minimum each op must read and write, each tensor once):

* ``path_points``:     reads ``x`` (B*D) and the baselines (Bb*K*D), writes count*D;
* ``path_accumulate``: reads the gradients (count*D), ``x`` and the baselines, writes B*D
  (in the accumulation dtype);

the S nodes/weights are ignored. The copy bandwidth ``dst.copy_(src)`` of a count*D tensor
(bytes = 2 * size) is the yardstick, measured both into a preallocated tensor and, like an op
that returns a new tensor, into a fresh ``torch.empty_like`` (which pays the first-touch page
faults on the CPU).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

import taylor_kernels as tk
from taylor_kernels.benchmarks.report import error_text, fmt_time, format_table
from taylor_kernels.benchmarks.timing import measure
from taylor_kernels.reference.path import accumulation_dtype

OPS = ("path_points", "path_accumulate")


@dataclass(frozen=True)
class PathCase:
    name: str
    B: int
    K: int
    S: int
    D: int
    shared_baseline: bool = False  # baselines [1, K, D] instead of [B, K, D]
    dtype: str = "float32"

    @property
    def count(self) -> int:
        return self.B * self.K * self.S

    @property
    def elements(self) -> int:
        return self.count * self.D

    @property
    def Bb(self) -> int:
        return 1 if self.shared_baseline else self.B

    def label(self) -> str:
        bl = "1" if self.shared_baseline else "B"
        return f"B={self.B} K={self.K} S={self.S} D={self.D} bl[{bl},K,D] {self.dtype}"


CASES = {
    "smoke": [PathCase("smoke", B=2, K=2, S=4, D=256)],
    "quick": [PathCase("per_input_baselines", B=8, K=4, S=50, D=32768)],
    "full": [PathCase("per_input_baselines", B=8, K=4, S=50, D=32768),
             PathCase("shared_baseline", B=16, K=1, S=50, D=65536, shared_baseline=True)],
}
REPEATS = {"smoke": 2, "quick": 5, "full": 10}


def backends_for(device: torch.device) -> list[str]:
    """Backends whose kernels run natively on ``device`` (never Triton's CPU interpreter)."""
    return [n for n in tk.backends.NAMES if tk.backends.runs_on(n, device)
            and not (n == "triton" and device.type != "cuda")]


def make_inputs(case: PathCase, device: torch.device, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    dtype = getattr(torch, case.dtype)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype).to(device)

    return {"x": randn(case.B, case.D), "baselines": randn(case.Bb, case.K, case.D),
            "alphas": torch.rand(case.S, generator=g, dtype=dtype).to(device),
            "weights": torch.rand(case.S, generator=g, dtype=dtype).to(device),
            "grads": randn(case.count, case.D)}


def eager_points(x, baselines, alphas):
    """``[B*K*S, D]`` path points with plain broadcasting (what a user writes)."""
    B, D = x.shape
    K, S = baselines.shape[1], alphas.shape[0]
    bl = baselines[:, :, None, :]
    pts = bl + alphas[None, None, :, None] * (x[:, None, None, :] - bl)
    return pts.reshape(B * K * S, D)


def eager_accumulate(grads, x, baselines, weights):
    """``[B, D]``: sum over k, s of ``w_s g (x - b_k) / K`` with plain broadcasting."""
    B, D = x.shape
    K, S = baselines.shape[1], weights.shape[0]
    g = grads.view(B, K, S, D)
    delta = (x[:, None, :] - baselines)[:, :, None, :]
    return (weights[None, None, :, None] * g * delta).sum(dim=(1, 2)) / K


def op_bytes(case: PathCase, op: str) -> int:
    """Bytes an op must move at least (see the module docstring)."""
    elt = torch.empty((), dtype=getattr(torch, case.dtype)).element_size()
    acc = torch.empty((), dtype=accumulation_dtype(getattr(torch, case.dtype))).element_size()
    small = (case.B + case.Bb * case.K) * case.D * elt
    if op == "path_points":
        return small + case.elements * elt
    return small + case.elements * elt + case.B * case.D * acc


def op_fn(op: str, variant: str, inp: dict, count: int):
    """A no-argument callable running ``op`` with ``variant`` ('eager' or a backend name)."""
    x, bl = inp["x"], inp["baselines"]
    if variant == "eager":
        if op == "path_points":
            return lambda: eager_points(x, bl, inp["alphas"])
        return lambda: eager_accumulate(inp["grads"], x, bl, inp["weights"])
    if op == "path_points":
        return lambda: tk.ops.path_points(x, bl, inp["alphas"], 0, count)
    return lambda: tk.ops.path_accumulate(inp["grads"], x, bl, inp["weights"], 0)


def _max_rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.double()
    return ((out.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-300)).item()


def copy_bandwidth(case: PathCase, device: torch.device, repeats: int) -> list[dict]:
    """Copy of a count*D tensor: into a preallocated tensor and into a fresh one."""
    big = torch.randn(case.elements, dtype=getattr(torch, case.dtype)).to(device)
    dst = torch.empty_like(big)
    nbytes = 2 * big.numel() * big.element_size()
    rows = []
    for name, fn in (("copy (preallocated dst)", lambda: dst.copy_(big)),
                     ("copy (empty_like + copy_)", lambda: torch.empty_like(big).copy_(big))):
        t = measure(fn, warmup=1, repeats=max(repeats, 3), device=device)
        rows.append({"op": name, "variant": "torch", "bytes": nbytes,
                     "gbps": nbytes / t.median / 1e9, **t.as_dict()})
    return rows


def run(tier: str, device: torch.device, log=print) -> dict:
    """Time every op x variant of every case of ``tier``; returns rows and the copy yardstick."""
    repeats = REPEATS[tier] * (3 if device.type == "cuda" and tier == "full" else 1)
    variants = ["eager"] + backends_for(device)
    notes = [f"variants: eager PyTorch and the backends that run on {device.type} here: "
             f"{', '.join(variants[1:])}"]
    if device.type == "cpu" and not tk.backends.available()["cpp"]:
        notes.append("C++ extension not built: no 'cpp' row (build it, then re-run)")
    out_cases = []
    for case in CASES[tier]:
        log(f"[path_ops] {case.name}: {case.label()} ({case.elements:.3g} elements)")
        inp = make_inputs(case, device)
        copies = copy_bandwidth(case, device, repeats)
        bw = {r["op"]: r["gbps"] for r in copies}
        rows = []
        for op in OPS:
            ref_out, eager_median = None, None
            for variant in variants:
                row = {"case": case.name, "op": op, "variant": variant,
                       "bytes": op_bytes(case, op)}
                try:
                    fn = op_fn(op, variant, inp, case.count)
                    if variant == "eager":
                        with torch.no_grad():
                            ref_out = fn()
                        row["max_rel_err_vs_eager"] = 0.0
                    else:
                        with tk.backends.using(variant):
                            out = fn()
                        row["max_rel_err_vs_eager"] = _max_rel_err(out, ref_out)
                        del out
                    with tk.backends.using(variant if variant != "eager" else "auto"):
                        t = measure(fn, warmup=1, repeats=repeats, device=device)
                except Exception as exc:  # noqa: BLE001  (record, keep benchmarking the rest)
                    row["error"] = error_text(exc, 300)
                    rows.append(row)
                    log(f"[path_ops]   {op} {variant}: FAILED {row['error']}")
                    continue
                row.update(t.as_dict())
                row["gbps"] = row["bytes"] / t.median / 1e9
                row["frac_copy"] = row["gbps"] / bw["copy (preallocated dst)"]
                row["frac_alloc_copy"] = row["gbps"] / bw["copy (empty_like + copy_)"]
                if variant == "eager":
                    eager_median = t.median
                row["speedup_vs_eager"] = eager_median / t.median if eager_median else None
                rows.append(row)
                log(f"[path_ops]   {op:16s} {variant:10s} {t.median * 1e3:9.2f} ms")
            del ref_out
        out_cases.append({"case": asdict(case), "label": case.label(), "copy": copies,
                          "rows": rows})
        del inp
    return {"cases": out_cases, "notes": notes, "repeats": repeats}


def tables(result: dict) -> list[str]:
    """One aligned table per case (the copy yardstick as its first rows)."""
    cols = [("op", "op", ""), ("variant", "variant", ""), ("median_s", "median", fmt_time),
            ("iqr_s", "IQR", fmt_time), ("speedup_vs_eager", "vs eager", lambda v: f"{v:.2f}x"),
            ("gbps", "GB/s", ".1f"), ("frac_copy", "% copy", ".0%"),
            ("frac_alloc_copy", "% alloc+copy", ".0%"),
            ("max_rel_err_vs_eager", "max rel err", ".1e"), ("error", "error", "")]
    out = []
    for c in result["cases"]:
        rows = c["copy"] + c["rows"]
        used = [col for col in cols if col[0] != "error" or any("error" in r for r in rows)]
        out.append(format_table(f"path_ops: {c['case']['name']} ({c['label']})", rows, used,
                                result["notes"] + ["GB/s = minimal bytes moved / median time; "
                                                   "% copy = of the copy bandwidth above"]))
    return out
