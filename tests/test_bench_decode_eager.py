"""nsa bench times a decode step both ways: replayed from a CUDA graph ('decode') and called
eagerly, host work included ('decode_eager'), for NSA and the SDPA baselines."""

import torch

from nsa.bench import harness

CPU = torch.device("cpu")


def test_decode_case_has_graph_and_eager_tasks():
    case = harness.build_cases("quick", T=[256])[-1]
    assert case.kind == "decode"
    tasks = harness.tasks_for(case, CPU, "reference", baselines=("sdpa",))
    got = {(t.impl, t.pass_) for t in tasks}
    for p in ("decode", "decode_eager"):
        assert ("nsa", p) in got and all((impl, p) in got for impl in harness._SDPA)
    assert all(t.pass_ in harness.PASSES for t in tasks)


def test_eager_records_are_checked_timed_and_compared():
    """The eager NSA record shares the decode check's verdict, is timed, and gets a speedup
    against the best eager SDPA of the same case."""
    case = harness.build_cases("quick", T=[256])[-1]
    recs = harness.run([case], CPU, backend="reference", reps=2, baselines=("sdpa",), progress=False)
    by = {(r["impl"], r["pass"]): r for r in recs}
    eager = by[("nsa", "decode_eager")]
    assert eager["ok"] is True and eager["ms"] > 0, eager
    assert by[("nsa", "decode")]["ok"] is True
    sdpa = [r for r in recs if r["impl"].startswith("sdpa.") and r["pass"] == "decode_eager" and r["ok"]]
    if sdpa:
        assert eager["speedup"] == min(r["ms"] for r in sdpa) / eager["ms"]


def test_failed_decode_check_skips_the_eager_timing():
    case = harness.build_cases("quick", T=[256])[-1]

    def bad(**kw):
        return torch.zeros_like(kw["q"])[..., :kw["v_cmp"].shape[-1]]

    res = harness.check_decode(case, "reference", CPU, decode_fn=bad)
    assert res.get("nsa", "decode_eager")[0] is False
    task = next(t for t in harness.tasks_for(case, CPU, "reference", baselines=()) if t.pass_ == "decode_eager")
    rec = harness.measure(task, harness.Timer(CPU, 1), "reference", res)
    assert rec["ok"] is False and rec["ms"] is None
