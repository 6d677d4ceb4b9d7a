"""The Python op wrappers ``tk.ops.*`` trace under ``torch.compile(fullgraph=True)``: the
backend is resolved once at trace time (``backends.resolve`` is a constant there), and the
compiled function gives the eager values and gradients on every CPU-runnable backend."""
from __future__ import annotations

import pytest
import torch

import taylor_kernels as tk
from tests.conftest import requires_cuda


def _compiled(fn):
    torch._dynamo.reset()  # each backend traces afresh: the choice is made at trace time
    return torch.compile(fn, backend="aot_eager", fullgraph=True)


def _path(x, bl, alphas, w):
    pts = tk.ops.path_points(x, bl, alphas, 2, 17)
    return tk.ops.path_accumulate(pts.sin(), x, bl, w, 2)


def _jet(u):
    return tk.ops.jet_mul(tk.ops.jet_unary("tanh", u), u)


def _polarize(c, gamma):
    return tk.ops.polarize_contract(c, gamma, 2) + tk.ops.polarize(c, (1, 1))


def _ih(h, x, bl, w, idx):
    return tk.ops.ih_accumulate(h, x, bl, w, idx, 3)


def _cases():
    g = torch.Generator().manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    x, bl = rnd(3, 5), rnd(1, 2, 5)
    _, gamma = tk.ops.polarization_rule((1, 1))
    M = gamma.shape[0]
    idx = torch.tensor([4, 0])
    return [("path", _path, (x, bl, torch.linspace(0, 1, 4, dtype=torch.float64),
                             torch.rand(4, generator=g, dtype=torch.float64))),
            ("jet", _jet, (rnd(4, 7) * 0.5,)),
            ("polarize", _polarize, (rnd(3, M, 6), gamma.to(torch.float64))),
            ("ih", _ih, (rnd(9, 2, 5), x, bl, torch.rand(3, generator=g, dtype=torch.float64),
                         idx))]


def _check_compiled(fn, args, device="cpu"):
    args = tuple(a.to(device).clone().requires_grad_(a.is_floating_point()) for a in args)
    eager = fn(*args)
    got = _compiled(fn)(*args)
    torch.testing.assert_close(got, eager)
    diff = [a for a in args if a.requires_grad]
    g_eager = torch.autograd.grad(eager.square().sum(), diff)
    g_got = torch.autograd.grad(got.square().sum(), diff)
    for a, b in zip(g_got, g_eager):
        torch.testing.assert_close(a, b)


CASES = _cases()
IDS = [c[0] for c in CASES]


@pytest.mark.parametrize("name, fn, args", CASES, ids=IDS)
def test_wrapper_compiles_fullgraph(cpu_backend, name, fn, args):
    if cpu_backend == "triton":
        pytest.skip("the Triton interpreter runs kernels on the fake tensors of tracing; "
                    "compiled Triton ops are tested on a GPU")
    _check_compiled(fn, args)


@requires_cuda
@pytest.mark.parametrize("backend", ["cuda", "triton", "reference"])
@pytest.mark.parametrize("name, fn, args", CASES, ids=IDS)
def test_wrapper_compiles_fullgraph_cuda(backend, name, fn, args):
    if not tk.backends.runs_on(backend, torch.device("cuda")):
        pytest.skip(f"backend {backend} unavailable")
    with tk.backends.using(backend):
        _check_compiled(fn, args, "cuda")


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
@pytest.mark.parametrize("bad", [[5, 0], [-1, 0]], ids=["above", "negative"])
def test_compiled_ih_accumulate_still_checks_index(cpu_backend, compiler, bad):
    """Inside a compiled function the index range is checked by the C++ kernel (ValueError)
    or by the reference's compiled range check (RuntimeError), never read out of range."""
    if cpu_backend == "triton":
        pytest.skip("compiled Triton ops are tested on a GPU")
    _, _, (h, x, bl, w, _) = CASES[3]
    torch._dynamo.reset()
    fn = torch.compile(_ih, backend=compiler, fullgraph=True)
    with pytest.raises(ValueError if cpu_backend == "cpp" else RuntimeError,
                       match="index entries must lie in"):
        fn(h, x, bl, w, torch.tensor(bad))


@pytest.mark.skipif(not tk.backends.available()["cpp"], reason="extension not built")
def test_compiled_graph_holds_the_backend_traced_with():
    """The backend is part of the traced graph: ``reference`` traces to ATen ops, ``cpp`` to
    the registered op; the compiled function keeps it under a later ``using``."""
    graphs = []

    def record(gm, example_inputs):
        graphs.append({str(n.target) for n in gm.graph.nodes if n.op == "call_function"})
        return gm.forward

    def points(x, bl, a):
        return tk.ops.path_points(x, bl, a, 0, 6)

    x, bl, a = torch.randn(2, 3), torch.randn(1, 1, 3), torch.linspace(0, 1, 3)
    for name in ("reference", "cpp"):
        torch._dynamo.reset()
        with tk.backends.using(name):
            fn = torch.compile(points, backend=record, fullgraph=True)
            fn(x, bl, a)
        with tk.backends.using("cpp" if name == "reference" else "reference"):
            torch.testing.assert_close(fn(x, bl, a), points(x, bl, a))
    assert not any("taylor_kernels.path_points" in t for t in graphs[0])
    assert any("taylor_kernels.path_points" in t for t in graphs[1])
    assert len(graphs) == 2  # no retrace under the other backend


@pytest.mark.parametrize("ints", ["start", "start_and_count"])
def test_changing_chunk_bounds_compile_once(cpu_backend, ints):
    """``start``/``count`` are SymInts in the ops' schemas: a compiled chunk step traces once
    for all chunk bounds (an ``int`` schema specialized each value until the recompile limit)."""
    if cpu_backend == "triton":
        pytest.skip("compiled Triton ops are tested on a GPU")
    graphs = []

    def chunk(x, bl, w, start, count):
        pts = tk.ops.path_points(x, bl, w, start, count)
        return tk.ops.path_accumulate(pts.sin(), x, bl, w, start)

    torch._dynamo.reset()
    fn = torch.compile(chunk, backend=lambda gm, ex: graphs.append(1) or gm.forward,
                       fullgraph=True, dynamic=True)
    x, bl, w = torch.randn(4, 5), torch.randn(1, 2, 5), torch.rand(8)
    for start in range(0, 60, 4):
        count = 4 if ints == "start" else 2 + start % 5  # (0 and 1 specialize anyway)
        torch.testing.assert_close(fn(x, bl, w, start, count), chunk(x, bl, w, start, count))
    assert len(graphs) == 1


def test_reference_ih_accumulate_gradients_compiled_by_inductor():
    """Inductor (torch 2.13, CPU) compiled ``delta[:, index]``'s backward wrongly: d/dx off by
    3 where |d/dx| is 3, or heap corruption; the reference now takes the index columns before
    the rows."""
    g = torch.Generator().manual_seed(0)
    x, bl, w = torch.randn(3, 5, generator=g), torch.randn(1, 2, 5, generator=g), \
        torch.rand(4, generator=g)
    h, idx = torch.randn(7, 2, 5, generator=g), torch.tensor([4, 0])

    def f(x):
        return tk.ops.ih_accumulate(h, x, bl, w, idx, 4).sum()

    with tk.backends.using("reference"):
        torch._dynamo.reset()
        xc, xe = x.clone().requires_grad_(), x.clone().requires_grad_()
        torch.compile(f, fullgraph=True, backend="inductor")(xc).backward()
        f(xe).backward()
    torch.testing.assert_close(xc.grad, xe.grad)
