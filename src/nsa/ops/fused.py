"""NSA's Triton fast path as one autograd function: the gates applied inside the branch kernels.

The composed path (:func:`nsa.ops.nsa` with one autograd node per branch) runs the gates'
backward as its own pass: it writes each branch's gradient ``dO_x = g_x * dO`` (three tensors
of the output's size), and every branch backward then reads its ``dO_x`` and ``o_x`` again to
form ``delta_x = rowsum(dO_x * o_x)``. Here one kernel reads dO and the three branch outputs
once and writes only per-row numbers: the gate gradients ``dg_x = rowsum(dO * o_x)`` and
``delta_x = g_x * dg_x``; each branch's backward kernels read dO and scale it by their gate per
row when they load it (rounded to dO's dtype exactly as the gate backward rounds ``dO_x``).
Forward: the same kernels as the composed path.

Semantics are those of :func:`nsa.ops.reference.nsa` (tested against it). Rounding differs from
the composed path (``nsa.ops.api.FUSED_GATES = False``) only in delta: here ``g_x * rowsum(dO *
o_x)`` in float32, there the rowsum of the rounded ``dO_x * o_x``. float64 inputs take the
composed path (its kernels compute in float32 and the gates in float64).
"""

from __future__ import annotations

import torch

from . import compressed, gate, selected, selection, window


class NSAFunction(torch.autograd.Function):

    @staticmethod
    def forward(ctx, q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, g_cmp, g_slc, g_win, kernel_size, stride,
                block_size, num_selected, num_initial, num_local, window_size, scale, cu_seqlens):
        o_cmp, lse_cmp = compressed._fwd_op(q, k_cmp, v_cmp, kernel_size, stride, scale, cu_seqlens)
        idx = selection.select_blocks_triton(q, k_cmp, lse_cmp, kernel_size, stride, block_size, num_selected,
                                             num_initial, num_local, scale, cu_seqlens)
        o_slc, lse_slc = selected._selected_fwd_op(q, k_slc, v_slc, idx, block_size, scale, cu_seqlens)
        o_win, lse_win = window._window_fwd_op(q, k_win, v_win, window_size, scale, cu_seqlens)
        o = gate._fwd_op(o_cmp, o_slc, o_win, g_cmp, g_slc, g_win, q.dtype)
        ctx.save_for_backward(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, g_cmp, g_slc, g_win,
                              o_cmp, lse_cmp, idx, o_slc, lse_slc, o_win, lse_win, cu_seqlens)
        ctx.args = (kernel_size, stride, block_size, window_size, scale)
        ctx.mark_non_differentiable(idx)
        return o, idx

    @staticmethod
    def backward(ctx, do, _didx):
        (q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, g_cmp, g_slc, g_win,
         o_cmp, lse_cmp, idx, o_slc, lse_slc, o_win, lse_win, cu) = ctx.saved_tensors
        kernel_size, stride, block_size, window_size, scale = ctx.args
        do = do.contiguous()
        dg_cmp, dg_slc, dg_win, delta = gate._bwd_fused_op(do, o_cmp, o_slc, o_win, g_cmp, g_slc, g_win)
        dq, dk_cmp, dv_cmp = compressed._bwd_op(q, k_cmp, v_cmp, o_cmp, lse_cmp, do, None, kernel_size, stride,
                                                scale, cu, gate=g_cmp, delta=delta[0])
        dq_slc, dk_slc, dv_slc = selected._selected_bwd_op(q, k_slc, v_slc, o_slc, lse_slc, do, idx, block_size,
                                                           scale, cu, gate=g_slc, delta=delta[1])
        dq_win, dk_win, dv_win = window._window_bwd_op(q, k_win, v_win, o_win, lse_win, do, window_size, scale,
                                                       cu, gate=g_win, delta=delta[2])
        dq = dq + dq_slc + dq_win
        return (dq, dk_cmp, dv_cmp, dk_slc, dv_slc, dk_win, dv_win, dg_cmp, dg_slc, dg_win,
                None, None, None, None, None, None, None, None, None)


def nsa_triton(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, g_cmp, g_slc, g_win, kernel_size, stride, block_size,
               num_selected, num_initial, num_local, window_size, scale, cu_seqlens):
    """Validated inputs from :func:`nsa.ops.nsa` (no float64; ``scale`` a float). Returns
    ``(o, block_indices)``; o is differentiable in the seven key/value/query tensors and the gates."""
    return NSAFunction.apply(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, g_cmp, g_slc, g_win, kernel_size, stride,
                             block_size, num_selected, num_initial, num_local, window_size, scale, cu_seqlens)
