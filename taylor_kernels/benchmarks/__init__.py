"""Benchmarks: ``taylor-kernels bench`` / ``python bench/run.py``.

Families (run side by side in one process, one table each, one JSON file for all):

* ``path_ops``       fused ``path_points`` / ``path_accumulate`` per backend vs eager PyTorch,
                     with GB/s against the bytes each op must move and the copy bandwidth;
* ``ig_vs_captum``   ``tk.integrated_gradients`` vs Captum's ``IntegratedGradients``: time,
                     peak memory (fresh subprocess per measurement), attribution difference;
* ``ig_family``      EG, SIG and layer IG vs the equivalent Captum computation (time, memory);
* ``jet``            ``tk.jet`` vs nested ``torch.func.jvp`` (order-K directional derivatives of
                     MLPs and a transformer block), fused ``jet_unary`` vs the eager recurrence;
* ``adaptive_evals`` evaluations our adaptive rule needs for a 1e-4 relative completeness gap
                     vs Captum's 50-step default and the smallest sufficient step count;
* ``exact``          ``rule="exact"`` on ReLU networks (regions crossed, time, completeness gap)
                     vs Captum's GL-50 and riemann_trapezoid-50 and our adaptive rule;
* ``scale``          MiniLM token attribution vs Captum, a DAPr training step vs autograd,
                     distributed IG over 1 and 2 gloo processes;
* ``hessian``        ``tk.hessian`` vs ``torch.autograd.functional`` / ``torch.func``,
                     Integrated Hessians vs path_explain, ``ih_accumulate`` per backend;
* ``llm``            transformers (MiniLM, GPT-2, Llama configs) vs Captum's
                     ``LayerIntegratedGradients`` and ``LLMGradientAttribution``;
* ``inseq``          Inseq's integrated gradients on Captum vs on this engine (``patch()``).

Sizes: full (default), ``--quick`` (CPU machines, a few minutes), ``--smoke`` (a tiny size
for the tests; its numbers mean nothing).

The JSON file is rewritten after each family (``"finished": false`` until the last one).
Exit status: 0; 1 when a row's measurement failed (its ``error`` is in the table and the JSON);
2 for a bad command line or an invalid ``TAYLOR_KERNELS_BACKEND``, before any work; 130 on
Ctrl-C, with the finished families in the JSON file.
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
from pathlib import Path

import torch

import taylor_kernels as tk
from taylor_kernels.benchmarks import cases_adaptive, cases_ig, cases_ig_family, cases_path_ops
from taylor_kernels.benchmarks import cases_scale
from taylor_kernels.benchmarks import cases_hessian
from taylor_kernels.benchmarks import cases_jet
from taylor_kernels.benchmarks import cases_exact
from taylor_kernels.benchmarks import cases_inseq
from taylor_kernels.benchmarks.machine import bench_device, device_label, machine_info
from taylor_kernels.benchmarks.report import failed_rows, write_json
from taylor_kernels.cli import Parser, device_arg, require_writable

FAMILIES = {"path_ops": cases_path_ops, "ig_vs_captum": cases_ig, "ig_family": cases_ig_family,
            "adaptive_evals": cases_adaptive, "scale": cases_scale}
FAMILIES["hessian"] = cases_hessian
FAMILIES["jet"] = cases_jet
from taylor_kernels.benchmarks import cases_llm  # noqa: E402
FAMILIES["llm"] = cases_llm
FAMILIES["exact"] = cases_exact
FAMILIES["inseq"] = cases_inseq
SCHEMA = 1
ROW_LABELS = ("case", "method", "family", "who", "op", "variant", "dtype", "K")  # name a row


def default_out(device: torch.device) -> Path:
    """``bench/results/<device>-<YYYY-MM-DD>.json`` under the repository (else the cwd)."""
    root = Path(__file__).resolve().parents[2]
    base = root if (root / "bench").is_dir() else Path.cwd()
    return base / "bench" / "results" / f"{device_label(device)}-{datetime.date.today()}.json"


def _usage_error(prog: str, what: str):
    """One line on stderr, exit 2 (as argparse does for the flags it checks itself)."""
    print(f"{prog}: error: {what}", file=sys.stderr)
    raise SystemExit(2)


def _families(only: list[str] | None, prog: str) -> list[str]:
    """The families to run, in the order given, each once (``--only jet,jet``: jet once)."""
    if not only:
        return list(FAMILIES)
    names = list(dict.fromkeys(n.strip() for item in only for n in item.split(",")
                               if n.strip()))
    unknown = [n for n in names if n not in FAMILIES]
    if unknown or not names:
        what = f"unknown benchmark family {unknown}" if unknown else "--only names no family"
        _usage_error(prog, f"{what}; choose from {list(FAMILIES)}")
    return names


def _check_backend(prog: str) -> None:
    """An invalid ``TAYLOR_KERNELS_BACKEND`` fails every op: say so before any work."""
    try:
        tk.backends.current()
    except ValueError as exc:
        _usage_error(prog, str(exc))


def out_arg(text: str) -> Path:
    """``--out`` value: an empty one would silently mean the default path in the repository."""
    if not text.strip():
        raise argparse.ArgumentTypeError("empty path; give a file path, or omit --out for "
                                         "the default")
    return Path(text)


def parse_args(argv, prog: str = "taylor-kernels bench"):
    p = Parser(prog=prog, description=__doc__,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes for CPU machines")
    p.add_argument("--smoke", action="store_true",
                   help="tiny sizes: checks that every case runs (tests, CI), not timings")
    p.add_argument("--out", default=None, type=out_arg, help="JSON results path (default "
                   "bench/results/<device>-<date>.json)")
    p.add_argument("--only", action="append", metavar="FAMILY",
                   help=f"run only these families (repeat or comma-separate): {list(FAMILIES)}")
    p.add_argument("--device", default=None, type=device_arg,
                   help="cpu or cuda[:i] (default: cuda if present)")
    return p.parse_args(argv)


def _run_families(names, tier, device, data, out, tables) -> None:
    """Run ``names`` in turn, rewriting ``out`` after each: an interrupt or a crash in one
    family keeps the finished ones."""
    for name in names:
        t0 = time.perf_counter()
        result = FAMILIES[name].run(tier, device, log=lambda msg: print(msg, flush=True))
        result["wall_s"] = time.perf_counter() - t0
        data["families"][name] = result
        tables.extend(FAMILIES[name].tables(result))
        write_json(out, data)


def _report_failures(data: dict) -> int:
    """1 (and one line per failed row) when a row's measurement failed, else 0."""
    failed = [(name, r) for name, result in data["families"].items()
              for r in failed_rows(result)]
    for name, row in failed:
        what = " ".join(str(row[k]) for k in ROW_LABELS if k in row)
        print(f"FAILED {name} {what}: {row['error']}", file=sys.stderr)
    return 1 if failed else 0


def main(argv: list[str] | None = None, prog: str = "taylor-kernels bench") -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv, prog)
    tier = "smoke" if args.smoke else "quick" if args.quick else "full"
    device = args.device if args.device is not None else bench_device()
    names = _families(args.only, prog)
    _check_backend(prog)
    out = args.out if args.out is not None else default_out(device)
    require_writable(out, prog)  # before hours of benchmarks, not after
    info = machine_info(device)
    print(f"{prog}: tier {tier}, device {info['device_label']} "
          f"({info['cpu_model']}, {info['torch_threads']} threads), families {names}",
          flush=True)
    data = {"schema": SCHEMA, "tier": tier, "argv": argv, "machine": info,
            "finished": False, "families": {}}
    tables: list[str] = []
    t_all = time.perf_counter()
    try:
        _run_families(names, tier, device, data, out, tables)
    except KeyboardInterrupt:
        write_json(out, data)  # (also when no family finished: the file says what ran)
        print(f"\n{prog}: interrupted; the finished families {list(data['families'])} are in "
              f"{out}", file=sys.stderr)
        return 130
    data["wall_s"] = time.perf_counter() - t_all
    data["finished"] = True
    data["machine"]["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") \
        else None
    print()
    print("\n\n".join(tables))
    write_json(out, data)
    print(f"\nresults written to {out} ({data['wall_s']:.0f} s)")
    return _report_failures(data)
