"""UserAgent: ratings for known and new items, per-persona adapters, the same numbers as the recipe core."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from persona_tune.agent import UserAgent
from persona_tune.errors import DataError
from persona_tune.evaluation.loading import adapter_path
from persona_tune.evaluation.predict import PROB_COLUMNS, predict_rows
from persona_tune.prompts import load_prompt_rows


@pytest.fixture(scope="module")
def agent(one_torch_thread, eval_run):
    run, _ = eval_run
    return UserAgent.from_run(run, variant="persona", family="tiny", overrides=["num_threads=1"])


def test_agent_matches_eval_prompts_and_scores(agent):
    run = agent.run.root
    rows = load_prompt_rows(run, split="test", memory=agent.memory, persona=1).head(6)
    user = int(rows["user_id"].iloc[0])
    rows = rows[rows["user_id"] == user]
    mine = agent.prompt_rows(rows["user_id"].tolist(), rows["item_id"].tolist())
    assert mine["parts"].tolist() == rows["parts"].tolist()  # same profile, memories, item text
    got = agent.rate(user, rows["item_id"].tolist())
    agent.loader.load(None)  # the base model; the reference below loads persona 1's adapter again
    agent.loader.load(adapter_path(agent.cfg.adapter_dir, 1), merge=True)
    ref = predict_rows(agent.predictor, rows.reset_index(drop=True), ["scoring"], agent.generation)
    np.testing.assert_allclose(got[PROB_COLUMNS].to_numpy(), ref[PROB_COLUMNS].to_numpy(), atol=1e-6)
    assert (got["persona"] == 1).all()
    np.testing.assert_allclose(got["rating"], got[PROB_COLUMNS].to_numpy() @ np.arange(1, 6), atol=1e-9)


def test_rate_many_groups_personas_and_keeps_order(agent):
    personas = agent.persona_of
    u0 = int(personas[personas == 0].index[0])
    u1 = int(personas[personas == 1].index[0])
    items = agent.item_text.index[:3].tolist()
    requests = pd.DataFrame({"user_id": [u1, u0, u1, u0], "item": [items[0], items[1], "A new film about a lighthouse keeper.", items[2]]})
    out = agent.rate_many(requests)
    assert out["user_id"].tolist() == requests["user_id"].tolist()
    assert out["persona"].tolist() == [1, 0, 1, 0]
    assert out["item_id"].iloc[2] < 0  # the new item, rated from its text
    assert out["rating"].between(1, 5).all()
    # The same user and item give the same rating whatever else is in the batch.
    single = agent.rate(u0, [items[1]])
    assert single["rating"].iloc[0] == pytest.approx(out["rating"].iloc[1], abs=1e-6)


def test_unknown_item_and_user_are_clear_errors(agent):
    with pytest.raises(DataError, match="not in items.parquet"):
        agent.rate(int(agent.persona_of.index[0]), [10**9])
    with pytest.raises(DataError, match="no profile|no persona"):
        agent.rate(10**9, [int(agent.item_text.index[0])])


def test_public_methods_check_their_arguments(agent):
    """Issue 26: each wrong argument is a TypeError or ValueError that says what is wrong, before any work."""
    user = int(agent.persona_of.index[0])
    item = int(agent.item_text.index[0])
    title = agent.run.read_items(columns=["item_id", "title"]).set_index("item_id")["title"][item]
    cases = [
        (lambda: agent.rate(user, []), ValueError, "items is empty"),
        (lambda: agent.rate(user, None), TypeError, "items must be a list of item ids"),
        (lambda: agent.rate(user, item), TypeError, "wrap one item in a list"),
        (lambda: agent.rate(user, "A film"), TypeError, "wrap one item in a list"),
        (lambda: agent.rate(None, [item]), TypeError, "user_id must be an integer user id, got None"),
        (lambda: agent.rate(2.5, [item]), TypeError, "user_id must be an integer user id, got 2.5"),
        (lambda: agent.rate("7", [item]), TypeError, "user_id must be an integer user id, got '7'"),
        (lambda: agent.rate(user, [item, None]), TypeError, r"items\[1\] must be an item id"),
        (lambda: agent.rate(user, [1.5]), TypeError, r"items\[0\] must be an item id \(int\)"),
        (lambda: agent.rate(user, [str(item)]), ValueError, rf"pass an item id as an integer \({item}\)"),
        (lambda: agent.rate(user, ["  "]), ValueError, "empty text"),
        (lambda: agent.rate(user, [title]), ValueError, f"is the title of item {item}: pass its id"),
        (lambda: agent.rate_many([(user, item)]), TypeError, "requests must be a pandas DataFrame"),
        (lambda: agent.rate_many(pd.DataFrame({"user": [user], "item": [item]})), ValueError, "lack the column"),
        (lambda: agent.rate_many(pd.DataFrame({"user_id": [], "item": []})), ValueError, "requests is empty"),
        (lambda: agent.rate_slate(user, []), ValueError, "items is empty"),
        (lambda: agent.rate_slate_many(pd.DataFrame({"user_id": [user]})), ValueError, "item_id"),
        (lambda: agent.prompt_rows([user, user], [item]), ValueError, "same length"),
        (lambda: agent.persona(None), TypeError, "user_id must be an integer"),
        (lambda: UserAgent.from_run(None), TypeError, "run_dir must be a run folder path"),
    ]
    for call, error, message in cases:
        with pytest.raises(error, match=message):
            call()
    assert agent.rate(np.int64(user), [np.int64(item), float(item)])["item_id"].tolist() == [item, item]
