"""Pictures: aligned snippets (:func:`draw_alignment`), region descriptions (:func:`draw_regions`, the paper's
Figure 7) and word x region similarities (:func:`draw_similarity_heatmap`).

Each region gets one colour, used for its box and for every phrase or snippet that belongs to it, so "which
words went to which box" reads at a glance. Region 0 is the whole image. Inputs are plain data (dicts or any
object with the named attributes), so the inference API and the report can call these without the model code.
PIL only; text uses PIL's default (FreeType) font.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

PALETTE = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
           (240, 50, 230), (210, 245, 60), (0, 128, 128), (170, 110, 40), (128, 0, 0), (0, 0, 128)]
WHOLE_IMAGE_COLOUR = (128, 128, 128)
MIN_WIDTH = 384  # small images (shapes: 128 px) are scaled up by an integer factor to at least this width
MAX_SIDE = 1024  # draw_regions / the report scale larger images down so labels stay readable and files small
FONT_SIZE = 14
LINE = 20  # pixels per snippet line
PAD = 6
WHITE = (255, 255, 255)
TEXT = (33, 33, 33)
MUTED = (120, 120, 120)
ELLIPSIS = "\u2026"

Colour = tuple[int, int, int]
Box = tuple[float, float, float, float]


def region_colour(region: int) -> Colour:
    """Region 0 (the whole image) is gray; the others cycle through a high-contrast palette."""
    return WHOLE_IMAGE_COLOUR if region == 0 else PALETTE[(region - 1) % len(PALETTE)]


def ink(colour: Colour) -> Colour:
    """Black or white, whichever reads on ``colour`` (white is unreadable on the palette's lime and cyan)."""
    r, g, b = colour
    return (0, 0, 0) if 0.299 * r + 0.587 * g + 0.114 * b > 150 else WHITE


def _font(size: int = FONT_SIZE) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def _label(region: int, text: str) -> str:
    return f"[{region}] {text}"


def get_field(item: Any, name: str, default: Any = None) -> Any:
    """``item[name]`` for mappings, else ``item.name``: callers pass dicts or the API's dataclasses alike."""
    if isinstance(item, Mapping):
        return item.get(name, default)
    return getattr(item, name, default)


def fit_text(text: str, max_px: float, font: ImageFont.FreeTypeFont | None = None) -> str:
    """``text`` on one line, cut with an ellipsis to at most ``max_px`` pixels (user phrases can be any length)."""
    font = font or _font()
    text = " ".join(str(text).split())[:400]  # one line; nothing longer than 400 characters fits anyway
    if font.getlength(text) <= max_px:
        return text
    low, high = 0, len(text)
    while low < high:  # the longest prefix that fits together with the ellipsis
        mid = (low + high + 1) // 2
        if font.getlength(text[:mid].rstrip() + ELLIPSIS) <= max_px:
            low = mid
        else:
            high = mid - 1
    return text[:low].rstrip() + ELLIPSIS if low else ""


def _array_image(array: np.ndarray) -> Image.Image:
    """An array as an image: floats in [0, 1] are scaled to 0-255, anything else is clipped to it."""
    data = np.asarray(array)
    if data.ndim == 3 and data.shape[2] == 1:
        data = data[..., 0]
    if data.dtype != np.uint8:
        data = np.nan_to_num(data.astype(np.float64))
        if data.size and data.max() <= 1.0 and data.dtype.kind == "f":
            data = data * 255.0
        data = np.clip(np.rint(data), 0, 255).astype(np.uint8)
    return Image.fromarray(data)


class ImageTooLarge(ValueError):
    """PIL's decompression-bomb guard refused a file; a ValueError, so callers that skip unreadable images
    skip this one too instead of crashing on PIL's own exception class."""


def open_image(path: str | Path) -> Image.Image:
    """The decoded image at ``path``; :class:`ImageTooLarge` ("image too large (196 MP)") past PIL's pixel
    limit (``Image.MAX_IMAGE_PIXELS``, where PIL only warns: the limit data preparation and feature extraction
    apply too, see ``dsalign.data.images.decode_rgb``)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as opened:
                return opened.copy()
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        pixels = re.search(r"\((\d+) pixels\)", str(exc))  # PIL's message is the only place holding the size
        size = f"{int(pixels[1]) / 1e6:.0f} MP" if pixels else f"over {Image.MAX_IMAGE_PIXELS / 1e6:.0f} MP"
        raise ImageTooLarge(f"image too large ({size})") from exc


def to_rgb(image: Image.Image | np.ndarray | str | Path) -> Image.Image:
    """Any PIL mode (L, RGBA, P, CMYK, I;16, F, ...), array or image path as RGB. Transparency goes onto
    white, not black, so dark boxes and text stay visible; 16-bit and float images are stretched to 8 bits."""
    if isinstance(image, (str, Path)):
        image = open_image(image)
    if isinstance(image, np.ndarray):
        image = _array_image(image)
    if image.mode in ("I", "F") or image.mode.startswith("I;"):
        values = np.asarray(image, dtype=np.float64)
        top = values.max() if values.size else 0.0
        image = _array_image(values / top if top > 0 else values)
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, WHITE + (255,)), rgba).convert("RGB")
    return image.convert("RGB")


def display_scale(width: int, height: int, max_side: int | None = None) -> float:
    """Factor a picture shows an image at: small images grow by an integer factor (crisp pixels) to at least
    MIN_WIDTH; with ``max_side`` the longest side stays within it (huge photos shrink, thin strips don't grow)."""
    scale = max(1, -(-MIN_WIDTH // max(1, width)))
    if max_side is None:
        return scale
    longest = max(width, height, 1)
    if longest > max_side:
        return max_side / longest
    return min(scale, max(1, max_side // longest))


def _scaled(image: Image.Image, scale: float) -> Image.Image:
    if scale == 1:
        return image
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.NEAREST if scale > 1 else Image.Resampling.LANCZOS)


def fit_image(image: Image.Image | np.ndarray | str | Path, max_side: int | None = MAX_SIDE) -> Image.Image:
    """The image as the pictures show it: RGB, scaled by :func:`display_scale`."""
    base = to_rgb(image)
    return _scaled(base, display_scale(base.width, base.height, max_side))


def _save(picture: Image.Image, out_png: str | Path | None) -> None:
    """PNG, unless the name asks for another format PIL writes (``x.jpg``: JPEG bytes, not PNG ones; formats PIL
    only reads, such as ``.psd``, get PNG)."""
    if out_png is not None:
        out = Path(out_png)
        out.parent.mkdir(parents=True, exist_ok=True)
        fmt = Image.registered_extensions().get(out.suffix.lower(), "PNG")
        fmt = fmt if fmt in ("JPEG", "WEBP", "TIFF", "BMP", "GIF") else "PNG"  # those write RGB as it is
        picture.convert("RGB").save(out, format=fmt)


def _tag(draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, colour: Colour) -> None:
    """A label: ``text`` on a box filled with its region's colour, in the ink that reads on it."""
    font = _font()
    draw.rectangle(draw.textbbox(xy, text, font=font), fill=colour)
    draw.text(xy, text, fill=ink(colour), font=font)


def _pixel_box(box: Sequence[float], width: int, height: int) -> tuple[int, int, int, int]:
    """A normalised box as inclusive pixel corners, never inverted (PIL rejects x1 < x0)."""
    x0, y0 = round(box[0] * width), round(box[1] * height)
    return x0, y0, max(x0, round(box[2] * width) - 1), max(y0, round(box[3] * height) - 1)


def picture_size(width: int, height: int, snippets: Sequence[tuple[int, str]],
                 max_side: int | None = None) -> tuple[int, int]:
    """Size of the PNG :func:`draw_alignment` writes for a ``width`` x ``height`` image: the image scaled by
    :func:`display_scale`, widened when a label is longer, plus one line per snippet."""
    scale = display_scale(width, height, max_side)
    img_w, img_h = max(1, round(width * scale)), max(1, round(height * scale))
    font = _font()
    text_w = max((int(font.getlength(_label(r, t))) for r, t in snippets), default=0) + 2 * PAD + 18
    return max(img_w, text_w), img_h + len(snippets) * LINE + 2 * PAD


def render_alignment(image: Image.Image | np.ndarray | str | Path, boxes: Sequence[Sequence[float]],
                     snippets: Sequence[tuple[int, str]], max_side: int | None = None) -> Image.Image:
    """The picture :func:`draw_alignment` saves: ``boxes`` (normalised [x0, y0, x1, y1], index = region) on the
    image, ``snippets`` ((region, text), one line each, in the region's colour) below it."""
    base = to_rgb(image)
    width, height = picture_size(base.width, base.height, snippets, max_side)
    shown = _scaled(base, display_scale(base.width, base.height, max_side))
    canvas = Image.new("RGB", (width, height), WHITE)
    canvas.paste(shown, (0, 0))
    draw = ImageDraw.Draw(canvas)
    used = {region for region, _ in snippets}
    for region, box in enumerate(boxes):
        if region not in used:
            continue
        x0, y0, x1, y1 = _pixel_box(box, shown.width, shown.height)
        draw.rectangle((x0, y0, x1, y1), outline=region_colour(region), width=3 if region else 2)
        _tag(draw, (x0 + 3, y0 + 2), str(region), region_colour(region))
    for line, (region, text) in enumerate(snippets):
        _legend_line(draw, shown.height + PAD + line * LINE, region_colour(region), _label(region, text),
                     region_colour(region))
    return canvas


def draw_alignment(image: Image.Image | np.ndarray, boxes: Sequence[Sequence[float]],
                   snippets: Sequence[tuple[int, str]], out_png: str | Path) -> Path:
    """Draw ``boxes`` (normalised [x0, y0, x1, y1], index = region) on ``image`` and list ``snippets``
    ((region, text), one line each, in the region's colour) below it; returns the PNG path."""
    _save(render_alignment(image, boxes, snippets), out_png)
    return Path(out_png)


def _legend_line(draw: ImageDraw.ImageDraw, y: int, colour: Colour, text: str, text_colour: Colour) -> None:
    """One legend row: a swatch in the region's colour, then its text."""
    draw.rectangle((PAD, y + 3, PAD + 12, y + 15), fill=colour)
    draw.text((PAD + 18, y), text, fill=text_colour, font=_font())


# ---- region descriptions (Figure 7) ----

@dataclass(frozen=True)
class RegionLabel:
    """One described region as drawn: normalised box, phrase, score (None: not shown)."""

    box: Box
    phrase: str
    score: float | None


def normalise_box(box: Sequence[float] | None) -> Box:
    """Clip to [0, 1] and order the corners; a missing box is the whole image."""
    if box is None:
        return 0.0, 0.0, 1.0, 1.0
    values = [float(v) for v in (box.tolist() if hasattr(box, "tolist") else box)][:4]
    if len(values) != 4:
        raise ValueError(f"a box needs 4 numbers (x0, y0, x1, y1), got {values}")
    x0, y0, x1, y1 = (min(max(v, 0.0), 1.0) if np.isfinite(v) else 0.0 for v in values)
    return min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)


def region_label(region: Any) -> RegionLabel:
    """A region dict or object (``box``, ``phrase``, ``score``) as a :class:`RegionLabel`."""
    score = get_field(region, "score")
    return RegionLabel(normalise_box(get_field(region, "box")), str(get_field(region, "phrase") or ""),
                       None if score is None else float(score))


def format_score(score: float | None) -> str:
    return "" if score is None else f"{score:.2f}"


def _legend_text(number: int, label: RegionLabel) -> str:
    score = "" if label.score is None else f" ({format_score(label.score)})"
    return _label(number, f"{label.phrase or '(empty)'}{score}")


def _overlaps(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def place_label(size: tuple[int, int], box: tuple[int, int, int, int], bounds: tuple[int, int],
                taken: Sequence[tuple[int, int, int, int]]) -> tuple[int, int, int, int] | None:
    """First free spot for a label of ``size`` at its box (above it, inside its top, below it, inside its
    bottom; left- then right-aligned) that lies within ``bounds`` and overlaps no label in ``taken``."""
    w, h = size
    x0, y0, x1, y1 = box
    for x in (x0, x1 + 1 - w):
        x = min(max(0, x), bounds[0] - w)
        for y in (y0 - h, y0 + 3, y1 + 1, y1 - h - 2):
            rect = (x, y, x + w, y + h)
            if x >= 0 and y >= 0 and rect[2] <= bounds[0] and rect[3] <= bounds[1] \
                    and not any(_overlaps(rect, t) for t in taken):
                return rect
    return None


def _label_rect(draw: ImageDraw.ImageDraw, text: str, box: tuple[int, int, int, int], bounds: tuple[int, int],
                taken: list[tuple[int, int, int, int]]) -> tuple[str, tuple[int, int, int, int]] | None:
    """The full label where it fits, else just its number (crowded boxes), else nothing (the legend has it)."""
    number = text.split(" ", 1)[0]
    for candidate in (fit_text(text, bounds[0] - 4), number):
        left, top, right, bottom = draw.textbbox((0, 0), candidate, font=_font())
        rect = place_label((right + 4, bottom - min(top, 0) + 3), box, bounds, taken)
        if candidate and rect is not None:
            return candidate, rect
    return None


def region_picture_size(width: int, height: int, labels: Sequence[RegionLabel]) -> tuple[int, int, float]:
    """(width, height, image scale) of :func:`draw_regions`' picture: the image scaled by :func:`display_scale`
    (at most MAX_SIDE) and a legend of one line per region below it, widened for long phrases up to MAX_SIDE."""
    scale = display_scale(width, height, MAX_SIDE)
    img_w, img_h = max(1, round(width * scale)), max(1, round(height * scale))
    font = _font()
    text_w = max((font.getlength(_legend_text(n, lab)) for n, lab in enumerate(labels, 1)), default=0)
    canvas_w = max(img_w, MIN_WIDTH, min(MAX_SIDE, int(text_w) + 2 * PAD + 18))
    return canvas_w, img_h + 2 * PAD + max(1, len(labels)) * LINE, scale


def draw_regions(image: Image.Image | np.ndarray | str | Path, regions: Sequence[Any],
                 out_png: str | Path | None = None) -> Image.Image:
    """Figure-7-style picture of region descriptions: each region's box in its colour (region n of the list is
    numbered n, coloured ``region_colour(n)``) with a "n phrase" label placed so labels do not overlap, and a
    legend below the image listing every region's full phrase and score. Also saved to ``out_png`` if given."""
    base = to_rgb(image)
    labels = [region_label(r) for r in regions]
    width, height, scale = region_picture_size(base.width, base.height, labels)
    shown = _scaled(base, scale)
    canvas = Image.new("RGB", (width, height), WHITE)
    canvas.paste(shown, (0, 0))
    draw = ImageDraw.Draw(canvas)
    boxes = [_pixel_box(lab.box, shown.width, shown.height) for lab in labels]
    for number, box in enumerate(boxes, 1):
        draw.rectangle(box, outline=region_colour(number), width=3)
    taken: list[tuple[int, int, int, int]] = []
    for number, (lab, box) in enumerate(zip(labels, boxes), 1):
        placed = _label_rect(draw, f"{number} {lab.phrase}".strip(), box, shown.size, taken)
        if placed is not None:
            taken.append(placed[1])
            _tag(draw, (placed[1][0] + 2, placed[1][1] + 1), placed[0], region_colour(number))
    legend_w = width - 2 * PAD - 18
    for line, lab in enumerate(labels):
        y = shown.height + PAD + line * LINE
        _legend_line(draw, y, region_colour(line + 1), fit_text(_legend_text(line + 1, lab), legend_w), TEXT)
    if not labels:
        draw.text((PAD, shown.height + PAD), "(no regions)", fill=MUTED, font=_font())
    _save(canvas, out_png)
    return canvas


# ---- word x region similarity heatmap ----

CELL_H = 22
CELL_MIN_W = 40
AXIS_LABEL_PX = 160  # words and region labels are cut to this many pixels
BAR_W, BAR_H = 200, 12
NEGATIVE, POSITIVE, NAN_COLOUR = (33, 102, 172), (178, 24, 43), (200, 200, 200)
HEATMAP_NOTE = "colour: dot product v\u00b7s; black frame: each word's best region"


@dataclass(frozen=True)
class HeatmapLayout:
    """Where :func:`draw_similarity_heatmap` puts things (pixels): the grid's top-left corner, cell size, and
    the picture size; ``cell(row, col)`` is a cell's inclusive corners."""

    left: int
    top: int
    cell_w: int
    cell_h: int
    n_rows: int
    n_cols: int
    width: int
    height: int

    def cell(self, row: int, col: int) -> tuple[int, int, int, int]:
        x0, y0 = self.left + col * self.cell_w, self.top + row * self.cell_h
        return x0, y0, x0 + self.cell_w - 2, y0 + self.cell_h - 2  # 1 px white gap between cells

    @property
    def grid_bottom(self) -> int:
        return self.top + max(self.n_rows * self.cell_h, LINE if not (self.n_rows and self.n_cols) else 0)


def similarity_matrix(similarity: Any, n_words: int, n_regions: int) -> np.ndarray:
    """``similarity`` (array, tensor or nested lists) as float64 [n_words, n_regions]; a wrong shape is an error."""
    if isinstance(similarity, torch.Tensor):
        similarity = similarity.detach().float().cpu().numpy()
    matrix = np.asarray(similarity, dtype=np.float64)
    if matrix.size == 0 and (n_words == 0 or n_regions == 0):
        return matrix.reshape(n_words, n_regions)
    if matrix.shape != (n_words, n_regions):
        raise ValueError(f"similarity has shape {matrix.shape}, expected [n_words, n_regions] = "
                         f"[{n_words}, {n_regions}]")
    return matrix


def _format_value(value: float) -> str:
    return f"{value:.2f}" if abs(value) < 10 else f"{value:.3g}" if np.isfinite(value) else str(value)


def row_argmax(matrix: np.ndarray) -> list[int | None]:
    """Each word's best region (first on ties), ignoring non-finite values; None for a row with none."""
    best: list[int | None] = []
    for row in matrix:
        finite = np.isfinite(row)
        best.append(int(np.argmax(np.where(finite, row, -np.inf))) if finite.any() else None)
    return best


def heatmap_layout(words: Sequence[str], region_labels: Sequence[str], similarity: Any) -> HeatmapLayout:
    """The geometry of the heatmap for these axes and values (tests and callers can find any cell)."""
    matrix = similarity_matrix(similarity, len(words), len(region_labels))
    font, small = _font(), _font(11)
    word_w = max((font.getlength(fit_text(w, AXIS_LABEL_PX)) for w in words), default=0)
    label_w = max((font.getlength(fit_text(r, AXIS_LABEL_PX)) for r in region_labels), default=0)
    value_w = max((small.getlength(_format_value(v)) for v in matrix.ravel()), default=0)
    left, top = int(word_w) + 2 * PAD, int(label_w) + 2 * PAD
    cell_w = max(CELL_MIN_W, int(value_w) + 8)
    layout = HeatmapLayout(left, top, cell_w, CELL_H, len(words), len(region_labels), 0, 0)
    width = max(left + cell_w * len(region_labels) + PAD, BAR_W + 2 * PAD + 40,
                int(font.getlength(HEATMAP_NOTE)) + 2 * PAD)
    return HeatmapLayout(left, top, cell_w, CELL_H, len(words), len(region_labels), width,
                         layout.grid_bottom + PAD + BAR_H + 2 * LINE + PAD)


def diverging_colours(values: np.ndarray, vmax: float) -> np.ndarray:
    """Blue (negative) - white (0) - red (positive) colours, uint8 [..., 3]; non-finite values are gray."""
    t = np.clip(np.nan_to_num(values / vmax, nan=0.0, posinf=1.0, neginf=-1.0), -1.0, 1.0)[..., None]
    white = np.array(WHITE, dtype=np.float64)
    end = np.where(t >= 0, np.array(POSITIVE, dtype=np.float64), np.array(NEGATIVE, dtype=np.float64))
    colours = np.rint(white + np.abs(t) * (end - white))
    colours[~np.isfinite(values)] = NAN_COLOUR
    return colours.astype(np.uint8)


def _vertical_text(canvas: Image.Image, bottom_centre: tuple[int, int], text: str) -> None:
    """Text rotated to read bottom-to-top, its end at ``bottom_centre`` (column labels of any length)."""
    font = _font()
    mask = Image.new("L", (max(1, int(font.getlength(text)) + 2), FONT_SIZE + 6), 0)
    ImageDraw.Draw(mask).text((1, 1), text, fill=255, font=font)
    mask = mask.rotate(90, expand=True)
    canvas.paste(Image.new("RGB", mask.size, TEXT), (bottom_centre[0] - mask.width // 2,
                                                     bottom_centre[1] - mask.height), mask)


def _draw_axes(canvas: Image.Image, layout: HeatmapLayout, words: Sequence[str],
               region_labels: Sequence[str]) -> None:
    draw, font = ImageDraw.Draw(canvas), _font()
    for row, word in enumerate(words):
        text = fit_text(word, AXIS_LABEL_PX)
        y = layout.top + row * layout.cell_h + 3
        draw.text((layout.left - PAD - font.getlength(text), y), text, fill=TEXT, font=font)
    for col, label in enumerate(region_labels):
        _vertical_text(canvas, (layout.left + col * layout.cell_w + layout.cell_w // 2, layout.top - PAD),
                       fit_text(label, AXIS_LABEL_PX))
    if not (words and region_labels):
        empty = "(no words)" if not words else "(no regions)"
        draw.text((layout.left, layout.top + 2), empty, fill=MUTED, font=font)


def _draw_cells(draw: ImageDraw.ImageDraw, layout: HeatmapLayout, matrix: np.ndarray, vmax: float) -> None:
    colours, small = diverging_colours(matrix, vmax), _font(11)
    for (row, col), value in np.ndenumerate(matrix):
        x0, y0, x1, y1 = layout.cell(row, col)
        colour = tuple(int(c) for c in colours[row, col])
        draw.rectangle((x0, y0, x1, y1), fill=colour)
        text = _format_value(value)
        draw.text(((x0 + x1 - small.getlength(text)) / 2, y0 + 4), text, fill=ink(colour), font=small)
    for row, col in enumerate(row_argmax(matrix)):
        if col is not None:
            draw.rectangle(layout.cell(row, col), outline=(0, 0, 0), width=2)


def _draw_colour_bar(draw: ImageDraw.ImageDraw, layout: HeatmapLayout, vmax: float) -> None:
    """The colour scale: a gradient from -vmax to +vmax with its ends and 0 labelled, and what it means."""
    y, font = layout.grid_bottom + PAD, _font()
    ramp = diverging_colours(np.linspace(-vmax, vmax, BAR_W), vmax)
    for i, colour in enumerate(ramp):
        draw.line((PAD + i, y, PAD + i, y + BAR_H - 1), fill=tuple(int(c) for c in colour))
    draw.rectangle((PAD - 1, y - 1, PAD + BAR_W, y + BAR_H), outline=MUTED)
    for x, text in ((PAD, _format_value(-vmax)), (PAD + BAR_W // 2, "0"), (PAD + BAR_W, _format_value(vmax))):
        draw.text((x - font.getlength(text) / 2 if x > PAD else x, y + BAR_H + 2), text, fill=TEXT, font=font)
    draw.text((PAD, y + BAR_H + 2 + LINE), HEATMAP_NOTE, fill=TEXT, font=font)


def draw_similarity_heatmap(words: Sequence[str], region_labels: Sequence[str], similarity: Any,
                            out_png: str | Path | None = None) -> Image.Image:
    """Word x region heatmap of dot products v_i . s_t (rows = words, columns = regions, [n_words, n_regions]):
    a diverging colour scale centred on 0 with its legend, values in the cells, and each word's best region
    (the row argmax the alignment objective takes) framed in black. Also saved to ``out_png`` if given."""
    matrix = similarity_matrix(similarity, len(words), len(region_labels))
    layout = heatmap_layout(words, region_labels, matrix)
    finite = np.abs(matrix[np.isfinite(matrix)])
    vmax = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
    canvas = Image.new("RGB", (layout.width, layout.height), WHITE)
    _draw_axes(canvas, layout, words, region_labels)
    draw = ImageDraw.Draw(canvas)
    _draw_cells(draw, layout, matrix, vmax)
    _draw_colour_bar(draw, layout, vmax)
    _save(canvas, out_png)
    return canvas


# ---- the snippet alignment stage's picture of one training image ----

def _find_image(image_folder: Path, shard: str, key: str) -> Image.Image:
    """The image of sample ``key`` in the image shard the feature shard ``shard`` was made from."""
    from dsalign.data.images import decode_rgb
    from dsalign.data.shards import image_member, iter_tar_samples

    path = image_folder / shard
    if not path.is_file():
        raise ValueError(f"no image shard {path} (pass --images: the folder the features were made from)")
    for sample_key, members in iter_tar_samples(path):
        if sample_key == key:
            member = image_member(members)
            if member is None:
                break
            return decode_rgb(member[1])
    raise ValueError(f"{path} holds no image for sample {key}")


def picture_for(model: torch.nn.Module, vocab: object, features: str | Path, out_png: str | Path, beta: float,
                split: str = "train", image_id: str | None = None, images: str | Path | None = None,
                device: str = "cpu", whole_image: bool = True) -> str:
    """Align all captions of one image (``image_id``, default the split's first) and draw them; returns the id.

    The pixels come from the image folder the features were made from (the feature manifest's ``source``).
    """
    from dsalign.data.feature_pipeline import load_feature_manifest
    from dsalign.snippet_align import align_pairs, embed_batch, iter_feature_batches

    features = Path(features)
    manifest = load_feature_manifest(features)
    image_folder = Path(images) if images is not None else Path(manifest["source"])
    for shard in manifest["splits"][split]["shards"]:
        for batch in iter_feature_batches([str(features / shard)], vocab, manifest.get("feature_dim"), 1):
            if image_id is not None and batch["image_ids"][0] != image_id:
                continue
            pairs = embed_batch(model, batch, device)
            _, records = align_pairs(pairs, beta, whole_image)
            lines = [(r.region, f"c{r.caption}: {' '.join(r.tokens)}") for rs in records for r in rs]
            image = _find_image(image_folder, shard, batch["keys"][0])
            draw_alignment(image, batch["boxes"][0].tolist(), lines, out_png)
            return batch["image_ids"][0]
    raise ValueError(f"image {image_id!r} is not in split {split!r} of {features}")
