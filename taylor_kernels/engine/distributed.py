"""Sharding the path engine's work over ``torch.distributed`` ranks.

A call's work is the flattened index range ``[0, N)`` of path points ``n = (b*K + k)*S + s``
(``N = B*K*S``). Rank ``r`` of ``W`` takes the contiguous block
``[floor(r N / W), floor((r+1) N / W))``, streams it through the usual chunk loop (its own
memory budget), and the ``[B, D]`` partial sums are added with one ``all_reduce`` (or
``reduce`` to rank 0). Every rank computes the endpoint values ``f(x)``, ``f(b)`` itself
(``B (K + 1)`` forwards, a ``1/S`` fraction of the work), so the completeness gap needs no
communication beyond the sums. Backends: gloo for CPU tensors, NCCL for CUDA tensors (one
GPU per rank: ``torch.cuda.set_device(local_rank)`` before the call).

Run on a cluster with torchrun, the same script on every rank::

    torchrun --nproc-per-node 4 --nnodes 2 --rdzv-backend c10d \\
        --rdzv-endpoint HOST:29500 my_script.py
    # in my_script.py
    torch.distributed.init_process_group("nccl")      # "gloo" on CPU
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    res = tk.integrated_gradients(model, x, target=t, distributed=True)

Inputs, baselines, targets and model weights must be identical on every rank (same seed);
see ``python/distributed_ig.py``.
"""
from __future__ import annotations

import zlib

import torch
import torch.distributed as dist

REDUCE_TO = ("all", 0)


def resolve_group(distributed):
    """The process group for the ``distributed`` option: ``False``/``None`` -> ``None`` (one
    process), ``True`` -> the default (world) group, or a ``ProcessGroup`` as given."""
    if distributed is None or distributed is False:
        return None
    if distributed is not True and not (dist.is_available()
                                        and isinstance(distributed, dist.ProcessGroup)):
        raise TypeError(f"distributed must be a bool or a torch.distributed.ProcessGroup, got "
                        f"{type(distributed).__name__} {distributed!r}")
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("distributed attribution needs torch.distributed initialised: call "
                         "torch.distributed.init_process_group('gloo' or 'nccl') on every rank "
                         "first (torchrun sets the environment it reads)")
    if distributed is True:
        return dist.group.WORLD
    if isinstance(distributed, dist.ProcessGroup):
        return distributed
    raise TypeError(f"distributed must be a bool or a torch.distributed.ProcessGroup, got "
                    f"{type(distributed).__name__}")


def check_reduce_to(reduce_to) -> None:
    """Raise ``ValueError`` unless ``reduce_to`` is ``"all"`` or ``0``."""
    if isinstance(reduce_to, bool) or reduce_to not in REDUCE_TO:
        raise ValueError(f"reduce_to must be 'all' (every rank gets the result) or 0 (rank 0 "
                         f"only), got {reduce_to!r}")


def check_same_call(group, *parts) -> None:
    """Raise ``ValueError`` on every rank when ``parts`` (the call's tensors and settings:
    inputs, baselines, nodes, weights, targets, forward args, ``reduce_to``) differ from rank
    0's, by one ``all_gather`` of a four-number fingerprint (:func:`fingerprint`). Ranks
    passing other steps or targets summed each other's partial sums silently (0.02-0.12 off);
    another batch size or rule crashed gloo, another ``reduce_to`` hung until its timeout."""
    mine = fingerprint(parts)
    every = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(every, mine, group=group)
    other = [r for r, v in enumerate(every)
             if v[0] != every[0][0] or not torch.allclose(v[1:], every[0][1:], rtol=1e-9,
                                                         atol=0)]
    if other:
        raise ValueError(f"distributed attribution: rank(s) {other} of the group were called "
                         "with other arguments than rank 0 (inputs, baselines, targets, "
                         "forward args, rule, steps or reduce_to differ); every rank must pass "
                         "the same ones")


def fingerprint(parts) -> torch.Tensor:
    """``[4]`` float64 on the tensors' device: a CRC of the parts' shapes, dtypes and plain
    values (numbers, strings, tuples of them; other objects by type), and three sums over the tensors (plain, absolute, and weighted by
    position and part), compared with a relative tolerance (the same data summed on
    different CPUs may round differently)."""
    tensors, meta = [], []
    for p in parts:
        for v in p if isinstance(p, (tuple, list)) else (p,):
            if isinstance(v, torch.Tensor):
                tensors.append(v.detach())
                meta.append((tuple(v.shape), str(v.dtype)))
            elif isinstance(v, (int, float, str, bool, type(None))) or isinstance(
                    v, tuple) and all(isinstance(e, (int, float, str, bool)) for e in v):
                meta.append(repr(v))
            else:  # (an object's repr may hold its address, which differs between ranks)
                meta.append(type(v).__name__)
    device = tensors[0].device if tensors else torch.device("cpu")
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    for j, t in enumerate(tensors, start=1):
        flat = t.reshape(-1).to(device=device, dtype=torch.float64)
        place = torch.arange(flat.numel(), device=device, dtype=torch.float64) % 7 + j
        sums += torch.stack([flat.sum(), flat.abs().sum(), (flat * place).sum()]) * j
    crc = torch.tensor([float(zlib.crc32(repr(meta).encode()))], dtype=torch.float64,
                       device=device)
    return torch.cat([crc, sums])


def shard(total: int, group) -> tuple[int, int]:
    """This rank's block ``[lo, hi)`` of ``[0, total)``: contiguous, sizes differ by at most
    one, empty when there are more ranks than points."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    return total * rank // world, total * (rank + 1) // world


def reduce_sums(sums: list[torch.Tensor], group, reduce_to="all") -> None:
    """Sum each ``[B, D]`` partial sum over the ranks of ``group``, in place: on every rank
    (``reduce_to="all"``) or on rank 0 of the group only (``reduce_to=0``; the other ranks keep
    their partial sums). One collective for all weight vectors."""
    check_reduce_to(reduce_to)
    if not sums:
        return
    flat = torch.cat([s.reshape(-1) for s in sums])
    if reduce_to == "all":
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    else:
        dist.reduce(flat, dst=dist.get_global_rank(group, 0), op=dist.ReduceOp.SUM, group=group)
    offset = 0
    for s in sums:
        s.copy_(flat[offset:offset + s.numel()].view_as(s))
        offset += s.numel()
