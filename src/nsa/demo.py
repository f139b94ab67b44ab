"""``nsa demo``: NSA against full attention and a sliding window alone, trained from scratch on
a retrieval task in minutes, on a CPU or a GPU.

:func:`run_demo` trains three models that differ only in their attention (``attention='nsa'``,
``'full'``, ``'window'``; same seed, same data, same tokens, same schedule) with
:func:`nsa.train.train` on seeded retrieval documents (``--task``, :mod:`nsa.evals.task_data`),
then measures pass-key accuracy on held-out filler (:func:`nsa.evals.needle.evaluate_needle`)
at the trained context, where the needle usually lies beyond the window. It prints a table,
writes ``summary.json`` and ``demo.png`` into ``--out`` (default ``demo-out/``) beside the three
run directories (``runs/<kind>/``), and ends by generating a short sample with the decoding
cache.

``summary.json``::

    {"models": {"nsa":    {"accuracy", "val_loss", "keys_per_query", "tokens_per_s"},
                "full":   {...}, "window": {...}},
     "settings": {...}}

accuracy: mean pass-key accuracy over the depths at the trained context (exact match of the
greedy answer); val_loss: the run's last validation loss (on the answers when the loss is on
the answers); keys_per_query: keys one attention head reads per query, averaged over the
positions of the trained context (:func:`keys_per_query`); tokens_per_s: training throughput.

Defaults (:func:`demo_settings`): on CPU the 'tiny' model (hidden 128, 4 + 4 heads over 2 KV
heads) with two layers, NSA's sizes scaled down (compression blocks of 16 every 8, selection
blocks of 16, 4 selected, a 64-token window) at a 512-token context; ``--quick`` is a smoke
test of the whole pipeline (a few steps, nothing learned). On CUDA the same code runs the
Triton kernels with a longer context and more steps (see ``CUDA``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import platform
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["DemoConfig", "demo_settings", "run_demo", "keys_per_query", "KINDS", "DEMO_FILES"]

KINDS = ("nsa", "full", "window")
DEMO_FILES = ("summary.json", "demo.png", "runs", "cache")

# The model of every preset below: 'tiny' with these fields replaced.
MODEL = dict(num_layers=2)

# name -> DemoConfig fields; "cpu" is what `make demo` runs.
CPU = dict(seq_len=512, batch_tokens=4096, steps=160, lr=3e-3, warmup_steps=10, model=dict(MODEL),
           samples=8, depths=(0.0, 0.25, 0.5, 0.75, 1.0))
QUICK = dict(seq_len=128, batch_tokens=1024, steps=4, lr=3e-3, warmup_steps=1,
             model=dict(MODEL, num_layers=1, window_size=32), samples=2, depths=(0.0, 1.0))
CUDA = dict(seq_len=2048, batch_tokens=65536, steps=600, lr=2e-3, warmup_steps=30,
            model=dict(MODEL, num_layers=4, window_size=128, max_seq_len=4096), samples=20,
            depths=(0.0, 0.25, 0.5, 0.75, 1.0))


def keys_per_query(seq_len, kernel_size=32, stride=16, block_size=64, num_selected=16, window_size=512,
                   whole_blocks=False):
    """Keys each query attends to, averaged over the causal positions ``t < seq_len``.

    compressed: visible compressed tokens (``i*stride + kernel_size - 1 <= t``); selected:
    ``min(num_selected, t // block_size + 1)`` blocks, keys ``s <= t`` in them (the query's own
    block is partial), or every key of every chosen block with ``whole_blocks`` (what a kernel
    loads; the convention of the cost table in NSA.md); window: ``min(t + 1, window_size)``;
    full: ``t + 1``. Returns a dict of floats with keys cmp, slc, win, nsa, full.
    """
    import torch

    t = torch.arange(seq_len, dtype=torch.float64)
    cmp = torch.where(t >= kernel_size - 1, torch.div(t - kernel_size + 1, stride, rounding_mode="floor") + 1, 0)
    n_blk = torch.clamp(torch.div(t, block_size, rounding_mode="floor") + 1, max=num_selected)
    own = block_size if whole_blocks else torch.remainder(t, block_size) + 1
    slc = (n_blk - 1) * block_size + own
    win = torch.clamp(t + 1, max=window_size)
    out = {"cmp": cmp.mean().item(), "slc": slc.mean().item(), "win": win.mean().item(),
           "full": (t + 1).mean().item()}
    out["nsa"] = out["cmp"] + out["slc"] + out["win"]
    return out


@dataclass(frozen=True)
class DemoConfig:
    """What ``nsa demo`` runs (:func:`demo_settings` fills it for a device).

    Args:
        out: output directory; refused when it holds an earlier demo unless ``overwrite``.
        seq_len: training context and the needle evaluation's prompt length, in tokens.
        batch_tokens, steps, lr, warmup_steps: the training run of each model (same for all).
        model: ModelConfig fields over the 'tiny' preset (the attention kind aside).
        task: training documents (``'needle'``, ``'recall'`` or ``'mix'``); loss_on: ``'all'``
            or ``'answers'`` (see :class:`nsa.train.TrainConfig`).
        samples, depths: needle prompts per depth, and the depths, at ``seq_len`` tokens.
        seed: weights, data order, documents and prompts. device: ``cpu``, ``cuda``, ``cuda:N``
            or None (cuda when available). quick: the smoke-test sizes (recorded only).
        data: filler documents (None: the default corpus). progress: progress bars.
    """

    out: str = "demo-out"
    seq_len: int = 512
    batch_tokens: int = 4096
    steps: int = 160
    lr: float = 3e-3
    warmup_steps: int = 10
    model: dict = field(default_factory=lambda: dict(MODEL))
    task: str = "needle"
    loss_on: str = "answers"
    samples: int = 8
    depths: tuple = (0.0, 0.25, 0.5, 0.75, 1.0)
    seed: int = 0
    device: str | None = None
    quick: bool = False
    data: tuple | None = None
    overwrite: bool = False
    progress: bool = True

    def __post_init__(self):
        for name in ("seq_len", "batch_tokens", "steps", "samples"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"--{name.replace('_', '-')}: expected an int >= 1, got {v!r}")
        if self.task not in ("needle", "recall", "mix"):
            raise ValueError(f"--task: expected needle, recall or mix, got {self.task!r}")
        if not self.depths or not all(isinstance(d, (int, float)) and 0 <= d <= 1 for d in self.depths):
            raise ValueError(f"--depths: expected numbers in [0, 1], got {self.depths!r}")

    def train_config(self, kind: str, run_dir: str, cache_dir: str):
        """The :class:`nsa.train.TrainConfig` of model ``kind``."""
        from .train import TrainConfig

        return TrainConfig(out=run_dir, preset="tiny", attention=kind, model=dict(self.model), data=self.data,
                           cache_dir=cache_dir, seq_len=self.seq_len, batch_tokens=self.batch_tokens,
                           steps=self.steps, lr=self.lr, warmup_steps=self.warmup_steps, seed=self.seed,
                           eval_every=self.steps // 4 if self.steps >= 40 else 0, eval_batches=4,
                           log_every=max(1, self.steps // 40),
                           device=self.device, task=self.task, loss_on=self.loss_on, progress=self.progress)


def demo_settings(device_type: str, quick: bool = False, **changes) -> DemoConfig:
    """The defaults for a device type (``'cpu'`` or ``'cuda'``), or the ``quick`` sizes,
    with ``changes``."""
    base = QUICK if quick else (CUDA if device_type == "cuda" else CPU)
    return DemoConfig(**{**base, "quick": quick, **changes})


def _prepare_out(out: Path, overwrite: bool):
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out: {out} is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise ValueError(f"--out: {out} is not empty; pass --overwrite to replace the demo in it")
        for name in DEMO_FILES:
            p = out / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    out.mkdir(parents=True, exist_ok=True)


def _keys(model_cfg, kind: str, seq_len: int) -> float:
    c = model_cfg
    k = keys_per_query(seq_len, c.kernel_size, c.stride, c.block_size, c.num_selected, c.window_size)
    return {"nsa": k["nsa"], "full": k["full"], "window": k["win"]}[kind]


def _outcome(models: dict, chance: float) -> list[str]:
    """What the numbers say, in a few lines (printed under the table)."""
    a = {k: models[k]["accuracy"] for k in KINDS}
    lines = []
    met = a["nsa"] >= a["full"] - 0.10 and a["nsa"] >= a["window"] + 0.30
    if met:
        lines.append(f"NSA retrieves the pass key within {100 * max(0.0, a['full'] - a['nsa']):.0f} points of full "
                     f"attention and {100 * (a['nsa'] - a['window']):.0f} points above the window alone.")
        return lines
    if a["full"] < 0.5:
        lines.append(f"Full attention itself retrieves only {100 * a['full']:.0f}% of the keys: this budget of "
                     f"training is too small for the model to learn retrieval, so the comparison says little about "
                     f"NSA (chance is {chance:.0e}; a longer run, `--steps`, or a GPU is the remedy: with the CPU "
                     f"defaults a full-attention model needs more than ten times the demo's tokens before it "
                     f"starts to retrieve, benchmarks/NOTES.md).")
    if a["nsa"] < a["full"] - 0.10:
        lines.append(f"NSA is {100 * (a['full'] - a['nsa']):.0f} points below full attention: its selection has to "
                     f"learn to pick the needle's block from the compressed tokens, which takes longer than full "
                     f"attention's direct lookup.")
    if a["nsa"] < a["window"] + 0.30:
        lines.append(f"NSA is not 30 points above the window alone ({100 * a['nsa']:.0f}% vs "
                     f"{100 * a['window']:.0f}%).")
    return lines


def run_demo(cfg: DemoConfig, echo=print) -> dict:
    """Train the three models, evaluate, write ``summary.json`` and ``demo.png``; returns the
    summary dict (plus ``files``, ``notes`` and ``sample``). ``echo`` prints a line."""
    import torch

    from ._cli_utils import resolve_device
    from .data import find_documents, split_documents
    from .evals._common import import_pyplot
    from .evals.needle import evaluate_needle
    from .evals.task_data import filler_texts
    from .evals.tasks import Filler, needle_sample
    from .train import load_checkpoint_model, load_run_tokenizer, read_metrics, train, training_tokens_per_s

    if not isinstance(cfg, DemoConfig):
        raise ValueError(f"cfg: expected a DemoConfig, got {type(cfg).__name__}")
    device = resolve_device(cfg.device)
    out = Path(cfg.out)
    _prepare_out(out, cfg.overwrite)
    cache = out / "cache"
    model_cfg = cfg.train_config("nsa", str(out / "runs" / "nsa"), str(cache)).model_config()
    keys = {k: _keys(model_cfg, k, cfg.seq_len) for k in KINDS}
    echo(f"nsa demo: three models, same weights' seed and tokens, attention nsa / full / window; "
         f"{cfg.steps} steps x {cfg.batch_tokens:,} tokens of '{cfg.task}' documents of up to {cfg.seq_len} "
         f"tokens; device {_device_name(device)}")
    echo(f"  model: 'tiny' with {', '.join(f'{k}={v}' for k, v in cfg.model.items())}; NSA: compression "
         f"{model_cfg.kernel_size}/{model_cfg.stride}, {model_cfg.num_selected} blocks of {model_cfg.block_size}, "
         f"window {model_cfg.window_size}: {keys['nsa']:.0f} of {keys['full']:.0f} keys per query "
         f"({100 * keys['nsa'] / keys['full']:.0f}%) at {cfg.seq_len} tokens")

    results, curves, needle = {}, {}, {}
    _, val_docs = split_documents(find_documents(cfg.data), 0.05, cfg.seed)
    models = {}
    tokenizer = None
    for kind in KINDS:
        run = out / "runs" / kind
        t0 = time.perf_counter()
        summary = train(cfg.train_config(kind, str(run), str(cache)))
        seconds = time.perf_counter() - t0
        if summary["stopped"]:  # SIGINT / SIGTERM: the trainer saved a checkpoint; the demo stops too
            raise KeyboardInterrupt(f"nsa demo: stopped while training the {kind} model")
        metrics = read_metrics(run)
        curves[kind] = metrics
        model = load_checkpoint_model(run, device=device).eval()
        if tokenizer is None:
            tokenizer = load_run_tokenizer(run)
            filler = Filler(tokenizer, filler_texts(val_docs, max(1 << 18, 16 * cfg.seq_len), f"demo:{cfg.seed}"))
        t1 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            res = evaluate_needle(model, tokenizer, filler, [cfg.seq_len], list(cfg.depths), cfg.samples,
                                  seed=cfg.seed + 1)
        needle[kind] = res
        models[kind] = model
        results[kind] = dict(accuracy=res["mean_accuracy"], val_loss=summary["val_loss"], keys_per_query=keys[kind],
                             tokens_per_s=training_tokens_per_s(metrics))
        echo(f"  {kind:<6} trained in {seconds:5.0f} s ({results[kind]['tokens_per_s']:,.0f} tokens/s), "
             f"val_loss {summary['val_loss']:.3f}; needle accuracy {res['mean_accuracy']:.2f} "
             f"(evaluated in {time.perf_counter() - t1:.0f} s)")

    c = model_cfg
    settings = dict(device=_device_name(device), quick=cfg.quick, seq_len=cfg.seq_len, batch_tokens=cfg.batch_tokens,
                    steps=cfg.steps, tokens=cfg.steps * cfg.batch_tokens, lr=cfg.lr, task=cfg.task,
                    loss_on=cfg.loss_on, seed=cfg.seed, preset="tiny", model=dict(cfg.model),
                    nsa=dict(kernel_size=c.kernel_size, stride=c.stride, block_size=c.block_size,
                             num_selected=c.num_selected, num_initial=c.num_initial, num_local=c.num_local,
                             window_size=c.window_size),
                    keys_fraction=keys["nsa"] / keys["full"], needle_depths=list(cfg.depths),
                    needle_samples_per_depth=cfg.samples, needle_key_digits=needle["nsa"]["key_digits"],
                    chance=needle["nsa"]["chance"], torch=torch.__version__, date=time.strftime("%Y-%m-%d"))
    summary = {"models": results, "settings": settings}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    files = [str(out / "summary.json")]

    echo("")
    echo(f"  {'model':<8}{'needle acc':>11}{'val loss':>10}{'keys/query':>12}{'tokens/s':>10}")
    for kind in KINDS:
        r = results[kind]
        echo(f"  {kind:<8}{r['accuracy']:>11.2f}{r['val_loss']:>10.3f}{r['keys_per_query']:>12.0f}"
             f"{r['tokens_per_s']:>10,.0f}")
    echo("  accuracy by depth (0 = start of the context, 1 = just before the question): "
         + "; ".join(f"{k} " + " ".join(f"{a:.2f}" for a in needle[k]["accuracy_by_depth"]) for k in KINDS))
    notes = _outcome(results, settings["chance"])
    if cfg.quick:
        notes = ["--quick: a smoke test of the pipeline; the models are trained for a few steps only and learn "
                 "nothing (run `nsa demo` without --quick for the comparison)."]
    for line in notes:
        echo("  note: " + line)

    try:
        plt = import_pyplot()
    except RuntimeError as e:
        echo(f"  (no demo.png: {e})")
    else:
        _plot(plt, curves, needle, settings, out / "demo.png")
        files.append(str(out / "demo.png"))

    q = needle_sample(tokenizer, filler, cfg.seq_len, 0.25, f"demo-sample:{cfg.seed}").questions[0]
    gen = models["nsa"].generate([list(q.prompt_ids)], max_new_tokens=len(tokenizer.encode(q.answer)) + 1,
                                 temperature=0.0, eos_token_id=tokenizer.eos_id, vocab_limit=tokenizer.vocab_size)
    from .evals._common import decode_until_eos

    text = decode_until_eos(tokenizer, gen[0])
    tail = q.prompt[-60:].replace("\n", "\\n")
    echo(f"\n  sample (NSA model, generate() with its cache, greedy): ...{tail} -> {text!r} "
         f"(pass key {q.answer}, {'right' if text.startswith(q.answer) else 'wrong'})")
    echo("  wrote " + ", ".join(files) + f" and the runs under {out / 'runs'}")
    return {**summary, "files": files, "notes": notes, "sample": dict(answer=q.answer, generated=text)}


def _device_name(device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"


def _plot(plt, curves, needle, settings, path):
    fig, (ax, hm) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw=dict(width_ratios=[1.2, 1]))
    colors = dict(nsa="C0", full="C1", window="C2")
    for kind in KINDS:
        m = curves[kind]
        steps = [x for x in m if "loss" in x]
        vals = [x for x in m if "val_loss" in x]
        ax.plot([x["tokens"] for x in steps], [x["loss"] for x in steps], color=colors[kind], alpha=0.5, lw=1)
        ax.plot([x["tokens"] for x in vals], [x["val_loss"] for x in vals], "o-", color=colors[kind], ms=3,
                label=f"{kind} (validation)")
    ax.set_xlabel("training tokens")
    ax.set_ylabel(f"loss ({settings['loss_on']} tokens; thin: training)")
    ax.legend(fontsize=8)
    ax.set_title(f"{settings['task']} documents of up to {settings['seq_len']} tokens", fontsize=10)
    acc = [needle[k]["accuracy_by_depth"] for k in KINDS]
    depths = settings["needle_depths"]
    im = hm.imshow(acc, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
    hm.set_xticks(range(len(depths)), [f"{d:g}" for d in depths])
    hm.set_yticks(range(len(KINDS)), list(KINDS))
    hm.set_xlabel(f"needle depth ({settings['seq_len']}-token prompts)")
    for i, row in enumerate(acc):
        for j, v in enumerate(row):
            hm.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8)
    fig.colorbar(im, ax=hm, label="pass-key accuracy")
    hm.set_title(f"needle retrieval ({settings['needle_samples_per_depth']} per cell)", fontsize=10)
    fig.suptitle(f"nsa demo: NSA reads {100 * settings['keys_fraction']:.0f}% of full attention's keys per query "
                 f"({settings['device']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
