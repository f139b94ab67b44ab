"""Benchmark cases, attended-key arithmetic, correctness checks, timing and baselines.

What one run does, per case (one shape):

1. **Check before timing.** NSA through :func:`nsa.ops.nsa` (the chosen backend) is compared
   with the reference (:mod:`nsa.ops.reference`) computed in float32 from the same inputs, on a
   twin case with the same heads, dims and dtype and ``T = min(T, 2048)``: the output, the
   block selection (rows that differ from the reference's top-n) and every gradient. The
   selected branch of the reference uses the kernel's own block choice, so that a near-tie
   in the top-n flips one row of the selection check, not the output check. Each branch op
   is checked alone the same way (compressed attention with its lse, select_blocks given the
   same lse, selected attention over the reference's blocks, window attention), so a wrong
   kernel fails its own rows. When the case is longer than its twin, one forward at full
   length is also checked on a random chunk of 64 consecutive queries (output and selection;
   a gathered per-chunk reference). A failing measurement is reported with ``ok=False`` and
   not timed. Decode is checked against the last row of the reference on two sequences of
   different lengths (at most 2048 tokens) in one padded cache.
2. **Timing.** Inputs are built outside the timed region. On CUDA the median of
   :func:`triton.testing.do_bench` (``return_mode='median'``, L2 flushed before every
   repetition); calls longer than 20 ms skip do_bench's fixed 5-call estimate and are timed
   with CUDA events over ``reps`` repetitions, the L2 flushed the same way, median reported.
   On CPU, the median wall-clock time of ``reps`` calls. Every call is warmed up once first
   (compilation, autotuning). The forward is the training forward (inputs require grad).
   **Backward** is the time of the backward call alone: the forward runs once outside the
   timed region and ``torch.autograd.backward(out, grad, retain_graph=True)`` is timed,
   gradients reset to None between repetitions (outside the timed region).
   **Decode** is timed twice: ``decode`` replays the step from a CUDA graph (no host work
   between steps, how a server runs it), ``decode_eager`` calls it from Python: per
   repetition the L2 is flushed and the GPU drained, then CUDA events bracket one call, so
   the host work before and between launches counts (median of 100). SDPA baselines are
   timed both ways too, their backend chosen once outside the timed calls.
3. **Memory.** On CUDA, ``mem_mib`` is the peak allocated during one call minus what was
   allocated just before it: the working memory the pass adds to its inputs (and, for a
   backward, to the retained graph).

Inputs of train cases (:func:`train_inputs`): random (standard normal), or, for a case with
``inputs='trained:L'`` (``nsa bench --from-checkpoint``), what layer L of a trained model gives
the op on text, replayed at the case's shape with the model's softmax scale
(:mod:`nsa.bench.trained`); its checks above run on those trained inputs too, and it is
compared with the baselines of the random case of the same shape.

FLOP and byte conventions (work actually done, never the dense equivalent):

- Attention costs ``2 * (Dk + Dv)`` FLOPs per (query head, attended key) in the forward,
  2.5 times that in the backward. Full causal attention attends ``t + 1`` keys at query t.
- NSA attends, at query t: compressed tokens visible to t; the keys ``s <= t`` of its chosen
  blocks, counted **exactly** (the query's own block is always chosen, so the count is
  ``t + 1`` while there are at most ``num_selected`` causal blocks, else
  ``(num_selected - 1) * block_size + t % block_size + 1``; this assumes ``num_local >= 1``,
  true of every preset); the window ``min(t + 1, w)``.
  The forward adds the selection's second ``q . k_cmp`` pass (``2 * Dk`` FLOPs per visible
  compressed token); the backward is 2.5 times the three attention branches (selection has
  no backward). The paper-style table (NSA.md section 2) approximates the selected keys by
  ``min(num_selected * block_size, t + 1)``: :func:`attended_keys` gives both.
- Decode reads, per sequence and KV head, ``(Dk + Dv) * element_size`` bytes for every
  visible compressed token, every selected key ``s <= t`` and every window key; full
  attention reads the whole cache. Query, gates and output are ignored (tiny).
- SDPA with GQA uses ``enable_gqa=True``; a backend that refuses it gets K/V expanded to HQ
  heads outside the timed region (the record's note says so).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import math
import statistics
import time
import warnings

import torch

from nsa._cli_utils import canonical_dtype
from nsa.ops import api, reference
from nsa.ops.utils import interpreting
from nsa.ops.utils import num_compressed, overlap_matrix

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp64": torch.float64}
# Dense-reference ops need O(T^2) memory: never run them above this length.
REFERENCE_MAX_T = 8192
CHECK_T = 2048  # length of the correctness twin
CHUNK = 64  # queries in the random-chunk check of a long case
EAGER_REPS = 100  # eager decode steps timed one by one (each on an idle GPU)
SLOW_MS = 20.0  # above this, time with CUDA events directly instead of do_bench's 5-call estimate
# Relative error bounds against the float32 reference (||out - ref|| / ||ref||).
TOLERANCE = {"fp64": 1e-9, "fp32": 2e-3, "fp16": 1e-2, "bf16": 2e-2}
SELECTION_MISMATCH = 0.01  # fraction of (t, h) rows allowed to differ from the reference's top-n (near-ties)

# decode: one step replayed from a CUDA graph (no host work between steps); decode_eager: the same
# step called from Python, host work included (how most generation loops call it)
PASSES = ("fwd", "bwd", "decode", "decode_eager")
OPS = ("compressed_attention", "select_blocks", "selected_attention", "sliding_window_attention")


class NotApplicable(Exception):
    """A measurement that cannot run here (missing backend, unsupported shape): reported as n/a."""


# ---------------------------------------------------------------------------------------------
# Cases and presets
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Case:
    """One benchmark shape. ``kind='train'``: T tokens per sequence, forward and backward.
    ``kind='decode'``: one new token per sequence after a context of T tokens (T counts the new one)."""

    preset: str
    kind: str
    T: int
    B: int
    HQ: int
    H: int
    Dk: int
    Dv: int
    dtype: str
    kernel_size: int = 32
    stride: int = 16
    block_size: int = 64
    num_selected: int = 16
    num_initial: int = 1
    num_local: int = 2
    window_size: int = 512
    # train cases: queries as moving sums of `smooth_queries` positions of random noise (0:
    # independent positions), so that neighbouring positions select shared blocks
    smooth_queries: int = 0
    # train cases: 'random' (see train_inputs) or 'trained:L', the inputs layer L of a trained model
    # gives nsa.ops.nsa, replayed at this shape by `source` (an nsa.bench.trained.TrainedSource)
    inputs: str = "random"
    source: object = None
    # softmax scale of the ops (None: Dk ** -0.5); trained inputs keep their model's
    scale: float | None = None

    def __post_init__(self):
        if self.inputs != "random":
            layer = self.inputs.removeprefix("trained:")
            if self.kind != "train" or not layer.isdigit() or self.source is None:
                raise ValueError(f"inputs: expected 'random', or 'trained:L' (a train case with a source), got "
                                 f"{self.inputs!r} ({self.kind}, source {self.source!r})")

    @property
    def layer(self) -> int | None:
        """The trained layer whose inputs the case runs (None: random inputs)."""
        return None if self.inputs == "random" else int(self.inputs.removeprefix("trained:"))

    @property
    def name(self) -> str:
        t = f"{self.T // 1024}k" if self.T % 1024 == 0 else str(self.T)
        smooth = f"/qs{self.smooth_queries}" if self.smooth_queries else ""
        return (f"{self.preset}/{self.kind}/T{t}/B{self.B}/HQ{self.HQ}H{self.H}/D{self.Dk}x{self.Dv}{smooth}"
                + inputs_suffix(self.inputs))

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def settings(self) -> dict:
        """NSA keyword arguments of :func:`nsa.ops.nsa` (and of nsa_decode); ``scale`` only when set."""
        kw = dict(kernel_size=self.kernel_size, stride=self.stride, block_size=self.block_size,
                  num_selected=self.num_selected, num_initial=self.num_initial, num_local=self.num_local,
                  window_size=self.window_size)
        if self.scale is not None:
            kw["scale"] = self.scale
        return kw


def inputs_suffix(inputs: str | None) -> str:
    """What a case's name ends with for its inputs: '' (random), '/trained-L3' ('trained:3')."""
    if inputs in (None, "random"):
        return ""
    return "/trained-L" + inputs.removeprefix("trained:")


PAPER_SETTINGS = dict(kernel_size=32, stride=16, block_size=64, num_selected=16, num_initial=1, num_local=2,
                      window_size=512)
QUICK_SETTINGS = dict(kernel_size=16, stride=8, block_size=16, num_selected=4, num_initial=1, num_local=2,
                      window_size=64)
K = 1024


@dataclasses.dataclass(frozen=True)
class Preset:
    """A named list of cases: the cross product of its lengths, batches, head counts and dims."""

    kinds: tuple
    T: tuple
    B_train: tuple
    B_decode: tuple
    heads: tuple  # (HQ, H) pairs
    dims: tuple  # (Dk, Dv) pairs
    dtype: str
    settings: dict
    device: str | None  # None: cuda when available, else cpu
    backend: str
    about: str
    threads: int | None = None  # CPU threads (None: torch's default)


PRESETS = {
    "paper": Preset(("train",), (8 * K, 16 * K, 32 * K, 64 * K, 128 * K), (1,), (1,), ((64, 4),),
                    ((128, 128), (192, 128)), "bf16", PAPER_SETTINGS, None, "auto",
                    "the paper's attention: 64 query heads, 4 KV heads, D=128 and Dk/Dv=192/128, bf16, 8k..128k"),
    "gqa": Preset(("train",), (64 * K,), (1,), (1,), ((4, 4), (16, 4), (32, 4), (64, 4)), ((128, 128),), "bf16",
                  PAPER_SETTINGS, None, "auto", "group sizes HQ/H = 1, 4, 8, 16 at T=64k, H=4, D=128, bf16"),
    "decode": Preset(("decode",), (8 * K, 16 * K, 32 * K, 64 * K, 128 * K), (1,), (1, 8, 64), ((64, 4),),
                     ((128, 128),), "bf16", PAPER_SETTINGS, None, "auto",
                     "one new token per sequence, contexts 8k..128k, batch 1/8/64, HQ=64, H=4, D=128, bf16"),
    "quick": Preset(("train", "decode"), (256, 512), (1,), (2,), ((4, 1),), ((32, 32),), "fp32", QUICK_SETTINGS,
                    "cpu", "reference", "tiny smoke run on CPU, reference backend, one thread (seconds)", 1),
}


def build_cases(preset: str, T=None, B=None, heads=None, dims=None, dtype=None, smooth_queries=0) -> list[Case]:
    """The cases of a preset, with any of its lists overridden; ``smooth_queries`` (train cases):
    see :func:`train_inputs`."""
    if preset not in PRESETS:
        raise ValueError(f"preset: expected one of {sorted(PRESETS)}, got {preset!r}")
    if not isinstance(smooth_queries, int) or smooth_queries < 0:
        raise ValueError(f"smooth_queries: expected an integer >= 0, got {smooth_queries!r}")
    p = PRESETS[preset]
    dtype = canonical_dtype(dtype or p.dtype, option="dtype")
    cases = []
    for kind in p.kinds:
        batches = B or (p.B_train if kind == "train" else p.B_decode)
        for (hq, h) in heads or p.heads:
            if h < 1 or hq % h:
                raise ValueError(f"heads: HQ ({hq}) must be a positive multiple of H ({h})")
            for (dk, dv) in dims or p.dims:
                for b in batches:
                    for t in T or p.T:
                        cases.append(Case(preset, kind, t, b, hq, h, dk, dv, dtype, **p.settings,
                                          smooth_queries=smooth_queries if kind == "train" else 0))
    return cases


# ---------------------------------------------------------------------------------------------
# Attended-key arithmetic
# ---------------------------------------------------------------------------------------------
def _positions(T: int) -> torch.Tensor:
    return torch.arange(T, dtype=torch.float64)


def attended_keys(T: int, kernel_size=32, stride=16, block_size=64, num_selected=16, window_size=512,
                  exact=True) -> dict:
    """Keys attended per query, averaged over the causal positions t = 0 .. T-1.

    Returns a dict of floats: ``full`` (t + 1), ``cmp`` (visible compressed tokens),
    ``slc`` (keys s <= t in the chosen blocks: exact when ``exact``, else the paper-table
    approximation ``min(num_selected * block_size, t + 1)``), ``win`` (``min(t + 1, w)``; a
    window of 0 means no window branch) and ``nsa`` = cmp + slc + win.
    """
    t = _positions(T)
    cmp = torch.where(t >= kernel_size - 1, torch.floor((t - kernel_size + 1) / stride) + 1, torch.zeros_like(t))
    if exact:
        many = torch.floor(t / block_size) + 1 > num_selected
        slc = torch.where(many, (num_selected - 1) * block_size + torch.remainder(t, block_size) + 1, t + 1)
    else:
        slc = torch.clamp(t + 1, max=num_selected * block_size)
    win = torch.clamp(t + 1, max=window_size)
    out = {"full": (t + 1).mean().item(), "cmp": cmp.mean().item(), "slc": slc.mean().item(),
           "win": win.mean().item()}
    out["nsa"] = out["cmp"] + out["slc"] + out["win"]
    return out


def decode_keys(L: int, kernel_size=32, stride=16, block_size=64, num_selected=16, window_size=512) -> dict:
    """Keys read per KV head for the new query of a length-L sequence (at position L-1)."""
    t = L - 1
    slc = t + 1 if t // block_size + 1 <= num_selected else (num_selected - 1) * block_size + t % block_size + 1
    out = {"full": L, "cmp": num_compressed(L, kernel_size, stride), "slc": slc, "win": min(L, window_size)}
    out["nsa"] = out["cmp"] + out["slc"] + out["win"]
    return out


def ideal_forward_ratio(T: int, Dk: int, Dv: int, **settings) -> float:
    """Full-attention forward FLOPs over NSA forward FLOPs (incl. the selection's second q.k_cmp pass)."""
    k = attended_keys(T, **settings)
    per_key = 2 * (Dk + Dv)
    return k["full"] * per_key / (k["nsa"] * per_key + k["cmp"] * 2 * Dk)


def _train_flops(case: Case) -> dict:
    """FLOPs of every timed piece of a train case, keyed by (impl, pass)."""
    k = attended_keys(case.T, case.kernel_size, case.stride, case.block_size, case.num_selected, case.window_size)
    nq = case.B * case.T * case.HQ
    per_key = 2 * (case.Dk + case.Dv)
    f = {}
    full = nq * per_key * k["full"]
    for impl in ("sdpa.flash", "sdpa.cudnn", "sdpa.efficient"):
        f[(impl, "fwd")], f[(impl, "bwd")] = full, 2.5 * full
    nsa_attn = nq * per_key * k["nsa"]
    select = nq * 2 * case.Dk * k["cmp"]
    f[("nsa", "fwd")], f[("nsa", "bwd")] = nsa_attn + select, 2.5 * nsa_attn
    for branch in ("cmp", "slc", "win"):
        fl = nq * per_key * k[branch]
        f[(f"nsa.{branch}", "fwd")], f[(f"nsa.{branch}", "bwd")] = fl, 2.5 * fl
    f[("nsa.select", "fwd")] = select
    win = nq * per_key * attended_keys(case.T, window_size=case.window_size)["win"]
    f[("flex.window", "fwd")], f[("flex.window", "bwd")] = win, 2.5 * win
    # fla-core NSA: mean-pooled compression (block_size tokens every block_size), its top-k
    # pass, the selected branch; no window.
    kf = attended_keys(case.T, case.block_size, case.block_size, case.block_size, case.num_selected, 0)
    fla_attn = nq * per_key * (kf["cmp"] + kf["slc"])
    f[("fla.nsa", "fwd")], f[("fla.nsa", "bwd")] = fla_attn + nq * 2 * case.Dk * kf["cmp"], 2.5 * fla_attn
    # phi: per compressed token and KV head, Linear(l*D, D) then Linear(D, D), for keys and values;
    # backward twice the forward (input and weight gradients).
    tc = num_compressed(case.T, case.kernel_size, case.stride)
    phi = case.B * tc * case.H * 2 * (case.kernel_size + 1) * (case.Dk ** 2 + case.Dv ** 2)
    f[("nsa.phi", "fwd")], f[("nsa.phi", "bwd")] = phi, 2 * phi
    return f


def _decode_bytes(case: Case) -> dict:
    """Bytes of KV read by one decode step, keyed by impl."""
    k = decode_keys(case.T, case.kernel_size, case.stride, case.block_size, case.num_selected, case.window_size)
    unit = case.B * case.H * (case.Dk + case.Dv) * torch.empty((), dtype=case.torch_dtype).element_size()
    return {"nsa": unit * k["nsa"], "sdpa": unit * k["full"]}


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------
def _clear_grads(tensors):
    for t in tensors:
        t.grad = None


class Timer:
    """Median time of a callable, in ms, and its working memory (CUDA), see the module docstring."""

    def __init__(self, device: torch.device, reps: int):
        self.device = device
        self.reps = max(1, int(reps))
        self._flush = None

    def __call__(self, fn, grads=()) -> tuple[float, float | None]:
        grads = list(grads)
        if self.device.type != "cuda":
            _clear_grads(grads)
            fn()
            times = []
            for _ in range(self.reps):
                _clear_grads(grads)
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            return statistics.median(times) * 1e3, None
        _clear_grads(grads)
        fn()
        torch.cuda.synchronize()
        _clear_grads(grads)
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        est_ms = (time.perf_counter() - t0) * 1e3
        mem = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
        if est_ms <= SLOW_MS:
            from triton.testing import do_bench

            ms = do_bench(fn, warmup=25, rep=max(100.0, self.reps * est_ms), grad_to_none=grads or None,
                          return_mode="median")
        else:
            ms = self._events(fn, grads)
        return float(ms), mem

    def eager(self, fn: "Eager") -> float:
        """Median ms of one eager call on an idle GPU: L2 flushed, then the GPU drained, then
        events around the call, so the time covers the host work before and between the
        launches as well as the kernels (do_bench would hide the host work behind its L2
        flush, which the GPU runs while the host prepares the next call)."""
        with fn.context():
            for _ in range(3):  # compile and warm up
                fn.step()
            if self.device.type != "cuda":
                times = []
                for _ in range(max(self.reps, 5)):
                    t0 = time.perf_counter()
                    fn.step()
                    times.append(time.perf_counter() - t0)
                return statistics.median(times) * 1e3
            if self._flush is None:
                self._flush = torch.empty(256 * 2 ** 20, dtype=torch.int8, device=self.device)
            times = []
            for _ in range(max(EAGER_REPS, self.reps)):
                self._flush.zero_()
                torch.cuda.synchronize()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn.step()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            return statistics.median(times)

    def _events(self, fn, grads):
        if self._flush is None:
            self._flush = torch.empty(256 * 2 ** 20, dtype=torch.int8, device=self.device)
        times = []
        for _ in range(self.reps):
            _clear_grads(grads)
            self._flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------
def _generator(device, seed):
    return torch.Generator(device=device).manual_seed(seed)


def _randn(g, device, dtype, *shape):
    return torch.randn(*shape, generator=g, device=device, dtype=dtype)


def _smooth_randn(g, device, dtype, B, T, HQ, D, n):
    """``[B, T, HQ, D]`` with unit-variance entries, each the sum of ``n`` consecutive positions of
    independent noise over sqrt(n): positions t and t + d correlate by max(0, 1 - d / n)."""
    e = torch.randn(B, T + n - 1, HQ, D, generator=g, device=device, dtype=torch.float32)
    c = torch.nn.functional.pad(e.cumsum(1), (0, 0, 0, 0, 1, 0))  # c[:, i] = sum of e[:, :i]
    return ((c[:, n:] - c[:, :-n]) * n ** -0.5).to(dtype)


def train_inputs(case: Case, device, seed=0, requires_grad=True) -> dict:
    """NSA inputs of a train case: the keyword arguments of :func:`nsa.ops.nsa` (tensors).

    Random (``case.inputs == 'random'``): standard normal q, k, v, sigmoid of standard normal
    gates, from ``seed``. ``case.smooth_queries = n > 0``: q correlates between positions less
    than n apart (moving sums of noise), so that neighbouring positions select shared blocks, as
    the selections of trained models are expected to (independent random queries share only the
    forced blocks). Trained (``'trained:L'``): what layer L of the model of ``case.source`` gives
    the op on a text, replayed at the case's shape (:meth:`nsa.bench.trained.TrainedSource.inputs`:
    the same every call, ``seed`` unused)."""
    if case.inputs != "random":
        return case.source.inputs(case, device, requires_grad=requires_grad)
    g = _generator(device, seed)
    B, T, HQ, H, Dk, Dv, dt = case.B, case.T, case.HQ, case.H, case.Dk, case.Dv, case.torch_dtype
    Tc = num_compressed(T, case.kernel_size, case.stride)
    n = case.smooth_queries
    x = {"q": _smooth_randn(g, device, dt, B, T, HQ, Dk, n) if n else _randn(g, device, dt, B, T, HQ, Dk),
         "k_cmp": _randn(g, device, dt, B, Tc, H, Dk), "v_cmp": _randn(g, device, dt, B, Tc, H, Dv),
         "k_slc": _randn(g, device, dt, B, T, H, Dk), "v_slc": _randn(g, device, dt, B, T, H, Dv),
         "k_win": _randn(g, device, dt, B, T, H, Dk), "v_win": _randn(g, device, dt, B, T, H, Dv)}
    for name in ("g_cmp", "g_slc", "g_win"):
        x[name] = torch.sigmoid(_randn(g, device, dt, B, T, HQ))
    if requires_grad:
        for t in x.values():
            t.requires_grad_(True)
    return x


def decode_inputs(case: Case, device, seed=0, seq_lens=None) -> dict:
    """Random inputs of :func:`nsa.ops.decode.nsa_decode` for a decode case (caches of capacity T)."""
    g = _generator(device, seed)
    N, L, HQ, H, Dk, Dv, dt = case.B, case.T, case.HQ, case.H, case.Dk, case.Dv, case.torch_dtype
    Tc = num_compressed(L, case.kernel_size, case.stride)
    x = {"q": _randn(g, device, dt, N, HQ, Dk),
         "k_cmp": _randn(g, device, dt, N, Tc, H, Dk), "v_cmp": _randn(g, device, dt, N, Tc, H, Dv),
         "k_slc": _randn(g, device, dt, N, L, H, Dk), "v_slc": _randn(g, device, dt, N, L, H, Dv),
         "k_win": _randn(g, device, dt, N, L, H, Dk), "v_win": _randn(g, device, dt, N, L, H, Dv)}
    for name in ("g_cmp", "g_slc", "g_win"):
        x[name] = torch.sigmoid(_randn(g, device, dt, N, HQ))
    if seq_lens is None:
        seq_lens = [L] * N
    x["seq_lens"] = torch.tensor(seq_lens, dtype=torch.int32, device=device)
    return x


# ---------------------------------------------------------------------------------------------
# Which backend runs where
# ---------------------------------------------------------------------------------------------
def op_not_runnable(op: str, backend: str, device: torch.device, T: int) -> str | None:
    """None when ``op`` may run at length T with ``backend`` on ``device``, else why not.

    An op without a Triton kernel falls back to the dense reference, O(T^2) memory: that is
    only run up to :data:`REFERENCE_MAX_T`.
    """
    impl = api._triton_impl(op)
    if backend == "triton":
        if impl is None:
            return f"no triton kernel for {op}"
        if device.type != "cuda" and not interpreting():
            return "triton backend needs CUDA tensors or TRITON_INTERPRET=1"
        return None
    uses_reference = backend == "reference" or impl is None or device.type != "cuda"
    if uses_reference and T > REFERENCE_MAX_T:
        if backend == "auto" and device.type == "cuda":
            return f"no triton kernel for {op}"
        return f"reference backend only up to T={REFERENCE_MAX_T} (O(T^2) memory)"
    return None


def nsa_not_runnable(backend, device, T) -> str | None:
    reasons = [r for r in (op_not_runnable(op, backend, device, T) for op in OPS) if r]
    return "; ".join(dict.fromkeys(reasons)) or None


_DECODE_TRITON = {}


def _decode_module():
    try:
        from nsa.ops import decode
    except ImportError as e:
        raise NotApplicable(f"nsa.ops.decode not importable ({e})") from None
    if not hasattr(decode, "nsa_decode"):
        raise NotApplicable("nsa.ops.decode has no nsa_decode")
    return decode


def _decode_has_triton(device: torch.device) -> bool:
    """Whether nsa_decode accepts backend='triton' here: probed once on a tiny input."""
    if device.type != "cuda" and not interpreting():
        return False
    key = str(device)
    if key not in _DECODE_TRITON:
        case = Case("probe", "decode", 256, 1, 16, 1, 64, 64, "bf16" if device.type == "cuda" else "fp32",
                    **PAPER_SETTINGS)
        x = decode_inputs(case, device)
        try:
            _decode_module().nsa_decode(**x, **case.settings, backend="triton")
            _DECODE_TRITON[key] = True
        except (ValueError, NotApplicable):
            _DECODE_TRITON[key] = False
    return _DECODE_TRITON[key]


def decode_not_runnable(backend, device, L) -> str | None:
    _decode_module()
    has = _decode_has_triton(device)
    if backend == "triton":
        return None if has else "no triton decode kernel"
    if (backend == "reference" or not has) and L > REFERENCE_MAX_T:
        if backend == "auto" and device.type == "cuda":
            return "no triton decode kernel"
        return f"reference decode only up to T={REFERENCE_MAX_T}"
    return None


# ---------------------------------------------------------------------------------------------
# Correctness
# ---------------------------------------------------------------------------------------------
def rel_err(ref: torch.Tensor, out: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 (the absolute norm when ref is zero)."""
    ref, out = ref.detach().double(), out.detach().double()
    den = ref.norm().item()
    num = (out - ref).norm().item()
    return num / den if den > 0 else num


def _one_line(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0][:160]}" if msg else type(e).__name__


def _compare(name, ref, out, tol) -> str | None:
    if out is None:
        return f"{name}: no gradient"
    if tuple(ref.shape) != tuple(out.shape):
        return f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    bad = ~torch.isfinite(out.detach()) & torch.isfinite(ref.detach())
    if bad.any():
        return f"{name}: {int(bad.sum())} non-finite elements"
    err = rel_err(ref, out)
    return None if err <= tol else f"{name}: relative error {err:.2e} > {tol:.0e}"


def _selection_mismatch(ref_idx, idx) -> str | None:
    rows = ref_idx.shape[:-1].numel()
    diff = int((ref_idx != idx).any(-1).sum())
    if diff > max(2, SELECTION_MISMATCH * rows):
        return f"selection: {diff} of {rows} rows differ from the reference top-n"
    return None


def _compute_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclasses.dataclass
class CheckResult:
    """Verdict per (impl, pass): True (passed), False (failed), None (could not run), with notes."""

    verdicts: dict = dataclasses.field(default_factory=dict)
    notes: dict = dataclasses.field(default_factory=dict)

    def set(self, impl, passes, verdict, note=""):
        for p in passes:
            self.verdicts[(impl, p)] = verdict
            if note:
                self.notes[(impl, p)] = note

    def get(self, impl, pass_):
        """(verdict, note); a pair never checked reads (None, 'not checked')."""
        return self.verdicts.get((impl, pass_)), self.notes.get((impl, pass_), "not checked")

    @property
    def fwd(self):
        return self.verdicts.get(("nsa", "fwd"))

    @property
    def bwd(self):
        return self.verdicts.get(("nsa", "bwd"))

    @property
    def decode(self):
        return self.verdicts.get(("nsa", "decode"))


def _checked(res: CheckResult, impl: str, passes, fn):
    """Runs ``fn() -> (forward errors, backward errors)`` and records the verdicts of ``impl``.

    A ValueError about the backend (the ops' way of saying 'cannot run here') is n/a; any
    other exception fails the check.
    """
    try:
        errs, gerrs = fn()
    except ValueError as e:
        if str(e).startswith("backend:"):
            res.set(impl, passes, None, f"n/a: {e}")
            return
        res.set(impl, passes, False, f"check failed: raised {_one_line(e)}")
        return
    except Exception as e:
        res.set(impl, passes, False, f"check failed: raised {_one_line(e)}")
        return
    if errs:
        res.set(impl, passes, False, "check failed: " + "; ".join(errs))
        return
    res.set(impl, passes[:1], True)
    if len(passes) > 1:
        res.set(impl, passes[1:], not gerrs, ("check failed: " + "; ".join(gerrs)) if gerrs else "")


def _grad_errors(pairs, tol):
    """pairs: (name, reference gradient, gradient) -> error messages."""
    return [e for e in (_compare(f"d{n}", ref, g, tol) for n, ref, g in pairs) if e]


def check_train(case: Case, backend: str, device, nsa_fn=None, branches=True) -> CheckResult:
    """NSA and each branch op against the float32 reference (see the module docstring).

    ``nsa_fn`` replaces :func:`nsa.ops.nsa` (tests inject faults through it). With
    ``branches``, each op is also checked alone on the twin: compressed attention (o, lse,
    gradients), select_blocks (rows equal to the reference's, given the same lse), selected
    attention (over the reference's blocks) and window attention (o, gradients).
    """
    nsa_fn = nsa_fn or api.nsa
    res = CheckResult()
    twin = dataclasses.replace(case, T=min(case.T, CHECK_T), B=min(case.B, 2))
    tol = TOLERANCE[case.dtype]

    def total():
        x = train_inputs(twin, device, seed=1)
        o, idx = nsa_fn(**x, **twin.settings, return_block_indices=True, backend=backend)
        do = torch.randn_like(o)
        ref_o, ref_idx, ref_grads = _reference_train(twin, x, idx, do)
        errs = [e for e in (_compare("o", ref_o, o, tol), _selection_mismatch(ref_idx, idx)) if e]
        try:
            o.backward(do)
            gerrs = _grad_errors([(n, ref_grads[n], t.grad) for n, t in x.items()], tol)
        except Exception as e:
            gerrs = [f"backward raised {_one_line(e)}"]
        del o, idx, ref_o, ref_grads, x
        if not errs and case.T > twin.T:
            try:
                errs += _check_chunk(case, backend, device, nsa_fn, tol)
            except Exception as e:
                errs.append(f"forward at T={case.T} raised {_one_line(e)}")
        return errs, gerrs

    _checked(res, "nsa", ("fwd", "bwd"), total)
    if branches:
        for branch, passes in (("cmp", ("fwd", "bwd")), ("select", ("fwd",)), ("slc", ("fwd", "bwd")),
                               ("win", ("fwd", "bwd"))):
            _checked(res, f"nsa.{branch}", passes, lambda b=branch: _check_branch(twin, b, backend, device, tol))
            _free(torch.device(device))
    return res


def _check_branch(case, branch, backend, device, tol):
    """One op through :mod:`nsa.ops.api` against its reference; returns (errors, gradient errors)."""
    x = train_inputs(case, device, seed=11)
    ct = _compute_dtype(case.torch_dtype)
    r = {n: t.detach().to(ct).requires_grad_(True) for n, t in x.items()}
    kw = case.settings
    l, d, bl, sc = kw["kernel_size"], kw["stride"], kw["block_size"], case.scale
    sel = (l, d, bl, kw["num_selected"], kw["num_initial"], kw["num_local"])
    if branch in ("cmp", "select"):
        o, lse = api.compressed_attention(x["q"], x["k_cmp"], x["v_cmp"], l, d, scale=sc, backend=backend)
        ref_o, ref_lse = reference.compressed_attention(r["q"], r["k_cmp"], r["v_cmp"], l, d, scale=sc)
        if branch == "select":
            lse = lse.detach()
            idx = api.select_blocks(x["q"].detach(), x["k_cmp"].detach(), lse, *sel, scale=sc, backend=backend)
            ref_idx = reference.select_blocks(r["q"].detach(), r["k_cmp"].detach(), lse.to(ct), *sel, scale=sc)
            return [e for e in (_selection_mismatch(ref_idx, idx),) if e], []
        errs = [e for e in (_compare("o", ref_o, o, tol), _compare_lse(ref_lse, lse, tol)) if e]
        names = ("q", "k_cmp", "v_cmp")
    elif branch == "slc":
        with torch.no_grad():
            _, ref_lse = reference.compressed_attention(r["q"], r["k_cmp"], r["v_cmp"], l, d, scale=sc)
            idx = reference.select_blocks(r["q"], r["k_cmp"], ref_lse, *sel, scale=sc)
        o = api.selected_attention(x["q"], x["k_slc"], x["v_slc"], idx, bl, scale=sc, backend=backend)
        ref_o = reference.selected_attention(r["q"], r["k_slc"], r["v_slc"], idx, bl, scale=sc)
        errs = [e for e in (_compare("o", ref_o, o, tol),) if e]
        names = ("q", "k_slc", "v_slc")
    else:
        o = api.sliding_window_attention(x["q"], x["k_win"], x["v_win"], kw["window_size"], scale=sc,
                                         backend=backend)
        ref_o = reference.sliding_window_attention(r["q"], r["k_win"], r["v_win"], kw["window_size"], scale=sc)
        errs = [e for e in (_compare("o", ref_o, o, tol),) if e]
        names = ("q", "k_win", "v_win")
    do = torch.randn_like(o)
    ref_o.backward(do.to(ct))
    try:
        o.backward(do)
        gerrs = _grad_errors([(n, r[n].grad, x[n].grad) for n in names], tol)
    except Exception as e:
        gerrs = [f"backward raised {_one_line(e)}"]
    return errs, gerrs


def _compare_lse(ref, out, tol) -> str | None:
    """lse: -inf exactly where the reference has -inf, relative error elsewhere."""
    if tuple(ref.shape) != tuple(out.shape):
        return f"lse: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    fin = torch.isfinite(ref)
    if not torch.equal(fin, torch.isfinite(out)):
        return "lse: -inf / finite pattern differs from the reference"
    return _compare("lse", ref[fin], out[fin], tol)


def _reference_train(case, x, idx, do):
    """Reference o, top-n and gradients in float32 (float64 for float64 inputs), with the
    selected branch over the kernel's block choice ``idx``."""
    ct = _compute_dtype(case.torch_dtype)
    r = {n: t.detach().to(ct).requires_grad_(True) for n, t in x.items()}
    kw, sc = case.settings, case.scale
    o_cmp, lse = reference.compressed_attention(r["q"], r["k_cmp"], r["v_cmp"], kw["kernel_size"], kw["stride"],
                                                scale=sc)
    ref_idx = reference.select_blocks(r["q"], r["k_cmp"], lse, kw["kernel_size"], kw["stride"], kw["block_size"],
                                      kw["num_selected"], kw["num_initial"], kw["num_local"], scale=sc)
    o_slc = reference.selected_attention(r["q"], r["k_slc"], r["v_slc"], idx, kw["block_size"], scale=sc)
    o_win = reference.sliding_window_attention(r["q"], r["k_win"], r["v_win"], kw["window_size"], scale=sc)
    o = r["g_cmp"].unsqueeze(-1) * o_cmp + r["g_slc"].unsqueeze(-1) * o_slc + r["g_win"].unsqueeze(-1) * o_win
    o.backward(do.to(ct))
    return o.detach(), ref_idx, {n: t.grad for n, t in r.items()}


def _check_chunk(case, backend, device, nsa_fn, tol) -> list[str]:
    """Forward at full length, checked on CHUNK consecutive queries at a random offset."""
    if nsa_not_runnable(backend, device, case.T):
        return []
    x = train_inputs(case, device, seed=2, requires_grad=False)
    with torch.no_grad():
        o, idx = nsa_fn(**x, **case.settings, return_block_indices=True, backend=backend)
    g = torch.Generator().manual_seed(case.T)
    C = min(CHUNK, case.T)
    t0 = int(torch.randint(0, case.T - C + 1, (1,), generator=g))
    b = int(torch.randint(0, case.B, (1,), generator=g))
    ref_o, ref_idx = chunk_reference(case, x, b, t0, C, idx)
    errs = [_compare(f"o[{b}, {t0}:{t0 + C}]", ref_o, o[b:b + 1, t0:t0 + C], tol),
            _selection_mismatch(ref_idx, idx[b:b + 1, t0:t0 + C])]
    return [e for e in errs if e]


def _topk_at(score, pos, num_selected, num_initial, num_local, block_size):
    """The top-n rule of :func:`nsa.ops.select_blocks` for queries at positions ``pos`` ``[C]``.

    score ``[1, C, H, NB]`` -> int32 ``[1, C, H, num_selected]`` (ascending ids, then -1).
    """
    NB = score.shape[-1]
    t_blk = (pos // block_size).view(1, -1, 1, 1)
    j = torch.arange(NB, device=score.device).view(1, 1, 1, NB)
    causal = j <= t_blk
    forced = (j < num_initial) | ((j > t_blk - num_local) & causal)
    pri = torch.where(forced, float("inf"), score)
    pri = torch.where(causal, pri, float("-inf"))
    k = min(num_selected, NB)
    order = torch.sort(pri, dim=-1, descending=True, stable=True).indices[..., :k]
    ids = torch.where(torch.gather(pri, -1, order) > float("-inf"), order, NB)
    ids = torch.sort(ids, dim=-1).values
    ids = torch.where(ids == NB, -1, ids)
    if k < num_selected:
        ids = torch.cat([ids, ids.new_full((*ids.shape[:-1], num_selected - k), -1)], -1)
    return ids.to(torch.int32)


def _gathered_attention(q, k, v, keypos, valid, scale):
    """Attention of q ``[C, HQ, Dk]`` over the keys at ``keypos`` ``[C, H, S]`` (where ``valid``)
    of k ``[T, H, Dk]`` / v ``[T, H, Dv]``; zeros for a query with no valid key."""
    C, HQ, Dk = q.shape
    T, H, _ = k.shape
    G = HQ // H
    kp = keypos.clamp(0, T - 1)
    h = torch.arange(H, device=q.device).view(1, H, 1)
    kk, vv = k[kp, h], v[kp, h]  # [C, H, S, D]
    s = torch.einsum("chgd,chsd->chgs", q.view(C, H, G, Dk), kk) * scale
    s = s.masked_fill(~valid.unsqueeze(2), float("-inf"))
    m = s.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(s - m)
    den = e.sum(-1, keepdim=True)
    p = e / torch.where(den > 0, den, torch.ones_like(den))
    return torch.einsum("chgs,chsd->chgd", p, vv).reshape(C, HQ, v.shape[-1])


def chunk_reference(case: Case, x: dict, b: int, t0: int, C: int, block_indices) -> tuple:
    """Reference NSA for queries ``t0 .. t0+C-1`` of sequence ``b`` without O(T^2) memory.

    The selected branch uses ``block_indices`` (the kernel's choice). Returns o ``[1, C, HQ, Dv]``
    (float32, float64 for float64 inputs) and the reference top-n ``[1, C, H, num_selected]``.
    """
    ct = _compute_dtype(case.torch_dtype)
    dev = x["q"].device
    T, HQ, H, Dk = case.T, case.HQ, case.H, case.Dk
    G, scale = HQ // H, Dk ** -0.5 if case.scale is None else case.scale
    l, d, bl, w = case.kernel_size, case.stride, case.block_size, case.window_size
    pos = torch.arange(t0, t0 + C, device=dev)
    q = x["q"][b, t0:t0 + C].to(ct)  # [C, HQ, Dk]
    kc, vc = x["k_cmp"][b:b + 1].to(ct), x["v_cmp"][b:b + 1].to(ct)
    Tc = kc.shape[1]
    vis = torch.arange(Tc, device=dev).view(1, Tc) * d + l - 1 <= pos.view(C, 1)  # [C, Tc]
    o_cmp, lse = reference._masked_attention(q.unsqueeze(0), kc, vc, vis, scale)
    s = torch.einsum("thgd,shd->thgs", q.view(C, H, G, Dk), kc[0]) * scale
    lse5 = lse[0].view(C, H, G, 1)
    fin = torch.isfinite(lse5)
    p = torch.where(vis.view(C, 1, 1, Tc) & fin, torch.exp(s - torch.where(fin, lse5, 0)), 0)
    NB = math.ceil(T / bl)
    score = torch.einsum("thgs,sn->thn", p, overlap_matrix(Tc, NB, l, d, bl, dev, ct))
    ref_idx = _topk_at(score.unsqueeze(0), pos, case.num_selected, case.num_initial, case.num_local, bl)
    bi = block_indices[b, t0:t0 + C].long()  # [C, H, S]
    keypos = (bi.unsqueeze(-1) * bl + torch.arange(bl, device=dev)).flatten(-2)  # [C, H, S*bl]
    valid = ((bi >= 0).unsqueeze(-1) & torch.ones(bl, dtype=torch.bool, device=dev)).flatten(-2)
    valid &= keypos <= pos.view(C, 1, 1)
    o_slc = _gathered_attention(q, x["k_slc"][b].to(ct), x["v_slc"][b].to(ct), keypos, valid, scale)
    wpos = (pos.view(C, 1) - w + 1 + torch.arange(w, device=dev)).view(C, 1, w).expand(C, H, w)
    o_win = _gathered_attention(q, x["k_win"][b].to(ct), x["v_win"][b].to(ct), wpos, wpos >= 0, scale)
    gate = {n: x[n][b, t0:t0 + C].to(ct).unsqueeze(-1) for n in ("g_cmp", "g_slc", "g_win")}
    o = gate["g_cmp"] * o_cmp[0] + gate["g_slc"] * o_slc + gate["g_win"] * o_win
    return o.unsqueeze(0), ref_idx


def check_decode(case: Case, backend: str, device, decode_fn=None) -> CheckResult:
    """nsa_decode against the last row of the reference NSA on each sequence of a small twin
    (two sequences of different lengths in one padded cache)."""
    res = CheckResult()
    try:
        decode_fn = decode_fn or _decode_module().nsa_decode
    except NotApplicable as e:
        res.set("nsa", ("decode", "decode_eager"), None, f"n/a: {e}")
        return res
    _checked(res, "nsa", ("decode",), lambda: (_decode_errors(case, backend, device, decode_fn), []))
    verdict, note = res.get("nsa", "decode")
    res.set("nsa", ("decode_eager",), verdict, note if note != "not checked" else "")  # the same call
    return res


def _decode_errors(case, backend, device, decode_fn) -> list[str]:
    L = min(case.T, CHECK_T)
    lens = [L, max(1, L - L // 3 - 5)]
    twin = dataclasses.replace(case, T=L, B=2)
    x = decode_inputs(twin, device, seed=1, seq_lens=lens)
    with torch.no_grad():
        o = decode_fn(**x, **twin.settings, backend=backend)
    ct = _compute_dtype(case.torch_dtype)
    g = _generator(device, 3)
    errs = []
    for n, Ln in enumerate(lens):
        tc = num_compressed(Ln, case.kernel_size, case.stride)
        # The earlier queries and gates only shape the reference's other rows: random.
        q = torch.cat([_randn(g, device, ct, 1, Ln - 1, case.HQ, case.Dk), x["q"][n].to(ct).view(1, 1, -1, case.Dk)], 1)
        gates = [torch.cat([torch.rand(1, Ln - 1, case.HQ, generator=g, device=device, dtype=ct),
                            x[name][n].to(ct).view(1, 1, -1)], 1) for name in ("g_cmp", "g_slc", "g_win")]
        kv = [x[name][n:n + 1, :(tc if name.endswith("cmp") else Ln)].to(ct)
              for name in ("k_cmp", "v_cmp", "k_slc", "v_slc", "k_win", "v_win")]
        ref = reference.nsa(q, *kv, *gates, **twin.settings)[0, -1]
        e = _compare(f"o[{n}] (length {Ln})", ref, o[n], TOLERANCE[case.dtype])
        if e:
            errs.append(e)
    return errs


# ---------------------------------------------------------------------------------------------
# Measurements: each returns (fn, grads, note) to time, or raises NotApplicable
# ---------------------------------------------------------------------------------------------
def _backward_of(out, grads):
    """A callable timing the backward alone: ``out`` was produced outside the timed region."""
    outs = list(out) if isinstance(out, (tuple, list)) else [out]
    dos = [torch.randn_like(o) for o in outs]

    def fn():
        torch.autograd.backward(outs, dos, retain_graph=True)

    return fn, grads


@dataclasses.dataclass
class Difference:
    """Time ``total`` minus time ``part`` (backward as fwd+bwd minus fwd, for a compiled function
    whose graph cannot be backpropagated twice)."""

    total: object
    part: object


def _backward_or_difference(fwd, grads, note):
    """Backward alone when the graph can be re-run (tried twice here, untimed), else the
    difference (fwd+bwd) - fwd, said in the note."""
    out = fwd()
    fn, _ = _backward_of(out, grads)
    try:
        fn()
        fn()
        return fn, grads, note
    except RuntimeError:
        del out, fn
        outs_fn = fwd

        def fwd_bwd():
            out = outs_fn()
            outs = list(out) if isinstance(out, (tuple, list)) else [out]
            torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])

        return Difference(fwd_bwd, fwd), grads, (note + "; bwd = (fwd+bwd) - fwd").lstrip("; ")


def _nsa_total(case, device, backend, pass_):
    why = nsa_not_runnable(backend, device, case.T)
    if why:
        raise NotApplicable(why)
    x = train_inputs(case, device)
    kw = dict(case.settings, backend=backend)

    def fwd():
        return api.nsa(**x, **kw)

    if pass_ == "fwd":
        return fwd, list(x.values()), ""
    return (*_backward_of(fwd(), list(x.values())), "")


def _nsa_branch(case, device, backend, branch, pass_):
    op = {"cmp": "compressed_attention", "select": "select_blocks", "slc": "selected_attention",
          "win": "sliding_window_attention"}.get(branch)
    needs = {"cmp": ["compressed_attention"], "select": ["compressed_attention", "select_blocks"],
             "slc": list(OPS[:3]), "win": ["sliding_window_attention"]}.get(branch, [])
    for o in needs:
        why = op_not_runnable(o, backend, device, case.T)
        if why:
            raise NotApplicable(why)
    kw = case.settings
    if branch == "gate":
        g = _generator(device, 4)
        dt = case.torch_dtype
        o3 = [_randn(g, device, dt, case.B, case.T, case.HQ, case.Dv).requires_grad_(True) for _ in range(3)]
        gates = [torch.sigmoid(_randn(g, device, dt, case.B, case.T, case.HQ)).requires_grad_(True)
                 for _ in range(3)]

        gate_fn = api.resolve_backend(backend, "gate_combine", device)

        def fwd():
            return gate_fn(*o3, *gates, dt)

        if pass_ == "fwd":
            return fwd, o3 + gates, f"g_cmp*o_cmp + g_slc*o_slc + g_win*o_win ({gate_fn.__module__})"
        return (*_backward_of(fwd(), o3 + gates), "")
    x = train_inputs(case, device)
    sc = case.scale
    if branch == "cmp":
        args = (x["q"], x["k_cmp"], x["v_cmp"])

        def fwd():
            return api.compressed_attention(*args, kw["kernel_size"], kw["stride"], scale=sc, backend=backend)[0]
    elif branch in ("select", "slc"):
        with torch.no_grad():
            _, lse = api.compressed_attention(x["q"], x["k_cmp"], x["v_cmp"], kw["kernel_size"], kw["stride"],
                                              scale=sc, backend=backend)
            sel = dict(kernel_size=kw["kernel_size"], stride=kw["stride"], block_size=kw["block_size"],
                       num_selected=kw["num_selected"], num_initial=kw["num_initial"], num_local=kw["num_local"],
                       scale=sc)
            idx = api.select_blocks(x["q"], x["k_cmp"], lse, **sel, backend=backend)
        if branch == "select":
            q, kc = x["q"].detach(), x["k_cmp"].detach()

            def fwd():
                return api.select_blocks(q, kc, lse, **sel, backend=backend)

            return fwd, [], f"{op}: scoring + top-n, no backward"
        args = (x["q"], x["k_slc"], x["v_slc"], idx)

        def fwd():
            return api.selected_attention(*args, kw["block_size"], scale=sc, backend=backend)
    elif branch == "win":
        args = (x["q"], x["k_win"], x["v_win"])

        def fwd():
            return api.sliding_window_attention(*args, kw["window_size"], scale=sc, backend=backend)
    else:
        raise ValueError(f"branch: unknown {branch!r}")

    grads = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    if pass_ == "fwd":
        return fwd, grads, ""
    return (*_backward_of(fwd(), grads), "")


def _nsa_phi(case, device, pass_):
    try:
        from nsa.layer import NativeSparseAttention, NSAConfig
    except ImportError as e:
        raise NotApplicable(f"nsa.layer not importable ({e})") from None
    shape = {k: v for k, v in case.settings.items() if k != "scale"}
    cfg = NSAConfig(hidden_size=case.Dk, num_heads=case.HQ, num_kv_heads=case.H, head_dim=case.Dk,
                    v_head_dim=case.Dv, **shape, compression="mlp")
    layer = NativeSparseAttention(cfg).to(device=device, dtype=case.torch_dtype)
    if not hasattr(layer, "compress"):
        raise NotApplicable("NativeSparseAttention has no compress(k, v)")
    g = _generator(device, 5)
    k = _randn(g, device, case.torch_dtype, case.B, case.T, case.H, case.Dk).requires_grad_(True)
    v = _randn(g, device, case.torch_dtype, case.B, case.T, case.H, case.Dv).requires_grad_(True)
    grads = [k, v] + [p for m in (layer.compress_k, layer.compress_v) for p in m.parameters()]

    def fwd():
        return layer.compress(k, v)

    note = "NativeSparseAttention.compress: MLP phi on K and V blocks + RoPE"
    if pass_ == "fwd":
        return fwd, grads, note
    return (*_backward_of(fwd(), grads), note)


_SDPA = {"sdpa.flash": "FLASH_ATTENTION", "sdpa.cudnn": "CUDNN_ATTENTION", "sdpa.efficient": "EFFICIENT_ATTENTION"}


def _sdpa_call(impl, q, k, v, causal):
    """A callable running SDPA with one backend forced; GQA native (enable_gqa) when the
    backend takes it, else K/V expanded to HQ heads here, outside the timed region."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, _SDPA[impl])
    G = q.shape[1] // k.shape[1]
    errors = []
    for expand in ((False, True) if G > 1 else (False,)):
        if expand:
            k = k.detach().repeat_interleave(G, 1).requires_grad_(k.requires_grad)
            v = v.detach().repeat_interleave(G, 1).requires_grad_(v.requires_grad)
        gqa = G > 1 and not expand

        def fn(k=k, v=v, gqa=gqa):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with torch.no_grad():
                    fn()
        except RuntimeError as e:
            errors.append(str(e).strip().splitlines()[0][:160])
            continue
        note = "K/V expanded to HQ heads outside timing" if expand else ("enable_gqa" if G > 1 else "")
        return fn, [k, v], note
    raise NotApplicable(f"{impl}: " + " | ".join(dict.fromkeys(errors)))


def _sdpa_train(case, device, impl, pass_):
    g = _generator(device, 6)
    dt = case.torch_dtype
    q = _randn(g, device, dt, case.B, case.HQ, case.T, case.Dk).requires_grad_(True)
    k = _randn(g, device, dt, case.B, case.H, case.T, case.Dk).requires_grad_(True)
    v = _randn(g, device, dt, case.B, case.H, case.T, case.Dv).requires_grad_(True)
    fn, kv, note = _sdpa_call(impl, q, k, v, causal=True)
    grads = [q] + kv
    if pass_ == "fwd":
        return fn, grads, note
    return (*_backward_of(fn(), grads), note)


def _sdpa_decode(case, device, impl, eager=False):
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    g = _generator(device, 7)
    dt = case.torch_dtype
    q = _randn(g, device, dt, case.B, case.HQ, 1, case.Dk)
    k = _randn(g, device, dt, case.B, case.H, case.T, case.Dk)
    v = _randn(g, device, dt, case.B, case.H, case.T, case.Dv)
    fn, (k, v), note = _sdpa_call(impl, q, k, v, causal=False)
    if eager:
        gqa = k.shape[1] != q.shape[1]
        backend = getattr(SDPBackend, _SDPA[impl])

        def context():
            # the backend choice and no_grad are set once around the loop, as a generation loop would
            stack = contextlib.ExitStack()
            stack.enter_context(torch.no_grad())
            stack.enter_context(sdpa_kernel(backend))
            return stack

        def eager_step():
            return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)

        return Eager(eager_step, context), [], ("one query over the full KV cache; " + note + "; eager").lstrip("; ")

    def step():
        with torch.no_grad():
            return fn()

    step, graph_note = _graphed(step, device)
    return step, [], ("one query over the full KV cache; " + note + graph_note).rstrip("; ")


@dataclasses.dataclass
class Eager:
    """A decoding step timed as called from Python (:meth:`Timer.eager`): ``step()`` runs it,
    ``context()`` returns the context entered once around all calls (no_grad, a backend choice)."""
    step: object
    context: object = contextlib.nullcontext


def _graphed(step, device):
    """A decoding step as a CUDA-graph replay (how a server runs it: no launch gaps, no host
    work between steps), for NSA and the baselines alike; eager on a CPU or if capture fails."""
    if device.type != "cuda":
        return step, ""
    try:
        step()  # warm-up: compile and autotune outside the capture
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            step()
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        torch.cuda.synchronize()
    except RuntimeError as e:
        return step, f"; eager (graph capture failed: {_one_line(e)})"
    return graph.replay, "; CUDA-graph replay"


_COMPILED_FLEX = []


def _flex_fn(device):
    from torch.nn.attention.flex_attention import flex_attention

    if device.type != "cuda":
        return flex_attention  # torch.compile of flex needs a GPU; eager on CPU (forward only)
    if not _COMPILED_FLEX:
        import torch._dynamo

        # one compiled graph per shape: allow many recompilations before dynamo gives up.
        for name in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit",
                     "accumulated_recompile_limit"):
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 256))
        # default dynamic=None: after the first recompile, T becomes a dynamic dimension, so a
        # preset compiles flex about twice per head-dim pair instead of once per length.
        _COMPILED_FLEX.append(torch.compile(flex_attention))
    return _COMPILED_FLEX[0]


def _flex_train(case, device, pass_):
    try:
        from torch.nn.attention.flex_attention import create_block_mask
    except ImportError as e:
        raise NotApplicable(f"FlexAttention not available ({e})") from None
    if device.type != "cuda" and pass_ == "bwd":
        raise NotApplicable("FlexAttention has no CPU backward")
    w = case.window_size

    def window(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx < w)

    flex = _flex_fn(device)
    # uncompiled, create_block_mask materializes the dense T x T mask (16 GiB at 128k)
    block_mask = create_block_mask(window, None, None, case.T, case.T, device=str(device),
                                   _compile=device.type == "cuda")
    g = _generator(device, 8)
    dt = case.torch_dtype
    rg = device.type == "cuda"
    q = _randn(g, device, dt, case.B, case.HQ, case.T, case.Dk).requires_grad_(rg)
    k = _randn(g, device, dt, case.B, case.H, case.T, case.Dk).requires_grad_(rg)
    v = _randn(g, device, dt, case.B, case.H, case.T, case.Dv).requires_grad_(rg)
    gqa = case.HQ != case.H

    def fn():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return flex(q, k, v, block_mask=block_mask, enable_gqa=gqa)

    note = f"sliding window {w}, " + ("torch.compile'd" if rg else "eager (CPU)")
    try:
        fn()
    except Exception as e:  # unsupported shape or dtype in this torch build
        raise NotApplicable(f"flex_attention: {_one_line(e)}") from None
    if pass_ == "fwd":
        return fn, [q, k, v] if rg else [], note
    return _backward_or_difference(fn, [q, k, v], note)


def _fla_train(case, device, pass_):
    try:
        from fla.ops.nsa import parallel_nsa
    except Exception as e:
        raise NotApplicable(f"fla not importable ({type(e).__name__})") from None
    g = _generator(device, 9)
    dt = case.torch_dtype
    B, T, HQ, H = case.B, case.T, case.HQ, case.H
    q = _randn(g, device, dt, B, T, HQ, case.Dk).requires_grad_(True)
    k = _randn(g, device, dt, B, T, H, case.Dk).requires_grad_(True)
    v = _randn(g, device, dt, B, T, H, case.Dv).requires_grad_(True)
    g_cmp = torch.sigmoid(_randn(g, device, dt, B, T, HQ)).requires_grad_(True)
    g_slc = torch.sigmoid(_randn(g, device, dt, B, T, HQ)).requires_grad_(True)

    def fn():
        return parallel_nsa(q, k, v, g_cmp=g_cmp, g_slc=g_slc, g_swa=None, block_counts=case.num_selected,
                            block_size=case.block_size, window_size=0)

    try:
        fn()
    except Exception as e:
        raise NotApplicable(f"fla parallel_nsa: {_one_line(e)}") from None
    grads = [q, k, v, g_cmp, g_slc]
    note = "fla-core parallel_nsa: mean-pooled cmp + top-k + slc, no window"
    if pass_ == "fwd":
        return fn, grads, note
    return _backward_or_difference(fn, grads, note)


def _nsa_decode(case, device, backend, eager=False):
    why = decode_not_runnable(backend, device, case.T)
    if why:
        raise NotApplicable(why)
    nsa_decode = _decode_module().nsa_decode
    x = decode_inputs(case, device)
    kw = dict(case.settings, backend=backend)
    if eager:
        return (Eager(lambda: nsa_decode(**x, **kw), torch.no_grad), [],
                "eager call of nsa_decode (host work included)")

    def step():
        with torch.no_grad():
            return nsa_decode(**x, **kw)

    if _decode_has_triton(device) and backend != "reference":
        fn, note = _graphed(step, device)
        return fn, [], note.lstrip("; ")
    return step, [], "reference decode (no triton kernel)"


# ---------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Task:
    case: Case
    impl: str
    pass_: str
    setup: object  # () -> (fn, grads, note)
    checked: bool  # gated by the NSA correctness check


BASELINES = ("sdpa", "flex", "fla")


def tasks_for(case: Case, device, backend, baselines=BASELINES, branches=True) -> list[Task]:
    """Every measurement of one case, in run order. ``baselines``: a subset of :data:`BASELINES`
    (True = all, False/None = none).

    A case on trained inputs times only what depends on the inputs' values: the whole NSA and,
    with ``branches``, the compressed, selection, selected and window ops. The gate combination,
    phi and the baselines cost the same on any values: they are timed on the random case of the
    same shape, whose full-attention times give the trained case its speedup (:func:`add_speedups`).
    """
    if baselines is True:
        baselines = BASELINES
    baselines = set(baselines or ())
    t = []
    if case.inputs != "random":
        for p in ("fwd", "bwd"):
            t.append(Task(case, "nsa", p, lambda p=p: _nsa_total(case, device, backend, p), True))
        if branches:
            for br in ("cmp", "select", "slc", "win"):
                for p in (("fwd",) if br == "select" else ("fwd", "bwd")):
                    t.append(Task(case, f"nsa.{br}", p,
                                  lambda br=br, p=p: _nsa_branch(case, device, backend, br, p), True))
        return t
    if case.kind == "decode":
        for p, eager in (("decode", False), ("decode_eager", True)):
            t.append(Task(case, "nsa", p, lambda eager=eager: _nsa_decode(case, device, backend, eager), True))
            if "sdpa" in baselines:
                for impl in _SDPA:
                    t.append(Task(case, impl, p, lambda impl=impl, eager=eager: _sdpa_decode(case, device, impl,
                                                                                            eager), False))
        return t
    for p in ("fwd", "bwd"):
        t.append(Task(case, "nsa", p, lambda p=p: _nsa_total(case, device, backend, p), True))
    if branches:
        for br in ("cmp", "select", "slc", "win", "gate"):
            for p in (("fwd",) if br == "select" else ("fwd", "bwd")):
                # the gate combination is plain PyTorch (checked as part of the whole NSA)
                t.append(Task(case, f"nsa.{br}", p,
                              lambda br=br, p=p: _nsa_branch(case, device, backend, br, p), br != "gate"))
        for p in ("fwd", "bwd"):
            t.append(Task(case, "nsa.phi", p, lambda p=p: _nsa_phi(case, device, p), False))
    if "sdpa" in baselines:
        for impl in _SDPA:
            for p in ("fwd", "bwd"):
                t.append(Task(case, impl, p, lambda impl=impl, p=p: _sdpa_train(case, device, impl, p), False))
    if "flex" in baselines:
        for p in ("fwd", "bwd"):
            t.append(Task(case, "flex.window", p, lambda p=p: _flex_train(case, device, p), False))
    if "fla" in baselines:
        for p in ("fwd", "bwd"):
            t.append(Task(case, "fla.nsa", p, lambda p=p: _fla_train(case, device, p), False))
    return t


FIELDS = ("case", "inputs", "impl", "pass", "T", "B", "HQ", "H", "D", "Dv", "dtype", "ms", "speedup", "tflops", "gbps",
          "ideal", "mem_mib", "ok", "backend", "note")


def _record(task: Task, backend: str) -> dict:
    c = task.case
    return {"case": c.name, "inputs": c.inputs, "impl": task.impl, "pass": task.pass_, "T": c.T, "B": c.B,
            "HQ": c.HQ, "H": c.H, "D": c.Dk, "Dv": c.Dv, "dtype": c.dtype, "ms": None, "speedup": None,
            "tflops": None, "gbps": None, "ideal": None, "mem_mib": None, "ok": None,
            "backend": backend if task.impl.startswith("nsa") else None, "note": ""}


def _free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure(task: Task, timer: Timer, backend: str, check: CheckResult | None) -> dict:
    """Run one task into a record (see :data:`FIELDS`)."""
    rec = _record(task, backend)
    c = task.case
    if task.checked and check is not None:
        verdict, why = check.get(task.impl, task.pass_)
        if verdict is not True:
            rec["ok"] = False if verdict is False else None
            rec["note"] = why
            return rec
    try:
        fn, grads, note = task.setup()
        if isinstance(fn, Difference):
            total, mem = timer(fn.total, grads)
            part, _ = timer(fn.part, grads)
            ms = max(total - part, 0.0)
        elif isinstance(fn, Eager):
            ms, mem = timer.eager(fn), None
        else:
            ms, mem = timer(fn, grads)
    except NotApplicable as e:
        rec["note"] = f"n/a: {e}"
        return rec
    except torch.cuda.OutOfMemoryError:
        rec["note"] = "n/a: out of memory"
        return rec
    except Exception as e:  # a baseline may fail in ways its library does not document
        if task.impl.startswith("nsa"):
            rec["ok"] = False
        rec["note"] = f"error: {_one_line(e)}"
        return rec
    rec.update(ms=ms, mem_mib=mem, ok=True, note=note)
    if c.kind == "train":
        fl = _train_flops(c).get((task.impl, task.pass_))
        if fl:
            rec["tflops"] = fl / (ms * 1e-3) / 1e12
        if task.impl == "nsa":
            f = _train_flops(c)
            rec["ideal"] = f[("sdpa.flash", task.pass_)] / f[("nsa", task.pass_)]
        if task.impl == "nsa.gate" and task.pass_ == "fwd":
            es = torch.empty((), dtype=c.torch_dtype).element_size()
            n = c.B * c.T * c.HQ
            rec["gbps"] = (4 * n * c.Dv + 3 * n) * es / (ms * 1e-3) / 1e9
    else:
        by = _decode_bytes(c)
        nbytes = by["nsa"] if task.impl == "nsa" else by["sdpa"]
        rec["gbps"] = nbytes / (ms * 1e-3) / 1e9
        if task.impl == "nsa":
            rec["ideal"] = by["sdpa"] / by["nsa"]
    return rec


def copy_bandwidth_gbps(device, nbytes: int | None = None, reps: int = 10) -> float:
    """The device's measured copy bandwidth, GB/s of bytes read + written: the median of ``reps``
    copies of one ``nbytes`` buffer into another (default 1 GiB on CUDA, 64 MiB on CPU), the
    ceiling a decoding step's bytes read are compared with (see :func:`add_copy_share`)."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    n = nbytes or (1 << 30 if cuda else 1 << 26)
    src = torch.empty(n, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(reps):
        if cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            dst.copy_(src)
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) * 1e-3)
        else:
            t0 = time.perf_counter()
            dst.copy_(src)
            times.append(time.perf_counter() - t0)
    del src, dst
    return 2 * n / statistics.median(times) / 1e9


def add_copy_share(records: list[dict], copy_gbps: float):
    """``copy_share`` on every timed decode record: its GB/s (bytes read) / the copy bandwidth."""
    for r in records:
        if r["pass"] in ("decode", "decode_eager") and r.get("gbps"):
            r["copy_share"] = r["gbps"] / copy_gbps


def shape_key(r: dict) -> tuple:
    """What a record's full-attention baseline depends on: the case with its inputs left out
    (preset, kind, T, B, heads, dims, dtype) and the pass."""
    return (*r["case"].split("/")[:2], r["T"], r["B"], r["HQ"], r["H"], r["D"], r["Dv"], r["dtype"], r["pass"])


def add_speedups(records: list[dict]):
    """speedup = best full-attention (SDPA) time of the same shape and pass / this time (a case
    on trained inputs is compared with the baselines timed on its random twin: see
    :func:`shape_key`)."""
    best = {}
    for r in records:
        if r["impl"].startswith("sdpa.") and r["ok"] and r["ms"]:
            key = shape_key(r)
            best[key] = min(best.get(key, math.inf), r["ms"])
    for r in records:
        b = best.get(shape_key(r))
        if b is not None and r["ms"]:
            r["speedup"] = b / r["ms"]


def run(cases: list[Case], device, backend="auto", reps=3, baselines=BASELINES, branches=True, progress=True,
        threads=None, log=None) -> list[dict]:
    """Check and time every case; returns the records (dicts with :data:`FIELDS`).

    ``threads``: CPU threads of torch during the run (restored after); None leaves them as they are.
    """
    device = torch.device(device)
    prev_threads = torch.get_num_threads()
    if threads is not None and device.type == "cpu":
        torch.set_num_threads(threads)
    try:
        return _run(cases, device, backend, reps, baselines, branches, progress, log)
    finally:
        torch.set_num_threads(prev_threads)


class _NoBar:
    """Stands in for a tqdm bar that draws nothing (progress off, or tqdm not installed)."""

    disable = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def set_postfix_str(self, *args, **kwargs):
        pass

    def update(self, n=1):
        pass


def _progress_bar(total, progress):
    """A tqdm bar when ``progress`` and tqdm is installed (it is optional: the ``train`` extra);
    otherwise a bar that draws nothing, and the caller prints one line per case."""
    if not progress:
        return _NoBar()
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _NoBar()
    # disable=None: tqdm draws only on a terminal; elsewhere (a log file) one line per case instead
    return tqdm(total=total, desc="nsa bench", unit="run", disable=None, dynamic_ncols=True)


def _run(cases, device, backend, reps, baselines, branches, progress, log):
    import sys

    timer = Timer(device, reps)
    plan = [(c, tasks_for(c, device, backend, baselines, branches)) for c in cases]
    records = []
    with _progress_bar(sum(len(t) for _, t in plan), progress) as bar:
        for i, (case, tasks) in enumerate(plan):
            t0 = time.perf_counter()
            check = None
            if any(t.checked for t in tasks):
                bar.set_postfix_str(f"{case.name} check", refresh=True)
                if case.kind == "train":
                    check = check_train(case, backend, device, branches=branches)
                else:
                    check = check_decode(case, backend, device)
                _free(device)
            for task in tasks:
                bar.set_postfix_str(f"{case.name} {task.impl} {task.pass_}", refresh=True)
                records.append(measure(task, timer, backend, check))
                if log:
                    log(records[-1])
                bar.update()
                _free(device)
            if progress and bar.disable:
                print(f"[{i + 1}/{len(plan)}] {case.name}: {time.perf_counter() - t0:.1f} s", file=sys.stderr,
                      flush=True)
    add_speedups(records)
    return records
