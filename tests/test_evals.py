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


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one thread is as fast, and never waits on a busy core."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


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
        assert TOK.decode(q.prompt_ids[a:b]) == f"\nThe pass key is {q.answer}. Remember it. {q.answer} is the pass key.\n"
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


def test_task_errors():
    with pytest.raises(ValueError, match="length: 85 tokens cannot hold the needle"):
        needle_sample(TOK, TEXT, needle_min_length(TOK) - 1, 0.5, seed=0)
    with pytest.raises(ValueError, match="depth"):
        needle_sample(TOK, TEXT, 200, 1.5, seed=0)
    with pytest.raises(ValueError, match="seed"):
        needle_sample(TOK, TEXT, 200, 0.5, seed=1.5)
    with pytest.raises(ValueError, match="filler"):
        Filler(TOK, ["", ""])


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
