"""PagedNSACache: prefill + decode == the full forward; sequences added, removed, forked and
reordered mid-batch; the page-table decode (torch) == the gathered dense decode (reference);
capacity errors, bad ids and page tables; pages reused after remove; a model with a paged cache
in every layer."""

import pytest
import torch

from nsa import PagedNSACache
from nsa.model import ModelCache
from nsa.ops.decode import nsa_decode
from nsa.ops.decode_paged import gather_pages, nsa_decode_paged
from nsa.paged_cache import CacheCapacityError
from tests.helpers import assert_close
from tests.test_layer import make_layer, tiny

HID = 64  # tiny config: kernel 8, stride 4, block (page) 8, 4 selected blocks, window 16


class Streams:
    """Each sequence id's whole token stream and how far it was fed; the oracle is the full
    forward of the layer on the stream alone."""

    def __init__(self, m, seed=0):
        self.m, self.x, self.fed, self.full = m, {}, {}, {}
        self.g = torch.Generator().manual_seed(seed)

    def new(self, sid, length, base=None):
        x = torch.randn(1, length, HID, dtype=torch.float64, generator=self.g)
        if base is not None:  # a fork: the parent's fed tokens, then its own continuation
            n = self.fed[base]
            x[:, :n] = self.x[base][:, :n]
        self.x[sid] = x
        self.fed[sid] = 0 if base is None else self.fed[base]

    def take(self, sid, n):
        a = self.fed[sid]
        self.fed[sid] = a + n
        return self.x[sid][:, a:a + n]

    def check(self, name, sid, out, n):
        """out: [n, hidden] the outputs of the last n fed tokens of sid (the forward is causal: the
        whole stream's forward, computed once, holds every prefix's)."""
        if sid not in self.full:
            self.full[sid] = self.m(self.x[sid])[0]
        b = self.fed[sid]
        assert_close(f"{name} seq {sid}", self.full[sid][b - n:b], out, 1e-12)


def step(m, cache, streams):
    """One decoding step of every row; checks each row against its full forward."""
    x = torch.cat([streams.take(s, 1) for s in cache.seq_ids], 0)
    y = m(x, cache=cache)
    for r, s in enumerate(cache.seq_ids):
        streams.check("step", s, y[r], 1)


def prefill(m, cache, streams, lens):
    ids = list(range(len(lens))) if cache.is_empty else None
    xs = [streams.take(i, L) for i, L in zip(ids, lens)]
    cu = torch.tensor([0] + lens).cumsum(0).to(torch.int32)
    y = m(torch.cat(xs, 1), cache=cache, cu_seqlens=cu)
    assert cache.seq_ids == ids and cache.lengths == lens
    for i, L in enumerate(lens):
        streams.check("prefill", i, y[0, int(cu[i]):int(cu[i + 1])], L)


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("shared_kv", [False, True], ids=["indep_kv", "shared_kv"])
def test_prefill_then_decode_equals_full(backend, shared_kv):
    m = make_layer(tiny(shared_kv=shared_kv, v_head_dim=8, backend=backend))
    lens, steps = [3, 13, 8, 1], 26  # crosses pages, compression blocks and the window
    streams = Streams(m)
    for i, L in enumerate(lens):
        streams.new(i, L + steps)
    cache = PagedNSACache.for_layer(m.config, num_pages=32)
    prefill(m, cache, streams, lens)
    for _ in range(steps):
        step(m, cache, streams)
    assert cache.lengths == [L + steps for L in lens]
    assert cache.num_free_pages == 32 - sum(-(-(L + steps) // 8) for L in lens)


def test_paged_equals_dense_cache_state():
    """The pages hold what the dense cache holds, token for token and compressed token for token."""
    m = make_layer(tiny())
    x = torch.randn(2, 37, HID, dtype=torch.float64)
    dense, paged = m.new_cache(), PagedNSACache.for_layer(m.config, 16)
    m(x[:, :11], cache=dense)
    m(x[:, :11], cache=paged)
    for t in range(11, 37):
        assert_close(f"step {t}", m(x[:, t:t + 1], cache=dense), m(x[:, t:t + 1], cache=paged), 1e-12)
    for n in range(2):
        a, b = dense.tokens(n), paged.tokens(n)
        for name in a._fields:
            assert torch.equal(getattr(a, name), getattr(b, name)), name


def test_add_remove_fork_reorder_mid_batch():
    m = make_layer(tiny())
    streams = Streams(m, seed=1)
    for i, L in enumerate([5, 12, 9]):
        streams.new(i, 60)
    cache = PagedNSACache.for_layer(m.config, num_pages=40)
    prefill(m, cache, streams, [5, 12, 9])
    for _ in range(4):
        step(m, cache, streams)
    cache.remove(1)  # the middle sequence finishes
    assert cache.seq_ids == [0, 2]
    for _ in range(3):
        step(m, cache, streams)
    # A new sequence joins: its prompt is a chunk, the others advance by one token (continuous batching).
    (new,) = cache.add()
    assert new == 3
    streams.new(new, 60)
    chunks = [streams.take(s, n) for s, n in zip(cache.seq_ids, [1, 1, 7])]
    y = m(torch.cat(chunks, 1), cache=cache, cu_seqlens=torch.tensor([0, 1, 2, 9], dtype=torch.int32))
    for s, (a, b) in zip(cache.seq_ids, [(0, 1), (1, 2), (2, 9)]):
        streams.check("mixed chunk", s, y[0, a:b], b - a)
    # A new sequence prefilled while the others wait (chunks of length 0).
    (late,) = cache.add()
    streams.new(late, 60)
    y = m(streams.take(late, 4), cache=cache, cu_seqlens=torch.tensor([0, 0, 0, 0, 4], dtype=torch.int32))
    streams.check("late prefill", late, y[0], 4)
    for _ in range(2):
        step(m, cache, streams)
    # Beam-search style: sequence 2 forked twice (shares its pages, partial last page copied on write).
    shared_before = cache.pages_of(2)
    forks = cache.fork(2, 2)
    assert cache.pages_of(forks[0]) == shared_before
    for f in forks:
        streams.new(f, 60, base=2)
    for _ in range(5):
        step(m, cache, streams)
    full_pages = cache.pages_of(2)[:len(shared_before) - 1]
    assert all(cache.pages_of(f)[:len(full_pages)] == full_pages for f in forks)  # full pages stay shared
    assert cache.pages_of(forks[0])[len(full_pages)] != cache.pages_of(2)[len(full_pages)]
    cache.reorder(list(reversed(cache.seq_ids)))
    for _ in range(3):
        step(m, cache, streams)
    cache.remove([0, forks[1]])
    for _ in range(2):
        step(m, cache, streams)
    assert cache.seq_ids == [forks[0], late, new, 2]


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_freed_pages_are_reused_and_never_read(backend):
    """Pages freed by remove go back to the free list and serve new sequences; what a freed page
    still holds (poisoned with NaN here) never reaches an output."""
    m = make_layer(tiny(backend=backend))
    streams = Streams(m, seed=2)
    for i in range(2):
        streams.new(i, 40)
    cache = PagedNSACache.for_layer(m.config, num_pages=8)
    prefill(m, cache, streams, [13, 20])
    assert cache.num_free_pages == 8 - 2 - 3
    freed = cache.pages_of(1)
    cache.remove(1)
    assert cache.num_free_pages == 6
    for t in (cache.k_slc, cache.v_slc, cache.k_win, cache.v_win, cache.k_cmp, cache.v_cmp):
        t[freed] = float("nan")
    (sid,) = cache.add()
    streams.new(sid, 40)
    x = torch.cat([streams.take(0, 1), streams.take(sid, 17)], 1)
    y = m(x, cache=cache, cu_seqlens=torch.tensor([0, 1, 18], dtype=torch.int32))
    streams.check("chunk", 0, y[0, :1], 1)
    streams.check("new prompt", sid, y[0, 1:], 17)
    assert set(cache.pages_of(sid)) <= set(freed)
    for _ in range(9):  # the new sequence fills its last page and takes another
        step(m, cache, streams)
    assert len(cache.pages_of(sid)) == 4


def test_capacity_error_names_the_sequence_and_changes_nothing():
    m = make_layer(tiny())
    x = torch.randn(2, 20, HID, dtype=torch.float64)
    cache = PagedNSACache.for_layer(m.config, num_pages=4)
    m(x[:, :8], cache=cache)  # one full page each
    m(x[:, 8:9], cache=cache)  # a second page each: the pool is used up
    tables = [cache.pages_of(s) for s in cache.seq_ids]
    for _ in range(7):
        m(x[:, :1], cache=cache)
    lengths = list(cache.lengths)
    k = cache.k_slc.clone()
    with pytest.raises(CacheCapacityError, match="sequence 0 needs 1 more page") as e:
        m(x[:, :1], cache=cache)
    assert isinstance(e.value, ValueError) and e.value.seq_id == 0
    assert cache.lengths == lengths and [cache.pages_of(s) for s in cache.seq_ids] == tables
    assert torch.equal(cache.k_slc, k)
    with pytest.raises(CacheCapacityError, match="sequence 1"):  # a chunk for sequence 1 only
        m(x[:1, :3], cache=cache, cu_seqlens=torch.tensor([0, 0, 3], dtype=torch.int32))
    assert cache.lengths == lengths
    # A prefill larger than the pool: refused, and the cache is left empty.
    cache = PagedNSACache.for_layer(m.config, num_pages=2)
    with pytest.raises(CacheCapacityError, match="sequence 1"):
        m(x[:, :9], cache=cache)
    assert cache.is_empty and cache.num_free_pages == 2


def test_copy_on_write_keeps_the_parent():
    m = make_layer(tiny())
    streams = Streams(m, seed=3)
    streams.new(0, 30)
    cache = PagedNSACache.for_layer(m.config, num_pages=8)
    prefill(m, cache, streams, [11])
    (f,) = cache.fork(0)
    streams.new(f, 30, base=0)
    assert cache.num_free_pages == 6  # shared
    step(m, cache, streams)  # both write into the shared partial page: the fork copies it first
    assert cache.num_free_pages == 5
    assert cache.pages_of(0)[0] == cache.pages_of(f)[0] and cache.pages_of(0)[1] != cache.pages_of(f)[1]
    cache.remove(0)
    assert cache.num_free_pages == 6  # the shared full page is still the fork's
    for _ in range(3):
        step(m, cache, streams)


def test_bad_ids_and_arguments():
    m = make_layer(tiny())
    cache = PagedNSACache.for_layer(m.config, 8)
    m(torch.randn(2, 5, HID, dtype=torch.float64), cache=cache)
    for call in (lambda: cache.remove(7), lambda: cache.remove([0, 0]), lambda: cache.fork(5),
                 lambda: cache.fork(0, 0), lambda: cache.reorder([0]), lambda: cache.reorder([0, 0]),
                 lambda: cache.add(0), lambda: cache.pages_of("0")):
        with pytest.raises(ValueError):
            call()
    for kw in (dict(kernel_size=6, stride=4, block_size=8, num_pages=4), dict(kernel_size=8, stride=4, block_size=6,
               num_pages=4), dict(kernel_size=8, stride=4, block_size=8, num_pages=0)):
        with pytest.raises(ValueError, match=next(k for k, v in kw.items() if v in (6, 0))):
            PagedNSACache(**kw)
    other = make_layer(tiny(block_size=16))
    with pytest.raises(ValueError, match="block_size"):
        other(torch.randn(2, 1, HID, dtype=torch.float64), cache=cache)
    with pytest.raises(ValueError, match="cu_seqlens"):
        m(torch.randn(1, 3, HID, dtype=torch.float64), cache=cache,
          cu_seqlens=torch.tensor([0, 3], dtype=torch.int32))


def _paged_inputs(N=3, P=12, lens=(5, 17, 30), seed=0, H=2, G=2, D=16, bs=8, st=4):
    g = torch.Generator().manual_seed(seed)
    M = max(-(-L // bs) for L in lens)
    perm = torch.randperm(P, generator=g)  # pages in no particular order
    table = torch.zeros(N, M, dtype=torch.int32)
    k = 0
    for n, L in enumerate(lens):
        for j in range(-(-L // bs)):
            table[n, j] = perm[k]
            k += 1
    r = lambda *s: torch.randn(*s, dtype=torch.float64, generator=g)  # noqa: E731
    pools = [r(P, bs, H, D) for _ in range(4)] + [r(P, bs // st, H, D) for _ in range(2)]
    gates = [torch.rand(N, H * G, dtype=torch.float64, generator=g) for _ in range(3)]
    return r(N, H * G, D), pools, gates, table, torch.tensor(lens, dtype=torch.int32)


def _poison_unread(table, lens, raw, compressed, bs=8):
    """NaN in what no step may read: the pages no sequence owns and the tail of each last page."""
    used = set(table.flatten().tolist())
    for n, L in enumerate(lens.tolist()):
        last = int(table[n, (L - 1) // bs])
        for t in raw:
            t[last, L % bs or bs:] = float("nan")
    for t in (*raw, *compressed):
        t[[p for p in range(t.shape[0]) if p not in used]] = float("nan")


@pytest.mark.parametrize("window", [4, 16, 100])
def test_paged_decode_equals_dense_decode(window):
    """The torch path reads through the page table; the reference gathers the pages and runs the
    dense reference: equal, and equal to the dense decode on the gathered cache. Unused pages and
    the unused tail of each last page hold NaN."""
    q, (ks_, vs_, kw_, vw_, kc, vc), (g0, g1, g2), table, lens = _paged_inputs()
    _poison_unread(table, lens, (ks_, vs_, kw_, vw_), (kc, vc))
    kw = dict(kernel_size=8, stride=4, block_size=8, num_selected=3, window_size=window, check_values=True)
    ref = nsa_decode_paged(q, kc, vc, ks_, vs_, kw_, vw_, g0, g1, g2, table, lens, backend="reference", **kw)
    out = nsa_decode_paged(q, kc, vc, ks_, vs_, kw_, vw_, g0, g1, g2, table, lens, backend="torch", **kw)
    assert_close("paged torch vs gathered reference", ref, out, 1e-12)
    dense = nsa_decode(q, gather_pages(kc, table)[:, 1:], gather_pages(vc, table)[:, 1:], gather_pages(ks_, table),
                       gather_pages(vs_, table), gather_pages(kw_, table), gather_pages(vw_, table), g0, g1, g2,
                       lens, backend="reference", **kw)
    assert_close("paged vs dense", dense, out, 1e-12)


def test_bad_page_tables_raise():
    q, (ks_, vs_, kw_, vw_, kc, vc), gates, table, lens = _paged_inputs()
    kw = dict(kernel_size=8, stride=4, block_size=8, num_selected=3, window_size=16)

    def run(t=table, sl=lens, **extra):
        return nsa_decode_paged(q, kc, vc, ks_, vs_, kw_, vw_, *gates, t, sl, **kw, **extra)

    bad = table.clone()
    bad[1, 0] = 12
    with pytest.raises(ValueError, match="page_table: page ids"):
        run(bad, check_values=True)
    bad[1, 0] = -1
    with pytest.raises(ValueError, match="page_table: page ids"):
        run(bad, check_values=True)
    with pytest.raises(ValueError, match="seq_lens"):
        run(sl=torch.tensor([5, 17, 33], dtype=torch.int32), check_values=True)  # beyond the 4 pages of the table
    with pytest.raises(ValueError, match="page_table"):
        run(table.long())
    with pytest.raises(ValueError, match="page_table"):
        run(table[:2])
    with pytest.raises(ValueError, match="page_table"):
        run(table[:, :0])
    with pytest.raises(ValueError, match="k_cmp"):
        nsa_decode_paged(q, kc[:, :1], vc, ks_, vs_, kw_, vw_, *gates, table, lens, **kw)
    with pytest.raises(ValueError, match="v_slc"):
        nsa_decode_paged(q, kc, vc, ks_, vs_[:5], kw_, vw_, *gates, table, lens, **kw)


def test_model_loop_with_paged_caches_equals_forward():
    """A model decodes with a PagedNSACache in every NSA layer (a ModelCache of them): prefill,
    a chunk, then steps == the full forward's logits."""
    from tests.test_model import build, ids_of

    m = build("nsa")
    ids = ids_of((2, 34))
    cache = ModelCache([PagedNSACache.for_layer(b.attn.config, 16) for b in m.blocks])
    logits = [m(ids[:, :9], cache=cache).logits, m(ids[:, 9:20], cache=cache).logits]
    logits += [m(ids[:, t:t + 1], cache=cache).logits for t in range(20, 34)]
    assert cache.lengths == [34, 34]
    assert_close("paged model", m(ids).logits, torch.cat(logits, 1), 1e-10)


@pytest.mark.parametrize("shared_kv", [False, True], ids=["indep_kv", "shared_kv"])
def test_paged_decode_step_reads_no_device_values(shared_kv, monkeypatch):
    """A decoding step on a paged cache (torch backend), crossing pages and compression blocks,
    reads no device value on the host: page allocation and the page table come from host lists."""
    from tests.test_decode_no_sync import no_host_reads

    m = make_layer(tiny(shared_kv=shared_kv, backend="torch"), dtype=torch.float32)
    lens, steps = [3, 13, 8, 1], 10
    xs = [torch.randn(1, L + steps, HID) for L in lens]
    cache = PagedNSACache.for_layer(m.config, 16)
    with torch.no_grad():
        cu = torch.tensor([0] + lens).cumsum(0).to(torch.int32)
        m(torch.cat([xi[:, :L] for xi, L in zip(xs, lens)], 1), cache=cache, cu_seqlens=cu)
        ys = []
        for s in range(steps):
            x = torch.cat([xi[:, L + s] for xi, L in zip(xs, lens)], 0).unsqueeze(1)
            with no_host_reads(monkeypatch):
                ys.append(m(x, cache=cache))
            monkeypatch.undo()
        for n, (xi, L) in enumerate(zip(xs, lens)):
            assert_close(f"seq {n}", m(xi)[0, L:], torch.cat(ys, 1)[n], 1e-5)


@pytest.mark.parametrize("window", [4, 16, 100])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_paged_triton_reads_pages_directly(window, dtype, monkeypatch):
    """The Triton kernels read the pools through the page table (nothing gathered: gather_pages is
    never called) and equal the gathered reference; pages nobody owns and the unused tail of each
    last page hold NaN, so a read outside a sequence's tokens would show."""
    import nsa.ops.decode_paged as dp

    q, (ks_, vs_, kw_, vw_, kc, vc), (g0, g1, g2), table, lens = _paged_inputs(N=4, P=16, lens=(5, 17, 30, 1),
                                                                               G=4, D=16)
    _poison_unread(table, lens, (ks_, vs_, kw_, vw_), (kc, vc))
    q, ks_, vs_, kw_, vw_, kc, vc, g0, g1, g2 = (t.to(dtype) for t in (q, ks_, vs_, kw_, vw_, kc, vc, g0, g1, g2))
    kw = dict(kernel_size=8, stride=4, block_size=8, num_selected=3, window_size=window)
    ref = nsa_decode_paged(q, kc, vc, ks_, vs_, kw_, vw_, g0, g1, g2, table, lens, backend="reference", **kw)
    with pytest.raises(ValueError, match="q's dtype"):
        nsa_decode_paged(q, kc.double(), vc, ks_, vs_, kw_, vw_, g0, g1, g2, table, lens, backend="triton", **kw)
    for backend in ("triton", "torch"):
        with pytest.raises(ValueError, match="v_win: expected pages"):
            nsa_decode_paged(q, kc, vc, ks_, vs_, kw_, vw_[..., :8], g0, g1, g2, table, lens, backend=backend, **kw)
    monkeypatch.setattr(dp, "gather_pages", lambda *a: pytest.fail("the Triton path gathered pages"))
    out = nsa_decode_paged(q, kc, vc, ks_, vs_, kw_, vw_, g0, g1, g2, table, lens, backend="triton", **kw)
    assert out.dtype == dtype and out.shape == ref.shape
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert_close("paged triton vs gathered reference", ref.float(), out.float(), tol)
    # the plan's variants (sorted top-n, per-tile block sums) through the page table too
    from nsa.ops.decode_triton import DecodePlan, decode_fwd

    plan = DecodePlan(tile=16, cmp_split=16, win_split=16, slc_split=2, score_blocks=4, topk_chunk=4,
                      topk_sort=True, tile_sums=True)
    out, _ = decode_fwd(q, kc, vc, ks_, vs_, kw_, vw_, g0, g1, g2, lens, 8, 4, 8, 3, 1, 2, window, 16 ** -0.5,
                        plan=plan, page_table=table)
    assert_close("paged triton (plan variants) vs gathered reference", ref.float(), out.float(), tol)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_paged_static_steps_equal_dynamic_steps(backend):
    """make_static on a paged cache (rows of different lengths, one a fork that shares a partial
    last page): the pages for the new tokens are taken at once (the shared page copied), the page
    table stays the same tensor, every step equals the ordinary paged step, and a step past the
    reserved pages, a chunk, add, remove, fork and reorder raise until reset(). The int64 copy of
    the table that static steps index with is made once, by make_static, and dropped by reset()."""
    m = make_layer(tiny(backend=backend))
    lens, steps = [3, 13, 8], 12
    x = [torch.randn(1, L + steps, 64, dtype=torch.float64) for L in lens]
    cu = torch.tensor([0] + lens).cumsum(0).to(torch.int32)
    prompt = torch.cat([xi[:, :L] for xi, L in zip(x, lens)], 1)
    caches = [PagedNSACache.for_layer(m.config, 40) for _ in range(2)]
    for c in caches:
        m(prompt, cache=c, cu_seqlens=cu)
        c.fork(c.seq_ids[1])  # row 3 shares row 1's pages, its last one partial (13 % 8)
    static, dynamic = caches
    x.append(x[1])
    static.make_static(steps)
    # every row's pages for L + steps tokens; the fork still shares row 1's one full page
    assert static.num_free_pages == 40 - sum(-(-(L + steps) // 8) for L in lens + [13]) + 13 // 8
    table, table_long = static.page_table, static._static_table
    assert table_long.dtype == torch.int64 and torch.equal(table_long, table.long())
    kinds = set()
    for s in range(steps):
        xs = torch.cat([xi[:, L + s] for xi, L in zip(x, lens + [13])], 0).unsqueeze(1)
        compresses = static.next_step_compresses()
        assert_close(f"step {s}", m(xs, cache=dynamic), m(xs, cache=static), 1e-12)
        assert compresses == bool(static.completed), s
        kinds.add(compresses)
    assert kinds == {False, True}
    assert static.page_table is table and static.lengths == dynamic.lengths
    assert static._static_table is table_long  # made once by make_static, not per step
    with pytest.raises(ValueError, match="static pages"):
        m(torch.randn(4, 1, 64, dtype=torch.float64), cache=static)
    with pytest.raises(ValueError, match="chunk cannot be appended to a static cache"):
        m(torch.randn(4, 2, 64, dtype=torch.float64), cache=static)
    for what, call in (("add", lambda: static.add()), ("remove", lambda: static.remove(static.seq_ids[0])),
                       ("fork", lambda: static.fork(static.seq_ids[0])),
                       ("reorder", lambda: static.reorder(static.seq_ids[::-1]))):
        with pytest.raises(ValueError, match=f"{what} changes"):
            call()
    static.reset()
    assert not static.static and static._table_long is None


def test_generate_with_a_paged_cache_equals_dense():
    from tests.test_model import build, ids_of

    m = build("nsa")
    prompts = [ids_of((5,), seed=2), ids_of((19,), seed=3), ids_of((1,), seed=4)]
    dense = m.generate(prompts, 18, temperature=0)
    paged = m.generate(prompts, 18, temperature=0, paged=True)
    assert all(torch.equal(a, b) for a, b in zip(dense, paged))
    with pytest.raises(ValueError, match="paged"):
        build("full").generate(prompts, 3, paged=True)
    with pytest.raises(ValueError, match="num_pages"):
        build("window").new_cache(num_pages=4)


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
def test_paged_step_rotating_in_the_cache_write_equals_rope_then_append(monkeypatch, static):
    """The one-launch RoPE + store of a step (PagedNSACache.append_rotating, the pages found
    through the page table in the kernel; interpreter here) == RoPE then PagedNSACache.append:
    same outputs and pools, bit for bit, over steps that take new pages, copy a forked row's
    shared last page (dynamic) and complete compression blocks."""
    import nsa.layer as layer_mod

    m = make_layer(tiny(backend="triton"), dtype=torch.float32)
    lens, steps = [3, 13, 8], 10
    x = [torch.randn(1, L + steps, 64) for L in lens]
    cu = torch.tensor([0] + lens).cumsum(0).to(torch.int32)
    prompt = torch.cat([xi[:, :L] for xi, L in zip(x, lens)], 1)
    x.append(x[1])
    caches, outs = {}, {}
    for fused in (True, False):
        monkeypatch.setattr(layer_mod, "FUSED_STEP_WRITE", fused)
        cache = caches[fused] = PagedNSACache.for_layer(m.config, 40)
        with torch.no_grad():
            m(prompt, cache=cache, cu_seqlens=cu)
            cache.fork(cache.seq_ids[1])  # row 3 shares row 1's pages, its last one partial
            if static:
                cache.make_static(steps)
            outs[fused] = [m(torch.cat([xi[:, L + s] for xi, L in zip(x, lens + [13])], 0).unsqueeze(1),
                             cache=cache) for s in range(steps)]
    for s, (a, b) in enumerate(zip(outs[True], outs[False])):
        assert torch.equal(a, b), f"step {s}: max |fused - unfused| {(a - b).abs().max()}"
    a, b = caches[True], caches[False]
    assert a._pages == b._pages and a.lengths == b.lengths
    for name in ("k_slc", "v_slc", "k_win", "v_win", "k_tail", "v_tail", "k_cmp", "v_cmp", "seq_lens"):
        assert torch.equal(getattr(a, name).nan_to_num(7.0), getattr(b, name).nan_to_num(7.0)), name
