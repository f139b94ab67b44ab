"""Brute-force per-query definitions of every NSA op, in float64.

Written from the contract (the docstrings of :mod:`nsa.ops.api` and the NSA brief),
independently of :mod:`nsa.ops.reference`: explicit loops over sequences, query
positions and heads; for each query, the list of keys it may see, then a plain
softmax. Slow on purpose; use at tiny sizes only.

All functions take the public layout (``[B, T, H, D]``, optional packed ``cu_seqlens``
with B = 1) and return float64 tensors (int32 for block ids).
"""

from __future__ import annotations

import math

import torch

NEG_INF = float("-inf")


def sequences(B, T, cu_seqlens=None):
    """``[(b, start, length)]`` of every sequence: B dense rows, or the packed ones."""
    if cu_seqlens is None:
        return [(b, 0, T) for b in range(B)]
    cu = [int(x) for x in cu_seqlens.tolist()]
    return [(0, a, e - a) for a, e in zip(cu[:-1], cu[1:])]


def n_compressed(length, kernel_size, stride):
    """Compressed tokens of a sequence: token i spans [i*stride, i*stride + kernel_size) inside it."""
    n = 0
    while n * stride + kernel_size <= length:
        n += 1
    return n


def compressed_offsets(B, T, kernel_size, stride, cu_seqlens=None):
    """Start of every sequence's compressed tokens along dim 1 of k_cmp (0 for dense rows)."""
    if cu_seqlens is None:
        return [0] * B
    out, acc = [], 0
    for _, _, length in sequences(B, T, cu_seqlens):
        out.append(acc)
        acc += n_compressed(length, kernel_size, stride)
    return out


def attend(q, keys, values, scale):
    """Softmax attention of one query.

    Args:
        q: ``[Dk]``; keys: ``[n, Dk]``; values: ``[n, Dv]`` (float64), n may be 0.
    Returns:
        (o ``[Dv]``, lse scalar float): zeros and -inf when n == 0.
    """
    if keys.shape[0] == 0:
        return torch.zeros(values.shape[-1], dtype=torch.float64), NEG_INF
    logits = scale * (keys @ q)  # [n]
    m = logits.max()
    weights = torch.exp(logits - m)
    z = weights.sum()
    return (weights / z) @ values, float(m + torch.log(z))


def _scale(scale, q):
    return q.shape[-1] ** -0.5 if scale is None else float(scale)


def compressed_attention(q, k_cmp, v_cmp, kernel_size, stride, scale=None, cu_seqlens=None):
    """Query t of a sequence sees its compressed token i iff i*stride + kernel_size - 1 <= t.

    Returns o ``[B, T, HQ, Dv]`` and lse ``[B, T, HQ]``.
    """
    q, k_cmp, v_cmp = q.double(), k_cmp.double(), v_cmp.double()
    B, T, HQ, _ = q.shape
    H, Dv = k_cmp.shape[2], v_cmp.shape[3]
    G = HQ // H
    sc = _scale(scale, q)
    o = torch.zeros(B, T, HQ, Dv, dtype=torch.float64)
    lse = torch.full((B, T, HQ), NEG_INF, dtype=torch.float64)
    offs = compressed_offsets(B, T, kernel_size, stride, cu_seqlens)
    for n, (b, start, length) in enumerate(sequences(B, T, cu_seqlens)):
        nc = n_compressed(length, kernel_size, stride)
        for t in range(length):
            visible = [offs[n] + i for i in range(nc) if i * stride + kernel_size - 1 <= t]
            for hq in range(HQ):
                h = hq // G
                o[b, start + t, hq], lse[b, start + t, hq] = attend(
                    q[b, start + t, hq], k_cmp[b, visible, h], v_cmp[b, visible, h], sc)
    return o, lse


def shared_pieces(i, j, kernel_size, stride, block_size):
    """Number of stride-sized pieces in both compressed token i's and block j's span.

    Piece p covers [p*stride, (p+1)*stride); token i holds pieces i*stride/stride ..,
    block j holds pieces j*block_size/stride ...
    """
    token = set(range(i * stride // stride, (i * stride + kernel_size) // stride))
    block = set(range(j * block_size // stride, (j + 1) * block_size // stride))
    return len(token & block)


def block_scores(q, k_cmp, kernel_size, stride, block_size, scale=None, cu_seqlens=None, lse=None):
    """Selection scores ``[B, T, H, NB_max]`` (-inf past a sequence's last block).

    score[t, h, j] = sum over the G query heads of h, over visible compressed tokens i, of
    p_cmp[t, head, i] * shared_pieces(i, j). p_cmp is each head's own softmax over its visible
    compressed tokens, or ``exp(scale * q.k - lse)`` when ``lse [B, T, HQ]`` is given.
    """
    q, k_cmp = q.double(), k_cmp.double()
    B, T, HQ, _ = q.shape
    H = k_cmp.shape[2]
    G = HQ // H
    sc = _scale(scale, q)
    seqs = sequences(B, T, cu_seqlens)
    nb_max = max(math.ceil(length / block_size) for _, _, length in seqs)
    out = torch.full((B, T, H, nb_max), NEG_INF, dtype=torch.float64)
    offs = compressed_offsets(B, T, kernel_size, stride, cu_seqlens)
    for n, (b, start, length) in enumerate(seqs):
        nc = n_compressed(length, kernel_size, stride)
        nb = math.ceil(length / block_size)
        w = torch.tensor([[shared_pieces(i, j, kernel_size, stride, block_size) for j in range(nb)]
                          for i in range(nc)], dtype=torch.float64).view(nc, nb)
        for t in range(length):
            visible = [i for i in range(nc) if i * stride + kernel_size - 1 <= t]
            for h in range(H):
                total = torch.zeros(nb, dtype=torch.float64)
                for g in range(G):
                    hq = h * G + g
                    if not visible:
                        continue
                    logits = sc * (k_cmp[b, [offs[n] + i for i in visible], h] @ q[b, start + t, hq])
                    if lse is None:
                        p = torch.exp(logits - logits.max())
                        p = p / p.sum()
                    else:
                        p = torch.exp(logits - float(lse[b, start + t, hq]))
                    for i, pi in zip(visible, p.tolist()):
                        total += pi * w[i]
                out[b, start + t, h, :nb] = total
    return out


def top_n(scores, t_block, num_selected, num_initial, num_local):
    """One row of the selection from a list of block scores.

    Forced: blocks < num_initial and the num_local blocks ending at t_block, causal only.
    Then the causal blocks by decreasing score, lower id first on ties, until num_selected.
    Returns the ids ascending, padded with -1 to num_selected.
    """
    causal = list(range(t_block + 1))
    forced = {j for j in causal if j < num_initial or j > t_block - num_local}
    rest = sorted((j for j in causal if j not in forced), key=lambda j: (-scores[j], j))
    chosen = sorted(forced | set(rest[:max(0, num_selected - len(forced))]))
    return chosen + [-1] * (num_selected - len(chosen))


def select_blocks(q, k_cmp, kernel_size, stride, block_size, num_selected, num_initial, num_local, scale=None,
                  cu_seqlens=None, lse=None):
    """int32 ``[B, T, H, num_selected]`` top-n rows (see :func:`top_n`, :func:`block_scores`)."""
    score = block_scores(q, k_cmp, kernel_size, stride, block_size, scale, cu_seqlens, lse)
    B, T, H, _ = score.shape
    out = torch.full((B, T, H, num_selected), -1, dtype=torch.int32)
    for b, start, length in sequences(B, T, cu_seqlens):
        for t in range(length):
            for h in range(H):
                row = score[b, start + t, h].tolist()
                out[b, start + t, h] = torch.tensor(
                    top_n(row, t // block_size, num_selected, num_initial, num_local), dtype=torch.int32)
    return out


def selected_attention(q, k, v, block_indices, block_size, scale=None, cu_seqlens=None):
    """Query t of KV head h sees the keys s <= t of its sequence inside the listed blocks (-1 ignored)."""
    q, k, v = q.double(), k.double(), v.double()
    B, T, HQ, _ = q.shape
    H, Dv = k.shape[2], v.shape[3]
    G = HQ // H
    sc = _scale(scale, q)
    o = torch.zeros(B, T, HQ, Dv, dtype=torch.float64)
    for b, start, length in sequences(B, T, cu_seqlens):
        for t in range(length):
            for hq in range(HQ):
                h = hq // G
                blocks = [j for j in block_indices[b, start + t, h].tolist() if j != -1]
                keys = sorted(s for j in blocks for s in range(j * block_size, (j + 1) * block_size)
                              if s < length and s <= t)
                rows = [start + s for s in keys]
                o[b, start + t, hq] = attend(q[b, start + t, hq], k[b, rows, h], v[b, rows, h], sc)[0]
    return o


def sliding_window_attention(q, k, v, window_size, scale=None, cu_seqlens=None):
    """Query t sees keys t - window_size < s <= t of its sequence."""
    q, k, v = q.double(), k.double(), v.double()
    B, T, HQ, _ = q.shape
    H, Dv = k.shape[2], v.shape[3]
    G = HQ // H
    sc = _scale(scale, q)
    o = torch.zeros(B, T, HQ, Dv, dtype=torch.float64)
    for b, start, length in sequences(B, T, cu_seqlens):
        for t in range(length):
            rows = [start + s for s in range(max(0, t - window_size + 1), t + 1)]
            for hq in range(HQ):
                o[b, start + t, hq] = attend(q[b, start + t, hq], k[b, rows, hq // G], v[b, rows, hq // G], sc)[0]
    return o


def nsa(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, g_cmp, g_slc, g_win, *, kernel_size, stride, block_size,
        num_selected, num_initial, num_local, window_size, scale=None, cu_seqlens=None, block_indices=None):
    """``g_cmp*o_cmp + g_slc*o_slc + g_win*o_win`` per query head; returns (o, block_indices).

    The selection is the brute-force top-n of the brute-force scores, unless ``block_indices``
    is given (to compare a low-precision run whose near-ties may legitimately differ).
    """
    o_cmp, _ = compressed_attention(q, k_cmp, v_cmp, kernel_size, stride, scale, cu_seqlens)
    if block_indices is None:
        block_indices = select_blocks(q, k_cmp, kernel_size, stride, block_size, num_selected, num_initial,
                                      num_local, scale, cu_seqlens)
    o_slc = selected_attention(q, k_slc, v_slc, block_indices, block_size, scale, cu_seqlens)
    o_win = sliding_window_attention(q, k_win, v_win, window_size, scale, cu_seqlens)
    B, T, HQ, Dv = o_cmp.shape
    o = torch.zeros(B, T, HQ, Dv, dtype=torch.float64)
    for b in range(B):
        for t in range(T):
            for hq in range(HQ):
                o[b, t, hq] = (float(g_cmp[b, t, hq]) * o_cmp[b, t, hq] + float(g_slc[b, t, hq]) * o_slc[b, t, hq]
                               + float(g_win[b, t, hq]) * o_win[b, t, hq])
    return o, block_indices
