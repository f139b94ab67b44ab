"""The reference (nsa.ops with backend='reference') against the brute-force definition.

Everything goes through the public ops, so the validation layer is exercised too.
float64 comparisons use a 1e-12 relative bound: the two sides compute the same sums
in a different order, nothing more. Low-precision runs are compared against the
brute force on the same (rounded) inputs upcast to float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

import nsa.ops as ops
from nsa.ops import reference
from nsa.ops.utils import overlap_matrix

from ..helpers import assert_close
from . import bruteforce as bf
from .selection_check import check_selection, reference_scores

REF = dict(backend="reference")
F64 = 1e-12


@dataclass(frozen=True)
class Case:
    id: str
    B: int
    T: int
    HQ: int
    H: int
    Dk: int
    Dv: int
    ks: int  # kernel_size
    st: int  # stride
    bs: int  # block_size
    sel: tuple = (16, 1, 2)  # num_selected, num_initial, num_local
    window: int = 512


CASES = [
    Case("T1-G2", 1, 1, 2, 1, 16, 8, 8, 4, 8, sel=(2, 1, 1), window=4),
    Case("T<ks-G3-B2", 2, 20, 3, 1, 16, 24, 32, 16, 64, window=7),
    Case("32-16-64-G2-H2", 1, 203, 4, 2, 24, 16, 32, 16, 64, sel=(3, 1, 1), window=50),
    Case("8-4-8-G3-B2", 2, 45, 3, 1, 8, 12, 8, 4, 8, sel=(3, 1, 1), window=9),
    Case("4-4-12-G1-H2", 1, 50, 2, 2, 8, 8, 4, 4, 12, sel=(3, 0, 1), window=13),
    Case("16-8-16-G16-H2", 1, 37, 32, 2, 16, 8, 16, 8, 16, sel=(2, 1, 1), window=5),
    Case("16-8-16-G1-H1", 1, 70, 1, 1, 8, 4, 16, 8, 16, sel=(3, 1, 1), window=70),
]
CASE_IDS = [c.id for c in CASES]

# (num_selected, num_initial, num_local): every flag combination incl. 0 initial / 0 local.
SEL_FLAGS = [(4, 1, 2), (3, 0, 0), (5, 2, 1), (2, 0, 2), (1, 0, 1), (1, 1, 0), (16, 1, 2)]


def make_inputs(c: Case, dtype=torch.float64, cu_seqlens=None, seed=0):
    """q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, g_cmp, g_slc, g_win for case c."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)

    seqs = bf.sequences(c.B, c.T, cu_seqlens)
    tc = sum(bf.n_compressed(n, c.ks, c.st) for _, _, n in seqs) if cu_seqlens is not None else \
        bf.n_compressed(c.T, c.ks, c.st)
    q = rnd(c.B, c.T, c.HQ, c.Dk)
    k_cmp, v_cmp = rnd(c.B, tc, c.H, c.Dk), rnd(c.B, tc, c.H, c.Dv)
    kv = [rnd(c.B, c.T, c.H, d) for d in (c.Dk, c.Dv, c.Dk, c.Dv)]
    gates = [torch.sigmoid(rnd(c.B, c.T, c.HQ).double()).to(dtype) for _ in range(3)]
    return (q, k_cmp, v_cmp, *kv, *gates)


def sel_kwargs(c: Case, sel=None):
    n, ni, nl = sel or c.sel
    return dict(kernel_size=c.ks, stride=c.st, block_size=c.bs, num_selected=n, num_initial=ni, num_local=nl)


def assert_lse(name, ref, out, ratio):
    """Same -inf pattern (queries with nothing visible), finite values within ratio."""
    assert torch.equal(torch.isneginf(ref), torch.isneginf(out)), f"{name}: -inf pattern differs"
    fin = torch.isfinite(ref)
    assert_close(name, ref[fin], out[fin].to(ref.dtype), ratio)


def random_block_indices(B, T, H, S, block_size, seed, lengths=None):
    """int32 [B, T, H, S]: distinct blocks of each query's sequence (future ones too), in random
    order, with -1 scattered anywhere in the row."""
    gen = torch.Generator().manual_seed(seed)
    lengths = lengths or [T]
    nb = max(math.ceil(n / block_size) for n in lengths)
    rows = torch.full((B, T, H, S), -1, dtype=torch.int32)
    t0 = 0
    for n in lengths:
        nbs = math.ceil(n / block_size)
        perm = torch.rand(B, n, H, nb, generator=gen).argsort(-1)  # random block order
        perm = torch.where(perm < nbs, perm, -1)  # drop blocks past this sequence
        valid_first = torch.sort((perm < 0).to(torch.int8), dim=-1, stable=True).indices
        perm = torch.gather(perm, -1, valid_first)[..., :S]  # a random subset of the valid blocks
        perm = torch.where(torch.rand(*perm.shape, generator=gen) < 0.25, -1, perm)
        rows[:, t0:t0 + n, :, :perm.shape[-1]] = perm.to(torch.int32)
        t0 += n
    # the -1 padding columns appended above move into random positions too
    return torch.gather(rows, -1, torch.rand(B, T, H, S, generator=gen).argsort(-1))


# ---------------------------------------------------------------- compressed branch


@pytest.mark.parametrize("c", CASES, ids=CASE_IDS)
def test_compressed_vs_bruteforce(c):
    q, k_cmp, v_cmp = make_inputs(c)[:3]
    o, lse = ops.compressed_attention(q, k_cmp, v_cmp, c.ks, c.st, **REF)
    o_bf, lse_bf = bf.compressed_attention(q, k_cmp, v_cmp, c.ks, c.st)
    assert o.dtype == torch.float64 and lse.dtype == torch.float64
    assert_close("o", o_bf, o, F64)
    assert_lse("lse", lse_bf, lse, F64)
    # queries before the first complete compressed block see nothing: exact zeros and -inf
    early = min(c.T, c.ks - 1)
    assert torch.equal(o[:, :early], torch.zeros_like(o[:, :early]))
    assert torch.isneginf(lse[:, :early]).all()
    assert torch.isfinite(lse[:, early:]).all()


def test_compressed_custom_scale():
    c = CASES[3]
    q, k_cmp, v_cmp = make_inputs(c)[:3]
    o, lse = ops.compressed_attention(q, k_cmp, v_cmp, c.ks, c.st, scale=0.37, **REF)
    o_bf, lse_bf = bf.compressed_attention(q, k_cmp, v_cmp, c.ks, c.st, scale=0.37)
    assert_close("o", o_bf, o, F64)
    assert_lse("lse", lse_bf, lse, F64)


# ---------------------------------------------------------------- block scores and selection


def test_overlap_matrix_paper_weights():
    """32/16/64: block j gets compressed tokens 4j-1 .. 4j+3 with weights 1, 2, 2, 2, 1."""
    tc, nb = 30, 8
    w = overlap_matrix(tc, nb, 32, 16, 64)
    want = torch.zeros(tc, nb)
    for j in range(nb):
        for i, weight in zip(range(4 * j - 1, 4 * j + 4), (1, 2, 2, 2, 1)):
            if 0 <= i < tc:
                want[i, j] = weight
    assert torch.equal(w, want), (w - want).nonzero()


@pytest.mark.parametrize("ks,st,bs", [(32, 16, 64), (8, 4, 8), (4, 4, 12), (16, 8, 16), (12, 4, 8), (8, 8, 24)],
                         ids=lambda v: str(v))
def test_overlap_matrix_counts_shared_pieces(ks, st, bs):
    tc, nb = 20, 9
    w = overlap_matrix(tc, nb, ks, st, bs, dtype=torch.float64)
    want = torch.tensor([[bf.shared_pieces(i, j, ks, st, bs) for j in range(nb)] for i in range(tc)],
                        dtype=torch.float64)
    assert torch.equal(w, want)


@pytest.mark.parametrize("c", CASES, ids=CASE_IDS)
def test_block_scores_vs_bruteforce(c):
    q, k_cmp, v_cmp = make_inputs(c)[:3]
    _, lse = ops.compressed_attention(q, k_cmp, v_cmp, c.ks, c.st, **REF)
    got = reference.block_scores(q, k_cmp, lse, c.ks, c.st, c.bs)
    want = bf.block_scores(q, k_cmp, c.ks, c.st, c.bs, lse=lse)
    assert_close("scores (given lse)", want, got, F64)
    # the brute force with its own softmax agrees: lse from compressed_attention is right
    assert_close("scores (own softmax)", bf.block_scores(q, k_cmp, c.ks, c.st, c.bs), got, F64)
    # every query's scores add up to G * (pieces per compressed token) when it sees any token
    G = c.HQ // c.H
    sees = c.T >= c.ks
    if sees:
        total = got[:, c.ks - 1:].sum(-1)
        assert_close("score mass", torch.full_like(total, G * (c.ks // c.st)), total, F64)


@pytest.mark.parametrize("sel", SEL_FLAGS, ids=[f"n{n}-i{i}-l{l}" for n, i, l in SEL_FLAGS])
@pytest.mark.parametrize("c", CASES, ids=CASE_IDS)
def test_select_blocks_vs_bruteforce(c, sel):
    q, k_cmp, v_cmp = make_inputs(c)[:3]
    _, lse = ops.compressed_attention(q, k_cmp, v_cmp, c.ks, c.st, **REF)
    kw = sel_kwargs(c, sel)
    idx = ops.select_blocks(q, k_cmp, lse, **kw, **REF)
    want = bf.select_blocks(q, k_cmp, c.ks, c.st, c.bs, *sel)
    assert idx.dtype == torch.int32
    assert torch.equal(idx, want), f"first mismatch at {(idx != want).nonzero()[0].tolist()}"
    check_selection(q, k_cmp, lse, idx, **kw)


def test_select_blocks_uses_the_given_lse():
    """p_cmp = exp(scale * q.k_cmp - lse) with the lse passed in: shifting one head's lse reweights the group."""
    c = CASES[3]
    q, k_cmp, v_cmp = make_inputs(c)[:3]
    _, lse = ops.compressed_attention(q, k_cmp, v_cmp, c.ks, c.st, **REF)
    shifted = lse + torch.tensor([0.0, 2.0, -1.0], dtype=lse.dtype)  # per query head of the group
    kw = sel_kwargs(c)
    idx = ops.select_blocks(q, k_cmp, shifted, **kw, **REF)
    assert torch.equal(idx, bf.select_blocks(q, k_cmp, c.ks, c.st, c.bs, *c.sel, lse=shifted))
    assert not torch.equal(idx, ops.select_blocks(q, k_cmp, lse, **kw, **REF))


def test_select_ties_go_to_lower_block():
    """All scores equal (no query sees a compressed token): the lowest free blocks win."""
    c = Case("ties", 1, 40, 2, 1, 8, 8, 64, 8, 8)  # T < kernel_size: every score is 0
    q, k_cmp, v_cmp = make_inputs(c)[:3]
    _, lse = ops.compressed_attention(q, k_cmp, v_cmp, c.ks, c.st, **REF)
    idx = ops.select_blocks(q, k_cmp, lse, **sel_kwargs(c, (3, 0, 1)), **REF)
    for t in range(c.T):
        tb = t // c.bs
        want = sorted({0, 1, tb} if tb >= 2 else set(range(tb + 1)))
        want += [-1] * (3 - len(want))
        assert idx[0, t, 0].tolist() == want, (t, idx[0, t, 0].tolist())


def test_select_heads_of_a_group_share_one_choice():
    """Scores are summed over the group: duplicating a head's query leaves the choice a KV-head choice."""
    c = CASES[3]
    q, k_cmp, v_cmp = make_inputs(c)[:3]
    _, lse = ops.compressed_attention(q, k_cmp, v_cmp, c.ks, c.st, **REF)
    idx = ops.select_blocks(q, k_cmp, lse, **sel_kwargs(c), **REF)
    assert idx.shape == (c.B, c.T, c.H, c.sel[0])
    # a single head's selection differs from the group's somewhere (else the sum is untested)
    single = bf.select_blocks(q[:, :, :1], k_cmp, c.ks, c.st, c.bs, *c.sel)
    assert not torch.equal(single, idx[..., :1, :])


# ---------------------------------------------------------------- selected branch


@pytest.mark.parametrize("c", CASES, ids=CASE_IDS)
def test_selected_vs_bruteforce(c):
    q, k_cmp, v_cmp, k, v = make_inputs(c)[:5]
    idx = bf.select_blocks(q, k_cmp, c.ks, c.st, c.bs, *c.sel)
    o = ops.selected_attention(q, k, v, idx, c.bs, **REF)
    assert o.dtype == torch.float64
    assert_close("o", bf.selected_attention(q, k, v, idx, c.bs), o, F64)


@pytest.mark.parametrize("c", CASES, ids=CASE_IDS)
def test_selected_random_order_and_padding(c):
    q, _, _, k, v = make_inputs(c)[:5]
    S = c.sel[0] + 2
    idx = random_block_indices(c.B, c.T, c.H, S, c.bs, seed=1)
    o = ops.selected_attention(q, k, v, idx, c.bs, scale=0.5, **REF)
    assert_close("o", bf.selected_attention(q, k, v, idx, c.bs, scale=0.5), o, F64)
    # the order of a row does not matter
    perm = torch.rand(idx.shape, generator=torch.Generator().manual_seed(2)).argsort(-1)
    o2 = ops.selected_attention(q, k, v, torch.gather(idx, -1, perm), c.bs, scale=0.5, **REF)
    assert_close("o (permuted rows)", o, o2, F64)


def test_selected_query_seeing_nothing_gets_zeros():
    c = Case("nothing", 2, 30, 2, 1, 8, 4, 8, 4, 8)
    q, _, _, k, v = make_inputs(c)[:5]
    idx = torch.full((c.B, c.T, c.H, 3), -1, dtype=torch.int32)
    idx[:, :8, :, 0] = 3  # only a future block: nothing s <= t
    idx[:, 8:16, :, 1] = 2
    idx[:, 20, :, 2] = 1  # a past block
    o = ops.selected_attention(q, k, v, idx, c.bs, **REF)
    seen = torch.zeros(c.T, dtype=torch.bool)
    seen[20] = True
    assert torch.equal(o[:, ~seen], torch.zeros_like(o[:, ~seen]))
    assert_close("o", bf.selected_attention(q, k, v, idx, c.bs), o, F64)
    assert (o[:, 20].abs() > 0).all()


def test_selected_all_blocks_is_causal_attention():
    c = CASES[3]
    q, _, _, k, v = make_inputs(c)[:5]
    nb = math.ceil(c.T / c.bs)
    idx = torch.arange(nb, dtype=torch.int32).expand(c.B, c.T, c.H, nb).contiguous()
    o = ops.selected_attention(q, k, v, idx, c.bs, **REF)
    assert_close("o", bf.sliding_window_attention(q, k, v, c.T), o, F64)


# ---------------------------------------------------------------- window branch


@pytest.mark.parametrize("c", CASES, ids=CASE_IDS)
def test_window_vs_bruteforce(c):
    x = make_inputs(c)
    q, k, v = x[0], x[5], x[6]
    for w in sorted({1, 3, c.window, c.T + 7}):
        o = ops.sliding_window_attention(q, k, v, w, **REF)
        assert_close(f"o (window {w})", bf.sliding_window_attention(q, k, v, w), o, F64)


def test_window_1_returns_own_value():
    c = CASES[2]
    x = make_inputs(c)
    q, k, v = x[0], x[5], x[6]
    o = ops.sliding_window_attention(q, k, v, 1, **REF)
    G = c.HQ // c.H
    assert_close("o", v.repeat_interleave(G, dim=2), o, F64)


def test_window_larger_than_T_is_full_causal():
    c = CASES[3]
    x = make_inputs(c)
    q, k, v = x[0], x[5], x[6]
    o = ops.sliding_window_attention(q, k, v, 10 * c.T, **REF)
    full = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.repeat_interleave(3, 2).transpose(1, 2), v.repeat_interleave(3, 2).transpose(1, 2),
        is_causal=True).transpose(1, 2)
    assert_close("o", full, o, F64)
    assert_close("o (window T)", ops.sliding_window_attention(q, k, v, c.T, **REF), o, F64)


# ---------------------------------------------------------------- the whole of NSA


@pytest.mark.parametrize("c", CASES, ids=CASE_IDS)
def test_nsa_vs_bruteforce(c):
    x = make_inputs(c)
    kw = dict(sel_kwargs(c), window_size=c.window)
    o, idx = ops.nsa(*x, **kw, return_block_indices=True, **REF)
    o_bf, idx_bf = bf.nsa(*x, **kw)
    assert torch.equal(idx, idx_bf)
    assert o.dtype == torch.float64
    assert_close("o", o_bf, o, F64)
    assert torch.equal(ops.nsa(*x, **kw, **REF), o)


def test_nsa_is_the_gated_sum_of_the_branches():
    c = CASES[3]
    q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, g_cmp, g_slc, g_win = make_inputs(c)
    kw = sel_kwargs(c)
    o = ops.nsa(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, g_cmp, g_slc, g_win, **kw, window_size=c.window,
                **REF)
    o_cmp, lse = ops.compressed_attention(q, k_cmp, v_cmp, c.ks, c.st, **REF)
    idx = ops.select_blocks(q, k_cmp, lse, **kw, **REF)
    o_slc = ops.selected_attention(q, k_slc, v_slc, idx, c.bs, **REF)
    o_win = ops.sliding_window_attention(q, k_win, v_win, c.window, **REF)
    want = g_cmp[..., None] * o_cmp + g_slc[..., None] * o_slc + g_win[..., None] * o_win
    assert_close("o", want, o, F64)


# ---------------------------------------------------------------- packed sequences

LENGTHS = [1, 17, 64, 300]  # incl. sequences without compressed tokens, and one with a single one
CU = [0, 1, 18, 82, 382]
VARLEN = [Case("varlen-16-8-16", 1, CU[-1], 4, 2, 8, 12, 16, 8, 16, sel=(4, 1, 2), window=20),
          Case("varlen-32-16-64-G3", 1, CU[-1], 3, 1, 8, 4, 32, 16, 64, sel=(2, 1, 1), window=33)]


@pytest.mark.parametrize("c", VARLEN, ids=[c.id for c in VARLEN])
def test_varlen_equals_each_sequence_alone(c):
    cu = torch.tensor(CU, dtype=torch.int32)
    x = make_inputs(c, cu_seqlens=cu)
    q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, g_cmp, g_slc, g_win = x
    kw = dict(sel_kwargs(c), window_size=c.window)
    o_cmp, lse = ops.compressed_attention(q, k_cmp, v_cmp, c.ks, c.st, cu_seqlens=cu, **REF)
    idx = ops.select_blocks(q, k_cmp, lse, **sel_kwargs(c), cu_seqlens=cu, **REF)
    ridx = random_block_indices(1, c.T, c.H, 3, c.bs, seed=3, lengths=LENGTHS)
    o_rnd = ops.selected_attention(q, k_slc, v_slc, ridx, c.bs, cu_seqlens=cu, **REF)
    o_win = ops.sliding_window_attention(q, k_win, v_win, c.window, cu_seqlens=cu, **REF)
    o, idx_nsa = ops.nsa(*x, **kw, cu_seqlens=cu, return_block_indices=True, **REF)
    assert torch.equal(idx, idx_nsa)
    check_selection(q, k_cmp, lse, idx, **sel_kwargs(c), cu_seqlens=cu)
    cc = 0
    for a, b in zip(CU[:-1], CU[1:]):
        n = bf.n_compressed(b - a, c.ks, c.st)
        s = slice(a, b)
        kc, vc = k_cmp[:, cc:cc + n], v_cmp[:, cc:cc + n]
        cc += n
        o1, lse1 = ops.compressed_attention(q[:, s], kc, vc, c.ks, c.st, **REF)
        assert_close(f"o_cmp[{a}:{b}]", o1, o_cmp[:, s], F64)
        assert_lse(f"lse[{a}:{b}]", lse1, lse[:, s], F64)
        idx1 = ops.select_blocks(q[:, s], kc, lse1, **sel_kwargs(c), **REF)
        assert torch.equal(idx1, idx[:, s]), f"selection of sequence [{a}:{b}]"
        o1 = ops.selected_attention(q[:, s], k_slc[:, s], v_slc[:, s], ridx[:, s], c.bs, **REF)
        assert_close(f"o_slc[{a}:{b}]", o1, o_rnd[:, s], F64)
        o1 = ops.sliding_window_attention(q[:, s], k_win[:, s], v_win[:, s], c.window, **REF)
        assert_close(f"o_win[{a}:{b}]", o1, o_win[:, s], F64)
        o1 = ops.nsa(q[:, s], kc, vc, k_slc[:, s], v_slc[:, s], k_win[:, s], v_win[:, s], g_cmp[:, s],
                     g_slc[:, s], g_win[:, s], **kw, **REF)
        assert_close(f"o[{a}:{b}]", o1, o[:, s], F64)
    assert cc == k_cmp.shape[1]


def test_varlen_vs_bruteforce():
    c = VARLEN[0]
    cu = torch.tensor(CU, dtype=torch.int32)
    x = make_inputs(c, cu_seqlens=cu, seed=5)
    kw = dict(sel_kwargs(c), window_size=c.window)
    o, idx = ops.nsa(*x, **kw, cu_seqlens=cu, return_block_indices=True, **REF)
    o_bf, idx_bf = bf.nsa(*x, **kw, cu_seqlens=cu)
    assert torch.equal(idx, idx_bf)
    assert_close("o", o_bf, o, F64)
    o_cmp, lse = ops.compressed_attention(*x[:3], c.ks, c.st, cu_seqlens=cu, **REF)
    o_bf, lse_bf = bf.compressed_attention(*x[:3], c.ks, c.st, cu_seqlens=cu)
    assert_close("o_cmp", o_bf, o_cmp, F64)
    assert_lse("lse", lse_bf, lse, F64)


# ---------------------------------------------------------------- dtypes

# relative-error bounds against float64 math on the same rounded inputs: the reference
# computes in float32, then rounds the output to the input dtype (bf16: 8 bits of mantissa).
DTYPES = [(torch.float32, 1e-5), (torch.bfloat16, 1e-2), (torch.float16, 2e-3)]


@pytest.mark.parametrize("dtype,ratio", DTYPES, ids=[str(d).split(".")[-1] for d, _ in DTYPES])
@pytest.mark.parametrize("c", [CASES[2], CASES[3], CASES[5]], ids=[CASES[i].id for i in (2, 3, 5)])
def test_dtypes(c, dtype, ratio):
    x = make_inputs(c, dtype=dtype)
    q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win = x[:7]
    o_cmp, lse = ops.compressed_attention(q, k_cmp, v_cmp, c.ks, c.st, **REF)
    assert o_cmp.dtype == dtype and lse.dtype == torch.float32
    o_bf, lse_bf = bf.compressed_attention(q, k_cmp, v_cmp, c.ks, c.st)
    assert_close("o_cmp", o_bf, o_cmp, ratio)
    assert_lse("lse", lse_bf, lse, 1e-6)

    kw = sel_kwargs(c)
    idx = ops.select_blocks(q, k_cmp, lse, **kw, **REF)
    check_selection(q, k_cmp, lse, idx, **kw, tol=1e-5)

    o = ops.selected_attention(q, k_slc, v_slc, idx, c.bs, **REF)
    assert o.dtype == dtype
    assert_close("o_slc", bf.selected_attention(q, k_slc, v_slc, idx, c.bs), o, ratio)
    o = ops.sliding_window_attention(q, k_win, v_win, c.window, **REF)
    assert o.dtype == dtype
    assert_close("o_win", bf.sliding_window_attention(q, k_win, v_win, c.window), o, ratio)

    o, idx = ops.nsa(*x, **kw, window_size=c.window, return_block_indices=True, **REF)
    assert o.dtype == dtype
    check_selection(q, k_cmp, lse, idx, **kw, tol=1e-5)
    o_bf, _ = bf.nsa(*x, **kw, window_size=c.window, block_indices=idx)
    assert_close("o", o_bf, o, ratio)


# ---------------------------------------------------------------- gradients

GC = dict(eps=1e-6, atol=1e-7, rtol=1e-5)


def _leaf(*ts):
    return [t.detach().clone().requires_grad_(True) for t in ts]


def test_gradcheck_compressed():
    c = Case("gc", 2, 13, 4, 2, 4, 3, 4, 2, 4)
    q, k_cmp, v_cmp = _leaf(*make_inputs(c)[:3])

    def f(q, k_cmp, v_cmp):
        o, lse = ops.compressed_attention(q, k_cmp, v_cmp, c.ks, c.st, **REF)
        return o, lse.masked_fill(torch.isinf(lse), 0.0)  # rows that see nothing: lse = -inf

    assert torch.autograd.gradcheck(f, (q, k_cmp, v_cmp), **GC)
    # finite, zero gradient from queries that see nothing
    o, lse = ops.compressed_attention(q, k_cmp, v_cmp, c.ks, c.st, **REF)
    (o.sum() + lse[:, c.ks - 1:].sum()).backward()
    assert torch.isfinite(q.grad).all() and torch.equal(q.grad[:, :c.ks - 1], torch.zeros_like(q.grad[:, :c.ks - 1]))


def test_gradcheck_compressed_varlen():
    c = Case("gc-varlen", 1, 16, 2, 1, 3, 2, 4, 2, 4)
    cu = torch.tensor([0, 3, 9, 16], dtype=torch.int32)
    q, k_cmp, v_cmp = _leaf(*make_inputs(c, cu_seqlens=cu)[:3])

    def f(q, k_cmp, v_cmp):
        o, lse = ops.compressed_attention(q, k_cmp, v_cmp, c.ks, c.st, cu_seqlens=cu, **REF)
        return o, lse.masked_fill(torch.isinf(lse), 0.0)

    assert torch.autograd.gradcheck(f, (q, k_cmp, v_cmp), **GC)


def test_gradcheck_selected():
    c = Case("gc", 1, 14, 4, 2, 4, 3, 4, 2, 4)
    q, _, _, k, v = make_inputs(c)[:5]
    q, k, v = _leaf(q, k, v)
    idx = random_block_indices(c.B, c.T, c.H, 3, c.bs, seed=4)
    assert torch.autograd.gradcheck(lambda q, k, v: ops.selected_attention(q, k, v, idx, c.bs, **REF), (q, k, v),
                                    **GC)


def test_gradcheck_window():
    c = Case("gc", 2, 11, 3, 1, 4, 5, 4, 2, 4)
    q, k, v = _leaf(make_inputs(c)[0], *make_inputs(c)[5:7])
    assert torch.autograd.gradcheck(lambda q, k, v: ops.sliding_window_attention(q, k, v, 3, **REF), (q, k, v),
                                    **GC)


def _selection_margin(q, k_cmp, lse, idx, c, sel):
    """Smallest score gap between a freely chosen block and an unchosen causal block (inf if none)."""
    score = reference_scores(q, k_cmp, lse, kernel_size=c.ks, stride=c.st, block_size=c.bs)
    n, ni, nl = sel
    NB = score.shape[-1]
    j = torch.arange(NB)
    tb = (torch.arange(c.T) // c.bs).view(1, -1, 1, 1)
    causal = j <= tb
    forced = ((j < ni) | (j > tb - nl)) & causal
    chosen = torch.zeros(*idx.shape[:3], NB + 1, dtype=torch.bool)
    chosen.scatter_(-1, torch.where(idx >= 0, idx.long(), NB), True)
    chosen = chosen[..., :NB]
    lo = torch.where(chosen & ~forced, score, float("inf")).amin(-1)
    hi = torch.where(causal & ~chosen, score, float("-inf")).amax(-1)
    return (lo - hi).min().item()


@pytest.mark.parametrize("sel,T", [((3, 1, 1), 11), ((3, 1, 1), 19), ((2, 0, 1), 18)],
                         ids=["all-blocks", "top-n", "top-n-no-initial"])
def test_gradcheck_nsa(sel, T):
    """Every input of nsa. Top-n has no gradient; the case's selection must not flip under the
    finite-difference perturbation, which the score margin guarantees."""
    c = Case("gc", 1, T, 2, 1, 3, 2, 4, 2, 4, sel=sel, window=3)
    x = _leaf(*make_inputs(c, seed=11))
    kw = dict(sel_kwargs(c), window_size=c.window)
    with torch.no_grad():
        _, lse = ops.compressed_attention(*x[:3], c.ks, c.st, **REF)
        idx = ops.select_blocks(x[0], x[1], lse, **sel_kwargs(c), **REF)
    margin = _selection_margin(x[0], x[1], lse, idx, c, sel)
    assert margin > 1e-3, f"selection margin {margin}: pick another seed"
    if T > 11:
        assert math.isfinite(margin), "case must exercise a real top-n choice"
    assert torch.autograd.gradcheck(lambda *a: ops.nsa(*a, **kw, **REF), tuple(x), **GC)


# ---------------------------------------------------------------- the selection checker itself

SPOILS = ["future-block", "descending", "pad-not-trailing", "repeated", "wrong-pad-count", "forced-missing",
          "lower-score-chosen"]


@pytest.mark.parametrize("spoil", SPOILS)
def test_check_selection_catches(spoil):
    """check_selection is what kernel tests rely on: it must reject each kind of wrong row."""
    c = CASES[3]  # 6 blocks of 8, 3 slots: initial 0, local = own block, one free choice
    q, k_cmp, v_cmp = make_inputs(c)[:3]
    _, lse = ops.compressed_attention(q, k_cmp, v_cmp, c.ks, c.st, **REF)
    kw = sel_kwargs(c)
    idx = ops.select_blocks(q, k_cmp, lse, **kw, **REF)
    check_selection(q, k_cmp, lse, idx, **kw)
    b, t, h = 1, 44, 0  # block 5: row [0, free, 5]
    score = reference_scores(q, k_cmp, lse, kernel_size=c.ks, stride=c.st, block_size=c.bs)[b, t, h]
    row = idx[b, t, h].tolist()
    free = row[1]
    assert row[0] == 0 and row[2] == 5
    worst = min((j for j in range(1, 5) if j != free), key=lambda j: score[j])
    pos, new_row, expect = {
        "future-block": ((b, 10, h), [0, 1, 2], "non-causal"),
        "descending": ((b, t, h), [5, free, 0], "ascending"),
        "pad-not-trailing": ((b, 10, h), [0, -1, 1], "trailing"),
        "repeated": ((b, t, h), [0, 5, 5], "repeated"),
        "wrong-pad-count": ((b, t, h), [0, 5, -1], "trailing -1"),
        "forced-missing": ((b, t, h), sorted([0, free, worst]), "forced"),
        "lower-score-chosen": ((b, t, h), [0, worst, 5], "higher score"),
    }[spoil]
    bad = idx.clone()
    bad[pos] = torch.tensor(new_row, dtype=torch.int32)
    with pytest.raises(AssertionError, match=expect):
        check_selection(q, k_cmp, lse, bad, **kw)
