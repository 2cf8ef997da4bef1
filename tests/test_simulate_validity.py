"""The validity protocol (persona_tune.simulate.validity): each statistic on hand-computed cases, the
null simulators, the protocol on a synthetic run (no model), and its input checks."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from persona_tune.cli import main as cli_main
from persona_tune.errors import ConfigError, DataError
from persona_tune.history import History
from persona_tune.runfolder import RunFolder
from persona_tune.simulate import validity as v
from persona_tune.simulate.fidelity import PROB_COLUMNS
from persona_tune.simulate.report import simulation_section
from persona_tune.simulate.run import SimulateConfig
from tests.fixtures_runs import make_prepared_run


# ---------------------------------------------------------------- orderings


def test_kendall_tau_b_with_ties_by_hand():
    # Pairs of a=[1,2,3,4] in b=[1,3,2,2]: 3 concordant, 2 discordant, 1 tied in b only.
    # tau-b = (3 - 2) / sqrt((6 - 0) * (6 - 1)) = 1 / sqrt(30).
    assert v.kendall_tau_b([1, 2, 3, 4], [1, 3, 2, 2]) == pytest.approx(1 / math.sqrt(30))
    assert v.kendall_tau_b([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(v.kendall_tau_b([1, 2, 3], [5, 5, 5]))  # a constant ordering: undefined


def test_orderings_match_scipy_row_by_row():
    from scipy.stats import kendalltau, spearmanr

    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 4, (50, 7)).astype(float), rng.integers(0, 4, (50, 7)).astype(float)  # many ties
    a[0], b[1] = 1.0, 2.0  # constant rows: undefined
    tau, rho = v.kendall_tau_b(a, b), v.spearman_rho(a, b)
    for row in range(2, 50):
        assert tau[row] == pytest.approx(kendalltau(a[row], b[row], variant="b").statistic)
        assert rho[row] == pytest.approx(spearmanr(a[row], b[row]).statistic)
    assert np.isnan(tau[:2]).all() and np.isnan(rho[:2]).all()


def test_spearman_rho_by_hand():
    # d = (0, 1, 1): rho = 1 - 6 * 2 / (3 * (9 - 1)) = 0.5.
    assert v.spearman_rho([1, 2, 3], [1, 3, 2]) == pytest.approx(0.5)
    assert math.isnan(v.spearman_rho([1, 2, 3], [0, 0, 0]))


def test_significant_pairs_and_pair_agreement_by_hand():
    # Row 0 the point estimate, rows 1.. resamples. a-b always > 0, b-c crosses 0, a-c always > 0.
    true = np.array([[0.30, 0.20, 0.10],
                     [0.31, 0.18, 0.20],
                     [0.29, 0.22, 0.05],
                     [0.30, 0.19, 0.12]])
    pairs = v.significant_pairs(true)
    assert pairs == [(0, 1, 1), (0, 2, 1)]
    sim = np.array([[0.3, 0.1, 0.3],     # (0,1) right, (0,2) a tie: wrong -> 0.5
                    [0.1, 0.2, 0.0],     # (0,1) wrong, (0,2) right -> 0.5
                    [0.9, 0.1, 0.2]])    # both right -> 1
    assert v.pairs_correct(sim, pairs).tolist() == [0.5, 0.5, 1.0]
    assert math.isnan(v.pairs_correct(sim, [])[0])
    assert v.summarize(v.pairs_correct(sim, pairs)) == {"value": 0.5, "lo": pytest.approx(0.5125), "hi": pytest.approx(0.9875)}


def test_weighted_means_and_ratio():
    values = np.array([[1.0, np.nan], [3.0, 4.0]])
    w = np.array([[1.0, 1.0], [2.0, 0.0], [0.0, 1.0]])
    np.testing.assert_allclose(v.weighted_means(values, w), [[2.0, 4.0], [1.0, np.nan], [3.0, 4.0]])
    np.testing.assert_allclose(v.weighted_ratio([1, 3], [2, 4], w), [4 / 6, 0.5, 0.75])
    assert v.weight_matrix(5, 0, 0).tolist() == [[1.0] * 5]
    assert v.weight_matrix(5, 3, 0).sum(1).tolist() == [5.0] * 4  # each resample draws n users


# ---------------------------------------------------------------- per-user metrics


def test_ndcg_and_recall_at_k_by_hand():
    # Relevant at ranks 1 and 3, k=2: DCG = 1, IDCG = 1 + 1/log2(3); recall = 1 of 2.
    ndcg, recall = v.ndcg_recall(np.array([1.0, 0, 1, 0]), np.array([1, 2, 3, 4]), k=2)
    assert ndcg == pytest.approx(1 / (1 + 1 / math.log2(3)))
    assert recall == 0.5
    # Graded relevance (a simulator's p_like) in a shuffled order: ranks, not row order, count.
    ndcg, recall = v.ndcg_recall(np.array([0.2, 0.8, 0.5]), np.array([3, 1, 2]), k=1)
    assert ndcg == 1.0 and recall == pytest.approx(0.8 / 1.5)
    assert all(math.isnan(x) for x in v.ndcg_recall(np.zeros(3), np.array([1, 2, 3]), k=2))


def test_user_metrics_match_sklearn_list_by_list():
    rng = np.random.default_rng(1)
    lists = []
    for rec in ("a", "b"):
        for user in (1, 2, 3):
            items = np.arange(12) + 100 * user
            lists.append(pd.DataFrame({"recommender": rec, "user_id": user, "item_id": items,
                                       "rank": rng.permutation(12) + 1}))
    ranked = pd.concat(lists, ignore_index=True)
    key = pd.MultiIndex.from_frame(ranked.loc[ranked["recommender"] == "a", ["user_id", "item_id"]])
    truth = pd.Series((rng.random(36) < 0.3).astype(float), index=key)
    truth.iloc[24:] = 0.0  # user 3 likes nothing: NaN
    graded = pd.Series(rng.random(36), index=key)
    table = v.user_metrics(ranked, {"truth": truth, "sim": graded}, k=5)
    assert len(table) == 12
    for row in table.itertuples():
        g = ranked[(ranked["recommender"] == row.recommender) & (ranked["user_id"] == row.user_id)]
        rel = {"truth": truth, "sim": graded}[row.source].reindex(pd.MultiIndex.from_frame(g[["user_id", "item_id"]]))
        want = v.ndcg_recall(rel.to_numpy(), g["rank"].to_numpy(), k=5)
        np.testing.assert_allclose([row.ndcg, row.recall], want)


def test_auc_counts_and_pooled_taste_auc_by_hand():
    assert v.auc_counts([0.9, 0.5], [0.5, 0.1]) == (3.5, 4)  # one tie counts a half
    heldout = pd.DataFrame({"user_id": [1, 1, 1, 1, 2, 2, 2], "item_id": [1, 2, 3, 4, 1, 2, 3],
                            "true_rating": [5, 4, 2, 1, 4, 1, 2.0], "p_like": [0.9, 0.5, 0.5, 0.1, 0.2, 0.8, 0.1],
                            "watch": False})
    for col in PROB_COLUMNS:
        heldout[col] = 0.2
    unrated = pd.DataFrame({"user_id": pd.Series(dtype=int), "item_id": pd.Series(dtype=int),
                            "slot": pd.Series(dtype=int), "p_like": pd.Series(dtype=float)})
    per_user = v.fidelity_by_user(heldout, unrated, np.array([1, 2]), threshold=0.5)
    assert per_user["taste_auc"].tolist() == [0.875, 0.5]
    stats = v.fidelity_samples(per_user, v.weight_matrix(2, 0, 0))
    assert stats["taste_auc"][0] == pytest.approx(0.6875)  # mean of users
    assert stats["taste_auc_pooled"][0] == pytest.approx(4.5 / 6)  # (3.5 + 1) / (4 + 2) pairs
    assert math.isnan(stats["watch_acc_1_1"][0])  # no unrated rows: no watch check


def test_watch_check_by_hand():
    heldout = pd.DataFrame({"user_id": [1, 1, 1], "item_id": [1, 2, 3], "true_rating": [5, 3, 4.0],
                            "p_like": [0.9, 0.4, 0.6], "watch": [True, True, False]})
    for col in PROB_COLUMNS:
        heldout[col] = 0.2
    unrated = pd.DataFrame({"user_id": [1] * 6, "item_id": range(10, 16), "slot": range(6),
                            "p_like": [0.7, 0.1, 0.2, 0.3, 0.9, 0.0]})
    stats = v.fidelity_samples(v.fidelity_by_user(heldout, unrated, np.array([1]), 0.5), v.weight_matrix(1, 0, 0))
    # 1:1: positives 0.9 (yes), 0.4 (no); negatives 0.7 (yes), 0.1 (no): 2 of 4 right, F1 = 2/(2+1+1).
    assert stats["watch_acc_1_1"][0] == 0.5 and stats["watch_f1_1_1"][0] == 0.5
    # 1:3: negatives add 0.2, 0.3 (no) and 0.9, 0.0: yes, no -> right: 1 + 4 of 8; F1 = 2/(2+2+1).
    assert stats["watch_acc_1_3"][0] == 5 / 8 and stats["watch_f1_1_3"][0] == pytest.approx(0.4)
    # Watch AUC at 1:1: 0.9 beats both, 0.4 beats 0.1 only.
    assert stats["watch_auc_1_1"][0] == 0.75


# ---------------------------------------------------------------- the simulators and the protocol


def _toy():
    rng = np.random.default_rng(0)
    users, items = np.arange(1, 31), np.arange(100, 140)
    heldout = pd.DataFrame([(u, i) for u in users for i in rng.choice(items, 15, replace=False)],
                           columns=["user_id", "item_id"])
    heldout["true_rating"] = rng.integers(1, 6, len(heldout)).astype(float)
    heldout["watch"] = False
    unrated = heldout.iloc[:0][["user_id", "item_id"]].assign(slot=0)
    like = (heldout["true_rating"] >= 4).to_numpy(float)
    noise = rng.normal(0, 1, (4, len(heldout)))
    # Recommenders of decreasing quality: the truth plus more and more noise.
    ranked = []
    for j, scale in enumerate((0.2, 0.6, 1.5, 5.0)):
        s = like + scale * noise[j]
        order = np.lexsort((-s, heldout["user_id"].to_numpy()))
        r = heldout.iloc[order][["user_id", "item_id"]].reset_index(drop=True)
        r["rank"] = r.groupby("user_id").cumcount() + 1
        ranked.append(r.assign(recommender=f"rec{j}"))
    ranked = pd.concat(ranked, ignore_index=True)

    def sim(name, p_like):
        p = np.tile([0.2] * 5, (len(heldout), 1))
        return heldout[["user_id", "item_id"]].assign(simulator=name, p_like=p_like, expected_rating=3.0,
                                                      **dict(zip(PROB_COLUMNS, p.T)))
    rated = pd.concat([sim("oracle", like), sim("classical", 0.5 + 0.4 * like - 0.2 * rng.random(len(like))),
                       sim("item-blind", np.full(len(like), 0.5))], ignore_index=True)
    return heldout, unrated, ranked, rated


def test_evaluate_oracle_agrees_and_blind_rater_is_undefined():
    heldout, unrated, ranked, rated = _toy()
    out = v.evaluate(heldout, unrated, ranked, rated, [f"rec{j}" for j in range(4)], k=5, n_boot=200)
    assert out["users"] == out["users_sampled"] - out["users_without_liked_item"]
    assert out["n_significant_pairs"] >= 1
    oracle = out["simulators"]["oracle"]  # p_like = the truth: the same means, the same ordering
    assert oracle["kendall_tau_b"]["value"] == 1.0 and oracle["pairs_correct"] == {"value": 1.0, "lo": 1.0, "hi": 1.0}
    for rec, m in out["truth"]["ndcg@5"].items():
        assert oracle["recommenders"][rec]["ndcg@5"]["value"] == pytest.approx(m["value"])
    blind = out["simulators"]["item-blind"]  # constant relevance: no ordering at all
    assert blind["kendall_tau_b"]["value"] is None and blind["pairs_correct"]["value"] == 0.0
    assert blind["fidelity"]["taste_auc_pooled"]["value"] == 0.5
    paired = out["paired"]["oracle - classical"]
    assert set(paired) >= {"kendall_tau_b", "spearman_rho", "pairs_correct", "taste_auc", "taste_auc_pooled",
                           "rating_w1", "kendall_tau_b_recall@5"}
    assert paired["rating_w1"] == {"value": 0.0, "lo": 0.0, "hi": 0.0}  # the same p1..p5 on the same rows
    assert "item-blind - classical" not in out["paired"]


def test_null_raters():
    train = pd.DataFrame({"user_id": [1, 1, 1, 2, 2], "item_id": [10, 11, 12, 10, 12], "rating": [5, 4, 4, 1, 3]})
    items = pd.DataFrame({"item_id": [10, 11, 12], "hist_count": [100, 1, 10]})
    blind = v.ItemBlindRater.fit(train).rate([1, 1, 2], [10, 11, 12])
    assert blind[PROB_COLUMNS].iloc[0].tolist() == [0, 0, 0, 2 / 3, 1 / 3]
    assert blind["p_like"].tolist() == pytest.approx([1.0, 1.0, 0.0])
    assert blind["expected_rating"].iloc[1] == pytest.approx(13 / 3)
    history = History.from_items(items.assign(hist_avg=3.0))
    rater = v.PopularityRater.fit(train, history)
    assert rater.slope == pytest.approx(np.polyfit(np.log1p([100, 1, 10, 100, 10]), [5, 4, 4, 1, 3], 1)[0])
    pop = rater.rate([1, 2, 2], [10, 11, 12])
    assert pop["expected_rating"].tolist() == pytest.approx(rater.rate([2, 1, 1], [10, 11, 12])["expected_rating"].tolist())


def test_validity_on_a_synthetic_run_with_a_predictions_file(tmp_path):
    run = make_prepared_run(tmp_path, n_users=12)
    test = pd.read_parquet(run / "ratings_test.parquet")
    preds = test[["user_id", "item_id"]].copy()
    onehot = np.eye(5)[test["rating"].to_numpy(int) - 1]  # a perfect rater of the held-out rows
    preds[PROB_COLUMNS] = onehot
    path = tmp_path / "perfect.parquet"
    preds.to_parquet(path)
    argv = ["simulate", "--run", str(run), "--validity", "--no-agent", "--predictions", f"perfect={path}",
            "--candidates", "3", "--negatives", "1", "--n-boot", "50", "--no-progress"]
    assert cli_main(argv) == 0
    sim = RunFolder(run).simulation("validity-baselines")
    results = json.loads(sim.validity.read_text())
    assert results["users"] >= 1 and len(results["recommenders"]) == 16
    assert set(results["simulators"]) == {"perfect", "classical", "popularity", "item-blind"}
    for name, s in results["simulators"].items():
        for key in ("kendall_tau_b", "spearman_rho", "pairs_correct"):
            assert set(s[key]) == {"value", "lo", "hi"}
        assert s["n_significant_pairs"] == results["n_significant_pairs"]
    perfect = results["simulators"]["perfect"]
    assert perfect["kendall_tau_b"]["value"] == 1.0 and perfect["fidelity"]["taste_auc"]["value"] == 1.0
    assert perfect["fidelity"]["rating_w1"]["value"] == pytest.approx(0.0)
    # It rated no unrated items: no watch check for it, one for the classical simulator.
    assert perfect["fidelity"]["watch_acc_1_1"]["value"] is None
    assert results["simulators"]["classical"]["fidelity"]["watch_acc_1_1"]["value"] is not None
    assert "perfect - classical" in results["paired"]
    users = pd.read_parquet(sim.validity_users)
    assert set(users["source"]) == {"truth", "perfect", "classical", "popularity", "item-blind"}
    # The report's Simulation section shows the protocol's tables, the agent first.
    md, _ = simulation_section(RunFolder(run), tmp_path / "plots")
    text = "\n".join(md)
    assert "## Simulation validity: validity-baselines" in text
    rows = [line.split(" | ")[0] for line in text.splitlines() if line.startswith("| ")]
    assert rows[1:5] == ["| perfect", "| classical", "| popularity", "| item-blind"]
    assert "| significant pairs ordered right | +" in text or "| significant pairs ordered right | -" in text


def test_validity_input_checks(tmp_path):
    with pytest.raises(ConfigError, match="--recs is for slates"):
        SimulateConfig(validity=True, recs=("x.csv",)).validate()
    with pytest.raises(ConfigError, match="belong to --validity"):
        SimulateConfig(predictions=("x.csv",)).validate()
    assert SimulateConfig(validity=True, variant="persona").out_name == "validity-persona"
    run = make_prepared_run(tmp_path, n_users=6)
    rows = pd.read_parquet(run / "ratings_test.parquet")[["user_id", "item_id"]]
    bad = tmp_path / "bad.csv"
    bad.write_text("user_id,item_id,p1\n1,2,1.0\n")
    with pytest.raises(DataError, match="missing column"):
        v.load_predictions(str(bad), rows)
    half = rows.iloc[: len(rows) // 2].assign(**{c: 0.2 for c in PROB_COLUMNS})
    half.to_csv(tmp_path / "half.csv", index=False)
    cfg = SimulateConfig(validity=True, agent=False, predictions=(str(tmp_path / "half.csv"),), n_boot=0, progress=False)
    with pytest.raises(DataError, match="held-out rows have no p1..p5"):
        v.run(RunFolder(run), cfg)
    assert cli_main(["simulate", "--run", str(run), "--validity", "--no-agent", "--predictions",
                     str(tmp_path / "nowhere.csv")]) == 2


def test_validity_on_a_seeded_subset_of_users(tmp_path):
    """--users N: the protocol (truth, every simulator, the statistics) on a seeded sample of N users
    only; a predictions file then needs the held-out rows of those users only."""
    from persona_tune.simulate.run import sample_users

    run = make_prepared_run(tmp_path, n_users=12)
    test = pd.read_parquet(run / "ratings_test.parquet")
    users = sample_users(test, 4, 0)
    assert len(users) == 4 and set(users) < set(test["user_id"])
    preds = test[test["user_id"].isin(users)][["user_id", "item_id"]].copy()  # the sample's rows only
    preds[PROB_COLUMNS] = np.eye(5)[test[test["user_id"].isin(users)]["rating"].to_numpy(int) - 1]
    preds.to_parquet(tmp_path / "perfect.parquet")
    argv = ["simulate", "--run", str(run), "--validity", "--no-agent", "--users", "4", "--name", "subset",
            "--predictions", f"perfect={tmp_path / 'perfect.parquet'}", "--candidates", "3", "--negatives", "1",
            "--n-boot", "50", "--no-progress"]
    assert cli_main(argv) == 0
    sim = RunFolder(run).simulation("subset")
    results = json.loads(sim.validity.read_text())
    assert results["users_sampled"] == 4 and results["users"] == 4 - results["users_without_liked_item"]
    rated = pd.read_parquet(sim.validity_rows)
    assert set(rated["user_id"]) == set(users)
    assert set(rated.loc[rated["simulator"] == "perfect", "user_id"]) == set(users)
    assert set(pd.read_parquet(sim.validity_users)["user_id"]) <= set(users)
    assert results["simulators"]["perfect"]["fidelity"]["rating_w1"]["value"] == pytest.approx(0.0)
