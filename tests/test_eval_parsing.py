"""The rating parser on messy model outputs (property-based with hypothesis)."""

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from persona_tune.evaluation.parsing import parse_rating, parse_rating_strict

# Noise that holds no digit, no number word and no letter that could glue onto a rating.
noise = st.text(alphabet=st.sampled_from(list(" \n\t:;,!?()'\"*-_")), max_size=12)
words = st.sampled_from(["I would say", "Rating:", "My rating is", "Answer", "well", ""])


@pytest.mark.parametrize(
    "text, expected",
    [
        ("4", 4), ("Rating: 5.", 5), ("I'd say 3/5", 3), ("five", 5), ("Five stars", 5),
        ("3 out of 5", 3), ("on a 1-5 scale: 4", 4), ("4.5", 4.5), (" 2<|end|>", 2),
        ("1-5", None), ("1 to 5", None), ("", None), ("unrelated text", None), ("10", None),
        ("2024", None), ("0.5", None), ("5.5", None), ("seventy", None), ("fivefold", None),
    ],
)
def test_examples(text, expected):
    got = parse_rating(text)
    assert (math.isnan(got) if expected is None else got == expected), (text, got)


@given(r=st.integers(1, 5), pre=noise, post=noise, lead=words)
def test_rating_in_noise_is_found(r, pre, post, lead):
    assert parse_rating(f"{lead} {pre}{r}{post}") == r


@given(r=st.sampled_from(["one", "two", "three", "four", "five"]), pre=noise, post=noise)
def test_number_words(r, pre, post):
    assert parse_rating(f"{pre}{r.upper()}{post}") == ["one", "two", "three", "four", "five"].index(r) + 1


@given(text=st.text(alphabet=st.characters(blacklist_categories=("Nd",)), max_size=40))
def test_no_digits_no_number_words_is_unparsable(text):
    lowered = text.lower()
    if not any(w in lowered for w in ("one", "two", "three", "four", "five")):
        assert math.isnan(parse_rating(text))


@given(r=st.integers(1, 5), post=st.text(max_size=20))
def test_first_rating_wins_after_scale_echo(r, post):
    # The scale echo is skipped, whatever follows the first real rating.
    assert parse_rating(f"1-5: {r} {post}") == r


@given(n=st.integers(6, 10_000))
def test_numbers_out_of_range_are_not_ratings(n):
    assert math.isnan(parse_rating(f"I give it {n}"))


@settings(max_examples=50)
@given(r=st.integers(1, 5), pre=st.sampled_from(["", " ", "Rating: ", "rating:"]), post=st.sampled_from(["", ".", "/5", " ", "!"]))
def test_strict_accepts_bare_answers(r, pre, post):
    assert parse_rating_strict(f"{pre}{r}{post}") == r


def test_strict_rejects_list_numbering_and_prose():
    for text in ("1. The movie", "I'd say 3/5", "4 because", "", "1-5"):
        assert math.isnan(parse_rating_strict(text)), text
