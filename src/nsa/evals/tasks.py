"""Seeded retrieval tasks in real filler text: pass-key needles and multi-query associative
recall, as evaluation prompts and as training documents.

Every sample is a function of its arguments and a seed (an int or a string, through
:class:`random.Random`), so a grid of evaluation prompts is the same for every model and
every run. Lengths are counted in tokens of the tokenizer given, ``bos`` included: the prompt
of a sample of ``length`` L is ``[bos] + encode(prompt)``, L tokens, exactly for the byte
tokenizer (filler is cut only where a character starts), within a few tokens for a BPE
tokenizer (its merges across the pieces' edges are measured and corrected up to four times;
:attr:`Question.prompt_ids` holds what the evaluators feed).

**Needle** (:func:`needle_sample`): filler text with, at a depth fraction of the filler (0:
right after ``bos``, 1: right before the question)::

    ...filler...
    The pass key is 482913. Remember it. 482913 is the pass key.
    ...filler...
    What is the pass key?
                                             -> answer "482913"

**Recall** (:func:`recall_sample`): ``num_pairs`` lines ``key:value`` (keys random two-syllable
words such as ``kobi``, values ``value_digits`` digits) planted at random places in the filler,
then ``Recall:`` and ``num_queries`` of the keys in random order, each followed by its value::

    ...filler...
    kobi:4821
    ...filler...
    zuta:0937
    ...filler...
    Recall:
    zuta:0937
    kobi:                                    -> answer "4821"

A recall sample holds one :class:`Question` per query: the prompt of query i is the text up to
``key_i:``, the correct earlier answers included (multi-query associative recall asked one
question at a time).

A prompt ends where the tokenizer cuts anyway (``?`` or ``:`` then ``\\n`` or a value's first
digit), so a training document, tokenized as one text, holds the same tokens as the evaluation
prompt followed by its answer.

**Training data** (:func:`make_task_corpus`): text files of documents ``prompt + answer`` (the
training pipeline adds ``bos`` and ``eos``: the model learns to stop after the answer), for
``nsa train --data DIR``; task ``'lm'`` writes plain filler and ``'mix'`` a seeded mixture.
"""

from __future__ import annotations

import os
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["TASKS", "Filler", "Question", "TaskSample", "needle_sample", "recall_sample", "filler_text",
           "needle_min_length", "recall_min_length", "make_task_corpus"]

TASKS = ("needle", "recall", "lm", "mix")

NEEDLE = "\nThe pass key is {key}. Remember it. {key} is the pass key.\n"
NEEDLE_QUESTION = "\nWhat is the pass key?\n"
RECALL_PAIR = "\n{key}:{value}\n"
RECALL_HEADER = "\nRecall:\n"
_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"
MAX_PAIRS = (len(_CONSONANTS) * len(_VOWELS)) ** 2
# Filler documents are joined with this separator, which also closes the filler so that its
# repetitions (a filler shorter than a prompt is cycled) meet at a line break.
SEPARATOR = "\n\n"
_FIT_TRIES = 4  # re-measurements of a prompt's length (BPE merges across the pieces' edges)


def _rng(seed) -> random.Random:
    if isinstance(seed, bool) or not isinstance(seed, (int, str)):
        raise ValueError(f"seed: expected an int or a str, got {seed!r}")
    return random.Random(seed)


def _check_int(name, v, lo):
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"{name}: expected an int >= {lo}, got {v!r}")


class Filler:
    """Filler text as token ids, cut into pieces where a character starts.

    Args:
        tokenizer: anything with ``encode(str) -> list[int]`` and ``decode(ids) -> str``
            (:class:`nsa.data.ByteTokenizer`, :class:`nsa.data.BPETokenizer`).
        texts: one text or several (e.g. the validation documents of a corpus, read with
            :func:`nsa.data.read_text`), joined with blank lines. A filler shorter than a prompt
            is repeated.
    """

    def __init__(self, tokenizer, texts: str | Sequence[str]):
        if isinstance(texts, str):
            texts = [texts]
        texts = [t for t in texts if t]
        if not texts:
            raise ValueError("filler: expected some non-empty text")
        self.tokenizer = tokenizer
        self.ids = list(tokenizer.encode(SEPARATOR.join(texts) + SEPARATOR))
        if not self.ids:
            raise ValueError("filler: the text encodes to no tokens")
        # A token that decodes alone to U+FFFD holds part of a character (a byte of a multi-byte
        # character for the byte tokenizer): no cut next to it.
        whole = {}
        for i in set(self.ids):
            whole[i] = "\ufffd" not in tokenizer.decode([i])
        n = len(self.ids)
        self._clean = [whole[self.ids[p - 1]] and whole[self.ids[p % n]] for p in range(n)]

    @classmethod
    def of(cls, tokenizer, filler: Filler | str | Sequence[str]) -> Filler:
        """``filler`` itself when it is a Filler of ``tokenizer``, else a Filler of the text(s)."""
        if isinstance(filler, Filler):
            same = filler.tokenizer is tokenizer or (
                getattr(tokenizer, "fingerprint", None) is not None
                and getattr(filler.tokenizer, "fingerprint", None) == tokenizer.fingerprint)
            if not same:
                raise ValueError("filler: built for another tokenizer")
            return filler
        return cls(tokenizer, filler)

    def __len__(self) -> int:
        return len(self.ids)

    def clean(self, pos: int) -> bool:
        """Whether a cut before (cyclic) position ``pos`` leaves every character whole."""
        return self._clean[pos % len(self.ids)]

    def snap(self, pos: int, lo: int, hi: int) -> int:
        """The clean cut nearest ``pos`` within ``[lo, hi]`` (``pos`` itself if none is)."""
        for d in range(0, max(pos - lo, hi - pos) + 1):
            for p in (pos - d, pos + d):
                if lo <= p <= hi and self.clean(p):
                    return p
        return pos

    def start(self, rng: random.Random, n: int) -> int:
        """A seeded start position whose slice of ``n`` tokens begins and ends on clean cuts
        (the drawn position itself when the filler has none within 64 tokens)."""
        s0 = rng.randrange(len(self.ids))
        for d in range(64):
            if self.clean(s0 + d) and self.clean(s0 + d + n):
                return s0 + d
        return s0

    def text(self, a: int, b: int) -> str:
        """Text of the cyclic token slice ``[a, b)``."""
        n = len(self.ids)
        out = []
        while a < b:
            i = a % n
            j = min(n, i + (b - a))
            out.extend(self.ids[i:j])
            a += j - i
        return self.tokenizer.decode(out) if out else ""


@dataclass(frozen=True)
class Question:
    """One prompt and its answer.

    Attributes:
        prompt: the prompt text (what comes after ``bos``).
        answer: the expected continuation (without ``eos``).
        prompt_ids: ``[bos] + encode(prompt)``: what the evaluators feed to the model.
        span: token positions ``[start, end)`` in ``prompt_ids`` of the text that holds the
            answer (the needle sentence, or the queried ``key:value`` line); exact for the byte
            tokenizer, counted piece by piece for BPE (a merge across a piece's edge can move it
            by a token).
    """

    prompt: str
    answer: str
    prompt_ids: tuple
    span: tuple


@dataclass(frozen=True)
class TaskSample:
    """A task instance: one or more :class:`Question` on one context.

    Attributes:
        task: ``'needle'`` or ``'recall'``.
        questions: the questions in order; each prompt extends the previous one by its answer
            and the next query.
        info: what the sample was drawn with (length, depth, key, ...), JSON-able.
    """

    task: str
    questions: tuple
    info: dict = field(default_factory=dict)

    @property
    def prompt(self) -> str:
        """The last question's prompt."""
        return self.questions[-1].prompt

    @property
    def answer(self) -> str:
        """The last question's answer."""
        return self.questions[-1].answer

    @property
    def document(self) -> str:
        """The training text: the last prompt followed by its answer (every question answered)."""
        return self.prompt + self.answer


def _assemble(tokenizer, filler: Filler, rng, length: int, inserts: list[str], where: list[float],
              suffix: str):
    """Filler with ``inserts`` at fractions ``where`` (sorted) of it, then ``suffix``, fitted to
    ``length`` tokens with ``bos``. Returns (prefix text without the suffix, token spans of the
    inserts in ``[bos] + encode(...)``, prompt ids)."""
    fixed = 1 + sum(len(tokenizer.encode(t)) for t in inserts) + len(tokenizer.encode(suffix))
    budget = length - fixed
    s = filler.start(rng, max(budget, 0))
    best = None
    for _ in range(_FIT_TRIES):
        budget = max(budget, 0)
        cuts, prev = [], s
        for w in where:
            prev = max(prev, filler.snap(s + round(w * budget), s, s + budget))  # snapped, still in order
            cuts.append(prev)
        bounds = [s] + cuts + [s + budget]
        parts = [filler.text(bounds[0], bounds[1])]
        spans = []
        n = 1 + len(tokenizer.encode(parts[0]))
        for i, ins in enumerate(inserts):
            k = len(tokenizer.encode(ins))
            spans.append((n, n + k))
            piece = filler.text(bounds[i + 1], bounds[i + 2])
            parts += [ins, piece]
            n += k + len(tokenizer.encode(piece))
        body = "".join(parts)
        ids = tuple([tokenizer.bos_id] + list(tokenizer.encode(body + suffix)))
        if best is None or abs(len(ids) - length) < abs(len(best[2]) - length):
            best = (body, spans, ids)
        if len(ids) == length:
            break
        budget += length - len(ids)
    return best


def needle_min_length(tokenizer, key_digits: int = 6) -> int:
    """The shortest needle prompt (no filler), in tokens with ``bos``."""
    key = "0" * key_digits
    return 1 + len(tokenizer.encode(NEEDLE.format(key=key))) + len(tokenizer.encode(NEEDLE_QUESTION))


def needle_sample(tokenizer, filler, length: int, depth: float, seed: int | str,
                  key_digits: int = 6) -> TaskSample:
    """A pass-key needle at ``depth`` in ``length`` tokens of filler (see the module docstring).

    Args:
        tokenizer: ``encode``, ``decode``, ``bos_id`` (a tokenizer of :mod:`nsa.data`).
        filler: a :class:`Filler` of this tokenizer, or text(s) to make one from.
        length: prompt tokens with ``bos``, at least :func:`needle_min_length`.
        depth: where the needle sits in the filler, in [0, 1].
        seed: an int or a str: the key, the filler's start.
        key_digits: digits of the key, drawn uniformly from ``10 ** key_digits`` values
            (zero-padded): chance accuracy is ``10 ** -key_digits``.
    Returns:
        a :class:`TaskSample` with one question; ``info`` holds length, depth, key.
    """
    _check_int("key_digits", key_digits, 1)
    _check_int("length", length, 1)
    if isinstance(depth, bool) or not isinstance(depth, (int, float)) or not 0 <= depth <= 1:
        raise ValueError(f"depth: expected a number in [0, 1], got {depth!r}")
    need = needle_min_length(tokenizer, key_digits)
    if length < need:
        raise ValueError(f"length: {length} tokens cannot hold the needle and the question ({need} tokens)")
    filler = Filler.of(tokenizer, filler)
    rng = _rng(seed)
    key = f"{rng.randrange(10 ** key_digits):0{key_digits}d}"
    body, spans, ids = _assemble(tokenizer, filler, rng, length, [NEEDLE.format(key=key)], [float(depth)],
                                 NEEDLE_QUESTION)
    q = Question(prompt=body + NEEDLE_QUESTION, answer=key, prompt_ids=ids, span=spans[0])
    return TaskSample("needle", (q,), dict(length=len(ids), depth=float(depth), key=key))


def _words(rng, n):
    words = set()
    while len(words) < n:
        words.add("".join(rng.choice(_CONSONANTS) + rng.choice(_VOWELS) for _ in range(2)))
    return sorted(words)


def recall_min_length(tokenizer, num_pairs: int = 8, num_queries: int = 4, value_digits: int = 4) -> int:
    """The shortest recall prompt (no filler), in tokens with ``bos`` (for the byte tokenizer;
    a BPE tokenizer's count depends on the words drawn)."""
    pair = RECALL_PAIR.format(key="baba", value="0" * value_digits)
    answered = f"baba:{'0' * value_digits}\n"
    return (1 + num_pairs * len(tokenizer.encode(pair)) + len(tokenizer.encode(RECALL_HEADER))
            + (num_queries - 1) * len(tokenizer.encode(answered)) + len(tokenizer.encode("baba:")))


def recall_sample(tokenizer, filler, length: int, seed: int | str, num_pairs: int = 8, num_queries: int = 4,
                  value_digits: int = 4) -> TaskSample:
    """Multi-query associative recall in ``length`` tokens of filler (see the module docstring).

    Args:
        tokenizer, filler, seed: as in :func:`needle_sample`.
        length: tokens with ``bos`` of the last question's prompt (the whole context), at least
            :func:`recall_min_length`.
        num_pairs: ``key:value`` lines planted at seeded random places of the filler (distinct
            keys, at most 4900; values drawn uniformly from ``10 ** value_digits``).
        num_queries: keys asked, distinct, in random order, ``<= num_pairs``.
        value_digits: digits of a value: chance accuracy is ``10 ** -value_digits``.
    Returns:
        a :class:`TaskSample` with ``num_queries`` questions; ``info`` holds length, pairs
        (``[key, value]`` in the order planted), queries (the keys asked).
    """
    for name, v in (("num_pairs", num_pairs), ("num_queries", num_queries), ("value_digits", value_digits),
                    ("length", length)):
        _check_int(name, v, 1)
    if num_queries > num_pairs:
        raise ValueError(f"num_queries: at most num_pairs ({num_pairs}), got {num_queries}")
    if num_pairs > MAX_PAIRS:
        raise ValueError(f"num_pairs: at most {MAX_PAIRS} (distinct two-syllable keys), got {num_pairs}")
    filler = Filler.of(tokenizer, filler)
    rng = _rng(seed)
    keys = _words(rng, num_pairs)
    rng.shuffle(keys)
    values = [f"{rng.randrange(10 ** value_digits):0{value_digits}d}" for _ in keys]
    where = sorted(rng.random() for _ in keys)
    asked = rng.sample(range(num_pairs), num_queries)
    qa = "".join(f"{keys[j]}:{values[j]}\n" for j in asked[:-1])
    suffix = RECALL_HEADER + qa + f"{keys[asked[-1]]}:"
    need = 1 + sum(len(tokenizer.encode(RECALL_PAIR.format(key=k, value=v))) for k, v in zip(keys, values)) \
        + len(tokenizer.encode(suffix))
    if length < need:
        raise ValueError(f"length: {length} tokens cannot hold {num_pairs} pairs and {num_queries} queries "
                         f"({need} tokens)")
    inserts = [RECALL_PAIR.format(key=k, value=v) for k, v in zip(keys, values)]
    body, spans, ids = _assemble(tokenizer, filler, rng, length, inserts, where, suffix)
    questions = []
    text = body + RECALL_HEADER
    for i, j in enumerate(asked):
        prompt = text + f"{keys[j]}:"
        p_ids = ids if i == len(asked) - 1 else tuple([tokenizer.bos_id] + list(tokenizer.encode(prompt)))
        questions.append(Question(prompt=prompt, answer=values[j], prompt_ids=p_ids, span=spans[j]))
        text = prompt + values[j] + "\n"
    info = dict(length=len(ids), pairs=[[k, v] for k, v in zip(keys, values)], queries=[keys[j] for j in asked])
    return TaskSample("recall", tuple(questions), info)


def filler_text(tokenizer, filler, length: int, seed: int | str) -> str:
    """Plain filler of ``length - 1`` tokens (a document of ``length`` tokens with ``bos``),
    from a seeded start: task ``'lm'``."""
    _check_int("length", length, 1)
    filler = Filler.of(tokenizer, filler)
    rng = _rng(seed)
    n = length - 1
    s = filler.start(rng, n)
    return filler.text(s, s + n)


def _doc_tokens(tokenizer, text):
    return len(tokenizer.encode(text)) + 2  # bos, eos


def make_task_corpus(task: str, n_docs: int, length: int, tokenizer, filler, seed: int, out_dir: str | os.PathLike,
                     *, min_length: int | None = None, key_digits: int = 6, num_pairs: int = 8,
                     num_queries: int = 4, value_digits: int = 4) -> dict:
    """Write ``n_docs`` task documents as text files ``out_dir/000000.txt ...``, for
    ``nsa train --data out_dir``.

    Document i is drawn with the seed ``f"{task}:{seed}:{i}"``: a needle at a uniform depth,
    a recall sample, or plain filler (``'lm'``); ``'mix'`` picks one of the three for each
    document, uniformly. Its length in tokens as the training pipeline stores it
    (``[bos] + text + [eos]``) is drawn uniformly from ``[min_length, length]``, so documents
    fit a training ``seq_len`` of ``length`` and questions come at many positions (exact for the
    byte tokenizer, within a few tokens for BPE).

    Args:
        task: ``'needle'``, ``'recall'``, ``'lm'`` or ``'mix'``.
        n_docs: documents to write, >= 1 (``nsa train`` needs >= 2 to split off validation).
        length: the longest document in tokens with ``bos`` and ``eos``, e.g. ``nsa train
            --seq-len``.
        tokenizer: the tokenizer the model trains with (lengths are counted in its tokens).
        filler: text(s) or a :class:`Filler`: the training split of a corpus (keep the
            evaluation's filler apart).
        seed: an int >= 0.
        out_dir: created if missing; it must hold no other files than an earlier output of
            this function (whose ``*.txt`` files are replaced).
        min_length: the shortest document (default ``length // 4``, raised to what a task
            needs).
        key_digits: of the needle's key; num_pairs, num_queries, value_digits: of recall
            (see :func:`needle_sample`, :func:`recall_sample`).
    Returns:
        a JSON-able summary: out_dir, files, tokens (their total as stored), documents per
        task, and ``answers``: per document (in file order) the character offset of its text
        where the answers begin (a needle's key; the first queried key of a recall sample, the
        answers and later queries after it), None for plain filler.
    """
    if task not in TASKS:
        raise ValueError(f"task: expected one of {TASKS}, got {task!r}")
    _check_int("n_docs", n_docs, 1)
    _check_int("length", length, 2)
    _check_int("seed", seed, 0)
    filler = Filler.of(tokenizer, filler)
    kinds = ("needle", "recall", "lm") if task == "mix" else (task,)
    floor = {"lm": 3}  # bos, a token of text, eos
    if "needle" in kinds:
        floor["needle"] = needle_min_length(tokenizer, key_digits) + _doc_tokens(tokenizer, "9" * key_digits) - 1
    if "recall" in kinds:
        # a BPE tokenizer may spend a token or two more on a drawn word than on the probe's
        floor["recall"] = (recall_min_length(tokenizer, num_pairs, num_queries, value_digits)
                           + _doc_tokens(tokenizer, "9" * value_digits) - 1 + 2 * (num_pairs + num_queries))
    lo = max(floor[k] for k in kinds)
    if min_length is None:
        min_length = max(length // 4, lo)
    _check_int("min_length", min_length, 1)
    if length < lo:
        raise ValueError(f"length: {length} tokens cannot hold a {task} document (at least {lo} tokens)")
    if not lo <= min_length <= length:
        raise ValueError(f"min_length: expected an int in [{lo}, length={length}], got {min_length}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pattern = re.compile(r"\d+\.txt")
    others = sorted(p.name for p in out.iterdir() if not pattern.fullmatch(p.name))
    if others:
        raise ValueError(f"out_dir: {out} holds other files than task documents ({', '.join(others[:3])})")
    for p in out.iterdir():
        p.unlink()
    width = max(6, len(str(n_docs - 1)))
    counts = {k: 0 for k in kinds}
    total = 0
    answers = []
    for i in range(n_docs):
        s = f"{task}:{seed}:{i}"
        rng = random.Random(s)
        kind = rng.choice(kinds)
        doc_len = rng.randint(min_length, length)
        depth = rng.random()
        text, answer = _document(kind, tokenizer, filler, doc_len, s, depth, key_digits, num_pairs, num_queries,
                                 value_digits)
        n = _doc_tokens(tokenizer, text)
        if n > length:  # a BPE merge the fit did not foresee: shorten by the excess
            text, answer = _document(kind, tokenizer, filler, doc_len - (n - length), s, depth, key_digits,
                                     num_pairs, num_queries, value_digits)
            n = _doc_tokens(tokenizer, text)
        (out / f"{i:0{width}d}.txt").write_text(text, encoding="utf-8")
        counts[kind] += 1
        total += n
        answers.append(answer)
    return dict(out_dir=str(out), files=n_docs, tokens=total, documents=counts, answers=answers)


def _document(kind, tokenizer, filler, doc_len, seed, depth, key_digits, num_pairs, num_queries, value_digits):
    """The text of a ``doc_len``-token document (bos and eos included) of ``kind``, and the
    character offset where its answers begin (None for filler)."""
    if kind == "lm":
        return filler_text(tokenizer, filler, doc_len - 1, seed), None
    if kind == "needle":
        answer = len(tokenizer.encode("9" * key_digits))
        sample = needle_sample(tokenizer, filler, doc_len - 1 - answer, depth, seed, key_digits)
        # the key's own token count (a BPE tokenizer may encode numbers unevenly)
        extra = len(tokenizer.encode(sample.answer)) - answer
        if extra > 0:
            sample = needle_sample(tokenizer, filler, doc_len - 1 - answer - extra, depth, seed, key_digits)
        return sample.document, len(sample.prompt)
    answer = len(tokenizer.encode("9" * value_digits))
    sample = recall_sample(tokenizer, filler, doc_len - 1 - answer, seed, num_pairs, num_queries, value_digits)
    first = sample.questions[0]
    return sample.document, len(first.prompt) - len(sample.info["queries"][0]) - 1
