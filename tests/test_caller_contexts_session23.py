"""Calls in the caller's contexts (session 23 QA): differentiating through layer / token IG,
``third_order`` inside ``torch.func``, an autocast block inside the forward of a jet, a
compiled caller, a jet whose output dtype is not the input's, and ``priors.fit``'s dropout
under the caller's RNG."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import taylor_kernels as tk
import taylor_kernels.captum as tkc
from taylor_kernels import priors
from tests.models import mlp


def test_layer_and_token_ig_refuse_create_graph():
    """The attributions' graph reached only the parameters after the layer: the layer's own,
    earlier ones and the inputs got no gradient (finite differences: -1.8e-2), silently."""
    m = mlp(d_in=5, hidden=8, d_out=2)
    x = torch.randn(3, 5, dtype=torch.float64)
    with pytest.raises(ValueError, match="does not support create_graph=True"):
        tk.layer_integrated_gradients(m, m[2], x, target=1, steps=4, create_graph=True)
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=11,
                                  n_positions=16)
    gpt = transformers.GPT2LMHeadModel(cfg).eval()
    with pytest.raises(ValueError, match="does not support create_graph=True"):
        tk.token_integrated_gradients(gpt, torch.tensor([[1, 4, 7]]), target=2, steps=4,
                                      create_graph=True)


def test_third_order_refuses_torch_func_transforms():
    """It detached x, u and v: under torch.func.jvp its tangent was 0 (finite differences
    0.013, -0.018, -0.030)."""
    m = mlp(d_in=3, hidden=6, d_out=1)
    x, u, v = (torch.randn(1, 3, dtype=torch.float64) for _ in range(3))

    def f(z):
        return tk.third_order(lambda y: m(y)[:, 0], z, u, v)
    with pytest.raises(RuntimeError, match="torch.func transform"):
        torch.func.jvp(f, (x,), (torch.ones_like(x),))
    assert f(x).shape == (1, 3)


class _AutocastInside(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))

    def forward(self, x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return self.body(x).float()


def test_jet_keeps_an_autocast_block_of_the_forward():
    """FX drops the block: the jet was the float32 model's (c_1 -1.0806 where the model's
    derivative is -1.0625)."""
    m = _AutocastInside().eval()
    x = torch.randn(2, 6, generator=torch.Generator().manual_seed(1))
    v = torch.randn(2, 1, 6, generator=torch.Generator().manual_seed(2))
    with pytest.warns(RuntimeWarning, match="enters torch.autocast"):
        c = tk.jet(lambda z: m(z)[:, 1], x, v, order=1)
    value, slope = torch.func.jvp(lambda z: m(z)[:, 1], (x,), (v[:, 0],))
    torch.testing.assert_close(c[0, :, 0], value, rtol=0, atol=0)
    torch.testing.assert_close(c[1, :, 0], slope, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["ig", "ih", "front_lig"])
def test_a_compiled_caller_graph_breaks_around_the_call(name):
    """Dynamo traced into the engine: IG failed at a second batch size (.nbytes of a symbolic
    size), IH at once, the front's layer IG on fake tensors."""
    m = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).eval()
    call = {"ig": lambda x: tk.integrated_gradients(m, x, target=1, steps=8).attributions,
            "ih": lambda x: tk.integrated_hessians(m, x, target=1, steps=2).interactions,
            "front_lig": lambda x: tkc.LayerIntegratedGradients(m, m[0]).attribute(
                x, target=1, n_steps=8)}[name]
    compiled = torch.compile(call, backend="eager")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for B in (2, 3):
            x = torch.randn(B, 6, generator=torch.Generator().manual_seed(B))
            torch.testing.assert_close(compiled(x), call(x), rtol=1e-6, atol=1e-7)


def test_mixed_partials_of_a_float64_output_of_float32_inputs():
    """The contraction cast its weights to x's dtype: "addmv input tensors must have the same
    dtype"."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)).eval()
    x = torch.randn(2, 4)
    got = tk.mixed_partials(lambda z: m(z).double()[:, 1], x, [(0, 1), (2, 2)])
    h = tk.hessian(lambda z: m(z)[:, 1], x)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, torch.stack([h[:, 0, 1], h[:, 2, 2]], 1).double(),
                               rtol=1e-4, atol=1e-6)


def test_fit_with_dropout_is_reproducible_and_keeps_the_callers_rng():
    """The dropout masks came from the caller's global RNG: two global seeds gave parameters
    8.3e-3 apart after 3 epochs, and the caller's RNG moved."""
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(40, 5, generator=g), torch.randint(0, 2, (40,), generator=g)

    def run(global_seed):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 2))
        torch.manual_seed(global_seed)
        before = torch.get_rng_state()
        priors.fit(model, (X, y), (X, y), epochs=3, batch_size=8, seed=0)
        assert torch.equal(torch.get_rng_state(), before)
        return torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    torch.testing.assert_close(run(5), run(6), rtol=0, atol=0)
