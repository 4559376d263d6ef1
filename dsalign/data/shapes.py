"""The built-in "shapes" data set: synthetic scenes with ground truth for what the paper can only eyeball.

Each image holds 2-4 coloured shapes (shape x colour x size x texture) with tight boxes on a varied
background. Each of its 5 sentences comes from a varied grammar, names every object's shape and colour
(lists name every object; relation sentences two to four of them), and records which token span names which
box and which spatial relations it asserts, so word->region alignment, snippet boundaries and region
descriptions can be scored exactly. Everything is derived from (seed, split, index): any image can be
regenerated alone, and splits never share a random stream.
"""

from __future__ import annotations

import functools
import hashlib
import random
import struct
import zlib
from collections.abc import Iterator, Mapping, Sequence
from typing import TypedDict

import numpy as np
from PIL import Image, ImageChops, ImageDraw

from dsalign.data.records import SPLITS, Caption, ImageRecord
from dsalign.text import tokenize


class ShapeObject(TypedDict):
    """One drawn object; plain strings so it survives a JSON round trip through the shards."""

    shape: str
    colour: str
    size: str
    texture: str


# Synonym sets are disjoint, so every word names exactly one attribute value. The first word is canonical.
SHAPE_WORDS: dict[str, tuple[str, ...]] = {
    "circle": ("circle", "disc"),
    "square": ("square", "box"),
    "triangle": ("triangle",),
    "star": ("star",),
    "ring": ("ring", "donut"),
    "cross": ("cross", "plus"),
    "diamond": ("diamond",),
}
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 220, 40),
    "purple": (150, 60, 190),
    "orange": (245, 140, 30),
    "white": (250, 250, 250),
    "black": (20, 20, 20),
}
COLOUR_WORDS: dict[str, tuple[str, ...]] = {c: (c, "violet") if c == "purple" else (c,) for c in COLOURS}
SIZE_WORDS: dict[str, tuple[str, ...]] = {"small": ("small", "little"), "large": ("large", "big")}
TEXTURES = ("plain", "striped", "dotted")
_TEXTURE_ADJ = {"striped": ("striped",), "dotted": ("dotted", "spotted")}
_TEXTURE_POST = {"striped": ("with stripes",), "dotted": ("with dots", "covered in dots")}
# Object side as a fraction of the image side: the two ranges are far apart so size words are visible.
_SIZE_RANGE = {"small": (0.13, 0.17), "large": (0.28, 0.34)}
# How often a full mention names each optional attribute (shape and colour are always named); public because
# the retrieval ceiling (dsalign/eval/shapes_ceiling.py) reads them.
P_NAME_SIZE = 0.35
P_NAME_TEXTURE = 0.45
# Objects per scene. At least two, and lists name all of them, so a sentence identifies its scene. Under the
# paper's score (Eq. 8: each word's best region) a scene never scores lower for holding more objects, so with
# single-object scenes or lists of random subsets "a red star" fitted every scene holding a red star: that first
# grammar capped text->image R@1 at 87% for any reader (docs/alignment.md, "Ceilings").
OBJECTS_PER_SCENE = (2, 4)

# Background tints are >= 95 RGB units from every object colour; gradient and noise move them <= 26.
BACKGROUND_TINTS: dict[str, tuple[int, int, int]] = {
    "gray": (128, 128, 128),
    "beige": (200, 185, 150),
    "brown": (140, 110, 85),
    "sage": (150, 165, 135),
}
STYLE_WORDS = {"flat": ("plain", "flat"), "gradient": ("shaded", "gradient"), "noisy": ("noisy", "grainy")}
_GRADIENT_AMPLITUDE = 18
_NOISE_AMPLITUDE = 8

RELATIONS = ("left", "right", "above", "below", "next")
_RELATION_WORDS = {
    "left": ("to the left of", "left of", "on the left of"),
    "right": ("to the right of", "right of", "on the right of"),
    "above": ("above", "over"),
    "below": ("below", "under", "beneath"),
    "next": ("next to", "beside", "near"),
}
_NEAR_GAP = 0.15  # "next to": boxes at most this far apart (normalised units)

_ATTRIBUTE_LEXICON: dict[str, tuple[str, str]] = {
    **{w: ("shape", k) for k, ws in SHAPE_WORDS.items() for w in ws},
    **{w: ("colour", k) for k, ws in COLOUR_WORDS.items() for w in ws},
    **{w: ("size", k) for k, ws in SIZE_WORDS.items() for w in ws},
    **{w: ("texture", k) for k, ws in _TEXTURE_ADJ.items() for w in ws},
    "stripes": ("texture", "striped"),
    "dots": ("texture", "dotted"),
}
_LIST_PREFIXES = (  # "" twice: no lead-in is the most common form
    "",
    "",
    "there is",
    "a picture of",
    "an image of",
    "a drawing of",
    "we can see",
    "this image shows",
    "here is",
)
NUMBER_WORDS = {2: "two", 3: "three", 4: "four"}
COUNT_NOUNS = ("shapes", "objects")  # "three shapes: ..."
_CAPTIONS_PER_IMAGE = 5

Box = Sequence[float]
Piece = tuple[str, int | None]  # (text, box index of the object this text names, or None)


def canonical_phrase(obj: Mapping[str, str]) -> str:
    """The fixed-order label of an object (size, texture unless plain, colour, shape) used as box_labels."""
    words = [obj["size"], obj["texture"], obj["colour"], obj["shape"]]
    return " ".join(w for w in words if w != "plain")


def phrase_attributes(phrase: str | Sequence[str]) -> dict[str, set[str]]:
    """Attribute values a phrase names (synonyms resolved); function words and unknown words are ignored."""
    tokens = tokenize(phrase) if isinstance(phrase, str) else phrase
    found: dict[str, set[str]] = {}
    for token in tokens:
        if token in _ATTRIBUTE_LEXICON:
            attribute, value = _ATTRIBUTE_LEXICON[token]
            found.setdefault(attribute, set()).add(value)
    return found


def phrase_matches(
    phrase: str | Sequence[str], obj: Mapping[str, str], require: Sequence[str] = ("shape", "colour")
) -> bool:
    """Whether a (generated) phrase correctly describes an object, in any attribute order and with synonyms.

    Every attribute the phrase names must be the object's (one value only), and every attribute in
    ``require`` must be named; a required texture is satisfied by silence when the object is plain.
    """
    found = phrase_attributes(phrase)
    if any(values != {obj[attribute]} for attribute, values in found.items()):
        return False
    return all(a in found or (a == "texture" and obj["texture"] == "plain") for a in require)


def relation_holds(relation: str, a: Box, b: Box) -> bool:
    """Whether "A <relation> B" is true for normalised boxes [x0, y0, x1, y1].

    Directional relations need the boxes separated along that axis and the centre offset along it to be at
    least half the offset across it, so a far-diagonal pair is not called "left of"; "next" needs a gap of
    at most ``_NEAR_GAP``.
    """
    dx = (b[0] + b[2] - a[0] - a[2]) / 2
    dy = (b[1] + b[3] - a[1] - a[3]) / 2
    if relation == "left":
        return a[2] <= b[0] and dx >= 0.5 * abs(dy)
    if relation == "right":
        return relation_holds("left", b, a)
    if relation == "above":
        return a[3] <= b[1] and dy >= 0.5 * abs(dx)
    if relation == "below":
        return relation_holds("above", b, a)
    if relation == "next":
        return max(b[0] - a[2], a[0] - b[2], b[1] - a[3], a[1] - b[3]) <= _NEAR_GAP
    raise ValueError(f"unknown relation {relation!r}")


def generate_shapes(
    n_images: int, split: str, seed: int, image_size: int = 128, start_index: int = 0
) -> Iterator[ImageRecord]:
    """Yield records for indices start_index .. start_index + n_images - 1 of one split.

    Record i depends only on (seed, split, i, image_size), so shards can be written in parallel chunks.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not 64 <= image_size <= 256:
        raise ValueError(f"image_size must be in [64, 256], got {image_size}")
    if n_images < 0 or start_index < 0:
        raise ValueError(f"n_images and start_index must be >= 0, got {n_images}, {start_index}")
    for index in range(start_index, start_index + n_images):
        yield _make_record(split, seed, image_size, index)


def _image_rng(seed: int, split: str, index: int) -> random.Random:
    # A hash, not seed + index, so neighbouring seeds/splits do not produce shifted copies of each other.
    digest = hashlib.sha256(f"dsalign-shapes|{seed}|{split}|{index}".encode()).digest()
    return random.Random(int.from_bytes(digest[:16], "big"))


def _make_record(split: str, seed: int, image_size: int, index: int) -> ImageRecord:
    rng = _image_rng(seed, split, index)
    objects, squares = _layout(rng, image_size)
    tint = rng.choice(sorted(BACKGROUND_TINTS))
    style = rng.choice(sorted(STYLE_WORDS))
    image, boxes = _render(rng, objects, squares, tint, style, image_size)
    captions, relations = _captions(rng, objects, boxes, tint, style)
    return ImageRecord(
        image_id=f"shapes-{split}-{index:06d}",
        split=split,
        captions=captions,
        image_bytes=_encode_png(np.asarray(image)),
        image_ext="png",
        boxes=boxes,
        box_labels=[canonical_phrase(o) for o in objects],
        extra={
            "objects": [dict(o) for o in objects],
            "background": {"tint": tint, "style": style},
            "relations": relations,
        },
    )


# ----------------------------------------------------------------------------------------------- layout


def _layout(rng: random.Random, image_size: int) -> tuple[list[ShapeObject], list[tuple[int, int, int]]]:
    """Sample 2-4 objects, no two alike in both shape and colour, and reject-sample disjoint squares.

    Large objects are placed first (they are the hard ones to fit); an object that finds no room in 100
    tries is dropped, and a layout left with fewer than two objects is drawn again. The final order is
    shuffled so box index says nothing about size.
    """
    while True:
        objects, squares = _try_layout(rng, image_size)
        if len(objects) >= OBJECTS_PER_SCENE[0]:
            return objects, squares


def _try_layout(rng: random.Random, image_size: int) -> tuple[list[ShapeObject], list[tuple[int, int, int]]]:
    wanted = rng.randint(*OBJECTS_PER_SCENE)
    objects: list[ShapeObject] = []
    while len(objects) < wanted:
        obj = ShapeObject(
            shape=rng.choice(tuple(SHAPE_WORDS)),
            colour=rng.choice(tuple(COLOURS)),
            size=rng.choice(("small", "large")),
            texture=rng.choices(TEXTURES, weights=(2, 1, 1))[0],
        )
        if all((o["shape"], o["colour"]) != (obj["shape"], obj["colour"]) for o in objects):
            objects.append(obj)
    objects.sort(key=lambda o: o["size"] != "large")
    margin = max(2, image_size // 50)
    gap = max(3, round(0.04 * image_size))
    placed: list[tuple[ShapeObject, tuple[int, int, int]]] = []
    for obj in objects:
        low, high = _SIZE_RANGE[obj["size"]]
        side = round(rng.uniform(low, high) * image_size)
        for _ in range(100):
            x = rng.randint(margin, image_size - margin - side)
            y = rng.randint(margin, image_size - margin - side)
            if all(
                x >= ox + os + gap or ox >= x + side + gap or y >= oy + os + gap or oy >= y + side + gap
                for _, (ox, oy, os) in placed
            ):
                placed.append((obj, (x, y, side)))
                break
    rng.shuffle(placed)
    return [o for o, _ in placed], [s for _, s in placed]


# --------------------------------------------------------------------------------------------- drawing


@functools.lru_cache(maxsize=512)
def _shape_mask(shape: str, side: int) -> Image.Image:
    """Binary (0/255) mask of a shape filling a side x side square; cached because sides repeat a lot."""
    mask = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(mask)
    s = side - 1
    if shape == "circle":
        draw.ellipse((0, 0, s, s), fill=255)
    elif shape == "square":
        draw.rectangle((0, 0, s, s), fill=255)
    elif shape == "triangle":
        draw.polygon([(s / 2, 0), (s, s), (0, s)], fill=255)
    elif shape == "diamond":
        draw.polygon([(s / 2, 0), (s, s / 2), (s / 2, s), (0, s / 2)], fill=255)
    elif shape == "star":
        angles = np.pi / 2 + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, s / 2, s * 0.2)
        draw.polygon(
            [(s / 2 + r * np.cos(t), s / 2 - r * np.sin(t)) for r, t in zip(radii, angles)], fill=255
        )
    elif shape == "ring":
        draw.ellipse((0, 0, s, s), outline=255, width=max(3, round(side * 0.2)))
    elif shape == "cross":
        arm = max(3, round(side * 0.34))
        lo = (side - arm) // 2
        draw.rectangle((0, lo, s, lo + arm - 1), fill=255)
        draw.rectangle((lo, 0, lo + arm - 1, s), fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return mask


@functools.lru_cache(maxsize=512)
def _texture_mask(shape: str, texture: str, side: int) -> Image.Image:
    """Shape mask restricted to diagonal stripes or a dot grid whose period scales with the object."""
    period = max(5, side // 5)
    y, x = np.mgrid[0:side, 0:side]
    if texture == "striped":
        pattern = ((x + y) // (period // 2)) % 2 == 0
    else:
        cx, cy = x % period - (period - 1) / 2, y % period - (period - 1) / 2
        pattern = cx * cx + cy * cy <= (period / 4) ** 2
    return ImageChops.multiply(_shape_mask(shape, side), Image.fromarray(pattern.astype(np.uint8) * 255))


def _contrast(colour: str) -> tuple[int, int, int]:
    """Texture colour: a darker shade of the object colour (a light gray on black).

    The blend amounts keep every texture colour >= 69 RGB units (max channel) from every background tint,
    so textured objects never fade into the background.
    """
    target, amount = {"black": (255, 0.9), "white": (0, 0.8)}.get(colour, (0, 0.6))
    r, g, b = (round(c + (target - c) * amount) for c in COLOURS[colour])
    return r, g, b


def _background(rng: random.Random, tint: str, style: str, size: int) -> Image.Image:
    base = BACKGROUND_TINTS[tint]
    if style == "flat":
        return Image.new("RGB", (size, size), base)
    if style == "gradient":
        angle = rng.uniform(0, 2 * np.pi)
        ramp = np.linspace(-1.0, 1.0, size, dtype=np.float32)
        shade = np.cos(angle) * ramp[None, :] + np.sin(angle) * ramp[:, None]
        shade *= _GRADIENT_AMPLITUDE / max(1e-6, float(np.abs(shade).max()))
        offset = np.rint(shade).astype(np.int16)[:, :, None]
    else:
        noise_rng = np.random.default_rng(rng.getrandbits(64))
        offset = noise_rng.integers(-_NOISE_AMPLITUDE, _NOISE_AMPLITUDE + 1, (size, size, 1), dtype=np.int16)
    pixels = np.clip(np.array(base, dtype=np.int16) + offset, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB")


def _encode_png(pixels: np.ndarray) -> bytes:
    """Lossless, deterministic PNG of an RGB array with the "Up" filter on every row and zlib level 1.

    Pillow's encoder tries every filter per row, which alone took more than half of the generation time;
    a fixed Up filter suits these flat scenes and encodes ~4x faster at about the same size.
    """
    height, width, _ = pixels.shape
    rows = pixels.reshape(height, width * 3)
    filtered = np.empty((height, width * 3 + 1), dtype=np.uint8)
    filtered[:, 0] = 2  # filter type "Up": each byte minus the byte above it, modulo 256
    filtered[0, 1:] = rows[0]
    np.subtract(rows[1:], rows[:-1], out=filtered[1:, 1:])

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(filtered.tobytes(), 1))
        + chunk(b"IEND", b"")
    )


def _render(
    rng: random.Random,
    objects: Sequence[ShapeObject],
    squares: Sequence[tuple[int, int, int]],
    tint: str,
    style: str,
    size: int,
) -> tuple[Image.Image, list[list[float]]]:
    """Draw the scene; boxes are the tight extent of each drawn mask, so they hug stars and triangles."""
    image = _background(rng, tint, style, size)
    boxes = []
    for obj, (x, y, side) in zip(objects, squares):
        mask = _shape_mask(obj["shape"], side)
        colour = COLOURS[obj["colour"]]
        image.paste(colour, (x, y, x + side, y + side), mask)
        if obj["texture"] != "plain":
            image.paste(
                _contrast(obj["colour"]),
                (x, y, x + side, y + side),
                _texture_mask(obj["shape"], obj["texture"], side),
            )
        left, top, right, bottom = mask.getbbox()
        boxes.append([(x + left) / size, (y + top) / size, (x + right) / size, (y + bottom) / size])
    return image, boxes


# -------------------------------------------------------------------------------------------- language


def _noun_phrase(
    rng: random.Random, obj: ShapeObject, brief: bool = False, shape_shared: bool = False
) -> str:
    """Content words of one mention: colour and shape, a random subset of the other attributes, their order,
    synonyms, pre/post texture.

    ``brief`` gives a back-reference ("the square"; "the red square" when another object has this shape).
    """
    noun = rng.choice(SHAPE_WORDS[obj["shape"]])
    colours = COLOUR_WORDS[obj["colour"]]
    colour = colours[0] if len(colours) == 1 or rng.random() < 0.7 else rng.choice(colours[1:])
    if brief:
        return f"{colour} {noun}" if shape_shared else noun
    adjectives: list[str] = []
    post = ""
    if rng.random() < P_NAME_SIZE:
        adjectives.append(rng.choice(SIZE_WORDS[obj["size"]]))
    if obj["texture"] != "plain" and rng.random() < P_NAME_TEXTURE:
        if rng.random() < 0.65:
            adjectives.append(rng.choice(_TEXTURE_ADJ[obj["texture"]]))
        else:
            post = rng.choice(_TEXTURE_POST[obj["texture"]])
    adjectives.append(colour)
    if rng.random() < 0.3:
        rng.shuffle(adjectives)
    return " ".join([*adjectives, noun, *([post] if post else [])])


def _determiner(rng: random.Random, following: str, definite: bool = False) -> str:
    if definite:
        return "the"
    word = rng.choices(("a", "one", "the"), weights=(6, 1.5, 2.5))[0]
    return "an" if word == "a" and following[0] in "aeiou" else word


def _mention(rng: random.Random, objects: Sequence[ShapeObject], i: int, brief: bool = False) -> list[Piece]:
    content = _noun_phrase(rng, objects[i], brief, _shares_shape(objects[i], objects))
    return [(_determiner(rng, content, definite=brief), None), (content, i)]


def _join_list(rng: random.Random, mentions: Sequence[list[Piece]]) -> list[Piece]:
    """ "A", "A and B", "A with B", "A, B and C": commas ride on the previous piece so spans stay exact."""
    if len(mentions) == 1:
        return list(mentions[0])
    pieces: list[Piece] = []
    for k, mention in enumerate(mentions):
        if k == len(mentions) - 1:
            pieces.append(("with" if len(mentions) == 2 and rng.random() < 0.25 else "and", None))
        elif k > 0:
            text, box = pieces[-1]
            pieces[-1] = (text + ",", box)
        pieces.extend(mention)
    return pieces


def _every_object(rng: random.Random, objects: Sequence[ShapeObject]) -> list[Piece]:
    """Mentions of all the scene's objects in a random order, joined as a list."""
    return _join_list(rng, [_mention(rng, objects, i) for i in rng.sample(range(len(objects)), len(objects))])


def _background_phrase(rng: random.Random, tint: str, style: str) -> list[Piece]:
    """ "on a gray background", "on a noisy background", "on a shaded beige background"."""
    kind = rng.random()
    words = [rng.choice(STYLE_WORDS[style])] if kind < 0.6 else []
    if kind > 0.35:
        words.append(tint)
    return [("on a " + " ".join(words) + " background", None)]


def _shares_shape(obj: Mapping[str, str], objects: Sequence[Mapping[str, str]]) -> bool:
    """Whether another object of the scene has this object's shape (a back-reference then names its colour)."""
    return sum(o["shape"] == obj["shape"] for o in objects) > 1


def relation_triples(boxes: Sequence[Box]) -> list[tuple[int, str, int]]:
    """Every true (a, relation, b) of a scene, in the order sentences draw from."""
    n = len(boxes)
    return [(a, r, b) for a in range(n) for b in range(n) if a != b for r in RELATIONS
            if relation_holds(r, boxes[a], boxes[b])]


def template_weights(n_objects: int, n_triples: int) -> dict[str, float]:
    """Relative odds of each sentence template for a scene with this many objects and true relation triples."""
    weights = {"list": 3.0, "count": 1.5}
    if n_triples:
        weights.update(relation=2.0, front=2.0, with_it=2.0)
    if n_triples >= 2 and n_objects >= 3:
        weights["compound"] = 2.0
    return weights


def _sentence(
    rng: random.Random,
    objects: Sequence[ShapeObject],
    triples: Sequence[tuple[int, str, int]],
    tint: str,
    style: str,
) -> tuple[list[Piece], list[tuple[int, str, int]]]:
    """One sentence as pieces plus the relations it asserts; the template is drawn per sentence."""
    n = len(objects)
    weights = template_weights(n, len(triples))
    template = rng.choices(list(weights), weights=list(weights.values()))[0]
    relations: list[tuple[int, str, int]] = []
    if template == "list":
        prefix = rng.choice(_LIST_PREFIXES)
        pieces = ([(prefix, None)] if prefix else []) + _every_object(rng, objects)
    elif template == "count":
        noun = rng.choice(COUNT_NOUNS)
        prefix = rng.choice((f"{NUMBER_WORDS[n]} {noun}:", f"there are {NUMBER_WORDS[n]} {noun}:"))
        pieces = [(prefix, None), *_every_object(rng, objects)]
    else:
        a, relation, b = rng.choice(triples)
        rel_words = rng.choice(_RELATION_WORDS[relation])
        relations.append((a, relation, b))
        if template == "relation":
            lead = rng.choice(("", "", "", "there is", "we can see", "a picture of"))
            verb = rng.choice(("", "is", "sits")) if not lead else ""
            pieces = [
                *([(lead, None)] if lead else []),
                *_mention(rng, objects, a),
                *([(verb, None)] if verb else []),
                (rel_words, None),
                *_mention(rng, objects, b),
            ]
        elif template == "front":
            verb = rng.choice(("there is", "is", "sits"))
            pieces = [(rel_words, None), *_mention(rng, objects, b), (verb, None), *_mention(rng, objects, a)]
        elif template == "with_it":
            # "B with A <rel> it" asserts A <rel> B.
            pieces = [
                *_mention(rng, objects, b),
                ("with", None),
                *_mention(rng, objects, a),
                (rel_words + " it", None),
            ]
        else:
            pieces = [
                *_mention(rng, objects, a),
                (rel_words, None),
                *_mention(rng, objects, b),
                ("and", None),
            ]
            c, relation2, d = rng.choice([t for t in triples if t[0] not in (a, b)] or triples)
            relations.append((c, relation2, d))
            pieces += [
                *_mention(rng, objects, c),
                (rng.choice(_RELATION_WORDS[relation2]), None),
                *_mention(rng, objects, d, brief=d in (a, b)),
            ]
    if rng.random() < 0.3:
        pieces += _background_phrase(rng, tint, style)
    return pieces, relations


def _caption_from_pieces(pieces: Sequence[Piece], period: bool) -> Caption:
    """Join pieces with spaces (so per-piece tokenisation adds up to the sentence's) and locate the spans."""
    raw = " ".join(text for text, _ in pieces)
    raw = raw[0].upper() + raw[1:] + ("." if period else "")
    spans = []
    position = 0
    for text, box in pieces:
        count = len(tokenize(text))
        if box is not None:
            spans.append((position, position + count, box))
        position += count
    return Caption(raw=raw, tokens=tokenize(raw), spans=spans)


def _captions(
    rng: random.Random, objects: Sequence[ShapeObject], boxes: Sequence[Box], tint: str, style: str
) -> tuple[list[Caption], list[list[list]]]:
    """Five distinct captions and, per caption, the relations it asserts as [a, relation, b] lists."""
    triples = relation_triples(boxes)
    captions: list[Caption] = []
    relations: list[list[list]] = []
    for _ in range(200):
        pieces, asserted = _sentence(rng, objects, triples, tint, style)
        caption = _caption_from_pieces(pieces, period=rng.random() < 0.5)
        if all(c.tokens != caption.tokens for c in captions):
            captions.append(caption)
            relations.append([list(t) for t in asserted])
            if len(captions) == _CAPTIONS_PER_IMAGE:
                return captions, relations
    raise RuntimeError("could not draw 5 distinct captions")  # unreachable with this grammar's variety
