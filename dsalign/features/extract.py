"""Image shards → region-feature shards (``dsalign features``).

Speed: the backbone's conv trunk runs ONCE per image (resized to ``image_size`` square) and every region's
feature is pooled from that feature map with RoI align (Fast R-CNN style), then averaged like the backbone's
own head pooling. One forward per 224-px region crop would take hours on a laptop CPU for Flickr8k's
8,000 x 20 regions; this takes minutes. ``pooling="crop"`` crops every region but the whole image, resizes it
to ``crop_size`` and embeds it on its own, batched across images (~5x the CNN work; each region sees only its
own pixels). In both modes the whole-image region's feature is exactly the backbone's global-average-pooled
feature of the full-size input (with ``roi`` because the RoI grid samples every feature-map cell centre).

Output layout: one output shard per input shard, at the same relative path, with one sample per usable input
sample under the same key: ``KEY.npy`` float16 [R, F] region features (R <= top_k + 1) and ``KEY.json`` = the
input metadata (image id, split, captions with tokens and spans, boxes, box_labels, extra) plus
``region_boxes`` [R, 4] (normalised x0, y0, x1, y1; region 0 = whole image). A shard is written under a
temporary name and renamed when complete, after its ``.stats.json`` (counts, skips, settings), so a killed run
never leaves a half shard that counts as finished. Rank r of WORLD_SIZE takes input shards r, r+W, ...;
rank 0 writes ``manifest.json`` once every shard exists.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import logging
import os
import shutil
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from dsalign.data.images import decode_rgb
from dsalign.data.manifest import MANIFEST_NAME, load_manifest, write_manifest
from dsalign.data.ordered_workers import TASK_SIZE, OrderedWorkers
from dsalign.data.pipeline import SampleError, decode_meta, dist_info, iter_shard
from dsalign.data.prepare import VOCAB_NAME
from dsalign.data.shard_output import STATS_SUFFIX, TMP_PREFIX, AtomicShard, finished_stats
from dsalign.data.shards import ShardWriter, image_member
from dsalign.features.backbones import DEFAULT_BACKBONE, Backbone, load_backbone
from dsalign.features.regions import (
    DETECTORS,
    PROPOSAL_MODES,
    WHOLE_IMAGE,
    Proposals,
    RegionSource,
    make_region_source,
    select_regions,
)
from dsalign.text import Vocabulary

FEATURES_KIND = "features"
FEATURE_SAMPLE_FORMAT = "dsalign-features/1"
POOLINGS = ("roi", "crop")
BOX_GEOMETRY_DIMS = 4
REGION_ORDER = "region 0 = whole image, then proposals by descending score (given: the data's order)"

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FeatureConfig:
    """Every setting that changes the stored features; a resumed run must use the same ones."""

    backbone: str = DEFAULT_BACKBONE
    backbone_weights: str | None = None
    regions: str = "selective-search"
    top_k: int = 19
    image_size: int = 224
    pooling: str = "roi"
    crop_size: int = 112
    min_side: float = 0.05
    nms_iou: float = 0.5
    proposal_side: int = 64
    proposal_mode: str = PROPOSAL_MODES[0]
    detector: str = DETECTORS[0]
    detector_weights: str | None = None
    detector_size: int | None = None
    detector_score: float = 0.05
    box_geometry: bool = False  # append each region's box (x0, y0, x1, y1) to its feature, see FeatureExtractor

    def __post_init__(self) -> None:
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if self.proposal_mode not in PROPOSAL_MODES:
            raise ValueError(f"proposal_mode must be one of {PROPOSAL_MODES}, got {self.proposal_mode!r}")
        if self.top_k < 0 or self.image_size < 32 or self.crop_size < 32:
            raise ValueError("top_k must be >= 0 and image/crop sizes >= 32 pixels")

    @classmethod
    def from_fingerprint(cls, settings: dict, **overrides) -> FeatureConfig:
        """The config a recorded fingerprint stands for (unknown keys ignored). Options the fingerprint leaves
        out take their value from before the option existed (``proposal_mode`` "fast"), not today's default,
        so a bundle trained on older features computes the same proposals at inference."""
        known = {k: v for k, v in settings.items() if k in cls.__dataclass_fields__}
        if known.get("regions", cls.regions) == "selective-search":
            known.setdefault("proposal_mode", "fast")
        return cls(**{**known, **overrides})

    def fingerprint(self) -> dict:
        """The settings recorded in the manifest and every shard's stats (weights by file name only, so a
        moved virtual environment still resumes); settings of unused options are left out."""
        settings = asdict(self)
        for key in ("backbone_weights", "detector_weights"):
            settings[key] = Path(settings[key]).name if settings[key] else None
        if self.regions != "detector":
            for key in ("detector", "detector_weights", "detector_size", "detector_score"):
                settings.pop(key)
        if self.regions != "selective-search":
            settings.pop("proposal_side")
        if self.regions != "selective-search" or self.proposal_mode == "fast":  # "fast" was the only mode before
            settings.pop("proposal_mode")  # the option existed, so folders made then still resume
        if self.pooling != "crop":
            settings.pop("crop_size")
        if not self.box_geometry:  # folders made before the option existed still resume
            settings.pop("box_geometry")
        return settings


def default_batch_size(device: str | torch.device) -> int:
    """Images per CNN batch: 4 on CPU, where small batches keep the activations in cache (efficientnet-lite0
    at 224 px on 2 cores: ~35 images/s at batch 2-4, ~6 at batch 32-64), 32 on accelerators."""
    return 4 if torch.device(device).type == "cpu" else 32


def default_workers(device: str | torch.device) -> int:
    """Worker processes for decoding and proposals: none on CPU, where the CNN's threads take the cores; on an
    accelerator, whose CNN outruns one preparing process many times over, this process's share of the CPU cores
    (``LOCAL_WORLD_SIZE`` processes per node) less the one it runs on, 1 to 8."""
    if torch.device(device).type == "cpu":
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(8, max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1")) - 1))


@dataclass
class RegionFeatures:
    """One image's regions: boxes [R, 4] (normalised, region 0 = whole image) and features [R, F] float32."""

    boxes: np.ndarray
    features: torch.Tensor


def cnn_input(image: Image.Image, size: int) -> np.ndarray:
    """uint8 [S, S, 3], writable: the whole image squeezed to the CNN's input size (boxes are normalised, so the
    aspect change needs no box correction)."""
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BILINEAR)
    return np.array(image)


class RegionFeaturizer:
    """Boxes + images → region features, batched across images (see the module docstring)."""

    def __init__(self, backbone: Backbone, image_size: int = 224, pooling: str = "roi", crop_size: int = 112,
                 crop_batch: int = 16):
        self.backbone = backbone
        self.image_size = image_size
        self.pooling = pooling
        self.crop_size = crop_size
        self.crop_batch = crop_batch
        self.device = next(backbone.parameters()).device

    def to_input(self, image: Image.Image) -> torch.Tensor:
        """uint8 [3, S, S]: :func:`cnn_input` as a channels-first tensor."""
        return torch.from_numpy(cnn_input(image, self.image_size)).permute(2, 0, 1)

    @staticmethod
    def stack_inputs(pixels: Sequence[np.ndarray]) -> torch.Tensor:
        """uint8 [B, 3, S, S] (contiguous) from :func:`cnn_input` arrays."""
        return torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).contiguous()

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor, boxes: Sequence[np.ndarray]) -> list[torch.Tensor]:
        """``images`` uint8 [B, 3, S, S] from :meth:`to_input`; ``boxes[b]`` [R_b, 4] normalised →
        float32 [R_b, F] per image, on the CPU."""
        from torchvision.ops import roi_align  # here: torchvision's import costs every CLI command a second

        images = images.to(self.device)
        counts = [len(b) for b in boxes]
        index = torch.repeat_interleave(torch.arange(len(boxes)), torch.tensor(counts)).double().unsqueeze(1)
        flat = np.concatenate(boxes).reshape(-1, 4)
        scaled = torch.from_numpy(flat) * self.image_size
        rois = torch.cat([index, scaled], dim=1).float().to(self.device)
        if self.pooling == "roi":
            fmap = self.backbone(images)
            # One output bin, adaptive sampling: ceil(region side in cells) bilinear samples per side, i.e.
            # about one per feature-map cell covered; for the whole image exactly the cell centres.
            pooled = roi_align(fmap, rois, output_size=1, spatial_scale=fmap.shape[-1] / self.image_size,
                               sampling_ratio=0, aligned=True).flatten(1)
        else:
            # A whole-image box (region 0 from select_regions) gets the global feature of the full-resolution
            # pass, as in roi mode, rather than a crop-size thumbnail; every other box is cropped and embedded
            # on its own.
            whole = torch.from_numpy((flat == WHOLE_IMAGE).all(1)).to(self.device)
            pooled = torch.empty(len(rois), self.backbone.feature_dim, device=self.device)
            if whole.any():
                image_features = self.backbone.pool(self.backbone(images))
                pooled[whole] = image_features[rois[whole, 0].long()].to(pooled.dtype)
            crops = roi_align(self.backbone.normalize(images), rois[~whole], output_size=self.crop_size,
                              spatial_scale=1.0, sampling_ratio=0, aligned=True)
            if len(crops):
                pooled[~whole] = torch.cat([self.backbone.pool(self.backbone.trunk(chunk))
                                            for chunk in crops.split(self.crop_batch)]).to(pooled.dtype)
        return list(pooled.float().cpu().split(counts))


@dataclass
class ShardStats:
    """What one output shard holds and what was skipped on the way (kept beside it as ``.stats.json``)."""

    input: str
    images: int = 0
    captions: int = 0
    no_boxes: int = 0  # --regions given: images kept with the whole image only, the data gave them no boxes
    skipped: Counter = field(default_factory=Counter)
    skipped_samples: list[dict] = field(default_factory=list)
    settings: dict = field(default_factory=dict)

    def skip(self, reason: str, key: str | None = None, image_id: str | None = None) -> None:
        self.skipped[reason] += 1
        self.skipped_samples.append({"shard": self.input, "key": key, "image_id": image_id, "reason": reason})

    def to_json(self) -> dict:
        return {**asdict(self), "skipped": dict(sorted(self.skipped.items()))}


@dataclass
class PreparedImage:
    """One image as the host hands it to the CNN: its input pixels and its region boxes, or, for a region source
    that proposes for whole batches (the detector), the decoded image it still needs."""

    pixels: np.ndarray  # uint8 [S, S, 3] from cnn_input
    boxes: np.ndarray | None = None  # [R, 4] from select_regions
    image: Image.Image | None = None  # only while boxes is None


class ImagePreparer:
    """The host's work on one image before the CNN: decode, resize to the CNN input and, with a per-image region
    source, propose and select the regions. Holds no CUDA state, so worker processes run it (see
    FeatureExtractor); a batched source stays in the main process."""

    def __init__(self, config: FeatureConfig, source: RegionSource):
        self.config = config
        self.source = source if source.per_image else None

    def __call__(self, encoded: bytes | SampleError, meta: dict | None) -> PreparedImage | SampleError:
        """An encoded image (PNG, JPEG, ...) prepared, or the SampleError that skips it (a sample skipped
        already, its error passed in, stays skipped)."""
        if isinstance(encoded, SampleError):
            return encoded
        try:
            image = decode_rgb(encoded)
        except ValueError as exc:
            return SampleError("bad_image", str(exc))
        return self.from_image(image, meta)

    def from_image(self, image: Image.Image, meta: dict) -> PreparedImage | SampleError:
        pixels = cnn_input(image, self.config.image_size)
        if self.source is None:
            return PreparedImage(pixels, image=image)
        proposals = self.source.propose_or_error(image, meta)
        return proposals if isinstance(proposals, SampleError) else PreparedImage(pixels, self.select(proposals))

    def select(self, proposals: Proposals) -> np.ndarray:
        return select_regions(proposals, self.config.top_k, self.config.min_side, self.config.nms_iou)


_Parsed = tuple[str, dict | None, bytes | PreparedImage | SampleError]  # key, metadata, image or its outcome


class _Ready(NamedTuple):
    key: str
    meta: dict
    prepared: PreparedImage


class FeatureExtractor:
    """Backbone + region source + featurizer: decoded images in, region boxes and features out."""

    def __init__(self, config: FeatureConfig, device: str | torch.device = "cpu", batch_size: int | None = None,
                 backbone: Backbone | None = None, source: RegionSource | None = None, workers: int | None = None):
        """``batch_size`` None: :func:`default_batch_size` of the device. ``workers`` > 0: processes that decode
        the images and propose their regions (:class:`ImagePreparer`) while the CNN runs; started on the first
        shard, stopped by :meth:`close`; None: :func:`default_workers` of the device."""
        batch_size = default_batch_size(device) if batch_size is None else batch_size
        workers = default_workers(device) if workers is None else workers
        if batch_size < 1 or workers < 0:
            raise ValueError(f"need batch size >= 1 and workers >= 0, got {batch_size} and {workers}")
        self.config = config
        self.batch_size = batch_size
        self.workers = workers
        self.backbone = backbone or load_backbone(config.backbone, config.backbone_weights, device)
        self.source = source or make_region_source(
            config.regions, config.top_k, proposal_side=config.proposal_side, proposal_mode=config.proposal_mode,
            detector_weights=config.detector_weights, detector=config.detector,
            detector_size=config.detector_size, detector_score=config.detector_score, device=device)
        self.featurizer = RegionFeaturizer(self.backbone, config.image_size, config.pooling, config.crop_size)
        self.preparer = ImagePreparer(config, self.source)
        self._workers = OrderedWorkers(workers, self.preparer, ahead=2 * workers + -(-batch_size // TASK_SIZE),
                                       on_death="finished shards are kept: rerun with --resume, with fewer "
                                                "--workers if memory ran out") if workers else None

    @property
    def feature_dim(self) -> int:
        return self.backbone.feature_dim + (BOX_GEOMETRY_DIMS if self.config.box_geometry else 0)

    def settings(self) -> dict:
        return {**self.config.fingerprint(), "feature_dim": self.feature_dim}

    def close(self) -> None:
        """Stop the worker processes, if any started (a later shard starts new ones)."""
        if self._workers is not None:
            self._workers.close()

    def extract(self, images: Sequence[Image.Image], metas: Sequence[dict] | None = None
                ) -> list[RegionFeatures | SampleError]:
        """Regions and their features for RGB images (``metas`` carries given boxes), in this process."""
        metas = metas if metas is not None else [{} for _ in images]
        return self._featurize([self.preparer.from_image(image, meta) for image, meta in zip(images, metas)], metas)

    def _featurize(self, prepared: Sequence[PreparedImage | SampleError], metas: Sequence[dict]
                   ) -> list[RegionFeatures | SampleError]:
        ready: list = list(prepared)
        batched = [i for i, p in enumerate(ready) if isinstance(p, PreparedImage) and p.boxes is None]
        if batched:
            proposals = self.source.propose_batch([ready[i].image for i in batched], [metas[i] for i in batched])
            for i, found in zip(batched, proposals):
                ready[i] = found if isinstance(found, SampleError) else \
                    PreparedImage(ready[i].pixels, self.preparer.select(found))
        good = [i for i, p in enumerate(ready) if isinstance(p, PreparedImage)]
        if not good:
            return ready
        boxes = [ready[i].boxes for i in good]
        inputs = self.featurizer.stack_inputs([ready[i].pixels for i in good])
        for i, b, f in zip(good, boxes, self.featurizer(inputs, boxes)):
            if self.config.box_geometry:
                # A crop resized to the CNN's input forgets how big the region was and where; size and
                # position words ("small", "big", "left") need it, so the box itself joins the feature.
                f = torch.cat([f, torch.from_numpy(np.asarray(b, dtype=np.float32).reshape(-1, 4))], dim=1)
            ready[i] = RegionFeatures(b, f)
        return ready

    def process_shard(self, url: str, out_path: Path, stats: ShardStats, bar: tqdm | None = None) -> None:
        """Featurise one input shard into ``out_path`` (atomically); counts go to ``stats``."""
        shard = AtomicShard(out_path)
        skips: Counter = Counter()
        batch: list[_Ready] = []
        with shard.writer:
            for key, meta, prepared in self._prepare_all(iter_shard(url, skips)):
                if isinstance(prepared, SampleError):
                    stats.skip(prepared.reason, key, None if meta is None else str(meta.get("image_id", key)))
                    _advance(bar)
                    continue
                batch.append(_Ready(key, meta, prepared))
                if len(batch) == self.batch_size:
                    self._write(batch, shard.writer, stats, bar)
                    batch = []
            self._write(batch, shard.writer, stats, bar)
        for reason in skips.elements():  # a corrupt tar: the samples before the damage were kept
            stats.skip(reason)
        shard.commit(stats.to_json())

    def _prepare_all(self, samples: Iterator[tuple[str, dict[str, bytes]]]) -> Iterator[_Parsed]:
        """Every sample prepared, in shard order: in line, or by the worker processes, which stay up to two
        tasks each and a batch ahead of the CNN."""
        listing, jobs = itertools.tee(_parse(key, raw) for key, raw in samples)
        arguments = ((work, meta) for _, meta, work in jobs)
        prepared = self._workers.starmap(arguments) if self._workers else (self.preparer(*a) for a in arguments)
        with contextlib.closing(prepared):  # stopped early: the workers drop the rest of this shard's tasks
            for (key, meta, _), result in zip(listing, prepared):
                yield key, meta, result

    def _write(self, batch: list[_Ready], writer: ShardWriter, stats: ShardStats, bar: tqdm | None) -> None:
        if not batch:
            return
        results = self._featurize([item.prepared for item in batch], [item.meta for item in batch])
        for item, result in zip(batch, results):
            _advance(bar)
            image_id = str(item.meta.get("image_id", item.key))
            if isinstance(result, SampleError):
                stats.skip(result.reason, item.key, image_id)
                continue
            features = result.features.half()
            if not torch.isfinite(features).all():
                stats.skip("bad_features", item.key, image_id)
                continue
            buffer = io.BytesIO()
            np.save(buffer, features.numpy(), allow_pickle=False)
            meta = {**item.meta, "format": FEATURE_SAMPLE_FORMAT,
                    "region_boxes": [[float(x) for x in box] for box in result.boxes]}
            writer.write(item.key, {"json": json.dumps(meta, sort_keys=True).encode("utf-8"),
                                    "npy": buffer.getvalue()})
            stats.images += 1
            stats.captions += len(item.meta.get("captions") or [])
            if self.config.regions == "given" and not item.meta.get("boxes"):
                stats.no_boxes += 1


def _parse(key: str, raw: dict[str, bytes]) -> _Parsed:
    """(key, metadata, encoded image), or the SampleError that skips the sample (metadata None if unreadable)."""
    meta = None
    try:
        meta = decode_meta(raw)
        member = image_member(raw)
        if member is None:
            raise SampleError("missing_image")
        return key, meta, member[1]
    except SampleError as exc:
        return key, meta, exc


def _advance(bar: tqdm | None) -> None:
    if bar is not None:
        bar.update(1)


def _check_given_boxes(splits: dict[str, dict]) -> None:
    """Refuse a split where ``--regions given`` found no boxes at all: every image would hold the whole image
    only, which trains and aligns nothing useful, and nothing else would say so. No manifest is written."""
    for split, entry in sorted(splits.items()):
        if entry["images"] and entry["no_boxes"] == entry["images"]:
            raise ValueError(f"--regions given: none of the {entry['images']} {split} images has boxes in the "
                             "data; use --regions grid or selective-search")


def _check_settings(shard: Path, stats: dict, settings: dict) -> None:
    if stats["settings"] != settings:
        changed = sorted(k for k in settings.keys() | stats["settings"].keys()
                         if settings.get(k) != stats["settings"].get(k))
        raise ValueError(f"{shard} was made with different settings ({', '.join(changed)}); "
                         "use the same options to resume, or --overwrite to start over")


def _prepare_output(out: Path, resume: bool, overwrite: bool, world_size: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    manifest = out / MANIFEST_NAME
    if manifest.is_file() and load_manifest(out).get("kind") != FEATURES_KIND:
        raise ValueError(f"{out} holds a data set that is not a feature folder; refusing to write into it")
    if world_size > 1:
        if overwrite:
            raise ValueError("--overwrite with several ranks would let ranks delete each other's shards; "
                             "clear the output folder first")
        return  # ranks start at different times, so every rank resumes (finished shards are reused)
    if not any(out.iterdir()):
        return
    if overwrite:
        _clear_features(out)
    elif not resume:
        raise ValueError(f"output folder {out} is not empty (pass --resume to continue or --overwrite to replace)")


def _clear_features(out: Path) -> None:
    """Remove what a feature run writes, and nothing else; refuse folders that a feature run did not write."""
    ours = [p for d in out.iterdir() if d.is_dir() for p in d.iterdir()
            if p.name.endswith(STATS_SUFFIX) or p.name.startswith(TMP_PREFIX)]
    if not (out / MANIFEST_NAME).is_file() and not ours:
        raise ValueError(f"refusing to overwrite {out}: it is not a feature folder")
    manifest = load_manifest(out) if (out / MANIFEST_NAME).is_file() else {}
    (out / MANIFEST_NAME).unlink(missing_ok=True)
    if manifest.get("vocab"):
        (out / manifest["vocab"]).unlink(missing_ok=True)
    for folder in [d for d in out.iterdir() if d.is_dir()]:
        for path in folder.iterdir():
            if path.name.startswith(TMP_PREFIX) and path.is_dir():
                shutil.rmtree(path)
            elif path.suffix == ".tar" or path.name.endswith(STATS_SUFFIX) or path.name.startswith(TMP_PREFIX):
                path.unlink()
        if not any(folder.iterdir()):
            folder.rmdir()


def process_device(device: str | torch.device) -> torch.device:
    """``cuda`` without an index is this process's GPU: LOCAL_RANK's among a launcher's several processes
    (``torchrun --nproc-per-node 4`` tells each only its LOCAL_RANK and WORLD_SIZE), else the current one (a
    world of one, such as the one a training run in this process set up for itself, keeps it)."""
    device = torch.device(device)
    if (device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ
            and int(os.environ.get("WORLD_SIZE", "1")) > 1):
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device


def _wait_for(paths: list[Path], timeout: float | None, poll: float) -> None:
    start = time.monotonic()
    while True:
        missing = [p for p in paths if finished_stats(p) is None]
        if not missing:
            return
        if timeout is not None and time.monotonic() - start > timeout:
            raise RuntimeError(f"{len(missing)} shards (e.g. {missing[0]}) still unfinished after {timeout:.0f} s; "
                               "rerun with --resume to finish them")
        time.sleep(poll)


def extract_features(in_dir: str | Path, out_dir: str | Path, config: FeatureConfig | None = None, *,
                     device: str | torch.device = "cpu", batch_size: int | None = None, workers: int | None = None,
                     resume: bool = False,
                     overwrite: bool = False, rank: int | None = None, world_size: int | None = None,
                     progress: bool = True, extractor: FeatureExtractor | None = None,
                     wait_timeout: float | None = None, poll_s: float = 2.0) -> dict | None:
    """Featurise every split of a prepared data set. Returns the manifest on rank 0, None on other ranks.

    ``rank``/``world_size`` default to torch.distributed or the RANK/WORLD_SIZE environment variables;
    ``extractor`` (a ready FeatureExtractor) replaces ``config``/``device``/``batch_size``/``workers``.
    """
    src, out = Path(in_dir), Path(out_dir)
    source_manifest = load_manifest(src)
    if source_manifest.get("kind") == FEATURES_KIND:
        raise ValueError(f"{src} is already a feature folder; give the image data set written by `dsalign prepare`")
    if src.resolve() == out.resolve():
        raise ValueError("the output folder must differ from the input folder")
    vocab_path = src / source_manifest.get("vocab", VOCAB_NAME)
    Vocabulary.load(vocab_path)  # copied at the end: checked before the work
    default_rank, default_world = dist_info()
    rank = default_rank if rank is None else rank
    world_size = default_world if world_size is None else world_size
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size}")
    _prepare_output(out, resume, overwrite, world_size)
    owned = extractor is None  # ours is closed after the shards; a caller's keeps its workers for its next call
    if extractor is None:
        extractor = _new_extractor(config or FeatureConfig(), process_device(device), batch_size, workers)
    settings = extractor.settings()

    jobs = [(split, rel) for split, info in sorted(source_manifest["splits"].items()) for rel in info["shards"]]
    todo = []
    for split, rel in jobs[rank::world_size]:
        stats = finished_stats(out / rel)
        if stats is None:
            todo.append((split, rel))
        else:
            _check_settings(out / rel, stats, settings)
    per_shard = {split: info["images"] / max(1, len(info["shards"]))
                 for split, info in source_manifest["splits"].items()}
    total = round(sum(per_shard[split] for split, _ in todo))
    desc = "features" if world_size == 1 else f"features rank {rank}/{world_size}"
    warned = False
    try:
        with tqdm(total=total, desc=desc, unit="img", disable=not progress) as bar:
            for _, rel in todo:
                (out / rel).parent.mkdir(parents=True, exist_ok=True)
                stats = ShardStats(input=rel, settings=settings)
                extractor.process_shard(str(src / rel), out / rel, stats, bar)
                if stats.images and stats.no_boxes == stats.images and not warned:  # the end check: hours away
                    log.warning("--regions given: none of the %d images of %s has boxes in the data (whole image "
                                "only); a split without any is refused at the end", stats.images, rel)
                    warned = True
    finally:
        if owned:  # before rank 0's wait for the other ranks, which may be long
            extractor.close()
    if rank != 0:
        return None
    _wait_for([out / rel for _, rel in jobs], wait_timeout, poll_s)
    return _write_feature_manifest(src, out, source_manifest, vocab_path, jobs, settings)


def _new_extractor(config: FeatureConfig, device: torch.device, batch_size: int | None, workers: int | None
                   ) -> FeatureExtractor:
    extractor = FeatureExtractor(config, device, batch_size, workers=workers)
    if device.type != "cpu" and not extractor.workers:
        log.warning("features: --workers 0: images are decoded and their regions proposed in this process, which "
                    "keeps the %s waiting", device.type.upper())
    return extractor


def _write_feature_manifest(src: Path, out: Path, source_manifest: dict, vocab_path: Path,
                            jobs: list[tuple[str, str]], settings: dict) -> dict:
    """The feature folder's manifest, written once every shard is done; the vocabulary is copied under the
    name the trainers read (whatever the source folder called it)."""
    tmp = out / f"{TMP_PREFIX}{VOCAB_NAME}"
    shutil.copyfile(vocab_path, tmp)
    os.replace(tmp, out / VOCAB_NAME)
    splits: dict[str, dict] = {}
    skipped: list[dict] = []
    for split, rel in jobs:
        stats = finished_stats(out / rel)
        assert stats is not None  # _wait_for guarantees it
        _check_settings(out / rel, stats, settings)
        entry = splits.setdefault(split, {"images": 0, "captions": 0, "no_boxes": 0, "shards": [],
                                          "skipped": Counter()})
        entry["images"] += stats["images"]
        entry["captions"] += stats["captions"]
        entry["no_boxes"] += stats.get("no_boxes", 0)  # stats written before the count existed: none known
        entry["shards"].append(rel)
        entry["skipped"].update(stats["skipped"])
        skipped.extend({"split": split, **s} for s in stats["skipped_samples"])
    for entry in splits.values():
        entry["skipped"] = dict(sorted(entry["skipped"].items()))
    _check_given_boxes(splits)
    manifest = {
        "kind": FEATURES_KIND,
        "name": source_manifest.get("name", src.name),
        "source": str(src.resolve()),
        "vocab": VOCAB_NAME,
        "vocab_size": source_manifest.get("vocab_size"),
        "backbone": settings["backbone"],
        "feature_dim": settings["feature_dim"],
        "feature_dtype": "float16",
        "region_source": settings["regions"],
        "top_k": settings["top_k"],
        "max_regions": settings["top_k"] + 1,
        "region_order": REGION_ORDER,
        "settings": settings,
        "splits": splits,
        "skipped": skipped,
    }
    write_manifest(out, manifest)
    return load_manifest(out)
