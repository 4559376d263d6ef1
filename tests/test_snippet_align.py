"""The snippet alignment stage on a hand-built setup whose answer is known without training: region and word
embeddings are fixed so each word's best region is chosen by construction. Plus metrics, resume and pictures."""

from __future__ import annotations

import argparse
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dsalign.bundle import export_bundle
from dsalign.data.manifest import write_manifest
from dsalign.data.shards import ShardWriter
from dsalign.models.alignment import AlignmentConfig, AlignmentModel
from dsalign.ops.viterbi import extension_available
from dsalign.snippet_align import (
    AlignmentCounts,
    align_folder,
    align_pairs,
    collect_pair_batches,
    embed_batch,
    evaluate_shapes_alignment,
    iter_feature_batches,
    majority_region,
    read_snippets,
    region_for_box,
    sweep_beta,
)
from dsalign.snippet_cli import add_align_parser
from dsalign.text import Vocabulary
from dsalign.viz import PALETTE, draw_alignment, picture_size

pytestmark = pytest.mark.skipif(not extension_available(), reason="dsalign._C (viterbi) is not built")

WORDS = ["a", "red", "circle", "and", "blue", "square"]
# Word vectors in a 3-d space whose axes are the regions: whole image, box 0, box 1. Filler words point at the
# whole image, "red circle" at box 0, "blue square" at box 1 (square weighs more, so a single region for the
# whole sentence is box 1).
WORD_VECTORS = {"a": [1, 0, 0], "and": [1, 0, 0], "red": [0, 2, 0], "circle": [0, 3, 0], "blue": [0, 0, 2],
                "square": [0, 0, 4]}
CAPTION = ["a", "red", "circle", "and", "a", "blue", "square"]
SPANS = [[1, 3, 0], [5, 7, 1]]  # (start, end, box): "red circle" -> box 0, "blue square" -> box 1
BOXES = [[0.1, 0.1, 0.4, 0.4], [0.5, 0.5, 0.9, 0.8]]
REGION_BOXES = [[0.0, 0.0, 1.0, 1.0], *BOXES]  # region 0 = whole image, region i + 1 = box i


class LookupModel(torch.nn.Module):
    """Regions embed as their own features; words as fixed vectors: the similarities are known exactly."""

    def __init__(self, vocab: Vocabulary):
        super().__init__()
        table = torch.zeros(len(vocab), 3)
        for word, vector in WORD_VECTORS.items():
            table[vocab.stoi[word]] = torch.tensor(vector, dtype=torch.float32)
        self.register_buffer("table", table)

    def encode_images(self, regions: torch.Tensor, region_mask: torch.Tensor) -> torch.Tensor:
        return regions.float() * region_mask[:, :, None]

    def encode_sentences(self, tokens: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
        return self.table[tokens] * token_mask[:, :, None]


def _vocab() -> Vocabulary:
    return Vocabulary(WORDS)


def _write_features(root: Path, n_shards: int = 2, per_shard: int = 3, feature_dim: int = 3,
                    spans: list | None = SPANS) -> Path:
    """A feature folder (as `dsalign features --regions given` writes it) plus the image folder it came from.

    Features are the identity rows, so region r embeds as axis r; captions 0 and 2 are the known sentence,
    caption 1 is empty (kept in the metadata, skipped by the reader: its index must survive). ``spans`` None:
    captions without ground-truth spans, as in Flickr or COCO data.
    """
    feat, img = root / "feat", root / "img"
    shards = []
    for s in range(n_shards):
        rel = f"train/train-{s:06d}.tar"
        shards.append(rel)
        with ShardWriter(feat / "train", "part") as fw, ShardWriter(img / "train", "part") as iw:
            for i in range(per_shard):
                key = f"{s * per_shard + i:09d}"
                meta = {"image_id": f"img-{key}", "split": "train", "boxes": BOXES,
                        "captions": [{"raw": " ".join(CAPTION), "tokens": CAPTION, "spans": spans},
                                     {"raw": "", "tokens": []},
                                     {"raw": " ".join(CAPTION), "tokens": CAPTION, "spans": spans}]}
                features = np.zeros((3, feature_dim), dtype=np.float16)
                features[:, :3] = np.eye(3)
                buffer = io.BytesIO()
                np.save(buffer, features)
                fw.write(key, {"json": json.dumps({**meta, "region_boxes": REGION_BOXES}).encode(),
                               "npy": buffer.getvalue()})
                png = io.BytesIO()
                Image.new("RGB", (32, 32), (200, 200, 200)).save(png, format="PNG")
                iw.write(key, {"json": json.dumps(meta).encode(), "png": png.getvalue()})
        os.replace(feat / "train" / "part-000000.tar", feat / rel)
        os.replace(img / "train" / "part-000000.tar", img / rel)
    _vocab().save(feat / "vocab.json")
    split = {"shards": shards, "images": n_shards * per_shard, "captions": 3 * n_shards * per_shard}
    write_manifest(feat, {"kind": "features", "feature_dim": feature_dim, "name": "toy", "source": str(img),
                          "splits": {"train": split}})
    return feat


@pytest.fixture()
def features(tmp_path: Path) -> Path:
    return _write_features(tmp_path)


def _one_batch(features: Path) -> dict:
    url = str(features / "train/train-000000.tar")
    return next(iter_feature_batches([url], _vocab(), 3, batch_size=8))


def test_beta_zero_gives_word_snippets_and_large_beta_one_region(features: Path) -> None:
    pairs = embed_batch(LookupModel(_vocab()), _one_batch(features))
    assert len(pairs.pairs) == 6 and [p.caption for p in pairs.pairs[:2]] == [0, 2]
    _, records = align_pairs(pairs, beta=0.0)
    got = [(r.region, r.start, r.end, r.tokens) for r in records[0]]
    assert got == [(0, 0, 1, ["a"]), (1, 1, 3, ["red", "circle"]), (0, 3, 5, ["and", "a"]),
                   (2, 5, 7, ["blue", "square"])]
    assert [r.score for r in records[0]] == [1.0, 2.5, 1.0, 3.0]  # mean word-region similarity
    assert records[0][1].box == pytest.approx(BOXES[0]) and records[0][0].image_id == "img-000000000"
    _, records = align_pairs(pairs, beta=100.0)
    assert all([(r.region, r.start, r.end) for r in rs] == [(2, 0, 7)] for rs in records)
    assert records[0][0].score == pytest.approx(6 / 7)
    # Objects only: filler words tie on both boxes (similarity 0) and go to the lower one; scores stay true.
    _, records = align_pairs(pairs, beta=0.0, whole_image=False)
    assert [(r.region, r.start, r.end, r.score) for r in records[0]] == [(1, 0, 5, 1.0), (2, 5, 7, 3.0)]


def test_shapes_metrics_through_the_stage(features: Path) -> None:
    model = LookupModel(_vocab())
    exact = evaluate_shapes_alignment(model, _vocab(), features, beta=0.0, split="train")
    assert exact == {"beta": 0.0, "mentions": 24, "accuracy": 1.0, "word_accuracy": 1.0, "boundary_precision": 1.0,
                     "boundary_recall": 1.0, "boundary_f1": 1.0}
    rows = sweep_beta(model, _vocab(), features, [0.0, 100.0], split="train", limit=1)
    assert [r["mentions"] for r in rows] == [4, 4]  # one image, two real captions, two mentions each
    assert rows[1]["accuracy"] == 0.5 and rows[1]["boundary_recall"] == 0.0 and rows[1]["boundary_f1"] == 0.0
    assert len(collect_pair_batches(model, _vocab(), features, "train", batch_size=2)) == 3


def test_alignment_counts_on_hand_made_cases() -> None:
    counts = AlignmentCounts()
    counts.add([0, 1, 1, 0, 0, 2, 2], [(1, 3, 1), (5, 7, 2)])
    assert counts.summary()["accuracy"] == 1.0 and counts.summary()["boundary_f1"] == 1.0
    assert majority_region([2, 1, 1, 2], 0, 4) == 1  # a tie goes to the lowest region
    counts = AlignmentCounts()
    counts.add([0, 0, 1, 1], [(1, 4, 1), (0, 1, -1)])  # cut one word late; the second mention has no region
    summary = counts.summary()
    assert summary["mentions"] == 2 and summary["accuracy"] == 0.5
    assert summary["word_accuracy"] == 2 / 4  # words 2 and 3 of the first mention; none of the second
    assert summary["boundary_precision"] == 0.0 and summary["boundary_recall"] == 0.0
    late = AlignmentCounts()
    late.add([0, 0, 1, 1], [(1, 4, 1)], tolerance=1)
    assert late.summary()["boundary_f1"] == 1.0
    assert region_for_box(BOXES[1], REGION_BOXES, 3) == 2
    assert region_for_box([0.0, 0.0, 0.05, 0.05], REGION_BOXES, 3) == -1  # region 0 never stands for a box


def test_folder_round_trip_and_resume(tmp_path: Path, features: Path) -> None:
    out = tmp_path / "snip"
    model, vocab = LookupModel(_vocab()), _vocab()
    manifest = align_folder(model, vocab, features, out, beta=0.0, batch_size=2, progress=False)
    info = manifest["splits"]["train"]
    assert (info["images"], info["pairs"], info["snippets"]) == (6, 12, 48) and manifest["kind"] == "snippets"
    rows = list(read_snippets(out))
    assert len(rows) == 48
    record, feature = rows[1]
    assert (record.key, record.caption, record.region, record.tokens) == ("000000000", 0, 1, ["red", "circle"])
    assert feature.dtype == np.float16 and feature.tolist() == [0.0, 1.0, 0.0]
    assert {r.caption for r, _ in rows} == {0, 2}

    with pytest.raises(ValueError, match="not empty"):
        align_folder(model, vocab, features, out, beta=0.0, progress=False)
    first, second = out / "train/train-000000.tar", out / "train/train-000001.tar"
    kept = first.stat()
    second.unlink()  # as if the run had died while writing shard 1, leaving its temporaries behind
    (out / "train/.tmp-train-000001.tar-99999").mkdir()
    manifest = align_folder(model, vocab, features, out, beta=0.0, batch_size=2, resume=True, progress=False)
    assert manifest["resumed_shards"] == 1 and manifest["splits"]["train"]["snippets"] == 48
    assert (first.stat().st_ino, first.stat().st_mtime_ns) == (kept.st_ino, kept.st_mtime_ns)
    assert [r for r, _ in read_snippets(out)] == [r for r, _ in rows]
    assert not list((out / "train").glob(".tmp-*"))
    with pytest.raises(ValueError, match="beta"):
        align_folder(model, vocab, features, out, beta=1.0, resume=True, progress=False)
    # A caller that owns the folder (the demo rerun after more training) has shards of other settings redone.
    manifest = align_folder(model, vocab, features, out, beta=1.0, batch_size=2, resume=True, progress=False,
                            redo_other_settings=True)
    assert manifest["resumed_shards"] == 0 and manifest["settings"]["beta"] == 1.0
    assert json.loads((out / "train/train-000000.tar.stats.json").read_text())["settings"]["beta"] == 1.0


def test_a_redo_killed_between_stats_and_tar_leaves_the_shard_unfinished(tmp_path: Path, features: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A finished shard redone in place (other settings): a kill after the new stats are written but before the
    new tar replaces the old one used to leave the old snippets passing as made with the new settings."""
    from dsalign.data import shard_output

    out = tmp_path / "snip"
    model, vocab = LookupModel(_vocab()), _vocab()
    align_folder(model, vocab, features, out, beta=0.0, batch_size=2, progress=False)
    rename = os.replace

    def killed_at_the_tar(src: str | Path, dst: str | Path) -> None:
        if str(dst).endswith(".tar"):
            raise KeyboardInterrupt
        rename(src, dst)

    monkeypatch.setattr(shard_output.os, "replace", killed_at_the_tar)
    with pytest.raises(KeyboardInterrupt):
        align_folder(model, vocab, features, out, beta=1.0, batch_size=2, resume=True, progress=False,
                     redo_other_settings=True)
    monkeypatch.undo()
    assert shard_output.finished_stats(out / "train/train-000000.tar") is None
    manifest = align_folder(model, vocab, features, out, beta=1.0, batch_size=2, resume=True, progress=False,
                            redo_other_settings=True)
    assert manifest["resumed_shards"] == 0 and manifest["splits"]["train"]["snippets"] == 48


def test_cli_with_an_exported_bundle(tmp_path: Path, features: Path, capsys: pytest.CaptureFixture) -> None:
    torch.manual_seed(0)
    bundle = export_bundle(AlignmentModel(AlignmentConfig(len(_vocab()), 3, embed_dim=8, word_dim=8,
                                                          hidden_dim=8)), _vocab(), tmp_path / "bundle")
    parser = argparse.ArgumentParser()
    add_align_parser(parser.add_subparsers(dest="command"))

    def run(*argv: str) -> None:
        args = parser.parse_args(["align", "--bundle", str(bundle), "--features", str(features), *argv])
        args.func(args)

    run("--out", str(tmp_path / "snip"), "--beta", "0.5", "--quiet")
    assert "12 pairs" in capsys.readouterr().out
    assert sum(1 for _ in read_snippets(tmp_path / "snip")) >= 12
    run("--evaluate", "0,1e6", "--objects-only")
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["beta"] for r in rows] == [0.0, 1e6] and rows[1]["boundary_f1"] == 0.0
    assert rows[0]["whole_image"] is False
    run("--picture", str(tmp_path / "pic.png"), "--show-image", "img-000000004")
    assert "img-000000004" in capsys.readouterr().out
    assert Image.open(tmp_path / "pic.png").width >= 384


def _bundle(path: Path, feature_dim: int = 3, settings: dict | None = None) -> Path:
    torch.manual_seed(0)
    model = AlignmentModel(AlignmentConfig(len(_vocab()), feature_dim, embed_dim=8, word_dim=8, hidden_dim=8))
    return export_bundle(model, _vocab(), path, features={"settings": settings or {}})


def _main(*argv: str, capsys: pytest.CaptureFixture) -> tuple[int, str]:
    from dsalign.cli import main

    status = main(list(argv))
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) <= 1
    return status, err


def test_evaluate_needs_non_negative_betas_and_ground_truth_spans(tmp_path: Path, capsys) -> None:
    bundle = _bundle(tmp_path / "bundle")
    no_spans = _write_features(tmp_path / "flickr", spans=None)
    with pytest.raises(SystemExit):
        _main("align", "--bundle", str(bundle), "--features", str(no_spans), "--evaluate", "0.3,-1", capsys=capsys)
    assert "expected a number >= 0.0, got '-1'" in capsys.readouterr().err
    status, err = _main("align", "--bundle", str(bundle), "--features", str(no_spans), "--evaluate", "0.3",
                        capsys=capsys)
    assert status == 2 and "has no ground-truth mention spans" in err
    with pytest.raises(ValueError, match="no ground-truth mention spans"):
        evaluate_shapes_alignment(LookupModel(_vocab()), _vocab(), no_spans, beta=0.0, split="train")


def test_features_that_do_not_match_the_bundle(tmp_path: Path, features: Path, capsys) -> None:
    wide = _bundle(tmp_path / "wide", feature_dim=7, settings={"backbone": "b", "box_geometry": True})
    status, err = _main("align", "--bundle", str(wide), "--features", str(features), "--out", str(tmp_path / "s"),
                        capsys=capsys)
    assert status == 2 and err.endswith(f"features in {features} are 3-d; the bundle was trained on 7-d features "
                                        "(box geometry)")
    assert not (tmp_path / "s").exists()


def test_other_extractor_settings_are_one_warning(tmp_path: Path, caplog) -> None:
    from dsalign.bundle import check_feature_folder, load_bundle

    bundle = load_bundle(_bundle(tmp_path / "b", settings={"backbone": "resnet18", "top_k": 4}))
    feat = _write_features(tmp_path / "f", n_shards=1)
    manifest = json.loads((feat / "manifest.json").read_text())
    write_manifest(feat, {**manifest, "settings": {"backbone": "resnet18", "top_k": 9, "feature_dim": 3}})
    check_feature_folder([bundle, bundle], feat)
    assert [r.getMessage() for r in caplog.records] == [
        f"warning: features in {feat} were made with other settings than the bundle's: top_k 9 (bundle: 4)"]


def test_draw_alignment_writes_boxes_and_labels(tmp_path: Path) -> None:
    image = np.full((64, 96, 3), 255, dtype=np.uint8)
    snippets = [(1, "red circle"), (2, "blue square"), (0, "a")]
    out = draw_alignment(image, REGION_BOXES, snippets, tmp_path / "a.png")
    picture = Image.open(out)
    assert picture.format == "PNG" and picture.size == picture_size(96, 64, snippets)
    pixels = np.asarray(picture.convert("RGB"))
    scaled_h = 64 * 4  # 96 px wide -> scaled 4x to reach 384
    panel = pixels[scaled_h:]
    for region in (1, 2):
        colour = np.array(PALETTE[region - 1])
        assert (pixels[:scaled_h] == colour).all(-1).sum() > 100  # the box outline
        assert (panel == colour).all(-1).sum() > 100  # its swatch and label
    for line in range(len(snippets)):  # every label line has text beyond its swatch
        row = panel[6 + line * 20: 6 + (line + 1) * 20, 30:]
        assert (row.sum(-1) < 600).sum() > 20
