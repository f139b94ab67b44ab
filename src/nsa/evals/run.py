"""``nsa eval {loss,needle,recall,selection} --checkpoint DIR``: load a run, pick its
evaluation documents, run one evaluator, write ``<kind>.json`` and ``<kind>.png``.

:func:`run_eval` is what the command calls (a test calls it too); :func:`summary` is what it
prints. Defaults come from the run directory that ``nsa train`` wrote: the documents are the
run's validation split (``--data`` names others), the sequence length and the context-length
grid follow its ``seq_len``.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import platform
import time
from pathlib import Path

import torch

from .._cli_utils import resolve_device
from ..data import find_documents, iter_texts, read_text, split_documents
from ._common import check_depths, check_lengths, check_samples, import_pyplot
from .loss import evaluate_loss, plot_loss
from .needle import evaluate_needle, evaluate_recall, plot_needle, plot_recall
from .selection import evaluate_selection, plot_selection
from .task_data import filler_texts
from .tasks import Filler, needle_min_length, recall_min_length

__all__ = ["KINDS", "run_eval", "summary"]

KINDS = ("loss", "needle", "recall", "selection")
DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
SAMPLES = {"needle": 10, "recall": 10, "selection": 4}
MAX_TOKENS = 1 << 18  # loss: predicted tokens by default
FILLER_CHARS = 1 << 16  # read at least this much filler text (and 8 x the longest prompt)


def _run(checkpoint: Path) -> tuple[Path, dict | None]:
    """The run directory holding ``checkpoint`` and its ``{"model", "train"}`` config (None
    for a saved model outside a run)."""
    for d in (checkpoint, checkpoint.parent):
        path = d / "config.json"
        if path.is_file():
            try:
                cfg = json.loads(path.read_text())
            except ValueError:
                continue
            if isinstance(cfg, dict) and "train" in cfg:
                return d, cfg
    return (checkpoint.parent if checkpoint.name == "checkpoint" else checkpoint), None


def _step(checkpoint: Path):
    for d in (checkpoint / "checkpoint", checkpoint):
        path = d / "trainer_state.json"
        if path.is_file():
            return json.loads(path.read_text()).get("step")
    return None


def _documents(data, run_cfg, checkpoint):
    if data is not None:
        return find_documents(data)
    if run_cfg is None:
        raise ValueError(f"--data: {checkpoint} is not a run directory of `nsa train` (no config.json with its "
                         f"options): name the evaluation documents with --data")
    t = run_cfg["train"]
    _, val = split_documents(find_documents(t.get("data")), t.get("val_fraction", 0.05), t.get("seed", 0))
    return val


def run_eval(kind: str, checkpoint, *, data=None, out=None, lengths=None, depths=None, samples=None, seed: int = 0,
             device=None, dtype: str | None = None, seq_len: int | None = None, max_tokens: int | None = None,
             key_digits: int = 6, num_pairs: int = 8, num_queries: int = 4, value_digits: int = 4,
             plot: bool = True) -> dict:
    """Run one evaluation of a checkpoint and write its JSON (and PNG).

    Args:
        kind: ``'loss'`` (:func:`nsa.evals.loss.evaluate_loss`), ``'needle'``
            (:func:`nsa.evals.needle.evaluate_needle`), ``'recall'``
            (:func:`nsa.evals.needle.evaluate_recall`) or ``'selection'``
            (:func:`nsa.evals.selection.evaluate_selection`).
        checkpoint: a run directory of ``nsa train`` or its ``checkpoint/`` (a saved model
            directory with a ``tokenizer/`` beside it also works, with ``data``).
        data: paths of the documents to evaluate on (loss) or to draw filler from; default: the
            run's validation documents.
        out: output directory (default ``<run>/eval``); writes ``<kind>.json`` and ``<kind>.png``.
        lengths: context lengths in tokens (needle, recall, selection; default: a quarter, half
            and all of the run's ``seq_len``).
        depths: needle depths in [0, 1] (needle, selection; default 0, 0.25, 0.5, 0.75, 1).
        samples: prompts per grid cell (default 10, selection 4).
        seed: seeds the prompts and the filler's order.
        device: ``'cpu'``, ``'cuda'``, ``'cuda:N'`` (default cuda when available).
        dtype: ``'bf16'`` (autocast) or ``'fp32'``; default bf16 on CUDA, fp32 on CPU.
        seq_len: loss: the longest sequence (default the run's ``seq_len``, else the model's
            ``max_seq_len``); max_tokens: loss: predicted tokens (default 262144).
        key_digits, num_pairs, num_queries, value_digits: the tasks' settings (see
            :mod:`nsa.evals.tasks`).
        plot: write the PNG (needs matplotlib, ``nsa[plot]``).
    Returns:
        the JSON written: ``meta`` (what was evaluated, where, when) and ``result`` (the
        evaluator's dict), plus ``files``.
    """
    from ..train import load_checkpoint_model, load_run_tokenizer

    if kind not in KINDS:
        raise ValueError(f"kind: expected one of {KINDS}, got {kind!r}")
    checkpoint = Path(checkpoint)
    if not checkpoint.is_dir():
        raise ValueError(f"--checkpoint: {checkpoint} is not a directory")
    if plot:
        try:
            import_pyplot()
        except RuntimeError as e:
            raise ValueError(f"--no-plot: {e} (or pass --no-plot)") from None
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"--seed: expected an int >= 0, got {seed!r}")
    if samples is not None:
        try:
            check_samples(samples)
        except ValueError as e:
            raise ValueError(f"--{e}") from None
    run_dir, run_cfg = _run(checkpoint)
    dev = resolve_device(device)
    if dtype not in (None, "bf16", "fp32"):
        raise ValueError(f"--dtype: expected bf16 or fp32, got {dtype!r}")
    bf16 = (dtype or ("bf16" if dev.type == "cuda" else "fp32")) == "bf16"
    try:
        model = load_checkpoint_model(checkpoint, device=dev).eval()
    except ValueError as e:
        raise ValueError(f"--checkpoint: {e}") from None
    tokenizer = load_run_tokenizer(checkpoint)
    if kind == "selection" and model.config.attention != "nsa":
        raise ValueError(f"--checkpoint: the model's attention is {model.config.attention!r}; the selection "
                         f"evaluation needs NSA layers (attention='nsa')")
    train_seq = run_cfg["train"].get("seq_len") if run_cfg is not None else None
    docs = _documents(data, run_cfg, checkpoint)

    if kind != "loss":
        least = (recall_min_length(tokenizer, num_pairs, num_queries, value_digits) if kind == "recall"
                 else needle_min_length(tokenizer, key_digits))
        if lengths is None:
            top = train_seq or min(model.config.max_seq_len, 4096)
            lengths = sorted({n for n in (top // 4, top // 2, top) if n >= least})
            if not lengths:
                raise ValueError(f"--lengths: the run's seq_len {top} is below the shortest {kind} prompt "
                                 f"({least} tokens); give --lengths")
        lengths = check_lengths(lengths, least, "--lengths")
        depths = check_depths(list(DEPTHS) if depths is None else depths, "--depths")
        samples = samples or SAMPLES[kind]
        filler = Filler(tokenizer, filler_texts(docs, max(FILLER_CHARS, 8 * max(lengths)), seed))

    autocast = torch.autocast(dev.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    t0 = time.perf_counter()
    with autocast:
        if kind == "loss":
            seq = seq_len or train_seq or model.config.max_seq_len
            result = evaluate_loss(model, tokenizer, iter_texts(docs), seq,
                                   max_tokens=MAX_TOKENS if max_tokens is None else max_tokens)
        elif kind == "needle":
            result = evaluate_needle(model, tokenizer, filler, lengths, depths, samples, seed, key_digits)
        elif kind == "recall":
            result = evaluate_recall(model, tokenizer, filler, lengths, samples, seed, num_pairs, num_queries,
                                     value_digits)
        else:
            result = evaluate_selection(model, tokenizer, filler, lengths, depths, samples, seed, key_digits)
    seconds = time.perf_counter() - t0

    from .. import __version__

    c = model.config
    meta = dict(kind=kind, checkpoint=str(checkpoint), step=_step(run_dir), attention=c.attention,
                model=c.to_dict(), num_parameters=model.num_parameters(), tokenizer=tokenizer.config()["type"],
                documents=len(docs), data=None if data is None else [str(d) for d in data],
                device=torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU ({platform.machine()})",
                dtype="bf16" if bf16 else "fp32", seconds=round(seconds, 3), nsa=__version__,
                torch=torch.__version__, date=datetime.datetime.now().isoformat(timespec="seconds"))
    out_dir = Path(out) if out is not None else run_dir / "eval"
    out_dir.mkdir(parents=True, exist_ok=True)
    files = [str(out_dir / f"{kind}.json")]
    if plot:
        title = f"{kind}: {checkpoint.name or checkpoint} ({c.attention}, step {meta['step']})"
        plotter = dict(loss=plot_loss, needle=plot_needle, recall=plot_recall, selection=plot_selection)[kind]
        plotter(result, out_dir / f"{kind}.png", title=title if kind != "selection" else None)
        files.append(str(out_dir / f"{kind}.png"))
    report = dict(meta=meta, result=result, files=files)
    (out_dir / f"{kind}.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def _f(v, fmt=".3f"):
    return "n/a" if v is None else format(v, fmt)


def summary(report: dict) -> str:
    """A few lines of text that ``nsa eval`` prints for a :func:`run_eval` report."""
    m, r = report["meta"], report["result"]
    head = f"nsa eval {m['kind']}: {m['checkpoint']} (step {m['step']}, {m['attention']}) on {m['device']}"
    lines = [head]
    if m["kind"] == "loss":
        lines.append(f"  loss {r['loss']:.4f} nats/token, {_f(r['bits_per_byte'], '.4f')} bits/byte over "
                     f"{r['tokens']:,} tokens of {r['documents']} documents (seq_len {r['seq_len']})")
        lines.append("  by position: " + ", ".join(f"[{b['start']},{b['end']}) {_f(b['loss'])}" for b in r["buckets"]))
    elif m["kind"] == "needle":
        lines.append(f"  accuracy (rows: length; columns: depth {', '.join(f'{d:g}' for d in r['depths'])}); "
                     f"chance {r['chance']:.1e}")
        for L, row in zip(r["lengths"], r["accuracy"]):
            lines.append(f"  {L:>8}  " + "  ".join(f"{a:.2f}" for a in row))
        lines.append(f"  mean {r['mean_accuracy']:.3f}")
    elif m["kind"] == "recall":
        for L, a, w in zip(r["lengths"], r["accuracy"], r["all_correct"]):
            lines.append(f"  {L:>8}  accuracy {a:.2f}  every question {w:.2f}")
        lines.append(f"  mean {r['mean_accuracy']:.3f}; chance {r['chance']:.1e}")
    else:
        lines.append(f"  needle block selected by the last token: {r['needle_selected_mean']:.3f} "
                     f"(random selection {r['chance']:.3f})")
        for k in range(r["layers"]):
            g = r["gates"][k]
            lines.append(f"  layer {k}: needle {', '.join(f'{v:.2f}' for v in r['needle_selected'][k])}; "
                         f"shared with the next query {_f(r['shared_blocks'][k], '.2f')} of "
                         f"{r['selection'][k]['num_selected']}; gates cmp {g['cmp']:.2f} slc {g['slc']:.2f} "
                         f"win {g['win']:.2f}")
    lines.append("  wrote " + ", ".join(report["files"]))
    return "\n".join(lines)
