"""Triton sliding-window attention on the GPU at real sizes, against a float32 reference.

The reference is the specification's dense masked attention restricted to a band: for queries
``[a, b)`` only keys ``[a - window + 1, b)`` can be visible, so each chunk of queries is checked
against that slice of keys (O(chunk * (chunk + window)) memory). Summing the chunks' key/value
gradients gives the full dK/dV.

Tolerances: bf16 2e-2. The kernel rounds P and dS to bf16 before the second product of each pair
and rounds its outputs to bf16 (unit roundoff 2^-8 = 3.9e-3 per rounding, independent across
terms); on the CPU at small sizes the errors are 4e-3..7e-3. They do not grow with T or the
window: every output is a normalized (softmax-weighted) sum, and dK/dV sum G * window terms
with independent rounding errors, so the relative error stays at a few u. fp32 1e-5: IEEE fp32
products (no TF32), only the summation order differs from the reference.

Timing (not a test), from the repository root on the GPU machine:
    PYTHONPATH=src:. python3 tests/gpu/test_window_gpu.py [--T 8192 65536]
    PYTHONPATH=src:. python3 tests/gpu/test_window_gpu.py --sweep [fwd dq dkv] --T 65536   # launch configs
"""

import pytest
import torch

from nsa.ops import reference, sliding_window_attention
from tests.gpu.sampled_rows import (
    assert_row_grads_close, assert_rows_close, rows_only, rows_reference, sample_positions, window_mask)
from tests.helpers import assert_close, needs_cuda, rel_err

pytestmark = [pytest.mark.gpu, needs_cuda]

RATIO_BF16 = 2e-2
RATIO_FP32 = 1e-5


def inputs(B, T, HQ, H, Dk, Dv, dtype, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)

    def mk(*shape):
        return torch.randn(*shape, generator=gen, device="cuda", dtype=torch.float32).to(dtype)

    return mk(B, T, HQ, Dk), mk(B, T, H, Dk), mk(B, T, H, Dv), mk(B, T, HQ, Dv)


def band_reference(q, k, v, do, window, scale, a, b, grads=True):
    """Float32 reference for query rows ``[a, b)`` (every batch row), keys ``[lo, b)`` with
    ``lo = max(0, a - window + 1)``. Returns o rows, dq rows and this chunk's contribution to
    ``dk[:, lo:b]``, ``dv[:, lo:b]`` (None without grads), and lo."""
    lo = max(0, a - window + 1)
    qc = q[:, a:b].float().requires_grad_(grads)
    kc = k[:, lo:b].float().requires_grad_(grads)
    vc = v[:, lo:b].float().requires_grad_(grads)
    d = torch.arange(a, b, device=q.device).view(-1, 1) - torch.arange(lo, b, device=q.device).view(1, -1)
    mask = (d >= 0) & (d < window)  # [b - a, b - lo]
    o, _ = reference._masked_attention(qc, kc, vc, mask, scale)
    if not grads:
        return o.detach(), None, None, None, lo
    dq, dk, dv = torch.autograd.grad(o, (qc, kc, vc), do[:, a:b].float())
    return o.detach(), dq, dk, dv, lo


def run_triton(q, k, v, do, window, cu_seqlens=None, backward=True):
    leaves = [x.detach().requires_grad_(backward) for x in (q, k, v)]
    o = sliding_window_attention(*leaves, window, cu_seqlens=cu_seqlens, backend="triton")
    if not backward:
        return o.detach(), None
    return o.detach(), torch.autograd.grad(o, leaves, do)


def full_band_reference(q, k, v, do, window, scale, chunk=256):
    """o, dq, dk, dv of the whole (dense) batch, chunk by chunk of queries."""
    B, T = q.shape[:2]
    o_r, dq_r = torch.empty_like(do, dtype=torch.float32), torch.empty_like(q, dtype=torch.float32)
    dk_r, dv_r = torch.zeros_like(k, dtype=torch.float32), torch.zeros_like(v, dtype=torch.float32)
    for a in range(0, T, chunk):
        b = min(T, a + chunk)
        o_c, dq_c, dk_c, dv_c, lo = band_reference(q, k, v, do, window, scale, a, b)
        o_r[:, a:b], dq_r[:, a:b] = o_c, dq_c
        dk_r[:, lo:b] += dk_c
        dv_r[:, lo:b] += dv_c
    return o_r, dq_r, dk_r, dv_r


def test_paper_shape_grads_4k():
    """B=1, HQ=64, H=4 (G=16), D=128, window 512, bf16, T=4096: o, dq, dk, dv in full."""
    B, T, HQ, H, D, W = 1, 4096, 64, 4, 128, 512
    q, k, v, do = inputs(B, T, HQ, H, D, D, torch.bfloat16)
    o, (dq, dk, dv) = run_triton(q, k, v, do, W)
    refs = full_band_reference(q, k, v, do, W, D ** -0.5)
    for name, r, x in zip(("o", "dq", "dk", "dv"), refs, (o, dq, dk, dv)):
        assert_close(name, r, x, RATIO_BF16)


@pytest.mark.parametrize("T", [4096, 16384], ids=["T4k", "T16k"])
def test_paper_shape_forward(T):
    """Forward on four 256-query chunks (start, inside, unaligned, end)."""
    B, HQ, H, D, W, C = 1, 64, 4, 128, 512, 256
    q, k, v, do = inputs(B, T, HQ, H, D, D, torch.bfloat16, seed=1)
    o, _ = run_triton(q, k, v, do, W, backward=False)
    for a in (0, T // 3 // C * C, T // 2 + 13, T - C):
        o_r, *_ = band_reference(q, k, v, do, W, D ** -0.5, a, a + C, grads=False)
        assert_close(f"o[{a}:{a + C}]", o_r, o[:, a:a + C], RATIO_BF16)


# id: (HQ, H, Dk, Dv, window): every group size and head dim the kernels must compile for.
GPU_SHAPES = {
    "G1-d64-w300": (4, 4, 64, 64, 300),
    "G2-dk192-dv128-w512": (8, 4, 192, 128, 512),
    "G3-d128-w100": (6, 2, 128, 128, 100),
    "G4-dk128-dv64-w64": (8, 2, 128, 64, 64),
    "G8-d256-w257": (16, 2, 256, 256, 257),
    "G16-d128-w1": (32, 2, 128, 128, 1),
    "G32-d128-w2000": (32, 1, 128, 128, 2000),
}


@pytest.mark.parametrize("shape", list(GPU_SHAPES.values()), ids=list(GPU_SHAPES))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_group_sizes_and_head_dims(shape, dtype):
    """B=2, T=1000 (not a multiple of any tile), full reference (fits at this size)."""
    HQ, H, Dk, Dv, W = shape
    q, k, v, do = inputs(2, 1000, HQ, H, Dk, Dv, dtype, seed=2)
    o, g = run_triton(q, k, v, do, W)
    leaves = [x.detach().float().requires_grad_(True) for x in (q, k, v)]
    o_r = reference.sliding_window_attention(*leaves, W, Dk ** -0.5)
    g_r = torch.autograd.grad(o_r, leaves, do.float())
    ratio = RATIO_BF16 if dtype == torch.bfloat16 else RATIO_FP32
    assert_close("o", o_r, o, ratio)
    for name, r, x in zip(("dq", "dk", "dv"), g_r, g):
        if W == 1 and name != "dv":  # exactly 0 in exact arithmetic: both sides are rounding noise
            assert x.float().abs().max().item() <= 1e-3, name
        else:
            assert_close(name, r, x, ratio)


def test_varlen_gpu():
    lens = [1, 700, 4096, 511, 3001]
    cu = torch.tensor([0] + lens, device="cuda").cumsum(0).to(torch.int32)
    q, k, v, do = inputs(1, sum(lens), 32, 2, 128, 128, torch.bfloat16, seed=3)
    o, g = run_triton(q, k, v, do, 512, cu)
    leaves = [x.detach().float().requires_grad_(True) for x in (q, k, v)]
    o_r = reference.sliding_window_attention(*leaves, 512, 128 ** -0.5, cu)
    g_r = torch.autograd.grad(o_r, leaves, do.float())
    assert_close("o", o_r, o, RATIO_BF16)
    for name, r, x in zip(("dq", "dk", "dv"), g_r, g):
        assert_close(name, r, x, RATIO_BF16)


def test_no_host_synchronization():
    """The kernels' entry point (inputs already validated) never waits for the device, for dense
    and packed input, forward and backward."""
    from nsa.ops.window import sliding_window_attention_triton

    lens = [100, 3000, 1]
    cu = torch.tensor([0] + lens, device="cuda").cumsum(0).to(torch.int32)
    q, k, v, do = inputs(1, sum(lens), 8, 2, 64, 64, torch.bfloat16, seed=10)
    leaves = [x.requires_grad_(True) for x in (q, k, v)]
    for cu_seqlens in (None, cu):
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            o = sliding_window_attention_triton(*leaves, 300, 0.125, cu_seqlens)
            torch.autograd.grad(o, leaves, do)
        finally:
            torch.cuda.set_sync_debug_mode("default")


def test_backward_deterministic_gpu():
    q, k, v, do = inputs(1, 4096, 64, 4, 128, 128, torch.bfloat16, seed=4)
    _, g1 = run_triton(q, k, v, do, 512)
    _, g2 = run_triton(q, k, v, do, 512)
    for name, a, b in zip(("dq", "dk", "dv"), g1, g2):
        assert torch.equal(a, b), name


def _check_last_chunk(q, k, v, do, o, grads, W, C, name):
    """Queries [T-C, T) of the last batch row: o and dq; keys [T-C, T) get gradients only from
    those queries, so their dk, dv are complete in the chunk reference too."""
    T, D = q.shape[1], q.shape[3]
    last = [x[-1:] for x in (q, k, v, do)]
    o_r, dq_r, dk_r, dv_r, lo = band_reference(*last, W, D ** -0.5, T - C, T)
    assert_close(f"{name} o", o_r, o[-1:, T - C:], RATIO_BF16)
    dq, dk, dv = grads
    assert_close(f"{name} dq", dq_r, dq[-1:, T - C:], RATIO_BF16)
    assert_close(f"{name} dk", dk_r[:, T - C - lo:], dk[-1:, T - C:], RATIO_BF16)
    assert_close(f"{name} dv", dv_r[:, T - C - lo:], dv[-1:, T - C:], RATIO_BF16)


@pytest.mark.bigmem
def test_long_sequence_128k():
    """T = 128k at B = 1: forward and backward finite; the last 256 queries/keys match; o and dq
    on 256 query rows spread over the sequence (every head) against the float32 reference on
    those rows (tests/gpu/sampled_rows.py), and dk, dv in full from a second backward whose
    upstream gradient is zero off the sampled rows."""
    B, T, HQ, H, D, W, C = 1, 131072, 64, 4, 128, 512, 256
    q, k, v, do = inputs(B, T, HQ, H, D, D, torch.bfloat16, seed=5)
    o, grads = run_triton(q, k, v, do, W)
    for name, x in zip(("o", "dq", "dk", "dv"), (o, *grads)):
        assert torch.isfinite(x).all(), name
    _check_last_chunk(q, k, v, do, o, grads, W, C, "T128k")
    rows = sample_positions(T, 256)
    ref = rows_reference(q, k, v, rows, window_mask(W, T), D ** -0.5, do)
    assert_rows_close("T128k", ref, o, rows, RATIO_BF16)
    assert_close("T128k dq on the sampled rows", ref["dq"], grads[0][:, rows].float(), RATIO_BF16)
    del o, grads
    _, grads = run_triton(q, k, v, rows_only(do, rows), W)
    assert_row_grads_close("T128k", ref, grads, rows, RATIO_BF16)


@pytest.mark.bigmem
def test_more_than_2_pow_31_elements():
    """B*T*HQ*D = 3 * 131072 * 64 * 128 = 1.5 * 2^32 > 2^31: element offsets past 2^31 must not
    wrap. The last sequence's last 256 queries (o, dq) and keys (dk, dv) match the reference."""
    B, T, HQ, H, D, W, C = 3, 131072, 64, 4, 128, 512, 256
    assert B * T * HQ * D > 2 ** 31
    q, k, v, do = inputs(B, T, HQ, H, D, D, torch.bfloat16, seed=6)
    o, grads = run_triton(q, k, v, do, W)
    for name, x in zip(("o", "dq", "dk", "dv"), (o, *grads)):
        assert torch.isfinite(x).all(), name
    _check_last_chunk(q, k, v, do, o, grads, W, C, "B3xT128k")


@pytest.mark.bigmem
def test_more_than_2_pow_31_elements_varlen():
    """The same size packed as 3 sequences of unequal length (B = 1, cu_seqlens)."""
    lens = [131072 + 4099, 131072 - 4099, 131072]
    T, HQ, H, D, W, C = sum(lens), 64, 4, 128, 512, 256
    cu = torch.tensor([0] + lens, device="cuda").cumsum(0).to(torch.int32)
    q, k, v, do = inputs(1, T, HQ, H, D, D, torch.bfloat16, seed=7)
    o, grads = run_triton(q, k, v, do, W, cu)
    # the last sequence starts at lens[0] + lens[1] > its window: its last chunk sees only itself
    _check_last_chunk(q, k, v, do, o, grads, W, C, "varlen")


def _bench(Ts, B=1, HQ=64, H=4, D=128, W=512):
    """Median times (ms) of forward and backward through the public op at the paper shape."""
    import triton

    print(f"# {torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__}")
    print(f"# B={B} HQ={HQ} H={H} D={D} window={W} bf16; TFLOP/s count visible (query, key) pairs only")
    for T in Ts:
        q, k, v, do = inputs(B, T, HQ, H, D, D, torch.bfloat16, seed=8)
        leaves = [x.requires_grad_(True) for x in (q, k, v)]
        fwd = lambda: sliding_window_attention(*leaves, W, backend="triton")  # noqa: E731
        o = fwd()
        torch.autograd.grad(o, leaves, do, retain_graph=True)  # compile outside the timed region
        t_f = triton.testing.do_bench(fwd)
        t_b = triton.testing.do_bench(lambda: torch.autograd.grad(o, leaves, do, retain_graph=True))
        pairs = B * HQ * sum(min(t + 1, W) for t in range(T))
        print(f"T={T:6d}  fwd {t_f:7.3f} ms ({4 * pairs * D / t_f * 1e-9:4.0f} TFLOP/s)   "
              f"bwd {t_b:7.3f} ms ({10 * pairs * D / t_b * 1e-9:4.0f} TFLOP/s)", flush=True)


def _sweep(T, families=("fwd", "dq", "dkv"), B=1, HQ=64, H=4, D=128, W=512):
    """Times the forward, dQ and dK/dV launch configs one family at a time (the others at their
    defaults) through the launchers; each config's output is checked against the default's."""
    import itertools

    import triton

    from nsa.ops import window

    q, k, v, do = inputs(B, T, HQ, H, D, D, torch.bfloat16, seed=9)
    scale = D ** -0.5
    o0, lse0 = window._launch_fwd(q, k, v, W, scale, None)
    g0 = window._launch_bwd(q, k, v, o0, lse0, do, W, scale, None)
    q_default, kv_default = window._q_config, window._kv_config
    G = HQ // H
    print(f"# sweep T={T} B={B} HQ={HQ} H={H} D={D} window={W} bf16; defaults "
          f"{q_default(G, D, D, torch.bfloat16)} {kv_default(G, D, D, torch.bfloat16)}")
    q_cfgs = [dict(BT=r // G, BM=r, BN=bn, num_warps=w, num_stages=s)
              for r, bn, w, s in itertools.product((64, 128), (64, 128), (4, 8), (2, 3))]
    kv_cfgs = [dict(BN=bn, BM=r, num_warps=w, num_stages=s)
               for bn, r, w, s in itertools.product((64, 128), (32, 64, 128), (4, 8), (2, 3))]
    for family, cfgs in (("fwd", q_cfgs), ("dq", q_cfgs), ("dkv", kv_cfgs)):
        if family not in families:
            continue
        for cfg in cfgs:
            window._q_config = (lambda *a, c=cfg: dict(c)) if family in ("fwd", "dq") else q_default
            window._kv_config = (lambda *a, c=cfg: dict(c)) if family == "dkv" else kv_default
            try:
                if family == "fwd":
                    run = lambda: window._launch_fwd(q, k, v, W, scale, None)  # noqa: E731
                    err = rel_err(o0, run()[0])
                else:
                    run = lambda: window._launch_bwd(q, k, v, o0, lse0, do, W, scale, None)  # noqa: E731
                    err = max(rel_err(a, b) for a, b in zip(g0, run()))
                ms = triton.testing.do_bench(run)
                print(f"{family:3s} {cfg}: {ms:7.3f} ms  (diff vs default {err:.1e})", flush=True)
            except Exception as e:  # out of shared memory or registers: not a candidate
                print(f"{family:3s} {cfg}: failed ({type(e).__name__})", flush=True)
            finally:
                window._q_config, window._kv_config = q_default, kv_default


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--T", type=int, nargs="*", default=[8192, 16384, 65536])
    parser.add_argument("--sweep", nargs="*", choices=["fwd", "dq", "dkv"],
                        help="time the launch configs of these kernels (default all) at the first T")
    args = parser.parse_args()
    if args.sweep is not None:
        _sweep(args.T[0], args.sweep or ("fwd", "dq", "dkv"))
    else:
        _bench(args.T)
