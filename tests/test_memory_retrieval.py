"""Retrieval of long-term memories: same user only, train memories only, never the row's own item."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from persona_tune.cli import main as cli_main
from persona_tune.errors import ConfigError, DataError, StageMissingError
from persona_tune.memory.embeddings import l2_normalise
from persona_tune.memory.retrieval import RETRIEVED_COLUMNS, retrieve
from persona_tune.memory.stage import EmbedConfig
from persona_tune.memory.stage import run as embed
from persona_tune.runfolder import RunFolder
from tests.fixtures_runs import make_distilled_run, make_embedded_run, make_prepared_run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return make_embedded_run(tmp_path_factory.mktemp("retrieval"), k=3, delta=0.0)


def test_retrieved_memories_are_own_other_train_items(run):
    r = RunFolder(run)
    retrieved = r.read_table("memory/retrieved.parquet")
    assert list(retrieved.columns) == RETRIEVED_COLUMNS
    train = r.read_table("ratings_train.parquet")
    test = r.read_table("ratings_test.parquet")
    train_pairs = set(zip(train.user_id, train.item_id))
    test_pairs = set(zip(test.user_id, test.item_id))

    mem_pairs = list(zip(retrieved.user_id, retrieved.memory_item_id))
    assert all(p in train_pairs for p in mem_pairs), "a memory that is not the same user's train row"
    assert not any(p in test_pairs for p in mem_pairs), "a test-period interaction was retrieved"
    assert (retrieved.memory_item_id != retrieved.item_id).all(), "a row retrieved its own item"
    query_pairs = {("train", u, i) for u, i in train_pairs} | {("test", u, i) for u, i in test_pairs}
    assert set(zip(retrieved.split, retrieved.user_id, retrieved.item_id)) <= query_pairs
    # k = 3, delta = 0: every row of a user with >= 4 memories gets ranks 0, 1, 2, best first.
    per_row = retrieved.groupby(["split", "user_id", "item_id"])
    assert per_row["rank"].apply(list).map(lambda ranks: ranks == [0, 1, 2]).all()
    assert (per_row["score"].apply(lambda s: np.all(np.diff(s.to_numpy()) <= 1e-6))).all()
    assert len(per_row) == len(train) + len(test)

    meta = json.loads(r.path("memory/embeddings.json").read_text())
    assert meta | {"inputs": None} == meta | {
        "backend": "hash", "model": "hash-256", "dim": 256, "query": "user+item", "k": 3, "delta": 0.0, "inputs": None
    }
    vectors = np.load(r.path("memory/memory_vectors.npy"))
    ids = pd.read_parquet(r.path("memory/memory_ids.parquet"))
    assert vectors.dtype == np.float32 and vectors.shape == (len(ids), 256)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)
    assert r.stage_record("embed")["params"]["k"] == 3


def brute_force(rows, memories, memory_vectors, item_ids, item_vectors, k, delta):
    """Reference top-k: score every memory of the row's user with numpy, drop the row's own item."""
    item_vec = dict(zip(item_ids, item_vectors))
    out = []
    for split, user, item in rows.itertuples(index=False):
        mine = memories.index[(memories.user_id == user) & (memories.item_id != item)]
        scores = memory_vectors[mine] @ item_vec[item]
        order = np.argsort(-scores, kind="stable")
        kept = [j for j in order if scores[j] >= delta][:k]
        out += [(split, user, item, rank, int(memories.item_id[mine[j]])) for rank, j in enumerate(kept)]
    return out


def test_retrieve_matches_brute_force_and_never_crosses_users():
    rng = np.random.default_rng(0)
    d, n_items = 16, 40
    item_ids = np.arange(100, 100 + n_items)
    item_vectors = l2_normalise(rng.standard_normal((n_items, d)))
    memories = pd.DataFrame(
        {"user_id": np.repeat([1, 2, 3], 10), "item_id": np.concatenate([rng.choice(item_ids, 10, replace=False) for _ in range(3)])}
    )
    memory_vectors = l2_normalise(rng.standard_normal((len(memories), d)))
    # User 2's memory 0 is a perfect match for every query of user 1: it must never be retrieved for user 1.
    rows = pd.DataFrame({"split": ["test"] * 6, "user_id": [1, 1, 1, 2, 4, 1], "item_id": item_ids[[0, 1, 2, 3, 4, 5]]})
    rows = pd.concat([rows, memories.assign(split="train")[["split", "user_id", "item_id"]]], ignore_index=True)
    memory_vectors[10] = item_vectors[0]
    got = retrieve(rows, memories, memory_vectors, item_ids, item_vectors, k=2, delta=-0.2, query="item", progress=False)
    want = brute_force(rows, memories, memory_vectors, item_ids, item_vectors, k=2, delta=-0.2)
    assert sorted(zip(got.split, got.user_id, got.item_id, got["rank"], got.memory_item_id)) == sorted(want)
    assert not ((got.user_id == 4).any()), "user 4 has no memories"
    mem_owner = set(zip(memories.user_id, memories.item_id))
    assert all((u, m) in mem_owner for u, m in zip(got.user_id, got.memory_item_id))
    assert (got.score >= -0.2).all()


def test_user_plus_item_query_uses_the_profile():
    d = 8
    item_ids = np.array([1, 2, 3])
    item_vectors = np.eye(d, dtype=np.float32)[:3]
    memories = pd.DataFrame({"user_id": [7, 7], "item_id": [2, 3]})
    # Memory 2 is a bit closer to the item; memory 3 matches the user's profile.
    memory_vectors = l2_normalise(np.array([[0.6, 0.8, 0, 0, 0, 0, 0, 0], [0.5, 0, 0, 0.86, 0, 0, 0, 0]]))
    profile_vectors = np.zeros((1, d), np.float32)
    profile_vectors[0, 3] = 1.0
    rows = pd.DataFrame({"split": ["test"], "user_id": [7], "item_id": [1]})
    by_item = retrieve(rows, memories, memory_vectors, item_ids, item_vectors, k=1, delta=0.0, query="item", progress=False)
    by_user = retrieve(
        rows, memories, memory_vectors, item_ids, item_vectors, k=1, delta=0.0, query="user+item",
        profile_ids=np.array([7]), profile_vectors=profile_vectors, progress=False,
    )
    assert by_item.memory_item_id.tolist() == [2]
    assert by_user.memory_item_id.tolist() == [3]
    np.testing.assert_allclose(by_user.score, (0.5 + 0.86) / np.sqrt(2) / np.linalg.norm([0.5, 0.86]), rtol=1e-5)
    with pytest.raises(ConfigError, match="profile vectors"):
        retrieve(rows, memories, memory_vectors, item_ids, item_vectors, query="user+item")


def test_delta_filters_low_scores(run):
    summary = embed(RunFolder(run), EmbedConfig(backend="hash", k=1, delta=0.99))
    retrieved = RunFolder(run).read_table("memory/retrieved.parquet")
    assert (retrieved.score >= 0.99).all()
    assert summary["n_retrieved"] == len(retrieved) < summary["n_rows"]
    embed(RunFolder(run), EmbedConfig(backend="hash", k=3, delta=0.0))  # restore the module fixture's state


def test_vectors_are_reused_unless_forced_or_inputs_change(tmp_path):
    run = make_embedded_run(tmp_path, n_users=6)
    vec = RunFolder(run).path("memory/memory_vectors.npy")
    first = vec.stat().st_mtime_ns
    assert cli_main(["embed", "--run", str(run), "--backend", "hash", "--query", "item"]) == 0
    assert vec.stat().st_mtime_ns == first
    assert json.loads(RunFolder(run).path("memory/embeddings.json").read_text())["query"] == "item"
    assert cli_main(["embed", "--run", str(run), "--backend", "hash", "--force"]) == 0
    assert vec.stat().st_mtime_ns != first
    second = vec.stat().st_mtime_ns
    assert cli_main(["embed", "--run", str(run), "--backend", "hash", "--model", "hash-64"]) == 0
    assert np.load(vec).shape[1] == 64 and vec.stat().st_mtime_ns != second


def test_memory_of_a_test_row_is_rejected(tmp_path):
    run = make_distilled_run(tmp_path, n_users=4)
    r = RunFolder(run)
    memories = r.read_table("distill/memories.parquet")
    test_row = r.read_table("ratings_test.parquet").iloc[0]
    leak = memories.iloc[[0]].assign(user_id=test_row.user_id, item_id=test_row.item_id)
    pd.concat([memories, leak], ignore_index=True).to_parquet(r.path("distill/memories.parquet"), index=False)
    with pytest.raises(DataError, match=rf"memories.parquet:{len(memories) + 1}: .*not a train row"):
        embed(RunFolder(run), EmbedConfig(backend="hash"))


def test_missing_inputs_and_bad_options(tmp_path):
    run = make_prepared_run(tmp_path, n_users=4)
    with pytest.raises(StageMissingError, match="persona-tune distill"):
        embed(RunFolder(run), EmbedConfig(backend="hash"))
    with pytest.raises(ConfigError, match="delta"):
        embed(RunFolder(run), EmbedConfig(backend="hash", delta=2.0))
    assert cli_main(["embed", "--run", str(tmp_path / "nope"), "--backend", "hash"]) == 2
