"""How many work items (path points, or (point, direction) pairs) each chunk of the engine's
loop holds, and with how many CPU threads it runs.

Memory. The first chunks are probes: one item, then up to ``PROBE_POINTS`` when the limit
could bind, each measured (:mod:`taylor_kernels.engine.memory`) to give the bytes per item.
The limit is ``max_memory`` when given (a hard limit: chunks fill it), else a fraction of the
machine's free memory (:func:`memory.parse_budget`).

Throughput (default budget; an explicit one is filled and only the threads are timed).
Candidate sizes are ``base * CANDIDATE_FACTORS`` with ``base`` the cache-friendly size of
``memory.DEFAULT_TARGET`` bytes (at least ``memory.DEFAULT_MIN_POINTS`` items), capped by the
limit and by ``MAX_SHARE`` of the call's items (half of them for problems with several outputs
per item), so a call holds at most about half the memory of a one-batch run, or ``base``
items where that is more (a call of a few MB is not split for memory); a call of at most
``SMALL_CALL_BYTES`` in all runs in one chunk, untimed, on a quiet machine. Each candidate
runs one real chunk, timed; a larger one wins only when it is more than ``SPEED_MARGIN``
faster per item. On an oversubscribed CPU (1-minute load average
above the core count) the smallest size runs first with all and with half the threads, and
half are kept if faster by the same margin: every ATen/OpenMP parallel region ends in a
barrier that waits for all its threads, so a thread descheduled by another process stalls
every operator (2 threads measured 4-20x slower than 1 on a 2-core machine at load 9-14).
That count is remembered for the machine and :func:`call_threads` applies it to a whole call
while the machine stays busy.

Cache. The measured cost and the choice are kept per owner (the model, or the
``cost_owner`` attribute of a wrapper function) and key (feature shape, dtype, device,
baselines per input, ``problem.cache_key``) while the owner lives; a later call skips the
probes and the timing, and re-times when the machine's load state changed.
"""
from __future__ import annotations

import contextlib
import math
import os
import weakref

import torch

from taylor_kernels.engine import guards, memory

PROBE_POINTS = 8
CANDIDATE_FACTORS = (1, 4, 16)
# A call whose points all together hold at most this many bytes runs as one chunk under the
# default budget, as Captum's one batch: split at the base size (16 MB), a 64-point call of
# 18-29 MB ran in two chunks (57 + 7, 36 + 28), 2.5-4 ms of a 17-18 ms call on a 32x32
# ResNet / ViT (helper measurement, 2026-12-03); its memory is Captum's then, at most this.
SMALL_CALL_BYTES = 2 * memory.DEFAULT_TARGET
SPEED_MARGIN = 0.1
# Measured: a CNN's peak per point in a chunk is up to 1.7x a one-batch run's (Captum), plus
# the call's fixed memory; at a quarter of the points the ig_vs_captum CNN peaked at 0.53x of
# Captum's when the timing picked that largest size (2026-11-30), at a fifth 0.06-0.16x.
MAX_SHARE = 0.2
_CHOICES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # owner -> {key: dict}
_BUSY_THREADS: dict[int, int] = {}  # threads asked for -> threads measured faster while busy


def machine_busy() -> bool:
    """True when the 1-minute load average exceeds the number of cores (other processes
    compete for them); False where the load average is unavailable."""
    try:
        return os.getloadavg()[0] > (os.cpu_count() or 1)
    except OSError:
        return False


@contextlib.contextmanager
def threads(count: int):
    """Run the block with ``count`` torch CPU threads; the caller's count is restored."""
    before = torch.get_num_threads()
    if count != before:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        if count != before:
            torch.set_num_threads(before)


@contextlib.contextmanager
def call_threads():
    """Context manager (or decorator) running a whole attribution call (its extra forwards
    too, not only the chunk loop) with the thread count a chunk loop measured faster while the
    machine was busy, as long as it still is (checked at each entry). No-op on a quiet
    machine."""
    before = torch.get_num_threads()
    with threads(_BUSY_THREADS.get(before, before) if machine_busy() else before):
        yield


def quiet_threads():
    """Context for loops the engine does not time (the demo's training): one thread while
    the machine is oversubscribed (the barrier stalls above: 2 threads took 6.5 s where 1 took
    0.8 s for 20 steps of the demo's LM at load 2.2 on 2 cores), else the caller's count."""
    return threads(1) if machine_busy() else contextlib.nullcontext()


def _base(cost: float) -> int:
    """The smallest candidate: items in ``memory.DEFAULT_TARGET`` bytes, at least
    ``memory.DEFAULT_MIN_POINTS``."""
    return max(memory.DEFAULT_MIN_POINTS, int(memory.DEFAULT_TARGET // max(cost, 1.0)))


class _Owner:
    """Stands, in the chunk-choice cache, for the wrappers of one object made anew per call."""


_OWNERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # object -> {tags: _Owner}


def owner_for(obj, *tags) -> object | None:
    """A stable ``cost_owner`` for wrappers of ``obj`` (the model, or its forward function)
    that a method makes anew per call, one per ``tags`` (hashable: the wrapper's kind, the
    layer it replaces; wrappers whose points cost differently), living as long as ``obj``;
    None when ``obj`` cannot be weakly referenced. (A wrapper as its own owner made every call
    probe again: an Inseq generation's Captum-front steps, layer conductance. Owned by a
    layer alone, two models through one layer shared a cost: 2x a budget.)"""
    obj = getattr(obj, "cost_owner", obj)
    try:
        owners = _OWNERS.setdefault(obj, {})
    except TypeError:
        return None
    return owners.setdefault(tags, _Owner())


def cache_slot(problem, x: torch.Tensor, K: int, kind: str = "grad") -> dict | None:
    """The cache dict of ``problem``'s owner and shape (``None`` when the owner cannot be
    weakly referenced), and of the sizes of the modules its model reaches
    (:func:`~taylor_kernels.engine.guards.module_sizes`); ``kind`` separates gradient work
    from HVP work."""
    model = getattr(problem, "model", None)
    owner = getattr(model, "cost_owner", model)
    key = (kind, (tuple(x.shape[1:]),) + _argument_shapes(problem), x.dtype, str(x.device), K,
           getattr(problem, "cache_key", ()), guards.module_sizes(model))
    try:
        slots = _CHOICES.setdefault(owner, {})
    except TypeError:
        return None
    if key not in slots:
        slots[key] = {}
        guess = _nearby_cost(slots, key)
        if guess is not None:
            slots[key]["guess"] = guess
    return slots[key]


def _argument_shapes(problem) -> tuple:
    """The shapes of the tensors among ``problem``'s forward args (without a batch dimension
    of ``B`` rows): a wrapper that runs the model from them (a layer's path from the inputs,
    the inputs of a layer-replaced forward) costs with their size, not its own input's (a
    choice made for 8x8 images was reused for 96x96 ones: 21x a budget)."""
    B = getattr(problem, "B", None)
    return tuple(tuple(a.shape[1:]) if a.dim() > 0 and a.shape[0] == B else tuple(a.shape)
                 for a in getattr(problem, "forward_args", ()) if isinstance(a, torch.Tensor))


# A cost measured at another shape of the same owner stands in for this shape's (no probe
# chunk, default budget only) when this one has at most this factor more elements per item.
NEARBY_GROWTH = 1.25


def _nearby_cost(slots: dict, key: tuple) -> float | None:
    """A bytes-per-item guess for ``key`` from the nearest measured shape of the same kind,
    dtype, device, K and problem key with at most ``NEARBY_GROWTH`` times fewer elements (the
    input's and the forward args' together),
    scaled by the square of the growth (attention grows with the square of a length).
    Inseq attributes a generation step by step, one token longer each time: every step was a
    new shape, probed with a one-point chunk (a 2x64 GPT-2's calls took 1.47x Captum's)."""
    size = sum(math.prod(s) for s in key[1])
    best = None
    for other, slot in slots.items():
        cost = slot.get("cost")
        if cost is None or other[:1] + other[2:] != key[:1] + key[2:] or \
                len(other[1]) != len(key[1]):
            continue
        growth = max(size, 1) / max(sum(math.prod(s) for s in other[1]), 1)
        distance = abs(math.log(growth))
        if growth <= NEARBY_GROWTH and (best is None or distance < best[0]):
            best = (distance, cost * max(growth, 1.0) ** 2)
    return None if best is None else best[1]


class ChunkPlan:
    """Decides each chunk's item count and thread count for a loop over ``total`` items.

    ``chunk_size`` fixes the count; ``max_memory`` (bytes or ``"512MB"``) is a hard limit, of
    which ``reserved`` bytes are held by the call beside its chunks (inputs, sums; on the CPU
    also ``memory.CPU_CALL_RESERVE``, at most an eighth of the budget); ``multi_output``: each
    item has several outputs (see :meth:`_cap`);
    ``cost`` (bytes per item) skips the probes; ``slot`` (from :func:`cache_slot`) shares the
    measured cost and timed choice between calls; ``max_share``: without ``max_memory`` no
    chunk holds more than this share of the items (None: no such cap; see :meth:`_cap`).
    """

    def __init__(self, total: int, device: torch.device, *, chunk_size: int | None = None,
                 max_memory=None, cost: float | None = None, slot: dict | None = None,
                 reserved: int = 0, multi_output: bool = False,
                 max_share: float | None = MAX_SHARE):
        chunk_size = memory.check_chunk_size(chunk_size)
        self.total, self.device, self.slot = total, device, {} if slot is None else slot
        self.multi_output, self.max_share = multi_output, max_share
        self.chunk = chunk_size
        coupled = guards.row_coupling_allowed()
        if self.chunk is None and max_memory is None and coupled:
            self.chunk = max(total, 1)  # rows that couple: one batch, as Captum's
        # rows that couple probe two items: train-mode batch norm refuses a batch of one
        self.first_probe = 2 if coupled else 1
        self.budget = memory.chunk_budget(chunk_size, max_memory, device)
        self.reserved = 0
        self.room = None  # under an explicit budget what one chunk may take (memory.chunk_room)
        if self.budget is not None and not isinstance(self.budget, memory.DefaultBudget):
            left = memory.budget_beside(self.budget, reserved, device)  # what chunks may use
            self.budget, self.reserved = left, self.budget - left
            self.room = memory.chunk_room(left, device)
        self.probes: list[tuple[int, float]] = []
        self.cost = cost if cost is not None else self.slot.get("cost")
        if self.cost is None and self.chunk is None and isinstance(self.budget,
                                                                   memory.DefaultBudget):
            self.cost = self.slot.get("guess")  # a nearby shape's (see _nearby_cost)
        self.threads = self.asked = torch.get_num_threads()  # (asked: the caller's count)
        self.timed: list[tuple[int, int, float]] = []  # (count, threads, seconds per item)
        self.trials: list[tuple[int, int]] = []       # (count, threads) still to time
        self.busy = machine_busy() if device.type == "cpu" else False
        if self.chunk is None and self.cost is not None:
            self._after_cost()

    @property
    def measuring(self) -> bool:
        """True while the next chunk is a memory probe."""
        return self.chunk is None and self.cost is None

    def one_point_budget(self, count: int) -> int | None:
        """The explicit CPU budget a probe of ``count == 1`` item must fit (None otherwise):
        its forward can stop once it saved more (:func:`memory.saved_limit`)."""
        if count != 1 or self.device.type != "cpu" or self.budget is None or isinstance(
                self.budget, memory.DefaultBudget):
            return None
        return int(self.budget)

    def _fits(self, per_item: float) -> int:
        """Items per chunk within the budget; under an explicit CPU budget within
        ``memory.CPU_CHUNK_SHARE`` of it (at least one item)."""
        fit = memory.chunk_size_for(self.budget, per_item, self.total, self.reserved)
        if self.room is not None:
            fit = max(1, min(fit, int(self.room // max(per_item, 1.0))))
        return fit

    def _cap(self, cost: float) -> int:
        """The largest candidate: what the limit holds, at most ``max_share`` of the items (but
        not below the smallest candidate, :func:`_base`: a chunk may always hold
        ``memory.DEFAULT_TARGET`` bytes, as a call that small gains nothing in memory from
        splitting and loses per-chunk time: an evaluation toolkit's 160-point calls on a small
        CNN ran 2.6x Captum's time in five chunks; for a problem with several outputs per item
        not above half the items either: each item then holds its graph for ``T`` gradients,
        so one chunk for the call held more than a one-batch single-output run, e.g. a
        generation's 16 points, 1.18x Captum's memory; halving was measured free, 1.37-1.45 s
        either way for a 4x256 GPT-2, 32 + 16 tokens)."""
        if self.max_share is None:
            return max(1, self._fits(cost))
        floor = _base(cost)
        if self.multi_output:
            floor = min(floor, math.ceil(self.total / 2))
        share = max(math.ceil(self.total * self.max_share), floor)
        return max(1, min(self._fits(cost), share))

    def _after_cost(self) -> None:
        """With the cost known: fill an explicit budget, reuse a cached choice, or queue the
        candidates to time (on a busy CPU first the smallest size at full and half threads,
        then the larger sizes at the thread count that won)."""
        if not isinstance(self.budget, memory.DefaultBudget):  # fill it; threads still timed
            size = self._fits(self.cost)
            if self.busy and self.threads > 1:
                self.trials = [(size, self.threads), (size, max(1, self.threads // 2))]
            else:
                self.chunk = size
            return
        if self._small_call():
            self.chunk = max(1, min(self._fits(self.cost), self.total))
            return
        cap = self._cap(self.cost)
        cached = self.slot.get("choice")
        # (a choice made at another thread count is timed again: replayed, it overrode the
        # caller's torch.set_num_threads for the call's chunks)
        if cached is not None and cached[2:] == (self.busy, self.asked):
            self.chunk, self.threads = min(cached[0], cap), cached[1]
            return
        sizes = sorted({min(cap, _base(self.cost) * f) for f in CANDIDATE_FACTORS})
        self.trials = [(s, None) for s in sizes]
        if self.busy and self.threads > 1:
            self.trials[:1] = [(sizes[0], self.threads), (sizes[0], max(1, self.threads // 2))]
        elif len(sizes) == 1:
            self.chunk, self.trials = sizes[0], []

    def _small_call(self) -> bool:
        """Whether the whole call holds at most ``SMALL_CALL_BYTES`` (one chunk, no timing)
        on a quiet machine with a share cap (first-order work; a problem with several outputs
        per item keeps its halving: see :meth:`_cap`)."""
        return self.max_share is not None and not self.multi_output and not self.busy and \
            self.total * self.cost <= SMALL_CALL_BYTES

    def next_count(self, left: int) -> int:
        """Items in the next chunk, with ``left`` items still to do."""
        if self.chunk is not None:
            return min(left, self.chunk)
        if self.trials:
            return min(left, self.trials[0][0])
        if not self.probes:
            return min(left, self.first_probe)
        first = self.probes[0][1] / self.probes[0][0]  # (an over-estimate per item)
        fits = self._fits(first)
        largest = min(self._cap(first), _base(first) * CANDIDATE_FACTORS[-1])
        if isinstance(self.budget, memory.DefaultBudget) and fits >= largest:
            self._set_cost(first)  # the limit is far: the first probe's cost will do
            return self.next_count(left)
        if fits <= self.probes[0][0]:  # no room for a larger probe: its cost stays
            self._set_cost(first)
            self.chunk = fits
            return min(left, fits)
        # the one-item cost over-estimates (fixed costs count fully): a second probe within
        # the budget at up to that many items gives the slope
        return min(left, PROBE_POINTS, fits)

    def _set_cost(self, cost: float) -> None:
        self.cost = self.slot["cost"] = cost
        self._after_cost()

    def thread_count(self) -> int:
        """CPU threads for the next chunk (a trial's own count, else the chosen one)."""
        return self.trials[0][1] or self.threads if self.trials else self.threads

    def running(self):
        """Context manager running one chunk with :meth:`thread_count` threads."""
        return threads(self.thread_count())

    def record(self, count: int, seconds: float, used: float | None) -> None:
        """Note a finished chunk: its measured bytes (probes) or its time (trials)."""
        if used is not None:
            self.probes.append((count, used))
            if len(self.probes) == 2:
                (n1, m1), (n2, m2) = self.probes
                self._set_cost((m2 - m1) / (n2 - n1) if n2 > n1 and m2 > m1 else m2 / n2)
            return
        if not self.trials:
            return
        threads = self.thread_count()
        size = self.trials.pop(0)[0]
        enough = 2 * count >= size  # the call's last chunk may be short: half a size still times
        if enough:
            self.timed.append((size, threads, seconds / count))
        if enough and threads < self.threads:
            self._choose_threads(size, threads)
        if not enough or not self.trials:
            self._decide(complete=enough)

    def halve(self, count: int) -> None:
        """After an out-of-memory error on a chunk of ``count`` items: half as many from now
        on (and in the cached choice)."""
        self.trials, self.chunk = [], max(1, count // 2)
        choice = self.slot.get("choice")
        if choice is not None and choice[0] > self.chunk:
            self.slot["choice"] = (self.chunk,) + tuple(choice[1:])

    def _choose_threads(self, size: int, fewer: int) -> None:
        """Keep ``fewer`` threads if their trial at ``size`` was faster per item by
        ``SPEED_MARGIN`` than all threads at the same size; remember it for the machine."""
        per_item = {t: sec for c, t, sec in self.timed if c == size}
        if per_item[fewer] < per_item[self.threads] * (1 - SPEED_MARGIN):
            _BUSY_THREADS[self.threads] = fewer
            self.threads = fewer
        else:
            _BUSY_THREADS[self.threads] = self.threads

    def _decide(self, complete: bool) -> None:
        """Keep the fastest timed size at the chosen thread count (a larger one must win by
        ``SPEED_MARGIN``: it costs memory); cache the choice once every candidate ran."""
        self.trials = []
        full = [(c, sec) for c, t, sec in self.timed if t == self.threads]
        if not full:  # the call ended before a candidate could be timed
            self.chunk = self._cap(self.cost)
            return
        best, best_s = full[0]
        for c, sec in full[1:]:
            if sec < best_s * (1 - SPEED_MARGIN):
                best, best_s = c, sec
        self.chunk = best
        if complete and isinstance(self.budget, memory.DefaultBudget):
            self.slot["choice"] = (best, self.threads, self.busy, self.asked)
