"""Captum-compatible ``LLMGradientAttribution``, ``TextTokenInput`` and ``LLMAttributionResult``.

```python
# from captum.attr import LayerIntegratedGradients, LLMGradientAttribution, TextTokenInput
from taylor_kernels.captum import (LayerIntegratedGradients, LLMGradientAttribution,
                                   TextTokenInput)
lig = LayerIntegratedGradients(model, model.get_input_embeddings())
llm = LLMGradientAttribution(lig, tokenizer)
res = llm.attribute(TextTokenInput(prompt, tokenizer, skip_tokens=[1]), target="...")
res.token_attr   # [T, n_prompt_features]; res.seq_attr [n_prompt_features]
```

Captum runs one layer-IG call per target token. Here the whole continuation is attributed in
one pass (:func:`taylor_kernels.generation_attribution`: one forward of prompt + target per
path point, all ``T`` gradients from one batched backward); the numbers are Captum's (the
prompt embeddings interpolate from the baseline token's embedding, the continuation's stay
fixed, attributions summed over the embedding). ``attribute`` takes Captum's ``n_steps``,
``method`` and ``internal_batch_size`` (path points per chunk) and ours: ``max_memory``,
``tol`` (with ``method="adaptive"``), ``backend``, ``progress``. ``attr_method`` may be our
``LayerIntegratedGradients`` or Captum's (its ``forward_func`` must be the model, as Captum
requires). What the one pass does not cover runs Captum's loop, one ``attribute`` call per
target token (:mod:`.llm_per_token`): ``LayerGradientShap`` / ``LayerGradientXActivation``,
layer IG with ``multiply_by_inputs=False`` or other ``attribute`` arguments (``baselines``,
...), a layer whose activations at the continuation move with the prompt (after the
positions mix), a model that is not causal (bidirectional attention, as Captum's own test
model: each target is then scored on its own prefix, as by Captum), and a model in train mode (dropout: the loop draws its masks as Captum's, so
a seed reproduces Captum's numbers). The one pass reads the prompt and its per-position
baseline ids from ``inp.to_model_input`` at ``inp.to_tensor()`` and at zeros (Captum's default
baselines), so a ``TextTokenInput`` subclass with its own ``to_model_input`` (per-position
baselines, ...) is honoured as in Captum. Output tokens are readable token strings as in Captum
(:func:`pretty_tokens`). Captum itself is not needed.
"""
from __future__ import annotations

import numbers
import sys
import textwrap
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from taylor_kernels.attr.generation import (ContinuationMoves, generated_continuation,
                                            generation_attribution)
from taylor_kernels.captum_front._common import (CaptumNamed, CaptumTypeError,
                                                  CaptumValueError, customised,
                                                  attribute_future_unsupported, captum_method,
                                                  points_per_chunk)
from taylor_kernels.captum_front.ig import LayerIntegratedGradients
from taylor_kernels.captum_front.layer import LayerGradientShap
from taylor_kernels.captum_front.llm_per_token import model_ids, per_token_attributions
from taylor_kernels.engine import guards
from taylor_kernels.models import hf

DEFAULT_GEN_ARGS = {"max_new_tokens": 25, "do_sample": False, "temperature": None,
                    "top_p": None}
_OPTIONS = ("n_steps", "method", "internal_batch_size", "max_memory", "tol", "backend",
            "progress")


class TextTokenInput:
    """A prompt whose interpretable features are its tokens (Captum's ``TextTokenInput``).

    ``baselines``: the baseline token (an id, or a token string); ``skip_tokens``: ids or token
    strings left out of the features (they keep their embedding). ``to_tensor()`` is ones
    ``[1, n_itp_features]``; ``to_model_input(t)`` puts the baseline id where ``t != 1``.
    """

    def __init__(self, text: str, tokenizer, baselines: int | str = 0, skip_tokens=None):
        register_with_captum(load=True)
        self.inp_tensor = tokenizer.encode(text, return_tensors="pt")
        self.itp_tensor, self.itp_mask = self.inp_tensor, None
        if skip_tokens is not None and len(skip_tokens):
            # ids and token strings, mixed too (Captum converts all or none by the first one's
            # type; ours raised torch's "invalid data type 'str'" on [2, "cat"]); an unknown
            # string is the unknown-token id, as in Captum (with a warning)
            skip_tokens = hf.skip_token_ids(skip_tokens, tokenizer, unknown_as_unk=True)
            self.itp_mask = ~torch.isin(self.inp_tensor, torch.tensor(skip_tokens,
                                                                      dtype=torch.long))
            self.itp_tensor = self.inp_tensor[self.itp_mask][None]
        self.skip_tokens = skip_tokens
        self.tokenizer = tokenizer
        self.values = tokenizer.convert_ids_to_tokens(self.itp_tensor[0].tolist())
        self.n_itp_features = len(self.values)
        if isinstance(baselines, bool) or not isinstance(baselines, (numbers.Integral, str)):
            raise TypeError(f"baselines must be a token id (int) or a token string, got "
                            f"{baselines!r}")
        self.baselines = int(baselines) if isinstance(baselines, numbers.Integral) else \
            tokenizer.convert_tokens_to_ids([baselines])[0]

    def to_tensor(self) -> torch.Tensor:
        return torch.ones_like(self.itp_tensor)

    def to_model_input(self, perturbed_tensor: torch.Tensor | None = None) -> torch.Tensor:
        """Token ids ``[N, L]``: the prompt, with the baseline id where ``perturbed != 1``."""
        if perturbed_tensor is None:
            return self.inp_tensor
        n = perturbed_tensor.shape[0]
        itp = self.itp_tensor.to(perturbed_tensor.device).expand(n, -1).clone()
        itp[perturbed_tensor != 1] = self.baselines
        if self.itp_mask is None:
            return itp
        ids = self.inp_tensor.to(itp.device).expand(n, -1).clone()
        ids[self.itp_mask.to(itp.device).expand(n, -1)] = itp.reshape(-1)
        return ids

    def format_attr(self, itp_attr: torch.Tensor) -> torch.Tensor:
        return itp_attr


def register_with_captum(load: bool = False) -> None:
    """Make :class:`TextTokenInput` a virtual subclass of Captum's (its ABC) so that Captum's
    own ``LLMAttribution`` (perturbation methods), which checks its input's class, takes ours
    after a whole import line switched: when Captum is imported already, or (``load``: the
    first ``TextTokenInput`` made) importing it when installed. (Importing it with the front
    would add ~0.3 s to every import.)"""
    if load and "captum.attr" not in sys.modules:
        try:
            import captum.attr  # noqa: F401
        except Exception:  # noqa: BLE001 - absent, or broken against this torch: not needed
            return
    captum_attr = sys.modules.get("captum.attr")
    theirs = getattr(captum_attr, "TextTokenInput", None)
    if isinstance(theirs, type) and hasattr(theirs, "register") and \
            not issubclass(TextTokenInput, theirs):
        theirs.register(TextTokenInput)


def _checked_tensor(name: str, shape: Callable, what: str, required: bool = False) -> property:
    """A property stored in ``_<name>`` whose setter makes an array-like a tensor (None kept,
    unless ``required``) and raises :class:`CaptumValueError` (Captum's ``AssertionError``)
    unless its shape is ``shape(result)``."""
    def get(self):
        return getattr(self, "_" + name)

    def set(self, value):
        if value is not None:
            value = value if isinstance(value, torch.Tensor) else torch.tensor(value)
            if tuple(value.shape) != shape(self):
                raise CaptumValueError(f"{name} must have shape {shape(self)} ({what}), got "
                                       f"{tuple(value.shape)}")
        elif required:
            raise CaptumValueError(f"{name} must be a {len(shape(self))}-D tensor, got None")
        setattr(self, "_" + name, value)
    return property(get, set)


@dataclass(init=False)
class LLMAttributionResult:
    """Captum's result fields: ``seq_attr [n_features]``, ``token_attr [T, n_features]``,
    ``input_tokens``, ``output_tokens``, ``output_probs`` and ``inp`` (None here, as in
    Captum's gradient class); plus ``output_log_probs [T]`` and ``gap [T]`` (completeness
    per target). As Captum's, the setters of ``seq_attr``, ``token_attr`` and
    ``output_probs`` make array-likes tensors and check their shapes against the tokens."""

    input_tokens: list[str]
    output_tokens: list[str]
    _seq_attr: torch.Tensor
    _token_attr: torch.Tensor | None = None
    _output_probs: torch.Tensor | None = None
    inp: Any = None
    output_log_probs: torch.Tensor | None = field(default=None, repr=False)
    gap: torch.Tensor | None = field(default=None, repr=False)

    def __init__(self, input_tokens: list[str], output_tokens: list[str], seq_attr,
                 token_attr=None, output_probs=None, inp: Any = None,
                 output_log_probs: torch.Tensor | None = None,
                 gap: torch.Tensor | None = None) -> None:
        self.input_tokens, self.output_tokens = input_tokens, output_tokens
        self.seq_attr, self.token_attr, self.output_probs = seq_attr, token_attr, output_probs
        self.inp, self.output_log_probs, self.gap = inp, output_log_probs, gap

    seq_attr = _checked_tensor("seq_attr", lambda r: (len(r.input_tokens),),
                               "one value per input token", required=True)
    token_attr = _checked_tensor("token_attr", lambda r: (len(r.output_tokens),
                                                          len(r.input_tokens)),
                                 "output tokens x input tokens")
    output_probs = _checked_tensor("output_probs", lambda r: (len(r.output_tokens),),
                                   "one value per output token")

    @property
    def seq_attr_dict(self) -> dict[str, float]:
        return {k: v for v, k in zip(self.seq_attr.cpu().tolist(), self.input_tokens)}

    def plot_token_attr(self, show: bool = False):
        """Heatmap of ``token_attr`` (output tokens x input tokens) as Captum draws it: red
        negative, white zero, green positive on one symmetric scale, each cell's value to 4
        decimals; returns ``(fig, ax)`` unless ``show``."""
        if self.token_attr is None:
            raise ValueError("token_attr is None (no token-level attribution was performed): "
                             "use plot_seq_attr")
        import matplotlib.pyplot as plt
        import numpy as np
        from matplotlib.colors import LinearSegmentedColormap

        data = self.token_attr.detach().cpu().float().numpy()
        vmax = float(abs(data).max())
        fig, ax = plt.subplots()
        ax.grid(False)
        fig.set_size_inches(max(data.shape[1] * 1.3, 6.4), max(data.shape[0] / 2.5, 4.8))
        colours = LinearSegmentedColormap.from_list("RdWhGn", ["red", "white", "green"])
        im = ax.imshow(data, vmin=-vmax, vmax=vmax, cmap=colours, aspect="auto")
        fig.set_facecolor("white")
        fig.colorbar(im, ax=ax).ax.set_ylabel("Token Attribution", rotation=-90, va="bottom")
        ax.set_xticks(np.arange(data.shape[1]), labels=_tick_labels(self.input_tokens))
        ax.set_yticks(np.arange(data.shape[0]),
                      labels=[repr(t)[1:-1] for t in self.output_tokens])
        ax.tick_params(top=True, bottom=False, labeltop=True, labelbottom=False)
        plt.setp(ax.get_xticklabels(), rotation=-30, ha="right", rotation_mode="anchor")
        for (i, j), v in np.ndenumerate(data):  # dark cells get white text
            ax.text(j, i, f"{v:.4f}", ha="center", va="center",
                    color="black" if 0.2 < im.norm(v) < 0.8 else "white")
        if show:
            plt.show()
            return None
        return fig, ax

    def plot_seq_attr(self, show: bool = False):
        """Bar chart of ``seq_attr`` per input token as Captum draws it (positive blue,
        negative red); returns ``(fig, ax)`` unless ``show``."""
        import matplotlib.pyplot as plt

        data = self.seq_attr.detach().cpu().float().numpy()
        fig, ax = plt.subplots()
        fig.set_size_inches(max(len(data) / 2, 6.4), max(len(data) / 4, 4.8))
        ax.set_xticks(range(len(data)), labels=_tick_labels(self.input_tokens))
        ax.tick_params(top=True, bottom=False, labeltop=True, labelbottom=False)
        plt.setp(ax.get_xticklabels(), rotation=-30, ha="right", rotation_mode="anchor")
        fig.set_facecolor("white")
        ax.bar(range(len(data)), [max(v, 0) for v in data], align="center", color="#4772b3")
        ax.bar(range(len(data)), [min(v, 0) for v in data], align="center", color="#d0365b")
        ax.set_ylabel("Sequence Attribution", rotation=90, va="bottom")
        if show:
            plt.show()
            return None
        return fig, ax


def _tick_labels(tokens) -> list[str]:
    """Input tokens as tick labels: escaped, at most 50 characters (as Captum's)."""
    return [textwrap.shorten(repr(t)[1:-1], width=50, placeholder="...") for t in tokens]


def _readable(text: str) -> str:
    return text.replace("\n", "\\n").strip()


def pretty_tokens(ids: torch.Tensor, tokenizer) -> list[str]:
    """One readable string per id of ``ids [T]`` (Captum's output tokens): the text decoded
    from all of them, cut at the offsets of its re-encoding (no byte-level markers such as
    ``Ġ``; newlines as ``\\n``, stripped; a token sharing characters with the previous one,
    as one character split over several ids, gets `` [OVERLAP]``). Re-encoded tokens are
    matched to ``ids`` in order, skipping ones that do not match; when that does not cover
    every id (or the tokenizer gives no offsets), :func:`_tokens_one_by_one`."""
    ids = [int(i) for i in ids]
    # decode takes a tensor (Captum's tokenizer protocol; Hugging Face's takes lists too)
    text = tokenizer.decode(torch.tensor(ids, dtype=torch.long))
    try:
        enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
        spans = list(enc["offset_mapping"])
        again = list(enc["input_ids"])
    except (NotImplementedError, TypeError, KeyError, ValueError):
        spans = again = []
    out, last_end, k = [], -1, 0
    for j, (tid, (start, end)) in enumerate(zip(again, spans)):
        if k == len(ids) or tid != ids[k]:
            continue
        if start == end:  # an empty span: up to the next token's start
            end = spans[j + 1][0] if j + 1 < len(spans) else len(text)
        out.append(_readable(text[start:end]) + (" [OVERLAP]" if last_end > start else ""))
        last_end, k = end, k + 1
    if len(out) == len(ids):
        return out
    return _tokens_one_by_one(ids, tokenizer)


def _decoded(i: int, tokenizer) -> str:
    """Id ``i`` decoded alone (as a tensor ``[1]``: Captum's tokenizer protocol)."""
    return tokenizer.decode(torch.tensor([i], dtype=torch.long))


def _split_byte(i: int, text: str, tokenizer) -> bool:
    """Whether id ``i`` (decoded alone: ``text``) is part of a character split over several
    ids, by Captum's test: it decodes to the replacement character and does not re-encode to
    itself."""
    return text.strip() == "\ufffd" and tokenizer.encode(text) != [i]


def _tokens_one_by_one(ids: list[int], tokenizer) -> list[str]:
    """Captum's fallback output tokens for ``ids [T]``: each id decoded alone, except that an
    id of a split character takes the next id with it: when that one is of a split character
    too it reads as the first's text plus `` [OVERLAP]``, else as itself. (A split id at the
    end stays alone; Captum's reads past the end there.)"""
    out, k = [], 0
    while k < len(ids):
        text = _decoded(ids[k], tokenizer)
        out.append(_readable(text))
        if _split_byte(ids[k], text, tokenizer) and k + 1 < len(ids):
            after = _decoded(ids[k + 1], tokenizer)
            out.append(out[-1] + " [OVERLAP]" if _split_byte(ids[k + 1], after, tokenizer)
                       else _readable(after))
            k += 1
        k += 1
    return out


METHOD_NAMES = ("LayerIntegratedGradients", "LayerGradientShap", "LayerGradientXActivation")


class _SupportedMethods:
    """Captum's ``SUPPORTED_METHODS`` class attribute (read on the class or an instance): the
    method classes ``attr_method`` may be an instance of: ours and, when Captum is installed,
    Captum's (imported on first read)."""

    def __get__(self, instance, owner) -> tuple[type, ...]:
        ours = (LayerGradientShap, LayerIntegratedGradients)
        try:
            import captum.attr as theirs
        except Exception:  # noqa: BLE001 - absent, or broken against this torch
            return ours
        return ours + tuple(getattr(theirs, name) for name in METHOD_NAMES)


def _method_class(attr_method) -> type | None:
    """The class of Captum's (or ours) among ``METHOD_NAMES`` that ``attr_method`` is an
    instance of (a subclass's base, as Captum's ``isinstance`` check takes it), else None."""
    return next((c for c in type(attr_method).__mro__ if c.__name__ in METHOD_NAMES
                 and c.__module__.split(".")[0] in ("captum", "taylor_kernels")), None)


def _one_pass_layer(attr_method):
    """The layer of a layer-IG instance (ours or Captum's, or a subclass that changes nothing
    of how it computes) that the one pass can run: one layer, ``multiply_by_inputs=True``;
    None for the per-token loop. ``TypeError`` (also an ``AssertionError``, as Captum raises)
    for a method Captum's class does not take either."""
    base = _method_class(attr_method)
    if base is None or not hasattr(attr_method, "forward_func"):
        raise CaptumTypeError(f"LLMGradientAttribution supports "
                              f"{', '.join(METHOD_NAMES)} (ours or Captum's), got "
                              f"{type(attr_method).__name__}")
    layer = getattr(attr_method, "layer", None)
    if isinstance(layer, (list, tuple)):
        if len(layer) != 1:
            raise CaptumTypeError(f"LLMGradientAttribution attributes to one layer, got "
                                  f"{len(layer)}")
        layer = layer[0]
    if base.__name__ != "LayerIntegratedGradients" or not getattr(
            attr_method, "multiplies_by_inputs", True) or customised(attr_method, base):
        return None
    return layer


class LLMGradientAttribution(CaptumNamed):
    """Drop-in for ``captum.attr.LLMGradientAttribution``: layer IG is attributed for the
    whole target sequence in one pass; other methods and arguments run Captum's per-token
    loop (:mod:`.llm_per_token`). ``forward_func`` and its alias ``model`` are the model (the
    method's ``forward_func``), as in Captum."""

    SUPPORTED_METHODS = _SupportedMethods()

    def __init__(self, attr_method, tokenizer) -> None:
        self.attr_method = attr_method
        self.layer = _one_pass_layer(attr_method)
        self.forward_func = self.model = attr_method.forward_func
        hf.check_causal_lm(self.model, "LLMGradientAttribution")
        self.tokenizer = tokenizer
        self.device = getattr(self.model, "device", None) or next(
            self.model.parameters()).device
        self.last_result = None

    SUPPORTED_INPUTS = (TextTokenInput,)

    def has_convergence_delta(self) -> bool:
        """False, as Captum's (its ``Attribution`` default)."""
        return False

    @property
    def multiplies_by_inputs(self) -> bool:
        """False, as Captum's (its ``Attribution`` default)."""
        return False

    def _target_ids(self, inp, target, gen_args) -> torch.Tensor:
        if target is None:
            if not callable(getattr(self.model, "generate", None)):
                raise CaptumValueError("The model does not have recognizable generate "
                                       "function. Target must be given")
            ids = model_ids(inp.to_model_input()).to(self.device)
            out = self.model.generate(input_ids=ids, **(gen_args or DEFAULT_GEN_ARGS))
            return generated_continuation(out, ids.shape[1])
        if gen_args is not None:
            raise ValueError("gen_args must be None when target is given")
        if isinstance(target, str):
            ids = self.tokenizer.encode(target, add_special_tokens=False)
            if not len(ids):
                raise ValueError(f"target {target!r} encodes to no tokens")
            return torch.tensor(ids, dtype=torch.long)
        if isinstance(target, torch.Tensor):
            if target.dim() == 2 and target.shape[0] == 1:
                target = target[0]
            if target.dim() == 0:  # Captum iterates over it: TypeError
                raise TypeError("target ids must be a tensor [T] (or [1, T]), got a 0-d tensor")
            if target.dim() != 1:
                raise ValueError(f"target ids must be a tensor [T] (or [1, T]), got "
                                 f"{tuple(target.shape)}")
            return target
        raise TypeError(f"target must be a str or a Tensor of token ids, got {type(target)}")

    @captum_method
    def attribute(self, inp, target: str | torch.Tensor | None = None,
                  gen_args: dict | None = None, **kwargs) -> LLMAttributionResult:
        """Token attributions of every target token's log-prob to the prompt's tokens.

        ``inp``: :class:`TextTokenInput` (ours or Captum's); ``target``: the continuation
        (text, or ids ``[T]``), or None to generate it with ``model.generate(**gen_args)``
        (its sequences, or a ``GenerateOutput``'s ``.sequences``).
        ``kwargs``: with layer IG (``multiply_by_inputs=True``) ``n_steps`` (50), ``method``
        ("gausslegendre"), ``internal_batch_size``, ``max_memory``, ``tol``, ``backend``,
        ``progress`` run one pass; any other argument, another method, a layer after the
        positions mix, a model that is not causal, or a model in train mode (dropout, batch
        statistics) runs one
        ``attr_method.attribute(..., **kwargs)`` per target token as
        Captum does (``last_result`` is then None, as are ``output_log_probs`` and ``gap``).
        Returns: :class:`LLMAttributionResult` (``token_attr [T, n_features]``).
        """
        if not hasattr(inp, "itp_tensor") or not hasattr(inp, "inp_tensor"):
            raise TypeError(f"LLMGradientAttribution supports TextTokenInput, got "
                            f"{type(inp).__name__}")
        target_ids = self._target_ids(inp, target, gen_args).to(self.device)
        itp = torch.ones_like(inp.inp_tensor[0], dtype=torch.bool) if inp.itp_mask is None \
            else inp.itp_mask[0]
        itp = itp.to(self.device)  # [P]: the prompt positions that are features
        self.last_result = res = None
        if self.layer is not None and set(kwargs) <= set(_OPTIONS) and \
                not guards.coupling_modules_of(self.model):  # (train mode: Captum's loop
            # draws dropout as Captum's)
            res = self._one_pass(inp, target_ids, itp, kwargs)
        self.last_result = res
        if res is None:
            token_attr = per_token_attributions(self.attr_method, self.model, self.device, inp,
                                                target_ids, kwargs)
            log_probs = gap = None
        else:
            token_attr = res.token_attr[:, itp]
            log_probs, gap = res.log_probs, res.gap
        return LLMAttributionResult(
            input_tokens=list(inp.values),
            output_tokens=pretty_tokens(target_ids, self.tokenizer),
            seq_attr=token_attr.sum(0), token_attr=token_attr,
            output_log_probs=log_probs, gap=gap)

    def _one_pass(self, inp, target_ids: torch.Tensor, itp: torch.Tensor, kwargs: dict):
        """:func:`generation_attribution` for layer IG from the prompt and per-position
        baseline ids of :func:`_prompt_and_baselines` (``itp [P]``: the feature positions),
        or None when the layer comes after the positions mix (the one pass would hold the
        continuation's activations fixed) or the model is not a causal LM (its logits at a
        position depend on later tokens, or on the length)."""
        prompt, baselines = _prompt_and_baselines(inp, itp, self.device)
        try:
            return generation_attribution(
                self.model, prompt, target_ids, baselines=baselines,
                layer=self.layer, steps=kwargs.get("n_steps", 50),
                rule=kwargs.get("method", "gausslegendre"), tol=kwargs.get("tol"),
                chunk_size=points_per_chunk(kwargs.get("internal_batch_size"), (prompt,)),
                max_memory=kwargs.get("max_memory"), backend=kwargs.get("backend"),
                progress=kwargs.get("progress", False))
        except (ContinuationMoves, hf.LengthDependentLogits, hf.NotCausal):
            return None

    attribute_future = attribute_future_unsupported


def _prompt_and_baselines(inp, itp: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompt ids ``[1, P]`` and per-position baseline ids ``[P]`` Captum's layer IG reads:
    ``inp.to_model_input`` at the features ``inp.to_tensor()`` and at zeros (its default
    baselines); positions where the two agree keep their embedding. ``itp [P]``: the feature
    positions (``ValueError`` if ``to_model_input`` gives another length)."""
    features = inp.to_tensor().to(device)
    prompt = model_ids(inp.to_model_input(features)).to(device)
    baselines = model_ids(inp.to_model_input(torch.zeros_like(features))).to(device)
    if prompt.shape[0] != 1 or baselines.shape != prompt.shape or \
            prompt.shape[1] != itp.shape[0]:
        raise ValueError(f"{type(inp).__name__}.to_model_input must return one row of "
                         f"{itp.shape[0]} token ids (the prompt's), got {tuple(prompt.shape)} "
                         f"for its features and {tuple(baselines.shape)} for zeros")
    return prompt, baselines[0]
