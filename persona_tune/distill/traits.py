"""Agent4Rec-style social traits (activity, conformity, diversity), from train rows only.

* activity   = number of train ratings; cut at the 60th and 90th percentiles.
* conformity = mean squared deviation of the user's ratings from each item's ``hist_avg``;
  cut at the 25th and 80th percentiles. A LOW deviation is a HIGH conformity level.
* diversity  = how many genres it takes to cover 80% of the user's genre mass (an item with g
  genres adds 1/g to each); cut at the 33rd and 66th percentiles.

Percentiles are taken over the run's users (linear interpolation, ``numpy.percentile``), so levels
are relative to the sample. Pass fixed ``cuts`` to keep levels comparable across runs. A value equal
to a cut point falls in the lower band.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import pandas as pd

from persona_tune.errors import ConfigError

LEVELS = ("low", "medium", "high")
TRAITS = ("activity", "conformity", "diversity")
PERCENTILES = {"activity": (60.0, 90.0), "conformity": (25.0, 80.0), "diversity": (33.0, 66.0)}
GENRE_MASS_SHARE = 0.8

# One description per trait and level, in the spirit of Agent4Rec's / the paper's prompts.
TRAIT_DESCRIPTIONS: dict[str, dict[str, str]] = {
    "activity": {
        "low": (
            "An Occasional Viewer, seldom attracted by movie recommendations. Only curious about "
            "watching movies that strictly align with the taste. The movie-watching habits are "
            "infrequent, and tends to leave the recommender system after a few unsatisfying picks"
        ),
        "medium": (
            "A Regular Viewer who watches movies now and then and gives recommendations a fair "
            "chance when they look close to the taste. Keeps using the recommender system as long "
            "as most picks are satisfying"
        ),
        "high": (
            "An Avid Movie Enthusiast, always hungry for the next film and eager to try what the "
            "recommender system suggests. Watches a great many movies and forgives the occasional "
            "disappointing pick"
        ),
    },
    "conformity": {
        "low": (
            "An Independent Critic whose ratings often depart from the historical ratings. Judges "
            "every movie by personal taste alone and is not swayed by what the crowd thinks"
        ),
        "medium": (
            "A Balanced Evaluator who considers both historical ratings and personal preferences "
            "when giving ratings to movies. Sometimes gives ratings that are different from the "
            "historical rating"
        ),
        "high": (
            "A Crowd-Aligned Rater whose ratings closely follow the historical ratings. Tends to "
            "agree with what most viewers think of a movie and rarely strays far from it"
        ),
    },
    "diversity": {
        "low": (
            "A Genre Loyalist who sticks to a few favourite genres. Rarely steps outside the "
            "comfort zone and prefers movies that are like the ones already enjoyed"
        ),
        "medium": (
            "A Selective Explorer who enjoys a handful of genres and now and then tries something "
            "different when it seems promising"
        ),
        "high": (
            "A Cinematic Trailblazer, a relentless seeker of the unique and the obscure in the "
            "world of movies. The movie choices are so diverse that they defy categorization"
        ),
    },
}


def render_traits_text(activity: str, conformity: str, diversity: str) -> str:
    """The trait descriptions as the paper's prompt words them ("Your activity trait is ...")."""
    levels = {"activity": activity, "conformity": conformity, "diversity": diversity}
    return " ".join(
        f"Your {trait} trait is described as: {TRAIT_DESCRIPTIONS[trait][levels[trait]]}." for trait in TRAITS
    )


def genre_coverage(genres: pd.Series, share: float = GENRE_MASS_SHARE) -> int:
    """Fewest genres whose mass covers ``share`` of the total; ``genres`` holds "A|B" strings."""
    mass: dict[str, float] = {}
    for value in genres:
        names = [g for g in str(value).split("|") if g]
        for g in names:
            mass[g] = mass.get(g, 0.0) + 1.0 / len(names)
    if not mass:
        return 0
    ordered = np.sort(np.fromiter(mass.values(), dtype=np.float64))[::-1]
    cumulative = np.cumsum(ordered) / ordered.sum()
    return int(np.searchsorted(cumulative, share - 1e-12) + 1)


def genre_coverage_per_user(rows: pd.DataFrame, share: float = GENRE_MASS_SHARE) -> pd.Series:
    """genre_coverage for every user at once; ``rows`` has user_id and genres."""
    genres = rows["genres"].fillna("").astype(str).str.split("|")
    mass = pd.DataFrame({"user_id": rows["user_id"].to_numpy(), "genre": genres,
                         "w": 1.0 / genres.map(lambda g: max(len([x for x in g if x]), 1))})
    mass = mass.explode("genre")
    mass = mass[mass["genre"].astype(bool)]
    totals = mass.groupby(["user_id", "genre"], sort=True)["w"].sum().reset_index()
    totals = totals.sort_values(["user_id", "w"], ascending=[True, False], kind="mergesort")
    grouped = totals.groupby("user_id", sort=True)["w"]
    before = (grouped.cumsum() - totals["w"]) / grouped.transform("sum")
    # A genre is needed while the genres before it cover less than ``share``.
    return (before < share - 1e-12).groupby(totals["user_id"]).sum()


def trait_values(train: pd.DataFrame, items: pd.DataFrame) -> pd.DataFrame:
    """Per user: activity_value, conformity_value (mean squared deviation), diversity_value. ``train``'s
    own hist_avg column (each row's, at its user's cutoff) is used when it has one, else items'."""
    own = "hist_avg" in train.columns
    rows = train[["user_id", "item_id", "rating"] + (["hist_avg"] if own else [])].merge(
        items[["item_id", "genres"] + ([] if own else ["hist_avg"])], on="item_id", how="left", validate="many_to_one"
    )
    rows["sq_dev"] = (rows["rating"] - rows["hist_avg"]) ** 2  # NaN where hist_avg is NaN: skipped
    grouped = rows.groupby("user_id", sort=True)
    out = pd.DataFrame(
        {
            "activity_value": grouped.size().astype(np.float64),
            "conformity_value": grouped["sq_dev"].mean(),
        }
    )
    out["diversity_value"] = genre_coverage_per_user(rows).reindex(out.index).fillna(0).astype(np.float64)
    return out.reset_index()


def percentile_cuts(values: pd.DataFrame) -> dict[str, tuple[float, float]]:
    """The two cut points of each trait over these users (see PERCENTILES)."""
    cuts = {}
    for trait in TRAITS:
        column = values[f"{trait}_value"].dropna().to_numpy()
        if column.size == 0:
            raise ConfigError(f"no user has a {trait} value: cannot compute percentile cut points")
        lo, hi = np.percentile(column, PERCENTILES[trait])
        cuts[trait] = (float(lo), float(hi))
    return cuts


def check_cuts(cuts: Mapping[str, tuple[float, float]]) -> dict[str, tuple[float, float]]:
    out = {}
    for trait in TRAITS:
        if trait not in cuts:
            raise ConfigError(f"fixed trait cuts must give {trait!r} (got {sorted(cuts)})")
        lo, hi = (float(v) for v in cuts[trait])
        if not lo <= hi:
            raise ConfigError(f"trait cuts for {trait}: {lo} > {hi}; give them in increasing order")
        out[trait] = (lo, hi)
    return out


def _band(values: pd.Series, lo: float, hi: float) -> np.ndarray:
    """0 for <= lo, 1 for (lo, hi], 2 for > hi. NaN (no data) counts as the middle band."""
    band = np.where(values <= lo, 0, np.where(values <= hi, 1, 2))
    return np.where(values.isna(), 1, band)


def compute_traits(
    train: pd.DataFrame, items: pd.DataFrame, cuts: Mapping[str, tuple[float, float]] | None = None
) -> tuple[pd.DataFrame, dict[str, tuple[float, float]]]:
    """Trait values and levels per user (the ``distill/traits.parquet`` table) and the cuts used."""
    values = trait_values(train, items)
    cuts = check_cuts(cuts) if cuts is not None else percentile_cuts(values)
    levels = np.array(LEVELS)
    for trait in ("activity", "diversity"):
        values[trait] = levels[_band(values[f"{trait}_value"], *cuts[trait])]
    # Low deviation from the crowd = high conformity: reverse the bands.
    values["conformity"] = levels[2 - _band(values["conformity_value"], *cuts["conformity"])]
    values["user_id"] = values["user_id"].astype(np.int64)
    columns = ["user_id", "activity_value", "conformity_value", "diversity_value", *TRAITS]
    return values[columns], cuts
