"""A model with the neural memory (mem_kind="neural") survives the model folder and the hf_format/ export: the
native reload and transformers' loader give its logits, and generation (cache, no cache, beam search) its tokens."""

import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from cognate.export.model_dir import load_model_dir, save_model_dir

sys.path.insert(0, str(Path(__file__).parents[1] / "model"))
from model_testing import random_tokens, small_model

pytestmark = pytest.mark.usefixtures("offline_one_thread")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A small neural-memory model, exported. Its blocks' matrices and memory reads are scaled up so that greedy
    tokens depend on the context and the memory (a fresh small model's fall into a context-free cycle)."""
    model = small_model(seed=3, mem_kind="neural").eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.startswith("layers.") and parameter.dim() == 2:
                parameter.mul_(20.0)
        model.memory.conv.normal_(
            std=0.5
        )  # convolutions that see earlier tokens: the carried context matters
    folder = tmp_path_factory.mktemp("neural") / "model"
    save_model_dir(model, folder)
    hf_model = AutoModelForCausalLM.from_pretrained(folder / "hf_format", trust_remote_code=True).eval()
    return model, folder, hf_model


def test_the_model_folder_reloads_natively_with_the_neural_memory(exported):
    model, folder, _ = exported
    reloaded = load_model_dir(folder)
    assert reloaded.cfg.mem_kind == "neural"
    ids = random_tokens(2, 30, seed=1)  # several chunks: memory writes and reads
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reloaded(ids).logits)


def test_hf_format_gives_the_native_logits_and_generates_the_native_tokens(exported):
    model, _, hf_model = exported
    assert type(hf_model.model.memory).__name__ == "NeuralMemory"  # the exported file's own class
    ids = random_tokens(2, 30, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(hf_model(ids).logits, model(ids).logits, atol=1e-5, rtol=0)
    prompt = random_tokens(2, 11, seed=4)
    expected = model.generate(prompt, 20)
    assert len(expected[0, 11:].unique()) > 2  # the tokens depend on the context, not a constant loop
    for use_cache in (True, False):
        with torch.no_grad():
            out = hf_model.generate(
                prompt,
                attention_mask=torch.ones_like(prompt),
                max_new_tokens=20,
                min_new_tokens=20,
                do_sample=False,
                pad_token_id=0,
                use_cache=use_cache,
            )
        assert torch.equal(out, expected), use_cache


def test_beam_search_reorders_the_neural_memory_as_recomputing_would(exported):
    _, _, hf_model = exported
    prompt = random_tokens(1, 9, seed=6)

    def beams(use_cache: bool) -> torch.Tensor:
        with torch.no_grad():
            return hf_model.generate(
                prompt,
                attention_mask=torch.ones_like(prompt),
                max_new_tokens=10,
                num_beams=2,  # not t_infer (3): a state indexed on the wrong dimension fails
                do_sample=False,
                pad_token_id=0,
                use_cache=use_cache,
            )

    assert torch.equal(beams(True), beams(False))
