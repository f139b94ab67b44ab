"""Every class of invalid input to every public op is a ValueError that names the argument.

One valid set of arguments (:func:`valid`) is spoiled one argument at a time; each row of
the tables below says which op, what is spoiled, and which name the message must carry.
"""

from __future__ import annotations

import re

import pytest
import torch

import nsa.ops as ops

B, T, HQ, H, DK, DV = 1, 20, 4, 2, 8, 4
KS, ST, BS = 8, 4, 8
TC = (T - KS) // ST + 1  # 4 compressed tokens
NB = -(-T // BS)  # 3 selection blocks
OPS = ("compressed_attention", "select_blocks", "selected_attention", "sliding_window_attention", "nsa")


def valid():
    """A valid value for every argument name used by any op."""
    g = torch.Generator().manual_seed(0)

    def rnd(*s):
        return torch.randn(*s, generator=g, dtype=torch.float64)

    a = dict(q=rnd(B, T, HQ, DK), k_cmp=rnd(B, TC, H, DK), v_cmp=rnd(B, TC, H, DV), k=rnd(B, T, H, DK),
             v=rnd(B, T, H, DV), g_cmp=rnd(B, T, HQ).sigmoid(), g_slc=rnd(B, T, HQ).sigmoid(),
             g_win=rnd(B, T, HQ).sigmoid(), kernel_size=KS, stride=ST, block_size=BS, num_selected=3,
             num_initial=1, num_local=1, window_size=5, scale=None, cu_seqlens=None, backend="reference")
    a["lse"] = ops.compressed_attention(a["q"], a["k_cmp"], a["v_cmp"], KS, ST, backend="reference")[1]
    a["block_indices"] = torch.tensor([0, 2, -1], dtype=torch.int32).expand(B, T, H, 3).contiguous()
    a["block_indices"][:, :BS] = torch.tensor([0, -1, -1], dtype=torch.int32)
    return a


def call(op, a):
    """Runs public op ``op`` with the arguments it takes from dict ``a``."""
    common = dict(scale=a["scale"], cu_seqlens=a["cu_seqlens"], backend=a["backend"])
    sel = {n: a[n] for n in ("kernel_size", "stride", "block_size", "num_selected", "num_initial", "num_local")}
    if op == "compressed_attention":
        return ops.compressed_attention(a["q"], a["k_cmp"], a["v_cmp"], a["kernel_size"], a["stride"], **common)
    if op == "select_blocks":
        return ops.select_blocks(a["q"], a["k_cmp"], a["lse"], **sel, **common)
    if op == "selected_attention":
        return ops.selected_attention(a["q"], a["k"], a["v"], a["block_indices"], a["block_size"], **common)
    if op == "sliding_window_attention":
        return ops.sliding_window_attention(a["q"], a["k"], a["v"], a["window_size"], **common)
    return ops.nsa(a["q"], a["k_cmp"], a["v_cmp"], a["k"], a["v"], a["k"], a["v"], a["g_cmp"], a["g_slc"],
                   a["g_win"], **sel, window_size=a["window_size"], **common)


def expect_error(op, name, **spoil):
    if op == "nsa":  # nsa receives k, v as its selected (and window) branch keys/values
        name = {"k": "k_slc", "v": "v_slc"}.get(name, name)
    a = valid()
    a.update(spoil)
    with pytest.raises(ValueError, match=rf"(^|\W){re.escape(name)}\W"):
        call(op, a)


@pytest.mark.parametrize("op", OPS)
def test_valid_arguments_pass(op):
    call(op, valid())


@pytest.mark.parametrize("op", OPS)
def test_valid_packed_arguments_pass(op):
    a = valid()
    cu = torch.tensor([0, 9, 20], dtype=torch.int32)  # 1 + 1 compressed tokens
    a.update(cu_seqlens=cu, k_cmp=a["k_cmp"][:, :2], v_cmp=a["v_cmp"][:, :2],
             block_indices=torch.tensor([1, -1, 0], dtype=torch.int32).expand(B, T, H, 3))  # 2 blocks each
    a["lse"] = ops.compressed_attention(a["q"], a["k_cmp"], a["v_cmp"], KS, ST, cu_seqlens=cu, backend="reference")[1]
    call(op, a)


def _f64(*s):
    return torch.zeros(*s, dtype=torch.float64)


def _cu(*offsets):
    return torch.tensor(offsets, dtype=torch.int32)


# Rows: (id, the ops it applies to, the argument name the message must carry, valid() -> spoiled arguments).
QKV = ("compressed_attention", "selected_attention", "sliding_window_attention", "nsa")
RAW = ("selected_attention", "sliding_window_attention", "nsa")
CMP = ("compressed_attention", "select_blocks", "nsa")
SEL = ("select_blocks", "nsa")
SLC = ("selected_attention",)
ALL = OPS
META = torch.device("meta")

CASES = [
    # heads
    ("heads-not-divisible", ALL, "q", lambda a: dict(q=_f64(B, T, 3, DK), lse=_f64(B, T, 3), g_cmp=_f64(B, T, 3),
                                                      g_slc=_f64(B, T, 3), g_win=_f64(B, T, 3))),
    ("v-heads-not-k-heads", RAW, "v", lambda a: dict(v=_f64(B, T, 1, DV))),
    ("v_cmp-heads-not-k_cmp-heads", ("compressed_attention", "nsa"), "v_cmp", lambda a: dict(v_cmp=_f64(B, TC, 1, DV))),
    # head dims
    ("k-Dk-mismatch", RAW, "k", lambda a: dict(k=_f64(B, T, H, DK + 1))),
    ("k_cmp-Dk-mismatch", CMP, "k_cmp", lambda a: dict(k_cmp=_f64(B, TC, H, DK + 1))),
    ("zero-head-dim", QKV, "q", lambda a: dict(q=_f64(B, T, HQ, 0), k=_f64(B, T, H, 0), k_cmp=_f64(B, TC, H, 0))),
    # token counts and batch
    ("k-wrong-T", RAW, "k", lambda a: dict(k=_f64(B, T - 1, H, DK))),
    ("v-wrong-T", RAW, "v", lambda a: dict(v=_f64(B, T + 1, H, DV))),
    ("k-wrong-batch", RAW, "k", lambda a: dict(k=_f64(B + 1, T, H, DK), v=_f64(B + 1, T, H, DV))),
    ("k_cmp-wrong-count", CMP, "k_cmp", lambda a: dict(k_cmp=_f64(B, TC + 1, H, DK), v_cmp=_f64(B, TC + 1, H, DV))),
    ("k_cmp-wrong-packed-count", CMP, "k_cmp", lambda a: dict(cu_seqlens=_cu(0, 9, 20),
                                                                lse=_f64(B, T, HQ))),
    ("v_cmp-wrong-count", ("compressed_attention", "nsa"), "v_cmp", lambda a: dict(v_cmp=_f64(B, TC - 1, H, DV))),
    # ranks, types, dtypes
    ("q-3d", ALL, "q", lambda a: dict(q=_f64(B, T, HQ))),
    ("q-not-a-tensor", ALL, "q", lambda a: dict(q=a["q"].tolist())),
    ("q-int", ALL, "q", lambda a: dict(q=a["q"].to(torch.int32))),
    ("k-mixed-dtype", RAW, "k", lambda a: dict(k=a["k"].float())),
    ("v-mixed-dtype", RAW, "v", lambda a: dict(v=a["v"].float())),
    ("k_cmp-mixed-dtype", CMP, "k_cmp", lambda a: dict(k_cmp=a["k_cmp"].float())),
    ("v_cmp-mixed-dtype", ("compressed_attention", "nsa"), "v_cmp", lambda a: dict(v_cmp=a["v_cmp"].float())),
    # devices
    ("k-on-meta", RAW, "k", lambda a: dict(k=a["k"].to(META))),
    ("v-on-meta", RAW, "v", lambda a: dict(v=a["v"].to(META))),
    ("k_cmp-on-meta", CMP, "k_cmp", lambda a: dict(k_cmp=a["k_cmp"].to(META))),
    ("cu_seqlens-on-meta", ALL, "cu_seqlens", lambda a: dict(cu_seqlens=torch.tensor([0, T], dtype=torch.int32,
                                                                                      device=META))),
    # compression / selection / window sizes
    ("kernel_size-not-multiple-of-stride", CMP, "kernel_size", lambda a: dict(kernel_size=6)),
    ("block_size-not-multiple-of-stride", SEL, "block_size", lambda a: dict(block_size=6)),
    ("too-many-forced", SEL, "num_initial", lambda a: dict(num_initial=2, num_local=2)),
    ("kernel_size-0", CMP, "kernel_size", lambda a: dict(kernel_size=0)),
    ("kernel_size-float", CMP, "kernel_size", lambda a: dict(kernel_size=8.0)),
    ("stride-0", CMP, "stride", lambda a: dict(stride=0)),
    ("stride-negative", CMP, "stride", lambda a: dict(stride=-4)),
    ("block_size-0", SEL + ("selected_attention",), "block_size", lambda a: dict(block_size=0)),
    ("block_size-bool", SEL + ("selected_attention",), "block_size", lambda a: dict(block_size=True)),
    ("num_selected-0", SEL, "num_selected", lambda a: dict(num_selected=0, num_initial=0, num_local=0)),
    ("num_initial-negative", SEL, "num_initial", lambda a: dict(num_initial=-1)),
    ("num_local-negative", SEL, "num_local", lambda a: dict(num_local=-1)),
    ("window_size-0", ("sliding_window_attention", "nsa"), "window_size", lambda a: dict(window_size=0)),
    ("window_size-None", ("sliding_window_attention", "nsa"), "window_size", lambda a: dict(window_size=None)),
    # scale and backend
    ("scale-0", ALL, "scale", lambda a: dict(scale=0.0)),
    ("scale-negative", ALL, "scale", lambda a: dict(scale=-1.0)),
    ("scale-nan", ALL, "scale", lambda a: dict(scale=float("nan"))),
    ("scale-inf", ALL, "scale", lambda a: dict(scale=float("inf"))),
    ("scale-str", ALL, "scale", lambda a: dict(scale="0.5")),
    ("scale-tensor", ALL, "scale", lambda a: dict(scale=torch.tensor(0.5))),
    ("backend-unknown", ALL, "backend", lambda a: dict(backend="cuda")),
    ("backend-case", ALL, "backend", lambda a: dict(backend="Reference")),
    # cu_seqlens
    ("cu_seqlens-not-from-0", ALL, "cu_seqlens", lambda a: dict(cu_seqlens=_cu(1, T))),
    ("cu_seqlens-not-increasing", ALL, "cu_seqlens",
     lambda a: dict(cu_seqlens=_cu(0, 10, 10, T))),
    ("cu_seqlens-decreasing", ALL, "cu_seqlens", lambda a: dict(cu_seqlens=_cu(0, 12, 8, T))),
    ("cu_seqlens-last-not-T", ALL, "cu_seqlens", lambda a: dict(cu_seqlens=_cu(0, T - 1))),
    ("cu_seqlens-past-T", ALL, "cu_seqlens", lambda a: dict(cu_seqlens=_cu(0, T + 1))),
    ("cu_seqlens-int64", ALL, "cu_seqlens", lambda a: dict(cu_seqlens=torch.tensor([0, T]))),
    ("cu_seqlens-float", ALL, "cu_seqlens", lambda a: dict(cu_seqlens=torch.tensor([0.0, T]))),
    ("cu_seqlens-2d", ALL, "cu_seqlens", lambda a: dict(cu_seqlens=torch.tensor([[0, T]], dtype=torch.int32))),
    ("cu_seqlens-one-offset", ALL, "cu_seqlens", lambda a: dict(cu_seqlens=_cu(0))),
    ("cu_seqlens-list", ALL, "cu_seqlens", lambda a: dict(cu_seqlens=[0, T])),
    ("cu_seqlens-with-batch-2", ALL, "cu_seqlens",
     lambda a: dict(cu_seqlens=_cu(0, T),
                    **{n: torch.cat([a[n], a[n]]) for n in ("q", "k_cmp", "v_cmp", "k", "v", "lse", "g_cmp",
                                                            "g_slc", "g_win", "block_indices")})),
    # lse (select_blocks)
    ("lse-wrong-heads", ("select_blocks",), "lse", lambda a: dict(lse=a["lse"][..., :-1])),
    ("lse-wrong-T", ("select_blocks",), "lse", lambda a: dict(lse=a["lse"][:, :-1])),
    ("lse-4d", ("select_blocks",), "lse", lambda a: dict(lse=a["lse"][..., None])),
    ("lse-float16", ("select_blocks",), "lse", lambda a: dict(lse=a["lse"].half())),
    ("lse-int", ("select_blocks",), "lse", lambda a: dict(lse=a["lse"].long())),
    ("lse-on-meta", ("select_blocks",), "lse", lambda a: dict(lse=a["lse"].to(META))),
    # block_indices (selected_attention)
    ("block_indices-past-sequence", SLC, "block_indices",
     lambda a: dict(block_indices=torch.where(a["block_indices"] == 2, NB, a["block_indices"]))),
    ("block_indices-below-minus-1", SLC, "block_indices",
     lambda a: dict(block_indices=torch.where(a["block_indices"] == -1, -2, a["block_indices"]))),
    ("block_indices-repeated", SLC, "block_indices",
     lambda a: dict(block_indices=torch.where(a["block_indices"] == -1, 0, a["block_indices"]))),
    ("block_indices-repeated-adjacent", SLC, "block_indices",
     lambda a: dict(block_indices=torch.tensor([0, 1, 1, -1], dtype=torch.int32).expand(B, T, H, 4))),
    ("block_indices-repeated-unsorted", SLC, "block_indices",
     lambda a: dict(block_indices=torch.tensor([1, -1, 0, 1], dtype=torch.int32).expand(B, T, H, 4))),
    ("block_indices-other-sequence", SLC, "block_indices",
     lambda a: dict(cu_seqlens=_cu(0, 4, T),
                    block_indices=torch.tensor([1, -1], dtype=torch.int32).expand(B, T, H, 2))),
    ("block_indices-int64", SLC, "block_indices", lambda a: dict(block_indices=a["block_indices"].long())),
    ("block_indices-float", SLC, "block_indices", lambda a: dict(block_indices=a["block_indices"].float())),
    ("block_indices-wrong-heads", SLC, "block_indices",
     lambda a: dict(block_indices=a["block_indices"][:, :, :1])),
    ("block_indices-wrong-T", SLC, "block_indices",
     lambda a: dict(block_indices=a["block_indices"][:, :-1])),
    ("block_indices-no-slots", SLC, "block_indices",
     lambda a: dict(block_indices=a["block_indices"][..., :0])),
    ("block_indices-3d", SLC, "block_indices", lambda a: dict(block_indices=a["block_indices"][..., 0])),
    ("block_indices-on-meta", SLC, "block_indices",
     lambda a: dict(block_indices=a["block_indices"].to(META))),
    # gates (nsa)
    ("g_cmp-wrong-shape", ("nsa",), "g_cmp", lambda a: dict(g_cmp=a["g_cmp"][..., :-1])),
    ("g_slc-wrong-T", ("nsa",), "g_slc", lambda a: dict(g_slc=a["g_slc"][:, 1:])),
    ("g_win-4d", ("nsa",), "g_win", lambda a: dict(g_win=a["g_win"][..., None])),
    ("g_win-int", ("nsa",), "g_win", lambda a: dict(g_win=a["g_win"].long())),
    ("g_slc-on-meta", ("nsa",), "g_slc", lambda a: dict(g_slc=a["g_slc"].to(META))),
]

ROWS = [pytest.param(op, name, spoil, id=f"{op}-{cid}") for cid, ops_, name, spoil in CASES for op in ops_]


@pytest.mark.parametrize("op,name,spoil", ROWS)
def test_invalid_input_raises_value_error_naming_it(op, name, spoil):
    a = valid()
    expect_error(op, name, **spoil(a))


# nsa's own per-branch raw keys/values are checked under their own names.
NSA_RAW = [
    ("k_slc", (B, T, H, DK + 1)), ("v_slc", (B, T, H, DV + 1)), ("k_win", (B, T - 1, H, DK)),
    ("v_win", (B, T, 1, DV)), ("k_slc", "meta"), ("v_win", "meta"), ("k_win", "float32"), ("v_slc", "list"),
]


@pytest.mark.parametrize("name,bad", NSA_RAW, ids=[f"{n}-{b}" for n, b in NSA_RAW])
def test_nsa_branch_kv_named(name, bad):
    a = valid()
    x = dict(k_slc=a["k"], v_slc=a["v"], k_win=a["k"], v_win=a["v"])
    if bad == "meta":
        x[name] = x[name].to(META)
    elif bad == "float32":
        x[name] = x[name].float()
    elif bad == "list":
        x[name] = x[name].tolist()
    else:
        x[name] = _f64(*bad)
    with pytest.raises(ValueError, match=rf"^{name}\W"):
        ops.nsa(a["q"], a["k_cmp"], a["v_cmp"], x["k_slc"], x["v_slc"], x["k_win"], x["v_win"], a["g_cmp"],
                a["g_slc"], a["g_win"], kernel_size=KS, stride=ST, block_size=BS, num_selected=3, num_initial=1,
                num_local=1, window_size=5, backend="reference")


def _flags_by_rows(bi, limits):
    """Brute force over every row: [an entry out of range, a row with a repeated block]."""
    out, rep = False, False
    B, T, H, S = bi.shape
    for b in range(B):
        for t in range(T):
            for h in range(H):
                row = bi[b, t, h].tolist()
                out |= any(x < -1 or x >= limits[t] for x in row)
                valid = [x for x in row if x >= 0]
                rep |= len(set(valid)) != len(valid)
    return [out, rep]


@pytest.mark.parametrize("S", [1, 3, 16, 33])
@pytest.mark.parametrize("packed", [False, True])
def test_block_indices_check_paths_agree(S, packed):
    """The Triton check (one pass, the path for CUDA tensors; here under the interpreter) and
    the torch check give the brute-force flags on random rows, spoiled one row at a time."""
    from nsa.ops import checks
    g = torch.Generator().manual_seed(S)
    Bn, Tn, Hn, bs = (1, 37, 3, 4) if packed else (2, 19, 2, 4)
    cu = [0, 10, 11, 37] if packed else None
    limits = [-(-(b - a) // bs) for a, b in zip(cu[:-1], cu[1:]) for _ in range(b - a)] if packed \
        else [-(-Tn // bs)] * Tn
    base = torch.full((Bn, Tn, Hn, S), -1, dtype=torch.int32)
    for t in range(Tn):  # distinct valid ids in random order, some -1
        perm = torch.randperm(limits[t], generator=g)[:S]
        base[:, t, :, :perm.numel()] = perm.to(torch.int32)
    cases = [base]
    for kind in ("past", "below", "repeat"):
        x = base.clone()
        t = int(torch.randint(Tn, (1,), generator=g))
        if kind == "past":
            x[-1, t, -1, S - 1] = limits[t]
        elif kind == "below":
            x[0, t, 0, 0] = -2
        elif S > 1:
            x[0, t, Hn - 1, S - 1] = max(int(x[0, t, Hn - 1, 0]), 0)
            x[0, t, Hn - 1, 0] = x[0, t, Hn - 1, S - 1]
        cases.append(x)
    for x in cases:
        want = _flags_by_rows(x, limits)
        assert checks._block_indices_flags(x, bs, cu) == want
        assert checks._block_indices_flags_torch(x, bs, cu) == want
    assert checks._block_indices_flags(cases[1], bs, cu)[0] and checks._block_indices_flags(cases[2], bs, cu)[0]
    if S > 1:
        assert checks._block_indices_flags(cases[3], bs, cu)[1]
