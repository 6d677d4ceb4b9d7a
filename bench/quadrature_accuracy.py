#!/usr/bin/env python
"""How accurate is 64-node Gauss-Legendre on the ``llm`` family's random Llama config?

Token IG (``score="log_prob"``, pad baseline, the ``llm`` case's prompt and target) with GL at
64, 128 and 512 nodes and the adaptive rule (``tol=1e-3``), in bf16 and float32: completeness
gap ``sum(attr) - (f(x) - f(b))``, max relative difference to GL-512, evaluations, and the
time of a second (warm) call. ``python bench/quadrature_accuracy.py``.
"""
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout without install

import torch  # noqa: E402

import taylor_kernels as tk  # noqa: E402
from taylor_kernels.benchmarks import cases_llm  # noqa: E402

RULES = {"gl64": dict(steps=64), "gl128": dict(steps=128), "gl512": dict(steps=512),
         "adaptive": dict(rule="adaptive", tol=1e-3)}


def main() -> None:
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    for dtype in ("bfloat16", "float32"):
        spec = {**cases_llm.LLAMA, "dtype": dtype}
        model, _ = cases_llm.build(tuple(sorted(spec.items())))
        g = torch.Generator().manual_seed(0)  # as cases_llm._next_call
        ids = torch.randint(4, model.config.vocab_size, (1, 22), generator=g)
        target = int(torch.randint(4, model.config.vocab_size, (1,), generator=g))
        results = {}
        for name, kw in RULES.items():
            def call():
                return tk.token_integrated_gradients(model, ids, target, baselines="pad",
                                                     score="log_prob", **kw)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the adaptive rule says it missed tol
                call()
                began = time.perf_counter()
                results[name] = (call(), time.perf_counter() - began)
        ref = results["gl512"][0].attributions
        for name, (res, seconds) in results.items():
            diff = float((res.attributions - ref).abs().max() / ref.abs().max())
            print(f"{dtype:9s} {name:9s} evaluations {res.evaluations:4d}  gap "
                  f"{float(res.gap[0]):+.4f}  rel diff vs gl512 {diff:.3f}  "
                  f"warm call {seconds * 1e3:.0f} ms")


if __name__ == "__main__":
    main()
