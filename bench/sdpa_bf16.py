#!/usr/bin/env python
"""Where the bf16 Llama ``llm`` case spends its time: the fused CPU attention's backward.

The ``llm`` family's bf16 Llama next-token case (4 layers, d=256, 22 tokens, 64 GL nodes, one
thread as its quick tier), Captum's ``LayerIntegratedGradients`` and ours (the Captum front)
on the same user forward: (1) the share of the call in
``_scaled_dot_product_flash_attention_for_cpu_backward`` (profiler); (2) both methods with
SDPA's fused kernel (the model's default) and inside ``sdpa_kernel(MATH)``, interleaved,
median times, and each one's max relative difference from Captum's fused bf16 result and from
Captum on a float32 copy of the model. ``python bench/sdpa_bf16.py [--rounds N]``.
"""
import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout without install

import torch  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402
from torch.profiler import profile  # noqa: E402

from taylor_kernels.benchmarks import cases_llm  # noqa: E402

BACKWARD = "aten::_scaled_dot_product_flash_attention_for_cpu_backward"


def in_math(call):
    def run():
        with sdpa_kernel([SDPBackend.MATH]):
            return call()
    return run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(1)
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    print(f"torch {torch.__version__}, 1 thread, {stamp}")
    model, _ = cases_llm.build(tuple(sorted({**cases_llm.LLAMA, "dtype": "bfloat16"}.items())))
    f32 = copy.deepcopy(model).float()
    fused = {m: cases_llm._next_call(m, model, 22, cases_llm.STEPS, {})
             for m in ("captum_lig", "tk_lig")}
    calls = {**fused, **{m + " math": in_math(c) for m, c in fused.items()}}
    ref_bf16 = fused["captum_lig"]().float()
    ref_f32 = cases_llm._next_call("captum_lig", f32, 22, cases_llm.STEPS, {})().float()
    with profile() as prof:
        fused["captum_lig"]()
    events = {e.key: e.self_cpu_time_total for e in prof.key_averages()}
    print(f"captum_lig fused bf16: {events.get(BACKWARD, 0) / sum(events.values()):.0%} of the "
          f"call's self CPU time in {BACKWARD}")
    times = {m: [] for m in calls}
    for _ in range(args.rounds):
        for m, call in calls.items():
            began = time.perf_counter()
            call()
            times[m].append(time.perf_counter() - began)
    base = statistics.median(times["captum_lig"])
    for m, call in calls.items():
        out = call().float()
        med = statistics.median(times[m])
        print(f"{m:16s} median {med * 1e3:6.0f} ms  {med / base:.2f}x captum fused  rel diff vs "
              f"captum fused bf16 {float((out - ref_bf16).abs().max() / ref_bf16.abs().max()):.1e}"
              f", vs captum float32 {float((out - ref_f32).abs().max() / ref_f32.abs().max()):.1e}")


if __name__ == "__main__":
    main()
