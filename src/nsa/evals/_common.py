"""Helpers shared by the evaluators: the model's device, generation, plotting."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def check_lengths(lengths, least: int = 1, option: str = "lengths") -> list[int]:
    """``lengths`` as a non-empty list of ints >= ``least``; a ValueError naming ``option`` else."""
    if isinstance(lengths, (str, bytes)) or not isinstance(lengths, Sequence) or not lengths:
        raise ValueError(f"{option}: expected a non-empty list of token counts, got {lengths!r}")
    for n in lengths:
        if isinstance(n, bool) or not isinstance(n, int) or n < least:
            raise ValueError(f"{option}: every length must be an int >= {least} (the shortest prompt that holds "
                             f"the task), got {n!r}")
    return list(lengths)


def check_depths(depths, option: str = "depths") -> list[float]:
    """``depths`` as a non-empty list of numbers in [0, 1]; a ValueError naming ``option`` else."""
    if isinstance(depths, (str, bytes)) or not isinstance(depths, Sequence) or not depths:
        raise ValueError(f"{option}: expected a non-empty list of numbers in [0, 1], got {depths!r}")
    for d in depths:
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0 <= d <= 1:
            raise ValueError(f"{option}: every depth must be a number in [0, 1], got {d!r}")
    return [float(d) for d in depths]


def check_samples(samples):
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples: expected an int >= 1, got {samples!r}")


def model_device(model) -> torch.device:
    """The device of the model's first parameter (CPU for an object without parameters)."""
    params = getattr(model, "parameters", None)
    if params is None:
        return torch.device("cpu")
    for p in params():
        return p.device
    return torch.device("cpu")


def as_list(ids) -> list[int]:
    return [int(i) for i in (ids.tolist() if hasattr(ids, "tolist") else ids)]


def decode_until_eos(tokenizer, ids) -> str:
    """The text of generated ``ids`` up to the first ``eos``; an id outside the tokenizer's
    vocabulary (a model's vocabulary is padded) reads as U+FFFD."""
    out, run = [], []
    for i in as_list(ids):
        if i == tokenizer.eos_id or i < 0:
            break
        if i >= tokenizer.vocab_size:
            out.append(tokenizer.decode(run) + "\ufffd")
            run = []
        else:
            run.append(i)
    return "".join(out) + tokenizer.decode(run)


def greedy_answers(model, tokenizer, prompts: list, max_new_tokens: int, batch_tokens: int) -> list[str]:
    """Greedy continuations (``model.generate(..., temperature=0, eos_token_id=eos)``) of
    token-id prompts, as text up to ``eos``; prompts go to ``generate`` in groups of at most
    ``batch_tokens`` tokens (at least one prompt each)."""
    texts, group, size = [], [], 0

    def flush():
        outs = model.generate([list(p) for p in group], max_new_tokens=max_new_tokens, temperature=0.0,
                              eos_token_id=tokenizer.eos_id)
        texts.extend(decode_until_eos(tokenizer, o) for o in outs)

    for p in prompts:
        if group and size + len(p) > batch_tokens:
            flush()
            group, size = [], 0
        group.append(p)
        size += len(p)
    if group:
        flush()
    return texts


def import_pyplot():
    """matplotlib.pyplot on the Agg backend, or a RuntimeError naming the extra that installs it."""
    try:
        import matplotlib
    except ImportError:
        raise RuntimeError("plotting needs matplotlib: pip install 'nsa[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
