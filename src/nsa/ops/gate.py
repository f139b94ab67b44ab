"""Gate combination of NSA's three branch outputs in Triton: forward and backward in one pass each.

Semantics are exactly the last line of :func:`nsa.ops.reference.nsa`::

    o = (g_cmp[..., None] * o_cmp + g_slc[..., None] * o_slc + g_win[..., None] * o_win).to(out_dtype)

with branch outputs ``o_x`` ``[B, T, HQ, Dv]`` and gates ``g_x`` ``[B, T, HQ]`` of any float dtypes.
The plain PyTorch expression makes several passes over ``[B, T, HQ, Dv]`` tensors (products,
sums, casts, and as many again backward); here every tensor is read once and written once.

Layout of the work: the ``B * T * HQ`` rows of ``Dv`` values are cut into tiles of ``BR`` rows;
one program handles a tile and all ``Dv`` columns (padded to a power of two, masked).

- forward: ``o = sum_x g_x * o_x``, accumulated in fp32 (fp64 when any tensor is float64) and
  rounded once to ``out_dtype``.
- backward: ``dO_x = g_x * dO`` rounded once to ``o_x``'s dtype; ``dg_x = sum_d dO * o_x`` reduced
  over the row inside its program (fp32, or fp64) and rounded once to ``g_x``'s dtype. No atomics:
  gradients are bitwise reproducible. Only the gradients some input needs are computed, and only
  the tensors they depend on are read.

Extra memory: none beyond the outputs (non-contiguous inputs are first copied contiguous).
"""

import torch
import triton
import triton.language as tl

from .utils import interpreting, new_output


@triton.jit
def _load(p, offs, mask, FP64: tl.constexpr):
    """Loads ``p[offs]`` (0 where masked) in the compute dtype: fp64 if FP64, else fp32."""
    b = tl.load(p + offs, mask=mask, other=0.)
    if FP64:
        b = b.to(tl.float64)
    else:
        b = b.to(tl.float32)
    return b


@triton.jit
def _cast(b, p):
    """``b`` in the element type of pointer ``p``; float64 goes through float32 first when ``p``
    is narrower (the interpreter rounds float64 -> bfloat16 to 0 or NaN)."""
    if b.dtype == tl.float64 and p.dtype.element_ty != tl.float64:
        b = b.to(tl.float32)
    return b.to(p.dtype.element_ty)


@triton.jit
def gate_fwd_kernel(o_cmp, o_slc, o_win, g_cmp, g_slc, g_win, o, N, DV,
                    BR: tl.constexpr, BDV: tl.constexpr, FP64: tl.constexpr):
    """One program per tile of BR rows. o_* and o: contiguous [N, DV]; g_*: contiguous [N]."""
    o_r = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)  # [BR] int64 rows
    o_d = tl.arange(0, BDV)
    m_r = o_r < N
    m = m_r[:, None] & (o_d < DV)[None, :]  # [BR, BDV]
    # N * DV can exceed 2^31 at long T: element offsets stay int64.
    o_x = o_r[:, None] * DV + o_d[None, :]  # [BR, BDV]
    b_o = _load(g_cmp, o_r, m_r, FP64)[:, None] * _load(o_cmp, o_x, m, FP64)
    b_o += _load(g_slc, o_r, m_r, FP64)[:, None] * _load(o_slc, o_x, m, FP64)
    b_o += _load(g_win, o_r, m_r, FP64)[:, None] * _load(o_win, o_x, m, FP64)
    tl.store(o + o_x, _cast(b_o, o), mask=m)


@triton.jit
def _bwd_branch(b_do, p_o, p_g, p_do, p_dg, o_r, o_x, m_r, m,
                DO: tl.constexpr, DG: tl.constexpr, FP64: tl.constexpr):
    """One branch's gradients from the tile's dO ``b_do`` [BR, BDV]: dO_x = g * dO (if DO) and
    dg = sum over the row of dO * o_x (if DG)."""
    if DO:
        b_g = _load(p_g, o_r, m_r, FP64)  # [BR]
        tl.store(p_do + o_x, _cast(b_g[:, None] * b_do, p_do), mask=m)
    if DG:
        b_o = _load(p_o, o_x, m, FP64)  # [BR, BDV]
        tl.store(p_dg + o_r, _cast(tl.sum(b_do * b_o, 1), p_dg), mask=m_r)


@triton.jit
def gate_bwd_kernel(do, o_cmp, o_slc, o_win, g_cmp, g_slc, g_win,
                    do_cmp, do_slc, do_win, dg_cmp, dg_slc, dg_win, N, DV,
                    BR: tl.constexpr, BDV: tl.constexpr, FP64: tl.constexpr,
                    DO_CMP: tl.constexpr, DO_SLC: tl.constexpr, DO_WIN: tl.constexpr,
                    DG_CMP: tl.constexpr, DG_SLC: tl.constexpr, DG_WIN: tl.constexpr):
    """One program per tile of BR rows; do, o_* and do_* contiguous [N, DV], g_* and dg_*
    contiguous [N]. The DO_x / DG_x flags say which gradients to write (the others' pointers
    are placeholders, never touched)."""
    o_r = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)  # [BR] int64 rows
    o_d = tl.arange(0, BDV)
    m_r = o_r < N
    m = m_r[:, None] & (o_d < DV)[None, :]  # [BR, BDV]
    o_x = o_r[:, None] * DV + o_d[None, :]  # [BR, BDV]
    b_do = _load(do, o_x, m, FP64)
    _bwd_branch(b_do, o_cmp, g_cmp, do_cmp, dg_cmp, o_r, o_x, m_r, m, DO_CMP, DG_CMP, FP64)
    _bwd_branch(b_do, o_slc, g_slc, do_slc, dg_slc, o_r, o_x, m_r, m, DO_SLC, DG_SLC, FP64)
    _bwd_branch(b_do, o_win, g_win, do_win, dg_win, o_r, o_x, m_r, m, DO_WIN, DG_WIN, FP64)


@triton.jit
def _fused_branch(b_do, p_o, p_g, p_lse, p_dg, p_lse_out, p_delta, o_r, o_x, m_r, m, LOG2: tl.constexpr):
    """One branch of :func:`gate_bwd_fused_kernel`."""
    b_dg = tl.sum(b_do * _load(p_o, o_x, m, False), 1)  # [BR] rowsum(dO * o_x)
    tl.store(p_dg + o_r, b_dg.to(p_dg.dtype.element_ty), mask=m_r)
    tl.store(p_delta + o_r, b_dg, mask=m_r)
    b_g = _load(p_g, o_r, m_r, False)
    b_lse = tl.load(p_lse + o_r, mask=m_r, other=0.)
    if LOG2:
        b_shift = tl.log2(b_g)
    else:
        b_shift = tl.log(b_g)
    # a row that saw no key keeps lse = -inf (the kernels skip it); g = 0 gives +inf (p' = 0)
    tl.store(p_lse_out + o_r, tl.where(b_lse == float("-inf"), b_lse, b_lse - b_shift), mask=m_r)


@triton.jit
def gate_bwd_fused_kernel(do, o_cmp, o_slc, o_win, g_cmp, g_slc, g_win, lse_cmp, lse_slc, lse_win,
                          dg_cmp, dg_slc, dg_win, lse_out, delta, N, DV,
                          BR: tl.constexpr, BDV: tl.constexpr):
    """The gates' backward for :mod:`nsa.ops.fused`, gates >= 0: per row and branch x,
    dg_x = rowsum(dO * o_x) (rounded to g's dtype), delta_x = the same in float32 and
    lse'_x = lse_x - log(g_x) (log2 for the window branch, whose lse is base 2), into the
    float32 ``[3, N]`` tensors delta and lse_out. With P' = g_x * P = exp(s - lse'_x), the
    branch's gradients through dO_x = g_x * dO are exactly the plain attention backward on
    (dO, lse', delta'): dV = P^T dO_x = P'^T dO, and dS = P * (dP_x - delta_x) =
    P' * (dO V^T - rowsum(dO * o_x)). Others as in :func:`gate_bwd_kernel`."""
    o_r = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    o_d = tl.arange(0, BDV)
    m_r = o_r < N
    m = m_r[:, None] & (o_d < DV)[None, :]
    o_x = o_r[:, None] * DV + o_d[None, :]
    b_do = _load(do, o_x, m, False)
    _fused_branch(b_do, o_cmp, g_cmp, lse_cmp, dg_cmp, lse_out, delta, o_r, o_x, m_r, m, False)
    _fused_branch(b_do, o_slc, g_slc, lse_slc, dg_slc, lse_out + N, delta + N, o_r, o_x, m_r, m, False)
    # N + N, not 2 * N: N arrives int32 and the product could wrap; pointer additions are 64-bit
    _fused_branch(b_do, o_win, g_win, lse_win, dg_win, lse_out + N + N, delta + N + N, o_r, o_x, m_r, m, True)


# ----------------------------------------------------------------------------------------------
# Host launchers. They take validated tensors: o_* of one shape [B, T, HQ, Dv], g_* [B, T, HQ].
# ----------------------------------------------------------------------------------------------

def _config(bdv: int, interpret: bool) -> dict:
    """Rows per tile and warps. A tile of ~4096 elements per tensor keeps 16-32 values per thread
    per tensor on the GPU (no spills with four tensors live in the backward) and still gives
    B*T*HQ*Dv/4096 programs (131072 at T=64k, HQ=64, Dv=128). The interpreter pays per program,
    so it gets larger tiles."""
    if interpret:
        return dict(rows=max(1, 8192 // bdv), num_warps=1)
    return dict(rows=max(1, 4096 // bdv), num_warps=4)


def _fp64(*dtypes) -> bool:
    return torch.float64 in dtypes


def gate_combine_fwd(o_cmp, o_slc, o_win, g_cmp, g_slc, g_win, out_dtype, config=None):
    """Returns o ``[B, T, HQ, Dv]`` in ``out_dtype`` (contiguous).

    ``config`` overrides the launch config (keys of :func:`_config`; for benchmark sweeps)."""
    o = new_output(o_cmp.shape, out_dtype, o_cmp.device)
    N, DV = o_cmp.shape[:-1].numel(), o_cmp.shape[-1]
    if N * DV == 0:
        return o
    xs = [x.contiguous() for x in (o_cmp, o_slc, o_win, g_cmp, g_slc, g_win)]
    bdv = triton.next_power_of_2(DV)
    cfg = config or _config(bdv, interpreting())
    gate_fwd_kernel[(triton.cdiv(N, cfg["rows"]),)](
        *xs, o, N, DV, BR=cfg["rows"], BDV=bdv, FP64=_fp64(out_dtype, *(x.dtype for x in xs)),
        num_warps=cfg["num_warps"])
    return o


def gate_combine_bwd(do, o_cmp, o_slc, o_win, g_cmp, g_slc, g_win, needs, config=None):
    """Gradients of the six inputs from dO ``[B, T, HQ, Dv]``.

    Args:
        needs: six bools, which of (o_cmp, o_slc, o_win, g_cmp, g_slc, g_win) need a gradient.
        config: overrides the launch config (benchmark sweeps).
    Returns:
        six tensors: each needed gradient in its input's shape and dtype (contiguous), an empty
        ``[0]`` tensor of the input's dtype for the others.
    """
    inputs = (o_cmp, o_slc, o_win, g_cmp, g_slc, g_win)
    grads = [new_output(x.shape, x.dtype, x.device) if need else x.new_empty(0)
             for x, need in zip(inputs, needs)]
    N, DV = o_cmp.shape[:-1].numel(), o_cmp.shape[-1]
    if N * DV == 0:
        # dg is a sum over an empty row when Dv = 0
        return [g.zero_() for g in grads]
    if not any(needs):
        return grads
    do = do.contiguous()
    # Only the tensors a needed gradient reads are made contiguous (dO_x reads g_x, dg_x reads o_x);
    # the others are passed as placeholders.
    reads = (needs[3], needs[4], needs[5], needs[0], needs[1], needs[2])
    xs = [x.contiguous() if r else do for x, r in zip(inputs, reads)]
    ptrs = [g if need else do for g, need in zip(grads, needs)]
    bdv = triton.next_power_of_2(DV)
    cfg = config or _config(bdv, interpreting())
    gate_bwd_kernel[(triton.cdiv(N, cfg["rows"]),)](
        do, *xs, *ptrs, N, DV, BR=cfg["rows"], BDV=bdv,
        FP64=_fp64(do.dtype, *(x.dtype for x in inputs)),
        DO_CMP=needs[0], DO_SLC=needs[1], DO_WIN=needs[2], DG_CMP=needs[3], DG_SLC=needs[4], DG_WIN=needs[5],
        num_warps=cfg["num_warps"])
    return grads


def gate_bwd_fused(do, o_cmp, o_slc, o_win, g_cmp, g_slc, g_win, lse_cmp, lse_slc, lse_win):
    """The gates' backward when every gate is >= 0 (:func:`gate_bwd_fused_kernel`). lse_cmp and
    lse_slc natural-log, lse_win base-2 (as the branch kernels store them), float32 ``[B, T, HQ]``.
    Returns dg_cmp, dg_slc, dg_win (the gates' shapes and dtypes) and float32 ``[3, B, T, HQ]``
    lse' and delta. Not for float64 (the composed path serves it)."""
    grads = [new_output(g.shape, g.dtype, g.device) for g in (g_cmp, g_slc, g_win)]
    lse_out = new_output((3,) + tuple(g_cmp.shape), torch.float32, do.device)
    delta = new_output((3,) + tuple(g_cmp.shape), torch.float32, do.device)
    N, DV = o_cmp.shape[:-1].numel(), o_cmp.shape[-1]
    if N == 0:
        return (*grads, lse_out, delta)
    xs = [x.contiguous() for x in (do, o_cmp, o_slc, o_win, g_cmp, g_slc, g_win, lse_cmp, lse_slc, lse_win)]
    bdv = triton.next_power_of_2(max(DV, 1))
    cfg = _config(bdv, interpreting())
    gate_bwd_fused_kernel[(triton.cdiv(N, cfg["rows"]),)](
        *xs, *grads, lse_out, delta, N, DV, BR=cfg["rows"], BDV=bdv, num_warps=cfg["num_warps"])
    return (*grads, lse_out, delta)


# ----------------------------------------------------------------------------------------------
# torch.compile: the launchers as opaque custom ops with shape-only fake implementations.
# ----------------------------------------------------------------------------------------------

@torch.library.custom_op("nsa::gate_combine_fwd", mutates_args=())
def _fwd_op(o_cmp: torch.Tensor, o_slc: torch.Tensor, o_win: torch.Tensor, g_cmp: torch.Tensor,
            g_slc: torch.Tensor, g_win: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    return gate_combine_fwd(o_cmp, o_slc, o_win, g_cmp, g_slc, g_win, out_dtype)


@_fwd_op.register_fake
def _(o_cmp, o_slc, o_win, g_cmp, g_slc, g_win, out_dtype):
    return o_cmp.new_empty(o_cmp.shape, dtype=out_dtype)


@torch.library.custom_op("nsa::gate_combine_bwd", mutates_args=())
def _bwd_op(do: torch.Tensor, o_cmp: torch.Tensor, o_slc: torch.Tensor, o_win: torch.Tensor,
            g_cmp: torch.Tensor, g_slc: torch.Tensor, g_win: torch.Tensor,
            needs: list[bool]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                        torch.Tensor]:
    return tuple(gate_combine_bwd(do, o_cmp, o_slc, o_win, g_cmp, g_slc, g_win, needs))


@_bwd_op.register_fake
def _(do, o_cmp, o_slc, o_win, g_cmp, g_slc, g_win, needs):
    return tuple(x.new_empty(x.shape) if need else x.new_empty(0)
                 for x, need in zip((o_cmp, o_slc, o_win, g_cmp, g_slc, g_win), needs))


class GateCombineFunction(torch.autograd.Function):

    @staticmethod
    def forward(ctx, o_cmp, o_slc, o_win, g_cmp, g_slc, g_win, out_dtype):
        ctx.save_for_backward(o_cmp, o_slc, o_win, g_cmp, g_slc, g_win)
        return _fwd_op(o_cmp, o_slc, o_win, g_cmp, g_slc, g_win, out_dtype)

    @staticmethod
    def backward(ctx, do):
        needs = list(ctx.needs_input_grad[:6])
        grads = _bwd_op(do, *ctx.saved_tensors, needs)
        return (*(g if need else None for g, need in zip(grads, needs)), None)


def gate_combine_triton(o_cmp, o_slc, o_win, g_cmp, g_slc, g_win, out_dtype):
    """Triton ``g_cmp*o_cmp + g_slc*o_slc + g_win*o_win`` (gates broadcast over Dv), cast to ``out_dtype``.

    Inputs arrive validated (from :func:`nsa.ops.nsa`); any of them may be non-contiguous.

    Args:
        o_cmp, o_slc, o_win: ``[B, T, HQ, Dv]`` branch outputs, float dtypes (usually q's).
        g_cmp, g_slc, g_win: ``[B, T, HQ]`` gates, any float dtypes.
        out_dtype: dtype of the result (q's dtype in NSA).
    Returns:
        o ``[B, T, HQ, Dv]`` in ``out_dtype``, differentiable in all six inputs. Computed in fp32
        (fp64 when any tensor is float64) and rounded once; gradients likewise, each rounded once
        to its input's dtype.
    """
    return GateCombineFunction.apply(o_cmp, o_slc, o_win, g_cmp, g_slc, g_win, out_dtype)
