"""The snippet alignment stage (paper Eqs. 10-12): feature shards + a trained alignment model -> region-snippet pairs.

For every (image, caption) pair the model embeds the image's regions and the caption's words, the word x region
similarities become the unaries of the Potts chain MRF, :func:`dsalign.ops.viterbi` picks a region per word,
and the maximal runs of one region are the snippets the region-level generator trains on. Pairs are batched:
one embedding pass and one Viterbi call per batch of images (all their captions).

On the shapes data every caption carries ground-truth ``spans`` (start, end, box), so the alignment can be
scored: word->object accuracy (majority region of a mention's words is the mentioned box) and snippet boundary
F1 (:func:`evaluate_shapes_alignment`, :func:`sweep_beta`).
"""

from __future__ import annotations

import io
import json
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from tqdm import tqdm

from dsalign.data.feature_pipeline import FeatureSampleDecoder, collate_features, load_feature_manifest
from dsalign.data.manifest import load_manifest, write_manifest
from dsalign.data.pipeline import SKIP_KEY, RawSample, ShardStream, decode_meta, usable_caption
from dsalign.data.prepare import VOCAB_NAME
from dsalign.data.shard_output import AtomicShard, finished_stats
from dsalign.data.shards import iter_tar_samples
from dsalign.hashing import file_sha256
from dsalign.ops.score import word_region_similarity
from dsalign.ops.viterbi import snippets, viterbi
from dsalign.text import Vocabulary

SNIPPET_FORMAT = "dsalign-snippet/1"
WHOLE_IMAGE_PENALTY = 1e6  # subtracted from region 0's unaries to keep words off it (objects only)
Span = tuple[int, int, int]  # (start, end exclusive, target); the target is a box or a region index


class Embedder(Protocol):
    """What the stage needs from a model: :class:`~dsalign.models.alignment.AlignmentModel` fits."""

    def encode_images(self, regions: torch.Tensor, region_mask: torch.Tensor) -> torch.Tensor: ...

    def encode_sentences(self, tokens: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor: ...


@dataclass
class PairInfo:
    """Where one (image, caption) pair came from, and its ground truth when the data has one."""

    key: str
    image_id: str
    image_row: int  # row of the image in its batch
    caption: int  # index into the sample's ``captions`` list (empty captions keep their index)
    tokens: list[str]
    spans: list[Span] = field(default_factory=list)  # ground truth: (start, end, box index)


@dataclass
class PairBatch:
    """One batch of pairs ready for Viterbi: unaries [P, N, M] (0 where padded) and per-pair lengths."""

    unary: torch.Tensor
    n_words: torch.Tensor
    n_regions: torch.Tensor
    pairs: list[PairInfo]
    regions: torch.Tensor  # [B, R, F] region features of the batch's images (as stored)
    region_boxes: torch.Tensor  # [B, R, 4]
    gt_boxes: list[list[list[float]]]  # per image: the data's own boxes (shapes: the objects)


@dataclass
class SnippetRecord:
    """One aligned (region, snippet) pair: the unit the region-level generator trains on."""

    key: str
    image_id: str
    caption: int
    region: int
    box: list[float]
    start: int
    end: int
    tokens: list[str]
    score: float  # mean similarity of the snippet's words to its region


class _PairDecoder:
    """Feature-shard sample -> the feature decoder's dict plus caption indices, word strings and spans.

    The feature decoder drops empty captions; the indices kept here point into the sample's own list so
    outputs can be traced back to the source caption.
    """

    def __init__(self, vocab: Vocabulary, feature_dim: int | None):
        self.inner = FeatureSampleDecoder(vocab, feature_dim=feature_dim, keep_fp16=True)

    def __call__(self, key: str, raw: RawSample) -> dict:
        sample = self.inner(key, raw)
        meta = decode_meta(raw)
        captions = meta["captions"]
        kept = [i for i, c in enumerate(captions) if usable_caption(c)]  # the captions the inner decoder kept
        sample["caption_index"] = kept
        sample["caption_tokens"] = [[str(t) for t in captions[i]["tokens"]] for i in kept]
        sample["caption_spans"] = [[tuple(int(x) for x in s) for s in captions[i].get("spans") or []] for i in kept]
        sample["gt_boxes"] = [[float(x) for x in box] for box in meta.get("boxes") or []]
        sample["gt_objects"] = _object_attributes(meta)
        return sample


OBJECT_ATTRIBUTES = ("shape", "colour", "size", "texture")


def _object_attributes(meta: dict) -> list[dict[str, str]]:
    """The boxes' attributes where the data set records all of them (shapes: ``extra.objects``), else []."""
    extra = meta.get("extra")
    objects = extra.get("objects") if isinstance(extra, dict) else None
    if not isinstance(objects, list) or not all(isinstance(o, dict) and all(a in o for a in OBJECT_ATTRIBUTES)
                                                for o in objects):
        return []
    return [{a: str(o[a]) for a in OBJECT_ATTRIBUTES} for o in objects]


def _collate(samples: list[dict]) -> dict:
    batch = collate_features(samples)
    for name in ("caption_index", "caption_tokens", "caption_spans", "gt_boxes", "gt_objects"):
        batch[name] = [s[name] for s in samples]
    return batch


def iter_feature_batches(urls: Sequence[str], vocab: Vocabulary, feature_dim: int | None, batch_size: int,
                         skipped: Counter | None = None) -> Iterator[dict]:
    """Collated batches of the shards' samples, each read once, in order; unusable samples go to ``skipped``."""
    stream = ShardStream(urls, _PairDecoder(vocab, feature_dim), _collate, batch_size, mode="eval", rank=0,
                         world_size=1)
    for batch in stream:
        counts = batch.pop(SKIP_KEY, {})
        if skipped is not None:
            skipped.update(counts)
        if "regions" in batch:
            yield batch


@torch.no_grad()
def embed_batch(model: Embedder, batch: dict, device: torch.device | str = "cpu") -> PairBatch:
    """Word x region similarities of every real caption against its own image, as Viterbi unaries."""
    region_mask = batch["region_mask"].to(device)
    v = model.encode_images(batch["regions"].to(device), region_mask)
    caption_mask = batch["caption_mask"]
    rows, cols = caption_mask.nonzero(as_tuple=True)
    tokens, token_mask = batch["tokens"][rows, cols].to(device), batch["token_mask"][rows, cols].to(device)
    s = model.encode_sentences(tokens, token_mask)
    pair_index = torch.stack([rows.to(device), torch.arange(len(rows), device=device)], dim=1)
    sim = word_region_similarity(v, region_mask, s, token_mask, pair_index).similarity
    unary = sim.float().masked_fill(torch.isinf(sim), 0.0)
    pairs = []
    for b, c in zip(rows.tolist(), cols.tolist()):
        pairs.append(PairInfo(batch["keys"][b], batch["image_ids"][b], b, batch["caption_index"][b][c],
                              batch["caption_tokens"][b][c], list(batch["caption_spans"][b][c])))
    return PairBatch(unary, token_mask.sum(1), region_mask.sum(1)[rows], pairs, batch["regions"],
                     batch["boxes"], batch["gt_boxes"])


def label_pairs(batch: PairBatch, beta: float, whole_image: bool = True) -> torch.Tensor:
    """Viterbi labels [P, N] for the whole batch in one call.

    ``whole_image=False`` keeps words off region 0 (the whole image) wherever an image has other regions:
    the paper aligns to it too, but a snippet on the whole image names no object (object-level evaluation
    counts it wrong, and the region-level generator learns nothing new from it).
    """
    unary = batch.unary
    if not whole_image:
        unary = unary.clone()
        unary[:, :, 0] -= WHOLE_IMAGE_PENALTY * (batch.n_regions > 1).to(unary.dtype)[:, None]
    return viterbi(unary, batch.n_words, batch.n_regions, beta)


def align_pairs(batch: PairBatch, beta: float,
                whole_image: bool = True) -> tuple[torch.Tensor, list[list[SnippetRecord]]]:
    """Viterbi labels [P, N] and per pair its snippets, scored with the model's similarities."""
    labels = label_pairs(batch, beta, whole_image)
    runs = snippets(labels.cpu(), batch.n_words.cpu())
    unary = batch.unary.cpu()
    out = []
    for p, (info, pair_runs) in enumerate(zip(batch.pairs, runs)):
        records = []
        for region, start, end in pair_runs:
            score = float(unary[p, start:end, region].mean())
            box = [float(x) for x in batch.region_boxes[info.image_row, region]]
            records.append(SnippetRecord(info.key, info.image_id, info.caption, region, box, start, end,
                                         info.tokens[start:end], score))
        out.append(records)
    return labels, out


# ---------------------------------------------------------------------------------------------- metrics


def majority_region(labels: Sequence[int], start: int, end: int) -> int:
    """Most frequent label of words [start, end); ties go to the lowest region index (deterministic)."""
    counts = Counter(labels[start:end])
    return min(counts, key=lambda r: (-counts[r], r))


def _cuts(n: int, spans: Sequence[Span]) -> list[int]:
    return sorted({x for s, e, _ in spans for x in (s, e) if 0 < x < n})


def _matched(pred: list[int], truth: list[int], tolerance: int) -> int:
    """One-to-one greedy matching of sorted boundary positions within ``tolerance`` words."""
    i = j = hits = 0
    while i < len(pred) and j < len(truth):
        if abs(pred[i] - truth[j]) <= tolerance:
            hits, i, j = hits + 1, i + 1, j + 1
        elif pred[i] < truth[j]:
            i += 1
        else:
            j += 1
    return hits


@dataclass
class AlignmentCounts:
    """Summable counts behind word->object accuracy and snippet boundary F1."""

    mentions: int = 0
    correct: int = 0
    words: int = 0  # words inside mentions
    words_correct: int = 0  # ... whose own region is their mention's box
    pred_cuts: int = 0
    true_cuts: int = 0
    matched_cuts: int = 0

    def add(self, labels: Sequence[int], spans: Sequence[Span], tolerance: int = 0) -> None:
        """One caption: ``labels`` its words' regions, ``spans`` (start, end, right region or -1 if none)."""
        n = len(labels)
        for start, end, region in spans:
            self.mentions += 1
            self.correct += int(region >= 0 and majority_region(labels, start, end) == region)
            self.words += end - start
            self.words_correct += sum(region >= 0 and label == region for label in labels[start:end])
        pred = [j for j in range(1, n) if labels[j] != labels[j - 1]]
        truth = _cuts(n, spans)
        self.pred_cuts += len(pred)
        self.true_cuts += len(truth)
        self.matched_cuts += _matched(pred, truth, tolerance)

    def summary(self) -> dict[str, float]:
        precision = self.matched_cuts / self.pred_cuts if self.pred_cuts else 0.0
        recall = self.matched_cuts / self.true_cuts if self.true_cuts else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        return {"mentions": self.mentions, "accuracy": self.correct / self.mentions if self.mentions else 0.0,
                "word_accuracy": self.words_correct / self.words if self.words else 0.0,
                "boundary_precision": precision, "boundary_recall": recall, "boundary_f1": f1}


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def region_for_box(box: Sequence[float], region_boxes: Sequence[Sequence[float]], n_regions: int,
                   min_iou: float = 0.5) -> int:
    """The region that stands for a ground-truth box: best IoU >= ``min_iou`` (with given boxes: the box
    itself), else -1 so the mention counts as missed. Region 0 (whole image) is never a candidate."""
    best, best_iou = -1, min_iou
    for r in range(1, n_regions):
        iou = box_iou(box, region_boxes[r])
        if iou >= best_iou and (best < 0 or iou > best_iou):
            best, best_iou = r, iou
    return best


def _count_batch(counts: AlignmentCounts, batch: PairBatch, labels: torch.Tensor, tolerance: int,
                 min_iou: float) -> None:
    rows = labels.cpu().tolist()
    for info, row, n, m in zip(batch.pairs, rows, batch.n_words.tolist(), batch.n_regions.tolist()):
        boxes = batch.gt_boxes[info.image_row]
        region_boxes = batch.region_boxes[info.image_row].tolist()
        spans = [(s, e, region_for_box(boxes[k], region_boxes, m, min_iou) if 0 <= k < len(boxes) else -1)
                 for s, e, k in info.spans if 0 <= s < e <= n]
        counts.add(row[:n], spans, tolerance)


def collect_pair_batches(model: Embedder, vocab: Vocabulary, features: str | Path, split: str = "val",
                         batch_size: int = 64, limit: int | None = None,
                         device: torch.device | str = "cpu") -> list[PairBatch]:
    """Embed a split once (at most ``limit`` images) so several β can be tried on the same unaries."""
    manifest = load_feature_manifest(features)
    urls = [str(Path(features) / p) for p in manifest["splits"][split]["shards"]]
    out, seen = [], 0
    for batch in iter_feature_batches(urls, vocab, manifest.get("feature_dim"), batch_size):
        if limit is not None and seen >= limit:
            break
        if limit is not None and seen + len(batch["keys"]) > limit:
            keep = limit - seen
            batch = {k: v[:keep] for k, v in batch.items()}
        seen += len(batch["keys"])
        out.append(embed_batch(model, batch, device))
    return out


def _batches_with_spans(model: Embedder, vocab: Vocabulary, features: str | Path, split: str, batch_size: int,
                        limit: int | None, device: torch.device | str) -> list[PairBatch]:
    """:func:`collect_pair_batches`, refused when no caption has ground-truth spans: the scores would all be 0
    over 0 mentions, which reads like a model that aligns nothing rather than data that cannot be scored."""
    batches = collect_pair_batches(model, vocab, features, split, batch_size, limit, device)
    if not any(info.spans for batch in batches for info in batch.pairs):
        raise ValueError(f"split {split!r} of {features} has no ground-truth mention spans; alignment "
                         "evaluation needs shapes-style data (`dsalign prepare shapes`)")
    return batches


def metrics_for_beta(batches: Sequence[PairBatch], beta: float, tolerance: int = 0, min_iou: float = 0.5,
                     whole_image: bool = True) -> dict[str, float]:
    """Accuracy / boundary F1 of the alignment at one β over pre-embedded batches."""
    counts = AlignmentCounts()
    for batch in batches:
        labels = label_pairs(batch, beta, whole_image)
        _count_batch(counts, batch, labels, tolerance, min_iou)
    return {"beta": float(beta), **counts.summary()}


def evaluate_shapes_alignment(model: Embedder, vocab: Vocabulary, features: str | Path, beta: float,
                              split: str = "val", batch_size: int = 64, limit: int | None = None,
                              tolerance: int = 0, whole_image: bool = True,
                              device: torch.device | str = "cpu") -> dict[str, float]:
    """Word->object accuracy and snippet boundary F1 against the shapes ground-truth spans at one β.

    Accuracy: a mention (ground-truth span) is right when the majority region of its words is the region of
    its box. Boundary F1: cut positions between predicted snippets vs the spans' start/end positions inside
    the caption (exact, or within ``tolerance`` words), micro-averaged over captions.
    """
    batches = _batches_with_spans(model, vocab, features, split, batch_size, limit, device)
    return metrics_for_beta(batches, beta, tolerance, whole_image=whole_image)


def sweep_beta(model: Embedder, vocab: Vocabulary, features: str | Path, betas: Sequence[float],
               split: str = "val", batch_size: int = 64, limit: int | None = None, tolerance: int = 0,
               whole_image: bool = True, device: torch.device | str = "cpu") -> list[dict[str, float]]:
    """:func:`evaluate_shapes_alignment` for several β; the embedding runs once."""
    batches = _batches_with_spans(model, vocab, features, split, batch_size, limit, device)
    return [{**metrics_for_beta(batches, beta, tolerance, whole_image=whole_image), "whole_image": whole_image}
            for beta in betas]


# ------------------------------------------------------------------------------------------ the stage


def _snippet_members(record: SnippetRecord, feature: torch.Tensor) -> dict[str, bytes]:
    buffer = io.BytesIO()
    np.save(buffer, feature.to(torch.float16).numpy(), allow_pickle=False)
    meta = {"format": SNIPPET_FORMAT, **vars(record)}  # vars: asdict deep-copies, 10x slower here
    return {"json": json.dumps(meta, sort_keys=True).encode("utf-8"), "npy": buffer.getvalue()}


def align_shard(model: Embedder, vocab: Vocabulary, url: str, out_path: Path, beta: float, settings: dict,
                feature_dim: int | None = None, batch_size: int = 64, device: torch.device | str = "cpu",
                bar: tqdm | None = None, whole_image: bool = True) -> dict:
    """Align every pair of one feature shard into one snippet shard, atomically (temp folder + rename; the
    stats file is written before the tar is renamed, so a shard counts as finished only when complete)."""
    shard = AtomicShard(out_path)
    skipped: Counter = Counter()
    stats = {"settings": settings, "images": 0, "pairs": 0, "snippets": 0}
    with shard.writer:
        for batch in iter_feature_batches([url], vocab, feature_dim, batch_size, skipped):
            pairs = embed_batch(model, batch, device)
            _, records = align_pairs(pairs, beta, whole_image)
            for info, pair_records in zip(pairs.pairs, records):
                for k, record in enumerate(pair_records):
                    feature = pairs.regions[info.image_row, record.region]
                    shard.writer.write(f"{info.key}_c{info.caption}_s{k}", _snippet_members(record, feature))
                stats["snippets"] += len(pair_records)
            stats["images"] += len(batch["keys"])
            stats["pairs"] += len(pairs.pairs)
            if bar is not None:
                bar.update(len(pairs.pairs))
    stats["skipped"] = dict(skipped)
    shard.commit(stats)
    return stats


def align_folder(model: Embedder, vocab: Vocabulary, features: str | Path, out: str | Path, beta: float,
                 split: str = "train", batch_size: int = 64, resume: bool = False,
                 device: torch.device | str = "cpu", model_id: str = "", progress: bool = True,
                 whole_image: bool = True, redo_other_settings: bool = False) -> dict:
    """Write one snippet shard per feature shard of ``split`` plus ``manifest.json``; returns the manifest.

    With ``resume`` finished shards made with the same settings (β, split, model) are kept and the rest
    redone; finished shards with other settings stop the run, or with ``redo_other_settings`` (a caller that
    owns ``out``, like the demo after more training) are redone too. Without ``resume`` a non-empty ``out`` is
    an error.
    """
    features, out = Path(features), Path(out)
    manifest = load_feature_manifest(features)
    if split not in manifest["splits"]:
        raise ValueError(f"split {split!r} not in {features} (has: {', '.join(sorted(manifest['splits']))})")
    if out.exists() and any(out.iterdir()) and not resume:
        raise ValueError(f"{out} is not empty (use --resume to keep finished shards)")
    settings = {"beta": float(beta), "split": split, "model": model_id, "features": str(features.resolve()),
                "whole_image": whole_image}
    shards = manifest["splits"][split]["shards"]
    info = manifest["splits"][split]
    bar = tqdm(total=info.get("captions"), unit="pair", desc=f"align {split}", disable=not progress)
    totals: Counter = Counter()
    skipped: Counter = Counter()
    done = 0
    with bar:
        for rel in shards:
            out_path = out / rel
            out_path.parent.mkdir(parents=True, exist_ok=True)
            stats = finished_stats(out_path) if resume else None
            if stats is not None and stats.get("settings") != settings and redo_other_settings:
                stats = None
            if stats is not None and stats.get("settings") != settings:
                changed = sorted(k for k in settings if stats.get("settings", {}).get(k) != settings[k])
                raise ValueError(f"{out_path} was made with other settings ({', '.join(changed)}); "
                                 "use another --out")
            if stats is None:
                stats = align_shard(model, vocab, str(features / rel), out_path, beta, settings,
                                    manifest.get("feature_dim"), batch_size, device, bar, whole_image)
            else:
                done += 1
                bar.update(stats["pairs"])
            totals.update({k: stats[k] for k in ("images", "pairs", "snippets")})
            skipped.update(stats.get("skipped", {}))
    result = {"kind": "snippets", "name": manifest.get("name"), "source": str(features),
              "feature_dim": manifest.get("feature_dim"), "feature_dtype": "float16", "settings": settings,
              # the words are stored as text: a generator may train on them with any copy of this vocabulary
              "vocab_sha256": file_sha256(features / VOCAB_NAME) if (features / VOCAB_NAME).is_file() else None,
              "resumed_shards": done,
              "splits": {split: {"shards": list(shards), **dict(totals), "skipped": dict(skipped)}}}
    write_manifest(out, result)
    return result


def read_snippets(folder: str | Path, split: str = "train") -> Iterator[tuple[SnippetRecord, np.ndarray]]:
    """The records and fp16 region features of a snippet folder, in shard order (tools and tests)."""
    manifest = load_manifest(folder)
    for rel in manifest["splits"][split]["shards"]:
        for _, members in iter_tar_samples(Path(folder) / rel):
            meta = json.loads(members["json"])
            meta.pop("format", None)
            yield SnippetRecord(**meta), np.load(io.BytesIO(members["npy"]), allow_pickle=False)
