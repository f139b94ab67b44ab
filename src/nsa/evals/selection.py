"""What a trained NSA model's selection does, on pass-key prompts (:mod:`nsa.evals.tasks`):

- **needle selected**: how often a block overlapping the needle sentence is among the blocks the
  last prompt token (the one that must produce the key) selects, per layer and KV head, beside
  the rate a uniformly random choice of the free slots would reach (:func:`selection_chance`);
- **neighbour sharing**: how many selected blocks query t and query t + 1 have in common
  (counted where query t + 1 has more causal blocks than ``num_selected``, i.e. a real choice);
- **gates**: the mean of each branch's gate (compressed, selected, window) per layer, over
  every position and over the last prompt token.

The selection is captured without touching the model's code: a forward hook on every
:class:`nsa.NativeSparseAttention` recomputes the layer's queries, compressed keys and gates with
the layer's own methods and calls :func:`nsa.ops.nsa` with ``return_block_indices=True``
(:func:`capture_selection`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .. import ops
from ..layer import NativeSparseAttention, NSAConfig
from ._common import check_depths, check_lengths, check_samples, import_pyplot, model_device
from .tasks import Filler, needle_min_length, needle_sample

__all__ = ["LayerSelection", "nsa_inputs", "run_with_nsa_hook", "capture_selection", "needle_hits",
           "selection_chance", "neighbour_sharing", "evaluate_selection", "plot_selection"]

BRANCHES = ("cmp", "slc", "win")


@dataclass
class LayerSelection:
    """One NSA layer's selection and gates on one forward pass (CPU tensors).

    Attributes:
        block_indices: int32 ``[B, T, H, num_selected]``, as :func:`nsa.ops.select_blocks`
            returns them (ascending block ids, then -1).
        gates: float32 ``[3, B, T, HQ]``: g_cmp, g_slc, g_win (after their sigmoid).
        config: the layer's :class:`nsa.NSAConfig`.
    """

    block_indices: torch.Tensor
    gates: torch.Tensor
    config: NSAConfig


def nsa_inputs(layer: NativeSparseAttention, x, cu_seqlens=None) -> dict:
    """The tensors ``layer`` passes to :func:`nsa.ops.nsa` on ``x`` (no cache), computed with its
    own pieces, exactly as ``NativeSparseAttention.forward`` computes them.

    Args:
        layer: an NSA layer; x: its input ``[B, T, hidden]`` (packed ``[1, total, hidden]`` with
            ``cu_seqlens``, int32 ``[N+1]``).
    Returns:
        a dict of q ``[B, T, HQ, Dk]``, k_cmp / v_cmp ``[B, Tc, H, Dk|Dv]``, k_slc, v_slc, k_win,
        v_win ``[B, T, H, Dk|Dv]`` and g_cmp, g_slc, g_win ``[B, T, HQ]`` (after their sigmoid),
        all in q's dtype; with the layer's settings (``layer._op_kwargs()``) and ``cu_seqlens``,
        ``nsa.ops.nsa(**inputs, ...)`` is the layer's output before its output projection.
    """
    B, T, _ = x.shape
    if cu_seqlens is not None:
        start = cu_seqlens[:-1].long()
        seq = torch.repeat_interleave(torch.arange(start.numel(), device=x.device),
                                      (cu_seqlens[1:] - cu_seqlens[:-1]).long())
        positions = (torch.arange(T, device=x.device) - start[seq]).unsqueeze(0)
    else:
        positions = torch.arange(T, device=x.device).unsqueeze(0)
    q, branches = layer._project(x, positions)
    k_raw, v_raw = branches[0]
    k_cmp, v_cmp = layer.compress(k_raw, v_raw, cu_seqlens)
    k_s, v_s, k_w, v_w = layer._branch_kv(branches)
    g_cmp, g_slc, g_win = layer._gates(x)
    dt = q.dtype
    return dict(q=q, k_cmp=k_cmp.to(dt), v_cmp=v_cmp.to(dt), k_slc=k_s.to(dt), v_slc=v_s.to(dt), k_win=k_w.to(dt),
                v_win=v_w.to(dt), g_cmp=g_cmp.to(dt), g_slc=g_slc.to(dt), g_win=g_win.to(dt))


def _recompute(layer: NativeSparseAttention, x, cu_seqlens=None):
    """The layer's output on ``x`` (no cache), its block indices and its gates, through its own
    pieces (the same computation as ``NativeSparseAttention.forward``)."""
    inputs = nsa_inputs(layer, x, cu_seqlens)
    o, idx = ops.nsa(**inputs, cu_seqlens=cu_seqlens, return_block_indices=True, **layer._op_kwargs())
    return layer.o_proj(o.flatten(-2)), idx, (inputs["g_cmp"], inputs["g_slc"], inputs["g_win"])


def run_with_nsa_hook(model: torch.nn.Module, input_ids: torch.Tensor, fn,
                      cu_seqlens: torch.Tensor | None = None) -> list[NativeSparseAttention]:
    """Run ``model`` on ``input_ids`` with ``fn(index, layer, x, cu_seqlens)`` called after every
    :class:`nsa.NativeSparseAttention` in it (``index``: the layer's place among them in
    ``model.modules()`` order, the block index of a :class:`nsa.model.LanguageModel`; ``x``: the
    layer's input). A :class:`nsa.model.LanguageModel` is called with ``labels`` so that no
    ``[T, vocab]`` logits are formed. The hooks are removed afterwards; returns the NSA layers.

    Raises:
        ValueError naming ``model`` when it holds no NSA layer; ValueError when a layer is
        called with a decoding cache.
    """
    from ..model import LanguageModel

    layers = [m for m in model.modules() if isinstance(m, NativeSparseAttention)]
    if not layers:
        raise ValueError("model: holds no NativeSparseAttention layer (selection needs attention='nsa')")
    index = {id(m): i for i, m in enumerate(layers)}

    def hook(module, args, kwargs, output):
        x = args[0] if args else kwargs["x"]
        if kwargs.get("cache") is not None:
            raise ValueError("capture: the model was called with a decoding cache")
        fn(index[id(module)], module, x, kwargs.get("cu_seqlens"))

    handles = [m.register_forward_hook(hook, with_kwargs=True) for m in layers]
    try:
        if isinstance(model, LanguageModel):
            model(input_ids, cu_seqlens=cu_seqlens, labels=input_ids)
        else:
            model(input_ids, cu_seqlens=cu_seqlens)
    finally:
        for h in handles:
            h.remove()
    return layers


@torch.no_grad()
def capture_selection(model: torch.nn.Module, input_ids: torch.Tensor,
                      cu_seqlens: torch.Tensor | None = None) -> list[LayerSelection]:
    """Run ``model`` on ``input_ids`` and return, for each :class:`nsa.NativeSparseAttention`
    in it (in forward order), the blocks each query selected and the gates.

    Args:
        model: a module holding NSA layers, called as ``model(input_ids, cu_seqlens=...)``
            (a :class:`nsa.model.LanguageModel` is called with ``labels`` so that no
            ``[T, vocab]`` logits are formed).
        input_ids: ``[B, T]`` (or packed ``[1, total]`` with ``cu_seqlens``) on the model's device.
        cu_seqlens: int32 ``[N+1]`` for packed sequences.
    Returns:
        a list of :class:`LayerSelection`, one per NSA layer call. Memory: ``T * (H *
        num_selected + 3 * HQ) * 4`` bytes per layer.
    """
    records: list[LayerSelection] = []

    def keep(index, module, x, cu):
        _, idx, gates = _recompute(module, x, cu)
        records.append(LayerSelection(idx.cpu(), torch.stack([g.float() for g in gates]).cpu(), module.config))

    run_with_nsa_hook(model, input_ids, keep, cu_seqlens)
    return records


def _span_blocks(span, block_size, last_block):
    a, b = span
    return set(range(a // block_size, min((b - 1) // block_size, last_block) + 1))


def needle_hits(rows: torch.Tensor, span: tuple[int, int], block_size: int) -> torch.Tensor:
    """Whether each row of selected block ids ``[..., S]`` (-1: unused) holds a block that
    overlaps the token span ``[start, end)``. Returns a bool tensor ``[...]``."""
    a, b = span
    lo, hi = a // block_size, (b - 1) // block_size
    return ((rows >= lo) & (rows <= hi)).any(-1)


def selection_chance(t: int, span: tuple[int, int], config: NSAConfig) -> float:
    """Probability that query ``t`` selects a block overlapping ``span`` when its free slots
    (``num_selected`` less the forced initial and local blocks) take causal blocks uniformly at
    random: 1 when the span is in a forced block or every causal block fits."""
    bs, S = config.block_size, config.num_selected
    own = t // bs
    n = own + 1
    if n <= S:
        return 1.0 if span[0] // bs <= own else 0.0
    forced = set(range(min(config.num_initial, n))) | set(range(max(0, own - config.num_local + 1), own + 1))
    needle = _span_blocks(span, bs, own)
    if not needle:
        return 0.0
    if needle & forced:
        return 1.0
    m, f, k = n - len(forced), S - len(forced), len(needle)
    return 1.0 - math.comb(m - k, f) / math.comb(m, f)


def neighbour_sharing(block_indices: torch.Tensor, config: NSAConfig) -> dict:
    """Blocks that query t and query t + 1 both select, over one sequence.

    Args:
        block_indices: int32 ``[T, H, S]`` of one sequence.
        config: the layer's config (block_size, num_selected).
    Returns:
        ``pairs`` (query pairs x heads counted: those where query t + 1 has more causal
        blocks than ``num_selected``), ``shared`` (mean blocks in common) and ``fraction``
        (``shared / num_selected``); None values when no pair has a real choice.
    """
    T = block_indices.shape[0]
    first = config.num_selected * config.block_size  # the first query with more causal blocks than slots
    if T - 1 <= first - 1:
        return dict(pairs=0, shared=None, fraction=None)
    prev = block_indices[first - 1:T - 1].long()  # queries t, t + 1 >= first
    nxt = block_indices[first:T].long()
    common = ((nxt.unsqueeze(-1) == prev.unsqueeze(-2)) & (nxt.unsqueeze(-1) >= 0)).any(-1).sum(-1)  # [P, H]
    shared = float(common.double().mean())
    return dict(pairs=common.numel(), shared=shared, fraction=shared / config.num_selected)


@torch.no_grad()
def evaluate_selection(model: torch.nn.Module, tokenizer, filler: Filler | str | Sequence[str],
                       lengths: Sequence[int], depths: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
                       samples: int = 4, seed: int = 0, key_digits: int = 6) -> dict:
    """Selection statistics on the pass-key prompts of :func:`nsa.evals.needle.evaluate_needle`
    (same seeds: the same prompts), one prompt per forward pass.

    Args:
        model: a module with NSA layers (see :func:`capture_selection`).
        tokenizer, filler, lengths, depths, samples, seed, key_digits: as in
            :func:`nsa.evals.needle.evaluate_needle`.
    Returns:
        a JSON-able dict: ``needle_selected`` ``[layer][kv head]`` (share of prompts whose
        last token selects a needle block), ``needle_selected_mean``, ``chance`` (its mean
        under random selection), ``needle_selected_grid`` ``[length][depth]`` (mean over
        layers and heads), ``shared_blocks`` / ``shared_fraction`` per layer, ``gates`` and
        ``gates_last`` per layer (``{cmp, slc, win}``: mean over positions and query heads,
        and at the last prompt token), the layers' selection settings.
    """
    lengths = check_lengths(lengths, needle_min_length(tokenizer, key_digits))
    depths = check_depths(depths)
    check_samples(samples)
    filler = Filler.of(tokenizer, filler)
    device = model_device(model)
    hits = None  # [layers, H] counts
    grid = [[0.0] * len(depths) for _ in lengths]
    chances, n = [], 0
    shared_sum = share_pairs = None
    gate_sum = gate_last = None
    configs = None
    for li, L in enumerate(lengths):
        for di, d in enumerate(depths):
            for i in range(samples):
                q = needle_sample(tokenizer, filler, L, d, f"needle:{seed}:{L}:{d}:{i}", key_digits).questions[0]
                ids = torch.tensor([q.prompt_ids], dtype=torch.long, device=device)
                recs = capture_selection(model, ids)
                if hits is None:
                    configs = [r.config for r in recs]
                    hits = torch.zeros(len(recs), recs[0].block_indices.shape[2], dtype=torch.float64)
                    shared_sum = [0.0] * len(recs)
                    share_pairs = [0] * len(recs)
                    gate_sum = torch.zeros(len(recs), 3, dtype=torch.float64)
                    gate_last = torch.zeros(len(recs), 3, dtype=torch.float64)
                t = len(q.prompt_ids) - 1
                sample_hits = []
                for k, r in enumerate(recs):
                    h = needle_hits(r.block_indices[0, t], q.span, r.config.block_size).double()
                    hits[k] += h
                    sample_hits.append(h.mean())
                    s = neighbour_sharing(r.block_indices[0], r.config)
                    if s["pairs"]:
                        shared_sum[k] += s["shared"] * s["pairs"]
                        share_pairs[k] += s["pairs"]
                    gate_sum[k] += r.gates[:, 0].double().mean((1, 2))
                    gate_last[k] += r.gates[:, 0, t].double().mean(-1)
                grid[li][di] += float(torch.stack(sample_hits).mean()) / samples
                chances.append(sum(selection_chance(t, q.span, c) for c in configs) / len(configs))
                n += 1
    per_head = (hits / n).tolist()
    shared = [shared_sum[k] / share_pairs[k] if share_pairs[k] else None for k in range(len(configs))]
    return dict(
        lengths=lengths, depths=depths, samples=samples, seed=seed, key_digits=key_digits,
        layers=len(configs), kv_heads=hits.shape[1],
        selection=[dict(block_size=c.block_size, num_selected=c.num_selected, num_initial=c.num_initial,
                        num_local=c.num_local) for c in configs],
        needle_selected=per_head, needle_selected_mean=float(hits.sum() / (n * hits.numel())),
        chance=sum(chances) / len(chances), needle_selected_grid=grid,
        needle_selected_by_layer=[sum(r) / len(r) for r in per_head],
        shared_blocks=shared,
        shared_fraction=[None if s is None else s / c.num_selected for s, c in zip(shared, configs)],
        gates=[dict(zip(BRANCHES, (g / n).tolist())) for g in gate_sum],
        gates_last=[dict(zip(BRANCHES, (g / n).tolist())) for g in gate_last])


def plot_selection(result: dict, path, title: str | None = None):
    """Three panels of :func:`evaluate_selection`'s result (PNG): needle selected per layer x
    KV head (with chance), blocks shared by neighbouring queries per layer, mean gates per
    branch and layer. Needs matplotlib (``nsa[plot]``)."""
    plt = import_pyplot()
    layers = list(range(result["layers"]))
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    ax = axes[0]
    im = ax.imshow([list(r) for r in zip(*result["needle_selected"])], vmin=0, vmax=1, cmap="viridis",
                   aspect="auto")
    ax.set_xticks(layers)
    ax.set_yticks(range(result["kv_heads"]))
    ax.set_xlabel("layer")
    ax.set_ylabel("KV head")
    for j, row in enumerate(result["needle_selected"]):
        for h, v in enumerate(row):
            ax.text(j, h, f"{v:.2f}", ha="center", va="center", fontsize=7, color="w" if v < 0.6 else "k")
    fig.colorbar(im, ax=ax)
    ax.set_title(f"needle block selected by the last token\nmean {result['needle_selected_mean']:.2f}, "
                 f"random selection {result['chance']:.2f}", fontsize=9)
    ax = axes[1]
    vals = [float("nan") if s is None else s for s in result["shared_blocks"]]
    ax.bar(layers, vals)
    for j, c in enumerate(result["selection"]):
        ax.hlines(c["num_selected"], j - 0.4, j + 0.4, colors="grey", linestyles=":")
    ax.set_xticks(layers)
    ax.set_xlabel("layer")
    ax.set_ylabel("blocks")
    ax.set_title("blocks shared by queries t and t+1\n(dotted: blocks selected)", fontsize=9)
    ax = axes[2]
    w = 0.27
    for b, name in enumerate(BRANCHES):
        ax.bar([j + (b - 1) * w for j in layers], [g[name] for g in result["gates"]], w, label=name)
    ax.set_xticks(layers)
    ax.set_ylim(0, 1)
    ax.set_xlabel("layer")
    ax.set_ylabel("mean gate")
    ax.legend(fontsize=8)
    ax.set_title("gates per branch (all positions)", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
