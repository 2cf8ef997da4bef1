"""Parse a rating out of a model's free-text answer (the paper's "regex search").

Rules (``parse_rating``, the default "lenient" parser):
- the first stand-alone rating wins: a digit 1-5 or a decimal in [1, 5] ("4", "Rating: 5.", "3.5"),
  or a number word one..five as a whole word ("five" -> 5), case-insensitive;
- a digit inside a larger number is not a rating ("10", "2024", "0.5", "15");
- the scale echo "1-5" / "1 to 5" / "1–5" is skipped (it names the scale, not a rating);
  parsing goes on after it: "on a 1-5 scale: 4" -> 4, "1-5" alone -> unparsable;
- "3/5" and "3 out of 5" -> 3 (the numerator);
- anything else -> NaN (unparsable; counts toward URR).
``parse_rating_strict`` accepts only an answer that is nothing but a rating, optionally prefixed by
"Rating:" and followed by "/5" or punctuation, so list numbering like "1. The movie" is unparsable.
"""

from __future__ import annotations

import math
import re

WORDS = {"one": 1, "two": 2, "three": 3, "four": 4, "five": 5}
_NUM = r"(?:[1-5](?:\.\d+)?|one|two|three|four|five)"
# A scale echo: "1-5", "1 - 5", "1–5", "1 to 5".
_RANGE = re.compile(r"(?<![A-Za-z0-9.])(?:1|one)\s*(?:-|–|—|to)\s*(?:5|five)(?![A-Za-z0-9]|\.\d)", re.IGNORECASE)
_RATING = re.compile(rf"(?<![A-Za-z0-9.]){_NUM}(?![A-Za-z0-9]|\.\d)", re.IGNORECASE)
_STRICT = re.compile(rf"^\s*(?:rating\s*:?\s*)?({_NUM})\s*(?:/\s*5|out of 5)?\s*[.!]?\s*$", re.IGNORECASE)


def _value(token: str) -> float:
    token = token.lower()
    value = float(WORDS[token]) if token in WORDS else float(token)
    return value if 1.0 <= value <= 5.0 else math.nan


def parse_rating(text: str | None) -> float:
    """The first rating in ``text`` (see the module docstring), or NaN when there is none."""
    if not text:
        return math.nan
    ranges = [m.span() for m in _RANGE.finditer(text)]
    for match in _RATING.finditer(text):
        if any(start <= match.start() < end for start, end in ranges):
            continue
        return _value(match.group(0))
    return math.nan


def parse_rating_strict(text: str | None) -> float:
    """A rating only when the whole answer is one (e.g. "4", " Rating: 5.", "3/5"), else NaN."""
    match = _STRICT.match(text or "")
    return _value(match.group(1)) if match else math.nan


PARSERS = {"lenient": parse_rating, "strict": parse_rating_strict}


def get_parser(name: str):
    from persona_tune.errors import ConfigError

    if name not in PARSERS:
        raise ConfigError(f"parser must be one of {', '.join(PARSERS)}, got {name!r}")
    return PARSERS[name]
