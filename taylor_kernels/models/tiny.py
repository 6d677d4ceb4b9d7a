"""Small ``transformers`` models and tokenizers built locally (random weights, no hub).

Used by the tests, the ``llm`` benchmark family and the causal-LM demo. Needs
``transformers`` and ``tokenizers`` (imported when called).
"""
from __future__ import annotations

import torch

SPECIALS = ("<pad>", "<unk>", "<s>", "</s>")


def word_tokenizer(words):
    """A ``PreTrainedTokenizerFast`` over whitespace-separated ``words`` (word-level; ids 0-3
    are ``<pad> <unk> <s> </s>``; ``encode`` prepends ``<s>``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(dict.fromkeys((*SPECIALS, *words)))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[
        ("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                   bos_token="<s>", eos_token="</s>")


def byte_level_tokenizer(texts):
    """A byte-level BPE ``PreTrainedTokenizerFast`` (vocabulary 280, ``<e>`` its end token)
    trained on ``texts``: characters outside ASCII split over several byte ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(list(texts) * 20, trainers.BpeTrainer(
        vocab_size=280, special_tokens=["<e>"], initial_alphabet=pre_tokenizers.ByteLevel
        .alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<e>")


def _ids(vocab: int) -> dict:
    return {"vocab_size": vocab, "pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 3}


def gpt2(layers: int = 2, d: int = 64, heads: int = 4, vocab: int = 128, positions: int = 256,
         seed: int = 0, dtype=torch.float32, attn: str = "sdpa"):
    """``GPT2LMHeadModel`` (eval mode) with random weights: ``layers`` blocks of width ``d``."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=layers, n_embd=d, n_head=heads, n_positions=positions,
                     attn_implementation=attn, **_ids(vocab))
    return GPT2LMHeadModel(cfg).eval().to(dtype)


def llama(layers: int = 2, d: int = 64, heads: int = 4, vocab: int = 128,
          positions: int = 256, seed: int = 0, dtype=torch.float32, attn: str = "sdpa",
          ff: int | None = None):
    """``LlamaForCausalLM`` (eval mode) with random weights (2 key/value heads)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(num_hidden_layers=layers, hidden_size=d, num_attention_heads=heads,
                      num_key_value_heads=max(1, heads // 2), intermediate_size=ff or 2 * d,
                      max_position_embeddings=positions, attn_implementation=attn,
                      **_ids(vocab))
    return LlamaForCausalLM(cfg).eval().to(dtype)


def bert(layers: int = 2, d: int = 64, heads: int = 4, vocab: int = 128, seed: int = 0,
         attn: str = "sdpa"):
    """``BertModel`` (eval mode, MiniLM-like encoder) with random weights."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(num_hidden_layers=layers, hidden_size=d, num_attention_heads=heads,
                     intermediate_size=2 * d, vocab_size=vocab, pad_token_id=0,
                     attn_implementation=attn)
    return BertModel(cfg, add_pooling_layer=False).eval()
