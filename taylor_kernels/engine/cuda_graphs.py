"""CUDA graphs for the path engine's chunk loop (opt in with :func:`cuda_graphs`).

On a GPU, one chunk of a transformer's forward and input-gradient backward is hundreds of small
kernel launches; the CPU that issues them can be slower than the GPU that runs them. Inside a
``with tk.cuda_graphs():`` block, :func:`taylor_kernels.engine.path_engine.integrate` captures
the forward and backward of a full-size chunk once (:class:`ChunkGraph`: static point and row
buffers, one warm-up run on a side stream in which host synchronisations raise, then
``torch.cuda.graph`` on that stream, on the points' device, with a private pool and
``capture_error_mode="thread_local"``) and replays it for every later chunk of that size: the
points are copied into the static buffer, the graph replays, the gradients are read from its
static output before the next replay. Chunk sizing, probes and the last (shorter) chunk run as
before; graphs are used only on CUDA tensors, without ``create_graph``, once the chunk size is
settled and at least :data:`MIN_CHUNKS` chunks are left (the warm-up costs about one chunk);
a chunk size changed after the capture (halved on out-of-memory) drops the graph. A capture
that failed is remembered with the call's cached chunk choice, so later calls on the same
model and shape do not try again. On a first call the probes and timed candidates take the
first chunks, so graphs mostly serve later calls (or an explicit ``chunk_size``).

What a replay does not do: run the model's Python. A forward whose Python does more than issue
kernels (host syncs such as ``.item()``, data-dependent branches, state kept between calls)
cannot be captured; the capture then fails, says so once (``RuntimeWarning``) and the call goes
on without graphs. In the warm-up ``torch.cuda.is_current_stream_capturing()`` reads True for
the warming thread, so that a forward which skips host checks under capture (transformers'
``is_tracing``) takes the capture's path there too; the sync check itself
(``torch.cuda.set_sync_debug_mode``) is process-wide, so another thread's host sync during a
warm-up raises as well. Out of memory in a warm-up or capture is not remembered as a failure:
it reaches the chunk loop, which halves the chunk. Memory: the graph keeps one chunk's
activations in its own pool while the call runs, beside the allocator's cached blocks, so the
peak can reach about twice one chunk's working memory; ``max_memory`` is measured on eager
chunks and does not count the pool.
"""
from __future__ import annotations

import contextlib
import contextvars
import threading
from typing import Callable

import torch

from taylor_kernels.engine import memory
from taylor_kernels.user_warnings import warn

MIN_CHUNKS = 3  # chunks left, the last (shorter) one included
_ON: contextvars.ContextVar[bool] = contextvars.ContextVar("taylor_kernels_cuda_graphs",
                                                           default=False)


@contextlib.contextmanager
def cuda_graphs(enabled: bool = True):
    """Capture and replay the chunk loop's forward + backward in CUDA graphs inside the block
    (this thread or task only, like :func:`taylor_kernels.backends.using`); ``enabled=False``
    turns them off in a nested block. No effect on CPU tensors."""
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {type(enabled).__name__}")
    token = _ON.set(enabled)
    try:
        yield
    finally:
        _ON.reset(token)


def requested(device: torch.device, create_graph: bool) -> bool:
    """Whether the engine should try graphs for a call on ``device``."""
    return _ON.get() and device.type == "cuda" and not create_graph


class ChunkGraph:
    """``step(points [count, D], rows [count]) -> gradients`` captured once for one chunk size
    and replayed. Calling it returns the gradients of the given points (the graph's static
    output: read it before the next call), or None when the step cannot be captured (then
    every later call returns None too) or the points have another shape than the captured
    ones (:meth:`reset` drops the graph, e.g. after the chunk size changed)."""

    def __init__(self, step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
        self.step = step
        self.graph: torch.cuda.CUDAGraph | None = None
        self.failed = False
        self.replays = 0
        self.points = self.rows = self.out = None

    @property
    def size(self) -> int | None:
        """Points per chunk of the captured graph (None before a capture)."""
        return None if self.graph is None else self.points.shape[0]

    def reset(self) -> None:
        """Drop the graph and its memory pool (a later call captures again)."""
        self.graph = self.points = self.rows = self.out = None

    def __call__(self, points: torch.Tensor, rows: torch.Tensor) -> torch.Tensor | None:
        if self.failed:
            return None
        if self.graph is None:
            return self._capture(points, rows)
        if points.shape != self.points.shape or rows.shape != self.rows.shape:
            return None
        with torch.no_grad():  # the static points are a leaf that requires grad
            self.points.copy_(points)
            self.rows.copy_(rows)
        self.graph.replay()
        self.replays += 1
        return self.out

    def _capture(self, points: torch.Tensor, rows: torch.Tensor) -> torch.Tensor | None:
        """Warm up on a side stream (host synchronisations raise there, before any capture),
        then capture on that stream into a private pool (``thread_local`` error mode: other
        threads' CUDA calls go on); on failure leave streams and the allocator as they were."""
        device = points.device
        self.points = points.detach().clone().requires_grad_(True)
        self.rows = rows.clone()
        graph, pool = torch.cuda.CUDAGraph(), torch.cuda.graph_pool_handle()
        current = torch.cuda.current_stream(device)
        side = torch.cuda.Stream(device)
        side.wait_stream(current)
        capturing = False
        try:
            # the outer stream block restores the caller's stream even if the capture's own
            # exit raises (torch.cuda.graph ends the capture, then its stream, no try/finally)
            with torch.cuda.device(device), torch.cuda.stream(side):
                with _host_syncs_raise(), _seen_as_capture():
                    self.step(self.points, self.rows)  # lazy inits happen outside the capture
                capturing = True
                with torch.cuda.graph(graph, pool=pool, stream=side,
                                      capture_error_mode="thread_local"):
                    out = self.step(self.points, self.rows)
        except Exception as exc:  # noqa: BLE001  (any failure: the call goes on eagerly)
            if capturing:
                _end_pool(device, pool)
            torch.cuda.synchronize(device)
            self.reset()
            if memory.is_oom(exc):  # not the forward's fault: the chunk loop halves the chunk
                raise                # and a later chunk size is captured afresh
            self.failed = True
            warn(f"the chunk's forward and backward cannot be captured in a CUDA "
                 f"graph ({type(exc).__name__}: {str(exc)[:160]}); this call runs "
                 "without graphs", RuntimeWarning)
            return None
        current.wait_stream(side)
        self.graph, self.out = graph, out
        graph.replay()
        return out


@contextlib.contextmanager
def _host_syncs_raise():
    """``torch.cuda.set_sync_debug_mode("error")`` for the block, then the caller's mode."""
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


_WARMING = threading.local()  # .depth: this thread's warm-ups underway
_SWAP_LOCK = threading.Lock()
_SWAP_USERS = 0               # warm-ups underway in the process (any thread)
_SWAP_PREVIOUS = None         # the function the first of them replaced
_REAL_IS_CAPTURING = torch.cuda.is_current_stream_capturing


def capturing() -> bool:
    """Whether a CUDA graph capture is really underway on the current stream (never the
    warm-up's stand-in of :func:`_seen_as_capture`)."""
    return bool(_REAL_IS_CAPTURING())


def _is_capturing_or_warming() -> bool:
    return getattr(_WARMING, "depth", 0) > 0 or capturing()


@contextlib.contextmanager
def _seen_as_capture():
    """For the warm-up (this thread only), ``torch.cuda.is_current_stream_capturing()`` reads
    True, so the model's Python takes the branch the capture will take: libraries skip host
    checks under capture (transformers' ``is_tracing``: the padding warning's ``.item()``, the
    causal-mask skip test) and the warm-up, where syncs raise, must not run them either.
    The stand-in is installed by the first warm-up in the process and the caller's function
    put back by the last one to end (a count under a lock: threads warm up concurrently)."""
    global _SWAP_USERS, _SWAP_PREVIOUS
    with _SWAP_LOCK:
        if _SWAP_USERS == 0:
            _SWAP_PREVIOUS = torch.cuda.is_current_stream_capturing
            torch.cuda.is_current_stream_capturing = _is_capturing_or_warming
        _SWAP_USERS += 1
    depth = getattr(_WARMING, "depth", 0)
    _WARMING.depth = depth + 1
    try:
        yield
    finally:
        _WARMING.depth = depth
        with _SWAP_LOCK:
            _SWAP_USERS -= 1
            if _SWAP_USERS == 0:
                torch.cuda.is_current_stream_capturing = _SWAP_PREVIOUS
                _SWAP_PREVIOUS = None


def _end_pool(device: torch.device, pool) -> None:
    """After a capture that failed to end: stop routing allocations to its pool (the graph's
    own exit skips this when ``capture_end`` raises, and the allocator would keep the pool as
    an open capture, which stops ``empty_cache`` and the out-of-memory retry from freeing
    cached blocks). Private allocator API, as torch's own ``use_mem_pool`` uses it."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    try:
        torch._C._cuda_endAllocateToPool(index, pool)
    except RuntimeError:  # the capture did end (the error came from the step): nothing open
        return
    torch._C._cuda_releasePool(index, pool)  # no graph holds it: its blocks can be freed
