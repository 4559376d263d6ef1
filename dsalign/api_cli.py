"""``dsalign caption | describe | report | eval`` and the single-image mode of ``dsalign align``: the inference
API and evaluation on the command line. Bad input (missing file, not an image, bad bundle) is one line and exit
status 2."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from dsalign.cli_args import bounded, non_negative, positive

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def _add_common(cmd: argparse.ArgumentParser, json_output: bool = True) -> None:
    """--bundle, --device, --regions, --beam-size (and --json): what every inference command takes."""
    cmd.add_argument("--bundle", required=True, type=Path,
                     help="a bundle or a folder of bundles (e.g. the demo's model/ folder)")
    cmd.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    cmd.add_argument("--regions", choices=["selective-search", "grid"],
                     help="region proposals on raw images (default: the bundle's; selective-search for "
                          "bundles trained on given boxes)")
    cmd.add_argument("--beam-size", type=positive, default=7, help="beam size (1 = greedy; default 7)")
    if json_output:
        cmd.add_argument("--json", action="store_true", help="print JSON instead of text")


def add_api_parsers(sub: argparse._SubParsersAction) -> None:
    """Add ``caption``, ``describe`` and ``report`` to the ``dsalign`` command line."""
    caption = sub.add_parser("caption", help="generate a caption for each image",
                             description="Full-image captions with the generator of a bundle (beam search). "
                                         "Prints one line per image: path<TAB>caption (--json: a JSON list).")
    caption.add_argument("images", nargs="+", type=Path, metavar="IMG")
    _add_common(caption)
    caption.add_argument("--max-len", type=positive, default=20, help="most words per caption (default 20)")
    caption.set_defaults(func=_run_caption)

    describe = sub.add_parser("describe", help="describe an image's regions (dense captions) and draw them",
                              description="Propose regions, generate a phrase for each with the region-level "
                                          "generator, print the most confident and draw them (Figure 7 style).")
    describe.add_argument("image", type=Path, metavar="IMG")
    _add_common(describe)
    describe.add_argument("--out", type=Path, metavar="PNG", help="write the picture here")
    describe.add_argument("--top-k", type=positive, default=5, help="regions to keep (default 5)")
    describe.set_defaults(func=_run_describe)

    report = sub.add_parser("report", help="an HTML report (captions, regions, alignments) over a folder",
                            description="Caption, describe and align every image of a folder and write one "
                                        "self-contained HTML file (opens in a browser, no server).")
    _add_common(report, json_output=False)
    report.add_argument("--images", required=True, type=Path, help="folder of images")
    report.add_argument("--out", required=True, type=Path, help="HTML file to write")
    report.add_argument("--limit", type=positive, help="at most this many images (sorted by name)")
    report.add_argument("--top-k", type=positive, default=5, help="region descriptions per image (default 5)")
    report.set_defaults(func=_run_report)

    evaluate = sub.add_parser(
        "eval", help="evaluate a bundle (or folder of bundles) on a split: retrieval, captions, regions",
        description="Every metric the bundles support on one split of a feature folder: retrieval R@K "
                    "(alignment), BLEU-1..4/METEOR/ROUGE-L/CIDEr + novelty (full-image captions, beam search), "
                    "exact phrase match + metrics (region descriptions, data with ground-truth spans). "
                    "Writes one JSON document (stdout, or --out).")
    evaluate.add_argument("--bundle", required=True, type=Path, help="a bundle or a folder of bundles")
    evaluate.add_argument("--features", required=True, type=Path, help="feature folder (`dsalign features`)")
    evaluate.add_argument("--split", default="test", help="split to evaluate (default test)")
    evaluate.add_argument("--out", type=Path, help="write the metrics JSON here (default: print it)")
    evaluate.add_argument("--predictions", type=Path, help="also write the generated captions (JSON) here")
    evaluate.add_argument("--beam-size", type=positive, default=7, help="beam size (default 7)")
    evaluate.add_argument("--max-len", type=positive, default=20, help="most words per caption (default 20)")
    evaluate.add_argument("--length-penalty", type=bounded(float, 0.0), default=0.0,
                          help="GNMT length normalisation alpha (default 0: plain log-probability)")
    evaluate.add_argument("--metrics", default="BLEU,METEOR,ROUGE_L,CIDEr",
                          help="caption scorers, comma-separated (default all; METEOR needs Java)")
    evaluate.add_argument("--limit", type=positive, help="captions: at most this many images")
    evaluate.add_argument("--bank-images", type=non_negative, default=0,
                          help="retrieval: also report it re-ranked against this many training images and their "
                               "captions (each sentence's and each image's soft-max bank score subtracted, so "
                               "generic sentences and hub images stop winning) as 'bank' (default 0: off)")
    evaluate.add_argument("--bank-temperature", type=bounded(float, 1e-6),
                          help="temperature of that correction, in score units, both directions (default: one "
                               "per direction chosen on the val split)")
    evaluate.add_argument("--save-bank", action="store_true",
                          help="with --bank-images: keep the bank (its region vectors and caption tokens) and the "
                               "temperatures beside the alignment bundle (bank.json, bank.safetensors), so "
                               "Model.rank_sentences / rank_images use the same correction")
    evaluate.add_argument("--device", default="cpu", help="torch device (default cpu)")
    evaluate.set_defaults(func=_run_eval)


def add_image_align_arguments(cmd: argparse.ArgumentParser) -> None:
    """The single-image mode of ``dsalign align``: IMG SENTENCE --bundle B --out fig.png."""
    cmd.add_argument("inputs", nargs="*", metavar="IMG SENTENCE",
                     help="align one sentence to one image (without --features)")
    cmd.add_argument("--heatmap", type=Path, metavar="PNG",
                     help="single image: also draw the word x region similarity heatmap")
    cmd.add_argument("--regions", choices=["selective-search", "grid"],
                     help="single image: region proposals (default: the bundle's)")


def _load(args: argparse.Namespace):  # noqa: ANN202 - dsalign.api.Model, imported lazily
    from dsalign.api import load

    return load(args.bundle, args.device, args.regions)


def _run_caption(args: argparse.Namespace) -> None:
    """Caption every readable image; unreadable ones are named (in the JSON too) and make the exit status 2,
    but do not cost the captions of the others."""
    from dsalign.api import InputError, load_image

    model = _load(args)
    model.caption([], args.beam_size, args.max_len)  # no caption bundle, bad settings: said before any decoding
    paths = [str(p) for p in args.images]
    loaded: list = []  # per path: the image, or the InputError that names why it cannot be read
    for path in paths:
        try:
            loaded.append(load_image(path))
        except InputError as exc:
            loaded.append(exc)
    errors = [str(x) for x in loaded if isinstance(x, InputError)]
    captions = iter(model.caption([x for x in loaded if not isinstance(x, InputError)], args.beam_size,
                                  args.max_len))
    results = [{"image": p, "error": str(x)} if isinstance(x, InputError) else {"image": p, "caption": next(captions)}
               for p, x in zip(paths, loaded)]
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for result in results:
            if "caption" in result:
                print(f"{result['image']}\t{result['caption']}")
    if errors:
        raise ValueError(f"{len(errors)} of {len(paths)} images unreadable, e.g. {errors[0]}" if len(errors) > 1
                         else errors[0])


def _run_describe(args: argparse.Namespace) -> None:
    from dataclasses import asdict

    from dsalign.viz import draw_regions

    model = _load(args)
    regions = model.describe_regions(str(args.image), args.top_k, args.beam_size)
    if args.out:
        draw_regions(str(args.image), regions, args.out)
    if args.json:
        print(json.dumps([asdict(r) for r in regions], indent=2))
    else:
        for i, region in enumerate(regions, 1):
            box = ", ".join(f"{x:.2f}" for x in region.box)
            print(f"[{i}] {region.phrase}  (score {region.score:.2f}, box {box})")
    if args.out:
        print(f"describe: picture -> {args.out}")


def run_image_align(args: argparse.Namespace) -> None:
    """``dsalign align IMG SENTENCE``: print the snippets, draw them (--out) and the heatmap (--heatmap)."""
    from dsalign.api import load_image
    from dsalign.viz import draw_alignment, draw_similarity_heatmap

    if len(args.inputs) != 2:
        raise ValueError("give IMG and SENTENCE (or --features FOLDER to align a whole split)")
    image, sentence = args.inputs
    model = _load(args)
    snippets = model.align(image, sentence, args.beta, whole_image=not args.objects_only)
    words, boxes, sim = model.similarity(image, sentence)
    for s in snippets:
        print(f"[{s.region}] {s.text}  (words {s.start}-{s.end}, score {s.score:.2f})")
    if args.out:
        draw_alignment(load_image(image), boxes, [(s.region, s.text) for s in snippets], args.out)
        print(f"align: picture -> {args.out}")
    if args.heatmap:
        draw_similarity_heatmap(words, [f"[{i}]" for i in range(len(boxes))], sim.numpy(), args.heatmap)
        print(f"align: heatmap -> {args.heatmap}")


def _run_report(args: argparse.Namespace) -> None:
    from dsalign.model_report import ReportItem, build_entry
    from dsalign.report import write_report

    if not args.images.is_dir():
        raise ValueError(f"{args.images}: no such folder")
    paths = sorted(p for p in args.images.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[: args.limit]
    if not paths:
        raise ValueError(f"{args.images}: no images ({', '.join(IMAGE_SUFFIXES)})")
    model = _load(args)
    entries, failed = [], []
    for path in paths:
        try:
            entries.append(build_entry(model, ReportItem(path.name, str(path)), args.beam_size, args.top_k))
        except ValueError as exc:  # one unreadable image is skipped and named, the rest are reported
            failed.append(f"{path.name}: {exc}")
    if not entries:
        raise ValueError(f"no usable image in {args.images}: {failed[0]}")
    write_report(entries, args.out, title=f"dsalign report: {args.images}")
    for line in failed:
        print(f"report: skipped {line}")
    print(f"report: {len(entries)} images -> {args.out}")



def _run_eval(args: argparse.Namespace) -> None:
    from dsalign.eval.generation import DecodeSettings
    from dsalign.evaluate import evaluate_bundles

    settings = DecodeSettings(args.beam_size, args.max_len, args.length_penalty)
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    for path in filter(None, (args.out, args.predictions)):  # a missing folder must not cost a whole evaluation
        path.parent.mkdir(parents=True, exist_ok=True)
    result = evaluate_bundles(args.bundle, args.features, args.split, settings, metrics, args.limit, args.device,
                              bank_images=args.bank_images, bank_temperature=args.bank_temperature,
                              save_bank=args.save_bank)
    predictions = {part: result[part].pop("predictions") for part in ("captions", "regions")
                   if result[part] and "predictions" in result[part]}
    if args.predictions:
        args.predictions.write_text(json.dumps(predictions, indent=1))
    text = json.dumps(result, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
        print(f"eval: {args.split} metrics -> {args.out}")
    else:
        print(text)
