"""`nsa demo` (nsa.demo): the --quick run end to end (what CI runs), summary.json's format and
ranges, the output directory's protection, the notes on the outcome, option errors."""

import contextlib
import io
import json
import math

import pytest

from nsa import demo
from nsa.cli import main


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """`nsa demo --quick` once for the module: (exit status, stdout, output directory)."""
    out = tmp_path_factory.mktemp("demo") / "out"
    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        status = main(["demo", "--quick", "--out", str(out), "--no-progress", "--device", "cpu"])
    return status, text.getvalue(), out


def test_quick_demo_summary(quick_run):
    status, text, out = quick_run
    assert status == 0, text
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) == {"models", "settings"}
    assert set(summary["models"]) == {"nsa", "full", "window"}
    s = summary["settings"]
    T = s["seq_len"]
    for kind, m in summary["models"].items():
        assert set(m) == {"accuracy", "val_loss", "keys_per_query", "tokens_per_s"}, kind
        assert 0.0 <= m["accuracy"] <= 1.0
        assert math.isfinite(m["val_loss"]) and 0 < m["val_loss"] < 10
        # NSA's three branches overlap: at a short context they read more keys than full attention
        assert 0 < m["keys_per_query"] <= (3 if kind == "nsa" else 1) * (T + 1) / 2
        assert math.isfinite(m["tokens_per_s"]) and m["tokens_per_s"] > 0
    k = {kind: m["keys_per_query"] for kind, m in summary["models"].items()}
    assert k["full"] == (T + 1) / 2  # the mean of t + 1 over t < T
    assert k["window"] == pytest.approx(demo.keys_per_query(T, window_size=s["nsa"]["window_size"])["win"])
    assert s["keys_fraction"] == pytest.approx(k["nsa"] / k["full"])
    assert s["quick"] is True and s["tokens"] == s["steps"] * s["batch_tokens"]
    assert s["task"] in ("needle", "recall", "mix") and 0 < s["chance"] < 1
    # the three runs are complete `nsa train` runs of the same size
    for kind in ("nsa", "full", "window"):
        cfg = json.loads((out / "runs" / kind / "config.json").read_text())
        assert cfg["model"]["attention"] == kind and cfg["train"]["steps"] == s["steps"]
        assert (out / "runs" / kind / "checkpoint" / "model.safetensors").is_file()
    assert (out / "demo.png").stat().st_size > 1000


def test_quick_demo_prints_the_table_and_a_sample(quick_run):
    status, text, _ = quick_run
    assert "needle acc" in text and "keys/query" in text and "tokens/s" in text
    for kind in ("nsa", "full", "window"):
        assert f"\n  {kind} " in text
    assert "sample (NSA model, generate() with its cache" in text
    assert "note: --quick" in text


def test_demo_refuses_to_overwrite(quick_run, capsys):
    _, _, out = quick_run
    before = (out / "summary.json").read_text()
    assert main(["demo", "--quick", "--out", str(out), "--no-progress"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "summary.json").read_text() == before


@pytest.mark.parametrize("argv, message", [
    (["demo", "--tokens", "100"], "--tokens: options of the layer tour; add --layer"),
    (["demo", "--steps", "0", "--out", "unused-dir"], "--steps: expected an int >= 1"),
    (["demo", "--device", "foo"], "--device"),
], ids=["layer-option", "steps", "device"])
def test_demo_bad_options_exit_2(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "unused-dir").exists() and not (tmp_path / "demo-out").exists()


def test_outcome_notes():
    def models(nsa, full, window):
        return {k: dict(accuracy=a) for k, a in zip(("nsa", "full", "window"), (nsa, full, window))}

    assert "within" in demo._outcome(models(0.9, 0.95, 0.2), 1e-6)[0]
    notes = " ".join(demo._outcome(models(0.0, 0.05, 0.0), 1e-6))
    assert "Full attention itself retrieves only 5%" in notes and "not 30 points above" in notes
    notes = " ".join(demo._outcome(models(0.5, 0.9, 0.0), 1e-6))
    assert "40 points below full attention" in notes and "Full attention itself" not in notes


def test_settings_per_device():
    cpu, cuda, quick = demo.demo_settings("cpu"), demo.demo_settings("cuda"), demo.demo_settings("cpu", quick=True)
    assert cuda.seq_len > cpu.seq_len > quick.seq_len and quick.steps < cpu.steps
    for cfg in (cpu, cuda, quick):  # the needle usually lies beyond the window at the trained context
        m = cfg.train_config("window", "x", "y").model_config()
        assert m.window_size <= cfg.seq_len // 4 and cfg.seq_len <= m.max_seq_len
    with pytest.raises(ValueError, match="--task"):
        demo.demo_settings("cpu", task="lm")
