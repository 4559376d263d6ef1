"""draw_regions (Figure 7): boxes in their colours at their edges, labels on the image and in the legend, any
image mode, odd inputs (no regions, empty and very long phrases, bad boxes)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dsalign.viz import (
    ELLIPSIS,
    LINE,
    MAX_SIDE,
    MIN_WIDTH,
    PAD,
    draw_regions,
    fit_text,
    normalise_box,
    place_label,
    region_colour,
    region_label,
    region_picture_size,
    to_rgb,
)

REGIONS = [
    {"box": (0.1, 0.3, 0.45, 0.9), "phrase": "a red circle", "score": 0.91},
    {"box": (0.55, 0.35, 0.95, 0.85), "phrase": "a blue square", "score": -0.25},
]
SCALE = 4  # a 100 px wide image is scaled 4x to reach MIN_WIDTH


def _pixels(picture: Image.Image) -> np.ndarray:
    return np.asarray(picture.convert("RGB")).astype(int)


def _is(pixels: np.ndarray, colour: tuple[int, int, int]) -> np.ndarray:
    return (pixels == np.array(colour)).all(-1)


def _legend_row(pixels: np.ndarray, image_h: int, line: int) -> np.ndarray:
    y = image_h + PAD + line * LINE
    return pixels[y:y + LINE]


def test_boxes_drawn_in_their_colours_at_their_edges(tmp_path: Path) -> None:
    picture = draw_regions(Image.new("RGB", (100, 80), (255, 255, 255)), REGIONS, tmp_path / "r.png")
    labels = [region_label(r) for r in REGIONS]
    assert picture.size == region_picture_size(100, 80, labels)[:2] == (400, 320 + 2 * PAD + 2 * LINE)
    assert _pixels(Image.open(tmp_path / "r.png")).tolist() == _pixels(picture).tolist()
    pixels = _pixels(picture)
    for number, region in enumerate(REGIONS, 1):
        colour = region_colour(number)
        x0, y0, x1, y1 = (round(v * s) for v, s in zip(region["box"], (400, 320, 400, 320)))
        mid_y, mid_x = (y0 + y1) // 2, (x0 + x1) // 2
        assert _is(pixels[mid_y, x0:x0 + 3], colour).all() and _is(pixels[mid_y, x1 - 3:x1], colour).all()
        assert _is(pixels[y1 - 3:y1, mid_x], colour).all()  # bottom edge (the label may sit on the top one)
        assert not _is(pixels[mid_y, x0 + 4:x1 - 4], colour).any()  # an outline, not a filled box


def test_labels_on_the_image_and_in_the_legend() -> None:
    picture = draw_regions(Image.new("RGB", (100, 80), (255, 255, 255)), REGIONS)
    pixels = _pixels(picture)
    for number, region in enumerate(REGIONS, 1):
        colour = region_colour(number)
        x0, y0 = round(region["box"][0] * 400), round(region["box"][1] * 320)
        above = pixels[y0 - 14:y0, x0:x0 + 60]  # the label sits just above its box: filled with the colour
        assert _is(above, colour).sum() > 300 and (~_is(above, colour)).sum() > 30  # ... and has text on it
        row = _legend_row(pixels, 320, number - 1)
        assert _is(row[:, PAD:PAD + 12], colour).sum() >= 100  # swatch
        assert (row[:, PAD + 18:].sum(-1) < 300).sum() > 50  # dark legend text


def test_crowded_labels_do_not_overlap_and_stay_inside() -> None:
    bounds = (200, 150)
    for box, spots in (((50, 50, 120, 100), 4), ((10, 50, 190, 100), 8)):  # a wide box has left and right spots
        taken: list[tuple[int, int, int, int]] = []
        for _ in range(spots):  # labels for the same box: every one gets its own spot while spots remain
            rect = place_label((60, 17), box, bounds, taken)
            assert rect is not None
            assert min(rect[:2]) >= 0 and rect[2] <= bounds[0] and rect[3] <= bounds[1]
            assert all(rect[2] <= t[0] or t[2] <= rect[0] or rect[3] <= t[1] or t[3] <= rect[1] for t in taken)
            taken.append(rect)
        assert place_label((60, 17), box, bounds, taken) is None
    assert place_label((300, 17), (0, 0, 10, 10), bounds, []) is None  # wider than the picture: legend only
    # a box at the picture's top-left corner: its label goes inside, not off the picture
    assert place_label((40, 17), (0, 0, 50, 50), bounds, []) == (0, 3, 40, 20)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK", "I;16", "I", "F", "1", "LA"])
def test_any_image_mode(mode: str) -> None:
    image = Image.new(mode, (100, 80))
    picture = draw_regions(image, REGIONS)
    assert picture.mode == "RGB" and picture.size == draw_regions(Image.new("RGB", (100, 80)), REGIONS).size
    assert _is(_pixels(picture), region_colour(1)).sum() > 100


def test_transparency_goes_onto_white_and_arrays_work() -> None:
    assert np.asarray(to_rgb(Image.new("RGBA", (4, 4), (0, 0, 0, 0)))).min() == 255
    palette = Image.new("P", (4, 4), 0)
    palette.info["transparency"] = 0
    assert np.asarray(to_rgb(palette)).min() == 255
    assert np.asarray(to_rgb(np.full((4, 5), 0.5))).tolist() == [[[128] * 3] * 5] * 4  # float [0, 1]
    assert to_rgb(np.zeros((4, 5, 1), np.uint8)).size == (5, 4)
    assert to_rgb(np.zeros((4, 5, 4), np.uint8)).mode == "RGB"
    sixteen = Image.fromarray(np.array([[0, 1000], [2000, 4000]], dtype=np.uint16))
    assert np.asarray(to_rgb(sixteen))[..., 0].tolist() == [[0, 64], [128, 255]]  # stretched to 8 bits


def test_the_file_name_picks_the_format(tmp_path: Path) -> None:
    """`describe --out x.jpg` must write JPEG bytes, not PNG ones under a .jpg name; unknown suffixes get PNG."""
    image = Image.new("RGB", (100, 80), (255, 255, 255))
    for name, fmt in (("r.jpg", "JPEG"), ("r.png", "PNG"), ("r.picture", "PNG"), ("r.psd", "PNG"), ("r.xbm", "PNG")):
        draw_regions(image, REGIONS, tmp_path / name)
        assert Image.open(tmp_path / name).format == fmt


def test_no_regions_draws_the_image_and_a_note() -> None:
    picture = draw_regions(Image.new("RGB", (100, 80), (0, 90, 0)), [])
    assert picture.size == (400, 320 + 2 * PAD + LINE)
    pixels = _pixels(picture)
    assert _is(pixels[:320], (0, 90, 0)).all()
    assert (_legend_row(pixels, 320, 0).sum(-1) < 600).sum() > 30  # "(no regions)"


def test_empty_and_very_long_phrases() -> None:
    regions = [{"box": (0.1, 0.1, 0.5, 0.5), "phrase": "", "score": 0.5},
               {"box": (0.2, 0.2, 0.9, 0.9), "phrase": "word " * 5000, "score": None}]
    picture = draw_regions(Image.new("RGB", (100, 80), (255, 255, 255)), regions)
    assert picture.width == MAX_SIDE  # widened for the long phrase, but only up to MAX_SIDE
    pixels = _pixels(picture)
    assert (_legend_row(pixels, 320, 0)[:, PAD + 18:].sum(-1) < 300).sum() > 30  # "[1] (empty) (0.50)"
    assert (_legend_row(pixels, 320, 1)[:, -PAD - 20:].sum(-1) < 300).sum() > 0  # text runs to the right margin
    cut = fit_text("word " * 5000, 300)
    assert cut.endswith(ELLIPSIS) and len(cut) < 100
    assert fit_text("short", 300) == "short" and fit_text("anything", 2) == ""


def test_image_sizes_are_bounded() -> None:
    big = draw_regions(Image.new("RGB", (3000, 2000)), REGIONS)
    assert big.width == MAX_SIDE and big.height == round(2000 * MAX_SIDE / 3000) + 2 * PAD + 2 * LINE
    strip = draw_regions(Image.new("RGB", (1, 900)), REGIONS)  # not scaled 384x to 345,600 px tall
    assert strip.width == MIN_WIDTH and strip.height == 900 + 2 * PAD + 2 * LINE


def test_boxes_are_normalised() -> None:
    assert normalise_box((0.9, 1.5, -0.2, 0.1)) == (0.0, 0.1, 0.9, 1.0)
    assert normalise_box(None) == (0.0, 0.0, 1.0, 1.0)
    assert normalise_box(np.array([0.1, float("nan"), 0.3, 0.4])) == (0.1, 0.0, 0.3, 0.4)
    with pytest.raises(ValueError, match="4 numbers"):
        normalise_box((0.1, 0.2))

    class Region:  # the API's dataclasses work as well as dicts
        box, phrase, score = (0.5, 0.5, 0.5, 0.5), "a dot", 1
    picture = draw_regions(Image.new("RGB", (100, 80)), [Region()])  # a zero-size box still draws
    assert _is(_pixels(picture), region_colour(1)).sum() > 0
