"""Alignment training throughput and where a step's time goes.

In one run, on shapes features written to a temporary folder (given boxes + whole image, efficientnet-lite0 at
128 px):
1. step breakdown (one process, the same model and loss as the trainer, no DeepSpeed): model forward, score +
   Eq. 9 loss forward, their backward, model backward, optimizer step; the share of the step spent in
   score + loss (forward and backward);
2. samples/s of the real trainer (`dsalign train align`, DeepSpeed ZeRO 0) with 1 rank and with 2 ranks under
   torchrun (gloo), read from its metrics.jsonl.
On a CUDA machine the trainer runs bf16 on the GPU (precision "auto"). Writes JSON.

    python benchmarks/bench_train.py [--steps 40] [--out FILE]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

from dsalign.data.feature_pipeline import FeatureSampleDecoder, collate_features, load_feature_manifest
from dsalign.data.pipeline import ShardLoader, ShardStream
from dsalign.data.prepare import prepare_dataset
from dsalign.data.shapes import generate_shapes
from dsalign.data.shards import shard_paths
from dsalign.features.extract import FeatureConfig, extract_features
from dsalign.models.alignment import AlignmentConfig, AlignmentModel
from dsalign.text import Vocabulary
from dsalign.train.align import pick_captions
from dsalign.train.distributed import alignment_loss

MODEL = {"embed_dim": 256, "word_dim": 128, "hidden_dim": 256, "dropout": 0.1}
BATCH = 100


def make_features(root: Path, n_train: int) -> Path:
    counts = {"train": n_train, "val": 100, "test": 0}
    records = itertools.chain.from_iterable(generate_shapes(n, split, seed=0) for split, n in counts.items() if n)
    prepare_dataset(records, root / "img", "shapes", shard_size=250, progress=False)
    extract_features(root / "img", root / "feat", FeatureConfig(regions="given", image_size=128), progress=False)
    return root / "feat"


def step_breakdown(features: Path, steps: int) -> dict:
    """Median seconds per phase of a training step, measured with synchronising timers."""
    manifest = load_feature_manifest(features)
    vocab = Vocabulary.load(features / "vocab.json")
    torch.manual_seed(0)
    model = AlignmentModel(AlignmentConfig(vocab_size=len(vocab), feature_dim=int(manifest["feature_dim"]), **MODEL))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    stream = ShardStream(shard_paths(features, "train"), FeatureSampleDecoder(vocab), collate_features, BATCH,
                         mode="train", batches_per_rank=steps + 5, rank=0, world_size=1)
    phases: dict[str, list[float]] = {k: [] for k in ("model_fwd", "loss_fwd", "loss_bwd", "model_bwd", "optim")}
    for i, batch in enumerate(ShardLoader(stream)):
        tokens, token_mask = pick_captions(batch["tokens"], batch["token_mask"], batch["caption_mask"])
        marks = [time.perf_counter()]
        v, s = model(batch["regions"], batch["region_mask"], tokens, token_mask)
        marks.append(time.perf_counter())
        v_in, s_in = v.detach().requires_grad_(), s.detach().requires_grad_()
        loss = alignment_loss(v_in, batch["region_mask"], s_in, token_mask)
        marks.append(time.perf_counter())
        loss.backward()
        marks.append(time.perf_counter())
        torch.autograd.backward([v, s], [v_in.grad, s_in.grad])
        marks.append(time.perf_counter())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        marks.append(time.perf_counter())
        if i >= 5:  # warm-up steps are not timed
            for name, start, end in zip(phases, marks, marks[1:]):
                phases[name].append(end - start)
    result = {name: statistics.median(values) for name, values in phases.items()}
    step = sum(result.values())
    result.update(step_s=step, samples_per_s=BATCH / step,
                  score_loss_share=(result["loss_fwd"] + result["loss_bwd"]) / step)
    return result


def trainer_rate(features: Path, root: Path, ranks: int, steps: int) -> float:
    """Median samples/s the trainer logs after its first logging window."""
    out = root / f"run{ranks}"
    config = {"data": {"features": str(features)}, "model": MODEL,
              "train": {"out_dir": str(out), "batch_size": BATCH // ranks, "batches_per_epoch": 20,
                        "max_steps": steps, "log_every": 10, "eval_every": 0, "checkpoint_every": 0,
                        "threads": 1 if ranks > 1 else None}}
    path = root / f"config{ranks}.json"
    path.write_text(json.dumps(config))
    launcher = [sys.executable, "-m", "dsalign.cli"] if ranks == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks),
        "-m", "dsalign.cli"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"} if ranks > 1 else dict(os.environ)
    subprocess.run([*launcher, "train", "align", "--config", str(path)], check=True, env=env,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rates = [r["samples_per_s"] for r in rows if r.get("kind") == "train" and "samples_per_s" in r][1:]
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40, help="timed steps (breakdown) / trainer steps")
    parser.add_argument("--images", type=int, default=1000, help="training scenes to featurise")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "train.json")
    args = parser.parse_args()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"{platform.machine()} CPU"
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        features = make_features(root, args.images)
        breakdown = step_breakdown(features, args.steps)
        rates = {f"trainer_{n}rank_samples_per_s": trainer_rate(features, root, n, max(args.steps, 30))
                 for n in (1, 2)}
    result = {"benchmark": "train", "date": date.today().isoformat(), "device": device,
              "torch_threads": torch.get_num_threads(), "model": MODEL, "global_batch": BATCH,
              "breakdown_s": breakdown, **rates}
    for key, value in breakdown.items():
        print(f"{key:>18}: {value:.4f}")
    for key, value in rates.items():
        print(f"{key:>34}: {value:.1f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
