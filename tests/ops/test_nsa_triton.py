"""The whole NSA pipeline with the Triton backend (compressed attention, selection, selected and
window attention, gate combination) against the reference: output, every gradient (q, the three
key/value pairs, the three gates) and the selection (tie-aware). Both Triton paths: the gates
applied inside the branch kernels (one autograd node, ``nsa.ops.fused``) and the composed one."""

import pytest
import torch

from nsa.ops import api as ops_api
from nsa.ops import nsa, reference
from tests.helpers import assert_close
from tests.ops.selection_check import check_selection

DEV = "cuda" if torch.cuda.is_available() else "cpu"

# (B, T, HQ, H, Dk, Dv, kernel_size, stride, block_size, num_selected, window, lens)
CASES = {
    "T1": (1, 1, 2, 1, 16, 16, 8, 4, 8, 2, 4, None),
    "odd-G3": (1, 77, 3, 1, 16, 8, 8, 4, 8, 3, 10, None),
    "B2-G2-DkDv": (2, 50, 4, 2, 24, 16, 16, 8, 16, 3, 20, None),
    "G16": (1, 40, 16, 1, 16, 16, 8, 4, 8, 4, 16, None),
    "varlen": (1, 0, 2, 2, 16, 16, 8, 4, 8, 3, 9, [5, 40, 19]),
}


def _inputs(B, T, HQ, H, Dk, Dv, ks, st, lens, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g).to(DEV, dtype).requires_grad_(True)  # noqa: E731
    if lens is not None:
        T = sum(lens)
        Tc = sum((n - ks) // st + 1 for n in lens if n >= ks)
        cu = torch.tensor([0] + lens, device=DEV).cumsum(0).to(torch.int32)
    else:
        Tc = (T - ks) // st + 1 if T >= ks else 0
        cu = None
    q = mk(B, T, HQ, Dk)
    kc, vc = mk(B, Tc, H, Dk), mk(B, Tc, H, Dv)
    ks_, vs_, kw, vw = mk(B, T, H, Dk), mk(B, T, H, Dv), mk(B, T, H, Dk), mk(B, T, H, Dv)
    gates = [torch.sigmoid(torch.randn(B, T, HQ, generator=g)).to(DEV, dtype).requires_grad_(True)
             for _ in range(3)]
    return [q, kc, vc, ks_, vs_, kw, vw, *gates], cu


@pytest.fixture(params=[True, False], ids=["fused", "composed"])
def fused(request, monkeypatch):
    monkeypatch.setattr(ops_api, "FUSED_GATES", request.param)
    return request.param


def _path(o) -> str:
    return "fused" if type(o.grad_fn).__name__.startswith("NSAFunction") else "composed"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", list(CASES))
def test_nsa_triton_matches_reference(case, dtype, fused):
    B, T, HQ, H, Dk, Dv, ks, st, bs, n, w, lens = CASES[case]
    x, cu = _inputs(B, T, HQ, H, Dk, Dv, ks, st, lens, dtype)
    kw = dict(kernel_size=ks, stride=st, block_size=bs, num_selected=n, num_initial=1, num_local=1,
              window_size=w, cu_seqlens=cu)
    o, idx = nsa(*x, **kw, return_block_indices=True, backend="triton")
    assert _path(o) == ("fused" if fused else "composed")
    dout = torch.randn_like(o)
    grads = torch.autograd.grad(o, x, dout)

    q, kc, vc = x[:3]
    _, lse = reference.compressed_attention(q.float(), kc.float(), vc.float(), ks, st, None, cu)
    check_selection(q.float(), kc.float(), lse, idx, kernel_size=ks, stride=st, block_size=bs, num_selected=n,
                    num_initial=1, num_local=1, cu_seqlens=cu, tol=1e-5)

    # the reference composed with the kernel's selection (a float32 near-tie may pick either block)
    xr = [t.detach().float().requires_grad_(True) for t in x]
    o_cmp, _ = reference.compressed_attention(xr[0], xr[1], xr[2], ks, st, None, cu)
    o_slc = reference.selected_attention(xr[0], xr[3], xr[4], idx, bs, None, cu)
    o_win = reference.sliding_window_attention(xr[0], xr[5], xr[6], w, None, cu)
    o_ref = reference.gate_combine(o_cmp, o_slc, o_win, xr[7], xr[8], xr[9], torch.float32)
    grads_ref = torch.autograd.grad(o_ref, xr, dout.float())

    ratio = 1e-5 if dtype == torch.float32 else 2e-2  # bf16: inputs exact, p/ds rounded to bf16 in the dots
    assert_close("o", o_ref, o.float(), ratio)
    names = ["q", "k_cmp", "v_cmp", "k_slc", "v_slc", "k_win", "v_win", "g_cmp", "g_slc", "g_win"]
    for name, a, b in zip(names, grads_ref, grads):
        if a.numel():
            assert_close(f"d{name}", a, b.float(), ratio)


def test_nsa_triton_selection_equals_reference_fp32():
    """Away from near-ties the kernel selects exactly what the reference selects."""
    B, T, HQ, H, Dk, Dv, ks, st, bs, n, w, lens = CASES["odd-G3"]
    x, cu = _inputs(B, T, HQ, H, Dk, Dv, ks, st, lens, torch.float32, seed=3)
    kw = dict(kernel_size=ks, stride=st, block_size=bs, num_selected=n, num_initial=1, num_local=1, window_size=w)
    _, idx_t = nsa(*x, **kw, return_block_indices=True, backend="triton")
    _, idx_r = nsa(*x, **kw, return_block_indices=True, backend="reference")
    assert (idx_t == idx_r).all(-1).float().mean().item() >= 0.99


def _grads(x, kw, dout):
    o = nsa(*x, **kw, backend="triton")
    return o, torch.autograd.grad(o, [t for t in x if t.requires_grad], dout)


def test_fused_gates_match_composed_and_are_deterministic(monkeypatch):
    """The fused backward against the composed one (float32: only delta's rounding differs), run
    twice for bitwise reproducibility; keys shared by the selected and window branches (one
    tensor in two arguments) and inputs that need no gradient."""
    B, T, HQ, H, Dk, Dv, ks, st, bs, n, w, lens = CASES["B2-G2-DkDv"]
    x, cu = _inputs(B, T, HQ, H, Dk, Dv, ks, st, lens, torch.float32, seed=5)
    x[5], x[6] = x[3], x[4]  # k_win = k_slc, v_win = v_slc
    x[1] = x[1].detach()  # k_cmp needs no gradient
    kw = dict(kernel_size=ks, stride=st, block_size=bs, num_selected=n, num_initial=1, num_local=1, window_size=w)
    dout = torch.randn(B, T, HQ, Dv, generator=torch.Generator().manual_seed(1)).to(DEV)
    o_f, g_f = _grads(x, kw, dout)
    assert _path(o_f) == "fused"
    _, g_f2 = _grads(x, kw, dout)
    for a, b in zip(g_f, g_f2):
        assert torch.equal(a, b), "fused backward not bitwise reproducible"
    monkeypatch.setattr(ops_api, "FUSED_GATES", False)
    o_c, g_c = _grads(x, kw, dout)
    assert _path(o_c) == "composed"
    assert torch.equal(o_f, o_c)
    names = ["q", "v_cmp", "k_slc", "v_slc", "k_win", "v_win", "g_cmp", "g_slc", "g_win"]
    for name, a, b in zip(names, g_c, g_f):
        assert_close(f"d{name}", a, b, 1e-5)


def test_fused_gates_float64_takes_the_composed_path():
    B, T, HQ, H, Dk, Dv, ks, st, bs, n, w, lens = CASES["odd-G3"]
    x, cu = _inputs(B, T, HQ, H, Dk, Dv, ks, st, lens, torch.float64)
    kw = dict(kernel_size=ks, stride=st, block_size=bs, num_selected=n, num_initial=1, num_local=1, window_size=w)
    assert _path(nsa(*x, **kw, backend="triton")) == "composed"


def test_fused_node_with_negative_gates(monkeypatch):
    """Gates below 0 have no logarithm to fold into lse: the node's backward takes the composed
    route (dO_x materialized) and still matches the reference."""
    B, T, HQ, H, Dk, Dv, ks, st, bs, n, w, lens = CASES["odd-G3"]
    x, cu = _inputs(B, T, HQ, H, Dk, Dv, ks, st, lens, torch.float32, seed=7)
    with torch.no_grad():
        x[8] -= 0.5  # g_slc in (-0.5, 0.5)
    kw = dict(kernel_size=ks, stride=st, block_size=bs, num_selected=n, num_initial=1, num_local=1, window_size=w)
    dout = torch.randn(B, T, HQ, Dv, generator=torch.Generator().manual_seed(2)).to(DEV)
    o_f, g_f = _grads(x, kw, dout)
    assert _path(o_f) == "fused"
    monkeypatch.setattr(ops_api, "FUSED_GATES", False)
    _, g_c = _grads(x, kw, dout)
    names = ["q", "k_cmp", "v_cmp", "k_slc", "v_slc", "k_win", "v_win", "g_cmp", "g_slc", "g_win"]
    for name, a, b in zip(names, g_c, g_f):  # same kernels and inputs; dq summed in another order
        assert_close(f"d{name}", a, b, 1e-6)
