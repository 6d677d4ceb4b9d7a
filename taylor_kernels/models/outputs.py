"""Which tensor of a model's output is attributed (neutral: imports only torch).

Rule for ``output=None`` (what :func:`model_output` picks):

1. a tensor is used as it is;
2. a mapping (a Hugging Face ``ModelOutput`` is one, so is a ``dict``) gives its ``"logits"``
   entry, else its first tensor value (``last_hidden_state`` for encoders);
3. an object with a tensor attribute ``.logits`` gives it;
4. a tuple or list gives its first tensor element.

Anything else is an error that says how to name the output. ``output=`` names another one: a
key or attribute name (``"pooler_output"``), an index into a tuple, or a callable
``out -> tensor`` (e.g. mean pooling).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable

import torch

HINT = ("select the tensor to attribute: by default a tensor, a mapping's or ModelOutput's "
        "'logits' entry (.logits), else its first tensor, or a tuple's first tensor are used; "
        "name another with output='key' / an index, or pass output=callable(out) -> tensor")


def default_output(out: Any, kinds: tuple[type, ...] = (torch.Tensor,)):
    """What the module's rule picks from ``out`` among values of ``kinds`` (the jet engine
    passes its jets too): ``out`` itself, a mapping's ``"logits"`` else its first, an
    object's ``.logits``, a tuple's or list's first; None when the rule finds none."""
    if isinstance(out, kinds):
        return out
    if isinstance(out, Mapping):
        logits = out.get("logits")
        return logits if isinstance(logits, kinds) else next(
            (v for v in out.values() if isinstance(v, kinds)), None)
    logits = getattr(out, "logits", None)
    if isinstance(logits, kinds):
        return logits
    if isinstance(out, (tuple, list)):
        return next((v for v in out if isinstance(v, kinds)), None)
    return None


def model_output(out: Any, output: str | int | Callable | None = None) -> torch.Tensor:
    """The tensor of ``out`` to attribute, by the module's rule or as ``output`` names it.

    ``out``: a tensor, a mapping/``ModelOutput``, an object with ``.logits``, or a tuple.
    Returns a tensor ``[N, ...]`` (the engine then selects one scalar per row).
    """
    if output is None:
        picked = default_output(out)
        if picked is not None:
            return picked
        if isinstance(out, (Mapping, tuple, list)):
            raise ValueError(f"the model returned a {type(out).__name__} with no tensor in "
                             f"it; {HINT}")
        raise ValueError(f"the model returned a {type(out).__name__}, which has no .logits "
                         f"tensor; {HINT}")
    if callable(output):
        picked = output(out)
    elif isinstance(output, int) and (isinstance(out, (tuple, list))
                                      or callable(getattr(out, "to_tuple", None))):
        items = out if isinstance(out, (tuple, list)) else out.to_tuple()  # HF: out[i]
        picked = items[output] if -len(items) <= output < len(items) else None
    elif isinstance(output, str) and isinstance(out, Mapping):
        picked = out.get(output)
    elif isinstance(output, str):
        picked = getattr(out, output, None)
    else:
        raise ValueError(f"output={output!r} cannot select from a {type(out).__name__}; {HINT}")
    if not isinstance(picked, torch.Tensor):
        raise ValueError(f"output={output!r} selected a {type(picked).__name__} from the "
                         f"model's {type(out).__name__}, not a tensor; {HINT}")
    return picked


class HeadIndexError(ValueError, IndexError):
    """A target id outside the LM head's outputs: a ``ValueError``, and the ``IndexError``
    Captum's ``log_probs[..., target]`` raises for it."""


def lm_logits(out, vocab: int | None, what: str = "generation attribution",
              targets: torch.Tensor | None = None) -> torch.Tensor:
    """The next-token logits ``[N, L, V]`` of a causal LM's output ``out`` (a tensor, or a
    mapping's / ``ModelOutput``'s ``"logits"``), or ``ValueError``: a ``ModelOutput`` without
    logits is a base model's hidden states (``GPT2Model``: no LM head), the logits must be
    3-D, and an unnamed tensor (not a ``.logits`` / ``"logits"`` entry) with ``V`` below the
    embedding's ``vocab`` rows reads as hidden states. Named logits may have fewer outputs
    than the embedding has rows (a head that never predicts input-only ids, as Captum takes
    it); :class:`HeadIndexError` when an id of ``targets`` (the ids scored) is not below
    ``V``."""
    if isinstance(out, Mapping) and not isinstance(out.get("logits"), torch.Tensor):
        raise ValueError(f"{what} needs a causal LM's next-token logits; the model returned a "
                         f"{type(out).__name__} without 'logits' (a model without its LM "
                         "head? load it with AutoModelForCausalLM / a ...ForCausalLM class)")
    logits = model_output(out)
    named = isinstance(out, Mapping) or isinstance(getattr(out, "logits", None), torch.Tensor)
    if logits.dim() != 3 or not named and vocab is not None and logits.shape[-1] < vocab:
        over = "" if vocab is None else f" over the embedding's {vocab} ids"
        raise ValueError(f"{what} needs a causal LM's next-token logits [N, L, vocab]{over}; "
                         f"the model returned {tuple(logits.shape)} (a classifier, or the hidden "
                         "states of a model without its LM head? a head predicting fewer ids "
                         "than the embedding has rows: return its output as .logits)")
    if targets is not None and targets.numel() and int(targets.max()) >= logits.shape[-1]:
        rows = "" if vocab is None else f" (the input embedding has {vocab} rows)"
        raise HeadIndexError(f"{what}: target id {int(targets.max())} is outside the LM head's "
                             f"{logits.shape[-1]} outputs{rows}; the model cannot predict it")
    return logits


class SelectOutput:
    """``model`` wrapped to return ``model_output(model(*args, **kwargs), output)``: hand it
    to any attribution function to attribute a named output (``"pooler_output"``, an index, or
    a callable)."""

    def __init__(self, model: Callable, output: str | int | Callable):
        self.model, self.output = model, output

    def __call__(self, *args, **kwargs) -> torch.Tensor:
        return model_output(self.model(*args, **kwargs), self.output)
