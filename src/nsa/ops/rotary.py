"""Rotate-half RoPE in Triton: one pass over the tensor, in its own dtype, forward and backward.

Semantics are those of :func:`nsa.ops.reference.rope` (the specification): dims ``(i, i + D/2)``
of every head rotate by the angle ``position * theta**(-2i/D)``. The plain PyTorch expression
casts to float32, splits, multiplies, concatenates and casts back — about ten passes over the
tensor forward and as many backward; here the tensor is read once and the result written once.

Angles: ``inv_freq / (2 pi)`` is formed in float64 on the host (once per head dim, theta and
device); in the kernel ``position * inv_freq / (2 pi)`` is a float64 product (the angle in turns)
whose fractional part alone goes to float32, times 2 pi, for cos/sin. At positions ~1e5 a float32
angle would be off by ~1e-2 rad; this way cos/sin agree with the float64 specification to float32
rounding at any position. A program computes the cos/sin of its tile of positions once and
applies them to every head.

Layout: x ``[B, T, H, D]`` with unit stride along D (any other strides: the projections' views
are read in place); positions ``[B|1, T]`` integers. Output: a new contiguous ``[B, T, H, D]``
tensor in x's dtype. The backward is the rotation by the opposite angle. float64 inputs take
the specification (the kernels compute in float32).
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from . import reference
from .utils import new_output

_BLOCK_T = 16


@triton.jit
def _rope_kernel(x_ptr, pos_ptr, turns_ptr, y_ptr, T, H, sxb, sxt, sxh, spb, spt, syb, syt, syh,
                 HALF: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr, SIGN: tl.constexpr):
    pid_t = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    mt = offs_t < T
    md = offs_d < HALF
    m = mt[:, None] & md[None, :]
    pos = tl.load(pos_ptr + b * spb + offs_t.to(tl.int64) * spt, mask=mt, other=0).to(tl.float64)
    turns_per_pos = tl.load(turns_ptr + offs_d, mask=md, other=0.)  # float64 inv_freq / (2 pi)
    turns = pos[:, None] * turns_per_pos[None, :]
    ang32 = (turns - tl.floor(turns)).to(tl.float32) * 6.283185307179586
    cos = tl.cos(ang32)
    sin = tl.sin(ang32) * SIGN
    rows_x = b * sxb + offs_t.to(tl.int64)[:, None] * sxt + offs_d[None, :]
    rows_y = b * syb + offs_t.to(tl.int64)[:, None] * syt + offs_d[None, :]
    for h in range(H):
        px = x_ptr + rows_x + h * sxh
        x1 = tl.load(px, mask=m, other=0.).to(tl.float32)
        x2 = tl.load(px + HALF, mask=m, other=0.).to(tl.float32)
        py = y_ptr + rows_y + h * syh
        tl.store(py, (x1 * cos - x2 * sin).to(y_ptr.dtype.element_ty), mask=m)
        tl.store(py + HALF, (x2 * cos + x1 * sin).to(y_ptr.dtype.element_ty), mask=m)


@functools.lru_cache(maxsize=64)
def _turns_per_position(dim: int, theta: float, device: torch.device) -> torch.Tensor:
    """float64 ``theta**(-2i/dim) / (2 pi)``: the angle of one position step, in turns."""
    return theta ** (-torch.arange(0, dim, 2, device=device, dtype=torch.float64) / dim) / (2 * math.pi)


def _launch(x: torch.Tensor, positions: torch.Tensor, theta: float, sign: int) -> torch.Tensor:
    B, T, H, D = x.shape
    if x.stride(3) != 1:
        x = x.contiguous()
    pos = positions  # [B|1, T] (nsa.ops.rope sends other layouts to the specification)
    y = new_output((B, T, H, D), x.dtype, x.device)
    if x.numel():
        half = D // 2
        grid = (triton.cdiv(T, _BLOCK_T), B)
        _rope_kernel[grid](x, pos, _turns_per_position(D, float(theta), x.device), y, T, H, x.stride(0), x.stride(1),
                           x.stride(2), pos.stride(0) if pos.shape[0] > 1 else 0, pos.stride(1), y.stride(0),
                           y.stride(1), y.stride(2), HALF=half, BLOCK_D=triton.next_power_of_2(half),
                           BLOCK_T=_BLOCK_T, SIGN=sign)
    return y


class _Rope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, positions, theta):
        ctx.save_for_backward(positions)
        ctx.theta = theta
        return _launch(x, positions, theta, 1)

    @staticmethod
    def backward(ctx, dy):
        positions, = ctx.saved_tensors
        return _launch(dy, positions, ctx.theta, -1), None, None


def rope_triton(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """:func:`nsa.ops.reference.rope` on the kernel (inputs validated by :func:`nsa.ops.api.rope`):
    x ``[B, T, H, D]``, positions integer ``[B|1, T]`` on x's device."""
    if x.dtype == torch.float64:
        return reference.rope(x, positions, theta)
    return _Rope.apply(x, positions, float(theta))

