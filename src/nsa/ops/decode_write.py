"""One launch for what a decoding step writes before it attends: RoPE on the new query and on the
new selection/window keys, and the new token of every branch stored at its position in a dense
:class:`nsa.NSACache` or in the pages of a :class:`nsa.PagedNSACache`.

Unfused, that is three RoPE launches (q, selection keys, window keys), six indexed stores
(selection, window and compression-tail keys and values) and two small index computations per
layer and step: on the ``base`` model about a quarter of a generated step's kernel time at batch 1
(H100, 2026-12-07, ``benchmarks/probe_generate_step.py``; the step was 0.27-0.40 ms shorter with
this kernel, ``benchmarks/NOTES.md``). Here one program per (sequence, piece) reads
the sequence's length once and writes its piece: the rotated query (a new tensor), the rotated
keys and the values at position ``seq_lens[n]``, the raw compression keys/values at slot
``seq_lens[n] % kernel_size`` of the tail ring. ``seq_lens`` is read, not advanced (the cache does
that after the launch).

The rotation is :mod:`nsa.ops.rotary`'s, operation for operation (the angle in turns formed in
float64, its fraction in float32, ``x1 cos - x2 sin`` / ``x2 cos + x1 sin`` in float32), so the
stored keys equal those of the unfused path under the same compiler.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .rotary import _turns_per_position
from .utils import new_output

# pieces of one sequence's step: grid axis 1
_Q, _K_SLC, _V_SLC, _K_WIN, _V_WIN, _K_TAIL, _V_TAIL = range(7)


@triton.jit
def _rotate_row(src, dst, pos, turns, n_heads, D: tl.constexpr, HALF: tl.constexpr, BD: tl.constexpr):
    """RoPE at position ``pos`` of ``n_heads`` heads of D contiguous elements, ``src`` -> ``dst``."""
    o = tl.arange(0, BD)
    m = o < HALF
    t = pos.to(tl.float64) * tl.load(turns + o, mask=m, other=0.)
    ang = (t - tl.floor(t)).to(tl.float32) * 6.283185307179586
    cos = tl.cos(ang)
    sin = tl.sin(ang)
    for h in range(n_heads):
        x1 = tl.load(src + h * D + o, mask=m, other=0.).to(tl.float32)
        x2 = tl.load(src + h * D + HALF + o, mask=m, other=0.).to(tl.float32)
        tl.store(dst + h * D + o, (x1 * cos - x2 * sin).to(dst.dtype.element_ty), mask=m)
        tl.store(dst + h * D + HALF + o, (x2 * cos + x1 * sin).to(dst.dtype.element_ty), mask=m)


@triton.jit
def _copy_row(src, dst, E: tl.constexpr, BE: tl.constexpr):
    """``E`` contiguous elements ``src`` -> ``dst`` (cast to dst's dtype)."""
    for e0 in tl.static_range(0, E, BE):
        o = e0 + tl.arange(0, BE)
        m = o < E
        tl.store(dst + o, tl.load(src + o, mask=m).to(dst.dtype.element_ty), mask=m)


@triton.jit
def decode_write_kernel(seq_lens, turns, q, q_out, k_raw, v_raw, k_s, v_s, k_w, v_w,
                        k_tail, v_tail, k_slc, v_slc, k_win, v_win, page_table,
                        s_q, s_kr, s_vr, s_ks, s_vs, s_kw, s_vw, CAP, M,
                        KS: tl.constexpr, HQ: tl.constexpr, H: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
                        HALF: tl.constexpr, BD: tl.constexpr, BEK: tl.constexpr, BEV: tl.constexpr,
                        WIN: tl.constexpr, PAGED: tl.constexpr):
    """Program (n, piece): sequence n's new token, one piece of it (see the module docstring).
    Sources are rows of ``[N, heads, D]`` views with contiguous heads (row strides ``s_*``);
    ``k_slc``... are the cache ``[N, CAP, H, D]`` or, ``PAGED``, page pools ``[P, CAP, H, D]``
    (pages of CAP tokens) read through row n of ``page_table`` ``[N, M]``; ``k_tail``/``v_tail``
    ``[N, KS, H, D]``; ``WIN``: the window keys/values are cached separately (pieces 3 and 4)."""
    n = tl.program_id(0).to(tl.int64)
    piece = tl.program_id(1)
    pos = tl.load(seq_lens + n).to(tl.int64)
    if PAGED:  # slot pos % CAP of the sequence's page holding pos
        tok = tl.load(page_table + n * M + pos // CAP).to(tl.int64) * CAP + pos % CAP
    else:
        tok = n * CAP + pos  # [N, CAP] row of the cache
    slot = n * KS + pos % KS  # [N, KS] row of the tail ring
    if piece == 0:
        _rotate_row(q + n * s_q, q_out + n * (HQ * DK), pos, turns, HQ, DK, HALF, BD)
    elif piece == 1:
        _rotate_row(k_s + n * s_ks, k_slc + tok * (H * DK), pos, turns, H, DK, HALF, BD)
    elif piece == 2:
        _copy_row(v_s + n * s_vs, v_slc + tok * (H * DV), H * DV, BEV)
    elif piece == 3:
        if WIN:
            _rotate_row(k_w + n * s_kw, k_win + tok * (H * DK), pos, turns, H, DK, HALF, BD)
    elif piece == 4:
        if WIN:
            _copy_row(v_w + n * s_vw, v_win + tok * (H * DV), H * DV, BEV)
    elif piece == 5:
        _copy_row(k_raw + n * s_kr, k_tail + slot * (H * DK), H * DK, BEK)
    else:
        _copy_row(v_raw + n * s_vr, v_tail + slot * (H * DV), H * DV, BEV)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` ``[N, heads, D]`` with contiguous heads (a row stride of its own is fine)."""
    if t.stride(-1) != 1 or t.stride(-2) != t.shape[-1]:
        t = t.contiguous()
    return t


def decode_write(seq_lens, theta: float, q, k_cmp_raw, v_cmp_raw, k_slc, v_slc, k_win, v_win,
                 cache_k_tail, cache_v_tail, cache_k_slc, cache_v_slc, cache_k_win, cache_v_win, page_table=None):
    """The step's writes in one launch (see the module docstring); returns the rotated query.

    Args:
        seq_lens: int32 ``[N]``, the new token's position per sequence (not advanced here).
        theta: RoPE base.
        q: ``[N, HQ, Dk]``; k_cmp_raw, v_cmp_raw, k_slc, v_slc, k_win, v_win: ``[N, H, Dk|Dv]``,
            the new token's projections, selection/window keys before RoPE; k_win, v_win None when
            the cache shares them with the selection branch. Heads contiguous, any row stride.
        cache_*: the cache's tensors (contiguous): k_tail/v_tail ``[N, kernel_size, H, D]``,
            k_slc/v_slc (and k_win/v_win unless shared) ``[N, capacity, H, D]``, room at every
            ``seq_lens[n]``; with ``page_table`` (int32 ``[N, M]``, :class:`nsa.PagedNSACache`'s)
            page pools ``[P, block_size, H, D]``, position p of row n at slot ``p % block_size`` of
            page ``page_table[n, p // block_size]`` (the page must be there).
    Returns:
        q rotated at ``seq_lens``, a new contiguous ``[N, HQ, Dk]`` tensor in q's dtype.

    Shapes are the caller's contract (:meth:`nsa.NSACache.append_rotating` checks them); values of
    ``seq_lens`` are not read on the host.
    """
    N, HQ, Dk = q.shape
    H, Dv = v_slc.shape[1], v_slc.shape[2]
    win = k_win is not None
    q, k_cmp_raw, v_cmp_raw, k_slc, v_slc = (_rows(t) for t in (q, k_cmp_raw, v_cmp_raw, k_slc, v_slc))
    k_w, v_w = (_rows(k_win), _rows(v_win)) if win else (k_slc, v_slc)
    q_out = new_output((N, HQ, Dk), q.dtype, q.device)
    if N == 0:
        return q_out
    half = Dk // 2
    turns = _turns_per_position(Dk, float(theta), q.device)
    decode_write_kernel[(N, 7)](
        seq_lens, turns, q, q_out, k_cmp_raw, v_cmp_raw, k_slc, v_slc, k_w, v_w,
        cache_k_tail, cache_v_tail, cache_k_slc, cache_v_slc,
        cache_k_win if win else cache_k_slc, cache_v_win if win else cache_v_slc,
        seq_lens if page_table is None else page_table,  # not read when dense
        q.stride(0), k_cmp_raw.stride(0), v_cmp_raw.stride(0), k_slc.stride(0), v_slc.stride(0),
        k_w.stride(0), v_w.stride(0), cache_k_slc.shape[1], 0 if page_table is None else page_table.stride(0),
        KS=cache_k_tail.shape[1], HQ=HQ, H=H, DK=Dk, DV=Dv, HALF=half, BD=triton.next_power_of_2(half),
        BEK=min(1024, triton.next_power_of_2(H * Dk)), BEV=min(1024, triton.next_power_of_2(H * Dv)), WIN=win,
        PAGED=page_table is not None)
    return q_out
