"""Time one forward+backward of ``n`` path points through a 4-layer GPT-2 (d=256, 22 tokens)
at a given torch thread count: the measurement behind the "2 threads are 4-20x slower than 1 on
a loaded 2-core CPU" finding in bench/results/cpu-2cores-2026-11-30-chunk-choice-loaded.md.

Usage: python bench/threads_under_load.py POINTS THREADS   (prints the median of 5 calls)
Run it while another job holds the cores, and again on an idle machine, to compare.
"""
import statistics
import sys
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel


def main(points: int, threads: int) -> None:
    torch.manual_seed(0)
    torch.set_num_threads(threads)
    cfg = GPT2Config(n_layer=4, n_embd=256, n_head=4, vocab_size=1000, n_positions=128)
    model = GPT2LMHeadModel(cfg).eval()
    emb = torch.randn(points, 22, 256, requires_grad=True)
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        logp = torch.log_softmax(model(inputs_embeds=emb).logits[:, -1], -1)[:, 5].sum()
        logp.backward()
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    print(f"{points} points, {threads} threads: median {med:.4f} s, "
          f"{med / points * 1e3:.2f} ms per point")


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]))
