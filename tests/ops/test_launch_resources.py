"""Every kernel launch of the library fits an H100/H200 (sm_90): it compiles, and its shared memory
is within the opt-in limit of a thread block.

Regression: the H200 run of the GPU tests failed with ``triton.runtime.errors.OutOfResources: out
of resource: shared memory, Required: 264192, Hardware limit: 232448`` (selected attention's
scatter dQ at head dims 192/128 and 256/256 on 3 pipeline stages). The CPU interpreter never sees
that class of bug: it runs no compiler. Compiling for sm_90 needs no GPU, so here every launch the
host launchers make with their GPU configs (forward and backward of every op, both selected
attention algorithms, the fused NSA path's backward) is recorded instead of run and compiled
with ``triton.compile`` for ``GPUTarget("cuda", 90, 32)``; see launch_resources.py, which this runs
in a fresh interpreter without ``TRITON_INTERPRET``. ``NSA_LAUNCH_FULL=1`` compiles the whole shape
matrix instead of the pruned one.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HELPER = Path(__file__).with_name("launch_resources.py")
ROOT = Path(__file__).resolve().parents[2]
# sm_90 opt-in shared memory per block: what the H200 reported as "Hardware limit" (227 KB)
SHARED_LIMIT = 232448
OPS = ("compressed", "selection", "selected", "window", "gate", "decode", "rope")


@pytest.fixture(scope="module")
def launches(tmp_path_factory):
    import triton.backends
    if "nvidia" not in triton.backends.backends:
        pytest.skip("triton has no NVIDIA backend to compile with")
    tmp = tmp_path_factory.mktemp("launch_resources")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    env["TRITON_CACHE_DIR"] = str(tmp / "cache")
    out = tmp / "launches.json"
    cmd = [sys.executable, str(HELPER), str(out)]
    if os.environ.get("NSA_LAUNCH_FULL", "0") == "1":
        cmd.append("--full")
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-4000:]
    return json.loads(out.read_text())


def _where(launch) -> str:
    return (f"{launch['kernel']} [{launch['op']} {launch['label']}; {launch['case']}; "
            f"{launch['config']}]")


@pytest.mark.parametrize("op", OPS)
def test_launches_fit_sm90(launches, op):
    mine = [launch for launch in launches["launches"] if launch["op"] == op]
    assert mine, f"no kernel launch recorded for {op}"
    failed = [launch for launch in mine if not launch["ok"]]
    if failed:
        pytest.fail("compiling for sm_90 failed:\n" + "\n".join(
            f"{_where(launch)}: {launch['error']}" for launch in failed))
    over = [launch for launch in mine if launch["shared"] > SHARED_LIMIT]
    if over:
        pytest.fail(f"shared memory beyond sm_90's {SHARED_LIMIT} bytes per block (OutOfResources on an "
                    "H100/H200):\n" + "\n".join(f"{_where(launch)}: {launch['shared']} bytes" for launch in over))


def test_every_kernel_is_launched(launches):
    """Every kernel that nsa.ops launches was compiled above: a new kernel or launcher needs its
    calls in launch_resources.run_case."""
    seen = {launch["kernel"] for launch in launches["launches"]}
    missing = sorted(set(launches["kernels"]) - seen)
    assert not missing, f"kernels of nsa.ops that no launcher call in launch_resources.py reaches: {missing}"


def test_shared_memory_is_measured(launches):
    """The metadata read is the one the launch checks: the pipelined attention kernels use well
    over 64 KB (a Triton that stopped reporting it would make the check above vacuous)."""
    assert max(launch["shared"] for launch in launches["launches"] if launch["ok"]) > 64 * 1024
