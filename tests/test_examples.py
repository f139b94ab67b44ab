"""Every script in examples/ runs on CPU at a tiny size, exits 0 and prints what it promises.

The scripts run as a user runs them (``python examples/x.py ...``, a fresh process in a temporary
working directory). Each process spends seconds importing torch and nsa, so all of them are
started at once, when the first test asks, and each test then waits for its own; on CI's two
cores that halves the wall time.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"

# script -> (arguments for a tiny CPU run, markers its output must contain)
RUNS = {
    "ops_packed.py": (["--lens", "70,17,40"], [
        "packed 3 sequences of [70, 17, 40] tokens on cpu",
        "nsa.ops.nsa: o (1, 127, 4, 16), selected blocks (1, 127, 2, 4)",
        "branch by branch vs nsa(): output and gradients within", "blocks equal",
        "packed vs each sequence alone: output and gradients within",
        "\nOK\n",
    ]),
    "custom_model.py": (["--steps", "2", "--decode-steps", "5"], [
        "2 NSA layers", "step   1  loss", "step   2  loss",
        "prompt 0 (30 tokens) -> generated [", "prompt 1 (45 tokens) -> generated [",
        "cached decoding vs full forward: relative difference", "-> OK",
    ]),
    "train_eval_generate.py": (["--steps", "3", "--batch-tokens", "256"], [
        "trained 3 steps (768 tokens", "training loss", "validation loss",
        "checkpoint, config.json, metrics.jsonl, tokenizer",
        "held-out loss:", "untrained", "generate: '12 + 30 =' -> ",
        "\nOK\n",
    ]),
    "serve_batch.py": (["--max-new-tokens", "6"], [
        "4 prompts of [18, 30, 89, 2] tokens", "(nsa attention) on cpu",
        "--- prompt 0, streamed ---\ndef fibonacci(n):",
        "24 tokens in", "steps/s x 4 prompts",
        "[3] '#' -> ", "batch vs one prompt at a time: identical",
    ]),
}


def test_every_example_is_tested():
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == sorted(RUNS)


@pytest.fixture(scope="module")
def example_runs(tmp_path_factory):
    """Starts every example at once; returns {script: Popen} with output captured."""
    # one thread each: the processes run side by side, and tiny ops gain nothing from more
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    env.pop("NSA_BACKEND", None)
    procs = {}
    for name, (args, _) in RUNS.items():
        cwd = tmp_path_factory.mktemp(name.removesuffix(".py"))
        procs[name] = subprocess.Popen([sys.executable, str(EXAMPLES / name), "--device", "cpu", *args], cwd=cwd,
                                       env={**env, "HOME": str(cwd)}, stdout=subprocess.PIPE,
                                       stderr=subprocess.STDOUT, text=True)
    yield procs
    for p in procs.values():
        if p.poll() is None:
            p.kill()
            p.wait()


@pytest.mark.parametrize("name", sorted(RUNS))
def test_example(example_runs, name):
    proc = example_runs[name]
    try:
        out, _ = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(f"examples/{name} did not finish in 300 s:\n{out}")
    assert proc.returncode == 0, f"examples/{name} exited {proc.returncode}:\n{out}"
    for marker in RUNS[name][1]:
        assert marker in out, f"examples/{name}: {marker!r} not in its output:\n{out}"
