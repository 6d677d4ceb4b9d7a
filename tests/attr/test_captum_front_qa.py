"""Calls a differential fuzzer of ``taylor_kernels.captum`` against ``captum.attr`` found
handled differently: where Captum returns, ours returns the same numbers; where Captum raises,
ours raises an exception of Captum's type with a clear message.

Tiny seeded float64 models; each call runs in both libraries under the same seeds.
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import taylor_kernels as tk
import taylor_kernels.captum as tc

ca = pytest.importorskip("captum.attr")

F64 = torch.float64


@pytest.fixture(autouse=True)
def _float64_quiet():
    """Float64 inputs and noise (Captum draws its noise in the default dtype); Captum's
    warnings about ``internal_batch_size`` silenced."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(F64)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Internal batch size|This method computes finite",
                                UserWarning)
        yield
    torch.set_default_dtype(old)


def _mlp() -> nn.Module:
    """``[N, 5] -> [N, 3]``."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).to(F64).eval()


def _pooled_cnn() -> nn.Module:
    """``[N, 2, 5, 5] -> [N, 4, 1, 1]``: a conv net ending in a pooling without flatten."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 4, 3), nn.Tanh(), nn.AdaptiveAvgPool2d(1)).to(F64).eval()


def _both(call):
    """``[call(captum.attr), call(taylor_kernels.captum)]``, each under the same seeds."""
    results = []
    for lib in (ca, tc):
        torch.manual_seed(1)
        np.random.seed(1)
        results.append(call(lib))
    return results


def _assert_same(ref, ours) -> None:
    """Same shapes and numbers (pairs: attributions and delta)."""
    for r, o in zip(ref, ours) if isinstance(ref, tuple) else [(ref, ours)]:
        torch.testing.assert_close(o, r, rtol=1e-7, atol=1e-10)


def _raises_in_both(call, error: type, ours_match: str) -> None:
    """``call`` raises ``error`` in Captum and in ours, ours with a message matching
    ``ours_match``."""
    with pytest.raises(error):
        call(ca)
    with pytest.raises(error, match=ours_match):
        call(tc)


# ------------------------------------------- 1. int targets on [N, C, 1, 1] model outputs

@pytest.mark.parametrize("target", [1, -1, torch.tensor(1), (1,), (1, 0), (1, 0, 0)])
def test_class_target_of_an_output_with_trailing_singletons_matches_captum(target):
    """Captum picks ``output[:, target]`` ([N, 1, 1], one value per row); ours refused
    anything but a full index tuple for a [N, C, 1, 1] output."""
    net, x = _pooled_cnn(), torch.randn(2, 2, 5, 5)
    _assert_same(*_both(lambda L: L.IntegratedGradients(net).attribute(
        x, target=target, n_steps=5, return_convergence_delta=True)))


_POOLED_CALLS = {
    "LayerIntegratedGradients": lambda L, net, x: L.LayerIntegratedGradients(
        net, net[0]).attribute(x, target=1, n_steps=5),
    "LayerConductance": lambda L, net, x: L.LayerConductance(net, net[0]).attribute(
        x, target=1, n_steps=5),
    "InternalInfluence": lambda L, net, x: L.InternalInfluence(net, net[0]).attribute(
        x, target=1, n_steps=5),
    "GradientShap": lambda L, net, x: L.GradientShap(net).attribute(
        x, torch.zeros(3, 2, 5, 5), target=1, stdevs=0.1),
    "LayerGradientShap": lambda L, net, x: L.LayerGradientShap(net, net[0]).attribute(
        x, torch.zeros(3, 2, 5, 5), target=1),
    "NeuronConductance": lambda L, net, x: L.NeuronConductance(net, net[0]).attribute(
        x, (0, 1, 1), target=1, n_steps=5),
}


@pytest.mark.parametrize("name", sorted(_POOLED_CALLS))
def test_every_method_takes_an_int_target_for_a_pooled_output(name):
    """The same int target on the other methods (each selects the target its own way)."""
    net, x = _pooled_cnn(), torch.randn(2, 2, 5, 5)
    _assert_same(*_both(lambda L: _POOLED_CALLS[name](L, net, x)))


def test_library_ig_reads_a_pooled_output_as_its_classes():
    """``tk.integrated_gradients`` selects the same class from ``[N, C, 1, 1]`` as from the
    flattened ``[N, C]`` output (int, per-row tensor and short tuple targets)."""
    net, x = _pooled_cnn(), torch.randn(2, 2, 5, 5)
    flat = lambda t: net(t).flatten(1)  # noqa: E731
    for target, flat_target in ((2, 2), (torch.tensor([3, 0]), torch.tensor([3, 0])),
                                ((1,), 1), ([(0, 0), (2, 0)], [0, 2])):
        got = tk.integrated_gradients(net, x, target=target, steps=6).attributions
        ref = tk.integrated_gradients(flat, x, target=flat_target, steps=6).attributions
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-14)


def test_int_target_of_an_output_with_more_per_class_still_raises():
    """``[N, 4, 2]``: ``output[:, 1]`` leaves two values per row, which both refuse."""
    mlp = _mlp()
    model = lambda t: torch.cat([mlp(t), mlp(t)[:, :1]], 1).reshape(-1, 2, 2)  # noqa: E731
    x = torch.randn(2, 5)
    _raises_in_both(lambda L: L.IntegratedGradients(model).attribute(x, target=1, n_steps=4),
                    AssertionError, "per row")
    with pytest.raises(ValueError, match="per row"):
        tk.integrated_gradients(model, x, target=1, steps=4)


# ----------------------------------------- 2. a [1, 1] target tensor for one example

_SAMPLED_CALLS = {
    "GradientShap": lambda L, m, x, t: L.GradientShap(m).attribute(
        x, torch.zeros(2, 5), target=t, stdevs=0.1),
    "LayerGradientShap": lambda L, m, x, t: L.LayerGradientShap(m, m[0]).attribute(
        x, torch.zeros(2, 5), target=t),
    "NoiseTunnel": lambda L, m, x, t: L.NoiseTunnel(L.IntegratedGradients(m)).attribute(
        x, nt_samples=3, target=t, n_steps=5),
}


@pytest.mark.parametrize("name", sorted(_SAMPLED_CALLS))
def test_a_one_element_target_tensor_for_one_example_matches_captum(name):
    """Captum expands only target tensors of more than one element per sample; ours repeated
    ``[[1]]`` to ``[n, 1]`` and refused it."""
    mlp, x = _mlp(), torch.randn(1, 5)
    _assert_same(*_both(lambda L: _SAMPLED_CALLS[name](L, mlp, x, torch.tensor([[1]]))))


# ------------------------------------------- 3. neuron conductance of a squeezing model

def test_neuron_conductance_of_a_squeezing_model_with_one_example_matches_captum():
    """``model(x).squeeze()`` with one example: Captum's forwards hold all path points, ours
    ran one row, whose output lost its batch dimension."""
    mlp, x = _mlp(), torch.randn(1, 5)
    model = lambda t: mlp(t).squeeze()  # noqa: E731
    _assert_same(*_both(lambda L: L.NeuronConductance(model, mlp[0]).attribute(
        x, 1, target=1, n_steps=5)))


# ------------------------------------------------- 4. one 0-d output for the whole batch

def _scalar_call(L, name: str, x: torch.Tensor, one_row: bool):
    """``name`` on ``mlp(x).sum()`` (0-d); ``one_row``: forwards of one row where ours
    can (``internal_batch_size=1``; one sample for the GradientSHAP methods)."""
    mlp = _mlp()
    model = lambda t: mlp(t).sum()  # noqa: E731
    ibs = {"internal_batch_size": 1} if one_row else {}
    n = {"n_samples": 1 if one_row else 2}
    calls = {
        "IntegratedGradients": lambda: L.IntegratedGradients(model).attribute(
            x, n_steps=4, return_convergence_delta=True, **ibs),
        "NoiseTunnel": lambda: L.NoiseTunnel(L.IntegratedGradients(model)).attribute(
            x, nt_samples=2, n_steps=4, **ibs),
        "GradientShap": lambda: L.GradientShap(model).attribute(
            x, torch.zeros(2, 5), target=0, **n),
        "LayerGradientShap": lambda: L.LayerGradientShap(model, mlp[0]).attribute(
            x, torch.zeros(2, 5), **n),
        "LayerIntegratedGradients": lambda: L.LayerIntegratedGradients(model, mlp[0]).attribute(
            x, n_steps=4, **ibs),
        "LayerConductance": lambda: L.LayerConductance(model, mlp[0]).attribute(
            x, n_steps=4, **ibs),
        "InternalInfluence": lambda: L.InternalInfluence(model, mlp[0]).attribute(
            x, n_steps=4, **ibs),
        "NeuronConductance": lambda: L.NeuronConductance(model, mlp[0]).attribute(
            x, 1, n_steps=4, **ibs),
    }
    return calls[name]()


@pytest.mark.parametrize("B, one_row", [(1, False), (1, True), (3, False), (3, True)])
@pytest.mark.parametrize("name", ["IntegratedGradients", "NoiseTunnel", "GradientShap",
                                  "LayerGradientShap", "LayerIntegratedGradients",
                                  "LayerConductance", "InternalInfluence",
                                  "NeuronConductance"])
def test_one_scalar_for_the_whole_batch_raises_index_error_as_captum(name, B, one_row):
    """Captum always raises ``IndexError``; ours returned numbers where every forward was of
    one row (its 0-d output read as that row's), or named no 0-d output (LIG: 'tuple index
    out of range')."""
    x = torch.randn(B, 5)
    _raises_in_both(lambda L: _scalar_call(L, name, x, one_row), IndexError, "0-d output")


@pytest.mark.parametrize("name", ["IntegratedGradients", "LayerIntegratedGradients",
                                  "LayerConductance", "NeuronConductance"])
def test_a_squeezed_one_output_model_with_one_example_still_matches_captum(name):
    """``[N, 1] -> .squeeze()``: one row gives a 0-d output, two rows ``[2]``: a model with a
    batch dimension, attributed as Captum (whose forwards hold all path points)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 1)).to(F64).eval()
    model = lambda t: net(t).squeeze()  # noqa: E731
    x = torch.randn(1, 5)
    calls = {
        "IntegratedGradients": lambda L: L.IntegratedGradients(model).attribute(x, n_steps=5),
        "LayerIntegratedGradients": lambda L: L.LayerIntegratedGradients(
            model, net[0]).attribute(x, n_steps=5),
        "LayerConductance": lambda L: L.LayerConductance(model, net[0]).attribute(
            x, n_steps=5),
        "NeuronConductance": lambda L: L.NeuronConductance(model, net[0]).attribute(
            x, 2, n_steps=5),
    }
    _assert_same(*_both(calls[name]))


# --------------------------------------------------------------- 5. exception types

def test_lig_out_of_range_target_with_one_row_batches_is_an_index_error():
    """Ours raised a plain ``RuntimeError`` (the gather of the endpoint outputs)."""
    mlp, x = _mlp(), torch.randn(1, 5)
    _raises_in_both(lambda L: L.LayerIntegratedGradients(mlp, mlp[0]).attribute(
        x, target=3, internal_batch_size=1, return_convergence_delta=True, n_steps=4),
        IndexError, "out of range")


def test_a_slice_in_a_target_tuple_is_refused_with_a_clear_error():
    """Captum's ``AssertionError`` (several outputs per row); ours said
    ``'<=' not supported between 'int' and 'slice'``."""
    mlp, x = _mlp(), torch.randn(2, 5)
    _raises_in_both(lambda L: L.IntegratedGradients(mlp).attribute(
        x, target=(slice(0, 2),), n_steps=4), AssertionError, "integer indices")
    with pytest.raises(TypeError, match="integer indices"):
        tk.integrated_gradients(mlp, x, target=[(0,), (slice(0, 2),)], steps=4)


# ------------------------------------------ 6. forward-arg tensors without the batch first

def test_a_forward_arg_tensor_without_the_batch_first_warns_once():
    """A prototype bank ``[K, D]`` is passed unchanged to every forward (ours), where Captum
    repeats it along dim 0: a one-time warning says so; the numbers are those of the model
    with the bank bound in."""
    enc, x = _mlp(), torch.randn(3, 5)
    protos = torch.randn(11, 3)

    def proto_model(t, bank):
        return torch.softmax(-torch.cdist(enc(t), bank), dim=1)

    ig = tc.IntegratedGradients(proto_model)
    with pytest.warns(UserWarning, match=r"shape \(11, 3\) is passed unchanged"):
        got = ig.attribute(x, target=1, additional_forward_args=(protos,), n_steps=5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ig.attribute(x, target=1, additional_forward_args=(protos,), n_steps=5)
    assert not [w for w in caught if "passed unchanged" in str(w.message)]
    bound = tc.IntegratedGradients(lambda t: proto_model(t, protos))
    _assert_same(bound.attribute(x, target=1, n_steps=5), got)


# ------------------------------------------ 7. the model's own exceptions

class _ModelInputError(ValueError):
    """A model's own exception type."""


def test_a_models_own_exception_passes_as_it_is():
    """A ``ValueError`` subclass the model raises reaches the caller as itself, as under
    Captum (the front re-raised it as ``CaptumValueError``: ``except ModelInputError`` missed
    it, under ``patch()`` too)."""
    mlp = _mlp()

    def checked(t):
        if t.shape[-1] != 5:
            raise _ModelInputError("expected 5 features")
        return mlp(t)
    for lib in (ca, tc):
        with pytest.raises(_ModelInputError):
            lib.IntegratedGradients(checked).attribute(torch.randn(2, 4), target=0)
    with tc.patched(), pytest.raises(_ModelInputError):
        ca.IntegratedGradients(checked).attribute(torch.randn(2, 4), target=0)


@pytest.mark.filterwarnings("ignore:additional_forward_args")
@pytest.mark.parametrize("layered", [False, True])
def test_gradient_shap_binds_a_forward_arg_without_the_batch_first(layered):
    """GradientShap and LayerGradientShap pass a ``[K, D]`` bank unchanged to every forward,
    as IG does (they raised "first dimension must be the batch or 1" where Captum returns):
    the numbers under the same seed are those of the model with the bank bound in."""
    enc, x = _mlp(), torch.randn(3, 5)
    bank, background = torch.randn(11, 3), torch.randn(4, 5)

    def proto_model(t, protos):
        return torch.softmax(-torch.cdist(enc(t), protos), dim=1)

    def run(model, **kwargs):
        torch.manual_seed(1)
        np.random.seed(1)
        method = tc.LayerGradientShap(model, enc[0]) if layered else tc.GradientShap(model)
        return method.attribute(x, background, target=1, n_samples=3, **kwargs)
    _assert_same(run(proto_model, additional_forward_args=(bank,)),
                 run(lambda t: proto_model(t, bank)))
