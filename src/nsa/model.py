"""A decoder-only language model with an attention switch: NSA, full causal attention, or a
sliding window alone.

:class:`LanguageModel` is a Llama-style stack: token embedding, ``num_layers`` x (RMSNorm ->
attention -> residual, RMSNorm -> SwiGLU -> residual), final RMSNorm, LM head. The attention
is chosen by ``ModelConfig.attention``:

- ``'nsa'``: :class:`nsa.NativeSparseAttention` (compressed + selected + window branches, gated);
- ``'full'``: causal scaled-dot-product attention (PyTorch SDPA) with the same query
  projection, RoPE and output projection;
- ``'window'``: the sliding-window op alone (:func:`nsa.ops.sliding_window_attention`),
  likewise,

so an ablation is one flag and the three share every other parameter. Packed documents come
as ``input_ids [1, total]`` with ``cu_seqlens``: attention never crosses a document boundary.
The model is single-device and knows nothing of parallelism (see :mod:`nsa.train`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from typing import Callable, Iterator, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from . import ops
from .cache import KVCache, NSACache
from .layer import NativeSparseAttention, NSAConfig, apply_rope, chunk_lengths

__all__ = ["ModelConfig", "LanguageModel", "LMOutput", "ModelCache"]

ATTENTION_KINDS = ("nsa", "full", "window")
IGNORE_INDEX = -100
# The loss computes at most this many logits at once (see LanguageModel._loss).
LOSS_CHUNK_LOGITS = 2 ** 24


def _positive_int(name, v):
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name}: expected a positive int, got {v!r}")


def _positive_float(name, v):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0 or math.isinf(v):
        raise ValueError(f"{name}: expected a positive finite number, got {v!r}")


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a :class:`LanguageModel`; validated on construction, immutable (:meth:`replace`).

    Args:
        vocab_size: number of token ids.
        hidden_size: model width; num_layers: decoder blocks.
        num_heads, num_kv_heads: query heads HQ and key/value heads H (``HQ % H == 0``).
        head_dim: per-head dim (even: RoPE rotates pairs).
        intermediate_size: SwiGLU hidden width.
        max_seq_len: the longest training sequence (``nsa train --seq-len`` must not exceed it).
            Inference may run longer sequences (RoPE has no table; quality beyond the trained
            length is what length-extrapolation evaluations measure).
        rope_theta: RoPE base; norm_eps: RMSNorm epsilon; tie_embeddings: LM head shares the
            embedding matrix.
        attention: ``'nsa'``, ``'full'`` or ``'window'``.
        kernel_size, stride, block_size, num_selected, num_initial, num_local, window_size,
            compression, shared_kv: NSA's hyper-parameters (:class:`nsa.NSAConfig`);
            ``window_size`` is also the window of ``attention='window'``.
        backend: passed to :mod:`nsa.ops` (None | 'auto' | 'reference' | 'triton' ...).
    """

    vocab_size: int = 320
    hidden_size: int = 512
    num_layers: int = 8
    num_heads: int = 8
    num_kv_heads: int = 2
    head_dim: int = 64
    intermediate_size: int = 1536
    max_seq_len: int = 8192
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    attention: str = "nsa"
    kernel_size: int = 32
    stride: int = 16
    block_size: int = 64
    num_selected: int = 16
    num_initial: int = 1
    num_local: int = 2
    window_size: int = 512
    compression: str = "mlp"
    shared_kv: bool = False
    backend: str | None = None

    # Parameter counts are for attention='nsa' with the default byte-level vocabulary (320):
    # tiny 1.1M, small 25.5M, base 124M, 1b 0.99B ('full' and 'window' have fewer attention
    # parameters, no compression MLP, gates or per-branch K/V: 0.83M, 21.1M, 114M, 0.96B).
    # 'tiny' is for CPU tests and the demo: NSA's sizes scaled down by 2-8x (compression blocks of
    # 16 every 8, selection blocks of 16, 4 of them, a 64-token window), so that at 512 tokens
    # a query attends about a third of the keys that full attention attends.
    PRESETS = {
        "tiny": dict(hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=32,
                     intermediate_size=384, max_seq_len=1024, kernel_size=16, stride=8, block_size=16,
                     num_selected=4, num_local=1, window_size=64),
        "small": dict(hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=2, head_dim=64,
                      intermediate_size=1280, max_seq_len=8192),
        "base": dict(hidden_size=1024, num_layers=12, num_heads=16, num_kv_heads=2, head_dim=64,
                     intermediate_size=2304, max_seq_len=65536, rope_theta=500000.0),
        "1b": dict(hidden_size=2048, num_layers=22, num_heads=32, num_kv_heads=2, head_dim=64,
                   intermediate_size=5632, max_seq_len=65536, rope_theta=500000.0),
    }

    @classmethod
    def preset(cls, name: str, **overrides) -> "ModelConfig":
        """A named configuration (``'tiny'``, ``'small'``, ``'base'``, ``'1b'``) with fields overridden."""
        if name not in cls.PRESETS:
            raise ValueError(f"preset: unknown preset {name!r}; expected one of {list(cls.PRESETS)}")
        return cls(**{**cls.PRESETS[name], **overrides})

    def __post_init__(self):
        for f in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                  "intermediate_size", "max_seq_len"):
            _positive_int(f, getattr(self, f))
        _positive_float("rope_theta", self.rope_theta)
        _positive_float("norm_eps", self.norm_eps)
        if not isinstance(self.tie_embeddings, bool):
            raise ValueError(f"tie_embeddings: expected a bool, got {self.tie_embeddings!r}")
        if self.attention not in ATTENTION_KINDS:
            raise ValueError(f"attention: expected one of {ATTENTION_KINDS}, got {self.attention!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads: must be a multiple of num_kv_heads ({self.num_kv_heads}), "
                             f"got {self.num_heads}")
        # Every NSA field is checked whatever the attention kind, so that switching the kind of a
        # valid config never yields an invalid one.
        self.nsa_config()

    def nsa_config(self) -> NSAConfig:
        """The :class:`nsa.NSAConfig` of one attention layer of this model (validated)."""
        return NSAConfig(hidden_size=self.hidden_size, num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
                         head_dim=self.head_dim, kernel_size=self.kernel_size, stride=self.stride,
                         block_size=self.block_size, num_selected=self.num_selected, num_initial=self.num_initial,
                         num_local=self.num_local, window_size=self.window_size, rope_theta=float(self.rope_theta),
                         compression=self.compression, shared_kv=self.shared_kv, backend=self.backend)

    def replace(self, **changes) -> "ModelConfig":
        """A validated copy with ``changes``."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """The fields as a JSON-able dict (what ``config.json`` holds)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        """A config from :meth:`to_dict`'s output; unknown keys are a ValueError naming them."""
        if not isinstance(d, dict):
            raise ValueError(f"config: expected a dict, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"config: unknown keys {unknown}; expected a subset of {sorted(known)}")
        return cls(**d)


class LMOutput(NamedTuple):
    """``logits [B, T, vocab]`` (None when ``labels`` were given and ``return_logits`` was not
    asked), ``loss`` (scalar mean over the predicted positions, computed in float32 or float64 for a
    float64 model; None without labels)."""

    logits: torch.Tensor | None
    loss: torch.Tensor | None


def _positions(T, cu_seqlens, device):
    """``[1, T]`` 0-based positions, restarting in every packed sequence."""
    if cu_seqlens is None:
        return torch.arange(T, device=device).unsqueeze(0)
    starts = cu_seqlens[:-1].long()
    seq = torch.repeat_interleave(torch.arange(starts.numel(), device=device), (cu_seqlens[1:] - cu_seqlens[:-1]).long())
    return (torch.arange(T, device=device) - starts[seq]).unsqueeze(0)


class Attention(nn.Module):
    """Full causal (``window_size=None``) or sliding-window attention with GQA and RoPE:
    ``q_proj`` (hidden -> HQ*D), ``kv_proj`` (hidden -> H*D keys | H*D values), ``o_proj``."""

    def __init__(self, config: ModelConfig, window_size: int | None):
        super().__init__()
        c = config
        self.config = c
        self.window_size = window_size
        self.q_proj = nn.Linear(c.hidden_size, c.num_heads * c.head_dim, bias=False)
        self.kv_proj = nn.Linear(c.hidden_size, 2 * c.num_kv_heads * c.head_dim, bias=False)
        self.o_proj = nn.Linear(c.num_heads * c.head_dim, c.hidden_size, bias=False)

    def new_cache(self) -> KVCache:
        return KVCache()

    def _qkv(self, x, positions):
        c = self.config
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, c.num_heads, c.head_dim)
        k, v = self.kv_proj(x).view(B, T, 2, c.num_kv_heads, c.head_dim).unbind(2)
        return (apply_rope(q, positions, c.rope_theta, c.backend), apply_rope(k, positions, c.rope_theta, c.backend),
                v)

    def _attend(self, q, k, v, cu_seqlens):
        """``[B, T, HQ, D]`` causal (or windowed) attention of dense or packed sequences."""
        if self.window_size is not None:
            return ops.sliding_window_attention(q, k, v, window_size=self.window_size, cu_seqlens=cu_seqlens,
                                                backend=self.config.backend)
        if cu_seqlens is None:
            return _sdpa_causal(q, k, v)
        bounds = cu_seqlens.tolist()
        return torch.cat([_sdpa_causal(q[:, a:b], k[:, a:b], v[:, a:b]) for a, b in zip(bounds[:-1], bounds[1:])], 1)

    def forward(self, x, cache: KVCache | None = None, cu_seqlens=None):
        B, T, _ = x.shape
        if cache is not None and not cache.is_empty:
            if cu_seqlens is None and T == 1:
                return self._decode(x, cache)
            return self._extend(x, cache, cu_seqlens)
        q, k, v = self._qkv(x, _positions(T, cu_seqlens, x.device))
        o = self._attend(q, k, v, cu_seqlens)
        if cache is not None:
            lens = [T] * B if cu_seqlens is None else [b - a for a, b in zip(cu_seqlens[:-1].tolist(),
                                                                              cu_seqlens[1:].tolist())]
            cache.prefill(lens, k.flatten(0, 1), v.flatten(0, 1))
        return self.o_proj(o.flatten(-2))

    def _extend(self, x, cache: KVCache, cu_seqlens):
        """A chunk of tokens appended to every cached sequence (``[N, T, hidden]``, or packed
        ``[1, total, hidden]`` with one chunk per sequence in ``cu_seqlens``, 0 allowed): each
        chunk's queries attend to the sequence's cached keys and causally to the chunk's own."""
        chunk = chunk_lengths(x, cache.batch_size, cu_seqlens)
        old = list(cache.lengths)
        xp = x.reshape(1, -1, x.shape[-1])
        positions = torch.tensor([L + j for L, n in zip(old, chunk) for j in range(n)], device=x.device)
        q, k, v = self._qkv(xp, positions.unsqueeze(0))
        with torch.no_grad():
            cache.extend(chunk, k[0], v[0])
        outs, s0 = [], 0
        for n, (L, m) in enumerate(zip(old, chunk)):
            if m == 0:
                continue
            keys = torch.arange(L + m, device=x.device)
            pos = keys[L:].view(m, 1)
            visible = keys <= pos  # [m, L + m]: the cache, then the chunk causally
            if self.window_size is not None:
                visible &= keys > pos - self.window_size
            # the cached keys, then the chunk's own (as computed: gradients reach them): [1, H, L + m, D]
            kn, vn = (torch.cat([past[n, :L].to(q.dtype), now[0, s0:s0 + m]]).unsqueeze(0).transpose(1, 2)
                      for past, now in ((cache.k, k), (cache.v, v)))
            H = kn.shape[1]
            G = q.shape[2] // H
            # a KV head's G query heads at the m positions as m * G query rows (as KVCache.attend does):
            # a masked SDPA with no GQA flag, which the memory-efficient kernel takes
            qn = q[0, s0:s0 + m].view(m, H, G, -1).permute(1, 0, 2, 3).reshape(1, H, m * G, -1)
            o = F.scaled_dot_product_attention(qn, kn, vn, attn_mask=visible.repeat_interleave(G, 0))
            outs.append(o.view(H, m, G, -1).permute(1, 0, 2, 3).reshape(1, m, H * G, -1))
            s0 += m
        o = torch.cat(outs, 1)  # [1, total, HQ, D]
        return self.o_proj(o.flatten(-2)).view(*x.shape[:2], -1)

    def _decode(self, x, cache: KVCache):
        N = cache.batch_size
        if tuple(x.shape[:2]) != (N, 1):
            raise ValueError(f"x: a decoding step takes one token per cached sequence, [N={N}, 1, hidden]; "
                             f"got {tuple(x.shape)}")
        q, k, v = self._qkv(x, cache.seq_lens.long().view(N, 1))
        with torch.no_grad():
            cache.append(k[:, 0], v[:, 0])
        o = cache.attend(q[:, 0], window_size=self.window_size)
        return self.o_proj(o.flatten(-2)).unsqueeze(1)


def _sdpa_causal(q, k, v):
    """Causal SDPA on ``[B, T, H*, D]`` tensors (GQA through ``enable_gqa``)."""
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                       enable_gqa=q.shape[2] != k.shape[2])
    return o.transpose(1, 2)


class SwiGLU(nn.Module):
    """``down(silu(gate(x)) * up(x))``; gate and up are one matmul (``gate_up_proj``)."""

    def __init__(self, hidden_size, intermediate_size):
        super().__init__()
        self.gate_up_proj = nn.Linear(hidden_size, 2 * intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    """Pre-norm decoder block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        c = config
        self.attn_norm = nn.RMSNorm(c.hidden_size, eps=c.norm_eps)
        if c.attention == "nsa":
            self.attn = NativeSparseAttention(c.nsa_config())
        else:
            self.attn = Attention(c, c.window_size if c.attention == "window" else None)
        self.mlp_norm = nn.RMSNorm(c.hidden_size, eps=c.norm_eps)
        self.mlp = SwiGLU(c.hidden_size, c.intermediate_size)

    def forward(self, x, cu_seqlens=None, cache=None, context=None):
        h = self.attn_norm(x)
        a = self.attn(h, cache=cache, cu_seqlens=cu_seqlens) if context is None else self.attn(h, context=context)
        x = x + a
        return x + self.mlp(self.mlp_norm(x))


class ModelCache:
    """Decoding state of a :class:`LanguageModel`: one cache per layer (:class:`nsa.NSACache`
    for NSA layers, :class:`nsa.cache.KVCache` for full and window attention)."""

    def __init__(self, layers: list):
        self.layers = layers

    @property
    def is_empty(self) -> bool:
        return self.layers[0].is_empty

    @property
    def batch_size(self) -> int:
        return self.layers[0].batch_size

    @property
    def lengths(self) -> list[int]:
        """Host list of the cached tokens per sequence."""
        return list(self.layers[0].lengths)

    def reset(self):
        """Forget every sequence in every layer."""
        for c in self.layers:
            c.reset()

    def make_static(self, new_tokens: int):
        """Room for ``new_tokens`` more tokens per sequence in every layer, and decoding steps of
        fixed shapes that read no host-side decision, so that a step can be captured in a CUDA
        graph (see :meth:`nsa.NSACache.make_static`)."""
        for c in self.layers:
            c.make_static(new_tokens)


class LanguageModel(nn.Module):
    """Decoder-only language model (see the module docstring). ``forward`` trains and prefills;
    :meth:`generate` decodes with a cache."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        if not isinstance(config, ModelConfig):
            raise ValueError(f"config: expected a ModelConfig, got {type(config).__name__}")
        self.config = c = config
        self.embed = nn.Embedding(c.vocab_size, c.hidden_size)
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.num_layers))
        self.norm = nn.RMSNorm(c.hidden_size, eps=c.norm_eps)
        self.lm_head = nn.Linear(c.hidden_size, c.vocab_size, bias=False)
        if c.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        # Recompute each block in the backward instead of keeping its activations (set by the trainer).
        self.activation_checkpointing = False
        self.reset_parameters()

    def reset_parameters(self):
        """GPT-2 initialisation: normal(0, 0.02) weights, zero biases; the projections that write
        into the residual stream (attention ``o_proj``, MLP ``down_proj``) get std
        ``0.02 / sqrt(2 * num_layers)``; RMSNorm weights one; NSA's intra-block position
        embeddings zero."""
        std = 0.02
        for name, m in self.named_modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                s = std / math.sqrt(2 * self.config.num_layers) if name.endswith(("o_proj", "down_proj")) else std
                nn.init.normal_(m.weight, 0.0, s)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.RMSNorm):
                nn.init.ones_(m.weight)
        for name, p in self.named_parameters():
            if name.endswith("pos_emb"):
                nn.init.zeros_(p)

    def num_parameters(self, non_embedding: bool = False) -> int:
        """Parameter count (tied weights once); ``non_embedding`` leaves out the token embedding."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.embed.weight.numel() if non_embedding else n

    def new_cache(self, num_pages: int | None = None) -> ModelCache:
        """An empty decoding cache for this model: dense (:class:`nsa.NSACache` /
        :class:`nsa.cache.KVCache` per layer), or with ``num_pages`` a :class:`nsa.PagedNSACache`
        of that many pages (of ``block_size`` tokens) per layer (``attention='nsa'`` only)."""
        if num_pages is None:
            return ModelCache([b.attn.new_cache() for b in self.blocks])
        if self.config.attention != "nsa":
            raise ValueError(f"num_pages: a paged cache holds NSA layers; this model has attention="
                             f"{self.config.attention!r}")
        if isinstance(num_pages, bool) or not isinstance(num_pages, int) or num_pages < 1:
            raise ValueError(f"num_pages: expected None or an int >= 1, got {num_pages!r}")
        from .paged_cache import PagedNSACache

        return ModelCache([PagedNSACache.for_layer(b.attn.config, num_pages) for b in self.blocks])

    # ---- forward ----------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, cu_seqlens: torch.Tensor | None = None,
                cache: ModelCache | None = None, labels: torch.Tensor | None = None,
                return_logits: bool | None = None, context=None) -> LMOutput:
        """Args:
            input_ids: int64 (or int32) ``[B, T]`` on the model's device, or packed ``[1, total]``
                with ``cu_seqlens``. With a filled ``cache``: ``[N, 1]``, one new token per cached
                sequence, or ``[N, k]`` / packed ``[1, total]`` with ``cu_seqlens``, a chunk per
                sequence (verifying draft tokens, chunked prefill; causal inside the chunk).
            cu_seqlens: int32 ``[N+1]`` offsets of packed sequences (documents), on the same
                device; attention and the loss never cross them. With a filled cache: the chunks'
                offsets (a chunk may be empty).
            cache: optional :class:`ModelCache` (:meth:`new_cache`). Empty: this call is a
                prefill and fills it; filled: a decoding step or chunk, appended to it (the
                logits equal those of one forward of the whole sequences).
            labels: int64, same shape as ``input_ids``; position t is trained to predict
                ``labels[t + 1]`` (labels equal to input_ids give the next-token loss; the
                shift happens here, as in Hugging Face models). ``-100`` is ignored, and so is
                the last position of every sequence.
            return_logits: also return logits when labels are given (default: only without labels;
                the loss is computed in chunks without materialising float32 logits).
            context: a :class:`nsa.parallel.ContextParallel` (``attention='nsa'``): input_ids is this
                rank's share of the sequences ``[B, n_local]`` (documents: the context's, no
                cu_seqlens, no cache), labels the whole batch's ``[B, T]`` (shifted and masked
                here, then shared out); logits are this rank's rows and the loss is this rank's
                part of the mean (the parts summed over the group are the mean).
        Returns:
            :class:`LMOutput` ``(logits, loss)`` on the model's device; logits in the LM head's
            compute dtype (bf16 under bf16 autocast).
        """
        if context is not None:
            return self._forward_context(input_ids, labels, return_logits, context, cu_seqlens, cache)
        if cache is not None and not isinstance(cache, ModelCache):
            raise ValueError(f"cache: expected a ModelCache (model.new_cache()), got {type(cache).__name__}")
        if cache is not None and len(cache.layers) != len(self.blocks):
            raise ValueError(f"cache: holds {len(cache.layers)} layers, the model has {len(self.blocks)}")
        self._check_ids(input_ids, cu_seqlens, labels, chunks=cache is not None and not cache.is_empty)
        h = self._hidden(input_ids, cu_seqlens, cache)
        if labels is None:
            return LMOutput(self.lm_head(h), None)
        loss = self._loss(h, labels, cu_seqlens)
        logits = self.lm_head(h) if return_logits else None
        return LMOutput(logits, loss)

    def _hidden(self, input_ids, cu_seqlens, cache):
        """The final norm's output for checked inputs (the LM head's input)."""
        x = self.embed(input_ids)
        for i, block in enumerate(self.blocks):
            layer_cache = None if cache is None else cache.layers[i]
            if self.activation_checkpointing and self.training and torch.is_grad_enabled() and cache is None:
                x = checkpoint(block, x, cu_seqlens, use_reentrant=False)
            else:
                x = block(x, cu_seqlens=cu_seqlens, cache=layer_cache)
        return self.norm(x)

    def _forward_context(self, input_ids, labels, return_logits, cp, cu_seqlens, cache):
        """:meth:`forward` on this rank's share of the sequences (see its ``context``)."""
        from .parallel import ContextParallel

        if not isinstance(cp, ContextParallel):
            raise ValueError(f"context: expected an nsa.parallel.ContextParallel, got {type(cp).__name__}")
        if self.config.attention != "nsa":
            raise ValueError(f"context: context parallelism runs attention='nsa' models, this one has "
                             f"attention={self.config.attention!r}")
        if cu_seqlens is not None or cache is not None:
            raise ValueError("context: context-parallel input takes neither cu_seqlens (the documents are the "
                             "context's) nor a cache")
        self._check_ids(input_ids, None, None)
        B, T = cp.batch, cp.shards.length
        if tuple(input_ids.shape) != (B, cp.n_local):
            raise ValueError(f"input_ids: expected this rank's share [B={B}, {cp.n_local}], got "
                             f"{tuple(input_ids.shape)}")
        x = self.embed(input_ids)
        for block in self.blocks:
            if self.activation_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, None, None, cp, use_reentrant=False)
            else:
                x = block(x, context=cp)
        h = self.norm(x)
        if labels is None:
            return LMOutput(self.lm_head(h), None)
        if not isinstance(labels, torch.Tensor) or tuple(labels.shape) != (B, T) or labels.dtype not in (
                torch.int64, torch.int32) or labels.device != input_ids.device:
            what = f"{labels.dtype} {tuple(labels.shape)}" if isinstance(labels, torch.Tensor) else type(labels).__name__
            raise ValueError(f"labels: expected the whole batch's integer labels [B={B}, T={T}] on "
                             f"{input_ids.device}, got {what}")
        doc_cu = None if len(cp.shards.docs) == 1 else cp.doc_cu.to(labels.device)
        targets = self._targets(labels, doc_cu)
        count = (targets != IGNORE_INDEX).sum()
        local = cp.shards.shard(targets, cp.rank)
        loss = self._ce_total(h, local) / count.clamp(min=1)
        return LMOutput(self.lm_head(h) if return_logits else None, loss)

    def _check_ids(self, input_ids, cu_seqlens, labels, chunks=False):
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
            raise ValueError(f"input_ids: expected an int64 tensor [B, T], got {shape}")
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"input_ids: expected an integer (int64) tensor, got {input_ids.dtype}")
        if input_ids.device != self.embed.weight.device:
            raise ValueError(f"input_ids: expected device {self.embed.weight.device} like the model, "
                             f"got {input_ids.device}")
        if input_ids.numel() and not torch.compiler.is_compiling():
            lo, hi = (int(v) for v in torch.stack([input_ids.min(), input_ids.max()]).tolist())
            if lo < 0 or hi >= self.config.vocab_size:
                raise ValueError(f"input_ids: token ids must lie in [0, {self.config.vocab_size}), "
                                 f"got range [{lo}, {hi}]")
        if cu_seqlens is not None:
            if input_ids.shape[0] != 1:
                raise ValueError(f"input_ids: packed input (cu_seqlens given) needs batch size 1, "
                                 f"got {tuple(input_ids.shape)}")
            if not chunks:
                ops.checks.check_cu_seqlens(cu_seqlens, input_ids.unsqueeze(-1).unsqueeze(-1))
            elif (not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dtype != torch.int32
                  or cu_seqlens.dim() != 1 or cu_seqlens.device != input_ids.device):
                # chunks into a filled cache may be empty: each layer checks the offsets
                raise ValueError(f"cu_seqlens: expected an int32 1-D tensor on {input_ids.device}, got "
                                 f"{getattr(cu_seqlens, 'dtype', type(cu_seqlens).__name__)}")
        if labels is not None:
            if not isinstance(labels, torch.Tensor) or labels.shape != input_ids.shape:
                shape = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
                raise ValueError(f"labels: expected the shape of input_ids {tuple(input_ids.shape)}, got {shape}")
            if labels.dtype not in (torch.int64, torch.int32) or labels.device != input_ids.device:
                raise ValueError(f"labels: expected an integer tensor on {input_ids.device}, "
                                 f"got {labels.dtype} on {labels.device}")

    def _loss(self, h, labels, cu_seqlens):
        """Mean next-token cross-entropy over the positions that have a target.

        The LM head and the float32 log-softmax run on chunks of rows, each recomputed in the
        backward (activation checkpointing), so no ``[tokens, vocab]`` float32 tensor exists for
        the whole batch: a chunk holds at most ``LOSS_CHUNK_LOGITS`` logits.
        """
        targets = self._targets(labels, cu_seqlens)
        return self._ce_total(h, targets) / (targets != IGNORE_INDEX).sum().clamp(min=1)

    @staticmethod
    def _targets(labels, cu_seqlens):
        """``[B, T]`` int64: position t's target ``labels[t + 1]``, IGNORE_INDEX at the last position of
        every sequence (and document)."""
        targets = torch.full_like(labels, IGNORE_INDEX, dtype=torch.long)
        targets[:, :-1] = labels[:, 1:]
        if cu_seqlens is not None:
            targets[0, (cu_seqlens[1:-1] - 1).long()] = IGNORE_INDEX  # never predict the next document
        return targets

    def _ce_total(self, h, targets):
        """Summed cross-entropy of hidden states ``h`` ``[B, T, hidden]`` against ``targets`` ``[B, T]``."""
        targets = targets.flatten()
        h = h.flatten(0, 1)
        rows = max(1, LOSS_CHUNK_LOGITS // self.config.vocab_size)
        total = h.new_zeros((), dtype=torch.promote_types(self.lm_head.weight.dtype, torch.float32))
        for a in range(0, h.shape[0], rows):
            hc, tc = h[a:a + rows], targets[a:a + rows]
            if torch.is_grad_enabled() and hc.requires_grad and h.shape[0] > rows:
                total = total + checkpoint(self._ce_sum, hc, tc, use_reentrant=False)
            else:
                total = total + self._ce_sum(hc, tc)
        return total

    def _ce_sum(self, h, targets):
        logits = self.lm_head(h)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")

    # ---- generation ---------------------------------------------------------------------------
    @torch.no_grad()
    def stream_generate(self, prompts, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                        top_p: float | None = None, eos_token_id: int | None = None,
                        generator: torch.Generator | None = None, vocab_limit: int | None = None,
                        cuda_graph: bool | None = None, paged: bool = False) -> Iterator[torch.Tensor]:
        """Yields, after each decoding step, the int64 ``[N]`` tokens just generated, on the model's
        device (``-1`` for a sequence that had already produced ``eos_token_id``). Arguments as in
        :meth:`generate`."""
        prompts = self._check_generate(prompts, max_new_tokens, temperature, top_k, top_p, eos_token_id,
                                       vocab_limit)
        dev = self.embed.weight.device
        if cuda_graph is None:
            cuda_graph = dev.type == "cuda"
        elif not isinstance(cuda_graph, bool) or (cuda_graph and dev.type != "cuda"):
            raise ValueError(f"cuda_graph: expected None, False, or True for a model on a CUDA device; got "
                             f"{cuda_graph!r} with the model on {dev}")
        if not isinstance(paged, bool) or (paged and self.config.attention != "nsa"):
            raise ValueError(f"paged: expected a bool, True only for attention='nsa'; got {paged!r} with "
                             f"attention={self.config.attention!r}")
        if max_new_tokens == 0:
            return
        lens = [p.numel() for p in prompts]
        cu = torch.tensor([0] + lens, device=dev).cumsum(0).to(torch.int32)
        ids = torch.cat(prompts).to(dev).unsqueeze(0)
        # paged: a pool of exactly the pages the prompts and the new tokens fill
        bs = self.config.block_size
        cache = self.new_cache(sum(-(-(n + max_new_tokens - 1) // bs) for n in lens) if paged else None)
        # The prefill (the forward's input checks, then the LM head on each prompt's last token only).
        self._check_ids(ids, cu, None)
        logits = self.lm_head(self._hidden(ids, cu, cache)[0, (cu[1:] - 1).long()])  # [N, vocab]
        # Room for every step now: the steps then have fixed shapes (a CUDA graph replays them).
        cache.make_static(max_new_tokens - 1)
        step = _DecodeSteps(self, cache, cuda_graph)
        done = torch.zeros(len(prompts), dtype=torch.bool, device=dev)
        for n in range(max_new_tokens):
            if vocab_limit is not None:
                logits = logits[:, :vocab_limit]
            token = _sample(logits.float(), temperature, top_k, top_p, generator)
            out = token.masked_fill(done, -1)
            yield out
            if eos_token_id is not None:
                done |= token == eos_token_id
                if bool(done.all()):
                    return
            if n + 1 < max_new_tokens:
                logits = step(token)

    def generate(self, prompts, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, eos_token_id: int | None = None,
                 generator: torch.Generator | None = None,
                 callback: Callable[[torch.Tensor], None] | None = None,
                 vocab_limit: int | None = None, cuda_graph: bool | None = None,
                 paged: bool = False) -> list[torch.Tensor]:
        """Continue each prompt by up to ``max_new_tokens`` tokens, with the decoding cache.

        Args:
            prompts: a list of N prompts of any lengths >= 1 (each a 1-D int tensor or a list of
                ints) — no padding needed: they are prefilled packed — or an int ``[N, T]``
                tensor of N prompts of the same length.
            max_new_tokens: tokens to generate per prompt (>= 0).
            temperature: 0 is greedy (argmax); > 0 samples from ``softmax(logits / temperature)``.
            top_k: keep the k most likely tokens before sampling; top_p: keep the smallest set of
                tokens whose probability reaches p (nucleus sampling).
            eos_token_id: a sequence stops after producing it (it is included in the output).
            generator: a ``torch.Generator`` on the model's device for reproducible sampling.
            callback: called after every step with the ``[N]`` tokens of the step
                (see :meth:`stream_generate`): streams the output.
            vocab_limit: generate only ids below it (a tokenizer with fewer ids than the model's
                vocabulary, which ``nsa train`` rounds up to a multiple of 64).
            cuda_graph: replay the decoding steps from CUDA graphs: no per-step launch work on
                the host. A step that completes a compression block in some sequence (NSA) and
                one that completes none are two graphs; each kind of step runs eagerly the
                first time (compiling its kernels) and is captured the second time. Default: on
                when the model is on a CUDA device. Either way the cache is allocated for all the
                steps after the prefill (prompt + max_new_tokens).
            paged: decode from a :class:`nsa.PagedNSACache` per layer (``attention='nsa'``; pages of
                ``block_size`` tokens, each sequence holding only the pages its tokens fill, no
                padding to the longest) instead of the dense cache.
        Returns:
            a list of N int64 tensors on the model's device: the generated tokens (prompts excluded;
            prompts may live on any device).
        """
        outs = []
        for step_tokens in self.stream_generate(prompts, max_new_tokens, temperature, top_k, top_p, eos_token_id,
                                                generator, vocab_limit, cuda_graph, paged):
            outs.append(step_tokens)
            if callback is not None:
                callback(step_tokens)
        if not outs:
            n = len(prompts)
            return [torch.empty(0, dtype=torch.long, device=self.embed.weight.device) for _ in range(n)]
        steps = torch.stack(outs, 1)  # [N, steps]
        return [row[row >= 0] for row in steps]

    def _decode_logits(self, tokens, cache):
        """One decoding step, ``tokens [N]`` -> logits ``[N, vocab]``: the forward without its
        input checks (the tokens are the sampler's; the checks would read them on the host)."""
        x = self.embed(tokens.view(-1, 1))
        for block, layer_cache in zip(self.blocks, cache.layers):
            x = block(x, cache=layer_cache)
        return self.lm_head(self.norm(x))[:, 0]

    def _check_generate(self, prompts, max_new_tokens, temperature, top_k, top_p, eos_token_id, vocab_limit=None):
        V = self.config.vocab_size
        if vocab_limit is not None and (isinstance(vocab_limit, bool) or not isinstance(vocab_limit, int)
                                        or not 1 <= vocab_limit <= V):
            raise ValueError(f"vocab_limit: expected None or an int in [1, {V}], got {vocab_limit!r}")
        if isinstance(prompts, torch.Tensor):
            if prompts.dim() != 2 or prompts.shape[1] == 0 or prompts.shape[0] == 0:
                raise ValueError(f"prompts: expected an int tensor [N, T] with N, T >= 1 or a list of prompts, "
                                 f"got shape {tuple(prompts.shape)}")
            prompts = list(prompts)
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise ValueError(f"prompts: expected a non-empty list of prompts or an [N, T] tensor, "
                             f"got {type(prompts).__name__}")
        out = []
        for i, p in enumerate(prompts):
            t = p if isinstance(p, torch.Tensor) else torch.tensor(p, dtype=torch.long)
            if t.dim() != 1 or t.numel() == 0 or t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
                raise ValueError(f"prompts[{i}]: expected a non-empty 1-D sequence of token ids, got "
                                 f"{tuple(t.shape)} {t.dtype}")
            t = t.long()
            if int(t.min()) < 0 or int(t.max()) >= V:
                raise ValueError(f"prompts[{i}]: token ids must lie in [0, {V})")
            out.append(t)
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens: expected an int >= 0, got {max_new_tokens!r}")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature >= 0 \
                or math.isinf(temperature):
            raise ValueError(f"temperature: expected a finite number >= 0, got {temperature!r}")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"top_k: expected None or an int >= 1, got {top_k!r}")
        if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float))
                                  or not 0 < top_p <= 1):
            raise ValueError(f"top_p: expected None or a number in (0, 1], got {top_p!r}")
        if eos_token_id is not None and (isinstance(eos_token_id, bool) or not isinstance(eos_token_id, int)
                                         or not 0 <= eos_token_id < V):
            raise ValueError(f"eos_token_id: expected None or a token id in [0, {V}), got {eos_token_id!r}")
        return out

    # ---- persistence ----------------------------------------------------------------------------
    def save_pretrained(self, directory: str | os.PathLike):
        """Write ``model.safetensors`` (weights; a tied LM head stored once) and ``config.json``."""
        from safetensors.torch import save_model

        os.makedirs(directory, exist_ok=True)
        save_model(self, os.path.join(directory, "model.safetensors"))
        with open(os.path.join(directory, "config.json"), "w") as f:
            json.dump(self.config.to_dict(), f, indent=2)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, device: str | torch.device | None = None,
                        **overrides) -> "LanguageModel":
        """A model from :meth:`save_pretrained`'s directory, in float32 whatever dtype the weights
        were saved in, moved to ``device`` (default: CPU). ``overrides`` change config fields that
        do not change parameter shapes, e.g. ``backend``. Weights that do not fit the config are a
        ValueError."""
        from safetensors.torch import load_model

        path = os.path.join(directory, "config.json")
        if not os.path.isfile(path):
            raise ValueError(f"directory: {directory} holds no config.json (not a saved LanguageModel)")
        with open(path) as f:
            config = ModelConfig.from_dict(json.load(f)).replace(**overrides)
        model = cls(config)
        weights = os.path.join(directory, "model.safetensors")
        if not os.path.isfile(weights):
            raise ValueError(f"directory: {directory} holds no model.safetensors")
        try:
            load_model(model, weights, strict=True, device="cpu")
        except RuntimeError as e:
            raise ValueError(f"directory: the weights in {weights} do not fit the config ({e})") from None
        return model.to(device) if device is not None else model


class _DecodeSteps:
    """The decoding steps of one generation: ``step(tokens [N])`` -> logits ``[N, vocab]`` of the
    model on a static cache (:meth:`ModelCache.make_static`). There are two kinds of step: one in
    which some sequence completes a compression block (1 in ``stride`` steps per sequence: the
    layers compress), and one in which none does, known on the host from the cache's lengths.
    With ``cuda_graph`` each kind runs eagerly the first time (it compiles and autotunes its
    kernels), is captured in a CUDA graph the second time, and is a replay from then on, with the
    new tokens copied into that graph's input; the returned logits are the graph's output tensor,
    overwritten by its next replay."""

    def __init__(self, model, cache, cuda_graph):
        self.model, self.cache, self.cuda_graph = model, cache, cuda_graph
        self.graphs = {}  # kind of step -> (graph, tokens, logits)
        self.runs = {}  # kind of step -> steps of that kind so far

    def __call__(self, tokens):
        if not self.cuda_graph:
            return self.model._decode_logits(tokens, self.cache)
        kind = any(c.next_step_compresses() for c in self.cache.layers)
        self.runs[kind] = self.runs.get(kind, 0) + 1
        if self.runs[kind] == 1:
            return self.model._decode_logits(tokens, self.cache)
        if kind not in self.graphs:
            held = tokens.clone()
            lengths = [list(c.lengths) for c in self.cache.layers]
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                logits = self.model._decode_logits(held, self.cache)
            # Capturing ran no kernel: the host lengths, which the capture advanced, go back.
            for c, old in zip(self.cache.layers, lengths):
                c.lengths = old
            self.graphs[kind] = graph, held, logits
        graph, held, logits = self.graphs[kind]
        held.copy_(tokens)
        for c in self.cache.layers:
            c._check_static_room()
            c.lengths = [n + 1 for n in c.lengths]
        graph.replay()
        return logits


def _sample(logits, temperature, top_k, top_p, generator):
    """Next tokens ``[N]`` from float32 logits ``[N, vocab]``."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = logits.sort(-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the tokens strictly more likely already reach top_p (the first always stays).
        drop = probs.cumsum(-1) - probs >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)
