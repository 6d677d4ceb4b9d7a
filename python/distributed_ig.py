"""Integrated Gradients sharded over torch.distributed ranks (gloo on CPU, NCCL on GPUs).

Every rank builds the same model and batch (same seeds), calls
``tk.integrated_gradients(..., distributed=True)`` on its block of the flattened
inputs x baselines x steps range, and the partial sums are all-reduced: every rank prints the
same checksum. Rank 0 also runs the single-process call and prints the largest difference.

Usage:
    torchrun --nproc-per-node 2 python/distributed_ig.py            # one machine, CPU (gloo)
    torchrun --nproc-per-node 8 --nnodes 2 --rdzv-backend c10d \\
        --rdzv-endpoint HOST:29500 python/distributed_ig.py --backend nccl   # a GPU cluster
    python python/distributed_ig.py --spawn 2                       # without torchrun
"""
from __future__ import annotations

import argparse
import datetime
import os
import socket
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import taylor_kernels as tk


def build(device: torch.device, batch: int, dim: int):
    """The same seeded MLP and batch on every rank."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(dim, 128), torch.nn.GELU(),
                                torch.nn.Linear(128, 10)).to(device)
    x = torch.randn(batch, dim, device=device)
    return model, x, model(x).argmax(1)


def attribute(args) -> None:
    """The per-rank body: process group already initialised."""
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cpu")
    if args.backend == "nccl":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        torch.cuda.set_device(device)
    model, x, target = build(device, args.batch, args.dim)
    t0 = time.perf_counter()
    res = tk.integrated_gradients(model, x, target=target, steps=args.steps, distributed=True)
    elapsed = time.perf_counter() - t0
    # each line in one write, newline included: print() writes the newline separately, and
    # the ranks share stdout, so another rank's line could land in between
    say(f"rank {rank}/{world}: {res.evaluations} evaluations over all ranks, {elapsed:.2f} s, "
        f"checksum {res.attributions.double().sum().item():.10e}, "
        f"max |gap| {res.gap.abs().max().item():.2e}")
    if rank == 0:
        single = tk.integrated_gradients(model, x, target=target, steps=args.steps)
        diff = (single.attributions - res.attributions).abs().max().item()
        say(f"rank 0: max |distributed - single process| = {diff:.2e}")


def say(line: str) -> None:
    """``line`` and its newline to stdout in one write."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _spawned(rank: int, world: int, port: int, args) -> None:
    dist.init_process_group(args.backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        attribute(args)
    finally:
        dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", default="gloo", choices=["gloo", "nccl"],
                   help="torch.distributed backend")
    p.add_argument("--spawn", type=int, default=0, help="start this many local ranks "
                   "(instead of torchrun)")
    p.add_argument("--batch", type=int, default=16, help="inputs attributed")
    p.add_argument("--dim", type=int, default=64, help="input features of the MLP")
    p.add_argument("--steps", type=int, default=50, help="IG steps")
    args = p.parse_args()
    if args.spawn < 0 or not args.spawn and "RANK" not in os.environ:
        p.error("run it under torchrun, or pass --spawn N (N >= 1 local ranks)")
    if args.spawn:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.spawn(_spawned, args=(args.spawn, port, args), nprocs=args.spawn, join=True)
        return
    dist.init_process_group(args.backend, timeout=datetime.timedelta(seconds=60))
    try:
        attribute(args)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
