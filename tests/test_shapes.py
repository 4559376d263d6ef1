"""The shapes data set is the project's only source of exact alignment ground truth, so its truth is tested
here independently of the generator's own bookkeeping: spans against words, relations against boxes, boxes
against pixels."""

from __future__ import annotations

import io
import re
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from dsalign.data.records import ImageRecord
from dsalign.data.shapes import (
    BACKGROUND_TINTS,
    COLOUR_WORDS,
    COLOURS,
    SHAPE_WORDS,
    canonical_phrase,
    generate_shapes,
    phrase_matches,
)
from dsalign.text import tokenize

SHAPE_OF = {w: s for s, ws in SHAPE_WORDS.items() for w in ws}
COLOUR_OF = {w: c for c, ws in COLOUR_WORDS.items() for w in ws}
# Each relation phrase contains exactly one of these words, and no other part of the grammar uses them.
RELATION_OF = {
    "left": "left",
    "right": "right",
    "above": "above",
    "over": "above",
    "below": "below",
    "under": "below",
    "beneath": "below",
    "next": "next",
    "beside": "next",
    "near": "next",
}


@pytest.fixture(scope="module")
def train() -> list[ImageRecord]:
    return list(generate_shapes(1000, "train", seed=3))


def pixels(record: ImageRecord) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(record.image_bytes)).convert("RGB"))


def holds(relation: str, a: list[float], b: list[float]) -> bool:
    """The plain-language meaning, stated independently of the generator's (stricter) rule."""
    if relation == "left":
        return a[2] <= b[0]
    if relation == "right":
        return a[0] >= b[2]
    if relation == "above":
        return a[3] <= b[1]
    if relation == "below":
        return a[1] >= b[3]
    return max(b[0] - a[2], a[0] - b[2], b[1] - a[3], a[1] - b[3]) <= 0.15


def test_same_arguments_give_identical_records_and_others_differ() -> None:
    first = list(generate_shapes(20, "train", seed=11))
    assert first == list(generate_shapes(20, "train", seed=11))
    assert [r.image_id for r in first] == [f"shapes-train-{i:06d}" for i in range(20)]
    other_seed = list(generate_shapes(20, "train", seed=12))
    other_split = list(generate_shapes(20, "val", seed=11))
    assert all(a.image_bytes != b.image_bytes for a, b in zip(first, other_seed))
    assert all(a.image_bytes != b.image_bytes for a, b in zip(first, other_split))
    assert {c.raw for r in first for c in r.captions} != {c.raw for r in other_seed for c in r.captions}


def test_any_image_regenerates_alone(train: list[ImageRecord]) -> None:
    for index in (0, 13, 999):
        (alone,) = generate_shapes(1, "train", seed=3, start_index=index)
        assert alone == train[index]
    assert list(generate_shapes(5, "train", seed=3, start_index=400)) == train[400:405]


def test_rejects_bad_arguments() -> None:
    for kwargs in ({"split": "dev"}, {"image_size": 32}, {"image_size": 512}, {"n_images": -1}):
        args = {"n_images": 1, "split": "train", "seed": 0, **kwargs}
        with pytest.raises(ValueError):
            next(generate_shapes(**args))


@pytest.mark.parametrize("size", [64, 256])
def test_image_size_is_honoured(size: int) -> None:
    for record in generate_shapes(3, "test", seed=0, image_size=size):
        assert record.image_ext == "png"
        assert Image.open(io.BytesIO(record.image_bytes)).size == (size, size)


def test_captions_tokens_and_spans(train: list[ImageRecord]) -> None:
    for record in train:
        objects = record.extra["objects"]
        assert len(record.captions) == 5
        assert len({tuple(c.tokens) for c in record.captions}) == 5
        for caption in record.captions:
            assert caption.tokens == tokenize(caption.raw)
            previous_end = 0
            for start, end, box in caption.spans:
                assert previous_end <= start < end <= len(caption.tokens)
                previous_end = end
                obj = objects[box]
                words = caption.tokens[start:end]
                assert [SHAPE_OF[w] for w in words if w in SHAPE_OF] == [obj["shape"]]
                assert all(COLOUR_OF[w] == obj["colour"] for w in words if w in COLOUR_OF)
                assert phrase_matches(words, obj, require=("shape",))
                if sum(o["shape"] == obj["shape"] for o in objects) > 1:
                    assert any(w in COLOUR_OF for w in words), "a shared shape must be told apart by colour"
            # No object word outside a span: every shape mention is ground truth.
            covered = {t for s, e, _ in caption.spans for t in range(s, e)}
            assert all(t in covered for t, w in enumerate(caption.tokens) if w in SHAPE_OF)


def test_relations_are_true_and_every_claim_is_recorded(train: list[ImageRecord]) -> None:
    seen = Counter()
    for record in train:
        for caption, relations in zip(record.captions, record.extra["relations"]):
            claimed = [RELATION_OF[w] for w in caption.tokens if w in RELATION_OF]
            assert sorted(claimed) == sorted(r for _, r, _ in relations)
            for a, relation, b in relations:
                assert holds(relation, record.boxes[a], record.boxes[b]), (caption.raw, record.boxes)
                seen[relation] += 1
    assert min(seen[r] for r in RELATION_OF.values()) >= 50


def test_relations_parsed_from_the_words_are_true(train: list[ImageRecord]) -> None:
    """Read "A rel B", "rel B ... A" and "B with A rel it" straight off the tokens, ignoring the records."""
    parsed = 0
    for record in train:
        for caption in record.captions:
            where = [t for t, w in enumerate(caption.tokens) if w in RELATION_OF]
            if len(caption.spans) != 2 or len(where) != 1:
                continue
            (s1, e1, first), (s2, e2, second) = caption.spans
            t = where[0]
            relation = RELATION_OF[caption.tokens[t]]
            if t < s1:
                a, b = second, first
            elif e1 <= t < s2:
                a, b = first, second
            else:
                assert caption.tokens[-1] == "it" or "it" in caption.tokens[e2:]
                a, b = second, first
            assert holds(relation, record.boxes[a], record.boxes[b]), caption.raw
            parsed += 1
    assert parsed > 500


def test_boxes_are_tight_around_the_drawn_objects(train: list[ImageRecord]) -> None:
    for record in train[:200]:
        image = pixels(record).astype(np.int16)
        size = image.shape[0]
        tint = np.array(BACKGROUND_TINTS[record.extra["background"]["tint"]], dtype=np.int16)
        foreground = np.abs(image - tint).max(axis=2) > 40
        outside = np.ones((size, size), dtype=bool)
        boxes = record.boxes
        for i, (box, obj) in enumerate(zip(boxes, record.extra["objects"])):
            assert 0 <= box[0] < box[2] <= 1 and 0 <= box[1] < box[3] <= 1
            for other in boxes[i + 1 :]:
                assert box[2] <= other[0] or other[2] <= box[0] or box[3] <= other[1] or other[3] <= box[1]
            x0, y0, x1, y1 = (round(v * size) for v in box)
            outside[y0:y1, x0:x1] = False
            inside = image[y0:y1, x0:x1]
            share = (inside == np.array(COLOURS[obj["colour"]])).all(axis=2).mean()
            assert share >= 0.1, (record.image_id, obj, share)
            # Within a 2-pixel margin the object's pixels span exactly the box.
            m0, n0 = max(0, x0 - 2), max(0, y0 - 2)
            ys, xs = np.nonzero(foreground[n0 : y1 + 2, m0 : x1 + 2])
            assert (xs.min() + m0, ys.min() + n0, xs.max() + m0 + 1, ys.max() + n0 + 1) == (x0, y0, x1, y1)
        # The background never comes near an object colour, and nothing is drawn outside the boxes.
        assert not foreground[outside].any()


def test_sizes_are_clearly_different(train: list[ImageRecord]) -> None:
    sides = {"small": [], "large": []}
    for record in train:
        for box, obj in zip(record.boxes, record.extra["objects"]):
            sides[obj["size"]].append(max(box[2] - box[0], box[3] - box[1]))
    assert max(sides["small"]) * 1.4 < min(sides["large"])


def test_labels_and_phrase_matching(train: list[ImageRecord]) -> None:
    for record in train[:100]:
        assert record.box_labels == [canonical_phrase(o) for o in record.extra["objects"]]
        for label, obj in zip(record.box_labels, record.extra["objects"]):
            assert phrase_matches(label, obj, require=("shape", "colour", "size", "texture"))
    obj = {"shape": "circle", "colour": "purple", "size": "large", "texture": "striped"}
    assert canonical_phrase(obj) == "large striped purple circle"
    assert canonical_phrase({**obj, "texture": "plain"}) == "large purple circle"
    assert phrase_matches("a big violet disc with stripes", obj)
    assert phrase_matches("purple circle", obj)
    assert not phrase_matches("circle", obj)  # colour is required by default
    assert phrase_matches("circle", obj, require=("shape",))
    assert not phrase_matches("a red circle", obj)
    assert not phrase_matches("a purple square", obj)
    assert not phrase_matches("a small purple circle", obj)
    assert not phrase_matches("a purple circle and a purple square", obj)
    assert not phrase_matches("a dotted purple circle", obj)
    assert phrase_matches("purple circle", {**obj, "texture": "plain"}, require=("colour", "texture"))


def test_grammar_is_varied_and_vocabulary_is_learnable(train: list[ImageRecord]) -> None:
    forms = set()
    for record in train[:200]:
        for caption in record.captions:
            tokens = list(caption.tokens)
            for start, end, _ in reversed(caption.spans):
                tokens[start:end] = ["<obj>"]
            forms.add(" ".join(tokens))
    assert len(forms) > 100
    counts = Counter(w for r in train for c in r.captions for w in c.tokens)
    assert 50 <= len(counts) <= 120
    assert min(counts.values()) >= 5, [w for w, c in counts.items() if c < 5]
    assert all(re.fullmatch(r"[a-z]+", w) for w in counts)
    assert set(Counter(len(r.boxes) for r in train)) == {2, 3, 4}


def test_every_mention_names_shape_and_colour_and_lists_name_every_object(train: list[ImageRecord]) -> None:
    """What makes a sentence identify its scene (docs/alignment.md, "Ceilings")."""
    for record in train[:300]:
        objects = record.extra["objects"]
        for caption, relations in zip(record.captions, record.extra["relations"]):
            first_mentions = {}
            for start, end, box in caption.spans:
                first_mentions.setdefault(box, caption.tokens[start:end])
            assert all(phrase_matches(words, objects[box]) for box, words in first_mentions.items()), caption.raw
            if not relations:
                assert sorted(first_mentions) == list(range(len(objects))), caption.raw


def test_captions_identify_their_image() -> None:
    """Colour + shape words alone retrieve an image from 100 by its held-out sentence (chance: 1%)."""
    keys = {
        **{w: i for i, w in enumerate(SHAPE_WORDS)},
        **{w: len(SHAPE_WORDS) + i for i, w in enumerate(COLOURS)},
    }
    canon = {**SHAPE_OF, **COLOUR_OF}

    def bag(tokens: list[str]) -> np.ndarray:
        vector = np.zeros(len(keys))
        for w in tokens:
            if w in canon:
                vector[keys[canon[w]]] += 1
        return vector / max(1e-9, float(np.linalg.norm(vector)))

    records = list(generate_shapes(100, "val", seed=5))
    documents = np.stack([bag([w for c in r.captions[1:] for w in c.tokens]) for r in records])
    queries = np.stack([bag(r.captions[0].tokens) for r in records])
    scores = queries @ documents.T
    # Ties count against the right image.
    ranks = np.array([(scores[i] >= scores[i, i]).sum() - 1 for i in range(len(records))])
    assert (ranks < 1).mean() >= 0.4
    assert (ranks < 5).mean() >= 0.7
