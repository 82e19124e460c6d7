"""The hf_format/ export: loads through transformers alone in a fresh process (no `cognate` import), gives the
native logits, generates, and ships its tokenizer; the model folder reloads natively without unpickling."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from model_testing import small_tokenizer_and_config

from cognate.export.hf import modeling_source
from cognate.export.model_dir import TORCH_WEIGHTS, load_model_dir, save_model_dir
from cognate.model.model import CognateModel

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    tokenizer, config = small_tokenizer_and_config(seed=3, mem_chunk_size=16)
    torch.manual_seed(0)
    model = CognateModel(config).eval()
    folder = tmp_path_factory.mktemp("export") / "model"
    save_model_dir(model, folder, tokenizer=tokenizer, stats={"seed": 42})
    return folder, model, tokenizer


def test_model_folder_reloads_natively_and_its_torch_weights_load_without_unpickling(model_dir):
    folder, model, _ = model_dir
    reloaded = load_model_dir(folder)
    ids = torch.randint(0, model.cfg.vocab_size, (2, 80))  # long enough for memory reads and writes
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reloaded(ids).logits)
    state = torch.load(folder / TORCH_WEIGHTS, weights_only=True)
    assert state.keys() == model.state_dict().keys()


def test_config_json_uses_standard_names_at_the_top_level(model_dir):
    folder, model, _ = model_dir
    for config_path in (folder / "config.json", folder / "hf_format" / "config.json"):
        config = json.loads(config_path.read_text())
        assert config["vocab_size"] == model.cfg.vocab_size
        assert config["hidden_size"] == model.cfg.d_model
        assert config["num_hidden_layers"] == model.cfg.n_layers
        assert config["max_position_embeddings"] == model.cfg.max_seq_len
        assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_cognate.CognateForCausalLM"


def test_the_modeling_file_is_self_contained(model_dir):
    source = (model_dir[0] / "hf_format" / "modeling_cognate.py").read_text()
    assert source == modeling_source()
    assert "import cognate" not in source and "from cognate" not in source
    assert "from ." not in source


def test_hf_format_loads_through_transformers_alone_with_the_same_logits_and_generates(model_dir, tmp_path):
    folder, model, _ = model_dir
    ids = torch.randint(0, model.cfg.vocab_size, (2, 80))
    with torch.no_grad():
        expected = model(ids).logits
    torch.save({"ids": ids, "logits": expected}, tmp_path / "reference.pt")
    script = textwrap.dedent(f"""
        import sys, torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        folder = {str(folder / "hf_format")!r}
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
        reference = torch.load({str(tmp_path / "reference.pt")!r}, weights_only=True)
        with torch.no_grad():
            logits = model(reference["ids"]).logits
        assert torch.allclose(logits, reference["logits"], atol=1e-5), (logits - reference["logits"]).abs().max()
        prompt = tokenizer("Problem: 2 + 3", return_tensors="pt").input_ids
        out = model.generate(prompt, max_new_tokens=5, do_sample=False)
        assert out.shape == (1, prompt.shape[1] + 5), out.shape
        # The model's convention: a text follows end-of-text; batches pad on the left; no token_type_ids.
        assert tokenizer.bos_token == tokenizer.eos_token == "<|endoftext|>"
        assert prompt[0, 0].item() == tokenizer.eos_token_id == model.config.bos_token_id
        batch = tokenizer(["Problem: 2 + 3", "x"], padding=True)
        assert sorted(batch) == ["attention_mask", "input_ids"] and batch["attention_mask"][1][0] == 0
        for name, value in (("num_key_value_heads", 2), ("head_dim", 16), ("use_cache", True)):
            assert getattr(model.config, name) == value, name
        print("names", sorted(name for name in sys.modules if name.split(".")[0] == "cognate"))
        print("layers", any(k.startswith("model.layers.0.") for k in model.state_dict()))
    """)
    result = subprocess.run(
        [sys.executable, "-c", script], env=ENV, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "names []" in result.stdout  # cognate was never imported
    assert "layers True" in result.stdout  # per-layer weight names: model.layers.{i}.…


def test_the_model_cards_snippet_runs_without_a_question_or_a_warning(model_dir):
    folder = model_dir[0]
    card = (folder / "README.md").read_text()
    snippet = card.split("```python\n", 1)[1].split("```", 1)[0]
    result = subprocess.run(
        [sys.executable, "-c", snippet],
        cwd=folder,
        env={**ENV, "TRANSFORMERS_VERBOSITY": "info"},  # info shows warnings and anything louder
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "[y/N]" not in result.stdout + result.stderr
    warnings = [line for line in result.stderr.splitlines() if "warn" in line.lower()]
    assert not warnings, warnings
    assert result.stdout.startswith("['Problem: 2 + 3 = ?")
