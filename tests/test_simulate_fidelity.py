"""Fidelity metrics and the classical rater against hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy.stats import norm

from persona_tune.simulate import fidelity
from persona_tune.simulate.classical import BiasRater, rating_distribution


def one_hot(rating: int) -> dict:
    return {f"p{r}": float(r == rating) for r in range(1, 6)}


def test_taste_auc_per_user_and_mean():
    rows = pd.DataFrame({
        "user_id": [1, 1, 1, 1, 1, 2, 2, 2, 3, 3],
        "true_rating": [5, 4, 1, 2, 3, 5, 1, 2, 5, 4],  # user 3 has no rating <= 2: left out
        "p_like": [0.9, 0.3, 0.4, 0.1, 0.99, 0.2, 0.8, 0.1, 0.5, 0.5],
    })
    per_user = fidelity.per_user_auc(rows)
    # user 1: pos {0.9, 0.3} vs neg {0.4, 0.1}: 3 of 4 pairs ordered (the 3-star row is ignored).
    # user 2: pos {0.2} vs neg {0.8, 0.1}: 1 of 2.
    assert per_user.to_dict() == {1: pytest.approx(0.75), 2: pytest.approx(0.5)}
    out = fidelity.taste_auc(rows, n_boot=200)
    assert out["value"] == pytest.approx(0.625) and out["n_users"] == 2
    assert 0.5 <= out["ci"][0] <= out["ci"][1] <= 0.75


def test_watch_check_accuracy_and_f1_at_1_1_and_1_3():
    heldout = pd.DataFrame({"user_id": [1, 1], "p_like": [0.8, 0.2]})
    unrated = pd.DataFrame({"user_id": [1] * 6, "slot": range(6), "p_like": [0.6, 0.1, 0.1, 0.1, 0.1, 0.7]})
    one = fidelity.watch_check(heldout, unrated, 1, 0.5, n_boot=0)
    # 1:1 uses slots 0-1: TP 1, FN 1, FP 1, TN 1.
    assert one["accuracy"]["value"] == pytest.approx(0.5)
    assert one["f1"]["value"] == pytest.approx(2 / (2 + 1 + 1))
    three = fidelity.watch_check(heldout, unrated, 3, 0.5, n_boot=0)
    # 1:3 uses slots 0-5: TP 1, FN 1, FP 2, TN 4.
    assert three["accuracy"]["value"] == pytest.approx(5 / 8)
    assert three["f1"]["value"] == pytest.approx(2 / (2 + 2 + 1))
    # A user without enough unrated items is left out.
    assert fidelity.watch_check(heldout, unrated.head(3), 3, 0.5, n_boot=0)["accuracy"]["n_users"] == 0


def test_distribution_match_wasserstein():
    rows = pd.DataFrame([
        {"user_id": 1, "true_rating": 5, **one_hot(3)},  # all mass 2 stars away: W1 = 2
        {"user_id": 1, "true_rating": 5, **one_hot(3)},
        {"user_id": 2, "true_rating": 1, **one_hot(1)},  # exact: W1 = 0
        {"user_id": 3, "true_rating": 2, **{f"p{r}": 0.5 * (r in (1, 3)) for r in range(1, 6)}},  # 0.5 + 0.5 = 1
    ])
    per_user = fidelity.per_user_wasserstein(rows)
    assert per_user.to_dict() == {1: pytest.approx(2.0), 2: pytest.approx(0.0), 3: pytest.approx(1.0)}
    assert fidelity.distribution_match(rows, n_boot=0)["value"] == pytest.approx(1.0)


def test_ndcg_at_matches_the_formula():
    relevance = [3, 2, 3, 0, 1, 2]  # in slate order
    dcg = 3 + 2 / math.log2(3) + 3 / 2 + 0 + 1 / math.log2(6) + 2 / math.log2(7)
    idcg = 3 + 3 / math.log2(3) + 2 / 2 + 2 / math.log2(5) + 1 / math.log2(6)
    assert fidelity.ndcg_at(np.array(relevance), np.arange(1, 7), k=6) == pytest.approx(dcg / idcg)
    # The slate's own order is what counts, whatever order the rows come in.
    assert fidelity.ndcg_at(np.array(relevance[::-1]), np.arange(6, 0, -1), k=6) == pytest.approx(dcg / idcg)
    dcg3 = 3 + 2 / math.log2(3) + 3 / 2
    idcg3 = 3 + 3 / math.log2(3) + 2 / 2
    assert fidelity.ndcg_at(np.array(relevance), np.arange(1, 7), k=3) == pytest.approx(dcg3 / idcg3)
    assert math.isnan(fidelity.ndcg_at(np.array([4.0]), np.array([1]), k=10))


def _reranks(sim_of) -> pd.DataFrame:
    """Three recommenders re-rank the same 3 items of 2 users: 'good' puts the best first, 'bad' last."""
    truth = {1: {10: 5, 11: 3, 12: 1}, 2: {10: 2, 11: 4, 12: 5}}
    rows = []
    for user, ratings in truth.items():
        by_true = sorted(ratings, key=lambda i: -ratings[i])
        orders = {"good": by_true, "mid": [by_true[1], by_true[0], by_true[2]], "bad": by_true[::-1]}
        for rec, order in orders.items():
            for rank, item in enumerate(order, 1):
                rows.append({"recommender": rec, "user_id": user, "item_id": item, "rank": rank,
                             "true_rating": ratings[item], "expected_rating": sim_of(ratings[item])})
    return pd.DataFrame(rows)


def test_ranking_agreement_perfect_reversed_and_gaps():
    same = fidelity.ranking_agreement(_reranks(lambda r: r), k=3, n_boot=100)
    assert same["kendall_tau"]["value"] == pytest.approx(1.0)
    assert same["spearman_rho"]["value"] == pytest.approx(1.0)
    assert all(v["gap"] == pytest.approx(0.0) for v in same["recommenders"].values())
    good = same["recommenders"]["good"]
    assert good["ndcg_true"] == pytest.approx(1.0) and good["n_users"] == 2
    # A simulator whose ratings run backwards orders the recommenders backwards.
    backwards = fidelity.ranking_agreement(_reranks(lambda r: 6 - r), k=3, n_boot=0)
    assert backwards["kendall_tau"]["value"] == pytest.approx(-1.0)
    assert backwards["recommenders"]["bad"]["ndcg_sim"] == pytest.approx(1.0)
    # by hand: user 1, 'bad' shows (1, 3, 5); the backwards simulator's gains are (5, 3, 1).
    bad_true_u1 = (1 + 3 / math.log2(3) + 5 / 2) / (5 + 3 / math.log2(3) + 1 / 2)
    bad_true_u2 = (2 + 4 / math.log2(3) + 5 / 2) / (5 + 4 / math.log2(3) + 2 / 2)
    assert backwards["recommenders"]["bad"]["ndcg_true"] == pytest.approx((bad_true_u1 + bad_true_u2) / 2)


def test_feedback_means_and_truth_rows():
    rows = pd.DataFrame({
        "recommender": "r", "user_id": [1, 1, 2, 2], "item_id": [1, 2, 1, 3], "rank": [1, 2, 1, 2],
        "true_rating": [5, np.nan, 2, np.nan], "expected_rating": [4.0, 3.0, 2.0, 1.0], "p_like": [0.8, 0.4, 0.2, 0.0],
    })
    out = fidelity.feedback(rows, n_boot=50)["r"]
    assert out["k"] == 2 and out["n_rows"] == 4 and out["n_with_truth"] == 2
    assert out["mean_rating"]["value"] == pytest.approx(2.5)
    assert out["like_rate"]["value"] == pytest.approx(0.35)
    truth = out["on_truth"]
    assert truth["real_mean_rating"]["value"] == pytest.approx(3.5)
    assert truth["real_like_rate"]["value"] == pytest.approx(0.5)
    assert truth["sim_mean_rating"]["value"] == pytest.approx(3.0)
    assert truth["sim_like_rate"]["value"] == pytest.approx(0.5)


def test_bootstrap_mean_over_users():
    values = pd.Series([0.0, 1.0, 2.0, 3.0])
    out = fidelity.mean_over_users(values, n_boot=500, seed=0)
    assert out["value"] == pytest.approx(1.5) and out["n_users"] == 4
    assert 0.0 <= out["ci"][0] < 1.5 < out["ci"][1] <= 3.0
    assert fidelity.mean_over_users(values, n_boot=500, seed=0) == out  # seeded
    assert all(math.isnan(x) for x in fidelity.mean_over_users(values, n_boot=0)["ci"])
    assert fidelity.resample_weights(4, 7, 0).sum(1).tolist() == [4.0] * 7


def test_classical_rating_distribution_is_a_discretised_gaussian():
    out = rating_distribution(np.array([3.0, 5.0]), sigma=1.0)
    probs = out[[f"p{r}" for r in range(1, 6)]].to_numpy()
    np.testing.assert_allclose(probs.sum(1), 1.0)
    assert out.loc[0, "p3"] == pytest.approx(norm.cdf(0.5) - norm.cdf(-0.5))
    assert out.loc[0, "p_like"] == pytest.approx(1 - norm.cdf(0.5))
    assert out.loc[0, "expected_rating"] == pytest.approx(3.0)  # symmetric around 3
    assert out.loc[1, "p5"] == pytest.approx(1 - norm.cdf(-0.5))
    assert out.loc[1, "p_like"] == pytest.approx(1 - norm.cdf(-1.5))


def test_bias_rater_fits_sigma_on_train_rows():
    items = pd.DataFrame({"item_id": [1, 2], "hist_avg": [4.0, 2.0], "hist_count": [100, 100]})
    train = pd.DataFrame({"user_id": [7, 7, 8, 8], "item_id": [1, 2, 1, 2], "rating": [5, 3, 4, 1]})
    rater = BiasRater.fit(train, items)
    assert rater.bias.mu[0] == pytest.approx(3.0)
    fitted = rater.rate(train["user_id"], train["item_id"])["bias_prediction"].to_numpy()
    assert rater.sigma == pytest.approx(np.sqrt(np.mean((train["rating"].to_numpy() - fitted) ** 2)))
    assert rater.rate([7], [1])["p_like"].iloc[0] > rater.rate([8], [2])["p_like"].iloc[0]
