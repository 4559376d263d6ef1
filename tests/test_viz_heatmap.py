"""draw_similarity_heatmap: layout, colours, the row-argmax marker, axis labels, the colour scale, odd inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dsalign.viz import (
    BAR_H,
    NAN_COLOUR,
    NEGATIVE,
    PAD,
    POSITIVE,
    diverging_colours,
    draw_similarity_heatmap,
    heatmap_layout,
    row_argmax,
)

WORDS = ["a", "red", "circle", "left", "of", "squares"]
LABELS = ["whole image", "red circle", "blue square"]
SIM = np.array([[0.1, 0.5, -0.2],
                [0.0, 2.0, 0.3],
                [-1.0, 1.5, 1.6],
                [3.0, -2.0, 0.0],
                [-0.5, -0.4, -0.3],
                [0.2, 0.2, 1.9]])
BLACK = (0, 0, 0)


def _pixels(picture: Image.Image) -> np.ndarray:
    return np.asarray(picture).astype(int)


def _edges(pixels: np.ndarray, cell: tuple[int, int, int, int]) -> np.ndarray:
    x0, y0, x1, y1 = cell
    return np.concatenate([pixels[y0, x0:x1 + 1], pixels[y1, x0:x1 + 1], pixels[y0:y1 + 1, x0], pixels[y0:y1 + 1, x1]])


def test_argmax_marker_on_each_rows_best_cell(tmp_path: Path) -> None:
    picture = draw_similarity_heatmap(WORDS, LABELS, SIM, tmp_path / "h.png")
    layout = heatmap_layout(WORDS, LABELS, SIM)
    assert picture.size == (layout.width, layout.height) == Image.open(tmp_path / "h.png").size
    assert row_argmax(SIM) == [1, 1, 2, 0, 2, 2]
    pixels = _pixels(picture)
    for row in range(len(WORDS)):
        for col in range(len(LABELS)):
            edges = (_edges(pixels, layout.cell(row, col)) == BLACK).all(-1)
            assert edges.all() if col == row_argmax(SIM)[row] else not edges.any(), (row, col)


def test_cell_colours_follow_the_values() -> None:
    pixels = _pixels(draw_similarity_heatmap(WORDS, LABELS, SIM))
    layout = heatmap_layout(WORDS, LABELS, SIM)

    def colour(row: int, col: int) -> list[int]:
        x0, _, _, y1 = layout.cell(row, col)
        return pixels[y1 - 3, x0 + 3].tolist()  # below the value text, inside the marker

    assert colour(3, 0) == list(POSITIVE)  # the largest value (3.0 = vmax) is full red
    assert colour(3, 1) == diverging_colours(np.array([-2.0]), 3.0)[0].tolist()
    assert colour(1, 0) == [255, 255, 255]  # 0 is white
    r, g, b = colour(2, 0)
    assert b > r  # negative: blue side


def test_axis_labels_and_colour_scale_are_drawn() -> None:
    pixels = _pixels(draw_similarity_heatmap(WORDS, LABELS, SIM))
    layout = heatmap_layout(WORDS, LABELS, SIM)
    for row in range(len(WORDS)):  # each word, right-aligned left of its row
        y0 = layout.top + row * layout.cell_h
        assert (pixels[y0:y0 + layout.cell_h, :layout.left].sum(-1) < 300).sum() > 5
    for col in range(len(LABELS)):  # each region label, written upwards above its column
        x0 = layout.left + col * layout.cell_w
        assert (pixels[:layout.top, x0:x0 + layout.cell_w].sum(-1) < 300).sum() > 30
    bar_y = layout.grid_bottom + PAD + BAR_H // 2
    assert pixels[bar_y, PAD].tolist() == list(NEGATIVE) and pixels[bar_y, PAD + 199].tolist() == list(POSITIVE)
    assert (pixels[bar_y + BAR_H:].sum(-1) < 300).sum() > 100  # the scale's numbers and the key


def test_tensors_nan_and_wrong_shapes() -> None:
    tensor = torch.tensor(SIM, dtype=torch.float16, requires_grad=False)
    assert draw_similarity_heatmap(WORDS, LABELS, tensor).size == draw_similarity_heatmap(WORDS, LABELS, SIM).size
    with_nan = SIM.copy()
    with_nan[0, :] = np.nan
    with_nan[1, 0] = np.inf
    assert row_argmax(with_nan)[:2] == [None, 1]
    pixels = _pixels(draw_similarity_heatmap(WORDS, LABELS, with_nan))
    layout = heatmap_layout(WORDS, LABELS, with_nan)
    assert not (_edges(pixels, layout.cell(0, 1)) == BLACK).all(-1).any()  # no marker in an all-NaN row
    x0, _, _, y1 = layout.cell(0, 0)
    assert pixels[y1 - 3, x0 + 3].tolist() == list(NAN_COLOUR)
    with pytest.raises(ValueError, match=r"expected \[n_words, n_regions\] = \[6, 2\]"):
        draw_similarity_heatmap(WORDS, LABELS[:2], SIM)


@pytest.mark.parametrize(("words", "labels"), [([], LABELS), (WORDS, []), ([], [])])
def test_empty_axes(words: list[str], labels: list[str]) -> None:
    picture = draw_similarity_heatmap(words, labels, np.zeros((len(words), len(labels))))
    layout = heatmap_layout(words, labels, [])
    assert picture.size == (layout.width, layout.height)
    note = _pixels(picture)[layout.top:layout.top + 20, layout.left:]
    assert (note.sum(-1) < 600).sum() > 20  # "(no words)" / "(no regions)"


def test_long_labels_are_cut() -> None:
    long_words = ["w" * 300, "ok"]
    layout = heatmap_layout(long_words, ["r" * 500], np.zeros((2, 1)))
    assert layout.left < 200 and layout.top < 200 and layout.width < 500
    assert draw_similarity_heatmap(long_words, ["r" * 500], np.ones((2, 1))).size == (layout.width, layout.height)
