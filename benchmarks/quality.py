"""NSA against full attention and a sliding window alone, trained the same way: the quality runs
of ``benchmarks/results/<date>_<gpu>_quality``.

Three models that differ only in their attention (``attention='nsa'``, ``'full'``, ``'window'``;
same preset, seed, documents, tokens and schedule) are trained with :func:`nsa.train.train` on
seeded ``needle`` documents (``--task``; real text with a pass key planted at a random depth
and asked for at the end, loss on every token, :mod:`nsa.evals.task_data`), then evaluated
with :func:`nsa.evals.run.run_eval`: held-out loss by position bucket on plain text, pass-key
accuracy over lengths up to and beyond the trained context (length extrapolation) x depths,
and, for NSA, what its selection does. A GPU call is at most ten minutes, so each model can be
its own command; ``summarize`` gathers them::

    python benchmarks/quality.py train --kind nsa --out Q --minutes 4.5   # prints the steps taken
    python benchmarks/quality.py train --kind full --out Q --steps N      # the same tokens
    python benchmarks/quality.py train --kind window --out Q --steps N
    python benchmarks/quality.py summarize Q                              # Q/summary.json, Q/quality.png

or all of it in one process: ``python benchmarks/quality.py all --out Q --minutes M`` (NSA
probed for ``M`` minutes of training, then full and window at its steps, then ``summarize``).

``train --minutes M`` times a few steps of the model first (in a scratch directory) and takes
as many steps as fit ``M`` minutes; ``--steps`` fixes them. Each ``train`` also evaluates its
model into ``Q/<kind>/eval/`` (``loss.json``, ``needle.json``, ``selection.json``) and keeps
only the small files when ``--drop-checkpoint`` is given (a GPU's outputs come back by size).

``summary.json`` follows ``nsa demo``'s format: ``models.<kind>`` with ``val_loss`` (the run's
last validation loss on held-out task documents), ``accuracy`` and ``needle_accuracy`` (mean
pass-key accuracy at the trained length), ``keys_per_query``, ``tokens_per_s``, plus
``text_loss`` (held-out plain text), ``loss_by_position`` and ``needle_by_length``;
``settings`` the shared settings.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import sys
import time
from pathlib import Path

KINDS = ("nsa", "full", "window")
DEFAULTS = dict(preset="small", seq_len=8192, batch_tokens=65536, lr=1.5e-3, task="needle", seed=0)


def _config(kind: str, out: Path, steps: int, args, eval_every: int):
    from nsa.train import TrainConfig

    return TrainConfig(out=str(out), preset=args.preset, attention=kind, seq_len=args.seq_len,
                       batch_tokens=args.batch_tokens, steps=steps, lr=args.lr,
                       warmup_steps=max(1, min(100, steps // 10)), seed=args.seed, task=args.task,
                       eval_every=eval_every, eval_batches=8, log_every=max(1, steps // 50),
                       cache_dir=args.cache_dir, progress=False, overwrite=True)


def steps_for(kind: str, minutes: float, args, scratch: Path) -> tuple[int, float]:
    """Steps of ``kind`` that fit ``minutes``, from the throughput of a short run (its first
    step, which compiles and initialises, left out); returns (steps, tokens/s)."""
    from nsa.train import read_metrics, train

    probe = 6
    train(dataclasses.replace(_config(kind, scratch, probe, args, eval_every=0), log_every=1))
    m = [x for x in read_metrics(scratch) if "tokens_per_s" in x][1:]
    tps = sum(x["tokens_per_s"] for x in m) / len(m)
    shutil.rmtree(scratch, ignore_errors=True)
    return max(1, math.floor(minutes * 60 * tps / args.batch_tokens)), tps


def evaluate(run: Path, kind: str, seq_len: int, samples: int) -> dict:
    """The evaluations of one trained model, written into ``run/eval``."""
    from nsa.evals.run import run_eval
    from nsa.evals.tasks import needle_min_length
    from nsa.train import load_run_tokenizer

    out = {}
    least = needle_min_length(load_run_tokenizer(run))
    lengths = sorted(n for n in {seq_len // 4, seq_len // 2, seq_len, 2 * seq_len, 4 * seq_len} if n >= least)
    out["loss"] = run_eval("loss", run, seq_len=seq_len)
    out["needle"] = run_eval("needle", run, lengths=lengths, samples=samples)
    if kind == "nsa":
        out["selection"] = run_eval("selection", run, lengths=[seq_len], samples=max(1, samples // 4))
    return out


def cmd_train(args) -> int:
    from nsa.train import train

    root = Path(args.out)
    run = root / args.kind
    if run.exists() and not args.overwrite:
        print(f"quality.py: --out: {run} exists; pass --overwrite to replace it", file=sys.stderr)
        return 2
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    probe_tps = None
    steps = args.steps
    if steps is None:
        steps, probe_tps = steps_for(args.kind, args.minutes, args, root / f".probe-{args.kind}")
        print(f"{args.kind}: {probe_tps:,.0f} tokens/s in the probe -> {steps} steps for {args.minutes} min",
              flush=True)
    t1 = time.time()
    summary = train(_config(args.kind, run, steps, args, eval_every=max(1, steps // 8)))
    t2 = time.time()
    print(f"{args.kind}: trained {steps} steps ({summary['tokens']:,} tokens) in {t2 - t1:.0f} s, "
          f"val_loss {summary['val_loss']:.4f}", flush=True)
    ev = evaluate(run, args.kind, args.seq_len, args.samples)
    t3 = time.time()
    needle = ev["needle"]["result"]
    print(f"{args.kind}: text loss {ev['loss']['result']['loss']:.4f}; needle by length "
          + ", ".join(f"{n}: {a:.2f}" for n, a in zip(needle["lengths"], needle["accuracy_by_length"]))
          + f" (evaluations {t3 - t2:.0f} s)", flush=True)
    info = dict(kind=args.kind, steps=steps, tokens=summary["tokens"], train_seconds=round(t2 - t1, 1),
                eval_seconds=round(t3 - t2, 1), probe_tokens_per_s=probe_tps, total_seconds=round(t3 - t0, 1),
                val_loss=summary["val_loss"], num_parameters=summary["num_parameters"],
                args={k: v for k, v in vars(args).items() if k != "func"})
    (run / "quality_run.json").write_text(json.dumps(info, indent=2) + "\n")
    if args.drop_checkpoint:
        shutil.rmtree(run / "checkpoint", ignore_errors=True)
    return 0


def cmd_all(args) -> int:
    for kind in KINDS:
        args.kind = kind
        rc = cmd_train(args)
        if rc:
            return rc
        if kind == "nsa":
            args.steps = json.loads((Path(args.out) / kind / "quality_run.json").read_text())["steps"]
            args.minutes = None
    return cmd_summarize(args)


def _load(root: Path, kind: str) -> dict:
    run = root / kind
    ev = {k: json.loads((run / "eval" / f"{k}.json").read_text())
          for k in ("loss", "needle", "selection") if (run / "eval" / f"{k}.json").is_file()}
    return dict(info=json.loads((run / "quality_run.json").read_text()),
                config=json.loads((run / "config.json").read_text()), eval=ev)


def cmd_summarize(args) -> int:
    from nsa.demo import keys_per_query
    from nsa.train import read_metrics, training_tokens_per_s
    from nsa.evals._common import import_pyplot

    root = Path(args.out)
    runs = {k: _load(root, k) for k in KINDS if (root / k / "quality_run.json").is_file()}
    if not runs:
        print(f"quality.py: {root} holds no trained model", file=sys.stderr)
        return 2
    tokens = {r["info"]["tokens"] for r in runs.values()}
    models, curves = {}, {}
    for kind, r in runs.items():
        m = r["config"]["model"]
        seq = r["config"]["train"]["seq_len"]
        k = keys_per_query(seq, m["kernel_size"], m["stride"], m["block_size"], m["num_selected"], m["window_size"])
        needle = r["eval"]["needle"]["result"]
        at = needle["lengths"].index(seq) if seq in needle["lengths"] else None
        metrics = read_metrics(root / kind)
        curves[kind] = metrics
        loss = r["eval"]["loss"]["result"]
        models[kind] = dict(
            val_loss=r["info"]["val_loss"], text_loss=loss["loss"], bits_per_byte=loss["bits_per_byte"],
            accuracy=None if at is None else needle["accuracy_by_length"][at],
            needle_accuracy=None if at is None else needle["accuracy_by_length"][at],
            needle_by_depth_at_seq_len=None if at is None else needle["accuracy"][at],
            needle_by_length=dict(zip(map(str, needle["lengths"]), needle["accuracy_by_length"])),
            loss_by_position=[dict(start=b["start"], end=b["end"], loss=b["loss"]) for b in loss["buckets"]],
            keys_per_query={"nsa": k["nsa"], "full": k["full"], "window": k["win"]}[kind],
            tokens_per_s=training_tokens_per_s(metrics), tokens=r["info"]["tokens"], steps=r["info"]["steps"],
            train_seconds=r["info"]["train_seconds"], num_parameters=r["info"]["num_parameters"])
        if "selection" in r["eval"]:
            sel = r["eval"]["selection"]["result"]
            models[kind]["selection"] = {k: sel[k] for k in ("needle_selected_mean", "chance",
                                                             "needle_selected_by_layer", "shared_fraction",
                                                             "gates", "gates_last")}
    first = next(iter(runs.values()))
    t = first["config"]["train"]
    settings = dict(preset=t["preset"], seq_len=t["seq_len"], batch_tokens=t["batch_tokens"], lr=t["lr"],
                    task=t["task"], seed=t["seed"], same_tokens=len(tokens) == 1, tokens=sorted(tokens),
                    device=first["eval"]["loss"]["meta"]["device"], torch=first["eval"]["loss"]["meta"]["torch"],
                    needle_lengths=first["eval"]["needle"]["result"]["lengths"],
                    needle_depths=first["eval"]["needle"]["result"]["depths"],
                    needle_samples_per_cell=first["info"]["args"]["samples"])
    summary = dict(models=models, settings=settings)
    (root / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"{'model':<8}{'val loss':>10}{'text loss':>11}{'needle@T':>10}{'keys/query':>12}{'tokens/s':>11}")
    for kind, r in models.items():
        acc = "-" if r["accuracy"] is None else f"{r['accuracy']:.2f}"
        print(f"{kind:<8}{r['val_loss']:>10.4f}{r['text_loss']:>11.4f}{acc:>10}{r['keys_per_query']:>12.0f}"
              f"{r['tokens_per_s']:>11,.0f}")
    for kind, r in models.items():
        print(f"{kind} needle by length: " + ", ".join(f"{n}: {a:.2f}" for n, a in r["needle_by_length"].items()))
    _plot(import_pyplot(), curves, models, settings, root / "quality.png")
    print(f"wrote {root / 'summary.json'} and {root / 'quality.png'}")
    return 0


def _plot(plt, curves, models, settings, path):
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    colors = dict(nsa="C0", full="C1", window="C2")
    ax = axes[0]
    for kind, m in curves.items():
        vals = [x for x in m if "val_loss" in x]
        ax.plot([x["tokens"] for x in vals], [x["val_loss"] for x in vals], "o-", ms=3, color=colors[kind],
                label=kind)
    ax.set_xlabel("training tokens")
    ax.set_ylabel(f"validation loss ({settings['task']} documents)")
    ax.legend()
    ax = axes[1]
    for kind, r in models.items():
        b = [x for x in r["loss_by_position"] if x["loss"] is not None]
        ax.plot([x["end"] for x in b], [x["loss"] for x in b], "o-", ms=3, color=colors[kind], label=kind)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("position in the sequence (bucket end)")
    ax.set_ylabel("held-out text loss")
    ax.legend()
    ax = axes[2]
    for kind, r in models.items():
        n = [int(x) for x in r["needle_by_length"]]
        ax.plot(n, list(r["needle_by_length"].values()), "o-", ms=3, color=colors[kind], label=kind)
    ax.axvline(settings["seq_len"], color="gray", ls=":", lw=1)
    ax.set_xscale("log", base=2)
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlabel("prompt length (dotted: trained context)")
    ax.set_ylabel("pass-key accuracy (mean over depths)")
    ax.legend()
    fig.suptitle(f"'{settings['preset']}' models, {settings['seq_len']}-token context, "
                 f"{settings['tokens'][0]:,} tokens each ({settings['device']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _train_options(t):
    t.add_argument("--out", required=True)
    g = t.add_mutually_exclusive_group(required=True)
    g.add_argument("--steps", type=int, help="optimizer steps")
    g.add_argument("--minutes", type=float, help="as many steps as fit this many minutes (probed)")
    t.add_argument("--preset", default=DEFAULTS["preset"])
    t.add_argument("--seq-len", type=int, default=DEFAULTS["seq_len"])
    t.add_argument("--batch-tokens", type=int, default=DEFAULTS["batch_tokens"])
    t.add_argument("--lr", type=float, default=DEFAULTS["lr"])
    t.add_argument("--task", default=DEFAULTS["task"], choices=("mix", "needle", "recall", "lm"))
    t.add_argument("--seed", type=int, default=DEFAULTS["seed"])
    t.add_argument("--samples", type=int, default=8, help="needle prompts per (length, depth) cell")
    t.add_argument("--cache-dir", default=None)
    t.add_argument("--overwrite", action="store_true")
    t.add_argument("--drop-checkpoint", action="store_true", help="delete the checkpoint after evaluating")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="quality.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train and evaluate one model")
    t.add_argument("--kind", choices=KINDS, required=True)
    _train_options(t)
    t.set_defaults(func=cmd_train)
    a = sub.add_parser("all", help="train and evaluate the three models (NSA's steps for all), then summarize")
    _train_options(a)
    a.set_defaults(func=cmd_all)
    s = sub.add_parser("summarize", help="summary.json and quality.png of the trained models")
    s.add_argument("out")
    s.set_defaults(func=cmd_summarize)
    args = p.parse_args(argv)
    if getattr(args, "steps", None) is not None and args.steps < 1:
        p.error("--steps: expected an int >= 1")
    if getattr(args, "minutes", None) is not None and not args.minutes > 0:
        p.error("--minutes: expected a positive number")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
