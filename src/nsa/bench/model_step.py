"""``nsa bench --preset model``: one training step of :class:`nsa.model.LanguageModel` with
``attention='nsa'`` against ``'full'`` (PyTorch SDPA: cuDNN / FlashAttention on CUDA), same
parameters otherwise, in one process.

A step is what ``nsa train`` runs: forward under bf16 autocast (float32 master weights), the
chunked next-token loss, backward and a fused AdamW update, on one sequence of T tokens. Each
model kind is first checked: on CUDA the NSA model's loss and gradients on the Triton kernels
against the reference backend at a short length; then timed (median of CUDA-event timings after
warm-up) and its peak memory read (``torch.cuda.max_memory_allocated`` over the timed steps).
Reported per length: ms per step, training tokens/s, peak GiB, and NSA's speedup over full.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from .._cli_utils import add_device_option, resolve_device

__all__ = ["cli_main", "measure_step"]

KINDS = ("nsa", "full")


def _int_list(text):
    out = []
    for part in text.split(","):
        part = part.strip().lower()
        mult = 1024 if part.endswith("k") else 1
        try:
            v = int(part[:-1] if part.endswith("k") else part) * mult
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated positive ints (8k allowed), got {text!r}")
        if v < 1:
            raise argparse.ArgumentTypeError(f"expected positive lengths, got {text!r}")
        out.append(v)
    return out


def _parser():
    p = argparse.ArgumentParser(prog="nsa bench --preset model",
                                description="Training step of nsa.model.LanguageModel, attention='nsa' against "
                                            "'full' (SDPA), tokens/s and peak memory per context length.")
    p.add_argument("--preset", choices=("model",), default="model", help="this benchmark")
    p.add_argument("--model", default=None, choices=("tiny", "small", "base", "1b"),
                   help="model preset (default: base on CUDA, tiny on CPU)")
    p.add_argument("--T", type=_int_list, default=None,
                   help="context lengths (default on CUDA 8k,16k,32k,64k; on CPU 256,512)")
    p.add_argument("--reps", type=int, default=5, help="timed steps per case (default 5, after 2 warm-up steps)")
    p.add_argument("--check-T", type=int, default=None,
                   help="length of the kernels-vs-reference check of the NSA model (default 1024 on CUDA, "
                        "128 on CPU; 0 skips it)")
    add_device_option(p)
    p.add_argument("--json", metavar="PATH", help="write the header and records as JSON")
    return p


def _models(name, device, T, backend=None):
    from ..model import LanguageModel, ModelConfig

    out = {}
    for kind in KINDS:
        torch.manual_seed(0)
        cfg = ModelConfig.preset(name, attention=kind, max_seq_len=max(T, ModelConfig.preset(name).max_seq_len),
                                 backend=backend)
        out[kind] = LanguageModel(cfg).to(device)
    # The same weights wherever the kinds share a parameter (all but attention's own).
    shared = {k: v for k, v in out["nsa"].state_dict().items() if ".attn." not in k}
    out["full"].load_state_dict(shared, strict=False)
    return out


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_step(model, T, device, reps, warmup=2) -> dict:
    """Median ms of one training step on a length-T sequence, tokens/s and peak GiB."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    g = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (1, T), generator=g).to(device)
    bf16 = device.type == "cuda"

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for _ in range(warmup):
        step()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            step()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
    ms = statistics.median(times)
    peak = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None
    del opt
    return dict(ms=ms, tokens_per_s=T / (ms / 1e3), peak_gib=peak)


def _check(name, device, T) -> str:
    """The NSA model on the default backend against the reference backend (float32, no
    autocast): loss and gradients of every parameter. Returns 'ok' or what differs."""
    from ..model import LanguageModel, ModelConfig

    torch.manual_seed(0)
    cfg = ModelConfig.preset(name, attention="nsa", max_seq_len=max(T, ModelConfig.preset(name).max_seq_len),
                             num_layers=1)
    fast = LanguageModel(cfg).to(device)
    ref = LanguageModel(cfg.replace(backend="reference")).to(device)
    ref.load_state_dict(fast.state_dict())
    ids = torch.randint(0, cfg.vocab_size, (1, T), generator=torch.Generator().manual_seed(1)).to(device)
    losses, grads = [], []
    for m in (fast, ref):
        loss = m(ids, labels=ids).loss
        loss.backward()
        losses.append(loss.item())
        grads.append({n: p.grad.double() for n, p in m.named_parameters()})
    bad = []
    if abs(losses[0] - losses[1]) > 1e-3 * abs(losses[1]):
        bad.append(f"loss {losses[0]:.6f} vs reference {losses[1]:.6f}")
    for n in grads[1]:
        r, o = grads[1][n], grads[0][n]
        err = ((o - r).norm() / r.norm().clamp(min=1e-30)).item()
        if err > 2e-2:
            bad.append(f"grad {n}: relative error {err:.2e}")
    return "ok" if not bad else "; ".join(bad)


def _header(device, args):
    import platform

    h = dict(date=time.strftime("%Y-%m-%d %H:%M:%S %Z"), torch=torch.__version__, python=platform.python_version(),
             device=str(device), argv=sys.argv[1:])
    if device.type == "cuda":
        h["gpu"] = torch.cuda.get_device_name(device)
        try:
            import triton

            h["triton"] = triton.__version__
        except ImportError:
            h["triton"] = None
    return h


def cli_main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        device = resolve_device(args.device)
    except ValueError as e:
        print(f"nsa bench: {e}", file=sys.stderr)
        return 2
    if args.reps < 1:
        print("nsa bench: --reps must be >= 1", file=sys.stderr)
        return 2
    cuda = device.type == "cuda"
    name = args.model or ("base" if cuda else "tiny")
    lengths = args.T or ([8192, 16384, 32768, 65536] if cuda else [256, 512])
    check_T = args.check_T if args.check_T is not None else (1024 if cuda else 128)
    head = _header(device, args)
    head.update(model=name, lengths=lengths)
    print(" | ".join(f"{k}: {v}" for k, v in head.items() if k != "argv"), flush=True)
    check = _check(name, device, check_T) if check_T > 0 else "skipped"
    print(f"check (NSA model, default backend vs reference, T={check_T}, 1 layer): {check}", flush=True)
    records = []
    print(f"{'T':>7} {'kind':>5} {'ms/step':>10} {'tokens/s':>10} {'peak GiB':>9} {'speedup':>8}", flush=True)
    for T in lengths:
        row = {}
        for kind, model in _models(name, device, T).items():
            try:
                r = measure_step(model, T, device, args.reps)
            except torch.OutOfMemoryError:
                r = dict(ms=None, tokens_per_s=None, peak_gib=None, error="out of memory")
            row[kind] = r
            del model
            if cuda:
                torch.cuda.empty_cache()
        ok = row["nsa"]["ms"] is not None and row["full"]["ms"] is not None
        speedup = row["full"]["ms"] / row["nsa"]["ms"] if ok else None
        for kind in KINDS:
            r = row[kind]
            rec = dict(T=T, kind=kind, model=name, speedup=speedup if kind == "nsa" else None, **r)
            records.append(rec)
            fmt = (lambda v, f: "-" if v is None else format(v, f))
            print(f"{T:>7} {kind:>5} {fmt(r['ms'], '10.1f')} {fmt(r['tokens_per_s'], '10.0f')} "
                  f"{fmt(r['peak_gib'], '9.2f')} {fmt(rec['speedup'], '7.2f') + ('x' if rec['speedup'] else ''):>8}",
                  flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(header=head, check=check, records=records), f, indent=2)
        print(f"wrote {args.json}")
    return 0 if check in ("ok", "skipped") else 1
