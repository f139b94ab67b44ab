"""NSA's Triton fast path as one autograd node: the gates folded into the branch backward.

The composed path (:func:`nsa.ops.nsa` with one autograd node per branch) runs the gates'
backward as its own pass: it writes each branch's gradient ``dO_x = g_x * dO`` (three tensors
of the output's size), and every branch backward then reads ``dO_x`` and ``o_x`` again to form
``delta_x = rowsum(dO_x * o_x)``. Here, when every gate is >= 0 (NSA's gates are sigmoid
outputs), one kernel reads dO and the three branch outputs once and writes per-row numbers
only: ``dg_x = rowsum(dO * o_x)`` and ``lse'_x = lse_x - log(g_x)``. With ``P' = g_x * P =
exp(s - lse'_x)`` the branch's gradients are the plain attention backward on ``(dO, lse',
delta = dg_x)``, unchanged kernels::

    dV = P^T (g_x dO) = P'^T dO        dS = P * (g_x dO V^T - g_x dg_x) = P' * (dO V^T - dg_x)

A negative gate (no logarithm) takes the composed backward inside the same node; the choice
reads the gates' sign on the host once per backward (skipped, composed, while a CUDA graph is
captured). The forward runs the composed path's kernels, except that the window forward also
combines the three branch outputs with the gates in its epilogue (no separate gate pass).

Semantics are those of :func:`nsa.ops.reference.nsa` (tested against it). float64 inputs take
the composed path (its kernels compute in float32 and the gates in float64).
"""

from __future__ import annotations

import torch

from . import compressed, gate, selected, selection, window


@torch.library.custom_op("nsa::nsa_fused_bwd", mutates_args=())
def _bwd_op(do: torch.Tensor, q: torch.Tensor, k_cmp: torch.Tensor, v_cmp: torch.Tensor, k_slc: torch.Tensor,
            v_slc: torch.Tensor, k_win: torch.Tensor, v_win: torch.Tensor, g_cmp: torch.Tensor, g_slc: torch.Tensor,
            g_win: torch.Tensor, o_cmp: torch.Tensor, lse_cmp: torch.Tensor, idx: torch.Tensor, o_slc: torch.Tensor,
            lse_slc: torch.Tensor, o_win: torch.Tensor, lse_win: torch.Tensor, cu_seqlens: torch.Tensor | None,
            kernel_size: int, stride: int, block_size: int, window_size: int, scale: float, q_offset: int = 0,
            cu_seqlens_k: torch.Tensor | None = None
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                       torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    do = do.contiguous()
    capturing = do.is_cuda and torch.cuda.is_current_stream_capturing()
    fold = not capturing and not bool(((g_cmp < 0).any() | (g_slc < 0).any() | (g_win < 0).any()).item())
    if fold:
        dg_cmp, dg_slc, dg_win, lse2, delta = gate.gate_bwd_fused(do, o_cmp, o_slc, o_win, g_cmp, g_slc, g_win,
                                                                  lse_cmp, lse_slc, lse_win)
        do_cmp = do_slc = do_win = do
        lse_cmp, lse_slc, lse_win = lse2.unbind(0)
        delta_cmp, delta_slc, delta_win = delta.unbind(0)
    else:
        do_cmp, do_slc, do_win, dg_cmp, dg_slc, dg_win = gate.gate_combine_bwd(
            do, o_cmp, o_slc, o_win, g_cmp, g_slc, g_win, [True] * 6)
        delta_cmp = delta_slc = delta_win = None
    pos = {} if not q_offset and cu_seqlens_k is None else {"q_offset": q_offset, "cu_seqlens_k": cu_seqlens_k}
    dq, dk_cmp, dv_cmp = compressed.compressed_attention_bwd(q, k_cmp, v_cmp, o_cmp, lse_cmp, do_cmp, None,
                                                             kernel_size, stride, scale, cu_seqlens, delta=delta_cmp,
                                                             **pos)
    dq_slc, dk_slc, dv_slc = selected._selected_bwd_op(q, k_slc, v_slc, o_slc, lse_slc, do_slc, idx, block_size,
                                                       scale, cu_seqlens, delta=delta_slc, **pos)
    # the window's dQ kernel adds the other two branches' dq (float32, one rounding)
    dq, dk_win, dv_win = window._window_bwd_op(q, k_win, v_win, o_win, lse_win, do_win, window_size, scale,
                                               cu_seqlens, delta=delta_win, dq_a=dq, dq_b=dq_slc, **pos)
    return dq, dk_cmp, dv_cmp, dk_slc, dv_slc, dk_win, dv_win, dg_cmp, dg_slc, dg_win


@_bwd_op.register_fake
def _(do, q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, g_cmp, g_slc, g_win, *rest):
    return tuple(torch.empty_like(t) for t in (q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, g_cmp, g_slc, g_win))


class NSAFunction(torch.autograd.Function):

    @staticmethod
    def forward(ctx, q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, g_cmp, g_slc, g_win, kernel_size, stride,
                block_size, num_selected, num_initial, num_local, window_size, scale, cu_seqlens, q_offset, cu_seqlens_k):
        # k_win / v_win None: the window branch shares the selected branch's keys / values
        # (torch.compile cannot trace one tensor passed as two inputs)
        ctx.share = (k_win is None, v_win is None)
        k_win = k_slc if k_win is None else k_win
        v_win = v_slc if v_win is None else v_win
        # queries at an offset: the keyword arguments only then (the kernels' launches are unchanged otherwise)
        pos = {} if not q_offset and cu_seqlens_k is None else {"q_offset": q_offset, "cu_seqlens_k": cu_seqlens_k}
        o_cmp, lse_cmp = compressed._fwd_op(q, k_cmp, v_cmp, kernel_size, stride, scale, cu_seqlens, **pos)
        idx = selection.select_blocks_triton(q, k_cmp, lse_cmp, kernel_size, stride, block_size, num_selected,
                                             num_initial, num_local, scale, cu_seqlens, **pos)
        o_slc, lse_slc = selected._selected_fwd_op(q, k_slc, v_slc, idx, block_size, scale, cu_seqlens, **pos)
        # the window forward also combines the three branches with their gates (its epilogue)
        o_win, lse_win, o = window._window_fwd_gated_op(q, k_win, v_win, window_size, scale, cu_seqlens,
                                                        o_cmp, o_slc, g_cmp, g_slc, g_win, **pos)
        ctx.save_for_backward(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, g_cmp, g_slc, g_win,
                              o_cmp, lse_cmp, idx, o_slc, lse_slc, o_win, lse_win, cu_seqlens, cu_seqlens_k)
        ctx.args = (kernel_size, stride, block_size, window_size, scale, q_offset)
        ctx.mark_non_differentiable(idx)
        return o, idx

    @staticmethod
    def backward(ctx, do, _didx):
        (q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, g_cmp, g_slc, g_win,
         o_cmp, lse_cmp, idx, o_slc, lse_slc, o_win, lse_win, cu, cu_k) = ctx.saved_tensors
        kernel_size, stride, block_size, window_size, scale, q_offset = ctx.args
        dq, dk_cmp, dv_cmp, dk_slc, dv_slc, dk_win, dv_win, dg_cmp, dg_slc, dg_win = _bwd_op(
            do, q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, g_cmp, g_slc, g_win, o_cmp, lse_cmp, idx, o_slc, lse_slc,
            o_win, lse_win, cu, kernel_size, stride, block_size, window_size, scale, q_offset, cu_k)
        if ctx.share[0]:
            dk_slc, dk_win = dk_slc + dk_win, None
        if ctx.share[1]:
            dv_slc, dv_win = dv_slc + dv_win, None
        return (dq, dk_cmp, dv_cmp, dk_slc, dv_slc, dk_win, dv_win, dg_cmp, dg_slc, dg_win,
                None, None, None, None, None, None, None, None, None, None, None)


def nsa_triton(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, g_cmp, g_slc, g_win, kernel_size, stride, block_size,
               num_selected, num_initial, num_local, window_size, scale, cu_seqlens, q_offset=0, cu_seqlens_k=None):
    """Validated inputs from :func:`nsa.ops.nsa` (no float64; ``scale`` a float). Returns
    ``(o, block_indices)``; o is differentiable in the seven key/value/query tensors and the gates."""
    return NSAFunction.apply(q, k_cmp, v_cmp, k_slc, v_slc, None if k_win is k_slc else k_win,
                             None if v_win is v_slc else v_win, g_cmp, g_slc, g_win, kernel_size, stride,
                             block_size, num_selected, num_initial, num_local, window_size, scale, cu_seqlens,
                             q_offset, cu_seqlens_k)
