"""Metrics: the parser inverts the caption templates; recall, hallucination and text scores."""
from __future__ import annotations

import random

import pytest
from hypothesis import given, settings, strategies as st

from seqloss.workbench import scenes
from seqloss.workbench.metrics import (
    caption_lengths,
    false_facts_by_kind,
    parse_caption,
    scene_scores,
    text_scores,
)
from seqloss.workbench.scenes import Scene, SceneObject


@settings(max_examples=200, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), position_first=st.sampled_from([0.0, 0.5, 1.0]))
def test_parser_recovers_exactly_the_facts_each_template_states(seed, position_first):
    scene = scenes.make_scene(random.Random(seed))
    previous, scenes.POSITION_FIRST = scenes.POSITION_FIRST, position_first
    try:
        _check_templates(scene, seed)
    finally:
        scenes.POSITION_FIRST = previous


def _check_templates(scene, seed):
    rng = random.Random(seed + 1)
    pairs = scenes.captions_with_facts(scene, rng)
    for caption, stated in pairs:
        assert parse_caption(caption) == stated      # nothing the template put in is lost
        assert stated <= scenes.facts(scene)         # and nothing false is read from a reference
    assert scenes.captions(scene, random.Random(seed + 1)) == [c for c, _ in pairs]


def test_parser_on_free_text():
    assert parse_caption("there is a picture") == frozenset()
    assert parse_caption("a diamond") == {("shape", "diamond")}
    assert parse_caption("A large red blue circle in the middle on the left on a white background") == {
        ("shape", "circle"), ("size", "circle", "large"), ("colour", "circle", "red"),
        ("colour", "circle", "blue"), ("position", "circle", "center"), ("position", "circle", "left")}
    assert parse_caption("red on the left") == frozenset()  # attributes without a shape state nothing
    # A position phrase that opens a noun phrase is that shape's, unless it closes the one before.
    assert parse_caption("at the top a red circle and on the left a square") == {
        ("shape", "circle"), ("colour", "circle", "red"), ("position", "circle", "top"),
        ("shape", "square"), ("position", "square", "left")}
    assert parse_caption("a circle on the left a square") == {
        ("shape", "circle"), ("position", "circle", "left"), ("shape", "square")}


TWO = Scene((SceneObject("circle", "red", "large", "left"), SceneObject("square", "blue", "small", "top")))
ONE = Scene((SceneObject("triangle", "green", "small", "center"),))


def test_recall_and_hallucination_are_micro_averaged():
    # TWO: 2 true of 8 facts, nothing false. ONE: "triangle" and "green" true, "circle" and "right" false.
    scores = scene_scores(["a red circle", "a green triangle and a circle on the right"], [TWO, ONE])
    assert scores["attribute_recall"] == pytest.approx((2 + 2) / (8 + 4))
    assert scores["hallucination_rate"] == pytest.approx(2 / (2 + 4))


def test_false_facts_are_counted_per_kind_and_add_up_to_the_hallucination_rate():
    captions, truth = ["a red circle", "a green triangle and a circle on the right"], [TWO, ONE]
    counts = false_facts_by_kind(captions, truth)
    assert counts == {"shape": {"stated": 3, "false": 1}, "colour": {"stated": 2, "false": 0},
                      "size": {"stated": 0, "false": 0}, "position": {"stated": 1, "false": 1}}
    stated, false = (sum(c[key] for c in counts.values()) for key in ("stated", "false"))
    assert false / stated == pytest.approx(scene_scores(captions, truth)["hallucination_rate"])


def test_a_caption_mentioning_nothing_has_zero_recall_and_zero_hallucination():
    assert scene_scores(["there is a picture"], [ONE]) == {"attribute_recall": 0.0, "hallucination_rate": 0.0}


def test_a_full_description_has_full_recall():
    text = "a large red circle on the left and a small blue square at the top"
    assert scene_scores([text], [TWO]) == {"attribute_recall": 1.0, "hallucination_rate": 0.0}


REFS = [["a red circle", "a circle on the left"], ["a blue square at the top", "a large square"],
        ["a small green triangle in the middle", "there is a triangle"]]


def test_text_scores_of_captions_equal_to_a_reference():
    scores = text_scores(["a circle on the left", "a blue square at the top", "there is a triangle"], REFS)
    assert scores["bleu4"] == pytest.approx(1.0, abs=1e-6)
    assert scores["cider"] > 1.0
    assert scores["avg_length"] == pytest.approx((5 + 6 + 4) / 3) and scores["distinct_words"] == 12


def test_text_scores_of_unrelated_and_empty_captions_are_low():
    unrelated = text_scores(["white background"] * 3, REFS)
    assert unrelated["bleu4"] < 1e-6 and unrelated["cider"] == 0.0
    empty = text_scores(["", "", ""], REFS)
    assert empty == {"avg_length": 0.0, "distinct_words": 0, "bleu4": 0.0, "cider": 0.0}


def test_text_scores_reject_mismatched_or_missing_references():
    with pytest.raises(ValueError, match="2 captions but 3"):
        text_scores(["a", "b"], REFS)
    with pytest.raises(ValueError, match="non-empty list"):
        text_scores(["a"], [[]])
    with pytest.raises(ValueError, match="no captions"):
        scene_scores([], [])


def test_caption_lengths_count_words():
    assert caption_lengths(["a red circle", "", " a  b "]) == [3, 0, 2]
