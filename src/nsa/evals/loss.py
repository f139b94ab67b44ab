"""Held-out loss and bits per byte, overall and per position bucket: does the loss keep
falling as the context grows?

Each document is ``[bos] + encode(text) + [eos]``, cut into sequences of at most ``seq_len``
tokens that overlap by one token, so every token after ``bos`` is predicted exactly once
(positions restart at 0 in every sequence, as in training). The loss of predicting token
``p + 1`` from tokens ``0..p`` of a sequence falls in the bucket holding position ``p``:
``[0, first_bucket)``, then powers of two, ``[64, 128)``, ``[128, 256)``, ... for the default
``first_bucket = 64``.

Bits per byte: the summed loss (nats) of the predicted text tokens (``eos`` is not text)
divided by ``ln 2`` and by the UTF-8 bytes of those tokens' text; with the byte tokenizer a
text token is a byte, so bits per byte is that loss's mean over ``ln 2``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F

from ._common import as_list, import_pyplot, model_device

__all__ = ["evaluate_loss", "plot_loss", "bucket_edges"]

CE_ROWS = 4096  # rows of float32 logits turned into losses at once


def bucket_edges(seq_len: int, first_bucket: int = 64) -> list[int]:
    """Bucket boundaries over the predicting positions ``0 .. seq_len - 2``: ``[0, first,
    2 first, 4 first, ...]``, the last edge ``seq_len - 1`` (the last bucket may be partial)."""
    edges = [0]
    e = first_bucket
    while e < seq_len - 1:
        edges.append(e)
        e *= 2
    return edges + [seq_len - 1]


def _sequences(tokenizer, texts, seq_len, max_tokens):
    """Pieces of the documents (lists of ids), and counts: documents, text tokens and bytes
    predicted."""
    specials = {tokenizer.bos_id, tokenizer.eos_id, getattr(tokenizer, "pad_id", tokenizer.eos_id)}
    pieces, docs, text_tokens, n_bytes, predicted = [], 0, 0, 0, 0
    for text in texts:
        if max_tokens is not None and predicted >= max_tokens:
            break
        ids = [tokenizer.bos_id] + as_list(tokenizer.encode(text)) + [tokenizer.eos_id]
        end = len(ids)
        if max_tokens is not None:
            end = min(end, 1 + max_tokens - predicted)  # tokens 1 .. end-1 are predicted
        for a in range(0, end - 1, seq_len - 1):
            pieces.append(ids[a:min(a + seq_len, end)])
        targets = ids[1:end]
        predicted += len(targets)
        text_tokens += sum(t not in specials for t in targets)
        n_bytes += len(tokenizer.decode(targets).encode("utf-8"))
        docs += 1
    return pieces, docs, text_tokens, n_bytes


@torch.no_grad()
def evaluate_loss(model, tokenizer, texts: Iterable[str], seq_len: int, max_tokens: int | None = None,
                  batch_tokens: int | None = None, first_bucket: int = 64) -> dict:
    """Mean next-token loss overall and per position bucket, and bits per byte.

    Args:
        model: called as ``model(input_ids [1, N], cu_seqlens=int32 [S+1])`` and returning an
            object with ``logits [1, N, V]`` (:class:`nsa.model.LanguageModel`); packed
            sequences never attend across each other.
        tokenizer: the model's tokenizer (``encode``, ``decode``, ``bos_id``, ``eos_id``).
        texts: the evaluation documents' texts, in order (e.g. the run's validation split).
        seq_len: the longest sequence, >= 2 (e.g. the training ``seq_len``).
        max_tokens: stop after this many predicted tokens (the last document is cut); None:
            every document.
        batch_tokens: tokens per forward pass (sequences are packed; default
            ``max(seq_len, 8192)``).
        first_bucket: the first bucket's end, a positive int.
    Returns:
        a JSON-able dict: ``loss`` (nats per predicted token, ``eos`` included, like the
        training run's ``val_loss``), ``bits_per_byte``, ``tokens``, ``text_tokens``, ``bytes``,
        ``documents``, ``sequences`` and ``buckets`` (each ``start``, ``end``, ``tokens``,
        ``loss``; None when empty).
    """
    for name, v, lo in (("seq_len", seq_len, 2), ("first_bucket", first_bucket, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"{name}: expected an int >= {lo}, got {v!r}")
    for name, v in (("max_tokens", max_tokens), ("batch_tokens", batch_tokens)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ValueError(f"{name}: expected None or an int >= 1, got {v!r}")
    batch_tokens = batch_tokens or max(seq_len, 8192)
    pieces, docs, text_tokens, n_bytes = _sequences(tokenizer, texts, seq_len, max_tokens)
    if not pieces:
        raise ValueError("texts: no document to evaluate (empty texts?)")
    edges = bucket_edges(seq_len, first_bucket)
    nb = len(edges) - 1
    sums = torch.zeros(nb, dtype=torch.float64)
    counts = torch.zeros(nb, dtype=torch.float64)
    text_nats = 0.0
    specials = torch.tensor(sorted({tokenizer.bos_id, tokenizer.eos_id, getattr(tokenizer, "pad_id",
                                                                               tokenizer.eos_id)}))
    device = model_device(model)
    i = 0
    while i < len(pieces):
        batch, size = [], 0
        while i < len(pieces) and (not batch or size + len(pieces[i]) <= batch_tokens):
            batch.append(pieces[i])
            size += len(pieces[i])
            i += 1
        ids = torch.tensor([t for p in batch for t in p], dtype=torch.long)
        lens = torch.tensor([len(p) for p in batch])
        cu = torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)]).to(torch.int32)
        pos = torch.cat([torch.arange(n) for n in lens.tolist()])
        targets = torch.full_like(ids, -100)
        targets[:-1] = ids[1:]
        targets[cu[1:].long() - 1] = -100  # the last token of a sequence predicts nothing
        logits = model(ids.view(1, -1).to(device), cu_seqlens=cu.to(device)).logits[0]
        for a in range(0, size, CE_ROWS):
            t = targets[a:a + CE_ROWS]
            keep = t >= 0
            if not bool(keep.any()):
                continue
            rows = logits[a:a + CE_ROWS]
            rows = rows.to(torch.promote_types(rows.dtype, torch.float32))  # float64 stays float64
            nll = F.cross_entropy(rows, t.to(logits.device), ignore_index=-100,
                                  reduction="none").double().cpu()[keep]
            b = torch.bucketize(pos[a:a + CE_ROWS][keep], torch.tensor(edges[1:-1]), right=True)
            sums.index_add_(0, b, nll)
            counts.index_add_(0, b, torch.ones_like(nll))
            text_nats += float(nll[~torch.isin(t[keep], specials)].sum())
    tokens = int(counts.sum())
    buckets = [dict(start=edges[k], end=edges[k + 1], tokens=int(counts[k]),
                    loss=float(sums[k] / counts[k]) if counts[k] else None) for k in range(nb)]
    return dict(loss=float(sums.sum() / tokens), bits_per_byte=text_nats / math.log(2) / n_bytes if n_bytes else None,
                tokens=tokens, text_tokens=text_tokens, bytes=n_bytes, documents=docs, sequences=len(pieces),
                seq_len=seq_len, first_bucket=first_bucket, buckets=buckets)


def plot_loss(result: dict, path, title: str | None = None):
    """Loss per position bucket of :func:`evaluate_loss` (PNG, log-2 position axis). Needs
    matplotlib (``nsa[plot]``)."""
    plt = import_pyplot()
    rows = [b for b in result["buckets"] if b["loss"] is not None]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    x = [(b["start"] + b["end"]) / 2 for b in rows]  # the middle of a bucket's positions
    ax.plot(x, [b["loss"] for b in rows], "o-")
    for xi, b in zip(x, rows):
        ax.annotate(f"{b['tokens']:,}", (xi, b["loss"]), textcoords="offset points", xytext=(0, 6), ha="center",
                    fontsize=7, color="grey")
    ax.axhline(result["loss"], color="grey", lw=0.8, ls=":", label=f"overall {result['loss']:.3f}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("position in the sequence (bucket middle; labels: tokens)")
    ax.set_ylabel("loss (nats / token)")
    ax.legend(fontsize=8)
    bpb = result["bits_per_byte"]
    ax.set_title(title or f"held-out loss by position ({result['tokens']:,} tokens"
                          + (f", {bpb:.3f} bits/byte)" if bpb is not None else ")"), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
