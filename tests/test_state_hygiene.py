"""State hygiene as a contract: after every public call, success or exception, the caller's
model (modes, hooks, buffers, parameters' .grad/requires_grad/values) and the global settings
(backend, grad mode, SDPA backends, global hooks, CUDA peak statistics) are as they were.

Every public method runs through :func:`checked` on a small CNN with batch norm and dropout
(eval mode), a frozen bias, a pre-existing ``.grad``, a user hook and one train-mode leaf:
  ok          the call succeeds;
  fail_first  the model raises on its first forward (the probes);
  fail_later  the model raises on its third forward (inside the computation);
  train_bn    batch norm is in train mode: the call must refuse before any forward;
  inference   the call runs inside ``torch.inference_mode()``: a clear error naming it.
"""
from __future__ import annotations

import warnings
import weakref

import pytest
import torch
from torch import nn

import taylor_kernels as tk
import taylor_kernels.captum as tkc
from taylor_kernels.attr.unification import MethodSettings

_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
               "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs")
_GLOBAL_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                 "_global_backward_pre_hooks")


class Net(nn.Module):
    """conv 3x3 -> batch norm -> tanh -> dropout -> linear, input [B, 1, 3, 3], 3 classes."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.bn = nn.BatchNorm2d(2)
        self.act = nn.Tanh()
        self.drop = nn.Dropout(0.3)
        self.fc = nn.Linear(18, 3)

    def forward(self, x):
        return self.fc(self.drop(self.act(self.bn(self.conv(x))).flatten(1)))


class Countdown:
    """A forward pre-hook that raises on the ``k``-th forward of the module once armed."""

    def __init__(self):
        self.left = None

    def __call__(self, module, args):
        if self.left is not None:
            self.left -= 1
            if self.left == 0:
                raise RuntimeError("planned failure inside the model")


def _model():
    torch.manual_seed(0)
    model = Net().double().eval()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.2, 0.2)
        model.bn.running_var.uniform_(0.5, 1.5)
        model.bn.num_batches_tracked.fill_(5)
    model.act.train()  # a train-mode leaf that does not couple rows
    model.conv.bias.requires_grad_(False)
    model.fc.weight.grad = torch.full_like(model.fc.weight, 0.5)
    model.fc.register_forward_hook(lambda m, a, out: None)
    model.countdown = Countdown()
    model.conv.register_forward_pre_hook(model.countdown)
    return model


def snapshot(model: nn.Module) -> dict:
    """Everything the contract promises to keep, as comparable values."""
    state = {
        "modes": {n: m.training for n, m in model.named_modules()},
        "hooks": {(n, k): tuple(getattr(m, k).items()) for n, m in model.named_modules()
                  for k in _HOOK_DICTS if hasattr(m, k)},
        "buffers": {n: b.detach().clone() for n, b in model.named_buffers()},
        "params": {n: (p.detach().clone(), p.requires_grad,
                       None if p.grad is None else p.grad.clone())
                   for n, p in model.named_parameters()},
        "backend": tk.backends.current(),
        "grad_enabled": torch.is_grad_enabled(),
        "sdpa": (torch.backends.cuda.flash_sdp_enabled(),
                 torch.backends.cuda.mem_efficient_sdp_enabled(),
                 torch.backends.cuda.math_sdp_enabled()),
        "global_hooks": tuple(len(getattr(nn.modules.module, k)) for k in _GLOBAL_HOOKS),
    }
    if torch.cuda.is_available():
        state["cuda_peak"] = torch.cuda.max_memory_allocated()
    return state


def assert_same(before: dict, after: dict) -> None:
    for key in before:
        a, b = before[key], after[key]
        if key == "buffers":
            assert a.keys() == b.keys()
            for n in a:
                assert torch.equal(a[n], b[n]), f"buffer {n} changed: {a[n]} -> {b[n]}"
        elif key == "params":
            for n in a:
                (va, ra, ga), (vb, rb, gb) = a[n], b[n]
                assert torch.equal(va, vb), f"parameter {n} changed"
                assert ra == rb, f"requires_grad of {n} changed"
                assert (ga is None) == (gb is None) and (ga is None or torch.equal(ga, gb)), \
                    f".grad of {n} changed"
        else:
            assert a == b, f"{key} changed: {a} -> {b}"


def _x():
    return torch.randn(2, 1, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


def _bg():
    return torch.randn(3, 1, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))


def _row_fn(model):
    return lambda z: model(z)[:, 1]


_MASK = torch.tensor([[[0, 0, 1], [0, 2, 1], [2, 2, 1]]])
_SMALL = MethodSettings(ig_steps=4, eg_samples=4, smoothgrad_samples=2, permutations=2)

METHODS = {
    "integrated_gradients": lambda m, x: tk.integrated_gradients(m, x, target=1, steps=4),
    "expected_gradients": lambda m, x: tk.expected_gradients(m, x, _bg(), target=1, samples=4,
                                                             seed=0),
    "shapley_integrated_gradients": lambda m, x: tk.shapley_integrated_gradients(
        m, x, target=1, coalitions=2, steps=4, seed=0),
    "noise_tunnel": lambda m, x: tk.noise_tunnel(tk.integrated_gradients, m, x, target=1,
                                                 nt_samples=2, stdevs=0.1, seed=0, steps=4),
    "layer_integrated_gradients": lambda m, x: tk.layer_integrated_gradients(
        m, m.conv, x, target=1, steps=4),
    "integrated_hessians": lambda m, x: tk.integrated_hessians(m, x, target=1, steps=2,
                                                               ig_steps=4),
    "expected_hessians": lambda m, x: tk.expected_hessians(m, x, _bg(), target=1, samples=2,
                                                           seed=0, ig_steps=4),
    "group_integrated_hessians": lambda m, x: tk.group_integrated_hessians(
        m, x, _MASK, target=1, steps=2, ig_steps=4),
    "interactions": lambda m, x: tk.interactions(m, x, target=1, order=2, sets=[(0, 1)]),
    "taylor_cam": lambda m, x: tk.taylor_cam(m, m.conv, x, target=1),
    "jet": lambda m, x: tk.jet(m, x, torch.ones_like(x), 2, target=1),
    "mixed_partials": lambda m, x: tk.mixed_partials(m, x, [(0, 1)], target=1),
    "taylor_decomposition": lambda m, x: tk.taylor_decomposition(m, x, target=1, order=2),
    "hvp": lambda m, x: tk.hvp(_row_fn(m), x, torch.ones_like(x)),
    "hessian": lambda m, x: tk.hessian(_row_fn(m), x, index=[0, 4]),
    "hessian_diagonal": lambda m, x: tk.hessian_diagonal(_row_fn(m), x, "hutchinson",
                                                         samples=2, seed=0),
    "third_order": lambda m, x: tk.third_order(_row_fn(m), x, torch.ones_like(x), x),
    "greedy_interaction_sets": lambda m, x: tk.greedy_interaction_sets(
        m, x, target=1, max_order=3, beam=1, feature_mask=_MASK),
    "global_interactions": lambda m, x: tk.global_interactions(m, x, target=1, sets=[(0, 1)]),
    "fourteen_methods": lambda m, x: tk.fourteen_methods(m, x, target=1, settings=_SMALL),
    "unification_table": lambda m, x: tk.unification_table(
        m, x[:1], target=1, order=2, max_terms=4, settings=_SMALL,
        methods=("integrated_gradients", "occlusion_1")),
    "captum.IntegratedGradients": lambda m, x: tkc.IntegratedGradients(m).attribute(
        x, target=1, n_steps=4),
    "captum.LayerIntegratedGradients": lambda m, x: tkc.LayerIntegratedGradients(
        m, m.conv).attribute(x, target=1, n_steps=4),
    "captum.GradientShap": lambda m, x: tkc.GradientShap(m).attribute(x, _bg(), n_samples=2,
                                                                      target=1),
    "captum.NoiseTunnel": lambda m, x: tkc.NoiseTunnel(tkc.IntegratedGradients(m)).attribute(
        x, nt_samples=2, stdevs=0.1, target=1, n_steps=4),
    "captum.InternalInfluence": lambda m, x: tkc.InternalInfluence(m, m.conv).attribute(
        x, target=1, n_steps=4),
    "captum.LayerConductance": lambda m, x: tkc.LayerConductance(m, m.conv).attribute(
        x, target=1, n_steps=4),
    "captum.LayerGradientShap": lambda m, x: tkc.LayerGradientShap(m, m.conv).attribute(
        x, _bg(), n_samples=2, target=1),
    "captum.NeuronIntegratedGradients": lambda m, x: tkc.NeuronIntegratedGradients(
        m, m.conv).attribute(x, (0, 1, 1), n_steps=4),
    "captum.NeuronConductance": lambda m, x: tkc.NeuronConductance(m, m.conv).attribute(
        x, (0, 1, 1), target=1, n_steps=4),
}

MODES = ["ok", "fail_first", "fail_later", "train_bn", "inference"]


def checked(call, model, x, mode: str):
    """Run ``call(model, x)`` in ``mode``; return the exception (or None) after checking that
    the state is as it was."""
    if mode == "train_bn":
        model.bn.train()
    before = snapshot(model)
    model.countdown.left = {"fail_first": 1, "fail_later": 3}.get(mode)
    error = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if mode == "inference":
                with torch.inference_mode():
                    call(model, x)
            else:
                call(model, x)
    except Exception as exc:  # noqa: BLE001 - the contract holds for every exception
        error = exc
    finally:
        model.countdown.left = None
    assert_same(before, snapshot(model))
    return error


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", sorted(METHODS))
def test_state_is_kept(name, mode):
    model, x = _model(), _x()
    error = checked(METHODS[name], model, x, mode)
    if mode == "ok":
        assert error is None, f"{name} failed: {error!r}"
    elif mode == "fail_first":
        assert isinstance(error, RuntimeError) and "planned failure" in str(error), repr(error)
    elif mode == "train_bn" and name in ("captum.LayerConductance", "captum.NeuronConductance"):
        # (their passes batch the points unlike Captum: batch statistics would differ)
        assert isinstance(error, ValueError) and "normalizes over the batch" in str(error) and \
            "model.eval()" in str(error), repr(error)
    elif mode == "train_bn" and name.startswith("captum."):  # runs as Captum's (warns)
        assert error is None, f"{name} failed: {error!r}"
    elif mode == "train_bn":
        assert isinstance(error, ValueError) and "bn (BatchNorm2d" in str(error) and \
            "model.eval()" in str(error), repr(error)
    elif mode == "inference":
        assert isinstance(error, RuntimeError) and "inference_mode" in str(error), repr(error)


def test_harness_detects_changes():
    """The harness itself fails on each kind of change it promises to catch."""
    changes = [
        lambda m: m.bn.train(),
        lambda m: m.fc.register_forward_hook(lambda *a: None),
        lambda m: m.bn.num_batches_tracked.add_(1),
        lambda m: setattr(m.fc.weight, "grad", None),
        lambda m: m.conv.weight.requires_grad_(False),
        lambda m: tk.backends.use("reference"),
        lambda m: torch.set_grad_enabled(False),
    ]
    for change in changes:
        model = _model()
        before = snapshot(model)
        backend, grad = tk.backends.current(), torch.is_grad_enabled()
        change(model)
        try:
            with pytest.raises(AssertionError):
                assert_same(before, snapshot(model))
        finally:
            tk.backends.use(backend)
            torch.set_grad_enabled(grad)


class CountsCalls(nn.Module):
    """Dropout in train mode and a buffer that counts forwards."""

    def __init__(self):
        super().__init__()
        self.l = nn.Linear(4, 8)
        self.drop = nn.Dropout(0.5)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        self.calls += 1
        return self.drop(torch.tanh(self.l(x)))


def test_allow_row_coupling_opts_in_and_restores_buffers():
    torch.manual_seed(0)
    model = CountsCalls().double()
    x = torch.randn(4, 4, dtype=torch.float64)
    f = lambda z: model(z)[:, 0]  # noqa: E731
    with pytest.raises(ValueError, match="drop \\(Dropout, train mode\\)"):
        tk.hvp(f, x, x)
    with pytest.raises(ValueError, match="drop \\(Dropout"):
        tk.integrated_gradients(model, x, target=0, steps=4)
    assert model.calls == 0
    with tk.allow_row_coupling(model):
        assert torch.isfinite(tk.hvp(f, x, x)).all()  # random results: the user's choice
        tk.integrated_gradients(model, x, target=0, steps=4)
        assert model.calls > 0
    assert model.calls == 0
    tk.integrated_gradients(model.eval(), x, target=0, steps=4)  # eval: no opt-in needed


def test_captum_front_runs_a_train_mode_model_as_captum_does():
    """Captum attributes a model in train mode as it is (Inseq's MC-dropout step score leaves
    its model so); the front does too, warning, instead of refusing: train-mode batch norm
    gives Captum's numbers (one batch) and its running statistics stay as they were. The
    library's own API still refuses, also through the wrapper of
    ``multiply_by_inputs=False`` (it hid the model, and train-mode dropout then passed or
    failed by chance)."""
    from captum.attr import IntegratedGradients

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(),
                          nn.Linear(6, 3)).double().train()
    x = torch.randn(5, 4, dtype=torch.float64)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for mbi in (True, False):
        ref = IntegratedGradients(model, multiply_by_inputs=mbi).attribute(x, target=0,
                                                                           n_steps=8)
        model.load_state_dict(state)
        with pytest.warns(RuntimeWarning, match="train mode .*1 \\(BatchNorm1d"):
            got = tkc.IntegratedGradients(model, multiply_by_inputs=mbi).attribute(
                x, target=0, n_steps=8)
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-9)
        for k, v in model.state_dict().items():
            assert torch.equal(v, state[k]), k
    drop = nn.Sequential(nn.Linear(4, 6), nn.Dropout(0.01), nn.Linear(6, 3)).double().train()
    with pytest.warns(RuntimeWarning, match="Dropout"):
        assert torch.isfinite(tkc.IntegratedGradients(drop, multiply_by_inputs=False).attribute(
            x.clone().requires_grad_(), target=0, n_steps=8)).all()
    from taylor_kernels.attr.unscaled import unscaled_integrated_gradients
    for seed in range(5):  # refused before any forward, whatever dropout draws
        torch.manual_seed(seed)
        with pytest.raises(ValueError, match="1 \\(Dropout, train mode\\)"):
            unscaled_integrated_gradients(drop, (x,), (torch.zeros_like(x),), 0, steps=8)


_GLOBAL_NET = None


def _through_global(z):
    return _GLOBAL_NET(z)[:, 1]


@pytest.mark.parametrize("net", ["bn2d", "bn1d"])
def test_a_model_reached_through_a_global_is_refused_with_its_buffers_kept(net):
    """A function reaching a train-mode batch-norm model through a global (which the static
    check cannot see): the probe forwards moved its running statistics before the refusal,
    and BatchNorm1d on the one-row probe raised torch's "Expected more than 1 value per
    channel" instead of saying why."""
    global _GLOBAL_NET
    torch.manual_seed(0)
    if net == "bn2d":
        _GLOBAL_NET = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4),
                                    nn.Tanh(), nn.Flatten(), nn.Linear(64, 3)).double().train()
        x = torch.randn(3, 1, 4, 4, dtype=torch.float64)
    else:
        _GLOBAL_NET = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(),
                                    nn.Linear(6, 3)).double().train()
        x = torch.randn(3, 4, dtype=torch.float64)
    try:
        state = {k: v.clone() for k, v in _GLOBAL_NET.state_dict().items()}
        for call in (lambda: tk.hessian(_through_global, x, index=[0]),
                     lambda: tk.hvp(_through_global, x, x),
                     lambda: tk.jet(_through_global, x, x, 2),
                     lambda: tk.third_order(_through_global, x, x, x)):
            with pytest.raises(ValueError, match="(a module it calls|1) \\(BatchNorm"):
                call()
            for k, v in _GLOBAL_NET.state_dict().items():
                assert torch.equal(v, state[k]), k
        # the path methods' probes too (BatchNorm1d's one-row probe raised torch's "Expected
        # more than 1 value per channel"; BatchNorm2d's moved the running statistics)
        for call in (lambda: tk.integrated_gradients(_through_global, x, steps=4),
                     lambda: tk.integrated_gradients(_through_global, x, rule="exact"),
                     lambda: tk.expected_gradients(_through_global, x, x, samples=2)):
            with pytest.raises(ValueError, match="(a module it calls|1) \\(BatchNorm"):
                call()
            for k, v in _GLOBAL_NET.state_dict().items():
                assert torch.equal(v, state[k]), k
        # the Captum front sees the global's train-mode model now, and runs it as Captum does
        with pytest.warns(RuntimeWarning, match="attributed as Captum does"):
            tkc.IntegratedGradients(_through_global).attribute(x, n_steps=4)
        if net == "bn2d":  # the opt-in runs first order (BatchNorm1d cannot take one-row
            # probes); second order refuses batch statistics there too, the global seen
            with tk.allow_row_coupling(_GLOBAL_NET):
                assert torch.isfinite(tk.integrated_gradients(_through_global, x, steps=4)
                                      .attributions).all()
                with pytest.raises(ValueError, match="also inside allow_row_coupling"):
                    tk.hvp(_through_global, x, x)
    finally:
        _GLOBAL_NET = None


_COMPILED = None


def test_a_compiled_model_behind_a_global_keeps_working():
    """The probe's global pre-hook ran inside dynamo's trace of a compiled module and broke
    it ("already tracked for mutation")."""
    global _COMPILED
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 1)).double()
    _COMPILED = torch.compile(net, backend="eager")
    try:
        x, v = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
        got = tk.hvp(lambda z: _COMPILED(z)[:, 0], x, v)
        torch.testing.assert_close(got, tk.hvp(lambda z: net(z)[:, 0], x, v))
        assert not torch.nn.modules.module._global_forward_pre_hooks
        # path methods hook nothing global around their probes (a hook per call made dynamo
        # recompile the model on every call, up to its recompile limit)
        from torch._dynamo.utils import counters
        tk.integrated_gradients(lambda z: _COMPILED(z), x, target=0, steps=4)
        graphs = counters["stats"]["unique_graphs"]
        for _ in range(3):
            tk.integrated_gradients(lambda z: _COMPILED(z), x, target=0, steps=4)
        assert counters["stats"]["unique_graphs"] == graphs
    finally:
        _COMPILED = None


class _Trainer:
    """A training model (dropout on) beside the eval copy a lambda attributes."""

    def __init__(self):
        self.model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 2)).train()
        self.ema = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)).eval()

    def explain(self, x):
        return tk.integrated_gradients(lambda z: self.ema(z), x, target=1, steps=8)

    def curvature(self, x):
        return tk.hvp(lambda z: self.ema(z)[:, 1], x, torch.ones_like(x))


def test_an_unrelated_training_model_beside_the_called_one_is_not_refused():
    torch.manual_seed(0)
    trainer, x = _Trainer(), torch.randn(3, 4)
    assert torch.isfinite(trainer.explain(x).attributions).all()
    assert torch.isfinite(trainer.curvature(x)).all()


def test_front_delta_and_buffers_as_captum_for_train_mode_batch_norm():
    """The convergence delta came from one joint batch [x; b] (0.11 off Captum's separate
    forwards), and inside another model's opt-in the front let the running stats move."""
    from captum.attr import IntegratedGradients

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(),
                          nn.Linear(6, 3)).double().train()
    x = torch.randn(4, 4, dtype=torch.float64)
    bl = 0.3 * torch.randn(4, 4, dtype=torch.float64)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ref = IntegratedGradients(model).attribute(x, bl, target=0, n_steps=8,
                                               return_convergence_delta=True)
    model.load_state_dict(state)
    other = nn.Linear(2, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = tkc.IntegratedGradients(model).attribute(x, bl, target=0, n_steps=8,
                                                       return_convergence_delta=True)
        with tk.allow_row_coupling(other):
            tkc.IntegratedGradients(model).attribute(x, bl, target=0, n_steps=8)
    for ours, theirs in zip(got, ref):
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-9)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_allow_row_coupling_with_train_batch_norm_runs_one_batch_as_captum():
    """Train-mode BatchNorm1d: the shape probe takes two rows (one row raised), the path runs
    as one batch like Captum's (so the batch statistics, and the numbers, are Captum's), and
    the running statistics the kernel updated (without a version bump) are restored."""
    from captum.attr import IntegratedGradients

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(),
                          nn.Linear(6, 3)).double().train()
    x = torch.randn(5, 4, dtype=torch.float64)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ref = IntegratedGradients(model).attribute(x, target=0, n_steps=8)
    model.load_state_dict(state)
    with tk.allow_row_coupling(model):
        got = tk.integrated_gradients(model, x, target=0, steps=8).attributions
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-9)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


@pytest.mark.parametrize("call", ["ig", "ig_adaptive", "eg", "layer_ig"])
def test_allow_row_coupling_with_a_budget_probes_two_rows(call):
    """Under an explicit max_memory the memory probe ran one path point, which train-mode
    batch norm refuses ("Expected more than 1 value per channel"); it probes two now."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3)).train()
    x = torch.randn(4, 5)
    calls = {"ig": lambda: tk.integrated_gradients(model, x, target=1, steps=8,
                                                   max_memory="1MB"),
             "ig_adaptive": lambda: tk.integrated_gradients(model, x, target=1, rule="adaptive",
                                                            tol=10.0, max_memory="1MB"),
             "eg": lambda: tk.expected_gradients(model, x, torch.randn(6, 5), target=1,
                                                 samples=4, seed=0, max_memory="1MB"),
             "layer_ig": lambda: tk.layer_integrated_gradients(model, model[0], x, target=1,
                                                               steps=8, max_memory="1MB")}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with tk.allow_row_coupling(model):
        res = calls[call]()
    assert torch.isfinite(res.attributions).all()
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


class MixesRows(nn.Module):
    """Subtracts a fraction of the batch mean: rows couple without batch norm."""

    def __init__(self):
        super().__init__()
        self.l = nn.Linear(4, 2)

    def forward(self, x):
        h = self.l(x)
        return torch.tanh(h - 0.5 * h.mean(0, keepdim=True))


class Noisy(nn.Module):
    def __init__(self):
        super().__init__()
        self.l = nn.Linear(4, 8)

    def forward(self, x):
        return nn.functional.dropout(torch.tanh(self.l(x)), 0.5, training=True)


@pytest.mark.parametrize("cls, why", [(MixesRows, "mixes rows"), (Noisy, "random")])
@pytest.mark.parametrize("batch", [1, 3])
def test_batch_mixing_and_random_models_are_detected(cls, why, batch):
    torch.manual_seed(0)
    model = cls().double()
    x = torch.randn(batch, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match=why):
        tk.integrated_gradients(model, x, target=0, steps=4)
    with pytest.raises(ValueError, match=why):
        tk.layer_integrated_gradients(model, model.l, x, target=0, steps=4)
    with tk.allow_row_coupling(model):
        tk.integrated_gradients(model, x, target=0, steps=4)


def test_row_check_rides_on_the_endpoint_forward():
    """IG's probes cost two forwards (row 0 alone, then the endpoint batch, which doubles as
    check R's batch); the path then runs in the chunks asked for."""
    model = CountingMLP()
    x = torch.randn(3, 4, dtype=torch.float64)
    tk.integrated_gradients(model, x, target=0, steps=4, chunk_size=12)
    assert model.calls == 3


def test_row_check_waits_for_a_batch_that_can_show_mixing():
    """Check R runs on the first batch whose rows differ: the baseline equal to the only
    input makes every batch alike (no mixing can show, and the attributions are zero), a
    baseline apart from it lets the endpoint batch show it; GradientShap's first path chunk
    shows it too. A call of one-row batches runs one more forward of one of its rows."""
    torch.manual_seed(0)
    model = MixesRows().double()
    x = torch.randn(1, 4, dtype=torch.float64)
    assert tk.integrated_gradients(model, x, x, target=0, steps=4).attributions.abs().max() == 0
    with pytest.raises(ValueError, match="mixes rows"):
        tk.integrated_gradients(model, x, torch.zeros_like(x), target=0, steps=4)
    with pytest.raises(ValueError, match="mixes rows"):
        tkc.GradientShap(model).attribute(x, torch.zeros(2, 4, dtype=torch.float64), target=0,
                                          n_samples=3)
    counting = CountingMLP()
    tkc.GradientShap(counting).attribute(x, torch.zeros(2, 4, dtype=torch.float64), target=0,
                                         n_samples=1)
    assert counting.calls == 2  # Captum's one forward of the one noisy row, and that row
    # again at the end (a random model gives another output)


def test_row_predicates_shared_by_the_row_checks():
    """``is_row_tensor`` / ``rows_differing``: the per-row tests that check R (engine, layer
    ends, the distinct partner row) all use."""
    from taylor_kernels.engine import guards

    x = torch.tensor([[1.0, 2.0], [1.0, 2.0], [1.0, 3.0]])
    mask = torch.tensor([[1, 1], [0, 1], [1, 1]])
    assert guards.is_row_tensor(x, 3) and not guards.is_row_tensor(x, 2)
    assert not guards.is_row_tensor(torch.tensor(3.0), 3) and not guards.is_row_tensor([1] * 3, 3)
    assert guards.rows_differing([x]).tolist() == [False, False, True]
    assert guards.rows_differing([x, mask]).tolist() == [False, True, True]
    assert guards.rows_differing([x, mask], ref=2).tolist() == [True, True, False]
    assert guards.distinct_row(x, x[0])[1] == 2
    assert guards.distinct_row(x[:2], x[0] * 2, mask[:2])[1] == 1
    partner, index = guards.distinct_row(x[:2], x[0])
    assert index == 0 and torch.equal(partner, x[0] + 1)


class MixesBeforeLayer(nn.Module):
    """Mixes rows before ``l`` only: the coupling shows in ``l``'s activations, not after."""

    def __init__(self):
        super().__init__()
        self.l = nn.Linear(4, 2)

    def forward(self, x):
        return torch.tanh(self.l(x - 0.5 * x.mean(0, keepdim=True)))


@pytest.mark.parametrize("cls, why", [(MixesRows, "mixes rows"), (Noisy, "random"),
                                      (MixesBeforeLayer, "mixes rows")])
@pytest.mark.parametrize("batch, pair_rows", [(1, 256), (3, 256), (3, 4)])
def test_layer_ig_front_checks_rows_on_its_two_forwards(cls, why, batch, pair_rows,
                                                        monkeypatch):
    """The Captum front's layer IG gets activations, endpoint outputs and check R from row 0
    alone plus one batch of inputs and baselines (attr/layer_ends.py; two batches past
    PAIR_ROWS rows): coupling before the layer, after it, and randomness are all refused; the
    opt-in still runs."""
    from taylor_kernels.attr import layer_ends
    from taylor_kernels.captum import LayerIntegratedGradients
    monkeypatch.setattr(layer_ends, "PAIR_ROWS", pair_rows)
    torch.manual_seed(0)
    model = cls().double()
    x = torch.randn(batch, 4, dtype=torch.float64)
    lig = LayerIntegratedGradients(model, model.l)
    with pytest.raises(ValueError, match=why):
        lig.attribute(x, target=0, n_steps=4)
    with tk.allow_row_coupling(model):
        lig.attribute(x, target=0, n_steps=4)


@pytest.mark.parametrize("pair_rows, forwards", [(256, 2), (4, 3)])
def test_layer_ig_front_costs_two_small_forwards(pair_rows, forwards, monkeypatch):
    """Two forwards before the path (row 0 alone; inputs and baselines in one batch), as
    Captum's two (three past PAIR_ROWS rows: inputs and baselines apart); then the path
    chunks. Equal to the separate captures the opt-in runs."""
    from taylor_kernels.attr import layer_ends
    from taylor_kernels.captum import LayerIntegratedGradients
    monkeypatch.setattr(layer_ends, "PAIR_ROWS", pair_rows)
    model = CountingMLP()
    x = torch.randn(3, 4, dtype=torch.float64)
    lig = LayerIntegratedGradients(model, model.l)
    attr, delta = lig.attribute(x, target=0, n_steps=4, internal_batch_size=12,
                                return_convergence_delta=True)
    assert model.calls == forwards + 1  # + one path chunk; the delta reuses the ends
    with tk.allow_row_coupling(model):  # the opt-in keeps the separate captures
        again = lig.attribute(x, target=0, n_steps=4, internal_batch_size=12)
    torch.testing.assert_close(attr, again, rtol=1e-12, atol=1e-12)
    assert delta.abs().max() < 1e-2


def test_layer_ig_front_sees_mixing_when_a_batch_can_show_it():
    """Baseline equal to the input: every batch's rows are alike (no mixing can show; the
    attributions are zero); another baseline lets the captures show it."""
    torch.manual_seed(0)
    from taylor_kernels.captum import LayerIntegratedGradients
    model = MixesRows().double()
    x = torch.randn(1, 4, dtype=torch.float64)
    same = LayerIntegratedGradients(model, model.l).attribute(x, x, target=0, n_steps=4)
    assert same.abs().max() == 0
    with pytest.raises(ValueError, match="mixes rows"):
        LayerIntegratedGradients(model, model.l).attribute(x, torch.zeros_like(x), target=0,
                                                           n_steps=4)


class CountingMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.l = nn.Linear(4, 2).double()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return torch.tanh(self.l(x))


class FakeAllocator:
    """Stands in for the CUDA caching allocator's statistics (no GPU needed), with its size
    rules: sizes round up to 512 bytes, or with ``divisions`` (``roundup_power2_divisions``) to
    a division of their power-of-two interval; a request over 1 MiB may be served by a cached
    block up to 1 MiB larger (``slack``: the remainder is not split off and counts)."""

    def __init__(self, allocated: int, peak: int, slack: int = 0, divisions: int = 0):
        self.allocated, self.peak, self.slack, self.divisions = allocated, peak, slack, divisions

    def alloc(self, n: int):
        self.allocated += n
        self.peak = max(self.peak, self.allocated)

    def size_of(self, n: int) -> int:
        if self.divisions > 1 and n > 512 * self.divisions and n & (n - 1):
            step = (1 << (n.bit_length() - 1)) // self.divisions
            n = -(-n // step) * step
        n = -(-n // 512) * 512
        return n + self.slack if n > 2**20 else n

    def install(self, monkeypatch):
        cuda = torch.cuda
        monkeypatch.setattr(cuda, "synchronize", lambda device=None: None)
        monkeypatch.setattr(cuda, "memory_allocated", lambda device=None: self.allocated)
        monkeypatch.setattr(cuda, "max_memory_allocated", lambda device=None: self.peak)
        monkeypatch.setattr(cuda, "memory_stats", lambda device=None: {"max_split_size": -1})
        monkeypatch.setattr(cuda, "memory_reserved", lambda device=None: self.allocated)
        monkeypatch.setattr(cuda, "mem_get_info", lambda device=None: (2**40, 2**40))
        monkeypatch.setattr(cuda, "reset_peak_memory_stats",
                            lambda device=None: setattr(self, "peak", self.allocated))
        real_empty = torch.empty

        def empty(n, dtype=None, device=None):  # a uint8 block, freed with the tensor
            size = self.size_of(n)
            self.alloc(size)
            block = real_empty(0)
            weakref.finalize(block, lambda: setattr(self, "allocated", self.allocated - size))
            return block

        monkeypatch.setattr(torch, "empty", empty)


MiB = 2**20


@pytest.mark.parametrize("probe,above,slack,divisions", [
    (51200, 64 * MiB, 0, 0), (51200, 64 * MiB, 700 * 1024, 0), (51200, 64 * MiB, MiB, 0),
    (256 * MiB, 3 * MiB, 0, 0), (100 * MiB, MiB, MiB, 0), (64 * MiB, 512, 0, 0),
    (10 * MiB, 59 * MiB + 512 * 9, 0, 4), (300 * MiB, 5 * MiB + 512, MiB, 8)])
@pytest.mark.parametrize("raises", [False, True])
def test_cuda_peak_probe_keeps_the_callers_peak(monkeypatch, raises, probe, above, slack,
                                                divisions):
    """Exactly the old peak: after small and large probes, with the allocator handing out
    larger blocks than asked and rounding sizes (``roundup_power2_divisions``)."""
    from taylor_kernels.engine import guards
    live = 512 * 200
    old_peak = live + probe + above
    fake = FakeAllocator(allocated=live, peak=old_peak, slack=slack, divisions=divisions)
    fake.install(monkeypatch)

    def run():
        fake.alloc(probe)   # the probe's transient memory
        fake.allocated -= probe
        if raises:
            raise RuntimeError("probe failed")
        return "out"

    if raises:
        with pytest.raises(RuntimeError, match="probe failed"):
            guards.cuda_peak_bytes(run, torch.device("cuda"))
    else:
        assert guards.cuda_peak_bytes(run, torch.device("cuda")) == ("out", float(probe))
    assert fake.peak == old_peak and fake.allocated == live


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", ["integrated_gradients", "integrated_hessians", "hvp",
                                  "captum.LayerIntegratedGradients"])
def test_state_is_kept_on_cuda(name):
    model, x = _model().cuda(), _x().cuda()
    big = torch.empty(64 * 2**20, dtype=torch.uint8, device="cuda")
    del big  # the caller's peak is now far above what the call needs
    assert checked(METHODS[name], model, x, "ok") is None


class MixesBatch(Net):
    """Net minus half its batch-mean output: rows couple without any batch norm."""

    def forward(self, x):
        out = super().forward(x)
        return out - 0.5 * out.mean(0, keepdim=True)


@pytest.mark.parametrize("name", sorted(n for n in METHODS if "Neuron" not in n))
def test_every_method_refuses_a_batch_mixing_model(name):
    """(The neuron methods attribute a conv neuron, which the output's mixing cannot reach.)"""
    torch.manual_seed(0)
    model = MixesBatch().double().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="mixes rows"):
            METHODS[name](model, _x())


def test_non_finite_outputs_are_not_taken_for_coupling():
    model = nn.Sequential(nn.Linear(3, 2)).double()
    f = lambda z: torch.log(model(z)[:, 0])  # noqa: E731 - NaN where the logit is negative
    x = torch.randn(2, 3, dtype=torch.float64)
    assert tk.hvp(f, x, x).shape == x.shape


def test_probes_restore_reassigned_and_updated_buffers():
    from taylor_kernels.engine import guards

    class Stateful(nn.Module):
        def __init__(self):
            super().__init__()
            self.l = nn.Linear(3, 1)
            self.register_buffer("calls", torch.zeros(()))
            self.register_buffer("last", torch.zeros(3))

        def forward(self, x):
            self.calls += 1                   # in place
            self.last = x[0].detach().clone()  # reassigned
            return self.l(x)

    model = Stateful().double()
    calls, last = model.calls, model.last
    with guards.preserved_buffers(model):
        model(torch.ones(2, 3, dtype=torch.float64))
    assert model.calls is calls and model.last is last
    assert model.calls == 0 and torch.equal(model.last, torch.zeros(3))


def test_front_llm_attribution_runs_a_train_mode_model_as_captum():
    """LLMGradientAttribution has no forward_func: the train-mode path missed its model, and
    the one pass raised (then its causality check blamed dropout's noise on the model)."""
    from taylor_kernels.models import tiny
    words = "the cat sat on a mat dog ran far away".split()
    tok = tiny.word_tokenizer(words)
    torch.manual_seed(0)
    m = tiny.gpt2(layers=1, d=32, vocab=len(tok))
    for mod in m.modules():
        if isinstance(mod, nn.Dropout):
            mod.p = 0.1
    m.train()
    inp = tkc.TextTokenInput("the cat sat on a mat", tok, baselines="<unk>",
                             skip_tokens=["<s>"])
    with pytest.warns(RuntimeWarning, match="train mode"):
        res = tkc.LLMGradientAttribution(tkc.LayerIntegratedGradients(
            m, m.get_input_embeddings()), tok).attribute(inp, target="dog ran far", n_steps=4)
    assert res.token_attr.shape[0] == 3 and torch.isfinite(res.token_attr).all()
    assert m.training
