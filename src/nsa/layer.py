"""The NSA attention layer: config, projections, RoPE, compression MLP, gates, decoding.

:class:`NativeSparseAttention` maps hidden states ``[B, T, hidden_size]`` to
``[B, T, hidden_size]`` with Native Sparse Attention (:func:`nsa.ops.nsa`) in place of
full causal attention. Packed sequences come as ``[1, total, hidden_size]`` with
``cu_seqlens``. With an :class:`nsa.cache.NSACache` or a :class:`nsa.PagedNSACache` the same
module prefills, appends chunks, and decodes one token per sequence per call.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from .cache import NSACache
from .ops.decode import nsa_decode
from .ops.decode_paged import nsa_decode_paged
from .ops.utils import num_compressed
from .paged_cache import PagedNSACache
from .ops.reference import rope_cos_sin
from .ops.utils import compressed_cu_seqlens

__all__ = ["NSAConfig", "NativeSparseAttention", "rope_cos_sin", "apply_rope"]


def _positive(name, v):
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name}: expected a positive int, got {v!r}")


@dataclass(frozen=True)
class NSAConfig:
    """Hyper-parameters of one NSA layer; validated on construction, immutable (change a
    field with :meth:`replace`, which validates the new config).

    Args:
        hidden_size: model width.
        num_heads: query heads HQ; num_kv_heads: KV heads H, ``HQ % H == 0``.
        head_dim: query/key head dim Dk (even: RoPE rotates pairs);
            v_head_dim: value head dim Dv, default ``head_dim``.
        kernel_size, stride: compression block length l and step d (``l % d == 0``).
        block_size: selection block length l' (``l' % d == 0``).
        num_selected: selected blocks per query n, including ``num_initial`` leading
            blocks and ``num_local`` blocks ending at the query's own block.
        window_size: sliding window w.
        rope_theta: RoPE base.
        compression: ``'mlp'`` (paper: an MLP phi over each block's l keys, and separately
            values, after adding a learned intra-block position embedding) or ``'mean'``
            (mean of the block plus the same position embedding, which then acts as a
            learned bias).
        shared_kv: False (paper): independent K/V projections for the compressed, selected
            and window branches. True: selected and window branches share one K/V
            projection; the compressed branch keeps its own.
        bias: biases in the q/kv/gate/output projections.
        backend: passed to :mod:`nsa.ops` (None | 'auto' | 'reference' | 'torch' | 'triton').
    """

    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    v_head_dim: int | None = None
    kernel_size: int = 32
    stride: int = 16
    block_size: int = 64
    num_selected: int = 16
    num_initial: int = 1
    num_local: int = 2
    window_size: int = 512
    rope_theta: float = 10000.0
    compression: str = "mlp"
    shared_kv: bool = False
    bias: bool = False
    backend: str | None = None

    # 'paper': the attention of the paper's 27B model (Sec. 4.1): 64 query heads in 4 GQA
    # groups, d_k = 192, d_v = 128, hidden size 2560, NSA at l=32, d=16, l'=64, n=16, w=512.
    # 'small': a size for GPU experiments; 'tiny': for tests and the CPU demo.
    PRESETS = {
        "paper": dict(hidden_size=2560, num_heads=64, num_kv_heads=4, head_dim=192, v_head_dim=128),
        "small": dict(hidden_size=512, num_heads=8, num_kv_heads=2, head_dim=64),
        "tiny": dict(hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16, kernel_size=8, stride=4,
                     block_size=8, num_selected=4, window_size=16),
    }

    @classmethod
    def preset(cls, name: str, **overrides) -> "NSAConfig":
        """A named configuration (``'paper'``, ``'small'``, ``'tiny'``) with fields overridden."""
        if name not in cls.PRESETS:
            raise ValueError(f"name: unknown preset {name!r}; expected one of {sorted(cls.PRESETS)}")
        return cls(**{**cls.PRESETS[name], **overrides})

    def __post_init__(self):
        for f in ("hidden_size", "num_heads", "num_kv_heads", "head_dim", "kernel_size", "stride", "block_size",
                  "num_selected", "window_size"):
            _positive(f, getattr(self, f))
        # Frozen: __post_init__ sets its derived fields through object.__setattr__.
        object.__setattr__(self, "_v_head_dim_default", self.v_head_dim is None)
        if self.v_head_dim is None:
            object.__setattr__(self, "v_head_dim", self.head_dim)
        _positive("v_head_dim", self.v_head_dim)
        for f in ("num_initial", "num_local"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{f}: expected an int >= 0, got {v!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads: must be a multiple of num_kv_heads ({self.num_kv_heads}), "
                             f"got {self.num_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim: must be even (RoPE rotates pairs of dims), got {self.head_dim}")
        if self.kernel_size % self.stride:
            raise ValueError(f"kernel_size: must be a multiple of stride ({self.stride}), got {self.kernel_size}")
        if self.block_size % self.stride:
            raise ValueError(f"block_size: must be a multiple of stride ({self.stride}), got {self.block_size}")
        if self.num_initial + self.num_local > self.num_selected:
            raise ValueError(f"num_selected: must be >= num_initial + num_local "
                             f"({self.num_initial} + {self.num_local}), got {self.num_selected}")
        if (isinstance(self.rope_theta, bool) or not isinstance(self.rope_theta, (int, float))
                or not self.rope_theta > 0 or math.isinf(self.rope_theta)):
            raise ValueError(f"rope_theta: expected a positive finite number, got {self.rope_theta!r}")
        if self.compression not in ("mlp", "mean"):
            raise ValueError(f"compression: expected 'mlp' or 'mean', got {self.compression!r}")
        if not isinstance(self.shared_kv, bool):
            raise ValueError(f"shared_kv: expected a bool, got {self.shared_kv!r}")
        if not isinstance(self.bias, bool):
            raise ValueError(f"bias: expected a bool, got {self.bias!r}")
        if self.backend not in (None,) + ops.api.BACKENDS:
            raise ValueError(f"backend: expected None or one of {ops.api.BACKENDS}, got {self.backend!r}")

    def replace(self, **changes) -> "NSAConfig":
        """A validated copy with ``changes``; a ``v_head_dim`` left to its default follows a new
        ``head_dim``, as it would in a config built with that ``head_dim``."""
        if self._v_head_dim_default and "v_head_dim" not in changes:
            changes["v_head_dim"] = None
        return dataclasses.replace(self, **changes)


def apply_rope(x: torch.Tensor, positions: torch.Tensor, theta: float, backend: str | None = None) -> torch.Tensor:
    """Rotate-half RoPE: dims ``(i, i + D/2)`` of x rotate by ``position * theta**(-2i/D)``
    (:func:`nsa.ops.rope`; the specification is :func:`nsa.ops.reference.rope`).

    Args:
        x: ``[..., T, H, D]``, any floating dtype, D even; positions: integer ``[..., T]``
            broadcastable to x's leading dims, on x's device.
        backend: as in :mod:`nsa.ops` (``'auto'``: one Triton pass for CUDA tensors).
    Returns:
        x rotated, same shape, dtype and device (computed in float32, float64 for float64 x).
    """
    return ops.rope(x, positions, theta, backend=backend)


#: Whether a decoding step with RoPE on the Triton kernel rotates and stores its token in one launch
#: (NSACache / PagedNSACache.append_rotating); False takes RoPE, then the cache's append (the tests
#: compare the two).
FUSED_STEP_WRITE = True


def chunk_lengths(x: torch.Tensor, batch_size: int, cu_seqlens: torch.Tensor | None) -> list[int]:
    """Validates a chunk ``x`` appended to a cache of ``batch_size`` sequences (``[N, T >= 1, hidden]``,
    or packed ``[1, total, hidden]`` with int32 ``cu_seqlens`` of N+1 offsets, chunks of length 0
    allowed but not all of them); returns the host list of the tokens it appends to each sequence.
    The chunk step of :class:`NativeSparseAttention` and that of the model's full and window
    attention (:mod:`nsa.model`) share it."""
    N = batch_size
    if cu_seqlens is None:
        if x.shape[0] != N or x.shape[1] < 1:
            raise ValueError(f"x: appending to a cache of {N} sequences takes [N={N}, T >= 1, hidden_size] "
                             f"(or packed [1, total, hidden_size] with cu_seqlens), got {tuple(x.shape)}")
        return [x.shape[1]] * N
    if x.shape[0] != 1:
        raise ValueError(f"x: packed input (cu_seqlens given) needs batch size 1, got {tuple(x.shape)}")
    if (not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1
            or cu_seqlens.device != x.device):
        raise ValueError(f"cu_seqlens: expected an int32 1-D tensor on {x.device}, got "
                         f"{getattr(cu_seqlens, 'dtype', type(cu_seqlens).__name__)}")
    cu = cu_seqlens.tolist()
    if len(cu) != N + 1:
        raise ValueError(f"cu_seqlens: expected N+1 = {N + 1} offsets (one chunk per cached sequence), "
                         f"got {len(cu)}")
    if cu[0] != 0 or cu[-1] != x.shape[1] or any(b < a for a, b in zip(cu[:-1], cu[1:])):
        raise ValueError(f"cu_seqlens: expected non-decreasing offsets from 0 to {x.shape[1]} (x's tokens), "
                         f"got {cu}")
    if cu[-1] == 0:
        raise ValueError("x: no token to append")
    return [b - a for a, b in zip(cu[:-1], cu[1:])]


class _BlockCompressor(nn.Module):
    """phi: one compression block ``[..., kernel_size, H, D]`` -> one token ``[..., H, D]``.

    A learned intra-block position embedding ``[kernel_size, D]`` is added to every block;
    then either an MLP over the flattened block (``Linear(kernel_size*D, D) -> GELU ->
    Linear(D, D)``) or the mean over the block. Shared by the KV heads (each head's block
    is compressed by the same phi).
    """

    def __init__(self, kernel_size: int, dim: int, mode: str):
        super().__init__()
        self.mode = mode
        self.pos_emb = nn.Parameter(torch.zeros(kernel_size, dim))
        if mode == "mlp":
            self.mlp = nn.Sequential(nn.Linear(kernel_size * dim, dim), nn.GELU(), nn.Linear(dim, dim))

    def forward(self, blocks: torch.Tensor) -> torch.Tensor:
        # The position embedding is folded into what follows it instead of being added to every
        # block (a pass over all blocks): mean(b + p) = mean(b) + mean(p), and the first layer's
        # W (b + p) + bias = W b + (W p + bias).
        if self.mode == "mean":
            return blocks.mean(-3) + self.pos_emb.mean(0).to(blocks.dtype)
        lin1, act, lin2 = self.mlp
        bias = torch.addmv(lin1.bias, lin1.weight, self.pos_emb.flatten())
        x = blocks.movedim(-3, -2).flatten(-2)  # [..., H, ks*D]
        return lin2(act(F.linear(x, lin1.weight, bias)))


class NativeSparseAttention(nn.Module):
    """Native Sparse Attention layer (DeepSeek, arXiv 2502.11089).

    Parameters: ``q_proj`` (hidden -> HQ*Dk); ``kv_proj`` (hidden -> raw K and V of each
    branch, in the order cmp, slc, win, each ``[H*Dk | H*Dv]``; cmp, slc when
    ``shared_kv``, whose slc keys/values also serve the window); ``compress_k`` /
    ``compress_v`` (phi, see :class:`NSAConfig`); ``g_proj`` (hidden -> 3*HQ, through a
    sigmoid: gates g_cmp, g_slc, g_win); ``o_proj`` (HQ*Dv -> hidden).

    Positions and RoPE: positions are 0-based within each sequence. Queries and the raw
    keys of the selected and window branches are rotated at their own position. The
    compressed branch compresses *un-rotated* raw keys/values with phi, then rotates
    compressed key ``i`` (raw positions ``[i*stride, i*stride + kernel_size)``) at position
    ``i*stride + kernel_size - 1``, the last raw position it covers: a compressed key is
    visible to query t only when that position is <= t, so every visible compressed key
    sits at relative distance >= 0 from the query, as raw keys do.

    Dtypes and devices: the layer runs in its parameters' dtype and on their device (move it with
    ``.to(device, dtype)``); inputs must match, except under ``torch.autocast``. On CUDA the ops
    run the Triton kernels (float16, bfloat16, float32; float64 is computed in float32), on CPU
    plain PyTorch (any of them, float64 exactly).
    """

    def __init__(self, config: NSAConfig):
        super().__init__()
        if not isinstance(config, NSAConfig):
            raise ValueError(f"config: expected an NSAConfig, got {type(config).__name__}")
        self.config = c = config
        H, Dk, Dv = c.num_kv_heads, c.head_dim, c.v_head_dim
        self.num_kv_branches = 2 if c.shared_kv else 3
        self.q_proj = nn.Linear(c.hidden_size, c.num_heads * Dk, bias=c.bias)
        self.kv_proj = nn.Linear(c.hidden_size, self.num_kv_branches * H * (Dk + Dv), bias=c.bias)
        self.compress_k = _BlockCompressor(c.kernel_size, Dk, c.compression)
        self.compress_v = _BlockCompressor(c.kernel_size, Dv, c.compression)
        self.g_proj = nn.Linear(c.hidden_size, 3 * c.num_heads, bias=c.bias)
        self.o_proj = nn.Linear(c.num_heads * Dv, c.hidden_size, bias=c.bias)

    def new_cache(self) -> NSACache:
        """An empty decoding cache matching this layer's config; the prefill gives it its device
        and dtype (those of the layer's keys and values)."""
        return NSACache(self.config.kernel_size, self.config.stride)

    # ---- pieces ---------------------------------------------------------------------------
    def _project(self, x, positions):
        """q (rotated) and per-branch raw (k, v) of x ``[B, T, hidden]`` at ``positions``
        (``[B|1, T]``); slc/win keys rotated, cmp keys not. Returns q, [(k, v) per branch]."""
        return self._rotate(*self._project_raw(x), positions)

    def _project_raw(self, x):
        """q and per-branch (k, v) of x ``[B, T, hidden]``, none rotated (views of the projections)."""
        c = self.config
        B, T, _ = x.shape
        H, Dk, Dv = c.num_kv_heads, c.head_dim, c.v_head_dim
        q = self.q_proj(x).view(B, T, c.num_heads, Dk)
        # One split of the fused projection into views (its backward is one concatenation of the
        # pieces' gradients, not a zero-filled full-size tensor per branch).
        parts = self.kv_proj(x).split([H * Dk, H * Dv] * self.num_kv_branches, dim=-1)
        return q, [(parts[2 * i].view(B, T, H, Dk), parts[2 * i + 1].view(B, T, H, Dv))
                   for i in range(self.num_kv_branches)]

    def _rotate(self, q, branches, positions):
        """RoPE on q and the slc/win keys of :meth:`_project_raw`'s output (cmp keys stay raw)."""
        c = self.config
        rotated = [(k if i == 0 else apply_rope(k, positions, c.rope_theta, c.backend), v)
                   for i, (k, v) in enumerate(branches)]
        return apply_rope(q, positions, c.rope_theta, c.backend), rotated

    def _gates(self, x):
        B, T, _ = x.shape
        g = torch.sigmoid(self.g_proj(x)).view(B, T, 3, self.config.num_heads)
        return g.unbind(2)

    def compress_blocks(self, k_blocks, v_blocks, positions):
        """phi on blocks, then RoPE on the compressed keys.

        Args:
            k_blocks: ``[B, Tc, kernel_size, H, Dk]`` un-rotated raw keys; v_blocks likewise with Dv;
                the parameters' dtype (or autocast) and device.
            positions: integer ``[B|1, Tc]``, the last raw position each block covers.
        Returns:
            k_cmp ``[B, Tc, H, Dk]`` (rotated), v_cmp ``[B, Tc, H, Dv]``, same device.
        """
        k = self.compress_k(k_blocks)
        v = self.compress_v(v_blocks)
        return apply_rope(k, positions, self.config.rope_theta, self.config.backend), v

    def compress(self, k, v, cu_seqlens=None):
        """Compressed keys/values of whole sequences.

        Args:
            k: ``[B, T, H, Dk]`` un-rotated raw compression-branch keys; v: ``[B, T, H, Dv]``;
                the parameters' dtype (or autocast) and device.
            cu_seqlens: int32 ``[N+1]`` on k's device, for packed input (B = 1).
        Returns:
            k_cmp ``[B, Tc, H, Dk]`` (rotated), v_cmp ``[B, Tc, H, Dv]``; packed input gives each
            sequence's compressed tokens packed in sequence order.
        """
        c = self.config
        ks, st = c.kernel_size, c.stride
        B, T = k.shape[:2]
        if cu_seqlens is None:
            Tc = (T - ks) // st + 1 if T >= ks else 0
            if Tc == 0:
                kb = k.new_zeros(B, 0, ks, *k.shape[2:])
                vb = v.new_zeros(B, 0, ks, *v.shape[2:])
            else:
                # unfold is a strided view: [B, Tc, H, D, ks] -> [B, Tc, ks, H, D], no copy.
                kb = k.unfold(1, ks, st).permute(0, 1, 4, 2, 3)
                vb = v.unfold(1, ks, st).permute(0, 1, 4, 2, 3)
            pos = torch.arange(Tc, device=k.device) * st + ks - 1
            return self.compress_blocks(kb, vb, pos.unsqueeze(0))
        # Packed: sequence starts need not be stride-aligned, so take the view of windows
        # starting at every position and pick each compressed token's window.
        ccu = compressed_cu_seqlens(cu_seqlens, ks, st)
        n_cmp = ccu[1:] - ccu[:-1]
        Tc = int(ccu[-1].item())
        dev = k.device
        seq = torch.repeat_interleave(torch.arange(n_cmp.numel(), device=dev), n_cmp.long())  # [Tc]
        i = torch.arange(Tc, device=dev) - ccu[seq].long()
        pos = i * st + ks - 1
        if Tc == 0:
            kb = k.new_zeros(1, 0, ks, *k.shape[2:])
            vb = v.new_zeros(1, 0, ks, *v.shape[2:])
        else:
            start = cu_seqlens[seq].long() + i * st
            kb = k[0].unfold(0, ks, 1)[start].permute(0, 3, 1, 2).unsqueeze(0)  # [1, Tc, ks, H, Dk]
            vb = v[0].unfold(0, ks, 1)[start].permute(0, 3, 1, 2).unsqueeze(0)
        return self.compress_blocks(kb, vb, pos.unsqueeze(0))

    def _branch_kv(self, branches):
        """(k_slc, v_slc, k_win, v_win) from the projected branches."""
        (k_s, v_s) = branches[1]
        (k_w, v_w) = branches[2] if len(branches) == 3 else branches[1]
        return k_s, v_s, k_w, v_w

    def _op_kwargs(self):
        c = self.config
        return dict(kernel_size=c.kernel_size, stride=c.stride, block_size=c.block_size,
                    num_selected=c.num_selected, num_initial=c.num_initial, num_local=c.num_local,
                    window_size=c.window_size, backend=c.backend)

    # ---- forward ----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, cache: NSACache | None = None, cu_seqlens: torch.Tensor | None = None,
                context=None):
        """Args:
            x: ``[B, T, hidden_size]``, or packed ``[1, total, hidden_size]`` with ``cu_seqlens``,
                in the parameters' dtype (or any floating dtype under autocast) and on their
                device. With a non-empty ``cache`` of N sequences: ``[N, 1, hidden_size]``, one new
                token per cached sequence at position ``cache.seq_lens[n]`` (a decoding step), or a
                chunk ``[N, T, hidden_size]`` / packed ``[1, total, hidden_size]`` with ``cu_seqlens``
                (chunked prefill: sequence n gets ``cu_seqlens[n+1] - cu_seqlens[n] >= 0`` tokens).
            cache: optional :class:`NSACache` or :class:`nsa.PagedNSACache`. Empty: this call is a
                prefill and fills it (one cached sequence per batch row, or per packed sequence).
                Non-empty: a decoding step or a chunk (:meth:`_extend`: the outputs and the cache
                then equal those of one prefill of the whole sequences), which appends to it.
            cu_seqlens: int32 ``[N+1]`` offsets of packed sequences (or, with a filled cache, of
                the chunks), on x's device (B = 1).
            context: a :class:`nsa.parallel.ContextParallel`: x is this rank's share of the
                sequences (``[B, n_local, hidden_size]``, the documents are the context's); no cache.
        Returns:
            ``[B, T, hidden_size]`` (same layout as x) on x's device, in the dtype of the output
            projection's computation (x's dtype, or the autocast dtype).
        """
        c = self.config
        self._check_input(x)
        if context is not None:
            if cache is not None or cu_seqlens is not None:
                raise ValueError("context: context-parallel input takes neither a cache nor cu_seqlens (the "
                                 "documents are the context's)")
            return self._context_parallel(x, context)
        if cache is not None:
            self._check_cache(cache)
            if not cache.is_empty:
                if cu_seqlens is None and x.shape[1] == 1 and 0 not in cache.lengths:
                    return self._decode(x, cache)
                return self._extend(x, cache, cu_seqlens)
        B, T, _ = x.shape
        if cache is not None and T == 0:
            raise ValueError(f"x: a prefill into a cache needs at least one token per sequence, got {tuple(x.shape)}")
        if cu_seqlens is not None:
            if B != 1:
                raise ValueError(f"x: packed input (cu_seqlens given) needs batch size 1, got {tuple(x.shape)}")
            ops.checks.check_cu_seqlens(cu_seqlens, x)
            seq_start = cu_seqlens[:-1].long()
            seq = torch.repeat_interleave(torch.arange(seq_start.numel(), device=x.device),
                                          (cu_seqlens[1:] - cu_seqlens[:-1]).long())
            positions = (torch.arange(T, device=x.device) - seq_start[seq]).unsqueeze(0)  # [1, total]
        else:
            positions = torch.arange(T, device=x.device).unsqueeze(0)  # [1, T]
        q, branches = self._project(x, positions)
        k_raw, v_raw = branches[0]
        k_cmp, v_cmp = self.compress(k_raw, v_raw, cu_seqlens)
        k_s, v_s, k_w, v_w = self._branch_kv(branches)
        g_cmp, g_slc, g_win = self._gates(x)
        dt = q.dtype
        o = ops.nsa(q, k_cmp.to(dt), v_cmp.to(dt), k_s.to(dt), v_s.to(dt), k_w.to(dt), v_w.to(dt),
                    g_cmp.to(dt), g_slc.to(dt), g_win.to(dt), cu_seqlens=cu_seqlens, **self._op_kwargs())
        if cache is not None:
            if cu_seqlens is None:
                lens = [T] * B
            else:
                lens = [b - a for a, b in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist())]
            # [B, T, ...] and packed [1, total, ...] both flatten to the packed [total, ...] layout.
            shared = len(branches) == 2
            with torch.no_grad():
                cache.prefill(lens, k_raw.flatten(0, 1), v_raw.flatten(0, 1), k_cmp.flatten(0, 1),
                              v_cmp.flatten(0, 1), k_s.flatten(0, 1), v_s.flatten(0, 1),
                              None if shared else k_w.flatten(0, 1), None if shared else v_w.flatten(0, 1))
        return self.o_proj(o.flatten(-2))

    def _context_parallel(self, x, cp):
        """This rank's share of the sequences (:mod:`nsa.parallel`): raw keys/values of every branch
        gathered from all ranks in one collective, the whole documents compressed, and the local
        queries attending as the last positions of their documents' keys up to them."""
        from .parallel import ContextParallel

        if not isinstance(cp, ContextParallel):
            raise ValueError(f"context: expected an nsa.parallel.ContextParallel, got {type(cp).__name__}")
        c = self.config
        B, n, _ = x.shape
        q, branches = self._project(x, cp.positions)
        kv = [t for pair in branches for t in pair]
        whole = cp.gather(torch.cat(kv, -1)).split([t.shape[-1] for t in kv], -1)  # [B * T, H, D] each
        k_cmp, v_cmp = self.compress(whole[0].unsqueeze(0), whole[1].unsqueeze(0), cp.doc_cu)
        rows = cp.compressed_index(c.kernel_size, c.stride)
        keys = [t.index_select(0, cp.key_index).unsqueeze(0) for t in whole[2:]]
        k_s, v_s, k_w, v_w = self._branch_kv([None] + [tuple(keys[i:i + 2]) for i in range(0, len(keys), 2)])
        g_cmp, g_slc, g_win = (g.reshape(1, B * n, -1) for g in self._gates(x))
        dt = q.dtype
        o = ops.nsa(q.reshape(1, B * n, *q.shape[2:]), k_cmp[:, rows].to(dt), v_cmp[:, rows].to(dt), k_s.to(dt),
                    v_s.to(dt), k_w.to(dt), v_w.to(dt), g_cmp.to(dt), g_slc.to(dt), g_win.to(dt),
                    cu_seqlens=cp.cu_q, cu_seqlens_k=cp.cu_k, **self._op_kwargs())
        return self.o_proj(o.view(B, n, -1))

    def _check_input(self, x):
        c = self.config
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != c.hidden_size:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x: expected [B, T, hidden_size={c.hidden_size}], got {shape}")
        w = self.q_proj.weight
        if x.device != w.device:
            raise ValueError(f"x: expected device {w.device} like the layer's parameters, got {x.device}")
        if not x.is_floating_point():
            raise ValueError(f"x: expected a floating-point tensor, got {x.dtype}")
        if x.dtype != w.dtype and not torch.is_autocast_enabled(x.device.type):
            raise ValueError(f"x: expected dtype {w.dtype} like the layer's parameters (or autocast), got {x.dtype}")

    def _check_cache(self, cache):
        """The cache was built for this layer's compression and, once filled, holds this layer's
        KV heads, head dims and branch layout."""
        c = self.config
        if not isinstance(cache, (NSACache, PagedNSACache)):
            raise ValueError(f"cache: expected an NSACache or a PagedNSACache, got {type(cache).__name__}")
        if (cache.kernel_size, cache.stride) != (c.kernel_size, c.stride):
            raise ValueError(f"cache: built for kernel_size={cache.kernel_size}, stride={cache.stride}, "
                             f"layer has {c.kernel_size}, {c.stride}")
        if isinstance(cache, PagedNSACache) and cache.block_size != c.block_size:
            raise ValueError(f"cache: pages of block_size={cache.block_size} tokens, the layer selects blocks of "
                             f"{c.block_size}")
        if cache.is_empty or cache.k_slc is None:
            return
        have = (tuple(cache.k_slc.shape[2:]), cache.v_slc.shape[-1], cache.shared)
        want = ((c.num_kv_heads, c.head_dim), c.v_head_dim, c.shared_kv)
        if have != want:
            raise ValueError(f"cache: filled with (KV heads, head_dim), v_head_dim, shared_kv = {have}; "
                             f"this layer has {want}")
        if cache.k_slc.device != self.q_proj.weight.device:
            raise ValueError(f"cache: on device {cache.k_slc.device}, the layer on {self.q_proj.weight.device}")

    def _decode(self, x, cache: NSACache):
        """One decoding step without host synchronisation: no device value is read (the cache
        decides capacity and completed compression blocks from its host ``lengths``), the
        cache is used in place in this step's dtype (cast once if the prefill had another), and
        nsa_decode validates shapes only (its value checks: ``NSA_DEBUG_CHECKS=1``)."""
        N = cache.batch_size
        if tuple(x.shape[:2]) != (N, 1):
            raise ValueError(f"x: a decoding step takes one token per cached sequence, [N={N}, 1, hidden_size]; "
                             f"got {tuple(x.shape)} (chunked prefill into a filled cache is not supported)")
        q, branches = self._project_raw(x)
        # With RoPE on the Triton kernel: the rotations and the cache writes in one launch
        # (append_rotating, dense or paged cache); otherwise RoPE, then the cache's indexed stores.
        kernel = ops.api._triton_impl("rope")  # None without Triton
        fused = FUSED_STEP_WRITE and q.dtype != torch.float64 and kernel is not None and \
            ops.api.resolve_backend(self.config.backend, "rope", q.device) is kernel
        if not fused:  # at the new token's position
            q, branches = self._rotate(q, branches, cache.seq_lens.long().view(N, 1))
        k_raw, v_raw = branches[0]
        k_s, v_s, k_w, v_w = self._branch_kv(branches)
        shared = len(branches) == 2
        dt = q.dtype
        with torch.no_grad():
            # The cache is read in q's dtype: a prefill in another dtype (autocast, or the layer moved
            # since) is cast once here, never copied whole on every step.
            cache.cast_(dt)
            new = (k_raw[:, 0], v_raw[:, 0], k_s[:, 0], v_s[:, 0], None if shared else k_w[:, 0],
                   None if shared else v_w[:, 0])
            if fused:
                q, done = cache.append_rotating(q[:, 0], self.config.rope_theta, *new)
                q = q.unsqueeze(1)
            else:
                done = cache.append(*new)
            if cache.completed:
                # Only the blocks completed by this token are compressed, never the past (a static
                # cache: every sequence's last block, stored only where it completed; whether this
                # step compresses at all is the host's decision, so a graph is captured per kind of
                # step, see nsa.model._DecodeSteps).
                kb, vb = cache.compression_blocks(done)
                pos = cache.seq_lens[done].long() - 1
                # phi sees the dtype this step's projections have, as a prefill now would.
                kb, vb = kb.to(k_raw.dtype), vb.to(v_raw.dtype)
                kc, vc = self.compress_blocks(kb.unsqueeze(0), vb.unsqueeze(0), pos.unsqueeze(0))
                cache.store_compressed(done, kc[0], vc[0])
        g_cmp, g_slc, g_win = (g[:, 0].to(dt) for g in self._gates(x))
        # A paged cache is read through its page table (nsa.ops.decode_paged explains what each
        # backend reads).
        decode, table = ((nsa_decode_paged, (cache.page_table,)) if isinstance(cache, PagedNSACache)
                         else (nsa_decode, ()))
        o = decode(q[:, 0], cache.k_cmp, cache.v_cmp, cache.k_slc, cache.v_slc, cache.k_win, cache.v_win,
                   g_cmp, g_slc, g_win, *table, cache.seq_lens, **self._op_kwargs())
        return self.o_proj(o.flatten(-2)).unsqueeze(1)

    def _extend(self, x, cache, cu_seqlens):
        """Chunked prefill: append ``x`` to every cached sequence (``[N, T, hidden]``, or packed
        ``[1, total, hidden]`` with one chunk per sequence in ``cu_seqlens``, chunks of length 0
        allowed). Outputs and cache state equal those of one prefill of the whole sequences.

        The chunk's queries attend to cached + chunk keys as the last positions of each sequence
        (:func:`nsa.ops.nsa` with ``cu_seqlens_k``): the attention work is that of the chunk's
        queries; the keys are the cache's rows followed by the chunk's, gathered into one packed
        tensor per branch. Only the compression blocks the chunk completes are compressed."""
        c = self.config
        ks, st = c.kernel_size, c.stride
        chunk = chunk_lengths(x, cache.batch_size, cu_seqlens)
        old = list(cache.lengths)
        dev = x.device
        xp = x.reshape(1, -1, x.shape[-1])  # [1, total, hidden]
        positions = torch.tensor([L + j for L, n in zip(old, chunk) for j in range(n)], dtype=torch.long)
        q, branches = self._project(xp, positions.to(dev).unsqueeze(0))
        k_raw, v_raw = (t[0] for t in branches[0])
        k_s, v_s, k_w, v_w = (t[0] for t in self._branch_kv(branches))
        shared = len(branches) == 2
        g = [t[0] for t in self._gates(xp)]
        dt = q.dtype
        with torch.no_grad():
            cache.cast_(dt)
        starts = [sum(chunk[:n]) for n in range(len(chunk))]
        cached = [cache.tokens(n) if L else None for n, L in enumerate(old)]

        # The compression blocks the chunks complete: block i of sequence n ends in the chunk; its
        # raw tokens come from the cached tail (the last kernel_size - 1 at most) and the chunk.
        kb, vb, pos = [], [], []
        for n, (L, m, s0) in enumerate(zip(old, chunk, starts)):
            first, last = num_compressed(L, ks, st), num_compressed(L + m, ks, st)
            if first == last:
                continue
            kt = k_raw[s0:s0 + m]
            vt = v_raw[s0:s0 + m]
            if cached[n] is not None:
                kt = torch.cat([cached[n].k_tail.to(kt.dtype), kt])
                vt = torch.cat([cached[n].v_tail.to(vt.dtype), vt])
            off = L - min(L, ks)  # raw position of kt[0]
            for i in range(first, last):
                kb.append(kt[i * st - off:i * st - off + ks])
                vb.append(vt[i * st - off:i * st - off + ks])
                pos.append(i * st + ks - 1)
        H, Dk, Dv = c.num_kv_heads, c.head_dim, c.v_head_dim
        if kb:
            kc, vc = self.compress_blocks(torch.stack(kb).unsqueeze(0), torch.stack(vb).unsqueeze(0),
                                          torch.tensor(pos, device=dev).unsqueeze(0))
            kc, vc = kc[0], vc[0]
        else:
            kc, vc = k_raw.new_zeros(0, H, Dk), v_raw.new_zeros(0, H, Dv)

        # Keys of the whole sequences (cached + chunk) of the rows that advance, packed; queries and
        # gates of their chunks only.
        parts = {name: [] for name in ("k_cmp", "v_cmp", "k_s", "v_s", "k_w", "v_w")}
        full_lens, chunk_lens = [], []
        c0 = 0
        for n, (L, m, s0) in enumerate(zip(old, chunk, starts)):
            new_c = num_compressed(L + m, ks, st) - num_compressed(L, ks, st)
            if m == 0:
                continue
            prev = cached[n]
            sl = slice(s0, s0 + m)

            def cat(name, now):
                past = None if prev is None else getattr(prev, name)
                return now.to(dt) if past is None else torch.cat([past.to(dt), now.to(dt)])

            parts["k_cmp"].append(cat("k_cmp", kc[c0:c0 + new_c]))
            parts["v_cmp"].append(cat("v_cmp", vc[c0:c0 + new_c]))
            parts["k_s"].append(cat("k_slc", k_s[sl]))
            parts["v_s"].append(cat("v_slc", v_s[sl]))
            parts["k_w"].append(cat("k_win", k_w[sl]))
            parts["v_w"].append(cat("v_win", v_w[sl]))
            full_lens.append(L + m)
            chunk_lens.append(m)
            c0 += new_c
        cu_full = torch.tensor([0] + full_lens).cumsum(0).to(torch.int32).to(dev)
        cu_chunk = torch.tensor([0] + chunk_lens).cumsum(0).to(torch.int32).to(dev)
        t = {k: torch.cat(v).unsqueeze(0) for k, v in parts.items()}
        # the chunks' rows, packed in sequence order (rows of empty chunks hold none)
        o = ops.nsa(q.to(dt), t["k_cmp"], t["v_cmp"], t["k_s"], t["v_s"], t["k_w"], t["v_w"], *(x.to(dt).unsqueeze(0)
                    for x in g), cu_seqlens=cu_chunk, cu_seqlens_k=cu_full, **self._op_kwargs())[0]
        with torch.no_grad():
            cache.extend(chunk, k_raw, v_raw, kc, vc, k_s, v_s, None if shared else k_w, None if shared else v_w)
        return self.o_proj(o.flatten(-2)).view(*x.shape[:2], -1)
