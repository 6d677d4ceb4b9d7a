"""CUDA graphs for the chunk loop (``tk.cuda_graphs``): the option's scope on every machine, the
engine's use of a chunk graph on the CPU with a stand-in that computes what a replay computes,
and (GPU) capture and replay equal to the eager loop, with a fallback for forwards that cannot
be captured."""
from __future__ import annotations

import contextlib
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
    given points (as a replay of the captured step does), None for another shape than the
    captured one, or None for good (capture failed); ``nan`` makes its replays return NaN."""

    made: list = []

    def __init__(self, step, fail=False, nan=False):
        self.step, self.fail, self.nan, self.counts = step, fail, nan, []
        self.failed, self.size = False, None
        StandIn.made.append(self)

    def reset(self):
        self.size = None

    def __call__(self, points, rows):
        self.counts.append(points.shape[0])
        if self.fail:
            self.failed = True
            return None
        if self.size not in (None, points.shape[0]):
            return None
        self.size = points.shape[0]
        out = self.step(points.detach().clone().requires_grad_(True), rows.clone())
        return torch.full_like(out, float("nan")) if self.nan else out


def _stand_in(monkeypatch, **kw):
    StandIn.made = []
    monkeypatch.setattr(cuda_graphs, "requested", lambda device, create_graph: True)
    monkeypatch.setattr(cuda_graphs, "ChunkGraph", lambda step: StandIn(step, **kw))


@pytest.mark.parametrize("fail", [False, True], ids=["replayed", "capture_failed"])
def test_engine_uses_the_chunk_graph_for_full_chunks_only(monkeypatch, fail):
    model = models.mlp()
    x = torch.randn(3, 10, dtype=torch.float64)
    want = tk.integrated_gradients(model, x, target=1, steps=10, chunk_size=4).attributions
    _stand_in(monkeypatch, fail=fail)
    got = tk.integrated_gradients(model, x, target=1, steps=10, chunk_size=4).attributions
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    (graph,) = StandIn.made
    # 30 points in chunks of 4: every full chunk (the last 2 points run eagerly); after a
    # failed capture none
    assert graph.counts == ([4] if fail else [4] * 7)
    tk.integrated_gradients(model, x, target=1, steps=10, chunk_size=4)
    assert len(StandIn.made) == (1 if fail else 2)  # a failure is remembered for the model


def test_few_chunks_skip_the_capture(monkeypatch):
    _stand_in(monkeypatch)
    tk.integrated_gradients(models.mlp(), torch.randn(1, 10, dtype=torch.float64), target=0,
                            steps=8, chunk_size=4)
    assert StandIn.made[0].counts == []  # 2 chunks < MIN_CHUNKS: not worth a capture


class _OomOnce(torch.nn.Module):
    """An MLP whose third graph-building forward raises an out-of-memory error."""

    def __init__(self):
        super().__init__()
        self.net, self.calls = models.mlp(), 0

    def forward(self, x):
        self.calls += torch.is_grad_enabled()
        if self.calls == 3:
            raise RuntimeError("CUDA out of memory (simulated)")
        return self.net(x)


def test_a_halved_chunk_size_drops_the_graph(monkeypatch):
    model, x = _OomOnce(), torch.randn(2, 10, dtype=torch.float64)
    want = tk.integrated_gradients(model.net, x, target=1, steps=32, chunk_size=8).attributions
    _stand_in(monkeypatch)
    got = tk.integrated_gradients(model, x, target=1, steps=32, chunk_size=8).attributions
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    (graph,) = StandIn.made
    assert graph.counts[:3] == [8, 8, 8] and set(graph.counts[3:]) == {4}
    assert graph.size == 4  # captured again at the new size


def test_non_finite_replay_not_reproduced_eagerly_raises(monkeypatch):
    from taylor_kernels.engine import path_engine
    monkeypatch.setattr(path_engine, "_defer_checks", lambda device: True)
    _stand_in(monkeypatch, nan=True)
    with pytest.raises(FloatingPointError, match="a graph replay gave them"):
        tk.integrated_gradients(models.mlp(), torch.randn(2, 10, dtype=torch.float64),
                                target=1, steps=16, chunk_size=4)


def _gpu_pair(fn):
    """``fn()`` eagerly and inside ``tk.cuda_graphs()`` (a graph's warning is an error), with
    the graphs the graphed call made."""
    made = []
    real = cuda_graphs.ChunkGraph

    def record(step):
        made.append(real(step))
        return made[-1]

    want = fn()
    cuda_graphs.ChunkGraph = record
    try:
        with tk.cuda_graphs(), warnings.catch_warnings():
            warnings.filterwarnings("error", message=".*cannot be captured")
            got = fn()
    finally:
        cuda_graphs.ChunkGraph = real
    return want, got, made


def _replayed(made) -> bool:
    return len(made) == 1 and made[0].graph is not None and made[0].replays >= 2


@requires_cuda
@pytest.mark.parametrize("net", ["mlp", "cnn"])
def test_cuda_graph_equals_eager_ig(net):
    model = (models.mlp() if net == "mlp" else models.cnn()).float().cuda()
    x = torch.randn(4, *((10,) if net == "mlp" else (2, 8, 8)), device="cuda")
    target = torch.tensor([0, 1, 2, 0], device="cuda")  # rows matter: per-row targets
    want, got, made = _gpu_pair(lambda: tk.integrated_gradients(
        model, x, target=target, steps=32, chunk_size=16).attributions)
    assert _replayed(made)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    layer = model[2] if net == "mlp" else model.c2
    want, got, made = _gpu_pair(lambda: tk.layer_integrated_gradients(
        model, layer, x, target=target, steps=32, chunk_size=16).attributions)
    assert _replayed(made)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@requires_cuda
def test_cuda_graph_equals_eager_on_a_transformer():
    pytest.importorskip("transformers")
    import taylor_kernels.captum as tkc
    from taylor_kernels.models import tiny
    model = tiny.gpt2(layers=2, d=64, vocab=128).cuda()
    ids = torch.randint(4, 128, (2, 12), device="cuda")
    want, got, made = _gpu_pair(lambda: tk.token_integrated_gradients(
        model, ids, 7, baselines="zero", steps=32, chunk_size=8).attributions)
    assert _replayed(made)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    lig = tkc.LayerIntegratedGradients(lambda i: model(i).logits[:, -1],
                                       model.get_input_embeddings())
    want, got, made = _gpu_pair(lambda: lig.attribute(
        ids, torch.zeros_like(ids), target=5, n_steps=32, internal_batch_size=8))
    assert _replayed(made)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    prompt, target = ids[0], torch.randint(4, 128, (5,), device="cuda")
    want, got, made = _gpu_pair(lambda: tk.generation_attribution(
        model, prompt, target, steps=32, chunk_size=4).token_attr)  # T = 5 outputs per point
    assert _replayed(made)
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
def test_uncapturable_forward_falls_back_and_leaves_cuda_as_it_was():
    model = HostSync().cuda()
    x = torch.randn(2, 6, device="cuda")
    stream, mode = torch.cuda.current_stream(), torch.cuda.get_sync_debug_mode()
    call = lambda: tk.integrated_gradients(  # noqa: E731
        model, x, target=0, steps=32, chunk_size=8).attributions
    want = call()
    made = []
    real = cuda_graphs.ChunkGraph
    cuda_graphs.ChunkGraph = lambda step: made.append(real(step)) or made[-1]
    try:
        with tk.cuda_graphs(), pytest.warns(RuntimeWarning, match="cannot be captured"):
            got = call()
        with tk.cuda_graphs():
            again = call()  # remembered: no second try on this model and shape
    finally:
        cuda_graphs.ChunkGraph = real
    assert len(made) == 1 and made[0].failed
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(again, want)
    assert torch.cuda.current_stream() == stream and torch.cuda.get_sync_debug_mode() == mode
    ok = models.mlp().float().cuda()  # the allocator and streams still capture
    _, _, made = _gpu_pair(lambda: tk.integrated_gradients(
        ok, torch.randn(2, 10, device="cuda"), target=1, steps=32, chunk_size=8).attributions)
    assert _replayed(made)


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

        self.calls = []
        monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
        monkeypatch.setattr(torch.cuda, "Stream", Stream)
        monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream())
        monkeypatch.setattr(torch.cuda, "stream", lambda s: _null())
        monkeypatch.setattr(torch.cuda, "device", lambda d: _null())
        self.capturing = False

        @contextlib.contextmanager
        def graph(g, **kw):  # a capture: is_current_stream_capturing() reads True inside
            self.calls.append(kw)
            self.capturing = True
            try:
                yield
            finally:
                self.capturing = False

        monkeypatch.setattr(torch.cuda, "graph", graph)
        monkeypatch.setattr(torch.cuda.graphs, "_cuda_isCurrentStreamCapturing",
                            lambda: self.capturing)
        monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: (0, 1))
        monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        modes = [0]
        monkeypatch.setattr(torch.cuda, "get_sync_debug_mode", lambda: modes[-1])
        monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", lambda m: modes.append(m))
        self.modes = modes
        self.pool_calls = []
        monkeypatch.setattr(torch._C, "_cuda_endAllocateToPool",
                            lambda i, p: self.pool_calls.append(("end", i, p)), raising=False)
        monkeypatch.setattr(torch._C, "_cuda_releasePool",
                            lambda i, p: self.pool_calls.append(("release", i, p)),
                            raising=False)


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
    assert fake.calls[0]["capture_error_mode"] == "thread_local" and "stream" in fake.calls[0]
    assert fake.modes == [0, "error", 0]  # syncs raised in the warm-up, then the caller's mode
    assert graph(torch.randn(4, 4, dtype=torch.float64), torch.arange(4.0)) is None  # shape
    assert graph.size == 5 and not fake.pool_calls


def test_chunk_graph_capture_failure_warns_once_and_returns_none(monkeypatch):
    _FakeCuda(monkeypatch)

    def bad(points, rows):
        raise RuntimeError("operation not permitted when stream is capturing")

    graph = cuda_graphs.ChunkGraph(bad)
    with pytest.warns(RuntimeWarning, match="cannot be captured"):
        assert graph(torch.randn(2, 3), torch.arange(2)) is None
    assert graph.failed and graph(torch.randn(2, 3), torch.arange(2)) is None


def test_chunk_graph_failed_capture_closes_its_pool(monkeypatch):
    """A step that fails inside the capture (not in the warm-up): the pool the allocator
    still counts as an open capture is ended and released."""
    fake = _FakeCuda(monkeypatch)
    calls = []

    def fails_second_time(points, rows):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("operation not permitted when stream is capturing")
        return _step(points, rows)

    with pytest.warns(RuntimeWarning, match="cannot be captured"):
        assert cuda_graphs.ChunkGraph(fails_second_time)(torch.randn(2, 3, dtype=torch.float64),
                                                         torch.arange(2.0)) is None
    assert fake.pool_calls == [("end", 0, (0, 1)), ("release", 0, (0, 1))]


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
    call = lambda: tk.integrated_gradients(model, x, target=1, steps=64, chunk_size=8)  # noqa
    if graphs:
        _, _, made = _gpu_pair(call)
        assert _replayed(made)
    else:
        call()


def test_the_warm_up_takes_the_path_the_capture_takes(monkeypatch):
    """Libraries skip host checks while a capture runs (transformers' ``is_tracing``: GPT-2's
    padding warning reads ``.item()`` otherwise). The warm-up, where syncs raise, must see the
    same answer, or such a forward never gets captured; afterwards the function is torch's."""
    fake = _FakeCuda(monkeypatch)
    real = torch.cuda.is_current_stream_capturing
    seen = []

    def step(points, rows):
        capturing = torch.cuda.is_current_stream_capturing()
        seen.append(capturing)
        if not capturing and fake.modes[-1] == "error":
            raise RuntimeError("called a synchronizing CUDA operation")  # the host check
        return _step(points, rows)

    graph = cuda_graphs.ChunkGraph(step)
    pts, rows = torch.randn(5, 4, dtype=torch.float64), torch.arange(5.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(graph(pts, rows), rows[:, None] * pts.cos())
    assert not graph.failed and seen == [True, True]  # the warm-up, then the capture
    assert torch.cuda.is_current_stream_capturing is real and not cuda_graphs.capturing()


def test_concurrent_warm_ups_each_see_a_capture_until_their_own_end(monkeypatch):
    """Two threads warm up at once and the first ends before the second: the second must still
    read True (it ran its host checks with syncs raising before), a thread not warming reads
    the real state, and the caller's function is back once both have ended."""
    monkeypatch.setattr(torch.cuda.graphs, "_cuda_isCurrentStreamCapturing", lambda: False)
    real = torch.cuda.is_current_stream_capturing
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()
    seen = {}

    def first():
        with cuda_graphs._seen_as_capture():
            a_in.set()
            b_in.wait(5)
            seen["a"] = torch.cuda.is_current_stream_capturing()
        a_out.set()

    def second():
        a_in.wait(5)
        with cuda_graphs._seen_as_capture():
            b_in.set()
            a_out.wait(5)
            seen["b after a"] = torch.cuda.is_current_stream_capturing()
            with cuda_graphs._seen_as_capture():  # nested in one thread
                pass
            seen["b after nested"] = torch.cuda.is_current_stream_capturing()
            seen["other thread"] = []
            other = threading.Thread(
                target=lambda: seen["other thread"].append(
                    torch.cuda.is_current_stream_capturing()))
            other.start()
            other.join(5)

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert seen == {"a": True, "b after a": True, "b after nested": True,
                    "other thread": [False]}
    assert torch.cuda.is_current_stream_capturing is real


def test_a_transformer_forward_is_captured_past_its_host_checks(monkeypatch):
    """The tiny GPT-2 without an attention mask: its forward reads a token on the host unless a
    capture runs; with syncs raising in the warm-up (as on a GPU) it is still captured."""
    pytest.importorskip("transformers")
    from torch.utils._python_dispatch import TorchDispatchMode

    from taylor_kernels.models import tiny
    fake = _FakeCuda(monkeypatch)

    class SyncsRaise(TorchDispatchMode):  # what set_sync_debug_mode("error") does on a GPU
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if fake.modes[-1] == "error" and func.__name__.startswith("_local_scalar_dense"):
                raise RuntimeError("called a synchronizing CUDA operation")
            return func(*args, **(kwargs or {}))

    model = tiny.gpt2(layers=2, d=32, vocab=64)
    ids = torch.randint(4, 64, (2, 6))
    want = tk.token_integrated_gradients(model, ids, 7, steps=16, chunk_size=4).attributions
    made = []

    class Replayed(cuda_graphs.ChunkGraph):  # the fake graph's replays recompute the step
        def __call__(self, points, rows):
            out = super().__call__(points, rows)
            if fake.graphs and fake.graphs[-1].owner is None:
                fake.graphs[-1].owner = self
            return out

    monkeypatch.setattr(cuda_graphs, "requested", lambda device, create_graph: True)
    monkeypatch.setattr(cuda_graphs, "ChunkGraph", lambda step: made.append(Replayed(step))
                        or made[-1])
    with SyncsRaise(), warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*cannot be captured")
        got = tk.token_integrated_gradients(model, ids, 7, steps=16, chunk_size=4).attributions
    assert len(made) == 1 and not made[0].failed and made[0].replays >= 2
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_out_of_memory_in_the_capture_is_raised_not_remembered(monkeypatch):
    """Out of memory while warming up or capturing is the chunk's size, not the forward: it
    reaches the chunk loop (which halves the chunk) and a later call captures again."""
    _FakeCuda(monkeypatch)
    calls = []

    def step(points, rows):
        calls.append(points.shape[0])
        if len(calls) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return _step(points, rows)

    graph = cuda_graphs.ChunkGraph(step)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(torch.OutOfMemoryError):
            graph(torch.randn(6, 4, dtype=torch.float64), torch.arange(6.0))
        assert not graph.failed and graph.graph is None
        pts, rows = torch.randn(3, 4, dtype=torch.float64), torch.arange(3.0)
        torch.testing.assert_close(graph(pts, rows), rows[:, None] * pts.cos())
    assert graph.size == 3 and calls == [6, 3, 3]  # failed warm-up; warm-up and capture
