"""`nsa bench --preset generate` on CPU at tiny sizes: both attentions checked and timed end to end
into nsa-bench/1 JSON that history.py reads; bad input exits 2; the check can fail; out of memory
is a skipped row, not a crash."""

import json

import pytest
import torch

from nsa.bench import cli_main, harness
from nsa.bench import generate as gen
from tests.helpers import load_benchmark_script


pytestmark = pytest.mark.usefixtures("one_thread")


def _history():
    return load_benchmark_script("history")


@pytest.mark.parametrize("cache", ["dense", "paged"])
def test_generate_preset_end_to_end(tmp_path, capsys, cache):
    out = tmp_path / "generate.json"
    assert cli_main(["--preset", "generate", "--device", "cpu", "--T", "48", "--B", "1,2", "--new-tokens", "3",
                     "--warmup", "1", "--check-T", "40", "--no-progress", "--json", str(out), "--cache", cache]) == 0
    data = json.loads(out.read_text())
    head, recs = data["header"], data["records"]
    assert head["cache"] == cache and head["cuda_graph"] is False
    assert data["format"] == "nsa-bench/1" and head["preset"] == "generate" and head["model"] == "tiny"
    assert head["dtype"] == "fp32" and head["new_tokens"] == 3 and head["warmup"] == 1
    assert all(head["checks"][k].startswith("ok (logits: max relative error") for k in gen.KINDS)
    assert {(r["impl"], r["pass"], r["B"]) for r in recs} == {(i, p, b) for i in gen.KINDS for p in gen.PASSES
                                                               for b in (1, 2)}
    for r in recs:
        assert set(harness.FIELDS) <= set(r) and r["T"] == 48 and r["ok"] is True and r["ms"] > 0
        assert r["note"] == "" and r["peak_gib"] is None and r["mem_mib"] is None  # no peak memory on CPU
        tokens = r["B"] * 48 if r["pass"] == "prefill" else r["B"]
        assert r["tokens_per_s"] == pytest.approx(tokens / (r["ms"] / 1e3))
        if r["pass"] == "decode":
            assert r["steps"] == 3 and r["mean_ms"] > 0
    by = {(r["impl"], r["pass"], r["B"]): r for r in recs}
    for p in gen.PASSES:
        for b in (1, 2):
            assert by["nsa", p, b]["speedup"] == pytest.approx(by["full", p, b]["ms"] / by["nsa", p, b]["ms"])
            assert by["full", p, b]["speedup"] is None
    printed = capsys.readouterr()
    assert "speedup prefill/decode" in printed.out and "... T=" not in printed.err  # --no-progress
    # history.py append takes one row per NSA measurement, the full-attention model as its baseline.
    rows = _history().rows_from_json(out, run="test")
    assert sorted((r["pass"], r["B"]) for r in rows) == [("decode", 1), ("decode", 2), ("prefill", 1), ("prefill", 2)]
    assert all(r["preset"] == "generate" and r["baseline"] == "full" for r in rows)
    for r in rows:
        nsa_ms, full_ms = by["nsa", r["pass"], r["B"]]["ms"], by["full", r["pass"], r["B"]]["ms"]
        assert float(r["speedup"]) == pytest.approx(full_ms / nsa_ms, abs=0.006)


@pytest.mark.parametrize("argv, option", [
    (["--new-tokens", "0"], "--new-tokens"),
    (["--warmup", "0"], "--warmup"),
    (["--check-T", "-1"], "--check-T"),
    (["--device", "tpu"], "--device"),
    (["--cuda-graph", "on"], "--cuda-graph"),
])
def test_generate_preset_bad_input(argv, option, capsys):
    assert cli_main(["--preset", "generate", "--device", "cpu"] + argv) == 2
    assert option in capsys.readouterr().err


@pytest.mark.parametrize("argv, option", [
    (["--T", "0"], "--T"),
    (["--B", "x"], "--B"),
    (["--model", "huge"], "--model"),
    (["--cuda-graph", "yes"], "--cuda-graph"),
    (["--cache", "ring"], "--cache"),
])
def test_generate_preset_bad_input_argparse(argv, option, capsys):
    with pytest.raises(SystemExit) as e:
        cli_main(["--preset", "generate", "--device", "cpu"] + argv)
    assert e.value.code == 2 and option in capsys.readouterr().err


def _zero_newest_key(monkeypatch, kind):
    """Each decoding step caches a zero key (full) or zero window value (NSA) for its token."""
    from nsa.cache import KVCache, NSACache

    if kind == "full":
        real = KVCache.append
        monkeypatch.setattr(KVCache, "append", lambda self, k, v: real(self, torch.zeros_like(k), v))
    else:
        real = NSACache.append

        def append(self, k_cmp_raw, v_cmp_raw, k_slc, v_slc, k_win=None, v_win=None):
            return real(self, k_cmp_raw, v_cmp_raw, k_slc, v_slc, k_win, torch.zeros_like(v_win))
        monkeypatch.setattr(NSACache, "append", append)


@pytest.mark.parametrize("kind", gen.KINDS)
def test_check_fails_on_a_broken_cache(kind, monkeypatch):
    """The check can fail: a decoding step that mangles what it caches for its own token (greedy
    tokens alone would not show it: at initialisation they repeat the last token)."""
    cpu = torch.device("cpu")
    model = gen.build_models("tiny", cpu)[kind]
    assert gen.check_generate(model, 40, 8, cpu).startswith("ok (logits: max relative error")
    _zero_newest_key(monkeypatch, kind)
    verdict = gen.check_generate(model, 40, 8, cpu)
    assert verdict.startswith("prompt 0 (T=40) step 1: cached logits differ from uncached"), verdict


def test_out_of_memory_is_a_skipped_row(monkeypatch, tmp_path):
    """A case that runs out of memory is recorded as not measured, with the reason; the run goes on.
    Simulated: at B=2 the NSA model runs out in its first timed decoding step (the prefill stays
    measured), the full model in its warm-up call."""
    from nsa.model import LanguageModel

    real = LanguageModel._decode_logits
    calls = {}

    def step(self, tokens, cache):
        if tokens.shape[0] == 2:  # a decoding step at B=2
            n = calls[self.config.attention] = calls.get(self.config.attention, 0) + 1
            # nsa: the warm-up call's one step (1), the timed run's warm-up step (2), its first timed step (3)
            if (self.config.attention, n) in (("nsa", 3), ("full", 1)):
                raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(self, tokens, cache)

    monkeypatch.setattr(LanguageModel, "_decode_logits", step)
    out = tmp_path / "g.json"
    assert cli_main(["--preset", "generate", "--device", "cpu", "--T", "32", "--B", "1,2", "--new-tokens", "2",
                     "--warmup", "1", "--check-T", "0", "--no-progress", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["header"]["checks"] == {"nsa": "skipped", "full": "skipped"}
    by = {(r["impl"], r["pass"], r["B"]): r for r in data["records"]}
    assert len(by) == 8 and all(r["ms"] > 0 and r["ok"] is True for k, r in by.items() if k[2] == 1)
    assert by["nsa", "prefill", 2]["ms"] > 0 and by["nsa", "prefill", 2]["note"] == ""
    assert by["nsa", "decode", 2]["ms"] is None and by["nsa", "decode", 2]["ok"] is None
    assert by["nsa", "decode", 2]["note"] == "n/a: out of memory in the decoding steps"
    for p in gen.PASSES:
        assert by["full", p, 2]["ms"] is None and by["full", p, 2]["note"] == "n/a: out of memory in the warm-up"
        assert by["nsa", p, 2]["speedup"] is None


def test_warmup_length_agrees_modulo_1024():
    assert gen.warmup_length(64) == 64 and gen.warmup_length(2047) == 2047
    for T in (2048, 16 * 1024, 128 * 1024, 100_000):
        W = gen.warmup_length(T)
        assert W <= T and W % 1024 == T % 1024 and W < 2048


def test_failed_check_is_not_timed(monkeypatch, tmp_path):
    _zero_newest_key(monkeypatch, "full")
    out = tmp_path / "g.json"
    assert cli_main(["--preset", "generate", "--device", "cpu", "--T", "32", "--B", "1", "--new-tokens", "1",
                     "--warmup", "1", "--check-T", "24", "--no-progress", "--json", str(out)]) == 1
    data = json.loads(out.read_text())
    checks = data["header"]["checks"]
    assert checks["nsa"].startswith("ok") and "cached logits differ" in checks["full"]
    for r in data["records"]:
        if r["impl"] == "full":
            assert r["ms"] is None and r["ok"] is False and r["note"].startswith("not timed: check failed")
        else:
            assert r["ms"] > 0 and r["ok"] is True and r["speedup"] is None
