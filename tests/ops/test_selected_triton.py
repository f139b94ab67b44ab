"""Triton selected attention against the reference: output and every gradient.

Runs on CUDA when present, else on CPU under TRITON_INTERPRET=1 (set by tests/conftest.py),
always through the public op with ``backend='triton'``. Sizes are tiny for the interpreter.
"""

import pytest
import torch

import nsa.ops.selected
from nsa.ops import selected_attention
from nsa.ops.selected import selected_attention_triton
from tests.helpers import assert_close

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# float32: the kernel and the reference differ only in summation order.
RATIO_FP32 = 1e-5
# bfloat16 inputs (unit roundoff 2^-9 ~ 2e-3) against the float32 reference on the same (upcast)
# inputs: rounding the reference output to bf16 alone costs ~1.5e-3; the kernel also rounds P and
# dS to bf16 before the second products; the scatter forward also rounds each block's partial
# output to bf16 before the merge. Measured: o ~4.5e-3 (gather) / ~6.8e-3 (scatter), gradients
# ~7e-3. A wrong mask or a missed block gives errors of order 1e-1 or more.
RATIO_BF16 = 1e-2


@pytest.fixture(params=["gather", "scatter"])
def fwd_mode(request, monkeypatch):
    """Both forward algorithms of the kernel file (query-centric gather, KV-block-centric scatter
    with its merge); the backward is the same for both."""
    monkeypatch.setattr(nsa.ops.selected, "FWD_MODE", request.param)
    return request.param


def random_block_indices(lens, H, S, block_size, causal, gen, empty_rows=0.1):
    """int32 ``[1, sum(lens), H, S]``: per row, distinct block ids of the query's own sequence in
    random order, then -1 padding; about ``empty_rows`` of the rows hold only -1. Causal rows
    pick among blocks ``<= t // block_size``, non-causal rows among all blocks of the sequence."""
    rows = []
    for L in lens:
        nb = -(-L // block_size)
        idx = torch.full((L, H, S), -1, dtype=torch.int32)
        for t in range(L):
            avail = t // block_size + 1 if causal else nb
            for h in range(H):
                if torch.rand((), generator=gen).item() < empty_rows:
                    continue
                n = int(torch.randint(1, min(S, avail) + 1, (), generator=gen))
                idx[t, h, :n] = torch.randperm(avail, generator=gen)[:n].to(torch.int32)
        rows.append(idx)
    return torch.cat(rows).unsqueeze(0)


def make_inputs(B, lens, HQ, H, Dk, Dv, S, block_size, causal, dtype, seed=0):
    """Dense input when ``lens`` is one int T (B sequences); packed (B = 1) when it is a list."""
    gen = torch.Generator().manual_seed(seed)
    packed = isinstance(lens, list)
    T = sum(lens) if packed else lens
    bsz = 1 if packed else B
    q = torch.randn(bsz, T, HQ, Dk, generator=gen)
    k = torch.randn(bsz, T, H, Dk, generator=gen)
    v = torch.randn(bsz, T, H, Dv, generator=gen)
    if packed:
        idx = random_block_indices(lens, H, S, block_size, causal, gen)
        cu = torch.tensor([0] + lens, dtype=torch.int32).cumsum(0).to(torch.int32)
    else:
        idx = torch.cat([random_block_indices([T], H, S, block_size, causal, gen) for _ in range(B)])
        cu = None
    do = torch.randn(bsz, T, HQ, Dv, generator=gen)
    to = dict(device=DEVICE)
    cu = None if cu is None else cu.to(DEVICE)
    return (q.to(dtype=dtype, **to), k.to(dtype=dtype, **to), v.to(dtype=dtype, **to), idx.to(DEVICE),
            cu, do.to(dtype=dtype, **to))


def run(backend, q, k, v, idx, block_size, cu, do, upcast=False, scale=None):
    """o and (dq, dk, dv) through the public op; ``upcast`` runs on float32 copies."""
    leaves = [x.detach().float() if upcast else x.detach() for x in (q, k, v)]
    for x in leaves:
        x.requires_grad_(True)
    o = selected_attention(*leaves, idx, block_size, scale=scale, cu_seqlens=cu, backend=backend)
    grads = torch.autograd.grad(o, leaves, do.float() if upcast else do)
    return o, grads


# id: (B, T or packed lengths, HQ, H, Dk, Dv, S, block_size, causal)
SHAPES = {
    "T1-G1": (1, 1, 1, 1, 16, 16, 1, 16, True),
    "T7-G2-H2-S3": (1, 7, 4, 2, 16, 16, 3, 16, True),
    "T65-G3-dk32dv16-noncausal": (2, 65, 3, 1, 32, 16, 3, 16, False),
    "T200-G1-bs32-S5": (1, 200, 1, 1, 16, 24, 5, 32, True),
    "T67-G16-H2-dk16dv24": (1, 67, 32, 2, 16, 24, 4, 16, True),
    "T48-G5-bs32-S2-noncausal": (1, 48, 5, 1, 16, 16, 2, 32, False),
    "T40-G2-bs5-dk24dv8": (1, 40, 2, 1, 24, 8, 4, 5, True),
    "T170-G2-bs80-S2": (1, 170, 2, 1, 16, 16, 2, 80, True),  # dK/dV in two key sub-tiles per block
    "varlen-1-37-100-G3": (1, [1, 37, 100], 3, 1, 32, 16, 3, 16, True),
    "varlen-1-37-60-G16-noncausal": (1, [1, 37, 60], 16, 1, 16, 16, 4, 32, False),
}


@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_fp32_matches_reference(shape, fwd_mode):
    B, lens, HQ, H, Dk, Dv, S, bs, causal = shape
    q, k, v, idx, cu, do = make_inputs(B, lens, HQ, H, Dk, Dv, S, bs, causal, torch.float32)
    o_ref, g_ref = run("reference", q, k, v, idx, bs, cu, do)
    o, g = run("triton", q, k, v, idx, bs, cu, do)
    assert o.dtype == q.dtype
    assert_close("o", o_ref, o, RATIO_FP32)
    for name, r, x in zip(("dq", "dk", "dv"), g_ref, g):
        assert_close(name, r, x, RATIO_FP32)


BF16_SHAPES = {k: SHAPES[k] for k in ("T65-G3-dk32dv16-noncausal", "T67-G16-H2-dk16dv24", "varlen-1-37-100-G3")}


@pytest.mark.parametrize("shape", list(BF16_SHAPES.values()), ids=list(BF16_SHAPES))
def test_bf16_matches_float32_reference(shape, fwd_mode):
    B, lens, HQ, H, Dk, Dv, S, bs, causal = shape
    q, k, v, idx, cu, do = make_inputs(B, lens, HQ, H, Dk, Dv, S, bs, causal, torch.bfloat16, seed=1)
    o_ref, g_ref = run("reference", q, k, v, idx, bs, cu, do, upcast=True)
    o, g = run("triton", q, k, v, idx, bs, cu, do)
    assert o.dtype == torch.bfloat16 and all(x.dtype == torch.bfloat16 for x in g)
    assert_close("o", o_ref, o, RATIO_BF16)
    for name, r, x in zip(("dq", "dk", "dv"), g_ref, g):
        assert_close(name, r, x, RATIO_BF16)


def check_with_block0_everywhere(lens, HQ, Dv, S):
    """Packed float32 inputs (H=2, Dk=16, blocks of 16) where every query lists block 0 (NSA's
    initial block: its query list spans every sequence), checked against the reference. Returns
    the kernel's gradients and the inputs."""
    q, k, v, idx, cu, do = make_inputs(1, lens, HQ, 2, 16, Dv, S, 16, True, torch.float32, seed=6)
    has0 = (idx == 0).any(-1)
    idx[..., 0] = torch.where(has0, idx[..., 0], 0)
    o_ref, g_ref = run("reference", q, k, v, idx, 16, cu, do)
    o, g = run("triton", q, k, v, idx, 16, cu, do)
    assert_close("o", o_ref, o, RATIO_FP32)
    for name, r, x in zip(("dq", "dk", "dv"), g_ref, g):
        assert_close(name, r, x, RATIO_FP32)
    return g, (q, k, v, idx, cu, do)


@pytest.mark.parametrize("segment_rows", [1, 6], ids=["rows1", "rows6"])
def test_scatter_chunks_and_segments(monkeypatch, segment_rows):
    """The scatter forward in many chunks of positions (a partials budget of 3 positions) and with
    its query lists split over many programs (``segment_rows`` rows each; every query lists block 0,
    so block 0's list spans every chunk); the forward's lse feeds the backward, so the gradients
    check it too."""
    monkeypatch.setattr(nsa.ops.selected, "FWD_MODE", "scatter")
    HQ, S, Dv = 6, 3, 24
    monkeypatch.setattr(nsa.ops.selected, "PARTIAL_BYTES", 3 * HQ * S * Dv * 4)
    monkeypatch.setattr(nsa.ops.selected, "SCATTER_ROWS", segment_rows)
    check_with_block0_everywhere([37, 30], HQ, Dv, S)


def test_scatter_equals_gather_forward(monkeypatch):
    """Both forward algorithms agree on o and lse (float32: summation order only)."""
    from nsa.ops.selected import _selected_fwd_op
    q, k, v, idx, cu, _ = make_inputs(1, [50, 77], 8, 2, 32, 16, 4, 16, False, torch.float32, seed=8)
    out = {}
    for mode in ("gather", "scatter"):
        monkeypatch.setattr(nsa.ops.selected, "FWD_MODE", mode)
        out[mode] = _selected_fwd_op(q, k, v, idx, 16, 0.2, cu)
    (o1, l1), (o2, l2) = out["gather"], out["scatter"]
    assert_close("o", o1, o2, RATIO_FP32)
    assert torch.equal(torch.isfinite(l1), torch.isfinite(l2))
    fin = torch.isfinite(l1)
    assert_close("lse", l1[fin], l2[fin], RATIO_FP32)


def test_fwd_mode_is_checked(monkeypatch):
    monkeypatch.setattr(nsa.ops.selected, "FWD_MODE", "fast")
    q, k, v, idx, cu, _ = make_inputs(1, 20, 2, 1, 16, 16, 2, 16, True, torch.float32)
    with pytest.raises(ValueError, match="FWD_MODE"):
        selected_attention(q, k, v, idx, 16, backend="triton")


def test_backward_is_deterministic():
    q, k, v, idx, cu, do = make_inputs(1, [1, 37, 50], 6, 2, 16, 16, 4, 16, True, torch.float32, seed=2)
    _, g1 = run("triton", q, k, v, idx, 16, cu, do)
    _, g2 = run("triton", q, k, v, idx, 16, cu, do)
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)


@pytest.mark.parametrize("segment", [1, 5], ids=["segment1", "segment5"])
def test_long_query_lists_are_split(monkeypatch, segment):
    """Every query selects block 0 (NSA's initial block), so its list is as long as the sequence;
    with tiny segments every list is cut, and the partial dK/dV sums go through the reduce kernel."""
    monkeypatch.setattr(nsa.ops.selected, "KV_SEGMENT", segment)
    g, (q, k, v, idx, cu, do) = check_with_block0_everywhere([37, 60], 6, 24, 3)
    _, g2 = run("triton", q, k, v, idx, 16, cu, do)
    for a, b in zip(g, g2):
        assert torch.equal(a, b)


def test_unselected_is_exact_zero(fwd_mode):
    """Rows with no visible key give o = 0 and dq = 0; keys no query selected get dk = dv = 0.
    Outputs are NaN-poisoned before the kernels run, so this also checks that they are written."""
    q, k, v, idx, cu, do = make_inputs(1, 40, 2, 1, 16, 16, 2, 16, True, torch.float32, seed=3)
    idx[:, :20] = -1  # no blocks at all
    idx[:, 20:32, :, 0] = 2  # a future block only: keys 32.. are invisible to queries 20..31
    idx[:, 20:32, :, 1] = -1
    idx[:, 32:, :, :] = torch.tensor([2, -1], dtype=torch.int32)  # nobody reads blocks 0 and 1
    o, (dq, dk, dv) = run("triton", q, k, v, idx, 16, cu, do)
    assert torch.equal(o[:, :32], torch.zeros_like(o[:, :32]))
    assert torch.equal(dq[:, :32], torch.zeros_like(dq[:, :32]))
    assert torch.equal(dk[:, :32], torch.zeros_like(dk[:, :32]))
    assert torch.equal(dv[:, :32], torch.zeros_like(dv[:, :32]))
    o_ref, g_ref = run("reference", q, k, v, idx, 16, cu, do)
    assert_close("o", o_ref, o, RATIO_FP32)
    for name, r, x in zip(("dq", "dk", "dv"), g_ref, (dq, dk, dv)):
        assert_close(name, r, x, RATIO_FP32)


def test_dense_equals_packed(fwd_mode):
    q, k, v, idx, _, do = make_inputs(2, 33, 4, 2, 16, 16, 3, 16, True, torch.float32, seed=4)
    o, g = run("triton", q, k, v, idx, 16, None, do)
    flat = [x.reshape(1, -1, *x.shape[2:]) for x in (q, k, v, idx, do)]
    cu = torch.tensor([0, 33, 66], dtype=torch.int32, device=DEVICE)
    o_p, g_p = run("triton", *flat[:4], 16, cu, flat[4])
    assert torch.equal(o.reshape(o_p.shape), o_p)
    for a, b in zip(g, g_p):
        assert torch.equal(a.reshape(b.shape), b)


def test_torch_compile_traces_the_op():
    """The kernels trace as opaque custom ops in one graph, forward and backward. (The public op's
    input validation reads tensor values, so it is called here without it.)"""
    q, k, v, idx, _, do = make_inputs(1, 20, 2, 1, 16, 16, 2, 16, True, torch.float32, seed=5)

    def f(q, k, v):
        return selected_attention_triton(q, k, v, idx, 16, 0.25, None) * 2

    o_ref, g_ref = run("triton", q, k, v, idx, 16, None, do, scale=0.25)
    leaves = [x.detach().requires_grad_(True) for x in (q, k, v)]
    o = torch.compile(f, backend="aot_eager", fullgraph=True)(*leaves)
    g = torch.autograd.grad(o, leaves, do)
    assert torch.equal(o, 2 * o_ref)
    for a, b in zip(g, g_ref):
        assert torch.equal(a, 2 * b)


@pytest.mark.parametrize("shape", ["T65-G3-dk32dv16-noncausal", "T170-G2-bs80-S2", "varlen-1-37-60-G16-noncausal",
                                   "T200-G1-bs32-S5"])
def test_scatter_dq_matches_reference(monkeypatch, shape):
    """The KV-block-centric dQ (per-slot float32 partials, several chunks, split lists) against
    the reference; dK/dV come from the same kernel as always."""
    monkeypatch.setattr(nsa.ops.selected, "DQ_MODE", "scatter")
    B, lens, HQ, H, Dk, Dv, S, bs, causal = SHAPES[shape]
    T = sum(lens) if isinstance(lens, list) else lens
    monkeypatch.setattr(nsa.ops.selected, "PARTIAL_BYTES", max(1, T // 3) * HQ * S * Dk * 4)
    monkeypatch.setattr(nsa.ops.selected, "SCATTER_ROWS", 7)
    q, k, v, idx, cu, do = make_inputs(B, lens, HQ, H, Dk, Dv, S, bs, causal, torch.float32)
    o_ref, g_ref = run("reference", q, k, v, idx, bs, cu, do)
    o, g = run("triton", q, k, v, idx, bs, cu, do)
    for name, r, x in zip(("dq", "dk", "dv"), g_ref, g):
        assert_close(name, r, x, RATIO_FP32)
    _, g2 = run("triton", q, k, v, idx, bs, cu, do)
    assert torch.equal(g[0], g2[0]), "scatter dQ not deterministic"


def test_scatter_dq_bf16(monkeypatch):
    monkeypatch.setattr(nsa.ops.selected, "DQ_MODE", "scatter")
    B, lens, HQ, H, Dk, Dv, S, bs, causal = SHAPES["varlen-1-37-100-G3"]
    q, k, v, idx, cu, do = make_inputs(B, lens, HQ, H, Dk, Dv, S, bs, causal, torch.bfloat16, seed=1)
    _, g_ref = run("reference", q, k, v, idx, bs, cu, do, upcast=True)
    _, g = run("triton", q, k, v, idx, bs, cu, do)
    assert_close("dq", g_ref[0], g[0].float(), RATIO_BF16)


def test_dq_mode_is_checked(monkeypatch):
    monkeypatch.setattr(nsa.ops.selected, "DQ_MODE", "fast")
    q, k, v, idx, cu, do = make_inputs(1, 20, 2, 1, 16, 16, 2, 16, True, torch.float32)
    with pytest.raises(ValueError, match="DQ_MODE"):
        run("triton", q, k, v, idx, 16, cu, do)
