"""Triton selected attention on the GPU at real sizes, against the float32 reference.

The reference is dense masked attention, O(T^2) memory, so it is evaluated per chunk of queries
(keys up to the chunk's end); summing the chunks' key/value gradients gives the full dK/dV.
"""

import pytest
import torch

import nsa.ops.selected

from nsa.ops import reference, selected_attention
from nsa.ops.selected import selected_attention_triton
from tests.gpu.sampled_rows import (
    assert_row_grads_close, assert_rows_close, rows_only, rows_reference, sample_positions, selected_mask)
from tests.helpers import assert_close, needs_cuda

pytestmark = [pytest.mark.gpu, needs_cuda]

# bfloat16 kernel vs float32 reference on the same (upcast) bf16 inputs. The difference comes from
# rounding P and dS to bf16 before the second products and the outputs to bf16 (unit roundoff
# 2^-9 ~ 2e-3 per element, independent across terms), plus, in the scatter forward, each block's
# partial output (bf16) before the merge: measured on CPU at small sizes o ~4.5e-3 (gather) /
# ~6.8e-3 (scatter), gradients ~7e-3. It does not grow with T: every output is a normalized sum.
RATIO_BF16 = 1e-2
RATIO_FP32 = 1e-5


def causal_selection(B, T, H, S, block_size, gen, device, rows=8192):
    """int32 ``[B, T, H, S]``: each row holds the query's own block, up to S-1 other random causal
    blocks, in random order, -1 where fewer than S causal blocks exist."""
    NB = -(-T // block_size)
    out = torch.empty(B, T, H, S, dtype=torch.int32, device=device)
    blocks = torch.arange(NB, device=device)
    for t0 in range(0, T, rows):
        t = torch.arange(t0, min(T, t0 + rows), device=device)
        own = (t // block_size).view(1, -1, 1, 1)
        score = torch.rand(B, t.numel(), H, NB, generator=gen, device=device)
        score = torch.where(blocks > own, -1.0, score)
        score = torch.where(blocks == own, 2.0, score)
        val, ids = score.topk(min(S, NB), dim=-1)
        ids = torch.where(val >= 0, ids, -1)
        if NB < S:
            ids = torch.cat([ids, ids.new_full((*ids.shape[:-1], S - NB), -1)], -1)
        order = torch.rand(ids.shape, generator=gen, device=device).argsort(-1)
        out[:, t0:t0 + t.numel()] = ids.gather(-1, order).to(torch.int32)
    return out


def inputs(B, T, HQ, H, Dk, Dv, S, block_size, dtype, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    mk = lambda *shape: torch.randn(*shape, generator=gen, device="cuda", dtype=dtype)  # noqa: E731
    q, k, v = mk(B, T, HQ, Dk), mk(B, T, H, Dk), mk(B, T, H, Dv)
    idx = causal_selection(B, T, H, S, block_size, gen, "cuda")
    do = mk(B, T, HQ, Dv)
    return q, k, v, idx, do


def chunk_reference(q, k, v, idx, do, block_size, scale, a, b, grads=True):
    """Float32 reference for query rows [a, min(b, T)) of every batch row (keys before min(b, T)).

    Returns o rows, dq rows and this chunk's contribution to dk[:, :b], dv[:, :b] (None if not grads).
    """
    B, H, S = q.shape[0], k.shape[2], idx.shape[3]
    b = min(b, q.shape[1])
    NB = -(-b // block_size)
    qc = q[:, a:b].float().requires_grad_(grads)
    kc = k[:, :b].float().requires_grad_(grads)
    vc = v[:, :b].float().requires_grad_(grads)
    sel = idx[:, a:b].long()
    sel = torch.where(sel < 0, NB, sel)
    blk = torch.zeros(B, b - a, H, NB + 1, dtype=torch.bool, device=q.device)
    blk.scatter_(-1, sel, True)
    blk = blk[..., :NB].repeat_interleave(block_size, -1)[..., :b]  # [B, b-a, H, b]
    pos_q = torch.arange(a, b, device=q.device).view(-1, 1)
    pos_k = torch.arange(b, device=q.device).view(1, -1)
    mask = blk.permute(0, 2, 1, 3) & (pos_k <= pos_q)  # [B, H, b-a, b]
    o, _ = reference._masked_attention(qc, kc, vc, mask.unsqueeze(2), scale)
    if not grads:
        return o.detach(), None, None, None
    dq, dk, dv = torch.autograd.grad(o, (qc, kc, vc), do[:, a:b].float())
    return o.detach(), dq, dk, dv


def run_triton(q, k, v, idx, do, block_size, backward=True):
    leaves = [x.detach().requires_grad_(backward) for x in (q, k, v)]
    o = selected_attention(*leaves, idx, block_size, backend="triton")
    if not backward:
        return o.detach(), None
    return o.detach(), torch.autograd.grad(o, leaves, do)


@pytest.fixture(params=["gather", "scatter"])
def fwd_mode(request, monkeypatch):
    """Both forward algorithms (query-centric gather, KV-block-centric scatter), whatever 'auto' picks."""
    monkeypatch.setattr(nsa.ops.selected, "FWD_MODE", request.param)
    return request.param


@pytest.fixture(params=["gather", "scatter"])
def dq_mode(request, monkeypatch):
    """Both dQ algorithms (query-centric gather, KV-block-centric scatter), whatever 'auto' picks."""
    monkeypatch.setattr(nsa.ops.selected, "DQ_MODE", request.param)
    return request.param


@pytest.mark.parametrize("T", [4096, 16384], ids=["T4k", "T16k"])
def test_paper_shape_bf16(T, fwd_mode, dq_mode):
    """B=1, HQ=64, H=4 (G=16), D=128, block 64, S=16. Output and dq on four chunks of 256 queries;
    dk/dv in full, as the sum of every query chunk's contribution."""
    B, HQ, H, D, bs, S, C = 1, 64, 4, 128, 64, 16, 256
    q, k, v, idx, do = inputs(B, T, HQ, H, D, D, S, bs, torch.bfloat16)
    scale = D ** -0.5
    o, (dq, dk, dv) = run_triton(q, k, v, idx, do, bs)
    for a in (0, T // 3, T // 2 + 7, T - C):  # chunks at, across and off block boundaries
        o_r, dq_r, _, _ = chunk_reference(q, k, v, idx, do, bs, scale, a, a + C)
        assert_close(f"o[{a}:{a + C}]", o_r, o[:, a:a + C], RATIO_BF16)
        assert_close(f"dq[{a}:{a + C}]", dq_r, dq[:, a:a + C], RATIO_BF16)
    # full dk/dv: every chunk of queries contributes to the keys before its end
    dk_r = torch.zeros(B, T, H, D, device="cuda")
    dv_r = torch.zeros(B, T, H, D, device="cuda")
    for a in range(0, T, C):
        _, _, dk_c, dv_c = chunk_reference(q, k, v, idx, do, bs, scale, a, a + C)
        dk_r[:, :a + C] += dk_c  # the chunk's keys end where its queries end
        dv_r[:, :a + C] += dv_c
    assert_close("dk", dk_r, dk, RATIO_BF16)
    assert_close("dv", dv_r, dv, RATIO_BF16)


# id: (HQ, H, Dk, Dv, block_size, S): every group size and head dim the kernels must compile for.
GPU_SHAPES = {
    "G1-d64": (4, 4, 64, 64, 64, 16),
    "G2-dk192-dv128": (8, 4, 192, 128, 64, 16),
    "G3-d128-bs32": (6, 2, 128, 128, 32, 8),
    "G8-d256": (16, 2, 256, 256, 64, 8),
    "G16-dk128-dv64": (32, 2, 128, 64, 64, 16),
    "G16-dk192-dv128": (32, 2, 192, 128, 64, 16),  # Dk as two tiles with one position per tile
    "G32-d128-bs128": (32, 1, 128, 128, 128, 6),
}


# every shape in bf16 (the fast path); float32 (exact FMA products, other tiles) on two of them
CASES = [(k, torch.bfloat16) for k in GPU_SHAPES] + [(k, torch.float32) for k in ("G3-d128-bs32", "G16-dk128-dv64")]


@pytest.mark.parametrize("name,dtype", CASES, ids=[f"{k}-{str(d)[6:]}" for k, d in CASES])
def test_group_sizes_and_head_dims(name, dtype, fwd_mode, dq_mode):
    """T=1000 (not a multiple of any block), B=2, full reference (fits at this size)."""
    HQ, H, Dk, Dv, bs, S = GPU_SHAPES[name]
    T = 1000
    q, k, v, idx, do = inputs(2, T, HQ, H, Dk, Dv, S, bs, dtype, seed=1)
    o, g = run_triton(q, k, v, idx, do, bs)
    leaves = [x.detach().float().requires_grad_(True) for x in (q, k, v)]
    o_r = reference.selected_attention(*leaves, idx, bs, Dk ** -0.5)
    g_r = torch.autograd.grad(o_r, leaves, do.float())
    ratio = RATIO_BF16 if dtype == torch.bfloat16 else RATIO_FP32
    assert_close("o", o_r, o, ratio)
    for name, r, x in zip(("dq", "dk", "dv"), g_r, g):
        assert_close(name, r, x, ratio)


def test_backward_deterministic_gpu():
    q, k, v, idx, do = inputs(1, 4096, 64, 4, 128, 128, 16, 64, torch.bfloat16, seed=2)
    _, g1 = run_triton(q, k, v, idx, do, 64)
    _, g2 = run_triton(q, k, v, idx, do, 64)
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)


@pytest.mark.parametrize("packed", [False, True], ids=["dense", "varlen"])
def test_no_host_synchronization(packed, fwd_mode):
    """Forward and backward never wait for the device (the public op's input checks do, so the
    kernel entry is called directly)."""
    lens = [100, 3000, 1000]
    q, k, v, _, do = inputs(1, sum(lens), 16, 2, 64, 64, 8, 64, torch.bfloat16, seed=6)
    gen = torch.Generator(device="cuda").manual_seed(6)
    idx = torch.cat([causal_selection(1, n, 2, 8, 64, gen, "cuda") for n in lens], 1)
    cu = torch.tensor([0] + lens, device="cuda").cumsum(0).to(torch.int32) if packed else None
    leaves = [x.detach().requires_grad_(True) for x in (q, k, v)]
    selected_attention_triton(*leaves, idx, 64, 0.125, cu).backward(do)  # compile outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        o = selected_attention_triton(*leaves, idx, 64, 0.125, cu)
        o.backward(do)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_varlen_gpu():
    lens = [1, 700, 4096, 3001]
    cu = torch.tensor([0] + lens, device="cuda").cumsum(0).to(torch.int32)
    T = sum(lens)
    q, k, v, _, do = inputs(1, T, 32, 2, 128, 128, 8, 64, torch.bfloat16, seed=3)
    gen = torch.Generator(device="cuda").manual_seed(3)
    idx = torch.cat([causal_selection(1, n, 2, 8, 64, gen, "cuda") for n in lens], 1)
    leaves = [x.detach().requires_grad_(True) for x in (q, k, v)]
    o = selected_attention(*leaves, idx, 64, cu_seqlens=cu, backend="triton")
    g = torch.autograd.grad(o, leaves, do)
    ref = [x.detach().float().requires_grad_(True) for x in (q, k, v)]
    o_r = reference.selected_attention(*ref, idx, 64, q.shape[-1] ** -0.5, cu)
    g_r = torch.autograd.grad(o_r, ref, do.float())
    assert_close("o", o_r, o, RATIO_BF16)
    for name, r, x in zip(("dq", "dk", "dv"), g_r, g):
        assert_close(name, r, x, RATIO_BF16)


@pytest.mark.bigmem
def test_long_sequence_128k():
    """T = 128k at B = 1: runs, all finite; o and dq on 256 query rows spread over the sequence
    (every head) and on the last 64 against the float32 reference on those rows
    (tests/gpu/sampled_rows.py); dk and dv in full from a second backward whose upstream
    gradient is zero off the sampled rows."""
    T, HQ, H, D, bs, S, C = 131072, 64, 4, 128, 64, 16, 64
    q, k, v, idx, do = inputs(1, T, HQ, H, D, D, S, bs, torch.bfloat16, seed=4)
    o, (dq, dk, dv) = run_triton(q, k, v, idx, do, bs)
    for name, x in (("o", o), ("dq", dq), ("dk", dk), ("dv", dv)):
        assert torch.isfinite(x).all(), name
    o_r, dq_r, _, _ = chunk_reference(q, k, v, idx, do, bs, D ** -0.5, T - C, T)
    assert_close("o[-64:]", o_r, o[:, T - C:], RATIO_BF16)
    assert_close("dq[-64:]", dq_r, dq[:, T - C:], RATIO_BF16)
    rows = sample_positions(T, 256)
    ref = rows_reference(q, k, v, rows, selected_mask(idx, bs), D ** -0.5, do)
    assert_rows_close("T=128k", ref, o, rows, RATIO_BF16)
    assert_close("T=128k dq on the sampled rows", ref["dq"], dq[:, rows].float(), RATIO_BF16)
    del o, dq, dk, dv
    _, grads = run_triton(q, k, v, idx, rows_only(do, rows), bs)
    assert_row_grads_close("T=128k", ref, grads, rows, RATIO_BF16)


@pytest.mark.bigmem
def test_more_than_2_pow_31_elements(fwd_mode):
    """B*T*HQ*D = 2 * 135168 * 64 * 128 > 2^31: offsets past 2^31 must not wrap. The last
    sequence's last 64 queries match the reference (forward and dq)."""
    B, T, HQ, H, D, bs, S, C = 2, 135168, 64, 4, 128, 64, 16, 64
    assert B * T * HQ * D > 2 ** 31
    q, k, v, idx, do = inputs(B, T, HQ, H, D, D, S, bs, torch.bfloat16, seed=5)
    o, (dq, dk, dv) = run_triton(q, k, v, idx, do, bs)
    for name, x in (("o", o), ("dq", dq), ("dk", dk), ("dv", dv)):
        assert torch.isfinite(x).all(), name
    last = [x[1:] for x in (q, k, v, idx, do)]
    o_r, dq_r, _, _ = chunk_reference(*last[:4], last[4], bs, D ** -0.5, T - C, T)
    assert_close("o[1, -64:]", o_r, o[1:, T - C:], RATIO_BF16)
    assert_close("dq[1, -64:]", dq_r, dq[1:, T - C:], RATIO_BF16)


def paired_inputs(seed):
    """bf16 inputs at the paper shape (B = 1, T = 8192, 64 query heads, 4 KV heads, D = 128, blocks
    of 64, 16 selected) on lists where pairs of positions agree: position 2i + 1 lists position
    2i's blocks, its own block among them, in another order (programs of 2 positions share all,
    of 4 positions a few)."""
    B, T, HQ, H, D, bs, S = 1, 8192, 64, 4, 128, 64, 16
    q, k, v, idx, do = inputs(B, T, HQ, H, D, D, S, bs, torch.bfloat16, seed=seed)
    gen = torch.Generator(device="cuda").manual_seed(seed)
    even = idx[:, 0::2]
    idx[:, 1::2] = even.gather(-1, torch.rand(even.shape, generator=gen, device="cuda").argsort(-1))
    return q, k, v, idx, do


@pytest.mark.parametrize("share", [1, 2, 4], ids=["P1", "P2", "P4"])
def test_shared_blocks_forward(monkeypatch, share):
    """The gather forward with several positions per program (selected_fwd_common_kernel for the
    blocks the positions of a program share, then selected_fwd_planned_kernel for the rest, one
    position per program) at the paper shape, on lists where pairs of positions agree
    (:func:`paired_inputs`): output on chunks at, across and off block boundaries against the
    float32 reference."""
    monkeypatch.setattr(nsa.ops.selected, "FWD_MODE", "gather")
    monkeypatch.setattr(nsa.ops.selected, "FWD_SHARE", share)
    T, D, bs, C = 8192, 128, 64, 256
    q, k, v, idx, do = paired_inputs(seed=7)
    o, _ = run_triton(q, k, v, idx, do, bs, backward=False)
    for a in (0, T // 3, T // 2 + 7, T - C):
        o_r, _, _, _ = chunk_reference(q, k, v, idx, do, bs, D ** -0.5, a, a + C, grads=False)
        assert_close(f"o[{a}:{a + C}]", o_r, o[:, a:a + C], RATIO_BF16)


@pytest.mark.parametrize("share", [1, 2, 4], ids=["P1", "P2", "P4"])
def test_shared_blocks_dq(monkeypatch, share):
    """The dQ gather with several positions per program (selected_bwd_dq_common_kernel for the
    blocks the positions of a program share, keys up to its first position in one product and
    the next ones key by key; then selected_bwd_dq_planned_kernel for the rest, one position per
    program) at the paper shape, on lists where pairs of positions agree (:func:`paired_inputs`):
    dq on chunks at, across and off block boundaries against the float32 reference, and
    dk / dv (whose kernels do not change) against the one-position dQ run's."""
    monkeypatch.setattr(nsa.ops.selected, "FWD_MODE", "gather")
    monkeypatch.setattr(nsa.ops.selected, "DQ_MODE", "gather")
    monkeypatch.setattr(nsa.ops.selected, "DQ_SHARE", share)
    T, D, bs, C = 8192, 128, 64, 256
    q, k, v, idx, do = paired_inputs(seed=8)
    _, (dq, dk, dv) = run_triton(q, k, v, idx, do, bs)
    assert torch.isfinite(dq).all()
    for a in (0, T // 3, T // 2 + 7, T - C):
        _, dq_r, _, _ = chunk_reference(q, k, v, idx, do, bs, D ** -0.5, a, a + C)
        assert_close(f"dq[{a}:{a + C}]", dq_r, dq[:, a:a + C], RATIO_BF16)
    monkeypatch.setattr(nsa.ops.selected, "DQ_SHARE", 1)
    _, (dq1, dk1, dv1) = run_triton(q, k, v, idx, do, bs)
    assert torch.equal(dk, dk1) and torch.equal(dv, dv1)
    assert_close("dq vs one position per program", dq1.float(), dq.float(), RATIO_BF16)
