"""The HTML report: self-contained (every picture a PNG data URI, nothing external), well-formed, every piece of
user text escaped, summary and sections complete; and rendered by headless Chromium with its captions and
images in the DOM and a non-blank screenshot."""

from __future__ import annotations

import base64
import io
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dsalign.report import ReportEntry, alignment_regions, render_report, write_report
from dsalign.viz import PALETTE, region_colour

VOID = {"meta", "img", "br", "hr", "link", "input"}
EVIL = 'a <script>alert("x")</script> & <b>bold</b> caption'
CHROMIUM = next((path for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
                 if (path := shutil.which(name))), None)


class Page(HTMLParser):
    """Tags (checked for balance), text, img sources, ids and links of an HTML document."""

    def __init__(self, html: str) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.tags: list[str] = []
        self.text: list[str] = []
        self.images: list[dict[str, str | None]] = []
        self.ids: set[str] = set()
        self.links: list[str] = []
        self.feed(html)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        values = dict(attrs)
        if values.get("id"):
            self.ids.add(values["id"])
        if tag == "img":
            self.images.append(values)
        if tag == "a" and values.get("href"):
            self.links.append(values["href"])
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag: str) -> None:
        if not self.stack or self.stack.pop() != tag:
            self.errors.append(f"unbalanced </{tag}>")

    def handle_data(self, data: str) -> None:
        self.text.append(data)

    @property
    def all_text(self) -> str:
        return " ".join(" ".join(self.text).split())


def _photo(mode: str, size: tuple[int, int] = (96, 64)) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(90, 170, (*size[::-1], 3), dtype=np.uint8)).convert(mode)


def _entries() -> list[ReportEntry]:
    regions = [{"box": (0.05, 0.1, 0.5, 0.9), "phrase": "a red <circle>", "score": 0.91},
               {"box": (0.55, 0.2, 0.95, 0.8), "phrase": "", "score": -0.5}]
    alignments = [
        {"sentence": "a red circle & a square", "snippets": [
            {"start": 0, "end": 3, "text": "a red circle", "box": regions[0]["box"], "score": 2.5},
            {"start": 3, "end": 4, "text": "&", "box": (0, 0, 1, 1), "score": 0.1},
            {"start": 4, "end": 6, "box": (0.6, 0.6, 0.9, 0.9), "score": 1.25}]},  # text from the span
        {"sentence": "nothing aligned", "snippets": []},
    ]
    return [
        ReportEntry("one<1>.jpg", _photo("RGB"), EVIL, regions, alignments, {"S_kl": 3.25, "rank": 1}),
        ReportEntry("gray.png", _photo("L"), "a gray picture", [], None, None),
        ReportEntry("cmyk.jpg", _photo("CMYK", (300, 40)), "wide", regions[:1], None, {"BLEU-4": 0.2}),
        ReportEntry("alpha.png", _photo("RGBA"), None, [], [{"sentence": "x", "snippets": [
            {"start": 0, "end": 1, "text": "x", "box": (0.1, 0.1, 0.3, 0.3), "score": None}]}]),
    ]


N_PICTURES = 2 + 1 + 1 + 1  # regions + alignments, plain image, regions, alignments


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("report") / "sub" / "report.html"
    assert write_report(_entries(), out, title="Report <&>") == out
    return out


def test_html_is_well_formed_and_complete(report: Path) -> None:
    html = report.read_text(encoding="utf-8")
    page = Page(html)
    assert html.startswith("<!DOCTYPE html>") and not page.errors and not page.stack
    assert page.tags.count("section") == 4 and page.ids == {f"entry-{i}" for i in range(4)}
    assert page.links == [f"#entry-{i}" for i in range(4)]  # the summary links every section
    text = page.all_text
    for needed in ("Report <&>", EVIL, "a gray picture", "a red <circle>", "(empty)", "S_kl", "3.25",
                   "BLEU-4", "a square", "no snippets", "4 images"):
        assert needed in text, needed
    assert html.count("<tr>") == (1 + 4) + (1 + 2) + 2 + (1 + 1) + 1  # summary, then tables of entries 1 and 3


def test_every_image_is_an_embedded_png(report: Path) -> None:
    page = Page(report.read_text(encoding="utf-8"))
    assert len(page.images) == N_PICTURES
    for img in page.images:
        src = img["src"] or ""
        assert src.startswith("data:image/png;base64,")
        picture = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1], validate=True)))
        assert picture.format == "PNG" and picture.size == (int(img["width"] or 0), int(img["height"] or 0))
        assert img["alt"]


def test_nothing_external_and_all_text_escaped(report: Path) -> None:
    html = report.read_text(encoding="utf-8")
    assert "<script" not in html.lower() and "&lt;script&gt;" in html
    assert "<b>bold</b>" not in html and "one&lt;1&gt;.jpg" in html and "Report &lt;&amp;&gt;" in html
    assert not re.search(r"(src|href)=\"(?!data:|#)", html)  # no file, URL, font or script beside the page
    assert "http" not in html and "@import" not in html and "url(" not in html


def test_snippets_share_their_boxes_colours() -> None:
    entry = _entries()[0]
    boxes, regions = alignment_regions(entry.alignments or [], entry.regions)
    assert regions == [[1, 0, 3], []]  # the described box keeps its number, the whole image is 0, a new box is 3
    assert len(boxes) == 4
    html = render_report([entry])
    for region in (0, 1, 3):
        r, g, b = region_colour(region)
        assert f'style="border-color:rgba({r},{g},{b},1.0);' in html
    assert "words 4\u20136" in html  # word span as the chip's tooltip


def test_empty_report() -> None:
    page = Page(render_report([], title="empty"))
    assert not page.errors and "No images." in page.all_text and not page.images


def _chromium(*args: str, profile: Path) -> subprocess.CompletedProcess[str]:
    command = [CHROMIUM or "chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
               "--no-first-run", "--no-default-browser-check", f"--user-data-dir={profile}", *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    return done


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary (CI installs it: apt-get install chromium)")
def test_chromium_renders_captions_and_images(report: Path, tmp_path: Path) -> None:
    dom = Page(_chromium("--dump-dom", report.as_uri(), profile=tmp_path / "profile").stdout)
    assert not dom.errors and "script" not in dom.tags  # the caption's <script> stayed text
    for entry in _entries():
        assert entry.name in dom.all_text and (entry.caption is None or entry.caption in dom.all_text)
    assert len(dom.images) == N_PICTURES
    assert all((img["src"] or "").startswith("data:image/png;base64,") for img in dom.images)

    shot = tmp_path / "shot.png"
    _chromium("--screenshot=" + str(shot), "--window-size=1000,1400", "--hide-scrollbars", report.as_uri(),
              profile=tmp_path / "profile")
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert pixels.shape == (1400, 1000, 3)
    assert pixels.std() > 20 and (pixels.sum(-1) < 600).mean() > 0.05  # not blank
    near_red = (np.abs(pixels - np.array(PALETTE[0])).max(-1) <= 12).sum()
    assert near_red > 500  # region 1's box and label: the embedded pictures were decoded and shown
