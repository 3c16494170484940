"""Shared test set-up. TRITON_INTERPRET must be set before any @triton.jit definition is imported,
so the Triton kernels run on CPU tensors through the interpreter when no GPU is present."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
