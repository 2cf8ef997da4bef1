"""The offline distiller: deterministic M_s and M_l from each user's rating statistics, no LLM.

The profile states what a model can use to predict ratings: the user's mean rating and its spread,
their bias and typical distance from the crowd's ``hist_avg``, favourite and least favourite genres
and decades with their mean ratings, the movies they loved and disliked, and their traits. Each
explanation says why this user gave this rating, from their genre affinities and the item's
``hist_avg``. Same inputs give the same text, byte for byte.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from persona_tune.distill.traits import render_traits_text

BACKEND = "offline"
MODEL = "rules-v1"
PROMPT_VERSION = "offline-v1"
MIN_GROUP = 3  # a genre / decade needs this many ratings to be called liked or disliked
FEELING = {5: "loved", 4: "liked", 3: "felt neutral about", 2: "disliked", 1: "hated"}
ACTIVITY_WORDS = {"low": "an occasional viewer", "medium": "a regular viewer", "high": "an avid movie-goer"}
CONFORMITY_WORDS = {
    "low": "my ratings often go against the crowd",
    "medium": "I weigh the crowd's opinion against my own taste",
    "high": "my ratings usually agree with the crowd",
}
DIVERSITY_WORDS = {
    "low": "I stick to a few favourite genres",
    "medium": "I explore a handful of genres",
    "high": "I watch a very wide range of genres",
}


def display_title(title: str, year) -> str:
    """'Title (1995)' unless the title already ends with its year."""
    if year is None or pd.isna(year) or str(title).rstrip().endswith(f"({int(year)})"):
        return str(title)
    return f"{title} ({int(year)})"


def _list(parts: list[str]) -> str:
    if len(parts) <= 1:
        return "".join(parts)
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def _fmt_group(name: str, mean: float, size: int) -> str:
    return f"{name} ({mean:.2f} on average over {size} movie{'s' if size != 1 else ''})"


@dataclass
class UserStats:
    """What the profile says about one user, computed for all users at once (see user_stats)."""

    n: int
    mean: float
    std: float
    shares: dict[int, float]
    bias: float | None = None  # mean of rating - hist_avg
    distance: float | None = None  # mean of |rating - hist_avg|
    volume: list[tuple[str, int]] = field(default_factory=list)  # genre, ratings; most first
    genres: list[tuple[str, float, int]] = field(default_factory=list)  # genre, mean, size; best first
    decades: list[tuple[str, float, int]] = field(default_factory=list)
    loved: list[str] = field(default_factory=list)
    disliked: list[str] = field(default_factory=list)


def _grouped(df: pd.DataFrame, key: str) -> dict[int, list[tuple[str, float, int]]]:
    stats = df.groupby(["user_id", key], sort=True)["rating"].agg(["mean", "size"]).reset_index()
    out: dict[int, list[tuple[str, float, int]]] = {}
    for user_id, name, mean, size in stats.itertuples(index=False):
        out.setdefault(int(user_id), []).append((str(name), float(mean), int(size)))
    for groups in out.values():
        groups.sort(key=lambda g: (-g[1], g[0]))
    return out


def user_stats(rows: pd.DataFrame) -> dict[int, UserStats]:
    """``rows``: train rows merged with items (title, year, genres, hist_avg)."""
    rows = rows.assign(
        shown=[display_title(t, y) for t, y in zip(rows["title"], rows["year"])],
        deviation=rows["rating"] - rows["hist_avg"],
    )
    genre_rows = rows.assign(genre=rows["genres"].fillna("").str.split("|")).explode("genre")
    genre_rows = genre_rows[genre_rows["genre"].astype(bool)]
    dated = rows.dropna(subset=["year"])
    dated = dated.assign(decade=(dated["year"].astype("int64") // 10 * 10).astype(str) + "s")
    genres, decades = _grouped(genre_rows, "genre"), _grouped(dated, "decade")
    stats: dict[int, UserStats] = {}
    for user_id, user in rows.groupby("user_id", sort=True):
        ratings = user["rating"].to_numpy(dtype=np.float64)
        known = user["deviation"].dropna()
        s = UserStats(
            n=len(ratings), mean=float(ratings.mean()), std=float(ratings.std()),
            shares={r: float(np.mean(ratings == r)) for r in (5, 4, 3, 2, 1)},
            bias=float(known.mean()) if len(known) else None,
            distance=float(known.abs().mean()) if len(known) else None,
            genres=genres.get(int(user_id), []), decades=decades.get(int(user_id), []),
        )
        s.volume = sorted(((g, size) for g, _, size in s.genres), key=lambda v: (-v[1], v[0]))
        lift = user["deviation"].fillna(0.0).tolist()
        entries = list(zip(user["rating"].tolist(), lift, user["shown"].tolist()))
        s.loved = [t for r, _, t in sorted((e for e in entries if e[0] >= 4), key=lambda e: (-e[0], -e[1], e[2]))]
        s.disliked = [t for r, _, t in sorted((e for e in entries if e[0] <= 2), key=lambda e: (e[0], e[1], e[2]))]
        stats[int(user_id)] = s
    return stats


def offline_profile(s: UserStats, traits: pd.Series) -> str:
    """M_s for one user, in the first person."""
    shares = [f"{int(round(100 * s.shares[r]))}% {r}s" for r in (5, 4, 3, 2, 1)]
    text = [
        f"I have rated {s.n} movie{'s' if s.n != 1 else ''}, {s.mean:.2f} stars on average "
        f"(spread {s.std:.2f}; {', '.join(shares)})."
    ]
    if s.bias is not None:
        direction = "higher than" if s.bias > 0.05 else "lower than" if s.bias < -0.05 else "about the same as"
        amount = f"{abs(s.bias):.2f} stars " if direction != "about the same as" else ""
        text.append(
            f"Compared with the historical average rating of the same movies, I rate {amount}{direction} "
            f"other viewers, and my rating is typically {s.distance:.2f} stars away from theirs."
        )
    if s.volume:
        top_volume = [f"{g} ({int(round(100 * c / s.n))}%)" for g, c in s.volume[:3]]
        text.append(f"Most of what I watch is {_list(top_volume)}.")
        frequent = [g for g in s.genres if g[2] >= min(MIN_GROUP, s.n)]
        liked = [g for g in frequent if g[1] >= s.mean][:3]
        disliked = [g for g in frequent if g[1] < s.mean][-3:][::-1]
        if liked:
            text.append("The genres I enjoy most are " + _list([_fmt_group(*g) for g in liked]) + ".")
        if disliked:
            text.append("The genres I enjoy least are " + _list([_fmt_group(*g) for g in disliked]) + ".")
    n_dated = sum(size for _, _, size in s.decades)
    frequent = [d for d in s.decades if d[2] >= min(MIN_GROUP, n_dated)]
    if len(frequent) >= 2:
        text.append(
            f"I rate movies from the {_fmt_group(*frequent[0])} highest "
            f"and movies from the {_fmt_group(*frequent[-1])} lowest."
        )
    elif len(frequent) == 1:
        text.append(f"Nearly all the movies I watch are from the {frequent[0][0]}.")
    if s.loved:
        text.append(f"Movies I loved include {_list(s.loved[:3])}.")
    if s.disliked:
        text.append(f"Movies I disliked include {_list(s.disliked[:3])}.")
    text.append(
        f"I am {ACTIVITY_WORDS[traits['activity']]}, {CONFORMITY_WORDS[traits['conformity']]}, "
        f"and {DIVERSITY_WORDS[traits['diversity']]}."
    )
    return " ".join(text)


def offline_explanation(
    title: str, rating: int, item_genres: list[str], genre_stats: dict[str, tuple[float, int]],
    user_mean: float, hist_avg: float,
) -> str:
    """M_l for one rating: 'I rated <title> as <r> because ...'."""
    known = [(g, *genre_stats[g]) for g in item_genres if g in genre_stats]
    if rating >= user_mean:
        known.sort(key=lambda t: (-t[1], t[0]))
    else:
        known.sort(key=lambda t: (t[1], t[0]))
    if known:
        genre, gmean, gsize = known[0]
        taste = f"my average for them is {gmean:.1f}" if gsize > 1 else f"it is the only {genre} movie I have rated"
        if rating >= 4:
            reason = f"I {FEELING[rating]} it and I enjoy {genre} movies ({taste})"
        elif rating <= 2:
            reason = f"I {FEELING[rating]} it and {genre} movies often do not work for me ({taste})"
        else:
            like = f", like many {genre} movies" if gsize > 1 else ""
            reason = f"it was an ordinary watch for me{like} ({taste})"
    else:
        reason = f"I {FEELING[rating]} it"
    if hist_avg is None or math.isnan(hist_avg):
        crowd = "no other viewer's rating of it is known"
    elif rating - hist_avg >= 0.75:
        crowd = f"I liked it more than most viewers, who rate it {hist_avg:.2f} on average"
    elif rating - hist_avg <= -0.75:
        crowd = f"I liked it less than most viewers, who rate it {hist_avg:.2f} on average"
    else:
        crowd = f"my rating is close to its historical average of {hist_avg:.2f}"
    return f"I rated {title} as {rating} because {reason}; {crowd}."


def distill_offline(train: pd.DataFrame, items: pd.DataFrame, traits: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Profiles (user_id, profile, trait levels, traits_text) and memories for every train row.
    ``train``'s own hist_avg column (each row's, at its user's cutoff) is used when it has one."""
    columns = ["item_id", "title", "year", "genres"] + ([] if "hist_avg" in train.columns else ["hist_avg"])
    rows = train.merge(
        items[columns], on="item_id", how="left", validate="many_to_one"
    ).sort_values(["user_id", "timestamp", "item_id"], kind="mergesort").reset_index(drop=True)
    stats = user_stats(rows)
    levels = traits.set_index("user_id")[["activity", "conformity", "diversity"]]
    profiles = []
    for user_id, s in stats.items():
        t = levels.loc[user_id]
        profiles.append({
            "user_id": user_id, "profile": offline_profile(s, t),
            "activity": t["activity"], "conformity": t["conformity"], "diversity": t["diversity"],
            "traits_text": render_traits_text(t["activity"], t["conformity"], t["diversity"]),
        })
    genre_stats = {u: {g: (m, n) for g, m, n in s.genres} for u, s in stats.items()}
    explanations = [
        offline_explanation(
            display_title(title, year), int(rating), [g for g in str(genres or "").split("|") if g],
            genre_stats[user_id], stats[user_id].mean, float(hist_avg),
        )
        for user_id, rating, title, year, genres, hist_avg in zip(
            rows["user_id"], rows["rating"], rows["title"], rows["year"], rows["genres"], rows["hist_avg"]
        )
    ]
    memories = rows[["user_id", "item_id", "rating", "timestamp"]].copy()
    memories["explanation"] = explanations
    return pd.DataFrame(profiles), memories
