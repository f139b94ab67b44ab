"""NSACache with the layer: prefill + token-by-token decode == the full forward."""

import pytest
import torch

from nsa.cache import NSACache
from nsa.layer import NSAConfig
from nsa.ops.utils import num_compressed
from tests.helpers import assert_close
from tests.test_layer import make_layer, tiny

T_FULL = 41  # tiny config: kernel 8, stride 4, block 8, 4 selected blocks, window 16


def _decode(m, cache, x, start):
    """Feed x[:, start:] one token per call; returns the outputs [N, T - start, hidden]."""
    return torch.cat([m(x[:, t:t + 1], cache=cache) for t in range(start, x.shape[1])], 1)


@pytest.mark.parametrize("prefill", [1, 7, 8, 13])
@pytest.mark.parametrize("compression", ["mlp", "mean"])
@pytest.mark.parametrize("shared_kv", [False, True], ids=["indep_kv", "shared_kv"])
def test_prefill_then_decode_equals_full(prefill, compression, shared_kv):
    m = make_layer(tiny(compression=compression, shared_kv=shared_kv, v_head_dim=8))
    x = torch.randn(2, T_FULL, 64, dtype=torch.float64)
    full = m(x)
    cache = m.new_cache()
    y0 = m(x[:, :prefill], cache=cache)
    assert cache.lengths == [prefill, prefill]
    assert_close("prefill", full[:, :prefill], y0, 1e-12)
    y1 = _decode(m, cache, x, prefill)
    assert_close("decoded", full[:, prefill:], y1, 1e-12)
    assert cache.seq_lens.tolist() == [T_FULL, T_FULL] and cache.capacity == 64


def test_packed_prefill_of_different_lengths_then_decode():
    """Sequences of different lengths, prefilled packed, decoded together == each run alone."""
    m = make_layer(tiny())
    lens, steps = [3, 13, 8, 1], 30
    xs = [torch.randn(1, L + steps, 64, dtype=torch.float64) for L in lens]
    cu = torch.tensor([0] + lens).cumsum(0).to(torch.int32)
    cache = m.new_cache()
    y0 = m(torch.cat([xi[:, :L] for xi, L in zip(xs, lens)], 1), cache=cache, cu_seqlens=cu)
    assert cache.lengths == lens
    ys = [m(torch.cat([xi[:, L + s] for xi, L in zip(xs, lens)], 0).unsqueeze(1), cache=cache)
          for s in range(steps)]
    y1 = torch.cat(ys, 1)  # [N, steps, hidden]
    for n, (xi, L) in enumerate(zip(xs, lens)):
        alone = m(xi)
        assert_close(f"prefill {n}", alone[0, :L], y0[0, int(cu[n]):int(cu[n + 1])], 1e-12)
        assert_close(f"decode {n}", alone[0, L:], y1[n], 1e-12)
    assert cache.lengths == [L + steps for L in lens]


def test_cache_contents():
    """Compressed tokens equal the layer's compression of the whole sequence; the ring holds
    the last kernel_size raw compression keys."""
    cfg = tiny()
    m = make_layer(cfg)
    x = torch.randn(1, 30, 64, dtype=torch.float64)
    cache = m.new_cache()
    m(x[:, :5], cache=cache)
    _decode(m, cache, x, 5)
    pos = torch.arange(30).unsqueeze(0)
    _, branches = m._project(x, pos)
    k_raw, v_raw = branches[0]
    kc, vc = m.compress(k_raw, v_raw)
    Tc = num_compressed(30, cfg.kernel_size, cfg.stride)
    assert_close("k_cmp", kc[0], cache.k_cmp[0, :Tc], 1e-12)
    assert_close("v_cmp", vc[0], cache.v_cmp[0, :Tc], 1e-12)
    assert torch.all(cache.k_cmp[0, Tc:] == 0)
    ks = cfg.kernel_size
    ring = torch.stack([k_raw[0, p] for p in sorted(range(30 - ks, 30), key=lambda p: p % ks)])
    assert_close("k_tail", ring, cache.k_tail[0], 1e-12)
    assert_close("k_slc", branches[1][0][0], cache.k_slc[0, :30], 1e-12)


def test_decode_compresses_only_new_blocks():
    """phi only ever sees the blocks completed by the new tokens, one per crossing sequence."""
    cfg = tiny()
    m = make_layer(cfg)
    lens, steps = [6, 9], 12
    x = torch.randn(2, 9 + steps, 64, dtype=torch.float64)
    cu = torch.tensor([0, 6, 15], dtype=torch.int32)
    cache = m.new_cache()
    m(torch.cat([x[0:1, :6], x[1:2, :9]], 1), cache=cache, cu_seqlens=cu)
    calls = []
    handle = m.compress_k.register_forward_hook(lambda mod, inp, out: calls.append(tuple(inp[0].shape)))
    try:
        for s in range(steps):
            before = len(calls)
            m(torch.stack([x[0, 6 + s], x[1, 9 + s]]).unsqueeze(1), cache=cache)
            crossing = [L for L in cache.lengths if L >= cfg.kernel_size and (L - cfg.kernel_size) % cfg.stride == 0]
            if crossing:
                assert calls[before:] == [(1, len(crossing), cfg.kernel_size, cfg.num_kv_heads, cfg.head_dim)]
            else:
                assert len(calls) == before
    finally:
        handle.remove()
    assert calls, "no compression happened during decoding"


def test_dense_prefill_and_growth():
    m = make_layer(tiny(window_size=5))
    x = torch.randn(3, 70, 64, dtype=torch.float64)
    cache = m.new_cache()
    m(x[:, :10], cache=cache)
    assert cache.capacity == 16 and cache.batch_size == 3
    y = _decode(m, cache, x, 10)
    assert cache.capacity == 128
    assert cache.k_cmp.shape[1] == num_compressed(128, 8, 4)
    assert_close("decoded", m(x)[:, 10:], y, 1e-12)


def test_autocast_decode():
    m = make_layer(tiny(), dtype=torch.float32)
    x = torch.randn(2, 24, 64)
    full = m(x)
    cache = m.new_cache()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = torch.cat([m(x[:, :9], cache=cache), _decode(m, cache, x, 9)], 1)
    assert cache.k_slc.dtype == torch.bfloat16
    assert_close("autocast prefill+decode vs float32 full", full, y.float(), 2e-2)


def test_decode_in_another_dtype_than_the_prefill():
    """A cache filled under autocast (bf16) decodes outside it, and a float32 cache decodes
    after the layer moved to float64: the blocks phi compresses take this step's dtype."""
    m = make_layer(tiny(), dtype=torch.float32)
    x = torch.randn(2, 24, 64)
    full = m(x)
    cache = m.new_cache()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        first = m(x[:, :9], cache=cache)
    y = torch.cat([first.float(), _decode(m, cache, x, 9)], 1)  # crosses compression blocks at 12, 16, 20, 24
    assert_close("autocast prefill, float32 decode vs float32 full", full, y, 2e-2)
    cache = m.new_cache()
    first = m(x[:, :9], cache=cache)
    m.double()
    y = torch.cat([first.double(), _decode(m, cache, x.double(), 9)], 1)
    assert_close("float32 prefill, float64 decode vs float32 full", full.double(), y, 1e-5)


@pytest.mark.parametrize("shared_kv", [False, True], ids=["indep_kv", "shared_kv"])
def test_prefill_under_inference_mode_then_decode_under_no_grad(shared_kv):
    m = make_layer(tiny(shared_kv=shared_kv))
    x = torch.randn(2, 30, 64, dtype=torch.float64)
    full = m(x)
    cache = m.new_cache()
    with torch.inference_mode():
        first = m(x[:, :10], cache=cache)
    with torch.no_grad():
        y = torch.cat([first, _decode(m, cache, x, 10)], 1)
    assert_close("inference-mode prefill, no_grad decode vs full", full, y, 1e-12)
    assert cache.shared == shared_kv and (cache.k_win is cache.k_slc) == shared_kv


def test_compiled_decode_fullgraph():
    """A decoding step traces as one graph (torch.compile, fullgraph) and matches eager."""
    m = make_layer(tiny())
    x = torch.randn(2, 14, 64, dtype=torch.float64)
    compiled = torch.compile(m, backend="aot_eager", fullgraph=True)
    eager_cache, cache = m.new_cache(), m.new_cache()
    with torch.no_grad():
        m(x[:, :9], cache=eager_cache)
        compiled(x[:, :9], cache=cache)
        for t in range(9, 14):  # crosses the compression block completed at 12
            assert_close(f"step {t}", m(x[:, t:t + 1], cache=eager_cache), compiled(x[:, t:t + 1], cache=cache),
                         1e-12)


@pytest.mark.parametrize("change", [dict(num_kv_heads=1), dict(head_dim=8), dict(v_head_dim=8),
                                    dict(shared_kv=True)], ids=lambda c: next(iter(c)))
def test_cache_of_another_layer_shape_is_refused(change):
    m = make_layer(tiny())
    cache = m.new_cache()
    m(torch.randn(2, 10, 64, dtype=torch.float64), cache=cache)
    other = make_layer(tiny(**change))
    with pytest.raises(ValueError, match="cache: filled with"):
        other(torch.randn(2, 1, 64, dtype=torch.float64), cache=cache)


def test_errors():
    m = make_layer(tiny())
    x = torch.randn(2, 10, 64, dtype=torch.float64)
    cache = m.new_cache()
    with pytest.raises(ValueError, match="cache"):
        cache.append(*(torch.zeros(2, 2, 16),) * 4)
    m(x, cache=cache)
    with pytest.raises(ValueError, match="x"):
        m(x[:1, :1], cache=cache)  # wrong number of sequences
    with pytest.raises(ValueError, match="x"):
        m(x[:1, :2], cache=cache)  # a chunk (tests/test_chunked_prefill.py) for too few sequences
    with pytest.raises(ValueError, match="cu_seqlens"):
        m(x[:1, :2], cache=cache, cu_seqlens=torch.tensor([0, 2], dtype=torch.int32))  # one chunk for two sequences
    with pytest.raises(ValueError, match="cache"):
        cache.prefill([10, 10], *(torch.zeros(20, 2, 16),) * 6)
    other = make_layer(NSAConfig.preset("tiny", kernel_size=12, backend="reference"))
    with pytest.raises(ValueError, match="cache"):
        other(x[:, :1], cache=cache)
    with pytest.raises(ValueError, match="kernel_size"):
        NSACache(6, 4)
    with pytest.raises(ValueError, match="stride"):
        NSACache(8, 0)
    with pytest.raises(ValueError, match="k_slc: expected"):
        cache.append(*(torch.zeros(2, 2, 16, dtype=torch.float64),) * 2, torch.zeros(2, 1, 16),
                     *(torch.zeros(2, 2, 16, dtype=torch.float64),) * 3)
    cache.reset()
    with pytest.raises(ValueError, match="x: a prefill"):
        m(x[:, :0], cache=cache)
    assert cache.is_empty and cache.capacity == 0
    m(x[:, :3], cache=cache)  # prefill again after reset
    assert cache.lengths == [3, 3]


@pytest.mark.parametrize("shared_kv", [False, True], ids=["indep_kv", "shared_kv"])
def test_static_steps_equal_dynamic_steps(shared_kv):
    """A static cache (make_static: what a CUDA graph of the step needs) decodes sequences of
    different lengths (compression blocks completed by a subset at most steps) exactly as the
    ordinary cache: same outputs, same cache contents; it allocates once, updates seq_lens in
    place, and refuses a step past its capacity."""
    m = make_layer(tiny(shared_kv=shared_kv))
    lens, steps = [3, 13, 8, 1], 22
    xs = [torch.randn(1, L + steps, 64, dtype=torch.float64) for L in lens]
    cu = torch.tensor([0] + lens).cumsum(0).to(torch.int32)
    prompt = torch.cat([xi[:, :L] for xi, L in zip(xs, lens)], 1)
    caches = [m.new_cache(), m.new_cache()]
    for c in caches:
        m(prompt, cache=c, cu_seqlens=cu)
    static, dynamic = caches
    static.make_static(steps)
    assert static.static and static.capacity == max(lens) + steps and not dynamic.static
    held, seq_lens = static.k_slc, static.seq_lens
    kinds = set()
    for s in range(steps):
        x = torch.cat([xi[:, L + s] for xi, L in zip(xs, lens)], 0).unsqueeze(1)
        compresses = static.next_step_compresses()  # the host's forecast: a graph per kind of step
        assert_close(f"step {s}", m(x, cache=dynamic), m(x, cache=static), 1e-12)
        assert compresses == bool(dynamic.completed) == bool(static.completed), s
        kinds.add(compresses)
    assert kinds == {False, True}
    assert static.k_slc is held and static.seq_lens is seq_lens  # in place: nothing reallocated
    assert static.lengths == dynamic.lengths == [L + steps for L in lens]
    cap_c = static.k_cmp.shape[1]
    for name in ("k_slc", "v_slc", "k_win", "v_win", "k_tail", "v_tail"):
        assert torch.equal(getattr(static, name), getattr(dynamic, name)[:, :static.capacity]), name
    for name in ("k_cmp", "v_cmp"):
        # phi batched over all rows, not only the completing ones: float64 rounding
        assert_close(name, getattr(dynamic, name)[:, :cap_c], getattr(static, name), 1e-14)
    with pytest.raises(ValueError, match="static capacity"):
        m(torch.randn(4, 1, 64, dtype=torch.float64), cache=static)
    with pytest.raises(ValueError, match="chunk cannot be appended to a static cache"):
        m(torch.randn(4, 2, 64, dtype=torch.float64), cache=static)


def test_make_static_rejects_bad_input():
    from nsa.paged_cache import PagedNSACache

    m = make_layer(tiny())
    cache = m.new_cache()
    with pytest.raises(ValueError, match="prefilled"):
        cache.make_static(32)
    m(torch.randn(2, 9, 64, dtype=torch.float64), cache=cache)
    for bad in (-1, 9.0, True):
        with pytest.raises(ValueError, match="new_tokens"):
            cache.make_static(bad)
    with pytest.raises(ValueError, match="prefilled"):
        PagedNSACache.for_layer(m.config, 8).make_static(32)


@pytest.mark.parametrize("shared_kv, static", [(False, True), (True, False)],
                         ids=["indep_kv-static", "shared_kv-dynamic"])
def test_step_rotating_in_the_cache_write_equals_rope_then_append(monkeypatch, shared_kv, static):
    """A step over a dense cache with RoPE on the Triton kernel (interpreter here) rotates the
    query and keys inside the cache write (NSACache.append_rotating, one launch): its outputs and
    every cached tensor equal those of RoPE followed by NSACache.append, for sequences of
    different lengths over steps that complete compression blocks in some sequences; and the
    fused steps equal the uncached forward of the whole sequences."""
    import nsa.layer as layer_mod

    cfg = tiny(shared_kv=shared_kv).replace(backend="triton")
    m = make_layer(cfg, dtype=torch.float32)
    lens, steps = [3, 13, 8], 12
    xs = [torch.randn(1, L + steps, 64) for L in lens]
    cu = torch.tensor([0] + lens).cumsum(0).to(torch.int32)
    prompt = torch.cat([xi[:, :L] for xi, L in zip(xs, lens)], 1)
    caches, outs = {}, {}
    for fused in (True, False):
        monkeypatch.setattr(layer_mod, "FUSED_STEP_WRITE", fused)
        cache = caches[fused] = m.new_cache()
        with torch.no_grad():
            m(prompt, cache=cache, cu_seqlens=cu)
            if static:
                cache.make_static(steps)
            outs[fused] = [m(torch.cat([xi[:, L + s] for xi, L in zip(xs, lens)], 0).unsqueeze(1), cache=cache)
                           for s in range(steps)]
    for s, (a, b) in enumerate(zip(outs[True], outs[False])):
        assert torch.equal(a, b), f"step {s}: max |fused - unfused| {(a - b).abs().max()}"
    for name in ("k_slc", "v_slc", "k_win", "v_win", "k_tail", "v_tail", "k_cmp", "v_cmp", "seq_lens"):
        assert torch.equal(getattr(caches[True], name), getattr(caches[False], name)), name
    with torch.no_grad():
        for n, (xi, L) in enumerate(zip(xs, lens)):
            whole = m(xi)[0, L:]
            assert_close(f"sequence {n}", whole, torch.stack([o[n, 0] for o in outs[True]]), 1e-5)


def test_append_rotating_rejects_a_bad_query():
    """A query of the wrong shape is a ValueError naming q, raised before anything changes (no
    token appended, no page taken), dense and paged; an empty cache says it needs a prefill."""
    from nsa.paged_cache import PagedNSACache

    m = make_layer(tiny(), dtype=torch.float32)
    for cache in (m.new_cache(), PagedNSACache.for_layer(m.config, 16)):
        with pytest.raises(ValueError, match="prefilled"):
            cache.append_rotating(torch.zeros(2, 4, 16), 1e4, *(torch.zeros(2, 1, 16),) * 4)
        m(torch.randn(2, 7, 64), cache=cache)
        H, D = cache.k_slc.shape[2], cache.k_slc.shape[3]
        new = [torch.zeros(2, H, D) for _ in range(6 if cache.k_win is not cache.k_slc else 4)]
        lengths, free = list(cache.lengths), getattr(cache, "num_free_pages", None)
        for bad in (torch.zeros(2, 4, D + 2), torch.zeros(3, 4, D), torch.zeros(2, D)):
            with pytest.raises(ValueError, match="q: expected"):
                cache.append_rotating(bad, 1e4, *new)
        assert cache.lengths == lengths and getattr(cache, "num_free_pages", None) == free
