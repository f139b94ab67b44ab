"""A property check for any top-n block selection (reference or kernel).

:func:`check_selection` does not demand bitwise equality with one implementation:
scores computed in float32 by a kernel may order near-ties differently. It demands
what the contract of :func:`nsa.ops.select_blocks` makes observable, row by row and
vectorized over all rows:

- entries are -1 or a causal block id ``0 .. t // block_size``;
- the valid ids are strictly ascending (hence distinct) and precede every -1;
- exactly ``max(0, num_selected - (t // block_size + 1))`` entries are -1;
- the forced blocks (initial and local, causal only) are present;
- every chosen non-forced block scores at least as high as the best unchosen causal
  block, up to ``tol * (1 + |score|)``, with scores recomputed in float64.
"""

from __future__ import annotations

import torch

from nsa.ops.reference import block_scores
from nsa.ops.utils import compressed_cu_seqlens, num_blocks


def _positions(T, cu_seqlens, device):
    """``[T]`` position of every token inside its own sequence."""
    if cu_seqlens is None:
        return torch.arange(T, device=device)
    cu = cu_seqlens.tolist()
    return torch.cat([torch.arange(b - a, device=device) for a, b in zip(cu[:-1], cu[1:])])


def reference_scores(q, k_cmp, lse, *, kernel_size, stride, block_size, scale=None, cu_seqlens=None):
    """float64 block scores ``[B, T, H, NB_max]``; columns past a sequence's last block are -inf.

    The given lse is used (upcast), as the contract defines ``p_cmp`` from it.
    """
    q64, k64, l64 = q.detach().double(), k_cmp.detach().double(), lse.detach().double()
    if cu_seqlens is None:
        return block_scores(q64, k64, l64, kernel_size, stride, block_size, scale)
    cu = cu_seqlens.tolist()
    ccu = compressed_cu_seqlens(cu_seqlens, kernel_size, stride).tolist()
    nb_max = max(num_blocks(b - a, block_size) for a, b in zip(cu[:-1], cu[1:]))
    parts = []
    for n, (a, b) in enumerate(zip(cu[:-1], cu[1:])):
        s = block_scores(q64[:, a:b], k64[:, ccu[n]:ccu[n + 1]], l64[:, a:b], kernel_size, stride, block_size,
                         scale)
        pad = nb_max - s.shape[-1]
        if pad:
            s = torch.cat([s, s.new_full((*s.shape[:-1], pad), float("-inf"))], -1)
        parts.append(s)
    return torch.cat(parts, 1)


def _first_bad(bad: torch.Tensor):
    """(b, t, h) of the first True entry of a ``[B, T, H]`` mask, or None."""
    where = bad.nonzero()
    return None if where.numel() == 0 else tuple(where[0].tolist())


def check_selection(q, k_cmp, lse, idx, *, kernel_size, stride, block_size, num_selected, num_initial,
                    num_local, scale=None, cu_seqlens=None, tol=1e-6):
    """Asserts that ``idx`` is a valid top-n selection for (q, k_cmp, lse); see the module docstring.

    Args:
        q: ``[B, T, HQ, Dk]``; k_cmp: ``[B, Tc, H, Dk]``; lse: ``[B, T, HQ]``.
        idx: int ``[B, T, H, num_selected]`` selection to check.
        tol: relative slack on score comparisons (a kernel scoring in float32 needs ~1e-5).
        Others as in :func:`nsa.ops.select_blocks`.
    Raises:
        AssertionError naming the first failing (b, t, h).
    """
    B, T, HQ, _ = q.shape
    H = k_cmp.shape[2]
    assert tuple(idx.shape) == (B, T, H, num_selected), \
        f"idx: shape {tuple(idx.shape)} != {(B, T, H, num_selected)}"
    dev = idx.device
    idx = idx.long()
    pos = _positions(T, cu_seqlens, dev)
    t_blk = (pos // block_size).view(1, T, 1)  # [1, T, 1]
    S = num_selected

    def where_msg(b, t, h):
        return f"(b={b}, t={t}, h={h}; position {pos[t].item()} in its sequence, block {t_blk[0, t, 0].item()})"

    # 1. range
    bad = ((idx != -1) & ((idx < 0) | (idx > t_blk.unsqueeze(-1)))).any(-1)
    if (w := _first_bad(bad)) is not None:
        raise AssertionError(f"out-of-range or non-causal block id at {where_msg(*w)}: row {idx[w].tolist()}")

    # 2. valid ids strictly ascending and before every -1
    valid = idx >= 0
    bad = (valid[..., 1:] & ~valid[..., :-1]).any(-1) | (valid[..., 1:] & (idx[..., 1:] <= idx[..., :-1])).any(-1)
    if (w := _first_bad(bad)) is not None:
        raise AssertionError(f"row not ascending / -1 not trailing / repeated id at {where_msg(*w)}: "
                             f"row {idx[w].tolist()}")

    # 3. number of -1 slots
    want_pad = torch.clamp(S - (t_blk + 1), min=0).expand(B, T, H)
    bad = (~valid).sum(-1) != want_pad
    if (w := _first_bad(bad)) is not None:
        raise AssertionError(f"expected {want_pad[w].item()} trailing -1 at {where_msg(*w)}: row {idx[w].tolist()}")

    score = reference_scores(q, k_cmp, lse, kernel_size=kernel_size, stride=stride, block_size=block_size,
                             scale=scale, cu_seqlens=cu_seqlens).to(dev)  # [B, T, H, NB]
    NB = score.shape[-1]
    j = torch.arange(NB, device=dev).view(1, 1, 1, NB)
    tb = t_blk.unsqueeze(-1)  # [1, T, 1, 1]
    causal = j <= tb
    forced = ((j < num_initial) | (j > tb - num_local)) & causal
    chosen = torch.zeros(B, T, H, NB + 1, dtype=torch.bool, device=dev)
    chosen.scatter_(-1, torch.where(valid, idx, NB), True)
    chosen = chosen[..., :NB]

    # 4. forced blocks present
    bad = (forced & ~chosen).any(-1)
    if (w := _first_bad(bad)) is not None:
        missing = (forced & ~chosen)[w].nonzero().flatten().tolist()
        raise AssertionError(f"forced blocks {missing} missing at {where_msg(*w)}: row {idx[w].tolist()}")

    # 5. chosen non-forced blocks score at least as high as every unchosen causal block
    unchosen = causal & ~chosen
    best_out = torch.where(unchosen, score, float("-inf")).amax(-1, keepdim=True)  # [B, T, H, 1]
    free = chosen & ~forced
    margin = tol * (1 + score.abs())
    bad_blk = free & (score < best_out - margin)
    bad = bad_blk.any(-1)
    if (w := _first_bad(bad)) is not None:
        jb = bad_blk[w].nonzero().flatten()[0].item()
        jo = torch.where(unchosen[w], score[w], float("-inf")).argmax().item()
        raise AssertionError(f"block {jb} chosen with score {score[w][jb].item():.17g} but block {jo} unchosen with "
                             f"higher score {score[w][jo].item():.17g} at {where_msg(*w)}: row {idx[w].tolist()}; "
                             f"causal scores {score[w][:t_blk[0, w[1], 0].item() + 1].tolist()}")
