"""nsa.model: the three attention kinds, packing, the loss, cached generation, persistence, bad input."""

import json

import pytest
import torch
import torch.nn.functional as F

from nsa import model as model_mod
from nsa.model import LanguageModel, ModelConfig
from tests.helpers import assert_close as _assert_close

KINDS = ["nsa", "full", "window"]


def assert_close(out, ref, ratio, name="value"):
    _assert_close(name, ref, out, ratio)


def tiny(kind, **kw):
    # Smaller than the 'tiny' preset so that float64 tests stay fast; NSA's branches all active
    # at T >= 16 (compression 8/4, blocks of 8, 3 selected, window 12).
    base = dict(vocab_size=61, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                intermediate_size=48, max_seq_len=128, kernel_size=8, stride=4, block_size=8, num_selected=3,
                num_local=1, window_size=12, backend="reference")
    return ModelConfig(**{**base, "attention": kind, **kw})


def build(kind, dtype=torch.float64, seed=0, scaled=True, **kw):
    """A tiny model; ``scaled`` redraws its matrices at twice the variance-preserving scale and
    its intra-block position embeddings non-zero: at the GPT initialisation (std 0.02) the
    residual stream is little more than the input embedding, greedy decoding repeats the last
    token whatever attention does, and comparisons of attention paths would prove little."""
    torch.manual_seed(seed)
    m = LanguageModel(tiny(kind, **kw))
    if scaled:
        with torch.no_grad():
            for name, p in m.named_parameters():
                if p.dim() == 2 and not name.startswith(("embed", "lm_head")):
                    p.normal_(0, 2 / p.shape[1] ** 0.5)
                elif name.endswith("pos_emb"):
                    p.normal_(0, 0.5)
    return m.to(dtype)


def ids_of(shape, vocab=61, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, shape, generator=g)


@pytest.mark.parametrize("kind", KINDS)
def test_forward_backward_every_parameter(kind):
    m = build(kind, torch.float32, scaled=False)
    ids = ids_of((2, 37))
    out = m(ids, labels=ids)
    assert out.logits is None and out.loss.dtype == torch.float32 and out.loss.dim() == 0
    # At initialisation the loss is close to uniform over the vocabulary.
    assert abs(out.loss.item() - torch.log(torch.tensor(61.0)).item()) < 0.2
    out.loss.backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        if not name.endswith("pos_emb"):  # zero-initialised: their gradient may vanish at init
            assert p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("kind", KINDS)
def test_loss_is_next_token_cross_entropy(kind, monkeypatch):
    m = build(kind)
    ids = ids_of((2, 29))
    labels = ids.clone()
    labels[0, 5] = -100
    logits = m(ids).logits
    want = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
    got = m(ids, labels=labels, return_logits=True)
    assert_close(got.loss, want, 1e-12)
    assert torch.equal(got.logits, logits)
    # The chunked path (a chunk of 7 rows) gives the same loss and gradients as one chunk.
    m.zero_grad()
    m(ids, labels=labels).loss.backward()
    g_one = {n: p.grad.clone() for n, p in m.named_parameters()}
    monkeypatch.setattr(model_mod, "LOSS_CHUNK_LOGITS", 7 * 61)
    m.zero_grad()
    loss = m(ids, labels=labels).loss
    assert_close(loss, want, 1e-12)
    loss.backward()
    for n, p in m.named_parameters():
        assert_close(p.grad, g_one[n], 1e-10, name=n)


@pytest.mark.parametrize("kind", KINDS)
def test_packed_equals_one_by_one(kind):
    m = build(kind)
    lens = [19, 1, 33, 8]
    ids = ids_of((1, sum(lens)))
    cu = torch.tensor([0] + lens).cumsum(0).to(torch.int32)
    packed = m(ids, cu_seqlens=cu, labels=ids, return_logits=True)
    packed.loss.backward()
    g_packed = {n: p.grad.clone() for n, p in m.named_parameters()}
    parts, loss_sum, count = [], 0.0, 0
    m.zero_grad()
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        seg = ids[:, a:b]
        parts.append(m(seg).logits)
        if b - a > 1:
            loss_sum = loss_sum + m(seg, labels=seg).loss * (b - a - 1)
            count += b - a - 1
    loss = loss_sum / count
    loss.backward()
    assert_close(packed.logits, torch.cat(parts, 1), 1e-12)
    assert_close(packed.loss, loss, 1e-12)
    for n, p in m.named_parameters():
        assert_close(g_packed[n], p.grad, 1e-10, name=n)


@pytest.mark.parametrize("kind", KINDS)
def test_batch_rows_are_independent(kind):
    m = build(kind)
    ids = ids_of((3, 26))
    full = m(ids).logits
    for b in range(3):
        assert_close(full[b:b + 1], m(ids[b:b + 1]).logits, 1e-12)


def greedy_without_cache(m, prompt, n):
    seq = prompt.clone()
    for _ in range(n):
        nxt = m(seq.unsqueeze(0)).logits[0, -1].argmax()
        seq = torch.cat([seq, nxt.view(1)])
    return seq[prompt.numel():]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("kind", KINDS)
def test_cached_greedy_equals_uncached(kind, dtype):
    m = build(kind, dtype)
    # Prompts of different lengths (one shorter than a compression block, one spanning several
    # selection blocks), generated past the window and across compression boundaries.
    prompts = [ids_of((5,), seed=2), ids_of((19,), seed=3), ids_of((1,), seed=4)]
    out = m.generate(prompts, 18, temperature=0)
    for p, o in zip(prompts, out):
        assert o.shape == (18,)
        assert torch.equal(o, greedy_without_cache(m, p, 18))
        # The continuation is not a repeat of one token: attention shapes it.
        assert len(set(o.tolist())) > 3, o


@pytest.mark.parametrize("kind", KINDS)
def test_cached_step_logits_equal_forward(kind):
    m = build(kind)
    ids = ids_of((2, 40))
    cache = m.new_cache()
    m(ids[:, :17], cache=cache)
    steps = [m(ids[:, t:t + 1], cache=cache).logits for t in range(17, 40)]
    assert cache.lengths == [40, 40]
    assert_close(torch.cat(steps, 1), m(ids).logits[:, 17:], 1e-10)


def test_generate_stream_eos_and_sampling():
    m = build("nsa")
    prompts = torch.stack([ids_of((9,), seed=5), ids_of((9,), seed=6)])
    seen = []
    greedy = m.generate(prompts, 12, temperature=0, callback=seen.append)
    assert len(seen) == 12 and all(s.shape == (2,) for s in seen)
    assert torch.equal(torch.stack(seen, 1), torch.stack(greedy))
    # top_k=1 and a tiny top_p are greedy whatever the temperature.
    g = torch.Generator().manual_seed(0)
    assert all(torch.equal(a, b) for a, b in zip(m.generate(prompts, 12, temperature=2.0, top_k=1, generator=g),
                                                 greedy))
    assert all(torch.equal(a, b) for a, b in zip(m.generate(prompts, 12, temperature=2.0, top_p=1e-9, generator=g),
                                                 greedy))
    # Sampling is reproducible with a seeded generator.
    s1 = m.generate(prompts, 12, temperature=1.0, top_p=0.9, generator=torch.Generator().manual_seed(3))
    s2 = m.generate(prompts, 12, temperature=1.0, top_p=0.9, generator=torch.Generator().manual_seed(3))
    assert all(torch.equal(a, b) for a, b in zip(s1, s2))
    # eos: a sequence stops after producing it (included), the other goes on.
    eos = int(greedy[0][3])
    out = m.generate(prompts, 12, temperature=0, eos_token_id=eos)
    for o, full in zip(out, greedy):
        hits = (full == eos).nonzero()
        stop = int(hits[0]) + 1 if hits.numel() else 12
        assert torch.equal(o, full[:stop])
    assert m.generate(prompts, 0) == [] or all(o.numel() == 0 for o in m.generate(prompts, 0))


def test_sampling_filters():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    g = torch.Generator().manual_seed(0)
    draws = {int(model_mod._sample(logits, 1.0, 2, None, g)) for _ in range(200)}
    assert draws == {2, 3}
    # p(3) = 0.64, p(2) = 0.24: top_p 0.7 keeps exactly {3, 2}.
    draws = {int(model_mod._sample(logits, 1.0, None, 0.7, g)) for _ in range(200)}
    assert draws == {2, 3}


@pytest.mark.parametrize("kind", KINDS)
def test_save_load_round_trip(kind, tmp_path):
    m = build(kind, torch.float32, tie_embeddings=kind != "full")
    m.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["attention"] == kind
    m2 = LanguageModel.from_pretrained(tmp_path)
    assert m2.config == m.config
    sd1, sd2 = m.state_dict(), m2.state_dict()
    assert sd1.keys() == sd2.keys() and all(torch.equal(sd1[k], sd2[k]) for k in sd1)
    if m.config.tie_embeddings:
        assert m2.lm_head.weight is m2.embed.weight
    ids = ids_of((1, 20))
    assert torch.equal(m(ids).logits, m2(ids).logits)


def test_load_of_another_shape_is_refused(tmp_path):
    build("nsa", torch.float32).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["hidden_size"] = 40
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="do not fit"):
        LanguageModel.from_pretrained(tmp_path)
    cfg["bogus"] = 1
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unknown keys.*bogus"):
        LanguageModel.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="config.json"):
        LanguageModel.from_pretrained(tmp_path / "nowhere")


def test_presets_and_config_validation():
    assert ModelConfig.preset("tiny").attention == "nsa"
    with torch.device("meta"):
        for name, lo, hi in [("small", 20e6, 30e6), ("base", 110e6, 140e6), ("1b", 0.9e9, 1.2e9)]:
            assert lo < LanguageModel(ModelConfig.preset(name)).num_parameters() < hi, name
    bad = [dict(attention="sparse"), dict(num_heads=3), dict(head_dim=7), dict(stride=5), dict(block_size=10),
           dict(num_selected=1), dict(vocab_size=0), dict(rope_theta=-1.0), dict(tie_embeddings=1)]
    names = ["attention", "num_heads", "head_dim", "kernel_size", "block_size", "num_selected", "vocab_size",
             "rope_theta", "tie_embeddings"]
    for kw, name in zip(bad, names):
        with pytest.raises(ValueError, match=name):
            tiny("nsa", **kw)
    with pytest.raises(ValueError, match="preset"):
        ModelConfig.preset("huge")
    with pytest.raises(ValueError, match="config"):
        LanguageModel({"hidden_size": 8})


def test_bad_inputs():
    m = build("nsa", torch.float32)
    with pytest.raises(ValueError, match="input_ids"):
        m(torch.randn(1, 4))
    with pytest.raises(ValueError, match="input_ids"):
        m(torch.tensor([[0, 61]]))
    with pytest.raises(ValueError, match="input_ids"):
        m(torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="labels"):
        m(ids_of((1, 8)), labels=ids_of((1, 7)))
    with pytest.raises(ValueError, match="batch size 1"):
        m(ids_of((2, 8)), cu_seqlens=torch.tensor([0, 8], dtype=torch.int32))
    with pytest.raises(ValueError, match="cu_seqlens"):
        m(ids_of((1, 8)), cu_seqlens=torch.tensor([0, 9], dtype=torch.int32))
    with pytest.raises(ValueError, match="cache"):
        m(ids_of((1, 8)), cache=[])
    for kw, name in [(dict(max_new_tokens=-1), "max_new_tokens"), (dict(temperature=-0.5), "temperature"),
                     (dict(top_k=0), "top_k"), (dict(top_p=1.5), "top_p"), (dict(eos_token_id=61), "eos_token_id")]:
        args = dict(max_new_tokens=2)
        args.update(kw)
        with pytest.raises(ValueError, match=name):
            m.generate([[1, 2]], **args)
    for prompts in ([], [[]], [[1, 99]], torch.zeros(2, 0, dtype=torch.long), "abc"):
        with pytest.raises(ValueError, match="prompts"):
            m.generate(prompts, 2)


def test_nsa_model_on_the_kernels_matches_the_reference():
    """The whole model on the Triton backend (interpreter on CPU) against the reference backend:
    logits, loss and every gradient, packed documents included."""
    torch.manual_seed(0)
    ref = LanguageModel(tiny("nsa", num_layers=1)).float()
    tri = LanguageModel(tiny("nsa", num_layers=1, backend="triton")).float()
    tri.load_state_dict(ref.state_dict())
    lens = [21, 11]
    ids = ids_of((1, sum(lens)))
    cu = torch.tensor([0] + lens).cumsum(0).to(torch.int32)
    outs = []
    for m in (ref, tri):
        o = m(ids, cu_seqlens=cu, labels=ids, return_logits=True)
        o.loss.backward()
        outs.append((o, {n: p.grad for n, p in m.named_parameters()}))
    (o_r, g_r), (o_t, g_t) = outs
    assert_close(o_t.logits, o_r.logits, 1e-4)
    assert_close(o_t.loss, o_r.loss, 1e-5)
    for n in g_r:
        assert_close(g_t[n], g_r[n], 1e-3, name=n)


def test_vocab_limit():
    m = build("full", torch.float32)
    out = m.generate([[1, 2, 3]], 40, temperature=5.0, vocab_limit=7, generator=torch.Generator().manual_seed(0))
    assert int(out[0].max()) < 7 and len(set(out[0].tolist())) > 1
    for bad in (0, 62, True, 2.5):
        with pytest.raises(ValueError, match="vocab_limit"):
            m.generate([[1]], 1, vocab_limit=bad)


@pytest.mark.parametrize("kind", ["nsa", "full"])
def test_activation_checkpointing_same_gradients(kind):
    m = build(kind)
    ids = ids_of((1, 30))
    cu = torch.tensor([0, 12, 30], dtype=torch.int32)
    grads = []
    for on in (False, True):
        m.activation_checkpointing = on
        m.train()
        m.zero_grad()
        m(ids, cu_seqlens=cu, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters()})
    for n in grads[0]:
        assert torch.equal(grads[0][n], grads[1][n]), n


def test_generate_cuda_graph_needs_a_cuda_model():
    m = build("nsa")
    for bad in (True, 1, "yes"):
        with pytest.raises(ValueError, match="cuda_graph"):
            m.generate([ids_of((5,))], 3, cuda_graph=bad)
    assert m.generate([ids_of((5,))], 3, temperature=0, cuda_graph=False)[0].shape == (3,)


@pytest.mark.parametrize("kind", KINDS)
def test_chunk_steps_equal_forward(kind):
    """Several new tokens per sequence at once (speculative-decoding verification, multi-token
    prediction, chunked prefill) into a filled cache: the logits of one forward of the whole
    sequences, causal inside each chunk; then single steps and a packed call with chunks of
    different lengths (0: the sequence waits) go on from there."""
    m = build(kind)
    ids = ids_of((2, 44))
    whole = m(ids).logits
    cache = m.new_cache()
    outs, t = [m(ids[:, :9], cache=cache).logits], 9
    for k in (1, 3, 8, 2, 1, 5):
        outs.append(m(ids[:, t:t + k], cache=cache).logits)
        t += k
    assert cache.lengths == [t, t]
    assert_close(whole[:, :t], torch.cat(outs, 1), 1e-10)
    # packed: 4 more tokens for sequence 0, none for sequence 1; then 1 and 3; then 2 and 4
    lens = [t, t]
    for a, b in ((4, 0), (1, 3), (2, 4)):
        cu = torch.tensor([0, a, a + b], dtype=torch.int32)
        packed = torch.cat([ids[0, lens[0]:lens[0] + a], ids[1, lens[1]:lens[1] + b]]).view(1, -1)
        got = m(packed, cu_seqlens=cu, cache=cache).logits[0]
        assert_close(whole[0, lens[0]:lens[0] + a], got[:a], 1e-10)
        assert_close(whole[1, lens[1]:lens[1] + b], got[a:], 1e-10)
        lens = [lens[0] + a, lens[1] + b]
    assert cache.lengths == lens


def test_chunk_step_errors():
    m = build("full")
    cache = m.new_cache()
    m(ids_of((2, 6)), cache=cache)
    with pytest.raises(ValueError, match="x: appending"):
        m(ids_of((3, 2)), cache=cache)
    with pytest.raises(ValueError, match="cu_seqlens"):
        m(ids_of((1, 3)), cu_seqlens=torch.tensor([0, 1], dtype=torch.int32), cache=cache)
