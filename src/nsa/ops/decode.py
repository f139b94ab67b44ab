"""NSA for one new query per sequence against a padded KV cache (decoding).

The reference here is plain PyTorch, batched over sequences with masks; the Triton kernels
live in :mod:`nsa.ops.decode_triton`. The result is the last row of :func:`nsa.ops.nsa` on
each sequence, with the same selection rule (:func:`nsa.ops.select_blocks`).
"""

from __future__ import annotations

import torch

from . import api, checks
from .reference import nsa_decode as nsa_decode_reference  # noqa: F401  (the specification, re-exported)
from .utils import num_compressed, window_keys

__all__ = ["nsa_decode"]


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
        backend: None (reads ``NSA_BACKEND``, default 'auto') | 'auto' | 'reference' | 'torch' | 'triton'.
            'auto' runs the Triton kernels on CUDA tensors and the 'torch' backend (plain PyTorch,
            gathering only the selected blocks and the window) otherwise, and also when autograd
            needs a graph (grad enabled and an input requires grad); 'triton' forces the kernels
            (CUDA tensors, or CPU tensors with ``TRITON_INTERPRET=1``). The Triton path is
            inference only: its outputs never require grad.
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
    if not checks.skip_value_checks():
        lo, hi = (int(v) for v in torch.stack([seq_lens.min(), seq_lens.max()]).tolist())
        cap = min(k_slc.shape[1], k_win.shape[1])
        if lo < 1 or hi > cap:
            raise ValueError(f"seq_lens: entries must lie in [1, {cap}] (the cache capacity), got range [{lo}, {hi}]")
        if num_compressed(hi, kernel_size, stride) > k_cmp.shape[1]:
            raise ValueError(f"k_cmp: capacity {k_cmp.shape[1]} cannot hold the "
                             f"{num_compressed(hi, kernel_size, stride)} compressed tokens of a length-{hi} sequence")
    backend = api.backend_name(backend)
    tensors = (q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, g_cmp, g_slc, g_win)
    if backend == "auto" and torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        backend = "torch"  # the kernel is inference-only; autograd needs a graph of PyTorch ops
    fn = api.resolve_backend(backend, "nsa_decode", q.device)
    s = Dk ** -0.5 if scale is None else float(scale)
    window_size = window_keys(window_size, k_win.shape[1])  # longer than the cache: the whole cache
    return fn(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, g_cmp, g_slc, g_win, seq_lens, kernel_size, stride,
              block_size, num_selected, num_initial, num_local, window_size, s, return_block_indices)
