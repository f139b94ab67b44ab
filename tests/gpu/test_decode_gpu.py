"""Triton NSA decoding on the GPU at the paper size, against the float32 decode reference.

bf16, HQ=64, H=4, Dk=Dv=128, l=32, d=16, l'=64, n=16 (1 initial + 2 local), w=512; contexts 8k
and 64k, batch 1 and 8 with different lengths per sequence. The caches are padded past every
sequence with NaN, so any read of the padding makes the output non-finite; the reference runs
on the same values upcast to float32 (padding zeroed, it masks it anyway).

Tolerances. Output: relative error 1e-2 against the float32 reference. The kernel rounds the
probabilities to bf16 before the P.V product (as flash attention does) and the output once to
bf16 (2^-9 relative on average, 2^-8 at most per element); the three branch sums are float32.
Selections: the kernel's block scores are float32 sums in another order than the reference's,
so a block within ~1e-6 relative of the n-th best may swap: >= 99% of rows must equal the
reference's and every row must be a valid top-n of the float64 scores (to 1e-5 relative).

Timing (not a test), from the repository root on the GPU machine:
    PYTHONPATH=src:. python3 tests/gpu/test_decode_gpu.py [--ctx 8192 65536 131072] [--batch 1 8 64]
prints the decode step time (eager, and replayed from a CUDA graph) against SDPA on the same
cache, with bytes read; ``--profile`` adds per-kernel CUDA times.
"""

import contextlib

import pytest
import torch

from nsa.ops.decode import nsa_decode, nsa_decode_reference
from nsa.ops.decode_triton import nsa_decode_triton
from nsa.ops.utils import num_compressed
from tests.helpers import assert_close, needs_cuda
from tests.ops.test_decode_triton import _check_rows, _scores64

pytestmark = [pytest.mark.gpu, needs_cuda]

PAPER = dict(kernel_size=32, stride=16, block_size=64, num_selected=16, num_initial=1, num_local=2,
             window_size=512)
RATIO = 1e-2


def make_cache(lens, cap, HQ=64, H=4, D=128, dtype=torch.bfloat16, seed=0, pad=float("nan"), cfg=PAPER):
    """Decode inputs (ORDER of nsa_decode) with sequence n valid up to lens[n], ``pad`` beyond; seq_lens."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    N = len(lens)
    Tc_cap = num_compressed(cap, cfg["kernel_size"], cfg["stride"])
    r = lambda *s: torch.randn(*s, generator=gen, device="cuda", dtype=torch.float32).to(dtype)  # noqa: E731
    q = r(N, HQ, D)
    caches = [r(N, Tc_cap, H, D), r(N, Tc_cap, H, D), r(N, cap, H, D), r(N, cap, H, D), r(N, cap, H, D),
              r(N, cap, H, D)]
    for n, L in enumerate(lens):
        Tc = num_compressed(L, cfg["kernel_size"], cfg["stride"])
        for i, c in enumerate(caches):
            c[n, (Tc if i < 2 else L):] = pad
    gates = [torch.rand(N, HQ, generator=gen, device="cuda").to(dtype) for _ in range(3)]
    seq_lens = torch.tensor(lens, dtype=torch.int32, device="cuda")
    return [q, *caches, *gates], seq_lens


CASES = [
    ("ctx8k_b1", [8192], 8192),
    ("ctx8k_b8", [8192, 1, 31, 32, 4097, 6000, 8000, 8191], 8192 + 100),
    ("ctx64k_b1", [65536], 65536),
    ("ctx64k_b8", [65536, 65535, 50000, 33333, 20000, 4096, 777, 64], 65536 + 64),
]


@pytest.mark.parametrize("lens,cap", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_paper_decode(lens, cap):
    args, seq_lens = make_cache(lens, cap)
    scale = 128 ** -0.5
    o, idx = nsa_decode(*args, seq_lens, return_block_indices=True, backend="triton", **PAPER)
    ref_args = [torch.nan_to_num(a.float(), nan=0.0) for a in args]
    o_ref, idx_ref = nsa_decode_reference(*ref_args, seq_lens, **PAPER, scale=scale, return_block_indices=True)
    assert o.dtype == torch.bfloat16
    assert_close("o", o_ref, o, RATIO)
    same = (idx == idx_ref).all(-1)
    assert same.sum() >= 0.99 * same.numel(), f"only {int(same.sum())} of {same.numel()} rows equal the reference"
    _check_rows(idx.cpu(), _scores64(ref_args, seq_lens, PAPER, scale).cpu(), seq_lens.cpu(), PAPER)
    o2, idx2 = nsa_decode(*args, seq_lens, return_block_indices=True, backend="triton", **PAPER)
    assert torch.equal(o, o2) and torch.equal(idx, idx2), "two identical decode steps differ"


@pytest.mark.parametrize("lens,cap", [c[1:] for c in CASES if c[0] != "ctx8k_b1"],
                         ids=[c[0] for c in CASES if c[0] != "ctx8k_b1"])
def test_paged_decode_equals_dense(lens, cap):
    """The kernels reading page pools through a page table (pages of each sequence in a random
    order) give the dense step's output and selections: the same arithmetic on the same values."""
    from nsa.ops.decode_paged import nsa_decode_paged

    args, seq_lens = make_cache(lens, cap)  # NaN past every sequence: the paged reads must mask it too
    q, kc, vc, ks, vs, kw, vw, *gates = args
    bs, st, shift = PAPER["block_size"], PAPER["stride"], PAPER["kernel_size"] // PAPER["stride"] - 1
    N, M = len(lens), -(-cap // bs)
    g = torch.Generator(device="cuda").manual_seed(3)
    table = torch.randperm(N * M, device="cuda", generator=g).to(torch.int32).view(N, M)

    def pages(t, per_page, lead=0):
        flat = t.new_zeros(N, M * per_page, *t.shape[2:])
        flat[:, lead:lead + t.shape[1]] = t[:, :M * per_page - lead]
        pool = t.new_zeros(N * M, per_page, *t.shape[2:])
        pool[table.long()] = flat.view(N, M, per_page, *t.shape[2:])
        return pool

    pools = [pages(kc, bs // st, shift), pages(vc, bs // st, shift), *(pages(t, bs) for t in (ks, vs, kw, vw))]
    dense = nsa_decode(*args, seq_lens, backend="triton", **PAPER)
    paged = nsa_decode_paged(q, *pools, *gates, table, seq_lens, backend="triton", **PAPER)
    assert_close("paged vs dense", dense.float(), paged.float(), RATIO)


@pytest.mark.bigmem
def test_cache_past_2_pow_31_elements():
    """600 sequences of capacity 8192: each raw cache holds 600*8192*4*128 = 2.5e9 > 2^31 elements,
    and the last 88 sequences lie wholly past 2^31; their outputs and selections match the
    reference run on copies of just those sequences."""
    N, cap = 600, 8192
    assert N * cap * 4 * 128 > 2 ** 31 and 512 * cap * 4 * 128 >= 2 ** 31
    lens = [cap - (n % 7) * 301 for n in range(N)]
    args, seq_lens = make_cache(lens, cap, seed=3)
    o, idx = nsa_decode(*args, seq_lens, return_block_indices=True, backend="triton", **PAPER)
    tail = slice(N - 8, N)
    ref_args = [torch.nan_to_num(a[tail].float(), nan=0.0) for a in args]
    o_ref, idx_ref = nsa_decode_reference(*ref_args, seq_lens[tail], **PAPER, scale=128 ** -0.5,
                                          return_block_indices=True)
    assert torch.isfinite(o).all()
    assert_close("o[tail]", o_ref, o[tail], RATIO)
    same = (idx[tail] == idx_ref).all(-1)
    assert same.sum() >= 0.99 * same.numel(), f"only {int(same.sum())} of {same.numel()} rows equal"
    _check_rows(idx[tail].cpu(), _scores64(ref_args, seq_lens[tail], PAPER, 128 ** -0.5).cpu(),
                seq_lens[tail].cpu(), PAPER)


def test_auto_backend_runs_the_kernel():
    args, seq_lens = make_cache([3000, 77], 3100)
    o = nsa_decode(*args, seq_lens, backend="triton", **PAPER)
    assert torch.equal(o, nsa_decode(*args, seq_lens, backend="auto", **PAPER))
    # inference only: when autograd needs a graph, 'auto' takes the (differentiable) reference
    args[0].requires_grad_()
    o_grad = nsa_decode(*args, seq_lens, backend="auto", **PAPER)
    assert o_grad.requires_grad and not nsa_decode(*args, seq_lens, backend="triton", **PAPER).requires_grad
    assert_close("o", o_grad.detach().float(), o.float(), RATIO)


def test_cuda_graph_capture():
    """No host synchronization: a decode step (the public nsa_decode, whose seq_lens range check
    is skipped while capturing) captures in a CUDA graph and replays with new sequence lengths
    (a token appended) to the same result as an eager call."""
    lens = [4096, 1000, 64, 3000]
    args, seq_lens = make_cache(lens, 4096 + 64, pad=0.0)
    call = lambda: nsa_decode(*args, seq_lens, **PAPER, backend="triton")  # noqa: E731
    call()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        o_graph = call()
    seq_lens.copy_(torch.tensor([4097, 1001, 65, 3001], dtype=torch.int32))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(o_graph, call())


@contextlib.contextmanager
def sync_errors():
    """Inside: any synchronizing CUDA call (a device-to-host read, a blocking copy) raises."""
    prev = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(prev)


@pytest.mark.parametrize("return_block_indices", [False, True], ids=["o", "o_and_indices"])
def test_nsa_decode_eager_no_sync(return_block_indices, monkeypatch):
    """An eager nsa_decode (after a first call compiled the kernels) makes no synchronizing CUDA
    call: value checks are off by default (NSA_DEBUG_CHECKS=1 turns them on) and the launch
    plan is cached; the result equals the first call's."""
    monkeypatch.delenv("NSA_DEBUG_CHECKS", raising=False)
    args, seq_lens = make_cache([4096, 1000, 64, 3000], 4096 + 64, pad=0.0)
    first = nsa_decode(*args, seq_lens, **PAPER, backend="triton", return_block_indices=return_block_indices)
    torch.cuda.synchronize()
    with sync_errors():
        for _ in range(3):
            out = nsa_decode(*args, seq_lens, **PAPER, backend="triton", return_block_indices=return_block_indices)
        out_auto = nsa_decode(*args, seq_lens, **PAPER, return_block_indices=return_block_indices)
    torch.cuda.synchronize()
    for a, b, c in zip(*(x if isinstance(x, tuple) else (x,) for x in (first, out, out_auto))):
        assert torch.equal(a, b) and torch.equal(a, c)


def _decode_layer(shared_kv, dtype=torch.bfloat16):
    from nsa.layer import NativeSparseAttention, NSAConfig

    # 20 selected blocks of 64 cover every causal block of the <= 1033-token sequences below: top-n has
    # one answer, so the decoded rows and the full forward cannot differ by a flipped near-tie
    cfg = NSAConfig.preset("small", shared_kv=shared_kv, backend="triton", window_size=128, num_selected=20)
    torch.manual_seed(0)
    m = NativeSparseAttention(cfg).cuda().to(dtype)
    with torch.no_grad():
        for pe in (m.compress_k.pos_emb, m.compress_v.pos_emb):
            pe.normal_(std=0.5)
    return m, cfg


@pytest.mark.parametrize("lens", [[1000, 1000], [700, 1000, 333, 64]], ids=["equal_lens", "mixed_lens"])
@pytest.mark.parametrize("shared_kv", [False, True], ids=["indep_kv", "shared_kv"])
def test_layer_decode_step_eager_no_sync(lens, shared_kv):
    """Eager layer decoding steps driven by NSACache (prefill, then steps that complete
    compression blocks for all, none or some sequences) make no synchronizing CUDA call,
    and their outputs equal the full forward of each sequence (bf16, the same kernels)."""
    m, cfg = _decode_layer(shared_kv)
    steps = 2 * cfg.stride + 1
    xs = [torch.randn(1, L + steps, cfg.hidden_size, device="cuda", dtype=torch.bfloat16) for L in lens]
    cu = torch.tensor([0] + lens, device="cuda").cumsum(0).to(torch.int32)
    cache = m.new_cache()
    ys, completed = [], []
    with torch.no_grad():
        m(torch.cat([xi[:, :L] for xi, L in zip(xs, lens)], 1), cache=cache, cu_seqlens=cu)
        x0 = torch.cat([xi[:, L] for xi, L in zip(xs, lens)], 0).unsqueeze(1)
        ys.append(m(x0, cache=cache))  # the first step compiles any kernel not compiled yet
        torch.cuda.synchronize()
        with sync_errors():
            for s in range(1, steps):
                x = torch.cat([xi[:, L + s] for xi, L in zip(xs, lens)], 0).unsqueeze(1)
                ys.append(m(x, cache=cache))
                completed.append(list(cache.completed))
        torch.cuda.synchronize()
        assert any(completed), "no step completed a compression block"
        y = torch.cat(ys, 1)
        for n, (xi, L) in enumerate(zip(xs, lens)):
            assert_close(f"seq {n}", m(xi)[0, L:].float(), y[n].float(), 2e-2)


@pytest.mark.parametrize("completes", [True, False], ids=["step_completes_blocks", "no_block_completed"])
def test_layer_decode_step_eager_equals_graph_replay(completes):
    """One layer decoding step captured in a CUDA graph and replayed on the same cache state
    gives exactly the eager step's output (and the same cache contents afterwards). Both
    sequences have the same length, so the step completes a compression block for both or for
    neither (a subset would need a host-to-device copy, which capture does not allow)."""
    m, cfg = _decode_layer(shared_kv=False)
    # the new token makes L + 1 tokens; it completes a block when (L + 1 - kernel_size) % stride == 0
    # (about 900 tokens: the cache holds a power of two of at least L tokens, 1024 here, so the step fits)
    L = (900 // cfg.stride) * cfg.stride + cfg.kernel_size - 1 + (0 if completes else 1)
    assert ((L + 1 - cfg.kernel_size) % cfg.stride == 0) == completes
    N = 2
    x = torch.randn(N, L + 1, cfg.hidden_size, device="cuda", dtype=torch.bfloat16)
    cache = m.new_cache()
    names = ("k_slc", "v_slc", "k_win", "v_win", "k_cmp", "v_cmp", "k_tail", "v_tail")
    with torch.no_grad():
        m(x[:, :L], cache=cache)
        assert cache.capacity > L + 1  # the step does not grow the cache
        held = {k: getattr(cache, k) for k in names}
        saved = {k: t.clone() for k, t in held.items()}
        seq_lens, lengths = cache.seq_lens, list(cache.lengths)

        def restore():
            for k, t in held.items():
                assert getattr(cache, k) is t
                t.copy_(saved[k])
            cache.seq_lens, cache.lengths = seq_lens, list(lengths)

        step_x = x[:, L:].contiguous()
        eager = m(step_x, cache=cache)
        assert (len(cache.completed) == N) == completes
        after = {k: t.clone() for k, t in held.items()}
        restore()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = m(step_x, cache=cache)
        restore()
        graph.replay()
        torch.cuda.synchronize()
    assert torch.equal(eager, out)
    for k in names:
        assert torch.equal(after[k], held[k]), k


def _bench(ctxs, batches, HQ=64, H=4, D=128, profile=False):
    import triton
    import torch.nn.functional as F

    print(f"# {torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__}")
    print(f"# decode, one token per sequence, bf16, HQ={HQ} H={H} D={D}, paper NSA settings; "
          "GB/s = KV bytes the step must read / time")
    cfg = PAPER
    for L in ctxs:
        for N in batches:
            args, seq_lens = make_cache([L] * N, L, HQ, H, D, pad=0.0)
            args[5], args[6] = args[3], args[4]  # window shares the selection cache, as SDPA reads one
            scale = D ** -0.5
            nsa_fn = lambda: nsa_decode_triton(*args, seq_lens, **cfg, scale=scale)  # noqa: E731
            q4 = args[0].view(N, 1, HQ, D).transpose(1, 2)  # [N, HQ, 1, D]
            k4, v4 = args[3].transpose(1, 2), args[4].transpose(1, 2)  # [N, H, L, D]
            sdpa = lambda: F.scaled_dot_product_attention(q4, k4, v4, enable_gqa=True)  # noqa: E731
            nsa_fn()
            sdpa()
            t_nsa = triton.testing.do_bench(nsa_fn)
            t_sdpa = triton.testing.do_bench(sdpa)
            # the same step replayed from a CUDA graph: no Python launch overhead
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                nsa_fn()
            t_graph = triton.testing.do_bench(graph.replay)
            Tc = num_compressed(L, cfg["kernel_size"], cfg["stride"])
            keys = Tc + min(cfg["num_selected"] * cfg["block_size"], L) + min(cfg["window_size"], L)
            b_nsa = N * H * keys * 2 * D * 2 + N * HQ * Tc * 4 * 2  # KV, and the kept scores written + read
            b_sdpa = N * H * L * 2 * D * 2
            print(f"ctx={L:6d} N={N:3d}  nsa {t_nsa:7.3f} ms ({b_nsa / t_nsa * 1e-6:6.0f} GB/s)  "
                  f"graph {t_graph:7.3f} ms   sdpa {t_sdpa:7.3f} ms ({b_sdpa / t_sdpa * 1e-6:6.0f} GB/s)  "
                  f"speedup {t_sdpa / t_nsa:5.2f}x (graph {t_sdpa / t_graph:5.2f}x)", flush=True)
            if profile:
                with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                    for _ in range(20):
                        graph.replay()
                    torch.cuda.synchronize()
                print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=8), flush=True)
            del args, q4, k4, v4, graph
            torch.cuda.empty_cache()


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ctx", type=int, nargs="*", default=[8192, 65536, 131072])
    parser.add_argument("--batch", type=int, nargs="*", default=[1, 8, 64])
    parser.add_argument("--profile", action="store_true", help="per-kernel CUDA times of each case")
    a = parser.parse_args()
    _bench(a.ctx, a.batch, profile=a.profile)
