"""Write a seeded synthetic rating log in MovieLens-1M format (ratings.dat, movies.dat, users.dat).

The generator has the structure of a real log, so every stage can be tested without MovieLens:
each user has latent tastes over the 18 MovieLens genres and a rating bias; each item has genres,
a year, a quality and a long-tailed popularity. Users mostly watch popular items and items they
are likely to enjoy; a rating is bias + quality + taste match + noise, cut into 1..5 at thresholds
that give MovieLens-like proportions. Timestamps increase through each user's history. The same
seed gives the same bytes. Prepare the output with ``persona-tune prepare --dataset synthetic``.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from persona_tune.data.loaders import ML_GENRES
from persona_tune.errors import ConfigError
from persona_tune.runfolder import atomic_write_bytes
from persona_tune.stage import ranged

log = logging.getLogger(__name__)

# Share of ML-1M movies carrying each genre (roughly), to make Drama/Comedy common and Film-Noir rare.
_GENRE_WEIGHT = np.array([
    0.13, 0.07, 0.03, 0.07, 0.30, 0.05, 0.03, 0.40, 0.02, 0.01, 0.09, 0.03, 0.03, 0.12, 0.07, 0.13, 0.04, 0.02,
])
_WORDS_A = (
    "Silent", "Last", "Crimson", "Broken", "Hidden", "Midnight", "Golden", "Lost", "Wild", "Electric", "Quiet",
    "Burning", "Frozen", "Secret", "Lonely", "Savage", "Gentle", "Distant", "Restless", "Hollow", "Bright",
    "Forgotten", "Iron", "Velvet", "Wicked", "Sweet", "Dark", "Final", "Little", "Endless",
)
_WORDS_B = (
    "River", "Summer", "Kingdom", "Station", "Harbor", "Garden", "Horizon", "Promise", "Empire", "Mirror",
    "Highway", "Island", "Letter", "Shadow", "Season", "Voyage", "Frontier", "Storm", "Carnival", "Orchard",
    "Signal", "Echo", "Crown", "Bridge", "Desert", "Canyon", "Lantern", "Circus", "Melody", "Harvest",
)
_SEQUEL = ("", " II", " III", " IV", " V", " VI", " VII", " VIII", " IX", " X")
_AGES = (1, 18, 25, 35, 45, 50, 56)
# Cut points on the latent score for ratings 1|2|3|4|5: about 6/11/26/35/22 % as in ML-1M.
_THRESHOLDS = np.array([-1.2, -0.6, 0.2, 1.1])
T0 = 956_703_932  # 2000-04-25, the first ML-1M timestamp


@dataclass(frozen=True)
class SynthConfig:
    n_users: int = 300
    n_items: int = 800
    seed: int = 0
    median_ratings: int = 140  # users' rating counts are log-normal around this
    noise: float = 0.55  # std of the per-rating noise on the latent score


def _titles(rng: np.random.Generator, n: int) -> list[str]:
    out, seen = [], {}
    for _ in range(n):
        base = f"{_WORDS_A[rng.integers(len(_WORDS_A))]} {_WORDS_B[rng.integers(len(_WORDS_B))]}"
        k = seen.get(base, 0)
        seen[base] = k + 1
        suffix = _SEQUEL[k] if k < len(_SEQUEL) else f" {k + 1}"
        out.append(f"The {base}{suffix}" if rng.random() < 0.25 else f"{base}{suffix}")
    return out


def generate(cfg: SynthConfig) -> tuple[bytes, bytes, bytes]:
    """Return the bytes of ratings.dat, movies.dat and users.dat (ML-1M format, ASCII)."""
    if cfg.n_users < 1 or cfg.n_items < 10:
        raise ConfigError("synth needs --n-users >= 1 and --n-items >= 10")
    rng = np.random.default_rng(cfg.seed)
    n_g = len(ML_GENRES)

    # Items: 1-3 genres, year, quality, long-tailed popularity.
    n_genres = rng.choice([1, 2, 3], size=cfg.n_items, p=[0.45, 0.38, 0.17])
    item_genres = np.zeros((cfg.n_items, n_g), dtype=bool)
    p = _GENRE_WEIGHT / _GENRE_WEIGHT.sum()
    for i, k in enumerate(n_genres):
        item_genres[i, rng.choice(n_g, size=k, replace=False, p=p)] = True
    years = np.clip(np.round(2000 - rng.gamma(2.0, 9.0, size=cfg.n_items)), 1919, 2000).astype(int)
    quality = rng.normal(0.0, 0.45, size=cfg.n_items)
    popularity = rng.permutation(1.0 / np.arange(1, cfg.n_items + 1) ** 0.7)
    titles = _titles(rng, cfg.n_items)

    # Users: genre tastes, a rating bias, and how many ratings they give.
    taste = rng.normal(0.0, 0.75, size=(cfg.n_users, n_g))
    bias = rng.normal(0.0, 0.35, size=cfg.n_users)
    counts = np.exp(rng.normal(np.log(cfg.median_ratings), 0.35, size=cfg.n_users))
    counts = np.clip(np.round(counts), 20, max(20, cfg.n_items // 2)).astype(int)

    # Taste match: mean taste over the item's genres.
    match = (taste @ item_genres.T) / item_genres.sum(axis=1)
    # Which items a user rates: popularity x expected enjoyment (Gumbel top-k = weighted sampling).
    logits = np.log(popularity)[None, :] + 0.8 * (match + quality[None, :])
    keys = logits + rng.gumbel(size=logits.shape)
    ratings_lines: list[str] = []
    for u in range(cfg.n_users):
        items = np.argsort(-keys[u], kind="stable")[: counts[u]]
        score = bias[u] + quality[items] + match[u, items] + rng.normal(0.0, cfg.noise, size=len(items))
        stars = 1 + np.searchsorted(_THRESHOLDS, score)
        # Timestamps: a start date, then increasing gaps (sessions of quick ratings, sometimes days apart).
        start = T0 + int(rng.integers(0, 600 * 86400))
        gaps = np.where(rng.random(len(items)) < 0.85, rng.integers(5, 300, len(items)),
                        rng.integers(3600, 20 * 86400, len(items)))
        times = start + np.cumsum(gaps)
        order = rng.permutation(len(items))  # the file is grouped by user but not sorted by time
        for j in order:
            ratings_lines.append(f"{u + 1}::{items[j] + 1}::{stars[j]}::{times[j]}")

    movie_lines = [
        f"{i + 1}::{titles[i]} ({years[i]})::{'|'.join(g for g, on in zip(ML_GENRES, item_genres[i]) if on)}"
        for i in range(cfg.n_items)
    ]
    genders = rng.choice(["F", "M"], size=cfg.n_users, p=[0.28, 0.72])
    ages = rng.choice(_AGES, size=cfg.n_users)
    occupations = rng.integers(0, 21, size=cfg.n_users)
    zips = rng.integers(10000, 99999, size=cfg.n_users)
    user_lines = [f"{u + 1}::{genders[u]}::{ages[u]}::{occupations[u]}::{zips[u]}" for u in range(cfg.n_users)]

    def encode(lines: list[str]) -> bytes:
        return ("\n".join(lines) + "\n").encode("ascii")

    return encode(ratings_lines), encode(movie_lines), encode(user_lines)


def write_synthetic(out: str | Path, cfg: SynthConfig = SynthConfig()) -> Path:
    """Write ratings.dat, movies.dat and users.dat under ``out`` (atomically); return ``out``."""
    out = Path(out)
    ratings, movies, users = generate(cfg)
    atomic_write_bytes(out / "ratings.dat", ratings)
    atomic_write_bytes(out / "movies.dat", movies)
    atomic_write_bytes(out / "users.dat", users)
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = SynthConfig()
    parser.add_argument("--out", required=True, type=Path, help="folder to write ratings.dat, movies.dat, users.dat")
    parser.add_argument("--n-users", type=ranged(int, min=1), default=d.n_users, help="number of users")
    parser.add_argument("--n-items", type=ranged(int, min=1), default=d.n_items, help="number of items")
    parser.add_argument("--seed", type=int, default=d.seed, help="random seed (same seed, same bytes)")
    parser.add_argument("--median-ratings", type=ranged(int, min=1), default=d.median_ratings,
                        help="median number of ratings per user (log-normal spread, 20 at least)")


def main(args: argparse.Namespace) -> int:
    cfg = SynthConfig(n_users=args.n_users, n_items=args.n_items, seed=args.seed, median_ratings=args.median_ratings)
    out = write_synthetic(args.out, cfg)
    n = (out / "ratings.dat").read_bytes().count(b"\n")
    print(f"wrote {n} ratings of {cfg.n_users} users on {cfg.n_items} items to {out} "
          f"(prepare it with: persona-tune prepare --dataset synthetic --data-dir {out} --out RUN)")
    return 0
