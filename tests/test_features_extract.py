"""``dsalign features``: image shards → feature shards, read back by the training/evaluation pipeline."""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dsalign.data.feature_pipeline import (
    FeatureSampleDecoder,
    collate_features,
    decode_feature_rows,
    load_feature_manifest,
)
from dsalign.data.manifest import load_manifest, write_manifest
from dsalign.data.pipeline import ShardLoader, ShardStream
from dsalign.data.prepare import prepare_dataset
from dsalign.data.shapes import generate_shapes
from dsalign.data.shards import ShardWriter, iter_tar_samples, shard_paths
from dsalign.features import cli as features_cli
from dsalign.features.extract import FeatureConfig, FeatureExtractor, extract_features
from dsalign.features.regions import GridRegions
from dsalign.text import Vocabulary

SIZE = 64  # small CNN input: these tests prove plumbing, test_features_model.py proves the features


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def extractor() -> FeatureExtractor:
    return FeatureExtractor(FeatureConfig(regions="given", image_size=SIZE), batch_size=3)


@pytest.fixture(scope="module")
def images_dir(tmp_path_factory) -> Path:
    """6 train images in 3 shards (2 each) + 2 val images in 1 shard."""
    out = tmp_path_factory.mktemp("images")
    records = [*generate_shapes(6, "train", seed=1, image_size=96), *generate_shapes(2, "val", seed=1, image_size=96)]
    prepare_dataset(records, out, "shapes", shard_size=2, min_count=1, progress=False)
    return out


def _run(src: Path, out: Path, extractor: FeatureExtractor, **kwargs) -> dict | None:
    return extract_features(src, out, extractor.config, extractor=extractor, progress=False, **kwargs)


def _read_split(folder: Path, split: str, **decoder_kwargs) -> tuple[list[dict], ShardLoader]:
    vocab = Vocabulary.load(folder / "vocab.json")
    stream = ShardStream(shard_paths(folder, split), FeatureSampleDecoder(vocab, **decoder_kwargs),
                         collate_features, batch_size=4, mode="eval", rank=0, world_size=1)
    loader = ShardLoader(stream)
    return list(loader), loader


def test_round_trip_written_equals_read_back(tmp_path, images_dir, extractor):
    out = tmp_path / "features"
    manifest = _run(images_dir, out, extractor)
    assert manifest == load_feature_manifest(out)
    assert manifest["kind"] == "features" and manifest["backbone"] == "efficientnet-lite0"
    assert (manifest["feature_dim"], manifest["region_source"], manifest["top_k"]) == (1280, "given", 19)
    assert manifest["splits"]["train"]["images"] == 6 and len(manifest["splits"]["train"]["shards"]) == 3
    assert (out / "vocab.json").read_bytes() == (images_dir / "vocab.json").read_bytes()

    batches, loader = _read_split(out, "train")
    assert loader.report() == "skipped 0 samples"
    source = {key: members for url in shard_paths(images_dir, "train") for key, members in iter_tar_samples(url)}
    assert sorted(k for b in batches for k in b["keys"]) == sorted(source)
    vocab = Vocabulary.load(out / "vocab.json")
    keys = sorted(source)
    metas = {key: json.loads(source[key]["json"]) for key in keys}
    images = [Image.open(io.BytesIO(source[key]["png"])).convert("RGB") for key in keys]
    expected = dict(zip(keys, extractor.extract(images, [metas[key] for key in keys])))
    for batch in batches:
        assert batch["regions"].dtype == torch.float32 and batch["regions"].shape[-1] == 1280
        assert batch["region_mask"].shape == batch["regions"].shape[:2] == batch["boxes"].shape[:2]
        for b, key in enumerate(batch["keys"]):
            meta = metas[key]
            n = int(batch["region_mask"][b].sum())
            assert n == len(meta["boxes"]) + 1 and not batch["region_mask"][b, n:].any()
            torch.testing.assert_close(batch["regions"][b, :n], expected[key].features.half().float(),
                                       atol=0.02, rtol=0.01)  # batch composition changes float rounding
            assert batch["boxes"][b, 1:n].tolist() == torch.tensor(meta["boxes"]).tolist()
            assert batch["image_ids"][b] == meta["image_id"]
            assert batch["raw_captions"][b] == [c["raw"] for c in meta["captions"]]
            first = batch["tokens"][b, 0, : int(batch["token_mask"][b, 0].sum())].tolist()
            assert first == vocab.encode(meta["captions"][0]["tokens"])
    stored = dict(iter_tar_samples(out / "train" / "train-000000.tar"))
    meta_out = json.loads(next(iter(stored.values()))["json"])
    meta_in = json.loads(source[next(iter(stored))]["json"])
    assert meta_out["region_boxes"][1:] == meta_in["boxes"]  # given boxes pass through exactly
    for field in ("captions", "boxes", "box_labels", "extra", "image_id", "split"):
        assert meta_out[field] == meta_in[field]
    fp16, _ = _read_split(out, "val", keep_fp16=True)
    assert fp16[0]["regions"].dtype == torch.float16


class _BatchedGrid(GridRegions):
    """A grid that proposes for whole batches in the main process, as the detector does."""

    per_image = False


@pytest.mark.parametrize("source", ["selective-search", "batched"])
def test_worker_processes_give_identical_shards(tmp_path, images_dir, extractor, source):
    config = FeatureConfig(regions="grid" if source == "batched" else source, top_k=5, image_size=SIZE)
    outputs = []
    for workers in (0, 2):
        parallel = FeatureExtractor(config, batch_size=1, backbone=extractor.backbone, workers=workers,
                                    source=_BatchedGrid(5) if source == "batched" else None)
        try:
            _run(images_dir, tmp_path / str(workers), parallel)
            _run(images_dir, tmp_path / f"{workers}-again", parallel, overwrite=True)  # the workers serve again
        finally:
            parallel.close()
        outputs.append([p.read_bytes() for p in sorted((tmp_path / str(workers)).rglob("*.tar"))])
    assert outputs[0] == outputs[1] and len(outputs[0]) == 4


class _DiesOnceInAWorker(GridRegions):
    """Kills the worker process it proposes in at its ``die_at``-th image, once (``marker`` remembers)."""

    def __init__(self, count: int, marker: Path, die_at: int):
        super().__init__(count)
        self.parent, self.marker, self.die_at, self.seen = os.getpid(), marker, die_at, 0

    def propose(self, image, meta):
        self.seen += 1
        if os.getpid() != self.parent and self.seen == self.die_at and not self.marker.exists():
            self.marker.touch()
            os._exit(3)
        return super().propose(image, meta)


def test_a_dead_worker_process_stops_the_run_with_one_line(tmp_path, extractor):
    src = tmp_path / "images"  # one shard of 5 worker tasks: the worker dies with tasks queued and still to come
    prepare_dataset(list(generate_shapes(40, "train", seed=3, image_size=64)), src, "shapes", shard_size=40,
                    min_count=1, progress=False)
    config = FeatureConfig(regions="grid", top_k=3, image_size=SIZE)
    dying = FeatureExtractor(config, batch_size=2, backbone=extractor.backbone, workers=1,
                             source=_DiesOnceInAWorker(3, tmp_path / "died", die_at=20))
    try:
        with pytest.raises(RuntimeError, match="a worker process died .*rerun with --resume"):
            _run(src, tmp_path / "features", dying)
        assert not (tmp_path / "features" / "train" / "train-000000.tar").exists()  # the half shard is no shard
        _run(src, tmp_path / "features", dying, resume=True)  # the same extractor starts new workers
    finally:
        dying.close()
    in_line = FeatureExtractor(config, batch_size=2, backbone=extractor.backbone)
    _run(src, tmp_path / "in-line", in_line)
    shard = Path("train") / "train-000000.tar"
    assert (tmp_path / "features" / shard).read_bytes() == (tmp_path / "in-line" / shard).read_bytes()


_KILLED_MAIN = """
import sys, threading, time
import torch
from torch import nn
from dsalign.features.backbones import Backbone
from dsalign.features.extract import FeatureConfig, FeatureExtractor, extract_features
from dsalign.features.regions import GridRegions

class SlowGrid(GridRegions):
    def propose(self, image, meta):
        time.sleep(0.2)
        return super().propose(image, meta)

backbone = Backbone("tiny", nn.Conv2d(3, 3, 1), nn.Identity(), 3, (0.5,) * 3, (0.5,) * 3, "none")
extractor = FeatureExtractor(FeatureConfig(regions="grid", top_k=3, image_size=64), batch_size=2,
                             backbone=backbone, source=SlowGrid(3), workers=2)

def report_workers():
    while (pool := extractor._workers._pool) is None or len(pool._processes) < 2:
        time.sleep(0.05)
    print(*pool._processes, flush=True)

threading.Thread(target=report_workers, daemon=True).start()
extract_features(sys.argv[1], sys.argv[2], extractor.config, extractor=extractor, progress=False)
"""


def _running(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "State:\tZ" not in status  # a zombie has exited


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads /proc")
def test_worker_processes_end_when_their_main_process_is_killed(tmp_path, images_dir):
    script = tmp_path / "killed_main.py"
    script.write_text(_KILLED_MAIN)
    main = subprocess.Popen([sys.executable, str(script), str(images_dir), str(tmp_path / "features")],
                            stdout=subprocess.PIPE, text=True)
    try:
        workers = [int(pid) for pid in main.stdout.readline().split()]
        assert len(workers) == 2 and all(_running(pid) for pid in workers)
    finally:
        main.kill()  # SIGKILL: no clean-up of its own runs
        main.wait()
    deadline = time.monotonic() + 10
    while any(_running(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    orphans = [pid for pid in workers if _running(pid)]
    for pid in orphans:  # a failing run must not leave them behind
        os.kill(pid, signal.SIGKILL)
    assert not orphans, "orphaned workers kept running"
    assert main.stdout.read() == ""  # end of file: no orphan holds the pipe open


def test_box_geometry_appends_each_regions_box(tmp_path, images_dir, extractor):
    config = FeatureConfig(regions="given", image_size=SIZE, box_geometry=True)
    with_boxes = FeatureExtractor(config, batch_size=3, backbone=extractor.backbone)
    assert with_boxes.feature_dim == extractor.feature_dim + 4
    assert "box_geometry" in with_boxes.settings() and "box_geometry" not in extractor.settings()
    manifest = _run(images_dir, tmp_path / "geometry", with_boxes)
    plain = _run(images_dir, tmp_path / "plain", extractor)
    assert manifest["feature_dim"] == plain["feature_dim"] + 4
    batches, _ = _read_split(tmp_path / "geometry", "train")
    reference, _ = _read_split(tmp_path / "plain", "train")
    for batch, base in zip(batches, reference):
        mask = batch["region_mask"]
        assert torch.equal(batch["regions"][..., :-4], base["regions"])
        assert torch.allclose(batch["regions"][..., -4:][mask], batch["boxes"][mask], atol=1e-3)  # fp16 storage
        assert (batch["boxes"][mask][:, 2:] - batch["boxes"][mask][:, :2]).min() > 0


def test_a_recorded_fingerprint_gives_back_its_config():
    for config in (FeatureConfig(), FeatureConfig(proposal_mode="fast", proposal_side=96),
                   FeatureConfig(regions="given", pooling="crop", crop_size=96, box_geometry=True)):
        assert FeatureConfig.from_fingerprint(config.fingerprint()) == config
    # Features made before --proposal-mode existed were made in fast mode; their bundles must still get it.
    old = {"regions": "selective-search", "proposal_side": 96, "feature_dim": 1280}
    assert FeatureConfig.from_fingerprint(old).proposal_mode == "fast"
    assert FeatureConfig.from_fingerprint(old, regions="grid").regions == "grid"


def test_a_killed_run_resumes_without_recomputing_finished_shards(tmp_path, images_dir, extractor, monkeypatch):
    reference = _run(images_dir, tmp_path / "reference", extractor)
    out = tmp_path / "features"
    write = FeatureExtractor._write
    written: list[int] = []

    def killed_in_second_shard(self, batch, writer, *args):
        if batch:
            written.append(len(batch))
            if len(written) == 2:  # each 2-image shard is one batch: this dies inside train-000001
                writer.write(batch[0].key, {"json": b"{}"})  # half written
                raise KeyboardInterrupt
        return write(self, batch, writer, *args)

    monkeypatch.setattr(FeatureExtractor, "_write", killed_in_second_shard)
    with pytest.raises(KeyboardInterrupt):
        _run(images_dir, out, extractor)
    monkeypatch.setattr(FeatureExtractor, "_write", write)
    kept = out / "train" / "train-000000.tar"
    kept_stamp = kept.stat().st_mtime_ns
    assert not (out / "train" / "train-000001.tar").exists() and not (out / "manifest.json").exists()
    (stale,) = (out / "train").glob(".tmp-train-000001.tar-*")  # the half shard, under its temporary name
    with pytest.raises(ValueError, match="not empty"):
        _run(images_dir, out, extractor)

    done: list[str] = []
    process = FeatureExtractor.process_shard

    def spy(self, url, path, *args, **kwargs):
        done.append(Path(url).name)
        return process(self, url, path, *args, **kwargs)

    monkeypatch.setattr(FeatureExtractor, "process_shard", spy)
    resumed = _run(images_dir, out, extractor, resume=True)
    assert done == ["train-000001.tar", "train-000002.tar", "val-000000.tar"]
    assert kept.stat().st_mtime_ns == kept_stamp and not stale.exists()
    assert {k: v for k, v in resumed.items() if k != "source"} == {k: v for k, v in reference.items() if k != "source"}
    for shard in reference["splits"]["train"]["shards"]:
        assert (out / shard).read_bytes() == (tmp_path / "reference" / shard).read_bytes()

    other = FeatureExtractor(FeatureConfig(regions="grid", top_k=3, image_size=SIZE), batch_size=3,
                             backbone=extractor.backbone)
    with pytest.raises(ValueError, match="different settings"):
        _run(images_dir, out, other, resume=True)
    manifest = _run(images_dir, out, other, overwrite=True)
    assert manifest["region_source"] == "grid" and manifest["max_regions"] == 4
    shutil.copytree(images_dir, tmp_path / "images")
    with pytest.raises(ValueError, match="not a feature folder"):
        _run(images_dir, tmp_path / "images", other, overwrite=True)  # never clears an image folder
    assert load_manifest(tmp_path / "images") == load_manifest(images_dir)


def test_ranks_split_the_shards_evenly_and_rank_zero_writes_the_manifest(tmp_path, images_dir, extractor):
    out = tmp_path / "features"
    shards = [rel for split in ("train", "val") for rel in load_manifest(images_dir)["splits"][split]["shards"]]
    assert _run(images_dir, out, extractor, rank=1, world_size=2) is None
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.tar")) == sorted(shards[1::2])
    assert not (out / "manifest.json").exists()
    with pytest.raises(RuntimeError, match="still unfinished"):  # rank 0 of 5: the other ranks never come
        _run(images_dir, tmp_path / "other", extractor, rank=0, world_size=5, wait_timeout=0.2, poll_s=0.05)
    manifest = _run(images_dir, out, extractor, rank=0, world_size=2)
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.tar")) == sorted(shards)
    assert manifest["splits"]["train"]["images"] == 6 and manifest["splits"]["val"]["images"] == 2


@pytest.mark.parametrize("workers", [0, 2])
def test_bad_inputs_are_skipped_and_counted(tmp_path, extractor, workers):
    src = tmp_path / "images"
    good = [r for r in generate_shapes(3, "train", seed=2, image_size=64)]
    with ShardWriter(src / "train", "train") as writer:
        for i, record in enumerate(good):
            meta = {"image_id": record.image_id, "split": "train", "boxes": record.boxes,
                    "captions": [{"raw": c.raw, "tokens": c.tokens} for c in record.captions]}
            members = {"json": json.dumps(meta).encode(), "png": record.image_bytes}
            if i == 1:
                members["png"] = b"\x89PNG garbage, not an image"
            if i == 2:
                meta["boxes"] = [[0.5, 0.5, 0.1, 0.9]]
                members["json"] = json.dumps(meta).encode()
            writer.write(f"{i:09d}", members)
        writer.write("000000009", {"png": good[0].image_bytes})  # no metadata
    whole = src / "train" / "train-000000.tar"
    with tarfile.open(whole) as tar:  # cut the copy inside the first image: a shard truncated mid-download
        cut = tar.getmember("000000000.png").offset_data + 10
    (src / "train" / "train-000001.tar").write_bytes(whole.read_bytes()[:cut])
    Vocabulary(["a"]).save(src / "words.json")  # a hand-made folder may name its vocabulary file otherwise
    write_manifest(src, {"name": "bad", "vocab": "words.json", "vocab_size": 5, "splits": {"train": {
        "images": 4, "captions": 0, "shards": ["train/train-000000.tar", "train/train-000001.tar"], "skipped": {}}}})

    parallel = FeatureExtractor(extractor.config, batch_size=3, backbone=extractor.backbone, workers=workers)
    try:
        manifest = _run(src, tmp_path / "features", parallel)
    finally:
        parallel.close()
    counts = manifest["splits"]["train"]["skipped"]
    assert counts == {"bad_boxes": 1, "bad_image": 1, "corrupt_shard": 1, "missing_image": 1, "missing_metadata": 1}
    reasons = {(s["shard"], s["key"], s["reason"]) for s in manifest["skipped"]}
    assert reasons == {("train/train-000000.tar", "000000001", "bad_image"),
                       ("train/train-000000.tar", "000000002", "bad_boxes"),
                       ("train/train-000000.tar", "000000009", "missing_metadata"),
                       ("train/train-000001.tar", "000000000", "missing_image"),  # its image was cut off
                       ("train/train-000001.tar", None, "corrupt_shard")}
    assert manifest["splits"]["train"]["images"] == 1
    assert len(list(iter_tar_samples(tmp_path / "features" / "train" / "train-000001.tar"))) == 0
    # the copy goes where the trainers read it
    assert Vocabulary.load(tmp_path / "features" / "vocab.json").itos == Vocabulary(["a"]).itos


def _feature_sample(features: np.ndarray, boxes: list) -> dict[str, bytes]:
    buffer = io.BytesIO()
    np.save(buffer, features, allow_pickle=False)
    meta = {"image_id": "x", "captions": [{"raw": "a b", "tokens": ["a", "b"]}], "region_boxes": boxes}
    return {"json": json.dumps(meta).encode(), "npy": buffer.getvalue()}


def test_feature_decoder_skips_bad_features(tmp_path):
    good = np.ones((2, 8), dtype=np.float16)
    boxes = [[0, 0, 1, 1], [0.1, 0.1, 0.5, 0.5]]
    samples = {
        "good": _feature_sample(good, boxes),
        "nan": _feature_sample(np.full((2, 8), np.nan, dtype=np.float16), boxes),
        "inf": _feature_sample(np.array([[np.inf] * 8, [0] * 8], dtype=np.float32), boxes),
        "flat": _feature_sample(np.ones(16, dtype=np.float16), boxes),
        "width": _feature_sample(np.ones((2, 4), dtype=np.float16), boxes),
        "rows": _feature_sample(good, boxes[:1]),
        "ints": _feature_sample(np.ones((2, 8), dtype=np.int64), boxes),
        "nonpy": {"json": _feature_sample(good, boxes)["json"]},
        "garbage": {**_feature_sample(good, boxes), "npy": b"\x93NUMPY garbage"},
    }
    with ShardWriter(tmp_path, "f") as writer:
        for key, members in samples.items():
            writer.write(key, members)
    vocab = Vocabulary(["a", "b"])
    stream = ShardStream([str(p) for p in writer.paths], FeatureSampleDecoder(vocab, feature_dim=8),
                         collate_features, batch_size=8, mode="eval", rank=0, world_size=1)
    loader = ShardLoader(stream)
    (batch,) = list(loader)
    assert batch["keys"] == ["good"] and loader.skipped == {"bad_features": len(samples) - 1}
    assert batch["regions"].shape == (1, 2, 8) and batch["region_mask"].all()
    assert batch["tokens"].tolist() == [[[vocab.encode(["a"])[0], vocab.encode(["b"])[0]]]]


def test_feature_rows_read_any_layout_numpy_writes() -> None:
    """Hand-made shards may hold Fortran-ordered arrays, float16 or float32, or a single vector: the rows come
    out as numpy saved them, read in place from the sample's bytes."""
    rows = np.arange(24, dtype=np.float32).reshape(3, 8) / 7
    for array, expected in [(np.asfortranarray(rows), rows), (rows.astype(np.float16), rows.astype(np.float16)),
                            (rows[0], rows[:1])]:
        raw = _feature_sample(array, [])
        got = decode_feature_rows(raw, 8)
        assert got.dtype == expected.dtype and np.array_equal(got, expected)
    assert not got.flags.writeable  # a view of the tar's bytes: decoders copy before handing out tensors
    # keep_fp16 keeps float16 rows as they are and never rounds float32 rows down; a batch of both is float32
    decoder = FeatureSampleDecoder(Vocabulary(["a", "b"]), feature_dim=8, keep_fp16=True)
    wide = rows * 1e5  # beyond float16's range
    samples = [decoder(key, _feature_sample(array, [[0, 0, 1, 1]] * len(array)))
               for key, array in (("f16", rows.astype(np.float16)), ("f32", wide))]
    assert [s["regions"].dtype for s in samples] == [torch.float16, torch.float32]
    batch = collate_features(samples)
    assert batch["regions"].dtype == torch.float32 and torch.equal(batch["regions"][1], torch.from_numpy(wide))


def test_collate_pads_regions_and_masks():
    a = {"key": "a", "image_id": "a", "regions": torch.ones(3, 4), "boxes": torch.rand(3, 4),
         "captions": [[5, 6]], "raw_captions": ["x y"]}
    b = {"key": "b", "image_id": "b", "regions": torch.full((1, 4), 2.0), "boxes": torch.rand(1, 4),
         "captions": [[5], [7, 8, 9]], "raw_captions": ["x", "z z z"]}
    batch = collate_features([a, b])
    assert batch["regions"].shape == (2, 3, 4) and batch["regions"][1, 1:].eq(0).all()
    assert batch["region_mask"].tolist() == [[True, True, True], [True, False, False]]
    assert batch["tokens"].shape == (2, 2, 3) and batch["caption_mask"].tolist() == [[True, False], [True, True]]


def test_cli_parser_runs_the_extraction(tmp_path, images_dir, capsys):
    parser = argparse.ArgumentParser(prog="dsalign")
    features_cli.add_parser(parser.add_subparsers(dest="command", required=True))
    out = tmp_path / "features"
    args = parser.parse_args(["features", str(images_dir), "--out", str(out), "--regions", "grid", "--top-k",
                              "4", "--image-size", str(SIZE), "--batch-size", "4", "--threads", "1", "--quiet"])
    args.func(args)
    assert "efficientnet-lite0 1280-d features, grid regions (top 4 + whole image)" in capsys.readouterr().out
    assert load_feature_manifest(out)["max_regions"] == 5
    with pytest.raises(SystemExit):
        parser.parse_args(["features", str(images_dir), "--out", str(out), "--top-k", "-1"])
    with pytest.raises(ValueError, match="not a feature folder"):
        load_feature_manifest(images_dir)


def _images_with_boxes(src: Path, with_boxes: list[bool]) -> Path:
    """One train shard of shapes images; image i keeps its boxes only where ``with_boxes[i]``."""
    records = generate_shapes(len(with_boxes), "train", seed=3, image_size=64)
    with ShardWriter(src / "train", "train") as writer:
        for i, (record, keep) in enumerate(zip(records, with_boxes)):
            meta = {"image_id": record.image_id, "split": "train", **({"boxes": record.boxes} if keep else {}),
                    "captions": [{"raw": c.raw, "tokens": c.tokens} for c in record.captions]}
            writer.write(f"{i:09d}", {"json": json.dumps(meta).encode(), "png": record.image_bytes})
    Vocabulary(["a"]).save(src / "vocab.json")
    write_manifest(src, {"name": "boxes", "vocab": "vocab.json", "vocab_size": 5, "splits": {"train": {
        "images": len(with_boxes), "captions": 0, "shards": ["train/train-000000.tar"], "skipped": {}}}})
    return src


def test_given_regions_without_boxes_are_counted_or_refused(tmp_path, extractor, caplog):
    some = _run(_images_with_boxes(tmp_path / "some", [True, False, True]), tmp_path / "f1", extractor)
    assert some["splits"]["train"]["no_boxes"] == 1 and some["splits"]["train"]["images"] == 3
    assert "3 images, 15 captions, 1 shards, 1 without given boxes (whole image only)" in \
        features_cli.summary(some, tmp_path / "f1")
    none = _images_with_boxes(tmp_path / "none", [False, False])
    assert "none of the" not in caplog.text  # shards with some boxes do not warn
    with pytest.raises(ValueError, match="none of the 2 train images has boxes in the data; use --regions grid"):
        _run(none, tmp_path / "f2", extractor)
    assert caplog.text.count("--regions given: none of the 2 images of") == 1  # warned once, after its shard
    assert not (tmp_path / "f2" / "manifest.json").exists()


def test_a_corrupt_vocabulary_is_refused_before_any_work(tmp_path, images_dir, extractor):
    """It is copied into the output only at the end: a corrupt one must not wait for every shard."""
    import shutil

    src = tmp_path / "src"
    shutil.copytree(images_dir, src)
    (src / "vocab.json").write_text('["not", "a", "vocabulary"]')
    with pytest.raises(ValueError, match="malformed vocabulary"):
        _run(src, tmp_path / "out", extractor)
    assert not list((tmp_path / "out").glob("**/*.tar"))


def test_each_launched_process_takes_its_own_gpu(monkeypatch):
    """`torchrun --nproc-per-node 4 ... features --device cuda` ran every rank's CNN on GPU 0."""
    from dsalign.features.extract import process_device

    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert process_device("cuda") == torch.device("cuda")
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "1")  # a world of one (a training run's own, in this process): no launcher
    assert process_device("cuda") == torch.device("cuda")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert process_device("cuda") == torch.device("cuda", 3)
    assert process_device("cuda:1") == torch.device("cuda", 1) and process_device("cpu") == torch.device("cpu")


def test_gpu_runs_get_worker_processes_by_default(monkeypatch):
    """A GPU's CNN outruns one process decoding and proposing many times over: by default each launched process
    gets its share of the cores, less the one it runs on; CPU runs keep the cores for the CNN's threads."""
    from dsalign.features.extract import default_workers

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert default_workers("cpu") == 0 and default_workers("cuda") == 8 and default_workers("cuda:1") == 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # torchrun --nproc-per-node 4
    assert default_workers("cuda") == 3
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "32")
    assert default_workers("cuda") == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_features_from_worker_processes_match_cpu(tmp_path, images_dir, extractor):
    """On a GPU, with worker processes forked from a process that holds a CUDA context: the same regions as on
    CPU in line, and the same features up to float16 storage and the GPU's TF32 convolutions."""
    config = FeatureConfig(regions="selective-search", top_k=5, image_size=SIZE)
    gpu = FeatureExtractor(config, "cuda", batch_size=3, workers=2)
    assert next(gpu.backbone.parameters()).is_cuda
    try:
        _run(images_dir, tmp_path / "cuda", gpu)
    finally:
        gpu.close()
    _run(images_dir, tmp_path / "cpu", FeatureExtractor(config, batch_size=3, backbone=extractor.backbone))
    for split in ("train", "val"):
        on_gpu, _ = _read_split(tmp_path / "cuda", split)
        on_cpu, _ = _read_split(tmp_path / "cpu", split)
        for a, b in zip(on_gpu, on_cpu, strict=True):
            assert a["keys"] == b["keys"] and torch.equal(a["boxes"], b["boxes"])
            torch.testing.assert_close(a["regions"], b["regions"], atol=0.05, rtol=0.02)
