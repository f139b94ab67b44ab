"""`nsa bench --from-checkpoint`: a trained model's NSA inputs captured, replayed at a larger
shape without changing the selection or the output, checked and timed beside random inputs."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch

import nsa
from nsa.bench import cli_main, harness, report, trained
from nsa.model import LanguageModel, ModelConfig
from tests.helpers import assert_close, load_benchmark_script, train_tiny_run

CPU = torch.device("cpu")
SEL = dict(kernel_size=8, stride=4, block_size=8, num_selected=3, num_initial=1, num_local=1, window_size=16)
# One KV head and two query heads: replayable at the quick preset's 4/1 heads and 32x32 dims.
MODEL = dict(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=16, intermediate_size=64, **SEL)


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(dtype=torch.float64, **kw):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=320, max_seq_len=1024, **{**MODEL, **kw})
    return LanguageModel(cfg).to(dtype).eval()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run directory of two training steps of `nsa train` on eight small documents."""
    return train_tiny_run(tmp_path_factory.mktemp("trained"), model=MODEL, seq_len=64, batch_tokens=128,
                          log_every=1, warmup_steps=1)


# ---- capture and replay --------------------------------------------------------------------------


def _attention_outputs(model, ids):
    """Each block's attention output before its output projection, from the model's own forward."""
    outs = {}
    hooks = [b.attn.o_proj.register_forward_pre_hook(lambda m, a, i=i: outs.__setitem__(i, a[0]))
             for i, b in enumerate(model.blocks)]
    try:
        with torch.no_grad():
            model(ids)
    finally:
        for h in hooks:
            h.remove()
    return outs


def test_capture_is_the_layers_input():
    """nsa(**captured) is each layer's own attention output; settings are the layer's; only the
    layers asked for are kept; the hooks are removed."""
    model = tiny_model(num_heads=4, num_kv_heads=2)
    ids = torch.randint(0, 256, (2, 90))
    cap = trained.capture_inputs(model, ids)
    assert sorted(cap) == [0, 1]
    want = _attention_outputs(model, ids)
    for i, kw in cap.items():
        assert {k: kw[k] for k in SEL} == SEL and "scale" not in kw  # the layer uses the ops' default scale
        assert kw["q"].shape == (2, 90, 4, 16) and kw["k_cmp"].shape == (2, 21, 2, 16)
        assert kw["g_win"].shape == (2, 90, 4) and not kw["q"].requires_grad
        assert_close(f"layer {i}", want[i], nsa.ops.nsa(**kw, backend="reference").flatten(-2), 1e-12)
    assert sorted(trained.capture_inputs(model, ids, layers=[1])) == [1]
    assert not any(m._forward_hooks for m in model.modules())
    with pytest.raises(ValueError, match="layers"):
        trained.capture_inputs(model, ids, layers=[2])
    with pytest.raises(ValueError, match="model"):
        trained.capture_inputs(tiny_model(attention="full"), ids)


def test_cut_is_the_capture_at_a_shorter_length():
    """The first T' positions of a capture at T are the capture at T' (why one capture serves
    every length of a run, and the correctness twin's shorter length)."""
    model = tiny_model()
    ids = torch.randint(0, 256, (1, 100))
    long = trained.split(trained.capture_inputs(model, ids, [1])[1])[0]
    short = trained.split(trained.capture_inputs(model, ids[:, :61], [1])[1])[0]
    cut = trained._cut(long, 1, 61, SEL["kernel_size"], SEL["stride"])
    for n in trained.TENSORS:
        assert_close(n, short[n], cut[n], 1e-12)


# (HQ, H, Dk, Dv) targets for a model of 4 query heads over 2 KV heads, head dim 16
REPLAYS = {"same": (4, 2, 16, 16), "kv-heads": (8, 4, 16, 16), "group": (12, 2, 16, 16), "dims": (4, 2, 32, 24),
           "all": (48, 8, 40, 32)}


@pytest.mark.parametrize("target", list(REPLAYS.values()), ids=list(REPLAYS))
def test_replay_keeps_selection_and_output(target):
    HQ, H, Dk, Dv = target
    model = tiny_model(num_heads=4, num_kv_heads=2)
    x, settings = trained.split(trained.capture_inputs(model, torch.randint(0, 256, (2, 97)), [1])[1])
    o, idx = nsa.ops.nsa(**x, **settings, return_block_indices=True, backend="reference")
    y, s = trained.replay(x, HQ, H, Dk, Dv, settings)
    assert s == {**settings, "scale": 16 ** -0.5}  # the model's scale, not Dk's
    assert y["q"].shape == (2, 97, HQ, Dk) and y["v_cmp"].shape == (2, x["v_cmp"].shape[1], H, Dv)
    assert y["g_slc"].shape == (2, 97, HQ)
    o2, idx2 = nsa.ops.nsa(**y, **s, return_block_indices=True, backend="reference")
    r, G = H // 2, HQ // H
    assert torch.equal(idx2, idx.repeat_interleave(r, dim=2))
    # query head i: KV head i // G, of the model's KV head (i // G) // r, place (i % G) // (G / 2) in its group
    i = torch.arange(HQ)
    src = (i // G) // r * 2 + (i % G) // (G // 2)
    assert_close("output", o[:, :, src], o2[..., :16], 1e-12)
    assert not o2[..., 16:].any()
    # without the scale the scores would be the target's: the output changes
    if Dk != 16:
        wrong = nsa.ops.nsa(**y, **{k: v for k, v in s.items() if k != "scale"}, backend="reference")
        assert harness.rel_err(o2, wrong) > 1e-3


@pytest.mark.parametrize("target,name", [((6, 3, 16, 16), "H"), ((6, 2, 16, 16), "HQ"), ((4, 4, 16, 16), "HQ"),
                                         ((4, 2, 8, 16), "Dk"), ((4, 2, 16, 15), "Dv"), ((4, 0, 16, 16), "H")],
                         ids=["kv-not-multiple", "group-not-multiple", "group-smaller", "dk", "dv", "zero"])
def test_replay_refuses_what_it_cannot_keep(target, name):
    model = tiny_model(num_heads=4, num_kv_heads=2)
    x, settings = trained.split(trained.capture_inputs(model, torch.randint(0, 256, (1, 40)), [0])[0])
    with pytest.raises(ValueError, match=f"^{name}:"):
        trained.replay(x, *target, settings)


# ---- selection statistics ------------------------------------------------------------------------


def test_tile_blocks_brute_force():
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(-1, 40, (2, 150, 3, 4), generator=g).to(torch.int32)
    got = trained.tile_blocks(idx, tile=64)
    assert got.shape == (2, 3, 3)
    for b in range(2):
        for k in range(3):
            for h in range(3):
                rows = idx[b, 64 * k:64 * (k + 1), h].flatten().tolist()
                assert got[b, k, h] == len({v for v in rows if v >= 0})


def test_selection_stats():
    """Queries equal at every position select the same blocks: few per tile, all shared by neighbours;
    independent random queries select many more."""
    T, S = 512, SEL["num_selected"]
    g = torch.Generator().manual_seed(0)
    k_cmp = torch.randn(1, 127, 1, 16, generator=g, dtype=torch.float64)
    same = torch.randn(1, 1, 2, 16, generator=g, dtype=torch.float64).expand(1, T, 2, 16).contiguous() * 4
    rand = torch.randn(1, T, 2, 16, generator=g, dtype=torch.float64) * 4
    st = trained.selection_stats(same, k_cmp, SEL, backend="reference")
    rn = trained.selection_stats(rand, k_cmp, SEL, backend="reference")
    assert st["num_selected"] == S and st["tile"] == 64 and st["most"] == rn["most"]
    assert st["tile_blocks"] < rn["tile_blocks"] <= rn["most"]
    assert st["shared"] >= S - 1 and rn["shared"] < st["shared"]


# ---- the benchmark's source ----------------------------------------------------------------------


def test_text_tokens(run_dir, tmp_path):
    ids, info = trained.text_tokens(run_dir, 500)
    assert ids.shape == (500,) and ids.dtype == torch.long and ids[0] == 256  # [bos] of the first document
    assert not info["repeated"] and "validation documents" in info["source"] and "seed 0" in info["source"]
    f = tmp_path / "t.txt"
    f.write_text("abc")
    ids, info = trained.text_tokens(run_dir / "checkpoint", 12, text=str(f))
    assert ids.tolist() == [256, 97, 98, 99, 257] * 2 + [256, 97] and info["repeated"]
    with pytest.raises(ValueError, match="--text"):
        trained.text_tokens(run_dir, 10, text=str(tmp_path / "missing.txt"))


def test_open_source_refuses(run_dir, tmp_path):
    with pytest.raises(ValueError, match="--from-checkpoint"):
        trained.open_source(tmp_path)
    with pytest.raises(ValueError, match="--layers"):
        trained.open_source(run_dir, layers=[2])
    full = tmp_path / "full"
    tiny_model(attention="full").save_pretrained(full)
    with pytest.raises(ValueError, match="--from-checkpoint.*attention='full'"):
        trained.open_source(full)
    tiny_model().save_pretrained(tmp_path / "bare")
    with pytest.raises(ValueError, match="--from-checkpoint.*tokenizer"):
        trained.open_source(tmp_path / "bare")
    src = trained.open_source(run_dir)
    assert src.layers == (0, 1) and src.checkpoint == str((run_dir / "checkpoint").resolve())
    assert trained.default_layers(12) == (0, 6, 11) and trained.default_layers(1) == (0,)


def test_trained_cases_and_their_inputs(run_dir):
    """Each train case twice over (random, then per layer trained), with the model's NSA settings;
    decode cases as they are; the trained inputs are the replayed capture, new leaf tensors, and
    one capture serves every smaller case."""
    src = trained.open_source(run_dir, layers=[1, 0])
    cases = trained.trained_cases(harness.build_cases("quick", T=[128, 200], smooth_queries=8), src)
    train = [c for c in cases if c.kind == "train"]
    assert [c.inputs for c in train] == ["random", "trained:0", "trained:1"] * 2
    assert len({c.name for c in cases}) == len(cases)
    assert train[1].name == "quick/train/T128/B1/HQ4H1/D32x32/trained-L0" and train[0].name.endswith("/qs8")
    assert all({k: getattr(c, k) for k in SEL} == SEL for c in train)
    assert [c.scale for c in train[:3]] == [None, 0.25, 0.25] and train[1].smooth_queries == 0
    assert [c.settings for c in cases if c.kind == "decode"] == [harness.QUICK_SETTINGS] * 2
    trained._CAPTURES.clear()
    x = harness.train_inputs(train[4], CPU)  # T 200, layer 0
    cap = trained._CAPTURES[(src, "cpu")]
    assert (cap.B, cap.T) == (1, 200)
    assert x["q"].shape == (1, 200, 4, 32) and all(t.requires_grad and t.is_leaf for t in x.values())
    assert x["q"].dtype == torch.float32 and not x["q"][..., 16:].any()
    model_q = cap.layers[0]["q"]
    assert torch.equal(x["q"][:, :, 0, :16], model_q[:, :, 0]) and torch.equal(x["q"][:, :, 2, :16], model_q[:, :, 1])
    y = harness.train_inputs(train[1], CPU, requires_grad=False)  # T 128: cut from the same capture
    assert trained._CAPTURES[(src, "cpu")] is cap and torch.equal(y["q"], x["q"][:, :128].detach())
    assert harness.train_inputs(train[1], CPU, seed=5)["q"].data_ptr() != y["q"].data_ptr()  # new tensors
    harness.train_inputs(dataclasses.replace(train[1], B=2), CPU)  # a larger batch: captured again
    assert (trained._CAPTURES[(src, "cpu")].B, trained._CAPTURES[(src, "cpu")].T) == (2, 200)
    with pytest.raises(ValueError, match="--dims"):
        trained.trained_cases(harness.build_cases("quick", dims=[(8, 8)]), src)
    with pytest.raises(ValueError, match="--heads"):
        trained.trained_cases(harness.build_cases("quick", heads=[(2, 2)]), src)
    with pytest.raises(ValueError, match="inputs"):
        dataclasses.replace(train[1], source=None)
    with pytest.raises(ValueError, match="NSA settings"):
        harness.train_inputs(dataclasses.replace(train[1], window_size=32), CPU)


def test_check_of_a_trained_case(run_dir, monkeypatch):
    """The correctness twin of a trained case runs the kernels on the trained inputs cut to its
    length, the chunk check of the full length on the full trained inputs, both with the model's
    scale; a kernel that drops the scale fails."""
    monkeypatch.setattr(harness, "CHECK_T", 96)
    monkeypatch.setattr(harness, "CHUNK", 48)
    src = trained.open_source(run_dir, layers=[1])
    case = trained.trained_cases(harness.build_cases("quick", T=[160]), src)[1]
    seen = []

    def spy(**kw):
        seen.append(kw)
        return nsa.ops.nsa(**kw)

    trained._CAPTURES.clear()
    want = src.inputs(case, CPU, requires_grad=False)  # captured at 160 first, as `nsa bench` does
    res = harness.check_train(case, "reference", CPU, nsa_fn=spy)
    assert all(v is True for v in res.verdicts.values()), res.notes
    assert [kw["q"].shape[1] for kw in seen] == [96, 160] and all(kw["scale"] == 0.25 for kw in seen)
    assert torch.equal(seen[0]["q"].detach(), want["q"][:, :96]) and torch.equal(seen[1]["q"], want["q"])

    def no_scale(**kw):
        kw.pop("scale")
        return nsa.ops.nsa(**kw)

    res = harness.check_train(case, "reference", CPU, nsa_fn=no_scale, branches=False)
    assert res.fwd is False and "o: relative error" in res.get("nsa", "fwd")[1]


def test_check_of_a_trained_case_triton(run_dir):
    """The Triton kernels (interpreter on CPU) pass the check on trained inputs."""
    pytest.importorskip("triton")
    src = trained.open_source(run_dir, layers=[0])
    case = trained.trained_cases(harness.build_cases("quick", T=[64]), src)[1]
    res = harness.check_train(case, "triton", CPU, branches=False)
    assert res.fwd is True and res.bwd is True, res.notes


# ---- the command ---------------------------------------------------------------------------------


def test_cli_end_to_end(run_dir, tmp_path, capsys):
    js = tmp_path / "b.json"
    rc = cli_main(["--preset", "quick", "--from-checkpoint", str(run_dir), "--T", "256", "--device", "cpu",
                   "--backend", "reference", "--no-baselines", "--reps", "1", "--no-progress", "--json", str(js)])
    out = capsys.readouterr().out
    assert rc == 0
    assert "trained inputs: layers [0, 1]" in out and "tile blocks trained" in out and "inputs" in out
    data = json.loads(js.read_text())
    recs = data["records"]
    train = [r for r in recs if r["pass"] in ("fwd", "bwd")]
    assert {r["inputs"] for r in train} == {"random", "trained:0", "trained:1"}
    assert all(r["ok"] is True for r in recs), [(r["case"], r["impl"], r["note"]) for r in recs if not r["ok"]]
    for layer in (0, 1):
        mine = {(r["impl"], r["pass"]) for r in train if r["inputs"] == f"trained:{layer}"}
        assert mine == {("nsa", "fwd"), ("nsa", "bwd"), ("nsa.cmp", "fwd"), ("nsa.cmp", "bwd"), ("nsa.select", "fwd"),
                        ("nsa.slc", "fwd"), ("nsa.slc", "bwd"), ("nsa.win", "fwd"), ("nsa.win", "bwd")}
    head = data["header"]["trained"]
    assert head["layers"] == [0, 1] and head["settings"]["scale"] == 0.25 and head["model"]["HQ"] == 2
    assert [(s["T"], s["layer"]) for s in head["selection"]] == [(256, 0), (256, 1)]
    assert head["text_source"]["tokens"] >= 256 and not head["text_source"]["repeated"]
    md = report.markdown_summary(data["header"], recs)
    assert "| 32/32 | 256 trained L1 |" in md


def test_speedup_of_a_trained_case_is_against_its_random_twin():
    """Trained cases time no baseline: their speedup is the best SDPA time of the random case of
    the same shape and pass; table and plot tell the inputs apart."""
    base = harness.build_cases("quick", T=[256])[0]
    src = trained.TrainedSource("/nowhere", (3,))
    twin = dataclasses.replace(base, inputs="trained:3", source=src)
    assert [t.impl for t in harness.tasks_for(twin, CPU, "reference", baselines=True, branches=False)] == ["nsa"] * 2
    recs = []
    for case, impl, ms in ((base, "sdpa.flash", 8.0), (base, "nsa", 4.0), (twin, "nsa", 2.0)):
        r = harness._record(harness.Task(case, impl, "fwd", None, impl == "nsa"), "auto")
        r.update(ms=ms, ok=True)
        recs.append(r)
    harness.add_speedups(recs)
    assert [r["speedup"] for r in recs] == [1.0, 2.0, 4.0] and recs[2]["inputs"] == "trained:3"
    assert "trained:3" in report.format_table(recs).splitlines()[-1]
    assert "inputs" not in report.format_table(recs[:2]).splitlines()[0]
    assert report._line_key(recs, recs[2], ("T",)) == "nsa fwd trained:3"
    assert "| 256 trained L3 | 2.0 | 8.0 (flash) | **4.00x** |" in report.markdown_summary({}, recs)


@pytest.mark.parametrize("args,option", [
    (["--from-checkpoint", "{tmp}"], "--from-checkpoint"),
    (["--from-checkpoint", "{run}", "--layers", "5"], "--layers"),
    (["--from-checkpoint", "{run}", "--dims", "8x8"], "--dims"),
    (["--from-checkpoint", "{run}", "--heads", "2/2"], "--heads"),
    (["--from-checkpoint", "{run}", "--text", "{tmp}/missing.txt"], "--text"),
    (["--from-checkpoint", "{full}"], "--from-checkpoint"),
    (["--layers", "0"], "--from-checkpoint"),
], ids=["no-model", "layer", "dims", "heads", "text", "full-attention", "layers-alone"])
def test_cli_bad_input_exits_2(run_dir, tmp_path, capsys, args, option):
    full = tmp_path / "full"
    tiny_model(attention="full").save_pretrained(full)
    args = [a.format(tmp=tmp_path, run=run_dir, full=full) for a in args]
    assert cli_main(["--preset", "quick", "--device", "cpu", "--no-progress"] + args) == 2
    assert option in capsys.readouterr().err


def test_history_rows_of_trained_cases():
    """benchmarks/history.py: a trained case is its own variant, against its random twin's SDPA."""
    history = load_benchmark_script("history")
    c = "paper/train/T64k/B1/HQ64H4/D128x128"
    recs = [dict(case=c + sfx, impl=impl, ms=ms, ok=True, T=65536, B=1, HQ=64, H=4, D=128, Dv=128, dtype="bf16",
                 inputs=inp, **{"pass": "fwd"})
            for sfx, inp, impl, ms in (("", "random", "sdpa.cudnn", 100.0), ("", "random", "nsa", 20.0),
                                       ("/trained-L3", "trained:3", "nsa", 10.0))]
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "b.json"
        p.write_text(json.dumps({"format": "nsa-bench/1", "header": {"preset": "paper"}, "records": recs}))
        rows = history.rows_from_json(p, run="r")
    assert [(r["variant"], r["baseline"], r["speedup"]) for r in rows] == [("", "sdpa.cudnn", "5.00"),
                                                                           ("trained-L3", "sdpa.cudnn", "10.00")]
