"""The NSA layer on the GPU: Triton kernels == reference through the whole layer (forward and every
parameter gradient), prefill + decoding == full forward, and bf16 autocast at a longer T."""

import pytest
import torch

import nsa.ops.api
from nsa.layer import NativeSparseAttention, NSAConfig
from tests.helpers import assert_close, needs_cuda

pytestmark = [pytest.mark.gpu, needs_cuda]

# float32 end to end: projections are plain fp32 matmuls (torch leaves TF32 off for matmuls by
# default) and the kernels use IEEE fp32 dots, so the two backends differ by fp32 summation
# order only (~1e-6 per op); 1e-4 leaves room for the longer chains of the parameter gradients.
RATIO_FP32 = 1e-4
# bf16 autocast vs float32 (measured ~6e-3 on CPU at tiny sizes; a flipped near-tie selection
# moves a few rows more).
RATIO_BF16 = 2e-2

# The exact comparisons select every causal block (block 128, 20 slots >= ceil(2500 / 128)): top-n
# then has a unique answer, so fp32 summation-order differences between the Triton scoring and
# the reference cannot flip a near-tie and move a whole block. Top-n itself is tested with the
# tie-aware checker (tests/gpu/test_selection_gpu.py, tests/ops/test_selection_triton.py).
EXACT = dict(block_size=128, num_selected=20)


def _layer(cfg, seed=0):
    torch.manual_seed(seed)
    m = NativeSparseAttention(cfg).cuda()
    with torch.no_grad():
        for pe in (m.compress_k.pos_emb, m.compress_v.pos_emb):
            pe.normal_(std=0.5)
    return m


@pytest.mark.parametrize("fused", [True, False], ids=["fused_gates", "composed"])
@pytest.mark.parametrize("shared_kv", [False, True], ids=["indep_kv", "shared_kv"])
def test_layer_triton_matches_reference(shared_kv, fused, monkeypatch):
    """Both Triton paths of nsa(): gates inside the branch kernels (nsa.ops.fused) and composed."""
    monkeypatch.setattr(nsa.ops.api, "FUSED_GATES", fused)
    cfg = NSAConfig.preset("small", backend="reference", shared_kv=shared_kv, **EXACT)
    m = _layer(cfg)
    lens = [700, 2500]  # packed; neither a multiple of the block or stride
    cu = torch.tensor([0] + lens, device="cuda").cumsum(0).to(torch.int32)
    x = torch.randn(1, sum(lens), cfg.hidden_size, device="cuda", requires_grad=True)
    w = torch.randn(1, sum(lens), cfg.hidden_size, device="cuda")
    params = [x] + list(m.parameters())
    y_ref = m(x, cu_seqlens=cu)
    g_ref = torch.autograd.grad((y_ref * w).sum(), params)
    m.config = cfg.replace(backend="triton")
    y = m(x, cu_seqlens=cu)
    g = torch.autograd.grad((y * w).sum(), params)
    assert_close("y", y_ref, y, RATIO_FP32)
    names = ["x"] + [n for n, _ in m.named_parameters()]
    for n, a, b in zip(names, g_ref, g):
        assert_close(f"grad {n}", a, b, RATIO_FP32)


def test_prefill_then_decode_equals_full_forward():
    cfg = NSAConfig.preset("small", **EXACT)  # backend from NSA_BACKEND / auto: kernels for the prefill
    m = _layer(cfg)
    B, T, steps = 2, 2100, 70
    x = torch.randn(B, T, cfg.hidden_size, device="cuda")
    with torch.no_grad():
        full = m(x)
        cache = m.new_cache()
        y0 = m(x[:, :T - steps], cache=cache)
        y1 = torch.cat([m(x[:, t:t + 1], cache=cache) for t in range(T - steps, T)], 1)
    assert_close("prefill", full[:, :T - steps], y0, RATIO_FP32)
    assert_close("decoded", full[:, T - steps:], y1, RATIO_FP32)


def test_autocast_bf16_long():
    cfg = NSAConfig.preset("small")
    m = _layer(cfg)
    T = 16384
    x = torch.randn(1, T, cfg.hidden_size, device="cuda")
    with torch.no_grad():
        y32 = m(x)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y16 = m(x)
        y16.float().square().mean().backward()
    assert y16.dtype == torch.bfloat16
    assert_close("autocast bf16 vs float32", y32, y16.float(), RATIO_BF16)
    for n, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
