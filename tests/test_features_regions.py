"""Region sources on synthetic scenes whose object boxes are known (the shapes data set)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from torchvision.ops import box_iou

from dsalign.data.pipeline import SampleError
from dsalign.data.shapes import generate_shapes
from dsalign.features.extract import FeatureConfig
from dsalign.features.regions import (
    DetectorRegions,
    GivenRegions,
    GridRegions,
    Proposals,
    SelectiveSearch,
    grid_boxes,
    make_region_source,
    select_regions,
)

TOP_K = 19


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def scenes() -> list[tuple[Image.Image, dict]]:
    records = generate_shapes(12, "train", seed=3, image_size=128)
    return [(Image.open(io.BytesIO(r.image_bytes)).convert("RGB"), {"boxes": r.boxes}) for r in records]


def _assert_valid(regions: np.ndarray, top_k: int = TOP_K) -> None:
    assert regions.ndim == 2 and regions.shape[1] == 4 and 1 <= len(regions) <= top_k + 1
    assert regions[0].tolist() == [0.0, 0.0, 1.0, 1.0]
    assert (regions >= 0).all() and (regions <= 1).all()
    assert (regions[:, 2] > regions[:, 0]).all() and (regions[:, 3] > regions[:, 1]).all()


def test_select_keeps_whole_image_first_and_drops_tiny_and_duplicate_boxes():
    boxes = np.array([[0.1, 0.1, 0.5, 0.5],  # best
                      [0.11, 0.1, 0.5, 0.51],  # near-duplicate of the best
                      [0.0, 0.0, 0.99, 1.0],  # near-duplicate of the whole image
                      [0.6, 0.6, 0.62, 0.9],  # too narrow
                      [0.5, 0.5, 0.9, 0.9],
                      [0.2, 0.6, 0.4, 0.95]])
    scores = np.array([0.9, 0.8, 0.95, 0.99, 0.5, 0.4])
    regions = select_regions(Proposals(boxes, scores), top_k=2, min_side=0.05, nms_iou=0.5)
    assert regions.tolist() == [[0, 0, 1, 1], boxes[0].tolist(), boxes[4].tolist()]


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 1), st.floats(0, 1), st.floats(0, 1), st.floats(0, 1), st.integers(0, 3)),
                max_size=30), st.integers(0, 8), st.randoms(use_true_random=False))
def test_select_is_valid_and_independent_of_candidate_order(raw, top_k, rng):
    boxes = np.array([[min(a, c), min(b, d), max(a, c), max(b, d)] for a, b, c, d, _ in raw]).reshape(-1, 4)
    scores = np.array([s for *_, s in raw], dtype=float)  # many ties
    regions = select_regions(Proposals(boxes, scores), top_k, min_side=0.05, nms_iou=0.5)
    _assert_valid(regions, top_k)
    order = list(range(len(boxes)))
    rng.shuffle(order)
    again = select_regions(Proposals(boxes[order], scores[order]), top_k, min_side=0.05, nms_iou=0.5)
    assert np.array_equal(regions, again)


def test_given_boxes_pass_through_exactly(scenes):
    source = GivenRegions()
    for image, meta in scenes:
        regions = select_regions(source.propose(image, meta), TOP_K)
        assert regions[1:].tolist() == meta["boxes"]  # same numbers, same order, nothing filtered
        _assert_valid(regions)
    assert select_regions(source.propose(image, {}), TOP_K).tolist() == [[0, 0, 1, 1]]
    results = source.propose_batch([image, image], [{"boxes": [[0.5, 0.1, 0.2, 0.9]]}, {"boxes": [[0, 0, 2, 1]]}])
    assert [r.reason for r in results if isinstance(r, SampleError)] == ["bad_boxes", "bad_boxes"]


def test_grid_is_a_centre_first_pyramid():
    boxes = grid_boxes(TOP_K)
    assert len(boxes) == TOP_K and len({tuple(b) for b in boxes}) == TOP_K
    assert boxes[:4].tolist() == [[0, 0, 0.5, 0.5], [0.5, 0, 1, 0.5], [0, 0.5, 0.5, 1], [0.5, 0.5, 1, 1]]
    centre_cells = {(0.25, 0.25, 0.5, 0.5), (0.5, 0.25, 0.75, 0.5), (0.25, 0.5, 0.5, 0.75), (0.5, 0.5, 0.75, 0.75)}
    assert {tuple(b) for b in boxes[13:17]} == centre_cells  # the 4 x 4 level starts at the centre
    regions = select_regions(GridRegions(TOP_K).propose(Image.new("RGB", (8, 8)), {}), TOP_K)
    _assert_valid(regions)
    assert len(regions) == TOP_K + 1


@pytest.mark.parametrize(("mode", "side"), [(None, None), ("fast", 96)])
def test_selective_search_finds_the_objects_deterministically(scenes, mode, side):
    """The default (one HSV hierarchy at 64 px) must find the objects as well as OpenCV's fast mode at 96 px;
    with OpenCV's fixed 100-pixel minimum segment it would find only about half of them at 64 px."""
    kwargs = {} if mode is None else {"proposal_mode": mode, "proposal_side": side}
    source = make_region_source("selective-search", TOP_K, **kwargs)
    assert isinstance(source, SelectiveSearch)
    found = total = 0
    for image, meta in scenes[:8]:
        regions = select_regions(source.propose(image, meta), TOP_K)
        _assert_valid(regions)
        assert np.array_equal(regions, select_regions(source.propose(image, meta), TOP_K))
        best = box_iou(torch.tensor(meta["boxes"]), torch.from_numpy(regions)).max(dim=1).values
        found += int((best >= 0.5).sum())
        total += len(meta["boxes"])
    assert found >= 0.95 * total, f"selective search recalled {found} of {total} objects at IoU 0.5"


def test_proposal_mode_is_checked_and_recorded_only_for_selective_search():
    with pytest.raises(ValueError, match="unknown selective search mode"):
        SelectiveSearch(64, "slow")
    with pytest.raises(ValueError, match="proposal_mode must be one of"):
        FeatureConfig(proposal_mode="slow")
    assert FeatureConfig().fingerprint()["proposal_mode"] == "single"
    assert "proposal_mode" not in FeatureConfig(regions="grid").fingerprint()
    # Folders made with the former default (fast mode at 96 px, before the option existed) still resume.
    former = FeatureConfig(proposal_mode="fast", proposal_side=96).fingerprint()
    assert "proposal_mode" not in former and former["proposal_side"] == 96


def test_detector_loads_local_weights_and_yields_normalised_boxes(tmp_path, scenes):
    torch.manual_seed(0)
    arch = "fasterrcnn_mobilenet_v3_large_320_fpn"
    model = getattr(torchvision.models.detection, arch)(weights=None, weights_backbone=None, num_classes=3)
    path = tmp_path / "detector.pt"
    torch.save(model.state_dict(), path)
    source = make_region_source("detector", TOP_K, detector_weights=path, detector=arch, detector_size=128,
                                detector_score=0.0)
    assert isinstance(source, DetectorRegions)
    images = [scenes[0][0], scenes[1][0].resize((96, 128))]
    results = source.propose_batch(images, [{}, {}])
    for proposals in results:
        assert isinstance(proposals, Proposals) and len(proposals.boxes) > 0  # untrained, but plumbed
        assert (proposals.boxes >= 0).all() and (proposals.boxes <= 1).all()
        _assert_valid(select_regions(proposals, TOP_K))
    with pytest.raises(ValueError, match="needs --detector-weights"):
        make_region_source("detector", TOP_K)
    with pytest.raises(ValueError, match="not a Faster R-CNN"):
        DetectorRegions(_save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "other.pt"))


def _save(state: dict, path):
    torch.save(state, path)
    return path
