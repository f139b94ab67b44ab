"""Shared test setup.

Without a GPU, Triton kernels run under the interpreter (TRITON_INTERPRET=1 must be
set before any kernel module is imported, hence here). Kernel outputs are poisoned
with NaN (NSA_POISON=1) so that unwritten elements fail.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("NSA_POISON", "1")
