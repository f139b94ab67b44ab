"""Diagnostics on one GPU that the benchmark does not give: where the time of the selected
branch goes, and how exact tensor-core products are (for the selection tie tolerance).

Usage (repository root, on the GPU machine):
    PYTHONPATH=src python3 benchmarks/probe.py [--T 65536] [--parts dot selected]

``dot``: a Triton ``tl.dot`` of bf16 tiles with float32 accumulation against float64 and against
float32 FMA products (torch, TF32 off), errors relative to ``sum |a_i b_i|`` (the scale of any
summation-order error). ``selected``: the selected-attention forward and the pieces of its
backward (reverse index, dQ kernel, dK/dV kernel, reduce) timed one by one on the benchmark's
inputs (B=1, HQ=64, H=4, D=128, bf16, blocks of 64, 16 selected, selections from the kernels).
"""

from __future__ import annotations

import argparse
import datetime

import torch
import triton
import triton.language as tl

from nsa.ops import compressed_attention, select_blocks
from nsa.ops import selected as SL
from nsa.ops import window as WI
from nsa.ops import triton_utils as TU
from nsa.ops.utils import num_compressed, uniform_cu_seqlens

DEV = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: a dry run under TRITON_INTERPRET=1


@triton.jit
def _dot_kernel(a, b, c, M: tl.constexpr, N: tl.constexpr, K: tl.constexpr):
    o_m, o_n, o_k = tl.arange(0, M), tl.arange(0, N), tl.arange(0, K)
    x = tl.load(a + o_m[:, None] * K + o_k[None, :])
    y = tl.load(b + o_k[:, None] * N + o_n[None, :])
    tl.store(c + o_m[:, None] * N + o_n[None, :], tl.dot(x, y))


def probe_dot():
    M = N = 64
    for K in (64, 128, 256):
        worst, worst32 = 0.0, 0.0
        for seed in range(20):
            g = torch.Generator(device=DEV).manual_seed(seed)
            a = torch.randn(M, K, device=DEV, generator=g).bfloat16()
            b = torch.randn(K, N, device=DEV, generator=g).bfloat16()
            c = torch.empty(M, N, device=DEV, dtype=torch.float32)
            _dot_kernel[(1,)](a, b, c, M=M, N=N, K=K)
            exact = a.double() @ b.double()
            absum = a.double().abs() @ b.double().abs()
            torch.backends.cuda.matmul.allow_tf32 = False
            c32 = (a.float() @ b.float()).double()
            worst = max(worst, ((c.double() - exact).abs() / absum).max().item())
            worst32 = max(worst32, ((c32 - exact).abs() / absum).max().item())
        print(f"dot K={K}: max |err| / sum|a b|: tl.dot bf16->fp32 {worst:.2e}   torch fp32 FMA {worst32:.2e}   "
              f"(fp32 eps {2 ** -24:.2e})", flush=True)


def _ms(fn, reps=20):
    fn()
    if DEV == "cpu":
        return float("nan")
    torch.cuda.synchronize()
    return triton.testing.do_bench(fn, warmup=5, rep=reps * 5, return_mode="median")


def _benchmark_inputs(T, smooth=0):
    """The benchmark's selected-branch inputs at length T (B=1, HQ=64, H=4, D=128, bf16, blocks of
    64, 16 selected; selections from the kernels on random q and compressed keys): q, k, v, do,
    block indices. ``smooth`` > 0: q as ``nsa bench --smooth-queries smooth`` makes it."""
    HQ, H, D, KS, ST, BS, S = 64, 4, 128, 32, 16, 64, 16
    g = torch.Generator(device=DEV).manual_seed(0)
    Tc = num_compressed(T, KS, ST)
    if smooth:
        from nsa.bench.harness import _smooth_randn
        q = _smooth_randn(g, DEV, torch.bfloat16, 1, T, HQ, D, smooth)
    else:
        q = torch.randn(1, T, HQ, D, device=DEV, generator=g).bfloat16()
    kc = torch.randn(1, Tc, H, D, device=DEV, generator=g).bfloat16()
    vc = torch.randn(1, Tc, H, D, device=DEV, generator=g).bfloat16()
    k = torch.randn(1, T, H, D, device=DEV, generator=g).bfloat16()
    v = torch.randn(1, T, H, D, device=DEV, generator=g).bfloat16()
    do = torch.randn(1, T, HQ, D, device=DEV, generator=g).bfloat16()
    _, lse_c = compressed_attention(q, kc, vc, KS, ST, backend="triton")
    idx = select_blocks(q, kc, lse_c, KS, ST, BS, S, 1, 2, backend="triton")
    return q, k, v, do, idx


def probe_selected(T, sweep=False):
    HQ, H, D, KS, ST, BS, S = 64, 4, 128, 32, 16, 64, 16
    q, k, v, do, idx = _benchmark_inputs(T)
    # how much neighbouring positions share: distinct blocks per tile of 4 / 16 / 64 positions
    flat = idx[0].permute(1, 0, 2)  # [H, T, S]
    for tile in (4, 16, 64):
        x = flat[:, : T // tile * tile].reshape(H, T // tile, tile * S).sort(-1).values
        distinct = ((x[..., 1:] != x[..., :-1]) & (x[..., 1:] >= 0)).sum(-1) + (x[..., 0] >= 0)
        print(f"selections: tile of {tile:2d} positions lists {distinct.float().mean().item():6.1f} distinct "
              f"blocks (of {tile * S} entries)", flush=True)
    N = T
    cu = uniform_cu_seqlens(1, T, q.device)
    scale = D ** -0.5
    cfg = SL._tiles(HQ // H, BS, D, D, q.dtype)
    chunks = SL._chunk_table(cu, N, cfg.BT)
    blocks = SL._chunk_table(cu, N, BS)
    qp, kp, vp = q.view(N, HQ, D), k.view(N, H, D), v.view(N, H, D)
    ip = idx.view(N, H, S).contiguous()
    o, lse = SL._launch_fwd(qp, kp, vp, ip, BS, scale, cu, chunks, cfg)
    t_fwd = _ms(lambda: SL._launch_fwd(qp, kp, vp, ip, BS, scale, cu, chunks, cfg))
    t_bwd = _ms(lambda: SL._launch_bwd(qp, kp, vp, o, lse, do.view(N, HQ, D), ip, BS, scale, cu, chunks,
                                       blocks, cfg))
    t_rev = _ms(lambda: SL._reverse_index(ip, cu, blocks, BS))
    offsets, qlist, _ = SL._reverse_index(ip, cu, blocks, BS)
    t_seg = _ms(lambda: SL._segments(offsets, N * H * S, SL.KV_SEGMENT))
    dq = torch.empty_like(qp)
    delta = torch.empty(N, HQ, device=DEV)
    common = dict(HQ=HQ, H=H, G=HQ // H, BS=BS, DK=D, DV=D, BDK=D, BDV=D, **SL.dot_args(q.dtype))

    def dq_kernel(stages=SL.GATHER_STAGES, warps=cfg.warps):
        SL.selected_bwd_dq_kernel[(chunks.shape[0], H)](
            qp, kp, vp, o, lse, do.view(N, HQ, D), dq, delta, ip, cu, None, chunks, scale,
            S=S, SP=S, BK=cfg.BK_DQ, NKS=cfg.NKS_DQ, BT=cfg.BT, BR=cfg.BR, STAGES=stages, HAS_DELTA=False, num_warps=warps,
            num_stages=stages, **common)

    t_dq = _ms(dq_kernel)
    if sweep:
        base = _ms(lambda: SL._launch_bwd(qp, kp, vp, o, lse, do.view(N, HQ, D), ip, BS, scale, cu, chunks,
                                          blocks, cfg))
        # (rows, warps, stages, keys per program): the default spills at sm_90a; keys 32 (two programs
        # per block) with 1 stage, or 32 rows, do not (compile audit 2026-11-28)
        for rows, w, st, bk in ((64, 4, 2, 64), (64, 4, 1, 32), (32, 4, 2, 32), (64, 4, 2, 32), (64, 4, 1, 64),
                                (128, 4, 1, 64), (32, 4, 2, 64)):
            bq = max(1, rows // (HQ // H))
            c2 = cfg._replace(BQ=bq, BRQ=bq * (HQ // H), warps_kv=w, stages_kv=st, BK_KV=bk, NKS_KV=BS // bk)
            try:
                t = _ms(lambda: SL._launch_bwd(qp, kp, vp, o, lse, do.view(N, HQ, D), ip, BS, scale, cu, chunks,
                                               blocks, c2))
                print(f"dK/dV rows {rows} warps {w} stages {st} keys {bk}: whole backward {t:.2f} ms "
                      f"(default {base:.2f})", flush=True)
            except Exception as e:
                print(f"dK/dV rows {rows} warps {w} stages {st} keys {bk}: failed {type(e).__name__}", flush=True)
    print(f"selected T={T}: fwd {t_fwd:.2f} ms; bwd {t_bwd:.2f} ms = reverse index {t_rev:.2f} + segments "
          f"{t_seg:.2f} + dQ kernel {t_dq:.2f} + dK/dV and reduce (rest {t_bwd - t_rev - t_seg - t_dq:.2f})",
          flush=True)
    counts = (offsets[1:] - offsets[:-1]).float()
    print(f"reverse index: {int(offsets[-1])} entries, bucket sizes mean {counts.mean().item():.0f} "
          f"max {counts.max().item():.0f}", flush=True)


def random_selection(T, H, S, BS, gen):
    """int32 ``[1, T, H, S]``: blocks 0, t // BS and t // BS - 1 forced, the rest drawn uniformly
    among the other causal blocks (distinct), ascending then -1 (the benchmark's kind of input)."""
    return local_selection(T, H, S, BS, -(-T // BS) + 1, gen)


def probe_fwd_modes(Ts):
    """Gather vs scatter forward of the selected branch (random causal selections), G = 16, 4, 1."""
    from nsa.ops.selected import _selected_fwd_op
    D, BS, S = 128, 64, 16
    for HQ, H in ((64, 4), (16, 4), (4, 4)):
        for T in Ts:
            g = torch.Generator(device=DEV).manual_seed(T)
            q = torch.randn(1, T, HQ, D, device=DEV, generator=g).bfloat16()
            k = torch.randn(1, T, H, D, device=DEV, generator=g).bfloat16()
            v = torch.randn(1, T, H, D, device=DEV, generator=g).bfloat16()
            idx = random_selection(T, H, S, BS, g)
            res = {}
            for mode in ("gather", "scatter"):
                SL.FWD_MODE = mode
                res[mode] = (_ms(lambda: _selected_fwd_op(q, k, v, idx, BS, D ** -0.5, None)),
                             _selected_fwd_op(q, k, v, idx, BS, D ** -0.5, None))
            SL.FWD_MODE = "auto"
            (tg, (og, lg)), (ts, (os_, ls)) = res["gather"], res["scatter"]
            err = ((os_.float() - og.float()).norm() / og.float().norm()).item()
            lerr = (ls - lg).abs().max().item()
            flop = 4 * T * HQ * D * min(S * BS, T)  # upper bound on work (keys visible <= S * BS)
            print(f"fwd G={HQ // H:2d} HQ={HQ} T={T:6d}: gather {tg:7.2f} ms  scatter {ts:7.2f} ms  "
                  f"(x{tg / ts:4.2f}; {flop / ts * 1e-9:5.0f} TFLOP/s bound)  |o diff| {err:.1e}  |lse diff| {lerr:.1e}",
                  flush=True)
            del q, k, v, idx, res
            torch.cuda.empty_cache()


def probe_dq_modes(Ts):
    """Gather vs scatter dQ (whole selected backward) on random causal selections, G = 16, 4, 1."""
    from nsa.ops.selected import _selected_bwd_op, _selected_fwd_op
    D, BS, S = 128, 64, 16
    for HQ, H in ((64, 4), (16, 4), (4, 4)):
        for T in Ts:
            g = torch.Generator(device=DEV).manual_seed(T)
            q, do = (torch.randn(1, T, HQ, D, device=DEV, generator=g).bfloat16() for _ in range(2))
            k, v = (torch.randn(1, T, H, D, device=DEV, generator=g).bfloat16() for _ in range(2))
            idx = random_selection(T, H, S, BS, g)
            o, lse = _selected_fwd_op(q, k, v, idx, BS, D ** -0.5, None)
            res = {}
            for mode in ("gather", "scatter"):
                SL.DQ_MODE = mode
                res[mode] = (_ms(lambda: _selected_bwd_op(q, k, v, o, lse, do, idx, BS, D ** -0.5, None)),
                             _selected_bwd_op(q, k, v, o, lse, do, idx, BS, D ** -0.5, None)[0])
            SL.DQ_MODE = "auto"
            (tg, dg), (ts, ds) = res["gather"], res["scatter"]
            err = ((ds.float() - dg.float()).norm() / dg.float().norm()).item()
            print(f"bwd G={HQ // H:2d} HQ={HQ} T={T:6d}: dQ gather {tg:7.2f} ms  dQ scatter {ts:7.2f} ms "
                  f"(whole backward; x{tg / ts:4.2f})  |dq diff| {err:.1e}", flush=True)
            del q, k, v, do, idx, o, lse, res
            torch.cuda.empty_cache() if DEV == "cuda" else None


def probe_gates(Ts):
    """The whole nsa() backward with the gates applied inside the branch kernels (nsa.ops.fused)
    against the composed path (one autograd node per branch and one for the gates), paper shape."""
    from nsa.ops import api, nsa
    HQ, H, D, KS, ST = 64, 4, 128, 32, 16
    for T in Ts:
        g = torch.Generator(device=DEV).manual_seed(T)
        Tc = num_compressed(T, KS, ST)
        mk = lambda *s: torch.randn(*s, device=DEV, generator=g).bfloat16().requires_grad_(True)  # noqa: E731
        x = [mk(1, T, HQ, D), mk(1, Tc, H, D), mk(1, Tc, H, D)] + [mk(1, T, H, D) for _ in range(4)]
        x += [torch.rand(1, T, HQ, device=DEV, generator=g).bfloat16().requires_grad_(True) for _ in range(3)]
        do = torch.randn(1, T, HQ, D, device=DEV, generator=g).bfloat16()
        res = {}
        for fused in (True, False):
            api.FUSED_GATES = fused
            o = nsa(*x, backend="triton")
            fwd = _ms(lambda: nsa(*x, backend="triton"), reps=5)
            bwd = _ms(lambda: torch.autograd.grad(o, x, do, retain_graph=True), reps=5)
            res[fused] = (fwd, bwd, torch.autograd.grad(o, x, do, retain_graph=True))
            del o
        api.FUSED_GATES = True
        (ff, bf, gf), (fc, bc, gc) = res[True], res[False]
        err = max(((a.float() - b.float()).norm() / b.float().norm()).item() for a, b in zip(gf, gc))
        print(f"nsa T={T:6d}: fwd fused {ff:6.2f} ms composed {fc:6.2f}   bwd fused {bf:6.2f} ms composed {bc:6.2f} "
              f"(x{bc / bf:4.2f})   max rel grad diff {err:.1e}", flush=True)
        del x, do, res
        torch.cuda.empty_cache() if DEV == "cuda" else None


def _concurrent(*fns, priorities=None):
    """A callable that launches each fn on its own CUDA stream (after the current stream's work)
    and makes the current stream wait for all of them: timed by events on the current stream."""
    if DEV == "cpu":
        return lambda: [f() for f in fns]
    prios = priorities or [0] * len(fns)
    streams = [torch.cuda.Stream(priority=p) for p in prios]

    def run():
        cur = torch.cuda.current_stream()
        for s, f in zip(streams, fns):
            s.wait_stream(cur)
            with torch.cuda.stream(s):
                f()
        for s in streams:
            cur.wait_stream(s)
    return run


def probe_streams(T):
    """Do the branches overlap when launched on separate CUDA streams? Paper shape at T, each
    branch alone, serial and concurrent (both launch orders, with and without stream priorities),
    forward and backward (the fused node's branch backwards on the folded lse/delta)."""
    from nsa.ops import compressed as CM, gate as GT, selection as SE, window as WI
    HQ, H, D, KS, ST, BS, S, W = 64, 4, 128, 32, 16, 64, 16, 512
    scale = D ** -0.5
    g = torch.Generator(device=DEV).manual_seed(1)
    Tc = num_compressed(T, KS, ST)
    mk = lambda *s: torch.randn(*s, device=DEV, generator=g).bfloat16()  # noqa: E731
    q, kc, vc, k, v, kw, vw = mk(1, T, HQ, D), mk(1, Tc, H, D), mk(1, Tc, H, D), mk(1, T, H, D), mk(1, T, H, D), \
        mk(1, T, H, D), mk(1, T, H, D)
    do = mk(1, T, HQ, D)
    gs = [torch.rand(1, T, HQ, device=DEV, generator=g).bfloat16() for _ in range(3)]
    cmp = lambda: CM._fwd_op(q, kc, vc, KS, ST, scale, None)  # noqa: E731
    o_c, lse_c = cmp()
    sel = lambda: SE.select_blocks_triton(q, kc, lse_c, KS, ST, BS, S, 1, 2, scale, None)  # noqa: E731
    idx = sel()
    slc = lambda: SL._selected_fwd_op(q, k, v, idx, BS, scale, None)  # noqa: E731
    o_s, lse_s = slc()
    win = lambda: WI._window_fwd_op(q, kw, vw, W, scale, None)  # noqa: E731
    o_w, lse_w = win()

    def chain():
        o1, l1 = CM._fwd_op(q, kc, vc, KS, ST, scale, None)
        i1 = SE.select_blocks_triton(q, kc, l1, KS, ST, BS, S, 1, 2, scale, None)
        return SL._selected_fwd_op(q, k, v, i1, BS, scale, None)

    def cmp_sel():
        o1, l1 = CM._fwd_op(q, kc, vc, KS, ST, scale, None)
        return SE.select_blocks_triton(q, kc, l1, KS, ST, BS, S, 1, 2, scale, None)

    t = {name: _ms(f, reps=5) for name, f in
         (("cmp", cmp), ("select", sel), ("slc", slc), ("win", win), ("chain", chain), ("cmp+select", cmp_sel))}
    print(f"streams T={T}: alone fwd " + "  ".join(f"{n} {x:.2f}" for n, x in t.items()), flush=True)
    cases = [("cmp | slc", (cmp, slc)), ("slc | cmp", (slc, cmp)), ("win | slc", (win, slc)),
             ("cmp+select | slc", (cmp_sel, slc)), ("slc | cmp+select", (slc, cmp_sel)),
             ("chain | win", (chain, win)), ("win | chain", (win, chain))]
    for name, fns in cases:
        for prios in (None, [-1, 0], [0, -1]):
            ms = _ms(_concurrent(*fns, priorities=prios), reps=5)
            ser = _ms(lambda: [f() for f in fns], reps=5)
            print(f"  fwd {name:20s} prio {str(prios):8s}: serial {ser:6.2f} ms  concurrent {ms:6.2f} ms "
                  f"(x{ser / ms:4.2f})", flush=True)
    # backward pieces on the folded lse/delta, as the fused node runs them
    dg_c, dg_s, dg_w, lse2, delta = GT.gate_bwd_fused(do, o_c, o_s, o_w, *gs, lse_c, lse_s, lse_w)
    bc = lambda: CM.compressed_attention_bwd(q, kc, vc, o_c, lse2[0], do, None, KS, ST, scale, None,  # noqa: E731
                                             delta=delta[0])
    bs = lambda: SL._selected_bwd_op(q, k, v, o_s, lse2[1], do, idx, BS, scale, None, delta=delta[1])  # noqa: E731
    bw = lambda: WI._window_bwd_op(q, kw, vw, o_w, lse2[2], do, W, scale, None, delta=delta[2])  # noqa: E731
    tb = {name: _ms(f, reps=5) for name, f in (("cmp", bc), ("slc", bs), ("win", bw))}
    print(f"streams T={T}: alone bwd " + "  ".join(f"{n} {x:.2f}" for n, x in tb.items()), flush=True)
    for name, fns in [("cmp | slc", (bc, bs)), ("slc | cmp", (bs, bc)), ("cmp | slc | win", (bc, bs, bw)),
                      ("slc | cmp | win", (bs, bc, bw)), ("win | slc", (bw, bs)), ("cmp | win", (bc, bw))]:
        for prios in (None, [-1] + [0] * (len(fns) - 1)):
            ms = _ms(_concurrent(*fns, priorities=prios), reps=5)
            ser = _ms(lambda: [f() for f in fns], reps=5)
            print(f"  bwd {name:20s} prio {str(prios):12s}: serial {ser:6.2f} ms  concurrent {ms:6.2f} ms "
                  f"(x{ser / ms:4.2f})", flush=True)
    del q, kc, vc, k, v, kw, vw, do
    torch.cuda.empty_cache() if DEV == "cuda" else None


def probe_checks(T):
    """The host-side validation of block_indices (public selected_attention): the Triton pass
    against the torch ops (sort of every row), random unsorted selections at T, H=4, S=16."""
    from nsa.ops import checks
    g = torch.Generator(device=DEV).manual_seed(2)
    idx = random_selection(T, 4, 16, 64, g)
    tk = _ms(lambda: checks._block_indices_flags(idx, 64, None))
    tt = _ms(lambda: checks._block_indices_flags_torch(idx, 64, None))
    shuf = idx[..., torch.randperm(16, device=DEV)].contiguous()  # rows not in ascending form
    tk2 = _ms(lambda: checks._block_indices_flags(shuf, 64, None))
    tt2 = _ms(lambda: checks._block_indices_flags_torch(shuf, 64, None))
    print(f"checks T={T}: block_indices ascending rows: Triton pass {tk:.3f} ms  torch ops {tt:.3f} ms; "
          f"shuffled rows: Triton {tk2:.3f} ms  torch (sort) {tt2:.3f} ms", flush=True)


def probe_slc_tma(T):
    """The selected forward (gather, G=16) with K/V sub-tiles through TMA tensor descriptors
    (nsa.ops.selected.FWD_TMA) against the pointer loads, on the benchmark's inputs (as in
    probe_selected: B=1, HQ=64, H=4, D=128, bf16, blocks of 64, 16 selected, selections from the
    kernels); then both at (keys per sub-tile, warps, stages) settings through _launch_fwd. Prints
    ms and the max |difference| of o and lse against the default pointer path."""
    HQ, H, D, BS, S = 64, 4, 128, 64, 16
    q, k, v, _, idx = _benchmark_inputs(T)
    scale = D ** -0.5
    N = T
    cu = uniform_cu_seqlens(1, T, q.device)
    cfg = SL._tiles(HQ // H, BS, D, D, q.dtype)
    chunks = SL._chunk_table(cu, N, cfg.BT)
    qp, kp, vp = q.view(N, HQ, D), k.view(N, H, D), v.view(N, H, D)
    ip = idx.view(N, H, S).contiguous()
    saved = SL.FWD_MODE, SL.FWD_TMA, SL.GATHER_STAGES
    SL.FWD_MODE = "gather"
    SL.FWD_TMA = False
    o0, l0 = SL._selected_fwd_op(q, k, v, idx, BS, scale, None)
    fin = torch.isfinite(l0)

    def one(name, fn, tma):
        try:
            SL.FWD_TMA = tma
            on = SL._fwd_tma(kp, vp, cfg)
            if on != tma:
                print(f"slctma T={T} {name:44s}: TMA={tma} does not apply here (resolved {on})", flush=True)
                return
            o, lse = fn()
            do_ = (o.float().view_as(o0) - o0.float()).abs().max().item()
            lse = lse.view_as(l0)
            same = torch.equal(torch.isfinite(lse), fin)
            dl = (lse[fin] - l0[fin]).abs().max().item() if fin.any() else 0.0
            ms = _ms(fn)
            print(f"slctma T={T} {name:44s}: {ms:7.2f} ms   max|do| {do_:.2e}  max|dlse| {dl:.2e}"
                  f"{'' if same else '  (-inf lse rows differ!)'}", flush=True)
        except Exception as e:  # noqa: BLE001
            msg = str(e).strip().splitlines()
            print(f"slctma T={T} {name:44s}: failed {type(e).__name__}: {msg[0][:200] if msg else ''}", flush=True)

    try:
        print(f"slctma T={T}: default tiles BK={cfg.BK} NKS={cfg.NKS} warps={cfg.warps} "
              f"stages={SL.GATHER_STAGES}", flush=True)
        for tma in (False, True):
            one(f"_selected_fwd_op tma={int(tma)}", lambda: SL._selected_fwd_op(q, k, v, idx, BS, scale, None), tma)
        settings = [(bk, w, st) for bk in (64, 32) for w in (4, 8) for st in (2, 3, 4)]
        if DEV == "cpu":
            settings = settings[:1] + [(32, 4, 2)]
        for bk, w, st in settings:
            c2 = cfg._replace(BK=bk, NKS=triton.cdiv(BS, bk), warps=w)
            SL.GATHER_STAGES = st
            for tma in (False, True):
                one(f"_launch_fwd BK={bk} warps={w} stages={st} tma={int(tma)}",
                    lambda: SL._launch_fwd(qp, kp, vp, ip, BS, scale, cu, chunks, c2), tma)
    finally:
        SL.FWD_MODE, SL.FWD_TMA, SL.GATHER_STAGES = saved
    del q, k, v, idx, o0, l0
    torch.cuda.empty_cache() if DEV == "cuda" else None


def probe_public_op(T):
    """The public selected_attention (argument checks and the block_indices check, one host read)
    against its kernel path alone, G = 16 and G = 1, with the benchmark's kind of random
    selections. Timed back to back, the public op's host read leaves the GPU idle while the next
    call's host code runs: the difference is that host time."""
    from nsa.ops import selected_attention
    H, D = 4, 128
    g = torch.Generator(device=DEV).manual_seed(3)
    idx = random_selection(T, H, 16, 64, g)
    for HQ in (64, 4):
        q = torch.randn(1, T, HQ, D, device=DEV, generator=g).bfloat16()
        k = torch.randn(1, T, H, D, device=DEV, generator=g).bfloat16()
        v = torch.randn(1, T, H, D, device=DEV, generator=g).bfloat16()
        t_pub = _ms(lambda: selected_attention(q, k, v, idx, 64, backend="triton"))
        t_op = _ms(lambda: SL._selected_fwd_op(q, k, v, idx, 64, D ** -0.5, None))
        print(f"publicop T={T} G={HQ // H}: public selected_attention fwd {t_pub:.3f} ms, kernels alone {t_op:.3f} ms",
              flush=True)


def local_selection(T, H, S, BS, span, gen, run=1):
    """Like :func:`random_selection`, with the random blocks drawn among the ``span`` latest causal
    blocks only (the K/V a KV head's queries read then spans ``span`` blocks, not the whole past),
    and positions in aligned runs of ``run`` sharing the run's first position's list (neighbouring
    queries that agree, as in trained models; still causal for the later positions)."""
    NB = -(-T // BS)
    out = torch.empty(1, T, H, S, dtype=torch.int32, device=DEV)
    j = torch.arange(NB, device=DEV)
    for a in range(0, T, 8192):
        b = min(T, a + 8192)
        tb = (torch.arange(a, b, device=DEV) // BS).view(-1, 1, 1)
        score = torch.rand(b - a, H, NB, device=DEV, generator=gen)
        score = torch.where(j > tb - span, score, -1.0)
        score = torch.where((j == 0) | (j == tb) | (j == tb - 1), 2.0, score)
        score = torch.where(j <= tb, score, -1.0)
        top = score.topk(min(S, NB), -1)
        idx = torch.where(top.values >= 0, top.indices, NB)
        idx = torch.cat([idx, idx.new_full((*idx.shape[:-1], S - idx.shape[-1]), NB)], -1).sort(-1).values
        out[0, a:b] = torch.where(idx == NB, -1, idx).to(torch.int32)
    if run > 1:
        out = out[:, torch.arange(T, device=DEV) // run * run]
    return out.contiguous()


def probe_locality(T):
    """What bounds the selected forward at G = 16: the same kernel on selections that differ only
    in where their random blocks lie. If the time falls when the blocks a KV head's queries read
    fit in L2 (span of recent blocks), the query-centric kernel waits on DRAM; if it stays, on the
    L2 -> SM path. Runs of positions sharing one list measure what correlated selections gain."""
    from nsa.ops.selected import _selected_fwd_op
    HQ, H, D, BS, S = 64, 4, 128, 64, 16
    g = torch.Generator(device=DEV).manual_seed(5)
    q, k, v = [torch.randn(1, T, h, D, device=DEV, generator=g).bfloat16() for h in (HQ, H, H)]
    kv_bytes = T * H * S * BS * D * 2 * 2  # K and V of every listed block, per (position, KV head)
    cases = [("benchmark (select_blocks on random q, k)", None)]
    cases += [(f"random, whole past{'' if r == 1 else f', runs of {r} positions share a list'}", (10 ** 9, r))
              for r in (1, 4, 16, 64)]
    cases += [(f"random among the latest {sp} blocks ({sp * BS * D * 4 / 2 ** 20:.0f} MiB of K/V per KV head)", (sp, 1))
              for sp in (32, 128, 512)]
    for name, arg in cases:
        idx = _benchmark_inputs(T)[4] if arg is None else local_selection(T, H, S, BS, arg[0], g, arg[1])
        t = _ms(lambda: _selected_fwd_op(q, k, v, idx, BS, D ** -0.5, None))
        print(f"locality T={T}: {name}: {t:.2f} ms, listed K/V {kv_bytes / t * 1e-9:.1f} TB/s", flush=True)


def probe_launches(T):
    """One launch of each main kernel at the paper shapes (for an external profiler such as
    ``ncu -k regex:...``): compressed forward and selection (building the benchmark's selections),
    window forward and backward, selected forward, compressed backward, and the selected forward
    and backward through the public op at G = 16 and G = 1."""
    from nsa.ops import window as WI
    from nsa.ops.selected import _selected_fwd_op
    q, k, v, do, idx = _benchmark_inputs(T)
    D = q.shape[-1]
    o, lse = WI._launch_fwd(q, k, v, 512, D ** -0.5, None)
    WI._launch_bwd(q, k, v, o, lse, do, 512, D ** -0.5, None)
    _selected_fwd_op(q, k, v, idx, 64, D ** -0.5, None)
    # compressed attention forward and backward (compressed K/V of the paper's 32/16 compression)
    Tc = num_compressed(T, 32, 16)
    gen = torch.Generator(device=DEV).manual_seed(7)
    qg, kc, vc = (x.requires_grad_() for x in (q.detach().clone(),
                                                 torch.randn(1, Tc, 4, D, device=DEV, generator=gen).bfloat16(),
                                                 torch.randn(1, Tc, 4, D, device=DEV, generator=gen).bfloat16()))
    compressed_attention(qg, kc, vc, 32, 16, backend="triton")[0].backward(do)
    from nsa.ops import selected_attention
    for HQ in (64, 4):  # the selected backward at G = 16 (gather dQ) and G = 1 (scatter dQ)
        qg, kg, vg = (x.detach().clone().requires_grad_() for x in (q[:, :, :HQ], k, v))
        selected_attention(qg, kg, vg, idx, 64, backend="triton").backward(do[:, :, :HQ])
    torch.cuda.synchronize()
    print(f"launches T={T}: done", flush=True)


def shared_selection(T, H, S, BS, n_shared, gen, run=4):
    """int32 ``[1, T, H, S]``: aligned runs of ``run`` positions list ``n_shared`` common blocks
    (blocks 0, t // BS and t // BS - 1 among them, the rest random causal ones) and each position
    ``S - n_shared`` other random causal blocks of its own, in ascending order."""
    NB = -(-T // BS)
    out = torch.empty(1, T, H, S, dtype=torch.int32, device=DEV)
    j = torch.arange(NB, device=DEV)
    for a in range(0, T, 8192):
        b = min(T, a + 8192)
        t = torch.arange(a, b, device=DEV)
        tb = (t // run * run // BS).view(-1, 1, 1)  # the run's first position's block
        g_score = torch.rand((b - a) // run, H, NB, device=DEV, generator=gen).repeat_interleave(run, 0)
        g_score = torch.where((j == 0) | (j == tb) | (j == tb - 1), 2.0, g_score)
        g_score = torch.where(j <= tb, g_score, -1.0)
        common = torch.zeros(b - a, H, NB, dtype=torch.bool, device=DEV)
        top = g_score.topk(min(n_shared, NB), -1)
        common.scatter_(-1, top.indices, top.values >= 0)
        own = torch.rand(b - a, H, NB, device=DEV, generator=gen)
        own = torch.where(common, 3.0, own)
        own = torch.where(j <= (t // BS).view(-1, 1, 1), own, -1.0)
        sel = own.topk(min(S, NB), -1)
        idx = torch.where(sel.values >= 0, sel.indices, NB)
        idx = torch.cat([idx, idx.new_full((*idx.shape[:-1], S - idx.shape[-1]), NB)], -1).sort(-1).values
        out[0, a:b] = torch.where(idx == NB, -1, idx).to(torch.int32)
    return out.contiguous()


def probe_share(T):
    """The gather forward at G = 16: one position per program against programs of 4 positions
    that load the blocks all of them list once (the common kernel), on the benchmark's selections
    and on selections whose aligned runs of 4 positions share k of their 16 blocks."""
    HQ, H, D, BS, S = 64, 4, 128, 64, 16
    q, k, v, do, idx = _benchmark_inputs(T)
    N = T
    cu = uniform_cu_seqlens(1, T, q.device)
    qp, kp, vp = q.view(N, HQ, D), k.view(N, H, D), v.view(N, H, D)
    g = torch.Generator(device=DEV).manual_seed(5)
    cases = [("benchmark", idx.view(N, H, S).contiguous())]
    cases += [(f"{n} of 16 shared", shared_selection(T, H, S, BS, n, g).view(N, H, S)) for n in (4, 6, 8, 10, 12, 16)]
    # positions per program: the one-position kernel alone; the common kernel for shared blocks
    share0 = SL.FWD_SHARE
    for name, ip in cases:
        base = None
        for share in (1, 4):
            SL.FWD_SHARE = share
            cfg = SL._tiles(HQ // H, BS, D, D, q.dtype)
            chunks = SL._chunk_table(cu, N, SL.fwd_positions(cfg))
            label = f"P={cfg.SHARE}"
            try:
                o, lse = SL._launch_fwd(qp, kp, vp, ip, BS, D ** -0.5, cu, chunks, cfg)
                if base is None:
                    base = (o, lse)
                err = (o.float() - base[0].float()).abs().max().item()
                t = _ms(lambda: SL._launch_fwd(qp, kp, vp, ip, BS, D ** -0.5, cu, chunks, cfg))
                print(f"share T={T} {name}: {label}: {t:.2f} ms  max|o - o(P=1)| {err:.2e}", flush=True)
            except Exception as e:  # a config that does not compile or fit
                print(f"share T={T} {name}: {label}: failed {type(e).__name__}: {str(e)[:200]}", flush=True)
    SL.FWD_SHARE = share0


def probe_wide(T):
    """The selected forward (G = 16) at the paper's head dims Dk/Dv = 192/128 on the benchmark's
    selections, the default path (programs of 2 positions planned, the common kernel for shared
    blocks): q . k as two tiles (128 + 64) or one padded tile (triton_utils.SPLIT_HEAD_DIMS), K
    through pointer loads (FWD_TMA "auto" for these dims) or TMA for the first tile. (Run 24
    swept sub-tiles, stages and TMA with one position per program and one padded tile.)"""
    HQ, H, BS, S, DK, DV = 64, 4, 64, 16, 192, 128
    idx = _benchmark_inputs(T)[4].view(T, H, S).contiguous()
    g = torch.Generator(device=DEV).manual_seed(9)
    q, k, v = (torch.randn(T, h, d, device=DEV, generator=g).bfloat16() for h, d in ((HQ, DK), (H, DK), (H, DV)))
    cu = uniform_cu_seqlens(1, T, q.device)
    cfg = SL._tiles(HQ // H, BS, DK, DV, q.dtype)
    chunks = SL._chunk_table(cu, T, SL.fwd_positions(cfg))
    tma0, split0 = SL.FWD_TMA, TU.SPLIT_HEAD_DIMS
    base = None
    for split, tma in ((False, "auto"), (True, "auto"), (True, True)):
        SL.FWD_TMA, TU.SPLIT_HEAD_DIMS = tma, split
        label = f"P={cfg.SHARE} {'two tiles' if split else 'one padded tile'} {'tma' if tma is True else 'pointer'}"
        try:
            o, _ = SL._launch_fwd(q, k, v, idx, BS, DK ** -0.5, cu, chunks, cfg)
            base = o if base is None else base
            t = _ms(lambda: SL._launch_fwd(q, k, v, idx, BS, DK ** -0.5, cu, chunks, cfg))
            print(f"wide T={T} 192/128 selected fwd {label}: {t:.2f} ms  max|o - o(first)| "
                  f"{(o.float() - base.float()).abs().max().item():.2e}", flush=True)
        except Exception as e:
            print(f"wide T={T} 192/128 selected fwd {label}: failed {type(e).__name__}: {str(e)[:200]}", flush=True)
    SL.FWD_TMA, TU.SPLIT_HEAD_DIMS = tma0, split0


def probe_split_head(T):
    """Compressed attention forward and selection at Dk/Dv = 192/128 (B=1, HQ=64, H=4, 32/16/64,
    16 selected): q . k over the head dim as two tiles (128 + 64) against one padded tile of 256
    (triton_utils.SPLIT_HEAD_DIMS), and at D = 128 (one tile either way) for reference."""
    HQ, H, KS, ST, BS, S = 64, 4, 32, 16, 64, 16
    g = torch.Generator(device=DEV).manual_seed(11)
    Tc = num_compressed(T, KS, ST)
    split0 = TU.SPLIT_HEAD_DIMS
    for DK, DV in ((192, 128), (128, 128)):
        q = torch.randn(1, T, HQ, DK, device=DEV, generator=g).bfloat16()
        kc = torch.randn(1, Tc, H, DK, device=DEV, generator=g).bfloat16()
        vc = torch.randn(1, Tc, H, DV, device=DEV, generator=g).bfloat16()
        outs = {}
        for split in (False, True):
            TU.SPLIT_HEAD_DIMS = split
            o, lse = compressed_attention(q, kc, vc, KS, ST, backend="triton")
            idx = select_blocks(q, kc, lse, KS, ST, BS, S, 1, 2, backend="triton")
            t_cmp = _ms(lambda: compressed_attention(q, kc, vc, KS, ST, backend="triton"))
            t_sel = _ms(lambda: select_blocks(q, kc, lse, KS, ST, BS, S, 1, 2, backend="triton"))
            outs[split] = (o, lse, idx)
            print(f"splithead T={T} {DK}/{DV} {'two tiles' if split else 'one padded tile'}: compressed fwd "
                  f"{t_cmp:.2f} ms, selection {t_sel:.2f} ms", flush=True)
        (o0, l0, i0), (o1, l1, i1) = outs[False], outs[True]
        fin = torch.isfinite(l0)
        print(f"splithead T={T} {DK}/{DV}: max|o diff| {(o0.float() - o1.float()).abs().max().item():.2e}, "
              f"max|lse diff| {(l0[fin] - l1[fin]).abs().max().item():.2e}, "
              f"selections differing {(i0 != i1).any(-1).float().mean().item():.2e} of rows", flush=True)
    TU.SPLIT_HEAD_DIMS = split0


def _time_grads(label, run, base):
    """Times ``run`` (a callable returning a tuple of tensors, e.g. gradients) and prints ``label``,
    its time and the largest relative difference (norm) of its results from ``base``'s (None: its
    results become the base). A config that does not compile or fit is printed, not raised.
    Returns the base."""
    try:
        out = run()
        base = out if base is None else base
        err = max(((a.float() - b.float()).norm() / b.float().norm()).item() for a, b in zip(out, base))
        print(f"{label}: {_ms(run):.2f} ms  max rel diff vs first {err:.1e}", flush=True)
    except Exception as e:
        print(f"{label}: failed {type(e).__name__}: {str(e)[:200]}", flush=True)
    return base


def probe_wide_bwd(T):
    """The selected backward (G = 16, gather dQ) at Dk/Dv = 192/128 on the benchmark's selections:
    q . k, dQ and dK over two head-column tiles (128 + 64) or one padded tile of 256
    (triton_utils.SPLIT_HEAD_DIMS), at the default tiles and at wider ones the split may afford
    (64 keys per dQ sub-tile; dK/dV walks of 64 rows); and at D = 128 (one tile either way)."""
    HQ, H, BS, S = 64, 4, 64, 16
    G = HQ // H
    idx = _benchmark_inputs(T)[4].view(T, H, S).contiguous()
    cu = uniform_cu_seqlens(1, T, idx.device)
    blocks = SL._chunk_table(cu, T, BS)
    split0 = TU.SPLIT_HEAD_DIMS
    for DK, DV in ((192, 128), (128, 128)):
        g = torch.Generator(device=DEV).manual_seed(9)
        q, k, v, do = (torch.randn(T, h, d, device=DEV, generator=g).bfloat16()
                       for h, d in ((HQ, DK), (H, DK), (H, DV), (HQ, DV)))
        scale = DK ** -0.5
        cfg = SL._tiles(G, BS, DK, DV, q.dtype)
        chunks = SL._chunk_table(cu, T, SL.fwd_positions(cfg))
        o, lse = SL._launch_fwd(q, k, v, idx, BS, scale, cu, chunks, cfg)
        dq_chunks = SL._chunk_table(cu, T, cfg.BT)
        bq64 = max(1, 64 // G)
        variants = [("default tiles", cfg)]
        if DK == 192:
            variants += [("dQ 64 keys", cfg._replace(BK_DQ=64, NKS_DQ=BS // 64)),
                         ("dK/dV 64 rows 8 warps", cfg._replace(BQ=bq64, BRQ=bq64 * G)),
                         ("dK/dV 64 rows 4 warps", cfg._replace(BQ=bq64, BRQ=bq64 * G, warps_kv=4)),
                         ("dQ 64 keys, dK/dV 64 rows 4 warps", cfg._replace(BK_DQ=64, NKS_DQ=BS // 64, BQ=bq64,
                                                                            BRQ=bq64 * G, warps_kv=4))]
        base = None
        for split in (False, True) if DK == 192 else (True,):
            TU.SPLIT_HEAD_DIMS = split
            for name, c in variants if split else variants[:1]:
                base = _time_grads(f"widebwd T={T} {DK}/{DV} {'two tiles' if split else 'one padded tile'}, {name}",
                                   lambda: SL._launch_bwd(q, k, v, o, lse, do, idx, BS, scale, cu, dq_chunks, blocks,
                                                          c), base)
        del q, k, v, do, o, lse
    # the window backward (window 512) at 192/128: split off / on at the default tiles, and on at
    # the tiles of D = 128 (dQ: 128 rows, 64 keys, 8 warps, 3 stages, TMA for the first tile;
    # dK/dV: 128 keys, 64 rows, 8 warps, 3 stages, rotated walk) and halfway ones
    DK, DV, W = 192, 128, 512
    g = torch.Generator(device=DEV).manual_seed(12)
    q, k, v, do = (torch.randn(1, T, h, d, device=DEV, generator=g).bfloat16()
                   for h, d in ((HQ, DK), (H, DK), (H, DV), (HQ, DV)))
    scale = DK ** -0.5
    o, lse = WI._launch_fwd(q, k, v, W, scale, None)
    variants = [(False, "default tiles", None, None), (True, "default tiles", None, None),
                (True, "dQ 128 rows 64 keys 8 warps 3 stages TMA", dict(rows=128, BN=64, num_warps=8, num_stages=3,
                                                                         one_loop=True, tma=True), None),
                (True, "dQ 128/64/8/2 pointer", dict(rows=128, BN=64, num_warps=8, num_stages=2), None),
                (True, "dK/dV 128 keys 64 rows 8 warps 3 stages rotated", None,
                 dict(BN=128, rows=64, num_warps=8, num_stages=3, rotate=True)),
                (True, "dK/dV 64/64/8/2 rotated", None, dict(BN=64, rows=64, num_warps=8, num_stages=2, rotate=True))]
    base = None
    for split, name, dq_cfg, kv_cfg in variants:
        TU.SPLIT_HEAD_DIMS = split
        base = _time_grads(f"widebwd T={T} window {DK}/{DV} {'two tiles' if split else 'one padded tile'}, {name}",
                           lambda: WI._launch_bwd(q, k, v, o, lse, do, W, scale, None, dq_config=dq_cfg,
                                                  dkv_config=kv_cfg), base)
    TU.SPLIT_HEAD_DIMS = split0


def probe_wide_cmp(T):
    """Compressed attention at Dk/Dv = 192/128 (B=1, HQ=64, H=4, 32/16) with Dk as two tiles: the
    forward and backward tile configs of the padded head (the defaults) against the D = 128
    ones (TMA, 3 stages) and others the split leaves room for (sm_90 compile audit: all fit)."""
    from nsa.ops import compressed as CM
    HQ, H, KS, ST, DK, DV = 64, 4, 32, 16, 192, 128
    g = torch.Generator(device=DEV).manual_seed(13)
    Tc = num_compressed(T, KS, ST)
    q, kc, vc, do = (torch.randn(1, n, h, d, device=DEV, generator=g).bfloat16()
                     for n, h, d in ((T, HQ, DK), (Tc, H, DK), (Tc, H, DV), (T, HQ, DV)))
    scale = DK ** -0.5
    o, lse = CM.compressed_attention_fwd(q, kc, vc, KS, ST, scale, None)
    for cfg in (None, dict(rows=256, BC=64, num_warps=8, num_stages=3, tma=True),
                dict(rows=128, BC=64, num_warps=8, num_stages=3, tma=True),
                dict(rows=256, BC=64, num_warps=8, num_stages=2, tma=True),
                dict(rows=128, BC=64, num_warps=4, num_stages=2, tma=True)):
        try:
            o2, _ = CM.compressed_attention_fwd(q, kc, vc, KS, ST, scale, None, config=cfg)
            err = (o2.float() - o.float()).abs().max().item()
            t = _ms(lambda: CM.compressed_attention_fwd(q, kc, vc, KS, ST, scale, None, config=cfg))
            print(f"widecmp T={T} fwd {cfg or 'default'}: {t:.2f} ms  max|o - default| {err:.1e}", flush=True)
        except Exception as e:
            print(f"widecmp T={T} fwd {cfg}: failed {type(e).__name__}: {str(e)[:200]}", flush=True)
    sms = torch.cuda.get_device_properties(0).multi_processor_count if DEV == "cuda" else 2
    seg = dict(programs=4 * sms, min_segment=256)
    base = None
    for dq_cfg, kv_cfg in ((None, None),
                           (dict(rows=128, BC=64, num_warps=8, num_stages=3, tma=True), None),
                           (dict(rows=128, BC=64, num_warps=8, num_stages=2, tma=True), None),
                           (None, dict(rows=32, BC=128, num_warps=8, num_stages=3, **seg)),
                           (None, dict(rows=32, BC=64, num_warps=8, num_stages=3, **seg)),
                           (None, dict(rows=64, BC=64, num_warps=8, num_stages=2, **seg))):
        base = _time_grads(f"widecmp T={T} bwd dQ {dq_cfg or 'default'} dK/dV {kv_cfg or 'default'}",
                           lambda: CM.compressed_attention_bwd(q, kc, vc, o, lse, do, None, KS, ST, scale, None,
                                                               dq_config=dq_cfg, dkv_config=kv_cfg), base)


def probe_slc_bwd_192(T):
    """The selected backward at Dk/Dv = 192/128 (G = 16, Dk as two tiles, gather dQ) on the
    benchmark's selections: the default tiles against other dK/dV walks (warps, rows, keys per
    program) and dQ sub-tiles."""
    HQ, H, BS, S, DK, DV = 64, 4, 64, 16, 192, 128
    G = HQ // H
    idx = _benchmark_inputs(T)[4].view(T, H, S).contiguous()
    cu = uniform_cu_seqlens(1, T, idx.device)
    blocks = SL._chunk_table(cu, T, BS)
    g = torch.Generator(device=DEV).manual_seed(9)
    q, k, v, do = (torch.randn(T, h, d, device=DEV, generator=g).bfloat16()
                   for h, d in ((HQ, DK), (H, DK), (H, DV), (HQ, DV)))
    scale = DK ** -0.5
    cfg = SL._tiles(G, BS, DK, DV, q.dtype)
    o, lse = SL._launch_fwd(q, k, v, idx, BS, scale, cu, SL._chunk_table(cu, T, SL.fwd_positions(cfg)), cfg)
    dq_chunks = SL._chunk_table(cu, T, cfg.BT)
    variants = [("default", cfg),
                ("dK/dV 8 warps", cfg._replace(warps_kv=8)),
                ("dK/dV 32 keys per program", cfg._replace(BK_KV=32, NKS_KV=BS // 32)),
                ("dK/dV 32 keys, 8 warps", cfg._replace(BK_KV=32, NKS_KV=BS // 32, warps_kv=8)),
                ("dK/dV 128 rows 8 warps 1 stage", cfg._replace(BQ=128 // G, BRQ=128, warps_kv=8, stages_kv=1)),
                ("dK/dV 1 stage", cfg._replace(stages_kv=1)),
                ("dQ 32 keys", cfg._replace(BK_DQ=32, NKS_DQ=BS // 32))]
    base = None
    for name, c in variants:
        base = _time_grads(f"slcbwd192 T={T} {name}",
                           lambda: SL._launch_bwd(q, k, v, o, lse, do, idx, BS, scale, cu, dq_chunks, blocks, c), base)


@triton.jit
def _slc_persistent_kernel(q, k, v, o, lse, idx, N, scale, HQ: tl.constexpr, H: tl.constexpr, G: tl.constexpr,
                           S: tl.constexpr, BS: tl.constexpr, BK: tl.constexpr, NKS: tl.constexpr, DK: tl.constexpr,
                           DV: tl.constexpr, BR: tl.constexpr, STAGES: tl.constexpr, DOT_PRECISION: tl.constexpr,
                           DOT_UPCAST: tl.constexpr, TMA: tl.constexpr):
    """The one-position selected forward (B = 1), persistent: programs loop over (position, head)
    in the order of the library's grid (positions fastest)."""
    for w in range(tl.program_id(0), N * H, tl.num_programs(0)):
        t0 = w % N
        i_h = w // N
        SL._one_position_fwd(q, k, v, o, lse, idx + (t0 * H + i_h) * S, 0, S, 0, N, 0, 0, t0, i_h, scale, HQ, H, G, BS, BK,
                             NKS, DK, DV, DK, DV, BR, STAGES, DOT_PRECISION, DOT_UPCAST, TMA)


@triton.jit
def _mixed_kernel(q, k, v, o, lse, idx, kw, vw, ow, lsew, chunk_w, N, NW, NTW, scale, W,
                  HQ: tl.constexpr, H: tl.constexpr, G: tl.constexpr, S: tl.constexpr, BS: tl.constexpr,
                  BK: tl.constexpr, NKS: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BR: tl.constexpr,
                  STAGES: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr, TMA: tl.constexpr,
                  R: tl.constexpr, BOTH: tl.constexpr, BT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                  WIN_PRECISION: tl.constexpr, WIN_DTYPE: tl.constexpr, WIN_TMA: tl.constexpr):
    """Window tiles and selected positions (B = 1) in one launch, so that an SM can hold both.
    BOTH: program = window tile i (BT positions) then the selected forward of those positions
    (odd programs: selected first). Else: every (R + 1)-th program is a window tile (NW of them,
    NTW per head), the others one selected position each."""
    pid = tl.program_id(0)
    if BOTH:
        i_t = pid % NTW
        i_h = pid // NTW
        if pid % 2 == 1:
            for j in range(BT):
                SL._one_position_fwd(q, k, v, o, lse, idx + ((i_t * BT + j) * H + i_h) * S, 0, S, 0, N, 0, 0, i_t * BT + j,
                                     i_h, scale, HQ, H, G, BS, BK, NKS, DK, DV, DK, DV, BR, STAGES, DOT_PRECISION,
                                     DOT_UPCAST, TMA)
        WI._window_fwd_tile(i_t, i_h, q, kw, vw, ow, lsew, ow, ow, lsew, lsew, lsew, ow, chunk_w, chunk_w, scale, N,
                            W, HQ, H, G, DK, DV, DK, DV, BT, BM, BN, False, WIN_PRECISION, WIN_DTYPE, True, WIN_TMA,
                            False, 0)
        if pid % 2 == 0:
            for j in range(BT):
                SL._one_position_fwd(q, k, v, o, lse, idx + ((i_t * BT + j) * H + i_h) * S, 0, S, 0, N, 0, 0, i_t * BT + j,
                                     i_h, scale, HQ, H, G, BS, BK, NKS, DK, DV, DK, DV, BR, STAGES, DOT_PRECISION,
                                     DOT_UPCAST, TMA)
    else:
        grp = pid // (R + 1)
        r = pid % (R + 1)
        if (grp < NW) & (r == 0):
            WI._window_fwd_tile(grp % NTW, grp // NTW, q, kw, vw, ow, lsew, ow, ow, lsew, lsew, lsew, ow, chunk_w,
                                chunk_w, scale, N, W, HQ, H, G, DK, DV, DK, DV, BT, BM, BN, False, WIN_PRECISION,
                                WIN_DTYPE, True, WIN_TMA, False, 0)
        else:
            u = tl.where(grp < NW, grp * R + r - 1, NW * R + pid - NW * (R + 1))
            t0 = u % N
            i_h = u // N
            SL._one_position_fwd(q, k, v, o, lse, idx + (t0 * H + i_h) * S, 0, S, 0, N, 0, 0, t0, i_h, scale, HQ, H, G, BS,
                                 BK, NKS, DK, DV, DK, DV, BR, STAGES, DOT_PRECISION, DOT_UPCAST, TMA)


def probe_mixed(T):
    """Can the L2-bound selected gather and tensor-bound work share SMs? (Branch streams do not
    overlap: run 6.) At the benchmark's shape (B=1, HQ=64, H=4, D=128, bf16), T: the selected
    forward with one position per program (library P=1 and the default), persistent with k
    programs per SM, the window forward alone, and both in one launch (roles interleaved, or each
    program a window tile plus its positions' selected forward); the compressed forward at
    4-warp configs (what a launch shared with the gather could hold)."""
    from nsa.ops import compressed as CM, window as WI_
    HQ, H, D, BS, S, W, KS, ST = 64, 4, 128, 64, 16, 512, 32, 16
    G = HQ // H
    scale = D ** -0.5
    q, k, v, do, idx = _benchmark_inputs(T)
    N = T
    cu = uniform_cu_seqlens(1, T, q.device)
    qp, kp, vp = q.view(N, HQ, D), k.view(N, H, D), v.view(N, H, D)
    ip = idx.view(N, H, S).contiguous()
    g = torch.Generator(device=DEV).manual_seed(11)
    kw = torch.randn(1, T, H, D, device=DEV, generator=g).bfloat16()
    vw = torch.randn(1, T, H, D, device=DEV, generator=g).bfloat16()
    share0 = SL.FWD_SHARE
    res = {}
    for share in (1, 4):
        SL.FWD_SHARE = share
        cfg = SL._tiles(G, BS, D, D, q.dtype)
        chunks = SL._chunk_table(cu, N, SL.fwd_positions(cfg))
        res[share] = SL._launch_fwd(qp, kp, vp, ip, BS, scale, cu, chunks, cfg)
        t = _ms(lambda: SL._launch_fwd(qp, kp, vp, ip, BS, scale, cu, chunks, cfg))
        print(f"mixed T={T}: selected fwd library P={share}: {t:.2f} ms", flush=True)
    SL.FWD_SHARE = share0
    cfg = SL._tiles(G, BS, D, D, q.dtype)
    o_ref, lse_ref = res[1]
    sc = dict(HQ=HQ, H=H, G=G, S=S, BS=BS, BK=cfg.BK, NKS=cfg.NKS, DK=D, DV=D, BR=cfg.BR, STAGES=SL.GATHER_STAGES,
              TMA=TU.use_tma(True, kp, vp), **TU.dot_args(q.dtype))
    sms = torch.cuda.get_device_properties(0).multi_processor_count if DEV == "cuda" else 2
    o = torch.empty_like(o_ref)
    lse = torch.empty_like(lse_ref)
    for per_sm in (1, 2, 3, 4, 6) if DEV == "cuda" else (1,):  # cpu: a dry run
        grid = (per_sm * sms,)
        run = lambda: _slc_persistent_kernel[grid](qp, kp, vp, o, lse, ip, N, scale, num_warps=cfg.warps,  # noqa: E731
                                                    num_stages=SL.GATHER_STAGES, **sc)
        run()
        err = (o.float() - o_ref.float()).abs().max().item()
        print(f"mixed T={T}: selected persistent {per_sm}/SM: {_ms(run):.2f} ms  max|o - lib| {err:.1e}", flush=True)
    win = lambda: WI_._window_fwd_op(q, kw, vw, W, scale, None)  # noqa: E731
    ow_ref, lsew_ref = win()
    t_w = _ms(win)
    slc = lambda: SL._launch_fwd(qp, kp, vp, ip, BS, scale, cu, SL._chunk_table(cu, N, 1),  # noqa: E731
                                 SL._tiles(G, BS, D, D, q.dtype)._replace(SHARE=1))
    print(f"mixed T={T}: window fwd {t_w:.2f} ms   serial window + selected P=1 "
          f"{_ms(lambda: (win(), slc())):.2f} ms", flush=True)
    wc = WI_._q_config(G, D, D, q.dtype, True)
    n_tw = triton.cdiv(T, wc["BT"])
    NW = n_tw * H
    NS = N * H
    ow = torch.empty_like(ow_ref)
    lsew = torch.empty_like(lsew_ref)
    chunk_w = torch.empty(1, dtype=torch.int32, device=q.device)
    wtma = TU.use_tma(wc["TMA"], kw, vw)
    da = WI_._dot_args(q.dtype)
    for both, R in ((False, NS // NW), (False, NS // NW // 2), (True, 0)):
        grid = (NW,) if both else (NW + NS,)
        if not both and NS < NW * R:
            continue

        def run():
            _mixed_kernel[grid](qp, kp, vp, o, lse, ip, kw, vw, ow, lsew, chunk_w, N, NW, n_tw, scale, W, **sc, R=R,
                                BOTH=both, BT=wc["BT"], BM=wc["BM"], BN=wc["BN"], WIN_PRECISION=da["DOT_PRECISION"],
                                WIN_DTYPE=da["DOT_DTYPE"], WIN_TMA=wtma, num_warps=4, num_stages=wc["num_stages"])
        try:
            run()
            err = max((o.float() - o_ref.float()).abs().max().item(), (ow.float() - ow_ref.float()).abs().max().item())
            label = "both per program" if both else f"interleaved 1:{R}"
            print(f"mixed T={T}: one launch, {label}: {_ms(run):.2f} ms  max|o - separate| {err:.1e}", flush=True)
        except Exception as e:
            print(f"mixed T={T}: one launch both={both} R={R}: failed {type(e).__name__}: {str(e)[:300]}", flush=True)
    Tc = num_compressed(T, KS, ST)
    kc = torch.randn(1, Tc, H, D, device=DEV, generator=g).bfloat16()
    vc = torch.randn(1, Tc, H, D, device=DEV, generator=g).bfloat16()
    base = CM.compressed_attention_fwd(q, kc, vc, KS, ST, scale, None)
    print(f"mixed T={T}: compressed fwd default {_ms(lambda: CM.compressed_attention_fwd(q, kc, vc, KS, ST, scale, None)):.2f} ms",
          flush=True)
    cmp_cfgs = ((128, 64, 4, 3), (128, 64, 4, 2), (128, 32, 4, 3), (64, 64, 4, 3), (256, 64, 8, 2))
    for rows, bc, warps, stages in cmp_cfgs if DEV == "cuda" else cmp_cfgs[:1]:
        cfg_c = dict(rows=rows, BC=bc, num_warps=warps, num_stages=stages, tma=True)
        try:
            oc, _ = CM.compressed_attention_fwd(q, kc, vc, KS, ST, scale, None, config=cfg_c)
            err = (oc.float() - base[0].float()).abs().max().item()
            t = _ms(lambda: CM.compressed_attention_fwd(q, kc, vc, KS, ST, scale, None, config=cfg_c))
            print(f"mixed T={T}: compressed fwd {cfg_c}: {t:.2f} ms  max|o - default| {err:.1e}", flush=True)
        except Exception as e:
            print(f"mixed T={T}: compressed fwd {cfg_c}: failed {type(e).__name__}: {str(e)[:200]}", flush=True)


@triton.jit
def _gather_load_kernel(k, v, idx, out, N, H: tl.constexpr, S: tl.constexpr, BS: tl.constexpr, BK: tl.constexpr,
                        NKS: tl.constexpr, D: tl.constexpr, STAGES: tl.constexpr):
    """The selected forward's loads and nothing else (B = 1, one program per (position, KV head),
    the library's grid order): each listed block's K and V sub-tiles through the same TMA
    descriptors (keys 0 .. t), folded into a running elementwise maximum so that no load is dead;
    in float32 (Triton 3.6 promotes a bfloat16 maximum to float32, and the interpreter's bfloat16
    maximum gave wrong values)."""
    t0 = tl.program_id(0)
    i_h = tl.program_id(1)
    n_key = (t0 + 1).to(tl.int32)
    k_desc, v_desc = TU.kv_descriptors(k + i_h * D, v + i_h * D, n_key, H * D, H * D, D, D, BK, D, D)
    acc = tl.zeros([BK, D], dtype=tl.float32)
    for i_s in tl.range(0, S, num_stages=STAGES):
        i_b = tl.load(idx + (t0 * H + i_h) * S + i_s).to(tl.int64)
        for i_ks in tl.static_range(NKS):
            _, _, b_k, b_v = SL._listed_block_kv_tma(k_desc, v_desc, i_b, i_ks, t0, n_key, BS, BK)
            acc = tl.maximum(acc, tl.maximum(b_k.to(tl.float32), b_v.to(tl.float32)))
    tl.store(out + t0 * H + i_h, tl.max(tl.max(acc, 1), 0))


def probe_floors(T):
    """What the forward's pieces would take at the measured limits, at the benchmark's shape
    (B=1, HQ=64, H=4, D=128, bf16, 32/16/64/16/512), T. Selected: a kernel that makes the
    selected forward's loads (same selections, grid, TMA descriptors, stages) and no arithmetic
    beyond a running maximum, against the library's forward. Compressed attention and window: cuDNN
    SDPA on dense problems with the same number of (query head, key) pairs: T queries against
    the mean number of visible compressed tokens (non-causal), and T / 1024 causal sequences of
    1024 (T * 512.5 pairs per head, the window's T * 512), forward and backward (the backward as
    forward + gradients minus forward)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    HQ, H, D, BS, S, KS, ST = 64, 4, 128, 64, 16, 32, 16
    G = HQ // H
    q, k, v, do, idx = _benchmark_inputs(T)
    N = T
    cu = uniform_cu_seqlens(1, T, q.device)
    qp, kp, vp = q.view(N, HQ, D), k.view(N, H, D), v.view(N, H, D)
    ip = idx.view(N, H, S).contiguous()
    cfg = SL._tiles(G, BS, D, D, q.dtype)
    chunks = SL._chunk_table(cu, N, SL.fwd_positions(cfg))
    scale = D ** -0.5
    t_lib = _ms(lambda: SL._launch_fwd(qp, kp, vp, ip, BS, scale, cu, chunks, cfg))
    out = torch.empty(N, H, device=DEV)
    for stages in (SL.GATHER_STAGES, 3):
        run = lambda: _gather_load_kernel[(N, H)](kp, vp, ip, out, N, H=H, S=S, BS=BS, BK=cfg.BK,  # noqa: E731
                                                  NKS=cfg.NKS, D=D, STAGES=stages, num_warps=cfg.warps,
                                                  num_stages=stages)
        t = _ms(run)
        # position 0 sees key 0 only (its other rows read as zeros)
        ok = out[0].tolist() == torch.maximum(kp[0], vp[0]).float().amax(-1).clamp(min=0).tolist()
        print(f"floors T={T}: selected fwd (library) {t_lib:.2f} ms; its loads alone ({stages} stages, "
              f"{cfg.warps} warps) {t:.2f} ms; position 0 checked: {ok}", flush=True)
    if DEV != "cuda":
        return
    Tc = num_compressed(T, KS, ST)
    t_first = torch.arange(Tc, dtype=torch.float64) * ST + KS - 1
    mean_vis = int(round(float((T - t_first).clamp(min=0).sum()) / T))
    g = torch.Generator(device=DEV).manual_seed(3)
    qd = torch.randn(1, HQ, T, D, device=DEV, generator=g).bfloat16()
    kd = torch.randn(1, HQ, mean_vis, D, device=DEV, generator=g).bfloat16()
    vd = torch.randn(1, HQ, mean_vis, D, device=DEV, generator=g).bfloat16()
    qw = qd.view(1, HQ, T // 1024, 1024, D).transpose(1, 2).reshape(T // 1024, HQ, 1024, D)
    kw = torch.randn_like(qw)
    vw = torch.randn_like(qw)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    times = {}
    for name, (x, y, z, causal) in {"compressed": (qd, kd, vd, False), "window": (qw, kw, vw, True)}.items():
        x, y, z = (t.detach().requires_grad_() for t in (x, y, z))
        dout = torch.randn_like(x)
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            fwd = _ms(lambda: sdpa(x, y, z, is_causal=causal))
            both = _ms(lambda: torch.autograd.grad(sdpa(x, y, z, is_causal=causal), (x, y, z), dout))
        times[name] = (fwd, both - fwd)
    (c_f, c_b), (w_f, w_b) = times["compressed"], times["window"]
    print(f"floors T={T}: cuDNN SDPA fwd / bwd, {T} queries x {mean_vis} keys (the compressed branch's pairs): "
          f"{c_f:.2f} / {c_b:.2f} ms ({4 * D * HQ * T * mean_vis / c_f / 1e9:.0f} TFLOP/s forward); "
          f"{T // 1024} causal sequences of 1024 (the window's pairs): {w_f:.2f} / {w_b:.2f} ms", flush=True)


def probe_smooth_share(T):
    """Selections of smoothed queries (``nsa bench --smooth-queries N``: moving sums of N positions
    of noise) at the benchmark's shape (B=1, HQ=64, H=4, D=128, bf16, 32/16/64/16), T: how many
    blocks the 4 positions of a tile all list, and the selected forward (library) on them."""
    HQ, H, D, BS, S = 64, 4, 128, 64, 16
    G = HQ // H
    scale = D ** -0.5
    cu = uniform_cu_seqlens(1, T, DEV)
    for n in (0, 64, 256):
        q, k, v, _, idx = _benchmark_inputs(T, n)
        x = idx[0, T // 2 // 4 * 4:].permute(1, 0, 2).reshape(H, -1, 4, S)  # second half: >= T/128 blocks of past
        first = x[:, :, 0]
        shared = torch.stack([(first[..., :, None] == x[:, :, j, None, :]).any(-1) for j in range(4)]).all(0)
        shared &= first >= 0
        cfg = SL._tiles(G, BS, D, D, q.dtype)
        chunks = SL._chunk_table(cu, T, SL.fwd_positions(cfg))
        args = (q.view(T, HQ, D), k.view(T, H, D), v.view(T, H, D), idx.view(T, H, S).contiguous(), BS, scale, cu,
                chunks, cfg)
        t = _ms(lambda: SL._launch_fwd(*args))
        print(f"smoothshare T={T} n={n}: blocks listed by all 4 positions of a tile {shared.sum(-1).float().mean():.2f} "
              f"of {S}; selected fwd (library) {t:.2f} ms", flush=True)


def probe_dq_share(T):
    """The selected backward (delta given, as nsa() calls it) with dQ programs of P = 1, 2, 4
    positions (DQ_SHARE) on the benchmark's selections of random queries and of smoothed ones
    (``nsa bench --smooth-queries N``), at the benchmark's shape; dK / dV are the same kernels for
    every P."""
    HQ, H, D, BS, S = 64, 4, 128, 64, 16
    G = HQ // H
    scale = D ** -0.5
    cu = uniform_cu_seqlens(1, T, DEV)
    for n in (0, 64, 256):
        q, k, v, do, idx = _benchmark_inputs(T, n)
        cfg = SL._tiles(G, BS, D, D, q.dtype)
        qp, kp, vp, dop = q.view(T, HQ, D), k.view(T, H, D), v.view(T, H, D), do.view(T, HQ, D)
        ip = idx.view(T, H, S).contiguous()
        o, lse = SL._launch_fwd(qp, kp, vp, ip, BS, scale, cu, SL._chunk_table(cu, T, SL.fwd_positions(cfg)), cfg)
        delta = SL._delta(o, dop)
        chunks, blocks = SL._chunk_table(cu, T, cfg.BT), SL._chunk_table(cu, T, BS)
        row = []
        for P in (1, 2, 4):
            c = cfg._replace(SHARE_DQ=P)
            t = _ms(lambda: SL._launch_bwd(qp, kp, vp, o, lse, dop, ip, BS, scale, cu, chunks, blocks, c, delta=delta))
            row.append(f"P={P} {t:.2f}")
        print(f"dqshare T={T} n={n}: selected backward (delta given) " + ", ".join(row) + " ms", flush=True)


def probe_gather_warps(T):
    """The one-position gather (forward, and the selected backward whose dQ gather shares its
    tile config) with fewer warps per program: 16 rows (one position's 16 heads) split over 4
    warps exchange their softmax statistics and P through shared memory at every block; on 1 or
    2 warps they do less of that, and more programs fit an SM. Benchmark shape and selections
    (random queries), 64-key sub-tiles or 32; GATHER_STAGES 2 or 3."""
    HQ, H, D, BS, S = 64, 4, 128, 64, 16
    G = HQ // H
    scale = D ** -0.5
    cu = uniform_cu_seqlens(1, T, DEV)
    q, k, v, do, idx = _benchmark_inputs(T)
    qp, kp, vp, dop = q.view(T, HQ, D), k.view(T, H, D), v.view(T, H, D), do.view(T, HQ, D)
    ip = idx.view(T, H, S).contiguous()
    cfg0 = SL._tiles(G, BS, D, D, q.dtype)
    chunks, blocks = SL._chunk_table(cu, T, cfg0.BT), SL._chunk_table(cu, T, BS)
    fwd_chunks = SL._chunk_table(cu, T, SL.fwd_positions(cfg0))
    o_ref, lse_ref = SL._launch_fwd(qp, kp, vp, ip, BS, scale, cu, fwd_chunks, cfg0)
    delta = SL._delta(o_ref, dop)
    dq_ref = SL._launch_bwd(qp, kp, vp, o_ref, lse_ref, dop, ip, BS, scale, cu, chunks, blocks, cfg0, delta=delta)[0]
    stages0 = SL.GATHER_STAGES
    for warps, bk, stages in ((4, 64, 2), (2, 64, 2), (1, 64, 2), (2, 32, 2), (1, 32, 2), (2, 32, 3), (1, 32, 3)):
        SL.GATHER_STAGES = stages
        c = cfg0._replace(warps=warps, BK=bk, NKS=BS // bk, BK_DQ=bk, NKS_DQ=BS // bk)
        try:
            o, lse = SL._launch_fwd(qp, kp, vp, ip, BS, scale, cu, fwd_chunks, c)
            dq = SL._launch_bwd(qp, kp, vp, o_ref, lse_ref, dop, ip, BS, scale, cu, chunks, blocks, c, delta=delta)[0]
            err_o = ((o.float() - o_ref.float()).abs().max() / o_ref.float().abs().max()).item()
            err_dq = ((dq.float() - dq_ref.float()).abs().max() / dq_ref.float().abs().max()).item()
            t_f = _ms(lambda: SL._launch_fwd(qp, kp, vp, ip, BS, scale, cu, fwd_chunks, c))
            t_b = _ms(lambda: SL._launch_bwd(qp, kp, vp, o_ref, lse_ref, dop, ip, BS, scale, cu, chunks, blocks, c,
                                             delta=delta))
            print(f"gatherwarps T={T} warps={warps} BK={bk} stages={stages}: selected fwd {t_f:.2f} ms, "
                  f"selected bwd (delta given) {t_b:.2f} ms; max |diff| / max vs the default: o {err_o:.1e}, "
                  f"dq {err_dq:.1e}", flush=True)
        except Exception as e:  # a config that does not compile or fit: report and go on
            print(f"gatherwarps T={T} warps={warps} BK={bk} stages={stages}: failed: {type(e).__name__}: "
                  f"{str(e)[:200]}", flush=True)
    SL.GATHER_STAGES = stages0


def main():
    # part -> what it runs, given the parsed arguments
    parts = {
        "dot": lambda a: probe_dot(),
        "selected": lambda a: probe_selected(a.T, a.sweep),
        "fwdmodes": lambda a: probe_fwd_modes(a.Ts),
        "dqmodes": lambda a: probe_dq_modes(a.Ts),
        "gates": lambda a: probe_gates(a.Ts),
        "checks": lambda a: [probe_checks(T) for T in a.Ts],
        "streams": lambda a: [probe_streams(T) for T in a.Ts],
        "slctma": lambda a: probe_slc_tma(a.T),
        "publicop": lambda a: probe_public_op(a.T),
        "locality": lambda a: probe_locality(a.T),
        "launches": lambda a: probe_launches(a.T),
        "share": lambda a: probe_share(a.T),
        "wide": lambda a: probe_wide(a.T),
        "splithead": lambda a: probe_split_head(a.T),
        "mixed": lambda a: probe_mixed(a.T),
        "widebwd": lambda a: probe_wide_bwd(a.T),
        "widecmp": lambda a: probe_wide_cmp(a.T),
        "slcbwd192": lambda a: probe_slc_bwd_192(a.T),
        "floors": lambda a: probe_floors(a.T),
        "smoothshare": lambda a: probe_smooth_share(a.T),
        "dqshare": lambda a: probe_dq_share(a.T),
        "gatherwarps": lambda a: probe_gather_warps(a.T),
    }
    p = argparse.ArgumentParser()
    p.add_argument("--T", type=int, default=65536)
    p.add_argument("--parts", nargs="*", default=["dot", "selected"], choices=list(parts), help=" ".join(parts))
    p.add_argument("--sweep", action="store_true", help="selected: time dK/dV tile configs")
    p.add_argument("--Ts", type=int, nargs="*", default=[8192, 32768, 65536], help="lengths for fwdmodes")
    args = p.parse_args()
    print(f"# {datetime.datetime.utcnow():%Y-%m-%d %H:%M} UTC  {torch.cuda.get_device_name() if DEV == 'cuda' else 'cpu'}  "
          f"torch {torch.__version__}  triton {triton.__version__}")
    for name, run in parts.items():  # in this order, whatever the order given
        if name in args.parts:
            run(args)


if __name__ == "__main__":
    main()
