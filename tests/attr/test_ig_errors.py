"""Bad input gets a clear error, never silent garbage."""
from __future__ import annotations

import pytest
import torch

import taylor_kernels as tk
from tests import models


@pytest.fixture
def net():
    return models.mlp()


X = torch.randn(3, 10, dtype=torch.float64)


def test_baseline_shape_mismatch(net):
    with pytest.raises(ValueError, match="does not broadcast"):
        tk.integrated_gradients(net, X, torch.zeros(2, 10, dtype=torch.float64), target=0)
    with pytest.raises(ValueError, match="does not broadcast"):
        tk.integrated_gradients(net, X, torch.zeros(7, dtype=torch.float64), target=0)


@pytest.mark.parametrize("target", [3, -4, [0, 1, 5], torch.tensor([0, 9, 1])])
def test_target_out_of_range(net, target):
    with pytest.raises(ValueError, match="out of range"):
        tk.integrated_gradients(net, X, target=target)


def test_missing_target_for_vector_output(net):
    with pytest.raises(ValueError, match="pass a target"):
        tk.integrated_gradients(net, X)


def test_output_independent_of_input():
    const = lambda z: torch.ones(z.shape[0], 2, dtype=z.dtype)  # noqa: E731
    with pytest.raises(ValueError, match="does not depend on the inputs"):
        tk.integrated_gradients(const, X, target=0)


def test_output_under_no_grad(net):
    def frozen(z):
        with torch.no_grad():
            return net(z)
    with pytest.raises(ValueError, match="does not depend on the inputs"):
        tk.integrated_gradients(frozen, X, target=0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_inputs(net, bad):
    x = X.clone()
    x[1, 3] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        tk.integrated_gradients(net, x, target=0)


def test_non_finite_gradient_names_the_node():
    f = lambda z: torch.sqrt(z.abs()).sum(1)  # noqa: E731  (infinite slope at 0)
    x = torch.ones(2, 4, dtype=torch.float64)
    with pytest.raises(FloatingPointError, match=r"input 0, baseline 0, alpha=0"):
        tk.integrated_gradients(f, x, rule="riemann_left", steps=4)


@pytest.mark.parametrize("kw,match", [({"rule": "simpson"}, "unknown quadrature rule"),
                                      ({"backend": "metal"}, "unknown backend"),
                                      ({"steps": 0}, "steps"), ({"tol": -1.0}, "tol"),
                                      ({"max_memory": "huge"}, "max_memory"),
                                      ({"chunk_size": 0}, "chunk_size")])
def test_bad_options(net, kw, match):
    with pytest.raises(ValueError, match=match):
        tk.integrated_gradients(net, X, target=0, **kw)


def test_unavailable_backend_is_explained(net, monkeypatch):
    monkeypatch.setattr(tk.backends, "available", lambda: {"reference": True, "cpp": False,
                                                           "cuda": False, "triton": False})
    with pytest.raises(RuntimeError, match="not available"):
        tk.backends.use("cpp")


def test_integer_inputs_rejected(net):
    with pytest.raises(ValueError, match="floating inputs.*token_integrated_gradients"):
        tk.integrated_gradients(net, torch.ones(3, 10, dtype=torch.long), target=0)


def test_mismatched_batch_in_tuple():
    with pytest.raises(ValueError, match="batch dimension"):
        tk.integrated_gradients(models.two_input_model(), (torch.randn(3, 5), torch.randn(2, 2, 3)),
                                target=0)


def test_non_finite_background_rows_are_refused_when_drawn(net):
    """EG checks the references it draws (a training loop passes a large background every
    step): a NaN written later, in place or through numpy (no version bump), is refused."""
    bg = torch.randn(6, X.shape[1], dtype=X.dtype)
    tk.expected_gradients(net, X, bg, target=0, samples=2, seed=0)
    bg[:, 1] = float("nan")
    with pytest.raises(ValueError, match="background row [0-5] contains NaN or Inf"):
        tk.expected_gradients(net, X, bg, target=0, samples=2, seed=0)
    arr = torch.randn(6, X.shape[1], dtype=X.dtype).numpy()
    shared = torch.from_numpy(arr)
    tk.expected_gradients(net, X, shared, target=0, samples=2, seed=0)
    arr[:] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        tk.expected_gradients(net, X, shared, target=0, samples=2, seed=0)


def test_expected_gradients_samples_as_integral_float(net):
    """``samples=4.0`` passed the check and then failed inside torch.rand; it is 4 draws."""
    bg = torch.randn(6, X.shape[1], dtype=X.dtype)
    got = tk.expected_gradients(net, X, bg, target=0, samples=4.0, seed=3)
    ref = tk.expected_gradients(net, X, bg, target=0, samples=4, seed=3)
    torch.testing.assert_close(got.attributions, ref.attributions, rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match="positive integer"):
        tk.expected_gradients(net, X, bg, target=0, samples=2.5, seed=3)


@pytest.mark.parametrize("seed", ["a", 1.5, True])
def test_seeds_must_be_ints(net, seed):
    bg = torch.randn(4, 10, dtype=torch.float64)
    for call in (lambda: tk.expected_gradients(net, bg[:2], bg, target=0, seed=seed),
                 lambda: tk.expected_hessians(net, bg[:2], bg, target=0, seed=seed)):
        with pytest.raises(TypeError, match="seed must be an int"):
            call()


@pytest.mark.parametrize("seed", [-1, 2**70])
def test_seeds_outside_torchs_range_are_refused_by_name(net, seed):
    bg = torch.randn(4, 10, dtype=torch.float64)  # (2**70 raised a bare overflow)
    with pytest.raises(ValueError, match=r"seed must be in \[0, 2\*\*64\)"):
        tk.expected_gradients(net, bg[:2], bg, target=0, seed=seed)


def test_create_graph_under_no_grad_and_a_bad_distributed_value(net):
    with torch.no_grad(), pytest.raises(ValueError, match="inside torch.no_grad"):
        tk.integrated_gradients(net, X, target=0, steps=4, create_graph=True)
    for bad in ("yes", 1):
        with pytest.raises(TypeError, match="distributed must be a bool"):
            tk.integrated_gradients(net, X, target=0, steps=4, distributed=bad)


def test_grad_cam_reads_the_layer_output_before_an_in_place_relu():
    from torch import nn

    from taylor_kernels.attr.methods_gradient import grad_cam

    def net(inplace):
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(inplace=inplace), nn.Flatten(),
                             nn.Linear(4 * 6 * 6, 3)).double().eval()

    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(grad_cam(net(True), x, target=1).attributions,
                               grad_cam(net(False), x, target=1).attributions)


@pytest.mark.parametrize("classes", [4, 1])
@pytest.mark.parametrize("B", [1, 3])
def test_a_forward_ending_in_squeeze_is_attributed_as_by_captum(classes, B):
    """``.squeeze()`` drops a one-row batch's dimension; Captum never runs one row, our probes
    do: the row check said "mixes rows" (or "no batch dimension") where Captum works."""
    captum = pytest.importorskip("captum.attr")
    import taylor_kernels.captum as tkc

    torch.manual_seed(0)
    lin = torch.nn.Linear(5, classes).double()

    def f(x):
        return torch.tanh(lin(x)).squeeze()

    x = torch.randn(B, 5, dtype=torch.float64)
    target = 2 if classes > 1 else None
    if B == 1 and classes == 1:
        target = None  # Captum's [N] output of one class
    want = captum.IntegratedGradients(f).attribute(x, target=target, n_steps=16)
    got = tkc.IntegratedGradients(f).attribute(x, target=target, n_steps=16)
    torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10)
    for chunk in (1, 3):
        torch.testing.assert_close(tk.integrated_gradients(
            f, x, target=target, steps=16, rule="riemann_trapezoid", chunk_size=chunk
        ).attributions, captum.IntegratedGradients(f).attribute(
            x, target=target, n_steps=16, method="riemann_trapezoid"), rtol=1e-8, atol=1e-10)


def test_row_check_compares_at_the_precision_the_model_computes_in():
    """A float32 model whose output is cast to float64 rounds like float32 (the inputs' dtype):
    rows computed alone and in a batch may differ by float32 noise (refused for 6 of 10 seeds
    before), while a real coupling is still caught, also in a model holding a bf16 parameter
    (the parameters' dtype must not loosen the check: it let 1-20% coupling through)."""
    from taylor_kernels.engine import guards

    a = torch.tensor([1.0, 2.0], dtype=torch.float64)
    noisy = a * (1 + 1e-7)
    assert not guards._close(a, noisy) and guards._close(a, noisy, torch.float32)
    assert not guards._close(a, a * 1.01, torch.float32)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Tanh(), torch.nn.Linear(64, 5))

    def f(x):
        return torch.log_softmax(net(x).double(), -1)

    for seed in range(6):
        x = torch.randn(8, 64, generator=torch.Generator().manual_seed(seed))
        tk.integrated_gradients(f, x, target=1, steps=8)  # no false "mixes rows"


def test_a_model_changing_its_input_in_place_is_named():
    """It was reported as random ("dropout in train mode"): the probe's point had changed."""
    lin = torch.nn.Linear(4, 3)

    def f(x):
        x.mul_(2)
        return lin(x)

    x = torch.randn(2, 4)
    keep = x.clone()
    with pytest.raises(ValueError, match="changes its input in place"):
        tk.integrated_gradients(f, x, target=0, steps=4)
    assert torch.equal(x, keep)


def test_one_baseline_serves_every_one_of_another_inputs_k():
    """K baselines for one input and a scalar for the other: the scalar is that input's
    baseline in each of the K (it raised "different numbers of baselines"); unequal K > 1
    still raise."""
    torch.manual_seed(0)
    la, lb = torch.nn.Linear(3, 2).double(), torch.nn.Linear(2, 2).double()

    def model(a, b):
        return torch.tanh(la(a) * lb(b))

    g = torch.Generator().manual_seed(0)
    x = (torch.randn(2, 3, dtype=torch.float64, generator=g),
         torch.randn(2, 2, dtype=torch.float64, generator=g))
    b0 = torch.randn(2, 3, 3, dtype=torch.float64, generator=g)
    mixed = tk.integrated_gradients(model, x, (b0, 0.0), target=0, steps=8)
    explicit = tk.integrated_gradients(model, x, (b0, torch.zeros(2, 3, 2, dtype=torch.float64)),
                                       target=0, steps=8)
    for a, b in zip(mixed.attributions, explicit.attributions):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="different numbers of baselines per input: \\[2, 3\\]"):
        tk.integrated_gradients(model, x, (b0, torch.zeros(2, 2, 2, dtype=torch.float64)),
                                target=0, steps=8)


def test_baselines_broadcast_over_size_one_feature_dims_as_in_captum():
    """[1, C, 1, 1] baselines (a per-channel mean) broadcast as in Captum, and [C, 1, 1] too
    (they were refused); a size that is neither 1 nor the input's still raises."""
    captum = pytest.importorskip("captum.attr")
    model = models.cnn()
    x = torch.randn(3, 2, 8, 8, dtype=torch.float64)
    mean = torch.tensor([0.3, -0.2], dtype=torch.float64)
    want = captum.IntegratedGradients(model).attribute(x, mean.reshape(1, 2, 1, 1), target=1,
                                                       n_steps=16)  # (Captum refuses [C, 1, 1])
    for bl in (mean.reshape(2, 1, 1), mean.reshape(1, 2, 1, 1)):
        got = tk.integrated_gradients(model, x, bl, target=1, steps=16).attributions
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10)
    with pytest.raises(ValueError, match="does not broadcast"):
        tk.integrated_gradients(model, x, torch.zeros(1, 2, 4, 1, dtype=torch.float64), target=1)


def test_a_target_error_on_a_tuple_output_says_what_was_read():
    lin = torch.nn.Linear(4, 3)

    def f(x):
        return lin(x).sum(1), lin(x)  # (aux [N], logits [N, C])

    with pytest.raises(ValueError, match=r"read from the model's tuple.*lambda x: model\(x\)\[1\]"):
        tk.integrated_gradients(f, torch.randn(2, 4), target=1, steps=4)


def test_real_coupling_is_refused_whatever_the_parameters_dtype():
    class Coupled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 3)
            self.unused = torch.nn.Parameter(torch.zeros(2, dtype=torch.bfloat16))

        def forward(self, x):
            h = self.lin(x)
            return h + 0.01 * h.mean(0)

    with pytest.raises(ValueError, match="mixes rows"):
        tk.integrated_gradients(Coupled(), torch.randn(3, 4), target=0, steps=4)


@pytest.mark.parametrize("make, match", [
    (lambda lin: (lambda x: lin(x)[:, 1].sum()), "batch dimension"),
    (lambda lin: (lambda x: lin(x).reshape(-1)), "output shape depends on the batch size")])
def test_outputs_without_one_row_per_input_are_named(make, match):
    lin = torch.nn.Linear(4, 3)
    with pytest.raises(ValueError, match=match):
        tk.integrated_gradients(make(lin), torch.randn(2, 4), target=0, steps=4)


@pytest.mark.parametrize("B", [1, 3])
def test_layer_ig_on_a_forward_ending_in_squeeze_equals_captum(B):
    captum = pytest.importorskip("captum.attr")
    import taylor_kernels.captum as tkc

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.Tanh(),
                              torch.nn.Linear(6, 4)).double()

    def f(x):
        return net(x).squeeze()

    x = torch.randn(B, 5, dtype=torch.float64)
    want = captum.LayerIntegratedGradients(f, net[0]).attribute(x, target=2, n_steps=16)
    got = tkc.LayerIntegratedGradients(f, net[0]).attribute(x, target=2, n_steps=16)
    torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10)


def test_layer_methods_refuse_an_empty_batch_by_name():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    import taylor_kernels.captum as tkc
    with pytest.raises(ValueError, match="empty batch"):
        tk.layer_integrated_gradients(model, model[1], torch.empty(0, 3), target=1, steps=4)
    with pytest.raises(ValueError, match="empty batch"):
        tkc.LayerIntegratedGradients(model, model[1]).attribute(torch.empty(0, 3), target=1)
    with pytest.raises(ValueError, match=r"shape \(0, 3\): an empty batch"):  # (it said
        tk.integrated_gradients(model, torch.empty(0, 3), target=1)  # "expected 0")


@pytest.mark.parametrize("target", [2, -3])
def test_neuron_conductance_target_out_of_range_is_an_index_error_as_in_captum(target):
    import taylor_kernels.captum as tkc
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    with pytest.raises(IndexError, match="out of range"):
        tkc.NeuronConductance(model, model[1]).attribute(torch.randn(2, 3), 1, target=target,
                                                         n_steps=4)


@pytest.mark.parametrize("kw", [{"rule": "adaptive"}, {"rule": "exact"},
                                {"rule": "gausslegendre", "tol": 1e-2}])
def test_neuron_conductance_takes_fixed_rules_only_and_has_no_gap(kw):
    """Its gap (against g(x) - g(b), g = stop(dF/da_n) n) stays the same at any number of
    nodes: the adaptive rule ran all 63 nodes and warned every input missed its tolerance."""
    from taylor_kernels.attr.neuron import neuron_conductance
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    x = torch.randn(4, 5)
    with pytest.raises(ValueError, match="fixed rule"):
        neuron_conductance(model, model[1], x, 3, target=1, **kw)
    res = neuron_conductance(model, model[1], x, 3, target=1, steps=8)
    assert res.gap.shape == (4,) and bool(res.gap.isnan().all())


def test_common_mistakes_are_named_with_their_fix(net):
    """A UX QA pass: a numpy array, swapped noise_tunnel arguments, a layer by name, one
    unbatched example got messages that did not say what was wrong."""
    import numpy as np
    with pytest.raises(ValueError, match="got ndarray; convert with torch.as_tensor"):
        tk.integrated_gradients(net, X.numpy(), target=0)
    with pytest.raises(ValueError, match="got a list holding ndarray"):
        tk.integrated_gradients(net, [X, np.zeros(3)], target=0)
    with pytest.raises(ValueError, match="got an empty tuple"):
        tk.integrated_gradients(net, (), target=0)
    with pytest.raises(TypeError, match="takes the attribution method first"):
        tk.noise_tunnel(net, tk.integrated_gradients, X, target=0)
    with pytest.raises(RuntimeError) as info:
        tk.integrated_gradients(net, X[0], target=0)
    assert "pass x[None]" in "".join(getattr(info.value, "__notes__", []))


def test_layer_ig_takes_a_layer_by_name():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(),
                                torch.nn.Linear(6, 2)).double()
    x = torch.randn(3, 4, dtype=torch.float64)
    by_name = tk.layer_integrated_gradients(model, "1", x, target=1, steps=8)
    by_module = tk.layer_integrated_gradients(model, model[1], x, target=1, steps=8)
    torch.testing.assert_close(by_name.attributions, by_module.attributions, rtol=1e-12,
                               atol=1e-14)
    with pytest.raises(ValueError, match="no submodule '7'"):
        tk.layer_integrated_gradients(model, "7", x, target=1, steps=8)
    with pytest.raises(TypeError, match="needs the model to be an nn.Module"):
        tk.layer_integrated_gradients(lambda z: model(z), "1", x, target=1, steps=8)
    with pytest.raises(TypeError, match="got int"):
        tk.layer_integrated_gradients(model, 1, x, target=1, steps=8)
