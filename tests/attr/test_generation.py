"""Generation attribution: every target token of a causal LM to the prompt in one pass, equal
to Captum's LLMGradientAttribution(LayerIntegratedGradients) token by token (float32, 1e-5)."""
from __future__ import annotations

import copy
import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("transformers")

from taylor_kernels.attr.generation import generation_attribution  # noqa: E402
from taylor_kernels.models import tiny  # noqa: E402
from tests.attr.test_low_precision import one_thread  # noqa: E402,F401  (autouse: 1 thread)

WORDS = "the cat sat on a mat dog ran far away and then slept quietly".split()
PROMPT = "the cat sat on a mat and the dog"
TARGET = "ran far away and slept"


@pytest.fixture(scope="module")
def tok():
    return tiny.word_tokenizer(WORDS)


@pytest.fixture(scope="module")
def models(tok):
    return {"gpt2": tiny.gpt2(layers=2, d=64, vocab=len(tok)),
            "llama": tiny.llama(layers=2, d=64, vocab=len(tok))}


def _ids(tok):
    return (tok.encode(PROMPT, return_tensors="pt"),
            torch.tensor(tok.encode(TARGET, add_special_tokens=False)))


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_equals_captum_llm_gradient_attribution(arch, models, tok):
    from captum.attr import LayerIntegratedGradients, LLMGradientAttribution, TextTokenInput

    model = models[arch]
    inp = TextTokenInput(PROMPT, tok, baselines=1, skip_tokens=["<s>"])
    llm = LLMGradientAttribution(LayerIntegratedGradients(model, model.get_input_embeddings()),
                                 tok)
    ref = llm.attribute(inp, target=TARGET, n_steps=10)
    prompt, target = _ids(tok)
    res = generation_attribution(model, prompt, target, baselines="unk", skip_tokens=[2],
                                 steps=10, tokenizer=tok)
    assert res.token_attr.shape == (5, prompt.shape[1])
    torch.testing.assert_close(res.token_attr[:, 1:], ref.token_attr, rtol=0, atol=1e-5)
    torch.testing.assert_close(res.seq_attr[1:], ref.seq_attr, rtol=0, atol=1e-5)
    assert (res.token_attr[:, 0] == 0).all()
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.cat([prompt[0], target])[None]).logits[0], -1)
    expected = logp[prompt.shape[1] - 1:-1].gather(1, target[:, None])[:, 0]
    torch.testing.assert_close(res.log_probs, expected, rtol=0, atol=1e-5)


def test_chunk_size_and_budget_invariance(models, tok):
    model = models["gpt2"]
    prompt, target = _ids(tok)
    full = generation_attribution(model, prompt, target, steps=8, chunk_size=8,
                                  return_embedding_attr=True)
    assert full.embedding_attr.shape == (5, prompt.shape[1], 64)
    torch.testing.assert_close(full.embedding_attr.sum(-1), full.token_attr)
    for kw in ({"chunk_size": 1}, {"chunk_size": 3}, {"max_memory": "6MB"}):
        part = generation_attribution(model, prompt, target, steps=8, **kw)
        torch.testing.assert_close(part.token_attr, full.token_attr, rtol=0, atol=1e-6)


def test_completeness_adaptive_and_greedy(models, tok):
    model = models["llama"]
    prompt, _ = _ids(tok)
    greedy = generation_attribution(model, prompt, max_new_tokens=3, steps=4)
    with torch.no_grad():
        seq = prompt
        for _ in range(3):
            seq = torch.cat([seq, model(seq).logits[:, -1:].argmax(-1)], 1)
    assert greedy.target_ids.tolist() == seq[0, prompt.shape[1]:].tolist()
    res = generation_attribution(models["gpt2"], prompt, greedy.target_ids, baselines="pad",
                                 rule="adaptive", tol=1e-5)
    delta = res.token_attr.sum(1) - res.gap
    assert (res.gap.abs() <= 1e-5 * delta.abs() + 1e-6).all(), (res.gap, delta)
    assert res.nodes in (3, 7, 15, 31) and res.evaluations == res.nodes
    with pytest.warns(RuntimeWarning, match="miss the completeness tolerance"):
        generation_attribution(model, prompt, greedy.target_ids, baselines="pad",
                               rule="adaptive", tol=1e-6)
    one = generation_attribution(model, prompt, greedy.target_ids[:1], baselines="pad",
                                 steps=16)
    fixed = generation_attribution(model, prompt, greedy.target_ids, baselines="pad", steps=16)
    torch.testing.assert_close(one.token_attr[0], fixed.token_attr[0], rtol=0, atol=1e-6)


def test_errors(models, tok):
    from transformers import BertConfig, BertForSequenceClassification

    model = models["gpt2"]
    prompt, target = _ids(tok)
    V = model.get_input_embeddings().num_embeddings
    for args, kw, error, match in [
            ((prompt.repeat(2, 1), target), {}, ValueError, "one sequence"),
            ((prompt, target.repeat(2, 1)), {}, ValueError, "one sequence"),
            ((prompt, target), {"baselines": torch.zeros(prompt.shape[1])}, TypeError,
             "token ids"),
            ((prompt, target[:0]), {}, ValueError, "empty"),
            ((prompt[:, :0], target), {}, ValueError, "prompt_ids is empty"),
            ((prompt + V, target), {}, ValueError, "prompt_ids holds the id"),
            ((prompt, torch.tensor([5, -1])), {}, ValueError, "target_ids holds the id -1"),
            ((prompt, target), {"baselines": V}, ValueError, "baselines holds the id"),
            ((prompt, target), {"keep": [True] * 3}, ValueError,
             r"keep of shape \(3,\) does not match prompt_ids"),
            ((prompt, None), {"max_new_tokens": 2.5}, ValueError, "max_new_tokens must be"),
            ((prompt, None), {"max_new_tokens": 0}, ValueError, "max_new_tokens must be"),
            ((prompt, target), {"skip_tokens": ["cat"]}, TypeError, "pass tokenizer="),
            ((prompt, target), {"skip_tokens": [2.0]}, TypeError, "token ids"),
            ((prompt, target), {"rule": "adaptive", "tol": 0}, ValueError, "tol must be"),
            ((prompt, target), {"rule": "exact"}, ValueError, "no exact rule"),
            ((prompt.to(torch.uint8), target), {}, TypeError, "int64"),
            ((prompt, []), {}, ValueError, "target_ids is empty")]:
        with pytest.raises(error, match=match):
            generation_attribution(model, *args, steps=2, **kw)
    as_numpy = generation_attribution(model, prompt[0].numpy(), target.tolist(), steps=2)
    torch.testing.assert_close(as_numpy.token_attr,
                               generation_attribution(model, prompt, target, steps=2).token_attr)
    bert = BertForSequenceClassification(BertConfig(
        num_hidden_layers=1, hidden_size=16, num_attention_heads=2, intermediate_size=32,
        vocab_size=V)).eval()
    with pytest.raises(ValueError, match="causal LM"):
        generation_attribution(bert, prompt, target, steps=2)


def test_token_strings_to_skip_and_numpy_baseline_ids_are_taken(models, tok):
    """``skip_tokens`` as token strings (Captum's form) converted by the tokenizer (they
    failed with "too many dimensions 'str'"), and a numpy integer baseline id."""
    model = models["gpt2"]
    prompt, target = _ids(tok)
    ids = [tok.convert_tokens_to_ids(t) for t in ("<s>", "cat")]
    by_id = generation_attribution(model, prompt, target, steps=4, skip_tokens=ids,
                                   baselines=1)
    by_string = generation_attribution(model, prompt, target, steps=4, tokenizer=tok,
                                       skip_tokens=["<s>", "cat"], baselines=np.int64(1))
    torch.testing.assert_close(by_string.token_attr, by_id.token_attr)
    assert float(by_id.token_attr[:, [0, 2]].abs().max()) == 0.0  # <s> the cat ...
    with pytest.raises(ValueError, match="no token 'zebra'"):
        generation_attribution(model, prompt, target, steps=2, tokenizer=tok,
                               skip_tokens=["zebra"])


def test_models_that_do_not_continue_causally_are_refused(models, tok):
    """An encoder-decoder (the continuation would be appended to the encoder's input and the
    numbers mean nothing; BART ran silently before) and a masked LM (found by its logits, not
    by its class: a causal LM of remote code may not say it can generate) are refused by the
    library; the Captum front refuses the encoder-decoder and runs the masked LM through
    Captum's per-token loop, as Captum's class does (its one pass needs causality)."""
    import taylor_kernels.captum as tkc
    from transformers import (BartConfig, BartForConditionalGeneration, BertConfig,
                              BertForMaskedLM, T5Config, T5ForConditionalGeneration)

    prompt, target = _ids(tok)
    V = len(tok)
    small = dict(d_model=16, encoder_attention_heads=2, decoder_attention_heads=2,
                 encoder_ffn_dim=32, decoder_ffn_dim=32, encoder_layers=1, decoder_layers=1)
    cases = [
        (BartForConditionalGeneration(BartConfig(vocab_size=V, **small)),
         "model.encoder.embed_tokens", "encoder-decoder"),
        (T5ForConditionalGeneration(T5Config(vocab_size=V, d_model=16, d_kv=8, d_ff=32,
                                             num_layers=1, num_heads=2)),
         "encoder.embed_tokens", "encoder-decoder"),
        (BertForMaskedLM(BertConfig(vocab_size=V, hidden_size=16, num_hidden_layers=1,
                                    num_attention_heads=2, intermediate_size=32)),
         None, "logits at earlier positions change")]
    for model, layer, match in cases:
        model.eval()
        with pytest.raises(ValueError, match=match):
            generation_attribution(model, prompt, target, layer=layer, steps=2)
        emb = model.get_submodule(layer) if layer else model.get_input_embeddings()
        llm = None
        try:  # an encoder-decoder is refused at once; a masked LM by the one pass's check
            llm = tkc.LLMGradientAttribution(tkc.LayerIntegratedGradients(model, emb), tok)
        except ValueError as exc:
            assert match == "encoder-decoder" and match in str(exc)
        if llm is not None:
            res = llm.attribute(tkc.TextTokenInput(PROMPT, tok), target=TARGET, n_steps=2)
            assert res.token_attr is not None and torch.isfinite(res.token_attr).all()


def test_a_model_without_its_lm_head_is_refused(tok):
    """``GPT2Model`` returns hidden states, not logits: read as logits they gave log-softmaxes
    over the hidden units (and an index error for ids past the hidden size). Refused, with
    the class to load, by the library, its greedy decoding and both Captum-front paths."""
    import taylor_kernels.captum as tkc
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(0)
    bare = GPT2Model(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=len(tok),
                                n_positions=32)).eval()
    prompt, target = _ids(tok)
    for kw in ({"target_ids": target}, {"target_ids": None, "max_new_tokens": 2}):
        with pytest.raises(ValueError, match="without 'logits'.*ForCausalLM"):
            generation_attribution(bare, prompt, steps=2, **kw)
    emb = bare.get_input_embeddings()
    for lig in (tkc.LayerIntegratedGradients(bare, emb),                        # one pass
                tkc.LayerIntegratedGradients(bare, emb, multiply_by_inputs=False)):  # loop
        llm = tkc.LLMGradientAttribution(lig, tok)
        with pytest.raises(ValueError, match="without 'logits'"):
            llm.attribute(tkc.TextTokenInput(PROMPT, tok), target=TARGET, n_steps=2)
    # a forward returning the last position's logits [N, V] only (not [N, L, V])
    lm = tiny.gpt2(layers=1, d=16, vocab=len(tok))
    with pytest.raises(ValueError, match="next-token logits \\[N, L, vocab\\]"):
        generation_attribution(lambda input_ids: lm(input_ids=input_ids).logits[:, -1],
                               prompt, target, layer=lm.get_input_embeddings(), steps=2)
    # a plain tensor narrower than the vocabulary (hidden states of a custom model)
    with pytest.raises(ValueError, match=r"logits \[N, L, vocab\] over the embedding's"):
        generation_attribution(lambda input_ids: bare(input_ids=input_ids).last_hidden_state,
                               prompt, target, layer=emb, steps=2)


def test_lists_eos_lists_and_a_cost_per_target_length(models, tok):
    """Ids as lists; greedy decoding stops at any of several end-of-sequence ids (Llama 3
    configs list them); the chunk choice is kept per target length (a long continuation costs
    more per path point than a short one on the same prompt)."""
    from taylor_kernels.attr.generation import GenerationProblem, _eos_ids
    from taylor_kernels.engine import chunking

    model = models["gpt2"]
    prompt, target = _ids(tok)
    as_lists = generation_attribution(model, prompt[0].tolist(), target.tolist(), steps=4,
                                      keep=[True] + [False] * (prompt.shape[1] - 1))
    ref = generation_attribution(model, prompt, target, steps=4, skip_tokens=[int(prompt[0, 0])])
    torch.testing.assert_close(as_lists.token_attr, ref.token_attr)
    first = int(generation_attribution(model, prompt, max_new_tokens=1, steps=2).target_ids[0])
    saved = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = [first + 1, first]
    try:
        assert _eos_ids(model) == [first + 1, first]
        stopped = generation_attribution(model, prompt, max_new_tokens=5, steps=2)
        assert stopped.target_ids.tolist() == [first]
    finally:
        model.generation_config.eos_token_id = saved
    act = torch.zeros(1, prompt.shape[1] + 4, 8)
    slots = [chunking.cache_slot(GenerationProblem(model, None, torch.zeros(prompt.shape[1] + T
                                                                           - 1, dtype=torch.long),
                                                   torch.zeros(T, dtype=torch.long),
                                                   act[:, :prompt.shape[1] + T - 1],
                                                   act[:, :prompt.shape[1]]),
                                 act[:, :prompt.shape[1]].reshape(1, -1), 1) for T in (1, 5)]
    assert slots[0] is not slots[1]


def test_a_layer_after_token_mixing_is_refused_and_one_before_it_equals_captum(models, tok):
    """The one pass holds the continuation's activations fixed: right for layers before any
    mixing of positions (the dropout after the embeddings: Captum's numbers), refused after
    (the Captum front then runs Captum's per-token loop: tests/attr/test_captum_llm_loop.py)."""
    import captum.attr as ca

    import taylor_kernels.captum as tkc

    model = models["gpt2"]
    prompt, target = _ids(tok)
    with pytest.raises(ValueError, match="change with the prompt"):
        generation_attribution(model, prompt, target, baselines=0,
                               layer=model.transformer.h[0], steps=4)
    with pytest.raises(ValueError, match="not the input embeddings"):
        generation_attribution(model, prompt, target, layer=model.transformer.drop, steps=4)
    results = []
    for mod in (ca, tkc):
        inp = mod.TextTokenInput(PROMPT, tok, baselines="<unk>")
        llm = mod.LLMGradientAttribution(
            mod.LayerIntegratedGradients(model, model.transformer.drop), tok)
        results.append(llm.attribute(inp, target=TARGET, n_steps=8))
    torch.testing.assert_close(results[1].token_attr, results[0].token_attr, rtol=0,
                               atol=1e-5)


def test_captum_front_target_and_mode_errors(models, tok):
    import taylor_kernels.captum as tkc

    model = models["gpt2"]
    llm = tkc.LLMGradientAttribution(
        tkc.LayerIntegratedGradients(model, model.get_input_embeddings()), tok)
    inp = tkc.TextTokenInput(PROMPT, tok)
    with pytest.raises(AssertionError, match="encodes to no tokens"):
        llm.attribute(inp, target="")
    with pytest.raises(AssertionError, match=r"tensor \[T\]"):
        llm.attribute(inp, target=torch.tensor([[3, 4], [5, 6]]))
    with pytest.raises(AssertionError, match="gen_args must be None"):
        llm.attribute(inp, target=TARGET, gen_args={"max_new_tokens": 2})
    class NoGenerate(torch.nn.Module):  # a causal LM without .generate()
        def __init__(self, lm):
            super().__init__()
            self.lm = lm

        def forward(self, input_ids, **kwargs):
            return self.lm(input_ids, **kwargs)

        def get_input_embeddings(self):
            return self.lm.get_input_embeddings()

    wrapped = NoGenerate(model)
    no_generate = tkc.LLMGradientAttribution(tkc.LayerIntegratedGradients(
        wrapped, wrapped.get_input_embeddings()), tok)
    with pytest.raises(AssertionError, match="Target must be given"):
        no_generate.attribute(inp)
    one_row = llm.attribute(inp, target=torch.tensor([[5, 6]]), n_steps=4)
    assert one_row.token_attr.shape[0] == 2
    model.train()  # Captum runs a train-mode model; the front does too, and warns
    try:
        with pytest.warns(RuntimeWarning, match="train mode"):
            assert torch.isfinite(llm.attribute(inp, target=TARGET, n_steps=4).token_attr).all()
    finally:
        model.eval()


def test_output_tokens_are_captums_readable_tokens():
    """Byte-level BPE: the continuation's tokens read as Captum's (no byte markers, spaces
    stripped, a character split over several ids marked [OVERLAP])."""
    pytest.importorskip("tokenizers")
    from captum.attr._core.llm_attr import _convert_ids_to_pretty_tokens

    from taylor_kernels.captum_front.llm import pretty_tokens
    tok = tiny.byte_level_tokenizer(["A dog ran far away, and then slept.", "Café naïve 東京 😀"])
    for text in [" and then slept", " 東京 😀", "ran\nfar", "Café naïve"]:
        ids = torch.tensor(tok.encode(text, add_special_tokens=False))
        ours = pretty_tokens(ids, tok)
        assert ours == _convert_ids_to_pretty_tokens(ids, tok), text
        assert len(ours) == len(ids)
    emoji = pretty_tokens(torch.tensor(tok.encode(" 😀", add_special_tokens=False)), tok)
    assert "😀" in emoji and emoji[-1] == "😀 [OVERLAP]"  # one character, several byte ids


@pytest.mark.parametrize("ours_input", [True, False], ids=["tk_input", "captum_input"])
def test_captum_front_switches_by_one_import(models, tok, ours_input):
    import captum.attr as ca

    import taylor_kernels.captum as tkc

    model = models["gpt2"]
    results = []
    for mod in (ca, tkc):
        make_input = (tkc if ours_input and mod is tkc else ca).TextTokenInput
        inp = make_input(PROMPT, tok, baselines="<unk>", skip_tokens=[2])
        llm = mod.LLMGradientAttribution(
            mod.LayerIntegratedGradients(model, model.get_input_embeddings()), tok)
        results.append(llm.attribute(inp, target=TARGET, n_steps=8))
    ref, res = results
    assert res.input_tokens == ref.input_tokens and res.output_tokens == ref.output_tokens
    torch.testing.assert_close(res.token_attr, ref.token_attr, rtol=0, atol=1e-5)
    torch.testing.assert_close(res.seq_attr, ref.seq_attr, rtol=0, atol=1e-5)
    assert res.seq_attr_dict.keys() == ref.seq_attr_dict.keys()
    fig, ax = res.plot_token_attr()
    assert fig is not None and len(ax.texts) == res.token_attr.numel()  # values, as Captum's


def test_captum_front_generates_and_checks_arguments(models, tok):
    from captum.attr import LayerIntegratedGradients as CaptumLIG

    import taylor_kernels.captum as tkc

    model = models["gpt2"]
    inp = tkc.TextTokenInput(PROMPT, tok)
    llm = tkc.LLMGradientAttribution(CaptumLIG(model, model.get_input_embeddings()), tok)
    res = llm.attribute(inp, gen_args={"max_new_tokens": 2, "do_sample": False},
                        n_steps=4, internal_batch_size=2)
    assert res.token_attr.shape == (2, inp.n_itp_features) and len(res.output_tokens) == 2
    # internal_batch_size below 1: Captum's warning, then batches of the one example
    with pytest.warns(UserWarning, match="Defaulting to internal batch size of 1"):
        zero = llm.attribute(inp, target=TARGET, n_steps=4, internal_batch_size=0)
    torch.testing.assert_close(zero.token_attr, llm.attribute(inp, target=TARGET,
                                                              n_steps=4).token_attr)
    with pytest.raises(AssertionError, match="LayerIntegratedGradients"):
        tkc.LLMGradientAttribution(tkc.IntegratedGradients(model), tok)


def test_head_at_read_positions_and_bf16(models, tok):
    """The LM head runs at the T read positions only (in the causality check too, and at one
    for the prompt alone); a bf16 model gives float32 scores close to the float32 model's
    (bf16 rounding)."""
    model = models["llama"]
    prompt, target = _ids(tok)
    shapes = []
    hook = model.lm_head.register_forward_hook(lambda m, i, o: shapes.append(o.shape[1]))
    try:
        r32 = generation_attribution(model, prompt, target, baselines="pad", steps=8)
    finally:
        hook.remove()
    assert shapes[:2] == [5, 1] and set(shapes[2:]) == {5}, shapes  # (the checks: 5, 1)
    r16 = generation_attribution(copy.deepcopy(model).to(torch.bfloat16), prompt, target,
                                 baselines="pad", steps=8)
    assert r16.token_attr.dtype == torch.float32 and r16.log_probs.dtype == torch.float32
    rel = (r16.token_attr - r32.token_attr).norm() / r32.token_attr.norm()
    assert rel < 0.1, rel


def _with_and_without(model, prompt, target, monkeypatch, function, module, switch, off):
    """Generation with ``function`` (an autograd.Function) used, then with ``module.switch``
    replaced by ``off``: equal embedding attributions; returns both results."""
    used = []
    apply = function.apply
    monkeypatch.setattr(function, "apply", lambda *a: used.append(1) or apply(*a))
    on = generation_attribution(model, prompt, target, steps=8, return_embedding_attr=True)
    assert used
    monkeypatch.setattr(module, switch, off)
    plain = generation_attribution(model, prompt, target, steps=8, return_embedding_attr=True)
    torch.testing.assert_close(on.embedding_attr, plain.embedding_attr, rtol=1e-5, atol=1e-7)
    return on, plain


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_head_log_prob_backward_equals_autograd(arch, models, tok, monkeypatch):
    """On the CPU the target log-probs come from the LM head's input through HeadLogProb (its
    backward runs the head only at each pass's target); with that path switched off (the
    model's own autograd), the attributions are the same; a model whose logits are not the
    head's own output (here scaled after it) takes the autograd path."""
    from taylor_kernels.attr import generation
    from taylor_kernels.models import lm_head

    model = models[arch]
    prompt, target = _ids(tok)
    fast, plain = _with_and_without(model, prompt, target, monkeypatch, lm_head.HeadLogProb,
                                    lm_head, "linear_head", lambda m: None)
    torch.testing.assert_close(fast.log_probs, plain.log_probs, rtol=0, atol=0)
    monkeypatch.undo()
    used, apply = [], lm_head.HeadLogProb.apply
    monkeypatch.setattr(lm_head.HeadLogProb, "apply", lambda *a: used.append(2) or apply(*a))
    head = model.get_output_embeddings()
    scaled = head.register_forward_hook(lambda m, i, o: o * 0.5)  # a new tensor after the head
    try:
        halved = generation_attribution(model, prompt, target, steps=8)
    finally:
        scaled.remove()
    assert 2 not in used
    assert not torch.allclose(halved.log_probs, plain.log_probs)
    assert generation.GenerationProblem  # the class that holds the check


def test_a_linear_subclass_head_with_more_in_its_forward_takes_autograd(models, tok,
                                                                        monkeypatch):
    """An ``nn.Linear`` subclass as the LM head whose forward does more than ``h W^T + b``
    (Dory's per-token logit scale, a LoRA layer): HeadLogProb's backward would ignore the rest
    (attributions 1/3 of Captum's for a head scaling its logits by 3), so autograd runs."""
    import copy

    from taylor_kernels.models import lm_head

    class ScaledHead(torch.nn.Linear):
        def forward(self, h):
            return super().forward(h) * 3.0

    model = copy.deepcopy(models["gpt2"])
    old = model.get_output_embeddings()
    head = ScaledHead(old.in_features, old.out_features, bias=False)
    head.weight = old.weight
    model.lm_head = head
    assert lm_head.linear_head(model) is None
    assert lm_head.linear_head(models["gpt2"]) is not None
    used, apply = [], lm_head.HeadLogProb.apply
    monkeypatch.setattr(lm_head.HeadLogProb, "apply", lambda *a: used.append(1) or apply(*a))
    prompt, target = _ids(tok)
    res = generation_attribution(model, prompt, target, steps=8)
    assert not used
    ids = torch.cat([prompt[0], target])[None]
    emb = model.get_input_embeddings()
    x = emb(prompt).detach()
    grads = torch.zeros(len(target), *x.shape[1:])
    nodes, weights = np.polynomial.legendre.leggauss(8)
    for t, w in zip((nodes + 1) / 2, weights / 2):  # float32 layer IG by hand, per target
        point = (t * x).requires_grad_(True)
        full = torch.cat([point, emb(ids[:, prompt.shape[1]:]).detach()], dim=1)
        logp = torch.log_softmax(model(inputs_embeds=full).logits[0], -1)
        picked = logp[prompt.shape[1] - 1:-1].gather(1, target[:, None])[:, 0]
        for i in range(len(target)):
            g, = torch.autograd.grad(picked[i], point, retain_graph=True)
            grads[i] += w * g[0]
    torch.testing.assert_close(res.token_attr, (grads * x[0]).sum(-1), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_activation_derivative_cache_is_used_and_leaves_no_hooks(arch, models, tok,
                                                                 monkeypatch):
    """On the CPU each elementwise activation's derivative is computed once per forward
    (models/elementwise.py) for the T serial backward passes: the attributions equal those
    of the model's own autograd, and no hook stays on the model, also after a failing call."""
    from taylor_kernels.models import elementwise

    model = models[arch]
    prompt, target = _ids(tok)
    _with_and_without(model, prompt, target, monkeypatch, elementwise.ScaledGrad, elementwise,
                      "is_elementwise", lambda m: False)
    monkeypatch.undo()

    def hooks():
        return [(n, len(m._forward_hooks), len(m._forward_pre_hooks))
                for n, m in model.named_modules()]

    before = hooks()
    mlp = next(m for m in model.modules() if elementwise.is_elementwise(m))
    boom = mlp.register_forward_pre_hook(lambda m, a: (_ for _ in ()).throw(RuntimeError("x")))
    elementwise_hooked = hooks()
    try:
        with pytest.raises(RuntimeError, match="x"):
            generation_attribution(model, prompt, target, steps=8)
    finally:
        boom.remove()
    assert hooks() == before and elementwise_hooked != before


def test_activation_derivative_cache_keeps_autograd_in_low_precision(monkeypatch):
    """bf16: ``grad * g'(x)`` rounds twice where autograd's GELU backward rounds once (the
    cached path was 1.5e-2 off float32 where autograd is 7.8e-3): not routed."""
    from taylor_kernels.models import elementwise

    act = torch.nn.GELU()
    x = torch.randn(4096, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    go = torch.randn(4096, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    used = []
    apply = elementwise.ScaledGrad.apply
    monkeypatch.setattr(elementwise.ScaledGrad, "apply", lambda *a: used.append(1) or apply(*a))
    grads = []
    for dtype in (torch.bfloat16, torch.float32):
        xi = x.to(dtype).requires_grad_(True)
        with elementwise.cached_derivatives(torch.nn.Sequential(act)):
            (g,) = torch.autograd.grad(act(xi), xi, go.to(dtype))
        (plain,) = torch.autograd.grad(act(xi), xi, go.to(dtype))
        grads.append((g, plain))
    assert len(used) == 1                           # float32 only
    assert torch.equal(grads[0][0], grads[0][1])    # bf16: autograd's own numbers


def test_the_vocabulary_is_the_input_embeddings_whatever_layer_is_attributed(models, tok):
    """GPT-2's position embeddings as the layer: the ids index the token embeddings (the
    layer's 64 positions were taken for the vocabulary, refusing ids past them); Captum
    returns zeros there (the positions do not move with the prompt), as we do."""
    from captum.attr import LayerIntegratedGradients, LLMGradientAttribution, TextTokenInput

    import taylor_kernels.captum as tkc
    model = tiny.gpt2(layers=1, d=16, vocab=300, positions=64)
    wpe = model.transformer.wpe
    assert wpe.num_embeddings < 300
    target = torch.tensor([wpe.num_embeddings + 5, 299])
    got, want = (lib_llm(lib_lig(model, wpe), tok).attribute(
        TextTokenInput("the cat sat", tok), target=target, n_steps=5)
        for lib_llm, lib_lig in ((tkc.LLMGradientAttribution, tkc.LayerIntegratedGradients),
                                 (LLMGradientAttribution, LayerIntegratedGradients)))
    torch.testing.assert_close(got.token_attr, want.token_attr, rtol=0, atol=1e-6)


class _IdsByPosition(torch.nn.Module):
    """A causal-LM wrapper whose forward takes the ids by position under another name."""

    def __init__(self, model):
        super().__init__()
        self.m = model

    def forward(self, tokens):
        return self.m(tokens)


def test_a_forward_taking_the_ids_by_position_runs_as_under_captum(models, tok):
    """Captum calls its forward by position; the one pass called ``model(input_ids=...)``
    ("unexpected keyword argument 'input_ids'"), also under ``patch()``."""
    from captum.attr import LayerIntegratedGradients, LLMGradientAttribution, TextTokenInput

    import taylor_kernels.captum as tkc

    model = models["gpt2"]
    wrap = _IdsByPosition(model)
    emb = model.get_input_embeddings()
    ref = LLMGradientAttribution(LayerIntegratedGradients(wrap, emb), tok).attribute(
        TextTokenInput(PROMPT, tok), target=TARGET, n_steps=8)
    ours = tkc.LLMGradientAttribution(tkc.LayerIntegratedGradients(wrap, emb), tok).attribute(
        tkc.TextTokenInput(PROMPT, tok), target=TARGET, n_steps=8)
    torch.testing.assert_close(ours.token_attr, ref.token_attr, rtol=1e-5, atol=1e-7)
    prompt, target = _ids(tok)
    torch.testing.assert_close(
        generation_attribution(wrap, prompt, target, layer=emb, baselines=1, steps=4).token_attr,
        generation_attribution(model, prompt, target, baselines=1, steps=4).token_attr)


def test_a_sequence_past_the_context_window_is_named():
    """A bare "index out of range in self" came from the position embedding."""
    model = tiny.gpt2(layers=1, d=32, vocab=64, positions=8)
    with pytest.raises(ValueError, match=r"9 tokens .* context window \(config.n_positions = 8"):
        generation_attribution(model, torch.tensor([2, 4, 5, 6, 7, 8]),
                               torch.tensor([9, 10, 11, 12]), steps=2)
    with pytest.raises(ValueError, match="context window"):
        generation_attribution(model, torch.tensor([2, 4, 5, 6, 7, 8]), max_new_tokens=6,
                               steps=2)


def test_float64_models_get_float64_log_probs():
    """The log-softmax ran in float32 for every model: a float64 model's log-probs were
    5.6e-8 off, labelled float64."""
    model = tiny.llama(layers=1, d=32, vocab=64).double()
    prompt, target = torch.tensor([[2, 4, 5, 6, 7, 8]]), torch.tensor([9, 10])
    res = generation_attribution(model, prompt, target, baselines=0, steps=8)
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.cat([prompt[0], target[:-1]])[None]).logits[0, -2:],
                                 -1)
    want = torch.stack([logp[0, 9], logp[1, 10]])
    assert res.log_probs.dtype == torch.float64
    assert float((res.log_probs - want).abs().max()) < 1e-13


def test_text_token_input_takes_mixed_skip_tokens_and_refuses_bool_baselines(tok):
    """``skip_tokens=[2, "cat"]`` raised torch's "invalid data type 'str'"; a bool baseline
    was taken as id 1 (Captum raises TypeError)."""
    import taylor_kernels.captum as tkc

    mixed = tkc.TextTokenInput(PROMPT, tok, skip_tokens=[2, "cat"])
    assert "cat" not in mixed.values and "<s>" not in mixed.values
    assert mixed.values == tkc.TextTokenInput(PROMPT, tok, skip_tokens=["<s>", "cat"]).values
    with pytest.raises(TypeError, match="baselines must be a token id"):
        tkc.TextTokenInput(PROMPT, tok, baselines=True)
    assert tkc.TextTokenInput(PROMPT, tok, baselines=np.int64(1)).baselines == 1


def _dynamic_rope_llama(vocab: int):
    """A Llama whose RoPE rescales past 8 positions (``rope_type="dynamic"``)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=64, max_position_embeddings=8,
                      vocab_size=vocab, pad_token_id=0, bos_token_id=2, eos_token_id=3,
                      rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0,
                                       "factor": 4.0})
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.3)  # (logits far enough apart for the frequencies to show)
    return model


def _rope_state(model) -> list:
    rope = model.model.rotary_emb
    return [rope.inv_freq.clone(), rope.max_seq_len_cached, rope.attention_scaling]


def test_a_rope_scaled_by_the_length_is_refused_and_the_front_runs_each_prefix(tok):
    """One forward of prompt + continuation past a dynamic RoPE's window scored the early
    targets with the whole sequence's frequencies: 0.7 off Captum, silently (2.7 for a
    Phi-3 longrope). generation_attribution now refuses it; the Captum front runs each target
    on its prefix, as Captum does, and equals it. The model's RoPE state (buffer and the
    attributes beside it) is as the forwards left it, as under Captum: the probes restored
    the buffer alone before, and a later forward of the same length was 0.77 off."""
    import captum.attr as ca

    import taylor_kernels.captum as tkc
    from taylor_kernels.models.hf import LengthDependentLogits

    fresh = _dynamic_rope_llama(len(tok))
    model = copy.deepcopy(fresh)
    prompt, target = _ids(tok)
    assert prompt.shape[1] + target.shape[0] - 1 > 8
    before = _rope_state(model)
    with pytest.raises(LengthDependentLogits, match="scaled by the length past 8"):
        generation_attribution(model, prompt, target, baselines="unk", steps=4, tokenizer=tok)
    after = _rope_state(model)
    torch.testing.assert_close(after[0], before[0], rtol=0, atol=0)
    assert after[1:] == before[1:]
    results = []
    for mod in (ca, tkc):  # each from the same state (the RoPE's cache holds the longest
        model = copy.deepcopy(fresh)  # length seen, and scales shorter ones by it)
        llm = mod.LLMGradientAttribution(
            mod.LayerIntegratedGradients(model, model.get_input_embeddings()), tok)
        inp = mod.TextTokenInput(PROMPT, tok, baselines="<unk>", skip_tokens=[2])
        results.append(llm.attribute(inp, target=TARGET, n_steps=6))
        results.append(_rope_state(model))
    ref, ref_state, res, res_state = results
    torch.testing.assert_close(res.token_attr, ref.token_attr, rtol=0, atol=1e-5)
    torch.testing.assert_close(res_state[0], ref_state[0], rtol=0, atol=0)
    assert res_state[1:] == ref_state[1:]


class _LengthScaled(torch.nn.Module):
    """A causal toy LM whose logits grow with the sequence's length (no RoPE config)."""

    def __init__(self, vocab: int):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, 8)
        self.head = torch.nn.Linear(8, vocab)

    def get_input_embeddings(self):
        return self.emb

    def forward(self, input_ids):
        h = self.emb(input_ids).cumsum(1) * (1 + 0.01 * input_ids.shape[1])
        return self.head(torch.tanh(h))


def test_logits_that_move_with_the_length_are_refused(tok):
    torch.manual_seed(0)
    model = _LengthScaled(len(tok)).double()
    prompt, target = _ids(tok)
    from taylor_kernels.models.hf import LengthDependentLogits
    with pytest.raises(LengthDependentLogits, match="depends on the length"):
        generation_attribution(model, prompt, target, baselines="unk", steps=4, tokenizer=tok)
