"""What a perfect reader of the shapes captions could reach: ceilings for retrieval and region phrases.

A shapes sentence names each object it mentions by colour and shape plus a random subset of its other
attributes, and relation sentences mention only some of the objects, so a sentence can fit several test
scenes ("a red star left of a blue disc" fits every scene where that holds). An oracle that knows the grammar
exactly ranks images by the sentence's likelihood under it; its recall is the best any model can expect on
that split, and the targets of docs/alignment.md are read against it. A third reader sees only what the
paper's score can (Eq. 8 never falls when a scene holds more objects): whether the scene holds every
mentioned object, in the asserted relations.

- ``likelihood``: 0 when the grammar cannot produce this sentence for this scene (objects, attributes, counts,
  lists naming every object, relations, background), else the odds of its template, relation choice and texture
  naming (up to factors that do not depend on the scene); ranking by it approximates the Bayes-optimal ranker.
- The ``contains`` reader: the part of those checks that does not depend on objects the sentence leaves out.
- Region phrases: a box's references are the phrases its own five captions used, drawn at random per caption,
  so even the phrase most often used for that kind of object (learned from the train split) is often absent.

    python -m dsalign.eval.shapes_ceiling --train 2000 --test 200 --seed 0 [--out FILE]
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path

from dsalign.data.records import Caption, ImageRecord
from dsalign.data.shapes import (
    BACKGROUND_TINTS,
    COUNT_NOUNS,
    NUMBER_WORDS,
    P_NAME_TEXTURE,
    STYLE_WORDS,
    canonical_phrase,
    generate_shapes,
    phrase_attributes,
    phrase_matches,
    relation_holds,
    relation_triples,
    template_weights,
)

_STYLE_OF = {w: style for style, words in STYLE_WORDS.items() for w in words}
_COUNT_OF = {w: n for n, w in NUMBER_WORDS.items()}
Relation = Sequence  # [a, relation, b] as stored in a record's extra["relations"]


def stated_count(tokens: Sequence[str]) -> int | None:
    """The object count a "count" sentence states ("three shapes: ..."), else None."""
    for word, following in zip(tokens, tokens[1:]):
        if word in _COUNT_OF and following in COUNT_NOUNS:
            return _COUNT_OF[word]
    return None


def background_fits(tokens: Sequence[str], background: dict) -> bool:
    """Whether the "on a [style] [tint] background" words (if any) describe this background."""
    if "background" not in tokens:
        return True
    end = list(tokens).index("background")
    for word in tokens[max(0, end - 2):end]:
        if word in BACKGROUND_TINTS and word != background["tint"]:
            return False
        if word in _STYLE_OF and _STYLE_OF[word] != background["style"]:
            return False
    return True


def _mentions(caption: Caption) -> dict[int, list[list[str]]]:
    phrases: dict[int, list[list[str]]] = defaultdict(list)
    for start, end, box in caption.spans or []:
        phrases[box].append(caption.tokens[start:end])
    return dict(phrases)


def _texture_odds(phrase: Sequence[str], obj: dict) -> float:
    """Odds of a full mention naming (or not) the texture of a textured object (shape and colour always are)."""
    if obj["texture"] == "plain":
        return 1.0
    return P_NAME_TEXTURE if "texture" in phrase_attributes(phrase) else 1 - P_NAME_TEXTURE


def _best_reading(caption: Caption, relations: Sequence[Relation], record: ImageRecord) -> float:
    """The odds of the likeliest way to read the sentence's mentions as distinct objects of the scene that
    fit every mention, asserted relation and background word; 0 when there is none."""
    objects, boxes = record.extra["objects"], record.boxes or []
    if not background_fits(caption.tokens, record.extra["background"]):
        return 0.0
    mentions = _mentions(caption)
    boxes_named = sorted(mentions)
    best = 0.0
    for chosen in itertools.permutations(range(len(objects)), len(boxes_named)):
        where = dict(zip(boxes_named, chosen))
        if not all(phrase_matches(p, objects[where[b]], require=()) for b in boxes_named for p in mentions[b]):
            continue
        if not all(a in where and b in where and relation_holds(r, boxes[where[a]], boxes[where[b]])
                   for a, r, b in relations):
            continue
        best = max(best, math.prod(_texture_odds(mentions[b][0], objects[where[b]]) for b in boxes_named))
    return best


def _template_odds(caption: Caption, relations: Sequence[Relation], record: ImageRecord) -> float:
    """The odds of the sentence's template and relation choice for this scene, up to a constant; 0 when what it
    implies about the scene as a whole (the stated count, a list naming every object) is false."""
    objects = record.extra["objects"]
    count = stated_count(caption.tokens)
    if count is not None and count != len(objects):
        return 0.0
    if not relations and len(_mentions(caption)) != len(objects):
        return 0.0  # lists and counts name every object
    n_triples = len(relation_triples(record.boxes or []))
    weights = template_weights(len(objects), n_triples)
    if count is not None:
        template, choice = "count", 1.0
    elif relations:
        template, choice = "relation", n_triples ** -len(relations)
    else:
        template, choice = "list", 1.0
    if template not in weights:
        return 0.0
    return choice * weights[template] / sum(weights.values())


def likelihood(caption: Caption, relations: Sequence[Relation], record: ImageRecord) -> float:
    """The grammar's odds of producing this sentence for this scene (0 = impossible), up to a constant."""
    template = _template_odds(caption, relations, record)
    return template * _best_reading(caption, relations, record) if template else 0.0


def _hit(scores: Sequence[float], truth: Sequence[bool]) -> float:
    """Chance that the top-scored candidate is a true one, ties broken at random."""
    top = max(scores)
    tied = [t for s, t in zip(scores, truth) if s == top]
    return sum(tied) / len(tied)


def retrieval_ceiling(records: Sequence[ImageRecord]) -> dict[str, float]:
    """R@1 (percent) of the grammar oracle in both directions, of a reader that only checks consistency
    (ranks every consistent candidate equally), and of one that only checks that the scene contains the
    mentioned objects."""
    sentences = [(i, c, rel) for i, r in enumerate(records)
                 for c, rel in zip(r.captions, r.extra["relations"])]
    # The mention search runs once per (sentence, image); likelihood = template odds x reading odds.
    readings = [[_best_reading(c, rel, r) for r in records] for _, c, rel in sentences]  # [sentence][image]
    odds = [[_template_odds(c, rel, r) * x if x else 0.0 for r, x in zip(records, row)]
            for (_, c, rel), row in zip(sentences, readings)]
    owner = [i for i, _, _ in sentences]
    t2i = [_hit(row, [j == i for j in range(len(records))]) for i, row in zip(owner, odds)]
    t2i_flat = [_hit([float(x > 0) for x in row], [j == i for j in range(len(records))])
                for i, row in zip(owner, odds)]
    # Whether the scene holds every mentioned object, in the asserted relations, on the named background: all
    # the paper's score (Eq. 8) can check, since a scene's score never falls when it holds more objects.
    t2i_contains = [_hit([float(x > 0) for x in row], [j == i for j in range(len(records))])
                    for i, row in zip(owner, readings)]
    # image -> text: rank sentences by the posterior that this image produced them (a generic sentence is
    # likely under many images and so rarely the best evidence for any one of them)
    posterior = [[x / sum(row) for x in row] for row in odds]
    i2t = [_hit([row[j] for row in posterior], [i == j for i in owner]) for j in range(len(records))]
    def percent(hits: Sequence[float]) -> float:
        return 100 * sum(hits) / len(hits)

    return {"t2i_r1_oracle": percent(t2i), "t2i_r1_consistent": percent(t2i_flat),
            "t2i_r1_contains": percent(t2i_contains), "i2t_r1_oracle": percent(i2t),
            "images": len(records), "sentences": len(sentences)}


def _box_phrases(record: ImageRecord) -> dict[int, set[str]]:
    phrases: dict[int, set[str]] = defaultdict(set)
    for caption in record.captions:
        for box, words in _mentions(caption).items():
            phrases[box].update(" ".join(w) for w in words)
    return phrases


def region_phrase_ceiling(train: Sequence[ImageRecord], test: Sequence[ImageRecord]) -> dict[str, float]:
    """Exact-match rate (percent) of always saying the train split's most frequent phrase for each kind of
    object (its full label) against each test box's own phrases."""
    def kind(record: ImageRecord, box: int) -> str:
        return canonical_phrase(record.extra["objects"][box])

    usage: dict[str, Counter] = defaultdict(Counter)
    for record in train:
        for box, phrases in _box_phrases(record).items():
            usage[kind(record, box)].update(phrases)
    hits = total = 0
    for record in test:
        for box, phrases in _box_phrases(record).items():
            total += 1
            seen = usage.get(kind(record, box))
            if seen:  # ties go to the alphabetically first phrase, so the number does not depend on hashing
                hits += min(seen, key=lambda phrase: (-seen[phrase], phrase)) in phrases
    return {"region_exact_match_oracle": 100 * hits / total, "boxes": total}


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", type=int, default=2000, help="train images the phrase oracle learns from")
    parser.add_argument("--test", type=int, default=200, help="test images (the demo's split size)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="also write the numbers here as JSON")
    args = parser.parse_args(argv)
    test = list(generate_shapes(args.test, "test", seed=args.seed))
    train = list(generate_shapes(args.train, "train", seed=args.seed))
    result = {"seed": args.seed, **retrieval_ceiling(test), **region_phrase_ceiling(train, test)}
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
