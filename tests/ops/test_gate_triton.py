"""Triton gate combination vs the plain PyTorch expression (CPU interpreter; compiled kernels on CUDA).

Every case compares o and the gradients of all six inputs (o_cmp, o_slc, o_win, g_cmp, g_slc,
g_win) against ``g_cmp[..., None] * o_cmp + g_slc[..., None] * o_slc + g_win[..., None] * o_win``
differentiated by autograd, on the same input values upcast to the reference dtype (float64 for
float64 inputs, float32 otherwise), with the same dO.

Tolerances, per result dtype. The kernel computes in fp32 (fp64 for float64) and rounds each result
once, so every element's relative error is at most the unit roundoff u of its dtype plus the fp32
arithmetic error; the norm-wise relative error then is at most that as well.
- bf16: u = 2^-8 with round-to-nearest (compiled kernels). The interpreter truncates fp32 -> bf16
  (its cast drops the low bits), an error below one ulp: 2^-7. Observed here: up to 4.0e-3.
- fp16: u = 2^-11 (the interpreter rounds to nearest here). Observed 2.5e-4.
- fp32: 1e-5. The fp32 reference sums in another order (dg: a Dv-term dot); observed 1.3e-7.
- fp64: 1e-12. Same expression in fp64; only FMA contraction may differ.
"""

import pytest
import torch

from nsa.ops import gate as gate_mod
from nsa.ops.gate import gate_combine_triton
from tests.helpers import assert_close

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SLACK = 1e-5
RATIO = {
    torch.float64: 1e-12,
    torch.float32: 1e-5,
    torch.float16: 2.0 ** -11 + SLACK,
    torch.bfloat16: (2.0 ** -8 if DEVICE == "cuda" else 2.0 ** -7) + SLACK,
}
NAMES = ("o_cmp", "o_slc", "o_win", "g_cmp", "g_slc", "g_win")

# id, B, T, HQ, Dv, dtype of the branch outputs (and of o), dtype of the gates
CASES = [
    ("B2-T7-HQ3-Dv24-fp32", 2, 7, 3, 24, torch.float32, torch.float32),
    ("B2-T7-HQ3-Dv24-fp64", 2, 7, 3, 24, torch.float64, torch.float64),
    ("T1-HQ3-Dv24-fp32", 1, 1, 3, 24, torch.float32, torch.float32),
    ("T40-HQ2-Dv128-fp32", 1, 40, 2, 128, torch.float32, torch.float32),
    ("B2-T3-HQ3-Dv5-fp32", 2, 3, 3, 5, torch.float32, torch.float32),
    ("T77-HQ5-Dv24-multi-tile-fp32", 1, 77, 5, 24, torch.float32, torch.float32),
    ("T0-empty-fp32", 1, 0, 2, 8, torch.float32, torch.float32),
    ("B2-T7-HQ3-Dv24-bf16", 2, 7, 3, 24, torch.bfloat16, torch.bfloat16),
    ("B2-T7-HQ3-Dv24-bf16-gates-fp32", 2, 7, 3, 24, torch.bfloat16, torch.float32),
    ("T40-HQ2-Dv128-bf16-gates-fp32", 1, 40, 2, 128, torch.bfloat16, torch.float32),
    ("B2-T3-HQ3-Dv5-bf16", 2, 3, 3, 5, torch.bfloat16, torch.bfloat16),
    ("T1-HQ3-Dv24-bf16-gates-fp32", 1, 1, 3, 24, torch.bfloat16, torch.float32),
    ("B2-T7-HQ3-Dv24-fp16", 2, 7, 3, 24, torch.float16, torch.float16),
]


def make_inputs(B, T, HQ, Dv, dtype, gate_dtype, seed=0):
    """Branch outputs ~ N(0, 1), gates ~ U(0, 1) (post-sigmoid values), dO ~ N(0, 1) in ``dtype``."""
    gen = torch.Generator().manual_seed(seed)
    outs = [torch.randn(B, T, HQ, Dv, generator=gen).to(DEVICE, dtype) for _ in range(3)]
    gates = [torch.rand(B, T, HQ, generator=gen).to(DEVICE, gate_dtype) for _ in range(3)]
    do = torch.randn(B, T, HQ, Dv, generator=gen).to(DEVICE, dtype)
    return outs + gates, do


def expression(o_cmp, o_slc, o_win, g_cmp, g_slc, g_win, out_dtype):
    """The plain PyTorch expression (the specification's last line)."""
    return (g_cmp.unsqueeze(-1) * o_cmp + g_slc.unsqueeze(-1) * o_slc + g_win.unsqueeze(-1) * o_win).to(out_dtype)


def run(fn, xs, do, out_dtype, requires=(True,) * 6):
    """o and the gradients of the inputs flagged in ``requires`` (None for the others)."""
    leaves = [x.detach().clone().requires_grad_(r) for x, r in zip(xs, requires)]
    o = fn(*leaves, out_dtype)
    want = [x for x in leaves if x.requires_grad]
    got = iter(torch.autograd.grad(o, want, do) if want else ())
    return o.detach(), [next(got) if x.requires_grad else None for x in leaves]


def reference(xs, do, out_dtype):
    """o and all six gradients of the expression, on inputs upcast to float32 (float64 stays)."""
    ref_dtype = torch.float64 if out_dtype == torch.float64 else torch.float32
    return run(expression, [x.to(ref_dtype) for x in xs], do.to(ref_dtype), ref_dtype)


def check(name, xs, do, out_dtype, requires=(True,) * 6):
    o, grads = run(gate_combine_triton, xs, do, out_dtype, requires)
    ro, rgrads = reference(xs, do, out_dtype)
    assert o.dtype == out_dtype and o.shape == xs[0].shape
    assert_close(f"{name} o", ro, o, RATIO[out_dtype])
    for gname, x, r, g, req in zip(NAMES, xs, rgrads, grads, requires):
        if not req:
            assert g is None, f"{name} d{gname}: computed although not required"
            continue
        assert g.dtype == x.dtype and g.shape == x.shape, f"{name} d{gname}: {g.dtype} {tuple(g.shape)}"
        assert_close(f"{name} d{gname}", r, g, RATIO[x.dtype])


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_matches_expression(case):
    name, B, T, HQ, Dv, dtype, gate_dtype = case
    xs, do = make_inputs(B, T, HQ, Dv, dtype, gate_dtype)
    check(name, xs, do, dtype)


def test_mixed_gate_dtypes_and_out_dtype():
    """Each gate its own dtype; the result in a dtype other than the branch outputs'."""
    xs, do = make_inputs(2, 5, 3, 24, torch.float32, torch.float32, seed=1)
    xs[3], xs[4] = xs[3].to(torch.bfloat16), xs[4].to(torch.float16)
    check("mixed-gates-out-bf16", xs, do.to(torch.bfloat16), torch.bfloat16)


def test_noncontiguous_inputs_and_grad():
    """Head-major branch outputs viewed as [B, T, HQ, Dv], gates sliced out of one [B, T, 3*HQ]
    projection, and dO with stride 0 (the gradient of o.sum())."""
    B, T, HQ, Dv = 2, 9, 3, 24
    xs, _ = make_inputs(B, T, HQ, Dv, torch.float32, torch.float32, seed=2)
    outs = [x.transpose(1, 2).contiguous().transpose(1, 2) for x in xs[:3]]
    proj = torch.cat(xs[3:], dim=-1)  # [B, T, 3*HQ]
    gates = [proj[..., i * HQ:(i + 1) * HQ] for i in range(3)]
    do = torch.ones(1, 1, 1, 1, device=DEVICE).expand(B, T, HQ, Dv)
    assert not any(x.is_contiguous() for x in outs + gates + [do])
    xs_n = outs + gates
    leaves = [x.detach().requires_grad_() for x in xs_n]  # detach keeps the strides
    o = gate_combine_triton(*leaves, torch.float32)
    grads = torch.autograd.grad(o.sum(), leaves)
    ro, rgrads = reference(xs_n, do, torch.float32)
    assert_close("noncontig o", ro, o, RATIO[torch.float32])
    for gname, r, g in zip(NAMES, rgrads, grads):
        assert_close(f"noncontig d{gname}", r, g, RATIO[torch.float32])


@pytest.mark.parametrize("requires", [
    (False, True, False, False, False, True),
    (True, True, True, False, False, False),
    (False, False, False, True, True, True),
    (False, False, True, True, False, False),
], ids=["o_slc+g_win", "outputs-only", "gates-only", "o_win+g_cmp"])
def test_only_some_inputs_require_grad(requires):
    xs, do = make_inputs(2, 7, 3, 24, torch.bfloat16, torch.float32, seed=3)
    check("partial", xs, do, torch.bfloat16, requires)


def test_backward_skips_unneeded_gradients():
    """The launcher returns empty placeholders for gradients nobody needs."""
    xs, do = make_inputs(1, 4, 2, 8, torch.float32, torch.float32, seed=4)
    needs = [True, False, False, False, False, True]
    grads = gate_mod.gate_combine_bwd(do, *xs, needs)
    for x, g, need in zip(xs, grads, needs):
        assert g.shape == (x.shape if need else (0,))


def test_backward_is_deterministic():
    xs, do = make_inputs(1, 77, 5, 24, torch.bfloat16, torch.float32, seed=5)
    o1, g1 = run(gate_combine_triton, xs, do, torch.bfloat16)
    o2, g2 = run(gate_combine_triton, xs, do, torch.bfloat16)
    assert torch.equal(o1, o2)
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)


def test_torch_compile_matches_eager():
    xs, do = make_inputs(2, 7, 3, 24, torch.float32, torch.float32, seed=6)

    def f(*args):
        o = gate_combine_triton(*args, torch.float32)
        return (o * o).sum()

    leaves = [x.detach().clone().requires_grad_() for x in xs]
    loss = torch.compile(f, backend="aot_eager", fullgraph=True)(*leaves)
    grads = torch.autograd.grad(loss, leaves)
    loss_ref = f(*leaves)
    grads_ref = torch.autograd.grad(loss_ref, leaves)
    assert_close("compiled loss", loss_ref, loss, 1e-6)
    for gname, r, g in zip(NAMES, grads_ref, grads):
        assert_close(f"compiled d{gname}", r, g, 1e-6)


def test_opcheck_custom_ops():
    xs, do = make_inputs(1, 5, 2, 24, torch.float32, torch.float32, seed=7)
    xs[4] = xs[4].to(torch.bfloat16)
    torch.library.opcheck(gate_mod._fwd_op, (*xs, torch.float32))
    torch.library.opcheck(gate_mod._bwd_op, (do, *xs, [True, False, True, True, True, False]))
