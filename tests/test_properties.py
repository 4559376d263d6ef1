"""Property-based tests of the tokenizer, the vocabulary and the three caption readers: on any input they
either return well-formed values or raise one ValueError, never another exception."""

from __future__ import annotations

import json
import re
import string
from pathlib import Path

import pytest
from data_factory import FUZZ, json_values, shaped, write_flickr8k
from hypothesis import example, given
from hypothesis import strategies as st

from dsalign.data.readers import read_coco_captions, read_flickr8k_tokens, read_karpathy
from dsalign.data.records import Caption, ImageRecord
from dsalign.text import SPECIALS, UNK, Vocabulary, tokenize

words = st.text(alphabet=string.ascii_lowercase + string.digits, min_size=1, max_size=6)
sentences = st.text(max_size=40)
one_line = st.text(st.characters(exclude_characters="\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029"), max_size=40)


def _write_json(path: Path, data: object) -> Path:
    path.write_text(json.dumps(data))  # NaN and Infinity included: json.loads accepts them
    return path


def _assert_well_formed(records: list[ImageRecord]) -> None:
    for record in records:
        assert isinstance(record.image_id, str) and isinstance(record.split, str)
        assert isinstance(record.image_path, Path)
        for caption in record.captions:
            assert isinstance(caption, Caption) and isinstance(caption.raw, str)
            assert all(isinstance(t, str) and t.strip() for t in caption.tokens)


# Tokenizer and vocabulary.


@FUZZ
@given(st.text())
@example("İstanbul K ﬁ ² ٣ café")  # lowercasing makes ASCII out of some non-ASCII letters, not of others
def test_tokenize_keeps_every_ascii_letter_and_digit_in_order(text):
    """With non-empty tokens, this also says tokens hold nothing else (tests/test_text.py checks that alone)."""
    tokens = tokenize(text)
    assert all(tokens) and "".join(tokens) == re.sub(r"[^a-z0-9]", "", text.lower())


@FUZZ
@given(st.text())
def test_tokenize_is_idempotent_on_its_joined_tokens(text):
    tokens = tokenize(text)
    assert tokenize(" ".join(tokens)) == tokens


@FUZZ
@given(st.lists(st.lists(words, max_size=6), max_size=12), st.integers(1, 3), st.lists(words, max_size=8))
def test_vocabulary_encodes_known_words_and_maps_the_rest_to_unk(captions, min_count, sentence):
    vocab = Vocabulary.build(captions, min_count=min_count)
    assert tuple(vocab.itos[: len(SPECIALS)]) == SPECIALS and len(set(vocab.itos)) == len(vocab)
    assert all(vocab.counts[w] >= min_count for w in vocab.itos[len(SPECIALS):])
    ids = vocab.encode(sentence, add_start=True, add_end=True)
    assert len(ids) == len(sentence) + 2 and all(0 <= i < len(vocab) for i in ids)
    assert ids[0] == vocab.start_id and ids[-1] == vocab.end_id
    assert vocab.decode(ids) == [w if w in vocab else UNK for w in sentence]


@FUZZ
@given(json_values | shaped(itos=st.lists(words).map(lambda w: [*SPECIALS, *w]), counts=st.just({}),
                            min_count=st.integers()))
def test_vocabulary_file_loads_or_fails_clearly(tmp_path, data):
    path = _write_json(tmp_path / "v.json", data)
    try:
        vocab = Vocabulary.load(path)
    except ValueError as exc:
        assert "vocabulary" in str(exc)
        return
    assert vocab.itos == data["itos"] and all(vocab.stoi[w] == i for i, w in enumerate(vocab.itos))


@pytest.mark.parametrize("content", [b"\xff\xfe not utf-8", b"[" * 100_000, b'{"itos": ' + b"1" * 5000 + b"}"])
def test_unreadable_vocabulary_is_a_value_error(tmp_path, content):
    (tmp_path / "v.json").write_bytes(content)
    with pytest.raises(ValueError, match="cannot read vocabulary"):
        Vocabulary.load(tmp_path / "v.json")


def test_a_repeated_word_in_a_vocabulary_file_is_refused(tmp_path):
    """Loading would drop the repeat and shift the ids of every later word, silently."""
    _write_json(tmp_path / "v.json", {"itos": [*SPECIALS, "a", "<unk>", "b"]})
    with pytest.raises(ValueError, match="distinct"):
        Vocabulary.load(tmp_path / "v.json")


# Readers: any file content gives records or one ValueError.


def _read_or_value_error(read, *args) -> list[ImageRecord] | None:
    try:
        return read(*args)
    except ValueError:
        return None


@FUZZ
@given(st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
@example(b"[" * 100_000)  # RecursionError in json
@example(b'{"images": ' + b"9" * 5000 + b"}")  # int() refuses over 4300 digits
def test_any_bytes_as_a_json_file_give_records_or_a_value_error(tmp_path, content):
    path = tmp_path / "d.json"
    path.write_bytes(content)
    for read, args in ((read_karpathy, (path, tmp_path)), (read_coco_captions, (path, tmp_path, "val"))):
        records = _read_or_value_error(read, *args)
        assert records is None or isinstance(records, list)


sentence_objects = shaped(raw=sentences, tokens=st.lists(words | st.text(max_size=4), max_size=5))
karpathy_entries = shaped(split=st.sampled_from(["train", "val", "test", "restval"]), filename=words,
                          filepath=words, cocoid=st.integers(), sentences=st.lists(sentence_objects, max_size=3))


@FUZZ
@given(st.lists(karpathy_entries | json_values, max_size=4))
@example([{"split": "train", "filename": "a.jpg", "sentences": [{"raw": 5}]}])  # was AttributeError
@example([{"split": ["train"], "filename": "a.jpg", "sentences": []}])
def test_karpathy_entries_of_any_shape_give_well_formed_records_or_a_value_error(tmp_path, entries):
    path = _write_json(tmp_path / "d.json", {"images": entries})
    records = _read_or_value_error(read_karpathy, path, tmp_path)
    if records is not None:
        assert len(records) == len(entries)
        _assert_well_formed(records)


@FUZZ
@given(st.lists(st.tuples(st.sampled_from(["train", "val", "test", "restval"]), st.lists(
    st.tuples(sentences, st.lists(words, max_size=4)), min_size=1, max_size=3)), max_size=5))
def test_karpathy_keeps_the_files_own_tokens_else_tokenizes(tmp_path, images):
    entries = [{"split": split, "filename": f"i{n}.jpg",
                "sentences": [{"raw": raw, "tokens": tokens} for raw, tokens in captions]}
               for n, (split, captions) in enumerate(images)]
    records = read_karpathy(_write_json(tmp_path / "d.json", {"images": entries}), tmp_path, restval_as_train=False)
    assert [(r.image_id, r.split) for r in records] == [(f"i{n}", s) for n, (s, _) in enumerate(images)]
    for record, (_, captions) in zip(records, images):
        assert [c.raw for c in record.captions] == [raw for raw, _ in captions]
        assert [c.tokens for c in record.captions] == [tokens or tokenize(raw) for raw, tokens in captions]


coco_files = shaped(images=st.lists(shaped(id=st.integers(0, 9), file_name=words) | json_values, max_size=4),
                    annotations=st.lists(shaped(id=st.integers(), image_id=st.integers(0, 9), caption=sentences)
                                         | json_values, max_size=6))


@FUZZ
@given(coco_files | json_values)
@example({"images": [{"id": float("inf"), "file_name": "a.jpg"}], "annotations": []})  # was OverflowError
@example({"images": [{"id": 1, "file_name": 7}], "annotations": []})  # was TypeError from Path
def test_coco_files_of_any_shape_give_well_formed_records_or_a_value_error(tmp_path, data):
    path = _write_json(tmp_path / "c.json", data)
    records = _read_or_value_error(read_coco_captions, path, tmp_path, "val")
    if records is not None:
        assert [int(r.image_id) for r in records] == sorted({int(a["image_id"]) for a in data["annotations"]})
        assert sum(len(r.captions) for r in records) == len(data["annotations"])
        assert all(r.split == "val" for r in records)
        _assert_well_formed(records)


token_lines = st.tuples(st.sampled_from(["a.jpg", "b.jpg", ""]), st.sampled_from(["#", ""]),
                        st.sampled_from(["0", "1", "12", "²", "x", " 3 ", ""]), st.sampled_from(["\t", " "]),
                        sentences).map("".join)


@FUZZ
@given(st.lists(token_lines, max_size=6).map("\n".join) | st.text(max_size=80) | st.binary(max_size=40))
@example("a.jpg#²\tsuperscript two is a digit to isdigit(), not to int()")  # was a bare int() ValueError
@example(b"a.jpg#0\t\xff\xfe not utf-8")
def test_flickr8k_token_files_of_any_content_give_records_or_a_value_error(tmp_path, token_text):
    token_file = write_flickr8k(tmp_path, token_text, {"train": ["a.jpg"], "test": ["b.jpg"]})
    try:
        records = read_flickr8k_tokens(token_file, tmp_path)
    except ValueError as exc:
        assert str(tmp_path) in str(exc)  # every error names the file it is about
        return
    assert [(r.image_id, r.split) for r in records] == [("a", "train"), ("b", "test")]
    _assert_well_formed(records)


@FUZZ
@given(st.dictionaries(st.sampled_from(["a.jpg", "b.jpg", "c.jpg"]),
                       st.dictionaries(st.integers(0, 12), one_line.map(str.strip), min_size=1, max_size=4),
                       min_size=1))
def test_flickr8k_captions_come_in_index_order(tmp_path, captions):
    lines = [f"{name}#{k}\t{text}" for name, by_index in captions.items() for k, text in by_index.items()]
    names = sorted(captions)
    token_file = write_flickr8k(tmp_path, "\n".join(lines), {"val": names})
    records = read_flickr8k_tokens(token_file, tmp_path)
    assert [r.image_id for r in records] == [Path(n).stem for n in names]
    for record, name in zip(records, names):
        assert [c.raw for c in record.captions] == [captions[name][k] for k in sorted(captions[name])]
        assert [c.tokens for c in record.captions] == [tokenize(c.raw) for c in record.captions]
