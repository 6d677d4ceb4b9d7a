"""The backend choice is per thread / per asyncio task (a ContextVar), never shared."""
from __future__ import annotations

import asyncio
import sys
import threading

import pytest
import torch

import taylor_kernels as tk
from tests.conftest import runnable_cpu_backends

ROUNDS = 4


class _Recorder(torch.nn.Module):
    """Small tanh MLP that records the backend each forward call sees, per thread."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(),
                                       torch.nn.Linear(8, 3)).double()
        self.seen: dict[int, set[str]] = {}

    def forward(self, x):
        self.seen.setdefault(threading.get_ident(), set()).add(tk.backends.current())
        return self.net(x)


def _ig(model, x, backend):
    return tk.integrated_gradients(model, x, target=1, steps=8, backend=backend,
                                   chunk_size=16).attributions


@pytest.fixture
def fast_switching():
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # force frequent thread switches: maximum interleaving
    yield
    sys.setswitchinterval(before)


def test_threads_keep_their_own_backend(fast_switching):
    names = runnable_cpu_backends()
    assert "reference" in names and len(names) >= 2, names
    model = _Recorder()
    x = torch.randn(5, 6, dtype=torch.float64)
    expected = _ig(model, x, "reference")
    before = tk.backends.current()
    barrier = threading.Barrier(len(names))
    results: dict[str, list] = {n: [] for n in names}
    errors: list[BaseException] = []
    idents: dict[str, int] = {}

    def work(name):
        idents[name] = threading.get_ident()
        try:
            barrier.wait()
            for _ in range(ROUNDS):
                results[name].append(_ig(model, x, name))
                with tk.backends.using(name):  # the context-manager form as well
                    assert tk.backends.current() == name
                    results[name].append(_ig(model, x, None))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for name in names:
        assert model.seen[idents[name]] == {name}, (name, model.seen[idents[name]])
        assert len(results[name]) == 2 * ROUNDS
        for r in results[name]:
            torch.testing.assert_close(r, expected, rtol=1e-12, atol=1e-12)
    assert tk.backends.current() == before


def test_thread_sees_process_default_not_callers_block():
    seen = []
    with tk.backends.using("reference"):
        t = threading.Thread(target=lambda: seen.append(tk.backends.current()))
        t.start()
        t.join()
        assert tk.backends.current() == "reference"
    assert seen == [tk.backends.current()]


def test_use_sets_process_default_and_using_wins_in_its_block():
    before = tk.backends.current()
    try:
        tk.backends.use("reference")
        seen = []
        t = threading.Thread(target=lambda: seen.append(tk.backends.current()))
        t.start()
        t.join()
        assert seen == ["reference"]
        with tk.backends.using("cpp" if "cpp" in runnable_cpu_backends() else "auto"):
            assert tk.backends.current() != "reference"
        assert tk.backends.current() == "reference"
    finally:
        tk.backends.use(before)


def test_asyncio_tasks_keep_their_own_backend():
    names = runnable_cpu_backends()
    model = _Recorder()
    x = torch.randn(3, 6, dtype=torch.float64)
    expected = _ig(model, x, "reference")
    before = tk.backends.current()

    async def task(name):
        out = []
        with tk.backends.using(name):
            for _ in range(ROUNDS):
                await asyncio.sleep(0)  # let the other tasks run inside their own blocks
                assert tk.backends.current() == name
                out.append(_ig(model, x, None))
        return name, out

    async def main():
        return await asyncio.gather(*(task(n) for n in names))

    for name, out in asyncio.run(main()):
        for r in out:
            torch.testing.assert_close(r, expected, rtol=1e-12, atol=1e-12)
    assert tk.backends.current() == before


def test_failed_call_restores_the_choice():
    before = tk.backends.current()
    with pytest.raises(ValueError, match="unknown backend"):
        _ig(_Recorder(), torch.randn(2, 6, dtype=torch.float64), "nope")
    with pytest.raises(ValueError):
        tk.integrated_gradients(_Recorder(), torch.randn(2, 6, dtype=torch.float64),
                                target=9, backend="reference")
    assert tk.backends.current() == before


def test_a_bad_default_from_the_environment_names_the_variable(monkeypatch):
    """``TAYLOR_KERNELS_BACKEND=gpu`` was taken at import; every op then said "unknown
    backend 'gpu'" without naming where it came from."""
    from taylor_kernels import backends
    monkeypatch.setenv(backends.ENV_VAR, "gpu")
    monkeypatch.setitem(backends._default, "name", "gpu")
    with pytest.raises(ValueError, match="unknown backend 'gpu'.*TAYLOR_KERNELS_BACKEND='gpu'"):
        tk.ops.jet_unary("tanh", torch.randn(3, 4))
    with tk.backends.using("reference"):  # a forced choice still runs
        tk.ops.jet_unary(__import__("numpy").int64(0), torch.randn(3, 4))


def test_runs_on_reads_names_as_use_does():
    """``runs_on`` raised a bare KeyError for "CPP", "auto" or an unknown name."""
    assert tk.backends.runs_on(" CPP ", "cpu") == tk.backends.runs_on("cpp", "cpu")
    assert tk.backends.runs_on("auto", "cpu")
    with pytest.raises(ValueError, match="unknown backend 'bogus'"):
        tk.backends.runs_on("bogus", "cpu")


def test_interpreted_triton_launches_from_two_threads():
    """Triton's interpreter keeps a launch's state in globals: two threads' launches broke
    each other (InterpreterError in 1-3 of 40 calls); they are serialized now."""
    if not tk.backends.runs_on("triton", "cpu"):
        pytest.skip("Triton's interpreter is not available (TRITON_INTERPRET=1)")
    u = torch.randn(5, 700)
    with tk.backends.using("triton"):
        want = tk.ops.jet_unary("gelu", u)
    errors = []

    def work():
        with tk.backends.using("triton"):
            for _ in range(20):
                try:
                    if not torch.equal(tk.ops.jet_unary("gelu", u), want):
                        errors.append("values differ")
                except Exception as exc:  # noqa: BLE001 - every failure counts
                    errors.append(f"{type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=work) for _ in range(2)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # threads switch inside launches (1-3 of 40 failed at 5 ms)
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    assert not errors, errors[:3]


def test_interpreted_triton_inside_torch_compile_is_refused_by_name():
    """The interpreter read the tracer's placeholder tensors ("invalid python storage")."""
    if not tk.backends.runs_on("triton", "cpu"):
        pytest.skip("Triton's interpreter is not available (TRITON_INTERPRET=1)")
    u = torch.randn(3, 8)
    torch._dynamo.reset()
    with tk.backends.using("triton"), pytest.raises(Exception, match="cannot run inside "
                                                                        "torch.compile"):
        torch.compile(lambda v: tk.ops.jet_unary("tanh", v), fullgraph=True,
                      backend="aot_eager")(u)
    torch._dynamo.reset()
