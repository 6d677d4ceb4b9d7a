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

Failures: an error inside a rank's chunk loop (a non-finite gradient in its shard, a memory
error) is agreed on by one small collective after the loop (:func:`agreed_outcome`): the
failing rank raises its own error, the others a ``RuntimeError`` naming it, instead of
waiting in the all-reduce until the process group's timeout. An error before the call's
first collective (an argument check: a target out of range on one rank) is agreed on in that
collective, the argument check of :func:`check_same_call`
(:func:`first_collective_agreed`). An error between two collectives outside the chunk loops
(after a call's first engine pass, before its next) is not agreed on: the other ranks wait
in the next collective until the process group's timeout.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import math
import numbers
import zlib

import torch
import torch.distributed as dist

from taylor_kernels.engine import guards
from taylor_kernels.user_warnings import warn

REDUCE_TO = ("all", 0)
MASK32 = 2 ** 32 - 1
# the public call running on this thread/task with a process group: {"met": whether it has
# reached its first collective, "settings": more parts for check_same_call}
_CALL: contextvars.ContextVar[dict | None] = contextvars.ContextVar("distributed_call",
                                                                   default=None)


def resolve_group(distributed):
    """The process group for the ``distributed`` option: ``False``/``None`` -> ``None`` (one
    process), ``True`` -> the default (world) group, or a ``ProcessGroup`` as given."""
    if distributed is None or distributed is False:
        return None
    if _outside_group(distributed):
        raise ValueError("distributed= got torch.distributed.GroupMember.NON_GROUP_MEMBER, "
                         "which new_group returns on the ranks it leaves out: this rank is not "
                         "in that process group and must not call with it (only its member "
                         "ranks call)")
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


def _outside_group(distributed) -> bool:
    """Whether ``distributed`` is what ``dist.new_group`` returns on a non-member rank (an int,
    -100: it was refused as "must be a bool or a ProcessGroup, got int -100")."""
    member = getattr(dist.GroupMember, "NON_GROUP_MEMBER", None) if dist.is_available() \
        else None
    return member is not None and not isinstance(distributed, bool) and \
        isinstance(distributed, type(member)) and distributed == member


def is_root(group) -> bool:
    """Whether this process reports for ``group``: one process (``None``) or the group's rank
    0. Only it draws a progress bar (one bar per rank overwrote each other's lines)."""
    return group is None or dist.get_rank(group) == 0


def holds_partial_sums(group, reduce_to) -> bool:
    """Whether this rank's result is its own shard's partial sums (``reduce_to=0`` on a rank
    other than the group's 0): a completeness gap computed from them means nothing, and
    warnings about it were false."""
    return group is not None and reduce_to == 0 and not is_root(group)


def check_reduce_to(reduce_to) -> None:
    """Raise ``ValueError`` unless ``reduce_to`` is ``"all"`` or ``0``."""
    if isinstance(reduce_to, bool) or reduce_to not in REDUCE_TO:
        raise ValueError(f"reduce_to must be 'all' (every rank gets the result) or 0 (rank 0 "
                         f"only), got {reduce_to!r}")


def check_same_call(group, *parts) -> None:
    """Raise ``ValueError`` on every rank when ``parts`` (the call's tensors and settings:
    inputs, baselines, nodes, weights, targets, forward args, ``reduce_to``, a method's own
    ones such as Integrated Hessians' ``index``) differ from rank 0's, by one ``all_gather``
    of a four-number fingerprint (:func:`fingerprint`). Ranks passing other steps or targets
    summed each other's partial sums silently (0.02-0.12 off); another batch size or rule
    crashed gloo, another ``reduce_to`` hung until its timeout. A rank whose call failed
    before this collective sends NaN instead (:func:`first_collective_agreed`): the others
    raise ``RuntimeError`` naming it."""
    call = _CALL.get()
    if call is not None:
        call["met"] = True
        parts += tuple(call["settings"])
    every = _gathered_fingerprints(group, fingerprint(parts))
    failed = [r for r, v in enumerate(every) if math.isnan(float(v[0]))]
    if failed:
        raise RuntimeError(f"distributed attribution: rank(s) {failed} of the group failed "
                           "before the call's first collective (an argument check; their own "
                           "error is raised there); this rank's call was not run")
    other = [r for r, v in enumerate(every)
             if v[0] != every[0][0] or not torch.allclose(v[1:], every[0][1:], rtol=1e-9,
                                                         atol=0)]
    if other:
        raise ValueError(f"distributed attribution: rank(s) {other} of the group were called "
                         "with other arguments than rank 0 (inputs, baselines, targets, "
                         "forward args, rule, steps, index, feature_mask, score or reduce_to "
                         "differ); every rank must pass the same ones")


def _gathered_fingerprints(group, mine: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's ``[4]`` fingerprint, on the group backend's device (CUDA for NCCL: a rank
    that failed before knowing the call's device sends from there too)."""
    device = (torch.device("cuda", torch.cuda.current_device())
              if dist.get_backend(group) == "nccl" else torch.device("cpu"))
    mine = mine.to(device)
    every = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(every, mine, group=group)
    return every


def first_collective_agreed(fn):
    """Decorator of a public function with a ``distributed=`` keyword: when one rank's call
    raises before its first collective (an argument check, such as a target out of range on
    that rank alone), that rank still joins the first collective, the fingerprint
    ``all_gather`` of :func:`check_same_call`, with NaN, so the other ranks raise
    ``RuntimeError`` naming it instead of waiting there until the process group's timeout;
    then it raises its own error. Nested calls (IH's IG) are the outer call's."""
    @functools.wraps(fn)
    def call(*args, **kwargs):
        distributed = kwargs.get("distributed", False)
        if _CALL.get() is not None or distributed is None or distributed is False:
            return fn(*args, **kwargs)
        group = resolve_group(distributed)
        state = {"met": False, "settings": []}
        token = _CALL.set(state)
        try:
            return fn(*args, **kwargs)
        except Exception:
            if not state["met"]:
                # (a failed collective here, a peer gone or a group that cannot run one,
                # must not hide this rank's own error)
                with contextlib.suppress(Exception):
                    _gathered_fingerprints(group, torch.full((4,), math.nan,
                                                             dtype=torch.float64))
            raise
        finally:
            _CALL.reset(token)
    return call


def check_same_settings(distributed, *settings) -> None:
    """:func:`check_same_call` of ``settings`` that a caller builds into the model it hands
    the engine (token IG's ``score``: the engine sees only a callable), for the
    ``distributed`` option; nothing for one process. Inside a :func:`first_collective_agreed`
    call they join the engine's check (its first collective: a collective of their own came
    before the argument checks, so one rank's failing check left the others waiting)."""
    group = resolve_group(distributed)
    if group is None:
        return
    call = _CALL.get()
    if call is not None:
        call["settings"].extend(settings)
    else:
        check_same_call(group, *settings)


def fingerprint(parts) -> torch.Tensor:
    """``[4]`` float64 on the tensors' device: a CRC of the parts' structure, shapes, dtypes
    and plain values (:func:`_collect`: through tuples, lists, dicts and dataclasses), and
    three sums over the tensors (plain, absolute, and weighted by position and part:
    :func:`_position_weights`), compared with a relative tolerance (the same data summed on
    different CPUs may round differently)."""
    tensors, meta = [], []
    _collect(parts, tensors, meta)
    device = tensors[0].device if tensors else torch.device("cpu")
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    for j, t in enumerate(tensors, start=1):
        flat = t.reshape(-1).to(device=device, dtype=torch.float64)
        place = _position_weights(flat.numel(), j, device)
        sums += torch.stack([flat.sum(), flat.abs().sum(), (flat * place).sum()]) * j
    crc = torch.tensor([float(zlib.crc32(repr(meta).encode()))], dtype=torch.float64,
                       device=device)
    return torch.cat([crc, sums])


def _collect(value, tensors: list, meta: list) -> None:
    """Append ``value``'s tensors to ``tensors`` and a description of the rest that is the
    same on every rank to ``meta`` (shapes and dtypes, plain values by ``repr``, containers
    by type and length, other objects by type: a repr may hold an address), through tuples,
    lists, dicts and dataclasses: a list of tensors among the forward args was seen as
    ``list`` alone, and ranks passing other values in it summed wrong partial sums."""
    if isinstance(value, torch.Tensor):
        tensors.append(value.detach())
        meta.append((tuple(value.shape), str(value.dtype)))
    elif isinstance(value, (tuple, list, dict)):
        meta.append((type(value).__name__, len(value)))
        for item in value.items() if isinstance(value, dict) else value:
            _collect(item, tensors, meta)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        meta.append(type(value).__name__)
        for field in dataclasses.fields(value):
            _collect((field.name, getattr(value, field.name)), tensors, meta)
    elif isinstance(value, (numbers.Number, str, type(None))):
        meta.append(repr(value))
    else:
        meta.append(type(value).__name__)


def _position_weights(n: int, part: int, device) -> torch.Tensor:
    """Weights in ``[1, 2)`` (float64) of the flat positions ``0..n-1`` of tensor number
    ``part``: murmur3's 32-bit finaliser of ``i * 2654435761 + part * 40503``, in int64
    integer arithmetic (the same bits on every device). The weights ``(i % 7) + part`` were
    periodic: ranks holding the same rows in another order (rows of a multiple of 7
    features, or rows ``i`` and ``i + 7`` swapped) passed the check and summed wrong partial
    sums."""
    h = (torch.arange(n, device=device, dtype=torch.int64) * 2654435761 + part * 40503) & MASK32
    for shift, factor in ((16, 0x85EBCA6B), (13, 0xC2B2AE35)):  # (low 32 bits: exact)
        h = ((h ^ (h >> shift)) * factor) & MASK32
    h = h ^ (h >> 16)
    return 1 + h.to(torch.float64) / 2 ** 32


@contextlib.contextmanager
def agreed_outcome(group, device):
    """Run a rank's local work (its chunk loop) and then agree with the other ranks of
    ``group`` on whether it failed, by one ``all_gather`` of a flag: a rank whose work
    raised re-raises its error, the others raise ``RuntimeError`` naming the failing ranks.
    Without it one rank's error (a non-finite gradient in its shard) left the others waiting
    in the all-reduce of the sums until the process group's timeout (30 minutes by default).
    Nothing for one process (``group`` None)."""
    if group is None:
        yield
        return
    try:
        yield
    except Exception:
        # (a failed collective here, a peer gone, must not hide this rank's own error)
        with contextlib.suppress(RuntimeError):
            _failed_ranks(group, device, True)
        raise
    failed = _failed_ranks(group, device, False)
    if failed:
        raise RuntimeError(f"distributed attribution: rank(s) {failed} of the group failed "
                           "in their share of the work (their own error is raised there); "
                           "this rank's partial sums were not combined")


def _failed_ranks(group, device, failed: bool) -> list[int]:
    """The group ranks whose flag, gathered from all of them, says they failed."""
    mine = torch.tensor([int(failed)], dtype=torch.int64, device=device)
    every = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(every, mine, group=group)
    return [r for r, flag in enumerate(every) if int(flag)]


def warn_if_rows_couple(group) -> None:
    """A ``RuntimeWarning`` for ``distributed`` inside :func:`~taylor_kernels.allow_row_coupling`
    (a train-mode batch norm attributed as one batch): each rank's shard is its own batch,
    so the statistics, and the numbers, differ from one process's."""
    if group is not None and guards.row_coupling_allowed():
        warn("allow_row_coupling with distributed=: each rank runs its own shard of the path "
             "as its own batch, so batch statistics (train-mode batch norm) and the "
             "attributions differ from one process's; run coupled rows in one process",
             RuntimeWarning)


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
