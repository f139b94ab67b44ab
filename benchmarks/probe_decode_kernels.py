"""Where the GPU time of one NSA decoding step goes, kernel by kernel, for each top-n method
(one GPU): per launch of the step (compressed + window, scores, top-n, selected, combine) its
median GPU time, and the step replayed from a CUDA graph.

    PYTHONPATH=src python3 benchmarks/probe_decode_kernels.py [--T 65536] [--B 1,8,64]

NSA settings of the paper, HQ=64, H=4, D=128, bf16 (the inputs of probe_decode_eager.py).
``sort``: the top-n by a partial bitonic sort (``tl.topk``); ``rounds``: num_selected rounds of
max-reductions (:data:`nsa.ops.decode_triton.TOPK_SORT` picks the default). With a copy of an
older ``nsa/ops/decode_triton.py`` saved beside this script as ``decode_triton_old.py`` (relative
imports made absolute), its step is timed too and compared (same selection, output difference).
"""

from __future__ import annotations

import statistics

import torch

from nsa.ops.decode_triton import _launch_plan, decode_fwd, default_plan
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


def main():
    cols = "plan    B    graph ms  " + "  ".join(f"{s:>9s}" for s in STAGES) + "  (kernel ms)"
    for N, x in batches("decode kernels", cols):
        L = x["seq_lens"][0].item()
        Tc = num_compressed(L, 32, 16)
        base = default_plan(N, 4, Tc, -(-L // 64), 512, 64, 16)
        first = None
        for name, sort in (("sort", True), ("rounds", False)):
            plan = base._replace(topk_sort=sort)
            _launch_plan.cache_clear()
            with torch.no_grad():
                def step():
                    return decode_fwd(**x, **SETTINGS, scale=128 ** -0.5, plan=plan)

                o, idx = step()
                first = first or (o, idx)
                assert torch.equal(o, first[0]) and torch.equal(idx, first[1]), "the top-n methods disagree"
                ks = _kernel_ms(step)
                g = _graph_ms(step)
            print(f"{name:7s} {N:<4d} {g:8.4f}  " + "  ".join(f"{k:9.4f}" for k in ks) + f"  ({sum(ks):.4f})",
                  flush=True)
        try:  # an older copy of the kernels beside this script, if one was put there
            import decode_triton_old as old
        except ImportError:
            continue
        with torch.no_grad():
            def step_old():
                return old.decode_fwd(**x, **SETTINGS, scale=128 ** -0.5)

            o, idx = step_old()
            ks = _kernel_ms(step_old)
            g = _graph_ms(step_old)
        same = torch.equal(idx, first[1])
        err = (o.float() - first[0].float()).abs().max().item()
        print(f"{'old':7s} {N:<4d} {g:8.4f}  " + "  ".join(f"{k:9.4f}" for k in ks) + f"  ({sum(ks):.4f})"
              f"  same selection {same}, max |o - o_old| {err:.2e}", flush=True)


if __name__ == "__main__":
    main()
