"""The kNN and MF references (evaluation/references.py): MF tuned on validation users who are not
sampled, fits that never see a test row or a rating after the row's cutoff, the cache, and the
study's numbers on the real ML-1M data in ../shared."""

import json

import numpy as np
import pandas as pd
import pytest

from persona_tune.data.loaders import load_ratings
from persona_tune.data.prepare import Protocol, prepare
from persona_tune.data.synthetic import SynthConfig, write_synthetic
from persona_tune.evaluation import references as refs_mod
from persona_tune.evaluation.references import References, tune_mf, validation_split
from persona_tune.history import History
from persona_tune.runfolder import HISTORY, REFERENCE_PREDICTIONS, REFERENCE_TUNING, RunFolder
from tests.fixtures_runs import require_shared


def _low_rank_log(n_users=60, n_items=40, seed=0) -> pd.DataFrame:
    """Ratings 1-5 from two latent factors, every user rating 30 items over time."""
    rng = np.random.default_rng(seed)
    p, q = rng.normal(size=(n_users, 2)), rng.normal(size=(n_items, 2))
    rows = []
    for u in range(n_users):
        for t, i in enumerate(rng.choice(n_items, size=30, replace=False)):
            r = int(np.clip(np.rint(3 + p[u] @ q[i] + rng.normal(scale=0.3)), 1, 5))
            rows.append((u + 1, int(i) + 1, r, 1_000 * u + 10 * t))
    return pd.DataFrame(rows, columns=["user_id", "item_id", "rating", "timestamp"])


def test_validation_users_are_not_sampled_and_split_chronologically():
    log = _low_rank_log()
    sampled = log[log["user_id"] <= 10]
    train = sampled.groupby("user_id").head(18)
    fit, held, what = validation_split(log[~log.index.isin(sampled.index.difference(train.index))], train,
                                       {"min_ratings": 30, "max_ratings": 30, "train_frac": 0.6}, n_users=20, seed=1)
    assert held["user_id"].nunique() == 20 and not set(held["user_id"]) & set(sampled["user_id"])
    assert "20 users not sampled" in what
    for _, rows in held.groupby("user_id"):  # each one's last 40% (12 of 30), in time order
        own = log[log["user_id"] == rows["user_id"].iloc[0]].sort_values("timestamp")
        assert rows["timestamp"].tolist() == own["timestamp"].tolist()[18:]
    key = ["user_id", "item_id"]
    assert fit.merge(held[key], on=key).empty and len(fit) + len(held) == len(log) - len(sampled) + len(train)
    # Without any unsampled user of the protocol's size: the sampled users' last train rows.
    fit2, held2, what2 = validation_split(train, train, {"min_ratings": 30, "max_ratings": 30, "train_frac": 0.6})
    assert set(held2["user_id"]) <= set(sampled["user_id"]) and "last 40%" in what2
    assert fit2.merge(held2[key], on=key).empty


def test_mf_tuning_picks_the_lowest_validation_rmse_of_its_grid():
    log = _low_rank_log()
    fit, held, _ = validation_split(log, log[log["user_id"] <= 10].groupby("user_id").head(18),
                                    {"min_ratings": 30, "max_ratings": 30, "train_frac": 0.6}, n_users=30)
    tuning = tune_mf(fit, held, factors=(2, 16), regs=(0.02, 2.0), n_epochs=40, seed=0)
    assert [(g["n_factors"], g["reg"]) for g in tuning["grid"]] == [(2, 0.02), (2, 2.0), (16, 0.02), (16, 2.0)]
    best = min(tuning["grid"], key=lambda g: g["rmse"])
    assert tuning["chosen"] == {"n_factors": best["n_factors"], "reg": best["reg"], "n_epochs": 40}
    # The data are rank 2 with little noise: a heavy penalty flattens the factors, and it loses.
    assert tuning["chosen"]["reg"] == 0.02
    assert tuning["validation_users"] == 30 and tuning["validation_rows"] == 30 * 12


def _prepared(tmp_path, history="before_split"):
    data = write_synthetic(tmp_path / "data", SynthConfig(n_users=30, n_items=120, seed=3, median_ratings=35))
    log = load_ratings("synthetic", data)
    counts = log.ratings.groupby("user_id").size()
    prepare(log, tmp_path / "run", Protocol(min_ratings=int(counts.min()), max_ratings=int(counts.max()),
                                            n_users=12, seed=0, history=history))
    return RunFolder(tmp_path / "run")


@pytest.fixture
def one_point_grid(monkeypatch):
    """One MF candidate, so the (all-time) tuning cannot move the fits between two runs."""
    monkeypatch.setattr(refs_mod, "MF_FACTORS", (8,))
    monkeypatch.setattr(refs_mod, "MF_REGS", (0.05,))


def test_references_never_see_test_rows_or_ratings_after_the_cutoff(tmp_path, one_point_grid):
    run = _prepared(tmp_path)
    before = References(run).predictions()
    history = History.load(run)
    assert history.n_buckets > 2
    test = run.read_ratings("test")
    assert before[["user_id", "item_id"]].equals(test[["user_id", "item_id"]])
    assert before[["knn", "mf"]].notna().all().all() and before[["knn", "mf"]].stack().between(1, 5).all()
    buckets = history.bucket_of(before["user_id"].to_numpy())

    # Flip every test rating, and every history rating at or after the cutoff of bucket 1 that is not
    # a train row of bucket 0's or 1's users: buckets 0 and 1 must not move, the later ones must.
    train = run.read_ratings("train")
    early_users = set(before.loc[buckets <= 1, "user_id"])
    rows = run.read_table(HISTORY)
    own = rows.merge(train[["user_id", "item_id"]].assign(_own=True), on=["user_id", "item_id"], how="left")["_own"]
    late = (rows["timestamp"] >= history.cutoffs[1]).to_numpy() & ~(own.fillna(False).to_numpy(dtype=bool)
                                                                     & rows["user_id"].isin(early_users).to_numpy())
    rows.loc[late, "rating"] = 6 - rows.loc[late, "rating"]
    rows.to_parquet(run.path(HISTORY), index=False)
    test["rating"] = 6 - test["rating"]
    test.to_parquet(run.ratings_test, index=False)

    after = References(run).predictions()
    early = buckets <= 1
    np.testing.assert_array_equal(after.loc[early, ["knn", "mf"]].to_numpy(), before.loc[early, ["knn", "mf"]].to_numpy())
    assert not np.allclose(after.loc[~early, "mf"], before.loc[~early, "mf"])
    assert not np.allclose(after.loc[~early, "knn"], before.loc[~early, "knn"])


def test_mf_bucket_fit_holds_the_history_before_the_cutoff_and_the_buckets_own_train_rows(tmp_path, one_point_grid,
                                                                                          monkeypatch):
    run = _prepared(tmp_path)
    seen = []
    real_fit = refs_mod.fit_mf
    monkeypatch.setattr(refs_mod, "fit_mf", lambda rows, params, seed=0: seen.append(rows) or real_fit(rows, params, seed))
    refs = References(run)
    refs.mf_tuning()
    n_tuning = len(seen)
    refs.predictions()
    history, train = refs.history, run.read_ratings("train")
    key = ["user_id", "item_id"]
    stamped = run.read_table(HISTORY)
    test_keys = run.read_ratings("test")[key]
    for rows in seen:  # tuning and bucket fits alike: never a test row
        assert rows.merge(test_keys, on=key).empty
    fits = seen[n_tuning:]
    assert len(fits) == len(np.unique(history.bucket_of(run.read_ratings("test")["user_id"].to_numpy())))
    for bucket, rows in zip(np.unique(history.bucket_of(run.read_ratings("test")["user_id"].to_numpy())), fits):
        rows = rows.merge(stamped, on=[*key, "rating"], how="left")
        mine = train[history.bucket_of(train["user_id"].to_numpy()) == bucket]
        is_own = rows.merge(mine[key].assign(_own=True), on=key, how="left")["_own"].fillna(False).to_numpy(dtype=bool)
        assert (rows.loc[~is_own, "timestamp"] < history.cutoffs[bucket]).all()
        assert is_own.sum() == len(mine)  # all of the bucket's users' train rows, even after the cutoff


def test_predictions_are_cached_and_resume_per_bucket(tmp_path, one_point_grid, monkeypatch):
    run = _prepared(tmp_path)
    first = References(run).predictions()
    tuning = json.loads(run.path(REFERENCE_TUNING).read_text())
    assert tuning["chosen"] == {"n_factors": 8, "reg": 0.05, "n_epochs": refs_mod.MF_EPOCHS}
    # A killed run: the final file and one part gone; only that bucket is fitted again.
    run.path(REFERENCE_PREDICTIONS).unlink()
    parts = sorted(run.path(refs_mod.REFERENCE_PARTS).glob("bucket-*.parquet"))
    parts[0].unlink()
    calls = []
    real_fit = refs_mod.fit_mf
    monkeypatch.setattr(refs_mod, "fit_mf", lambda rows, params, seed=0: calls.append(1) or real_fit(rows, params, seed))
    pd.testing.assert_frame_equal(References(run).predictions(), first)
    assert len(calls) == 1
    References(run).predictions()
    assert len(calls) == 1  # everything cached


def test_all_time_fits_once_on_the_whole_history(tmp_path, one_point_grid):
    run = _prepared(tmp_path, history="all_time")
    refs = References(run)
    out = refs.predictions()
    assert refs.history.n_buckets == 1 and len(out) == len(run.read_ratings("test"))
    assert refs.describe()["history"] == "all_time"


@pytest.mark.slow
def test_ml1m_references_beat_the_bias_baseline(tmp_path):
    """The real data (all_time history: one fit; the study's before_split numbers are docs/results.md's):
    200 sampled users, MF on one point of its grid; kNN and MF both below the bias baseline, paired
    over users on all 11,146 test rows (issue 24: the rows do hold signal beyond the bias baseline)."""
    data = require_shared("data/ml-1m")
    from persona_tune.evaluation import baselines
    from persona_tune.evaluation.baselines import BaselinesConfig
    from persona_tune.evaluation.metrics import paired_rmse_diff

    prepare(load_ratings("ml-1m", data, ratings_file="ratings.partial-users0001-2999.dat"), tmp_path / "run",
            Protocol(history="all_time"))
    run = RunFolder(tmp_path / "run")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(refs_mod, "MF_FACTORS", (16,))
        mp.setattr(refs_mod, "MF_REGS", (0.05,))
        metrics = baselines.run(run, BaselinesConfig(n_boot=200))
    preds = pd.read_parquet(run.baseline_predictions)
    assert len(preds) == 11_146 and metrics["references"]["history"] == "all_time"
    assert metrics["references"]["mf_validation"].startswith("200 users not sampled")
    for name in ("knn", "mf"):
        d = paired_rmse_diff(preds, name, "bias", n_boot=200)
        assert d["hi"] < 0, (name, d)


def test_report_pairs_every_cell_with_the_references_even_for_old_baselines(tmp_path, one_point_grid):
    """Baselines written before the references (no knn, the old hand-written mf): the report takes both
    from references/ (fitted once, then cached), never the old mf column."""
    from persona_tune.evaluation import baselines
    from persona_tune.evaluation.baselines import BaselinesConfig
    from persona_tune.evaluation.report import paired_cells, references_note

    run = _prepared(tmp_path, history="all_time")
    baselines.run(run, BaselinesConfig(n_boot=20))
    refs = pd.read_parquet(run.path(REFERENCE_PREDICTIONS))
    old = pd.read_parquet(run.baseline_predictions).drop(columns=["knn"]).assign(mf=3.0)
    old.to_parquet(run.baseline_predictions, index=False)
    metrics = json.loads((run.baselines_dir / "metrics.json").read_text())
    metrics.pop("references")
    (run.baselines_dir / "metrics.json").write_text(json.dumps(metrics))
    cell = run.eval_variant_dir("agent")
    cell.mkdir(parents=True)
    agent = refs[["user_id", "item_id", "rating"]].assign(mode="scoring", prediction=refs["knn"].to_numpy())
    agent.to_parquet(cell / "predictions.parquet", index=False)

    [c] = paired_cells(run, n_boot=50)
    assert set(c["paired"]) == {"global_mean", "user_mean", "item_mean", "bias", "knn", "mf"}
    assert c["paired"]["knn"]["diff"] == pytest.approx(0.0)  # the agent is the kNN reference
    mf_rmse = float(np.sqrt(np.mean((refs["mf"] - refs["rating"]) ** 2)))
    assert c["rmse"] - c["paired"]["mf"]["diff"] == pytest.approx(mf_rmse)  # the tuned MF, not the old column
    assert "biased MF (scikit-surprise SVD) with 8 factors, reg 0.05" in references_note(run)


def test_references_table_script(tmp_path, one_point_grid, capsys):
    """benchmarks/references_table.py: RMSEs and paired differences from eval/baselines/, on all rows
    and on the rows of eval.max_rows N."""
    from benchmarks.references_table import main as table_main
    from persona_tune.evaluation import baselines
    from persona_tune.evaluation.baselines import BaselinesConfig

    run = _prepared(tmp_path, history="before_split")
    baselines.run(run, BaselinesConfig(n_boot=20))
    out = tmp_path / "references.json"
    assert table_main([str(run.root), "--also-rows", "60", "--json", str(out)]) == 0
    [full, part] = json.loads(out.read_text())["references"]
    preds = pd.read_parquet(run.baseline_predictions)
    assert (full["rows"], part["rows"], full["history"]) == (len(preds), 60, "before_split")
    rmse = {p: float(np.sqrt(np.mean((preds[p] - preds["rating"]) ** 2))) for p in ("bias", "knn", "mf")}
    assert full["mf"]["rmse"] == pytest.approx(rmse["mf"], abs=1e-4)
    assert full["paired"]["mf-bias"]["diff"] == pytest.approx(rmse["mf"] - rmse["bias"], abs=2e-4)
    assert full["mf_tuning"]["chosen"]["n_factors"] == 8
    assert "| before_split | 60 |" in capsys.readouterr().out
