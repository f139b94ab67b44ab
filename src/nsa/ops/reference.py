"""The specification of Native Sparse Attention, in plain PyTorch.

Slow and obvious on purpose: every branch is dense masked attention in float32
(float64 for float64 inputs), differentiable by autograd. The kernels are tested
against these functions; these functions are tested against a brute-force
per-query definition (tests/ops/test_reference.py).

Layout: queries ``[B, T, HQ, Dk]``, keys ``[B, S, H, Dk]``, values ``[B, S, H, Dv]``.
Query head ``hq`` reads KV head ``hq // G`` with ``G = HQ // H``. Packed sequences
(``cu_seqlens``, B = 1) are computed one sequence at a time and concatenated.

Query offset: query row ``t`` sits at position ``q_offset + t`` of a sequence whose raw keys are
``q_offset + T`` long (the queries are the last T positions: a chunk after a cache, one rank's part
of a sequence). Packed, ``cu_seqlens_k`` gives the raw keys' packing and each sequence's queries
are its last ``len_q`` positions. Every rule applies to positions, not rows.
Inputs are assumed valid: :mod:`nsa.ops.api` checks them before calling here.
"""

from __future__ import annotations

import torch

from .utils import compressed_cu_seqlens, num_blocks, overlap_matrix, window_keys

__all__ = [
    "compressed_attention",
    "select_blocks",
    "selected_attention",
    "sliding_window_attention",
    "nsa",
    "nsa_decode",
    "rope",
    "rope_cos_sin",
]


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _masked_attention(q, k, v, mask, scale):
    """Dense attention with an explicit boolean mask.

    Args:
        q: ``[B, T, HQ, Dk]``; k: ``[B, S, H, Dk]``; v: ``[B, S, H, Dv]``.
        mask: bool, broadcastable to ``[B, H, G, T, S]``; True = visible.
    Returns:
        o ``[B, T, HQ, Dv]`` in q's dtype (zeros for a query that sees nothing) and
        lse ``[B, T, HQ]`` (float32, float64 for float64 input; -inf where nothing is visible).
    """
    B, T, HQ, Dk = q.shape
    H, Dv = k.shape[2], v.shape[-1]
    G = HQ // H
    ct = _compute_dtype(q)
    qg = q.to(ct).reshape(B, T, H, G, Dk).permute(0, 2, 3, 1, 4)  # [B, H, G, T, Dk]
    kt = k.to(ct).permute(0, 2, 1, 3)  # [B, H, S, Dk]
    vt = v.to(ct).permute(0, 2, 1, 3)  # [B, H, S, Dv]
    s = torch.einsum("bhgtd,bhsd->bhgts", qg, kt) * scale
    mask = mask.expand_as(s)
    s = s.masked_fill(~mask, float("-inf"))
    # amax has no identity: with no keys at all (S = 0, e.g. T < kernel_size) use 0.
    m = s.amax(-1, keepdim=True).detach() if s.shape[-1] else s.new_zeros(*s.shape[:-1], 1)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(s - m)  # exactly 0 where masked
    denom = e.sum(-1, keepdim=True)
    nonempty = denom > 0
    p = e / torch.where(nonempty, denom, torch.ones_like(denom))
    o = torch.einsum("bhgts,bhsd->bhgtd", p, vt)  # [B, H, G, T, Dv]
    lse = torch.where(nonempty, torch.log(torch.where(nonempty, denom, torch.ones_like(denom))) + m,
                      torch.full_like(denom, float("-inf"))).squeeze(-1)  # [B, H, G, T]
    o = o.permute(0, 3, 1, 2, 4).reshape(B, T, HQ, Dv).to(q.dtype)
    lse = lse.permute(0, 3, 1, 2).reshape(B, T, HQ)
    return o, lse


def _sequences(cu_seqlens, cu_seqlens_k, queries, keys=(), kernel_size=None, stride=None, compressed=()):
    """Per packed sequence: (its query offset, its query-row slices, its raw-key slices, its
    compressed-key slices). Raw keys are packed by ``cu_seqlens_k`` (default: as the queries),
    compressed keys by the compressed tokens of the raw keys' lengths."""
    cu_k = cu_seqlens if cu_seqlens_k is None else cu_seqlens_k
    cq, ck = cu_seqlens.tolist(), cu_k.tolist()
    cc = compressed_cu_seqlens(cu_k, kernel_size, stride).tolist() if compressed else None
    for n in range(len(cq) - 1):
        off = (ck[n + 1] - ck[n]) - (cq[n + 1] - cq[n])
        yield (off, tuple(t[:, cq[n]:cq[n + 1]] for t in queries), tuple(t[:, ck[n]:ck[n + 1]] for t in keys),
               tuple(t[:, cc[n]:cc[n + 1]] for t in compressed) if compressed else ())


def _resolve_scale(scale, q):
    return q.shape[-1] ** -0.5 if scale is None else float(scale)


def _cmp_visible(T, Tc, kernel_size, stride, device, q_offset=0):
    """``[T, Tc]``: compressed token i is visible to query row t (position q_offset + t) iff
    i*stride + kernel_size - 1 <= q_offset + t."""
    t = torch.arange(q_offset, q_offset + T, device=device).view(-1, 1)
    i = torch.arange(Tc, device=device).view(1, -1)
    return i * stride + kernel_size - 1 <= t


def compressed_attention(q, k_cmp, v_cmp, kernel_size=32, stride=16, scale=None, cu_seqlens=None, q_offset=0,
                         cu_seqlens_k=None):
    """Attention of every query over the compressed tokens it can see. See :func:`nsa.ops.compressed_attention`."""
    scale = _resolve_scale(scale, q)
    if cu_seqlens is not None:
        outs, lses = [], []
        for off, (qs,), _, (kc, vc) in _sequences(cu_seqlens, cu_seqlens_k, (q,), (), kernel_size, stride,
                                                  (k_cmp, v_cmp)):
            o, lse = compressed_attention(qs, kc, vc, kernel_size, stride, scale, q_offset=off)
            outs.append(o)
            lses.append(lse)
        return torch.cat(outs, 1), torch.cat(lses, 1)
    T, Tc = q.shape[1], k_cmp.shape[1]
    mask = _cmp_visible(T, Tc, kernel_size, stride, q.device, q_offset)
    return _masked_attention(q, k_cmp, v_cmp, mask, scale)


def block_scores(q, k_cmp, lse, kernel_size=32, stride=16, block_size=64, scale=None, q_offset=0):
    """Importance of every selection block for every query, summed over each GQA group.

    Returns float32 (float64 for float64 input) ``[B, T, H, NB]`` with
    ``NB = ceil((q_offset + T) / block_size)`` (the blocks of the keys):
    ``sum_{g} sum_i p_cmp[t, h*G+g, i] * W[i, j]`` (see :func:`nsa.ops.utils.overlap_matrix`),
    where ``p_cmp = exp(scale * q.k_cmp - lse)`` over the visible compressed tokens. Dense batch only.
    """
    scale = _resolve_scale(scale, q)
    B, T, HQ, Dk = q.shape
    Tc, H = k_cmp.shape[1], k_cmp.shape[2]
    G = HQ // H
    ct = _compute_dtype(q)
    NB = num_blocks(q_offset + T, block_size)
    qg = q.detach().to(ct).reshape(B, T, H, G, Dk)
    s = torch.einsum("bthgd,bshd->bthgs", qg, k_cmp.detach().to(ct)) * scale
    lse = lse.detach().to(ct).reshape(B, T, H, G, 1)
    vis = _cmp_visible(T, Tc, kernel_size, stride, q.device, q_offset).view(1, T, 1, 1, Tc)
    p = torch.where(vis & torch.isfinite(lse), torch.exp(s - torch.where(torch.isfinite(lse), lse, 0)), 0)
    w = overlap_matrix(Tc, NB, kernel_size, stride, block_size, q.device, ct)  # [Tc, NB]
    return torch.einsum("bthgs,sn->bthn", p, w)


def _topk_blocks(score, num_selected, num_initial, num_local, block_size, q_offset=0):
    """Rows of selected block ids from scores ``[B, T, H, NB]`` of queries at positions
    ``q_offset + t``; see :func:`nsa.ops.select_blocks`."""
    B, T, H, NB = score.shape
    dev = score.device
    t_blk = (torch.arange(q_offset, q_offset + T, device=dev) // block_size).view(1, T, 1, 1)
    j = torch.arange(NB, device=dev).view(1, 1, 1, NB)
    causal = j <= t_blk
    forced = (j < num_initial) | ((j > t_blk - num_local) & causal)
    pri = torch.where(forced, float("inf"), score.float() if score.dtype != torch.float64 else score)
    pri = torch.where(causal, pri, float("-inf")).expand(B, T, H, NB)
    k = min(num_selected, NB)
    # stable descending sort: among equal scores the lower block id wins.
    order = torch.sort(pri, dim=-1, descending=True, stable=True).indices[..., :k]
    chosen_pri = torch.gather(pri, -1, order)
    ids = torch.where(chosen_pri > float("-inf"), order, NB)
    ids = torch.sort(ids, dim=-1).values
    ids = torch.where(ids == NB, -1, ids)
    if k < num_selected:
        ids = torch.cat([ids, ids.new_full((B, T, H, num_selected - k), -1)], -1)
    return ids.to(torch.int32)


def select_blocks(q, k_cmp, lse, kernel_size=32, stride=16, block_size=64, num_selected=16,
                  num_initial=1, num_local=2, scale=None, cu_seqlens=None, q_offset=0, cu_seqlens_k=None):
    """Top-n selection blocks per query and KV head. See :func:`nsa.ops.select_blocks`."""
    if cu_seqlens is not None:
        rows = []
        for off, (qs, ls), _, (kc,) in _sequences(cu_seqlens, cu_seqlens_k, (q, lse), (), kernel_size, stride,
                                                  (k_cmp,)):
            rows.append(select_blocks(qs, kc, ls, kernel_size, stride, block_size, num_selected,
                                      num_initial, num_local, scale, q_offset=off))
        return torch.cat(rows, 1)
    score = block_scores(q, k_cmp, lse, kernel_size, stride, block_size, scale, q_offset)
    return _topk_blocks(score, num_selected, num_initial, num_local, block_size, q_offset)


def selected_attention(q, k, v, block_indices, block_size=64, scale=None, cu_seqlens=None, q_offset=0,
                       cu_seqlens_k=None):
    """Attention of query t (KV head h, position q_offset + t) over keys s <= q_offset + t of the
    blocks listed in ``block_indices[:, t, h]``; -1 entries are ignored. See
    :func:`nsa.ops.selected_attention`."""
    scale = _resolve_scale(scale, q)
    if cu_seqlens is not None:
        return torch.cat([selected_attention(qs, ks, vs, bi, block_size, scale, q_offset=off)
                          for off, (qs, bi), (ks, vs), _ in _sequences(cu_seqlens, cu_seqlens_k, (q, block_indices),
                                                                       (k, v))], 1)
    B, T, H, S = block_indices.shape
    L = k.shape[1]
    NB = num_blocks(L, block_size)
    idx = block_indices.long()
    idx = torch.where(idx < 0, NB, idx)  # -1 -> a dummy column, dropped below
    # out of place: vmap and torch.jit.trace take it (not an in-place scatter_)
    blk = torch.zeros(B, T, H, NB + 1, dtype=torch.bool, device=q.device).scatter(-1, idx, True)
    blk = blk[..., :NB].repeat_interleave(block_size, -1)[..., :L]  # [B, T, H, L]
    t_pos = torch.arange(q_offset, q_offset + T, device=q.device)
    causal = torch.arange(L, device=q.device).view(1, L) <= t_pos.view(T, 1)  # [T(query), L(key)]
    mask = blk.permute(0, 2, 1, 3) & causal  # [B, H, T, L]
    return _masked_attention(q, k, v, mask.unsqueeze(2), scale)[0]


def sliding_window_attention(q, k, v, window_size=512, scale=None, cu_seqlens=None, q_offset=0, cu_seqlens_k=None):
    """Attention of query t (position q_offset + t) over keys q_offset + t - window_size < s <= q_offset + t.
    See :func:`nsa.ops.sliding_window_attention`."""
    scale = _resolve_scale(scale, q)
    if cu_seqlens is not None:
        return torch.cat([sliding_window_attention(qs, ks, vs, window_size, scale, q_offset=off)
                          for off, (qs,), (ks, vs), _ in _sequences(cu_seqlens, cu_seqlens_k, (q,), (k, v))], 1)
    T, L = q.shape[1], k.shape[1]
    d = torch.arange(q_offset, q_offset + T, device=q.device).view(T, 1) - torch.arange(L, device=q.device).view(1, L)
    mask = (d >= 0) & (d < window_keys(window_size, L))
    return _masked_attention(q, k, v, mask, scale)[0]


def gate_combine(o_cmp, o_slc, o_win, g_cmp, g_slc, g_win, out_dtype):
    """``g_cmp*o_cmp + g_slc*o_slc + g_win*o_win`` with gates ``[B, T, HQ]`` broadcast over the
    value dim of the branch outputs ``[B, T, HQ, Dv]``; result in ``out_dtype``."""
    return (g_cmp.unsqueeze(-1) * o_cmp + g_slc.unsqueeze(-1) * o_slc + g_win.unsqueeze(-1) * o_win).to(out_dtype)


def nsa(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, g_cmp, g_slc, g_win, *, kernel_size=32, stride=16,
        block_size=64, num_selected=16, num_initial=1, num_local=2, window_size=512, scale=None,
        cu_seqlens=None, return_block_indices=False, q_offset=0, cu_seqlens_k=None):
    """The three branches composed and gated. See :func:`nsa.ops.nsa`."""
    pos = dict(q_offset=q_offset, cu_seqlens_k=cu_seqlens_k)
    o_cmp, lse = compressed_attention(q, k_cmp, v_cmp, kernel_size, stride, scale, cu_seqlens, **pos)
    idx = select_blocks(q, k_cmp, lse, kernel_size, stride, block_size, num_selected, num_initial,
                        num_local, scale, cu_seqlens, **pos)
    o_slc = selected_attention(q, k_slc, v_slc, idx, block_size, scale, cu_seqlens, **pos)
    o_win = sliding_window_attention(q, k_win, v_win, window_size, scale, cu_seqlens, **pos)
    o = gate_combine(o_cmp, o_slc, o_win, g_cmp, g_slc, g_win, q.dtype)
    return (o, idx) if return_block_indices else o


def _select_decode(score, t, num_selected, num_initial, num_local, block_size):
    """Selected-block mask ``[N, H, NB]`` from scores ``[N, H, NB]`` for queries at positions t ``[N]``.

    The rule of :func:`nsa.ops.reference._topk_blocks` with a per-sequence query position:
    forced blocks first, then the highest scores, lower block id first among equals.
    """
    N, H, NB = score.shape
    t_blk = (t // block_size).view(N, 1, 1)
    j = torch.arange(NB, device=score.device).view(1, 1, NB)
    causal = j <= t_blk
    forced = (j < num_initial) | ((j > t_blk - num_local) & causal)
    pri = torch.where(forced, float("inf"), score)
    pri = torch.where(causal, pri, float("-inf"))
    k = min(num_selected, NB)
    order = torch.sort(pri, dim=-1, descending=True, stable=True).indices[..., :k]  # [N, H, k]
    chosen = torch.gather(pri, -1, order) > float("-inf")
    sel = torch.zeros(N, H, NB, dtype=torch.bool, device=score.device)
    return sel.scatter_(-1, order, chosen)


def _valid_rows(x, n_valid):
    """``x`` ``[N, cap, H, D]`` with rows ``>= n_valid[n]`` of sequence n replaced by zeros."""
    pos = torch.arange(x.shape[1], device=x.device).view(1, -1, 1, 1)
    return torch.where(pos < n_valid.view(-1, 1, 1, 1), x, torch.zeros((), dtype=x.dtype, device=x.device))


def nsa_decode(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, g_cmp, g_slc, g_win, seq_lens,
                         kernel_size, stride, block_size, num_selected, num_initial, num_local, window_size,
                         scale, return_block_indices=False):
    """See :func:`nsa_decode`; inputs assumed valid, ``scale`` a float."""
    N, HQ, Dk = q.shape
    H = k_cmp.shape[2]
    G = HQ // H
    ct = _compute_dtype(q)
    dev = q.device
    t = seq_lens.long() - 1  # [N] position of the new query
    q1 = q.unsqueeze(1)  # [N, 1, HQ, Dk]
    # Cache rows past a sequence's length are never attended, but a masked probability times a
    # NaN or inf left there would still poison the products: zero them first.
    n_cmp = torch.where(seq_lens >= kernel_size, torch.div(seq_lens - kernel_size, stride, rounding_mode="floor") + 1,
                        torch.zeros_like(seq_lens))
    k_cmp, v_cmp = _valid_rows(k_cmp, n_cmp), _valid_rows(v_cmp, n_cmp)
    k_slc, v_slc = _valid_rows(k_slc, seq_lens), _valid_rows(v_slc, seq_lens)
    k_win, v_win = _valid_rows(k_win, seq_lens), _valid_rows(v_win, seq_lens)
    if k_cmp.shape[1] == 0:
        # A single always-masked token keeps every reduction non-empty.
        k_cmp = k_cmp.new_zeros(N, 1, H, Dk)
        v_cmp = v_cmp.new_zeros(N, 1, H, v_cmp.shape[3])
    Tc = k_cmp.shape[1]

    # Compressed branch: token i is visible once i*stride + kernel_size - 1 <= t.
    i = torch.arange(Tc, device=dev)
    vis = (i.view(1, Tc) * stride + kernel_size - 1) <= t.view(N, 1)  # [N, Tc]
    o_cmp, lse = _masked_attention(q1, k_cmp, v_cmp, vis.view(N, 1, 1, 1, Tc), scale)

    # Block importance: each head's compressed probabilities, summed over the group, mapped to blocks.
    with torch.no_grad():
        qg = q.detach().to(ct).view(N, H, G, Dk)
        s = torch.einsum("nhgd,nchd->nhgc", qg, k_cmp.detach().to(ct)) * scale
        lse_g = lse.detach().to(ct).view(N, H, G, 1)
        ok = vis.view(N, 1, 1, Tc) & torch.isfinite(lse_g)
        p = torch.where(ok, torch.exp(s - torch.where(torch.isfinite(lse_g), lse_g, 0)), 0)
        L = k_slc.shape[1]
        NB = num_blocks(L, block_size)
        w = overlap_matrix(Tc, NB, kernel_size, stride, block_size, dev, ct)  # [Tc, NB]
        score = torch.einsum("nhgc,cj->nhj", p, w)
        sel = _select_decode(score, t, num_selected, num_initial, num_local, block_size)  # [N, H, NB]

    # Selected branch: keys s <= t inside the chosen blocks.
    s_pos = torch.arange(L, device=dev)
    causal = s_pos.view(1, L) <= t.view(N, 1)  # [N, L]
    m_slc = sel.repeat_interleave(block_size, -1)[..., :L] & causal.view(N, 1, L)  # [N, H, L]
    o_slc = _masked_attention(q1, k_slc, v_slc, m_slc.view(N, H, 1, 1, L), scale)[0]

    # Window branch: keys t - window_size < s <= t.
    Lw = k_win.shape[1]
    w_pos = torch.arange(Lw, device=dev).view(1, Lw)
    m_win = (w_pos <= t.view(N, 1)) & (w_pos > t.view(N, 1) - window_size)  # [N, Lw]
    o_win = _masked_attention(q1, k_win, v_win, m_win.view(N, 1, 1, 1, Lw), scale)[0]

    o = (g_cmp.unsqueeze(-1) * o_cmp[:, 0] + g_slc.unsqueeze(-1) * o_slc[:, 0]
         + g_win.unsqueeze(-1) * o_win[:, 0]).to(q.dtype)
    if not return_block_indices:
        return o
    # Rows like select_blocks: ascending block ids, then -1.
    ids = torch.where(sel, torch.arange(NB, device=dev), NB)
    ids = torch.sort(ids, dim=-1).values[..., :min(num_selected, NB)]
    ids = torch.where(ids == NB, -1, ids)
    if ids.shape[-1] < num_selected:
        ids = torch.cat([ids, ids.new_full((N, H, num_selected - ids.shape[-1]), -1)], -1)
    return o, ids.to(torch.int32)


# ---- RoPE ---------------------------------------------------------------------------------------

def rope_cos_sin(positions: torch.Tensor, dim: int, theta: float, dtype: torch.dtype = torch.float32):
    """cos, sin ``[*positions.shape, dim // 2]`` of the angles ``position * theta**(-2i/dim)``,
    in ``dtype`` on the device of ``positions`` (an integer tensor).

    Angles are formed in float64: at positions ~1e5 float32 angles are off by ~1e-2 rad.
    """
    inv_freq = theta ** (-torch.arange(0, dim, 2, device=positions.device, dtype=torch.float64) / dim)
    ang = positions.to(torch.float64).unsqueeze(-1) * inv_freq
    return ang.cos().to(dtype), ang.sin().to(dtype)


def rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotate-half RoPE: dims ``(i, i + D/2)`` of x rotate by ``position * theta**(-2i/D)``.

    Args:
        x: ``[..., T, H, D]``, any floating dtype, D even; positions: integer ``[..., T]``
            broadcastable to x's leading dims, on x's device.
    Returns:
        x rotated, same shape, dtype and device (computed in float32, float64 for float64 x).
    """
    ct = torch.float64 if x.dtype == torch.float64 else torch.float32
    cos, sin = rope_cos_sin(positions, x.shape[-1], theta, ct)
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # [..., T, 1, D/2]
    x1, x2 = x.to(ct).chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)
