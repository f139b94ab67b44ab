"""`nsa bench`: check, then time NSA against full attention in the same process.

Usage: ``python -m nsa.bench --preset paper --json out.json --plot out.png`` (or ``nsa bench ...``).
Presets and conventions: :mod:`nsa.bench.harness`; output formats: :mod:`nsa.bench.report`;
the kernels on a trained model's inputs (``--from-checkpoint``): :mod:`nsa.bench.trained`;
how to run and read it: benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

from .._cli_utils import add_device_option, add_dtype_option, resolve_device

__all__ = ["cli_main"]


def _int_list(text: str) -> list[int]:
    """'8k,16384' -> [8192, 16384]."""
    out = []
    for item in text.split(","):
        item = item.strip().lower()
        mult = 1024 if item.endswith("k") else 1
        try:
            v = int(item[:-1] if mult > 1 else item) * mult
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected integers like 8192 or 8k, got {item!r}") from None
        if v < 1:
            raise argparse.ArgumentTypeError(f"expected positive integers, got {item!r}")
        out.append(v)
    return out


def _pairs(sep: str):
    def parse(text: str) -> list[tuple[int, int]]:
        out = []
        for item in text.split(","):
            parts = item.strip().split(sep)
            try:
                a, b = (int(parts[0]), int(parts[1])) if len(parts) == 2 else (int(parts[0]), int(parts[0]))
            except (ValueError, IndexError):
                raise argparse.ArgumentTypeError(f"expected A{sep}B pairs like 64{sep}4, got {item!r}") from None
            if a < 1 or b < 1:
                raise argparse.ArgumentTypeError(f"expected positive sizes, got {item!r}")
            out.append((a, b))
        return out

    return parse


def _layer_list(text: str) -> list[int]:
    """'0,3,7' -> [0, 3, 7] (layer indices, 0 allowed)."""
    try:
        out = [int(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected layer indices like 0,3,7, got {text!r}") from None
    if not out or min(out) < 0:
        raise argparse.ArgumentTypeError(f"expected layer indices >= 0, got {text!r}")
    return out


def _names(allowed):
    def parse(text: str) -> list[str]:
        names = [n.strip() for n in text.split(",") if n.strip()]
        bad = [n for n in names if n not in allowed]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {bad}; expected a subset of {','.join(allowed)}")
        return names

    return parse


def _parser() -> argparse.ArgumentParser:
    from .harness import BASELINES, PRESETS

    presets = "; ".join(f"{k}: {v.about}" for k, v in PRESETS.items())
    p = argparse.ArgumentParser(
        prog="nsa bench",
        description="Check NSA against the reference, then time it (forward, backward, per branch, decode) "
                    "against SDPA, FlexAttention and fla in the same process. Presets: " + presets)
    p.add_argument("--preset", default="quick", choices=sorted(PRESETS) + list(_OWN_PARSER),
                   help="case list (default: quick); 'model': a training step of nsa.model.LanguageModel, NSA "
                        "against full attention (see `nsa bench --preset model --help`); 'layer': the "
                        "NativeSparseAttention layer against a full-attention layer with the same projections, "
                        "with a kernel breakdown (see `nsa bench --preset layer --help`); 'generate': end-to-end "
                        "generation (prefill, then cached decoding) of the model, NSA against full attention (see "
                        "`nsa bench --preset generate --help`)")
    p.add_argument("--T", type=_int_list, help="override sequence lengths / decode contexts, e.g. 8k,16k")
    p.add_argument("--B", type=_int_list, help="override batch sizes, e.g. 1,8")
    p.add_argument("--heads", type=_pairs("/"), help="override (HQ/H) pairs, e.g. 64/4,16/4")
    p.add_argument("--dims", type=_pairs("x"), help="override head dims (Dk x Dv), e.g. 128x128,192x128")
    add_dtype_option(p, None, "override the preset's dtype")
    p.add_argument("--smooth-queries", type=int, default=0, metavar="N",
                   help="train cases: queries as moving sums of N positions of random noise, so that "
                        "neighbouring positions select shared blocks (0, the default: independent queries)")
    add_device_option(p, "the preset's, else cuda when available")
    p.add_argument("--backend", choices=("auto", "reference", "triton"),
                   help="NSA backend (default: the preset's; $NSA_BACKEND if set)")
    p.add_argument("--reps", type=int, default=3,
                   help="timed repetitions: CPU wall-clock reps; on CUDA at least this many (do_bench budget "
                        "max(100 ms, reps x one call)) (default 3)")
    p.add_argument("--threads", type=int,
                   help="CPU threads for torch on a CPU run (default: the preset's; quick uses 1: on a shared "
                        "machine more threads mostly measure contention)")
    p.add_argument("--json", metavar="PATH", help="write header + records as JSON")
    p.add_argument("--plot", metavar="PATH", help="write a PNG: time vs T and speedup vs T")
    p.add_argument("--baselines", type=_names(BASELINES), default=list(BASELINES),
                   help=f"comma-separated subset of {','.join(BASELINES)} (default: all; flex compiles "
                        "once per shape, which takes a while)")
    p.add_argument("--no-baselines", dest="baselines", action="store_const", const=[],
                   help="skip SDPA / FlexAttention / fla")
    p.add_argument("--branches", action=argparse.BooleanOptionalAction, default=True,
                   help="per-branch breakdown (cmp, select, slc, win, gate, phi) (default: on)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    t = p.add_argument_group(
        "trained inputs",
        "The kernels on real selections: each train case of the preset runs twice, on random inputs and on "
        "the q/k/v/gates that chosen layers of a trained NSA model give the op on text (captured once, "
        "replayed at the case's heads and dims: KV heads repeated, query heads repeated within their group, "
        "head dims zero-padded, the model's softmax scale kept, so that the same blocks are selected). Both "
        "use the model's NSA settings (kernel, stride, blocks, window). The case's name ends with "
        "/trained-L<layer>; it is checked against the reference on its own inputs and compared with the "
        "baselines of its random twin. The selection's cost (distinct blocks per tile of 64 queries, "
        "blocks shared by neighbouring queries), trained vs random, is printed per layer and length. E.g. "
        "nsa bench --preset paper --T 64k --dims 128x128 --from-checkpoint runs/nsa (see benchmarks/README.md)")
    t.add_argument("--from-checkpoint", metavar="DIR",
                   help="a run directory of `nsa train` (or its checkpoint/) with an attention='nsa' model; the "
                        "model runs at the case's T whatever its training context (RoPE)")
    t.add_argument("--layers", type=_layer_list, metavar="L,L",
                   help="layers whose inputs to replay (default: first, middle and last)")
    t.add_argument("--text", metavar="FILE",
                   help="text to run the model on (default: the validation documents of the run's corpus, as the "
                        "trainer split them; repeated if shorter than B x T tokens)")
    return p


# Presets with their own options, parser and output: preset -> module with cli_main(argv).
_OWN_PARSER = {"model": "model_step", "layer": "layer_step", "generate": "generate"}


class _Terminated(Exception):
    pass


def _terminate(signum, frame):
    raise _Terminated()


def _prepare_trained(source, cases, device) -> dict:
    """Captures the trained inputs once (the largest batch and length of the cases), prints
    what was captured and the selection statistics; returns them for the JSON header."""
    from . import trained

    train = [c for c in cases if c.inputs != "random"]
    B, T = max(c.B for c in train), max(c.T for c in train)
    info = source.describe()
    m = info["model"]
    print(f"trained inputs: layers {list(source.layers)} of {source.checkpoint} ({m['num_layers']} layers, HQ "
          f"{m['HQ']}, H {m['H']}, D {m['Dk']}, trained up to {m['max_seq_len']} tokens); NSA settings "
          f"{ {k: v for k, v in info['settings'].items() if k != 'scale'} }, scale {info['settings']['scale']:.4g}",
          flush=True)
    cap = source.capture(B, T, device)
    repeated = " (REPEATED: shorter than the batch)" if cap.text["repeated"] else ""
    print(f"captured on {B} x {T} tokens of {cap.text['source']}: {cap.text['documents']} document(s), "
          f"{cap.text['tokens']} tokens{repeated}", flush=True)
    stats = trained.selection_report(source, sorted({c.T for c in train}), device)
    print(trained.format_report(stats), flush=True)
    return dict(info, text_source=cap.text, selection=stats)


def cli_main(argv: list[str] | None = None) -> int:
    """Entry point of ``nsa bench`` / ``python -m nsa.bench``. Returns the exit status:
    0 when nothing failed, 1 when an NSA check failed or an NSA measurement raised."""
    raw = sys.argv[1:] if argv is None else list(argv)
    for name, module in _OWN_PARSER.items():
        if f"--preset={name}" in raw or any(a == "--preset" and b == name for a, b in zip(raw, raw[1:])):
            import importlib

            return importlib.import_module(f".{module}", __name__).cli_main(raw)
    args = _parser().parse_args(argv)
    from . import harness, report

    preset = harness.PRESETS[args.preset]
    backend = args.backend or os.environ.get("NSA_BACKEND") or preset.backend
    if args.reps < 1 or (args.threads is not None and args.threads < 1):
        print("nsa bench: --reps and --threads must be >= 1", file=sys.stderr)
        return 2
    if args.smooth_queries < 0:
        print("nsa bench: --smooth-queries must be >= 0", file=sys.stderr)
        return 2
    if args.plot:
        try:  # refused before the run, not after it
            report.import_matplotlib()
        except RuntimeError as e:
            print(f"nsa bench: --plot: {e}", file=sys.stderr)
            return 2
    if args.from_checkpoint is None and (args.layers is not None or args.text is not None):
        print("nsa bench: --layers and --text need --from-checkpoint", file=sys.stderr)
        return 2
    source = None
    try:
        device = str(resolve_device(args.device or preset.device))
        cases = harness.build_cases(args.preset, T=args.T, B=args.B, heads=args.heads, dims=args.dims,
                                    dtype=args.dtype, smooth_queries=args.smooth_queries)
        if args.from_checkpoint is not None:
            from . import trained

            source = trained.open_source(args.from_checkpoint, args.layers, args.text)
            cases = trained.trained_cases(cases, source)
            if not any(c.inputs != "random" for c in cases):
                raise ValueError(f"--from-checkpoint: preset {args.preset} has no train cases")
    except ValueError as e:
        print(f"nsa bench: {e}", file=sys.stderr)
        return 2
    head = report.header(device, args.preset, backend, sys.argv[1:] if argv is None else argv)
    print(report.format_header(head), flush=True)
    if source is not None:
        try:
            head["trained"] = _prepare_trained(source, cases, device)
        except ValueError as e:
            print(f"nsa bench: {e}", file=sys.stderr)
            return 2
    # A run stopped by SIGTERM (e.g. `timeout` on a lent GPU) still writes what it measured.
    done: list[dict] = []
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        records = harness.run(cases, device, backend=backend, reps=args.reps, baselines=args.baselines,
                              branches=args.branches, progress=args.progress,
                              threads=args.threads if args.threads is not None else preset.threads,
                              log=done.append)
    except _Terminated:
        records = done
        harness.add_speedups(records)
        print(f"nsa bench: terminated; writing the {len(records)} measurements made so far", file=sys.stderr)
    finally:
        signal.signal(signal.SIGTERM, previous)
    if any(r["pass"] == "decode" for r in records):
        # the ceiling of a decoding step: what this device copies (read + write) per second
        head["copy_gbps"] = harness.copy_bandwidth_gbps(device)
        harness.add_copy_share(records, head["copy_gbps"])
        print(f"device copy bandwidth (read + write): {head['copy_gbps']:.0f} GB/s; decode GB/s as its share:",
              flush=True)
        for r in records:
            if r["pass"] == "decode" and r.get("copy_share") is not None:
                print(f"  {r['impl']:<14} {r['case']}: {r['gbps']:.0f} GB/s = {100 * r['copy_share']:.0f}%",
                      flush=True)
    print(report.format_table(records), flush=True)
    report.write_outputs(head, records, args.json, args.plot)
    failed = [r for r in records if r["ok"] is False]
    if failed:
        print(f"nsa bench: {len(failed)} NSA measurement(s) failed their check or raised", file=sys.stderr)
        return 1
    return 0
