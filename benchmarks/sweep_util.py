"""What the kernel benchmark scripts (bench_compressed.py, bench_window.py) share: their command
line, header line and timer, their random inputs and the run of an op on the Triton and the
reference backends, and the config sweep loop."""

from __future__ import annotations

import argparse
import datetime

import torch
import triton

from tests.helpers import rel_err


def parse_args(doc: str):
    """The scripts' common options; returns (args, Dk, Dv)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--T", type=int, nargs="*", default=[8192, 16384, 32768, 65536, 131072])
    p.add_argument("--dims", default="128x128", help="DkxDv")
    p.add_argument("--sweep", action="store_true", help="time each candidate config of each kernel")
    p.add_argument("--kinds", default="fwd,dq,dkv", help="kernels to sweep")
    args = p.parse_args()
    Dk, Dv = (int(x) for x in args.dims.split("x"))
    return args, Dk, Dv


def bench(fn) -> float:
    """Median ms of ``fn`` (after one call: compilation) under triton.testing.do_bench."""
    fn()
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def qkv(T, Tk, HQ, H, Dk, Dv, seed=0, requires_grad=False, device="cuda"):
    """Random bf16 q ``[1, T, HQ, Dk]``, k ``[1, Tk, H, Dk]``, v ``[1, Tk, H, Dv]``."""
    gen = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(1, T, HQ, Dk, device=device, generator=gen).bfloat16()
    k = torch.randn(1, Tk, H, Dk, device=device, generator=gen).bfloat16()
    v = torch.randn(1, Tk, H, Dv, device=device, generator=gen).bfloat16()
    return [x.requires_grad_(requires_grad) for x in (q, k, v)]


def against_reference(op, q, k, v):
    """``op(q, k, v, backend)`` (its output, or a tuple whose first item is the output) on the
    Triton backend and on float32 copies with the reference, and the gradients of ``sum(o * dO)``
    for a random bf16 dO: ``{"triton": (outputs, grads), "reference": (outputs, grads)}``, outputs
    always a tuple."""
    do = torch.randn(q.shape[:3] + (v.shape[-1],), device=q.device).bfloat16()
    out = {}
    for backend, args in (("triton", (q, k, v)), ("reference", [x.detach().float().requires_grad_() for x in (q, k, v)])):
        res = op(*args, backend)
        res = res if isinstance(res, tuple) else (res,)
        out[backend] = (res, torch.autograd.grad((res[0].float() * do.float()).sum(), args))
    return out


def header() -> str:
    return (f"# {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC  {torch.cuda.get_device_name()}  "
            f"torch {torch.__version__}  triton {triton.__version__}")


def sweep(candidates, kinds, run, base, prepare=None):
    """Time each candidate config of each kernel kind and print it with its largest relative
    difference to the default's results.

    Args:
        candidates: ``(kind, [config, ...])`` pairs, kind one of "fwd", "dq", "dkv".
        kinds: the kinds to sweep.
        run: ``run(fwd_cfg=..., dq_cfg=..., dkv_cfg=...) -> (t_fwd, t_bwd, o, grads)``.
        base: ``(o, grads)`` of the default configs.
        prepare: ``prepare(kind, config) -> config`` given to ``run`` (e.g. per-GPU sizes), or None.
    """
    o, grads = base
    for kind, cands in candidates:
        if kind not in kinds:
            continue
        for cfg in cands:
            c = prepare(kind, dict(cfg)) if prepare else cfg
            try:
                tf, tb, o2, g2 = run(**{f"{kind}_cfg": c})
            except Exception as e:  # e.g. out of shared memory: report and go on
                print(f"  {kind:3s} {cfg}: failed ({type(e).__name__}: {str(e)[:80]})", flush=True)
                continue
            err = max([rel_err(o.float(), o2.float())] + [rel_err(a.float(), b.float()) for a, b in zip(grads, g2)])
            t = tf if kind == "fwd" else tb
            print(f"  {kind:3s} {cfg}: {t:8.3f} ms (max rel diff to default {err:.1e})", flush=True)
