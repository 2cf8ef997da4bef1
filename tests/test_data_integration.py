"""The real MovieLens files in ../shared/data: counts against SOURCE.txt, the paper's protocol, the
bias-baseline reference number. Skips without ../shared; fails under CI=true."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest

from persona_tune.data.loaders import load_ml100k, load_ml1m
from persona_tune.data.metadata import attach_metadata, load_metadata
from persona_tune.data.prepare import Protocol, prepare
from persona_tune.history import bucket_cutoffs, history_mode, split_times
from tests.fixtures_runs import require_shared
from tests.fixtures_runs import bias_baseline

pytestmark = pytest.mark.integration
PARTIAL = "ratings.partial-users0001-2999.dat"


def number(text: str, pattern: str) -> int:
    m = re.search(pattern, text)
    assert m, f"SOURCE.txt no longer says {pattern!r}"
    return int(m.group(1).replace(",", ""))


@pytest.fixture(scope="module")
def ml1m():
    d = require_shared("data/ml-1m")
    return d, load_ml1m(d, PARTIAL)  # its speed: benchmarks/bench_data.py


@pytest.fixture(scope="module")
def ml1m_run(ml1m, tmp_path_factory):
    _, log = ml1m
    return prepare(log, tmp_path_factory.mktemp("ml1m") / "run", Protocol())


def test_ml1m_counts_and_checksums_match_source_txt(ml1m):
    d, log = ml1m
    source = (d / "SOURCE.txt").read_text()
    assert len(log.ratings) == number(source, r"ratings partial: ([\d,]+) lines")
    assert log.ratings["user_id"].nunique() == number(source, r"users exactly\s+1\.\.(\d+)")
    assert log.ratings["item_id"].nunique() == number(source, r"([\d,]+) distinct movies")
    assert len(log.items) == number(source, r"movies\.dat:\s+([\d,]+) lines")
    assert len(log.users) == number(source, r"users\.dat:\s+([\d,]+) lines")
    for path, sha in log.inputs.items():
        assert f"sha256 {sha}" in source, path
    items = log.items.set_index("item_id")
    assert items.loc[2571, "title"] == "Matrix, The" and items.loc[2571, "year"] == 1999


def test_ml1m_paper_protocol(ml1m, ml1m_run):
    _, log = ml1m
    run = ml1m_run
    users = pd.read_parquet(run.users)
    train, test = pd.read_parquet(run.ratings_train), pd.read_parquet(run.ratings_test)
    counts = run.read_manifest()["counts"]
    assert len(users) == 200 and users["n_ratings"].between(100, 200).all()
    assert counts["eligible_users"] == 653  # ../shared/notes: 653 eligible among users 1..2999
    assert (users["n_train"] == np.floor(0.6 * users["n_ratings"] + 1e-9).astype(int)).all()
    last_train = train.groupby("user_id")["timestamp"].max()
    first_test = test.groupby("user_id")["timestamp"].min()
    assert (last_train <= first_test).all()
    # No test row feeds a historical average, nor (leak-free default) a rating at or after the latest
    # split-time cutoff.
    assert history_mode(run) == "before_split"
    items = pd.read_parquet(run.items).set_index("item_id")
    key = ["user_id", "item_id"]
    rest = log.ratings.merge(test[key], on=key, how="left", indicator=True).query("_merge == 'left_only'")
    assert len(run.read_history()) == len(rest)
    cutoff = bucket_cutoffs(split_times(test).to_numpy())[-1]
    rest = rest[rest["timestamp"] < cutoff]
    expected = rest.groupby("item_id")["rating"].agg(["mean", "size"])
    assert np.allclose(items.loc[expected.index, "hist_avg"], expected["mean"])
    assert items["hist_count"].sum() == len(rest) < len(log.ratings) - len(test)


def test_ml1m_bias_baseline_reproduces_the_reference(ml1m, ml1m_run):
    _, log = ml1m
    run = ml1m_run
    test = pd.read_parquet(run.ratings_test)
    key = ["user_id", "item_id"]
    fit = log.ratings.merge(test[key], on=key, how="left", indicator=True).query("_merge == 'left_only'")
    rmse = float(np.sqrt(np.mean((bias_baseline(fit, test) - test["rating"]) ** 2)))
    rmse_mean = float(np.sqrt(np.mean((fit["rating"].mean() - test["rating"]) ** 2)))
    assert 0.91 <= rmse <= 0.935, rmse  # ../shared/notes: 0.914-0.929 over 3 seeds
    assert 1.09 <= rmse_mean <= 1.12, rmse_mean  # global mean 1.10-1.11


def test_ml1m_dbpedia_metadata(ml1m):
    _, log = ml1m
    meta_dir = require_shared("data/movie-meta")
    meta = load_metadata(meta_dir / "ml1m_dbpedia_abstracts.json", summary_words=60)
    assert len(meta) == 3301 and (meta["summary"] != "").sum() == 2942  # SOURCE.txt: 2,942 real abstracts
    items = attach_metadata(log.items, meta, meta_dir / "ml1m_dbpedia_abstracts.json").set_index("item_id")
    assert "Liv Tyler" in items.loc[781, "cast"]
    assert items["summary"].str.split().str.len().max() <= 61


def test_ml100k_counts_and_protocol(tmp_path):
    d = require_shared("data/ml-100k")
    source = (d / "SOURCE.txt").read_text()
    log = load_ml100k(d)
    r = log.ratings
    assert len(r) == number(source, r"u\.data: ([\d,]+) lines")
    assert r["user_id"].nunique() == number(source, r"users (\d+) \(ids")
    assert r["item_id"].nunique() == number(source, r"items ([\d,]+) \(ids")
    assert len(log.items) == number(source, r"u\.item: ([\d,]+) lines")
    for star in range(1, 6):
        assert (r["rating"] == star).sum() == number(source, rf"\b{star}:(\d+)")
    per_user = r.groupby("user_id").size()
    assert per_user.min() == number(source, r"min ratings/user (\d+)")
    assert per_user.max() == number(source, r"max (\d+)")
    assert r["timestamp"].min() == number(source, r"timestamps (\d+)\.\.")
    assert all(sha in source for sha in log.inputs.values())
    run = prepare(log, tmp_path / "run", Protocol())
    users = pd.read_parquet(run.users)
    assert len(users) == 200 and users["n_ratings"].between(100, 200).all()
