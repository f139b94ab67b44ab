"""Where the GPU time of one NSA decoding step goes, kernel by kernel, for each variant of the
decode plan (one GPU): per launch of the step (compressed + window, scores, top-n, selected,
combine) its median GPU time, and the step replayed from a CUDA graph.

    PYTHONPATH=src python3 benchmarks/probe_decode_kernels.py [--T 65536] [--B 1,8,64]

NSA settings of the paper, HQ=64, H=4, D=128, bf16 (the inputs of probe_decode_eager.py).
Variants (:class:`nsa.ops.decode_triton.DecodePlan`): ``default``; ``sort``: the top-n by a
partial bitonic sort (``tl.topk``) instead of rounds of max-reductions; ``sums``: per-tile block
sums kept by the compressed pass instead of its scores; ``both``. Each variant's output and
selection are compared with the default's (the selection may differ on near-ties only).
"""

from __future__ import annotations

import statistics

import torch

from nsa.ops.decode_triton import decode_fwd, default_plan
from nsa.ops.utils import num_compressed
from probe_decode_eager import SETTINGS, _graph_ms, batches

STAGES = ("cmp+win", "score", "topk", "selected", "combine")


def _kernel_ms(fn, reps=20):
    """Median GPU ms of each launch of one call, in launch order."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    ev = sorted((e for e in prof.events() if e.device_type.name == "CUDA"), key=lambda e: e.time_range.start)
    per = len(ev) // reps
    return [statistics.median(ev[i * per + j].device_time for i in range(reps)) / 1e3 for j in range(per)]


VARIANTS = (("default", {}), ("sort", dict(topk_sort=True)), ("sums", dict(tile_sums=True)),
            ("both", dict(topk_sort=True, tile_sums=True)))


def main():
    cols = "plan    B    graph ms  " + "  ".join(f"{s:>9s}" for s in STAGES) + "  (kernel ms)  vs default"
    for N, x in batches("decode kernels", cols):
        L = x["seq_lens"][0].item()
        base = default_plan(N, 4, num_compressed(L, 32, 16), -(-L // 64), 512, 64, 16)
        first = None
        for name, flags in VARIANTS:
            plan = base._replace(**flags)
            with torch.no_grad():
                def step():
                    return decode_fwd(**x, **SETTINGS, scale=128 ** -0.5, plan=plan)

                o, idx = step()
                first = first or (o, idx)
                rows = (idx == first[1]).all(-1).float().mean().item()
                err = (o.float() - first[0].float()).abs().max().item()
                ks = _kernel_ms(step)
                g = _graph_ms(step)
            print(f"{name:7s} {N:<4d} {g:8.4f}  " + "  ".join(f"{k:9.4f}" for k in ks) + f"  ({sum(ks):.4f})"
                  f"  same rows {rows:.3f}, max |o - o_default| {err:.1e}", flush=True)


if __name__ == "__main__":
    main()
