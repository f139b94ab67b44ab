"""Shared test setup.

Without a GPU, Triton kernels run under the interpreter (TRITON_INTERPRET=1 must be
set before any kernel module is imported, hence here). Kernel outputs are poisoned
with NaN (NSA_POISON=1) so that unwritten elements fail.

Both are set, not defaulted: an inherited TRITON_INTERPRET=0 would turn every CPU
kernel test into a failure or a skip, and an inherited NSA_POISON=0 would let an
unwritten output element pass unnoticed.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
os.environ["NSA_POISON"] = "1"


@pytest.fixture
def one_thread():
    """Torch on one thread for the test: tiny CPU problems only add contention on a shared 2-core
    machine with more. Files of such tests use ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
