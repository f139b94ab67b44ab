"""Decoding state of one NSA layer (a model holds one :class:`NSACache` per layer)."""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from .ops.utils import num_compressed

_DECODE_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]

__all__ = ["NSACache", "KVCache", "CachedTokens"]


class CachedTokens(NamedTuple):
    """What a chunk appended to a cached sequence of L tokens attends to and compresses with:
    ``k_slc, v_slc, k_win, v_win`` ``[L, H, Dk|Dv]`` (rotated keys), ``k_cmp, v_cmp``
    ``[num_compressed(L), H, Dk|Dv]`` and ``k_tail, v_tail`` ``[min(L, kernel_size), H, Dk|Dv]``,
    the last raw compression-branch tokens (un-rotated) in position order."""

    k_slc: torch.Tensor
    v_slc: torch.Tensor
    k_win: torch.Tensor
    v_win: torch.Tensor
    k_cmp: torch.Tensor
    v_cmp: torch.Tensor
    k_tail: torch.Tensor
    v_tail: torch.Tensor


def _check_chunk(cache, chunk_lens, k_cmp_raw, v_cmp_raw, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win):
    """Validates the arguments of ``extend`` against ``cache.lengths``; returns the host list of
    compressed tokens each row's chunk completes."""
    N = cache.batch_size
    if (not isinstance(chunk_lens, (list, tuple)) or len(chunk_lens) != N
            or any(isinstance(c, bool) or not isinstance(c, int) or c < 0 for c in chunk_lens)):
        raise ValueError(f"chunk_lens: expected a list of {N} ints >= 0 (one per cached sequence), got {chunk_lens!r}")
    total = sum(chunk_lens)
    if total == 0:
        raise ValueError("chunk_lens: no token to append")
    for name, t in dict(k_cmp_raw=k_cmp_raw, v_cmp_raw=v_cmp_raw, k_slc=k_slc, v_slc=v_slc, k_win=k_win,
                        v_win=v_win).items():
        if t is not None and (t.dim() != 3 or t.shape[0] != total):
            raise ValueError(f"{name}: expected [{total} (sum of chunk_lens), H, D], got {tuple(t.shape)}")
    ks, st = cache.kernel_size, cache.stride
    n_new = [num_compressed(L + c, ks, st) - num_compressed(L, ks, st) for L, c in zip(cache.lengths, chunk_lens)]
    for name, t in (("k_cmp", k_cmp), ("v_cmp", v_cmp)):
        if t.dim() != 3 or t.shape[0] != sum(n_new):
            raise ValueError(f"{name}: expected [{sum(n_new)} (compressed tokens the chunks complete), H, D], "
                             f"got {tuple(t.shape)}")
    return n_new


class _SequenceCache:
    """What every decoding cache keeps on the host: ``lengths``, the tokens cached per sequence
    (capacity decisions need no device sync), and its derived properties."""

    lengths: list[int]

    @property
    def is_empty(self) -> bool:
        """True before a prefill (and after :meth:`reset`)."""
        return not self.lengths

    @property
    def batch_size(self) -> int:
        """N, the number of cached sequences."""
        return len(self.lengths)

    #: Set by :meth:`make_static`: steps of fixed shapes that read no host-side decision.
    static: bool = False

    def make_static(self, new_tokens: int):
        """Prepare the cache for decoding steps that can be captured in a CUDA graph and replayed:
        room for ``new_tokens`` more tokens per sequence is allocated now (a capacity of exactly
        the longest sequence + ``new_tokens``, not the next power of two), and from now on a step
        allocates nothing and takes no decision from the host ``lengths``: ``seq_lens`` is updated
        in place, and the work a step does depends only on the batch size (see the subclasses'
        ``append``). A step past that capacity, and a chunk (``extend``: it would replace the
        tensors a graph holds), are a ValueError. :meth:`reset` ends the mode.
        """
        if self.is_empty:
            raise ValueError("cache: make_static needs a prefilled cache")
        if isinstance(new_tokens, bool) or not isinstance(new_tokens, int) or new_tokens < 0:
            raise ValueError(f"new_tokens: expected an int >= 0, got {new_tokens!r}")
        self._grow(max(self.lengths) + new_tokens, exact=True)
        self.static = True

    #: Tokens per compression block (None: a cache without compression, KVCache); and its stride.
    kernel_size: int | None = None
    stride: int | None = None

    def next_step_compresses(self) -> bool:
        """Whether the next decoding step (one token per sequence) completes a compression block
        in any sequence, from the host ``lengths`` (False for a cache without compression)."""
        return self.kernel_size is not None and bool(
            completing_rows([L + 1 for L in self.lengths], self.kernel_size, self.stride))

    def _check_static_room(self):
        if self.static and max(self.lengths) + 1 > self.capacity:
            row = max(range(len(self.lengths)), key=self.lengths.__getitem__)
            raise ValueError(f"cache: sequence {row} holds {self.lengths[row]} tokens, the static capacity "
                             f"({self.capacity}, make_static) has no room for another")

    @staticmethod
    def _grown_capacity(cap, need, exact):
        """The capacity after growing ``cap`` to hold ``need`` tokens: ``need`` itself when
        ``exact``, else the first doubling of ``cap`` that holds it."""
        if exact:
            return max(cap, need)
        while cap < need:
            cap *= 2
        return cap

    @staticmethod
    def _capacity_for(n):
        """The capacity a sequence of ``n`` tokens starts with: a power of two, at least 16."""
        cap = 16
        while cap < n:
            cap *= 2
        return cap


class NSACache(_SequenceCache):
    """Keys/values of N sequences of possibly different lengths, padded per sequence.

    Held tensors (``cap`` grows by doubling; row n is valid up to ``seq_lens[n]``):

    - ``k_slc, v_slc``: ``[N, cap, H, Dk|Dv]`` raw selection-branch keys (rotated) / values.
    - ``k_win, v_win``: the same for the window branch; the very same tensors as
      ``k_slc, v_slc`` when the layer shares them. All raw tokens are kept, not only the
      last ``window_size``: the selection branch needs them all anyway, and keeping one
      layout lets :func:`nsa.ops.decode.nsa_decode` index both branches alike.
    - ``k_cmp, v_cmp``: ``[N, cap_c, H, Dk|Dv]`` compressed keys (rotated) / values, valid up
      to ``num_compressed(seq_lens[n])``.
    - ``k_tail, v_tail``: ``[N, kernel_size, H, Dk|Dv]`` the last ``kernel_size`` raw
      compression-branch keys/values (un-rotated), all that future compressed tokens need,
      in a ring: raw position p lives in slot ``p % kernel_size``.

    Dtype and device: the held tensors take the dtype and device of the tensors the prefill
    received (the layer's keys and values); later tokens are cast to that dtype, and
    :meth:`cast_` changes it (the layer does so once when a step computes in another dtype). ``seq_lens`` is
    int32 ``[N]`` on the same device, ``lengths`` the same counts as a host list (no device sync
    to read them).

    Tensors are stored detached (decoding is inference). A prefill fills an empty cache
    (:meth:`prefill`); each decoding step appends one token per sequence (:meth:`append`),
    and when a sequence's new length L completes a compression block (``L >= kernel_size``
    and ``(L - kernel_size) % stride == 0``) the layer compresses that one block
    (:meth:`compression_blocks`, :meth:`store_compressed`). A chunk of several tokens per
    sequence (chunked prefill) is appended with :meth:`extend`, with the compressed tokens it
    completes; :meth:`tokens` reads what such a chunk attends to.
    """

    def __init__(self, kernel_size: int, stride: int):
        for name, v in (("kernel_size", kernel_size), ("stride", stride)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected a positive int, got {v!r}")
        if kernel_size % stride:
            raise ValueError(f"kernel_size: must be a multiple of stride ({stride}), got {kernel_size}")
        self.kernel_size = kernel_size
        self.stride = stride
        self.reset()

    def reset(self):
        """Forget every sequence (the cache becomes empty)."""
        self.lengths: list[int] = []  # host copy of seq_lens: capacity decisions need no sync
        self.seq_lens: torch.Tensor | None = None
        self.k_slc = self.v_slc = self.k_win = self.v_win = None
        self.k_cmp = self.v_cmp = self.k_tail = self.v_tail = None
        self.shared = False
        self.completed: list[int] = []  # host: sequences whose last appended token completed a block
        self._rows = self._no_rows = None  # int64 arange(N) and an empty index, on the device
        self.static = False

    @property
    def capacity(self) -> int:
        """Raw tokens per sequence that fit before the tensors grow (0 when empty)."""
        return 0 if self.k_slc is None else self.k_slc.shape[1]

    def _num_cmp_capacity(self, cap):
        # At least one slot so that no tensor has a zero-length token axis.
        return max(1, num_compressed(cap, self.kernel_size, self.stride))

    def prefill(self, lens, k_cmp_raw, v_cmp_raw, k_cmp, v_cmp, k_slc, v_slc, k_win=None, v_win=None):
        """Fill an empty cache from packed prompts.

        Args:
            lens: list of N sequence lengths (host ints >= 1), sum = total.
            k_cmp_raw, v_cmp_raw: ``[total, H, Dk|Dv]`` un-rotated compression-branch keys/values;
                every tensor on one device, each kept in its own dtype.
            k_cmp, v_cmp: ``[Tc_total, H, Dk|Dv]`` compressed tokens of the sequences, packed in order.
            k_slc, v_slc: ``[total, H, Dk|Dv]`` rotated selection-branch keys / values.
            k_win, v_win: the same for the window branch, or None when shared with selection.
        """
        if not self.is_empty:
            raise ValueError("cache: prefill needs an empty cache (call reset() first)")
        if not lens or any((not isinstance(n, int)) or n < 1 for n in lens):
            raise ValueError(f"lens: expected a non-empty list of positive ints, got {lens!r}")
        total = sum(lens)
        if k_slc.shape[0] != total:
            raise ValueError(f"k_slc: expected {total} tokens (sum of lens), got {k_slc.shape[0]}")
        dev = k_slc.device
        N, cap = len(lens), self._capacity_for(max(lens))
        lens_t = torch.tensor(lens, device=dev)
        seq = torch.repeat_interleave(torch.arange(N, device=dev), lens_t)  # [total]
        starts = torch.cumsum(lens_t, 0) - lens_t
        pos = torch.arange(total, device=dev) - starts[seq]

        def padded(src):
            return src.new_zeros(N, cap, *src.shape[1:])

        self.shared = k_win is None
        self.k_slc = padded(k_slc)
        self.v_slc = padded(v_slc)
        self.k_slc[seq, pos] = k_slc.detach()
        self.v_slc[seq, pos] = v_slc.detach()
        if self.shared:
            self.k_win, self.v_win = self.k_slc, self.v_slc
        else:
            self.k_win = padded(k_win)
            self.v_win = padded(v_win)
            self.k_win[seq, pos] = k_win.detach()
            self.v_win[seq, pos] = v_win.detach()

        ks, st = self.kernel_size, self.stride
        n_cmp = [num_compressed(n, ks, st) for n in lens]
        if k_cmp.shape[0] != sum(n_cmp):
            raise ValueError(f"k_cmp: expected {sum(n_cmp)} packed compressed tokens, got {k_cmp.shape[0]}")
        n_cmp_t = torch.tensor(n_cmp, device=dev)
        cseq = torch.repeat_interleave(torch.arange(N, device=dev), n_cmp_t)
        cpos = torch.arange(k_cmp.shape[0], device=dev) - (torch.cumsum(n_cmp_t, 0) - n_cmp_t)[cseq]
        cap_c = self._num_cmp_capacity(cap)
        self.k_cmp = k_cmp.new_zeros(N, cap_c, *k_cmp.shape[1:])
        self.v_cmp = v_cmp.new_zeros(N, cap_c, *v_cmp.shape[1:])
        self.k_cmp[cseq, cpos] = k_cmp.detach()
        self.v_cmp[cseq, cpos] = v_cmp.detach()

        # The ring keeps raw positions p >= L - kernel_size at slot p % kernel_size.
        keep = pos >= lens_t[seq] - ks
        self.k_tail = k_cmp_raw.new_zeros(N, ks, *k_cmp_raw.shape[1:])
        self.v_tail = v_cmp_raw.new_zeros(N, ks, *v_cmp_raw.shape[1:])
        self.k_tail[seq[keep], pos[keep] % ks] = k_cmp_raw.detach()[keep]
        self.v_tail[seq[keep], pos[keep] % ks] = v_cmp_raw.detach()[keep]

        self.lengths = list(lens)
        self.seq_lens = lens_t.to(torch.int32)
        self._rows = torch.arange(N, device=dev)
        self._no_rows = self._rows[:0]

    def cast_(self, dtype: torch.dtype):
        """Hold the keys/values that attention reads (``k_slc, v_slc, k_win, v_win, k_cmp, v_cmp``)
        in ``dtype`` from now on: one copy of each that has another dtype, none otherwise. A
        decoding step that computes in another dtype than the prefill's (the layer moved, or
        autocast changed) casts the cache once this way instead of casting all of it on every
        step. The raw compression tail keeps its dtype (phi's input; only ``kernel_size`` tokens
        of it are read, when a block completes)."""
        if self.is_empty:
            return
        cast_attended(self, dtype)

    def _writable(self):
        """A cache filled under ``torch.inference_mode()`` holds inference tensors, which only
        inference mode may update in place: outside it, take ordinary copies once."""
        if torch.compiler.is_compiling() or torch.is_inference_mode_enabled() or not self.k_slc.is_inference():
            return  # (not traced: under torch.compile a cache filled in inference mode decodes in it)
        for name in ("k_slc", "v_slc", "k_cmp", "v_cmp", "k_tail", "v_tail", "seq_lens", "_rows"):
            setattr(self, name, getattr(self, name).clone())
        self._no_rows = self._rows[:0]
        if self.shared:
            self.k_win, self.v_win = self.k_slc, self.v_slc
        else:
            self.k_win, self.v_win = self.k_win.clone(), self.v_win.clone()

    def _grow(self, need, exact=False):
        """Double the raw (and compressed) capacity until ``need`` tokens fit (``exact``: to ``need``)."""
        cap = self.capacity
        if need <= cap:
            return
        new_cap = self._grown_capacity(cap, need, exact)

        def grown(t, n):
            out = t.new_zeros(t.shape[0], n, *t.shape[2:])
            out[:, :t.shape[1]] = t
            return out

        self.k_slc, self.v_slc = grown(self.k_slc, new_cap), grown(self.v_slc, new_cap)
        if self.shared:
            self.k_win, self.v_win = self.k_slc, self.v_slc
        else:
            self.k_win, self.v_win = grown(self.k_win, new_cap), grown(self.v_win, new_cap)
        cap_c = self._num_cmp_capacity(new_cap)
        self.k_cmp, self.v_cmp = grown(self.k_cmp, cap_c), grown(self.v_cmp, cap_c)

    def append(self, k_cmp_raw, v_cmp_raw, k_slc, v_slc, k_win=None, v_win=None) -> torch.Tensor:
        """Append one token to every sequence (at position ``seq_lens[n]``).

        Args:
            k_cmp_raw, v_cmp_raw: ``[N, H, Dk|Dv]`` un-rotated compression-branch key/value.
            k_slc, v_slc: ``[N, H, Dk|Dv]`` rotated selection-branch key / value.
            k_win, v_win: the same for the window branch (None when shared).
            All on the cache's device; cast to the cached dtype.
        Returns:
            int64 ``[S]`` on the cache's device: the sequences whose new token completed a compression block; the
            caller compresses them (:meth:`compression_blocks`) and stores the result
            (:meth:`store_compressed`). The same list is kept on the host as :attr:`completed`.
            Do not modify the returned tensor (it may be one the cache reuses).

        No device value is read (no host synchronisation): positions come from ``seq_lens`` on
        the device, capacity and completed blocks from the host ``lengths``.
        """
        self._begin_step(k_cmp_raw, v_cmp_raw, k_slc, v_slc, k_win, v_win)
        rows = self._rows
        pos = self.seq_lens.long()
        self.k_slc[rows, pos] = k_slc.detach().to(self.k_slc.dtype)
        self.v_slc[rows, pos] = v_slc.detach().to(self.v_slc.dtype)
        if not self.shared:
            self.k_win[rows, pos] = k_win.detach().to(self.k_win.dtype)
            self.v_win[rows, pos] = v_win.detach().to(self.v_win.dtype)
        slot = pos % self.kernel_size
        self.k_tail[rows, slot] = k_cmp_raw.detach().to(self.k_tail.dtype)
        self.v_tail[rows, slot] = v_cmp_raw.detach().to(self.v_tail.dtype)
        return self._end_step()

    def append_rotating(self, q, theta: float, k_cmp_raw, v_cmp_raw, k_slc, v_slc, k_win=None, v_win=None):
        """:meth:`append` with the selection/window keys given before RoPE, and the step's query:
        one kernel (:func:`nsa.ops.decode_write.decode_write`) rotates the query and the keys at
        each sequence's position (``seq_lens[n]``, base ``theta``) and stores every branch's new
        token. For CUDA tensors (or under the Triton interpreter) of a non-float64 dtype; the
        stored keys equal those of RoPE (:func:`nsa.ops.rope`'s kernel) followed by :meth:`append`.

        Args:
            q: ``[N, HQ, Dk]`` the step's queries before RoPE; the other arguments as in :meth:`append`.
        Returns:
            ``(q rotated [N, HQ, Dk], ids)``: ``ids`` as :meth:`append` returns them.
        """
        return rotating_step(self, q, theta, (k_cmp_raw, v_cmp_raw, k_slc, v_slc, k_win, v_win))

    def _begin_step(self, k_cmp_raw, v_cmp_raw, k_slc, v_slc, k_win, v_win):
        """A step's checks, and room for its token (before anything is written)."""
        if self.is_empty:
            raise ValueError("cache: append needs a prefilled cache")
        check_step_inputs(self, k_cmp_raw, v_cmp_raw, k_slc, v_slc, k_win, v_win)
        self._writable()
        self._check_static_room()
        self._grow(max(self.lengths) + 1)

    def _end_step(self) -> torch.Tensor:
        """A step's bookkeeping once its token is written: lengths, completed blocks; see
        :meth:`append` for what is returned."""
        N = self.batch_size
        rows = self._rows
        self.lengths = [n + 1 for n in self.lengths]
        done = completing_rows(self.lengths, self.kernel_size, self.stride)
        self.completed = done
        if self.static:
            # When any sequence completes a block, every sequence's last block is compressed and
            # stored where one completes (store_compressed's ``where``, decided on the device).
            self.seq_lens.add_(1)
            return rows
        self.seq_lens = self.seq_lens + 1
        # Decided from the host lengths, so no device value is read. Every sequence or none (any
        # batch whose lengths agree modulo the stride) is a tensor already on the device; another
        # subset is copied there without waiting (non_blocking: the host list is staged at once).
        if len(done) == N:
            return rows
        if not done:
            return self._no_rows
        return torch.tensor(done, dtype=torch.long).to(self.k_slc.device, non_blocking=True)

    def compression_blocks(self, ids: torch.Tensor):
        """The raw blocks just completed by sequences ``ids`` (their last ``kernel_size`` tokens).

        Args:
            ids: int64 ``[S]`` on the cache's device, from :meth:`append`.
        Returns:
            k ``[S, kernel_size, H, Dk]``, v ``[S, kernel_size, H, Dv]`` in position order, in the
            cached dtype (un-rotated compression-branch keys/values).
        """
        ks = self.kernel_size
        L = self.seq_lens[ids].long()
        slots = (L.view(-1, 1) - ks + torch.arange(ks, device=L.device)) % ks  # [S, ks]
        rows = ids.view(-1, 1)
        return self.k_tail[rows, slots], self.v_tail[rows, slots]

    def store_compressed(self, ids: torch.Tensor, k_cmp, v_cmp):
        """Store the compressed token just completed by each sequence in ``ids``.

        Args:
            ids: int64 ``[S]`` from :meth:`append`; k_cmp ``[S, H, Dk]`` (rotated); v_cmp ``[S, H, Dv]``;
                on the cache's device, cast to the cached dtype. In static mode (:meth:`make_static`)
                ``ids`` is every sequence, and only those whose last token completed a block are
                written (decided on the device).
        """
        L = self.seq_lens[ids].long()
        ci = torch.div(L - self.kernel_size, self.stride, rounding_mode="floor")
        k_cmp, v_cmp = k_cmp.detach().to(self.k_cmp.dtype), v_cmp.detach().to(self.v_cmp.dtype)
        if self.static:
            done = ((L >= self.kernel_size) & ((L - self.kernel_size) % self.stride == 0)).view(-1, 1, 1)
            ci = ci.clamp(min=0)
            k_cmp = torch.where(done, k_cmp, self.k_cmp[ids, ci])
            v_cmp = torch.where(done, v_cmp, self.v_cmp[ids, ci])
        self.k_cmp[ids, ci] = k_cmp
        self.v_cmp[ids, ci] = v_cmp


    # ---- chunk appends (chunked prefill) ----------------------------------------------------------
    def tokens(self, row: int) -> CachedTokens:
        """The cached state of sequence ``row`` (views, no copy) that a chunk appended to it needs."""
        L = self.lengths[row]
        ks = self.kernel_size
        nc = num_compressed(L, ks, self.stride)
        m = min(L, ks)
        slots = torch.tensor([p % ks for p in range(L - m, L)], dtype=torch.long).to(self.k_tail.device)
        return CachedTokens(self.k_slc[row, :L], self.v_slc[row, :L], self.k_win[row, :L], self.v_win[row, :L],
                            self.k_cmp[row, :nc], self.v_cmp[row, :nc], self.k_tail[row, slots],
                            self.v_tail[row, slots])

    def extend(self, chunk_lens, k_cmp_raw, v_cmp_raw, k_cmp, v_cmp, k_slc, v_slc, k_win=None, v_win=None):
        """Append a chunk of ``chunk_lens[n]`` tokens (0 allowed) to every sequence, with the
        compressed tokens those chunks complete (the layer computed them: only the new blocks).

        Args:
            chunk_lens: host list of N ints >= 0, not all 0.
            k_cmp_raw, v_cmp_raw: ``[sum(chunk_lens), H, Dk|Dv]`` un-rotated compression-branch tokens,
                packed in sequence order.
            k_cmp, v_cmp: ``[S, H, Dk|Dv]`` the compressed tokens completed by the chunks (sequence n:
                ``num_compressed(L_n + c_n) - num_compressed(L_n)`` of them), packed in order.
            k_slc, v_slc, k_win, v_win: as ``k_cmp_raw`` (rotated keys); k_win, v_win None when shared.
            All on the cache's device; cast to the cached dtypes.

        The state afterwards equals that of one prefill of the whole sequences.
        """
        if self.is_empty:
            raise ValueError("cache: extend needs a prefilled cache")
        n_new = _check_chunk(self, chunk_lens, k_cmp_raw, v_cmp_raw, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win)
        if (k_win is None) != self.shared:
            raise ValueError("k_win: must be given iff the cache was prefilled with separate window keys")
        self._writable()
        _no_chunk_when_static(self)
        self._grow(max(L + c for L, c in zip(self.lengths, chunk_lens)))
        dev = self.k_slc.device
        ks, st = self.kernel_size, self.stride
        rows = torch.tensor([n for n, c in enumerate(chunk_lens) for _ in range(c)], dtype=torch.long).to(dev)
        pos_h = [L + j for L, c in zip(self.lengths, chunk_lens) for j in range(c)]
        pos = torch.tensor(pos_h, dtype=torch.long).to(dev)
        self.k_slc[rows, pos] = k_slc.detach().to(self.k_slc.dtype)
        self.v_slc[rows, pos] = v_slc.detach().to(self.v_slc.dtype)
        if not self.shared:
            self.k_win[rows, pos] = k_win.detach().to(self.k_win.dtype)
            self.v_win[rows, pos] = v_win.detach().to(self.v_win.dtype)
        ends = [L + c for L, c in zip(self.lengths, chunk_lens) for _ in range(c)]
        keep = torch.tensor([p >= e - ks for p, e in zip(pos_h, ends)]).to(dev)
        self.k_tail[rows[keep], pos[keep] % ks] = k_cmp_raw.detach()[keep].to(self.k_tail.dtype)
        self.v_tail[rows[keep], pos[keep] % ks] = v_cmp_raw.detach()[keep].to(self.v_tail.dtype)
        crow = torch.tensor([n for n, k in enumerate(n_new) for _ in range(k)], dtype=torch.long).to(dev)
        cidx = torch.tensor([num_compressed(L, ks, st) + j for L, k in zip(self.lengths, n_new) for j in range(k)],
                            dtype=torch.long).to(dev)
        self.k_cmp[crow, cidx] = k_cmp.detach().to(self.k_cmp.dtype)
        self.v_cmp[crow, cidx] = v_cmp.detach().to(self.v_cmp.dtype)
        self.lengths = [L + c for L, c in zip(self.lengths, chunk_lens)]
        self.seq_lens = torch.tensor(self.lengths, dtype=torch.int32).to(dev)
        self.completed = []


class KVCache(_SequenceCache):
    """Keys/values of N sequences of possibly different lengths for plain (full or sliding-window)
    attention: the decoding state of one such layer of :class:`nsa.model.LanguageModel`.

    Held tensors: ``k, v``: ``[N, cap, H, Dk|Dv]`` (keys rotated), row n valid up to
    ``seq_lens[n]`` (int32 ``[N]``; ``lengths``: the same on the host); ``cap`` grows by
    doubling. Dtype and device are those of the prefill's keys and values. A prefill fills an
    empty cache (:meth:`prefill`); each decoding step appends one token per sequence
    (:meth:`append`) and attends over the cache (:meth:`attend`).
    """

    def __init__(self):
        self.reset()

    def reset(self):
        """Forget every sequence (the cache becomes empty)."""
        self.lengths: list[int] = []
        self.seq_lens: torch.Tensor | None = None
        self.k = self.v = None
        self.static = False
        self._offsets = None  # ((N, capacity, device), int32 query offsets, key offsets) of _attend_flash

    def _grow(self, need, exact=False):
        """Double the capacity until ``need`` tokens fit (``exact``: to ``need``)."""
        if need <= self.capacity:
            return
        cap = self._grown_capacity(self.capacity, need, exact)
        for name in ("k", "v"):
            t = getattr(self, name)
            grown = t.new_zeros(t.shape[0], cap, *t.shape[2:])
            grown[:, :t.shape[1]] = t
            setattr(self, name, grown)

    @property
    def capacity(self) -> int:
        """Tokens per sequence that fit before the tensors grow (0 when empty)."""
        return 0 if self.k is None else self.k.shape[1]

    def prefill(self, lens, k, v):
        """Fill an empty cache from packed prompts.

        Args:
            lens: list of N sequence lengths (>= 1) summing to ``total``.
            k: ``[total, H, Dk]`` rotated keys; v: ``[total, H, Dv]`` values, packed in sequence order.
        """
        if not self.is_empty:
            raise ValueError("cache: prefill needs an empty cache (call reset() first)")
        if not lens or any((not isinstance(n, int)) or n < 1 for n in lens):
            raise ValueError(f"lens: expected a non-empty list of positive ints, got {lens!r}")
        total = sum(lens)
        if k.shape[0] != total or v.shape[0] != total:
            raise ValueError(f"k: expected {total} tokens (sum of lens), got {k.shape[0]} keys, {v.shape[0]} values")
        dev = k.device
        N, cap = len(lens), self._capacity_for(max(lens))
        lens_t = torch.tensor(lens, device=dev)
        seq = torch.repeat_interleave(torch.arange(N, device=dev), lens_t)
        pos = torch.arange(total, device=dev) - (torch.cumsum(lens_t, 0) - lens_t)[seq]
        self.k = k.new_zeros(N, cap, *k.shape[1:])
        self.v = v.new_zeros(N, cap, *v.shape[1:])
        self.k[seq, pos] = k.detach()
        self.v[seq, pos] = v.detach()
        self.lengths = list(lens)
        self.seq_lens = lens_t.to(torch.int32)

    def append(self, k, v):
        """Append one token to every sequence (at position ``seq_lens[n]``).

        Args:
            k: ``[N, H, Dk]`` rotated key; v: ``[N, H, Dv]``; on the cache's device, cast to its dtype.
        """
        if self.is_empty:
            raise ValueError("cache: append needs a prefilled cache")
        N = self.batch_size
        if tuple(k.shape) != (N, *self.k.shape[2:]) or tuple(v.shape) != (N, *self.v.shape[2:]):
            raise ValueError(f"k, v: expected [N={N}, H, D] like the cached tensors {(N, *self.k.shape[2:])}, "
                             f"{(N, *self.v.shape[2:])}; got {tuple(k.shape)}, {tuple(v.shape)}")
        if not torch.compiler.is_compiling() and not torch.is_inference_mode_enabled() and self.k.is_inference():
            self.k, self.v, self.seq_lens = self.k.clone(), self.v.clone(), self.seq_lens.clone()
        self._check_static_room()
        self._grow(max(self.lengths) + 1)
        rows = torch.arange(N, device=self.k.device)
        pos = self.seq_lens.long()
        self.k[rows, pos] = k.detach().to(self.k.dtype)
        self.v[rows, pos] = v.detach().to(self.v.dtype)
        self.lengths = [n + 1 for n in self.lengths]
        if self.static:
            self.seq_lens.add_(1)
        else:
            self.seq_lens = self.seq_lens + 1

    def extend(self, chunk_lens, k, v):
        """Append a chunk of ``chunk_lens[n]`` tokens (0 allowed) to every sequence.

        Args:
            chunk_lens: host list of N ints >= 0, not all 0.
            k: ``[sum(chunk_lens), H, Dk]`` rotated keys, v: ``[sum(chunk_lens), H, Dv]``, packed in
                sequence order, on the cache's device.
        """
        if self.is_empty:
            raise ValueError("cache: extend needs a prefilled cache")
        N = self.batch_size
        if (not isinstance(chunk_lens, (list, tuple)) or len(chunk_lens) != N
                or any(isinstance(n, bool) or not isinstance(n, int) or n < 0 for n in chunk_lens)
                or not any(chunk_lens)):
            raise ValueError(f"chunk_lens: expected {N} ints >= 0, not all 0, got {chunk_lens!r}")
        total = sum(chunk_lens)
        if tuple(k.shape) != (total, *self.k.shape[2:]) or tuple(v.shape) != (total, *self.v.shape[2:]):
            raise ValueError(f"k, v: expected [{total}, H, D] like the cached tensors, got {tuple(k.shape)}, "
                             f"{tuple(v.shape)}")
        _no_chunk_when_static(self)
        need = max(L + n for L, n in zip(self.lengths, chunk_lens))
        if not torch.compiler.is_compiling() and not torch.is_inference_mode_enabled() and self.k.is_inference():
            self.k, self.v, self.seq_lens = self.k.clone(), self.v.clone(), self.seq_lens.clone()
        self._grow(need)
        dev = self.k.device
        rows = torch.tensor([n for n, m in enumerate(chunk_lens) for _ in range(m)], device=dev)
        pos = torch.tensor([L + j for L, m in zip(self.lengths, chunk_lens) for j in range(m)], device=dev)
        self.k[rows, pos] = k.detach().to(self.k.dtype)
        self.v[rows, pos] = v.detach().to(self.v.dtype)
        self.lengths = [L + n for L, n in zip(self.lengths, chunk_lens)]
        self.seq_lens = torch.tensor(self.lengths, dtype=torch.int32, device=dev)

    def attend(self, q, window_size=None, scale=None):
        """Attention of one new query per sequence over its cached keys (GQA), in the cache's
        dtype, over the cached positions only. On CUDA with an fp16/bf16 cache: FlashAttention-2's
        variable-length kernel over the cache in place (:meth:`_attend_flash`); otherwise
        :func:`torch.nn.functional.scaled_dot_product_attention`, with a mask of each sequence's
        length unless every sequence has the same length and there is no window.

        Args:
            q: ``[N, HQ, Dk]`` the queries of the tokens just appended (at position ``seq_lens[n] - 1``),
                on the cache's device, any floating dtype.
            window_size: None (full causal attention) or w: keys ``seq_lens[n] - w <= s < seq_lens[n]``.
            scale: softmax scale, default ``Dk ** -0.5``.
        Returns:
            ``[N, HQ, Dv]`` in q's dtype.
        """
        N, HQ, Dk = q.shape
        s = Dk ** -0.5 if scale is None else scale
        longest, shortest = max(self.lengths), min(self.lengths)  # host values: no device sync
        if _flash_varlen_decodes(q, self.k, self.v):
            return self._attend_flash(q, window_size, s, self.capacity if self.static else longest)
        lo = 0 if window_size is None else max(0, shortest - window_size)
        if self.static:  # fixed shapes: the whole capacity, masked on the device
            lo, longest, shortest = 0, self.capacity, -1
        k = self.k[:, lo:longest].transpose(1, 2)  # [N, H, keys, Dk]
        v = self.v[:, lo:longest].transpose(1, 2)
        mask = None
        if shortest != longest or window_size is not None:
            pos = torch.arange(lo, longest, device=q.device)
            end = self.seq_lens.long().view(N, 1)
            visible = pos < end
            if window_size is not None:
                visible &= pos >= end - window_size
            mask = visible.view(N, 1, 1, -1)
        # The G query heads of a KV head as G query rows ([N, H, G, Dk]; query head i reads KV head
        # i // G), so no GQA flag is needed: with a mask (static cache, other lengths, window) SDPA
        # then takes its memory-efficient kernel, which has no GQA form (with enable_gqa and a mask it
        # took the math path, which materialises every score: 2026-12-07, H100, 64k x 16 sequences,
        # 202 ms a step of the base model). Not cuDNN: it builds an execution plan for every new
        # key length, i.e. for every step.
        H = k.shape[1]
        with sdpa_kernel(_DECODE_BACKENDS):
            o = F.scaled_dot_product_attention(q.to(k.dtype).view(N, H, HQ // H, Dk), k, v, attn_mask=mask,
                                               scale=s)  # [N, H, G, Dv]
        return o.reshape(N, HQ, -1).to(q.dtype)

    def _attend_flash(self, q, window_size, scale, max_keys):
        """:meth:`attend` with FlashAttention-2's variable-length kernel: row n of the cache is
        sequence n of a packed key tensor (offsets ``n * capacity``) of which ``seq_lens[n]`` keys
        are used, so neither a mask nor a copy is needed and the shapes do not change between the
        steps of a static cache. With one query per sequence and GQA the kernel splits the keys
        over several programs (flash-decoding) when the batch alone cannot fill the GPU; the
        masked memory-efficient kernel has one program per (sequence, KV head) reading every key
        (2026-12-07, H100, one layer of the base model at 64k: 3.5 ms against 0.074 ms at batch 1,
        3.8 ms against 0.21 ms at batch 16)."""
        N, HQ, Dk = q.shape
        cap, H = self.k.shape[1], self.k.shape[2]
        key = (N, cap, q.device)
        if self._offsets is None or self._offsets[0] != key:  # made once per batch size and capacity
            cu_q = torch.arange(N + 1, device=q.device, dtype=torch.int32)
            self._offsets = (key, cu_q, cu_q * cap)
        _, cu_q, cu_k = self._offsets
        window = {} if window_size is None else dict(window_size_left=window_size - 1, window_size_right=0)
        o = torch.ops.aten._flash_attention_forward(
            q.to(self.k.dtype).contiguous(), self.k.view(N * cap, H, Dk), self.v.view(N * cap, H, -1),
            cu_q, cu_k, 1, max_keys, 0.0, False, False, scale=scale, seqused_k=self.seq_lens,
            **window)[0]
        return o.view(N, HQ, -1).to(q.dtype)


def _flash_varlen_decodes(q, k, v) -> bool:
    """Whether :meth:`KVCache.attend` can use FlashAttention-2's variable-length kernel: CUDA (sm80
    or newer, PyTorch's flash kernels enabled), fp16/bf16 cache, one head size of at most 256 that
    is a multiple of 8 for keys and values."""
    return (q.is_cuda and k.dtype in (torch.float16, torch.bfloat16) and k.shape[-1] == v.shape[-1]
            and k.shape[-1] % 8 == 0 and k.shape[-1] <= 256 and torch.backends.cuda.flash_sdp_enabled()
            and _capability(q.device.index if q.device.index is not None else torch.cuda.current_device())
            >= (8, 0))


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple:
    return torch.cuda.get_device_capability(index)


# ---- shared by NSACache and nsa.PagedNSACache -------------------------------------------------

def completing_rows(lengths, kernel_size: int, stride: int) -> list[int]:
    """The sequences whose last token (the ``lengths[n]``-th) completes a compression block."""
    return [n for n, L in enumerate(lengths) if L >= kernel_size and (L - kernel_size) % stride == 0]


def rotating_step(cache, q, theta, new, paged=False):
    """The body of ``append_rotating`` (NSACache and nsa.PagedNSACache): checks (q's shape first,
    so that a bad q changes nothing), room for the token, the one-launch write, the bookkeeping.
    ``new``: the (k_cmp_raw, v_cmp_raw, k_slc, v_slc, k_win, v_win) of :meth:`NSACache.append`."""
    if cache.k_slc is not None and (q.dim() != 3 or q.shape[0] != cache.batch_size
                                    or q.shape[2] != cache.k_slc.shape[3]):
        raise ValueError(f"q: expected [N={cache.batch_size}, HQ, Dk={cache.k_slc.shape[3]}], got {tuple(q.shape)}")
    cache._begin_step(*new)  # raises first for an empty cache
    from .ops.decode_write import decode_write

    k_cmp_raw, v_cmp_raw, k_slc, v_slc, k_win, v_win = (None if t is None else t.detach() for t in new)
    if cache.shared:
        k_win = v_win = None
    q_rot = decode_write(cache.seq_lens, theta, q.detach(), k_cmp_raw, v_cmp_raw, k_slc, v_slc, k_win, v_win,
                         cache.k_tail, cache.v_tail, cache.k_slc, cache.v_slc, cache.k_win, cache.v_win,
                         page_table=cache.page_table if paged else None)
    return q_rot, cache._end_step()


def _no_chunk_when_static(cache):
    if cache.static:
        raise ValueError("cache: a chunk cannot be appended to a static cache (make_static: its steps keep "
                         "their tensors for a CUDA graph); reset() ends the static mode")


def check_step_inputs(cache, k_cmp_raw, v_cmp_raw, k_slc, v_slc, k_win, v_win):
    """One decoding step's new keys/values (one row per cached sequence) against what ``cache``
    holds: row count, window keys given iff held separately, per-row shapes."""
    N = cache.batch_size
    if k_slc.shape[0] != N:
        raise ValueError(f"k_slc: expected {N} rows (one per cached sequence), got {k_slc.shape[0]}")
    if (k_win is None) != cache.shared:
        raise ValueError("k_win: must be given iff the cache was prefilled with separate window keys")
    held = dict(k_cmp_raw=cache.k_tail, v_cmp_raw=cache.v_tail, k_slc=cache.k_slc, v_slc=cache.v_slc,
                k_win=cache.k_win, v_win=cache.v_win)
    for name, t in dict(k_cmp_raw=k_cmp_raw, v_cmp_raw=v_cmp_raw, k_slc=k_slc, v_slc=v_slc, k_win=k_win,
                        v_win=v_win).items():
        if t is not None and tuple(t.shape) != (N, *held[name].shape[2:]):
            raise ValueError(f"{name}: expected [N={N}, H, D] = {(N, *held[name].shape[2:])} like the "
                             f"cached tensors, got {tuple(t.shape)}")


def cast_attended(cache, dtype: torch.dtype):
    """The tensors attention reads (``k_slc, v_slc, k_win, v_win, k_cmp, v_cmp``) of ``cache`` held
    in ``dtype``: one copy of each that has another dtype, none otherwise."""
    for name in ("k_slc", "v_slc", "k_cmp", "v_cmp") + (() if cache.shared else ("k_win", "v_win")):
        t = getattr(cache, name)
        if t.dtype != dtype:
            setattr(cache, name, t.to(dtype))
    if cache.shared:
        cache.k_win, cache.v_win = cache.k_slc, cache.v_slc
