"""Fidelity metrics of a user simulator, each with a percentile bootstrap CI over users.

Inputs are long tables with one row per (user, item) the simulator rated, with its expected rating,
``p_like`` = p(rating >= 4) and p1..p5, and the user's real rating where the held-out test rows have
one (``true_rating``, NaN otherwise). See docs/simulation.md for what each metric means and the
published numbers it can be held against.

- taste_auc: per user, the ROC AUC of p_like between held-out items the user rated >= 4 and those
  rated <= 2 (users with both kinds only); the mean over users.
- watch_check: Agent4Rec's check. Per user, the held-out rated items (positives) against as many
  (1:1) or three times as many (1:3) sampled items the user never rated; "would watch" when
  p_like >= ``threshold``. Accuracy and F1 pooled over the users' rows.
- distribution_match: per user, the 1-Wasserstein distance between the simulator's rating
  distribution over the user's held-out items (the mean of p1..p5) and the user's real ratings of
  the same items; the mean over users (0 = identical, 4 = all mass at opposite ends).
- ranking_agreement: for recommenders whose every recommended item has a true rating (re-rankings of
  held-out items), nDCG@k per user with the true ratings as relevance and with the simulator's
  expected ratings as relevance; per recommender the mean over users of each, their gap, and
  Kendall tau and Spearman rho between the two orderings of the recommenders.
- feedback: per recommender, the simulated mean rating@k and like-rate@k, and the real ones on the
  rows where the held-out test rows rate the item (with the simulated ones on those same rows).

The bootstrap draws users with replacement (a user's rows stay together) ``n_boot`` times, seeded,
and recomputes the statistic; the CI is the 2.5th and 97.5th percentile.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from scipy.stats import kendalltau, spearmanr, wasserstein_distance
from sklearn.metrics import ndcg_score, roc_auc_score

from persona_tune.runfolder import PROB_COLUMNS

RATINGS = np.arange(1, 6, dtype=float)
LIKE_AT = 4  # p_like = p(rating >= LIKE_AT)


def resample_weights(n_users: int, n_boot: int, seed: int = 0) -> np.ndarray:
    """How often each user is drawn in each bootstrap resample: [n_boot, n_users] (as metrics.bootstrap_ci)."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(n_users, np.full(n_users, 1.0 / n_users), size=n_boot).astype(float)


def _interval(samples: np.ndarray, level: float = 0.95) -> list[float]:
    samples = np.asarray(samples, dtype=float)
    samples = samples[np.isfinite(samples)]
    if samples.size == 0:
        return [math.nan, math.nan]
    alpha = (1.0 - level) / 2.0
    return [float(np.quantile(samples, alpha)), float(np.quantile(samples, 1.0 - alpha))]


def mean_over_users(per_user: pd.Series, n_boot: int = 1000, seed: int = 0) -> dict:
    """The mean of one value per user, with a user-bootstrap CI."""
    v = per_user.dropna().to_numpy(dtype=float)
    if v.size == 0:
        return {"value": math.nan, "ci": [math.nan, math.nan], "n_users": 0}
    out = {"value": float(v.mean()), "n_users": int(v.size)}
    if n_boot > 0:
        w = resample_weights(v.size, n_boot, seed)
        out["ci"] = _interval(w @ v / w.sum(1))
    else:
        out["ci"] = [math.nan, math.nan]
    return out


def _ratio(per_user: pd.DataFrame, num: str, den: str, n_boot: int, seed: int) -> dict:
    """sum(num) / sum(den) pooled over users, with a user-bootstrap CI."""
    total = per_user[den].sum()
    out = {"value": float(per_user[num].sum() / total) if total else math.nan, "n_users": int(len(per_user))}
    if n_boot > 0 and len(per_user):
        w = resample_weights(len(per_user), n_boot, seed)
        with np.errstate(invalid="ignore", divide="ignore"):
            out["ci"] = _interval((w @ per_user[num].to_numpy(float)) / (w @ per_user[den].to_numpy(float)))
    else:
        out["ci"] = [math.nan, math.nan]
    return out


# ---------------------------------------------------------------- taste discrimination


def per_user_auc(heldout: pd.DataFrame, score: str = "p_like") -> pd.Series:
    """Per user, AUC of ``score`` between held-out items rated >= 4 (positive) and <= 2 (negative)."""
    out = {}
    for user, g in heldout.groupby("user_id", sort=True):
        g = g[(g["true_rating"] >= 4) | (g["true_rating"] <= 2)]
        labels = (g["true_rating"] >= 4).to_numpy()
        if labels.all() or not labels.any():
            continue
        out[user] = roc_auc_score(labels, g[score].to_numpy(dtype=float))
    return pd.Series(out, dtype=float)


def taste_auc(heldout: pd.DataFrame, n_boot: int = 1000, seed: int = 0) -> dict:
    return mean_over_users(per_user_auc(heldout), n_boot, seed)


def watch_check(heldout: pd.DataFrame, unrated: pd.DataFrame, ratio: int, threshold: float = 0.5,
                n_boot: int = 1000, seed: int = 0) -> dict:
    """Agent4Rec's check at 1:``ratio``: accuracy and F1 of "would watch" (p_like >= threshold).

    ``unrated`` rows carry ``slot`` (0, 1, ... per user, the sampling order); a user with n held-out
    rows uses the unrated rows with slot < ratio * n. Users without enough unrated rows are left out.
    """
    counts = []
    need_by_user = heldout.groupby("user_id").size() * ratio
    for user, pos in heldout.groupby("user_id", sort=True):
        neg = unrated[(unrated["user_id"] == user) & (unrated["slot"] < need_by_user[user])]
        if len(neg) < need_by_user[user]:
            continue
        yes_pos = pos["p_like"].to_numpy(float) >= threshold
        yes_neg = neg["p_like"].to_numpy(float) >= threshold
        tp, fn = yes_pos.sum(), (~yes_pos).sum()
        fp, tn = yes_neg.sum(), (~yes_neg).sum()
        counts.append({"user_id": user, "correct": tp + tn, "n": tp + fn + fp + tn,
                       "two_tp": 2 * tp, "f1_den": 2 * tp + fp + fn})
    table = pd.DataFrame(counts, columns=["user_id", "correct", "n", "two_tp", "f1_den"])
    return {"ratio": f"1:{ratio}", "threshold": threshold,
            "accuracy": _ratio(table, "correct", "n", n_boot, seed),
            "f1": _ratio(table, "two_tp", "f1_den", n_boot, seed)}


# ---------------------------------------------------------------- distribution match


def per_user_wasserstein(heldout: pd.DataFrame) -> pd.Series:
    """Per user, W1 between the mean predicted p1..p5 over the held-out items and the real ratings."""
    out = {}
    for user, g in heldout.groupby("user_id", sort=True):
        predicted = g[PROB_COLUMNS].to_numpy(float).mean(0)
        real = np.bincount(g["true_rating"].to_numpy(int), minlength=6)[1:].astype(float)
        out[user] = wasserstein_distance(RATINGS, RATINGS, predicted, real)
    return pd.Series(out, dtype=float)


def distribution_match(heldout: pd.DataFrame, n_boot: int = 1000, seed: int = 0) -> dict:
    return mean_over_users(per_user_wasserstein(heldout), n_boot, seed)


# ---------------------------------------------------------------- recommender ranking agreement


def ndcg_at(relevance: np.ndarray, ranks: np.ndarray, k: int) -> float:
    """nDCG@k of one slate: items in ``ranks`` order, gains = ``relevance`` (sklearn's linear gains)."""
    if len(relevance) < 2:
        return math.nan
    return float(ndcg_score([np.asarray(relevance, float)], [-np.asarray(ranks, float)], k=k))


def ndcg_table(rows: pd.DataFrame, k: int = 10) -> pd.DataFrame:
    """One row per (recommender, user): ndcg_true and ndcg_sim (relevance = expected_rating)."""
    out = []
    for (rec, user), g in rows.groupby(["recommender", "user_id"], sort=True):
        ranks = g["rank"].to_numpy()
        out.append({"recommender": rec, "user_id": user,
                    "ndcg_true": ndcg_at(g["true_rating"].to_numpy(float), ranks, k),
                    "ndcg_sim": ndcg_at(g["expected_rating"].to_numpy(float), ranks, k)})
    return pd.DataFrame(out, columns=["recommender", "user_id", "ndcg_true", "ndcg_sim"])


def _orderings(true_means: np.ndarray, sim_means: np.ndarray) -> tuple[float, float]:
    ok = np.isfinite(true_means) & np.isfinite(sim_means)
    if ok.sum() < 2:
        return math.nan, math.nan
    tau = kendalltau(true_means[ok], sim_means[ok]).statistic
    rho = spearmanr(true_means[ok], sim_means[ok]).statistic
    return float(tau), float(rho)


def ranking_agreement(rows: pd.DataFrame, k: int = 10, n_boot: int = 1000, seed: int = 0) -> dict:
    """Kendall tau / Spearman rho between the recommenders' true and simulated nDCG@k, and the gaps."""
    table = ndcg_table(rows, k)
    if table.empty:
        return {"k": k, "recommenders": {}, "kendall_tau": {"value": math.nan, "ci": [math.nan] * 2},
                "spearman_rho": {"value": math.nan, "ci": [math.nan] * 2}, "n_users": 0}
    true = table.pivot(index="user_id", columns="recommender", values="ndcg_true")
    sim = table.pivot(index="user_id", columns="recommender", values="ndcg_sim").reindex_like(true)
    names = list(true.columns)
    t, s = true.to_numpy(float), sim.to_numpy(float)
    t_mean, s_mean = np.nanmean(t, 0), np.nanmean(s, 0)
    tau, rho = _orderings(t_mean, s_mean)
    boot = {"tau": [], "rho": [], "true": [], "sim": [], "gap": []}
    if n_boot > 0:
        w = resample_weights(len(true), n_boot, seed)
        for weights in w:
            bt, bs = _weighted_nanmean(t, weights), _weighted_nanmean(s, weights)
            bt_tau, bt_rho = _orderings(bt, bs)
            boot["tau"].append(bt_tau)
            boot["rho"].append(bt_rho)
            boot["true"].append(bt)
            boot["sim"].append(bs)
            boot["gap"].append(bs - bt)
    per_rec = {}
    for j, name in enumerate(names):
        per_rec[name] = {
            "ndcg_true": float(t_mean[j]), "ndcg_sim": float(s_mean[j]), "gap": float(s_mean[j] - t_mean[j]),
            "n_users": int(np.isfinite(t[:, j]).sum()),
            "ci": {key: _interval([b[j] for b in boot[key]]) if boot[key] else [math.nan, math.nan]
                   for key in ("true", "sim", "gap")},
        }
    ci = (lambda key: _interval(boot[key]) if boot[key] else [math.nan, math.nan])
    return {"k": k, "recommenders": per_rec, "n_users": int(len(true)),
            "kendall_tau": {"value": tau, "ci": ci("tau")}, "spearman_rho": {"value": rho, "ci": ci("rho")}}


def _weighted_nanmean(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Per column, the mean over rows weighted by ``weights``, ignoring NaN cells."""
    present = np.isfinite(values)
    w = weights[:, None] * present
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(present, values, 0.0).T @ weights / w.sum(0)


# ---------------------------------------------------------------- simulated feedback per recommender


def feedback(rows: pd.DataFrame, n_boot: int = 1000, seed: int = 0) -> dict:
    """Per recommender: simulated mean rating@k and like-rate@k (all rows), and on the rows with a
    true rating the real mean rating and like-rate beside the simulated ones on those rows."""
    out = {}
    for rec, g in rows.groupby("recommender", sort=True):
        g = g.assign(like=(g["true_rating"] >= LIKE_AT).astype(float), has_truth=g["true_rating"].notna().astype(float))
        judged = g[g["has_truth"] > 0]
        per_user = g.groupby("user_id").agg(rating=("expected_rating", "sum"), like=("p_like", "sum"), n=("item_id", "size"))
        entry = {"k": int(g["rank"].max()), "n_users": int(g["user_id"].nunique()), "n_rows": int(len(g)),
                 "mean_rating": _ratio(per_user, "rating", "n", n_boot, seed),
                 "like_rate": _ratio(per_user, "like", "n", n_boot, seed),
                 "n_with_truth": int(len(judged))}
        if len(judged):
            jt = judged.groupby("user_id").agg(true=("true_rating", "sum"), like=("like", "sum"),
                                               sim=("expected_rating", "sum"), sim_like=("p_like", "sum"),
                                               n=("item_id", "size"))
            entry["on_truth"] = {
                "real_mean_rating": _ratio(jt, "true", "n", n_boot, seed),
                "real_like_rate": _ratio(jt, "like", "n", n_boot, seed),
                "sim_mean_rating": _ratio(jt, "sim", "n", n_boot, seed),
                "sim_like_rate": _ratio(jt, "sim_like", "n", n_boot, seed),
            }
        out[rec] = entry
    return out
