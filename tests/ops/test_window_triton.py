"""Triton sliding-window attention vs the reference (CPU interpreter; compiled kernels on CUDA).

Every case runs the public :func:`nsa.ops.sliding_window_attention` with ``backend='triton'`` and
compares o, dq, dk and dv with the reference evaluated in float32 on the same input values
(bf16/fp16 inputs are upcast, so both sides see identical numbers).

Tolerances (relative Frobenius error; observed maxima while writing in brackets):
fp32 1e-5 [5e-7]: IEEE fp32 products (no TF32), summed in another order than the dense reference.
bf16 2e-2 [7e-3]: the kernel rounds p and ds to bf16 before the second matmul of each pair and
rounds its outputs to bf16 (unit roundoff 2^-8 = 3.9e-3 per rounding); the reference keeps fp32.
fp16 2e-3 [4e-4]: the same with unit roundoff 2^-11.

window_size = 1: o = v exactly, and dq, dk are exactly zero in exact arithmetic (p = 1 so
ds = dp - delta = 0); both sides then hold rounding noise, so these are checked to be tiny in
absolute terms instead of relative to the (noise) reference.
"""

import pytest
import torch

import nsa.ops as ops
from nsa.ops import window as win
from tests.helpers import assert_close, assert_compile_matches_eager

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
RATIO = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3, torch.float64: 1e-5}

# id, B, T, H, G, Dk, Dv, window, dtype
CASES = [
    ("T1-W1-G1", 2, 1, 2, 1, 16, 16, 1, torch.float32),
    ("T1-W1000-G3", 1, 1, 1, 3, 24, 40, 1000, torch.float32),
    ("T7-W5-G2", 2, 7, 2, 2, 16, 24, 5, torch.float32),
    ("T7-W1000-G16", 1, 7, 1, 16, 24, 16, 1000, torch.float32),
    ("T65-W1-G3", 1, 65, 1, 3, 16, 24, 1, torch.float32),
    ("T65-W5-G1", 2, 65, 2, 1, 24, 40, 5, torch.float32),
    ("T65-W64-G2", 1, 65, 2, 2, 40, 24, 64, torch.float32),
    ("T65-W64-G16", 1, 65, 1, 16, 16, 24, 64, torch.float32),
    ("T65-W1000-G16", 1, 65, 1, 16, 16, 16, 1000, torch.float32),
    ("T200-W5-G3", 1, 200, 1, 3, 16, 24, 5, torch.float32),
    ("T200-W64-G1", 1, 200, 2, 1, 24, 16, 64, torch.float32),
    ("T130-W40-G16", 1, 130, 1, 16, 16, 16, 40, torch.float32),
    ("T200-W1000-G2", 1, 200, 1, 2, 16, 24, 1000, torch.float32),
    ("T50-W20-G32", 1, 50, 1, 32, 16, 16, 20, torch.float32),
    ("T65-W5-G2-bf16", 2, 65, 1, 2, 16, 24, 5, torch.bfloat16),
    ("T200-W64-G3-bf16", 1, 200, 1, 3, 24, 16, 64, torch.bfloat16),
    ("T65-W1000-G16-bf16", 1, 65, 1, 16, 16, 24, 1000, torch.bfloat16),
    ("T65-W64-G2-fp16", 1, 65, 1, 2, 24, 16, 64, torch.float16),
    # Dk as two tiles in the forward's q . k (triton_utils.split_dim): 96 = 64 + 32, 48 = 32 + 16
    ("T200-W64-G16-dk96-bf16", 1, 200, 1, 16, 96, 32, 64, torch.bfloat16),
    ("T65-W40-G2-dk48-fp16", 1, 65, 2, 2, 48, 16, 40, torch.float16),
]

# id, sequence lengths, H, G, Dk, Dv, window, dtype
VARLEN_CASES = [
    ("len1-37-100-W1-G1", [1, 37, 100], 2, 1, 16, 24, 1, torch.float32),
    ("len1-37-100-W5-G3", [1, 37, 100], 1, 3, 24, 16, 5, torch.float32),
    ("len1-37-100-W64-G2", [1, 37, 100], 2, 2, 16, 24, 64, torch.float32),
    ("len1-37-100-W1000-G16", [1, 37, 100], 1, 16, 16, 16, 1000, torch.float32),
    ("len100-1-37-W64-G2-bf16", [100, 1, 37], 1, 2, 24, 16, 64, torch.bfloat16),
    ("len100-1-37-W64-G16-dk96-bf16", [100, 1, 37], 1, 16, 96, 32, 64, torch.bfloat16),
]


def _inputs(B, T, H, G, Dk, Dv, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H * G, Dk, generator=gen)
    k = torch.randn(B, T, H, Dk, generator=gen)
    v = torch.randn(B, T, H, Dv, generator=gen)
    return [x.to(DEVICE, dtype).requires_grad_() for x in (q, k, v)]


def _cu(lens):
    return torch.tensor([0] + lens).cumsum(0).to(torch.int32).to(DEVICE)


def _run(q, k, v, window, cu, backend, do):
    """Forward, then the gradients of sum(o * do); returns o, (dq, dk, dv)."""
    o = ops.sliding_window_attention(q, k, v, window, cu_seqlens=cu, backend=backend)
    grads = torch.autograd.grad((o.float() * do).sum(), (q, k, v))
    return o, grads


def _check(name, q, k, v, window, cu=None):
    B, T, HQ, _ = q.shape
    do = torch.randn(B, T, HQ, v.shape[-1], generator=torch.Generator().manual_seed(1)).to(DEVICE)
    o, grads = _run(q, k, v, window, cu, "triton", do)
    qr, kr, vr = [x.detach().float().requires_grad_() for x in (q, k, v)]
    ro, rgrads = _run(qr, kr, vr, window, cu, "reference", do)

    ratio = RATIO[q.dtype]
    assert o.dtype == q.dtype and all(g.dtype == x.dtype for g, x in zip(grads, (q, k, v)))
    assert_close(f"{name} o", ro, o, ratio)
    for gname, r, x in zip(("dq", "dk", "dv"), rgrads, grads):
        if window == 1 and gname != "dv":
            assert torch.isfinite(x).all(), f"{name} {gname}: non-finite"
            assert x.abs().max().item() <= 1e-4, f"{name} {gname}: must vanish for window 1"
        else:
            assert_close(f"{name} {gname}", r, x, ratio)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_dense(case):
    name, B, T, H, G, Dk, Dv, window, dtype = case
    q, k, v = _inputs(B, T, H, G, Dk, Dv, dtype)
    _check(name, q, k, v, window)


@pytest.mark.parametrize("case", VARLEN_CASES, ids=[c[0] for c in VARLEN_CASES])
def test_varlen(case):
    name, lens, H, G, Dk, Dv, window, dtype = case
    q, k, v = _inputs(1, sum(lens), H, G, Dk, Dv, dtype)
    _check(name, q, k, v, window, _cu(lens))


# The launchers' other loop forms (the defaults take one loop, TMA loads for 16-bit inputs and a
# rotated dK/dV walk): three phases with pointer loads, and each switch on its own.
LOOP_FORMS = [dict(fwd=dict(one_loop=False, tma=False), dkv=dict(rotate=False)),
              dict(fwd=dict(one_loop=False, tma=True), dkv=dict(rotate=True)),
              dict(fwd=dict(one_loop=True, tma=False), dkv=dict(rotate=False))]


@pytest.mark.parametrize("form", range(len(LOOP_FORMS)))
@pytest.mark.parametrize("case", [("T70-W20-G2-bf16", 2, 70, 2, 2, 16, 24, 20, torch.bfloat16, None),
                                  ("varlen-W5-G3-bf16", 1, 138, 1, 3, 24, 16, 5, torch.bfloat16, [1, 37, 100]),
                                  ("T65-W64-G16-fp32", 1, 65, 1, 16, 16, 24, 64, torch.float32, None)],
                         ids=lambda c: c[0])
def test_loop_forms(case, form):
    name, B, T, H, G, Dk, Dv, window, dtype, lens = case
    cfg = LOOP_FORMS[form]
    q, k, v = [x.detach() for x in _inputs(B, T, H, G, Dk, Dv, dtype)]
    cu = None if lens is None else _cu(lens)
    do = torch.randn(B, T, H * G, Dv, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    scale = Dk ** -0.5
    o, lse = win._launch_fwd(q, k, v, window, scale, cu, config=cfg["fwd"])
    grads = win._launch_bwd(q, k, v, o, lse, do.to(dtype), window, scale, cu, dq_config=cfg["fwd"],
                            dkv_config=cfg["dkv"])
    qr, kr, vr = [x.float().requires_grad_() for x in (q, k, v)]
    ro, rgrads = _run(qr, kr, vr, window, cu, "reference", do.to(dtype).float())
    assert_close(f"{name} o", ro, o, RATIO[dtype])
    for gname, r, x in zip(("dq", "dk", "dv"), rgrads, grads):
        assert_close(f"{name} {gname}", r, x, RATIO[dtype])


def test_float64_inputs_computed_in_float32():
    q, k, v = _inputs(1, 40, 1, 2, 16, 24, torch.float64)
    _check("fp64", q, k, v, 9)


def test_noncontiguous_inputs():
    q, k, v = _inputs(2, 30, 2, 2, 16, 16, torch.float32)
    # head-major storage viewed as [B, T, H, D]
    qn, kn, vn = [x.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_() for x in (q, k, v)]
    assert not qn.is_contiguous()
    _check("noncontig", qn, kn, vn, 7)


def test_backward_is_deterministic():
    lens = [1, 37, 100]
    q, k, v = _inputs(1, sum(lens), 1, 3, 16, 24, torch.bfloat16)
    do = torch.randn(1, sum(lens), 3, 24, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    _, g1 = _run(q, k, v, 20, _cu(lens), "triton", do)
    _, g2 = _run(q, k, v, 20, _cu(lens), "triton", do)
    for name, a, b in zip(("dq", "dk", "dv"), g1, g2):
        assert torch.equal(a, b), f"{name} differs between two identical backward passes"


@pytest.mark.parametrize("window", [0, -3, 2.5, True])
def test_bad_window_raises(window):
    q, k, v = _inputs(1, 4, 1, 1, 16, 16, torch.float32)
    with pytest.raises(ValueError, match="window_size"):
        ops.sliding_window_attention(q, k, v, window, backend="triton")


def test_torch_compile_traces_custom_ops():
    q, k, v = _inputs(1, 40, 1, 2, 16, 24, torch.float32)

    def f(q, k, v):
        o = win.sliding_window_attention_triton(q, k, v, 9, 0.25, None)
        return (o * o).sum()

    assert_compile_matches_eager(f, (q, k, v), ("dq", "dk", "dv"))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_gated_forward_matches_gate_kernel(dtype):
    """The window forward's gate epilogue (nsa.ops.fused's forward) gives the window output and lse
    of the plain launch and NSA's output as the gate kernel computes it from the stored branch
    outputs (the same float32 products and sums, one rounding: bit for bit here, where no multiply-add
    is contracted), also for bf16 gates with fp32 q."""
    from nsa.ops import gate
    lens = [5, 70]
    q, k, v = [x.detach() for x in _inputs(1, sum(lens), 2, 3, 16, 24, dtype)]
    gen = torch.Generator().manual_seed(4)
    o_cmp, o_slc = [torch.randn(q.shape[:3] + (24,), generator=gen).to(DEVICE, dtype) for _ in range(2)]
    g_cmp, g_slc, g_win = [torch.rand(q.shape[:3], generator=gen).to(DEVICE, torch.bfloat16) for _ in range(3)]
    o_w, lse_w = win._window_fwd_op(q, k, v, 9, 0.3, _cu(lens))
    o_w2, lse_w2, o = win._window_fwd_gated_op(q, k, v, 9, 0.3, _cu(lens), o_cmp, o_slc, g_cmp, g_slc, g_win)
    assert torch.equal(o_w, o_w2) and torch.equal(lse_w, lse_w2)
    ref = gate.gate_combine_fwd(o_cmp, o_slc, o_w, g_cmp, g_slc, g_win, dtype)
    assert o.dtype == dtype
    assert torch.allclose(o.float(), ref.float(), rtol=0, atol=0), (o.float() - ref.float()).abs().max()


def test_opcheck_custom_ops():
    q, k, v = [x.detach() for x in _inputs(1, 20, 1, 2, 16, 16, torch.float32)]
    cu = _cu([5, 15])
    torch.library.opcheck(win._window_fwd_op, (q, k, v, 6, 0.25, cu))
    o, lse = win._window_fwd_op(q, k, v, 6, 0.25, cu)
    torch.library.opcheck(win._window_bwd_op, (q, k, v, o, lse, torch.randn_like(o), 6, 0.25, cu))
    xs = (torch.randn_like(o), torch.randn_like(o), torch.rand_like(lse), torch.rand_like(lse), torch.rand_like(lse))
    torch.library.opcheck(win._window_fwd_gated_op, (q, k, v, 6, 0.25, cu) + xs)
