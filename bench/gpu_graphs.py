#!/usr/bin/env python
"""CUDA graphs for the chunk loop (``tk.cuda_graphs``) against the eager loop: step ``graphs``
of bench/gpu_check.py.

Cases: IG on the ``ig_vs_captum`` CNN (16 inputs, 64 Gauss-Legendre nodes) and token IG on the
``llm`` family's GPT-2 config (4 x 256, 22 tokens, 64 nodes), both at a fixed chunk size so
that the two loops run the same chunks. Each case: one warm-up call of each, then ``--rounds``
rounds of one eager call and one graphed call in turn (CUDA synchronized around each), median
times, their ratio, the largest relative difference of the attributions, and how many chunks
the graphed calls ran from a graph (0: the capture failed or was skipped, so the "graphs" time
is an eager one; the warnings say why). A case that fails is recorded with its error and the
next one runs; the JSON in ``--out`` is written after every case. ``--dry-run``: tiny sizes
on the CPU, where graphs do not apply (the script runs, the ratio means nothing).
"""
import argparse
import json
import statistics
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout without install

import torch  # noqa: E402

import taylor_kernels as tk  # noqa: E402
from taylor_kernels.benchmarks import cases_llm, models  # noqa: E402
from taylor_kernels.benchmarks.timing import measure  # noqa: E402
from taylor_kernels.engine import cuda_graphs  # noqa: E402

GRAPH_CHUNKS = [0]  # chunks served from a graph since the last reset
_graph_call = cuda_graphs.ChunkGraph.__call__


def _counting_call(self, points, rows):
    out = _graph_call(self, points, rows)
    GRAPH_CHUNKS[0] += out is not None
    return out


cuda_graphs.ChunkGraph.__call__ = _counting_call  # this script's process only


def compare(name: str, call, device: torch.device, rounds: int) -> dict:
    def graphed():
        with tk.cuda_graphs():
            return call()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        call(), graphed()  # warm-up (capture costs are the graphed call's: a graph per call)
        GRAPH_CHUNKS[0] = 0
        times = {"eager": [], "graphs": []}
        outs = {}
        for _ in range(rounds):
            for label, fn in (("eager", call), ("graphs", graphed)):
                keep = lambda label=label, fn=fn: outs.__setitem__(label, fn())  # noqa: E731
                times[label] += measure(keep, warmup=0, repeats=1, device=device).times
    med = {k: statistics.median(v) for k, v in times.items()}
    diff = float((outs["graphs"] - outs["eager"]).abs().max() / outs["eager"].abs().max())
    row = {"case": name, "eager_s": med["eager"], "graphs_s": med["graphs"],
           "ratio": med["graphs"] / med["eager"], "rel_diff": diff, "times": times,
           "graph_chunks": GRAPH_CHUNKS[0],
           "warnings": sorted({str(w.message)[:300] for w in caught})}
    print(f"{name:12s} eager {med['eager'] * 1e3:8.2f} ms  graphs {med['graphs'] * 1e3:8.2f} ms"
          f"  ratio {row['ratio']:.2f}  rel diff {diff:.1e}  chunks from a graph "
          f"{row['graph_chunks']}" + ("  (NO GRAPH: the graphs time is eager)"
                                      if row["graph_chunks"] == 0 else ""), flush=True)
    for message in row["warnings"]:
        print(f"  warning: {message}", flush=True)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    device = torch.device("cpu" if a.dry_run else "cuda")
    small = a.dry_run
    torch.manual_seed(0)
    steps = 8 if small else 64
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "dry_run": a.dry_run, "rows": []}

    def cnn_case():
        cnn = models.cnn(1, 8 if small else 28, 10).to(device).eval()
        x = torch.randn(2 if small else 16, 1, 8 if small else 28, 8 if small else 28,
                        device=device)
        return lambda: tk.integrated_gradients(cnn, x, target=3, steps=steps,
                                               chunk_size=64).attributions

    def gpt2_case():
        spec = cases_llm.TINY if small else cases_llm.GPT2
        lm = cases_llm.build(tuple(sorted(spec.items())))[0].to(device)
        ids = torch.randint(4, spec["vocab"], (1, 8 if small else 22), device=device)
        return lambda: tk.token_integrated_gradients(
            lm, ids, 5, attention_mask=torch.ones_like(ids), baselines="pad", steps=steps,
            chunk_size=8).attributions

    for name, make in (("cnn ig", cnn_case), ("gpt2 token", gpt2_case)):
        try:
            result["rows"].append(compare(name, make(), device, a.rounds))
        except Exception as exc:  # noqa: BLE001 - one case's failure keeps the other's figures
            print(f"{name:12s} FAILED {type(exc).__name__}: {exc}"[:400], flush=True)
            result["rows"].append({"case": name, "error": f"{type(exc).__name__}: {exc}"[:400]})
        if a.out:
            Path(a.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
