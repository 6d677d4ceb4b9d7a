#!/usr/bin/env python
"""Op benchmark and check of bench/gpu_check.sh: every op on every backend, against the copy.

``python bench/gpu_ops.py --out ops.json [--tiny] [--check-only] [--device cuda]``

For each op (``path_points``, ``path_accumulate``, ``ih_accumulate``, ``jet_unary`` (tanh, K=4),
``jet_mul``, ``polarize_contract``):

* check: on fresh random inputs at odd shapes, float32 and bfloat16, each backend's output
  against the eager reference (``‖out - ref‖ / ‖ref‖`` under 1e-4 for float32, 2e-2 for
  bfloat16; NaN never passes), and again at the benchmark shape;
* time (unless ``--check-only``): the median over 5 blocks of back-to-back calls, timed with CUDA
  events (host clock on the CPU), for the GPU backends (``cuda``, ``triton``) and eager PyTorch
  (the ``reference`` backend), with GB/s over the bytes the op must move (every input read once,
  every output written once) and that bandwidth as a fraction of the device-to-device copy
  (``dst.copy_(src)``, bytes read plus written).

The JSON holds per op the rows and the backend choice of :func:`taylor_kernels.backend_table.
decide`. ``--check-only --tiny`` is the short run compute-sanitizer wraps. On the CPU the
backends are ``cpp`` and ``reference`` (a dry run of the same code; no choice is meaningful).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from taylor_kernels import backend_table, backends  # noqa: E402
from taylor_kernels import ops  # noqa: E402

TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float64: 1e-10}
# benchmark shapes: (full GPU sizes, tiny sizes for dry runs and the sanitizer)
SIZES = {
    "path": ({"B": 8, "K": 4, "S": 64, "D": 65536}, {"B": 2, "K": 2, "S": 5, "D": 33}),
    "ih": ({"B": 4, "K": 1, "S": 64, "R": 64, "D": 8192}, {"B": 2, "K": 1, "S": 3, "R": 3, "D": 17}),
    "jet": ({"J": 4, "N": 1 << 24}, {"J": 4, "N": 1001}),
    "polarize": ({"J": 4, "M": 16, "N": 1 << 22}, {"J": 2, "M": 3, "N": 777}),
}
ODD = {"path": {"B": 3, "K": 2, "S": 7, "D": 1031}, "ih": {"B": 3, "K": 2, "S": 3, "R": 5, "D": 77},
       "jet": {"J": 4, "N": 4099}, "polarize": {"J": 3, "M": 5, "N": 3001}}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``‖out - ref‖ / ‖ref‖`` in float64 (inf for NaN or a shape mismatch)."""
    if out.shape != ref.shape:
        return float("inf")
    o, r = out.double(), ref.double()
    err = ((o - r).norm() / r.norm().clamp_min(1e-300)).item()
    return err if err == err else float("inf")


def make_case(op: str, s: dict, dtype: torch.dtype, device: torch.device):
    """``(call, nbytes)``: ``call()`` runs ``op`` on fresh random inputs of shape ``s``; ``nbytes``
    is the minimum traffic (inputs read once, output written once)."""
    e = torch.tensor([], dtype=dtype).element_size()
    acc = 8 if dtype == torch.float64 else 4
    rnd = lambda *shape: torch.randn(*shape, device=device, dtype=dtype)  # noqa: E731
    if op in ("path_points", "path_accumulate"):
        B, K, S, D = s["B"], s["K"], s["S"], s["D"]
        x, bl = rnd(B, D), rnd(B, K, D)
        nodes = torch.rand(S, device=device, dtype=torch.float64)
        count = B * K * S
        if op == "path_points":
            return (lambda: ops.path_points(x, bl, nodes, 0, count)), (B * D + B * K * D + count * D) * e
        g, w = rnd(count, D), nodes / S
        return (lambda: ops.path_accumulate(g, x, bl, w, 0)), \
            (count * D + B * D + B * K * D) * e + B * D * acc
    if op == "ih_accumulate":
        B, K, S, R, D = s["B"], s["K"], s["S"], s["R"], s["D"]
        h, x, bl = rnd(B * K * S, R, D), rnd(B, D), rnd(B, K, D)
        w = torch.rand(S, device=device, dtype=torch.float64) / S
        idx = torch.randperm(D, device=device)[:R]
        return (lambda: ops.ih_accumulate(h, x, bl, w, idx, 0)), \
            (h.numel() + B * D + B * K * D) * e + B * R * D * acc
    if op in ("jet_unary", "jet_mul"):
        J, N = s["J"], s["N"]
        a, b = rnd(J + 1, N), rnd(J + 1, N)
        if op == "jet_unary":
            return (lambda: ops.jet_unary("tanh", a)), 2 * (J + 1) * N * e
        return (lambda: ops.jet_mul(a, b)), 3 * (J + 1) * N * e
    J, M, N = s["J"], s["M"], s["N"]
    c = rnd(J + 1, M, N)
    gamma = torch.randn(M, device=device, dtype=torch.float64)
    return (lambda: ops.polarize_contract(c, gamma, J)), (M * N + N) * e


OPS = {"path_points": "path", "path_accumulate": "path", "ih_accumulate": "ih",
       "jet_unary": "jet", "jet_mul": "jet", "polarize_contract": "polarize"}


def device_time(fn, device: torch.device, calls: int, blocks: int = 5) -> float:
    """Median seconds per call over ``blocks`` blocks of ``calls`` back-to-back calls."""
    fn()
    per_call = []
    for _ in range(blocks):
        if device.type == "cuda":
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)
            start.record()
            for _ in range(calls):
                fn()
            stop.record()
            stop.synchronize()
            per_call.append(start.elapsed_time(stop) / 1e3 / calls)
        else:
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            per_call.append((time.perf_counter() - t0) / calls)
    return statistics.median(per_call)


def copy_bandwidth(device: torch.device, tiny: bool) -> dict:
    """Device-to-device copy ``dst.copy_(src)`` of float32: bytes read plus written per second."""
    n = (1 << 14) if tiny else (1 << 28)  # 1 GiB on a GPU
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    t = device_time(lambda: dst.copy_(src), device, calls=2 if tiny else 20)
    return {"bytes": 2 * n * 4, "median_s": t, "GBps": 2 * n * 4 / t / 1e9}


def gpu_backends(device: torch.device) -> list[str]:
    """Backends compared on ``device``: cuda and triton on a GPU; cpp on the CPU (dry run)."""
    names = ("cuda", "triton") if device.type == "cuda" else ("cpp",)
    return [n for n in names if backends.runs_on(n, device)]


def check(op: str, name: str, device: torch.device, dtype: torch.dtype, s: dict) -> float:
    """Relative error of backend ``name`` against the reference on fresh inputs of shape ``s``."""
    call, _ = make_case(op, s, dtype, device)
    with backends.using("reference"):
        ref = call()
    with backends.using(name):
        out = call()
    return rel_err(out, ref)


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc)[:300]}"


def run(device: torch.device, tiny: bool, check_only: bool, log=print, save=None) -> dict:
    """Checks (and timings) of every op on every backend of ``device``; an error costs its
    (op, backend) pair only, recorded as ``failed (error: ...)`` (a Triton compile error or an
    out-of-memory lost the whole step: the backend table with it); ``save(result)`` after
    each op, so that a cut-off keeps the ops done."""
    names = gpu_backends(device)
    result = {"device": str(device), "tiny": tiny, "backends": names, "ops": {}}
    if not check_only:
        result["copy"] = copy_bandwidth(device, tiny)
        log(f"[ops] copy {result['copy']['GBps']:.0f} GB/s")
    for op, family in OPS.items():
        bench_shape = SIZES[family][1 if tiny else 0]
        odd = SIZES[family][1] if tiny else ODD[family]
        entry = {"shape": bench_shape, "rows": [], "tests": {}, "ms": {}}
        for name in names:
            try:
                errs = {f"odd {str(dt)[6:]}": check(op, name, device, dt, odd)
                        for dt in (torch.float32, torch.bfloat16)}
                errs["bench float32"] = check(op, name, device, torch.float32, bench_shape)
            except Exception as exc:  # noqa: BLE001 - one pair's error, recorded
                entry["tests"][name] = f"failed (error: {_error(exc)})"
                log(f"[ops] {op} {name}: check {entry['tests'][name]}")
                continue
            passed = all(errs[k] <= TOL[torch.bfloat16 if "bfloat16" in k else torch.float32]
                         for k in errs)
            entry["tests"][name] = "passed" if passed else "failed"
            entry.setdefault("errors", {})[name] = errs
            log(f"[ops] {op} {name}: check {entry['tests'][name]} "
                + ", ".join(f"{k} {v:.1e}" for k, v in errs.items()))
        if not check_only:
            for name in names + ["reference"]:
                label = "eager" if name == "reference" else name
                try:
                    call, nbytes = make_case(op, bench_shape, torch.float32, device)
                    with backends.using(name):
                        t = device_time(call, device, calls=2 if tiny else 10)
                except Exception as exc:  # noqa: BLE001 - one pair's error, recorded
                    entry["rows"].append({"op": op, "backend": label, "error": _error(exc)})
                    log(f"[ops] {op} {label}: timing failed ({_error(exc)})")
                    continue
                row = {"op": op, "backend": label, "median_s": t, "bytes": nbytes,
                       "GBps": nbytes / t / 1e9,
                       "frac_copy": nbytes / t / 1e9 / result["copy"]["GBps"]}
                entry["rows"].append(row)
                if name != "reference":
                    entry["ms"][name] = t * 1e3
                log(f"[ops] {op} {label}: {t * 1e3:.3f} ms, {row['GBps']:.0f} GB/s "
                    f"({row['frac_copy']:.0%} of copy)")
            eager = next((r["median_s"] for r in entry["rows"]
                          if r["backend"] == "eager" and "median_s" in r), None)
            for r in entry["rows"]:
                if eager is not None and "median_s" in r:
                    r["speedup_vs_eager"] = eager / r["median_s"]
        entry["choice"] = backend_table.decide(entry["ms"], entry["tests"])
        result["ops"][op] = entry
        if save is not None:
            save(result)
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="JSON output path")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="tiny shapes (dry run, sanitizer)")
    p.add_argument("--check-only", action="store_true", help="correctness checks, no timing")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    def save(result):  # (a rename: a kill mid-write keeps the previous complete file)
        tmp = Path(a.out + ".tmp")
        tmp.write_text(json.dumps(result, indent=1))
        os.replace(tmp, a.out)

    result = run(device, a.tiny, a.check_only, log=lambda m: print(m, flush=True), save=save)
    save(result)
    failed = [f"{op}/{n}" for op, e in result["ops"].items() for n, s in e["tests"].items()
              if s != "passed"]
    print(f"[ops] {'checks failed: ' + ', '.join(failed) if failed else 'all checks passed'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
