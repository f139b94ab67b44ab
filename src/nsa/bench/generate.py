"""``nsa bench --preset generate``: end-to-end generation throughput of :class:`nsa.model.LanguageModel`,
``attention='nsa'`` against ``'full'``, same model preset and random seeded weights, in one process.

Per attention, prompt length T and batch size B, the model's own generation path
(:meth:`~nsa.model.LanguageModel.stream_generate`, greedy, no end-of-sequence token, so a fixed
number of steps): B random prompts of T tokens are prefilled, packed, into a fresh cache, then
one token per sequence is decoded per step. Measured:

- ``prefill``: from the call of ``stream_generate`` to its first token — input checks, packing,
  the prefill forward that fills the cache, the first greedy token. One measurement (a second
  prefill of 16 x 128k tokens would double the run).
- ``decode``: each later step (the model's step on the new tokens ``[B]`` and the argmax) is
  timed alone; the first ``--warmup`` steps are left out, then ``--new-tokens`` steps are timed.
  ``ms`` is the **median** step (``mean_ms`` = total / steps is recorded too); generated tokens/s
  = B / median step. On CUDA the steps are replayed from a CUDA graph (``--cuda-graph``, default
  on): the first step runs eagerly, the second is captured (both inside the default two warm-up
  steps), every later one is a replay, except that a step which completes a compression block
  (NSA: 1 in ``stride`` steps of a sequence) is a second graph, eager the first time and captured
  the second time, which may fall among the timed steps (two slow steps: the median is unmoved,
  ``mean_ms`` includes them); ``--cuda-graph off`` times eager steps, bounded by their
  host launch work. ``--cache paged``: the NSA model decodes from a :class:`nsa.PagedNSACache`
  (``generate(paged=True)``, checked the same way) instead of the dense cache.

Before the timed run of each case, one warm-up ``stream_generate`` call with the same B on prompts
of W tokens, W = T below 2k, else 1k + (T mod 1k): W and T agree modulo 1024, so every Triton
kernel is compiled at the integer specialisations the timed run uses, without a second long
prefill. Timing: CUDA events recorded between the generator's yields (the stream's timeline, idle
gaps included: what a caller waits), ``time.perf_counter`` on CPU. Peak memory:
``torch.cuda.max_memory_allocated`` over the timed run (weights of both models, cache and
activations; the prefill's activations usually set it); none on CPU.

Precision: on CUDA both models are cast to bf16 (parameters, activations, cache; not autocast: a
generation-only model needs no float32 master weights); float32 on CPU.

Check first (``--check-T``: 1024 on CUDA, 128 on CPU; 0 skips it): each model in float32, before
the cast, on two prompts of ``check_T`` and ``check_T - stride - 3`` tokens, for ``2 * stride``
steps (so that decoding completes compression blocks):
:meth:`~nsa.model.LanguageModel.generate` (packed prefill, cached steps) against an uncached greedy
loop, ``model(whole sequence so far)`` at each step. Its logits (read by a hook on the LM head)
must equal the uncached ones within :data:`CHECK_TOL` (relative), and its token the uncached argmax
except at a near-tie (within :data:`TIE`). Logits, not only tokens: at random initialisation the
tied embeddings make greedy decoding repeat the last token whatever the cache holds. On CUDA the
longer prompt has 1024 tokens, where the base model selects every block, and decoding then selects
among 17: a near-tie of block scores can flip between the paths only in the few decoding steps.
The check's generate runs its steps eagerly (a hook does not run in a graph replay); on CUDA the
same generation replayed from a CUDA graph must then give the same tokens.
A model that fails is not timed (``ok: false``), exit status 1.

The full-attention baseline is the model's own: SDPA for the prefill (one call per packed
prompt), :meth:`nsa.cache.KVCache.attend` for decoding: on CUDA FlashAttention-2's
variable-length kernel (PyTorch's ``aten._flash_attention_forward``) over the static cache in
place, prompt + new tokens of capacity, each sequence's own length used (``seqused_k``: the shapes
a CUDA graph replays), splitting the keys over several programs when the batch alone cannot fill
the GPU (flash-decoding); on CPU SDPA with a length mask. Records: ``impl`` ``nsa`` / ``full``;
history.py takes ``full`` as this preset's baseline; the ``speedup`` here is on the NSA records.
"""

from __future__ import annotations

import argparse
import gc
import os
import signal
import statistics
import sys
import time

import torch

from .._cli_utils import add_device_option

__all__ = ["cli_main", "run", "build_models", "check_generate", "measure_generate", "warmup_length", "KINDS",
           "PASSES", "CHECK_TOL", "TIE"]

K = 1024
KINDS = ("nsa", "full")
PASSES = ("prefill", "decode")
# The check, in float32: cached logits against uncached ones (max abs difference / max abs logit).
# The two paths differ by ~5e-7 on CPU (the GPU's kernels and GEMMs reduce in other orders, over
# 12 layers for base); a step whose newest cached key is zeroed, by 1e-3 ...
CHECK_TOL = 3e-4
# ... and the largest gap of the uncached logits between their argmax and generate's token that
# still counts as a near-tie.
TIE = 1e-3

CONVENTIONS = (
    "impl nsa / full: nsa.model.LanguageModel with attention='nsa' / 'full' (SDPA prefill; decode: nsa_decode / "
    "KVCache.attend: FlashAttention-2 varlen over the static cache with seqused_k, split-KV), the same preset "
    "and shared non-attention weights; LanguageModel.stream_generate, greedy, B prompts of T random tokens "
    "packed, decoding steps replayed from a CUDA graph on CUDA (header cuda_graph; the first two steps, eager and "
    "captured, are warm-up; a step completing a compression block is a second graph, eager and captured the "
    "first two times it occurs, possibly among the timed steps); "
    "prefill ms: from the call to the "
    "first token (one measurement); decode ms: median of the timed steps (after the warm-up steps; mean_ms = "
    "total / steps), one step = one token per sequence; tokens_per_s: B / decode ms (decode), B*T / prefill ms "
    "(prefill); speedup (nsa): full ms / nsa ms of the same T, B and pass (= tokens/s ratio); mem_mib, peak_gib "
    "(CUDA): max_memory_allocated over the timed prefill and decode (both models' weights included); CUDA: "
    "parameters, activations and cache in bf16, CUDA events; CPU: float32, perf_counter"
)


# ---------------------------------------------------------------------------------------------
# Models, prompts, the check
# ---------------------------------------------------------------------------------------------
def build_models(name: str, device: torch.device) -> dict:
    """``{'nsa': model, 'full': model}``: preset ``name`` with each attention, float32, seeded; the
    full model takes the NSA model's weights wherever they share a parameter (all but attention's)."""
    from ..model import LanguageModel, ModelConfig

    out = {}
    for kind in KINDS:
        torch.manual_seed(0)
        out[kind] = LanguageModel(ModelConfig.preset(name, attention=kind)).to(device).eval()
    shared = {k: v for k, v in out["nsa"].state_dict().items() if ".attn." not in k}
    out["full"].load_state_dict(shared, strict=False)
    return out


def _prompts(B: int, T: int, vocab: int, seed: int, device) -> torch.Tensor:
    """``[B, T]`` int64 random token ids on ``device``."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (B, T), generator=g).to(device)


@torch.no_grad()
def check_generate(model, T: int, steps: int, device, paged: bool = False) -> str:
    """``model.generate`` (cached, eager steps) against an uncached greedy loop, on two prompts of
    ``T`` and ``T - stride - 3`` tokens, ``steps`` steps: at every step the logits generate
    computed (read by a hook on the LM head) against those of ``model(whole sequence so far)``,
    relative error <= :data:`CHECK_TOL`, and generate's token equal to the uncached argmax unless
    the two are a near-tie (uncached logits within :data:`TIE`; the loop follows generate's
    tokens). On CUDA, generate with the step replayed from a CUDA graph must then give the eager
    tokens exactly. ``paged``: generate decodes from a PagedNSACache. Returns ``'ok'`` (with the
    number of near-ties, if any) or what differs."""
    c = model.config
    lens = [T, max(1, T - c.stride - 3)]
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, c.vocab_size, (n,), generator=g).to(device) for n in lens]
    seen = []
    hook = model.lm_head.register_forward_hook(lambda mod, inp, out: seen.append(out.float()))
    try:  # eagerly: a step replayed from a CUDA graph runs no hook
        tokens = model.generate(prompts, steps, temperature=0.0, cuda_graph=False, paged=paged)
    finally:
        hook.remove()
    if len(seen) != steps or any(t.numel() != steps for t in tokens):
        return f"generate made {len(seen)} forward calls and {[t.numel() for t in tokens]} tokens, expected {steps}"
    if device.type == "cuda":
        graphed = model.generate(prompts, steps, temperature=0.0, cuda_graph=True, paged=paged)
        for i, (a, b) in enumerate(zip(tokens, graphed)):
            if not torch.equal(a, b):
                s = int((a != b).nonzero()[0])
                return f"prompt {i} (T={lens[i]}) step {s}: the CUDA-graph step's token {int(b[s])}, eager {int(a[s])}"
    ties, worst = 0, 0.0
    for i, (prompt, got) in enumerate(zip(prompts, tokens)):
        seq = prompt
        for s in range(steps):
            cached = seen[s][i] if s == 0 else seen[s][i, 0]
            logits = model(seq.unsqueeze(0)).logits[0, -1].float()
            err = float((cached - logits).abs().max() / logits.abs().max().clamp(min=1e-30))
            worst = max(worst, err)
            where = f"prompt {i} (T={lens[i]}) step {s}"
            if err > CHECK_TOL:
                return f"{where}: cached logits differ from uncached, relative error {err:.2e}"
            want, tok = int(logits.argmax()), int(got[s])
            if tok != want:
                gap = float(logits[want] - logits[tok])
                if gap > TIE:
                    return f"{where}: cached token {tok}, uncached {want} (logit gap {gap:.2e})"
                ties += 1
            seq = torch.cat([seq, got[s:s + 1]])
    return f"ok (logits: max relative error {worst:.1e}" + (f"; {ties} near-tie(s) within {TIE:g})" if ties else ")")


def warmup_length(T: int) -> int:
    """Prompt length of the warm-up call: T below 2k, else 1k + (T mod 1k) (agrees with T modulo 1024)."""
    return T if T < 2 * K else K + T % K


# ---------------------------------------------------------------------------------------------
# Measurement
# ---------------------------------------------------------------------------------------------
class _Marks:
    """Time stamps between the generator's yields: CUDA events on the current stream, or perf_counter."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"
        self.marks = []

    def mark(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            self.marks.append(e)
        else:
            self.marks.append(time.perf_counter())

    def intervals_ms(self) -> list[float]:
        if self.cuda:
            if self.marks:
                self.marks[-1].synchronize()
            return [a.elapsed_time(b) for a, b in zip(self.marks, self.marks[1:])]
        return [(b - a) * 1e3 for a, b in zip(self.marks, self.marks[1:])]


def measure_generate(model, B: int, T: int, new_tokens: int, warmup: int, device, cuda_graph=None,
                     paged=False) -> dict:
    """Warm up, then time one greedy generation of ``warmup + new_tokens`` decoding steps after
    the prefill of B random length-T prompts (see the module docstring).

    Returns ``prefill_ms``, ``decode_ms`` (median of the timed steps), ``decode_mean_ms``,
    ``steps`` (timed), ``peak_gib`` (CUDA, else None) and ``note``; on out of memory the part not
    measured is None and ``note`` says where it ran out."""
    cuda = device.type == "cuda"
    V = model.config.vocab_size
    W = warmup_length(T)
    for _ in model.stream_generate(_prompts(B, W, V, seed=W, device=device), warmup + 1, temperature=0.0,
                                   cuda_graph=cuda_graph, paged=paged):
        pass
    prompts = _prompts(B, T, V, seed=T * 131 + B, device=device)
    gc.collect()
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    marks = _Marks(device)
    note = ""
    gen = model.stream_generate(prompts, warmup + new_tokens + 1, temperature=0.0, cuda_graph=cuda_graph,
                                paged=paged)
    try:
        marks.mark()
        for _ in gen:
            marks.mark()
    except torch.OutOfMemoryError:
        note = "n/a: out of memory in the " + ("prefill" if len(marks.marks) < 2 else "decoding steps")
    finally:
        gen.close()
    del gen, prompts
    times = marks.intervals_ms()
    peak = torch.cuda.max_memory_allocated(device) / 2 ** 30 if cuda else None
    steps = times[1 + warmup:]
    complete = len(steps) == new_tokens
    return dict(prefill_ms=times[0] if times else None,
                decode_ms=statistics.median(steps) if complete else None,
                decode_mean_ms=sum(steps) / len(steps) if complete else None,
                steps=len(steps) if complete else 0, peak_gib=peak, note=note)


def _free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _case_name(model_name, cfg, T, B):
    from .report import _tk

    return f"generate/{model_name}/T{_tk(T)}/B{B}/HQ{cfg.num_heads}H{cfg.num_kv_heads}/D{cfg.head_dim}x{cfg.head_dim}"


def _records(model_name, cfg, kind, T, B, dtype, backend, m) -> list[dict]:
    """The prefill and decode records of one measurement ``m`` (see :func:`measure_generate`)."""
    from .harness import FIELDS

    out = []
    for pass_ in PASSES:
        r = dict.fromkeys(FIELDS)
        ms = m.get("prefill_ms") if pass_ == "prefill" else m.get("decode_ms")
        tokens = B * T if pass_ == "prefill" else B
        r.update({"case": _case_name(model_name, cfg, T, B), "impl": kind, "pass": pass_, "T": T, "B": B,
                  "HQ": cfg.num_heads, "H": cfg.num_kv_heads, "D": cfg.head_dim, "Dv": cfg.head_dim,
                  "dtype": dtype, "ms": ms, "mem_mib": None if m.get("peak_gib") is None else m["peak_gib"] * 1024,
                  "ok": m.get("ok", True) if ms is not None else m.get("ok"),
                  "backend": backend if kind == "nsa" else None, "note": m.get("note", ""), "model": model_name,
                  "tokens_per_s": None if ms is None else tokens / (ms / 1e3), "peak_gib": m.get("peak_gib"),
                  "mean_ms": m.get("decode_mean_ms") if pass_ == "decode" else None,
                  "steps": m.get("steps") if pass_ == "decode" else None})
        if ms is not None and m.get("note", "").startswith("n/a"):
            r["note"] = ""  # the prefill ran; only the decoding steps ran out of memory
        out.append(r)
    return out


def _add_speedups(recs):
    by = {(r["impl"], r["pass"]): r for r in recs}
    for p in PASSES:
        n, f = by.get(("nsa", p)), by.get(("full", p))
        if n and f and n["ms"] and f["ms"]:
            n["speedup"] = f["ms"] / n["ms"]


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------
TABLE_HEAD = (f"{'T':>5} {'B':>3} {'attn':>4} {'prefill ms':>11} {'ms/token':>9} {'tokens/s':>10} "
              f"{'peak GiB':>9} {'speedup prefill/decode':>23}  note")


def format_row(pre, dec) -> str:
    """One table line: the prefill and decode records of one attention, T and B."""
    from .report import _tk

    def ms(r):
        if r["ms"] is not None:
            return f"{r['ms']:.3f}" if r["ms"] < 10 else f"{r['ms']:.1f}"
        return "FAIL" if r["ok"] is False else "n/a"

    def sp(r):
        return "-" if r["speedup"] is None else f"{r['speedup']:.2f}x"

    tps = "-" if dec["tokens_per_s"] is None else f"{dec['tokens_per_s']:.0f}"
    peak = "-" if dec["peak_gib"] is None else f"{dec['peak_gib']:.2f}"
    note = pre["note"] or dec["note"]
    return (f"{_tk(pre['T']):>5} {pre['B']:>3} {pre['impl']:>4} {ms(pre):>11} {ms(dec):>9} {tps:>10} {peak:>9} "
            f"{sp(pre) + ' / ' + sp(dec):>23}  {note}")


# ---------------------------------------------------------------------------------------------
# Run
# ---------------------------------------------------------------------------------------------
def run(model_name, lengths, batches, device, new_tokens: int, warmup: int, check_T: int, backend: str,
        checks: dict, log, progress: bool = True, cuda_graph: bool | None = None, paged: bool = False) -> bool:
    """Check both models, then time every (T, B) for each; prints the table.

    Args:
        model_name: :class:`nsa.model.ModelConfig` preset; lengths, batches: T and B values;
            new_tokens, warmup: timed and untimed decoding steps; check_T: the check's prompt
            length (0 skips it); backend: recorded on the NSA records; cuda_graph: generate's
            (None: on CUDA); paged: the NSA model decodes from a PagedNSACache.
        checks: filled with the checks' verdicts per attention; log: called with each record
            once its (T, B) pair is measured (speedups set).
    Returns:
        True when a check failed or a measurement raised.
    """
    from . import _Terminated
    from .harness import _one_line

    device = torch.device(device)
    cuda = device.type == "cuda"
    models = build_models(model_name, device)
    cfg = models["nsa"].config
    failed = False
    for kind, model in models.items():
        if not check_T:
            checks[kind] = "skipped"
        else:
            try:
                checks[kind] = check_generate(model, check_T, 2 * cfg.stride, device, paged and kind == "nsa")
            except _Terminated:
                raise
            except Exception as e:
                checks[kind] = f"error: {_one_line(e)}"
        what = (f"float32, prompts of {check_T} and {max(1, check_T - cfg.stride - 3)} tokens, {2 * cfg.stride} steps"
                if check_T else "--check-T 0")
        print(f"check ({kind}, {what}): generate vs uncached greedy: {checks[kind]}", flush=True)
        failed |= not checks[kind].startswith(("ok", "skipped"))
    _free(device)
    dtype = "bf16" if cuda else "fp32"
    for model in models.values():
        model.to(torch.bfloat16 if cuda else torch.float32)
    print(TABLE_HEAD, flush=True)
    for T in lengths:
        for B in batches:
            recs = []
            for kind, model in models.items():
                if not checks[kind].startswith(("ok", "skipped")):
                    m = dict(ok=False, note=f"not timed: check failed ({checks[kind]})")
                else:
                    if progress:
                        print(f"  ... T={T} B={B} {kind}", file=sys.stderr, flush=True)
                    try:
                        m = measure_generate(model, B, T, new_tokens, warmup, device, cuda_graph,
                                             paged and kind == "nsa")
                    except _Terminated:
                        raise
                    except torch.OutOfMemoryError:
                        m = dict(note="n/a: out of memory in the warm-up")
                    except Exception as e:
                        m = dict(ok=False if kind == "nsa" else None, note=f"error: {_one_line(e)}")
                    _free(device)
                pair = _records(model_name, cfg, kind, T, B, dtype, backend, m)
                failed |= any(r["ok"] is False for r in pair)
                recs += pair
            _add_speedups(recs)
            for r in recs:
                log(r)
            for kind in KINDS:
                pre, dec = (r for r in recs if r["impl"] == kind)
                print(format_row(pre, dec), flush=True)
    return failed


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------
def _parser():
    from . import _int_list

    p = argparse.ArgumentParser(
        prog="nsa bench --preset generate",
        description="End-to-end greedy generation of nsa.model.LanguageModel (stream_generate: packed prefill, "
                    "cached decoding steps), attention='nsa' against 'full', random weights: prefill ms, ms per "
                    "output token, tokens/s, peak memory. Checks the cached tokens against an uncached loop first.")
    p.add_argument("--preset", choices=("generate",), default="generate", help="this benchmark")
    p.add_argument("--model", default=None, choices=("tiny", "small", "base", "1b"),
                   help="model preset (default: base on CUDA, tiny on CPU)")
    p.add_argument("--T", type=_int_list, default=None,
                   help="prompt lengths (default on CUDA 16k,32k,64k,128k; on CPU 64,128)")
    p.add_argument("--B", type=_int_list, default=None,
                   help="batch sizes: prompts generated together (default on CUDA 1,16; on CPU 1,2)")
    p.add_argument("--new-tokens", type=int, default=None,
                   help="timed decoding steps per case (default 128 on CUDA, 8 on CPU)")
    p.add_argument("--warmup", type=int, default=2,
                   help="untimed decoding steps before the timed ones (default 2, at least 1)")
    p.add_argument("--check-T", type=int, default=None,
                   help="prompt length of the cached-vs-uncached check (default 1024 on CUDA, 128 on CPU; 0 skips it)")
    p.add_argument("--cache", choices=("dense", "paged"), default="dense",
                   help="the NSA model's decoding cache: dense (NSACache) or paged (PagedNSACache); the full "
                        "model keeps its KVCache")
    p.add_argument("--cuda-graph", choices=("on", "off"), default=None,
                   help="decoding steps replayed from a CUDA graph (generate's cuda_graph; default on with CUDA)")
    add_device_option(p)
    p.add_argument("--json", metavar="PATH", help="write the header and records as JSON (format nsa-bench/1)")
    p.add_argument("--plot", metavar="PATH", help="write a PNG: time vs T and speedup vs T")
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no line on stderr before each measurement")
    return p


def cli_main(argv=None) -> int:
    """Entry point of ``nsa bench --preset generate``. Returns 0, 1 when a check failed or a
    measurement raised, 2 on bad input (nothing run)."""
    from . import _terminate, _Terminated, report

    raw = sys.argv[1:] if argv is None else list(argv)
    args = _parser().parse_args(raw)
    if args.new_tokens is not None and args.new_tokens < 1:
        return report.bad_argument("--new-tokens must be >= 1")
    if args.warmup < 1:
        return report.bad_argument("--warmup must be >= 1")
    if args.check_T is not None and args.check_T < 0:
        return report.bad_argument("--check-T must be >= 0")
    device, status = report.device_for(args)
    if device is None:
        return status
    cuda = device.type == "cuda"
    name = args.model or ("base" if cuda else "tiny")
    lengths = args.T or ([16 * K, 32 * K, 64 * K, 128 * K] if cuda else [64, 128])
    batches = args.B or ([1, 16] if cuda else [1, 2])
    new_tokens = args.new_tokens or (128 if cuda else 8)
    check_T = args.check_T if args.check_T is not None else (1024 if cuda else 128)
    backend = os.environ.get("NSA_BACKEND") or "auto"
    if args.cuda_graph == "on" and not cuda:
        return report.bad_argument("--cuda-graph on needs a CUDA device")
    cuda_graph = cuda if args.cuda_graph is None else args.cuda_graph == "on"

    from ..model import ModelConfig

    head = report.header(device, "generate", backend, raw)
    head.update(conventions=CONVENTIONS, model=name, dtype="bf16" if cuda else "fp32", lengths=lengths,
                batches=batches, new_tokens=new_tokens, warmup=args.warmup, cuda_graph=cuda_graph,
                cache=args.cache,
                config={k: v for k, v in ModelConfig.preset(name).to_dict().items() if k != "attention"}, checks={})
    print(report.format_header(head), flush=True)
    print(f"model: {name}, {head['dtype']}; {new_tokens} timed decoding steps after {args.warmup} warm-up step(s); "
          f"steps {'replayed from a CUDA graph' if cuda_graph else 'run eagerly'}; NSA cache {args.cache}", flush=True)
    records: list[dict] = []
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        failed = run(name, lengths, batches, device, new_tokens, args.warmup, check_T, backend, head["checks"],
                     records.append, args.progress, cuda_graph, args.cache == "paged")
    except _Terminated:
        print(f"nsa bench: terminated; writing the {len(records)} measurements made so far", file=sys.stderr)
        failed = any(r["ok"] is False for r in records) or any(
            not v.startswith(("ok", "skipped")) for v in head["checks"].values())
    finally:
        signal.signal(signal.SIGTERM, previous)
    report.write_outputs(head, records, args.json, args.plot)
    if failed:
        print("nsa bench: a check failed or a measurement raised (see the notes)", file=sys.stderr)
    return 1 if failed else 0
