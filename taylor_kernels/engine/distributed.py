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
