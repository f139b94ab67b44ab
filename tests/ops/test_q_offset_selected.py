"""Triton selected attention with queries that start later than their keys (``q_offset`` /
``cu_seqlens_k``), against the ordinary call on the whole sequence.

The oracle: the offset call on the last rows ``q = q_full[:, q_offset:]`` of a full query tensor
equals rows ``[q_offset:]`` of :func:`nsa.ops.reference.selected_attention` on ``q_full`` (float64)
with the same keys; with ``do`` nonzero on those rows only, dq is the full call's dq on those rows
and dk, dv are the full call's. Packed: the same per sequence (offsets differ; 0 included). The
block lists of the queries' rows are the full call's lists of their positions.

Every path the interpreter runs: the gather forward (union walks, one position per tile, the
shared common / planned kernels, their TMA loads), the scatter forward and its merge, the dQ
gather (union, one position, shared), the scatter dQ and its reduce, dK/dV with lists cut into
segments (the reduce kernel). Tolerances are those of tests/ops/test_selected_triton.py.
"""

import pytest
import torch

import nsa.ops.reference
import nsa.ops.selected
from nsa.ops.selected import selected_attention_triton
from nsa.ops.triton_utils import tma_ok
from tests.helpers import assert_close
from tests.ops.test_selected_triton import (DEVICE, RATIO_BF16, RATIO_FP32, neighbour_block_indices,
                                            random_block_indices)

RATIO = {torch.float32: RATIO_FP32, torch.bfloat16: RATIO_BF16, torch.float16: RATIO_BF16}


def block_rows(lens_k, H, S, bs, causal, gen, neighbours=False):
    """int32 ``[1, sum(lens_k), H, S]``: a valid list for every position of every sequence (the
    full call's rows), ascending ids then -1. Drawn as tests/ops/test_selected_triton.py draws
    them (``neighbours``: neighbouring positions agree), then the position's own block is listed
    where ``(own + h) % 3 == 0`` and not listed where it is 1 (a rule per block: neighbours keep
    agreeing)."""
    draw = neighbour_block_indices if neighbours else random_block_indices
    idx = draw(lens_k, H, S, bs, causal, gen)
    start = 0
    for L in lens_k:
        for t in range(L):
            own = t // bs
            for h in range(H):
                row = [b for b in idx[0, start + t, h].tolist() if b >= 0]
                if (own + h) % 3 == 0 and own not in row:
                    row = row[:S - 1] + [own]
                elif (own + h) % 3 == 1 and own in row:
                    row.remove(own)
                row = sorted(row) + [-1] * (S - len(row))
                idx[0, start + t, h] = torch.tensor(row, dtype=torch.int32)
        start += L
    return idx


class Case:
    """A full call and the offset call on its last query rows.

    Dense (``lens_q``, ``lens_k`` ints): B sequences, ``q_offset = lens_k - lens_q``. Packed
    (lists, B = 1): ``cu_seqlens`` of the queries and ``cu_seqlens_k`` of the keys."""

    def __init__(self, B, lens_q, lens_k, HQ, H, Dk, Dv, S, bs, causal, dtype, seed=0, neighbours=False):
        gen = torch.Generator().manual_seed(seed)
        self.packed = isinstance(lens_q, list)
        lq, lk = (lens_q, lens_k) if self.packed else ([lens_q] * B, [lens_k] * B)
        self.bs, self.scale, self.dtype = bs, Dk ** -0.5, dtype
        nk = sum(lk) if self.packed else lens_k
        bsz = 1 if self.packed else B
        self.q_full = torch.randn(bsz, nk, HQ, Dk, generator=gen).to(dtype)
        self.k = torch.randn(bsz, nk, H, Dk, generator=gen).to(dtype)
        self.v = torch.randn(bsz, nk, H, Dv, generator=gen).to(dtype)
        if self.packed:
            self.idx_full = block_rows(lk, H, S, bs, causal, gen, neighbours)
            ends = torch.tensor(lk).cumsum(0)
            self.rows = torch.cat([torch.arange(e - q, e) for q, e in zip(lq, ends.tolist())])
            self.cu = torch.tensor([0] + lq).cumsum(0).to(torch.int32).to(DEVICE)
            self.cu_k = torch.tensor([0] + lk).cumsum(0).to(torch.int32).to(DEVICE)
            self.q_offset = 0
        else:
            self.idx_full = torch.cat([block_rows([nk], H, S, bs, causal, gen, neighbours) for _ in range(B)])
            self.rows = torch.arange(nk - lens_q, nk)
            self.cu = self.cu_k = None
            self.q_offset = lens_k - lens_q
        self.do_full = torch.zeros(bsz, nk, HQ, Dv)
        self.do_full[:, self.rows] = torch.randn(bsz, len(self.rows), HQ, Dv, generator=gen)
        self.do_full = self.do_full.to(dtype)
        self.q_full, self.k, self.v, self.idx_full, self.do_full = (
            x.to(DEVICE) for x in (self.q_full, self.k, self.v, self.idx_full, self.do_full))
        self.rows = self.rows.to(DEVICE)
        self.q, self.idx, self.do = (x[:, self.rows] for x in (self.q_full, self.idx_full, self.do_full))

    def run(self, k=None, v=None, **offset):
        """o and (dq, dk, dv) of the Triton offset call (``offset``: its q_offset / cu_seqlens_k,
        default this case's); k / v: other keys / values (poisoned copies)."""
        offset = offset or dict(q_offset=self.q_offset, cu_seqlens_k=self.cu_k)
        leaves = [x.detach().requires_grad_(True) for x in (self.q, self.k if k is None else k,
                                                             self.v if v is None else v)]
        o = selected_attention_triton(*leaves, self.idx, self.bs, self.scale, self.cu, **offset)
        return o, torch.autograd.grad(o, leaves, self.do)

    def reference(self):
        """The full call's rows of the offset call: o, dq on them, and the full dk, dv (float64)."""
        leaves = [x.detach().double().requires_grad_(True) for x in (self.q_full, self.k, self.v)]
        o = nsa.ops.reference.selected_attention(*leaves, self.idx_full, self.bs, self.scale, self.cu_k)
        dq, dk, dv = torch.autograd.grad(o, leaves, self.do_full.double())
        return o[:, self.rows], (dq[:, self.rows], dk, dv)

    def check(self, out, rows=None):
        """The offset call's ``out`` (o, grads) against the oracle (``rows``: those query rows only,
        and o and dq only)."""
        o_ref, g_ref = self.reference()
        o, g = out
        assert o.dtype == self.dtype and all(x.dtype == self.dtype for x in g)
        names = ("o", "dq", "dk", "dv")
        pairs = list(zip(names, (o_ref, *g_ref), (o, *g)))
        if rows is not None:
            pairs = [(n, r[:, rows], x[:, rows]) for n, r, x in pairs[:2]]
        for name, r, x in pairs:
            assert_close(name, r, x.double(), RATIO[self.dtype])


# id: (B, query lengths, key lengths, HQ, H, Dk, Dv, S, block_size, causal); ints: dense (q_offset =
# keys - queries), lists: packed (offsets per sequence; len_q = 1, len_q = len_k, lengths that are
# not multiples of the tiles or blocks)
SHAPES = {
    "dense-B2-T37-off29-G1": (2, 37, 66, 1, 1, 16, 16, 3, 16, True),
    "dense-T1-off40-G2-H2-dk32dv16": (1, 1, 41, 4, 2, 32, 16, 3, 16, True),
    "varlen-G3-dk32dv16": (1, [1, 37, 20, 41], [40, 37, 53, 90], 3, 1, 32, 16, 3, 16, True),
    "varlen-G2-dv24-bs32-noncausal": (1, [13, 30, 1], [45, 30, 64], 2, 1, 16, 24, 3, 32, False),
    "dense-T60-off110-G2-bs80-S2": (1, 60, 170, 2, 1, 16, 16, 2, 80, True),  # blocks of two key sub-tiles
    "varlen-G16-H2-dk16dv24": (1, [1, 30, 45], [33, 30, 70], 32, 2, 16, 24, 4, 16, True),  # a position per tile
    "dense-T50-off27-G16-dk96dv32": (1, 50, 77, 16, 1, 96, 32, 3, 16, True),  # Dk as two tiles
    "varlen-G3-dk40dv16": (1, [30, 11], [41, 41], 3, 1, 40, 16, 3, 16, True),  # two tiles in union walks
}


@pytest.fixture(params=["gather", "scatter", "segments"])
def mode(request, monkeypatch):
    """The kernel paths: "gather" (query-centric forward and dQ, pointer loads); "scatter"
    (KV-block-centric forward and dQ, in several chunks of query rows, lists split into segments
    of 7 entries); "segments" (gather, TMA loads where the interpreter or GPU has them, dK/dV lists
    cut into segments of 5 queries whose partials the reduce kernel sums)."""
    sel = nsa.ops.selected
    gather = request.param != "scatter"
    monkeypatch.setattr(sel, "FWD_MODE", "gather" if gather else "scatter")
    monkeypatch.setattr(sel, "DQ_MODE", "gather" if gather else "scatter")
    monkeypatch.setattr(sel, "FWD_TMA", request.param == "segments")
    if request.param == "scatter":
        monkeypatch.setattr(sel, "SCATTER_ROWS", 7)
    if request.param == "segments":
        monkeypatch.setattr(sel, "KV_SEGMENT", 5)
    return request.param


def case_for(name, dtype, mode, monkeypatch, seed=0):
    case = Case(*SHAPES[name], dtype, seed=seed)
    if mode == "scatter":  # about three chunks of query rows
        HQ, Dk, Dv, S = case.q.shape[2], case.q.shape[3], case.v.shape[3], case.idx.shape[3]
        n = case.q.shape[0] * case.q.shape[1]
        monkeypatch.setattr(nsa.ops.selected, "PARTIAL_BYTES", max(1, n // 3) * HQ * S * max(Dk, Dv) * 4)
    return case


@pytest.mark.parametrize("name", list(SHAPES))
def test_fp32_offset_matches_full_call(name, mode, monkeypatch):
    case = case_for(name, torch.float32, mode, monkeypatch)
    out = case.run()
    case.check(out)
    if mode == "segments":
        _, g2 = case.run()
        assert all(torch.equal(a, b) for a, b in zip(out[1], g2)), "backward not deterministic"


LOW_CASES = [(n, torch.bfloat16) for n in ("dense-B2-T37-off29-G1", "varlen-G3-dk32dv16", "varlen-G16-H2-dk16dv24",
                                          "dense-T50-off27-G16-dk96dv32")] + [
    ("varlen-G16-H2-dk16dv24", torch.float16)]


@pytest.mark.parametrize("name,dtype", LOW_CASES, ids=[f"{n}-{str(d)[6:]}" for n, d in LOW_CASES])
def test_16bit_offset_matches_full_call(name, dtype, mode, monkeypatch):
    """bf16 / fp16 (G = 16: programs of several positions, common and planned kernels, by default)."""
    case = case_for(name, dtype, mode, monkeypatch, seed=1)
    case.check(case.run())


# id: (B, query lengths, key lengths, HQ, Dk, Dv, S, block_size); G = 16, lists where neighbours agree
SHARED_SHAPES = {
    "varlen-G16-bs5": (1, [1, 30, 45, 22], [33, 30, 70, 39], 16, 32, 16, 5, 5),  # tails cross blocks
    "dense-B2-T45-off22-G16-dk96": (2, 45, 67, 16, 96, 32, 4, 16),  # q . k as two tiles
}
# (shape, positions per program, dtype, TMA)
SHARED_CASES = [("varlen-G16-bs5", 4, torch.bfloat16, True), ("varlen-G16-bs5", 4, torch.bfloat16, False),
                ("varlen-G16-bs5", 8, torch.float32, False), ("varlen-G16-bs5", 2, torch.float16, True),
                ("dense-B2-T45-off22-G16-dk96", 4, torch.bfloat16, True),
                ("dense-B2-T45-off22-G16-dk96", 4, torch.float32, False)]


@pytest.mark.parametrize("name,share,dtype,tma", SHARED_CASES,
                         ids=[f"{n}-P{s}-{str(d)[6:]}-tma{int(t)}" for n, s, d, t in SHARED_CASES])
def test_shared_programs_match_full_call(monkeypatch, name, share, dtype, tma):
    """Forward and dQ in programs of ``share`` query rows (their first position is not aligned
    to the program size: offsets), with blocks every row of a program lists (walked once in the
    common kernels, keys past the first position one at a time), float32 included (not given
    shared programs by default)."""
    sel = nsa.ops.selected
    B, lens_q, lens_k, HQ, Dk, Dv, S, bs = SHARED_SHAPES[name]
    case = Case(B, lens_q, lens_k, HQ, 1, Dk, Dv, S, bs, True, dtype, seed=3, neighbours=True)
    monkeypatch.setattr(sel, "FWD_MODE", "gather")
    monkeypatch.setattr(sel, "DQ_MODE", "gather")
    monkeypatch.setattr(sel, "FWD_TMA", tma)
    monkeypatch.setattr(sel, "FWD_SHARE", share)
    monkeypatch.setattr(sel, "DQ_SHARE", share)
    tiles = sel._tiles

    def shared_tiles(G, block_size, DK, DV, dt):
        cfg = tiles(G, block_size, DK, DV, dt)
        return cfg._replace(SHARE=sel._share(cfg.BT, cfg.BR, DK, DV),
                            SHARE_DQ=sel._share(cfg.BT, cfg.BR, DK, DV, "DQ_SHARE"))

    monkeypatch.setattr(sel, "_tiles", shared_tiles)
    cfg = shared_tiles(HQ, bs, Dk, Dv, dtype)
    assert cfg.BT == 1 and cfg.SHARE == cfg.SHARE_DQ == share
    if tma and not tma_ok(case.k[0], case.v[0]):
        pytest.skip("no TMA here (a GPU without tensor descriptors)")
    assert sel._fwd_tma(case.k[0], case.v[0], cfg) == tma
    # some programs share blocks: the common kernels have work
    lists = case.idx.reshape(-1, S).tolist()
    starts = [0] + torch.tensor(lens_q if case.packed else [lens_q] * B).cumsum(0).tolist()
    shared = [set.intersection(*(set(lists[t]) - {-1} for t in range(t0, min(t0 + share, end))))
              for start, end in zip(starts[:-1], starts[1:]) for t0 in range(start, end, share)]
    assert sum(1 for s in shared if s) > len(shared) // 4
    case.check(case.run())


def test_invisible_keys_are_never_read(monkeypatch):
    """inf / NaN at keys 42 of sequence 0 (queries from position 39) and 6 of sequence 1 (no
    offset), whose rows list blocks 0, their own and the one before: programs of 4 rows start at
    positions 39 and 4, so the common kernels take the poisoned keys in their tails; programs of
    one row read them in the poisoned key's block. The rows that list that block but cannot see
    the key (positions 40, 41 and 4, 5) stay finite and equal to the oracle on clean inputs, with
    TMA and pointer loads; the rows that see it do not."""
    lens_q, lens_k, bs = [31, 37], [70, 37], 16
    case = Case(1, lens_q, lens_k, 16, 1, 64, 32, 3, bs, True, torch.bfloat16, seed=13)
    lists = []
    for L in lens_k:
        for t in range(L):
            own = t // bs
            lists.append([0, own - 1, own] if own >= 2 else [0, own, -1] if own == 1 else [0, -1, -1])
    case.idx_full = torch.tensor(lists, dtype=torch.int32).view(1, -1, 1, 3).to(DEVICE)
    case.idx = case.idx_full[:, case.rows]
    kb, vb = case.k.clone(), case.v.clone()
    for key in (42, 70 + 6):
        kb[0, key], vb[0, key] = float("inf"), float("nan")
    clean = torch.tensor([1, 2, 31 + 4, 31 + 5], device=DEVICE)  # positions 40, 41 and 4, 5
    seen = torch.tensor([3, 31 + 6], device=DEVICE)  # positions 42 and 6
    sel = nsa.ops.selected
    monkeypatch.setattr(sel, "FWD_MODE", "gather")
    monkeypatch.setattr(sel, "DQ_MODE", "gather")
    for share, tma in ((4, False), (4, True), (1, True)):
        monkeypatch.setattr(sel, "FWD_SHARE", share)
        monkeypatch.setattr(sel, "DQ_SHARE", share)
        monkeypatch.setattr(sel, "FWD_TMA", tma)
        assert sel._tiles(16, bs, 64, 32, torch.bfloat16).SHARE == share
        o, (dq, _, _) = case.run(kb, vb)
        assert torch.isfinite(o[:, clean]).all() and torch.isfinite(dq[:, clean]).all(), f"P{share} tma={tma}"
        case.check((o, (dq,)), clean)
        assert not torch.isfinite(o[:, seen]).all(), "the poisoned keys are not read at all"


@pytest.mark.parametrize("fwd_mode", ["gather", "scatter"])
def test_unseen_is_exact_zero(monkeypatch, fwd_mode):
    """Queries at positions 28 .. 47 of 48 keys (q_offset 28, 3 blocks): rows that list nothing
    or only a block past them get o = dq = 0; keys of blocks no row lists get dk = dv = 0 exactly
    (outputs are NaN-poisoned before the kernels run)."""
    monkeypatch.setattr(nsa.ops.selected, "FWD_MODE", fwd_mode)
    monkeypatch.setattr(nsa.ops.selected, "DQ_MODE", fwd_mode)
    case = Case(1, 20, 48, 2, 1, 16, 16, 2, 16, True, torch.float32, seed=5)
    idx = torch.full_like(case.idx_full, -1)
    idx[:, 28:32, :, 0] = 2  # positions 28 .. 31: block 2 starts after them
    idx[:, 36:, :, 0] = 2
    case.idx_full = idx
    case.idx = idx[:, case.rows]
    o, (dq, dk, dv) = case.run()
    for x in (o[:, :8], dq[:, :8], dk[:, :32], dv[:, :32]):
        assert torch.equal(x, torch.zeros_like(x))
    case.check((o, (dq, dk, dv)))


def test_no_offset_is_todays_call():
    """q_offset = 0 given, and cu_seqlens_k given equal to cu_seqlens (another tensor: the offset
    arithmetic runs, with zero offsets), give bitwise the call without them."""
    case = Case(1, [1, 37, 50], [1, 37, 50], 6, 2, 16, 16, 4, 16, True, torch.float32, seed=2)
    o, g = case.run(q_offset=0, cu_seqlens_k=None)
    leaves = [x.detach().requires_grad_(True) for x in (case.q, case.k, case.v)]
    o0 = selected_attention_triton(*leaves, case.idx, case.bs, case.scale, case.cu)
    g0 = torch.autograd.grad(o0, leaves, case.do)
    o1, g1 = case.run(q_offset=0, cu_seqlens_k=case.cu.clone())
    dense = Case(2, 33, 33, 4, 2, 16, 16, 3, 16, True, torch.float32, seed=4)
    o2, g2 = dense.run(q_offset=0)
    leaves = [x.detach().requires_grad_(True) for x in (dense.q, dense.k, dense.v)]
    o3 = selected_attention_triton(*leaves, dense.idx, dense.bs, dense.scale)
    g3 = torch.autograd.grad(o3, leaves, dense.do)
    for a, b in zip((o, *g, o1, *g1, o2, *g2), (o0, *g0, o0, *g0, o3, *g3)):
        assert torch.equal(a, b)


def test_launchers_take_q_offset():
    """_launch_fwd and _launch_bwd given q_offset (every packed sequence has q_offset more keys
    than queries) give the op's results for the dense offset call, bitwise."""
    sel = nsa.ops.selected
    case = Case(2, 20, 33, 4, 2, 16, 16, 3, 16, True, torch.float32, seed=6)
    o_op, g_op = case.run()
    B, T, HQ, Dk = case.q.shape
    H, TK = case.k.shape[2], case.k.shape[1]
    cfg = sel._tiles(HQ // H, case.bs, Dk, 16, case.dtype)
    cu = torch.tensor([0, T, 2 * T], dtype=torch.int32, device=DEVICE)
    cu_k = torch.tensor([0, TK, 2 * TK], dtype=torch.int32, device=DEVICE)
    packed = (case.q.reshape(B * T, HQ, Dk), case.k.reshape(B * TK, H, Dk), case.v.reshape(B * TK, H, 16))
    idx = case.idx.reshape(B * T, H, -1)
    o, lse = sel._launch_fwd(*packed, idx, case.bs, case.scale, cu, sel._chunk_table(cu, B * T, sel.fwd_positions(cfg)),
                             cfg, q_offset=TK - T)
    assert torch.equal(o.view(o_op.shape), o_op)
    grads = sel._launch_bwd(*packed, o, lse, case.do.reshape(B * T, HQ, 16), idx, case.bs, case.scale, cu,
                            sel._chunk_table(cu, B * T, cfg.BT), sel._chunk_table(cu_k, B * TK, case.bs), cfg,
                            q_offset=TK - T)
    for a, b in zip(grads, g_op):
        assert torch.equal(a.view(b.shape), b)


def test_torch_compile_traces_the_offset_call():
    """The custom ops trace with q_offset and cu_seqlens_k (fake implementations: the queries' and
    keys' shapes), forward and backward in one graph."""
    case = Case(1, [5, 20], [30, 20], 2, 1, 16, 16, 2, 16, True, torch.float32, seed=7)

    def f(q, k, v):
        return selected_attention_triton(q, k, v, case.idx, case.bs, case.scale, case.cu,
                                         cu_seqlens_k=case.cu_k) * 2

    o_ref, g_ref = case.run()
    leaves = [x.detach().requires_grad_(True) for x in (case.q, case.k, case.v)]
    o = torch.compile(f, backend="aot_eager", fullgraph=True)(*leaves)
    g = torch.autograd.grad(o, leaves, case.do)
    assert torch.equal(o, 2 * o_ref)
    for a, b in zip(g, g_ref):
        assert torch.equal(a, 2 * b)
