"""The paper's protocol: sampling, chronological split, leakage-free historical averages, item texts."""

from __future__ import annotations

import json
import logging

import numpy as np
import pandas as pd
import pytest

from persona_tune import cli
from persona_tune.data.loaders import load_ratings
from persona_tune.data.metadata import cast_from_abstract, load_metadata, truncate_words
from persona_tune.data.metadata import render_item_text
from persona_tune.data.prepare import Protocol, prepare, sample_users
from persona_tune.data.split import n_train_rows
from persona_tune.data.synthetic import SynthConfig, write_synthetic
from persona_tune.errors import ConfigError
from persona_tune.runfolder import RunFolder
from tests.fixtures_runs import make_prepared_run

RATING_DTYPES = {"user_id": "int64", "item_id": "int64", "rating": "int64", "timestamp": "int64"}


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    return write_synthetic(tmp_path_factory.mktemp("synth") / "data", SynthConfig(n_users=120, n_items=300, seed=3))


def test_make_prepared_run_follows_the_contract(tmp_path):
    run = RunFolder(make_prepared_run(tmp_path, n_users=12, seed=0))
    train, test = pd.read_parquet(run.ratings_train), pd.read_parquet(run.ratings_test)
    items, users = pd.read_parquet(run.items), pd.read_parquet(run.users)
    for df in (train, test):
        assert {c: str(t) for c, t in df.dtypes.items()} == RATING_DTYPES
        assert df["rating"].between(1, 5).all()
    assert list(items.columns) == ["item_id", "title", "year", "genres", "hist_avg", "hist_count", "summary", "cast", "text"]
    assert str(items["year"].dtype) == "Int64" and items["hist_avg"].dtype == "float64"
    assert list(users.columns) == ["user_id", "n_ratings", "n_train", "n_test"]
    assert len(users) == 12 and users["n_ratings"].between(20, 60).all()
    assert (users["n_train"] + users["n_test"] == users["n_ratings"]).all()
    assert set(train["item_id"]) | set(test["item_id"]) <= set(items["item_id"])
    manifest = run.read_manifest()
    assert manifest["protocol"]["dataset"] == "synthetic"
    assert manifest["counts"]["train_rows"] == len(train) and manifest["counts"]["test_rows"] == len(test)
    assert manifest["stages"]["prepare"]["params"]["train_frac"] == 0.6
    assert all(len(h) == 64 for h in manifest["inputs"].values())


def test_split_is_chronological_60_40_with_floor(tmp_path, synth_dir):
    log = load_ratings("synthetic", synth_dir)
    run = prepare(log, tmp_path / "run", Protocol(min_ratings=100, max_ratings=200, n_users=50, seed=1))
    train, test = pd.read_parquet(run.ratings_train), pd.read_parquet(run.ratings_test)
    users = pd.read_parquet(run.users)
    assert len(users) == 50 and users["n_ratings"].between(100, 200).all()
    for u, row in users.set_index("user_id").iterrows():
        assert row["n_train"] == int(np.floor(0.6 * row["n_ratings"]))
        tr, te = train[train.user_id == u], test[test.user_id == u]
        assert len(tr) == row["n_train"] and len(te) == row["n_test"]
        last_train = max(zip(tr.timestamp, tr.item_id))
        first_test = min(zip(te.timestamp, te.item_id))
        assert last_train < first_test
        src = log.ratings[log.ratings.user_id == u]
        assert len(src) == row["n_ratings"]  # every rating of a sampled user is in train or test


def test_ties_are_broken_by_item_id():
    ratings = pd.DataFrame({"user_id": [1] * 5, "item_id": [50, 40, 30, 20, 10], "rating": [1, 2, 3, 4, 5],
                            "timestamp": [100, 100, 100, 50, 200]})
    from persona_tune.data.split import split_chronological
    train, test = split_chronological(ratings, np.array([1]), 0.6)
    assert train["item_id"].tolist() == [20, 30, 40]
    assert test["item_id"].tolist() == [50, 10]


@pytest.mark.parametrize("n,expected", [(100, 60), (101, 60), (199, 119), (5, 3), (2, 1), (115, 69)])
def test_n_train_rows_is_floor(n, expected):
    assert n_train_rows(n, 0.6) == expected


def test_hist_avg_never_sees_a_test_row(tmp_path, synth_dir):
    log = load_ratings("synthetic", synth_dir)
    protocol = Protocol(min_ratings=100, max_ratings=200, n_users=40, seed=0, history="all_time")
    run = prepare(log, tmp_path / "a", protocol)
    test = pd.read_parquet(run.ratings_test)
    items = pd.read_parquet(run.items).set_index("item_id")
    # Recompute from the source log minus the test rows.
    key = ["user_id", "item_id"]
    rest = log.ratings.merge(test[key], on=key, how="left", indicator=True).query("_merge == 'left_only'")
    expected = rest.groupby("item_id")["rating"].agg(["mean", "size"])
    pd.testing.assert_series_equal(items.loc[expected.index, "hist_avg"], expected["mean"], check_names=False)
    assert (items.loc[expected.index, "hist_count"] == expected["size"]).all()
    # Changing every test rating must not move any historical average.
    flipped = log.ratings.merge(test[key].assign(flip=True), on=key, how="left")
    log.ratings = log.ratings.assign(rating=np.where(flipped["flip"].eq(True), 6 - log.ratings["rating"], log.ratings["rating"]))
    run_b = prepare(log, tmp_path / "b", protocol)
    pd.testing.assert_frame_equal(pd.read_parquet(run.items), pd.read_parquet(run_b.items))
    assert not pd.read_parquet(run.ratings_test).equals(pd.read_parquet(run_b.ratings_test))


def test_same_seed_same_bytes_other_seed_other_users(tmp_path, synth_dir):
    log = load_ratings("synthetic", synth_dir)
    protocol = Protocol(min_ratings=100, max_ratings=200, n_users=30, seed=7)
    a, b = prepare(log, tmp_path / "a", protocol), prepare(log, tmp_path / "b", protocol)
    for name in ("ratings_train", "ratings_test", "items", "users", "history"):
        assert (a.root / f"{name}.parquet").read_bytes() == (b.root / f"{name}.parquet").read_bytes(), name
    c = prepare(log, tmp_path / "c", Protocol(min_ratings=100, max_ratings=200, n_users=30, seed=8))
    assert set(pd.read_parquet(c.users).user_id) != set(pd.read_parquet(a.users).user_id)


def test_fewer_eligible_users_takes_all_and_warns(synth_dir, caplog):
    ratings = load_ratings("synthetic", synth_dir).ratings
    counts = ratings.groupby("user_id").size()
    n_eligible = int(counts.between(100, 200).sum())
    with caplog.at_level(logging.WARNING):
        users, eligible = sample_users(ratings, Protocol(n_users=n_eligible + 10))
    assert eligible == n_eligible and len(users) == n_eligible
    assert "taking all of them" in caplog.text
    with pytest.raises(ConfigError, match="no user has 900-1000 ratings"):
        sample_users(ratings, Protocol(min_ratings=900, max_ratings=1000))


def test_protocol_rejects_bad_options():
    for bad in (Protocol(train_frac=1.0), Protocol(min_ratings=300, max_ratings=200), Protocol(n_users=0)):
        with pytest.raises(ConfigError):
            bad.check()


def test_render_item_text_matches_the_paper():
    assert render_item_text("Big Lebowski, The", 1998, "Comedy|Crime", 3.74) == (
        "The movie Big Lebowski, The was released in the year 1998 is of Comedy, Crime genre "
        "with historical average rating of 3.74."
    )
    text = render_item_text("X", pd.NA, "", float("nan"), "A story.", "A B, C D")
    assert text == "The movie X with no historical ratings yet. Summary: A story. Cast: A B, C D."


def test_metadata_from_abstracts(tmp_path):
    abstracts = {
        "1": "Stealing Beauty is a 1996 drama film directed by Bernardo Bertolucci and starring Liv Tyler, "
             "Joseph Fiennes, Jeremy Irons, and Rachel Weisz. Written by Bertolucci.",
        "2": "Abstract not found.",
        "3": "Movie: Boys Don't Cry (1999), Genres: ['Drama']",
        "4": {"summary": "Own summary.", "cast": ["Ann A", "Bob B"]},
    }
    path = tmp_path / "meta.json"
    path.write_text(json.dumps(abstracts))
    meta = load_metadata(path, summary_words=8).set_index("item_id")
    assert meta.loc[1, "cast"] == "Liv Tyler, Joseph Fiennes, Jeremy Irons, Rachel Weisz"
    assert meta.loc[1, "summary"] == "Stealing Beauty is a 1996 drama film directed ..."
    assert meta.loc[2, "summary"] == "" and meta.loc[3, "summary"] == "" and meta.loc[3, "cast"] == ""
    assert meta.loc[4, "summary"] == "Own summary." and meta.loc[4, "cast"] == "Ann A, Bob B"
    assert cast_from_abstract("It stars Laurence Fishburne, Sam Neill and Joely Richardson. Set in 2047.") == [
        "Laurence Fishburne", "Sam Neill", "Joely Richardson"]
    assert truncate_words("a b c", 0) == "a b c"


def test_cli_prepare_with_meta_file_and_errors(tmp_path, synth_dir, capsys):
    meta = tmp_path / "meta.csv"
    pd.DataFrame({"item_id": [1, 2], "summary": ["First film.", "Second film."], "cast": ["Ann A", ""]}).to_csv(meta, index=False)
    out = tmp_path / "run"
    rc = cli.main(["prepare", "--dataset", "synthetic", "--data-dir", str(synth_dir), "--out", str(out),
                   "--n-users", "10", "--meta-file", str(meta)])
    assert rc == 0
    items = pd.read_parquet(out / "items.parquet").set_index("item_id")
    assert items.loc[1, "text"].endswith(" Summary: First film. Cast: Ann A.")
    assert items.loc[2, "text"].endswith(" Summary: Second film.")
    assert str(meta.resolve()) in RunFolder(out).read_manifest()["inputs"]
    rc = cli.main(["prepare", "--dataset", "ml-1m", "--data-dir", str(tmp_path / "nowhere"), "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "nowhere/movies.dat: file not found" in err and len(err.splitlines()) == 1


def test_reprepare_keeps_later_stages_safe(tmp_path, synth_dir):
    log = load_ratings("synthetic", synth_dir)
    run = prepare(log, tmp_path / "run", Protocol(n_users=20))
    run.record_stage("distill", {"model": "x"})
    prepare(log, run.root, Protocol(n_users=20))  # same protocol and inputs: fine
    with pytest.raises(ConfigError, match="already holds stages distill"):
        prepare(log, run.root, Protocol(n_users=21))
    prepare(log, run.root, Protocol(n_users=21), force=True)
    assert len(pd.read_parquet(run.users)) == 21


def test_cli_prepare_generic_csv(tmp_path):
    rng = np.random.default_rng(0)
    rows = [(f"u{u}", 100 + i, int(rng.integers(1, 6)), f"2001-01-{i + 1:02d}") for u in range(3) for i in range(10)]
    ratings = tmp_path / "log.csv"
    pd.DataFrame(rows, columns=["who", "what", "stars", "when"]).assign(who=lambda d: d.who.str[1:]).to_csv(ratings, index=False)
    items = tmp_path / "books.csv"
    pd.DataFrame({"what": range(100, 110), "name": [f"Book {i}" for i in range(10)], "genres": "Fiction"}).to_csv(items, index=False)
    out = tmp_path / "run"
    rc = cli.main(["prepare", "--dataset", "generic", "--ratings-file", str(ratings), "--items-file", str(items),
                   "--columns", "user=who,item=what,rating=stars,timestamp=when,title=name", "--item-noun", "book",
                   "--min-ratings", "5", "--max-ratings", "20", "--out", str(out)])
    assert rc == 0
    test = pd.read_parquet(out / "ratings_test.parquet")
    assert len(test) == 12 and set(test["item_id"]) == {106, 107, 108, 109}  # the last 4 of 10 per user
    text = pd.read_parquet(out / "items.parquet").set_index("item_id").loc[100, "text"]
    assert text.startswith("The book Book 0 is of Fiction genre with historical average rating of")


def test_split_invariants_hold_for_any_log():
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from persona_tune.data.split import split_chronological

    rows = st.lists(st.tuples(st.integers(1, 4), st.integers(1, 30), st.integers(1, 5), st.integers(0, 20)),
                    min_size=1, max_size=80, unique_by=lambda r: (r[0], r[1]))

    @settings(max_examples=25, deadline=None)
    @given(rows, st.sampled_from([0.5, 0.6, 0.8]))
    def check(data, frac):
        ratings = pd.DataFrame(data, columns=["user_id", "item_id", "rating", "timestamp"])
        users = np.array(sorted(u for u, n in ratings.groupby("user_id").size().items() if n >= 2))
        train, test = split_chronological(ratings, users, frac)
        kept = ratings[ratings.user_id.isin(users)]
        assert len(train) + len(test) == len(kept)
        assert not set(zip(train.user_id, train.item_id)) & set(zip(test.user_id, test.item_id))
        for u in users:
            tr, te = train[train.user_id == u], test[test.user_id == u]
            assert len(tr) == n_train_rows(len(tr) + len(te), frac) and len(te) >= 1
            assert max(zip(tr.timestamp, tr.item_id)) < min(zip(te.timestamp, te.item_id))

    check()
