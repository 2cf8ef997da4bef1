"""Classical references fitted on the same information as the agents (issue 24, item 2).

Every row of a run is scored with what the agents are given: the user's own train rows and the
other users' non-test ratings of the run's history (persona_tune/history.py): before_split, only
ratings made before the cutoff of the row's user's history bucket; all_time, every non-test rating.
Next to the bias baseline (``baselines.py``, from the same history):

- ``knn``: item-kNN with baseline, bias + the similarity-weighted mean of the user's train residuals on
  the KNN_K most similar items they rated (shrunk Pearson-baseline similarity of the history's
  residuals; :class:`persona_tune.history.CollabIndex`, the similarity the collaborative memories use).
- ``mf``: biased matrix factorisation (scikit-surprise's ``SVD``: mu + b_u + b_i + p_u . q_i, SGD),
  fitted once per history bucket on the history before its cutoff plus the train rows of the
  bucket's users (all_time: one fit on the whole history, which holds the train rows). The number of
  factors and the regularisation are chosen from MF_FACTORS x MF_REGS on validation users: up to
  VALIDATION_USERS users of the source log who are *not* sampled, with as many ratings as the
  protocol's users, split chronologically with the protocol's train share; each candidate is fitted
  on every history rating except the validation users' held-out ones and scored on those (a run
  whose log has no such user validates on the last 40% of each sampled user's train rows instead).
  The tuning uses other users' ratings whatever their time; the fitted predictions never see a
  rating at or after the row's cutoff, nor any test row.

Both are cached under RUN/references/ (runfolder.REFERENCES_DIR): the tuning (mf_tuning.json), one
part per history bucket and reference (parts/, written atomically with a fingerprint of their
inputs, so a killed run resumes) and the predictions of every test row (predictions.parquet). The
`baselines` stage adds them to eval/baselines/ and `report` pairs every cell with them.
Predictions are clipped to [1, 5].
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

from persona_tune.errors import ConfigError
from persona_tune.history import KNN_K, LAMBDA_ITEM, LAMBDA_USER, SHRINKAGE, CollabIndex, History
from persona_tune.runfolder import (
    HISTORY,
    RATINGS_TEST,
    RATINGS_TRAIN,
    REFERENCE_PARTS,
    REFERENCE_PREDICTIONS,
    REFERENCE_TUNING,
    RunFolder,
    atomic_write_json,
    atomic_write_parquet,
)

log = logging.getLogger(__name__)

REFERENCES = ("knn", "mf")  # beside the bias baseline of baselines.py
MF_FACTORS = (16, 64, 256)
MF_REGS = (0.02, 0.05, 0.1)
MF_EPOCHS = 40  # SGD epochs at surprise's default learning rate (0.005); fixed, not tuned
VALIDATION_USERS = 200
FALLBACK_VALIDATION = 0.4  # without other users: the last 40% of each sampled user's train rows


@dataclass(frozen=True)
class MFParams:
    n_factors: int
    reg: float
    n_epochs: int = MF_EPOCHS


def fit_mf(ratings: pd.DataFrame, params: MFParams, seed: int = 0):
    """scikit-surprise's biased SVD fitted on ``ratings`` (user_id, item_id, rating)."""
    from surprise import SVD, Dataset, Reader

    data = Dataset.load_from_df(ratings[["user_id", "item_id", "rating"]], Reader(rating_scale=(1, 5)))
    return SVD(n_factors=params.n_factors, reg_all=params.reg, n_epochs=params.n_epochs,
               random_state=seed).fit(data.build_full_trainset())


def predict_mf(algo, user_ids, item_ids) -> np.ndarray:
    """The fitted model's rating of each (user, item), clipped to 1-5 (an unknown user or item drops its terms)."""
    return np.array([algo.predict(u, i, clip=True).est for u, i in zip(np.asarray(user_ids).tolist(),
                                                                        np.asarray(item_ids).tolist())])


def _rmse(pred: np.ndarray, truth) -> float:
    return float(np.sqrt(np.mean((pred - np.asarray(truth, dtype=float)) ** 2)))


def validation_split(rows: pd.DataFrame, train: pd.DataFrame, protocol: dict,
                     n_users: int = VALIDATION_USERS, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame, str]:
    """(fit rows, held-out rows, what they are) for tuning MF: see the module docstring.

    ``rows``: every non-test rating (history.parquet); ``train``: the sampled users' train rows;
    ``protocol``: the manifest's (min_ratings, max_ratings, train_frac)."""
    from persona_tune.data.split import split_chronological

    key = ["user_id", "item_id"]
    sampled = set(train["user_id"].unique().tolist())
    counts = rows.groupby("user_id").size()
    low, high = protocol.get("min_ratings", 1), protocol.get("max_ratings", np.inf)
    eligible = np.sort([u for u in counts[(counts >= low) & (counts <= high)].index.tolist() if u not in sampled])
    frac = float(protocol.get("train_frac", 0.6))
    if len(eligible):
        users = np.sort(np.random.default_rng(seed).choice(eligible, size=min(n_users, len(eligible)), replace=False))
        _, held = split_chronological(rows, users, frac)
        what = (f"{len(users)} users not sampled ({low}-{high} ratings), each split chronologically "
                f"{frac:g}:{1 - frac:g}; fit on every other history rating")
    else:
        _, held = split_chronological(train, np.sort(list(sampled)), 1.0 - FALLBACK_VALIDATION)
        what = (f"no unsampled user has {low}-{high} ratings: the last {FALLBACK_VALIDATION:.0%} of each sampled "
                f"user's train rows; fit on every other history rating")
    merged = rows.merge(held[key].assign(_held=True), on=key, how="left")
    fit = merged.loc[merged["_held"].isna(), rows.columns].reset_index(drop=True)
    return fit, held.reset_index(drop=True), what


def tune_mf(fit: pd.DataFrame, held: pd.DataFrame, factors=None, regs=None, n_epochs: int = MF_EPOCHS,
            seed: int = 0) -> dict:
    """RMSE on ``held`` of MF fitted on ``fit`` for each (factors, reg) (default MF_FACTORS x MF_REGS);
    ``chosen``: the lowest."""
    grid = []
    for n_factors in factors or MF_FACTORS:
        for reg in regs or MF_REGS:
            params = MFParams(int(n_factors), float(reg), int(n_epochs))
            algo = fit_mf(fit, params, seed)
            grid.append({**asdict(params), "rmse": _rmse(predict_mf(algo, held["user_id"], held["item_id"]),
                                                         held["rating"])})
            log.info("mf: %d factors, reg %g: validation RMSE %.4f", n_factors, reg, grid[-1]["rmse"])
    best = min(grid, key=lambda g: g["rmse"])
    return {"grid": grid, "chosen": {k: best[k] for k in ("n_factors", "reg", "n_epochs")},
            "validation_rows": len(held), "validation_users": int(held["user_id"].nunique()), "fit_rows": len(fit)}


def mf_fit_rows(history: History, train: pd.DataFrame, bucket: int) -> pd.DataFrame:
    """What MF for ``bucket`` is fitted on: the history rows before its cutoff, plus the train rows of
    the bucket's users (those at or after the cutoff are not in the history's part)."""
    rows = history.rows
    before = rows[rows["first_bucket"].to_numpy() <= bucket]
    users = train["user_id"].to_numpy()
    own = train[history.bucket_of(users) == bucket]
    both = pd.concat([before[["user_id", "item_id", "rating"]], own[["user_id", "item_id", "rating"]]])
    return both.drop_duplicates(["user_id", "item_id"], keep="first", ignore_index=True)


class References:
    """The kNN and MF references of one run folder, cached under RUN/references/ (module docstring)."""

    def __init__(self, run: RunFolder | str, seed: int = 0):
        self.run = run if isinstance(run, RunFolder) else RunFolder(run)
        self.seed = seed
        if not self.run.path(HISTORY).is_file():
            raise ConfigError(f"{self.run.path(HISTORY)} is missing (the run was prepared before it existed): "
                              f"run `persona-tune prepare` again into a new --out for the kNN and MF references")
        self.history = History.load(self.run)
        self.train = self.run.read_ratings("train", columns=["user_id", "item_id", "rating", "timestamp"])
        self.test = self.run.read_ratings("test", columns=["user_id", "item_id", "rating"])
        self.fingerprint = self._fingerprint()

    def _fingerprint(self) -> str:
        what = {"inputs": self.run.checksums(HISTORY, RATINGS_TRAIN, RATINGS_TEST), "mode": self.history.mode,
                "cutoffs": self.history.cutoffs.tolist(), "seed": self.seed, "knn_k": KNN_K, "shrinkage": SHRINKAGE,
                "lambdas": [LAMBDA_ITEM, LAMBDA_USER], "mf_grid": [list(MF_FACTORS), list(MF_REGS), MF_EPOCHS],
                "validation_users": VALIDATION_USERS}
        return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]

    def _cached(self, relpath: str) -> pd.DataFrame | None:
        path = self.run.path(relpath)
        stamp = path.with_name(path.name + ".json")
        if not path.is_file() or not stamp.is_file():
            return None
        if json.loads(stamp.read_text()).get("fingerprint") != self.fingerprint:
            return None
        return pd.read_parquet(path)

    def _store(self, relpath: str, frame: pd.DataFrame, **info) -> pd.DataFrame:
        path = self.run.path(relpath)
        atomic_write_parquet(frame, path)
        atomic_write_json(path.with_name(path.name + ".json"), {"fingerprint": self.fingerprint, **info})
        return frame

    def mf_tuning(self) -> dict:
        """The MF hyperparameters chosen on validation users (REFERENCE_TUNING; computed once)."""
        path = self.run.path(REFERENCE_TUNING)
        if path.is_file():
            cached = json.loads(path.read_text())
            if cached.get("fingerprint") == self.fingerprint:
                return cached
        protocol = self.run.read_manifest().get("protocol", {})
        fit, held, what = validation_split(self.history.rows[["user_id", "item_id", "rating", "timestamp"]],
                                           self.train, protocol, seed=self.seed)
        tuning = {**tune_mf(fit, held, seed=self.seed), "validation": what, "fingerprint": self.fingerprint}
        atomic_write_json(path, tuning)
        return tuning

    def describe(self) -> dict:
        """What the references are fitted with (for metrics.json and the report)."""
        tuning = self.mf_tuning()
        return {"history": self.history.mode, "buckets": int(self.history.n_buckets), "knn_k": KNN_K,
                "knn_shrinkage": SHRINKAGE, "mf": tuning["chosen"], "mf_validation": tuning["validation"],
                "mf_grid": {"n_factors": list(MF_FACTORS), "reg": list(MF_REGS), "n_epochs": MF_EPOCHS}}

    def predictions(self) -> pd.DataFrame:
        """Every test row (user_id, item_id, rating) with the ``knn`` and ``mf`` references."""
        cached = self._cached(REFERENCE_PREDICTIONS)
        if cached is not None:
            return cached
        params = MFParams(**self.mf_tuning()["chosen"])
        out = self.test.copy()
        out["knn"], out["mf"] = np.nan, np.nan
        buckets = self.history.bucket_of(out["user_id"].to_numpy())
        index = None
        for bucket in np.unique(buckets):
            rows = np.flatnonzero(buckets == bucket)
            part = f"{REFERENCE_PARTS}/bucket-{bucket:03d}.parquet"
            done = self._cached(part)
            if done is None:
                if index is None:
                    index = CollabIndex(self.history, self.train)
                users, items = out["user_id"].to_numpy()[rows], out["item_id"].to_numpy()[rows]
                knn = np.clip(index.knn_predict(users, items, k=KNN_K), 1.0, 5.0)
                mf = predict_mf(fit_mf(mf_fit_rows(self.history, self.train, int(bucket)), params, self.seed),
                                users, items)
                done = self._store(part, pd.DataFrame({"user_id": users, "item_id": items, "knn": knn, "mf": mf}),
                                   bucket=int(bucket), mf=asdict(params))
                log.info("references: bucket %d of %d (%d rows) done", bucket + 1, self.history.n_buckets, len(rows))
            out.loc[rows, "knn"] = done["knn"].to_numpy()
            out.loc[rows, "mf"] = done["mf"].to_numpy()
        return self._store(REFERENCE_PREDICTIONS, out, mf=asdict(params), history=self.history.mode,
                           buckets=int(self.history.n_buckets))


def reference_predictions(run: RunFolder | str, seed: int = 0) -> pd.DataFrame:
    """The kNN and MF references of every test row of ``run`` (cached; see :class:`References`)."""
    return References(run, seed).predictions()
