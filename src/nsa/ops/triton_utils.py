"""Helpers shared by the Triton kernel files: interpreter detection, the matmul used inside
kernels, and tile-size rounding."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .utils import interpreting

__all__ = ["dot", "dot_args", "interpreting", "pow2", "softmax_step"]


def pow2(n: int, minimum: int = 16) -> int:
    """The power of two >= n (and >= ``minimum``): a padded tile extent."""
    return max(minimum, triton.next_power_of_2(n))


def dot_args(dtype: torch.dtype) -> dict:
    """Constexprs of :func:`dot` for operands of ``dtype``: float32 inputs get exact float32
    products (TF32 would cost ~1e-3 relative error against the float32 reference); bfloat16
    under the interpreter goes through float32 (see :func:`dot`)."""
    return dict(DOT_PRECISION="ieee" if dtype == torch.float32 else "tf32",
                DOT_UPCAST=dtype == torch.bfloat16 and interpreting())


@triton.jit
def dot(a, b, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr):
    """``a @ b`` accumulated in float32. ``DOT_UPCAST`` (interpreter with bfloat16 only) computes
    it on float32 copies: the interpreter multiplies bfloat16 bit patterns (triton#11584).
    Products of bfloat16 values are exact in float32, so the result is what tensor cores give."""
    if DOT_UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=DOT_PRECISION)


@triton.jit
def softmax_step(b_s, b_v, b_m, b_l, b_acc, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr):
    """One online-softmax step over a key tile: scores ``b_s`` [rows, keys] (base 2, -inf where
    masked) and values ``b_v`` [keys, dv] into the running max, sum and output. A row that has
    seen no key yet keeps m = -inf and is shifted by 0, never inf - inf."""
    b_m_new = tl.maximum(b_m, tl.max(b_s, axis=1))
    b_m_safe = tl.where(b_m_new == float("-inf"), 0., b_m_new)
    b_p = tl.exp2(b_s - b_m_safe[:, None])
    b_alpha = tl.exp2(b_m - b_m_safe)
    b_l = b_l * b_alpha + tl.sum(b_p, axis=1)
    b_acc = b_acc * b_alpha[:, None] + dot(b_p.to(b_v.dtype), b_v, DOT_PRECISION, DOT_UPCAST)
    return b_m_new, b_l, b_acc
