"""Triton compressed attention at real sizes on the GPU (bf16, paper shapes).

B=1, HQ=64, H=4 (G=16), kernel_size/stride 32/16, Dk/Dv = 128/128 and 192/128. The reference is
the float32 specification (:func:`nsa.ops.reference._masked_attention` with the compressed
visibility mask) on the same bf16-valued inputs; at long T it runs on a few query chunks only
(the dense score tensor at 32k would be T*Tc*HQ*4 bytes = 17 GB), and a row's o, lse and dq
depend only on that row, so chunks are exact references.

Bounds (relative error, ||out - ref|| / ||ref||):
- lse 2e-5: scores are exact bf16 products summed in fp32; only summation order and the
  exp2/log2 approximations differ (~1e-7 each).
- o 1e-2, dq/dk/dv 2e-2: p and ds are rounded to bf16 (unit roundoff 2^-8) before the second
  matmul of each pair, and outputs are stored in bf16; the CPU table observes <= 9e-3.
"""

import pytest
import torch

from nsa.ops import compressed_attention, reference
from nsa.ops.utils import num_compressed
from tests.gpu.sampled_rows import (
    assert_row_grads_close, assert_rows_close, compressed_mask, rows_only, rows_reference, sample_positions)
from tests.helpers import assert_close, needs_cuda

pytestmark = [pytest.mark.gpu, needs_cuda]

HQ, H = 64, 4
KS, ST = 32, 16
TOL_LSE, TOL_O, TOL_GRAD = 2e-5, 1e-2, 2e-2


def make_inputs(T, Dk, Dv, B=1, heads=(HQ, H), seed=0, requires_grad=False):
    hq, h = heads
    gen = torch.Generator(device="cuda").manual_seed(seed)
    Tc = num_compressed(T, KS, ST)
    q = torch.randn(B, T, hq, Dk, device="cuda", generator=gen).bfloat16()
    k = torch.randn(B, Tc, h, Dk, device="cuda", generator=gen).bfloat16()
    v = torch.randn(B, Tc, h, Dv, device="cuda", generator=gen).bfloat16()
    return [x.requires_grad_(requires_grad) for x in (q, k, v)]


def ref_rows(q, k, v, b, a, e, scale):
    """float32 reference o ``[e-a, HQ, Dv]``, lse ``[e-a, HQ]`` for queries a..e-1 of batch b."""
    t = torch.arange(a, e, device=q.device).view(-1, 1)
    i = torch.arange(k.shape[1], device=q.device).view(1, -1)
    mask = i * ST + KS - 1 <= t  # [e-a, Tc]
    o, lse = reference._masked_attention(q[b:b + 1, a:e].float(), k[b:b + 1].float(), v[b:b + 1].float(),
                                         mask, scale)
    return o[0], lse[0]


def check_rows(name, q, k, v, o, lse, chunks, b=0):
    scale = q.shape[-1] ** -0.5
    for a, e in chunks:
        ro, rlse = ref_rows(q, k, v, b, a, e, scale)
        fin = torch.isfinite(rlse)
        assert torch.equal(torch.isfinite(lse[b, a:e]), fin), f"{name} [{a}:{e}]: -inf positions of lse differ"
        assert (o[b, a:e][~fin] == 0).all()
        assert_close(f"{name} o[{a}:{e}]", ro, o[b, a:e].float(), TOL_O)
        assert_close(f"{name} lse[{a}:{e}]", rlse[fin], lse[b, a:e][fin], TOL_LSE)


@pytest.mark.parametrize("T", [4096, 32768])
@pytest.mark.parametrize("dims", [(128, 128), (192, 128)], ids=["d128", "dk192-dv128"])
def test_forward_vs_reference_chunks(T, dims):
    q, k, v = make_inputs(T, *dims)
    o, lse = compressed_attention(q, k, v, KS, ST, backend="triton")
    chunks = [(0, 256), (T // 2 - 100, T // 2 + 156), (T - 512, T)]
    check_rows(f"T={T} {dims}", q, k, v, o, lse, chunks)


@pytest.mark.parametrize("dims", [(128, 128), (192, 128)], ids=["d128", "dk192-dv128"])
@pytest.mark.parametrize("heads", [(HQ, H), (12, 4), (4, 4)], ids=["G16", "G3", "G1"])
def test_gradients_t4096(dims, heads):
    T = 4096
    q, k, v = make_inputs(T, *dims, heads=heads, requires_grad=True)
    gen = torch.Generator(device="cuda").manual_seed(1)
    do = torch.randn(1, T, heads[0], dims[1], device="cuda", generator=gen).bfloat16()
    dlse = torch.randn(1, T, heads[0], device="cuda", generator=gen)

    def run(backend, qq, kk, vv):
        o, lse = compressed_attention(qq, kk, vv, KS, ST, backend=backend)
        loss = (o.float() * do.float()).sum() + (torch.where(torch.isfinite(lse), lse, 0.) * dlse).sum()
        return o, lse, torch.autograd.grad(loss, (qq, kk, vv))

    o, lse, grads = run("triton", q, k, v)
    qr, kr, vr = [x.detach().float().requires_grad_() for x in (q, k, v)]
    ro, rlse, rgrads = run("reference", qr, kr, vr)
    fin = torch.isfinite(rlse)
    assert torch.equal(torch.isfinite(lse), fin)
    assert_close("o", ro, o.float(), TOL_O)
    assert_close("lse", rlse[fin], lse[fin], TOL_LSE)
    for name, r, x in zip(("dq", "dk_cmp", "dv_cmp"), rgrads, grads):
        assert_close(name, r, x.float(), TOL_GRAD)
    _, _, grads2 = run("triton", q, k, v)
    for a, b in zip(grads, grads2):
        assert torch.equal(a, b), "backward is not bitwise reproducible"


def test_varlen_gpu():
    lens = [1, 40, 3000, 5000, 17]
    cu = torch.tensor([0] + lens, device="cuda").cumsum(0).to(torch.int32)
    gen = torch.Generator(device="cuda").manual_seed(3)
    Tc = sum(num_compressed(n, KS, ST) for n in lens)
    q = torch.randn(1, sum(lens), HQ, 128, device="cuda", generator=gen).bfloat16().requires_grad_()
    k = torch.randn(1, Tc, H, 128, device="cuda", generator=gen).bfloat16().requires_grad_()
    v = torch.randn(1, Tc, H, 128, device="cuda", generator=gen).bfloat16().requires_grad_()
    do = torch.randn(1, sum(lens), HQ, 128, device="cuda", generator=gen).bfloat16()

    def run(backend, qq, kk, vv):
        o, lse = compressed_attention(qq, kk, vv, KS, ST, cu_seqlens=cu, backend=backend)
        return o, lse, torch.autograd.grad((o.float() * do.float()).sum(), (qq, kk, vv))

    o, lse, grads = run("triton", q, k, v)
    ro, rlse, rgrads = run("reference", *[x.detach().float().requires_grad_() for x in (q, k, v)])
    fin = torch.isfinite(rlse)
    assert torch.equal(torch.isfinite(lse), fin)
    assert_close("o", ro, o.float(), TOL_O)
    assert_close("lse", rlse[fin], lse[fin], TOL_LSE)
    for name, r, x in zip(("dq", "dk_cmp", "dv_cmp"), rgrads, grads):
        assert_close(name, r, x.float(), TOL_GRAD)


@pytest.mark.bigmem
def test_t131072_sampled_rows():
    """T = 128k: o finite, lse -inf exactly before the first compressed token; o, lse and dq on
    256 query rows spread over the sequence (every head) and on the last 256 against the float32
    reference on those rows (tests/gpu/sampled_rows.py); dk_cmp and dv_cmp in full from a
    backward whose upstream gradient is zero off the sampled rows; a full backward finite."""
    T = 131072
    q, k, v = make_inputs(T, 128, 128, requires_grad=True)
    o, lse = compressed_attention(q, k, v, KS, ST, backend="triton")
    assert torch.isfinite(o).all()
    assert torch.isinf(lse[:, :KS - 1]).all() and torch.isfinite(lse[:, KS - 1:]).all()
    check_rows("T=131072", q.detach(), k.detach(), v.detach(), o.detach(), lse.detach(), [(T - 256, T)])
    gen = torch.Generator(device="cuda").manual_seed(2)
    do = torch.randn(o.shape, device="cuda", generator=gen).bfloat16()
    rows = sample_positions(T, 256)
    ref = rows_reference(q, k, v, rows, compressed_mask(KS, ST, k.shape[1]), 128 ** -0.5, do)
    assert_rows_close("T=131072", ref, o, rows, TOL_O, lse=lse, lse_ratio=TOL_LSE)
    grads = torch.autograd.grad(o, (q, k, v), rows_only(do, rows), retain_graph=True)
    assert_row_grads_close("T=131072", ref, grads, rows, TOL_GRAD)
    del grads
    dq, dk, dv = torch.autograd.grad(o, (q, k, v), do)
    for name, g in (("dq", dq), ("dk", dk), ("dv", dv)):
        assert torch.isfinite(g).all(), f"{name} has non-finite elements"
    assert_close("T=131072 dq on the sampled rows, full backward", ref["dq"], dq[:, rows].float(), TOL_GRAD)


@pytest.mark.bigmem
def test_more_than_2pow31_elements():
    """B*T*HQ*D > 2^31: o, lse and dq of the last rows of the last batch (offsets past 2^31)."""
    B, T, D = 2, 131072 + 64, 128
    assert B * T * HQ * D > 2 ** 31
    q, k, v = make_inputs(T, D, D, B=B, requires_grad=True)
    o, lse = compressed_attention(q, k, v, KS, ST, backend="triton")
    a, e = T - 128, T
    check_rows("2^31", q.detach(), k.detach(), v.detach(), o.detach(), lse.detach(), [(a, e)], b=B - 1)
    gen = torch.Generator(device="cuda").manual_seed(5)
    do = torch.zeros_like(o)
    do[B - 1, a:e] = torch.randn(e - a, HQ, D, device="cuda", generator=gen).bfloat16()
    dq, dk, dv = torch.autograd.grad(o, (q, k, v), do)
    del o, lse
    qr = q.detach()[B - 1:B, a:e].float().requires_grad_()
    t = torch.arange(a, e, device="cuda").view(-1, 1)
    mask = torch.arange(k.shape[1], device="cuda").view(1, -1) * ST + KS - 1 <= t
    ro, _ = reference._masked_attention(qr, k.detach()[B - 1:B].float(), v.detach()[B - 1:B].float(), mask,
                                        D ** -0.5)
    (rdq,) = torch.autograd.grad(ro, qr, do[B - 1:B, a:e].float())
    assert_close("dq last rows", rdq[0], dq[B - 1, a:e].float(), TOL_GRAD)
    assert torch.isfinite(dk).all() and torch.isfinite(dv).all()
