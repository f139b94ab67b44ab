"""benchmarks/quality.py: the summary of three trained models in nsa demo's format, and its
command line's refusals. (Training and evaluation are nsa.train / nsa.evals, tested elsewhere;
the script's end-to-end run is a GPU job.)"""

import json
from pathlib import Path

import pytest

from tests.helpers import load_benchmark_script


@pytest.fixture(scope="module")
def quality():
    return load_benchmark_script("quality")


MODEL = dict(kernel_size=32, stride=16, block_size=64, num_selected=16, window_size=512)


def _fake_run(root: Path, kind: str, seq_len: int, accuracy: list, text_loss: float, steps: int = 10):
    """The files `quality.py train` leaves in root/kind (checkpoint dropped)."""
    run = root / kind
    (run / "eval").mkdir(parents=True)
    train = dict(preset="small", seq_len=seq_len, batch_tokens=65536, lr=1.5e-3, task="needle", seed=0)
    (run / "config.json").write_text(json.dumps(dict(model=dict(MODEL, attention=kind), train=train)))
    lines = [dict(step=s, tokens=s * 65536, loss=3.0 - 0.1 * s, tokens_per_s=1000.0 * (1 + (kind == "full")))
             for s in range(1, steps + 1)]
    lines += [dict(step=steps, tokens=steps * 65536, val_loss=text_loss + 0.5)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    lengths = [seq_len // 4, seq_len // 2, seq_len, 2 * seq_len]
    meta = dict(device="test GPU", torch="2.x")
    needle = dict(lengths=lengths, depths=[0.0, 1.0], accuracy=[[a, a] for a in accuracy],
                  accuracy_by_length=accuracy)
    (run / "eval" / "needle.json").write_text(json.dumps(dict(meta=meta, result=needle)))
    buckets = [dict(start=0, end=64, tokens=10, loss=text_loss + 1), dict(start=64, end=seq_len - 1, tokens=10,
                                                                          loss=text_loss)]
    loss = dict(loss=text_loss, bits_per_byte=text_loss / 0.69, buckets=buckets)
    (run / "eval" / "loss.json").write_text(json.dumps(dict(meta=meta, result=loss)))
    if kind == "nsa":
        sel = dict(needle_selected_mean=0.9, chance=0.2, needle_selected_by_layer=[0.9], shared_fraction=[0.8],
                   gates=[dict(cmp=0.5, slc=0.5, win=0.5)], gates_last=[dict(cmp=0.5, slc=0.5, win=0.5)])
        (run / "eval" / "selection.json").write_text(json.dumps(dict(meta=meta, result=sel)))
    info = dict(kind=kind, steps=steps, tokens=steps * 65536, train_seconds=12.0, val_loss=text_loss + 0.5,
                num_parameters=1000, args=dict(samples=4))
    (run / "quality_run.json").write_text(json.dumps(info))


def test_summarize_writes_the_demo_format(quality, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    acc = dict(nsa=[1.0, 1.0, 0.75, 0.25], full=[1.0, 1.0, 1.0, 0.5], window=[0.5, 0.0, 0.0, 0.0])
    for i, kind in enumerate(quality.KINDS):
        _fake_run(tmp_path, kind, 1024, acc[kind], 2.0 + 0.1 * i)
    assert quality.main(["summarize", str(tmp_path)]) == 0
    s = json.loads((tmp_path / "summary.json").read_text())
    assert (tmp_path / "quality.png").stat().st_size > 0
    assert set(s["models"]) == {"nsa", "full", "window"}
    for i, kind in enumerate(quality.KINDS):
        m = s["models"][kind]
        # the accuracy at the trained length (1024), not the mean over lengths
        assert m["accuracy"] == m["needle_accuracy"] == acc[kind][2]
        assert m["needle_by_length"] == {"256": acc[kind][0], "512": acc[kind][1], "1024": acc[kind][2],
                                         "2048": acc[kind][3]}
        assert m["val_loss"] == pytest.approx(2.5 + 0.1 * i) and m["text_loss"] == pytest.approx(2.0 + 0.1 * i)
        assert [b["end"] for b in m["loss_by_position"]] == [64, 1023]
        assert m["tokens"] == 10 * 65536
    # keys per query from the run's own settings: full attends (T + 1) / 2 on average
    from nsa.demo import keys_per_query

    k = {kind: s["models"][kind]["keys_per_query"] for kind in quality.KINDS}
    want = keys_per_query(1024, **MODEL)
    assert k["full"] == pytest.approx(1025 / 2) == pytest.approx(want["full"])
    assert k["nsa"] == pytest.approx(want["nsa"]) and k["window"] == pytest.approx(want["win"])
    assert k["window"] < k["full"]
    assert s["models"]["nsa"]["selection"]["needle_selected_mean"] == 0.9
    assert "selection" not in s["models"]["full"]
    assert s["settings"]["same_tokens"] is True and s["settings"]["seq_len"] == 1024
    assert "full" in capsys.readouterr().out


def test_summarize_flags_different_tokens(quality, tmp_path):
    pytest.importorskip("matplotlib")
    _fake_run(tmp_path, "nsa", 1024, [0, 0, 0, 0], 2.0, steps=10)
    _fake_run(tmp_path, "full", 1024, [0, 0, 0, 0], 2.0, steps=12)
    assert quality.main(["summarize", str(tmp_path)]) == 0
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["settings"]["same_tokens"] is False and s["settings"]["tokens"] == [10 * 65536, 12 * 65536]


def test_refusals(quality, tmp_path, capsys):
    assert quality.main(["summarize", str(tmp_path)]) == 2  # nothing trained there
    assert "no trained model" in capsys.readouterr().err
    (tmp_path / "nsa").mkdir()
    assert quality.main(["train", "--kind", "nsa", "--out", str(tmp_path), "--steps", "3"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    for argv in (["train", "--kind", "nsa", "--out", str(tmp_path), "--steps", "0"],
                 ["all", "--out", str(tmp_path), "--minutes", "-1"],
                 ["train", "--kind", "nsa", "--out", str(tmp_path)]):  # neither --steps nor --minutes
        with pytest.raises(SystemExit) as e:
            quality.main(argv)
        assert e.value.code == 2
