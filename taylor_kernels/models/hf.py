"""Hugging Face-style models: token ids attributed through the input-embedding layer.

Handled by duck typing, so ``transformers`` is never imported: the embedding layer comes from
``model.get_input_embeddings()`` (or is named), special token ids from ``model.config``
(``pad_token_id``...), the attention implementation from ``model.config._attn_implementation``.

* **Inputs.** ``input_ids [B, L]`` (integers) are looked up as usual; the embedding layer's
  output ``E [B, L, E]`` is replaced on every path point by ``b + t (E - b)`` (a forward hook),
  so attributions are per embedding coordinate and per token (summed over ``E``).
  ``attention_mask`` and every other keyword argument whose first dimension is the batch are
  carried per row (the engine picks each path point's row); others are passed as they are.
* **Padding and kept tokens.** Positions with ``attention_mask == 0`` and those in ``keep``
  (or whose id is in ``skip_tokens``: ids, or token strings converted by ``tokenizer``) keep
  their input embedding as baseline: their attribution is exactly zero.
* **Baselines.** ``"zero"`` (the zero embedding, default), ``"pad"``/``"unk"``/``"bos"``/
  ``"eos"`` (the config's token id, or the ``tokenizer``'s), a token id, or integer ids
  ``[B|1, L]``. A floating baseline with integer ids is a ``TypeError``.
* **Scores.** The output tensor follows :func:`~taylor_kernels.models.outputs.model_output`
  (``.logits``...). A ``[N, L, V]`` output is read at one position per row (default: the last
  attended one; ``position=`` an int, or ``[B]`` ints one per row) and, for models that accept ``logits_to_keep``, the head runs only there;
  ``score="log_prob"`` applies ``log_softmax`` in float32. Low-precision (bf16/fp16) models
  run in their dtype; scores and attributions are float32.
* **Attention.** First-order attribution keeps the model's attention (fused SDPA kernels),
  except where the library runs the forward of a bf16/fp16 model on the CPU
  (:func:`first_order_attention`): there PyTorch's fused CPU kernel's backward is about 4x
  slower than the math path's. Second-order methods (:func:`token_interactions`, and every
  derivative-engine call) run inside :func:`~taylor_kernels.engine.derivative.math_attention`:
  SDPA on its math backend, flash/flex attention switched to ``"eager"`` for the call, with
  one warning per model class.
"""
from __future__ import annotations

import contextlib
import inspect
import numbers
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from taylor_kernels.attr.arguments import refuse_create_graph
from taylor_kernels.attr.group_hessians import group_integrated_hessians
from taylor_kernels.attr.integrated_gradients import integrated_gradients, low_precision_note
from taylor_kernels.attr.layer import layer_replaced_forward, named_layer
from taylor_kernels.engine.guards import (check_model, public_call,
                                          coupling_modules_of, is_row_tensor,
                                          row_coupling_allowed, without_inference_tensors)
from taylor_kernels.engine.derivative import cpu_flex_as_eager, math_attention
from taylor_kernels.engine.distributed import (check_same_settings, first_collective_agreed,
                                               holds_partial_sums, resolve_group)
from taylor_kernels.engine.thread_hooks import hookable, this_thread
from taylor_kernels.models.outputs import lm_logits, model_output
from taylor_kernels.user_warnings import warn

SPECIAL_BASELINES = ("pad", "unk", "bos", "eos")


def input_embeddings(model, layer: nn.Module | str | None = None) -> nn.Module:
    """The layer whose output is attributed: ``layer`` (a module or a dotted submodule name),
    else ``model.get_input_embeddings()``."""
    if layer is not None:
        return named_layer(model, layer)
    get = getattr(model, "get_input_embeddings", None)
    try:  # (transformers' base raises NotImplementedError where a model has none: CANINE)
        emb = get() if callable(get) else None
    except (NotImplementedError, AttributeError):
        emb = None
    if not isinstance(emb, nn.Module):
        raise ValueError(f"{type(model).__name__} has no get_input_embeddings(): name the "
                         "embedding layer with layer=<module or 'submodule.name'>")
    return emb


ID_DTYPES = (torch.int64, torch.int32)  # what an embedding indexes with


def check_ids(input_ids, name: str = "input_ids", vocab: int | None = None) -> torch.Tensor:
    """``input_ids`` must be a non-empty integer tensor ``[B, L]``, its ids in
    ``[0, vocab)`` when ``vocab`` is given. Returns them (a normal copy of ids made under
    ``torch.inference_mode()``: a custom backward that saves them raised torch's "Inference
    tensors cannot be saved for backward")."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        got = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids)
        raise ValueError(f"{name} must be a tensor [B, L] of token ids, got {got}")
    if input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer token ids, got {input_ids.dtype}; for "
                        "float inputs use tk.integrated_gradients")
    if input_ids.dtype not in ID_DTYPES:
        raise TypeError(f"{name} must hold int64 (or int32) token ids, got {input_ids.dtype}: "
                        f"convert them with {name}.long()")
    if input_ids.numel() == 0:
        raise ValueError(f"{name} is empty ({tuple(input_ids.shape)})")
    check_vocab(input_ids, vocab, name)
    return without_inference_tensors(input_ids)


def vocab_size(layer: nn.Module, model=None) -> int | None:
    """Rows of the embedding the ids index: ``model.get_input_embeddings()``'s, else (a model
    without that method) those of ``layer`` when it is an embedding; None otherwise (a custom
    module's own rule decides; its ``IndexError`` is named by :func:`embedded_ids`). (The
    attributed layer's own rows were taken first: GPT-2's 1024 position embeddings ``wpe``
    became the vocabulary.)"""
    get = getattr(model, "get_input_embeddings", None)
    try:
        table = get() if callable(get) else None
    except (NotImplementedError, AttributeError):  # transformers' base class raises when it
        table = None  # cannot find the embedding (the caller then names the layer)
    for m in (table, layer):
        if isinstance(getattr(m, "num_embeddings", None), int):
            return m.num_embeddings
    return None


class VocabIndexError(ValueError, IndexError):
    """An id outside the embedding's vocabulary: a ``ValueError``, and the ``IndexError`` the
    embedding lookup (and Captum, which runs it) raises for it."""


def check_vocab(ids: torch.Tensor, vocab: int | None, name: str) -> None:
    """:class:`VocabIndexError` naming ``name`` when an id lies outside ``[0, vocab)``."""
    if vocab is None or ids.numel() == 0:
        return
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocab:
        bad = lo if lo < 0 else hi
        raise VocabIndexError(f"{name} holds the id {bad}, outside the embedding's "
                              f"vocabulary [0, {vocab})")


def special_token_id(model, name: str, tokenizer=None) -> int:
    """``model.config.<name>_token_id``, else its ``text_config``'s (a composite model's:
    CLIP, SigLIP), else the tokenizer's; ``ValueError`` if none."""
    config = getattr(model, "config", None)
    for src in (config, getattr(config, "text_config", None), tokenizer):
        tid = getattr(src, f"{name}_token_id", None)
        if isinstance(tid, (list, tuple)):
            tid = tid[0] if tid else None
        if isinstance(tid, int):
            return tid
    raise ValueError(f"baselines={name!r}: the model config (and tokenizer) define no "
                     f"{name}_token_id; pass a token id, integer ids, or baselines='zero'")


def baseline_ids(baselines, input_ids: torch.Tensor, model=None, tokenizer=None,
                 ids_name: str = "input_ids") -> torch.Tensor | None:
    """Baseline token ids ``[B, L]`` for ``baselines`` (``None`` for ``"zero"``: the zero
    embedding). Raises ``TypeError`` for floating baselines (ids and floats do not mix);
    errors call the ids ``ids_name`` (the caller's argument)."""
    if baselines is None or isinstance(baselines, str) and baselines == "zero":
        return None
    if isinstance(baselines, str):
        if baselines not in SPECIAL_BASELINES:
            raise ValueError(f"baselines={baselines!r}: use 'zero', one of "
                             f"{SPECIAL_BASELINES}, a token id or integer ids")
        baselines = special_token_id(model, baselines, tokenizer)
    if isinstance(baselines, bool) or isinstance(baselines, float):
        raise TypeError(f"baselines={baselines!r} with integer {ids_name}: baselines are token "
                        "ids (an int or an integer tensor) or 'zero'/'pad'/'unk'")
    if isinstance(baselines, numbers.Integral):  # (numpy's too)
        return torch.full_like(input_ids, int(baselines))
    if not isinstance(baselines, torch.Tensor):
        raise TypeError(f"baselines must be a string, a token id or an id tensor, got "
                        f"{type(baselines).__name__}")
    if baselines.is_floating_point():
        raise TypeError(f"floating baselines ({baselines.dtype}) with integer {ids_name}: "
                        "interpolation runs between embeddings, so baselines must be token ids "
                        "(int, integer tensor [B|1, L], 'pad', 'unk') or 'zero' for the zero "
                        "embedding")
    try:
        return baselines.to(input_ids.device).expand_as(input_ids)
    except RuntimeError as exc:
        raise ValueError(f"baseline ids of shape {tuple(baselines.shape)} do not broadcast to "
                         f"{ids_name} {tuple(input_ids.shape)}") from exc


def row_mask(value, input_ids: torch.Tensor, name: str, ids_name: str = "input_ids"
             ) -> torch.Tensor:
    """``value`` (a tensor, list or array ``[B, L]``, or ``[L]`` for every row) as a tensor
    shaped like ``input_ids`` (called ``ids_name`` in the error); ``ValueError`` when it does
    not broadcast."""
    mask = torch.as_tensor(value, device=input_ids.device)
    try:
        return mask.expand_as(input_ids)
    except RuntimeError:
        raise ValueError(f"{name} of shape {tuple(mask.shape)} does not match {ids_name} "
                         f"{tuple(input_ids.shape)}") from None


def skip_token_ids(skip_tokens, tokenizer=None, unknown_as_unk: bool = False) -> list[int]:
    """``skip_tokens`` as ids: ints (numpy's too) as they are, token strings through
    ``tokenizer.convert_tokens_to_ids`` (as Captum's ``LLMAttribution`` takes them);
    ``TypeError`` for strings without a tokenizer or anything else, ``ValueError`` for a
    string the tokenizer does not know, unless ``unknown_as_unk`` (Captum's
    ``TextTokenInput``): such a string then stands for the unknown-token id (for nothing
    without one), with one warning naming the strings."""
    if isinstance(skip_tokens, torch.Tensor):
        skip_tokens = skip_tokens.reshape(-1).tolist()
    elif isinstance(skip_tokens, (str, numbers.Integral)):
        skip_tokens = [skip_tokens]
    ids, unknown = [], []
    for tok in skip_tokens:
        if isinstance(tok, numbers.Integral) and not isinstance(tok, bool):
            ids.append(int(tok))
        elif isinstance(tok, str):
            if tokenizer is None:
                raise TypeError(f"skip_tokens holds the string {tok!r}: give token ids, or "
                                "pass tokenizer= to convert token strings")
            tid = tokenizer.convert_tokens_to_ids(tok)
            unk = getattr(tokenizer, "unk_token_id", None)
            if not isinstance(tid, int) or tid == unk and tok != getattr(
                    tokenizer, "unk_token", None):
                if not unknown_as_unk:
                    raise ValueError(f"skip_tokens: the tokenizer has no token {tok!r}")
                unknown.append(tok)
            if isinstance(tid, int):
                ids.append(tid)
        else:
            raise TypeError(f"skip_tokens must hold token ids (ints) or token strings, got "
                            f"{type(tok).__name__}")
    if unknown:
        names = ", ".join(repr(t) for t in dict.fromkeys(unknown))
        unk = getattr(tokenizer, "unk_token_id", None)
        effect = "which has no unknown token: skipping nothing" if unk is None else \
            f"mapped to its unknown token id {unk}: the prompt's unknown tokens are skipped"
        warn(f"skip_tokens {names}: not in the tokenizer's vocabulary, {effect} (as in "
             "Captum)", UserWarning)
    return ids


def kept_positions(input_ids: torch.Tensor, attention_mask=None, keep=None,
                   skip_tokens=(), tokenizer=None, ids_name: str = "input_ids"
                   ) -> torch.Tensor:
    """Bool ``[B, L]``: padding (``attention_mask == 0``), ``keep`` and ``skip_tokens`` (ids,
    or token strings with ``tokenizer``: :func:`skip_token_ids`)."""
    kept = torch.zeros_like(input_ids, dtype=torch.bool)
    if attention_mask is not None:
        kept |= attention_mask.to(input_ids.device) == 0
    if keep is not None:
        kept |= row_mask(keep, input_ids, "keep", ids_name).to(torch.bool)
    skip = skip_token_ids(skip_tokens, tokenizer)
    if skip:
        kept |= torch.isin(input_ids, torch.tensor(skip, device=input_ids.device))
    return kept


class _Captured(Exception):
    """Raised by :func:`layer_output`'s hook to stop the forward once the layer has run."""


def layer_output(call: Callable, layer: nn.Module, *args,
                 layer_input: list | None = None) -> torch.Tensor:
    """``layer``'s output (detached) when ``call(*args)`` runs; the rest of the forward is
    skipped (the hook stops it). ``layer_input``, a list, receives the layer's first input."""
    seen: list = []

    def grab(module, inp, out):
        seen.append(out)
        if layer_input is not None and inp:
            layer_input.append(inp[0])
        raise _Captured

    hook = layer.register_forward_hook(this_thread(grab))
    try:
        with torch.no_grad():
            call(*args)
    except _Captured:
        pass
    finally:
        hook.remove()
    if not seen:
        raise ValueError(f"layer {type(layer).__name__} was never called by the model's forward "
                         "(an encoder-decoder's get_input_embeddings() can be a shared table "
                         "its encoder does not call); name the embedding layer with layer=, "
                         "e.g. layer='encoder.embed_tokens'")
    if not isinstance(seen[0], torch.Tensor):
        raise ValueError(f"layer {type(layer).__name__} returned {type(seen[0]).__name__}, not "
                         "one tensor; name the embedding layer with layer=")
    return seen[0].detach()


class KeywordModel:
    """``model(input_ids=ids, **kwargs)`` (``model(ids, **kwargs)`` for a forward without an
    ``input_ids`` keyword: :func:`ids_caller`) called positionally as ``(ids, *row_values)``.

    Keyword tensors whose first dimension is the batch ``B`` travel as engine row arguments
    (``row_values``, in ``names`` order); the rest are ``static``. ``extra(ids, *row_values)``
    may add keyword arguments per call (e.g. ``logits_to_keep``).
    """

    def __init__(self, model, kwargs: dict, B: int):
        self.model = model
        self.names = [k for k, v in kwargs.items() if is_row_tensor(v, B)]
        self.static = {k: v for k, v in kwargs.items() if k not in self.names}
        self.row_values = tuple(kwargs[k] for k in self.names)
        self._call = ids_caller(model)  # (a forward taking the ids by position too)

    def __call__(self, ids, *row_values, **extra):
        return self._call(ids, **dict(zip(self.names, row_values)), **self.static, **extra)


def accepts(model, name: str) -> bool:
    """Whether ``model.forward`` takes the keyword ``name``."""
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError, AttributeError):
        return False


CONTEXT_WINDOW_NAMES = ("n_positions", "max_position_embeddings", "n_ctx")


@contextlib.contextmanager
def context_window_named(model, length: int):
    """Re-raise an ``IndexError`` of the block (a position-embedding lookup past its table:
    "index out of range in self") as a ``ValueError`` naming the model's context window, when
    its config has one and ``length`` tokens exceed it."""
    try:
        yield
    except IndexError as exc:
        config = getattr(model, "config", None)
        window = next(((n, getattr(config, n)) for n in CONTEXT_WINDOW_NAMES
                       if isinstance(getattr(config, n, None), int)), None)
        if window is None or length <= window[1]:
            raise
        raise ValueError(f"the sequence of {length} tokens (prompt and continuation) exceeds "
                         f"the model's context window (config.{window[0]} = {window[1]}); "
                         "shorten the prompt or the target") from exc


def ids_caller(model) -> Callable:
    """``call(ids, **extra)``: ``model(input_ids=ids, **extra)`` when its forward names
    ``input_ids`` (``transformers`` models), else ``model(ids, **extra)``: a wrapper taking
    the ids by position under another name, as Captum calls its forward (the keyword call
    raised "unexpected keyword argument 'input_ids'")."""
    if accepts(model, "input_ids"):
        return lambda ids, **extra: model(input_ids=ids, **extra)
    return lambda ids, **extra: model(ids, **extra)


def cuts_logits(model) -> bool:
    """Whether ``logits_to_keep`` goes to ``model``: it takes the keyword, and its
    ``get_output_embeddings()`` (where it has one) is not None. A transformers model without
    an LM head (None) may take it to cut hidden states before its own pooling
    (``BioGptForSequenceClassification`` indexed past the cut); one that ignores it is read
    at each row's position (:class:`PositionScore`)."""
    if not accepts(model, "logits_to_keep"):
        return False
    get = getattr(model, "get_output_embeddings", None)
    try:  # only transformers' "no LM head" (None) says no; a wrapper without it passes it on
        return not callable(get) or get() is not None
    except (AttributeError, NotImplementedError, TypeError):
        return True


class PositionScore:
    """Engine model ``(ids, *row_values, positions) -> [N, ...]`` float32 scores.

    The output tensor (``output=`` rule) ``[N, L, V]`` is read at ``positions [N]``; with
    ``logits_to_keep`` (a language model's head: the model accepts it, has output embeddings,
    and ``output`` is the default) the head runs only at the distinct positions of the batch.
    An output that the model did not cut to those positions is read at ``positions`` as it is.
    ``score="log_prob"`` applies ``log_softmax``.
    """

    def __init__(self, call: KeywordModel, output, positions: torch.Tensor | None,
                 score: str):
        if score not in ("logit", "log_prob"):
            raise ValueError(f"score must be 'logit' or 'log_prob', got {score!r}")
        self.call, self.output, self.score = call, output, score
        self.keep = None
        if positions is not None and output is None and cuts_logits(call.model):
            self.keep = torch.unique(positions)

    def __call__(self, ids, *rest):
        *row_values, positions = rest
        extra = {} if self.keep is None else {"logits_to_keep": self.keep.to(ids.device)}
        out = self._selected(self.call(ids, *row_values, **extra), ids.shape[0])
        if positions is not None and out.dim() == 3:
            # a model may take logits_to_keep and still return every position (Gemma4TextModel)
            cut = self.keep is not None and out.shape[1] == self.keep.numel()
            at = torch.searchsorted(self.keep.to(positions.device), positions) if cut \
                else positions
            out = out[torch.arange(out.shape[0], device=out.device), at.to(out.device)]
        if out.dtype in (torch.float16, torch.bfloat16):  # float32 scores (float64 kept)
            out = out.float()
        return torch.log_softmax(out, dim=-1) if self.score == "log_prob" else out

    def _selected(self, raw, n: int) -> torch.Tensor:
        """The ``output=`` rule on the model's output for ``n`` rows; a callable that fails
        there is named (it closed over the caller's ``[B, L]`` batch, say a mask for mean
        pooling: torch's size mismatch came from inside it, with no hint)."""
        if not callable(self.output):
            return model_output(raw, self.output)
        try:
            return model_output(raw, self.output)
        except (RuntimeError, IndexError) as exc:
            raise ValueError(
                f"output={getattr(self.output, '__name__', self.output)!r} failed on the "
                f"model's output for a batch of {n} rows ({type(exc).__name__}: {exc}); the "
                "library calls it on batches of path points, not on your inputs' batch, so it "
                "must work row by row: read per-row values from the output it is given, "
                "not from tensors of your batch it closes over (an attention mask: pass "
                "attention_mask= and pool inside a wrapper model that takes it)") from exc


def read_positions(position, input_ids: torch.Tensor, attention_mask) -> torch.Tensor | None:
    """Per-row read position ``[B]``: ``"last"`` = last attended token (``L-1`` without a
    mask), an int (negative counts from the end), one int per row (a ``[B]`` tensor, list or
    array; negative counts from the end), or ``None`` (no position: 2-D outputs)."""
    B, L = input_ids.shape
    if position is None:
        return None
    if isinstance(position, str) and position == "last":
        if attention_mask is None:
            return torch.full((B,), L - 1, dtype=torch.long, device=input_ids.device)
        idx = torch.arange(L, device=input_ids.device).expand(B, L)
        return torch.where(attention_mask.to(input_ids.device) != 0, idx, -1).amax(dim=1)
    if isinstance(position, numbers.Integral) and not isinstance(position, bool) \
            and -L <= position < L:
        at = torch.full((B,), int(position) % L, dtype=torch.long, device=input_ids.device)
        _warn_if_padding_read(position, at, attention_mask)
        return at
    if not isinstance(position, (str, bool, numbers.Number)):
        at = _row_positions(position, B, L).to(input_ids.device)
        _warn_if_padding_read("per row", at, attention_mask)
        return at
    raise ValueError(f"position must be 'last', None, an int in [-{L}, {L}) or one such int "
                     f"per row ([{B}]), got {position!r}")


def _row_positions(position, B: int, L: int) -> torch.Tensor:
    """``position`` (a tensor, list or array of ``B`` integers in ``[-L, L)``, or a 0-d one
    for every row) as ``[B]`` long indices in ``[0, L)``."""
    try:
        at = torch.as_tensor(position)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise TypeError(f"position must be 'last', None, an int or {B} ints (one per row), "
                        f"got {type(position).__name__}") from exc
    if at.dtype == torch.bool or at.is_floating_point() or at.is_complex():
        raise TypeError(f"per-row positions must be integers, got {at.dtype}")
    if at.dim() == 0:  # (a 0-d tensor: one position for all rows)
        at = at.expand(B)
    if tuple(at.shape) != (B,):
        raise ValueError(f"per-row positions must have shape [{B}] (one per row of "
                         f"input_ids), got {list(at.shape)}")
    if at.numel() and not bool(((at >= -L) & (at < L)).all()):
        raise ValueError(f"per-row positions must lie in [-{L}, {L}), got {at.tolist()}")
    return at.long() % L


def _warn_if_padding_read(position, at: torch.Tensor, attention_mask) -> None:
    """A ``UserWarning`` when the read position ``at [B]`` (``position`` as given) is padding
    (mask 0) in some row: a pad position's logit is scored there (all-zero attributions where
    padding leads)."""
    if attention_mask is None:
        return
    mask = attention_mask.to(at.device)
    padded = (mask[torch.arange(at.shape[0], device=at.device), at] == 0).nonzero().flatten()
    if padded.numel():
        where = ", ".join(f"row {r}: index {int(at[r])}" for r in padded.tolist()[:8])
        warn(f"position={position} reads padding (attention_mask 0) at {where}: a pad "
             "position's output is attributed there; position='last' reads each row's last "
             "attended token", UserWarning)


def check_causal_lm(model, what: str = "generation attribution") -> None:
    """Raise ``ValueError`` for an encoder-decoder ``transformers`` model
    (``config.is_encoder_decoder``: T5, BART): a continuation appended to the encoder's input
    means nothing there."""
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        raise ValueError(f"{what} needs a causal (decoder-only) LM; {type(model).__name__} is "
                         "an encoder-decoder model, whose continuation is the decoder's input, "
                         "not the prompt's")


class NotCausal(ValueError):
    """A model whose logits at earlier positions change with a later token (a masked or
    bidirectional model): one forward of prompt + continuation does not give each target's
    log-prob on its own prefix."""


class LengthDependentLogits(ValueError):
    """A causal LM whose logits at a position change with the sequence's length (a RoPE
    scaled by it): one forward of prompt + continuation does not give each target's
    log-prob on its own prefix."""


LENGTH_SCALED_ROPE = ("dynamic", "longrope")  # transformers' rope types chosen by the length


def _length_scaled_rope_window(config) -> int | None:
    """The length past which ``config``'s RoPE changes its frequencies (``rope_type``
    ``"dynamic"`` or ``"longrope"``: ``original_max_position_embeddings``, else
    ``max_position_embeddings``; per layer type too), or None for a RoPE that does not."""
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
    if not isinstance(params, dict):
        return None
    found = [params] + [v for v in params.values() if isinstance(v, dict)]
    windows = [p.get("original_max_position_embeddings")
               or getattr(config, "original_max_position_embeddings", None)
               or getattr(config, "max_position_embeddings", None)
               for p in found if (p.get("rope_type") or p.get("type")) in LENGTH_SCALED_ROPE]
    return min((int(w) for w in windows if w), default=None) if windows else None


@torch.no_grad()
def check_causal(model, sequence: torch.Tensor, vocab: int | None, prompt_len: int = 0) -> None:
    """Raise ``ValueError`` unless the logits at the position before the last stay as they
    were when the last token of ``sequence [L]`` changes (one forward of two rows; the head at
    the positions read where the model takes ``logits_to_keep``): a masked LM (BERT) sees the
    continuation both ways, and its numbers would mean nothing. Rows of one batch may round
    apart: 16 units of the logits' precision of the largest one are allowed (a random tiny
    BERT moved them by 1e-3 of it, a causal LM by 0). With ``prompt_len`` ``P < L`` also
    :class:`LengthDependentLogits` unless the logits at ``P - 1`` equal those of a forward of
    the first ``P`` tokens alone (64 units allowed: lengths round apart by up to 5 in float32
    on a few 2-layer decoders), or for a ``"dynamic"``/``"longrope"`` RoPE past its window
    (bf16 rounds such a change away): a Llama with dynamic RoPE or a Phi-3 with longrope
    past its original window scored early targets with the whole sequence's frequencies
    (2.7 off Captum, silently). Skipped for a model in train mode attributed inside
    :func:`~taylor_kernels.allow_row_coupling` (the Captum front's runs): its dropout moves
    the logits anyway."""
    if sequence.shape[0] < 2 or row_coupling_allowed() and coupling_modules_of(model):
        return
    L = sequence.shape[0]
    by_prefix = 0 < prompt_len < L
    read = L - prompt_len + 1 if by_prefix else 2  # (positions P - 1 .. L - 1, or the last two)
    other = sequence.clone()
    other[-1] = (other[-1] + 1) % (vocab or int(other[-1]) + 2)
    cuts = cuts_logits(model)
    out = lm_logits(ids_caller(model)(torch.stack([sequence, other]),
                                      **({"logits_to_keep": read} if cuts else {})), vocab)
    before, after = out[0, -2], out[1, -2]
    allowed = 16 * torch.finfo(out.dtype).eps * before.abs().max()
    if (before - after).abs().max() > allowed:
        raise NotCausal(f"generation attribution needs a causal LM: {type(model).__name__}'s "
                        "logits at earlier positions change with a later token (a masked or "
                        "bidirectional model)")
    if not by_prefix:
        return
    window = _length_scaled_rope_window(getattr(model, "config", None))
    alone = lm_logits(ids_caller(model)(sequence[None, :prompt_len],
                                        **({"logits_to_keep": 1} if cuts else {})), vocab)
    at_p = out[0, -read]
    moved = (at_p - alone[0, -1]).abs().max() > 64 * torch.finfo(out.dtype).eps * \
        at_p.abs().max()
    if moved or window is not None and L > window:
        why = f"its RoPE is scaled by the length past {window} positions" if window else \
            "it depends on the length"
        raise LengthDependentLogits(
            f"{type(model).__name__}'s logits at the prompt's last position change with the "
            f"sequence's length ({why}): one forward of prompt + continuation ({L} tokens) "
            "would score every target with the whole sequence's, not its own prefix's; "
            "attribute each target on its prefix (taylor_kernels.captum."
            "LLMGradientAttribution does), or keep prompt + continuation within that window")


def decoder_sequence(model, ids: torch.Tensor, attention_mask, kwargs: dict):
    """``(ids, mask)`` of the sequence whose positions the output holds: the input's, or for an
    encoder-decoder model (``config.is_encoder_decoder``: T5, BART) the decoder's
    ``decoder_input_ids`` / ``decoder_attention_mask`` from ``model_kwargs``, as its logits
    are the decoder's."""
    if not getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return ids, attention_mask
    dec = kwargs.get("decoder_input_ids")
    if not (isinstance(dec, torch.Tensor) and dec.dim() == 2 and dec.shape[0] == ids.shape[0]):
        raise ValueError("encoder-decoder model: its outputs are the decoder's positions; pass "
                         "the decoder's ids as model_kwargs={'decoder_input_ids': [B, L_dec] "
                         "tensor} (and the encoder's embedding layer, e.g. "
                         "layer='encoder.embed_tokens'); a model whose encoder reads features, "
                         "not ids (Whisper, Speech2Text), has no encoder ids to attribute: "
                         "attribute its decoder ids with tk.layer_integrated_gradients through "
                         "the decoder's embedding, the features as an additional forward "
                         "argument")
    return dec, kwargs.get("decoder_attention_mask")


@dataclass
class TokenProblem:
    """A token-id call prepared for the path engine: the engine model ``forward(points, ids,
    *row_values, positions)``, the embedding activations at the input and baseline
    ``[B, L, E]``, and the extra arguments ``args = (ids, *row_values, positions)``."""

    forward: Callable
    act_x: torch.Tensor
    act_b: torch.Tensor
    args: tuple
    layer: nn.Module


def embedded_ids(call: Callable, layer: nn.Module, ids: torch.Tensor, row_values: tuple,
                 name: str, vocab: int | None, layer_input: list | None = None) -> torch.Tensor:
    """:func:`layer_output` of ``ids``; where the vocabulary is unknown (``vocab`` None: a
    custom embedding module, whose table the library cannot read), an embedding's
    ``IndexError`` named as :class:`VocabIndexError` for the argument ``name`` (where it is
    known the ids were checked against it, so the error is another table's, e.g.
    ``token_type_ids``, and is raised as it is)."""
    try:
        return layer_output(call, layer, ids, *row_values, layer_input=layer_input)
    except IndexError as exc:
        if vocab is not None or isinstance(exc, VocabIndexError) or \
                "out of range" not in str(exc):
            raise
        raise VocabIndexError(f"{name} holds ids up to {int(ids.max())}: the embedding "
                              f"refused one ({exc}); is an id outside its vocabulary?") from exc


def fed_other_ids(ids: torch.Tensor, fed) -> bool:
    """Whether the layer was fed ids other than ``ids`` (or XLNet's ``ids.T``): an
    encoder-decoder's decoder embedding gets the decoder's."""
    if not isinstance(fed, torch.Tensor) or fed.dim() != 2 or fed.is_floating_point():
        return False
    return not any(fed.shape == t.shape and torch.equal(fed, t.to(fed.device))
                   for t in (ids, ids.T))


def check_token_layout(act: torch.Tensor, ids: torch.Tensor, fed, layer: nn.Module) -> None:
    """``ValueError`` unless the layer's activation ``act`` has a row per row of ``ids
    [B, L]`` and is laid out ``[B, L', ...]`` like the ids ``fed`` to the layer (an
    encoder-decoder's decoder embedding gets the decoder's ids, of another length): XLNet
    embeds ``ids`` transposed (``[L, B, E]``), which square ids hide from the shape alone,
    so ``fed`` is compared with ``ids.T`` too."""
    fed_ids = isinstance(fed, torch.Tensor) and fed.dim() == 2 and not fed.is_floating_point()
    transposed = fed_ids and fed.shape == ids.T.shape and not torch.equal(
        fed, ids.to(fed.device)) and torch.equal(fed, ids.T.to(fed.device))
    if act.dim() < 2 or act.shape[0] != ids.shape[0] or transposed or (
            fed_ids and tuple(act.shape[:2]) != tuple(fed.shape)):
        raise ValueError(f"layer {type(layer).__name__}'s output {tuple(act.shape)} is not laid "
                         f"out [batch, tokens, ...] like input_ids {tuple(ids.shape)} (XLNet "
                         "embeds the ids transposed); token attribution needs one activation "
                         "row per input row and token")


def token_problem(model, input_ids, *, baselines="zero", attention_mask=None, keep=None,
                  skip_tokens: Sequence[int] = (), layer=None, output=None,
                  position="last", score: str = "logit", model_kwargs: dict | None = None,
                  tokenizer=None) -> TokenProblem:
    """Prepare token-id attribution through the embedding layer (see the module docstring)."""
    check_model(model)  # train-mode dropout would make every number random
    model = hookable(model)  # (a compiled model's graphs ignore the embedding's hooks)
    emb = input_embeddings(model, layer)
    vocab = vocab_size(emb, model)
    ids = check_ids(input_ids, vocab=vocab)
    kwargs = dict(model_kwargs or {})
    if "input_ids" in kwargs or "inputs_embeds" in kwargs:
        raise ValueError("model_kwargs must not hold input_ids or inputs_embeds: the ids are "
                         "the input_ids argument")
    if "logits_to_keep" in kwargs:
        raise ValueError("model_kwargs must not hold logits_to_keep: the library passes it "
                         "itself (the head runs only at the positions read; choose them with "
                         "position=)")
    cache = [k for k in ("past_key_values", "cache") if k in kwargs]  # (transformers 5.24
    if cache:  # names it cache: it grew in place, and the call failed on sizes)
        raise ValueError(f"model_kwargs must not hold {cache[0]}: every path point's forward "
                         "would extend the cache in place (and the cached prefix is not "
                         "attributed); pass the whole sequence as input_ids")
    if "labels" in kwargs:
        raise ValueError("model_kwargs must not hold labels: the model would compute a loss "
                         "over the whole batch of path points (rows of different points "
                         "mixed); choose the score with target=, score= and output=")
    if "attention_mask" in kwargs:  # the same as attention_mask=: padding is held and skipped
        if attention_mask is not None:
            raise ValueError("attention_mask given twice (argument and model_kwargs)")
        attention_mask = kwargs.pop("attention_mask")
    if attention_mask is not None:
        attention_mask = torch.as_tensor(attention_mask, device=ids.device)
        if tuple(attention_mask.shape) != tuple(ids.shape):
            raise ValueError(f"attention_mask {tuple(attention_mask.shape)} must match "
                             f"input_ids {tuple(ids.shape)}")
        kwargs["attention_mask"] = attention_mask
    decoder_sequence(model, ids, attention_mask, kwargs)  # (an encoder-decoder without its
    # decoder ids is named here: the probe forward failed in the decoder with T5's message)
    call = KeywordModel(model, kwargs, ids.shape[0])
    fed: list = []
    act_x = embedded_ids(call, emb, ids, call.row_values, "input_ids", vocab, layer_input=fed)
    check_token_layout(act_x, ids, fed[0] if fed else None, emb)
    base = baseline_ids(baselines, ids, model, tokenizer)
    other = bool(fed) and fed_other_ids(ids, fed[0])
    if other and fed[0].dim() == 2 and fed[0].shape[1] > ids.shape[1] and \
            torch.equal(fed[0][:, :ids.shape[1]], ids):
        raise ValueError(
            f"{type(model).__name__} pads input_ids {tuple(ids.shape)} inside its forward to "
            f"{tuple(fed[0].shape)} (Longformer pads to a multiple of its attention window), "
            "so the embedding's rows are not input_ids' tokens: pad input_ids (and "
            "attention_mask with 0) to that length yourself")
    if other and (base is not None or keep is not None or len(skip_tokens)):
        raise ValueError(  # (the baseline ids went to the encoder: every attribution was 0)
            f"layer {type(emb).__name__} is fed other ids {tuple(fed[0].shape)} than input_ids "
            f"{tuple(ids.shape)} (an encoder-decoder's decoder embedding): token baselines, "
            "keep and skip_tokens are taken on input_ids and do not apply there; use "
            "baselines='zero' without them, or tk.layer_integrated_gradients on that layer "
            "with decoder baselines")
    if base is not None:
        check_vocab(base, vocab, "baselines")
    act_b = torch.zeros_like(act_x) if base is None else embedded_ids(
        call, emb, base, call.row_values, "baselines", vocab)
    if act_b.shape != act_x.shape:
        raise ValueError(f"baseline activations {tuple(act_b.shape)} differ from the input's "
                         f"{tuple(act_x.shape)}")
    # (the mask of input_ids is the encoder's: a decoder embedding's positions all move)
    kept = None if other else kept_positions(ids, attention_mask, keep, skip_tokens, tokenizer)
    if act_x.dim() == 3 and kept is not None and kept.any():
        act_b = torch.where(kept[..., None], act_x, act_b)
    positions = read_positions(position, *decoder_sequence(model, ids, attention_mask, kwargs))
    # the ids' embedding is the layer's first call; later ones (GPT-2 embeds token_type_ids
    # with the same table) run unchanged
    forward = layer_replaced_forward(PositionScore(call, output, positions, score), emb, False,
                                     later_calls=True)
    return TokenProblem(forward, act_x, act_b, (ids, *call.row_values, positions), emb)


@dataclass
class TokenAttributionResult:
    """``attributions [B, L, E]`` (float32, per embedding coordinate), ``token_scores [B, L]``
    (summed over ``E``), ``gap [B]`` = ``sum(attributions) - (f(x) - f(b))``, and
    ``evaluations`` (path points)."""

    attributions: torch.Tensor
    token_scores: torch.Tensor
    gap: torch.Tensor
    evaluations: int


@public_call
@first_collective_agreed
def token_integrated_gradients(model, input_ids, target=None, *, baselines="zero",
                               attention_mask=None, keep=None, skip_tokens=(), layer=None,
                               output=None, position="last", score: str = "logit",
                               model_kwargs: dict | None = None, tokenizer=None,
                               **ig_kwargs) -> TokenAttributionResult:
    """Integrated gradients of a model on token ids, in the input-embedding space.

    ``IG_{l,e} = (E_{l,e} - b_{l,e}) int_0^1 d f / d E_{l,e} (b + t (E - b)) dt`` with ``E``
    the embedding layer's output ``[B, L, E]`` and ``f`` the selected score (``target``: a
    class / token id per row, as in :func:`taylor_kernels.integrated_gradients`).

    Args: see the module docstring (``baselines``, ``attention_mask``, ``keep``,
    ``skip_tokens``, ``layer``, ``output``, ``position``, ``score``); ``model_kwargs``: other
    keyword arguments of ``model`` (per row when their first dimension is ``B``);
    ``ig_kwargs``: ``steps``, ``rule``, ``tol``, ``max_memory``, ``chunk_size``...
    Returns: :class:`TokenAttributionResult`.
    """
    _refuse_forward_args("token_integrated_gradients", ig_kwargs)
    refuse_create_graph("token_integrated_gradients", ig_kwargs)
    tp = token_problem(model, input_ids, baselines=baselines, attention_mask=attention_mask,
                       keep=keep, skip_tokens=skip_tokens, layer=layer, output=output,
                       position=position, score=score, model_kwargs=model_kwargs,
                       tokenizer=tokenizer)
    # (the score is inside the model the engine gets: its rank check cannot see it)
    check_same_settings(ig_kwargs.get("distributed", False), score, output)
    with first_order_attention(model, tp.act_x):
        res = integrated_gradients(tp.forward, tp.act_x, tp.act_b, target,
                                   additional_forward_args=tp.args, **ig_kwargs)
    if ig_kwargs.get("tol") is None and ig_kwargs.get("rule") not in ("adaptive", "exact") \
            and not _partial_result(ig_kwargs):
        warn_if_unconverged(res.gap, res.attributions, baselines, tp.act_x.dtype)
    attrs = res.attributions
    scores = attrs.sum(-1) if attrs.dim() == 3 else attrs.reshape(attrs.shape[0], -1).sum(-1)
    return TokenAttributionResult(attrs, scores, res.gap, res.evaluations)


def _partial_result(ig_kwargs: dict) -> bool:
    """Whether this rank got only its shard's partial sums (``distributed`` with
    ``reduce_to=0``, off the group's rank 0): their gap says nothing about convergence."""
    return holds_partial_sums(resolve_group(ig_kwargs.get("distributed", False)),
                              ig_kwargs.get("reduce_to", "all"))


def _refuse_forward_args(name: str, kwargs: dict) -> None:
    """``TypeError`` naming ``model_kwargs`` for Captum's ``additional_forward_args`` (the
    token APIs call the model with keyword arguments; the name clashed inside them)."""
    if "additional_forward_args" in kwargs:
        raise TypeError(f"{name} takes the model's other inputs as model_kwargs={{name: "
                        "value}} (keyword arguments of the model, per row when their first "
                        "dimension is B), not additional_forward_args")


UNCONVERGED_GAP = 0.02  # |gap| over |f(x) - f(b)| past which a fixed rule's result is named


def warn_if_unconverged(gap: torch.Tensor, attrs: torch.Tensor, baselines,
                        dtype: torch.dtype) -> None:
    """Warn when a fixed rule's completeness gap exceeds ``UNCONVERGED_GAP`` of
    ``|f(x) - f(b)|`` for some row (``f(x) - f(b) = sum(attrs) - gap``). The zero
    embedding puts an RMSNorm decoder (Llama, Mistral, Qwen) at RMSNorm's singularity, where
    no fixed rule converges: token scores moved 2x between 50 and 800 steps, silently.
    ``dtype``: the embeddings' (:func:`low_precision_note`)."""
    if gap.dim() != 1:  # one output per row is what token IG reads
        return
    delta = attrs.reshape(attrs.shape[0], -1).sum(-1) - gap
    rel = gap.abs() / delta.abs().clamp_min(torch.finfo(delta.dtype).tiny)
    bad = (rel > UNCONVERGED_GAP) & (delta.abs() > 1e-6 * attrs.abs().amax().clamp_min(1))
    if bool(bad.any()):
        hint = (" (the zero embedding sits at an RMSNorm's singularity: try baselines='pad' "
                "or another token)") if isinstance(baselines, str) and baselines == "zero" \
            else ""
        warn(f"token IG: the completeness gap is {float(rel[bad].max()):.2g} of "
             f"|f(x) - f(b)| for {int(bad.sum())} row(s): the fixed rule has not "
             f"converged; use more steps, rule='adaptive' or tol={hint}"
             + low_precision_note(dtype), RuntimeWarning)


def attention_implementation(model) -> str | None:
    """``model.config._attn_implementation`` (``"sdpa"``, ``"eager"``...) or None."""
    return getattr(getattr(model, "config", None), "_attn_implementation", None)


@contextlib.contextmanager
def first_order_attention(model, activation: torch.Tensor):
    """Attention for the gradients of a forward the library runs (token IG, generation):
    the model's own, except ``"sdpa"`` with bf16/fp16 activations on the CPU, which runs on
    the math backend (:func:`~taylor_kernels.engine.derivative.math_attention`). Measured, torch
    2.13, one thread, ``[32, 4, 22, 64]`` causal bf16: fused forward 1.3 ms, backward 19.5 ms;
    math 2.6 ms and 4.7 ms (float32: fused 1.0 / 3.3 ms, math 1.9 / 3.8 ms, so float32 keeps
    the fused kernel). ``"flex_attention"`` on the CPU, which has no backward there (torch's
    error told the user to stop requiring grad), runs ``"eager"`` attention, said once."""
    impl = attention_implementation(model)
    if impl == "flex_attention":  # (on the CPU: eager; elsewhere as it is)
        with cpu_flex_as_eager(model):
            yield
        return
    if activation.device.type != "cpu" or activation.dtype not in (
            torch.bfloat16, torch.float16) or impl != "sdpa":
        yield
        return
    with math_attention():
        yield


@public_call
@first_collective_agreed
def token_interactions(model, input_ids, target=None, *, baselines="zero",
                       attention_mask=None, keep=None, skip_tokens=(), layer=None,
                       output=None, position="last", score: str = "logit",
                       model_kwargs: dict | None = None, tokenizer=None, steps: int = 16,
                       **gih_kwargs) -> dict:
    """Token-pair Integrated Hessians over the embedding layer (one group per token).

    ``Gamma_{pq}`` sums the Integrated Hessians of the embedding coordinates of tokens ``p``
    and ``q`` (:func:`~taylor_kernels.group_integrated_hessians`), run inside
    :func:`~taylor_kernels.engine.derivative.math_attention`. Arguments as
    :func:`token_integrated_gradients`.
    Returns ``{"interactions" [B, L, L], "ig" [B, L], "completeness_gap" [B]}``.
    """
    _refuse_forward_args("token_interactions", gih_kwargs)
    tp = token_problem(model, input_ids, baselines=baselines, attention_mask=attention_mask,
                       keep=keep, skip_tokens=skip_tokens, layer=layer, output=output,
                       position=position, score=score, model_kwargs=model_kwargs,
                       tokenizer=tokenizer)
    check_same_settings(gih_kwargs.get("distributed", False), score, output)
    L = tp.act_x.shape[1]
    token_of = torch.arange(L, device=tp.act_x.device)[:, None].expand(L, tp.act_x.shape[-1])
    with math_attention(model):
        res = group_integrated_hessians(tp.forward, tp.act_x, token_of, tp.act_b, target,
                                        steps=steps, additional_forward_args=tp.args,
                                        **gih_kwargs)
    return {"interactions": res.interactions, "ig": res.ig,
            "completeness_gap": res.completeness_gap}
