"""What the numbers were measured on: versions, CPU, threads, GPU, date, load."""
from __future__ import annotations

import datetime
import os
import platform
import re
import subprocess
from pathlib import Path

import torch


def cpu_model() -> str:
    """The CPU's model name from ``/proc/cpuinfo`` (``platform.processor()`` elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware", "cpu model")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_cores() -> int:
    """Cores this process may run on (affinity), else ``os.cpu_count()``."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def bench_device() -> torch.device:
    """The device the benchmarks run on: the current CUDA device if there is one, else CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
        else torch.device("cpu")


def device_label(device: torch.device) -> str:
    """``<GPU name>`` (spaces -> dashes) or ``cpu-<N>cores``: the results file's prefix."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "cuda"
    return f"cpu-{cpu_cores()}cores"


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:  # noqa: BLE001  (missing or broken optional package)
        return None


def _git_commit() -> str | None:
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return None
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "-uno"],
                               capture_output=True, text=True, timeout=10)
        return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "") or None
    except (OSError, subprocess.SubprocessError):
        return None


def machine_info(device: torch.device) -> dict:
    """Versions, CPU model and threads, GPU name and memory, backends, date, load average."""
    import taylor_kernels as tk

    info = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "device": str(device), "device_label": device_label(device),
        "python": platform.python_version(), "platform": platform.platform(),
        "torch": torch.__version__, "torch_cuda": torch.version.cuda,
        "triton": _version("triton"), "captum": _version("captum"), "numpy": _version("numpy"),
        "taylor_kernels": tk.__version__, "git_commit": _git_commit(),
        "cpu_model": cpu_model(), "cpu_cores": cpu_cores(), "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "backends_built": tk.backends.available(), "forced_backend": tk.backends.current(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0") == "1",
        "gpu": None, "gpu_memory_bytes": None,
    }
    try:
        info["load_average"] = list(os.getloadavg())
    except OSError:
        info["load_average"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = props.name
        info["gpu_memory_bytes"] = int(props.total_memory)
        info["gpu_capability"] = f"{props.major}.{props.minor}"
    return info
