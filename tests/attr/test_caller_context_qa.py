"""Unusual models and caller contexts found by a QA pass (2026-12-03): in-place ops after the
attributed layer, activation checkpointing under the jet engine, expanded inputs, the
default dtype under seeded sampling."""
from __future__ import annotations

import pytest
import torch

import taylor_kernels as tk

F64 = torch.float64


def _mlp(inplace: bool) -> torch.nn.Sequential:
    torch.manual_seed(4)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(inplace=inplace),
                               torch.nn.Linear(8, 8), torch.nn.Tanh(),
                               torch.nn.Linear(8, 3)).double().eval()


@pytest.mark.parametrize("layer_index,of_input", [(0, False), (1, True)])
def test_layer_ig_reads_the_layer_before_a_later_in_place_op(layer_index, of_input):
    """An in-place ReLU after the layer (or the layer itself changing its input in place)
    must not change the endpoint activations layer IG integrates between: the numbers equal
    those of the same model without the in-place op."""
    x = 2 * torch.randn(3, 4, dtype=F64)
    plain, inplace = _mlp(False), _mlp(True)
    want = tk.layer_integrated_gradients(plain, plain[layer_index], x, target=1, steps=32,
                                         attribute_to_layer_input=of_input)
    got = tk.layer_integrated_gradients(inplace, inplace[layer_index], x, target=1, steps=32,
                                        attribute_to_layer_input=of_input)
    torch.testing.assert_close(got.attributions, want.attributions)
    torch.testing.assert_close(got.gap, want.gap)


class _Block(torch.nn.Module):
    """``tanh(l1(z))``, optionally under ``torch.utils.checkpoint`` (reentrant: its forward
    runs with grad disabled, as a ``no_grad`` block's would)."""

    def __init__(self, checkpointed: bool):
        super().__init__()
        torch.manual_seed(0)
        self.l1, self.l2 = torch.nn.Linear(4, 8).double(), torch.nn.Linear(8, 3).double()
        self.checkpointed = checkpointed

    def block(self, z):
        return torch.tanh(self.l1(z))

    def forward(self, x):
        h = torch.utils.checkpoint.checkpoint(self.block, x, use_reentrant=True) \
            if self.checkpointed else self.block(x)
        return self.l2(h)[:, 1]


@pytest.mark.filterwarnings("ignore:None of the inputs have requires_grad")
def test_jet_runs_through_reentrant_checkpointing():
    """Activation checkpointing does not change the function: its jet and mixed partials are
    those of the same model without it (they were 0 past order 0: the checkpoint's forward,
    run with grad disabled, was taken for a ``no_grad`` block)."""
    x = torch.randn(3, 4, dtype=F64)
    v = torch.randn(3, 2, 4, dtype=F64)
    plain, checkpointed = _Block(False).eval(), _Block(True).eval()
    torch.testing.assert_close(tk.jet(checkpointed, x, v, order=3), tk.jet(plain, x, v, order=3))
    torch.testing.assert_close(tk.mixed_partials(checkpointed, x, sets=[(0, 1), (1, 2, 3)]),
                               tk.mixed_partials(plain, x, sets=[(0, 1), (1, 2, 3)]))


class _OldStyleTanh(torch.autograd.Function):
    """``tanh`` with its own backward and no ``setup_context``/``jvp``."""

    @staticmethod
    def forward(ctx, x):
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return g * (1 - y * y)


def test_jet_does_not_take_a_custom_function_for_a_constant():
    """A custom ``autograd.Function``'s forward runs with grad disabled; the jet must not
    treat it as a ``no_grad`` block (silently zero derivatives): its derivative is the
    Function's own, so forward mode either uses its ``jvp`` or raises torch's error."""
    torch.manual_seed(1)
    lin = torch.nn.Linear(3, 4).double()
    x, v = torch.randn(2, 3, dtype=F64), torch.randn(2, 1, 3, dtype=F64)

    def through_old_style_function(z):
        return _OldStyleTanh.apply(lin(z)).sum(1)
    with pytest.warns(RuntimeWarning, match="could not trace"), \
            pytest.raises(RuntimeError, match="setup_context"):
        tk.jet(through_old_style_function, x, v, order=2)


def test_third_order_takes_expanded_inputs():
    """An expanded (stride-0) ``x`` gives the numbers of its contiguous copy (it raised "more
    than one element of the written-to tensor refers to a single memory location")."""
    torch.manual_seed(2)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(),
                                torch.nn.Linear(6, 1), torch.nn.Flatten(0)).double()
    row, u, v = torch.randn(1, 4, dtype=F64), torch.randn(3, 4, dtype=F64), \
        torch.randn(3, 4, dtype=F64)
    x = row.expand(3, 4)
    torch.testing.assert_close(tk.third_order(model, x, u, v),
                               tk.third_order(model, x.contiguous(), u, v))


def test_shapley_ig_draws_do_not_depend_on_the_default_dtype():
    """The same seed draws the same coalitions under a float64 default dtype (the uniform
    draws behind the permutations followed it: 0.045 apart on a float32 model)."""
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2))
    x = torch.randn(2, 5)
    want = tk.shapley_integrated_gradients(model, x, target=1, coalitions=4, steps=4,
                                           seed=7).attributions
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        got = tk.shapley_integrated_gradients(model, x, target=1, coalitions=4, steps=4,
                                              seed=7).attributions
    finally:
        torch.set_default_dtype(before)
    torch.testing.assert_close(got, want)


def test_integrated_gradients_of_a_compiled_model_after_a_forward_mode_call():
    """The memory probe's saved-tensor hook is traced when the model is compiled: after a
    forward-mode call recompiled the model, every IG call on it failed ("'NoneType' object
    has no attribute 'is_leaf'", inside the hook) for the rest of the process."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(),
                                torch.nn.Linear(8, 3)).eval()
    x = torch.randn(2, 6)
    compiled = torch.compile(model, backend="aot_eager")
    want = tk.integrated_gradients(model, x, target=1).attributions
    torch._dynamo.reset()
    try:
        tk.interactions(compiled, x, target=1, order=2, sets=[(0, 1)])
        got = tk.integrated_gradients(compiled, x, target=1).attributions
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(got, want)


def test_a_non_finite_gradient_says_when_the_output_itself_is_non_finite():
    """A model whose output is NaN at a path point (an eager-attention Llama's fully masked
    row) is named as the cause; a NaN only in the gradient (``where`` over a NaN branch) is
    not."""
    x = torch.tensor([[-2.0, -1.0], [1.0, 2.0]], dtype=F64)
    with pytest.raises(FloatingPointError, match="output itself is non-finite"):
        tk.integrated_gradients(lambda z: z.sum(1).sqrt(), x, steps=4)
    with pytest.raises(FloatingPointError) as info:
        tk.integrated_gradients(lambda z: torch.where(z > 100, z.sqrt(), z).sum(1), -x,
                                steps=4)
    assert "non-finite gradient" in str(info.value)
    assert "output itself" not in str(info.value)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_forward_mode_calls_say_that_backward_hooks_do_not_run():
    """A gradient-changing backward hook enters ``tk.hessian`` (reverse mode) but not the
    jet engine's forward mode: ``jet`` / ``mixed_partials`` / ``interactions`` say so (their
    mixed partial was half the Hessian's entry, silently); without hooks they are silent."""
    import warnings
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(),
                                torch.nn.Linear(8, 3)).double().eval()
    x = torch.randn(2, 4, dtype=F64)

    def calls():
        tk.mixed_partials(lambda z: model(z)[:, 1], x, sets=[(0, 1)])
        tk.interactions(model, x, target=1, order=2, sets=[(0, 1)])
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        calls()
    hook = model[1].register_full_backward_hook(lambda mod, gin, gout: (gin[0] * 2,))
    try:
        with pytest.warns(RuntimeWarning, match="backward hooks do not run .*Tanh") as record:
            calls()
        with warnings.catch_warnings():  # (order 2 without sets: the Hessian, reverse mode)
            warnings.simplefilter("error", RuntimeWarning)
            tk.interactions(model, x, target=1, order=2)
    finally:
        hook.remove()
    assert {str(w.message).split()[0] for w in record} >= {"tk.jet", "interactions"}


def test_fallback_warnings_name_the_callers_setting():
    """Anomaly mode (which vmap cannot batch) and autocast (which the exact rule's traced
    graph runs without) are named as the cause of the fallbacks they trigger; the warnings
    blamed the model ("for this model", "forward hooks, or Python that depends on values?")."""
    from taylor_kernels.engine import derivative
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    x = torch.randn(2, 6)
    derivative._warned.clear()  # (once per process: another test may have said it)
    with torch.autograd.set_detect_anomaly(True), \
            pytest.warns(RuntimeWarning, match="set_detect_anomaly"):
        tk.hessian(lambda z: model(z)[:, 1], x)
    relu = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    with torch.autocast("cpu", dtype=torch.bfloat16), \
            pytest.warns(RuntimeWarning, match="torch.autocast is on"):
        tk.integrated_gradients(relu, x, target=1, rule="exact")


class _NonReentrant(_Block):
    """``_Block`` under ``checkpoint(use_reentrant=False)``, whose backward recomputes it."""

    def forward(self, x):
        return self.l2(torch.utils.checkpoint.checkpoint(self.block, x,
                                                         use_reentrant=False))[:, 1]


def test_a_layer_recomputed_by_checkpointing_is_refused():
    """Layer methods replace the layer's activation in the forward; non-reentrant
    checkpointing recomputes it in the backward without the replacement, so layer IG was
    12-15% off (as Captum's), silently: the layer methods raise; input-space IG and a layer
    outside the checkpointed block are unaffected."""
    import taylor_kernels.captum as tc
    x = torch.randn(3, 4, dtype=F64)
    model, plain = _NonReentrant(False).eval(), _Block(False).eval()
    with pytest.raises(ValueError, match="checkpoint"):
        tk.layer_integrated_gradients(model, model.l1, x, steps=8)
    for cls in (tc.LayerIntegratedGradients, tc.LayerConductance):
        with pytest.raises(ValueError, match="checkpoint"):
            cls(model, model.l1).attribute(x, n_steps=8)
    torch.testing.assert_close(
        tk.layer_integrated_gradients(model, model.l2, x, steps=8).attributions,
        tk.layer_integrated_gradients(plain, plain.l2, x, steps=8).attributions)
    torch.testing.assert_close(tk.integrated_gradients(model, x, steps=8).attributions,
                               tk.integrated_gradients(plain, x, steps=8).attributions)
