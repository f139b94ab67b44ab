"""Triton sliding-window attention with a query offset (the queries are the last positions of their
keys) against the specification, on the CPU interpreter (compiled kernels on CUDA).

Oracle (independent of the offset code): the reference's ordinary call on the whole sequence
``q_full = [B, Tk, HQ, Dk]`` with ``q = q_full[:, q_offset:]``; the offset call's o and dq are its
last Tq rows, and its dk, dv are the whole call's dk, dv when the output gradient vanishes on the
first q_offset rows. Packed input: the same per sequence. The reference runs in float32 on the same
input values (16-bit inputs upcast). Tolerances are those of tests/ops/test_window_triton.py.
Every case also checks that keys before the first query's window get exact zero dk and dv.
"""

import pytest
import torch

from nsa.ops import gate, reference
from nsa.ops import window as win
from nsa.ops.utils import window_keys
from tests.helpers import assert_close

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
RATIO = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3, torch.float64: 1e-5}

# id, B, Tq, q_offset, H, G, Dk, Dv, window, dtype: windows shorter and longer than Tq and than
# q_offset, offsets longer than the window (the first keys get no gradient)
CASES = [
    ("Tq20-off13-W5-G2", 2, 20, 13, 2, 2, 16, 24, 5, torch.float32),
    ("Tq7-off30-W12-G1", 2, 7, 30, 2, 1, 24, 16, 12, torch.float32),
    ("Tq1-off40-W8-G3", 1, 1, 40, 1, 3, 16, 24, 8, torch.float32),
    ("Tq5-off3-W1000-G16", 1, 5, 3, 1, 16, 16, 16, 1000, torch.float32),
    ("Tq40-off9-W20-G3", 1, 40, 9, 1, 3, 24, 16, 20, torch.float32),
    ("Tq37-off50-W40-G2-bf16", 1, 37, 50, 2, 2, 16, 24, 40, torch.bfloat16),
    ("Tq33-off70-W64-G16-bf16", 1, 33, 70, 1, 16, 16, 24, 64, torch.bfloat16),
    ("Tq30-off45-W20-G2-fp16", 1, 30, 45, 1, 2, 24, 16, 20, torch.float16),
    # Dk as two head-column tiles (96 = 64 + 32, 48 = 32 + 16)
    ("Tq50-off60-W40-G16-dk96-bf16", 1, 50, 60, 1, 16, 96, 32, 40, torch.bfloat16),
    ("Tq30-off17-W25-G2-dk48-fp16", 1, 30, 17, 2, 2, 48, 16, 25, torch.float16),
]

# id, query lengths, key lengths, H, G, Dk, Dv, window, dtype: offsets 29, 23, 0 (len_q = len_k), 41
VARLEN_LENS = ([1, 37, 20, 9], [30, 60, 20, 50])
VARLEN_CASES = [
    ("W5-G3", *VARLEN_LENS, 1, 3, 24, 16, 5, torch.float32),
    ("W40-G2", *VARLEN_LENS, 2, 2, 16, 24, 40, torch.float32),
    ("W1000-G16", *VARLEN_LENS, 1, 16, 16, 16, 1000, torch.float32),
    ("W20-G2-bf16", *VARLEN_LENS, 1, 2, 24, 16, 20, torch.bfloat16),
    ("W40-G16-dk96-bf16", *VARLEN_LENS, 1, 16, 96, 32, 40, torch.bfloat16),
]


def _cu(lens):
    return torch.tensor([0] + lens).cumsum(0).to(torch.int32).to(DEVICE)


def _full_inputs(B, Tk, H, G, Dk, Dv, dtype, seed=0):
    """q_full ``[B, Tk, HQ, Dk]``, k, v over the whole sequences, in ``dtype``."""
    gen = torch.Generator().manual_seed(seed)
    shapes = ((B, Tk, H * G, Dk), (B, Tk, H, Dk), (B, Tk, H, Dv))
    return [torch.randn(*s, generator=gen).to(DEVICE, dtype) for s in shapes]


def _oracle(q_full, k, v, window, scale, do_full):
    """The reference on the whole sequence (float32): o_full and the gradients of sum(o * do_full)."""
    qr, kr, vr = [x.detach().float().requires_grad_() for x in (q_full, k, v)]
    o = reference.sliding_window_attention(qr, kr, vr, window, scale)
    return o.detach(), torch.autograd.grad((o * do_full).sum(), (qr, kr, vr))


def _dense_problem(case, seed=0):
    """(q, k, v, window, scale, do, oracle o rows, oracle (dq rows, dk, dv)) of a dense case."""
    name, B, Tq, off, H, G, Dk, Dv, window, dtype = case
    q_full, k, v = _full_inputs(B, Tq + off, H, G, Dk, Dv, dtype, seed)
    do = torch.randn(B, Tq, H * G, Dv, generator=torch.Generator().manual_seed(seed + 1)).to(DEVICE, dtype)
    do_full = torch.cat([torch.zeros(B, off, H * G, Dv, device=DEVICE), do.float()], 1)
    scale = Dk ** -0.5
    ro, (rdq, rdk, rdv) = _oracle(q_full, k, v, window, scale, do_full)
    return q_full[:, off:], k, v, window_keys(window, Tq + off), scale, do, ro[:, off:], (rdq[:, off:], rdk, rdv)


def _varlen_problem(case, seed=0):
    """The packed counterpart of :func:`_dense_problem` (plus cu_seqlens, cu_seqlens_k)."""
    name, lens_q, lens_k, H, G, Dk, Dv, window, dtype = case
    scale = Dk ** -0.5
    qs, ks, vs, dos, ro, rdq, rdk, rdv = [], [], [], [], [], [], [], []
    for n, (lq, lk) in enumerate(zip(lens_q, lens_k)):
        q_full, k, v = _full_inputs(1, lk, H, G, Dk, Dv, dtype, seed + 10 * n)
        do = torch.randn(1, lq, H * G, Dv, generator=torch.Generator().manual_seed(seed + 10 * n + 1)).to(DEVICE, dtype)
        do_full = torch.cat([torch.zeros(1, lk - lq, H * G, Dv, device=DEVICE), do.float()], 1)
        o, (dq, dk, dv) = _oracle(q_full, k, v, window, scale, do_full)
        qs.append(q_full[:, lk - lq:]), ks.append(k), vs.append(v), dos.append(do)
        ro.append(o[:, lk - lq:]), rdq.append(dq[:, lk - lq:]), rdk.append(dk), rdv.append(dv)
    cat = lambda xs: torch.cat(xs, 1)  # noqa: E731
    return (cat(qs), cat(ks), cat(vs), window_keys(window, sum(lens_k)), scale, cat(dos), cat(ro),
            (cat(rdq), cat(rdk), cat(rdv)), _cu(lens_q), _cu(lens_k))


def _grads(o, do, inputs):
    return torch.autograd.grad((o.float() * do.float()).sum(), inputs)


def _check(name, out, grads, ro, rgrads, ratio):
    assert_close(f"{name} o", ro, out, ratio)
    for gname, r, x in zip(("dq", "dk", "dv"), rgrads, grads):
        assert_close(f"{name} {gname}", r, x, ratio)


def _unseen_keys_zero(name, dk, dv, first_seen):
    """Keys before ``first_seen`` (no query's window reaches them) have exact zero gradients."""
    for gname, g in (("dk", dk), ("dv", dv)):
        assert torch.all(g[:, :max(first_seen, 0)] == 0), f"{name} {gname}: unseen keys not zero"


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_dense(case):
    name, B, Tq, off, H, G, Dk, Dv, window, dtype = case
    q, k, v, w, scale, do, ro, rgrads = _dense_problem(case)
    q, k, v = [x.requires_grad_() for x in (q, k, v)]
    o = win.sliding_window_attention_triton(q, k, v, w, scale, q_offset=off)
    grads = _grads(o, do, (q, k, v))
    assert o.dtype == dtype and all(g.dtype == dtype for g in grads)
    _check(name, o, grads, ro, rgrads, RATIO[dtype])
    _unseen_keys_zero(name, grads[1], grads[2], off - w + 1)


@pytest.mark.parametrize("case", VARLEN_CASES, ids=[c[0] for c in VARLEN_CASES])
def test_varlen(case):
    name, lens_q, lens_k, H, G, Dk, Dv, window, dtype = case
    q, k, v, w, scale, do, ro, rgrads, cu, cu_k = _varlen_problem(case)
    q, k, v = [x.requires_grad_() for x in (q, k, v)]
    o = win.sliding_window_attention_triton(q, k, v, w, scale, cu, cu_seqlens_k=cu_k)
    grads = _grads(o, do, (q, k, v))
    _check(name, o, grads, ro, rgrads, RATIO[dtype])
    for n, (lq, lk, bos) in enumerate(zip(lens_q, lens_k, cu_k.tolist())):
        _unseen_keys_zero(f"{name} seq {n}", grads[1][:, bos:bos + lk], grads[2][:, bos:bos + lk], lk - lq - w + 1)


# The launchers' other loop forms (the interpreter's defaults: one loop, TMA loads for 16-bit
# inputs, rotated dK/dV walk): three phases with pointer loads, and each switch on its own.
LOOP_FORMS = [dict(fwd=dict(one_loop=False, tma=False), dkv=dict(rotate=False)),
              dict(fwd=dict(one_loop=False, tma=True), dkv=dict(rotate=True)),
              dict(fwd=dict(one_loop=True, tma=False), dkv=dict(rotate=False))]


@pytest.mark.parametrize("form", range(len(LOOP_FORMS)))
@pytest.mark.parametrize("varlen", [False, True], ids=["dense", "varlen"])
def test_loop_forms(varlen, form):
    cfg = LOOP_FORMS[form]
    if varlen:
        case = ("varlen-W20-G3-bf16", *VARLEN_LENS, 1, 3, 24, 16, 20, torch.bfloat16)
        q, k, v, w, scale, do, ro, rgrads, cu, cu_k = _varlen_problem(case)
        off = 0
    else:
        case = ("Tq40-off50-W20-G2-bf16", 2, 40, 50, 2, 2, 16, 24, 20, torch.bfloat16)
        q, k, v, w, scale, do, ro, rgrads = _dense_problem(case)
        cu = cu_k = None
        off = case[3]
    q, k, v = [x.contiguous() for x in (q, k, v)]
    o, lse = win._launch_fwd(q, k, v, w, scale, cu, config=cfg["fwd"], q_offset=off, cu_seqlens_k=cu_k)
    grads = win._launch_bwd(q, k, v, o, lse, do, w, scale, cu, dq_config=cfg["fwd"], dkv_config=cfg["dkv"],
                            q_offset=off, cu_seqlens_k=cu_k)
    _check(case[0], o, grads, ro, rgrads, RATIO[torch.bfloat16])


def test_explicit_zero_offset_is_the_default_call():
    lens = [1, 37, 20]
    q, k, v = [x.requires_grad_() for x in _full_inputs(1, sum(lens), 2, 3, 16, 24, torch.bfloat16)]
    do = torch.randn(1, sum(lens), 6, 24, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    for cu, kw in ((None, dict(q_offset=0)), (_cu(lens), dict(q_offset=0, cu_seqlens_k=_cu(lens)))):
        o1 = win.sliding_window_attention_triton(q, k, v, 9, 0.3, cu)
        o2 = win.sliding_window_attention_triton(q, k, v, 9, 0.3, cu, **kw)
        assert torch.equal(o1, o2)
        for name, a, b in zip(("dq", "dk", "dv"), _grads(o1, do, (q, k, v)), _grads(o2, do, (q, k, v))):
            assert torch.equal(a, b), f"{name} differs with an explicit zero offset"


@pytest.mark.parametrize("varlen", [False, True], ids=["dense", "varlen"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_gated_forward(dtype, varlen):
    """The gated forward takes the branch outputs and gates at the queries' rows: its window output
    and lse are the plain offset forward's, its NSA output what the gate kernel computes from them,
    and both match the oracle."""
    if varlen:
        case = ("varlen-W20-G3", *VARLEN_LENS, 1, 3, 16, 24, 20, dtype)
        q, k, v, w, scale, _, ro, _, cu, cu_k = _varlen_problem(case)
        kw = dict(cu_seqlens_k=cu_k)
    else:
        case = ("Tq30-off45-W20-G3", 2, 30, 45, 2, 3, 16, 24, 20, dtype)
        q, k, v, w, scale, _, ro, _ = _dense_problem(case)
        cu, kw = None, dict(q_offset=case[3])
    gen = torch.Generator().manual_seed(4)
    o_cmp, o_slc = [torch.randn(q.shape[:3] + (24,), generator=gen).to(DEVICE, dtype) for _ in range(2)]
    g_cmp, g_slc, g_win = [torch.rand(q.shape[:3], generator=gen).to(DEVICE, torch.bfloat16) for _ in range(3)]
    o_w, lse_w = win._window_fwd_op(q, k, v, w, scale, cu, **kw)
    o_w2, lse_w2, o = win._window_fwd_gated_op(q, k, v, w, scale, cu, o_cmp, o_slc, g_cmp, g_slc, g_win, **kw)
    assert torch.equal(o_w, o_w2) and torch.equal(lse_w, lse_w2)
    assert_close("o_win", ro, o_w, RATIO[dtype])
    assert o.dtype == dtype
    assert torch.equal(o, gate.gate_combine_fwd(o_cmp, o_slc, o_w, g_cmp, g_slc, g_win, dtype))
    want = reference.gate_combine(o_cmp.float(), o_slc.float(), ro, g_cmp.float(), g_slc.float(), g_win.float(),
                                  torch.float32)
    assert_close("o", want, o, RATIO[dtype])


@pytest.mark.parametrize("with_delta", [False, True], ids=["own-delta", "given-delta"])
@pytest.mark.parametrize("n_add", [1, 2])
@pytest.mark.parametrize("varlen", [False, True], ids=["dense", "varlen"])
def test_dq_adds_other_branches(varlen, n_add, with_delta):
    """The dQ kernel's epilogue adds NSA's other branches' dq (the queries' rows); dk, dv unchanged."""
    if varlen:
        case = ("varlen-W40-G2", *VARLEN_LENS, 2, 2, 16, 8, 40, torch.float32)
        q, k, v, w, scale, do, ro, rgrads, cu, cu_k = _varlen_problem(case)
        kw = dict(cu_seqlens_k=cu_k)
    else:
        case = ("Tq30-off20-W9-G2", 2, 30, 20, 2, 2, 16, 8, 9, torch.float32)
        q, k, v, w, scale, do, ro, rgrads = _dense_problem(case)
        cu, kw = None, dict(q_offset=case[3])
    gen = torch.Generator().manual_seed(6)
    adds = [torch.randn(q.shape, generator=gen).to(DEVICE) for _ in range(n_add)]
    o, lse = win._window_fwd_op(q, k, v, w, scale, cu, **kw)
    delta = (o.float() * do.float()).sum(-1) if with_delta else None
    dq, dk, dv = win._window_bwd_op(q, k, v, o, lse, do, w, scale, cu, **kw)
    dq2, dk2, dv2 = win._window_bwd_op(q, k, v, o, lse, do, w, scale, cu, delta, *adds, **kw)
    assert_close("dq", rgrads[0] + sum(adds), dq2, RATIO[torch.float32])
    assert_close("dq + adds", dq + sum(adds), dq2, 1e-6)
    for name, r, x, y in zip(("dk", "dv"), rgrads[1:], (dk, dv), (dk2, dv2)):
        assert_close(name, r, y, RATIO[torch.float32])
        if not with_delta:  # the same computation: the additions touch dq only
            assert torch.equal(x, y), f"{name} changed by the dq additions"


def test_float64_inputs_computed_in_float32():
    case = ("fp64-Tq20-off25-W9-G2", 1, 20, 25, 1, 2, 16, 24, 9, torch.float64)
    q, k, v, w, scale, do, ro, rgrads = _dense_problem(case)
    q, k, v = [x.requires_grad_() for x in (q, k, v)]
    o = win.sliding_window_attention_triton(q, k, v, w, scale, q_offset=case[3])
    grads = _grads(o, do, (q, k, v))
    assert o.dtype == torch.float64
    _check(case[0], o, grads, ro, rgrads, RATIO[torch.float64])


def test_backward_is_deterministic():
    case = ("varlen-W20-G3-bf16", *VARLEN_LENS, 1, 3, 16, 24, 20, torch.bfloat16)
    q, k, v, w, scale, do, _, _, cu, cu_k = _varlen_problem(case)
    q, k, v = [x.requires_grad_() for x in (q, k, v)]
    g1 = _grads(win.sliding_window_attention_triton(q, k, v, w, scale, cu, cu_seqlens_k=cu_k), do, (q, k, v))
    g2 = _grads(win.sliding_window_attention_triton(q, k, v, w, scale, cu, cu_seqlens_k=cu_k), do, (q, k, v))
    for name, a, b in zip(("dq", "dk", "dv"), g1, g2):
        assert torch.equal(a, b), f"{name} differs between two identical backward passes"


@pytest.mark.parametrize("varlen", [False, True], ids=["dense", "varlen"])
def test_opcheck_custom_ops(varlen):
    if varlen:
        q, k, v = _full_inputs(1, 20, 1, 2, 16, 16, torch.float32)
        k, v = torch.cat([k, k[:, :9]], 1), torch.cat([v, v[:, :9]], 1)
        cu, kw = _cu([5, 15]), dict(q_offset=0, cu_seqlens_k=_cu([8, 21]))
    else:
        q, k, v = _full_inputs(1, 29, 1, 2, 16, 16, torch.float32)
        q, cu, kw = q[:, 9:].contiguous(), None, dict(q_offset=9)
    torch.library.opcheck(win._window_fwd_op, (q, k, v, 6, 0.25, cu), kw)
    o, lse = win._window_fwd_op(q, k, v, 6, 0.25, cu, **kw)
    torch.library.opcheck(win._window_bwd_op, (q, k, v, o, lse, torch.randn_like(o), 6, 0.25, cu), kw)
    xs = (torch.randn_like(o), torch.randn_like(o), torch.rand_like(lse), torch.rand_like(lse), torch.rand_like(lse))
    torch.library.opcheck(win._window_fwd_gated_op, (q, k, v, 6, 0.25, cu) + xs, kw)
