"""Memory budgets: parse them, measure a path point's cost, size chunks, retry on OOM.

The cost of one path point (one row of forward + backward) is measured on a probe chunk:
on CUDA from the allocator's peak (``guards.cuda_peak_bytes``, which keeps the caller's peak
statistic); on the CPU from the sizes of the tensors autograd saves for backward
(``saved_tensors_hooks``), counted twice (backward holds each saved activation beside the
gradient flowing into it), plus the point, its gradient and point-sized temporaries, times
``CPU_TRANSIENT_FACTOR`` for what autograd does not save (oneDNN reorder buffers, allocator
slack). Chunk size = (budget - what the call holds beside its chunks) // cost. An
out-of-memory error during a chunk halves the chunk size and retries the same points, down
to one point.
"""
from __future__ import annotations

import contextlib
import math
import numbers
import os
import re
import threading
import time
from pathlib import Path

import torch

# 16 MiB keeps chunks cache-friendly: the smallest candidate chunk the engine times
# (engine/chunking.py); larger candidates must prove faster.
DEFAULT_TARGET = 16 * 2**20
DEFAULT_MIN_POINTS = 32
# Without max_memory, chunks stay under this fraction of the free memory (RAM or device).
DEFAULT_FREE_FRACTION = 0.5
# Resident peak of a chunk over the estimate without this factor, measured (VmHWM, fresh
# process, 2-core Xeon, 2026-11-30): a 2-conv tanh CNN 1.3x, a 784-256-256-10 MLP 1.2x, a
# 4x256 GPT-2 (64 tokens) 0.6x at 2-512 MB budgets (oneDNN reorders and the chunk's
# point-sized temporaries are not saved tensors).
CPU_TRANSIENT_FACTOR = 1.6
# Held by a CPU call beside its chunks and not counted elsewhere (allocator slack, the chunk
# loop's small tensors): an MLP's resident peak stayed 0.4-0.8 MB above 2-16 MB budgets.
# Reserved up to an eighth of an explicit budget (engine/chunking.py).
CPU_CALL_RESERVE = 2**20
# Under an explicit CPU budget a chunk fits this share of it: glibc keeps the blocks a chunk
# frees, and the next chunk's blocks fit them only in part, so a call's resident memory crept
# towards two chunks (a CNN's IG at 64 MB: chunks of 57 MB, peaks of 71-86 MB; IG, EG and
# SIG at 8-16 MB: 1.15-1.4x; measured, 2-core Xeon, 2026-12-01). Returning the blocks before
# each chunk (malloc_trim) held the peak but cost 17 ms per chunk in page faults (1.9x the
# time at 16 MB), and once per stage it cost 6-12 ms of a 40 ms MLP call for no measurable
# gain once the stages below were fixed; half-size chunks cost 1.06x the time at 16 MB and
# 1.5x at 4 MB.
CPU_CHUNK_SHARE = 0.5
# what a call holds beside its chunks, as its memory errors name it
HELD_BY_CALL = ("its inputs and sums; for second order also the measured fixed cost of a "
                "Hessian-vector product")
_UNITS = {"": 1, "B": 1, "KB": 2**10, "KIB": 2**10, "MB": 2**20, "MIB": 2**20, "GB": 2**30,
          "GIB": 2**30}


class DefaultBudget(int):
    """The limit used when the caller gave none (a fraction of the free memory). Chunks hold
    at least ``DEFAULT_MIN_POINTS`` points (fewer would leave a large model's matmuls
    inefficient), and a model whose single point costs more than it still runs."""


def free_memory(device: torch.device) -> int:
    """Free bytes: on CUDA the device's free memory (``torch.cuda.mem_get_info``) plus what
    PyTorch's allocator holds cached but unused (``memory_reserved - memory_allocated``: an
    earlier call's blocks, reusable without a new allocation); on the CPU
    :func:`_cpu_available`, read at most once per ``CPU_FREE_MAX_AGE_S``."""
    if device.type == "cuda":
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(torch.cuda.mem_get_info(device)[0]) + max(0, int(cached))
    now = time.monotonic()
    if now - _CPU_FREE[0] > CPU_FREE_MAX_AGE_S:
        _CPU_FREE[:] = [now, _cpu_available()]
    return _CPU_FREE[1]


# The CPU reading is reused for this long: reading /proc/meminfo took 60 us, 3.5% of a small
# call (a 160-point IG call on a small CNN, the calls evaluation toolkits make by the hundred).
CPU_FREE_MAX_AGE_S = 1.0
_CPU_FREE = [float("-inf"), 0]  # [monotonic time of the reading, bytes]


def _cpu_available() -> int:
    """The least of the machine's ``MemAvailable`` (:func:`_machine_available`), the room
    left under the process's cgroup memory limits (:func:`cgroup_room`: a container's limit
    is not in ``/proc/meminfo``, which shows the host's) and under ``ulimit -v``
    (:func:`rlimit_room`)."""
    return min(_machine_available(), cgroup_room(), rlimit_room())


def _machine_available() -> int:
    """``MemAvailable`` from ``/proc/meminfo`` (psutil where that file is missing; 8 GiB when
    neither exists)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import psutil
        return int(psutil.virtual_memory().available)
    except ImportError:
        return 8 * 2**30


_UNLIMITED = 2**62  # cgroup v1 writes "no limit" as a page-rounded 2**63 - 1


def _read_int(path: Path) -> int | None:
    """An integer file of a cgroup (``max``: None), None when unreadable."""
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def cgroup_room(root: str = "/") -> int:
    """Bytes left under the memory limits of the process's cgroup and its ancestors (the
    least of ``limit - usage``; cgroup v2 ``memory.max`` / ``memory.current``, v1
    ``memory.limit_in_bytes`` / ``memory.usage_in_bytes``), as many bytes as there are
    (2**62) without a limit. ``root``: where ``proc`` and ``sys`` are (tests)."""
    base = Path(root)
    room = _UNLIMITED
    try:
        lines = (base / "proc/self/cgroup").read_text().splitlines()
    except OSError:
        return room
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            mount, files = base / "sys/fs/cgroup", ("memory.max", "memory.current")
        elif "memory" in controllers.split(","):
            mount, files = base / "sys/fs/cgroup/memory", ("memory.limit_in_bytes",
                                                           "memory.usage_in_bytes")
        else:
            continue
        here = mount / path.lstrip("/")
        levels = [here, *here.parents] if here.is_dir() else [mount]  # (a namespaced path
        for level in levels:                                       # names no directory)
            limit, used = _read_int(level / files[0]), _read_int(level / files[1])
            if limit is not None and limit < _UNLIMITED and used is not None:
                room = min(room, max(0, limit - used))
            if level == mount:
                break
    return room


def rlimit_room() -> int:
    """Bytes left under ``ulimit -v`` (``RLIMIT_AS`` less the process's ``VmSize``), 2**62
    without one."""
    try:
        import resource
        soft = resource.getrlimit(resource.RLIMIT_AS)[0]
    except (ImportError, OSError, ValueError):
        return _UNLIMITED
    if soft == resource.RLIM_INFINITY or soft < 0:
        return _UNLIMITED
    try:
        with open("/proc/self/status") as f:
            size = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    except (OSError, StopIteration):
        return _UNLIMITED
    return max(0, soft - size)


def check_chunk_size(chunk_size) -> int | None:
    """``chunk_size`` as an int (None stays None): a positive integer, or a real number with
    an integer value (``4.0``, NumPy scalars); anything else raises ``ValueError``."""
    if chunk_size is None:
        return None
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Real) or \
            not math.isfinite(chunk_size) or int(chunk_size) != chunk_size or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    return int(chunk_size)


def chunk_budget(chunk_size, max_memory, device: torch.device):
    """The budget of a call given ``chunk_size`` and ``max_memory``: None when ``chunk_size``
    fixes the chunks, else :func:`parse_budget`. Both given raise ``ValueError`` (a fixed
    chunk would silently override the limit); a malformed ``max_memory`` raises either way."""
    if chunk_size is None:
        return parse_budget(max_memory, device)
    if max_memory is not None:
        parse_budget(max_memory, device)  # a malformed value raises its own error first
        raise ValueError(f"give chunk_size ({chunk_size!r}; internal_batch_size in the Captum "
                         f"front) or max_memory ({max_memory!r}), not both: it fixes the chunks "
                         "and would override the limit")
    return None


def parse_budget(max_memory, device: torch.device) -> int:
    """Bytes from an int or a string such as ``"512MB"``/``"2GiB"`` (units binary either way:
    ``"4MB"`` is ``4 * 2**20`` bytes, as ``"4MiB"``; case and spaces ignored); ``None`` gives
    the default limit, ``DEFAULT_FREE_FRACTION`` of :func:`free_memory`."""
    if max_memory is None:
        return DefaultBudget(free_memory(device) * DEFAULT_FREE_FRACTION)
    value = max_memory
    if isinstance(max_memory, str):
        m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([A-Za-z]*)\s*", max_memory)
        value = (float(m.group(1)) * _UNITS[m.group(2).upper()]
                 if m and m.group(2).upper() in _UNITS else None)
    elif isinstance(max_memory, bool) or not isinstance(max_memory, numbers.Real):
        value = None
    if value is None or not math.isfinite(value) or value < 1:
        raise ValueError(f"max_memory must be a finite positive number of bytes or a string "
                         f"such as '512MB' or '2GiB' (units B, KB, MB, GB, KiB, MiB, GiB), "
                         f"got {max_memory!r}")
    return int(value)


def beside(max_memory, held, device: torch.device,
           what: str = "the call's drawn samples", advice: str = "draw fewer samples"):
    """``max_memory`` less the bytes of ``held`` (tensors, or tuples / lists of them, that a
    caller keeps through the call: a sampling wrapper's drawn inputs and baselines, which
    LayerGradientShap held beside a 4 MB budget at 1.9x of it); None (the default limit)
    stays None. ``MemoryError`` naming ``what`` (and ``advice``) when they leave nothing."""
    if max_memory is None:
        return None
    budget = parse_budget(max_memory, device)
    nbytes = sum(t.untyped_storage().nbytes() for t in _tensors(held))
    if nbytes >= budget:
        raise MemoryError(f"max_memory of {budget} bytes cannot hold {what} ({nbytes} bytes); "
                          f"raise max_memory or {advice}")
    return budget - nbytes


def _tensors(value) -> list[torch.Tensor]:
    """The distinct tensors (by storage) in a tensor or nested tuples / lists."""
    found: dict[int, torch.Tensor] = {}
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, torch.Tensor):
            found.setdefault(v.untyped_storage().data_ptr(), v)
        elif isinstance(v, (tuple, list)):
            stack.extend(v)
    return list(found.values())


def _aliases_a_leaf(t: torch.Tensor, storage_ptr: int, depth: int = 4) -> bool:
    """Whether ``t``'s storage is a leaf's (a weight) that ``t`` derives from through up to
    ``depth`` first-input ops: tensors a double backward saves (``TBackward0`` of a
    weight) are not marked as views of it, and counting them made one HVP row of a
    784-256-256-10 MLP 3.3 MiB against the 16 KiB it takes."""
    fn = t.grad_fn
    for _ in range(depth):
        if fn is None:
            return False
        leaf = getattr(fn, "variable", None)  # AccumulateGrad: the leaf itself
        if leaf is not None:
            try:
                return leaf.untyped_storage().data_ptr() == storage_ptr
            except (RuntimeError, NotImplementedError):
                return False
        fn = fn.next_functions[0][0] if fn.next_functions else None
    return False


class SavedPastLimit(MemoryError):
    """A probe's forward saved more than its ``limit`` (:class:`SavedBytes`): stopped there
    (a budget too small for one point was found by running the whole probe: a CNN on
    128x128 images reached 12-26x of a 1 MB budget before its ``MemoryError``)."""

    def __init__(self, saved: int):
        super().__init__(saved)
        self.saved = saved


def saved_limit(budget: int, rows: int = 1) -> float:
    """The saved bytes past which ``rows`` rows cannot fit ``budget`` as one point each:
    a point costs at least ``CPU_TRANSIENT_FACTOR * 2 * saved`` (:func:`cpu_point_cost`)."""
    return rows * budget / (2 * CPU_TRANSIENT_FACTOR)


_AUTOGRAD = torch._C._autograd
_HOOKS_DISABLED_MESSAGE = getattr(_AUTOGRAD, "_saved_tensors_hooks_get_disabled_error_message",
                                  None)


@contextlib.contextmanager
def saved_hooks_enabled():
    """Context: saved-tensor hooks may be pushed inside it, also under a caller's
    ``torch.autograd.graph.disable_saved_tensors_hooks(message)`` block, which is restored
    (with its message) on exit. The library's memory probes and row checks push hooks around
    its own forwards: inside such a block they raised the caller's message, or ran, by whether
    a cost for the model was cached (Captum runs there). Torch's own context manager
    restores the state the same way."""
    message = _HOOKS_DISABLED_MESSAGE() if _HOOKS_DISABLED_MESSAGE is not None else None
    if message is None:
        yield
        return
    _AUTOGRAD._saved_tensors_hooks_enable()
    try:
        yield
    finally:
        _AUTOGRAD._saved_tensors_hooks_disable(message)


class SavedBytes:
    """Context manager summing the bytes of distinct storages autograd saves for backward that
    the forward allocated (leaf tensors such as weights, and views of them, are not counted).
    With a ``limit`` it raises :class:`SavedPastLimit` as soon as the sum passes it.

    The pack hook keeps a detached alias, not the tensor itself: an op that saves its own
    output (``tanh``, ``sigmoid``, ``exp``) would otherwise hold the output's Python object,
    whose ``grad_fn`` holds the saved object back, a cycle through C++ that Python's collector
    cannot see, so a graph never run backward leaked (the endpoint forwards' probe under
    ``max_memory`` kept 3 tensors per call). Unpacking restores the autograd metadata.

    ``leaf_matrices`` maps the storage of each leaf tensor of two or more dimensions that was
    saved (the weights the forward's products read, however the forward reaches them; the
    inputs too when they are leaves) to its bytes."""

    def __init__(self, limit: float | None = None):
        self.total, self.limit = 0, limit
        self._seen: set[int] = set()
        self._outer: SavedBytes | None = None
        self.leaf_matrices: dict[int, int] = {}

    def _count(self, t: torch.Tensor) -> bool:
        """Add ``t``'s storage (once) unless the forward did not allocate it; False then.
        An enclosing :class:`SavedBytes` counts it too (only the innermost hook runs)."""
        if self._outer is not None:
            self._outer._count(t)
        root = t._base if t._base is not None else t
        if root.is_leaf:  # parameters, inputs, constants (or views of them): not allocated here
            if root.dim() >= 2:
                try:
                    self.leaf_matrices[root.untyped_storage().data_ptr()] = \
                        root.untyped_storage().nbytes()
                except (RuntimeError, NotImplementedError):  # (fake, sparse)
                    pass
            return False
        try:
            key = t.untyped_storage().data_ptr()
            if _aliases_a_leaf(t, key):  # a double backward's W.t(), its view link lost
                return False
            if key not in self._seen:
                self._seen.add(key)
                self.total += t.untyped_storage().nbytes()
        except (RuntimeError, NotImplementedError):  # tensors without storage (fake, sparse)
            self.total += t.numel() * t.element_size()
        if self.limit is not None and self.total > self.limit:
            raise SavedPastLimit(self.total)
        return True

    def _pack(self, t: torch.Tensor):
        if torch.compiler.is_compiling():  # (a compiled model traces the hook: its fake
            return t  # tensors have no storage to count, and the trace failed on them)
        return t.detach() if self._count(t) else t

    def __enter__(self):
        self._enabled = saved_hooks_enabled()
        self._enabled.__enter__()
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        stack = _counting.__dict__.setdefault("stack", [])
        self._outer = stack[-1] if stack else None
        stack.append(self)
        return self

    def __exit__(self, *exc):
        _counting.stack.pop()
        self._hooks.__exit__(*exc)
        self._enabled.__exit__(*exc)


_counting = threading.local()  # this thread's open SavedBytes, innermost last


def counting() -> bool:
    """Whether a :class:`SavedBytes` is open in this thread (its hooks see every forward)."""
    return bool(getattr(_counting, "stack", None))


def _glibc():
    """glibc's ``malloc_trim`` entry (None off glibc: macOS, musl, Windows)."""
    try:
        import ctypes
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _glibc()
_STATM = Path("/proc/self/statm")
RESIDENT_TRIM_AT = 0.75  # of the budget: the resident growth past which a pass trims the heap
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _resident_bytes() -> int:
    return int(_STATM.read_text().split()[1]) * PAGE_BYTES


class ResidentTrim:
    """Heap trimming between the passes of a call under an explicit CPU ``budget``: the
    passes free their blocks, but glibc's heap gives the next pass's sizes only part of them,
    so resident memory crept up by about 1 MB per pass (a jet of 512 directions in 30 passes
    of 16 MB peaked at 47 MB under 32 MB; 11 MB with every block mapped on its own). After
    each pass (:meth:`after_pass`, reading ``/proc/self/statm``: microseconds) the heap is
    trimmed once the process has grown past ``RESIDENT_TRIM_AT`` of the budget since the call
    began; a trim costs page faults (17 ms per path chunk, measured), so it runs only then.
    Inactive off Linux/glibc and on devices."""

    def __init__(self, budget: int, device: torch.device):
        self.active = device.type == "cpu" and _MALLOC_TRIM is not None and _STATM.exists()
        self.limit = budget * RESIDENT_TRIM_AT
        self.start = _resident_bytes() if self.active else 0

    def after_pass(self) -> None:
        if self.active and _resident_bytes() - self.start > self.limit:
            _MALLOC_TRIM(0)


class KeptGraphs:
    """Context manager for a ``create_graph`` path under an explicit ``budget``: every chunk's
    graph stays alive for the caller's backward, so chunking does not bound the call's memory.
    :meth:`check` (after each chunk) extrapolates the bytes kept so far (CPU: the storages
    autograd saved; CUDA: the allocator's growth) to all ``total`` points and raises
    ``MemoryError`` when they and the ``held`` bytes pass the budget (a CNN's IG kept 240 MB
    of graphs under 8-64 MB budgets, 30x of 8 MB). ``what`` and ``unit`` word the error for
    other callers (jet passes with grad on: ``unit="direction"``); :meth:`advance` counts the
    items done."""

    def __init__(self, budget: int, held: int, total: int, device: torch.device,
                 what: str = "the graphs create_graph=True keeps for your backward",
                 unit: str = "path point"):
        self.budget, self.held, self.total, self.device = budget, held, total, device
        self.what, self.unit, self.done = what, unit, 0
        self._saved = SavedBytes() if device.type != "cuda" else None

    def __enter__(self):
        if self._saved is None:
            self._start = torch.cuda.memory_allocated(self.device)
        else:
            self._saved.__enter__()
        return self

    def __exit__(self, *exc):
        if self._saved is not None:
            self._saved.__exit__(*exc)

    def check(self, done: int) -> None:
        """``MemoryError`` if ``done`` points' kept bytes, scaled to all points, overflow."""
        kept = self._saved.total if self._saved is not None else \
            torch.cuda.memory_allocated(self.device) - self._start
        per_point = kept / max(done, 1)
        need = per_point * self.total + self.held
        if need > self.budget:
            raise MemoryError(
                f"max_memory of {self.budget} bytes cannot hold {self.what}: {int(per_point)} "
                f"bytes per {self.unit} over {self.total} (about {int(need)} bytes with the "
                "call's inputs and sums); raise max_memory, or attribute fewer rows or steps "
                "per call")

    def advance(self, n: int) -> None:
        """:meth:`check` after ``n`` more items."""
        self.done += n
        self.check(self.done)


def count_unsaved(tensors) -> None:
    """Count ``tensors`` as saved in this thread's innermost :class:`SavedBytes`, if one is
    open: the activation a forward is cut off at (a neuron's value read from a layer) is
    allocated, and backward holds the gradient flowing into it, yet autograd saves neither.
    (A neuron of a 2-conv CNN cut after its 32-channel convolution: 0.6 MB per point resident
    where the saved bytes priced 0.3 MB; the call ran at 1.4-1.8x of 8-32 MB budgets.)"""
    stack = getattr(_counting, "stack", None)
    if stack:
        for t in tensors:
            stack[-1]._count(t)


def budget_beside(budget: int, held: int, device: torch.device) -> int:
    """What an explicit ``budget`` leaves for a call's chunks beside the ``held`` bytes it
    keeps throughout (inputs, references, sums), on the CPU also ``CPU_CALL_RESERVE`` (at most
    an eighth of the budget); raises ``MemoryError`` when nothing is left."""
    reserved = held + (min(CPU_CALL_RESERVE, budget // 8) if device.type == "cpu" else 0)
    if reserved >= budget:
        raise MemoryError(f"max_memory of {int(budget)} bytes leaves nothing for the path: the "
                          f"call holds {reserved} bytes beside its chunks ({HELD_BY_CALL}); "
                          "raise max_memory")
    return budget - reserved


def chunk_room(budget: int, device: torch.device, at_least: float = 0) -> int:
    """The bytes a chunk may take of ``budget`` (what is left beside the call's holdings):
    under an explicit CPU budget ``CPU_CHUNK_SHARE`` of it (see there), but not less than
    ``at_least`` (one item, which then runs alone); a default or device budget whole."""
    if device.type != "cpu" or isinstance(budget, DefaultBudget):
        return budget
    return max(int(budget * CPU_CHUNK_SHARE), math.ceil(at_least))


def cpu_point_cost(saved_bytes: int, point_bytes: int, outputs: int = 1,
                   batched: bool = True) -> float:
    """Estimated peak bytes of a probe chunk on the CPU:
    ``c ((1 + F) saved + (4 + T) points)`` for ``T = outputs`` gradients per point, of which
    ``F`` flow through the graph at once (``T`` for one batched backward, 1 for ``T`` serial
    passes): saved activations and the gradients flowing beside them; the points, three
    point-sized temporaries of building, checking and accumulating them, and ``T`` point
    gradients; ``c = CPU_TRANSIENT_FACTOR``. ``T = 1`` gives ``c (2 saved + 5 points)``."""
    flowing = outputs if batched else 1
    return CPU_TRANSIENT_FACTOR * float((1 + flowing) * saved_bytes
                                        + (4 + outputs) * point_bytes)


def is_oom(exc: BaseException) -> bool:
    """True for CUDA/CPU out-of-memory errors."""
    if isinstance(exc, getattr(torch, "OutOfMemoryError", ())):
        return True
    msg = str(exc)
    return isinstance(exc, RuntimeError) and ("out of memory" in msg.lower()
                                              or "can't allocate memory" in msg)


def chunk_size_for(budget: int, per_point: float, total: int, reserved: int = 0) -> int:
    """Points per chunk that fit ``budget`` bytes at ``per_point`` bytes each, capped at
    ``total``; raises ``MemoryError`` if not even one point fits an explicit budget (of which
    the call itself holds ``reserved`` bytes beside its chunks)."""
    if per_point > budget and not isinstance(budget, DefaultBudget):
        held = f", {reserved} of them held by the call ({HELD_BY_CALL})" if reserved else ""
        raise MemoryError(f"memory budget of {budget + reserved} bytes{held} is too small for "
                          f"one path point (measured {int(per_point)} bytes per point); raise "
                          "max_memory")
    fit = int(budget // max(per_point, 1.0))
    if isinstance(budget, DefaultBudget):  # small batches waste the matmuls of big models
        fit = max(fit, DEFAULT_MIN_POINTS)
    return max(1, min(total, fit))
