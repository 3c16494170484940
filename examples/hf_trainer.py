"""Hugging Face's Trainer with megabatch's exact global loss (and GradCache micro-batching).

    python examples/hf_trainer.py                                   # one process
    torchrun --nproc_per_node 2 examples/hf_trainer.py             # the same global loss over 2 ranks

A tiny random CLIPModel and random pairs stand in for yours (offline). Only the Trainer class
changes: ContrastiveTrainer computes the loss from get_image_features / get_text_features over the
whole global batch, never HF's local b x b logits.
"""
from __future__ import annotations

import tempfile

import torch
import transformers as tf

from megabatch.integrations import hf

TOWER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)


def main() -> None:
    config = tf.CLIPConfig(
        text_config=dict(TOWER, vocab_size=100, max_position_embeddings=16, eos_token_id=99, bos_token_id=98),
        vision_config=dict(TOWER, image_size=32, patch_size=8), projection_dim=32)
    model = tf.CLIPModel(config)
    g = torch.Generator().manual_seed(0)
    pairs = [{"pixel_values": torch.randn(3, 32, 32, generator=g),
              "input_ids": torch.cat([torch.randint(1, 99, (15,), generator=g), torch.tensor([99])])}
             for _ in range(32)]

    args = tf.TrainingArguments(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=16, max_steps=2,
                                learning_rate=1e-4, logging_steps=1, report_to="none", save_strategy="no",
                                use_cpu=not torch.cuda.is_available())
    trainer = hf.ContrastiveTrainer(model=model, args=args, train_dataset=pairs,
                                    micro_batch_size=4)  # GradCache: activations for 4 pairs at a time
    trainer.train()


if __name__ == "__main__":
    main()
