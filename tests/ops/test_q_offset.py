"""Queries that start later than their keys (``q_offset``, ``cu_seqlens_k``) through the public ops.

The oracle is the ordinary call on the whole sequence: an offset call on the last rows of the
queries must give exactly those rows of the whole call's outputs, and the gradients that the whole
call gives when only those rows carry an upstream gradient. Checked for the reference (the
specification itself), the 'torch' backend and the Triton kernels (interpreter on CPU), dense and
packed (a different offset per sequence), every branch and the gated whole; and the ValueErrors of
the new arguments.
"""

from __future__ import annotations

import pytest
import torch

import nsa.ops as ops
from nsa.ops import reference
from nsa.ops.utils import compressed_cu_seqlens, num_compressed

from ..helpers import assert_close
from .test_reference import random_block_indices

KS, ST, BS, SEL, WIN = 8, 4, 8, dict(num_selected=3, num_initial=1, num_local=1), 9
HQ, H, DK, DV = 4, 2, 16, 8
BRANCH = dict(kernel_size=KS, stride=ST)
NSA_KW = dict(kernel_size=KS, stride=ST, block_size=BS, window_size=WIN, **SEL)

# (key lengths, query lengths) per sequence; a dense case has one of each per batch row
DENSE = [(70, 70), (70, 33), (70, 1), (13, 5), (5, 2)]
PACKED = [((40, 13, 50, 9), (40, 1, 17, 9)), ((7, 66), (3, 30))]


def _rand(*shape, dtype, gen):
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)


def _whole(lens_k, B, dtype, seed=0):
    """Inputs of the whole sequences (queries of every key position): q, k_cmp, v_cmp, k, v, gates."""
    gen = torch.Generator().manual_seed(seed)
    Tk = sum(lens_k)
    tc = sum(num_compressed(n, KS, ST) for n in lens_k)
    q = _rand(B, Tk, HQ, DK, dtype=dtype, gen=gen)
    kc, vc = _rand(B, tc, H, DK, dtype=dtype, gen=gen), _rand(B, tc, H, DV, dtype=dtype, gen=gen)
    k, v = _rand(B, Tk, H, DK, dtype=dtype, gen=gen), _rand(B, Tk, H, DV, dtype=dtype, gen=gen)
    gates = [torch.sigmoid(_rand(B, Tk, HQ, dtype=torch.float64, gen=gen)).to(dtype) for _ in range(3)]
    return q, kc, vc, k, v, gates


def _rows(lens_k, lens_q):
    """Row indices (into the whole packing) of the queries of the offset call."""
    rows, a = [], 0
    for nk, nq in zip(lens_k, lens_q):
        rows += range(a + nk - nq, a + nk)
        a += nk
    return torch.tensor(rows)


def _cu(lens):
    return torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)


def _setups(dtype):
    """(id, B, lens_k, lens_q, position kwargs, whole kwargs) of every case."""
    out = []
    for nk, nq in DENSE:
        out.append((f"dense-{nk}-{nq}", 2, [nk], [nq], dict(q_offset=nk - nq), {}))
    for lk, lq in PACKED:
        cu_q, cu_k = _cu(lq), _cu(lk)
        out.append((f"packed-{len(lk)}", 1, list(lk), list(lq), dict(cu_seqlens=cu_q, cu_seqlens_k=cu_k),
                    dict(cu_seqlens=cu_k)))
    return out


SETUP_IDS = [s[0] for s in _setups(torch.float64)]


def _run_branch(op, backend, q, kc, vc, k, v, gates, idx, pos):
    if op == "compressed":
        return ops.compressed_attention(q, kc, vc, **BRANCH, backend=backend, **pos)
    if op == "selected":
        return ops.selected_attention(q, k, v, idx, block_size=BS, backend=backend, **pos)
    if op == "window":
        return ops.sliding_window_attention(q, k, v, window_size=WIN, backend=backend, **pos)
    return ops.nsa(q, kc, vc, k, v, k, v, *gates, **NSA_KW, backend=backend, return_block_indices=True, **pos)


def _outputs(op, out):
    """The differentiable output and what else to compare (lse, block ids)."""
    if op == "compressed":
        return out[0], out[1]
    if op == "nsa":
        return out[0], out[1]
    return out, None


def _check(op, backend, dtype, setup, tol):
    _, B, lk, lq, pos, whole_kw = setup
    q, kc, vc, k, v, gates = _whole(lk, B, dtype)
    rows = _rows(lk, lq)
    Tk = sum(lk)
    idx_whole = random_block_indices(B, Tk, H, 3, BS, seed=1, lengths=lk)
    leaves = [q, kc, vc, k, v, *gates]
    for t in leaves:
        t.requires_grad_(True)
    # the whole call, upstream gradient only on the offset call's rows
    ref = _run_branch(op, "reference", q, kc, vc, k, v, gates, idx_whole, whole_kw)
    o_ref, extra_ref = _outputs(op, ref)
    do = torch.zeros_like(o_ref)
    do[:, rows] = _rand(*o_ref[:, rows].shape, dtype=o_ref.dtype, gen=torch.Generator().manual_seed(2))
    g_ref = torch.autograd.grad(o_ref, leaves, do, allow_unused=True)
    # the offset call on the last rows
    sub = [t.detach()[:, rows].requires_grad_(True) for t in (q, *gates)]
    q_s, gates_s = sub[0], sub[1:]
    kv = [t.detach().requires_grad_(True) for t in (kc, vc, k, v)]
    out = _run_branch(op, backend, q_s, *kv, gates_s, idx_whole[:, rows].contiguous(), pos)
    o, extra = _outputs(op, out)
    assert_close(f"{op} o", o_ref[:, rows], o, tol)
    if extra is not None and extra.dtype == torch.int32:
        assert torch.equal(extra_ref[:, rows], extra), f"{op}: block ids differ"
    elif extra is not None:
        fin = torch.isfinite(extra_ref[:, rows])
        assert torch.equal(fin, torch.isfinite(extra)), f"{op}: lse -inf pattern differs"
        assert_close(f"{op} lse", extra_ref[:, rows][fin], extra[fin].to(extra_ref.dtype), tol)
    used = [(n, a, b) for n, a, b in zip(("q", "k_cmp", "v_cmp", "k", "v", "g_cmp", "g_slc", "g_win"),
                                         [q, kc, vc, k, v, *gates], [q_s, *kv, *gates_s]) if b.requires_grad]
    grads = torch.autograd.grad(o, [b for _, _, b in used], do[:, rows], allow_unused=True)
    for (name, a, b), g in zip(used, grads):
        r = g_ref[[id(x) for x in leaves].index(id(a))]
        if r is None:
            assert g is None or not g.any(), f"{op} d{name}: nonzero where the whole call has none"
            continue
        if b is q_s or name.startswith("g_"):
            r = r[:, rows]
        assert_close(f"{op} d{name}", r, torch.zeros_like(r) if g is None else g, tol)


@pytest.mark.parametrize("setup", _setups(torch.float64), ids=SETUP_IDS)
@pytest.mark.parametrize("op", ["compressed", "selected", "window", "nsa"])
def test_reference_offset_is_the_whole_calls_last_rows(op, setup):
    """The specification's offset rule against its own whole-sequence rule (itself checked
    against the brute force in test_reference.py)."""
    _check(op, "reference", torch.float64, setup, 1e-12)


@pytest.mark.parametrize("setup", _setups(torch.float64), ids=SETUP_IDS)
@pytest.mark.parametrize("op", ["compressed", "selected", "window", "nsa"])
def test_torch_backend_offset(op, setup):
    _check(op, "torch", torch.float64, setup, 1e-12)


@pytest.mark.parametrize("setup", _setups(torch.float32), ids=SETUP_IDS)
@pytest.mark.parametrize("op", ["compressed", "selected", "window", "nsa"])
def test_triton_offset(op, setup):
    """The kernels (interpreter on CPU), float32, through the public ops (nsa: the fused node)."""
    _check(op, "triton", torch.float32, setup, 2e-5)


def test_select_blocks_offset_rows():
    """select_blocks with an offset: the whole call's rows, for the reference and the torch backend."""
    lk, lq = [70], [29]
    q, kc, vc, *_ = _whole(lk, 2, torch.float64)
    _, lse = reference.compressed_attention(q, kc, vc, KS, ST)
    want = reference.select_blocks(q, kc, lse, KS, ST, BS, **SEL)[:, -29:]
    for backend in ("reference", "torch"):
        got = ops.select_blocks(q[:, -29:], kc, lse[:, -29:], **BRANCH, block_size=BS, **SEL, backend=backend,
                                q_offset=41)
        assert torch.equal(want, got), backend


# ---------------------------------------------------------------- errors


def _small():
    q = torch.randn(1, 6, HQ, DK)
    k, v = torch.randn(1, 10, H, DK), torch.randn(1, 10, H, DV)
    tc = num_compressed(10, KS, ST)
    return q, torch.randn(1, tc, H, DK), torch.randn(1, tc, H, DV), k, v


@pytest.mark.parametrize("kw,match", [
    (dict(q_offset=-1), "q_offset: expected an int >= 0"),
    (dict(q_offset=True), "q_offset: expected an int >= 0"),
    (dict(q_offset=3), r"k: expected 9 tokens \(q_offset \+ T = 3 \+ 6\), got 10"),
    (dict(cu_seqlens_k=torch.tensor([0, 10], dtype=torch.int32)), "cu_seqlens_k: needs cu_seqlens"),
])
def test_bad_positions_dense(kw, match):
    q, kc, vc, k, v = _small()
    with pytest.raises(ValueError, match=match):
        ops.sliding_window_attention(q, k, v, window_size=4, **kw)


def test_bad_positions_packed():
    q, kc, vc, k, v = _small()
    cu_q = torch.tensor([0, 2, 6], dtype=torch.int32)
    with pytest.raises(ValueError, match="q_offset: packed input"):
        ops.sliding_window_attention(q, k, v, cu_seqlens=cu_q, q_offset=4,
                                     cu_seqlens_k=torch.tensor([0, 5, 10], dtype=torch.int32))
    with pytest.raises(ValueError, match="fewer than its 4 queries"):
        ops.sliding_window_attention(q, k, v, cu_seqlens=cu_q, cu_seqlens_k=torch.tensor([0, 7, 10], dtype=torch.int32))
    with pytest.raises(ValueError, match="cu_seqlens_k: expected 3 offsets"):
        ops.sliding_window_attention(q, k, v, cu_seqlens=cu_q, cu_seqlens_k=torch.tensor([0, 10], dtype=torch.int32))
    with pytest.raises(ValueError, match="cu_seqlens_k: expected an int32"):
        ops.sliding_window_attention(q, k, v, cu_seqlens=cu_q, cu_seqlens_k=torch.tensor([0, 5, 10]))
    with pytest.raises(ValueError, match=r"k: expected 9 tokens \(cu_seqlens_k\[-1\] = 9\)"):
        ops.sliding_window_attention(q, k, v, cu_seqlens=cu_q, cu_seqlens_k=torch.tensor([0, 5, 9], dtype=torch.int32))


def test_bad_compressed_count_and_blocks_with_offset():
    q, kc, vc, k, v = _small()
    with pytest.raises(ValueError, match="k_cmp: expected 2 compressed tokens"):
        ops.compressed_attention(q, kc, vc, **BRANCH, q_offset=6)  # 12 keys: 2 tokens, not 1
    with pytest.raises(ValueError, match="k_cmp: expected 0 compressed tokens"):
        ops.compressed_attention(q, kc, vc, **BRANCH)  # 6 keys: none
    assert ops.compressed_attention(q, kc, vc, **BRANCH, q_offset=4)[0].shape == (1, 6, HQ, DV)
    idx = torch.full((1, 6, H, 2), -1, dtype=torch.int32)
    idx[..., 0] = 1  # block 1 = keys 8..9: exists for 10 keys
    ops.selected_attention(q, k, v, idx, block_size=BS, q_offset=4)
    idx[0, 0, 0, 1] = 2  # no block 2 in 10 keys
    with pytest.raises(ValueError, match="block_indices: entries must be -1 or a block index"):
        ops.selected_attention(q, k, v, idx, block_size=BS, q_offset=4)


def test_no_offset_calls_backends_as_before(monkeypatch):
    """q_offset=0 without cu_seqlens_k passes no position arguments: a backend that does not take
    them is called exactly as before."""
    seen = {}

    def fake(q, k, v, window_size, scale, cu_seqlens, **kw):
        seen.update(kw)
        return torch.zeros(*q.shape[:3], v.shape[-1])

    from nsa.ops import api
    monkeypatch.setattr(api, "resolve_backend", lambda backend, op, device: fake)
    q, _, _, k, v = _small()
    ops.sliding_window_attention(q[:, :6], k[:, :6], v[:, :6], window_size=4, q_offset=0)
    assert seen == {}
    ops.sliding_window_attention(q, k, v, window_size=4, q_offset=4)
    assert seen == {"q_offset": 4, "cu_seqlens_k": None}


def test_compressed_cu_seqlens_of_keys():
    """Packed compressed keys follow the raw keys' lengths (not the queries')."""
    cu_k = _cu([40, 13])
    assert compressed_cu_seqlens(cu_k, KS, ST).tolist() == [0, 9, 11]
