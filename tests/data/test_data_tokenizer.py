"""The byte-level BPE: training, saving as a transformers tokenizer, special tokens, a given tokenizer."""

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from cognate.data.tokenizer import (
    EOS,
    PAD,
    complete_special_tokens,
    encode_texts,
    load_tokenizer,
    save_tokenizer,
    special_token_ids,
    train_tokenizer,
)

TEXTS = [f"Problem: Tom has {i} apples and buys {i + 3} more.\n#### {2 * i + 3}" for i in range(300)]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(TEXTS, vocab_size=400)


def test_trains_the_requested_size_with_the_special_tokens_first(tokenizer):
    assert len(tokenizer) == 400
    ids = special_token_ids(tokenizer)
    assert (ids.pad, ids.eos, ids.fim_prefix, ids.fim_suffix, ids.fim_middle) == (0, 1, 2, 3, 4)


def test_round_trips_any_text_byte_for_byte(tokenizer):
    text = "naïve café — 数学 🙂\n\tdef f(x): return x"
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text


def test_saved_folder_loads_as_a_transformers_fast_tokenizer(tokenizer, tmp_path):
    digest = save_tokenizer(tokenizer, tmp_path)
    assert len(digest) == 64 and (tmp_path / "tokenizer.json").is_file()
    for loaded in (
        AutoTokenizer.from_pretrained(tmp_path),
        load_tokenizer(tmp_path),
        load_tokenizer(tmp_path / "tokenizer.json"),
    ):
        assert isinstance(loaded, PreTrainedTokenizerFast)
        assert loaded.eos_token == EOS and loaded.pad_token == PAD
        assert loaded.encode(TEXTS[7], add_special_tokens=False) == tokenizer.encode(
            TEXTS[7], add_special_tokens=False
        )


def test_special_token_strings_inside_documents_stay_plain_text(tokenizer):
    (ids,) = encode_texts(tokenizer, [f"a literal {EOS} in the text"])
    assert special_token_ids(tokenizer).eos not in ids.tolist()
    assert tokenizer.decode(ids.tolist()) == f"a literal {EOS} in the text"


def test_batch_encoding_matches_one_by_one(tokenizer):
    batch = encode_texts(tokenizer, TEXTS[:20])
    assert [b.tolist() for b in batch] == [tokenizer.encode(t, add_special_tokens=False) for t in TEXTS[:20]]


def test_a_given_tokenizer_gets_a_pad_and_fim_tokens_but_needs_an_eos():
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.add_special_tokens(["<eos>"])
    given = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", pad_token="<eos>")
    completed = complete_special_tokens(given)
    ids = special_token_ids(completed)
    assert ids.eos == 0 and ids.pad not in (ids.eos, None)
    assert len({ids.pad, ids.fim_prefix, ids.fim_suffix, ids.fim_middle}) == 4
    with pytest.raises(ValueError, match="no eos token"):
        complete_special_tokens(PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE())))


def test_vocab_size_is_validated():
    with pytest.raises(ValueError, match="vocab_size must be in"):
        train_tokenizer(TEXTS, vocab_size=100_000)
