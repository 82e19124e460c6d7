"""`cognate generate` on a tiny random model folder: it prints the prompt and its continuation."""

import pytest
import torch

from cognate.cli import main
from cognate.data import synthetic
from cognate.data.tokenizer import encode_texts, load_tokenizer, train_tokenizer
from cognate.export.model_dir import load_model_dir, save_model_dir
from cognate.model.config import CognateConfig
from cognate.model.model import CognateModel

PROMPT = "Problem: Ava has 5 apples and buys 3 more. How many apples does Ava have?\nSolution:\n"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    texts = [d.text for docs in synthetic.generate(seed=7).values() for d in docs[:100]]
    tokenizer = train_tokenizer(texts, vocab_size=300)
    config = CognateConfig(
        name="generate-test",
        vocab_size=len(tokenizer),
        d_model=32,
        n_layers=2,
        n_heads=2,
        ffn_hidden=64,
        max_seq_len=256,
        act_hidden=16,
        mem_capacity=6,
        mem_topk=3,
        mem_dim=16,
        mem_chunk_size=8,
    )
    torch.manual_seed(0)
    return save_model_dir(
        CognateModel(config), tmp_path_factory.mktemp("model") / "model", tokenizer=tokenizer
    )


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def generate(capsys, *argv: str) -> tuple[int, str]:
    code = main(["generate", *argv])
    return code, capsys.readouterr().out


def test_greedy_generation_prints_the_prompt_and_the_models_own_continuation(model_dir, capsys):
    code, out = generate(capsys, "--model", str(model_dir), "--prompt", PROMPT, "--max-new-tokens", "12")
    assert code == 0 and out.startswith(PROMPT)
    continuation = out[len(PROMPT) :].removesuffix("\n")
    assert continuation
    # The same tokens as the model's greedy decoding of the prompt after an end-of-text token.
    model, tokenizer = load_model_dir(model_dir), load_tokenizer(model_dir)
    eos = tokenizer.eos_token_id
    ids = torch.tensor([[eos, *encode_texts(tokenizer, [PROMPT])[0].tolist()]])
    new = model.generate(ids, 12, eos_token_id=eos)[0, ids.size(1) :].tolist()
    assert continuation == tokenizer.decode(new[: new.index(eos)] if eos in new else new)


def test_sampling_is_reproducible_for_a_seed(model_dir, capsys):
    args = ["--model", str(model_dir), "--prompt", "Task:", "--max-new-tokens", "16", "--temperature", "1.5"]
    first = generate(capsys, *args, "--seed", "1")
    assert first[0] == 0
    assert generate(capsys, *args, "--seed", "1") == first
    others = {generate(capsys, *args, "--seed", str(seed))[1] for seed in range(2, 6)}
    assert others - {first[1]}  # a high temperature over a random model: other seeds give other text


def test_a_folder_that_is_not_a_model_is_an_error(tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path), "--prompt", "x"]) == 1
    assert "not a model folder" in capsys.readouterr().err
