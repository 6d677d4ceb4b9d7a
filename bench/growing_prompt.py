#!/usr/bin/env python
"""Captum-front IG on a prompt one token longer each call, as Inseq attributes a generation.

A 2x64 GPT-2 config (random weights), one next-token log-prob through ``inputs_embeds``, 50
steps, one thread: ``captum.attr.IntegratedGradients`` against ``taylor_kernels.captum``'s, a
fresh model per round, 12 calls per round at lengths ``L0 .. L0 + 11`` (each a new shape).
Prints the median milliseconds per call of each. ``python bench/growing_prompt.py
[--rounds 5]``.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout without install

import torch  # noqa: E402

CALLS = 12


def _round(lib, start: int) -> float:
    """Seconds for ``CALLS`` calls at lengths ``start ..`` on a fresh model."""
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=1000,
                                       n_positions=128)).eval()
    emb = model.get_input_embeddings()

    def log_prob(e):
        return torch.log_softmax(model(inputs_embeds=e).logits[:, -1], -1)

    began = time.perf_counter()
    for length in range(start, start + CALLS):
        ids = torch.randint(5, 1000, (1, length), generator=torch.Generator().manual_seed(length))
        lib.IntegratedGradients(log_prob).attribute(emb(ids).detach(), target=7, n_steps=50)
    return time.perf_counter() - began


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    import captum.attr as ca
    from transformers.utils import logging

    import taylor_kernels.captum as tc
    logging.set_verbosity_error()
    torch.set_num_threads(1)
    times = {"captum": [], "taylor_kernels.captum": []}
    for r in range(args.rounds):  # alternating, so both share the machine's drift
        for name, lib in (("captum", ca), ("taylor_kernels.captum", tc)):
            times[name].append(_round(lib, 6 + r) / CALLS)
    med = {k: statistics.median(v) for k, v in times.items()}
    for name, t in med.items():
        print(f"{name:24s} {t * 1e3:6.2f} ms per call")
    print(f"ratio ours / captum: {med['taylor_kernels.captum'] / med['captum']:.2f}")


if __name__ == "__main__":
    main()
