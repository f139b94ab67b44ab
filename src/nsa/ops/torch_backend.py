"""NSA in plain PyTorch with memory linear in the sequence length: the ``'torch'`` backend.

The reference (:mod:`nsa.ops.reference`) is the specification: it builds every branch as a
masked ``[T, T]`` attention. This backend computes the same functions, with the same
signatures, for devices without the Triton kernels: queries go in chunks (of at most
``chunk_size`` positions when given), and a chunk touches only the keys its branch lets it see:

- compressed: the compressed tokens visible to the chunk's last query, ``[C, Tc]`` scores;
- selection: each query's scores of its causal blocks, each block summing the few compressed
  tokens it overlaps (where the reference multiplies by the whole ``[Tc, NB]`` overlap matrix),
  then the top-n rule of :func:`nsa.ops.select_blocks`;
- selected: either the union of the blocks the chunk's queries selected (when it is small:
  one dense product per chunk), or each query's own blocks in tiles: the queries that selected
  one block are gathered next to each other and multiplied by that block's keys read once;
- window: the band ``[t0 - window_size + 1, t1)`` of keys of a chunk ``[t0, t1)``.

No tensor is ``[T, T]``. Without autograd, the largest intermediates are a chunk's
``[C, HQ, Tc]`` compressed scores and its ``[C, HQ, num_selected * block_size]`` selected
scores; with autograd each chunk runs under
:func:`torch.utils.checkpoint.checkpoint` (recomputed in the backward), so what autograd
keeps is the inputs and the outputs. Packed sequences (``cu_seqlens``) are computed one
sequence at a time. Queries that start later than their keys (``q_offset``, ``cu_seqlens_k``: the
reference's convention) cost only their own rows: a chunk is placed at its positions. Everything is
ordinary autograd: gradients of any order.

Inputs are assumed valid (:mod:`nsa.ops.api` checks them), ``scale`` a float or None.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from .reference import _masked_attention, _sequences, _valid_rows, gate_combine, rope
from .utils import num_blocks, num_compressed, overlap_matrix, window_keys

__all__ = [
    "compressed_attention",
    "select_blocks",
    "selected_attention",
    "sliding_window_attention",
    "nsa",
    "nsa_decode",
    "gate_combine",
    "rope",
]

# Queries per chunk, at most; each branch lowers it so that its largest per-chunk
# intermediate stays near CHUNK_ELEMENTS elements (never below MIN_CHUNK queries).
CHUNK_SIZE = 128
CHUNK_ELEMENTS = 1 << 23
MIN_CHUNK = 16
# The selected branch of a chunk of queries either attends densely to the union of the U
# blocks they selected (large products, G * U * block_size scores per query and KV head), while
# U <= UNION_SLACK * num_selected, or computes each query's own num_selected blocks in tiles of
# the queries that share a block (index work; see _tile_plan), in chunks of at least TILE_CHUNK
# queries (more queries, fuller tiles) holding about TILE_ELEMENTS scores.
UNION_SLACK = 1.5
TILE_CHUNK = 1024
TILE_ELEMENTS = 1 << 23


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _resolve_scale(scale, q):
    return q.shape[-1] ** -0.5 if scale is None else float(scale)


def _chunk(chunk_size, per_query, budget=None):
    """Queries per chunk: ``chunk_size`` (default CHUNK_SIZE), lowered so that a chunk's largest
    intermediate (``per_query`` elements per query) stays near ``budget`` (CHUNK_ELEMENTS)."""
    c = CHUNK_SIZE if chunk_size is None else chunk_size
    budget = CHUNK_ELEMENTS if budget is None else budget
    return max(1, min(c, max(MIN_CHUNK, budget // max(per_query, 1))))


def _run(fn, *args):
    """``fn(*args)``; under autograd through a checkpoint, so that the chunk's intermediates are
    recomputed in the backward instead of kept."""
    if torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
        return checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=False)
    return fn(*args)


def _kv_heads(x, ct):
    """``[B, S, H, D]`` -> ``[B, H, S, D]`` in the compute dtype (one copy, outside the chunks)."""
    return x.to(ct).transpose(1, 2).contiguous()


def _q_heads(q, H, ct):
    """A chunk of queries ``[B, C, HQ, D]`` -> ``[B, H, C, G, D]`` in the compute dtype."""
    B, C, HQ, D = q.shape
    return q.to(ct).reshape(B, C, H, HQ // H, D).transpose(1, 2)


def _out(o, dtype):
    """``[B, H, C, G, Dv]`` -> ``[B, C, HQ, Dv]``."""
    B, H, C, G, Dv = o.shape
    return o.transpose(1, 2).reshape(B, C, H * G, Dv).to(dtype)


def _softmax(s, visible):
    """Softmax of the scores ``s`` ``[..., S]`` over the visible keys (``visible`` broadcasts to
    s), unnormalized: ``(e, denom, lse)`` with ``e / denom`` the probabilities (``e`` all zeros,
    ``denom`` 1 and ``lse`` -inf in a row that sees nothing). Callers divide ``e @ v`` by
    ``denom``: one pass over ``[..., Dv]`` instead of ``[..., S]``.

    ``s`` is overwritten with ``e``: pass a fresh product, not a view of one (in place on a view,
    autograd would copy the whole product in the backward)."""
    s = s.masked_fill_(~visible, float("-inf"))
    # amax has no identity: with no keys at all use 0
    m = s.detach().amax(-1, keepdim=True) if s.shape[-1] else s.new_zeros(*s.shape[:-1], 1)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = s.sub_(m).exp_()  # exactly 0 where masked
    denom = e.sum(-1, keepdim=True)
    nonempty = denom > 0
    safe = torch.where(nonempty, denom, torch.ones_like(denom))
    lse = torch.where(nonempty, torch.log(safe) + m, torch.full_like(denom, float("-inf")))
    return e, safe, lse.squeeze(-1)


def _dense_chunk(q, k, v, visible, scale):
    """Queries ``q`` ``[B, C, HQ, Dk]`` over keys ``k`` ``[B, H, S, Dk]``, values ``[B, H, S, Dv]``
    shared by the chunk; ``visible`` bool broadcastable to ``[B, H, C, 1, S]``.
    Returns o ``[B, C, HQ, Dv]`` in q's dtype and lse ``[B, C, HQ]``."""
    B, C, HQ, _ = q.shape
    H, S = k.shape[1], k.shape[2]
    G = HQ // H
    qh = (_q_heads(q, H, k.dtype) * scale).reshape(B, H, C * G, -1)
    visible = visible.expand(B, H, C, G, S).reshape(B, H, C * G, S)  # the layout of the product
    e, denom, lse = _softmax(qh @ k.transpose(-1, -2), visible)
    o = ((e @ v) / denom).view(B, H, C, G, -1)
    return _out(o, q.dtype), lse.view(B, H, C, G).transpose(1, 2).reshape(B, C, HQ)


def _empty_outputs(q, Dv, with_lse):
    B, T, HQ, _ = q.shape
    o = q.new_zeros(B, T, HQ, Dv)
    return (o, q.new_full((B, T, HQ), float("-inf"), dtype=_compute_dtype(q))) if with_lse else o


# ---------------------------------------------------------------- compressed branch


def _cmp_chunk(q, k, v, t0, kernel_size, stride, scale):
    """Queries at positions ``t0 ..`` over the compressed tokens ``k``/``v`` ``[B, H, n, D]``."""
    t = torch.arange(t0, t0 + q.shape[1], device=q.device).view(-1, 1, 1)
    i = torch.arange(k.shape[2], device=q.device).view(1, 1, -1)
    return _dense_chunk(q, k, v, i * stride + kernel_size - 1 <= t, scale)  # [C, 1, n]


def compressed_attention(q, k_cmp, v_cmp, kernel_size=32, stride=16, scale=None, cu_seqlens=None, q_offset=0,
                         cu_seqlens_k=None, *, chunk_size=None):
    """See :func:`nsa.ops.compressed_attention`. ``chunk_size``: queries per chunk, at most."""
    scale = _resolve_scale(scale, q)
    if cu_seqlens is not None:
        outs = [compressed_attention(qs, kc, vc, kernel_size, stride, scale, q_offset=off, chunk_size=chunk_size)
                for off, (qs,), _, (kc, vc) in _sequences(cu_seqlens, cu_seqlens_k, (q,), (), kernel_size, stride,
                                                          (k_cmp, v_cmp))]
        return torch.cat([o for o, _ in outs], 1), torch.cat([lse for _, lse in outs], 1)
    B, T, HQ, _ = q.shape
    if T == 0:
        return _empty_outputs(q, v_cmp.shape[-1], True)
    ct = _compute_dtype(q)
    k, v = _kv_heads(k_cmp, ct), _kv_heads(v_cmp, ct)  # [B, H, Tc, D]
    C = _chunk(chunk_size, B * HQ * max(k.shape[2], 1))
    outs = []
    for r0 in range(0, T, C):  # query rows r0 .. r1 - 1 at positions q_offset + r
        r1 = min(T, r0 + C)
        n = num_compressed(q_offset + r1, kernel_size, stride)  # visible to the chunk's last query
        outs.append(_run(_cmp_chunk, q[:, r0:r1], k[:, :, :n], v[:, :, :n], q_offset + r0, kernel_size, stride,
                         scale))
    return torch.cat([o for o, _ in outs], 1), torch.cat([lse for _, lse in outs], 1)


# ---------------------------------------------------------------- selection


def top_n(score, t, num_selected, num_initial, num_local, block_size):
    """The top-n rule of :func:`nsa.ops.select_blocks` on scores ``[..., NB]`` of queries at
    positions ``t`` (broadcastable to ``score.shape[:-1]``): int64 ``[..., min(num_selected, NB)]``
    selected ids ascending, then ``NB`` for unused slots."""
    NB = score.shape[-1]
    t_blk = (t // block_size).unsqueeze(-1)
    j = torch.arange(NB, device=score.device)
    causal = j <= t_blk
    forced = (j < num_initial) | ((j > t_blk - num_local) & causal)
    pri = torch.where(forced, float("inf"), score)
    pri = torch.where(causal, pri, float("-inf"))
    k = min(num_selected, NB)
    # stable descending sort: among equal scores the lower block id wins
    order = torch.sort(pri, dim=-1, descending=True, stable=True).indices[..., :k]
    ids = torch.where(torch.gather(pri, -1, order) > float("-inf"), order, NB)
    return torch.sort(ids, dim=-1).values


def _rows(ids, NB, num_selected):
    """``top_n`` ids -> int32 rows: ``NB`` -> -1, padded with -1 to ``num_selected`` slots."""
    ids = torch.where(ids == NB, -1, ids)
    if ids.shape[-1] < num_selected:
        ids = torch.cat([ids, ids.new_full((*ids.shape[:-1], num_selected - ids.shape[-1]), -1)], -1)
    return ids.to(torch.int32)


def _block_weights(kernel_size, stride, block_size, device, dtype):
    """The nonzero column of :func:`nsa.ops.utils.overlap_matrix`, shared by every block: block j
    overlaps the ``R = (block_size + kernel_size) // stride - 1`` compressed tokens
    ``j * block_size // stride - (kernel_size // stride - 1) + r``, r < R, with weights ``[R]``."""
    lead = kernel_size // stride - 1
    R = (block_size + kernel_size) // stride - 1
    start = (torch.arange(R, device=device) - lead) * stride  # the token's first position, block 0 at 0
    lo = torch.clamp(start, min=0)
    hi = torch.clamp(start + kernel_size, max=block_size)
    return (torch.clamp(hi - lo, min=0) // stride).to(dtype)


def select_blocks(q, k_cmp, lse, kernel_size=32, stride=16, block_size=64, num_selected=16, num_initial=1,
                  num_local=2, scale=None, cu_seqlens=None, q_offset=0, cu_seqlens_k=None, *, chunk_size=None):
    """See :func:`nsa.ops.select_blocks`.

    The scores of a chunk's queries cover only their causal blocks, each summed over the few
    compressed tokens it overlaps (a band, where the reference multiplies by the whole
    ``[Tc, NB]`` overlap matrix): the same sums, added in another order, so scores may differ
    from the reference's in the last bits and a near-tie (within rounding) may go the other way.
    """
    if cu_seqlens is not None:
        return torch.cat([select_blocks(qs, kc, ls, kernel_size, stride, block_size, num_selected, num_initial,
                                        num_local, scale, q_offset=off, chunk_size=chunk_size)
                          for off, (qs, ls), _, (kc,) in _sequences(cu_seqlens, cu_seqlens_k, (q, lse), (), kernel_size,
                                                                    stride, (k_cmp,))], 1)
    scale = _resolve_scale(scale, q)
    B, T, HQ, Dk = q.shape
    Tc, H = k_cmp.shape[1], k_cmp.shape[2]
    G = HQ // H
    ct = _compute_dtype(q)
    dev = q.device
    step = block_size // stride  # compressed tokens from one block to the next
    lead = kernel_size // stride - 1
    with torch.no_grad():
        k = _kv_heads(k_cmp.detach(), ct)  # [B, H, Tc, Dk]
        lse = lse.detach().to(ct)
        wr = _block_weights(kernel_size, stride, block_size, dev, ct)  # [R]
        R = wr.numel()
        C = _chunk(chunk_size, B * HQ * max(Tc, 1) + B * H * max(Tc, 1) * R // step)
        rows = []
        for r0 in range(0, T, C):  # query rows r0 .. r1 - 1 at positions t0 .. t1 - 1
            r1 = min(T, r0 + C)
            t0, t1 = q_offset + r0, q_offset + r1
            n = num_compressed(t1, kernel_size, stride)  # tokens visible to the chunk's last query
            nb = num_blocks(t1, block_size)  # causal blocks of the chunk's last query
            t = torch.arange(t0, t1, device=dev)
            qh = _q_heads(q[:, r0:r1].detach(), H, ct).reshape(B, H, (r1 - r0) * G, Dk)
            s = (qh @ k[:, :, :n].transpose(-1, -2)).view(B, H, r1 - r0, G, n) * scale
            ls = lse[:, r0:r1].reshape(B, r1 - r0, H, G).transpose(1, 2).unsqueeze(-1)  # [B, H, C, G, 1]
            fin = torch.isfinite(ls)
            vis = torch.arange(n, device=dev) * stride + kernel_size - 1 <= t.view(-1, 1, 1)  # [C, 1, n]
            p = torch.where(vis & fin, torch.exp(s - torch.where(fin, ls, 0)), 0).sum(3)  # [B, H, C, n]
            # block j sums the tokens j*step - lead .. j*step - lead + R - 1 (zeros outside 0 .. n-1)
            p = torch.nn.functional.pad(p, (lead, max(0, (nb - 1) * step + R - lead - n)))
            score = p.unfold(-1, R, step)[..., :nb, :] @ wr  # [B, H, C, nb]
            ids = top_n(score.transpose(1, 2), t.view(1, -1, 1), num_selected, num_initial, num_local, block_size)
            rows.append(_rows(ids, nb, num_selected))
        if not rows:
            return torch.empty(B, 0, H, num_selected, dtype=torch.int32, device=dev)
        return torch.cat(rows, 1)


# ---------------------------------------------------------------- selected branch


def _union_chunk(q, kb, vb, idx, ids, t0, block_size, scale):
    """Queries ``[B, C, HQ, Dk]`` at positions ``t0 ..`` over the union of their selected blocks.

    kb, vb: ``[B, H, NB, bs, D]`` keys/values by block; idx: int ``[B, C, H, S]`` the queries'
    blocks (-1 unused); ids: int64 ``[B, H, U]`` the union, ascending, padded with NB.
    """
    B, H, NB, bs, _ = kb.shape
    C, U = q.shape[1], ids.shape[-1]
    dev = q.device
    ok = ids < NB
    ids0 = torch.where(ok, ids, 0)
    flat = (torch.arange(B * H, device=dev).view(B, H, 1) * NB + ids0).flatten()
    k = kb.flatten(0, 2).index_select(0, flat).view(B, H, U * bs, kb.shape[-1])
    v = vb.flatten(0, 2).index_select(0, flat).view(B, H, U * bs, vb.shape[-1])
    # which union blocks each query selected: [B, H, C, U]
    member = torch.zeros(B, C, H, NB + 1, dtype=torch.bool, device=dev)
    member = member.scatter(-1, torch.where(idx < 0, NB, idx.long()), True)[..., :NB].permute(0, 2, 1, 3)
    member = torch.gather(member, -1, ids0.unsqueeze(2).expand(B, H, C, U)) & ok.unsqueeze(2)
    pos = (ids0.unsqueeze(-1) * block_size + torch.arange(bs, device=dev)).view(B, H, 1, U * bs)
    t = torch.arange(t0, t0 + C, device=dev).view(1, 1, C, 1)
    visible = member.repeat_interleave(bs, -1) & (pos <= t)  # [B, H, C, U * bs]
    return _dense_chunk(q, k, v, visible.unsqueeze(3), scale)[0]


def _tile_plan(idx, NB, H):
    """How the (query, slot) pairs of block indices ``idx`` ``[B, C, H, S]`` fill tiles: the
    pairs of one block of one KV head of one batch row (a group), R rows to a tile.

    Returns ``(rows, tile_blocks, R)``: ``rows`` int64 ``[NT * R]``, the query (flat index into
    ``[B, C, H]``) of every tile row or -1 for padding; ``tile_blocks`` int64 ``[NT]``, the group
    of every tile (flat index into ``[B, H, NB]``). Three host reads (sizes)."""
    B, C, _, S = idx.shape
    dev = idx.device
    blk = idx.reshape(-1).long()
    pair = (blk >= 0).nonzero().squeeze(1)  # flat (b, c, h, s) of the listed blocks
    query = pair // S  # flat (b, c, h)
    group = (query // (C * H) * H + query % H) * NB + blk[pair]  # flat (b, h, block)
    group, order = torch.sort(group, stable=True)
    query = query[order]
    counts = torch.bincount(group, minlength=B * H * NB)
    # tiles of about the mean group size (a power of two in [4, 64]): few padding rows, large products
    used = max(int((counts > 0).sum()), 1)
    R = min(64, max(4, 1 << max(0, (query.numel() // used).bit_length() - 1)))
    ntiles = -(-counts // R)
    first_tile = torch.cumsum(ntiles, 0) - ntiles
    rank = torch.arange(query.numel(), device=dev) - (torch.cumsum(counts, 0) - counts)[group]
    NT = int(ntiles.sum())
    rows = torch.full((NT * R,), -1, dtype=torch.long, device=dev)
    rows[(first_tile[group] + rank // R) * R + rank % R] = query
    tile_blocks = torch.repeat_interleave(torch.arange(B * H * NB, device=dev), ntiles, output_size=NT)
    return rows, tile_blocks, R


def _tile_chunk(q, kb, vb, t0, block_size, scale, rows, tile_blocks, R):
    """Queries ``[B, C, HQ, Dk]`` at positions ``t0 ..``, each over its own selected blocks, pair
    by pair in tiles (see :func:`_tile_plan`): a tile's R queries share one block, its keys read
    once for the tile. The softmax of a query runs over the rows of all its tiles."""
    B, H, NB, bs, Dk = kb.shape
    Dv = vb.shape[-1]
    C, HQ = q.shape[1], q.shape[2]
    G = HQ // H
    NT = tile_blocks.numel()
    dev = q.device
    ok = rows >= 0
    qrow = torch.where(ok, rows, 0)
    qf = q.to(kb.dtype).reshape(B * C * H, G, Dk) * scale  # rows (b, c, h)
    k = kb.reshape(B * H * NB, bs, Dk).index_select(0, tile_blocks)  # [NT, bs, Dk]
    v = vb.reshape(B * H * NB, bs, Dv).index_select(0, tile_blocks)
    s = qf.index_select(0, qrow).view(NT, R * G, Dk) @ k.transpose(-1, -2)  # [NT, R * G, bs]
    t = t0 + (qrow // H) % C  # [NT * R] the row's query position
    pos = (tile_blocks % NB).repeat_interleave(R).unsqueeze(-1) * block_size + torch.arange(bs, device=dev)
    hidden = (~ok).unsqueeze(-1) | (pos > t.unsqueeze(-1))  # [NT * R, bs]
    # in place on the product itself (not a view of it: autograd would copy it in the backward)
    s.masked_fill_(hidden.view(NT, R, 1, bs).expand(NT, R, G, bs).reshape(NT, R * G, bs), float("-inf"))
    # each query's maximum over all its rows
    m = torch.full((B * C * H, G), float("-inf"), dtype=s.dtype, device=dev)
    m = m.scatter_reduce(0, qrow.unsqueeze(-1).expand(-1, G), s.detach().amax(-1).view(NT * R, G), "amax")
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = s.sub_(m.index_select(0, qrow).view(NT, R * G, 1)).exp_()  # exactly 0 where masked
    denom = torch.zeros(B * C * H, G, dtype=s.dtype, device=dev).index_add(0, qrow, e.sum(-1).view(NT * R, G))
    o = (e @ v).view(NT * R, G, Dv)
    o = torch.zeros(B * C * H, G, Dv, dtype=s.dtype, device=dev).index_add(0, qrow, o)
    o = o / torch.where(denom > 0, denom, torch.ones_like(denom)).unsqueeze(-1)
    return o.view(B, C, HQ, Dv).to(q.dtype)


def _by_block(x, block_size, ct):
    """``[B, T, H, D]`` -> ``[B, H, NB, block_size, D]`` in the compute dtype, zero-padded."""
    B, T, H, D = x.shape
    NB = num_blocks(T, block_size)
    x = torch.nn.functional.pad(x.to(ct).transpose(1, 2), (0, 0, 0, NB * block_size - T))
    return x.reshape(B, H, NB, block_size, D)


def selected_attention(q, k, v, block_indices, block_size=64, scale=None, cu_seqlens=None, q_offset=0,
                       cu_seqlens_k=None, *, chunk_size=None):
    """See :func:`nsa.ops.selected_attention`."""
    scale = _resolve_scale(scale, q)
    if cu_seqlens is not None:
        return torch.cat([selected_attention(qs, ks, vs, bi, block_size, scale, q_offset=off, chunk_size=chunk_size)
                          for off, (qs, bi), (ks, vs), _ in _sequences(cu_seqlens, cu_seqlens_k, (q, block_indices),
                                                                       (k, v))], 1)
    B, T, HQ, _ = q.shape
    H, S = k.shape[2], block_indices.shape[-1]
    if T == 0:
        return _empty_outputs(q, v.shape[-1], False)
    ct = _compute_dtype(q)
    NB = num_blocks(k.shape[1], block_size)
    kb, vb = _by_block(k, block_size, ct), _by_block(v, block_size, ct)
    C = _chunk(chunk_size, B * HQ * int(UNION_SLACK * S * block_size))
    Ct = _chunk(TILE_CHUNK if chunk_size is None else chunk_size, B * HQ * S * block_size, TILE_ELEMENTS)

    def tiles(a, b):
        with torch.no_grad():
            plan = _tile_plan(block_indices[:, a:b], NB, H)
        return _run(_tile_chunk, q[:, a:b], kb, vb, q_offset + a, block_size, scale, *plan)

    outs = []
    pending = None  # queries [a, b) waiting for the tiles
    for t0 in range(0, T, C):
        t1 = min(T, t0 + C)
        idx = block_indices[:, t0:t1]
        with torch.no_grad():
            # the union of the chunk's blocks per KV head, ascending, padded with NB
            union = torch.zeros(B, t1 - t0, H, NB + 1, dtype=torch.bool, device=q.device)
            union = union.scatter(-1, torch.where(idx < 0, NB, idx.long()), True)[..., :NB].any(1)  # [B, H, NB]
            U = int(union.sum(-1).max().item())
        if U <= UNION_SLACK * S:
            if pending is not None:
                outs.append(tiles(*pending))
                pending = None
            ids = torch.where(union, torch.arange(NB, device=q.device), NB).sort(-1).values[..., :U]
            outs.append(_run(_union_chunk, q[:, t0:t1], kb, vb, idx, ids, q_offset + t0, block_size, scale))
        elif pending is not None and t1 - pending[0] <= Ct:
            pending = (pending[0], t1)
        else:
            if pending is not None:
                outs.append(tiles(*pending))
            pending = (t0, t1)
    if pending is not None:
        outs.append(tiles(*pending))
    return torch.cat(outs, 1)


# ---------------------------------------------------------------- window branch


def _window_chunk(q, k, v, t0, a, window_size, scale):
    """Queries at positions ``t0 ..`` over the keys ``a ..`` (``k``, ``v`` ``[B, H, S, D]``)."""
    t = torch.arange(t0, t0 + q.shape[1], device=q.device).view(-1, 1, 1)
    d = t - torch.arange(a, a + k.shape[2], device=q.device).view(1, 1, -1)
    return _dense_chunk(q, k, v, (d >= 0) & (d < window_size), scale)[0]  # [C, 1, S]


def sliding_window_attention(q, k, v, window_size=512, scale=None, cu_seqlens=None, q_offset=0, cu_seqlens_k=None,
                             *, chunk_size=None):
    """See :func:`nsa.ops.sliding_window_attention`."""
    scale = _resolve_scale(scale, q)
    if cu_seqlens is not None:
        return torch.cat([sliding_window_attention(qs, ks, vs, window_size, scale, q_offset=off, chunk_size=chunk_size)
                          for off, (qs,), (ks, vs), _ in _sequences(cu_seqlens, cu_seqlens_k, (q,), (k, v))], 1)
    B, T, HQ, _ = q.shape
    if T == 0:
        return _empty_outputs(q, v.shape[-1], False)
    w = window_keys(window_size, k.shape[1])
    ct = _compute_dtype(q)
    kh, vh = _kv_heads(k, ct), _kv_heads(v, ct)  # [B, H, q_offset + T, D]
    # a chunk of C queries reads C + w - 1 keys: no more than twice the w it needs when C <= w
    C = _chunk(min(chunk_size or CHUNK_SIZE, max(w, MIN_CHUNK)), B * HQ * 2 * w)
    outs = []
    for r0 in range(0, T, C):  # query rows r0 .. r1 - 1 at positions t0 .. t1 - 1
        r1 = min(T, r0 + C)
        t0, t1 = q_offset + r0, q_offset + r1
        a = max(0, t0 - w + 1)
        outs.append(_run(_window_chunk, q[:, r0:r1], kh[:, :, a:t1], vh[:, :, a:t1], t0, a, w, scale))
    return torch.cat(outs, 1)


# ---------------------------------------------------------------- NSA


def nsa(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, g_cmp, g_slc, g_win, *, kernel_size=32, stride=16,
        block_size=64, num_selected=16, num_initial=1, num_local=2, window_size=512, scale=None,
        cu_seqlens=None, return_block_indices=False, q_offset=0, cu_seqlens_k=None, chunk_size=None):
    """The three branches composed and gated. See :func:`nsa.ops.nsa`."""
    kw = dict(q_offset=q_offset, cu_seqlens_k=cu_seqlens_k, chunk_size=chunk_size)
    o_cmp, lse = compressed_attention(q, k_cmp, v_cmp, kernel_size, stride, scale, cu_seqlens, **kw)
    idx = select_blocks(q, k_cmp, lse, kernel_size, stride, block_size, num_selected, num_initial, num_local,
                        scale, cu_seqlens, **kw)
    o_slc = selected_attention(q, k_slc, v_slc, idx, block_size, scale, cu_seqlens, **kw)
    o_win = sliding_window_attention(q, k_win, v_win, window_size, scale, cu_seqlens, **kw)
    o = gate_combine(o_cmp, o_slc, o_win, g_cmp, g_slc, g_win, q.dtype)
    return (o, idx) if return_block_indices else o


# ---------------------------------------------------------------- decoding


def _gather_rows(x, pos, valid, ct):
    """Rows ``pos`` ``[N, H, P]`` of a cache ``x`` ``[N, L, H, D]``, per KV head -> ``[N, H, P, D]``
    in dtype ``ct``; rows that are not ``valid`` are zeros (the cache may hold anything there)."""
    N, L, H, _ = x.shape
    n = torch.arange(N, device=x.device).view(N, 1, 1)
    h = torch.arange(H, device=x.device).view(1, H, 1)
    rows = x[n, pos.clamp(0, L - 1), h].to(ct)
    return torch.where(valid.unsqueeze(-1), rows, torch.zeros((), dtype=ct, device=x.device))


def _decode_attention(q, k, v, visible, scale):
    """One query per sequence ``q`` ``[N, H, G, Dk]`` over its own keys ``k`` ``[N, H, P, Dk]``."""
    e, denom, _ = _softmax((q * scale) @ k.transpose(-1, -2), visible.unsqueeze(2))
    return (e @ v) / denom  # [N, H, G, Dv]


def decode_compressed_and_select(q, qh, k_cmp, v_cmp, seq_lens, NB, kernel_size, stride, block_size, num_selected,
                                 num_initial, num_local, scale):
    """A decoding step's compressed branch and selection (dense or paged caches alike): the
    reference's own products on the same shapes, so the same lse and the same blocks, bit for bit
    (both are O(cache length / stride) per step).

    q ``[N, HQ, Dk]``, qh: q in the compute dtype as ``[N, H, G, Dk]``; k_cmp, v_cmp ``[N, Tc, H,
    D]``; seq_lens int ``[N]`` (the new query at ``seq_lens - 1``); NB: selection blocks of the
    cache layout. Returns o_cmp ``[N, 1, HQ, Dv]`` and the selected block ids ``[N, H, k]``."""
    N, H, G, _ = qh.shape
    ct, dev = qh.dtype, q.device
    t = seq_lens.long() - 1
    n_cmp = torch.where(seq_lens >= kernel_size, torch.div(seq_lens - kernel_size, stride, rounding_mode="floor") + 1,
                        torch.zeros_like(seq_lens))
    k_cmp, v_cmp = _valid_rows(k_cmp, n_cmp), _valid_rows(v_cmp, n_cmp)
    Tc = k_cmp.shape[1]
    vis = (torch.arange(Tc, device=dev).view(1, Tc) * stride + kernel_size - 1) <= t.view(N, 1)  # [N, Tc]
    o_cmp, lse = _masked_attention(q.unsqueeze(1), k_cmp, v_cmp, vis.view(N, 1, 1, 1, Tc), scale)
    with torch.no_grad():
        s = torch.einsum("nhgd,nchd->nhgc", qh.detach(), k_cmp.detach().to(ct)) * scale
        lse_g = lse.detach().to(ct).view(N, H, G, 1)
        fin = torch.isfinite(lse_g)
        p = torch.where(vis.view(N, 1, 1, Tc) & fin, torch.exp(s - torch.where(fin, lse_g, 0)), 0)
        w = overlap_matrix(Tc, NB, kernel_size, stride, block_size, dev, ct)  # [Tc, NB]
        ids = top_n(torch.einsum("nhgc,cj->nhj", p, w), t.view(N, 1), num_selected, num_initial, num_local,
                    block_size)  # [N, H, k]
    return o_cmp, ids


def nsa_decode(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, g_cmp, g_slc, g_win, seq_lens, kernel_size, stride,
               block_size, num_selected, num_initial, num_local, window_size, scale, return_block_indices=False):
    """See :func:`nsa.ops.decode.nsa_decode`; inputs assumed valid, ``scale`` a float.

    Per step and sequence: the compressed branch and the block scores over the cache's compressed
    tokens, as the reference computes them; then only the selected blocks and the window are
    gathered (the reference attends over the whole cache). No host reads: a step traces as one graph."""
    N, HQ, Dk = q.shape
    H = k_cmp.shape[2]
    G = HQ // H
    ct = _compute_dtype(q)
    dev = q.device
    t = seq_lens.long() - 1  # [N] position of the new query
    qh = q.to(ct).view(N, H, G, Dk)

    NB = num_blocks(k_slc.shape[1], block_size)
    o_cmp, ids = decode_compressed_and_select(q, qh, k_cmp, v_cmp, seq_lens, NB, kernel_size, stride, block_size,
                                              num_selected, num_initial, num_local, scale)

    # Selected branch: keys s <= t of the selected blocks, gathered.
    ok = ids < NB
    pos = ((torch.where(ok, ids, 0) * block_size).unsqueeze(-1)
           + torch.arange(block_size, device=dev)).flatten(-2)  # [N, H, k * bs]
    vis_s = ok.repeat_interleave(block_size, -1) & (pos <= t.view(N, 1, 1))
    o_slc = _decode_attention(qh, _gather_rows(k_slc, pos, vis_s, ct), _gather_rows(v_slc, pos, vis_s, ct),
                               vis_s, scale)

    # Window branch: keys t - window_size < s <= t, gathered.
    w_len = min(window_size, k_win.shape[1])
    pos = (t.view(N, 1) - w_len + 1 + torch.arange(w_len, device=dev)).view(N, 1, w_len).expand(N, H, w_len)
    vis_w = pos >= 0
    o_win = _decode_attention(qh, _gather_rows(k_win, pos, vis_w, ct), _gather_rows(v_win, pos, vis_w, ct),
                               vis_w, scale)

    def flat(o):
        return o.reshape(N, HQ, -1).to(q.dtype)

    o = (g_cmp.unsqueeze(-1) * o_cmp[:, 0] + g_slc.unsqueeze(-1) * flat(o_slc)
         + g_win.unsqueeze(-1) * flat(o_win)).to(q.dtype)
    return (o, _rows(ids, NB, num_selected)) if return_block_indices else o
