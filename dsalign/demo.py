"""``dsalign demo``: the whole pipeline, as far as it is built, on the built-in shapes data set.

Stages: generate scenes → image shards (the same `prepare` path as real data) → region features (the given
boxes + the whole image, pretrained efficientnet-lite0) → alignment model trained with DeepSpeed in one process
→ retrieval R@K on the test split → Viterbi snippet alignment of the training pairs (region-snippet shards),
scored against the ground-truth word spans of the test split, and a picture of one image's alignments → a
summary of where everything went.
"""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path

import torch

from dsalign.bundle import load_alignment_bundle
from dsalign.data.feature_pipeline import FeatureSampleDecoder, collate_features, load_feature_manifest
from dsalign.data.pipeline import ShardLoader, ShardStream
from dsalign.data.prepare import prepare_dataset
from dsalign.data.shapes import generate_shapes
from dsalign.data.shards import shard_paths
from dsalign.features.extract import FeatureConfig, extract_features
from dsalign.snippet_align import align_folder, evaluate_shapes_alignment
from dsalign.text import Vocabulary
from dsalign.train.align import evaluate_retrieval, train_alignment
from dsalign.train.config import parse_config
from dsalign.viz import picture_for

BETA = 0.5  # the snippet MRF's bonus for staying on one region (chosen on shapes val, docs/alignment.md)


def _train_config(features: Path, out_dir: Path, steps: int, seed: int, workers: int) -> dict:
    """The demo's training run: launch/configs/align_shapes.json scaled to a few minutes of CPU."""
    return {
        "data": {"features": str(features), "num_workers": workers, "shuffle_buffer": 500},
        "model": {"embed_dim": 256, "word_dim": 128, "hidden_dim": 256, "dropout": 0.1},
        "loss": {"margin": 1.0, "hardest_negative": False, "reduction": "mean"},
        "optim": {"name": "adam", "lr": 0.001, "grad_clip_norm": 5.0},
        "train": {"out_dir": str(out_dir), "batch_size": 100, "batches_per_epoch": 20, "max_steps": steps,
                  "seed": seed, "log_every": max(1, steps // 10), "eval_every": max(1, steps // 3),
                  "checkpoint_every": max(1, steps // 3), "keep_checkpoints": 2},
    }


def test_retrieval(bundle_dir: Path, features: Path) -> dict:
    """R@K of the exported bundle on the test split of the feature folder."""
    bundle = load_alignment_bundle(bundle_dir)
    manifest = load_feature_manifest(features)
    decoder = FeatureSampleDecoder(Vocabulary.load(features / manifest["vocab"]),
                                   feature_dim=manifest.get("feature_dim"))
    loader = ShardLoader(ShardStream(shard_paths(features, "test"), decoder, collate_features, 100, mode="eval"))
    return evaluate_retrieval(bundle.model, loader, captions_per_image=5, device=torch.device("cpu"))


def run_demo(out_dir: str | Path, n_train: int = 2000, n_val: int = 200, n_test: int = 200, seed: int = 0,
             steps: int = 300, num_workers: int = 0, progress: bool = True) -> dict:
    """Run every built stage; return a summary of paths, timings and metrics (also written as JSON)."""
    out = Path(out_dir)
    timings: dict[str, float] = {}
    tick = time.perf_counter()

    counts = {"train": n_train, "val": n_val, "test": n_test}
    records = itertools.chain.from_iterable(generate_shapes(n, split, seed=seed) for split, n in counts.items())
    shards = out / "shards"
    manifest = prepare_dataset(records, shards, "shapes", shard_size=500, total=sum(counts.values()),
                               overwrite=True, progress=progress)
    timings["prepare_s"] = time.perf_counter() - tick

    tick = time.perf_counter()
    features = out / "features"
    extract_features(shards, features, FeatureConfig(regions="given", image_size=128), overwrite=True,
                     progress=progress)
    timings["features_s"] = time.perf_counter() - tick

    tick = time.perf_counter()
    train_dir, bundle_dir = out / "align", out / "bundle"
    config = parse_config(_train_config(features, train_dir, steps, seed, num_workers))
    trained = train_alignment(config, resume=(train_dir / "checkpoints").exists(), export_dir=bundle_dir)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    timings["train_s"] = time.perf_counter() - tick

    tick = time.perf_counter()
    retrieval = test_retrieval(bundle_dir, features)
    timings["eval_s"] = time.perf_counter() - tick

    tick = time.perf_counter()
    bundle = load_alignment_bundle(bundle_dir)
    snippets = out / "snippets"
    align_folder(bundle.model, bundle.vocab, features, snippets, BETA, split="train",
                 resume=snippets.exists(), progress=progress)
    alignment = evaluate_shapes_alignment(bundle.model, bundle.vocab, features, BETA, split="test")
    picture = out / "alignment.png"
    picture_for(bundle.model, bundle.vocab, features, picture, BETA, split="test")
    timings["align_s"] = time.perf_counter() - tick

    summary = {
        "shards": str(shards), "vocab_size": manifest["vocab_size"], "features": str(features),
        "training_run": str(train_dir), "bundle": str(bundle_dir), "train": trained,
        "test_retrieval": retrieval, "snippets": str(snippets), "beta": BETA, "test_alignment": alignment,
        "picture": str(picture), "timings": timings,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


def format_summary(summary: dict) -> str:
    r = summary["test_retrieval"]
    t = summary["timings"]
    return "\n".join([
        f"image shards:  {summary['shards']} (vocabulary {summary['vocab_size']} words, {t['prepare_s']:.0f} s)",
        f"features:      {summary['features']} ({t['features_s']:.0f} s)",
        f"training run:  {summary['training_run']} (TensorBoard logs, checkpoints; {t['train_s']:.0f} s)",
        f"bundle:        {summary['bundle']}",
        f"test retrieval ({r['images']:.0f} images): "
        f"image->text R@1/5/10 {r['i2t_r1']:.1f}/{r['i2t_r5']:.1f}/{r['i2t_r10']:.1f} (med r {r['i2t_medr']:.0f}), "
        f"text->image R@1/5/10 {r['t2i_r1']:.1f}/{r['t2i_r5']:.1f}/{r['t2i_r10']:.1f} (med r {r['t2i_medr']:.0f})",
        f"snippets:      {summary['snippets']} (beta {summary['beta']}; {t['align_s']:.0f} s)",
        f"test alignment vs ground truth: {_format_metrics(summary['test_alignment'])}",
        f"picture:       {summary['picture']}",
        f"summary:       {Path(summary['shards']).parent / 'summary.json'}",
    ])


def _format_metrics(metrics: dict) -> str:
    return ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())
