"""The branch backward kernels in their gated form (``nsa.ops.fused``): given the gradient dO of
NSA's gated sum, a gate g per row and delta = g * rowsum(dO * o), each branch's gradients equal
those of the plain backward on the branch's own gradient ``dO_x = g * dO`` (float32: only the
rounding of delta differs). Every selected-attention dQ algorithm, varlen, odd group sizes."""

import pytest
import torch

import nsa.ops.selected
from nsa.ops import compressed, selected, window
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
    g = torch.sigmoid(torch.randn(B, T, HQ, generator=gen)).to(DEV)
    return gen, T, cu, do, g


def _gated_pair(bwd, o, do, g):
    """(plain backward on g * dO, gated backward on dO with its delta)."""
    ref = bwd(do=(g[..., None] * do).to(do.dtype), gate=None, delta=None)
    delta = g.float() * (do.float() * o.float()).sum(-1)
    return ref, bwd(do=do, gate=g, delta=delta)


@pytest.mark.parametrize("lens,HQ,H", [(77, 3, 1), ([5, 40, 19], 4, 2)], ids=["T77-G3", "varlen-G2"])
def test_compressed_gated(lens, HQ, H):
    ks, st, Dk, Dv = 8, 4, 16, 24
    gen, T, cu, do, g = _common(1, lens, HQ, Dv, 0)
    Tc = sum(num_compressed(n, ks, st) for n in lens) if cu is not None else num_compressed(T, ks, st)
    q = torch.randn(1, T, HQ, Dk, generator=gen).to(DEV)
    k, v = torch.randn(1, Tc, H, Dk, generator=gen).to(DEV), torch.randn(1, Tc, H, Dv, generator=gen).to(DEV)
    o, lse = compressed._fwd_op(q, k, v, ks, st, Dk ** -0.5, cu)

    def bwd(do, gate, delta):
        return compressed._bwd_op(q, k, v, o, lse, do, None, ks, st, Dk ** -0.5, cu, gate=gate, delta=delta)
    ref, out = _gated_pair(bwd, o, do, g)
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

    def bwd(do, gate, delta):
        return selected._selected_bwd_op(q, k, v, o, lse, do, idx, bs, Dk ** -0.5, cu, gate=gate, delta=delta)
    ref, out = _gated_pair(bwd, o, do, g)
    for name, a, b in zip(("dq", "dk", "dv"), ref, out):
        assert_close(name, a, b, 1e-5)


@pytest.mark.parametrize("lens,HQ,H,W", [(50, 3, 1, 7), ([5, 40, 19], 4, 2, 100)], ids=["T50-G3-W7", "varlen-W100"])
def test_window_gated(lens, HQ, H, W):
    Dk, Dv = 16, 24
    gen, T, cu, do, g = _common(1, lens, HQ, Dv, 2)
    q = torch.randn(1, T, HQ, Dk, generator=gen).to(DEV)
    k, v = torch.randn(1, T, H, Dk, generator=gen).to(DEV), torch.randn(1, T, H, Dv, generator=gen).to(DEV)
    o, lse = window._window_fwd_op(q, k, v, W, Dk ** -0.5, cu)

    def bwd(do, gate, delta):
        return window._window_bwd_op(q, k, v, o, lse, do, W, Dk ** -0.5, cu, gate=gate, delta=delta)
    ref, out = _gated_pair(bwd, o, do, g)
    for name, a, b in zip(("dq", "dk", "dv"), ref, out):
        assert_close(name, a, b, 1e-5)


def test_gate_without_delta_is_refused():
    q = torch.randn(1, 20, 2, 16, device=DEV)
    k, v = torch.randn(1, 20, 1, 16, device=DEV), torch.randn(1, 20, 1, 16, device=DEV)
    o, lse = window._window_fwd_op(q, k, v, 4, 0.25, None)
    g = torch.rand(1, 20, 2, device=DEV)
    with pytest.raises(ValueError, match="gate needs its delta"):
        window._window_bwd_op(q, k, v, o, lse, o, 4, 0.25, None, gate=g)
