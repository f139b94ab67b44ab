"""Value checks that run on the device: one Triton pass and one small host read."""

import torch
import triton
import triton.language as tl

from .triton_utils import pow2


@triton.jit
def block_indices_flags_kernel(bi, limit, flags, R, T, H, S, DENSE_LIMIT,
                               HAS_LIMIT: tl.constexpr, SP: tl.constexpr, BR: tl.constexpr):
    """Rows ``r`` of ``bi`` ``[R, S]`` (``R = B*T*H``, row r at position ``(r // H) % T``):
    ``flags[program] = 1 * (an entry < -1 or >= its position's block count) + 2 * (a row
    listing a block twice)``. ``limit`` ``[T]`` holds the block counts, or DENSE_LIMIT for all."""
    o_r = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    o_s = tl.arange(0, SP)
    m_r = o_r < R
    m = m_r[:, None] & (o_s < S)[None, :]
    x = tl.load(bi + o_r[:, None] * S + o_s[None, :], mask=m, other=-1)
    if HAS_LIMIT:
        lim = tl.load(limit + (o_r // H) % T, mask=m_r, other=0)
    else:
        lim = tl.zeros([BR], dtype=tl.int32) + DENSE_LIMIT
    bad_range = tl.max(tl.where(m & ((x < -1) | (x >= lim[:, None])), 1, 0))
    rep = tl.zeros([BR, SP], dtype=tl.int32)
    for j in range(S):
        # column j against the later columns of the same row
        col = tl.load(bi + o_r * S + j, mask=m_r, other=-1)
        rep |= tl.where((x == col[:, None]) & (col[:, None] >= 0) & (o_s[None, :] > j), 1, 0)
    bad_rep = tl.max(tl.where(m, rep, 0))
    tl.store(flags + tl.program_id(0), bad_range + 2 * bad_rep)


def block_indices_flags(bi: torch.Tensor, limit, dense_limit: int) -> list:
    """``[out of range, repeated]`` for contiguous int32 ``bi`` ``[B, T, H, S]``; ``limit`` int32
    ``[T]`` per-position block counts (packed sequences) or None (every position: dense_limit)."""
    B, T, H, S = bi.shape
    R = B * T * H
    if R == 0:
        return [False, False]
    sp = pow2(S)
    br = max(1, min(128, 4096 // sp))
    n = triton.cdiv(R, br)
    flags = torch.empty(n, dtype=torch.int32, device=bi.device)
    block_indices_flags_kernel[(n,)](bi, bi if limit is None else limit, flags, R, T, H, S, dense_limit,
                                     HAS_LIMIT=limit is not None, SP=sp, BR=br, num_warps=4)
    f = int(flags.max().item())
    return [bool(f & 1), bool(f & 2)]
