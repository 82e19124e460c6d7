"""Export a native Cognate model to a self-contained Hugging Face folder (`hf_format/`).

The folder holds config.json (standard names plus `auto_map`), model.safetensors, generation_config.json, the
tokenizer, and one code file, modeling_cognate.py: the native model code (cognate/model/model.py and every file it
imports) inlined in dependency order, followed by the Hugging Face classes. One file, because tools such as
mergekit copy only the file `auto_map` names.
"""

from __future__ import annotations

import ast
import copy
import json
import re
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, processors
from transformers import GenerationConfig, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from cognate.model import config as config_module
from cognate.model.config import HF_CONFIG_NAMES, CognateConfig

MODEL_PACKAGE = Path(config_module.__file__).parent
TEMPLATE = Path(__file__).parent / "hf_code" / "modeling_cognate.py"
CODE_FILE = "modeling_cognate.py"
AUTO_MAP = {
    "AutoConfig": "modeling_cognate.CognateHFConfig",
    "AutoModelForCausalLM": "modeling_cognate.CognateForCausalLM",
}
# `from cognate.model.x import ...` or `from .x import ...`; indented ones sit under `if TYPE_CHECKING:`.
_SIBLING_IMPORT = re.compile(
    r"^( *)from (?:cognate\.model)?\.(\w+) import (?:\([^)]*\)|[^\n]*)\n", re.MULTILINE
)
_FUTURE_IMPORT = re.compile(r"^from __future__ import [^\n]*\n", re.MULTILINE)


# tokenizer_config.json key of an hf_format tokenizer: the native tokenizer.json's post-processor (see hf_tokenizer).
NATIVE_POST_PROCESSOR = "cognate_native_post_processor"


# Settings `native_tokenizer` puts back in memory (and leaves out of tokenizer_config.json, as the native folder
# does): right padding, as a freshly made tokenizer pads, and exact decoding, as the native code decodes.
NATIVE_SETTINGS = {"padding_side": "right", "clean_up_tokenization_spaces": False}


class ExportError(RuntimeError):
    pass


def modeling_source() -> str:
    """modeling_cognate.py: the native model's files, then the template, sibling imports resolved by inlining."""
    order = [*_dependency_order("model", MODEL_PACKAGE), "__template__"]
    parts, defined = [], {}
    for name in order:
        path = TEMPLATE if name == "__template__" else MODEL_PACKAGE / f"{name}.py"
        source = path.read_text()
        body = _FUTURE_IMPORT.sub("", _SIBLING_IMPORT.sub(_drop_import, source))
        for imported in re.findall(r"^\s*(?:from|import) (cognate\S*)", body, re.MULTILINE):
            raise ExportError(
                f"{path} imports {imported}: exported model code may import only torch, the "
                "standard library and the other files of cognate/model"
            )
        for top_level in _top_level_names(source):
            if top_level in defined:
                raise ExportError(
                    f"{top_level!r} is defined in both {defined[top_level]} and {path.name}; "
                    "inlining them into one file would make one shadow the other"
                )
            defined[top_level] = path.name
        parts.append(f"# ---- {path.name} " + "-" * (100 - len(path.name)) + "\n" + body)
    return "from __future__ import annotations\n\n" + "\n\n".join(parts)


def _dependency_order(name: str, package: Path, seen: list[str] | None = None) -> list[str]:
    """`name` after every sibling module it imports, depth first."""
    seen = [] if seen is None else seen
    for indent, dependency in _SIBLING_IMPORT.findall((package / f"{name}.py").read_text()):
        if not indent and dependency not in seen:
            _dependency_order(dependency, package, seen)
    if name not in seen:
        seen.append(name)
    return seen


def _drop_import(match: re.Match) -> str:
    """Inlined siblings need no import; an indented one (under `if TYPE_CHECKING:`) leaves a `pass` behind."""
    return f"{match.group(1)}pass\n" if match.group(1) else ""


def _top_level_names(source: str) -> list[str]:
    names = []
    for node in ast.parse(source).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)):
            names.append(node.name)
        elif isinstance(node, ast.Assign):
            names += [t.id for t in node.targets if isinstance(t, ast.Name)]
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.append(node.target.id)
    return names


def hf_config_dict(config: CognateConfig, tokenizer: PreTrainedTokenizerBase | None) -> dict:
    """config.json: the standard Hugging Face names at the top level, every native field beside them."""
    values = config.to_dict()
    out = {hf_name: values.pop(field) for hf_name, field in HF_CONFIG_NAMES.items()}
    out.update(values)
    out.update(
        {
            "model_type": "cognate",
            "architectures": ["CognateForCausalLM"],
            "auto_map": AUTO_MAP,
            "torch_dtype": "float32",
            # Derived names tools read to size caches and attention; `generate` caches (modeling_cognate.py).
            "num_key_value_heads": config.n_heads,
            "head_dim": config.head_dim,
            "use_cache": True,
        }
    )
    if tokenizer is not None:
        # Every document the model saw followed an end-of-text token: it is the model's beginning of sequence.
        out.update(
            {
                "bos_token_id": tokenizer.eos_token_id,
                "eos_token_id": tokenizer.eos_token_id,
                "pad_token_id": tokenizer.pad_token_id,
            }
        )
    return out


def export_hf(
    state_dict: dict[str, torch.Tensor],
    config: CognateConfig,
    out_dir: Path,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> Path:
    """Write `out_dir` as a Hugging Face model folder; returns it."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / CODE_FILE).write_text(modeling_source())
    hf_config = hf_config_dict(config, tokenizer)
    (out_dir / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True))
    weights = {f"model.{name}": tensor.detach().contiguous().clone() for name, tensor in state_dict.items()}
    save_file(weights, out_dir / "model.safetensors", metadata={"format": "pt"})
    if tokenizer is not None:
        save_hf_tokenizer(tokenizer, out_dir)
        # No max_length: generate() would warn beside every max_new_tokens; max_position_embeddings bounds it.
        GenerationConfig(
            bos_token_id=tokenizer.eos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ).save_pretrained(out_dir)
    return out_dir


def hf_tokenizer(tokenizer: PreTrainedTokenizerFast) -> PreTrainedTokenizerFast:
    """A copy of the native tokenizer that behaves like a standard causal LM's: `tokenizer(text)` starts with the
    end-of-text token (the model's beginning of sequence, as in the packed training rows, and as `cognate
    generate` prompts), batches pad on the left (what batched generation needs) and give no token_type_ids.

    The beginning of sequence is a post-processor in tokenizer.json, which every transformers version applies.
    The native post-processor is kept in tokenizer_config.json, so `native_tokenizer` restores the exact file.
    """
    if NATIVE_POST_PROCESSOR in tokenizer.init_kwargs:
        return copy.deepcopy(tokenizer)  # already in this form
    hf = copy.deepcopy(tokenizer)
    eos = hf.eos_token
    hf.init_kwargs[NATIVE_POST_PROCESSOR] = json.loads(hf.backend_tokenizer.to_str())["post_processor"]
    hf.bos_token = eos
    hf.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{eos} $A", pair=f"{eos} $A {eos} $B", special_tokens=[(eos, hf.eos_token_id)]
    )
    # Decoding gives back the text exactly (transformers 4 "cleans up" spaces before punctuation by default).
    _set_saved(
        hf,
        padding_side="left",
        clean_up_tokenization_spaces=False,
        model_input_names=["input_ids", "attention_mask"],
    )
    return hf


def native_tokenizer(tokenizer: PreTrainedTokenizerFast) -> PreTrainedTokenizerFast:
    """The inverse of `hf_tokenizer`: the tokenizer (and the exact tokenizer.json) the model was trained with."""
    native = copy.deepcopy(tokenizer)
    if NATIVE_POST_PROCESSOR not in native.init_kwargs:
        return native
    state = json.loads(native.backend_tokenizer.to_str())
    state["post_processor"] = native.init_kwargs.pop(NATIVE_POST_PROCESSOR)
    # The whole backend from JSON: older tokenizers cannot set a post-processor back to None (no post-processing).
    native._tokenizer = Tokenizer.from_str(json.dumps(state))
    native.bos_token = None
    native.init_kwargs.pop("bos_token", None)
    _set_saved(native, **NATIVE_SETTINGS, model_input_names=type(native).model_input_names)
    for name in (*NATIVE_SETTINGS, "model_input_names"):
        native.init_kwargs.pop(name)
    return native


def _set_saved(tokenizer: PreTrainedTokenizerFast, **settings) -> None:
    """Set attributes and the init_kwargs save_pretrained writes to tokenizer_config.json."""
    tokenizer.init_kwargs.update(settings)
    for name, value in settings.items():
        setattr(tokenizer, name, value)


def save_hf_tokenizer(tokenizer: PreTrainedTokenizerFast, out_dir: Path) -> None:
    hf_tokenizer(tokenizer).save_pretrained(out_dir)
    # transformers 5 names the class TokenizersBackend, which 4.x does not know; both know this name.
    config_path = out_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
