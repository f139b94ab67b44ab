"""Time the Triton top-n block selection (nsa.ops.selection) on one GPU; sweep its tile config.

Paper shapes: B=1, HQ=64, H=4, D=128 (or --dims 192x128), bf16, 32/16/64, n=16. For each T the script first checks
the kernel against the reference at a small size, then reports the median time
(``triton.testing.do_bench``, inputs built outside the timed region), the q.k_cmp TFLOP/s it
implies (visible pairs only) and, as a yardstick with the same number of q.k_cmp products, the
compressed-attention forward when its Triton kernel is importable.

Usage (from the repository root, on the GPU machine):
    PYTHONPATH=src python3 benchmarks/bench_selection.py                 # default config, T=8k..128k
    PYTHONPATH=src python3 benchmarks/bench_selection.py --sweep --T 65536  # tile-config sweep
    PYTHONPATH=src python3 benchmarks/bench_selection.py --sweep --T 65536 --dims 192x128  # SWEEP_WIDE
    PYTHONPATH=src python3 benchmarks/bench_selection.py --sweep --T 65536 --heads 4/4     # SWEEP_SMALL_G
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for tests.ops.selection_check

from nsa.ops import compressed_attention, select_blocks  # noqa: E402
from nsa.ops import selection  # noqa: E402
from nsa.ops.utils import num_compressed  # noqa: E402
from tests.gpu.test_selection_gpu import chunked_lse  # noqa: E402

HQ, H = 64, 4
KS, ST, BS, N = 32, 16, 64, 16

# Configs (positions, num_warps, num_stages, maxnreg; 0: no cap) for head dims wider than 128,
# default first. sm_90 compile audit (Triton 3.9, ptxas -v), Dk = 192 (q.k as 128 + 64 columns):
# registers / shared memory / programs per SM by both. The default's 256 rows hold a 96 KB q tile:
# one program per SM; 128 rows (8 positions) or 64 (4) fit two or three. None spills.
SWEEP_WIDE = [dict(positions=p, num_warps=w, num_stages=s, maxnreg=r)
              for p, w, s, r in [(16, 8, 2, 0),     # default: 176 regs, 145 KB, 1/SM
                                 (16, 8, 1, 0),     # 154 regs, 112 KB, 1/SM
                                 (16, 16, 2, 0),    # 128 regs, 152 KB, 1/SM
                                 (8, 8, 2, 128),    # 128 regs, 97 KB, 2/SM
                                 (8, 8, 1, 128),    # 119 regs, 64 KB, 2/SM
                                 (8, 4, 2, 0),      # 178 regs, 97 KB, 2/SM
                                 (8, 4, 1, 168),    # 158 regs, 64 KB, 3/SM
                                 (8, 4, 3, 0),      # 178 regs, 121 KB, 1/SM
                                 (4, 4, 2, 0),      # 98 regs, 73 KB, 3/SM
                                 (4, 4, 1, 0)]]     # 126 regs, 40 KB, 4/SM
# Small groups (G < 16, D = 128): positions per tile such that the tile holds up to 256 rows
# (positions x heads padded to a power of two), on 4 or 8 warps, with and without the 128-register
# cap; those that spill at sm_90 (compile audit, Triton 3.9) are left out (e.g. 128 positions x 4
# heads: 2376 bytes under the cap, 460 on 4 warps; 256 positions at G = 1 on 4 warps: 428).
SWEEP_SMALL_G = [dict(positions=p, num_warps=w, num_stages=2, maxnreg=r)
                 for p, w, r in [(16, 8, 128), (16, 4, 0), (32, 8, 128), (32, 4, 0), (64, 8, 128), (64, 8, 0),
                                 (64, 4, 0), (128, 8, 128), (128, 8, 0), (256, 8, 0)]]


def inputs(T, D, Dv, heads=(HQ, H), dtype=torch.bfloat16, seed=0):
    hq, h = heads
    gen = torch.Generator(device="cuda").manual_seed(seed)
    Tc = num_compressed(T, KS, ST)
    q = torch.randn(1, T, hq, D, device="cuda", generator=gen).to(dtype)
    k = torch.randn(1, Tc, h, D, device="cuda", generator=gen).to(dtype)
    v = torch.randn(1, Tc, h, Dv, device="cuda", generator=gen).to(dtype)
    lse = chunked_lse(q, k, D ** -0.5)  # the definition, chunked: no kernel needed
    return q, k, v, lse


def check_small(D, Dv, heads, **cfg):
    """The public op (no cfg) or the kernel at config cfg against the definition at T = 4096."""
    from tests.ops.selection_check import check_selection
    q, k, _, lse = inputs(4096, D, Dv, heads)
    if cfg:
        idx = selection.selection_fwd(q, k, lse, KS, ST, BS, N, 1, 2, D ** -0.5, None, **cfg)
    else:
        idx = select_blocks(q, k, lse, KS, ST, BS, N, backend="triton")
    check_selection(q, k, lse, idx, kernel_size=KS, stride=ST, block_size=BS, num_selected=N, num_initial=1,
                    num_local=2, tol=1e-5)


def visible_pairs(T, hq):
    """Number of (query, compressed token) pairs with the token visible, times hq query heads."""
    Tc = num_compressed(T, KS, ST)
    t_first = torch.arange(Tc, dtype=torch.float64) * ST + KS - 1
    return float((T - t_first).clamp(min=0).sum()) * hq


def time_selection(q, k, lse, **cfg):
    D = q.shape[-1]
    fn = lambda: selection.selection_fwd(q, k, lse, KS, ST, BS, N, 1, 2, D ** -0.5, None, **cfg)  # noqa: E731
    fn()
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--T", type=int, nargs="*", default=[8192, 16384, 32768, 65536, 131072])
    p.add_argument("--sweep", action="store_true", help="time (positions, num_warps, num_stages, maxnreg) variants")
    p.add_argument("--dims", default="128x128", help="DkxDv (Dv only sizes the yardstick's values)")
    p.add_argument("--heads", default="64/4", help="HQ/H (query heads / KV heads)")
    args = p.parse_args()
    D, Dv = (int(x) for x in args.dims.split("x"))
    heads = hq, h = tuple(int(x) for x in args.heads.split("/"))
    G = hq // h
    print(f"# {datetime.datetime.utcnow():%Y-%m-%d %H:%M} UTC  {torch.cuda.get_device_name()}  "
          f"torch {torch.__version__}  triton {triton.__version__}")
    print(f"# B=1 HQ={hq} H={h} D={D} bf16, {KS}/{ST}/{BS}, n={N}; default positions={selection.POSITIONS} "
          f"(G < 16: {selection.SMALL_G_ROWS} rows, at most {selection.SMALL_G_POSITIONS} positions) "
          f"warps={selection.NUM_WARPS} stages={selection.NUM_STAGES}")
    check_small(D, Dv, heads)
    print("# check at T=4096: ok")
    configs = [{}]
    if args.sweep and D > 128:
        configs = SWEEP_WIDE
    elif args.sweep and G < 16:
        # rows = positions x heads (padded) at most 256
        configs = [c for c in SWEEP_SMALL_G if c["positions"] * triton.next_power_of_2(G) <= 256]
    elif args.sweep:
        configs = [dict(positions=p, num_warps=w, num_stages=s, maxnreg=r)
                   for p, w, s, r in itertools.product((8, 16, 32), (4, 8), (1, 2, 3), (0, 128))]
    for T in args.T:
        q, k, v, lse = inputs(T, D, Dv, heads)
        flop = 2 * visible_pairs(T, hq) * D
        try:
            from nsa.ops.compressed import compressed_attention_triton  # noqa: F401
            t_cmp = triton.testing.do_bench(
                lambda: compressed_attention(q, k, v, KS, ST, backend="triton"), warmup=25, rep=100,
                return_mode="median")
        except Exception as e:  # the yardstick is optional
            t_cmp = float("nan")
            print(f"# compressed attention not timed: {e!r}")
        for cfg in configs:
            try:
                if cfg:
                    check_small(D, Dv, heads, **cfg)  # every candidate selects as the definition does
                ms = time_selection(q, k, lse, **cfg)
            except Exception as e:  # a config that does not compile (e.g. out of shared memory)
                print(f"T={T:6d} {cfg}: failed: {type(e).__name__}: {str(e)[:120]}")
                continue
            print(f"T={T:6d} {cfg or 'default'}: selection {ms:8.3f} ms  ({flop / ms / 1e9:6.1f} TFLOP/s q.k_cmp)"
                  f"  | compressed fwd {t_cmp:8.3f} ms")
        del q, k, v, lse
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
