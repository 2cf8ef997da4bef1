"""Reference recommenders fit on a run's train rows, so the harness runs out of the box.

Item-kNN and matrix factorisation come from the `implicit` library (0.7.x; CPU wheels, no pins on
torch or pandas). LensKit 2025.x was the other candidate; its releases pin pandas < 3, which would
downgrade this project's pandas, so it is not used. Random and popularity are two lines of numpy
each (neither library ships them). All of them see the train rows as implicit feedback (every
rated item = 1).

| name | what |
|---|---|
| random | a seeded random order |
| popularity | number of train ratings of the item |
| itemknn-cosine | implicit.nearest_neighbours.CosineRecommender (K=50) |
| itemknn-bm25 | implicit.nearest_neighbours.BM25Recommender (K=50) |
| als-8, als-32 | implicit.als.AlternatingLeastSquares, 8 / 32 factors, 15 iterations |
| bpr-32 | implicit.bpr.BayesianPersonalizedRanking, 32 factors, 100 iterations |
| pop-als-blend | the mean of the popularity and als-32 rank percentiles per user |

Each recommender writes two kinds of slates in the recs format (persona_tune.simulate.recs):
- ``<name>``: top-k items the user has no train row for (simulated feedback; truth only where the
  user's held-out test rows rate the item);
- ``<name>@heldout``: a re-ranking of the user's held-out candidate items, so every row has a true
  rating (recommender-ranking agreement).
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pandas as pd
import scipy.sparse as sp

log = logging.getLogger(__name__)

HELDOUT_SUFFIX = "@heldout"
REFERENCE = ("random", "popularity", "itemknn-cosine", "itemknn-bm25", "als-8", "als-32", "bpr-32", "pop-als-blend")


@dataclass
class Interactions:
    users: np.ndarray  # user ids, row order of the matrix
    items: np.ndarray  # item ids, column order
    matrix: sp.csr_matrix  # users x items, 1 where the user has a train row

    @classmethod
    def from_train(cls, train: pd.DataFrame, item_ids: np.ndarray) -> "Interactions":
        users = np.sort(train["user_id"].unique())
        items = np.sort(np.asarray(item_ids))
        rows = np.searchsorted(users, train["user_id"].to_numpy())
        cols = np.searchsorted(items, train["item_id"].to_numpy())
        m = sp.csr_matrix((np.ones(len(train), dtype=np.float32), (rows, cols)), shape=(len(users), len(items)))
        m.sum_duplicates()
        m.data[:] = 1.0
        return cls(users, items, m)


def _implicit_scores(make_model: Callable) -> Callable[[Interactions], np.ndarray]:
    """A fit-and-score function for an implicit model (built inside, under one BLAS thread)."""
    def fit_score(data: Interactions) -> np.ndarray:
        from threadpoolctl import threadpool_limits

        with threadpool_limits(1, "blas"), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # implicit's notes on input formats and BLAS threads
            model = make_model()
            model.fit(data.matrix, show_progress=False)
        if hasattr(model, "user_factors"):
            return np.asarray(model.user_factors) @ np.asarray(model.item_factors).T
        return np.asarray((data.matrix @ model.similarity).todense())  # item-kNN: user row x item similarities
    return fit_score


def score_matrices(data: Interactions, names=REFERENCE, seed: int = 0) -> dict[str, np.ndarray]:
    """Each reference recommender's users x items score matrix (higher = recommended first)."""
    import implicit.als
    import implicit.bpr
    import implicit.nearest_neighbours as nn

    unknown = set(names) - set(REFERENCE)
    if unknown:
        raise ValueError(f"unknown reference recommender(s) {sorted(unknown)}; choose from {REFERENCE}")
    popularity = np.asarray(data.matrix.sum(0)).ravel().astype(float)
    als = implicit.als.AlternatingLeastSquares
    makers = {
        "random": lambda d: np.random.default_rng(seed).random(d.matrix.shape),
        "popularity": lambda d: np.broadcast_to(popularity, d.matrix.shape).copy(),
        "itemknn-cosine": _implicit_scores(lambda: nn.CosineRecommender(K=50, num_threads=1)),
        "itemknn-bm25": _implicit_scores(lambda: nn.BM25Recommender(K=50, num_threads=1)),
        "als-8": _implicit_scores(lambda: als(factors=8, iterations=15, random_state=seed, num_threads=1)),
        "als-32": _implicit_scores(lambda: als(factors=32, iterations=15, random_state=seed, num_threads=1)),
        "bpr-32": _implicit_scores(lambda: implicit.bpr.BayesianPersonalizedRanking(
            factors=32, iterations=100, random_state=seed, num_threads=1)),
    }
    scores = {}
    for name in names:
        if name != "pop-als-blend":
            scores[name] = np.asarray(makers[name](data), dtype=float)
    if "pop-als-blend" in names:
        pop = scores.get("popularity", makers["popularity"](data))
        als_scores = scores.get("als-32", makers["als-32"](data))
        scores["pop-als-blend"] = 0.5 * _percentile_rows(pop) + 0.5 * _percentile_rows(als_scores)
    return scores


def _percentile_rows(scores: np.ndarray) -> np.ndarray:
    return scores.argsort(1).argsort(1) / max(scores.shape[1] - 1, 1)


def reference_recs(train: pd.DataFrame, item_ids: np.ndarray, heldout: pd.DataFrame | None, k: int = 10,
                   names=REFERENCE, topk: bool = True, seed: int = 0, users=None) -> pd.DataFrame:
    """The recs table (recommender, user_id, item_id, rank, score) of every reference recommender,
    fit on all of ``train``, for ``users`` (default: every user of ``train``).

    ``heldout``: (user_id, item_id) candidates each ``<name>@heldout`` re-ranks (all of them ranked).
    ``topk``: also the top-``k`` slates of items without a train row.
    """
    data = Interactions.from_train(train, item_ids)
    scores = score_matrices(data, names, seed)
    wanted = np.arange(len(data.users)) if users is None else np.searchsorted(data.users, np.asarray(users))
    seen = data.matrix[wanted].toarray() > 0
    frames = []
    for name, s in scores.items():
        if topk:
            masked = np.where(seen, -np.inf, s[wanted])
            top = np.argsort(-masked, axis=1, kind="stable")[:, :k]
            frames.append(pd.DataFrame({
                "recommender": name, "user_id": np.repeat(data.users[wanted], k), "item_id": data.items[top].ravel(),
                "rank": np.tile(np.arange(1, k + 1), len(wanted)),
                "score": np.take_along_axis(s[wanted], top, 1).ravel()}))
        if heldout is not None and len(heldout):
            rows = np.searchsorted(data.users, heldout["user_id"].to_numpy())
            cols = np.searchsorted(data.items, heldout["item_id"].to_numpy())
            cand = pd.DataFrame({"recommender": name + HELDOUT_SUFFIX, "user_id": heldout["user_id"].to_numpy(),
                                 "item_id": heldout["item_id"].to_numpy(), "score": s[rows, cols]})
            cand = cand.sort_values(["user_id", "score", "item_id"], ascending=[True, False, True], kind="stable")
            cand["rank"] = cand.groupby("user_id").cumcount() + 1
            frames.append(cand)
    recs = pd.concat(frames, ignore_index=True)[["recommender", "user_id", "item_id", "rank", "score"]]
    return recs.astype({"user_id": "int64", "item_id": "int64", "rank": "int64"})
