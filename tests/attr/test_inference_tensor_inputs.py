"""Every public function attributes tensors made under ``torch.inference_mode()`` (an eval
loop's inputs, baselines, directions, forward arguments) as it attributes normal copies of
them: Captum does, and the core API raised "input 0 is an inference tensor"."""
from __future__ import annotations

import inspect
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import taylor_kernels as tk
from taylor_kernels.models.hf import token_integrated_gradients, token_interactions


class _Conv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.head = nn.Linear(3 * 4 * 4, 3)

    def forward(self, x, scale):
        return self.head(torch.tanh(self.conv(x) * scale[:, None, None, None]).flatten(1))


class _Tokens(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 4)
        self.out = nn.Linear(4, 3)

    def get_input_embeddings(self):
        return self.emb

    def forward(self, input_ids, attention_mask=None):
        h = torch.tanh(self.emb(input_ids))
        if attention_mask is not None:
            h = h * attention_mask[..., None]
        return self.out(h.mean(1))


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double().eval()


def _tensors():
    g = torch.Generator().manual_seed(1)
    return dict(x=torch.randn(2, 4, generator=g, dtype=torch.float64),
                b=torch.randn(2, 4, generator=g, dtype=torch.float64),
                v=torch.randn(2, 4, generator=g, dtype=torch.float64),
                dirs=torch.randn(2, 2, 4, generator=g, dtype=torch.float64),
                img=torch.randn(2, 2, 4, 4, generator=g, dtype=torch.float64),
                scale=torch.rand(2, generator=g, dtype=torch.float64) + 0.5,
                ids=torch.tensor([[1, 4, 7, 2], [3, 5, 9, 0]]),
                mask=torch.tensor([[1., 1., 1., 1.], [1., 1., 1., 0.]]))


def _f0(m):
    return lambda z: m(z)[:, 0]


CALLS = {
    "integrated_gradients": lambda s, t: tk.integrated_gradients(s.mlp, t["x"], t["b"], target=0,
                                                                 steps=8).attributions,
    "expected_gradients": lambda s, t: tk.expected_gradients(s.mlp, t["x"], t["b"], target=0,
                                                             samples=4, seed=2).attributions,
    "shapley_integrated_gradients": lambda s, t: tk.shapley_integrated_gradients(
        s.mlp, t["x"], t["b"], target=0, coalitions=2, steps=4, seed=2).attributions,
    "layer_integrated_gradients": lambda s, t: tk.layer_integrated_gradients(
        s.mlp, s.mlp[0], t["x"], t["b"], target=0, steps=8).attributions,
    "noise_tunnel": lambda s, t: tk.noise_tunnel(tk.integrated_gradients, s.mlp, t["x"], t["b"],
                                                 target=0, nt_samples=2, stdevs=0.1,
                                                 seed=3).attributions,
    "interactions": lambda s, t: tk.interactions(s.mlp, t["x"], target=0).derivatives,
    "greedy_interaction_sets": lambda s, t: tk.greedy_interaction_sets(
        s.mlp, t["x"], target=0, max_order=2, beam=2)[2][0][1],
    "global_interactions": lambda s, t: tk.global_interactions(s.mlp, t["x"], target=0).strengths,
    "taylor_cam": lambda s, t: tk.taylor_cam(s.conv, "conv", t["img"], target=1,
                                             additional_forward_args=(t["scale"],)).scores,
    "jet": lambda s, t: tk.jet(_f0(s.mlp), t["x"], t["dirs"], 2),
    "mixed_partials": lambda s, t: tk.mixed_partials(_f0(s.mlp), t["x"], [(0, 1), (1, 2, 3)]),
    "fourteen_methods": lambda s, t: tk.fourteen_methods(s.mlp, t["x"], t["b"], target=0)[
        "integrated_gradients"].attributions,
    "taylor_decomposition": lambda s, t: tk.taylor_decomposition(s.mlp, t["x"], t["b"], target=0,
                                                                 order=2).first_order,
    "unification_table": lambda s, t: torch.tensor(tk.unification_table(
        s.mlp, t["x"][:1], t["b"][:1], target=0, order=2, methods=["integrated_gradients"]).rows[0]
        .p1),
    "integrated_hessians": lambda s, t: tk.integrated_hessians(s.mlp, t["x"], t["b"], target=0,
                                                               steps=4).interactions,
    "expected_hessians": lambda s, t: tk.expected_hessians(s.mlp, t["x"], t["b"], target=0,
                                                           samples=4, seed=2).interactions,
    "group_integrated_hessians": lambda s, t: tk.group_integrated_hessians(
        s.mlp, t["x"], torch.tensor([0, 0, 1, 1]), t["b"], target=0, steps=4).interactions,
    "hvp": lambda s, t: tk.hvp(_f0(s.mlp), t["x"], t["v"]),
    "hessian": lambda s, t: tk.hessian(_f0(s.mlp), t["x"]),
    "hessian_block": lambda s, t: tk.hessian_block(_f0(s.mlp), t["x"], t["dirs"]),
    "hessian_diagonal": lambda s, t: tk.hessian_diagonal(_f0(s.mlp), t["x"]),
    "third_order": lambda s, t: tk.third_order(_f0(s.mlp), t["x"], t["v"], t["b"]),
    "token_integrated_gradients": lambda s, t: token_integrated_gradients(
        s.tokens, t["ids"], target=1, steps=8,
        model_kwargs={"attention_mask": t["mask"]}).attributions,
    "token_interactions": lambda s, t: token_interactions(
        s.tokens, t["ids"], target=1, steps=4,
        model_kwargs={"attention_mask": t["mask"]})["interactions"],
    "generation_attribution": lambda s, t: tk.generation_attribution(
        _gpt2(), t["ids"][:1], target_ids=t["ids"][1:, :2], steps=4).token_attr,
}


def _gpt2():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=11, n_positions=16,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg).eval()


def _models() -> SimpleNamespace:
    return SimpleNamespace(mlp=_mlp(), conv=_Conv().double().eval(),
                           tokens=_Tokens().double().eval())


@pytest.mark.parametrize("name", sorted(CALLS))
def test_inference_tensors_are_attributed_as_normal_copies(name):
    models = _models()
    normal = _tensors()
    with torch.inference_mode():
        made_there = {k: v.clone() for k, v in normal.items()}
    assert all(v.is_inference() for v in made_there.values())
    ref = CALLS[name](models, normal)
    got = CALLS[name](models, made_there)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    assert all(v.is_inference() for v in made_there.values())  # the caller's are not touched


def test_every_public_function_taking_tensors_is_covered():
    public = {n for n in tk.__all__ if inspect.isfunction(getattr(tk, n))}
    assert public - {"allow_row_coupling", "cuda_graphs"} <= set(CALLS)


def test_a_call_inside_inference_mode_is_still_refused():
    m, t = _mlp(), _tensors()
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
        tk.integrated_gradients(m, t["x"], target=0, steps=4)
