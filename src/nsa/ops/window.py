"""Sliding-window attention in Triton: forward, and a backward without atomics.

The query at position ``t`` attends keys ``t - W < s <= t`` of its own sequence (``W =
window_size``). A sequence's queries are the last of its keys' positions: with ``off = len_k -
len_q`` (``q_offset`` for dense input), query row ``i`` sits at position ``off + i``. Every input
is handled as packed ``[N, ...]`` tokens: a dense ``[B, T]`` batch is B sequences of T queries
(and ``T + q_offset`` keys), which the kernels locate by arithmetic; packed input comes with
``cu_seqlens`` (queries), ``cu_seqlens_k`` (keys) and a table of (sequence, tile) rows built on
the device. Nothing synchronizes with the host. Inside the kernels positions count keys; query
rows are addressed from the row of position 0 (the first query row minus ``off``), so that an
offset costs one add per tile.

Query tiles pack the ``G`` query heads of one KV head with ``BT`` consecutive positions into
``BM >= BT * G`` rows (row ``r`` = position ``r // G``, head ``r % G``): each key/value tile is
loaded once for the whole group and fills the tensor cores for any G (1, 3, 16, ...). A tile
of positions ``[t0, t1]`` needs the keys ``[t0 - W + 1, t1]`` only, so the work is O(T * W).
That band is walked either in three phases, so that only its edges pay for masking (key tiles
cut by the window's lower edge for some rows, tiles every row sees whole, tiles cut by the
diagonal), or (``ONE_LOOP``, the default for 16-bit heads <= 128) in one masked loop that the
compiler pipelines end to end; 16-bit K/V tiles come through TMA tensor descriptors whose zero
fill stands for the keys past the tile's last position.

Forward and dQ are query-centric (one program per query tile and KV head). dK/dV are
key-centric: one program per key tile and KV head walks the queries ``[s, s + W - 1]`` (those
at positions ``>= off``) that see it, for all G heads, and accumulates in registers; with
``ROTATE`` each program starts its walk where its neighbours are, so that the queries they
share are read from L2 rather than DRAM. No float atomics: the backward is bitwise
deterministic. Softmax runs in base 2 in float32; the forward saves the base-2 log-sum-exp per
row, and the dQ kernel computes ``delta = rowsum(dO * O)`` for the dK/dV kernel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import triton_utils
from .triton_utils import interpreting, kv_descriptors, pow2, use_tma
from .utils import new_output, window_keys


@triton.jit
def _tile_position(i_t, cu_seqlens, cu_seqlens_k, chunk_indices, T, q_offset, BT: tl.constexpr,
                   IS_VARLEN: tl.constexpr, KEY_TILES: tl.constexpr):
    """Program ``i_t`` -> (tile index inside its sequence, first key row of the sequence, its
    number of keys, its query offset ``off``, the query row of position 0 = first query row -
    off). Tiles of BT queries, or (KEY_TILES) of BT keys. Dense: T queries, T + q_offset keys."""
    if IS_VARLEN:
        i_n = tl.load(chunk_indices + i_t * 2).to(tl.int64)
        i_c = tl.load(chunk_indices + i_t * 2 + 1).to(tl.int32)
        bos = tl.load(cu_seqlens_k + i_n).to(tl.int64)
        seq_len = (tl.load(cu_seqlens_k + i_n + 1) - tl.load(cu_seqlens_k + i_n)).to(tl.int32)
        off = seq_len - (tl.load(cu_seqlens + i_n + 1) - tl.load(cu_seqlens + i_n)).to(tl.int32)
        boq = tl.load(cu_seqlens + i_n).to(tl.int64) - off
    else:
        off = q_offset + 0 * i_t
        seq_len = T + off
        if KEY_TILES:
            NT = tl.cdiv(seq_len, BT)
        else:
            NT = tl.cdiv(T, BT)
        i_c = i_t % NT
        i_b = (i_t // NT).to(tl.int64)
        bos = i_b * seq_len
        boq = i_b * T - off
    return i_c, bos, seq_len, off, boq


@triton.jit
def _key_band(t0, t1, W, BN: tl.constexpr):
    """Key tiles for query positions ``[t0, t1]``: keys ``[s_lo, s_end)`` with ``s_end = t1 + 1``;
    tiles from ``s_lo`` up to ``s_mid`` are cut by the window's lower edge for some rows, tiles
    ``[s_mid, s_top)`` are seen whole by every row, tiles from ``s_top`` on cross the diagonal.
    A tile past its sequence's end (t0 > t1) gets an empty band."""
    s_lo = tl.maximum(t0 - W + 1, 0)
    s_end = tl.where(t0 <= t1, t1 + 1, 0)
    s_mid = s_lo + tl.cdiv(tl.maximum(t1 - W + 1 - s_lo, 0), BN) * BN
    s_top = s_mid + (tl.maximum(tl.minimum(t0 + 1, s_end) - s_mid, 0) // BN) * BN
    return s_lo, s_mid, s_top, s_end


@triton.jit
def _in_band(o_pos, o_s, W):
    """[rows, keys] mask of the keys ``o_pos - W < o_s <= o_pos`` (one unsigned compare)."""
    return (o_pos[:, None] - o_s[None, :]).to(tl.uint32) < W.to(tl.uint32)


@triton.jit
def _window_kv(k, v, bos, i_h, s0, s_end, H, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr,
               BV: tl.constexpr, BN: tl.constexpr, MASKED: tl.constexpr, TMA: tl.constexpr):
    """The ``[BN, BK]`` key and ``[BN, BV]`` value tiles of keys ``s0 .. s0 + BN - 1`` of KV head
    ``i_h``, zeros at columns past K / V and (MASKED) at keys ``>= s_end``. TMA: k and v are
    descriptors of the sequence's keys ``[0, s_end)`` (:func:`_window_descriptors`), whose
    zero fill does the masking."""
    if TMA:
        b_k = k.load([s0, 0])
        b_v = v.load([s0, 0])
    else:
        o_s = s0 + tl.arange(0, BN)
        o_k = tl.arange(0, BK)
        o_v = tl.arange(0, BV)
        p_kv = (bos + o_s) * H + i_h  # [BN] int64 row of k/v
        m_k = (o_k < K)[None, :]
        m_v = (o_v < V)[None, :]
        if MASKED:
            m_k = m_k & (o_s < s_end)[:, None]
            m_v = m_v & (o_s < s_end)[:, None]
        b_k = tl.load(k + p_kv[:, None] * K + o_k[None, :], mask=m_k, other=0.)
        b_v = tl.load(v + p_kv[:, None] * V + o_v[None, :], mask=m_v, other=0.)
    return b_k, b_v


@triton.jit
def _window_descriptors(k, v, bos, i_h, s_end, H, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr,
                        BV: tl.constexpr, BN: tl.constexpr, TMA: tl.constexpr):
    """k, v as :func:`_window_kv` takes them: TMA descriptors over keys ``[0, s_end)`` of KV head
    ``i_h`` of the sequence starting at token ``bos`` (keys past the tile's last position, and the
    next sequence's, read as zeros), or the plain pointers."""
    if TMA:
        return kv_descriptors(k + (bos * H + i_h) * K, v + (bos * H + i_h) * V, s_end, H * K, H * V,
                              K, V, BN, BK, BV)
    else:
        return k, v


@triton.jit
def _window_fwd_tiles(
    b_q, b_q2, b_acc, b_m, b_l, k, v, k2, bos, i_h, o_pos, s_lo, s_hi, s_end, W, qk_scale,
    H, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BK2: tl.constexpr, BV: tl.constexpr,
    BN: tl.constexpr, MASKED: tl.constexpr, TMA: tl.constexpr, DOT_PRECISION: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
):
    """Online softmax over the key tiles starting at ``s_lo, s_lo + BN, ... < s_hi``. MASKED: apply
    the band mask and never load keys ``>= s_end``; else every key is visible to every row.
    BK2 > 0: the head columns ``BK .. BK + BK2 - 1`` are a second tile (b_q2; keys through the
    pointer k2, k's pointer form): no padding of K to a power of two."""
    o_n = tl.arange(0, BN)
    for s0 in range(s_lo, s_hi, BN):
        b_k, b_v = _window_kv(k, v, bos, i_h, s0, s_end, H, K, V, BK, BV, BN, MASKED, TMA)
        # raw scores: the scale enters the exponent as one fused multiply-add per element
        b_s, _ = _window_scores(b_q, b_q2, b_k.to(DOT_DTYPE), k2, bos, i_h, s0, s_end, H, K, BK, BK2, BN, MASKED,
                                DOT_PRECISION, DOT_DTYPE)
        if MASKED:
            b_s = tl.where(_in_band(o_pos, s0 + o_n, W), b_s, float("-inf"))
        b_m_new = tl.maximum(b_m, tl.max(b_s, 1) * qk_scale)
        b_alpha = tl.exp2(b_m - b_m_new)
        b_p = tl.exp2(b_s * qk_scale - b_m_new[:, None])
        b_l = b_l * b_alpha + tl.sum(b_p, 1)
        b_pv = tl.dot(b_p.to(b_v.dtype).to(DOT_DTYPE), b_v.to(DOT_DTYPE), input_precision=DOT_PRECISION)
        b_acc = b_acc * b_alpha[:, None] + b_pv
        b_m = b_m_new
    return b_acc, b_m, b_l


@triton.jit(do_not_specialize=["T", "W", "q_offset"])
def window_fwd_kernel(
    q, k, v, o, lse, o_cmp, o_slc, g_cmp, g_slc, g_win, o_nsa, cu_seqlens, cu_seqlens_k, chunk_indices, scale, T, W,
    q_offset, HQ, H, G: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, BT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    IS_VARLEN: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_DTYPE: tl.constexpr,
    ONE_LOOP: tl.constexpr = False, TMA: tl.constexpr = False, GATE: tl.constexpr = False, BK2: tl.constexpr = 0,
):
    """q ``[N, HQ, K]``, k ``[NK, H, K]``, v ``[NK, H, V]`` -> o ``[N, HQ, V]``, lse ``[N, HQ]`` (base-2
    log-sum-exp of the scaled scores). One program: BT queries x G heads of KV head i_h. Queries
    per ``cu_seqlens`` and keys per ``cu_seqlens_k``, or dense: T queries after q_offset keys.
    ONE_LOOP: the whole band in one (masked) loop instead of three phases, so that the compiler
    pipelines every tile's loads; TMA: K/V tiles through tensor descriptors (16-bit inputs).
    GATE: also NSA's output ``o_nsa = g_cmp * o_cmp + g_slc * o_slc + g_win * o`` (``[N, HQ, V]``
    outputs of the other branches, ``[N, HQ]`` gates; float32 sums of the stored values, one
    rounding: what :func:`nsa.ops.gate.gate_fwd_kernel` computes), saving that kernel's pass.
    BK2 > 0: q . k over the head columns as two tiles, ``0 .. BK-1`` and ``BK .. BK+BK2-1``."""
    _window_fwd_tile(tl.program_id(0), tl.program_id(1), q, k, v, o, lse, o_cmp, o_slc, g_cmp, g_slc, g_win, o_nsa,
                     cu_seqlens, cu_seqlens_k, chunk_indices, scale, T, W, q_offset, HQ, H, G, K, V, BK, BV, BT, BM,
                     BN, IS_VARLEN, DOT_PRECISION, DOT_DTYPE, ONE_LOOP, TMA, GATE, BK2)


@triton.jit
def _window_fwd_tile(
    i_t, i_h, q, k, v, o, lse, o_cmp, o_slc, g_cmp, g_slc, g_win, o_nsa, cu_seqlens, cu_seqlens_k, chunk_indices,
    scale, T, W, q_offset, HQ, H, G: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, BT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    IS_VARLEN: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_DTYPE: tl.constexpr,
    ONE_LOOP: tl.constexpr, TMA: tl.constexpr, GATE: tl.constexpr, BK2: tl.constexpr,
):
    """The work of :func:`window_fwd_kernel`'s program ``(i_t, i_h)``: query tile i_t of KV head i_h."""
    i_c, bos, seq_len, off, boq = _tile_position(i_t, cu_seqlens, cu_seqlens_k, chunk_indices, T, q_offset, BT,
                                                 IS_VARLEN, False)
    t0 = off + i_c * BT  # first position of the tile
    t1 = tl.minimum(t0 + BT, seq_len) - 1  # last position of the tile

    o_r = tl.arange(0, BM)
    m_r = (o_r < BT * G) & (t0 + o_r // G <= t1)
    # padding rows (and every row of a tile past its sequence's end) take the sequence's last
    # valid position at or before t1: finite scores, never stored
    o_pos = tl.minimum(t0 + o_r // G, t1)  # [BM]
    o_row = (boq + o_pos) * HQ + i_h * G + o_r % G  # [BM] int64 row of q/o/lse
    o_k = tl.arange(0, BK)
    o_v = tl.arange(0, BV)
    b_q = tl.load(q + o_row[:, None] * K + o_k[None, :], mask=(o_k < K)[None, :], other=0.).to(DOT_DTYPE)
    if BK2 > 0:
        o_k2 = BK + tl.arange(0, BK2)
        b_q2 = tl.load(q + o_row[:, None] * K + o_k2[None, :], mask=(o_k2 < K)[None, :], other=0.).to(DOT_DTYPE)
    else:
        b_q2 = b_q  # unused

    qk_scale = scale * 1.4426950408889634
    # finite start: a row that sees nothing in a tile keeps alpha = 1 and p = 0 (no inf - inf)
    b_m = tl.full([BM], -1e30, dtype=tl.float32)
    b_l = tl.zeros([BM], dtype=tl.float32)
    b_acc = tl.zeros([BM, BV], dtype=tl.float32)

    s_lo, s_mid, s_top, s_end = _key_band(t0, t1, W, BN)
    k2 = k
    k, v = _window_descriptors(k, v, bos, i_h, s_end, H, K, V, BK, BV, BN, TMA)
    if ONE_LOOP:
        b_acc, b_m, b_l = _window_fwd_tiles(b_q, b_q2, b_acc, b_m, b_l, k, v, k2, bos, i_h, o_pos, s_lo, s_end,
                                            s_end, W, qk_scale, H, K, V, BK, BK2, BV, BN, True, TMA, DOT_PRECISION,
                                            DOT_DTYPE)
    else:
        b_acc, b_m, b_l = _window_fwd_tiles(b_q, b_q2, b_acc, b_m, b_l, k, v, k2, bos, i_h, o_pos, s_lo,
                                            tl.minimum(s_mid, s_end), s_end, W, qk_scale, H, K, V, BK, BK2, BV, BN,
                                            True, TMA, DOT_PRECISION, DOT_DTYPE)
        b_acc, b_m, b_l = _window_fwd_tiles(b_q, b_q2, b_acc, b_m, b_l, k, v, k2, bos, i_h, o_pos, s_mid, s_top,
                                            s_end, W, qk_scale, H, K, V, BK, BK2, BV, BN, False, TMA, DOT_PRECISION,
                                            DOT_DTYPE)
        b_acc, b_m, b_l = _window_fwd_tiles(b_q, b_q2, b_acc, b_m, b_l, k, v, k2, bos, i_h, o_pos, s_top, s_end,
                                            s_end, W, qk_scale, H, K, V, BK, BK2, BV, BN, True, TMA, DOT_PRECISION,
                                            DOT_DTYPE)

    # a valid row sees its own position, and the maximum's term is exp2(0) = 1: b_l >= 1. Rows of
    # a tile past its sequence's end saw nothing; they are not stored, the clamp keeps them finite.
    b_l = tl.maximum(b_l, 1.)
    b_o = (b_acc / b_l[:, None]).to(o.dtype.element_ty)
    p_o = o_row[:, None] * V + o_v[None, :]
    m_o = m_r[:, None] & (o_v < V)[None, :]
    tl.store(o + p_o, b_o, mask=m_o)
    tl.store(lse + o_row, b_m + tl.log2(b_l), mask=m_r)
    if GATE:
        b_y = tl.load(g_cmp + o_row, mask=m_r, other=0.).to(tl.float32)[:, None] * \
            tl.load(o_cmp + p_o, mask=m_o, other=0.).to(tl.float32)
        b_y += tl.load(g_slc + o_row, mask=m_r, other=0.).to(tl.float32)[:, None] * \
            tl.load(o_slc + p_o, mask=m_o, other=0.).to(tl.float32)
        b_y += tl.load(g_win + o_row, mask=m_r, other=0.).to(tl.float32)[:, None] * b_o.to(tl.float32)
        tl.store(o_nsa + p_o, b_y.to(o_nsa.dtype.element_ty), mask=m_o)


@triton.jit
def _window_bwd_dq_tiles(
    b_q, b_q2, b_do, b_lse, b_delta, b_dq, b_dq2, k, v, k2, bos, i_h, o_pos, s_lo, s_hi, s_end, W, qk_scale,
    H, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BK2: tl.constexpr, BV: tl.constexpr, BN: tl.constexpr,
    MASKED: tl.constexpr, TMA: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_DTYPE: tl.constexpr,
):
    """dQ (unscaled) accumulated over the key tiles ``s_lo, s_lo + BN, ... < s_hi``; as
    _window_fwd_tiles (BK2 > 0: b_q2 / b_dq2 the head columns ``BK ..``, keys through k2)."""
    o_n = tl.arange(0, BN)
    for s0 in range(s_lo, s_hi, BN):
        b_k, b_v = _window_kv(k, v, bos, i_h, s0, s_end, H, K, V, BK, BV, BN, MASKED, TMA)
        b_k = b_k.to(DOT_DTYPE)
        b_s, b_k2 = _window_scores(b_q, b_q2, b_k, k2, bos, i_h, s0, s_end, H, K, BK, BK2, BN, MASKED,
                                   DOT_PRECISION, DOT_DTYPE)  # [BM, BN] raw scores
        b_p = tl.exp2(b_s * qk_scale - b_lse[:, None])
        if MASKED:
            b_p = tl.where(_in_band(o_pos, s0 + o_n, W), b_p, 0.)
        b_dp = tl.dot(b_do, tl.trans(b_v.to(DOT_DTYPE)), input_precision=DOT_PRECISION)  # [BM, BN]
        b_ds = (b_p * (b_dp - b_delta[:, None])).to(b_v.dtype).to(DOT_DTYPE)
        b_dq += tl.dot(b_ds, b_k, input_precision=DOT_PRECISION)
        if BK2 > 0:
            b_dq2 += tl.dot(b_ds, b_k2, input_precision=DOT_PRECISION)
    return b_dq, b_dq2


@triton.jit
def _window_scores(b_q, b_q2, b_k, k2, bos, i_h, s0, s_end, H, K: tl.constexpr, BK: tl.constexpr,
                   BK2: tl.constexpr, BN: tl.constexpr, MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr,
                   DOT_DTYPE: tl.constexpr):
    """Raw scores ``[BM, BN]`` of rows ``b_q`` against the key tile ``b_k`` ``[BN, BK]`` (in
    DOT_DTYPE) of keys ``s0 ..``, and the keys' second head-column tile ``[BN, BK2]`` (BK2 > 0:
    columns ``BK ..`` through the pointer k2, scored against b_q2; else b_k, unused)."""
    b_s = tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PRECISION)
    if BK2 > 0:
        b_k2 = _window_k_cols(k2, bos, i_h, s0, s_end, H, K, BK, BK2, BN, MASKED).to(DOT_DTYPE)
        b_s += tl.dot(b_q2, tl.trans(b_k2), input_precision=DOT_PRECISION)
    else:
        b_k2 = b_k
    return b_s, b_k2


@triton.jit
def _window_k_cols(k, bos, i_h, s0, s_end, H, K: tl.constexpr, D0: tl.constexpr, BD: tl.constexpr,
                   BN: tl.constexpr, MASKED: tl.constexpr):
    """Head columns ``D0 .. D0 + BD - 1`` of keys ``s0 .. s0 + BN - 1`` of KV head i_h (zeros past K
    and, MASKED, at keys >= s_end): the second tile of a split head dim."""
    o_s = s0 + tl.arange(0, BN)
    o_d = D0 + tl.arange(0, BD)
    m = (o_d < K)[None, :]
    if MASKED:
        m = m & (o_s < s_end)[:, None]
    return tl.load(k + ((bos + o_s) * H + i_h)[:, None] * K + o_d[None, :], mask=m, other=0.)


@triton.jit(do_not_specialize=["T", "W", "q_offset"])
def window_bwd_dq_kernel(
    q, k, v, o, lse, do, delta, dq, dq_a, dq_b, cu_seqlens, cu_seqlens_k, chunk_indices, scale, T, W, q_offset,
    HQ, H, G: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, BT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    IS_VARLEN: tl.constexpr, HAS_DELTA: tl.constexpr, N_ADD: tl.constexpr, DOT_PRECISION: tl.constexpr,
    DOT_DTYPE: tl.constexpr, ONE_LOOP: tl.constexpr = False, TMA: tl.constexpr = False, BK2: tl.constexpr = 0,
):
    """dq ``[N, HQ, K]`` for one query tile of BT positions x G heads; the same band walk as the
    forward. delta ``[N, HQ]`` = rowsum(do * o) (float32) is an input when HAS_DELTA, else
    computed and stored here. N_ADD (0, 1 or 2) of the gradients dq_a, dq_b (``[N, HQ, K]``
    each: NSA's other branches) are added in float32 before the one rounding to dq's dtype.
    ONE_LOOP, TMA, BK2 (q . k and dQ over two head-column tiles), sequences and q_offset: as in
    :func:`window_fwd_kernel`."""
    i_t, i_h = tl.program_id(0), tl.program_id(1)
    i_c, bos, seq_len, off, boq = _tile_position(i_t, cu_seqlens, cu_seqlens_k, chunk_indices, T, q_offset, BT,
                                                 IS_VARLEN, False)
    t0 = off + i_c * BT
    t1 = tl.minimum(t0 + BT, seq_len) - 1

    o_r = tl.arange(0, BM)
    m_r = (o_r < BT * G) & (t0 + o_r // G <= t1)
    o_pos = tl.minimum(t0 + o_r // G, t1)
    o_row = (boq + o_pos) * HQ + i_h * G + o_r % G
    o_k = tl.arange(0, BK)
    o_v = tl.arange(0, BV)
    m_v = (o_v < V)[None, :]
    b_q = tl.load(q + o_row[:, None] * K + o_k[None, :], mask=(o_k < K)[None, :], other=0.).to(DOT_DTYPE)
    # the second head-column tile (a 16-column placeholder, never read, without one)
    o_k2 = BK + tl.arange(0, BK2 if BK2 > 0 else 16)
    if BK2 > 0:
        b_q2 = tl.load(q + o_row[:, None] * K + o_k2[None, :], mask=(o_k2 < K)[None, :], other=0.).to(DOT_DTYPE)
    else:
        b_q2 = b_q  # unused
    b_do = tl.load(do + o_row[:, None] * V + o_v[None, :], mask=m_v, other=0.)
    if HAS_DELTA:
        b_delta = tl.load(delta + o_row, mask=m_r, other=0.)
    else:
        b_o = tl.load(o + o_row[:, None] * V + o_v[None, :], mask=m_v, other=0.)
        b_delta = tl.sum(b_o.to(tl.float32) * b_do.to(tl.float32), 1)  # [BM]
        tl.store(delta + o_row, b_delta, mask=m_r)
    b_do = b_do.to(DOT_DTYPE)
    b_lse = tl.load(lse + o_row)
    b_dq = tl.zeros([BM, BK], dtype=tl.float32)
    b_dq2 = tl.zeros([BM, BK2 if BK2 > 0 else 16], dtype=tl.float32)

    qk_scale = scale * 1.4426950408889634
    s_lo, s_mid, s_top, s_end = _key_band(t0, t1, W, BN)
    k2 = k
    k, v = _window_descriptors(k, v, bos, i_h, s_end, H, K, V, BK, BV, BN, TMA)
    if ONE_LOOP:
        b_dq, b_dq2 = _window_bwd_dq_tiles(b_q, b_q2, b_do, b_lse, b_delta, b_dq, b_dq2, k, v, k2, bos, i_h, o_pos,
                                           s_lo, s_end, s_end, W, qk_scale, H, K, V, BK, BK2, BV, BN, True, TMA,
                                           DOT_PRECISION, DOT_DTYPE)
    else:
        b_dq, b_dq2 = _window_bwd_dq_tiles(b_q, b_q2, b_do, b_lse, b_delta, b_dq, b_dq2, k, v, k2, bos, i_h, o_pos,
                                           s_lo, tl.minimum(s_mid, s_end), s_end, W, qk_scale, H, K, V, BK, BK2, BV,
                                           BN, True, TMA, DOT_PRECISION, DOT_DTYPE)
        b_dq, b_dq2 = _window_bwd_dq_tiles(b_q, b_q2, b_do, b_lse, b_delta, b_dq, b_dq2, k, v, k2, bos, i_h, o_pos,
                                           s_mid, s_top, s_end, W, qk_scale, H, K, V, BK, BK2, BV, BN, False, TMA,
                                           DOT_PRECISION, DOT_DTYPE)
        b_dq, b_dq2 = _window_bwd_dq_tiles(b_q, b_q2, b_do, b_lse, b_delta, b_dq, b_dq2, k, v, k2, bos, i_h, o_pos,
                                           s_top, s_end, s_end, W, qk_scale, H, K, V, BK, BK2, BV, BN, True, TMA,
                                           DOT_PRECISION, DOT_DTYPE)
    _store_dq(dq, dq_a, dq_b, b_dq * scale, o_row, m_r, o_k, K, N_ADD)
    if BK2 > 0:
        _store_dq(dq, dq_a, dq_b, b_dq2 * scale, o_row, m_r, o_k2, K, N_ADD)


@triton.jit
def _store_dq(dq, dq_a, dq_b, b_dq, o_row, m_r, o_k, K: tl.constexpr, N_ADD: tl.constexpr):
    """Stores head columns ``o_k`` of dq rows ``o_row`` (valid ``m_r``), after adding N_ADD of the
    gradients dq_a, dq_b in float32 (one rounding)."""
    m_dq = m_r[:, None] & (o_k < K)[None, :]
    if N_ADD >= 1:
        b_dq += tl.load(dq_a + o_row[:, None] * K + o_k[None, :], mask=m_dq, other=0.).to(tl.float32)
    if N_ADD >= 2:
        b_dq += tl.load(dq_b + o_row[:, None] * K + o_k[None, :], mask=m_dq, other=0.).to(tl.float32)
    tl.store(dq + o_row[:, None] * K + o_k[None, :], b_dq.to(dq.dtype.element_ty), mask=m_dq)


@triton.jit
def _window_dkv_step(
    b_k, b_k2, b_v, b_dk, b_dk2, b_dv, q, do, lse, delta, boq, seq_len, i_h, o_s, p0, W, qk_scale,
    HQ, G: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BK2: tl.constexpr, BV: tl.constexpr,
    BT: tl.constexpr, BM: tl.constexpr, MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_DTYPE: tl.constexpr,
):
    """dK (unscaled) and dV of the key tile from the BT positions ``p0 ..`` (queries: p0 >= the
    sequence's query offset; ``boq`` the query row of position 0) x G heads. MASKED applies the
    band mask; else every (key, valid row) pair is visible. BK2 > 0: b_k2 / b_dk2 are the head
    columns ``BK ..`` (a second tile)."""
    o_r = tl.arange(0, BM)
    o_k = tl.arange(0, BK)
    o_v = tl.arange(0, BV)
    o_p = p0 + o_r // G  # [BM] query position of each row
    m_r = (o_r < BT * G) & (o_p < seq_len)
    # padding rows read a valid row; their lse = +inf makes p = 0, so they add nothing
    o_row = (boq + tl.minimum(o_p, seq_len - 1)) * HQ + i_h * G + o_r % G  # [BM] int64
    b_q = tl.load(q + o_row[:, None] * K + o_k[None, :], mask=(o_k < K)[None, :], other=0.).to(DOT_DTYPE)
    b_do = tl.load(do + o_row[:, None] * V + o_v[None, :], mask=(o_v < V)[None, :], other=0.).to(DOT_DTYPE)
    b_lse = tl.load(lse + o_row, mask=m_r, other=float("inf"))
    b_delta = tl.load(delta + o_row, mask=m_r, other=0.)
    b_st = tl.dot(b_k, tl.trans(b_q), input_precision=DOT_PRECISION)  # [BN, BM] raw scores
    if BK2 > 0:
        o_k2 = BK + tl.arange(0, BK2)
        b_q2 = tl.load(q + o_row[:, None] * K + o_k2[None, :], mask=(o_k2 < K)[None, :], other=0.).to(DOT_DTYPE)
        b_st += tl.dot(b_k2, tl.trans(b_q2), input_precision=DOT_PRECISION)
    else:
        b_q2 = b_q  # unused
    b_pt = tl.exp2(b_st * qk_scale - b_lse[None, :])
    if MASKED:
        b_pt = tl.where(tl.trans(_in_band(o_p, o_s, W)), b_pt, 0.)
    b_dv += tl.dot(b_pt.to(do.dtype.element_ty).to(DOT_DTYPE), b_do, input_precision=DOT_PRECISION)
    b_dpt = tl.dot(b_v, tl.trans(b_do), input_precision=DOT_PRECISION)  # [BN, BM]
    b_dst = (b_pt * (b_dpt - b_delta[None, :])).to(q.dtype.element_ty).to(DOT_DTYPE)
    b_dk += tl.dot(b_dst, b_q, input_precision=DOT_PRECISION)
    if BK2 > 0:
        b_dk2 += tl.dot(b_dst, b_q2, input_precision=DOT_PRECISION)
    return b_dk, b_dk2, b_dv


@triton.jit
def _window_bwd_dkv_tiles(
    b_k, b_k2, b_v, b_dk, b_dk2, b_dv, q, do, lse, delta, boq, seq_len, i_h, o_s, p_lo, p_hi, W, qk_scale,
    HQ, G: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BK2: tl.constexpr, BV: tl.constexpr,
    BT: tl.constexpr, BM: tl.constexpr, MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_DTYPE: tl.constexpr,
):
    """:func:`_window_dkv_step` over the query steps ``p_lo, p_lo + BT, ... < p_hi``."""
    for p0 in range(p_lo, p_hi, BT):
        b_dk, b_dk2, b_dv = _window_dkv_step(b_k, b_k2, b_v, b_dk, b_dk2, b_dv, q, do, lse, delta, boq, seq_len, i_h,
                                             o_s, p0, W, qk_scale, HQ, G, K, V, BK, BK2, BV, BT, BM, MASKED,
                                             DOT_PRECISION, DOT_DTYPE)
    return b_dk, b_dk2, b_dv


@triton.jit(do_not_specialize=["T", "W", "q_offset"])
def window_bwd_dkv_kernel(
    q, k, v, lse, do, delta, dk, dv, cu_seqlens, cu_seqlens_k, chunk_indices, scale, T, W, q_offset,
    HQ, H, G: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, BN: tl.constexpr, BM: tl.constexpr,
    IS_VARLEN: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_DTYPE: tl.constexpr, ROTATE: tl.constexpr = False,
    BK2: tl.constexpr = 0,
):
    """dk ``[NK, H, K]``, dv ``[NK, H, V]`` for one tile of BN keys of KV head i_h, from the
    queries at positions ``[s, s + W - 1]`` (and ``>= off``: keys that no query sees get zeros) of
    its G heads, BM rows (BM // G positions x G heads) per step. ROTATE: one masked loop whose
    start depends on the tile (see the code), else three phases. BK2 > 0: q . k and dK over the
    head columns as two tiles, ``0 .. BK-1`` and ``BK .. BK+BK2-1``. Sequences and q_offset: as in
    :func:`window_fwd_kernel` (tiles of keys here)."""
    BT: tl.constexpr = BM // G
    i_t, i_h = tl.program_id(0), tl.program_id(1)
    i_c, bos, seq_len, off, boq = _tile_position(i_t, cu_seqlens, cu_seqlens_k, chunk_indices, T, q_offset, BN,
                                                 IS_VARLEN, True)
    s0 = i_c * BN
    s1 = tl.minimum(s0 + BN, seq_len) - 1  # last key of the tile

    o_s = s0 + tl.arange(0, BN)
    o_k = tl.arange(0, BK)
    o_v = tl.arange(0, BV)
    m_k = (o_s <= s1)[:, None] & (o_k < K)[None, :]
    m_v = (o_s <= s1)[:, None] & (o_v < V)[None, :]
    p_kv = (bos + o_s) * H + i_h  # [BN] int64
    b_k = tl.load(k + p_kv[:, None] * K + o_k[None, :], mask=m_k, other=0.).to(DOT_DTYPE)
    b_v = tl.load(v + p_kv[:, None] * V + o_v[None, :], mask=m_v, other=0.).to(DOT_DTYPE)
    b_dk = tl.zeros([BN, BK], dtype=tl.float32)
    b_dv = tl.zeros([BN, BV], dtype=tl.float32)
    # the second head-column tile (a 16-column placeholder, never read, without one)
    o_k2 = BK + tl.arange(0, BK2 if BK2 > 0 else 16)
    m_k2 = (o_s <= s1)[:, None] & (o_k2 < K)[None, :]
    if BK2 > 0:
        b_k2 = tl.load(k + p_kv[:, None] * K + o_k2[None, :], mask=m_k2, other=0.).to(DOT_DTYPE)
    else:
        b_k2 = b_k  # unused
    b_dk2 = tl.zeros([BN, BK2 if BK2 > 0 else 16], dtype=tl.float32)

    qk_scale = scale * 1.4426950408889634
    # queries [p_lo, p_end): those < s1 are cut by the diagonal for some keys, those >= s0 + W by
    # the window; a tile past its sequence's end (s1 < s0), or before the first query's window
    # (s1 + W <= off), gets no queries
    p_lo = tl.maximum(s0, off)
    p_end = tl.minimum(s1 + W, seq_len)
    if ROTATE:
        # one masked loop over the positions [p_lo, p_lo + L), started at the one congruent to 0
        # mod L and wrapped: the programs of neighbouring key tiles, which run at the same time,
        # then read each position they share in the same step (L2 hits instead of DRAM re-reads)
        L = tl.cdiv(tl.maximum(p_end - p_lo, 0), BT) * BT
        r = (L - p_lo % tl.maximum(L, 1)) % tl.maximum(L, 1) // BT * BT  # steps stay BT apart: every position once
        for j in range(0, L, BT):
            p0 = p_lo + (r + j) % L
            b_dk, b_dk2, b_dv = _window_dkv_step(b_k, b_k2, b_v, b_dk, b_dk2, b_dv, q, do, lse, delta, boq, seq_len,
                                                 i_h, o_s, p0, W, qk_scale, HQ, G, K, V, BK, BK2, BV, BT, BM, True,
                                                 DOT_PRECISION, DOT_DTYPE)
    else:
        p_mid = p_lo + tl.cdiv(tl.maximum(s1 - p_lo, 0), BT) * BT
        p_top = p_mid + (tl.maximum(tl.minimum(s0 + W, seq_len) - p_mid, 0) // BT) * BT
        b_dk, b_dk2, b_dv = _window_bwd_dkv_tiles(b_k, b_k2, b_v, b_dk, b_dk2, b_dv, q, do, lse, delta, boq, seq_len,
                                                  i_h, o_s, p_lo, tl.minimum(p_mid, p_end), W, qk_scale, HQ, G, K, V,
                                                  BK, BK2, BV, BT, BM, True, DOT_PRECISION, DOT_DTYPE)
        b_dk, b_dk2, b_dv = _window_bwd_dkv_tiles(b_k, b_k2, b_v, b_dk, b_dk2, b_dv, q, do, lse, delta, boq, seq_len,
                                                  i_h, o_s, p_mid, p_top, W, qk_scale, HQ, G, K, V, BK, BK2, BV, BT,
                                                  BM, False, DOT_PRECISION, DOT_DTYPE)
        b_dk, b_dk2, b_dv = _window_bwd_dkv_tiles(b_k, b_k2, b_v, b_dk, b_dk2, b_dv, q, do, lse, delta, boq, seq_len,
                                                  i_h, o_s, p_top, p_end, W, qk_scale, HQ, G, K, V, BK, BK2, BV, BT,
                                                  BM, True, DOT_PRECISION, DOT_DTYPE)
    tl.store(dk + p_kv[:, None] * K + o_k[None, :], (b_dk * scale).to(dk.dtype.element_ty), mask=m_k)
    if BK2 > 0:
        tl.store(dk + p_kv[:, None] * K + o_k2[None, :], (b_dk2 * scale).to(dk.dtype.element_ty), mask=m_k2)
    tl.store(dv + p_kv[:, None] * V + o_v[None, :], b_dv.to(dv.dtype.element_ty), mask=m_v)


_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def _dot_args(dtype: torch.dtype) -> dict:
    """Matmul operand dtype and precision. float32 inputs must match the float32 reference: no
    TF32. The interpreter multiplies bfloat16 operands as raw 16-bit integers, so there operands
    go through float32 (products of bf16/fp16 values are exact in float32, as on tensor cores)."""
    return dict(DOT_PRECISION="ieee" if dtype == torch.float32 else "tf32",
                DOT_DTYPE=tl.float32 if interpreting() else _TL_DTYPES[dtype])


def _q_config(G: int, BK: int, BV: int, dtype: torch.dtype, forward: bool = False, config: dict | None = None
              ) -> dict:
    """Launch config of the forward and dQ kernels: BM rows = BT positions x G heads (a power of
    two), BN keys per step, ONE_LOOP / TMA (see :func:`window_fwd_kernel`). Hopper-oriented; fp32
    (IEEE products, no tensor cores) and wide heads take smaller tiles to stay within shared memory
    and registers. ``config`` (benchmark sweeps): keys rows, BN, num_warps, num_stages, one_loop,
    tma override the default's."""
    # sizes checked against sm_90 register and shared-memory use (ptxas, no spills for 16-bit
    # inputs with heads <= 128; IEEE fp32 products take registers, hence its small tiles)
    one_loop, tma = False, False
    if interpreting():  # programs run one by one on the CPU: few, small steps; the GPU's paths
        rows, BN, warps, stages, one_loop, tma = 32, 16, 4, 1, True, True
    elif dtype == torch.float32:
        rows, BN, warps, stages = 16, 32, 4, 2
    elif max(BK, BV) <= 128:
        # H200 sweeps at 64k (benchmarks/bench_window.py), run14 2026-11-29: forward 3.23 ms with
        # 32-key steps in one loop and TMA loads (64-key steps in three phases: 3.57; 8 warps or 256
        # rows: 3.6-4.9); dQ 10.25 ms whole backward with one loop, TMA, 3 stages (10.48; 4 warps: 16.8)
        if forward:
            rows, BN, warps, stages, one_loop, tma = 128, 32, 4, 3, True, True
        else:
            rows, BN, warps, stages, one_loop, tma = 128, 64, 8, 3, True, True
    else:
        rows, BN, warps, stages = 64, 32, 4, 2
    if config:
        rows, BN = config.get("rows", rows), config.get("BN", BN)
        warps, stages = config.get("num_warps", warps), config.get("num_stages", stages)
        one_loop, tma = config.get("one_loop", one_loop), config.get("tma", tma)
    BM = max(rows, triton.next_power_of_2(G))
    return dict(BT=BM // G, BM=BM, BN=BN, num_warps=warps, num_stages=stages, ONE_LOOP=one_loop, TMA=tma)


def _kv_config(G: int, BK: int, BV: int, dtype: torch.dtype, config: dict | None = None) -> dict:
    """Launch config of the dK/dV kernel: BN keys per program (their dK and dV accumulate in
    registers), BM rows = BM // G positions x G heads per step, ROTATE (see
    :func:`window_bwd_dkv_kernel`). ``config``: keys BN, rows, num_warps, num_stages, rotate
    override the default's."""
    rotate = False
    if interpreting():
        BN, rows, warps, stages, rotate = 16, 32, 4, 1, True
    elif dtype == torch.float32:
        BN, rows, warps, stages = 16, 16, 4, 2
    elif max(BK, BV) <= 128:
        # H200 sweeps at 64k: 2026-11-28 whole backward 10.6 ms (64/64/8/2: 16.5 ms); run14
        # 2026-11-29 rotated walk 10.08 ms against 10.47 (ncu run13: 3.5-4% L2 hits without it)
        BN, rows, warps, stages, rotate = 128, 64, 8, 3, True
    else:
        BN, rows, warps, stages = 32, 64, 8, 2
    if config:
        BN, rows = config.get("BN", BN), config.get("rows", rows)
        warps, stages = config.get("num_warps", warps), config.get("num_stages", stages)
        rotate = config.get("rotate", rotate)
    return dict(BN=BN, BM=max(rows, triton.next_power_of_2(G)), num_warps=warps, num_stages=stages, ROTATE=rotate)


def _tiles(cu_seqlens, B: int, T: int, chunk: int, device):
    """(number of programs, chunk table) for tiles of ``chunk`` positions, without host sync.

    Dense input needs no table: the kernels derive the sequence from the program index (a
    one-element placeholder keeps the pointer valid). Packed input: int32 ``[n, 2]`` rows of
    (sequence, chunk within the sequence) built on the device, with ``n = T // chunk + num_seqs``
    a bound the host knows (each sequence adds at most one partial chunk); the rows past the last
    real chunk name chunks past the end of the last sequence, and their programs do nothing.
    """
    if cu_seqlens is None:
        return B * triton.cdiv(T, chunk), torch.empty(1, dtype=torch.int32, device=device)
    num_seqs = cu_seqlens.numel() - 1
    lens = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    n_chunks = torch.div(lens + chunk - 1, chunk, rounding_mode="floor")
    end = torch.cumsum(n_chunks, 0)
    rows = torch.arange(T // chunk + num_seqs, device=device)
    seq = torch.clamp(torch.searchsorted(end, rows, right=True), max=num_seqs - 1)
    table = torch.stack([seq, rows - (end - n_chunks)[seq]], 1).to(torch.int32)
    return table.shape[0], table


def _seq_args(cu_seqlens, cu_seqlens_k, table):
    """The kernels' (cu_seqlens, cu_seqlens_k) arguments: the packed queries' and keys' offsets
    (keys None: the queries'), or for dense input the placeholder ``table`` twice."""
    if cu_seqlens is None:
        return table, table
    return cu_seqlens, cu_seqlens if cu_seqlens_k is None else cu_seqlens_k


def _launch_fwd(q, k, v, window_size: int, scale: float, cu_seqlens, config: dict | None = None, gate=None,
                q_offset: int = 0, cu_seqlens_k=None):
    """q ``[B, T, HQ, K]``, k ``[B, TK, H, K]``, v ``[B, TK, H, V]``, contiguous -> o ``[B, T, HQ, V]``,
    lse ``[B, T, HQ]`` float32 (base 2). Dense: ``TK = T + q_offset``, query row t at position
    ``q_offset + t``; packed: queries per ``cu_seqlens``, keys per ``cu_seqlens_k`` (None: the same),
    each sequence's queries at its last positions. ``config``: a tile config override
    (:func:`_q_config`). ``gate``: None, or contiguous ``(o_cmp, o_slc, g_cmp, g_slc, g_win)``
    (NSA's other branch outputs, shaped like o, and its gates, shaped like lse; not float64): then
    also returns NSA's output ``g_cmp * o_cmp + g_slc * o_slc + g_win * o`` in q's dtype."""
    B, T, HQ, K = q.shape
    H, V = k.shape[2], v.shape[3]
    G, BK, BV = HQ // H, pow2(K), pow2(V)
    cfg = _q_config(G, BK, BV, q.dtype, True, config)
    cfg["TMA"] = use_tma(cfg["TMA"], k, v)
    # q . k over a head dim that is not a power of two: two tiles (192 = 128 + 64), not one of 256
    BK, BK2 = triton_utils.head_tiles(K)
    n_tiles, table = _tiles(cu_seqlens, B, T, cfg["BT"], q.device)
    o = new_output((B, T, HQ, V), q.dtype, q.device)
    lse = new_output((B, T, HQ), torch.float32, q.device)
    o_nsa = None if gate is None else new_output((B, T, HQ, V), q.dtype, q.device)
    window_fwd_kernel[(n_tiles, H)](
        q, k, v, o, lse, *(gate if gate is not None else (o, o, lse, lse, lse)), o if o_nsa is None else o_nsa,
        *_seq_args(cu_seqlens, cu_seqlens_k, table), table, scale, T, window_keys(window_size, k.shape[1]), q_offset,
        HQ=HQ, H=H, G=G, K=K, V=V, BK=BK, BK2=BK2, BV=BV, IS_VARLEN=cu_seqlens is not None,
        GATE=gate is not None, **_dot_args(q.dtype), **cfg,
    )
    return (o, lse) if gate is None else (o, lse, o_nsa)


def _launch_bwd(q, k, v, o, lse, do, window_size: int, scale: float, cu_seqlens, delta=None, dq_a=None,
                dq_b=None, dq_config: dict | None = None, dkv_config: dict | None = None, q_offset: int = 0,
                cu_seqlens_k=None):
    """Gradients of :func:`_launch_fwd` (all inputs contiguous): dq, dk, dv shaped like q, k, v;
    keys that no query sees get zero dk, dv. ``delta`` ``[B, T, HQ]`` float32 = rowsum(dO * o),
    when given (:mod:`nsa.ops.fused`), is not recomputed and ``o`` is not read. ``dq_a``, ``dq_b``:
    contiguous gradients shaped like q added to dq (NSA's other branches), or None. ``dq_config``
    / ``dkv_config``: tile config overrides (:func:`_q_config`, :func:`_kv_config`; benchmark
    sweeps). ``q_offset``, ``cu_seqlens_k``: as in :func:`_launch_fwd`."""
    dq_add = [t for t in (dq_a, dq_b) if t is not None]  # N_ADD of them, then placeholders
    B, T, HQ, K = q.shape
    H, V = k.shape[2], v.shape[3]
    G, BK, BV = HQ // H, pow2(K), pow2(V)
    W = window_keys(window_size, k.shape[1])
    common = dict(HQ=HQ, H=H, G=G, K=K, V=V, BK=BK, BV=BV, IS_VARLEN=cu_seqlens is not None,
                  **_dot_args(q.dtype))
    # q . k, dQ and dK over a head dim that is not a power of two: two tiles (192 = 128 + 64), and
    # the tiles of the first one's width (H200 64k, 192/128, run 37, probe widebwd: whole window
    # backward 27.95 ms with one padded tile at its tiles, 25.47 split at those, 15.66 split with
    # the dK/dV tiles of D = 128 (128 keys, 64 rows, 8 warps, 3 stages, rotated walk), 24.88 with
    # its dQ tiles (128 rows, 64 keys, 8 warps, 3 stages, TMA for the first tile))
    split = dict(zip(("BK", "BK2"), triton_utils.head_tiles(K)))

    cfg = _q_config(G, split["BK"], BV, q.dtype, config=dq_config)
    cfg["TMA"] = use_tma(cfg["TMA"], k, v)
    n_tiles, table = _tiles(cu_seqlens, B, T, cfg["BT"], q.device)
    dq = new_output(q.shape, q.dtype, q.device)
    has_delta = delta is not None
    if not has_delta:
        delta = new_output((B, T, HQ), torch.float32, q.device)
    window_bwd_dq_kernel[(n_tiles, H)](
        q, k, v, o, lse, do, delta, dq, *(dq_add + [dq] * (2 - len(dq_add))),
        *_seq_args(cu_seqlens, cu_seqlens_k, table), table, scale, T, W, q_offset,
        HAS_DELTA=has_delta, N_ADD=len(dq_add), **(common | split), **cfg)

    cfg = _kv_config(G, split["BK"], BV, q.dtype, dkv_config)
    # tiles of keys: a packed input's table follows the keys' sequences
    n_tiles, table = _tiles(cu_seqlens if cu_seqlens_k is None else cu_seqlens_k, B, k.shape[1], cfg["BN"],
                            q.device)
    dk = new_output(k.shape, k.dtype, k.device)
    dv = new_output(v.shape, v.dtype, v.device)
    window_bwd_dkv_kernel[(n_tiles, H)](
        q, k, v, lse, do, delta, dk, dv, *_seq_args(cu_seqlens, cu_seqlens_k, table), table, scale, T, W, q_offset,
        **(common | split), **cfg)
    return dq, dk, dv


# The kernels are opaque to torch.compile: custom ops with fake (shape-only) implementations.
@torch.library.custom_op("nsa::sliding_window_attention_fwd", mutates_args=())
def _window_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window_size: int, scale: float,
                   cu_seqlens: torch.Tensor | None, q_offset: int = 0, cu_seqlens_k: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    return _launch_fwd(q.contiguous(), k.contiguous(), v.contiguous(), window_size, scale, cu_seqlens,
                       q_offset=q_offset, cu_seqlens_k=cu_seqlens_k)


@_window_fwd_op.register_fake
def _(q, k, v, window_size, scale, cu_seqlens, q_offset=0, cu_seqlens_k=None):
    B, T, HQ, _ = q.shape
    return q.new_empty(B, T, HQ, v.shape[3]), q.new_empty(B, T, HQ, dtype=torch.float32)


@torch.library.custom_op("nsa::sliding_window_attention_fwd_gated", mutates_args=())
def _window_fwd_gated_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window_size: int, scale: float,
                         cu_seqlens: torch.Tensor | None, o_cmp: torch.Tensor, o_slc: torch.Tensor,
                         g_cmp: torch.Tensor, g_slc: torch.Tensor, g_win: torch.Tensor, q_offset: int = 0,
                         cu_seqlens_k: torch.Tensor | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The window forward with NSA's gate combination in its epilogue (:mod:`nsa.ops.fused`):
    (o_win, lse_win, o). The branch outputs and gates have the queries' rows."""
    gate = tuple(x.contiguous() for x in (o_cmp, o_slc, g_cmp, g_slc, g_win))
    return _launch_fwd(q.contiguous(), k.contiguous(), v.contiguous(), window_size, scale, cu_seqlens, gate=gate,
                       q_offset=q_offset, cu_seqlens_k=cu_seqlens_k)


@_window_fwd_gated_op.register_fake
def _(q, k, v, window_size, scale, cu_seqlens, o_cmp, o_slc, g_cmp, g_slc, g_win, q_offset=0, cu_seqlens_k=None):
    B, T, HQ, _ = q.shape
    return (q.new_empty(B, T, HQ, v.shape[3]), q.new_empty(B, T, HQ, dtype=torch.float32),
            q.new_empty(B, T, HQ, v.shape[3]))


@torch.library.custom_op("nsa::sliding_window_attention_bwd", mutates_args=())
def _window_bwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
                   do: torch.Tensor, window_size: int, scale: float, cu_seqlens: torch.Tensor | None,
                   delta: torch.Tensor | None = None, dq_a: torch.Tensor | None = None,
                   dq_b: torch.Tensor | None = None, q_offset: int = 0, cu_seqlens_k: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _launch_bwd(q.contiguous(), k.contiguous(), v.contiguous(), o.contiguous(), lse.contiguous(),
                       do.contiguous(), window_size, scale, cu_seqlens,
                       delta=None if delta is None else delta.contiguous(),
                       dq_a=None if dq_a is None else dq_a.contiguous(),
                       dq_b=None if dq_b is None else dq_b.contiguous(),
                       q_offset=q_offset, cu_seqlens_k=cu_seqlens_k)


@_window_bwd_op.register_fake
def _(q, k, v, o, lse, do, window_size, scale, cu_seqlens, delta=None, dq_a=None, dq_b=None, q_offset=0,
      cu_seqlens_k=None):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


class SlidingWindowAttentionFunction(torch.autograd.Function):

    @staticmethod
    def forward(ctx, q, k, v, window_size, scale, cu_seqlens, q_offset=0, cu_seqlens_k=None):
        o, lse = _window_fwd_op(q, k, v, window_size, scale, cu_seqlens, q_offset, cu_seqlens_k)
        ctx.save_for_backward(q, k, v, o, lse, cu_seqlens, cu_seqlens_k)
        ctx.window_size, ctx.scale, ctx.q_offset = window_size, scale, q_offset
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, cu_seqlens, cu_seqlens_k = ctx.saved_tensors
        dq, dk, dv = _window_bwd_op(q, k, v, o, lse, do, ctx.window_size, ctx.scale, cu_seqlens,
                                    q_offset=ctx.q_offset, cu_seqlens_k=cu_seqlens_k)
        return dq, dk, dv, None, None, None, None, None


def sliding_window_attention_triton(q, k, v, window_size, scale, cu_seqlens=None, q_offset=0, cu_seqlens_k=None):
    """Triton sliding-window attention; the semantics of :func:`nsa.ops.sliding_window_attention`.

    The query at position ``t`` attends keys ``t - window_size < s <= t`` of its own sequence;
    queries are the last positions of their sequence's keys (right: 3 queries of 5 keys)::

        window_size = 3    keys s ->             q_offset = 2    keys s ->
                      t=0  x . . . .                  row 0, t=2  x x x . .
                      t=1  x x . . .                  row 1, t=3  . x x x .
                      t=2  x x x . .                  row 2, t=4  . . x x x
                      t=3  . x x x .
                      t=4  . . x x x

    Args:
        q: ``[B, T, HQ, Dk]``; k: ``[B, T + q_offset, H, Dk]``; v: ``[B, T + q_offset, H, Dv]``; HQ
            a multiple of H; fp16, bf16 or fp32 (float64 is computed in float32). Validated by the
            caller.
        window_size: int >= 1 (may exceed the keys' length).
        scale: float softmax scale.
        cu_seqlens: int32 ``[N+1]`` offsets of the packed queries (then B = 1), or None.
        q_offset: int >= 0, dense input only: query row t sits at position ``q_offset + t``.
        cu_seqlens_k: int32 ``[N+1]`` offsets of the packed keys (each sequence at least as long
            as its queries, which are its last positions), or None: the same as ``cu_seqlens``.
    Returns:
        o ``[B, T, HQ, Dv]`` in q's dtype; differentiable in q, k and v (keys that no query sees
        get zero gradients).
    """
    if q.dtype == torch.float64:
        o = SlidingWindowAttentionFunction.apply(q.float(), k.float(), v.float(), window_size, scale, cu_seqlens,
                                                 q_offset, cu_seqlens_k)
        return o.double()
    return SlidingWindowAttentionFunction.apply(q, k, v, window_size, scale, cu_seqlens, q_offset, cu_seqlens_k)
