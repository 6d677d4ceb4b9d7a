"""Jet engine: coefficients against nested torch.func.jvp (float64, 1e-10) for every rule, mixed
partials against autograd Hessians / third derivatives, the fallback, gradients, errors."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import taylor_kernels as tk
from taylor_kernels.benchmarks.cases_jet import Block, for_nested_jvp
from taylor_kernels.engine import jet as jet_engine
from taylor_kernels.reference.jet import nested_jvp_coefficients

DT = torch.float64
ORDER = 6


def reference_jet(f, x, V, order):
    """[order+1, B, M, ...] coefficients of t -> f(x + t v) by nested forward-mode AD."""
    B, M = V.shape[:2]
    x0 = x.unsqueeze(1).expand(V.shape).reshape((B * M,) + x.shape[1:])
    with sdpa_kernel(SDPBackend.MATH):
        c = nested_jvp_coefficients(f, [torch.stack([x0, V.reshape(x0.shape)])], order)
    return c.reshape((order + 1, B, M) + c.shape[2:])


def manual_layer_norm(z, eps=1e-5):
    # torch's nested forward-mode AD through F.layer_norm is wrong beyond first order (its jvp
    # formula reuses the saved mean / rstd), so references use the composite formula
    c = z - z.mean(-1, keepdim=True)
    return c * torch.rsqrt((c * c).mean(-1, keepdim=True) + eps)


def check(f, x, M=2, order=ORDER, ref_f=None, target=None):
    V = torch.randn((x.shape[0], M) + x.shape[1:], dtype=DT)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a supported op must not fall back
        got = tk.jet(f, x, V, order, target=target)
    want = reference_jet(ref_f or f, x, V, order)
    assert got.shape == (order + 1, x.shape[0], M)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def mlp(act):
    return nn.Sequential(nn.Linear(5, 7), act, nn.Linear(7, 1), nn.Flatten(0)).double()


ACTIVATIONS = {"tanh": nn.Tanh(), "sigmoid": nn.Sigmoid(), "gelu": nn.GELU(),
               "gelu_tanh": nn.GELU(approximate="tanh"), "silu": nn.SiLU(), "relu": nn.ReLU(),
               "softplus": nn.Softplus(), "softplus_beta": nn.Softplus(beta=2.0),
               "softplus_threshold": nn.Softplus(beta=1.5, threshold=0.5)}  # linear branch


@pytest.mark.parametrize("name", ACTIVATIONS)
def test_mlp_activation_modules(name):
    check(mlp(ACTIVATIONS[name]), torch.randn(3, 5, dtype=DT))


def test_orders_one_to_six_agree():
    m, x = mlp(nn.Tanh()), torch.randn(2, 5, dtype=DT)
    V = torch.randn(2, 3, 5, dtype=DT)
    full = tk.jet(m, x, V, 6)
    for order in range(0, 6):
        torch.testing.assert_close(tk.jet(m, x, V, order), full[:order + 1])


ELEMENTWISE = {
    "exp": lambda h: torch.exp(h), "log": lambda h: torch.log(h * h + 1), "sin": torch.sin,
    "cos": lambda h: h.cos(), "square": torch.square, "sqrt": lambda h: torch.sqrt(h * h + 1),
    "rsqrt": lambda h: (h * h + 1).rsqrt(), "reciprocal": lambda h: torch.reciprocal(h * h + 2),
    "pow3": lambda h: h ** 3, "powhalf": lambda h: (h * h + 1) ** 0.5,
    "div": lambda h: h / (h * h + 1),
    "rdiv": lambda h: 2.0 / (h * h + 1), "sub_neg": lambda h: -(1 - h) - h.exp(),
    "silu_fn": F.silu, "gelu_fn": lambda h: F.gelu(h, approximate="tanh"),
    "softplus_fn": F.softplus, "tanh_method": lambda h: h.tanh() * h.sigmoid(),
}


@pytest.mark.parametrize("name", ELEMENTWISE)
def test_elementwise_functions(name):
    lin = nn.Linear(4, 3).double()
    fn = ELEMENTWISE[name]
    check(lambda x: fn(lin(x)).sum(-1), torch.randn(3, 4, dtype=DT))


class ConvNet(nn.Module):
    def __init__(self, dims=2):
        super().__init__()
        conv, bn = (nn.Conv2d, nn.BatchNorm2d) if dims == 2 else (nn.Conv1d, nn.BatchNorm1d)
        pool, avg = (nn.MaxPool2d, nn.AvgPool2d) if dims == 2 else (nn.MaxPool1d, nn.AvgPool1d)
        self.conv, self.bn, self.pool, self.avg = conv(2, 3, 3, padding=1), bn(3), pool(2), avg(2)
        self.head = nn.Linear(3, 1)
        self.bn.running_mean.uniform_(-1, 1)
        self.bn.running_var.uniform_(0.5, 2)

    def forward(self, x):
        y = self.avg(self.pool(torch.tanh(self.bn(self.conv(x)))))
        return self.head(torch.flatten(y, 1)).squeeze(-1)


@pytest.mark.parametrize("dims", [1, 2])
def test_conv_batchnorm_pooling(dims):
    shape = (2, 2, 4, 4) if dims == 2 else (2, 2, 4)
    check(ConvNet(dims).double().eval(), torch.randn(shape, dtype=DT), order=6)


def test_functional_conv_pool_and_adaptive():
    w, b = torch.randn(3, 2, 3, dtype=DT), torch.randn(3, dtype=DT)

    def f(x):
        y = F.conv1d(x, w, b, padding=1).sin()
        y = F.max_pool1d(y, 2) + F.avg_pool1d(y, 2)
        return F.adaptive_avg_pool1d(y, 1).sum((1, 2))
    check(f, torch.randn(2, 2, 6, dtype=DT), order=6)


def test_matmul_bmm_reshapes():
    def f(x):
        h = x.view(x.shape[0], 3, 4)
        s = torch.bmm(h, h.transpose(1, 2)) + h @ h.permute(0, 2, 1)
        z = torch.cat([s.reshape(x.shape[0], -1), x.unsqueeze(1).flatten(1)], dim=1)
        return torch.tanh(z).mean(-1)
    check(f, torch.randn(2, 12, dtype=DT))


def test_softmax_and_log_softmax():
    lin = nn.Linear(4, 5).double()
    check(lambda x: F.softmax(lin(x), dim=-1)[:, 0] + torch.log_softmax(lin(x), -1).sum(-1),
          torch.randn(3, 4, dtype=DT))


def test_implicit_softmax_dim_as_torch_chooses():
    """``nn.Softmax()`` (no dim: torch picks 1 for a 2-d input, with its deprecation warning)
    raised "jet softmax needs an explicit dim" and nothing caught it."""
    lin = nn.Linear(4, 5).double()
    soft = nn.Softmax()
    x, V = torch.randn(3, 4, dtype=DT), torch.randn(3, 2, 4, dtype=DT)
    with pytest.warns(UserWarning, match="Implicit dimension"):
        got = tk.jet(lambda z: soft(lin(z))[:, 1], x, V, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        want = reference_jet(lambda z: soft(lin(z))[:, 1], x, V, 4)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("call", [
    lambda z: torch.tanh(F.pad(z, (1, 2), value=0.7)).sum(-1),
    lambda z: torch.tanh(F.pad(z, (1, 1), "constant", -1.5)).pow(2).sum(-1),
    lambda z: torch.tanh(F.pad(z.unsqueeze(1), (2, 1), mode="replicate")).sum((1, 2)),
    lambda z: torch.tanh(F.pad(z, (1, 1))).sum(-1)])
def test_pad_fills_only_the_value(call):
    """``F.pad(value=0.7)`` was taken as linear: the fill went into every coefficient (the
    first-order one of ``tanh(pad(z, value=0.7))`` 2.28 where it is 1.40), silently, through
    ``taylor_decomposition`` and ``mixed_partials`` too."""
    check(call, torch.randn(3, 4, dtype=DT))


@pytest.mark.parametrize("make", [
    lambda: nn.ConstantPad1d((1, 2), 0.7), lambda: nn.ZeroPad1d(2),
    lambda: nn.ReflectionPad1d(2), lambda: nn.ReplicationPad1d((0, 3)),
    lambda: nn.CircularPad1d(1), lambda: nn.ConstantPad2d((1, 0, 2, 1), -1.5)])
def test_padding_modules_take_the_pad_rule(make):
    """Padding modules (leaves of the trace) have the rule of ``F.pad``; they fell back to
    nested forward AD (correct, but ``O(2^order)``)."""
    pad = make()
    jet_engine._WARNED_OPS.discard(type(pad).__name__)
    two_d = isinstance(pad, nn.ConstantPad2d)
    dims = (1, 2, 3) if two_d else (1, 2)
    check(lambda z: torch.tanh(pad(z.unsqueeze(1))).pow(2).sum(dims),
          torch.randn(3, 4, 5, dtype=DT) if two_d else torch.randn(3, 4, dtype=DT))


def test_layer_norm():
    ln = nn.LayerNorm(6).double()
    nn.init.normal_(ln.weight)
    nn.init.normal_(ln.bias)
    f = lambda x: ln(x).pow(3).sum(-1)  # noqa: E731
    ref = lambda x: (manual_layer_norm(x) * ln.weight + ln.bias).pow(3).sum(-1)  # noqa: E731
    check(f, torch.randn(3, 6, dtype=DT), ref_f=ref)


def test_embedding_is_constant():
    emb, lin = nn.Embedding(10, 4).double(), nn.Linear(4, 1).double()
    positions = torch.tensor([1, 7, 3])  # [T]: broadcasts over the batch
    check(lambda x: lin(torch.tanh(x + emb(positions))).sum((1, 2)), torch.randn(2, 3, 4, dtype=DT))
    ids = torch.tensor([1, 7])
    # integer inputs carry no direction: every order above 0 vanishes
    f = lambda t: lin(emb(t)).squeeze(-1)  # noqa: E731
    c = tk.jet(f, ids, torch.zeros(2, 3, dtype=torch.int64), 3)
    assert torch.equal(c[1:], torch.zeros_like(c[1:]))
    torch.testing.assert_close(c[0], f(ids).unsqueeze(1).expand(2, 3))


@pytest.mark.parametrize("mode", ["plain", "causal", "bool_mask", "float_mask"])
def test_scaled_dot_product_attention(mode):
    lin = nn.Linear(4, 12).double()
    mask = torch.rand(5, 5) > 0.3
    mask.fill_diagonal_(True)
    kwargs = {"plain": {}, "causal": {"is_causal": True}, "bool_mask": {"attn_mask": mask},
              "float_mask": {"attn_mask": torch.randn(5, 5, dtype=DT)}}[mode]

    def f(x):
        q, k, v = lin(x).view(x.shape[0], 5, 2, 6).transpose(1, 2).chunk(3, dim=-1)
        return F.scaled_dot_product_attention(q, k, v, **kwargs).sum((1, 2, 3))
    check(f, torch.randn(2, 5, 4, dtype=DT), order=6)


def test_transformer_block_with_target():
    blk = Block(8, 2, classes=3, mlp_ratio=2).double().eval()
    ref = for_nested_jvp(blk)
    target = torch.tensor([0, 2])
    check(blk, torch.randn(2, 5, 8, dtype=DT), order=6, target=target,
          ref_f=lambda z: ref(z).gather(1, target.repeat_interleave(2)[:, None]).squeeze(1))


def test_lambda_wrapping_a_model_and_custom_module():
    class Inner(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 4, dtype=DT))

        def forward(self, x):
            return torch.tanh(x @ self.w)

    inner = Inner()
    model = nn.Sequential(inner, nn.Linear(4, 2).double())
    check(lambda x: model(x)[:, 1], torch.randn(3, 4, dtype=DT))


def test_fallback_warns_once_and_is_exact():
    lin = nn.Linear(3, 3).double()
    f = lambda x: torch.atan(lin(x)).sum(-1)  # noqa: E731  (no jet rule for atan)
    jet_engine._WARNED_OPS.discard("atan")
    x, V = torch.randn(2, 3, dtype=DT), torch.randn(2, 2, 3, dtype=DT)
    with pytest.warns(RuntimeWarning, match="atan"):
        got = tk.jet(f, x, V, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = tk.jet(f, x, V, 4)
    want = reference_jet(f, x, V, 4)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(again, want, rtol=1e-10, atol=1e-10)


def test_untraceable_function_falls_back_whole():
    def f(x):  # data-dependent control flow: torch.fx cannot trace it
        return torch.tanh(x).sum(-1) if float(x.sum()) > -1e9 else x.sum(-1)
    jet_engine._WARNED_OPS.discard("f")
    x, V = torch.randn(2, 3, dtype=DT), torch.randn(2, 2, 3, dtype=DT)
    with pytest.warns(RuntimeWarning, match="could not trace"):
        got = tk.jet(f, x, V, 3)
    torch.testing.assert_close(got, reference_jet(f, x, V, 3), rtol=1e-10, atol=1e-10)


class Untraceable(nn.Module):
    def forward(self, x):  # data-dependent control flow: this module cannot be traced
        return torch.atan(x) if float(x.sum()) > -1e9 else x


def test_untraceable_child_module_falls_back_alone():
    model = nn.Sequential(nn.Linear(3, 3), Untraceable(), nn.Tanh(), nn.Linear(3, 1),
                          nn.Flatten(0)).double()
    jet_engine._WARNED_OPS.discard("Untraceable")
    x, V = torch.randn(2, 3, dtype=DT), torch.randn(2, 2, 3, dtype=DT)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = tk.jet(model, x, V, 3)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "Untraceable" in messages[0], messages
    torch.testing.assert_close(got, reference_jet(model, x, V, 3), rtol=1e-10, atol=1e-10)


class _DictOutput(nn.Module):
    """An untraceable child returning a mapping (a ModelOutput), read as ``out[1]``-style
    entries by the traced parent, as BERT's pooler output is (``outputs[1]``)."""

    def forward(self, x):
        h = torch.tanh(x) if float(x.sum()) > -1e9 else x
        return {"hidden": h, "pooled": torch.sin(h)}


class _ReadsEntries(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner, self.head = _DictOutput(), nn.Linear(3, 1)

    def forward(self, x):
        out = self.inner(x)
        return self.head(out["pooled"] * out["hidden"]).squeeze(-1)


def test_entries_of_a_fallback_modules_mapping_output():
    """Indexing a container of jets (an untraceable child's mapping output) went to the
    per-coefficient rule, which found no jet at its top level: StopIteration (BERT's
    ``outputs[1]``)."""
    model = _ReadsEntries().double()
    jet_engine._WARNED_OPS.discard("_DictOutput")
    x, V = torch.randn(2, 3, dtype=DT), torch.randn(2, 2, 3, dtype=DT)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the child's fallback notice
        got = tk.jet(model, x, V, 3)
    torch.testing.assert_close(got, reference_jet(model, x, V, 3), rtol=1e-10, atol=1e-10)


class _DictModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3))

    def forward(self, z):
        return {"aux": z.sum(-1), "logits": self.net(z)}


def test_structured_outputs_read_like_model_output():
    """A forward returning a mapping (a ModelOutput) raised "Could not infer dtype"; its
    "logits" are read, as integrated_gradients reads them."""
    model = _DictModel().double()
    x, V = torch.randn(2, 3, dtype=DT), torch.randn(2, 2, 3, dtype=DT)
    got = tk.jet(model, x, V, 3, target=1)
    want = tk.jet(lambda z: model(z)["logits"], x, V, 3, target=1)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="must return a tensor"):
        tk.jet(lambda z: {"a": 1}, x, V, 2, fallback=True)


@pytest.mark.parametrize("p", [-2, -3, -2.0, 3, 1.5])
def test_power_of_negative_values(p):
    """Integer exponents below -1 went through exp(p log a): NaN for a < 0 at every order."""
    lin = nn.Linear(4, 3).double()
    shift = 3.0 if p == 1.5 else -3.0  # 1.5: positive bases only (torch is NaN below 0)
    check(lambda x: (lin(x) + shift).pow(p).sum(-1), 0.3 * torch.randn(3, 4, dtype=DT),
          order=4)


def test_reverse_mode_through_the_jet():
    # d c_2 / dx = D^3 f[v, v, .] / 2 and d c_2 / dv = D^2 f[v, .]: HVPs and IG-by-order shares
    m = mlp(nn.GELU())
    x = torch.randn(2, 5, dtype=DT, requires_grad=True)
    V = torch.randn(2, 2, 5, dtype=DT, requires_grad=True)
    got = torch.autograd.grad(tk.jet(m, x, V, 3)[2].sum(), (x, V))
    want = torch.autograd.grad(reference_jet(m, x, V, 3)[2].sum(), (x, V))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)


def test_mixed_partials_match_hessian_and_third_derivatives():
    m, x = mlp(nn.Tanh()), torch.randn(2, 5, dtype=DT)
    sets = [(0, 1), (2, 2), (4,), (0, 1, 2), (3, 3, 1), (0, 1, 2, 3)]
    got = tk.mixed_partials(m, x, sets)
    g = lambda z: m(z.unsqueeze(0)).squeeze(0)  # noqa: E731
    for b in range(2):
        H = torch.func.hessian(g)(x[b])
        T3 = torch.func.jacfwd(torch.func.hessian(g))(x[b])
        T4 = torch.func.jacfwd(torch.func.jacfwd(torch.func.hessian(g)))(x[b])
        want = [H[0, 1], H[2, 2], torch.func.grad(g)(x[b])[4], T3[0, 1, 2], T3[3, 3, 1],
                T4[0, 1, 2, 3]]
        torch.testing.assert_close(got[b], torch.stack(want), rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("call, err", [
    (lambda m, x: tk.jet(m, x, torch.randn(2, 2, 4, dtype=DT), 2), ValueError),
    (lambda m, x: tk.jet(m, x, torch.randn(2, 2, 5, dtype=DT), 16), ValueError),
    (lambda m, x: tk.jet(m, x, torch.randn(2, 2, 5, dtype=DT), 1.5), ValueError),
    (lambda m, x: tk.jet(lambda z: torch.stack([m(z), m(z)], 1), x,
                         torch.randn(2, 1, 5, dtype=DT), 2), ValueError),
    (lambda m, x: tk.mixed_partials(m, x, [(0, 1, 2, 3, 4)]), ValueError),
    (lambda m, x: tk.mixed_partials(m, x, [(0, 9)]), ValueError),
    (lambda m, x: tk.mixed_partials(m, x, []), ValueError),
    (lambda m, x: tk.jet(m, x, torch.randn(2, 0, 5, dtype=DT), 2), ValueError),
    (lambda m, x: tk.jet(m, x * float("nan"), torch.randn(2, 1, 5, dtype=DT), 2), ValueError),
    (lambda m, x: tk.jet(m, x, torch.full((2, 1, 5), float("inf"), dtype=DT), 2), ValueError),
    (lambda m, x: tk.hessian(lambda z: m(z), x, index=[]), ValueError),
])
def test_errors(call, err):
    with pytest.raises(err):
        call(mlp(nn.Tanh()), torch.randn(2, 5, dtype=DT))


def test_bench_family_smoke():
    from taylor_kernels.benchmarks import cases_jet
    result = cases_jet.run("smoke", torch.device("cpu"), log=lambda msg: None)
    rows = result["directional"] + result["unary"]
    assert rows and all("error" not in r for r in rows)
    assert all(r["rel_diff"] < 1e-4 for r in result["directional"])
    assert all(r["rel_err"] < 1e-5 for r in result["unary"])
    assert len(cases_jet.tables(result)) == (2 if result["unary"] else 1)


class Switchable(nn.Module):
    """tanh MLP whose forward branches on a Python flag and reads a scale from a config."""

    def __init__(self):
        super().__init__()
        self.l = nn.Linear(3, 4)
        self.head = nn.Linear(4, 2)
        self.flag = True
        self.config = type("Config", (), {})()
        self.config.scale = 1.0

    def forward(self, x):
        h = torch.tanh(self.l(x)) * self.config.scale * (1.5 if self.training else 1.0)
        return self.head(h if self.flag else torch.sin(h))


def _fresh_jet(model, x, V):
    """The jet of a model traced anew (no cache), to compare a cached call with."""
    return tk.jet(model, x, V, 3, target=1, cache=False)


@pytest.mark.parametrize("change", ["head", "flag", "parameter", "config", "mode", "hook"])
def test_trace_cache_sees_model_changes(change):
    torch.manual_seed(0)
    model = Switchable().double()
    x, V = torch.randn(2, 3, dtype=torch.float64), torch.randn(2, 2, 3, dtype=torch.float64)
    before = tk.jet(model, x, V, 3, target=1)
    if change == "head":
        model.head = nn.Linear(4, 2).double()
    elif change == "flag":
        model.flag = False
    elif change == "parameter":
        model.l.weight = nn.Parameter(torch.randn(4, 3, dtype=torch.float64))
    elif change == "config":
        model.config.scale = 2.0
    elif change == "mode":  # forward reads self.training
        model.eval()
    else:
        model.head.register_forward_hook(lambda m, a, out: out * 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # hooked modules: nested jvp
        after = tk.jet(model, x, V, 3, target=1)
    torch.testing.assert_close(after, _fresh_jet(model, x, V))
    with torch.no_grad():
        torch.testing.assert_close(after[0, :, 0], model(x)[:, 1])
    assert (after - before).abs().max() > 1e-3


def test_trace_cache_sees_function_globals_and_taylor_decomposition():
    torch.manual_seed(0)
    model = Switchable().double()
    x = torch.randn(2, 3, dtype=torch.float64)
    td1 = tk.taylor_decomposition(model, x, target=1, order=3)
    model.head = nn.Linear(4, 2).double()
    td2 = tk.taylor_decomposition(model, x, target=1, order=3)
    with torch.no_grad():
        torch.testing.assert_close(td2.fx, model(x)[:, 1])
        torch.testing.assert_close(td2.fb, model(torch.zeros_like(x))[:, 1])
    assert (td1.order_totals - td2.order_totals).abs().max() > 1e-3
    f = _global_switch
    V = torch.randn(2, 1, 3, dtype=torch.float64)
    a = tk.jet(f, x, V, 2)
    globals()["SWITCH"] = False
    try:
        b = tk.jet(f, x, V, 2)
    finally:
        globals()["SWITCH"] = True
    torch.testing.assert_close(b[0, :, 0], _global_switch(x, False))
    assert (a - b).abs().max() > 1e-3


SCALE = 1.0


class ReadsState(nn.Module):
    """A forward reading a module-level constant and a dict attribute: state the trace key
    cannot see."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.cfg = {"shift": 0.0}

    def forward(self, x):
        return torch.tanh(SCALE * self.lin(x) + self.cfg["shift"])


def test_a_stale_trace_is_caught_by_the_value_and_traced_again():
    """A cached trace returned the old function's coefficients (c0 -0.29 where the model
    gave -0.71) after such state changed; the cached graph's value at row 0 is now checked
    against a real forward, and the call traces again."""
    global SCALE
    torch.manual_seed(0)
    model = ReadsState().double().eval()
    x, V = torch.randn(2, 3, dtype=torch.float64), torch.randn(2, 2, 3, dtype=torch.float64)
    first = tk.jet(model, x, V, 3, target=1)
    try:
        for change in (lambda: globals().update(SCALE=3.0),
                       lambda: model.cfg.update(shift=0.5)):
            change()
            got = tk.jet(model, x, V, 3, target=[1, 0])  # every target form is checked
            torch.testing.assert_close(got, tk.jet(model, x, V, 3, target=[1, 0], cache=False),
                                       rtol=1e-12, atol=1e-12)
            got = tk.jet(model, x, V, 3, target=1)
            with torch.no_grad():
                torch.testing.assert_close(got[0, :, 0], model(x)[:, 1])
            assert (got - first).abs().max() > 0.1
    finally:
        SCALE = 1.0


SWITCH = True


def _global_switch(x, switch=None):
    on = SWITCH if switch is None else switch
    return torch.tanh(x).sum(1) if on else torch.sin(x).sum(1)


def test_data_dependent_branch_is_not_traced():
    def branchy(x):
        return torch.tanh(x).sum(1) if bool(x.sum() > 0) else torch.sin(x).sum(1)

    V = torch.ones(1, 1, 3, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for sign in (1.0, -1.0):
            x = sign * torch.ones(1, 3, dtype=torch.float64)
            torch.testing.assert_close(tk.jet(branchy, x, V, 2)[0, :, 0], branchy(x))


class _MHANoWeights(nn.Module):
    def __init__(self):
        super().__init__()
        self.att = nn.MultiheadAttention(4, 1, batch_first=True)

    def forward(self, z):
        t = z.reshape(-1, 2, 2).repeat(1, 1, 2)
        return self.att(t, t, t, need_weights=False)[0].sum((1, 2))


STRUCTURED = {
    "max_values": lambda z: z.max(1).values,
    "sort_values": lambda z: torch.sort(z, 1).values[:, 0] * z[:, 1],
    "where_mask": lambda z: torch.where(z > 0, z, 0.1 * z).pow(2).sum(1),
    "times_mask": lambda z: (z * (z > 0)).pow(2).sum(1),
    "argmax_gather": lambda z: z.gather(1, z.argmax(1, keepdim=True)).squeeze(1) * z.sum(1),
    "mha_no_weights": "mha",
}


@pytest.mark.parametrize("name", STRUCTURED)
def test_named_tuples_masks_and_none_outputs(name):
    """Ops returning named tuples (.values), comparisons used as masks (constants of the
    values) and modules returning None beside tensors: traced jets equal nested forward AD."""
    torch.manual_seed(0)
    f = _MHANoWeights().double().eval() if STRUCTURED[name] == "mha" else STRUCTURED[name]
    x, v = torch.randn(3, 4, dtype=DT), torch.randn(3, 2, 4, dtype=DT)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # per-op fallbacks say so
        got = tk.jet(f, x, v, 3)
    torch.testing.assert_close(got, reference_jet(f, x, v, 3), rtol=1e-10, atol=1e-10)


def test_hugging_face_model_through_a_jet():
    """A GPT-2 from transformers (ModelOutput, cache objects) inside the jet's function."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    g = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=1, n_embd=16, n_head=2, vocab_size=32)).eval().double()

    def f(z):
        return g(inputs_embeds=z.reshape(-1, 3, 16)).logits[:, -1, 0]

    x, v = torch.randn(2, 48, dtype=DT), torch.randn(2, 1, 48, dtype=DT)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = tk.jet(f, x, v, 2)
        whole = tk.jet(f, x, v, 2, fallback=True)
    torch.testing.assert_close(got, whole, rtol=1e-9, atol=1e-10)
    h = 1e-4  # second coefficient = v^T H v / 2, by central differences of f
    fd = (f(x + h * v[:, 0]) - 2 * f(x) + f(x - h * v[:, 0])) / (2 * h * h)
    torch.testing.assert_close(got[2, :, 0], fd.detach(), rtol=1e-4, atol=1e-6)


def test_jet_refuses_inference_mode_and_train_mode_dropout():
    model = nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.5), nn.Linear(3, 1))
    x, V = torch.randn(2, 3), torch.randn(2, 1, 3)
    with pytest.raises(ValueError, match="model.eval"):
        tk.jet(model, x, V, 2)
    model.eval()
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
        tk.jet(model, x, V, 2)


class _AttentionNoWeights(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        a, _ = self.attn(x, x, x, need_weights=False)  # (output, None)
        return self.head(a.mean(1))


def test_attention_returning_none_weights():
    """``a, _ = mha(..., need_weights=False)``: indexing the None raised in torch.stack."""
    torch.manual_seed(0)
    m = _AttentionNoWeights().double().eval()
    x, V = torch.randn(2, 3, 8, dtype=torch.float64), torch.randn(2, 2, 3, 8,
                                                                  dtype=torch.float64)
    torch.testing.assert_close(tk.jet(m, x, V, 3, target=1),
                               tk.jet(m, x, V, 3, target=1, fallback=True),
                               rtol=1e-10, atol=1e-12)


def test_a_random_model_inside_the_opt_in_keeps_other_traces():
    """Inside allow_row_coupling a train-mode dropout model's c0 differs from any forward:
    the stale-trace check must not run there (it cleared every model's cached trace)."""
    torch.manual_seed(0)
    keep = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double().eval()
    drop = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.Tanh(),
                         nn.Linear(4, 2)).double().train()
    x, V = torch.randn(2, 3, dtype=torch.float64), torch.randn(2, 1, 3, dtype=torch.float64)
    tk.jet(keep, x, V, 2, target=0)
    with tk.allow_row_coupling(drop):
        for _ in range(3):
            tk.jet(drop, x, V, 2, target=0)
    assert id(keep) in jet_engine._TRACES


@pytest.mark.parametrize("form", ["normalize", "vector_norm", "tensor_norm", "torch_norm",
                                  "std_var", "cosine", "normalize_small"])
def test_vector_norms_have_rules(form):
    """Sentence-embedding heads end in ``F.normalize`` and similarities: these ran by nested
    forward AD, whose reverse pass PyTorch cannot take (taylor_decomposition raised)."""
    lin = nn.Linear(4, 6).double()
    other = torch.randn(6, dtype=DT)
    forms = {
        "normalize": lambda h: F.normalize(h, dim=-1) @ other,
        "vector_norm": lambda h: torch.linalg.vector_norm(h, dim=-1),
        "tensor_norm": lambda h: h.norm(dim=1, keepdim=True).squeeze(1) + h.norm(p=2, dim=-1),
        "torch_norm": lambda h: torch.norm(h, dim=1),
        "std_var": lambda h: h.std(dim=-1) + torch.var(h, dim=1, unbiased=False)
        + h.var(-1, correction=0),
        "cosine": lambda h: F.cosine_similarity(h, torch.tanh(h) + other, dim=1),
        "normalize_small": lambda h: F.normalize(1e-14 * h, dim=-1, eps=1e-12) @ other,
    }
    f = lambda x: forms[form](lin(x))  # noqa: E731
    check(f, torch.randn(3, 4, dtype=DT), order=4)


def test_taylor_decomposition_through_a_normalized_embedding():
    torch.manual_seed(0)
    lin = nn.Linear(4, 6).double()
    other = torch.randn(6, dtype=DT)
    f = lambda x: F.normalize(torch.tanh(lin(x)), dim=-1) @ other  # noqa: E731
    x = torch.randn(2, 4, dtype=DT)
    dec = tk.taylor_decomposition(f, x, order=3)
    assert torch.isfinite(dec.ig_by_order).all()


def test_norm_rules_fall_back_where_they_do_not_hold():
    """A norm or a standard deviation that is 0 somewhere (sqrt has no series there: NaN;
    torch takes the derivative as 0), and cosine_similarity of inputs that broadcast (torch
    broadcasts before the norms) run by the exact fallback."""
    lin = nn.Linear(4, 6, bias=False).double()
    q = torch.randn(6, dtype=DT)
    x = torch.zeros(2, 4, dtype=DT)
    x[1] = torch.randn(4, dtype=DT)
    V = torch.randn(2, 1, 4, dtype=DT)
    for f in (lambda z: torch.linalg.vector_norm(lin(z), dim=-1),
              lambda z: lin(z).std(dim=-1),
              lambda z: F.cosine_similarity(q, torch.tanh(lin(z)) + 0.1, dim=-1),
              lambda z: F.cosine_similarity(lin(z)[:, :1], torch.tanh(lin(z)) + 0.1, dim=1)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the fallback's note
            got = tk.jet(f, x, V, 3)
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, reference_jet(f, x, V, 3), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("mask_kind", ["bool", "float"])
def test_attention_with_a_query_row_that_sees_no_key(mask_kind):
    """Left padding under a causal mask leaves a query row with no allowed key: torch's SDPA
    gives it 0; the jet's softmax over only -inf made every coefficient of every row NaN."""
    lin = nn.Linear(4, 12).double()
    allowed = torch.ones(5, 5, dtype=torch.bool).tril()
    allowed[:, 0] = False  # the padded first key
    mask = allowed if mask_kind == "bool" else torch.zeros(5, 5, dtype=DT).masked_fill(
        ~allowed, float("-inf"))

    def f(x):
        q, k, v = lin(x).view(x.shape[0], 5, 2, 6).transpose(1, 2).chunk(3, dim=-1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).sum((1, 2, 3))
    check(f, torch.randn(2, 5, 4, dtype=DT), order=4)


def test_softmax_in_the_dtype_it_is_asked_for():
    """HF's eager attention: ``softmax(w, -1, dtype=torch.float32)`` in a float64 model runs in
    float32 as the model does (the rule ran it in float64, another function)."""
    lin = nn.Linear(4, 5).double()

    def f(x, dtype=torch.float32):
        return (F.softmax(lin(x), dim=-1, dtype=dtype).to(DT) * torch.arange(5.0, dtype=DT)
                ).sum(-1) + torch.log_softmax(lin(x), -1, dtype=dtype).to(DT)[:, 1]
    x = torch.randn(3, 4, dtype=DT)
    V = torch.randn(3, 2, 4, dtype=DT)
    got = tk.jet(f, x, V, 3)
    torch.testing.assert_close(got, reference_jet(f, x, V, 3), rtol=2e-5, atol=2e-6)
    in_float64 = tk.jet(lambda z: f(z, DT), x, V, 3)
    assert (got - in_float64).abs().max() > 1e-12


def test_sub_alpha_rsub_and_constants_of_higher_rank():
    """``torch.sub(x, y, alpha=)`` raised a TypeError, a constant of higher rank than the
    activation (``x * W`` with ``W [3, 1, E]``) broadcast against the order axis."""
    W = torch.rand(3, 1, 4, dtype=DT) + 0.5
    lin = nn.Linear(4, 4).double()

    def f(x):
        h = torch.tanh(lin(x))                                     # [B, 4]
        a = torch.sub(h, h * h, alpha=2) + h.sub(h, alpha=0.5) + torch.rsub(h, 1.0, alpha=3)
        b = (h * W).sum(0) + (h / W).sum(0) + (h + W).sum(0) + (W - h).sum(0)   # [B, 4]
        return (a + b).sum(-1)
    check(f, torch.randn(2, 4, dtype=DT), order=4)


def test_running_out_of_memory_in_a_rule_is_not_a_missing_rule(monkeypatch):
    """A rule's own TypeError / RuntimeError falls back to the exact nested jvp, but running
    out of memory is the caller's to see (it was retried by the costlier fallback)."""
    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("out of memory (simulated)")
    monkeypatch.setitem(jet_engine.rules.FUNCTION_RULES, torch.tanh, oom)
    with pytest.raises(torch.OutOfMemoryError):
        tk.jet(lambda x: torch.tanh(x).sum(-1), torch.randn(2, 3, dtype=DT),
               torch.randn(2, 3, dtype=DT), 2, cache=False)


def test_an_output_of_more_dims_is_named_in_the_users_shape():
    """The message gave the internal B * M rows: (8, 2, 3) for a batch of 2."""
    net = nn.Linear(4, 6).to(DT)
    with pytest.raises(ValueError, match=r"returned \(2, 2, 3\).*model\(z\)\[:, i, j\]"):
        tk.jet(lambda z: net(z).reshape(-1, 2, 3), torch.randn(2, 4, dtype=DT),
               torch.randn(2, 4, 4, dtype=DT), 2)


_W = torch.randn(6, 6, dtype=DT, generator=torch.Generator().manual_seed(3))


def _transposed_attention(z):  # q @ q.mT: .mT read off the value dropped its derivatives
    q = torch.tanh(z @ _W).reshape(z.shape[0], 2, 3)
    return (q @ q.mT).sum((1, 2)) + (z @ _W).T.T.sum(-1)


@pytest.mark.parametrize("f", [_transposed_attention])
def test_tensor_attributes_carry_their_derivatives(f):
    check(f, torch.randn(3, 6, dtype=DT))


def _mul_in_place(z):
    h = torch.tanh(z @ _W) * 1.0
    h.mul_(2)
    return (h ** 3).sum(-1)


def _relu_statement(z):
    h = z @ _W
    F.relu(h, inplace=True)  # its result unused: h changed
    return (h ** 3).sum(-1)


def _alias_then_add(z):
    h = torch.tanh(z @ _W) * 1.0
    g = h
    h += 1.0  # g changes too (the trace sees h = h + 1)
    return (g * g * h).sum(-1)


@pytest.mark.parametrize("f", [_mul_in_place, _relu_statement, _alias_then_add])
def test_in_place_changes_read_again_fall_back_exactly(f):
    """In-place ops on a tensor that is read again: the rules' new values hid the change
    (c1 half the reference, even c0 wrong); the whole function now runs nested, warned."""
    x = torch.randn(2, 6, dtype=DT)
    V = torch.randn(2, 1, 6, dtype=DT)
    jet_engine._WARNED_OPS.clear()
    with pytest.warns(RuntimeWarning, match="in-place|does not give f"):
        got = tk.jet(f, x, V, 3)
    torch.testing.assert_close(got, reference_jet(f, x, V, 3), rtol=1e-10, atol=1e-10)


def test_an_in_place_activation_nothing_reads_again_keeps_its_rule():
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(inplace=True), nn.Linear(7, 1),
                          nn.Flatten(0)).double()
    check(model, torch.randn(3, 5, dtype=DT))


class _PoolWithIndices(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.pool = nn.Conv1d(1, 2, 3), nn.MaxPool1d(2, return_indices=True)

    def forward(self, z):
        out, _ = self.pool(torch.tanh(self.conv(z.unsqueeze(1))))  # (the pair was unpacked
        return out.sum((1, 2))  # along the batch: rows 0 and 1)


def _constant_first(z):  # F.linear(constant, jet): the rule read the constant's .c
    return F.linear(_W[:2], torch.tanh(z @ _W)).sum(0)


@pytest.mark.parametrize("f", [_PoolWithIndices().double(), _constant_first])
def test_forms_without_a_rule_fall_back_exactly(f):
    x = torch.randn(3, 6, dtype=DT)
    V = torch.randn(3, 2, 6, dtype=DT)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (the fallback warns)
        got = tk.jet(f, x, V, 3)
    torch.testing.assert_close(got, reference_jet(f, x, V, 3), rtol=1e-10, atol=1e-10)


_HEADS = torch.randn(3, 1, 4, 2, dtype=DT, generator=torch.Generator().manual_seed(4))


def _per_head_weights(z):  # [B, 2, 4] @ W[H, 1, 4, 2]: H met the order axis when H = J + 1
    h = torch.tanh(z.reshape(z.shape[0], 2, 4))
    return (h @ _HEADS).sum(0).flatten(1).pow(3).sum(-1) + (_HEADS[0, 0].T @ h.mT).sum((1, 2))


@pytest.mark.parametrize("order", [1, 2, 3])
def test_matmul_with_constants_of_more_batch_dimensions(order):
    check(_per_head_weights, torch.randn(2, 8, dtype=DT), order=order)


def _held_by_no_grad(z):  # a normaliser the author holds constant
    h = z @ _W
    with torch.no_grad():
        s = h.sum(-1, keepdim=True)
    return (h * s).pow(2).sum(-1)


def test_a_no_grad_block_in_the_forward_is_a_constant_as_in_reverse_mode():
    """FX keeps no trace of the block: jets propagated through it (a mixed partial 141.6
    where the Hessian entry is 30.8); a call under an outer no_grad still differentiates."""
    x = torch.randn(2, 6, dtype=DT)
    hess = tk.hessian(_held_by_no_grad, x)
    got = tk.mixed_partials(_held_by_no_grad, x, [(0, 1), (2, 2)])
    torch.testing.assert_close(got, torch.stack([hess[:, 0, 1], hess[:, 2, 2]], 1))
    cube = lambda z: (z @ _W).pow(3).sum(-1)  # noqa: E731
    with torch.no_grad():
        got = tk.mixed_partials(cube, x, [(0, 1)])
    torch.testing.assert_close(got[:, 0], tk.hessian(cube, x)[:, 0, 1])


def _held_then_in_place(z):  # _held_by_no_grad, with an in-place op read again: nested fallback
    h = z @ _W
    with torch.no_grad():
        s = h.sum(-1, keepdim=True)
        first = h[:, :1]  # a view made in the block (its tangent came from h's when read)
    g = h * 1.0
    g.mul_(2)
    return (h * s).pow(2).sum(-1) + g.pow(3).sum(-1) + (first * h).pow(2).sum(-1)


def test_a_no_grad_block_stays_a_constant_in_the_nested_fallback():
    """The whole-function fallback (nested ``torch.func.jvp``) let tangents through the
    block; it matches the traced jet of the same function written out of place."""
    def out_of_place(z):
        h = z @ _W
        s, first = h.sum(-1, keepdim=True).detach(), h[:, :1].detach()
        return (h * s).pow(2).sum(-1) + (2 * h).pow(3).sum(-1) + (first * h).pow(2).sum(-1)

    x = torch.randn(2, 6, dtype=DT)
    V = torch.randn(2, 1, 6, dtype=DT)
    jet_engine._WARNED_OPS.clear()
    with pytest.warns(RuntimeWarning, match="in-place|does not give f"):
        got = tk.jet(_held_then_in_place, x, V, 3)
    torch.testing.assert_close(got, tk.jet(out_of_place, x, V, 3), rtol=1e-10, atol=1e-10)


def test_max_memory_runs_the_directions_in_passes_with_the_same_numbers(monkeypatch):
    """``jet`` and ``mixed_partials`` took every direction in one pass (``mixed_partials``
    over all D(D-1)/2 pairs: gigabytes); under ``max_memory`` they run in passes (frozen
    weights: no graph kept, see the next test)."""
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    model.requires_grad_(False)
    x = torch.randn(3, 8, dtype=DT)
    V = torch.randn(3, 40, 8, dtype=DT)
    sets = [(i, j) for i in range(8) for j in range(i + 1, 8)] + [(0, 1, 2), (3, 3, 4, 5), (6,)]
    whole_jet = tk.jet(model, x, V, 3, target=1)
    whole_sets = tk.mixed_partials(model, x, sets, target=1)
    passes = []
    run = jet_engine._run_traced
    monkeypatch.setattr(jet_engine, "_run_traced",
                        lambda *a, **k: passes.append(1) or run(*a, **k))
    torch.testing.assert_close(tk.jet(model, x, V, 3, target=1, max_memory="40KB"), whole_jet,
                               rtol=1e-12, atol=1e-12)
    assert len(passes) > 2
    passes.clear()
    torch.testing.assert_close(tk.mixed_partials(model, x, sets, target=1, max_memory="30KB"),
                               whole_sets, rtol=1e-12, atol=1e-12)
    assert len(passes) > 3
    with pytest.raises(MemoryError, match="too small for one direction"):
        tk.mixed_partials(model, x, sets, target=1, max_memory=100)


def test_max_memory_counts_the_graphs_a_differentiable_result_keeps():
    """With grad on and parameters requiring grad every pass's graph stays for the caller's
    backward, which passes did not bound (all pairs of 128 features of an MLP kept 2.8 GB
    under a 16 MB budget). Such a call now raises once the kept graphs would pass the budget;
    under no_grad, or with room for the graphs, it runs with the same numbers."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 2)).double()
    x = torch.randn(3, 16, dtype=DT)
    V = torch.randn(3, 64, 16, dtype=DT)
    sets = [(i, j) for i in range(16) for j in range(i + 1, 16)]
    with torch.no_grad():
        want_jet = tk.jet(model, x, V, 2, target=1)
        want_sets = tk.mixed_partials(model, x, sets, target=1)
        torch.testing.assert_close(tk.jet(model, x, V, 2, target=1, max_memory="64KB"),
                                   want_jet, rtol=1e-12, atol=1e-12)
    for call in (lambda mm: tk.jet(model, x, V, 2, target=1, max_memory=mm),
                 lambda mm: tk.mixed_partials(model, x, sets, target=1, max_memory=mm)):
        with pytest.raises(MemoryError, match="graphs the jet passes keep"):
            call("64KB")
    got = tk.mixed_partials(model, x, sets, target=1, max_memory="64MB")
    assert got.requires_grad
    torch.testing.assert_close(got.detach(), want_sets, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(tk.jet(model, x, V, 2, target=1, max_memory="64MB").detach(),
                               want_jet, rtol=1e-12, atol=1e-12)


def test_a_model_that_is_not_finite_at_finite_points_raises_as_the_hessian_does():
    """jet and mixed_partials returned NaN coefficients silently where tk.hessian and IG
    raise FloatingPointError (sqrt of a negative number)."""
    def f(z):
        return torch.sqrt(z[:, 0] - 5.0) * z[:, 1] ** 2

    x = torch.tensor([[1.0, 2.0]], dtype=torch.float64)
    with pytest.raises(FloatingPointError, match="non-finite Taylor coefficients"):
        tk.jet(f, x, torch.ones_like(x), 2)
    with pytest.raises(FloatingPointError, match="non-finite Taylor coefficients"):
        tk.mixed_partials(f, x, [(0, 1)])
    with pytest.raises(FloatingPointError):
        tk.hessian(f, x)
    ok = x + 6.0  # finite there: the same calls return
    assert torch.isfinite(tk.mixed_partials(f, ok, [(0, 1), (1, 1)])).all()


def test_mixed_partials_of_an_empty_batch_is_a_clear_error():
    """It raised IndexError: index 0 is out of bounds (tk.jet gives a ValueError)."""
    with pytest.raises(ValueError, match="at least one row"):
        tk.mixed_partials(lambda z: z.sum(1), torch.zeros(0, 4), [(0, 1)])


def test_trace_cache_sees_a_bound_methods_object_inside_allow_row_coupling():
    """A kept bound method of a plain object (an explainer reading ``self.temperature``):
    the key held the model, not the object's attributes, and inside allow_row_coupling (no
    value check) jet and mixed_partials returned the old function's coefficients."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).double().eval()

    class Explainer:
        def __init__(self):
            self.model, self.temperature = model, 1.0

        def forward(self, x):
            return self.model(x) / self.temperature

    explainer = Explainer()
    f = explainer.forward
    x, V = torch.randn(4, 6, dtype=torch.float64), torch.randn(4, 2, 6, dtype=torch.float64)
    with tk.allow_row_coupling(model):
        first = tk.jet(f, x, V, 2, target=1)
        mixed = tk.mixed_partials(f, x, [0, 1], target=1)
        explainer.temperature = 2.0
        torch.testing.assert_close(tk.jet(f, x, V, 2, target=1), first / 2)
        torch.testing.assert_close(tk.mixed_partials(f, x, [0, 1], target=1), mixed / 2)
