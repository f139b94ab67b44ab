"""Triton top-n block selection against the contract and the reference.

Runs on CUDA when present, else on CPU under TRITON_INTERPRET=1 (set by tests/conftest.py),
always through the public op with ``backend='triton'``. Every row is checked with the tie-aware
property checker (:func:`tests.ops.selection_check.check_selection`); with float64 inputs, whose
reference scores are exact enough to tell near-ties apart, every row without a near-tie must
equal the reference selection exactly.
"""

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from nsa.ops import compressed_attention, select_blocks
from nsa.ops.reference import block_scores
from nsa.ops.selection import selection_fwd
from nsa.ops.utils import compressed_cu_seqlens, num_compressed

from .selection_check import check_selection

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# The kernel scores in float32 with another summation order (and exp2) than the reference:
# scores agree to a few float32 ulps of the probability sums, ~1e-6 relative; 1e-5 absolute
# plus relative slack (the checker's form) only forgives genuine near-ties.
TOL = 1e-5


@dataclass(frozen=True)
class Case:
    id: str
    B: int
    T: object  # int (dense) or list of packed sequence lengths
    HQ: int
    H: int
    D: int
    ks: int  # kernel_size
    st: int  # stride
    bs: int  # block_size
    n: int  # num_selected
    ni: int = 1  # num_initial
    nl: int = 2  # num_local
    dtype: torch.dtype = torch.float32
    scale: float = None


# Most cases leave free slots (more causal blocks than num_selected, beyond the forced ones):
# only those test the scores. The rest are edges (nothing visible, fewer blocks than slots).
CASES = [
    Case("T1-G1-32/16/64-n16", 1, 1, 1, 1, 16, 32, 16, 64, 16),
    Case("T31-G2-16/8/16-n3", 1, 31, 4, 2, 16, 16, 8, 16, 3),
    Case("T64-G3-8/4/32-n1-ni0-nl0", 1, 64, 3, 1, 24, 8, 4, 32, 1, 0, 0),
    Case("T65-G16-16/8/16-n1-ni1-nl0", 1, 65, 16, 1, 16, 16, 8, 16, 1, 1, 0),
    Case("T200-G16-16/8/16-n3-nl1", 1, 200, 16, 1, 32, 16, 8, 16, 3, 1, 1),
    Case("T200-G1-8/4/32-n3-ni0-nl1-B2", 2, 200, 2, 2, 16, 8, 4, 32, 3, 0, 1),
    Case("T200-G2-16/8/16-n4-ni0-nl0", 1, 200, 2, 1, 16, 16, 8, 16, 4, 0, 0),
    Case("T333-G2-16/8/16-n8", 1, 333, 2, 1, 16, 16, 8, 16, 8),
    Case("T333-G3-8/4/32-n3-nl1-bf16", 1, 333, 6, 2, 16, 8, 4, 32, 3, 1, 1, dtype=torch.bfloat16),
    Case("T333-G16-16/16/16-n8-bf16", 1, 333, 16, 1, 16, 16, 16, 16, 8, dtype=torch.bfloat16),
    Case("T333-G3-32/16/64-n3-nl1-scale", 1, 333, 3, 1, 16, 32, 16, 64, 3, 1, 1, scale=0.7),
    Case("T333-G2-8/4/32-n1-ni0-nl0-fp16", 1, 333, 2, 1, 16, 8, 4, 32, 1, 0, 0, dtype=torch.float16),
    Case("T600-G1-16/16/16-n32-D40", 1, 600, 1, 1, 40, 16, 16, 16, 32),
    # head dims as two tiles (split_dim): 96 = 64 + 32, 48 = 32 + 16
    Case("T333-G16-32/16/64-n8-D96-bf16", 1, 333, 16, 1, 96, 32, 16, 64, 8, dtype=torch.bfloat16),
    Case("varlen-70/140-G4-16/8/16-n4-D48-fp16", 1, [70, 140], 8, 2, 48, 16, 8, 16, 4, dtype=torch.float16),
    Case("varlen-5/70/140-G2-16/8/16-n3-nl1", 1, [5, 70, 140], 4, 2, 16, 16, 8, 16, 3, 1, 1),
    Case("varlen-5/70/140-G3-16/8/16-n8-bf16", 1, [5, 70, 140], 3, 1, 16, 16, 8, 16, 8, dtype=torch.bfloat16),
    Case("varlen-40/1/97-G16-8/4/32-n32", 1, [40, 1, 97], 16, 1, 16, 8, 4, 32, 32),
    # more than one chunk of blocks per tile: scores that straddle the chunk boundary
    Case("T1100-G2-32/16/64-n4-nl1-chunks", 1, 1100, 2, 1, 16, 32, 16, 64, 4, 1, 1),
    Case("T2200-G1-32/16/64-n32-chunks", 1, 2200, 1, 1, 16, 32, 16, 64, 32),
    Case("varlen-600/530-G1-8/4/32-n8-chunks", 1, [600, 530], 2, 2, 16, 8, 4, 32, 8),
]


def make_inputs(c: Case, dtype=None, seed=0):
    """q, k_cmp, lse (from the reference compressed attention) and cu_seqlens (or None)."""
    dtype = dtype or c.dtype
    gen = torch.Generator().manual_seed(seed)
    packed = isinstance(c.T, list)
    if packed:
        cu = torch.tensor([0] + c.T, dtype=torch.int32).cumsum(0).to(torch.int32)
        T, Tc = sum(c.T), int(compressed_cu_seqlens(cu, c.ks, c.st)[-1])
    else:
        cu = None
        T, Tc = c.T, num_compressed(c.T, c.ks, c.st)
    q = torch.randn(c.B, T, c.HQ, c.D, generator=gen).to(DEVICE, dtype)
    k_cmp = torch.randn(c.B, Tc, c.H, c.D, generator=gen).to(DEVICE, dtype)
    v_cmp = torch.randn(c.B, Tc, c.H, 8, generator=gen).to(DEVICE, dtype)
    cu = None if cu is None else cu.to(DEVICE)
    _, lse = compressed_attention(q, k_cmp, v_cmp, c.ks, c.st, scale=c.scale, cu_seqlens=cu, backend="reference")
    return q, k_cmp, lse, cu


def run(c: Case, q, k_cmp, lse, cu, backend):
    return select_blocks(q, k_cmp, lse, c.ks, c.st, c.bs, c.n, c.ni, c.nl, scale=c.scale, cu_seqlens=cu,
                         backend=backend)


@pytest.mark.parametrize("c", CASES, ids=[c.id for c in CASES])
def test_selection_valid(c):
    q, k_cmp, lse, cu = make_inputs(c)
    idx = run(c, q, k_cmp, lse, cu, "triton")
    assert idx.dtype == torch.int32 and idx.device == q.device
    check_selection(q, k_cmp, lse, idx, kernel_size=c.ks, stride=c.st, block_size=c.bs, num_selected=c.n,
                    num_initial=c.ni, num_local=c.nl, scale=c.scale, cu_seqlens=cu, tol=TOL)
    # Both sides score in float32 from the same inputs: disagreement is confined to near-ties.
    ref = run(c, q, k_cmp, lse, cu, "reference")
    match = (idx == ref).all(-1).float().mean().item()
    assert match >= 0.99, f"only {match:.3f} of the rows equal the reference selection"


def _near_tie_rows(score, ref_idx, c: Case, T):
    """``[B, T, H]`` True where the reference choice is within a relative 1e-4 of a different one:
    the lowest chosen non-forced score against the best unchosen causal score."""
    NB = score.shape[-1]
    j = torch.arange(NB, device=score.device).view(1, 1, 1, NB)
    tb = (torch.arange(T, device=score.device) // c.bs).view(1, T, 1, 1)
    causal = j <= tb
    forced = ((j < c.ni) | (j > tb - c.nl)) & causal
    chosen = torch.zeros(*score.shape[:3], NB + 1, dtype=torch.bool, device=score.device)
    chosen.scatter_(-1, torch.where(ref_idx >= 0, ref_idx.long(), NB), True)
    chosen = chosen[..., :NB]
    free = chosen & ~forced
    low_in = torch.where(free, score, float("inf")).amin(-1)
    best_out = torch.where(causal & ~chosen, score, float("-inf")).amax(-1)
    return (low_in - best_out).abs() <= 1e-4 * (1 + best_out.abs().clamp(max=1e30))


EXACT_CASES = [c for c in CASES if not isinstance(c.T, list) and c.B == 1 and c.T >= 200]


@pytest.mark.parametrize("c", EXACT_CASES, ids=[c.id.replace("-bf16", "").replace("-fp16", "") for c in EXACT_CASES])
def test_selection_exact_float64(c):
    """float64 input (the kernel rounds it to float32): rows with no near-tie equal the reference."""
    q, k_cmp, lse, cu = make_inputs(c, dtype=torch.float64, seed=1)
    idx = run(c, q, k_cmp, lse, cu, "triton")
    ref = run(c, q, k_cmp, lse, cu, "reference")
    check_selection(q, k_cmp, lse, idx, kernel_size=c.ks, stride=c.st, block_size=c.bs, num_selected=c.n,
                    num_initial=c.ni, num_local=c.nl, scale=c.scale, tol=TOL)
    score = block_scores(q, k_cmp, lse, c.ks, c.st, c.bs, c.scale)
    tie = _near_tie_rows(score, ref, c, c.T)
    assert tie.float().mean().item() < 0.05, "too many near-ties for an exactness test: change the seed"
    same = (idx == ref).all(-1)
    bad = (~same & ~tie).nonzero()
    assert bad.numel() == 0, (f"{bad.shape[0]} rows differ from the reference without a near-tie; first "
                              f"(b, t, h) = {tuple(bad[0].tolist())}: {idx[tuple(bad[0])].tolist()} vs "
                              f"{ref[tuple(bad[0])].tolist()}")


TILE_CASES = [c for c in CASES if c.id.endswith("-chunks")]


@pytest.mark.parametrize("positions", [32, 128])
@pytest.mark.parametrize("c", TILE_CASES, ids=[c.id for c in TILE_CASES])
def test_selection_tile_positions(c, positions):
    """Other query tiles (GPU sizes: 128 positions for G <= 2, 32 for G = 5..8) give the same
    selection. With them some tiles of these cases start past a whole chunk of blocks visible to
    all their positions: the unmasked path."""
    q, k_cmp, lse, cu = make_inputs(c)
    scale = c.scale or c.D ** -0.5
    idx = selection_fwd(q, k_cmp, lse, c.ks, c.st, c.bs, c.n, c.ni, c.nl, scale, cu, positions=positions)
    check_selection(q, k_cmp, lse, idx, kernel_size=c.ks, stride=c.st, block_size=c.bs, num_selected=c.n,
                    num_initial=c.ni, num_local=c.nl, scale=c.scale, cu_seqlens=cu, tol=TOL)
    assert torch.equal(idx, run(c, q, k_cmp, lse, cu, "triton"))


# Compiles (never launches) the kernel for sm_90 with the launch arguments selection_fwd builds for
# the paper shapes on the GPU (bf16, G=16, 16 positions per tile, 32/16/64, n=16) and prints the
# Triton IR after the frontend passes. Runs in a fresh interpreter: under TRITON_INTERPRET=1 the
# kernels are interpreter objects that cannot be compiled.
_COMPILE_SM90 = r"""
import sys
import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from nsa.ops import selection as S

kernel, launch = S.selection_fwd_kernel, {}


class _Capture:
    def __getitem__(self, grid):
        return lambda *args, **kw: launch.update(args=args, kw=kw)


S.selection_fwd_kernel = _Capture()
B, T, HQ, H, D, KS, ST, BS, N = 1, 256, 64, 4, 128, 32, 16, 64, 16
Tc = (T - KS) // ST + 1
q = torch.zeros(B, T, HQ, D, dtype=torch.bfloat16)
k = torch.zeros(B, Tc, H, D, dtype=torch.bfloat16)
S.selection_fwd(q, k, torch.zeros(B, T, HQ), KS, ST, BS, N, 1, 2, D ** -0.5, None, positions=S.POSITIONS,
                num_warps=S.NUM_WARPS, num_stages=S.NUM_STAGES, maxnreg=S.MAXNREG)
names = kernel.arg_names
types = {torch.bfloat16: "*bf16", torch.float32: "*fp32", torch.int32: "*i32"}
sig, const = {}, {}
for name, a in zip(names, launch["args"]):
    if a is None:
        sig[name], const[name] = "constexpr", None
    elif isinstance(a, torch.Tensor):
        sig[name] = types[a.dtype]
    else:
        sig[name] = "fp32" if isinstance(a, float) else "i32"
opts = {o: launch["kw"].pop(o) for o in ("num_warps", "num_stages", "maxnreg")}
for name, v in launch["kw"].items():
    sig[name], const[name] = "constexpr", v
sig = {n: sig[n] for n in names}
ck = triton.compile(ASTSource(kernel, sig, constexprs=const), target=GPUTarget("cuda", 90, 32), options=opts)
sys.stdout.write(ck.asm["ttir"])
"""


def test_selection_scores_stay_out_of_tensor_cores(tmp_path):
    """Regression (H200, Triton 3.6): the only dot of the kernel is q . k_cmp. The one-hot shift of
    the spill scores was written as ``sum(x[:, :, None] * y[None, :, :], 1)``, which Triton's
    combine pass turns into a ``tl.dot``; Triton 3.6 builds it with TF32 inputs, so on the GPU the
    spill scores were truncated to 10 mantissa bits (up to ~1e-4 relative error in block scores,
    near-ties decided wrongly) while the interpreter, which runs no compiler pass, computed them
    exactly. Compiling for sm_90 needs no GPU."""
    import triton.backends
    if "nvidia" not in triton.backends.backends:
        pytest.skip("triton has no NVIDIA backend to compile with")
    root = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(root / "src"), env.get("PYTHONPATH", "")])
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    res = subprocess.run([sys.executable, "-c", _COMPILE_SM90], env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    dots = [line.strip() for line in res.stdout.splitlines() if " tt.dot " in line]
    assert dots, "no tt.dot in the kernel's IR: is the q . k_cmp product gone?"
    # q . k_cmp: bf16 [rows, Dk] x [Dk, tokens]; anything on float32 operands is a rewritten
    # reduction (IEEE with the Triton here, TF32 with Triton 3.6: either way not wanted)
    bad = [d for d in dots if "xf32> *" in d or "xf32>*" in d]
    assert not bad, "float32 operands reach a tl.dot (TF32 tensor cores on Triton 3.6):\n" + "\n".join(bad)


def test_selection_all_ties():
    """q = 0 and lse = 0 make every visible probability exactly 1, so the scores are small
    integers (exact in any summation order) with many equal ones: the lowest block ids must
    win every tie, exactly as in the reference."""
    for c in (Case("ties-32/16/64", 1, 333, 2, 1, 16, 32, 16, 64, 3, 1, 1),
              Case("ties-16/8/16", 1, 333, 2, 1, 16, 16, 8, 16, 5, 1, 1)):
        q, k_cmp, _, cu = make_inputs(c)
        q = torch.zeros_like(q)
        lse = torch.zeros(q.shape[:3], device=DEVICE)
        idx = run(c, q, k_cmp, lse, cu, "triton")
        ref = run(c, q, k_cmp, lse, cu, "reference")
        assert torch.equal(idx, ref), c.id


def test_selection_rejects_bad_input():
    c = CASES[1]
    q, k_cmp, lse, cu = make_inputs(c)
    with pytest.raises(ValueError, match="num_initial"):
        select_blocks(q, k_cmp, lse, c.ks, c.st, c.bs, 2, 1, 2, backend="triton")
    with pytest.raises(ValueError, match="lse"):
        select_blocks(q, k_cmp, lse[:, :-1], c.ks, c.st, c.bs, 2, 1, 1, backend="triton")


def test_selection_smaller_tile_where_the_first_does_not_fit(monkeypatch):
    """A GPU launch that does not fit (OutOfResources at launch, as float32 with 20 selected blocks
    on an H100) is retried without pipelining, then with fewer positions per tile; the tile that
    fits is remembered for the next call, and the selection is the same."""
    from triton.runtime.errors import OutOfResources

    from nsa.ops import selection as S

    c = next(c for c in CASES if c.id == "varlen-40/1/97-G16-8/4/32-n32")
    q, k_cmp, lse, cu = make_inputs(c)
    expect = run(c, q, k_cmp, lse, cu, "triton")
    tried, launch = [], S._selection_launch

    def only_small(*args):
        bt, stages = args[-6], args[-2]  # (..., BT, BJ, LOG_R, num_warps, num_stages, maxnreg)
        tried.append((bt, stages))
        if bt * 16 > 64:  # G = 16: pretend that more than 64 rows need too much shared memory
            raise OutOfResources(300000, 232448, "shared memory")
        return launch(*args)

    monkeypatch.setattr(S, "_selection_launch", only_small)
    monkeypatch.setattr(S, "interpreting", lambda: False)  # the GPU's tiles, run by the interpreter
    monkeypatch.setattr(S, "_FITTED", {})
    scale = c.D ** -0.5
    idx = S.selection_fwd(q, k_cmp, lse, c.ks, c.st, c.bs, c.n, c.ni, c.nl, scale, cu)
    assert tried == [(16, 2), (16, 1), (8, 1), (4, 1)]
    assert torch.equal(idx, expect)
    tried.clear()
    assert torch.equal(S.selection_fwd(q, k_cmp, lse, c.ks, c.st, c.bs, c.n, c.ni, c.nl, scale, cu), expect)
    assert tried == [(4, 1)]
