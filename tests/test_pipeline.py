"""Training and evaluation streams: batches, masks, rank/worker splitting, exact skip counts."""

import json
import tarfile

import pytest
import torch
from data_factory import jpeg_bytes, write_karpathy

from dsalign.data.pipeline import ImageSampleDecoder, ShardLoader, ShardStream, collate_images
from dsalign.data.prepare import prepare_dataset
from dsalign.data.readers import read_karpathy
from dsalign.data.shards import ShardWriter, shard_paths
from dsalign.text import Vocabulary


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("ds")
    path, images = write_karpathy(root / "src", n_images=45, splits=("train", "train", "val"))
    prepare_dataset(read_karpathy(path, images), root / "out", "t", shard_size=4, min_count=1, progress=False)
    return root / "out", Vocabulary.load(root / "out" / "vocab.json"), read_karpathy(path, images)


def _stream(urls, vocab, mode, **kw):
    return ShardStream(urls, ImageSampleDecoder(vocab), collate_images, kw.pop("batch_size", 4), mode=mode, **kw)


def test_eval_batches_carry_padded_tensors_and_masks(dataset):
    out, vocab, records = dataset
    batches = list(ShardLoader(_stream(shard_paths(out, "val"), vocab, "eval")))
    by_id = {r.image_id: r for r in records}
    assert sum(len(b["image_ids"]) for b in batches) == 15 and len(batches[-1]["image_ids"]) == 3
    batch = batches[0]
    assert batch["images"].dtype == torch.uint8 and batch["images"].shape == (4, 3, 30, 40)
    assert batch["tokens"].shape[:2] == (4, 5) and batch["caption_mask"].all()
    for b, image_id in enumerate(batch["image_ids"]):
        for c, cap in enumerate(by_id[image_id].captions):
            n = len(cap.tokens)
            assert batch["token_mask"][b, c].sum() == n
            assert vocab.decode(batch["tokens"][b, c, :n].tolist()) == cap.tokens
            assert (batch["tokens"][b, c, n:] == vocab.pad_id).all()
    assert batch["boxes"].shape == (4, 0, 4)


def test_eval_reads_every_sample_once_in_a_fixed_order(dataset):
    out, vocab, _ = dataset
    urls = shard_paths(out, "train")
    runs = [[i for b in ShardLoader(_stream(urls, vocab, "eval"), num_workers=2) for i in b["image_ids"]]
            for _ in range(2)]
    assert runs[0] == runs[1] and len(runs[0]) == len(set(runs[0])) == 30


def test_two_ranks_two_workers(dataset):
    out, vocab, records = dataset
    urls = shard_paths(out, "train")
    counts, seen = [], []
    for rank in (0, 1):
        train = ShardLoader(_stream(urls, vocab, "train", batches_per_rank=5, rank=rank, world_size=2,
                                    seed=3, shuffle_buffer=8), num_workers=2)
        batches = list(train)
        counts.append(len(batches))
        assert all(len(b["image_ids"]) == 4 for b in batches)
        evaluation = ShardLoader(_stream(urls, vocab, "eval", rank=rank, world_size=2), num_workers=2)
        seen += [i for b in evaluation for i in b["image_ids"]]
    assert counts == [5, 5]
    assert sorted(seen) == sorted(r.image_id for r in records if r.split == "train")


def test_training_stream_depends_on_epoch_and_rank_and_repeats_exactly(dataset):
    out, vocab, _ = dataset
    urls = shard_paths(out, "train")

    def order(epoch, rank):
        stream = _stream(urls, vocab, "train", batches_per_rank=4, rank=rank, world_size=2, shuffle_buffer=6)
        stream.set_epoch(epoch)
        return [i for b in ShardLoader(stream) for i in b["image_ids"]]

    assert order(0, 0) == order(0, 0)
    assert order(0, 0) != order(1, 0) and order(0, 0) != order(0, 1)


@pytest.mark.parametrize("workers", [0, 2])
def test_epochs_read_ahead_yield_the_batches_of_each_epoch_in_turn(dataset, workers, monkeypatch):
    """The trainer's ``epochs`` starts each epoch's workers while the previous epoch is read: the batches are
    still exactly those of setting each epoch and reading it alone, from any first epoch (resume)."""
    out, vocab, _ = dataset
    urls = shard_paths(out, "train")

    def loader():
        stream = _stream(urls, vocab, "train", batches_per_rank=3, shuffle_buffer=6)
        return ShardLoader(stream, num_workers=workers)

    def alone(epoch):
        single = loader()
        single.stream.set_epoch(epoch)
        return [b["image_ids"] for b in single]

    epochs = loader().epochs(2)
    for expected_epoch in (2, 3, 4):
        epoch, batches = next(epochs)
        assert epoch == expected_epoch and [b["image_ids"] for b in batches] == alone(epoch)
    epochs.close()
    bounded = loader()
    started = []
    monkeypatch.setattr(bounded, "_started", lambda epoch=None, original=bounded._started: started.append(
        epoch) or original(epoch))
    assert [(epoch, len(list(batches))) for epoch, batches in bounded.epochs(1, 2)] == [(1, 3), (2, 3)]
    assert started == [1, 2]  # no read-ahead past the last epoch


def test_corrupt_inputs_are_skipped_and_counted_exactly(tmp_path, dataset):
    _, vocab, _ = dataset
    good = json.dumps({"image_id": "g", "split": "train", "captions": [{"raw": "a dog", "tokens": ["a", "dog"]}]})
    with ShardWriter(tmp_path, "bad", max_count=100) as writer:
        writer.write("000", {"json": good.encode(), "jpg": jpeg_bytes(1)})
        writer.write("001", {"json": good.encode(), "jpg": b"\xff\xd8garbage"})
        writer.write("002", {"json": good.replace('"tokens": ["a", "dog"]', '"tokens": []').encode(),
                             "jpg": jpeg_bytes(2)})
        writer.write("003", {"json": b"{not json", "jpg": jpeg_bytes(3)})
        writer.write("004", {"jpg": jpeg_bytes(4)})
        writer.write("005", {"json": good.encode()})
        writer.write("006", {"json": good.encode(), "jpg": jpeg_bytes(6)})
    with ShardWriter(tmp_path, "good", max_count=100) as writer:
        for key in ("100", "101", "102"):
            writer.write(key, {"json": good.encode(), "jpg": jpeg_bytes(int(key))})
    whole = tmp_path / "good-000000.tar"
    with tarfile.open(whole) as tar:
        last = tar.getmembers()[-1]  # 102.json: cut inside its data, so 102 keeps only its image
    truncated = tmp_path / "trunc.tar"
    truncated.write_bytes(whole.read_bytes()[: last.offset_data + 5])
    urls = [str(tmp_path / "bad-000000.tar"), str(truncated), str(tmp_path / "missing.tar")]
    for workers in (0, 2):
        loader = ShardLoader(_stream(urls, vocab, "eval", batch_size=2), num_workers=workers)
        ids = sorted(k for b in loader for k in b["keys"])
        assert ids == ["000", "006", "100", "101"]
        assert loader.skipped == {"bad_image": 1, "no_captions": 1, "bad_metadata": 1, "missing_image": 1,
                                  "missing_metadata": 2, "corrupt_shard": 2}
        assert loader.report().startswith("skipped 8 (")


def test_a_training_stream_with_nothing_readable_fails_clearly(tmp_path, dataset):
    _, vocab, _ = dataset
    (tmp_path / "junk.tar").write_bytes(b"not a tar" * 100)
    loader = ShardLoader(_stream([str(tmp_path / "junk.tar")], vocab, "train", batches_per_rank=1))
    with pytest.raises(RuntimeError, match="no readable sample in"):
        next(iter(loader))
