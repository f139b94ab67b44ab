"""nsa.hf: transformers' generate() == LanguageModel.generate, the forward contract (packed prefill of
left-padded rows, decoding steps), save/load, AutoModel, the loss, gradient checkpointing, conversion."""

import ast
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip(
    "transformers", reason="nsa.hf needs transformers (pip install 'nsa[hf]'; make test installs it)")

from packaging.version import Version  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402
from transformers.cache_utils import DynamicCache  # noqa: E402

from nsa import hf as nsa_hf  # noqa: E402
from nsa import model as model_mod  # noqa: E402
from nsa.hf import NSAForCausalLM, NSAHFCache, NSAHFConfig  # noqa: E402
from nsa.model import LanguageModel, ModelConfig  # noqa: E402
from tests.helpers import assert_close  # noqa: E402

KINDS = ["nsa", "full", "window"]
DTYPES = [pytest.param(torch.float64, id="fp64"), pytest.param(torch.float32, id="fp32")]
V = 61
PAD = 0
# from_pretrained keeps the saved dtype with dtype='auto' (transformers 5's default; 4.x loads float32
# unless asked; the argument was torch_dtype before 4.56)
AUTO_DTYPE = {"dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype": "auto"}
# generate()'s name for a cache to continue from (transformers 5 renamed past_key_values to cache)
CACHE_ARG = nsa_hf._CACHE_FIELD


def tiny(kind="nsa", **kw):
    # As tests/test_model.py's tiny(): NSA's branches all active at T >= 16 (compression 8/4,
    # blocks of 8, 3 selected, window 12).
    base = dict(vocab_size=V, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                intermediate_size=48, max_seq_len=128, kernel_size=8, stride=4, block_size=8, num_selected=3,
                num_local=1, window_size=12, backend="reference")
    return ModelConfig(**{**base, "attention": kind, **kw})


def build(kind="nsa", dtype=torch.float64, seed=0, **kw):
    """A model whose greedy continuations depend on the context. At LanguageModel's initialisation
    (std 0.02) the residual stream is the input embedding, so greedy decoding repeats the last token
    whatever the attention does; weights of twice the variance-preserving scale (and non-zero
    position embeddings) make the continuation depend on the earlier tokens and on padding."""
    torch.manual_seed(seed)
    lm = LanguageModel(tiny(kind, **kw)).double()
    with torch.no_grad():
        for name, p in lm.named_parameters():
            if p.dim() == 2 and not name.startswith(("embed", "lm_head")):
                p.normal_(0, 2 / p.shape[1] ** 0.5)
            elif name.endswith("pos_emb"):
                p.normal_(0, 0.5)
    return lm.to(dtype).eval()


def ids_of(n, seed):
    return torch.randint(0, V, (n,), generator=torch.Generator().manual_seed(seed))


def left_pad(prompts):
    """``input_ids, attention_mask [N, max len]``, padded on the left (transformers' convention)."""
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), PAD, dtype=torch.long)
    mask = torch.zeros(len(prompts), T, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, T - len(p):] = p
        mask[i, T - len(p):] = 1
    return ids, mask


# Longer than a selection block and the window, a single token, one in between.
PROMPTS = [ids_of(23, 1), ids_of(1, 2), ids_of(9, 3)]
NEW = 13  # every sequence ends past the window (12); compression blocks complete every 4 tokens


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", KINDS)
def test_greedy_generate_equals_language_model(kind, dtype):
    lm = build(kind, dtype)
    m = NSAForCausalLM.from_nsa(lm, pad_token_id=PAD)
    want = lm.generate(PROMPTS, NEW, temperature=0)
    assert len(set(torch.cat(want).tolist())) > NEW  # not a repetition of the last prompt token
    ids, mask = left_pad(PROMPTS)
    out = m.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, pad_token_id=PAD,
                     return_dict_in_generate=True)
    T = ids.shape[1]
    assert torch.equal(out.sequences[:, :T], ids)
    for i, w in enumerate(want):
        assert torch.equal(out.sequences[i, T:], w), i
    # One prefill, then one token per sequence per step (the last token is never fed).
    cache = getattr(out, CACHE_ARG)
    assert isinstance(cache, NSAHFCache)
    assert cache.lengths == [len(p) + NEW - 1 for p in PROMPTS]
    assert cache.get_seq_length() == T + NEW - 1


def test_generate_without_padding_or_cache():
    lm = build()
    m = NSAForCausalLM.from_nsa(lm, pad_token_id=PAD)
    ids = torch.stack([ids_of(17, 4), ids_of(17, 5)])
    want = torch.stack(lm.generate(ids, 6, temperature=0))
    # no attention_mask: generate() makes an all-ones one and drops it
    assert torch.equal(m.generate(ids, max_new_tokens=6, do_sample=False)[:, 17:], want)
    # use_cache=False: the whole sequence, packed, at every step
    ids_p, mask = left_pad(PROMPTS)
    got = m.generate(ids_p, attention_mask=mask, max_new_tokens=3, do_sample=False, use_cache=False)
    want_p = lm.generate(PROMPTS, 3, temperature=0)
    for i, w in enumerate(want_p):
        assert torch.equal(got[i, ids_p.shape[1]:], w)
    torch.manual_seed(0)
    sampled = m.generate(ids_p, attention_mask=mask, max_new_tokens=3, do_sample=True, top_k=5)
    assert sampled.shape == (3, ids_p.shape[1] + 3) and int(sampled.max()) < V


def test_generate_continues_from_a_returned_cache():
    lm = build()
    m = NSAForCausalLM.from_nsa(lm, pad_token_id=PAD)
    want = lm.generate(PROMPTS, 10, temperature=0)
    ids, mask = left_pad(PROMPTS)
    first = m.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
    mask = torch.cat([mask, torch.ones(3, 4, dtype=mask.dtype)], 1)
    out = m.generate(first.sequences, attention_mask=mask, max_new_tokens=6, do_sample=False,
                     **{CACHE_ARG: getattr(first, CACHE_ARG)})
    for i, w in enumerate(want):
        assert torch.equal(out[i, ids.shape[1]:], w)


@pytest.mark.parametrize("kind", KINDS)
def test_forward_prefill_then_steps(kind):
    """Prefill logits at real positions == each prompt alone; zeros at padding; a step's logits ==
    the forward over the prompt plus the new token."""
    lm = build(kind)
    m = NSAForCausalLM.from_nsa(lm)
    ids, mask = left_pad(PROMPTS)
    T = ids.shape[1]
    cache = m.new_cache()
    out = m(ids, attention_mask=mask, past_key_values=cache, use_cache=True)
    assert getattr(out, CACHE_ARG) is cache and out.logits.shape == (3, T, V)
    assert cache.get_seq_length() == T and cache.lengths == [len(p) for p in PROMPTS]
    for i, p in enumerate(PROMPTS):
        assert_close(f"prefill {i}", lm(p.view(1, -1)).logits[0], out.logits[i, T - len(p):], 1e-12)
        assert not out.logits[i, :T - len(p)].any()
    seqs = [p for p in PROMPTS]
    for step in range(2):
        nxt = out.logits[:, -1].argmax(-1)
        seqs = [torch.cat([s, t.view(1)]) for s, t in zip(seqs, nxt)]
        mask = torch.cat([mask, torch.ones(3, 1, dtype=mask.dtype)], 1)
        out = m(nxt.view(3, 1), attention_mask=mask, past_key_values=cache)
        assert out.logits.shape == (3, 1, V) and cache.get_seq_length() == T + step + 1
        for i, s in enumerate(seqs):
            assert_close(f"step {step} row {i}", lm(s.view(1, -1)).logits[0, -1], out.logits[i, 0], 1e-12)
    # The new tokens of a step cannot be masked; the mask must cover the columns seen + new.
    with pytest.raises(ValueError, match="must not be masked"):
        m(nxt.view(3, 1), attention_mask=torch.cat([mask, torch.zeros(3, 1, dtype=mask.dtype)], 1),
          past_key_values=cache)
    with pytest.raises(ValueError, match="attention_mask: expected"):
        m(nxt.view(3, 1), attention_mask=mask, past_key_values=cache)
    logits, = m(ids, attention_mask=mask[:, :T], return_dict=False)  # no cache asked: none returned
    assert torch.equal(logits, m(ids, attention_mask=mask[:, :T]).logits)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_save_load_round_trip(tmp_path, tie, dtype):
    m = NSAForCausalLM.from_nsa(build(dtype=dtype, tie_embeddings=tie))
    m.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert ("model.lm_head.weight" in f.keys()) == (not tie)  # a tied head is stored once
    config = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(config, NSAHFConfig) and config.to_nsa() == m.config.to_nsa()
    for loaded in (NSAForCausalLM.from_pretrained(tmp_path, **AUTO_DTYPE),
                   AutoModelForCausalLM.from_pretrained(tmp_path, **AUTO_DTYPE)):
        assert type(loaded) is NSAForCausalLM
        assert (loaded.model.lm_head.weight is loaded.model.embed.weight) == tie
        a, b = m.state_dict(), loaded.state_dict()
        assert a.keys() == b.keys()
        for k in a:
            assert a[k].dtype == b[k].dtype == dtype and torch.equal(a[k], b[k]), k
        # transformers may leave the loaded weights in memory that is not 64-byte aligned (read from
        # the file at an offset), where CPU matmuls can round differently in the last bit: copies
        # into fresh (aligned) memory give bitwise the logits of the saved model.
        for p in loaded.parameters():
            p.data = p.data.clone()
        ids = torch.stack([ids_of(21, 6), ids_of(21, 7)])
        assert torch.equal(m(ids).logits, loaded.eval()(ids).logits)
    # config fields that keep parameter shapes can be changed on loading
    assert NSAForCausalLM.from_pretrained(tmp_path, backend="auto").model.config.backend == "auto"


def test_loss_equals_language_model():
    lm = build()
    m = NSAForCausalLM.from_nsa(lm)
    ids = torch.stack([ids_of(30, 8), ids_of(30, 9)])
    labels = ids.clone()
    labels[0, 4] = -100
    out = m(ids, labels=labels)
    ref = lm(ids, labels=labels, return_logits=True)
    assert torch.equal(out.loss, ref.loss) and torch.equal(out.logits, ref.logits)
    # Padded rows: the loss of the packed unpadded sequences (padding never predicted or predicting).
    ids_p, mask = left_pad(PROMPTS)
    labels_p = ids_p.clone()
    labels_p[0, -3] = -100
    got = m(ids_p, attention_mask=mask, labels=labels_p)
    keep = mask.bool()
    cu = torch.tensor([0] + [len(p) for p in PROMPTS]).cumsum(0).to(torch.int32)
    want = lm(ids_p[keep].view(1, -1), cu_seqlens=cu, labels=labels_p[keep].view(1, -1))
    assert torch.equal(got.loss, want.loss)
    # by hand: each row's next-token cross-entropy over its real tokens
    total, count = 0.0, 0
    for i, p in enumerate(PROMPTS):
        row_labels = labels_p[i, keep[i]]
        logits = lm(p.view(1, -1)).logits[0]
        for t in range(len(p) - 1):
            if row_labels[t + 1] != -100:
                total = total - logits[t].log_softmax(-1)[row_labels[t + 1]]
                count += 1
    assert_close("padded loss", total / count, got.loss, 1e-12)
    # Trainer's num_items_in_batch: the sum over this batch's targets divided by it.
    assert_close("num_items_in_batch", total / 7, m(ids_p, attention_mask=mask, labels=labels_p,
                                                      num_items_in_batch=7).loss, 1e-12)
    dense_count = int((labels[:, 1:] != -100).sum())
    assert_close("num_items_in_batch dense", ref.loss * dense_count / 5,
                 m(ids, labels=labels, num_items_in_batch=5).loss, 1e-12)


def test_gradient_checkpointing_same_gradients(monkeypatch):
    m = NSAForCausalLM.from_nsa(build()).train()
    ids = torch.stack([ids_of(33, 10), ids_of(33, 11)])

    def grads():
        m.zero_grad()
        m(ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in m.named_parameters()}

    plain = grads()
    calls = []
    real = model_mod.checkpoint
    monkeypatch.setattr(model_mod, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    # transformers 5 renamed gradient_checkpointing_* to activation_checkpointing_* (the old names warn)
    new_names = hasattr(m, "activation_checkpointing_enable")
    (m.activation_checkpointing_enable if new_names else m.gradient_checkpointing_enable)()
    assert m.model.activation_checkpointing
    assert m.is_activation_checkpointing if new_names else m.is_gradient_checkpointing
    ckpt = grads()
    assert len(calls) == m.config.num_layers  # every block recomputed
    for n in plain:
        assert torch.equal(plain[n], ckpt[n]), n
    (m.activation_checkpointing_disable if new_names else m.gradient_checkpointing_disable)()
    assert not m.model.activation_checkpointing


def test_conversion(tmp_path):
    lm = build(tie_embeddings=False)
    m = NSAForCausalLM.from_nsa(lm)
    assert m.to_nsa() is m.model and m.model is not lm
    assert all(torch.equal(a, b) for a, b in zip(lm.state_dict().values(), m.model.state_dict().values()))
    # from an `nsa train` run directory (DIR/checkpoint) and from a saved LanguageModel directory
    lm.save_pretrained(tmp_path / "run" / "checkpoint")
    for path in (tmp_path / "run", tmp_path / "run" / "checkpoint"):
        c = NSAForCausalLM.from_nsa_checkpoint(path)
        assert c.config.to_nsa() == lm.config
        sd = c.model.state_dict()
        assert all(torch.equal(v.to(sd[k].dtype), sd[k]) for k, v in lm.state_dict().items())
    c = NSAForCausalLM.from_nsa_checkpoint(tmp_path / "run", backend="auto")
    assert c.config.backend == "auto" and c.model.config.backend == "auto"
    # configs: ModelConfig <-> NSAHFConfig, aliases, validation
    config = NSAHFConfig.from_nsa(lm.config)
    assert config.to_nsa() == lm.config
    assert config.tie_word_embeddings is False and config.num_hidden_layers == 2 and config.num_key_value_heads == 2
    assert NSAHFConfig(tie_word_embeddings=False).to_nsa().tie_embeddings is False
    assert NSAHFConfig().to_nsa() == ModelConfig()
    with pytest.raises(ValueError, match="contradicts"):
        NSAHFConfig(tie_embeddings=True, tie_word_embeddings=False)
    with pytest.raises(ValueError, match="num_heads"):
        NSAHFConfig(num_heads=3, num_kv_heads=2)


def test_unsupported_inputs_fail_loudly():
    m = NSAForCausalLM.from_nsa(build(), pad_token_id=PAD)
    ids, mask = left_pad(PROMPTS)
    with pytest.raises((ValueError, NotImplementedError)):  # transformers 5: the mode; 4.x: the cache's reorder
        m.generate(ids, attention_mask=mask, max_new_tokens=3, num_beams=2, do_sample=False)
    with pytest.raises(ValueError, match="inputs_embeds"):
        m(ids, inputs_embeds=torch.zeros(3, ids.shape[1], 32, dtype=torch.float64))
    with pytest.raises(ValueError, match="NSAHFCache"):
        m(ids, past_key_values=DynamicCache())
    with pytest.raises(NotImplementedError, match="crop"):
        m.new_cache().crop(1)


def test_registration_and_core_independence():
    nsa_hf.register()  # idempotent
    assert isinstance(AutoConfig.for_model("nsa"), NSAHFConfig)
    # Only nsa.hf imports transformers: the core never needs it.
    src = Path(nsa_hf.__file__).parent
    for path in src.rglob("*.py"):
        if path.name != "hf.py":
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                    assert not any(n.split(".")[0] == "transformers" for n in names), path
