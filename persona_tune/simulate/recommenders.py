"""Recommenders fit on a run's train rows: the reference ones of `persona-tune simulate` and the wider
set of the validity protocol (persona_tune.simulate.validity).

Item-kNN and matrix factorisation come from the `implicit` library (0.7.x; CPU wheels, no pins on
torch or pandas), SVD on the explicit ratings from `scikit-surprise`. LensKit 2025.x was the other
candidate; its releases pin pandas < 3, which would downgrade this project's pandas, so it is not
used. Random, popularity, EASE (a closed form, Steck 2019) and the blends are a few lines of numpy
(no maintained library ships them for this input). All but SVD see the train rows as implicit
feedback (every rated item = 1).

Slates are the same on every x86 CPU: ALS is fit in float64 (in float32 the BLAS kernels of AVX2 and
AVX-512 CPUs give scores 1e-4 apart after 15 iterations, enough to swap neighbouring items; in float64
1e-14), and every ranking sorts stably, ties by item id (numpy's default sort orders ties differently
under AVX-512). The exception is als-128 on few users (ML-1M's 200: more factors than the data pin
down), whose float64 differences still grow enough to swap a few held-out items (nDCG 1e-4 apart).

| name | what |
|---|---|
| random | a seeded random order |
| popularity | number of train ratings of the item |
| itemknn-cosine | implicit.nearest_neighbours.CosineRecommender (K=50) |
| itemknn-bm25 | implicit.nearest_neighbours.BM25Recommender (K=50) |
| als-8, als-32 | implicit.als.AlternatingLeastSquares, 8 / 32 factors, 15 iterations |
| bpr-32 | implicit.bpr.BayesianPersonalizedRanking, 32 factors, 100 iterations |
| pop-als-blend | the mean of the popularity and als-32 rank percentiles per user |

The validity protocol adds (VALIDITY):

| name | what |
|---|---|
| als-128 | implicit ALS, 128 factors, 15 iterations |
| bpr-8 | implicit BPR, 8 factors, 100 iterations |
| ease | EASE, B = I - P diag(1/diag P), P = (X'X + 500 I)^-1 over the items with a train row |
| svd | surprise.SVD (100 factors, 20 epochs) on the explicit train ratings; the predicted rating |
| als-32-noise0.5/1/2 | als-32 plus Gaussian noise of 0.5 / 1 / 2 times the sd of each user's als-32 scores |
| pop-random-blend | the mean of the popularity and random rank percentiles per user |

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
NOISE_LEVELS = (0.5, 1.0, 2.0)  # of the degraded als-32-noise<level>
VALIDITY = (*REFERENCE, "als-128", "bpr-8", "ease", "svd", *(f"als-32-noise{lv:g}" for lv in NOISE_LEVELS),
            "pop-random-blend")
EASE_L2 = 500.0


@dataclass
class Interactions:
    users: np.ndarray  # user ids, row order of the matrix
    items: np.ndarray  # item ids, column order
    matrix: sp.csr_matrix  # users x items, 1 where the user has a train row
    ratings: pd.DataFrame | None = None  # the explicit train rows (user_id, item_id, rating), for SVD

    @classmethod
    def from_train(cls, train: pd.DataFrame, item_ids: np.ndarray) -> "Interactions":
        users = np.sort(train["user_id"].unique())
        items = np.sort(np.asarray(item_ids))
        rows = np.searchsorted(users, train["user_id"].to_numpy())
        cols = np.searchsorted(items, train["item_id"].to_numpy())
        m = sp.csr_matrix((np.ones(len(train), dtype=np.float32), (rows, cols)), shape=(len(users), len(items)))
        m.sum_duplicates()
        m.data[:] = 1.0
        explicit = train[["user_id", "item_id", "rating"]] if "rating" in train.columns else None
        return cls(users, items, m, explicit)


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
    """Each named recommender's users x items score matrix (higher = recommended first)."""
    import implicit.als
    import implicit.bpr
    import implicit.nearest_neighbours as nn

    unknown = set(names) - set(VALIDITY)
    if unknown:
        raise ValueError(f"unknown recommender(s) {sorted(unknown)}; choose from {VALIDITY}")
    popularity = np.asarray(data.matrix.sum(0)).ravel().astype(float)
    als = implicit.als.AlternatingLeastSquares
    bpr = implicit.bpr.BayesianPersonalizedRanking
    als_args = {"dtype": np.float64, "random_state": seed, "num_threads": 1}  # float64: see the module's docstring
    makers = {
        "random": lambda d: np.random.default_rng(seed).random(d.matrix.shape),
        "popularity": lambda d: np.broadcast_to(popularity, d.matrix.shape).copy(),
        "itemknn-cosine": _implicit_scores(lambda: nn.CosineRecommender(K=50, num_threads=1)),
        "itemknn-bm25": _implicit_scores(lambda: nn.BM25Recommender(K=50, num_threads=1)),
        "als-8": _implicit_scores(lambda: als(factors=8, iterations=15, **als_args)),
        "als-32": _implicit_scores(lambda: als(factors=32, iterations=15, **als_args)),
        "als-128": _implicit_scores(lambda: als(factors=128, iterations=15, **als_args)),
        "bpr-8": _implicit_scores(lambda: bpr(factors=8, iterations=100, random_state=seed, num_threads=1)),
        "bpr-32": _implicit_scores(lambda: bpr(factors=32, iterations=100, random_state=seed, num_threads=1)),
        "ease": _ease_scores,
        "svd": lambda d: _svd_scores(d, seed),
    }
    scores: dict[str, np.ndarray] = {}

    def get(name: str) -> np.ndarray:
        if name not in scores:
            scores[name] = np.asarray(makers[name](data), dtype=float)
        return scores[name]

    out = {}
    for name in names:
        if name == "pop-als-blend":
            out[name] = 0.5 * _percentile_rows(get("popularity")) + 0.5 * _percentile_rows(get("als-32"))
        elif name == "pop-random-blend":
            out[name] = 0.5 * _percentile_rows(get("popularity")) + 0.5 * _percentile_rows(get("random"))
        elif name.startswith("als-32-noise"):
            level = float(name.removeprefix("als-32-noise"))
            base = get("als-32")
            rng = np.random.default_rng([seed, int(level * 1000)])
            out[name] = base + level * base.std(1, keepdims=True) * rng.standard_normal(base.shape)
        else:
            out[name] = get(name)
    return out


def _ease_scores(data: Interactions, l2: float = EASE_L2) -> np.ndarray:
    """EASE (Steck 2019): B = I - P / diag(P), P = (X'X + l2 I)^-1, scores X B; items without a train row score 0."""
    x = data.matrix
    used = np.flatnonzero(np.asarray(x.sum(0)).ravel() > 0)
    xu = x[:, used].toarray()
    p = np.linalg.inv(xu.T @ xu + l2 * np.eye(len(used)))
    b = -p / np.diag(p)
    np.fill_diagonal(b, 0.0)
    out = np.zeros(x.shape)
    out[:, used] = xu @ b
    return out


def _svd_scores(data: Interactions, seed: int) -> np.ndarray:
    """surprise.SVD fit on the explicit train ratings; its predicted rating for every (user, item)."""
    from surprise import SVD, Dataset, Reader

    if data.ratings is None:
        raise ValueError("svd needs the explicit ratings (Interactions.from_train of rows with a rating column)")
    trainset = Dataset.load_from_df(data.ratings[["user_id", "item_id", "rating"]], Reader(rating_scale=(1, 5))
                                    ).build_full_trainset()
    algo = SVD(random_state=seed)
    algo.fit(trainset)
    inner_u = np.array([trainset.to_inner_uid(u) for u in data.users])
    known = {raw: inner for raw, inner in ((trainset.to_raw_iid(i), i) for i in trainset.all_items())}
    cols = np.array([known.get(i, -1) for i in data.items])
    has = cols >= 0
    out = trainset.global_mean + algo.bu[inner_u][:, None] + np.zeros((len(data.users), len(data.items)))
    out[:, has] += algo.bi[cols[has]][None, :] + algo.pu[inner_u] @ algo.qi[cols[has]].T
    return out


def _percentile_rows(scores: np.ndarray) -> np.ndarray:
    return scores.argsort(1, kind="stable").argsort(1, kind="stable") / max(scores.shape[1] - 1, 1)


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
