"""NSA for one new query per sequence against a padded KV cache (decoding).

The reference here is plain PyTorch, batched over sequences with masks; the Triton kernels
live in :mod:`nsa.ops.decode_triton`. The result is the last row of :func:`nsa.ops.nsa` on
each sequence, with the same selection rule (:func:`nsa.ops.select_blocks`).

A decoding step is called once per generated token, mostly eagerly, so :func:`nsa_decode` does
no host synchronisation: it checks settings, shapes, dtypes and devices (once per signature of
them: a decoding loop repeats none of it until the cache grows) and reads no tensor value; the
seq_lens range checks run only on request (``check_values=True`` or ``NSA_DEBUG_CHECKS=1``).
"""

from __future__ import annotations

import os

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


def _check_values(flag) -> bool:
    """Whether to read ``seq_lens`` on the host: the argument, else ``NSA_DEBUG_CHECKS=1``; never
    while tracing or capturing (:func:`nsa.ops.checks.skip_value_checks`)."""
    if flag is None:
        flag = os.environ.get("NSA_DEBUG_CHECKS", "0") == "1"
    elif not isinstance(flag, bool):
        raise ValueError(f"check_values: expected None, True or False, got {flag!r}")
    return flag and not checks.skip_value_checks()


def _check_seq_lens(seq_lens, k_cmp, k_slc, k_win, kernel_size, stride):
    """The value checks (one device-to-host copy of two ints)."""
    lo, hi = (int(v) for v in torch.stack([seq_lens.min(), seq_lens.max()]).tolist())
    cap = min(k_slc.shape[1], k_win.shape[1])
    if lo < 1 or hi > cap:
        raise ValueError(f"seq_lens: entries must lie in [1, {cap}] (the cache capacity), got range [{lo}, {hi}]")
    if num_compressed(hi, kernel_size, stride) > k_cmp.shape[1]:
        raise ValueError(f"k_cmp: capacity {k_cmp.shape[1]} cannot hold the "
                         f"{num_compressed(hi, kernel_size, stride)} compressed tokens of a length-{hi} sequence")


def _check_shapes(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, g_cmp, g_slc, g_win, seq_lens, kernel_size, stride,
                  block_size, num_selected, num_initial, num_local, window_size, scale):
    """Settings, shapes, dtypes and devices (no tensor value is read)."""
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


# Signatures (settings, and shape, dtype and device of every tensor) that passed _check_shapes: the
# checks are pure functions of them, so a decoding loop pays for them once per cache shape.
_CHECKED: set = set()
_CHECKED_MAX = 4096


def _signature(tensors, settings):
    """A hashable key of what _check_shapes looks at; None when there is none to trust (under
    torch.compile, which traces the checks into its guards anyway)."""
    if torch.compiler.is_compiling():
        return None
    try:
        return (tuple((type(v), v) for v in settings)
                + tuple((t.shape, t.dtype, t.device) if type(t) is torch.Tensor else None for t in tensors))
    except TypeError:  # an unhashable setting: validate every time
        return None


def nsa_decode(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, g_cmp, g_slc, g_win, seq_lens, *, kernel_size=32,
               stride=16, block_size=64, num_selected=16, num_initial=1, num_local=2, window_size=512, scale=None,
               return_block_indices=False, backend=None, check_values=None):
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
        check_values: None (reads ``NSA_DEBUG_CHECKS``: on when it is ``1``) | True | False. Whether
            the values of ``seq_lens`` are checked (each in ``[1, capacity]``, and ``k_cmp`` long
            enough for the longest). Off by default: reading them is a device-to-host copy that
            stalls the host until the GPU catches up, which would make an eager decoding step
            host-bound. Shapes, dtypes and devices are always checked. :class:`nsa.NSACache`
            keeps its lengths on the host and never hands out a ``seq_lens`` outside its capacity.
    Returns:
        o ``[N, HQ, Dv]`` in q's dtype, or ``(o, block_indices)``.
    """
    tensors = (q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, g_cmp, g_slc, g_win, seq_lens)
    settings = (kernel_size, stride, block_size, num_selected, num_initial, num_local, window_size, scale)
    sig = _signature(tensors, settings)
    if sig is None or None in sig or sig not in _CHECKED:
        _check_shapes(*tensors, *settings)
        if sig is not None and None not in sig and len(_CHECKED) < _CHECKED_MAX:
            _CHECKED.add(sig)
    N, HQ, Dk = q.shape
    if _check_values(check_values):
        _check_seq_lens(seq_lens, k_cmp, k_slc, k_win, kernel_size, stride)
    backend = api.backend_name(backend)
    tensors = (q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, g_cmp, g_slc, g_win)
    if backend == "auto" and torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        backend = "torch"  # the kernel is inference-only; autograd needs a graph of PyTorch ops
    fn = api.resolve_backend(backend, "nsa_decode", q.device)
    s = Dk ** -0.5 if scale is None else float(scale)
    window_size = window_keys(window_size, k_win.shape[1])  # longer than the cache: the whole cache
    return fn(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, g_cmp, g_slc, g_win, seq_lens, kernel_size, stride,
              block_size, num_selected, num_initial, num_local, window_size, s, return_block_indices)
