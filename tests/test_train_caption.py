"""`dsalign train caption`: config checks, the sentence batches and a short run with resume."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from dsalign.bundle import load_caption_bundle
from dsalign.cli import main
from dsalign.data.caption_pipeline import SnippetDecoder, WholeImageDecoder, collate_sentences
from dsalign.data.pipeline import ShardStream
from dsalign.data.shards import shard_paths
from dsalign.text import Vocabulary
from dsalign.train.caption import word_counts
from dsalign.train.config import CaptionTrainConfig, ConfigError, parse_config


def _config(features, out_dir, **data) -> dict:
    return {"data": {"features": str(features), "val_images": 10, **data},
            "model": {"cell": "rnn", "word_dim": 16, "hidden_dim": 32, "dropout": 0.0},
            "decode": {"beam_size": 2, "max_len": 8},
            "optim": {"name": "rmsprop", "lr": 0.001},
            "train": {"out_dir": str(out_dir), "batch_size": 8, "batches_per_epoch": 3, "max_steps": 4,
                      "log_every": 2, "eval_every": 2, "checkpoint_every": 2, "threads": 1}}


@pytest.mark.parametrize("change, message", [
    ({"data": {"features": "f", "level": "region"}}, "data.snippets is required"),
    ({"data": {"features": "f"}, "model": {"cell": "gru"}}, "model.cell"),
    ({"data": {"features": "f"}, "decode": {"beam": 3}}, "unknown config key decode.beam"),
    ({"data": {"features": "f"}, "optim": {"name": "adagrad"}}, "optim.name"),
])
def test_bad_caption_config_names_the_key(change, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(change, CaptionTrainConfig)


def test_caption_sections_keep_the_caption_defaults():
    """A `train` section without out_dir must not fall back to the alignment trainer's runs/align."""
    config = parse_config({"data": {"features": "f"}, "train": {"max_steps": 3}}, CaptionTrainConfig)
    assert (config.train.out_dir, config.train.max_steps) == ("runs/caption", 3)


def test_full_level_batches_hold_every_caption_once(tiny_demo):
    features = tiny_demo[0] / "features"
    vocab = Vocabulary.load(features / "vocab.json")
    stream = ShardStream(shard_paths(features, "val"), WholeImageDecoder(vocab), collate_sentences, 8, mode="eval")
    batches = [b for b in stream if "features" in b]
    captions = sum(len(c) for b in batches for c in b["raw_captions"])
    assert sum(len(b["tokens"]) for b in batches) == captions == 100  # 20 images x 5 captions
    first = batches[0]
    assert torch.equal(first["features"][0], first["image_features"][0])
    assert torch.equal(first["features"][5], first["image_features"][1])  # rows 0-4: image 0's captions
    assert first["token_mask"][:, 0].all()


def test_snippet_batches_and_word_counts(tiny_demo):
    out = tiny_demo[0]
    vocab = Vocabulary.load(out / "features" / "vocab.json")
    manifest = json.loads((out / "snippets" / "manifest.json").read_text())
    n_snippets = manifest["splits"]["train"]["snippets"]
    stream = ShardStream(shard_paths(out / "snippets", "train"),
                         SnippetDecoder(vocab, feature_dim=manifest["feature_dim"]),
                         collate_sentences, 64, mode="eval")
    assert sum(len(b["tokens"]) for b in stream if "tokens" in b) == n_snippets
    counts = word_counts(vocab, n_snippets, out / "snippets")
    assert counts[Vocabulary.end_id] == n_snippets
    assert counts[4:].sum() == sum(len(b["tokens"]) for b in _snippet_words(out / "snippets"))


def _snippet_words(folder):
    from dsalign.snippet_align import read_snippets

    for record, _ in read_snippets(folder):
        yield {"tokens": record.tokens}


@pytest.mark.parametrize("level", ["full", "region"])
def test_a_short_run_exports_a_bundle_and_resumes(tiny_demo, tmp_path, level):
    out = tiny_demo[0]
    data = {"level": level, "snippets": str(out / "snippets")} if level == "region" else {"level": "full"}
    config = tmp_path / "config.json"
    config.write_text(json.dumps(_config(out / "features", tmp_path / "run", **data)))
    assert main(["train", "caption", "--config", str(config), "--export", str(tmp_path / "bundle")]) == 0
    bundle = load_caption_bundle(tmp_path / "bundle")
    assert bundle.info["level"] == level and bundle.config.cell == "rnn"
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    val = [m for m in metrics if m["kind"] == "val"]
    assert [m["step"] for m in val] == [2, 4]
    assert ("CIDEr" if level == "full" else "exact_match") in val[0]
    assert main(["train", "caption", "--config", str(config), "--resume", "--set", "train.max_steps=6"]) == 0
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 6 and (tmp_path / "run" / "checkpoints" / "step_000000006").is_dir()


def test_snippets_of_features_with_another_vocabulary_are_refused(tiny_demo, tmp_path, capsys):
    """Snippets made from one feature folder used to train silently, mostly as <unk>, with the vocabulary of
    another; the snippet manifest records where they came from."""
    out = tiny_demo[0]
    other = tmp_path / "other_features"
    shutil.copytree(out / "features", other)
    vocab = Vocabulary.load(other / "vocab.json")
    Vocabulary(vocab.itos[4:-3], vocab.counts, vocab.min_count).save(other / "vocab.json")
    config = tmp_path / "config.json"
    config.write_text(json.dumps(_config(other, tmp_path / "run", level="region", snippets=str(out / "snippets"))))
    assert main(["train", "caption", "--config", str(config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"data.snippets {out / 'snippets'} was made from the features in {(out / 'features').resolve()}" in err
    assert "3 words that data.features" in err and "<unk>" in err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_folder_that_is_not_a_snippet_folder_is_refused(tiny_demo, tmp_path):
    from dsalign.train.caption import load_snippet_manifest

    out = tiny_demo[0]
    features, vocab = out / "features", Vocabulary.load(out / "features" / "vocab.json")
    manifest = json.loads((out / "snippets" / "manifest.json").read_text())
    dim = manifest["feature_dim"]
    for folder in (features, tmp_path):
        with pytest.raises(ConfigError, match="is not a snippet folder: no manifest.json from `dsalign align`"):
            load_snippet_manifest(str(folder), str(features), dim, vocab, print)
    with pytest.raises(ConfigError, match=f"holds {dim}-d region vectors, data.features {features} 7-d"):
        load_snippet_manifest(str(out / "snippets"), str(features), 7, vocab, print)
    moved = tmp_path / "moved"
    moved.mkdir()
    manifest["settings"]["features"] = str(tmp_path / "gone")
    notes: list[str] = []
    for recorded, checked in ((manifest["vocab_sha256"], True), (None, False)):  # None: made before the hash
        manifest["vocab_sha256"] = recorded
        (moved / "manifest.json").write_text(json.dumps(manifest))
        assert load_snippet_manifest(str(moved), str(features), dim, vocab, notes.append)["kind"] == "snippets"
        assert len(notes) == (0 if checked else 1)  # the recorded hash of the vocabulary settles it
    assert "cannot check the vocabulary" in notes[0]
    manifest["vocab_sha256"] = "0" * 64  # another vocabulary, and its folder gone: refused, not waved through
    (moved / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match="another vocabulary than data.features"):
        load_snippet_manifest(str(moved), str(features), dim, vocab, notes.append)


def test_caption_resume_into_an_alignment_run_is_refused(tiny_demo, tmp_path, capsys):
    out = tiny_demo[0]
    shutil.copytree(out / "align", tmp_path / "run")
    config = tmp_path / "config.json"
    config.write_text(json.dumps(_config(out / "features", tmp_path / "run")))
    assert main(["train", "caption", "--config", str(config), "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "is from a `train align` run, this is `train caption`: use another train.out_dir" in err
