"""A self-contained HTML report over a set of images: captions, region descriptions, snippet alignments, scores.

One file with every picture embedded as a base64 PNG data URI and its CSS inline (no scripts, fonts or other
files), so it opens from disk in any browser without a server and can be mailed or archived as it is. Inputs are
plain data (:class:`ReportEntry`, dicts or the API's dataclasses), independent of the model code. Every piece of
text is HTML-escaped: captions and file names come from users.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from html import escape
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from dsalign.viz import (
    MAX_SIDE,
    RegionLabel,
    draw_regions,
    fit_image,
    fit_text,
    format_score,
    get_field,
    normalise_box,
    region_colour,
    region_label,
    render_alignment,
    to_rgb,
)

WHOLE_IMAGE = (0.0, 0.0, 1.0, 1.0)
SNIPPET_LINE_PX = 600  # alignment picture lines are cut to this width; the HTML lists snippets in full

STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em auto;max-width:1100px;padding:0 1em;color:#222}
h1{font-size:1.5em}h2{font-size:1.2em;margin:0 0 .4em}
table{border-collapse:collapse;margin:.4em 0}th,td{border:1px solid #ddd;padding:2px 8px;text-align:left}
th{background:#f4f4f4}td.num{text-align:right;font-variant-numeric:tabular-nums}
section.entry{border-top:2px solid #ccc;padding:1em 0}
.pics{display:flex;flex-wrap:wrap;gap:1em;align-items:flex-start}
figure{margin:0}img{max-width:100%;height:auto}
.caption{font-size:1.1em;font-style:italic}.muted{color:#777}
.swatch{display:inline-block;width:12px;height:12px;vertical-align:middle}
.chip{display:inline-block;border:2px solid;border-radius:4px;padding:0 4px;margin:2px}
"""


@dataclass
class ReportEntry:
    """One image of the report. ``regions``: objects/dicts with ``box`` (normalised x0, y0, x1, y1), ``phrase``,
    ``score``. ``alignments``: dicts ``{"sentence": str, "snippets": [{start, end, text, box, score}]}``.
    ``scores``: any named numbers (retrieval scores, metrics)."""

    name: str
    image: Image.Image | np.ndarray | str | Path
    caption: str | None = None
    regions: Sequence[Any] = field(default_factory=list)
    alignments: Sequence[Any] | None = None
    scores: Mapping[str, float] | None = None


def png_data_uri(picture: Image.Image) -> str:
    """A picture as a ``data:image/png;base64,...`` URI, so the HTML needs no files beside it."""
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _css(colour: tuple[int, int, int], alpha: float = 1.0) -> str:
    return f"rgba({colour[0]},{colour[1]},{colour[2]},{alpha})"


def _number(value: Any) -> str:
    """A score for a table cell: 4 significant digits for numbers, anything else as (escaped) text."""
    if isinstance(value, (int, float, np.number)) and not isinstance(value, bool):
        return f"{float(value):.4g}"
    return escape(str(value))


def _snippets(alignment: Any) -> list[Any]:
    return list(get_field(alignment, "snippets") or [])


def _snippet_text(snippet: Any, sentence: str) -> str:
    """The snippet's own text, else its word span [start, end) of the whitespace-split sentence."""
    text = get_field(snippet, "text")
    if text is not None:
        return str(text)
    start, end = get_field(snippet, "start", 0), get_field(snippet, "end", 0)
    return " ".join(sentence.split()[int(start):int(end)])


def _key(box: Any) -> tuple[float, ...]:
    return tuple(round(v, 4) for v in normalise_box(box))


def alignment_regions(alignments: Sequence[Any], described: Sequence[Any] = ()) -> tuple[list[tuple[float, ...]],
                                                                                       list[list[int]]]:
    """Number the distinct snippet boxes as regions (0 = the whole image, as in draw_alignment; 1..n = the
    boxes of the ``described`` regions, as draw_regions numbers them; then new boxes): the boxes by region, and
    each sentence's snippets' regions, so both pictures and the HTML share numbers and colours."""
    boxes: list[tuple[float, ...]] = [WHOLE_IMAGE, *(_key(get_field(r, "box")) for r in described)]
    regions: list[list[int]] = []
    for alignment in alignments:
        regions.append([])
        for snippet in _snippets(alignment):
            box = _key(get_field(snippet, "box"))
            if box not in boxes:
                boxes.append(box)
            regions[-1].append(boxes.index(box))
    return boxes, regions


def _alignment_picture(image: Image.Image, entry: ReportEntry, regions: list[list[int]]) -> Image.Image:
    alignments = entry.alignments or []
    lines = [(region, fit_text(f"s{k}: {_snippet_text(snippet, str(get_field(a, 'sentence') or ''))}",
                               SNIPPET_LINE_PX))
             for k, (a, rs) in enumerate(zip(alignments, regions), 1) for snippet, region in zip(_snippets(a), rs)]
    boxes, _ = alignment_regions(alignments, entry.regions)
    return render_alignment(image, boxes, lines, max_side=MAX_SIDE)


def _figure(picture: Image.Image, alt: str) -> str:
    return (f'<figure><img src="{png_data_uri(picture)}" width="{picture.width}" height="{picture.height}" '
            f'alt="{escape(alt)}"></figure>')


def _pictures(entry: ReportEntry, image: Image.Image, regions: list[list[int]]) -> str:
    """The region picture, the alignment picture, or the plain image when there is neither."""
    figures = []
    if entry.regions:
        figures.append(_figure(draw_regions(image, entry.regions), f"{entry.name}: region descriptions"))
    if any(regions):
        figures.append(_figure(_alignment_picture(image, entry, regions),
                               f"{entry.name}: aligned snippets"))
    if not figures:
        figures.append(_figure(fit_image(image), entry.name))
    return f'<div class="pics">{"".join(figures)}</div>'


def _swatch(colour: tuple[int, int, int]) -> str:
    return f'<span class="swatch" style="background:{_css(colour)}"></span>'


def _regions_table(labels: Sequence[RegionLabel]) -> str:
    rows = "".join(f'<tr><td>{_swatch(region_colour(n))} {n}</td><td>{escape(lab.phrase) or "<i>(empty)</i>"}'
                   f'</td><td class="num">{format_score(lab.score)}</td></tr>' for n, lab in enumerate(labels, 1))
    return f"<table class=\"regions\"><tr><th>region</th><th>phrase</th><th>score</th></tr>{rows}</table>"


def _chip(snippet: Any, sentence: str, region: int) -> str:
    """A snippet in its region's colour (border, number and a light fill), its word span as a tooltip."""
    colour = region_colour(region)
    score = get_field(snippet, "score")
    score_html = f" <small>{format_score(float(score))}</small>" if score is not None else ""
    span = f"words {get_field(snippet, 'start', '?')}\u2013{get_field(snippet, 'end', '?')}"
    return (f'<span class="chip" title="{escape(span)}" style="border-color:{_css(colour)};'
            f'background:{_css(colour, 0.15)}"><b style="color:{_css(colour)}">[{region}]</b> '
            f"{escape(_snippet_text(snippet, sentence))}{score_html}</span>")


def _alignments_html(alignments: Sequence[Any], regions: list[list[int]]) -> str:
    parts = []
    for k, (alignment, sentence_regions) in enumerate(zip(alignments, regions), 1):
        sentence = str(get_field(alignment, "sentence") or "")
        chips = "".join(_chip(s, sentence, r) for s, r in zip(_snippets(alignment), sentence_regions))
        parts.append(f'<p class="sentence"><b>s{k}:</b> {escape(sentence)}<br>'
                     f'{chips or "<span class=muted>no snippets</span>"}</p>')
    return f'<div class="alignments"><h3>Aligned snippets</h3>{"".join(parts)}</div>'


def _scores_table(scores: Mapping[str, Any]) -> str:
    rows = "".join(f'<tr><th>{escape(str(k))}</th><td class="num">{_number(v)}</td></tr>' for k, v in scores.items())
    return f'<table class="scores">{rows}</table>'


def _entry_section(index: int, entry: ReportEntry) -> str:
    """One image: caption, pictures, region table, aligned snippets, scores (empty parts left out)."""
    image = to_rgb(entry.image)
    alignments = list(entry.alignments or [])
    _, regions = alignment_regions(alignments, entry.regions)
    parts = [f"<h2>{index + 1}. {escape(entry.name)}</h2>"]
    if entry.caption is not None:
        parts.append(f'<p class="caption">{escape(entry.caption)}</p>')
    parts.append(_pictures(entry, image, regions))
    if entry.regions:
        parts.append(_regions_table([region_label(r) for r in entry.regions]))
    if alignments:
        parts.append(_alignments_html(alignments, regions))
    if entry.scores:
        parts.append(_scores_table(entry.scores))
    return f'<section class="entry" id="entry-{index}">{"".join(parts)}</section>'


def _summary(entries: Sequence[ReportEntry]) -> str:
    """Table of contents: one row per image with its caption, counts and scores (columns: every score name)."""
    if not entries:
        return '<p class="muted">No images.</p>'
    names = list(dict.fromkeys(k for e in entries for k in (e.scores or {})))
    head = "".join(f"<th>{escape(str(n))}</th>" for n in ["#", "image", "caption", "regions", "snippets", *names])
    rows = []
    for i, e in enumerate(entries):
        snippets = sum(len(_snippets(a)) for a in e.alignments or [])
        scores = "".join(f'<td class="num">{_number((e.scores or {})[n]) if n in (e.scores or {}) else ""}</td>'
                         for n in names)
        rows.append(f'<tr><td class="num">{i + 1}</td><td><a href="#entry-{i}">{escape(e.name)}</a></td>'
                    f"<td>{escape(e.caption or '')}</td><td class=\"num\">{len(e.regions)}</td>"
                    f'<td class="num">{snippets}</td>{scores}</tr>')
    return f'<table class="summary"><tr>{head}</tr>{"".join(rows)}</table>'


def render_report(entries: Iterable[ReportEntry], title: str = "dsalign report") -> str:
    """The report as one HTML string (see :func:`write_report`)."""
    entries = list(entries)
    body = "".join(_entry_section(i, e) for i, e in enumerate(entries))
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{escape(title)}</title><style>{STYLE}</style></head>\n<body><h1>{escape(title)}</h1>"
            f'<p class="muted">{len(entries)} image{"" if len(entries) == 1 else "s"}</p>'
            f"{_summary(entries)}\n{body}\n</body></html>\n")


def write_report(entries: Iterable[ReportEntry], out_html: str | Path, title: str = "dsalign report") -> Path:
    """Write one self-contained HTML file over ``entries`` (summary table first, then one section per image
    with its pictures, caption, region phrases and scores, and coloured aligned snippets); returns its path."""
    out = Path(out_html)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_report(entries, title), encoding="utf-8")
    return out
