"""``tk.noise_tunnel`` on integer token ids: over layer IG the noise goes on the embedding
layer's activation (checked against IG on explicitly noised embeddings); other methods raise."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import taylor_kernels as tk

F64 = torch.float64


class TokenModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 4)
        self.head = nn.Sequential(nn.Linear(12, 5), nn.Tanh(), nn.Linear(5, 2))

    def forward(self, ids):
        return self.head(self.emb(ids).flatten(1))


@pytest.fixture
def model_and_ids():
    torch.manual_seed(0)
    return TokenModel().to(F64), torch.tensor([[3, 1, 7], [2, 9, 4]])


@pytest.mark.parametrize("nt_type", ["smoothgrad", "vargrad"])
def test_noise_goes_on_the_embeddings(model_and_ids, nt_type):
    model, ids = model_and_ids
    n, std, steps = 3, 0.3, 12
    res = tk.noise_tunnel(tk.layer_integrated_gradients, model, ids, model.emb, 0, target=1,
                          steps=steps, nt_type=nt_type, nt_samples=n, stdevs=std, seed=7)
    # by hand: IG of the head from the baseline embedding to the noised input embedding
    rep = ids.repeat_interleave(n, 0)
    noise = torch.randn((rep.shape[0], 3, 4), generator=torch.Generator().manual_seed(7),
                        dtype=F64)
    with torch.no_grad():
        a_x, a_b = model.emb(rep) + std * noise, model.emb(torch.zeros_like(rep))
    ref = tk.integrated_gradients(lambda a: model.head(a.flatten(1)), a_x, a_b, target=1,
                                  steps=steps)
    per_copy = ref.attributions.reshape(2, n, 3, 4)
    expect = per_copy.mean(1) if nt_type == "smoothgrad" else \
        per_copy.pow(2).mean(1) - per_copy.mean(1).pow(2)
    assert res.attributions.shape == (2, 3, 4)
    torch.testing.assert_close(res.attributions, expect, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(res.gap, ref.gap.reshape(2, n).mean(1), rtol=1e-8, atol=1e-10)
    assert not model.emb._forward_hooks and not model.emb._forward_pre_hooks


def test_zero_noise_equals_layer_ig(model_and_ids):
    model, ids = model_and_ids
    plain = tk.layer_integrated_gradients(model, model.emb, ids, target=0, steps=8)
    sg = tk.noise_tunnel(tk.layer_integrated_gradients, model, ids, model.emb, target=0,
                         steps=8, nt_samples=2, stdevs=0.0, seed=1)
    torch.testing.assert_close(sg.attributions, plain.attributions, rtol=1e-12, atol=1e-14)


def test_ids_with_an_input_space_method_raise(model_and_ids):
    model, ids = model_and_ids
    with pytest.raises(TypeError, match="integer ids.*layer_integrated_gradients"):
        tk.noise_tunnel(tk.integrated_gradients, model, ids, target=0, stdevs=0.1)
    with pytest.raises(ValueError, match="one stdev"):
        tk.noise_tunnel(tk.layer_integrated_gradients, model, (ids, ids), model.emb,
                        stdevs=(0.1, 0.2))


def test_float_inputs_take_the_noise_over_layer_ig():
    """``noise_tunnel(layer_integrated_gradients, model, x, layer, ...)`` on float inputs
    passed the layer where layer IG takes its inputs ("inputs must be a tensor ..."), and
    ``layer=`` gave "multiple values for 'layer'". Now the noise goes on the inputs, as
    Captum's NoiseTunnel over LayerIntegratedGradients does: equal to layer IG of the noised
    copies (the same draws), averaged."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2)).to(F64)
    x = torch.randn(2, 4, dtype=F64)
    n, std = 3, 0.2
    for call in (lambda: tk.noise_tunnel(tk.layer_integrated_gradients, model, x, model[1],
                                         target=1, steps=8, nt_samples=n, stdevs=std, seed=5),
                 lambda: tk.noise_tunnel(tk.layer_integrated_gradients, model, x,
                                         layer=model[1], target=1, steps=8, nt_samples=n,
                                         stdevs=std, seed=5)):
        res = call()
        noise = torch.randn((2 * n, 4), generator=torch.Generator().manual_seed(5), dtype=F64)
        noisy = x.repeat_interleave(n, 0) + std * noise
        ref = tk.layer_integrated_gradients(model, model[1], noisy, target=1, steps=8)
        torch.testing.assert_close(res.attributions,
                                   ref.attributions.reshape(2, n, 5).mean(1), rtol=1e-12,
                                   atol=1e-14)
    with pytest.raises(TypeError, match="give the layer"):
        tk.noise_tunnel(tk.layer_integrated_gradients, model, x, target=1)


@pytest.mark.parametrize("stdevs", [-0.1, float("nan"), float("inf"), torch.tensor([0.1, -1.0]),
                                    torch.ones(3)])
def test_bad_stdevs_are_refused_before_any_forward(stdevs):
    """A negative std was taken as it was; NaN was reported as NaN in input 0."""
    model = nn.Sequential(nn.Linear(3, 2)).eval()
    with pytest.raises(ValueError, match="each stdev must be"):
        tk.noise_tunnel(tk.integrated_gradients, model, torch.randn(2, 3), target=0,
                        stdevs=stdevs, steps=2)


def test_per_row_stdevs_scale_each_rows_noise():
    model = nn.Sequential(nn.Linear(3, 1, bias=False)).eval()
    x = torch.randn(2, 3, dtype=torch.float64)
    model.double()
    std = torch.tensor([0.0, 2.0], dtype=torch.float64)
    res = tk.noise_tunnel(tk.integrated_gradients, model, x, target=0, stdevs=std,
                          nt_samples=4, seed=0, steps=2, nt_type="vargrad")
    assert float(res.attributions[0].abs().max()) == 0.0  # no noise on row 0
    assert float(res.attributions[1].abs().min()) > 0.0
