"""nsa_decode (one query per sequence over a padded cache) == the last row of nsa.ops.nsa."""

import pytest
import torch

from nsa.ops import nsa
from nsa.ops.decode import nsa_decode
from nsa.ops.utils import num_compressed
from tests.helpers import assert_close

# (id, HQ, H, Dk, Dv, lens, dict of NSA settings)
CASES = [
    ("G2_mixed_lens", 4, 2, 16, 16, [1, 7, 8, 9, 33, 40], dict(kernel_size=8, stride=4, block_size=8,
                                                              num_selected=4, window_size=16)),
    ("G1_DkDv", 3, 3, 16, 8, [12, 31, 50], dict(kernel_size=8, stride=4, block_size=16, num_selected=3,
                                                window_size=5)),
    ("G3", 6, 2, 8, 12, [17, 64], dict(kernel_size=8, stride=4, block_size=8, num_selected=5, window_size=9)),
    ("MQA_G4_stride_eq_kernel", 4, 1, 8, 8, [15, 16, 47], dict(kernel_size=8, stride=8, block_size=8,
                                                               num_selected=3, num_initial=0, num_local=1,
                                                               window_size=3)),
    ("no_forced_blocks", 2, 1, 8, 8, [40, 55], dict(kernel_size=4, stride=2, block_size=4, num_selected=2,
                                                    num_initial=0, num_local=0, window_size=1)),
    ("all_short_no_cmp", 4, 2, 8, 8, [1, 3, 7], dict(kernel_size=8, stride=4, block_size=8, num_selected=4,
                                                     window_size=4)),
]


def _build(HQ, H, Dk, Dv, lens, cfg, dtype, extra_cap=5, win_extra=3, seed=0):
    """Per-sequence inputs and the same data in the padded decode layout (padding = large finite junk)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)  # noqa: E731
    ks, st = cfg["kernel_size"], cfg["stride"]
    N, cap, wcap = len(lens), max(lens) + extra_cap, max(lens) + win_extra
    ccap = num_compressed(cap, ks, st)
    junk = lambda *s: (100 * r(*s)).to(dtype)  # noqa: E731
    pad = dict(q=r(N, HQ, Dk), k_cmp=junk(N, ccap, H, Dk), v_cmp=junk(N, ccap, H, Dv), k_slc=junk(N, cap, H, Dk),
               v_slc=junk(N, cap, H, Dv), k_win=junk(N, wcap, H, Dk), v_win=junk(N, wcap, H, Dv),
               g_cmp=torch.rand(N, HQ, generator=g).to(dtype), g_slc=torch.rand(N, HQ, generator=g).to(dtype),
               g_win=torch.rand(N, HQ, generator=g).to(dtype))
    seqs = []
    for n, L in enumerate(lens):
        Tc = num_compressed(L, ks, st)
        s = dict(q=r(1, L, HQ, Dk), k_cmp=r(1, Tc, H, Dk), v_cmp=r(1, Tc, H, Dv), k_slc=r(1, L, H, Dk),
                 v_slc=r(1, L, H, Dv), k_win=r(1, L, H, Dk), v_win=r(1, L, H, Dv),
                 g_cmp=torch.rand(1, L, HQ, generator=g).to(dtype), g_slc=torch.rand(1, L, HQ, generator=g).to(dtype),
                 g_win=torch.rand(1, L, HQ, generator=g).to(dtype))
        for name in ("q", "g_cmp", "g_slc", "g_win"):
            pad[name][n] = s[name][0, -1]
        for name in ("k_cmp", "v_cmp"):
            pad[name][n, :Tc] = s[name][0]
        for name in ("k_slc", "v_slc", "k_win", "v_win"):
            pad[name][n, :L] = s[name][0]
        seqs.append(s)
    return pad, seqs, torch.tensor(lens, dtype=torch.int32)


ORDER = ("q", "k_cmp", "v_cmp", "k_slc", "v_slc", "k_win", "v_win", "g_cmp", "g_slc", "g_win")


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5), (torch.bfloat16, 1e-2)],
                         ids=["f64", "f32", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_decode_matches_last_row(case, dtype, tol):
    _, HQ, H, Dk, Dv, lens, cfg = case
    pad, seqs, seq_lens = _build(HQ, H, Dk, Dv, lens, cfg, dtype)
    o, idx = nsa_decode(*(pad[k] for k in ORDER), seq_lens, return_block_indices=True, backend="reference", **cfg)
    assert o.shape == (len(lens), HQ, Dv) and o.dtype == dtype
    assert idx.shape == (len(lens), H, cfg["num_selected"]) and idx.dtype == torch.int32
    for n, s in enumerate(seqs):
        o_ref, idx_ref = nsa(*(s[k] for k in ORDER), return_block_indices=True, backend="reference", **cfg)
        assert_close(f"o[{n}]", o_ref[0, -1], o[n], tol)
        if dtype == torch.float64:
            assert torch.equal(idx_ref[0, -1], idx[n]), f"sequence {n}: selected blocks differ"


@pytest.mark.parametrize("case", CASES[:3], ids=[c[0] for c in CASES[:3]])
def test_decode_gradients_match(case):
    """Autograd through the decode reference gives the gradients of the last row of nsa."""
    _, HQ, H, Dk, Dv, lens, cfg = case
    pad, seqs, seq_lens = _build(HQ, H, Dk, Dv, lens, cfg, torch.float64)
    for t in pad.values():
        t.requires_grad_()
    w = torch.randn(len(lens), HQ, Dv, dtype=torch.float64)
    (nsa_decode(*(pad[k] for k in ORDER), seq_lens, backend="reference", **cfg) * w).sum().backward()
    for n, (s, L) in enumerate(zip(seqs, lens)):
        for t in s.values():
            t.requires_grad_()
        (nsa(*(s[k] for k in ORDER), backend="reference", **cfg)[0, -1] * w[n]).sum().backward()
        Tc = s["k_cmp"].shape[1]
        for name in ORDER:
            got = pad[name].grad[n]
            want = s[name].grad[0]
            if name in ("q", "g_cmp", "g_slc", "g_win"):
                want = want[-1]
            else:
                valid = Tc if name in ("k_cmp", "v_cmp") else L
                assert torch.all(got[valid:] == 0), f"{name}[{n}]: gradient in the padding"
                got = got[:valid]
            assert_close(f"d{name}[{n}]", want, got, 1e-10)


def test_shared_slc_win_and_empty_cmp_capacity():
    """k_win may be the k_slc tensor itself; Tc_cap = 0 works when no sequence has compressed tokens."""
    cfg = dict(kernel_size=8, stride=4, block_size=8, num_selected=4, window_size=4)
    pad, seqs, seq_lens = _build(4, 2, 8, 8, [2, 5, 7], cfg, torch.float64, extra_cap=0)
    pad["k_cmp"], pad["v_cmp"] = pad["k_cmp"][:, :0], pad["v_cmp"][:, :0]
    assert pad["k_cmp"].shape[1] == 0
    for s in seqs:
        s["k_win"], s["v_win"] = s["k_slc"], s["v_slc"]
    pad["k_win"], pad["v_win"] = pad["k_slc"], pad["v_slc"]
    o = nsa_decode(*(pad[k] for k in ORDER), seq_lens, backend="reference", **cfg)
    for n, s in enumerate(seqs):
        assert_close(f"o[{n}]", nsa(*(s[k] for k in ORDER), backend="reference", **cfg)[0, -1], o[n], 1e-12)


def test_backends(monkeypatch):
    cfg = dict(kernel_size=8, stride=4, block_size=8, num_selected=4, window_size=16)
    pad, _, seq_lens = _build(4, 2, 8, 8, [9, 20], cfg, torch.float32)
    args = [pad[k] for k in ORDER] + [seq_lens]
    ref = nsa_decode(*args, backend="reference", **cfg)
    auto = nsa_decode(*args, backend="auto", **cfg)  # CPU tensors: the torch backend
    assert torch.equal(nsa_decode(*args, backend="torch", **cfg), auto)
    assert_close("auto", ref, auto, 1e-5)
    monkeypatch.setenv("NSA_BACKEND", "reference")
    assert torch.equal(ref, nsa_decode(*args, **cfg))
    if not torch.cuda.is_available():
        # 'triton' runs the kernels on CPU tensors only under the interpreter
        out = nsa_decode(*args, backend="triton", **cfg)
        assert_close("triton", ref, out, 1e-5)
        assert not out.requires_grad
        monkeypatch.setenv("NSA_BACKEND", "triton")
        assert torch.equal(out, nsa_decode(*args, **cfg))
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(ValueError, match="backend.*TRITON_INTERPRET"):
            nsa_decode(*args, **cfg)
    with pytest.raises(ValueError, match="backend"):
        nsa_decode(*args, backend="cuda", **cfg)


# (id, mutation of the argument dict, argument the error must name)
BAD = [
    ("q_2d", lambda a: a.update(q=a["q"][0]), "q"),
    ("q_int", lambda a: a.update(q=a["q"].long()), "q"),
    ("q_heads", lambda a: a.update(q=a["q"][:, :3]), "q"),
    ("k_cmp_dtype", lambda a: a.update(k_cmp=a["k_cmp"].double()), "k_cmp"),
    ("k_cmp_dk", lambda a: a.update(k_cmp=a["k_cmp"][..., :4]), "k_cmp"),
    ("v_cmp_len", lambda a: a.update(v_cmp=a["v_cmp"][:, :1]), "v_cmp"),
    ("k_cmp_too_small", lambda a: a.update(k_cmp=a["k_cmp"][:, :2], v_cmp=a["v_cmp"][:, :2]), "k_cmp"),
    ("k_slc_batch", lambda a: a.update(k_slc=a["k_slc"][:1]), "k_slc"),
    ("v_slc_heads", lambda a: a.update(v_slc=a["v_slc"][:, :, :1]), "v_slc"),
    ("k_win_3d", lambda a: a.update(k_win=a["k_win"][0]), "k_win"),
    ("v_win_dv", lambda a: a.update(v_win=a["v_win"][..., :3]), "v_win"),
    ("g_cmp_shape", lambda a: a.update(g_cmp=a["g_cmp"][:, :2]), "g_cmp"),
    ("g_win_3d", lambda a: a.update(g_win=a["g_win"].unsqueeze(1)), "g_win"),
    ("seq_lens_int64", lambda a: a.update(seq_lens=a["seq_lens"].long()), "seq_lens"),
    ("seq_lens_count", lambda a: a.update(seq_lens=a["seq_lens"][:1]), "seq_lens"),
    ("seq_lens_zero", lambda a: a.update(seq_lens=torch.tensor([0, 5], dtype=torch.int32)), "seq_lens"),
    ("seq_lens_over_cap", lambda a: a.update(seq_lens=torch.tensor([9, 99], dtype=torch.int32)), "seq_lens"),
    ("kernel_size", lambda a: a.update(kernel_size=6), "kernel_size"),
    ("block_size", lambda a: a.update(block_size=6), "block_size"),
    ("num_selected", lambda a: a.update(num_selected=2, num_local=2), "num_selected"),
    ("window_size", lambda a: a.update(window_size=0), "window_size"),
    ("scale", lambda a: a.update(scale=-1.0), "scale"),
]


# the cases only a read of seq_lens's values can catch: checked under NSA_DEBUG_CHECKS=1 or check_values=True
VALUE_CASES = ("k_cmp_too_small", "seq_lens_zero", "seq_lens_over_cap")


def _bad_args(mutate):
    cfg = dict(kernel_size=8, stride=4, block_size=8, num_selected=4, window_size=16)
    pad, _, seq_lens = _build(4, 2, 8, 8, [9, 20], cfg, torch.float32)
    a = dict(pad, seq_lens=seq_lens, **cfg)
    mutate(a)
    return [a.pop(k) for k in ORDER] + [a.pop("seq_lens")], a


@pytest.mark.parametrize("mutate,name", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_inputs(mutate, name, monkeypatch):
    """Every bad input is a ValueError naming the argument (value checks on: NSA_DEBUG_CHECKS=1)."""
    monkeypatch.setenv("NSA_DEBUG_CHECKS", "1")
    args, a = _bad_args(mutate)
    with pytest.raises(ValueError, match=name):
        nsa_decode(*args, backend="reference", **a)


@pytest.mark.parametrize("case", VALUE_CASES)
def test_value_checks_flag(case, monkeypatch):
    """The seq_lens value checks run with check_values=True (whatever the environment), or with
    NSA_DEBUG_CHECKS=1 when check_values is None; by default (and with check_values=False under
    NSA_DEBUG_CHECKS=1) seq_lens is never read on the host. A bad check_values is refused."""
    mutate, name = next(b[1:] for b in BAD if b[0] == case)
    args, a = _bad_args(mutate)
    monkeypatch.delenv("NSA_DEBUG_CHECKS", raising=False)
    with pytest.raises(ValueError, match=name):
        nsa_decode(*args, backend="reference", check_values=True, **a)
    monkeypatch.setenv("NSA_DEBUG_CHECKS", "1")
    with pytest.raises(ValueError, match=name):
        nsa_decode(*args, backend="reference", **a)
    seq_lens = args[-1]
    calls = []
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: calls.append(self) or [])
    for flag, env in ((False, "1"), (None, "0")):
        monkeypatch.setenv("NSA_DEBUG_CHECKS", env)
        # unchecked: the step runs on whatever seq_lens holds (in range here, so it can run)
        ok = seq_lens.clamp(1, min(args[3].shape[1], args[5].shape[1], 16))
        nsa_decode(*args[:-1], ok, backend="torch", check_values=flag, **a)
    assert not calls
    with pytest.raises(ValueError, match="check_values"):
        nsa_decode(*args, backend="reference", check_values=1, **a)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_reference_ignores_cache_padding(bad):
    """Rows past a sequence's length are never attended: NaN or inf there changes nothing."""
    _, HQ, H, Dk, Dv, lens, cfg = CASES[0]
    pad, _, seq_lens = _build(HQ, H, Dk, Dv, lens, cfg, torch.float64)
    o, idx = nsa_decode(*(pad[k] for k in ORDER), seq_lens, return_block_indices=True, backend="reference", **cfg)
    poisoned = dict(pad)
    for name in ("k_cmp", "v_cmp", "k_slc", "v_slc", "k_win", "v_win"):
        t = pad[name].clone()
        for n, L in enumerate(lens):
            valid = num_compressed(L, cfg["kernel_size"], cfg["stride"]) if name.endswith("cmp") else L
            t[n, valid:] = bad
        poisoned[name] = t
    o2, idx2 = nsa_decode(*(poisoned[k] for k in ORDER), seq_lens, return_block_indices=True, backend="reference",
                          **cfg)
    assert torch.isfinite(o2).all()
    assert torch.equal(idx, idx2)
    assert_close("o", o, o2, 1e-12)
