"""The package as users get it: one version, a wheel and an sdist that install and import,
the core without its optional dependencies, and API docs that build without warnings."""

import importlib.metadata
import os
import shutil
import site
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest

import nsa

ROOT = Path(__file__).resolve().parents[1]
OPTIONAL = ("triton", "tqdm", "matplotlib", "mpl_toolkits", "pylab")


def _run(cmd, timeout=120, **kwargs):
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, **kwargs)
    assert r.returncode == 0, f"{' '.join(map(str, cmd))}\nstdout:\n{r.stdout}\nstderr:\n{r.stderr}"
    return r


def _site_dirs():
    """The directories this interpreter imports installed packages from (torch among them)."""
    dirs = [Path(p) for p in site.getsitepackages() + [sysconfig.get_paths()["purelib"]]]
    return list(dict.fromkeys(d for d in dirs if d.is_dir()))


def test_one_version():
    """nsa.__version__ is the only place the version is written: pyproject reads it."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in meta["project"] and "version" in meta["project"]["dynamic"]
    assert meta["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "nsa.__version__"}
    assert importlib.metadata.version("nsa") == nsa.__version__


def test_core_without_optional_dependencies(tmp_path):
    """`import nsa`, the layer, the reference ops and the CLI work where triton, tqdm and
    matplotlib are not installed; asking for what needs them is an error naming the extra."""
    view = tmp_path / "site"  # the installed packages, minus the optional ones and nsa itself
    view.mkdir()
    for d in _site_dirs():
        for entry in d.iterdir():
            name = entry.name.lower()
            if name.startswith(OPTIONAL) or name.startswith(("nsa", "__editable__", "_nsa")):
                continue
            if not (view / entry.name).exists():
                (view / entry.name).symlink_to(entry)
    script = textwrap.dedent("""
        import importlib.util, sys
        for name in ("triton", "tqdm", "matplotlib"):
            assert importlib.util.find_spec(name) is None, name
        import torch
        import nsa
        from nsa.bench import harness, report
        from nsa.cli import main

        cfg = nsa.NSAConfig.preset("tiny")
        y = nsa.NativeSparseAttention(cfg)(torch.randn(1, 80, cfg.hidden_size))
        assert y.shape == (1, 80, cfg.hidden_size) and bool(torch.isfinite(y).all())
        q = torch.randn(1, 80, 4, 16)
        try:
            nsa.sliding_window_attention(q, q, q, window_size=16, backend="triton")
        except ValueError as e:
            assert "triton is not installed" in str(e) and "nsa[triton]" in str(e), e
        else:
            raise AssertionError("backend='triton' without triton did not raise")
        try:
            report.import_matplotlib()
        except RuntimeError as e:
            assert "nsa[plot]" in str(e), e
        else:
            raise AssertionError("no error without matplotlib")
        with harness._progress_bar(2, True) as bar:  # tqdm missing: a bar that draws nothing
            bar.update()
        assert main(["bench", "--preset", "quick", "--plot", "x.png"]) == 2
        print("imported", nsa.__version__, "without", "triton tqdm matplotlib")
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(view)])
    # -S: no site-packages but the view; tmp_path as cwd keeps the checkout off sys.path
    r = _run([sys.executable, "-S", "-c", script], env=env, cwd=tmp_path)
    assert f"imported {nsa.__version__} without" in r.stdout
    assert "--plot: plotting needs matplotlib: pip install 'nsa[plot]'" in r.stderr


@pytest.mark.slow
def test_wheel_and_sdist_install_and_import(tmp_path):
    """`python -m build` makes a wheel and an sdist of the tracked sources; the wheel installs
    with --no-deps into a fresh venv (torch visible from this one) and imports from there."""
    tree = tmp_path / "tree"
    tree.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, tree / name)
    shutil.copytree(ROOT / "src", tree / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    dist = tmp_path / "dist"
    # --no-isolation: build with this environment's setuptools (offline), which must satisfy
    # the build-system requirements (build checks them)
    _run([sys.executable, "-m", "build", "--no-isolation", "--outdir", dist, tree], timeout=180)
    version = nsa.__version__
    wheel, sdist = dist / f"nsa-{version}-py3-none-any.whl", dist / f"nsa-{version}.tar.gz"
    assert wheel.is_file() and sdist.is_file(), sorted(p.name for p in dist.iterdir())

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", venv])
    py = venv / "bin" / "python"
    purelib = _run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
    # this interpreter's packages (torch) after the venv's own: a venv made from inside a venv
    # sees only the base interpreter's site-packages through --system-site-packages
    (Path(purelib) / "_outer_site.pth").write_text("\n".join(str(d) for d in _site_dirs()) + "\n")
    _run([sys.executable, "-m", "pip", "--python", py, "install", "-q", "--no-deps", "--no-index", wheel],
         timeout=180)
    r = _run([py, "-c", "import nsa; print(nsa.__version__); print(nsa.__file__)"], cwd=tmp_path)
    got_version, path = r.stdout.split()
    assert got_version == version and Path(path).is_relative_to(venv), r.stdout
    r = _run([venv / "bin" / "nsa", "--help"], cwd=tmp_path)
    assert "demo" in r.stdout and "bench" in r.stdout


@pytest.mark.slow
def test_docs_build_without_warnings(tmp_path):
    """`make docs` (scripts/docs.py: pdoc over every public module) builds, warning-free."""
    pytest.importorskip("pdoc")
    out = tmp_path / "docs"
    r = _run([sys.executable, ROOT / "scripts" / "docs.py", out],
             timeout=300, cwd=ROOT)
    assert "Warn" not in r.stderr and "Error" not in r.stderr, r.stderr
    for page in ("index.html", "nsa.html", "nsa/layer.html", "nsa/ops.html", "nsa/ops/reference.html",
                 "nsa/bench.html", "nsa/cli.html"):
        assert (out / page).is_file(), page
