"""``nsa bench --preset layer``: the :class:`nsa.layer.NativeSparseAttention` layer against a
full-attention layer with the same projections, forward and forward+backward, in one process.

The baseline, :class:`FullAttentionLayer`, has the NSA layer's ``q_proj`` (hidden -> HQ*Dk) and
``o_proj`` (HQ*Dv -> hidden), one ``kv_proj`` (hidden -> H*(Dk+Dv): the keys and values of one
branch), RoPE through :func:`nsa.layer.apply_rope` on queries and keys, and causal
``scaled_dot_product_attention`` with GQA (``enable_gqa``). On CUDA the SDPA backend is forced:
cuDNN, else FlashAttention, else memory-efficient, the first whose forward and backward run at
these head dims (the record's ``impl`` names it: ``sdpa.cudnn`` ...); on CPU torch chooses
(``sdpa.cpu``). Both layers hold their parameters in the timed dtype (bf16 on CUDA), B = 1.

Per head-dim pair, before timing:

- the NSA layer on the chosen backend against the same layer on the reference backend, float32,
  at ``--check-T`` tokens: the output and the gradient of the input and of every parameter,
  relative error <= 2e-2 (as ``--preset model`` checks its model);
- the full layer in the timed dtype against the same weights in float32 with attention written
  out (softmax of the masked scores): output and every gradient, within :data:`FULL_CHECK_SLACK`
  times the op benchmark's tolerance for the dtype (:data:`nsa.bench.harness.TOLERANCE`).

A layer that fails its check is not timed (``ok: false``, the reason in ``note``); exit status 1.

Timing: :class:`nsa.bench.harness.Timer` (CUDA: ``do_bench`` median, or CUDA events with the L2
flushed for calls over 20 ms; CPU: wall-clock median), inputs and the output gradient built
outside the timed region, gradients reset to None between calls. ``fwd`` is the training forward
(input and parameters require grad); ``fwd+bwd`` is the forward and ``backward`` of the output.
``speedup`` on the ``nsa`` record: full-layer time / NSA-layer time of the same T and pass (> 1:
NSA faster). A measurement out of memory is recorded with ``note: "n/a: out of memory"``.

Kernel breakdown (CUDA): one more call of each measurement under :mod:`torch.profiler`; the
device time of every kernel (and memcpy / memset) split into ``attention`` (the Triton kernels
of the attention op families in :mod:`nsa.ops`, :data:`ATTENTION_FAMILIES`, and SDPA's cuDNN /
flash / fmha kernels), ``gemm`` (cuBLAS, cutlass, nvjet, xmma kernels) and ``other``
(elementwise glue, copies, cats, reductions, other Triton passes such as RoPE). Kernel time
excludes idle gaps between kernels: it is at most the measured time. On CPU there are no kernels
to split (the torch backend's attention is made of the same aten ops as the glue): the breakdown
is ``null`` and the output says so.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import os
import re
import signal
import sys
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .._cli_utils import add_device_option, add_dtype_option
from ..layer import NativeSparseAttention, NSAConfig, apply_rope

__all__ = ["cli_main", "run", "measure", "FullAttentionLayer", "pick_sdpa", "check_nsa", "check_full",
           "classify_kernel", "split_kernels", "device_events", "profile_kernels", "add_targets", "TARGETS",
           "OTHER_SHARE_TARGET"]

K = 1024
PASSES = ("fwd", "fwd+bwd")
# Issue 22 (targets for an H200): forward+backward, full-layer time / NSA-layer time, per T.
TARGETS = {8 * K: 1.0, 16 * K: 1.5, 64 * K: 3.5}
# ... and the non-attention, non-GEMM share of the NSA layer's kernel time (forward+backward).
OTHER_SHARE_TARGET = (64 * K, 0.05)
CHECK_TOL = 2e-2  # the NSA layer, float32, kernels vs reference (as --preset model)
# The full layer in the timed dtype vs float32: this many times the op benchmark's tolerance, as
# its gradients pass through several roundings (projections, the attention backward); a wrong
# baseline (non-causal, wrong head mapping) is off by O(1).
FULL_CHECK_SLACK = 2.5
SDPA_ORDER = ("cudnn", "flash", "efficient")
_SDPA_BACKENDS = {"cudnn": "CUDNN_ATTENTION", "flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION"}
TOP_KERNELS = 12

CONVENTIONS = (
    "impl nsa: nsa.layer.NativeSparseAttention; impl sdpa.X: full-attention layer with the same q/o projections, "
    "one K/V projection, the same RoPE and GQA, causal SDPA on backend X; parameters and input in the record's "
    "dtype, B=1; ms: median (harness Timer); fwd: training forward; fwd+bwd: forward + backward of the output, "
    "gradients reset to None between calls; speedup: full-layer ms / this ms, same T and pass; mem_mib (CUDA): "
    "peak allocated during one call minus allocated before it; breakdown: CUDA kernel time of one profiled call "
    "(torch.profiler) split into attention (nsa.ops Triton kernels, SDPA kernels), gemm (cuBLAS/cutlass/nvjet/xmma) "
    "and other; null on CPU"
)


# ---------------------------------------------------------------------------------------------
# The baseline layer
# ---------------------------------------------------------------------------------------------
class FullAttentionLayer(nn.Module):
    """Full causal attention with the projections of :class:`nsa.layer.NativeSparseAttention`.

    Parameters: ``q_proj`` (hidden -> HQ*Dk), ``kv_proj`` (hidden -> ``[H*Dk | H*Dv]``),
    ``o_proj`` (HQ*Dv -> hidden), biased as ``config.bias``. Queries and keys are rotated by
    :func:`nsa.layer.apply_rope` at their positions ``0..T-1`` on ``config.backend``, as the NSA
    layer rotates them.

    Args:
        config: an :class:`nsa.layer.NSAConfig` (sizes, ``rope_theta``, ``bias``, ``backend``;
            NSA's own settings are unused).
        sdpa: SDPA backend forced on every call (``'cudnn'``, ``'flash'``, ``'efficient'``),
            or None (torch chooses); ``'math'`` computes the attention in plain PyTorch in the
            input's dtype (softmax of masked scores: the check's reference).
    """

    def __init__(self, config, sdpa: str | None = None):
        super().__init__()
        if sdpa not in (None, "math") + tuple(_SDPA_BACKENDS):
            raise ValueError(f"sdpa: expected None, 'math' or one of {tuple(_SDPA_BACKENDS)}, got {sdpa!r}")
        c = self.config = config
        self.sdpa = sdpa
        H, Dk, Dv = c.num_kv_heads, c.head_dim, c.v_head_dim
        self.q_proj = nn.Linear(c.hidden_size, c.num_heads * Dk, bias=c.bias)
        self.kv_proj = nn.Linear(c.hidden_size, H * (Dk + Dv), bias=c.bias)
        self.o_proj = nn.Linear(c.num_heads * Dv, c.hidden_size, bias=c.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, T, hidden]`` -> ``[B, T, hidden]``, causal over the T positions."""
        c = self.config
        B, T, _ = x.shape
        H, Dk, Dv = c.num_kv_heads, c.head_dim, c.v_head_dim
        positions = torch.arange(T, device=x.device).unsqueeze(0)
        q = apply_rope(self.q_proj(x).view(B, T, c.num_heads, Dk), positions, c.rope_theta, backend=c.backend)
        k, v = self.kv_proj(x).split([H * Dk, H * Dv], dim=-1)
        k = apply_rope(k.view(B, T, H, Dk), positions, c.rope_theta, backend=c.backend)
        o = self._attend(q.transpose(1, 2), k.transpose(1, 2), v.view(B, T, H, Dv).transpose(1, 2))
        return self.o_proj(o.transpose(1, 2).reshape(B, T, c.num_heads * Dv))

    def _attend(self, q, k, v):
        """``[B, HQ, T, Dk]``, ``[B, H, T, Dk]``, ``[B, H, T, Dv]`` -> ``[B, HQ, T, Dv]``."""
        gqa = q.shape[1] != k.shape[1]
        if self.sdpa == "math":
            G = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
            s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
            T = q.shape[-2]
            causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
            return s.masked_fill(~causal, float("-inf")).softmax(-1) @ v
        if self.sdpa is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(getattr(SDPBackend, _SDPA_BACKENDS[self.sdpa])):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)


def pick_sdpa(config, device: torch.device, dtype: torch.dtype) -> tuple[str | None, str]:
    """The SDPA backend of the full layer: on CUDA the first of :data:`SDPA_ORDER` whose forward
    and backward run at ``config``'s head dims in ``dtype``; None (torch's choice) on CPU.
    Returns (backend, note: the backends refused and why)."""
    if device.type != "cuda":
        return None, ""
    refused = []
    x = torch.randn(1, 128, config.hidden_size, device=device, dtype=dtype, requires_grad=True)
    for name in SDPA_ORDER:
        layer = FullAttentionLayer(config, name).to(device, dtype)
        try:
            with warnings.catch_warnings():  # SDPA warns why each backend refuses; the note says it once
                warnings.simplefilter("ignore")
                layer(x).sum().backward()
            return name, "; ".join(refused)
        except RuntimeError as e:
            msg = str(e).strip().splitlines()
            refused.append(f"{name} refused: {msg[0][:100] if msg else type(e).__name__}")
    raise RuntimeError("no SDPA backend runs this layer: " + "; ".join(refused))


# ---------------------------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------------------------
def _grads_of(layer, x, dy):
    layer.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    out = layer(x)
    out.backward(dy)
    return out, x.grad, {n: p.grad for n, p in layer.named_parameters()}


def _compare_layers(test, ref, x, dy, tol) -> str:
    """'ok', or every output / gradient whose relative error exceeds tol."""
    from .harness import _compare

    out, gx, gp = _grads_of(test, x.to(next(test.parameters()).dtype), dy.to(next(test.parameters()).dtype))
    r_out, r_gx, r_gp = _grads_of(ref, x, dy)
    bad = [_compare("output", r_out, out, tol), _compare("grad x", r_gx, gx, tol)]
    bad += [_compare(f"grad {n}", r_gp[n], gp[n], tol) for n in r_gp]
    bad = [b for b in bad if b]
    return "ok" if not bad else "; ".join(bad)


def check_nsa(config, backend: str, device: torch.device, T: int) -> str:
    """The NSA layer on ``backend`` against the reference backend, float32, one length-T sequence:
    output and every gradient (input and parameters), relative error <= 2e-2. 'ok' or what differs.

    With the paper's settings up to T = 1024 every causal block is selected, so the top-n has one
    answer and summation-order differences cannot flip a near-tie (as in tests/gpu/test_layer_gpu.py);
    the top-n itself is checked by the op benchmark."""
    torch.manual_seed(0)
    fast = NativeSparseAttention(config.replace(backend=backend)).to(device, torch.float32)
    ref = NativeSparseAttention(config.replace(backend="reference")).to(device, torch.float32)
    ref.load_state_dict(fast.state_dict())
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, T, config.hidden_size, generator=g).to(device)
    dy = torch.randn(1, T, config.hidden_size, generator=g).to(device)
    return _compare_layers(fast, ref, x, dy, CHECK_TOL)


def check_full(config, sdpa: str | None, device: torch.device, dtype: torch.dtype, T: int) -> str:
    """The full layer (``sdpa`` backend, ``dtype``) against its weights in float32 with the attention
    written out: output and every gradient within :data:`FULL_CHECK_SLACK` times the op benchmark's
    tolerance for ``dtype`` (bf16: 5e-2)."""
    from .harness import DTYPES, TOLERANCE

    tol = FULL_CHECK_SLACK * TOLERANCE[{v: k for k, v in DTYPES.items()}[dtype]]
    torch.manual_seed(0)
    test = FullAttentionLayer(config, sdpa).to(device, dtype)
    ref = FullAttentionLayer(config.replace(backend="reference"), "math").to(device, torch.float32)
    ref.load_state_dict({k: v.float() for k, v in test.state_dict().items()})
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, T, config.hidden_size, generator=g).to(device)
    dy = torch.randn(1, T, config.hidden_size, generator=g).to(device)
    # Compare against the rounded input the test layer sees.
    x, dy = x.to(dtype).float(), dy.to(dtype).float()
    return _compare_layers(test, ref, x, dy, tol)


# ---------------------------------------------------------------------------------------------
# Kernel breakdown
# ---------------------------------------------------------------------------------------------
# In the full layer cuDNN runs only the attention.
_SDPA_KERNEL = re.compile(r"flash|fmha|sdpa|cudnn|attention|attn", re.IGNORECASE)
_GEMM_KERNEL = re.compile(r"gemm|gemv|nvjet|cutlass|xmma|cublas|splitkreduce", re.IGNORECASE)


# The op families of nsa.ops whose Triton kernels are NSA's attention (the gates' combination
# and the block-index validation run inside the op). A Triton kernel of nsa.ops outside them
# (a RoPE or projection pass, say) is layer glue: 'other', or 'gemm' by its name.
ATTENTION_FAMILIES = ("compressed_", "selection_", "selected_", "window_", "gate_", "decode_", "block_indices_")


@functools.lru_cache(maxsize=1)
def nsa_kernel_names() -> frozenset:
    """Names of the ``@triton.jit`` kernels (``*_kernel``) defined in :mod:`nsa.ops`, read from the
    sources (no Triton import needed): the names the profiler gives them."""
    import nsa.ops

    jit = re.compile(r"^@triton\.jit\b[^\n]*\n(?:@[^\n]*\n)*def (\w+_kernel)\(", re.MULTILINE)
    names = set()
    for path in Path(nsa.ops.__file__).parent.glob("*.py"):
        names.update(jit.findall(path.read_text()))
    return frozenset(names)


def classify_kernel(name: str) -> str:
    """'attention', 'gemm' or 'other' for a CUDA kernel name: attention for the NSA kernels of
    :data:`ATTENTION_FAMILIES` and for SDPA's (cuDNN, flash, fmha) kernels; gemm for cuBLAS,
    cutlass, nvjet and xmma kernels; other for the rest (elementwise, copies, cats, reductions)."""
    # Triton < 3 appended a signature suffix (``_0d1d2d``) to the function name.
    base = re.sub(r"_\d+d[\dcde]*$", "", name)
    if (base in nsa_kernel_names() and base.startswith(ATTENTION_FAMILIES)) or _SDPA_KERNEL.search(name):
        return "attention"
    if _GEMM_KERNEL.search(name):
        return "gemm"
    return "other"


def split_kernels(events) -> dict | None:
    """Kernel time of ``events`` (``(name, microseconds)`` pairs) by class: ``kernel_ms``,
    ``attention_ms``, ``gemm_ms``, ``other_ms``, their ``*_share`` of ``kernel_ms``, and
    ``kernels``: the :data:`TOP_KERNELS` longest kernels by total time (name, class, calls, ms).
    None when there are no events."""
    total = collections.defaultdict(float)
    calls = collections.Counter()
    for name, us in events:
        total[name] += us / 1e3
        calls[name] += 1
    if not total:
        return None
    out = {"kernel_ms": sum(total.values())}
    by_class = collections.defaultdict(float)
    for name, ms in total.items():
        by_class[classify_kernel(name)] += ms
    for cls in ("attention", "gemm", "other"):
        out[f"{cls}_ms"] = by_class[cls]
        out[f"{cls}_share"] = by_class[cls] / out["kernel_ms"] if out["kernel_ms"] > 0 else None
    top = sorted(total, key=total.get, reverse=True)[:TOP_KERNELS]
    out["kernels"] = [{"name": n, "class": classify_kernel(n), "calls": calls[n], "ms": total[n]} for n in top]
    return out


def device_events(events, device_type) -> list[tuple[str, float]]:
    """``(name, microseconds)`` of the profiler events that ran on ``device_type`` (a
    ``torch.autograd.DeviceType``): for CUDA, every kernel, memcpy and memset."""
    return [(e.name, e.time_range.elapsed_us()) for e in events if e.device_type == device_type]


def profile_kernels(fn, device: torch.device, grads=()) -> dict | None:
    """:func:`split_kernels` of the CUDA kernels of one call of ``fn`` under torch.profiler (grads
    reset to None first, as between timed calls); None where the profiler saw no kernel."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    for t in grads:
        t.grad = None
    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize(device)
    return split_kernels(device_events(prof.events(), DeviceType.CUDA))


# ---------------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------------
def _record(case, impl, pass_, backend):
    """An unmeasured record: the op benchmark's fields (:data:`nsa.bench.harness.FIELDS`), the
    breakdown and the targets it speaks to."""
    from .harness import FIELDS

    rec = dict.fromkeys(FIELDS)
    rec.update({"case": case.name, "impl": impl, "pass": pass_, "T": case.T, "B": case.B, "HQ": case.HQ,
                "H": case.H, "D": case.Dk, "Dv": case.Dv, "dtype": case.dtype,
                "backend": backend if impl == "nsa" else None, "note": "", "breakdown": None, "targets": None})
    return rec


def _timed(layer, case, pass_, device, timer, profile) -> dict:
    """ms, mem_mib and breakdown of one layer and pass; its tensors die with this frame."""
    g = torch.Generator(device=device).manual_seed(case.T)
    dt = case.torch_dtype
    x = torch.randn(case.B, case.T, layer.config.hidden_size, generator=g, device=device, dtype=dt)
    x.requires_grad_(True)
    grads = [x] + list(layer.parameters())
    if pass_ == "fwd":
        def fn():
            return layer(x)
    else:
        dy = torch.randn(x.shape, generator=g, device=device, dtype=dt)

        def fn():
            layer(x).backward(dy)
    ms, mem = timer(fn, grads)
    out = dict(ms=ms, mem_mib=mem, ok=True)
    if profile and device.type == "cuda":
        out["breakdown"] = profile_kernels(fn, device, grads)
        if out["breakdown"] is None:
            out["note"] = "breakdown n/a: the profiler recorded no CUDA kernel"
    return out


def measure(layer, case, impl, pass_, device, timer, profile=True, backend=None) -> dict:
    """Time one layer (``impl``: 'nsa' or the full layer's name) on one length-T input of ``case``
    (see the module docstring) into a record; out of memory and errors become its note."""
    from . import _Terminated
    from .harness import _free, _one_line

    rec = _record(case, impl, pass_, backend)
    try:
        rec.update(_timed(layer, case, pass_, device, timer, profile))
    except torch.OutOfMemoryError:
        rec["note"] = "n/a: out of memory"
    except _Terminated:
        raise
    except Exception as e:
        rec["ok"] = False if impl == "nsa" else None
        rec["note"] = f"error: {_one_line(e)}"
    finally:
        layer.zero_grad(set_to_none=True)
        _free(device)
    return rec


def add_targets(records) -> list[dict]:
    """Set ``targets`` on each NSA forward+backward record at a length with a target of issue 22
    (:data:`TARGETS`, :data:`OTHER_SHARE_TARGET`): what, the target, the measured value and
    whether it is met (None: not measured). Returns all of them, in record order."""
    out = []
    for r in records:
        if r["impl"] != "nsa" or r["pass"] != "fwd+bwd":
            continue
        dims = f"{r['D']}/{r['Dv']}"
        mine = []
        if r["T"] in TARGETS:
            want, got = TARGETS[r["T"]], r["speedup"]
            mine.append(dict(dims=dims, T=r["T"], what="fwd+bwd speedup", target=f">= {want}x", measured=got,
                             met=None if got is None else got >= want))
        if r["T"] == OTHER_SHARE_TARGET[0]:
            want = OTHER_SHARE_TARGET[1]
            got = r["breakdown"]["other_share"] if r["breakdown"] else None
            mine.append(dict(dims=dims, T=r["T"], what="other share of NSA kernel time", target=f"<= {want:.0%}",
                             measured=got, met=None if got is None else got <= want))
        r["targets"] = mine or None
        out += mine
    return out


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------
def _tk(t):
    return f"{t // K}k" if t % K == 0 else str(t)


def _ms(v):
    return "-" if v is None else (f"{v:.3f}" if v < 10 else f"{v:.1f}")


def _split(b):
    if not b:
        return "-"
    return f"{_ms(b['attention_ms'])} / {_ms(b['gemm_ms'])} / {_ms(b['other_ms'])} ({b['other_share']:.0%})"


TABLE_HEAD = (f"{'Dk/Dv':>7} {'T':>5} {'pass':>7} {'NSA ms':>9} {'full ms':>9} {'ratio':>7}  "
              f"{'NSA kernels attn / GEMM / other ms (other %)':>44}  "
              f"{'full kernels attn / GEMM / other ms':>44}  note")


def format_row(nsa, full) -> str:
    """One table line: the NSA and full records of one head-dim pair, T and pass."""
    def cell(r):
        if r["ms"] is not None:
            return _ms(r["ms"])
        return "FAIL" if r["ok"] is False else "n/a"

    ratio = f"{nsa['speedup']:.2f}x" if nsa["speedup"] is not None else "-"
    notes = [f"{tag}: {r['note']}" for tag, r in (("nsa", nsa), (full["impl"], full)) if r["note"]]
    return (f"{nsa['D']:>3}/{nsa['Dv']:<3} {_tk(nsa['T']):>5} {nsa['pass']:>7} {cell(nsa):>9} {cell(full):>9} "
            f"{ratio:>7}  {_split(nsa['breakdown']):>44}  {_split(full['breakdown']):>44}  {'; '.join(notes)}")


def format_targets(lines) -> str:
    out = ["targets (issue 22, set for an H200 with committed runs):"]
    for t in lines:
        v = t["measured"]
        got = "-" if v is None else (f"{v:.2f}x" if "speedup" in t["what"] else f"{v:.1%}")
        verdict = {True: "met", False: "MISSED", None: "not measured"}[t["met"]]
        out.append(f"  {t['dims']:>7} {_tk(t['T']):>4}  {t['what']:<31} {got:>7}  target {t['target']:<8} {verdict}")
    if len(out) == 1:
        out.append("  none of the measured lengths has a target (8k, 16k, 64k forward+backward)")
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------
def _parser():
    from . import _int_list, _pairs

    p = argparse.ArgumentParser(
        prog="nsa bench --preset layer",
        description="The NativeSparseAttention layer against a full-attention layer with the same projections and "
                    "RoPE (SDPA: cuDNN on CUDA), forward and forward+backward, with the CUDA kernel time split into "
                    "attention / GEMM / other. Checks both layers before timing.")
    p.add_argument("--preset", choices=("layer",), default="layer", help="this benchmark")
    p.add_argument("--config", choices=("paper", "small", "tiny"), default=None,
                   help="NSAConfig preset: sizes and NSA settings (default: paper on CUDA, tiny on CPU)")
    p.add_argument("--T", type=_int_list, default=None,
                   help="sequence lengths, e.g. 8k,64k (default on CUDA 4k,8k,16k,32k,64k,128k; on CPU 64,128)")
    p.add_argument("--dims", type=_pairs("x"), default=None,
                   help="head dims Dk x Dv, e.g. 192x128,128x128 (default: both of the paper for --config paper, "
                        "else the config's own)")
    add_dtype_option(p, None, "parameters and input (default bf16 on CUDA, fp32 on CPU)",
                     allowed=("bf16", "fp16", "fp32"))
    add_device_option(p)
    p.add_argument("--backend", choices=("auto", "reference", "torch", "triton"), default=None,
                   help="NSA backend of the layer (default: $NSA_BACKEND if set, else auto: Triton on CUDA, "
                        "torch on CPU)")
    p.add_argument("--reps", type=int, default=5,
                   help="timed repetitions: CPU wall-clock reps; on CUDA at least this many (default 5)")
    p.add_argument("--check-T", type=int, default=None,
                   help="length of the correctness checks (default 1024 on CUDA, 64 on CPU; 0 skips them)")
    p.add_argument("--profile", action=argparse.BooleanOptionalAction, default=True,
                   help="CUDA kernel breakdown from one profiled call per measurement (default: on)")
    p.add_argument("--json", metavar="PATH", help="write the header and records as JSON (format nsa-bench/1)")
    p.add_argument("--plot", metavar="PATH", help="write a PNG: time vs T and speedup vs T")
    p.add_argument("--no-progress", action="store_true",
                   help="accepted for scripts/gpu_run.sh; this preset prints one line per measurement, no bar")
    return p


def _guarded(fn, *args):
    """``fn(*args)``, or ``'error: ...'`` when it raises: a check that cannot run fails its
    layer (not timed), and the run goes on."""
    from . import _Terminated
    from .harness import _one_line

    try:
        return fn(*args)
    except _Terminated:
        raise
    except Exception as e:
        return f"error: {_one_line(e)}"


def run(configs, lengths, device, dtype: str, backend: str, reps: int, check_T: int, profile: bool, checks: dict,
        log) -> bool:
    """Check, then time, both layers for every config (head dims) and length; prints the table.

    Args:
        configs: :class:`NSAConfig` per head-dim pair; lengths: T values; dtype: 'bf16' | 'fp16' |
            'fp32'; backend: the NSA layer's; reps: :class:`nsa.bench.harness.Timer` reps;
            check_T: length of the checks (0 skips them); profile: the CUDA kernel breakdown.
        checks: filled with the checks' verdicts per ``'DkxDv'``; log: called with each record
            as soon as it is complete (speedups are set on the NSA record when both are done).
    Returns:
        True when a check failed or an NSA measurement raised.
    """
    from . import harness

    device = torch.device(device)
    dt = harness.DTYPES[dtype]
    timer = harness.Timer(device, reps)
    failed = False
    for cfg in configs:
        Dk, Dv = cfg.head_dim, cfg.v_head_dim
        nsa_check = _guarded(check_nsa, cfg, backend, device, check_T) if check_T else "skipped"
        picked = _guarded(pick_sdpa, cfg, device, dt)
        sdpa, sdpa_note = picked if isinstance(picked, tuple) else (None, "")
        if not isinstance(picked, tuple):
            full_check = picked
        else:
            full_check = _guarded(check_full, cfg, sdpa, device, dt, check_T) if check_T else "skipped"
        impl_full = f"sdpa.{sdpa or ('cpu' if device.type == 'cpu' else 'default')}"
        checks[f"{Dk}x{Dv}"] = dict(T=check_T, nsa=nsa_check, full=full_check, sdpa=impl_full, sdpa_note=sdpa_note)
        print(f"D {Dk}/{Dv}: check (T={check_T}) NSA layer, {backend} vs reference (fp32): {nsa_check}; "
              f"full layer, {impl_full} ({dtype}) vs float32 math: {full_check}"
              + (f" [{sdpa_note}]" if sdpa_note else ""), flush=True)
        verdicts = {"nsa": nsa_check, impl_full: full_check}
        failed |= any(v not in ("ok", "skipped") for v in verdicts.values())
        torch.manual_seed(0)
        layers = {"nsa": NativeSparseAttention(cfg).to(device, dt),
                  impl_full: FullAttentionLayer(cfg, sdpa).to(device, dt)}
        print(TABLE_HEAD, flush=True)
        for T in lengths:
            case = harness.Case("layer", "train", T, 1, cfg.num_heads, cfg.num_kv_heads, Dk, Dv, dtype,
                                kernel_size=cfg.kernel_size, stride=cfg.stride, block_size=cfg.block_size,
                                num_selected=cfg.num_selected, num_initial=cfg.num_initial,
                                num_local=cfg.num_local, window_size=cfg.window_size)
            for pass_ in PASSES:
                pair = []
                for impl, layer in layers.items():
                    if verdicts[impl] not in ("ok", "skipped"):
                        rec = _record(case, impl, pass_, backend)
                        rec.update(ok=False, note=f"not timed: check failed ({verdicts[impl]})")
                    else:
                        rec = measure(layer, case, impl, pass_, device, timer, profile, backend)
                    failed |= rec["ok"] is False
                    pair.append(rec)
                harness.add_speedups(pair)
                for rec in pair:
                    log(rec)
                print(format_row(*pair), flush=True)
        del layers
    return failed


def cli_main(argv=None) -> int:
    """Entry point of ``nsa bench --preset layer``. Returns 0, 1 when a check failed or a
    measurement raised, 2 on bad input (nothing run)."""
    from . import _terminate, _Terminated, report

    raw = sys.argv[1:] if argv is None else list(argv)
    args = _parser().parse_args(raw)
    if args.reps < 1:
        return report.bad_argument("--reps must be >= 1")
    if args.check_T is not None and args.check_T < 0:
        return report.bad_argument("--check-T must be >= 0")
    device, status = report.device_for(args)
    if device is None:
        return status
    cuda = device.type == "cuda"
    name = args.config or ("paper" if cuda else "tiny")
    base = NSAConfig.preset(name)
    dims = args.dims or ([(192, 128), (128, 128)] if name == "paper" else [(base.head_dim, base.v_head_dim)])
    dtype_name = args.dtype or ("bf16" if cuda else "fp32")
    lengths = args.T or ([4 * K, 8 * K, 16 * K, 32 * K, 64 * K, 128 * K] if cuda else [64, 128])
    check_T = args.check_T if args.check_T is not None else (1024 if cuda else 64)
    backend = args.backend or os.environ.get("NSA_BACKEND") or "auto"
    if backend not in ("auto", "reference", "torch", "triton"):
        return report.bad_argument(f"$NSA_BACKEND: expected auto, reference, torch or triton, got {backend!r}")
    try:
        configs = [base.replace(head_dim=dk, v_head_dim=dv, backend=backend) for dk, dv in dims]
    except ValueError as e:
        return report.bad_argument(f"--dims: {e}")

    head = report.header(device, "layer", backend, raw)
    head.update(conventions=CONVENTIONS, config=name, dtype=dtype_name, lengths=lengths, dims=dims,
                settings={k: v for k, v in dataclasses.asdict(base).items()
                          if k not in ("head_dim", "v_head_dim", "backend")},
                breakdown="torch.profiler CUDA kernels" if cuda and args.profile else
                ("off (--no-profile)" if cuda else "unavailable on CPU: no CUDA kernels to split"),
                checks={})
    print(report.format_header(head), flush=True)
    print(f"layer: {name} (hidden {base.hidden_size}, {base.num_heads} query / {base.num_kv_heads} KV heads), "
          f"{dtype_name}, B=1; breakdown: {head['breakdown']}", flush=True)
    records: list[dict] = []
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        failed = run(configs, lengths, device, dtype_name, backend, args.reps, check_T, args.profile, head["checks"],
                     records.append)
    except _Terminated:
        print(f"nsa bench: terminated; writing the {len(records)} measurements made so far", file=sys.stderr)
        failed = any(r["ok"] is False for r in records) or any(
            c[k] not in ("ok", "skipped") for c in head["checks"].values() for k in ("nsa", "full"))
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(format_targets(add_targets(records)), flush=True)
    report.write_outputs(head, records, args.json, args.plot)
    if failed:
        print("nsa bench: a check failed or a measurement raised (see the notes)", file=sys.stderr)
    return 1 if failed else 0
