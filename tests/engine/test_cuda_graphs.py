"""CUDA graphs for the chunk loop (``tk.cuda_graphs``): the option's scope on every machine, the
engine's use of a chunk graph on the CPU with a stand-in that computes what a replay computes,
and (GPU) capture and replay equal to the eager loop, with a fallback for forwards that cannot
be captured."""
from __future__ import annotations

import threading
import warnings

import pytest
import torch

import taylor_kernels as tk
from taylor_kernels.engine import cuda_graphs
from tests import models
from tests.conftest import requires_cuda

CUDA, CPU = torch.device("cuda"), torch.device("cpu")


def test_option_scope():
    assert not cuda_graphs.requested(CUDA, False)
    with tk.cuda_graphs():
        assert cuda_graphs.requested(CUDA, False)
        assert not cuda_graphs.requested(CPU, False)
        assert not cuda_graphs.requested(CUDA, True)  # create_graph: eager
        with tk.cuda_graphs(False):
            assert not cuda_graphs.requested(CUDA, False)
        seen = []
        worker = threading.Thread(target=lambda: seen.append(cuda_graphs.requested(CUDA, False)))
        worker.start()
        worker.join()
        assert seen == [False]  # other threads keep their own setting
    assert not cuda_graphs.requested(CUDA, False)
    with pytest.raises(TypeError, match="bool"):
        with tk.cuda_graphs("yes"):
            pass


class StandIn:
    """What the engine sees of a ChunkGraph, on the CPU: returns the step's gradients at the
    given points (as a replay of the captured step does) or None (capture failed)."""

    made: list = []

    def __init__(self, step, fail=False):
        self.step, self.fail, self.graph, self.counts = step, fail, None, []
        self.failed = False
        StandIn.made.append(self)

    def __call__(self, points, rows):
        self.counts.append(points.shape[0])
        if self.fail:
            self.failed = True
            return None
        self.graph = "captured"
        return self.step(points.detach().clone().requires_grad_(True), rows.clone())


@pytest.mark.parametrize("fail", [False, True], ids=["replayed", "capture_failed"])
def test_engine_uses_the_chunk_graph_for_full_chunks_only(monkeypatch, fail):
    model = models.mlp()
    x = torch.randn(3, 10, dtype=torch.float64)
    want = tk.integrated_gradients(model, x, target=1, steps=10, chunk_size=4).attributions
    StandIn.made = []
    monkeypatch.setattr(cuda_graphs, "requested", lambda device, create_graph: True)
    monkeypatch.setattr(cuda_graphs, "ChunkGraph", lambda step: StandIn(step, fail))
    got = tk.integrated_gradients(model, x, target=1, steps=10, chunk_size=4).attributions
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    (graph,) = StandIn.made
    # 30 points in chunks of 4: full chunks from 0 while >= MIN_CHUNKS are left at capture
    # time (0: 7 left), all full ones after; the last 2 points run eagerly
    assert graph.counts == ([4] if fail else [4] * 7)


def test_few_chunks_skip_the_capture(monkeypatch):
    StandIn.made = []
    monkeypatch.setattr(cuda_graphs, "requested", lambda device, create_graph: True)
    monkeypatch.setattr(cuda_graphs, "ChunkGraph", lambda step: StandIn(step))
    tk.integrated_gradients(models.mlp(), torch.randn(1, 10, dtype=torch.float64), target=0,
                            steps=12, chunk_size=4)
    assert StandIn.made[0].counts == []  # 3 chunks < MIN_CHUNKS: not worth a capture


def _gpu_pair(fn):
    """``fn()`` eagerly and inside ``tk.cuda_graphs()``, with the graphs the call made."""
    made = []
    real = cuda_graphs.ChunkGraph

    def record(step):
        made.append(real(step))
        return made[-1]

    want = fn()
    cuda_graphs.ChunkGraph = record
    try:
        with tk.cuda_graphs():
            got = fn()
    finally:
        cuda_graphs.ChunkGraph = real
    return want, got, made


@requires_cuda
@pytest.mark.parametrize("net", ["mlp", "cnn"])
def test_cuda_graph_equals_eager_ig(net):
    model = (models.mlp() if net == "mlp" else models.cnn()).float().cuda()
    x = torch.randn(4, *((10,) if net == "mlp" else (2, 8, 8)), device="cuda")
    want, got, made = _gpu_pair(lambda: tk.integrated_gradients(
        model, x, target=1, steps=32, chunk_size=16).attributions)
    assert len(made) == 1 and made[0].graph is not None and made[0].replays >= 4
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@requires_cuda
def test_cuda_graph_equals_eager_on_a_transformer():
    pytest.importorskip("transformers")
    from taylor_kernels.models import tiny
    model = tiny.gpt2(layers=2, d=64, vocab=128).cuda()
    ids = torch.randint(4, 128, (2, 12), device="cuda")
    want, got, made = _gpu_pair(lambda: tk.token_integrated_gradients(
        model, ids, 7, baselines="zero", steps=32, chunk_size=8).attributions)
    assert made and made[0].graph is not None
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    prompt, target = ids[0], torch.randint(4, 128, (5,), device="cuda")
    want, got, made = _gpu_pair(lambda: tk.generation_attribution(
        model, prompt, target, steps=32, chunk_size=4).token_attr)  # T = 5 outputs per point
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


class HostSync(torch.nn.Module):
    """A forward that reads a value on the host (``.item()``): not capturable."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(6, 3)

    def forward(self, x):
        scale = 2.0 if float(x.abs().max().item()) > 0 else 1.0
        return self.lin(x) * scale


@requires_cuda
def test_uncapturable_forward_falls_back_with_a_warning():
    model = HostSync().cuda()
    x = torch.randn(2, 6, device="cuda")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        want, got, made = _gpu_pair(lambda: tk.integrated_gradients(
            model, x, target=0, steps=32, chunk_size=8).attributions)
    assert made[0].failed
    assert any("cannot be captured" in str(w.message) for w in caught)
    torch.testing.assert_close(got, want)


class _FakeCuda:
    """CPU stand-ins for the CUDA calls of :class:`ChunkGraph`: the capture block runs its body
    eagerly (as a capture records it) and a replay recomputes the recorded step into the same
    static output, which is what a CUDA replay produces."""

    def __init__(self, monkeypatch):
        self.graphs = []
        fake = self

        class Graph:
            def __init__(self):
                self.owner = None
                fake.graphs.append(self)

            def replay(self):
                if self.owner is not None:  # the first replay follows the capture's own run
                    with torch.no_grad():
                        g = self.owner
                        self.owner.out.copy_(g.step(g.points, g.rows))

        class Stream:
            def __init__(self, device=None):
                pass

            def wait_stream(self, other):
                pass

        monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
        monkeypatch.setattr(torch.cuda, "Stream", Stream)
        monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream())
        monkeypatch.setattr(torch.cuda, "stream", lambda s: _null())
        monkeypatch.setattr(torch.cuda, "graph", lambda g: _null())
        monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _step(points, rows):
    with torch.enable_grad():
        out = (points.sin() * rows[:, None]).sum()
        return torch.autograd.grad(out, points)[0]


def test_chunk_graph_buffers_and_replays(monkeypatch):
    fake = _FakeCuda(monkeypatch)
    graph = cuda_graphs.ChunkGraph(_step)
    outs = []
    for i in range(3):
        pts, rows = torch.randn(5, 4, dtype=torch.float64), torch.arange(5.0) + i
        got = graph(pts, rows)
        if i == 0:
            fake.graphs[0].owner = graph  # replays from now on recompute the step
        outs.append(got)
        torch.testing.assert_close(got, rows[:, None] * pts.cos())
    assert outs[0] is outs[1] is outs[2]  # one static output, overwritten by each replay
    assert graph.replays == 2 and not graph.failed and len(fake.graphs) == 1


def test_chunk_graph_capture_failure_warns_once_and_returns_none(monkeypatch):
    _FakeCuda(monkeypatch)

    def bad(points, rows):
        raise RuntimeError("operation not permitted when stream is capturing")

    graph = cuda_graphs.ChunkGraph(bad)
    with pytest.warns(RuntimeWarning, match="cannot be captured"):
        assert graph(torch.randn(2, 3), torch.arange(2)) is None
    assert graph.failed and graph(torch.randn(2, 3), torch.arange(2)) is None


@requires_cuda
@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "graphs"])
def test_chunk_loop_does_not_sync_the_host(graphs, monkeypatch):
    """After its first two chunks (lazy initialisation; with graphs the warm-up and capture),
    the chunk loop computes and folds every chunk without a host synchronisation."""
    from taylor_kernels.engine import path_engine
    real = path_engine.run_chunks

    def strict(plan, start, stop, compute, consume, **kw):
        seen = []

        def checked(fn):
            def run(*args):
                if len(seen) < 4:  # compute and consume of the first two chunks
                    seen.append(1)
                    return fn(*args)
                torch.cuda.set_sync_debug_mode("error")
                try:
                    return fn(*args)
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            return run
        return real(plan, start, stop, checked(compute), checked(consume), **kw)

    monkeypatch.setattr(path_engine, "run_chunks", strict)
    model = models.cnn().float().cuda()
    x = torch.randn(4, 2, 8, 8, device="cuda")
    with tk.cuda_graphs(graphs):
        tk.integrated_gradients(model, x, target=1, steps=64, chunk_size=8)
