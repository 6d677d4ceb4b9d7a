"""Tests for mutants of the fourth QA pass's fixes that survived the suite (mutation QA: 79
made, 56 killed): each pins a behaviour that a plausible edit would break silently."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import taylor_kernels as tk
from taylor_kernels.engine import chunking, memory

DT = torch.float64


def _relu_mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).double()


@pytest.mark.parametrize("method", ["eg", "sig"])
def test_the_exact_rule_runs_its_endpoints_with_gap_false(method):
    """rule='exact' needs f(x), f(b): gap=False must not drop them (a crash on None)."""
    model, x, bg = _relu_mlp(), torch.randn(2, 4, dtype=DT), torch.randn(5, 4, dtype=DT)

    def call(gap):
        if method == "eg":
            return tk.expected_gradients(model, x, bg, target=1, samples=4, seed=1,
                                         rule="exact", gap=gap)
        return tk.shapley_integrated_gradients(model, x, target=1, coalitions=3, seed=1,
                                               rule="exact", gap=gap)
    torch.testing.assert_close(call(False).attributions, call(True).attributions)


def test_a_zero_dim_position_tensor_is_one_position_for_all_rows():
    pytest.importorskip("transformers")
    from taylor_kernels.models import tiny
    gpt2 = tiny.gpt2(layers=1, d=32)
    ids = torch.tensor([[2, 17, 33, 8, 91], [3, 9, 12, 60, 7]])
    a = tk.token_integrated_gradients(gpt2, ids, target=[1, 2], position=torch.tensor(2),
                                      steps=4, chunk_size=64)
    b = tk.token_integrated_gradients(gpt2, ids, target=[1, 2], position=2, steps=4,
                                      chunk_size=64)
    torch.testing.assert_close(a.attributions, b.attributions)
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 0, 0]])
    with pytest.warns(UserWarning, match=r"row 0: index 4, row 1: index 4"):
        tk.token_integrated_gradients(gpt2, ids, target=[1, 2], attention_mask=mask,
                                      position=[4, 4], steps=4)


class _Casting(nn.Module):
    def __init__(self, cast):
        super().__init__()
        self.a, self.b, self.cast = nn.Linear(4, 6).double(), nn.Linear(6, 1).double(), cast

    def forward(self, x):
        h = torch.relu(self.a(x))
        return self.b(h)[:, 0] + self.cast(h * 3).to(h.dtype).sum(-1)


@pytest.mark.parametrize("cast", ["type_as", "to_tensor"])
def test_the_exact_rule_falls_back_at_casts_named_by_a_tensor(cast):
    idx = torch.zeros(1, dtype=torch.long)
    fn = (lambda z: z.type_as(idx)) if cast == "type_as" else (lambda z: z.to(idx))
    torch.manual_seed(0)
    with pytest.warns(RuntimeWarning, match="cast to torch.int64"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".* miss the completeness")
        res = tk.integrated_gradients(_Casting(fn), torch.randn(2, 4, dtype=DT), rule="exact")
    assert (res.regions == -1).all()


def test_a_traced_submodules_output_by_position_skips_none_fields():
    """out[1] of a ModelOutput is its second field that is not None."""
    transformers = pytest.importorskip("transformers")
    BaseModelOutput = transformers.modeling_outputs.BaseModelOutput

    class Inner(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4).double()

        def forward(self, x):
            h = torch.tanh(self.lin(x))
            return BaseModelOutput(last_hidden_state=h, hidden_states=None, attentions=h * h)

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = Inner()

        def forward(self, x):
            out = self.inner(x)
            return (out[0] + out[1]).sum(-1)

    torch.manual_seed(0)
    model, x = Outer(), torch.randn(2, 4, dtype=DT)
    V = torch.randn(2, 1, 4, dtype=DT)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        got = tk.jet(model, x, V, 2, cache=False)
        ref = tk.jet(model, x, V, 2, fallback=True)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)


SCALE = 1.0


def test_a_changed_global_retraces_inside_allow_row_coupling():
    global SCALE
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    f = lambda z: SCALE * model(z)[:, 0]  # noqa: E731
    x, V = torch.randn(2, 3, dtype=DT), torch.randn(2, 1, 3, dtype=DT)
    try:
        with tk.allow_row_coupling(model):
            first = tk.jet(f, x, V, 2)
            SCALE = 2.0
            torch.testing.assert_close(tk.jet(f, x, V, 2), 2 * first)
    finally:
        SCALE = 1.0


def test_shared_buffers_stay_shared_on_their_copies():
    """Two buffer names of one tensor get one copy inside the block (a forward writing ``a``
    and reading its alias ``b`` must see its write), and the originals come back."""
    from taylor_kernels.engine.buffer_copies import buffers_copied
    m = nn.Module()
    t = torch.ones(())
    m.register_buffer("a", t)
    m.register_buffer("b", t)
    with buffers_copied([m]):
        assert m.a is m.b and m.a is not t
        m.a += 1
        assert float(m.b) == 2.0
    assert m.a is t and m.b is t and float(t) == 1.0


def test_a_busy_choice_is_reused_at_the_callers_thread_count(monkeypatch):
    """On a busy CPU the choice keeps fewer threads than asked; it must be found again by
    the count asked (it stored the kept count: every call timed again)."""
    monkeypatch.setattr(chunking, "machine_busy", lambda: True)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    monkeypatch.setattr(chunking, "_BUSY_THREADS", {})
    slot = {}
    plan = chunking.ChunkPlan(10**6, torch.device("cpu"), cost=4096, slot=slot)
    base = memory.DEFAULT_TARGET // 4096
    per_item = {(base, 2): 5.0, (base, 1): 1.0, (4 * base, 1): 1.0, (16 * base, 1): 1.0}
    while plan.trials:
        count, threads = plan.next_count(10**9), plan.thread_count()
        plan.record(count, per_item[(count, threads)] * count, None)
    again = chunking.ChunkPlan(10**6, torch.device("cpu"), cost=4096, slot=slot)
    assert not again.trials and again.threads == 1


def test_unification_table_bar_counts_the_methods_asked_for(monkeypatch):
    import io
    import tqdm.auto
    made = []

    class Recording(tqdm.auto.tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, file=io.StringIO(), **kwargs)
            made.append(self)
    monkeypatch.setattr(tqdm.auto, "tqdm", Recording)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    tk.unification_table(model, torch.randn(1, 4, dtype=DT), target=0,
                         methods=("gradient_x_input",), progress=True)
    assert [(b.n, b.total) for b in made] == [(3, 3)]


def test_noise_tunnel_names_a_plain_function_model_given_first():
    model = _relu_mlp()
    with pytest.raises(TypeError, match="method first"):
        tk.noise_tunnel(lambda z: model(z), tk.integrated_gradients, torch.randn(2, 4,
                                                                                 dtype=DT))


def test_a_generator_of_inputs_is_named():
    model = _relu_mlp()
    gen = (t for t in [torch.randn(2, 4, dtype=DT)])
    with pytest.raises(ValueError, match="got generator"):
        tk.integrated_gradients(model, gen, target=0)


def test_global_interactions_of_no_rows_says_so():
    model = _relu_mlp()
    with pytest.raises(ValueError, match="no rows"):
        tk.global_interactions(model, torch.zeros(0, 4, dtype=DT), target=0)


def test_a_cost_is_measured_again_when_a_buffer_grows(monkeypatch):
    """The cost key holds the buffers' elements too, not the parameters' alone."""
    from taylor_kernels.engine import path_engine
    torch.manual_seed(0)

    class Buffered(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 3).double()
            self.register_buffer("table", torch.zeros(4, dtype=DT))

        def forward(self, x):
            return self.lin(x + self.table[:4])

    model, x = Buffered(), torch.randn(3, 4, dtype=DT)
    measured = []
    real = path_engine._measure
    monkeypatch.setattr(path_engine, "_measure", lambda *a: measured.append(1) or real(*a))
    tk.integrated_gradients(model, x, target=1, steps=8)
    tk.integrated_gradients(model, x, target=1, steps=8)
    first = len(measured)
    model.table = torch.zeros(4096, dtype=DT)
    tk.integrated_gradients(model, x, target=1, steps=8)
    assert first >= 1 and len(measured) > first
