"""The README's code cannot rot: every ```python block runs, every ```bash line is checked.

Python blocks run in README order, each in a fresh namespace (every block is self-contained, as
a reader copies it) but all in one temporary working directory with HOME pointed into it, so a
block may use files an earlier block wrote (the Hugging Face block converts the run the
training block made) and nothing lands in the repository or the real home directory.

Shell blocks are not executed (a training run or a GPU benchmark does not fit in CI); each
command is checked instead, by kind: ``nsa ...`` / ``python -m nsa.cli ...`` / ``torchrun ...
-m nsa.cli ...`` arguments go through the CLI's own parser (``nsa bench`` through the
benchmark's); ``make`` names a Makefile target and variables the Makefile defines; ``pip
install`` names extras that pyproject.toml defines; ``bash scripts/...`` and ``python
examples/...`` name files that exist. A command of any other kind fails the test, so a new kind
of command needs a check here first.
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import shlex
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```[ \t]*$", re.M | re.S)


def blocks(text: str, lang: str) -> list[tuple[int, str]]:
    """``(first line number, code)`` of every fenced block of ``lang``."""
    return [(text[:m.start()].count("\n") + 2, m.group(2)) for m in FENCE.finditer(text) if m.group(1) == lang]


def shell_commands(code: str) -> list[list[str]]:
    """The commands of a shell block: continuation lines joined, comments dropped, split as the
    shell would split them (``a && b`` gives two commands)."""
    out = []
    for line in code.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        cmd = []
        for w in words + ["&&"]:
            if w in ("&&", ";", "||"):
                if cmd:
                    out.append(cmd)
                cmd = []
            else:
                cmd.append(w)
    return out


TEXT = README.read_text()
PYTHON_BLOCKS = blocks(TEXT, "python")
SHELL_BLOCKS = blocks(TEXT, "bash")


# ---- python blocks ------------------------------------------------------------------------------

def _needs(code: str) -> list[str]:
    """Optional libraries a block imports (a block is skipped only where such a library is
    missing; `make test` installs every one of them)."""
    return [name for name in ("transformers",) if re.search(rf"^\s*(import|from)\s+{name}\b", code, re.M)]


def test_readme_has_code():
    """The sections the README promises runnable code for are there."""
    assert len(PYTHON_BLOCKS) >= 4, "expected the ops, layer, model and training blocks"
    assert len(SHELL_BLOCKS) >= 4
    joined = "\n".join(code for _, code in PYTHON_BLOCKS)
    for needle in ("cu_seqlens", "nsa.nsa(", "NativeSparseAttention", "new_cache()", "LanguageModel",
                   ".generate(", "save_pretrained", "from_pretrained", "TrainConfig"):
        assert needle in joined, f"no python block uses {needle}"


def run_python_blocks(code_blocks):
    """Runs ``(line, code)`` blocks in order, each in a fresh namespace; a failure names the line."""
    for line, code in code_blocks:
        missing = [m for m in _needs(code) if importlib.util.find_spec(m) is None]
        if missing:
            continue  # an optional extra (e.g. [hf]) is not installed here: that block alone is not run
        namespace = {"__name__": f"readme_block_line_{line}"}
        try:
            exec(compile(code, f"README.md:{line}", "exec"), namespace)
        except Exception as e:
            raise AssertionError(f"the python block at README.md line {line} failed: {type(e).__name__}: {e}") from e


def test_python_blocks_run_in_order(tmp_path, monkeypatch):
    """Every python block, in README order, runs without error."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("NSA_BACKEND", raising=False)
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny sizes: one thread is as fast, and never waits on a busy core
    try:
        run_python_blocks(PYTHON_BLOCKS)
    finally:
        torch.set_num_threads(threads)


def test_a_broken_block_fails(tmp_path, monkeypatch):
    """The runner reports a block that raises, with its line (a guard against a test that cannot
    fail): here the ops block with a stride that does not divide the compression block."""
    monkeypatch.chdir(tmp_path)
    line, code = PYTHON_BLOCKS[0]
    broken = code.replace("kernel_size=16, stride=8, block_size=16", "kernel_size=16, stride=7, block_size=16", 1)
    assert broken != code
    with pytest.raises(AssertionError, match=f"line {line} failed: ValueError: kernel_size"):
        run_python_blocks([(line, broken)])


# ---- shell blocks -------------------------------------------------------------------------------

def _makefile():
    text = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([A-Za-z][\w.-]*)\s*:(?!=)", text, re.M))
    variables = set(re.findall(r"^([A-Z_][A-Z0-9_]*)\s*[?:]?=", text, re.M))
    return targets, variables


def _extras():
    """The names of pyproject.toml's ``[project.optional-dependencies]`` (read without tomllib,
    which Python 3.10 lacks)."""
    text = (ROOT / "pyproject.toml").read_text()
    table = text.split("[project.optional-dependencies]", 1)[1].split("\n[", 1)[0]
    return set(re.findall(r"^([A-Za-z][\w-]*)\s*=", table, re.M))


def _parse(parser: argparse.ArgumentParser, args: list[str], where: str):
    try:
        return parser.parse_args(args)
    except SystemExit as e:
        raise AssertionError(f"{where}: the CLI refuses {shlex.join(args)!r} (exit {e.code})") from None


def check_nsa_args(args: list[str], where: str):
    """``nsa ARGS`` as the console command would parse it (nothing runs)."""
    assert args, f"{where}: `nsa` without a subcommand"
    if args[0] == "bench":
        rest = args[1:]
        if "--preset=model" in rest or any(a == "--preset" and b == "model" for a, b in zip(rest, rest[1:])):
            from nsa.bench.model_step import _parser as bench_parser
        else:
            from nsa.bench import _parser as bench_parser
        _parse(bench_parser(), rest, where)
        return
    from nsa.cli import _parser

    ns = _parse(_parser(), args, where)
    assert ns.command in ("demo", "train", "generate", "eval"), f"{where}: unknown subcommand {args[0]!r}"
    if ns.command == "train":  # the options must also make a valid TrainConfig (nothing is read or written)
        from nsa.cli import _model_overrides
        from nsa.train import TrainConfig

        options = {k: v for k, v in vars(ns).items() if k not in ("command", "func", "config", "resume")}
        if "model" in options:
            options["model"] = _model_overrides(options["model"])
        if options.get("dtype") is None:
            options.pop("dtype", None)
        if "steps" in options and "tokens" in options:
            raise AssertionError(f"{where}: --steps and --tokens together")
        if "steps" not in options and "tokens" not in options:
            options["steps"] = 1
        try:
            TrainConfig(**options).model_config()
        except ValueError as e:
            raise AssertionError(f"{where}: {e}") from None


def check_command(cmd: list[str], where: str):
    """One shell command of the README (see the module docstring for what is checked)."""
    while cmd and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", cmd[0]):  # environment assignments
        cmd = cmd[1:]
    head, args = cmd[0], cmd[1:]
    if head == "nsa":
        check_nsa_args(args, where)
    elif head in ("python", "python3"):
        if args[:2] == ["-m", "nsa.cli"]:
            check_nsa_args(args[2:], where)
        elif args[:2] == ["-m", "nsa.bench"]:
            check_nsa_args(["bench"] + args[2:], where)
        else:
            assert args and args[0].startswith("examples/") and (ROOT / args[0]).is_file(), \
                f"{where}: python runs {args[:1]}, not an nsa module or an example"
    elif head == "torchrun":
        i = args.index("-m") if "-m" in args else None
        assert i is not None and args[i + 1] == "nsa.cli", f"{where}: torchrun must run `-m nsa.cli`"
        assert all(a.startswith("--") for a in args[:i]), f"{where}: torchrun options {args[:i]}"
        check_nsa_args(args[i + 2:], where)
    elif head == "make":
        targets, variables = _makefile()
        for a in args:
            if "=" in a:
                assert a.split("=", 1)[0] in variables, f"{where}: the Makefile has no variable {a.split('=')[0]}"
            else:
                assert a in targets, f"{where}: the Makefile has no target {a!r}"
    elif head == "pip":
        assert args[:1] == ["install"], f"{where}: pip {args[:1]}"
        specs = [a for a in args[1:] if not a.startswith("-")]
        assert specs, f"{where}: pip install of nothing"
        for spec in specs:
            m = re.fullmatch(r"(?:\.|nsa)(?:\[([\w,]+)\])?(?:\s*@\s*git\+https://\S+)?", spec)
            assert m, f"{where}: pip install {spec!r} is not this project"
            unknown = set((m.group(1) or "").split(",")) - {""} - _extras()
            assert not unknown, f"{where}: pyproject.toml has no extra {sorted(unknown)}"
    elif head == "bash":
        assert args and args[0].startswith("scripts/") and (ROOT / args[0]).is_file(), f"{where}: bash {args[:1]}"
    elif head == "git":
        assert args[:1] == ["clone"], f"{where}: git {args[:1]}"
    elif head == "cd":
        pass
    else:
        raise AssertionError(f"{where}: no check for {head!r} commands (add one to tests/test_readme.py)")


@pytest.mark.parametrize("line,code", SHELL_BLOCKS, ids=[f"line{line}" for line, _ in SHELL_BLOCKS])
def test_shell_block(line, code):
    commands = shell_commands(code)
    assert commands, f"README.md line {line}: an empty shell block"
    for cmd in commands:
        check_command(cmd, f"README.md line {line}: `{shlex.join(cmd)}`")


BAD_COMMANDS = [
    ("nsa train --out r --steps many", "refuses"),
    ("nsa train --out r --preset huge", "refuses"),
    ("nsa train --out r --seq-len 4096", "max_seq_len"),
    ("nsa generate --prompt hi", "refuses"),
    ("nsa bench --preset paper --T nonsense", "refuses"),
    ("nsa bench --preset model --model huge", "refuses"),
    ("torchrun --nproc_per_node=2 -m nsa.cli train --parallel tp --out r", "refuses"),
    ("make install-everything", "no target"),
    ("make test TORCH_VERSION=2.6", "no variable"),
    ("pip install '.[gpu]'", "no extra"),
    ("pip install torch", "not this project"),
    ("bash scripts/missing.sh", "bash"),
    ("python examples/missing.py", "not an nsa module or an example"),
    ("curl https://example.com | sh", "no check"),
]


@pytest.mark.parametrize("command,message", BAD_COMMANDS, ids=[f"bad{i}" for i in range(len(BAD_COMMANDS))])
def test_bad_commands_fail(command, message):
    """The checks above reject what they exist to catch."""
    with pytest.raises(AssertionError, match=message):
        for cmd in shell_commands(command):
            check_command(cmd, "test")


# ---- the README's rules -------------------------------------------------------------------------

def test_links_and_images_exist():
    for target in re.findall(r"\]\(([^)\s]+)\)", TEXT):
        if re.match(r"[a-z]+://", target) or target.startswith("#"):
            continue
        assert (ROOT / target.split("#")[0]).exists(), f"README.md links to {target}, which does not exist"


def test_no_run_history_in_the_readme():
    """Run numbers, commit ids and profiler counters belong in benchmarks/NOTES.md."""
    assert not re.search(r"\bruns? \d+", TEXT), re.search(r"\bruns? \d+", TEXT).group(0)
    commits = [w for w in re.findall(r"\b[0-9a-f]{7,40}\b", TEXT) if re.search(r"\d", w) and re.search(r"[a-f]", w)]
    assert not commits, f"commit ids in README.md: {commits}"
    for word in ("Nsight", "ncu ", "spill", "occupancy", "wgmma", "TMA"):
        assert word not in TEXT, f"README.md mentions {word}: kernel internals go to benchmarks/NOTES.md"


def test_the_model_step_table_matches_its_published_result():
    """The README's model-step table is the one in benchmarks/results (same speedups)."""
    import json

    runs = sorted((ROOT / "benchmarks/results").glob("*_model/bench_model.json"))
    assert runs, "no published model-step result"
    records = json.loads(runs[-1].read_text())["records"]
    for r in records:
        if r["kind"] == "nsa" and r["speedup"] is not None:
            assert f"{r['speedup']:.2f}x |" in TEXT, (r["T"], r["speedup"])


def test_the_layer_table_matches_its_published_result():
    """The README's layer table is the one in benchmarks/results (same times and speedups)."""
    import json

    runs = sorted((ROOT / "benchmarks/results").glob("*_layer/bench_layer.json"))
    assert runs, "no published layer result"
    records = [r for r in json.loads(runs[-1].read_text())["records"] if r["impl"] == "nsa"]
    assert records
    for r in records:
        assert f"{r['speedup']:.2f}x" in TEXT, (r["case"], r["pass"], r["speedup"])
        assert f"{r['ms']:.2f} /" in TEXT, (r["case"], r["pass"], r["ms"])
