"""``dsalign eval``: every metric a bundle (or a folder of bundles) supports, on one split of a feature folder.

- alignment bundle: image-sentence retrieval R@K and median rank (all images of the split against their
  first five captions: the paper's protocol on the 1,000-image Flickr8k/30k test splits; a 5,000-image COCO
  test split gives the 5K protocol, see ``dsalign.eval.retrieval.coco_1k`` for 1K folds);
- full-image caption bundle: BLEU-1..4, METEOR (with Java), ROUGE-L, CIDEr with beam search, and the share of
  generated captions that are not copies of a training caption;
- region caption bundle: exact phrase match and caption metrics against the ground-truth mention phrases (data
  with spans, e.g. shapes; otherwise ``{"skipped": reason}``).

One JSON document: ``{"split", "features", "retrieval", "captions", "regions", "settings"}`` (absent parts are
null), with the generated captions in ``predictions`` beside it when asked.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from dsalign.bundle import Bundle, bundles_by_role, check_feature_folder
from dsalign.data.feature_pipeline import FeatureSampleDecoder, collate_features, load_feature_manifest
from dsalign.data.pipeline import ShardLoader, ShardStream
from dsalign.data.shards import iter_tar_samples, shard_paths
from dsalign.eval.generation import DecodeSettings, evaluate_full_captions, evaluate_region_descriptions
from dsalign.text import Vocabulary

if TYPE_CHECKING:  # the trainer module pulls in DeepSpeed; imported where it runs
    from dsalign.train.align import SplitEmbeddings


def _feature_loader(features: Path, split: str) -> ShardLoader:
    manifest = load_feature_manifest(features)
    decoder = FeatureSampleDecoder(Vocabulary.load(features / manifest["vocab"]),
                                   feature_dim=manifest.get("feature_dim"))
    return ShardLoader(ShardStream(shard_paths(features, split), decoder, collate_features, 100, mode="eval"))


def retrieval_on_split(bundle: Bundle, features: str | Path, split: str = "test", captions_per_image: int = 5,
                       device: torch.device | str = "cpu", bank_images: int = 0, bank_split: str = "train",
                       temperature: float | None = None, val_split: str = "val", save_bank: bool = False) -> dict:
    """R@K of an alignment bundle on a split of the feature folder.

    With ``bank_images`` > 0, ``bank`` also holds the metrics corrected for generic sentences and hub images
    (:mod:`dsalign.eval.bank_norm`) with the first ``bank_images`` images of ``bank_split`` and their captions;
    ``temperature`` None chooses one per direction on ``val_split``. ``save_bank`` keeps that bank and the
    temperatures beside the bundle for the Python API (:mod:`dsalign.retrieval_bank`).
    """
    from dsalign.eval.bank_norm import BankScores, bank_metrics, choose_temperatures
    from dsalign.train.align import TooFewCaptionsError, embed_split, retrieval_metrics, split_scores

    features, device = Path(features), torch.device(device)

    def embedded(name: str, limit: int | None = None) -> SplitEmbeddings:
        try:
            return embed_split(bundle.model, _feature_loader(features, name), captions_per_image, device,
                               max_images=limit)
        except TooFewCaptionsError as exc:
            raise ValueError(f"retrieval on split {name!r} of {features}: {exc}; R@K needs {captions_per_image} "
                             "captions per image") from exc

    pairs = embedded(split)
    sims = split_scores(pairs).cpu()
    result = retrieval_metrics(pairs, sims, captions_per_image)
    if bank_images <= 0:
        if save_bank:
            raise ValueError("saving a retrieval bank needs bank images (--bank-images N)")
        return result
    bank = embedded(bank_split, bank_images)

    def bank_scores(target: SplitEmbeddings, target_sims: torch.Tensor) -> BankScores:
        return BankScores(target_sims, split_scores(target, images=bank).cpu(),
                          split_scores(bank, images=target).cpu())

    if temperature is None:
        val = embedded(val_split)
        chosen = choose_temperatures(bank_scores(val, split_scores(val).cpu()), captions_per_image)
    else:
        chosen = {"i2t": temperature, "t2i": temperature}
    result["bank"] = {**bank_metrics(bank_scores(pairs, sims), chosen["i2t"], chosen["t2i"], captions_per_image),
                      "temperatures_from": val_split if temperature is None else "given"}
    if save_bank:
        from dsalign.retrieval_bank import save_bank as write_bank

        result["bank"]["saved"] = str(write_bank(bundle, bank.regions, bank.region_mask, bank.tokens,
                                                 bank.word_mask, chosen))
    return result


def training_captions(features: str | Path, split: str = "train") -> list[str]:
    """The raw captions of a split of an image- or feature-shard folder (metadata only; no pixels decoded)."""
    captions: list[str] = []
    for url in shard_paths(features, split):
        for _, members in iter_tar_samples(url):
            meta = json.loads(members.get("json", b"{}"))
            captions.extend(c.get("raw", "") for c in meta.get("captions", []) if isinstance(c, dict))
    return captions


def evaluate_bundles(bundle_path: str | Path, features: str | Path, split: str = "test",
                     settings: DecodeSettings | None = None, metrics: Iterable[str] | None = None,
                     limit: int | None = None, device: str = "cpu", novelty: bool = True, bank_images: int = 0,
                     bank_temperature: float | None = None, save_bank: bool = False) -> dict:
    """The JSON document described in the module docstring (``predictions`` included); ``bank_images``,
    ``bank_temperature`` and ``save_bank``: see :func:`retrieval_on_split`."""
    from dsalign.eval.captions import SCORERS

    settings = settings or DecodeSettings()
    metrics = tuple(metrics or SCORERS)
    result: dict = {"split": split, "features": str(features), "retrieval": None, "captions": None,
                    "regions": None, "settings": {**vars(settings), "metrics": list(metrics), "limit": limit}}
    roles = bundles_by_role(bundle_path, device)
    check_feature_folder(roles.values(), features)
    if bundle := roles.get("alignment"):
        result["retrieval"] = retrieval_on_split(bundle, features, split, device=device, bank_images=bank_images,
                                                 temperature=bank_temperature, save_bank=save_bank)
    if bundle := roles.get("full"):
        train = training_captions(features) if novelty else None
        result["captions"] = evaluate_full_captions(bundle.model, bundle.vocab, features, split, settings,
                                                    metrics, limit, train)
    if bundle := roles.get("region"):
        try:
            result["regions"] = evaluate_region_descriptions(bundle.model, bundle.vocab, features, split,
                                                             settings, metrics, limit)
        except ValueError as exc:  # no ground-truth spans: the other parts still count
            result["regions"] = {"skipped": str(exc)}
    return result
