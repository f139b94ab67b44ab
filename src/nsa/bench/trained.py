"""The kernels on real selections: `nsa bench --from-checkpoint DIR`.

Random inputs make every query choose its blocks independently of its neighbours; a trained
model's queries do not, and the selected-attention kernel, which walks the union of the blocks
chosen by a tile of consecutive queries, may run faster (or slower) on them. This module gives
the benchmark the inputs a trained model's layers give :func:`nsa.ops.nsa`:

1. **Capture** (:func:`capture_inputs`): the model runs once on text (``torch.no_grad``); a
   forward hook on each chosen :class:`nsa.NativeSparseAttention` recomputes, with the layer's own
   methods (:func:`nsa.evals.selection.nsa_inputs`), the tensors it passes to the op (q, k_cmp,
   v_cmp, k_slc, v_slc, k_win, v_win, g_cmp, g_slc, g_win) and records its NSA settings.
2. **Replay** (:func:`replay`): a model smaller than the benchmarked shape (fewer heads, smaller
   head dims) is mapped onto it without changing what is selected: KV heads repeated, query
   heads repeated within their group (each group's block scores are then a positive multiple of
   the model's), gates repeated like the query heads, head dims zero-padded (every score and
   every output element unchanged; the extra output dims are zero), and the softmax scale kept
   at the model's ``Dk_model ** -0.5``, passed to the ops as ``scale``.
3. **Text** (:func:`text_tokens`): the run's own held-out documents, the validation side of its
   documents as the trainer split them (:func:`nsa.data.split_documents` with the run's
   ``data``, ``val_fraction`` and ``seed``; the default corpus when the run used it or the
   directory holds no run config), read in a seeded order (:func:`nsa.evals.task_data.filler_texts`),
   each document as ``[bos] + text + [eos]`` as the trainer stores it, concatenated into one
   long stream; or ``--text FILE``. Sequence b of a batch is the stream's tokens
   ``[b*T, (b+1)*T)``. A text shorter than the batch is repeated (said in the output: the
   repeat is a copy the model may attend to). The model runs at the benchmark's T whatever its
   training context (``max_seq_len``): RoPE has no table, so a model trained on 4k tokens runs
   at 64k; how well it attends that far is what it learned, and part of what is measured.
4. **Statistics** (:func:`selection_stats`): per layer, the mean number of distinct blocks the
   64 consecutive queries of a tile select per KV head (what the selected-attention kernel walks,
   at most ``64 * num_selected``) and the blocks queries t and t + 1 share
   (:func:`nsa.evals.selection.neighbour_sharing`), beside the same on standard-normal q and
   k_cmp of the same shape (the distribution of the benchmark's random inputs).

One capture serves every case of a run: :meth:`TrainedSource.capture` keeps it per
(source, device) in a module cache, at the largest batch and length asked so far (``nsa bench``
captures at the largest of its cases before it runs any); a case of fewer tokens takes the first
ones. That is the capture at the shorter length, not an approximation of it: every captured
tensor at position t depends only on tokens ``<= t`` (projections, RoPE at absolute positions,
compressed token i covers positions ``[i*stride, i*stride + kernel_size)``), so the first T'
positions of a capture at T are the capture at T' (up to the rounding of matrix products of a
different size). The correctness twin of a trained case (:func:`nsa.bench.harness.check_train`,
``T = min(T, 2048)``, at most 2 sequences) therefore checks the kernels against the reference on
the trained inputs the timed case runs, cut to the twin's length; the chunk check of a longer
case runs the full-length trained inputs.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import types
from pathlib import Path

import torch

from .. import ops
from ..layer import NativeSparseAttention
from ..ops.utils import num_compressed

__all__ = ["TENSORS", "SETTINGS", "TILE", "capture_inputs", "replay", "check_replayable", "text_tokens",
           "tile_blocks", "selection_stats", "TrainedSource", "open_source", "default_layers", "trained_cases",
           "selection_report", "format_report"]

TENSORS = ("q", "k_cmp", "v_cmp", "k_slc", "v_slc", "k_win", "v_win", "g_cmp", "g_slc", "g_win")
SETTINGS = ("kernel_size", "stride", "block_size", "num_selected", "num_initial", "num_local", "window_size", "scale")
TILE = 64  # consecutive queries whose blocks the selected-attention kernel walks together
_CMP = ("k_cmp", "v_cmp")
_GATES = ("g_cmp", "g_slc", "g_win")


# ---------------------------------------------------------------------------------------------
# Capture and replay
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def capture_inputs(model: torch.nn.Module, ids: torch.Tensor, layers=None) -> dict[int, dict]:
    """What each NSA layer of ``model`` passes to :func:`nsa.ops.nsa` on ``ids``.

    Args:
        model: a :class:`nsa.model.LanguageModel` (e.g. from :func:`nsa.train.load_checkpoint_model`)
            or any module holding :class:`nsa.NativeSparseAttention` layers, called on ``ids``.
        ids: int64 token ids ``[B, T]`` on the model's device.
        layers: indices of the NSA layers to capture (their order in ``model.modules()``: the
            block index of a LanguageModel); None: all.
    Returns:
        ``{layer: kwargs}``: the tensors of :data:`TENSORS` (q ``[B, T, HQ, Dk]``, k_cmp / v_cmp
        ``[B, Tc, H, Dk|Dv]``, k/v of the selected and window branches ``[B, T, H, Dk|Dv]``, gates
        ``[B, T, HQ]``; the layer's dtype, no grad) and the layer's NSA settings (kernel_size,
        stride, block_size, num_selected, num_initial, num_local, window_size; ``scale`` only
        where the layer passes one): ``nsa.ops.nsa(**kwargs)`` is the layer's attention output
        before its output projection.
    Raises:
        ValueError naming ``model`` (no NSA layer) or ``layers`` (an index out of range).
    """
    from ..evals.selection import nsa_inputs, run_with_nsa_hook

    n = sum(isinstance(m, NativeSparseAttention) for m in model.modules())
    if n == 0:
        raise ValueError("model: holds no NativeSparseAttention layer (trained inputs need attention='nsa')")
    want = set(range(n)) if layers is None else set(layers)
    bad = sorted(i for i in want if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n)
    if bad:
        raise ValueError(f"layers: {bad} out of range; the model has {n} NSA layers (0..{n - 1})")
    out = {}

    def keep(index, layer, x, cu_seqlens):
        if index in want:
            kw = {k: v for k, v in layer._op_kwargs().items() if k in SETTINGS}
            out[index] = {**nsa_inputs(layer, x, cu_seqlens), **kw}

    run_with_nsa_hook(model, ids, keep)
    return dict(sorted(out.items()))


def split(captured: dict) -> tuple[dict, dict]:
    """A layer's capture as (tensors of :data:`TENSORS`, settings)."""
    return ({n: captured[n] for n in TENSORS},
            {k: captured[k] for k in SETTINGS if captured.get(k) is not None})


def check_replayable(model_shape, HQ: int, H: int, Dk: int, Dv: int):
    """Whether inputs of ``model_shape = (HQ_m, H_m, Dk_m, Dv_m)`` can be replayed at
    ``(HQ, H, Dk, Dv)`` (see :func:`replay`); a ValueError naming the argument if not."""
    hq_m, h_m, dk_m, dv_m = model_shape
    for name, v in (("HQ", HQ), ("H", H), ("Dk", Dk), ("Dv", Dv)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}: expected a positive int, got {v!r}")
    if HQ % H:
        raise ValueError(f"HQ: must be a multiple of H ({H}), got {HQ}")
    if H % h_m:
        raise ValueError(f"H: {H} KV heads are not a multiple of the model's {h_m} (KV heads are repeated)")
    g, g_m = HQ // H, hq_m // h_m
    if g % g_m:
        raise ValueError(f"HQ: the group size HQ/H = {HQ}/{H} = {g} is not a multiple of the model's "
                         f"{hq_m}/{h_m} = {g_m} (query heads are repeated within their group)")
    if Dk < dk_m:
        raise ValueError(f"Dk: {Dk} is smaller than the model's key head dim {dk_m} (head dims are zero-padded)")
    if Dv < dv_m:
        raise ValueError(f"Dv: {Dv} is smaller than the model's value head dim {dv_m} (head dims are zero-padded)")


def replay(x: dict, HQ: int, H: int, Dk: int, Dv: int, settings: dict) -> tuple[dict, dict]:
    """Captured inputs of a model with HQ_m query heads, H_m KV heads and head dims Dk_m / Dv_m,
    mapped onto ``(HQ, H, Dk, Dv)`` without changing what is selected or what is attended.

    KV head j of the result is the model's KV head ``j // (H / H_m)``; query head i (group
    ``i // G``, place ``i % G`` with ``G = HQ / H``) is the model's query ``i % G // (G / G_m)``
    of that KV head's model group; gates follow the query heads; q, k and v are zero-padded to
    Dk and Dv. A group's block scores (the sum of its query heads' compressed-attention
    probabilities) are then ``G / G_m`` times the model's, so the top-n, and every branch's
    output in the model's Dv dims, are the model's; the scale stays the model's.

    Args:
        x: the tensors of :data:`TENSORS` (from :func:`capture_inputs`), any batch and length.
        HQ, H, Dk, Dv: the target shape: ``H`` a multiple of H_m, ``HQ / H`` a multiple of
            HQ_m / H_m, ``Dk >= Dk_m``, ``Dv >= Dv_m``.
        settings: the layer's NSA settings (``scale`` None or absent: ``Dk_m ** -0.5``, the ops'
            default at the model's head dim).
    Returns:
        ``(tensors, settings)``: new tensors (x's dtype and device) and the settings with
        ``scale`` set to the model's, so that ``nsa.ops.nsa(**tensors, **settings)[..., :Dv_m]``
        equals the model's output with each query head repeated as above.
    Raises:
        ValueError naming ``HQ``, ``H``, ``Dk`` or ``Dv`` for a shape that cannot be replayed.
    """
    B, T, hq_m, dk_m = x["q"].shape
    h_m, dv_m = x["v_slc"].shape[2], x["v_slc"].shape[3]
    check_replayable((hq_m, h_m, dk_m, dv_m), HQ, H, Dk, Dv)
    r, g_m = H // h_m, hq_m // h_m
    s = (HQ // H) // g_m

    def query_heads(t):  # [B, T, HQ_m, ...] -> [B, T, HQ, ...]
        t = t.unflatten(2, (h_m, g_m)).repeat_interleave(s, dim=3).unsqueeze(3)  # [B, T, H_m, 1, G, ...]
        return t.expand(*t.shape[:3], r, *t.shape[4:]).flatten(2, 4)

    def pad(t, d):
        return torch.nn.functional.pad(t, (0, d - t.shape[-1]))

    out = {"q": pad(query_heads(x["q"]), Dk)}
    for n in ("k_cmp", "k_slc", "k_win"):
        out[n] = pad(x[n].repeat_interleave(r, dim=2), Dk)
    for n in ("v_cmp", "v_slc", "v_win"):
        out[n] = pad(x[n].repeat_interleave(r, dim=2), Dv)
    for n in _GATES:
        out[n] = query_heads(x[n]).contiguous()
    settings = dict(settings)
    if settings.get("scale") is None:
        settings["scale"] = dk_m ** -0.5
    return {n: out[n] for n in TENSORS}, settings


def _cut(x: dict, B: int, T: int, kernel_size: int, stride: int) -> dict:
    """The first B sequences and T positions of captured tensors (exact: see the module docstring)."""
    tc = num_compressed(T, kernel_size, stride)
    return {n: t[:B, :(tc if n in _CMP else T)] for n, t in x.items()}


# ---------------------------------------------------------------------------------------------
# Selection statistics
# ---------------------------------------------------------------------------------------------
def tile_blocks(block_indices: torch.Tensor, tile: int = TILE) -> torch.Tensor:
    """Distinct blocks selected by each tile of ``tile`` consecutive queries, per KV head.

    Args:
        block_indices: int ``[B, T, H, S]`` (ascending ids, -1 unused), as
            :func:`nsa.ops.select_blocks` returns them.
    Returns:
        int64 ``[B, ceil(T / tile), H]``: the size of the union of the tile's blocks (the last
        tile may be partial).
    """
    B, T, H, S = block_indices.shape
    n = -(-T // tile)
    x = torch.nn.functional.pad(block_indices.long(), (0, 0, 0, 0, 0, n * tile - T), value=-1)
    x = x.view(B, n, tile, H, S).permute(0, 1, 3, 2, 4).reshape(B, n, H, tile * S).sort(-1).values
    new = (x[..., 1:] != x[..., :-1]) & (x[..., 1:] >= 0)  # sorted: -1 first, then each id's first copy
    return new.sum(-1) + (x[..., 0] >= 0)


def _block_indices(q, k_cmp, settings, backend):
    kw = {k: settings[k] for k in ("kernel_size", "stride", "block_size", "num_selected", "num_initial",
                                   "num_local")}
    scale = settings.get("scale")
    # the lse does not depend on the values: k_cmp stands in for v_cmp
    _, lse = ops.compressed_attention(q, k_cmp, k_cmp, kw["kernel_size"], kw["stride"], scale, backend=backend)
    return ops.select_blocks(q, k_cmp, lse, **kw, scale=scale, backend=backend)


@torch.no_grad()
def selection_stats(q: torch.Tensor, k_cmp: torch.Tensor, settings: dict, tile: int = TILE,
                    backend: str | None = "auto") -> dict:
    """What the selection of ``q`` over ``k_cmp`` costs the selected-attention kernel.

    Args:
        q ``[B, T, HQ, Dk]``, k_cmp ``[B, Tc, H, Dk]``: one layer's inputs (or random ones).
        settings: the NSA settings (:data:`SETTINGS`); tile: queries per tile; backend: of the
            selection ops (default 'auto': Triton on CUDA, the chunked PyTorch backend on CPU).
    Returns:
        ``tile_blocks``: mean distinct blocks per tile and KV head (:func:`tile_blocks`, every
        tile), ``most``: what a tile could select at most on average (its queries' selections
        all different), ``shared``: mean blocks queries t and t + 1 both select (where t + 1
        has more causal blocks than ``num_selected``; None if none has), of ``num_selected``,
        over the first sequence (:func:`nsa.evals.selection.neighbour_sharing`).
    """
    from ..evals.selection import neighbour_sharing

    idx = _block_indices(q, k_cmp, settings, backend)
    T, S, bs = q.shape[1], settings["num_selected"], settings["block_size"]
    t = torch.arange(-(-T // tile) * tile, device=q.device).view(-1, tile)
    t = torch.where(t < T, t, -1)
    most = torch.minimum(((t >= 0) * torch.clamp(t // bs + 1, max=S)).sum(-1), (t.amax(-1) // bs + 1).clamp(min=0))
    cfg = types.SimpleNamespace(block_size=bs, num_selected=S)
    return dict(tile_blocks=float(tile_blocks(idx, tile).double().mean()), most=float(most.double().mean()),
                shared=neighbour_sharing(idx[0].cpu(), cfg)["shared"], num_selected=S, tile=tile)


# ---------------------------------------------------------------------------------------------
# Text
# ---------------------------------------------------------------------------------------------
def _run_train_config(model_dir: Path) -> dict | None:
    """The ``train`` section of the run's config.json (beside the checkpoint), if any."""
    for cand in (model_dir.parent, model_dir):
        f = cand / "config.json"
        if f.is_file():
            try:
                d = json.loads(f.read_text())
            except (OSError, ValueError):
                continue
            if isinstance(d, dict) and isinstance(d.get("train"), dict):
                return d["train"]
    return None


def text_tokens(checkpoint, n: int, text=None) -> tuple[torch.Tensor, dict]:
    """``n`` tokens of text for the model of ``checkpoint`` (see the module docstring, 3).

    Args:
        checkpoint: a run directory or its ``checkpoint/`` (the tokenizer: ``tokenizer/`` beside
            it, :func:`nsa.train.load_run_tokenizer`).
        n: tokens wanted. text: a text file, or None for the run's validation documents.
    Returns:
        int64 ``[n]`` and a dict describing the text (``source``, ``documents``, ``tokens``
        available, ``repeated``).
    Raises:
        ValueError naming ``--from-checkpoint`` (no tokenizer) or ``--text`` (a file that is not
        text; the run's documents not found here).
    """
    from ..data import find_documents, read_text, split_documents
    from ..evals.task_data import filler_texts
    from ..train import load_run_tokenizer

    model_dir = _model_dir(checkpoint)
    try:
        tok = load_run_tokenizer(model_dir)
    except ValueError:
        raise ValueError(f"--from-checkpoint: no tokenizer/ directory beside {model_dir} (a run directory of "
                         "`nsa train` has one)") from None

    def encode(t):
        return [tok.bos_id] + tok.encode(t) + [tok.eos_id]

    if text is not None:
        try:
            docs = find_documents([text])
        except ValueError as e:
            raise ValueError(str(e).replace("--data", "--text")) from None
        ids = [i for d in docs for i in encode(read_text(d))]
        info = dict(source=str(Path(text).expanduser().resolve()), documents=len(docs))
    else:
        run = _run_train_config(model_dir) or {}
        data, frac, seed = run.get("data"), run.get("val_fraction", 0.05), run.get("seed", 0)
        try:
            _, val = split_documents(find_documents(data), frac, seed)
        except ValueError as e:
            raise ValueError(f"--text: the run's documents ({'the default corpus' if data is None else data}) "
                             f"cannot be read here ({e}); pass --text FILE") from None
        chars = 2 * n
        while True:
            texts = filler_texts(val, chars, f"bench:{seed}")
            ids = [i for t in texts for i in encode(t)]
            if len(ids) >= n or sum(map(len, texts)) < chars:  # enough, or every document read
                break
            chars *= 4
        where = "the default corpus" if data is None else ", ".join(map(str, data))
        info = dict(source=f"validation documents of {where} (val_fraction {frac}, seed {seed})",
                    documents=len(texts))
    info.update(tokens=len(ids), repeated=len(ids) < n)
    if len(ids) < n:
        ids = ids * math.ceil(n / len(ids))
    return torch.tensor(ids[:n], dtype=torch.long), info


# ---------------------------------------------------------------------------------------------
# The benchmark's source of trained inputs
# ---------------------------------------------------------------------------------------------
def _model_dir(checkpoint) -> Path:
    """The directory holding model.safetensors: ``DIR/checkpoint`` of a run directory, or DIR."""
    p = Path(checkpoint).expanduser()
    for cand in (p / "checkpoint", p):
        if (cand / "model.safetensors").is_file() and (cand / "config.json").is_file():
            return cand.resolve()
    raise ValueError(f"--from-checkpoint: {checkpoint} holds no model (expected a run directory of `nsa train` "
                     "with checkpoint/, or a directory with model.safetensors and config.json)")


def _model_config(checkpoint):
    return _read_config(str(_model_dir(checkpoint)))


@functools.lru_cache(maxsize=None)
def _read_config(d: str):
    from ..model import ModelConfig

    d = Path(d)
    try:
        return ModelConfig.from_dict(json.loads((d / "config.json").read_text()))
    except ValueError as e:
        raise ValueError(f"--from-checkpoint: {d / 'config.json'} is not a model config ({e})") from None


@dataclasses.dataclass
class Capture:
    """One run of the model: the inputs of the chosen layers on ``B`` sequences of ``T`` tokens."""

    B: int
    T: int
    layers: dict  # layer -> capture_inputs' kwargs
    text: dict  # text_tokens' description


_CAPTURES: dict = {}  # (TrainedSource, device) -> Capture


@dataclasses.dataclass(frozen=True)
class TrainedSource:
    """Trained inputs of a benchmark case (:attr:`nsa.bench.harness.Case.source`): the layers
    ``layers`` of the model in ``checkpoint`` (a run directory or a saved-model directory,
    resolved) on the run's validation text or the file ``text``. Build it with
    :func:`open_source`, which checks all three."""

    checkpoint: str
    layers: tuple
    text: str | None = None

    @property
    def config(self):
        """The model's :class:`nsa.model.ModelConfig` (read from its config.json)."""
        return _model_config(self.checkpoint)

    @property
    def model_shape(self) -> tuple:
        """(HQ, H, Dk, Dv) of the model's attention."""
        c = self.config
        return c.num_heads, c.num_kv_heads, c.head_dim, c.head_dim

    @property
    def settings(self) -> dict:
        """The model's NSA settings, with the scale its layers run at (the ops' default, ``Dk ** -0.5``)."""
        c = self.config
        return dict(kernel_size=c.kernel_size, stride=c.stride, block_size=c.block_size,
                    num_selected=c.num_selected, num_initial=c.num_initial, num_local=c.num_local,
                    window_size=c.window_size, scale=c.head_dim ** -0.5)

    def capture(self, B: int, T: int, device) -> Capture:
        """The chosen layers' inputs on at least B sequences of T tokens, on ``device``: captured
        once and kept (module cache); a larger request runs the model again, at the largest
        batch and length asked so far, and replaces the kept one."""
        key = (self, str(torch.device(device)))
        have = _CAPTURES.get(key)
        if have is not None and have.B >= B and have.T >= T:
            return have
        if have is not None:
            B, T = max(B, have.B), max(T, have.T)
            del _CAPTURES[key], have
        from ..train import load_checkpoint_model

        ids, info = text_tokens(self.checkpoint, B * T, self.text)
        model = load_checkpoint_model(self.checkpoint, device=device).eval()
        layers = capture_inputs(model, ids.view(B, T).to(device), self.layers)
        del model
        _CAPTURES[key] = cap = Capture(B, T, layers, info)
        return cap

    def inputs(self, case, device, requires_grad: bool = True) -> dict:
        """The inputs of ``case`` (``case.inputs == 'trained:L'``): layer L's capture cut to the
        case's batch and length, replayed at its heads and dims (:func:`replay`), in its dtype,
        on ``device``, each a new leaf tensor (``requires_grad`` as asked)."""
        cap = self.capture(case.B, case.T, device)
        layer = case.layer
        if layer not in cap.layers:
            raise ValueError(f"case: layer {layer} was not captured (layers {sorted(cap.layers)})")
        tensors, settings = split(cap.layers[layer])
        tensors = _cut(tensors, case.B, case.T, settings["kernel_size"], settings["stride"])
        # cast before the replay (repeats and zero padding are exact in any dtype): the replay's
        # output, new tensors, is then the only full-size copy
        tensors = {n: t.to(device=device, dtype=case.torch_dtype) for n, t in tensors.items()}
        tensors, settings = replay(tensors, case.HQ, case.H, case.Dk, case.Dv, settings)
        if settings != case.settings:
            raise ValueError(f"case: NSA settings {case.settings} differ from the model's {settings} "
                             "(build trained cases with nsa.bench.trained.trained_cases)")
        return {n: t.requires_grad_(requires_grad) for n, t in tensors.items()}

    def describe(self) -> dict:
        """What the benchmark header records about the source."""
        c = self.config
        hq, h, dk, dv = self.model_shape
        return dict(checkpoint=self.checkpoint, layers=list(self.layers), text=self.text,
                    model=dict(num_layers=c.num_layers, hidden_size=c.hidden_size, HQ=hq, H=h, Dk=dk, Dv=dv,
                               max_seq_len=c.max_seq_len, rope_theta=c.rope_theta),
                    settings=self.settings)


def default_layers(num_layers: int) -> tuple:
    """The first, middle and last layer."""
    return tuple(sorted({0, num_layers // 2, num_layers - 1}))


def open_source(checkpoint, layers=None, text=None) -> TrainedSource:
    """A checked :class:`TrainedSource`.

    Raises:
        ValueError naming ``--from-checkpoint`` (no model or tokenizer there, or a model whose
        attention is not NSA), ``--layers`` (out of range, or none) or ``--text`` (not a text file).
    """
    from ..data import find_documents

    d = _model_dir(checkpoint)
    cfg = _model_config(d)
    if cfg.attention != "nsa":
        raise ValueError(f"--from-checkpoint: the model in {d} has attention={cfg.attention!r}; its layers give "
                         "no NSA inputs (train one with attention='nsa')")
    n = cfg.num_layers
    layers = default_layers(n) if layers is None else tuple(layers)
    if not layers:
        raise ValueError("--layers: expected at least one layer")
    bad = [i for i in layers if not 0 <= i < n]
    if bad:
        raise ValueError(f"--layers: {bad} out of range; the model has {n} layers (0..{n - 1})")
    if text is not None:
        try:
            find_documents([text])
        except ValueError as e:
            raise ValueError(str(e).replace("--data", "--text")) from None
        text = str(Path(text).expanduser().resolve())
    text_dir = d if (d / "tokenizer").is_dir() else d.parent
    if not (text_dir / "tokenizer").is_dir():
        raise ValueError(f"--from-checkpoint: no tokenizer/ directory beside {d} (a run directory of `nsa train` "
                         "has one)")
    return TrainedSource(str(d), tuple(sorted(dict.fromkeys(layers))), text)


def trained_cases(cases: list, source: TrainedSource) -> list:
    """Each train case twice over: on random inputs and, once per layer of ``source``, on that
    layer's trained inputs (``inputs='trained:L'``), both with the model's NSA settings (the
    captured compressed keys and selection are the model's: its kernel size, stride, blocks and
    window); decode cases as they are.

    Raises:
        ValueError naming ``--heads`` or ``--dims`` for a case the model's inputs cannot be
        replayed at (:func:`check_replayable`).
    """
    settings = source.settings
    scale = settings.pop("scale")
    out = []
    for c in cases:
        if c.kind != "train":
            out.append(c)
            continue
        try:
            check_replayable(source.model_shape, c.HQ, c.H, c.Dk, c.Dv)
        except ValueError as e:
            option = "--heads" if str(e).startswith(("HQ", "H:")) else "--dims"
            hq, h, dk, dv = source.model_shape
            raise ValueError(f"{option}: case {c.name} cannot replay the model's attention (HQ {hq}, H {h}, "
                             f"Dk {dk}, Dv {dv}): {e}") from None
        base = dataclasses.replace(c, **settings)
        out.append(base)
        for layer in source.layers:
            out.append(dataclasses.replace(base, inputs=f"trained:{layer}", source=source, scale=scale,
                                           smooth_queries=0))
    return out


def selection_report(source: TrainedSource, lengths, device, backend: str | None = "auto") -> list[dict]:
    """:func:`selection_stats` of every layer of ``source`` at each length (first sequence),
    trained and random (standard-normal q and k_cmp of the captured shape, seed 0), at the
    model's own shape (replay repeats heads and selects the same blocks)."""
    rows = []
    device = torch.device(device)
    for T in sorted(set(lengths)):
        cap = source.capture(1, T, device)
        for layer, kw in cap.layers.items():
            x, settings = split(kw)
            x = _cut(x, 1, T, settings["kernel_size"], settings["stride"])
            q, kc = x["q"].float(), x["k_cmp"].float()
            g = torch.Generator(device=device).manual_seed(0)
            rq = torch.randn(q.shape, generator=g, device=device)
            rk = torch.randn(kc.shape, generator=g, device=device)
            rows.append(dict(T=T, layer=layer, trained=selection_stats(q, kc, settings, backend=backend),
                             random=selection_stats(rq, rk, settings, backend=backend)))
    return rows


def format_report(rows: list[dict]) -> str:
    """Lines of :func:`selection_report` for the terminal."""
    if not rows:
        return ""
    r0 = rows[0]["trained"]
    out = [f"selection (first sequence): distinct blocks per tile of {r0['tile']} queries and KV head "
           f"(what the selected-attention kernel walks; 'most' if every query chose differently), and "
           f"blocks queries t and t+1 share, of {r0['num_selected']}:"]
    for r in rows:
        t, rn = r["trained"], r["random"]

        def shared(s):
            return "-" if s["shared"] is None else f"{s['shared']:.1f}"

        tk = f"{r['T'] // 1024}k" if r["T"] % 1024 == 0 else str(r["T"])
        out.append(f"  T {tk:>5} layer {r['layer']:>2}: tile blocks trained {t['tile_blocks']:7.1f}, random "
                   f"{rn['tile_blocks']:7.1f} (most {t['most']:.1f}); shared trained {shared(t)}, random "
                   f"{shared(rn)}")
    return "\n".join(out)
