"""Per-op backend choice of ``auto`` on CUDA devices, read from a measured table.

``bench/gpu_check.sh`` times the CUDA and the Triton kernel of every op on the GPU it runs on,
runs their GPU tests, and records per op the faster backend whose tests passed, or
``reference`` when neither passed (:func:`decide`). The table is JSON::

    {"schema": 1, "devices": {"NVIDIA H200": {"capability": "9.0", "torch": "2.11.0+cu130",
      "triton": "3.6.0", "date": "...", "ops": {"path_points": {"choice": "cuda",
      "ms": {"cuda": 0.41, "triton": 0.47}, "tests": {"cuda": "passed", "triton": "passed"}}}}}}

It is read from ``$TAYLOR_KERNELS_BACKEND_TABLE`` (a path), else from ``backend_table.json``
beside this module. With no table, no entry for the device's name, or an entry naming a backend
that cannot run here, ``auto`` keeps its fixed order on CUDA: ``cuda`` (when the extension was
built with CUDA kernels), then ``triton``, then ``reference``.
"""
from __future__ import annotations

import functools
import json
import math
import os
from pathlib import Path

import torch

OPS = ("path_points", "path_accumulate", "ih_accumulate", "jet_unary", "jet_mul",
       "polarize_contract")
GPU_BACKENDS = ("cuda", "triton")
ENV_VAR = "TAYLOR_KERNELS_BACKEND_TABLE"
DEFAULT_PATH = Path(__file__).with_name("backend_table.json")
SCHEMA = 1


def decide(ms: dict[str, float], tests: dict[str, str]) -> str:
    """The backend for one op: the faster (median ``ms``) of the GPU backends whose tests
    ``"passed"``; ``"reference"`` when none passed or none was timed."""
    ok = [n for n in GPU_BACKENDS
          if tests.get(n) == "passed" and isinstance(ms.get(n), (int, float))
          and math.isfinite(ms[n])]
    return min(ok, key=lambda n: ms[n]) if ok else "reference"


def validate(table: dict) -> dict:
    """Return ``table`` if it has the layout of the module docstring, else raise ``ValueError``."""
    if not isinstance(table, dict) or table.get("schema") != SCHEMA or \
            not isinstance(table.get("devices"), dict):
        raise ValueError(f"backend table: expected {{'schema': {SCHEMA}, 'devices': {{...}}}}")
    for dev, entry in table["devices"].items():
        ops = entry.get("ops") if isinstance(entry, dict) else None
        if not isinstance(ops, dict):
            raise ValueError(f"backend table: device {dev!r} has no 'ops' mapping")
        for op, row in ops.items():
            if op not in OPS or not isinstance(row, dict) or \
                    row.get("choice") not in GPU_BACKENDS + ("reference",):
                raise ValueError(f"backend table: bad entry {op!r} for {dev!r}: {row!r} "
                                 f"(ops {OPS}, choice one of {GPU_BACKENDS + ('reference',)})")
    return table


def table_path() -> Path:
    """Where the table is read from (``$TAYLOR_KERNELS_BACKEND_TABLE`` or the packaged file)."""
    env = os.environ.get(ENV_VAR, "").strip()
    return Path(env) if env else DEFAULT_PATH


@functools.lru_cache(maxsize=8)
def _load(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        return {"schema": SCHEMA, "devices": {}}
    return validate(json.loads(p.read_text()))


def load() -> dict:
    """The current table (cached per path; an absent file is an empty table)."""
    return _load(str(table_path()))


def lookup(table: dict, device_name: str, op: str) -> str | None:
    """The recorded choice for ``op`` on a GPU named ``device_name``, or None."""
    row = table["devices"].get(device_name, {}).get("ops", {}).get(op)
    return row["choice"] if row else None


@functools.lru_cache(maxsize=None)
def _device_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def device_name(device: torch.device) -> str:
    """``torch.cuda.get_device_name`` of a CUDA device (cached; no synchronization)."""
    return _device_name(device.index if device.index is not None else torch.cuda.current_device())


def choice(op: str, device: torch.device) -> str | None:
    """The measured backend for ``op`` on CUDA ``device``, or None (then ``auto``'s fixed order
    applies)."""
    table = load()
    if not table["devices"]:
        return None
    return lookup(table, device_name(device), op)
