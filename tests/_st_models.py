"""A tiny random sentence-transformers model for the integration tests (no download).

`build(path, seed)` writes a two-layer BertModel of width 16 and a word-level tokenizer over a
40-word vocabulary to `path` and loads them as SentenceTransformer(Transformer, mean Pooling).
`sentences(n, seed)` draws n texts of 1-6 of those words (so batches pad to uneven lengths).
"""
from __future__ import annotations

import random

WORDS = [f"w{i}" for i in range(40)]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]


def build(path: str, seed: int = 0, dropout: float = 0.0):
    import torch
    import transformers as tf
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling
    from sentence_transformers.base.modules import Transformer
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {w: i for i, w in enumerate(SPECIAL + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                       special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    fast = tf.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                      sep_token="[SEP]", model_max_length=16)
    torch.manual_seed(seed)
    config = tf.BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=24, max_position_embeddings=16, hidden_dropout_prob=dropout,
                           attention_probs_dropout_prob=dropout)
    tf.BertModel(config).save_pretrained(path)
    fast.save_pretrained(path)
    word = Transformer(path, max_seq_length=16)
    return SentenceTransformer(modules=[word, Pooling(word.get_embedding_dimension(), "mean")], device="cpu")


def sentences(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 6))) for _ in range(n)]
