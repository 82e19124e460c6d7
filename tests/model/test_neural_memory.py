"""The Titans neural memory (mem_kind="neural"): causal, per sequence, carried across calls, decoded like a forward,
written by a true gradient step, trained through its writes, and configured with a clear message."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from model_testing import random_tokens, small_config, small_model

from cognate.model.config import SPECIALIZATIONS, ConfigError, specialize
from cognate.model.generate import DecodeState
from cognate.model.model import CognateModel
from cognate.model.neural_memory import CONV_WIDTH, NeuralMemory, _associative_gradient, _normalised_gradient

CHUNK = 4
D_MODEL = 32


def make_memory(seed: int = 0) -> NeuralMemory:
    torch.manual_seed(seed)
    memory = NeuralMemory(small_config(mem_kind="neural", mem_neural_hidden=24))
    with torch.no_grad():  # values on the keys' scale, so that writes change what the memory returns
        memory.value.weight.normal_(std=0.3)
        memory.conv.normal_(std=0.5)  # convolutions that see the tokens before (they start as the identity)
    return memory


def neural_model(seed: int, **changes) -> CognateModel:
    """A small neural-memory model whose convolutions see the tokens before each one."""
    model = small_model(seed=seed, mem_kind="neural", **changes)
    with torch.no_grad():
        model.memory.conv.normal_(std=0.5)
    return model


def random_states(batch: int, length: int, seed: int) -> torch.Tensor:
    return torch.randn(batch, length, D_MODEL, generator=torch.Generator().manual_seed(seed))


def empty(model: CognateModel, batch: int):
    return model.memory.empty_state(model.cfg.t_infer, batch, "cpu", torch.float32)


@settings(max_examples=10, deadline=None)
@given(
    length=st.integers(9, 30),
    chunk=st.integers(0, 7),
    keep=st.integers(0, CHUNK - 1),
    seed=st.integers(0, 10),
)
def test_a_token_reads_only_what_chunks_before_its_own_wrote(length, chunk, keep, seed):
    """Rewriting the other tokens of a chunk leaves the reads of earlier chunks and of the kept token exactly as
    they were (it reads weights written before its chunk, with a query from itself and the CONV_WIDTH - 1 tokens
    before it, kept too), and changes the next chunk's reads."""
    chunk = min(chunk, (length - 1) // CHUNK)
    start, end = chunk * CHUNK, min(length, (chunk + 1) * CHUNK)
    keep = min(start + keep, end - 1)
    memory = make_memory()
    states = random_states(1, length, seed)
    changed = states.clone()
    changed[:, start:end] = random_states(1, end - start, seed + 1)
    query_window = slice(max(0, keep - CONV_WIDTH + 1), keep + 1)
    changed[:, query_window] = states[:, query_window]
    with torch.no_grad():
        read, read_changed = (memory.build(1, s, None, None).read for s in (states, changed))
    same = torch.zeros(length, dtype=torch.bool)
    same[:start] = True
    same[keep] = True
    torch.testing.assert_close(read_changed[:, same], read[:, same], rtol=0, atol=0)
    if end < length and not torch.equal(changed[:, start:end], states[:, start:end]):
        assert (read_changed[:, end:] - read[:, end:]).abs().max() > 1e-4


def test_changing_a_later_token_never_changes_earlier_outputs_of_the_model():
    model = neural_model(seed=1).eval()
    tokens = random_tokens(2, 24, seed=2)
    changed = tokens.clone()
    changed[:, 13:] = random_tokens(2, 11, seed=3)
    with torch.no_grad():
        out, out_changed = (model(t, memory_state=empty(model, 2)) for t in (tokens, changed))
    torch.testing.assert_close(out_changed.logits[:, :13], out.logits[:, :13], rtol=0, atol=1e-6)
    assert (out_changed.logits[:, 13:] - out.logits[:, 13:]).abs().max() > 1e-3


def test_sequences_in_a_batch_never_share_memory():
    memory = make_memory()
    states = random_states(3, 22, seed=5)
    with torch.no_grad():
        together = memory.build(1, states, None, None)
        alone = [memory.build(1, states[i : i + 1], None, None) for i in range(3)]
    torch.testing.assert_close(together.read, torch.cat([bank.read for bank in alone]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        together.offset2, torch.cat([bank.offset2 for bank in alone]), rtol=1e-5, atol=1e-6
    )


@settings(max_examples=10, deadline=None)
@given(split=st.integers(1, 26), seed=st.integers(0, 10_000))
def test_carrying_the_state_between_calls_reads_like_one_call(split, seed):
    memory = make_memory()
    states = random_states(2, 27, seed)
    with torch.no_grad():
        whole = memory.build(1, states, None, None)
        first = memory.build(1, states[:, :split], None, None)
        second = memory.build(1, states[:, split:], None, memory.next_state([first]))
    torch.testing.assert_close(torch.cat([first.read, second.read], dim=1), whole.read, rtol=1e-4, atol=1e-5)
    carried, expected = memory.next_state([second]), memory.next_state([whole])
    assert carried.next_chunk == expected.next_chunk == 27 // CHUNK
    for name in ("offset1", "offset2", "momentum1", "momentum2", "pending_states", "context_states"):
        torch.testing.assert_close(getattr(carried, name), getattr(expected, name), rtol=1e-4, atol=1e-5)


def test_state_select_and_detach_keep_the_chosen_sequences():
    memory = make_memory()
    with torch.no_grad():
        state = memory.next_state([memory.build(1, random_states(3, 10, seed=1), None, None)])
    chosen = state.select([2, 0])
    assert chosen.batch_size == 2 and chosen.next_chunk == state.next_chunk == 2
    torch.testing.assert_close(chosen.offset1[:, 0], state.offset1[:, 2])
    torch.testing.assert_close(chosen.pending_states[:, 1], state.pending_states[:, 0])
    assert not state.detach().offset1.requires_grad
    with pytest.raises(ValueError, match="2 sequences"):
        memory.build(1, random_states(3, 4, seed=2), None, chosen)


def _chunk(scale: float):
    """One chunk of two sequences: 5 similar keys, values, step sizes and memory weights times `scale`."""
    torch.manual_seed(0)
    keys = torch.nn.functional.normalize(torch.randn(2, 1, 6) + 0.3 * torch.randn(2, 5, 6), dim=-1)
    values, step_size = torch.randn(2, 5, 6), 0.5 + torch.rand(2, 5) / 2
    weight1 = (scale * torch.randn(2, 6, 8)).requires_grad_()
    weight2 = (scale * torch.randn(2, 8, 6) / 8**0.5).requires_grad_()
    return keys, values, step_size, weight1, weight2


def test_a_write_is_a_gradient_step_on_the_associative_loss():
    keys, values, step_size, weight1, weight2 = _chunk(scale=1.0)
    error = torch.nn.functional.silu(keys @ weight1) @ weight2 - values
    expected = torch.autograd.grad((step_size[..., None] * error.square()).sum(), (weight1, weight2))
    grad1, grad2, _, _ = _associative_gradient(keys, values, step_size, weight1, weight2)
    torch.testing.assert_close(grad1, expected[0])
    torch.testing.assert_close(grad2, expected[1])


@pytest.mark.parametrize("scale", [1.0, 3.0])
def test_the_normalised_write_lowers_the_associative_loss_where_a_plain_step_overshoots(scale):
    chunk = _chunk(scale)
    keys, values, step_size, weight1, weight2 = chunk
    grad1, grad2, before = _normalised_gradient(*chunk)
    _, _, after = _normalised_gradient(keys, values, step_size, weight1 - grad1, weight2 - grad2)
    assert (after < before).all()
    plain1, plain2, _, _ = _associative_gradient(*chunk)
    *_, overshot = _associative_gradient(keys, values, step_size, weight1 - plain1, weight2 - plain2)
    assert (overshot > before).all()  # the unnormalised step with the same θ makes it worse


def test_the_lm_loss_trains_every_memory_parameter_through_the_writes():
    """Second order: W_K and W_V reach the output only through the writes, and still get a gradient."""
    model = neural_model(seed=4).train()
    tokens = random_tokens(2, 20, seed=6)
    model(tokens, random_tokens(2, 20, seed=7)).loss.backward()
    for name, parameter in model.named_parameters():
        if "memory" in name:
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


@pytest.mark.parametrize("window", [None, 6])
def test_decoding_piece_by_piece_gives_the_logits_and_memory_of_evaluating_the_whole_sequence(window):
    model = neural_model(seed=5, attn_window=window).eval()
    tokens = random_tokens(2, 26, seed=8)
    whole = model(tokens, memory_state=empty(model, 2))
    state, start, pieces = DecodeState(), 0, []
    for n in (5, 1, 1, 3, 1, 4, 1, 1, 8, 1):
        pieces.append(model.decode(tokens[:, start : start + n], state))
        start += n
    torch.testing.assert_close(torch.cat(pieces, dim=1), whole.logits, rtol=1e-4, atol=1e-5)
    carried, expected = state.memory_state, whole.memory_state
    assert carried.next_chunk == expected.next_chunk == 26 // CHUNK
    torch.testing.assert_close(carried.offset2, expected.offset2, rtol=1e-4, atol=1e-6)


def test_greedy_generation_with_the_cache_equals_recomputing_the_whole_sequence():
    model = neural_model(seed=1, attn_window=6)
    with torch.no_grad():  # a memory whose read matters to the greedy tokens
        for block in model.layers:
            block.memory_read.out.weight.mul_(50.0)
    prompt = random_tokens(2, 7, seed=4)
    cached = model.generate(prompt, 22)
    assert torch.equal(cached, model.generate(prompt, 22, use_cache=False))
    assert all(len(row.unique()) > 2 for row in cached[:, 7:])  # not a constant loop hiding a wrong memory


def test_mem_kind_is_validated_with_a_clear_message():
    with pytest.raises(ConfigError, match=r"mem_kind='mlp' must be one of: 'slots', 'neural'"):
        small_config(mem_kind="mlp")
    with pytest.raises(ConfigError, match="mem_neural_hidden=0 must be positive"):
        small_config(mem_kind="neural", mem_neural_hidden=0)


@pytest.mark.parametrize("specialization", SPECIALIZATIONS)
def test_specializations_of_a_neural_model_keep_its_tensors_so_they_stay_mergeable(specialization):
    config = small_config(mem_kind="neural")
    special = specialize(config, specialization)
    assert special.mem_kind == "neural"
    with torch.device("meta"):
        shapes = [{k: v.shape for k, v in CognateModel(c).state_dict().items()} for c in (config, special)]
    assert shapes[0] == shapes[1]
    assert not any("memory_read.key" in name for name in shapes[0])  # no slot-memory tensors
