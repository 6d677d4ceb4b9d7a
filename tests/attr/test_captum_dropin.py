"""taylor_kernels.captum against captum.attr: the same calls, the same answers (float64 models).

Every comparison runs one case through Captum and through our drop-in with identical
arguments (and, for the sampled methods, identical torch / numpy seeds) and asserts a maximum
relative difference below 1e-5 (``max|ours - captum| / max|captum|``).
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from captum import attr as ca
from torch import nn

import taylor_kernels.captum as tc
from tests import models

RULES = ["riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid",
         "gausslegendre"]
F64 = torch.float64
RTOL = 1e-5


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # Captum's no-grad / batch-size notes
        yield


def _leaves(value) -> list:
    """The tensors of a tensor / tuple / list, nested containers checked for equal types."""
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _leaves(v)]
    return [value]


def rel(ours, ref) -> float:
    """max |ours - ref| / max |ref| over a tensor or (nested) tuples/lists of tensors (the
    same structure and shapes)."""
    if isinstance(ref, (tuple, list)):
        assert type(ours) is type(ref) and len(ours) == len(ref)
        for o, r in zip(ours, ref):
            assert type(o) is type(r)
    ours, ref = _leaves(ours), _leaves(ref)
    assert len(ours) == len(ref)
    for o, r in zip(ours, ref):
        assert isinstance(o, torch.Tensor) and o.shape == r.shape and o.dtype == r.dtype, (
            type(o), getattr(o, "shape", None), r.shape)
    num = max((o - r).abs().max().item() for o, r in zip(ours, ref))
    den = max(r.abs().max().item() for r in ref)
    return num / den if den > 0 else num


def assert_same(ours, ref, delta=False):
    """Compare results, unpacking ``(attributions, delta)`` pairs when ``delta``."""
    if delta:
        (ours, od), (ref, rd) = ours, ref
        assert od.shape == rd.shape
        torch.testing.assert_close(od, rd, rtol=RTOL, atol=1e-7)
    assert type(ours) is type(ref)
    assert rel(ours, ref) < RTOL


class ThreeDimOutput(nn.Module):
    """Output ``[B, 2, 3]`` (targets are index tuples)."""

    def __init__(self):
        super().__init__()
        self.net = models.mlp(d_in=6, d_out=6)

    def forward(self, x):
        return self.net(x).reshape(-1, 2, 3)


class TokenModel(nn.Module):
    """Token ids ``[B, L]`` -> embedding -> tanh MLP -> ``[B, 3]``; a python ``scale`` arg."""

    def __init__(self, vocab=12, dim=5, length=6):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.lin = nn.Linear(dim * length, 8)
        self.out = nn.Linear(8, 3)

    def forward(self, ids, scale=1.0):
        return self.out(torch.tanh(self.lin(self.emb(ids).flatten(1))) * scale)


def setup(kind: str):
    """``(model, inputs, extra attribute kwargs)`` for a model kind (seeded)."""
    torch.manual_seed(1)
    if kind == "mlp":
        return models.mlp(d_out=4), torch.randn(5, 10, dtype=F64), {"target": [0, 1, 2, 3, 1]}
    if kind == "cnn":
        return models.cnn(), torch.randn(3, 2, 8, 8, dtype=F64), {"target": torch.tensor(
            [3, 0, 1])}
    if kind == "scalar":
        return models.mlp(d_out=1), torch.randn(4, 10, dtype=F64), {}
    if kind == "two":
        a, b = torch.randn(4, 5, dtype=F64), torch.randn(4, 2, 3, dtype=F64)
        scale = torch.rand(4, 1, dtype=F64) + 0.5
        return models.two_input_model(), (a, b), {"target": 2,
                                                   "additional_forward_args": (scale, False)}
    raise KeyError(kind)


# ---------------------------------------------------------------- IntegratedGradients


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("kind", ["mlp", "cnn", "scalar", "two"])
def test_ig_models_and_rules(kind, rule):
    model, x, kw = setup(kind)
    bl = tuple(0.1 * torch.randn_like(t) for t in x) if isinstance(x, tuple) else \
        0.1 * torch.randn_like(x)
    args = dict(baselines=bl, n_steps=7, method=rule, return_convergence_delta=True, **kw)
    ref = ca.IntegratedGradients(model).attribute(x, **args)
    ours = tc.IntegratedGradients(model).attribute(x, **args)
    assert_same(ours, ref, delta=True)


BASELINES = {
    "none": lambda x: None,
    "scalar": lambda x: 0.25,
    "batch": lambda x: torch.rand_like(x),
    "one_row": lambda x: torch.rand_like(x[:1]),
}


@pytest.mark.parametrize("tuple_io", [False, True])
@pytest.mark.parametrize("baseline", list(BASELINES))
def test_ig_baseline_forms_single_input(baseline, tuple_io):
    model, x, kw = setup("mlp")
    bl = BASELINES[baseline](x)
    inp, bl = ((x,), (bl,) if bl is not None else None) if tuple_io else (x, bl)
    args = dict(baselines=bl, n_steps=6, **kw)
    ref = ca.IntegratedGradients(model).attribute(inp, **args)
    ours = tc.IntegratedGradients(model).attribute(inp, **args)
    assert isinstance(ours, tuple) == tuple_io
    assert_same(ours, ref)


@pytest.mark.parametrize("baselines", [None, (0.1, -0.2), "mixed", "tensors"])
def test_ig_baseline_forms_tuple_input(baselines):
    model, (a, b), kw = setup("two")
    if baselines is None:  # beyond Captum: one number for every input of a tuple
        ours = tc.IntegratedGradients(model).attribute((a, b), 0.3, n_steps=6, **kw)
        assert_same(ours, tc.IntegratedGradients(model).attribute((a, b), (0.3, 0.3),
                                                                   n_steps=6, **kw))
    if baselines == "mixed":
        baselines = (torch.randn(1, 5, dtype=F64), 0.5)
    elif baselines == "tensors":
        baselines = (torch.randn(4, 5, dtype=F64), torch.randn(4, 2, 3, dtype=F64))
    args = dict(baselines=baselines, n_steps=6, return_convergence_delta=True, **kw)
    ref = ca.IntegratedGradients(model).attribute((a, b), **args)
    ours = tc.IntegratedGradients(model).attribute((a, b), **args)
    assert_same(ours, ref, delta=True)


@pytest.mark.parametrize("target", ["int", "scalar_tensor", "tensor", "list", "tuple",
                                    "tuple_list", "none"])
def test_ig_target_forms(target):
    torch.manual_seed(2)
    if target in ("tuple", "tuple_list"):
        model, x = ThreeDimOutput(), torch.randn(3, 6, dtype=F64)
        tgt = (1, 2) if target == "tuple" else [(0, 1), (1, 2), (1, 0)]
    elif target == "none":
        model, x, _ = setup("scalar")
        tgt = None
    else:
        model, x, _ = setup("mlp")
        tgt = {"int": 2, "scalar_tensor": torch.tensor(1), "tensor": torch.tensor([0, 1, 2, 3, 0]),
               "list": [3, 2, 1, 0, 3]}[target]
    args = dict(target=tgt, n_steps=5, return_convergence_delta=True)
    ref = ca.IntegratedGradients(model).attribute(x, **args)
    ours = tc.IntegratedGradients(model).attribute(x, **args)
    assert_same(ours, ref, delta=True)


class RowCounter(nn.Module):
    """Records the largest batch the wrapped model sees while gradients are enabled."""

    def __init__(self, model):
        super().__init__()
        self.model, self.max_rows = model, 0

    def forward(self, *args):
        if torch.is_grad_enabled():
            self.max_rows = max(self.max_rows, args[0].shape[0])
        return self.model(*args)


@pytest.mark.parametrize("ibs", [None, 1, 4, 7, 15, 1000, 4.5, np.int64(7)])
def test_ig_internal_batch_size(ibs):
    """Same numbers as Captum; never more than ``internal_batch_size`` rows per pass (Captum
    rounds to whole steps of all examples, at least B rows; we honour it exactly)."""
    model, x, kw = setup("cnn")
    args = dict(n_steps=5, internal_batch_size=ibs, return_convergence_delta=True, **kw)
    ref = ca.IntegratedGradients(model).attribute(x, **args)
    counter = RowCounter(model)
    ours = tc.IntegratedGradients(counter).attribute(x, **args)
    assert_same(ours, ref, delta=True)
    if ibs is not None:
        assert 1 <= counter.max_rows <= ibs


@pytest.mark.parametrize("ibs", [0, -3, np.int64(0), 0.5])
@pytest.mark.parametrize("cls", ["IntegratedGradients", "LayerIntegratedGradients",
                                 "LayerConductance", "InternalInfluence",
                                 "NeuronIntegratedGradients"])
def test_internal_batch_size_below_one_warns_and_uses_the_examples(cls, ibs):
    """As Captum: a warning with its message, then batches of the B examples (same numbers)."""
    model, x, kw = setup("cnn")
    layer_args = () if cls == "IntegratedGradients" else (model.c1,)
    call = dict(n_steps=5, internal_batch_size=ibs)
    call.update({"neuron_selector": (1, 2, 3)} if cls.startswith("Neuron") else kw)
    with pytest.warns(UserWarning, match="Defaulting to internal batch size of 3") as ours_w:
        ours = getattr(tc, cls)(model, *layer_args).attribute(x, **call)
    with warnings.catch_warnings(record=True) as ref_w:
        warnings.simplefilter("always")
        ref = getattr(ca, cls)(model, *layer_args).attribute(x, **call)
    assert any("Defaulting to internal batch size of 3" in str(w.message) for w in ref_w)
    assert len([w for w in ours_w if "internal batch size" in str(w.message)]) == 1
    assert_same(ours, ref)


@pytest.mark.parametrize("rule", ["riemann_trapezoid", "gausslegendre"])
@pytest.mark.parametrize("kind", ["mlp", "cnn", "two"])
def test_ig_multiply_by_inputs_false(kind, rule):
    """Integrated gradients without the (x - b) factor, also where x == b."""
    model, x, kw = setup(kind)
    tup = x if isinstance(x, tuple) else (x,)
    bl = tuple(torch.randn_like(t) for t in tup)
    for t, b in zip(tup, bl):
        t.reshape(t.shape[0], -1)[:, ::3] = b.reshape(b.shape[0], -1)[:, ::3]  # x == b here
    bl = bl if isinstance(x, tuple) else bl[0]
    args = dict(baselines=bl, n_steps=6, method=rule, internal_batch_size=5,
                return_convergence_delta=True, **kw)
    ref = ca.IntegratedGradients(model, multiply_by_inputs=False).attribute(x, **args)
    ig = tc.IntegratedGradients(model, multiply_by_inputs=False)
    ours = ig.attribute(x, **args)
    assert_same(ours, ref, delta=True)
    assert not ig.multiplies_by_inputs and ig.has_convergence_delta()
    attrs = ours[0] if isinstance(x, tuple) else (ours[0],)
    assert all(a.reshape(a.shape[0], -1)[:, ::3].abs().max() > 0 for a in attrs)


# ----------------------------------------------------------- LayerIntegratedGradients


@pytest.mark.parametrize("multiply", [True, False])
@pytest.mark.parametrize("where", ["embedding", "linear_input", "linear_output"])
def test_layer_ig_token_ids(where, multiply):
    torch.manual_seed(3)
    model = TokenModel().double()
    ids = torch.randint(1, 12, (4, 6))
    ids[:, :2] = 0  # tokens equal to the baseline token
    layer = model.emb if where == "embedding" else model.lin
    args = dict(baselines=0, target=[0, 1, 2, 0], additional_forward_args=2.0, n_steps=6,
                method="riemann_middle" if multiply else "gausslegendre",
                internal_batch_size=7, return_convergence_delta=True,
                attribute_to_layer_input=where == "linear_input")
    ref = ca.LayerIntegratedGradients(model, layer, multiply_by_inputs=multiply).attribute(
        ids, **args)
    ours = tc.LayerIntegratedGradients(model, layer, multiply_by_inputs=multiply).attribute(
        ids, **args)
    assert_same(ours, ref, delta=True)


def test_layer_ig_baseline_tensor_and_layer_list():
    torch.manual_seed(4)
    model = TokenModel().double()
    ids, base = torch.randint(0, 12, (3, 6)), torch.randint(0, 12, (1, 6))
    ref = ca.LayerIntegratedGradients(model, [model.emb]).attribute(ids, base, target=1,
                                                                    n_steps=5)
    ours = tc.LayerIntegratedGradients(model, [model.emb]).attribute(ids, base, target=1,
                                                                    n_steps=5)
    assert isinstance(ours, list) and isinstance(ref, list) and len(ours) == 1
    assert rel(ours[0], ref[0]) < RTOL


class Bypass(nn.Module):
    """``out(tanh(lin(e)) + skip(e)) * scale``: the path through ``skip`` bypasses ``lin``."""

    def __init__(self, dim=5, length=6):
        super().__init__()
        self.emb = nn.Embedding(12, dim)
        self.lin, self.skip = nn.Linear(dim * length, 8), nn.Linear(dim * length, 8)
        self.out = nn.Linear(8, 3)

    def forward(self, ids, scale):
        e = self.emb(ids).flatten(1)
        return self.out(torch.tanh(self.lin(e)) + self.skip(e)) * scale


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("layers", ["lin", "lin+skip"])
def test_layer_ig_delta_counts_bypassed_paths_like_captum(batch, layers):
    """The delta (our gap: F(inputs) and F(baselines) from the same two forwards that give the
    layer activations) equals Captum's also where the network bypasses the layer, with a
    per-row forward argument; the layer IG's own gap is that delta."""
    torch.manual_seed(5)
    model = Bypass().double()
    ids, scale = torch.randint(0, 12, (batch, 6)), torch.rand(batch, 1, dtype=F64) + 0.5
    layer = model.lin if layers == "lin" else [model.lin, model.skip]
    args = dict(baselines=3, target=1, additional_forward_args=(scale,), n_steps=9,
                return_convergence_delta=True)
    ref = ca.LayerIntegratedGradients(model, layer).attribute(ids, **args)
    ours = tc.LayerIntegratedGradients(model, layer).attribute(ids, **args)
    assert_same(ours, ref, delta=True)
    if layers == "lin":
        assert ref[1].abs().min() > 1e-3  # the bypass shows in the delta


# ---------------------------------------------------------------------- NoiseTunnel


def run_both(make_ref, make_ours, call, seed=5):
    """Run ``call(instance)`` on Captum's and our instance from the same torch/numpy seeds."""
    out = []
    for make in (make_ref, make_ours):
        torch.manual_seed(seed)
        np.random.seed(seed)
        out.append(call(make()))
    return out


@pytest.mark.parametrize("draw", [False, True])
@pytest.mark.parametrize("batch", [None, 2])
@pytest.mark.parametrize("nt_type", ["smoothgrad", "smoothgrad_sq", "vargrad"])
def test_noise_tunnel_matches_captum(nt_type, batch, draw):
    model, x, kw = setup("mlp")
    bl = torch.randn(3, 10, dtype=F64) if draw else 0.1 * torch.randn_like(x)

    def call(nt):
        return nt.attribute(x, nt_type=nt_type, nt_samples=5, nt_samples_batch_size=batch,
                            stdevs=0.3, draw_baseline_from_distrib=draw, baselines=bl,
                            n_steps=6, return_convergence_delta=True, **kw)

    ref, ours = run_both(lambda: ca.NoiseTunnel(ca.IntegratedGradients(model)),
                         lambda: tc.NoiseTunnel(tc.IntegratedGradients(model)), call)
    assert ours[1].shape == (5 * 5,)
    assert_same(ours, ref, delta=True)


class ListArgModel(nn.Module):
    """``forward(x, params, wb)``: ``params`` a list of two numbers (the batch is 2, so a
    per-row list it is not), ``wb`` a nested tuple ``(W [2, 3], b)``: Captum expands only the
    top-level tensors of ``additional_forward_args``."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 2).double()

    def forward(self, x, params, wb):
        W, b = wb
        return torch.tanh(self.lin(x * params[0]) + params[1]) @ W + b


INTEGER_INPUT_CALLS = {
    "IntegratedGradients": lambda lib, m, x: lib.IntegratedGradients(m).attribute(
        x, target=1, n_steps=8, return_convergence_delta=False),
    "IntegratedGradients baselines": lambda lib, m, x: lib.IntegratedGradients(m).attribute(
        x, torch.ones_like(x), target=1, n_steps=8),
    "LayerConductance": lambda lib, m, x: lib.LayerConductance(m, m[0]).attribute(
        x, target=1, n_steps=8),
    "InternalInfluence": lambda lib, m, x: lib.InternalInfluence(m, m[0]).attribute(
        x, target=1, n_steps=8),
    "NeuronIntegratedGradients": lambda lib, m, x: lib.NeuronIntegratedGradients(
        m, m[0]).attribute(x, 2, n_steps=8),
    "NeuronConductance": lambda lib, m, x: lib.NeuronConductance(m, m[0]).attribute(
        x, 2, target=1, n_steps=8)}


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int64])
@pytest.mark.parametrize("name", list(INTEGER_INPUT_CALLS))
def test_integer_inputs_are_interpolated_as_floats_like_captum(name, dtype):
    """uint8 images and int64 counts: Captum's ``b + t (x - b)`` hands the model floats (it
    raised here; NeuronConductance ran the model on the bytes)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).eval()
    x = torch.randint(0, 4, (2, 6), dtype=dtype)
    ref = INTEGER_INPUT_CALLS[name](ca, model, x)
    ours = INTEGER_INPUT_CALLS[name](tc, model, x)
    assert ours.dtype == ref.dtype == torch.float32
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


class LabelConditioned(nn.Module):
    """A uint8 image and a label embedded through ``nn.Embedding`` (a forward argument)."""

    def __init__(self):
        super().__init__()
        self.label = nn.Embedding(3, 6)
        self.net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))

    def forward(self, image, labels):
        return self.net(image / 4.0 + self.label(labels))


def test_a_uint8_image_beside_an_embedded_label_is_interpolated_like_captum():
    """An embedding indexes only with int64/int32: a uint8 input of a model with an embedding
    is an image, interpolated as floats like Captum (it was refused as token ids)."""
    torch.manual_seed(0)
    model = LabelConditioned().eval()
    x = torch.randint(0, 4, (2, 6), dtype=torch.uint8)
    labels = torch.tensor([0, 2])
    ref, ours = (lib.IntegratedGradients(model).attribute(
        x, target=1, n_steps=8, additional_forward_args=(labels,)) for lib in (ca, tc))
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="token ids|integer|floating"):  # int64 ids: by name
        tc.IntegratedGradients(model).attribute(x.long(), target=1, n_steps=8,
                                                additional_forward_args=(labels,))


@pytest.mark.parametrize("method", ["gradient_shap", "layer_gradient_shap", "noise_tunnel"])
def test_sampling_methods_pass_lists_and_nested_tuples_as_captum(method):
    """A list of ``B`` numbers was repeated per sample (50x off Captum) and a nested tuple's
    ``[B, ...]`` tensor too (a shape error)."""
    torch.manual_seed(0)
    model = ListArgModel()
    x = torch.randn(2, 4, dtype=F64)
    args = ([0.5, 3.0], (torch.randn(2, 3, dtype=F64), torch.randn(3, dtype=F64)))
    bl = torch.randn(5, 4, dtype=F64)
    if method == "noise_tunnel":
        make = [lambda lib=lib: lib.NoiseTunnel(lib.IntegratedGradients(model)) for lib in (ca, tc)]

        def call(nt):
            return nt.attribute(x, nt_samples=3, stdevs=0.1, target=1, n_steps=8,
                                additional_forward_args=args)
    else:
        name = "GradientShap" if method == "gradient_shap" else "LayerGradientShap"
        layer = () if method == "gradient_shap" else (model.lin,)
        make = [lambda lib=lib: getattr(lib, name)(model, *layer) for lib in (ca, tc)]

        def call(gs):
            return gs.attribute(x, bl, n_samples=5, stdevs=0.1, target=1,
                                additional_forward_args=args)
    ref, ours = run_both(*make, call)
    assert_same(ours, ref)


def test_noise_tunnel_tuple_inputs_args_and_unscaled():
    model, x, kw = setup("two")
    kw = dict(kw, target=[0, 1, 2, 3])

    def call(nt):
        return nt.attribute(x, nt_type="vargrad", nt_samples=3, stdevs=(0.2, 0.1),
                            baselines=(0.1, torch.zeros(1, 2, 3, dtype=F64)), n_steps=5,
                            method="riemann_left", internal_batch_size=9, **kw)

    for multiply in (True, False):
        ref, ours = run_both(
            lambda: ca.NoiseTunnel(ca.IntegratedGradients(model, multiply)),
            lambda: tc.NoiseTunnel(tc.IntegratedGradients(model, multiply)), call)
        assert_same(ours, ref)


@pytest.mark.parametrize("method", ["ig", "neuron_ig", "neuron_conductance"])
def test_noise_tunnel_results_carry_no_graph_as_captum(method):
    """Captum runs the whole NoiseTunnel call under no_grad; ours ran the wrapped method and
    the smoothing with grad on, so an input requiring grad (the CIFAR tutorial's) and its
    baseline ``inp * 0`` left a graph on the result (``.numpy()`` failed)."""
    model, x, kw = setup("mlp")
    x = x.clone().requires_grad_(True)
    make = {"ig": lambda m: m.IntegratedGradients(model),
            "neuron_ig": lambda m: m.NeuronIntegratedGradients(model, model[2]),
            "neuron_conductance": lambda m: m.NeuronConductance(model, model[2])}[method]
    extra = kw if method == "ig" else {"neuron_selector": 1, **kw}
    if method == "neuron_ig":
        extra.pop("target")

    def call(nt):
        return nt.attribute(x, baselines=x * 0, nt_type="smoothgrad_sq", nt_samples=3,
                            stdevs=0.2, n_steps=5, **extra)

    ref, ours = run_both(lambda: ca.NoiseTunnel(make(ca)), lambda: tc.NoiseTunnel(make(tc)),
                         call)
    assert not ref.requires_grad and not ours.requires_grad
    assert_same(ours, ref)


def test_noise_tunnel_over_layer_ig_and_captum_over_ours():
    model, x, kw = setup("mlp")
    layer = model[2]

    def call(nt):
        return nt.attribute(x, nt_samples=4, nt_samples_batch_size=3, stdevs=0.2, n_steps=5,
                            **kw)

    ref, ours = run_both(lambda: ca.NoiseTunnel(ca.LayerIntegratedGradients(model, layer)),
                         lambda: tc.NoiseTunnel(tc.LayerIntegratedGradients(model, layer)),
                         call)
    assert_same(ours, ref)
    # Captum's own NoiseTunnel accepts our IntegratedGradients (it calls attribute.__wrapped__).
    ref, ours = run_both(lambda: ca.NoiseTunnel(ca.IntegratedGradients(model)),
                         lambda: ca.NoiseTunnel(tc.IntegratedGradients(model)), call)
    assert_same(ours, ref)
    # ours over Captum's own class is Captum's NoiseTunnel (a whole import line switches)
    assert isinstance(tc.NoiseTunnel(ca.IntegratedGradients(model)), ca.NoiseTunnel)


# --------------------------------------------------------------------- GradientShap


@pytest.mark.parametrize("multiply", [True, False])
@pytest.mark.parametrize("stdevs", [0.0, 0.25])
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_gradient_shap_matches_captum(kind, stdevs, multiply):
    model, x, kw = setup(kind)
    dist = torch.randn(6, *x.shape[1:], dtype=F64)

    def call(gs):
        return gs.attribute(x, dist, n_samples=7, stdevs=stdevs,
                            return_convergence_delta=True, **kw)

    ref, ours = run_both(lambda: ca.GradientShap(model, multiply),
                         lambda: tc.GradientShap(model, multiply), call)
    assert ours[1].shape == (x.shape[0] * 7,)
    assert_same(ours, ref, delta=True)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int64])
@pytest.mark.parametrize("name", ["GradientShap", "LayerGradientShap"])
def test_gradient_shap_interpolates_integer_inputs_like_captum(name, dtype):
    """Integer images: Captum's noise makes them floats and its nodes take the noisy inputs'
    dtype (ours took the integer dtype, so every node was 0: silently wrong; the layer form
    refused them as token ids)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 2)).eval()
    x = torch.full((2, 5), 3, dtype=dtype)
    layer = () if name == "GradientShap" else (model[0],)

    def call(gs):
        return gs.attribute(x, torch.zeros(4, 5), n_samples=3, stdevs=0.1, target=1,
                            return_convergence_delta=True)

    ref, ours = run_both(lambda: getattr(ca, name)(model, *layer),
                         lambda: getattr(tc, name)(model, *layer), call)
    assert ours[0].dtype == torch.float32 and ours[0].abs().sum() > 0
    torch.testing.assert_close(ours[0], ref[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours[1], ref[1], rtol=1e-5, atol=1e-5)


def test_gradient_shap_tuple_inputs_callable_baselines():
    model, (a, b), kw = setup("two")
    dist = (torch.randn(5, 5, dtype=F64), torch.randn(3, 2, 3, dtype=F64))

    def call(gs):
        return gs.attribute((a, b), lambda: dist, n_samples=4, stdevs=(0.1, 0.2), **kw)

    ref, ours = run_both(lambda: ca.GradientShap(model), lambda: tc.GradientShap(model), call)
    assert_same(ours, ref)


def test_gradient_shap_expectation():
    """Independently of the RNG: the average over many draws converges to Captum's."""
    model, x, kw = setup("mlp")
    dist = torch.randn(4, 10, dtype=F64)
    torch.manual_seed(0)
    np.random.seed(0)
    ref = ca.GradientShap(model).attribute(x, dist, n_samples=500, **kw)
    np.random.seed(123)
    ours = tc.GradientShap(model).attribute(x, dist, n_samples=500, internal_batch_size=512,
                                            **kw)
    assert rel(ours, ref) < 0.2


# ---------------------------------------------------------- our extras via the drop-in


def test_adaptive_and_budget_extras():
    model, x, kw = setup("cnn")
    ig = tc.IntegratedGradients(model)
    ref = ca.IntegratedGradients(model).attribute(x, n_steps=64, **kw)
    ours, delta = ig.attribute(x, method="adaptive", tol=1e-6, return_convergence_delta=True,
                               **kw)
    assert rel(ours, ref) < 1e-4
    assert ig.last_result.nodes_per_input is not None
    assert ig.last_result.evaluations < 3 * 64
    fx = model(x).gather(1, kw["target"].unsqueeze(1)).squeeze(1)
    assert (delta.abs() <= 1e-6 * (fx - model(torch.zeros_like(x))[range(3), kw["target"]])
            .abs() + 1e-12).all()
    counter = RowCounter(model)
    small = tc.IntegratedGradients(counter).attribute(x, n_steps=9, max_memory=40_000,
                                                      backend="reference", **kw)
    assert counter.max_rows < 27  # the budget split the 27 path points into chunks
    big = ig.attribute(x, n_steps=9, max_memory="1GB", **kw)
    assert rel(small, big) < 1e-12
    assert rel(small, ca.IntegratedGradients(model).attribute(x, n_steps=9, **kw)) < RTOL
    with pytest.raises(ValueError, match="multiply_by_inputs=False"):
        tc.IntegratedGradients(model, False).attribute(x, method="adaptive", **kw)
    gs = tc.GradientShap(model)
    out = gs.attribute(x, torch.zeros(2, 2, 8, 8, dtype=F64), n_samples=3, max_memory=120_000,
                       **kw)
    assert out.shape == x.shape and gs.last_result.evaluations == 9


def test_noise_tunnel_copies_and_pickles_like_captum():
    """copy and pickle rebuild an object by ``__new__`` (ours raised without a method)."""
    import copy
    import pickle

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3)).eval()
    x = torch.randn(2, 4)
    nt = tc.NoiseTunnel(tc.IntegratedGradients(model))
    for twin in (copy.copy(nt), copy.deepcopy(nt), pickle.loads(pickle.dumps(nt))):
        assert type(twin) is tc.NoiseTunnel
        torch.manual_seed(1)
        got = twin.attribute(x, target=0, nt_samples=2, n_steps=4)
        torch.manual_seed(1)
        torch.testing.assert_close(got, nt.attribute(x, target=0, nt_samples=2, n_steps=4))


def test_conductance_takes_numpy_integer_steps_like_captum():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).eval()
    x = torch.randn(2, 4)
    for steps in (np.int64(5), np.int32(5)):
        ref, ours = (lib.LayerConductance(model, model[1]).attribute(x, target=1, n_steps=steps)
                     for lib in (ca, tc))
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


def test_a_forward_accepting_only_its_own_batch_runs_as_under_captum():
    """Inseq's contrastive attribution checks that the forward's rows equal its contrast rows:
    Captum runs it with one input at ``internal_batch_size=1`` / ``n_samples=1``, and so do
    we (our probes ran one and two rows: it raised)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).eval()
    contrast = torch.randn(1, 3)

    def fwd(x):
        if x.shape[0] != contrast.shape[0]:
            raise ValueError(f"contrast batch {contrast.shape[0]} != {x.shape[0]}")
        return net(x) - contrast

    x = torch.randn(1, 4)
    for lib in (ca, tc):
        ig = lib.IntegratedGradients(fwd).attribute(x, target=0, n_steps=5,
                                                    internal_batch_size=1)
        lig = lib.LayerIntegratedGradients(fwd, net[1]).attribute(x, target=0, n_steps=5,
                                                                  internal_batch_size=1)
        if lib is ca:
            want = ig, lig
    torch.testing.assert_close(ig, want[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lig, want[1], rtol=1e-5, atol=1e-6)
    got = tc.GradientShap(fwd).attribute(x, torch.zeros(3, 4), target=0, n_samples=1)
    assert got.shape == x.shape


@pytest.mark.parametrize("baselines", [[0.5], ([0.5],), "zero", ("zero",), {"a": 1}, print])
@pytest.mark.parametrize("name", ["IntegratedGradients", "LayerIntegratedGradients"])
def test_baselines_of_no_captum_form_raise_captums_assertion_error(name, baselines):
    """A list, a string, a dict or a callable is none of Captum's baseline forms: ours read a
    list as a tuple (IG), and layer IG raised a bare AttributeError for all of them."""
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    x = torch.randn(2, 4)
    layer = () if name == "IntegratedGradients" else (model[0],)
    for lib in (ca, tc):
        with pytest.raises(AssertionError, match="baseline input argument must be either"):
            getattr(lib, name)(model, *layer).attribute(x, baselines, target=0, n_steps=4)


def test_layer_gradient_shap_checks_its_budget_before_capturing_every_drawn_row():
    """The layer activations of every drawn row were captured at once before any budget
    check (525 MiB under 32 MB); now one row's capture sizes the call, a budget that cannot
    hold it raises at once, and one that can is filled block by block (same numbers)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Tanh(), nn.Conv2d(8, 8, 3, padding=1),
                          nn.Tanh(), nn.Flatten(), nn.Linear(8 * 16 * 16, 3)).eval()
    x, bg = torch.randn(4, 3, 16, 16), torch.randn(6, 3, 16, 16)
    rows = []
    model[0].register_forward_hook(lambda m, i, o: rows.append(o.shape[0]))

    def call(**kw):
        np.random.seed(0)
        torch.manual_seed(0)
        return tc.LayerGradientShap(model, model[2]).attribute(x, bg, n_samples=5, stdevs=0.1,
                                                               target=1, **kw)

    with pytest.raises(MemoryError, match="layer activations of the 20 drawn rows"):
        call(max_memory="1MB")
    assert rows == [1]
    whole = call()
    rows.clear()
    torch.testing.assert_close(call(max_memory="2MB"), whole)
    assert rows[0] == 1 and 1 < rows[1] < 20  # one row, then the first block of rows
