"""A model folder, the unit every later stage (eval, generate, merge, EvoMerge) reads:

config.json            Hugging Face style: vocab_size, hidden_size, ... at the top level, every native field
model.safetensors      the weights (native names)
pytorch_model.bin      the same weights as a plain tensor dict (loads with torch.load(weights_only=True))
training_stats.json    how the model was made and how it scored
README.md              model card
tokenizer files        tokenizer.json and its config
hf_format/             self-contained Hugging Face folder (AutoModelForCausalLM, trust_remote_code=True)

`load_model_dir` also reads the Hugging Face layout: an `hf_format/` folder, or what tools write from one (mergekit,
`save_pretrained`): weight names prefixed `model.`, possibly sharded and in another dtype. `cognate convert` turns
one layout into the other.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from cognate.data.tokenizer import load_tokenizer
from cognate.export.hf import (
    CODE_FILE,
    NATIVE_POST_PROCESSOR,
    export_hf,
    hf_config_dict,
    modeling_source,
    native_tokenizer,
)
from cognate.model.config import HF_CONFIG_NAMES, CognateConfig
from cognate.model.model import CognateModel
from cognate.model.params import parameter_breakdown

WEIGHTS = "model.safetensors"
TORCH_WEIGHTS = "pytorch_model.bin"
SHARD_INDEX = "model.safetensors.index.json"  # sharded safetensors, as transformers and mergekit write them
HF_PREFIX = "model."  # the Hugging Face layout's weight names: CognateForCausalLM.model is the native model


def config_from_hf_dict(values: dict) -> CognateConfig:
    """The native config from a config.json written by `hf_config_dict` (extra Hugging Face keys ignored)."""
    native = dict(values)
    for hf_name, field in HF_CONFIG_NAMES.items():
        native[field] = native.pop(hf_name)
    known = set(CognateConfig.__dataclass_fields__)
    return CognateConfig(**{k: v for k, v in native.items() if k in known})


def save_model_dir(
    model: CognateModel, out: Path, *, tokenizer=None, stats: dict | None = None, card: str | None = None
) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = {name: t.detach().cpu().contiguous().clone() for name, t in model.state_dict().items()}
    (out / "config.json").write_text(
        json.dumps(hf_config_dict(model.cfg, tokenizer), indent=2, sort_keys=True)
    )
    save_file(state, out / WEIGHTS, metadata={"format": "pt"})
    torch.save(state, out / TORCH_WEIGHTS)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    stats = {"parameters": sum(parameter_breakdown(model).values()), **(stats or {})}
    (out / "README.md").write_text(card or model_card(model.cfg, stats))
    export_hf(state, model.cfg, out / "hf_format", tokenizer)
    # config.json's auto_map points here too, so the folder itself loads with AutoModelForCausalLM.
    (out / CODE_FILE).write_text(modeling_source())
    # Last: its presence marks the folder complete (a re-run of `cognate pretrain` trusts it).
    (out / "training_stats.json").write_text(json.dumps(stats, indent=2, sort_keys=True))
    return out


def load_model_dir(folder: Path, device: str | torch.device = "cpu") -> CognateModel:
    """The native model from a model folder of either layout; weights from safetensors (never unpickled)."""
    folder = Path(folder)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{folder} is not a model folder (no config.json)")
    config = config_from_hf_dict(json.loads(config_file.read_text()))
    model = CognateModel(config)
    state, _ = read_weights(folder)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{folder}'s weights do not fit its config.json: missing {sorted(missing)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]}"
        )
    return model.to(device).eval()


def read_weights(folder: Path) -> tuple[dict[str, torch.Tensor], str]:
    """The weights of a model folder under their native names, and the folder's layout: "native" or "hf"."""
    folder = Path(folder)
    if (folder / SHARD_INDEX).is_file():
        shards = sorted(set(json.loads((folder / SHARD_INDEX).read_text())["weight_map"].values()))
        state = {name: t for shard in shards for name, t in load_file(folder / shard).items()}
    elif (folder / WEIGHTS).is_file():
        state = load_file(folder / WEIGHTS)
    else:
        raise FileNotFoundError(f"{folder} has no {WEIGHTS} (nor a sharded {SHARD_INDEX})")
    if state and all(name.startswith(HF_PREFIX) for name in state):
        return {name.removeprefix(HF_PREFIX): t for name, t in state.items()}, "hf"
    return state, "native"


def tokenizer_sha256(folder: Path) -> str:
    """sha256 of the folder's tokenizer.json in its native form (an hf_format tokenizer's as `native_tokenizer`
    restores it), so that both layouts of a model match the prepared data it was trained on."""
    folder = Path(folder)
    tokenizer_file = folder / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise FileNotFoundError(f"{folder} has no tokenizer.json")
    config_file = folder / "tokenizer_config.json"
    if config_file.is_file() and NATIVE_POST_PROCESSOR in json.loads(config_file.read_text()):
        with tempfile.TemporaryDirectory() as tmp:
            native_tokenizer(load_tokenizer(folder)).save_pretrained(tmp)
            return hashlib.sha256((Path(tmp) / "tokenizer.json").read_bytes()).hexdigest()
    return hashlib.sha256(tokenizer_file.read_bytes()).hexdigest()


def model_card(config: CognateConfig, stats: dict) -> str:
    metrics = stats.get("metrics", {})
    rows = "\n".join(
        f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in sorted(metrics.items())
    )
    return f"""# {stats.get("name", config.name)}

A Cognate seed model: a decoder-only transformer ({config.n_layers} layers, d_model {config.d_model},
{config.n_heads} heads, vocabulary {config.vocab_size}) refined recursively ({
        config.t_train
    } steps in training,
at most {config.t_infer} at inference with per-token ACT halting), with a Titans-style long-term memory
({"on" if config.mem_enabled else "off"}). {stats.get("parameters", "?"):,} parameters.

Trained by `cognate pretrain` (seed {stats.get("seed", "?")}) on {stats.get("data", "?")}.
{
        "**The training data was the built-in SYNTHETIC curriculum; this model is a smoke-test artefact.**"
        if stats.get("synthetic")
        else ""
    }

| metric | value |
| --- | --- |
{rows}

## Use

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained("hf_format", trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained("hf_format", trust_remote_code=True)
prompts = ["Problem: 2 + 3 = ?\\nSolution:\\n", "Question: 7 - 4?\\nAnswer:"]
inputs = tokenizer(prompts, return_tensors="pt", padding=True)
outputs = model.generate(**inputs, max_new_tokens=32)
print(tokenizer.batch_decode(outputs, skip_special_tokens=True))
```
The tokenizer starts every text with `<|endoftext|>`, as every document started in training, and pads on the left;
`generate` caches keys, values and memory, and gives the tokens of `cognate generate`, batched or not.
Or natively: `cognate generate --model . --prompt "Problem: ..."`.
"""
