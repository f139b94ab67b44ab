"""The `nsa` command: help, the demo at a small size, forwarding to nsa.bench, the key arithmetic."""

import subprocess
import sys
import types
from pathlib import Path

import pytest

from nsa._cli_utils import canonical_dtype
from nsa.cli import keys_per_query, main, resolve_device

SMALL_DEMO = ["demo", "--layer", "--tokens", "150", "--decode-steps", "6", "--hidden", "64", "--heads", "4", "--kv-heads", "2",
              "--head-dim", "16", "--backend", "reference", "--device", "cpu"]


def test_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "demo" in out and "bench" in out
    with pytest.raises(SystemExit) as e:
        main(["demo", "--help"])
    assert e.value.code == 0
    assert "--tokens" in capsys.readouterr().out


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "demo" in capsys.readouterr().out


def test_console_entry_points():
    r = subprocess.run([sys.executable, "-m", "nsa.cli", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "demo" in r.stdout, r.stderr
    script = Path(sys.executable).parent / "nsa"
    if script.exists():  # the console script installed by `pip install -e .`
        r = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0 and "bench" in r.stdout, r.stderr


@pytest.mark.parametrize("dtype", ["fp32", "float64"])
def test_demo_small(capsys, dtype):
    assert main(SMALL_DEMO + ["--dtype", dtype]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "device: CPU" in out
    assert "forward" in out and "backward" in out and "gradients finite: yes" in out
    assert "-> match" in out
    assert "64k" in out and "32768" in out and "3573" in out


def test_demo_bad_arguments(capsys):
    assert main(["demo", "--layer", "--tokens", "10", "--decode-steps", "10"]) == 2
    assert main(["demo", "--layer", "--tokens", "128", "--kv-heads", "3"]) == 2  # 4 heads, 3 KV heads: ValueError -> 2
    assert "num_heads" in capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["demo", "--device", "foo"], "--device: expected cpu, cuda or cuda:N"),
    (["bench", "--device", "foo"], "--device: expected cpu, cuda or cuda:N"),
    (["bench", "--heads", "6/4", "--T", "64"], "heads: HQ (6) must be a positive multiple of H (4)"),
])
def test_bad_arguments_exit_2_with_a_message(capsys, argv, message):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("text,name", [("bf16", "bf16"), ("bfloat16", "bf16"), ("fp16", "fp16"), ("float16", "fp16"),
                                       ("fp32", "fp32"), ("float32", "fp32"), ("FP64", "fp64"), ("float64", "fp64")])
def test_dtype_spellings(text, name):
    """`nsa demo --dtype` and `nsa bench --dtype` take the short and the torch spelling alike."""
    from nsa import cli
    from nsa.bench import _parser as bench_parser
    from nsa.bench.harness import build_cases

    assert canonical_dtype(text) == name
    assert cli._parser().parse_args(["demo", "--dtype", text]).dtype == name
    assert bench_parser().parse_args(["--dtype", text]).dtype == name
    assert {c.dtype for c in build_cases("quick", dtype=text)} == {name}


@pytest.mark.parametrize("argv", [["demo", "--dtype", "half"], ["bench", "--dtype", "int8"], ["bench", "--dtype", ""]])
def test_bad_dtype_exits_2_naming_the_option(capsys, argv):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "argument --dtype: expected one of bf16 (bfloat16), fp16 (float16), fp32 (float32)" in err


def test_every_option_has_help():
    from nsa import cli
    from nsa.bench import _parser as bench_parser

    from nsa.bench.model_step import _parser as model_bench_parser

    subs = cli._parser()._subparsers._group_actions[0].choices
    eval_subs = subs["eval"]._subparsers._group_actions[0].choices.values()
    for parser in (subs["demo"], subs["train"], subs["generate"], *eval_subs, bench_parser(), model_bench_parser()):
        missing = [a.option_strings for a in parser._actions if a.option_strings and not a.help]
        assert not missing, (parser.prog, missing)


def test_nothing_below_the_cli_imports_it():
    """nsa.cli sits on top: no other module of the package imports it (bench used to, for --device)."""
    import ast

    import nsa

    src = Path(nsa.__file__).parent
    for path in src.rglob("*.py"):
        if path == src / "cli.py":
            continue
        package = ".".join(("nsa",) + path.relative_to(src).parent.parts)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = package.rsplit(".", node.level - 1)[0] if node.level else ""
                module = ".".join(p for p in (base, node.module) if p)
                names = [module] + [f"{module}.{a.name}" for a in node.names]
            else:
                continue
            assert "nsa.cli" not in names, f"{path} imports nsa.cli"


def test_resolve_device(monkeypatch):
    import torch

    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="--device: expected"):
        resolve_device("meta")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device(None) == torch.device("cpu")
    with pytest.raises(ValueError, match="no CUDA device is available"):
        resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(ValueError, match="has 2 CUDA device"):
        resolve_device("cuda:2")


def test_bench_forwards_arguments(monkeypatch):
    seen = []
    fake = types.ModuleType("nsa.bench")
    fake.cli_main = lambda argv: seen.append(argv) or 7
    monkeypatch.setitem(sys.modules, "nsa.bench", fake)
    assert main(["bench", "--preset", "tiny", "--help"]) == 7
    assert seen == [["--preset", "tiny", "--help"]]


def test_keys_per_query_matches_nsa_md_table():
    """NSA.md section 2: full attention T/2; NSA 1715, 2009, 2540, 3573, 5626 at 8k..128k (whole blocks)."""
    for n, want in zip((8, 16, 32, 64, 128), (1715, 2009, 2540, 3573, 5626)):
        k = keys_per_query(n * 1024, whole_blocks=True)
        assert round(k["nsa"]) == want, n
        assert k["full"] == n * 1024 / 2 + 0.5


def test_keys_per_query_brute_force():
    """The closed forms against counting keys one query at a time."""
    T, ks, st, bs, n, w = 300, 8, 4, 16, 5, 20
    got = keys_per_query(T, ks, st, bs, n, w)
    cmp = slc = win = 0
    for t in range(T):
        cmp += sum(1 for i in range(T) if i * st + ks - 1 <= t)
        blocks = list(range(t // bs + 1))[-n:]  # any n causal blocks incl. the own one: same count
        slc += sum(1 for s in range(t + 1) if s // bs in blocks)
        win += sum(1 for s in range(t + 1) if s > t - w)
    assert got["cmp"] == pytest.approx(cmp / T)
    assert got["slc"] == pytest.approx(slc / T)
    assert got["win"] == pytest.approx(win / T)
    assert got["full"] == pytest.approx((T + 1) / 2)
