"""benchmarks/history.py: rows from an `nsa bench --json` file, appended once, against the best SDPA."""

import csv
import json

import pytest

from tests.helpers import load_benchmark_script


@pytest.fixture(scope="module")
def history():
    return load_benchmark_script("history")


def _record(case, impl, pass_, ms, ok=True):
    T = int(case.split("/T")[1].split("k")[0]) * 1024
    return {"case": case, "impl": impl, "pass": pass_, "T": T, "B": 1, "HQ": 64, "H": 4, "D": 128, "Dv": 128,
            "dtype": "bf16", "ms": ms, "speedup": None, "tflops": None, "gbps": None, "ideal": None,
            "mem_mib": None, "ok": ok, "backend": "auto", "note": ""}


def _bench_json(path, date, git, records):
    head = {"date_utc": date, "gpu": "NVIDIA H200", "driver": "580.159.04", "torch": "2.11.0+cu130",
            "triton": "3.6.0", "git": git, "preset": "paper"}
    path.write_text(json.dumps({"format": "nsa-bench/1", "header": head, "records": records}))
    return path


def test_append_rows_once_sorted_by_date(tmp_path, history):
    c64, cqs = "paper/train/T64k/B1/HQ64H4/D128x128", "paper/train/T64k/B1/HQ64H4/D128x128/qs256"
    (tmp_path / "run9").mkdir()  # the run's name defaults to the JSON's folder
    later = _bench_json(tmp_path / "run9" / "b.json", "2026-11-29T15:00:00Z", "abc1234", [
        _record(c64, "nsa", "fwd", 35.0), _record(c64, "nsa", "bwd", 77.0),
        _record(c64, "nsa.cmp", "fwd", 9.0),  # a branch: not a headline row
        _record(c64, "sdpa.flash", "fwd", 200.0), _record(c64, "sdpa.cudnn", "fwd", 114.0),
        _record(c64, "sdpa.cudnn", "bwd", 324.0), _record(cqs, "nsa", "fwd", 29.0),
        _record(cqs, "nsa", "bwd", None, ok=False)])  # failed: left out
    earlier = _bench_json(tmp_path / "early.json", "2026-11-28T10:00:00Z", None, [_record(c64, "nsa", "fwd", 60.0)])
    out = tmp_path / "history.csv"
    assert history.append(history.rows_from_json(later), out) == 3
    assert history.append(history.rows_from_json(earlier, run="run1", commit="~fff0000"), out) == 1
    assert history.append(history.rows_from_json(later), out) == 0  # already there
    rows = list(csv.DictReader(out.open()))
    assert list(rows[0]) == history.FIELDS
    assert [(r["run"], r["commit"], r["variant"], r["pass"]) for r in rows] == [
        ("run1", "~fff0000", "", "fwd"), ("run9", "abc1234", "", "fwd"), ("run9", "abc1234", "", "bwd"),
        ("run9", "abc1234", "qs256", "fwd")]
    fwd = rows[1]
    assert (fwd["nsa_ms"], fwd["baseline"], fwd["baseline_ms"], fwd["speedup"]) == ("35.00", "sdpa.cudnn", "114.00", "3.26")
    assert fwd["T"] == "65536" and fwd["hardware"] == "NVIDIA H200 (driver 580.159.04)"
    assert rows[0]["baseline"] == "" and rows[0]["speedup"] == ""  # a run without baselines


def test_refuses_other_json(tmp_path, history):
    p = tmp_path / "x.json"
    p.write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ValueError, match="not an nsa bench JSON"):
        history.rows_from_json(p)
