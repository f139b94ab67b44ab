"""Triton gate combination on the GPU at the paper size, against the float32 PyTorch expression.

``o = g_cmp[..., None] * o_cmp + g_slc[..., None] * o_slc + g_win[..., None] * o_win`` at B=1,
T=65536, HQ=64, Dv=128 in bf16 (1 GiB per branch output). The reference is the expression on the
inputs upcast to float32, differentiated by autograd; the op is elementwise over rows, so it is
evaluated chunk by chunk of positions (exactly the same values, bounded memory) and each chunk of
the output and of every gradient is compared.

Tolerances. The kernel computes in fp32 and rounds each result once to its dtype
(round-to-nearest on the GPU), so each element's relative error is at most the unit roundoff:
bf16 2^-8 = 3.9e-3 (plus 1e-5 for the fp32 arithmetic); fp32 results (gate gradients of fp32
gates) 1e-5: a Dv-term fp32 dot summed in another order than the reference's.

Timing (not a test), from the repository root on the GPU machine:
    PYTHONPATH=src:. python3 tests/gpu/test_gate_gpu.py [--T 8192 65536]
    PYTHONPATH=src:. python3 tests/gpu/test_gate_gpu.py --sweep --T 65536     # launch configs
"""

import pytest
import torch

from nsa.ops.gate import gate_combine_triton
from tests.helpers import assert_close, needs_cuda, rel_err

pytestmark = [pytest.mark.gpu, needs_cuda]

RATIO = {torch.bfloat16: 2.0 ** -8 + 1e-5, torch.float32: 1e-5}
NAMES = ("o_cmp", "o_slc", "o_win", "g_cmp", "g_slc", "g_win")


def inputs(B, T, HQ, Dv, dtype, gate_dtype, seed=0):
    """Three branch outputs ~ N(0, 1), three gates ~ U(0, 1), dO ~ N(0, 1)."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    outs = [torch.randn(B, T, HQ, Dv, generator=gen, device="cuda", dtype=torch.float32).to(dtype)
            for _ in range(3)]
    gates = [torch.rand(B, T, HQ, generator=gen, device="cuda", dtype=torch.float32).to(gate_dtype)
             for _ in range(3)]
    do = torch.randn(B, T, HQ, Dv, generator=gen, device="cuda", dtype=torch.float32).to(dtype)
    return outs + gates, do


def run_triton(xs, do, requires=(True,) * 6):
    leaves = [x.detach().requires_grad_(r) for x, r in zip(xs, requires)]
    o = gate_combine_triton(*leaves, do.dtype)
    want = [x for x in leaves if x.requires_grad]
    got = iter(torch.autograd.grad(o, want, do))
    return o.detach(), [next(got) if x.requires_grad else None for x in leaves]


def check_chunks(name, xs, do, o, grads, t_lo=0, chunk=8192):
    """Compares o and the given gradients with the float32 expression, positions [t_lo, T) chunk-wise."""
    T = o.shape[1]
    for a in range(t_lo, T, chunk):
        b = min(T, a + chunk)
        leaves = [x[:, a:b].float().requires_grad_() for x in xs]
        g_cmp, g_slc, g_win = (g.unsqueeze(-1) for g in leaves[3:])
        ref = g_cmp * leaves[0] + g_slc * leaves[1] + g_win * leaves[2]
        rgrads = torch.autograd.grad(ref, leaves, do[:, a:b].float())
        assert_close(f"{name} o [{a}:{b}]", ref, o[:, a:b], RATIO[o.dtype])
        for gname, x, r, g in zip(NAMES, xs, rgrads, grads):
            if g is not None:
                assert g.dtype == x.dtype and g.shape == x.shape
                assert_close(f"{name} d{gname} [{a}:{b}]", r, g[:, a:b], RATIO[g.dtype])


@pytest.mark.parametrize("gate_dtype", [torch.bfloat16, torch.float32], ids=["gates-bf16", "gates-fp32"])
def test_paper_shape_64k(gate_dtype):
    xs, do = inputs(1, 65536, 64, 128, torch.bfloat16, gate_dtype)
    o, grads = run_triton(xs, do)
    check_chunks("T64k", xs, do, o, grads)
    o2, grads2 = run_triton(xs, do)  # bitwise reproducible
    assert torch.equal(o, o2)
    for gname, a, b in zip(NAMES, grads, grads2):
        assert torch.equal(a, b), f"d{gname} differs between two identical backward passes"


@pytest.mark.bigmem
def test_more_than_2_pow_31_elements():
    """B*T*HQ*Dv = 2 * 131584 * 64 * 128 > 2^31 (4.3 GiB per bf16 tensor): element offsets past
    2^31 must not wrap. The last sequence's last 2048 positions match (o, d o_win, d g_slc)."""
    B, T, HQ, Dv = 2, 131072 + 512, 64, 128
    assert B * T * HQ * Dv > 2 ** 31
    xs, do = inputs(B, T, HQ, Dv, torch.bfloat16, torch.float32, seed=1)
    requires = (False, False, True, False, True, False)
    o, grads = run_triton(xs, do, requires)
    assert torch.isfinite(o).all() and all(torch.isfinite(g).all() for g in grads if g is not None)
    last = lambda t: t[-1:]  # noqa: E731
    check_chunks("B2xT128k", [last(x) for x in xs], last(do), last(o),
                 [None if g is None else last(g) for g in grads], t_lo=T - 2048)


def _bench(Ts, B=1, HQ=64, Dv=128):
    """Median times (ms) and bandwidth of the fused op vs the PyTorch expression, bf16 throughout."""
    import triton

    print(f"# {torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__}")
    print(f"# B={B} HQ={HQ} Dv={Dv} bf16 outputs and gates; GB/s = bytes the fused op must move / time")
    for T in Ts:
        xs, do = inputs(B, T, HQ, Dv, torch.bfloat16, torch.bfloat16, seed=2)
        leaves = [x.requires_grad_(True) for x in xs]
        big = B * T * HQ * Dv * 2
        small = B * T * HQ * 2
        bytes_f, bytes_b = 4 * big + 3 * small, 7 * big + 6 * small

        def expr(*a):
            return (a[3].unsqueeze(-1) * a[0] + a[4].unsqueeze(-1) * a[1] + a[5].unsqueeze(-1) * a[2]).to(do.dtype)

        for label, fn in (("triton", lambda: gate_combine_triton(*leaves, do.dtype)), ("torch", lambda: expr(*leaves))):
            o = fn()
            torch.autograd.grad(o, leaves, do, retain_graph=True)  # compile outside the timed region
            t_f = triton.testing.do_bench(fn)
            t_b = triton.testing.do_bench(lambda: torch.autograd.grad(o, leaves, do, retain_graph=True))
            print(f"T={T:6d} {label:6s}  fwd {t_f:7.3f} ms ({bytes_f / t_f * 1e-6:5.0f} GB/s)   "
                  f"bwd {t_b:7.3f} ms ({bytes_b / t_b * 1e-6:5.0f} GB/s)", flush=True)
            del o


def _sweep(T, B=1, HQ=64, Dv=128):
    """Times launch configs of the forward and backward launchers; outputs checked against the default's."""
    import itertools

    import triton

    from nsa.ops import gate

    xs, do = inputs(B, T, HQ, Dv, torch.bfloat16, torch.bfloat16, seed=3)
    needs = [True] * 6
    o0 = gate.gate_combine_fwd(*xs, do.dtype)
    g0 = gate.gate_combine_bwd(do, *xs, needs)
    print(f"# sweep T={T} B={B} HQ={HQ} Dv={Dv} bf16; default {gate._config(triton.next_power_of_2(Dv), False)}")
    for rows, warps in itertools.product((4, 8, 16, 32, 64, 128), (1, 2, 4, 8, 16)):
        cfg = dict(rows=rows, num_warps=warps)
        try:
            t_f = triton.testing.do_bench(lambda: gate.gate_combine_fwd(*xs, do.dtype, config=cfg))
            t_b = triton.testing.do_bench(lambda: gate.gate_combine_bwd(do, *xs, needs, config=cfg))
            err = max(rel_err(o0, gate.gate_combine_fwd(*xs, do.dtype, config=cfg)),
                      *(rel_err(a, b) for a, b in zip(g0, gate.gate_combine_bwd(do, *xs, needs, config=cfg))))
            print(f"{cfg}: fwd {t_f:7.3f} ms  bwd {t_b:7.3f} ms  (diff vs default {err:.1e})", flush=True)
        except Exception as e:  # out of registers or shared memory: not a candidate
            print(f"{cfg}: failed ({type(e).__name__})", flush=True)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--T", type=int, nargs="*", default=[8192, 65536])
    parser.add_argument("--sweep", action="store_true", help="time launch configs at the first T")
    args = parser.parse_args()
    if args.sweep:
        _sweep(args.T[0])
    else:
        _bench(args.T)
