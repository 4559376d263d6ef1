"""The Python inference API: ``model = dsalign.load(folder)``, then caption, describe, align and rank.

``folder`` is one bundle (``dsalign train ... --export``) or a folder of bundles (the demo's ``model/``): an
alignment bundle (for ``align``, ``rank_*``, ``embed_*``), a full-image caption bundle (``caption``) and a
region caption bundle (``describe_regions``), recognised by their ``config.json``. The CNN features are
computed from raw images with the settings recorded in the bundles, so results match training. Bundles trained
on the data set's own boxes (``given`` regions, e.g. the shapes data) propose regions with selective search
unless boxes are passed. When the alignment bundle has a retrieval bank beside it (``dsalign eval --bank-images N
--save-bank``; the demo's has one), ``rank_sentences`` and ``rank_images`` use bank-normalised scores.

Inputs: images are paths, PIL images of any mode (L, RGBA, P, CMYK, ...) or arrays (H x W, H x W x 3/4), any
size up to PIL's decompression-bomb limit; they are processed in batches. Where a method takes a list of images
or sentences, a single image or sentence is a list of one (a string is not split into characters). Sentences
are tokenised like the training captions. Defined edge cases: an empty sentence (no words) scores 0 against
every image and aligns to nothing; unknown words are the vocabulary's UNK; words past ``MAX_WORDS`` are
dropped. Bad input (an unreadable or too large image, NaN pixels, a non-positive or fractional ``top_k`` /
``beam_size`` / ``max_len``, an unknown device) raises :class:`InputError` with a one-line message.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from dsalign.bundle import Bundle, BundleError, bundles_by_role
from dsalign.eval.generation import DecodeSettings, describe_vectors
from dsalign.features.extract import FeatureConfig, FeatureExtractor, RegionFeatures
from dsalign.features.regions import GivenRegions
from dsalign.ops.score import score_matrix
from dsalign.ops.viterbi import snippets, viterbi
from dsalign.retrieval_bank import RetrievalBank, load_bank
from dsalign.snippet_align import WHOLE_IMAGE_PENALTY
from dsalign.text import tokenize
from dsalign.validation import range_error
from dsalign.viz import ImageTooLarge, to_rgb

ImageInput = str | Path | Image.Image | np.ndarray
_ONE_IMAGE = (str, Path, Image.Image, np.ndarray)  # one image, not a list of them (see _items)
Box = tuple[float, float, float, float]
MAX_WORDS = 128
FEATURE_CACHE = 64  # images whose region features Model keeps (about 100 KB each)
# The MRF's bonus for staying on one region is in score units, so it depends on the model's similarity: the
# values best on shapes val (docs/alignment.md).
DEFAULT_BETA = {"dot": 0.5, "cosine": 0.2}


class InputError(ValueError):
    """An image or sentence the API cannot use; the message says which and why, in one line."""


@dataclass(frozen=True)
class Region:
    """A described region: normalised box (x0, y0, x1, y1), its generated phrase and the phrase's per-word
    probability (geometric mean, END included), in [0, 1]."""

    box: Box
    phrase: str
    score: float


@dataclass(frozen=True)
class Snippet:
    """An aligned run of words [start, end) of the sentence's tokens, the region it went to (0 = whole image)
    and the mean word-region similarity of its words."""

    start: int
    end: int
    text: str
    region: int
    box: Box
    score: float


def load_image(image: ImageInput) -> Image.Image:
    """Any supported image input as an RGB PIL image; InputError for a missing, unreadable or odd input."""
    try:
        if isinstance(image, (str, Path)):
            if not Path(image).is_file():
                raise InputError(f"{image}: no such image file")
        elif isinstance(image, np.ndarray):
            if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (1, 3, 4)):
                raise InputError(f"image array must be H x W or H x W x 1/3/4, got shape {image.shape}")
            if image.dtype.kind in "fc" and not np.isfinite(image).all():
                raise InputError("image array holds NaN or infinite values")
        elif not isinstance(image, Image.Image):
            raise InputError(f"an image must be a path, a PIL image or an array, got {type(image).__name__}")
        rgb = to_rgb(image)
    except InputError:
        raise
    except ImageTooLarge as exc:
        raise InputError(f"{image}: {exc}") from exc
    except (UnidentifiedImageError, OSError, ValueError, TypeError) as exc:
        raise InputError(f"{image if isinstance(image, (str, Path)) else 'image'}: not a readable image "
                         f"({exc})") from exc
    if rgb.width < 1 or rgb.height < 1:
        raise InputError(f"image has no pixels ({rgb.width} x {rgb.height})")
    return rgb


def _items(value: object, one: type | tuple[type, ...], what: str) -> list:
    """``value`` as a list of items, a lone ``one`` (a sentence, an image) being one item: a str is also a
    sequence of characters and an array one of rows, so ``list()`` alone would split them."""
    if isinstance(value, one):
        return [value]
    try:
        return list(value)  # type: ignore[call-overload]
    except TypeError as exc:
        raise InputError(f"expected {what} or a list of them, got {type(value).__name__}") from exc


def _box_metas(boxes: Sequence[Sequence[Box]], n_images: int) -> list[dict]:
    """Given boxes as extraction metadata; a count that does not match the images would be cut by ``zip``."""
    if len(boxes) != n_images:
        raise InputError(f"boxes: {len(boxes)} lists for {n_images} images (one list of boxes per image)")
    try:
        return [{"boxes": [[float(x) for x in box] for box in image_boxes]} for image_boxes in boxes]
    except (TypeError, ValueError) as exc:
        raise InputError(f"boxes: each box must be four numbers (x0, y0, x1, y1) ({exc})") from exc


def _check(name: str, value: object, kind: type, minimum: float) -> None:
    """The rule the command line applies to the same option (:func:`dsalign.validation.range_error`)."""
    problem = range_error(value, kind, minimum)
    if problem:
        raise InputError(f"{name}: {problem}, got {value!r}")


def _check_decoding(beam_size: object, max_len: object) -> None:
    """Before any image work: torch would fail late, with its own TypeError, on a fractional beam size."""
    _check("beam_size", beam_size, int, 1)
    _check("max_len", max_len, int, 1)


def _device(device: str | torch.device | None) -> torch.device:
    """``device`` (default: CUDA when available), checked by placing a tensor on it, so a typo or a missing
    GPU is one line naming the device instead of a failure while the bundles load."""
    try:
        resolved = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        torch.empty(0, device=resolved)
    except (RuntimeError, AssertionError) as exc:  # torch: RuntimeError for a bad name, AssertionError for no CUDA
        reason = (str(exc).strip() or type(exc).__name__).splitlines()[-1]
        raise InputError(f"cannot use device {str(device)!r}: {reason}") from exc
    return resolved


def _words(sentence: str) -> list[str]:
    if not isinstance(sentence, str):
        raise InputError(f"a sentence must be a string, got {type(sentence).__name__}")
    return tokenize(sentence)[:MAX_WORDS]


def load(path: str | Path, device: str | torch.device | None = None, regions: str | None = None) -> Model:
    """The bundles in ``path`` as one :class:`Model` on ``device`` (default: CUDA when available).

    ``regions`` overrides the region source used on raw images (``selective-search``, ``grid``).
    """
    device = _device(device)
    roles = bundles_by_role(path, device)
    return Model(roles.get("alignment"), roles.get("full"), roles.get("region"), device, regions)


class Model:
    """Loaded bundles plus the feature extractor they were trained with. See the module docstring."""

    def __init__(self, alignment: Bundle | None, caption_full: Bundle | None, caption_region: Bundle | None,
                 device: torch.device, regions: str | None = None):
        self.alignment, self.caption_full, self.caption_region = alignment, caption_full, caption_region
        self.device = device
        present = [b for b in (alignment, caption_full, caption_region) if b is not None]
        settings = [json.dumps(b.features.get("settings") or {}, sort_keys=True) for b in present]
        if len(set(settings)) > 1:
            raise BundleError("the bundles were trained on features made with different settings")
        self.feature_settings: dict = json.loads(settings[0]) if settings else {}
        if not self.feature_settings:
            raise BundleError("the bundles do not record their feature settings (re-export them)")
        source = regions or self.feature_settings.get("regions", "selective-search")
        self.region_source = "selective-search" if source == "given" else source
        self._extractor: FeatureExtractor | None = None
        self._given: FeatureExtractor | None = None
        self._cache: OrderedDict[tuple, RegionFeatures] = OrderedDict()
        # `dsalign eval --save-bank` output beside the alignment bundle, used by rank_sentences / rank_images
        self.bank: RetrievalBank | None = load_bank(alignment) if alignment is not None else None

    def __repr__(self) -> str:
        parts = [name for name, b in (("alignment", self.alignment), ("caption", self.caption_full),
                                      ("regions", self.caption_region)) if b is not None]
        return f"dsalign.Model({', '.join(parts)}; {self.feature_settings.get('backbone')}, {self.device})"

    # ------------------------------------------------------------------------------------------ features

    def _feature_config(self, regions: str) -> FeatureConfig:
        return FeatureConfig.from_fingerprint(self.feature_settings, regions=regions)

    def region_features(self, images: Sequence[ImageInput] | ImageInput,
                        boxes: Sequence[Sequence[Box]] | None = None) -> list[RegionFeatures]:
        """Region boxes (region 0 = whole image) and CNN features per image; ``boxes`` (one list per image, or
        the list of a lone image) replaces the proposals.

        The last ``FEATURE_CACHE`` results are kept by pixel content and boxes, so captioning, describing and
        aligning the same image (as the report does) computes proposals and CNN features once.
        """
        if boxes is not None and isinstance(images, _ONE_IMAGE):
            boxes = [boxes]
        rgb = [load_image(image) for image in _items(images, _ONE_IMAGE, "an image")]
        metas = [{} for _ in rgb] if boxes is None else _box_metas(boxes, len(rgb))
        keys = [(hashlib.sha1(image.tobytes()).hexdigest(), image.size, json.dumps(meta, sort_keys=True))
                for image, meta in zip(rgb, metas)]
        first: dict[tuple, int] = {}  # one computation per distinct uncached image
        for i, key in enumerate(keys):
            if key not in self._cache:
                first.setdefault(key, i)
        missing = list(first.values())
        extractor = self._feature_extractor(given=boxes is not None)
        for start in range(0, len(missing), extractor.batch_size):
            chunk = missing[start:start + extractor.batch_size]
            for i, result in zip(chunk, extractor.extract([rgb[i] for i in chunk], [metas[i] for i in chunk])):
                if not isinstance(result, RegionFeatures):
                    raise InputError(f"cannot use this image or its boxes: {result}")
                self._cache[keys[i]] = result
        results = [self._cache[key] for key in keys]
        while len(self._cache) > FEATURE_CACHE:
            self._cache.popitem(last=False)
        return results

    def _feature_extractor(self, given: bool) -> FeatureExtractor:
        """The extractor with the bundles' region source, or one that takes the boxes it is given."""
        if self._extractor is None:
            self._extractor = FeatureExtractor(self._feature_config(self.region_source), self.device)
        if not given:
            return self._extractor
        if self._given is None:
            self._given = FeatureExtractor(self._feature_config("given"), self.device,
                                           backbone=self._extractor.backbone, source=GivenRegions())
        return self._given

    # ----------------------------------------------------------------------------------------- alignment

    def _need(self, bundle: Bundle | None, what: str) -> Bundle:
        if bundle is None:
            raise BundleError(f"this model has no {what} bundle")
        return bundle

    @torch.no_grad()
    def _region_vectors(self, features: list[RegionFeatures]) -> tuple[torch.Tensor, torch.Tensor]:
        model = self._need(self.alignment, "alignment").model
        n = max(len(f.boxes) for f in features)
        regions = torch.zeros(len(features), n, features[0].features.shape[1])
        mask = torch.zeros(len(features), n, dtype=torch.bool)
        for i, f in enumerate(features):
            regions[i, : len(f.boxes)], mask[i, : len(f.boxes)] = f.features, True
        return model.encode_images(regions.to(self.device), mask.to(self.device)), mask.to(self.device)

    @torch.no_grad()
    def _word_vectors(self, sentences: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, list[list[str]]]:
        bundle = self._need(self.alignment, "alignment")
        words = [_words(s) for s in sentences]
        n = max([len(w) for w in words] + [1])
        tokens = torch.zeros(len(words), n, dtype=torch.long)
        mask = torch.zeros(len(words), n, dtype=torch.bool)
        for i, w in enumerate(words):
            tokens[i, : len(w)], mask[i, : len(w)] = torch.tensor(bundle.vocab.encode(w), dtype=torch.long), True
        tokens, mask = tokens.to(self.device), mask.to(self.device)
        return bundle.model.encode_sentences(tokens, mask) * mask[..., None], mask, words

    def embed_images(self, images: Sequence[ImageInput] | ImageInput) -> list[torch.Tensor]:
        """Region vectors v_i [R, h] per image (the paper's Eq. 1; region 0 = whole image), on the CPU."""
        images = _items(images, _ONE_IMAGE, "an image")
        if not images:
            return []
        features = self.region_features(images)
        v, mask = self._region_vectors(features)
        return [v[i, mask[i]].cpu() for i in range(len(features))]

    def embed_sentences(self, sentences: Sequence[str] | str) -> list[torch.Tensor]:
        """Word vectors s_t [T, h] per sentence (Eqs. 2-6); [0, h] for a sentence without words."""
        sentences = _items(sentences, str, "a sentence")
        if not sentences:
            return []
        s, mask, _ = self._word_vectors(sentences)
        return [s[i, mask[i]].cpu() for i in range(len(sentences))]

    def _scores(self, images: Sequence[ImageInput], sentences: Sequence[str], bank: str | None = None
                ) -> torch.Tensor:
        """S_kl = sum_t max_i v_i . s_t [images, sentences] (Eq. 8); 0 for a sentence without words. With
        ``bank`` "sentences" / "images" and a retrieval bank, minus that side's bank prior (the other side's
        ranking is what the caller reads, and that prior does not change it)."""
        v, vm = self._region_vectors(self.region_features(images))
        s, sm, _ = self._word_vectors(sentences)
        scores = score_matrix(v, vm, s, sm).cpu().nan_to_num(0.0)
        if bank == "sentences" and self.bank is not None:
            has_words = sm.any(1).cpu()
            scores -= torch.where(has_words, self.bank.sentence_prior(s, sm).nan_to_num(0.0), 0.0)[None, :]
        elif bank == "images" and self.bank is not None:
            scores -= self.bank.image_prior(self._need(self.alignment, "alignment").model, v, vm)[:, None]
        return scores

    def rank_sentences(self, image: ImageInput, sentences: Sequence[str] | str, bank: bool = True
                       ) -> list[tuple[int, float]]:
        """(index into ``sentences``, score), best first. The score is S_kl, minus (when the alignment bundle
        has a retrieval bank and ``bank`` is true) how well the sentence fits the bank's images, so a sentence
        that fits any image ("a dog is running") stops outranking the ones written for this one."""
        sentences = _items(sentences, str, "a sentence")
        if not sentences:
            return []
        row = self._scores([image], sentences, "sentences" if bank else None)[0]
        return [(int(i), float(row[i])) for i in row.argsort(descending=True, stable=True)]

    def rank_images(self, sentence: str, images: Sequence[ImageInput] | ImageInput, bank: bool = True
                    ) -> list[tuple[int, float]]:
        """(index into ``images``, score), best first: S_kl, minus (with a retrieval bank and ``bank``) how well
        the image fits the bank's captions, so an image with a bit of everything stops winning every query."""
        images = _items(images, _ONE_IMAGE, "an image")
        if not images:
            return []
        column = self._scores(images, [sentence], "images" if bank else None)[:, 0]
        return [(int(i), float(column[i])) for i in column.argsort(descending=True, stable=True)]

    def similarity(self, image: ImageInput, sentence: str,
                   boxes: Sequence[Box] | None = None) -> tuple[list[str], list[Box], torch.Tensor]:
        """(words, region boxes, word x region dot products [T, R]): what :meth:`align` decides from."""
        features = self.region_features([image], None if boxes is None else [boxes])
        v, _ = self._region_vectors(features)
        s, mask, words = self._word_vectors([sentence])
        sim = (s[0, mask[0]] @ v[0].T).cpu()
        return words[0], [tuple(map(float, b)) for b in features[0].boxes], sim

    @property
    def default_beta(self) -> float:
        """The β :meth:`align` uses unless told: :data:`DEFAULT_BETA` for the alignment model's similarity."""
        return DEFAULT_BETA[self._need(self.alignment, "alignment").model.config.similarity]

    def align(self, image: ImageInput, sentence: str, beta: float | None = None, whole_image: bool = True,
              boxes: Sequence[Box] | None = None) -> list[Snippet]:
        """Snippets of ``sentence`` aligned to regions of ``image`` (proposals, or ``boxes``) by the chain MRF
        (Eqs. 10-12).

        ``beta`` >= 0 rewards neighbouring words on the same region (0 = each word to its best region; None =
        :attr:`default_beta`); ``whole_image=False`` keeps words off region 0 when the image has other regions.
        """
        beta = self.default_beta if beta is None else beta
        _check("beta", beta, float, 0.0)
        words, boxes, sim = self.similarity(image, sentence, boxes)
        if not words:
            return []
        unary = sim.clone()
        if not whole_image and len(boxes) > 1:
            unary[:, 0] -= WHOLE_IMAGE_PENALTY
        labels = viterbi(unary[None], torch.tensor([len(words)]), torch.tensor([len(boxes)]), beta)
        out = []
        for region, start, end in snippets(labels.cpu(), [len(words)])[0]:
            out.append(Snippet(start, end, " ".join(words[start:end]), region, boxes[region],
                               float(sim[start:end, region].mean())))
        return out

    # ------------------------------------------------------------------------------------------ captions

    def caption(self, images: Sequence[ImageInput] | ImageInput, beam_size: int = 7, max_len: int = 20,
                length_penalty: float = 0.0) -> list[str]:
        """One generated sentence per image (the full-image generator, beam search)."""
        bundle = self._need(self.caption_full, "full-image caption")
        images = _items(images, _ONE_IMAGE, "an image")
        _check_decoding(beam_size, max_len)
        _check("length_penalty", length_penalty, float, 0.0)
        if not images:
            return []
        # Only region 0, the whole image, is used: no proposals are needed.
        vectors = torch.stack([f.features[0] for f in self.region_features(images, [[] for _ in images])])
        settings = DecodeSettings(beam_size, max_len, length_penalty)
        return [text for text, _ in describe_vectors(bundle.model, bundle.vocab, vectors, settings)]

    def describe_regions(self, image: ImageInput, top_k: int | None = 10, beam_size: int = 7, max_len: int = 10,
                         boxes: Sequence[Box] | None = None) -> list[Region]:
        """The paper's region-level descriptions: a phrase for each proposed region (or each of ``boxes``),
        most confident first, at most ``top_k`` (None: all)."""
        bundle = self._need(self.caption_region, "region caption")
        if top_k is not None:
            _check("top_k", top_k, int, 1)
        _check_decoding(beam_size, max_len)
        features = self.region_features([image], None if boxes is None else [boxes])[0]
        if len(features.boxes) < 2:
            return []
        described = describe_vectors(bundle.model, bundle.vocab, features.features[1:],
                                     DecodeSettings(beam_size, max_len))
        regions = [Region(tuple(map(float, box)), text, score)
                   for box, (text, score) in zip(features.boxes[1:], described)]
        regions.sort(key=lambda r: -r.score)
        return regions if top_k is None else regions[:top_k]
