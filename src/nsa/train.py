"""Training loop for :class:`nsa.model.LanguageModel`: ``nsa train``.

One function, :func:`train`, takes a validated :class:`TrainConfig` and runs: data
(:mod:`nsa.data`), model, AdamW with warm-up + cosine decay, gradient accumulation and
clipping, bf16 autocast on CUDA (float32 on CPU), periodic evaluation, metrics, checkpoints and
exact resume. Under ``torchrun`` the same call is data-parallel on PyTorch's own engine:
``--parallel ddp`` (DistributedDataParallel) or ``fsdp`` (FSDP2 ``fully_shard`` per block,
then the root, with a bf16 ``MixedPrecisionPolicy`` on CUDA); NCCL on GPUs, gloo on CPU. The
model stays single-device code; :func:`parallelize` applies the parallelism from outside.

Run directory ``--out DIR``::

    DIR/config.json          {"model": ModelConfig, "train": TrainConfig}
    DIR/metrics.jsonl        one JSON object per logged step (step, tokens, loss, lr, grad_norm,
                             tokens_per_s) and per evaluation (step, tokens, val_loss)
    DIR/tokenizer/           the tokenizer (nsa.data.load_tokenizer reads it)
    DIR/checkpoint/          model.safetensors + config.json (LanguageModel.from_pretrained reads
                             it), optimizer.pt, trainer_state.json (step, tokens, data position),
                             rng.pt

Only rank 0 writes. A checkpoint is written into a temporary directory and renamed over the
previous one, so an interrupted save never leaves a broken checkpoint. SIGINT / SIGTERM finish
the current step, save a checkpoint and exit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from .data import (DocumentBatches, PackedBatches, cached_tokenizer, eval_batches, find_documents, load_corpus,
                   load_tokenizer)
from .model import LanguageModel, ModelConfig

__all__ = ["TrainConfig", "train", "parallelize", "evaluate", "lr_at", "config_from_sources", "load_checkpoint_model",
           "load_run_tokenizer", "RUN_FILES",
           "read_metrics", "training_tokens_per_s"]

# What a run writes into --out (and what --overwrite removes).
RUN_FILES = ("config.json", "metrics.jsonl", "tokenizer", "checkpoint")
CHECKPOINT = "checkpoint"
TASKS = ("lm", "needle", "recall", "mix")  # nsa.evals.tasks.TASKS (not imported: that pulls in the evaluators)


@dataclass(frozen=True)
class TrainConfig:
    """Everything ``nsa train`` takes (a TOML file's keys are these names, with ``model`` a table
    of :class:`nsa.model.ModelConfig` fields overriding the preset).

    Batch: ``batch_tokens`` tokens per optimizer step over all ranks; each rank processes
    ``grad_accum`` micro-batches of ``batch_tokens / (world_size * grad_accum)`` tokens, packed
    documents cut at ``seq_len``. The micro-batches of a step are the same whatever the split
    between ranks and accumulation, so N processes equal one process with ``grad_accum * N``.

    Args:
        out: run directory. preset, attention, model: the model (:meth:`model_config`).
        data: paths of text files, directories or globs (None: the default corpus, see
            :func:`nsa.data.find_documents`); tokenizer: ``'byte'``, ``'bpe:VOCAB'`` or a saved
            tokenizer directory; cache_dir: where token stores are cached (default
            ``~/.cache/nsa/tokens``); val_fraction: share of documents held out.
        seq_len, batch_tokens, grad_accum: the batch (above). steps or tokens: the run's length.
        lr, min_lr_ratio, warmup_steps: the schedule (:func:`lr_at`); weight_decay, beta1, beta2:
            AdamW (no decay on vectors); grad_clip: max gradient norm (0: none).
        dtype: ``'bf16'`` (autocast, or FSDP2's bf16 parameters) or ``'fp32'``; default bf16 on
            CUDA, fp32 on CPU. compile: ``torch.compile`` each block; activation_checkpointing:
            recompute each block in the backward.
        seed: weights and data order. eval_every, eval_batches: validation every N steps (and
            at the end) on that many batches. log_every, checkpoint_every: metrics lines and
            checkpoints every N steps (and at the end).
        parallel: ``'ddp'`` or ``'fsdp'`` under torchrun. context_parallel: P > 1 splits every
            micro-batch's sequence over P ranks (:mod:`nsa.parallel`; ``attention='nsa'``, under
            torchrun with a multiple of P processes: a 2-D device mesh ``(dp, cp)``, the data
            parallelism over the ``dp`` groups). device: ``cpu``, ``cuda`` or
            ``cuda:N`` (default: cuda when available; under torchrun each rank takes
            ``cuda:LOCAL_RANK``). resume / overwrite: continue / replace the run in ``out``.
        progress: a tqdm progress bar on rank 0.
        task: ``'lm'`` trains on the documents themselves; ``'needle'``, ``'recall'`` or ``'mix'``
            on seeded retrieval documents made from them (:mod:`nsa.evals.task_data`, cached
            under ``cache_dir``), each at most ``seq_len`` tokens and packed whole (padded,
            never cut: :class:`nsa.data.DocumentBatches`). loss_on: ``'all'`` tokens, or only
            the ``'answers'`` of task documents (from a needle's key, or a recall sample's first
            queried key, to its end; plain filler documents keep every token).
    """

    out: str
    preset: str = "tiny"
    attention: str = "nsa"
    model: dict = field(default_factory=dict)
    data: tuple | None = None
    tokenizer: str = "byte"
    cache_dir: str | None = None
    val_fraction: float = 0.05
    seq_len: int = 512
    batch_tokens: int = 8192
    grad_accum: int = 1
    steps: int | None = None
    tokens: int | None = None
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int | None = None
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    dtype: str | None = None
    compile: bool = False
    activation_checkpointing: bool = False
    seed: int = 0
    eval_every: int = 0
    eval_batches: int = 8
    log_every: int = 10
    checkpoint_every: int = 0
    parallel: str = "ddp"
    context_parallel: int = 1
    device: str | None = None
    resume: bool = False
    overwrite: bool = False
    progress: bool = True
    task: str = "lm"
    loss_on: str = "all"

    def __post_init__(self):
        if not isinstance(self.out, str) or not self.out:
            raise ValueError(f"--out: expected a directory path, got {self.out!r}")
        for name in ("seq_len", "batch_tokens", "grad_accum", "eval_batches", "log_every", "context_parallel"):
            _check_int(name, getattr(self, name), 1)
        for name in ("eval_every", "checkpoint_every", "seed"):
            _check_int(name, getattr(self, name), 0)
        for name in ("steps", "tokens", "warmup_steps"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), 0 if name == "warmup_steps" else 1)
        if (self.steps is None) == (self.tokens is None):
            raise ValueError("--steps / --tokens: give exactly one of them")
        for name, lo, hi in (("lr", 0, math.inf), ("min_lr_ratio", 0, 1), ("weight_decay", 0, math.inf),
                             ("beta1", 0, 1), ("beta2", 0, 1), ("val_fraction", 0, 1), ("grad_clip", 0, math.inf)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi or math.isnan(v):
                raise ValueError(f"--{_opt(name)}: expected a number in [{lo}, {hi}], got {v!r}")
        if self.lr <= 0:
            raise ValueError(f"--lr: expected a positive number, got {self.lr!r}")
        if self.parallel not in ("ddp", "fsdp"):
            raise ValueError(f"--parallel: expected 'ddp' or 'fsdp', got {self.parallel!r}")
        if self.context_parallel > 1 and self.model.get("attention", self.attention) != "nsa":
            raise ValueError(f"--context-parallel: splits sequences of attention='nsa' models, got "
                             f"attention={self.model.get('attention', self.attention)!r}")
        if self.dtype is not None and self.dtype not in ("bf16", "fp32"):
            raise ValueError(f"--dtype: expected bf16 or fp32, got {self.dtype!r}")
        if not isinstance(self.model, dict):
            raise ValueError(f"--model: expected a table of ModelConfig fields, got {self.model!r}")
        if self.data is not None and (not isinstance(self.data, (list, tuple)) or not self.data):
            raise ValueError(f"--data: expected one or more paths, got {self.data!r}")
        if self.resume and self.overwrite:
            raise ValueError("--resume / --overwrite: give at most one of them")
        if self.task not in TASKS:
            raise ValueError(f"--task: expected one of {', '.join(TASKS)}, got {self.task!r}")
        if self.loss_on not in ("all", "answers"):
            raise ValueError(f"--loss-on: expected 'all' or 'answers', got {self.loss_on!r}")
        if self.loss_on == "answers" and self.task == "lm":
            raise ValueError("--loss-on: 'answers' needs a retrieval --task (needle, recall or mix)")

    def model_config(self, vocab_size: int | None = None) -> ModelConfig:
        """The model's config: the preset, ``attention``, then the ``model`` overrides; the
        vocabulary grows to fit the tokenizer (rounded up to a multiple of 64) unless set."""
        overrides = dict(self.model)
        unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(ModelConfig)})
        if unknown:
            raise ValueError(f"--model: unknown ModelConfig fields {unknown}")
        overrides.setdefault("attention", self.attention)
        cfg = ModelConfig.preset(self.preset, **overrides)
        if vocab_size is not None and cfg.vocab_size < vocab_size:
            if "vocab_size" in overrides:
                raise ValueError(f"--model: vocab_size={cfg.vocab_size} is smaller than the tokenizer's {vocab_size}")
            cfg = cfg.replace(vocab_size=-(-vocab_size // 64) * 64)
        if self.seq_len > cfg.max_seq_len:
            raise ValueError(f"--seq-len: {self.seq_len} exceeds the model's max_seq_len ({cfg.max_seq_len}); "
                             f"raise it with --model max_seq_len=N")
        return cfg

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["data"] = list(self.data) if self.data is not None else None
        return d


def _opt(name):
    return name.replace("_", "-")


def _check_int(name, v, lo):
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"--{_opt(name)}: expected an int >= {lo}, got {v!r}")


# ---- distributed --------------------------------------------------------------------------------

@dataclass
class _Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    mesh: object = None
    cp: int = 1  # context-parallel ranks per data-parallel group
    cp_group: object = None

    @property
    def dp_rank(self) -> int:
        """The data-parallel group of this rank (the ranks of one group split the same batch)."""
        return self.rank // self.cp

    @property
    def dp_size(self) -> int:
        return self.world_size // self.cp

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """Under torchrun (even with one process: the same DDP / FSDP2 code path runs)."""
        return self.mesh is not None


def _init_distributed(device_text, cp: int = 1) -> tuple[_Dist, torch.device]:
    """Joins the torchrun process group when started by torchrun (``RANK`` and ``WORLD_SIZE`` in
    the environment), also with one process, so that ``--nproc_per_node=1`` runs the same
    DDP / FSDP2 code as N processes. With ``cp > 1`` ranks form a ``(dp, cp)`` device mesh: the
    ``cp`` consecutive ranks of a data-parallel group split its sequences."""
    from ._cli_utils import resolve_device

    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        if cp > 1:
            raise ValueError(f"--context-parallel: {cp} ranks need torchrun (--nproc_per_node a multiple of {cp})")
        return _Dist(), resolve_device(device_text)
    world = int(os.environ["WORLD_SIZE"])
    if world % cp:
        raise ValueError(f"--context-parallel: {cp} must divide the number of processes ({world})")
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    base = resolve_device(device_text)
    if base.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", device_id=device if device.type == "cuda"
                                else None)
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device.type, (world,), mesh_dim_names=("dp",))
    cp_group = None
    if cp > 1:  # the context-parallel dimension of a (dp, cp) mesh; data parallelism spans every rank
        cp_group = init_device_mesh(device.type, (world // cp, cp), mesh_dim_names=("dp", "cp"))["cp"].get_group()
    return _Dist(rank, world, local, mesh, cp, cp_group), device


def parallelize(model: LanguageModel, how: str, mesh, device: torch.device, bf16: bool):
    """Data parallelism applied from outside the model: ``'ddp'`` wraps it in
    DistributedDataParallel; ``'fsdp'`` applies FSDP2 ``fully_shard`` to every block, then to
    the root (embedding, final norm and the LM head, tied or not), with a bf16
    ``MixedPrecisionPolicy`` (float32 reductions) when ``bf16``. Returns the module to train."""
    if how == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else \
        MixedPrecisionPolicy()
    for block in model.blocks:
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model


def _all_mean(values: list[float], d: _Dist, device) -> list[float]:
    if not d.distributed:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return (t / d.world_size).tolist()


# ---- schedule, optimizer ------------------------------------------------------------------------

def lr_at(step: int, cfg: TrainConfig, total_steps: int) -> float:
    """Linear warm-up over ``warmup_steps`` (default: 2% of the run, at least 1), then cosine
    decay to ``lr * min_lr_ratio`` at the last step. ``step`` counts from 0."""
    warm = cfg.warmup_steps if cfg.warmup_steps is not None else max(1, round(0.02 * total_steps))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    span = max(1, total_steps - warm)
    frac = min(1.0, (step - warm) / span)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


def _optimizer(model, cfg: TrainConfig, device):
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [dict(params=decay, weight_decay=cfg.weight_decay), dict(params=no_decay, weight_decay=0.0)]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=device.type == "cuda")


# ---- checkpoints --------------------------------------------------------------------------------

def _state_dicts(model, opt):
    """Full (unsharded, CPU) model and optimizer state dicts keyed by parameter names; works
    for a plain module, DDP and FSDP2 alike (collective: every rank calls it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    return get_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _save_checkpoint(run: Path, model, raw: LanguageModel, opt, state: dict, d: _Dist):
    msd, osd = _state_dicts(model, opt)
    if d.main:
        tmp = run / f".{CHECKPOINT}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        from safetensors.torch import save_file

        # Tied weights are one tensor in the state dict under two names: store the embedding once.
        if raw.config.tie_embeddings:
            msd = {k: v for k, v in msd.items() if k != "lm_head.weight"}
        save_file({k: v.contiguous() for k, v in msd.items()}, str(tmp / "model.safetensors"))
        (tmp / "config.json").write_text(json.dumps(raw.config.to_dict(), indent=2))
        torch.save(osd, tmp / "optimizer.pt")
        torch.save({"cpu": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}, tmp / "rng.pt")
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2))
        final, old = run / CHECKPOINT, run / f".{CHECKPOINT}.old"
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    if d.distributed:
        dist.barrier()


def _load_checkpoint(run: Path, model, raw: LanguageModel, opt) -> dict:
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    ck = run / CHECKPOINT
    msd = load_file(str(ck / "model.safetensors"))
    if raw.config.tie_embeddings:
        msd["lm_head.weight"] = msd["embed.weight"]
    osd = torch.load(ck / "optimizer.pt", map_location="cpu", weights_only=True)
    set_state_dict(model, opt, model_state_dict=msd, optim_state_dict=osd,
                   options=StateDictOptions(full_state_dict=True, strict=True))
    rng = torch.load(ck / "rng.pt", map_location="cpu", weights_only=False)
    torch.set_rng_state(rng["cpu"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return json.loads((ck / "trainer_state.json").read_text())


def load_checkpoint_model(path: str | os.PathLike, device=None, **overrides) -> LanguageModel:
    """The model of a run directory (``DIR/checkpoint``) or of a checkpoint / saved-model directory,
    in float32 on ``device`` (default CPU); ``overrides`` as in
    :meth:`nsa.model.LanguageModel.from_pretrained` (e.g. ``backend='reference'``)."""
    p = Path(path)
    if (p / CHECKPOINT / "model.safetensors").is_file():
        p = p / CHECKPOINT
    return LanguageModel.from_pretrained(p, device=device, **overrides)


def read_metrics(run: str | os.PathLike) -> list[dict]:
    """The records of a run's ``metrics.jsonl`` (one dict per logged step or evaluation)."""
    text = (Path(run) / "metrics.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def training_tokens_per_s(metrics: list[dict]) -> float:
    """Training tokens per second of a run from its :func:`read_metrics` records: tokens over
    the seconds the logged intervals took, leaving out the intervals that hold an evaluation (the
    trainer evaluates right after logging a step) and, when there are others, the first one (a
    process's first forward and backward import and initialise much of torch: seconds to a
    minute on a busy CPU). NaN when no interval is left."""
    evals = {m["step"] for m in metrics if "val_loss" in m}
    logged = [m for m in metrics if "tokens_per_s" in m]
    if len(logged) > 1:
        evals.add(0)
    seconds, tokens, last_tokens, last_step = 0.0, 0, 0, 0
    for m in logged:
        if last_step not in evals:
            seconds += (m["tokens"] - last_tokens) / max(m["tokens_per_s"], 1e-9)
            tokens += m["tokens"] - last_tokens
        last_tokens, last_step = m["tokens"], m["step"]
    return tokens / seconds if seconds else float("nan")


def load_run_tokenizer(path: str | os.PathLike):
    """The tokenizer saved in a run directory (or beside a checkpoint inside it)."""
    p = Path(path)
    for cand in (p / "tokenizer", p.parent / "tokenizer"):
        if cand.is_dir():
            return load_tokenizer(cand)
    raise ValueError(f"--checkpoint: no tokenizer/ directory in {p} or {p.parent}")


def _truncate_metrics(path: Path, step: int):
    """Drops the metrics of steps after the checkpoint (a run killed between checkpoints logged
    steps that the resumed run repeats)."""
    if not path.is_file():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)


def _prepare_run_dir(run: Path, cfg: TrainConfig):
    """Refuses to write over an earlier run unless --resume or --overwrite."""
    existing = [n for n in RUN_FILES if (run / n).exists()]
    if cfg.resume:
        if not (run / CHECKPOINT / "trainer_state.json").is_file():
            raise ValueError(f"--resume: {run} holds no checkpoint to resume from")
        return
    if existing and not cfg.overwrite:
        raise ValueError(f"--out: {run} already holds a run ({', '.join(existing)}); pass --resume to continue it "
                         f"or --overwrite to replace it")
    for n in existing:
        target = run / n
        shutil.rmtree(target) if target.is_dir() else target.unlink()


# ---- the loop -----------------------------------------------------------------------------------

class _Stop:
    """Turns SIGINT / SIGTERM into a request to checkpoint and stop after the current step."""

    def __init__(self):
        self.requested = False
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _batch_loss(model, b: dict, device, d: _Dist) -> torch.Tensor:
    """The mean loss of batch ``b``; with context parallelism this rank's share of the sequence
    runs and its part of the mean comes back times ``d.cp`` (gradients averaged over every rank
    then equal those of the whole batch's mean)."""
    ids, cu, labels = b["input_ids"].to(device), b["cu_seqlens"].to(device), b["labels"].to(device)
    if d.cp == 1:
        return model(ids, cu_seqlens=cu, labels=labels).loss
    from .parallel import ContextParallel, SequenceShards

    shards = SequenceShards(ids.shape[1], d.cp, cu_seqlens=b["cu_seqlens"].cpu())
    cp = ContextParallel(shards, group=d.cp_group, device=device)
    rank = dist.get_rank(d.cp_group)
    return model(shards.shard(ids, rank), labels=labels, context=cp).loss * d.cp


@torch.no_grad()
def evaluate(model, batches: list[dict], device, autocast, d: _Dist) -> float:
    """Mean validation loss over ``batches`` (split over the data-parallel groups)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i, b in enumerate(batches):
        if i % d.dp_size != d.dp_rank:
            continue
        with autocast():
            loss = _batch_loss(model, b, device, d)
        total += float(loss)
        count += 1
    if d.distributed:
        t = torch.tensor([total, count], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        total, count = t.tolist()
    model.train(was_training)
    return total / max(count, 1)


def train(cfg: TrainConfig) -> dict:
    """Runs (or resumes) a training run; returns a summary dict: ``step``, ``tokens``, ``loss``
    (last training loss), ``val_loss`` (last validation loss), ``out``, ``stopped`` (by a signal,
    after a checkpoint), ``num_parameters``, ``world_size``."""
    if not isinstance(cfg, TrainConfig):
        raise ValueError(f"cfg: expected a TrainConfig, got {type(cfg).__name__}")
    d, device = _init_distributed(cfg.device, cfg.context_parallel)
    run = Path(cfg.out)
    micro = cfg.batch_tokens // (d.dp_size * cfg.grad_accum)
    if micro * d.dp_size * cfg.grad_accum != cfg.batch_tokens:
        raise ValueError(f"--batch-tokens: {cfg.batch_tokens} must be a multiple of data-parallel groups x "
                         f"grad_accum = {d.dp_size} x {cfg.grad_accum}")
    if micro < 2 * d.cp:
        raise ValueError(f"--batch-tokens: micro-batches of {micro} tokens cannot be split over "
                         f"--context-parallel {d.cp} ranks (2 chunks each)")
    cache_dir = cfg.cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "nsa", "tokens")
    if d.main:
        _prepare_run_dir(run, cfg)
        if not cfg.resume:
            # Only rank 0 trains a BPE (cached beside the token stores); the others load what it saved.
            tokenizer = cached_tokenizer(cfg.tokenizer, find_documents(cfg.data), cache_dir)
            model_cfg = cfg.model_config(tokenizer.vocab_size)  # fails early on a bad model option
            run.mkdir(parents=True, exist_ok=True)
            tokenizer.save(run / "tokenizer")
    if d.distributed:
        dist.barrier()
    tokenizer = load_tokenizer(run / "tokenizer")
    model_cfg = cfg.model_config(tokenizer.vocab_size)
    if cfg.resume:
        saved = ModelConfig.from_dict(json.loads((run / "config.json").read_text())["model"])
        if saved != model_cfg:
            raise ValueError(f"--resume: the options describe another model than the run in {run} "
                             f"(run: {saved}; options: {model_cfg})")
    total_steps = cfg.steps if cfg.steps is not None else -(-cfg.tokens // cfg.batch_tokens)
    # Task documents are sized for the run's first length: a resumed run given a new length
    # trains on the same documents (a new corpus would not match the data position).
    first = json.loads((run / "config.json").read_text())["train"] if cfg.resume else cfg.to_dict()
    corpus_tokens = (first["steps"] * first["batch_tokens"] if first.get("steps") is not None
                     else first["tokens"])

    def stores(progress=False):
        if cfg.task == "lm":
            return (*load_corpus(cfg.data, tokenizer, cache_dir, cfg.val_fraction, cfg.seed, progress=progress),
                    None, None)
        from .evals.task_data import task_stores

        return task_stores(cfg.task, cfg.data, tokenizer, cache_dir, cfg.seq_len, corpus_tokens,
                           cfg.eval_batches * cfg.batch_tokens, cfg.val_fraction, cfg.seed, progress=progress)

    if d.main:
        train_store, val_store, train_from, val_from = stores(cfg.progress)
    if d.distributed:
        dist.barrier()  # rank 0 built the token cache (and the task documents); the others open it
    if not d.main:
        train_store, val_store, train_from, val_from = stores()
    if cfg.loss_on == "all":
        train_from = val_from = None

    torch.manual_seed(cfg.seed)
    raw = LanguageModel(model_cfg).to(device)
    raw.activation_checkpointing = cfg.activation_checkpointing
    bf16 = (cfg.dtype or ("bf16" if device.type == "cuda" else "fp32")) == "bf16"
    fsdp = d.distributed and cfg.parallel == "fsdp"
    model = parallelize(raw, cfg.parallel, d.mesh, device, bf16) if d.distributed else raw
    opt = _optimizer(model, cfg, device)
    if cfg.compile:
        for block in raw.blocks:
            block.compile()

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16 and not fsdp)

    if cfg.task == "lm":
        batches = PackedBatches(train_store, micro, cfg.seq_len, seed=cfg.seed, rank=d.dp_rank,
                                world_size=d.dp_size)
    else:
        batches = DocumentBatches(train_store, micro, cfg.seq_len, seed=cfg.seed, rank=d.dp_rank,
                                  world_size=d.dp_size, loss_from=train_from)
    val = eval_batches(val_store, micro, cfg.seq_len, cfg.eval_batches, documents=cfg.task != "lm",
                       loss_from=val_from)
    step, tokens = 0, 0
    if cfg.resume:
        state = _load_checkpoint(run, model, raw, opt)
        step, tokens = state["step"], state["tokens"]
        batches.load_state_dict(state["data"])
        if d.main:
            _truncate_metrics(run / "metrics.jsonl", step)
    elif d.main:
        (run / "config.json").write_text(json.dumps({"model": model_cfg.to_dict(), "train": cfg.to_dict()},
                                                    indent=2))
    metrics = open(run / "metrics.jsonl", "a") if d.main else None

    def log(obj):
        if metrics is not None:
            metrics.write(json.dumps(obj) + "\n")
            metrics.flush()

    def checkpoint_now():
        _save_checkpoint(run, model, raw, opt, {"step": step, "tokens": tokens, "data": batches.state_dict(),
                                                "total_steps": total_steps}, d)

    bar = None
    if d.main and cfg.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total_steps, initial=step, unit="step", dynamic_ncols=True)
    last_loss, val_loss, stopped = None, None, False
    model.train()
    t_last, tok_last = time.perf_counter(), tokens
    with _Stop() as stop:
        while step < total_steps:
            lr = lr_at(step, cfg, total_steps)
            for g in opt.param_groups:
                g["lr"] = lr
            losses = []
            for m in range(cfg.grad_accum):
                b = next(batches)
                with _grad_sync(model, m == cfg.grad_accum - 1, d, fsdp):
                    with autocast():
                        loss = _batch_loss(model, b, device, d)
                    (loss / cfg.grad_accum).backward()
                losses.append(loss.detach())
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(),
                                                       cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
            if hasattr(grad_norm, "full_tensor"):
                grad_norm = grad_norm.full_tensor()
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            tokens += cfg.batch_tokens
            loss, = _all_mean([float(torch.stack(losses).mean())], d, device)
            last_loss = loss
            if step % cfg.log_every == 0 or step == total_steps:
                now = time.perf_counter()
                tps = (tokens - tok_last) / max(now - t_last, 1e-9)
                t_last, tok_last = now, tokens
                log(dict(step=step, tokens=tokens, loss=loss, lr=lr, grad_norm=float(grad_norm), tokens_per_s=tps))
                if bar is not None:
                    bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tps:,.0f}")
            if bar is not None:
                bar.update(1)
            if cfg.eval_every and step % cfg.eval_every == 0 and step < total_steps:
                val_loss = evaluate(model, val, device, autocast, d)
                log(dict(step=step, tokens=tokens, val_loss=val_loss))
            requested = _any_rank(stop.requested, d, device)
            if requested or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < total_steps):
                checkpoint_now()
            if requested:
                stopped = True
                break
    if not stopped:
        val_loss = evaluate(model, val, device, autocast, d)
        log(dict(step=step, tokens=tokens, val_loss=val_loss))
        checkpoint_now()
    if bar is not None:
        bar.close()
    if metrics is not None:
        metrics.close()
    return dict(step=step, tokens=tokens, loss=last_loss, val_loss=val_loss, out=str(run), stopped=stopped,
                num_parameters=raw.num_parameters(), world_size=d.world_size)


def _grad_sync(model, sync: bool, d: _Dist, fsdp: bool):
    """Only the last micro-batch of a step reduces gradients across ranks (DDP's ``no_sync``,
    FSDP2's ``set_requires_gradient_sync``)."""
    if not d.distributed:
        return contextlib.nullcontext()
    if fsdp:
        model.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()
    return contextlib.nullcontext() if sync else model.no_sync()


def _any_rank(flag: bool, d: _Dist, device) -> bool:
    if not d.distributed:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def config_from_sources(options: dict, config_file: str | None = None) -> TrainConfig:
    """The :class:`TrainConfig` of a command line: TrainConfig's defaults, overridden by the
    run's saved config when ``resume`` (so ``nsa train --out DIR --resume`` needs nothing else),
    then by the TOML ``config_file``, then by ``options`` (the flags actually given). The TOML
    file's keys are TrainConfig's field names (dashes or underscores), ``model`` a table of
    ModelConfig fields; unknown keys are a ValueError naming them. ``model`` tables merge."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    merged: dict = {}
    file_values: dict = {}
    if config_file is not None:
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            raise ValueError("--config: reading TOML needs Python >= 3.11") from None
        try:
            with open(config_file, "rb") as f:
                raw = tomllib.load(f)
        except OSError as e:
            raise ValueError(f"--config: cannot read {config_file}: {e.strerror}") from None
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"--config: {config_file} is not valid TOML: {e}") from None
        file_values = {k.replace("-", "_"): v for k, v in raw.items()}
        unknown = sorted(set(file_values) - names)
        if unknown:
            raise ValueError(f"--config: unknown keys {unknown} in {config_file}; expected some of {sorted(names)}")
    resume = options.get("resume", file_values.get("resume", False))
    out = options.get("out", file_values.get("out"))
    if resume and out is not None and (Path(out) / "config.json").is_file():
        saved = json.loads((Path(out) / "config.json").read_text())["train"]
        merged.update({k: v for k, v in saved.items() if k in names and k not in ("resume", "overwrite")})
    for source in (file_values, options):
        for k, v in source.items():
            if k == "model":
                merged["model"] = {**merged.get("model", {}), **v}
            else:
                merged[k] = v
    if "out" not in merged:
        raise ValueError("--out: a run directory is required")
    if isinstance(merged.get("data"), str):
        merged["data"] = [merged["data"]]
    if merged.get("data") is not None:
        merged["data"] = tuple(merged["data"])
    # A resumed run given a new length replaces the saved one rather than conflicting with it.
    if "steps" in options or "steps" in file_values:
        if "tokens" not in options and "tokens" not in file_values:
            merged["tokens"] = None
    if "tokens" in options or "tokens" in file_values:
        if "steps" not in options and "steps" not in file_values:
            merged["steps"] = None
    if merged.get("steps") is None and merged.get("tokens") is None:
        merged["steps"] = 1000
    return TrainConfig(**merged)
