"""The synthetic ML-1M-format generator: determinism, size, realistic structure, learnability."""

from __future__ import annotations

import numpy as np
import pandas as pd

from persona_tune import cli
from persona_tune.data.loaders import ML_GENRES, load_ratings
from persona_tune.data.prepare import Protocol, prepare
from persona_tune.data.synthetic import SynthConfig, generate
from tests.fixtures_runs import bias_baseline


def test_same_seed_same_bytes():  # its speed: benchmarks/bench_data.py
    first = generate(SynthConfig())
    assert first == generate(SynthConfig())
    assert first[0] != generate(SynthConfig(seed=1))[0]


def test_cli_writes_loadable_ml1m_files_with_realistic_structure(tmp_path, capsys):
    out = tmp_path / "synth"
    assert cli.main(["synth", "--out", str(out), "--seed", "0"]) == 0
    assert "prepare --dataset synthetic" in capsys.readouterr().out
    log = load_ratings("synthetic", out)
    r = log.ratings
    assert r["user_id"].nunique() == 300 and len(log.items) == 800 and len(log.users) == 300
    counts = r.groupby("user_id").size()
    assert counts.between(100, 200).sum() >= 200  # the default protocol finds its 200 users
    shares = r["rating"].value_counts(normalize=True)
    assert set(shares.index) == {1, 2, 3, 4, 5} and shares[4] > shares[1] and shares[1] > 0.02
    genres = set("|".join(log.items["genres"]).split("|"))
    assert genres == set(ML_GENRES)
    assert log.items["year"].between(1919, 2000).all()
    # Long tail: the 10% most rated items get far more than 10% of the ratings.
    per_item = r["item_id"].value_counts()
    assert per_item.iloc[: len(per_item) // 10].sum() / len(r) > 0.2
    # Timestamps increase through each user's history and are distinct per user.
    assert not r.duplicated(["user_id", "timestamp"]).any()


def test_ratings_are_learnable_by_a_bias_baseline(tmp_path):
    from persona_tune.data.synthetic import write_synthetic

    log = load_ratings("synthetic", write_synthetic(tmp_path / "d", SynthConfig()))
    run = prepare(log, tmp_path / "run", Protocol())
    test = pd.read_parquet(run.ratings_test)
    key = ["user_id", "item_id"]
    fit = log.ratings.merge(test[key], on=key, how="left", indicator=True).query("_merge == 'left_only'")
    rmse_bias = np.sqrt(np.mean((bias_baseline(fit, test) - test["rating"]) ** 2))
    rmse_mean = np.sqrt(np.mean((fit["rating"].mean() - test["rating"]) ** 2))
    assert rmse_bias < 0.9 * rmse_mean, (rmse_bias, rmse_mean)


def test_committed_sample_is_the_generator_output(repo_root):
    # datasets/synthetic/README.md: persona-tune synth --out datasets/synthetic/sample --n-users 10 --n-items 60 --median-ratings 25 --seed 0
    sample = repo_root / "datasets" / "synthetic" / "sample"
    ratings, movies, users = generate(SynthConfig(n_users=10, n_items=60, median_ratings=25, seed=0))
    assert (sample / "ratings.dat").read_bytes() == ratings
    assert (sample / "movies.dat").read_bytes() == movies
    assert (sample / "users.dat").read_bytes() == users
