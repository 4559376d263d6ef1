"""Alignment training throughput and where a step's time goes.

In one run, on shapes features written to a temporary folder (given boxes + whole image, efficientnet-lite0 at
128 px; the shapes images are drawn on the CPU, the CNN runs on the GPU when there is one):
1. step breakdown (one process, the same model and loss as the trainer, no DeepSpeed): reading the next batch
   from the shards in this process (as the trainer does with data.num_workers 0: decoding, picking captions,
   the copy to the device), model forward, score + Eq. 9 loss forward, their backward, model backward,
   optimizer step; the share of the compute step spent in score + loss (forward and backward), and the
   samples/s of compute alone (``samples_per_s``) and of data + compute in turn (``serial_samples_per_s``);
2. samples/s of the real trainer (`dsalign train align`, DeepSpeed ZeRO 0) with 1 rank, once per
   data.num_workers in --workers (0: batches read between steps; N: read ahead by N processes), and with
   2 ranks under torchrun (0 workers), read from its metrics.jsonl (the median over its logging windows after
   the first).

On CPU: fp32, torch_chunked score, 2 ranks with gloo; writes benchmarks/results/train.json.

On a CUDA machine everything runs on GPU 0, as the trainer does with device and precision "auto": the
breakdown puts model and batches on the GPU and runs the model forward under
torch.autocast(cuda, bfloat16) with fp32 weights and fp32 Adam (the trainer's DeepSpeed "torch_autocast"
config; the loss and backward run outside autocast, as they do there); it synchronises the GPU before every
time mark, and the batch's copy to the GPU (pinned, as the trainer's) counts as data. The score backend it resolved
(dsalign.ops.score.resolve_backend: triton for bf16 on CUDA unless $DSALIGN_SCORE_BACKEND says otherwise) and
the device/precision line the trainer logged are recorded. The 1-rank trainer runs on cuda:0 in bf16; the
2-rank run (NCCL, one GPU per rank) needs 2 visible GPUs and is otherwise recorded as skipped with the reason.
Writes benchmarks/results/train_cuda.json, so the CPU results are not overwritten.

The JSON is rewritten after every phase, so a run cut short still leaves what it measured. A trainer run that
fails (or exceeds --trainer-timeout) is recorded with the tail of its output and makes the exit status 1.

    python benchmarks/bench_train.py [--steps 40] [--images 1000] [--trainer-steps N] [--workers 0,2] [--out FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

from dsalign.cli_args import non_negative
from dsalign.data.feature_pipeline import FeatureSampleDecoder, collate_features, load_feature_manifest
from dsalign.data.pipeline import ShardLoader, ShardStream
from dsalign.data.prepare import prepare_dataset
from dsalign.data.shapes import generate_shapes
from dsalign.data.shards import shard_paths
from dsalign.features.extract import FeatureConfig, extract_features
from dsalign.models.alignment import AlignmentConfig, AlignmentModel
from dsalign.ops.score import resolve_backend
from dsalign.text import Vocabulary
from dsalign.train.align import pick_captions
from dsalign.train.distributed import alignment_loss

MODEL = {"embed_dim": 256, "word_dim": 128, "hidden_dim": 256, "dropout": 0.1}
BATCH = 100
COMPUTE = ("model_fwd", "loss_fwd", "loss_bwd", "model_bwd", "optim")  # the phases of a step after its batch
RESULTS = Path(__file__).parent / "results"


def make_features(root: Path, n_train: int, device: torch.device, timings: dict | None = None) -> Path:
    """Shapes images (drawn on the CPU) featurised on ``device``; ``timings`` gets the seconds of each part."""
    start = time.perf_counter()
    counts = {"train": n_train, "val": 100, "test": 0}
    records = itertools.chain.from_iterable(generate_shapes(n, split, seed=0) for split, n in counts.items() if n)
    prepare_dataset(records, root / "img", "shapes", shard_size=250, progress=False)
    middle = time.perf_counter()
    extract_features(root / "img", root / "feat", FeatureConfig(regions="given", image_size=128),
                     device=str(device), progress=False)
    if timings is not None:
        timings.update(shapes_data=middle - start, features=time.perf_counter() - middle)
    return root / "feat"


def step_breakdown(features: Path, steps: int, device: torch.device) -> tuple[dict, dict]:
    """Median seconds per phase of a training step, measured with synchronising timers, and how it ran
    (precision, score backend)."""
    cuda = device.type == "cuda"
    manifest = load_feature_manifest(features)
    vocab = Vocabulary.load(features / "vocab.json")
    torch.manual_seed(0)
    model = AlignmentModel(AlignmentConfig(vocab_size=len(vocab), feature_dim=int(manifest["feature_dim"]), **MODEL))
    model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    stream = ShardStream(shard_paths(features, "train"), FeatureSampleDecoder(vocab, keep_fp16=True),
                         collate_features, BATCH, mode="train", batches_per_rank=steps + 5, rank=0, world_size=1)
    # As the trainer on CUDA (DeepSpeed torch_autocast): bf16 autocast around the forward, fp32 weights.
    autocast = torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=cuda)

    def mark() -> float:
        if cuda:
            torch.cuda.synchronize(device)
        return time.perf_counter()

    phases: dict[str, list[float]] = {k: [] for k in ("data", *COMPUTE)}
    info: dict = {}
    batches = iter(ShardLoader(stream, pin_memory=cuda))
    for i in range(steps + 5):
        marks = [mark()]
        batch = next(batches)
        tokens, token_mask = pick_captions(batch["tokens"], batch["token_mask"], batch["caption_mask"])
        regions, region_mask, tokens, token_mask = (
            x.to(device, non_blocking=True) for x in (batch["regions"], batch["region_mask"], tokens, token_mask))
        marks.append(mark())
        with autocast:
            v, s = model(regions, region_mask, tokens, token_mask)
        marks.append(mark())
        v_in, s_in = v.detach().requires_grad_(), s.detach().requires_grad_()
        loss = alignment_loss(v_in, region_mask, s_in, token_mask)
        marks.append(mark())
        loss.backward()
        marks.append(mark())
        torch.autograd.backward([v, s], [v_in.grad, s_in.grad])
        marks.append(mark())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        marks.append(mark())
        if not info:
            dtype = torch.promote_types(v.dtype, s.dtype)
            info = {"precision": "bf16 autocast forward, fp32 weights + Adam (as DeepSpeed torch_autocast)"
                    if cuda else "fp32",
                    "embedding_dtype": str(dtype).removeprefix("torch."),
                    "score_backend": resolve_backend(None, v.device, dtype)}
        if i >= 5:  # warm-up steps are not timed
            for name, start, end in zip(phases, marks, marks[1:]):
                phases[name].append(end - start)
    result = {name: statistics.median(values) for name, values in phases.items()}
    step = sum(result[name] for name in COMPUTE)
    result.update(step_s=step, samples_per_s=BATCH / step, serial_samples_per_s=BATCH / (step + result["data"]),
                  score_loss_share=(result["loss_fwd"] + result["loss_bwd"]) / step)
    return result, info


def _tail(text: str | bytes | None, lines: int = 30) -> str:
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return "\n".join((text or "").splitlines()[-lines:])


def _run_quietly(command: list[str], env: dict, timeout: float | None) -> str:
    """Run ``command`` with its output captured; returns stdout. Raises CalledProcessError on failure and
    TimeoutExpired after ``timeout`` seconds, once the command and everything it started (torchrun's ranks) are
    killed."""
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        import psutil

        with contextlib.suppress(psutil.Error):
            for child in psutil.Process(proc.pid).children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    child.kill()
        proc.kill()
        stdout, stderr = proc.communicate()
        raise subprocess.TimeoutExpired(command, timeout or 0, stdout, stderr) from None
    if proc.returncode:
        raise subprocess.CalledProcessError(proc.returncode, command, stdout, stderr)
    return stdout


def trainer_rate(features: Path, root: Path, ranks: int, steps: int, timeout: float | None = None,
                 run: dict | None = None, workers: int = 0) -> float:
    """Median samples/s the trainer logs after its first logging window, reading with ``workers`` DataLoader
    processes per rank; ``run`` gets the device and precision the trainer reported (its "N rank(s) on DEVICE,
    ZeRO z, PRECISION" line) and the wall time."""
    out = root / f"run{ranks}_{workers}"
    config = {"data": {"features": str(features), "num_workers": workers}, "model": MODEL,
              "train": {"out_dir": str(out), "batch_size": BATCH // ranks, "batches_per_epoch": 20,
                        "max_steps": steps, "log_every": 10, "eval_every": 0, "checkpoint_every": 0,
                        "threads": 1 if ranks > 1 else None}}
    path = root / f"config{ranks}_{workers}.json"
    path.write_text(json.dumps(config))
    launcher = [sys.executable, "-m", "dsalign.cli"] if ranks == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks),
        "-m", "dsalign.cli"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"} if ranks > 1 else dict(os.environ)
    start = time.perf_counter()
    stdout = _run_quietly([*launcher, "train", "align", "--config", str(path)], env, timeout)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rates = [r["samples_per_s"] for r in rows if r.get("kind") == "train" and "samples_per_s" in r][1:]
    if run is not None:
        found = re.search(r"(\d+) rank\(s\) on (\S+), ZeRO (\d+), (\w+),", stdout)
        run.update(wall_s=time.perf_counter() - start, steps=steps)
        if found:
            run.update(ranks=int(found[1]), device=found[2], zero_stage=int(found[3]), precision=found[4])
    return statistics.median(rates)


def machine() -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__}
    if torch.cuda.is_available():
        info.update(cuda=torch.version.cuda, gpu_count=torch.cuda.device_count(),
                    gpu=torch.cuda.get_device_name(0))
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40, help="timed steps (breakdown) / trainer steps")
    parser.add_argument("--images", type=int, default=1000, help="training scenes to featurise")
    parser.add_argument("--trainer-steps", type=int, default=None,
                        help="trainer steps per run (default max(--steps, 30); at least 20, since it logs every "
                             "10 steps and the first window is dropped)")
    parser.add_argument("--trainer-timeout", type=float, default=None,
                        help="seconds before a trainer run is abandoned (recorded as failed); default none")
    parser.add_argument("--workers", default="0,2", type=lambda text: [non_negative(w) for w in text.split(",")],
                        help="comma list of data.num_workers for the 1-rank trainer runs (default 0,2)")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON file (default benchmarks/results/train.json on CPU, train_cuda.json on CUDA)")
    args = parser.parse_args()
    trainer_steps = max(args.steps, 30) if args.trainer_steps is None else args.trainer_steps
    if trainer_steps < 20:
        parser.error("--trainer-steps must be >= 20")
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    out = args.out or RESULTS / ("train_cuda.json" if cuda else "train.json")
    result = {"benchmark": "train", "date": date.today().isoformat(),
              "device": torch.cuda.get_device_name(0) if cuda else f"{platform.machine()} CPU",
              "torch_threads": torch.get_num_threads(), "model": MODEL, "global_batch": BATCH,
              "machine": machine(), "images": args.images, "steps": args.steps}

    def save() -> None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))

    failed = False
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        setup: dict = {}
        features = make_features(root, args.images, device, setup)
        result["setup_s"] = setup
        print(f"setup: shapes data {setup['shapes_data']:.1f} s, features on {device} {setup['features']:.1f} s")
        breakdown, how = step_breakdown(features, args.steps, device)
        result.update(breakdown_s=breakdown, breakdown_run=how)
        for key, value in breakdown.items():
            print(f"{key:>18}: {value:.4f}")
        print(f"{'precision':>18}: {how['precision']}; score backend {how['score_backend']}")
        save()
        for n, workers in [(1, w) for w in args.workers] + [(2, 0)]:
            name = f"trainer_{n}rank" + (f"_{workers}workers" if workers else "")
            key = f"{name}_samples_per_s"
            if cuda and n > torch.cuda.device_count():
                result[key] = None
                result[f"{name}_skipped"] = (
                    f"{n} ranks need {n} CUDA devices (NCCL cannot put two ranks on one GPU); "
                    f"found {torch.cuda.device_count()}")
                print(f"{key:>34}: skipped ({result[f'{name}_skipped']})")
                save()
                continue
            run: dict = {}
            try:
                result[key] = trainer_rate(features, root, n, trainer_steps, args.trainer_timeout, run, workers)
                print(f"{key:>34}: {result[key]:.1f}")
            except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError, ValueError) as exc:
                failed = True
                result[key] = None
                reason = (f"timed out after {exc.timeout:.0f} s" if isinstance(exc, subprocess.TimeoutExpired)
                          else str(exc))
                output = _tail(getattr(exc, "stderr", None)) or _tail(getattr(exc, "stdout", None))
                result[f"{name}_error"] = {"reason": reason, "output_tail": output}
                print(f"{key:>34}: FAILED ({reason})\n{output}", file=sys.stderr)
            result[f"{name}_run"] = run
            save()
    save()
    print(f"wrote {out}")
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
