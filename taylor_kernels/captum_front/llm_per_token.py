"""Captum's per-token loop for :class:`~taylor_kernels.captum.LLMGradientAttribution`, for what
the one pass does not cover: ``LayerGradientShap`` and ``LayerGradientXActivation``, layer IG
with ``multiply_by_inputs=False`` or with ``attribute()`` arguments of its own (``baselines``,
``attribute_to_layer_input``, ...), and a layer after the positions mix.

For target token ``t`` the method attributes ``log p(y_t | prompt, y_<t)`` (:class:`TokenLogProb`)
with the prompt's interpretable features as its input (``inp.to_tensor()``, ones; the forward
puts the baseline token where a feature is not 1, as ``TextTokenInput.to_model_input`` does),
keeps the prompt's positions of the layer attribution ``[1, P + t, ...]`` and sums the rest
of its dimensions: row ``t`` of ``token_attr [T, P]``, as Captum's class computes it. Our
methods run on the engine (one call per target token); Captum's instances run Captum's code.
"""
from __future__ import annotations

import copy
from collections.abc import Mapping

import torch

from taylor_kernels.engine.derivative import cpu_flex_as_eager
from taylor_kernels.models.outputs import lm_logits
from taylor_kernels.progress import progress_bar


def model_ids(model_input) -> torch.Tensor:
    """Token ids ``[N, L]`` from what ``inp.to_model_input(...)`` returned, read as Captum's
    gradient class reads it: a tensor as it is, a mapping's ``"input_ids"``."""
    ids = model_input.get("input_ids") if isinstance(model_input, Mapping) else model_input
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        raise TypeError(f"to_model_input must return token ids [N, L] (a tensor, or a mapping "
                        f"with 'input_ids'), got {type(model_input).__name__}")
    return ids


class TokenLogProb(torch.nn.Module):
    """``forward(features [N, F]) -> [N]``: the log-probability of the last of ``targets``
    after the prompt ``inp.to_model_input(features)`` and the targets before it (the logits
    are the model output's by :func:`~taylor_kernels.models.outputs.lm_logits`: ``.logits``
    for Hugging Face models, a base model's hidden states refused, a target outside the head
    an ``IndexError``). Captum passes ``(inp, targets, t)`` as additional forward arguments
    instead; bound here, no argument can be mistaken for a batch."""

    def __init__(self, model: torch.nn.Module, device: torch.device, inp,
                 targets: torch.Tensor) -> None:
        super().__init__()
        self.model, self.device, self.inp = model, device, inp
        self.targets = targets.to(device)
        emb = getattr(model, "get_input_embeddings", None)
        rows = getattr(emb(), "num_embeddings", None) if callable(emb) else None
        self.vocab = rows if isinstance(rows, int) else None

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        ids = model_ids(self.inp.to_model_input(features)).to(self.device)
        before = self.targets[:-1]
        ids = torch.cat([ids, before.expand(ids.shape[0], -1)], 1)
        logits = lm_logits(self.model(ids), self.vocab, "LLMGradientAttribution",
                           targets=self.targets[-1:])[:, -1]
        return torch.log_softmax(logits, dim=1)[:, self.targets[-1]]


def per_token_attributions(attr_method, model: torch.nn.Module, device: torch.device, inp,
                           target_ids: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """``token_attr [T, n_itp_features]`` by one ``attr_method.attribute(features, **kwargs)``
    call per target token ``t``, on a shallow copy of ``attr_method`` whose forward is a new
    :class:`TokenLogProb` for ``target_ids[:t + 1]`` (a new owner: costs cached for one
    sequence length are not reused for another). The features are float ones (methods that
    interpolate their input need floats; the forward reads only which features are 1).
    ``progress`` in ``kwargs``: a bar over the target tokens (not passed on)."""
    method = copy.copy(attr_method)
    features = inp.to_tensor().to(device=device, dtype=torch.get_default_dtype())
    P = model_ids(inp.to_model_input(features)).shape[1]  # Captum's: what the model reads
    kwargs = dict(kwargs)
    progress = kwargs.pop("progress", False)  # one bar over the target tokens
    rows = []
    for t in progress_bar(progress, range(target_ids.shape[0]), desc="target tokens"):
        method.forward_func = TokenLogProb(model, device, inp, target_ids[:t + 1])
        with cpu_flex_as_eager(model):  # (Captum's own methods too: no flex backward there)
            attr = method.attribute(features, **kwargs)
        if not isinstance(attr, torch.Tensor):
            raise TypeError(f"{type(attr_method).__name__}.attribute returned "
                            f"{type(attr).__name__}; LLMGradientAttribution needs one tensor "
                            "[1, positions, ...] (one layer, no convergence delta)")
        rows.append(attr.detach()[:, :P].reshape(1, P, -1).sum(-1))
    token_attr = torch.cat(rows)
    if inp.itp_mask is not None:
        token_attr = token_attr[:, inp.itp_mask[0].to(token_attr.device)]
    return token_attr
