"""Context parallelism of the NSA layer: time, tokens/s and peak memory per rank, forward+backward.

One process (plain ``python``): the layer on the whole sequence against the same layer through
the context-parallel path with P = 1 (a one-process group: the gather, the compression of the
whole documents, the queries' pieces), i.e. the overhead of the parallel path itself.
Under torchrun with P processes (one GPU each): every rank holds its share of the sequence
(:class:`nsa.parallel.SequenceShards`, load-balanced) and the step is timed on all ranks at once.

    PYTHONPATH=src python benchmarks/context_parallel.py --T 16k,64k
    PYTHONPATH=src torchrun --nproc_per_node=4 benchmarks/context_parallel.py --T 128k,256k,512k,1M

Prints one line per length and writes ``--json`` when given (header: GPU, versions, date).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch
import torch.distributed as dist

from nsa.layer import NativeSparseAttention, NSAConfig
from nsa.parallel import ContextParallel, SequenceShards


def _lengths(text):
    out = []
    for part in text.split(","):
        part = part.strip().lower()
        mult = 1 << 20 if part.endswith("m") else 1 << 10 if part.endswith("k") else 1
        out.append(int(float(part.rstrip("km")) * mult))
    return out


def _time(fn, reps, device):
    """Median ms of ``fn`` over ``reps`` calls after one warm-up (every rank synchronized)."""
    fn()
    times = []
    for _ in range(reps):
        if dist.is_initialized():
            dist.barrier()
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--T", type=_lengths, default=_lengths("16k,64k"), help="sequence lengths, e.g. 16k,64k,1M")
    p.add_argument("--config", default="paper", choices=("paper", "small", "tiny"), help="NSAConfig preset")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--json", help="write the results here (rank 0)")
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    torchrun = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    if torchrun:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        device = torch.device("cuda", local) if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    else:
        device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")  # NCCL: an index
        init = os.path.join(tempfile.mkdtemp(), "init")
        dist.init_process_group("nccl" if cuda else "gloo", init_method=f"file://{init}", rank=0, world_size=1,
                                device_id=device if cuda else None)
    P, rank = dist.get_world_size(), dist.get_rank()
    dtype = torch.bfloat16 if cuda else torch.float32
    torch.manual_seed(0)
    layer = NativeSparseAttention(NSAConfig.preset(args.config)).to(device, dtype)
    hidden = layer.config.hidden_size
    rows = []
    for T in args.T:
        shards = SequenceShards(T, P)
        cp = ContextParallel(shards, device=device)
        x = torch.randn(1, shards.counts[rank], hidden, device=device, dtype=dtype, requires_grad=True)
        dy = torch.randn_like(x)

        def step_cp():
            x.grad = None
            layer.zero_grad(set_to_none=True)
            layer(x, context=cp).backward(dy)

        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        row = dict(T=T, P=P, ms_cp=_time(step_cp, args.reps, device))
        if cuda:
            row["peak_gib_cp"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
        if P == 1:
            def step_plain():
                x.grad = None
                layer.zero_grad(set_to_none=True)
                layer(x).backward(dy)

            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
            row["ms_plain"] = _time(step_plain, args.reps, device)
            if cuda:
                row["peak_gib_plain"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
            row["overhead"] = row["ms_cp"] / row["ms_plain"]
        row["tokens_per_s"] = T / (row["ms_cp"] / 1e3)
        rows.append(row)
        if rank == 0:
            print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
    if rank == 0 and args.json:
        import triton

        header = dict(date_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), argv=sys.argv[1:],
                      gpu=torch.cuda.get_device_name(device) if cuda else None, torch=torch.__version__,
                      triton=triton.__version__, config=args.config, dtype=str(dtype), world_size=P,
                      what="NSA layer forward+backward, B = 1; P = 1: context-parallel path vs the plain layer")
        with open(args.json, "w") as f:
            json.dump(dict(header=header, records=rows), f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
