"""The 'torch' backend (nsa.ops.torch_backend) against the reference: every op, forward and every
gradient, float64 and float32 (bfloat16 for nsa), over an explicit shape table; the selection
equal to the reference's; no tensor as large as [T, T]; the dispatch of 'torch' and 'auto'."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import nsa.ops as ops
from nsa.layer import NativeSparseAttention, NSAConfig
from nsa.ops import api, reference, torch_backend
from nsa.ops.decode import nsa_decode

from ..helpers import assert_close
from .test_decode import CASES as DECODE_CASES
from .test_decode import ORDER, _build
from .test_reference import SEL_FLAGS, make_inputs, random_block_indices


@dataclass(frozen=True)
class Case:
    id: str
    B: int
    T: int
    HQ: int
    H: int
    Dk: int
    Dv: int
    ks: int  # kernel_size
    st: int  # stride
    bs: int  # block_size
    sel: tuple  # num_selected, num_initial, num_local
    window: int
    chunk: int | None  # chunk_size of the torch backend (None: its default)
    lens: tuple | None = None  # packed sequence lengths (cu_seqlens), B = 1


CASES = [
    Case("odd-T-G2-chunk16", 1, 203, 4, 2, 24, 16, 32, 16, 64, (3, 1, 1), 50, 16),
    Case("T<block<ks-G3-B2", 2, 5, 3, 1, 16, 24, 8, 4, 8, (2, 1, 1), 7, None),
    Case("T<ks-chunk>T", 2, 20, 3, 1, 16, 24, 32, 16, 64, (16, 1, 2), 7, 1000),
    Case("G1-no-initial-chunk7", 1, 50, 2, 2, 8, 8, 4, 4, 12, (3, 0, 1), 13, 7),
    Case("G16-chunk8", 1, 37, 32, 2, 16, 8, 16, 8, 16, (2, 1, 1), 5, 8),
    Case("G3-DkDv-B2-chunk1", 2, 21, 3, 1, 8, 12, 8, 4, 8, (3, 1, 1), 9, 1),
    Case("window>T-chunk6", 1, 30, 4, 2, 8, 8, 8, 4, 8, (3, 1, 1), 100, 6),
    Case("many-blocks-G4", 1, 160, 4, 1, 8, 8, 8, 4, 8, (3, 1, 1), 12, 32),
    Case("varlen-4seq-chunk5", 1, 61, 4, 2, 8, 12, 8, 4, 8, (3, 1, 1), 6, 5, (13, 1, 40, 7)),
    Case("varlen-2seq-G3", 1, 103, 6, 2, 16, 16, 16, 8, 16, (2, 1, 1), 20, 16, (70, 33)),
]
CASE_IDS = [c.id for c in CASES]
# float64: the same sums in another order; float32 likewise, with float32's rounding
DTYPES = [(torch.float64, 1e-12), (torch.float32, 1e-5)]
DTYPE_IDS = ["f64", "f32"]


def cu_of(c):
    return None if c.lens is None else torch.tensor([0, *c.lens], dtype=torch.int32).cumsum(0).to(torch.int32)


def sel_kwargs(c, sel=None):
    n, ni, nl = sel or c.sel
    return dict(kernel_size=c.ks, stride=c.st, block_size=c.bs, num_selected=n, num_initial=ni, num_local=nl)


def inputs(c, dtype, seed=0):
    """q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, g_cmp, g_slc, g_win, requiring grad."""
    return [t.requires_grad_() for t in make_inputs(c, dtype, cu_of(c), seed)]


def cotangent(t, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(t.shape, generator=g, dtype=torch.float64).to(t.dtype)


def check_outputs_and_grads(name, run, xs, names, ratio):
    """run(backend) -> tuple of outputs; compares the outputs and the gradients of a random linear
    function of them with respect to xs, torch backend against the reference."""
    got, want = run("torch"), run("reference")
    loss = {}
    for which, outs in (("torch", got), ("reference", want)):
        loss[which] = sum((torch.where(torch.isfinite(o), o, 0) * cotangent(o, i)).sum()
                          for i, o in enumerate(outs) if o.is_floating_point())
    for i, (w, g) in enumerate(zip(want, got)):
        if w.is_floating_point():
            assert torch.equal(torch.isneginf(w), torch.isneginf(g)), f"{name} output {i}: -inf pattern differs"
            fin = torch.isfinite(w)
            assert_close(f"{name} output {i}", w[fin], g[fin], ratio)
        else:
            assert torch.equal(w, g), f"{name} output {i} differs"
    grads_t = torch.autograd.grad(loss["torch"], xs, allow_unused=True)
    grads_r = torch.autograd.grad(loss["reference"], xs, allow_unused=True)
    for n, gr, gt in zip(names, grads_r, grads_t):
        gr = torch.zeros_like(xs[names.index(n)]) if gr is None else gr
        gt = torch.zeros_like(gr) if gt is None else gt
        assert_close(f"{name} d{n}", gr, gt, ratio)


# ---------------------------------------------------------------- the branches


@pytest.mark.parametrize("dtype,ratio", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("c", CASES, ids=CASE_IDS)
def test_compressed(c, dtype, ratio):
    q, k_cmp, v_cmp = inputs(c, dtype)[:3]

    def run(backend):
        fn = torch_backend.compressed_attention if backend == "torch" else reference.compressed_attention
        kw = dict(chunk_size=c.chunk) if backend == "torch" else {}
        return fn(q, k_cmp, v_cmp, c.ks, c.st, None, cu_of(c), **kw)

    o, lse = run("torch")
    assert o.dtype == dtype and lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    check_outputs_and_grads("compressed", run, [q, k_cmp, v_cmp], ["q", "k_cmp", "v_cmp"], ratio)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=DTYPE_IDS)
@pytest.mark.parametrize("c", CASES, ids=CASE_IDS)
def test_select_blocks_equals_reference(c, dtype):
    q, k_cmp, v_cmp = (t.detach() for t in inputs(c, dtype)[:3])
    for seed, sel in enumerate([c.sel] + SEL_FLAGS[:3]):
        q = q + 0.5 * cotangent(q, seed) if seed else q  # other scores too
        lse = reference.compressed_attention(q, k_cmp, v_cmp, c.ks, c.st, None, cu_of(c))[1]
        want = reference.select_blocks(q, k_cmp, lse, **sel_kwargs(c, sel), cu_seqlens=cu_of(c))
        got = torch_backend.select_blocks(q, k_cmp, lse, **sel_kwargs(c, sel), cu_seqlens=cu_of(c),
                                          chunk_size=c.chunk)
        assert got.dtype == torch.int32 and torch.equal(want, got), f"selection {sel} differs"


def test_select_ties_go_to_lower_block():
    """All scores equal (q = 0): the lowest free blocks win, as in the reference."""
    c = CASES[7]
    q, k_cmp, v_cmp = (t.detach() for t in inputs(c, torch.float64)[:3])
    q = torch.zeros_like(q)
    lse = reference.compressed_attention(q, k_cmp, v_cmp, c.ks, c.st)[1]
    want = reference.select_blocks(q, k_cmp, lse, **sel_kwargs(c))
    assert torch.equal(want, torch_backend.select_blocks(q, k_cmp, lse, **sel_kwargs(c), chunk_size=c.chunk))


# How the selected branch takes its keys: its own choice per chunk, always the union of the
# chunk's blocks, or always each query's own blocks in tiles (UNION_SLACK patched).
SELECTED_PATHS = {"auto": None, "union": 1e9, "tiles": -1}


@pytest.mark.parametrize("path,dtype,ratio", [("auto", *DTYPES[0]), ("auto", *DTYPES[1]), ("union", *DTYPES[0]),
                                              ("tiles", *DTYPES[0]), ("tiles", *DTYPES[1])],
                         ids=["auto-f64", "auto-f32", "union-f64", "tiles-f64", "tiles-f32"])
@pytest.mark.parametrize("c", CASES, ids=CASE_IDS)
def test_selected(c, path, dtype, ratio, monkeypatch):
    if SELECTED_PATHS[path] is not None:
        monkeypatch.setattr(torch_backend, "UNION_SLACK", SELECTED_PATHS[path])
    q, _, _, k, v = inputs(c, dtype)[:5]
    idx = random_block_indices(c.B, c.T, c.H, c.sel[0] + 1, c.bs, seed=1, lengths=list(c.lens or [c.T]))

    def run(backend):
        if backend == "torch":
            return (torch_backend.selected_attention(q, k, v, idx, c.bs, None, cu_of(c), chunk_size=c.chunk),)
        return (reference.selected_attention(q, k, v, idx, c.bs, None, cu_of(c)),)

    check_outputs_and_grads("selected", run, [q, k, v], ["q", "k", "v"], ratio)


@pytest.mark.parametrize("dtype,ratio", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("c", CASES, ids=CASE_IDS)
def test_window(c, dtype, ratio):
    q, _, _, _, _, k, v = inputs(c, dtype)[:7]

    def run(backend):
        if backend == "torch":
            return (torch_backend.sliding_window_attention(q, k, v, c.window, None, cu_of(c), chunk_size=c.chunk),)
        return (reference.sliding_window_attention(q, k, v, c.window, None, cu_of(c)),)

    check_outputs_and_grads("window", run, [q, k, v], ["q", "k", "v"], ratio)


# ---------------------------------------------------------------- nsa and decoding

NAMES = ["q", "k_cmp", "v_cmp", "k_slc", "v_slc", "k_win", "v_win", "g_cmp", "g_slc", "g_win"]


@pytest.mark.parametrize("dtype,ratio", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("c", CASES, ids=CASE_IDS)
def test_nsa(c, dtype, ratio):
    _check_nsa(c, dtype, ratio)


@pytest.mark.parametrize("c", [CASES[0], CASES[4], CASES[8]], ids=[CASE_IDS[i] for i in (0, 4, 8)])
def test_nsa_bfloat16(c):
    """Both compute in float32 and round the branch outputs to bfloat16."""
    _check_nsa(c, torch.bfloat16, 1e-2)


def _check_nsa(c, dtype, ratio):
    xs = inputs(c, dtype)
    kw = dict(**sel_kwargs(c), window_size=c.window, cu_seqlens=cu_of(c), return_block_indices=True)

    def run(backend):
        if backend == "torch":
            return torch_backend.nsa(*xs, **kw, chunk_size=c.chunk)
        return reference.nsa(*xs, **kw)

    check_outputs_and_grads("nsa", run, xs, NAMES, ratio)


@pytest.mark.parametrize("dtype,ratio", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", DECODE_CASES, ids=[c[0] for c in DECODE_CASES])
def test_decode(case, dtype, ratio):
    """One query per sequence over a padded cache (junk past every sequence): output, gradients
    and the selected blocks of the reference's decode."""
    _, HQ, H, Dk, Dv, lens, cfg = case
    pad, _, seq_lens = _build(HQ, H, Dk, Dv, lens, cfg, dtype)
    xs = [pad[k].requires_grad_() for k in ORDER]

    def run(backend):
        return nsa_decode(*xs, seq_lens, **cfg, return_block_indices=True, backend=backend)

    check_outputs_and_grads("decode", run, xs, list(ORDER), ratio)


# ---------------------------------------------------------------- properties


class MaxNumel(TorchDispatchMode):
    """Records the largest tensor any op creates, and every shape with two dims >= ``T``."""

    def __init__(self, T):
        super().__init__()
        self.T, self.max_numel, self.square = T, 0, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.max_numel = max(self.max_numel, t.numel())
                if sum(d >= self.T for d in t.shape) >= 2:
                    self.square.append((func, tuple(t.shape)))
        return out


def _largest_tensor(T):
    """Largest tensor created by the torch backend's nsa forward and backward at length T."""
    c = Case("", 1, T, 2, 1, 8, 8, 16, 8, 16, (4, 1, 1), 32, 32)
    xs = inputs(c, torch.float32)
    with MaxNumel(T) as mode:
        o = torch_backend.nsa(*xs, **sel_kwargs(c), window_size=c.window, chunk_size=c.chunk)
        torch.autograd.grad(o.square().sum(), xs)
    assert not mode.square, f"T={T}: tensors with two dims >= T: {mode.square[:5]}"
    return mode.max_numel


def test_memory_is_linear_in_T():
    """No intermediate is [T, T] (forward and backward, the checkpointed recomputation included),
    and the largest one grows linearly with T: twice T, at most about twice the elements."""
    small, large = _largest_tensor(512), _largest_tensor(1024)
    assert large <= 1024 * 1024 / 16, large
    assert large <= 2.2 * small, (small, large)


def test_backward_is_deterministic():
    c = CASES[0]
    xs = inputs(c, torch.float32)
    kw = dict(**sel_kwargs(c), window_size=c.window, chunk_size=c.chunk)
    grads = [torch.autograd.grad(torch_backend.nsa(*xs, **kw).square().sum(), xs) for _ in range(2)]
    for n, a, b in zip(NAMES, *grads):
        assert torch.equal(a, b), f"d{n} differs between two runs"


def test_double_backward_matches_reference():
    c = CASES[3]
    xs = inputs(c, torch.float64)
    kw = dict(**sel_kwargs(c), window_size=c.window)
    out = []
    for fn in (reference.nsa, lambda *a, **k: torch_backend.nsa(*a, **k, chunk_size=c.chunk)):
        dq = torch.autograd.grad(fn(*xs, **kw).square().sum(), xs[0], create_graph=True)[0]
        out.append(torch.autograd.grad(dq.square().sum(), xs[:3]))
    for n, r, t in zip(NAMES, *out):
        assert_close(f"d2/d{n}", r, t, 1e-12)


def test_no_grad_and_inference_mode():
    c = CASES[0]
    xs = [t.detach() for t in inputs(c, torch.float32)]
    kw = dict(**sel_kwargs(c), window_size=c.window)
    want = reference.nsa(*xs, **kw)
    with torch.inference_mode():
        assert_close("inference mode", want, torch_backend.nsa(*xs, **kw, chunk_size=c.chunk), 1e-5)


# ---------------------------------------------------------------- dispatch and the layer

OPS = ("compressed_attention", "select_blocks", "selected_attention", "sliding_window_attention", "nsa_decode")


@pytest.mark.parametrize("op", OPS)
def test_dispatch(op, monkeypatch):
    cpu = torch.device("cpu")
    assert api.resolve_backend("torch", op, cpu) is getattr(torch_backend, op)
    assert api.resolve_backend("auto", op, cpu) is getattr(torch_backend, op)
    monkeypatch.setenv("NSA_BACKEND", "torch")
    assert api.resolve_backend(None, op, cpu) is getattr(torch_backend, op)


@pytest.mark.parametrize("backend", ["torch", "auto", None])
def test_public_nsa_runs_the_torch_backend(backend, monkeypatch):
    monkeypatch.delenv("NSA_BACKEND", raising=False)
    c = CASES[8]
    xs = [t.detach() for t in inputs(c, torch.float64)]
    calls = []
    real = torch_backend.nsa
    monkeypatch.setattr(torch_backend, "nsa", lambda *a, **k: calls.append(1) or real(*a, **k))
    kw = dict(**sel_kwargs(c), window_size=c.window, cu_seqlens=cu_of(c), return_block_indices=True)
    o, idx = ops.nsa(*xs, **kw, backend=backend)
    o_ref, idx_ref = ops.nsa(*xs, **kw, backend="reference")
    assert calls == [1] and torch.equal(idx, idx_ref)
    assert_close("o", o_ref, o, 1e-12)


def test_layer_on_the_torch_backend():
    """The layer (backend='torch'): forward and parameter gradients equal the reference's, packed
    sequences too; prefill + step-by-step decode equals the full forward."""
    torch.manual_seed(0)
    cfg = NSAConfig.preset("tiny", backend="reference")
    m = NativeSparseAttention(cfg).double()
    x = torch.randn(2, 37, cfg.hidden_size, dtype=torch.float64)
    cu = torch.tensor([0, 11, 37], dtype=torch.int32)
    outs = {}
    for backend in ("reference", "torch"):
        m.config = cfg.replace(backend=backend)
        y = m(x)
        yp = m(x[:1], cu_seqlens=cu)
        grads = torch.autograd.grad(y.square().sum() + yp.square().sum(), list(m.parameters()))
        outs[backend] = (y, yp, grads)
    for name, r, t in zip(["y", "packed"] + [n for n, _ in m.named_parameters()],
                          outs["reference"][:2] + outs["reference"][2], outs["torch"][:2] + outs["torch"][2]):
        assert_close(name, r, t, 1e-12)
    cache = m.new_cache()
    with torch.no_grad():
        steps = [m(x[:, :9], cache=cache)] + [m(x[:, t:t + 1], cache=cache) for t in range(9, 37)]
    assert_close("prefill + decode", outs["torch"][0], torch.cat(steps, 1), 1e-12)


def test_layer_decode_step_compiles_to_one_graph():
    """A decoding step on the torch backend traces as one graph (no host reads) and matches eager."""
    torch.manual_seed(0)
    m = NativeSparseAttention(NSAConfig.preset("tiny", backend="torch")).double()
    x = torch.randn(2, 14, m.config.hidden_size, dtype=torch.float64)
    compiled = torch.compile(m, backend="aot_eager", fullgraph=True)
    eager_cache, cache = m.new_cache(), m.new_cache()
    with torch.no_grad():
        m(x[:, :9], cache=eager_cache)
        m(x[:, :9], cache=cache)
        for t in range(9, 14):  # crosses the compression block completed at 12
            assert_close(f"step {t}", m(x[:, t:t + 1], cache=eager_cache), compiled(x[:, t:t + 1], cache=cache),
                         1e-12)
