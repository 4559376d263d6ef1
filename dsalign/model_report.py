"""Report entries from a loaded model: what ``dsalign report`` and the demo put into the HTML report."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from dsalign.api import Box, ImageInput, Model, load_image
from dsalign.report import ReportEntry


@dataclass
class ReportItem:
    """One image to report on: ``boxes`` replaces the region proposals (e.g. the data set's own boxes);
    ``sentences`` are aligned to the image (default: its generated caption)."""

    name: str
    image: ImageInput
    boxes: Sequence[Box] | None = None
    sentences: Sequence[str] = field(default_factory=tuple)


def build_entry(model: Model, item: ReportItem, beam_size: int = 7, top_k: int = 5,
                beta: float | None = None, max_len: int = 20) -> ReportEntry:
    """Everything the model's bundles can say about one image: caption (at most ``max_len`` words), region
    phrases, alignments, scores."""
    image = load_image(item.image)
    caption = model.caption([image], beam_size, max_len)[0] if model.caption_full is not None else None
    regions = []
    if model.caption_region is not None:
        regions = model.describe_regions(image, top_k, beam_size, boxes=item.boxes)
    alignments, scores = None, {}
    if model.alignment is not None:
        sentences = list(item.sentences) or ([caption] if caption else [])
        alignments = [{"sentence": s, "snippets": [asdict(x) for x in model.align(image, s, beta, boxes=item.boxes)]}
                      for s in sentences]
        for i, (_, value) in enumerate(sorted(model.rank_sentences(image, sentences, bank=False))):
            scores[f"S(image, sentence {i + 1})"] = value
    return ReportEntry(item.name, image, caption, regions, alignments, scores)
