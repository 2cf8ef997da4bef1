"""Leak-free history (persona_tune/history.py): item averages as known at a user's split time, the
bias baseline on them, and the collaborative neighbours / item-kNN built from the same history."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from persona_tune.data.loaders import RatingLog
from persona_tune.data.prepare import Protocol, prepare
from persona_tune.errors import ConfigError
from persona_tune.history import CollabIndex, History, bucket_cutoffs, history_rows, similarity
from persona_tune.prompts import PromptBuilder
from persona_tune.runfolder import RunFolder


def _log(rows: list[tuple[int, int, int, int]]) -> RatingLog:
    ratings = pd.DataFrame(rows, columns=["user_id", "item_id", "rating", "timestamp"]).astype("int64")
    items = pd.DataFrame({"item_id": sorted(ratings["item_id"].unique())})
    items["title"] = [f"Film {i}" for i in items["item_id"]]
    items["year"] = pd.array([2000] * len(items), dtype="Int64")
    items["genres"], items["summary"], items["cast"] = "Drama", "", ""
    return RatingLog(dataset="generic", ratings=ratings, items=items, inputs={})


# Users 1 and 2 are sampled (4 ratings each: 2 train, 2 test). User 1 splits at t=100, user 2 at t=300.
# User 9 (3 ratings: not eligible) rates item 60 with a 5 at t=200: after user 1's
# split time, before user 2's. That 5 must not reach user 1's average of item 60, and must reach user 2's.
HAND_LOG = [
    (1, 10, 4, 10), (1, 20, 2, 20), (1, 60, 3, 100), (1, 50, 3, 110),
    (2, 10, 5, 30), (2, 20, 3, 40), (2, 60, 1, 300), (2, 50, 2, 310),
    (9, 50, 1, 50), (9, 60, 5, 200), (9, 10, 3, 60),
]


@pytest.fixture
def hand_run(tmp_path) -> RunFolder:
    return prepare(_log(HAND_LOG), tmp_path / "run", Protocol(min_ratings=4, max_ratings=4, n_users=2))


def test_a_later_rating_never_counts(hand_run):
    hist = History.load(hand_run)
    assert hist.mode == "before_split" and hand_run.read_manifest()["protocol"]["history"] == "before_split"
    assert list(hist.cutoffs) == [100, 300] and hist.user_bucket == {1: 0, 2: 1}
    avg, count = hist.row_stats([1, 2, 1, 2], [60, 60, 10, 10])
    # Item 60 before t=100: nobody. Before t=300: user 9's 5 (user 1's 3 at t=100 is a test row).
    assert np.isnan(avg[0]) and count[0] == 0
    assert avg[1] == 5.0 and count[1] == 1
    # Item 10 before t=100: users 1, 2, 9 (4, 5, 3); the same before t=300.
    assert avg[2] == pytest.approx(4.0) and count[2] == 3 and avg[3] == pytest.approx(4.0)
    # history.parquet: every non-test rating of every user (user 9 included), never a test row.
    rows = hand_run.read_history()
    assert len(rows) == len(HAND_LOG) - 4 and set(rows["user_id"]) == {1, 2, 9}
    test = hand_run.read_ratings("test")
    assert rows.merge(test, on=["user_id", "item_id"]).empty


def test_prompt_numbers_and_texts_use_the_users_cutoff(hand_run):
    # The prompt states what user 1 could know: no average for item 60; user 2 sees 5.00.
    p1, p2 = PromptBuilder(hand_run, "ml", "compact", state_numbers=True).parts([1, 2], [60, 60])
    assert p1.item_avg is None and "no ratings yet" in p1.item
    assert p2.item_avg == 5.0 and "average 5.00" in p2.item
    paper = PromptBuilder(hand_run, "ml", "paper").parts([1, 2], [60, 60])
    assert "no historical ratings yet" in paper[0].item and "historical average rating of 5.00" in paper[1].item
    # items.parquet holds the averages before the latest cutoff (t=300).
    assert hand_run.read_items().set_index("item_id").at[60, "hist_avg"] == 5.0


def test_all_time_keeps_the_published_definition(tmp_path):
    run = prepare(_log(HAND_LOG), tmp_path / "run", Protocol(min_ratings=4, max_ratings=4, n_users=2,
                                                             history="all_time"))
    hist = History.load(run)
    avg, count = hist.row_stats([1, 2], [60, 60])
    assert list(avg) == [5.0, 5.0] and list(count) == [1, 1]  # all non-test ratings, whatever their time
    with pytest.raises(ConfigError, match="history must be one of"):
        Protocol(history="sometime").check()


def test_bias_uses_each_users_bucket(hand_run):
    hist = History.load(hand_run)
    train = hand_run.read_ratings("train")
    bias = hist.fit_bias(train, lambda_item=0.0, lambda_user=0.0)
    # Bucket 0 (before t=100): ratings 4, 2, 5, 3, 1, 3 -> mu = 3; bucket 1 adds user 9's 5 at t=200.
    assert bias.mu[0] == pytest.approx(3.0) and bias.mu[1] == pytest.approx(23 / 7)
    # With no regularisation b_i(10) = avg(10) - mu; user 1's b_u = mean of r - mu - b_i over train rows.
    pred = bias.predict([1], [10])[0]
    b_i10, b_i20 = 4.0 - 3.0, 2.5 - 3.0
    b_u1 = ((4 - 3 - b_i10) + (2 - 3 - b_i20)) / 2
    assert pred == pytest.approx(3.0 + b_u1 + b_i10)


def test_bucket_cutoffs_are_split_time_quantiles():
    times = np.arange(100, 132)  # 32 users
    cuts = bucket_cutoffs(times, 16)
    assert len(cuts) == 16 and cuts[0] == 100 and set(cuts) <= set(times)
    assert list(bucket_cutoffs(np.array([5, 5, 5]), 16)) == [5]


def _collab_log() -> list[tuple[int, int, int, int]]:
    """30 raters of items 1, 2, 3: items 1 and 2 go together (same rating), item 3 is noise. User 100
    (sampled) rated 2 and 3 (train) and 1 (test, the target); user 101 is sampled to give a split."""
    rng = np.random.default_rng(0)
    rows = []
    for u in range(30):
        a = int(rng.integers(1, 6))
        rows += [(u, 1, a, 10), (u, 2, a, 11), (u, 3, int(rng.integers(1, 6)), 12)]
    rows += [(100, 2, 5, 20), (100, 3, 1, 21), (100, 4, 3, 22), (100, 1, 5, 500), (100, 5, 2, 501)]
    rows += [(101, 2, 2, 20), (101, 3, 4, 21), (101, 4, 3, 22), (101, 1, 1, 500), (101, 5, 3, 501)]
    return rows


def test_neighbours_are_the_most_similar_own_train_items(tmp_path):
    run = prepare(_log(_collab_log()), tmp_path / "run", Protocol(min_ratings=5, max_ratings=5, n_users=2))
    index = CollabIndex.load(run)
    out = index.query([100, 101], [1, 1], k=2, k_knn=50)
    first = out.neighbours[0]
    assert first[0][0] == 2 and first[0][1] == 5  # item 2 first: perfectly co-rated with item 1
    assert all(n[0] != 1 for n in first)  # never the target itself
    assert all(n[0] in (2, 3, 4) for r in out.neighbours for n in r)  # own train items only, never a test row
    # The similarity: Pearson on baseline residuals, shrunk by (n - 1) / (n - 1 + 100).
    z, _ = index.history.residual_matrix(0)
    sim = similarity(z, index.history.item_index([1]), index.history.item_index([2, 3]))
    assert sim[0, 0] > 0.1 and abs(sim[0, 1]) < sim[0, 0]
    assert sim[0, 0] <= 29 / 129 + 1e-9  # at most the shrinkage factor of 30 common raters
    # kNN with baseline: user 100 rated the neighbour above expectation, user 101 below.
    knn = index.knn_predict([100, 101], [1, 1])
    assert knn[0] > out.bias[0] and knn[1] < out.bias[1]
    # A train row's own rating is taken out of its similarity: querying item 2 for user 100 never
    # returns item 2, and user 100's ratings do not count as a common rater of items 2 and 3.
    own = index.query([100], [2], k=3)
    assert all(n[0] != 2 for n in own.neighbours[0])


def test_history_rows_drop_test_rows_only():
    ratings = pd.DataFrame({"user_id": [1, 1, 2], "item_id": [1, 2, 1], "rating": [3, 4, 5], "timestamp": [3, 2, 1]})
    test = ratings.iloc[[1]]
    rows = history_rows(ratings, test)
    assert rows[["user_id", "item_id"]].values.tolist() == [[2, 1], [1, 1]]  # time order


def test_collab_memories_in_prompts(tmp_path):
    from persona_tune.prompts import load_prompt_rows, user_text
    from tests.fixtures_runs import make_distilled_run

    run = make_distilled_run(tmp_path, n_users=12, history="before_split")
    rows = load_prompt_rows(run, split="test", memory="ms", template="compact", collab_memories=3)
    index = CollabIndex.load(run)
    found = index.query(rows["user_id"], rows["item_id"], k=3)
    parts = list(rows["parts"])
    assert all(len(p.collab) <= 3 and p.collab_expected is not None for p in parts)
    assert sum(len(p.collab) > 0 for p in parts) > 10  # 12 users: a thin history, yet neighbours
    np.testing.assert_allclose([p.collab_expected for p in parts], found.bias)
    np.testing.assert_allclose([p.collab_residual for p in parts], found.knn_residual)
    first = next(p for p in parts if p.collab)
    text = user_text(first)
    assert "Similar movies you rated: " in text and f"COLLAB: expected {first.collab_expected:.2f}" in text and "(weight " in text
    train = load_prompt_rows(run, split="train", memory="ms", template="paper", collab_memories=2)
    titles = RunFolder(run).read_items().set_index("item_id")["title"]
    for row in train.head(50).itertuples():  # never the row's own item
        assert all(not title.startswith(titles[row.item_id] + " (") for title, _, _ in row.parts.collab)
    with pytest.raises(ConfigError, match="collab_memories"):
        load_prompt_rows(run, split="test", memory="ms", collab_memories=-1)


def test_collab_memories_for_an_agents_new_item(tmp_path):
    """UserAgent and simulate build prompts with PromptBuilder.parts and item texts; an item the run
    does not know (a negative id: a new item's text) gets no collaborative memories, the others do."""
    from tests.fixtures_runs import make_distilled_run

    run = RunFolder(make_distilled_run(tmp_path, n_users=12))
    builder = PromptBuilder(run, "ms", "compact", collab_memories=2)
    user = int(run.read_ratings("test")["user_id"].iloc[0])
    item = int(run.read_ratings("test")["item_id"].iloc[0])
    new, known = builder.parts([user, user], [-1, item], item_texts=["A film nobody rated", builder.text_of(user, item)])
    assert new.collab == () and new.collab_expected is None
    assert known.collab_expected is not None and len(known.collab) <= 2
