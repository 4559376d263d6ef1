"""Tokenizer and vocabulary: the paper's conventions and a train-only vocabulary."""

import pytest
from data_factory import FUZZ
from hypothesis import given
from hypothesis import strategies as st

from dsalign.text import END, PAD, START, UNK, Vocabulary, tokenize


def test_tokenize_lowercases_and_drops_non_alphanumerics():
    assert tokenize("A child, in a PINK dress... is climbing!") == ["a", "child", "in", "a", "pink", "dress",
                                                                      "is", "climbing"]
    assert tokenize("t-shirt  don't 3 dogs\tand\ncats") == ["t", "shirt", "don", "t", "3", "dogs", "and", "cats"]
    assert tokenize("") == [] and tokenize(" ... !!") == []


@FUZZ
@given(st.text())
def test_tokenize_output_is_lowercase_alphanumeric(text):
    for token in tokenize(text):
        assert token and all(ch in "abcdefghijklmnopqrstuvwxyz0123456789" for ch in token)


def test_vocabulary_threshold_order_and_specials():
    captions = [["a", "dog"]] * 5 + [["a", "cat"]] * 4 + [["zebra"]] * 5
    vocab = Vocabulary.build(captions, min_count=5)
    assert vocab.itos[:4] == [PAD, UNK, START, END]
    assert vocab.itos[4:] == ["a", "dog", "zebra"]  # by count, then alphabetically; "cat" (4x) is out
    assert vocab.encode(["a", "cat"], add_start=True, add_end=True) == [2, 4, 1, 3]
    assert vocab.decode([2, 4, 5, 3, 6]) == ["a", "dog"]


def test_vocabulary_round_trips_through_json(tmp_path):
    vocab = Vocabulary.build([["x"] * 7, ["y"] * 5], min_count=5)
    vocab.save(tmp_path / "v.json")
    loaded = Vocabulary.load(tmp_path / "v.json")
    assert loaded.itos == vocab.itos and loaded.counts == {"x": 7, "y": 5}


def test_malformed_vocabulary_file_is_a_clear_error(tmp_path):
    (tmp_path / "v.json").write_text('{"itos": ["a", "b"]}')
    with pytest.raises(ValueError, match="special tokens"):
        Vocabulary.load(tmp_path / "v.json")
    (tmp_path / "w.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot read vocabulary"):
        Vocabulary.load(tmp_path / "w.json")
