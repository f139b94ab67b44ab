"""The retrieval tasks as training data: ``nsa train --task needle|recall|mix``.

:func:`task_stores` turns the documents that ``--data`` names (or the default corpus) into
seeded task documents (:func:`nsa.evals.tasks.make_task_corpus`) and their token stores:

1. the filler documents are split into training and validation files
   (:func:`nsa.data.split_documents`), so that validation questions sit in text the model has
   not trained on; each side reads two characters per token of its documents (at least
   ``MIN_FILLER_CHARS``, at most ``FILLER_CHARS``), in a seeded order;
2. ``task_documents(run)`` training documents (enough for one pass over the run, at most
   ``MAX_DOCUMENTS``) and enough validation documents for the evaluation batches are written
   under ``cache_dir/task-<key>/{train,val}/``, each at most ``seq_len`` tokens as stored
   (``[bos] + text + [eos]``), with ``corpus.json`` beside them: the key hashes everything they
   depend on (task, sizes, seed, tokenizer, the filler files' paths, sizes and mtimes), so a
   resumed run or a second model of a comparison finds the same documents;
3. both directories become token stores (:class:`nsa.data.TokenStore`, cached as usual).

``corpus.json`` also holds, per document, the token position where its answers begin
(``-1`` for plain filler): :class:`nsa.data.DocumentBatches` puts the loss on the answers
only from there when asked (``--loss-on answers``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np

from ..data import TokenStore, find_documents, read_text, split_documents
from .tasks import TASKS, Filler, make_task_corpus

__all__ = ["task_stores", "filler_texts", "MAX_DOCUMENTS", "FILLER_CHARS"]

MAX_DOCUMENTS = 50_000  # training documents generated at most (a longer run takes several epochs)
FILLER_CHARS = 1 << 20  # filler text read per side (training, validation) at most: 2 characters
MIN_FILLER_CHARS = 1 << 17  # per token of the side's documents, and at least this many
CORPUS_FILE = "corpus.json"
_FORMAT = 1


def filler_texts(docs, chars: int, seed) -> list[str]:
    """Texts of ``docs`` in an order seeded by ``seed``, until ``chars`` characters are read."""
    order = list(docs)
    random.Random(f"filler:{seed}").shuffle(order)
    texts, n = [], 0
    for path in order:
        texts.append(read_text(path))
        n += len(texts[-1])
        if n >= chars:
            break
    return texts


def _key(task, seq_len, n_train, n_val, seed, tokenizer, train_docs, val_docs, settings) -> str:
    h = hashlib.sha256(json.dumps(dict(format=_FORMAT, task=task, seq_len=seq_len, n_train=n_train, n_val=n_val,
                                       seed=seed, tokenizer=tokenizer.fingerprint, settings=settings,
                                       filler_chars=[MIN_FILLER_CHARS, FILLER_CHARS]), sort_keys=True).encode())
    for side in (train_docs, val_docs):
        h.update(b"\0side\0")
        for path in side:
            st = Path(path).stat()
            h.update(f"{Path(path).resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:32]


def _token_starts(tokenizer, directory: Path, answers: list) -> list[int]:
    """Per document, the position in ``[bos] + encode(text) + [eos]`` of the first answer token
    (-1: none). A prompt ends where the tokenizer cuts anyway, so the prefix's tokens are the
    document's first tokens."""
    files = sorted(directory.glob("*.txt"))
    out = []
    for path, a in zip(files, answers):
        out.append(-1 if a is None else 1 + len(tokenizer.encode(read_text(path)[:a])))
    return out


def task_stores(task: str, data, tokenizer, cache_dir, seq_len: int, train_tokens: int, eval_tokens: int,
                val_fraction: float = 0.05, seed: int = 0, *, progress: bool = False, **settings):
    """Training and validation token stores of ``task`` documents (see the module docstring).

    Args:
        task: ``'needle'``, ``'recall'`` or ``'mix'`` (``'lm'`` is plain text: use
            :func:`nsa.data.load_corpus`).
        data: ``--data`` paths of the filler documents (None: the default corpus).
        tokenizer: the run's tokenizer; cache_dir: where the documents and stores are kept.
        seq_len: the longest document in tokens (with ``bos`` and ``eos``).
        train_tokens: tokens the run trains on (documents for one pass, at most
            ``MAX_DOCUMENTS``); eval_tokens: tokens of the validation batches.
        val_fraction, seed: the filler's split and the documents' seed.
        settings: ``key_digits``, ``num_pairs``, ``num_queries``, ``value_digits`` of
            :func:`nsa.evals.tasks.make_task_corpus`.
    Returns:
        ``(train_store, val_store, train_loss_from, val_loss_from)``: the stores and, per
        document, the token position where its answers begin (int64 arrays, -1 for filler).
    """
    if task not in TASKS or task == "lm":
        raise ValueError(f"--task: expected one of {[t for t in TASKS if t != 'lm']} for task documents, "
                         f"got {task!r}")
    docs = find_documents(data)
    train_docs, val_docs = split_documents(docs, val_fraction, seed)
    mean_len = (max(seq_len // 4, 1) + seq_len) / 2
    n_train = min(MAX_DOCUMENTS, max(16, math.ceil(1.05 * train_tokens / mean_len)))
    n_val = min(MAX_DOCUMENTS, max(8, math.ceil(1.5 * eval_tokens / mean_len)))
    root = Path(cache_dir) / f"task-{_key(task, seq_len, n_train, n_val, seed, tokenizer, train_docs, val_docs, settings)}"
    if not (root / CORPUS_FILE).is_file():
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{root.name}-", dir=cache_dir))
        try:
            meta = {}
            for side, files, n, s in (("train", train_docs, n_train, seed), ("val", val_docs, n_val, seed + 1)):
                chars = min(FILLER_CHARS, max(MIN_FILLER_CHARS, 2 * math.ceil(n * mean_len)))
                filler = Filler(tokenizer, filler_texts(files, chars, f"{side}:{seed}"))
                try:
                    info = make_task_corpus(task, n, seq_len, tokenizer, filler, s, tmp / side, **settings)
                except ValueError as e:
                    if str(e).startswith("length:"):
                        raise ValueError(f"--seq-len: {str(e)[len('length: '):]}") from None
                    raise
                meta[side] = dict(files=info["files"], tokens=info["tokens"], documents=info["documents"],
                                  loss_from=_token_starts(tokenizer, tmp / side, info["answers"]))
            (tmp / CORPUS_FILE).write_text(json.dumps(dict(task=task, seq_len=seq_len, seed=seed, **meta)))
            try:
                os.rename(tmp, root)
            except OSError:
                if not (root / CORPUS_FILE).is_file():  # not a concurrent builder that finished first
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    meta = json.loads((root / CORPUS_FILE).read_text())
    out = []
    for side in ("train", "val"):
        files = sorted((root / side).glob("*.txt"))
        out.append(TokenStore.build(files, tokenizer, cache_dir, progress=progress))
    return (out[0], out[1], np.asarray(meta["train"]["loss_from"], dtype=np.int64),
            np.asarray(meta["val"]["loss_from"], dtype=np.int64))
