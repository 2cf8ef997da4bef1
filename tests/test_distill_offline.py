"""The offline distiller through the CLI: contract files, informative text, identical bytes twice."""

from __future__ import annotations

import json
import re

import pandas as pd
import pytest

from persona_tune.cli import main as cli
from persona_tune.runfolder import RunFolder
from tests.fixtures_runs import make_prepared_run

PROFILE_COLUMNS = ["user_id", "profile", "activity", "conformity", "diversity", "traits_text", "backend", "model", "prompt_version"]
MEMORY_COLUMNS = ["user_id", "item_id", "rating", "timestamp", "explanation", "backend", "model", "prompt_version"]
TRAIT_COLUMNS = ["user_id", "activity_value", "conformity_value", "diversity_value", "activity", "conformity", "diversity"]


@pytest.fixture
def run(tmp_path):
    return make_prepared_run(tmp_path, n_users=12, seed=0)


def test_offline_writes_the_contract_files(run):
    assert cli(["distill", "--run", str(run), "--backend", "offline", "--no-progress"]) == 0
    train = pd.read_parquet(run / "ratings_train.parquet")
    items = pd.read_parquet(run / "items.parquet").set_index("item_id")
    profiles = pd.read_parquet(run / "distill/profiles.parquet")
    memories = pd.read_parquet(run / "distill/memories.parquet")
    traits = pd.read_parquet(run / "distill/traits.parquet")
    assert list(profiles.columns) == PROFILE_COLUMNS
    assert list(memories.columns) == MEMORY_COLUMNS
    assert list(traits.columns) == TRAIT_COLUMNS
    for df, cols in ((profiles, ["user_id"]), (memories, ["user_id", "item_id", "rating", "timestamp"]), (traits, ["user_id"])):
        assert all(df[c].dtype == "int64" for c in cols)
    assert sorted(profiles["user_id"]) == sorted(train["user_id"].unique()) == traits["user_id"].tolist()
    # One memory per train row, and nothing else.
    key = ["user_id", "item_id", "rating", "timestamp"]
    pd.testing.assert_frame_equal(
        memories[key].sort_values(key).reset_index(drop=True), train[key].sort_values(key).reset_index(drop=True)
    )
    for df in (profiles, memories):
        assert (df["backend"] == "offline").all() and (df["model"] == "rules-v1").all()
    for level in ("activity", "conformity", "diversity"):
        assert set(profiles[level]) <= {"low", "medium", "high"}
        assert profiles.set_index("user_id")[level].equals(traits.set_index("user_id")[level])
    assert profiles["traits_text"].str.startswith("Your activity trait is described as: ").all()
    # Each explanation names its movie and states the true rating.
    for r in memories.itertuples():
        assert r.explanation.startswith(f"I rated {items.loc[r.item_id, 'title']}")
        assert re.search(rf" as {r.rating} because ", r.explanation)
    assert (run / "distill/failures.jsonl").read_text() == ""
    record = RunFolder(run).stage_record("distill")
    assert record["backend"] == "offline" and record["summary"]["users_done"] == 12
    assert set(record["trait_cuts"]) == {"activity", "conformity", "diversity"}


def test_offline_profile_states_the_users_statistics(run):
    assert cli(["distill", "--run", str(run), "--no-progress"]) == 0
    train = pd.read_parquet(run / "ratings_train.parquet").merge(
        pd.read_parquet(run / "items.parquet")[["item_id", "hist_avg", "genres"]], on="item_id")
    profiles = pd.read_parquet(run / "distill/profiles.parquet").set_index("user_id")
    for user_id, rows in train.groupby("user_id"):
        text = profiles.loc[user_id, "profile"]
        assert f"I have rated {len(rows)} movies, {rows['rating'].mean():.2f} stars on average" in text
        assert f"{(rows['rating'] - rows['hist_avg']).abs().mean():.2f} stars away from theirs" in text
        genres = rows.assign(g=rows["genres"].str.split("|")).explode("g").groupby("g")["rating"].agg(["mean", "size"])
        best = genres[genres["size"] >= 3].sort_values(["mean"], ascending=False)
        if len(best) and best["mean"].iloc[0] >= rows["rating"].mean():
            assert f"{best.index[0]} ({best['mean'].iloc[0]:.2f} on average over {best['size'].iloc[0]} movies)" in text


def test_offline_gives_identical_bytes_twice(run, tmp_path):
    files = ["profiles.parquet", "memories.parquet", "traits.parquet", "failures.jsonl"]
    assert cli(["distill", "--run", str(run), "--no-progress"]) == 0
    first = {f: (run / "distill" / f).read_bytes() for f in files}
    other = make_prepared_run(tmp_path / "again", n_users=12, seed=0)
    assert cli(["distill", "--run", str(other), "--no-progress"]) == 0
    assert cli(["distill", "--run", str(run), "--no-progress"]) == 0
    for f in files:
        assert (run / "distill" / f).read_bytes() == first[f], f
        assert (other / "distill" / f).read_bytes() == first[f], f


def test_users_option_and_fixed_cuts(run):
    cuts = {"activity": [10, 20], "conformity": [0.5, 1.0], "diversity": [4, 6]}
    assert cli(["distill", "--run", str(run), "--users", "3", "--trait-cuts", json.dumps(cuts), "--no-progress"]) == 0
    traits = pd.read_parquet(run / "distill/traits.parquet")
    train = pd.read_parquet(run / "ratings_train.parquet")
    assert traits["user_id"].tolist() == sorted(train["user_id"].unique())[:3]
    expected = ["low" if v <= 10 else "medium" if v <= 20 else "high" for v in traits["activity_value"]]
    assert traits["activity"].tolist() == expected
    assert RunFolder(run).stage_record("distill")["trait_cuts"]["conformity"] == [0.5, 1.0]


def test_bad_inputs_give_clear_errors(run, tmp_path, capsys):
    train = pd.read_parquet(run / "ratings_train.parquet")
    train.loc[4, "item_id"] = 999_999
    train.to_parquet(run / "ratings_train.parquet", index=False)
    assert cli(["distill", "--run", str(run), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "ratings_train.parquet:5: item_id 999999 is not in" in err
    assert cli(["distill", "--run", str(tmp_path / "nope"), "--no-progress"]) == 2
    assert "persona-tune prepare" in capsys.readouterr().err
    assert cli(["distill", "--run", str(run), "--trait-cuts", "[1, 2]", "--no-progress"]) == 2
    assert "--trait-cuts" in capsys.readouterr().err
