"""Where the time of an eager NSA decoding step goes (one GPU): the host's time per call, the
kernels it launches and their GPU time, against the step replayed from a CUDA graph and
cuDNN SDPA's eager step on the same cache.

    PYTHONPATH=src python3 benchmarks/probe_decode_eager.py [--T 65536] [--B 1,8,64]

Per case: ``host ms`` is the Python call's own duration with the GPU idle before it (what the
host spends: checks, planning, launches), ``launches`` the CUDA kernels of one call (profiler),
``kernel ms`` their summed GPU time, ``eager ms`` one call on an idle GPU until it finishes,
``graph ms`` one replay. NSA settings of the paper, HQ=64, H=4, D=128, bf16.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from nsa.ops.decode import nsa_decode
from nsa.ops.utils import num_compressed

SETTINGS = dict(kernel_size=32, stride=16, block_size=64, num_selected=16, num_initial=1, num_local=2,
                window_size=512)


def _inputs(N, L, HQ=64, H=4, D=128):
    g = torch.Generator(device="cuda").manual_seed(0)
    dt = torch.bfloat16

    def r(*s):
        return torch.randn(*s, device="cuda", generator=g).to(dt)

    Tc = num_compressed(L, 32, 16)
    k, v = r(N, L, H, D), r(N, L, H, D)
    return dict(q=r(N, HQ, D), k_cmp=r(N, Tc, H, D), v_cmp=r(N, Tc, H, D), k_slc=k, v_slc=v, k_win=k, v_win=v,
                g_cmp=torch.sigmoid(r(N, HQ)), g_slc=torch.sigmoid(r(N, HQ)), g_win=torch.sigmoid(r(N, HQ)),
                seq_lens=torch.full((N,), L, dtype=torch.int32, device="cuda"))


def _profile(fn, reps=10):
    """(host ms per call with an idle GPU, eager ms per call until done, launches per call, kernel ms per call)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    host, eager = [], []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        host.append((t1 - t0) * 1e3)
        eager.append((time.perf_counter() - t0) * 1e3)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type.name == "CUDA"]
    ms = sum(e.device_time for e in kernels) / 1e3 / reps
    names = sorted({e.name[:40] for e in kernels})
    return statistics.median(host), statistics.median(eager), len(kernels) / reps, ms, names


def _graph_ms(fn, reps=50):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    g.replay()
    torch.cuda.synchronize()
    t = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        t.append(a.elapsed_time(b))
    return statistics.median(t)


def batches(what, columns):
    """Parses ``--T`` and ``--B``, prints the GPU line and ``columns``; yields ``(N, inputs)`` per batch
    size (:func:`_inputs` at context T)."""
    p = argparse.ArgumentParser()
    p.add_argument("--T", type=int, default=65536)
    p.add_argument("--B", default="1,8,64")
    args = p.parse_args()
    print(f"# {torch.cuda.get_device_name()} torch {torch.__version__}; {what}, T={args.T}")
    print(columns)
    for N in (int(b) for b in args.B.split(",")):
        yield N, _inputs(N, args.T)


def main():
    for N, x in batches("eager decoding step", "case        host ms  eager ms  graph ms  launches  kernel ms  kernels"):
        with torch.no_grad():
            def nsa_step():
                return nsa_decode(**x, **SETTINGS)

            q = x["q"].unsqueeze(2)  # [N, HQ, 1, D]: SDPA over the whole cache, GQA 16
            k = x["k_slc"].transpose(1, 2).contiguous()  # [N, H, L, D]
            v = x["v_slc"].transpose(1, 2).contiguous()

            def sdpa_step():
                with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.CUDNN_ATTENTION):
                    return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)

            for name, fn in (("nsa", nsa_step), ("cudnn", sdpa_step)):
                host, eager, launches, kms, names = _profile(fn)
                graph = _graph_ms(fn)
                print(f"{name:6s} B={N:<3d} {host:8.3f} {eager:9.3f} {graph:9.3f} {launches:9.1f} {kms:10.3f}  "
                      f"{', '.join(names)}", flush=True)


if __name__ == "__main__":
    main()
