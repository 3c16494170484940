"""Shared test set-up. TRITON_INTERPRET must be set before any @triton.jit definition is imported,
so the Triton kernels run on CPU tensors through the interpreter when no GPU is present. The
emoji set's render cache is one folder per session.

One torch thread per process (OMP_NUM_THREADS=1 unless set, inherited by every process a test
starts): the tests' tensors are small, and with 2 threads each parallel op waits for a second core,
which on a busy machine is often taken: measured with both cores shared, test_losses.py and
test_row_sink.py took 159 s with 2 threads and 91 s with 1; test_memory.py's B = 8192 processes
68 s and 33 s."""
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def emoji_cache(tmp_path_factory):
    """One folder for the rendered emoji set (MEGABATCH_CACHE), shared by the tests that need it,
    so the set is rendered once per session."""
    return tmp_path_factory.mktemp("emoji-cache")
