"""Wall-clock timing: warmup, repeats, median and inter-quartile range.

On CUDA the device is synchronised before the clock starts and before it stops, so a time
covers the kernels a call launched, not just their launch.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import torch


@dataclass
class Timing:
    """Times in seconds of the measured repeats (warmup calls excluded)."""

    times: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def iqr(self) -> float:
        """Inter-quartile range (q75 - q25, linear interpolation); 0 for a single repeat."""
        if len(self.times) < 2:
            return 0.0
        q = statistics.quantiles(self.times, n=4, method="inclusive")
        return q[2] - q[0]

    def as_dict(self) -> dict:
        return {"median_s": self.median, "iqr_s": self.iqr, "repeats": len(self.times),
                "times_s": list(self.times)}


def _sync(device: torch.device | None) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn: Callable[[], object], *, warmup: int = 1, repeats: int = 5,
            device: torch.device | str | None = None) -> Timing:
    """Call ``fn`` ``warmup`` times untimed, then ``repeats`` times timed (one clock per call)."""
    device = torch.device(device) if isinstance(device, str) else device
    for _ in range(warmup):
        fn()
    _sync(device)
    timing = Timing()
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        timing.times.append(time.perf_counter() - t0)
    return timing
