"""Prompt rendering, the length policy and per-user subsampling (persona_tune.prompts)."""

from __future__ import annotations

import pandas as pd
import pytest

from persona_tune.errors import ConfigError, StageMissingError
from persona_tune.prompts import (
    MEMORY_INTRO,
    PROFILE_INTRO,
    ROLE_PLAY,
    TASK,
    PromptParts,
    fit_to_length,
    load_prompt_rows,
    render_messages,
    subsample_per_user,
    system_text,
    user_text,
)
from persona_tune.runfolder import RunFolder
from tests.test_memory_retrieval import make_embedded_run

PARTS = PromptParts(
    item="Fargo (1996), Crime|Drama|Thriller.",
    profile="I love dark comedies with odd characters and snowy crime stories from the nineties.",
    traits="Your activity trait is described as: An Avid Movie Enthusiast.",
    memories=(("Heat (1995), Action.", "I rated Heat as 4 because of the tension."),
              ("Casino (1995), Crime.", "I rated Casino as 3 because it was too long.")),
)


def words(parts: PromptParts) -> int:
    """A stand-in tokenizer: one token per whitespace-separated word of the rendered prompt."""
    return sum(len(m.text_content.split()) for m in render_messages(parts, 4))


def test_render_messages_layout():
    system, user, answer = render_messages(PARTS, 4)
    assert (system.role, user.role, answer.role) == ("system", "user", "assistant")
    assert system.masked and user.masked and not answer.masked and answer.text_content == "4"
    assert system.text_content == system_text(PARTS) and system.text_content.startswith(ROLE_PLAY)
    assert system.text_content.index(PARTS.traits) < system.text_content.index(PROFILE_INTRO + PARTS.profile)
    assert user.text_content == user_text(PARTS)
    assert user.text_content.index(MEMORY_INTRO) < user.text_content.index(PARTS.memories[1][1]) < user.text_content.index(TASK)
    assert user.text_content.endswith(f"MOVIE: {PARTS.item}\nRATING:")
    assert len(render_messages(PARTS)) == 2
    bare = user_text(PromptParts(item="X"))
    assert MEMORY_INTRO not in bare and bare.startswith(TASK)


def test_fit_to_length_order_of_cuts():
    full = words(PARTS)
    assert fit_to_length(PARTS, words, None) is PARTS and fit_to_length(PARTS, words, full) is PARTS
    one = fit_to_length(PARTS, words, full - 1)
    assert one.memories == PARTS.memories[:1] and one.profile == PARTS.profile
    no_memory = words(PromptParts(item=PARTS.item, profile=PARTS.profile, traits=PARTS.traits))
    assert fit_to_length(PARTS, words, no_memory).profile == PARTS.profile
    cut = fit_to_length(PARTS, words, no_memory - 5)
    assert cut.memories == () and cut.traits == PARTS.traits
    assert cut.profile == " ".join(PARTS.profile.split()[:-5]) and words(cut) == no_memory - 5
    # Not even an empty profile fits beside the traits: the traits go and the profile grows back.
    bare = words(PromptParts(item=PARTS.item))
    no_traits = fit_to_length(PARTS, words, bare + 8)
    assert no_traits.traits == "" and no_traits.profile and words(no_traits) <= bare + 8
    assert no_traits.item == PARTS.item
    with pytest.raises(ConfigError, match="task and item text alone"):
        fit_to_length(PARTS, words, bare - 1)


def test_subsample_per_user_keeps_each_users_share():
    rows = pd.DataFrame({"user_id": [1] * 60 + [2] * 30 + [3] * 10, "item_id": range(100)})
    sub = subsample_per_user(rows, 50, seed=0)
    assert len(sub) == 50 and sub.groupby("user_id").size().to_dict() == {1: 30, 2: 15, 3: 5}
    assert sub.item_id.is_unique and set(sub.item_id) <= set(rows.item_id)
    pd.testing.assert_frame_equal(sub, subsample_per_user(rows, 50, seed=0))
    assert not sub.equals(subsample_per_user(rows, 50, seed=1))
    assert subsample_per_user(rows, 500) is rows


def test_load_prompt_rows_joins_the_run(tmp_path):
    run = make_embedded_run(tmp_path, n_users=5, k=1, delta=0.0)
    rows = load_prompt_rows(run, split="test")
    r = RunFolder(run)
    test = r.read_table("ratings_test.parquet")
    assert rows[["user_id", "item_id", "rating"]].equals(test[["user_id", "item_id", "rating"]])
    assert (rows.persona == -1).all()
    items = r.read_table("items.parquet").set_index("item_id")["text"]
    profiles = r.read_table("distill/profiles.parquet").set_index("user_id")
    retrieved = r.read_table("memory/retrieved.parquet").query("split == 'test'").set_index(["user_id", "item_id"])
    explanations = r.read_table("distill/memories.parquet").set_index(["user_id", "item_id"])["explanation"]
    for row in rows.itertuples():
        assert row.parts.item == items[row.item_id] and row.parts.profile == profiles.profile[row.user_id]
        mem_item = retrieved.loc[(row.user_id, row.item_id), "memory_item_id"]
        assert row.parts.memories == ((items[mem_item], explanations[(row.user_id, mem_item)]),)
    ml_only = load_prompt_rows(run, split="test", memory="ml")
    assert all(p.profile == "" and p.traits == "" and p.memories for p in ml_only.parts)
    with pytest.raises(StageMissingError, match="persona-tune personas"):
        load_prompt_rows(run, persona=0)
    with pytest.raises(ConfigError, match="split"):
        load_prompt_rows(run, split="valid")
