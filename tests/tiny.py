"""A tiny randomly initialised BERT folder (vocab, tokenizer, config, safetensors) for fast unit tests."""

from __future__ import annotations

import string
from pathlib import Path

import torch
from transformers import BertConfig, BertForMaskedLM, BertModel, BertTokenizerFast

WORDS = ["the", "a", "film", "movie", "good", "bad", "great", "terrible", "it", "was", "not", "very", "and", "is"]


def make_tiny_bert(folder: Path, *, mlm: bool = False, hidden: int = 32, layers: int = 4, seed: int = 0) -> Path:
    """Write a BERT model folder that `Backbone.load` reads like any real one."""
    folder.mkdir(parents=True, exist_ok=True)
    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, *chars, *(f"##{c}" for c in chars)]
    token_ids = {token: i for i, token in enumerate(dict.fromkeys(vocab))}
    tokenizer = BertTokenizerFast(vocab=token_ids, do_lower_case=True, model_max_length=64)
    tokenizer.save_pretrained(folder)
    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
        intermediate_size=hidden * 2, max_position_embeddings=64, hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1,
    )
    torch.manual_seed(seed)
    model = BertForMaskedLM(config) if mlm else BertModel(config, add_pooling_layer=False)
    model.save_pretrained(folder, safe_serialization=True)
    return folder
