"""Captum's path-integral surface on taylor_kernels.captum, against Captum itself (float64).

The documented examples of each class (Captum's docstrings: an ``ImageClassifier`` taking
``Nx3x32x32`` images with layers ``conv1`` (output ``Nx12x32x32``) and ``linear1``) run through
both libraries with the same arguments (and, for sampled methods, the same seeds); results
agree to 1e-5 relative (``max|ours - captum| / max|captum|``). Then the methods every class
has (``compute_convergence_delta``, ``has_convergence_delta``, ``multiplies_by_inputs``,
``attribute_future``), layer lists and tuple activations, the options, and the errors.
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from captum import attr as ca
from torch import nn

import taylor_kernels.captum as tc
from tests.attr.test_captum_dropin import F64, assert_same

CLASSES = ["IntegratedGradients", "LayerIntegratedGradients", "NeuronIntegratedGradients",
           "LayerGradientShap", "LayerConductance", "NeuronConductance", "InternalInfluence",
           "GradientShap"]


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        yield


class ImageClassifier(nn.Module):
    """Captum's docstring model: ``Nx3x32x32 -> Nx10`` class probabilities; ``conv1`` gives
    ``Nx12x32x32``, ``linear1`` a hidden layer."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 12, 3, padding=1)
        self.pool = nn.AvgPool2d(4)
        self.linear1 = nn.Linear(12 * 8 * 8, 16)
        self.linear2 = nn.Linear(16, 10)

    def forward(self, x):
        h = self.pool(torch.tanh(self.conv1(x))).flatten(1)
        return torch.softmax(self.linear2(torch.tanh(self.linear1(h))), dim=1)


class TwoBranch(nn.Module):
    """Independent branches (``left``, ``right``, ``skip``: for joint multi-layer attribution),
    a layer with a tuple output (``split``) and one with two inputs (``mix``)."""

    class Split(nn.Module):
        def forward(self, h):
            return h[:, :3], h[:, 3:]

    class Mix(nn.Module):
        def forward(self, a, b):
            return torch.tanh(a) * b.sum(1, keepdim=True)

    def __init__(self):
        super().__init__()
        self.left, self.right = nn.Linear(5, 6), nn.Linear(5, 6)
        self.split, self.mix = self.Split(), self.Mix()
        self.out, self.skip = nn.Linear(3, 4), nn.Linear(5, 4)

    def forward(self, x, scale=1.0):
        a, b = self.split(torch.tanh(self.left(x)) + torch.sin(self.right(x)))
        return (self.out(self.mix(a, b)) + torch.tanh(self.skip(x))) * scale


@pytest.fixture(scope="module")
def image():
    torch.manual_seed(0)
    return ImageClassifier().double(), torch.randn(2, 3, 32, 32, dtype=F64)


def both(call, seed=None):
    """``call(lib)`` for Captum and for us (from the same torch/numpy seeds if given)."""
    out = []
    for lib in (ca, tc):
        if seed is not None:
            torch.manual_seed(seed)
            np.random.seed(seed)
        out.append(call(lib))
    return out


# ----------------------------------------------------- Captum's documented examples


def test_doc_integrated_gradients(image):
    net, x = image
    ref, ours = both(lambda L: L.IntegratedGradients(net).attribute(x, target=3))
    assert_same(ours, ref)


def test_doc_layer_integrated_gradients(image):
    net, x = image
    ref, ours = both(lambda L: L.LayerIntegratedGradients(net, net.conv1).attribute(
        x, target=3, return_convergence_delta=True))
    assert ours[0].shape == (2, 12, 32, 32)
    assert_same(ours, ref, delta=True)


def test_doc_layer_conductance(image):
    net, x = image
    ref, ours = both(lambda L: L.LayerConductance(net, net.conv1).attribute(
        x, target=3, return_convergence_delta=True))
    assert ours[0].shape == (2, 12, 32, 32)
    assert_same(ours, ref, delta=True)


def test_doc_internal_influence(image):
    net, x = image
    ref, ours = both(lambda L: L.InternalInfluence(net, net.conv1).attribute(x, target=3))
    assert_same(ours, ref)


def test_doc_neuron_integrated_gradients(image):
    net, x = image
    ref, ours = both(lambda L: L.NeuronIntegratedGradients(net, net.conv1).attribute(
        x, (4, 1, 2)))
    assert ours.shape == x.shape
    assert_same(ours, ref)


def test_doc_neuron_conductance(image):
    net, x = image
    ref, ours = both(lambda L: L.NeuronConductance(net, net.conv1).attribute(
        x, (4, 1, 2), target=3))
    assert_same(ours, ref)


def test_doc_layer_gradient_shap(image):
    net, x = image
    x3 = torch.cat([x, x[:1].flip(2)])
    ref, ours = both(lambda L: L.LayerGradientShap(net, net.linear1).attribute(
        x3, torch.randn(20, 3, 32, 32, dtype=F64), target=5, return_convergence_delta=True),
        seed=7)
    assert ours[0].shape == (3, 16) and ours[1].shape == (3 * 5,)
    assert_same(ours, ref, delta=True)


def test_doc_gradient_shap(image):
    net, x = image
    x3 = torch.cat([x, x[:1].flip(2)])
    ref, ours = both(lambda L: L.GradientShap(net).attribute(
        x3, torch.randn(20, 3, 32, 32, dtype=F64), target=0), seed=8)
    assert_same(ours, ref)


def test_doc_noise_tunnel(image):
    net, x = image
    ref, ours = both(lambda L: L.NoiseTunnel(L.IntegratedGradients(net)).attribute(
        x, nt_type="smoothgrad", nt_samples=10, target=3, n_steps=10), seed=9)
    assert_same(ours, ref)


# ------------------------------------------------------- methods on every class


def make(lib, name, net):
    if name in ("IntegratedGradients", "GradientShap"):
        return getattr(lib, name)(net)
    return getattr(lib, name)(net, net.linear1)


@pytest.mark.parametrize("name", CLASSES)
def test_class_methods_match_captum(name, image):
    net, x = image
    ref, ours = make(ca, name, net), make(tc, name, net)
    assert ours.has_convergence_delta() == ref.has_convergence_delta()
    assert ours.multiplies_by_inputs == ref.multiplies_by_inputs
    assert hasattr(ours, "attribute_future") == hasattr(ref, "attribute_future")
    if hasattr(ref, "attribute_future"):
        with pytest.raises(NotImplementedError, match="attribute_future"):
            ours.attribute_future(x)
    attrs = torch.randn_like(x)  # compute_convergence_delta on given attributions
    args = (attrs, 0.1 * torch.ones_like(x[:1]), x)
    torch.testing.assert_close(ours.compute_convergence_delta(*args, target=[1, 2]),
                               ref.compute_convergence_delta(*args, target=[1, 2]))


def test_multiply_by_inputs_false(branches):
    net, x = branches
    for name, args in [("NeuronIntegratedGradients", (2,)), ("NeuronConductance", (1,)),
                       ("LayerIntegratedGradients", ())]:
        extra = {} if name == "NeuronIntegratedGradients" else {"target": 1}
        ref, ours = both(lambda L: getattr(L, name)(net, net.left, multiply_by_inputs=False)
                         .attribute(x, *args, n_steps=8, **extra))
        assert_same(ours, ref)
    ref, ours = both(lambda L: L.LayerGradientShap(net, net.left, multiply_by_inputs=False)
                     .attribute(x, torch.randn(4, 5, dtype=F64), n_samples=3, stdevs=0.1,
                                target=2), seed=3)
    assert_same(ours, ref)


@pytest.mark.parametrize("method", ["riemann_left", "riemann_middle", "riemann_trapezoid",
                                    "gausslegendre"])
def test_rules_batches_and_baselines(method, branches):
    net, x = branches
    bl = 0.2 * torch.randn_like(x)
    kw = dict(baselines=bl, n_steps=6, method=method, internal_batch_size=5, target=[1, 3, 0])
    for name in ("LayerConductance", "InternalInfluence"):
        ref, ours = both(lambda L: getattr(L, name)(net, net.left).attribute(x, **kw))
        assert_same(ours, ref)
    kw.pop("target")
    ref, ours = both(lambda L: L.NeuronConductance(net, net.left).attribute(
        x, 3, target=1, additional_forward_args=2.0, **kw))
    assert_same(ours, ref)
    ref, ours = both(lambda L: L.NeuronIntegratedGradients(net, net.left).attribute(
        x, (slice(2, 6),), **kw))
    assert_same(ours, ref)


def test_neuron_selector_callable_and_layer_input(image):
    net, x = image
    sel = lambda a: a[:, 2:5].sum(1)  # noqa: E731
    ref, ours = both(lambda L: L.NeuronIntegratedGradients(net, net.linear1).attribute(
        x, sel, n_steps=4, attribute_to_neuron_input=True))
    assert_same(ours, ref)
    ref, ours = both(lambda L: L.NeuronConductance(net, net.linear2).attribute(
        x, (1,), target=2, n_steps=4, attribute_to_neuron_input=True))
    assert_same(ours, ref)


# --------------------------------------------------- layer lists, tuple activations


@pytest.fixture(scope="module")
def branches():
    torch.manual_seed(1)
    return TwoBranch().double(), torch.randn(3, 5, dtype=F64)


@pytest.mark.parametrize("multiply", [True, False])
def test_layer_ig_list_of_layers(branches, multiply):
    net, x = branches
    kw = dict(target=2, n_steps=7, additional_forward_args=0.5, return_convergence_delta=True)
    ref, ours = both(lambda L: L.LayerIntegratedGradients(
        net, [net.left, net.right], multiply_by_inputs=multiply).attribute(x, **kw))
    assert isinstance(ours[0], list) and len(ours[0]) == 2
    assert_same(ours, ref, delta=True)


@pytest.mark.parametrize("to_input", [False, True])
def test_tuple_activations(branches, to_input):
    """``split`` returns a tuple; ``mix`` takes two inputs: tuples of attributions."""
    net, x = branches
    layer = net.mix if to_input else net.split
    kw = dict(target=[0, 1, 3], n_steps=6, attribute_to_layer_input=to_input)
    ref, ours = both(lambda L: L.LayerIntegratedGradients(net, layer).attribute(
        x, return_convergence_delta=True, **kw))
    assert isinstance(ours[0], tuple) and len(ours[0]) == 2
    assert_same(ours, ref, delta=True)
    ref, ours = both(lambda L: L.LayerIntegratedGradients(net, [layer, net.skip]).attribute(
        x, **kw))
    assert isinstance(ours, list) and isinstance(ours[0], tuple)
    for name in ("LayerConductance", "InternalInfluence"):
        ref, ours = both(lambda L: getattr(L, name)(net, layer).attribute(x, **kw))
        assert isinstance(ours, tuple)
        assert_same(ours, ref)


def test_gradient_shap_callable_baselines(branches):
    net, x = branches
    dist = torch.randn(6, 5, dtype=F64)
    for baselines in (lambda: dist, lambda inputs: dist + 0 * inputs[:1]):
        ref, ours = both(lambda L: L.GradientShap(net).attribute(
            x, baselines, n_samples=4, stdevs=0.1, target=1), seed=2)
        assert_same(ours, ref)
        ref, ours = both(lambda L: L.LayerGradientShap(net, net.left).attribute(
            x, baselines, n_samples=4, target=1), seed=2)
        assert_same(ours, ref)


# ------------------------------------------------------------------------ errors


def test_errors(image, branches):
    net, x = image
    with pytest.raises(ValueError, match="neuron_selector"):
        tc.NeuronIntegratedGradients(net, net.conv1).attribute(x, (1,), n_steps=3)
    with pytest.raises(TypeError, match="neuron_selector holds indices"):
        tc.NeuronIntegratedGradients(net, net.linear1).attribute(x, 1.0, n_steps=3)
    with pytest.raises(ValueError, match="not a fixed rule"):
        tc.InternalInfluence(net, net.conv1).attribute(x, target=1, method="adaptive")
    with pytest.raises(ValueError, match="baseline distribution"):
        tc.LayerGradientShap(net, net.linear1).attribute(x, None, target=1)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        tc.LayerConductance(net, "conv1")
    with pytest.raises(NotImplementedError, match="grad_kwargs a=1"):
        tc.LayerConductance(net, net.conv1).attribute(x, target=1, grad_kwargs={"a": 1})
    with pytest.raises(NotImplementedError, match="create_graph=True"):
        tc.LayerIntegratedGradients(net, net.conv1).attribute(
            x, target=1, grad_kwargs={"create_graph": True})
    neutral = {"retain_graph": True, "allow_unused": True, "materialize_grads": True,
               "create_graph": False}  # cannot change the numbers: accepted
    for cls in (tc.LayerConductance, tc.LayerIntegratedGradients, tc.InternalInfluence):
        torch.testing.assert_close(
            cls(net, net.conv1).attribute(x, target=1, n_steps=4, grad_kwargs=neutral),
            cls(net, net.conv1).attribute(x, target=1, n_steps=4))
    bnet, bx = branches
    with pytest.raises(ValueError, match="callable neuron_selector"):
        tc.NeuronIntegratedGradients(bnet, bnet.split).attribute(bx, (1,), n_steps=3)
    unused = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="not called"):
        tc.LayerConductance(bnet, unused).attribute(bx, target=1, n_steps=3)


def test_noise_tunnel_over_layer_ig_on_a_list_of_layers(branches):
    """Per layer smoothing (a list in, a list out); with no noise it is layer IG itself."""
    net, x = branches
    lig = tc.LayerIntegratedGradients(net, [net.left, net.right])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # layers attributed jointly
        plain = lig.attribute(x, target=1, n_steps=8)
        smooth = tc.NoiseTunnel(lig).attribute(x, nt_samples=3, stdevs=0.0, target=1,
                                               n_steps=8)
    assert isinstance(smooth, list) and len(smooth) == 2
    for a, b in zip(smooth, plain):
        torch.testing.assert_close(a, b)


def test_a_listed_layer_reached_only_through_another_warns(branches):
    """Layer IG over [l1, l3] where l1 feeds the output only through l3: Captum raises
    autograd's "not used in the graph"; ours gives l1 zeros (the path replaces l3's output)
    and says why, where it returned them silently."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double().eval()
    x = torch.randn(4, 6, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="not have been used"):
        ca.LayerIntegratedGradients(net, [net[0], net[2]]).attribute(x, target=1, n_steps=8)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        a = tc.LayerIntegratedGradients(net, [net[0], net[2]]).attribute(x, target=1,
                                                                         n_steps=8)
        bnet, bx = branches  # two parallel branches: both reach the output
        side = tc.LayerIntegratedGradients(bnet, [bnet.left, bnet.right]).attribute(
            bx, target=1, n_steps=8)
    mine = [str(w.message) for w in seen if "are all zero" in str(w.message)]
    assert len(mine) == 1 and "layer 0 (Linear)" in mine[0]
    with warnings.catch_warnings(record=True) as seen:  # a layer whose activations do not
        warnings.simplefilter("always")                 # move along the path: zeros, no cause
        tc.LayerIntegratedGradients(bnet, [bnet.left, bnet.right]).attribute(
            bx, bx.clone(), target=1, n_steps=4)
    assert not [w for w in seen if "are all zero" in str(w.message)]
    assert not a[0].any() and a[1].abs().max() > 0.01 and all(t.abs().max() > 0 for t in side)


@pytest.mark.parametrize("name", ["GradientShap", "LayerGradientShap"])
def test_noise_tunnel_in_batches_over_gradient_shap_draws_as_captum(name):
    """With nt_samples_batch_size < nt_samples Captum alternates the noise of a block with
    GradientShap's own draws: under the same seeds the numbers are Captum's (0.2-0.7 off
    when all noise was drawn first)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Tanh(), nn.Flatten(), nn.Linear(64, 5)).eval()
    x, dist = torch.randn(3, 3, 6, 6), torch.randn(10, 3, 6, 6)
    got = []
    for mod in (ca, tc):
        method = mod.GradientShap(net) if name == "GradientShap" else \
            mod.LayerGradientShap(net, net[0])
        torch.manual_seed(0)
        np.random.seed(0)
        got.append(mod.NoiseTunnel(method).attribute(
            x, nt_samples=5, nt_samples_batch_size=2, stdevs=0.1, baselines=dist,
            draw_baseline_from_distrib=True, target=1, return_convergence_delta=True))
    torch.testing.assert_close(got[1][0], got[0][0], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got[1][1], got[0][1], rtol=1e-4, atol=1e-6)


def test_inputs_requiring_grad_get_captums_graph():
    """attr.sum().backward() runs as with Captum: the graph goes through (x - b) only."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(F64)
    x = torch.randn(3, 4, dtype=F64, requires_grad=True)
    got = []
    for mod in (ca, tc):
        attr, delta = mod.IntegratedGradients(net).attribute(x, target=1, n_steps=16,
                                                             return_convergence_delta=True)
        got.append((attr.detach(), delta.detach(),
                    torch.autograd.grad(attr.pow(2).sum(), x)[0]))
    for ours, ref in zip(got[1], got[0]):
        torch.testing.assert_close(ours, ref, rtol=1e-8, atol=1e-9)
    assert x.grad is None
    assert tc.IntegratedGradients(net).attribute(x.detach(), target=1).grad_fn is None

    def scaled(z, scale):  # a per-row forward argument must reach this path too
        return net(z * scale)

    scale = torch.tensor([[2.0], [3.0], [0.5]], dtype=F64)
    ours, ref = (mod.IntegratedGradients(scaled).attribute(
        x, target=1, additional_forward_args=(scale,), n_steps=16) for mod in (tc, ca))
    torch.testing.assert_close(ours, ref, rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("name", ["NeuronIntegratedGradients", "NeuronConductance"])
def test_neuron_attributions_get_captums_graph(name):
    """As IG: the neuron methods' attributions carry the (x - b) factor's graph when the
    inputs require grad (they came back detached; an attribution-prior loss could not train)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(F64)
    x = torch.randn(3, 4, dtype=F64, requires_grad=True)
    kw = {"target": 1} if name == "NeuronConductance" else {}
    got = []
    for mod in (ca, tc):
        attr = getattr(mod, name)(net, net[0]).attribute(x, 2, baselines=0.3, n_steps=8, **kw)
        got.append((attr.detach(), torch.autograd.grad(attr.pow(2).sum(), x)[0]))
    for ours, ref in zip(got[1], got[0]):  # Captum's nodes pass through float32: ~1e-8
        torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-9)
    assert getattr(tc, name)(net, net[0]).attribute(x.detach(), 2, **kw).grad_fn is None


def test_neuron_conductance_needs_a_target_for_several_outputs():
    """Captum raises; we summed the outputs' conductances silently."""
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(F64)
    x = torch.randn(3, 4, dtype=F64)
    with pytest.raises(AssertionError):
        ca.NeuronConductance(net, net[0]).attribute(x, 2, n_steps=4)
    with pytest.raises(AssertionError, match="target"):
        tc.NeuronConductance(net, net[0]).attribute(x, 2, n_steps=4)


def test_boolean_targets_are_refused_as_captum():
    net = nn.Linear(4, 3)
    x = torch.randn(2, 4)
    with pytest.raises(AssertionError):
        ca.IntegratedGradients(net).attribute(x, target=True)
    for target in (True, [True, False], torch.tensor([True, False])):
        with pytest.raises(TypeError, match="booleans") as ours:
            tc.IntegratedGradients(net).attribute(x, target=target)
        assert isinstance(ours.value, AssertionError)  # Captum's type as well


class InPlaceStem(nn.Module):
    """conv -> eval batch norm -> ReLU(inplace=True), the ReLU reused after a residual add
    (torchvision's BasicBlock)."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.relu, self.conv2, self.fc = nn.ReLU(inplace=True), nn.Conv2d(4, 4, 3, padding=1), \
            nn.Linear(4, 3)

    def forward(self, x):
        h = self.relu(self.bn(self.conv(x)))
        return self.fc(self.relu(self.conv2(h) + h).mean((2, 3)))


INPLACE_CASES = [("InternalInfluence", "relu", {"attribute_to_layer_input": True}),
                 ("InternalInfluence", "bn", {}),
                 ("LayerConductance", "relu", {"attribute_to_layer_input": True}),
                 ("LayerConductance", "conv", {}),
                 ("LayerGradientShap", "bn", {}),
                 ("LayerGradientShap", "relu", {"attribute_to_layer_input": True}),
                 ("NeuronIntegratedGradients", "bn", {}),
                 ("NeuronIntegratedGradients", "relu", {"attribute_to_neuron_input": True}),
                 ("NeuronConductance", "bn", {})]


@pytest.mark.parametrize("name, layer, kw", INPLACE_CASES,
                         ids=[f"{n}-{m}-{bool(k)}" for n, m, k in INPLACE_CASES])
def test_in_place_activations_as_captum(name, layer, kw):
    """Captured activations are copies (a later in-place ReLU changed them), the layer's
    inputs reach it as a copy, and restoring unchanged buffers writes nothing (eval batch
    norm saves its running stats for backward)."""
    torch.manual_seed(0)
    net = InPlaceStem().eval()
    with torch.no_grad():
        net.bn.running_mean.uniform_(-0.5, 0.5)
        net.bn.running_var.uniform_(0.5, 1.5)
    x = torch.randn(2, 3, 6, 6)
    if name == "LayerGradientShap":
        args, kw = (torch.randn(4, 3, 6, 6),), {**kw, "target": 1}
    elif name.startswith("Neuron"):
        args, kw = ((1, 2, 2),), {**kw, "n_steps": 6, **({"target": 1} if "Cond" in name
                                                         else {})}
    else:
        args, kw = (), {**kw, "target": 1, "n_steps": 6}
    got = []
    for mod in (ca, tc):
        torch.manual_seed(1)
        np.random.seed(1)
        got.append(getattr(mod, name)(net, getattr(net, layer)).attribute(x, *args, **kw))
    torch.testing.assert_close(got[1], got[0], rtol=1e-4, atol=1e-6)


class SharedInput(nn.Module):
    """``a = l1(x)`` feeds ``l2`` and, as the second input, ``add`` (a residual): the layer
    input ``a`` has uses outside ``add``."""

    class Add(nn.Module):
        def forward(self, h, r):
            return h + r

    def __init__(self):
        super().__init__()
        self.l1, self.l2, self.add, self.out = (nn.Linear(4, 5), nn.Linear(5, 5), self.Add(),
                                                nn.Linear(5, 3))

    def forward(self, x):
        a = self.l1(x)
        return self.out(torch.tanh(self.add(torch.tanh(self.l2(a)), a)))


def _layer_input_attributions(name: str, net: nn.Module, layer: nn.Module) -> list:
    """Captum's and our ``name`` with ``attribute_to_layer_input=True`` on 3 random rows."""
    x = torch.randn(3, 4, dtype=F64)
    extra = (torch.randn(5, 4, dtype=F64),) if name == "LayerGradientShap" else ()
    kw = {} if extra else {"n_steps": 8}
    got = []
    for mod in (ca, tc):
        torch.manual_seed(1)
        np.random.seed(1)
        got.append(getattr(mod, name)(net, layer).attribute(
            x, *extra, target=1, attribute_to_layer_input=True, **kw))
    return got


@pytest.mark.parametrize("name", ["LayerConductance", "InternalInfluence", "LayerGradientShap"])
def test_layer_input_gradient_counts_every_use_of_the_input(name):
    """Captum differentiates in the tensors the layer receives, so a residual input's other
    uses count (it was 0.4 off when only the layer's own use counted)."""
    torch.manual_seed(0)
    net = SharedInput().to(F64)
    ref, ours = _layer_input_attributions(name, net, net.add)
    for o, r in zip(ours, ref):
        torch.testing.assert_close(o, r, rtol=1e-6, atol=1e-9)


class UsedBeforeTheLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin1, self.act, self.lin2 = nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)

    def forward(self, x):
        h = self.lin1(x)
        s = (h ** 2).sum(1, keepdim=True)  # a use of the layer's input before the layer
        return self.lin2(self.act(h)) + s


@pytest.mark.parametrize("name", ["LayerConductance", "InternalInfluence", "LayerGradientShap"])
def test_layer_input_gradient_counts_uses_before_the_layer_with_frozen_weights(name):
    """The layer's input became a leaf when the layer ran, so with frozen weights (nothing
    before it requiring grad) its earlier uses were not recorded: 1.9-2.1 off Captum."""
    torch.manual_seed(0)
    net = UsedBeforeTheLayer().to(F64).requires_grad_(False)
    ref, ours = _layer_input_attributions(name, net, net.act)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-9)
    assert not any(p.requires_grad for p in net.parameters())


@pytest.mark.parametrize("name", ["LayerConductance", "InternalInfluence", "LayerGradientShap"])
def test_input_space_paths_refuse_token_ids(name):
    """Their path runs in input space: integer ids cannot be interpolated (Captum fails in its
    embedding; a path cast to the ids' dtype would sit at the baseline)."""
    emb = nn.Embedding(11, 4)
    net = nn.Sequential(emb, nn.Flatten(), nn.Linear(12, 2))
    ids = torch.randint(1, 11, (2, 3))
    kw = {"baselines": torch.zeros(1, 3, dtype=torch.long)} if name == "LayerGradientShap" \
        else {}
    with pytest.raises(TypeError, match="cannot interpolate torch.int64 inputs"):
        getattr(tc, name)(net, net[2]).attribute(ids, target=1, **kw)


@pytest.mark.parametrize("name", ["GradientShap", "NoiseTunnel"])
def test_noise_on_token_ids_is_refused_by_name(name):
    """Both add Gaussian noise to the inputs: ids of an embedding failed inside PyTorch's
    embedding ("Expected tensor for argument #1 'indices'"), as in Captum. The error stays a
    RuntimeError, as Captum's; float inputs of the same model's head still run."""
    emb = nn.Embedding(11, 4)
    net = nn.Sequential(emb, nn.Flatten(), nn.Linear(12, 2))
    ids = torch.randint(1, 11, (2, 3))
    method = tc.GradientShap(net) if name == "GradientShap" else \
        tc.NoiseTunnel(tc.IntegratedGradients(net))
    kw = {"baselines": torch.zeros(1, 3, dtype=torch.long)} if name == "GradientShap" else {}
    with pytest.raises(RuntimeError, match="token ids .* of a model with an embedding"):
        method.attribute(ids, target=1, **kw)
    head = net[2]
    x = torch.randn(2, 12)
    method = tc.GradientShap(head) if name == "GradientShap" else \
        tc.NoiseTunnel(tc.IntegratedGradients(head))
    kw = {"baselines": torch.zeros(1, 12)} if name == "GradientShap" else {}
    assert method.attribute(x, target=1, **kw).shape == x.shape


@pytest.mark.parametrize("name", ["GradientShap", "LayerGradientShap", "NoiseTunnel"])
@pytest.mark.parametrize("as_tensor", [False, True])
def test_a_target_per_draw_is_refused_as_captum_does(name, as_tensor):
    """``B * n`` targets for ``B`` inputs: Captum raises; ours applied one per draw."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).to(F64)
    x, dist = torch.randn(2, 5, dtype=F64), torch.randn(4, 5, dtype=F64)
    target = [0, 1, 2, 0, 1, 2]
    target = torch.tensor(target) if as_tensor else target
    for mod in (ca, tc):
        method = {"GradientShap": lambda: mod.GradientShap(net),
                  "LayerGradientShap": lambda: mod.LayerGradientShap(net, net[0]),
                  "NoiseTunnel": lambda: mod.NoiseTunnel(mod.IntegratedGradients(net))}[name]()
        kw = dict(nt_samples=3, stdevs=0.1, n_steps=4) if name == "NoiseTunnel" else \
            dict(baselines=dist, n_samples=3)
        with pytest.raises(AssertionError):
            method.attribute(x, target=target, **kw)


BAD_INPUTS = {  # Captum raises AssertionError for these; ours also are ValueError/TypeError
    "n_steps": lambda L, net, x: L.IntegratedGradients(net).attribute(x, target=0, n_steps=0),
    "method": lambda L, net, x: L.LayerConductance(net, net.left).attribute(
        x, target=0, method="bad"),
    "baseline shape": lambda L, net, x: L.IntegratedGradients(net).attribute(
        x, torch.zeros(2, 5, dtype=F64), target=0),
    "target list": lambda L, net, x: L.IntegratedGradients(net).attribute(x, target=[0, 1]),
    "no target": lambda L, net, x: L.IntegratedGradients(net).attribute(x),
    "float target": lambda L, net, x: L.InternalInfluence(net, net.left).attribute(
        x, target=1.0),
    "selector": lambda L, net, x: L.NeuronConductance(net, net.left).attribute(
        x, (1, 2), target=0),
    "distribution": lambda L, net, x: L.GradientShap(net).attribute(x, None, target=0),
    "layer not called": lambda L, net, x: L.LayerIntegratedGradients(
        net, nn.Linear(1, 1)).attribute(x, target=0),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_raises_captums_type(case, branches):
    net, x = branches
    with pytest.raises(AssertionError):
        BAD_INPUTS[case](ca, net, x)
    with pytest.raises(AssertionError) as ours:
        BAD_INPUTS[case](tc, net, x)
    assert isinstance(ours.value, (ValueError, TypeError))
    with pytest.raises(IndexError):  # out-of-range targets: IndexError in both
        tc.IntegratedGradients(net).attribute(x, target=4)


BAD_INPUTS_OTHER_TYPES = {  # Captum fails on these with another type than AssertionError
    "empty batch": (IndexError, lambda L, net, x: L.IntegratedGradients(net).attribute(
        x[:0], target=0)),
    "empty batch, layer": (IndexError, lambda L, net, x: L.LayerConductance(
        net, net.left).attribute(x[:0], target=0)),
    "empty batch, sampled": (IndexError, lambda L, net, x: L.NoiseTunnel(
        L.IntegratedGradients(net)).attribute(x[:0], target=0)),
    "0-d output": (IndexError, lambda L, net, x: L.IntegratedGradients(
        lambda t: net(t)[:, 0].sum()).attribute(x)),
    "0-d output, layer": (IndexError, lambda L, net, x: L.InternalInfluence(
        lambda t: net(t)[:, 0].sum(), net.left).attribute(x)),
    "n_samples=0": (ZeroDivisionError, lambda L, net, x: L.GradientShap(net).attribute(
        x, x, n_samples=0, target=0)),
    "nt_samples=0": (ZeroDivisionError, lambda L, net, x: L.NoiseTunnel(
        L.IntegratedGradients(net)).attribute(x, nt_samples=0, target=0)),
    "nt_samples_batch_size=0": (ZeroDivisionError, lambda L, net, x: L.NoiseTunnel(
        L.IntegratedGradients(net)).attribute(x, nt_samples_batch_size=0, target=0)),
    "nt_samples<0": (RuntimeError, lambda L, net, x: L.NoiseTunnel(
        L.IntegratedGradients(net)).attribute(x, nt_samples=-1, target=0)),
    "stdevs<0": (RuntimeError, lambda L, net, x: L.GradientShap(net).attribute(
        x, x, stdevs=-0.1, target=0)),
    "stdevs<0, layer": (RuntimeError, lambda L, net, x: L.LayerGradientShap(
        net, net.left).attribute(x, x, stdevs=(-0.1,), target=0)),
    "stdevs<0, tunnel": (RuntimeError, lambda L, net, x: L.NoiseTunnel(
        L.IntegratedGradients(net)).attribute(x, stdevs=-1.0, target=0)),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS_OTHER_TYPES))
def test_bad_input_raises_captums_other_exception_types(case, branches):
    """Where Captum fails with an IndexError, ZeroDivisionError or RuntimeError ours raised
    only our ValueError (Captum's AssertionError): now it is also Captum's type."""
    net, x = branches
    kind, call = BAD_INPUTS_OTHER_TYPES[case]
    with pytest.raises(kind):
        call(ca, net, x)
    with pytest.raises(kind) as ours:
        call(tc, net, x)
    assert isinstance(ours.value, ValueError) and isinstance(ours.value, AssertionError)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_models_get_captums_attribution_dtypes(dtype):
    """Captum scales InternalInfluence's gradients by float32 step sizes: float32
    attributions for a bf16/fp16 model, where ours stayed in the model's dtype. The other
    classes keep theirs (float32; LayerConductance the model's dtype, as in Captum)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).eval().to(dtype)
    x = torch.randn(3, 4).to(dtype)
    for name, args in [("InternalInfluence", (net[0],)), ("IntegratedGradients", ()),
                       ("LayerIntegratedGradients", (net[0],)), ("LayerConductance", (net[0],)),
                       ("NeuronIntegratedGradients", (net[0], 1)),
                       ("NeuronConductance", (net[0], 1))]:
        layer, selector = args[:1], args[1:]
        kw = {} if name == "NeuronIntegratedGradients" else {"target": 1}
        ref, ours = both(lambda L: getattr(L, name)(net, *layer).attribute(
            x, *selector, n_steps=4, **kw))
        assert ours.dtype == ref.dtype, name
        torch.testing.assert_close(ours.float(), ref.float(), rtol=0.05, atol=2e-3)


@pytest.mark.parametrize("name, extra", [("LayerConductance", {"target": [0, 2, 1]}),
                                         ("InternalInfluence", {"target": 1}),
                                         ("NeuronIntegratedGradients", {"neuron_selector": 2}),
                                         ("NeuronConductance", {"neuron_selector": 2,
                                                                "target": [0, 2, 1]})])
def test_noise_tunnel_over_the_new_classes(branches, name, extra):
    net, x = branches
    ref, ours = both(lambda L: L.NoiseTunnel(getattr(L, name)(net, net.left)).attribute(
        x, nt_type="smoothgrad_sq", nt_samples=3, stdevs=0.2, n_steps=5, **extra), seed=4)
    assert_same(ours, ref)


class CalledTwice(nn.Module):
    """``l`` runs twice per forward: on the same input (``shared``) or on its own output."""

    def __init__(self, nested: bool):
        super().__init__()
        self.nested, self.l, self.h = nested, nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        if self.nested:
            return self.h(torch.tanh(self.l(torch.tanh(self.l(x)))))
        return self.h(torch.tanh(self.l(x)) * torch.sin(self.l(x)))


@pytest.mark.parametrize("nested", [False, True])
def test_layer_called_twice_as_captum(nested):
    """Captum reads the last call's activation and gradient; so do we."""
    torch.manual_seed(3)
    net, x = CalledTwice(nested).double(), torch.randn(3, 4, dtype=F64)
    for name, args, kw in [("LayerIntegratedGradients", (), {"target": 1}),
                           ("LayerConductance", (), {"target": 1}),
                           ("InternalInfluence", (), {"target": 1}),
                           ("NeuronIntegratedGradients", (1,), {}),
                           ("NeuronConductance", (1,), {"target": 1})]:
        ref, ours = both(lambda L: getattr(L, name)(net, net.l).attribute(x, *args, n_steps=8,
                                                                          **kw))
        assert_same(ours, ref)


@pytest.mark.parametrize("name", ["IntegratedGradients", "LayerIntegratedGradients",
                                  "LayerConductance", "InternalInfluence",
                                  "NeuronIntegratedGradients"])
def test_forward_args_without_a_batch_dimension_reach_every_row(name):
    """An additional forward arg without a batch dimension (a [3] tensor with a batch of 2):
    Captum concatenates it once per expanded row block, we bind it into the forward
    unchanged; a forward that reads its first 3 entries (as Captum's LLM forward reads its
    target tokens) gets the same values both ways, on every path-method front. (Captum's
    sampling methods repeat such an arg entry by entry instead, so that its first entries
    change: our GradientShap fronts bind it unchanged too, and warn that Captum's numbers
    differ; they refused it before.)"""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    scale = torch.tensor([0.5, -1.0, 2.0])

    def f(x, s):
        return net(x * s[:3])

    x = torch.randn(2, 3)
    kw = {"additional_forward_args": (scale,)}
    if name in ("LayerIntegratedGradients", "LayerConductance", "InternalInfluence"):
        args, call = (f, net[0]), dict(target=1, n_steps=8, **kw)
    elif name == "NeuronIntegratedGradients":
        args, call = (f, net[0]), dict(neuron_selector=1, n_steps=8, **kw)
    else:
        args, call = (f,), dict(target=1, n_steps=8, **kw)
    ref = getattr(ca, name)(*args).attribute(x, **call)
    ours = getattr(tc, name)(*args).attribute(x, **call)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    if name == "IntegratedGradients":
        torch.manual_seed(2)
        np.random.seed(2)
        with pytest.warns(UserWarning, match="Captum repeats"):
            got = tc.GradientShap(f).attribute(x, torch.zeros(4, 3), target=1, **kw)
        torch.manual_seed(2)
        np.random.seed(2)
        want = tc.GradientShap(lambda z: f(z, scale)).attribute(x, torch.zeros(4, 3), target=1)
        torch.testing.assert_close(got, want)


def test_every_captum_attr_name_imports_from_the_front():
    """A whole ``from captum.attr import ...`` line switches: names we do not implement are
    Captum's own (they run Captum's code), and our NoiseTunnel over one of them (Saliency) is
    Captum's NoiseTunnel, with Captum's numbers."""
    public = [n for n in dir(ca) if not n.startswith("_")]
    for name in public:
        assert hasattr(tc, name), name
    assert tc.Saliency is ca.Saliency and tc.TextTemplateInput is ca.TextTemplateInput
    assert tc.IntegratedGradients is not ca.IntegratedGradients
    with pytest.raises(ImportError):
        exec("from taylor_kernels.captum import NoSuchAttribution", {})
    theirs, ours = {}, {}  # a star import too (it read our 16 names only: NameErrors after)
    exec("from captum.attr import *", theirs)
    exec("from taylor_kernels.captum import *", ours)
    assert set(theirs) - {"__builtins__"} <= set(ours)
    assert ours["IntegratedGradients"] is tc.IntegratedGradients
    assert ours["Saliency"] is ca.Saliency
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 3), nn.Tanh()).double()
    x = torch.randn(2, 4, dtype=torch.float64)
    torch.manual_seed(1)
    ours = tc.NoiseTunnel(tc.Saliency(net)).attribute(x, target=1, nt_samples=4, stdevs=0.1)
    torch.manual_seed(1)
    theirs = ca.NoiseTunnel(ca.Saliency(net)).attribute(x, target=1, nt_samples=4, stdevs=0.1)
    torch.testing.assert_close(ours, theirs)


def test_noise_tunnel_subclasses_keep_their_class_and_dir_lists_captums_names():
    class MyTunnel(tc.NoiseTunnel):
        pass

    net = nn.Sequential(nn.Linear(4, 3), nn.Tanh()).double()
    assert type(MyTunnel(tc.IntegratedGradients(net))) is MyTunnel
    with pytest.raises(TypeError, match="MyTunnel wraps the taylor_kernels.captum classes"):
        MyTunnel(ca.Saliency(net))
    assert {"Saliency", "FeatureAblation", "IntegratedGradients", "patch"} <= set(dir(tc))


def test_a_custom_gradient_func_is_refused_not_ignored():
    """Captum's instances carry ``gradient_func`` and use a custom one; ours compute gradients
    in the engine: reading gives Captum's default, setting another raises (it was ignored)."""
    from captum._utils.gradient import compute_gradients

    net = nn.Sequential(nn.Linear(3, 2))
    for method in (tc.IntegratedGradients(net), tc.LayerConductance(net, net[0]),
                   tc.NeuronIntegratedGradients(net, net[0])):
        assert method.gradient_func is compute_gradients
        method.gradient_func = compute_gradients  # the default: accepted
        with pytest.raises(TypeError, match="cannot use a custom gradient_func"):
            method.gradient_func = lambda *a, **k: compute_gradients(*a, **k)


class _ThreeDims(nn.Module):
    def forward(self, x):
        return x[:, :6].reshape(-1, 3, 2)


@pytest.mark.parametrize("target", [99, -99])
def test_an_int_target_outside_a_3d_output_is_captums_index_error(target):
    """Captum indexes the output first (IndexError); ours said only that an int target needs
    a [N, C] output, a ValueError that Captum-based code catching IndexError missed."""
    x = torch.randn(2, 6, dtype=F64)
    for mod in (ca, tc):
        with pytest.raises(IndexError):
            mod.IntegratedGradients(_ThreeDims()).attribute(x, target=target, n_steps=2)


def test_convergence_delta_takes_the_wider_dtype_as_captum():
    """float32 attributions of a float64 model: Captum's delta is float64 (type promotion);
    ours was cast to the attributions' float32."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).to(F64)
    x = torch.randn(2, 4, dtype=F64)
    attrs = torch.randn(2, 4, dtype=torch.float32)
    got = [mod.IntegratedGradients(net).compute_convergence_delta(attrs, 0.0, x, target=1)
           for mod in (ca, tc)]
    assert got[1].dtype == got[0].dtype == F64
    torch.testing.assert_close(got[1], got[0], rtol=1e-12, atol=1e-12)


def _train_bn_mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 8),
                         nn.ReLU(), nn.Linear(8, 3)).train()


@pytest.mark.parametrize("name", ["IntegratedGradients", "LayerIntegratedGradients",
                                  "InternalInfluence", "NeuronIntegratedGradients"])
def test_train_mode_batch_norm_in_one_batch_equals_captum(name):
    """Batch statistics over Captum's one batch of all path points: the same numbers."""
    net, x = _train_bn_mlp(), torch.randn(5, 4)
    kw = {"neuron_selector": 1} if name.startswith("Neuron") else {"target": 1}
    state = {k: v.clone() for k, v in net.state_dict().items()}
    got = []
    for mod in (ca, tc):
        net.load_state_dict(state)  # (Captum moves the running statistics)
        method = getattr(mod, name)
        inst = method(net) if name == "IntegratedGradients" else method(net, net[3])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            got.append(inst.attribute(x, n_steps=6, **kw).detach())
    torch.testing.assert_close(got[1], got[0], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name, kw", [("LayerConductance", {"target": 1}),
                                      ("NeuronConductance", {"target": 1, "neuron_selector": 1}),
                                      ("IntegratedGradients", {"target": 1,
                                                               "internal_batch_size": 4})])
def test_train_mode_batch_norm_batched_unlike_captum_is_refused(name, kw):
    """Conductance's passes and a splitting internal_batch_size put other rows in a batch
    than Captum's: with batch statistics that gave other numbers silently (0.66 and 2.3 off
    Captum's conductance, 0.98 off its IG with internal_batch_size=4)."""
    net, x = _train_bn_mlp(), torch.randn(5, 4)
    method = getattr(tc, name)
    inst = method(net) if name == "IntegratedGradients" else method(net, net[3])
    with pytest.raises(ValueError, match="normalizes over the batch"):
        inst.attribute(x, n_steps=6, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (the train-mode note)
        whole = tc.IntegratedGradients(net).attribute(x, target=1, n_steps=6,
                                                      internal_batch_size=30)
        net.eval()
        inst.attribute(x, n_steps=6, **kw)  # eval mode: running statistics, no refusal
    assert whole.shape == x.shape  # (a batch size holding all 30 points splits nothing)


def test_functional_batch_norm_in_train_mode_is_named():
    """F.batch_norm(training=True) failed in the one-row probe with torch's bare 'Expected
    more than 1 value per channel when training'."""
    class FunctionalBN(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.o = nn.Linear(4, 8), nn.Linear(8, 3)

        def forward(self, x):
            return self.o(nn.functional.batch_norm(torch.tanh(self.a(x)), None, None,
                                                   training=True))

    with pytest.raises(ValueError, match="normalizes over the batch.*F.batch_norm"):
        tc.IntegratedGradients(FunctionalBN()).attribute(torch.randn(4, 4), target=1)


@pytest.mark.parametrize("name", ["IntegratedGradients", "LayerConductance",
                                  "InternalInfluence", "NeuronIntegratedGradients"])
def test_inference_tensors_are_attributed_as_captum(name):
    """Inputs and forward args made under torch.inference_mode() (an eval loop's): Captum
    attributes them, the front raised 'input 0 is an inference tensor'."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).eval()

    def f(x, w):
        return net(x) * w

    with torch.inference_mode():
        x, w = torch.randn(5, 4), torch.rand(5, 1)
    kw = {"neuron_selector": 1} if name.startswith("Neuron") else {"target": 1}
    got = []
    for mod in (ca, tc):
        method = getattr(mod, name)
        inst = method(f) if name == "IntegratedGradients" else method(f, net[1])
        got.append(inst.attribute(x, additional_forward_args=(w,), n_steps=5, **kw))
    torch.testing.assert_close(got[1], got[0], rtol=1e-5, atol=1e-7)


def test_a_failed_noise_tunnel_leaves_the_random_state_as_it_was():
    """The front drew its noise before the wrapped method refused the baselines, so the
    caller's generator had moved (Captum checks first)."""
    net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).eval()
    x, bad = torch.randn(4, 4), torch.randn(2, 4)
    torch.manual_seed(123)
    np.random.seed(5)
    before, np_before = torch.get_rng_state(), np.random.get_state()[1].copy()
    with pytest.raises(AssertionError):
        tc.NoiseTunnel(tc.IntegratedGradients(net)).attribute(
            x, nt_samples=3, stdevs=0.1, target=1, baselines=bad)
    assert torch.equal(torch.get_rng_state(), before)
    assert np.array_equal(np.random.get_state()[1], np_before)


def test_get_name_interpolate_and_neuron_conductance_dtype_as_captum():
    """get_name() was missing on every class, interpolate on the layer classes, and
    NeuronConductance under a float64 default returned float32 (Captum: float64)."""
    for name in ("IntegratedGradients", "LayerIntegratedGradients", "NoiseTunnel",
                 "GradientShap", "LayerConductance", "NeuronConductance", "InternalInfluence",
                 "LayerGradientShap", "NeuronIntegratedGradients", "LLMGradientAttribution"):
        assert getattr(tc, name).get_name() == getattr(ca, name).get_name()
    a = torch.randn(2, 3, 4, 4)
    for name in ("LayerIntegratedGradients", "LayerConductance", "LayerGradientShap"):
        torch.testing.assert_close(getattr(tc, name).interpolate(a, (8, 8), "bilinear"),
                                   ca.LayerAttribution.interpolate(a, (8, 8), "bilinear"))
    net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).eval()
    x = torch.randn(3, 4, dtype=torch.float32)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        got = [mod.NeuronConductance(net, net[1]).attribute(x, neuron_selector=1, target=1,
                                                            n_steps=4) for mod in (ca, tc)]
    finally:
        torch.set_default_dtype(default)
    assert got[1].dtype == got[0].dtype == torch.float64
    torch.testing.assert_close(got[1], got[0], rtol=1e-5, atol=1e-7)
