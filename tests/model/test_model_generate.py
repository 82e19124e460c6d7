"""generate(): the KV cache changes nothing but speed; sampling, nucleus and end-of-sequence handling."""

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from model_testing import VOCAB, random_tokens, small_model

from cognate.model.generate import DecodeState, sample


@pytest.mark.parametrize(
    ("window", "memory"),
    [(None, False), (6, False), (None, True), (6, True)],
    ids=["full", "window", "memory", "both"],
)
def test_greedy_generation_with_the_cache_equals_recomputing_the_whole_sequence(window, memory):
    """Per-step KV caches bounded to the window, memory carried across chunks, per-token halting: same tokens."""
    model = small_model(seed=2, attn_window=window, mem_enabled=memory)
    prompt = random_tokens(2, 7, seed=4)  # 1 complete memory chunk + 3 pending tokens, longer than the window
    cached = model.generate(prompt, 22)
    recomputed = model.generate(prompt, 22, use_cache=False)
    assert torch.equal(cached, recomputed)
    assert cached.shape == (2, 29) and torch.equal(cached[:, :7], prompt)
    steps = model.eval()(cached).act["steps"]
    assert len(steps.unique()) > 1  # halting really did differ between tokens along the way


def test_a_token_that_halted_while_decoding_only_lends_its_keys_and_values_to_later_steps():
    """One token per call: a halted token skips the rest of its steps except their key/value projections, which
    later tokens attend to (the greedy tokens still match recomputation, above)."""
    model = small_model(seed=2).eval()
    tokens = random_tokens(1, 12, seed=4)
    empty_memory = model.memory.empty_state(model.cfg.t_infer, 1, "cpu", torch.float32)
    steps = model(tokens, memory_state=empty_memory).act["steps"]  # the same rule, the whole sequence at once
    ffn_rows, kv_only = [], []
    for block in model.layers:
        block.ffn.register_forward_hook(
            lambda _m, inputs, _out: ffn_rows.append(inputs[0].shape[:-1].numel())
        )
        block.attn.lend_keys_values = _recording(block.attn.lend_keys_values, kv_only)
    state = DecodeState()
    for i in range(tokens.size(1)):
        model.decode(tokens[:, i : i + 1], state)
    n_layers, t_infer = model.cfg.n_layers, model.cfg.t_infer
    assert steps.min() < t_infer
    assert sum(ffn_rows) == n_layers * int(steps.sum())
    assert len(kv_only) == n_layers * int((t_infer - steps).sum())
    assert all(cache.keys.size(-2) == tokens.size(1) for caches in state.caches for cache in caches)


def _recording(method, calls: list):
    def record(*args, **kwargs):
        calls.append(args)
        return method(*args, **kwargs)

    return record


@pytest.mark.parametrize("window", [None, 6])
def test_decoding_piece_by_piece_gives_the_logits_and_memory_of_evaluating_the_whole_sequence(window):
    """Stricter than equal greedy tokens: every position's logits and the carried memory match."""
    model = small_model(seed=5, attn_window=window).eval()
    tokens = random_tokens(2, 26, seed=8)
    whole = model(tokens, memory_state=model.memory.empty_state(model.cfg.t_infer, 2, "cpu", torch.float32))
    state, start, pieces = DecodeState(), 0, []
    for n in (5, 1, 1, 3, 1, 4, 1, 1, 8, 1):
        pieces.append(model.decode(tokens[:, start : start + n], state))
        start += n
    torch.testing.assert_close(torch.cat(pieces, dim=1), whole.logits, rtol=1e-4, atol=1e-5)
    carried, expected = state.memory_state, whole.memory_state
    assert carried.next_chunk == expected.next_chunk == 26 // model.cfg.mem_chunk_size
    torch.testing.assert_close(carried.strength, expected.strength, rtol=1e-4, atol=1e-6)
    # The last token came alone: its surprise was measured against the previous call's logits, not lost.
    torch.testing.assert_close(carried.pending_surprise, expected.pending_surprise, equal_nan=True)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_each_position_is_a_function_of_its_prefix_at_every_length_and_by_forward_or_decode(mode):
    """Short inputs with memory on and no memory state given: the logits of the first S tokens are the same when
    S + 1 tokens are run, and (in evaluation) when the tokens are decoded one by one. A rule that turned memory
    on only from some length would break both at that length."""
    model = small_model(seed=3).train(mode == "train")
    with torch.no_grad():  # a strong memory read, so that whether memory runs shows in the logits
        for block in model.layers:
            block.memory_read.out.weight.mul_(300)
    tokens = random_tokens(2, 13, seed=4)
    runs = [model(tokens[:, :length]) for length in range(1, tokens.size(1) + 1)]
    assert runs[-1].memory["slots_used"] > 0
    for shorter, longer in itertools.pairwise(runs):
        length = shorter.logits.size(1)
        torch.testing.assert_close(longer.logits[:, :length], shorter.logits, rtol=1e-4, atol=1e-5)
    if mode == "eval":
        state = DecodeState()
        decoded = torch.cat([model.decode(tokens[:, i : i + 1], state) for i in range(tokens.size(1))], dim=1)
        torch.testing.assert_close(decoded, runs[-1].logits, rtol=1e-4, atol=1e-5)


def test_generation_leaves_the_model_in_the_mode_it_found_it():
    model = small_model().train()
    model.generate(random_tokens(1, 3), 2)
    assert model.training


def test_a_finished_sequence_is_padded_with_eos_and_generation_stops_when_all_are():
    model = small_model(seed=3)
    prompt = random_tokens(2, 4, seed=6)
    free = model.generate(prompt, 6)
    eos = int(free[0, 4])  # the first sequence's first generated token, never produced by the second one
    assert eos not in free[1, 4:].tolist()
    out = model.generate(prompt, 6, eos_token_id=eos)
    assert (out[0, 4:] == eos).all() and torch.equal(out[1], free[1])
    alone = model.generate(prompt[:1], 6, eos_token_id=eos)
    assert alone.shape == (1, 5)  # stopped right after every sequence produced eos


def test_sampling_is_reproducible_with_a_generator_and_temperature_zero_is_greedy():
    model = small_model()
    prompt = random_tokens(2, 5)
    draws = [
        model.generate(prompt, 8, temperature=1.0, generator=torch.Generator().manual_seed(9))
        for _ in range(2)
    ]
    assert torch.equal(draws[0], draws[1])
    assert torch.equal(model.generate(prompt, 8, temperature=0.0), model.generate(prompt, 8))


@settings(max_examples=40, deadline=None)
@given(top_p=st.floats(0.01, 0.99), seed=st.integers(0, 2**16))
def test_nucleus_sampling_draws_only_from_the_smallest_set_reaching_top_p(top_p, seed):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(1, VOCAB, generator=generator) * 3
    probs = torch.softmax(logits, -1)[0]
    order = probs.argsort(descending=True)
    mass_before = probs[order].cumsum(0) - probs[order]
    nucleus = set(order[mass_before < top_p].tolist())
    drawn = {int(sample(logits, 1.0, top_p, generator)) for _ in range(30)}
    assert drawn <= nucleus


def test_nucleus_sampling_draws_the_nucleus_in_proportion_to_its_renormalised_probabilities():
    # p = 0.4, 0.3, 0.2, 0.1: with top_p 0.8 the nucleus is the first three, drawn as 4/9, 3/9, 2/9 (a greedy or
    # an untruncated sampler fails this); temperature 2 flattens to softmax(log p / 2) before the cut.
    logits = torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.1]])).expand(6000, 4)
    drawn = sample(logits, 1.0, 0.8, torch.Generator().manual_seed(0))
    frequencies = torch.bincount(drawn, minlength=4).float() / len(drawn)
    torch.testing.assert_close(frequencies, torch.tensor([4 / 9, 3 / 9, 2 / 9, 0.0]), rtol=0, atol=0.02)
    flat = torch.tensor([0.4, 0.3, 0.2, 0.1]).sqrt()
    flat = flat / flat.sum()  # 0.33, 0.28, 0.23, 0.16: the cut at 0.8 now falls after the third token too
    drawn = sample(logits, 2.0, 0.8, torch.Generator().manual_seed(1))
    frequencies = torch.bincount(drawn, minlength=4).float() / len(drawn)
    expected = torch.cat([flat[:3] / flat[:3].sum(), torch.zeros(1)])
    torch.testing.assert_close(frequencies, expected, rtol=0, atol=0.02)


def test_invalid_sampling_settings_are_refused():
    model = small_model()
    with pytest.raises(ValueError, match="top_p"):
        model.generate(random_tokens(1, 3), 2, top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        model.generate(random_tokens(1, 3), 2, temperature=-1.0)
