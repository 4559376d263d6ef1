"""Shard writing: round trip, determinism, re-encoding and what `prepare` skips."""

import hashlib
import io
import json

import pytest
from data_factory import png_bytes, write_karpathy
from PIL import Image

from dsalign.data.manifest import load_manifest
from dsalign.data.prepare import prepare_dataset
from dsalign.data.readers import read_karpathy
from dsalign.data.records import Caption, ImageRecord
from dsalign.data.shards import ShardWriter, image_member, iter_tar_samples, meta_to_record, shard_paths


def _digest_tree(root):
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_everything_written_is_read_back_identically(tmp_path):
    path, images = write_karpathy(tmp_path / "src", n_images=9)
    records = read_karpathy(path, images)
    records[0].boxes = [[0.1, 0.2, 0.5, 0.9]]
    records[0].box_labels = ["a dog"]
    records[0].captions[0].spans = [(0, 2, 0)]
    manifest = prepare_dataset(records, tmp_path / "out", "test", shard_size=2, progress=False)
    assert {s: (i["images"], i["captions"], len(i["shards"])) for s, i in manifest["splits"].items()} == {
        "train": (3, 15, 2), "val": (3, 15, 2), "test": (3, 15, 2)}
    by_id = {r.image_id: r for r in records}
    seen = []
    for split in ("train", "val", "test"):
        for url in shard_paths(tmp_path / "out", split):
            for _key, members in iter_tar_samples(url):
                ext, data = image_member(members)
                back = meta_to_record(json.loads(members["json"]), data, ext)
                original = by_id[back.image_id]
                assert back.split == original.split == split
                assert data == original.image_path.read_bytes() and ext == "jpg"
                assert [(c.raw, c.tokens, c.spans) for c in back.captions] == [
                    (c.raw, c.tokens, c.spans) for c in original.captions]
                assert back.boxes == original.boxes and back.box_labels == original.box_labels
                seen.append(back.image_id)
    assert sorted(seen) == sorted(by_id)


def test_prepare_is_deterministic(tmp_path):
    path, images = write_karpathy(tmp_path / "src", n_images=8)
    for out in ("a", "b"):
        prepare_dataset(read_karpathy(path, images), tmp_path / out, "test", shard_size=3, progress=False)
    assert _digest_tree(tmp_path / "a") == _digest_tree(tmp_path / "b")


def test_worker_processes_write_the_same_data_set(tmp_path):
    path, images = write_karpathy(tmp_path / "src", n_images=20)
    (images / "img001.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
    (images / "img002.jpg").unlink()
    for workers in (0, 2):
        records = read_karpathy(path, images)
        records[3].captions = []
        prepare_dataset(records, tmp_path / str(workers), "t", shard_size=3, max_side=8, min_count=1,
                        progress=False, workers=workers)
    assert _digest_tree(tmp_path / "0") == _digest_tree(tmp_path / "2")  # shrunk images, skips, vocabulary, manifest
    manifest = load_manifest(tmp_path / "2")
    assert sum(s["images"] for s in manifest["splits"].values()) == 17
    assert sorted((s["image_id"], s["reason"]) for s in manifest["skipped"]) == [
        ("img001", "bad_image"), ("img002", "missing_image"), ("img003", "no_captions")]


def test_a_failed_run_leaves_nothing_behind_and_can_run_again(tmp_path, monkeypatch):
    """A bad record half way, or a worker killed (here: on img010's image), stops the run with one line; the
    shards already written go, so the same command runs again (the folder was refused as "not empty" before)."""
    import os

    from dsalign.data import prepare

    path, images = write_karpathy(tmp_path / "src", n_images=30)
    records = read_karpathy(path, images)
    records[20].split = "../outside"
    with pytest.raises(ValueError, match="plain name"):
        prepare_dataset(records, tmp_path / "out", "t", shard_size=2, min_count=1, progress=False)
    assert list((tmp_path / "out").iterdir()) == []

    load, parent = prepare._load_image, os.getpid()

    def dies_on_img010(image_path, *args):
        if os.getpid() != parent and image_path is not None and image_path.name == "img010.jpg":
            os._exit(3)
        return load(image_path, *args)

    monkeypatch.setattr(prepare, "_load_image", dies_on_img010)
    with pytest.raises(RuntimeError, match="a worker process died .*rerun with fewer --workers"):
        prepare_dataset(read_karpathy(path, images), tmp_path / "out", "t", shard_size=2, min_count=1,
                        progress=False, workers=2)
    assert list((tmp_path / "out").iterdir()) == []
    monkeypatch.setattr(prepare, "_load_image", load)
    manifest = prepare_dataset(read_karpathy(path, images), tmp_path / "out", "t", shard_size=2, min_count=1,
                               progress=False, workers=2)
    assert sum(s["images"] for s in manifest["splits"].values()) == 30


def test_vocabulary_comes_from_the_train_split_only(tmp_path):
    def record(split, word):
        return ImageRecord(f"{split}{word}", split, [Caption(word, [word])] * 5,
                           image_bytes=png_bytes(), image_ext="png")

    records = [record("train", "dog"), record("val", "cat"), record("test", "cow")]
    prepare_dataset(records, tmp_path / "out", "t", progress=False)
    itos = json.loads((tmp_path / "out" / "vocab.json").read_text())["itos"]
    assert "dog" in itos and "cat" not in itos and "cow" not in itos


def test_prepare_skips_and_counts_bad_records(tmp_path):
    path, images = write_karpathy(tmp_path / "src", n_images=6, splits=("train",))
    records = read_karpathy(path, images)
    (images / "img001.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
    (images / "img002.jpg").unlink()
    records[3].captions = []
    records[4].captions[0] = Caption(" ... ", [])
    manifest = prepare_dataset(records, tmp_path / "out", "t", min_count=1, progress=False)
    train = manifest["splits"]["train"]
    assert train["images"] == 3 and train["captions"] == 14
    assert train["skipped"] == {"bad_image": 1, "missing_image": 1, "no_captions": 1, "empty_caption": 1}
    assert sorted((s["image_id"], s["reason"]) for s in manifest["skipped"]) == [
        ("img001", "bad_image"), ("img002", "missing_image"), ("img003", "no_captions")]


def test_max_side_re_encodes_only_large_images(tmp_path):
    big = io.BytesIO()
    Image.new("RGB", (400, 100), (200, 10, 10)).save(big, format="PNG")
    records = [ImageRecord("big", "train", [Caption("a b", ["a", "b"])], image_bytes=big.getvalue(),
                           image_ext="png"),
               ImageRecord("small", "train", [Caption("a b", ["a", "b"])], image_bytes=png_bytes(), image_ext="png")]
    prepare_dataset(records, tmp_path / "out", "t", max_side=64, min_count=1, progress=False)
    members = {json.loads(m["json"])["image_id"]: m for _, m in
               iter_tar_samples(shard_paths(tmp_path / "out", "train")[0])}
    assert Image.open(io.BytesIO(members["big"]["jpg"])).size == (64, 16)
    assert members["small"]["png"] == png_bytes()


def test_prepare_refuses_to_clobber_a_folder_that_is_not_a_data_set(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    records = [ImageRecord("x", "train", [Caption("a", ["a"])], image_bytes=png_bytes(), image_ext="png")]
    with pytest.raises(ValueError, match="not empty"):
        prepare_dataset(records, tmp_path / "out", "t", min_count=1, progress=False)
    with pytest.raises(ValueError, match="not a prepared data set"):
        prepare_dataset(records, tmp_path / "out", "t", min_count=1, progress=False, overwrite=True)
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"


def test_shard_writer_rejects_keys_webdataset_would_split(tmp_path):
    with ShardWriter(tmp_path, "x") as writer, pytest.raises(ValueError, match="must not contain"):
        writer.write("a.b", {"json": b"{}"})


def test_load_manifest_errors_are_one_line(tmp_path):
    with pytest.raises(ValueError, match="not a prepared data set"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{")
    with pytest.raises(ValueError, match="corrupt manifest"):
        load_manifest(tmp_path)


@pytest.mark.parametrize("shard", ["/etc/passwd", "../outside.tar", "train/../../x.tar", 7])
def test_manifest_shard_paths_cannot_point_outside_the_folder(tmp_path, shard):
    (tmp_path / "manifest.json").write_text(json.dumps({"splits": {"train": {"shards": [shard]}}}))
    with pytest.raises(ValueError, match="must be relative"):
        load_manifest(tmp_path)


@pytest.mark.parametrize("split", ["../outside", "{tmp}/absolute", "a/b", "", 3])
def test_prepare_refuses_a_split_that_is_not_a_plain_name(tmp_path, split):
    """The split names an output folder: a Karpathy file with ``"split": "../x"`` wrote shards outside it."""
    split = split.format(tmp=tmp_path) if isinstance(split, str) else split
    records = [ImageRecord("x", split, [Caption("a", ["a"])], image_bytes=png_bytes(), image_ext="png")]
    with pytest.raises(ValueError, match="plain name"):
        prepare_dataset(records, tmp_path / "out", "t", min_count=1, progress=False)
    assert [p.name for p in tmp_path.rglob("*.tar")] == []
