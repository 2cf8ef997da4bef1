"""What other users' ratings say about an item, as known at a user's split time (leak-free history).

``prepare`` writes ``history.parquet``: every rating of the source log that is not a test row of a
sampled user (all users of the ratings file, not only the sampled ones), with timestamps. Two
definitions of "the history" of a row (``manifest["protocol"]["history"]``):

- ``before_split`` (the default for new runs): only ratings made before the split time of the row's
  user. The split time of a user is the timestamp of their first test row. The sampled users' split
  times are bucketed into N_BUCKETS quantile cutoffs (the split times at quantiles 0, 1/N, ...); a
  user's statistics come from the ratings strictly before the latest cutoff <= their split time, so
  no rating at or after their split time ever counts, and the whole history is summarised in N
  snapshots instead of one per user. With 16 buckets the snapshot is a few days older than the
  split time for most users (4 buckets lost most of the item-kNN gain on ML-1M; docs/results.md).
- ``all_time`` (runs prepared before this option, and ``prepare --history all_time``): every
  non-test rating counts, whatever its time. It reproduces the published cells: the item averages
  are then items.parquet's ``hist_avg`` / ``hist_count``, exactly as before.

Everything "from other users" goes through :class:`History`: the item averages and counts stated in
prompts and item texts, the bias baseline (:meth:`History.fit_bias`), and the collaborative
similarity of :class:`CollabIndex` (item-kNN with baseline, and the user's own train ratings of the
items most similar to a target: the collaborative memories).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp

from persona_tune.errors import ConfigError, DataError
from persona_tune.runfolder import HISTORY, ITEMS, RunFolder

HISTORY_MODES = ("before_split", "all_time")
DEFAULT_HISTORY = "before_split"
LEGACY_HISTORY = "all_time"  # a run whose manifest does not name a mode was prepared before the option
N_BUCKETS = 16
SHRINKAGE = 100.0  # of the similarity: sim * (n - 1) / (n - 1 + SHRINKAGE), n = common raters (Koren)
KNN_K = 50
LAMBDA_ITEM, LAMBDA_USER = 25.0, 10.0  # the bias baseline's regularisation (evaluation/baselines.py)


def check_history_mode(mode: str) -> str:
    if mode not in HISTORY_MODES:
        raise ConfigError(f"history must be one of {', '.join(HISTORY_MODES)}, got {mode!r}")
    return mode


def history_mode(run: RunFolder) -> str:
    """The run's history mode (manifest protocol.history; all_time for runs prepared before the option)."""
    return run.read_manifest().get("protocol", {}).get("history", LEGACY_HISTORY)


def history_rows(ratings: pd.DataFrame, test: pd.DataFrame) -> pd.DataFrame:
    """Every rating of ``ratings`` that is not a row of ``test`` (user_id, item_id, rating, timestamp)."""
    key = ["user_id", "item_id"]
    cols = ["user_id", "item_id", "rating", "timestamp"]
    merged = ratings[cols].merge(test[key].assign(_test=True), on=key, how="left")
    rows = merged.loc[merged["_test"].isna(), cols]
    return rows.sort_values(["timestamp", "user_id", "item_id"], kind="stable").reset_index(drop=True)


def split_times(test: pd.DataFrame) -> pd.Series:
    """Each sampled user's split time: the timestamp of their first test row."""
    return test.groupby("user_id")["timestamp"].min()


def bucket_cutoffs(times: np.ndarray, n_buckets: int = N_BUCKETS) -> np.ndarray:
    """The quantile cutoffs of the users' split times (each one a split time; the first is the earliest)."""
    times = np.asarray(times, dtype=np.int64)
    if len(times) == 0:
        raise DataError("no test rows: no split time to cut the history at")
    return np.unique(np.quantile(times, np.arange(n_buckets) / n_buckets, method="higher")).astype(np.int64)


@dataclass
class BaselineConfig:
    """The bias baseline's fit: its regularisation (lambda_i, lambda_u), and the seed of the MF references
    fitted beside it (`persona-tune baselines`, the classical simulator)."""

    lambda_item: float = 25.0
    lambda_user: float = 10.0
    seed: int = field(default=0, metadata={
        "help": "seed of the MF references (validation users' sample, SGD) and of the bootstrap"})


@dataclass
class Bias:
    """The bias baseline mu + b_u + b_i, with mu and b_i from the history of the user's bucket and b_u
    from the user's own train rows (Koren's regularised baseline; see evaluation/baselines.py)."""

    history: "History"
    mu: np.ndarray  # [n_buckets]
    b_i: np.ndarray  # [n_buckets, n_items]
    b_u: pd.Series  # by user_id

    def predict(self, user_ids, item_ids) -> np.ndarray:
        """mu + b_u + b_i for each (user, item), unclipped (an unknown user or item gets 0 bias)."""
        b, i = self.history.bucket_of(user_ids), self.history.item_index(item_ids)
        b_u = pd.Series(np.asarray(user_ids)).map(self.b_u).fillna(0.0).to_numpy(dtype=float)
        return self.mu[b] + b_u + np.where(i >= 0, self.b_i[b, np.maximum(i, 0)], 0.0)


class History:
    """Per-bucket item averages and counts of other users' ratings (see the module docstring).

    ``avg``/``count``: [n_buckets, n_items]; ``cutoffs``: the buckets' cutoff timestamps (all_time: one
    bucket, no cutoff); ``user_bucket``: user_id -> bucket (an unknown user gets the last bucket).
    ``rows`` (history.parquet, when the run has it) with ``first_bucket``: the first bucket each row
    counts in.
    """

    def __init__(self, mode: str, item_ids: np.ndarray, avg: np.ndarray, count: np.ndarray, cutoffs: np.ndarray,
                 user_bucket: dict[int, int], rows: pd.DataFrame | None = None):
        self.mode = check_history_mode(mode)
        self.item_ids = np.asarray(item_ids, dtype=np.int64)
        self._index = pd.Series(np.arange(len(self.item_ids)), index=self.item_ids)
        self.avg, self.count, self.cutoffs = avg, count, cutoffs
        self.user_bucket = user_bucket
        self.rows = rows
        self._collab: dict = {}

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_items(cls, items: pd.DataFrame, rows: pd.DataFrame | None = None) -> "History":
        """all_time: the items table's hist_avg / hist_count (one bucket, every user in it)."""
        items = items.sort_values("item_id")
        avg = items["hist_avg"].to_numpy(dtype=float)[None, :]
        count = items["hist_count"].to_numpy(dtype=float)[None, :]
        if rows is not None:
            rows = rows.assign(first_bucket=0)
        return cls("all_time", items["item_id"].to_numpy(), avg, count, np.array([np.iinfo(np.int64).max]), {}, rows)

    @classmethod
    def before_split(cls, rows: pd.DataFrame, test: pd.DataFrame, item_ids: Sequence[int],
                     n_buckets: int = N_BUCKETS) -> "History":
        """before_split: ``rows`` (history_rows) before each user's bucket cutoff; ``test``: the split."""
        times = split_times(test)
        cutoffs = bucket_cutoffs(times.to_numpy(), n_buckets)
        user_bucket = dict(zip(times.index.tolist(),
                               (np.searchsorted(cutoffs, times.to_numpy(), side="right") - 1).tolist()))
        item_ids = np.unique(np.concatenate([np.asarray(item_ids, dtype=np.int64),
                                             rows["item_id"].to_numpy(dtype=np.int64)]))
        # A row counts in every bucket whose cutoff is after it: from bucket searchsorted(right) on.
        first = np.searchsorted(cutoffs, rows["timestamp"].to_numpy(), side="right")
        idx = np.searchsorted(item_ids, rows["item_id"].to_numpy())
        keep = first < len(cutoffs)
        sums = np.zeros((len(cutoffs), len(item_ids)))
        count = np.zeros((len(cutoffs), len(item_ids)))
        np.add.at(sums, (first[keep], idx[keep]), rows["rating"].to_numpy(dtype=float)[keep])
        np.add.at(count, (first[keep], idx[keep]), 1.0)
        sums, count = sums.cumsum(0), count.cumsum(0)
        with np.errstate(invalid="ignore", divide="ignore"):
            avg = np.where(count > 0, sums / np.maximum(count, 1), np.nan)
        return cls("before_split", item_ids, avg, count, cutoffs, user_bucket, rows.assign(first_bucket=first))

    @classmethod
    def load(cls, run: RunFolder | str) -> "History":
        """The history of a prepared run, by its manifest's mode."""
        run = run if isinstance(run, RunFolder) else RunFolder(run)
        mode = history_mode(run)
        rows = run.read_table(HISTORY) if run.path(HISTORY).is_file() else None
        if mode == "all_time":
            return cls.from_items(run.read_items(columns=["item_id", "hist_avg", "hist_count"]), rows)
        run.require(HISTORY)
        return cls.before_split(rows, run.read_ratings("test", columns=["user_id", "timestamp"]),
                                run.read_items(columns=["item_id"])["item_id"].to_numpy())

    # ---------------------------------------------------------------- lookups
    @property
    def n_buckets(self) -> int:
        return self.avg.shape[0]

    def bucket_of(self, user_ids) -> np.ndarray:
        last = self.n_buckets - 1
        return np.array([self.user_bucket.get(int(u), last) for u in np.asarray(user_ids).tolist()], dtype=np.int64)

    def item_index(self, item_ids) -> np.ndarray:
        """Position of each item in ``item_ids`` (-1 for an item the history does not know)."""
        return self._index.reindex(np.asarray(item_ids, dtype=np.int64)).fillna(-1).to_numpy(dtype=np.int64)

    def row_stats(self, user_ids, item_ids) -> tuple[np.ndarray, np.ndarray]:
        """(average, count) of other users' ratings of each row's item, as known at its user's cutoff
        (NaN / 0 for an item nobody rated by then)."""
        b, i = self.bucket_of(user_ids), self.item_index(item_ids)
        ok = i >= 0
        avg = np.where(ok, self.avg[b, np.maximum(i, 0)], np.nan)
        count = np.where(ok, self.count[b, np.maximum(i, 0)], 0.0)
        return avg, count

    def bucket_stats(self, bucket: int) -> pd.DataFrame:
        """item_id, hist_avg, hist_count of one bucket (the items table's columns)."""
        return pd.DataFrame({"item_id": self.item_ids, "hist_avg": self.avg[bucket],
                             "hist_count": self.count[bucket].astype("int64")})

    def global_mean(self, bucket: int | None = None) -> np.ndarray | float:
        """mu: the mean of every history rating before each bucket's cutoff ([n_buckets], or one bucket's)."""
        total = np.nansum(self.avg * self.count, axis=1)
        n = self.count.sum(1)
        if not (n > 0).any():
            raise DataError("no item has a non-test rating (hist_count is 0 everywhere)", path=ITEMS)
        mu = np.where(n > 0, total / np.maximum(n, 1), np.nan)
        mu = pd.Series(mu).bfill().ffill().to_numpy()  # a bucket before any rating: the next one's mean
        return mu if bucket is None else float(mu[bucket])

    # ---------------------------------------------------------------- the bias baseline
    def fit_bias(self, train: pd.DataFrame, lambda_item: float = LAMBDA_ITEM, lambda_user: float = LAMBDA_USER) -> Bias:
        """mu + b_u + b_i: b_i = n (avg - mu) / (lambda_item + n) from the bucket's history, b_u = the
        user's train residuals (r - mu - b_i) summed over (lambda_user + n_u)."""
        mu = self.global_mean()
        avg = np.where(np.isnan(self.avg), mu[:, None], self.avg)
        b_i = self.count * (avg - mu[:, None]) / np.maximum(lambda_item + self.count, 1e-12)
        users = train["user_id"].to_numpy()
        b, i = self.bucket_of(users), self.item_index(train["item_id"].to_numpy())
        item_term = np.where(i >= 0, b_i[b, np.maximum(i, 0)], 0.0)
        resid = train["rating"].to_numpy(dtype=float) - mu[b] - item_term
        grouped = pd.DataFrame({"user_id": users, "resid": resid}).groupby("user_id")["resid"]
        return Bias(self, mu, b_i, grouped.sum() / (lambda_user + grouped.count()))

    # ---------------------------------------------------------------- collaborative similarity
    def residual_matrix(self, bucket: int, lambda_item: float = LAMBDA_ITEM,
                        lambda_user: float = LAMBDA_USER) -> tuple[sp.csc_matrix, dict[int, int]]:
        """Users x items (CSC) of the history before ``bucket``'s cutoff: r - mu - b_i - b_u, with the
        baseline fit on those ratings alone (every rater's own b_u); and user_id -> matrix row."""
        if self.rows is None:
            raise ConfigError("this run has no history.parquet (prepared before it existed): run `persona-tune "
                              "prepare` again into a new --out for collaborative similarity")
        if bucket not in self._collab:
            rows = self.rows[self.rows["first_bucket"].to_numpy() <= bucket]
            mu = self.global_mean(bucket)
            avg = np.where(np.isnan(self.avg[bucket]), mu, self.avg[bucket])
            b_i = self.count[bucket] * (avg - mu) / (lambda_item + self.count[bucket])
            i_idx = self.item_index(rows["item_id"].to_numpy())
            rows, i_idx = rows[i_idx >= 0], i_idx[i_idx >= 0]
            users, u_idx = np.unique(rows["user_id"].to_numpy(), return_inverse=True)
            resid = rows["rating"].to_numpy(dtype=float) - mu - b_i[i_idx]
            n_u = np.bincount(u_idx, minlength=len(users))
            b_u = np.bincount(u_idx, weights=resid, minlength=len(users)) / (lambda_user + n_u)
            z = resid - b_u[u_idx]
            shape = (len(users), len(self.item_ids))
            matrix = sp.csc_matrix((z, (u_idx, i_idx)), shape=shape)
            self._collab = {bucket: (matrix, dict(zip(users.tolist(), range(len(users)))))}  # one bucket at a time
        return self._collab[bucket]


def similarity(z: sp.csc_matrix, targets: np.ndarray, candidates: np.ndarray,
               shrinkage: float = SHRINKAGE) -> np.ndarray:
    """Shrunk Pearson-baseline similarity [len(targets), len(candidates)] of item columns of ``z`` (the
    residual matrix, History.residual_matrix): sum z_ui z_uj / sqrt(sum z_ui^2 sum z_uj^2), the sums
    over the users who rated both, times (n - 1) / (n - 1 + shrinkage) with n those users."""
    products = _Products(z[:, targets], z[:, candidates])
    return products.similarity(np.arange(len(targets)), np.arange(len(candidates)), shrinkage, None)


@dataclass
class CollabRows:
    """Per query row: the bias prediction (mu + b_u + b_i), the kNN residual (the similarity-weighted
    mean of the neighbours' residuals over the k_knn most similar rated items with positive similarity;
    0 without any), the weight behind it (the sum of those neighbours' similarities), and the k nearest
    neighbours (item_id, rating, residual, similarity), most similar first."""

    bias: np.ndarray
    knn_residual: np.ndarray
    neighbours: list[tuple[tuple[int, int, float, float], ...]]
    knn_weight: np.ndarray | None = None

    @property
    def knn(self) -> np.ndarray:
        return self.bias + self.knn_residual


class CollabIndex:
    """Item-kNN with baseline over a run's history, and the collaborative memories of each row: the
    user's own train ratings of the items most similar to the target (never the target itself, never
    a test row). The similarity is :func:`similarity` on the residuals of the history before the
    user's cutoff (History.residual_matrix); the user's own ratings are taken out of it, so a train
    row's neighbours and kNN residual do not see its own rating."""

    def __init__(self, history: History, train: pd.DataFrame, lambda_item: float = LAMBDA_ITEM,
                 lambda_user: float = LAMBDA_USER, shrinkage: float = SHRINKAGE):
        self.history, self.shrinkage = history, shrinkage
        self.lambdas = (lambda_item, lambda_user)
        self.train = train[["user_id", "item_id", "rating"]].reset_index(drop=True)
        self.bias = history.fit_bias(self.train, lambda_item, lambda_user)
        self.train_residual = self.train["rating"].to_numpy(dtype=float) - self.bias.predict(
            self.train["user_id"], self.train["item_id"])
        self._by_user = {u: np.asarray(ix) for u, ix in self.train.groupby("user_id").indices.items()}

    @classmethod
    def load(cls, run: RunFolder | str) -> "CollabIndex":
        run = run if isinstance(run, RunFolder) else RunFolder(run)
        return cls(History.load(run), run.read_ratings("train", columns=["user_id", "item_id", "rating"]))

    def query(self, user_ids, item_ids, k: int = 5, k_knn: int = KNN_K) -> CollabRows:
        """The CollabRows of each (user, item) row; ``k`` neighbours kept per row."""
        user_ids = np.asarray(user_ids, dtype=np.int64)
        item_ids = np.asarray(item_ids, dtype=np.int64)
        n = len(user_ids)
        bias = self.bias.predict(user_ids, item_ids)
        knn, mass = np.zeros(n), np.zeros(n)
        neighbours: list = [()] * n
        buckets = self.history.bucket_of(user_ids)
        tidx_all = self.history.item_index(item_ids)
        depth = max(k, k_knn)
        for bucket in np.unique(buckets):
            rows_b = np.flatnonzero(buckets == bucket)
            users_b = np.unique(user_ids[rows_b])
            own = [self._by_user.get(int(u), np.empty(0, dtype=np.int64)) for u in users_b]
            cand_items = np.unique(np.concatenate([self.train["item_id"].to_numpy()[o] for o in own] + [[]]))
            cidx = self.history.item_index(cand_items.astype(np.int64))
            known_t = tidx_all[rows_b] >= 0
            targets = np.unique(tidx_all[rows_b][known_t])
            cidx = cidx[cidx >= 0]
            if len(targets) == 0 or len(cidx) == 0:
                continue
            z, user_row = self.history.residual_matrix(int(bucket), *self.lambdas)
            zt, zc = z[:, targets], z[:, cidx]
            t_pos = pd.Series(np.arange(len(targets)), index=targets)
            c_pos = pd.Series(np.arange(len(cidx)), index=cidx)
            base = _Products(zt, zc)
            z_rows = z.tocsr()
            for u, rows_own in zip(users_b.tolist(), own):
                rows_u = rows_b[(user_ids[rows_b] == u) & (tidx_all[rows_b] >= 0)]
                if len(rows_u) == 0 or len(rows_own) == 0:
                    continue
                own_items = self.history.item_index(self.train["item_id"].to_numpy()[rows_own])
                ok = own_items >= 0
                rows_own, own_items = rows_own[ok], own_items[ok]
                tpos = t_pos.reindex(tidx_all[rows_u]).to_numpy()
                cpos = c_pos.reindex(own_items).to_numpy()
                r = user_row.get(u)
                exclude = None
                if r is not None:  # the user's own ratings in the history: taken out of the similarity
                    zrow = z_rows[r]
                    exclude = (_row_values(zrow, targets), _row_values(zrow, cidx))
                sim = base.similarity(tpos, cpos, self.shrinkage, exclude)
                sim[tidx_all[rows_u][:, None] == own_items[None, :]] = -np.inf  # never the target itself
                order = np.argsort(-sim, axis=1, kind="stable")[:, :depth]
                top = np.take_along_axis(sim, order, axis=1)
                resid = self.train_residual[rows_own][order]
                pos = top > 0
                weight = np.where(pos[:, :k_knn], top[:, :k_knn], 0.0)
                total = weight.sum(1)
                mass[rows_u] = total
                knn[rows_u] = np.where(total > 0, (weight * resid[:, :k_knn]).sum(1) / np.maximum(total, 1e-12), 0.0)
                ratings = self.train["rating"].to_numpy()[rows_own][order]
                items = self.train["item_id"].to_numpy()[rows_own][order]
                for j, row in enumerate(rows_u.tolist()):
                    m = int(pos[j, :k].sum())
                    neighbours[row] = tuple((int(items[j, q]), int(ratings[j, q]), float(resid[j, q]),
                                             float(top[j, q])) for q in range(m))
        return CollabRows(bias, knn, neighbours, mass)

    def knn_predict(self, user_ids, item_ids, k: int = KNN_K) -> np.ndarray:
        """Item-kNN with baseline: bias + the kNN residual over the ``k`` most similar rated items, unclipped."""
        return self.query(user_ids, item_ids, k=0, k_knn=k).knn


class _Products:
    """The four sums behind :func:`similarity` for one bucket's targets x candidates, computed once and
    sliced per user."""

    def __init__(self, zt: sp.csc_matrix, zc: sp.csc_matrix):
        bt, bc = (zt != 0).astype(np.float64), (zc != 0).astype(np.float64)
        self.p = (zt.T @ zc).toarray()
        self.n = (bt.T @ bc).toarray()
        self.qt = (zt.multiply(zt).T @ bc).toarray()
        self.qc = (bt.T @ zc.multiply(zc)).toarray()

    def similarity(self, tpos: np.ndarray, cpos: np.ndarray, shrinkage: float,
                   exclude: tuple[np.ndarray, np.ndarray] | None) -> np.ndarray:
        ix = np.ix_(tpos, cpos)
        p, n, qt, qc = self.p[ix], self.n[ix], self.qt[ix], self.qc[ix]
        if exclude is not None:
            et, ec = exclude[0][tpos], exclude[1][cpos]
            mt, mc = et != 0, ec != 0
            p = p - np.outer(et, ec)
            n = n - np.outer(mt, mc)
            qt = qt - np.outer(et ** 2, mc)
            qc = qc - np.outer(mt, ec ** 2)
        with np.errstate(invalid="ignore", divide="ignore"):
            sim = np.where((qt > 1e-12) & (qc > 1e-12), p / np.sqrt(np.maximum(qt * qc, 1e-300)), 0.0)
        shrink = np.maximum(n - 1, 0)
        return sim * shrink / (shrink + shrinkage)


def _row_values(row: sp.spmatrix, columns: np.ndarray) -> np.ndarray:
    """Dense values of one sparse row at ``columns``."""
    return np.asarray(row[:, columns].todense()).ravel()
