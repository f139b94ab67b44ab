"""RoPE: the specification against a brute-force rotation, and the Triton pass (interpreter on CPU)
against the specification, forward and backward, on the layouts the layer gives it."""

import math

import pytest
import torch

from nsa import ops
from nsa.ops import reference
from tests.helpers import assert_close

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def brute_rope(x, positions, theta):
    """Each pair (i, i + D/2) of every head rotated by its angle, one position at a time, in float64."""
    B, T, H, D = x.shape
    out = torch.empty(B, T, H, D, dtype=torch.float64)
    pos = positions.expand(B, T)
    for b in range(B):
        for t in range(T):
            for i in range(D // 2):
                a = int(pos[b, t]) * theta ** (-2 * i / D)
                c, s = math.cos(a), math.sin(a)
                x1, x2 = x[b, t, :, i].double(), x[b, t, :, i + D // 2].double()
                out[b, t, :, i] = x1 * c - x2 * s
                out[b, t, :, i + D // 2] = x2 * c + x1 * s
    return out


def test_reference_is_the_rotation():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 3, 8, dtype=torch.float64)
    pos = torch.tensor([[0, 1, 7, 100, 123456], [3, 2, 1, 0, 99999]])
    assert torch.allclose(reference.rope(x, pos, 10000.0), brute_rope(x, pos, 10000.0), atol=1e-12)


def _views(B, T, H, D, dtype):
    """q-like (contiguous) and k-like (a strided view of a fused projection, as in the layer)."""
    q = torch.randn(B, T, H, D, dtype=dtype)
    kv = torch.randn(B, T, 3, H * (D + 6), dtype=dtype)
    k = kv[:, :, 1].split([H * D, H * 6], dim=-1)[0].view(B, T, H, D)
    assert not k.is_contiguous()
    return q, k


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("D", [8, 24, 192])
def test_kernel_matches_reference(dtype, D):
    torch.manual_seed(1)
    B, T, H = 2, 37, 3
    for x in _views(B, T, H, D, dtype):
        for pos in (torch.arange(T).view(1, T),  # dense: shared by the batch
                    torch.randint(0, 70000, (B, T)),  # packed / per-row positions, large
                    ):
            ref = reference.rope(x, pos, 10000.0)
            out = ops.rope(x, pos, 10000.0, backend="triton")
            assert out.dtype == dtype and out.shape == x.shape and out.is_contiguous()
            # Both compute in float32 from float64 angles and round once to the dtype.
            tol = 1e-6 if dtype == torch.float32 else 1e-2
            assert_close("rope", ref, out, tol)


def test_kernel_angles_are_exact_at_long_positions():
    """float32 angles would be off by ~1e-2 rad at 1e5; the kernel's agree with float64."""
    torch.manual_seed(2)
    x = torch.randn(1, 6, 2, 16, dtype=torch.float64)
    pos = torch.tensor([[100000, 131071, 500000, 1000003, 7, 0]])
    want = brute_rope(x, pos, 500000.0)
    out = ops.rope(x.float(), pos, 500000.0, backend="triton").double()
    assert (out - want).abs().max() < 1e-5


def test_decode_positions_one_token_per_row():
    torch.manual_seed(3)
    x = torch.randn(4, 1, 2, 16)
    pos = torch.tensor([[5], [0], [4097], [31]])
    assert_close("rope", reference.rope(x, pos, 10000.0), ops.rope(x, pos, 10000.0, backend="triton"), 1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_kernel_backward(dtype):
    torch.manual_seed(4)
    B, T, H, D = 2, 19, 2, 24
    _, k = _views(B, T, H, D, torch.float32)
    x = k.to(dtype).requires_grad_()
    pos = torch.randint(0, 5000, (B, T))
    w = torch.randn(B, T, H, D, dtype=dtype)
    g_ref, = torch.autograd.grad((reference.rope(x, pos, 10000.0) * w).sum(), x)
    g, = torch.autograd.grad((ops.rope(x, pos, 10000.0, backend="triton") * w).sum(), x)
    assert g.dtype == dtype
    assert_close("grad", g_ref, g, 1e-6 if dtype == torch.float32 else 2e-2)


def test_float64_and_other_layouts_take_the_specification():
    torch.manual_seed(5)
    x = torch.randn(2, 7, 3, 8, dtype=torch.float64)
    pos = torch.arange(7).view(1, 7)
    assert torch.equal(ops.rope(x, pos, 100.0, backend="triton"), reference.rope(x, pos, 100.0))
    x3 = torch.randn(7, 3, 8)  # [T, H, D] with positions [T]
    assert torch.equal(ops.rope(x3, torch.arange(7), 100.0, backend="triton"),
                       reference.rope(x3, torch.arange(7), 100.0))


def test_bad_input():
    x = torch.randn(1, 4, 2, 8)
    pos = torch.arange(4).view(1, 4)
    cases = [
        (dict(x=torch.ones(1, 4, 2, 8, dtype=torch.long)), "x"),
        (dict(x=torch.randn(4, 8)), "x"),
        (dict(x=torch.randn(1, 4, 2, 7)), "even"),
        (dict(positions=pos.float()), "positions"),
        (dict(positions=torch.arange(5).view(1, 5)), "positions"),
        (dict(theta=0), "theta"),
        (dict(theta=True), "theta"),
        (dict(backend="cuda"), "backend"),
    ]
    for kw, msg in cases:
        args = dict(x=x, positions=pos, theta=100.0)
        args.update(kw)
        with pytest.raises(ValueError, match=msg):
            ops.rope(args["x"], args["positions"], args["theta"], backend=args.get("backend"))
