"""Hugging Face ``transformers`` integration (the optional extra ``nsa[hf]``).

transformers' attention-function interface passes only q/k/v, while NSA has parameters of its
own (compression MLP, gates, per-branch K/V), so this module ships model classes that wrap
:class:`nsa.model.LanguageModel` instead:

- :class:`NSAHFConfig` (``model_type='nsa'``): a ``PretrainedConfig`` holding the fields of
  :class:`nsa.model.ModelConfig`;
- :class:`NSAForCausalLM`: a ``PreTrainedModel`` whose ``.model`` is the ``LanguageModel``
  (parameter names map 1:1, under ``model.``), with ``generate()`` through transformers'
  generation utilities, ``save_pretrained`` / ``from_pretrained`` (safetensors, tied
  embeddings stored once), gradient checkpointing, and conversion from a ``LanguageModel``
  (:meth:`NSAForCausalLM.from_nsa`) or an ``nsa train`` run (:meth:`NSAForCausalLM.from_nsa_checkpoint`);
- :class:`NSAHFCache`: a transformers ``Cache`` holding the model's
  :class:`nsa.model.ModelCache` (an :class:`nsa.NSACache` or ``KVCache`` per layer).

Importing this module registers the classes with ``AutoConfig`` and ``AutoModelForCausalLM``
(:func:`register`); ``import nsa`` never imports transformers::

    import nsa.hf
    from transformers import AutoModelForCausalLM
    model = nsa.hf.NSAForCausalLM.from_nsa_checkpoint("runs/tiny")
    model.save_pretrained("hf/tiny")
    model = AutoModelForCausalLM.from_pretrained("hf/tiny")
    out = model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=32, do_sample=False)

Batched generation follows transformers' convention for decoder-only models: prompts padded on
the left, ``attention_mask`` 0 on padding. The prefill packs each row's unmasked tokens into
one sequence (``cu_seqlens``), so padding costs no attention and positions start at each
prompt's first real token; each later step feeds one token per sequence. Greedy search and
sampling are supported; beam search, assisted decoding and anything that crops or reorders
the cache are not (the NSA cache cannot roll back).

Tested (tests/test_hf.py) with transformers 4.45.2, 4.57.6, 5.0.0 and 5.25.0.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import os

import torch
import torch.nn.functional as F

try:
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PretrainedConfig, PreTrainedModel
    from transformers.cache_utils import Cache
    from transformers.generation.configuration_utils import GenerationMode
    from transformers.modeling_outputs import CausalLMOutputWithPast
except ImportError as e:  # pragma: no cover - the message is the point
    raise ImportError(f"nsa.hf needs transformers (pip install 'nsa[hf]'): {e}") from e

from .model import IGNORE_INDEX, LanguageModel, ModelCache, ModelConfig

__all__ = ["NSAHFConfig", "NSAForCausalLM", "NSAHFCache", "register"]

_TRANSFORMERS_MAJOR = int(transformers.__version__.split(".")[0])
# transformers renamed the cache in model outputs and generate's model kwargs from
# `past_key_values` to `cache` during 5.x; outputs carry it under whichever name is current.
_CACHE_FIELD = "cache" if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)} \
    else "past_key_values"
_MODEL_FIELDS = tuple(f.name for f in dataclasses.fields(ModelConfig))


class NSAHFConfig(PretrainedConfig):
    """The configuration of :class:`NSAForCausalLM`: every field of :class:`nsa.model.ModelConfig`
    (same names and defaults, validated by building one) plus transformers' own
    ``PretrainedConfig`` arguments.

    ``tie_word_embeddings`` is another name for ``tie_embeddings`` (and ``num_attention_heads``,
    ``num_hidden_layers``, ``num_key_value_heads`` for ``num_heads``, ``num_layers``,
    ``num_kv_heads``), so the two can never disagree.
    """

    model_type = "nsa"
    attribute_map = {"tie_word_embeddings": "tie_embeddings", "num_attention_heads": "num_heads",
                     "num_hidden_layers": "num_layers", "num_key_value_heads": "num_kv_heads"}

    def __init__(self, **kwargs):
        fields = {f.name: kwargs.pop(f.name) for f in dataclasses.fields(ModelConfig) if f.name in kwargs}
        for alias, name in self.attribute_map.items():
            if alias in kwargs:
                value = kwargs.pop(alias)
                if name in fields and fields[name] != value:
                    raise ValueError(f"{alias}: {value!r} contradicts {name}={fields[name]!r} (the same field)")
                fields[name] = value
        model_config = ModelConfig(**fields)  # defaults and validation: ModelConfig's
        super().__init__(**kwargs)
        # Set after PretrainedConfig.__init__, which may assign its own default to an alias.
        for name in _MODEL_FIELDS:
            setattr(self, name, getattr(model_config, name))

    @classmethod
    def from_nsa(cls, config: ModelConfig, **kwargs) -> "NSAHFConfig":
        """The transformers config of a :class:`nsa.model.ModelConfig` (``kwargs``: further
        ``PretrainedConfig`` arguments, e.g. ``pad_token_id``)."""
        if not isinstance(config, ModelConfig):
            raise ValueError(f"config: expected a ModelConfig, got {type(config).__name__}")
        return cls(**config.to_dict(), **kwargs)

    def to_nsa(self) -> ModelConfig:
        """The :class:`nsa.model.ModelConfig` of this config (validated)."""
        return ModelConfig(**{name: getattr(self, name) for name in _MODEL_FIELDS})


class NSAHFCache(Cache):
    """A transformers ``Cache`` around an :class:`nsa.model.ModelCache`.

    NSA layers keep their own decoding state (raw, compressed and window keys/values per
    sequence, of different lengths after a padded prefill), so this cache takes no K/V from
    outside (:meth:`update` raises); :class:`NSAForCausalLM` fills it. It counts the columns
    of ``input_ids`` it has consumed, padding included, as transformers' caches do:
    :meth:`get_seq_length` is that count, :attr:`lengths` the real tokens per sequence.
    Cropping, reordering and batch reshuffling (beam search, assisted decoding) are not supported.
    """

    def __init__(self, model_cache: ModelCache):
        if not isinstance(model_cache, ModelCache):
            raise ValueError(f"model_cache: expected an nsa.model.ModelCache, got {type(model_cache).__name__}")
        if "layers" in inspect.signature(Cache.__init__).parameters:
            super().__init__(layers=[])  # transformers >= 4.56: a Cache is a list of per-layer caches
        else:
            super().__init__()
        self.model_cache = model_cache
        self.seen_columns = 0

    def __len__(self):
        return len(self.model_cache.layers)

    def __repr__(self):
        return f"NSAHFCache(layers={len(self)}, columns={self.seen_columns}, lengths={self.lengths})"

    @property
    def is_empty(self) -> bool:
        return self.model_cache.is_empty

    @property
    def lengths(self) -> list[int]:
        """Cached (unpadded) tokens per sequence; ``[]`` before the prefill."""
        return [] if self.is_empty else self.model_cache.lengths

    @property
    def batch_size(self) -> int:
        return -1 if self.is_empty else self.model_cache.batch_size

    def get_seq_length(self, layer_idx: int | None = 0) -> int:
        """Columns of ``input_ids`` consumed so far (padding included)."""
        return self.seen_columns

    def get_max_length(self, layer_idx: int | None = None):
        return None if _TRANSFORMERS_MAJOR < 5 else -1  # unbounded (the cache grows by doubling)

    def get_max_cache_shape(self, layer_idx: int | None = None):
        return self.get_max_length()

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_croppable(self) -> bool:
        return False

    def reset(self):
        self.model_cache.reset()
        self.seen_columns = 0

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        raise NotImplementedError("NSAHFCache: NSA layers fill their own cache; it takes no key/value states")

    def _unsupported(self, what):
        raise NotImplementedError(f"NSAHFCache: {what} is not supported (the NSA cache cannot be cropped or "
                                  "reordered: no beam search, assisted or contrastive decoding)")

    def reorder_cache(self, beam_idx):
        self._unsupported("reorder_cache")

    def crop(self, *args, **kwargs):
        self._unsupported("crop")

    def batch_repeat_interleave(self, repeats):
        self._unsupported("batch_repeat_interleave")

    def batch_select_indices(self, indices):
        self._unsupported("batch_select_indices")


class NSAForCausalLM(PreTrainedModel, GenerationMixin):
    """A causal LM for transformers around :class:`nsa.model.LanguageModel` (``self.model``).

    :meth:`forward` takes ``input_ids [B, T]`` with an optional ``attention_mask`` (0 on
    padding; rows may be padded anywhere, unmasked tokens are packed), an optional
    :class:`NSAHFCache` (``past_key_values``, or ``cache`` as transformers 5 names it) and
    optional ``labels``; it returns a ``CausalLMOutputWithPast``. ``generate()`` works as for
    any transformers causal LM (greedy search and sampling).
    """

    config_class = NSAHFConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["Block"]
    # The LM head shares the embedding when tie_word_embeddings (= tie_embeddings); transformers 5
    # maps target -> source, 4.x lists the targets.
    _tied_weights_keys = {"model.lm_head.weight": "model.embed.weight"} if _TRANSFORMERS_MAJOR >= 5 \
        else ["model.lm_head.weight"]
    _supports_cache_class = True  # transformers 4.x: accepts a Cache object
    _is_stateful = True  # transformers 4.x: no assisted / contrastive decoding (the cache cannot roll back)
    _supported_generation_modes = [GenerationMode.GREEDY_SEARCH, GenerationMode.SAMPLE]  # transformers 5

    def __init__(self, config: NSAHFConfig):
        if not isinstance(config, NSAHFConfig):
            raise ValueError(f"config: expected an NSAHFConfig, got {type(config).__name__}")
        super().__init__(config)
        self.model = LanguageModel(config.to_nsa())
        self.post_init()

    # ---- conversion -----------------------------------------------------------------------------
    @classmethod
    def from_nsa(cls, model: LanguageModel, **config_kwargs) -> "NSAForCausalLM":
        """A copy of ``model`` as an :class:`NSAForCausalLM` (same parameters, dtype and device;
        ``config_kwargs``: further ``PretrainedConfig`` arguments such as ``pad_token_id``)."""
        if not isinstance(model, LanguageModel):
            raise ValueError(f"model: expected an nsa.model.LanguageModel, got {type(model).__name__}")
        w = model.embed.weight
        out = cls(NSAHFConfig.from_nsa(model.config, **config_kwargs)).to(device=w.device, dtype=w.dtype)
        out.model.load_state_dict(model.state_dict())
        return out.train(model.training)

    def to_nsa(self) -> LanguageModel:
        """The wrapped :class:`nsa.model.LanguageModel` itself (it shares the parameters: copy it
        with ``copy.deepcopy`` for an independent model)."""
        return self.model

    @classmethod
    def from_nsa_checkpoint(cls, path: str | os.PathLike, device: str | torch.device | None = None,
                            **overrides) -> "NSAForCausalLM":
        """The model of an ``nsa train`` run directory (its ``checkpoint/``), or of a directory
        written by :meth:`nsa.model.LanguageModel.save_pretrained`, as an :class:`NSAForCausalLM`
        (``overrides``: config fields that keep parameter shapes, e.g. ``backend``)."""
        from .train import load_checkpoint_model  # the trainer owns the run layout

        return cls.from_nsa(load_checkpoint_model(path, device=device, **overrides))

    # ---- transformers hooks -----------------------------------------------------------------------
    def get_input_embeddings(self):
        return self.model.embed

    def get_output_embeddings(self):
        return self.model.lm_head

    def _init_weights(self, module):
        # LanguageModel initialises itself (scaled residual projections, zero position embeddings);
        # transformers' loading guards skip the parameters a checkpoint already filled.
        if isinstance(module, LanguageModel):
            module.reset_parameters()

    @property
    def gradient_checkpointing(self) -> bool:
        """LanguageModel.activation_checkpointing: recompute every block in the backward."""
        return self.model.activation_checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, enable: bool):
        self.model.activation_checkpointing = bool(enable)

    def _set_gradient_checkpointing(self, enable: bool = True, gradient_checkpointing_func=None,
                                    every_n_layers: int = 1, **kwargs):
        # LanguageModel checkpoints every block with torch.utils.checkpoint(use_reentrant=False);
        # transformers' checkpoint function and its kwargs are not used.
        if enable and every_n_layers != 1:
            raise ValueError(f"every_n_layers: NSAForCausalLM checkpoints every block, got {every_n_layers}")
        self.gradient_checkpointing = enable

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # generate() must not make a DynamicCache: prepare_inputs_for_generation makes an NSAHFCache

    def new_cache(self) -> NSAHFCache:
        """An empty :class:`NSAHFCache` for this model."""
        return NSAHFCache(self.model.new_cache())

    def prepare_inputs_for_generation(self, input_ids, past_key_values=None, attention_mask=None, cache=None,
                                      use_cache=True, **kwargs):
        """The first call (empty cache) feeds the whole prompt; later calls only the columns the
        cache has not seen (one token per sequence in a decoding step)."""
        cache = _one_cache(past_key_values, cache)
        if kwargs.get("inputs_embeds") is not None:
            raise ValueError("inputs_embeds: not supported by NSAForCausalLM; pass input_ids")
        if cache is None and use_cache is not False:
            cache = self.new_cache()
        if cache is not None and not isinstance(cache, NSAHFCache):
            raise ValueError(f"past_key_values: expected an NSAHFCache (model.new_cache()), got {type(cache).__name__}")
        if cache is not None and not cache.is_empty:
            total = attention_mask.shape[1] if attention_mask is not None else input_ids.shape[1]
            new = total - cache.get_seq_length()
            if new < 1 or new > input_ids.shape[1]:
                raise ValueError(f"input_ids: the cache holds {cache.get_seq_length()} columns of a sequence "
                                 f"of {total}; expected 1 to {input_ids.shape[1]} new columns, got {new}")
            input_ids = input_ids[:, -new:]
        inputs = dict(input_ids=input_ids, attention_mask=attention_mask, past_key_values=cache, use_cache=use_cache)
        for k in ("output_attentions", "output_hidden_states"):
            if kwargs.get(k):
                inputs[k] = kwargs[k]
        return inputs

    # ---- forward ----------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                past_key_values: NSAHFCache | None = None, labels: torch.Tensor | None = None,
                use_cache: bool | None = None, return_dict: bool | None = None, cache: NSAHFCache | None = None,
                num_items_in_batch: int | torch.Tensor | None = None, **kwargs):
        """Args:
            input_ids: int64 ``[B, T]``.
            attention_mask: ``[B, T]`` of 0/1 (bool or int), 0 on padding; with a filled cache,
                ``[B, columns seen + T]`` (transformers' convention) and the new columns all 1.
                Masked tokens are left out: each row's unmasked tokens form one sequence
                (positions from 0 at its first one), packed with ``cu_seqlens``.
            past_key_values (or ``cache``): an :class:`NSAHFCache` (:meth:`new_cache`). Empty:
                this call is the prefill and fills it; filled: ``T`` decoding steps, one per column.
            labels: int64 ``[B, T]``; position t is trained to predict ``labels[t + 1]`` (the
                shift happens inside, as in transformers); ``-100`` and masked positions are ignored.
            use_cache: return a cache (a new one unless given); default: only when one is given.
            return_dict: False returns a tuple (default: ``config.return_dict``).
            num_items_in_batch: the loss becomes ``sum / num_items_in_batch`` instead of the mean
                over this batch's targets (transformers' Trainer passes it under gradient accumulation).
        Returns:
            ``CausalLMOutputWithPast``: ``loss`` (with labels), ``logits [B, T, vocab]`` (zeros at
            masked positions) and the cache.
        """
        cache = _one_cache(past_key_values, cache)
        extra = sorted(k for k, v in kwargs.items() if v is not None and v is not False)
        if extra:
            raise ValueError(f"NSAForCausalLM.forward: unsupported arguments {extra} (inputs_embeds, position_ids, "
                             "attention or hidden-state outputs and packed-sequence kwargs are not supported)")
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise ValueError("input_ids: expected an int64 tensor [B, T]")
        if use_cache is False and cache is not None:
            raise ValueError("use_cache: False, but a cache was given")
        if use_cache and cache is None:
            cache = self.new_cache()
        if cache is not None and not isinstance(cache, NSAHFCache):
            raise ValueError(f"past_key_values: expected an NSAHFCache (model.new_cache()), got "
                             f"{type(cache).__name__}")
        mask = self._nsa_mask(attention_mask, input_ids, cache)
        if cache is not None and not cache.is_empty:
            if labels is not None:
                raise ValueError("labels: not accepted with a filled cache (decoding steps)")
            logits, loss = self._nsa_steps(input_ids, cache), None
        else:
            logits, loss = self._nsa_prefill(input_ids, mask, labels, cache, num_items_in_batch)
        out = CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: cache})
        if return_dict is False or (return_dict is None and not self.config.return_dict):
            return out.to_tuple()
        return out

    def _nsa_mask(self, attention_mask, input_ids, cache):
        """The mask as bool (None when absent), checked against input_ids and the cache."""
        if attention_mask is None:
            return None
        B, T = input_ids.shape
        seen = 0 if cache is None else cache.get_seq_length()
        if not isinstance(attention_mask, torch.Tensor) or tuple(attention_mask.shape) != (B, seen + T):
            shape = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask)
            raise ValueError(f"attention_mask: expected [B, columns] = {(B, seen + T)} (columns seen by the cache "
                             f"+ new ones), got {shape}")
        if attention_mask.is_floating_point() or bool(((attention_mask != 0) & (attention_mask != 1)).any()):
            raise ValueError("attention_mask: expected 0/1 values (bool or integer)")
        mask = attention_mask.bool()
        if seen and not bool(mask[:, seen:].all()):
            raise ValueError("attention_mask: the new tokens of a decoding step must not be masked")
        if not seen and not bool(mask.any(1).all()):
            raise ValueError("attention_mask: every row needs at least one unmasked token")
        return mask[:, seen:]

    def _nsa_prefill(self, input_ids, mask, labels, cache, num_items_in_batch):
        B, T = input_ids.shape
        ask_logits = True if labels is not None else None
        if cache is None and (mask is None or bool(mask.all())):
            out = self.model(input_ids, labels=labels, return_logits=ask_logits)
            logits, loss = out.logits, out.loss
            if loss is not None and num_items_in_batch is not None:
                count = (labels[:, 1:] != IGNORE_INDEX).sum()
                loss = loss * count / num_items_in_batch
            return logits, loss
        # Packed: row b's unmasked tokens in order form sequence b (the same call LanguageModel.generate makes).
        keep = torch.ones_like(input_ids, dtype=torch.bool) if mask is None else mask
        lens = keep.sum(1)
        cu = F.pad(lens.cumsum(0), (1, 0)).to(torch.int32)
        packed_labels = None if labels is None else labels[keep].unsqueeze(0)
        out = self.model(input_ids[keep].unsqueeze(0), cu_seqlens=cu,
                         cache=None if cache is None else cache.model_cache, labels=packed_labels,
                         return_logits=ask_logits)
        logits = out.logits.new_zeros(B, T, out.logits.shape[-1])
        logits[keep] = out.logits[0]
        loss = out.loss
        if loss is not None and num_items_in_batch is not None:
            first = torch.zeros_like(packed_labels[0], dtype=torch.bool)
            first[cu[:-1].long()] = True  # a sequence's first label is nobody's target
            loss = loss * ((packed_labels[0] != IGNORE_INDEX) & ~first).sum() / num_items_in_batch
        if cache is not None:
            cache.seen_columns = T
        return logits, loss

    def _nsa_steps(self, input_ids, cache):
        if input_ids.shape[0] != cache.model_cache.batch_size:
            raise ValueError(f"input_ids: the cache holds {cache.model_cache.batch_size} sequences, got "
                             f"{input_ids.shape[0]} rows")
        steps = [self.model(input_ids[:, t:t + 1], cache=cache.model_cache).logits
                 for t in range(input_ids.shape[1])]
        cache.seen_columns += input_ids.shape[1]
        return torch.cat(steps, 1)


def _one_cache(past_key_values, cache):
    if past_key_values is not None and cache is not None and past_key_values is not cache:
        raise ValueError("past_key_values, cache: two names for the same argument; give one")
    return cache if cache is not None else past_key_values


@functools.cache
def register():
    """Register ``model_type='nsa'`` with ``AutoConfig`` and ``AutoModelForCausalLM`` (done on
    import; calling it again does nothing)."""
    AutoConfig.register(NSAHFConfig.model_type, NSAHFConfig, exist_ok=True)
    AutoModelForCausalLM.register(NSAHFConfig, NSAForCausalLM, exist_ok=True)


register()
