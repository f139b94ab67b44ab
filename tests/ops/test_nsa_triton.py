"""The whole NSA pipeline with the Triton backend (compressed attention, selection, selected and
window attention, gate combination) against the reference: output, every gradient (q, the three
key/value pairs, the three gates) and the selection (tie-aware)."""

import pytest
import torch

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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", list(CASES))
def test_nsa_triton_matches_reference(case, dtype):
    B, T, HQ, H, Dk, Dv, ks, st, bs, n, w, lens = CASES[case]
    x, cu = _inputs(B, T, HQ, H, Dk, Dv, ks, st, lens, dtype)
    kw = dict(kernel_size=ks, stride=st, block_size=bs, num_selected=n, num_initial=1, num_local=1,
              window_size=w, cu_seqlens=cu)
    o, idx = nsa(*x, **kw, return_block_indices=True, backend="triton")
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
