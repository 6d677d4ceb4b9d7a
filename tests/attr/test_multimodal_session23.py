"""Multimodal models (CLIP from a config, session 23 QA): ``baselines="pad"`` reads a composite
model's ``text_config``, and a bank of prompts split per row because it has ``B`` rows is
named in the error (a valid target was called out of range)."""
from __future__ import annotations

import pytest
import torch

import taylor_kernels as tk
import taylor_kernels.captum as tkc

transformers = pytest.importorskip("transformers")

IDS = torch.tensor([[1, 5, 9, 12, 7, 2, 0, 0], [1, 33, 8, 4, 20, 17, 30, 2]])
PIXELS = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(0)
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                 num_attention_heads=2)
    cfg = transformers.CLIPConfig(
        text_config=dict(vocab_size=64, max_position_embeddings=16, pad_token_id=0,
                         bos_token_id=1, eos_token_id=2, **small),
        vision_config=dict(image_size=32, patch_size=8, **small), projection_dim=16)
    return transformers.CLIPModel(cfg).eval()


def test_pad_baseline_of_a_composite_model(clip):
    kw = dict(attention_mask=(IDS != 0).long(), layer="text_model.embeddings.token_embedding",
              model_kwargs={"pixel_values": PIXELS}, steps=4,
              output=lambda o: o.logits_per_image.diagonal())
    got = tk.token_integrated_gradients(clip, IDS, baselines="pad", **kw)
    ref = tk.token_integrated_gradients(clip, IDS, baselines=0, **kw)
    torch.testing.assert_close(got.token_scores, ref.token_scores)


def test_a_bank_split_per_row_is_named(clip):
    def zero_shot(pixels, bank, mask):
        return clip(pixel_values=pixels, input_ids=bank, attention_mask=mask).logits_per_image
    with pytest.raises(IndexError, match="were split per row.*bank of prompts"):
        tkc.IntegratedGradients(zero_shot).attribute(
            PIXELS, target=1, additional_forward_args=(IDS, (IDS != 0).long()), n_steps=4)


def test_whisper_token_ig_says_how_to_attribute_its_decoder_ids():
    """The refusal named `layer='encoder.embed_tokens'`, which a log-mel encoder lacks; the
    route it names now (layer IG through the decoder's embedding) runs and equals Captum."""
    captum_attr = pytest.importorskip("captum.attr")
    torch.manual_seed(0)
    cfg = transformers.WhisperConfig(
        vocab_size=32, num_mel_bins=2, encoder_layers=1, decoder_layers=1,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
        decoder_ffn_dim=32, d_model=16, max_source_positions=4, max_target_positions=8,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=3)
    whisper = transformers.WhisperForConditionalGeneration(cfg).eval()
    features = torch.randn(2, 2, 8, generator=torch.Generator().manual_seed(1))
    dec = torch.tensor([[3, 5, 7, 9], [3, 11, 13, 4]])
    with pytest.raises(ValueError, match="tk.layer_integrated_gradients through the decoder"):
        tk.token_integrated_gradients(whisper, dec, target=[17, 21], steps=4,
                                      model_kwargs={"input_features": features})

    def last(d, f):
        return whisper(input_features=f, decoder_input_ids=d).logits[:, -1]
    emb = whisper.model.decoder.embed_tokens
    ours = tk.layer_integrated_gradients(last, emb, dec, torch.zeros_like(dec), target=[17, 21],
                                         additional_forward_args=(features,), steps=8)
    ref = captum_attr.LayerIntegratedGradients(last, emb).attribute(
        dec, torch.zeros_like(dec), target=[17, 21], additional_forward_args=(features,),
        n_steps=8)
    torch.testing.assert_close(ours.attributions, ref, rtol=1e-5, atol=1e-6)
