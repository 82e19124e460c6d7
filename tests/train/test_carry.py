"""A document longer than a row, read as consecutive segments with the memory carried from one to the next."""

import numpy as np
import pytest
import torch
from model_testing import random_tokens, small_model

from cognate.train.carry import CarriedMemory, continues_document

LENGTH, SEGMENT = 24, 8  # three segments of two memory chunks (chunk size 4)


def _documents(document: int, index: int, batch: int = 2) -> np.ndarray:
    return np.tile([document, index], (batch, 1))


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_a_long_document_in_segments_with_carried_memory_gives_the_loss_of_one_long_forward(mode):
    """With attention reaching no further back than the token itself (window 1), memory is the only path from one
    segment to the next, so the segments with carried memory must give one long forward's loss exactly (token
    weighted), and the memory it ends with; without the carry they do not."""
    model = small_model(seed=2, attn_window=1).train(mode == "train")
    with torch.no_grad():  # a strong memory read, so that the carried memory shows in the loss
        for block in model.layers:
            block.memory_read.out.weight.mul_(300)
    tokens, targets = random_tokens(2, LENGTH, seed=3), random_tokens(2, LENGTH, seed=4)
    whole = model(tokens, targets=targets)

    def segmented(carry: bool) -> tuple[float, object]:
        carried, loss_sum, state = CarriedMemory(), 0.0, None
        for index, start in enumerate(range(0, LENGTH, SEGMENT)):
            documents = _documents(0, index)
            part = slice(start, start + SEGMENT)
            state = carried.state_for(("long", 0), documents)
            out = model(tokens[:, part], targets=targets[:, part], memory_state=state)
            if carry:
                carried.update(("long", 0), out.memory_state, documents)
            loss_sum += out.losses["ref"].item() * targets[:, part].numel()
        return loss_sum / targets.numel(), out.memory_state

    loss, last_state = segmented(carry=True)
    assert loss == pytest.approx(float(whole.losses["ref"]), rel=1e-5)
    torch.testing.assert_close(last_state.keys, whole.memory_state.keys, rtol=1e-4, atol=1e-5)
    assert last_state.next_chunk == whole.memory_state.next_chunk == LENGTH // model.cfg.mem_chunk_size
    assert abs(segmented(carry=False)[0] - loss) > 1e-3


@pytest.mark.parametrize("mem_kind", ["slots", "neural"])
def test_a_row_that_starts_a_new_document_starts_from_empty_memory_while_the_other_continues(mem_kind):
    model = small_model(seed=2, mem_kind=mem_kind).eval()
    first, second = random_tokens(2, SEGMENT, seed=5), random_tokens(2, SEGMENT, seed=6)
    carried = CarriedMemory()
    out = model(first)
    carried.update(("long", 1), out.memory_state, np.array([[7, 0], [8, 0]]))
    now = np.array([[7, 1], [9, 0]])  # row 0 continues document 7, row 1 starts document 9
    assert continues_document(np.array([[7, 0], [8, 0]]), now).tolist() == [True, False]
    mixed = model(second, memory_state=carried.state_for(("long", 1), now)).logits
    continued = model(second[:1], memory_state=out.memory_state.select([0])).logits
    fresh = model(second[1:]).logits
    torch.testing.assert_close(mixed[:1], continued, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(mixed[1:], fresh, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(continued, model(second[:1]).logits, atol=1e-4)  # the carry changed row 0
    # A stream whose rows all start anew, or hold whole documents only, carries nothing.
    assert carried.state_for(("long", 1), np.array([[3, 0], [-1, 0]])) is None
    assert carried.state_for(("long", 0), now) is None  # another stream


@pytest.mark.parametrize("mem_kind", ["slots", "neural"])
def test_carried_memory_survives_a_checkpoint_round_trip(mem_kind, tmp_path):
    model = small_model(seed=2, mem_kind=mem_kind).eval()
    carried = CarriedMemory()
    documents = np.array([[7, 0], [8, 0]])
    carried.update(("long", 1), model(random_tokens(2, SEGMENT, seed=5)).memory_state, documents)
    torch.save(carried.state_dict(), tmp_path / "carried.pt")
    restored = CarriedMemory()
    restored.load_state_dict(torch.load(tmp_path / "carried.pt", weights_only=True), "cpu")
    now = np.array([[7, 1], [8, 1]])
    second = random_tokens(2, SEGMENT, seed=6)
    expected = model(second, memory_state=carried.state_for(("long", 1), now)).logits
    torch.testing.assert_close(
        model(second, memory_state=restored.state_for(("long", 1), now)).logits, expected
    )
