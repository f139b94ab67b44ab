"""Queries after the start of their keys (``q_offset`` / ``cu_seqlens_k``) in the compressed
attention and block selection kernels, against the full-sequence specification.

The oracle (tests never use an offset in the reference): with ``q_full`` the queries of every key
position and ``q = q_full[:, off:]``, the offset call equals the last rows of
:func:`nsa.ops.reference.compressed_attention` / :func:`nsa.ops.reference.select_blocks` on
``q_full``; with ``do`` only on those rows, dq is the full call's dq rows and dk_cmp, dv_cmp are its
dk_cmp, dv_cmp. Packed input: the same per sequence. Tolerances are those of
tests/ops/test_compressed_triton.py for the same dtype; selections must equal the reference on every
row without a near-tie (float64 inputs, as tests/ops/test_selection_triton.py).
"""

import warnings
from types import SimpleNamespace

import pytest
import torch

from nsa.ops import reference, selection
from nsa.ops import compressed as cmp_mod
from nsa.ops.utils import compressed_cu_seqlens, num_compressed
from tests.helpers import assert_close

from .test_compressed_triton import RATIO
from .test_selection_triton import _near_tie_rows

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _cu(lens):
    return torch.tensor([0] + list(lens), dtype=torch.int32).cumsum(0).to(torch.int32).to(DEVICE)


def _randn(gen, *shape, dtype):
    return torch.randn(*shape, generator=gen).to(DEVICE, dtype)


# ----------------------------------------------------------------------------------------------
# compressed attention
# ----------------------------------------------------------------------------------------------

def _kernel_call(q, k, v, ks, st, scale, cu, do, dlse, **offset):
    """o, lse and the gradients of sum(o * do) (+ sum(lse * dlse) over finite lse) of the kernel."""
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    o, lse = cmp_mod.compressed_attention_triton(q, k, v, ks, st, scale, cu, **offset)
    loss = (o.float() * do).sum()
    if dlse is not None:
        loss = loss + (torch.where(torch.isfinite(lse), lse, 0.) * dlse).sum()
    grads = torch.autograd.grad(loss, (q, k, v), allow_unused=True)
    return o, lse, [torch.zeros_like(x) if g is None else g for x, g in zip((q, k, v), grads)]


def _oracle(q_full, k, v, ks, st, scale, rows, do, dlse):
    """The reference on the full queries (float32): o, lse, dq at the query rows ``rows`` of
    ``q_full``'s dim 1, and dk, dv; ``do`` / ``dlse`` are given on those rows only."""
    qf, kf, vf = (x.detach().float().requires_grad_() for x in (q_full, k, v))
    o, lse = reference.compressed_attention(qf, kf, vf, ks, st, scale)
    o, lse = o[:, rows], lse[:, rows]
    loss = (o * do).sum()
    if dlse is not None:
        loss = loss + (torch.where(torch.isfinite(lse), lse, 0.) * dlse).sum()
    grads = torch.autograd.grad(loss, (qf, kf, vf), allow_unused=True)
    dq, dk, dv = [torch.zeros_like(x) if g is None else g for x, g in zip((qf, kf, vf), grads)]
    return o, lse, [dq[:, rows], dk, dv]


def _compare(name, got, want, ratio):
    (o, lse, grads), (ro, rlse, rgrads) = got, want
    fin = torch.isfinite(rlse)
    assert torch.equal(torch.isfinite(lse), fin), f"{name}: lse -inf positions differ"
    assert (lse[~fin] == float("-inf")).all() and (o[~fin] == 0).all(), f"{name}: rows that see nothing"
    assert_close(f"{name} o", ro, o, ratio)
    assert_close(f"{name} lse", rlse[fin], lse[fin], ratio)
    for gname, r, x in zip(("dq", "dk_cmp", "dv_cmp"), rgrads, grads):
        assert_close(f"{name} {gname}", r, x, ratio)


# id, B, Tq, q_offset, H, G, Dk, Dv, kernel_size, stride, dtype
DENSE = [
    ("Tq1-off80-G1", 1, 1, 80, 2, 1, 16, 24, 16, 8, torch.float32),
    ("Tq9-off3-below-ks-G2", 2, 9, 3, 1, 2, 24, 16, 16, 8, torch.float32),  # Tk = 12 < ks: nothing visible
    ("Tq20-off10-G2-partly-blind", 1, 20, 10, 1, 2, 24, 40, 16, 8, torch.float32),  # rows 0..5 see nothing
    ("Tq37-off63-G3-k8s8", 1, 37, 63, 1, 3, 40, 24, 8, 8, torch.float32),
    ("Tq50-off150-G16-k4s2", 1, 50, 150, 1, 16, 16, 24, 4, 2, torch.float32),
    ("Tq70-off131-G2-k4s2-B2", 2, 70, 131, 2, 2, 24, 16, 4, 2, torch.float32),  # 8 key tiles x 2 heads
    ("Tq33-off100-G3-bf16", 1, 33, 100, 1, 3, 32, 16, 16, 8, torch.bfloat16),
    ("Tq45-off70-G1-k4s2-bf16", 1, 45, 70, 2, 1, 16, 24, 4, 2, torch.bfloat16),
    ("Tq40-off61-G4-dk48-fp16", 1, 40, 61, 2, 4, 48, 16, 8, 8, torch.float16),  # Dk as 32 + 16
    ("Tq30-off77-G16-dk96-bf16", 1, 30, 77, 1, 16, 96, 32, 16, 8, torch.bfloat16),  # Dk as 64 + 32
]


def _dense_inputs(B, Tq, off, H, G, Dk, Dv, ks, st, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    Tc = num_compressed(Tq + off, ks, st)
    q_full = _randn(gen, B, Tq + off, H * G, Dk, dtype=dtype)
    k, v = _randn(gen, B, Tc, H, Dk, dtype=dtype), _randn(gen, B, Tc, H, Dv, dtype=dtype)
    do = _randn(gen, B, Tq, H * G, Dv, dtype=torch.float32)
    return q_full, k, v, do


def _check_dense(name, B, Tq, off, H, G, Dk, Dv, ks, st, dtype, dlse=False):
    q_full, k, v, do = _dense_inputs(B, Tq, off, H, G, Dk, Dv, ks, st, dtype)
    g = torch.randn(B, Tq, H * G, generator=torch.Generator().manual_seed(1)).to(DEVICE) if dlse else None
    scale = Dk ** -0.5
    got = _kernel_call(q_full[:, off:], k, v, ks, st, scale, None, do, g, q_offset=off)
    want = _oracle(q_full, k, v, ks, st, scale, slice(off, None), do, g)
    assert got[0].dtype == dtype
    _compare(name, got, want, RATIO[dtype])


@pytest.mark.parametrize("case", DENSE, ids=[c[0] for c in DENSE])
def test_compressed_dense(case):
    _check_dense(*case)


def test_compressed_dense_grad_through_lse():
    _check_dense("lse-grad", 1, 40, 30, 2, 3, 24, 40, 16, 8, torch.float32, dlse=True)


def test_compressed_float64_inputs():
    """float64 inputs are computed in float32 (and cast back), with the offset passed through."""
    _check_dense("fp64", 1, 20, 21, 1, 2, 16, 24, 8, 8, torch.float64)


@pytest.mark.parametrize("nseg", ["one-segment", "segments"])
def test_compressed_dkv_segments(nseg, monkeypatch):
    """dK/dV with the queries of a compressed tile in one program and cut into several (fp32
    partials): the first row that sees a tile is max(0, i*stride + kernel_size - 1 - q_offset)."""
    seen = []
    orig = cmp_mod._dkv_segments

    def segments(*args):
        seen.append(1 if nseg == "one-segment" else orig(*args))
        return seen[-1]

    monkeypatch.setattr(cmp_mod, "_dkv_segments", segments)
    _check_dense(nseg, 1, 60, 45, 1, 4, 16, 24, 8, 8, torch.float32)
    assert seen == [1] if nseg == "one-segment" else seen[0] > 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_compressed_other_tiles(dtype, monkeypatch):
    """Other tile configs (8 positions x 2 heads per query tile, 32 compressed tokens per key tile;
    the dkv tiles then straddle the offset's first visible rows differently)."""
    fwd, dq, dkv = cmp_mod._fwd_config, cmp_mod._dq_config, cmp_mod._dkv_config
    monkeypatch.setattr(cmp_mod, "_fwd_config", lambda *a: {**fwd(*a), "rows": 16, "BC": 32})
    monkeypatch.setattr(cmp_mod, "_dq_config", lambda *a: {**dq(*a), "rows": 16, "BC": 32})
    monkeypatch.setattr(cmp_mod, "_dkv_config", lambda *a: {**dkv(*a), "rows": 64, "BC": 32})
    _check_dense("tiles", 1, 47, 90, 1, 2, 24, 40, 4, 2, dtype)


# id, [(len_q, len_k)], H, G, Dk, Dv, kernel_size, stride, dtype
PACKED = [
    ("q17/17-q1/50-q30/101-G2", [(17, 17), (1, 50), (30, 101)], 1, 2, 24, 40, 16, 8, torch.float32),
    ("q0/37-q5/5-q64/130-q3/9-G1-k4s2", [(0, 37), (5, 5), (64, 130), (3, 9)], 2, 1, 16, 24, 4, 2, torch.float32),
    ("q40/40-q1/77-q25/98-G3-bf16", [(40, 40), (1, 77), (25, 98)], 1, 3, 32, 16, 8, 8, torch.bfloat16),
    ("q9/9-q1/66-q33/120-G16-dk96-bf16", [(9, 9), (1, 66), (33, 120)], 1, 16, 96, 32, 16, 8, torch.bfloat16),
    ("q20/20-q1/45-q31/88-G4-dk48-fp16", [(20, 20), (1, 45), (31, 88)], 2, 4, 48, 16, 8, 8, torch.float16),
]


def _packed_inputs(seqs, H, G, Dk, Dv, ks, st, dtype, seed=0):
    """Packed keys-long queries q_full (cu_seqlens_k), the kernel's queries' rows in them, and the
    packed compressed keys/values."""
    gen = torch.Generator().manual_seed(seed)
    cu, cuk = _cu(q for q, _ in seqs), _cu(k for _, k in seqs)
    Tc = int(compressed_cu_seqlens(cuk, ks, st)[-1])
    q_full = _randn(gen, 1, int(cuk[-1]), H * G, Dk, dtype=dtype)
    k, v = _randn(gen, 1, Tc, H, Dk, dtype=dtype), _randn(gen, 1, Tc, H, Dv, dtype=dtype)
    rows = torch.cat([torch.arange(b - lq, b) for (lq, _), b in zip(seqs, cuk[1:].tolist())]).to(DEVICE)
    return q_full, k, v, cu, cuk, rows


def _packed_oracle(q_full, k, v, ks, st, scale, cuk, rows, do):
    """:func:`_oracle` of each sequence: the reference on q_full packed by cu_seqlens_k."""
    qf, kf, vf = (x.detach().float().requires_grad_() for x in (q_full, k, v))
    o, lse = reference.compressed_attention(qf, kf, vf, ks, st, scale, cu_seqlens=cuk)
    o, lse = o[:, rows], lse[:, rows]
    grads = torch.autograd.grad((o * do).sum(), (qf, kf, vf), allow_unused=True)
    dq, dk, dv = [torch.zeros_like(x) if g is None else g for x, g in zip((qf, kf, vf), grads)]
    return o, lse, [dq[:, rows], dk, dv]


@pytest.mark.parametrize("case", PACKED, ids=[c[0] for c in PACKED])
def test_compressed_packed(case):
    name, seqs, H, G, Dk, Dv, ks, st, dtype = case
    q_full, k, v, cu, cuk, rows = _packed_inputs(seqs, H, G, Dk, Dv, ks, st, dtype)
    do = torch.randn(1, rows.numel(), H * G, Dv, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    scale = Dk ** -0.5
    got = _kernel_call(q_full[:, rows], k, v, ks, st, scale, cu, do, None, cu_seqlens_k=cuk)
    want = _packed_oracle(q_full, k, v, ks, st, scale, cuk, rows, do)
    _compare(name, got, want, RATIO[dtype])


def test_compressed_zero_offset_is_the_plain_call():
    """q_offset=0 (dense) and cu_seqlens_k equal to cu_seqlens (packed) give the values of the call
    without them, bit for bit (forward and gradients)."""
    q, k, v, do = _dense_inputs(2, 41, 0, 1, 3, 24, 16, 8, 8, torch.bfloat16)
    a = _kernel_call(q, k, v, 8, 8, 0.3, None, do, None)
    b = _kernel_call(q, k, v, 8, 8, 0.3, None, do, None, q_offset=0)
    seqs = [(33, 33), (1, 1), (50, 50)]
    q, k, v, cu, _, _ = _packed_inputs(seqs, 2, 2, 16, 24, 4, 2, torch.float32)
    do = torch.randn(1, q.shape[1], 4, 24, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    c = _kernel_call(q, k, v, 4, 2, 0.3, cu, do, None)
    d = _kernel_call(q, k, v, 4, 2, 0.3, cu, do, None, q_offset=0, cu_seqlens_k=cu.clone())
    for x, y in ((a, b), (c, d)):
        for u, w in zip((x[0], x[1], *x[2]), (y[0], y[1], *y[2])):
            assert torch.equal(u, w)


# ----------------------------------------------------------------------------------------------
# block selection
# ----------------------------------------------------------------------------------------------

def _select_case(q_full, k, v, ks, st, bs, n, ni, nl, rows, cuk=None):
    """float64 reference on the full queries (packed by cuk): lse rows, selection rows, and the
    near-tie mask of those rows (see tests/ops/test_selection_triton.py)."""
    _, lse = reference.compressed_attention(q_full, k, v, ks, st, cu_seqlens=cuk)
    want = reference.select_blocks(q_full, k, lse, ks, st, bs, n, ni, nl, cu_seqlens=cuk)
    c = SimpleNamespace(bs=bs, ni=ni, nl=nl)
    if cuk is None:
        tie = _near_tie_rows(reference.block_scores(q_full, k, lse, ks, st, bs), want, c, q_full.shape[1])
    else:
        cc, ck = compressed_cu_seqlens(cuk, ks, st).tolist(), cuk.tolist()
        tie = torch.cat([_near_tie_rows(reference.block_scores(q_full[:, a:b], k[:, i:j], lse[:, a:b], ks, st, bs),
                                        want[:, a:b], c, b - a)
                         for a, b, i, j in zip(ck[:-1], ck[1:], cc[:-1], cc[1:])], 1)
    return lse[:, rows], want[:, rows], tie[:, rows]


def _assert_selection(name, got, want, tie):
    assert got.dtype == torch.int32 and got.shape == want.shape
    assert tie.float().mean().item() < 0.05, f"{name}: too many near-ties for an exactness test"
    bad = (~(got == want).all(-1) & ~tie).nonzero()
    assert bad.numel() == 0, (f"{name}: {bad.shape[0]} rows differ from the reference without a near-tie; "
                              f"first (b, t, h) = {tuple(bad[0].tolist())}: {got[tuple(bad[0])].tolist()} vs "
                              f"{want[tuple(bad[0])].tolist()}")


# id, B, Tq, q_offset, HQ, H, D, kernel_size, stride, block_size, num_selected, num_initial, num_local
SELECT_DENSE = [
    ("Tq1-off199-G2-16/8/16-n3", 1, 1, 199, 4, 2, 16, 16, 8, 16, 3, 1, 2),
    ("Tq60-off140-G16-16/8/16-n3-nl1", 1, 60, 140, 16, 1, 32, 16, 8, 16, 3, 1, 1),
    ("Tq40-off90-G1-8/4/32-n1-ni0-nl0-B2", 2, 40, 90, 2, 2, 16, 8, 4, 32, 1, 0, 0),
    # several chunks of 16 blocks; the tile's rows straddle chunk boundaries at their positions
    ("Tq100-off500-G2-16/8/16-n4", 1, 100, 500, 2, 1, 48, 16, 8, 16, 4, 1, 2),
]


def _select_dense_inputs(B, Tq, off, HQ, H, D, ks, st, seed=1):
    gen = torch.Generator().manual_seed(seed)
    Tc = num_compressed(Tq + off, ks, st)
    q_full = _randn(gen, B, Tq + off, HQ, D, dtype=torch.float64)
    return q_full, _randn(gen, B, Tc, H, D, dtype=torch.float64), _randn(gen, B, Tc, H, 8, dtype=torch.float64)


@pytest.mark.parametrize("case", SELECT_DENSE, ids=[c[0] for c in SELECT_DENSE])
def test_select_dense(case, monkeypatch):
    name, B, Tq, off, HQ, H, D, ks, st, bs, n, ni, nl = case
    launches = []
    kernel = selection.selection_fwd_kernel

    class Spy:
        def __getitem__(self, grid):
            launches.append(grid)
            return kernel[grid]
    monkeypatch.setattr(selection, "selection_fwd_kernel", Spy())
    q_full, k, v = _select_dense_inputs(B, Tq, off, HQ, H, D, ks, st)
    lse, want, tie = _select_case(q_full, k, v, ks, st, bs, n, ni, nl, slice(off, None))
    got = selection.select_blocks_triton(q_full[:, off:], k, lse, ks, st, bs, n, ni, nl, D ** -0.5, None,
                                         q_offset=off)
    assert len(launches) == 1
    _assert_selection(name, got, want, tie)


@pytest.mark.parametrize("positions", [16, 64])
def test_select_dense_tile_positions(positions):
    """Smaller query tiles: tiles whose first position sees whole chunks of blocks (the unmasked
    chunks) and tiles that start at an offset inside a block."""
    B, Tq, off, HQ, H, D, ks, st, bs, n, ni, nl = 1, 90, 520, 2, 1, 16, 16, 8, 16, 4, 1, 2
    q_full, k, v = _select_dense_inputs(B, Tq, off, HQ, H, D, ks, st)
    lse, want, tie = _select_case(q_full, k, v, ks, st, bs, n, ni, nl, slice(off, None))
    got = selection.selection_fwd(q_full[:, off:], k, lse, ks, st, bs, n, ni, nl, D ** -0.5, None,
                                  positions=positions, q_offset=off)
    _assert_selection(f"positions={positions}", got, want, tie)


# id, [(len_q, len_k)], HQ, H, D, kernel_size, stride, block_size, num_selected, num_initial, num_local
SELECT_PACKED = [
    ("q30/30-q1/77-q45/300-G2-16/8/16-n3", [(30, 30), (1, 77), (45, 300)], 4, 2, 16, 16, 8, 16, 3, 1, 2),
    ("q0/40-q8/8-q70/333-q1/600-G3-8/4/32-n4", [(0, 40), (8, 8), (70, 333), (1, 600)], 3, 1, 24, 8, 4, 32, 4, 1,
     1),
]


@pytest.mark.parametrize("case", SELECT_PACKED, ids=[c[0] for c in SELECT_PACKED])
def test_select_packed(case):
    name, seqs, HQ, H, D, ks, st, bs, n, ni, nl = case
    q_full, k, v, cu, cuk, rows = _packed_inputs(seqs, H, HQ // H, D, 8, ks, st, torch.float64, seed=1)
    lse, want, tie = _select_case(q_full, k, v, ks, st, bs, n, ni, nl, rows, cuk)
    got = selection.select_blocks_triton(q_full[:, rows], k, lse, ks, st, bs, n, ni, nl, D ** -0.5, cu,
                                         cu_seqlens_k=cuk)
    _assert_selection(name, got, want, tie)


def test_select_zero_offset_is_the_plain_call():
    q, k, v = _select_dense_inputs(1, 150, 0, 4, 2, 16, 16, 8)
    _, lse = reference.compressed_attention(q, k, v, 16, 8)
    args = (q.float(), k.float(), lse.float(), 16, 8, 16, 3, 1, 2, 0.25)
    assert torch.equal(selection.select_blocks_triton(*args, None),
                       selection.select_blocks_triton(*args, None, q_offset=0))
    cu = _cu([50, 100])
    ccu = compressed_cu_seqlens(cu, 16, 8)
    kp = torch.cat([k[:, :int(ccu[1])], k[:, :int(ccu[2] - ccu[1])]], 1).float()
    args = (q.float(), kp, lse.float(), 16, 8, 16, 3, 1, 2, 0.25, cu)
    assert torch.equal(selection.select_blocks_triton(*args), selection.select_blocks_triton(*args, 0, cu.clone()))


# Chunk tiles beyond selection.MAX_TILE_NUMEL (4/2/1024: 512 compressed tokens per block): no kernel.
# id, dense (B, Tq, q_offset) or packed [(len_q, len_k)], num_selected
SELECT_FALLBACK = [
    ("all-causal-dense-B2", (2, 30, 1500), 2),  # Tk = 1530 <= 2 blocks of 1024
    ("all-causal-packed", [(5, 5), (1, 900), (20, 2048), (0, 11)], 2),
    ("reference-dense", (1, 20, 2100), 2),  # 3 blocks > num_selected: the reference's top-n
    ("reference-packed", [(6, 6), (1, 2200), (12, 1500)], 2),
]


@pytest.mark.parametrize("case", SELECT_FALLBACK, ids=[c[0] for c in SELECT_FALLBACK])
def test_select_without_the_kernel(case, monkeypatch):
    name, shape, n = case
    monkeypatch.setattr(selection, "selection_fwd_kernel", None)  # a launch would fail
    ks, st, bs, HQ, H, D = 4, 2, 1024, 4, 2, 16
    if isinstance(shape, tuple):
        B, Tq, off = shape
        q_full, k, v = _select_dense_inputs(B, Tq, off, HQ, H, D, ks, st)
        rows, cu, cuk, offset = slice(off, None), None, None, dict(q_offset=off)
        longest = Tq + off
    else:
        q_full, k, v, cu, cuk, rows = _packed_inputs(shape, H, HQ // H, D, 8, ks, st, torch.float64, seed=1)
        offset = dict(cu_seqlens_k=cuk)
        longest = max(lk for _, lk in shape)
    lse, want, tie = _select_case(q_full, k, v, ks, st, bs, n, 1, 0, rows, cuk)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = selection.select_blocks_triton(q_full[:, rows], k, lse, ks, st, bs, n, 1, 0, D ** -0.5, cu, **offset)
    assert bool(caught) == (longest > n * bs), [str(w.message) for w in caught]
    _assert_selection(name, got, want, tie)
