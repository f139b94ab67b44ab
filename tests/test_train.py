"""nsa.train and the `nsa train` / `nsa generate` commands: outputs, exact resume, data
parallelism (2 gloo processes == 1 process), bad input."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from nsa import train as train_mod
from nsa.cli import main
from nsa.train import TrainConfig, train
from tests.helpers import write_small_corpus

# A model small enough for a few CPU steps per second on the reference backend, every NSA
# branch active at seq_len 64.
MODEL = dict(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16, intermediate_size=64,
             kernel_size=8, stride=4, block_size=8, num_selected=3, num_local=1, window_size=16)
MODEL_FLAGS = [f"--model={k}={v}" for k, v in MODEL.items()]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Eight small text documents (the first lines of some standard-library modules)."""
    return write_small_corpus(tmp_path_factory.mktemp("corpus"))


def config(tmp_path, corpus, **kw):
    base = dict(out=str(tmp_path / "run"), data=(str(corpus),), cache_dir=str(tmp_path / "cache"), model=MODEL,
                seq_len=64, batch_tokens=256, steps=4, log_every=1, eval_batches=2, progress=False,
                val_fraction=0.25, warmup_steps=1)
    base.update(kw)
    return TrainConfig(**base)


def read_metrics(run):
    return [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]


def test_train_writes_the_run(tmp_path, corpus):
    summary = train(config(tmp_path, corpus, steps=4, eval_every=2))
    run = tmp_path / "run"
    assert summary["step"] == 4 and summary["tokens"] == 4 * 256 and not summary["stopped"]
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["model"]["hidden_size"] == 32 and cfg["train"]["steps"] == 4
    lines = read_metrics(run)
    steps = [m for m in lines if "loss" in m]
    evals = [m for m in lines if "val_loss" in m]
    assert [m["step"] for m in steps] == [1, 2, 3, 4]
    assert all(set(m) == {"step", "tokens", "loss", "lr", "grad_norm", "tokens_per_s"} for m in steps)
    assert [m["step"] for m in evals] == [2, 4]  # every 2 steps, and always at the end
    ck = run / "checkpoint"
    assert {p.name for p in ck.iterdir()} == {"model.safetensors", "config.json", "optimizer.pt", "rng.pt",
                                             "trainer_state.json"}
    state = json.loads((ck / "trainer_state.json").read_text())
    assert state["step"] == 4 and state["data"]["batches"] == 4
    model = train_mod.load_checkpoint_model(run)
    assert model.num_parameters() == summary["num_parameters"]


def test_training_lowers_the_loss(tmp_path, corpus):
    train(config(tmp_path, corpus, steps=15, lr=3e-3, log_every=5, eval_every=0, eval_batches=4))
    lines = read_metrics(tmp_path / "run")
    # At initialisation the loss is log(320) = 5.77 (uniform over the byte vocabulary).
    assert lines[-1]["val_loss"] < 5.0, lines


@pytest.mark.parametrize("attention", ["nsa", "full"])
def test_resume_is_bit_identical(tmp_path, corpus, monkeypatch, attention):
    """Stopping at step 3 (a real SIGINT) and resuming gives the uninterrupted run's losses."""
    whole = train(config(tmp_path / "a", corpus, steps=6, attention=attention))
    assert not whole["stopped"]
    real_lr_at = train_mod.lr_at

    def lr_at(step, cfg, total):
        if step == 2:  # during the third step
            os.kill(os.getpid(), signal.SIGINT)
        return real_lr_at(step, cfg, total)

    monkeypatch.setattr(train_mod, "lr_at", lr_at)
    first = train(config(tmp_path / "b", corpus, steps=6, attention=attention))
    assert first["stopped"] and first["step"] == 3
    monkeypatch.setattr(train_mod, "lr_at", real_lr_at)
    with pytest.raises(ValueError, match="--out"):  # neither --resume nor --overwrite
        train(config(tmp_path / "b", corpus, steps=6, attention=attention))
    # A run killed after logging steps past its checkpoint: the resumed run drops those lines.
    with open(tmp_path / "b" / "run" / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 4, "tokens": 1024, "loss": 99.0}) + "\n")
    second = train(config(tmp_path / "b", corpus, steps=6, attention=attention, resume=True))
    assert second["step"] == 6 and not second["stopped"]
    a, b = read_metrics(tmp_path / "a" / "run"), read_metrics(tmp_path / "b" / "run")
    key = [(m["step"], m.get("loss"), m.get("grad_norm"), m.get("val_loss")) for m in a]
    assert key == [(m["step"], m.get("loss"), m.get("grad_norm"), m.get("val_loss")) for m in b]


@pytest.mark.parametrize("task", ["needle", "recall", "mix"])
def test_task_documents(tmp_path, corpus, task):
    """--task trains on seeded retrieval documents made from --data: whole documents of at most
    seq_len tokens per sequence, each batch padded; the same options give the same documents."""
    cfg = config(tmp_path, corpus, task=task, seq_len=200, batch_tokens=512, steps=2, loss_on="answers",
                 model={**MODEL, "max_seq_len": 256})
    summary = train(cfg)
    assert summary["step"] == 2 and summary["val_loss"] is not None
    roots = list((tmp_path / "cache").glob("task-*"))
    assert len(roots) == 1
    meta = json.loads((roots[0] / "corpus.json").read_text())
    texts = [p.read_text() for p in sorted((roots[0] / "train").glob("*.txt"))]
    assert meta["train"]["files"] == len(texts) >= 16 and meta["task"] == task
    assert all(len(t.encode()) + 2 <= 200 for t in texts)  # byte tokenizer: bos + text + eos fit seq_len
    asked = {"needle": "What is the pass key?", "recall": "Recall:"}
    for text, start in zip(texts, meta["train"]["loss_from"]):
        if start >= 0:  # the answers begin right after the question
            assert any(text[:start - 1].endswith(q + "\n") for q in asked.values()) or \
                "Recall:" in text[:start - 1], text[start - 30:start]
    if task != "mix":
        assert all(asked[task] in t for t in texts)
    # the same run again finds the same documents (nothing regenerated)
    mtimes = {p: p.stat().st_mtime_ns for p in (roots[0] / "train").glob("*.txt")}
    train(config(tmp_path, corpus, task=task, seq_len=200, batch_tokens=512, steps=2, loss_on="answers",
                 model={**MODEL, "max_seq_len": 256}, overwrite=True))
    assert {p: p.stat().st_mtime_ns for p in (roots[0] / "train").glob("*.txt")} == mtimes


def test_task_resume_is_bit_identical(tmp_path, corpus, monkeypatch):
    kw = dict(task="mix", loss_on="answers", seq_len=200, batch_tokens=512, steps=5,
              model={**MODEL, "max_seq_len": 256})
    train(config(tmp_path / "a", corpus, **kw))
    real_lr_at = train_mod.lr_at

    def lr_at(step, cfg, total):
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return real_lr_at(step, cfg, total)

    monkeypatch.setattr(train_mod, "lr_at", lr_at)
    assert train(config(tmp_path / "b", corpus, **kw))["stopped"]
    monkeypatch.setattr(train_mod, "lr_at", real_lr_at)
    assert train(config(tmp_path / "b", corpus, **kw, resume=True))["step"] == 5
    a, b = read_metrics(tmp_path / "a" / "run"), read_metrics(tmp_path / "b" / "run")
    key = [(m["step"], m.get("loss"), m.get("grad_norm"), m.get("val_loss")) for m in a]
    assert key == [(m["step"], m.get("loss"), m.get("grad_norm"), m.get("val_loss")) for m in b]
    # resumed to a new length: the same documents (sized for the first length), two more steps
    assert train(config(tmp_path / "b", corpus, **{**kw, "steps": 7}, resume=True))["step"] == 7


def _torchrun_losses(tmp_path, corpus, name, nproc, extra):
    out = tmp_path / name
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "nsa.cli", "train", "--out", str(out), "--data", str(corpus), "--cache-dir", str(tmp_path / "cache"),
           "--seq-len", "64", "--batch-tokens", "256", "--steps", "3", "--log-every", "1", "--eval-batches", "2",
           "--val-fraction", "0.25", "--warmup-steps", "1", "--no-progress", "--device", "cpu", *MODEL_FLAGS, *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return [m for m in read_metrics(out)]


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_gloo_processes_equal_one(tmp_path, corpus, parallel):
    """2 processes (torchrun, gloo) and 1 process with 2 accumulated micro-batches see the same
    micro-batches per step: the same losses, gradient norms and validation loss."""
    two = _torchrun_losses(tmp_path, corpus, "two", 2, ["--parallel", parallel])
    one = train(config(tmp_path, corpus, out=str(tmp_path / "one"), steps=3, grad_accum=2))
    one = read_metrics(tmp_path / "one")
    assert len(one) == len(two) == 4
    for a, b in zip(one, two):
        assert a["step"] == b["step"]
        for k in ("loss", "grad_norm", "val_loss"):
            if k in a:
                assert b[k] == pytest.approx(a[k], rel=1e-5), (k, a, b)
    # The 2-process checkpoint loads in one process.
    model = train_mod.load_checkpoint_model(tmp_path / "two")
    assert model.config.hidden_size == 32


@pytest.mark.parametrize("nproc,accum", [(2, 1), (4, 2)], ids=["cp2", "dp2xcp2"])
def test_context_parallel_processes_equal_one(tmp_path, corpus, nproc, accum):
    """--context-parallel 2 (torchrun, gloo): each sequence split over 2 ranks, alone or beside
    data parallelism (a (dp, cp) = (2, 2) mesh), gives the losses, gradient norms and validation
    loss of one process (with the data-parallel groups' micro-batches accumulated)."""
    cp = _torchrun_losses(tmp_path, corpus, "cp", nproc, ["--context-parallel", "2"])
    train(config(tmp_path, corpus, out=str(tmp_path / "one"), steps=3, grad_accum=accum))
    one = read_metrics(tmp_path / "one")
    assert len(one) == len(cp) == 4
    for a, b in zip(one, cp):
        assert a["step"] == b["step"]
        for k in ("loss", "grad_norm", "val_loss"):
            if k in a:
                assert b[k] == pytest.approx(a[k], rel=1e-5), (k, a, b)


def test_context_parallel_needs_torchrun_and_nsa(tmp_path, corpus):
    with pytest.raises(ValueError, match="--context-parallel: 2 ranks need torchrun"):
        train(config(tmp_path, corpus, out=str(tmp_path / "x"), steps=1, context_parallel=2))
    with pytest.raises(ValueError, match="--context-parallel: splits sequences of attention='nsa' models"):
        config(tmp_path, corpus, out=str(tmp_path / "y"), steps=1, context_parallel=2, attention="full")


def test_cli_train_then_generate(tmp_path, corpus, capsys):
    out = tmp_path / "run"
    args = ["train", "--out", str(out), "--data", str(corpus), "--cache-dir", str(tmp_path / "cache"), "--seq-len",
            "64", "--batch-tokens", "256", "--steps", "2", "--val-fraction", "0.25", "--no-progress", *MODEL_FLAGS]
    assert main(args) == 0
    assert "step 2" in capsys.readouterr().out
    assert main(["generate", "--checkpoint", str(out), "--prompt", "import ", "--max-new-tokens", "8",
                 "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("import ")
    # --resume alone continues with the saved options, to a new length.
    assert main(["train", "--out", str(out), "--resume", "--steps", "3"]) == 0
    assert [m["step"] for m in read_metrics(out) if "loss" in m][-1] == 3


def test_config_file_and_flags(tmp_path, corpus):
    toml = tmp_path / "run.toml"
    toml.write_text(f'out = "{tmp_path / "run"}"\ndata = ["{corpus}"]\nseq-len = 32\nsteps = 9\n'
                    f'[model]\nhidden_size = 48\n')
    cfg = train_mod.config_from_sources({"steps": 2, "model": {"num_layers": 1}}, str(toml))
    assert cfg.seq_len == 32 and cfg.steps == 2 and cfg.model == {"hidden_size": 48, "num_layers": 1}
    assert cfg.data == (str(corpus),)


@pytest.mark.parametrize("args, message", [
    (["--data", "/nonexistent/nothing"], "--data"),
    (["--seq-len", "4096"], "--seq-len"),
    (["--model=stride=5"], "kernel_size"),
    (["--model=nonsense=1"], "--model"),
    (["--steps", "0"], "--steps"),
    (["--batch-tokens", "250", "--grad-accum", "3"], "--batch-tokens"),
    (["--resume"], "--resume"),
    (["--lr", "-1"], "--lr"),
    (["--loss-on", "answers"], "--loss-on"),
], ids=["missing-data", "seq-len", "nsa-divide", "model-field", "steps", "batch-split", "resume-nothing", "lr",
        "loss-on-lm"])
def test_bad_input_exits_2(tmp_path, corpus, capsys, args, message):
    base = ["train", "--out", str(tmp_path / "run"), "--data", str(corpus), "--cache-dir", str(tmp_path / "cache"),
            "--seq-len", "64", "--batch-tokens", "256", "--steps", "2", "--no-progress", "--model=max_seq_len=1024"]
    assert main(base + args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run" / "checkpoint").exists()


def test_bad_task(tmp_path, corpus, capsys):
    with pytest.raises(ValueError, match="--task"):
        config(tmp_path, corpus, task="qa")
    with pytest.raises(ValueError, match="--loss-on"):
        config(tmp_path, corpus, loss_on="some")
    with pytest.raises(SystemExit) as e:  # argparse's choices
        main(["train", "--out", str(tmp_path / "run"), "--task", "qa"])
    assert e.value.code == 2 and "--task" in capsys.readouterr().err
    # a task document cannot fit a context shorter than the needle and its question
    args = ["train", "--out", str(tmp_path / "run"), "--data", str(corpus), "--cache-dir", str(tmp_path / "cache"),
            "--seq-len", "40", "--batch-tokens", "256", "--steps", "1", "--no-progress", "--task", "needle",
            *MODEL_FLAGS]
    assert main(args) == 2
    assert "--seq-len: 40 tokens cannot hold" in capsys.readouterr().err


def test_bad_input_files(tmp_path, corpus, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    common = ["--cache-dir", str(tmp_path / "cache"), "--steps", "1", "--no-progress"]
    assert main(["train", "--out", str(tmp_path / "r1"), "--data", str(empty), *common]) == 2
    assert "--data" in capsys.readouterr().err
    bad = tmp_path / "bad.toml"
    bad.write_text('out = "x"\nlearning_rate = 1\n')
    assert main(["train", "--config", str(bad)]) == 2
    assert "unknown keys ['learning_rate']" in capsys.readouterr().err
    # An existing run is never written over without --resume / --overwrite.
    run = tmp_path / "r2"
    run.mkdir()
    (run / "metrics.jsonl").write_text("precious\n")
    assert main(["train", "--out", str(run), "--data", str(corpus), *common]) == 2
    assert "--resume" in capsys.readouterr().err
    assert (run / "metrics.jsonl").read_text() == "precious\n"
    # A checkpoint of another shape: resuming with another model is refused.
    args = ["train", "--out", str(tmp_path / "r3"), "--data", str(corpus), "--seq-len", "64", "--batch-tokens", "256",
            "--val-fraction", "0.25", *MODEL_FLAGS, *common]
    assert main(args) == 0
    capsys.readouterr()
    assert main(args + ["--resume", "--model=hidden_size=64"]) == 2
    assert "another model" in capsys.readouterr().err
