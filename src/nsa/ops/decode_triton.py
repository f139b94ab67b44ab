"""NSA decoding in Triton: one new query per sequence against a padded KV cache.

With one query per sequence the only way to fill a tensor-core tile is GQA packing: the ``G``
query heads of one KV head are the rows of every tile, padded to ``GP = max(16, 2^k >= G)``
rows. Every program below owns one (sequence, KV head) pair ``nh`` and, where the work is long,
one split of it (flash-decoding style), so that batch 1 still spreads over the whole GPU.

Five launches, no host synchronization (every size comes from a tensor shape; ``seq_lens`` stays
on the device, so a decode step can be captured in a CUDA graph). What the host does per step
is planned once per shape (:func:`_launch_plan`) and the workspaces are one allocation:

1. ``decode_fwd_kernel`` (compressed + window): a program attends to one split of the visible
   compressed tokens or of the window keys and writes an unnormalized partial ``(m, l, acc)``
   (base-2 running max, sum of exponentials, weighted value sum) per row. The compressed
   splits also keep their scaled scores ``q.k_cmp`` (float32, ``G`` per token: 64 bytes for
   G = 16 where a second pass would read a 256-byte key again).
2. ``decode_score_kernel``: a program owns ``BJ`` selection blocks. It merges the compressed
   partials' ``(m, l)`` into the final log-sum-exp, turns the kept scores of the compressed
   tokens that overlap its blocks into ``p = exp(s - lse)``, sums them over the group's heads
   and weighs tokens onto blocks by their overlap (the stride-piece count of
   :func:`nsa.ops.utils.overlap_matrix`), writing float32 block scores to a workspace.
3. ``decode_topk_kernel``: one program per ``nh`` picks the top ``num_selected`` causal blocks
   (forced blocks first, lower id first among equal scores, the rule of the reference) from
   sortable int64 keys ``float_bits(priority) << 32 | (2^31 - 1 - j)``, walking the blocks in
   chunks and keeping a running top set, and writes the ids ascending, then -1.
4. ``decode_fwd_kernel`` again (selected): a program attends to a split of the selected blocks.
5. ``decode_combine_kernel``: a program per query head merges each branch's partials (all at
   once, one fixed reduction tree: deterministic), normalizes, applies the three gates and
   writes ``o`` in q's dtype.

Two variants of steps 1-3, off until timed on a GPU (:class:`DecodePlan`; same selection rule,
tested like the default): ``tile_sums``, the compressed splits keep per tile of compressed tokens
and query head the tile's score max and ``exp(s - max)`` already weighed onto the blocks the tile
overlaps (18 floats per 64 tokens at the paper's sizes instead of 64 scores), which the score
kernel gathers per block; ``topk_sort``, each chunk's top keys by Triton's partial bitonic sort
(``tl.topk``) instead of ``num_selected`` rounds of max-reductions.

Partials are reduced with vector loads, never a loop over splits: a serial loop would pay one
memory latency per split, which dominates at batch 1. Only positions below ``seq_lens[n]`` (and
compressed tokens below ``num_compressed(seq_lens[n])``) are ever read: the padding of the
caches may hold anything.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .triton_utils import dot, dot_args, pow2, softmax_step
from .utils import new_output

# Keys per attention tile (float32: 32, so that the staged K/V tiles fit shared memory and
# the registers do not spill; sm_90 compile checks).
TILE = 64
TILE_FP32 = 32
# Programs wanted per launch before a branch is split further (about 2 per SM of an H200).
TARGET_PROGRAMS = 264
# Most splits of one branch: the combine kernel holds all partials of a head in registers.
MAX_SPLITS = 32
# Causal blocks per top-n chunk: the running top set absorbs one chunk per iteration.
TOPK_CHUNK = 1024
# Triton's partial bitonic sort, for DecodePlan.topk_sort (without it the plan falls back to
# the rounds of max-reductions).
HAS_TOPK = hasattr(tl, "topk")

_LOG2E = 1.4426950408889634


@triton.jit
def _attend(b_q, b_m, b_l, b_acc, k, v, row0, i_h, lo, hi, qk_scale, p_t, s_stride, pages,
            H: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
            BDK: tl.constexpr, BDV: tl.constexpr, BK: tl.constexpr, STORE_S: tl.constexpr,
            DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
            PAGED: tl.constexpr, PS: tl.constexpr, SHIFT: tl.constexpr,
            KS: tl.constexpr, ST: tl.constexpr, BS: tl.constexpr, SUMS: tl.constexpr, NBT: tl.constexpr,
            NBW: tl.constexpr):
    """Online-softmax update of ``(b_m, b_l, b_acc)`` ``[GP], [GP], [GP, BDV]`` with the keys at
    positions ``[lo, hi)`` (``lo`` a multiple of ``BK``) of the cache row starting at token ``row0``
    (int64). ``PAGED``: ``k, v`` are page pools ``[P, PS, H, D]`` and position i is slot
    ``(i + SHIFT) % PS`` of page ``pages[(i + SHIFT) // PS]`` (``pages``: the sequence's row of the
    page table).

    ``STORE_S`` (the keys are compressed tokens): also write what the block scores need
    (:func:`decode_score_kernel`). Without ``SUMS``: the base-2 scaled scores of the ``G`` real
    rows at ``p_t + r * s_stride + position``. With ``SUMS``: per tile ``t`` of ``BK`` tokens and
    real row ``r``, at ``p_t + (t * G + r) * (NBT + 1)``, the tile's base-2 row max ``m_t`` (slot
    0), then, for the ``NBT`` selection blocks from ``j0 = t * BK * ST // BS`` on,
    ``sum_i exp2(s[r, i] - m_t) * W[i, j]`` over the tile's tokens i (``W``:
    :func:`nsa.ops.utils.overlap_matrix`; a tf32x3 dot, whose small-integer ``W`` is exact):
    ``NBT + 1`` floats per row for ``BK`` tokens where the scores take ``BK``. ``NBW``: ``NBT``
    rounded up to a dot tile."""
    o_r = tl.arange(0, GP)
    o_dk = tl.arange(0, BDK)
    o_dv = tl.arange(0, BDV)
    for i0 in range(lo, hi, BK):
        i_k = i0 + tl.arange(0, BK)  # [BK] key positions
        m_k = i_k < hi
        if PAGED:
            i_t = i_k + SHIFT
            i_p = tl.load(pages + i_t // PS, mask=m_k, other=0).to(tl.int64)
            o_kv = (i_p * PS + i_t % PS) * H + i_h  # [BK] int64 rows of [P * PS * H]
        else:
            o_kv = (row0 + i_k) * H + i_h  # [BK] int64 rows of [N * cap * H]
        b_k = tl.load(k + o_kv[:, None] * DK + o_dk[None, :], mask=m_k[:, None] & (o_dk < DK)[None, :],
                      other=0.)  # [BK, BDK]
        b_v = tl.load(v + o_kv[:, None] * DV + o_dv[None, :], mask=m_k[:, None] & (o_dv < DV)[None, :],
                      other=0.)  # [BK, BDV]
        b_s = dot(b_q, tl.trans(b_k), DOT_PRECISION, DOT_UPCAST) * qk_scale  # [GP, BK]
        if STORE_S and not SUMS:
            tl.store(p_t + o_r[:, None] * s_stride + i_k[None, :], b_s, mask=(o_r < G)[:, None] & m_k[None, :])
        b_s = tl.where(m_k[None, :], b_s, float("-inf"))
        if STORE_S and SUMS:
            # a tile starts below hi, so it holds a key: m_t is finite
            b_mt = tl.max(b_s, axis=1)  # [GP]
            b_pt = tl.exp2(b_s - b_mt[:, None])  # [GP, BK], 0 where masked
            o_j = (i0 * ST) // BS + tl.arange(0, NBW)  # [NBW] block ids
            w_lo = tl.maximum(i_k[:, None] * ST, o_j[None, :] * BS)
            w_hi = tl.minimum(i_k[:, None] * ST + KS, (o_j[None, :] + 1) * BS)
            b_w = (tl.maximum(w_hi - w_lo, 0) // ST).to(tl.float32)  # [BK, NBW] small integers
            b_bp = tl.dot(b_pt, b_w, input_precision="tf32x3")  # [GP, NBW]
            o_t = p_t + ((i0 // BK) * G + o_r) * (NBT + 1)  # [GP] row starts
            m_r = o_r < G
            o_jj = tl.arange(0, NBW)
            tl.store(o_t, b_mt, mask=m_r)
            tl.store(o_t[:, None] + 1 + o_jj[None, :], b_bp, mask=m_r[:, None] & (o_jj < NBT)[None, :])
        b_m, b_l, b_acc = softmax_step(b_s, b_v, b_m, b_l, b_acc, DOT_PRECISION, DOT_UPCAST)
    return b_m, b_l, b_acc


@triton.jit
def _merge_lse2(ws_m, ws_l, i_nh, NS_C, P, GP: tl.constexpr, PC: tl.constexpr):
    """Base-2 log-sum-exp ``[GP]`` of the compressed branch from its partials ``0 .. NS_C-1``
    (all loaded at once: a loop over them would pay one memory latency per split)."""
    o_p = tl.arange(0, PC)
    o_r = tl.arange(0, GP)
    m_p = o_p < NS_C
    o_w = (i_nh * P + o_p)[:, None] * GP + o_r[None, :]  # [PC, GP] int64
    b_mp = tl.load(ws_m + o_w, mask=m_p[:, None], other=float("-inf"))
    b_lp = tl.load(ws_l + o_w, mask=m_p[:, None], other=0.)
    b_m = tl.max(b_mp, axis=0)  # [GP]
    b_m_safe = tl.where(b_m == float("-inf"), 0., b_m)
    b_l = tl.sum(b_lp * tl.exp2(b_mp - b_m_safe[None, :]), axis=0)
    return b_m + tl.log2(tl.where(b_l > 0, b_l, 1.))


@triton.jit
def decode_fwd_kernel(
    q, k_a, v_a, k_b, v_b, seq_lens, block_indices, ws_m, ws_l, ws_acc, ws_t, qk_scale, page_table,
    CAP_A, CAP_B, NS_A, SPLIT_A, SPLIT_B, P_OFF, P, M,
    H: tl.constexpr, G: tl.constexpr, GP: tl.constexpr,
    DK: tl.constexpr, DV: tl.constexpr, BDK: tl.constexpr, BDV: tl.constexpr, BK: tl.constexpr,
    MODE: tl.constexpr, KS: tl.constexpr, ST: tl.constexpr, BS: tl.constexpr, S: tl.constexpr,
    SP: tl.constexpr, W: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
    PAGED: tl.constexpr, PS_A: tl.constexpr, PS_B: tl.constexpr, SHIFT_A: tl.constexpr,
    SUMS: tl.constexpr, NBT: tl.constexpr, NBW: tl.constexpr,
):
    """One split of one branch for one (sequence n, KV head h) -> partial ``(m, l, acc)`` of the
    ``GP`` rows (query heads ``h*G + r``; rows ``r >= G`` are zero padding) at workspace slot
    ``P_OFF + program_id(1)``; ``program_id(0)`` is ``nh`` (the grid's long axis).

    MODE 0 (compressed + window): splits ``< NS_A`` take ``SPLIT_A`` compressed tokens each
    (a multiple of ``BK``) from ``k_a/v_a`` ``[N, CAP_A, H, D]`` and keep what the block scoring
    needs in ``ws_t`` (:func:`_attend`): their scores ``[N * H, G, CAP_A]``, or with ``SUMS`` the
    per-tile sums ``[N * H, cdiv(CAP_A, BK), G, NBT + 1]``; the others ``SPLIT_B`` window keys
    each from
    ``k_b/v_b`` ``[N, CAP_B, H, D]``. MODE 1 (selected): ``SPLIT_A`` entries of
    ``block_indices`` ``[N, H, S]`` each, keys from ``k_a/v_a``.

    ``PAGED``: every cache is a page pool read through row n of ``page_table`` ``[N, M]`` (see
    :mod:`nsa.ops.decode_paged`): ``PS_A`` / ``PS_B`` tokens per page of ``k_a`` / ``k_b``,
    ``SHIFT_A`` the compressed tokens' index shift in their pages; ``CAP_*`` are then the logical
    capacities."""
    i_nh, i_s = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    i_n, i_h = i_nh // H, i_nh % H
    seq_len = tl.load(seq_lens + i_n).to(tl.int64)
    pages = page_table + i_n * M

    o_r = tl.arange(0, GP)
    o_dk = tl.arange(0, BDK)
    m_r = o_r < G
    b_q = tl.load(q + (i_nh * G + o_r)[:, None] * DK + o_dk[None, :], mask=m_r[:, None] & (o_dk < DK)[None, :],
                  other=0.)  # [GP, BDK]
    b_m = tl.full([GP], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([GP], dtype=tl.float32)
    b_acc = tl.zeros([GP, BDV], dtype=tl.float32)
    if MODE == 0:
        if i_s < NS_A:
            # compressed token i is visible to the query at seq_len - 1 iff i < num_compressed(seq_len)
            n_cmp = tl.where(seq_len >= KS, (seq_len - KS) // ST + 1, 0)
            lo = i_s * SPLIT_A
            hi = tl.minimum(lo + SPLIT_A, n_cmp)
            if SUMS:
                p_t = ws_t + i_nh * ((CAP_A + BK - 1) // BK) * G * (NBT + 1)
            else:
                p_t = ws_t + i_nh * G * CAP_A
            b_m, b_l, b_acc = _attend(b_q, b_m, b_l, b_acc, k_a, v_a, i_n * CAP_A, i_h, lo, hi, qk_scale, p_t,
                                      CAP_A, pages, H, G, GP, DK, DV, BDK, BDV, BK, True, DOT_PRECISION,
                                      DOT_UPCAST, PAGED, PS_A, SHIFT_A, KS, ST, BS, SUMS, NBT, NBW)
        else:
            lo = tl.maximum(seq_len - W, 0) + (i_s - NS_A) * SPLIT_B
            hi = tl.minimum(lo + SPLIT_B, seq_len)
            b_m, b_l, b_acc = _attend(b_q, b_m, b_l, b_acc, k_b, v_b, i_n * CAP_B, i_h, lo, hi, qk_scale, ws_t,
                                      0, pages, H, G, GP, DK, DV, BDK, BDV, BK, False, DOT_PRECISION, DOT_UPCAST,
                                      PAGED, PS_B, 0, KS, ST, BS, SUMS, NBT, NBW)
    else:
        e_lo = i_s * SPLIT_A
        e_hi = tl.minimum(e_lo + SPLIT_A, S)
        # the whole list at once: a load per entry would put a memory latency before every block
        o_e = tl.arange(0, SP)
        b_ids = tl.load(block_indices + i_nh * S + o_e, mask=o_e < S, other=-1)  # [SP]
        for i_e in range(e_lo, e_hi):
            i_b = tl.sum(tl.where(o_e == i_e, b_ids, 0)).to(tl.int64)
            lo = i_b * BS
            # an unused slot (-1) gives an empty range
            hi = tl.where(i_b >= 0, tl.minimum(lo + BS, seq_len), lo)
            b_m, b_l, b_acc = _attend(b_q, b_m, b_l, b_acc, k_a, v_a, i_n * CAP_A, i_h, lo, hi, qk_scale, ws_t,
                                      0, pages, H, G, GP, DK, DV, BDK, BDV, BK, False, DOT_PRECISION, DOT_UPCAST,
                                      PAGED, PS_A, 0, KS, ST, BS, SUMS, NBT, NBW)

    o_w = (i_nh * P + P_OFF + i_s) * GP + o_r  # [GP] int64
    o_dv = tl.arange(0, BDV)
    tl.store(ws_m + o_w, b_m)
    tl.store(ws_l + o_w, b_l)
    tl.store(ws_acc + o_w[:, None] * BDV + o_dv[None, :], b_acc)


@triton.jit
def decode_score_kernel(
    ws_t, seq_lens, ws_m, ws_l, score, CAP_C, NT_CAP, NB_CAP, NS_C, P,
    H: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, PC: tl.constexpr, BC: tl.constexpr, BJ: tl.constexpr,
    KS: tl.constexpr, ST: tl.constexpr, BS: tl.constexpr, BK: tl.constexpr, SUMS: tl.constexpr,
    NBT: tl.constexpr, NTB: tl.constexpr,
):
    """Scores of blocks ``[j0, j0 + BJ)`` (``j0 = program_id(1) * BJ``) for one (n, h) = program_id(0):
    ``score[nh, j] = sum_{r < G} sum_i exp2(s2[r, i] - lse2[r]) * W[i, j]`` over the visible
    compressed tokens i, written to ``score`` ``[N * H, NB_CAP]`` float32 for causal blocks.

    From what the compressed pass kept in ``ws_t`` (:func:`_attend`): without ``SUMS`` the base-2
    scores ``s2`` ``[N * H, G, CAP_C]`` of the tokens overlapping the blocks, ``BC`` at a time,
    weighed onto the blocks here; with ``SUMS`` the per-tile sums ``[N * H, NT_CAP, G, NBT + 1]``:
    block j gathers the at most ``NTB`` tiles of ``BK`` tokens holding a token that overlaps it,
    each scaled by ``exp2(m_t - lse2)``."""
    i_nh, i_c = tl.program_id(0).to(tl.int64), tl.program_id(1)
    seq_len = tl.load(seq_lens + i_nh // H).to(tl.int64)
    n_cmp = tl.where(seq_len >= KS, (seq_len - KS) // ST + 1, 0)
    j0 = i_c * BJ
    o_j = j0 + tl.arange(0, BJ)  # [BJ] block ids
    m_j = (o_j <= (seq_len - 1) // BS) & (o_j < NB_CAP)

    b_lse2 = _merge_lse2(ws_m, ws_l, i_nh, NS_C, P, GP, PC)  # [GP] the final one, from all splits
    o_r = tl.arange(0, GP)
    m_r = o_r < G
    b_sc = tl.zeros([BJ], dtype=tl.float32)
    if SUMS:
        b_lse2 = tl.where(b_lse2 == float("-inf"), 0., b_lse2)  # rows that saw nothing read no tile
        # tokens whose span [i*ST, i*ST + KS) meets block j's span [j*BS, (j+1)*BS): [i_lo, i_hi)
        i_lo = tl.maximum(o_j * BS - KS + ST, 0) // ST
        i_hi = tl.minimum((o_j + 1) * BS // ST, n_cmp)
        p_t = ws_t + i_nh * NT_CAP * G * (NBT + 1)
        for u in tl.static_range(NTB):
            t = i_lo // BK + u  # [BJ] a tile holding tokens of block j, if t * BK < i_hi
            m_t = m_j & (t * BK < i_hi)
            jj = o_j - (t * BK * ST) // BS  # j's slot among the tile's blocks, in [0, NBT)
            o_t = p_t + (t[None, :] * G + o_r[:, None]) * (NBT + 1)  # [GP, BJ]
            m_rt = m_r[:, None] & m_t[None, :]
            b_mt = tl.load(o_t, mask=m_rt, other=float("-inf"))
            b_bp = tl.load(o_t + 1 + jj[None, :], mask=m_rt, other=0.)
            b_sc += tl.sum(tl.where(m_rt, tl.exp2(b_mt - b_lse2[:, None]) * b_bp, 0.), axis=0)
    else:
        p_s = ws_t + (i_nh * G + o_r) * CAP_C  # [GP] row starts
        # tokens whose span [i*ST, i*ST + KS) meets the blocks' span [j0*BS, (j0+BJ)*BS)
        i_lo = tl.maximum(j0 * BS - KS + ST, 0) // ST
        i_hi = tl.minimum((j0 + BJ) * BS // ST, n_cmp)
        for i0 in range(i_lo, i_hi, BC):
            i_k = i0 + tl.arange(0, BC)  # [BC] compressed tokens
            m_k = i_k < i_hi
            m_rk = m_r[:, None] & m_k[None, :]
            b_s = tl.load(p_s[:, None] + i_k[None, :], mask=m_rk, other=0.)  # [GP, BC]
            b_p = tl.where(m_rk, tl.exp2(b_s - b_lse2[:, None]), 0.)
            b_pg = tl.sum(b_p, axis=0)  # [BC] summed over the group's heads
            # W[i, j]: stride-sized pieces shared by token i and block j
            w_lo = tl.maximum(i_k[:, None] * ST, o_j[None, :] * BS)
            w_hi = tl.minimum(i_k[:, None] * ST + KS, (o_j[None, :] + 1) * BS)
            b_w = (tl.maximum(w_hi - w_lo, 0) // ST).to(tl.float32)  # [BC, BJ]
            b_sc += tl.sum(b_pg[:, None] * b_w, axis=0)
    tl.store(score + i_nh * NB_CAP + o_j, b_sc, mask=m_j)


@triton.jit
def decode_topk_kernel(
    score, seq_lens, block_indices, NB_CAP,
    H: tl.constexpr, S: tl.constexpr, SP: tl.constexpr, CT: tl.constexpr,
    BS: tl.constexpr, NUM_INIT: tl.constexpr, NUM_LOCAL: tl.constexpr, SORT: tl.constexpr,
):
    """Top-``S`` causal blocks of one (n, h) from ``score`` ``[N * H, NB_CAP]`` ->
    ``block_indices`` ``[N, H, S]`` int32, ascending then -1.

    ``SORT``: each chunk's top ``SP`` keys by Triton's partial bitonic sort (``tl.topk``, ``CT >=
    SP``), merged with the running set by a second one; else ``S`` rounds of taking the largest
    key (two reductions each). Both keep the same set: the keys are unique."""
    i_nh = tl.program_id(0).to(tl.int64)
    i_n = i_nh // H
    seq_len = tl.load(seq_lens + i_n).to(tl.int64)
    t_blk = (seq_len - 1) // BS
    o_s = tl.arange(0, SP)
    o_c = tl.arange(0, CT)
    b_top = tl.full([SP], -1, dtype=tl.int64)  # running top keys, descending; -1 = empty
    for j0 in range(0, t_blk + 1, CT):
        o_j = j0 + o_c
        m_j = (o_j <= t_blk) & (o_j < NB_CAP)
        b_sc = tl.load(score + i_nh * NB_CAP + o_j, mask=m_j, other=0.)
        forced = (o_j < NUM_INIT) | (o_j > t_blk - NUM_LOCAL)
        # priorities are >= 0 or +inf: their float bits order like integers
        b_bits = tl.where(forced, 0x7F800000, b_sc.to(tl.int32, bitcast=True)).to(tl.int64)
        b_key = tl.where(m_j, (b_bits << 32) | (2147483647 - o_j), -1)  # [CT]
        if SORT:
            b_top = tl.topk(tl.reshape(tl.join(b_top, tl.topk(b_key, SP)), [2 * SP]), SP)  # descending
        else:
            b_new = tl.full([SP], -1, dtype=tl.int64)
            for i_r in range(S):
                b_best = tl.maximum(tl.max(b_key, axis=0), tl.max(b_top, axis=0))
                b_new = tl.where(o_s == i_r, b_best, b_new)
                # keys are unique (they hold the block id): remove the winner from whichever set has it
                b_key = tl.where(b_key == b_best, -1, b_key)
                b_top = tl.where(b_top == b_best, -1, b_top)
            b_top = b_new
    if SORT:
        b_top = tl.where(o_s < S, b_top, -1)  # SP >= S kept: the S largest come first
    b_id = tl.where(b_top >= 0, 2147483647 - (b_top & 0xFFFFFFFF), 2147483647)  # [SP], empty -> 2^31-1
    # ascending order: rank = number of smaller ids (ties among the empty ones by slot)
    b_lt = (b_id[None, :] < b_id[:, None]) | ((b_id[None, :] == b_id[:, None]) & (o_s[None, :] < o_s[:, None]))
    b_rank = tl.sum(b_lt.to(tl.int32), axis=1)  # [SP]
    b_out = tl.where(b_id == 2147483647, -1, b_id).to(tl.int32)
    tl.store(block_indices + i_nh * S + b_rank, b_out, mask=o_s < S)


@triton.jit
def decode_combine_kernel(
    ws_m, ws_l, ws_acc, g_cmp, g_slc, g_win, o, NS_C, NS_W, P,
    G: tl.constexpr, GP: tl.constexpr, PP: tl.constexpr, DV: tl.constexpr, BDV: tl.constexpr,
):
    """One query head ``h*G + r`` (program ``(nh, r)``): merges each branch's partials, normalizes
    and gates, ``o = g_cmp * o_cmp + g_slc * o_slc + g_win * o_win`` in o's dtype. All ``P``
    partials are loaded at once and reduced in one fixed tree (deterministic)."""
    i_nh, i_r = tl.program_id(0).to(tl.int64), tl.program_id(1)
    o_p = tl.arange(0, PP)
    o_dv = tl.arange(0, BDV)
    m_p = o_p < P
    o_w = (i_nh * P + o_p) * GP + i_r  # [PP] int64
    b_mp = tl.load(ws_m + o_w, mask=m_p, other=float("-inf"))
    b_lp = tl.load(ws_l + o_w, mask=m_p, other=0.)
    b_acc = tl.load(ws_acc + o_w[:, None] * BDV + o_dv[None, :], mask=m_p[:, None], other=0.)  # [PP, BDV]
    # partials 0 .. NS_C-1: compressed; then NS_W window; then selected
    i_br = tl.where(o_p < NS_C, 0, tl.where(o_p < NS_C + NS_W, 1, 2))
    o_head = i_nh * G + i_r
    b_coef = tl.zeros([PP], dtype=tl.float32)
    for i_b in tl.static_range(3):
        if i_b == 0:
            g = g_cmp
        elif i_b == 1:
            g = g_win
        else:
            g = g_slc
        m_b = (i_br == i_b) & m_p
        b_m = tl.max(tl.where(m_b, b_mp, float("-inf")), axis=0)
        b_m_safe = tl.where(b_m == float("-inf"), 0., b_m)
        b_a = tl.where(m_b, tl.exp2(b_mp - b_m_safe), 0.)  # [PP]
        b_l = tl.sum(b_a * b_lp, axis=0)
        # a branch that saw no key (compressed, early in a sequence) contributes zeros
        b_g = tl.load(g + o_head).to(tl.float32)
        b_coef += b_a * (b_g / tl.where(b_l > 0, b_l, 1.))
    b_o = tl.sum(b_coef[:, None] * b_acc, axis=0)  # [BDV]
    tl.store(o + o_head * DV + o_dv, b_o.to(o.dtype.element_ty), mask=o_dv < DV)


class DecodePlan(NamedTuple):
    """Tiling of one decode step: keys per attention tile, keys per split of each branch,
    blocks per scoring program, blocks per top-n chunk."""
    tile: int
    cmp_split: int
    win_split: int
    slc_split: int
    score_blocks: int
    topk_chunk: int
    # Two variants, off until timed on a GPU (benchmarks/probe_decode_kernels.py): the top-n
    # by Triton's partial bitonic sort (where it has tl.topk), and per-tile block sums kept by
    # the compressed pass in place of its scores (see _attend).
    topk_sort: bool = False
    tile_sums: bool = False


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def default_plan(N: int, H: int, Tc_cap: int, NB_cap: int, window_keys: int, block_size: int,
                 num_selected: int, dtype: torch.dtype = torch.bfloat16) -> DecodePlan:
    """Splits sized from shapes only: each branch is cut until about ``TARGET_PROGRAMS``
    programs run (at most ``MAX_SPLITS`` per (sequence, KV head)), in whole tiles."""
    tile = TILE_FP32 if dtype == torch.float32 else TILE
    want = max(1, min(MAX_SPLITS, _cdiv(TARGET_PROGRAMS, N * H)))
    cmp_split = tile * max(1, _cdiv(_cdiv(max(Tc_cap, 1), want), tile))
    win_split = tile * max(1, _cdiv(_cdiv(window_keys, want), tile))
    slc_split = max(1, _cdiv(num_selected, want))
    score_blocks = min(64, max(16, pow2(_cdiv(NB_cap * N * H, 4 * TARGET_PROGRAMS), 1)))
    return DecodePlan(tile, cmp_split, win_split, slc_split, score_blocks, TOPK_CHUNK)


class _Launch(NamedTuple):
    """Everything a decode step derives from shapes alone (see :func:`_launch_plan`): the float32
    workspace carved into its five parts, the grids, and each kernel's keyword arguments."""
    ws_sizes: tuple  # float32 elements of ws_m, ws_l, ws_acc, ws_t, score
    ws_total: int
    idx_shape: tuple
    o_shape: tuple
    grids: tuple  # compressed + window, score, top-n, selected, combine
    kwargs: tuple  # the same order; never mutated (the plan is shared between calls)


_WS_ALIGN = 32  # float32 elements: each workspace part starts on a 128-byte boundary


@functools.lru_cache(maxsize=512)
def _launch_plan(N, HQ, Dk, H, Dv, Tc_cap, L_cap, Lw_cap, dtype, kernel_size, stride, block_size, num_selected,
                 num_initial, num_local, window_size, plan, paged=False):
    """Grids, workspace sizes and kernel arguments of one decode step, cached per shape: a step
    of the same shapes (every step between two cache growths) repeats no planning on the host.
    ``paged``: the caches are page pools (``Tc_cap``, ``L_cap``, ``Lw_cap`` the logical capacities
    through the page table)."""
    G = HQ // H
    GP = pow2(G)
    BDK, BDV = pow2(Dk), pow2(Dv)
    S = num_selected
    SP = max(2, pow2(S, 1))
    NB_cap = _cdiv(L_cap, block_size)
    window_keys = min(window_size, Lw_cap)
    if plan is None:
        plan = default_plan(N, H, Tc_cap, NB_cap, window_keys, block_size, S, dtype)
    NS_C = max(1, _cdiv(Tc_cap, plan.cmp_split))
    NS_W = _cdiv(window_keys, plan.win_split)
    NS_S = _cdiv(S, plan.slc_split)
    P = NS_C + NS_W + NS_S
    fp32 = dtype == torch.float32
    dot_kw = dot_args(dtype)
    # launch settings checked on sm_90 (tests/ops/test_launch_resources.py): no register spills and
    # shared memory within the limit; 3 stages at 256/256 would need 270336 B of 232448 (2: 139264)
    fwd_launch = dict(num_warps=8, num_stages=2) if fp32 else dict(
        num_warps=8 if BDK > 128 else 4, num_stages=2 if BDK + BDV > 384 else 3)
    shape = dict(H=H, G=G, GP=GP, P=P)
    heads = dict(DK=Dk, DV=Dv, BDK=BDK, BDV=BDV)
    sel = dict(KS=kernel_size, ST=stride, BS=block_size)
    # selection blocks meeting one tile of compressed tokens (its first block is t * tile * ST // BS:
    # the tile starts up to BS - ST into it), and tiles meeting one block
    nbt = (block_size - stride + (plan.tile - 1) * stride + kernel_size - 1) // block_size + 1
    ntb = _cdiv((block_size + kernel_size - stride) // stride, plan.tile) + 1
    sums = bool(plan.tile_sums)
    sel = dict(sel, SUMS=sums, NBT=nbt)
    pages_a = dict(PAGED=paged, PS_A=block_size // stride if paged else 1, PS_B=block_size if paged else 1,
                   SHIFT_A=kernel_size // stride - 1 if paged else 0)
    pages_s = dict(PAGED=paged, PS_A=block_size if paged else 1, PS_B=block_size if paged else 1, SHIFT_A=0)
    kw_a = dict(CAP_A=Tc_cap, CAP_B=Lw_cap, NS_A=NS_C, SPLIT_A=plan.cmp_split, SPLIT_B=plan.win_split, P_OFF=0,
                **shape, **heads, BK=plan.tile, MODE=0, S=S, SP=SP, W=window_size, **sel, NBW=max(16, pow2(nbt)),
                **dot_kw, **fwd_launch, **pages_a)
    nt_cap = _cdiv(Tc_cap, plan.tile)
    # compressed tokens meeting score_blocks blocks: one tile when they fit in 128
    n_tok = plan.score_blocks * block_size // stride + kernel_size // stride - 1
    kw_score = dict(CAP_C=Tc_cap, NT_CAP=nt_cap, NB_CAP=NB_cap, NS_C=NS_C, P=P, H=H, G=G, GP=GP,
                    PC=max(2, pow2(NS_C, 1)), BC=max(16, min(128, pow2(n_tok, 1))), BJ=plan.score_blocks, **sel,
                    BK=plan.tile, NTB=ntb)
    ct = min(plan.topk_chunk, pow2(NB_cap, 1))
    sort = bool(plan.topk_sort) and HAS_TOPK
    kw_topk = dict(NB_CAP=NB_cap, H=H, S=S, SP=SP, CT=max(ct, SP) if sort else ct, BS=block_size,
                   NUM_INIT=num_initial, NUM_LOCAL=num_local, SORT=sort)
    kw_slc = dict(CAP_A=L_cap, CAP_B=L_cap, NS_A=NS_S, SPLIT_A=plan.slc_split, SPLIT_B=plan.slc_split,
                  P_OFF=NS_C + NS_W, **shape, **heads, BK=max(16, min(plan.tile, pow2(block_size, 1))), MODE=1, S=S,
                  SP=SP, W=window_size, **sel, NBW=16, **dot_kw, **fwd_launch, **pages_s)
    kw_combine = dict(NS_C=NS_C, NS_W=NS_W, G=G, GP=GP, P=P, PP=pow2(P, 1), DV=Dv, BDV=BDV, num_warps=8)
    grids = ((N * H, NS_C + NS_W), (N * H, _cdiv(NB_cap, plan.score_blocks)), (N * H,), (N * H, NS_S), (N * H, G))
    kept = max(nt_cap, 1) * (nbt + 1) if sums else max(Tc_cap, 1)  # per (n, h) and query head
    sizes = (N * H * P * GP, N * H * P * GP, N * H * P * GP * BDV, N * H * G * kept, N * H * NB_cap)
    sizes = tuple(_WS_ALIGN * _cdiv(n, _WS_ALIGN) for n in sizes)
    return _Launch(sizes, sum(sizes), (N, H, S), (N, HQ, Dv), grids, (kw_a, kw_score, kw_topk, kw_slc, kw_combine))


def decode_fwd(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, g_cmp, g_slc, g_win, seq_lens, kernel_size, stride,
               block_size, num_selected, num_initial, num_local, window_size, scale, plan=None, page_table=None):
    """Launches the decode kernels; returns o ``[N, HQ, Dv]`` (q's dtype) and int32 block indices
    ``[N, H, num_selected]``. Inputs validated; 16-bit or float32.

    ``page_table`` int32 ``[N, M]``: the caches are page pools (:mod:`nsa.ops.decode_paged`'s
    layout: ``[P, block_size, H, D]`` raw, ``[P, block_size // stride, H, D]`` compressed), read
    through it; None: the padded layout of :func:`nsa.ops.decode.nsa_decode`.

    Host work per call: the cached launch plan (:func:`_launch_plan`), one float32 workspace
    allocation carved into views, the two outputs, five launches. No device value is read."""
    q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, g_cmp, g_slc, g_win, seq_lens = (
        t.contiguous() for t in (q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, g_cmp, g_slc, g_win, seq_lens))
    N, HQ, Dk = q.shape
    H, Dv = k_cmp.shape[2], v_cmp.shape[3]
    if page_table is None:
        Tc_cap, L_cap, Lw_cap, M = k_cmp.shape[1], k_slc.shape[1], k_win.shape[1], 0
        page_table = seq_lens  # not read
    else:
        page_table = page_table.contiguous()
        M = page_table.shape[1]
        L_cap = Lw_cap = M * block_size
        Tc_cap = max(0, M * (block_size // stride) - (kernel_size // stride - 1))
    L = _launch_plan(N, HQ, Dk, H, Dv, Tc_cap, L_cap, Lw_cap, q.dtype, kernel_size, stride,
                     block_size, num_selected, num_initial, num_local, window_size, plan, M > 0)
    dev = q.device
    qk_scale = float(scale) * _LOG2E
    # one allocation for the five float32 workspaces (flat: the kernels compute every offset)
    ws_m, ws_l, ws_acc, ws_t, score = torch.empty(L.ws_total, dtype=torch.float32, device=dev).split_with_sizes(
        L.ws_sizes)
    block_indices = torch.empty(L.idx_shape, dtype=torch.int32, device=dev)
    o = new_output(L.o_shape, q.dtype, dev)
    g_a, g_score, g_topk, g_slc_, g_comb = L.grids
    kw_a, kw_score, kw_topk, kw_slc, kw_comb = L.kwargs

    # the compressed cache may have capacity 0 (no sequence is long enough yet): point at any
    # tensor, the kernel reads nothing from it
    k_c, v_c = (k_cmp, v_cmp) if Tc_cap > 0 else (k_slc, v_slc)
    decode_fwd_kernel[g_a](q, k_c, v_c, k_win, v_win, seq_lens, block_indices, ws_m, ws_l, ws_acc, ws_t, qk_scale,
                           page_table, M=M, **kw_a)
    decode_score_kernel[g_score](ws_t, seq_lens, ws_m, ws_l, score, **kw_score)
    decode_topk_kernel[g_topk](score, seq_lens, block_indices, **kw_topk)
    decode_fwd_kernel[g_slc_](q, k_slc, v_slc, k_slc, v_slc, seq_lens, block_indices, ws_m, ws_l, ws_acc, ws_t,
                              qk_scale, page_table, M=M, **kw_slc)
    decode_combine_kernel[g_comb](ws_m, ws_l, ws_acc, g_cmp, g_slc, g_win, o, **kw_comb)
    return o, block_indices


def nsa_decode_triton(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, g_cmp, g_slc, g_win, seq_lens,
                      kernel_size, stride, block_size, num_selected, num_initial, num_local, window_size, scale,
                      return_block_indices=False):
    """Triton NSA decoding; same contract as :func:`nsa.ops.decode.nsa_decode` (inputs validated
    there, ``scale`` a float). Inference only: no autograd graph is recorded and the results do
    not require grad.

    Args:
        q: ``[N, HQ, Dk]``; k_cmp/v_cmp ``[N, Tc_cap, H, Dk|Dv]``; k_slc/v_slc ``[N, L_cap, H, Dk|Dv]``;
            k_win/v_win ``[N, Lw_cap, H, Dk|Dv]``; gates ``[N, HQ]``; seq_lens int32 ``[N]``.
            float16, bfloat16 or float32 (float64 is computed in float32 and cast back).
    Returns:
        o ``[N, HQ, Dv]`` in q's dtype, or ``(o, block_indices)`` with int32 ``[N, H, num_selected]``.
    """
    with torch.no_grad():
        args = (q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, g_cmp, g_slc, g_win)
        if q.dtype == torch.float64:
            args = tuple(t.float() for t in args)
        # The custom op exists for torch.compile (opaque, with a fake implementation); eagerly its
        # dispatch is pure host overhead, so the launcher is called directly.
        op = _decode_op if torch.compiler.is_compiling() else decode_fwd
        o, idx = op(*args, seq_lens, kernel_size, stride, block_size, num_selected, num_initial, num_local,
                    window_size, float(scale))
        if o.dtype != q.dtype:
            o = o.to(q.dtype)
    return (o, idx) if return_block_indices else o


# Opaque to torch.compile (its planning reads shapes on the host and launches four kernels): a
# custom op with a shape-only fake implementation, as the training kernels are.
@torch.library.custom_op("nsa::nsa_decode", mutates_args=())
def _decode_op(q: torch.Tensor, k_cmp: torch.Tensor, v_cmp: torch.Tensor, k_slc: torch.Tensor,
               v_slc: torch.Tensor, k_win: torch.Tensor, v_win: torch.Tensor, g_cmp: torch.Tensor,
               g_slc: torch.Tensor, g_win: torch.Tensor, seq_lens: torch.Tensor, kernel_size: int, stride: int,
               block_size: int, num_selected: int, num_initial: int, num_local: int, window_size: int,
               scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    return decode_fwd(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, g_cmp, g_slc, g_win, seq_lens, kernel_size,
                      stride, block_size, num_selected, num_initial, num_local, window_size, scale)


@_decode_op.register_fake
def _(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, g_cmp, g_slc, g_win, seq_lens, kernel_size, stride, block_size,
      num_selected, num_initial, num_local, window_size, scale):
    N, HQ, _ = q.shape
    return (q.new_empty((N, HQ, v_cmp.shape[3])),
            q.new_empty((N, k_cmp.shape[2], num_selected), dtype=torch.int32))
