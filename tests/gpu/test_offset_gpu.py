"""Queries that start later than their keys on the GPU: the Triton kernels with ``q_offset`` /
``cu_seqlens_k`` against the reference (every branch and the gated whole, outputs and every
gradient, fused and composed), at paper head counts; and the context-parallel layer at P = 1
(a one-process NCCL group) against the plain layer."""

import os
import tempfile

import pytest
import torch

import nsa.ops as ops
import nsa.ops.api
from nsa.layer import NativeSparseAttention, NSAConfig
from tests.helpers import assert_close, needs_cuda

pytestmark = [pytest.mark.gpu, needs_cuda]

# every causal block selected (block 128, 20 slots >= ceil(2500 / 128)): top-n has one answer, so
# the kernels' and the reference's fp32 summation orders cannot flip a near-tie
KW = dict(kernel_size=32, stride=16, block_size=128, num_selected=20, num_initial=1, num_local=2, window_size=512)
RATIO = 1e-4  # float32 end to end, as tests/gpu/test_layer_gpu.py


def _inputs(lens_k, HQ=64, H=4, Dk=128, Dv=128, seed=0):
    from nsa.ops.utils import num_compressed

    g = torch.Generator(device="cuda").manual_seed(seed)
    Tk = sum(lens_k)
    tc = sum(num_compressed(n, 32, 16) for n in lens_k)

    def r(*s):
        return torch.randn(*s, device="cuda", generator=g)

    q = r(1, Tk, HQ, Dk)
    return q, r(1, tc, H, Dk), r(1, tc, H, Dv), r(1, Tk, H, Dk), r(1, Tk, H, Dv), r(1, Tk, H, Dk), r(1, Tk, H, Dv), \
        *(torch.sigmoid(r(1, Tk, HQ)) for _ in range(3))


@pytest.mark.parametrize("fused", [True, False], ids=["fused_gates", "composed"])
def test_offset_kernels_match_reference(fused, monkeypatch):
    monkeypatch.setattr(nsa.ops.api, "FUSED_GATES", fused)
    lens_k, lens_q = [700, 2500, 300], [700, 1001, 1]
    cu_k = torch.tensor([0] + lens_k, device="cuda").cumsum(0).to(torch.int32)
    cu_q = torch.tensor([0] + lens_q, device="cuda").cumsum(0).to(torch.int32)
    q, kc, vc, ks, vs, kw, vw, g1, g2, g3 = _inputs(lens_k)
    rows = torch.cat([torch.arange(a + nk - nq, a + nk) for a, nk, nq in
                      zip(cu_k[:-1].tolist(), lens_k, lens_q)]).cuda()
    leaves = [t.contiguous().requires_grad_(True) for t in (q[:, rows], kc, vc, ks, vs, kw, vw, g1[:, rows],
                                                            g2[:, rows], g3[:, rows])]
    do = torch.randn(1, len(rows), 64, 128, device="cuda")
    outs = {}
    for backend in ("reference", "triton"):
        o, idx = ops.nsa(*leaves, **KW, cu_seqlens=cu_q, cu_seqlens_k=cu_k, backend=backend,
                         return_block_indices=True)
        outs[backend] = (o, idx, torch.autograd.grad(o, leaves, do))
    (o_r, i_r, g_r), (o_t, i_t, g_t) = outs["reference"], outs["triton"]
    assert torch.equal(i_r, i_t)
    assert_close("o", o_r, o_t, RATIO)
    for n, a, b in zip(("q", "k_cmp", "v_cmp", "k_slc", "v_slc", "k_win", "v_win", "g_cmp", "g_slc", "g_win"),
                       g_r, g_t):
        assert_close(f"d{n}", a, b, RATIO)


def test_dense_offset_bf16_matches_whole_call_rows():
    """bf16, dense, one offset: the kernels' rows equal the kernels' whole call's last rows."""
    T, off = 4096, 3000
    q, kc, vc, ks, vs, kw, vw, g1, g2, g3 = (t.bfloat16() for t in _inputs([T]))
    whole = ops.nsa(q, kc, vc, ks, vs, kw, vw, g1, g2, g3, **KW)
    part = ops.nsa(q[:, off:].contiguous(), kc, vc, ks, vs, kw, vw, g1[:, off:].contiguous(),
                   g2[:, off:].contiguous(), g3[:, off:].contiguous(), **KW, q_offset=off)
    assert_close("o", whole[:, off:].float(), part.float(), 1e-2)


def test_context_parallel_layer_p1_equals_plain():
    import torch.distributed as dist

    from nsa.parallel import ContextParallel, SequenceShards

    d = tempfile.mkdtemp()
    dist.init_process_group("nccl", init_method=f"file://{os.path.join(d, 'init')}", rank=0, world_size=1,
                            device_id=torch.device("cuda", torch.cuda.current_device()))
    try:
        torch.manual_seed(0)
        m = NativeSparseAttention(NSAConfig.preset("small", backend="triton", block_size=128, num_selected=20)).cuda()
        lens = [700, 2500]
        cu = torch.tensor([0] + lens, device="cuda").cumsum(0).to(torch.int32)
        x = torch.randn(1, sum(lens), m.config.hidden_size, device="cuda", requires_grad=True)
        w = torch.randn_like(x)
        y = m(x, cu_seqlens=cu)
        g = torch.autograd.grad((y * w).sum(), [x, *m.parameters()])
        cp = ContextParallel(SequenceShards(sum(lens), 1, cu_seqlens=cu.cpu()), device="cuda")
        y2 = m(x, context=cp)
        g2 = torch.autograd.grad((y2 * w).sum(), [x, *m.parameters()])
        assert_close("y", y, y2, RATIO)
        for n, a, b in zip(["x"] + [n for n, _ in m.named_parameters()], g, g2):
            assert_close(f"d{n}", a, b, RATIO)
    finally:
        dist.destroy_process_group()
