"""CUDA graphs for the path engine's chunk loop (opt in with :func:`cuda_graphs`).

On a GPU, one chunk of a transformer's forward and input-gradient backward is hundreds of small
kernel launches; the CPU that issues them can be slower than the GPU that runs them. Inside a
``with tk.cuda_graphs():`` block, :func:`taylor_kernels.engine.path_engine.integrate` captures
the forward and backward of a full-size chunk once (:class:`ChunkGraph`: static point and row
buffers, one warm-up run on a side stream, then ``torch.cuda.graph``) and replays it for every
later chunk of that size: the points are copied into the static buffer, the graph replays, the
gradients are read from its static output before the next replay. Chunk sizing, probes and the
last (shorter) chunk run as before; graphs are used only on CUDA tensors, without
``create_graph``, once the chunk size is settled and at least :data:`MIN_CHUNKS` full chunks
are left (the warm-up and capture cost about two chunks).

What a replay does not do: run the model's Python. A forward whose Python does more than issue
kernels (host syncs such as ``.item()``, data-dependent branches, state kept between calls)
cannot be captured; the capture then fails, says so once (``RuntimeWarning``) and the call goes
on without graphs. Memory: the graph keeps one chunk's activations in its own pool while the
call runs, beside the allocator's cached blocks, so the peak can reach about twice one chunk's
working memory; ``max_memory`` is measured on eager chunks and does not count the pool.
"""
from __future__ import annotations

import contextlib
import contextvars
import warnings
from typing import Callable

import torch

MIN_CHUNKS = 4
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
    every later call returns None too)."""

    def __init__(self, step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
        self.step = step
        self.graph: torch.cuda.CUDAGraph | None = None
        self.failed = False
        self.replays = 0
        self.points = self.rows = self.out = None

    def __call__(self, points: torch.Tensor, rows: torch.Tensor) -> torch.Tensor | None:
        if self.failed:
            return None
        if self.graph is None:
            return self._capture(points, rows)
        with torch.no_grad():  # the static points are a leaf that requires grad
            self.points.copy_(points)
            self.rows.copy_(rows)
        self.graph.replay()
        self.replays += 1
        return self.out

    def _capture(self, points: torch.Tensor, rows: torch.Tensor) -> torch.Tensor | None:
        device = points.device
        self.points = points.detach().clone().requires_grad_(True)
        self.rows = rows.clone()
        graph = torch.cuda.CUDAGraph()
        try:
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                self.step(self.points, self.rows)  # warm-up: lazy inits outside the capture
            torch.cuda.current_stream(device).wait_stream(side)
            with torch.cuda.graph(graph):
                out = self.step(self.points, self.rows)
        except Exception as exc:  # noqa: BLE001  (any failure: the call goes on eagerly)
            self.failed = True
            self.points = self.rows = None
            torch.cuda.synchronize(device)
            warnings.warn(f"the chunk's forward and backward cannot be captured in a CUDA "
                          f"graph ({type(exc).__name__}: {str(exc)[:160]}); this call runs "
                          "without graphs", RuntimeWarning, stacklevel=5)
            return None
        self.graph, self.out = graph, out
        graph.replay()
        return out
