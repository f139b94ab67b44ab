"""Backend selection: the ``backend`` argument, the ``NSA_BACKEND`` variable, and 'auto'."""

from __future__ import annotations

import importlib
import os
import runpy
from pathlib import Path

import pytest
import torch

import nsa.ops as ops
from nsa.ops import api, reference, torch_backend

from ..helpers import assert_close
from . import bruteforce

BRANCH_OPS = ("compressed_attention", "select_blocks", "selected_attention", "sliding_window_attention")
ALL_OPS = BRANCH_OPS + ("nsa",)
CPU = torch.device("cpu")
KS, ST, BS = 8, 4, 8
_compressed_reference = reference.compressed_attention  # unspied, for building inputs


def inputs():
    g = torch.Generator().manual_seed(0)

    def rnd(*s):
        return torch.randn(*s, generator=g, dtype=torch.float64)

    T, HQ, H, D = 21, 4, 2, 8
    tc = (T - KS) // ST + 1
    a = dict(q=rnd(1, T, HQ, D), k_cmp=rnd(1, tc, H, D), v_cmp=rnd(1, tc, H, D), k=rnd(1, T, H, D),
             v=rnd(1, T, H, D), gates=[rnd(1, T, HQ).sigmoid() for _ in range(3)])
    a["lse"] = _compressed_reference(a["q"], a["k_cmp"], a["v_cmp"], KS, ST)[1]
    a["idx"] = torch.tensor([0, 1, -1], dtype=torch.int32).expand(1, T, H, 3).contiguous()
    return a


def run(op, a, **kw):
    if op == "compressed_attention":
        return ops.compressed_attention(a["q"], a["k_cmp"], a["v_cmp"], KS, ST, **kw)
    if op == "select_blocks":
        return ops.select_blocks(a["q"], a["k_cmp"], a["lse"], KS, ST, BS, 3, 1, 1, **kw)
    if op == "selected_attention":
        return ops.selected_attention(a["q"], a["k"], a["v"], a["idx"], BS, **kw)
    if op == "sliding_window_attention":
        return ops.sliding_window_attention(a["q"], a["k"], a["v"], 5, **kw)
    return ops.nsa(a["q"], a["k_cmp"], a["v_cmp"], a["k"], a["v"], a["k"], a["v"], *a["gates"], kernel_size=KS,
                   stride=ST, block_size=BS, num_selected=3, num_initial=1, num_local=1, window_size=5, **kw)


def brute_force(op, a):
    """The op by the float64 brute-force definitions of tests/ops/bruteforce.py (independent of
    the reference), as a tuple of outputs."""
    if op == "compressed_attention":
        return bruteforce.compressed_attention(a["q"], a["k_cmp"], a["v_cmp"], KS, ST)
    if op == "select_blocks":
        return (bruteforce.select_blocks(a["q"], a["k_cmp"], KS, ST, BS, 3, 1, 1, lse=a["lse"]),)
    if op == "selected_attention":
        return (bruteforce.selected_attention(a["q"], a["k"], a["v"], a["idx"], BS),)
    if op == "sliding_window_attention":
        return (bruteforce.sliding_window_attention(a["q"], a["k"], a["v"], 5),)
    return (bruteforce.nsa(a["q"], a["k_cmp"], a["v_cmp"], a["k"], a["v"], a["k"], a["v"], *a["gates"],
                           kernel_size=KS, stride=ST, block_size=BS, num_selected=3, num_initial=1, num_local=1,
                           window_size=5)[0],)


@pytest.fixture
def spies(monkeypatch):
    """Wraps every function of the reference and of the torch backend; returns the dict
    (module, op) -> number of calls."""
    calls = {(mod, op): 0 for mod in ("reference", "torch") for op in ALL_OPS}
    for mod, module in (("reference", reference), ("torch", torch_backend)):
        for op in ALL_OPS:
            fn = getattr(module, op)

            def spy(*args, _key=(mod, op), _fn=fn, **kwargs):
                calls[_key] += 1
                return _fn(*args, **kwargs)

            monkeypatch.setattr(module, op, spy)
    return calls


@pytest.mark.parametrize("op", ALL_OPS)
@pytest.mark.parametrize("how", ["env-reference", "env-auto", "env-empty", "env-unset", "arg-reference",
                                 "arg-auto", "arg-overrides-env", "env-torch", "arg-torch"])
def test_cpu_runs_the_reference_or_torch(op, how, monkeypatch, spies):
    """On CPU tensors, 'reference' runs the reference; 'torch', 'auto' and None (NSA_BACKEND
    unset, empty or 'auto') run the torch backend."""
    env, arg = {"env-reference": ("reference", None), "env-auto": ("auto", None), "env-empty": ("", None),
                "env-unset": (None, None), "arg-reference": (None, "reference"), "arg-auto": (None, "auto"),
                "arg-overrides-env": ("bogus", "reference"), "env-torch": ("torch", None),
                "arg-torch": ("reference", "torch")}[how]
    if env is None:
        monkeypatch.delenv("NSA_BACKEND", raising=False)
    else:
        monkeypatch.setenv("NSA_BACKEND", env)
    a = inputs()
    out = run(op, a, backend=arg)
    mod = "reference" if (arg or env) == "reference" else "torch"
    # nsa calls the module's nsa, which composes that module's branch functions
    if op == "nsa":
        assert spies[mod, "nsa"] == 1 and sum(n for (m, _), n in spies.items() if m != mod) == 0, spies
    else:
        assert spies[mod, op] == 1 and sum(spies.values()) == 1, spies
    # what ran gives the right answer: the brute force, not another run of the reference
    want = brute_force(op, a)
    out = out if isinstance(out, tuple) else (out,)
    assert len(out) == len(want)
    for i, (o, w) in enumerate(zip(out, want)):
        if o.dtype == torch.int32:
            assert torch.equal(o, w), f"{op} output {i}"
        else:  # lse is -inf where nothing is visible
            fin = torch.isfinite(w)
            assert torch.equal(o[~fin], w[~fin]), f"{op} output {i}: non-finite elements differ"
            assert_close(f"{op} output {i}", w[fin], o[fin], 1e-12)


@pytest.mark.parametrize("op", ALL_OPS)
@pytest.mark.parametrize("name", ["bogus", "Reference", "cuda", "ref", " auto"])
def test_invalid_backend_env_raises(op, name, monkeypatch):
    monkeypatch.setenv("NSA_BACKEND", name)
    with pytest.raises(ValueError, match=r"^backend\W"):
        run(op, inputs())


@pytest.mark.parametrize("op", ALL_OPS)
@pytest.mark.parametrize("name", ["bogus", "", "TRITON", 1, torch.float32])
def test_invalid_backend_arg_raises(op, name, monkeypatch):
    monkeypatch.setenv("NSA_BACKEND", "reference")
    with pytest.raises(ValueError, match=r"^backend\W"):
        run(op, inputs(), backend=name)


def test_nsa_auto_composition_equals_reference_nsa():
    a = inputs()
    o_ref, idx_ref = run("nsa", a, backend="reference", return_block_indices=True)
    o_auto, idx_auto = run("nsa", a, backend="auto", return_block_indices=True)
    assert torch.equal(idx_ref, idx_auto)
    assert_close("o", o_ref, o_auto, 1e-14)


def _prime_kernel_modules():
    """Imports the kernel modules under the environment the session set (TRITON_INTERPRET under CPU CI)
    so that later environment changes in a test cannot alter how their kernels were built."""
    pytest.importorskip("triton")
    for op in BRANCH_OPS:
        mod, fn = api._TRITON_IMPLS[op]
        assert callable(getattr(importlib.import_module(mod), fn)), f"{mod}.{fn} missing"


@pytest.mark.parametrize("op", BRANCH_OPS)
def test_auto_on_cuda_picks_the_kernel(op):
    _prime_kernel_modules()
    mod, fn = api._TRITON_IMPLS[op]
    impl = api.resolve_backend("auto", op, torch.device("cuda"))  # only the device type matters here
    assert impl is getattr(importlib.import_module(mod), fn)
    assert api.resolve_backend("auto", op, CPU) is getattr(torch_backend, op)


@pytest.mark.parametrize("op", BRANCH_OPS)
def test_triton_on_cpu_needs_the_interpreter(op, monkeypatch):
    _prime_kernel_modules()
    mod, fn = api._TRITON_IMPLS[op]
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert api.resolve_backend("triton", op, CPU) is getattr(importlib.import_module(mod), fn)
    monkeypatch.setenv("NSA_BACKEND", "triton")
    assert api.resolve_backend(None, op, CPU) is getattr(importlib.import_module(mod), fn)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match=r"^backend\W"):
        api.resolve_backend("triton", op, CPU)
    with pytest.raises(ValueError, match=r"^backend\W"):
        run(op, inputs(), backend="triton")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU-only setting of tests/conftest.py")
@pytest.mark.parametrize("inherited", ["0", "", "true"])
def test_conftest_sets_the_interpreter_on_cpu(inherited, monkeypatch):
    """tests/conftest.py sets TRITON_INTERPRET=1 (and NSA_POISON=1) whatever the environment held:
    an inherited TRITON_INTERPRET=0 turned the CPU kernel tests into failures and skips."""
    monkeypatch.setenv("TRITON_INTERPRET", inherited)
    monkeypatch.setenv("NSA_POISON", "0")
    runpy.run_path(str(Path(__file__).parents[1] / "conftest.py"))
    assert os.environ["TRITON_INTERPRET"] == "1" and os.environ["NSA_POISON"] == "1"
    _prime_kernel_modules()
    mod, fn = api._TRITON_IMPLS["selected_attention"]
    assert api.resolve_backend("triton", "selected_attention", CPU) is getattr(importlib.import_module(mod), fn)
