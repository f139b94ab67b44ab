"""Top-n block selection (NSA's importance scores and top-k) in Triton, all on chip.

For query ``t`` of KV head ``h`` the score of selection block ``j`` is
``sum_g sum_i p_cmp[t, h*G+g, i] * W[i, j]`` with ``p_cmp = exp(scale * q.k_cmp - lse)``
over the visible compressed tokens and ``W`` the stride-piece overlap matrix
(:func:`nsa.ops.utils.overlap_matrix`). Neither the ``[T, Tc]`` probabilities nor the
``[T, NB]`` block scores ever reach global memory.

A program owns a query tile: ``BT`` consecutive positions of one sequence times the ``G``
query heads of one KV head (``BT * GP`` rows, heads padded to a power of two ``GP``). It walks
the causal blocks of the tile in chunks of ``BJ`` blocks. For a chunk it loads the compressed
tokens that *start* inside its blocks (``CPB = block_size // stride`` per block, in slots laid
out ``[CPBP, BJ]``), scores them against the q tile on tensor cores, turns them into
probabilities, sums over the heads of the group and weighs them onto blocks: a token feeds the
block it starts in and, when its span crosses a block boundary, up to ``SPILL`` later blocks.
Spill into the next chunk is carried in registers, so a block's score is complete when its
chunk is done (the tokens that reach back into a block always start in an earlier block, i.e.
in this chunk or an earlier one). Chunks whose tokens are all visible to the whole tile skip
the per-element masks. The row index is split into position and head bits so that a thread
holds several heads of one position (see :func:`_head_mask`): most of the head sum happens in
registers, before the token weighting.

Each finished chunk becomes one sortable int64 key per (position, block):
``float_bits(priority) << 32 | (2^31 - 1 - j)``. Priorities are >= 0 (probability sums) or
``+inf`` for forced blocks, so their float bits order like integers, and the low word makes
the lower block id win a tie, exactly like the reference's stable sort; non-causal blocks get
key -1. A running top-``R`` per position (``R`` a power of two >= num_selected, sorted
descending) absorbs each chunk with a bitonic sort of the chunk, an elementwise max against
the running set (a bitonic half-cleaner: it leaves the top ``R`` of the union, in bitonic
order) and a bitonic merge. The first ``num_selected`` keys are the answer; their ids are
sorted ascending and padded with -1.

Every input is handled as packed ``[1, N, ...]`` tokens: dense ``[B, T]`` batches are B
sequences of T tokens (computed in-kernel, no index tensor), packed ones come with
``cu_seqlens`` and a tile index table. Queries may be the last rows of their sequence's keys
(``q_offset`` / ``cu_seqlens_k``): query row ``t`` then has position ``off + t``, with ``off`` the
sequence's keys minus queries, and the scores, causal and forced blocks read that position.
"""

from __future__ import annotations

import math
import warnings

import torch
import triton
import triton.language as tl
from triton.compiler.errors import CompilationError
from triton.runtime import errors as _runtime_errors

from . import triton_utils
from .triton_utils import interpreting, pow2
from .utils import compressed_cu_seqlens, new_output, prepare_chunk_indices

# Query positions per tile on the GPU. The tile's [positions, blocks] keys then number at least
# 16 x 16 = 256, one per thread of 8 warps: the bitonic network runs without copies of the keys
# in every lane (with fewer positions each warp would sort redundant copies of one row).
# Rows of the q.k_cmp product: positions x heads (padded), capped at MAX_ROWS for registers.
POSITIONS = 16
MAX_ROWS = 512
# Small groups (heads padded to GP < 16), 16-bit inputs: more positions per tile, SMALL_G_ROWS
# rows (at most SMALL_G_POSITIONS positions) instead of 16 x GP, the row count of G = 16: H200,
# 64k, bf16, D = 128 (run 49, bench_selection.py --sweep --heads): G = 1 5.29 -> 1.22 ms (128
# positions; 256: 1.59), G = 2 4.05 -> 1.42, G = 4 5.55 -> 1.90, G = 8 3.56 -> 3.05 (the other
# configs swept 1.28-3.62). float32 inputs keep 16 positions (their q tile at 256 rows spills
# 62 KB at sm_90 against 13 KB at 64).
SMALL_G_ROWS = 256
SMALL_G_POSITIONS = 128
NUM_WARPS = 8
NUM_STAGES = 2
# Register cap for 16-bit inputs with Dk <= 128, n <= 16 and <= 256 rows: 2 CTAs of 8 warps fit
# an SM, so one CTA's tensor-core products overlap the other's exponentials and sorting. For
# these shapes ptxas (sm_90) keeps the chunk loops free of spills at 128 registers.
MAXNREG = 128
# Under the CPU interpreter the cost is per operation, not per element: fewer, larger tiles.
ROWS_INTERPRET = 256
# Blocks per chunk at least this many (also the smallest running top-n size): with 32/16/64
# that is 64 compressed tokens per q.k_cmp tile.
MIN_CHUNK_BLOCKS = 16
_INT31 = tl.constexpr(2147483647)  # low word of a key: 2^31 - 1 - block id
# A chunk's tiles grow with block_size // stride (CPB compressed tokens per block): the q . k_cmp
# scores [BT * GP, BJ * CPBP] and the k_cmp tile [BJ * CPBP, Dk]. Triton refuses a block tensor of
# more than 2^20 elements; below that, a launch can still exceed the GPU's shared memory or
# registers (compiled for sm_90 here, Triton 3.9, 2026-11-29: fp32 Dk = 64, G = 4 at 2/1/64 needs
# 279552 B of shared memory against 232448; bf16 at 4/2/512 fails ptxas under the 128-register
# cap). Such configurations take the selection without the kernel
# (:func:`_select_without_kernel`); the paper's 32/16/64 tiles are 64 tokens wide.
MAX_TILE_NUMEL = 2 ** 20
_COMPILE_ERRORS = tuple(c for c in (CompilationError, getattr(_runtime_errors, "OutOfResources", None),
                                    getattr(_runtime_errors, "PTXASError", None)) if c is not None)
_UNFIT: set = set()  # launch configurations that failed to compile on this machine's GPU
_FITTED: dict = {}  # launch -> (positions, stages) of a smaller tile that compiled where the first did not
# A launch that fails to compile takes that route only with more than this many compressed tokens
# per block: with fewer (32/16/64 has 4) every launch is expected to compile (the compile audit
# builds them for sm_90), and a failure is a bug to report, not to route around.
FALLBACK_MIN_CPB = 16


@triton.jit
def _cas(h, AXIS: tl.constexpr, keep_max):
    """Compare-and-swap along a size-2 ``AXIS`` of a hypercube of integers: each element keeps the
    larger of itself and its partner where ``keep_max`` is true, the smaller elsewhere."""
    # the partner is the pair's sum minus the element (wrapping integer arithmetic is exact);
    # one comparison per element serves both halves of the pair.
    y = tl.sum(h, axis=AXIS, keep_dims=True) - h
    return tl.where((h > y) == keep_max, h, y)


@triton.jit
def _sort_rows(x, DESC: tl.constexpr, BT: tl.constexpr, LOG_R: tl.constexpr):
    """Bitonic sort of every row of the integers ``x`` ``[BT, 2^LOG_R]``.

    The row is viewed as a hypercube ``[BT, 2, .., 2]``: bit ``b`` of the column index lives on
    axis ``LOG_R - b``, so a compare-and-swap of the columns ``c`` and ``c ^ 2^b`` works along
    that axis.
    """
    h = tl.reshape(x, [BT] + [2] * LOG_R)
    for stage in tl.static_range(1, LOG_R + 1):
        # runs of length 2^stage; neighbouring runs go opposite ways, so that each pair is a
        # bitonic sequence for the next stage; the last stage sorts the row in the final order.
        if stage < LOG_R:
            desc = tl.reshape(tl.arange(0, 2), [1] * (LOG_R - stage) + [2] + [1] * stage) ^ DESC
        else:
            desc = DESC
        for i in tl.static_range(stage):
            # column bit stage - 1 - i, on axis LOG_R - stage + 1 + i; in a descending run the
            # left element keeps the larger value
            is_left = 1 - tl.reshape(tl.arange(0, 2), [1] * (LOG_R - stage + 1 + i) + [2] + [1] * (stage - 1 - i))
            h = _cas(h, LOG_R - stage + 1 + i, is_left == desc)
    return tl.reshape(h, [BT, 2 ** LOG_R])


@triton.jit
def _merge_top(a, c, BT: tl.constexpr, LOG_R: tl.constexpr):
    """Top ``R`` of ``a`` (rows sorted descending) and ``c`` (any order), rows sorted descending."""
    c = _sort_rows(c, 0, BT, LOG_R)
    # a descending then c ascending is bitonic; the half-cleaner keeps the larger of each pair,
    # which is the top R of the union in bitonic order; a bitonic merge sorts it.
    h = tl.reshape(tl.maximum(a, c), [BT] + [2] * LOG_R)
    for i in tl.static_range(LOG_R):
        # column bit LOG_R - 1 - i, on axis 1 + i
        is_left = tl.reshape(tl.arange(0, 2), [1] * (1 + i) + [2] + [1] * (LOG_R - 1 - i)) == 0
        h = _cas(h, 1 + i, is_left)
    return tl.reshape(h, [BT, 2 ** LOG_R])


@triton.jit
def _qk_part(b_q, k, cbos, cmp_len, i_h, i_tok, o_cc, d0: tl.constexpr, H: tl.constexpr, DK: tl.constexpr,
             BD: tl.constexpr, CPB: tl.constexpr, MASKED: tl.constexpr, DOT_MODE: tl.constexpr):
    """``b_q [BM, BD] . k^T`` over head columns ``d0 .. d0 + BD - 1`` of tokens ``i_tok`` ``[BC]``."""
    o_d = d0 + tl.arange(0, BD)
    p_k = k + ((cbos + i_tok) * H + i_h)[None, :] * DK + o_d[:, None]
    if MASKED or d0 + BD > DK:
        b_k = tl.load(p_k, mask=(o_d < DK)[:, None] & ((o_cc < CPB) & (i_tok < cmp_len))[None, :], other=0.)
    else:
        b_k = tl.load(p_k)  # [BD, BC]
    if DOT_MODE == "ieee":
        return tl.dot(b_q, b_k, input_precision="ieee")
    elif DOT_MODE == "upcast":
        # the interpreter multiplies bfloat16 bit patterns (triton#11584); products of
        # bfloat16 values are exact in float32, so this is what tensor cores compute.
        return tl.dot(b_q.to(tl.float32), b_k.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(b_q, b_k)  # [BM, BC]


@triton.jit
def _chunk_scores(b_q, b_q2, b_lse2, i_t, k, cbos, cmp_len, i_h, j0, b_carry, qk_scale,
                  H: tl.constexpr, DK: tl.constexpr, BD: tl.constexpr, BD2: tl.constexpr, KS: tl.constexpr,
                  STRIDE: tl.constexpr,
                  BS: tl.constexpr, CPB: tl.constexpr, CPBP: tl.constexpr, SPILL: tl.constexpr,
                  BT: tl.constexpr, BJ: tl.constexpr, LOG_BM: tl.constexpr, LOG_GP: tl.constexpr,
                  HEAD_AXES: tl.constexpr, N_EARLY: tl.constexpr, MASKED: tl.constexpr,
                  DOT_MODE: tl.constexpr):
    """Scores ``[BT, BJ]`` of blocks ``j0 .. j0+BJ-1`` for the tile's positions, and the carry
    ``[BT, BJ]`` of this chunk's tokens into the next chunk's blocks.

    b_q ``[BM, BD]`` (and b_q2 ``[BM, BD2]``: head columns ``BD ..``, when BD2 > 0); b_lse2 ``[BM]``
    (lse in base 2, +inf for rows that must score 0);
    i_t ``[BM]`` the rows' positions in their sequence; rows as in :func:`selection_fwd_kernel`.
    ``MASKED`` false: every token of the chunk is known to be visible to every row (no per-element
    masks).
    """
    BC: tl.constexpr = BJ * CPBP
    # token slots, c-major: slot c * BJ + jj holds the c-th token starting in block jj of the chunk
    # (the per-block sums then stay inside a thread: fewer copies of the block scores per thread)
    o_cl = tl.arange(0, BC)
    o_cc = o_cl // BJ
    i_tok = (j0 + o_cl % BJ) * CPB + o_cc  # [BC]
    b_s = _qk_part(b_q, k, cbos, cmp_len, i_h, i_tok, o_cc, 0, H, DK, BD, CPB, MASKED, DOT_MODE)
    if BD2 > 0:
        b_s += _qk_part(b_q2, k, cbos, cmp_len, i_h, i_tok, o_cc, BD, H, DK, BD2, CPB, MASKED, DOT_MODE)
    # rows with lse2 = +inf get exp2(-inf) = 0
    b_p = tl.exp2(b_s * qk_scale - b_lse2[:, None])
    if MASKED:
        m_vis = ((i_tok * STRIDE + KS - 1)[None, :] <= i_t[:, None]) & (o_cc < CPB)[None, :]
        b_p = tl.where(m_vis, b_p, 0.)
    # sum the heads held in registers first (HEAD_AXES: head bits of the row index, the in-register
    # ones first, see _head_mask), weigh tokens onto blocks, then sum the remaining heads.
    b_p = tl.reshape(b_p, [2] * LOG_BM + [CPBP, BJ])
    for i in tl.static_range(N_EARLY):
        b_p = tl.sum(b_p, (HEAD_AXES >> (4 * i)) & 15)
    b_p = tl.reshape(b_p, [2 ** (LOG_BM - N_EARLY), CPBP, BJ])

    o_c = tl.arange(0, CPBP)
    o_j = tl.arange(0, BJ)
    b_sc = b_carry
    b_next = tl.zeros([BT, BJ], dtype=tl.float32)
    for d in tl.static_range(SPILL + 1):
        # stride-pieces shared by the c-th token of a block and the d-th block after it
        lo = tl.maximum(o_c * STRIDE, d * BS)
        hi = tl.minimum(o_c * STRIDE + KS, (d + 1) * BS)
        w = tl.where(o_c < CPB, tl.maximum(hi - lo, 0) // STRIDE, 0).to(tl.float32)  # [CPBP]
        b_w = tl.sum(b_p * w[None, :, None], 1)  # [rows, BJ] for block jj + d
        b_w = tl.reshape(b_w, [2] * (LOG_BM - N_EARLY) + [BJ])
        for i in tl.static_range(N_EARLY, LOG_GP):
            b_w = tl.sum(b_w, (HEAD_AXES >> (4 * i)) & 15)
        b_w = tl.reshape(b_w, [BT, BJ])
        if d == 0:
            b_sc += b_w
        else:
            # shift by d blocks along the block axis: column jj takes column jj - d (this chunk) or
            # jj - d + BJ (the next one), by tl.gather (exact). Not a product with a 0/1 matrix:
            # Triton's combine pass turns sum(x[:, :, None] * y[None, :, :], 1) into a tl.dot,
            # which Triton 3.6 builds with TF32 inputs (fixed upstream by triton-lang/triton#9831):
            # on the H200 the spill scores then went through tensor cores truncated to 10 mantissa
            # bits (~1e-4 relative error, near-ties decided wrongly). A select-and-sum is exact but
            # 5x slower (H200, 64k: 28.0 ms against 5.4 ms with the gather).
            src = tl.broadcast_to(((o_j - d + BJ) % BJ)[None, :], [BT, BJ])
            b_g = tl.gather(b_w, src, 1)
            b_sc += tl.where((o_j >= d)[None, :], b_g, 0.)
            b_next += tl.where((o_j < d)[None, :], b_g, 0.)
    return b_sc, b_next


@triton.jit
def _chunk_keys(b_sc, j0, i_tb, NUM_INIT: tl.constexpr, NUM_LOCAL: tl.constexpr, BJ: tl.constexpr):
    """int64 keys ``[BT, BJ]`` of blocks ``j0 .. j0+BJ-1`` from their scores (see the module doc)."""
    i_j = j0 + tl.arange(0, BJ)  # [BJ] block ids
    m_causal = i_j[None, :] <= i_tb[:, None]
    m_forced = (i_j[None, :] < NUM_INIT) | (i_j[None, :] > i_tb[:, None] - NUM_LOCAL)
    b_pri = tl.where(m_forced, float("inf"), b_sc)
    b_low = (2147483647 - i_j).to(tl.int64)  # ties: the lower block id wins
    b_key = (b_pri.to(tl.int32, bitcast=True).to(tl.int64) << 32) + b_low[None, :]
    return tl.where(m_causal, b_key, -1)


@triton.jit
def selection_fwd_kernel(
    q, k, lse, o, cu_seqlens, ccu_seqlens, chunk_indices, qk_scale, T, TC, NT, cu_seqlens_k, q_offset,
    HQ: tl.constexpr, H: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, DK: tl.constexpr, BD: tl.constexpr,
    BD2: tl.constexpr, KS: tl.constexpr, STRIDE: tl.constexpr, BS: tl.constexpr,
    S: tl.constexpr, NUM_INIT: tl.constexpr, NUM_LOCAL: tl.constexpr,
    CPB: tl.constexpr, CPBP: tl.constexpr, SPILL: tl.constexpr,
    BT: tl.constexpr, BJ: tl.constexpr, LOG_R: tl.constexpr, LOG_BM: tl.constexpr, LOG_GP: tl.constexpr,
    HEAD_MASK: tl.constexpr, HEAD_AXES: tl.constexpr, N_EARLY: tl.constexpr,
    IS_VARLEN: tl.constexpr, DOT_MODE: tl.constexpr, OFFSET: tl.constexpr = "none",
):
    """q ``[N, HQ, DK]``, k ``[NC, H, DK]``, lse ``[N, HQ]`` (float32) -> o int32 ``[N, H, S]``.

    Dense input (``IS_VARLEN`` false): ``N = B * T`` and ``NC = B * TC``, ``NT`` tiles per sequence.
    Query row t of a sequence is at position t (``OFFSET`` "none"), ``q_offset + t`` ("scalar",
    dense) or ``len_k[n] - len_q[n] + t`` ("keys", packed: ``cu_seqlens_k`` the keys' offsets;
    ``ccu_seqlens`` always packs the compressed tokens of the keys).
    ``qk_scale`` = scale * log2(e). ``BJ == 2^LOG_R`` blocks per chunk. Row ``r`` of the
    ``2^LOG_BM = BT * GP`` rows of a tile is head ``pext(r, HEAD_MASK)`` at position
    ``pext(r, ~HEAD_MASK)`` (bits gathered in order), see :func:`_head_mask`; ``HEAD_AXES`` packs
    4 bits per head bit: the axes of the ``[2] * LOG_BM`` row hypercube to sum, in order; the first
    ``N_EARLY`` are summed before the token weighting. ``BD2 > 0``: the head columns are two tiles,
    ``0 .. BD-1`` and ``BD .. BD+BD2-1`` (:func:`nsa.ops.triton_utils.split_dim`: no padding to
    the next power of two), scored as the sum of two products.
    """
    # tiles in reverse order: the late (most expensive, causal) tiles start first
    i_c, i_h = tl.num_programs(0) - 1 - tl.program_id(0), tl.program_id(1)
    if IS_VARLEN:
        i_n = tl.load(chunk_indices + i_c * 2).to(tl.int64)
        i_tc = tl.load(chunk_indices + i_c * 2 + 1).to(tl.int64)
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        seq_len = tl.load(cu_seqlens + i_n + 1).to(tl.int64) - bos
        cbos = tl.load(ccu_seqlens + i_n).to(tl.int64)
        cmp_len = tl.load(ccu_seqlens + i_n + 1).to(tl.int64) - cbos
    else:
        i_n = (i_c // NT).to(tl.int64)
        i_tc = (i_c % NT).to(tl.int64)
        bos = i_n * T
        seq_len = T
        cbos = i_n * TC
        cmp_len = TC
    if OFFSET == "keys":
        off = tl.load(cu_seqlens_k + i_n + 1).to(tl.int64) - tl.load(cu_seqlens_k + i_n) - seq_len
    elif OFFSET == "scalar":
        off = q_offset
    else:
        off = 0
    t0 = i_tc * BT  # the tile's first row; its position is p0
    p0 = t0 + off
    p_last = tl.minimum(t0 + BT, seq_len) - 1 + off
    BM: tl.constexpr = BT * GP

    # rows: the bits of the row index named by HEAD_MASK number the head, the others the position
    o_m = tl.arange(0, BM)
    o_g = o_m * 0
    o_t = o_m * 0
    n_g = 0
    n_t = 0
    for b in tl.static_range(LOG_BM):
        if (HEAD_MASK >> b) & 1:
            o_g += ((o_m >> b) & 1) << n_g
            n_g += 1
        else:
            o_t += ((o_m >> b) & 1) << n_t
            n_t += 1
    i_t = t0 + o_t  # [BM] rows
    i_p = i_t + off  # [BM] their positions
    m_row = (i_t < seq_len) & (o_g < G)
    o_d = tl.arange(0, BD)
    o_row = (bos + i_t) * HQ + i_h * G + o_g  # [BM] row of q / lse in [N * HQ]
    b_q = tl.load(q + o_row[:, None] * DK + o_d[None, :], mask=m_row[:, None] & (o_d < DK)[None, :], other=0.)
    if BD2 > 0:
        o_d2 = BD + tl.arange(0, BD2)
        b_q2 = tl.load(q + o_row[:, None] * DK + o_d2[None, :], mask=m_row[:, None] & (o_d2 < DK)[None, :], other=0.)
    else:
        b_q2 = b_q
    b_lse = tl.load(lse + o_row, mask=m_row, other=float("-inf"))
    # +inf makes p = 0: padding rows, and rows that see nothing (lse = -inf, as in the reference)
    b_lse2 = tl.where(b_lse > float("-inf"), b_lse * 1.4426950408889634, float("inf"))

    o_tp = t0 + tl.arange(0, BT)  # [BT] rows of the tile
    i_tb = (o_tp + off) // BS  # [BT] each row's own block
    o_j = tl.arange(0, BJ)

    b_top = tl.full([BT, BJ], -1, dtype=tl.int64)  # running top-R keys, descending
    b_carry = tl.zeros([BT, BJ], dtype=tl.float32)  # spill of earlier chunks into this one
    n_blk = p_last // BS + 1
    # chunks whose tokens are all visible to the tile's first position need no masks
    n_vis = tl.where(p0 >= KS - 1, (p0 - KS + 1) // STRIDE + 1, 0)  # tokens visible to p0
    if CPB == CPBP:
        j_full = tl.minimum((n_vis // CPB) // BJ * BJ, n_blk)
    else:
        j_full = 0  # padded token slots: always masked
    for masked in tl.static_range(2):
        for j0 in range(j_full if masked else 0, n_blk if masked else j_full, BJ):
            b_sc, b_carry = _chunk_scores(b_q, b_q2, b_lse2, i_p, k, cbos, cmp_len, i_h, j0, b_carry, qk_scale,
                                          H, DK, BD, BD2, KS, STRIDE, BS, CPB, CPBP, SPILL, BT, BJ, LOG_BM, LOG_GP,
                                          HEAD_AXES, N_EARLY, masked == 1, DOT_MODE)
            b_top = _merge_top(b_top, _chunk_keys(b_sc, j0, i_tb, NUM_INIT, NUM_LOCAL, BJ), BT, LOG_R)

    # first S keys -> block ids, ascending, then -1
    m_sel = (o_j[None, :] < S) & (b_top >= 0)
    b_id = tl.where(m_sel, _INT31 - (b_top & _INT31), _INT31)
    b_id = _sort_rows(b_id, 0, BT, LOG_R)
    b_id = tl.where(b_id == _INT31, -1, b_id).to(tl.int32)
    p_o = o + ((bos + o_tp) * H + i_h)[:, None] * S + o_j[None, :]
    tl.store(p_o, b_id, mask=(o_tp < seq_len)[:, None] & (o_j < S)[None, :])


def _dot_mode(q: torch.Tensor) -> str:
    """float32 input: exact float32 products ('ieee', not tf32); bfloat16 under the interpreter:
    'upcast' (see the kernel); otherwise tensor cores ('tc')."""
    if q.dtype == torch.float32:
        return "ieee"
    if q.dtype == torch.bfloat16 and interpreting():
        return "upcast"
    return "tc"


def _head_mask(log_rows: int, log_heads: int) -> int:
    """Which bits of a tile's row index number the head (the rest number the position).

    The head sum is cheapest when a thread holds all heads of its rows. In the tensor-core
    accumulator of 8 warps, row bits 0-2 select the lane, bit 3 a register, bits 4-6 the warp and
    bits 7+ further registers: heads take the register bits first, then the lane bits.
    Any choice is correct; this one only saves shuffles.
    """
    order = [3] + list(range(7, log_rows)) + [0, 1, 2, 4, 5, 6]
    bits = [b for b in order if b < log_rows][:log_heads]
    return sum(1 << b for b in bits)


def _head_axes(head_mask: int, log_rows: int) -> int:
    """The axes of the ``[2] * log_rows`` row hypercube (bit b on axis log_rows - 1 - b) to sum one
    after the other to remove the head bits, highest bit first (the in-register ones under
    :func:`_head_mask`), each shifted by the axes already removed before it; packed 4 bits each."""
    bits = [b for b in range(log_rows - 1, -1, -1) if (head_mask >> b) & 1]
    axes = [log_rows - 1 - b - n for n, b in enumerate(bits)]
    return sum(a << (4 * i) for i, a in enumerate(axes))


def _n_register_bits(head_mask: int) -> int:
    """How many head bits are in-register row bits (3, 7, 8, ...) under :func:`_head_mask`'s layout."""
    return sum(1 for b in range(32) if (head_mask >> b) & 1 and (b == 3 or b >= 7))


def selection_fwd(q, k_cmp, lse, kernel_size, stride, block_size, num_selected, num_initial, num_local, scale,
                  cu_seqlens, positions=None, num_warps=None, num_stages=None, maxnreg=None, q_offset=0,
                  cu_seqlens_k=None):
    """Launches :func:`selection_fwd_kernel`; returns int32 ``[B, T, H, num_selected]``.

    ``positions`` (query positions per tile), ``num_warps``, ``num_stages``, ``maxnreg`` (0: no
    register cap) override the tile configuration (for tuning and tests). ``q_offset`` /
    ``cu_seqlens_k``: as in :func:`select_blocks_triton`.
    """
    B, T, HQ, DK = q.shape
    TC, H = k_cmp.shape[1], k_cmp.shape[2]
    G = HQ // H
    if q.dtype == torch.float64:
        # the kernel scores in float32; float64 input is accepted and rounded
        q, k_cmp = q.float(), k_cmp.float()
    q, k_cmp = q.contiguous(), k_cmp.contiguous()
    lse = lse.float().contiguous()
    out = new_output((B, T, H, num_selected), torch.int32, q.device)
    if B * T == 0:
        return out

    GP = pow2(G, 1)
    if positions is not None:
        assert positions > 0 and positions & (positions - 1) == 0, "positions must be a power of two"
        BT = positions
    elif not interpreting():
        BT = POSITIONS
        if q.dtype in (torch.float16, torch.bfloat16):
            BT = max(BT, min(SMALL_G_POSITIONS, SMALL_G_ROWS // GP))
        BT = max(1, min(BT, MAX_ROWS // GP))
    else:
        BT = max(1, ROWS_INTERPRET // GP)
    # float32 with a head wider than 128 (e.g. Dk = 192 at G = 16, 2026-12-07 on an H100, Triton
    # 3.6: 278528 bytes of shared memory against 232448): half the positions, no pipelining.
    wide_fp32 = q.dtype == torch.float32 and pow2(DK) > 128 and positions is None and not interpreting()
    if wide_fp32:
        BT = max(1, BT // 2)
    BT = max(BT, 16 // GP)  # rows BT * GP >= 16, the smallest tensor-core tile height
    CPB = block_size // stride
    CPBP = pow2(CPB, 1)
    spill = ((CPB - 1) * stride + kernel_size - 1) // block_size
    BJ = max(MIN_CHUNK_BLOCKS, pow2(num_selected, 1), pow2(spill + 1, 1))
    LOG_R = int(math.log2(BJ))
    BD, BD2 = triton_utils.head_tiles(DK)
    if maxnreg is None and not interpreting() and q.dtype in (torch.float16, torch.bfloat16) and BD + BD2 <= 128 \
            and BJ <= 16 and BT * GP <= 256:
        maxnreg = MAXNREG
    if cu_seqlens_k is cu_seqlens:
        cu_seqlens_k = None
    args = (q, k_cmp, lse, kernel_size, stride, block_size, num_selected, num_initial, num_local, scale, cu_seqlens,
            q_offset, cu_seqlens_k)
    launch = (q.device, q.dtype, DK, G, kernel_size, stride, block_size, num_selected, BT, num_warps, num_stages,
              maxnreg)
    cols = BJ * CPBP
    if max(BT * GP * cols, cols * (BD + BD2)) > MAX_TILE_NUMEL:
        return _select_without_kernel(*args, why=f"a chunk tile of {cols} compressed tokens exceeds Triton's "
                                                 f"{MAX_TILE_NUMEL} elements")
    if launch in _UNFIT:
        return _select_without_kernel(*args, why="its launch did not compile for this GPU")
    stages = num_stages or (1 if wide_fp32 else NUM_STAGES)
    # The chosen tile first; where it does not fit this GPU's shared memory (float32 with more than
    # 16 selected blocks: 2026-12-07, H100, Triton 3.6, n = 20 at G = 16, Dk = 128: 393216 bytes
    # against 232448), no pipelining, then fewer positions per tile, down to 16 rows. A config
    # the caller gave is tried alone.
    tiles = [(BT, stages)]
    if positions is None and num_stages is None and not interpreting():
        tiles += [(bt, 1) for bt in (BT, BT // 2, BT // 4, BT // 8) if bt * GP >= 16 and (bt, 1) not in tiles]
    if launch in _FITTED:  # a smaller tile that compiled before
        tiles = [_FITTED[launch]]
    for n, (bt, st) in enumerate(tiles):
        try:
            _selection_launch(out, q, k_cmp, lse, scale, cu_seqlens, q_offset, cu_seqlens_k, G, GP, DK, BD, BD2,
                              kernel_size, stride, block_size, num_selected, num_initial, num_local, CPB, CPBP,
                              spill, bt, BJ, LOG_R, num_warps or NUM_WARPS, st, maxnreg)
            if n:
                _FITTED[launch] = (bt, st)
            return out
        except _COMPILE_ERRORS as e:
            if n + 1 < len(tiles):
                continue
            if interpreting() or CPB <= FALLBACK_MIN_CPB:
                raise
            _UNFIT.add(launch)
            return _select_without_kernel(*args,
                                          why=f"its launch did not compile for this GPU ({type(e).__name__})")
    return out


def _selection_launch(out, q, k_cmp, lse, scale, cu_seqlens, q_offset, cu_seqlens_k, G, GP, DK, BD, BD2,
                      kernel_size, stride, block_size, num_selected, num_initial, num_local, CPB, CPBP, spill, BT,
                      BJ, LOG_R, num_warps, num_stages, maxnreg):
    """One launch of :func:`selection_fwd_kernel` with ``BT`` positions per tile."""
    B, T, HQ, _ = q.shape
    TC, H = k_cmp.shape[1], k_cmp.shape[2]
    LOG_GP, LOG_BM = int(math.log2(GP)), int(math.log2(BT * GP))
    head_mask = _head_mask(LOG_BM, LOG_GP)
    if cu_seqlens is not None:
        ccu = compressed_cu_seqlens(cu_seqlens if cu_seqlens_k is None else cu_seqlens_k, kernel_size, stride)
        chunk_indices = prepare_chunk_indices(cu_seqlens, BT)
        n_tiles = chunk_indices.shape[0]
        NT = 0
    else:
        ccu = chunk_indices = None
        NT = triton.cdiv(T, BT)
        n_tiles = B * NT
    selection_fwd_kernel[(n_tiles, H)](
        q, k_cmp, lse, out, cu_seqlens, ccu, chunk_indices, scale * 1.4426950408889634, T, TC, NT, cu_seqlens_k,
        q_offset,
        HQ=HQ, H=H, G=G, GP=GP, DK=DK, BD=BD, BD2=BD2, KS=kernel_size, STRIDE=stride, BS=block_size,
        S=num_selected, NUM_INIT=num_initial, NUM_LOCAL=num_local, CPB=CPB, CPBP=CPBP, SPILL=spill,
        BT=BT, BJ=BJ, LOG_R=LOG_R, LOG_BM=LOG_BM, LOG_GP=LOG_GP, HEAD_MASK=head_mask,
        HEAD_AXES=_head_axes(head_mask, LOG_BM), N_EARLY=_n_register_bits(head_mask),
        IS_VARLEN=cu_seqlens is not None,
        OFFSET="keys" if cu_seqlens_k is not None else "scalar" if q_offset else "none",
        DOT_MODE=_dot_mode(q),
        num_warps=num_warps, num_stages=num_stages,
        **({"maxnreg": maxnreg} if maxnreg else {}),
    )


def _positions(T, cu_seqlens, q_offset, cu_seqlens_k, device):
    """``[T]`` position of every query row in its sequence (see :func:`select_blocks_triton`)."""
    t = torch.arange(T, device=device) + q_offset
    if cu_seqlens is not None:
        lens = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
        start = cu_seqlens[:-1].long()  # the packed row of position 0
        if cu_seqlens_k is not None:
            start = start - ((cu_seqlens_k[1:] - cu_seqlens_k[:-1]).long() - lens)
        t = t - torch.repeat_interleave(start, lens)
    return t


def _all_causal_blocks(B, T, H, block_size, num_selected, cu_seqlens, device, q_offset=0, cu_seqlens_k=None):
    """Every causal block of every query, ascending, then -1: the selection when no sequence has
    more than ``num_selected`` blocks."""
    t = _positions(T, cu_seqlens, q_offset, cu_seqlens_k, device)
    j = torch.arange(num_selected, device=device)
    ids = torch.where(j.view(1, -1) <= (t // block_size).view(-1, 1), j.view(1, -1), -1)  # [T, n]
    return ids.to(torch.int32).view(1, T, 1, num_selected).expand(B, T, H, num_selected).contiguous()


def _select_without_kernel(q, k_cmp, lse, kernel_size, stride, block_size, num_selected, num_initial, num_local,
                           scale, cu_seqlens, q_offset, cu_seqlens_k, why):
    """The selection of a configuration the kernel cannot take (see MAX_TILE_NUMEL): every causal
    block when no sequence has more than ``num_selected`` blocks, else the reference's scores and
    top-n (exact; it holds the [T, Tc] probabilities of each head, so it warns)."""
    B, T = q.shape[:2]
    H = k_cmp.shape[2]
    keys = cu_seqlens if cu_seqlens_k is None else cu_seqlens_k
    longest = T + q_offset if cu_seqlens is None else int((keys[1:] - keys[:-1]).max())
    if longest <= num_selected * block_size:
        return _all_causal_blocks(B, T, H, block_size, num_selected, cu_seqlens, q.device, q_offset, cu_seqlens_k)
    warnings.warn(f"select_blocks: kernel_size={kernel_size}, stride={stride}, block_size={block_size} at "
                  f"Dk={q.shape[-1]} ({q.dtype}) do not fit the selection kernel ({why}); the selection runs "
                  f"on the reference, which holds [T, Tc] probabilities per head", stacklevel=2)
    from . import reference
    return reference.select_blocks(q, k_cmp, lse, kernel_size, stride, block_size, num_selected, num_initial,
                                   num_local, scale, cu_seqlens, q_offset=q_offset, cu_seqlens_k=cu_seqlens_k)


def select_blocks_triton(q, k_cmp, lse, kernel_size, stride, block_size, num_selected, num_initial, num_local,
                         scale, cu_seqlens, q_offset: int = 0, cu_seqlens_k: torch.Tensor | None = None):
    """Top-n selection blocks per query and KV head; see :func:`nsa.ops.select_blocks`.

    Args:
        q: ``[B, T, HQ, Dk]`` (fp16/bf16/fp32; float64 is scored in float32).
        k_cmp: ``[B, Tc, H, Dk]`` compressed keys of the raw keys (``T + q_offset`` per sequence, or
            packed per sequence by ``cu_seqlens_k``).
        lse: ``[B, T, HQ]`` log-sum-exp of the compressed attention (float32 or float64).
        kernel_size, stride, block_size, num_selected, num_initial, num_local: as in the public op.
        scale: float softmax scale.
        cu_seqlens: int32 ``[N+1]`` offsets of packed query sequences, or None.
        q_offset: dense input: query row t has position ``q_offset + t`` (default 0).
        cu_seqlens_k: packed input: int32 ``[N+1]`` offsets of the raw keys (None: ``cu_seqlens``);
            sequence n's query row t has position ``len_k[n] - len_q[n] + t``.
    Returns:
        int32 ``[B, T, H, num_selected]``: selected block ids ascending, then -1.
    """
    return _select_op(q, k_cmp, lse, kernel_size, stride, block_size, num_selected, num_initial, num_local,
                      float(scale), cu_seqlens, q_offset, cu_seqlens_k)


# Opaque to torch.compile: a custom op with a shape-only fake implementation.
@torch.library.custom_op("nsa::select_blocks", mutates_args=())
def _select_op(q: torch.Tensor, k_cmp: torch.Tensor, lse: torch.Tensor, kernel_size: int, stride: int,
               block_size: int, num_selected: int, num_initial: int, num_local: int, scale: float,
               cu_seqlens: torch.Tensor | None, q_offset: int = 0,
               cu_seqlens_k: torch.Tensor | None = None) -> torch.Tensor:
    return selection_fwd(q, k_cmp, lse, kernel_size, stride, block_size, num_selected, num_initial, num_local,
                         scale, cu_seqlens, q_offset=q_offset, cu_seqlens_k=cu_seqlens_k)


@_select_op.register_fake
def _(q, k_cmp, lse, kernel_size, stride, block_size, num_selected, num_initial, num_local, scale, cu_seqlens,
      q_offset=0, cu_seqlens_k=None):
    return q.new_empty((q.shape[0], q.shape[1], k_cmp.shape[2], num_selected), dtype=torch.int32)
