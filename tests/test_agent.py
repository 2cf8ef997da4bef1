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
