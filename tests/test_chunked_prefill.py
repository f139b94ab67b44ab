"""Chunked prefill: appending chunks of any length to a filled cache (NSACache and PagedNSACache)
gives the outputs and the cache state of one prefill of the whole sequence, and the decoding
steps after it equal the full forward."""

import pytest
import torch

from nsa import PagedNSACache
from nsa.ops.utils import num_compressed
from tests.helpers import assert_close
from tests.test_layer import make_layer, tiny

T = 41  # tiny config: kernel 8, stride 4, block 8, 4 selected blocks, window 16

CACHES = {"dense": lambda m: m.new_cache(), "paged": lambda m: PagedNSACache.for_layer(m.config, 24)}

# Pieces a length-T sequence is fed in: prefill, then chunks (1 is a decoding step); what is left is decoded.
SPLITS = {
    "one_chunk": [5, 20],
    "below_kernel": [2, 3, 1, 2],        # every piece inside the first compression block
    "across_blocks": [7, 9, 1, 16],      # chunks completing several compression blocks / pages
    "stride_aligned": [8, 4, 8, 12],
    "long_chunk": [1, 33],               # a chunk longer than the window and several pages
}


def _state(cache, n):
    return cache.tokens(n)


@pytest.mark.parametrize("kind", CACHES)
@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_chunks_equal_one_prefill(kind, split, backend):
    m = make_layer(tiny(backend=backend, v_head_dim=8))
    x = torch.randn(2, T, 64, dtype=torch.float64)
    full = m(x)
    cache, whole = CACHES[kind](m), CACHES[kind](m)
    outs, t = [], 0
    for n in SPLITS[split]:
        outs.append(m(x[:, t:t + n], cache=cache))
        t += n
    m(x[:, :t], cache=whole)
    assert_close("chunks", full[:, :t], torch.cat(outs, 1), 1e-12)
    assert cache.lengths == whole.lengths == [t, t]
    for r in range(2):
        a, b = _state(whole, r), _state(cache, r)
        for name in a._fields:
            assert_close(f"{name} row {r}", getattr(a, name), getattr(b, name), 1e-12)
    steps = [m(x[:, s:s + 1], cache=cache) for s in range(t, T)]
    assert_close("decode after chunks", full[:, t:], torch.cat(steps, 1), 1e-12)


@pytest.mark.parametrize("kind", CACHES)
@pytest.mark.parametrize("cfg", [dict(shared_kv=True), dict(compression="mean"), dict(window_size=5)],
                         ids=["shared_kv", "mean", "window5"])
def test_chunks_other_configs(kind, cfg):
    m = make_layer(tiny(**cfg))
    x = torch.randn(1, 30, 64, dtype=torch.float64)
    full = m(x)
    cache = CACHES[kind](m)
    y = [m(x[:, :6], cache=cache), m(x[:, 6:19], cache=cache), m(x[:, 19:20], cache=cache), m(x[:, 20:], cache=cache)]
    assert_close("chunks", full, torch.cat(y, 1), 1e-12)


@pytest.mark.parametrize("kind", CACHES)
def test_packed_chunks_of_different_lengths(kind):
    """One call appends a chunk of its own length to each sequence (0: the sequence waits)."""
    m = make_layer(tiny())
    lens = [3, 13, 1]
    xs = [torch.randn(1, 40, 64, dtype=torch.float64) for _ in lens]
    fulls = [m(xi)[0] for xi in xs]
    cache = CACHES[kind](m)
    cu = torch.tensor([0] + lens).cumsum(0).to(torch.int32)
    m(torch.cat([xi[:, :L] for xi, L in zip(xs, lens)], 1), cache=cache, cu_seqlens=cu)
    fed = list(lens)
    for chunk in ([5, 0, 17], [1, 1, 1], [0, 9, 2], [12, 3, 0]):
        x = torch.cat([xi[:, a:a + c] for xi, a, c in zip(xs, fed, chunk)], 1)
        cu = torch.tensor([0] + chunk).cumsum(0).to(torch.int32)
        y = m(x, cache=cache, cu_seqlens=cu)
        for n, (a, c) in enumerate(zip(fed, chunk)):
            assert_close(f"chunk {chunk} seq {n}", fulls[n][a:a + c], y[0, int(cu[n]):int(cu[n + 1])], 1e-12)
        fed = [a + c for a, c in zip(fed, chunk)]
        assert cache.lengths == fed
    steps = min(40 - f for f in fed)
    y = torch.cat([m(torch.cat([xi[:, f + s:f + s + 1] for xi, f in zip(xs, fed)]), cache=cache)
                   for s in range(steps)], 1)
    for n, f in enumerate(fed):
        assert_close(f"decode seq {n}", fulls[n][f:f + steps], y[n], 1e-12)


def test_chunk_compresses_only_the_blocks_it_completes():
    cfg = tiny()
    m = make_layer(cfg)
    x = torch.randn(1, 40, 64, dtype=torch.float64)
    cache = m.new_cache()
    m(x[:, :10], cache=cache)
    calls = []
    handle = m.compress_k.register_forward_hook(lambda mod, inp, out: calls.append(inp[0].shape[1]))
    try:
        for a, b in ((10, 11), (11, 23), (23, 24), (24, 40)):
            before = len(calls)
            m(x[:, a:b], cache=cache)
            new = num_compressed(b, cfg.kernel_size, cfg.stride) - num_compressed(a, cfg.kernel_size, cfg.stride)
            assert calls[before:] == ([new] if new else [])
    finally:
        handle.remove()


def test_chunk_under_inference_mode_and_autocast():
    m = make_layer(tiny(), dtype=torch.float32)
    x = torch.randn(2, 30, 64)
    full = m(x)
    cache = m.new_cache()
    with torch.inference_mode():
        y0 = m(x[:, :9], cache=cache)
    with torch.no_grad():
        y1 = m(x[:, 9:22], cache=cache)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y2 = m(x[:, 22:], cache=cache)
    assert_close("float32 chunks", full[:, :22], torch.cat([y0, y1], 1), 1e-5)
    assert_close("bf16 autocast chunk", full[:, 22:], y2.float(), 2e-2)


def test_triton_interpreter_chunk():
    """The chunk path with the Triton kernels (under the interpreter on CPU)."""
    m = make_layer(tiny(backend="triton"), dtype=torch.float32)
    x = torch.randn(1, 20, 64)
    full = m(x)
    cache = m.new_cache()
    y = torch.cat([m(x[:, :6], cache=cache), m(x[:, 6:17], cache=cache), m(x[:, 17:], cache=cache)], 1)
    assert_close("triton chunks", full, y, 1e-5)


@pytest.mark.parametrize("kind", CACHES)
def test_chunk_errors(kind):
    m = make_layer(tiny())
    x = torch.randn(2, 10, 64, dtype=torch.float64)
    cache = CACHES[kind](m)
    m(x[:, :4], cache=cache)
    bad = [
        (dict(x=x[:1, :3]), "x: appending"),
        (dict(x=x[:, :0]), "x"),
        (dict(x=x[:1, :3], cu_seqlens=torch.tensor([0, 3], dtype=torch.int32)), "cu_seqlens: expected N"),
        (dict(x=x[:1, :3], cu_seqlens=torch.tensor([0, 2, 1], dtype=torch.int32)), "cu_seqlens: expected non-dec"),
        (dict(x=x[:1, :3], cu_seqlens=torch.tensor([0, 1, 2], dtype=torch.int32)), "cu_seqlens: expected non-dec"),
        (dict(x=x[:1, :3], cu_seqlens=torch.tensor([0, 1, 3])), "cu_seqlens: expected an int32"),
        (dict(x=x[:, :3], cu_seqlens=torch.tensor([0, 1, 3], dtype=torch.int32)), "x: packed"),
        (dict(x=x[:1, :0], cu_seqlens=torch.tensor([0, 0, 0], dtype=torch.int32)), "x: no token"),
    ]
    for kw, match in bad:
        with pytest.raises(ValueError, match=match):
            m(kw.pop("x"), cache=cache, **kw)
    assert cache.lengths == [4, 4]
    z = torch.zeros(3, 2, 16, dtype=torch.float64)
    with pytest.raises(ValueError, match="chunk_lens"):
        cache.extend([3], z, z, z[:0], z[:0], z, z, z, z)
    with pytest.raises(ValueError, match="chunk_lens"):
        cache.extend([0, 0], z[:0], z[:0], z[:0], z[:0], z[:0], z[:0], z[:0], z[:0])
    with pytest.raises(ValueError, match="k_slc"):
        cache.extend([1, 1], z[:2], z[:2], z[:0], z[:0], z, z[:2], z[:2], z[:2])
    with pytest.raises(ValueError, match="k_cmp"):  # 4 + 4 completes one compressed token per sequence
        cache.extend([4, 4], *(torch.zeros(8, 2, 16, dtype=torch.float64),) * 2, z[:1], z[:1],
                     *(torch.zeros(8, 2, 16, dtype=torch.float64),) * 4)
    assert cache.lengths == [4, 4]
