"""Readers for Karpathy JSON, Flickr8k token files and COCO captions, on fixtures written here."""

import json
from pathlib import Path

import pytest
from data_factory import jpeg_bytes, write_karpathy

from dsalign.data.readers import read_coco_captions, read_flickr8k_tokens, read_karpathy

FLICKR8K = Path(__file__).resolve().parents[2] / "shared" / "data" / "flickr8k"


def test_karpathy_reader_keeps_order_splits_and_tokens(tmp_path):
    path, images = write_karpathy(tmp_path, n_images=6)
    records = read_karpathy(path, images)
    assert [r.image_id for r in records] == [f"img{i:03d}" for i in range(6)]
    assert [r.split for r in records] == ["train", "val", "test"] * 2
    assert all(len(r.captions) == 5 and r.image_path.is_file() for r in records)
    assert records[0].captions[0].tokens == records[0].captions[0].raw.lower().rstrip(" .").split()


def test_karpathy_coco_restval_merges_into_train(tmp_path):
    entry = {"filepath": "val2014", "filename": "x.jpg", "cocoid": 42, "split": "restval",
             "sentences": [{"raw": "A man.", "tokens": ["a", "man"]}]}
    (tmp_path / "d.json").write_text(json.dumps({"images": [entry]}))
    (merged,) = read_karpathy(tmp_path / "d.json", tmp_path)
    (kept,) = read_karpathy(tmp_path / "d.json", tmp_path, restval_as_train=False)
    assert (merged.split, kept.split, merged.image_id) == ("train", "restval", "42")
    assert merged.image_path == tmp_path / "val2014" / "x.jpg"


def test_karpathy_reader_rejects_malformed_files(tmp_path):
    (tmp_path / "bad.json").write_text('{"images": [{"filename": "a.jpg"}]}')
    with pytest.raises(ValueError, match="entry 0 is malformed"):
        read_karpathy(tmp_path / "bad.json", tmp_path)
    (tmp_path / "trunc.json").write_text('{"images": [')
    with pytest.raises(ValueError, match="cannot read JSON"):
        read_karpathy(tmp_path / "trunc.json", tmp_path)
    with pytest.raises(ValueError, match="file not found"):
        read_karpathy(tmp_path / "missing.json", tmp_path)


def test_flickr8k_token_reader_maps_dev_to_val_and_orders_captions(tmp_path):
    names = {"train": ["a.jpg", "b.jpg"], "val": ["c.jpg"], "test": ["d.jpg"]}
    files = {"train": "Flickr_8k.trainImages.txt", "val": "Flickr_8k.devImages.txt",
             "test": "Flickr_8k.testImages.txt"}
    lines = []
    for split, split_names in names.items():
        (tmp_path / files[split]).write_text("\n".join(split_names) + "\n")
        for name in split_names:
            lines += [f"{name}#{k}\tCaption {k} of {name}, here!" for k in (1, 0, 2)]
    lines.append("unlisted.jpg#0\tNot in any split")
    (tmp_path / "Flickr8k.token.txt").write_text("\n".join(lines))
    records = read_flickr8k_tokens(tmp_path / "Flickr8k.token.txt", tmp_path / "imgs")
    assert [(r.image_id, r.split) for r in records] == [("a", "train"), ("b", "train"), ("c", "val"),
                                                         ("d", "test")]
    assert [c.raw for c in records[0].captions] == [f"Caption {k} of a.jpg, here!" for k in range(3)]
    assert records[0].captions[0].tokens == ["caption", "0", "of", "a", "jpg", "here"]


def test_flickr8k_token_reader_reports_bad_lines(tmp_path):
    (tmp_path / "Flickr8k.token.txt").write_text("a.jpg no tab here\n")
    with pytest.raises(ValueError, match=r"Flickr8k.token.txt:1: expected"):
        read_flickr8k_tokens(tmp_path / "Flickr8k.token.txt", tmp_path)


def test_coco_captions_reader_groups_by_image(tmp_path):
    data = {"images": [{"id": 7, "file_name": "b.jpg"}, {"id": 3, "file_name": "a.jpg"}],
            "annotations": [{"id": 2, "image_id": 7, "caption": "Second."},
                            {"id": 1, "image_id": 7, "caption": "A first one."},
                            {"id": 5, "image_id": 3, "caption": "Only caption"}]}
    (tmp_path / "captions_val2014.json").write_text(json.dumps(data))
    (tmp_path / "a.jpg").write_bytes(jpeg_bytes(0))
    records = read_coco_captions(tmp_path / "captions_val2014.json", tmp_path, "val")
    assert [r.image_id for r in records] == ["3", "7"]
    assert [c.tokens for c in records[1].captions] == [["a", "first", "one"], ["second"]]
    assert all(r.split == "val" for r in records)


@pytest.mark.skipif(not FLICKR8K.is_dir(), reason=f"Flickr8k not present at {FLICKR8K}")
def test_flickr8k_real_data_counts_and_vocabulary():
    from dsalign.text import Vocabulary

    karpathy = read_karpathy(FLICKR8K / "dataset_flickr8k.json", FLICKR8K / "images")
    tokens = read_flickr8k_tokens(FLICKR8K / "Flickr8k.token.txt", FLICKR8K / "images")
    for records in (karpathy, tokens):
        assert len(records) == 8000
        assert sum(len(r.captions) for r in records) == 40000
        counts = {s: sum(r.split == s for r in records) for s in ("train", "val", "test")}
        assert counts == {"train": 6000, "val": 1000, "test": 1000}
    # Both readers agree on the split of every image and on the tokens of every caption.
    by_id = {r.image_id: r for r in tokens}
    assert all(by_id[r.image_id].split == r.split for r in karpathy)
    assert all(a.tokens == b.tokens for r in karpathy for a, b in zip(r.captions, by_id[r.image_id].captions))
    vocab = Vocabulary.build(c.tokens for r in karpathy if r.split == "train" for c in r.captions)
    words = len(vocab) - 4
    assert abs(words - 2538) <= 0.05 * 2538, words
    # Train-only: a word that occurs only in val/test captions is not in the vocabulary.
    heldout = {t for r in karpathy if r.split != "train" for c in r.captions for t in c.tokens}
    train = {t for r in karpathy if r.split == "train" for c in r.captions for t in c.tokens}
    assert heldout - train and not (heldout - train) & set(vocab.itos)
