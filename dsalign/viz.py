"""Pictures of snippet alignments: an image with its region boxes and, below it, the aligned snippets.

Each region gets one colour, used for its box and for every snippet aligned to it, so "which words went to
which box" reads at a glance. PIL only; text uses PIL's default (FreeType) font.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

PALETTE = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
           (240, 50, 230), (210, 245, 60), (0, 128, 128), (170, 110, 40), (128, 0, 0), (0, 0, 128)]
WHOLE_IMAGE_COLOUR = (128, 128, 128)
MIN_WIDTH = 384  # small images (shapes: 128 px) are scaled up by an integer factor to at least this width
FONT_SIZE = 14
LINE = 20  # pixels per snippet line
PAD = 6


def region_colour(region: int) -> tuple[int, int, int]:
    """Region 0 (the whole image) is gray; the others cycle through a high-contrast palette."""
    return WHOLE_IMAGE_COLOUR if region == 0 else PALETTE[(region - 1) % len(PALETTE)]


def _label(region: int, text: str) -> str:
    return f"[{region}] {text}"


def picture_size(width: int, height: int, snippets: Sequence[tuple[int, str]]) -> tuple[int, int]:
    """Size of the PNG :func:`draw_alignment` writes for a ``width`` x ``height`` image: the image scaled by
    an integer factor, widened when a label is longer, plus one line per snippet."""
    scale = max(1, -(-MIN_WIDTH // width))
    font = ImageFont.load_default(size=FONT_SIZE)
    text_w = max((int(font.getlength(_label(r, t))) for r, t in snippets), default=0) + 2 * PAD + 18
    return max(width * scale, text_w), height * scale + len(snippets) * LINE + 2 * PAD


def draw_alignment(image: Image.Image | np.ndarray, boxes: Sequence[Sequence[float]],
                   snippets: Sequence[tuple[int, str]], out_png: str | Path) -> Path:
    """Draw ``boxes`` (normalised [x0, y0, x1, y1], index = region) on ``image`` and list ``snippets``
    ((region, text), one line each, in the region's colour) below it; returns the PNG path."""
    base = Image.fromarray(image) if isinstance(image, np.ndarray) else image
    base = base.convert("RGB")
    width, height = picture_size(base.width, base.height, snippets)
    scale = max(1, -(-MIN_WIDTH // base.width))
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    canvas.paste(base.resize((base.width * scale, base.height * scale), Image.Resampling.NEAREST), (0, 0))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=FONT_SIZE)
    img_w, img_h = base.width * scale, base.height * scale
    used = {region for region, _ in snippets}
    for region, box in enumerate(boxes):
        if region not in used:
            continue
        x0, y0, x1, y1 = (box[0] * img_w, box[1] * img_h, box[2] * img_w - 1, box[3] * img_h - 1)
        colour = region_colour(region)
        draw.rectangle((x0, y0, x1, y1), outline=colour, width=3 if region else 2)
        label = str(region)
        tx, ty = x0 + 3, y0 + 2
        draw.rectangle(draw.textbbox((tx, ty), label, font=font), fill=colour)
        draw.text((tx, ty), label, fill=(255, 255, 255), font=font)
    for line, (region, text) in enumerate(snippets):
        y = img_h + PAD + line * LINE
        colour = region_colour(region)
        draw.rectangle((PAD, y + 3, PAD + 12, y + 15), fill=colour)
        draw.text((PAD + 18, y), _label(region, text), fill=colour, font=font)
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out, format="PNG")
    return out


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
