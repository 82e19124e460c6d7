"""Hugging Face configuration and model classes for Cognate, shipped inside every exported `hf_format/` folder.

The export writes this file with the native model code (cognate/model/) inlined above it, so the folder is
self-contained: `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)` works without Cognate
installed, tools that copy only `modeling_cognate.py` (mergekit) keep a loadable model, and the logits are the
native model's own. config.json uses the standard names (hidden_size, num_hidden_layers, vocab_size,
max_position_embeddings, ...); weight names are `model.` + the native names (`model.layers.{i}.…`).
"""

import dataclasses

import torch
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

from .config import HF_CONFIG_NAMES, CognateConfig
from .model import CognateModel


class CognateHFConfig(PretrainedConfig):
    model_type = "cognate"

    def __init__(self, **kwargs):
        native = {f.name for f in dataclasses.fields(CognateConfig)} - set(HF_CONFIG_NAMES.values())
        defaults = CognateConfig()
        for hf_name, field in HF_CONFIG_NAMES.items():
            setattr(self, hf_name, kwargs.pop(hf_name, getattr(defaults, field)))
        for field in sorted(native):
            setattr(self, field, kwargs.pop(field, getattr(defaults, field)))
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


class CognateForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = CognateHFConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"

    def __init__(self, config: CognateHFConfig):
        super().__init__(config)
        self.model = CognateModel(config.to_cognate())
        self.post_init()

    def _init_weights(self, module):
        """Weights come from the checkpoint; the native model initialises itself when built."""

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def get_output_embeddings(self):
        return self.model.lm_head

    def forward(
        self, input_ids: torch.LongTensor, attention_mask=None, labels=None, memory_state=None, **kwargs
    ) -> CausalLMOutput:
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError(
                "padded batches are not supported: the model has no padding mask; pass one sequence "
                "or sequences of equal length"
            )
        # Hugging Face labels are aligned with the inputs; the native model takes next-token targets.
        targets = None
        if labels is not None:
            targets = torch.full_like(labels, -100)
            targets[:, :-1] = labels[:, 1:]
        out = self.model(input_ids, targets=targets, memory_state=memory_state)
        return CausalLMOutput(loss=out.loss, logits=out.logits)

    def prepare_inputs_for_generation(self, input_ids, **kwargs):
        # The native model recomputes the prefix (its KV cache is per refinement step, which transformers'
        # cache classes do not describe); `cognate generate` uses the native cache. Like native generation,
        # read memory at any length (an empty state turns it on below mem_min_seq_len), so the tokens match.
        inputs = {"input_ids": input_ids}
        cfg = self.model.cfg
        if cfg.mem_enabled:
            inputs["memory_state"] = self.model.memory.empty_state(
                cfg.t_infer, input_ids.size(0), input_ids.device, torch.float32
            )
        return inputs
