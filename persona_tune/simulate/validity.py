"""The validity protocol: does a simulator order recommenders the way the users' held-out ratings do?

    persona-tune simulate --run RUN --validity --variant V [--predictions [NAME=]FILE ...]

Sixteen recommenders of a wide spread of quality (persona_tune.simulate.recommenders.VALIDITY), fit
on the run's train rows, each rank every sampled user's **whole** held-out set. Against the truth
(binary relevance: the user rated the item >= 4) each gets nDCG@k and recall@k per user; against a
simulator the same metrics take the simulator's p_like as relevance (its expected gain). Means over
users order the recommenders; the agreement of a simulator's ordering with the true one is

- Kendall tau-b and Spearman rho between the recommenders' true and simulated means (scipy);
- pairs_correct: of the recommender pairs whose true difference is significant (a paired bootstrap
  over users, 95% CI excluding 0), the share the simulator orders the same way (a tie is wrong);

each with a percentile bootstrap CI over users. Every statistic here is a function of per-user
weights, so one matrix of resampled weights serves all of them, and a paired difference between
two simulators (agent minus classical) is the difference on the same resamples.

The simulators, side by side on the same users and rows: the run's agent (``--variant``, scored
through the resumable parts of persona_tune.simulate.run), any ``--predictions`` files, the
classical simulator (the bias baseline), and two nulls: a popularity rater (a rating that depends
only on how often the item was rated) and an item-blind rater (the user's own train rating
histogram for every item). Their fidelity metrics are the ones of persona_tune.simulate.fidelity,
plus the taste AUC pooled over all (liked, disliked) pairs, and the watch AUC (held-out against
unrated items, threshold-free).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import rankdata, wasserstein_distance
from sklearn.metrics import ndcg_score

from persona_tune.errors import ConfigError, DataError
from persona_tune.history import History
from persona_tune.runfolder import RunFolder, atomic_write_json, atomic_write_parquet
from persona_tune.simulate.classical import BiasRater, rating_distribution
from persona_tune.simulate.fidelity import LIKE_AT, PROB_COLUMNS, RATINGS, resample_weights
from persona_tune.simulate.recommenders import VALIDITY, Interactions, score_matrices
from persona_tune.simulate.scoring import make_probes, read_inputs, sample_users, score_with_agent

log = logging.getLogger(__name__)

CLASSICAL, POPULARITY, ITEM_BLIND, TRUTH = "classical", "popularity", "item-blind", "truth"
NULLS = (POPULARITY, ITEM_BLIND)


# ---------------------------------------------------------------- the null simulators


@dataclass
class PopularityRater:
    """A rating that depends only on how many other users rated the item (as known at the user's split
    time: persona_tune.history.History.row_stats): a least-squares line of the train ratings on
    log(1 + count), with the Gaussian residual of the classical simulator
    (persona_tune.simulate.classical.rating_distribution)."""
    slope: float
    intercept: float
    sigma: float
    history: History

    @classmethod
    def fit(cls, train: pd.DataFrame, history: History) -> "PopularityRater":
        x = np.log1p(history.row_stats(train["user_id"], train["item_id"])[1])
        y = train["rating"].to_numpy(float)
        slope, intercept = np.polyfit(x, y, 1)
        sigma = float(np.sqrt(np.mean((y - (slope * x + intercept)) ** 2)))
        return cls(float(slope), float(intercept), max(sigma, 1e-3), history)

    def rate(self, user_ids, item_ids) -> pd.DataFrame:
        x = np.log1p(self.history.row_stats(user_ids, item_ids)[1])
        return rating_distribution(self.slope * x + self.intercept, self.sigma)


@dataclass
class ItemBlindRater:
    """Never looks at the item: each user's train rating histogram is their distribution for every item."""
    hist: pd.DataFrame  # user_id -> p1..p5

    @classmethod
    def fit(cls, train: pd.DataFrame) -> "ItemBlindRater":
        counts = pd.crosstab(train["user_id"], train["rating"].astype(int)).reindex(columns=range(1, 6), fill_value=0)
        hist = counts.div(counts.sum(axis=1), axis=0)
        hist.columns = PROB_COLUMNS
        return cls(hist)

    def rate(self, user_ids, item_ids) -> pd.DataFrame:
        return with_summaries(self.hist.reindex(np.asarray(user_ids)).reset_index(drop=True))


def with_summaries(probs: pd.DataFrame) -> pd.DataFrame:
    """p1..p5 plus expected_rating and p_like (= p(rating >= 4))."""
    p = probs[PROB_COLUMNS].to_numpy(float)
    out = pd.DataFrame(p, columns=PROB_COLUMNS)
    out["expected_rating"] = p @ RATINGS
    out["p_like"] = p[:, LIKE_AT - 1:].sum(1)
    return out


def load_predictions(spec: str, rows: pd.DataFrame) -> tuple[str, pd.DataFrame]:
    """``[NAME=]FILE`` (CSV or Parquet with user_id, item_id, p1..p5; e.g. an eval predictions.parquet):
    the simulator's name (NAME, else the file's stem) and its ratings of ``rows`` (user_id, item_id)."""
    name, _, path = spec.rpartition("=") if "=" in spec else ("", "", spec)
    path = Path(path)
    name = name or path.stem
    if not path.is_file():
        raise ConfigError(f"--predictions {path}: no such file")
    try:
        table = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
    except Exception as e:  # noqa: BLE001 - any reader error is the file's
        raise DataError(f"{path}: cannot read ({type(e).__name__}: {e})") from None
    missing = [c for c in ("user_id", "item_id", *PROB_COLUMNS) if c not in table.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; need user_id, item_id, p1..p5")
    table = table.dropna(subset=PROB_COLUMNS).drop_duplicates(["user_id", "item_id"], keep="last")
    probs = table[PROB_COLUMNS].to_numpy(float)
    bad = np.flatnonzero((probs < 0).any(1) | (np.abs(probs.sum(1) - 1) > 1e-3))
    if len(bad):
        raise DataError(f"{path}: row {int(bad[0]) + 1}: p1..p5 must be >= 0 and sum to 1")
    # Renormalised so the columns sum to exactly 1 (the agents' rating_mass is the share on "1".."5").
    table = pd.concat([table[["user_id", "item_id"]].reset_index(drop=True),
                       with_summaries(pd.DataFrame(probs / probs.sum(1, keepdims=True), columns=PROB_COLUMNS))], axis=1)
    out = rows[["user_id", "item_id"]].merge(table.astype({"user_id": "int64", "item_id": "int64"}),
                                            on=["user_id", "item_id"], how="left")
    return name, out


# ---------------------------------------------------------------- per-user ranking metrics


def rank_heldout(heldout: pd.DataFrame, scores: dict[str, np.ndarray], data: Interactions, seed: int = 0) -> pd.DataFrame:
    """recommender, user_id, item_id, rank: each recommender's order of each user's held-out items
    (ties in a recommender's scores broken by one seeded random order, the same for every recommender)."""
    rows = np.searchsorted(data.users, heldout["user_id"].to_numpy())
    cols = np.searchsorted(data.items, heldout["item_id"].to_numpy())
    tiebreak = np.random.default_rng(seed).random(len(heldout))
    frames = []
    for name, s in scores.items():
        order = np.lexsort((tiebreak, -s[rows, cols], heldout["user_id"].to_numpy()))
        ranked = heldout.iloc[order][["user_id", "item_id"]].reset_index(drop=True)
        ranked["rank"] = ranked.groupby("user_id").cumcount() + 1
        frames.append(ranked.assign(recommender=name))
    return pd.concat(frames, ignore_index=True)[["recommender", "user_id", "item_id", "rank"]]


def ndcg_recall(relevance: np.ndarray, ranks: np.ndarray, k: int) -> tuple[float, float]:
    """nDCG@k (sklearn, gains = ``relevance``) and recall@k = relevance in the top k / all relevance, of
    one user's list in ``ranks`` order; NaN for both when no item is relevant. (The reference for
    ``user_metrics``, which computes the same for every list at once.)"""
    relevance = np.asarray(relevance, float)
    total = relevance.sum()
    if total <= 0:
        return math.nan, math.nan
    ranks = np.asarray(ranks)
    ndcg = float(ndcg_score([relevance], [-ranks.astype(float)], k=k)) if len(relevance) > 1 else 1.0
    return ndcg, float(relevance[ranks <= k].sum() / total)


def user_metrics(ranked: pd.DataFrame, relevance: dict[str, pd.Series], k: int) -> pd.DataFrame:
    """One row per (source, recommender, user): nDCG@k and recall@k with that source's relevance
    (``relevance``: source -> Series on (user_id, item_id), e.g. truth = rating >= 4, a simulator =
    p_like), for every list at once: DCG = sum of gain / log2(rank + 1) over ranks <= k, over the
    ideal DCG of the user's gains sorted; equal to ``ndcg_recall`` (sklearn's ndcg_score) list by list."""
    key = pd.MultiIndex.from_frame(ranked[["user_id", "item_id"]])
    rank = ranked["rank"].to_numpy()
    discount = np.where(rank <= k, 1.0 / np.log2(rank + 1.0), 0.0)
    frames = []
    for source, rel in relevance.items():
        gain = rel.reindex(key).to_numpy(float)
        rows = ranked[["recommender", "user_id"]].assign(dcg=gain * discount, top=gain * (rank <= k), gain=gain)
        per = rows.groupby(["recommender", "user_id"], sort=True).agg(dcg=("dcg", "sum"), top=("top", "sum"),
                                                                      total=("gain", "sum"))
        # The ideal DCG of a user's gains does not depend on the recommender: from one user's list.
        one = rel.reindex(pd.MultiIndex.from_frame(ranked.loc[ranked["recommender"] == ranked["recommender"].iloc[0],
                                                              ["user_id", "item_id"]]))
        ideal = one.rename("gain").reset_index().sort_values(["user_id", "gain"], ascending=[True, False])
        pos = ideal.groupby("user_id").cumcount().to_numpy() + 1
        ideal["idcg"] = ideal["gain"].to_numpy(float) * np.where(pos <= k, 1.0 / np.log2(pos + 1.0), 0.0)
        idcg = ideal.groupby("user_id")["idcg"].sum()
        per = per.join(idcg, on="user_id")
        ok = per["total"] > 0
        with np.errstate(invalid="ignore", divide="ignore"):
            per["ndcg"] = np.where(ok, per["dcg"] / per["idcg"], np.nan)
            per["recall"] = np.where(ok, per["top"] / per["total"], np.nan)
        frames.append(per.reset_index()[["recommender", "user_id", "ndcg", "recall"]].assign(source=source))
    return pd.concat(frames, ignore_index=True)[["source", "recommender", "user_id", "ndcg", "recall"]]


# ---------------------------------------------------------------- statistics of per-user weights


def weight_matrix(n_users: int, n_boot: int, seed: int) -> np.ndarray:
    """Row 0: every user once (the point estimate); rows 1..n_boot: bootstrap resamples of users."""
    ones = np.ones((1, n_users))
    return ones if n_boot <= 0 else np.vstack([ones, resample_weights(n_users, n_boot, seed)])


def summarize(samples: np.ndarray, level: float = 0.95) -> dict:
    """{value, lo, hi}: samples[0] and the percentile interval of samples[1:] (finite ones)."""
    samples = np.asarray(samples, float)
    boot = samples[1:][np.isfinite(samples[1:])]
    value = float(samples[0]) if np.isfinite(samples[0]) else None
    if boot.size == 0:
        return {"value": value, "lo": None, "hi": None}
    alpha = (1 - level) / 2
    return {"value": value, "lo": float(np.quantile(boot, alpha)), "hi": float(np.quantile(boot, 1 - alpha))}


def weighted_means(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """values [n_users, m] (NaN = missing) -> [n_weights, m]: per weight row, the mean over present users."""
    values = np.asarray(values, float).reshape(len(values), -1)
    present = np.isfinite(values)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (weights @ np.where(present, values, 0.0)) / (weights @ present)


def weighted_ratio(num: np.ndarray, den: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """sum(w num) / sum(w den) per weight row (a pooled ratio)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return (weights @ np.asarray(num, float)) / (weights @ np.asarray(den, float))


DECIMALS = 12  # means closer than this are tied (sums of the same gains in another order differ in the last bits)


def _sign(diff: np.ndarray) -> np.ndarray:
    return np.where(np.abs(diff) < 10.0 ** -DECIMALS, 0.0, np.sign(diff))


def kendall_tau_b(a, b) -> np.ndarray | float:
    """Kendall's tau-b between ``a`` and ``b`` (the last axis: the recommenders; leading axes: e.g. the
    bootstrap resamples): (concordant - discordant) / sqrt((pairs - ties in a)(pairs - ties in b)),
    as scipy.stats.kendalltau(variant="b"), vectorized over the leading axes; NaN where either is constant."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    i, j = np.triu_indices(a.shape[-1], 1)
    sa, sb = _sign(a[..., i] - a[..., j]), _sign(b[..., i] - b[..., j])
    n = len(i)
    with np.errstate(invalid="ignore", divide="ignore"):
        tau = (sa * sb).sum(-1) / np.sqrt((n - (sa == 0).sum(-1)) * (n - (sb == 0).sum(-1)))
    tau = np.where(np.isfinite(tau), tau, np.nan)
    return float(tau) if tau.ndim == 0 else tau


def spearman_rho(a, b) -> np.ndarray | float:
    """Spearman's rho (Pearson's r of the average ranks, as scipy.stats.spearmanr), vectorized over the
    leading axes; NaN where either is constant."""
    ra, rb = (rankdata(np.round(np.asarray(x, float), DECIMALS), axis=-1) for x in (a, b))
    ra, rb = ra - ra.mean(-1, keepdims=True), rb - rb.mean(-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = (ra * rb).sum(-1) / np.sqrt((ra ** 2).sum(-1) * (rb ** 2).sum(-1))
    rho = np.where(np.isfinite(rho), rho, np.nan)
    return float(rho) if rho.ndim == 0 else rho


def significant_pairs(true_means: np.ndarray, level: float = 0.95) -> list[tuple[int, int, int]]:
    """(a, b, sign of true a - b) for each pair of columns whose difference's bootstrap interval (rows
    1.. of ``true_means`` [n_weights, n_recs]) excludes 0; row 0 holds the point estimate."""
    out = []
    alpha = (1 - level) / 2
    for a, b in combinations(range(true_means.shape[1]), 2):
        diff = true_means[:, a] - true_means[:, b]
        boot = diff[1:][np.isfinite(diff[1:])]
        if boot.size == 0:
            continue
        lo, hi = np.quantile(boot, alpha), np.quantile(boot, 1 - alpha)
        if lo > 0 or hi < 0:
            out.append((a, b, int(_sign(diff[0]))))
    return out


def pairs_correct(sim_means: np.ndarray, pairs: list[tuple[int, int, int]]) -> np.ndarray:
    """Per weight row of ``sim_means`` [n_weights, n_recs], the share of ``pairs`` (a, b, true sign) the
    simulator orders the same way (a tie counts as wrong); NaN without pairs."""
    if not pairs:
        return np.full(len(sim_means), math.nan)
    a, b, sign = (np.array(x) for x in zip(*pairs))
    return (_sign(sim_means[:, a] - sim_means[:, b]) == sign).mean(1)


def agreement(true_means: np.ndarray, sim_means: np.ndarray, pairs: list[tuple[int, int, int]]) -> dict:
    """Per weight row: Kendall tau-b and Spearman rho between the orderings, and pairs_correct."""
    return {"kendall_tau_b": kendall_tau_b(true_means, sim_means),
            "spearman_rho": spearman_rho(true_means, sim_means),
            "pairs_correct": pairs_correct(sim_means, pairs)}


# ---------------------------------------------------------------- fidelity per user


def auc_counts(pos: np.ndarray, neg: np.ndarray) -> tuple[float, int]:
    """(concordant pairs + half the ties, number of pairs) of scores ``pos`` above ``neg``: AUC = c / n."""
    pos, neg = np.asarray(pos, float), np.asarray(neg, float)
    if not len(pos) or not len(neg):
        return 0.0, 0
    diff = pos[:, None] - neg[None, :]
    return float((diff > 0).sum() + 0.5 * (diff == 0).sum()), int(diff.size)


def fidelity_by_user(heldout: pd.DataFrame, unrated: pd.DataFrame, users: np.ndarray, threshold: float) -> pd.DataFrame:
    """Per user (index ``users``) the parts of every fidelity statistic of one simulator's rows:
    taste (liked >= 4 vs disliked <= 2 held-out items, p_like), watch (the first n_watch held-out
    items, ``slot`` < n_watch, against the unrated items with slot < ratio x n_watch), and W1."""
    cols = {}
    by_user = dict(tuple(heldout.groupby("user_id", sort=False)))
    unrated_by = dict(tuple(unrated.groupby("user_id", sort=False)))
    for user in users:
        g = by_user.get(user)
        row = {}
        if g is None or g["p_like"].isna().any():
            cols[user] = row
            continue
        like = g["true_rating"] >= LIKE_AT
        dislike = g["true_rating"] <= 2
        c, n = auc_counts(g.loc[like, "p_like"], g.loc[dislike, "p_like"])
        row.update(taste_c=c, taste_n=n, taste_auc=c / n if n else math.nan)
        real = np.bincount(g["true_rating"].to_numpy(int), minlength=6)[1:].astype(float)
        row["w1"] = wasserstein_distance(RATINGS, RATINGS, g[PROB_COLUMNS].to_numpy(float).mean(0), real)
        neg = unrated_by.get(user)
        watched = g[g["watch"]] if "watch" in g else g.iloc[:0]
        if neg is not None and len(watched) and not neg["p_like"].isna().any():
            yes_pos = watched["p_like"].to_numpy(float) >= threshold
            for ratio in (1, 3):
                take = neg[neg["slot"] < ratio * len(watched)]
                if len(take) < ratio * len(watched):
                    continue
                yes_neg = take["p_like"].to_numpy(float) >= threshold
                tp, fn, fp = yes_pos.sum(), (~yes_pos).sum(), yes_neg.sum()
                row.update({f"w{ratio}_correct": tp + (~yes_neg).sum(), f"w{ratio}_n": len(watched) + len(take),
                            f"w{ratio}_2tp": 2 * tp, f"w{ratio}_f1den": 2 * tp + fp + fn})
            c, n = auc_counts(watched["p_like"], neg[neg["slot"] < len(watched)]["p_like"])
            row.update(watch_c=c, watch_n=n)
        cols[user] = row
    frame = pd.DataFrame.from_dict(cols, orient="index").reindex(users)
    needed = ["taste_c", "taste_n", "taste_auc", "w1", "watch_c", "watch_n",
              *(f"w{r}_{x}" for r in (1, 3) for x in ("correct", "n", "2tp", "f1den"))]
    return frame.reindex(columns=needed).astype(float)


def fidelity_samples(per_user: pd.DataFrame, weights: np.ndarray) -> dict[str, np.ndarray]:
    """Each fidelity statistic per weight row, from ``fidelity_by_user``'s table (users in weight order)."""
    def ratio(num, den):
        present = per_user[den].notna().to_numpy()
        w = weights * present
        return weighted_ratio(per_user[num].fillna(0).to_numpy(), per_user[den].fillna(0).to_numpy(), w)

    return {
        "taste_auc": weighted_means(per_user[["taste_auc"]].to_numpy(), weights)[:, 0],
        "taste_auc_pooled": ratio("taste_c", "taste_n"),
        "watch_acc_1_1": ratio("w1_correct", "w1_n"), "watch_f1_1_1": ratio("w1_2tp", "w1_f1den"),
        "watch_acc_1_3": ratio("w3_correct", "w3_n"), "watch_f1_1_3": ratio("w3_2tp", "w3_f1den"),
        "watch_auc_1_1": ratio("watch_c", "watch_n"),
        "rating_w1": weighted_means(per_user[["w1"]].to_numpy(), weights)[:, 0],
    }


# ---------------------------------------------------------------- the protocol


@dataclass
class ValiditySummary:
    name: str
    out_dir: str
    users: int
    recommenders: list[str]
    simulators: list[str]
    rows: int
    scored: int
    reused: int
    seconds: float
    rows_per_s: float | None
    results: dict


def validity_rows(train: pd.DataFrame, test: pd.DataFrame, item_ids: np.ndarray, users: np.ndarray,
                  candidates: int, negatives: int, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(heldout, unrated): every held-out row of ``users`` (true_rating; ``watch``: among the seeded
    ``candidates`` of the user's watch check, all if 0) and ``negatives`` x candidates unrated items
    per user (``slot`` in sampling order), as persona_tune.simulate.scoring.make_probes samples them."""
    probes = make_probes(train, test, item_ids, users, candidates, negatives, seed)
    heldout = test[test["user_id"].isin(users)][["user_id", "item_id", "rating"]].rename(columns={"rating": "true_rating"})
    heldout = heldout.astype({"true_rating": float}).sort_values(["user_id", "item_id"]).reset_index(drop=True)
    watch = probes[probes["kind"] == "heldout"][["user_id", "item_id"]].assign(watch=True)
    heldout = heldout.merge(watch, on=["user_id", "item_id"], how="left")
    heldout["watch"] = heldout["watch"].fillna(False).astype(bool)
    unrated = probes[probes["kind"] == "unrated"][["user_id", "item_id", "slot"]].reset_index(drop=True)
    return heldout, unrated


def run(run_folder: RunFolder, cfg) -> ValiditySummary:
    """The protocol on ``run_folder`` with a validated SimulateConfig ``cfg`` (``cfg.validity``)."""
    train, test, items, item_ids, train_users = read_inputs(run_folder)
    users = sample_users(test[test["user_id"].isin(train_users)], cfg.users, cfg.seed)
    heldout, unrated = validity_rows(train, test, item_ids, users, cfg.candidates, cfg.negatives, cfg.seed)
    rows = pd.concat([heldout[["user_id", "item_id"]], unrated[["user_id", "item_id"]]]).drop_duplicates(ignore_index=True)
    predictions = [load_predictions(spec, rows) for spec in cfg.predictions]  # bad files stop us before scoring
    for name, table in predictions:
        missing = heldout[["user_id", "item_id"]].merge(table, how="left")["p_like"].isna()
        if missing.any():
            first = heldout[missing.to_numpy()].iloc[0]
            raise DataError(f"--predictions {name}: {int(missing.sum())} of the {len(heldout)} held-out rows have no "
                            f"p1..p5 (first: user {int(first['user_id'])}, item {int(first['item_id'])}); rate "
                            "every test row of the sampled users (e.g. `persona-tune eval` with eval.max_rows=0)")

    # 1. The recommenders and their orders of each user's held-out items.
    started = time.perf_counter()
    data = Interactions.from_train(train, item_ids)
    recommenders = list(VALIDITY)
    ranked = rank_heldout(heldout, score_matrices(data, recommenders, cfg.seed), data, cfg.seed)
    fit_seconds = time.perf_counter() - started

    # 2. The simulators' ratings of the rows: the agent (resumable), --predictions, classical, the nulls.
    sim = run_folder.simulation(cfg.out_name)
    simulators: dict[str, pd.DataFrame] = {}
    stats = {"scored": 0, "reused": 0, "seconds": 0.0}
    if cfg.agent:
        scores, stats = score_with_agent(run_folder, sim, cfg, rows)
        simulators[cfg.variant] = scores
    for name, table in predictions:
        if name in simulators or name in (CLASSICAL, *NULLS, TRUTH):
            raise ConfigError(f"--predictions {name}: the name is taken; use NAME=FILE")
        simulators[name] = table
    history = History.load(run_folder)
    for name, rater in ((CLASSICAL, BiasRater.fit(train, items, history=history)),
                        (POPULARITY, PopularityRater.fit(train, history)), (ITEM_BLIND, ItemBlindRater.fit(train))):
        simulators[name] = pd.concat([rows.reset_index(drop=True), rater.rate(rows["user_id"], rows["item_id"])], axis=1)
    keep = ["user_id", "item_id", "expected_rating", "p_like", *PROB_COLUMNS]
    rated = pd.concat([s[keep].assign(simulator=name) for name, s in simulators.items()], ignore_index=True)

    # 3. Metrics, then the agreement and fidelity statistics on one matrix of user weights.
    results = evaluate(heldout, unrated, ranked, rated, recommenders, k=cfg.k, threshold=cfg.like_threshold,
                       n_boot=cfg.n_boot, seed=cfg.seed, users=users)
    agents = [n for n in simulators if n not in (CLASSICAL, *NULLS)]
    results.update({
        "variant": cfg.variant if cfg.agent else None, "agents": agents, "name": cfg.out_name,
        "candidates_watch": cfg.candidates, "negatives": cfg.negatives, "like_threshold": cfg.like_threshold,
        "rows": {"heldout": int(len(heldout)), "unrated": int(len(unrated)), "pairs": int(len(rows))},
        "history": history.mode,
        "timing": {"recommenders_fit_rank_s": fit_seconds, **{k: v for k, v in stats.items() if k != "fingerprint"}},
    })
    user_table = results.pop("_user_metrics")
    atomic_write_parquet(user_table, sim.validity_users)
    atomic_write_parquet(rated, sim.validity_rows)
    atomic_write_json(sim.validity, results)
    run_folder.record_stage(f"simulate/{cfg.out_name}", _cfg_dict(cfg),
                            outputs=[str(p.relative_to(run_folder.root)) for p in (sim.validity, sim.validity_users,
                                                                                     sim.validity_rows)])
    return ValiditySummary(name=cfg.out_name, out_dir=str(sim.root), users=results["users"], recommenders=recommenders,
                           simulators=list(simulators), rows=len(rows), scored=stats["scored"], reused=stats["reused"],
                           seconds=stats["seconds"], rows_per_s=stats.get("rows_per_s"), results=results)


def _cfg_dict(cfg) -> dict:
    from persona_tune.stage import config_dict

    return config_dict(cfg)


def evaluate(heldout: pd.DataFrame, unrated: pd.DataFrame, ranked: pd.DataFrame, rated: pd.DataFrame,
             recommenders: list[str], k: int = 10, threshold: float = 0.5, n_boot: int = 1000, seed: int = 0,
             users: np.ndarray | None = None) -> dict:
    """Every statistic of the protocol from the rows (see the module docstring).

    heldout: user_id, item_id, true_rating, watch; unrated: user_id, item_id, slot; ranked: recommender,
    user_id, item_id, rank; rated: simulator, user_id, item_id, expected_rating, p_like, p1..p5.
    """
    sims = list(dict.fromkeys(rated["simulator"]))
    key = ["user_id", "item_id"]
    relevance = {TRUTH: (heldout.set_index(key)["true_rating"] >= LIKE_AT).astype(float)}
    for name in sims:
        relevance[name] = rated[rated["simulator"] == name].set_index(key)["p_like"]
    table = user_metrics(ranked, relevance, k)
    # The users of the agreement: every user with at least one held-out item rated >= LIKE_AT.
    all_users = np.sort(heldout["user_id"].unique()) if users is None else np.asarray(users)
    truth_ndcg = table[table["source"] == TRUTH].pivot(index="user_id", columns="recommender", values="ndcg")
    judged = truth_ndcg.reindex(all_users).notna().all(axis=1)
    used = all_users[judged.to_numpy()]
    weights = weight_matrix(len(used), n_boot, seed)

    def means(source: str, metric: str) -> np.ndarray:
        m = table[table["source"] == source].pivot(index="user_id", columns="recommender", values=metric)
        return weighted_means(m.reindex(index=used, columns=recommenders).to_numpy(float), weights)

    out = {"users": int(len(used)), "users_sampled": int(len(all_users)), "users_without_liked_item": int((~judged).sum()),
           "k": k, "like_at": LIKE_AT, "n_boot": n_boot, "seed": seed, "recommenders": recommenders,
           "n_pairs": len(recommenders) * (len(recommenders) - 1) // 2, "truth": {}, "simulators": {}, "paired": {}}
    samples: dict[str, dict[str, np.ndarray]] = {name: {} for name in sims}
    metric_names = {"ndcg": f"ndcg@{k}", "recall": f"recall@{k}"}
    for metric, label in metric_names.items():
        true_means = means(TRUTH, metric)
        pairs = significant_pairs(true_means)
        out["truth"][label] = {rec: summarize(true_means[:, j]) for j, rec in enumerate(recommenders)}
        out["truth"][f"n_significant_pairs_{label}"] = len(pairs)
        for name in sims:
            sim_means = means(name, metric)
            agree = agreement(true_means, sim_means, pairs)
            for stat, values in agree.items():
                samples[name][f"{stat}_{label}" if metric != "ndcg" else stat] = values
            entry = out["simulators"].setdefault(name, {"recommenders": {}})
            for j, rec in enumerate(recommenders):
                entry["recommenders"].setdefault(rec, {})[label] = summarize(sim_means[:, j])
            block = {stat: summarize(values) for stat, values in agree.items()}
            block["n_significant_pairs"] = len(pairs)
            if metric == "ndcg":
                entry.update(block)
            else:
                entry[label] = block
    out["n_significant_pairs"] = out["truth"][f"n_significant_pairs_ndcg@{k}"]
    # Fidelity of each simulator on the same users and weights.
    for name in sims:
        s = rated[rated["simulator"] == name]
        h = heldout.merge(s, on=key, how="left")
        u = unrated.merge(s, on=key, how="left")
        fid = fidelity_samples(fidelity_by_user(h, u, used, threshold), weights)
        samples[name].update(fid)
        out["simulators"][name]["fidelity"] = {stat: summarize(v) for stat, v in fid.items()}
    # Paired: each agent (every simulator but the classical one and the nulls) minus the classical one.
    for name in sims:
        if name in (CLASSICAL, *NULLS) or CLASSICAL not in samples:
            continue
        out["paired"][f"{name} - {CLASSICAL}"] = {stat: summarize(samples[name][stat] - samples[CLASSICAL][stat])
                                                   for stat in samples[name]}
    out["_user_metrics"] = table
    return out


# ---------------------------------------------------------------- console summary


def _fmt(m: dict | None) -> str:
    if not m or m.get("value") is None:
        return "undefined"
    ci = "" if m.get("lo") is None else f" [{m['lo']:.3f}, {m['hi']:.3f}]"
    return f"{m['value']:.3f}{ci}"


FIDELITY = (("taste_auc", "taste AUC (per user)"), ("taste_auc_pooled", "taste AUC (pooled pairs)"),
            ("watch_acc_1_1", "watch acc 1:1"), ("watch_f1_1_1", "watch F1 1:1"), ("watch_auc_1_1", "watch AUC 1:1"),
            ("watch_acc_1_3", "watch acc 1:3"), ("watch_f1_1_3", "watch F1 1:3"), ("rating_w1", "rating W1"))


def _md(m: dict | None, signed: bool = False) -> str:
    if not m or m.get("value") is None:
        return "undefined"
    f = "+.3f" if signed else ".3f"
    ci = "" if m.get("lo") is None else f" [{m['lo']:{f}}, {m['hi']:{f}}]"
    return f"{m['value']:{f}}{ci}"


def markdown(results: dict) -> str:
    """The protocol's tables (agreement, fidelity, paired differences, recommenders), for the report and docs."""
    k = results["k"]
    order = [*results.get("agents", []), CLASSICAL, *NULLS]
    sims = {n: results["simulators"][n] for n in [*order, *results["simulators"]] if n in results["simulators"]}
    out = [f"{results['users']} users, {len(results['recommenders'])} recommenders ranking each user's whole held-out "
           f"set; the truth (rated >= {results['like_at']}) separates {results['n_significant_pairs']} of "
           f"{results['n_pairs']} recommender pairs by nDCG@{k} (paired bootstrap over users, 95%). [95% CI] from "
           f"{results['n_boot']} bootstrap resamples of users.", "",
           f"| simulator | nDCG@{k} Kendall τ-b | nDCG@{k} Spearman ρ | significant pairs ordered right | "
           f"recall@{k} Kendall τ-b | recall@{k} pairs right (of {results['truth'][f'n_significant_pairs_recall@{k}']}) |",
           "|---|---|---|---|---|---|"]
    for name, s in sims.items():
        r = s[f"recall@{k}"]
        out.append(f"| {name} | {_md(s['kendall_tau_b'])} | {_md(s['spearman_rho'])} | {_md(s['pairs_correct'])} | "
                   f"{_md(r['kendall_tau_b'])} | {_md(r['pairs_correct'])} |")
    out += ["", "| simulator | " + " | ".join(label for _, label in FIDELITY) + " |",
            "|---|" + "---|" * len(FIDELITY)]
    for name, s in sims.items():
        out.append(f"| {name} | " + " | ".join(_md(s["fidelity"][key]) for key, _ in FIDELITY) + " |")
    if results["paired"]:
        pairs = list(results["paired"])
        out += ["", "| statistic | " + " | ".join(pairs) + " |", "|---|" + "---|" * len(pairs)]
        keys = [("kendall_tau_b", f"nDCG@{k} Kendall τ-b"), ("spearman_rho", f"nDCG@{k} Spearman ρ"),
                ("pairs_correct", "significant pairs ordered right"), *FIDELITY]
        for key, label in keys:
            out.append(f"| {label} | " + " | ".join(_md(results["paired"][p].get(key), signed=True) for p in pairs) + " |")
    truth = results["truth"][f"ndcg@{k}"]
    names = sorted(truth, key=lambda r: -(truth[r]["value"] or 0))
    out += ["", f"| recommender | true nDCG@{k} | " + " | ".join(f"{n} nDCG@{k}" for n in sims) + " |",
            "|---|---|" + "---|" * len(sims)]
    for rec in names:
        out.append(f"| {rec} | {_md(truth[rec])} | "
                   + " | ".join(f"{sims[n]['recommenders'][rec][f'ndcg@{k}']['value']:.3f}"
                                if sims[n]['recommenders'][rec][f'ndcg@{k}']['value'] is not None else "undefined"
                                for n in sims) + " |")
    return "\n".join(out)


def summary_lines(results: dict) -> list[str]:
    k = results["k"]
    lines = [f"{results['users']} users, {len(results['recommenders'])} recommenders; the truth separates "
             f"{results['n_significant_pairs']} of {results['n_pairs']} pairs (nDCG@{k})",
             f"{'simulator':<34} {'Kendall tau-b':<24} {'Spearman rho':<24} {'pairs correct':<24} {'taste AUC pooled':<24}"]
    order = [*results.get("agents", []), CLASSICAL, *NULLS]
    for name in dict.fromkeys([n for n in order if n in results["simulators"]] + list(results["simulators"])):
        s = results["simulators"][name]
        lines.append(f"{name:<34} {_fmt(s['kendall_tau_b']):<24} {_fmt(s['spearman_rho']):<24} "
                     f"{_fmt(s['pairs_correct']):<24} {_fmt(s['fidelity']['taste_auc_pooled']):<24}")
    for pair, stats in results["paired"].items():
        lines.append(f"{pair}: tau-b {_fmt(stats['kendall_tau_b'])}, pairs correct {_fmt(stats['pairs_correct'])}, "
                     f"taste AUC pooled {_fmt(stats['taste_auc_pooled'])}")
    return lines
