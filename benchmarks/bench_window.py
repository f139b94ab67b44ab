"""Time the Triton sliding-window attention (nsa.ops.window) on one GPU; sweep its tile configs.

Paper shapes: B=1, HQ=64, H=4, window 512, bf16, D = 128 (or --dims 192x128). The kernels are
first checked against the float32 reference at T=2048 (forward and every gradient). Times are
medians of ``triton.testing.do_bench`` with inputs built outside the timed region: the forward
launcher, and the backward launcher alone (dQ with delta, then dK/dV). TFLOP/s count the
(query head, key) pairs inside the window only: 2*(Dk+Dv) FLOPs each in the forward; in the
backward the kernels do 2*(4*Dk + 3*Dv) per pair without atomics (dQ recomputes S and dP,
dK/dV recomputes S and dP): reported against that actual count and against the usual 2.5x.

Usage (repository root, on the GPU machine):
    PYTHONPATH=src python3 benchmarks/bench_window.py                        # T = 8k..128k
    PYTHONPATH=src python3 benchmarks/bench_window.py --sweep --T 65536      # config sweep
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for tests.helpers

from nsa.ops import sliding_window_attention  # noqa: E402
from nsa.ops import window as W  # noqa: E402
from sweep_util import against_reference, bench, header, parse_args, qkv, sweep  # noqa: E402
from tests.helpers import assert_close  # noqa: E402

HQ, H, WIN = 64, 4, 512

# Candidates (D=128), default first. Forward / dQ: rows, BN, warps, stages, one_loop, tma
FWD_SWEEP = [dict(rows=r, BN=bn, num_warps=w, num_stages=s, one_loop=o, tma=t)
             for r, bn, w, s, o, t in [(128, 64, 4, 2, False, False), (128, 32, 4, 3, True, True),
                                       (128, 32, 4, 2, True, True), (128, 32, 4, 4, True, True),
                                       (128, 32, 4, 3, False, True), (128, 32, 4, 3, True, False),
                                       (128, 16, 4, 3, True, True), (64, 64, 4, 2, False, False),
                                       (64, 32, 4, 3, True, True), (256, 32, 8, 3, True, True),
                                       (128, 64, 8, 3, True, True), (128, 64, 4, 2, False, True)]]
# run13 (2026-11-29, before the fused-multiply-add exponent): (128, 64, 4, 2, F, F) 3.68 ms, one loop 4.46,
# (128, 32, 4, 3, T, T) 3.33, (256, 32, 8, 3, T, T) 3.60, (128, 64, 8, 3, T, T) 3.77, 256-row / 64-key tiles 3.9-4.9
DQ_SWEEP = [dict(rows=r, BN=bn, num_warps=w, num_stages=s, one_loop=o, tma=t)
            for r, bn, w, s, o, t in [(128, 64, 8, 2, False, False), (128, 64, 8, 3, True, True),
                                      (128, 64, 8, 3, False, True), (128, 32, 8, 3, False, True),
                                      (128, 64, 8, 4, True, True)]]
# run13: whole backward 10.64 ms default, (128, 64, 8, 3, T, T) 10.34; 4 warps 16.8, 256 rows 13.0
# dK/dV: keys per program, rows per step, warps, stages, rotate (see window_bwd_dkv_kernel)
DKV_SWEEP = [dict(BN=bn, rows=r, num_warps=w, num_stages=s, rotate=rot)
             for bn, r, w, s, rot in [(128, 64, 8, 3, False), (128, 64, 8, 3, True), (128, 64, 8, 2, True),
                                      (128, 32, 8, 3, True), (64, 64, 4, 3, True)]]
# run13: whole backward 10.82 ms default; 2 stages 11.4, 32 rows 11.0, 128 rows 22.7, 64 keys 12.4-15.9


def inputs(T, Dk, Dv, seed=0, requires_grad=False):
    return qkv(T, T, HQ, H, Dk, Dv, seed, requires_grad)


def check_small(Dk, Dv):
    out = against_reference(lambda q, k, v, backend: sliding_window_attention(q, k, v, WIN, backend=backend),
                            *inputs(2048, Dk, Dv, requires_grad=True))
    ((o,), g), ((ro,), rg) = out["triton"], out["reference"]
    assert_close("o", ro, o.float(), 1e-2)
    for name, r, x in zip(("dq", "dk", "dv"), rg, g):
        assert_close(name, r, x.float(), 2e-2)


def window_pairs(T):
    """(query head, key) pairs inside the causal window."""
    n = min(T, WIN)
    return (n * (n + 1) / 2 + (T - n) * WIN) * HQ


def run_case(T, Dk, Dv, fwd_cfg=None, dq_cfg=None, dkv_cfg=None):
    q, k, v = inputs(T, Dk, Dv)
    scale = Dk ** -0.5
    o, lse = W._launch_fwd(q, k, v, WIN, scale, None, config=fwd_cfg)
    do = torch.randn(o.shape, device="cuda", generator=torch.Generator(device="cuda").manual_seed(1)).to(o.dtype)
    t_f = bench(lambda: W._launch_fwd(q, k, v, WIN, scale, None, config=fwd_cfg))
    t_b = bench(lambda: W._launch_bwd(q, k, v, o, lse, do, WIN, scale, None, dq_config=dq_cfg,
                                      dkv_config=dkv_cfg))
    grads = W._launch_bwd(q, k, v, o, lse, do, WIN, scale, None, dq_config=dq_cfg, dkv_config=dkv_cfg)
    return t_f, t_b, o, grads


def main():
    args, Dk, Dv = parse_args(__doc__)
    print(header())
    print(f"# B=1 HQ={HQ} H={H} Dk={Dk} Dv={Dv} bf16 window={WIN}")
    check_small(Dk, Dv)
    print("# check at T=2048 (o, dq, dk, dv vs float32 reference): ok")
    for T in args.T:
        pairs = window_pairs(T)
        flop_f = pairs * 2 * (Dk + Dv)
        flop_b = pairs * 2 * (4 * Dk + 3 * Dv)  # dQ: S, dP, dQ; dK/dV: S, dP, dV, dK
        t_f, t_b, o, grads = run_case(T, Dk, Dv)
        print(f"T={T:7d}  fwd {t_f:8.3f} ms {flop_f / t_f * 1e-9:6.1f} TFLOP/s   bwd {t_b:8.3f} ms "
              f"{flop_b / t_b * 1e-9:6.1f} TFLOP/s done ({2.5 * flop_f / t_b * 1e-9:6.1f} at 2.5x fwd)", flush=True)
        if args.sweep:
            sweep((("fwd", FWD_SWEEP), ("dq", DQ_SWEEP), ("dkv", DKV_SWEEP)), args.kinds.split(","),
                  lambda **cfg: run_case(T, Dk, Dv, **cfg), (o, grads))


if __name__ == "__main__":
    main()
