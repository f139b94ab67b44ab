"""Helpers shared by the Triton kernel files: interpreter detection, the matmul used inside
kernels, and tile-size rounding."""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .utils import interpreting

__all__ = ["dot", "dot_args", "ensure_allocator", "interpreting", "kv_descriptors", "pow2", "softmax_step",
           "head_tiles", "split_dim", "tma_ok", "use_tma"]


def pow2(n: int, minimum: int = 16) -> int:
    """The power of two >= n (and >= ``minimum``): a padded tile extent."""
    return max(minimum, triton.next_power_of_2(n))


def split_dim(n: int) -> tuple[int, int]:
    """A head dim as two power-of-two tile extents ``(a, b)``, ``a + b >= n``, when that is narrower
    than one padded tile (192 = 128 + 64 instead of 256; 40 = 32 + 16 instead of 64): columns
    ``0 .. a-1`` and ``a .. a+b-1``. ``(pow2(n), 0)`` where one tile is as narrow."""
    whole = pow2(n)
    a = whole // 2
    if a < 16 or n <= a:
        return whole, 0
    b = pow2(n - a)
    return (a, b) if a + b < whole else (whole, 0)


# Kernels that score q . k over head dims that are not powers of two take them as two tiles
# (split_dim) instead of one padded tile; False: one padded tile (for comparisons).
SPLIT_HEAD_DIMS = True


def head_tiles(n: int) -> tuple[int, int]:
    """The (first, second) tile extents of a head dim of ``n`` columns in the kernels that split it
    (second 0: one tile): :func:`split_dim`, or one padded tile where SPLIT_HEAD_DIMS is off."""
    if not isinstance(SPLIT_HEAD_DIMS, bool):
        raise ValueError(f"nsa.ops.triton_utils.SPLIT_HEAD_DIMS: expected True or False, got {SPLIT_HEAD_DIMS!r}")
    return split_dim(n) if SPLIT_HEAD_DIMS else (pow2(n), 0)


# Set by tests/ops/launch_resources.py, which compiles the launches of CPU tensors for sm_90
# without running them: the launchers then take the paths they take on a GPU.
COMPILE_AUDIT = False


@functools.lru_cache(maxsize=None)
def _has_tma(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def tma_ok(*tensors: torch.Tensor) -> bool:
    """Whether kernels may read these tensors through TMA tensor descriptors: 16-bit floats on a
    CUDA device with TMA (compute capability >= 9; or under the interpreter, or in the sm_90
    compile audit), unit last stride, 16-byte aligned base and other strides."""
    for t in tensors:
        if t.dtype not in (torch.float16, torch.bfloat16):
            return False
        if t.is_cuda:
            if not _has_tma(t.device.index if t.device.index is not None else torch.cuda.current_device()):
                return False
        elif not (interpreting() or COMPILE_AUDIT):
            return False
        if t.stride(-1) != 1 or t.data_ptr() % 16 or any(st * t.element_size() % 16 for st in t.stride()[:-1]):
            return False
    return True


def use_tma(wanted: bool, *tensors: torch.Tensor) -> bool:
    """``wanted and tma_ok(*tensors)``; when True, makes sure Triton's scratch allocator for
    on-device descriptors is set (:func:`ensure_allocator`) before the caller's launch."""
    if not (wanted and tma_ok(*tensors)):
        return False
    ensure_allocator()
    return True


def _scratch(size: int, alignment: int, stream):
    device = "cpu" if interpreting() else torch.device("cuda", torch.cuda.current_device())
    return torch.empty(size, dtype=torch.int8, device=device)


def ensure_allocator():
    """Kernels that build tensor descriptors on the device need Triton's scratch allocator. It is
    a context variable (per thread: autograd runs backward in its own threads), so this is called
    before every such launch; an allocator the user set is kept."""
    try:
        from triton.runtime._allocation import NullAllocator, _allocator
        if not isinstance(_allocator.get(), NullAllocator):
            return
    except ImportError:  # another Triton layout: set ours
        pass
    triton.set_allocator(_scratch)


@triton.jit
def kv_descriptors(p_k, p_v, n_rows, s_k, s_v, DK, DV, BN: tl.constexpr, BDK: tl.constexpr, BDV: tl.constexpr):
    """TMA descriptors over the first ``n_rows`` rows (row strides ``s_k`` / ``s_v``, at least one
    row) of the key / value matrices at ``p_k`` / ``p_v``, loading ``[BN, BDK]`` / ``[BN, BDV]``
    tiles: rows >= n_rows and columns >= DK / DV read as zeros, as masked pointer loads give them."""
    n = tl.maximum(n_rows, 1)
    k_desc = tl.make_tensor_descriptor(p_k, shape=[n, DK], strides=[s_k, 1], block_shape=[BN, BDK])
    v_desc = tl.make_tensor_descriptor(p_v, shape=[n, DV], strides=[s_v, 1], block_shape=[BN, BDV])
    return k_desc, v_desc


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
