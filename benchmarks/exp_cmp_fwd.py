"""Experimental compressed-attention forward: TMA tensor descriptors + automatic warp specialization.

A probe, not a library path. Same math and semantics as ``nsa.ops.compressed.compressed_fwd_kernel``
(one program per (query tile, KV head), a tile = BT positions x GP heads of the group, FA-2 online
softmax in fp32, unmasked key tiles [0, n_full) then masked tiles [n_full, n_vis)), for dense inputs
only (B batches of equal length T). Differences, all behind constexpr switches:

- ``TMA``: compressed K/V tiles come through on-device tensor descriptors (``tl.make_tensor_descriptor``)
  made per program over the (batch, KV head) slice: shape [Tc, Dk] (resp. [Tc, Dv]), strides
  [H*D, 1], block [BC, BDK]. TMA zero-fills past Tc and past D, exactly what the masked pointer
  loads of the library give, so nothing of another batch or head can enter a tile.
  Requirements (TMA): D * itemsize a multiple of 16 bytes (base address and row stride alignment).
- ``WS``: both key loops run as ``tl.range(..., warp_specialize=True)`` (Triton's automatic warp
  specialization: on sm_90 the Hopper pass ``add_hopper_warpspec``).

Usage:
    PYTHONPATH=src python3 benchmarks/exp_cmp_fwd.py --T 65536          # GPU: timing table
    PYTHONPATH=src python3 benchmarks/exp_cmp_fwd.py                     # CPU: interpreter self-check + dry run
    PYTHONPATH=src python3 benchmarks/exp_cmp_fwd.py --compile-sm90 [--ptxas]   # CPU: compile for sm_90
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import torch

# The interpreter is chosen when @triton.jit runs (import time): decide before importing triton.
COMPILE_SM90 = "--compile-sm90" in sys.argv
if COMPILE_SM90:
    os.environ.pop("TRITON_INTERPRET", None)
elif not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton
import triton.language as tl

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests.* (launch_resources for the compile check)
sys.path.insert(0, str(ROOT / "src"))

LOG2E = math.log2(math.e)
HQ, H = 64, 4
KS, ST = 32, 16


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# ----------------------------------------------------------------------------------------------
# Kernel
# ----------------------------------------------------------------------------------------------

@triton.jit
def _exp_tiles(acc, l_i, m_i, b_q, k_src, v_src, o_t, i_lo, i_hi, n_vis, s_kt, s_vt, scale_log2,
               KERNEL_SIZE, STRIDE, DK, DV,
               BC: tl.constexpr, BDK: tl.constexpr, BDV: tl.constexpr, MASK: tl.constexpr,
               PRECISION: tl.constexpr, UPCAST: tl.constexpr, TMA: tl.constexpr, WS: tl.constexpr):
    """Online-softmax update over compressed tokens [i_lo, i_hi). k_src/v_src: tensor descriptors of the
    (batch, KV head) slice when TMA, else pointers at its first compressed token."""
    o_c = tl.arange(0, BC)
    if not TMA:
        o_dk = tl.arange(0, BDK)
        o_dv = tl.arange(0, BDV)
        m_dk = o_dk < DK
        m_dv = o_dv < DV
        p_kb = k_src + o_c[:, None] * s_kt + o_dk[None, :]
        p_vb = v_src + o_c[:, None] * s_vt + o_dv[None, :]
    for i0 in tl.range(i_lo, i_hi, BC, warp_specialize=WS):
        o_i = i0 + o_c
        if TMA:
            # rows >= Tc and columns >= D are zero-filled by TMA; rows in [n_vis, Tc) are real
            # (finite) data of this slice and get p = 0 from the visibility mask below
            b_k = k_src.load([i0, 0])  # [BC, BDK]
            b_v = v_src.load([i0, 0])  # [BC, BDV]
        else:
            m_i_ok = o_i < n_vis
            b_k = tl.load(p_kb + tl.cast(i0, tl.int64) * s_kt, mask=m_i_ok[:, None] & m_dk[None, :], other=0.)
            b_v = tl.load(p_vb + tl.cast(i0, tl.int64) * s_vt, mask=m_i_ok[:, None] & m_dv[None, :], other=0.)
        if UPCAST:
            b_k, b_v = b_k.to(tl.float32), b_v.to(tl.float32)
        b_s = tl.dot(b_q, tl.trans(b_k), input_precision=PRECISION) * scale_log2  # [BM, BC], log2 units
        if MASK:
            m_vis = (o_i[None, :] * STRIDE + KERNEL_SIZE - 1) <= o_t[:, None]
            b_s = tl.where(m_vis, b_s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(b_s, 1))
        m_use = tl.where(m_new == float("-inf"), 0., m_new)  # rows that saw nothing: exp2 gives 0, not NaN
        alpha = tl.exp2(m_i - m_use)
        b_p = tl.exp2(b_s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(b_p, 1)
        b_pc = b_p.to(b_q.dtype) if not UPCAST else b_p.to(tl.bfloat16).to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(b_pc, b_v, input_precision=PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def cmp_fwd_exp_kernel(q, k, v, o, lse, scale_log2, B, T, Tc, HQ, H, G, DK, DV, KERNEL_SIZE, STRIDE,
                       GP: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, BDK: tl.constexpr,
                       BDV: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                       TMA: tl.constexpr, WS: tl.constexpr, ONE_LOOP: tl.constexpr,
                       QDESC: tl.constexpr):
    """Dense contiguous q [B, T, HQ, DK], k [B, Tc, H, DK], v [B, Tc, H, DV], o [B, T, HQ, DV],
    lse [B, T, HQ]. One program per (query tile, batch, KV head), latest tiles first."""
    BM: tl.constexpr = BT * GP
    i_p = tl.program_id(0)
    i_c, i_h = i_p // H, i_p % H
    n_tiles = tl.cdiv(T, BT)
    i_tile = n_tiles - 1 - i_c // B
    i_b = i_c % B
    bos = i_b.to(tl.int64) * T
    cbos = i_b.to(tl.int64) * Tc

    t0 = i_tile * BT
    o_r = tl.arange(0, BM)
    o_t = t0 + o_r // GP
    o_g = o_r % GP
    m_row = (o_t < T) & (o_g < G)
    o_hq = i_h * G + o_g
    o_dk = tl.arange(0, BDK)
    o_dv = tl.arange(0, BDV)
    m_dk = o_dk < DK
    m_dv = o_dv < DV
    o_tok = bos + o_t

    if QDESC:
        # q viewed as [B*T, HQ, DK]: the tile is the box [BT, GP, BDK] at (bos + t0, i_h * G, 0). Rows past
        # the batch (next batch's positions) or past the group (G < GP: next group's heads) are real data in
        # rows that are never stored; past B*T, HQ and DK TMA zero-fills. (Hopper's automatic warp
        # specialization also needs every load of the kernel to be a descriptor load.)
        q_desc = tl.make_tensor_descriptor(q, shape=[B * T, HQ, DK], strides=[HQ * DK, DK, 1],
                                           block_shape=[BT, GP, BDK])
        b_q = tl.reshape(q_desc.load([(bos + t0).to(tl.int32), i_h * G, 0]), [BM, BDK])
    else:
        b_q = tl.load(q + o_tok[:, None] * (HQ * DK) + (o_hq * DK)[:, None] + o_dk[None, :],
                      mask=m_row[:, None] & m_dk[None, :], other=0.)
    if UPCAST:
        b_q = b_q.to(tl.float32)

    t_last = tl.minimum(t0 + BT, T) - 1
    n_vis = tl.where(t_last + 1 >= KERNEL_SIZE, tl.maximum(t_last + 1 - KERNEL_SIZE, 0) // STRIDE + 1, 0)
    n_full = tl.where(t0 + 1 >= KERNEL_SIZE, tl.maximum(t0 + 1 - KERNEL_SIZE, 0) // STRIDE + 1, 0)
    n_full = (n_full // BC) * BC

    p_k = k + cbos * (H * DK) + i_h * DK
    p_v = v + cbos * (H * DV) + i_h * DV
    if TMA:
        k_src = tl.make_tensor_descriptor(p_k, shape=[Tc, DK], strides=[H * DK, 1], block_shape=[BC, BDK])
        v_src = tl.make_tensor_descriptor(p_v, shape=[Tc, DV], strides=[H * DV, 1], block_shape=[BC, BDV])
    else:
        k_src = p_k
        v_src = p_v
    acc = tl.zeros([BM, BDV], dtype=tl.float32)
    l_i = tl.zeros([BM], dtype=tl.float32)
    m_i = tl.full([BM], float("-inf"), dtype=tl.float32)
    if ONE_LOOP:
        # one loop over every visible tile, all masked (Triton 3.9's Hopper warp specialization fails on two
        # consecutive warp-specialized loops)
        acc, l_i, m_i = _exp_tiles(acc, l_i, m_i, b_q, k_src, v_src, o_t, 0, n_vis, n_vis, H * DK, H * DV,
                                   scale_log2, KERNEL_SIZE, STRIDE, DK, DV, BC, BDK, BDV, True, PRECISION, UPCAST,
                                   TMA, WS != 0)
    else:
        # WS bit 0: warp-specialize the unmasked loop, bit 1: the masked loop
        acc, l_i, m_i = _exp_tiles(acc, l_i, m_i, b_q, k_src, v_src, o_t, 0, n_full, n_vis, H * DK, H * DV,
                                   scale_log2, KERNEL_SIZE, STRIDE, DK, DV, BC, BDK, BDV, False, PRECISION, UPCAST,
                                   TMA, (WS & 1) != 0)
        acc, l_i, m_i = _exp_tiles(acc, l_i, m_i, b_q, k_src, v_src, o_t, n_full, n_vis, n_vis, H * DK, H * DV,
                                   scale_log2, KERNEL_SIZE, STRIDE, DK, DV, BC, BDK, BDV, True, PRECISION, UPCAST,
                                   TMA, (WS & 2) != 0)

    seen = l_i > 0
    b_o = acc / tl.where(seen, l_i, 1.)[:, None]
    b_lse = tl.where(seen, (m_i + tl.log2(tl.where(seen, l_i, 1.))) / 1.4426950408889634, float("-inf"))
    tl.store(o + o_tok[:, None] * (HQ * DV) + (o_hq * DV)[:, None] + o_dv[None, :], b_o.to(o.dtype.element_ty),
             mask=m_row[:, None] & m_dv[None, :])
    tl.store(lse + o_tok * HQ + o_hq, b_lse, mask=m_row)


# ----------------------------------------------------------------------------------------------
# Host
# ----------------------------------------------------------------------------------------------

def _alloc(size: int, alignment: int, stream):
    # global scratch for on-device descriptors (128 B per descriptor per program)
    return torch.empty(size, dtype=torch.int8, device="cuda" if torch.cuda.is_available() else "cpu")


def _launch(q, k_cmp, v_cmp, kernel_size, stride, scale, rows, BC, warps, stages, ws, tma, one_loop=False, qdesc=None):
    """(grid, args, kwargs, o, lse) of a launch (also used by the sm_90 compile check)."""
    B, T, HQ_, Dk = q.shape
    Tc, H_, Dv = k_cmp.shape[1], k_cmp.shape[2], v_cmp.shape[3]
    G = HQ_ // H_
    q, k_cmp, v_cmp = q.contiguous(), k_cmp.contiguous(), v_cmp.contiguous()
    o = torch.empty((B, T, HQ_, Dv), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, T, HQ_), dtype=torch.float32, device=q.device)
    gp = triton.next_power_of_2(G)
    bt = max(1, rows // gp)
    interp = interpreting()
    upcast = interp and q.dtype == torch.bfloat16  # interpreter bf16 dots (see nsa.ops.compressed._upcast)
    grid = (triton.cdiv(T, bt) * B * H_,)
    args = (q, k_cmp, v_cmp, o, lse, scale * LOG2E, B, T, Tc, HQ_, H_, G, Dk, Dv, kernel_size, stride)
    kw = dict(GP=gp, BT=bt, BC=BC, BDK=triton.next_power_of_2(Dk), BDV=triton.next_power_of_2(Dv),
              PRECISION="ieee" if q.dtype == torch.float32 else "tf32", UPCAST=upcast,
              TMA=bool(tma), WS=int(ws), ONE_LOOP=bool(one_loop),
              QDESC=bool(tma) and (bool(ws) if qdesc is None else bool(qdesc)), num_warps=warps, num_stages=stages)
    return grid, args, kw, o, lse


def cmp_fwd_exp(q, k_cmp, v_cmp, kernel_size, stride, scale, *, rows=256, BC=64, warps=16, stages=2,
                ws=False, tma=True, one_loop=False, qdesc=None):
    """o [B, T, HQ, Dv] (q's dtype), lse [B, T, HQ] float32 natural log; dense inputs only.
    Same outputs as ``nsa.ops.compressed_attention(..., backend='triton')``.

    tma: K/V (and q when qdesc) through on-device tensor descriptors. ws: 0/False, or a bitmask of the key
    loops to warp-specialize (1: unmasked, 2: masked, True/3: both; with one_loop any nonzero value).
    one_loop: a single loop over all visible tiles, every tile masked (the only form that Triton 3.9's
    Hopper warp specialization compiles). qdesc: q through a 3D descriptor (default: when tma and ws;
    Hopper warp specialization needs every load to be a descriptor load). The interpreter ignores ws."""
    B, T = q.shape[:2]
    Tc = k_cmp.shape[1]
    if tma:
        for x in (q, k_cmp, v_cmp):
            if (x.shape[-1] * x.element_size()) % 16:
                raise ValueError("TMA: head dim * itemsize must be a multiple of 16 bytes")
    grid, args, kw, o, lse = _launch(q, k_cmp, v_cmp, kernel_size, stride, scale, rows, BC, warps, stages, ws, tma,
                                     one_loop, qdesc)
    if B * T == 0:
        return o, lse
    if B * Tc == 0:
        return o.zero_(), lse.fill_(float("-inf"))
    triton.set_allocator(_alloc)
    cmp_fwd_exp_kernel[grid](*args, **kw)
    return o, lse


def visible_pairs(T: int, kernel_size: int, stride: int) -> int:
    """sum over positions t < T of the compressed tokens visible to t (per batch, per query head)."""
    t = torch.arange(T, dtype=torch.int64)
    n = torch.where(t + 1 >= kernel_size, (t + 1 - kernel_size).clamp(min=0) // stride + 1, 0)
    return int(n.sum())


# ----------------------------------------------------------------------------------------------
# Interpreter self-check
# ----------------------------------------------------------------------------------------------

# tests/ops/test_compressed_triton.py: relative L2 error ratios per dtype
RATIO = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def _rel(ref, out):
    ref, out = ref.double(), out.double()
    d = ref.norm().item()
    return (out - ref).norm().item() / d if d > 0 else (out - ref).norm().item()


def self_check(Ts=(1, 31, 47, 200), Gs=(1, 16), dims=((64, 64), (192, 128)),
               dtypes=(torch.float32, torch.bfloat16), modes=((1, 0, 0), (0, 0, 0), (1, 0, 3), (1, 1, 1)), H_=1, B=2, ks=32, st=16,
               cfg=None, verbose=True) -> bool:
    """Compares cmp_fwd_exp with the reference backend (same checks as tests/ops for o and lse).
    modes: (tma, one_loop, ws); the interpreter ignores warp specialization."""
    from nsa import ops
    cfg = cfg or {"rows": 32, "BC": 16, "warps": 4, "stages": 2}
    from nsa.ops.utils import num_compressed
    ok = True
    for dt in dtypes:
        for (dk, dv) in dims:
            for G in Gs:
                for T in Ts:
                    Tc = num_compressed(T, ks, st)
                    g = torch.Generator().manual_seed(T * 131 + G)
                    q = torch.randn(B, T, H_ * G, dk, generator=g).to(dt)
                    k = torch.randn(B, Tc, H_, dk, generator=g).to(dt)
                    v = torch.randn(B, Tc, H_, dv, generator=g).to(dt)
                    ro, rlse = ops.compressed_attention(q.float(), k.float(), v.float(), ks, st, backend="reference")
                    fin = torch.isfinite(rlse)
                    for tma, one, ws in modes:
                        name = f"{str(dt)[6:]} Dk={dk} Dv={dv} G={G} T={T} tma={tma} one={one} ws={ws}"
                        t0 = time.time()
                        try:
                            o, lse = cmp_fwd_exp(q, k, v, ks, st, dk ** -0.5, tma=bool(tma), one_loop=bool(one), ws=ws, **cfg)
                            errs = []
                            if o.dtype != dt or lse.dtype != torch.float32:
                                errs.append("dtype")
                            if not torch.equal(torch.isfinite(lse), fin):
                                errs.append("lse -inf positions")
                            if not (lse[~fin] == float("-inf")).all() or not (o[~fin] == 0).all():
                                errs.append("unseen rows")
                            bad = ~torch.isfinite(o) & torch.isfinite(ro)
                            if bad.any():
                                errs.append("non-finite o")
                            eo, el = _rel(ro, o), (_rel(rlse[fin], lse[fin]) if fin.any() else 0.)
                            if eo > RATIO[dt] or el > RATIO[dt]:
                                errs.append("tolerance")
                            msg = f"o {eo:.2e} lse {el:.2e} (tol {RATIO[dt]:.0e})"
                        except Exception as e:  # noqa: BLE001
                            errs, msg = ["exception"], f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                        ok &= not errs
                        if verbose:
                            print(f"  {name:42s} {msg}  {'OK' if not errs else 'FAIL ' + ','.join(errs)}"
                                  f"  [{time.time() - t0:.1f}s]", flush=True)
    return ok


# ----------------------------------------------------------------------------------------------
# sm_90 compile check (no GPU), with the mechanism of tests/ops/launch_resources.py
# ----------------------------------------------------------------------------------------------

COMPILE_CONFIGS = [(256, 64, 16, 2), (128, 64, 8, 2)]


def compile_sm90(configs=COMPILE_CONFIGS, ptxas=False, dims=(128, 128), dtype=torch.bfloat16, G=16, tmas=(True,),
                 one_loop=False):
    from triton.compiler import ASTSource

    from tests.ops import launch_resources as LR
    assert not interpreting()
    T_, Tc = 512, (512 - KS) // ST + 1
    dk, dv = dims
    q = torch.zeros(1, T_, 2 * G, dk, dtype=dtype)
    k = torch.zeros(1, Tc, 2, dk, dtype=dtype)
    v = torch.zeros(1, Tc, 2, dv, dtype=dtype)
    results = []
    for rows, bc, w, s in configs:
        for tma in tmas:
            for ws in (False, True):
                _, args, kw, _, _ = _launch(q, k, v, KS, ST, dk ** -0.5, rows, bc, w, s, 3 if ws else 0, tma, one_loop)
                signature, constexprs, attrs, options = LR.specialize(cmp_fwd_exp_kernel, args, kw)
                name = f"rows={rows} BC={bc} warps={w} stages={s} tma={int(tma)} ws={int(ws)} one_loop={int(one_loop)}"
                t0 = time.time()
                try:
                    ck = triton.compile(ASTSource(cmp_fwd_exp_kernel, signature, constexprs, attrs),
                                        target=LR.TARGET, options=options)
                    md = ck.metadata
                    res = dict(name=name, ok=True, shared=int(md.shared), num_warps=md.num_warps,
                               scratch=getattr(md, "global_scratch_size", None))
                    ttgir = ck.asm.get("ttgir", "")
                    res["ws_regions"] = ttgir.count("ttg.warp_specialize")
                    res["async_tma"] = ttgir.count("async_tma_copy_global_to_local")
                    res["wgmma"] = ttgir.count("warp_group_dot")
                    if ptxas:
                        res.update(LR._ptxas_info(ck.asm["ptx"], options))
                    res["fits_smem"] = res["shared"] <= LR.SM90_SHARED_LIMIT
                except Exception as e:  # noqa: BLE001
                    msg = str(e).strip().splitlines()
                    res = dict(name=name, ok=False, error=(msg[0] if msg else type(e).__name__)[:300])
                res["seconds"] = round(time.time() - t0, 1)
                print(res, flush=True)
                results.append(res)
    return results


# ----------------------------------------------------------------------------------------------
# Benchmark
# ----------------------------------------------------------------------------------------------

CONFIGS = [(256, 64, 16, 2), (128, 64, 8, 2), (128, 128, 8, 2), (256, 64, 8, 3), (128, 64, 4, 3)]
# Hopper automatic warp specialization (Triton 3.9 sm_90 compile check) only happens with num_warps=4 (it then
# runs 1 producer + 2 consumer warpgroups = 12 warps), num_stages > 1, every load a descriptor load, and ONE
# warp-specialized loop: the two-loop kernel fails in the pass (MLIR dominance assertion), hence one_loop.
WS_ONE_LOOP_CONFIGS = [(128, 64, 4, 2), (128, 128, 4, 2), (128, 64, 4, 3), (256, 64, 4, 2)]


def variants(cuda: bool) -> list[dict]:
    """The timed variants: name and keyword arguments of cmp_fwd_exp."""
    out = []
    cfgs = CONFIGS if cuda else [(32, 16, 4, 1)]
    for ws in (0, 3):
        for tma in (True, False):
            for rows, bc, w, s in cfgs:
                out.append(dict(rows=rows, BC=bc, warps=w, stages=s, ws=ws, tma=tma, one_loop=False))
    for rows, bc, w, s in (WS_ONE_LOOP_CONFIGS if cuda else [(32, 16, 4, 2)]):
        for ws in (0, 1):
            out.append(dict(rows=rows, BC=bc, warps=w, stages=s, ws=ws, tma=True, one_loop=True))
    return out


def vname(v: dict) -> str:
    return (f"ws={v['ws']} tma={int(v['tma'])} one_loop={int(v['one_loop'])} "
            f"rows={v['rows']} BC={v['BC']} w={v['warps']} s={v['stages']}")


def _first_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return f"{type(e).__name__}: {s[0][:200] if s else ''}"


def _inputs(B, T, hq, h, dk, dv, dev, dt=torch.bfloat16, empty=False):
    Tc = (T - KS) // ST + 1 if T >= KS else 0
    if empty:
        return (torch.empty(B, T, hq, dk, device=dev, dtype=dt), torch.empty(B, Tc, h, dk, device=dev, dtype=dt),
                torch.empty(B, Tc, h, dv, device=dev, dtype=dt))
    g = torch.Generator(device=dev).manual_seed(0)
    return (torch.randn(B, T, hq, dk, device=dev, dtype=dt, generator=g),
            torch.randn(B, Tc, h, dk, device=dev, dtype=dt, generator=g),
            torch.randn(B, Tc, h, dv, device=dev, dtype=dt, generator=g))


def warmup_child(a, idx: list[int]):
    """Child process: compiles the given variants (kernel.warmup, no launch) at the benchmark's shapes,
    printing START/DONE per variant, so that a compiler crash (abort in C++) only ends this process; the
    compiled kernels land in Triton's cache, where the parent's launches find them."""
    dk, dv = map(int, a.dims.split("x"))
    q, k, v = _inputs(a.B, a.T, HQ, H, dk, dv, "cuda", empty=True)
    vs = variants(True)
    for i in idx:
        print(f"START {i}", flush=True)
        try:
            x = dict(vs[i])
            grid, args, kw, _, _ = _launch(q, k, v, KS, ST, dk ** -0.5, x["rows"], x["BC"], x["warps"], x["stages"],
                                           x["ws"], x["tma"], x["one_loop"])
            cmp_fwd_exp_kernel.warmup(*args, grid=grid, **kw)
            print(f"DONE {i} ok", flush=True)
        except Exception as e:  # noqa: BLE001
            print(f"DONE {i} {_first_line(e)}", flush=True)


def precompile(a, n: int) -> dict[int, str]:
    """Compiles variants 0..n-1 in child processes; returns {index: error} of those that failed or crashed."""
    import subprocess
    todo, errors = list(range(n)), {}
    while todo:
        cmd = [sys.executable, __file__, "--T", str(a.T), "--B", str(a.B), "--dims", a.dims,
               "--warmup-child", ",".join(map(str, todo))]
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=400, check=False)
            out, rc = r.stdout, r.returncode
        except subprocess.TimeoutExpired as e:
            out, rc = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or ""), -1
        started, done = None, set()
        for line in out.splitlines():
            if line.startswith("START "):
                started = int(line.split()[1])
            elif line.startswith("DONE "):
                _, i, msg = line.split(" ", 2)
                done.add(int(i))
                if msg != "ok":
                    errors[int(i)] = msg
        if rc == 0 and set(todo) <= done:
            break
        if started is None or started in done:  # the child died before/after any variant: give up compiling
            for i in todo:
                if i not in done:
                    errors[i] = f"compile child exited rc={rc} before this variant"
            break
        errors[started] = f"compiler crashed (child rc={rc})"
        todo = [i for i in todo if i not in done and i != started]
    return errors


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--T", type=int, default=65536)
    ap.add_argument("--B", type=int, default=1)
    ap.add_argument("--dims", default="128x128")
    ap.add_argument("--compile-sm90", action="store_true")
    ap.add_argument("--ptxas", action="store_true")
    ap.add_argument("--skip-check", action="store_true")
    ap.add_argument("--no-precompile", action="store_true", help="skip the crash-guarding compile children")
    ap.add_argument("--warmup-child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    dk, dv = map(int, a.dims.split("x"))

    if a.warmup_child is not None:
        warmup_child(a, [int(i) for i in a.warmup_child.split(",") if i])
        return

    if a.compile_sm90:
        print(f"sm_90 compile (Triton {triton.__version__}), bf16 G=16 Dk={dk} Dv={dv}")
        compile_sm90(ptxas=a.ptxas, dims=(dk, dv), tmas=(True, False))
        print("one-loop kernel, warp specialization at num_warps=4:")
        compile_sm90(configs=WS_ONE_LOOP_CONFIGS, ptxas=a.ptxas, dims=(dk, dv), tmas=(True,), one_loop=True)
        return

    cuda = torch.cuda.is_available()
    if not cuda:
        print(f"no CUDA: interpreter self-check (Triton {triton.__version__}), then a dry run at tiny T")
        if not a.skip_check:
            ok = self_check()
            # non-power-of-two group with 2 KV heads: the q box reads the next group's heads (never stored)
            ok &= self_check(Ts=(200,), Gs=(3,), dims=((64, 64),), H_=2)
            print("self-check:", "PASS" if ok else "FAIL")
        a.T, a.B = 96, 1

    from nsa.ops.compressed import compressed_attention_fwd
    dev = "cuda" if cuda else "cpu"
    T, B = a.T, a.B
    hq, h = (HQ, H) if cuda else (4, 1)
    q, k, v = _inputs(B, T, hq, h, dk, dv, dev)
    scale = dk ** -0.5
    flops = 2 * (dk + dv) * hq * B * visible_pairs(T, KS, ST)  # = 4 * HQ * D * pairs at Dk = Dv = D

    def bench(fn):
        if cuda:
            return triton.testing.do_bench(fn, return_mode="median")
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3

    vs = variants(cuda)
    errors = {}
    if cuda and not a.no_precompile:
        t0 = time.time()
        errors = precompile(a, len(vs))
        print(f"compiled {len(vs)} variants in child processes ({time.time() - t0:.0f} s), {len(errors)} failed",
              flush=True)

    ro, rlse = compressed_attention_fwd(q, k, v, KS, ST, scale, None)
    ms = bench(lambda: compressed_attention_fwd(q, k, v, KS, ST, scale, None))
    print(f"B={B} T={T} HQ={hq} H={h} Dk={dk} Dv={dv} bf16 ks={KS} st={ST}: {flops / 1e12:.3f} TFLOP "
          f"(Triton {triton.__version__})")
    print(f"{'variant':58s} {'ms':>9s} {'TFLOP/s':>8s} {'max|do|':>9s} {'max|dlse|':>9s}")
    print(f"{'library compressed_attention_fwd':58s} {ms:9.3f} {flops / ms / 1e9:8.1f}", flush=True)
    fin = torch.isfinite(rlse)
    for i, x in enumerate(vs):
        name = vname(x)
        if i in errors:
            print(f"{name:58s} FAILED (compile) {errors[i]}", flush=True)
            continue
        try:
            fn = lambda x=x: cmp_fwd_exp(q, k, v, KS, ST, scale, **x)  # noqa: E731
            o, lse = fn()
            if cuda:
                torch.cuda.synchronize()
            do = (o.float() - ro.float()).abs().max().item() if o.numel() else 0.
            same_inf = torch.equal(torch.isfinite(lse), fin)
            dl = (lse[fin] - rlse[fin]).abs().max().item() if fin.any() else 0.
            t = bench(fn)
            print(f"{name:58s} {t:9.3f} {flops / t / 1e9:8.1f} {do:9.2e} {dl:9.2e}"
                  f"{'' if same_inf else '  (-inf positions differ!)'}", flush=True)
        except Exception as e:  # noqa: BLE001 (compile failures, out of shared memory, ...)
            print(f"{name:58s} FAILED {_first_line(e)}", flush=True)
            if cuda:
                try:
                    torch.cuda.synchronize()
                except Exception:  # noqa: BLE001
                    pass


if __name__ == "__main__":
    main()
