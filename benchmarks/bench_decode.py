"""Caption decoding throughput: greedy and beam search, batched vs one image at a time.

For --images image vectors, decodes captions with beam sizes 1 (greedy) and 7, once with all images in one
batched search (``beam_search`` on [N, F]) and once image by image (the reference: what a naive loop over
``caption(image)`` does). Reports captions/s (median of --repeats runs) and the batched/one-at-a-time
speed-up, and checks that both give the same captions. The generator is a trained caption bundle (--bundle)
or, by default, a randomly initialised LSTM of the Flickr8k size (vocabulary 2,539, 1,280-d features, hidden
512), whose captions mostly run to --max-len words: the worst case for the search. Writes JSON.

    python benchmarks/bench_decode.py [--bundle DIR] [--device cpu|cuda] [--threads N] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from datetime import date
from pathlib import Path

import torch

from dsalign.models.decode import beam_search
from dsalign.models.generator import CaptionGenerator, GeneratorConfig

ROOT = Path(__file__).resolve().parents[1]


def _generator(bundle: Path | None, device: str) -> CaptionGenerator:
    if bundle is not None:
        from dsalign.bundle import load_caption_bundle

        return load_caption_bundle(bundle, device).model
    torch.manual_seed(0)
    return CaptionGenerator(GeneratorConfig(2539, 1280, "lstm", 256, 512, 0.5)).to(device).eval()


def _timed(fn, repeats: int) -> tuple[list, float]:  # noqa: ANN001
    times, result = [], None
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return result, statistics.median(times)


def run(args: argparse.Namespace) -> dict:
    model = _generator(args.bundle, args.device)
    features = torch.randn(args.images, model.config.feature_dim, generator=torch.Generator().manual_seed(1))
    features = features.abs().to(args.device)  # post-ReLU CNN features are non-negative
    rows = []
    for beam in (1, 7):
        batched, t_batched = _timed(lambda b=beam: beam_search(model, features, b, args.max_len), args.repeats)
        single, t_single = _timed(lambda b=beam: [beam_search(model, f[None], b, args.max_len)[0]
                                                  for f in features], args.repeats)
        same = sum(a.tokens == b.tokens for a, b in zip(batched, single))
        row = {"beam_size": beam, "images": args.images, "batched_captions_per_s": args.images / t_batched,
               "one_at_a_time_captions_per_s": args.images / t_single, "speedup": t_single / t_batched,
               "mean_words": statistics.mean(len(h.tokens) for h in batched), "same_captions": same}
        rows.append(row)
        print(f"beam {beam}: batched {row['batched_captions_per_s']:.1f} captions/s, one at a time "
              f"{row['one_at_a_time_captions_per_s']:.1f} captions/s, speed-up {row['speedup']:.1f}x, "
              f"{same}/{args.images} identical captions, {row['mean_words']:.1f} words on average")
    return {"benchmark": "decode", "date": str(date.today()), "device": args.device,
            "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
            "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "generator": str(args.bundle or "random LSTM, Flickr8k size"),
            "max_len": args.max_len, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, help="caption bundle (default: random Flickr8k-size LSTM)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--max-len", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "decode_cpu.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
