"""The sampled-row helpers of the long GPU tests (tests/gpu/sampled_rows.py) against the full
reference, at tiny sizes on CPU (no GPU needed; not marked gpu): a helper that evaluated the
wrong rows or positions would let a long-context test pass on a wrong kernel, or fail a right one."""

import pytest
import torch

from nsa.ops import reference
from nsa.ops.utils import num_compressed
from tests.helpers import assert_close

from tests.gpu import sampled_rows as sr

B, T, HQ, H, D = 2, 70, 4, 2, 8
KS, ST, BS = 8, 4, 16


def _inputs(Tk, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, HQ, D, generator=g)
    k, v = (torch.randn(B, Tk, H, D, generator=g) for _ in range(2))
    do = torch.randn(B, T, HQ, D, generator=g)
    return q, k, v, do


def _block_indices(seed):
    """Random causal lists ``[B, T, H, 3]``: distinct blocks <= t // BS in any order, -1 padding."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.full((B, T, H, 3), -1, dtype=torch.int32)
    for b in range(B):
        for t in range(T):
            for h in range(H):
                ids = torch.randperm(t // BS + 1, generator=g)[:3]
                idx[b, t, h, :ids.numel()] = ids.to(torch.int32)
    return idx


def _full(op, q, k, v, idx):
    if op == "compressed":
        return reference.compressed_attention(q, k, v, KS, ST)
    if op == "window":
        return reference.sliding_window_attention(q, k, v, 9), None
    return reference.selected_attention(q, k, v, idx, BS), None


@pytest.mark.parametrize("op", ["compressed", "window", "selected"])
def test_rows_reference_equals_the_full_reference(op):
    Tk = num_compressed(T, KS, ST) if op == "compressed" else T
    q, k, v, do = _inputs(Tk, seed=1)
    idx = _block_indices(seed=2) if op == "selected" else None
    mask = {"compressed": sr.compressed_mask(KS, ST, Tk), "window": sr.window_mask(9, Tk),
            "selected": sr.selected_mask(idx, BS) if idx is not None else None}[op]
    rows = sr.sample_positions(T, 12, seed=3, device="cpu")
    assert rows[0] == 0 and rows[-1] == T - 1 and rows.unique().numel() == 12
    do_rows = sr.rows_only(do, rows)
    leaves = [x.clone().requires_grad_(True) for x in (q, k, v)]
    o, lse = _full(op, *leaves, idx)
    grads = torch.autograd.grad(o, leaves, do_rows)
    ref = sr.rows_reference(q, k, v, rows, mask, D ** -0.5, do_rows, chunk=5)
    # the full reference as the kernel under test: everything agrees to float32 rounding
    sr.assert_rows_close(op, ref, o, rows, 1e-6, lse=lse, lse_ratio=1e-6)
    sr.assert_row_grads_close(op, ref, grads, rows, 1e-6)
    if lse is not None:  # rows before the first compressed token see nothing
        assert torch.isinf(ref["lse"][:, 0]).all() and torch.isfinite(ref["lse"][:, -1]).all()
    # a wrong row fails
    o_bad = o.detach().clone()
    o_bad[:, rows[5]] += 0.5
    with pytest.raises(AssertionError, match="relative error"):
        sr.assert_rows_close(op, ref, o_bad, rows, 1e-3)
    dq_bad = grads[0].clone()
    dq_bad[:, (rows[5] + 1) % T] += 1.0  # a row off the sample (positions 0 and T - 1 are in it)
    with pytest.raises(AssertionError, match="dq nonzero"):
        sr.assert_row_grads_close(op, ref, (dq_bad, *grads[1:]), rows, 1e-3)


def test_selection_rows_against_the_reference():
    Tc = num_compressed(T, KS, ST)
    g = torch.Generator().manual_seed(4)
    q = torch.randn(B, T, HQ, D, generator=g, dtype=torch.float64)
    k_cmp = torch.randn(B, Tc, H, D, generator=g, dtype=torch.float64)
    lse = reference.compressed_attention(q, k_cmp, k_cmp, KS, ST)[1]
    kw = dict(kernel_size=KS, stride=ST, block_size=8, num_selected=3, num_initial=1, num_local=1)
    rows = sr.sample_positions(T, 20, seed=5, device="cpu")
    score = sr.selection_row_scores(q, k_cmp, lse, rows, KS, ST, 8, chunk=7)
    assert_close("row scores", reference.block_scores(q, k_cmp, lse, KS, ST, 8)[:, rows], score, 1e-12)
    idx = reference.select_blocks(q, k_cmp, lse, KS, ST, 8, 3, 1, 1)
    sr.check_selection_rows(q, k_cmp, lse, idx, rows, **kw, min_match=1.0)
    # a sampled row that swaps its free block for the worst unchosen one fails
    r = next(int(t) for t in rows.tolist() if t // 8 >= 4)
    row = idx[0, r, 0].tolist()
    s = reference.block_scores(q, k_cmp, lse, KS, ST, 8)[0, r, 0]
    free = [j for j in row if 0 < j < r // 8]
    worst = min((j for j in range(1, r // 8) if j not in row), key=lambda j: s[j])
    bad = idx.clone()
    bad[0, r, 0] = torch.tensor(sorted([j for j in row if j != free[0]] + [worst]), dtype=torch.int32)
    with pytest.raises(AssertionError, match="scores below"):
        sr.check_selection_rows(q, k_cmp, lse, bad, rows, **kw)
    bad = idx.clone()
    bad[0, r, 0, 0] = -1  # the initial block dropped
    with pytest.raises(AssertionError, match="forced block missing"):
        sr.check_selection_rows(q, k_cmp, lse, bad, rows, **kw)
