"""The gates folded into the branch backward (``nsa.ops.fused``): for a gate g >= 0 per row, the
plain backward on the branch's gradient ``g * dO`` equals the backward on ``dO`` itself with
``lse' = lse - log g`` and a given ``delta = rowsum(dO * o)`` (float32: rounding only). Every
selected-attention dQ algorithm, varlen, odd group sizes, rows with g = 0; and the kernel that
forms dg, lse' and delta."""

import pytest
import torch

import nsa.ops.selected
from nsa.ops import compressed, gate, selected, window
from nsa.ops.utils import num_compressed
from tests.helpers import assert_close
from tests.ops.test_selected_triton import random_block_indices

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _common(B, lens, HQ, Dv, seed):
    gen = torch.Generator().manual_seed(seed)
    T = sum(lens) if isinstance(lens, list) else lens
    cu = None
    if isinstance(lens, list):
        cu = torch.tensor([0] + lens, dtype=torch.int32).cumsum(0).to(torch.int32).to(DEV)
    do = torch.randn(B, T, HQ, Dv, generator=gen).to(DEV)
    g = torch.sigmoid(torch.randn(B, T, HQ, generator=gen))
    g[..., 0, :] = 0.  # a position whose gate is closed: lse' = +inf
    return gen, T, cu, do, g.to(DEV)


def _folded_pair(bwd, o, lse, do, g, log):
    """(plain backward on g * dO, backward on dO with lse' = lse - log g and delta = rowsum(dO * o))."""
    ref = bwd(do=(g[..., None] * do).to(do.dtype), lse=lse, delta=None)
    lse2 = torch.where(lse == float("-inf"), lse, lse - log(g))
    return ref, bwd(do=do, lse=lse2, delta=(do.float() * o.float()).sum(-1))


@pytest.mark.parametrize("lens,HQ,H", [(77, 3, 1), ([5, 40, 19], 4, 2)], ids=["T77-G3", "varlen-G2"])
def test_compressed_gated(lens, HQ, H):
    ks, st, Dk, Dv = 8, 4, 16, 24
    gen, T, cu, do, g = _common(1, lens, HQ, Dv, 0)
    Tc = sum(num_compressed(n, ks, st) for n in lens) if cu is not None else num_compressed(T, ks, st)
    q = torch.randn(1, T, HQ, Dk, generator=gen).to(DEV)
    k, v = torch.randn(1, Tc, H, Dk, generator=gen).to(DEV), torch.randn(1, Tc, H, Dv, generator=gen).to(DEV)
    o, lse = compressed._fwd_op(q, k, v, ks, st, Dk ** -0.5, cu)

    def bwd(do, lse, delta):
        return compressed._bwd_op(q, k, v, o, lse, do, None, ks, st, Dk ** -0.5, cu, delta=delta)
    ref, out = _folded_pair(bwd, o, lse, do, g, torch.log)
    for name, a, b in zip(("dq", "dk", "dv"), ref, out):
        assert_close(name, a, b, 1e-5)


@pytest.mark.parametrize("dq_mode", ["gather", "scatter"])
@pytest.mark.parametrize("lens,HQ,H,S,bs", [(65, 3, 1, 3, 16), ([1, 37, 60], 16, 1, 4, 32), (40, 4, 2, 2, 8)],
                         ids=["T65-G3", "varlen-G16", "T40-G2-H2"])
def test_selected_gated(monkeypatch, dq_mode, lens, HQ, H, S, bs):
    monkeypatch.setattr(nsa.ops.selected, "DQ_MODE", dq_mode)
    Dk, Dv = 16, 24
    gen, T, cu, do, g = _common(1, lens, HQ, Dv, 1)
    q = torch.randn(1, T, HQ, Dk, generator=gen).to(DEV)
    k, v = torch.randn(1, T, H, Dk, generator=gen).to(DEV), torch.randn(1, T, H, Dv, generator=gen).to(DEV)
    idx = random_block_indices(lens if cu is not None else [T], H, S, bs, True, gen).to(DEV)
    o, lse = selected._selected_fwd_op(q, k, v, idx, bs, Dk ** -0.5, cu)

    def bwd(do, lse, delta):
        return selected._selected_bwd_op(q, k, v, o, lse, do, idx, bs, Dk ** -0.5, cu, delta=delta)
    ref, out = _folded_pair(bwd, o, lse, do, g, torch.log)
    for name, a, b in zip(("dq", "dk", "dv"), ref, out):
        assert_close(name, a, b, 1e-5)


@pytest.mark.parametrize("lens,HQ,H,W", [(50, 3, 1, 7), ([5, 40, 19], 4, 2, 100)], ids=["T50-G3-W7", "varlen-W100"])
def test_window_gated(lens, HQ, H, W):
    Dk, Dv = 16, 24
    gen, T, cu, do, g = _common(1, lens, HQ, Dv, 2)
    q = torch.randn(1, T, HQ, Dk, generator=gen).to(DEV)
    k, v = torch.randn(1, T, H, Dk, generator=gen).to(DEV), torch.randn(1, T, H, Dv, generator=gen).to(DEV)
    o, lse = window._window_fwd_op(q, k, v, W, Dk ** -0.5, cu)

    def bwd(do, lse, delta):  # the window kernels keep lse in base 2
        return window._window_bwd_op(q, k, v, o, lse, do, W, Dk ** -0.5, cu, delta=delta)
    ref, out = _folded_pair(bwd, o, lse, do, g, torch.log2)
    for name, a, b in zip(("dq", "dk", "dv"), ref, out):
        assert_close(name, a, b, 1e-5)


def test_gate_bwd_fused_kernel():
    """dg, delta and lse' of the three branches against their definitions; lse = -inf rows (saw
    nothing) stay -inf, g = 0 rows get +inf."""
    gen = torch.Generator().manual_seed(3)
    B, T, HQ, Dv = 2, 37, 3, 24
    do, o = (torch.randn(B, T, HQ, Dv, generator=gen).to(DEV) for _ in range(2))
    os_ = [o, o * 0.5, o + 1]
    gs = [torch.sigmoid(torch.randn(B, T, HQ, generator=gen)).to(DEV) for _ in range(3)]
    gs[1][0, 3] = 0.
    lses = [torch.randn(B, T, HQ, generator=gen).to(DEV) for _ in range(3)]
    lses[0][1, :5] = float("-inf")
    dg_c, dg_s, dg_w, lse2, delta = gate.gate_bwd_fused(do, *os_, *gs, *lses)
    for x, (dg, ox, g, lse, log) in enumerate(zip((dg_c, dg_s, dg_w), os_, gs, lses, (torch.log, torch.log, torch.log2))):
        want = (do * ox).sum(-1)
        assert_close(f"dg[{x}]", want, dg, 1e-6)
        assert_close(f"delta[{x}]", want, delta[x], 1e-6)
        want_lse = torch.where(lse == float("-inf"), lse, lse - log(g))
        assert torch.equal(torch.isinf(want_lse), torch.isinf(lse2[x])), f"lse'[{x}]: infinities differ"
        fin = torch.isfinite(want_lse)
        assert_close(f"lse'[{x}]", want_lse[fin], lse2[x][fin], 1e-6)
    assert lse2[1][0, 3].eq(float("inf")).all() and lse2[0][1, :5].eq(float("-inf")).all()


def test_compressed_delta_and_dlse_are_exclusive():
    q = torch.randn(1, 20, 2, 16, device=DEV)
    k, v = torch.randn(1, 4, 1, 16, device=DEV), torch.randn(1, 4, 1, 16, device=DEV)
    o, lse = compressed._fwd_op(q, k, v, 8, 4, 0.25, None)
    with pytest.raises(ValueError, match="not both"):
        compressed._bwd_op(q, k, v, o, lse, o, lse, 8, 4, 0.25, None, delta=lse)


@pytest.mark.parametrize("n_add", [1, 2])
def test_window_dq_adds_other_branches(n_add):
    """The window dQ kernel's epilogue adds NSA's other branches' dq (float32, one rounding)."""
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(2, 30, 4, 16, generator=gen).to(DEV)
    k, v = torch.randn(2, 30, 2, 16, generator=gen).to(DEV), torch.randn(2, 30, 2, 8, generator=gen).to(DEV)
    do = torch.randn(2, 30, 4, 8, generator=gen).to(DEV)
    adds = [torch.randn(2, 30, 4, 16, generator=gen).to(DEV) for _ in range(n_add)]
    o, lse = window._window_fwd_op(q, k, v, 9, 0.25, None)
    dq, dk, dv = window._window_bwd_op(q, k, v, o, lse, do, 9, 0.25, None)
    dq2, dk2, dv2 = window._window_bwd_op(q, k, v, o, lse, do, 9, 0.25, None, None, *adds)  # delta None
    assert_close("dq", dq + sum(adds), dq2, 1e-6)
    assert torch.equal(dk, dk2) and torch.equal(dv, dv2)
