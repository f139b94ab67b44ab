"""`nsa bench --preset model` on CPU at tiny sizes: the check runs, both kinds are timed."""

import json

from nsa.bench import cli_main


def test_model_preset_end_to_end(tmp_path, capsys):
    out = tmp_path / "model.json"
    assert cli_main(["--preset", "model", "--T", "64", "--reps", "1", "--check-T", "48", "--device", "cpu",
                     "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    # The check compares the default backend (the reference on CPU, unless a faster path is the
    # default) with the reference: on CPU it shows the check runs and passes, not the kernels.
    assert data["check"] == "ok"
    rows = {r["kind"]: r for r in data["records"]}
    assert set(rows) == {"nsa", "full"} and all(r["T"] == 64 and r["ms"] > 0 for r in rows.values())
    assert rows["nsa"]["speedup"] == rows["full"]["ms"] / rows["nsa"]["ms"]
    assert "speedup" in capsys.readouterr().out


def test_model_preset_bad_input(capsys):
    assert cli_main(["--preset", "model", "--reps", "0", "--device", "cpu"]) == 2
    assert "--reps" in capsys.readouterr().err
    assert cli_main(["--preset", "model", "--device", "tpu"]) == 2
    assert "--device" in capsys.readouterr().err
