"""Small helpers shared by the reference and the kernels: sequence bookkeeping.

Positions are 0-based and restart at 0 in every packed sequence. A sequence of
length L has ``num_compressed(L, kernel_size, stride)`` compressed tokens;
packed compressed tokens follow the same sequence order as the raw tokens.
"""

from __future__ import annotations

import math
import os

import torch


def interpreting() -> bool:
    """Whether Triton kernels run under the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def window_keys(window_size: int, length: int) -> int:
    """The window a sequence of at most ``length`` tokens can use: a window longer than the
    sequence is the whole sequence (and at least 1). The same keys as ``window_size``, and a value
    that fits the kernels' int arguments and int64 comparisons (``window_size`` may be 2**63)."""
    return min(window_size, max(length, 1))


def num_compressed(seq_len: int, kernel_size: int, stride: int) -> int:
    """Number of compressed tokens of a length-``seq_len`` sequence.

    Token i covers raw positions [i*stride, i*stride + kernel_size).
    """
    if seq_len < kernel_size:
        return 0
    return (seq_len - kernel_size) // stride + 1


def num_blocks(seq_len: int, block_size: int) -> int:
    """Number of selection blocks of a length-``seq_len`` sequence (last one may be partial)."""
    return math.ceil(seq_len / block_size)


def seqlens_from_cu(cu_seqlens: torch.Tensor) -> list[int]:
    """Host list of sequence lengths (one device->host copy)."""
    cu = cu_seqlens.tolist()
    return [b - a for a, b in zip(cu[:-1], cu[1:])]


def compressed_cu_seqlens(cu_seqlens: torch.Tensor, kernel_size: int, stride: int) -> torch.Tensor:
    """cu_seqlens of the packed compressed tokens, int32, same device as ``cu_seqlens``."""
    lens = cu_seqlens[1:] - cu_seqlens[:-1]
    n = torch.where(lens >= kernel_size, torch.div(lens - kernel_size, stride, rounding_mode="floor") + 1,
                    torch.zeros_like(lens))
    out = torch.zeros_like(cu_seqlens)
    out[1:] = torch.cumsum(n, 0)
    return out.to(torch.int32)


def uniform_cu_seqlens(batch: int, seq_len: int, device: torch.device | str) -> torch.Tensor:
    """cu_seqlens describing ``batch`` sequences of ``seq_len`` tokens laid end to end.

    Kernels treat a dense ``[B, T, ...]`` batch as packed ``[1, B*T, ...]`` input with this.
    """
    return torch.arange(0, (batch + 1) * seq_len, seq_len, dtype=torch.int32, device=device)


def prepare_chunk_indices(cu_seqlens: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """For tiling queries without crossing a sequence boundary: int32 ``[num_chunks, 2]``
    rows of (sequence id, chunk id within that sequence), sequences in order. One device->host
    copy (the number of rows)."""
    lens = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    n = torch.div(lens + chunk_size - 1, chunk_size, rounding_mode="floor")
    total = int(n.sum().item())
    seq = torch.repeat_interleave(torch.arange(n.numel(), device=n.device), n, output_size=total)
    first = torch.cumsum(n, 0) - n
    chunk = torch.arange(total, device=n.device) - first[seq]
    return torch.stack([seq, chunk], 1).to(torch.int32)


def overlap_matrix(num_cmp: int, num_blk: int, kernel_size: int, stride: int, block_size: int,
                   device=None, dtype=torch.float32) -> torch.Tensor:
    """``W[i, j]`` = number of stride-sized pieces shared by compressed token i's span
    [i*stride, i*stride+kernel_size) and selection block j's span [j*block_size, (j+1)*block_size).

    Both spans are unions of stride-sized pieces (kernel_size and block_size are multiples
    of stride), so the count is the length of the intersection divided by stride.
    For 32/16/64, column j holds 1, 2, 2, 2, 1 on rows 4j-1 .. 4j+3.
    """
    i = torch.arange(num_cmp, device=device).view(-1, 1)
    j = torch.arange(num_blk, device=device).view(1, -1)
    lo = torch.maximum(i * stride, j * block_size)
    hi = torch.minimum(i * stride + kernel_size, (j + 1) * block_size)
    return (torch.clamp(hi - lo, min=0) // stride).to(dtype)


def new_output(shape, dtype, device) -> torch.Tensor:
    """Uninitialized output buffer for a kernel; NaN-filled when ``NSA_POISON=1`` (tests set it),
    so that an element a kernel forgets to write fails the comparison."""
    if os.environ.get("NSA_POISON", "0") == "1" and dtype.is_floating_point:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)
