"""Retrieval accuracy: pass-key needles over a grid of context lengths x depths, and
multi-query associative recall over context lengths (tasks of :mod:`nsa.evals.tasks`).

A question counts as answered when the greedy continuation (``model.generate(prompts,
max_new_tokens=answer tokens + 2, temperature=0, eos_token_id=eos)``), read up to ``eos``,
starts with the answer. The evaluators take anything with that ``generate`` (a
:class:`nsa.model.LanguageModel`, or a stand-in whose answers are known: a perfect one scores
1, a random one the chance level reported beside the accuracy).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ._common import check_depths, check_lengths, check_samples, greedy_answers, import_pyplot
from .tasks import Filler, needle_min_length, needle_sample, recall_min_length, recall_sample

__all__ = ["evaluate_needle", "evaluate_recall", "plot_needle", "plot_recall"]

EXTRA_TOKENS = 2  # generated beyond the answer's own tokens
EXAMPLES = 3  # wrong and right answers kept per grid cell


def _score(model, tokenizer, questions, batch_tokens):
    """(correct flags, generated texts) of a list of :class:`~nsa.evals.tasks.Question`."""
    n_new = max(len(tokenizer.encode(q.answer)) for q in questions) + EXTRA_TOKENS
    texts = greedy_answers(model, tokenizer, [q.prompt_ids for q in questions], n_new, batch_tokens)
    return [t.startswith(q.answer) for t, q in zip(texts, questions)], texts


def _examples(questions, texts, correct):
    rows = list(zip(questions, texts, correct))[:EXAMPLES]
    return [dict(answer=q.answer, generated=t, correct=c) for q, t, c in rows]


@torch.no_grad()
def evaluate_needle(model, tokenizer, filler: Filler | str | Sequence[str], lengths: Sequence[int],
                    depths: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0), samples: int = 10, seed: int = 0,
                    key_digits: int = 6, batch_tokens: int = 65536) -> dict:
    """Pass-key accuracy over ``lengths x depths``.

    Sample i of cell (length, depth) is :func:`~nsa.evals.tasks.needle_sample` with the seed
    ``f"needle:{seed}:{length}:{depth}:{i}"``: the same prompts for every model.

    Args:
        model: anything with ``generate(prompts: list[list[int]], max_new_tokens, temperature,
            eos_token_id) -> list of id sequences`` (:meth:`nsa.model.LanguageModel.generate`).
        tokenizer: the model's tokenizer (``encode``, ``decode``, ``bos_id``, ``eos_id``,
            ``vocab_size``).
        filler: text(s) or a :class:`~nsa.evals.tasks.Filler` (e.g. the validation documents).
        lengths: prompt lengths in tokens (``bos`` included), each at least
            :func:`~nsa.evals.tasks.needle_min_length`.
        depths: needle positions as fractions of the filler, in [0, 1].
        samples: prompts per cell.
        seed: an int.
        key_digits: the key's digits: chance accuracy is ``10 ** -key_digits``.
        batch_tokens: prompt tokens per ``generate`` call (at least one prompt).
    Returns:
        a JSON-able dict: ``accuracy`` (``[len(lengths)][len(depths)]``), ``accuracy_by_length``,
        ``accuracy_by_depth``, ``mean_accuracy``, ``chance``, the grid, ``cells`` (per cell:
        correct, total, a few examples of what was generated).
    """
    lengths = check_lengths(lengths, needle_min_length(tokenizer, key_digits))
    depths = check_depths(depths)
    check_samples(samples)
    filler = Filler.of(tokenizer, filler)
    acc, cells = [], []
    for L in lengths:
        row = []
        for d in depths:
            qs = [needle_sample(tokenizer, filler, L, d, f"needle:{seed}:{L}:{d}:{i}", key_digits).questions[0]
                  for i in range(samples)]
            ok, texts = _score(model, tokenizer, qs, batch_tokens)
            row.append(sum(ok) / len(ok))
            cells.append(dict(length=L, depth=d, correct=sum(ok), total=len(ok),
                              examples=_examples(qs, texts, ok)))
        acc.append(row)
    return dict(task="needle", lengths=lengths, depths=depths, samples=samples, seed=seed, key_digits=key_digits,
                chance=10.0 ** -key_digits, accuracy=acc,
                accuracy_by_length=[sum(r) / len(r) for r in acc],
                accuracy_by_depth=[sum(r[j] for r in acc) / len(acc) for j in range(len(depths))],
                mean_accuracy=sum(map(sum, acc)) / (len(lengths) * len(depths)), cells=cells)


@torch.no_grad()
def evaluate_recall(model, tokenizer, filler: Filler | str | Sequence[str], lengths: Sequence[int],
                    samples: int = 10, seed: int = 0, num_pairs: int = 8, num_queries: int = 4,
                    value_digits: int = 4, batch_tokens: int = 65536) -> dict:
    """Multi-query associative recall accuracy per context length.

    Sample i of length L is :func:`~nsa.evals.tasks.recall_sample` with the seed
    ``f"recall:{seed}:{L}:{i}"``; each of its ``num_queries`` questions is asked on its own
    (its prompt holds the correct earlier answers).

    Args:
        model, tokenizer, filler, samples, seed, batch_tokens: as in :func:`evaluate_needle`.
        lengths: tokens (``bos`` included) of a sample's whole context, each at least
            :func:`~nsa.evals.tasks.recall_min_length`.
        num_pairs, num_queries, value_digits: as in :func:`~nsa.evals.tasks.recall_sample`;
            chance accuracy is ``10 ** -value_digits``.
    Returns:
        a JSON-able dict: ``accuracy`` per length (over questions), ``all_correct`` per length
        (share of samples whose every question was answered), ``mean_accuracy``, ``chance``,
        ``cells`` with examples.
    """
    lengths = check_lengths(lengths, recall_min_length(tokenizer, num_pairs, num_queries, value_digits))
    check_samples(samples)
    filler = Filler.of(tokenizer, filler)
    acc, whole, cells = [], [], []
    for L in lengths:
        drawn = [recall_sample(tokenizer, filler, L, f"recall:{seed}:{L}:{i}", num_pairs, num_queries, value_digits)
                 for i in range(samples)]
        qs = [q for s in drawn for q in s.questions]
        ok, texts = _score(model, tokenizer, qs, batch_tokens)
        acc.append(sum(ok) / len(ok))
        whole.append(sum(all(ok[i * num_queries:(i + 1) * num_queries]) for i in range(samples)) / samples)
        cells.append(dict(length=L, correct=sum(ok), total=len(ok), examples=_examples(qs, texts, ok)))
    return dict(task="recall", lengths=lengths, samples=samples, seed=seed, num_pairs=num_pairs,
                num_queries=num_queries, value_digits=value_digits, chance=10.0 ** -value_digits, accuracy=acc,
                all_correct=whole, mean_accuracy=sum(acc) / len(acc), cells=cells)


def plot_needle(result: dict, path, title: str | None = None):
    """Heatmap PNG of :func:`evaluate_needle`'s accuracy: depth (rows) x context length
    (columns), each cell annotated. Needs matplotlib (``nsa[plot]``)."""
    plt = import_pyplot()
    acc = [list(r) for r in zip(*result["accuracy"])]  # [depth][length]
    lengths, depths = result["lengths"], result["depths"]
    fig, ax = plt.subplots(figsize=(1.1 * len(lengths) + 2.5, 0.6 * len(depths) + 1.8))
    im = ax.imshow(acc, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(lengths)), [_tokens(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    for i, row in enumerate(acc):
        for j, v in enumerate(row):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8)
    fig.colorbar(im, ax=ax, label="accuracy")
    ax.set_title(title or f"pass key retrieval ({result['samples']} per cell, mean {result['mean_accuracy']:.2f})",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_recall(result: dict, path, title: str | None = None):
    """Accuracy of :func:`evaluate_recall` against context length (PNG). Needs matplotlib."""
    plt = import_pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    x = result["lengths"]
    ax.plot(x, result["accuracy"], "o-", label="per question")
    ax.plot(x, result["all_correct"], "s--", label="every question of a sample")
    ax.axhline(result["chance"], color="grey", lw=0.8, ls=":", label="chance")
    if len(x) > 1 and min(x) > 0 and max(x) / min(x) >= 4:
        ax.set_xscale("log", base=2)
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("accuracy")
    ax.legend(fontsize=8)
    ax.set_title(title or f"associative recall ({result['num_pairs']} pairs, {result['num_queries']} queries)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _tokens(n: int) -> str:
    if n >= 1024 and n % 1024 == 0:
        return f"{n // 1024}k"
    return str(n)

