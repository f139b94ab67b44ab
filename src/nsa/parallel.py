"""Context parallelism: one sequence split over the ranks of a ``torch.distributed`` process group.

Each rank holds a share of the positions of every sequence (:class:`SequenceShards`) and runs
everything that works token by token (embeddings, projections, MLPs, norms, the loss) on its
share only. Attention needs keys from the whole prefix; an NSA layer given a
:class:`ContextParallel` (``layer(x_local, context=cp)``):

- projects its own tokens, rotates them at their global positions;
- all-gathers the raw keys/values of every branch (one collective; its backward returns every
  rank's gradient of a key to the rank that holds it: a reduce-scatter on NCCL, an all-reduce
  elsewhere);
- compresses the whole sequences' blocks (phi on every rank: simple, at the cost of repeating
  the compression's small GEMMs on every rank);
- attends with its own queries only: each local run of queries is the last positions of the
  keys before it (:func:`nsa.ops.nsa` with ``cu_seqlens_k``), so the attention work of a rank is
  that of its queries.

Load balance: causal attention makes late positions dearer (the compressed branch reads every
earlier compressed token), so the positions are cut into ``2 * P`` chunks and rank ``r`` holds
chunks ``r`` and ``2P - 1 - r`` (``balanced=True``, the default).

Packed documents (``cu_seqlens``) may cross rank boundaries; attention never crosses documents.
Dense batches split every row the same way. Communication uses PyTorch's collectives (NCCL on
GPUs, gloo on CPU).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .ops.utils import compressed_cu_seqlens, num_compressed

__all__ = ["SequenceShards", "ContextParallel"]


def _chunk_bounds(T: int, pieces: int) -> list[int]:
    return [(i * T) // pieces for i in range(pieces + 1)]


class SequenceShards:
    """Which positions of the sequences each of ``world_size`` ranks holds.

    Args:
        length: T, the tokens of every row of a dense ``[B, T]`` batch, or the packed total of
            ``[1, total]`` input with ``cu_seqlens``.
        world_size: P, the ranks of the context-parallel group.
        cu_seqlens: int32 ``[N+1]`` document boundaries of packed input (host values are read
            once here), or None.
        balanced: cut into 2P chunks, rank r holding chunks r and 2P-1-r (default); False: P
            contiguous chunks.

    Attributes (host lists, per rank ``r``): ``chunks[r]`` the ``(start, end)`` position ranges
    rank r holds, in its local order; ``counts[r]`` its number of positions per row.
    """

    def __init__(self, length: int, world_size: int, cu_seqlens: torch.Tensor | None = None, balanced: bool = True):
        if isinstance(length, bool) or not isinstance(length, int) or length < 1:
            raise ValueError(f"length: expected an int >= 1, got {length!r}")
        if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"world_size: expected an int >= 1, got {world_size!r}")
        pieces = 2 * world_size if balanced else world_size
        if length < pieces:
            raise ValueError(f"length: {length} tokens cannot be cut into {pieces} non-empty chunks for "
                             f"{world_size} ranks{' (balanced: 2 per rank)' if balanced else ''}")
        if cu_seqlens is not None:
            if (not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dtype != torch.int32
                    or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2):
                raise ValueError("cu_seqlens: expected an int32 1-D tensor of N+1 >= 2 offsets")
            cu = cu_seqlens.tolist()
            if cu[0] != 0 or cu[-1] != length or any(b <= a for a, b in zip(cu[:-1], cu[1:])):
                raise ValueError(f"cu_seqlens: expected strictly increasing offsets from 0 to length={length}, "
                                 f"got {cu}")
            self.docs = list(zip(cu[:-1], cu[1:]))
        else:
            self.docs = [(0, length)]
        self.length, self.world_size, self.balanced = length, world_size, balanced
        b = _chunk_bounds(length, pieces)
        ranges = list(zip(b[:-1], b[1:]))
        if balanced:
            self.chunks = [[ranges[r], ranges[pieces - 1 - r]] for r in range(world_size)]
        else:
            self.chunks = [[ranges[r]] for r in range(world_size)]
        self.counts = [sum(e - s for s, e in ch) for ch in self.chunks]

    def local_positions(self, rank: int) -> torch.Tensor:
        """int64 ``[counts[rank]]``: the positions (along the sequence / packed dim) rank holds, in
        its local order."""
        return torch.cat([torch.arange(s, e) for s, e in self.chunks[rank]])

    def shard(self, x: torch.Tensor, rank: int, dim: int = 1) -> torch.Tensor:
        """Rank's share of ``x`` (positions along ``dim``)."""
        if x.shape[dim] != self.length:
            raise ValueError(f"x: expected {self.length} positions along dim {dim}, got {tuple(x.shape)}")
        return x.index_select(dim, self.local_positions(rank).to(x.device))

    def unshard(self, parts: list[torch.Tensor], dim: int = 1) -> torch.Tensor:
        """The whole from every rank's share (``parts[r]`` of rank r), positions in order."""
        pos = torch.cat([self.local_positions(r) for r in range(self.world_size)])
        whole = torch.cat(parts, dim)
        return whole.index_select(dim, torch.argsort(pos).to(whole.device))

    def doc_positions(self, rank: int) -> torch.Tensor:
        """int64 ``[counts[rank]]``: each local token's position inside its own document (RoPE)."""
        pos = self.local_positions(rank)
        starts = torch.tensor([a for a, _ in self.docs])
        doc = torch.searchsorted(starts, pos, right=True) - 1
        return pos - starts[doc]


class ContextParallel:
    """The context-parallel state of one rank for one batch: its group, its shards, and the
    index plans its attention layers share (built once per batch: pass the same object to every
    layer of a model).

    Args:
        shards: :class:`SequenceShards` of the batch.
        group: the process group of the context-parallel ranks (default: the world); its size
            must be ``shards.world_size``.
        batch: B, rows of a dense batch (1 for packed input).
        device: where the index plans live (the activations' device).
    """

    def __init__(self, shards: SequenceShards, group=None, batch: int = 1, device=None):
        if not dist.is_available() or not dist.is_initialized():
            raise ValueError("group: context parallelism needs an initialized torch.distributed process group")
        P = dist.get_world_size(group)
        if P != shards.world_size:
            raise ValueError(f"shards: built for {shards.world_size} ranks, the group has {P}")
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise ValueError(f"batch: expected an int >= 1, got {batch!r}")
        if batch > 1 and len(shards.docs) > 1:
            raise ValueError("batch: packed documents (cu_seqlens) take batch size 1")
        self.shards, self.group, self.batch = shards, group, batch
        self.rank = dist.get_rank(group)
        self.device = torch.device("cpu") if device is None else torch.device(device)
        self._plan(device=self.device)

    def _plan(self, device):
        sh, B, T = self.shards, self.batch, self.shards.length
        P = sh.world_size
        self.n_local = sh.counts[self.rank]
        self.n_max = max(sh.counts)
        # the gathered rows [P * n_max] (row-major: rank, then its local flattened row b * n + j)
        # -> the flattened [B * T] rows of the whole batch
        src = torch.empty(B * T, dtype=torch.long)
        for r in range(P):
            pos = sh.local_positions(r)
            for b in range(B):
                src[b * T + pos] = r * self.n_max * B + b * len(pos) + torch.arange(len(pos))
        self.gather_index = src.to(device)
        self.positions = sh.doc_positions(self.rank).to(device).unsqueeze(0)  # [1, n_local]
        # documents: the rows of a dense batch, or the packed ones
        docs = [(b * T, (b + 1) * T) for b in range(B)] if B > 1 else list(sh.docs)
        self.doc_cu = torch.tensor([0] + [e for _, e in docs], dtype=torch.int32)
        # attention pieces: per row, per local chunk, per document it meets; queries are the local
        # rows in order, keys the document's positions up to the chunk's end
        self._pieces = []  # (document, its first row, the piece's first query row, its end) in [B * T] rows
        for b in range(B):
            for s, e in sh.chunks[self.rank]:
                for d, (a, z) in enumerate(docs):
                    lo, hi = max(a, b * T + s), min(z, b * T + e)
                    if lo < hi:
                        self._pieces.append((d, a, lo, hi))
        cu_q, cu_k, key_rows = [0], [0], []
        for d, a, lo, hi in self._pieces:
            cu_q.append(cu_q[-1] + hi - lo)
            cu_k.append(cu_k[-1] + hi - a)
            key_rows.append(torch.arange(a, hi))
        self.cu_q = torch.tensor(cu_q, dtype=torch.int32, device=device)
        self.cu_k = torch.tensor(cu_k, dtype=torch.int32, device=device)
        self.key_index = torch.cat(key_rows).to(device)
        self.doc_cu = self.doc_cu.to(device)
        self._cmp_index = {}

    def compressed_index(self, kernel_size: int, stride: int) -> torch.Tensor:
        """Rows of the whole batch's packed compressed tokens that every piece's keys hold (the
        compressed tokens of its document's prefix)."""
        key = (kernel_size, stride)
        if key not in self._cmp_index:
            ccu = compressed_cu_seqlens(self.doc_cu.cpu(), kernel_size, stride).tolist()
            rows = [torch.arange(ccu[d], ccu[d] + num_compressed(hi - a, kernel_size, stride))
                    for d, a, lo, hi in self._pieces]
            self._cmp_index[key] = torch.cat(rows).to(self.device)
        return self._cmp_index[key]

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """The whole batch's rows ``[B * T, ...]`` from every rank's local ``[B, n_local, ...]``
        (differentiable: the gradient of a row returns to the rank holding it)."""
        B, n = x.shape[:2]
        if (B, n) != (self.batch, self.n_local):
            raise ValueError(f"x: expected [B={self.batch}, {self.n_local} local positions, ...], got "
                             f"{tuple(x.shape)}")
        flat = x.reshape(B * n, *x.shape[2:])
        if n < self.n_max:
            flat = torch.cat([flat, flat.new_zeros(B * (self.n_max - n), *flat.shape[1:])])
        rows = _AllGatherRows.apply(flat, self.group)  # [P * B * n_max, ...]
        return rows.index_select(0, self.gather_index)


class _AllGatherRows(torch.autograd.Function):
    """Every rank's ``[R, ...]`` rows concatenated in rank order; the backward sums every rank's
    gradient of a row and hands it to the rank that holds the row."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        x = x.contiguous()
        P = dist.get_world_size(group)
        out = x.new_empty(P * x.shape[0], *x.shape[1:])
        if dist.get_backend(group) == dist.Backend.NCCL:
            dist.all_gather_into_tensor(out, x, group=group)
        else:
            dist.all_gather(list(out.chunk(P)), x, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        group = ctx.group
        P, r = dist.get_world_size(group), dist.get_rank(group)
        grad = grad.contiguous()
        if dist.get_backend(group) == dist.Backend.NCCL:
            out = grad.new_empty(grad.shape[0] // P, *grad.shape[1:])
            dist.reduce_scatter_tensor(out, grad, group=group)
            return out, None
        dist.all_reduce(grad, group=group)  # gloo has no reduce-scatter
        return grad.chunk(P)[r].contiguous(), None
