"""Triton selected attention against the reference: output and every gradient.

Runs on CUDA when present, else on CPU under TRITON_INTERPRET=1 (set by tests/conftest.py),
always through the public op with ``backend='triton'``. Sizes are tiny for the interpreter.
"""

import pytest
import torch

import nsa.ops.reference
import nsa.ops.selected
from nsa.ops import selected_attention
from nsa.ops.selected import selected_attention_triton
from nsa.ops.triton_utils import pow2
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
    # Dk as two tiles (triton_utils.split_dim) in the backward's q . k, dQ and dK: one position per
    # dQ tile (G = 16), and union walks (G = 3)
    "T50-G16-dk96dv32": (1, 50, 16, 1, 96, 32, 3, 16, True),
    "varlen-30-41-G3-dk40dv16": (1, [30, 41], 3, 1, 40, 16, 3, 16, True),
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


BF16_SHAPES = {k: SHAPES[k] for k in ("T65-G3-dk32dv16-noncausal", "T67-G16-H2-dk16dv24", "varlen-1-37-100-G3",
                                      "T50-G16-dk96dv32", "varlen-30-41-G3-dk40dv16")}


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


@pytest.mark.parametrize("value", [3, True, 0, 2.0])
def test_fwd_share_is_checked(monkeypatch, value):
    """FWD_SHARE (a power of two) is validated where the gather forward plans programs of several
    positions (G = 16, bf16)."""
    monkeypatch.setattr(nsa.ops.selected, "FWD_SHARE", value)
    q, k, v, idx, cu, _ = make_inputs(1, 20, 16, 1, 16, 16, 2, 16, True, torch.bfloat16)
    with pytest.raises(ValueError, match="FWD_SHARE"):
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


# The gather forward's TMA path (FWD_TMA; one position per tile, G >= 16, fp16/bf16, head rows of
# 16-byte multiples): K/V through tensor descriptors, which the interpreter also runs (zero fill
# out of bounds, like TMA). id: (B, T or packed lengths, HQ, H, Dk, Dv, S, block_size, causal)
TMA_SHAPES = {
    "T67-B2-G16-H2-dk64dv32": (2, 67, 32, 2, 64, 32, 4, 16, True),  # odd T, dense
    "varlen-1-37-60-19-G16-dk64dv32": (1, [1, 37, 60, 19], 16, 1, 64, 32, 4, 16, True),  # blocks past ends
    "varlen-37-60-19-G16-noncausal": (1, [37, 60, 19], 16, 1, 64, 32, 4, 16, False),  # future blocks
    "varlen-23-50-G32-dk32dv64": (1, [23, 50], 32, 1, 32, 64, 3, 16, True),
    "varlen-40-29-G16-dk24dv8": (1, [40, 29], 16, 1, 24, 8, 3, 16, True),  # padded head widths
    "T90-G16-bs24": (1, 90, 16, 1, 64, 32, 3, 24, True),  # sub-tile of 32 keys reaches into the next block
    "varlen-100-70-G16-bs80": (1, [100, 70], 16, 1, 32, 32, 2, 80, True),  # 2 sub-tiles of 64, last one past
}
TMA_CASES = [(name, torch.bfloat16) for name in TMA_SHAPES] + [
    (name, torch.float16) for name in ("varlen-1-37-60-19-G16-dk64dv32", "varlen-23-50-G32-dk32dv64",
                                       "T90-G16-bs24")]


def fwd_both_paths(monkeypatch, q, k, v, idx, bs, cu):
    """(o, lse) of the gather forward with FWD_TMA False and True (forced: "auto" leaves padded
    head widths to the pointer path by choice, not because TMA could not read them); skips only
    where TMA is not available (triton_utils.tma_ok: a GPU without TMA)."""
    from nsa.ops.selected import _fwd_tma, _selected_fwd_op, _tiles
    from nsa.ops.triton_utils import tma_ok
    kp, vp = k.reshape(-1, *k.shape[2:]), v.reshape(-1, *v.shape[2:])
    if not tma_ok(kp, vp):
        pytest.skip("no TMA here (a GPU without tensor descriptors)")
    monkeypatch.setattr(nsa.ops.selected, "FWD_MODE", "gather")
    cfg = _tiles(q.shape[2] // k.shape[2], bs, k.shape[3], v.shape[3], q.dtype)
    assert cfg.BT == 1
    out = {}
    for tma in (False, True):
        monkeypatch.setattr(nsa.ops.selected, "FWD_TMA", tma)
        assert _fwd_tma(kp, vp, cfg) == tma
        out[tma] = _selected_fwd_op(q, k, v, idx, bs, q.shape[-1] ** -0.5, cu)
    return out[False], out[True]


def assert_same_forward(ptr, tma, rows=None):
    """The TMA forward gives the pointer path's o and lse: bitwise under the interpreter (same
    tiles, same operations), within bf16 rounding on a GPU (the products may be ordered differently)."""
    (o1, l1), (o2, l2) = ptr, tma
    if rows is not None:
        o1, l1, o2, l2 = o1[:, rows], l1[:, rows], o2[:, rows], l2[:, rows]
    assert torch.equal(torch.isfinite(l1), torch.isfinite(l2))
    if DEVICE == "cpu":
        assert torch.equal(o1, o2) and torch.equal(l1, l2)
    else:
        assert_close("o tma vs pointer", o1.float(), o2.float(), RATIO_BF16)
        fin = torch.isfinite(l1)
        assert_close("lse tma vs pointer", l1[fin], l2[fin], RATIO_FP32)


@pytest.mark.parametrize("name,dtype", TMA_CASES, ids=[f"{n}-{str(d)[6:]}" for n, d in TMA_CASES])
def test_fwd_tma_matches_reference(monkeypatch, name, dtype):
    """Odd T, varlen (descriptor rows past a sequence end: the next sequence's keys), -1 padding and
    empty rows, blocks in any order, future blocks (non-causal lists), blocks partly past the
    sequence end, G = 16 and 32, Dk != Dv, head widths padded to a power of two, sub-tiles that
    run past their block: the TMA forward against the float32 reference and the pointer path."""
    B, lens, HQ, H, Dk, Dv, S, bs, causal = TMA_SHAPES[name]
    q, k, v, idx, cu, do = make_inputs(B, lens, HQ, H, Dk, Dv, S, bs, causal, dtype, seed=11)
    ptr, tma = fwd_both_paths(monkeypatch, q, k, v, idx, bs, cu)
    o_ref, _ = run("reference", q, k, v, idx, bs, cu, do, upcast=True)
    assert tma[0].dtype == dtype
    assert_close("o", o_ref, tma[0].float(), RATIO_BF16)
    assert_close("o pointer", o_ref, ptr[0].float(), RATIO_BF16)
    assert_same_forward(ptr, tma)


@pytest.mark.parametrize("dtype,bs", [(torch.bfloat16, 24), (torch.float16, 24), (torch.bfloat16, 16)],
                         ids=["bf16-bs24", "fp16-bs24", "bf16-bs16"])
def test_fwd_tma_never_reads_invisible_values(monkeypatch, dtype, bs):
    """inf / NaN in k and v at positions that a query may not see leave every query that cannot
    see them finite and equal to the reference on clean inputs (the pointer path: the same).
    Sequence 0's last block reaches past its end into sequence 1 (poisoned at its position 3);
    sequence 1's rows 36..41 list only the block of their future key 45 (poisoned). Blocks of 24
    keys are read in sub-tiles of 32: sequence 2's rows 24..29 that list only block 0 then have
    keys 24..31 of block 1 (poisoned at 26) in their tile; blocks of 16 keys fill their sub-tile
    (no masking but the descriptor's bounds)."""
    lens, HQ, Dk, Dv, S = [40, 50, 30], 16, 64, 32, 3
    q, k, v, idx, cu, do = make_inputs(1, lens, HQ, 1, Dk, Dv, S, bs, True, dtype, seed=12)
    starts = [0, 40, 90]
    idx[0, 90 + 24: 90 + 30, 0] = torch.tensor([-1, 0, -1], dtype=torch.int32)
    idx[0, 40 + 36: 40 + 42, 0] = torch.tensor([45 // bs, -1, -1], dtype=torch.int32)
    bad = [(1, 3, float("inf")), (1, 45, float("-inf")), (2, 26, float("nan"))]  # (sequence, position, value)
    kb, vb = k.clone(), v.clone()
    for n, t, x in bad:
        kb[0, starts[n] + t], vb[0, starts[n] + t] = x, x
    # rows that may see a poisoned key: same sequence, its block listed, position >= the key's
    seq = torch.repeat_interleave(torch.arange(3), torch.tensor(lens))
    local = torch.arange(sum(lens)) - torch.tensor(starts)[seq]
    sel = idx[0, :, 0].cpu().long()  # [N, S] (H = 1)
    sees = torch.zeros(sum(lens), dtype=torch.bool)
    for n, t, _ in bad:
        sees |= (seq == n) & (sel == t // bs).any(-1) & (local >= t)
    clean = ~sees
    # the cases this test is about are present
    assert clean[seq == 0].all() and ((seq == 0) & (sel == 39 // bs).any(-1) & (local >= 39 // bs * bs)).any()
    assert (clean & (seq == 2) & (sel == 0).any(-1) & (local >= 26)).any()
    assert (clean & (seq == 1) & (sel == 45 // bs).any(-1) & (local < 45)).any()
    ptr, tma = fwd_both_paths(monkeypatch, q, kb, vb, idx, bs, cu)
    o_ref, _ = run("reference", q, k, v, idx, bs, cu, do, upcast=True)
    rows = clean.nonzero().squeeze(1).to(DEVICE)
    for name, (o, lse) in (("tma", tma), ("pointer", ptr)):
        assert torch.isfinite(o[:, rows]).all(), f"{name}: non-finite output on rows that see no poisoned key"
        assert_close(f"o {name}", o_ref[:, rows], o[:, rows].float(), RATIO_BF16)
    assert_same_forward(ptr, tma, rows)


def poisoned_neighbour_inputs():
    """bf16 inputs (two sequences of 70 and 37 tokens, G = 16, Dk / Dv 64 / 32, blocks of 16)
    whose lists agree between neighbours (blocks 0, the position's own and the one before), and
    copies kb / vb of k / v with inf / NaN at key 42 of sequence 0 and key 6 of sequence 1.
    Returns q, k, v, kb, vb, idx, cu, do, block size, and the rows that list the poisoned keys'
    blocks but cannot see the keys (positions 40, 41 and 4, 5)."""
    lens, HQ, Dk, Dv, S, bs = [70, 37], 16, 64, 32, 3, 16
    q, k, v, _, cu, do = make_inputs(1, lens, HQ, 1, Dk, Dv, S, bs, True, torch.bfloat16, seed=13)
    rows = []
    for L in lens:
        for t in range(L):
            own = t // bs
            rows.append([0, own, own - 1] if own >= 2 else [0, own, -1] if own == 1 else [0, -1, -1])
    idx = torch.tensor(rows, dtype=torch.int32).view(1, -1, 1, S).to(DEVICE)
    kb, vb = k.clone(), v.clone()
    for t, x in ((42, float("inf")), (70 + 6, float("nan"))):
        kb[0, t], vb[0, t] = x, float("nan")
    clean = torch.tensor([40, 41, 70 + 4, 70 + 5], device=DEVICE)
    return q, k, v, kb, vb, idx, cu, do, bs, clean


def test_fwd_shared_walks_never_read_invisible_values(monkeypatch):
    """Programs of 4 positions whose lists agree (blocks 0, the position's own and the one before),
    their shared blocks walked once for all positions in the common kernel (keys past the
    program's first position one at a time, for the rows that see them): inf / NaN at keys 42
    and 6 leave the rows that cannot see them (positions 40, 41 of sequence 0 and 4, 5 of
    sequence 1, which list the poisoned keys' blocks) finite and equal to the reference
    on clean inputs, with TMA and pointer loads."""
    q, k, v, kb, vb, idx, cu, do, bs, clean = poisoned_neighbour_inputs()
    monkeypatch.setattr(nsa.ops.selected, "FWD_SHARE", 4)
    ptr, tma = fwd_both_paths(monkeypatch, q, kb, vb, idx, bs, cu)
    o_ref, _ = run("reference", q, k, v, idx, bs, cu, do, upcast=True)
    for name, (o, lse) in (("tma", tma), ("pointer", ptr)):
        assert torch.isfinite(o[:, clean]).all(), f"{name}: non-finite output on rows that see no poisoned key"
        assert_close(f"o {name}", o_ref[:, clean], o[:, clean].float(), RATIO_BF16)
        # and the poison does reach the rows that see it
        assert not torch.isfinite(o[:, [42, 70 + 6]]).all()
    assert_same_forward(ptr, tma, clean)


@pytest.mark.parametrize("Dk,Dv", [(96, 32), (48, 64)])
def test_fwd_split_head_tma_and_pointer(monkeypatch, Dk, Dv):
    """Head dims that are not powers of two: q . k as two tiles (triton_utils.split_dim), the
    first through TMA (FWD_TMA True) or pointer loads, the second through pointer loads; both
    against the reference and each other, with programs of 4 positions (G = 16, bf16), and the
    same with one padded tile (SPLIT_HEAD_DIMS off)."""
    from nsa.ops import triton_utils
    from nsa.ops.selected import _fwd_tma, _selected_fwd_op, _tiles
    q, k, v, idx, cu = shared_inputs([40, 33], 16, Dk, Dv, 4, 16, True, torch.bfloat16, seed=23)
    o_ref = nsa.ops.reference.selected_attention(q.float(), k.float(), v.float(), idx, 16, cu_seqlens=cu)
    monkeypatch.setattr(nsa.ops.selected, "FWD_MODE", "gather")
    cfg = _tiles(16, 16, Dk, Dv, q.dtype)
    assert cfg.BT == 1 and cfg.SHARE == 4
    if not triton_utils.tma_ok(k[0], v[0]):
        pytest.skip("no TMA here (no CUDA, and the interpreter has no tensor descriptors)")
    for split in (True, False):
        monkeypatch.setattr(triton_utils, "SPLIT_HEAD_DIMS", split)
        out = {}
        for tma in (False, True):
            monkeypatch.setattr(nsa.ops.selected, "FWD_TMA", tma)
            assert _fwd_tma(k[0], v[0], cfg) == tma
            out[tma] = _selected_fwd_op(q, k, v, idx, 16, Dk ** -0.5, cu)
            assert_close(f"o tma={tma} split={split}", o_ref, out[tma][0].float(), RATIO_BF16)
        assert_same_forward(out[False], out[True])


def test_fwd_tma_resolution(monkeypatch):
    """FWD_TMA is checked; TMA only where its rules hold (else the pointer path, same results);
    "auto" leaves head dims that would take padded boxes to pointer loads (not a Dk split in two
    power-of-two tiles)."""
    from nsa.ops.selected import _fwd_tma, _tiles
    from nsa.ops.triton_utils import tma_ok
    k = torch.zeros(8, 2, 64, dtype=torch.bfloat16, device=DEVICE)
    cfg16, cfg4 = _tiles(16, 16, 64, 64, k.dtype), _tiles(4, 16, 64, 64, k.dtype)
    monkeypatch.setattr(nsa.ops.selected, "FWD_TMA", True)
    assert _fwd_tma(k, k, cfg16)
    assert not _fwd_tma(k, k, cfg4)  # several positions per tile: union walk, pointer loads
    assert not _fwd_tma(k.float(), k.float(), _tiles(16, 16, 64, 64, torch.float32))
    k20 = torch.zeros(8, 2, 20, dtype=torch.bfloat16, device=DEVICE)  # 40-byte rows
    assert not _fwd_tma(k20, k20, _tiles(16, 16, 20, 20, k.dtype))
    shifted = torch.zeros(8 * 2 * 64 + 8, dtype=torch.bfloat16, device=DEVICE)[8:].view(8, 2, 64)  # base 16 bytes off
    assert _fwd_tma(shifted, shifted, cfg16)
    odd = torch.zeros(8 * 2 * 64 + 1, dtype=torch.bfloat16, device=DEVICE)[1:].view(8, 2, 64)  # base 2 bytes off
    assert not _fwd_tma(odd, k, cfg16) and not _fwd_tma(k, odd, cfg16)
    k48 = torch.zeros(8, 2, 48, dtype=torch.bfloat16, device=DEVICE)  # 96-byte rows, boxes of 64 columns
    cfg48 = _tiles(16, 16, 48, 48, k.dtype)
    assert _fwd_tma(k48, k48, cfg48) == tma_ok(k48, k48)
    monkeypatch.setattr(nsa.ops.selected, "FWD_TMA", "auto")  # padded box columns: pointer loads
    assert not _fwd_tma(k48, k48, cfg48) and _fwd_tma(k, k, cfg16) == tma_ok(k, k)
    # Dk 192 as 128 + 64 (programs of 2 positions), Dv 128: boxes without padding
    k192, v128 = (torch.zeros(8, 2, d, dtype=torch.bfloat16, device=DEVICE) for d in (192, 128))
    cfg192 = _tiles(16, 64, 192, 128, k.dtype)
    assert cfg192.SHARE == 2 and _fwd_tma(k192, v128, cfg192) == tma_ok(k192, v128)
    assert not _fwd_tma(k192, v128, cfg192._replace(SHARE=1))  # one padded tile of 256
    assert not _fwd_tma(v128, k192, _tiles(16, 64, 128, 192, k.dtype))  # Dv 192
    monkeypatch.setattr(nsa.ops.selected, "FWD_TMA", False)
    assert not _fwd_tma(k, k, cfg16)
    monkeypatch.setattr(nsa.ops.selected, "FWD_TMA", "fast")
    with pytest.raises(ValueError, match="FWD_TMA"):
        _fwd_tma(k, k, cfg16)


def test_fwd_tma_misaligned_falls_back(monkeypatch):
    """k and v at a base that is not 16-byte aligned: the forward takes the pointer loads (TMA
    would fault) and still matches the reference."""
    q, k, v, idx, cu, do = make_inputs(1, [30, 21], 16, 1, 32, 32, 3, 16, True, torch.bfloat16, seed=13)
    monkeypatch.setattr(nsa.ops.selected, "FWD_TMA", True)
    k2 = torch.empty(k.numel() + 1, dtype=k.dtype, device=DEVICE)[1:].view(k.shape).copy_(k)
    v2 = torch.empty(v.numel() + 1, dtype=v.dtype, device=DEVICE)[1:].view(v.shape).copy_(v)
    o, _ = run("triton", q, k2, v2, idx, 16, cu, do)
    o_ref, _ = run("reference", q, k, v, idx, 16, cu, do, upcast=True)
    assert_close("o", o_ref, o.float(), RATIO_BF16)


@pytest.mark.parametrize("HQ", [16, 1], ids=["G16-gather", "G1-scatter"])
def test_invalid_block_indices_raise_on_the_triton_path(HQ):
    """The Triton path's block_indices check (one Triton pass, GPU or interpreter) rejects values
    far past the sequence, below -1, a block of the next packed sequence and a repeated block
    with the ValueError naming block_indices, for the gather (G=16) and scatter (G=1) kernels."""
    lens = [37, 60]
    q, k, v, idx, cu, _ = make_inputs(1, lens, HQ, 1, 32, 32, 3, 16, True, torch.bfloat16, seed=15)
    spoils = {
        "far": (5, 0, 2 ** 30), "below": (50, 1, -7), "other-sequence": (10, 2, 3),  # sequence 0 has 3 blocks
        "repeat": None,
    }
    for name, spoil in spoils.items():
        bad = idx.clone()
        if spoil is None:
            bad[0, 70, 0] = torch.tensor([1, 1, -1], dtype=torch.int32)
        else:
            t, s, val = spoil
            bad[0, t, 0, s] = val
        with pytest.raises(ValueError, match="block_indices"):
            selected_attention(q, k, v, bad, 16, cu_seqlens=cu, backend="triton")
    o = selected_attention(q, k, v, idx, 16, cu_seqlens=cu, backend="triton")  # the valid input still runs
    assert torch.isfinite(o).all()


def neighbour_block_indices(lens, H, S, block_size, causal, gen):
    """Like :func:`random_block_indices`, with neighbouring positions that agree: about half the
    rows list the previous row's blocks in another slot order (-1 padding included), a fifth
    swap one of them for another block, the rest are drawn afresh. Every aligned group of
    positions then shares some blocks (NSA's forced blocks play that part in real selections)."""
    idx = random_block_indices(lens, H, S, block_size, causal, gen, empty_rows=0.05)
    start = 0
    for L in lens:
        for t in range(start + 1, start + L):
            avail = (t - start) // block_size + 1 if causal else -(-L // block_size)
            for h in range(H):
                r = torch.rand((), generator=gen).item()
                prev = idx[0, t - 1, h]
                if r < 0.5:
                    idx[0, t, h] = prev[torch.randperm(S, generator=gen)]
                elif r < 0.7 and (prev >= 0).any():
                    row = prev[torch.randperm(S, generator=gen)].clone()
                    free = [b for b in range(avail) if b not in row.tolist()]
                    if free:
                        row[int((row >= 0).nonzero()[0])] = free[int(torch.randint(len(free), (), generator=gen))]
                    idx[0, t, h] = row
        start += L
    return idx


def shared_inputs(lens, HQ, Dk, Dv, S, bs, causal, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    N = sum(lens)
    q, k, v = (torch.randn(1, N, h, d, generator=gen) for h, d in ((HQ, Dk), (1, Dk), (1, Dv)))
    idx = neighbour_block_indices(lens, 1, S, bs, causal, gen)
    idx[0, [3, N - 2]] = -1  # empty rows (nothing shared in their programs)
    cu = torch.tensor([0] + lens).cumsum(0).to(torch.int32)
    return [x.to(DEVICE) for x in (q.to(dtype), k.to(dtype), v.to(dtype), idx, cu)]


# id: (packed lengths, HQ, Dk, Dv, S, block_size, causal)
SHARED_SHAPES = {
    "varlen-1-37-60-19-G16": ([1, 37, 60, 19], 16, 64, 32, 4, 16, True),  # lengths not multiples of P
    "varlen-45-30-G12-bs5": ([45, 30], 12, 32, 16, 5, 5, True),  # padded heads; blocks of 5 (tails cross blocks)
    "varlen-50-29-G16-noncausal": ([50, 29], 16, 32, 32, 4, 16, False),  # future blocks in the lists
    "T70-G32-dk32dv64-bs24": ([70], 32, 32, 64, 3, 24, True),  # 32 rows per position; blocks of 24
    "varlen-40-33-G16-dk96": ([40, 33], 16, 96, 32, 4, 16, True),  # q . k as two tiles (64 + 32)
}
# (shape, positions per program)
SHARED_CASES = [(n, share) for n in SHARED_SHAPES for share in (4, 8)] + [("varlen-1-37-60-19-G16", 2)]


@pytest.mark.parametrize("name,share", SHARED_CASES, ids=[f"{n}-P{s}" for n, s in SHARED_CASES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fwd_shared_blocks_match_reference(monkeypatch, name, share, dtype):
    """The gather forward with several positions per program (the blocks every position lists
    walked once for all of them in the common kernel, their keys past the program's first
    position one at a time, then each position's other blocks in the one-position kernel, which
    resumes from the parked state) against the reference, on lists where neighbours agree in any
    slot order; 2 / 4 / 8 positions; and the one-position kernel alone (FWD_SHARE = 1) on the
    same inputs. The plan behind it is checked on its own below."""
    lens, HQ, Dk, Dv, S, bs, causal = SHARED_SHAPES[name]
    q, k, v, idx, cu = shared_inputs(lens, HQ, Dk, Dv, S, bs, causal, dtype, seed=21)
    from nsa.ops.selected import _chunk_table, _launch_fwd, _share, _tiles
    monkeypatch.setattr(nsa.ops.selected, "FWD_SHARE", share)
    cfg = _tiles(HQ, bs, Dk, Dv, dtype)
    assert cfg.SHARE == (1 if dtype == torch.float32 else _share(cfg.BT, cfg.BR, Dk, Dv))
    # float32 is not given the shared walk by default (registers on sm_90): run it here all the same
    cfg = cfg._replace(SHARE=_share(cfg.BT, cfg.BR, Dk, Dv))
    assert cfg.BT == 1 and cfg.SHARE == min(share, 64 * 128 // (cfg.BR * max(pow2(Dk), pow2(Dv)))) > 1
    scale = Dk ** -0.5
    N = q.shape[1]
    packed = (q[0], k[0], v[0], idx[0], bs, scale, cu)
    o, lse = _launch_fwd(*packed, _chunk_table(cu, N, cfg.SHARE), cfg)
    o1, lse1 = _launch_fwd(*packed, _chunk_table(cu, N, 1), cfg._replace(SHARE=1))
    o, lse, o1, lse1 = o[None], lse[None], o1[None], lse1[None]
    o_ref = nsa.ops.reference.selected_attention(q.float(), k.float(), v.float(), idx, bs, scale=scale, cu_seqlens=cu)
    ratio = RATIO_FP32 if dtype == torch.float32 else RATIO_BF16
    assert_close("o", o_ref, o.float(), ratio)
    assert_close("o vs one position per program", o1.float(), o.float(), ratio)
    # lse against the one-position kernel's (tested against the reference through the gradients)
    assert torch.equal(torch.isfinite(lse), torch.isfinite(lse1)) and not torch.isfinite(lse).all()
    fin = torch.isfinite(lse1)
    assert_close("lse", lse1[fin], lse[fin], RATIO_FP32)


@pytest.mark.parametrize("share", [2, 4, 8])
def test_share_plan(share):
    """selected_share_plan_kernel: every planned list is a reordering of the position's list with
    its valid entries first, then the blocks every position of the program (in its sequence)
    lists, the same and in the same order for all of them; counts[..., 0] is their number (the
    common kernel's part), counts[..., 1] the number of valid entries: on these lists programs
    share none, one and several blocks."""
    from nsa.ops.selected import _chunk_table, selected_share_plan_kernel
    lens, S = [1, 37, 60, 19], 5
    gen = torch.Generator().manual_seed(22)
    idx = neighbour_block_indices(lens, 2, S, 8, True, gen)[0].to(DEVICE)  # [N, H, S]
    cu = torch.tensor([0] + lens).cumsum(0).to(torch.int32).to(DEVICE)
    N, H = idx.shape[0], idx.shape[1]
    chunks = _chunk_table(cu, N, share)
    plan = torch.full_like(idx, -5)
    counts = torch.full((N, H, 2), -5, dtype=torch.int32, device=DEVICE)
    selected_share_plan_kernel[(chunks.shape[0], H)](idx, plan, counts, cu, chunks, H=H, S=S, SP=8,
                                                     P=share)
    idx, plan, counts, cu = idx.cpu(), plan.cpu(), counts.cpu(), cu.cpu()
    shares = set()
    for n, L in enumerate(lens):
        for g0 in range(0, L, share):
            ts = list(range(cu[n] + g0, cu[n] + min(L, g0 + share)))
            for h in range(H):
                sets = [set(idx[t, h].tolist()) - {-1} for t in ts]
                common = set.intersection(*sets)
                n_sh = len(common)
                shares.add(min(n_sh, 2))
                head = plan[ts[0], h, :n_sh].tolist()
                assert set(head) == common
                for t, st in zip(ts, sets):
                    row = plan[t, h].tolist()
                    assert sorted(row) == sorted(idx[t, h].tolist())
                    assert int(counts[t, h, 0]) == n_sh and int(counts[t, h, 1]) == len(st)
                    assert row[:n_sh] == head and set(row[:len(st)]) == st and all(x == -1 for x in row[len(st):])
    assert shares == {0, 1, 2}


DQ_SHARED_CASES = [(n, s, torch.bfloat16) for n, s in SHARED_CASES] + [
    (n, 4, torch.float32) for n in SHARED_SHAPES] + [("varlen-1-37-60-19-G16", 4, torch.float16)]


@pytest.mark.parametrize("name,share,dtype", DQ_SHARED_CASES,
                         ids=[f"{n}-P{s}-{str(d)[6:]}" for n, s, d in DQ_SHARED_CASES])
def test_dq_shared_blocks_match_reference(monkeypatch, name, share, dtype):
    """The dQ gather with several positions per program (the blocks every position lists walked
    once for all of them, keys up to the program's first position, in the common kernel; the
    keys after it and each position's other blocks in the one-position kernel, added to the
    parked partial) against the reference's dq, on lists where neighbours agree in any slot
    order; 2 / 4 / 8 positions; delta computed there, and given (bitwise the same dq)."""
    lens, HQ, Dk, Dv, S, bs, causal = SHARED_SHAPES[name]
    q, k, v, idx, cu = shared_inputs(lens, HQ, Dk, Dv, S, bs, causal, dtype, seed=24)
    do = torch.randn(q.shape[:3] + (Dv,), generator=torch.Generator().manual_seed(25)).to(dtype).to(DEVICE)
    from nsa.ops.selected import _chunk_table, _delta, _launch_dq_shared, _launch_fwd, _share, _tiles
    monkeypatch.setattr(nsa.ops.selected, "DQ_SHARE", share)
    cfg = _tiles(HQ, bs, Dk, Dv, dtype)
    assert cfg.SHARE_DQ == (1 if dtype == torch.float32 else _share(cfg.BT, cfg.BR, Dk, Dv, "DQ_SHARE"))
    # float32 is not given the shared walk by default (registers on sm_90): run it here all the same
    cfg = cfg._replace(SHARE_DQ=_share(cfg.BT, cfg.BR, Dk, Dv, "DQ_SHARE"))
    assert cfg.BT == 1 and cfg.SHARE_DQ == min(share, 64 * 128 // (cfg.BR * max(pow2(Dk), pow2(Dv)))) > 1
    _, (dq_ref, _, _) = run("reference", q, k, v, idx, bs, cu, do, upcast=True)
    scale = Dk ** -0.5
    o, lse = _launch_fwd(q[0], k[0], v[0], idx[0], bs, scale, cu, _chunk_table(cu, q.shape[1], 1),
                         cfg._replace(SHARE=1))
    args = (q[0], k[0], v[0], o, lse, do[0])
    positions = _chunk_table(cu, q.shape[1], 1)
    dq, delta = _launch_dq_shared(*args, None, idx[0], bs, scale, cu, positions, cfg)
    assert_close("dq", dq_ref[0], dq.float(), RATIO_FP32 if dtype == torch.float32 else RATIO_BF16)
    dq_given, _ = _launch_dq_shared(*args, _delta(o, do[0]), idx[0], bs, scale, cu, positions, cfg)
    assert torch.equal(dq_given, dq), "dq with delta given differs from dq with delta computed"


def test_dq_shared_walks_never_read_invisible_values(monkeypatch):
    """Programs of 4 positions whose lists agree (blocks 0, the position's own and the one
    before; the dQ common kernel takes their keys up to the program's first position, the
    one-position kernel the keys after it): inf / NaN at keys 42 and 6 of the two sequences
    leave dq finite and equal to the reference on clean inputs for the rows that cannot see them
    (positions 40, 41 and 4, 5, which list the poisoned keys' blocks)."""
    q, k, v, kb, vb, idx, cu, do, bs, clean = poisoned_neighbour_inputs()
    monkeypatch.setattr(nsa.ops.selected, "FWD_MODE", "gather")
    monkeypatch.setattr(nsa.ops.selected, "DQ_MODE", "gather")
    monkeypatch.setattr(nsa.ops.selected, "DQ_SHARE", 4)
    from nsa.ops.selected import _tiles
    assert _tiles(q.shape[2], bs, q.shape[3], v.shape[3], q.dtype).SHARE_DQ == 4
    _, (dq, _, _) = run("triton", q, kb, vb, idx, bs, cu, do)
    _, (dq_ref, _, _) = run("reference", q, k, v, idx, bs, cu, do, upcast=True)
    assert torch.isfinite(dq[:, clean]).all(), "non-finite dq on rows that see no poisoned key"
    assert_close("dq", dq_ref[:, clean], dq[:, clean].float(), RATIO_BF16)
    assert not torch.isfinite(dq[:, [42, 70 + 6]]).all()  # the poison does reach the rows that see it


@pytest.mark.parametrize("value", [0, 3, 2.0, True])
def test_dq_share_is_checked(monkeypatch, value):
    """DQ_SHARE (a power of two) is validated where the dQ gather plans programs of several
    positions."""
    monkeypatch.setattr(nsa.ops.selected, "DQ_SHARE", value)
    from nsa.ops.selected import _tiles
    with pytest.raises(ValueError, match="DQ_SHARE"):
        _tiles(16, 16, 64, 64, torch.bfloat16)
