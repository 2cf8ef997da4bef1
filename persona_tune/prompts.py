"""Render rating rows into chat messages: the paper's prompt (its Appendix C) or a compact one.

paper template (the default):
  system    = role-play preamble + trait descriptions + M_s (the profile)
  user      = memory preamble + retrieved M_l memories + the task + the item text
  assistant = the rating, one digit
compact template: the same facts (trait levels, the profile, the memories, the item's title, year,
  genres and historical average) without the boilerplate, in about half the tokens.
state_numbers (either template): a line just before the answer states the item's historical average
  and the user's offset from it (mean of rating - hist_avg over the user's train rows).
collab_memories k (either template; 0 = off): the collaborative memories: the user's own train ratings
  of the k items most similar to the target by collaborative similarity (persona_tune.history.CollabIndex),
  each with the user's residual (rating - the bias baseline's expectation), and a line just before the
  answer with the bias baseline's expectation and the item-kNN residual of the neighbours, e.g.
  "Similar movies you rated: Fargo (1996) 5 (+0.9); ..." and "COLLAB: expected 3.62; similar movies +0.35
  (weight 1.20)." (the weight: the sum of the neighbours' similarities, the evidence behind the residual).
Every item average (in item texts, memories' item texts and the stated numbers) is the one known at
the cutoff of the row's user under the run's history mode (persona_tune/history.py).

Length policy (fit_to_length; FitToLength applies it with a model's tokenizer for training,
evaluation and the frozen-trunk cache alike): boilerplate goes before facts. A prompt over the budget first loses
the preambles and the long task wording, then memories (last first), then collaborative memories
(last first), then the end of the profile,
and the trait levels last; the task, the item and the stated numbers are never cut.

Training datasets, the eval recipe and ``UserAgent`` all build prompts here, so training and test
prompts are the same text.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd
from torchtune.data import Message
from torchtune.modules.transforms import Transform
from torchtune.modules.transforms.tokenizers import ModelTokenizer

from persona_tune.errors import ConfigError
from persona_tune.history import CollabIndex, History
from persona_tune.names import PROFILE_MEMORIES, RETRIEVED_MEMORIES, check_memory_mode
from persona_tune.runfolder import ASSIGNMENTS, RunFolder

TEMPLATES = ("paper", "compact")
RATINGS = ("1", "2", "3", "4", "5")

ROLE_PLAY = (
    "PERSONA: You excel at role-playing. Picture yourself as a user exploring a movie "
    "recommendation system."
)
TRAITS_INTRO = "You have the following social traits: "
PROFILE_INTRO = "Your profile, in your own words: "
MEMORY_INTRO = (
    "Given your persona and memory of some of movies you watched in the past, think carefully and "
    "rate the movie given in the end. Always use your memory at your own discretion as not "
    "everything is helpful. Also, historical average ratings of the movie mean an average rating of "
    "how other people have rated it, not you."
)
TASK = (
    "TASK: Rate the movie given below on a likert scale from 1 to 5, where 1 means you hated it, "
    "2 means you disliked it, 3 means you are neutral about it, 4 means you liked it and 5 means you "
    "absolutely loved it. Always respond with either one of 1, 2, 3, 4 or 5. Do not output anything else."
)

# The short wordings: the compact template, and the paper's once the length policy cut its boilerplate.
TERSE_ROLE = "You are this movie viewer."
TERSE_TASK = "TASK: Rate the movie below from 1 (hated) to 5 (loved). Answer with one digit."


@dataclass(frozen=True)
class PromptParts:
    """The variable pieces of one prompt. Empty strings / tuples / None mean "not used"."""

    item: str
    profile: str = ""
    traits: str = ""  # the paper's trait descriptions
    memories: tuple[tuple[str, str], ...] = ()  # (memory item text, M_l explanation)
    template: str = "paper"  # paper | compact
    trait_levels: str = ""  # "activity low, conformity high, diversity medium" (compact, or a cut paper prompt)
    item_avg: float | None = None  # stated before the answer when not None (state_numbers)
    user_offset: float | None = None
    terse: bool = False  # the length policy dropped the paper template's boilerplate
    collab: tuple[tuple[str, int, float], ...] = ()  # (title, the user's rating, residual) of similar rated items
    collab_expected: float | None = None  # the bias baseline's expectation (collab_memories)
    collab_residual: float | None = None  # the item-kNN residual of the neighbours (0 without any)
    collab_weight: float | None = None  # the sum of those neighbours' similarities (the evidence behind it)


def check_collab_memories(k) -> int:
    """collab_memories: how many collaborative memories a prompt shows (0 = off)."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0:
        raise ConfigError(f"collab_memories must be an integer >= 0 (0 = off), got {k!r}")
    return int(k)


def check_template(template: str) -> str:
    if template not in TEMPLATES:
        raise ConfigError(f"prompt_template must be one of {', '.join(TEMPLATES)}, got {template!r}")
    return template


def _short(parts: PromptParts) -> bool:
    return parts.template == "compact" or parts.terse


def system_text(parts: PromptParts) -> str:
    if _short(parts):
        text = TERSE_ROLE
        traits = parts.trait_levels or parts.traits
        if traits:
            text += f" Traits: {traits}."
        if parts.profile:
            text += f" Profile: {parts.profile}"
        return text
    text = ROLE_PLAY
    if parts.traits:
        text += " " + TRAITS_INTRO + parts.traits
    if parts.profile:
        text += " " + PROFILE_INTRO + parts.profile
    return text


def numbers_line(parts: PromptParts) -> str | None:
    """The stated numbers: the item's historical average and the user's offset from such averages."""
    facts = []
    if parts.item_avg is not None:
        facts.append(f"crowd average {parts.item_avg:.2f}")
    if parts.user_offset is not None:
        facts.append(f"you usually rate {parts.user_offset:+.2f} vs the crowd")
    return ("NUMBERS: " + "; ".join(facts) + ".") if facts else None


def collab_lines(parts: PromptParts) -> tuple[str | None, str | None]:
    """The collaborative memories (one line) and their numbers (one line, before the answer)."""
    similar = None
    if parts.collab:
        similar = "Similar movies you rated: " + "; ".join(
            f"{title} {rating} ({residual:+.1f})" for title, rating, residual in parts.collab) + "."
    numbers = None
    if parts.collab_expected is not None:
        numbers = (f"COLLAB: expected {parts.collab_expected:.2f}; similar movies "
                   f"{(parts.collab_residual or 0.0):+.2f} (weight {(parts.collab_weight or 0.0):.2f}).")
    return similar, numbers


def user_text(parts: PromptParts) -> str:
    lines = []
    numbers = numbers_line(parts)
    similar, collab_numbers = collab_lines(parts)
    if parts.template == "compact":
        if parts.memories:
            lines.append("Memories:")
            lines += [f"- {item_text}: {explanation}" for item_text, explanation in parts.memories]
        if similar:
            lines.append(similar)
        lines.append(f"Movie: {parts.item}")
        lines += [line for line in (numbers, collab_numbers) if line]
        lines.append("Rating (1-5):")
        return "\n".join(lines)
    if parts.memories:
        lines += ([] if parts.terse else [MEMORY_INTRO, ""]) + ["YOUR MEMORIES"]
        for item_text, explanation in parts.memories:
            lines += [f"- MOVIE: {item_text}", f"  MY MEMORY: {explanation}"]
        lines.append("")
    if similar:
        lines += [similar, ""]
    lines += [TERSE_TASK if parts.terse else TASK, f"MOVIE: {parts.item}"]
    lines += [line for line in (numbers, collab_numbers) if line]
    lines.append("RATING:")
    return "\n".join(lines)


def render_messages(parts: PromptParts, rating: int | None = None) -> list[Message]:
    """System + user messages, plus the assistant's rating when ``rating`` is given.

    The user and system turns are masked for training (train_on_input=False masks them in torchtune).
    """
    messages = [
        Message(role="system", content=system_text(parts), masked=True),
        Message(role="user", content=user_text(parts), masked=True),
    ]
    if rating is not None:
        messages.append(Message(role="assistant", content=str(int(rating)), masked=False))
    return messages


def fit_to_length(
    parts: PromptParts, count_tokens: Callable[[PromptParts], int], max_tokens: int | None
) -> PromptParts:
    """Shrink a prompt to ``max_tokens``, boilerplate before facts: the paper template's preambles and
    long task wording (and trait descriptions, which become trait levels), then memories (last
    first), then collaborative memories (last first), then the end of the profile, then the trait
    levels (keeping as much profile as then fits).

    The task, the item text, the stated numbers and the answer are never cut. Raises ConfigError if
    even the bare task and item exceed ``max_tokens``.
    """
    if max_tokens is None or count_tokens(parts) <= max_tokens:
        return parts
    if not _short(parts):
        parts = replace(parts, terse=True)
        if count_tokens(parts) <= max_tokens:
            return parts
    for name in ("memories", "collab"):  # last first
        kept = list(getattr(parts, name))
        while kept:
            kept.pop()
            parts = replace(parts, **{name: tuple(kept)})
            if count_tokens(parts) <= max_tokens:
                return parts
    words = parts.profile.split()

    def longest_profile(parts: PromptParts) -> PromptParts:
        lo, hi = 0, len(words)  # binary search on how many profile words survive
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if count_tokens(replace(parts, profile=" ".join(words[:mid]))) <= max_tokens:
                lo = mid
            else:
                hi = mid - 1
        return replace(parts, profile=" ".join(words[:lo]))

    parts = longest_profile(parts)
    if count_tokens(parts) > max_tokens and (parts.traits or parts.trait_levels):
        parts = longest_profile(replace(parts, traits="", trait_levels=""))  # without traits, more profile fits
    if count_tokens(parts) > max_tokens:
        raise ConfigError(
            f"the task and item text alone need {count_tokens(parts)} tokens, more than max_seq_len={max_tokens}"
        )
    return parts


def persona_messages(parts: PromptParts, rating: int, train_on_input: bool = False) -> list[Message]:
    """The row's messages; with ``train_on_input`` the system and user turns are trained on too."""
    messages = render_messages(parts, rating)
    if train_on_input:
        messages = [Message(role=m.role, content=m.content, masked=False) for m in messages]
    return messages


class FitToLength(Transform):
    """Model transform: tokenize with ``tokenizer``; a prompt over ``max_seq_len`` is shrunk first.

    Tokenizes once with a non-truncating copy of the tokenizer; only prompts that do not fit are
    re-rendered (prompts.fit_to_length) and tokenized again.
    """

    def __init__(self, tokenizer: ModelTokenizer, max_seq_len: int | None, train_on_input: bool = False):
        self.tokenizer = tokenizer
        self.max_seq_len = max_seq_len
        self.train_on_input = train_on_input
        self._untruncated = copy.copy(tokenizer)
        self._untruncated.max_seq_len = None

    def _tokenize(self, parts: PromptParts, rating: int) -> dict[str, Any]:
        return self._untruncated({"messages": persona_messages(parts, rating, self.train_on_input)})

    def __call__(self, sample: Mapping[str, Any]) -> dict[str, Any]:
        parts, rating = sample["parts"], sample["rating"]
        out = self._untruncated({"messages": sample["messages"]})
        if self.max_seq_len is not None and len(out["tokens"]) > self.max_seq_len:
            parts = fit_to_length(parts, lambda p: len(self._tokenize(p, rating)["tokens"]), self.max_seq_len)
            out = self._tokenize(parts, rating)
        return {"tokens": out["tokens"], "mask": out["mask"]}


def subsample_per_user(rows: pd.DataFrame, target: int, seed: int = 0) -> pd.DataFrame:
    """Keep about ``target`` rows, the same fraction of every user's rows (largest remainder), seeded."""
    if target >= len(rows):
        return rows
    counts = rows.groupby("user_id").size()
    quota = counts * (target / len(rows))
    keep = np.floor(quota).astype(int)
    remainder = (quota - keep).sort_values(ascending=False, kind="stable")
    keep[remainder.index[: target - int(keep.sum())]] += 1
    rng = np.random.default_rng(seed)
    parts = []
    for user_id, group in rows.groupby("user_id", sort=True):
        n = int(keep[user_id])
        if n:
            parts.append(group.iloc[np.sort(rng.choice(len(group), size=n, replace=False))])
    return pd.concat(parts, ignore_index=True)


class PromptBuilder:
    """The one place the pieces of a prompt are put together from a run's tables: item texts (compact
    ones for the compact template), the user's profile, traits and trait levels (memory ms or ms+ml),
    and the stated numbers. :func:`load_prompt_rows` (training and eval) and ``UserAgent`` use it, so
    their prompts are the same."""

    def __init__(self, run: RunFolder, memory: str, template: str = "paper", state_numbers: bool = False,
                 collab_memories: int = 0):
        self.memory, self.template = check_memory_mode(memory), check_template(template)
        self.collab_memories = check_collab_memories(collab_memories)
        # Dicts of Python strings: every row that shows the same profile, traits, item or memory holds a
        # reference to one string object, so 490k rows stay small (a pandas .map copies each string).
        self._items = run.read_items()
        self._noun = ((run.read_manifest().get("stages", {}).get("prepare") or {}).get("params") or {}).get(
            "item_noun", "movie")
        self.history = History.load(run)
        self.item_text = self._texts(self._items)  # items.parquet's averages (all_time: every row's)
        self._bucket_texts: dict[int, dict] = {}
        self.profile, self.traits, self.levels = {}, {}, {}
        if memory in PROFILE_MEMORIES:
            table = run.read_profiles()
            self.profile, self.traits = _as_dict(table, "user_id", "profile"), _as_dict(table, "user_id", "traits_text")
            if {"activity", "conformity", "diversity"} <= set(table.columns):
                self.levels = dict(zip(table["user_id"].tolist(), (
                    f"activity {a}, conformity {c}, diversity {d}"
                    for a, c, d in zip(table["activity"], table["conformity"], table["diversity"]))))
        self.offsets = None
        if state_numbers:
            self.offsets = user_offsets(run.read_ratings("train", columns=["user_id", "item_id", "rating"]), self.history)
        self.collab = None
        if self.collab_memories:
            from persona_tune.distill.offline import display_title

            self.collab = CollabIndex(self.history, run.read_ratings("train", columns=["user_id", "item_id", "rating"]))
            self.title = dict(zip(self._items["item_id"].tolist(),
                                  (display_title(t, y) for t, y in zip(self._items["title"], self._items["year"]))))

    def _texts(self, items: pd.DataFrame) -> dict:
        if self.template == "compact":
            return _as_dict(items.assign(text=compact_item_texts(items)), "item_id", "text")
        return _as_dict(items, "item_id", "text")

    def text_of(self, user_id: int, item_id: int) -> str:
        """The item's text as ``user_id`` sees it: with the item average known at the user's cutoff."""
        if self.history.mode == "all_time":
            return self.item_text[item_id]
        bucket = self.history.user_bucket.get(int(user_id), self.history.n_buckets - 1)
        if bucket not in self._bucket_texts:
            from persona_tune.data.metadata import render_items

            self._bucket_texts[bucket] = self._texts(render_items(self._items, self.history.bucket_stats(bucket),
                                                                  self._noun))
        return self._bucket_texts[bucket][item_id]

    def parts(self, user_ids: Sequence[int], item_ids: Sequence[int], item_texts: Sequence[str] | None = None,
              memories: Sequence[tuple] | None = None) -> list[PromptParts]:
        """The PromptParts of each (user, item); ``item_texts`` for items the run does not have (else the
        run's text of each item), ``memories`` the retrieved (item text, M_l) pairs of each row."""
        n = len(user_ids)
        item_texts = [self.text_of(u, i) for u, i in zip(user_ids, item_ids)] if item_texts is None else item_texts
        memories = [()] * n if memories is None else memories
        profile = traits = levels = [""] * n
        if self.memory in PROFILE_MEMORIES:
            profile = [self.profile.get(u) or "" for u in user_ids]
            traits = [self.traits.get(u) or "" for u in user_ids]
            levels = [self.levels.get(u, "") for u in user_ids]
        item_avg = user_offset = [None] * n
        if self.offsets is not None:
            avg, _ = self.history.row_stats(list(user_ids), list(item_ids))
            item_avg = [None if np.isnan(a) else float(a) for a in avg]
            user_offset = [self.offsets.get(u, 0.0) for u in user_ids]
        similar, expected, residual, weight = [()] * n, [None] * n, [None] * n, [None] * n
        if self.collab is not None:
            # Rows of items the run does not know (negative ids: a new item's text) get none.
            known = [k for k, i in enumerate(item_ids) if i >= 0]
            found = self.collab.query([user_ids[k] for k in known], [item_ids[k] for k in known],
                                      k=self.collab_memories)
            for j, k in enumerate(known):
                similar[k] = tuple((self.title[i], r, res) for i, r, res, _ in found.neighbours[j])
                expected[k], residual[k] = float(found.bias[j]), float(found.knn_residual[j])
                weight[k] = float(found.knn_weight[j])
        return [
            PromptParts(item=i, profile=p, traits=t, memories=m, template=self.template, trait_levels=lv,
                        item_avg=a, user_offset=o, collab=c, collab_expected=e, collab_residual=r, collab_weight=w)
            for i, p, t, m, lv, a, o, c, e, r, w in zip(item_texts, profile, traits, memories, levels, item_avg,
                                                        user_offset, similar, expected, residual, weight)
        ]


def load_prompt_rows(
    run_dir: str | Path,
    split: str = "train",
    memory: str = "ms+ml",
    persona: int | None = None,
    subsample: int | None = None,
    seed: int = 0,
    users: Sequence[int] | None = None,
    template: str = "paper",
    state_numbers: bool = False,
    collab_memories: int = 0,
) -> pd.DataFrame:
    """Join a run folder's tables into one row per rating with its prompt parts.

    Returns columns user_id, item_id, rating, timestamp, persona (-1 if personas were not computed),
    and ``parts`` (a PromptParts). Rows keep the order of the ratings file (user, then time).
    ``template``, ``state_numbers`` and ``collab_memories``: see the module docstring.
    """
    check_memory_mode(memory)
    check_template(template)
    if split not in ("train", "test"):
        raise ConfigError(f"split must be 'train' or 'test', got {split!r}")
    run = RunFolder(run_dir)
    rows = run.read_ratings(split)
    if users is not None:
        rows = rows[rows["user_id"].isin(list(users))]

    if run.path(ASSIGNMENTS).exists():
        assignments = run.read_assignments()
        rows = rows.merge(assignments, on="user_id", how="left")
        rows["persona"] = rows["persona"].fillna(-1).astype("int64")
    else:
        if persona is not None:
            run.require(ASSIGNMENTS)
        rows["persona"] = -1
    if persona is not None:
        rows = rows[rows["persona"] == int(persona)]
        if rows.empty:
            raise ConfigError(f"persona {persona} has no users with {split} rows in {run.root}")
    rows = rows.reset_index(drop=True)
    if subsample is not None:
        rows = subsample_per_user(rows, int(subsample), seed)

    prompts = PromptBuilder(run, memory, template, state_numbers, collab_memories)
    user_ids, item_ids = rows["user_id"].tolist(), rows["item_id"].tolist()
    memories = None
    if memory in RETRIEVED_MEMORIES:
        by_row = _retrieved_memories(run, split, prompts.text_of)
        memories = [by_row.get(key, ()) for key in zip(user_ids, item_ids)]
    rows["parts"] = pd.Series(prompts.parts(user_ids, item_ids, memories=memories), index=rows.index, dtype=object)
    return rows


def compact_item_texts(items: pd.DataFrame) -> list[str]:
    """'Title (1995); Comedy|Drama; average 3.87', plus the summary and cast when the run has them."""
    from persona_tune.distill.offline import display_title

    texts = []
    for row in items.itertuples(index=False):
        text = display_title(row.title, row.year)
        if getattr(row, "genres", None):
            text += f"; {row.genres}"
        hist = getattr(row, "hist_avg", None)
        text += "; no ratings yet" if hist is None or pd.isna(hist) else f"; average {hist:.2f}"
        for extra in ("summary", "cast"):
            value = getattr(row, extra, None)
            if isinstance(value, str) and value:
                text += f"; {value}"
        texts.append(text)
    return texts


def user_offsets(train: pd.DataFrame, history: History) -> dict[int, float]:
    """Each user's mean of (rating - the item's historical average at the user's cutoff) over their train rows."""
    avg, _ = history.row_stats(train["user_id"].to_numpy(), train["item_id"].to_numpy())
    deviation = train["rating"].to_numpy(dtype=float) - avg
    frame = pd.DataFrame({"user_id": train["user_id"].to_numpy(), "d": deviation}).dropna()
    return {int(u): float(v) for u, v in frame.groupby("user_id")["d"].mean().items()}


def _as_dict(table: pd.DataFrame, key: str, value: str) -> dict:
    return dict(zip(table[key].tolist(), table[value].tolist()))


def _retrieved_memories(run: RunFolder, split: str, text_of: Callable[[int, int], str]
                        ) -> dict[tuple[int, int], tuple]:
    """(user_id, item_id) -> ((memory item text, M_l explanation), ...) in rank order."""
    retrieved = run.read_retrieved()
    retrieved = retrieved[retrieved["split"] == split].sort_values(["user_id", "item_id", "rank"])
    table = run.read_memories(columns=["user_id", "item_id", "explanation"])
    explanations = dict(zip(zip(table["user_id"].tolist(), table["item_id"].tolist()), table["explanation"].tolist()))
    by_row: dict[tuple[int, int], tuple[tuple[str, str], ...]] = {}
    # Plain lists: a pandas groupby costs ~0.4 ms per row here (hours at 490k rows).
    users, rows_items = retrieved["user_id"].tolist(), retrieved["item_id"].tolist()
    for u, i, m in zip(users, rows_items, retrieved["memory_item_id"].tolist()):
        explanation = explanations.get((u, m))
        if explanation is not None:
            by_row[(u, i)] = by_row.get((u, i), ()) + ((text_of(u, m), explanation),)
    return by_row
