"""A whole generation attributed in one pass: every target token of a causal LM to the prompt.

For a prompt ``p`` (``P`` tokens) and a continuation ``y`` (``T`` tokens) the scores are the
target log-probs ``f_t = log p(y_t | p, y_<t)``. The prompt's embeddings ``E [P, H]`` (the
input-embedding layer's output) move along ``b + a (E - b)``; the continuation's embeddings
stay at their values (as in Captum's ``LLMGradientAttribution``, whose baseline keeps them).
Causal masking makes one forward of ``p + y_<T`` give all ``T`` log-probs at a path point
(the LM head runs only at those ``T`` positions), and the path engine's multi-target mode
takes all ``T`` gradients from one batched backward. Then

``A[t, l, h] = (E - b)_{l,h} int_0^1 d f_t / d E_{l,h} (b + a (E - b)) da``,

token scores ``A[t, l] = sum_h A[t, l, h]`` ``[T, P]``, and the sequence log-prob
``log p(y | p) = sum_t f_t`` has attribution ``sum_t A[t]`` ``[P]``. Completeness per target:
``gap_t = sum_l A[t, l] - (f_t(E) - f_t(b))``.
"""
from __future__ import annotations

import contextlib
import numbers
from dataclasses import dataclass
from typing import Sequence

import torch

from taylor_kernels import backends
from taylor_kernels.attr.integrated_gradients import (DEFAULT_ADAPTIVE_TOL, _converged,
                                                      _warn_if_gap_large, check_rule_args)
from taylor_kernels.engine import guards, path_engine, quadrature
from taylor_kernels.engine.thread_hooks import hookable, this_thread
from taylor_kernels.models import elementwise, hf, lm_head
from taylor_kernels.models.outputs import lm_logits


@dataclass
class GenerationAttribution:
    """``token_attr [T, P]`` (target token x prompt token), ``seq_attr [P]`` (attribution of
    the sequence log-prob, ``token_attr.sum(0)``), ``embedding_attr [T, P, H]`` (on request),
    ``log_probs [T]`` (target log-probs given the prompt), ``gap [T]`` (completeness),
    ``prompt_ids [P]``, ``target_ids [T]``, ``evaluations`` (path points) and, for the
    adaptive rule, ``nodes`` (quadrature nodes used)."""

    token_attr: torch.Tensor
    seq_attr: torch.Tensor
    log_probs: torch.Tensor
    gap: torch.Tensor
    prompt_ids: torch.Tensor
    target_ids: torch.Tensor
    evaluations: int
    embedding_attr: torch.Tensor | None = None
    nodes: int | None = None


@torch.no_grad()
def greedy_continuation(model, prompt_ids: torch.Tensor, max_new_tokens: int,
                        eos_token_id: int | Sequence[int] | None = None,
                        vocab: int | None = None) -> torch.Tensor:
    """Greedy decoding ``[T]`` for a model without ``generate`` (argmax of the last position's
    logits: :func:`~taylor_kernels.models.outputs.lm_logits`), stopping after an
    end-of-sequence id (``eos_token_id``: one id or several; kept) or ``max_new_tokens``."""
    eos = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or ())
    seq, out, call = prompt_ids[None], [], hf.ids_caller(model)
    for _ in range(max_new_tokens):
        logits = lm_logits(call(seq), vocab)[:, -1]
        nxt = logits.argmax(-1)
        out.append(int(nxt))
        seq = torch.cat([seq, nxt[:, None]], dim=1)
        if out[-1] in eos:
            break
    return torch.tensor(out, dtype=torch.long, device=prompt_ids.device)


def generated_continuation(out, prompt_len: int) -> torch.Tensor:
    """The new ids ``[T]`` of ``model.generate``'s output for one prompt of ``prompt_len``
    ids: ``out`` is the sequences ``[1, prompt_len + T]``, or a ``GenerateOutput`` holding
    them (``return_dict_in_generate=True``) as ``.sequences``."""
    seqs = getattr(out, "sequences", out)
    if not isinstance(seqs, torch.Tensor) or seqs.dim() != 2:
        raise TypeError(f"model.generate returned a {type(out).__name__}; expected the "
                        "sequences [1, prompt + new tokens] or a GenerateOutput with .sequences")
    return seqs[0, prompt_len:]


def default_continuation(model, prompt_ids: torch.Tensor, max_new_tokens: int,
                         vocab: int | None = None) -> torch.Tensor:
    """The continuation ``[T]`` of ``prompt_ids [P]`` when none is given: ``model.generate(
    input_ids, max_new_tokens=..., do_sample=False)`` (as Captum's ``LLMGradientAttribution``
    generates: greedy or beam search under the rest of ``model.generation_config``, e.g.
    ``repetition_penalty``, ``no_repeat_ngram_size``, ``suppress_tokens``,
    ``min_new_tokens``, its end-of-sequence ids); a model without ``generate`` decodes by
    :func:`greedy_continuation` (stopping at the end-of-sequence ids of its configs)."""
    generate = getattr(model, "generate", None)
    if not callable(generate):
        return greedy_continuation(model, prompt_ids, max_new_tokens, _eos_ids(model), vocab)
    out = generate(input_ids=prompt_ids[None], max_new_tokens=max_new_tokens, do_sample=False)
    return generated_continuation(out, prompt_ids.shape[0]).to(prompt_ids.device)


class GenerationProblem:
    """Engine problem: ``x [1, P*H]`` prompt embeddings, ``baselines [1, 1, P*H]``,
    ``forward(points [N, P*H], rows) -> [N, T]`` target log-probs (float32). ``sequence``
    ``[P + T - 1]`` ids (prompt and all but the last target), ``targets [T]``, embedding-layer
    outputs ``act [1, P + T - 1, H]`` and prompt baselines ``base [1, P, H]``."""

    B, K = 1, 1

    def __init__(self, model, layer, sequence: torch.Tensor, targets: torch.Tensor,
                 act: torch.Tensor, base: torch.Tensor, vocab: int | None = None):
        self.model, self.layer, self.vocab = model, layer, vocab
        self.call = hf.ids_caller(model)
        self.T = targets.shape[0]
        self.P = sequence.shape[0] - self.T + 1
        self.sequence = sequence                       # [P + T - 1] ids fed to the model
        self.targets = targets[None]                   # [1, T]
        self.fixed = act[:, self.P:]                   # [1, T - 1, H] continuation embeddings
        self.x = act[:, :self.P].reshape(1, -1)
        self.baselines = base.reshape(1, 1, -1)
        self.keep_logits = hf.accepts(model, "logits_to_keep")
        # T backward passes over the retained graph instead of one vmap-batched backward on
        # CPU: 3.0 s vs 3.9 s for a 4x256 GPT-2, 32 + 16 tokens, 8 nodes, one thread (measured)
        self.serial_backward = act.device.type == "cpu"
        # serial passes: the log-probs from the head's input through lm_head.HeadLogProb, whose
        # backward runs the head only at the pass's target position (when the model's logits
        # are exactly its linear head's output, unhooked and unmodified: checked every forward),
        # and each elementwise activation's g'(x) computed once per forward, not once per pass
        # (models/elementwise.py: ~97M GPT-2 generation 0.89x, small GPT-2 0.91x, Llama 1.00x)
        self.head = lm_head.linear_head(model) if self.serial_backward else None
        self.cache_key = ("generation", self.T)  # the cost per point grows with T
        self.head_checked = False

    def forward(self, points: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Log-probs ``[N, T]`` of the target tokens with the prompt embeddings ``points``."""
        N = points.shape[0]
        emb = torch.cat([points.reshape(N, self.P, -1).to(self.fixed.dtype),
                         self.fixed.expand(N, -1, -1)], dim=1)
        hook = self.layer.register_forward_hook(this_thread(lambda m, i, o: emb))
        try:
            extra = {"logits_to_keep": self.T} if self.keep_logits else {}
            activations = elementwise.cached_derivatives(self.model) if self.serial_backward \
                else contextlib.nullcontext()  # T backward passes reuse each g'(x)
            with lm_head.tapped(self.head) as seen, activations:
                out = lm_logits(self.call(self.sequence.expand(N, -1), **extra), self.vocab,
                                targets=None if self.head_checked else self.targets)
        finally:
            hook.remove()
        self.head_checked = True  # (the targets against the head's size: a host sync, once)
        return lm_head.target_log_probs(out[:, -self.T:], self.targets[0], self.head, seen)


def _integrate(problem, rule, steps, tol, fx, fb, **kw):
    """``([T, 1, D] sums, evaluations, nodes)`` by a fixed rule or the adaptive one."""
    if rule != "adaptive":
        alphas, weights = quadrature.nodes_and_weights(rule, steps)
        res = path_engine.integrate(problem, alphas, [weights], **kw)
        return res.sums[0], res.evaluations, None
    nodes, level_weights = quadrature.patterson_levels()
    sizes = [int((w != 0).sum()) for w in level_weights]
    delta = (fx - fb[:, 0])[0]                                        # [T]
    acc = [torch.zeros(problem.T, *problem.x.shape, dtype=fx.dtype, device=fx.device)
           for _ in sizes]
    evaluations, lo, cost = 0, 0, None
    for level, hi in enumerate(sizes):
        res = path_engine.integrate(problem, nodes[lo:hi],
                                    [w[lo:hi] for w in level_weights[level:]],
                                    point_cost=cost, held=sum(a.nbytes for a in acc), **kw)
        cost, evaluations = res.point_cost, evaluations + res.evaluations
        for j, part in enumerate(res.sums):
            acc[level + j] += part
        gap = acc[level].sum(dim=(1, 2)) - delta
        last = level == len(sizes) - 1
        met = _converged(gap, delta, acc[level].reshape(problem.T, -1),
                         acc[level - 1].reshape(problem.T, -1) if level > 0 else None, tol,
                         last, torch.arange(problem.T))
        if last or bool(met.all()):
            return acc[level], evaluations, hi
        lo = hi


def _one_row(ids, name: str) -> torch.Tensor:
    """Token ids ``[P]`` or ``[1, P]`` (a tensor, list or array) as ``[1, P]``."""
    if isinstance(ids, (list, tuple)) or type(ids).__module__ == "numpy":
        ids = torch.as_tensor(ids, dtype=torch.long if len(ids) == 0 else None)
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"{name} must be a tensor of token ids, got {type(ids).__name__}")
    if ids.dim() == 1:
        return ids[None]
    if ids.dim() != 2 or ids.shape[0] != 1:
        raise ValueError(f"{name} must hold one sequence ([n] or [1, n]), got "
                         f"{tuple(ids.shape)}; attribute several one by one")
    return ids


def _eos_ids(model) -> list[int]:
    """End-of-sequence ids of ``model.generation_config``, else of ``model.config`` (an int
    or a list, as Llama 3 configs give)."""
    for cfg in (getattr(model, "generation_config", None), getattr(model, "config", None)):
        eos = getattr(cfg, "eos_token_id", None)
        if isinstance(eos, int):
            return [eos]
        if isinstance(eos, (list, tuple)) and eos:
            return [int(e) for e in eos]
    return []


class ContinuationMoves(ValueError):
    """The layer's activations at the continuation's positions change with the prompt."""


def _baseline_activation(model, layer, sequence, act, base_ids, kept, P: int) -> torch.Tensor:
    """The layer's activation ``[1, P, H]`` at the baseline prompt (the baseline id at every
    attributed position, kept tokens as they are; ``base_ids`` None: the zero embedding).

    The one pass holds the continuation's activations at their values: exact (Captum's
    numbers) when the baseline prompt leaves them unchanged, as for the input embeddings. For
    another ``layer`` the same forward at the baseline prompt checks it
    (:class:`ContinuationMoves` if not); there the kept positions' baseline activations move
    with the prompt too, so all ``P`` come from that forward."""
    get = getattr(model, "get_input_embeddings", None)
    embeddings = callable(get) and get() is layer
    if base_ids is None:
        if not embeddings:
            raise ValueError(f"layer {type(layer).__name__} is not the input embeddings: give "
                             "baselines as token ids ('pad', 'unk' or an id), not 'zero'")
        return torch.where(kept[..., None], act[:, :P], torch.zeros_like(act[:, :P]))
    prompt_b = torch.where(kept, sequence[None, :P], base_ids.to(sequence.device))
    if embeddings:
        return hf.layer_output(hf.ids_caller(model), layer, prompt_b)
    at_b = hf.layer_output(hf.ids_caller(model), layer,
                           torch.cat([prompt_b, sequence[None, P:]], dim=1))
    if not torch.equal(at_b[:, P:], act[:, P:]):
        raise ContinuationMoves(
            f"layer {type(layer).__name__}: its activations at the continuation's positions "
            "change with the prompt (the layer comes after tokens are mixed), and the one pass "
            "holds them fixed; attribute to the input embeddings, or run layer integrated "
            "gradients once per target token (taylor_kernels.captum.LLMGradientAttribution "
            "does for such a layer)")
    return at_b[:, :P]


@guards.public_call
def generation_attribution(model, prompt_ids, target_ids=None, *, max_new_tokens: int = 25,
                           baselines="zero", skip_tokens: Sequence[int | str] = (), keep=None,
                           layer=None, steps: int = 50, rule: str = "gausslegendre",
                           tol: float | None = None, return_embedding_attr: bool = False,
                           max_memory=None, chunk_size: int | None = None,
                           backend: str | None = None, progress: bool = False,
                           tokenizer=None) -> GenerationAttribution:
    """Attribute every token of a causal LM's continuation to the prompt tokens in one pass.

    Args:
        model: a causal LM called as ``model(input_ids=ids [N, L])`` (or ``model(ids)`` when
            its forward has no ``input_ids`` argument) returning logits
            ``[N, L, V]`` (or a ``ModelOutput`` with ``.logits``); ``logits_to_keep`` is used
            when its forward takes it.
        prompt_ids: ``[P]`` or ``[1, P]`` token ids.
        target_ids: the continuation ``[T]`` (or ``[1, T]``); None generates it as Captum
            does: ``model.generate(input_ids, max_new_tokens=max_new_tokens,
            do_sample=False)``, so under the rest of ``model.generation_config``
            (``repetition_penalty``, ``no_repeat_ngram_size``, beams, end-of-sequence ids,
            ...); a model without ``generate`` decodes greedily, stopping after an
            end-of-sequence id of ``model.generation_config`` or ``model.config`` (one id or
            a list). A target id must be below the LM head's outputs (``IndexError``).
        baselines: ``"zero"`` (zero embedding), ``"pad"``, ``"unk"``, a token id, or ids
            ``[P]``; ``skip_tokens`` (ids, or token strings with ``tokenizer``) and ``keep``
            (bool ``[P]``) hold prompt tokens at their embedding (zero attribution).
        layer: the embedding layer (default ``model.get_input_embeddings()``, or a name); a
            later layer only while the continuation's activations there do not depend on
            the prompt (checked: ``ValueError`` otherwise).
        steps, rule, tol: quadrature as :func:`taylor_kernels.integrated_gradients`
            (``rule="adaptive"`` refines until every target's gap is within ``tol``; a
            ``RuntimeWarning`` names the targets that miss it after 63 nodes).
        return_embedding_attr: also return ``[T, P, H]`` per-embedding attributions.
        max_memory, chunk_size, backend, progress: as ``integrated_gradients``.
        tokenizer: reads the ``"pad"``/``"unk"`` ids the config lacks and converts token
            strings in ``skip_tokens``.
    Returns: :class:`GenerationAttribution`.
    """
    check_rule_args(rule, tol)
    if rule == "exact":
        raise ValueError("generation attribution has no exact rule (a causal LM is not "
                         "piecewise linear): use a fixed rule or rule='adaptive'")
    guards.check_model(model)  # train-mode dropout would make every number random
    # every forward here carries a hook (the embedding's capture or replacement), which a
    # torch.compile'd model's graphs ignore: its module runs them (as layer IG's do; with two
    # target tokens the embedding was "never called")
    model = hookable(model)
    hf.check_causal_lm(model)
    emb = hf.input_embeddings(model, layer)
    vocab = hf.vocab_size(emb, model)
    prompt = hf.check_ids(_one_row(prompt_ids, "prompt_ids"), "prompt_ids", vocab)
    if target_ids is None:
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, numbers.Integral) \
                or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        with hf.context_window_named(model, prompt.shape[1] + max_new_tokens - 1):
            target = default_continuation(model, prompt[0], max_new_tokens, vocab)
        target = hf.check_ids(target[None], "the generated continuation", vocab)[0]
    else:
        target = hf.check_ids(_one_row(target_ids, "target_ids"), "target_ids",
                              vocab)[0].to(prompt.device)
    P, T = prompt.shape[1], target.shape[0]
    if T == 0:
        raise ValueError("the target continuation is empty")
    sequence = torch.cat([prompt[0], target[:-1]])
    with hf.context_window_named(model, sequence.shape[0]):
        with guards.preserved_buffers(model):
            hf.check_causal(model, sequence, vocab, prompt_len=P)
        act = hf.layer_output(hf.ids_caller(model), emb, sequence[None])
    base_ids = hf.baseline_ids(baselines, prompt, model, tokenizer, "prompt_ids")
    if base_ids is not None:
        hf.check_vocab(base_ids, vocab, "baselines")
    kept = hf.kept_positions(prompt, None, keep, skip_tokens, tokenizer, "prompt_ids")
    base = _baseline_activation(model, emb, sequence, act, base_ids, kept, P)
    problem = GenerationProblem(model, emb, sequence, target, act, base, vocab)
    with backends.selected(backend), hf.first_order_attention(model, act):
        fx, fb = path_engine.endpoint_values(problem, max_memory=max_memory)  # [1, T], [1, 1, T]
        sums, evaluations, nodes = _integrate(
            problem, rule, steps, tol or DEFAULT_ADAPTIVE_TOL, fx, fb, max_memory=max_memory,
            chunk_size=chunk_size, progress=progress)
    full = sums.reshape(T, P, -1)                                       # [T, P, H]
    token_attr = full.sum(-1)
    gap = token_attr.sum(1) - (fx[0] - fb[0, 0])
    _warn_if_gap_large(gap, fx[0] - fb[0, 0], tol or DEFAULT_ADAPTIVE_TOL, rule, tol,
                       problem.x.dtype)
    return GenerationAttribution(token_attr, token_attr.sum(0), fx[0], gap, prompt[0], target,
                                 evaluations, full if return_embedding_attr else None, nodes)
