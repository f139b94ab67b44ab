"""Triton compressed attention vs the reference (CPU interpreter; compiled kernels when CUDA is present).

Every case compares o, lse (-inf positions exactly, finite values by relative error), dq, dk_cmp
and dv_cmp against :func:`nsa.ops.reference.compressed_attention` evaluated on the same inputs
(float32; bf16 inputs are upcast, so the reference sees exactly the values the kernel sees).

Tolerances (observed maxima over the table in brackets): fp32 1e-5 [2e-6]: IEEE fp32 products,
accumulated in another order than the dense reference (a few ulps times sqrt(#terms), more in the
gradients, which cancel). bf16 2e-2 [9e-3]: the kernel rounds p and ds to bf16 before the second
matmul of each pair and rounds its outputs to bf16 (unit roundoff 2^-8 = 3.9e-3 each), the
reference keeps fp32. fp16 2e-3 [5e-4]: the same with unit roundoff 2^-11.
"""

import pytest
import torch

import nsa.ops as ops
from nsa.ops import compressed as cmp_mod
from nsa.ops.utils import compressed_cu_seqlens, num_compressed
from tests.helpers import assert_close, assert_compile_matches_eager

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
RATIO = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3, torch.float64: 1e-5}

# id, B, T, H, G, Dk, Dv, kernel_size, stride, dtype
CASES = [
    ("T1-G1", 1, 1, 2, 1, 16, 16, 32, 16, torch.float32),
    ("T15-below-ks-G2", 2, 15, 1, 2, 24, 40, 32, 16, torch.float32),
    ("T15-G3-k8s8", 1, 15, 1, 3, 24, 40, 8, 8, torch.float32),
    ("T33-G1-k32s16", 2, 33, 2, 1, 24, 40, 32, 16, torch.float32),
    ("T33-G16-k4s2", 1, 33, 1, 16, 32, 16, 4, 2, torch.float32),
    ("T100-G2-k16s8", 1, 100, 2, 2, 24, 40, 16, 8, torch.float32),
    ("T100-G3-k8s8", 1, 100, 1, 3, 40, 24, 8, 8, torch.float32),
    ("T100-G1-k4s2", 1, 100, 2, 1, 16, 32, 4, 2, torch.float32),
    ("T257-G1-k4s2", 1, 257, 1, 1, 24, 40, 4, 2, torch.float32),
    ("T257-G3-k16s8", 1, 257, 1, 3, 24, 16, 16, 8, torch.float32),
    ("T257-G16-k32s16", 1, 257, 1, 16, 16, 24, 32, 16, torch.float32),
    ("T100-G2-k16s8-bf16", 1, 100, 2, 2, 24, 40, 16, 8, torch.bfloat16),
    ("T257-G3-k4s2-bf16", 1, 257, 1, 3, 32, 16, 4, 2, torch.bfloat16),
    ("T33-G16-k8s8-bf16", 1, 33, 1, 16, 16, 24, 8, 8, torch.bfloat16),
    ("T100-G2-k16s8-fp16", 1, 100, 1, 2, 24, 40, 16, 8, torch.float16),
    # Dk as two tiles in the forward's q . k (triton_utils.split_dim): 96 = 64 + 32, 48 = 32 + 16
    ("T100-G16-k16s8-dk96-bf16", 1, 100, 1, 16, 96, 32, 16, 8, torch.bfloat16),
    ("T100-G4-k8s8-dk48-fp16", 1, 100, 2, 4, 48, 16, 8, 8, torch.float16),
]

# id, lengths, H, G, Dk, Dv, kernel_size, stride, dtype
VARLEN_CASES = [
    ("len1-40-130-k16s8", [1, 40, 130], 1, 2, 24, 40, 16, 8, torch.float32),
    ("len1-40-130-k32s16-G3", [1, 40, 130], 1, 3, 16, 24, 32, 16, torch.float32),
    ("len7-4-65-k4s2-G1", [7, 4, 65], 2, 1, 24, 16, 4, 2, torch.float32),
    ("len1-40-130-k16s8-bf16", [1, 40, 130], 1, 2, 24, 40, 16, 8, torch.bfloat16),
    ("len1-40-130-k16s8-dk96-bf16", [1, 40, 130], 1, 16, 96, 32, 16, 8, torch.bfloat16),
]


def _inputs(B, T, Tc, H, G, Dk, Dv, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H * G, Dk, generator=g)
    k = torch.randn(B, Tc, H, Dk, generator=g)
    v = torch.randn(B, Tc, H, Dv, generator=g)
    return [x.to(DEVICE, dtype).requires_grad_() for x in (q, k, v)]


def _run(q, k, v, ks, st, cu, backend, do, dlse=None):
    """Forward, then backward of sum(o * do) (+ sum(lse * dlse) over finite lse); returns o, lse, grads."""
    for x in (q, k, v):
        x.grad = None
    o, lse = ops.compressed_attention(q, k, v, ks, st, cu_seqlens=cu, backend=backend)
    loss = 0.
    if do is not None:
        loss = (o.float() * do).sum()
    if dlse is not None:
        loss = loss + (torch.where(torch.isfinite(lse), lse, 0.) * dlse).sum()
    loss.backward()
    # lse does not depend on v: autograd leaves v.grad unset there.
    return o, lse, [torch.zeros_like(x) if x.grad is None else x.grad.clone() for x in (q, k, v)]


def _check(name, q, k, v, ks, st, cu=None, use_do=True, use_dlse=False):
    ratio = RATIO[q.dtype]
    B, T, HQ, _ = q.shape
    gen = torch.Generator().manual_seed(1)
    do = torch.randn(B, T, HQ, v.shape[-1], generator=gen).to(DEVICE) if use_do else None
    dlse = torch.randn(B, T, HQ, generator=gen).to(DEVICE) if use_dlse else None
    o, lse, grads = _run(q, k, v, ks, st, cu, "triton", do, dlse)
    qr, kr, vr = [x.detach().float().requires_grad_() for x in (q, k, v)]
    ro, rlse, rgrads = _run(qr, kr, vr, ks, st, cu, "reference", do, dlse)

    assert o.dtype == q.dtype and lse.dtype == (torch.float64 if q.dtype == torch.float64 else torch.float32)
    fin = torch.isfinite(rlse)
    assert torch.equal(torch.isfinite(lse), fin), f"{name}: lse -inf positions differ"
    assert (lse[~fin] == float("-inf")).all(), f"{name}: lse must be -inf where nothing is visible"
    assert (o[~fin] == 0).all(), f"{name}: o must be 0 where nothing is visible"
    assert_close(f"{name} o", ro, o, ratio)
    assert_close(f"{name} lse", rlse[fin], lse[fin], ratio)
    for gname, r, x in zip(("dq", "dk_cmp", "dv_cmp"), rgrads, grads):
        assert_close(f"{name} {gname}", r, x, ratio)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_dense(case):
    name, B, T, H, G, Dk, Dv, ks, st, dtype = case
    q, k, v = _inputs(B, T, num_compressed(T, ks, st), H, G, Dk, Dv, dtype)
    _check(name, q, k, v, ks, st)


@pytest.mark.parametrize("case", VARLEN_CASES, ids=[c[0] for c in VARLEN_CASES])
def test_varlen(case):
    name, lens, H, G, Dk, Dv, ks, st, dtype = case
    cu = torch.tensor([0] + lens, dtype=torch.int32).cumsum(0).to(torch.int32).to(DEVICE)
    Tc = int(compressed_cu_seqlens(cu, ks, st)[-1])
    q, k, v = _inputs(1, sum(lens), Tc, H, G, Dk, Dv, dtype)
    _check(name, q, k, v, ks, st, cu)


@pytest.mark.parametrize("use_do", [True, False], ids=["o-and-lse", "lse-only"])
def test_grad_through_lse(use_do):
    q, k, v = _inputs(1, 70, num_compressed(70, 16, 8), 2, 3, 24, 40, torch.float32)
    _check("lse-grad", q, k, v, 16, 8, use_do=use_do, use_dlse=True)


def test_float64_inputs_computed_in_float32():
    q, k, v = _inputs(1, 40, num_compressed(40, 8, 8), 1, 2, 16, 24, torch.float64)
    _check("fp64", q, k, v, 8, 8)


def test_backward_is_deterministic():
    q, k, v = _inputs(1, 100, num_compressed(100, 4, 2), 1, 3, 24, 40, torch.bfloat16)
    gen = torch.Generator().manual_seed(2)
    do = torch.randn(1, 100, 3, 40, generator=gen).to(DEVICE)
    _, _, g1 = _run(q, k, v, 4, 2, None, "triton", do)
    _, _, g2 = _run(q, k, v, 4, 2, None, "triton", do)
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)


def test_noncontiguous_inputs():
    B, T, H, G, D, ks, st = 1, 50, 2, 2, 16, 8, 8
    Tc = num_compressed(T, ks, st)
    q, k, v = _inputs(B, T, Tc, H, G, D, D, torch.float32)
    # head-major storage viewed as [B, T, H, D]
    qn, kn, vn = [x.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_() for x in (q, k, v)]
    assert not qn.is_contiguous()
    _check("noncontig", qn, kn, vn, ks, st)


def test_torch_compile_traces_custom_ops():
    B, T, H, G, Dk, Dv, ks, st = 1, 40, 1, 2, 16, 24, 8, 8
    q, k, v = _inputs(B, T, num_compressed(T, ks, st), H, G, Dk, Dv, torch.float32)
    scale = Dk ** -0.5

    def f(q, k, v):
        o, lse = cmp_mod.compressed_attention_triton(q, k, v, ks, st, scale, None)
        return (o * o).sum() + torch.where(torch.isfinite(lse), lse, 0.).sum()

    assert_compile_matches_eager(f, (q, k, v), ("dq", "dk", "dv"))


def test_opcheck_custom_ops():
    B, T, H, G, D, ks, st = 1, 24, 1, 2, 16, 8, 8
    q, k, v = [x.detach() for x in _inputs(B, T, num_compressed(T, ks, st), H, G, D, D, torch.float32)]
    torch.library.opcheck(cmp_mod._fwd_op, (q, k, v, ks, st, 0.25, None))
    o, lse = cmp_mod._fwd_op(q, k, v, ks, st, 0.25, None)
    do, dlse = torch.randn_like(o), torch.randn_like(lse)
    torch.library.opcheck(cmp_mod._bwd_op, (q, k, v, o, lse, do, dlse, ks, st, 0.25, None))


def test_dkv_split_into_query_segments(monkeypatch):
    """The dK/dV kernel splits a tile's queries over several programs when there are few compressed
    tiles (fp32 partials, summed in a fixed order); check that path is taken here and is exact."""
    seen = []
    orig = cmp_mod._dkv_segments

    def record(*args):
        seen.append(orig(*args))
        return seen[-1]

    monkeypatch.setattr(cmp_mod, "_dkv_segments", record)
    q, k, v = _inputs(1, 60, num_compressed(60, 8, 8), 1, 16, 16, 24, torch.float32)
    _check("segments", q, k, v, 8, 8)
    assert seen and max(seen) > 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16-tma"])
def test_forward_never_reads_other_sequences(dtype):
    """NaN in the compressed keys/values of the next packed sequence leaves the first sequence's
    output and lse bit for bit as with finite values there: the kernels must not read them, not
    only give them zero weight (0 * NaN = NaN). bf16 runs the TMA path (tensor descriptors sized
    to the tile's visible tokens, rows past them zero-filled)."""
    lens, H, G, Dk, Dv, ks, st = [70, 53], 1, 4, 32, 24, 16, 8
    cu = torch.tensor([0] + lens, dtype=torch.int32).cumsum(0).to(torch.int32).to(DEVICE)
    ccu = compressed_cu_seqlens(cu, ks, st)
    q, k, v = [x.detach() for x in _inputs(1, sum(lens), int(ccu[-1]), H, G, Dk, Dv, dtype)]
    o, lse = ops.compressed_attention(q, k, v, ks, st, cu_seqlens=cu, backend="triton")
    kp, vp = k.clone(), v.clone()
    kp[0, int(ccu[1]):] = float("nan")
    vp[0, int(ccu[1]):] = float("nan")
    o2, lse2 = ops.compressed_attention(q, kp, vp, ks, st, cu_seqlens=cu, backend="triton")
    assert torch.isfinite(o[0, :lens[0]]).all()
    assert torch.equal(o2[0, :lens[0]], o[0, :lens[0]]) and torch.equal(lse2[0, :lens[0]], lse[0, :lens[0]])
    assert torch.isnan(o2[0, lens[0] + ks:]).all()  # sequence 1 reads its own (NaN) tokens


def test_tma_forward_used_for_16_bit_inputs(monkeypatch):
    """The interpreter runs the TMA forward for 16-bit inputs (so CI tests it) and the pointer
    forward for float32."""
    seen = []
    launch = cmp_mod.compressed_fwd_kernel.run

    def spy(*args, **kw):
        seen.append(kw["TMA"])
        return launch(*args, **kw)
    monkeypatch.setattr(cmp_mod.compressed_fwd_kernel, "run", spy)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        q, k, v = [x.detach() for x in _inputs(1, 40, num_compressed(40, 16, 8), 1, 2, 24, 40, dtype)]
        ops.compressed_attention(q, k, v, 16, 8, backend="triton")
    assert seen == [True, True, False]
