"""The shapes ceilings are what docs/alignment.md reads the retrieval and region targets against, so the oracle
must accept every true sentence, reject false ones, and stay well short of perfect on a realistic split."""

from __future__ import annotations

import dataclasses

import pytest

from dsalign.data.records import ImageRecord
from dsalign.data.shapes import generate_shapes
from dsalign.eval.generation import attribute_match, same_phrase
from dsalign.eval.shapes_ceiling import (
    background_fits,
    likelihood,
    main,
    region_phrase_ceiling,
    retrieval_ceiling,
    stated_count,
)
from dsalign.text import tokenize


@pytest.fixture(scope="module")
def scenes() -> list[ImageRecord]:
    return list(generate_shapes(60, "val", seed=2))


def test_every_sentence_is_possible_for_its_own_scene(scenes: list[ImageRecord]) -> None:
    for record in scenes:
        for caption, relations in zip(record.captions, record.extra["relations"]):
            assert likelihood(caption, relations, record) > 0, caption.raw


def test_a_wrong_colour_makes_a_sentence_impossible(scenes: list[ImageRecord]) -> None:
    checked = 0
    for record in scenes:
        colours = {o["colour"] for o in record.extra["objects"]}
        caption = record.captions[0]
        for start, end, _ in caption.spans or []:
            for i in range(start, end):
                if caption.tokens[i] in colours:
                    absent = next(c for c in ("red", "green", "blue", "yellow", "orange", "white", "black")
                                  if c not in colours)
                    tokens = [*caption.tokens[:i], absent, *caption.tokens[i + 1:]]
                    changed = dataclasses.replace(caption, tokens=tokens)
                    assert likelihood(changed, record.extra["relations"][0], record) == 0
                    checked += 1
                    break
    assert checked >= 20


def test_counts_and_backgrounds_are_read() -> None:
    assert stated_count(tokenize("There are three shapes: a red star")) == 3
    assert stated_count(tokenize("a red star and a blue disc")) is None
    assert background_fits(tokenize("a star on a noisy sage background"), {"tint": "sage", "style": "noisy"})
    assert not background_fits(tokenize("a star on a gray background"), {"tint": "sage", "style": "noisy"})
    assert not background_fits(tokenize("a star on a shaded background"), {"tint": "sage", "style": "flat"})


def test_ceilings_are_proper_percentages_below_perfect(scenes: list[ImageRecord]) -> None:
    result = retrieval_ceiling(scenes)
    assert result["sentences"] == 5 * len(scenes)
    # Some sentences fit several of 60 scenes, so even the oracle misses; reading the grammar's odds
    # beats treating every consistent scene alike.
    assert 50 < result["t2i_r1_consistent"] <= result["t2i_r1_oracle"] < 100
    # A reader blind to what a sentence implies about unmentioned objects (the paper's score) does worse.
    assert 50 < result["t2i_r1_contains"] <= result["t2i_r1_consistent"]
    assert 80 < result["i2t_r1_oracle"] <= 100
    assert retrieval_ceiling(scenes[:1])["t2i_r1_oracle"] == 100


def test_region_phrase_oracle_is_far_from_perfect(scenes: list[ImageRecord]) -> None:
    train = list(generate_shapes(400, "train", seed=2))
    result = region_phrase_ceiling(train, scenes)
    assert result["boxes"] > len(scenes)
    assert 30 < result["region_exact_match_oracle"] < 90


def test_command_writes_json(tmp_path) -> None:
    out = tmp_path / "ceiling.json"
    result = main(["--train", "50", "--test", "20", "--out", str(out)])
    assert out.read_text().strip().startswith("{")
    assert set(result) >= {"t2i_r1_oracle", "i2t_r1_oracle", "region_exact_match_oracle"}


def test_attribute_match_accepts_any_wording_of_the_right_attributes() -> None:
    ring = {"shape": "ring", "colour": "red", "size": "large", "texture": "dotted"}
    right = ["large dotted red ring", "red donut covered in dots", "big red ring"]
    wrong = ["ring", "blue ring", "small red ring", "striped red ring"]  # no colour / wrong attribute
    assert attribute_match(right + wrong, [ring] * 7) == 3 / 7


def test_exact_phrase_match_ignores_articles_only() -> None:
    references = ["purple donut covered in dots", "little purple ring"]
    assert same_phrase("a little purple ring", references) and same_phrase("the purple donut covered in dots",
                                                                           references)
    assert not same_phrase("purple ring", references) and not same_phrase("a little purple rings", references)
    assert not same_phrase("one little purple ring", references)  # a numeral is not an article
