"""Adapters between megabatch's losses and the frameworks users bring.

- ``megabatch.integrations.hf``: Hugging Face dual encoders (CLIPModel, SiglipModel, Siglip2Model, ...)
  and ``transformers.Trainer``. Needs the ``[hf]`` extra; importing this package imports nothing
  from transformers (only the ``hf`` submodule does, on first use).
- ``megabatch.integrations.sentence_transformers``: ``MegabatchLoss`` for sentence-transformers'
  trainer (MNRL / CachedMNRL, exact across ranks). Needs the ``[st]`` extra.
"""
