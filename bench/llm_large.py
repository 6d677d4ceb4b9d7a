#!/usr/bin/env python
"""One case of the ``llm`` family's full tier alone; by default the ~100M-parameter one: a
12x768 GPT-2 config (random weights), a 32-token continuation of a 128-token prompt, 8
Gauss-Legendre nodes, ours with ``max_memory="4GB"``, against Captum's
``LLMGradientAttribution(LayerIntegratedGradients)``.

``python bench/llm_large.py [--case NAME] [--rounds N] [--out PATH.json] [--device ...]``: peak memory
per method in a fresh process, times interleaved in one process (as the family); prints the
table and writes the JSON and a .txt (machine, load averages). The default case takes about
10 minutes on a 2-core CPU.
"""
import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout without install

import torch  # noqa: E402

from taylor_kernels.benchmarks import cases_llm  # noqa: E402
from taylor_kernels.benchmarks.machine import machine_info  # noqa: E402
from taylor_kernels.cli import device_arg  # noqa: E402
from taylor_kernels.benchmarks.report import write_json  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--device", type=device_arg,
                   default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--case", default=cases_llm.CASES["large"][0][0],
                   choices=[c[0] for c in cases_llm.CASES["full"]])
    p.add_argument("--rounds", type=int, default=1, help="timed calls per method, in turns")
    args = p.parse_args()
    cases_llm.REPEATS["large"] = args.rounds
    cases_llm.CASES["large"] = [c for c in cases_llm.CASES["full"] if c[0] == args.case]
    device = torch.device(args.device)
    info = machine_info(device)
    slug = args.case.replace(" ", "-")
    out = args.out or Path(__file__).parent / "results" / (
        f"{info['device_label']}-{time.strftime('%Y-%m-%d')}-llm-{slug}.json")
    began = time.perf_counter()
    result = cases_llm.run("large", device, log=lambda m: print(m, flush=True))
    info["load_average_end"] = list(os.getloadavg())
    table = "\n".join(cases_llm.tables(result))
    header = (f"bench/llm_large.py --case '{args.case}', {info['date']}, commit "
              f"{info['git_commit']}\n"
              f"Machine: {info['cpu_count']}-core {info['cpu_model']}, torch "
              f"{info['torch']} ({info['torch_threads']} threads), captum {info['captum']}; "
              f"load average {info['load_average'][0]:.1f} at the start, "
              f"{info['load_average_end'][0]:.1f} at the end\n\n")
    table = header + table
    print(table)
    write_json(out, {"tier": "large", "machine": info, "families": {"llm": result},
                     "wall_s": time.perf_counter() - began})
    out.with_suffix(".txt").write_text(table + "\n")
    print(f"results written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
