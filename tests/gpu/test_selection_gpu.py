"""Triton top-n block selection at real sizes on the GPU (paper shapes, bf16).

B=1, HQ=64, H=4, D=128, kernel_size/stride/block_size 32/16/64, num_selected=16. The
log-sum-exp comes from a chunked float32 computation here (the definition, no kernel), so a
bug in the compressed-attention kernel cannot hide one in the selection. T = 4096 and 32768
are checked row by row with the tie-aware checker (float64 scores); at T = 131072 (q alone holds
2^30 elements) every row must be a valid selection, 256 rows spread over the sequence are
checked against the reference's rule on their own scores, and the first rows in full.
"""

import pytest
import torch

from nsa.ops import select_blocks
from nsa.ops.utils import compressed_cu_seqlens, num_compressed
from tests.gpu.sampled_rows import check_selection_rows, sample_positions
from tests.helpers import needs_cuda
from tests.ops.selection_check import check_selection

pytestmark = [pytest.mark.gpu, needs_cuda]

HQ, H, D = 64, 4, 128
KS, ST, BS, N, NI, NL = 32, 16, 64, 16, 1, 2
# bf16 scores from tensor cores differ from the float64 recomputation by summation order only.
TOL = 1e-5


def chunked_lse(q, k_cmp, scale, cu_seqlens=None, chunk=2048):
    """float32 ``[B, T, HQ]`` log-sum-exp of ``scale * q.k_cmp`` over visible compressed tokens,
    computed for ``chunk`` queries at a time (never ``[T, Tc]`` at once)."""
    B, T = q.shape[:2]
    G = q.shape[2] // k_cmp.shape[2]
    if cu_seqlens is not None:
        cu, ccu = cu_seqlens.tolist(), compressed_cu_seqlens(cu_seqlens, KS, ST).tolist()
        return torch.cat([chunked_lse(q[:, a:b], k_cmp[:, ca:cb], scale, None, chunk)
                          for a, b, ca, cb in zip(cu[:-1], cu[1:], ccu[:-1], ccu[1:])], 1)
    out = torch.empty(B, T, q.shape[2], device=q.device, dtype=torch.float32)
    kf = k_cmp.float().repeat_interleave(G, dim=2)  # [B, Tc, HQ, D]
    i = torch.arange(k_cmp.shape[1], device=q.device)
    for a in range(0, T, chunk):
        b = min(T, a + chunk)
        s = torch.einsum("bthd,bshd->bths", q[:, a:b].float(), kf) * scale
        t = torch.arange(a, b, device=q.device)
        vis = (i.view(1, -1) * ST + KS - 1 <= t.view(-1, 1)).view(1, b - a, 1, -1)
        out[:, a:b] = torch.logsumexp(s.masked_fill(~vis, float("-inf")), -1)
    return out


def make_inputs(T, B=1, cu_seqlens=None, seed=0, hq=HQ):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    Tc = num_compressed(T, KS, ST) if cu_seqlens is None else int(compressed_cu_seqlens(cu_seqlens, KS, ST)[-1])
    q = torch.randn(B, T, hq, D, device="cuda", generator=gen).bfloat16()
    k_cmp = torch.randn(B, Tc, H, D, device="cuda", generator=gen).bfloat16()
    lse = chunked_lse(q, k_cmp, D ** -0.5, cu_seqlens)
    return q, k_cmp, lse


def select(q, k_cmp, lse, cu_seqlens=None):
    return select_blocks(q, k_cmp, lse, KS, ST, BS, N, NI, NL, cu_seqlens=cu_seqlens, backend="triton")


def check(q, k_cmp, lse, idx, cu_seqlens=None):
    check_selection(q, k_cmp, lse, idx, kernel_size=KS, stride=ST, block_size=BS, num_selected=N,
                    num_initial=NI, num_local=NL, cu_seqlens=cu_seqlens, tol=TOL)


def assert_rows_valid(idx, T):
    """Every row of ``[B, T, H, N]`` is a structurally valid selection for a length-T sequence:
    ids ascending and distinct then -1, causal, forced blocks present, right number of -1."""
    tb = (torch.arange(T, device=idx.device) // BS).view(1, T, 1, 1)
    valid = idx >= 0
    assert ((idx == -1) | valid).all(), "entries below -1"
    assert not (valid & (idx > tb)).any(), "a block after the query's own block"
    assert not (valid[..., 1:] & ~valid[..., :-1]).any(), "-1 before a valid id"
    assert not (valid[..., 1:] & (idx[..., 1:] <= idx[..., :-1])).any(), "ids not strictly ascending"
    want_pad = torch.clamp(N - (tb[..., 0] + 1), min=0)  # [1, T, 1]
    assert torch.equal((~valid).sum(-1), want_pad.expand(idx.shape[:3])), "wrong number of -1"
    tb = tb[..., 0]  # [1, T, 1]
    for j in range(NI):
        assert ((idx == j).any(-1) | (tb < j)).all(), f"initial block {j} missing"
    for d in range(NL):
        assert ((idx == (tb - d).unsqueeze(-1)).any(-1) | (tb < d)).all(), f"local block t // {BS} - {d} missing"


@pytest.mark.parametrize("T", [4096, 32768])
def test_selection_paper_shape(T):
    q, k_cmp, lse = make_inputs(T)
    idx = select(q, k_cmp, lse)
    torch.cuda.synchronize()
    assert_rows_valid(idx, T)
    if T <= 4096:
        check(q, k_cmp, lse, idx)
        ref = select_blocks(q, k_cmp, lse, KS, ST, BS, N, NI, NL, backend="reference")
        match = (idx == ref).all(-1).float().mean().item()
        assert match >= 0.99, f"only {match:.4f} of the rows equal the reference selection"
    else:
        # the checker's float64 scores are [T, G, Tc] per KV head: check one KV head at a time
        G = HQ // H
        for h in range(H):
            check(q[:, :, h * G:(h + 1) * G], k_cmp[:, :, h:h + 1], lse[:, :, h * G:(h + 1) * G],
                  idx[:, :, h:h + 1])
            torch.cuda.empty_cache()


def test_selection_varlen_and_batch():
    cu = torch.tensor([0, 1000, 6000, 8192], dtype=torch.int32, device="cuda")
    q, k_cmp, lse = make_inputs(8192, cu_seqlens=cu, seed=1)
    idx = select(q, k_cmp, lse, cu)
    check(q, k_cmp, lse, idx, cu)
    q, k_cmp, lse = make_inputs(3000, B=3, seed=2)
    idx = select(q, k_cmp, lse)
    check(q, k_cmp, lse, idx)


@pytest.mark.parametrize("hq", [4, 8, 16, 32, 12])
def test_selection_small_groups(hq):
    """G = 1, 2, 4, 8 (and 3, padded to 4): tiles of 128 / 128 / 64 / 32 / 64 positions on the GPU
    (nsa.ops.selection.SMALL_G_ROWS), dense and packed."""
    q, k_cmp, lse = make_inputs(4096, hq=hq, seed=hq)
    idx = select(q, k_cmp, lse)
    assert_rows_valid(idx, 4096)
    check(q, k_cmp, lse, idx)
    cu = torch.tensor([0, 100, 1300, 4096], dtype=torch.int32, device="cuda")
    q, k_cmp, lse = make_inputs(4096, cu_seqlens=cu, seed=hq + 1, hq=hq)
    check(q, k_cmp, lse, select(q, k_cmp, lse, cu), cu)


@pytest.mark.bigmem
def test_selection_131072_sampled_rows():
    """Every row structurally valid; 256 query rows spread over the sequence (every KV head)
    against the reference's top-n rule on their float64 scores (tests/gpu/sampled_rows.py:
    tie-aware, >= 99% equal to the reference's choice); the first 4096 rows in full;
    deterministic."""
    T = 131072
    q, k_cmp, lse = make_inputs(T)
    idx = select(q, k_cmp, lse)
    assert_rows_valid(idx, T)
    check_selection_rows(q, k_cmp, lse, idx, sample_positions(T, 256), kernel_size=KS, stride=ST, block_size=BS,
                         num_selected=N, num_initial=NI, num_local=NL, tol=TOL)
    # the first 4096 rows see only the first compressed tokens: check their choice too
    P = 4096
    check(q[:, :P], k_cmp[:, :num_compressed(P, KS, ST)], lse[:, :P], idx[:, :P])
    # deterministic: a second run gives the same selection
    assert torch.equal(idx, select(q, k_cmp, lse))


@pytest.mark.parametrize("ks,st,bs,dtype", [
    (2, 1, 64, torch.float32),  # 64 tokens per block: 279552 B of shared memory (sm_90 compile, Triton 3.9)
    (4, 2, 512, torch.bfloat16),  # 256 tokens per block: ptxas fails under the 128-register cap (same)
    (4, 2, 1024, torch.bfloat16),  # a chunk over Triton's 2^20 elements
])
def test_selection_beyond_the_kernel_tile(ks, st, bs, dtype):
    """Configurations whose chunk tile the kernel cannot hold give valid selections (the fallback
    of nsa.ops.selection runs the reference where the launch fails; tie-aware check)."""
    import warnings

    gen = torch.Generator(device="cuda").manual_seed(7)
    T, hq, h, d, n = 3000, 8, 2, 64, 2
    Tc = num_compressed(T, ks, st)
    q = torch.randn(1, T, hq, d, device="cuda", generator=gen).to(dtype)
    kc = torch.randn(1, Tc, h, d, device="cuda", generator=gen).to(dtype)
    from nsa.ops import reference
    lse = reference.compressed_attention(q.float(), kc.float(), kc.float(), ks, st)[1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the reference fallback warns
        idx = select_blocks(q, kc, lse, ks, st, bs, n, 1, 1, backend="triton")
    check_selection(q.float(), kc.float(), lse, idx, kernel_size=ks, stride=st, block_size=bs, num_selected=n,
                    num_initial=1, num_local=1, tol=TOL)
