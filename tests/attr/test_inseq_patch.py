"""``taylor_kernels.captum.patch()`` with Inseq as the real client, and exact restoration.

Inseq imports Captum's classes by name when it loads and creates their instances itself; under
``patch()`` those instances run on our path engine (checked by counting engine passes) and give
the same attributions and deltas as Inseq on Captum. ``unpatch()`` puts back the very objects
that were in each class ``__dict__``.
"""
from __future__ import annotations

import inspect
import warnings

import numpy as np
import pytest
import torch
from captum import attr as ca
from captum._utils.gradient import compute_gradients

import taylor_kernels.captum as tkc
from taylor_kernels.captum_front import patch as patch_mod
from taylor_kernels.engine import path_engine

F64 = torch.float64


def _class_state():
    state = {(name, m): getattr(ca, name).__dict__.get(m, patch_mod._MISSING)
             for name in patch_mod.PATCHED_CLASSES for m in patch_mod.METHODS}
    state[patch_mod.LLM_CLASS, "attribute"] = getattr(ca, patch_mod.LLM_CLASS).__dict__.get(
        "attribute", patch_mod._MISSING)
    return state


def test_patch_replaces_and_unpatch_restores_identity():
    before = _class_state()
    assert not tkc.is_patched()
    tkc.patch()
    tkc.patch()  # idempotent
    try:
        for (name, m), orig in before.items():
            now = getattr(ca, name).__dict__[m]
            assert now is not orig and now.__taylor_kernels__
        sig = inspect.signature(ca.IntegratedGradients(torch.nn.Linear(2, 1)).attribute)
        assert "max_memory" in sig.parameters and "self" not in sig.parameters
    finally:
        tkc.unpatch()
    after = _class_state()
    assert all(after[k] is v for k, v in before.items())
    tkc.unpatch()  # idempotent
    with tkc.patched():
        assert tkc.is_patched()
        with tkc.patched():  # nested: the inner block leaves the outer patch in place
            pass
        assert tkc.is_patched()
    assert not tkc.is_patched()
    assert all(_class_state()[k] is v for k, v in before.items())


def test_patched_blocks_that_overlap_in_threads_or_out_of_order_keep_the_patch():
    """The patch stays while any patched() block is open (it was undone by whichever block
    left first, so another thread's block ran Captum's own code); patch() makes it stay."""
    import threading

    before = _class_state()
    entered, done, seen = threading.Event(), threading.Event(), []

    def first():
        with tkc.patched():
            entered.set()
            done.wait(5)

    def second():
        entered.wait(5)
        with tkc.patched():
            done.set()
            t1.join(5)  # the first block has ended
            seen.append(tkc.is_patched())

    t1, t2 = threading.Thread(target=first), threading.Thread(target=second)
    t1.start(), t2.start()
    t2.join(10)
    assert seen == [True] and not tkc.is_patched()
    outer, inner = tkc.patched(), tkc.patched()
    outer.__enter__(), inner.__enter__()
    outer.__exit__(None, None, None)
    assert tkc.is_patched()
    inner.__exit__(None, None, None)
    assert not tkc.is_patched()
    tkc.patch()
    with tkc.patched():
        pass
    assert tkc.is_patched()
    tkc.unpatch()
    assert not tkc.is_patched() and all(_class_state()[k] is v for k, v in before.items())


def test_patched_captum_classes_equal_captum(monkeypatch):
    """Instances created before patching, Captum's NoiseTunnel over them, every class."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))
    net = net.double()
    x = torch.randn(3, 4, dtype=F64)
    calls = []
    integrate = path_engine.integrate
    monkeypatch.setattr(path_engine, "integrate", lambda *a, **k: calls.append(1) or
                        integrate(*a, **k))
    layer_calls = {"IntegratedGradients": (), "GradientShap": ()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in patch_mod.PATCHED_CLASSES:
            args = layer_calls.get(name, (net[0],))
            inst = getattr(ca, name)(net, *args)
            kw = {"target": 1}
            extra = ()
            if "Neuron" in name:
                extra, kw = (2,), ({} if name == "NeuronIntegratedGradients" else kw)
            if "Shap" in name:
                extra = (torch.randn(5, 4, dtype=F64),)

            def call():
                torch.manual_seed(1)
                np.random.seed(1)
                return inst.attribute(x, *extra, **kw)

            ref = call()
            n = len(calls)
            with tkc.patched():
                ours = call()
            assert len(calls) > n, name  # our engine ran
            torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-8)
        ig = ca.IntegratedGradients(net)
        nt = ca.NoiseTunnel(ig)
        torch.manual_seed(2)
        ref = nt.attribute(x, nt_samples=3, stdevs=0.1, target=0, n_steps=5)
        with tkc.patched():
            torch.manual_seed(2)
            ours = nt.attribute(x, nt_samples=3, stdevs=0.1, target=0, n_steps=5)
            delta = ig.compute_convergence_delta(ours, 0.0, x, target=0)
        torch.testing.assert_close(ours, ref)
        torch.testing.assert_close(delta, ca.IntegratedGradients(net).compute_convergence_delta(
            ours, 0.0, x, target=0))


def test_customised_instances_keep_captums_code(monkeypatch):
    """A subclass overriding a Captum method, or an instance ``gradient_func``, runs Captum."""
    torch.manual_seed(0)
    net = torch.nn.Linear(4, 3).double()
    x = torch.randn(2, 4, dtype=F64)
    seen = []

    class Custom(ca.IntegratedGradients):
        def _attribute(self, *args, **kwargs):
            seen.append("custom")
            return super()._attribute(*args, **kwargs)

    class Plain(ca.IntegratedGradients):
        def describe(self):
            return "no override"

    calls = []
    integrate = path_engine.integrate
    monkeypatch.setattr(path_engine, "integrate", lambda *a, **k: calls.append(1) or
                        integrate(*a, **k))
    with tkc.patched():
        Custom(net).attribute(x, target=0, n_steps=4)
        assert seen == ["custom"] and not calls
        ig = ca.IntegratedGradients(net)
        ig.gradient_func = lambda *a, **k: seen.append("grad") or compute_gradients(*a, **k)
        ig.attribute(x, target=0, n_steps=4)
        assert "grad" in seen and not calls
        Plain(net).attribute(x, target=0, n_steps=4)
        assert calls
        calls.clear()
        own = ca.IntegratedGradients(net)  # a method replaced on the instance (was ignored)
        inner = own._attribute
        own._attribute = lambda *a, **k: seen.append("instance") or inner(*a, **k)
        own.attribute(x, target=0, n_steps=4)
        assert seen[-1] == "instance" and not calls


def test_patched_methods_pickle_by_reference():
    """A plain reference to a patched method (or a partial of it) raised PicklingError: the
    replacement named our class, where pickle found another object."""
    import functools
    import pickle
    net = torch.nn.Linear(4, 3)
    with tkc.patched():
        for fn in (ca.IntegratedGradients.attribute, ca.LayerConductance.compute_convergence_delta,
                   functools.partial(ca.IntegratedGradients.attribute,
                                     ca.IntegratedGradients(net))):
            pickle.dumps(fn)


def test_train_mode_dropout_draws_as_captum_under_the_same_seed():
    """A train-mode model with dropout (attributed as Captum does): the shape probe drew its
    masks before the path, and the path's points were not in Captum's order (step, then
    input), so other masks fell on each point: 0.05-0.13 off Captum under the same seed, and
    the caller's generator ended elsewhere."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Dropout(0.3), torch.nn.ReLU(),
                              torch.nn.Linear(8, 2)).train()
    x = torch.randn(3, 5)
    calls = {"IG": lambda m: m.IntegratedGradients(net).attribute(x, target=1, n_steps=6),
             "LayerIG": lambda m: m.LayerIntegratedGradients(net, net[0]).attribute(
                 x, target=1, n_steps=6),
             "GradientShap": lambda m: m.GradientShap(net).attribute(
                 x, torch.zeros(2, 5), target=1, n_samples=4),
             # the delta's two forwards after the path, baselines first (ours ran the inputs
             # first, and layer IG took its endpoints from before the path: 0.61 vs -0.004)
             "IG delta": lambda m: m.IntegratedGradients(net).attribute(
                 x, target=1, n_steps=6, return_convergence_delta=True),
             "LayerIG delta": lambda m: m.LayerIntegratedGradients(net, net[0]).attribute(
                 x, target=1, n_steps=6, return_convergence_delta=True)}
    for name, call in calls.items():
        got = []
        for mod in (ca, tkc):
            torch.manual_seed(1)
            np.random.seed(1)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # (the train-mode note)
                got.append((call(mod), torch.rand(1)))
        torch.testing.assert_close(got[1][0], got[0][0], rtol=1e-5, atol=1e-7, msg=name)
        assert torch.equal(got[1][1], got[0][1]), name


def test_grad_kwargs_the_engine_cannot_honour_run_captums_code(monkeypatch):
    """``create_graph=True`` / ``grad_outputs`` raised NotImplementedError under ``patch()``
    where Captum ran: such calls run Captum's own code; neutral ones stay on the engine."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(),
                              torch.nn.Linear(3, 2)).double()
    x = torch.randn(2, 4, dtype=F64)
    ref = ca.LayerConductance(net, net[0]).attribute(x, target=0, n_steps=4,
                                                    grad_kwargs={"create_graph": True})
    calls = []
    integrate = path_engine.integrate
    monkeypatch.setattr(path_engine, "integrate", lambda *a, **k: calls.append(1) or
                        integrate(*a, **k))
    with tkc.patched():
        for cls in (ca.LayerConductance, ca.InternalInfluence, ca.LayerIntegratedGradients):
            cls(net, net[0]).attribute(x, target=0, n_steps=4,
                                       grad_kwargs={"create_graph": True})
        got = ca.LayerConductance(net, net[0]).attribute(x, 0.0, 0, None, 4, "gausslegendre",
                                                         None, False, False,
                                                         {"create_graph": True})
        assert not calls
        torch.testing.assert_close(got, ref)
        ca.LayerConductance(net, net[0]).attribute(x, target=0, n_steps=4,
                                                   grad_kwargs={"retain_graph": True})
        assert calls


# ------------------------------------------------------------------------ Inseq


@pytest.fixture(scope="module")
def inseq_case():
    pytest.importorskip("inseq")
    from taylor_kernels.benchmarks import cases_inseq
    model, tok = cases_inseq.tiny_gpt2(n_embd=16, n_layer=2)
    return cases_inseq, model, tok


@pytest.mark.parametrize("method, options", [
    ("integrated_gradients", {}),
    ("layer_integrated_gradients", {"multiply_by_inputs": False}),
    ("layer_integrated_gradients", {})])
def test_inseq_under_patch_equals_inseq_on_captum(inseq_case, method, options, monkeypatch):
    ci, model, tok = inseq_case
    am = ci.load(model, tok, method, **options)
    prompts = ["the cat sat on", "a dog"]
    ref = ci.attribute(am, prompts, new_tokens=2, n_steps=8, patch=False)
    calls = []
    integrate = path_engine.integrate
    monkeypatch.setattr(path_engine, "integrate", lambda *a, **k: calls.append(1) or
                        integrate(*a, **k))
    ours = ci.attribute(am, prompts, new_tokens=2, n_steps=8, patch=True)
    assert len(calls) >= 2  # one engine pass per generated token
    assert not tkc.is_patched()
    diff, scale = ci.max_difference(ours, ref)
    if options or method == "integrated_gradients":
        assert scale > 0  # a comparison that can fail
    assert diff <= 1e-5 * max(scale, 1e-6)



def test_inseq_benchmark_family_smoke(inseq_case):
    ci, _, _ = inseq_case
    result = ci.run("smoke", torch.device("cpu"), log=lambda msg: None)
    assert [r["method"] for r in result["rows"]] == [
        "integrated_gradients", "layer_integrated_gradients",
        "layer_integrated_gradients multiply_by_inputs=False"]
    for r in result["rows"]:
        assert r["captum_median_s"] > 0 and r["patched_median_s"] > 0
        assert r["max_rel_diff"] < 1e-5
    assert "captum/patched" in ci.tables(result)[0]
