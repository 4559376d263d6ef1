"""Region proposals: where the CNN looks in each image (paper Eq. 1 uses the top 19 detections + the image).

Every source returns candidate boxes in normalised [x0, y0, x1, y1] coordinates (image width/height = 1).
:func:`select_regions` then turns candidates into the stored region list, whose order is fixed:

* region 0 is always the whole image [0, 0, 1, 1];
* regions 1..K are the candidates in descending score, after dropping boxes narrower or lower than
  ``min_side`` and near-duplicates (NMS at ``nms_iou``, with the whole image taking part, so a proposal that
  is almost the whole image is dropped too), cut at ``top_k``.

Sources: ``given`` (the data set's own boxes, passed through exactly, in their order, no filtering),
``grid`` (a fixed multi-scale grid), ``selective-search`` (OpenCV, one hierarchy or fast mode, on a
downscaled image) and ``detector`` (a torchvision Faster R-CNN loaded from a local weights file; nothing is
ever downloaded).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from dsalign.data.pipeline import SampleError
from dsalign.features.backbones import load_state_dict_file

WHOLE_IMAGE = (0.0, 0.0, 1.0, 1.0)
REGION_SOURCES = ("given", "grid", "selective-search", "detector")
# Selective search strategies (see SelectiveSearch): "single" is the default, "fast" is OpenCV's fast mode.
PROPOSAL_MODES = ("single", "fast")
DETECTORS = (
    "fasterrcnn_mobilenet_v3_large_fpn",
    "fasterrcnn_mobilenet_v3_large_320_fpn",
    "fasterrcnn_resnet50_fpn",
    "fasterrcnn_resnet50_fpn_v2",
)
# Selective search proposals that overlap this much count as support for each other (see SelectiveSearch).
_SUPPORT_IOU = 0.7


@dataclass
class Proposals:
    """Candidate boxes of one image. ``scores`` None means "already final, keep as given" (``given`` source)."""

    boxes: np.ndarray  # float64 [N, 4], normalised
    scores: np.ndarray | None = None  # [N], higher is better


def select_regions(proposals: Proposals, top_k: int, min_side: float = 0.05, nms_iou: float = 0.5) -> np.ndarray:
    """The stored region boxes [R, 4] (R <= top_k + 1): whole image first, then the best candidates.

    Ties in score are broken by the box coordinates, so the result never depends on the candidates' order.
    """
    whole = np.asarray([WHOLE_IMAGE], dtype=np.float64)
    boxes = np.clip(np.asarray(proposals.boxes, dtype=np.float64).reshape(-1, 4), 0.0, 1.0)
    if proposals.scores is None:
        return np.concatenate([whole, boxes[:top_k]])
    scores = np.asarray(proposals.scores, dtype=np.float64).reshape(-1)
    keep = ((boxes[:, 2] - boxes[:, 0]) >= min_side) & ((boxes[:, 3] - boxes[:, 1]) >= min_side)
    keep &= np.isfinite(scores) & np.isfinite(boxes).all(axis=1)
    boxes, scores = boxes[keep], scores[keep]
    order = np.lexsort((boxes[:, 3], boxes[:, 2], boxes[:, 1], boxes[:, 0], -scores))
    ranked = np.concatenate([whole, boxes[order]])
    from torchvision.ops import nms  # here: torchvision's import costs every CLI command a second

    # NMS sees strictly decreasing scores in our order, so its result is deterministic.
    rank_scores = torch.arange(len(ranked), 0, -1, dtype=torch.float32)
    kept = nms(torch.from_numpy(ranked).float(), rank_scores, nms_iou).sort().values.numpy()
    kept = kept[kept > 0][:top_k]
    return np.concatenate([whole, ranked[kept]])


class RegionSource:
    """Proposes candidate boxes for a batch of images. ``metas`` are the samples' JSON metadata.

    ``per_image`` sources work image by image (so worker processes can run them alongside the CNN); the
    detector works on whole batches.
    """

    name = ""
    per_image = True

    def propose(self, image: Image.Image, meta: dict) -> Proposals:
        raise NotImplementedError

    def propose_or_error(self, image: Image.Image, meta: dict) -> Proposals | SampleError:
        """Like :meth:`propose`, with an unusable image's SampleError returned (skipped, counted) not raised."""
        try:
            return self.propose(image, meta)
        except SampleError as exc:
            return exc

    def propose_batch(self, images: Sequence[Image.Image], metas: Sequence[dict]) -> list[Proposals | SampleError]:
        return [self.propose_or_error(image, meta) for image, meta in zip(images, metas)]


class GivenRegions(RegionSource):
    """The data set's own boxes (e.g. the shapes objects), so region i+1 is ground-truth box i."""

    name = "given"

    def propose(self, image: Image.Image, meta: dict) -> Proposals:
        boxes = meta.get("boxes") or []
        try:
            array = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        except (TypeError, ValueError) as exc:
            raise SampleError("bad_boxes", str(exc)) from exc
        if not np.isfinite(array).all() or (array < 0).any() or (array > 1).any():
            raise SampleError("bad_boxes", "coordinate outside [0, 1]")
        if (array[:, 2] <= array[:, 0]).any() or (array[:, 3] <= array[:, 1]).any():
            raise SampleError("bad_boxes", "empty box")
        return Proposals(np.asarray(boxes, dtype=np.float64).reshape(-1, 4))


def grid_boxes(count: int) -> np.ndarray:
    """``count`` boxes from a pyramid of n x n grids (n = 2, 3, ...): whole levels while they fit, then the
    next level's cells nearest the image centre (where photographed objects usually are)."""
    cells: list[list[float]] = []
    n = 2
    while len(cells) < count:
        level = [[c / n, r / n, (c + 1) / n, (r + 1) / n] for r in range(n) for c in range(n)]
        if len(cells) + len(level) > count:
            level.sort(key=lambda b: ((b[0] + b[2] - 1) ** 2 + (b[1] + b[3] - 1) ** 2, b[1], b[0]))
        cells.extend(level[: count - len(cells)])
        n += 1
    return np.asarray(cells, dtype=np.float64).reshape(-1, 4)


class GridRegions(RegionSource):
    """A fixed grid: no image content used, the cheapest source, and a baseline for the others."""

    name = "grid"

    def __init__(self, count: int):
        boxes = grid_boxes(count)
        self._proposals = Proposals(boxes, np.arange(len(boxes), 0, -1, dtype=np.float64))

    def propose(self, image: Image.Image, meta: dict) -> Proposals:
        return self._proposals


class SelectiveSearch(RegionSource):
    """OpenCV selective search on a copy whose longer side is ``max_side`` pixels.

    ``mode`` "single" (default): one graph segmentation of the HSV image (k = 200, sigma = 0.5, segments of at
    least 1/300 of the copy's pixels), merged once by colour + fill + size similarity. "fast": OpenCV's fast
    mode, 12 hierarchies (HSV and Lab x k = 150, 300, 450 x two merge strategies, one with texture), segments
    of >= 100 pixels. On shapes scenes "single" at 64 px recalls every object that "fast" at 96 px does, for
    a fifteenth of the CPU time: OpenCV's fixed 100-pixel minimum segment, not the single hierarchy, is what
    made small proposal images miss objects (docs/features.md has the measurements).

    OpenCV ranks its output with an unseedable random number, so we rank instead by *support*: how many
    other proposals overlap a box at IoU >= 0.7 (a region that survives several merges or is found by several
    segmentations is a stable, object-like region), ties by larger area. Deterministic for the same image.
    """

    name = "selective-search"
    single_k = 200.0
    single_sigma = 0.5
    single_min_fraction = 1 / 300  # minimum segment, as a fraction of the proposal image's pixels

    def __init__(self, max_side: int = 64, mode: str = PROPOSAL_MODES[0]):
        import cv2  # imported where used, not kept: a module attribute would stop the source pickling

        if not hasattr(cv2, "ximgproc"):
            raise RuntimeError("selective search needs opencv-contrib (pip install opencv-contrib-python-headless)")
        if mode not in PROPOSAL_MODES:
            raise ValueError(f"unknown selective search mode {mode!r} (choose from: {', '.join(PROPOSAL_MODES)})")
        self.max_side = max_side
        self.mode = mode

    def _search(self, bgr: np.ndarray) -> Any:
        """A configured OpenCV segmentation object, one per call."""
        import cv2

        segmentation = cv2.ximgproc.segmentation
        search = segmentation.createSelectiveSearchSegmentation()
        search.setBaseImage(bgr)
        if self.mode == "fast":
            search.switchToSelectiveSearchFast()
            return search
        search.clearImages()
        search.clearGraphSegmentations()
        search.clearStrategies()
        search.addImage(cv2.cvtColor(bgr, cv2.COLOR_BGR2HSV))
        min_size = max(1, round(bgr.shape[0] * bgr.shape[1] * self.single_min_fraction))
        search.addGraphSegmentation(segmentation.createGraphSegmentation(self.single_sigma, self.single_k, min_size))
        strategy = segmentation.createSelectiveSearchSegmentationStrategyMultiple()
        for part in (segmentation.createSelectiveSearchSegmentationStrategyColor(),
                     segmentation.createSelectiveSearchSegmentationStrategyFill(),
                     segmentation.createSelectiveSearchSegmentationStrategySize()):
            strategy.addStrategy(part, 1 / 3)
        search.addStrategy(strategy)
        return search

    def propose(self, image: Image.Image, meta: dict) -> Proposals:
        import cv2

        scale = self.max_side / max(image.size)
        if scale < 1:
            size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
            image = image.resize(size, Image.Resampling.BILINEAR)
        bgr = np.ascontiguousarray(np.asarray(image)[:, :, ::-1])
        try:
            rects = np.asarray(self._search(bgr).process(), dtype=np.float64).reshape(-1, 4)
        except cv2.error as exc:
            raise SampleError("bad_regions", str(exc).strip().splitlines()[-1]) from exc
        width, height = image.size
        boxes = np.stack([rects[:, 0] / width, rects[:, 1] / height,
                          (rects[:, 0] + rects[:, 2]) / width, (rects[:, 1] + rects[:, 3]) / height], axis=1)
        if len(boxes) == 0:
            return Proposals(boxes, np.zeros(0))
        from torchvision.ops import box_iou

        tensor = torch.from_numpy(boxes)
        support = (box_iou(tensor, tensor) >= _SUPPORT_IOU).sum(dim=1).double().numpy()
        area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        return Proposals(boxes, support + 0.5 * area)  # area < 1, so it only breaks ties in support


class DetectorRegions(RegionSource):
    """A torchvision Faster R-CNN built without any download (weights=None, weights_backbone=None) and
    loaded from a local state-dict file; the class count is read from the file, so custom detectors work.
    Detections of all classes are pooled and ranked by score; select_regions removes cross-class duplicates.
    """

    name = "detector"
    per_image = False

    def __init__(self, weights: str | Path, arch: str = DETECTORS[0], device: str | torch.device = "cpu",
                 min_size: int | None = None, score_thresh: float = 0.05):
        import torchvision.models.detection as detection

        if arch not in DETECTORS:
            raise ValueError(f"unknown detector {arch!r} (choose from: {', '.join(DETECTORS)})")
        state = load_state_dict_file(weights)
        key = "roi_heads.box_predictor.cls_score.weight"
        if key not in state:
            raise ValueError(f"{weights} is not a Faster R-CNN state dict (no {key})")
        kwargs: dict = {"num_classes": int(state[key].shape[0]), "box_score_thresh": score_thresh}
        if min_size is not None:  # keep torchvision's 800:1333 shorter:longer side limits
            kwargs.update(min_size=min_size, max_size=max(min_size, round(min_size * 1333 / 800)))
        model = getattr(detection, arch)(weights=None, weights_backbone=None, **kwargs)
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            raise ValueError(f"{weights} does not fit {arch}: {str(exc).splitlines()[0]}") from exc
        self.model = model.eval().to(device)
        self.device = torch.device(device)
        self.arch = arch

    @torch.inference_mode()
    def propose_batch(self, images: Sequence[Image.Image], metas: Sequence[dict]) -> list[Proposals | SampleError]:
        tensors = [torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1).to(self.device).float().div_(255)
                   for im in images]
        outputs = self.model(tensors)
        results: list[Proposals | SampleError] = []
        for image, out in zip(images, outputs):
            scale = torch.tensor([image.width, image.height, image.width, image.height], device=self.device)
            boxes = (out["boxes"] / scale).double().cpu().numpy()
            results.append(Proposals(boxes, out["scores"].double().cpu().numpy()))
        return results


def make_region_source(name: str, top_k: int, *, proposal_side: int = 64, proposal_mode: str = PROPOSAL_MODES[0],
                       detector_weights: str | Path | None = None, detector: str = DETECTORS[0],
                       detector_size: int | None = None, detector_score: float = 0.05,
                       device: str | torch.device = "cpu") -> RegionSource:
    """Build a region source by its command-line name."""
    if name == "given":
        return GivenRegions()
    if name == "grid":
        return GridRegions(top_k)
    if name == "selective-search":
        return SelectiveSearch(proposal_side, proposal_mode)
    if name == "detector":
        if detector_weights is None:
            raise ValueError("--regions detector needs --detector-weights FILE (a torchvision state dict)")
        return DetectorRegions(detector_weights, detector, device, detector_size, detector_score)
    raise ValueError(f"unknown region source {name!r} (choose from: {', '.join(REGION_SOURCES)})")
