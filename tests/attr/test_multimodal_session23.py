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
