"""Subprocess worker: the times of several methods on one case, interleaved in one process.

``python -m taylor_kernels.benchmarks.interleaved '<json spec>'`` builds every method's call
(``spec["methods"]``, each through :func:`memprobe.make_call` with ``spec["method"]`` set to
it), runs each ``warmup`` times, then ``rounds`` rounds of one timed call per method in turn,
and prints one JSON line ``{method: Timing.as_dict()}``. Run in turns, the methods share
every drift of the machine's speed (a shared VM's CPU, another tenant, a thermal state), which
timing them in separate processes one after the other does not: on the 2-core VM this changed
a ratio from 1.01 to 1.44 between two runs minutes apart.
"""
from __future__ import annotations

import json
import sys


def run(spec: dict) -> dict:
    import torch

    from taylor_kernels.benchmarks.memprobe import make_call
    from taylor_kernels.benchmarks.timing import Timing, _sync

    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    calls = {}
    for method in spec["methods"]:
        calls[method], device = make_call({**spec, "method": method})
        for _ in range(spec.get("warmup", 1)):
            calls[method]()
    timings = {m: Timing() for m in calls}
    import time
    for _ in range(spec.get("rounds", 3)):
        for method, call in calls.items():
            _sync(device)
            began = time.perf_counter()
            call()
            _sync(device)
            timings[method].times.append(time.perf_counter() - began)
    return {m: t.as_dict() for m, t in timings.items()}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    print("INTERLEAVED_RESULT " + json.dumps(run(json.loads(argv[0]))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
