#!/usr/bin/env python
"""The work of a generation attribution, ours against Captum's (issue 9's 0.25x aim).

The ``llm`` family's ``gpt2 gen`` case (4 x 256 GPT-2 config, 32-token prompt, 16-token
continuation, 16 Gauss-Legendre nodes, one thread as its quick tier): Captum's
``LLMGradientAttribution(LayerIntegratedGradients)`` (one layer-IG call per target token, each
a forward and a backward of the growing sequence with the whole LM head) and ours (one forward
of prompt + continuation per path point, the LM head at the read positions, then one
input-gradient backward per target token). For each: the floating-point work counted by
``FlopCounterMode`` (matrix products; attention is not counted), the median time of
``--rounds`` interleaved calls and the rate. The ratio of the work is the time ratio a
library could reach if both ran at the same rate. ``python bench/generation_floor.py``.
"""
import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout without install

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from taylor_kernels.benchmarks import cases_llm  # noqa: E402
from taylor_kernels.benchmarks.timing import measure  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args()
    torch.set_num_threads(1)
    model, _ = cases_llm.build(tuple(sorted(cases_llm.GPT2.items())))
    calls = {m: cases_llm._gen_call(m, model, 32, 16, 16, {}) for m in cases_llm.GEN}
    flops, times = {}, {m: [] for m in calls}
    for method, call in calls.items():
        with FlopCounterMode(display=False) as counter:
            call()
        flops[method] = counter.get_total_flops()
    for _ in range(a.rounds):  # interleaved: one call of each per round
        for method, call in calls.items():
            times[method] += measure(call, warmup=0, repeats=1).times
    print(f"GPT-2 4x256, 32 + 16 tokens, 16 nodes, 1 thread, torch {torch.__version__}")
    for method in calls:
        med = statistics.median(times[method])
        print(f"  {method:11s} {flops[method] / 1e9:7.1f} GFLOP  median {med:6.2f} s  "
              f"{flops[method] / med / 1e9:5.0f} GFLOP/s")
    ours, theirs = flops["tk_llm"], flops["captum_llm"]
    t_ratio = statistics.median(times["tk_llm"]) / statistics.median(times["captum_llm"])
    print(f"  work ratio (ours / Captum) {ours / theirs:.2f}, time ratio {t_ratio:.2f}")


if __name__ == "__main__":
    main()
