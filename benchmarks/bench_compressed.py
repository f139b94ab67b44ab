"""Time the Triton compressed attention (nsa.ops.compressed) on one GPU; sweep its tile configs.

Paper shapes: B=1, HQ=64, H=4, kernel_size/stride 32/16, bf16, D = 128 (or --dims 192x128).
The kernels are first checked against the float32 reference at T=2048 (forward and every
gradient). Times are medians of ``triton.testing.do_bench`` with inputs built outside the timed
region: the forward launcher, and the backward launcher alone (delta preprocess, dQ, dK/dV,
partial sums). TFLOP/s count visible (query head, compressed token) pairs only, 2*(Dk+Dv)
FLOPs each in the forward and 2.5 times that in the backward (the usual convention; the
kernels actually do 2*(4*Dk + 3*Dv) per pair in the backward, recomputing p).

Usage (repository root, on the GPU machine):
    PYTHONPATH=src python3 benchmarks/bench_compressed.py                        # T = 8k..128k
    PYTHONPATH=src python3 benchmarks/bench_compressed.py --sweep --T 65536      # config sweep
    PYTHONPATH=src python3 benchmarks/bench_compressed.py --dims 192x128
    PYTHONPATH=src python3 benchmarks/bench_compressed.py --sweep --T 65536 --dims 192x128  # *_SWEEP_WIDE
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for tests.helpers

from nsa.ops import compressed_attention  # noqa: E402
from nsa.ops import compressed as C  # noqa: E402
from nsa.ops.utils import num_compressed  # noqa: E402
from sweep_util import against_reference, bench, header, parse_args, qkv, sweep  # noqa: E402
from tests.helpers import assert_close  # noqa: E402

HQ, H = 64, 4
KS, ST = 32, 16

# Candidates (D=128) that compile for sm_90a without register spills (ptxas -v), default first.
FWD_SWEEP = [dict(rows=r, BC=bc, num_warps=w, num_stages=s, tma=t)
             for r, bc, w, s, t in [(256, 64, 8, 3, True), (256, 64, 16, 2, True), (256, 64, 8, 4, True),
                                    (256, 128, 8, 2, True), (128, 64, 8, 3, True), (128, 128, 8, 3, True),
                                    (256, 64, 16, 2, False), (256, 32, 16, 2, False), (128, 64, 8, 3, False)]]
# TMA (tma=True): K/V tiles through tensor descriptors; run6 (2026-11-29) measured (256, 64, 8, 3) with TMA
# at 9.22 ms against 10.52 for (256, 64, 16, 2) with pointer loads (the default until then)
FWD_SWEEP_WIDE = [dict(rows=r, BC=bc, num_warps=w, num_stages=s, tma=t)
                  for r, bc, w, s, t in [(256, 64, 16, 2, False), (256, 64, 16, 2, True), (256, 64, 8, 2, True),
                                         (128, 64, 8, 3, True), (128, 64, 8, 2, True), (256, 32, 8, 3, True)]]
DQ_SWEEP = [dict(rows=r, BC=bc, num_warps=w, num_stages=s, tma=t)
            for r, bc, w, s, t in [(128, 64, 8, 2, False), (128, 64, 8, 2, True), (128, 64, 8, 3, True),
                                   (128, 32, 8, 3, True), (256, 64, 16, 2, True), (128, 32, 8, 3, False),
                                   (64, 64, 4, 3, False)]]
DKV_SWEEP = [dict(rows=r, BC=bc, num_warps=w, num_stages=s, programs=p, min_segment=256)
             for r, bc, w, s, p in [(32, 128, 8, 3, 4), (32, 128, 8, 2, 4), (32, 128, 8, 3, 2), (32, 128, 8, 3, 8),
                                    (64, 128, 8, 2, 4),
                                    (32, 64, 8, 3, 4), (64, 64, 8, 3, 4), (16, 128, 8, 3, 4), (32, 64, 4, 3, 4)]]

# Candidates for padded Dk+Dv > 256 (Dk=192 pads to 256), default first. Compiled for sm_90a with
# Triton 3.6 (ptxas -v, 2026-11-28): regs / spill bytes / smem / blocks per SM, and the tensor-core
# work issued per useful multiply-add (192 padded to 256 alone gives 1.2-1.25). The defaults
# until 2026-11-28 (rows 64 in dQ, BC 64 in dK/dV, 8 warps) put a 64-row chained dot on 8 warps: Triton lays it out
# warpsPerCTA=[8,1], so both warpgroups compute the same S / dP tile (m64n16 wgmmas), 2.0x (dQ)
# and 1.8x (dK/dV) the useful work. Fixes: 128 rows on 8 warps, or one warpgroup (4 warps); for
# dK/dV every wgmma config without that duplication spills (fp32 dk [BC, 256] + dv [BC, 128]), so
# BC=32 (mma.sync, M < 64 cannot use wgmma) is in the list too.
DQ_SWEEP_WIDE = [dict(rows=r, BC=bc, num_warps=w, num_stages=s)
                 for r, bc, w, s in [(128, 32, 8, 2),   # default: 228 regs, 0 spill, 144 KB, 1/SM, 1.25x (m64n32)
                                     (64, 32, 8, 2),    # the default until 2026-11-28: 186 regs, 0 spill, 96 KB, 2.0x
                                     (128, 32, 8, 3),   # 242 regs, 0 spill, 168 KB, 1/SM, 1.25x
                                     (128, 64, 8, 2),   # 255 regs, 28 B spill, 192 KB, 1/SM, 1.25x (m64n64)
                                     (64, 32, 4, 3),    # 255 regs, 0 spill, 120 KB, 1/SM (4 warps), 1.25x
                                     (64, 16, 4, 2)]]   # 232 regs, 0 spill, 72 KB, 2/SM (4 warps each), 1.25x
DQ_SWEEP_WIDE += [dict(rows=128, BC=64, num_warps=8, num_stages=2, tma=True),
                  dict(rows=128, BC=32, num_warps=8, num_stages=3, tma=True)]
DKV_SWEEP_WIDE = [dict(rows=r, BC=bc, num_warps=w, num_stages=s, programs=p, min_segment=256)
                  for r, bc, w, s, p in [(32, 64, 8, 2, 4),     # default: 255 regs, 32 B spill, 97 KB, 1/SM, 1.8x
                                         (64, 32, 8, 2, 4),     # mma.sync: 180 regs, 0 spill, 76 KB, 1/SM, 1.2x
                                         (128, 32, 8, 2, 4),    # mma.sync: 255 regs, 0 spill, 129 KB, 1/SM, 1.2x
                                         (128, 32, 16, 3, 4),   # mma.sync: 128 regs, 0 spill, 226 KB, 1/SM, 1.2x
                                         (32, 128, 8, 2, 4),    # wgmma m64n32: 255 regs, 460 B spill, 144 KB, 1.2x
                                         (32, 64, 4, 1, 4)]]    # wgmma 4 warps: 255 regs, 1112 B spill, 72 KB, 2/SM


def inputs(T, Dk, Dv, seed=0, requires_grad=False):
    return qkv(T, num_compressed(T, KS, ST), HQ, H, Dk, Dv, seed, requires_grad)


def check_small(Dk, Dv):
    out = against_reference(lambda q, k, v, backend: compressed_attention(q, k, v, KS, ST, backend=backend),
                            *inputs(2048, Dk, Dv, requires_grad=True))
    ((o, lse), g), ((ro, rlse), rg) = out["triton"], out["reference"]
    fin = torch.isfinite(rlse)
    assert torch.equal(torch.isfinite(lse), fin)
    assert_close("o", ro, o.float(), 1e-2)
    assert_close("lse", rlse[fin], lse[fin], 2e-5)
    for name, r, x in zip(("dq", "dk", "dv"), rg, g):
        assert_close(name, r, x.float(), 2e-2)


def visible_pairs(T):
    """(query head, compressed token) pairs with the token visible to the query."""
    Tc = num_compressed(T, KS, ST)
    t_first = torch.arange(Tc, dtype=torch.float64) * ST + KS - 1
    return float((T - t_first).clamp(min=0).sum()) * HQ


def run_case(T, Dk, Dv, fwd_cfg=None, dq_cfg=None, dkv_cfg=None):
    q, k, v = inputs(T, Dk, Dv)
    scale = Dk ** -0.5
    o, lse = C.compressed_attention_fwd(q, k, v, KS, ST, scale, None, config=fwd_cfg)
    do = torch.randn(o.shape, device="cuda", generator=torch.Generator(device="cuda").manual_seed(1)).to(o.dtype)
    t_f = bench(lambda: C.compressed_attention_fwd(q, k, v, KS, ST, scale, None, config=fwd_cfg))
    t_b = bench(lambda: C.compressed_attention_bwd(q, k, v, o, lse, do, None, KS, ST, scale, None,
                                                   dq_config=dq_cfg, dkv_config=dkv_cfg))
    grads = C.compressed_attention_bwd(q, k, v, o, lse, do, None, KS, ST, scale, None, dq_config=dq_cfg,
                                       dkv_config=dkv_cfg)
    return t_f, t_b, o, grads


def main():
    args, Dk, Dv = parse_args(__doc__)
    print(header())
    print(f"# B=1 HQ={HQ} H={H} Dk={Dk} Dv={Dv} bf16 kernel_size={KS} stride={ST}")
    check_small(Dk, Dv)
    print("# check at T=2048 (o, lse, dq, dk, dv vs float32 reference): ok")
    for T in args.T:
        flop_f = visible_pairs(T) * 2 * (Dk + Dv)
        t_f, t_b, o, grads = run_case(T, Dk, Dv)
        print(f"T={T:7d}  fwd {t_f:8.3f} ms {flop_f / t_f * 1e-9:6.1f} TFLOP/s   "
              f"bwd {t_b:8.3f} ms {2.5 * flop_f / t_b * 1e-9:6.1f} TFLOP/s", flush=True)
        if not args.sweep:
            continue
        wide = C.pow2(Dk) + C.pow2(Dv) > 256
        sms = torch.cuda.get_device_properties(0).multi_processor_count

        def per_gpu(kind, cfg):
            if kind == "dkv":
                cfg["programs"] *= sms
            return cfg

        sweep((("fwd", FWD_SWEEP_WIDE if wide else FWD_SWEEP), ("dq", DQ_SWEEP_WIDE if wide else DQ_SWEEP),
               ("dkv", DKV_SWEEP_WIDE if wide else DKV_SWEEP)), args.kinds.split(","),
              lambda **cfg: run_case(T, Dk, Dv, **cfg), (o, grads), per_gpu)


if __name__ == "__main__":
    main()
