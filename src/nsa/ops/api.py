"""Public functional ops: validate input, pick a backend, run.

Backends: ``'reference'`` (plain PyTorch, :mod:`nsa.ops.reference`: the specification,
dense ``[T, T]`` masks), ``'torch'`` (plain PyTorch, :mod:`nsa.ops.torch_backend`: queries in
chunks, only the keys each branch sees, memory linear in T) and ``'triton'`` (the kernels).
``backend=None`` reads the environment variable ``NSA_BACKEND`` (default ``'auto'``).
``'auto'`` uses the Triton kernel of an op for CUDA tensors when one exists, the
``'torch'`` backend otherwise (CPU tensors, any dtype float64 included). ``'triton'`` forces
the kernels; on CPU tensors that needs ``TRITON_INTERPRET=1`` (how CI tests kernels).

Queries that start later than their keys: every op takes ``q_offset`` (dense input: query row
``t`` sits at position ``q_offset + t``, the raw keys are ``q_offset + T`` long) or
``cu_seqlens_k`` (packed input: the raw keys' boundaries; each sequence's queries are its last
positions). A chunk appended to a cache, a few tokens decoded at once and one rank's share of a
context-parallel sequence are such queries; every rule (causality, compression, blocks, window)
applies to positions, and the cost is that of the queries given.
"""

from __future__ import annotations

import importlib
import os

import torch

from . import checks, reference, torch_backend
from .utils import interpreting, window_keys

BACKENDS = ("auto", "reference", "torch", "triton")
# nsa() on the Triton backend is one autograd node whose backward folds the gates into the branch
# kernels' lse and delta (nsa.ops.fused); False composes one autograd node per branch and one for
# the gates (float64 always does). Both match the reference; kept for comparisons.
FUSED_GATES = True

# op name -> (module, function) of its Triton implementation. Same arguments as the
# reference function; inputs arrive validated and ``scale`` arrives as a float.
_TRITON_IMPLS = {
    "compressed_attention": ("nsa.ops.compressed", "compressed_attention_triton"),
    "select_blocks": ("nsa.ops.selection", "select_blocks_triton"),
    "selected_attention": ("nsa.ops.selected", "selected_attention_triton"),
    "sliding_window_attention": ("nsa.ops.window", "sliding_window_attention_triton"),
    "nsa_decode": ("nsa.ops.decode_triton", "nsa_decode_triton"),
    # internal: the gated sum of the three branches inside nsa(), and the whole of nsa() as one
    # autograd node (nsa.ops.fused)
    "gate_combine": ("nsa.ops.gate", "gate_combine_triton"),
    "nsa_fused": ("nsa.ops.fused", "nsa_triton"),
    "rope": ("nsa.ops.rotary", "rope_triton"),
}


def _load_triton_impls() -> dict:
    """Imports the kernel modules once, at import time: torch.compile cannot trace an import,
    and a dict lookup keeps the dispatch traceable. Without triton, no op has a kernel."""
    global _TRITON_MISSING
    impls = {}
    for op, (mod_name, fn_name) in _TRITON_IMPLS.items():
        try:
            mod = importlib.import_module(mod_name)
        except ModuleNotFoundError as e:
            if e.name == "triton" or (e.name or "").startswith("triton."):
                _TRITON_MISSING = True
                continue
            if e.name == mod_name:
                continue
            raise
        fn = getattr(mod, fn_name, None)
        if fn is not None:
            impls[op] = fn
    return impls


_TRITON_MISSING = False  # set when the kernel modules could not import triton
_TRITON_FUNCS = _load_triton_impls()


def _triton_impl(op):
    return _TRITON_FUNCS.get(op)


def backend_name(backend) -> str:
    """``backend`` checked, with None replaced by ``$NSA_BACKEND`` (default 'auto')."""
    if backend is None:
        backend = os.environ.get("NSA_BACKEND", "auto") or "auto"
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected None or one of {BACKENDS}, got {backend!r}")
    return backend


def resolve_backend(backend, op, device: torch.device):
    """Returns the callable implementing ``op`` for tensors on ``device``."""
    backend = backend_name(backend)
    if backend in ("reference", "torch"):
        return getattr(reference if backend == "reference" else torch_backend, op)
    impl = _triton_impl(op)
    if backend == "auto":
        return impl if (impl is not None and device.type == "cuda") else getattr(torch_backend, op)
    if impl is None:
        if _TRITON_MISSING:
            raise ValueError("backend: 'triton' requested but triton is not installed (CUDA builds of torch "
                             "bring it; for the CPU interpreter: pip install 'nsa[triton]')")
        raise ValueError(f"backend: 'triton' requested but {op} has no Triton kernel")
    if device.type != "cuda" and not interpreting():
        raise ValueError(f"backend: 'triton' needs CUDA tensors, or TRITON_INTERPRET=1 for CPU tensors; got {device}")
    return impl


def _contiguous(cu_seqlens):
    """Validated offsets as the kernels read them: one int32 after another."""
    return None if cu_seqlens is None else cu_seqlens.contiguous()


# A block beyond the sequence holds all of it: from this size on the kernels get a block of the
# sequence's length instead (the same single block), which bounds their key loops and int
# arguments. Ordinary block sizes keep exactly the launches they have.
HUGE_BLOCK = 2 ** 16


def _block(block_size, length, multiple_of=1):
    T = max(length, 1)
    if block_size < HUGE_BLOCK or block_size <= T:
        return block_size
    return -(-T // multiple_of) * multiple_of


def _scale(scale, q):
    checks.check_scale(scale)
    return q.shape[-1] ** -0.5 if scale is None else float(scale)


def _positions(q_offset, cu_seqlens_k):
    """The keyword arguments that place the queries among their keys: none when they start with
    them (every backend is called exactly as without the option)."""
    if not q_offset and cu_seqlens_k is None:
        return {}
    return {"q_offset": q_offset, "cu_seqlens_k": _contiguous(cu_seqlens_k)}


def compressed_attention(q, k_cmp, v_cmp, kernel_size=32, stride=16, scale=None, cu_seqlens=None, backend=None, *,
                         q_offset=0, cu_seqlens_k=None):
    """Attention over compressed tokens (NSA's coarse branch).

    Compressed token ``i`` summarizes raw positions ``[i*stride, i*stride + kernel_size)``
    and is visible to query ``t`` iff ``i*stride + kernel_size - 1 <= t``. A length-T
    sequence has ``(T - kernel_size) // stride + 1`` compressed tokens when
    ``T >= kernel_size``, else 0.

    Tensors: q, k_cmp and v_cmp share one dtype (float16, bfloat16, float32 or float64) and one
    device (CUDA for the Triton kernels, any device for the PyTorch backends); the outputs are
    on that device.

    Args:
        q: ``[B, T, HQ, Dk]``.
        k_cmp: ``[B, Tc, H, Dk]`` compressed keys; ``HQ % H == 0``.
        v_cmp: ``[B, Tc, H, Dv]`` compressed values.
        kernel_size, stride: compression block length and step; kernel_size % stride == 0.
        scale: softmax scale, default ``Dk ** -0.5``.
        cu_seqlens: int32 ``[N+1]`` offsets of packed sequences (B = 1); then k_cmp/v_cmp hold
            each sequence's compressed tokens packed in the same order.
        backend: None | 'auto' | 'reference' | 'torch' | 'triton'.
        q_offset: dense input: the position of query row 0 (the raw keys hold ``q_offset + T``
            tokens, the compressed keys those of ``q_offset + T`` tokens). Default 0.
        cu_seqlens_k: packed input: int32 ``[N+1]`` boundaries of the sequences' raw keys (each
            at least as long as its queries, which are its last positions); default cu_seqlens.
    Returns:
        o ``[B, T, HQ, Dv]`` (q's dtype; zeros where nothing is visible) and
        lse ``[B, T, HQ]``: float32 (float64 for float64 input) log-sum-exp of the scaled
        scores, ``-inf`` where nothing is visible.
    """
    checks.check_compression(kernel_size, stride)
    B, T, HQ, H = checks.check_qkv(q, k_cmp, v_cmp, same_len=False, names=("q", "k_cmp", "v_cmp"))
    cu = checks.check_cu_seqlens(cu_seqlens, q)
    checks.check_key_positions(q_offset, cu_seqlens_k, cu_seqlens, cu, q)
    checks.check_compressed_kv(k_cmp, v_cmp, q, T, kernel_size, stride, cu_seqlens, cu, q_offset, cu_seqlens_k)
    fn = resolve_backend(backend, "compressed_attention", q.device)
    return fn(q, k_cmp, v_cmp, kernel_size, stride, _scale(scale, q), _contiguous(cu_seqlens),
              **_positions(q_offset, cu_seqlens_k))


def select_blocks(q, k_cmp, lse, kernel_size=32, stride=16, block_size=64, num_selected=16, num_initial=1,
                  num_local=2, scale=None, cu_seqlens=None, backend=None, *, q_offset=0, cu_seqlens_k=None):
    """The selection blocks each query of each KV head attends to (NSA's top-n).

    Score of block ``j`` (positions ``[j*block_size, (j+1)*block_size)``) for query ``t`` and
    KV head ``h``: ``sum over the G query heads of h, sum over compressed tokens i of
    p_cmp[t, head, i] * W[i, j]``, with ``p_cmp = exp(scale * q.k_cmp - lse)`` over the
    visible compressed tokens (each head's own softmax) and ``W[i, j]`` the number of
    stride-sized pieces shared by token i's span and block j (for 32/16/64: weights
    1, 2, 2, 2, 1 on tokens 4j-1 .. 4j+3).

    Always selected: blocks ``0 .. num_initial-1`` and the ``num_local`` blocks ending at the
    query's own block ``t // block_size``. Never selected: blocks after the query's own block.
    The remaining slots take the highest-scoring causal blocks; among equal scores the lower
    block id wins. A query with fewer causal blocks (``t // block_size + 1``) than
    ``num_selected`` selects all of them.

    Row order: the selected block ids in ascending order, then ``-1`` for unused slots.

    Args:
        q: ``[B, T, HQ, Dk]``; k_cmp: ``[B, Tc, H, Dk]``, q's dtype and device; lse: float32
            (or float64) ``[B, T, HQ]`` on q's device, from :func:`compressed_attention` with the
            same q, k_cmp and scale.
        kernel_size, stride: as in :func:`compressed_attention`.
        block_size: selection block length, a multiple of stride.
        num_selected: slots per row; num_initial + num_local <= num_selected.
        num_initial: leading blocks always selected (``0 .. num_initial-1``), >= 0.
        num_local: blocks always selected ending at the query's own block, >= 0.
        scale, cu_seqlens, backend, q_offset, cu_seqlens_k: as in :func:`compressed_attention`
            (blocks are those of the keys; the rules above apply to the query's position).
    Returns:
        int32 ``[B, T, H, num_selected]`` on q's device. Not differentiable.
    """
    checks.check_selection(kernel_size, stride, block_size, num_selected, num_initial, num_local)
    checks.check_tensor("k_cmp", k_cmp, 4)
    checks.check_tensor("q", q, 4)
    checks.check_same("k_cmp", k_cmp, "q", q)
    B, T, HQ, _ = q.shape
    if k_cmp.shape[0] != B or k_cmp.shape[3] != q.shape[3]:
        raise ValueError(f"k_cmp: expected [B={B}, Tc, H, Dk={q.shape[3]}], got {tuple(k_cmp.shape)}")
    H = k_cmp.shape[2]
    if H == 0 or HQ == 0 or HQ % H != 0:
        raise ValueError(f"q: number of query heads ({HQ}) must be a positive multiple of the KV heads of k_cmp ({H})")
    if q.shape[3] == 0:
        raise ValueError("q: head dim must be positive")
    checks.check_lse(lse, q)
    cu = checks.check_cu_seqlens(cu_seqlens, q)
    checks.check_key_positions(q_offset, cu_seqlens_k, cu_seqlens, cu, q)
    checks.check_compressed_kv(k_cmp, None, q, T, kernel_size, stride, cu_seqlens, cu, q_offset, cu_seqlens_k)
    fn = resolve_backend(backend, "select_blocks", q.device)
    with torch.no_grad():
        return fn(q, k_cmp, lse, kernel_size, stride, block_size, num_selected, num_initial, num_local,
                  _scale(scale, q), _contiguous(cu_seqlens), **_positions(q_offset, cu_seqlens_k))


def selected_attention(q, k, v, block_indices, block_size=64, scale=None, cu_seqlens=None, backend=None, *,
                       q_offset=0, cu_seqlens_k=None):
    """Attention over selected blocks (NSA's fine branch).

    Query ``t`` of KV head ``h`` attends to every key ``s <= t`` inside the blocks listed in
    ``block_indices[b, t, h]`` (block ``j`` = positions ``[j*block_size, (j+1)*block_size)``
    of the query's own sequence); ``-1`` entries are ignored; entries may come in any order.

    Args:
        q: ``[B, T, HQ, Dk]``; k: ``[B, T, H, Dk]``; v: ``[B, T, H, Dv]``: one dtype (float16,
            bfloat16, float32 or float64) and one device (``q_offset + T`` keys with an offset).
        block_indices: int32 ``[B, T, H, S]`` on q's device, each entry -1 or a block id in
            ``[0, ceil(seq_len / block_size))`` (seq_len: the sequence's keys), no block twice in a row.
        block_size: positive int.
        scale, cu_seqlens, backend, q_offset, cu_seqlens_k: as in :func:`compressed_attention`.
    Returns:
        o ``[B, T, HQ, Dv]`` in q's dtype; zeros for a query whose listed blocks hold no key
        ``s <= t``.
    """
    checks.check_positive_int("block_size", block_size)
    B, T, HQ, H = checks.check_qkv(q, k, v, same_len=False)
    cu = checks.check_cu_seqlens(cu_seqlens, q)
    ck = checks.check_key_positions(q_offset, cu_seqlens_k, cu_seqlens, cu, q)
    checks.check_key_tokens("k", k, T, q_offset, ck, cu_seqlens_k)
    checks.check_block_indices(block_indices, q, H, block_size, cu, q_offset, ck)
    fn = resolve_backend(backend, "selected_attention", q.device)
    return fn(q, k, v, block_indices, _block(block_size, k.shape[1]), _scale(scale, q), _contiguous(cu_seqlens),
              **_positions(q_offset, cu_seqlens_k))


def sliding_window_attention(q, k, v, window_size=512, scale=None, cu_seqlens=None, backend=None, *, q_offset=0,
                             cu_seqlens_k=None):
    """Causal sliding-window attention: query ``t`` attends to keys ``t - window_size < s <= t``.

    Args:
        q: ``[B, T, HQ, Dk]``; k: ``[B, T, H, Dk]``; v: ``[B, T, H, Dv]``: one dtype (float16,
            bfloat16, float32 or float64) and one device (``q_offset + T`` keys with an offset).
        window_size: positive int (1 = each query sees only itself; longer than the sequence:
            the whole causal past).
        scale, cu_seqlens, backend, q_offset, cu_seqlens_k: as in :func:`compressed_attention`.
    Returns:
        o ``[B, T, HQ, Dv]`` in q's dtype.
    """
    checks.check_positive_int("window_size", window_size)
    B, T, HQ, H = checks.check_qkv(q, k, v, same_len=False)
    cu = checks.check_cu_seqlens(cu_seqlens, q)
    ck = checks.check_key_positions(q_offset, cu_seqlens_k, cu_seqlens, cu, q)
    checks.check_key_tokens("k", k, T, q_offset, ck, cu_seqlens_k)
    fn = resolve_backend(backend, "sliding_window_attention", q.device)
    return fn(q, k, v, window_keys(window_size, k.shape[1]), _scale(scale, q), _contiguous(cu_seqlens),
              **_positions(q_offset, cu_seqlens_k))


def nsa(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, g_cmp, g_slc, g_win, *, kernel_size=32, stride=16,
        block_size=64, num_selected=16, num_initial=1, num_local=2, window_size=512, scale=None,
        cu_seqlens=None, return_block_indices=False, backend=None, q_offset=0, cu_seqlens_k=None):
    """Native Sparse Attention: ``o = g_cmp*o_cmp + g_slc*o_slc + g_win*o_win``.

    ``o_cmp, lse = compressed_attention(q, k_cmp, v_cmp)``; the selection uses q, k_cmp and
    lse (:func:`select_blocks`); ``o_slc = selected_attention(q, k_slc, v_slc, blocks)``;
    ``o_win = sliding_window_attention(q, k_win, v_win)``.

    Args:
        q: ``[B, T, HQ, Dk]``: float16, bfloat16, float32 or float64; every key/value tensor has
            q's dtype and every tensor q's device.
        k_cmp, v_cmp: ``[B, Tc, H, Dk|Dv]`` compressed keys/values (see :func:`compressed_attention`).
        k_slc, v_slc, k_win, v_win: ``[B, T, H, Dk|Dv]`` raw keys/values of the selected and
            window branches (may be the same tensors; ``q_offset + T`` tokens with an offset).
        g_cmp, g_slc, g_win: ``[B, T, HQ]`` gates (already through their sigmoid), floating point.
        kernel_size, stride, block_size, num_selected, num_initial, num_local: as in
            :func:`select_blocks`; window_size: as in :func:`sliding_window_attention`.
        scale, cu_seqlens, backend, q_offset, cu_seqlens_k: as in :func:`compressed_attention`.
        return_block_indices: also return the int32 ``[B, T, H, num_selected]`` selection.
    Returns:
        o ``[B, T, HQ, Dv]`` in q's dtype, or ``(o, block_indices)``.
    """
    checks.check_selection(kernel_size, stride, block_size, num_selected, num_initial, num_local)
    checks.check_positive_int("window_size", window_size)
    B, T, HQ, H = checks.check_qkv(q, k_cmp, v_cmp, same_len=False, names=("q", "k_cmp", "v_cmp"))
    cu = checks.check_cu_seqlens(cu_seqlens, q)
    ck = checks.check_key_positions(q_offset, cu_seqlens_k, cu_seqlens, cu, q)
    checks.check_tensor("k_slc", k_slc, 4)
    checks.check_key_tokens("k_slc", k_slc, T, q_offset, ck, cu_seqlens_k)
    Tk = k_slc.shape[1]
    for name_k, kk, name_v, vv in (("k_slc", k_slc, "v_slc", v_slc), ("k_win", k_win, "v_win", v_win)):
        checks.check_tensor(name_k, kk, 4)
        checks.check_tensor(name_v, vv, 4)
        checks.check_same(name_k, kk, "q", q)
        checks.check_same(name_v, vv, "q", q)
        if tuple(kk.shape) != (B, Tk, H, q.shape[3]):
            raise ValueError(f"{name_k}: expected shape {(B, Tk, H, q.shape[3])}, got {tuple(kk.shape)}")
        if tuple(vv.shape) != (B, Tk, H, v_cmp.shape[3]):
            raise ValueError(f"{name_v}: expected shape {(B, Tk, H, v_cmp.shape[3])}, got {tuple(vv.shape)}")
    for name, g in (("g_cmp", g_cmp), ("g_slc", g_slc), ("g_win", g_win)):
        checks.check_gate(name, g, q)
    checks.check_compressed_kv(k_cmp, v_cmp, q, T, kernel_size, stride, cu_seqlens, cu, q_offset, cu_seqlens_k)
    s = _scale(scale, q)
    cu_seqlens = _contiguous(cu_seqlens)
    pos = _positions(q_offset, cu_seqlens_k)
    window_size = window_keys(window_size, Tk)
    block_size = _block(block_size, Tk, stride)
    backend = backend_name(backend)
    cmp_fn = resolve_backend(backend, "compressed_attention", q.device)
    for module in (reference, torch_backend):
        if cmp_fn is module.compressed_attention:
            return module.nsa(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, g_cmp, g_slc, g_win,
                              kernel_size=kernel_size, stride=stride, block_size=block_size,
                              num_selected=num_selected, num_initial=num_initial, num_local=num_local,
                              window_size=window_size, scale=s, cu_seqlens=cu_seqlens,
                              return_block_indices=return_block_indices, **pos)
    fused_fn = _triton_impl("nsa_fused")
    # the branches resolve to their kernels: one fused node, or one node per branch and the gates
    if FUSED_GATES and fused_fn is not None and all(t.dtype != torch.float64 for t in (q, g_cmp, g_slc, g_win)):
        o, idx = fused_fn(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, g_cmp, g_slc, g_win, kernel_size, stride,
                          block_size, num_selected, num_initial, num_local, window_size, s, cu_seqlens, **pos)
        return (o, idx) if return_block_indices else o
    sel_fn = resolve_backend(backend, "select_blocks", q.device)
    slc_fn = resolve_backend(backend, "selected_attention", q.device)
    win_fn = resolve_backend(backend, "sliding_window_attention", q.device)
    o_cmp, lse = cmp_fn(q, k_cmp, v_cmp, kernel_size, stride, s, cu_seqlens, **pos)
    with torch.no_grad():
        idx = sel_fn(q, k_cmp, lse, kernel_size, stride, block_size, num_selected, num_initial, num_local, s,
                     cu_seqlens, **pos)
    o_slc = slc_fn(q, k_slc, v_slc, idx, block_size, s, cu_seqlens, **pos)
    o_win = win_fn(q, k_win, v_win, window_size, s, cu_seqlens, **pos)
    gate_fn = resolve_backend(backend, "gate_combine", q.device)
    o = gate_fn(o_cmp, o_slc, o_win, g_cmp, g_slc, g_win, q.dtype)
    return (o, idx) if return_block_indices else o


def rope(x, positions, theta, backend=None):
    """Rotate-half rotary position embedding (RoPE): dims ``(i, i + D/2)`` of every head rotate by
    the angle ``position * theta**(-2i/D)``, formed in float64 (the specification:
    :func:`nsa.ops.reference.rope`; the kernel: one pass in x's dtype, :mod:`nsa.ops.rotary`).

    Args:
        x: ``[..., T, H, D]``, floating point, D even.
        positions: integer ``[..., T]`` broadcastable to x's leading dims, on x's device.
        theta: the base (> 0).
        backend: as in :func:`compressed_attention`. The kernel takes x ``[B, T, H, D]`` with
            positions ``[B|1, T]`` (other layouts are computed by the specification).
    Returns:
        x rotated: same shape, dtype and device (computed in float32; float64 for float64 x).
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 3:
        what = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x: expected a floating-point [..., T, H, D] tensor, got {what}")
    if x.shape[-1] % 2:
        raise ValueError(f"x: the head dim must be even, got {x.shape[-1]}")
    if not isinstance(positions, torch.Tensor) or positions.is_floating_point() or positions.is_complex() \
            or positions.dtype == torch.bool:
        raise ValueError(f"positions: expected an integer tensor, got "
                         f"{positions.dtype if isinstance(positions, torch.Tensor) else type(positions).__name__}")
    if positions.device != x.device:
        raise ValueError(f"positions: expected x's device {x.device}, got {positions.device}")
    lead = x.shape[:-2]
    try:
        torch.broadcast_shapes(positions.shape, lead)
    except RuntimeError:
        raise ValueError(f"positions: shape {tuple(positions.shape)} does not broadcast to x's leading dims "
                         f"{tuple(lead)}") from None
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not theta > 0:
        raise ValueError(f"theta: expected a number > 0, got {theta!r}")
    fn = resolve_backend(backend, "rope", x.device)
    kernel_layout = x.dim() == 4 and positions.dim() == 2 and positions.shape[0] in (1, x.shape[0]) \
        and positions.shape[1] == x.shape[1]
    if fn is not reference.rope and fn is not torch_backend.rope and not kernel_layout:
        fn = reference.rope
    return fn(x, positions, float(theta))
