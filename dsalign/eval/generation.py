"""Evaluating a caption generator on a split of a feature folder.

Full-image captions: one caption per image (beam search from the whole-image vector, region 0) against the
image's reference captions, with :func:`~dsalign.eval.captions.score_captions` and, given training captions,
the paper's novelty statistic.

Region descriptions: for data with ground-truth mention spans (the shapes data; any feature folder whose captions
carry ``spans``), every box mentioned in some caption is described from its region vector and compared with the
phrases the captions use for it: ``exact_match`` is the share of boxes whose description is one of those
phrases word for word once articles are dropped (as SQuAD's exact match does: "a purple donut" is the phrase
"purple donut"; the snippets a generator learns from keep the article, the mention spans do not), plus the
caption metrics against them. Where the boxes carry attributes (shapes),
``attribute_match`` is the share described correctly in any wording (shape and colour named, nothing wrong).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from dsalign.data.feature_pipeline import load_feature_manifest
from dsalign.data.shards import shard_paths
from dsalign.models.decode import beam_search
from dsalign.models.generator import CaptionGenerator
from dsalign.snippet_align import iter_feature_batches, region_for_box
from dsalign.text import Vocabulary

FAST_METRICS = ("BLEU", "CIDEr")  # no JVM start: what validation during training computes


@dataclass
class DecodeSettings:
    """Beam search settings (beam_size 1 = greedy)."""

    beam_size: int = 7
    max_len: int = 20
    length_penalty: float = 0.0


@torch.no_grad()
def describe_vectors(generator: CaptionGenerator, vocab: Vocabulary, vectors: torch.Tensor,
                     settings: DecodeSettings, batch_size: int = 256) -> list[tuple[str, float]]:
    """(sentence, per-word probability) per CNN vector [N, F], decoded ``batch_size`` vectors at a time on the
    generator's device. The probability is the geometric mean over the words and END, in [0, 1]."""
    device = next(generator.parameters()).device
    described: list[tuple[str, float]] = []
    for chunk in vectors.split(batch_size):
        for hyp in beam_search(generator, chunk.to(device, torch.float32), settings.beam_size, settings.max_len,
                               settings.length_penalty):
            described.append((" ".join(vocab.decode(hyp.tokens)), math.exp(hyp.log_prob / (len(hyp.tokens) + 1))))
    return described


def _batches(features: str | Path, split: str, vocab: Vocabulary, batch_size: int, limit: int | None,
             skipped: Counter) -> Iterator[dict]:
    manifest = load_feature_manifest(features)
    if split not in manifest["splits"]:
        raise ValueError(f"split {split!r} not in {features} (has: {', '.join(sorted(manifest['splits']))})")
    seen = 0
    for batch in iter_feature_batches(shard_paths(features, split), vocab, manifest.get("feature_dim"), batch_size,
                                      skipped):
        if limit is not None and seen >= limit:
            return
        take = len(batch["keys"]) if limit is None else min(len(batch["keys"]), limit - seen)
        seen += take
        yield {k: v[:take] for k, v in batch.items()}


def evaluate_full_captions(generator: CaptionGenerator, vocab: Vocabulary, features: str | Path, split: str,
                           settings: DecodeSettings, metrics: Iterable[str] = FAST_METRICS, limit: int | None = None,
                           training_captions: Sequence[str] | None = None, batch_size: int = 100) -> dict:
    """Caption metrics of the split's first ``limit`` images (all by default); ``predictions`` maps image id to
    the generated caption."""
    from dsalign.eval.captions import novelty_stats, score_captions

    predictions: dict[str, str] = {}
    references: dict[str, list[str]] = {}
    skipped: Counter = Counter()
    for batch in _batches(features, split, vocab, batch_size, limit, skipped):
        sentences = [text for text, _ in describe_vectors(generator, vocab, batch["regions"][:, 0], settings)]
        for image_id, sentence, raws in zip(batch["image_ids"], sentences, batch["raw_captions"]):
            predictions[image_id], references[image_id] = sentence, list(raws)
    if not predictions:
        raise ValueError(f"no usable image in split {split!r} of {features}")
    result = score_captions(predictions, references, metrics)
    if training_captions:
        result["novel_fraction"] = novelty_stats(predictions, training_captions)["novel_fraction"]
    result.update(images=len(predictions), skipped_images=sum(skipped.values()), predictions=predictions)
    return result


@dataclass
class RegionTarget:
    """One mentioned box: its region vector and the phrases the captions use for it."""

    image_id: str
    box: int
    region: int
    feature: torch.Tensor
    references: list[str]
    attributes: dict[str, str] | None = None  # the box's shape, colour, size, texture where the data has them


def region_targets(features: str | Path, split: str, vocab: Vocabulary, limit: int | None = None,
                   min_iou: float = 0.5, batch_size: int = 100) -> tuple[list[RegionTarget], int]:
    """Every ground-truth box with at least one mention span in the split's first ``limit`` images, and the
    number of mentioned boxes without a matching region (IoU < ``min_iou``; counted, not described)."""
    targets: list[RegionTarget] = []
    unmatched = 0
    for batch in _batches(features, split, vocab, batch_size, limit, Counter()):
        n_regions = batch["region_mask"].sum(1)
        for b, image_id in enumerate(batch["image_ids"]):
            phrases: dict[int, set[str]] = {}
            for tokens, spans in zip(batch["caption_tokens"][b], batch["caption_spans"][b]):
                for start, end, box in spans:
                    phrases.setdefault(box, set()).add(" ".join(tokens[start:end]))
            for box, refs in sorted(phrases.items()):
                if not 0 <= box < len(batch["gt_boxes"][b]):
                    unmatched += 1
                    continue
                region = region_for_box(batch["gt_boxes"][b][box], batch["boxes"][b], int(n_regions[b]), min_iou)
                if region < 0:
                    unmatched += 1
                    continue
                objects = batch["gt_objects"][b]
                targets.append(RegionTarget(image_id, box, region, batch["regions"][b, region].float(),
                                            sorted(refs), objects[box] if box < len(objects) else None))
    return targets, unmatched


def evaluate_region_descriptions(generator: CaptionGenerator, vocab: Vocabulary, features: str | Path, split: str,
                                 settings: DecodeSettings, metrics: Iterable[str] = FAST_METRICS,
                                 limit: int | None = None, batch_size: int = 100) -> dict:
    """exact_match (share of mentioned boxes described by one of their own phrases) and caption metrics of the
    region descriptions against those phrases; ValueError when the split has no ground-truth spans."""
    from dsalign.eval.captions import score_captions

    targets, unmatched = region_targets(features, split, vocab, limit, batch_size=batch_size)
    if not targets:
        raise ValueError(f"split {split!r} of {features} has no ground-truth mention spans to compare with")
    vectors = torch.stack([t.feature for t in targets])
    sentences = [text for text, _ in describe_vectors(generator, vocab, vectors, settings)]
    ids = [f"{t.image_id}#{t.box}" for t in targets]
    predictions = dict(zip(ids, sentences))
    result = score_captions(predictions, {i: t.references for i, t in zip(ids, targets)}, metrics)
    hits = sum(same_phrase(sentence, t.references) for sentence, t in zip(sentences, targets))
    result.update(exact_match=hits / len(targets), regions=len(targets), unmatched_boxes=unmatched,
                  predictions=predictions)
    if all(t.attributes for t in targets):
        result["attribute_match"] = attribute_match(sentences, [t.attributes for t in targets])
    return result


ARTICLES = frozenset({"a", "an", "the"})


def same_phrase(sentence: str, references: Iterable[str]) -> bool:
    """Whether ``sentence`` is one of ``references`` word for word, articles aside."""
    def words(text: str) -> list[str]:
        return [w for w in text.split() if w not in ARTICLES]

    return any(words(sentence) == words(reference) for reference in references)


def attribute_match(sentences: Sequence[str], objects: Sequence[dict[str, str]]) -> float:
    """Share of descriptions that name the object's shape and colour and no attribute it lacks, in any
    order and wording (shapes: "large dotted ring" for a large dotted ring is right even if no caption said
    it that way; the word-for-word ``exact_match`` is capped by the captions' random wording, see
    :mod:`dsalign.eval.shapes_ceiling`)."""
    from dsalign.data.shapes import phrase_matches

    return sum(phrase_matches(s, o, require=("shape", "colour")) for s, o in zip(sentences, objects)) / len(objects)
