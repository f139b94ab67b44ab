"""torch.compile traces the public ops with the Triton backend as single graphs (no graph breaks):
the kernels are registered custom ops, and the host-side value checks step aside while compiling."""

import pytest
import torch

import nsa.ops as ops
from tests.helpers import assert_close

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(T=40, HQ=4, H=2, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g).to(DEV).requires_grad_(True)  # noqa: E731
    q, k, v = mk(1, T, HQ, D), mk(1, T, H, D), mk(1, T, H, D)
    Tc = (T - 8) // 4 + 1
    kc, vc = mk(1, Tc, H, D), mk(1, Tc, H, D)
    return q, k, v, kc, vc


CASES = {
    "compressed": lambda q, k, v, kc, vc: ops.compressed_attention(q, kc, vc, 8, 4, backend="triton")[0],
    "window": lambda q, k, v, kc, vc: ops.sliding_window_attention(q, k, v, 7, backend="triton"),
    "selected": lambda q, k, v, kc, vc: ops.selected_attention(
        q, k, v, torch.tensor([0, 1, -1], dtype=torch.int32, device=DEV).expand(1, q.shape[1], k.shape[2], 3)
        .contiguous(), 16, backend="triton"),
    # the whole mechanism: one autograd node (nsa.ops.fused) whose backward is one custom op
    "nsa": lambda q, k, v, kc, vc: ops.nsa(
        q, kc, vc, k, v, k, v, *(torch.sigmoid(q[..., 0] * (i + 1)) for i in range(3)), kernel_size=8, stride=4,
        block_size=8, num_selected=3, num_initial=1, num_local=1, window_size=7, backend="triton"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_fullgraph_compile_matches_eager(name):
    fn = CASES[name]
    x = _inputs()
    eager = fn(*x)
    (g_eager,) = torch.autograd.grad(eager.sum(), x[0])
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    out = compiled(*x)
    (g_out,) = torch.autograd.grad(out.sum(), x[0])
    assert_close(f"{name}.o", eager, out, 1e-6)
    assert_close(f"{name}.dq", g_eager, g_out, 1e-6)


def test_eager_still_validates_values():
    q, k, v, _, _ = _inputs()
    bad = torch.full((1, q.shape[1], k.shape[2], 2), 99, dtype=torch.int32, device=DEV)
    with pytest.raises(ValueError, match="block_indices"):
        ops.selected_attention(q, k, v, bad, 16, backend="triton")
