"""Traits: values from train rows, percentile bands, conformity reversed, fixed cut points."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from persona_tune.distill.traits import (
    TRAIT_DESCRIPTIONS, compute_traits, genre_coverage, render_traits_text, trait_values,
)
from persona_tune.errors import ConfigError


def _items(genres: dict[int, str], hist: dict[int, float]) -> pd.DataFrame:
    return pd.DataFrame({"item_id": list(genres), "genres": list(genres.values()),
                         "hist_avg": [hist.get(i, np.nan) for i in genres]})


def test_genre_coverage_counts_genres_to_80_percent_of_mass():
    # Drama has mass 3.5, Comedy 0.5 (split item), Horror 1: total 5; Drama+Horror = 4.5/5 = 90%.
    assert genre_coverage(pd.Series(["Drama", "Drama", "Drama", "Drama|Comedy", "Horror"])) == 2
    assert genre_coverage(pd.Series(["Drama"] * 9 + ["Comedy"])) == 1  # 90% in one genre
    assert genre_coverage(pd.Series(["A", "B", "C", "D", "E"])) == 4  # uniform: 4/5 = 80%
    assert genre_coverage(pd.Series([], dtype=object)) == 0


def test_trait_values_from_train_rows():
    items = _items({1: "Drama", 2: "Comedy", 3: "Drama|Comedy"}, {1: 4.0, 2: 2.0, 3: np.nan})
    train = pd.DataFrame({"user_id": [7, 7, 7, 8], "item_id": [1, 2, 3, 1], "rating": [5, 2, 3, 1],
                          "timestamp": [1, 2, 3, 4]})
    values = trait_values(train, items).set_index("user_id")
    assert values.loc[7, "activity_value"] == 3
    # Item 3 has no hist_avg: skipped. (5-4)^2 and (2-2)^2 -> mean 0.5.
    assert values.loc[7, "conformity_value"] == pytest.approx(0.5)
    assert values.loc[8, "conformity_value"] == pytest.approx(9.0)
    assert values.loc[7, "diversity_value"] == 2 and values.loc[8, "diversity_value"] == 1


def test_levels_follow_percentiles_and_conformity_is_reversed():
    # 10 users; user u has u+1 ratings of item 1 (hist 3.0), all rated 3 except user 9 (far from crowd).
    rows = []
    for u in range(10):
        for k in range(u + 1):
            rows.append((u, 1 + (k % (u + 1)), 5 if u == 9 else 3, k))
    train = pd.DataFrame(rows, columns=["user_id", "item_id", "rating", "timestamp"])
    items = _items({i: f"G{i}" for i in range(1, 11)}, {i: 3.0 for i in range(1, 11)})
    traits, cuts = compute_traits(train, items)
    t = traits.set_index("user_id")
    lo, hi = np.percentile(np.arange(1, 11), [60, 90])
    assert cuts["activity"] == (pytest.approx(lo), pytest.approx(hi))
    expected = ["low" if n <= lo else "medium" if n <= hi else "high" for n in range(1, 11)]
    assert t["activity"].tolist() == expected
    # Deviation 0 for users 0-8 (high conformity), 4.0 for user 9 (low conformity).
    assert (t.loc[0:8, "conformity"] == "high").all() and t.loc[9, "conformity"] == "low"
    assert set(traits.columns) == {"user_id", "activity_value", "conformity_value", "diversity_value",
                                   "activity", "conformity", "diversity"}


def test_fixed_cuts_are_used_and_checked():
    train = pd.DataFrame({"user_id": [1, 1, 2], "item_id": [1, 2, 1], "rating": [4, 4, 1], "timestamp": [1, 2, 3]})
    items = _items({1: "Drama", 2: "Comedy"}, {1: 4.0, 2: 4.0})
    cuts = {"activity": (1, 1), "conformity": (0.5, 2.0), "diversity": (1, 1)}
    traits, used = compute_traits(train, items, cuts)
    t = traits.set_index("user_id")
    assert used == {k: (float(a), float(b)) for k, (a, b) in cuts.items()}
    assert t.loc[1, "activity"] == "high" and t.loc[2, "activity"] == "low"
    assert t.loc[1, "conformity"] == "high" and t.loc[2, "conformity"] == "low"  # deviation 0 vs 9
    with pytest.raises(ConfigError, match="diversity"):
        compute_traits(train, items, {"activity": (1, 2), "conformity": (1, 2)})
    with pytest.raises(ConfigError, match="increasing"):
        compute_traits(train, items, {**cuts, "activity": (3, 1)})


def test_rendered_traits_text_uses_each_level_description():
    text = render_traits_text("low", "high", "medium")
    assert text.startswith("Your activity trait is described as: An Occasional Viewer")
    assert TRAIT_DESCRIPTIONS["conformity"]["high"] in text and TRAIT_DESCRIPTIONS["diversity"]["medium"] in text
    assert len({d for levels in TRAIT_DESCRIPTIONS.values() for d in levels.values()}) == 9


def test_vectorised_diversity_matches_the_per_user_definition():
    rng = np.random.default_rng(0)
    names = list("ABCDEFG")
    rows = pd.DataFrame({
        "user_id": rng.integers(0, 40, 2000), "item_id": np.arange(2000), "rating": 3, "timestamp": 0,
    })
    items = pd.DataFrame({"item_id": np.arange(2000), "hist_avg": 3.0,
                          "genres": ["|".join(rng.choice(names, rng.integers(1, 4), replace=False)) for _ in range(2000)]})
    values = trait_values(rows, items).set_index("user_id")["diversity_value"]
    expected = rows.merge(items, on="item_id").groupby("user_id")["genres"].agg(genre_coverage)
    assert values.to_dict() == {u: float(v) for u, v in expected.items()}
