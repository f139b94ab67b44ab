"""`nsa bench`: the quick preset end to end, the attended-key arithmetic against NSA.md,
and the correctness checks that gate timing (they must catch wrong outputs, selections,
gradients and decode rows)."""

import dataclasses
import json

import pytest
import torch

from nsa.bench import cli_main, harness, report
from nsa.ops import api, reference

CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_thread")

# /work/shared/NSA.md section 2 (paper settings l=32, d=16, l'=64, n=16, w=512; Dk/Dv = 192/128).
TABLE = {  # T: (full keys, NSA keys, keys-only ratio, forward ratio incl. 2nd q.k_cmp pass, decode bytes ratio)
    8192: (4096, 1715, 2.4, 2.2, 4.0),
    16384: (8192, 2009, 4.1, 3.5, 6.4),
    32768: (16384, 2540, 6.5, 5.2, 9.2),
    65536: (32768, 3573, 9.2, 6.8, 11.6),
    131072: (65536, 5626, 11.7, 8.1, 13.5),
}


def _near(value, table_value, rel=0.01, rounding=0.0):
    return abs(value - table_value) <= rel * abs(table_value) + rounding


@pytest.mark.parametrize("T", sorted(TABLE), ids=lambda t: f"T{t // 1024}k")
def test_attended_keys_match_nsa_md(T):
    full, nsa, keys_ratio, fwd_ratio, dec_ratio = TABLE[T]
    approx = harness.attended_keys(T, exact=False)  # the table counts min(n*l', t+1) selected keys
    assert _near(approx["full"], full)
    assert _near(approx["nsa"], nsa), (approx["nsa"], nsa)
    # ratios are printed with one decimal: allow that rounding on top of 1%
    assert _near(approx["full"] / approx["nsa"], keys_ratio, rounding=0.05)
    assert _near(harness.ideal_forward_ratio(T, 192, 128, exact=False), fwd_ratio, rounding=0.05)
    dec = harness.decode_keys(T)
    assert _near(dec["full"] / dec["nsa"], dec_ratio)
    # exact selected counts: never more than the approximation, and within 2% of the table total
    exact = harness.attended_keys(T)
    assert exact["slc"] <= approx["slc"] and _near(exact["nsa"], nsa, rel=0.02)


def test_attended_keys_brute_force():
    """The closed forms against counting keys per query (odd sizes, short sequences)."""
    for T, l, d, bl, n, w in [(1, 32, 16, 64, 16, 512), (97, 8, 4, 8, 3, 5), (300, 16, 8, 16, 4, 64)]:
        cmp = slc = win = 0
        for t in range(T):
            cmp += sum(1 for i in range(T) if i * d + l - 1 <= t)
            nb = t // bl + 1
            chosen = range(nb) if nb <= n else list(range(n - 1)) + [t // bl]  # keys s <= t only
            slc += sum(1 for j in chosen for s in range(j * bl, (j + 1) * bl) if s <= t)
            win += sum(1 for s in range(t + 1) if t - s < w)
        k = harness.attended_keys(T, l, d, bl, n, w)
        assert k["cmp"] == pytest.approx(cmp / T) and k["slc"] == pytest.approx(slc / T)
        assert k["win"] == pytest.approx(win / T) and k["full"] == pytest.approx((T + 1) / 2)


def test_quick_preset_end_to_end(tmp_path):
    """The pipeline of `nsa bench`: cases, correctness checks, timing, JSON, plot, README summary.

    What it does not check: that any NSA output is right. On CPU the bench runs the reference
    backend, and its checks compare the reference with itself, so every NSA row's ``ok`` is true
    by construction. That the checks catch a wrong output, gradient, selection, chunk or decode
    row is tested below (test_check_catches_*, test_branch_fault_is_attributed_to_its_branch,
    test_chunk_check_runs_and_catches, test_check_decode); the kernels against the reference in
    tests/ops, and the bench's checks of the Triton backend on the GPU (scripts/gpu_run.sh,
    test_gpu_paper_and_decode_small)."""
    js, png = tmp_path / "bench.json", tmp_path / "bench.png"
    assert cli_main(["--preset", "quick", "--json", str(js), "--plot", str(png), "--no-progress"]) == 0
    data = json.loads(js.read_text())
    assert data["format"] == report.FORMAT
    for key in ("date_utc", "device", "gpu", "driver", "torch", "triton", "preset", "backend"):
        assert key in data["header"]
    recs = data["records"]
    assert recs
    for r in recs:
        assert set(harness.FIELDS) <= set(r), set(harness.FIELDS) - set(r)
        assert r["pass"] in harness.PASSES
        if r["ok"]:
            assert r["ms"] > 0
        else:
            assert r["ms"] is None and r["note"]
    nsa = [r for r in recs if r["impl"].startswith("nsa")]
    kinds = {(r["impl"], r["pass"]) for r in nsa}
    for want in [("nsa", "fwd"), ("nsa", "bwd"), ("nsa.cmp", "bwd"), ("nsa.select", "fwd"), ("nsa.slc", "bwd"),
                 ("nsa.win", "bwd"), ("nsa.gate", "bwd"), ("nsa", "decode")]:
        assert want in kinds
    # every NSA measurement ran and was timed: its check (the reference against itself here) let it through
    assert all(r["ok"] is True for r in nsa), [(r["impl"], r["pass"], r["note"]) for r in nsa if not r["ok"]]
    for r in recs:
        if r["impl"] == "nsa" and r["pass"] == "fwd":
            assert r["tflops"] > 0 and r["ideal"] > 0 and r["backend"] == "reference"
        if r["pass"] == "decode" and r["ok"]:
            assert r["gbps"] > 0 and r["copy_share"] == pytest.approx(r["gbps"] / data["header"]["copy_gbps"])
    # at least one full-attention baseline ran, so speedups exist
    assert any(r["impl"].startswith("sdpa.") and r["ok"] for r in recs)
    assert all(r["speedup"] > 0 for r in nsa if r["pass"] in ("fwd", "bwd"))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    # the README summary: one training row per case and one decode row per context and batch
    md = report.markdown_summary(data["header"], recs)
    train_rows = [ln for ln in md.splitlines() if ln.startswith("| 32/32 |")]
    assert len(train_rows) == len({r["case"] for r in nsa if r["pass"] == "fwd"})
    assert all("**" in ln and "FAIL" not in ln for ln in train_rows)
    decode_rows = [ln for ln in md.splitlines() if ln.startswith("| 256 |") or ln.startswith("| 512 |")]
    assert len(decode_rows) == len({r["case"] for r in nsa if r["pass"] == "decode"})
    assert all(ln.split("|")[7].strip().endswith("%") for ln in decode_rows)  # the share of copy bandwidth


def _quick_case(T=256, dtype="fp32", B=1, kind="train"):
    c = harness.build_cases("quick")[0]
    return dataclasses.replace(c, T=T, dtype=dtype, B=B, kind=kind)


def test_check_passes_reference():
    """No false alarm: the reference backend passes every check (they compare it with the reference's own
    branches in float32: this tests the checking machinery, not any kernel)."""
    res = harness.check_train(_quick_case(), "reference", CPU)
    want = {("nsa", "fwd"), ("nsa", "bwd"), ("nsa.cmp", "fwd"), ("nsa.cmp", "bwd"), ("nsa.select", "fwd"),
            ("nsa.slc", "fwd"), ("nsa.slc", "bwd"), ("nsa.win", "fwd"), ("nsa.win", "bwd")}
    assert set(res.verdicts) == want and all(v is True for v in res.verdicts.values()), res.notes


def test_branch_fault_is_attributed_to_its_branch(monkeypatch):
    """A wrong window op fails nsa.win only; a raising op fails its branch, never crashes the run."""
    good = api.sliding_window_attention

    def bad_win(q, k, v, window_size=512, **kw):
        return good(q, k, v, max(1, window_size - 1), **kw)

    monkeypatch.setattr(api, "sliding_window_attention", bad_win)
    res = harness.check_train(_quick_case(), "reference", CPU)
    assert res.get("nsa.win", "fwd")[0] is False and res.get("nsa.win", "bwd")[0] is False
    assert "o: relative error" in res.get("nsa.win", "fwd")[1]
    assert res.get("nsa.cmp", "bwd")[0] is True and res.get("nsa.slc", "bwd")[0] is True

    def raising(*a, **kw):
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(api, "selected_attention", raising)
    res = harness.check_train(_quick_case(), "reference", CPU)
    assert res.get("nsa.slc", "fwd") == (False, "check failed: raised RuntimeError: kernel exploded")


def _grad_scale(t, s):
    class Scale(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.view_as(x)

        @staticmethod
        def backward(ctx, g):
            return g * s

    return Scale.apply(t)


def test_check_catches_wrong_output():
    def bad(**kw):
        o, idx = api.nsa(**kw)
        return o + 1e-2 * o.detach().abs().mean(), idx

    res = harness.check_train(_quick_case(), "reference", CPU, nsa_fn=bad)
    assert res.fwd is False and res.bwd is False and "o: relative error" in res.get("nsa", "fwd")[1]


def test_check_catches_wrong_gradient():
    def bad(**kw):
        kw["v_win"] = _grad_scale(kw["v_win"], 1.05)
        return api.nsa(**kw)

    res = harness.check_train(_quick_case(), "reference", CPU, nsa_fn=bad)
    assert res.fwd is True and res.bwd is False and "dv_win" in res.get("nsa", "bwd")[1]


def test_check_catches_wrong_selection():
    """A consistent output over the wrong blocks: the selection check fails it."""
    case = _quick_case(T=256)

    def bad(**kw):
        kw = dict(kw)
        kw["num_initial"] = 0  # the first block is no longer forced: many rows change
        return api.nsa(**kw)

    res = harness.check_train(case, "reference", CPU, nsa_fn=bad)
    assert res.fwd is False and "selection" in res.get("nsa", "fwd")[1]


def test_chunk_check_runs_and_catches(monkeypatch):
    """Long cases are also checked on a chunk of the full-length forward."""
    monkeypatch.setattr(harness, "CHECK_T", 128)
    monkeypatch.setattr(harness, "CHUNK", 48)
    case = _quick_case(T=384)
    assert harness.check_train(case, "reference", CPU).fwd is True
    calls = []

    def late_bad(**kw):  # right on the twin (T=128), wrong at full length
        o, idx = api.nsa(**kw)
        calls.append(o.shape[1])
        return (o * 1.01 if o.shape[1] == case.T else o), idx

    res = harness.check_train(case, "reference", CPU, nsa_fn=late_bad)
    assert calls == [128, 384] and res.fwd is False and "o[0," in res.get("nsa", "fwd")[1]


@pytest.mark.parametrize("T,t0,C,B", [(300, 0, 40, 1), (300, 137, 64, 2), (97, 50, 47, 1)],
                         ids=["start", "middle-b1", "end-short"])
def test_chunk_reference_equals_reference(T, t0, C, B):
    case = _quick_case(T=T, dtype="fp64", B=B)
    x = harness.train_inputs(case, CPU, seed=3, requires_grad=False)
    o, idx = reference.nsa(**x, **case.settings, return_block_indices=True)
    b = B - 1
    o_c, idx_c = harness.chunk_reference(case, x, b, t0, C, idx)
    assert torch.equal(idx_c, idx[b:b + 1, t0:t0 + C])
    assert harness.rel_err(o[b:b + 1, t0:t0 + C], o_c) < 1e-12


def test_check_decode():
    case = _quick_case(T=200, kind="decode", B=2)
    assert harness.check_decode(case, "reference", CPU).decode is True
    from nsa.ops.decode import nsa_decode

    def bad(**kw):
        o = nsa_decode(**kw)
        o[1] += 1e-2 * o[1].abs().mean()
        return o

    res = harness.check_decode(case, "reference", CPU, decode_fn=bad)
    assert res.decode is False and "o[1]" in res.get("nsa", "decode")[1]


def test_failed_check_is_not_timed():
    case = _quick_case()
    called = []
    task = harness.Task(case, "nsa", "fwd", lambda: called.append(1), True)
    check = harness.CheckResult()
    check.set("nsa", ("fwd",), False, "check failed: o: relative error")
    rec = harness.measure(task, harness.Timer(CPU, 1), "reference", check)
    assert rec["ok"] is False and rec["ms"] is None and not called and "check failed" in rec["note"]


def test_reference_never_runs_long_on_cuda(monkeypatch):
    cuda = torch.device("cuda")
    monkeypatch.setattr(api, "_triton_impl", lambda op: None)
    assert harness.op_not_runnable("select_blocks", "auto", cuda, 8192) is None
    assert harness.op_not_runnable("select_blocks", "auto", cuda, 16384) == "no triton kernel for select_blocks"
    assert "reference" in harness.op_not_runnable("select_blocks", "reference", CPU, 16384)
    assert harness.op_not_runnable("select_blocks", "triton", cuda, 16) == "no triton kernel for select_blocks"
    monkeypatch.setattr(api, "_triton_impl", lambda op: (lambda *a: None))
    assert harness.nsa_not_runnable("auto", cuda, 131072) is None
    assert harness.nsa_not_runnable("reference", cuda, 131072) is not None


def _lag_corr(q, d):
    return torch.corrcoef(torch.stack([q[:, :-d].flatten(), q[:, d:].flatten()]))[0, 1].item()


def test_smooth_queries():
    """--smooth-queries N: unit-variance queries that correlate by 1 - d / N between positions d
    apart (independent ones by 0); the case name says so; decode cases are unchanged; the
    benchmark's checks pass on them; a negative N is refused."""
    cases = harness.build_cases("quick", T=[2048], smooth_queries=64)
    train = [c for c in cases if c.kind == "train"]
    assert [c.smooth_queries for c in cases if c.kind == "decode"] == [0]
    assert train[0].name.endswith("/qs64") and not harness.build_cases("quick")[0].name.endswith("/qs0")
    q = harness.train_inputs(train[0], CPU, requires_grad=False)["q"].double()
    assert abs(q.var().item() - 1) < 0.1
    for d, want in ((1, 1 - 1 / 64), (16, 0.75), (32, 0.5), (64, 0.0)):
        assert abs(_lag_corr(q, d) - want) < 0.1, (d, _lag_corr(q, d))
    plain = harness.build_cases("quick", T=[2048])[0]
    assert abs(_lag_corr(harness.train_inputs(plain, CPU, requires_grad=False)["q"].double(), 1)) < 0.1
    recs = harness.run([dataclasses.replace(train[0], T=256)], CPU, backend="reference", reps=1, baselines=[],
                       branches=False, progress=False)
    assert recs and all(r["ok"] is True for r in recs), [(r["impl"], r["note"]) for r in recs]
    with pytest.raises(ValueError, match="smooth_queries"):
        harness.build_cases("quick", smooth_queries=-1)
    assert cli_main(["--preset", "quick", "--smooth-queries", "-1"]) == 2


def test_presets_and_table():
    paper = harness.build_cases("paper")
    assert {(c.T, c.Dk, c.Dv) for c in paper} == {(t, dk, 128) for t in (8192, 16384, 32768, 65536, 131072)
                                                   for dk in (128, 192)}
    assert all((c.HQ, c.H, c.B, c.dtype, c.window_size, c.num_selected) == (64, 4, 1, "bf16", 512, 16) for c in paper)
    assert sorted(c.HQ // c.H for c in harness.build_cases("gqa")) == [1, 4, 8, 16]
    assert {(c.T, c.B) for c in harness.build_cases("decode")} == {
        (t, b) for t in (8192, 16384, 32768, 65536, 131072) for b in (1, 8, 64)}
    with pytest.raises(ValueError, match="preset"):
        harness.build_cases("nope")
    with pytest.raises(SystemExit):
        cli_main(["--T", "0"])
    rec = harness._record(harness.Task(_quick_case(), "sdpa.flash", "fwd", None, False), "auto")
    rec["note"] = "n/a: sdpa.flash: not here"
    table = report.format_table([rec])
    assert "n/a" in table.splitlines()[2] and "not here" in table


def test_backward_that_cannot_rerun_is_timed_as_difference():
    class Once(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.used = False
            return x * 2

        @staticmethod
        def backward(ctx, g):
            if ctx.used:
                raise RuntimeError("Trying to backward through the graph a second time")
            ctx.used = True
            return g * 2

    x = torch.randn(64, requires_grad=True)
    fn, grads, note = harness._backward_or_difference(lambda: Once.apply(x), [x], "once")
    assert isinstance(fn, harness.Difference) and note == "once; bwd = (fwd+bwd) - fwd"
    task = harness.Task(_quick_case(), "flex.window", "bwd", lambda: (fn, grads, note), False)
    rec = harness.measure(task, harness.Timer(CPU, 2), "reference", None)
    assert rec["ok"] is True and rec["ms"] >= 0 and "(fwd+bwd) - fwd" in rec["note"]
    # a re-runnable backward is timed alone
    fn, _, note = harness._backward_or_difference(lambda: x * 2, [x], "twice")
    assert callable(fn) and not isinstance(fn, harness.Difference) and note == "twice"


def test_plot_group_size_axis(tmp_path):
    """One T and several group sizes (the gqa preset): x is HQ/H, one line per impl and pass."""
    recs = []
    for hq in (4, 16, 64):
        for impl, ms in (("nsa", 10.0 / hq), ("sdpa.flash", 20.0)):
            task = harness.Task(dataclasses.replace(_quick_case(), HQ=hq, H=4), impl, "fwd", None, impl == "nsa")
            r = harness._record(task, "auto")
            r.update(ms=ms, ok=True)
            recs.append(r)
    harness.add_speedups(recs)
    assert [round(r["speedup"], 3) for r in recs if r["impl"] == "nsa"] == [8.0, 32.0, 128.0]
    png = tmp_path / "g.png"
    report.plot(str(png), recs)
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert report._line_key(recs, recs[0], ("HQ", "H")) == "nsa fwd"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_paper_and_decode_small(tmp_path):
    """The CUDA paths (do_bench / event timing, peak memory, SDPA backends) on small shapes:
    `pytest -m gpu tests/test_bench.py` on the H200."""
    js = tmp_path / "gpu.json"
    rc = cli_main(["--preset", "paper", "--T", "4k", "--dims", "128x128", "--baselines", "sdpa", "--reps", "2",
                   "--json", str(js), "--no-progress"])
    recs = json.loads(js.read_text())["records"]
    nsa = [r for r in recs if r["impl"].startswith("nsa")]
    assert rc == 0 and all(r["ok"] is True for r in nsa), [(r["impl"], r["pass"], r["note"]) for r in nsa]
    assert all(r["mem_mib"] is not None and r["ms"] > 0 for r in nsa)
    assert any(r["impl"].startswith("sdpa.") and r["ok"] for r in recs)
    js2 = tmp_path / "dec.json"
    assert cli_main(["--preset", "decode", "--T", "4k", "--B", "2", "--reps", "2", "--json", str(js2),
                     "--no-progress"]) == 0
    dec = json.loads(js2.read_text())["records"]
    assert any(r["impl"] == "nsa" and r["ok"] and r["gbps"] > 0 for r in dec)
