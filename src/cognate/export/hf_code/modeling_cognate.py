"""Hugging Face configuration, cache and model classes for Cognate, shipped inside every exported `hf_format/` folder.

The export writes this file with the native model code (cognate/model/) inlined above it, so the folder is
self-contained: `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)` works without Cognate
installed, tools that copy only `modeling_cognate.py` (mergekit) keep a loadable model, and the logits are the
native model's own. config.json uses the standard names (hidden_size, num_hidden_layers, vocab_size,
max_position_embeddings, ...); weight names are `model.` + the native names (`model.layers.{i}.…`).

Two forwards, as in the native model:
    model(ids)                          the native evaluation forward (memory on at every length)
    model(ids, use_cache=True) / with a `CognateCache`, and so `generate()`:
                                        the native incremental `decode`: one KV cache per refinement step and
                                        layer, the memory carried, per-token halting, memory read at any length
Greedy `generate()` therefore gives the tokens of the native `CognateModel.generate`, with or without the cache.

Left padding (`attention_mask` with leading zeros) is honoured by decoding each group of rows that share a
padding length on its own, at its own positions: every prompt of a left-padded batch generates exactly the tokens
it generates alone. The memory writes chunks at absolute positions, which rows of different lengths do not share,
so nothing finer is possible without changing the model. Any other mask (right or inner padding) is an error.
"""

import dataclasses

import torch
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .config import HF_CONFIG_NAMES, CognateConfig
from .generate import DecodeState
from .memory import MemoryState
from .model import CognateModel
from .neural_memory import NeuralMemoryState

# transformers 5 calls the cache argument and output field `cache` (`past_key_values` is deprecated there);
# earlier versions call both `past_key_values`. The forward accepts either name and answers with the installed one.
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
CACHE_ARGUMENTS = ("cache", "past_key_values")


class CognateHFConfig(PretrainedConfig):
    model_type = "cognate"

    def __init__(self, **kwargs):
        native = {f.name for f in dataclasses.fields(CognateConfig)} - set(HF_CONFIG_NAMES.values())
        defaults = CognateConfig()
        for hf_name, field in HF_CONFIG_NAMES.items():
            setattr(self, hf_name, kwargs.pop(hf_name, getattr(defaults, field)))
        for field in sorted(native):
            setattr(self, field, kwargs.pop(field, getattr(defaults, field)))
        # Derived, for tools that size caches or attention from the config: every head has its own keys and values.
        derived = {
            "num_key_value_heads": self.num_attention_heads,
            "head_dim": self.hidden_size // self.num_attention_heads,
        }
        for name, value in derived.items():
            given = kwargs.pop(name, value)
            if given != value:
                raise ValueError(f"config {name}={given} contradicts the model's shape ({name}={value})")
            setattr(self, name, value)
        self.use_cache = kwargs.pop("use_cache", True)
        super().__init__(tie_word_embeddings=self.tie_word_embeddings, **kwargs)

    def to_cognate(self) -> CognateConfig:
        values = {field: getattr(self, hf_name) for hf_name, field in HF_CONFIG_NAMES.items()}
        native = {f.name for f in dataclasses.fields(CognateConfig)} - set(HF_CONFIG_NAMES.values())
        values.update({field: getattr(self, field) for field in native})
        return CognateConfig(**values)

    @classmethod
    def from_cognate(cls, config: CognateConfig, **kwargs) -> "CognateHFConfig":
        values = config.to_dict()
        standard = {hf_name: values.pop(field) for hf_name, field in HF_CONFIG_NAMES.items()}
        return cls(**standard, **values, **kwargs)


@dataclasses.dataclass
class PaddingGroup:
    """Rows of the batch with the same number of leading pad tokens, decoded together by one native state."""

    rows: torch.Tensor  # [b] batch indices, ascending
    padding: int
    state: DecodeState


def left_padding(attention_mask: torch.Tensor | None, batch: int, length: int, device) -> torch.Tensor:
    """Leading pad tokens per row [B] of a left-padded mask; an error for any other mask."""
    if attention_mask is None:
        return torch.zeros(batch, dtype=torch.long, device=device)
    if attention_mask.shape != (batch, length):
        raise ValueError(
            f"attention_mask has shape {tuple(attention_mask.shape)}; the input_ids have {(batch, length)}"
        )
    padding = (attention_mask == 0).sum(dim=1)
    positions = torch.arange(length, device=attention_mask.device)
    if not torch.equal(attention_mask != 0, positions[None, :] >= padding[:, None]):
        raise ValueError(
            "attention_mask must be left padding (zeros only before each row's tokens); right or inner "
            "padding is not supported: pad on the left (tokenizer.padding_side = 'left')"
        )
    if bool((padding == length).any()):
        raise ValueError("attention_mask has a row of zeros only: every sequence needs at least one token")
    return padding


def padding_groups(padding: torch.Tensor) -> list[tuple[torch.Tensor, int]]:
    """(rows, padding) for every padding length in the batch."""
    return [((padding == p).nonzero().squeeze(1), p) for p in padding.unique().tolist()]


class CognateCache(Cache):
    """The native decoding state in the transformers `Cache` interface: per group of rows sharing a padding length,
    a `DecodeState` (a KV cache per refinement step and layer, the memory, the last position's logits per step).

    `get_seq_length()` counts every column the cache has read, padding included, as `generate` expects. Beam search
    and batch selection reorder the rows; `crop` is not supported, because the memory cannot forget a write.
    """

    def __init__(self, padding: torch.Tensor):
        try:
            super().__init__(layers=[])
        except TypeError:  # transformers 4: Cache() takes no arguments
            super().__init__()
        self.groups = [PaddingGroup(rows, p, DecodeState()) for rows, p in padding_groups(padding)]
        self.batch = len(padding)
        self.seen = 0

    def get_seq_length(self, layer_idx: int | None = 0) -> int:
        return self.seen

    def get_max_length(self, layer_idx: int | None = None):
        return None  # grows without a limit

    def get_max_cache_shape(self, layer_idx: int | None = 0):
        return None

    @property
    def batch_size(self) -> int:
        return self.batch

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_croppable(self) -> bool:
        return False

    @property
    def is_linear(self) -> list[bool]:
        return []

    def decode(self, model: CognateModel, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits [B, n, V] of the next n columns of the batch; pad columns get zero logits."""
        n = input_ids.size(1)
        if len(self.groups) == 1 and self.groups[0].padding == 0:
            logits = model.decode(input_ids, self.groups[0].state)
        else:
            logits = None
            for group in self.groups:
                skip = min(max(group.padding - self.seen, 0), n)  # this call's pad columns of the group
                if skip == n:
                    continue
                out = model.decode(input_ids[group.rows, skip:], group.state)
                if logits is None:
                    logits = out.new_zeros(self.batch, n, out.size(-1))
                logits[group.rows, skip:] = out
        self.seen += n
        return logits

    def select_rows(self, old_rows: torch.Tensor) -> None:
        """Row i becomes old row `old_rows[i]` (beam search's reorder, batch selection, repetition)."""
        old_rows = old_rows.to(self.groups[0].rows.device)
        groups = []
        for group in self.groups:
            member = old_rows[:, None] == group.rows[None, :]  # [new rows, group rows]
            rows = member.any(dim=1).nonzero().squeeze(1)
            if rows.numel():
                within = member[rows].int().argmax(dim=1)
                groups.append(PaddingGroup(rows, group.padding, select_decode_state(group.state, within)))
        self.groups, self.batch = groups, len(old_rows)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.select_rows(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.select_rows(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.select_rows(torch.arange(self.batch).repeat_interleave(repeats))

    def crop(self, max_length: int) -> None:
        raise ValueError(
            "a CognateCache cannot be cropped: the long-term memory has already written what it read"
        )

    def reset(self) -> None:
        for group in self.groups:
            group.state = DecodeState()
        self.seen = 0


def select_decode_state(state, index: torch.Tensor):
    """The decoding state of some rows of a batch: every tensor in it indexed on its batch dimension (the first,
    except in a memory state, which knows its own), whatever fields the native state holds."""
    if isinstance(state, torch.Tensor):
        return state[index]
    if isinstance(state, (MemoryState, NeuralMemoryState)):
        return state.select(index)
    if isinstance(state, list):
        return [select_decode_state(item, index) for item in state]
    if dataclasses.is_dataclass(state):
        fields = dataclasses.fields(state)
        return dataclasses.replace(
            state, **{f.name: select_decode_state(getattr(state, f.name), index) for f in fields}
        )
    return state  # positions and other per-sequence-independent values


class CognateForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = CognateHFConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _supports_cache_class = True

    def __init__(self, config: CognateHFConfig):
        super().__init__(config)
        self.model = CognateModel(config.to_cognate())
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # The cache is a CognateCache, which the forward creates (a DynamicCache cannot hold the memory state).
        return False

    def _init_weights(self, module):
        """Weights come from the checkpoint; the native model initialises itself when built."""

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def get_output_embeddings(self):
        return self.model.lm_head

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Logits [B, S, V]. With `use_cache=True` or a cache (`cache` / `past_key_values`): the native decode,
        continuing the cache, returned in the output."""
        cache = _pop_cache(kwargs)
        _reject_unsupported(kwargs)
        if use_cache or cache is not None:
            if labels is not None:
                raise ValueError("labels need the evaluation forward: call without use_cache or a cache")
            cache = self._continuable(cache, input_ids, attention_mask)
            return CausalLMOutputWithPast(logits=cache.decode(self.model, input_ids), **{CACHE_FIELD: cache})
        batch, length = input_ids.shape
        padding = left_padding(attention_mask, batch, length, input_ids.device)
        groups = padding_groups(padding)
        if len(groups) == 1 and groups[0][1] == 0:
            out = self.model(input_ids, targets=_targets(labels))
            return CausalLMOutputWithPast(loss=out.loss, logits=out.logits)
        if labels is not None:
            raise ValueError("labels are supported for unpadded batches only (attention_mask all ones)")
        logits = None
        for rows, pad in groups:
            ids = input_ids[rows, pad:]
            out = self.model(ids).logits
            if logits is None:
                logits = out.new_zeros(batch, length, out.size(-1))
            logits[rows, pad:] = out
        return CausalLMOutputWithPast(logits=logits)

    def _continuable(
        self, cache, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
    ) -> CognateCache:
        """The cache to continue: the given CognateCache, or a new one for an absent or empty cache of another class."""
        batch, length = input_ids.shape
        if isinstance(cache, CognateCache):
            if cache.batch != batch:
                raise ValueError(f"the cache holds {cache.batch} sequences but input_ids has {batch}")
            if attention_mask is not None and not bool(attention_mask[:, -length:].all()):
                raise ValueError("attention_mask has zeros after the prompt: only left padding is supported")
            return cache
        if cache is not None and cache.get_seq_length() > 0:
            raise ValueError(
                f"a {type(cache).__name__} that already holds tokens cannot continue a Cognate model; pass the "
                "CognateCache its forward returned"
            )
        return CognateCache(left_padding(attention_mask, batch, length, input_ids.device))

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, use_cache=True, **kwargs):
        cache = _pop_cache(kwargs)
        if kwargs.get("inputs_embeds") is not None:
            raise ValueError("generation from inputs_embeds is not supported; pass input_ids")
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": use_cache}
        if use_cache and cache is not None:
            inputs["input_ids"] = input_ids[:, cache.get_seq_length() :]  # the columns the cache has not read
            inputs[CACHE_FIELD] = cache
        return inputs


def _pop_cache(kwargs: dict):
    found = [value for value in (kwargs.pop(name, None) for name in CACHE_ARGUMENTS) if value is not None]
    if len(found) > 1:
        raise ValueError("pass the cache as `cache` or as `past_key_values`, not both")
    return found[0] if found else None


def _reject_unsupported(kwargs: dict) -> None:
    """Arguments whose request would otherwise be ignored silently."""
    for name in ("inputs_embeds", "position_ids", "output_attentions", "output_hidden_states"):
        if kwargs.get(name) not in (None, False):
            raise ValueError(
                f"{name} is not supported by the Cognate model (positions follow from the attention_mask)"
            )


def _targets(labels: torch.Tensor | None) -> torch.Tensor | None:
    """Hugging Face labels are aligned with the inputs; the native model takes next-token targets."""
    if labels is None:
        return None
    targets = torch.full_like(labels, -100)
    targets[:, :-1] = labels[:, 1:]
    return targets
