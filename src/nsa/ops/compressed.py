"""Compressed attention (NSA's coarse branch) in Triton: forward and backward.

Semantics are exactly :func:`nsa.ops.reference.compressed_attention`: compressed token ``i``
(raw positions ``[i*stride, i*stride + kernel_size)``) is visible to the query at position ``p``
iff ``i*stride + kernel_size - 1 <= p``; a query that sees nothing gets ``o = 0``, ``lse = -inf``.
Queries may be the last rows of their sequence's keys (``q_offset`` / ``cu_seqlens_k``): query
row ``t`` then has position ``p = off + t`` with ``off`` its sequence's keys minus queries, and
every visibility rule reads ``p``; the query tiles are still tiles of rows.

Layout of the work. Every input is handled as packed sequences (a dense ``[B, T]`` batch is
packed ``[1, B*T]`` with :func:`nsa.ops.utils.uniform_cu_seqlens`). A query tile holds ``BT``
consecutive positions of one sequence times the ``G`` query heads of one KV head
(``BM = BT * GP`` rows, ``GP`` = G padded to a power of two, padded heads masked), so each
compressed key/value tile is loaded once for the whole group.

- forward: one program per (query tile, KV head); FlashAttention-2 online softmax in fp32 over
  the compressed tokens up to the tile's horizon ``(t_last - kernel_size) // stride``; only the
  last key tiles (those not visible to the tile's first row) apply the per-row mask.
- backward: ``delta = rowsum(dO * O) - dlse`` (a gradient flowing into lse adds ``p * dlse`` to
  ``ds``); dK/dV: one program per (compressed-key tile, KV head, query segment) walks the
  queries of its segment that can see the tile, every head of the group, accumulating in
  registers. There are few compressed tokens (T / stride), so when tiles x heads cannot fill
  the GPU the queries are cut into up to 16 segments whose fp32 partials are summed in a fixed
  order afterwards. dQ: one program per query tile. No atomics: gradients are bitwise
  reproducible.

Precision: fp16/bf16/fp32 inputs, fp32 accumulation (fp32 inputs use IEEE fp32 dots, not tf32);
lse is float32. float64 inputs are computed in float32 and the results cast back to float64.
Work is O(T * T / stride) per head (inherent to the branch); extra memory is O(T).
"""

import functools
import math
from typing import Optional

import torch
import triton
import triton.language as tl

from . import triton_utils
from .triton_utils import kv_descriptors, pow2, use_tma
from .utils import compressed_cu_seqlens, interpreting, new_output, prepare_chunk_indices, uniform_cu_seqlens

LOG2E = math.log2(math.e)


@triton.jit
def _query_offset(cu_seqlens_k, i_n, seq_len, q_offset, OFFSET: tl.constexpr):
    """Position of query row 0 of sequence i_n: 0 (OFFSET "none": the kernel of inputs without an
    offset, unchanged), q_offset ("scalar") or its keys' length minus its seq_len queries ("keys":
    cu_seqlens_k)."""
    if OFFSET == "keys":
        off = (tl.load(cu_seqlens_k + i_n + 1) - tl.load(cu_seqlens_k + i_n)).to(tl.int32) - seq_len
    elif OFFSET == "scalar":
        off = q_offset
    else:
        off = 0
    return off


@triton.jit
def _kv_tile(p_k, p_v, i0, n_vis, s_kt, s_vt, DK, DV, BC: tl.constexpr, BDK: tl.constexpr, BDV: tl.constexpr,
             TMA: tl.constexpr):
    """The ``[BC, BDK]`` key and ``[BC, BDV]`` value tiles of compressed tokens ``i0 .. i0+BC-1``,
    zeros at tokens >= n_vis and columns >= D: p_k/p_v point at the sequence's first compressed
    token of the KV head, or (TMA) are descriptors of its visible tokens (:func:`kv_descriptors`)."""
    if TMA:
        b_k = p_k.load([i0, 0])
        b_v = p_v.load([i0, 0])
    else:
        o_c = tl.arange(0, BC)
        m_i = (i0 + o_c) < n_vis
        o_dk = tl.arange(0, BDK)
        o_dv = tl.arange(0, BDV)
        # small in-tile offsets in int32; the tile start is added as an int64 scalar
        b_k = tl.load(p_k + tl.cast(i0, tl.int64) * s_kt + o_c[:, None] * s_kt + o_dk[None, :],
                      mask=m_i[:, None] & (o_dk < DK)[None, :], other=0.)
        b_v = tl.load(p_v + tl.cast(i0, tl.int64) * s_vt + o_c[:, None] * s_vt + o_dv[None, :],
                      mask=m_i[:, None] & (o_dv < DV)[None, :], other=0.)
    return b_k, b_v


@triton.jit
def _k_cols(p_k, i0, n_vis, s_kt, DK, BC: tl.constexpr, D0: tl.constexpr, BD: tl.constexpr):
    """Columns ``D0 .. D0 + BD - 1`` of the ``[BC]`` compressed keys ``i0 ..`` (zeros past n_vis and DK)."""
    o_c = tl.arange(0, BC)
    o_d = D0 + tl.arange(0, BD)
    return tl.load(p_k + tl.cast(i0, tl.int64) * s_kt + o_c[:, None] * s_kt + o_d[None, :],
                   mask=((i0 + o_c) < n_vis)[:, None] & (o_d < DK)[None, :], other=0.)


@triton.jit
def _score_tile(b_q, b_q2, p_k, p_v, p_k2, i0, n_vis, s_kt, s_vt, scale_log2, DK, DV, BC: tl.constexpr,
                BDK: tl.constexpr, BDK2: tl.constexpr, BDV: tl.constexpr, PRECISION: tl.constexpr,
                UPCAST: tl.constexpr, TMA: tl.constexpr):
    """The K ``[BC, BDK]`` (and second head-column tile ``[BC, BDK2]`` when BDK2 > 0) and V
    ``[BC, BDV]`` tiles of compressed tokens ``i0 ..`` (see :func:`_kv_tile`, :func:`_k_cols`), and
    the scores ``[BM, BC]`` of the query rows against them in log2 units."""
    b_k, b_v = _kv_tile(p_k, p_v, i0, n_vis, s_kt, s_vt, DK, DV, BC, BDK, BDV, TMA)  # [BC, BDK], [BC, BDV]
    if UPCAST:
        b_k, b_v = b_k.to(tl.float32), b_v.to(tl.float32)
    b_s = tl.dot(b_q, tl.trans(b_k), input_precision=PRECISION)  # [BM, BC]
    if BDK2 > 0:
        b_k2 = _k_cols(p_k2, i0, n_vis, s_kt, DK, BC, BDK, BDK2)
        if UPCAST:
            b_k2 = b_k2.to(tl.float32)
        b_s += tl.dot(b_q2, tl.trans(b_k2), input_precision=PRECISION)
    else:
        b_k2 = b_k  # unused
    return b_s * scale_log2, b_k, b_k2, b_v


@triton.jit
def _fwd_tiles(acc, l_i, m_i, b_q, b_q2, p_k, p_v, p_k2, o_t, i_lo, i_hi, n_vis, s_kt, s_vt, scale_log2,
               t_vis, STRIDE, DK, DV,
               BC: tl.constexpr, BDK: tl.constexpr, BDK2: tl.constexpr, BDV: tl.constexpr, MASK: tl.constexpr,
               PRECISION: tl.constexpr, UPCAST: tl.constexpr, TMA: tl.constexpr):
    """Online-softmax update of a query tile over compressed tokens [i_lo, i_hi) of its sequence.

    p_k/p_v point at the sequence's first compressed token of the KV head, or (TMA) are tensor
    descriptors of its visible tokens ``[n_vis, D]`` (TMA zero-fills rows >= n_vis and columns
    >= D, as the masked pointer loads do); MASK applies the per-row visibility to the rows o_t
    ``[BM]``: token i is visible to row t iff ``i*STRIDE + t_vis <= t`` (``t_vis = kernel_size - 1
    - off``, :func:`_query_offset`; only the key tiles near the query tile's horizon need it).
    BDK2 > 0: the head columns ``BDK ..`` are a second tile, b_q2 ``[BM, BDK2]`` (no padding to a
    power of two), its keys read through the pointer p_k2 (p_k's pointer form).
    """
    o_c = tl.arange(0, BC)
    for i0 in range(i_lo, i_hi, BC):
        o_i = i0 + o_c
        # [BM, BC], log2 units
        b_s, b_k, b_k2, b_v = _score_tile(b_q, b_q2, p_k, p_v, p_k2, i0, n_vis, s_kt, s_vt, scale_log2, DK, DV, BC,
                                          BDK, BDK2, BDV, PRECISION, UPCAST, TMA)
        if MASK:
            m_vis = (o_i * STRIDE + t_vis)[None, :] <= o_t[:, None]
            b_s = tl.where(m_vis, b_s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(b_s, 1))
        # a row that has seen nothing yet keeps m = -inf; shift it by 0 so exp2 gives 0, not NaN.
        m_use = tl.where(m_new == float("-inf"), 0., m_new)
        alpha = tl.exp2(m_i - m_use)
        b_p = tl.exp2(b_s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(b_p, 1)
        if UPCAST:  # bf16 under the interpreter: round p as the compiled kernel does
            b_pc = b_p.to(tl.bfloat16).to(tl.float32)
        else:
            b_pc = b_p.to(b_q.dtype)
        acc = acc * alpha[:, None] + tl.dot(b_pc, b_v, input_precision=PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def compressed_fwd_kernel(q, k, v, o, lse, cu_seqlens, ccu_seqlens, chunk_indices, scale_log2,
                          s_qt, s_qh, s_kt, s_kh, s_vt, s_vh, s_ot, s_oh, HQ, H, G, DK, DV,
                          KERNEL_SIZE, STRIDE, cu_seqlens_k, q_offset,
                          GP: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, BDK: tl.constexpr,
                          BDV: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, TMA: tl.constexpr,
                          BDK2: tl.constexpr = 0, OFFSET: tl.constexpr = "none"):
    """One program per (query tile, KV head); chunk_indices rows are (sequence, tile), taken last
    row first (a sequence's late tiles see the most tokens: the longest programs start first).
    TMA: compressed K/V tiles through tensor descriptors (16-bit inputs, 16-byte aligned rows).
    Row t of sequence n has position off + t (:func:`_query_offset`); ccu_seqlens packs the
    compressed tokens of the keys."""
    BM: tl.constexpr = BT * GP
    i_p = tl.program_id(0)
    i_c, i_h = tl.num_programs(0) // H - 1 - i_p // H, i_p % H
    i_n = tl.load(chunk_indices + i_c * 2)
    i_tile = tl.load(chunk_indices + i_c * 2 + 1)
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    seq_len = (tl.load(cu_seqlens + i_n + 1) - bos).to(tl.int32)
    cbos = tl.load(ccu_seqlens + i_n).to(tl.int64)
    off = _query_offset(cu_seqlens_k, i_n, seq_len, q_offset, OFFSET)

    t0 = i_tile * BT
    o_r = tl.arange(0, BM)
    o_t = t0 + o_r // GP  # [BM] row of each query within its sequence
    o_g = o_r % GP  # [BM] head within the group
    m_row = (o_t < seq_len) & (o_g < G)
    o_hq = i_h * G + o_g
    o_dk = tl.arange(0, BDK)
    o_dv = tl.arange(0, BDV)
    m_dk = o_dk < DK
    m_dv = o_dv < DV
    o_tok = bos + o_t  # [BM] int64 packed token index

    p_q = q + o_tok[:, None] * s_qt + (o_hq * s_qh)[:, None] + o_dk[None, :]
    b_q = tl.load(p_q, mask=m_row[:, None] & m_dk[None, :], other=0.)  # [BM, BDK]
    if BDK2 > 0:  # head columns BDK .. as a second tile
        o_dk2 = BDK + tl.arange(0, BDK2)
        b_q2 = tl.load(q + o_tok[:, None] * s_qt + (o_hq * s_qh)[:, None] + o_dk2[None, :],
                       mask=m_row[:, None] & (o_dk2 < DK)[None, :], other=0.)
    else:
        b_q2 = b_q
    if UPCAST:
        b_q = b_q.to(tl.float32)
        b_q2 = b_q2.to(tl.float32)

    p0 = t0 + off  # position of the tile's first row
    p_last = tl.minimum(t0 + BT, seq_len) - 1 + off
    # Token i is visible to position p iff i*stride + kernel_size - 1 <= p: the tile's last row sees
    # n_vis tokens, its first row n_full (operands kept non-negative: no signed-division pitfalls).
    n_vis = tl.where(p_last + 1 >= KERNEL_SIZE, tl.maximum(p_last + 1 - KERNEL_SIZE, 0) // STRIDE + 1, 0)
    n_full = tl.where(p0 + 1 >= KERNEL_SIZE, tl.maximum(p0 + 1 - KERNEL_SIZE, 0) // STRIDE + 1, 0)
    n_full = (n_full // BC) * BC
    t_vis = KERNEL_SIZE - 1 - off  # token i is visible to row t iff i*stride + t_vis <= t

    p_k = k + cbos * s_kt + i_h * s_kh
    p_v = v + cbos * s_vt + i_h * s_vh
    p_k2 = p_k
    if TMA:
        # the tile's visible tokens only: rows past n_vis (later tokens, the next sequence's) read 0
        p_k, p_v = kv_descriptors(p_k, p_v, n_vis, s_kt, s_vt, DK, DV, BC, BDK, BDV)
    acc = tl.zeros([BM, BDV], dtype=tl.float32)
    l_i = tl.zeros([BM], dtype=tl.float32)
    m_i = tl.full([BM], float("-inf"), dtype=tl.float32)
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, b_q, b_q2, p_k, p_v, p_k2, o_t, 0, n_full, n_vis, s_kt, s_vt,
                               scale_log2, t_vis, STRIDE, DK, DV, BC, BDK, BDK2, BDV, False, PRECISION, UPCAST,
                               TMA)
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, b_q, b_q2, p_k, p_v, p_k2, o_t, n_full, n_vis, n_vis, s_kt, s_vt,
                               scale_log2, t_vis, STRIDE, DK, DV, BC, BDK, BDK2, BDV, True, PRECISION, UPCAST,
                               TMA)

    seen = l_i > 0
    b_o = acc / tl.where(seen, l_i, 1.)[:, None]
    b_lse = tl.where(seen, (m_i + tl.log2(tl.where(seen, l_i, 1.))) / 1.4426950408889634, float("-inf"))
    p_o = o + o_tok[:, None] * s_ot + (o_hq * s_oh)[:, None] + o_dv[None, :]
    tl.store(p_o, b_o.to(o.dtype.element_ty), mask=m_row[:, None] & m_dv[None, :])
    tl.store(lse + o_tok * HQ + o_hq, b_lse, mask=m_row)


@triton.jit
def compressed_bwd_preprocess_kernel(o, do, dlse, delta, N, DV, HAS_DLSE: tl.constexpr, BR: tl.constexpr,
                                     BDV: tl.constexpr):
    """delta[r] = sum_d o[r, d] * do[r, d] - dlse[r] over the N = tokens * HQ rows (contiguous)."""
    o_r = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    o_d = tl.arange(0, BDV)
    m_r = o_r < N
    m = m_r[:, None] & (o_d < DV)[None, :]
    b_o = tl.load(o + o_r[:, None] * DV + o_d[None, :], mask=m, other=0.).to(tl.float32)
    b_do = tl.load(do + o_r[:, None] * DV + o_d[None, :], mask=m, other=0.).to(tl.float32)
    b_delta = tl.sum(b_o * b_do, 1)
    if HAS_DLSE:
        b_delta -= tl.load(dlse + o_r, mask=m_r, other=0.)
    tl.store(delta + o_r, b_delta, mask=m_r)


@triton.jit
def _bwd_dq_tiles(b_dq, b_dq2, b_q, b_q2, b_do, b_lse, b_delta, p_k, p_v, p_k2, o_t, i_lo, i_hi, n_vis, s_kt, s_vt,
                  scale_log2, t_vis, STRIDE, DK, DV,
                  BC: tl.constexpr, BDK: tl.constexpr, BDK2: tl.constexpr, BDV: tl.constexpr, MASK: tl.constexpr,
                  PRECISION: tl.constexpr, UPCAST: tl.constexpr, TMA: tl.constexpr):
    """dQ of a query tile (unscaled) from compressed tokens [i_lo, i_hi); b_lse in log2 units.
    p_k/p_v (pointers, or TMA descriptors of the visible tokens) and the visibility of the rows
    o_t (t_vis) as in :func:`_fwd_tiles`. BDK2 > 0: the head columns ``BDK ..`` are a second tile (b_q2, b_dq2; keys through the
    pointer p_k2), as in :func:`_fwd_tiles`."""
    o_c = tl.arange(0, BC)
    for i0 in range(i_lo, i_hi, BC):
        o_i = i0 + o_c
        b_s, b_k, b_k2, b_v = _score_tile(b_q, b_q2, p_k, p_v, p_k2, i0, n_vis, s_kt, s_vt, scale_log2, DK, DV, BC,
                                          BDK, BDK2, BDV, PRECISION, UPCAST, TMA)  # [BM, BC], log2 units
        b_p = tl.exp2(b_s - b_lse[:, None])
        if MASK:
            m_vis = (o_i * STRIDE + t_vis)[None, :] <= o_t[:, None]
            b_p = tl.where(m_vis, b_p, 0.)
        b_dp = tl.dot(b_do, tl.trans(b_v), input_precision=PRECISION)  # [BM, BC]
        b_ds = b_p * (b_dp - b_delta[:, None])
        if UPCAST:  # bf16 under the interpreter: round ds as the compiled kernel does
            b_dsc = b_ds.to(tl.bfloat16).to(tl.float32)
        else:
            b_dsc = b_ds.to(b_q.dtype)
        b_dq += tl.dot(b_dsc, b_k, input_precision=PRECISION)
        if BDK2 > 0:
            b_dq2 += tl.dot(b_dsc, b_k2, input_precision=PRECISION)
    return b_dq, b_dq2


@triton.jit
def compressed_bwd_dq_kernel(q, k, v, do, lse, delta, dq, cu_seqlens, ccu_seqlens, chunk_indices, scale,
                             scale_log2, s_qt, s_qh, s_kt, s_kh, s_vt, s_vh, s_ot, s_oh, HQ, H, G, DK, DV,
                             KERNEL_SIZE, STRIDE, cu_seqlens_k, q_offset,
                             GP: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, BDK: tl.constexpr,
                             BDV: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                             TMA: tl.constexpr, BDK2: tl.constexpr = 0, OFFSET: tl.constexpr = "none"):
    """One program per (query tile, KV head), latest tiles first. dq has q's strides, do has o's
    strides; lse and delta are contiguous [tokens, HQ] fp32. TMA, the row positions and BDK2 > 0
    (the head columns ``BDK ..`` as a second tile: q, k and dq) as in the forward."""
    BM: tl.constexpr = BT * GP
    i_p = tl.program_id(0)
    i_c, i_h = tl.num_programs(0) // H - 1 - i_p // H, i_p % H
    i_n = tl.load(chunk_indices + i_c * 2)
    i_tile = tl.load(chunk_indices + i_c * 2 + 1)
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    seq_len = (tl.load(cu_seqlens + i_n + 1) - bos).to(tl.int32)
    cbos = tl.load(ccu_seqlens + i_n).to(tl.int64)
    off = _query_offset(cu_seqlens_k, i_n, seq_len, q_offset, OFFSET)

    t0 = i_tile * BT
    o_r = tl.arange(0, BM)
    o_t = t0 + o_r // GP
    o_g = o_r % GP
    m_row = (o_t < seq_len) & (o_g < G)
    o_hq = i_h * G + o_g
    o_dk = tl.arange(0, BDK)
    o_dv = tl.arange(0, BDV)
    m_dk = o_dk < DK
    m_dv = o_dv < DV
    o_tok = bos + o_t

    b_q = tl.load(q + o_tok[:, None] * s_qt + (o_hq * s_qh)[:, None] + o_dk[None, :],
                  mask=m_row[:, None] & m_dk[None, :], other=0.)  # [BM, BDK]
    if BDK2 > 0:
        o_dk2 = BDK + tl.arange(0, BDK2)
        m_dk2 = o_dk2 < DK
        b_q2 = tl.load(q + o_tok[:, None] * s_qt + (o_hq * s_qh)[:, None] + o_dk2[None, :],
                       mask=m_row[:, None] & m_dk2[None, :], other=0.)  # [BM, BDK2]
    else:
        b_q2 = b_q  # unused
    b_do = tl.load(do + o_tok[:, None] * s_ot + (o_hq * s_oh)[:, None] + o_dv[None, :],
                   mask=m_row[:, None] & m_dv[None, :], other=0.)  # [BM, BDV]
    if UPCAST:
        b_q, b_q2, b_do = b_q.to(tl.float32), b_q2.to(tl.float32), b_do.to(tl.float32)
    b_lse = tl.load(lse + o_tok * HQ + o_hq, mask=m_row, other=float("inf"))
    # +inf makes p = exp2(s - lse) vanish for padded rows and rows that see nothing (lse = -inf).
    b_lse = tl.where(b_lse == float("-inf"), float("inf"), b_lse * 1.4426950408889634)
    b_delta = tl.load(delta + o_tok * HQ + o_hq, mask=m_row, other=0.)

    p0 = t0 + off
    p_last = tl.minimum(t0 + BT, seq_len) - 1 + off
    n_vis = tl.where(p_last + 1 >= KERNEL_SIZE, tl.maximum(p_last + 1 - KERNEL_SIZE, 0) // STRIDE + 1, 0)
    n_full = tl.where(p0 + 1 >= KERNEL_SIZE, tl.maximum(p0 + 1 - KERNEL_SIZE, 0) // STRIDE + 1, 0)
    n_full = (n_full // BC) * BC
    t_vis = KERNEL_SIZE - 1 - off  # token i is visible to row t iff i*stride + t_vis <= t

    p_k = k + cbos * s_kt + i_h * s_kh
    p_v = v + cbos * s_vt + i_h * s_vh
    p_k2 = p_k
    if TMA:
        p_k, p_v = kv_descriptors(p_k, p_v, n_vis, s_kt, s_vt, DK, DV, BC, BDK, BDV)
    b_dq = tl.zeros([BM, BDK], dtype=tl.float32)
    # without a second tile (BDK2 == 0) a 16-column placeholder, never read: the compiler drops it
    b_dq2 = tl.zeros([BM, BDK2 if BDK2 > 0 else 16], dtype=tl.float32)
    b_dq, b_dq2 = _bwd_dq_tiles(b_dq, b_dq2, b_q, b_q2, b_do, b_lse, b_delta, p_k, p_v, p_k2, o_t, 0, n_full,
                                n_vis, s_kt, s_vt, scale_log2, t_vis, STRIDE, DK, DV, BC, BDK, BDK2, BDV, False,
                                PRECISION, UPCAST, TMA)
    b_dq, b_dq2 = _bwd_dq_tiles(b_dq, b_dq2, b_q, b_q2, b_do, b_lse, b_delta, p_k, p_v, p_k2, o_t, n_full,
                                n_vis, n_vis, s_kt, s_vt, scale_log2, t_vis, STRIDE, DK, DV, BC, BDK, BDK2, BDV,
                                True, PRECISION, UPCAST, TMA)
    tl.store(dq + o_tok[:, None] * s_qt + (o_hq * s_qh)[:, None] + o_dk[None, :],
             (b_dq * scale).to(dq.dtype.element_ty), mask=m_row[:, None] & m_dk[None, :])
    if BDK2 > 0:
        tl.store(dq + o_tok[:, None] * s_qt + (o_hq * s_qh)[:, None] + o_dk2[None, :],
                 (b_dq2 * scale).to(dq.dtype.element_ty), mask=m_row[:, None] & m_dk2[None, :])


@triton.jit
def _bwd_dkv_tiles(b_dk, b_dk2, b_dv, b_k, b_k2, b_v, q, do, lse, delta, bos, seq_len, o_i, i_h, t_lo, t_hi,
                   s_qt, s_qh, s_ot, s_oh, scale_log2, HQ, G, t_vis, STRIDE, DK, DV,
                   GP: tl.constexpr, BT: tl.constexpr, BDK: tl.constexpr, BDK2: tl.constexpr, BDV: tl.constexpr,
                   MASK: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """dK (unscaled) and dV of a compressed tile from the query tiles starting at rows t_lo, t_lo+BT,
    .. < t_hi (rows past t_hi belong to the next program unless t_hi is the sequence end); the
    visibility (t_vis) as in :func:`_fwd_tiles`. BDK2 > 0: the head columns ``BDK ..`` are a second
    tile (b_k2, b_dk2)."""
    BM: tl.constexpr = BT * GP
    o_r = tl.arange(0, BM)
    o_dt = o_r // GP  # [BM] position within the query tile
    o_g = o_r % GP
    m_g = o_g < G
    o_hq = i_h * G + o_g
    o_dk = tl.arange(0, BDK)
    o_dv = tl.arange(0, BDV)
    m_dk = o_dk < DK
    m_dv = o_dv < DV
    # small in-tile offsets in int32; the tile start is added as an int64 scalar below
    p_qb = q + bos * s_qt + (o_dt * s_qt + o_hq * s_qh)[:, None] + o_dk[None, :]
    # the second head-column tile (a 16-column placeholder, never read, where BDK2 == 0)
    o_dk2 = BDK + tl.arange(0, BDK2 if BDK2 > 0 else 16)
    m_dk2 = o_dk2 < DK
    p_qb2 = q + bos * s_qt + (o_dt * s_qt + o_hq * s_qh)[:, None] + o_dk2[None, :]
    p_dob = do + bos * s_ot + (o_dt * s_ot + o_hq * s_oh)[:, None] + o_dv[None, :]
    p_lb = lse + bos * HQ + o_dt * HQ + o_hq
    p_db = delta + bos * HQ + o_dt * HQ + o_hq
    for t0 in range(t_lo, t_hi, BT):
        o_t = t0 + o_dt
        m_row = (o_t < seq_len) & m_g
        t0_64 = tl.cast(t0, tl.int64)
        b_q = tl.load(p_qb + t0_64 * s_qt, mask=m_row[:, None] & m_dk[None, :], other=0.)  # [BM, BDK]
        b_do = tl.load(p_dob + t0_64 * s_ot, mask=m_row[:, None] & m_dv[None, :], other=0.)  # [BM, BDV]
        if UPCAST:
            b_q, b_do = b_q.to(tl.float32), b_do.to(tl.float32)
        if BDK2 > 0:
            b_q2 = tl.load(p_qb2 + t0_64 * s_qt, mask=m_row[:, None] & m_dk2[None, :], other=0.)  # [BM, BDK2]
            if UPCAST:
                b_q2 = b_q2.to(tl.float32)
        b_lse = tl.load(p_lb + t0_64 * HQ, mask=m_row, other=float("inf"))
        b_lse = tl.where(b_lse == float("-inf"), float("inf"), b_lse * 1.4426950408889634)
        b_delta = tl.load(p_db + t0_64 * HQ, mask=m_row, other=0.)
        b_st = tl.dot(b_k, tl.trans(b_q), input_precision=PRECISION)  # [BC, BM]
        if BDK2 > 0:
            b_st += tl.dot(b_k2, tl.trans(b_q2), input_precision=PRECISION)
        b_pt = tl.exp2(b_st * scale_log2 - b_lse[None, :])
        if MASK:
            m_vis = (o_i * STRIDE + t_vis)[:, None] <= o_t[None, :]
            b_pt = tl.where(m_vis, b_pt, 0.)
        b_ptc = b_pt.to(do.dtype.element_ty)
        if UPCAST:
            b_ptc = b_ptc.to(tl.float32)
        b_dv += tl.dot(b_ptc, b_do, input_precision=PRECISION)
        b_dpt = tl.dot(b_v, tl.trans(b_do), input_precision=PRECISION)  # [BC, BM]
        b_dst = b_pt * (b_dpt - b_delta[None, :])
        b_dstc = b_dst.to(q.dtype.element_ty)
        if UPCAST:
            b_dstc = b_dstc.to(tl.float32)
        b_dk += tl.dot(b_dstc, b_q, input_precision=PRECISION)
        if BDK2 > 0:
            b_dk2 += tl.dot(b_dstc, b_q2, input_precision=PRECISION)
    return b_dk, b_dk2, b_dv


@triton.jit
def compressed_bwd_dkv_kernel(q, k, v, do, lse, delta, dk, dv, cu_seqlens, ccu_seqlens, chunk_indices, scale,
                              scale_log2, s_qt, s_qh, s_kt, s_kh, s_vt, s_vh, s_ot, s_oh, s_dks, s_dvs,
                              HQ, H, G, DK, DV, KERNEL_SIZE, STRIDE, NSEG, cu_seqlens_k, q_offset,
                              GP: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, BDK: tl.constexpr,
                              BDV: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                              BDK2: tl.constexpr = 0, OFFSET: tl.constexpr = "none"):
    """One program per (tile of BC compressed tokens, KV head, query segment). BDK2 > 0: the head
    columns ``BDK ..`` as a second tile (q, k and dk), as in the forward.

    The query rows that see the tile, [max(0, i0*stride + kernel_size - 1 - off), seq_len) (row t
    has position off + t, :func:`_query_offset`), are cut into NSEG segments of whole query tiles;
    program s writes its partial sums to dk + s*s_dks (resp. dv), which hold k's (v's) strides
    otherwise. The host adds the segments in a fixed order.
    """
    i_p = tl.program_id(0)
    i_c = i_p // (H * NSEG)
    i_h = (i_p // NSEG) % H
    i_s = i_p % NSEG
    i_n = tl.load(chunk_indices + i_c * 2)
    i_tile = tl.load(chunk_indices + i_c * 2 + 1)
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    seq_len = (tl.load(cu_seqlens + i_n + 1) - bos).to(tl.int32)
    cbos = tl.load(ccu_seqlens + i_n).to(tl.int64)
    n_cmp = (tl.load(ccu_seqlens + i_n + 1) - cbos).to(tl.int32)
    off = _query_offset(cu_seqlens_k, i_n, seq_len, q_offset, OFFSET)

    i0 = i_tile * BC
    o_i = i0 + tl.arange(0, BC)
    m_i = o_i < n_cmp
    o_dk = tl.arange(0, BDK)
    o_dv = tl.arange(0, BDV)
    m_dk = o_dk < DK
    m_dv = o_dv < DV
    o_ctok = cbos + o_i  # [BC] int64 packed compressed-token index
    b_k = tl.load(k + o_ctok[:, None] * s_kt + i_h * s_kh + o_dk[None, :],
                  mask=m_i[:, None] & m_dk[None, :], other=0.)  # [BC, BDK]
    b_v = tl.load(v + o_ctok[:, None] * s_vt + i_h * s_vh + o_dv[None, :],
                  mask=m_i[:, None] & m_dv[None, :], other=0.)  # [BC, BDV]
    # the second head-column tile (a 16-column placeholder, never read, where BDK2 == 0)
    o_dk2 = BDK + tl.arange(0, BDK2 if BDK2 > 0 else 16)
    m_dk2 = o_dk2 < DK
    if BDK2 > 0:
        b_k2 = tl.load(k + o_ctok[:, None] * s_kt + i_h * s_kh + o_dk2[None, :],
                       mask=m_i[:, None] & m_dk2[None, :], other=0.)  # [BC, BDK2]
    else:
        b_k2 = b_k  # unused
    if UPCAST:
        b_k, b_k2, b_v = b_k.to(tl.float32), b_k2.to(tl.float32), b_v.to(tl.float32)

    # This program's query rows [t_lo, t_hi); t_full: the first row that sees the whole tile, so
    # query tiles from t_mid on skip the per-row mask. Every compressed token is seen by the
    # sequence's last query (position len_k - 1), so t_start < seq_len.
    t_vis = KERNEL_SIZE - 1 - off  # token i is visible to row t iff i*stride + t_vis <= t
    t_start = tl.maximum(i0 * STRIDE + t_vis, 0)
    piece = tl.cdiv(tl.cdiv(seq_len - t_start, NSEG), BT) * BT
    t_lo = t_start + i_s * piece
    t_hi = tl.minimum(t_lo + piece, seq_len)
    t_full = (tl.minimum(i0 + BC, n_cmp) - 1) * STRIDE + t_vis
    t_mid = tl.minimum(t_lo + tl.cdiv(tl.maximum(t_full - t_lo, 0), BT) * BT, t_hi)

    b_dk = tl.zeros([BC, BDK], dtype=tl.float32)
    b_dk2 = tl.zeros([BC, BDK2 if BDK2 > 0 else 16], dtype=tl.float32)
    b_dv = tl.zeros([BC, BDV], dtype=tl.float32)
    b_dk, b_dk2, b_dv = _bwd_dkv_tiles(b_dk, b_dk2, b_dv, b_k, b_k2, b_v, q, do, lse, delta, bos, seq_len, o_i, i_h,
                                       t_lo, t_mid, s_qt, s_qh, s_ot, s_oh, scale_log2, HQ, G, t_vis, STRIDE,
                                       DK, DV, GP, BT, BDK, BDK2, BDV, True, PRECISION, UPCAST)
    b_dk, b_dk2, b_dv = _bwd_dkv_tiles(b_dk, b_dk2, b_dv, b_k, b_k2, b_v, q, do, lse, delta, bos, seq_len, o_i, i_h,
                                       t_mid, t_hi, s_qt, s_qh, s_ot, s_oh, scale_log2, HQ, G, t_vis, STRIDE,
                                       DK, DV, GP, BT, BDK, BDK2, BDV, False, PRECISION, UPCAST)
    p_dk = dk + tl.cast(i_s, tl.int64) * s_dks + o_ctok[:, None] * s_kt + i_h * s_kh + o_dk[None, :]
    p_dv = dv + tl.cast(i_s, tl.int64) * s_dvs + o_ctok[:, None] * s_vt + i_h * s_vh + o_dv[None, :]
    tl.store(p_dk, (b_dk * scale).to(dk.dtype.element_ty), mask=m_i[:, None] & m_dk[None, :])
    if BDK2 > 0:
        p_dk2 = dk + tl.cast(i_s, tl.int64) * s_dks + o_ctok[:, None] * s_kt + i_h * s_kh + o_dk2[None, :]
        tl.store(p_dk2, (b_dk2 * scale).to(dk.dtype.element_ty), mask=m_i[:, None] & m_dk2[None, :])
    tl.store(p_dv, b_dv.to(dv.dtype.element_ty), mask=m_i[:, None] & m_dv[None, :])


# ----------------------------------------------------------------------------------------------
# Host launchers. They take validated [B, T, ...] tensors (B = 1 with cu_seqlens) and work on the
# packed view; configs are fixed per shape so that results never depend on timing.
# ----------------------------------------------------------------------------------------------

def _precision(dtype):
    # fp32 inputs get true fp32 products (tf32 would cost ~1e-3 relative error); 16-bit dtypes ignore it.
    return "ieee" if dtype == torch.float32 else "tf32"


def _upcast(t: torch.Tensor) -> bool:
    # The interpreter stores bf16 as raw uint16 bits and its tl.dot multiplies those bits
    # (triton-lang/triton#11584); the kernels then upcast bf16 operands to fp32 (exact) and round
    # p / ds through bf16 first, so the interpreter computes what the compiled kernel computes.
    return interpreting() and t.dtype == torch.bfloat16


def _query_rows(G: int, rows: int) -> tuple[int, int]:
    """(GP, BT): G padded to a power of two and positions per tile for about ``rows`` tile rows."""
    gp = triton.next_power_of_2(G)
    return gp, max(1, rows // gp)


# Tile configs, fixed per shape (never chosen by timing, so results are reproducible).
# rows: query-tile rows (positions x padded group heads); BC: compressed tokens per tile.
# Chosen by H200 timing among configs compiled for sm_90a (ptxas -v); shared memory within 228 KB.
# They spill a little (bytes, Triton 3.6, 2026-11-29, G = 16): forward 32 at 128/128 and 140 at
# 192/128 (Dk as two tiles; 92 as one padded tile), dK/dV 148 at 192/128 (Dk as two tiles; dQ
# none); each was the fastest of its measured sweep (benchmarks/NOTES.md, compile audit). fp32
# inputs use IEEE dots (CUDA-core FMA, not tensor cores): correct, small tiles, not a fast path.
def _fwd_config(bdk, bdv, itemsize, interpret):
    # tma: compressed K/V through tensor descriptors (16-bit inputs only; checked at launch)
    if interpret:
        return dict(rows=32, BC=16, num_warps=4, num_stages=1, tma=itemsize == 2)
    if itemsize == 4:
        return dict(rows=32, BC=32, num_warps=4, num_stages=2)
    if bdk + bdv <= 128:
        # D=64, H200 sweep 2026-11-29 (run11), 64k: TMA 128 rows / 64 tokens / 8 warps / 3 stages 5.69 ms,
        # 256 rows 6.50, pointer loads 128/64/8/3 6.06, 256/64/16/2 6.91
        return dict(rows=128, BC=64, num_warps=8, num_stages=3, tma=True)
    if bdk + bdv <= 256:
        # H200 sweep 2026-11-29 (run7), 64k: TMA 256 rows / 64 tokens / 8 warps / 3 stages 9.05-9.13 ms,
        # 4 stages 9.21, 16 warps 10.25; pointer loads 256/64/16/2 10.01 (10.52 before the tiles were
        # taken latest first), 128/64/8/3 11.93
        return dict(rows=256, BC=64, num_warps=8, num_stages=3, tma=True)
    if bdk + bdv <= 384:  # H200 sweep 2026-11-28, 64k, 192/128: 13.5 ms (128/64/8/2: 17.3 ms)
        return dict(rows=256, BC=64, num_warps=16, num_stages=2)
    return dict(rows=128, BC=32, num_warps=8, num_stages=2)


def _dq_config(bdk, bdv, itemsize, interpret, split=False):
    """split: Dk is taken as two tiles (e.g. 192 = 128 + 64; bdk is the padded width). The split's
    configs are taken for Dv <= 128 only, as measured (192/128); a 256-wide V keeps the configs it
    had (unmeasured with the split; its dQ on 3 stages would take 226 of 227 KB of shared memory,
    sm_90 compile audit at 96/256)."""
    if interpret:
        return dict(rows=32, BC=16, num_warps=4, num_stages=1, tma=itemsize == 2)
    if itemsize == 4:
        return dict(rows=32, BC=32, num_warps=4, num_stages=2)
    if bdk + bdv <= 256:
        # H200 sweep 2026-11-29 (run7), 64k, whole backward: TMA 128/64/8/3 33.8 ms, TMA 128/64/8/2 34.6,
        # pointer loads 128/64/8/2 37.3 (the default until then), 128/32/8/3 39.4
        return dict(rows=128, BC=64, num_warps=8, num_stages=3, tma=True)
    if bdk + bdv <= 384 and split and bdv <= 128:
        # Dk=192 as 128 + 64: H200 64k, 192/128 (run 39, probe widecmp): whole compressed backward
        # 51.21 ms with the pointer loads below, 50.59 with TMA (first tile) and 3 stages, 51.51 with 2
        return dict(rows=128, BC=64, num_warps=8, num_stages=3, tma=True)
    if bdk + bdv <= 384:
        # Dk=192 (padded 256) / Dv=128: 64 rows on 8 warps laid both warpgroups on the same 64-row
        # S/dP tiles (2.0x the useful tensor work: whole backward 144 ms at 64k); H200 sweep
        # 2026-11-28, 64k: 128 rows x 64 tokens 92.2 ms, 128 x 32 99.4, 64 x 32 142.7
        return dict(rows=128, BC=64, num_warps=8, num_stages=2)
    return dict(rows=64, BC=32, num_warps=8, num_stages=2)


def _dkv_config(bdk, bdv, itemsize, device, split=False):
    """split: as in :func:`_dq_config`."""
    if interpreting():
        return dict(rows=32, BC=16, num_warps=4, num_stages=1, programs=4, min_segment=8)
    sms = _num_sms(device)
    if itemsize == 4:
        return dict(rows=32, BC=32, num_warps=4, num_stages=2, programs=4 * sms, min_segment=256)
    if bdk + bdv <= 256:
        return dict(rows=32, BC=128, num_warps=8, num_stages=3, programs=4 * sms, min_segment=256)
    if bdk + bdv <= 384:
        # H200 sweep 2026-11-28, 64k, 192/128: whole backward 72.4 ms (32/64/8/2: 99.7). Dk=192 as
        # 128 + 64 (run 39, probe widecmp): 44.17 ms on 3 stages, 51.21 on 2; 64 tokens per tile 70.5-72.3
        stages = 3 if split and bdv <= 128 else 2
        return dict(rows=32, BC=128, num_warps=8, num_stages=stages, programs=4 * sms, min_segment=256)
    return dict(rows=32, BC=64, num_warps=8, num_stages=2, programs=4 * sms, min_segment=256)


@functools.lru_cache(maxsize=None)
def _num_sms_of(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _num_sms(device: torch.device) -> int:
    return _num_sms_of(device.index if device.index is not None else torch.cuda.current_device())


def _dkv_segments(n_tiles, H, T, programs, min_segment):
    """Query segments per compressed tile: enough programs to fill the GPU even though there are
    few compressed tokens (T / stride) per head; at most 16, so the fp32 partials stay O(T)."""
    want = triton.cdiv(programs, max(1, n_tiles * H))
    return max(1, min(16, want, triton.cdiv(T, min_segment)))


class _Packed:
    """Packed bookkeeping of a call: sequence offsets and work orders for the tiled grids.

    ``cuk``: the keys' cu_seqlens when they differ from the queries' (else None: every query
    sequence then starts at position ``q_offset``, 0 for packed input); ``offset``: the kernels'
    OFFSET (:func:`_query_offset`)."""

    def __init__(self, B, T, Tc, kernel_size, stride, cu_seqlens, device, q_offset=0, cu_seqlens_k=None):
        self.B, self.T, self.Tc = B, T, Tc
        self.stride = stride
        self.dense = cu_seqlens is None
        self.q_offset = q_offset
        self.cuk = None if cu_seqlens_k is None or cu_seqlens_k is cu_seqlens else cu_seqlens_k
        self.offset = "keys" if self.cuk is not None else "scalar" if q_offset else "none"
        if self.dense:
            self.cu = uniform_cu_seqlens(B, T, device)
            self.ccu = uniform_cu_seqlens(B, Tc, device)
        else:
            self.cu = cu_seqlens
            keys = cu_seqlens if self.cuk is None else self.cuk
            self.ccu = compressed_cu_seqlens(keys, kernel_size, stride)
        self.device = device

    def query_tiles(self, bt: int) -> torch.Tensor:
        """int32 [N, 2] (sequence, tile) rows, latest tiles (most work) first."""
        if self.dense:
            n = triton.cdiv(self.T, bt)
            tile = torch.arange(n - 1, -1, -1, dtype=torch.int32, device=self.device).repeat_interleave(self.B)
            seq = torch.arange(self.B, dtype=torch.int32, device=self.device).repeat(n)
            return torch.stack([seq, tile], 1).contiguous()
        idx = prepare_chunk_indices(self.cu, bt)
        work = idx[:, 1].long()
        if self.cuk is not None:  # a tile's work grows with its position, not its row
            lens, lens_k = self.cu[1:] - self.cu[:-1], self.cuk[1:] - self.cuk[:-1]
            work = work * bt + (lens_k - lens).long()[idx[:, 0].long()]
        order = torch.argsort(-work, stable=True)
        return idx[order].contiguous()

    def key_tiles(self, bc: int) -> torch.Tensor:
        """int32 [N, 2] (sequence, compressed tile) rows, most queries to visit first."""
        if self.dense:
            n = triton.cdiv(self.Tc, bc)
            tile = torch.arange(n, dtype=torch.int32, device=self.device).repeat_interleave(self.B)
            seq = torch.arange(self.B, dtype=torch.int32, device=self.device).repeat(n)
            return torch.stack([seq, tile], 1).contiguous()
        idx = prepare_chunk_indices(self.ccu, bc)
        lens = (self.cu[1:] - self.cu[:-1]).long()
        work = lens[idx[:, 0].long()] - idx[:, 1].long() * bc * self.stride
        if self.cuk is not None:  # the queries past the tile's start: at most all of them
            lens_k = (self.cuk[1:] - self.cuk[:-1]).long()
            work = torch.minimum(lens[idx[:, 0].long()], work + (lens_k - lens)[idx[:, 0].long()])
        order = torch.argsort(-work, stable=True)
        return idx[order].contiguous()


def compressed_attention_fwd(q, k_cmp, v_cmp, kernel_size, stride, scale, cu_seqlens, config=None, q_offset=0,
                             cu_seqlens_k=None):
    """Returns o ``[B, T, HQ, Dv]`` (q's dtype) and lse ``[B, T, HQ]`` float32. 16/32-bit floats only.

    ``config`` overrides the tile config (keys of :func:`_fwd_config`; for benchmark sweeps).
    ``q_offset`` / ``cu_seqlens_k``: as in :func:`compressed_attention_triton`."""
    B, T, HQ, Dk = q.shape
    Tc, H, Dv = k_cmp.shape[1], k_cmp.shape[2], v_cmp.shape[3]
    G = HQ // H
    o = new_output((B, T, HQ, Dv), q.dtype, q.device)
    lse = new_output((B, T, HQ), torch.float32, q.device)
    if B * T == 0:
        return o, lse
    if B * Tc == 0:  # nothing is visible anywhere
        return o.zero_(), lse.fill_(float("-inf"))
    q, k_cmp, v_cmp = q.contiguous(), k_cmp.contiguous(), v_cmp.contiguous()
    pk = _Packed(B, T, Tc, kernel_size, stride, cu_seqlens, q.device, q_offset, cu_seqlens_k)
    bdk, bdv = pow2(Dk), pow2(Dv)
    cfg = config or _fwd_config(bdk, bdv, q.element_size(), interpreting())
    gp, bt = _query_rows(G, cfg["rows"])
    tiles = pk.query_tiles(bt)
    grid = (tiles.shape[0] * H,)
    tma = use_tma(cfg.get("tma", False), k_cmp, v_cmp)
    # q . k over a head dim that is not a power of two: two tiles (192 = 128 + 64), not one of 256
    bdk1, bdk2 = triton_utils.head_tiles(Dk)
    compressed_fwd_kernel[grid](
        q, k_cmp, v_cmp, o, lse, pk.cu, pk.ccu, tiles, scale * LOG2E,
        q.stride(1), q.stride(2), k_cmp.stride(1), k_cmp.stride(2), v_cmp.stride(1), v_cmp.stride(2),
        o.stride(1), o.stride(2), HQ, H, G, Dk, Dv, kernel_size, stride, pk.cuk, pk.q_offset,
        GP=gp, BT=bt, BC=cfg["BC"], BDK=bdk1, BDK2=bdk2, BDV=bdv, PRECISION=_precision(q.dtype),
        UPCAST=_upcast(q), TMA=tma, OFFSET=pk.offset, num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"])
    return o, lse


def compressed_attention_bwd(q, k_cmp, v_cmp, o, lse, do, dlse, kernel_size, stride, scale, cu_seqlens,
                             dq_config=None, dkv_config=None, delta=None, q_offset=0, cu_seqlens_k=None):
    """Returns dq, dk_cmp, dv_cmp (input dtypes). ``dlse`` ``[B, T, HQ]`` may be None (zero).

    ``dq_config`` / ``dkv_config`` override the tile configs (benchmark sweeps). ``delta``
    ``[B, T, HQ]`` float32 = rowsum(dO * o) - dlse, when given (:mod:`nsa.ops.fused`), is not
    recomputed; ``o`` and ``dlse`` are then not read. ``q_offset`` / ``cu_seqlens_k``: as in
    :func:`compressed_attention_triton`."""
    if delta is not None and dlse is not None:
        raise ValueError("compressed backward: give dlse or a precomputed delta, not both")
    B, T, HQ, Dk = q.shape
    Tc, H, Dv = k_cmp.shape[1], k_cmp.shape[2], v_cmp.shape[3]
    G = HQ // H
    dq = new_output(q.shape, q.dtype, q.device)
    dk = new_output(k_cmp.shape, k_cmp.dtype, k_cmp.device)
    dv = new_output(v_cmp.shape, v_cmp.dtype, v_cmp.device)
    if B * Tc == 0 or B * T == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    q, k_cmp, v_cmp = q.contiguous(), k_cmp.contiguous(), v_cmp.contiguous()
    o, lse, do = o.contiguous(), lse.contiguous(), do.contiguous()
    interpret = interpreting()
    bdk, bdv = pow2(Dk), pow2(Dv)

    if delta is None:
        delta = torch.empty((B, T, HQ), dtype=torch.float32, device=q.device)
        n_rows = B * T * HQ
        br = 16 if interpret else 64
        if dlse is not None:
            dlse = dlse.to(torch.float32).contiguous()
        compressed_bwd_preprocess_kernel[(triton.cdiv(n_rows, br),)](
            o, do, dlse if dlse is not None else delta, delta, n_rows, Dv,
            HAS_DLSE=dlse is not None, BR=br, BDV=bdv)
    else:
        delta = delta.contiguous()

    pk = _Packed(B, T, Tc, kernel_size, stride, cu_seqlens, q.device, q_offset, cu_seqlens_k)
    precision = _precision(q.dtype)
    common = (q.stride(1), q.stride(2), k_cmp.stride(1), k_cmp.stride(2), v_cmp.stride(1), v_cmp.stride(2),
              o.stride(1), o.stride(2), HQ, H, G, Dk, Dv, kernel_size, stride)
    offsets = (pk.cuk, pk.q_offset)

    # q . k over a head dim that is not a power of two: two tiles (192 = 128 + 64), not one of 256
    bdk1, bdk2 = triton_utils.head_tiles(Dk)
    cfg = dq_config or _dq_config(bdk, bdv, q.element_size(), interpret, bdk2 > 0)
    gp, bt = _query_rows(G, cfg["rows"])
    tiles = pk.query_tiles(bt)
    tma = use_tma(cfg.get("tma", False), k_cmp, v_cmp)
    compressed_bwd_dq_kernel[(tiles.shape[0] * H,)](
        q, k_cmp, v_cmp, do, lse, delta, dq, pk.cu, pk.ccu, tiles, scale, scale * LOG2E, *common, *offsets,
        GP=gp, BT=bt, BC=cfg["BC"], BDK=bdk1, BDK2=bdk2, BDV=bdv, PRECISION=precision,
        UPCAST=_upcast(q), TMA=tma, OFFSET=pk.offset, num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"])

    cfg = dkv_config or _dkv_config(bdk, bdv, q.element_size(), q.device, bdk2 > 0)
    gp, bt = _query_rows(G, cfg["rows"])
    tiles = pk.key_tiles(cfg["BC"])
    nseg = _dkv_segments(tiles.shape[0], H, B * T, cfg["programs"], cfg["min_segment"])
    if nseg == 1:
        dk_part, dv_part = dk, dv
    else:
        dk_part = new_output((nseg,) + tuple(k_cmp.shape), torch.float32, q.device)
        dv_part = new_output((nseg,) + tuple(v_cmp.shape), torch.float32, q.device)
    compressed_bwd_dkv_kernel[(tiles.shape[0] * H * nseg,)](
        q, k_cmp, v_cmp, do, lse, delta, dk_part, dv_part, pk.cu, pk.ccu, tiles, scale, scale * LOG2E, *common[:8],
        dk_part.stride(0) if nseg > 1 else 0, dv_part.stride(0) if nseg > 1 else 0, *common[8:], nseg, *offsets,
        GP=gp, BT=bt, BC=cfg["BC"], BDK=bdk1, BDK2=bdk2, BDV=bdv, PRECISION=precision,
        UPCAST=_upcast(q), OFFSET=pk.offset, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    if nseg > 1:  # a fixed-order sum: deterministic
        dk.copy_(dk_part.sum(0))
        dv.copy_(dv_part.sum(0))
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------
# torch.compile: the launchers as opaque custom ops with shape-only fake implementations.
# ----------------------------------------------------------------------------------------------

@torch.library.custom_op("nsa::compressed_attention_fwd", mutates_args=())
def _fwd_op(q: torch.Tensor, k_cmp: torch.Tensor, v_cmp: torch.Tensor, kernel_size: int, stride: int,
            scale: float, cu_seqlens: Optional[torch.Tensor], q_offset: int = 0,
            cu_seqlens_k: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    return compressed_attention_fwd(q, k_cmp, v_cmp, kernel_size, stride, scale, cu_seqlens, q_offset=q_offset,
                                    cu_seqlens_k=cu_seqlens_k)


@_fwd_op.register_fake
def _(q, k_cmp, v_cmp, kernel_size, stride, scale, cu_seqlens, q_offset=0, cu_seqlens_k=None):
    B, T, HQ, _ = q.shape
    return (q.new_empty((B, T, HQ, v_cmp.shape[3])), q.new_empty((B, T, HQ), dtype=torch.float32))


@torch.library.custom_op("nsa::compressed_attention_bwd", mutates_args=())
def _bwd_op(q: torch.Tensor, k_cmp: torch.Tensor, v_cmp: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
            do: torch.Tensor, dlse: Optional[torch.Tensor], kernel_size: int, stride: int, scale: float,
            cu_seqlens: Optional[torch.Tensor], delta: Optional[torch.Tensor] = None, q_offset: int = 0,
            cu_seqlens_k: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return compressed_attention_bwd(q, k_cmp, v_cmp, o, lse, do, dlse, kernel_size, stride, scale, cu_seqlens,
                                    delta=delta, q_offset=q_offset, cu_seqlens_k=cu_seqlens_k)


@_bwd_op.register_fake
def _(q, k_cmp, v_cmp, o, lse, do, dlse, kernel_size, stride, scale, cu_seqlens, delta=None, q_offset=0,
      cu_seqlens_k=None):
    return torch.empty_like(q), torch.empty_like(k_cmp), torch.empty_like(v_cmp)


class CompressedAttentionFunction(torch.autograd.Function):

    @staticmethod
    def forward(ctx, q, k_cmp, v_cmp, kernel_size, stride, scale, cu_seqlens, q_offset=0, cu_seqlens_k=None):
        o, lse = _fwd_op(q, k_cmp, v_cmp, kernel_size, stride, scale, cu_seqlens, q_offset, cu_seqlens_k)
        ctx.save_for_backward(q, k_cmp, v_cmp, o, lse, cu_seqlens, cu_seqlens_k)
        ctx.kernel_size, ctx.stride, ctx.scale, ctx.q_offset = kernel_size, stride, scale, q_offset
        ctx.set_materialize_grads(False)
        return o, lse

    @staticmethod
    def backward(ctx, do, dlse):
        q, k_cmp, v_cmp, o, lse, cu_seqlens, cu_seqlens_k = ctx.saved_tensors
        if do is None:
            do = torch.zeros_like(o)
        dq, dk, dv = _bwd_op(q, k_cmp, v_cmp, o, lse, do, dlse, ctx.kernel_size, ctx.stride, ctx.scale,
                             cu_seqlens, None, ctx.q_offset, cu_seqlens_k)
        return dq, dk, dv, None, None, None, None, None, None


def compressed_attention_triton(q, k_cmp, v_cmp, kernel_size, stride, scale, cu_seqlens=None, q_offset: int = 0,
                                cu_seqlens_k: Optional[torch.Tensor] = None):
    """Triton compressed attention; same contract as :func:`nsa.ops.compressed_attention`.

    Inputs arrive validated from :mod:`nsa.ops.api` (``scale`` a float).

    Args:
        q: ``[B, T, HQ, Dk]``.
        k_cmp: ``[B, Tc, H, Dk]``: the compressed tokens of the raw keys (``Tk = T + q_offset``
            raw keys per sequence, or packed per sequence by ``cu_seqlens_k``);
            v_cmp: ``[B, Tc, H, Dv]``; ``G = HQ // H`` any positive int.
        kernel_size, stride: compression block length and step.
        scale: softmax scale (float).
        cu_seqlens: optional int32 ``[N+1]`` offsets of packed query sequences (B = 1).
        q_offset: dense input: query row t has position ``q_offset + t`` (default 0).
        cu_seqlens_k: packed input: int32 ``[N+1]`` offsets of the raw keys (None: ``cu_seqlens``);
            sequence n's queries are the last of its keys (row t at position
            ``len_k[n] - len_q[n] + t``).
    Returns:
        o ``[B, T, HQ, Dv]`` in q's dtype and lse ``[B, T, HQ]`` float32 (float64 inputs are
        computed in float32; both outputs are then cast to float64). Both are differentiable.
    """
    if q.dtype == torch.float64:
        o, lse = CompressedAttentionFunction.apply(q.float(), k_cmp.float(), v_cmp.float(), kernel_size, stride,
                                                   float(scale), cu_seqlens, q_offset, cu_seqlens_k)
        return o.double(), lse.double()
    return CompressedAttentionFunction.apply(q, k_cmp, v_cmp, kernel_size, stride, float(scale), cu_seqlens,
                                             q_offset, cu_seqlens_k)
