"""Edges of the public ops found by an audit: strided ``cu_seqlens``, float64 gates with 16-bit
branches, windows and scales beyond the kernels' int / float arguments, zero-sized heads in
select_blocks. Triton runs under the interpreter on CPU (tests/conftest.py)."""

import pytest
import torch

import nsa.ops as ops
from nsa.ops import api as ops_api
from tests.helpers import assert_close

DEV = "cuda" if torch.cuda.is_available() else "cpu"
KS, ST, BS = 8, 4, 8
LENS = [5, 12, 30]


def _packed(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    T = sum(LENS)
    Tc = sum((n - KS) // ST + 1 for n in LENS if n >= KS)

    def mk(*s):
        return torch.randn(*s, generator=g).to(DEV, dtype)

    x = dict(q=mk(1, T, 4, 16), k_cmp=mk(1, Tc, 2, 16), v_cmp=mk(1, Tc, 2, 16), k=mk(1, T, 2, 16),
             v=mk(1, T, 2, 16), g=[torch.rand(1, T, 4, generator=g).to(DEV, dtype) for _ in range(3)])
    cu = torch.tensor([0] + LENS, device=DEV).cumsum(0).to(torch.int32)
    # the same offsets as every second int32 of a buffer: a view with stride 2
    strided = torch.full((2 * cu.numel(),), 99, dtype=torch.int32, device=DEV)
    strided[::2] = cu
    return x, cu, strided[::2]


def _run(op, x, cu, backend):
    sel = dict(kernel_size=KS, stride=ST, block_size=BS, num_selected=3, num_initial=1, num_local=1)
    if op == "compressed_attention":
        return ops.compressed_attention(x["q"], x["k_cmp"], x["v_cmp"], KS, ST, cu_seqlens=cu, backend=backend)[0]
    lse = ops.compressed_attention(x["q"], x["k_cmp"], x["v_cmp"], KS, ST, cu_seqlens=cu.contiguous(),
                                   backend="reference")[1]
    if op == "select_blocks":
        return ops.select_blocks(x["q"], x["k_cmp"], lse, **sel, cu_seqlens=cu, backend=backend)
    if op == "selected_attention":
        idx = ops.select_blocks(x["q"], x["k_cmp"], lse, **sel, cu_seqlens=cu.contiguous(), backend="reference")
        return ops.selected_attention(x["q"], x["k"], x["v"], idx, BS, cu_seqlens=cu, backend=backend)
    if op == "sliding_window_attention":
        return ops.sliding_window_attention(x["q"], x["k"], x["v"], 6, cu_seqlens=cu, backend=backend)
    return ops.nsa(x["q"], x["k_cmp"], x["v_cmp"], x["k"], x["v"], x["k"], x["v"], *x["g"], **sel, window_size=6,
                   cu_seqlens=cu, backend=backend)


@pytest.mark.parametrize("op", ["compressed_attention", "select_blocks", "selected_attention",
                                "sliding_window_attention", "nsa"])
def test_strided_cu_seqlens(op):
    """A non-contiguous cu_seqlens means the same offsets (the kernels read it as contiguous)."""
    x, cu, strided = _packed()
    assert not strided.is_contiguous() and torch.equal(strided, cu)
    want = _run(op, x, cu, "reference")
    got = _run(op, x, strided, "triton")
    if op == "select_blocks":
        assert torch.equal(got, want)
    else:
        assert_close(op, want, got, 1e-5)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "composed"])
def test_float64_gates_with_bfloat16_branches(monkeypatch, fused):
    """bf16 q/k/v with float64 gates (and the reverse): the gate kernels compute in float64 and
    store into the narrower buffers through float32."""
    monkeypatch.setattr(ops_api, "FUSED_GATES", fused)
    x, cu, _ = _packed(torch.bfloat16, seed=1)
    for q_dtype, g_dtype in ((torch.bfloat16, torch.float64), (torch.float64, torch.bfloat16)):
        ins = [x["q"].to(q_dtype), x["k_cmp"].to(q_dtype), x["v_cmp"].to(q_dtype), x["k"].to(q_dtype),
               x["v"].to(q_dtype), *(g.to(g_dtype) for g in x["g"])]
        kw = dict(kernel_size=KS, stride=ST, block_size=BS, num_selected=3, num_local=1, window_size=6, cu_seqlens=cu)

        def grads(backend):
            t = [a.detach().clone().requires_grad_(True) for a in ins]
            o = ops.nsa(t[0], t[1], t[2], t[3], t[4], t[3], t[4], t[5], t[6], t[7], **kw, backend=backend)
            g = torch.autograd.grad(o.float().square().sum(), t)
            return [o] + list(g)

        names = ["o", "q", "k_cmp", "v_cmp", "k", "v", "g_cmp", "g_slc", "g_win"]
        for name, a, b in zip(names, grads("reference"), grads("triton")):
            assert torch.isfinite(b).all(), name
            assert_close(f"{q_dtype}-{g_dtype} {name}", a.double(), b.double(), 2e-2)


def test_windows_beyond_the_kernels_int_arguments():
    """window_size is any positive int: one past the sequence means the whole sequence."""
    x, cu, _ = _packed()
    for w in (2 ** 31, 2 ** 63, 2 ** 80):
        want = ops.sliding_window_attention(x["q"], x["k"], x["v"], w, cu_seqlens=cu, backend="reference")
        got = ops.sliding_window_attention(x["q"], x["k"], x["v"], w, cu_seqlens=cu, backend="triton")
        assert_close(f"window {w}", want, got, 1e-5)
    whole = ops.sliding_window_attention(x["q"], x["k"], x["v"], sum(LENS), cu_seqlens=cu, backend="reference")
    assert_close("window 2**80 == whole sequence", whole, want, 1e-6)
    kw = dict(kernel_size=KS, stride=ST, block_size=BS, num_selected=3, num_local=1, cu_seqlens=cu)
    args = (x["q"], x["k_cmp"], x["v_cmp"], x["k"], x["v"], x["k"], x["v"], *x["g"])
    whole = ops.nsa(*args, **kw, window_size=sum(LENS), backend="reference")
    for backend in ("reference", "triton"):
        assert_close(f"nsa {backend}, window 2**63 == whole sequence", whole,
                     ops.nsa(*args, **kw, window_size=2 ** 63, backend=backend), 1e-5)


def test_select_blocks_zero_heads_and_huge_scale_are_value_errors():
    q, kc, lse = torch.randn(1, 20, 4, 8), torch.randn(1, 4, 2, 8), torch.zeros(1, 20, 4)
    with pytest.raises(ValueError, match="q: head dim"):
        ops.select_blocks(q[..., :0], kc[..., :0], lse, 8, 4, 8, 2, 1, 1)
    with pytest.raises(ValueError, match="q: number of query heads"):
        ops.select_blocks(q[:, :, :0], kc, lse[:, :, :0], 8, 4, 8, 2, 1, 1)
    for bad in (10 ** 400, float("nan"), -1):
        with pytest.raises(ValueError, match="scale"):
            ops.select_blocks(q, kc, lse, 8, 4, 8, 2, 1, 1, scale=bad)


def test_decode_windows_beyond_the_kernels_int_arguments():
    g = torch.Generator().manual_seed(2)
    N, HQ, H, D, cap = 2, 4, 2, 16, 40
    kc, vc = (torch.randn(N, 9, H, D, generator=g).to(DEV) for _ in range(2))  # num_compressed(40) = 9
    k, v = (torch.randn(N, cap, H, D, generator=g).to(DEV) for _ in range(2))
    q = torch.randn(N, HQ, D, generator=g).to(DEV)
    gates = [torch.rand(N, HQ, generator=g).to(DEV) for _ in range(3)]
    lens = torch.tensor([33, 40], dtype=torch.int32, device=DEV)
    kw = dict(kernel_size=KS, stride=ST, block_size=BS, num_selected=3, num_local=1)
    whole = ops.nsa_decode(q, kc, vc, k, v, k, v, *gates, lens, **kw, window_size=cap, backend="reference")
    for backend in ("reference", "triton"):
        got = ops.nsa_decode(q, kc, vc, k, v, k, v, *gates, lens, **kw, window_size=2 ** 63, backend=backend)
        assert_close(f"decode {backend}, window 2**63", whole, got, 1e-5)


class _KernelSpy:
    """Stands in for nsa.ops.selection.selection_fwd_kernel: records the keyword arguments of
    every launch, then launches the real kernel."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append(kwargs)
            return self.kernel[grid](*args, **kwargs)
        return launch


@pytest.fixture
def selection_spy(monkeypatch):
    from nsa.ops import selection
    spy = _KernelSpy(selection.selection_fwd_kernel)
    monkeypatch.setattr(selection, "selection_fwd_kernel", spy)
    return spy


SELECTION_WIDE = [  # (kernel_size, stride, block_size, T): chunk tiles beyond Triton's 2^20 elements
    (4, 2, 1024, 300),  # every position has <= num_selected blocks: all causal blocks
    (2, 1, 2 ** 30, 40),  # one block holds everything
    (4, 2, 1024, 2400),  # 3 blocks > num_selected = 2: the reference's scores and top-n
]


@pytest.mark.parametrize("ks,st,bs,T", SELECTION_WIDE)
def test_selection_without_the_kernel(ks, st, bs, T, selection_spy):
    """Chunk tiles beyond MAX_TILE_NUMEL never launch the kernel (the spy sees no launch) and
    take the fallback. The first two cases check its all-causal-blocks shortcut against the
    reference; in the third the fallback *is* reference.select_blocks (it warns), so the
    equality there checks the routing and the warning, not any selection code of the kernel.
    The kernel at the limit: test_selection_at_the_kernel_tile_limit."""
    g = torch.Generator().manual_seed(3)
    Tc = (T - ks) // st + 1
    q = torch.randn(1, T, 4, 16, generator=g).to(DEV)
    kc, vc = (torch.randn(1, Tc, 2, 16, generator=g).to(DEV) for _ in range(2))
    lse = ops.compressed_attention(q, kc, vc, ks, st, backend="reference")[1]
    args = (q, kc, lse, ks, st, bs, 2, 1, 0)
    want = ops.select_blocks(*args, backend="reference")
    if T > 2 * bs:
        with pytest.warns(UserWarning, match="do not fit the selection kernel"):
            got = ops.select_blocks(*args, backend="triton")
    else:
        got = ops.select_blocks(*args, backend="triton")
    assert selection_spy.launches == []
    assert torch.equal(got, want)


@pytest.mark.skipif(DEV == "cuda", reason="the interpreter's tiles (256 rows); on a GPU the tile has other rows "
                                          "and 256 tokens per block need not compile: tests/gpu/test_selection_gpu.py")
def test_selection_at_the_kernel_tile_limit(selection_spy):
    """4/2/512 (256 compressed tokens per block, 16 blocks per chunk) with G = 2: a chunk tile of
    256 rows x 4096 tokens, exactly MAX_TILE_NUMEL, the widest the kernel takes. The kernel
    launches (the spy sees the tile) and its selection is checked row by row against the float64
    reference scores (tie-aware) and equals the reference's: with num_selected 1 and nothing
    forced, every position past the first block chooses among 2 or 3 blocks (q scaled by 3, a
    peaked softmax, so that the choice varies: 150 of those 588 rows take block 1)."""
    from nsa.ops import selection

    from .selection_check import check_selection

    ks, st, bs, T, n = 4, 2, 512, 1100, 1
    g = torch.Generator().manual_seed(5)
    Tc = (T - ks) // st + 1
    q = 3 * torch.randn(1, T, 2, 16, generator=g)
    kc, vc = (torch.randn(1, Tc, 1, 16, generator=g) for _ in range(2))
    lse = ops.compressed_attention(q, kc, vc, ks, st, backend="reference")[1]
    got = ops.select_blocks(q, kc, lse, ks, st, bs, n, 0, 0, backend="triton")
    assert len(selection_spy.launches) == 1
    kw = selection_spy.launches[0]
    assert kw["BT"] * kw["GP"] * kw["BJ"] * kw["CPBP"] == selection.MAX_TILE_NUMEL
    check_selection(q, kc, lse, got, kernel_size=ks, stride=st, block_size=bs, num_selected=n, num_initial=0,
                    num_local=0, tol=1e-5)
    want = ops.select_blocks(q, kc, lse, ks, st, bs, n, 0, 0, backend="reference")
    assert torch.equal(got, want)


def test_selection_launch_that_does_not_compile(monkeypatch):
    """On a GPU, a wide-tile launch that fails to compile (shared memory, registers) at every tile
    the launcher tries (its own, then without pipelining, then fewer positions) is remembered and
    its selection computed without the kernel; narrow tiles re-raise (a bug to see)."""
    from triton.runtime.errors import OutOfResources

    from nsa.ops import selection

    calls = []

    class Failing:
        def __getitem__(self, grid):
            def launch(*a, **kw):
                calls.append((kw["CPB"], kw["BT"], kw["num_stages"]))
                raise OutOfResources(300000, 232448, "shared memory")
            return launch

    monkeypatch.setattr(selection, "selection_fwd_kernel", Failing())
    monkeypatch.setattr(selection, "interpreting", lambda: False)
    monkeypatch.setattr(selection, "_UNFIT", set())
    g = torch.Generator().manual_seed(4)
    q, kc = torch.randn(1, 200, 4, 16, generator=g), torch.randn(1, 99, 2, 16, generator=g)  # 4/2: Tc = 99
    lse = ops.compressed_attention(q, kc, kc, 4, 2, backend="reference")[1]
    want = ops.select_blocks(q, kc, lse, 4, 2, 64, 2, 1, 0, backend="reference")  # CPB = 32
    for _ in range(2):
        with pytest.warns(UserWarning, match="did not compile"):
            got = selection.selection_fwd(q, kc, lse, 4, 2, 64, 2, 1, 0, 0.25, None)
        assert torch.equal(got, want)
    # G = 2 (rows of 2 heads): 16 positions pipelined, then unpipelined, then 8 (16 rows, the least);
    # the second call does not try again
    assert calls == [(32, 16, 2), (32, 16, 1), (32, 8, 1)]
    with pytest.raises(OutOfResources):  # 32/16/64-like narrow tiles: CPB = 4
        selection.selection_fwd(q, kc, lse, 4, 2, 8, 2, 1, 0, 0.25, None)


def test_blocks_beyond_the_sequence():
    """block_size 2**30 (one block holds every sequence) gives what a block of the sequence's length gives."""
    x, cu, _ = _packed()
    T = sum(LENS)
    idx = torch.full((1, T, 2, 3), -1, dtype=torch.int32, device=DEV)
    idx[..., 0] = 0
    for backend in ("reference", "triton"):
        got = ops.selected_attention(x["q"], x["k"], x["v"], idx, 2 ** 30, cu_seqlens=cu, backend=backend)
        want = ops.selected_attention(x["q"], x["k"], x["v"], idx, T, cu_seqlens=cu, backend="reference")
        assert_close(f"selected, block 2**30, {backend}", want, got, 1e-5)
    args = (x["q"], x["k_cmp"], x["v_cmp"], x["k"], x["v"], x["k"], x["v"], *x["g"])
    kw = dict(kernel_size=KS, stride=ST, num_selected=3, num_local=1, window_size=6, cu_seqlens=cu)
    want = ops.nsa(*args, **kw, block_size=-(-T // ST) * ST, backend="reference")
    for backend in ("reference", "triton"):
        assert_close(f"nsa, block 2**30, {backend}", want, ops.nsa(*args, **kw, block_size=2 ** 30, backend=backend),
                     1e-5)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "composed"])
def test_double_backward_is_a_clear_error_on_the_kernels(monkeypatch, fused):
    """The kernels' backward is not differentiable: a second backward names the backward op that has no
    derivative; the reference, plain PyTorch, differentiates twice."""
    monkeypatch.setattr(ops_api, "FUSED_GATES", fused)
    x, cu, _ = _packed()
    ins = [t.detach().clone().requires_grad_(True) for t in (x["q"], x["k_cmp"], x["v_cmp"], x["k"], x["v"], *x["g"])]
    kw = dict(kernel_size=KS, stride=ST, block_size=BS, num_selected=3, num_local=1, window_size=6, cu_seqlens=cu)
    for backend in ("reference", "triton"):
        o = ops.nsa(ins[0], ins[1], ins[2], ins[3], ins[4], ins[3], ins[4], *ins[5:], **kw, backend=backend)
        dq = torch.autograd.grad(o.square().sum(), ins[0], create_graph=True)[0]
        if backend == "reference":
            torch.autograd.grad(dq.square().sum(), ins[0])
        else:
            with pytest.raises(RuntimeError, match=r"backward through nsa\.\w+_bwd.* no autograd formula"):
                torch.autograd.grad(dq.square().sum(), ins[0])


def test_vmap_over_the_reference_nsa():
    """torch.func.vmap maps the reference nsa over a leading axis (its selected branch builds its
    block mask out of place)."""
    g = torch.Generator().manual_seed(5)
    V, T, HQ, H, D = 3, 16, 4, 2, 16
    q = torch.randn(V, 1, T, HQ, D, generator=g)
    kc, vc = torch.randn(V, 1, 3, H, D, generator=g), torch.randn(V, 1, 3, H, D, generator=g)
    k, v = torch.randn(V, 1, T, H, D, generator=g), torch.randn(V, 1, T, H, D, generator=g)
    gates = [torch.rand(V, 1, T, HQ, generator=g) for _ in range(3)]
    kw = dict(kernel_size=8, stride=4, block_size=8, num_selected=2, num_local=1, window_size=5, backend="reference")

    def f(q, kc, vc, k, v, a, b, c):
        return ops.nsa(q, kc, vc, k, v, k, v, a, b, c, **kw)

    got = torch.func.vmap(f)(q, kc, vc, k, v, *gates)
    for i in range(V):
        assert_close(f"vmap row {i}", f(q[i], kc[i], vc[i], k[i], v[i], *(x[i] for x in gates)), got[i], 1e-6)


def test_torch_func_over_selected_attention():
    """Inside torch.func transforms the host-side value check of block_indices is skipped (wrapped
    tensors have no host values; shapes are still checked): vmap and grad of the reference op work."""
    g = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(3, 1, 16, 4, 16, generator=g), torch.randn(3, 1, 16, 2, 16, generator=g),
               torch.randn(3, 1, 16, 2, 8, generator=g))
    bi = torch.tensor([[0, 1], [1, -1]], dtype=torch.int32).repeat(3, 1, 8, 2, 1).view(3, 1, 16, 2, 2)
    bi[:, :, :8] = torch.tensor([0, -1], dtype=torch.int32)  # positions 0..7 only see block 0

    def f(q, k, v, b):
        return ops.selected_attention(q, k, v, b, 8, backend="reference")

    got = torch.func.vmap(f)(q, k, v, bi)
    for i in range(3):
        assert_close(f"vmap row {i}", f(q[i], k[i], v[i], bi[i]), got[i], 1e-6)
    dq = torch.func.grad(lambda q: f(q, k[0], v[0], bi[0]).square().sum())(q[0])
    q0 = q[0].clone().requires_grad_(True)
    f(q0, k[0], v[0], bi[0]).square().sum().backward()
    assert_close("torch.func.grad", q0.grad, dq, 1e-6)
    with pytest.raises(ValueError, match="block_indices: expected shape"):  # shapes still checked
        torch.func.vmap(f)(q, k, v, bi[..., :1, :])
