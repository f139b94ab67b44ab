"""NSA for one new query per sequence against a padded KV cache (decoding).

The reference here is plain PyTorch, batched over sequences with masks; the Triton kernels
live in :mod:`nsa.ops.decode_triton`. The result is the last row of :func:`nsa.ops.nsa` on
each sequence, with the same selection rule (:func:`nsa.ops.select_blocks`).
"""

from __future__ import annotations

import os

import torch

from . import checks
from .api import BACKENDS, _interpret
from .reference import _compute_dtype, _masked_attention
from .utils import num_blocks, num_compressed, overlap_matrix

try:  # resolved at import, like the other ops' kernels (see nsa.ops.api)
    from .decode_triton import nsa_decode_triton
except ModuleNotFoundError as e:
    if e.name != "triton":
        raise
    nsa_decode_triton = None

__all__ = ["nsa_decode"]


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


def nsa_decode_reference(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, g_cmp, g_slc, g_win, seq_lens,
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


def _deferred_value_checks() -> bool:
    """The seq_lens range check reads the device on the host: skipped under torch.compile and
    while a CUDA graph is being captured (a decode step is captured after an eager, checked one)."""
    return checks._compiling() or (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


def _check_cache_pair(name_k, k, name_v, v, q, N, H, Dk, Dv):
    checks.check_tensor(name_k, k, 4)
    checks.check_tensor(name_v, v, 4)
    checks.check_same(name_k, k, "q", q)
    checks.check_same(name_v, v, "q", q)
    if k.shape[0] != N or k.shape[2] != H or k.shape[3] != Dk:
        raise ValueError(f"{name_k}: expected [N={N}, capacity, H={H}, Dk={Dk}], got {tuple(k.shape)}")
    if tuple(v.shape) != (N, k.shape[1], H, Dv):
        raise ValueError(f"{name_v}: expected {(N, k.shape[1], H, Dv)} ([N, capacity of {name_k}, H, Dv]), "
                         f"got {tuple(v.shape)}")


def nsa_decode(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, g_cmp, g_slc, g_win, seq_lens, *, kernel_size=32,
               stride=16, block_size=64, num_selected=16, num_initial=1, num_local=2, window_size=512, scale=None,
               return_block_indices=False, backend=None):
    """Native Sparse Attention of one new query per sequence over a padded cache.

    Sequence n holds ``seq_lens[n]`` tokens, the new one included; its query sits at
    position ``seq_lens[n] - 1``. The output row equals the last row of :func:`nsa.ops.nsa`
    run on that sequence alone (same branches, selection rule and gating).

    Args:
        q: ``[N, HQ, Dk]`` the new queries.
        k_cmp, v_cmp: ``[N, Tc_cap, H, Dk|Dv]`` compressed keys/values, padded; row n valid up to
            ``num_compressed(seq_lens[n])`` (see :func:`nsa.ops.utils.num_compressed`).
        k_slc, v_slc: ``[N, L_cap, H, Dk|Dv]`` raw selection-branch keys/values; row n valid up to
            ``seq_lens[n]``. k_win, v_win: the same for the window branch (may be the same tensors,
            and may have another capacity).
        g_cmp, g_slc, g_win: ``[N, HQ]`` gates (already through their sigmoid).
        seq_lens: int32 ``[N]``, each in ``[1, L_cap]``.
        kernel_size, stride, block_size, num_selected, num_initial, num_local, window_size, scale:
            as in :func:`nsa.ops.nsa`.
        return_block_indices: also return the int32 ``[N, H, num_selected]`` selected blocks
            (ascending, then -1), as in :func:`nsa.ops.select_blocks`.
        backend: None (reads ``NSA_BACKEND``, default 'auto') | 'auto' | 'reference' | 'triton'.
            'auto' runs the Triton kernels on CUDA tensors and the reference otherwise, and also
            when autograd needs a graph (grad enabled and an input requires grad); 'triton' forces
            the kernels (CUDA tensors, or CPU tensors with ``TRITON_INTERPRET=1``). The Triton
            path is inference only: its outputs never require grad.
    Returns:
        o ``[N, HQ, Dv]`` in q's dtype, or ``(o, block_indices)``.
    """
    checks.check_selection(kernel_size, stride, block_size, num_selected, num_initial, num_local)
    checks.check_positive_int("window_size", window_size)
    checks.check_scale(scale)
    checks.check_tensor("q", q, 3)
    N, HQ, Dk = q.shape
    checks.check_tensor("k_cmp", k_cmp, 4)
    checks.check_tensor("v_cmp", v_cmp, 4)
    H, Dv = k_cmp.shape[2], v_cmp.shape[3]
    if N == 0 or HQ == 0 or Dk == 0:
        raise ValueError(f"q: expected [N, HQ, Dk] with positive sizes, got {tuple(q.shape)}")
    if H == 0 or HQ % H != 0:
        raise ValueError(f"q: number of query heads ({HQ}) must be a positive multiple of the KV heads of "
                         f"k_cmp ({H})")
    if Dv == 0:
        raise ValueError(f"v_cmp: value head dim must be positive, got {tuple(v_cmp.shape)}")
    _check_cache_pair("k_cmp", k_cmp, "v_cmp", v_cmp, q, N, H, Dk, Dv)
    _check_cache_pair("k_slc", k_slc, "v_slc", v_slc, q, N, H, Dk, Dv)
    _check_cache_pair("k_win", k_win, "v_win", v_win, q, N, H, Dk, Dv)
    for name, g in (("g_cmp", g_cmp), ("g_slc", g_slc), ("g_win", g_win)):
        checks.check_tensor(name, g, 2)
        if g.device != q.device:
            raise ValueError(f"{name}: expected device {q.device} like q, got {g.device}")
        if tuple(g.shape) != (N, HQ):
            raise ValueError(f"{name}: expected shape {(N, HQ)} ([N, HQ]), got {tuple(g.shape)}")
    checks.check_tensor("seq_lens", seq_lens, 1, (torch.int32,))
    if seq_lens.device != q.device:
        raise ValueError(f"seq_lens: expected device {q.device} like q, got {seq_lens.device}")
    if seq_lens.shape[0] != N:
        raise ValueError(f"seq_lens: expected {N} entries (one per query), got {seq_lens.shape[0]}")
    if not _deferred_value_checks():
        lo, hi = (int(v) for v in torch.stack([seq_lens.min(), seq_lens.max()]).tolist())
        cap = min(k_slc.shape[1], k_win.shape[1])
        if lo < 1 or hi > cap:
            raise ValueError(f"seq_lens: entries must lie in [1, {cap}] (the cache capacity), got range [{lo}, {hi}]")
        if num_compressed(hi, kernel_size, stride) > k_cmp.shape[1]:
            raise ValueError(f"k_cmp: capacity {k_cmp.shape[1]} cannot hold the "
                             f"{num_compressed(hi, kernel_size, stride)} compressed tokens of a length-{hi} sequence")
    if backend is None:
        backend = os.environ.get("NSA_BACKEND", "auto") or "auto"
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected None or one of {BACKENDS}, got {backend!r}")
    if backend == "triton":
        if nsa_decode_triton is None:
            raise ValueError("backend: 'triton' requested but triton is not installed")
        if q.device.type != "cuda" and not _interpret():
            raise ValueError(f"backend: 'triton' needs CUDA tensors, or TRITON_INTERPRET=1 for CPU tensors; "
                             f"got {q.device}")
    tensors = (q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, g_cmp, g_slc, g_win)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    use_triton = backend == "triton" or (backend == "auto" and nsa_decode_triton is not None
                                         and q.device.type == "cuda" and not needs_grad)
    s = Dk ** -0.5 if scale is None else float(scale)
    fn = nsa_decode_triton if use_triton else nsa_decode_reference
    return fn(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, g_cmp, g_slc, g_win, seq_lens, kernel_size, stride,
              block_size, num_selected, num_initial, num_local, window_size, s, return_block_indices)
