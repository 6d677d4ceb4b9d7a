#!/usr/bin/env python
"""How close Captum's MiniLM layer-IG call already is to this CPU's floor (issue 9).

The ``llm`` family's MiniLM case (real weights, one sentence, 64 path points, one thread as
its quick tier) runs 64 forwards and one input-gradient backward of the encoder; there is no
LM head to trim, so the library can only win by doing the same work faster. This script
measures, on the batched ``[64, T, 384]`` forward + backward alone: the floating-point work
(``FlopCounterMode``), the time, the profiler's share in matrix products (``mm``/``addmm``/
``bmm``) and the GEMM rate of this core at the model's shapes; the matrix products' time over
the whole is the fraction no change outside them can go below. ``--compile`` also times the
model compiled by ``torch.compile`` (inductor), against eager, with its compile time.
``python bench/minilm_floor.py [--compile] [--rounds N]``.
"""
import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout without install

import torch  # noqa: E402
from torch.profiler import profile  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from taylor_kernels.benchmarks import cases_llm  # noqa: E402
from taylor_kernels.benchmarks.timing import measure  # noqa: E402

POINTS = 64
MATMULS = ("aten::mm", "aten::addmm", "aten::bmm")


def median_time(fn, rounds: int) -> float:
    """Median seconds of ``rounds`` timed calls after one warm-up call."""
    return measure(fn, warmup=1, repeats=rounds).median


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--compile", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(1)
    model, tok = cases_llm.build((("arch", "minilm"),))
    enc = tok(cases_llm.SENTENCES[0], return_tensors="pt")
    with torch.no_grad():
        emb = model.get_input_embeddings()(enc["input_ids"])
    points = emb.expand(POINTS, -1, -1).contiguous()
    mask = enc["attention_mask"].expand(POINTS, -1)

    def step(net):
        def run():
            e = points.clone().requires_grad_(True)
            out = net(inputs_embeds=e, attention_mask=mask)
            score = cases_llm._pooled(out, mask).sum()
            return torch.autograd.grad(score, e)[0]
        return run

    eager = step(model)
    with FlopCounterMode(display=False) as counter:
        eager()
    flops = counter.get_total_flops()
    t_eager = median_time(eager, args.rounds)
    with profile() as prof:
        eager()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    in_mm = sum(e.self_cpu_time_total for e in events if e.key in MATMULS)
    print(f"MiniLM-L6, {POINTS} points x {points.shape[1]} tokens, forward + input gradient, "
          f"1 thread, torch {torch.__version__}")
    print(f"  work {flops / 1e9:.1f} GFLOP, median {t_eager * 1e3:.0f} ms "
          f"({flops / t_eager / 1e9:.0f} GFLOP/s)")
    counts = counter.get_flop_counts().get("Global", {})
    mm_flops = sum(v for k, v in counts.items() if str(k).split(".")[-1] in ("mm", "addmm", "bmm"))
    print(f"  matrix products: {in_mm / total:.0%} of the profiled time "
          f"(the floor for any change outside them: {in_mm / total:.2f}x), "
          f"{mm_flops / 1e9:.1f} GFLOP at {mm_flops / (in_mm / total * t_eager) / 1e9:.0f} GFLOP/s"
          f" (their share of the median time)")
    rows = POINTS * points.shape[1]
    for out_f, in_f in ((384, 384), (1536, 384), (384, 1536)):
        a, w = torch.randn(rows, in_f), torch.randn(out_f, in_f)
        t = median_time(lambda: a @ w.T, 4 * args.rounds)
        print(f"  GEMM [{rows}, {in_f}] x [{in_f}, {out_f}]: {2 * rows * in_f * out_f / t / 1e9:.0f}"
              f" GFLOP/s")
    if args.compile:
        start = time.perf_counter()
        compiled = step(torch.compile(model, dynamic=False))
        compiled()
        print(f"  torch.compile (inductor): compile {time.perf_counter() - start:.0f} s, "
              f"median {median_time(compiled, args.rounds) * 1e3:.0f} ms vs eager "
              f"{median_time(eager, args.rounds) * 1e3:.0f} ms (interleaved after)")


if __name__ == "__main__":
    main()
