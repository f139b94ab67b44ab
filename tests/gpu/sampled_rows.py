"""The reference on a sample of query rows, for the long-context GPU tests.

At T = 128k the float32 reference cannot hold the scores of every query ([T, T] or [T, Tc]
per head), so the long tests check a few hundred query positions spread over the sequence,
every head. The reference of a query row depends on that row and on all the keys it may see,
and the reference assumes that row t of q sits at position t; here the reference's masked
attention (:func:`nsa.ops.reference._masked_attention`) runs on the gathered query rows
against every key, with the op's visibility mask built for the rows' own positions.

Gradients: a query row's dq depends on its own upstream gradient only, so the dq rows of any
backward are comparable. dk and dv sum over all query rows; with an upstream gradient that is
zero except on the sampled rows (:func:`rows_only`), they sum over the sampled rows alone, and
the row reference gives them in full.

Every function runs on the tensors' device (CUDA in the GPU tests; CPU at tiny sizes checks
them against the full reference: tests/gpu/test_sampled_rows.py).
"""

from __future__ import annotations

import torch

from nsa.ops import reference
from nsa.ops.utils import num_blocks, overlap_matrix
from tests.helpers import assert_close


def sample_positions(T: int, n: int = 256, seed: int = 0, device="cuda") -> torch.Tensor:
    """int64 ``[n]`` distinct query positions in ``[0, T)``, ascending: the first and the last, and
    ``n - 2`` drawn uniformly from the others (``n <= T``)."""
    assert 2 <= n <= T
    g = torch.Generator().manual_seed(seed)
    inner = torch.randperm(T - 2, generator=g)[:n - 2] + 1
    return torch.cat([torch.tensor([0, T - 1]), inner]).sort().values.to(device)


def rows_only(do: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``do`` ``[B, T, ...]`` with every row but ``rows`` set to zero."""
    out = torch.zeros_like(do)
    out[:, rows] = do[:, rows]
    return out


def compressed_mask(kernel_size: int, stride: int, num_cmp: int):
    """Visibility of compressed token i to the query at position t: ``i*stride + kernel_size - 1 <= t``."""
    def mask(t):
        i = torch.arange(num_cmp, device=t.device)
        return i.view(1, -1) * stride + kernel_size - 1 <= t.view(-1, 1)  # [n, Tc]
    return mask


def window_mask(window_size: int, num_keys: int):
    """Visibility of key s to the query at position t: ``t - window_size < s <= t``."""
    def mask(t):
        d = t.view(-1, 1) - torch.arange(num_keys, device=t.device).view(1, -1)
        return (d >= 0) & (d < window_size)  # [n, S]
    return mask


def selected_mask(block_indices: torch.Tensor, block_size: int):
    """Visibility of key s to the query at position t of KV head h: ``s <= t`` inside a block
    listed in ``block_indices[:, t, h]`` (``[B, T, H, S]``, -1 ignored)."""
    B, T, H, _ = block_indices.shape
    NB = num_blocks(T, block_size)

    def mask(t):
        sel = block_indices[:, t].long()  # [B, n, H, S]
        sel = torch.where(sel < 0, NB, sel)
        blk = torch.zeros(B, t.numel(), H, NB + 1, dtype=torch.bool, device=t.device).scatter_(-1, sel, True)
        blk = blk[..., :NB].repeat_interleave(block_size, -1)[..., :T]  # [B, n, H, T]
        causal = torch.arange(T, device=t.device).view(1, -1) <= t.view(-1, 1)  # [n, T]
        return (blk.permute(0, 2, 1, 3) & causal).unsqueeze(2)  # [B, H, 1, n, T]
    return mask


def rows_reference(q, k, v, rows, mask, scale, do=None, chunk=16):
    """The float32 reference on the query rows at positions ``rows`` (dense batch).

    Args:
        q: ``[B, T, HQ, Dk]``; k: ``[B, S, H, Dk]``; v: ``[B, S, H, Dv]`` (every key).
        rows: int64 ``[n]`` positions.
        mask: ``mask(t)`` for positions ``t`` ``[m]``: bool visibility broadcastable to
            ``[B, H, G, m, S]`` (:func:`compressed_mask`, :func:`window_mask`, :func:`selected_mask`).
        scale: softmax scale.
        do: optional ``[B, T, HQ, Dv]`` upstream gradient, read on ``rows`` only.
        chunk: query rows per evaluation (the scores of a chunk are ``[B, HQ, chunk, S]`` float32).
    Returns:
        dict with o ``[B, n, HQ, Dv]`` and lse ``[B, n, HQ]``; with ``do`` also dq ``[B, n, HQ, Dk]``
        and dk ``[B, S, H, Dk]``, dv ``[B, S, H, Dv]``: the gradients of ``sum(o * do[:, rows])``,
        so dk and dv come from these rows alone.
    """
    grads = do is not None
    kf = k.detach().float().requires_grad_(grads)
    vf = v.detach().float().requires_grad_(grads)
    o, lse, dq = [], [], []
    for a in range(0, rows.numel(), chunk):
        t = rows[a:a + chunk]
        qc = q.detach()[:, t].float().requires_grad_(grads)
        with torch.set_grad_enabled(grads):
            oc, lc = reference._masked_attention(qc, kf, vf, mask(t), scale)
        if grads:
            oc.backward(do[:, t].float())
            dq.append(qc.grad)
        o.append(oc.detach())
        lse.append(lc.detach())
    out = dict(o=torch.cat(o, 1), lse=torch.cat(lse, 1))
    if grads:
        out.update(dq=torch.cat(dq, 1), dk=kf.grad, dv=vf.grad)
    return out


def assert_rows_close(name, ref, o, rows, ratio, lse=None, lse_ratio=None):
    """o ``[B, T, HQ, Dv]`` (and lse ``[B, T, HQ]``) on ``rows`` against :func:`rows_reference`'s
    result ``ref``: relative error, and lse's -inf (nothing visible) at the same places."""
    assert_close(f"{name} o on {rows.numel()} rows", ref["o"], o[:, rows].float(), ratio)
    if lse is not None:
        lr, lk = ref["lse"], lse[:, rows].float()
        fin = torch.isfinite(lr)
        assert torch.equal(torch.isfinite(lk), fin), f"{name}: lse is -inf at other rows than the reference's"
        assert_close(f"{name} lse on {rows.numel()} rows", lr[fin], lk[fin], lse_ratio)


def assert_row_grads_close(name, ref, grads, rows, ratio):
    """Gradients ``(dq, dk, dv)`` of a backward whose upstream gradient was zero off ``rows``
    (:func:`rows_only`) against :func:`rows_reference` with that gradient: dq on the rows, zero
    on every other row; dk and dv in full."""
    dq, dk, dv = grads
    assert_close(f"{name} dq on {rows.numel()} rows", ref["dq"], dq[:, rows].float(), ratio)
    off = torch.ones(dq.shape[1], dtype=torch.bool, device=dq.device)
    off[rows] = False
    assert not dq[:, off].any(), f"{name}: dq nonzero on a row whose upstream gradient is zero"
    assert_close(f"{name} dk (from the sampled rows)", ref["dk"], dk.float(), ratio)
    assert_close(f"{name} dv (from the sampled rows)", ref["dv"], dv.float(), ratio)


def selection_row_scores(q, k_cmp, lse, rows, kernel_size, stride, block_size, scale=None, chunk=64):
    """float64 block scores ``[B, n, H, NB]`` (``NB = ceil(T / block_size)``) of the query rows at
    positions ``rows``: :func:`nsa.ops.reference.block_scores` restricted to those rows, with the
    given lse (dense batch)."""
    B, T, HQ, Dk = q.shape
    Tc, H = k_cmp.shape[1], k_cmp.shape[2]
    G = HQ // H
    scale = Dk ** -0.5 if scale is None else scale
    NB = num_blocks(T, block_size)
    w = overlap_matrix(Tc, NB, kernel_size, stride, block_size, q.device, torch.float64)  # [Tc, NB]
    k64 = k_cmp.detach().double()
    vis_of = compressed_mask(kernel_size, stride, Tc)
    out = []
    for a in range(0, rows.numel(), chunk):
        t = rows[a:a + chunk]
        qg = q.detach()[:, t].double().view(B, t.numel(), H, G, Dk)
        s = torch.einsum("bthgd,bshd->bthgs", qg, k64) * scale
        l64 = lse.detach()[:, t].double().view(B, t.numel(), H, G, 1)
        ok = vis_of(t).view(1, t.numel(), 1, 1, Tc) & torch.isfinite(l64)
        p = torch.where(ok, torch.exp(s - torch.where(torch.isfinite(l64), l64, 0)), 0)
        out.append(torch.einsum("bthgs,sn->bthn", p, w))
    return torch.cat(out, 1)


def check_selection_rows(q, k_cmp, lse, idx, rows, *, kernel_size, stride, block_size, num_selected,
                         num_initial, num_local, scale=None, tol=1e-5, min_match=0.99):
    """The selection ``idx`` ``[B, T, H, num_selected]`` on the query rows at ``rows`` against the
    reference rule (:func:`nsa.ops.reference._select_decode`, the top-n of one position) on the
    float64 scores of those rows (:func:`selection_row_scores`): every sampled row holds exactly
    its forced blocks and ``min(num_selected, t // block_size + 1)`` causal blocks, each chosen
    block scores at least as high as every unchosen causal block up to ``tol * (1 + |score|)``
    (near-ties may order differently in float32), and at least ``min_match`` of the rows equal
    the reference's choice."""
    B, T = q.shape[:2]
    H = k_cmp.shape[2]
    score = selection_row_scores(q, k_cmp, lse, rows, kernel_size, stride, block_size, scale)  # [B, n, H, NB]
    n, NB = rows.numel(), score.shape[-1]
    t = rows.repeat(B)  # [B * n], batch-major like score.view(B * n, ...)
    want = reference._select_decode(score.view(B * n, H, NB), t, num_selected, num_initial, num_local,
                                    block_size).view(B, n, H, NB)
    sel = idx[:, rows].long()  # [B, n, H, S]
    assert ((sel >= -1) & (sel < NB)).all(), "block id outside -1 .. NB - 1"
    got = torch.zeros(B, n, H, NB + 1, dtype=torch.bool, device=idx.device)
    got.scatter_(-1, torch.where(sel >= 0, sel, NB), True)
    got = got[..., :NB]
    assert torch.equal(got.sum(-1), (sel >= 0).sum(-1)), "a block listed twice"
    j = torch.arange(NB, device=idx.device).view(1, 1, 1, NB)
    t_blk = (rows // block_size).view(1, n, 1, 1)
    causal = j <= t_blk
    forced = ((j < num_initial) | (j > t_blk - num_local)) & causal

    def where(bad):  # (b, index into rows, h) of the first bad row
        return tuple(bad.nonzero()[0].tolist())

    bad = (got & ~causal).any(-1)
    assert not bad.any(), f"non-causal block at (b, sampled row, h) = {where(bad)}"
    bad = (got.sum(-1) != torch.clamp(t_blk[..., 0] + 1, max=num_selected)) | (forced & ~got).any(-1)
    assert not bad.any(), f"wrong block count or a forced block missing at (b, sampled row, h) = {where(bad)}"
    low_in = torch.where(got & ~forced, score, float("inf")).amin(-1)
    best_out = torch.where(causal & ~got, score, float("-inf")).amax(-1)
    bad = low_in < best_out - tol * (1 + best_out.abs())
    assert not bad.any(), (f"a chosen block scores below an unchosen one at (b, sampled row, h) = {where(bad)} "
                           f"(position {rows[where(bad)[1]].item()})")
    match = (got == want).all(-1).float().mean().item()
    assert match >= min_match, f"only {match:.4f} of the sampled rows equal the reference's selection"
