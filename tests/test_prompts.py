"""Prompt rendering, the length policy and per-user subsampling (persona_tune.prompts)."""

from __future__ import annotations

from dataclasses import replace

import pandas as pd
import pytest

from persona_tune.errors import ConfigError, StageMissingError
from persona_tune.prompts import (
    MEMORY_INTRO,
    PROFILE_INTRO,
    ROLE_PLAY,
    TASK,
    TERSE_TASK,
    PromptParts,
    check_template,
    collab_lines,
    fit_to_length,
    numbers_line,
    load_prompt_rows,
    render_messages,
    subsample_per_user,
    system_text,
    user_text,
)
from persona_tune.runfolder import RunFolder
from tests.fixtures_runs import make_embedded_run

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


def test_fit_to_length_cuts_boilerplate_before_facts():
    parts = replace(PARTS, trait_levels="activity high, conformity low, diversity medium", item_avg=3.9, user_offset=-0.4)
    full = words(parts)
    assert fit_to_length(parts, words, None) is parts and fit_to_length(parts, words, full) is parts
    # First the boilerplate goes: preambles, the long task wording, the trait descriptions (levels stay).
    terse = fit_to_length(parts, words, full - 1)
    assert terse.terse and terse.memories == parts.memories and terse.profile == parts.profile
    system, user = (m.text_content for m in render_messages(terse))
    assert ROLE_PLAY not in system and parts.trait_levels in system and parts.traits not in system
    assert MEMORY_INTRO not in user and TERSE_TASK in user and "crowd average 3.90" in user
    # Then memories (last first), then the end of the profile; the numbers and the item always stay.
    one = fit_to_length(parts, words, words(terse) - 1)
    assert one.memories == parts.memories[:1] and one.profile == parts.profile
    no_memory = words(replace(terse, memories=()))
    cut = fit_to_length(parts, words, no_memory - 5)
    assert cut.memories == () and cut.trait_levels == parts.trait_levels
    assert cut.profile == " ".join(parts.profile.split()[:-5]) and words(cut) == no_memory - 5
    assert numbers_line(cut) == numbers_line(parts) and cut.item == parts.item
    # Not even an empty profile fits beside the trait levels: they go and the profile grows back.
    bare = words(PromptParts(item=parts.item, item_avg=3.9, user_offset=-0.4, terse=True))
    no_traits = fit_to_length(parts, words, bare + 4)
    assert no_traits.trait_levels == "" and no_traits.traits == "" and no_traits.profile
    assert words(no_traits) <= bare + 4
    with pytest.raises(ConfigError, match="task and item text alone"):
        fit_to_length(parts, words, bare - 1)


def test_fit_to_length_cuts_collaborative_memories_after_text_memories_and_keeps_their_numbers():
    parts = replace(PARTS, terse=True, collab=(("Heat", 5, 0.6), ("Ronin", 4, -0.1)),
                    collab_expected=3.6, collab_residual=0.35, collab_weight=1.2)
    no_memory = words(replace(parts, memories=()))
    kept = fit_to_length(parts, words, no_memory)
    assert kept.memories == () and kept.collab == parts.collab
    one = fit_to_length(parts, words, no_memory - 1)
    assert one.memories == () and one.collab == parts.collab[:1] and one.profile == parts.profile
    assert collab_lines(one)[1] == collab_lines(parts)[1]  # the COLLAB numbers are never cut


def test_compact_template_keeps_every_fact_in_fewer_words():
    paper = replace(PARTS, trait_levels="activity high, conformity low, diversity medium")
    compact = replace(paper, template="compact", item_avg=3.9, user_offset=-0.4)
    system, user = (m.text_content for m in render_messages(compact))
    assert compact.profile in system and compact.trait_levels in system
    assert all(item in user and explanation in user for item, explanation in compact.memories)
    assert compact.item in user and user.endswith("NUMBERS: crowd average 3.90; you usually rate -0.40 vs the crowd.\n"
                                                  "Rating (1-5):")
    assert words(compact) < words(paper)
    assert numbers_line(PARTS) is None and "NUMBERS" not in user_text(PARTS)
    with pytest.raises(ConfigError, match="prompt_template"):
        check_template("short")


def test_load_prompt_rows_compact_with_numbers(tmp_path):
    run = make_embedded_run(tmp_path, n_users=4, k=1, delta=0.0)
    rows = load_prompt_rows(run, split="test", template="compact", state_numbers=True)
    r = RunFolder(run)
    items = r.read_table("items.parquet").set_index("item_id")
    train = r.read_table("ratings_train.parquet")
    offset = (train["rating"] - train["item_id"].map(items["hist_avg"])).groupby(train["user_id"]).mean()
    for row in rows.itertuples():
        assert row.parts.template == "compact" and row.parts.trait_levels.startswith("activity ")
        hist = items.at[row.item_id, "hist_avg"]
        assert row.parts.user_offset == pytest.approx(offset[row.user_id])
        assert row.parts.item.startswith(str(items.at[row.item_id, "title"]).split(" (")[0])
        if pd.isna(hist):  # an item nobody rated outside the test rows: nothing to state
            assert row.parts.item_avg is None and "no ratings yet" in row.parts.item
        else:
            assert row.parts.item_avg == pytest.approx(hist) and f"average {hist:.2f}" in row.parts.item
    plain = load_prompt_rows(run, split="test")
    assert all(p.item_avg is None and p.user_offset is None and p.template == "paper" for p in plain.parts)


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
