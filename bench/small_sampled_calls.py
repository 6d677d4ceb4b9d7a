#!/usr/bin/env python
"""Captum-front GradientShap on a 4x256 GPT-2 config: a small call (one prompt, a few samples),
where the probes before the path weigh most.

One next-token log-prob through ``inputs_embeds`` (20 tokens, random weights), 3 zero
baselines, ``n_samples`` 1 and 5, one thread: ``captum.attr.GradientShap`` against
``taylor_kernels.captum``'s, calls interleaved. Prints per case the median milliseconds of
each and the ratio, and the forwards each library ran (rows per forward).
``python bench/small_sampled_calls.py [--rounds 25]``.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout without install

import torch  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=25)
    args = p.parse_args()
    import captum.attr as ca
    from transformers import GPT2Config, GPT2LMHeadModel

    import taylor_kernels.captum as tkc
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=4, n_embd=256, n_head=4, vocab_size=1000,
                                       n_positions=128)).eval()
    ids = torch.randint(0, 1000, (1, 20), generator=torch.Generator().manual_seed(1))
    emb = model.get_input_embeddings()(ids).detach()
    rows: list[int] = []
    model.transformer.register_forward_pre_hook(
        lambda m, a, kw: rows.append(kw["inputs_embeds"].shape[0]), with_kwargs=True)

    def log_prob(e):
        return torch.log_softmax(model(inputs_embeds=e).logits[:, -1], -1)

    baselines = torch.zeros(3, 20, 256)
    print(f"{'n_samples':>9s} {'Captum ms':>10s} {'ours ms':>8s} {'ratio':>6s}  forwards "
          "(rows) Captum / ours")
    for n in (1, 5):
        times: dict = {ca: [], tkc: []}
        for _ in range(args.rounds):
            for lib in (ca, tkc):
                began = time.perf_counter()
                lib.GradientShap(log_prob).attribute(emb, baselines=baselines, target=5,
                                                     n_samples=n)
                times[lib].append(time.perf_counter() - began)
        seen = {}
        for lib in (ca, tkc):
            rows.clear()
            lib.GradientShap(log_prob).attribute(emb, baselines=baselines, target=5, n_samples=n)
            seen[lib] = list(rows)
        mc, mo = (statistics.median(times[lib]) * 1e3 for lib in (ca, tkc))
        print(f"{n:9d} {mc:10.1f} {mo:8.1f} {mo / mc:6.2f}  {seen[ca]} / {seen[tkc]}")


if __name__ == "__main__":
    main()
