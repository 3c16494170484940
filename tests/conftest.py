"""Shared test set-up. TRITON_INTERPRET must be set before any @triton.jit definition is imported,
so the Triton kernels run on CPU tensors through the interpreter when no GPU is present. The
emoji set's render cache is one folder per session."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def emoji_cache(tmp_path_factory):
    """One folder for the rendered emoji set (MEGABATCH_CACHE), shared by the tests that need it,
    so the set is rendered once per session."""
    return tmp_path_factory.mktemp("emoji-cache")
