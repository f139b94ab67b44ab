"""Shared test setup.

Without a GPU, Triton kernels run under the interpreter (TRITON_INTERPRET=1 must be
set before any kernel module is imported, hence here). Kernel outputs are poisoned
with NaN (NSA_POISON=1) so that unwritten elements fail.

Both are set, not defaulted: an inherited TRITON_INTERPRET=0 would turn every CPU
kernel test into a failure or a skip, and an inherited NSA_POISON=0 would let an
unwritten output element pass unnoticed.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
os.environ["NSA_POISON"] = "1"
