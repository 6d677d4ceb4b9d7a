"""Hugging Face model forms beyond the common ones (a QA pass over ~40 architectures found
each): a forward that takes ``logits_to_keep`` and returns every position anyway
(``Gemma4TextModel``), one that takes it to cut hidden states before its own pooling
(``BioGptForSequenceClassification``), a model scaling its embedding's output in place (CTRL),
one embedding its ids transposed (XLNet) and a custom embedding module around an
``nn.Embedding``. Wrappers of a tiny GPT-2 reproduce each form."""
from __future__ import annotations

import os
import warnings

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("transformers")

import taylor_kernels as tk  # noqa: E402
import taylor_kernels.captum as tkc  # noqa: E402
from taylor_kernels.models import hf, tiny  # noqa: E402
from tests.attr.test_low_precision import one_thread  # noqa: E402,F401  (autouse: 1 thread)

IDS = torch.tensor([[2, 17, 33, 8, 91, 40, 5], [3, 9, 12, 60, 7, 21, 44]])
TARGETS = torch.tensor([4, 11])


@pytest.fixture(scope="module")
def gpt2():
    return tiny.gpt2(layers=2, d=32)


class _Wraps(torch.nn.Module):
    """A model around the causal LM ``lm``, sharing its input embeddings."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def get_input_embeddings(self):
        return self.lm.get_input_embeddings()


class _Keeps(_Wraps):
    """A causal LM taking ``logits_to_keep``: it ``cuts`` the logits to it, ignores it, or
    (``classify``) reads its pooled last position and refuses a cut, as a classifier would."""

    def __init__(self, lm, mode: str):
        super().__init__(lm)
        self.mode = mode

    def get_output_embeddings(self):
        return None if self.mode == "classify" else self.lm.get_output_embeddings()

    def forward(self, input_ids=None, attention_mask=None, logits_to_keep=0):
        if self.mode == "classify":
            assert isinstance(logits_to_keep, int) and logits_to_keep == 0, "cut before pooling"
            return self.lm(input_ids=input_ids, attention_mask=attention_mask).logits[:, -1, :3]
        keep = logits_to_keep if self.mode == "cuts" else 0
        return self.lm(input_ids=input_ids, attention_mask=attention_mask,
                       logits_to_keep=keep).logits


class _NoKeep(_Wraps):
    """The same causal LM without ``logits_to_keep``: the reference."""

    def forward(self, input_ids=None, attention_mask=None):
        return self.lm(input_ids=input_ids, attention_mask=attention_mask).logits


@pytest.mark.parametrize("mode", ["cuts", "ignores"])
def test_logits_to_keep_read_right_whether_or_not_the_model_cuts(gpt2, mode):
    """Left-padded rows read at different positions: the kept positions are two, and a model
    returning all seven must still be read at each row's own one (it read position 0)."""
    ids = IDS.clone()
    ids[1, :2] = 0
    mask = (ids != 0).long()
    mask[0] = 1
    ref = tk.token_integrated_gradients(_NoKeep(gpt2), ids, TARGETS, attention_mask=mask,
                                        steps=8).attributions
    got = tk.token_integrated_gradients(_Keeps(gpt2, mode), ids, TARGETS, attention_mask=mask,
                                        steps=8).attributions
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    assert (ref[1, :2] == 0).all() and ref[0].abs().sum() > 0


def test_logits_to_keep_not_passed_to_a_model_without_output_embeddings(gpt2):
    """A classifier taking ``logits_to_keep`` (it cuts hidden states before pooling) runs
    without it: its 2-D output needs no position."""
    res = tk.token_integrated_gradients(_Keeps(gpt2, "classify"), IDS, torch.tensor([0, 2]),
                                        steps=4)
    assert torch.isfinite(res.attributions).all() and res.attributions.abs().sum() > 0
    assert not hf.cuts_logits(_Keeps(gpt2, "classify")) and hf.cuts_logits(gpt2)


class _ScalesInPlace(_Wraps):
    """CTRL's form: the embedding's output scaled in place before the blocks."""

    def __init__(self, lm, in_place: bool):
        super().__init__(lm)
        self.in_place = in_place

    def forward(self, input_ids=None, attention_mask=None):
        h = self.lm.get_input_embeddings()(input_ids)
        if self.in_place:
            h *= 3.0
        else:
            h = h * 3.0
        return self.lm(inputs_embeds=h, attention_mask=attention_mask).logits


def test_embedding_scaled_in_place_attributed_as_out_of_place(gpt2):
    ref = tk.token_integrated_gradients(_ScalesInPlace(gpt2, False), IDS, TARGETS, steps=8)
    got = tk.token_integrated_gradients(_ScalesInPlace(gpt2, True), IDS, TARGETS, steps=8)
    torch.testing.assert_close(got.attributions, ref.attributions, rtol=1e-5, atol=1e-6)
    model = _ScalesInPlace(gpt2, True)
    lig = tkc.LayerIntegratedGradients(lambda i: model(input_ids=i)[:, -1],
                                       model.get_input_embeddings())
    front = lig.attribute(IDS, target=TARGETS.tolist(), n_steps=8).sum(-1)
    model.in_place = False
    front_ref = lig.attribute(IDS, target=TARGETS.tolist(), n_steps=8).sum(-1)
    torch.testing.assert_close(front, front_ref, rtol=1e-5, atol=1e-6)


class _Transposed(_Wraps):
    """XLNet's form: the ids embedded as ``[L, B]``, the blocks run sequence-first."""

    def forward(self, input_ids=None, attention_mask=None):
        h = self.lm.get_input_embeddings()(input_ids.T)
        return self.lm(inputs_embeds=h.transpose(0, 1)).logits


@pytest.mark.parametrize("shape", [(2, 7), (1, 7), (3, 3)])
def test_ids_embedded_transposed_are_refused_by_name(gpt2, shape):
    ids = torch.arange(1, 1 + shape[0] * shape[1]).reshape(shape) % 100 + 1
    with pytest.raises(ValueError, match=r"not laid out \[batch, tokens"):
        tk.token_integrated_gradients(_Transposed(gpt2), ids, 3, steps=4)


class _ScaledEmbedding(torch.nn.Module):
    def __init__(self, emb):
        super().__init__()
        self.emb = emb

    def forward(self, ids):
        return self.emb(ids) * 2.0


class _AddedTokens(torch.nn.Module):
    """A table and added tokens in a second parameter: ids past the inner table are valid."""

    def __init__(self, emb, added: int):
        super().__init__()
        self.emb = emb
        self.added = torch.nn.Parameter(torch.randn(added, emb.embedding_dim) * 0.02)

    def forward(self, ids):
        n = self.emb.num_embeddings
        inner = self.emb(ids.clamp_max(n - 1))
        extra = self.added[(ids - n).clamp(0, self.added.shape[0] - 1)]
        return torch.where((ids >= n)[..., None], extra, inner)


def test_ids_of_a_custom_embedding_module_judged_by_the_module():
    """The module's own rule decides: an id past its inner table is refused by name only
    when the module refuses it (reading the inner table's size refused added tokens)."""
    model = tiny.gpt2(layers=1, d=32, vocab=64)
    model.set_input_embeddings(_ScaledEmbedding(model.get_input_embeddings()))
    with warnings.catch_warnings(), pytest.raises(hf.VocabIndexError, match="up to 70"):
        warnings.simplefilter("ignore")
        tk.token_integrated_gradients(model, torch.tensor([[2, 70, 3]]), 4, steps=4)
    model.set_input_embeddings(_AddedTokens(model.get_input_embeddings().emb, added=8))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = tk.token_integrated_gradients(model, torch.tensor([[2, 70, 3]]), 4, steps=4,
                                            baselines="pad")
    assert res.attributions[0, 1].abs().sum() > 0


def test_a_decoder_embedding_reads_the_decoders_ids():
    """Token IG at an encoder-decoder's decoder embedding (``layer=``, decoder ids in
    ``model_kwargs``): its activation has the decoder's length, not input_ids'."""
    from transformers import BartConfig, BartForConditionalGeneration
    torch.manual_seed(0)
    model = BartForConditionalGeneration(BartConfig(
        vocab_size=128, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
        max_position_embeddings=32)).eval()
    dec = torch.tensor([[2, 5, 9, 11], [2, 6, 8, 10]])
    kw = dict(layer="model.decoder.embed_tokens", model_kwargs={"decoder_input_ids": dec},
              steps=8)
    res = tk.token_integrated_gradients(model, IDS, TARGETS, **kw)
    assert res.token_scores.shape == (2, 4) and float(res.gap.abs().max()) < 1e-4
    mask = torch.ones_like(IDS)
    mask[1, -2:] = 0  # the encoder's padding: passed to the model, every decoder token moves
    res = tk.token_integrated_gradients(model, IDS, TARGETS, attention_mask=mask, **kw)
    assert float(res.gap.abs().max()) < 1e-4 and bool((res.token_scores != 0).all())
    # token baselines, keep and skip_tokens are taken on input_ids (the baseline ids went to
    # the encoder: every attribution was 0; a mask of kept positions failed on the shapes)
    for bad in ({"baselines": 7}, {"skip_tokens": [int(IDS[0, 0])]},
                {"keep": torch.zeros_like(IDS, dtype=torch.bool)}):
        with pytest.raises(ValueError, match="fed other ids"):
            tk.token_integrated_gradients(model, IDS, TARGETS, **kw, **bad)


def test_an_encoder_decoder_without_decoder_ids_is_named_before_any_forward():
    """T5 without ``decoder_input_ids``: the probe forward reached T5's decoder, whose "You must
    specify exactly one of input_ids or inputs_embeds" came out, not the library's message."""
    from transformers import T5Config, T5ForConditionalGeneration
    torch.manual_seed(0)
    model = T5ForConditionalGeneration(T5Config(
        vocab_size=128, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
        decoder_start_token_id=0)).eval()
    with pytest.raises(ValueError, match="decoder_input_ids"):
        tk.token_integrated_gradients(model, IDS, TARGETS, steps=2)


class _NoEmbeddingsMethod(torch.nn.Module):
    """transformers' base ``get_input_embeddings`` raises where a model has none (CANINE)."""

    def __init__(self):
        super().__init__()
        self.chars = torch.nn.Embedding(128, 8)
        self.head = torch.nn.Linear(8, 16)

    def get_input_embeddings(self):
        raise NotImplementedError("`get_input_embeddings` not auto-handled; override it")

    def forward(self, input_ids):
        return self.head(self.chars(input_ids).mean(1))


def test_a_model_without_input_embeddings_is_told_to_name_the_layer():
    model = _NoEmbeddingsMethod().double()
    with pytest.raises(ValueError, match="name the embedding layer with layer="):
        tk.token_integrated_gradients(model, IDS, TARGETS, steps=2)
    res = tk.token_integrated_gradients(model, IDS, TARGETS, layer="chars", steps=2)
    assert res.token_scores.shape == IDS.shape


class _PadsInside(_NoEmbeddingsMethod):
    """Pads its ids to a multiple of 4 inside ``forward``, as Longformer does."""

    def get_input_embeddings(self):
        return self.chars

    def forward(self, input_ids):
        pad = -input_ids.shape[1] % 4
        ids = torch.nn.functional.pad(input_ids, (0, pad), value=0)
        return self.head(self.chars(ids).mean(1))


def test_a_model_that_pads_its_ids_inside_is_named():
    """Longformer's internal padding was taken for an encoder-decoder's decoder ids ("fed
    other ids ... (an encoder-decoder's decoder embedding)"), and baselines="zero" gave scores
    for 12 positions of 10 tokens."""
    ids = IDS[:, :3] if IDS.shape[1] % 4 == 0 else IDS
    assert ids.shape[1] % 4
    for kw in ({"baselines": 1}, {}):
        with pytest.raises(ValueError, match="pads input_ids .* inside its forward"):
            tk.token_integrated_gradients(_PadsInside().double(), ids, TARGETS, steps=2, **kw)


class _PassesKeep(_Wraps):
    """A plain wrapper passing logits_to_keep on, without get_output_embeddings."""

    def forward(self, input_ids=None, attention_mask=None, logits_to_keep=0):
        return self.lm(input_ids=input_ids, attention_mask=attention_mask,
                       logits_to_keep=logits_to_keep).logits


def test_a_wrapper_without_output_embeddings_keeps_the_cut(gpt2):
    """Only transformers' "no LM head" (get_output_embeddings() is None) stops the cut: a
    wrapper without the method computed all logits (27x the time at GPT-2's vocabulary)."""
    assert hf.cuts_logits(_PassesKeep(gpt2))
    rows = []
    hook = gpt2.lm_head.register_forward_hook(lambda m, i, o: rows.append(o.shape[1]))
    try:
        tk.token_integrated_gradients(_PassesKeep(gpt2), IDS, TARGETS, steps=4)
    finally:
        hook.remove()
    assert rows and max(rows) == 1


def test_a_fixed_rule_that_has_not_converged_is_named():
    """The zero embedding through RMSNorm (Llama): token scores moved 2x between 50 and 800
    steps with no word; a gap past 2% of f(x) - f(b) now warns, with the baseline hint."""
    llama = tiny.llama(layers=2, d=32)
    with pytest.warns(RuntimeWarning, match="has not converged.*RMSNorm"):
        tk.token_integrated_gradients(llama, IDS[:1], 3, steps=8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = tk.token_integrated_gradients(tiny.gpt2(layers=2, d=32), IDS[:1], 3, steps=16,
                                            baselines="pad")
    assert float(res.gap.abs().max()) < 1e-3


def test_another_tables_index_error_is_not_called_a_vocabulary_error():
    """BERT's token-type table (2 rows) refusing token_type_ids=5: the ids were checked
    against the known vocabulary, so the embedding's own IndexError stands (it was relabelled
    'input_ids holds ids up to ...')."""
    model = tiny.bert(layers=1, d=32)
    ids = torch.tensor([[2, 17, 33, 8]])
    with pytest.raises(IndexError) as err:
        tk.token_integrated_gradients(model, ids, position=None, layer="embeddings",
                                      output=lambda out: out.last_hidden_state[:, 0, :3],
                                      target=0, model_kwargs={"token_type_ids":
                                                              torch.full_like(ids, 5)},
                                      steps=4)
    assert not isinstance(err.value, hf.VocabIndexError)


def test_jets_through_a_traced_submodule_returning_a_model_output():
    """HF ConvNext's encoder is traced on its own and returns a ModelOutput, which torch.fx
    records as a plain dict: the parent's ``.last_hidden_state`` failed (jet, mixed_partials,
    taylor_decomposition raised AttributeError). Float64 against reverse-over-reverse."""
    import transformers
    torch.manual_seed(0)
    model = transformers.ConvNextForImageClassification(transformers.ConvNextConfig(
        num_channels=3, patch_size=2, num_stages=2, hidden_sizes=[8, 16], depths=[1, 1],
        num_labels=3, image_size=8)).eval().double()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    V = torch.randn(2, 1, 3, 8, 8, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        c = tk.jet(model, x, V, order=2, target=1)
        tk.taylor_decomposition(model, x, target=1, order=2)
    for b in range(2):
        H = torch.func.hessian(lambda z: model(z[None]).logits[0, 1])(x[b]).reshape(192, 192)
        v = V[b, 0].reshape(192)
        torch.testing.assert_close(c[2, b, 0], v @ H @ v / 2, rtol=1e-10, atol=1e-12)
