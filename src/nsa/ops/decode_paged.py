"""NSA decoding over a paged cache (:class:`nsa.PagedNSACache`): one new query per sequence, the
cache read through a page table.

Pages hold ``block_size`` raw tokens (NSA's selection block), so selected block j of sequence n
is page ``page_table[n, j]``. Compressed tokens are paged with the raw tokens: compressed token i
lives in the page of its last raw position ``e = i*stride + kernel_size - 1`` at slot
``(e % block_size) // stride``; read through the page table as a flat run, token i sits at index
``i + kernel_size // stride - 1``.

Two ways of computing the same function:

- ``'torch'`` (and ``'auto'`` on CPU): the compressed branch and block scores over the gathered
  compressed tokens (``O(L / stride)`` per sequence, as the dense step), then only the selected
  pages and the pages under the window are read, token by token through the page table.
- ``'triton'`` (``'auto'`` on CUDA): the decoding kernels of :mod:`nsa.ops.decode_triton` read
  the pools through the page table themselves (a key's address is one page-table load away):
  the same bytes as the dense step, nothing gathered. The page pools must have q's dtype.
- ``'reference'``: every page of every sequence is gathered into the padded layout of
  :func:`nsa.ops.decode.nsa_decode`, whose reference then runs (a copy of the whole cache per
  step): the specification both other paths are tested against. Under ``torch.compile`` the
  ``'triton'`` backend takes this gather too, then the dense kernels (an opaque custom op).
"""

from __future__ import annotations

import torch

from . import api, checks
from .decode import _check_values, nsa_decode
from .torch_backend import _compute_dtype, _decode_attention, decode_compressed_and_select
from .utils import window_keys

__all__ = ["nsa_decode_paged", "gather_pages"]


def gather_pages(pages: torch.Tensor, page_table: torch.Tensor) -> torch.Tensor:
    """The dense padded layout of a paged pool: ``pages`` ``[P, S, H, D]`` through ``page_table``
    int32 ``[N, M]`` -> ``[N, M*S, H, D]`` (a copy)."""
    return pages[page_table.long()].flatten(1, 2)


def _dense_compressed(k_cmp, page_table, shift):
    kc = gather_pages(k_cmp, page_table)[:, shift:]
    if kc.shape[1] == 0:  # nsa_decode's layouts need a non-empty token axis; this slot is never visible
        kc = kc.new_zeros(kc.shape[0], 1, *kc.shape[2:])
    return kc


def _check(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, page_table, seq_lens, kernel_size, stride, block_size):
    checks.check_tensor("q", q, 3)
    for name, t, size in (("k_slc", k_slc, block_size), ("v_slc", v_slc, block_size), ("k_win", k_win, block_size),
                          ("v_win", v_win, block_size), ("k_cmp", k_cmp, block_size // stride),
                          ("v_cmp", v_cmp, block_size // stride)):
        checks.check_tensor(name, t, 4)
        if t.device != q.device:
            raise ValueError(f"{name}: expected device {q.device} like q, got {t.device}")
        if t.shape[0] != k_slc.shape[0] or t.shape[1] != size:
            raise ValueError(f"{name}: expected pages [P={k_slc.shape[0]}, {size}, H, D], got {tuple(t.shape)}")
    checks.check_tensor("page_table", page_table, 2, (torch.int32,))
    if page_table.device != q.device:
        raise ValueError(f"page_table: expected device {q.device} like q, got {page_table.device}")
    if page_table.shape[0] != q.shape[0] or page_table.shape[1] < 1:
        raise ValueError(f"page_table: expected [N={q.shape[0]}, M >= 1], got {tuple(page_table.shape)}")


def _check_table_values(page_table, seq_lens, num_pages, block_size):
    """Reads page_table and seq_lens on the host (only with check_values)."""
    lo, hi = (int(v) for v in torch.stack([page_table.min(), page_table.max()]).tolist())
    if lo < 0 or hi >= num_pages:
        raise ValueError(f"page_table: page ids must lie in [0, {num_pages}), got range [{lo}, {hi}]")
    cap = page_table.shape[1] * block_size
    lo, hi = (int(v) for v in torch.stack([seq_lens.min(), seq_lens.max()]).tolist())
    if lo < 1 or hi > cap:
        raise ValueError(f"seq_lens: entries must lie in [1, {cap}] (page_table's pages), got range [{lo}, {hi}]")


def nsa_decode_paged(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, g_cmp, g_slc, g_win, page_table, seq_lens, *,
                     kernel_size=32, stride=16, block_size=64, num_selected=16, num_initial=1, num_local=2,
                     window_size=512, scale=None, backend=None, check_values=None):
    """:func:`nsa.ops.decode.nsa_decode` over a paged cache.

    Args:
        q: ``[N, HQ, Dk]`` the new queries (sequence n's at position ``seq_lens[n] - 1``).
        k_cmp, v_cmp: ``[P, block_size // stride, H, Dk|Dv]`` compressed-token pages (module docstring).
        k_slc, v_slc, k_win, v_win: ``[P, block_size, H, Dk|Dv]`` raw-token pages (the window pair
            may be the selection tensors).
        g_cmp, g_slc, g_win: ``[N, HQ]`` gates.
        page_table: int32 ``[N, M]``, row n's pages in position order (entries past its length are
            never read; any page id in ``[0, P)``).
        seq_lens: int32 ``[N]``, each in ``[1, M * block_size]``.
        kernel_size, stride, block_size, num_selected, num_initial, num_local, window_size, scale:
            as in :func:`nsa.ops.nsa` (``block_size`` is the page size).
        backend: None | 'auto' | 'reference' | 'torch' | 'triton' (module docstring).
        check_values: as in :func:`nsa_decode`: also read ``page_table`` and ``seq_lens`` on the host
            to check their ranges.
    Returns:
        ``[N, HQ, Dv]`` in q's dtype: the output of :func:`nsa_decode` on the gathered cache.
    """
    checks.check_selection(kernel_size, stride, block_size, num_selected, num_initial, num_local)
    _check(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, page_table, seq_lens, kernel_size, stride, block_size)
    backend = api.backend_name(backend)
    shift = kernel_size // stride - 1
    if _check_values(check_values):
        _check_table_values(page_table, seq_lens, k_slc.shape[0], block_size)
    if backend == "auto":
        backend = "triton" if q.device.type == "cuda" and not (
            torch.is_grad_enabled() and any(t.requires_grad for t in (q, g_cmp, g_slc, g_win))) else "torch"
    kw = dict(kernel_size=kernel_size, stride=stride, block_size=block_size, num_selected=num_selected,
              num_initial=num_initial, num_local=num_local, window_size=window_size, scale=scale,
              check_values=False)
    checks.check_scale(scale)
    checks.check_positive_int("window_size", window_size)
    s = q.shape[-1] ** -0.5 if scale is None else float(scale)
    w = window_keys(window_size, page_table.shape[1] * block_size)  # longer than the table: all of it
    if backend == "triton" and not torch.compiler.is_compiling():
        api.resolve_backend(backend, "nsa_decode", q.device)  # Triton present; CUDA or the interpreter
        _check_step(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, g_cmp, g_slc, g_win, seq_lens)
        for name, t in (("k_cmp", k_cmp), ("v_cmp", v_cmp), ("k_slc", k_slc), ("v_slc", v_slc), ("k_win", k_win),
                        ("v_win", v_win)):
            if t.dtype != q.dtype:
                raise ValueError(f"{name}: the Triton paged step reads pages in q's dtype {q.dtype}, got {t.dtype}")
        return _paged_triton(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, g_cmp, g_slc, g_win, page_table, seq_lens,
                             kernel_size, stride, block_size, num_selected, num_initial, num_local, w, s)
    kc, vc = _dense_compressed(k_cmp, page_table, shift), _dense_compressed(v_cmp, page_table, shift)
    if backend != "torch":
        ks_, vs_ = gather_pages(k_slc, page_table), gather_pages(v_slc, page_table)
        same = k_win is k_slc and v_win is v_slc
        kw_, vw_ = (ks_, vs_) if same else (gather_pages(k_win, page_table), gather_pages(v_win, page_table))
        return nsa_decode(q, kc, vc, ks_, vs_, kw_, vw_, g_cmp, g_slc, g_win, seq_lens, backend=backend, **kw)
    return _paged_torch(q, kc, vc, k_slc, v_slc, k_win, v_win, g_cmp, g_slc, g_win, page_table, seq_lens,
                        kernel_size, stride, block_size, num_selected, num_initial, num_local, w, s)


def _gather_paged(pages, page_table, pos, valid, block_size, ct):
    """Tokens at positions ``pos`` ``[N, H, K]`` (per KV head) of each row, read through the page
    table -> ``[N, H, K, D]`` in ``ct``; tokens not ``valid`` are zeros."""
    N, M = page_table.shape
    H = pages.shape[2]
    p = pos.clamp(0, M * block_size - 1)
    n = torch.arange(N, device=pos.device).view(N, 1, 1)
    h = torch.arange(H, device=pos.device).view(1, H, 1)
    page = page_table.long()[n, torch.div(p, block_size, rounding_mode="floor")]  # [N, H, K]
    rows = pages[page, p % block_size, h].to(ct)
    return torch.where(valid.unsqueeze(-1), rows, torch.zeros((), dtype=ct, device=pages.device))


def _check_step(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, g_cmp, g_slc, g_win, seq_lens):
    """The gates, seq_lens and the head layout against q and the pages (shapes only)."""
    N, HQ, Dk = q.shape
    H, Dv = k_slc.shape[2], v_slc.shape[3]
    for name, t, d in (("k_cmp", k_cmp, Dk), ("v_cmp", v_cmp, Dv), ("k_win", k_win, Dk), ("v_win", v_win, Dv)):
        if tuple(t.shape[2:]) != (H, d):
            raise ValueError(f"{name}: expected pages of [H={H}, {d}] per token like the selection pages, got "
                             f"{tuple(t.shape)}")
    for name, g in (("g_cmp", g_cmp), ("g_slc", g_slc), ("g_win", g_win)):
        checks.check_tensor(name, g, 2)
        if tuple(g.shape) != (N, HQ) or g.device != q.device:
            raise ValueError(f"{name}: expected gates of shape {(N, HQ)} on {q.device}, got {tuple(g.shape)} on "
                             f"{g.device}")
    checks.check_tensor("seq_lens", seq_lens, 1, (torch.int32,))
    if seq_lens.shape[0] != N or seq_lens.device != q.device:
        raise ValueError(f"seq_lens: expected {N} entries (one per query) on {q.device}, got {seq_lens.shape[0]} "
                         f"on {seq_lens.device}")
    if H == 0 or HQ % H or k_slc.shape[3] != Dk:
        raise ValueError(f"q: [N, HQ, Dk] = {tuple(q.shape)} does not fit key pages {tuple(k_slc.shape)} "
                         f"(HQ a multiple of H, same Dk)")


def _paged_triton(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, g_cmp, g_slc, g_win, page_table, seq_lens,
                  kernel_size, stride, block_size, num_selected, num_initial, num_local, window_size, scale):
    """The Triton decoding kernels reading the page pools through ``page_table`` (inference only:
    no autograd graph; float64 is computed in float32)."""
    from .decode_triton import decode_fwd

    with torch.no_grad():
        args = (q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, g_cmp, g_slc, g_win)
        if q.dtype == torch.float64:
            args = tuple(t.float() for t in args)
        o, _ = decode_fwd(*args, seq_lens, kernel_size, stride, block_size, num_selected, num_initial, num_local,
                          window_size, scale, page_table=page_table)
    return o.to(q.dtype)


def _paged_torch(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, g_cmp, g_slc, g_win, page_table, seq_lens,
                 kernel_size, stride, block_size, num_selected, num_initial, num_local, window_size, scale):
    """The torch backend's decoding step (:func:`nsa.ops.torch_backend.nsa_decode`) with its row
    gathers going through the page table; ``k_cmp, v_cmp`` already in the dense padded layout."""
    N, HQ, Dk = q.shape
    H = k_cmp.shape[2]
    G = HQ // H
    ct = _compute_dtype(q)
    dev = q.device
    _check_step(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, g_cmp, g_slc, g_win, seq_lens)
    t = seq_lens.long() - 1
    qh = q.to(ct).view(N, H, G, Dk)

    NB = page_table.shape[1]  # one selection block per page
    o_cmp, ids = decode_compressed_and_select(q, qh, k_cmp, v_cmp, seq_lens, NB, kernel_size, stride, block_size,
                                              num_selected, num_initial, num_local, scale)  # block j: page_table[n, j]

    ok = ids < NB
    pos = ((torch.where(ok, ids, 0) * block_size).unsqueeze(-1)
           + torch.arange(block_size, device=dev)).flatten(-2)
    vis_s = ok.repeat_interleave(block_size, -1) & (pos <= t.view(N, 1, 1))
    o_slc = _decode_attention(qh, _gather_paged(k_slc, page_table, pos, vis_s, block_size, ct),
                              _gather_paged(v_slc, page_table, pos, vis_s, block_size, ct), vis_s, scale)

    w_len = window_size
    pos = (t.view(N, 1) - w_len + 1 + torch.arange(w_len, device=dev)).view(N, 1, w_len).expand(N, H, w_len)
    vis_w = pos >= 0
    o_win = _decode_attention(qh, _gather_paged(k_win, page_table, pos, vis_w, block_size, ct),
                              _gather_paged(v_win, page_table, pos, vis_w, block_size, ct), vis_w, scale)

    def flat(o):
        return o.reshape(N, HQ, -1).to(q.dtype)

    return (g_cmp.unsqueeze(-1) * o_cmp[:, 0] + g_slc.unsqueeze(-1) * flat(o_slc)
            + g_win.unsqueeze(-1) * flat(o_win)).to(q.dtype)
