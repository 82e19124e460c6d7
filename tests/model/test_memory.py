"""The long-term memory on its own: causality, batch independence, eviction, decay, losses, carried state."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cognate.model.config import CognateConfig
from cognate.model.memory import RETRIEVAL_TEMPERATURE, LongTermMemory, MemoryRead, MemoryState

D_MODEL = 32


def make_config(**changes) -> CognateConfig:
    base = dict(
        vocab_size=64,
        d_model=D_MODEL,
        n_layers=2,
        n_heads=2,
        ffn_hidden=64,
        max_seq_len=512,
        mem_capacity=6,
        mem_topk=3,
        mem_dim=16,
        mem_chunk_size=4,
        mem_decay=0.9,
    )
    return CognateConfig(**{**base, **changes})


def make_memory(seed: int = 0, **changes) -> tuple[LongTermMemory, MemoryRead]:
    torch.manual_seed(seed)
    cfg = make_config(**changes)
    return LongTermMemory(cfg).eval(), MemoryRead(cfg).eval()


def random_inputs(batch: int, seq_len: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    states = torch.randn(batch, seq_len, D_MODEL, generator=generator)
    surprise = torch.rand(batch, seq_len, generator=generator)
    return states, surprise


def read(memory: LongTermMemory, reader: MemoryRead, states, surprise, prior=None, step: int = 1):
    bank = memory.build(step, states, surprise, prior)
    return reader(states, bank), bank


@settings(max_examples=25, deadline=None)
@given(
    seq_len=st.integers(1, 60),
    chunk=st.integers(2, 8),
    capacity=st.integers(1, 8),
    decay=st.sampled_from([0.5, 0.9, 1.0]),
    seed=st.integers(0, 10_000),
)
def test_a_token_sees_only_slots_from_strictly_earlier_chunks(seq_len, chunk, capacity, decay, seed):
    memory, _ = make_memory(
        mem_chunk_size=chunk, mem_capacity=capacity, mem_topk=min(3, capacity), mem_decay=decay
    )
    states, surprise = random_inputs(2, seq_len, seed)
    with torch.no_grad():
        bank = memory.build(1, states, surprise, None)
    token_chunk = torch.arange(seq_len) // chunk
    slot_chunk = torch.arange(bank.n_slots)
    allowed = slot_chunk[None, :] < token_chunk[:, None]
    assert not (bank.visible & ~allowed).any()
    selected = (bank.read_bias > float("-inf")) & bank.reads.bool()
    assert not (selected & ~bank.visible).any()
    # Each token reads at most top-k slots and at most `capacity` are alive for it.
    assert (bank.visible.sum(-1) <= capacity).all()
    assert (selected.sum(-1) <= memory.cfg.mem_topk).all()


@settings(max_examples=15, deadline=None)
@given(seq_len=st.integers(9, 48), cut=st.integers(0, 47), seed=st.integers(0, 10_000))
def test_changing_a_chunk_never_changes_the_reads_of_its_own_or_earlier_chunks(seq_len, cut, seed):
    memory, reader = make_memory()
    chunk = memory.cfg.mem_chunk_size
    cut = cut % seq_len
    states, surprise = random_inputs(1, seq_len, seed)
    changed_states, changed_surprise = states.clone(), surprise.clone()
    changed_states[:, cut:] += torch.randn_like(changed_states[:, cut:]) * 3
    changed_surprise[:, cut:] = 0.01
    with torch.no_grad():
        before, _ = read(memory, reader, states, surprise)
        after, _ = read(memory, reader, changed_states, changed_surprise)
    # Tokens before the cut (also those sharing its chunk) read the same: they see only chunks before their own.
    torch.testing.assert_close(before[:, :cut], after[:, :cut])
    assert cut // chunk == (seq_len - 1) // chunk or not torch.allclose(before[:, cut:], after[:, cut:])


def test_sequences_in_a_batch_never_share_memory():
    memory, reader = make_memory()
    states, surprise = random_inputs(3, 40, seed=1)
    with torch.no_grad():
        together, _ = read(memory, reader, states, surprise)
        alone = [read(memory, reader, states[i : i + 1], surprise[i : i + 1])[0] for i in range(3)]
        other = states.clone()
        other[1:] = torch.randn_like(other[1:])
        changed_neighbours, _ = read(memory, reader, other, surprise)
    torch.testing.assert_close(together, torch.cat(alone), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(changed_neighbours[0], together[0])


def test_eviction_keeps_the_capacity_and_the_strongest_slots():
    memory, _ = make_memory(mem_capacity=3, mem_topk=2, mem_decay=1.0)
    states, surprise = random_inputs(2, 64, seed=2)  # 16 chunks for 3 slots
    with torch.no_grad():
        bank = memory.build(1, states, surprise, None)
        state = memory.next_state([bank])
    assert (bank.visible.sum(-1) <= 3).all()
    assert (bank.visible[:, -1].sum(-1) == 3).all()  # a long sequence fills the memory
    assert (bank.alive_at_end.sum(-1) == 3).all()
    # Without decay the survivors are the three strongest writes of the whole sequence.
    strongest = bank.rank_key.topk(3, dim=-1).indices.sort(dim=-1).values
    survivors = bank.alive_at_end.nonzero()[:, 1].view(2, 3)
    assert torch.equal(survivors, strongest)
    assert state.strength.shape == (1, 2, 3)
    assert (state.strength > 0).all()


def test_decay_forgets_old_slots_and_weakens_carried_ones():
    states, surprise = random_inputs(1, 32, seed=3)  # 8 chunks
    strong_old = None
    for decay in (1.0, 0.5):
        memory, _ = make_memory(mem_capacity=1, mem_topk=1, mem_decay=decay)
        prior = memory.empty_state(1, 1, "cpu", torch.float32)
        prior.keys[0, 0, 0] = torch.randn(16)
        prior.strength[0, 0, 0] = 1.0  # stronger than any write can be (every factor of a write is < 1)
        with torch.no_grad():
            bank = memory.build(1, states, surprise, prior)
            state = memory.next_state([bank])
        old_visible_to_last_chunk = bank.visible[0, -1, 0].item()
        if decay == 1.0:
            strong_old = old_visible_to_last_chunk
            assert state.strength[0, 0, 0].item() == pytest.approx(1.0)
        else:
            assert not old_visible_to_last_chunk  # halved per chunk: a newer write replaced it
            assert state.strength[0, 0, 0].item() < 1.0
    assert strong_old  # without decay nothing could evict it


def test_a_carried_slot_decays_by_mem_decay_per_chunk():
    memory, _ = make_memory(mem_capacity=12, mem_decay=0.8)
    prior = memory.empty_state(1, 1, "cpu", torch.float32)
    prior.keys[0, 0, 0] = torch.randn(16)
    prior.strength[0, 0, 0] = 0.9
    states, surprise = random_inputs(1, 22, seed=4)  # 5 complete chunks and 2 pending tokens
    with torch.no_grad():
        state = memory.next_state([memory.build(1, states, surprise, prior)])
    carried = torch.isclose(state.strength[0, 0], torch.tensor(0.9 * 0.8**5))
    assert carried.sum() == 1
    assert state.next_chunk == 5
    assert state.pending_states.shape == (1, 1, 2, D_MODEL)


@settings(max_examples=10, deadline=None)
@given(split=st.integers(1, 47), seed=st.integers(0, 10_000))
def test_carrying_the_state_between_calls_reads_like_one_call(split, seed):
    """With room for every slot, a sequence split across calls reads exactly what one call reads."""
    memory, reader = make_memory(mem_capacity=16, mem_topk=16)
    states, surprise = random_inputs(2, 48, seed)
    with torch.no_grad():
        whole, _ = read(memory, reader, states, surprise)
        first, bank = read(memory, reader, states[:, :split], surprise[:, :split])
        second, _ = read(memory, reader, states[:, split:], surprise[:, split:], memory.next_state([bank]))
    torch.testing.assert_close(torch.cat([first, second], dim=1), whole, atol=1e-5, rtol=1e-4)


def test_losses_are_finite_bounded_and_train_the_memory():
    memory, reader = make_memory()
    memory.train()
    states = torch.randn(2, 48, D_MODEL, requires_grad=True)
    banks = [memory.build(step, states * 50, torch.rand(2, 48) * 20, None) for step in (1, 2)]
    update = reader(states, banks[-1])
    read_loss, write_loss = memory.losses(banks)
    n_slots = banks[0].n_slots
    assert 0.0 <= read_loss.item() <= math.log(n_slots) + 2 / RETRIEVAL_TEMPERATURE
    assert 0.0 <= write_loss.item() <= 1.0
    (read_loss + write_loss + update.square().mean()).backward()
    for name in ("query.weight", "key.weight", "write_gate.weight", "value.weight", "pool_score.weight"):
        grad = dict(memory.named_parameters())[name].grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name
    for name, parameter in reader.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
    # Tokens without a target teach nothing: with none scored, both losses vanish.
    nothing = torch.zeros(2, 48, dtype=torch.bool)
    assert [loss.item() for loss in memory.losses(banks, nothing)] == [0.0, 0.0]


def recall_states(batch: int, generator: torch.Generator, n_pairs: int = 4):
    """States of a little recall task: chunks [key value filler filler], then every key followed by its value."""
    table = torch.randn(
        32, D_MODEL, generator=torch.Generator().manual_seed(99)
    )  # 8 keys, 8 values, 16 fillers
    keys = torch.rand(batch, 8, generator=generator).argsort(1)[:, :n_pairs]
    values = 8 + torch.rand(batch, 8, generator=generator).argsort(1)[:, :n_pairs]
    store = torch.randint(16, 32, (batch, n_pairs, 4), generator=generator)
    store[:, :, 0], store[:, :, 1] = keys, values
    order = torch.rand(batch, n_pairs, generator=generator).argsort(1)
    queries = torch.stack([keys.gather(1, order), values.gather(1, order)], dim=2)
    tokens = torch.cat([store.flatten(1), queries.flatten(1)], dim=1)
    query_positions = 4 * n_pairs + 2 * torch.arange(n_pairs)
    return table[tokens], query_positions, order  # the source of query i is store chunk order[:, i]


def test_read_loss_teaches_the_query_to_find_the_source_of_what_comes_next():
    memory, _ = make_memory(mem_capacity=8, mem_topk=8, mem_dim=64)
    memory.train()
    optimizer = torch.optim.Adam(memory.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(5)

    def source_accuracy() -> float:
        """How often a queried key scores highest the slot of the chunk that holds it."""
        states, positions, source = recall_states(64, generator)
        with torch.no_grad():
            bank = memory.build(1, states, None, None)
        scores = bank.retrieval[:, positions].masked_fill(~bank.visible[:, positions], float("-inf"))
        return (scores.argmax(-1) == source).float().mean().item()

    assert source_accuracy() < 0.5
    for _ in range(60):
        states, positions, _ = recall_states(16, generator)
        scored = torch.zeros(states.shape[:2], dtype=torch.bool)
        scored[:, positions] = True  # the keys: the tokens whose targets (their values) sit in the memory
        read_loss, _ = memory.losses([memory.build(1, states, None, None)], scored)
        optimizer.zero_grad()
        read_loss.backward()
        optimizer.step()
    # The positives are a heuristic (noisy where fillers dominate a chunk), but they agree with the source more
    # than with anything else, so the query learns to find the source.
    assert source_accuracy() > 0.85


def test_reads_choose_slots_by_content_not_by_strength():
    memory, _ = make_memory(mem_capacity=2, mem_topk=1, mem_decay=1.0)
    states = torch.randn(1, 1, D_MODEL).expand(1, 4, D_MODEL)  # one chunk: it reads only the carried slots
    with torch.no_grad():
        query = memory.query(memory.norm(states[:, 0]))[0]
    prior = memory.empty_state(1, 1, states.device, states.dtype)
    prior.keys[0, 0, 0], prior.strength[0, 0, 0] = -query, 1.0  # strong, but points away from the query
    prior.keys[0, 0, 1], prior.strength[0, 0, 1] = query, 1e-12  # nearly forgotten, matches the query
    with torch.no_grad():
        bank = memory.build(1, states, None, prior)
    assert bank.visible[0, :, :2].all()  # the two carried slots (the chunk's own slot comes after)
    assert torch.isinf(bank.read_bias[0, :, 0]).all() and torch.isfinite(bank.read_bias[0, :, 1]).all()


def test_no_bank_and_empty_bank_read_nothing():
    memory, reader = make_memory()
    x = torch.randn(2, 3, D_MODEL)
    assert torch.equal(reader(x, None), torch.zeros_like(x))
    with torch.no_grad():
        bank = memory.build(1, x, None, None)  # 3 tokens: no complete chunk, nothing to read
    assert bank.n_slots == 0
    assert torch.equal(reader(x, bank), torch.zeros_like(x))
    read_loss, write_loss = memory.losses([bank])
    assert read_loss.item() == 0.0 and write_loss.item() == 0.0


def test_state_select_and_detach():
    memory, _ = make_memory()
    states = torch.randn(3, 20, D_MODEL, requires_grad=True)
    state = memory.next_state([memory.build(1, states, None, None)])
    picked = state.select([2, 0])
    assert picked.batch_size == 2 and picked.n_steps == 1
    torch.testing.assert_close(picked.keys[:, 0], state.keys[:, 2])
    assert state.keys.requires_grad and not state.detach().keys.requires_grad
    assert isinstance(state.detach(), MemoryState)


def test_a_state_with_other_sizes_is_refused():
    memory, _ = make_memory()
    state = memory.empty_state(2, 3, "cpu", torch.float32)
    with pytest.raises(ValueError, match="refinement steps"):
        memory.build(3, torch.randn(3, 8, D_MODEL), None, state)
    with pytest.raises(ValueError, match="sequences"):
        memory.build(1, torch.randn(2, 8, D_MODEL), None, state)


def test_stats_report_the_write_rate_read_gate_and_slots_alive():
    # Capacity 2 against 8 chunks per sequence: the memory ends full, so 2 slots are alive in every sequence; the
    # write rate is the share of proposed chunks that got a slot, the read gate the mean gate of the reads made.
    memory, reader = make_memory(mem_capacity=2, mem_topk=2, mem_decay=0.9)
    states, surprise = random_inputs(2, 32, seed=4)
    banks = []
    for step in (1, 2):
        _, bank = read(memory, reader, states, surprise, step=step)
        banks.append(bank)
    stats = memory.stats(banks)
    assert stats["slots_used"].item() == 2.0
    kept = torch.cat([bank.kept.flatten() for bank in banks]).float()
    assert 0 < kept.mean() < 1 and stats["write_rate"].item() == pytest.approx(kept.mean().item())
    gates = torch.stack([g for bank in banks for g in bank.gate_means]).float()
    assert len(gates) == 2 and stats["read_gate"].item() == pytest.approx(gates.mean().item())
    assert {k: v.item() for k, v in memory.stats([]).items()} == {
        "write_rate": 0,
        "read_gate": 0,
        "slots_used": 0,
    }


def one_chunk_per_state(vectors: torch.Tensor, chunk: int) -> torch.Tensor:
    """States [1, n * chunk, D]: each chunk repeats one vector of vectors [n, D]."""
    return vectors.repeat_interleave(chunk, dim=0)[None]


@pytest.mark.parametrize("weak", range(4))
def test_eviction_follows_strength_the_least_surprising_chunk_goes(weak):
    memory, _ = make_memory(mem_capacity=3, mem_topk=3, mem_decay=1.0)
    states = one_chunk_per_state(torch.randn(4, D_MODEL, generator=torch.Generator().manual_seed(7)), 4)
    surprise = torch.full((1, 16), 0.9)
    surprise[0, 4 * weak : 4 * weak + 4] = 0.02  # four chunks for three slots: this one is the weakest
    with torch.no_grad():
        bank = memory.build(1, states, surprise, None)
    assert bank.alive_at_end[0].tolist() == [chunk != weak for chunk in range(4)]


@pytest.mark.parametrize("weak", range(4))
def test_eviction_follows_strength_the_chunk_the_gate_rejects_goes(weak):
    memory, _ = make_memory(mem_capacity=3, mem_topk=3, mem_decay=1.0)
    vectors = torch.randn(4, D_MODEL, generator=torch.Generator().manual_seed(8))
    vectors[:, 0] = 4.0
    vectors[weak, 0] = -4.0
    with torch.no_grad():  # the gate reads coordinate 0 only: open for every chunk but `weak`
        memory.write_gate.weight.zero_()
        memory.write_gate.weight[0, 0] = 5.0
        memory.write_gate.bias.zero_()
        bank = memory.build(1, one_chunk_per_state(vectors, 4), torch.full((1, 16), 0.5), None)
    assert bank.alive_at_end[0].tolist() == [chunk != weak for chunk in range(4)]


@pytest.mark.parametrize("decay", [1.0, 0.9])
@pytest.mark.parametrize("split", [None, 6, 13])
def test_fifo_eviction_keeps_the_newest_chunks_whatever_their_strength(decay, split):
    memory, _ = make_memory(mem_capacity=3, mem_topk=3, mem_decay=decay)
    memory.eviction = "fifo"
    states = one_chunk_per_state(torch.randn(6, D_MODEL, generator=torch.Generator().manual_seed(9)), 4)
    surprise = torch.full((1, 24), 0.9)
    surprise[0, 12:] = 0.01  # the newest chunks are the least surprising: the write policy would drop them
    with torch.no_grad():
        if split is None:
            bank = memory.build(1, states, surprise, None)
        else:
            first = memory.next_state([memory.build(1, states[:, :split], surprise[:, :split], None)])
            bank = memory.build(1, states[:, split:], surprise[:, split:], first)
        state = memory.next_state([bank])
    kept_keys = state.keys[0, 0]
    # The last three chunks' keys (each chunk repeats one vector).
    newest = memory.key(memory.norm(states[0, 12::4]))
    torch.testing.assert_close(kept_keys, newest, atol=1e-5, rtol=1e-5)
    memory.eviction = "strength"
    with torch.no_grad():
        policy = memory.next_state([memory.build(1, states, surprise, None)])
    assert not torch.allclose(policy.keys[0, 0], newest, atol=1e-3)


def test_an_unknown_eviction_rule_is_refused():
    memory, _ = make_memory()
    memory.eviction = "random"
    with pytest.raises(ValueError, match="eviction='random'"):
        memory.build(1, torch.randn(1, 8, D_MODEL), None, None)


def test_the_write_gate_learns_to_keep_a_slot_that_eviction_removed_but_a_later_read_wants():
    """Capacity 1: chunk 0 (X) is what the readers in chunk 2 look for, but the gate prefers chunk 1 (Y), so X is
    evicted before they read. L_write's utility is the read use without eviction, so it brings X back."""
    memory, _ = make_memory(mem_capacity=1, mem_topk=1, mem_decay=1.0)
    generator = torch.Generator().manual_seed(10)
    x, y = torch.randn(2, D_MODEL, generator=generator)
    states = one_chunk_per_state(torch.stack([x, y, x]), 4)  # readers: chunk 2 repeats X
    with torch.no_grad():
        memory.query.weight.copy_(memory.key.weight)  # a reader of X finds X's key exactly
        normed = memory.norm(torch.stack([x, y]))
        memory.write_gate.weight.copy_(3.0 * (normed[1] - normed[0])[None] / normed.norm(dim=-1).mean())
        memory.write_gate.bias.zero_()
    readers = torch.zeros(1, 12, dtype=torch.bool)
    readers[0, 8:] = True
    surprise = torch.full((1, 12), 0.5)

    def x_visible_to_readers() -> bool:
        with torch.no_grad():
            return bool(memory.build(1, states, surprise, None).visible[0, 8:, 0].all())

    assert not x_visible_to_readers()
    optimizer = torch.optim.Adam(memory.write_gate.parameters(), lr=0.1)
    for _ in range(40):
        _, write_loss = memory.losses([memory.build(1, states, surprise, None)], readers)
        optimizer.zero_grad()
        write_loss.backward()
        optimizer.step()
    assert x_visible_to_readers()


@settings(max_examples=25, deadline=None)
@given(first=st.integers(0, 30), second=st.integers(1, 9), seed=st.integers(0, 10_000))
def test_a_bank_nobody_reads_carries_the_same_state_as_a_read_one(first, second, seed):
    """A call whose tokens have all halted builds its bank with read=False (and, when it completes no chunk, takes a
    shortcut); the memory it hands on must be the one a full build hands on."""
    memory, _ = make_memory(seed)
    states, surprise = random_inputs(2, first + second, seed)
    prior = (
        memory.next_state([memory.build(1, states[:, :first], surprise[:, :first], None)]) if first else None
    )
    rest = states[:, first:], surprise[:, first:]
    carried = [memory.next_state([memory.build(1, *rest, prior, read=read)]) for read in (True, False)]
    for name in ("keys", "values", "strength", "pending_states", "pending_surprise"):
        torch.testing.assert_close(getattr(carried[1], name), getattr(carried[0], name), equal_nan=True)
    assert carried[1].next_chunk == carried[0].next_chunk
    silent = memory.build(1, *rest, prior, read=False)
    assert not silent.visible.any() and not silent.reads.any() and (silent.positive == -1).all()
