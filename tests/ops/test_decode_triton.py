"""Triton NSA decoding (nsa.ops.decode_triton) against the decode reference.

Runs under the interpreter on CPU (tests/conftest.py) and natively on CUDA when present. The
caches are padded past every sequence and the padding holds NaN for the kernel (finite junk for
the reference), so any read of the padding shows up as a non-finite output.
"""

import pytest
import torch

from nsa.cache import NSACache  # noqa: F401  (the layer test below drives it)
from nsa.ops.decode import nsa_decode, nsa_decode_reference
from nsa.ops.decode_triton import DecodePlan, decode_fwd, default_plan
from nsa.ops.utils import num_compressed, overlap_matrix
from tests.helpers import assert_close
from tests.ops.test_decode import ORDER, _build
from tests.test_layer import make_layer, tiny

DEV = "cuda" if torch.cuda.is_available() else "cpu"

# (id, HQ, H, Dk, Dv, lens, NSA settings). Lengths: 1, kernel_size - 1, kernel_size, and an odd
# length spanning several blocks.
CASES = [
    ("G1_DkDv_k8s4b8_n2_w1", 2, 2, 16, 8, [1, 7, 8, 61],
     dict(kernel_size=8, stride=4, block_size=8, num_selected=2, num_initial=1, num_local=1, window_size=1)),
    ("G3_k16s8b16_n5_wide_window", 6, 2, 8, 16, [1, 15, 16, 83],
     dict(kernel_size=16, stride=8, block_size=16, num_selected=5, num_initial=1, num_local=2, window_size=200)),
    ("G16_k8s4b8_n5", 16, 1, 16, 16, [1, 7, 8, 57],
     dict(kernel_size=8, stride=4, block_size=8, num_selected=5, num_initial=1, num_local=2, window_size=9)),
    ("G4_block_lt_kernel_no_forced", 8, 2, 16, 16, [3, 15, 16, 71],
     dict(kernel_size=16, stride=4, block_size=8, num_selected=5, num_initial=0, num_local=0, window_size=12)),
    # a block of 17 compressed tokens: its score gathers three tiles of the split plan's 16
    ("G2_long_block_k8s4b64", 4, 2, 16, 16, [1, 7, 64, 333],
     dict(kernel_size=8, stride=4, block_size=64, num_selected=3, num_initial=1, num_local=1, window_size=20)),
]

# Small tiles and splits, so that tiny caches still take several splits per branch, several
# scoring programs and several top-n chunks.
SPLIT_PLAN = DecodePlan(tile=16, cmp_split=16, win_split=16, slc_split=2, score_blocks=4, topk_chunk=4)
# The plan's variants (off by default): the top-n by a partial bitonic sort per chunk
# (tl.topk) and per-tile block sums instead of kept scores; NEW is said of the default tiling
# with both on.
VARIANTS_PLAN = SPLIT_PLAN._replace(topk_sort=True, tile_sums=True)
NEW = "default_with_variants"


def _inputs(case, dtype, seed=0):
    """(padded inputs for the reference, the same with NaN padding for the kernel, seq_lens)."""
    _, HQ, H, Dk, Dv, lens, cfg = case
    pad, _, seq_lens = _build(HQ, H, Dk, Dv, lens, cfg, dtype, extra_cap=21, win_extra=11, seed=seed)
    nan = {k: v.clone() for k, v in pad.items()}
    for n, L in enumerate(lens):
        Tc = num_compressed(L, cfg["kernel_size"], cfg["stride"])
        for name in ("k_cmp", "v_cmp"):
            nan[name][n, Tc:] = float("nan")
        for name in ("k_slc", "v_slc", "k_win", "v_win"):
            nan[name][n, L:] = float("nan")
    to = lambda d: [d[k].to(DEV) for k in ORDER]  # noqa: E731
    return to(pad), to(nan), seq_lens.to(DEV)


def _scores64(args, seq_lens, cfg, scale):
    """float64 block scores ``[N, H, NB]`` of the decode queries (the reference's formula)."""
    q, k_cmp = args[0].double(), args[1].double()
    N, HQ, Dk = q.shape
    Tc, H = k_cmp.shape[1], k_cmp.shape[2]
    t = seq_lens.long() - 1
    vis = (torch.arange(Tc, device=q.device).view(1, Tc) * cfg["stride"] + cfg["kernel_size"] - 1) <= t.view(N, 1)
    s = torch.einsum("nhgd,nchd->nhgc", q.view(N, H, HQ // H, Dk), k_cmp) * scale
    s = torch.where(vis.view(N, 1, 1, Tc), s, float("-inf"))
    p = torch.nan_to_num(torch.softmax(s, -1), nan=0.0)  # rows with nothing visible: all zero
    NB = -(-args[3].shape[1] // cfg["block_size"])
    w = overlap_matrix(Tc, NB, cfg["kernel_size"], cfg["stride"], cfg["block_size"], q.device, torch.float64)
    return torch.einsum("nhgc,cj->nhj", p, w)


def _check_rows(idx, score, seq_lens, cfg, tol=1e-5):
    """Every row of ``idx`` ``[N, H, S]`` is a valid top-n under the rule, scores in float64."""
    N, H, S = idx.shape
    bs = cfg["block_size"]
    for n in range(N):
        t_blk = (int(seq_lens[n]) - 1) // bs
        forced = {j for j in range(t_blk + 1) if j < cfg["num_initial"] or j > t_blk - cfg["num_local"]}
        for h in range(H):
            row = idx[n, h].tolist()
            k = min(S, t_blk + 1)
            ids = row[:k]
            assert row[k:] == [-1] * (S - k), f"({n}, {h}): {row} should end with {S - k} x -1"
            assert ids == sorted(set(ids)) and all(0 <= j <= t_blk for j in ids), f"({n}, {h}): bad row {row}"
            assert forced <= set(ids), f"({n}, {h}): forced blocks {sorted(forced)} missing from {row}"
            free = [j for j in ids if j not in forced]
            rest = [j for j in range(t_blk + 1) if j not in ids]
            if free and rest:
                lo = min(float(score[n, h, j]) for j in free)
                hi = max(float(score[n, h, j]) for j in rest)
                assert lo >= hi - tol * (1 + abs(hi)), f"({n}, {h}): chose a block scoring {lo} over one scoring {hi}"


def _run(args, seq_lens, cfg, plan):
    if plan is None:
        return nsa_decode(*args, seq_lens, return_block_indices=True, backend="triton", **cfg)
    if plan == NEW:
        q, k_cmp, k_slc, k_win = args[0], args[1], args[3], args[5]
        N, H = q.shape[0], k_cmp.shape[2]
        plan = default_plan(N, H, k_cmp.shape[1], -(-k_slc.shape[1] // cfg["block_size"]),
                            min(cfg["window_size"], k_win.shape[1]), cfg["block_size"], cfg["num_selected"],
                            q.dtype)._replace(topk_sort=True, tile_sums=True)
    kw = dict(cfg, scale=args[0].shape[-1] ** -0.5)
    return decode_fwd(*args, seq_lens, **kw, plan=plan)


@pytest.mark.parametrize("plan", [None, SPLIT_PLAN, NEW, VARIANTS_PLAN],
                         ids=["default_plan", "split_plan", "default_variants", "split_variants"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2), (torch.float16, 2e-3)],
                         ids=["f32", "bf16", "f16"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_decode_triton_matches_reference(case, dtype, tol, plan):
    """Output within ``tol`` of the float32 reference (16-bit: the reference runs on the same
    values upcast to float32; the kernel rounds probabilities before P.V and the output once,
    2^-8 / 2^-11 relative at most); every selection row valid, and >= 99% of rows identical."""
    cfg = case[6]
    ref_args, args, seq_lens = _inputs(case, dtype)
    scale = args[0].shape[-1] ** -0.5
    o_ref, idx_ref = nsa_decode_reference(*(a.float() for a in ref_args), seq_lens, **cfg, scale=scale,
                                          return_block_indices=True)
    o, idx = _run(args, seq_lens, cfg, plan)
    assert o.dtype == dtype and idx.dtype == torch.int32 and idx.shape == idx_ref.shape
    assert_close("o", o_ref, o.float(), tol)
    _check_rows(idx.cpu(), _scores64(ref_args, seq_lens, cfg, scale).cpu(), seq_lens.cpu(), cfg)
    same = (idx == idx_ref).all(-1)
    assert same.sum() >= 0.99 * same.numel(), f"only {int(same.sum())} of {same.numel()} rows equal the reference"


def test_decode_triton_float64_and_no_grad():
    """float64 runs in float32 and comes back as float64; inputs that require grad give
    outputs that do not (inference only); two runs are bitwise identical."""
    case = CASES[2]
    cfg = case[6]
    ref_args, args, seq_lens = _inputs(case, torch.float64)
    args = [a.requires_grad_() for a in args]
    o, idx = nsa_decode(*args, seq_lens, return_block_indices=True, backend="triton", **cfg)
    assert o.dtype == torch.float64 and not o.requires_grad
    o_ref, idx_ref = nsa_decode(*ref_args, seq_lens, return_block_indices=True, backend="reference", **cfg)
    assert_close("o", o_ref, o, 1e-5)
    assert torch.equal(idx, idx_ref)
    o2, idx2 = nsa_decode(*args, seq_lens, return_block_indices=True, backend="triton", **cfg)
    assert torch.equal(o, o2) and torch.equal(idx, idx2)


def test_decode_triton_empty_compressed_cache_shared_kv():
    """Tc_cap = 0 (no sequence long enough to compress) and k_win aliasing k_slc."""
    cfg = dict(kernel_size=8, stride=4, block_size=8, num_selected=3, num_initial=1, num_local=1, window_size=4)
    ref_args, args, seq_lens = _inputs(("short", 4, 2, 16, 16, [2, 5, 7], cfg), torch.float32)
    for a in (ref_args, args):
        a[1], a[2] = a[1][:, :0], a[2][:, :0]
        a[5], a[6] = a[3], a[4]
    o_ref = nsa_decode(*ref_args, seq_lens, backend="reference", **cfg)
    assert_close("o", o_ref, nsa_decode(*args, seq_lens, backend="triton", **cfg), 1e-5)


def test_layer_prefill_then_triton_decode_equals_full(monkeypatch):
    """NSACache-driven decoding with NSA_BACKEND=triton == the full forward (reference), float32."""
    m = make_layer(tiny(backend=None, v_head_dim=8), dtype=torch.float32).to(DEV)
    x = torch.randn(2, 22, 64, device=DEV)
    monkeypatch.setenv("NSA_BACKEND", "reference")
    with torch.no_grad():
        full = m(x)
    monkeypatch.setenv("NSA_BACKEND", "triton")
    cache = m.new_cache()
    with torch.no_grad():
        y0 = m(x[:, :9], cache=cache)
        y1 = torch.cat([m(x[:, t:t + 1], cache=cache) for t in range(9, x.shape[1])], 1)
    assert_close("prefill", full[:, :9], y0, 1e-4)
    assert_close("decoded", full[:, 9:], y1, 1e-4)


def test_decode_triton_under_torch_compile():
    """The decode kernels are one custom op (nsa::nsa_decode): a step traces as one graph under
    torch.compile(fullgraph=True) and matches eager; the op passes torch.library.opcheck."""
    from nsa.ops.decode_triton import _decode_op

    case = CASES[1]
    cfg = case[6]
    _, args, seq_lens = _inputs(case, torch.float32)

    def step(*a):
        return nsa_decode(*a, return_block_indices=True, backend="triton", **cfg)

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    o, idx = step(*args, seq_lens)
    oc, idxc = compiled(*args, seq_lens)
    assert torch.equal(o, oc) and torch.equal(idx, idxc)
    torch.library.opcheck(_decode_op, (*args, seq_lens, *(cfg[k] for k in ORDER_DECODE), 0.25),
                          test_utils=("test_schema", "test_faketensor"))


ORDER_DECODE = ("kernel_size", "stride", "block_size", "num_selected", "num_initial", "num_local", "window_size")
