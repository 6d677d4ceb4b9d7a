#!/usr/bin/env python
"""The prepared GPU check (driver of ``bench/gpu_check.sh``; bench/README.md, section GPU).

``python bench/gpu_check.py [--dry-run] [--out DIR] [--budget SECONDS]``

Steps, each a subprocess with its own timeout inside one overall budget (default 470 s, under
the 8 minutes a device call is sized for); a failing or timed-out step is recorded, never fatal,
a step cut short by the budget is recorded as stopped, one that no longer fits as skipped:

1. ``wheels``    install offline (``pip --no-index``) the wheels of bench/wheels whose module is
                 missing (Captum, path_explain, transformers and its dependencies);
2. ``build``     build the extension with CUDA kernels for the local architecture;
3. ``ops``       every op on cuda / triton / eager vs the copy bandwidth (bench/gpu_ops.py);
                 its checks and timings give the per-op backend table;
4. ``gpu_tests`` every GPU-marked test (bench/gpu_marked.py selects them; the nvcc compile
                 test skipped: ``build`` just compiled every .cu file);
5. ``ig_cnn``    IG vs Captum at equal steps (family ``ig_vs_captum``: MLP and CNN);
6. ``ig_gpt2``   IG vs Captum at equal steps on a GPT-2 ``transformers`` config and a bf16 Llama
                 one (LayerIG on the embeddings, bf16 also token IG; time, peak memory,
                 agreement; from ``cases_llm``);
7. ``graphs``    the chunk loop with CUDA graphs (``tk.cuda_graphs``) vs eager, CNN and GPT-2
                 (bench/gpu_graphs.py: times, ratio, agreement, chunks served by a graph);
8. ``jet``       jets vs nested jvp (family ``jet``; the fused ops are timed in ``ops``);
9. ``hessian``   Integrated Hessians vs path_explain's torch port (family ``hessian``;
                 ``incomplete`` without a path_explain row that carries no error);
10. ``memcheck`` ``compute-sanitizer --tool memcheck`` over the ops' short check run (last: it
                 gives no figure the issue asks for, so the budget cuts it first).

The family steps (5, 8, 9) run bench/run.py, which exits 1 when a row failed: such a step
is recorded as failed, with its tables.

The per-step limits add up to more than the budget: each is a step's worst case, and the
budget cuts whatever comes last, hence this order.

Writes ``DIR/gpu-<device>-<date>.txt`` (tables) and ``.json`` (everything, with the commit:
``$TK_COMMIT``, else ``git rev-parse HEAD``), and
``DIR/backend_table.json`` (this device merged into the packaged table; copy it to
``taylor_kernels/backend_table.json`` to make ``auto`` use it). ``--dry-run`` runs the same steps
on the CPU at tiny sizes, skipping (and saying so) what needs a GPU.
"""
from __future__ import annotations

import argparse
import datetime
import functools
import glob
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's package, also before (or without) its install
WHEELS = ROOT / "bench" / "wheels"
# wheel distribution name -> module it provides (installed only when that module is missing)
WHEEL_MODULES = {"captum": "captum", "path_explain": "path_explain", "transformers": "transformers",
                 "huggingface_hub": "huggingface_hub", "tokenizers": "tokenizers",
                 "safetensors": "safetensors", "regex": "regex", "pyyaml": "yaml",
                 # Captum 0.9 imports matplotlib (and tqdm) in captum.attr itself
                 "tqdm": "tqdm", "matplotlib": "matplotlib", "contourpy": "contourpy",
                 "cycler": "cycler", "fonttools": "fontTools", "kiwisolver": "kiwisolver",
                 "pillow": "PIL", "pyparsing": "pyparsing", "python_dateutil": "dateutil",
                 "six": "six"}
REQUIRED_MODULES = ("captum", "transformers", "path_explain")
RESERVE_S = 8  # kept back from the budget for writing the results
STEPS = ("build", "ops", "gpu_tests", "ig_cnn", "ig_gpt2", "graphs", "jet", "hessian", "memcheck")
# benchmark steps -> the bench family whose tables they report (graphs: bench/gpu_graphs.py)
FAMILY_STEPS = {"ig_cnn": "ig_vs_captum", "ig_gpt2": "llm", "graphs": None, "jet": "jet",
                "hessian": "hessian"}


class Check:
    """Runs the steps against one deadline and collects their records."""

    def __init__(self, dry: bool, out: Path, budget: float, parts: Path,
                 steps: set[str] | None = None):
        self.dry, self.out, self.parts, self.selected = dry, out, parts, steps
        self.t0 = time.monotonic()
        label, self.info = device_label(dry)
        self.info.update(date=datetime.date.today().isoformat(), git_commit=git_commit())
        # fixed at the start: a run that passes midnight keeps writing the same files
        self.stem = f"gpu-{label}-{self.info['date']}" + ("" if steps is None else "-rerun")
        self.deadline = self.t0 + budget
        self.steps: list[dict] = []
        self.env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.env.setdefault("MPLBACKEND", "Agg")  # (captum.attr imports pyplot; no display)
        self.env.pop("TRITON_INTERPRET", None) if not dry else None
        self.py = sys.executable

    def record(self, name: str, status: str, note: str = "", **extra) -> dict:
        rec = {"step": name, "status": status, "note": note, "wall_s": 0.0, **extra}
        self.steps.append(rec)
        line = f"[gpu_check] {name}: {status}{' - ' + note if note else ''}"
        print(line, flush=True)
        with open(self.out / "steps.log", "a") as log:  # every step's record and whole output
            log.write(f"==== {line}\n" + (f"{extra['output']}\n" if "output" in extra else ""))
        return rec

    def read_part(self, name: str):
        """The JSON a step wrote to ``name`` in the scratch folder, or None if it wrote none."""
        path = self.parts / name
        return json.loads(path.read_text()) if path.is_file() else None

    def wanted(self, name: str) -> bool:
        """False (and recorded as skipped) for a step that ``--steps`` left out."""
        if self.selected is None or name in self.selected:
            return True
        self.record(name, "skipped", "not selected (--steps)")
        return False

    def run(self, name: str, cmd: list[str], timeout: float, note: str = "",
            env: dict | None = None) -> dict:
        """Run ``cmd`` (cwd = repository root) within ``timeout`` and the overall budget
        (``wheels`` runs whatever ``--steps`` says: the other steps need its modules)."""
        if name != "wheels" and not self.wanted(name):
            return self.steps[-1]
        left = self.deadline - time.monotonic() - RESERVE_S
        if left < 10:
            return self.record(name, "skipped", f"out of time ({left:.0f} s left of the budget)")
        limit = min(timeout, left)
        print(f"[gpu_check] {name}: running (limit {limit:.0f} s): {' '.join(cmd)}", flush=True)
        t = time.monotonic()
        # own process group: on timeout the step's children (pytest workers, probes) go too
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env or self.env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            output, _ = proc.communicate(timeout=limit)
            status = "passed" if proc.returncode == 0 else f"failed (rc {proc.returncode})"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            output, _ = proc.communicate()
            status = (f"timeout ({limit:.0f} s)" if limit >= timeout
                      else f"stopped (budget, {limit:.0f} s)")
        rec = self.record(name, status, note, cmd=cmd, output=output or "")
        rec["output_tail"] = rec.pop("output")[-6000:]
        rec["wall_s"] = time.monotonic() - t
        print(output[-1500:], flush=True)
        return rec


def install_wheels(c: Check) -> None:
    """Step ``wheels``: offline install of the carried wheels whose module is missing."""
    site = c.parts / "site"
    wanted = []
    for whl in sorted(WHEELS.glob("*.whl")) if WHEELS.is_dir() else []:
        dist = whl.name.split("-")[0].lower()
        module = WHEEL_MODULES.get(dist)
        if module and importlib.util.find_spec(module) is None:
            wanted.append(str(whl))
    if wanted:
        c.run("wheels", [c.py, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                         "--no-compile", "--target", str(site), *wanted], 120,
              note=f"installing {[Path(w).name.split('-')[0] for w in wanted]}")
        c.env["PYTHONPATH"] = os.pathsep.join(
            [str(site)] + ([c.env["PYTHONPATH"]] if c.env.get("PYTHONPATH") else []))
    sys.path.insert(0, str(site))
    importlib.invalidate_caches()
    missing = [m for m in REQUIRED_MODULES if importlib.util.find_spec(m) is None]
    if "captum" not in missing:  # found is not importable: captum.attr imports matplotlib
        probe = subprocess.run([c.py, "-c", "import captum.attr"], env=c.env, cwd=ROOT,
                               capture_output=True, text=True, timeout=120)
        if probe.returncode:
            last = (probe.stderr.strip().splitlines() or ["?"])[-1]
            missing.append(f"captum.attr ({last[:160]})")
    if not wanted:
        hint = (f"missing {missing}; no wheel for them in bench/wheels (run "
                "bench/fetch_gpu_wheels.sh where pip can reach PyPI)")
        if missing and c.dry:  # the wheels are for the GPU machine; a CPU checkout may lack them
            c.record("wheels", "skipped", f"dry run: {hint}; the steps that need them skip")
        else:
            c.record("wheels", "failed" if missing else "passed",
                     hint if missing else "every needed module is importable; nothing installed")
    elif missing:
        c.steps[-1]["note"] += f"; still missing {missing}"


def cuda_arch() -> str:
    """The local GPU's compute capability as CMake wants it (``"90"`` on an H100/H200)."""
    import torch
    major, minor = torch.cuda.get_device_capability()
    return f"{major}{minor}"


def build(c: Check) -> None:
    """Step ``build``: the extension with CUDA kernels for this GPU (editable install)."""
    if not c.wanted("build"):
        return
    if c.dry:
        c.record("build", "skipped", "dry run: uses the extension already built here (no nvcc "
                 "build on the CPU; CI compile-checks the .cu files in .ci/compile_cuda.sh)")
        return
    env = dict(c.env, TAYLOR_KERNELS_CUDA="ON", TAYLOR_KERNELS_CUDA_ARCHS=cuda_arch(),
               CMAKE_BUILD_PARALLEL_LEVEL=str(os.cpu_count() or 8))
    if shutil.which("nvcc") is None and Path("/usr/local/cuda/bin/nvcc").is_file():
        env["PATH"] = f"/usr/local/cuda/bin{os.pathsep}{env.get('PATH', '')}"
        env.setdefault("CUDACXX", "/usr/local/cuda/bin/nvcc")
    probe = ("from taylor_kernels import _native; import sys; ok = _native.has_cuda_kernels(); "
             "print('CUDA kernels loaded:', ok, _native.LOAD_ERROR or ''); "
             "sys.exit(0 if ok else 1)")
    c.run("build", ["bash", "-c", f"{c.py} -m pip install --no-build-isolation --no-deps "
                    f"--no-index -e . && {c.py} -c \"{probe}\""], 240,
          note=f"sm_{env['TAYLOR_KERNELS_CUDA_ARCHS']}", env=env)


def gpu_test_files() -> list[str]:
    """Test files that can hold GPU-marked tests (they mention CUDA at all)."""
    files = sorted(ROOT.glob("tests/**/test_*.py"))
    return [str(f.relative_to(ROOT)) for f in files if "cuda" in f.read_text().lower()]


def gpu_tests(c: Check, keyword: str | None = None) -> dict:
    """Step ``gpu_tests``: the GPU-marked tests (dry run: collected and counted only)."""
    report = c.parts / "gpu_tests.json"
    # the nvcc compile test recompiles every .cu file (53-89 s each on the H200's machine,
    # 2026-11-30), which the build step has just done for this GPU
    env = dict(c.env, TK_GPU_TESTS_JSON=str(report), TAYLOR_KERNELS_SKIP_CUDA_COMPILE_TEST="1",
               PYTHONPATH=os.pathsep.join([str(ROOT / "bench")] + (
                   [c.env["PYTHONPATH"]] if c.env.get("PYTHONPATH") else [])))
    extra = ["--collect-only"] if c.dry else []
    if not c.dry and importlib.util.find_spec("xdist") is not None:
        # Triton compiles (CPU) dominate: 8 workers of the 16 cores (4 took 132 s on the H200,
        # 2026-11-30); one file per worker keeps the ~60 GB offset tests (one file) from
        # running side by side
        extra = ["-n", "8", "--dist", "loadfile"]
    if importlib.util.find_spec("pytest_timeout") is not None:
        extra += ["--timeout", "120"]  # one hung test fails alone instead of eating the step
    if keyword:
        extra += ["-k", keyword]
    rec = c.run("gpu_tests", [c.py, "-m", "pytest", "-p", "gpu_marked", "-q", "-p",
                              "no:cacheprovider", *extra, *gpu_test_files()], env=env,
                note="dry run: collected and counted, not run (they need a GPU)" if c.dry else "",
                timeout=180)
    data = c.read_part(report.name) or {}
    outcomes = data.get("outcomes", {})
    rec["selected"] = data.get("selected")
    rec["failed"] = sorted(k for k, v in outcomes.items() if v == "failed")
    rec["counts"] = {s: sum(v == s for v in outcomes.values()) for s in
                     ("passed", "failed", "skipped")}
    return rec


def ops_step(c: Check) -> dict | None:
    """Step ``ops``: the op benchmark and checks (bench/gpu_ops.py)."""
    path = c.parts / "ops.json"
    cmd = [c.py, "bench/gpu_ops.py", "--out", str(path)]
    c.run("ops", cmd + (["--tiny", "--device", "cpu"] if c.dry else []), 120,
          note="dry run: tiny shapes, cpp vs eager on the CPU" if c.dry else "")
    return c.read_part(path.name)


def find_sanitizer(root: str = "/usr/local") -> str | None:
    """compute-sanitizer: on PATH, else in a CUDA toolkit under ``root``, in its ``bin`` or in
    its own ``compute-sanitizer`` folder (images without the link in ``bin`` have only that);
    the default toolkit (``root/cuda``) first, then the highest version. None if absent."""
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    hits = [p for pattern in ("cuda*/bin/compute-sanitizer",
                              "cuda*/compute-sanitizer/compute-sanitizer")
            for p in glob.glob(os.path.join(root, pattern))
            if os.path.isfile(p) and os.access(p, os.X_OK)]
    default = [p for p in hits if Path(p).relative_to(root).parts[0] == "cuda"]
    return (default or sorted(hits, reverse=True) or [None])[0]


def memcheck(c: Check) -> None:
    """Step ``memcheck``: compute-sanitizer over the ops' short check run."""
    if not c.wanted("memcheck"):
        return
    tool = find_sanitizer()
    if c.dry or tool is None:
        c.record("memcheck", "skipped", "needs a GPU and compute-sanitizer" if c.dry
                 else "compute-sanitizer not found")
        return
    env = dict(c.env, PYTORCH_NO_CUDA_MEMORY_CACHING="1")  # out-of-bounds hits fresh allocations
    c.run("memcheck", [tool, "--tool", "memcheck", "--error-exitcode", "9", "--print-limit",
                       "20", c.py, "bench/gpu_ops.py", "--tiny", "--check-only", "--out",
                       str(c.parts / "memcheck_ops.json")], 90, env=env)


def family(c: Check, step: str, timeout: float) -> dict | None:
    """Step ``step``: its registered benchmark family (:data:`FAMILY_STEPS`) through
    bench/run.py (``--quick`` on the GPU, ``--smoke`` on a dry run)."""
    name = FAMILY_STEPS[step]
    path = c.parts / f"family-{name}.json"
    tier = ["--smoke", "--device", "cpu"] if c.dry else ["--quick", "--device", "cuda"]
    c.run(step, [c.py, "bench/run.py", "--only", name, *tier, "--out", str(path)], timeout)
    return c.read_part(path.name)


def missing_rows(result, marker: str, why: str) -> str | None:
    """Why ``result`` lacks a usable row whose ``method`` (or ``name``) names ``marker`` (none,
    or one with an error), else None. The rows themselves, not the JSON's text: the hessian
    family's notes name path_explain whether its rows are there or not."""
    from taylor_kernels.benchmarks.report import iter_rows
    rows = [r for r in iter_rows(result or {})
            if marker in str(r.get("method", r.get("name", "")))]
    if not rows:
        return f"no {marker} rows: {why}"
    errors = [r["error"] for r in rows if "error" in r]
    return f"{marker} rows failed: {errors[0]}" if errors else None


def require_rows(c: Check, result, marker: str, why: str) -> None:
    """On a GPU run, mark the last step ``incomplete`` when it passed without usable rows
    naming ``marker`` (the Integrated Hessians family without path_explain's, the comparison
    the issue asks for)."""
    step = c.steps[-1]
    if c.dry or step["status"] != "passed":
        return
    missing = missing_rows(result, marker, why)
    if missing:
        step.update(status="incomplete", note="; ".join(filter(None, [step["note"], missing])))


def write_json(path: Path, data) -> None:
    """Write ``data`` as JSON through a temporary file and a rename: a process killed mid-write
    leaves the previous complete file, never a truncated one the driver cannot read."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)


def gpt2_probe(dry: bool, out: str) -> int:
    """``--step gpt2``: Captum ``LayerIntegratedGradients`` vs ours at equal steps on the GPT-2
    config and the bf16 Llama config (cases ``gpt2 next`` and ``llama bf16 next`` of
    ``cases_llm``; the bf16 one also with token IG), one fresh process per method."""
    sys.path.insert(0, str(ROOT))
    import torch

    from taylor_kernels.benchmarks import cases_llm
    gpt2, llama = (cases_llm.TINY, {**cases_llm.TINY, "arch": "llama"}) if dry else \
        (cases_llm.GPT2, cases_llm.LLAMA)
    P, steps = (8, 8) if dry else (22, cases_llm.STEPS)
    cases = [("gpt2 next", gpt2, "next", P, 0, steps, ["captum_lig", "tk_lig"]),
             ("llama bf16 next", {**llama, "dtype": "bfloat16"}, "next", P, 0, steps,
              ["captum_lig", "tk_lig", "tk_token_ig"])]
    cases_llm.REPEATS["gpu_check"] = 1 if dry else 3
    cases_llm.THREADS["gpu_check"] = None  # torch's default thread count
    result: dict = {"rows": []}
    for case in cases:  # one at a time, the file rewritten after each: a cut-off keeps the first
        cases_llm.CASES["gpu_check"] = [case]
        part = cases_llm.run("gpu_check", torch.device("cpu" if dry else "cuda"))
        result = {**part, "rows": result["rows"] + part["rows"]}
        write_json(Path(out), result)
    for table in cases_llm.tables(result):
        print(table)
    return 1 if any("error" in r for r in result["rows"]) else 0


PATH_OPS = ("path_points", "path_accumulate")
JET_OPS = ("jet_unary", "jet_mul")
ALL_OPS = (*PATH_OPS, "ih_accumulate", *JET_OPS, "polarize_contract")
BOTH = ("cuda", "triton")
# (ops, backends) the GPU tests of a file cover: a failed test there that names no op itself
# takes these ops off these backends. A failed test in any other file changes the table only if
# its name or parameters name an op; otherwise it is recorded (and stays in the results) only.
FILE_OPS = {
    "test_path_ops": (PATH_OPS, BOTH),
    "test_triton_ops": (PATH_OPS, ("triton",)),  # calls the Triton path kernels directly
    "test_native_ops": (PATH_OPS, ("cuda",)),  # its GPU tests call the CUDA path kernels
    "test_jet_ops": (JET_OPS, BOTH),
    "test_polarize_ops": (("polarize_contract",), BOTH),
    "test_hessian_ops": (("ih_accumulate",), BOTH),
    # every GPU test of these two names its ops (parameter path/jet/polarize/ih, or the test's
    # name); the file-wide scope is for a test added later that does not
    "test_compile_wrappers": (ALL_OPS, BOTH),
    "test_index_arithmetic": (ALL_OPS, BOTH),
}
# tests whose file's scope does not fit them: (ops, backends); no ops = recorded only
TEST_SCOPE = {
    # nvcc for sm_80/sm_90 (skipped by the step): nothing about the kernels built and checked here
    "test_cuda_sources_compile": ((), ()),
    # in the Triton path-op file, but checks ih_accumulate on both backends
    "test_ih_bad_index_on_gpu_does_not_sync": (("ih_accumulate",), BOTH),
}
# words naming ops: in a test's name (matched between underscores: "_jet_mul_") ...
NAME_OPS = {"path_points": ("path_points",), "path_accumulate": ("path_accumulate",),
            "path_ops": PATH_OPS, "ih_accumulate": ("ih_accumulate",),
            "jet_unary": ("jet_unary",), "jet_mul": ("jet_mul",),
            "polarize": ("polarize_contract",)}
# ... and as a whole parameter token, where test_compile_wrappers' case names are ops too
PARAM_OPS = {**NAME_OPS, "polarize_contract": ("polarize_contract",), "path": PATH_OPS,
             "jet": JET_OPS, "ih": ("ih_accumulate",)}


def parse_nodeid(nodeid: str) -> tuple[str, str, list[str]]:
    """``(file stem, test name, parameter tokens)`` of a pytest node id:
    ``tests/ops/test_jet_ops.py::test_x[tanh-cuda]`` gives ``test_jet_ops``, ``test_x``,
    ``["tanh", "cuda"]`` (tokens lower-cased)."""
    path, _, test = nodeid.partition("::")
    name, _, params = test.partition("[")
    params = params[:-1] if params.endswith("]") else params
    return Path(path).stem, name.split("::")[-1], params.lower().split("-") if params else []


def named_ops(name: str, params: list[str]) -> tuple[str, ...]:
    """The ops a test's name or parameter tokens name (none: empty)."""
    words = f"_{name.lower()}_"
    found = [op for word, ops in NAME_OPS.items() if f"_{word}_" in words for op in ops]
    found += [op for p in params for op in PARAM_OPS.get(p, ())]
    return tuple(dict.fromkeys(found))


def named_backends(params: list[str]) -> tuple[str, ...] | None:
    """The backend a parameter token names (``[tanh-cuda]``, ``[cuda]``): ``()`` for
    ``reference`` (a failure there says nothing of the GPU backends), None when none does.
    Whole tokens only: "triton" in a file name or "cuda" in a test name is not a backend."""
    for p in params:
        if p in BOTH:
            return (p,)
        if p == "reference":
            return ()
    return None


def failed_pairs(nodeid: str, ops: list[str]) -> set[tuple[str, str]]:
    """``(op, backend)`` pairs of ``ops`` a failed GPU test ``nodeid`` speaks against: its
    :data:`TEST_SCOPE`, else the ops its name or parameters name, else its file's
    (:data:`FILE_OPS`), else none; on the backend a parameter names, else its scope's."""
    stem, name, params = parse_nodeid(nodeid)
    if name in TEST_SCOPE:
        hit, on = TEST_SCOPE[name]
    else:
        file_ops, on = FILE_OPS.get(stem, ((), BOTH))
        hit = named_ops(name, params) or file_ops
    named = named_backends(params)
    return {(op, n) for op in hit if op in ops for n in (on if named is None else named)}


def apply_test_failures(ops: dict, failed: list[str]) -> dict[str, list[str]]:
    """Mark ``(op, backend)`` failed for every failed GPU test and redo each op's choice
    (reference when no GPU backend is left). Returns per failed test the ``op/backend`` pairs it
    took off (``[]``: recorded only, the table untouched)."""
    from taylor_kernels.backend_table import decide
    effect = {}
    for nodeid in failed:
        pairs = sorted(p for p in failed_pairs(nodeid, list(ops["ops"]))
                       if p[1] in ops["ops"][p[0]]["tests"])
        for op, name in pairs:
            ops["ops"][op]["tests"][name] = "failed (GPU test)"
        effect[nodeid] = [f"{op}/{name}" for op, name in pairs]
    for entry in ops["ops"].values():
        entry["choice"] = decide(entry["ms"], entry["tests"])
    return effect


def ops_from_table(device: str | None) -> dict | None:
    """The packaged table's entry for ``device`` in the ops step's form (no timing rows), for
    a rerun without the ops step whose GPU tests failed: their failures then still reach the
    table. None when the table has no entry for it."""
    sys.path.insert(0, str(ROOT))
    from taylor_kernels import backend_table as bt
    table = json.loads(bt.DEFAULT_PATH.read_text()) if bt.DEFAULT_PATH.is_file() else {}
    entry = table.get("devices", {}).get(device)
    if not entry:
        return None
    return {"ops": {op: {"ms": dict(e["ms"]), "tests": dict(e["tests"]), "rows": [],
                         "choice": e["choice"]} for op, e in entry["ops"].items()},
            "from_table": True}


def device_label(dry: bool) -> tuple[str, dict]:
    """``(label for the file names, machine info)``: the GPU's name, or ``cpu-dryrun``."""
    import torch
    info = {"torch": torch.__version__, "cuda": torch.version.cuda,
            "triton": _version("triton"), "python": sys.version.split()[0],
            "nvcc": _nvcc_version()}
    if dry or not torch.cuda.is_available():
        return "cpu-dryrun", info
    name = torch.cuda.get_device_name()
    props = torch.cuda.get_device_properties(0)
    info.update(device=name, capability=f"{props.major}.{props.minor}",
                sms=props.multi_processor_count, memory_bytes=props.total_memory)
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-"), info


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:  # noqa: BLE001  (absent or broken: recorded as None)
        return None


def git_commit() -> str:
    """The commit measured: ``$TK_COMMIT`` (the device's copy of the tree may have no .git, so
    the call passes the hash), else ``git rev-parse HEAD``, else ``"unknown"``."""
    if os.environ.get("TK_COMMIT", "").strip():
        return os.environ["TK_COMMIT"].strip()
    try:
        proc = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return proc.stdout.strip() if proc.returncode == 0 and proc.stdout.strip() else "unknown"


@functools.lru_cache(maxsize=1)
def _nvcc_version() -> str | None:
    nvcc = shutil.which("nvcc")
    if not nvcc:
        return None
    out = subprocess.run([nvcc, "--version"], text=True, capture_output=True).stdout
    return out.strip().splitlines()[-1] if out.strip() else None


def backend_table(ops: dict | None, info: dict, dry: bool) -> dict:
    """This device's entry merged into the packaged table (the file ``auto`` reads)."""
    sys.path.insert(0, str(ROOT))
    from taylor_kernels import backend_table as bt
    table = json.loads(bt.DEFAULT_PATH.read_text()) if bt.DEFAULT_PATH.is_file() else \
        {"schema": bt.SCHEMA, "devices": {}}
    if not ops or dry:
        return table
    table["devices"][info["device"]] = {
        "capability": info.get("capability"), "torch": info["torch"], "triton": info["triton"],
        "date": info["date"],
        "ops": {op: {"choice": e["choice"], "ms": e["ms"], "tests": e["tests"]}
                for op, e in ops["ops"].items()}}
    return bt.validate(table)


def ops_table(ops: dict) -> str:
    """The op step's table: per op and backend its check, time, GB/s, share of the copy."""
    # the check column fits its longest entry ("failed (GPU test)" after a failed GPU test)
    w = min(40, max([7] + [len(v) for e in ops["ops"].values() for v in e["tests"].values()]))
    lines = [f"copy (dst.copy_(src), float32): {ops['copy']['GBps']:.0f} GB/s" if "copy" in ops
             else "copy: not measured",
             f"{'op':18s} {'backend':8s} {'check':{w}s} {'ms':>9s} {'GB/s':>7s} {'%copy':>6s} "
             f"{'x eager':>8s}"]
    for op, e in ops["ops"].items():
        for r in e["rows"] or [{"backend": n} for n in e["tests"]]:
            b = r["backend"]
            check = e["tests"].get(b, "-")[:w]  # (an error's text is in the JSON)
            if "median_s" in r:
                vs = r.get("speedup_vs_eager")  # (none when eager's timing failed)
                lines.append(f"{op:18s} {b:8s} {check:{w}s} {r['median_s'] * 1e3:9.3f} "
                             f"{r['GBps']:7.0f} {r['frac_copy']:6.0%} "
                             f"{'-' if vs is None else f'{vs:.2f}':>8s}")
            else:
                lines.append(f"{op:18s} {b:8s} {check:{w}s} {r.get('error', '')[:60]}".rstrip())
        lines.append(f"{op:18s} -> auto uses {e['choice']}")
    return "\n".join(lines)


def family_tables(step: str, result: dict | None) -> str | None:
    """The whole tables of a benchmark step's results (None when it wrote none: then the
    report shows its output's tail)."""
    if not result:
        return None
    try:
        if step == "graphs":
            return "\n".join(
                f"{r['case']:12s} " + (f"FAILED {r['error']}" if "error" in r else
                                       f"eager {r['eager_s'] * 1e3:.2f} ms, graphs "
                                       f"{r['graphs_s'] * 1e3:.2f} ms, ratio {r['ratio']:.2f}, "
                                       f"rel diff {r['rel_diff']:.1e}, chunks from a graph "
                                       f"{r.get('graph_chunks')}") for r in result["rows"])
        from taylor_kernels.benchmarks import FAMILIES
        name = FAMILY_STEPS[step]
        data = result if step == "ig_gpt2" else result["families"][name]
        return "\n\n".join(FAMILIES[name].tables(data))
    except Exception as exc:  # noqa: BLE001 - the report falls back to the output's tail
        return f"(tables not rendered: {type(exc).__name__}: {exc})"


def write_results(c: Check, res: dict, dry: bool, budget: float, final: bool = False) -> None:
    """Write ``gpu-<device>-<date>.{txt,json}`` and ``backend_table.json`` from what the steps
    gave so far (called after every step; ``final`` also prints the summary)."""
    info, stem = c.info, c.stem  # a rerun's stem ends in -rerun: it keeps the full run's files
    ops, tests = res["ops"], res["tests"]
    table = backend_table(ops, info, dry)
    data = {"schema": 1, "dry_run": dry, "finished": final, "steps_selected":
            None if c.selected is None else sorted(c.selected), "machine": info,
            "wall_s": time.monotonic() - c.t0, "budget_s": budget, "steps": c.steps,
            "gpu_tests": {k: tests.get(k) for k in ("selected", "counts", "failed",
                                                    "table_effect")},
            "ops": ops, "families": res["families"], "backend_table": table}
    (c.out / f"{stem}.json").write_text(json.dumps(data, indent=1, default=str))
    (c.out / "backend_table.json").write_text(json.dumps(table, indent=1))
    text = [f"gpu_check {'(dry run, CPU) ' if dry else ''}{stem}: {json.dumps(info)}",
            f"wall {data['wall_s']:.0f} s of {budget:.0f} s{'' if final else ' (in progress)'}",
            "", f"{'step':10s} {'status':22s} {'s':>6s}  note"]
    text += [f"{s['step']:10s} {s['status']:22s} {s['wall_s']:6.1f}  {s['note']}"
             for s in c.steps]
    text += ["", f"GPU-marked tests: {data['gpu_tests']}", ""]
    text += [ops_table(ops) if ops else "ops: no results", ""]
    for s in c.steps:
        if s["step"] in FAMILY_STEPS:
            tables = family_tables(s["step"], res["families"].get(s["step"]))
            text += [f"---- {s['step']} ----", tables or (s.get("output_tail") or "")[-3000:],
                     ""]
    (c.out / f"{stem}.txt").write_text("\n".join(text))
    if final:
        print("\n".join(text[:len(c.steps) + 8]))
        print(f"[gpu_check] wrote {c.out / stem}.txt/.json and {c.out / 'backend_table.json'}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, GPU steps skipped")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"), help="results folder")
    p.add_argument("--budget", type=float, default=None,
                   help="overall seconds (default 470 on a GPU, 55 for a dry run)")
    p.add_argument("--steps", default=None,
                   help=f"comma-separated steps to run (default all: {','.join(STEPS)}); "
                        "'wheels' always runs. A rerun without 'build' imports the package "
                        "from PYTHONPATH (e.g. a carried _C beside the sources)")
    p.add_argument("--tests", default=None, metavar="EXPR",
                   help="only the GPU-marked tests that pytest -k EXPR selects (a rerun)")
    p.add_argument("--step", choices=["gpt2"], help=argparse.SUPPRESS)  # internal subprocess
    p.add_argument("--part", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.step == "gpt2":
        return gpt2_probe(a.dry_run, a.part)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    steps = None if a.steps is None else set(a.steps.split(","))
    if steps is not None and not steps <= set(STEPS):
        p.error(f"unknown steps {sorted(steps - set(STEPS))}; choose from {','.join(STEPS)}")
    budget = a.budget if a.budget is not None else (55.0 if a.dry_run else 470.0)
    if not a.dry_run:
        import torch
        if not torch.cuda.is_available():
            print("gpu_check: no CUDA device; use --dry-run on a CPU machine", file=sys.stderr)
            return 2
    with tempfile.TemporaryDirectory(prefix="tk-gpu-check-") as tmp:
        c = Check(a.dry_run, out, budget, Path(tmp), steps)
        res: dict = {"ops": None, "tests": {}, "families": {}}

        def tests_step():
            res["tests"] = gpu_tests(c, a.tests)
            if res["tests"].get("failed") and res["ops"] is None and not c.dry:
                res["ops"] = ops_from_table(c.info.get("device"))
            if res["ops"] and res["tests"].get("failed"):
                res["tests"]["table_effect"] = apply_test_failures(res["ops"],
                                                                   res["tests"]["failed"])

        def gpt2_step():
            c.run("ig_gpt2", [c.py, "bench/gpu_check.py", "--step", "gpt2", "--part",
                              str(c.parts / "gpt2.json")] + (["--dry-run"] if c.dry else []), 100)
            res["families"]["ig_gpt2"] = c.read_part("gpt2.json")

        def graphs_step():
            c.run("graphs", [c.py, "bench/gpu_graphs.py", "--out", str(c.parts / "graphs.json")]
                  + (["--dry-run", "--rounds", "1"] if c.dry else []), 45)
            res["families"]["graphs"] = c.read_part("graphs.json")

        def hessian_step():
            res["families"]["hessian"] = family(c, "hessian", 75)
            require_rows(c, res["families"]["hessian"], "path_explain",
                         "path_explain not importable (run bench/fetch_gpu_wheels.sh and "
                         "carry bench/wheels)")

        plan = [("wheels", lambda: install_wheels(c)), ("build", lambda: build(c)),
                # ops first: the backend table, and Triton's cache warm for the tests
                ("ops", lambda: res.update(ops=ops_step(c))), ("gpu_tests", tests_step),
                ("ig_cnn", lambda: res["families"].update(
                    ig_cnn=family(c, "ig_cnn", 90))),
                ("ig_gpt2", gpt2_step), ("graphs", graphs_step),
                ("jet", lambda: res["families"].update(jet=family(c, "jet", 60))),
                ("hessian", hessian_step),
                # last: no target figure, so the one the budget cuts first
                ("memcheck", lambda: memcheck(c))]
        for name, step in plan:
            try:
                step()
            except Exception:  # noqa: BLE001 - a driver bug costs one step, never the results
                c.record(name, "failed (driver)", traceback.format_exc()[-2000:])
            try:  # after every step, so that a kill or a crash loses nothing measured
                write_results(c, res, a.dry_run, budget, final=name == plan[-1][0])
            except Exception:  # noqa: BLE001
                print(f"[gpu_check] writing the results failed:\n{traceback.format_exc()}",
                      flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
