"""A paged decoding cache for one NSA layer: raw keys/values in fixed pages of ``block_size``
tokens (NSA's selection block, so a selected block is one page), a page table per sequence, a
free list, reference-counted pages shared by forked sequences (copy-on-write of the last partial
page). Sequences are added, extended (decoding steps, chunk appends) and removed without copying
the pages of any other sequence.

Layout (``P = num_pages``, ``bs = block_size``):

- ``k_slc, v_slc``: ``[P, bs, H, Dk|Dv]`` pages of rotated selection-branch keys / values; raw
  position p of a sequence lives at ``(page_table[p // bs], p % bs)``. ``k_win, v_win``: the same
  for the window branch (the very same tensors when the layer shares them).
- ``k_cmp, v_cmp``: ``[P, bs // stride, H, Dk|Dv]`` compressed keys (rotated) / values, paged
  with the raw tokens: compressed token i covers raw positions ``[i*stride, i*stride + kernel_size)``
  and lives in the page holding its last position ``e = i*stride + kernel_size - 1``, at slot
  ``(e % bs) // stride``. A sequence's compressed tokens therefore come, read through its page
  table, as one flat run in which token i sits at ``i + kernel_size // stride - 1``; they are
  written when the token completing their block is (only the new block is compressed), shared
  and copied with that page, and freed with it.
- ``k_tail, v_tail``: ``[N, kernel_size, H, Dk|Dv]`` per row, the last ``kernel_size`` raw
  compression-branch tokens (un-rotated) in a ring (position p at slot ``p % kernel_size``), as in
  :class:`nsa.cache.NSACache`: all that future compressed tokens need.

Rows and ids: the cache's rows are the batch rows of the layer's input; each row is a sequence
with a stable integer id (:attr:`seq_ids`), returned by :meth:`add` / :meth:`fork`. Removing or
reordering sequences re-indexes the small per-row state (lengths, the ``kernel_size``-token ring,
the page lists); pages are never copied except by copy-on-write.

The pool is fixed: ``num_pages`` pages are allocated at the first write (when the head count,
head dims, dtype and device become known) and never grown. A write that needs a page when none is
free raises :class:`CacheCapacityError` (a ValueError) naming the sequence, before anything is
written (a step either appends to every sequence or to none).
"""

from __future__ import annotations

import heapq

import torch

from .cache import (CachedTokens, _check_chunk, _no_chunk_when_static, _SequenceCache, cast_attended, check_step_inputs,
                    completing_rows, rotating_step)
from .ops.utils import num_compressed

__all__ = ["PagedNSACache", "CacheCapacityError"]


class CacheCapacityError(ValueError):
    """A write needs more pages than the pool has free. ``seq_id`` names the first sequence that
    could not be served."""

    def __init__(self, message: str, seq_id: int):
        super().__init__(message)
        self.seq_id = seq_id


def _check_int(name, v, lo):
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"{name}: expected an int >= {lo}, got {v!r}")


class PagedNSACache(_SequenceCache):
    """Paged decoding state of one :class:`nsa.NativeSparseAttention` layer (see the module
    docstring for the layout).

    Args:
        kernel_size, stride, block_size: the layer's compression and selection settings
            (``kernel_size % stride == 0``, ``block_size % stride == 0``); see :meth:`for_layer`.
        num_pages: pool size in pages of ``block_size`` tokens (fixed: the pool never grows).

    Use with the layer: ``cache = PagedNSACache.for_layer(layer.config, num_pages)``;
    ``layer(x, cache=cache)`` on an empty cache prefills (one sequence per row or packed
    sequence), on a filled one appends ``x`` to every row (one token: a decoding step; more: a
    chunk, also packed with ``cu_seqlens`` for chunks of different lengths, 0 allowed).
    :meth:`add` registers new empty sequences (filled by the next chunk), :meth:`remove` drops
    sequences (pages back to the free list), :meth:`fork` copies a sequence by sharing its pages,
    :meth:`reorder` permutes the rows.
    """

    def __init__(self, kernel_size: int, stride: int, block_size: int, num_pages: int):
        for name, v in (("kernel_size", kernel_size), ("stride", stride), ("block_size", block_size),
                        ("num_pages", num_pages)):
            _check_int(name, v, 1)
        if kernel_size % stride:
            raise ValueError(f"kernel_size: must be a multiple of stride ({stride}), got {kernel_size}")
        if block_size % stride:
            raise ValueError(f"block_size: must be a multiple of stride ({stride}), got {block_size}")
        self.kernel_size, self.stride, self.block_size, self.num_pages = kernel_size, stride, block_size, num_pages
        self.reset()

    @classmethod
    def for_layer(cls, config, num_pages: int) -> "PagedNSACache":
        """An empty cache for a layer with :class:`nsa.NSAConfig` ``config``."""
        return cls(config.kernel_size, config.stride, config.block_size, num_pages)

    def make_static(self, new_tokens: int):
        """Prepare decoding steps that a CUDA graph can replay (see :meth:`nsa.NSACache.make_static`):
        every sequence takes now the pages for ``new_tokens`` more tokens (:class:`CacheCapacityError`
        when the pool lacks them; a shared last page is copied first), the page table is fixed,
        and a step finds its pages on the device. Until :meth:`reset`, a step past them and every
        change of the rows or pages (add, remove, fork, reorder, a chunk) are a ValueError."""
        if self.is_empty or not self._allocated:
            raise ValueError("cache: make_static needs a prefilled cache")
        if isinstance(new_tokens, bool) or not isinstance(new_tokens, int) or new_tokens < 0:
            raise ValueError(f"new_tokens: expected an int >= 0, got {new_tokens!r}")
        self._reserve([new_tokens] * self.batch_size)
        self._static_ends = [L + new_tokens for L in self.lengths]
        self._static_table  # noqa: B018 (built now with its int32 source, then kept: a graph holds both)
        self.static = True

    def _check_static_room(self):
        if not self.static:
            return
        full = [r for r, (L, end) in enumerate(zip(self.lengths, self._static_ends)) if L + 1 > end]
        if full:
            raise ValueError(f"cache: sequence {self.seq_ids[full[0]]} holds {self.lengths[full[0]]} tokens, all its "
                             f"static pages (make_static) are full")

    def _not_static(self, what):
        if self.static:
            raise ValueError(f"cache: {what} changes the rows or pages, which a static cache (make_static) keeps "
                             f"fixed; reset() ends the static mode")

    def reset(self):
        """Forget every sequence and drop the pool (the next write allocates it again)."""
        self.lengths: list[int] = []
        self.seq_ids: list[int] = []
        self._pages: list[list[int]] = []  # per row: page ids in position order
        self._refs = [0] * self.num_pages
        self._free = list(range(self.num_pages))  # a heap: the lowest free page is taken first
        self._next_id = 0
        self.completed: list[int] = []
        self.seq_lens: torch.Tensor | None = None
        self._table = None
        self._table_long = None  # the int64 copy static steps index with (see _static_table)
        self._arange = None  # int64 arange(N) on the device (_all_rows)
        # Pools and rings: created by the first write (they take its shapes, dtype and device).
        self.k_slc = self.v_slc = self.k_win = self.v_win = self.k_cmp = self.v_cmp = None
        self.k_tail = self.v_tail = None
        self.shared = False
        self.static = False

    # ---- bookkeeping ----------------------------------------------------------------------------
    @property
    def num_free_pages(self) -> int:
        """Pages on the free list."""
        return len(self._free)

    def pages_of(self, seq_id: int) -> list[int]:
        """The page ids of sequence ``seq_id`` in position order (a copy)."""
        return list(self._pages[self._row(seq_id)])

    def _row(self, seq_id):
        if isinstance(seq_id, bool) or not isinstance(seq_id, int) or seq_id not in self.seq_ids:
            raise ValueError(f"seq_ids: no cached sequence with id {seq_id!r} (have {self.seq_ids})")
        return self.seq_ids.index(seq_id)

    @property
    def _allocated(self) -> bool:
        return self.k_slc is not None

    @property
    def page_table(self) -> torch.Tensor:
        """int32 ``[N, M]`` on the cache's device: row n's pages in position order, padded with
        page 0 (never read: positions past ``seq_lens[n]`` are masked). ``M >= 1``. Rebuilt from the
        host lists only when a page list changed."""
        if self._table is None:
            M = max([1] + [len(p) for p in self._pages])
            rows = [p + [0] * (M - len(p)) for p in self._pages]
            self._table = torch.tensor(rows, dtype=torch.int32).view(len(rows), M).to(self.k_slc.device)
            self._table_long = None
        return self._table

    @property
    def _static_table(self) -> torch.Tensor:
        """int64 copy of :attr:`page_table` that static steps index the pools with: made once (by
        :meth:`make_static`) and kept while the table is, so a step converts nothing and a CUDA
        graph sees the same tensor every step; dropped when the table is rebuilt or by :meth:`reset`."""
        table = self.page_table
        if self._table_long is None:
            self._table_long = table.long()
        return self._table_long

    def _set_rows(self, order):
        """Keep rows ``order`` (host row indices, no repeats), in that order."""
        self.lengths = [self.lengths[i] for i in order]
        self.seq_ids = [self.seq_ids[i] for i in order]
        self._pages = [self._pages[i] for i in order]
        if self._allocated:
            idx = torch.tensor(order, dtype=torch.long).to(self.k_slc.device)
            self.k_tail, self.v_tail = self.k_tail[idx], self.v_tail[idx]
            self.seq_lens = self.seq_lens[idx]
        self._table = None
        self.completed = []

    def add(self, count: int = 1) -> list[int]:
        """Register ``count`` new empty sequences as the last rows; returns their ids. The next call
        of the layer must give them their prompt as a chunk (with ``cu_seqlens``: any length, 0
        for sequences that do not advance)."""
        _check_int("count", count, 1)
        self._not_static("add")
        ids = list(range(self._next_id, self._next_id + count))
        self._next_id += count
        self.lengths += [0] * count
        self.seq_ids += ids
        self._pages += [[] for _ in range(count)]
        if self._allocated:
            self.k_tail = torch.cat([self.k_tail, self.k_tail.new_zeros(count, *self.k_tail.shape[1:])])
            self.v_tail = torch.cat([self.v_tail, self.v_tail.new_zeros(count, *self.v_tail.shape[1:])])
            self.seq_lens = torch.cat([self.seq_lens, self.seq_lens.new_zeros(count)])
        self._table = None
        return ids

    def remove(self, seq_ids) -> None:
        """Drop sequences ``seq_ids`` (an id or a list of distinct ids); their pages go back to the
        free list once no fork shares them. Other rows keep their order and their pages."""
        self._not_static("remove")
        ids = [seq_ids] if isinstance(seq_ids, int) and not isinstance(seq_ids, bool) else list(seq_ids)
        rows = [self._row(i) for i in ids]
        if len(set(rows)) != len(rows):
            raise ValueError(f"seq_ids: repeated ids in {ids}")
        for r in rows:
            for p in self._pages[r]:
                self._release(p)
        drop = set(rows)
        self._set_rows([r for r in range(self.batch_size) if r not in drop])

    def fork(self, src: int, n: int = 1) -> list[int]:
        """``n`` copies of sequence ``src`` as new last rows, sharing its pages (reference counted;
        the last partial page is copied when a copy first writes to it). Returns the new ids."""
        self._not_static("fork")
        r = self._row(src)
        _check_int("n", n, 1)
        ids = list(range(self._next_id, self._next_id + n))
        self._next_id += n
        for p in self._pages[r]:
            self._refs[p] += n
        self.lengths += [self.lengths[r]] * n
        self.seq_ids += ids
        self._pages += [list(self._pages[r]) for _ in range(n)]
        if self._allocated:
            self.k_tail = torch.cat([self.k_tail, self.k_tail[r:r + 1].expand(n, *self.k_tail.shape[1:])])
            self.v_tail = torch.cat([self.v_tail, self.v_tail[r:r + 1].expand(n, *self.v_tail.shape[1:])])
            self.seq_lens = torch.cat([self.seq_lens, self.seq_lens[r:r + 1].expand(n)])
        self._table = None
        return ids

    def reorder(self, seq_ids) -> None:
        """Put the rows in the order ``seq_ids`` (a permutation of :attr:`seq_ids`). Beam search:
        :meth:`fork` the beams kept more than once, :meth:`remove` the dropped ones, then reorder."""
        self._not_static("reorder")
        ids = list(seq_ids)
        if sorted(ids, key=repr) != sorted(self.seq_ids, key=repr) or len(set(ids)) != len(ids):
            raise ValueError(f"seq_ids: expected a permutation of the cached ids {self.seq_ids}, got {ids}")
        self._set_rows([self.seq_ids.index(i) for i in ids])

    def _release(self, p):
        self._refs[p] -= 1
        if self._refs[p] == 0:
            heapq.heappush(self._free, p)

    def _take(self):
        p = heapq.heappop(self._free)
        self._refs[p] = 1
        return p

    def _pools(self):
        names = ["k_slc", "v_slc", "k_cmp", "v_cmp"] + ([] if self.shared else ["k_win", "v_win"])
        return [getattr(self, n) for n in names]

    def _reserve(self, chunk):
        """Make room for ``chunk[n]`` more tokens in every row: check the free list first (raise
        naming the first sequence that cannot be served, having changed nothing), then take new
        pages and copy shared last pages that will be written (copy-on-write)."""
        bs = self.block_size
        need = 0
        plan = []
        for r, (L, c) in enumerate(zip(self.lengths, chunk)):
            if c == 0:
                plan.append((0, False))
                continue
            pages = self._pages[r]
            cow = L % bs != 0 and self._refs[pages[-1]] > 1
            new = -(-(L + c) // bs) - len(pages)
            need += new + cow
            if need > len(self._free):
                raise CacheCapacityError(
                    f"cache: sequence {self.seq_ids[r]} needs {new + cow} more page(s) of {bs} tokens to grow from "
                    f"{L} to {L + c} tokens, but only {len(self._free) - (need - new - cow)} of the pool's "
                    f"{self.num_pages} pages are free (remove finished sequences or build a larger pool)",
                    self.seq_ids[r])
            plan.append((new, cow))
        for r, (new, cow) in enumerate(plan):
            pages = self._pages[r]
            if cow:
                old, p = pages[-1], self._take()
                for t in self._pools():
                    t[p] = t[old]
                self._release(old)
                pages[-1] = p
            pages.extend(self._take() for _ in range(new))
            if new or cow:
                self._table = None

    def _allocate(self, k_cmp_raw, v_cmp_raw, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win):
        """Create the pools from the first tokens written (their head count, dims, dtype, device)."""
        P, bs, ks = self.num_pages, self.block_size, self.kernel_size
        self.shared = k_win is None
        self.k_slc = k_slc.new_zeros(P, bs, *k_slc.shape[1:])
        self.v_slc = v_slc.new_zeros(P, bs, *v_slc.shape[1:])
        if self.shared:
            self.k_win, self.v_win = self.k_slc, self.v_slc
        else:
            self.k_win = k_win.new_zeros(P, bs, *k_win.shape[1:])
            self.v_win = v_win.new_zeros(P, bs, *v_win.shape[1:])
        self.k_cmp = k_cmp.new_zeros(P, bs // self.stride, *k_cmp.shape[1:])
        self.v_cmp = v_cmp.new_zeros(P, bs // self.stride, *v_cmp.shape[1:])
        N = self.batch_size
        self.k_tail = k_cmp_raw.new_zeros(N, ks, *k_cmp_raw.shape[1:])
        self.v_tail = v_cmp_raw.new_zeros(N, ks, *v_cmp_raw.shape[1:])
        self.seq_lens = torch.tensor(self.lengths, dtype=torch.int32).to(k_slc.device)

    def _writable(self):
        """Tensors made under ``torch.inference_mode()`` are updated in place only inside it."""
        if torch.compiler.is_compiling() or torch.is_inference_mode_enabled() or not self.k_slc.is_inference():
            return
        for name in ("k_slc", "v_slc", "k_cmp", "v_cmp", "k_tail", "v_tail", "seq_lens"):
            setattr(self, name, getattr(self, name).clone())
        if self.shared:
            self.k_win, self.v_win = self.k_slc, self.v_slc
        else:
            self.k_win, self.v_win = self.k_win.clone(), self.v_win.clone()
        self._table = None

    def cast_(self, dtype: torch.dtype):
        """As :meth:`nsa.NSACache.cast_`: the pools attention reads are held in ``dtype`` from now on."""
        if not self._allocated:
            return
        cast_attended(self, dtype)

    # ---- writes ---------------------------------------------------------------------------------
    def _locate(self, rows, positions):
        """Host lists of (page, offset) of raw ``positions`` of ``rows``, as device int64 tensors."""
        bs = self.block_size
        pages = [self._pages[r][p // bs] for r, p in zip(rows, positions)]
        offs = [p % bs for p in positions]
        dev = self.k_slc.device
        return torch.tensor(pages, dtype=torch.long).to(dev), torch.tensor(offs, dtype=torch.long).to(dev)

    def _cmp_slots(self, rows, indices):
        """(page, slot) of compressed tokens ``indices`` of ``rows``."""
        ends = [i * self.stride + self.kernel_size - 1 for i in indices]
        pg, off = self._locate(rows, ends)
        return pg, torch.div(off, self.stride, rounding_mode="floor")

    def prefill(self, lens, k_cmp_raw, v_cmp_raw, k_cmp, v_cmp, k_slc, v_slc, k_win=None, v_win=None):
        """Fill an empty cache from packed prompts (the arguments of :meth:`nsa.NSACache.prefill`):
        adds ``len(lens)`` sequences and appends their prompts (:meth:`extend`)."""
        if not self.is_empty:
            raise ValueError("cache: prefill needs an empty cache (call reset() first)")
        if not lens or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in lens):
            raise ValueError(f"lens: expected a non-empty list of positive ints, got {lens!r}")
        self.add(len(lens))
        try:
            self.extend(list(lens), k_cmp_raw, v_cmp_raw, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win)
        except ValueError:
            self.reset()
            raise

    def extend(self, chunk_lens, k_cmp_raw, v_cmp_raw, k_cmp, v_cmp, k_slc, v_slc, k_win=None, v_win=None):
        """Append ``chunk_lens[n]`` tokens (0 allowed) to every row, with the compressed tokens the
        chunks complete (see :meth:`nsa.NSACache.extend`, same arguments and rules).

        Raises :class:`CacheCapacityError` before writing anything when the free pages do not suffice.
        """
        N = self.batch_size
        if N == 0:
            raise ValueError("cache: extend needs at least one sequence (prefill or add() first)")
        _no_chunk_when_static(self)
        n_new = _check_chunk(self, chunk_lens, k_cmp_raw, v_cmp_raw, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win)
        if not self._allocated:
            self._allocate(k_cmp_raw, v_cmp_raw, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win)
        elif (k_win is None) != self.shared:
            raise ValueError("k_win: must be given iff the cache holds separate window keys")
        self._writable()
        self._reserve(chunk_lens)
        rows = [r for r, c in enumerate(chunk_lens) for _ in range(c)]
        pos = [L + j for L, c in zip(self.lengths, chunk_lens) for j in range(c)]
        pg, off = self._locate(rows, pos)
        self.k_slc[pg, off] = k_slc.detach().to(self.k_slc.dtype)
        self.v_slc[pg, off] = v_slc.detach().to(self.v_slc.dtype)
        if not self.shared:
            self.k_win[pg, off] = k_win.detach().to(self.k_win.dtype)
            self.v_win[pg, off] = v_win.detach().to(self.v_win.dtype)
        ks = self.kernel_size
        dev = self.k_slc.device
        keep = [i for i, (r, p) in enumerate(zip(rows, pos)) if p >= self.lengths[r] + chunk_lens[r] - ks]
        if keep:
            kt = torch.tensor(keep, dtype=torch.long).to(dev)
            tr = torch.tensor([rows[i] for i in keep], dtype=torch.long).to(dev)
            ts = torch.tensor([pos[i] % ks for i in keep], dtype=torch.long).to(dev)
            self.k_tail[tr, ts] = k_cmp_raw.detach()[kt].to(self.k_tail.dtype)
            self.v_tail[tr, ts] = v_cmp_raw.detach()[kt].to(self.v_tail.dtype)
        crow = [r for r, n in enumerate(n_new) for _ in range(n)]
        cidx = [num_compressed(self.lengths[r], ks, self.stride) + j for r, n in enumerate(n_new) for j in range(n)]
        if crow:
            cp, cs = self._cmp_slots(crow, cidx)
            self.k_cmp[cp, cs] = k_cmp.detach().to(self.k_cmp.dtype)
            self.v_cmp[cp, cs] = v_cmp.detach().to(self.v_cmp.dtype)
        self.lengths = [L + c for L, c in zip(self.lengths, chunk_lens)]
        self.seq_lens = torch.tensor(self.lengths, dtype=torch.int32).to(dev)
        self.completed = []

    def append(self, k_cmp_raw, v_cmp_raw, k_slc, v_slc, k_win=None, v_win=None) -> torch.Tensor:
        """One token per sequence (a decoding step); as :meth:`nsa.NSACache.append` (same arguments,
        same return: the rows whose new token completed a compression block, also on the host as
        :attr:`completed`). Raises :class:`CacheCapacityError` before writing when a needed page is
        not free."""
        self._begin_step(k_cmp_raw, v_cmp_raw, k_slc, v_slc, k_win, v_win)
        N = self.batch_size
        r = self._all_rows()
        if self.static:  # the pages are taken: find them on the device
            pos = self.seq_lens.long()
            pg, off = self._static_table[r, pos // self.block_size], pos % self.block_size
        else:
            pg, off = self._locate(list(range(N)), self.lengths)
        self.k_slc[pg, off] = k_slc.detach().to(self.k_slc.dtype)
        self.v_slc[pg, off] = v_slc.detach().to(self.v_slc.dtype)
        if not self.shared:
            self.k_win[pg, off] = k_win.detach().to(self.k_win.dtype)
            self.v_win[pg, off] = v_win.detach().to(self.v_win.dtype)
        slot = self.seq_lens.long() % self.kernel_size
        self.k_tail[r, slot] = k_cmp_raw.detach().to(self.k_tail.dtype)
        self.v_tail[r, slot] = v_cmp_raw.detach().to(self.v_tail.dtype)
        return self._end_step()

    def append_rotating(self, q, theta: float, k_cmp_raw, v_cmp_raw, k_slc, v_slc, k_win=None, v_win=None):
        """As :meth:`nsa.NSACache.append_rotating`: RoPE of the query and of the selection/window
        keys and every store of the step in one launch, the pages found through the page table
        on the device. Returns ``(q rotated, ids)``."""
        return rotating_step(self, q, theta, (k_cmp_raw, v_cmp_raw, k_slc, v_slc, k_win, v_win), paged=True)

    def _all_rows(self) -> torch.Tensor:
        """int64 ``arange(N)`` on the pools' device, made once per batch size (not per step)."""
        if self._arange is None or self._arange.shape[0] != self.batch_size:
            self._arange = torch.arange(self.batch_size, device=self.k_slc.device)
        return self._arange

    def _begin_step(self, k_cmp_raw, v_cmp_raw, k_slc, v_slc, k_win, v_win):
        """A step's checks, and the pages of its tokens (CacheCapacityError before anything is written)."""
        if self.batch_size == 0 or not self._allocated:
            raise ValueError("cache: append needs a prefilled cache")
        check_step_inputs(self, k_cmp_raw, v_cmp_raw, k_slc, v_slc, k_win, v_win)
        self._writable()
        if self.static:
            self._check_static_room()
        else:
            self._reserve([1] * self.batch_size)

    def _end_step(self) -> torch.Tensor:
        """A step's bookkeeping once its token is written (see :meth:`append` for the return)."""
        dev = self.k_slc.device
        r = self._all_rows()
        self.lengths = [n + 1 for n in self.lengths]
        self.completed = completing_rows(self.lengths, self.kernel_size, self.stride)
        if self.static:  # every row's block is compressed; store_compressed keeps the completed ones
            self.seq_lens.add_(1)
            return r
        self.seq_lens = self.seq_lens + 1
        return torch.tensor(self.completed, dtype=torch.long).to(dev)

    def compression_blocks(self, ids: torch.Tensor):
        """As :meth:`nsa.NSACache.compression_blocks`: the raw blocks just completed by rows ``ids``."""
        ks = self.kernel_size
        L = self.seq_lens[ids].long()
        slots = (L.view(-1, 1) - ks + torch.arange(ks, device=L.device)) % ks
        rows = ids.view(-1, 1)
        return self.k_tail[rows, slots], self.v_tail[rows, slots]

    def store_compressed(self, ids: torch.Tensor, k_cmp, v_cmp):
        """Store the compressed token just completed by each row of the last :meth:`append`
        (``ids`` is the tensor it returned; the rows are taken from :attr:`completed` on the host).
        Static mode: ``ids`` is every row; the rows whose token completed a block are found on
        the device, the others rewrite what they hold."""
        if self.static:
            L = self.seq_lens[ids].long()
            done = ((L >= self.kernel_size) & ((L - self.kernel_size) % self.stride == 0)).view(-1, 1, 1)
            last = L - 1  # the completed compressed token sits in the page of its last raw position
            cp = self._static_table[ids, last // self.block_size]
            cs = (last % self.block_size) // self.stride
            self.k_cmp[cp, cs] = torch.where(done, k_cmp.detach().to(self.k_cmp.dtype), self.k_cmp[cp, cs])
            self.v_cmp[cp, cs] = torch.where(done, v_cmp.detach().to(self.v_cmp.dtype), self.v_cmp[cp, cs])
            return
        if ids.shape[0] != len(self.completed):
            raise ValueError(f"ids: expected the {len(self.completed)} rows returned by the last append, "
                             f"got {ids.shape[0]}")
        rows = self.completed
        idx = [(self.lengths[r] - self.kernel_size) // self.stride for r in rows]
        cp, cs = self._cmp_slots(rows, idx)
        self.k_cmp[cp, cs] = k_cmp.detach().to(self.k_cmp.dtype)
        self.v_cmp[cp, cs] = v_cmp.detach().to(self.v_cmp.dtype)

    # ---- reads ----------------------------------------------------------------------------------
    def tokens(self, row: int) -> CachedTokens:
        """The cached state of row ``row`` gathered from its pages (copies; see
        :meth:`nsa.NSACache.tokens`), or None for a sequence with no token yet."""
        L = self.lengths[row]
        ks, st, bs = self.kernel_size, self.stride, self.block_size
        if not self._allocated or L == 0:
            return None
        dev = self.k_slc.device
        pages = torch.tensor(self._pages[row], dtype=torch.long).to(dev)

        def raw(pool):
            return pool[pages].flatten(0, 1)[:L]

        nc = num_compressed(L, ks, st)
        shift = ks // st - 1

        def cmp(pool):
            return pool[pages].flatten(0, 1)[shift:shift + nc]

        m = min(L, ks)
        slots = torch.tensor([p % ks for p in range(L - m, L)], dtype=torch.long).to(dev)
        return CachedTokens(raw(self.k_slc), raw(self.v_slc), raw(self.k_win), raw(self.v_win), cmp(self.k_cmp),
                            cmp(self.v_cmp), self.k_tail[row, slots], self.v_tail[row, slots])
