"""Generation through the hf_format/ export: the transformers cache API and left padding, against the native
`CognateModel.generate` (KV cache per refinement step and layer, carried memory, per-token halting)."""

import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.cache_utils import Cache

from cognate.export.hf import export_hf

sys.path.insert(0, str(Path(__file__).parents[1] / "model"))
from model_testing import random_tokens, small_model

PAD = 0  # a token id for generate's padding; the prompts' pad positions are masked out


pytestmark = pytest.mark.usefixtures("offline_one_thread")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A small model whose tokens halt at different steps and whose memory writes every 4 tokens, exported.

    Its blocks' matrices are scaled up 20x: a fresh small model's greedy tokens fall into a cycle that ignores the
    context (padding, positions, memory), which would let a wrong cache pass; these depend on all of it.
    """
    model = small_model(seed=3).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.startswith("layers.") and parameter.dim() == 2:
                parameter.mul_(20.0)
    folder = export_hf(model.state_dict(), model.cfg, tmp_path_factory.mktemp("hf") / "hf_format")
    hf_model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    return model, hf_model


def hf_greedy(hf_model, input_ids, new_tokens, **kwargs):
    # An explicit mask: without one, generate would take a prompt's token PAD for padding.
    kwargs.setdefault("attention_mask", torch.ones_like(input_ids))
    with torch.no_grad():
        return hf_model.generate(
            input_ids,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=PAD,
            **kwargs,
        )


def test_the_comparisons_mean_something_halting_varies_and_tokens_depend_on_the_context(exported):
    model, _ = exported
    with torch.no_grad():
        steps = model(random_tokens(2, 30, seed=1)).act["steps"]
    assert len(steps.unique()) > 1
    prompt = random_tokens(1, 9, seed=2)
    shifted = torch.cat((torch.full((1, 3), PAD), prompt), 1)  # the same prompt with pad tokens as tokens
    assert not torch.equal(model.generate(prompt, 12)[:, 9:], model.generate(shifted, 12)[:, 12:])


def test_cached_generate_reads_one_token_per_step_and_gives_the_native_tokens(exported):
    model, hf_model = exported
    prompt = random_tokens(2, 11, seed=4)
    lengths = []
    hook = hf_model.register_forward_pre_hook(
        lambda _m, _args, kwargs: lengths.append(kwargs["input_ids"].size(1)), with_kwargs=True
    )
    try:
        cached = hf_greedy(hf_model, prompt, 20)
    finally:
        hook.remove()
    assert lengths == [11] + [1] * 19
    assert torch.equal(cached, model.generate(prompt, 20))
    assert torch.equal(hf_greedy(hf_model, prompt, 20, use_cache=False), cached)


def test_the_forward_returns_a_transformers_cache_that_continues_the_sequence(exported):
    _, hf_model = exported
    ids = random_tokens(1, 14, seed=5)
    with torch.no_grad():
        first = hf_model(ids[:, :9], use_cache=True)
        cache = first.cache if "cache" in first else first.past_key_values
        assert isinstance(cache, Cache) and cache.get_seq_length() == 9
        rest = hf_model(ids[:, 9:], use_cache=True, **{"past_key_values": cache})
        whole = hf_model(ids, use_cache=True)
    torch.testing.assert_close(torch.cat((first.logits, rest.logits), 1), whole.logits, atol=1e-5, rtol=0)


def test_a_left_padded_batch_generates_exactly_what_each_prompt_generates_alone(exported):
    model, hf_model = exported
    lengths = (3, 9, 14, 9)  # different chunk phases of the memory; two rows share a length
    prompts = [random_tokens(1, n, seed=10 + i)[0] for i, n in enumerate(lengths)]
    width = max(lengths)
    batch = torch.full((len(prompts), width), PAD)
    mask = torch.zeros_like(batch)
    for row, prompt in enumerate(prompts):
        batch[row, width - len(prompt) :] = prompt
        mask[row, width - len(prompt) :] = 1
    for use_cache in (True, False):
        out = hf_greedy(hf_model, batch, 16, attention_mask=mask, use_cache=use_cache)
        for row, prompt in enumerate(prompts):
            alone = model.generate(prompt[None], 16)
            assert out[row, width:].tolist() == alone[0, len(prompt) :].tolist(), (use_cache, row)


def test_the_plain_forward_of_a_left_padded_batch_gives_each_rows_own_logits(exported):
    model, hf_model = exported
    short, long = random_tokens(1, 5, seed=20), random_tokens(1, 12, seed=21)
    batch = torch.cat((torch.cat((torch.full((1, 7), PAD), short), 1), long))
    mask = (torch.arange(12) >= torch.tensor([[7], [0]])).long()
    with torch.no_grad():
        logits = hf_model(batch, attention_mask=mask).logits
        torch.testing.assert_close(logits[0, 7:], model(short).logits[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(logits[1], model(long).logits[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("use_cache", [True, False])
def test_right_or_inner_padding_is_an_error_not_a_silent_difference(exported, use_cache):
    _, hf_model = exported
    ids = random_tokens(2, 6, seed=30)
    for mask in ([[1, 1, 1, 1, 0, 0], [1] * 6], [[1, 1, 0, 1, 1, 1], [1] * 6]):
        with pytest.raises(ValueError, match="left padding"):
            hf_greedy(hf_model, ids, 2, attention_mask=torch.tensor(mask), use_cache=use_cache)


def test_beam_search_reorders_the_cache_as_recomputing_would(exported):
    _, hf_model = exported
    prompt = random_tokens(2, 7, seed=40)
    cached = hf_greedy(hf_model, prompt, 10, num_beams=3)
    assert torch.equal(cached, hf_greedy(hf_model, prompt, 10, num_beams=3, use_cache=False))
