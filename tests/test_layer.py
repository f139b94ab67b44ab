"""NativeSparseAttention and NSAConfig: config validation, RoPE, compression, causality,
gradients, packed == one-by-one, autocast. Tiny sizes, reference backend."""

import pytest
import torch

from nsa.layer import NativeSparseAttention, NSAConfig, apply_rope
from nsa.ops import api
from tests.helpers import assert_close


def tiny(**kw):
    return NSAConfig.preset("tiny", **{"backend": "reference", **kw})


def make_layer(cfg, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    m = NativeSparseAttention(cfg).to(dtype)
    # Position embeddings start at zero; give them values so that tests see their effect.
    with torch.no_grad():
        for pe in (m.compress_k.pos_emb, m.compress_v.pos_emb):
            pe.normal_(std=0.5)
    return m


# ---- config ---------------------------------------------------------------------------------

def test_presets():
    p = NSAConfig.preset("paper")
    assert (p.hidden_size, p.num_heads, p.num_kv_heads, p.head_dim, p.v_head_dim) == (2560, 64, 4, 192, 128)
    assert (p.kernel_size, p.stride, p.block_size, p.num_selected, p.window_size) == (32, 16, 64, 16, 512)
    s = NSAConfig.preset("small")
    assert (s.hidden_size, s.num_heads, s.num_kv_heads, s.head_dim, s.v_head_dim) == (512, 8, 2, 64, 64)
    t = NSAConfig.preset("tiny", compression="mean")
    assert (t.kernel_size, t.stride, t.block_size, t.num_selected, t.window_size) == (8, 4, 8, 4, 16)
    assert t.compression == "mean"
    with pytest.raises(ValueError, match="name"):
        NSAConfig.preset("huge")


BAD_CONFIGS = [
    (dict(hidden_size=0), "hidden_size"),
    (dict(num_heads=-4), "num_heads"),
    (dict(num_kv_heads=3), "num_heads"),
    (dict(head_dim=15), "head_dim"),
    (dict(head_dim=2.0), "head_dim"),
    (dict(v_head_dim=0), "v_head_dim"),
    (dict(kernel_size=6), "kernel_size"),
    (dict(stride=0), "stride"),
    (dict(block_size=6), "block_size"),
    (dict(num_selected=0), "num_selected"),
    (dict(num_selected=2, num_initial=1, num_local=2), "num_selected"),
    (dict(num_initial=-1), "num_initial"),
    (dict(num_local=True), "num_local"),
    (dict(window_size=0), "window_size"),
    (dict(rope_theta=0.0), "rope_theta"),
    (dict(rope_theta=float("inf")), "rope_theta"),
    (dict(compression="max"), "compression"),
    (dict(shared_kv=1), "shared_kv"),
    (dict(bias="yes"), "bias"),
    (dict(backend="cuda"), "backend"),
]


@pytest.mark.parametrize("overrides,field", BAD_CONFIGS, ids=[f for _, f in BAD_CONFIGS])
def test_bad_config(overrides, field):
    with pytest.raises(ValueError, match=field):
        NSAConfig.preset("tiny", **overrides)


# ---- pieces ---------------------------------------------------------------------------------

def test_config_is_immutable_and_replace_validates():
    cfg = tiny()
    with pytest.raises(AttributeError):  # dataclasses.FrozenInstanceError
        cfg.rope_theta = -1.0
    with pytest.raises(ValueError, match="head_dim"):
        cfg.replace(head_dim=15)
    with pytest.raises(ValueError, match="rope_theta"):
        cfg.replace(rope_theta=-1.0)
    # a v_head_dim left to its default follows head_dim; an explicit one stays
    assert cfg.replace(head_dim=32).v_head_dim == 32
    assert tiny(v_head_dim=8).replace(head_dim=32).v_head_dim == 8
    assert cfg.replace(head_dim=32) == tiny(head_dim=32)


def test_rope_relative():
    """<rope(q, a), rope(k, b)> depends only on a - b, and position 0 is the identity."""
    torch.manual_seed(0)
    q = torch.randn(1, 1, 1, 16, dtype=torch.float64)
    k = torch.randn(1, 1, 1, 16, dtype=torch.float64)
    pos = lambda p: torch.tensor([[p]])  # noqa: E731
    d1 = (apply_rope(q, pos(9), 100.0) * apply_rope(k, pos(4), 100.0)).sum()
    d2 = (apply_rope(q, pos(1005), 100.0) * apply_rope(k, pos(1000), 100.0)).sum()
    assert torch.allclose(d1, d2, atol=1e-10)
    assert torch.equal(apply_rope(q, pos(0), 100.0), q)


@pytest.mark.parametrize("compression", ["mlp", "mean"])
@pytest.mark.parametrize("lens", [[20], [3, 8, 21, 9]], ids=["dense", "packed"])
def test_compress_is_blockwise_phi(compression, lens):
    """compress() == phi on each block [i*stride, i*stride+kernel_size), rotated at its last position."""
    cfg = tiny(compression=compression)
    m = make_layer(cfg)
    H, Dk, Dv, ks, st = cfg.num_kv_heads, cfg.head_dim, cfg.v_head_dim, cfg.kernel_size, cfg.stride
    k = torch.randn(1, sum(lens), H, Dk, dtype=torch.float64)
    v = torch.randn(1, sum(lens), H, Dv, dtype=torch.float64)
    cu = torch.tensor([0] + lens, dtype=torch.int32).cumsum(0).to(torch.int32)
    kc, vc = m.compress(k, v, cu if len(lens) > 1 else None)
    want_k, want_v = [], []
    for n, L in enumerate(lens):
        a = int(cu[n])
        for i in range(0, (L - ks) // st + 1 if L >= ks else 0):
            blk = slice(a + i * st, a + i * st + ks)
            ck = m.compress_k(k[0, blk])  # [H, Dk]
            want_k.append(apply_rope(ck.unsqueeze(0), torch.tensor([i * st + ks - 1]), cfg.rope_theta)[0])
            want_v.append(m.compress_v(v[0, blk]))
    assert kc.shape == (1, len(want_k), H, Dk) and vc.shape == (1, len(want_v), H, Dv)
    if want_k:
        assert_close("k_cmp", torch.stack(want_k).unsqueeze(0), kc, 1e-12)
        assert_close("v_cmp", torch.stack(want_v).unsqueeze(0), vc, 1e-12)


def test_compress_short_sequence():
    """Fewer tokens than kernel_size: no compressed tokens, and the layer still runs."""
    m = make_layer(tiny())
    x = torch.randn(2, 5, 64, dtype=torch.float64)
    k = torch.randn(2, 5, 2, 16, dtype=torch.float64)
    kc, vc = m.compress(k, k)
    assert kc.shape == (2, 0, 2, 16) and vc.shape == (2, 0, 2, 16)
    assert torch.isfinite(m(x)).all()


# ---- the layer ------------------------------------------------------------------------------

@pytest.mark.parametrize("compression", ["mlp", "mean"])
@pytest.mark.parametrize("shared_kv", [False, True], ids=["indep_kv", "shared_kv"])
def test_causal(compression, shared_kv):
    """Changing x after position t never changes the outputs up to t."""
    m = make_layer(tiny(compression=compression, shared_kv=shared_kv))
    T = 37
    x = torch.randn(2, T, 64, dtype=torch.float64)
    y = m(x)
    for t in (0, 7, 8, 16, 30):
        x2 = x.clone()
        x2[:, t + 1:] += torch.randn_like(x2[:, t + 1:])
        y2 = m(x2)
        assert torch.equal(y[:, :t + 1], y2[:, :t + 1]), f"output up to {t} changed"
        assert not torch.equal(y[:, t + 1:], y2[:, t + 1:])


@pytest.mark.parametrize("compression", ["mlp", "mean"])
@pytest.mark.parametrize("shared_kv", [False, True], ids=["indep_kv", "shared_kv"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_gradients_reach_every_parameter(compression, shared_kv, bias):
    m = make_layer(tiny(compression=compression, shared_kv=shared_kv, bias=bias), dtype=torch.float32)
    x = torch.randn(2, 29, 64)
    m(x).square().mean().backward()
    names = [n for n, _ in m.named_parameters()]
    assert any("compress_k.pos_emb" in n for n in names) and any("g_proj" in n for n in names)
    if compression == "mlp":
        assert any("compress_v.mlp" in n for n in names)
    for n, p in m.named_parameters():
        assert p.grad is not None, f"{n}: no gradient"
        assert torch.isfinite(p.grad).all(), f"{n}: non-finite gradient"
        assert p.grad.abs().sum() > 0, f"{n}: zero gradient"
    kv = m.kv_proj.weight.grad.view(m.num_kv_branches, -1, 64)
    for b in range(m.num_kv_branches):
        assert kv[b].abs().sum() > 0, f"kv_proj branch {b}: zero gradient"


def test_parameter_count_shared_kv():
    a = NativeSparseAttention(tiny())
    b = NativeSparseAttention(tiny(shared_kv=True))
    H, Dk, Dv, hid = 2, 16, 16, 64
    assert a.kv_proj.weight.shape == (3 * H * (Dk + Dv), hid)
    assert b.kv_proj.weight.shape == (2 * H * (Dk + Dv), hid)


@pytest.mark.parametrize("shared_kv", [False, True], ids=["indep_kv", "shared_kv"])
def test_packed_equals_one_by_one(shared_kv):
    m = make_layer(tiny(shared_kv=shared_kv, v_head_dim=8))
    lens = [5, 23, 1, 40]
    xs = [torch.randn(1, L, 64, dtype=torch.float64) for L in lens]
    cu = torch.tensor([0] + lens).cumsum(0).to(torch.int32)
    x = torch.cat(xs, 1).requires_grad_()
    y = m(x, cu_seqlens=cu)
    y.square().sum().backward()
    g_packed = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    ys = [m(xi) for xi in xs]
    sum(yi.square().sum() for yi in ys).backward()
    assert_close("y", torch.cat(ys, 1), y, 1e-12)
    for n, p in m.named_parameters():
        assert_close(f"grad {n}", p.grad, g_packed[n], 1e-10)


def test_dense_batch_equals_single():
    m = make_layer(tiny())
    x = torch.randn(3, 26, 64, dtype=torch.float64)
    y = m(x)
    for b in range(3):
        assert_close(f"row {b}", m(x[b:b + 1]), y[b:b + 1], 1e-12)


@pytest.mark.parametrize("compression", ["mlp", "mean"])
def test_autocast_bf16_close_to_float32(compression):
    m = make_layer(tiny(compression=compression), dtype=torch.float32)
    x = torch.randn(2, 24, 64)
    y32 = m(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y16 = m(x)
        y16.float().square().mean().backward()
    assert y16.dtype == torch.bfloat16
    assert_close("autocast bf16 vs float32", y32, y16.float(), 2e-2)
    for n, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n


def test_bad_inputs():
    m = make_layer(tiny())
    with pytest.raises(ValueError, match="x"):
        m(torch.randn(2, 8, 32, dtype=torch.float64))
    with pytest.raises(ValueError, match="x"):
        m(torch.randn(8, 64, dtype=torch.float64))
    with pytest.raises(ValueError, match="x"):  # packed input needs batch size 1
        m(torch.randn(2, 8, 64, dtype=torch.float64), cu_seqlens=torch.tensor([0, 8], dtype=torch.int32))
    with pytest.raises(ValueError, match="cu_seqlens"):
        m(torch.randn(1, 8, 64, dtype=torch.float64), cu_seqlens=torch.tensor([0, 3, 7], dtype=torch.int32))
    with pytest.raises(ValueError, match="cache"):
        m(torch.randn(1, 8, 64, dtype=torch.float64), cache=[])
    with pytest.raises(ValueError, match="config"):
        NativeSparseAttention({"hidden_size": 64})
    with pytest.raises(ValueError, match="x: expected a floating-point"):
        m(torch.ones(2, 8, 64, dtype=torch.long))
    with pytest.raises(ValueError, match="x: expected dtype torch.float64"):  # float64 layer
        m(torch.randn(2, 8, 64))
    with pytest.raises(ValueError, match="x: expected device"):
        m(torch.randn(2, 8, 64, dtype=torch.float64, device="meta"))


def _has_all_kernels():
    return all(api._triton_impl(op) is not None for op in api._TRITON_IMPLS)


@pytest.mark.skipif(not _has_all_kernels(), reason="not every Triton kernel exists yet")
def test_triton_backend_matches_reference():
    """The layer on the Triton kernels (interpreter on CPU) == the layer on the reference."""
    cfg = tiny()
    m = make_layer(cfg, dtype=torch.float32)
    lens = [9, 21]
    x = torch.randn(1, sum(lens), 64, requires_grad=True)
    cu = torch.tensor([0] + lens).cumsum(0).to(torch.int32)
    y_ref = m(x, cu_seqlens=cu)
    g_ref = torch.autograd.grad(y_ref.square().sum(), [x] + list(m.parameters()))
    m.config = cfg.replace(backend="triton")
    y = m(x, cu_seqlens=cu)
    g = torch.autograd.grad(y.square().sum(), [x] + list(m.parameters()))
    assert_close("y", y_ref, y, 1e-5)
    for (n, _), a, b in zip([("x", None)] + list(m.named_parameters()), g_ref, g):
        assert_close(f"grad {n}", a, b, 1e-4)
