"""Selected attention (NSA's fine branch) in Triton: forward, and a backward without atomics.

Every input is handled as packed ``[1, N, ...]`` tokens with ``cu_seqlens`` (a dense ``[B, T]``
batch is B sequences of T tokens), so one code path serves both layouts.

Forward and dQ are query-centric. A program owns one query tile: ``BT`` consecutive positions
of one sequence times the ``G`` query heads of one KV head, flattened to ``BT * G`` rows (row
``r`` = position ``r // G``, head ``r % G``), padded to a power of two ``BR >= 16`` so that the
score products run on tensor cores even for small groups (G = 1 .. 8). The program walks the
union of the blocks its positions selected: it visits the position-ordered block lists and
skips a block that an earlier position of the tile already listed, so each block is loaded
once per tile and scored for all rows at once; rows whose position did not select it are
masked out. Online softmax in float32; the forward also writes the log-sum-exp per row.

For groups of 9 or more heads (one position fills a tile) the forward plans programs of
``FWD_SHARE`` consecutive positions: a plan kernel puts the blocks that all of them list first in
each list; ``selected_fwd_common_kernel`` loads those once for all positions and parks the rows'
state in the outputs; then ``selected_fwd_planned_kernel``, one position per program, walks the
rest of each list. Random selections share NSA's forced blocks only (3 of 16 at the paper's
settings: as fast as one position per program), neighbouring queries that agree share more.
The dQ gather does the same with ``DQ_SHARE`` positions (``selected_bwd_dq_common_kernel``, its
partial parked in dq, then ``selected_bwd_dq_planned_kernel``).

dK/dV are KV-block-centric through a reverse index: for each (KV head, block) the ascending
list of query positions that selected it and can see at least one of its keys, built on the
device with a stable sort. No host synchronization anywhere (grids are sized by bounds the host
knows; surplus programs do nothing). A program owns one (block, KV head),
walks its list in chunks of queries x G heads, and accumulates dK/dV in registers; it writes
them once. Lists longer than ``KV_SEGMENT`` (the first block's list spans the whole sequence)
are cut into segments walked by separate programs, whose float32 partials a second kernel sums
in segment order. No float atomics: the backward is bitwise deterministic.

Queries may start later than their keys (``q_offset`` / ``cu_seqlens_k``: a sequence's queries
are the last of its positions, as in flash-attn's varlen convention). Query-side tensors (q, o,
lse, dq, block lists, the tile and plan tables, the reverse index's entries) keep the queries'
rows; keys are read and dK/dV written at the keys' rows (``cu_seqlens_k``); every visibility rule
compares key positions with the query's position, its row plus the sequence's offset
``len_k - len_q``. Without an offset the keys' cu_seqlens is the queries' and the offset is 0.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from . import triton_utils
from .compressed import compressed_bwd_preprocess_kernel
from .triton_utils import dot, dot_args, kv_descriptors, pow2, softmax_step, tma_ok, use_tma
from .utils import interpreting, new_output, uniform_cu_seqlens

# Rows (positions x heads) per query tile in the forward/dQ kernels, and per query chunk in
# the dK/dV kernel. 16 is the smallest tensor-core tile height; a larger forward tile shares
# each loaded block among more positions but also scores it for more rows that did not select it.
FWD_ROWS = 16
BWD_ROWS = 64
# Longest stretch of a block's query list that one dK/dV program walks. Every query selects the
# first block, so its list is as long as the sequence; longer lists are cut into segments whose
# partial sums a second kernel adds up in a fixed order (deterministic, no atomics).
KV_SEGMENT = 4096
# Forward algorithm: "gather" (query-centric: each query tile loads the blocks it selected),
# "scatter" (KV-block-centric: each block loads once and serves every query that selected it,
# then a merge), or "auto" (on GPUs, gather when a tile holds one position, G >= 16, and scatter
# for smaller groups; gather on the CPU; see benchmarks/NOTES.md for the measurements).
FWD_MODE = "auto"
# dQ algorithm: "gather" (query-centric, like the forward's gather), "scatter" (KV-block-centric:
# per-slot float32 partials, summed in slot order) or "auto" (the forward's rule: on GPUs, gather
# for G >= 16 and scatter for smaller groups; gather on the CPU; benchmarks/NOTES.md).
DQ_MODE = "auto"
# Pipeline depth of the forward/dQ block loop when a tile holds one position (G >= 16).
GATHER_STAGES = 2  # H200 64k, G=16, dQ: 18.4 ms (1 stage: 27.9, 3 stages: 19.1)
# K/V loads of the gather forward with one position per tile (G >= 16) through TMA (on-device
# tensor descriptors) instead of masked pointer loads: "auto" or True (where triton_utils.tma_ok
# allows it: fp16/bf16, 16-byte aligned k and v whose head rows are multiples of 16 bytes, on
# CUDA devices of compute capability >= 9, under the interpreter and in the sm_90 compile
# audit) or False. H200 2026-11-29 (run7, probe.py --parts slctma), 64k, G=16: 16.2 ms against
# 17.3 with pointer loads (BK 64, 4 warps, 2 stages; 3 stages 16.5, 8 warps or BK 32 slower on
# both paths).
FWD_TMA = "auto"
# Positions per program of the gather forward's plan when one position fills a tile (G >= 9):
# blocks that all of them list (NSA's forced initial and local blocks, and what neighbouring
# queries agree on) are loaded once for all of them (selected_fwd_common_kernel, 4 warps), each
# position's other blocks by one program per position. A power of two; 1 turns it off. Capped so
# that the common kernel's rows times the padded head width stay <= 64 x 128. H200 64k, G=16
# (run 30, probe.py --parts share; aligned runs of 4 positions sharing k of their 16 blocks):
# 16.41 ms on the benchmark's random selections (k = 3: NSA's forced blocks) against 16.40 with
# one position per program, 15.80 at k = 4 (16.36), 13.36 at 8 (16.32), 11.16 at 12 (16.34), 8.85
# at 16 (16.29); the common kernel on 8 warps: 17.5-19.6. Where nothing goes through the common
# kernel, the plan and the resume cost ~0.3 ms (16.71, sharing only from 17 blocks up; 16.67
# from 4 up on the benchmark). The shared kernel of run 22 (a program of 4
# positions also walked their own blocks, its 64-row state held across: 235 registers), removed
# since, took 15.00 at k = 10, 13.09 at 12, 9.17 at 16, 21.4 at k = 3.
FWD_SHARE = 4
# Positions per program of the dQ gather when one position fills a tile (G >= 9), as FWD_SHARE:
# the blocks that all of them list go through selected_bwd_dq_common_kernel (their keys up to the
# program's first position, for all its rows in one product), the rest through one program per
# position (selected_bwd_dq_planned_kernel). A power of two; 1 turns it off.
DQ_SHARE = 4
# Scatter forward: rows (queries x G heads) per tile, rows per program (a long query list is
# split over several programs), and the memory bound of its per-slot partials.
SCATTER_TILE_ROWS = 64
SCATTER_ROWS = 4096
PARTIAL_BYTES = 1 << 30


@triton.jit
def _program_chunk(chunk_indices, cu_seqlens, cu_seqlens_k):
    """(KV head, chunk within its sequence, first query row, number of queries, first key row,
    query offset) of program ``(chunk row, KV head)`` of a kernel launched over a
    :func:`_chunk_table` of the queries: the sequence's query row t has position t + offset.
    cu_seqlens_k None: keys packed as the queries, offset 0 (today's code, compiled as such)."""
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    i_n = tl.load(chunk_indices + i_c * 2).to(tl.int64)
    i_tc = tl.load(chunk_indices + i_c * 2 + 1).to(tl.int64)
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    seq_len = tl.load(cu_seqlens + i_n + 1).to(tl.int64) - bos
    bos_k = bos
    off = 0
    if cu_seqlens_k is not None:
        bos_k = tl.load(cu_seqlens_k + i_n).to(tl.int64)
        off = tl.load(cu_seqlens_k + i_n + 1).to(tl.int64) - bos_k - seq_len
    return i_h, i_tc, bos, seq_len, bos_k, off


@triton.jit
def _scatter_segment(i_seg, seg_bucket, seg_first, offsets, block_table, cu_seqlens, cu_seqlens_k, key0, NBT,
                     SEG: tl.constexpr):
    """(KV head, block within its sequence, first key row, number of keys, shift, first entry, end
    entry) of segment ``i_seg`` of the chunked reverse index (see
    :func:`selected_fwd_scatter_kernel`). A packed query row plus ``shift`` is the packed key row
    of its position (sequences end together: ``cu_seqlens_k[n + 1] - cu_seqlens[n + 1]``; 0 where
    cu_seqlens_k is None, keys packed as the queries)."""
    i_key = tl.load(seg_bucket + i_seg).to(tl.int64)
    i_h = (i_key - key0) // NBT
    i_blk = (i_key - key0) % NBT
    i_n = tl.load(block_table + i_blk * 2).to(tl.int64)
    i_j = tl.load(block_table + i_blk * 2 + 1).to(tl.int64)
    shift = 0
    if cu_seqlens_k is None:
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    else:
        bos = tl.load(cu_seqlens_k + i_n).to(tl.int64)
        eos = tl.load(cu_seqlens_k + i_n + 1).to(tl.int64)
        shift = eos - tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    start = tl.load(offsets + i_key) + (i_seg - tl.load(seg_first + i_key)) * SEG
    end = tl.minimum(tl.load(offsets + i_key + 1), start + SEG)
    return i_h, i_j, bos, eos - bos, shift, start, end


@triton.jit
def _scatter_rows(entries, i0, end, i_h, HQ: tl.constexpr, H: tl.constexpr, G: tl.constexpr, S: tl.constexpr,
                  BQ: tl.constexpr, BR: tl.constexpr):
    """Rows of one step of a scatter kernel's walk: entries ``i0 .. i0 + BQ - 1`` (before ``end``)
    times the G heads of KV head ``i_h``. Returns the row mask, packed query rows, slots, q/o rows."""
    o_r = tl.arange(0, BR)
    i_e = i0 + o_r // G
    m_r = (o_r < BQ * G) & (i_e < end)
    e = tl.load(entries + i_e, mask=m_r, other=0).to(tl.int64)
    i_t = e // (H * S)
    return m_r, i_t, e % S, i_t * HQ + i_h * G + o_r % G


@triton.jit
def _block_kv(k, v, bos, i_j, i_ks, i_h, seq_len, H: tl.constexpr, BS: tl.constexpr, BK: tl.constexpr,
              DK: tl.constexpr, DV: tl.constexpr, BDK: tl.constexpr, BDV: tl.constexpr):
    """Sub-tile ``i_ks`` (BK keys) of block ``i_j`` of the sequence whose ``seq_len`` keys start at
    packed row ``bos``: packed key rows, their mask, K ``[BK, BDK]`` and V ``[BK, BDV]``."""
    o_k = tl.arange(0, BK)
    o_dk = tl.arange(0, BDK)
    o_dv = tl.arange(0, BDV)
    i_k = bos + i_j * BS + i_ks * BK + o_k
    m_k = (i_ks * BK + o_k < BS) & (i_j * BS + i_ks * BK + o_k < seq_len)
    b_k = tl.load(k + (i_k * H + i_h)[:, None] * DK + o_dk[None, :], mask=m_k[:, None] & (o_dk < DK)[None, :],
                  other=0.)
    b_v = tl.load(v + (i_k * H + i_h)[:, None] * DV + o_dv[None, :], mask=m_k[:, None] & (o_dv < DV)[None, :],
                  other=0.)
    return i_k, m_k, b_k, b_v


@triton.jit
def _listed_block_kv(k, v, i_b, i_ks, bos, t_last, i_h, H: tl.constexpr, BS: tl.constexpr, BK: tl.constexpr,
                     DK: tl.constexpr, DV: tl.constexpr, BDK: tl.constexpr, BDV: tl.constexpr):
    """Sub-tile ``i_ks`` of listed block ``i_b`` (-1: nothing) for a tile whose last position is
    ``t_last``, in the sequence whose keys start at packed row ``bos``: key positions in the
    sequence, their mask, K ``[BK, BDK]`` and V ``[BK, BDV]``."""
    o_k = tl.arange(0, BK)
    o_dk = tl.arange(0, BDK)
    o_dv = tl.arange(0, BDV)
    # as a [BK] vector: the interpreter turns (scalar & vector comparison) into integers
    b_b = tl.zeros([BK], dtype=tl.int64) + i_b
    i_k = b_b * BS + i_ks * BK + o_k
    m_k = (b_b >= 0) & (i_ks * BK + o_k < BS) & (i_k <= t_last)
    o_kv = (bos + i_k) * H + i_h
    b_k = tl.load(k + o_kv[:, None] * DK + o_dk[None, :], mask=m_k[:, None] & (o_dk < DK)[None, :], other=0.)
    b_v = tl.load(v + o_kv[:, None] * DV + o_dv[None, :], mask=m_k[:, None] & (o_dv < DV)[None, :], other=0.)
    return i_k, m_k, b_k, b_v


@triton.jit
def _listed_block_kv_tma(k_desc, v_desc, i_b, i_ks: tl.constexpr, t_last, n_key, BS: tl.constexpr,
                         BK: tl.constexpr):
    """:func:`_listed_block_kv` through tensor descriptors over the keys ``0 .. n_key - 1`` of the
    sequence (one KV head; ``n_key = t_last + 1`` for a real query position): TMA zero-fills the
    rows at or past ``n_key`` (future keys, other sequences) and the columns past DK / DV, which
    is what the masked pointer loads give. A -1 entry loads at row ``n_key``: entirely out of
    bounds, all zeros. Only a last sub-tile that runs past the block (BS not a multiple of BK)
    reads real rows of the next block: its V rows are zeroed here (0 * inf would be NaN)."""
    o_k = tl.arange(0, BK)
    b_b = tl.zeros([BK], dtype=tl.int64) + i_b
    i_k = b_b * BS + i_ks * BK + o_k
    m_k = (b_b >= 0) & (i_ks * BK + o_k < BS) & (i_k <= t_last)
    row = tl.where(i_b >= 0, i_b * BS + i_ks * BK, n_key).to(tl.int32)
    b_k = k_desc.load([row, 0])
    b_v = v_desc.load([row, 0])
    if (i_ks + 1) * BK > BS:
        b_v = tl.where(m_k[:, None], b_v, 0.)
    return i_k, m_k, b_k, b_v


@triton.jit
def _finish_rows(o, lse, o_row, m_r, b_m, b_l, b_acc, DV: tl.constexpr, BDV: tl.constexpr):
    """Stores rows ``o_row`` (valid ``m_r``) of o and lse (natural log, -inf where empty) from the
    online-softmax state (base-2 running max ``b_m``, sum ``b_l``, unnormalized ``b_acc``)."""
    o_dv = tl.arange(0, BDV)
    m_nonempty = b_l > 0
    b_o = b_acc / tl.where(m_nonempty, b_l, 1.)[:, None]
    b_lse = tl.where(m_nonempty, (b_m + tl.log2(tl.where(m_nonempty, b_l, 1.))) * 0.6931471805599453,
                     float("-inf"))
    tl.store(o + o_row[:, None] * DV + o_dv[None, :], b_o.to(o.dtype.element_ty),
             mask=m_r[:, None] & (o_dv < DV)[None, :])
    tl.store(lse + o_row, b_lse, mask=m_r)


@triton.jit
def _park_rows(o, lse, o_row, m_r, b_m, b_l, b_acc, DV: tl.constexpr, BDV: tl.constexpr):
    """Parks an online-softmax state in the outputs of rows ``o_row`` (valid ``m_r``) as
    ``o = acc / l`` (rounded once to o's dtype) and ``lse`` in base 2 (-inf where empty): what
    :func:`_resume_rows` continues from."""
    o_dv = tl.arange(0, BDV)
    m_ne = b_l > 0
    tl.store(o + o_row[:, None] * DV + o_dv[None, :], (b_acc / tl.where(m_ne, b_l, 1.)[:, None]).to(o.dtype.element_ty),
             mask=m_r[:, None] & (o_dv < DV)[None, :])
    tl.store(lse + o_row, tl.where(m_ne, b_m + tl.log2(tl.where(m_ne, b_l, 1.)), float("-inf")), mask=m_r)


@triton.jit
def _resume_rows(o, lse, o_row, m_r, DV: tl.constexpr, BDV: tl.constexpr):
    """The online-softmax state (base-2 max, sum, unnormalized output) that :func:`_park_rows`
    parked in rows ``o_row`` where ``m_r``, an empty state elsewhere: ``m = lse, l = 1, acc = o``."""
    o_dv = tl.arange(0, BDV)
    b_m = tl.load(lse + o_row, mask=m_r, other=float("-inf"))
    b_l = tl.where(b_m > float("-inf"), 1., 0.)
    b_acc = tl.load(o + o_row[:, None] * DV + o_dv[None, :], mask=m_r[:, None] & (o_dv < DV)[None, :],
                    other=0.).to(tl.float32)
    return b_m, b_l, b_acc


@triton.jit
def _q_cols(q, o_row, m_r, DK: tl.constexpr, D0: tl.constexpr, BD: tl.constexpr):
    """Head columns ``D0 .. D0 + BD - 1`` of q rows ``o_row`` (valid ``m_r``): the second tile of a
    split head dim."""
    o_d = D0 + tl.arange(0, BD)
    return tl.load(q + o_row[:, None] * DK + o_d[None, :], mask=m_r[:, None] & (o_d < DK)[None, :], other=0.)


@triton.jit
def _one_position_fwd(q, k, v, o, lse, p_idx, i_first, n_walk, bos, seq_len, bos_k, off, t0, i_h, scale,
                      HQ: tl.constexpr, H: tl.constexpr, G: tl.constexpr, BS: tl.constexpr, BK: tl.constexpr,
                      NKS: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BDK: tl.constexpr, BDV: tl.constexpr,
                      BR: tl.constexpr, STAGES: tl.constexpr, DOT_PRECISION: tl.constexpr,
                      DOT_UPCAST: tl.constexpr, TMA: tl.constexpr, RESUME: tl.constexpr = False,
                      BDK2: tl.constexpr = 0):
    """The forward of query row ``t0`` (its ``G <= BR`` heads of KV head ``i_h``; position ``t0 +
    off``, keys from packed row ``bos_k``) over entries ``i_first .. n_walk - 1`` of its list at
    ``p_idx``: a branch-free loop whose loads the compiler can pipeline (STAGES). RESUME: where
    ``i_first > 0`` the walk starts from the state that :func:`selected_fwd_common_kernel` parked
    in o / lse for entries ``0 .. i_first - 1``.
    BDK2 > 0: q . k over the head columns ``0 .. BDK-1`` and ``BDK .. BDK+BDK2-1`` as two tiles."""
    o_r = tl.arange(0, BR)
    i_t = t0 + o_r * 0  # [BR]
    m_r = (o_r < G) & (i_t < seq_len)
    o_dk = tl.arange(0, BDK)
    o_row = (bos + i_t) * HQ + i_h * G + o_r  # [BR] row of q/o/lse in [N * HQ]
    b_q = tl.load(q + o_row[:, None] * DK + o_dk[None, :], mask=m_r[:, None] & (o_dk < DK)[None, :], other=0.)
    if BDK2 > 0:
        b_q2 = _q_cols(q, o_row, m_r, DK, BDK, BDK2)
    else:
        b_q2 = b_q  # unused
    t_last = tl.minimum(t0, seq_len - 1) + off  # the position
    qk_scale = scale * 1.4426950408889634  # softmax in base 2
    if RESUME:
        b_m, b_l, b_acc = _resume_rows(o, lse, o_row, m_r & (o_r * 0 + i_first > 0), DV, BDV)
    else:
        b_m = tl.full([BR], float("-inf"), dtype=tl.float32)
        b_l = tl.zeros([BR], dtype=tl.float32)
        b_acc = tl.zeros([BR, BDV], dtype=tl.float32)
    # this KV head's keys 0 .. t_last of the sequence, never past its last key (at least one row:
    # a surplus program past the end, whose entries are all -1, still gets a valid descriptor)
    n_key = tl.maximum(t_last + 1, 1).to(tl.int32)
    if TMA:
        k_desc, v_desc = kv_descriptors(k + (bos_k * H + i_h) * DK, v + (bos_k * H + i_h) * DV, n_key, H * DK,
                                        H * DV, DK, DV, BK, BDK, BDV)
    else:
        k_desc, v_desc = k, v
    for i_s in tl.range(i_first, n_walk, num_stages=STAGES):
        i_b = tl.load(p_idx + i_s, mask=t0 < seq_len, other=-1).to(tl.int64)
        # every row is at position t_last: the keys <= t_last are exactly the causal ones
        b_m, b_l, b_acc = _gather_block(b_q, i_b, k, v, k_desc, v_desc, bos_k, t_last, n_key, i_h, qk_scale, b_m, b_l,
                                        b_acc, H, BS, BK, NKS, DK, DV, BDK, BDV, TMA, DOT_PRECISION, DOT_UPCAST,
                                        b_q2, BDK2)
    _finish_rows(o, lse, o_row, m_r, b_m, b_l, b_acc, DV, BDV)


@triton.jit
def selected_fwd_kernel(
    q, k, v, o, lse, block_indices, cu_seqlens, cu_seqlens_k, chunk_indices, scale,
    HQ: tl.constexpr, H: tl.constexpr, G: tl.constexpr, S: tl.constexpr, SP: tl.constexpr,
    BS: tl.constexpr, BK: tl.constexpr, NKS: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
    BDK: tl.constexpr, BDV: tl.constexpr, BT: tl.constexpr, BR: tl.constexpr, STAGES: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr, TMA: tl.constexpr = False,
):
    """q ``[N, HQ, DK]``, k ``[NK, H, DK]``, v ``[NK, H, DV]``, block_indices ``[N, H, S]``
    -> o ``[N, HQ, DV]``, lse ``[N, HQ]`` (natural log, -inf where nothing is visible); queries
    packed by cu_seqlens (chunk_indices: its tiles), keys by cu_seqlens_k (None: as the queries).
    A block of ``BS`` keys is read in ``NKS`` sub-tiles of ``BK`` keys. ``TMA`` (``BT == 1`` only;
    16-byte aligned k/v whose rows are multiples of 16 bytes): K/V sub-tiles through on-device
    tensor descriptors (:func:`_listed_block_kv_tma`) instead of masked pointer loads."""
    i_h, i_tc, bos, seq_len, bos_k, off = _program_chunk(chunk_indices, cu_seqlens, cu_seqlens_k)
    t0 = i_tc * BT
    if BT == 1:
        # one position per tile (G >= the tile's rows): its own list, no union to walk
        _one_position_fwd(q, k, v, o, lse, block_indices + ((bos + t0) * H + i_h) * S, 0, S, bos, seq_len, bos_k, off,
                          t0, i_h, scale, HQ, H, G, BS, BK, NKS, DK, DV, BDK, BDV, BR, STAGES, DOT_PRECISION,
                          DOT_UPCAST, TMA)
    else:
        t_last = tl.minimum(t0 + BT, seq_len) - 1 + off  # position of the tile's last query
        o_r = tl.arange(0, BR)
        o_rp = o_r // G  # query of the row inside the tile
        o_rg = o_r % G  # query head of the row inside the group
        i_t = t0 + o_rp  # [BR] query row in its sequence
        i_p = i_t + off  # [BR] its position
        m_r = (o_r < BT * G) & (i_t < seq_len)
        o_dk = tl.arange(0, BDK)
        o_s = tl.arange(0, SP)

        o_row = (bos + i_t) * HQ + i_h * G + o_rg  # [BR] row of q/o/lse in [N * HQ]
        b_q = tl.load(q + o_row[:, None] * DK + o_dk[None, :], mask=m_r[:, None] & (o_dk < DK)[None, :], other=0.)
        # [BR, SP] each row's block list (padding rows: all -1)
        b_idx = tl.load(block_indices + ((bos + i_t) * H + i_h)[:, None] * S + o_s[None, :],
                        mask=m_r[:, None] & (o_s < S)[None, :], other=-1)

        qk_scale = scale * 1.4426950408889634  # softmax in base 2
        b_m = tl.full([BR], float("-inf"), dtype=tl.float32)
        b_l = tl.zeros([BR], dtype=tl.float32)
        b_acc = tl.zeros([BR, BDV], dtype=tl.float32)
        for i_r in range(BT):
            p_idx = block_indices + ((bos + t0 + i_r) * H + i_h) * S
            for i_s in range(S):
                # past the sequence end: -1, nothing to do
                i_b = tl.load(p_idx + i_s, mask=t0 + i_r < seq_len, other=-1).to(tl.int64)
                m_hit = b_idx == i_b  # [BR, SP]
                n_seen = tl.sum(tl.where(m_hit & (o_rp < i_r)[:, None], 1, 0))
                if (i_b >= 0) & (n_seen == 0) & (i_b * BS <= t_last):
                    m_sel = tl.sum(tl.where(m_hit, 1, 0), axis=1) > 0  # [BR] rows that selected i_b
                    for i_ks in range(NKS):
                        if i_b * BS + i_ks * BK <= t_last:
                            i_k, m_k, b_k, b_v = _listed_block_kv(k, v, i_b, i_ks, bos_k, t_last, i_h, H, BS, BK,
                                                                  DK, DV, BDK, BDV)
                            b_s = dot(b_q, tl.trans(b_k), DOT_PRECISION, DOT_UPCAST) * qk_scale  # [BR, BK]
                            m_s = m_sel[:, None] & m_k[None, :] & (i_k[None, :] <= i_p[:, None])
                            b_s = tl.where(m_s, b_s, float("-inf"))
                            b_m, b_l, b_acc = softmax_step(b_s, b_v, b_m, b_l, b_acc, DOT_PRECISION, DOT_UPCAST)
        _finish_rows(o, lse, o_row, m_r, b_m, b_l, b_acc, DV, BDV)


@triton.jit
def selected_fwd_planned_kernel(
    q, k, v, o, lse, plan, counts, cu_seqlens, cu_seqlens_k, chunk_indices, scale,
    HQ: tl.constexpr, H: tl.constexpr, G: tl.constexpr, S: tl.constexpr,
    BS: tl.constexpr, BK: tl.constexpr, NKS: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
    BDK: tl.constexpr, BDV: tl.constexpr, BR: tl.constexpr, STAGES: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr, TMA: tl.constexpr = False, BDK2: tl.constexpr = 0,
):
    """:func:`selected_fwd_kernel` with one position per program (``chunk_indices`` of single
    positions) on :func:`selected_share_plan_kernel`'s plan: a position walks its valid entries
    only; where counts[..., 0] = n > 0, :func:`selected_fwd_common_kernel` walked the first n and
    the walk resumes from the state it parked in o / lse."""
    # chunks of one position
    i_h, t0, bos, seq_len, bos_k, off = _program_chunk(chunk_indices, cu_seqlens, cu_seqlens_k)
    if t0 < seq_len:
        p_cnt = counts + ((bos + t0) * H + i_h) * 2
        _one_position_fwd(q, k, v, o, lse, plan + ((bos + t0) * H + i_h) * S, tl.load(p_cnt), tl.load(p_cnt + 1), bos,
                          seq_len, bos_k, off, t0, i_h, scale, HQ, H, G, BS, BK, NKS, DK, DV, BDK, BDV, BR, STAGES,
                          DOT_PRECISION, DOT_UPCAST, TMA, True, BDK2)


@triton.jit
def _tail_keys(k, p_list, n_sh, p0, len_k, bos_k, i_h, H: tl.constexpr, P: tl.constexpr, BS: tl.constexpr,
               SP: tl.constexpr, TB: tl.constexpr, DK: tl.constexpr, BDK: tl.constexpr):
    """Keys ``p0 + 1 .. p0 + P - 1`` (``TB >= P - 1`` slots) of a program of P positions from ``p0``
    that lie in the blocks every position lists (the first ``n_sh`` entries of the planned list at
    ``p_list``), of the sequence whose ``len_k`` keys start at packed row ``bos_k``: positions in
    the sequence, their mask (in a shared block, before the sequence end) and K ``[TB, BDK]``
    (zeros where masked: no other key is read)."""
    o_s = tl.arange(0, SP)
    o_tb = tl.arange(0, TB)
    o_dk = tl.arange(0, BDK)
    ids = tl.load(p_list + o_s, mask=o_s < n_sh, other=-1)  # [SP] the shared blocks
    i_kt = p0 + 1 + o_tb
    m_kt = (o_tb < P - 1) & (i_kt < len_k) & \
        (tl.max(tl.where(ids[None, :] == (i_kt // BS)[:, None], 1, 0), axis=1) > 0)
    b_kt = tl.load(k + ((bos_k + i_kt) * H + i_h)[:, None] * DK + o_dk[None, :],
                   mask=m_kt[:, None] & (o_dk < DK)[None, :], other=0.)
    return i_kt, m_kt, b_kt


@triton.jit
def selected_fwd_common_kernel(
    q, k, v, o, lse, plan, counts, cu_seqlens, cu_seqlens_k, chunk_indices, scale,
    HQ: tl.constexpr, H: tl.constexpr, G: tl.constexpr, S: tl.constexpr, SP: tl.constexpr,
    BS: tl.constexpr, BK: tl.constexpr, NKS: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
    BDK: tl.constexpr, BDV: tl.constexpr, P: tl.constexpr, BR: tl.constexpr, TB: tl.constexpr,
    STAGES: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr, TMA: tl.constexpr = False,
    BDK2: tl.constexpr = 0,
):
    """The blocks that all ``P`` query rows ``t0 ..`` (positions ``p0 = t0 + offset ..``) of a
    program list, for the programs that :func:`selected_share_plan_kernel` gave ``counts[..., 0] =
    n > 0``: the first ``n`` entries of every planned list. Their keys ``<= p0`` (visible to every
    row: no per-row mask) are loaded once and scored for the ``P * BR`` rows in one product; their
    keys ``p0 + 1 .. p0 + P - 1`` are scored in one product and their values added one key at a
    time on FMA units (row r takes key p0 + j only if its position is >= p0 + j: no value a row may
    not see is ever multiplied, even by zero). The state is parked in o / lse (:func:`_park_rows`);
    :func:`selected_fwd_planned_kernel` then walks each position's other entries from there, one
    position per program. BDK2 > 0: q . k over two head-column tiles (see :func:`_gather_block`)."""
    i_h, i_tc, bos, seq_len, bos_k, off = _program_chunk(chunk_indices, cu_seqlens, cu_seqlens_k)
    t0 = i_tc * P
    n_sh = tl.load(counts + ((bos + t0) * H + i_h) * 2, mask=t0 < seq_len, other=0)
    if n_sh > 0:
        o_dk = tl.arange(0, BDK)
        # rows: query row t0 + r // BR, head r % BR
        o_a = tl.arange(0, P * BR)
        i_ta = t0 + o_a // BR
        m_a = (o_a % BR < G) & (i_ta < seq_len)
        o_rowa = (bos + i_ta) * HQ + i_h * G + o_a % BR
        p0 = t0 + off  # position of the program's first query
        i_pa = i_ta + off  # [P * BR] positions of the rows
        n_key = (p0 + 1).to(tl.int32)  # keys 0 .. p0 of this KV head in the sequence
        if TMA:
            k_desc, v_desc = kv_descriptors(k + (bos_k * H + i_h) * DK, v + (bos_k * H + i_h) * DV, n_key, H * DK,
                                            H * DV, DK, DV, BK, BDK, BDV)
        else:
            k_desc, v_desc = k, v
        qk_scale = scale * 1.4426950408889634  # softmax in base 2
        p_list0 = plan + ((bos + t0) * H + i_h) * S
        b_q = tl.load(q + o_rowa[:, None] * DK + o_dk[None, :], mask=m_a[:, None] & (o_dk < DK)[None, :], other=0.)
        if BDK2 > 0:
            b_q2 = _q_cols(q, o_rowa, m_a, DK, BDK, BDK2)
        else:
            b_q2 = b_q  # unused
        b_m = tl.full([P * BR], float("-inf"), dtype=tl.float32)
        b_l = tl.zeros([P * BR], dtype=tl.float32)
        b_acc = tl.zeros([P * BR, BDV], dtype=tl.float32)
        for j in tl.range(0, n_sh, num_stages=STAGES):
            i_b = tl.load(p_list0 + j).to(tl.int64)
            b_m, b_l, b_acc = _gather_block(b_q, i_b, k, v, k_desc, v_desc, bos_k, p0, n_key, i_h, qk_scale,
                                            b_m, b_l, b_acc, H, BS, BK, NKS, DK, DV, BDK, BDV, TMA,
                                            DOT_PRECISION, DOT_UPCAST, b_q2, BDK2)
        # keys p0 + 1 .. p0 + P - 1 of the shared blocks: scored as one [P * BR, TB] product, the
        # values added one key at a time for the rows whose position is >= the key's (a product
        # would multiply the values of keys a row may not see by zero: inf * 0)
        o_dv = tl.arange(0, BDV)
        o_tb = tl.arange(0, TB)
        i_kt, m_kt, b_kt = _tail_keys(k, p_list0, n_sh, p0, seq_len + off, bos_k, i_h, H, P, BS, SP, TB, DK, BDK)
        b_s, _ = _qk_scores(b_q, b_q2, b_kt, k, i_kt, m_kt, bos_k, i_h, H, DK, BDK, BDK2, DOT_PRECISION, DOT_UPCAST)
        b_s = tl.where(m_kt[None, :] & (i_kt[None, :] <= i_pa[:, None]), b_s * qk_scale, float("-inf"))
        b_mn = tl.maximum(b_m, tl.max(b_s, axis=1))
        b_ms = tl.where(b_mn == float("-inf"), 0., b_mn)
        b_p = tl.exp2(b_s - b_ms[:, None])
        b_alpha = tl.exp2(b_m - b_ms)
        b_l = b_l * b_alpha + tl.sum(b_p, axis=1)
        b_acc = b_acc * b_alpha[:, None]
        b_m = b_mn
        for j in tl.static_range(P - 1):
            i_kj = p0 + 1 + j
            m_j = tl.max(tl.where((o_tb == j) & m_kt, 1, 0), axis=0)  # 1: key p0 + 1 + j is scored
            b_vj = tl.load(v + ((bos_k + i_kj) * H + i_h) * DV + o_dv, mask=(o_dv < DV) & (o_dv * 0 + m_j > 0),
                           other=0.).to(tl.float32)
            b_pj = tl.sum(tl.where(o_tb[None, :] == j, b_p, 0.), axis=1)  # [P * BR], 0 where unseen
            b_acc += tl.where(((i_pa >= i_kj) & (o_a * 0 + m_j > 0))[:, None], b_pj[:, None] * b_vj[None, :], 0.)
        _park_rows(o, lse, o_rowa, m_a, b_m, b_l, b_acc, DV, BDV)


@triton.jit
def _k_cols(k, i_k, m_k, bos, i_h, H: tl.constexpr, DK: tl.constexpr, D0: tl.constexpr, BD: tl.constexpr):
    """Head columns ``D0 .. D0 + BD - 1`` of keys ``i_k`` (sequence positions; zeros where not m_k
    and past DK): the second tile of a split head dim (:func:`nsa.ops.triton_utils.split_dim`)."""
    o_d = D0 + tl.arange(0, BD)
    return tl.load(k + ((bos + i_k) * H + i_h)[:, None] * DK + o_d[None, :], mask=m_k[:, None] & (o_d < DK)[None, :],
                   other=0.)


@triton.jit
def _qk_scores(b_q, b_q2, b_k, k, i_k, m_k, bos, i_h, H: tl.constexpr, DK: tl.constexpr, BDK: tl.constexpr,
               BDK2: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr):
    """Raw scores ``[BR, BK]`` of rows b_q against keys ``i_k`` (K tile b_k); BDK2 > 0: plus those of
    the second head-column tile (b_q2; its keys, returned, through :func:`_k_cols`)."""
    b_s = dot(b_q, tl.trans(b_k), DOT_PRECISION, DOT_UPCAST)
    if BDK2 > 0:
        b_k2 = _k_cols(k, i_k, m_k, bos, i_h, H, DK, BDK, BDK2)
        b_s += dot(b_q2, tl.trans(b_k2), DOT_PRECISION, DOT_UPCAST)
    else:
        b_k2 = b_k  # unused
    return b_s, b_k2


@triton.jit
def _gather_block(b_q, i_b, k, v, k_desc, v_desc, bos, t0, n_key, i_h, qk_scale, b_m, b_l, b_acc,
                  H: tl.constexpr, BS: tl.constexpr, BK: tl.constexpr, NKS: tl.constexpr, DK: tl.constexpr,
                  DV: tl.constexpr, BDK: tl.constexpr, BDV: tl.constexpr, TMA: tl.constexpr,
                  DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr, b_q2, BDK2: tl.constexpr):
    """One online-softmax step of rows ``b_q`` over the keys ``<= t0`` (a position) of listed block
    ``i_b`` (-1: nothing; keys from packed row ``bos``), sub-tile by sub-tile; every row's position
    is >= t0 (no per-row mask).
    BDK2 > 0: the head columns ``BDK ..`` are a second tile, b_q2 ``[rows, BDK2]`` (its keys
    through pointer loads)."""
    for i_ks in tl.static_range(NKS):
        if TMA:
            i_k, m_k, b_k, b_v = _listed_block_kv_tma(k_desc, v_desc, i_b, i_ks, t0, n_key, BS, BK)
        else:
            i_k, m_k, b_k, b_v = _listed_block_kv(k, v, i_b, i_ks, bos, t0, i_h, H, BS, BK, DK, DV, BDK, BDV)
        b_s, _ = _qk_scores(b_q, b_q2, b_k, k, i_k, m_k, bos, i_h, H, DK, BDK, BDK2, DOT_PRECISION, DOT_UPCAST)
        b_s = tl.where(m_k[None, :], b_s * qk_scale, float("-inf"))
        b_m, b_l, b_acc = softmax_step(b_s, b_v, b_m, b_l, b_acc, DOT_PRECISION, DOT_UPCAST)
    return b_m, b_l, b_acc


@triton.jit
def selected_share_plan_kernel(
    block_indices, plan, counts, cu_seqlens, chunk_indices,
    H: tl.constexpr, S: tl.constexpr, SP: tl.constexpr, P: tl.constexpr,
):
    """For the ``P`` positions ``t0 ..`` of one program of :func:`selected_fwd_common_kernel` and one
    KV head: plan ``[N, H, S]`` holds each position's list reordered as the blocks that every
    position in the sequence lists (in position t0's order), then its other entries (in its own
    order), then the -1 entries; counts ``[N, H, 2]`` = (number of shared blocks, which the common
    kernel walks; number of entries >= 0). Lists hold no repeats (validated by the callers)."""
    i_h, i_tc, bos, seq_len, _, _ = _program_chunk(chunk_indices, cu_seqlens, cu_seqlens)  # query rows only
    t0 = i_tc * P
    o_s = tl.arange(0, SP)
    o_p = tl.arange(0, P)
    m_p = t0 + o_p < seq_len
    o_list = ((bos + t0 + o_p) * H + i_h)[:, None] * S
    m_list = m_p[:, None] & (o_s < S)[None, :]
    b_idx = tl.load(block_indices + o_list + o_s[None, :], mask=m_list, other=-1)  # [P, SP]
    b_all = tl.full([P, SP], 1, dtype=tl.int32)
    for i_q in tl.static_range(P):
        row_q = tl.sum(tl.where((o_p == i_q)[:, None], b_idx, 0), axis=0)  # [SP] list of position t0 + i_q
        in_q = tl.max(tl.where(b_idx[:, :, None] == row_q[None, None, :], 1, 0), axis=2)  # [P, SP]
        b_all = b_all * tl.where(t0 + i_q < seq_len, in_q, 1)
    valid = tl.where(b_idx >= 0, 1, 0)
    shared = valid * b_all  # [P, SP] 0/1
    own = valid - shared
    sh0 = tl.sum(tl.where((o_p == 0)[:, None], shared, 0), axis=0)  # [SP] position t0's shared entries
    id0 = tl.sum(tl.where((o_p == 0)[:, None], b_idx, 0), axis=0)
    rank0 = tl.cumsum(sh0, axis=0) - 1
    n_sh = tl.sum(sh0)
    n_valid = tl.sum(valid, axis=1)  # [P]
    # destination slot of every entry: a shared block at its rank in t0's list, the others after
    d_sh = tl.sum(tl.where((b_idx[:, :, None] == id0[None, None, :]) & (sh0 > 0)[None, None, :],
                           rank0[None, None, :], 0), axis=2)
    d_own = n_sh + tl.cumsum(own, axis=1) - 1
    d_bad = n_valid[:, None] + tl.cumsum(1 - valid, axis=1) - 1
    dest = tl.where(shared > 0, d_sh, tl.where(own > 0, d_own, d_bad))
    tl.store(plan + o_list + dest, b_idx, mask=m_list)
    o_cnt = ((bos + t0 + o_p) * H + i_h) * 2
    tl.store(counts + o_cnt, tl.zeros([P], dtype=tl.int32) + n_sh, mask=m_p)
    tl.store(counts + o_cnt + 1, n_valid, mask=m_p)


@triton.jit
def selected_fwd_scatter_kernel(
    q, k, v, o_part, lse_part, cu_seqlens, cu_seqlens_k, block_table, offsets, entries, seg_first, seg_bucket, scale,
    NBT, key0, c0,
    HQ: tl.constexpr, H: tl.constexpr, G: tl.constexpr, S: tl.constexpr,
    BS: tl.constexpr, BK: tl.constexpr, NKS: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
    BDK: tl.constexpr, BDV: tl.constexpr, BQ: tl.constexpr, BR: tl.constexpr, SEG: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
):
    """Forward partials of one segment (at most ``SEG`` entries) of one (KV head, block)'s query
    list, for the queries of one chunk of packed query rows ``[c0, c0 + C)``.

    Bucket ``key0 + h * NBT + blk`` (chunk's first bucket ``key0``) lists the entries
    ``e = t * H * S + h * S + s`` (packed query row t, slot s of t's block list) that selected
    global block ``blk`` (of the keys, packed by cu_seqlens_k) for KV head h and see at least one of
    its keys:
    ``entries[offsets[b] : offsets[b + 1]]``, cut into segments ``seg_first[b] ..
    seg_first[b + 1] - 1``; ``seg_bucket`` maps a segment back to its bucket. The program loads
    the block's keys once and, for every entry and every one of the G query heads, writes
    attention over the block alone: the normalized output to ``o_part[((t - c0) * HQ + hq) * S + s]``
    (input dtype: a convex combination of rows of v) and the log-sum-exp in base 2 to ``lse_part``.
    """
    i_seg = tl.load(seg_first + key0).to(tl.int64) + tl.program_id(0)
    if i_seg < tl.load(seg_first + key0 + H * NBT):
        i_h, i_j, bos_k, len_k, shift, start, end = _scatter_segment(i_seg, seg_bucket, seg_first, offsets,
                                                                     block_table, cu_seqlens, cu_seqlens_k, key0,
                                                                     NBT, SEG)

        o_dk = tl.arange(0, BDK)
        o_dv = tl.arange(0, BDV)
        qk_scale = scale * 1.4426950408889634
        if NKS == 1:  # the whole block fits one tile: load it once for the whole list
            i_k0, m_k0, b_k0, b_v0 = _block_kv(k, v, bos_k, i_j, 0, i_h, len_k, H, BS, BK, DK, DV, BDK, BDV)
        for i0 in range(start, end, BQ):
            m_r, i_t, i_s, o_row = _scatter_rows(entries, i0, end, i_h, HQ, H, G, S, BQ, BR)
            i_kl = i_t + shift  # [BR] packed row of the last key each row may see
            b_q = tl.load(q + o_row[:, None] * DK + o_dk[None, :], mask=m_r[:, None] & (o_dk < DK)[None, :],
                          other=0.)
            b_m = tl.full([BR], float("-inf"), dtype=tl.float32)
            b_l = tl.zeros([BR], dtype=tl.float32)
            b_acc = tl.zeros([BR, BDV], dtype=tl.float32)
            for i_ks in tl.static_range(NKS):
                if NKS == 1:
                    i_k = i_k0
                    m_k = m_k0
                    b_k = b_k0
                    b_v = b_v0
                else:
                    i_k, m_k, b_k, b_v = _block_kv(k, v, bos_k, i_j, i_ks, i_h, len_k, H, BS, BK, DK, DV, BDK,
                                                   BDV)
                b_s = dot(b_q, tl.trans(b_k), DOT_PRECISION, DOT_UPCAST) * qk_scale  # [BR, BK]
                b_s = tl.where(m_r[:, None] & m_k[None, :] & (i_k[None, :] <= i_kl[:, None]), b_s, float("-inf"))
                b_m, b_l, b_acc = softmax_step(b_s, b_v, b_m, b_l, b_acc, DOT_PRECISION, DOT_UPCAST)
            # every listed entry sees the block's first key: l > 0 on the rows that are stored
            b_l = tl.where(b_l > 0, b_l, 1.)
            o_part_row = (o_row - tl.cast(c0, tl.int64) * HQ) * S + i_s  # [BR]
            tl.store(o_part + o_part_row[:, None] * DV + o_dv[None, :], (b_acc / b_l[:, None]).to(
                o_part.dtype.element_ty), mask=m_r[:, None] & (o_dv < DV)[None, :])
            tl.store(lse_part + o_part_row, b_m + tl.log2(b_l), mask=m_r)


@triton.jit
def selected_fwd_merge_kernel(
    o_part, lse_part, o, lse, c0, n_rows,
    HQ: tl.constexpr, S: tl.constexpr, DV: tl.constexpr, BDV: tl.constexpr, BM: tl.constexpr,
):
    """o ``[N, HQ, DV]`` and lse ``[N, HQ]`` (natural log) of the chunk's ``n_rows`` = positions x HQ
    rows starting at position ``c0``, from the per-slot partials of
    :func:`selected_fwd_scatter_kernel`; slots never written hold lse -inf and are skipped."""
    o_m = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)  # [BM] chunk rows
    m_r = o_m < n_rows
    o_dv = tl.arange(0, BDV)
    m_d = o_dv < DV
    b_m = tl.full([BM], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([BM], dtype=tl.float32)
    b_acc = tl.zeros([BM, BDV], dtype=tl.float32)
    for i_s in range(S):
        b_ls = tl.load(lse_part + o_m * S + i_s, mask=m_r, other=float("-inf"))  # [BM] base 2
        m_w = b_ls > float("-inf")
        b_o = tl.load(o_part + (o_m * S + i_s)[:, None] * DV + o_dv[None, :], mask=m_w[:, None] & m_d[None, :],
                      other=0.).to(tl.float32)
        b_m_new = tl.maximum(b_m, b_ls)
        b_m_safe = tl.where(b_m_new == float("-inf"), 0., b_m_new)
        b_alpha = tl.exp2(b_m - b_m_safe)
        b_w = tl.exp2(b_ls - b_m_safe)  # 0 for unwritten slots
        b_l = b_l * b_alpha + b_w
        b_acc = b_acc * b_alpha[:, None] + b_w[:, None] * b_o
        b_m = b_m_new
    m_nonempty = b_l > 0
    b_out = b_acc / tl.where(m_nonempty, b_l, 1.)[:, None]
    b_lse = tl.where(m_nonempty, (b_m + tl.log2(tl.where(m_nonempty, b_l, 1.))) * 0.6931471805599453,
                     float("-inf"))
    o_row = tl.cast(c0, tl.int64) * HQ + o_m  # c0 arrives int32: widen before the product
    tl.store(o + o_row[:, None] * DV + o_dv[None, :], b_out.to(o.dtype.element_ty), mask=m_r[:, None] & m_d[None, :])
    tl.store(lse + o_row, b_lse, mask=m_r)


@triton.jit
def selected_bwd_dq_scatter_kernel(
    q, k, v, lse, do, delta, dq_part, flag, cu_seqlens, cu_seqlens_k, block_table, offsets, entries, seg_first,
    seg_bucket, scale, NBT, key0, c0,
    HQ: tl.constexpr, H: tl.constexpr, G: tl.constexpr, S: tl.constexpr,
    BS: tl.constexpr, BK: tl.constexpr, NKS: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
    BDK: tl.constexpr, BDV: tl.constexpr, BQ: tl.constexpr, BR: tl.constexpr, SEG: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
):
    """dQ of one segment of one (KV head, block)'s query list (chunk and lists as in
    :func:`selected_fwd_scatter_kernel`): every (entry, head) row's gradient through this block
    alone, float32, to ``dq_part[((t - c0) * HQ + hq) * S + s]``, and 1 to the same slot of
    ``flag`` (int8). The forward's lse (natural log) and delta = rowsum(dO * O) are inputs."""
    i_seg = tl.load(seg_first + key0).to(tl.int64) + tl.program_id(0)
    if i_seg < tl.load(seg_first + key0 + H * NBT):
        i_h, i_j, bos_k, len_k, shift, start, end = _scatter_segment(i_seg, seg_bucket, seg_first, offsets,
                                                                     block_table, cu_seqlens, cu_seqlens_k, key0,
                                                                     NBT, SEG)

        o_dk = tl.arange(0, BDK)
        o_dv = tl.arange(0, BDV)
        qk_scale = scale * 1.4426950408889634
        for i0 in range(start, end, BQ):
            m_r, i_t, i_s, o_row = _scatter_rows(entries, i0, end, i_h, HQ, H, G, S, BQ, BR)
            i_kl = i_t + shift  # [BR] packed row of the last key each row may see
            b_q = tl.load(q + o_row[:, None] * DK + o_dk[None, :], mask=m_r[:, None] & (o_dk < DK)[None, :],
                          other=0.)
            b_do = tl.load(do + o_row[:, None] * DV + o_dv[None, :], mask=m_r[:, None] & (o_dv < DV)[None, :],
                           other=0.)
            b_lse2 = tl.load(lse + o_row, mask=m_r, other=0.) * 1.4426950408889634
            b_delta = tl.load(delta + o_row, mask=m_r, other=0.)
            b_dq = tl.zeros([BR, BDK], dtype=tl.float32)
            for i_ks in tl.static_range(NKS):
                i_k, m_k, b_k, b_v = _block_kv(k, v, bos_k, i_j, i_ks, i_h, len_k, H, BS, BK, DK, DV, BDK, BDV)
                b_s = dot(b_q, tl.trans(b_k), DOT_PRECISION, DOT_UPCAST) * qk_scale
                m_s = m_r[:, None] & m_k[None, :] & (i_k[None, :] <= i_kl[:, None])
                b_p = tl.where(m_s, tl.exp2(b_s - b_lse2[:, None]), 0.)
                b_dp = dot(b_do, tl.trans(b_v), DOT_PRECISION, DOT_UPCAST)
                b_ds = b_p * (b_dp - b_delta[:, None])
                b_dq += dot(b_ds.to(b_k.dtype), b_k, DOT_PRECISION, DOT_UPCAST)
            o_part_row = (o_row - tl.cast(c0, tl.int64) * HQ) * S + i_s
            tl.store(dq_part + o_part_row[:, None] * DK + o_dk[None, :], b_dq * scale,
                     mask=m_r[:, None] & (o_dk < DK)[None, :])
            tl.store(flag + o_part_row, tl.full([BR], 1, dtype=tl.int8), mask=m_r)


@triton.jit
def selected_bwd_dq_reduce_kernel(
    dq_part, flag, dq, c0, n_rows,
    HQ: tl.constexpr, S: tl.constexpr, DK: tl.constexpr, BDK: tl.constexpr, BM: tl.constexpr,
):
    """dq of the chunk's rows: the flagged slots' partials summed in slot order (deterministic);
    rows with no flagged slot get 0."""
    o_m = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
    m_r = o_m < n_rows
    o_dk = tl.arange(0, BDK)
    m_d = o_dk < DK
    b_dq = tl.zeros([BM, BDK], dtype=tl.float32)
    for i_s in range(S):
        m_w = tl.load(flag + o_m * S + i_s, mask=m_r, other=0) != 0
        b_dq += tl.load(dq_part + (o_m * S + i_s)[:, None] * DK + o_dk[None, :], mask=m_w[:, None] & m_d[None, :],
                        other=0.)
    o_row = tl.cast(c0, tl.int64) * HQ + o_m  # c0 arrives int32: widen before the product
    tl.store(dq + o_row[:, None] * DK + o_dk[None, :], b_dq.to(dq.dtype.element_ty), mask=m_r[:, None] & m_d[None, :])


@triton.jit
def _dq_block(b_q, b_q2, b_do, b_lse2, b_delta, m_r, i_b, k, v, bos, t_last, i_h, qk_scale, b_dq, b_dq2,
              H: tl.constexpr, BS: tl.constexpr, BK: tl.constexpr, NKS: tl.constexpr, DK: tl.constexpr,
              DV: tl.constexpr, BDK: tl.constexpr, BDV: tl.constexpr, BDK2: tl.constexpr,
              DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr):
    """dQ (unscaled, float32; ``b_dq2``: the head columns ``BDK ..`` when BDK2 > 0) of rows ``b_q``
    (valid ``m_r``; base-2 lse ``b_lse2``, delta ``b_delta``) over the keys ``<= t_last`` (a
    position) of listed block ``i_b`` (-1: nothing; keys from packed row ``bos``), sub-tile by
    sub-tile; every row's position is >= t_last (no per-row causal mask)."""
    for i_ks in tl.static_range(NKS):
        i_k, m_k, b_k, b_v = _listed_block_kv(k, v, i_b, i_ks, bos, t_last, i_h, H, BS, BK, DK, DV, BDK, BDV)
        b_s, b_k2 = _qk_scores(b_q, b_q2, b_k, k, i_k, m_k, bos, i_h, H, DK, BDK, BDK2, DOT_PRECISION,
                               DOT_UPCAST)  # [rows, BK]
        b_p = tl.where(m_r[:, None] & m_k[None, :], tl.exp2(b_s * qk_scale - b_lse2[:, None]), 0.)
        b_dp = dot(b_do, tl.trans(b_v), DOT_PRECISION, DOT_UPCAST)
        b_ds = b_p * (b_dp - b_delta[:, None])
        b_dq += dot(b_ds.to(b_k.dtype), b_k, DOT_PRECISION, DOT_UPCAST)
        if BDK2 > 0:
            b_dq2 += dot(b_ds.to(b_k.dtype), b_k2, DOT_PRECISION, DOT_UPCAST)
    return b_dq, b_dq2


@triton.jit
def selected_bwd_dq_kernel(
    q, k, v, o, lse, do, dq, delta, block_indices, cu_seqlens, cu_seqlens_k, chunk_indices, scale,
    HQ: tl.constexpr, H: tl.constexpr, G: tl.constexpr, S: tl.constexpr, SP: tl.constexpr,
    BS: tl.constexpr, BK: tl.constexpr, NKS: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
    BDK: tl.constexpr, BDV: tl.constexpr, BT: tl.constexpr, BR: tl.constexpr, STAGES: tl.constexpr,
    HAS_DELTA: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr, BDK2: tl.constexpr = 0,
):
    """dq ``[N, HQ, DK]``; same tiling as the forward. delta ``[N, HQ]`` = rowsum(dO * O) is an
    input when HAS_DELTA, else computed here and stored. BDK2 > 0: q . k and dQ over the head
    columns ``0 .. BDK-1`` and ``BDK .. BDK+BDK2-1`` as two tiles (keys of the second through
    :func:`_k_cols`), not one padded to a power of two."""
    i_h, i_tc, bos, seq_len, bos_k, off = _program_chunk(chunk_indices, cu_seqlens, cu_seqlens_k)
    t0 = i_tc * BT
    t_last = tl.minimum(t0 + BT, seq_len) - 1 + off  # position of the tile's last query

    o_r = tl.arange(0, BR)
    o_rp = o_r // G
    o_rg = o_r % G
    i_t = t0 + o_rp  # [BR] query row in its sequence
    i_p = i_t + off  # [BR] its position
    m_r = (o_r < BT * G) & (i_t < seq_len)
    o_dk = tl.arange(0, BDK)
    o_dv = tl.arange(0, BDV)
    o_s = tl.arange(0, SP)

    o_row = (bos + i_t) * HQ + i_h * G + o_rg
    m_qd = m_r[:, None] & (o_dk < DK)[None, :]
    m_vd = m_r[:, None] & (o_dv < DV)[None, :]
    b_q = tl.load(q + o_row[:, None] * DK + o_dk[None, :], mask=m_qd, other=0.)
    if BDK2 > 0:
        b_q2 = _q_cols(q, o_row, m_r, DK, BDK, BDK2)
    else:
        b_q2 = b_q  # unused
    b_do = tl.load(do + o_row[:, None] * DV + o_dv[None, :], mask=m_vd, other=0.)
    if HAS_DELTA:
        b_delta = tl.load(delta + o_row, mask=m_r, other=0.)
    else:
        b_o = tl.load(o + o_row[:, None] * DV + o_dv[None, :], mask=m_vd, other=0.)
        b_delta = tl.sum(b_do.to(tl.float32) * b_o.to(tl.float32), axis=1)  # [BR]
        tl.store(delta + o_row, b_delta, mask=m_r)
    qk_scale = scale * 1.4426950408889634
    b_lse2 = tl.load(lse + o_row, mask=m_r, other=0.) * 1.4426950408889634
    b_idx = tl.load(block_indices + ((bos + i_t) * H + i_h)[:, None] * S + o_s[None, :],
                    mask=m_r[:, None] & (o_s < S)[None, :], other=-1)

    b_dq = tl.zeros([BR, BDK], dtype=tl.float32)
    # without a second tile (BDK2 == 0) a 16-column placeholder, never read: the compiler drops it
    b_dq2 = tl.zeros([BR, BDK2 if BDK2 > 0 else 16], dtype=tl.float32)
    if BT == 1:
        # one position per tile (G >= the tile's rows): its own list, no union to walk; a
        # branch-free loop whose loads the compiler can pipeline (STAGES)
        p_idx = block_indices + ((bos + t0) * H + i_h) * S
        for i_s in tl.range(0, S, num_stages=STAGES):
            i_b = tl.load(p_idx + i_s, mask=t0 < seq_len, other=-1).to(tl.int64)
            b_dq, b_dq2 = _dq_block(b_q, b_q2, b_do, b_lse2, b_delta, m_r, i_b, k, v, bos_k, t_last, i_h, qk_scale,
                                    b_dq, b_dq2, H, BS, BK, NKS, DK, DV, BDK, BDV, BDK2, DOT_PRECISION, DOT_UPCAST)
    for i_r in range(BT if BT > 1 else 0):
        p_idx = block_indices + ((bos + t0 + i_r) * H + i_h) * S
        for i_s in range(S):
            i_b = tl.load(p_idx + i_s, mask=t0 + i_r < seq_len, other=-1).to(tl.int64)
            m_hit = b_idx == i_b
            n_seen = tl.sum(tl.where(m_hit & (o_rp < i_r)[:, None], 1, 0))
            if (i_b >= 0) & (n_seen == 0) & (i_b * BS <= t_last):
                m_sel = tl.sum(tl.where(m_hit, 1, 0), axis=1) > 0
                for i_ks in range(NKS):
                    if i_b * BS + i_ks * BK <= t_last:
                        i_k, m_k, b_k, b_v = _listed_block_kv(k, v, i_b, i_ks, bos_k, t_last, i_h, H, BS, BK, DK,
                                                              DV, BDK, BDV)
                        b_s, b_k2 = _qk_scores(b_q, b_q2, b_k, k, i_k, m_k, bos_k, i_h, H, DK, BDK, BDK2,
                                               DOT_PRECISION, DOT_UPCAST)  # [BR, BK]
                        b_s = b_s * qk_scale
                        m_s = m_sel[:, None] & m_k[None, :] & (i_k[None, :] <= i_p[:, None])
                        b_p = tl.where(m_s, tl.exp2(b_s - b_lse2[:, None]), 0.)
                        b_dp = dot(b_do, tl.trans(b_v), DOT_PRECISION, DOT_UPCAST)  # [BR, BK]
                        b_ds = b_p * (b_dp - b_delta[:, None])
                        b_dq += dot(b_ds.to(b_k.dtype), b_k, DOT_PRECISION, DOT_UPCAST)
                        if BDK2 > 0:
                            b_dq2 += dot(b_ds.to(b_k.dtype), b_k2, DOT_PRECISION, DOT_UPCAST)
    _store_dq(dq, o_row, m_r, b_dq, b_dq2, scale, 0, DK, BDK, BDK2)


@triton.jit
def _dq_rows(q, do, lse, delta, o_row, m_r, DK: tl.constexpr, DV: tl.constexpr, BDK: tl.constexpr,
             BDV: tl.constexpr, BDK2: tl.constexpr):
    """What a dQ walk reads once for rows ``o_row`` (valid ``m_r``): q (its head columns ``BDK ..``
    as a second tile when BDK2 > 0), dO, the base-2 lse and delta (zeros on invalid rows)."""
    o_dk = tl.arange(0, BDK)
    o_dv = tl.arange(0, BDV)
    b_q = tl.load(q + o_row[:, None] * DK + o_dk[None, :], mask=m_r[:, None] & (o_dk < DK)[None, :], other=0.)
    if BDK2 > 0:
        b_q2 = _q_cols(q, o_row, m_r, DK, BDK, BDK2)
    else:
        b_q2 = b_q  # unused
    b_do = tl.load(do + o_row[:, None] * DV + o_dv[None, :], mask=m_r[:, None] & (o_dv < DV)[None, :], other=0.)
    b_lse2 = tl.load(lse + o_row, mask=m_r, other=0.) * 1.4426950408889634
    b_delta = tl.load(delta + o_row, mask=m_r, other=0.)
    return b_q, b_q2, b_do, b_lse2, b_delta


@triton.jit
def _store_dq(dq, o_row, m_r, b_dq, b_dq2, scale, n_add, DK: tl.constexpr, BDK: tl.constexpr,
              BDK2: tl.constexpr, ADD: tl.constexpr = False):
    """dq rows ``o_row`` (valid ``m_r``) = ``scale * b_dq`` (head columns ``BDK ..`` from b_dq2 when
    BDK2 > 0), rounded once to dq's dtype; ADD and ``n_add > 0``: plus what dq holds there (a
    parked partial)."""
    o_dk = tl.arange(0, BDK)
    m_1 = m_r[:, None] & (o_dk < DK)[None, :]
    # as a [rows] vector: the interpreter turns (scalar & vector comparison) into integers
    m_add = m_r & (o_row * 0 + n_add > 0)
    b_1 = b_dq * scale
    if ADD:
        b_1 += tl.load(dq + o_row[:, None] * DK + o_dk[None, :], mask=m_add[:, None] & (o_dk < DK)[None, :],
                       other=0.).to(tl.float32)
    tl.store(dq + o_row[:, None] * DK + o_dk[None, :], b_1.to(dq.dtype.element_ty), mask=m_1)
    if BDK2 > 0:
        o_dk2 = BDK + tl.arange(0, BDK2)
        b_2 = b_dq2 * scale
        if ADD:
            b_2 += tl.load(dq + o_row[:, None] * DK + o_dk2[None, :], mask=m_add[:, None] & (o_dk2 < DK)[None, :],
                           other=0.).to(tl.float32)
        tl.store(dq + o_row[:, None] * DK + o_dk2[None, :], b_2.to(dq.dtype.element_ty),
                 mask=m_r[:, None] & (o_dk2 < DK)[None, :])


@triton.jit
def selected_bwd_dq_common_kernel(
    q, k, v, lse, do, dq, delta, plan, counts, cu_seqlens, cu_seqlens_k, chunk_indices, scale,
    HQ: tl.constexpr, H: tl.constexpr, G: tl.constexpr, S: tl.constexpr, SP: tl.constexpr,
    BS: tl.constexpr, BK: tl.constexpr, NKS: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
    BDK: tl.constexpr, BDV: tl.constexpr, P: tl.constexpr, TB: tl.constexpr, BR: tl.constexpr,
    STAGES: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr, BDK2: tl.constexpr = 0,
):
    """dQ over the blocks that all ``P`` query rows ``t0 ..`` (positions ``p0 = t0 + offset ..``) of
    a program list (the first ``n = counts[..., 0] > 0`` entries of every list planned by
    :func:`selected_share_plan_kernel`), as :func:`selected_fwd_common_kernel` does the forward:
    their keys ``<= p0`` (visible to every row) loaded once and used for the ``P * BR`` rows in one
    product; their keys ``p0 + 1 .. p0 + P - 1`` scored in one product and added to dQ one key at a
    time, for the rows whose position is >= the key's (a product would multiply the keys a row may
    not see by zero). The partial dQ is parked in dq (scaled, rounded once to dq's dtype);
    :func:`selected_bwd_dq_planned_kernel` adds each position's other blocks to it. delta is an
    input (rowsum(dO * O))."""
    i_h, i_tc, bos, seq_len, bos_k, off = _program_chunk(chunk_indices, cu_seqlens, cu_seqlens_k)
    t0 = i_tc * P
    n_sh = tl.load(counts + ((bos + t0) * H + i_h) * 2, mask=t0 < seq_len, other=0)
    if n_sh > 0:
        # rows: query row t0 + r // BR, head r % BR
        o_a = tl.arange(0, P * BR)
        i_ta = t0 + o_a // BR
        m_a = (o_a % BR < G) & (i_ta < seq_len)
        o_rowa = (bos + i_ta) * HQ + i_h * G + o_a % BR
        p0 = t0 + off  # position of the program's first query
        i_pa = i_ta + off  # [P * BR] positions of the rows
        b_q, b_q2, b_do, b_lse2, b_delta = _dq_rows(q, do, lse, delta, o_rowa, m_a, DK, DV, BDK, BDV, BDK2)
        qk_scale = scale * 1.4426950408889634
        b_dq = tl.zeros([P * BR, BDK], dtype=tl.float32)
        b_dq2 = tl.zeros([P * BR, BDK2 if BDK2 > 0 else 16], dtype=tl.float32)
        p_list0 = plan + ((bos + t0) * H + i_h) * S
        for j in tl.range(0, n_sh, num_stages=STAGES):
            i_b = tl.load(p_list0 + j).to(tl.int64)
            b_dq, b_dq2 = _dq_block(b_q, b_q2, b_do, b_lse2, b_delta, m_a, i_b, k, v, bos_k, p0, i_h, qk_scale,
                                    b_dq, b_dq2, H, BS, BK, NKS, DK, DV, BDK, BDV, BDK2, DOT_PRECISION, DOT_UPCAST)
        # keys p0 + 1 .. p0 + P - 1 of the shared blocks
        o_tb = tl.arange(0, TB)
        o_dk = tl.arange(0, BDK)
        o_dv = tl.arange(0, BDV)
        i_kt, m_kt, b_kt = _tail_keys(k, p_list0, n_sh, p0, seq_len + off, bos_k, i_h, H, P, BS, SP, TB, DK, BDK)
        b_vt = tl.load(v + ((bos_k + i_kt) * H + i_h)[:, None] * DV + o_dv[None, :],
                       mask=m_kt[:, None] & (o_dv < DV)[None, :], other=0.)
        b_s, _ = _qk_scores(b_q, b_q2, b_kt, k, i_kt, m_kt, bos_k, i_h, H, DK, BDK, BDK2, DOT_PRECISION,
                            DOT_UPCAST)  # [P * BR, TB]
        m_s = m_a[:, None] & m_kt[None, :] & (i_kt[None, :] <= i_pa[:, None])
        b_p = tl.where(m_s, tl.exp2(b_s * qk_scale - b_lse2[:, None]), 0.)
        b_dp = dot(b_do, tl.trans(b_vt), DOT_PRECISION, DOT_UPCAST)
        # NaN where an unseen key's value is not finite: the rows that see the key take it (m_row)
        b_ds = b_p * (b_dp - b_delta[:, None])
        for jk in tl.static_range(P - 1):
            i_kj = p0 + 1 + jk
            m_j = tl.max(tl.where((o_tb == jk) & m_kt, 1, 0), axis=0)  # 1: key p0 + 1 + jk is scored
            m_row = (i_pa >= i_kj) & (o_a * 0 + m_j > 0)
            # dS rounded as the products round it (bf16 for 16-bit inputs)
            b_dsj = tl.sum(tl.where(o_tb[None, :] == jk, b_ds, 0.), axis=1).to(b_kt.dtype).to(tl.float32)
            p_kj = k + ((bos_k + i_kj) * H + i_h) * DK
            b_kj = tl.load(p_kj + o_dk, mask=(o_dk < DK) & (o_dk * 0 + m_j > 0), other=0.).to(tl.float32)
            b_dq += tl.where(m_row[:, None], b_dsj[:, None] * b_kj[None, :], 0.)
            if BDK2 > 0:
                o_dk2 = BDK + tl.arange(0, BDK2)
                b_kj2 = tl.load(p_kj + o_dk2, mask=(o_dk2 < DK) & (o_dk2 * 0 + m_j > 0), other=0.).to(tl.float32)
                b_dq2 += tl.where(m_row[:, None], b_dsj[:, None] * b_kj2[None, :], 0.)
        _store_dq(dq, o_rowa, m_a, b_dq, b_dq2, scale, 0, DK, BDK, BDK2)


@triton.jit
def selected_bwd_dq_planned_kernel(
    q, k, v, lse, do, dq, delta, plan, counts, cu_seqlens, cu_seqlens_k, chunk_indices, scale,
    HQ: tl.constexpr, H: tl.constexpr, G: tl.constexpr, S: tl.constexpr,
    BS: tl.constexpr, BK: tl.constexpr, NKS: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
    BDK: tl.constexpr, BDV: tl.constexpr, BR: tl.constexpr, STAGES: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr, BDK2: tl.constexpr = 0,
):
    """dQ of one query row ``t`` (``chunk_indices`` of single positions; its ``G <= BR`` heads of KV
    head ``i_h``) over the keys up to its position of the entries ``n .. `` of its list planned by
    :func:`selected_share_plan_kernel` (``counts[..., 0] = n``), added to what
    :func:`selected_bwd_dq_common_kernel` parked in dq for the first n where n > 0."""
    # chunks of one position
    i_h, t, bos, seq_len, bos_k, off = _program_chunk(chunk_indices, cu_seqlens, cu_seqlens_k)
    if t < seq_len:
        p_cnt = counts + ((bos + t) * H + i_h) * 2
        n_sh = tl.load(p_cnt)
        o_r = tl.arange(0, BR)
        m_r = o_r < G
        o_row = (bos + t) * HQ + i_h * G + o_r
        b_q, b_q2, b_do, b_lse2, b_delta = _dq_rows(q, do, lse, delta, o_row, m_r, DK, DV, BDK, BDV, BDK2)
        qk_scale = scale * 1.4426950408889634
        b_dq = tl.zeros([BR, BDK], dtype=tl.float32)
        b_dq2 = tl.zeros([BR, BDK2 if BDK2 > 0 else 16], dtype=tl.float32)
        p_list = plan + ((bos + t) * H + i_h) * S
        p = t + off  # the query's position
        for i_s in tl.range(n_sh, tl.load(p_cnt + 1), num_stages=STAGES):
            i_b = tl.load(p_list + i_s).to(tl.int64)
            b_dq, b_dq2 = _dq_block(b_q, b_q2, b_do, b_lse2, b_delta, m_r, i_b, k, v, bos_k, p, i_h, qk_scale,
                                    b_dq, b_dq2, H, BS, BK, NKS, DK, DV, BDK, BDV, BDK2, DOT_PRECISION, DOT_UPCAST)
        _store_dq(dq, o_row, m_r, b_dq, b_dq2, scale, n_sh, DK, BDK, BDK2, ADD=True)


@triton.jit
def selected_bwd_dkv_kernel(
    q, k, v, lse, do, delta, dk, dv, dk_part, dv_part, cu_seqlens, cu_seqlens_k, block_table, query_offsets,
    query_list, seg_bucket, seg_first, part_first, scale, NBT, SEG,
    HQ: tl.constexpr, H: tl.constexpr, G: tl.constexpr,
    BS: tl.constexpr, BK: tl.constexpr, NKS: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
    BDK: tl.constexpr, BDV: tl.constexpr, BQ: tl.constexpr, BR: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr, BDK2: tl.constexpr = 0,
):
    """dK/dV contribution of one segment (at most ``SEG`` queries) of one (KV head, block)'s
    query list, for ``BK`` keys of the block (sub-tile ``pid % NKS``).

    Bucket ``b = h * NBT + blk`` lists the packed rows of the queries (cu_seqlens) that selected
    global block ``blk`` of the keys (cu_seqlens_k; None: packed as the queries) for KV head ``h``:
    ``query_list[query_offsets[b] : query_offsets[b + 1]]``; its segments are ``seg_first[b] ..
    seg_first[b + 1] - 1`` and ``seg_bucket`` maps a segment back (``H * NBT`` past the last one).
    A bucket with one segment writes dk ``[NK, H, DK]`` and dv ``[NK, H, DV]`` directly; otherwise
    segment ``i`` writes float32 partials to slot ``part_first[b] + i`` of dk_part ``[P, NKS * BK,
    DK]`` / dv_part, summed by the reduce kernel.
    BDK2 > 0: q . k and dK over the head columns ``0 .. BDK-1`` and ``BDK .. BDK+BDK2-1`` as two
    tiles, not one padded to a power of two.
    """
    i_sk = tl.program_id(0)
    i_seg = i_sk // NKS
    i_key = tl.load(seg_bucket + i_seg).to(tl.int64)
    if i_key < H * NBT:
        i_h = i_key // NBT
        i_blk = i_key % NBT
        i_n = tl.load(block_table + i_blk * 2).to(tl.int64)
        i_j = tl.load(block_table + i_blk * 2 + 1).to(tl.int64)
        # a packed query row plus shift: the packed key row of its position (sequences end together)
        shift = 0
        if cu_seqlens_k is None:  # keys packed as the queries
            bos = tl.load(cu_seqlens + i_n).to(tl.int64)
            seq_len = tl.load(cu_seqlens + i_n + 1).to(tl.int64) - bos
        else:
            bos = tl.load(cu_seqlens_k + i_n).to(tl.int64)
            seq_len = tl.load(cu_seqlens_k + i_n + 1).to(tl.int64) - bos
            shift = bos + seq_len - tl.load(cu_seqlens + i_n + 1).to(tl.int64)

        o_k = (i_sk % NKS) * BK + tl.arange(0, BK)  # [BK] key offsets inside the block
        i_k = bos + i_j * BS + o_k  # [BK] packed key rows
        m_k = (o_k < BS) & (i_j * BS + o_k < seq_len)
        o_dk = tl.arange(0, BDK)
        o_dv = tl.arange(0, BDV)
        o_kv = i_k * H + i_h
        m_kd = m_k[:, None] & (o_dk < DK)[None, :]
        m_vd = m_k[:, None] & (o_dv < DV)[None, :]
        b_k = tl.load(k + o_kv[:, None] * DK + o_dk[None, :], mask=m_kd, other=0.)  # [BK, BDK]
        b_v = tl.load(v + o_kv[:, None] * DV + o_dv[None, :], mask=m_vd, other=0.)  # [BK, BDV]
        o_dk2 = BDK + tl.arange(0, BDK2 if BDK2 > 0 else 16)
        m_kd2 = m_k[:, None] & (o_dk2 < DK)[None, :]
        if BDK2 > 0:
            b_k2 = tl.load(k + o_kv[:, None] * DK + o_dk2[None, :], mask=m_kd2, other=0.)  # [BK, BDK2]
        else:
            b_k2 = b_k  # unused

        o_r = tl.arange(0, BR)
        o_rp = o_r // G
        o_rg = o_r % G
        qk_scale = scale * 1.4426950408889634
        i_seg0 = tl.load(seg_first + i_key)
        n_seg = tl.load(seg_first + i_key + 1) - i_seg0
        i_sub = i_seg - i_seg0  # segment index inside the bucket
        start = tl.load(query_offsets + i_key) + i_sub * SEG
        end = tl.minimum(tl.load(query_offsets + i_key + 1), start + SEG)
        b_dk = tl.zeros([BK, BDK], dtype=tl.float32)
        b_dv = tl.zeros([BK, BDV], dtype=tl.float32)
        # without a second tile (BDK2 == 0) a 16-column placeholder, never read: the compiler drops it
        b_dk2 = tl.zeros([BK, BDK2 if BDK2 > 0 else 16], dtype=tl.float32)
        for i0 in range(start, end, BQ):
            i_e = i0 + o_rp  # [BR] entry of the query list
            m_r = (o_r < BQ * G) & (i_e < end)
            i_t = tl.load(query_list + i_e, mask=m_r, other=0).to(tl.int64)  # [BR] packed query rows
            o_row = i_t * HQ + i_h * G + o_rg
            b_q = tl.load(q + o_row[:, None] * DK + o_dk[None, :], mask=m_r[:, None] & (o_dk < DK)[None, :],
                          other=0.)
            b_do = tl.load(do + o_row[:, None] * DV + o_dv[None, :], mask=m_r[:, None] & (o_dv < DV)[None, :],
                           other=0.)
            b_lse2 = tl.load(lse + o_row, mask=m_r, other=0.) * 1.4426950408889634
            b_delta = tl.load(delta + o_row, mask=m_r, other=0.)
            b_s = dot(b_q, tl.trans(b_k), DOT_PRECISION, DOT_UPCAST)  # [BR, BK]
            if BDK2 > 0:
                b_q2 = _q_cols(q, o_row, m_r, DK, BDK, BDK2)  # [BR, BDK2]
                b_s += dot(b_q2, tl.trans(b_k2), DOT_PRECISION, DOT_UPCAST)
            else:
                b_q2 = b_q  # unused
            b_s = b_s * qk_scale
            m_s = m_r[:, None] & m_k[None, :] & (i_k[None, :] <= (i_t + shift)[:, None])
            b_p = tl.where(m_s, tl.exp2(b_s - b_lse2[:, None]), 0.)
            b_dv += dot(tl.trans(b_p.to(b_do.dtype)), b_do, DOT_PRECISION, DOT_UPCAST)
            b_dp = dot(b_do, tl.trans(b_v), DOT_PRECISION, DOT_UPCAST)  # [BR, BK]
            b_ds = b_p * (b_dp - b_delta[:, None])
            b_dk += dot(tl.trans(b_ds.to(b_q.dtype)), b_q, DOT_PRECISION, DOT_UPCAST)
            if BDK2 > 0:
                b_dk2 += dot(tl.trans(b_ds.to(b_q.dtype)), b_q2, DOT_PRECISION, DOT_UPCAST)
        b_dk = b_dk * scale
        # compared as a [BK] vector: the interpreter turns (vector & scalar comparison) into integers
        b_n_seg = tl.zeros([BK], dtype=tl.int64) + n_seg
        m_one = m_k & (b_n_seg == 1)  # [BK] the only segment: final values
        m_many = m_k & (b_n_seg > 1)  # [BK] one of several: float32 partials
        tl.store(dk + o_kv[:, None] * DK + o_dk[None, :], b_dk.to(dk.dtype.element_ty),
                 mask=m_one[:, None] & (o_dk < DK)[None, :])
        tl.store(dv + o_kv[:, None] * DV + o_dv[None, :], b_dv.to(dv.dtype.element_ty),
                 mask=m_one[:, None] & (o_dv < DV)[None, :])
        o_part = (tl.load(part_first + i_key) + i_sub) * (NKS * BK) + o_k  # [BK] rows of the partials
        tl.store(dk_part + o_part[:, None] * DK + o_dk[None, :], b_dk, mask=m_many[:, None] & (o_dk < DK)[None, :])
        tl.store(dv_part + o_part[:, None] * DV + o_dv[None, :], b_dv, mask=m_many[:, None] & (o_dv < DV)[None, :])
        if BDK2 > 0:
            b_dk2 = b_dk2 * scale
            tl.store(dk + o_kv[:, None] * DK + o_dk2[None, :], b_dk2.to(dk.dtype.element_ty),
                     mask=m_one[:, None] & (o_dk2 < DK)[None, :])
            tl.store(dk_part + o_part[:, None] * DK + o_dk2[None, :], b_dk2,
                     mask=m_many[:, None] & (o_dk2 < DK)[None, :])


@triton.jit
def selected_bwd_dkv_reduce_kernel(
    dk, dv, dk_part, dv_part, cu_seqlens_k, block_table, seg_first, part_first, NBT,
    H: tl.constexpr, BS: tl.constexpr, BK: tl.constexpr, NKS: tl.constexpr, DK: tl.constexpr,
    DV: tl.constexpr, BDK: tl.constexpr, BDV: tl.constexpr,
):
    """dk, dv (keys packed by cu_seqlens_k) of the buckets split into several segments: their
    partials summed in segment order."""
    i_sk = tl.program_id(0)
    i_key = (i_sk // NKS).to(tl.int64)
    i_seg0 = tl.load(seg_first + i_key)
    n_seg = tl.load(seg_first + i_key + 1) - i_seg0
    if n_seg > 1:
        i_h = i_key // NBT
        i_blk = i_key % NBT
        i_n = tl.load(block_table + i_blk * 2).to(tl.int64)
        i_j = tl.load(block_table + i_blk * 2 + 1).to(tl.int64)
        bos = tl.load(cu_seqlens_k + i_n).to(tl.int64)
        seq_len = tl.load(cu_seqlens_k + i_n + 1).to(tl.int64) - bos
        o_k = (i_sk % NKS) * BK + tl.arange(0, BK)
        m_k = (o_k < BS) & (i_j * BS + o_k < seq_len)
        o_kv = (bos + i_j * BS + o_k) * H + i_h
        o_dk = tl.arange(0, BDK)
        o_dv = tl.arange(0, BDV)
        m_kd = m_k[:, None] & (o_dk < DK)[None, :]
        m_vd = m_k[:, None] & (o_dv < DV)[None, :]
        i_slot0 = tl.load(part_first + i_key)
        b_dk = tl.zeros([BK, BDK], dtype=tl.float32)
        b_dv = tl.zeros([BK, BDV], dtype=tl.float32)
        for i_sub in range(n_seg):
            o_part = (i_slot0 + i_sub) * (NKS * BK) + o_k
            b_dk += tl.load(dk_part + o_part[:, None] * DK + o_dk[None, :], mask=m_kd, other=0.)
            b_dv += tl.load(dv_part + o_part[:, None] * DV + o_dv[None, :], mask=m_vd, other=0.)
        tl.store(dk + o_kv[:, None] * DK + o_dk[None, :], b_dk.to(dk.dtype.element_ty), mask=m_kd)
        tl.store(dv + o_kv[:, None] * DV + o_dv[None, :], b_dv.to(dv.dtype.element_ty), mask=m_vd)


def _tile(G: int, rows: int):
    """(positions per tile, padded rows per tile): as many positions as fit ``rows`` rows."""
    bt = max(1, rows // G)
    return bt, pow2(bt * G)


# Shared memory of one operand tile pair (K and V, or Q and dO) at most: an H200 block has 227 KB,
# and dot-layout conversions need scratch space beside the tiles.
_TILE_BYTES = 64 * 1024


def _fit(n: int, row_bytes: int) -> int:
    """Largest power of two <= n (at least 16) whose rows of ``row_bytes`` fit in _TILE_BYTES."""
    p = 16
    while 2 * p <= n and 2 * p * row_bytes <= _TILE_BYTES:
        p *= 2
    return p


class _Tiles(NamedTuple):
    BT: int  # query positions per tile (forward, dQ)
    BR: int  # rows per tile, BT * G padded to a power of two
    BK: int  # keys per sub-tile (forward; dQ: BK_DQ)
    NKS: int  # sub-tiles per block (forward; dQ: NKS_DQ)
    warps: int
    BQ: int  # query positions per chunk of a dK/dV walk
    BRQ: int  # rows per chunk, BQ * G padded
    BK_KV: int  # keys per dK/dV program
    NKS_KV: int  # dK/dV programs per block
    warps_kv: int
    stages_kv: int
    BR_SC: int  # rows (entries x G heads) per tile of the scatter forward
    BK_SC: int  # keys per sub-tile of the scatter forward
    NKS_SC: int
    warps_sc: int
    stages_sc: int
    warps_dq_sc: int  # scatter dQ
    stages_dq_sc: int
    SHARE: int = 1  # positions per program of the one-position gather forward (FWD_SHARE)
    BK_DQ: int = 64  # keys per sub-tile of the dQ gather kernel
    NKS_DQ: int = 1
    SHARE_DQ: int = 1  # positions per program of the one-position dQ gather (DQ_SHARE)


def _tiles(G: int, block_size: int, DK: int, DV: int, dtype: torch.dtype) -> _Tiles:
    """Tile sizes: the largest that compile for sm_90 without register spills (checked with
    ptxas for G in 1..32, head dims 64..256, bf16/fp16), and whose operand tiles stay within ~64 KB
    of shared memory. float32 runs its products on FMA units (exact, not TF32), which needs more
    registers: smaller tiles, and it is not the fast path."""
    width = pow2(DK) + pow2(DV)
    row_bytes = width * dtype.itemsize
    fp32 = dtype.itemsize >= 4
    # Dk as two tiles in the backward (128 + 64 at 192): a padded width of 384 that works as 320
    split_bwd = not fp32 and width == 384 and sum(triton_utils.head_tiles(DK)) + pow2(DV) <= 320
    bt, br = _tile(G, FWD_ROWS)
    # forward: 64 keys per sub-tile up to padded widths of 384 (H200 64k, Dk/Dv 192/128, run 24:
    # 27.7 ms against 31.8 with 32 keys, pointer loads); dQ keeps 32 above 256 (not measured) except
    # for a split Dk (below)
    bk = _fit(min(pow2(block_size), 32 if width > 384 or fp32 else 64), row_bytes)
    bk_dq = _fit(min(pow2(block_size), 32 if (width > 256 and not split_bwd) or fp32 else 64), row_bytes)
    # dK/dV walk: 64 rows, 4 warps at width <= 256 (H200 64k, G=16: whole backward 32.7 ms against
    # 48.2 with 32 rows, 8 warps); wider heads keep 32 rows, 8 warps (not measured), except a split
    # Dk: H200 64k, 192/128, G=16 (run 37, probe widebwd), whole selected backward 72.4 ms with one
    # padded tile, 63.3 split at these tiles, 57.2 split with 64 keys per dQ sub-tile and dK/dV walks
    # of 64 rows on 4 warps, 2 stages; 45.2 with 32 keys per dK/dV program (run 41, probe
    # slcbwd192: 8 warps 57.4, 32 keys on 8 warps 66.8, 128 rows on 8 warps 46.0, 1 stage 49.0)
    bq, brq = _tile(G, _fit(16 if fp32 else (BWD_ROWS if width <= 256 or split_bwd else 32), row_bytes))
    bk_sc = _fit(min(pow2(block_size), (16 if width > 256 else 32) if fp32 else (32 if width > 384 else 64)),
                 row_bytes)
    bk_kv = min(bk_sc, 32) if split_bwd else bk_sc
    return _Tiles(
        BT=bt, BR=br, BK=bk, NKS=triton.cdiv(block_size, bk), warps=8 if br >= 32 or fp32 else 4,
        BQ=bq, BRQ=brq, BK_KV=bk_kv, NKS_KV=triton.cdiv(block_size, bk_kv),
        warps_kv=8 if width > 256 and not fp32 and not split_bwd else 4,
        stages_kv=2 if (2 * brq * row_bytes <= _TILE_BYTES or split_bwd) and not fp32 else 1,
        BR_SC=16 if fp32 else SCATTER_TILE_ROWS, BK_SC=bk_sc, NKS_SC=triton.cdiv(block_size, bk_sc),
        warps_sc=4, stages_sc=1 if fp32 else 3,  # H200 64k: 19.5 ms (2 stages 20.8, 8 warps 32.6)
        # scatter dQ: wider heads do not fit sm_90's shared memory when pipelined (3 stages at
        # 256/256: 329 KB of 227; 1 stage: 98 KB) and spill less on 8 warps (ptxas, Triton 3.6)
        warps_dq_sc=8 if width > 256 and not fp32 else 4, stages_dq_sc=1 if fp32 or width > 256 else 3,
        SHARE=1 if fp32 or width > 384 else _share(bt, br, DK, DV), BK_DQ=bk_dq,
        NKS_DQ=triton.cdiv(block_size, bk_dq),
        SHARE_DQ=1 if fp32 or width > 384 else _share(bt, br, DK, DV, "DQ_SHARE"),
    )


def _share(bt: int, br: int, DK: int, DV: int, name: str = "FWD_SHARE") -> int:
    """FWD_SHARE (or DQ_SHARE: ``name``) resolved for a tile of ``bt`` positions and ``br`` rows:
    1 unless one position fills the tile, at most ``64 * 128 // (br * padded head width)``.
    (:func:`_tiles` also keeps 1 for float32, not a fast path, and for padded widths Dk + Dv
    above 384: the forward common kernel's tiles spill registers there, 84 bytes at 256/256 with
    ptxas sm_90.)"""
    value = globals()[name]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1 or value & (value - 1):
        raise ValueError(f"nsa.ops.selected.{name}: expected a power of two >= 1, got {value!r}")
    if bt > 1:
        return 1
    return max(1, min(value, 64 * 128 // (br * max(pow2(DK), pow2(DV)))))


def fwd_positions(cfg: _Tiles) -> int:
    """Query positions per program of :func:`_launch_fwd` (its chunk table's chunk)."""
    return cfg.BT * cfg.SHARE


def _chunk_table(cu_seqlens, num_tokens: int, chunk: int) -> torch.Tensor:
    """int32 ``[num_tokens // chunk + num_seqs, 2]`` rows of (sequence, chunk within sequence),
    chunks of every sequence in order, built on the device without host synchronization.

    The row count is a bound the host knows (``sum ceil(len / chunk) <= num_tokens // chunk +
    num_seqs``); rows past the last chunk name chunks past the end of the last sequence, and the
    programs given them do nothing. Row ``r`` of sequence ``n`` is ``first[n] + chunk id`` with
    ``first`` the exclusive cumsum of the per-sequence chunk counts (what ``_reverse_index`` uses).
    """
    num_seqs = cu_seqlens.numel() - 1
    lens = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    n_chunks = torch.div(lens + chunk - 1, chunk, rounding_mode="floor")
    end = torch.cumsum(n_chunks, 0)
    rows = torch.arange(num_tokens // chunk + num_seqs, device=cu_seqlens.device)
    seq = torch.clamp(torch.searchsorted(end, rows, right=True), max=num_seqs - 1)
    return torch.stack([seq, rows - (end - n_chunks)[seq]], 1).to(torch.int32)


def _key_cu_seqlens(cu_seqlens, q_offset: int = 0, cu_seqlens_k=None):
    """cu_seqlens of the packed keys as the kernels take it: ``cu_seqlens_k`` where given, else
    ``q_offset`` more keys than queries (``cu_seqlens``) in every sequence; None where the keys are
    packed as the queries (no offset: the kernels compile today's code)."""
    if cu_seqlens_k is cu_seqlens or (cu_seqlens_k is None and q_offset == 0):
        return None
    if cu_seqlens_k is not None:
        return cu_seqlens_k
    return cu_seqlens + q_offset * torch.arange(cu_seqlens.numel(), dtype=cu_seqlens.dtype, device=cu_seqlens.device)


def _reverse_index(block_indices, cu_seqlens, block_table, block_size: int, chunk: int | None = None,
                   cu_seqlens_k=None):
    """For each (KV head h, global block b of the keys) the ascending packed rows of the queries
    that selected b and can see one of its keys (block start <= query position).

    Args:
        block_indices: int32 ``[N, H, S]`` packed queries.
        cu_seqlens: int32 ``[num_seqs + 1]`` of the queries.
        block_table: int32 ``[NBT, 2]`` from :func:`_chunk_table` of the keys with the block size.
        chunk: None, or cut the lists by chunks of ``chunk`` packed query rows: bucket
            ``c * H * NBT + h * NBT + b`` holds the queries of chunk c only.
        cu_seqlens_k: int32 ``[num_seqs + 1]`` of the keys; None: as cu_seqlens (no query offset).
    Returns:
        offsets int64 ``[H * NBT + 1]`` (``[num_chunks * H * NBT + 1]`` with chunks), an int32 list
        ``[N * H * S]`` (entries past ``offsets[-1]`` unused; bucket k is ``list[offsets[k] :
        offsets[k + 1]]``) and, in the same order, the int64 entries ``t * H * S + h * S + s``
        (packed query row t, slot s of its block list).
    """
    N, H, S = block_indices.shape
    NBT = block_table.shape[0]
    dev = block_indices.device
    tok = torch.arange(N, device=dev)
    seq = torch.searchsorted(cu_seqlens[1:].long(), tok, right=True)  # [N]
    t_rel = tok - cu_seqlens.long()[seq]  # query row in its sequence
    len_q = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    len_k = len_q
    if cu_seqlens_k is not None:
        len_k = (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).long()
        t_rel = t_rel + (len_k - len_q)[seq]  # its position
    # first global block of every sequence, as numbered by block_table
    seq_blocks = -(-len_k // block_size)
    blk_off = torch.cumsum(seq_blocks, 0) - seq_blocks  # [num_seqs]
    idx = block_indices.long()
    valid = (idx >= 0) & (idx * block_size <= t_rel.view(N, 1, 1))
    heads = torch.arange(H, device=dev).view(1, H, 1)
    n_keys = H * NBT
    key = heads * NBT + blk_off[seq].view(N, 1, 1) + idx
    if chunk is not None:
        n_keys *= -(-N // chunk)
        key = key + torch.div(tok, chunk, rounding_mode="floor").view(N, 1, 1) * (H * NBT)
    key = torch.where(valid, key, n_keys)
    if n_keys < 2 ** 31:
        key = key.to(torch.int32)  # half the bytes to sort
    # stable: within a bucket, entries keep their (position, head, slot) order -> ascending positions
    sorted_key, perm = torch.sort(key.flatten(), stable=True)
    query_list = torch.div(perm, H * S, rounding_mode="floor").to(torch.int32)
    offsets = torch.searchsorted(sorted_key, torch.arange(n_keys + 1, device=dev, dtype=sorted_key.dtype))
    return offsets, query_list, perm


class _Segments(NamedTuple):
    first: torch.Tensor  # int64 [HB + 1]: first segment of every bucket, then the number of segments
    part_first: torch.Tensor  # int64 [HB]: first partial slot of a bucket with several segments
    bucket: torch.Tensor  # int32 [max_segments]: bucket of every segment, HB past the last one
    max_segments: int
    max_parts: int


def _segments(offsets, num_entries: int, seg: int) -> _Segments:
    """Cuts every bucket of the reverse index into segments of at most ``seg`` queries (at least
    one segment per bucket, so that every key's gradient is written), on the device.

    The grid and the partial buffer are sized by bounds the host knows without reading the
    device: ``sum max(1, ceil(c / seg)) <= HB + entries / seg`` segments, and the buckets with
    several segments (``c > seg``) hold ``ceil(c / seg) < 2 c / seg`` of them each.
    """
    HB = offsets.numel() - 1
    counts = offsets[1:] - offsets[:-1]
    n_seg = torch.clamp(torch.div(counts + seg - 1, seg, rounding_mode="floor"), min=1)
    first = torch.zeros(HB + 1, dtype=torch.int64, device=offsets.device)
    first[1:] = torch.cumsum(n_seg, 0)
    multi = torch.where(n_seg > 1, n_seg, 0)
    part_first = torch.cumsum(multi, 0) - multi
    max_segments = HB + num_entries // seg
    max_parts = max(1, 2 * num_entries // seg)
    seg_ids = torch.arange(max_segments, device=offsets.device)
    bucket = torch.searchsorted(first[1:], seg_ids, right=True).to(torch.int32)
    return _Segments(first, part_first, bucket, max_segments, max_parts)


def _fwd_tma(k: torch.Tensor, v: torch.Tensor, cfg: _Tiles) -> bool:
    """FWD_TMA resolved for packed contiguous k ``[N, H, DK]``, v ``[N, H, DV]``: TMA loads only in
    the one-position tiles (``cfg.BT == 1``), where :func:`tma_ok` allows them (fp16/bf16 on a
    GPU with TMA, 16-byte aligned base and rows; the interpreter or the sm_90 compile audit),
    for padded head widths of at most 256 (one TMA box dimension). "auto" also leaves head dims
    that would take boxes with padded columns to pointer loads: a Dv that is not a power of two,
    and such a Dk unless the programs of several positions split it into two tiles (the first,
    a power of two, through TMA; the second through pointer loads). H200 64k, Dk/Dv 192/128, 64
    keys per sub-tile: one position per program, one padded tile (run 24), 27.7 ms with pointer
    loads, 29.9 with TMA; programs of 2 positions, two tiles (run 32), 22.1 with pointer loads,
    20.9 with TMA."""
    if not (FWD_TMA == "auto" or isinstance(FWD_TMA, bool)):
        raise ValueError(f"nsa.ops.selected.FWD_TMA: expected 'auto', True or False, got {FWD_TMA!r}")
    DK, DV = k.shape[-1], v.shape[-1]
    split = cfg.SHARE > 1 and triton_utils.head_tiles(DK)[1] > 0
    if FWD_TMA == "auto" and ((pow2(DK) != DK and not split) or pow2(DV) != DV):
        return False
    return (FWD_TMA is not False and cfg.BT == 1 and v.dtype == k.dtype
            and max(pow2(DK), pow2(DV)) <= 256 and tma_ok(k, v))


def _share_plan(block_indices, cu_seqlens, chunk_indices, P: int):
    """(plan ``[N, H, S]``, counts int32 ``[N, H, 2]``) of :func:`selected_share_plan_kernel` for
    programs of ``P`` positions (``chunk_indices``: :func:`_chunk_table` with chunks of P)."""
    N, H, S = block_indices.shape
    plan = torch.empty_like(block_indices)
    counts = torch.empty(N, H, 2, dtype=torch.int32, device=block_indices.device)
    selected_share_plan_kernel[(chunk_indices.shape[0], H)](block_indices, plan, counts, cu_seqlens, chunk_indices,
                                                            H=H, S=S, SP=triton.next_power_of_2(S), P=P,
                                                            num_warps=1)
    return plan, counts


def _launch_fwd(q, k, v, block_indices, block_size, scale, cu_seqlens, chunk_indices, cfg: _Tiles,
                q_offset: int = 0, cu_seqlens_k=None):
    """Packed q ``[N, HQ, DK]`` (sequences: cu_seqlens), k ``[NK, H, DK]``, v ``[NK, H, DV]``
    (sequences: :func:`_key_cu_seqlens` of cu_seqlens, q_offset, cu_seqlens_k), block_indices
    ``[N, H, S]``; chunk_indices from :func:`_chunk_table` of the queries with
    :func:`fwd_positions`. Returns o ``[N, HQ, DV]``, lse ``[N, HQ]``."""
    cu_k = _key_cu_seqlens(cu_seqlens, q_offset, cu_seqlens_k)
    N, HQ, DK = q.shape
    H, DV, S = k.shape[1], v.shape[2], block_indices.shape[2]
    o = new_output((N, HQ, DV), q.dtype, q.device)
    lse = new_output((N, HQ), torch.float32, q.device)
    # num_stages 1 for union walks: their loads sit under data-dependent branches
    stages = GATHER_STAGES if cfg.BT == 1 and not interpreting() else 1
    tma = use_tma(_fwd_tma(k, v, cfg), k, v)
    SP = triton.next_power_of_2(S)
    consts = dict(HQ=HQ, H=H, G=HQ // H, S=S, SP=SP, BS=block_size, BK=cfg.BK, NKS=cfg.NKS,
                  DK=DK, DV=DV, BDK=pow2(DK), BDV=pow2(DV), BR=cfg.BR, STAGES=stages, TMA=tma,
                  num_warps=cfg.warps, num_stages=stages, **dot_args(q.dtype))
    grid = (chunk_indices.shape[0], H)
    if cfg.SHARE > 1:
        plan, counts = _share_plan(block_indices, cu_seqlens, chunk_indices, cfg.SHARE)
        # q . k over a head dim that is not a power of two: two tiles (192 = 128 + 64), not one of 256
        consts["BDK"], consts["BDK2"] = triton_utils.head_tiles(DK)
        # the blocks a program's positions all list: once per program, state parked in o / lse
        selected_fwd_common_kernel[grid](q, k, v, o, lse, plan, counts, cu_seqlens, cu_k, chunk_indices, scale,
                                         P=cfg.SHARE, TB=pow2(cfg.SHARE - 1), **consts)
        # the rest: one position per program, on the planned lists
        del consts["SP"]
        positions = _chunk_table(cu_seqlens, N, 1)
        selected_fwd_planned_kernel[(positions.shape[0], H)](q, k, v, o, lse, plan, counts, cu_seqlens, cu_k,
                                                             positions, scale, **consts)
    else:
        selected_fwd_kernel[grid](q, k, v, o, lse, block_indices, cu_seqlens, cu_k, chunk_indices, scale, BT=cfg.BT,
                                  **consts)
    return o, lse


def _partial_chunk(N: int, HQ: int, S: int, D: int, itemsize: int) -> int:
    """Query rows per chunk of a scatter kernel: its partials (``HQ * S`` rows of ``D``
    values of ``itemsize`` bytes per position) stay within ``PARTIAL_BYTES``."""
    return max(1, min(N, PARTIAL_BYTES // (HQ * S * D * itemsize)))


class _ScatterPlan(NamedTuple):
    NBT: int
    HB: int  # buckets per chunk: H * NBT
    n_chunks: int
    offsets: torch.Tensor  # int64 [n_chunks * HB + 1]
    entries: torch.Tensor  # int64 t * H * S + h * S + s, bucket by bucket
    first: torch.Tensor  # int64 [n_chunks * HB + 1]: first segment of every bucket
    bucket: torch.Tensor  # int32: bucket of every segment
    seg: int  # entries per segment


def _scatter_plan(block_indices, cu_seqlens, cu_seqlens_k, block_table, block_size: int, chunk: int,
                  G: int) -> _ScatterPlan:
    """The chunked reverse index of the KV-block-centric kernels, cut into segments of at most
    ``SCATTER_ROWS // G`` entries (one program each), built on the device. A chunk's programs are
    ``first[c * HB] ..``; the host-known bound on their number is :func:`_scatter_grid`. Queries
    packed by cu_seqlens, keys by cu_seqlens_k (block_table: theirs)."""
    N, H, S = block_indices.shape
    NBT = block_table.shape[0]
    HB = H * NBT
    n_chunks = triton.cdiv(N, chunk)
    offsets, _, entries = _reverse_index(block_indices, cu_seqlens, block_table, block_size, chunk=chunk,
                                         cu_seqlens_k=cu_seqlens_k)
    seg = max(1, SCATTER_ROWS // G)
    counts = offsets[1:] - offsets[:-1]
    n_seg = torch.div(counts + seg - 1, seg, rounding_mode="floor")
    first = torch.zeros(n_chunks * HB + 1, dtype=torch.int64, device=block_indices.device)
    first[1:] = torch.cumsum(n_seg, 0)
    bucket = torch.searchsorted(first[1:], torch.arange(n_chunks * _scatter_grid(HB, chunk, H, S, seg),
                                                        device=block_indices.device), right=True).to(torch.int32)
    return _ScatterPlan(NBT, HB, n_chunks, offsets, entries, first, bucket, seg)


def _scatter_grid(HB: int, rows: int, H: int, S: int, seg: int) -> int:
    """Programs for a chunk of ``rows`` query rows: at most HB + entries / seg segments (the ceil
    of each bucket adds less than one)."""
    return HB + rows * H * S // seg + 1


def _launch_fwd_scatter(q, k, v, block_indices, block_size, scale, cu_seqlens, block_table, cfg: _Tiles,
                        q_offset: int = 0, cu_seqlens_k=None):
    """The KV-block-centric forward: same arguments and results as :func:`_launch_fwd`, with
    block_table ``[NBT, 2]`` (:func:`_chunk_table` of the keys with the block size) instead of the
    tile table.

    Each (KV head, block) is loaded once per chunk of queries and scored against every query
    (x G heads) that selected it, through the reverse index; a query's S per-block results are
    merged in slot order by a second kernel. K/V bytes no longer scale with the number of queries:
    what moves is q once per (query, selected block) and the partials (input dtype, written once,
    read once), in chunks of positions that bound the partials' memory."""
    cu_k = _key_cu_seqlens(cu_seqlens, q_offset, cu_seqlens_k)
    N, HQ, DK = q.shape
    H, DV, S = k.shape[1], v.shape[2], block_indices.shape[2]
    G = HQ // H
    C = _partial_chunk(N, HQ, S, DV, q.element_size())
    plan = _scatter_plan(block_indices, cu_seqlens, cu_k, block_table, block_size, C, G)
    NBT, HB, n_chunks, offsets, entries, first, bucket, seg = plan
    bq, br = _tile(G, cfg.BR_SC)
    o = new_output((N, HQ, DV), q.dtype, q.device)
    lse = new_output((N, HQ), torch.float32, q.device)
    o_part = new_output((C * HQ * S, DV), q.dtype, q.device)
    lse_part = torch.empty(C * HQ * S, dtype=torch.float32, device=q.device)
    bm = 64
    for c in range(n_chunks):
        c0 = c * C
        rows = min(C, N - c0)
        lse_part.fill_(float("-inf"))  # slots no program writes: skipped by the merge
        selected_fwd_scatter_kernel[(_scatter_grid(HB, rows, H, S, seg),)](
            q, k, v, o_part, lse_part, cu_seqlens, cu_k, block_table, offsets, entries, first, bucket, scale,
            NBT, c * HB, c0, HQ=HQ, H=H, G=G, S=S, BS=block_size, BK=cfg.BK_SC, NKS=cfg.NKS_SC, DK=DK, DV=DV,
            BDK=pow2(DK), BDV=pow2(DV), BQ=bq, BR=br, SEG=seg, num_warps=cfg.warps_sc, num_stages=cfg.stages_sc,
            **dot_args(q.dtype),
        )
        selected_fwd_merge_kernel[(triton.cdiv(rows * HQ, bm),)](
            o_part, lse_part, o, lse, c0, rows * HQ, HQ=HQ, S=S, DV=DV, BDV=pow2(DV), BM=bm, num_warps=4,
        )
    return o, lse


def _algorithm(name: str, mode: str, cfg: _Tiles) -> str:
    """FWD_MODE / DQ_MODE (``name``) resolved. "auto": on GPUs, gather when a tile holds one
    position (G >= 16), scatter for smaller groups; gather under the interpreter. H200, 64k,
    random selections (benchmarks/NOTES.md): forward G=16 gather 17.4 ms, scatter 19.2; G=4 22.8
    vs 5.4; G=1 18.4 vs 1.8. Whole backward by dQ algorithm: G=16 32.5 vs 57.3; G=4 28.7 vs 15.7;
    G=1 21.4 vs 5.1."""
    if mode not in ("auto", "gather", "scatter"):
        raise ValueError(f"nsa.ops.selected.{name}: expected 'auto', 'gather' or 'scatter', got {mode!r}")
    if mode != "auto":
        return mode
    return "scatter" if not interpreting() and cfg.BT > 1 else "gather"


def _delta(o: torch.Tensor, do: torch.Tensor) -> torch.Tensor:
    """float32 ``[N, HQ]`` rowsum(dO * O) of packed o, do ``[N, HQ, DV]``."""
    N, HQ, DV = o.shape
    delta = new_output((N, HQ), torch.float32, o.device)
    br = 64  # rows per program
    compressed_bwd_preprocess_kernel[(triton.cdiv(N * HQ, br),)](
        o, do, delta, delta, N * HQ, DV, HAS_DLSE=False, BR=br, BDV=pow2(DV))
    return delta


def _launch_dq_scatter(q, k, v, o, lse, do, delta, block_indices, block_size, scale, cu_seqlens, block_table,
                       cfg: _Tiles, q_offset: int = 0, cu_seqlens_k=None):
    """dQ (and delta, unless given) KV-block-centric, like :func:`_launch_fwd_scatter`: per-slot
    float32 partials (chunks of query rows within ``PARTIAL_BYTES``) summed in slot order."""
    cu_k = _key_cu_seqlens(cu_seqlens, q_offset, cu_seqlens_k)
    N, HQ, DK = q.shape
    H, DV, S = k.shape[1], v.shape[2], block_indices.shape[2]
    G = HQ // H
    if delta is None:
        delta = _delta(o, do)
    C = _partial_chunk(N, HQ, S, DK, 4)
    NBT, HB, n_chunks, offsets, entries, first, bucket, seg = _scatter_plan(
        block_indices, cu_seqlens, cu_k, block_table, block_size, C, G)
    bq, br = _tile(G, cfg.BR_SC)
    dq = new_output(q.shape, q.dtype, q.device)
    dq_part = new_output((C * HQ * S, DK), torch.float32, q.device)
    flag = torch.empty(C * HQ * S, dtype=torch.int8, device=q.device)
    bm = 64
    for c in range(n_chunks):
        c0 = c * C
        rows = min(C, N - c0)
        flag.zero_()  # slots no program writes: skipped by the reduce
        selected_bwd_dq_scatter_kernel[(_scatter_grid(HB, rows, H, S, seg),)](
            q, k, v, lse, do, delta, dq_part, flag, cu_seqlens, cu_k, block_table, offsets, entries, first,
            bucket, scale, NBT, c * HB, c0, HQ=HQ, H=H, G=G, S=S, BS=block_size, BK=cfg.BK_SC, NKS=cfg.NKS_SC, DK=DK,
            DV=DV, BDK=pow2(DK), BDV=pow2(DV), BQ=bq, BR=br, SEG=seg, num_warps=cfg.warps_dq_sc,
            num_stages=cfg.stages_dq_sc, **dot_args(q.dtype),
        )
        selected_bwd_dq_reduce_kernel[(triton.cdiv(rows * HQ, bm),)](
            dq_part, flag, dq, c0, rows * HQ, HQ=HQ, S=S, DK=DK, BDK=pow2(DK), BM=bm, num_warps=4,
        )
    return dq, delta


def _bwd_consts(q, k, v, block_size: int, split: bool = True) -> dict:
    """Compile-time arguments every backward kernel takes, for packed q ``[N, HQ, DK]``, k ``[NK, H,
    DK]``, v ``[NK, H, DV]``; ``split``: q . k and dK / dQ over a head dim that is not a power of two
    as two tiles (192 = 128 + 64: BDK, BDK2), else one padded tile (BDK)."""
    HQ, DK, H, DV = q.shape[1], q.shape[2], k.shape[1], v.shape[2]
    consts = dict(HQ=HQ, H=H, G=HQ // H, BS=block_size, DK=DK, DV=DV, BDK=pow2(DK), BDV=pow2(DV),
                  **dot_args(q.dtype))
    if split:
        consts.update(zip(("BDK", "BDK2"), triton_utils.head_tiles(DK)))
    return consts


def _launch_dq_shared(q, k, v, o, lse, do, delta, block_indices, block_size, scale, cu_seqlens, positions,
                      cfg: _Tiles, q_offset: int = 0, cu_seqlens_k=None):
    """dQ (and delta, unless given) of the gather with one position per tile, in programs of
    ``cfg.SHARE_DQ`` positions: the plan of the forward (:func:`selected_share_plan_kernel`), the
    blocks every position of a program lists through :func:`selected_bwd_dq_common_kernel`, the
    rest through :func:`selected_bwd_dq_planned_kernel`, one position per program (``positions``:
    :func:`_chunk_table` of the queries with chunks of one position). Keys packed as in
    :func:`_launch_fwd`."""
    cu_k = _key_cu_seqlens(cu_seqlens, q_offset, cu_seqlens_k)
    N, H, S = q.shape[0], k.shape[1], block_indices.shape[2]
    P = cfg.SHARE_DQ
    if delta is None:
        delta = _delta(o, do)
    chunks = _chunk_table(cu_seqlens, N, P)
    SP = triton.next_power_of_2(S)
    plan, counts = _share_plan(block_indices, cu_seqlens, chunks, P)
    dq = new_output(q.shape, q.dtype, q.device)
    stages = GATHER_STAGES if not interpreting() else 1
    consts = dict(_bwd_consts(q, k, v, block_size), S=S, BK=cfg.BK_DQ, NKS=cfg.NKS_DQ, BR=cfg.BR,
                  STAGES=stages, num_warps=cfg.warps, num_stages=stages)
    selected_bwd_dq_common_kernel[(chunks.shape[0], H)](q, k, v, lse, do, dq, delta, plan, counts, cu_seqlens,
                                                        cu_k, chunks, scale, SP=SP, P=P, TB=pow2(P - 1), **consts)
    selected_bwd_dq_planned_kernel[(positions.shape[0], H)](q, k, v, lse, do, dq, delta, plan, counts, cu_seqlens,
                                                            cu_k, positions, scale, **consts)
    return dq, delta


def _launch_bwd(q, k, v, o, lse, do, block_indices, block_size, scale, cu_seqlens, chunk_indices,
                block_table, cfg: _Tiles, delta=None, q_offset: int = 0, cu_seqlens_k=None):
    """Packed tensors as in :func:`_launch_fwd` (chunk_indices: :func:`_chunk_table` of the queries
    with ``cfg.BT``), plus o, do ``[N, HQ, DV]``, lse ``[N, HQ]`` and block_table ``[NBT, 2]``
    (:func:`_chunk_table` of the keys with the block size). Returns dq, dk ``[NK, H, DK]``, dv.
    ``delta`` ``[N, HQ]`` float32 = rowsum(dO * o), when given (:mod:`nsa.ops.fused`), is not
    recomputed and ``o`` is not read."""
    cu_k = _key_cu_seqlens(cu_seqlens, q_offset, cu_seqlens_k)
    N, HQ, DK = q.shape
    H, DV, S = k.shape[1], v.shape[2], block_indices.shape[2]
    common = _bwd_consts(q, k, v, block_size, split=False)
    split = _bwd_consts(q, k, v, block_size)
    if _algorithm("DQ_MODE", DQ_MODE, cfg) == "scatter":
        dq, delta = _launch_dq_scatter(q, k, v, o, lse, do, delta, block_indices, block_size, scale, cu_seqlens,
                                       block_table, cfg, cu_seqlens_k=cu_k)
    elif cfg.SHARE_DQ > 1:
        # cfg.SHARE_DQ > 1 only where a tile holds one position: chunk_indices are single positions
        dq, delta = _launch_dq_shared(q, k, v, o, lse, do, delta, block_indices, block_size, scale, cu_seqlens,
                                      chunk_indices, cfg, cu_seqlens_k=cu_k)
    else:
        dq = new_output(q.shape, q.dtype, q.device)
        has_delta = delta is not None
        if not has_delta:
            delta = new_output((N, HQ), torch.float32, q.device)
        # num_stages 1 for union walks: their loads sit under data-dependent branches
        stages = GATHER_STAGES if cfg.BT == 1 and not interpreting() else 1
        selected_bwd_dq_kernel[(chunk_indices.shape[0], H)](
            q, k, v, o, lse, do, dq, delta, block_indices, cu_seqlens, cu_k, chunk_indices, scale,
            S=S, SP=triton.next_power_of_2(S), BK=cfg.BK_DQ, NKS=cfg.NKS_DQ, BT=cfg.BT, BR=cfg.BR,
            STAGES=stages, HAS_DELTA=has_delta, num_warps=cfg.warps, num_stages=stages, **split,
        )
    NBT = block_table.shape[0]
    offsets, query_list, _ = _reverse_index(block_indices, cu_seqlens, block_table, block_size, cu_seqlens_k=cu_k)
    seg = _segments(offsets, N * H * S, KV_SEGMENT)
    dk = new_output(k.shape, k.dtype, k.device)
    dv = new_output(v.shape, v.dtype, v.device)
    # dK and dV of BK_KV keys stay in float32 registers for the whole walk; a block is split into
    # key sub-tiles (separate programs) when that would not fit
    BSP = cfg.BK_KV * cfg.NKS_KV
    dk_part = new_output((seg.max_parts, BSP, DK), torch.float32, q.device)
    dv_part = new_output((seg.max_parts, BSP, DV), torch.float32, q.device)
    kv = dict(common, BK=cfg.BK_KV, NKS=cfg.NKS_KV)
    selected_bwd_dkv_kernel[(seg.max_segments * cfg.NKS_KV,)](
        q, k, v, lse, do, delta, dk, dv, dk_part, dv_part, cu_seqlens, cu_k, block_table, offsets, query_list,
        seg.bucket, seg.first, seg.part_first, scale, NBT, KV_SEGMENT, BQ=cfg.BQ, BR=cfg.BRQ,
        num_warps=cfg.warps_kv, num_stages=cfg.stages_kv, **(kv | split),
    )
    for key in ("HQ", "G", "DOT_PRECISION", "DOT_UPCAST"):
        del kv[key]
    selected_bwd_dkv_reduce_kernel[(H * NBT * cfg.NKS_KV,)](
        dk, dv, dk_part, dv_part, cu_seqlens if cu_k is None else cu_k, block_table, seg.first, seg.part_first, NBT,
        num_warps=8, **kv,
    )
    return dq, dk, dv


def _packed_cu_seqlens(B: int, T: int, TK: int, device, cu_seqlens, q_offset: int, cu_seqlens_k):
    """(queries' cu_seqlens, keys' as :func:`_key_cu_seqlens` gives it, keys' as a tensor) of the
    packed layout: dense input (cu_seqlens None) is B sequences of T queries and TK = T + q_offset
    keys."""
    if cu_seqlens is None:
        cu = uniform_cu_seqlens(B, T, device)
        cu_k = uniform_cu_seqlens(B, TK, device) if q_offset else None
    else:
        cu, cu_k = cu_seqlens, _key_cu_seqlens(cu_seqlens, q_offset, cu_seqlens_k)
    return cu, cu_k, cu if cu_k is None else cu_k


# The kernels are opaque to torch.compile: custom ops with fake (shape-only) implementations.
@torch.library.custom_op("nsa::selected_attention_fwd", mutates_args=())
def _selected_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_indices: torch.Tensor,
                     block_size: int, scale: float, cu_seqlens: torch.Tensor | None, q_offset: int = 0,
                     cu_seqlens_k: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    B, T, HQ, DK = q.shape
    TK, H, DV = k.shape[1], k.shape[2], v.shape[3]
    if B * T == 0:
        return q.new_zeros(B, T, HQ, DV), q.new_zeros(B, T, HQ, dtype=torch.float32)
    cu, cu_k, keys = _packed_cu_seqlens(B, T, TK, q.device, cu_seqlens, q_offset, cu_seqlens_k)
    cfg = _tiles(HQ // H, block_size, DK, DV, q.dtype)
    args = (q.reshape(B * T, HQ, DK).contiguous(), k.reshape(B * TK, H, DK).contiguous(),
            v.reshape(B * TK, H, DV).contiguous(), block_indices.reshape(B * T, H, -1).contiguous(),
            block_size, scale, cu)
    if _algorithm("FWD_MODE", FWD_MODE, cfg) == "scatter":
        o, lse = _launch_fwd_scatter(*args, _chunk_table(keys, B * TK, block_size), cfg, cu_seqlens_k=cu_k)
    else:
        o, lse = _launch_fwd(*args, _chunk_table(cu, B * T, fwd_positions(cfg)), cfg, cu_seqlens_k=cu_k)
    return o.view(B, T, HQ, DV), lse.view(B, T, HQ)


@_selected_fwd_op.register_fake
def _(q, k, v, block_indices, block_size, scale, cu_seqlens, q_offset=0, cu_seqlens_k=None):
    B, T, HQ, _ = q.shape
    return q.new_empty(B, T, HQ, v.shape[3]), q.new_empty(B, T, HQ, dtype=torch.float32)


@torch.library.custom_op("nsa::selected_attention_bwd", mutates_args=())
def _selected_bwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
                     do: torch.Tensor, block_indices: torch.Tensor, block_size: int, scale: float,
                     cu_seqlens: torch.Tensor | None, delta: torch.Tensor | None = None, q_offset: int = 0,
                     cu_seqlens_k: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B, T, HQ, DK = q.shape
    TK, H, DV = k.shape[1], k.shape[2], v.shape[3]
    if B * T == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    cu, cu_k, keys = _packed_cu_seqlens(B, T, TK, q.device, cu_seqlens, q_offset, cu_seqlens_k)
    cfg = _tiles(HQ // H, block_size, DK, DV, q.dtype)
    chunks = _chunk_table(cu, B * T, cfg.BT)
    blocks = _chunk_table(keys, B * TK, block_size)
    N, NK = B * T, B * TK
    dq, dk, dv = _launch_bwd(q.reshape(N, HQ, DK).contiguous(), k.reshape(NK, H, DK).contiguous(),
                             v.reshape(NK, H, DV).contiguous(), o.reshape(N, HQ, DV).contiguous(),
                             lse.reshape(N, HQ).contiguous(), do.reshape(N, HQ, DV).contiguous(),
                             block_indices.reshape(N, H, -1).contiguous(), block_size, scale, cu, chunks,
                             blocks, cfg, delta=None if delta is None else delta.reshape(N, HQ).contiguous(),
                             cu_seqlens_k=cu_k)
    return dq.view(q.shape), dk.view(k.shape), dv.view(v.shape)


@_selected_bwd_op.register_fake
def _(q, k, v, o, lse, do, block_indices, block_size, scale, cu_seqlens, delta=None, q_offset=0, cu_seqlens_k=None):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


class SelectedAttentionFunction(torch.autograd.Function):

    @staticmethod
    def forward(ctx, q, k, v, block_indices, block_size, scale, cu_seqlens, q_offset=0, cu_seqlens_k=None):
        o, lse = _selected_fwd_op(q, k, v, block_indices, block_size, scale, cu_seqlens, q_offset, cu_seqlens_k)
        ctx.save_for_backward(q, k, v, o, lse, block_indices, cu_seqlens, cu_seqlens_k)
        ctx.block_size, ctx.scale, ctx.q_offset = block_size, scale, q_offset
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, block_indices, cu_seqlens, cu_seqlens_k = ctx.saved_tensors
        dq, dk, dv = _selected_bwd_op(q, k, v, o, lse, do, block_indices, ctx.block_size, ctx.scale, cu_seqlens,
                                      q_offset=ctx.q_offset, cu_seqlens_k=cu_seqlens_k)
        return dq, dk, dv, None, None, None, None, None, None


def selected_attention_triton(q, k, v, block_indices, block_size, scale, cu_seqlens=None, q_offset: int = 0,
                              cu_seqlens_k=None):
    """Triton selected attention; semantics of :func:`nsa.ops.selected_attention`.

    Args:
        q: ``[B, T, HQ, Dk]``; k: ``[B, TK, H, Dk]``; v: ``[B, TK, H, Dv]``; fp16, bf16 or fp32
            (float64 is computed in float32). Dense: ``TK = T + q_offset``, query row t at
            position ``q_offset + t``. Packed (B = 1): queries by cu_seqlens, keys by cu_seqlens_k.
        block_indices: int32 ``[B, T, H, S]`` (query rows; ids of the keys' blocks), validated by
            the caller.
        block_size: int; scale: float; cu_seqlens: int32 ``[N+1]`` or None (B = 1 when given).
        q_offset: dense input only: the queries are the last T of TK positions.
        cu_seqlens_k: int32 ``[N+1]`` of the packed keys, or None (the same as cu_seqlens); sequence
            n's query row t has position ``len_k[n] - len_q[n] + t``.
    Returns:
        o ``[B, T, HQ, Dv]`` in q's dtype.
    """
    if q.dtype == torch.float64:
        o = SelectedAttentionFunction.apply(q.float(), k.float(), v.float(), block_indices, block_size,
                                            scale, cu_seqlens, q_offset, cu_seqlens_k)
        return o.double()
    return SelectedAttentionFunction.apply(q, k, v, block_indices, block_size, scale, cu_seqlens, q_offset,
                                           cu_seqlens_k)
