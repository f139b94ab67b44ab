"""nsa.evals: the task generators (exact lengths, seeded, usable as training data), the
evaluators scored with predictors whose answers are known (perfect: 1, random: chance, uniform:
ln V), the selection capture against the layer, and `nsa eval` end to end on a tiny trained run."""

import inspect
import json
import math
import random
import re
import string

import pytest
import torch

from nsa.data import ByteTokenizer, find_documents, split_documents
from nsa.evals.tasks import (Filler, make_task_corpus, needle_min_length, needle_sample, recall_min_length,
                             recall_sample)

TOK = ByteTokenizer()
# Real text (ASCII Python source) and a filler with multi-byte characters, whose cuts must not
# split a character.
TEXT = inspect.getsource(json.decoder) + inspect.getsource(string)
UNICODE = "Grüße aus Köln — naïve café, 東京 and ✓ marks. " * 40


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is as fast


def binomial_ok(hits: int, n: int, p: float, sigmas: float = 4.0) -> bool:
    return abs(hits / n - p) <= sigmas * math.sqrt(p * (1 - p) / n)


# ---- tasks ------------------------------------------------------------------------------------

@pytest.mark.parametrize("filler", [TEXT, UNICODE], ids=["ascii", "unicode"])
@pytest.mark.parametrize("length", [86, 87, 150, 1000, 5000], ids=lambda n: f"L{n}")
def test_needle_prompt_is_exact(filler, length):
    """The prompt has exactly `length` byte tokens with bos, reads back as its text, holds the
    needle at its span, and ends with the question; the answer is the key."""
    F = Filler(TOK, filler)
    for depth in (0.0, 0.3, 1.0):
        s = needle_sample(TOK, F, length, depth, seed=f"t{length}{depth}")
        q, = s.questions
        assert len(q.prompt_ids) == length == s.info["length"]
        assert list(q.prompt_ids) == [TOK.bos_id] + TOK.encode(q.prompt)
        assert "\ufffd" not in q.prompt  # no character was cut
        a, b = q.span
        needle = f"\nThe pass key is {q.answer}. Remember it. {q.answer} is the pass key.\n"
        assert TOK.decode(q.prompt_ids[a:b]) == needle
        assert q.prompt.endswith("\nWhat is the pass key?\n") and re.fullmatch(r"\d{6}", q.answer)
        assert s.document == q.prompt + q.answer and s.prompt == q.prompt and s.answer == q.answer


def test_needle_depth_and_seed():
    F = Filler(TOK, TEXT)
    L = 600
    starts = [needle_sample(TOK, F, L, d, seed=1).questions[0].span[0] for d in (0, 0.25, 0.5, 0.75, 1)]
    assert starts[0] == 1 and starts == sorted(starts)  # depth 0: right after bos
    q = needle_sample(TOK, F, L, 1.0, seed=1).questions[0]
    assert q.span[1] + len(TOK.encode("\nWhat is the pass key?\n")) == L  # depth 1: right before the question
    filler_len = L - needle_min_length(TOK)
    for d, s in zip((0.25, 0.5, 0.75), starts[1:4]):
        assert abs((s - 1) - d * filler_len) <= 2
    a, b = needle_sample(TOK, TEXT, L, 0.5, seed=7), needle_sample(TOK, TEXT, L, 0.5, seed=7)
    assert a == b  # a Filler or its text: the same sample
    keys = {needle_sample(TOK, F, L, 0.5, seed=i).answer for i in range(20)}
    assert len(keys) > 15
    one = [needle_sample(TOK, F, 100, 0.5, seed=i, key_digits=1).answer for i in range(200)]
    assert set(one) == set("0123456789")


def test_recall_sample():
    F = Filler(TOK, TEXT)
    s = recall_sample(TOK, F, 700, seed=3, num_pairs=6, num_queries=4, value_digits=3)
    pairs = dict(s.info["pairs"])
    assert len(pairs) == 6 and len(s.questions) == 4 and len(set(s.info["queries"])) == 4
    assert len(s.questions[-1].prompt_ids) == 700
    for key, q in zip(s.info["queries"], s.questions):
        assert q.answer == pairs[key] and re.fullmatch(r"\d{3}", q.answer)
        assert q.prompt.endswith(f"\n{key}:") and "\nRecall:\n" in q.prompt
        assert list(q.prompt_ids) == [TOK.bos_id] + TOK.encode(q.prompt)
        assert TOK.decode(q.prompt_ids[q.span[0]:q.span[1]]) == f"\n{key}:{q.answer}\n"
        assert s.document.startswith(q.prompt + q.answer)  # earlier answers are in later prompts
    assert s.document == s.prompt + s.answer
    assert recall_min_length(TOK, 6, 4, 3) <= 700
    with pytest.raises(ValueError, match="num_queries"):
        recall_sample(TOK, F, 700, seed=0, num_pairs=2, num_queries=3)
    with pytest.raises(ValueError, match="length"):
        recall_sample(TOK, F, recall_min_length(TOK) - 1, seed=0)
    with pytest.raises(ValueError, match="num_pairs: at most 4900"):
        recall_sample(TOK, F, 10 ** 6, seed=0, num_pairs=4901)


def test_task_errors():
    with pytest.raises(ValueError, match="length: 85 tokens cannot hold the needle"):
        needle_sample(TOK, TEXT, needle_min_length(TOK) - 1, 0.5, seed=0)
    with pytest.raises(ValueError, match="depth"):
        needle_sample(TOK, TEXT, 200, 1.5, seed=0)
    with pytest.raises(ValueError, match="seed"):
        needle_sample(TOK, TEXT, 200, 0.5, seed=1.5)
    with pytest.raises(ValueError, match="filler"):
        Filler(TOK, ["", ""])
    needle_sample(ByteTokenizer(), Filler(TOK, TEXT), 100, 0.5, seed=0)  # an equal tokenizer will do

    class Other(ByteTokenizer):
        fingerprint = "other"

    with pytest.raises(ValueError, match="filler: built for another tokenizer"):
        needle_sample(Other(), Filler(TOK, TEXT), 100, 0.5, seed=0)


def test_bpe_prompt_tokens_match_the_document():
    """With a BPE tokenizer the length is fitted (here exactly) and the prompt's tokens are those
    of the training document it starts: the prompts end where BPE cuts anyway."""
    from nsa.data import BPETokenizer

    pytest.importorskip("tokenizers")
    tok = BPETokenizer.train([TEXT, inspect.getsource(random)], 500)
    F = Filler(tok, TEXT)
    for L in (120, 400):
        s = needle_sample(tok, F, L, 0.5, seed=L)
        r = recall_sample(tok, F, L + 100, seed=L)
        for sample in (s, r):
            doc = tok.encode(sample.document)
            for q in sample.questions:
                assert doc[:len(q.prompt_ids) - 1] == list(q.prompt_ids[1:])
        assert abs(len(s.questions[0].prompt_ids) - L) <= 2


@pytest.mark.parametrize("task", ["needle", "recall", "lm", "mix"])
def test_make_task_corpus(tmp_path, task):
    """Documents as text files that nsa.data reads, each at most `length` tokens as stored (bos
    and eos included), at least min_length, the same for the same seed."""
    out = tmp_path / "c"
    info = make_task_corpus(task, 12, 400, TOK, TEXT, seed=5, out_dir=out)
    files = find_documents([out])
    assert len(files) == 12 and info["files"] == 12 and sum(info["documents"].values()) == 12
    texts = [f.read_text() for f in files]
    sizes = [len(TOK.encode(t)) + 2 for t in texts]
    assert all(100 <= n <= 400 for n in sizes) and sum(sizes) == info["tokens"]
    if task == "needle":
        assert all(re.search(r"\nWhat is the pass key\?\n\d{6}$", t) for t in texts)
    if task == "recall":
        assert all(re.search(r"\nRecall:\n(\w+:\d{4}\n){3}\w+:\d{4}$", t) for t in texts)
    if task == "mix":
        assert set(info["documents"]) == {"needle", "recall", "lm"} and min(info["documents"].values()) > 0
    # where the answers begin: a needle's key, a recall sample's first queried key, none in filler
    assert len(info["answers"]) == 12
    for t, a in zip(texts, info["answers"]):
        if a is None:
            assert "What is the pass key?" not in t and "\nRecall:\n" not in t
        elif t[:a].endswith("\nWhat is the pass key?\n"):
            assert re.fullmatch(r"\d{6}", t[a:])
        else:
            assert t[:a].endswith("\nRecall:\n") and re.fullmatch(r"(\w+:\d{4}\n){3}\w+:\d{4}", t[a:])
    assert (task == "lm") == all(a is None for a in info["answers"])
    train, val = split_documents(files, 0.25, 0)
    assert train and val
    make_task_corpus(task, 12, 400, TOK, TEXT, seed=5, out_dir=out)  # replaces its own output
    assert [f.read_text() for f in find_documents([out])] == texts
    make_task_corpus(task, 3, 400, TOK, TEXT, seed=6, out_dir=out)
    assert len(list(out.iterdir())) == 3


def test_make_task_corpus_lengths_and_errors(tmp_path):
    info = make_task_corpus("needle", 6, 300, TOK, TEXT, seed=0, out_dir=tmp_path / "a", min_length=300)
    assert info["tokens"] == 6 * 300  # exact for the byte tokenizer
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "notes.md").write_text("mine")
    with pytest.raises(ValueError, match="out_dir"):
        make_task_corpus("lm", 2, 300, TOK, TEXT, seed=0, out_dir=tmp_path / "b")
    with pytest.raises(ValueError, match="task"):
        make_task_corpus("qa", 2, 300, TOK, TEXT, seed=0, out_dir=tmp_path / "c")
    with pytest.raises(ValueError, match="length: 50 tokens cannot hold a needle document"):
        make_task_corpus("needle", 2, 50, TOK, TEXT, seed=0, out_dir=tmp_path / "c")
    with pytest.raises(ValueError, match="min_length"):
        make_task_corpus("lm", 2, 300, TOK, TEXT, seed=0, out_dir=tmp_path / "c", min_length=301)


# ---- retrieval evaluators, scored with predictors whose answers are known ---------------------

class Perfect:
    """Reads the answer off the prompt, as a model that retrieves perfectly would."""

    def __init__(self, tok):
        self.tok = tok
        self.calls = []

    def answer(self, text):
        if text.endswith("\nWhat is the pass key?\n"):
            return re.search(r"The pass key is (\d+)\.", text).group(1)
        key = re.search(r"\n(\w+):$", text).group(1)
        return re.search(rf"\n{key}:(\d+)\n", text).group(1)

    def generate(self, prompts, max_new_tokens, temperature, eos_token_id):
        assert temperature == 0 and eos_token_id == self.tok.eos_id
        self.calls.append([len(p) for p in prompts])
        return [torch.tensor(self.tok.encode(self.answer(self.tok.decode(p))) + [eos_token_id]) for p in prompts]


class Random(Perfect):
    """Answers random digits (and sometimes an id outside the tokenizer's vocabulary)."""

    def __init__(self, tok, seed=0):
        super().__init__(tok)
        self.rng = random.Random(seed)

    def generate(self, prompts, max_new_tokens, temperature, eos_token_id):
        digits = [self.tok.encode(str(d))[0] for d in range(10)]
        return [torch.tensor([self.rng.choice(digits) for _ in range(max_new_tokens - 1)] + [300]) for _ in prompts]


class FirstHalf(Perfect):
    """Finds the key only when the needle lies in the first half of the prompt."""

    def answer(self, text):
        return super().answer(text) if text.index("The pass key") < len(text) / 2 else "none"


def test_needle_perfect_random_and_orientation():
    from nsa.evals.needle import evaluate_needle

    F = Filler(TOK, TEXT)
    lengths, depths = [100, 300], [0.0, 0.25, 0.5, 0.75, 1.0]
    perfect = evaluate_needle(Perfect(TOK), TOK, F, lengths, depths, samples=3, seed=1)
    assert perfect["accuracy"] == [[1.0] * 5] * 2 and perfect["mean_accuracy"] == 1.0
    assert perfect["cells"][0]["examples"][0]["correct"] and perfect["chance"] == 1e-6
    json.dumps(perfect)
    r = evaluate_needle(Random(TOK), TOK, F, lengths, depths, samples=40, seed=1, key_digits=1)
    n = len(lengths) * len(depths) * 40
    assert r["chance"] == 0.1 and binomial_ok(round(r["mean_accuracy"] * n), n, 0.1)
    half = evaluate_needle(FirstHalf(TOK), TOK, F, [300], depths, samples=2, seed=1)
    assert [half["accuracy"][0][j] for j in (0, 1, 3, 4)] == [1.0, 1.0, 0.0, 0.0]  # [length][depth]
    assert half["accuracy_by_depth"][0] == 1.0 and half["accuracy_by_depth"][-1] == 0.0


def test_recall_perfect_random_and_batches():
    from nsa.evals.needle import evaluate_recall

    F = Filler(TOK, TEXT)
    p = Perfect(TOK)
    perfect = evaluate_recall(p, TOK, F, [200, 400], samples=3, seed=2, batch_tokens=1000)
    assert perfect["accuracy"] == [1.0, 1.0] and perfect["all_correct"] == [1.0, 1.0]
    assert all(sum(c) <= 1000 or len(c) == 1 for c in p.calls) and sum(map(len, p.calls)) == 2 * 3 * 4
    r = evaluate_recall(Random(TOK, 1), TOK, F, [200, 400], samples=50, seed=2, value_digits=1)
    n = 2 * 50 * 4
    assert binomial_ok(round(r["mean_accuracy"] * n), n, 0.1)


def test_retrieval_bad_input():
    from nsa.evals.needle import evaluate_needle

    with pytest.raises(ValueError, match="lengths: every length must be an int >= 86"):
        evaluate_needle(Perfect(TOK), TOK, TEXT, [50], [0.5])
    with pytest.raises(ValueError, match="depths"):
        evaluate_needle(Perfect(TOK), TOK, TEXT, [100], [-0.1])
    with pytest.raises(ValueError, match="samples"):
        evaluate_needle(Perfect(TOK), TOK, TEXT, [100], [0.5], samples=0)


# ---- loss ---------------------------------------------------------------------------------------

class Uniform:
    """Equal logits over V ids: loss ln V everywhere."""

    V = 320

    def __call__(self, input_ids, cu_seqlens=None):
        return type("Out", (), {"logits": torch.zeros(1, input_ids.shape[1], self.V)})()


class KnowsAfter(Uniform):
    """Predicts the next token with certainty from position `start` of every sequence on."""

    def __init__(self, start):
        self.start = start

    def __call__(self, input_ids, cu_seqlens=None):
        logits = super().__call__(input_ids).logits
        ids = input_ids[0]
        starts = torch.repeat_interleave(cu_seqlens[:-1].long(), (cu_seqlens[1:] - cu_seqlens[:-1]).long())
        pos = torch.arange(ids.numel()) - starts
        rows = torch.nonzero(pos[:-1] >= self.start).squeeze(1)
        logits[0, rows, ids[rows + 1]] = 100.0
        return type("Out", (), {"logits": logits})()


DOCS = [TEXT[i:i + n] for i, n in ((0, 700), (700, 150), (900, 1300), (3000, 40))]


def test_loss_uniform_and_buckets():
    from nsa.evals.loss import bucket_edges, evaluate_loss

    r = evaluate_loss(Uniform(), TOK, DOCS, seq_len=300, batch_tokens=700)
    lnv = math.log(Uniform.V)
    assert r["tokens"] == sum(len(d) + 1 for d in DOCS)  # every byte and each eos, once
    assert r["text_tokens"] == r["bytes"] == sum(map(len, DOCS)) and r["documents"] == 4
    # float32 logits: ln V to float32 precision
    assert abs(r["loss"] - lnv) < 1e-6 and abs(r["bits_per_byte"] - math.log2(Uniform.V)) < 1e-6
    assert [(b["start"], b["end"]) for b in r["buckets"]] == [(0, 64), (64, 128), (128, 256), (256, 299)]
    assert all(abs(b["loss"] - lnv) < 1e-6 for b in r["buckets"])
    assert sum(b["tokens"] for b in r["buckets"]) == r["tokens"]
    assert bucket_edges(64) == [0, 63] and bucket_edges(1000, 100) == [0, 100, 200, 400, 800, 999]
    k = evaluate_loss(KnowsAfter(64), TOK, DOCS, seq_len=300)
    assert abs(k["buckets"][0]["loss"] - lnv) < 1e-6
    assert all(b["loss"] < 1e-30 for b in k["buckets"][1:])
    share = k["buckets"][0]["tokens"] / k["tokens"]
    assert abs(k["loss"] - share * lnv) < 1e-6
    cut = evaluate_loss(Uniform(), TOK, DOCS, seq_len=300, max_tokens=1000)
    # 700 + eos, 150 + eos, then 148 bytes of the third document
    assert cut["tokens"] == 1000 and cut["documents"] == 3 and cut["bytes"] == 700 + 150 + 148
    with pytest.raises(ValueError, match="seq_len"):
        evaluate_loss(Uniform(), TOK, DOCS, seq_len=1)


def test_loss_matches_the_model():
    """On documents shorter than seq_len the overall loss is LanguageModel's own (the training
    run's val_loss on the same packed batch)."""
    from nsa.evals.loss import evaluate_loss
    from nsa.model import LanguageModel, ModelConfig

    torch.manual_seed(0)
    model = LanguageModel(ModelConfig.preset("tiny", num_layers=2, hidden_size=64, num_heads=2, head_dim=32,
                                             intermediate_size=128)).double().eval()
    docs = DOCS[1:2] + [DOCS[3], TEXT[5000:5200]]
    r = evaluate_loss(model, TOK, docs, seq_len=512)
    ids = [t for d in docs for t in [TOK.bos_id] + TOK.encode(d) + [TOK.eos_id]]
    lens = [len(d) + 2 for d in docs]
    cu = torch.tensor([0] + lens).cumsum(0).to(torch.int32)
    x = torch.tensor([ids])
    with torch.no_grad():
        ref = model(x, cu_seqlens=cu, labels=x).loss.item()
    assert abs(r["loss"] - ref) < 1e-9 and r["sequences"] == 3


# ---- selection ----------------------------------------------------------------------------------

SEL = dict(kernel_size=8, stride=4, block_size=8, num_selected=4, num_initial=1, num_local=1, window_size=16)


def tiny_model(attention="nsa", dtype=torch.float64):
    from nsa.model import LanguageModel, ModelConfig

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=320, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                      intermediate_size=128, max_seq_len=1024, attention=attention, **SEL)
    return LanguageModel(cfg).to(dtype).eval()


@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
def test_recompute_is_the_layer(packed):
    """The capture recomputes exactly what the layer computes (output and all)."""
    from tests.helpers import assert_close
    from nsa.evals.selection import _recompute
    from nsa.layer import NativeSparseAttention, NSAConfig

    torch.manual_seed(0)
    layer = NativeSparseAttention(NSAConfig(hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16, **SEL)).double()
    x = torch.randn(1 if packed else 2, 90, 64, dtype=torch.float64)
    cu = torch.tensor([0, 37, 90], dtype=torch.int32) if packed else None
    with torch.no_grad():
        out, idx, gates = _recompute(layer, x, cu)
        assert_close("output", layer(x, cu_seqlens=cu), out, 1e-12)
    assert idx.shape == (x.shape[0], 90, 2, 4) and idx.dtype == torch.int32 and len(gates) == 3


def test_capture_selection():
    from nsa.evals.selection import capture_selection

    model = tiny_model()
    ids = torch.randint(0, 256, (1, 100))
    recs = capture_selection(model, ids)
    assert len(recs) == 2
    for r in recs:
        idx = r.block_indices[0]
        assert idx.shape == (100, 2, 4) and r.gates.shape == (3, 1, 100, 4)
        own = torch.arange(100).view(100, 1, 1) // 8
        assert ((idx == 0).any(-1)).all() and ((idx == own).any(-1)).all()  # forced: initial and own block
        assert (idx <= own).all()  # causal
        assert ((r.gates > 0) & (r.gates < 1)).all()
    assert not any(m._forward_hooks for m in model.modules())  # hooks removed
    with pytest.raises(ValueError, match="NativeSparseAttention"):
        capture_selection(tiny_model("full"), ids)


def test_needle_hits_perfect_random_chance():
    """A selection that always takes the needle's block scores 1; free slots filled at random
    score selection_chance (here 1 - C(9, 2) / C(11, 2))."""
    from nsa.evals.selection import needle_hits, selection_chance
    from nsa.layer import NSAConfig

    cfg = NSAConfig(hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16, **SEL)
    t, span = 100, (40, 50)  # query block 12; the needle covers blocks 5 and 6
    p = selection_chance(t, span, cfg)
    assert abs(p - (1 - math.comb(9, 2) / math.comb(11, 2))) < 1e-12
    gen = torch.Generator().manual_seed(0)
    free = torch.arange(1, 12)
    rows = []
    for _ in range(4000):
        pick = free[torch.randperm(11, generator=gen)[:2]]
        rows.append(torch.cat([torch.tensor([0, 12]), pick]).sort().values)
    rows = torch.stack(rows).to(torch.int32)
    hits = needle_hits(rows, span, cfg.block_size)
    assert binomial_ok(int(hits.sum()), len(rows), p)
    perfect = rows.clone()
    perfect[:, 1] = 5
    assert needle_hits(perfect, span, cfg.block_size).all()
    assert not needle_hits(torch.tensor([[0, 1, 12, -1]]), span, 8).any()
    assert selection_chance(t, (3, 9), cfg) == 1.0  # in the forced initial block
    assert selection_chance(20, span, cfg) == 0.0  # the needle is after the query
    assert selection_chance(30, (10, 12), cfg) == 1.0  # 4 causal blocks, 4 slots


def test_neighbour_sharing():
    from nsa.evals.selection import neighbour_sharing
    from nsa.layer import NSAConfig

    cfg = NSAConfig(hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16, **SEL)
    T = 40  # queries 32.. have 5+ causal blocks for 4 slots: pairs (31, 32) .. (38, 39)
    a, b = torch.tensor([0, 1, 2, 4]), torch.tensor([0, 3, -1, 4])
    idx = torch.stack([a if t % 2 else b for t in range(T)]).view(T, 1, 4).to(torch.int32)
    s = neighbour_sharing(idx, cfg)
    assert s == dict(pairs=8, shared=2.0, fraction=0.5)  # {0, 4}; -1 is no block
    same = neighbour_sharing(torch.stack([a] * T).view(T, 1, 4), cfg)
    assert same["shared"] == 4.0 and same["fraction"] == 1.0
    assert neighbour_sharing(idx[:32], cfg)["shared"] is None


def test_evaluate_selection():
    from nsa.evals.selection import evaluate_selection

    model = tiny_model(dtype=torch.float32)
    r = evaluate_selection(model, TOK, TEXT, [120, 200], [0.0, 1.0], samples=2, seed=0)
    json.dumps(r)
    assert r["layers"] == 2 and r["kv_heads"] == 2 and len(r["needle_selected"]) == 2
    assert all(0 <= v <= 1 for row in r["needle_selected"] for v in row)
    assert 0 < r["chance"] <= 1 and 0 <= r["needle_selected_mean"] <= 1
    assert len(r["needle_selected_grid"]) == 2 and len(r["needle_selected_grid"][0]) == 2
    # at depth 1 the needle ends in the last blocks before the question, which are local or
    # nearly so; at depth 0 it is in the forced initial block: both selected
    assert r["needle_selected_grid"][0][0] == 1.0
    assert all(0 < g[b] < 1 for g in r["gates"] + r["gates_last"] for b in ("cmp", "slc", "win"))
    assert all(s is not None and 0 < s <= 4 for s in r["shared_blocks"])
    with pytest.raises(ValueError, match="NativeSparseAttention"):
        evaluate_selection(tiny_model("window"), TOK, TEXT, [120], [0.5], samples=1)


# ---- nsa eval ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny NSA model trained for 2 steps on eight small documents (byte tokenizer)."""
    from tests.helpers import train_tiny_run

    return train_tiny_run(tmp_path_factory.mktemp("evalrun"), seq_len=128, batch_tokens=256,
                          model=dict(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=16,
                                     intermediate_size=64, **SEL))


@pytest.mark.parametrize("kind,flags", [
    ("loss", ["--max-tokens", "1500", "--seq-len", "100"]),
    ("needle", ["--lengths", "90,128", "--depths", "0,1", "--samples", "2"]),
    ("recall", ["--lengths", "140,160", "--samples", "1"]),
    ("selection", ["--lengths", "90,128", "--depths", "0,0.5", "--samples", "1"]),
])
def test_cli_eval(run, tmp_path, capsys, kind, flags):
    from nsa.cli import main

    out = tmp_path / "out"
    assert main(["eval", kind, "--checkpoint", str(run), "--out", str(out), "--device", "cpu"] + flags) == 0
    printed = capsys.readouterr().out
    assert f"nsa eval {kind}:" in printed and "wrote" in printed
    report = json.loads((out / f"{kind}.json").read_text())
    assert (out / f"{kind}.png").stat().st_size > 1000
    m, r = report["meta"], report["result"]
    assert m["step"] == 2 and m["attention"] == "nsa" and m["dtype"] == "fp32" and m["documents"] >= 1
    if kind == "loss":
        assert r["tokens"] == 1500 and r["seq_len"] == 100 and r["loss"] > 0
    elif kind == "needle":
        assert r["lengths"] == [90, 128] and r["depths"] == [0.0, 1.0] and len(r["accuracy"]) == 2
    elif kind == "recall":
        assert r["lengths"] == [140, 160] and len(r["accuracy"]) == 2
    else:
        assert r["layers"] == 2 and len(r["gates"]) == 2


def test_cli_eval_defaults(run):
    """Without --out, --lengths or --data: <run>/eval, the run's seq_len grid, its validation
    documents; --no-plot writes no PNG."""
    from nsa.cli import main

    assert main(["eval", "needle", "--checkpoint", str(run / "checkpoint"), "--samples", "1", "--depths", "0.5",
                 "--device", "cpu", "--no-plot"]) == 0
    report = json.loads((run / "eval" / "needle.json").read_text())
    assert report["result"]["lengths"] == [128] and report["meta"]["documents"] == 2  # seq_len 128; 1/4, 1/2 too short
    assert not (run / "eval" / "needle.png").exists()


@pytest.mark.parametrize("argv,message", [
    (["eval"], "required"),
    (["eval", "needle"], "--checkpoint"),
    (["eval", "needle", "--checkpoint", "R", "--lengths", "a,b"], "--lengths"),
    (["eval", "needle", "--checkpoint", "R", "--lengths", "0,128"], "--lengths"),
    (["eval", "needle", "--checkpoint", "R", "--depths", "0,2"], "--depths"),
    (["eval", "loss", "--checkpoint", "R", "--lengths", "128"], "unrecognized arguments: --lengths"),
])
def test_cli_eval_usage_errors(run, capsys, argv, message):
    from nsa.cli import main

    with pytest.raises(SystemExit) as e:
        main([a.replace("R", str(run)) if a == "R" else a for a in argv])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_cli_eval_bad_input(run, tmp_path, capsys):
    """Exit 2 and a message naming the option; nothing written."""
    from nsa.cli import main
    from nsa.data import ByteTokenizer

    out = tmp_path / "out"
    base = ["--out", str(out), "--device", "cpu"]
    cases = [
        (["eval", "needle", "--checkpoint", str(tmp_path / "missing")], "--checkpoint"),
        (["eval", "needle", "--checkpoint", str(run), "--lengths", "50"],
         "--lengths: every length must be an int >= 86"),
        (["eval", "needle", "--checkpoint", str(run), "--samples", "0"], "--samples"),
        (["eval", "loss", "--checkpoint", str(run), "--data", str(tmp_path / "nothing")], "--data"),
    ]
    # a saved full-attention model with a tokenizer beside it, outside a run directory
    bare = tmp_path / "bare"
    tiny_model("full", torch.float32).save_pretrained(bare / "checkpoint")
    ByteTokenizer().save(bare / "tokenizer")
    cases += [(["eval", "selection", "--checkpoint", str(bare / "checkpoint"), "--data", str(run / "config.json")],
               "attention"),
              (["eval", "needle", "--checkpoint", str(bare)], "--data")]
    for argv, message in cases:
        assert main(argv + base) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("nsa eval: ") and message in err, (argv, err)
    assert not out.exists()
    # the bare model with --data: evaluated
    assert main(["eval", "needle", "--checkpoint", str(bare), "--data", str(run / "config.json"), "--lengths", "90",
                 "--depths", "0", "--samples", "1", "--no-plot"] + base) == 0
    assert json.loads((out / "needle.json").read_text())["meta"]["attention"] == "full"
