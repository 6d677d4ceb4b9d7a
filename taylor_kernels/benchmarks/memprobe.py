"""Subprocess worker of the Captum comparisons: one call (:mod:`calls`) on one case in a fresh
interpreter.

``python -m taylor_kernels.benchmarks.memprobe '<json spec>'`` builds the model and the batch,
runs ``warmup`` untimed calls, then measures the PEAK MEMORY of one call and the times of
``repeats`` more, and prints one JSON line. Peak memory, CPU (Linux):

1. after the warmup, ``gc.collect()`` and glibc ``malloc_trim(0)`` hand freed heap pages back
   so the resident set holds only what is live (model, inputs, libraries);
2. ``baseline = VmRSS`` from ``/proc/self/status``; writing ``5`` to ``/proc/self/clear_refs``
   resets the high-water mark ``VmHWM`` to the current RSS;
3. one call; ``peak = VmHWM - baseline`` (every byte the call made resident, at its maximum);
   steps 2-3 are repeated ``memory_repeats`` times and the median is reported.

If ``clear_refs`` cannot be written, the FIRST call (before any warmup) is measured instead,
relative to the RSS just before it (``method: "first_call_hwm"``). On CUDA it is
``torch.cuda.max_memory_allocated() - memory_allocated()`` around the call (after
``reset_peak_memory_stats``).
"""
from __future__ import annotations

import ctypes
import gc
import json
import sys
import time
from pathlib import Path


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def make_call(spec: dict):
    """``(call, device)``: a no-argument function returning the attributions tensor
    (``spec["factory"] = "module:function"`` builds it instead, from the spec)."""
    import torch

    if spec.get("factory"):
        import importlib
        module, name = spec["factory"].split(":")
        return getattr(importlib.import_module(module), name)(spec)

    from taylor_kernels.benchmarks import calls, models

    device = torch.device(spec["device"])
    dtype = getattr(torch, spec.get("dtype", "float32"))
    model = models.build(spec["model_spec"], device, dtype)
    x, target = models.batch(spec["model_spec"], spec["batch"], device, dtype)
    call = calls.build(spec, model, x, target)
    return call, device


def measure_peak(call, device) -> tuple[object, dict]:
    import torch

    if device.type == "cuda":  # the one CUDA peak probe of the package
        from taylor_kernels.engine.guards import cuda_peak_bytes

        base = torch.cuda.memory_allocated(device)
        out, peak = cuda_peak_bytes(call, device)
        return out, {"peak_bytes": int(peak), "baseline_bytes": base,
                     "memory_method": "cuda_max_memory_allocated"}
    _trim()
    base = _status_kib("VmRSS")
    if not _reset_hwm():
        raise RuntimeError("cannot reset VmHWM")
    out = call()
    hwm = _status_kib("VmHWM")
    return out, {"peak_bytes": (hwm - base) * 1024, "baseline_bytes": base * 1024,
                 "hwm_bytes": hwm * 1024, "memory_method": "clear_refs_hwm"}


def run(spec: dict) -> dict:
    import torch

    from taylor_kernels.benchmarks.timing import measure

    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    call, device = make_call(spec)
    first = None
    if device.type != "cuda" and not _reset_hwm():  # fallback: measure the very first call
        _trim()
        base = _status_kib("VmRSS") or 0
        t0 = time.perf_counter()
        out = call()
        first = time.perf_counter() - t0
        hwm = _status_kib("VmHWM") or 0
        mem = {"peak_bytes": (hwm - base) * 1024, "baseline_bytes": base * 1024,
               "hwm_bytes": hwm * 1024, "memory_method": "first_call_hwm"}
        for _ in range(max(spec.get("warmup", 1) - 1, 0)):
            call()
    else:
        for _ in range(spec.get("warmup", 1)):
            call()
        peaks = []
        for _ in range(max(1, spec.get("memory_repeats", 1))):  # median of a few calls
            out, mem = measure_peak(call, device)
            peaks.append(mem["peak_bytes"])
            del out
        out, mem["peak_bytes"] = None, sorted(peaks)[len(peaks) // 2]
        mem["peak_bytes_all"] = peaks
    timing = measure(call, warmup=0, repeats=spec.get("repeats", 3), device=device)
    if spec.get("attr_path"):
        torch.save((out if out is not None else call()).detach().cpu(), spec["attr_path"])
    import taylor_kernels as tk
    return {**mem, **timing.as_dict(), "first_call_s": first,
            "torch_threads": torch.get_num_threads(),
            "ops_backend": tk.backends.resolve(device) if spec["method"] != "captum" else None}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    spec = json.loads(argv[0])
    result = run(spec)
    print("MEMPROBE_RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
