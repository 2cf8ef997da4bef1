"""UserAgent: query a trained run's user agents, as a recommender simulation does.

    from persona_tune.agent import UserAgent

    agent = UserAgent.from_run("runs/demo", variant="persona")        # or "single_max", "prompted", ...
    agent.rate(42, [1193, 661, "A heist film set in 1970s Lyon, starring ..."])
    agent.rate_many(pd.DataFrame({"user_id": [42, 7], "item": [1193, 2355]}))
    agent.rate_slate(42, [1193, 661, 2355])    # a recommender's slate: rank, expected_rating, p_like, p1..p5

An agent holds the base model once and each persona's adapter (swapped in per persona), the
users' profiles (M_s, traits) and the memory index (M_l vectors). ``rate`` builds the same prompt
training used (persona_tune.prompts): profile and traits, the user's top-k train memories
retrieved for the item (cosine >= delta, the run's embed settings), the item's text, and predicts
with the shared core (persona_tune.evaluation.predict): in scoring mode the probability-weighted
rating plus p1..p5, in paper mode a generated answer parsed to a rating (NaN when there is none).
An item is an item_id of items.parquet or, for an item the run has never seen, its text; a new
item's text is embedded with the run's embedding backend to retrieve memories.
``rate_many`` batches users of the same persona together (one adapter load per persona).

Served agents: ``UserAgent.from_run(run, variant, remote=RemoteOptions(backend="openai",
base_url=URL))`` builds the same prompts and rates them through an OpenAI-compatible server that
serves the variant's `persona-tune serve-export` bundle (persona_tune.serving.remote; scoring mode).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf
from torchtune import training, utils

from persona_tune.errors import ConfigError, DataError
from persona_tune.evaluation.loading import ModelLoader, adapter_path
from persona_tune.evaluation.predict import GenerationConfig, RatingPredictor, predict_rows
from persona_tune.names import PROFILE_MEMORIES, RETRIEVED_MEMORIES, check_memory_mode, check_modes
from persona_tune.prompts import PromptBuilder
from persona_tune.runfolder import ASSIGNMENTS, ITEMS, MEMORIES, MEMORY_VECTORS, PROFILES, RATINGS_TRAIN, RunFolder


# ---------------------------------------------------------------- argument checks of the public methods
def _user_id(value, what: str = "user_id") -> int:
    """An integer user id (numpy integers and integral floats too); TypeError otherwise."""
    if value is None or isinstance(value, (bool, np.bool_, str, bytes)) or not isinstance(
            value, (int, float, np.integer, np.floating)) or (
            isinstance(value, (float, np.floating)) and not float(value).is_integer()):
        raise TypeError(f"{what} must be an integer user id, got {value!r}")
    return int(value)


def _item(value, what: str):
    """An item id (int) or the text of a new item (a non-empty str that is not a number)."""
    if isinstance(value, str):
        text = value.strip()
        if not text:
            raise ValueError(f"{what} is an empty text: give an item id (int) or the text of a new item")
        if text.lstrip("+-").isdigit():
            raise ValueError(f"{what} is the string {value!r}: pass an item id as an integer ({int(text)}); a "
                             "string is the text of a new item")
        return value
    if value is None or isinstance(value, (bool, np.bool_, bytes)) or not isinstance(
            value, (int, float, np.integer, np.floating)) or (
            isinstance(value, (float, np.floating)) and not float(value).is_integer()):
        raise TypeError(f"{what} must be an item id (int) or the text of a new item (str), got {value!r}")
    return int(value)


def _items(items, what: str = "items") -> list:
    """A non-empty list of item ids or texts (see _item); a lone string or None is a TypeError."""
    if items is None or isinstance(items, (str, bytes)) or isinstance(items, pd.DataFrame) or not hasattr(
            items, "__iter__"):
        raise TypeError(f"{what} must be a list of item ids (int) or texts of new items (str), got {items!r}"
                        + (" (wrap one item in a list)" if isinstance(items, (str, int)) else ""))
    items = list(items)
    if not items:
        raise ValueError(f"{what} is empty: give at least one item id or text")
    return [_item(v, f"{what}[{n}]") for n, v in enumerate(items)]


def _requests(requests, columns: tuple[str, str]) -> pd.DataFrame:
    if not isinstance(requests, pd.DataFrame):
        raise TypeError(f"requests must be a pandas DataFrame with the columns {', '.join(columns)}, "
                        f"got {type(requests).__name__}")
    missing = [c for c in columns if c not in requests.columns]
    if missing:
        raise ValueError(f"requests lack the column(s) {', '.join(missing)} (they need {', '.join(columns)}; "
                         f"{columns[1]}: an item id{' or the text of a new item' if columns[1] == 'item' else ''})")
    if requests.empty:
        raise ValueError("requests is empty: give at least one row")
    return requests


class UserAgent:
    """Rating agents of one run folder and one trained variant (see the module docstring). Every public
    method checks its arguments first: a TypeError or ValueError says which one is wrong and how."""

    def __init__(self, cfg: DictConfig, mode: str = "scoring", remote=None, cache: str | Path | None = None):
        self.cfg = cfg
        self.mode = check_modes(mode)[0] if mode != "both" else "both"
        self.run = RunFolder(cfg.run_dir)
        self.memory = check_memory_mode(cfg.memory)
        self.run.require(ITEMS, RATINGS_TRAIN)
        self._check_adapters()  # before the model loads: a partial or changed adapter is one clear error
        self.generation = GenerationConfig(**OmegaConf.to_container(cfg.generation, resolve=True))
        self.loader = None
        if remote is not None and remote.backend != "local":  # a served agent (persona_tune.serving.remote)
            from persona_tune.serving.remote import remote_rater

            if self.mode != "scoring":
                raise ConfigError("an agent served remotely rates in scoring mode only")
            self.predictor = remote_rater(cfg, remote, cache)
            self._load_tables()
            return
        device = utils.get_device(device=cfg.device)
        self.loader = ModelLoader(cfg, device, training.get_dtype(cfg.dtype, device=device))
        batching = OmegaConf.to_container(cfg.batching, resolve=True) | {"progress": False}
        self.predictor = RatingPredictor(self.loader.model, self.loader.tokenizer, device=device,
                                         max_seq_len=cfg.get("max_seq_len"), **batching)
        self._load_tables()

    @classmethod
    def from_run(cls, run_dir: str | Path, variant: str = "persona", *, family: str | None = None,
                 memory: str = "ms+ml", mode: str = "scoring", overrides: Sequence[str] = (), remote=None,
                 cache: str | Path | None = None) -> "UserAgent":
        """The agent of a trained variant, configured as `persona-tune eval` would evaluate it.

        ``remote``: a persona_tune.serving.remote.RemoteOptions with ``backend="openai"`` rates through
        a server that serves the variant's `persona-tune serve-export` bundle (``cache``: the SQLite
        file that keeps its answers)."""
        from persona_tune.evaluation.evalconfig import build_eval_config, run_family

        if not isinstance(run_dir, (str, Path)):
            raise TypeError(f"run_dir must be a run folder path (str or Path), got {run_dir!r}")
        if not isinstance(variant, str):
            raise TypeError(f"variant must be a variant name (str), e.g. 'persona', got {variant!r}")

        run = RunFolder(run_dir)
        cfg = build_eval_config(run, variant, run_family(run, family), memory, "scoring", list(overrides))
        return cls(cfg, mode=mode, remote=remote, cache=cache)

    def _check_adapters(self) -> None:
        """Every adapter this agent may load comes from a finished training (runfolder.check_adapter)."""
        adapter_dir = self.cfg.get("adapter_dir")
        if not adapter_dir:
            return
        personas = ([-1] if "{persona}" not in str(adapter_dir)
                    else sorted(self.run.read_assignments(columns=["persona"])["persona"].unique().tolist()))
        for persona in personas:
            adapter_path(adapter_dir, int(persona), self.cfg.get("adapter_epoch"))

    # ---------------------------------------------------------------- tables
    def _load_tables(self) -> None:
        run = self.run
        items = run.read_items(columns=["item_id", "text", "title"])
        self.item_text = items.set_index("item_id")["text"]  # what a new item's text is embedded like
        # A known item's title given as a "new item" text is a mistake the agent can name.
        titled = items.dropna(subset=["title"])
        self.item_of_title = dict(zip(titled["title"].astype(str).str.strip().str.casefold(), titled["item_id"]))
        self.prompts = PromptBuilder(run, self.memory, self.cfg.get("prompt_template", "paper"),
                                     bool(self.cfg.get("state_numbers", False)),
                                     int(self.cfg.get("collab_memories", 0) or 0))
        self.persona_of = (run.read_assignments().set_index("user_id")["persona"] if run.path(ASSIGNMENTS).exists()
                           else pd.Series(dtype="int64"))
        self.vectors = None
        if self.memory in RETRIEVED_MEMORIES:
            from persona_tune.memory.vectors import load_vectors

            run.require(MEMORY_VECTORS, MEMORIES)
            self.embed_meta = run.read_embeddings_meta()
            self.vectors = load_vectors(run)
            explanations = run.read_memories(columns=["user_id", "item_id", "explanation"])
            self.explanation = explanations.set_index(["user_id", "item_id"])["explanation"]
            self._embedder = None

    def persona(self, user_id: int) -> int:
        user_id = _user_id(user_id)
        if user_id in self.persona_of.index:
            return int(self.persona_of[user_id])
        if "{persona}" in str(self.cfg.adapter_dir or ""):
            raise DataError(f"user {user_id} has no persona in this run", path=self.run.path(ASSIGNMENTS))
        return -1

    # ---------------------------------------------------------------- prompts
    def _resolve_items(self, items: Sequence) -> tuple[list[int], list[str]]:
        """Item ids (new texts get ids -1, -2, ...) and their texts."""
        ids, texts = [], []
        for n, item in enumerate(items):
            if isinstance(item, str):
                known = self.item_of_title.get(item.strip().casefold())
                if known is not None:
                    raise ValueError(f"items[{n}] {item!r} is the title of item {int(known)}: pass its id "
                                     f"{int(known)} (a text is for an item the run has never seen)")
                ids.append(-(n + 1))
                texts.append(item)
            else:
                item_id = int(item)
                if item_id not in self.item_text.index:
                    raise DataError(f"item {item_id} is not in items.parquet; pass the item's text instead",
                                    path=self.run.items)
                ids.append(item_id)
                texts.append(self.item_text[item_id])
        return ids, texts

    def _memories(self, user_ids: list[int], item_ids: list[int], texts: list[str]) -> list[tuple]:
        """Top-k train memories of each (user, item), with the run's embed settings."""
        from persona_tune.memory.embeddings import build_embedder, embed_texts
        from persona_tune.memory.retrieval import retrieve

        v = self.vectors
        item_ids_all, item_vectors = v.item_ids, v.item_vectors
        # New items (negative ids) and known items embed never saw (no train or test row): embed their text.
        if getattr(self, "_vector_ids", None) is None:
            self._vector_ids = set(item_ids_all.tolist())
        new = sorted({(i, t) for i, t in zip(item_ids, texts) if i < 0 or i not in self._vector_ids})
        if new:
            if self._embedder is None:
                self._embedder = build_embedder(self.embed_meta["backend"], self.embed_meta["model"])
            vectors = embed_texts(self._embedder, [t for _, t in new])
            item_ids_all = np.concatenate([item_ids_all, np.array([i for i, _ in new], dtype=np.int64)])
            item_vectors = np.concatenate([item_vectors, vectors.astype(item_vectors.dtype)])
        rows = pd.DataFrame({"split": "agent", "user_id": user_ids, "item_id": item_ids})
        found = retrieve(rows, v.memory_ids, v.memory_vectors, item_ids_all, item_vectors,
                         k=int(self.embed_meta["k"]), delta=float(self.embed_meta["delta"]),
                         query=self.embed_meta.get("query", "item"), profile_ids=v.profile_ids,
                         profile_vectors=v.profile_vectors, progress=False).sort_values(["user_id", "item_id", "rank"])
        by_row: dict = {}
        for r in found.itertuples():
            text = self.explanation.get((r.user_id, r.memory_item_id))
            if text is not None:
                by_row.setdefault((r.user_id, r.item_id), []).append(
                    (self.prompts.text_of(r.user_id, r.memory_item_id), text))
        return [tuple(by_row.get((u, i), ())) for u, i in zip(user_ids, item_ids)]

    def prompt_rows(self, user_ids: Sequence[int], items: Sequence) -> pd.DataFrame:
        """user_id, item_id, persona and the PromptParts of each (user, item) request."""
        items = _items(items)
        if user_ids is None or isinstance(user_ids, (str, bytes)) or not hasattr(user_ids, "__iter__"):
            raise TypeError(f"user_ids must be a list of integer user ids, got {user_ids!r}")
        user_ids = [_user_id(u, f"user_ids[{n}]") for n, u in enumerate(user_ids)]
        if len(user_ids) != len(items):
            raise ValueError(f"user_ids and items must have the same length, got {len(user_ids)} and {len(items)}")
        item_ids, texts = self._resolve_items(items)
        memories = (self._memories(user_ids, item_ids, texts) if self.vectors is not None
                    else [()] * len(user_ids))
        if self.memory in PROFILE_MEMORIES:
            missing = next((u for u in user_ids if u not in self.prompts.profile), None)
            if missing is not None:
                raise DataError(f"user {missing} has no profile (M_s)", path=self.run.path(PROFILES))
        texts = [text if i < 0 else self.prompts.text_of(u, i) for u, i, text in zip(user_ids, item_ids, texts)]
        parts = self.prompts.parts(user_ids, item_ids, item_texts=texts, memories=memories)
        return pd.DataFrame({"user_id": user_ids, "item_id": item_ids,
                             "persona": [self.persona(u) for u in user_ids], "parts": parts})

    # ---------------------------------------------------------------- rating
    def rate_many(self, requests: pd.DataFrame) -> pd.DataFrame:
        """Rate every (user_id, item) of ``requests``; rows come back in request order.

        Columns: user_id, item_id (negative for a new item given as text), persona, rating (the
        mode's prediction), and the prediction columns (p1..p5, expected_rating, raw_text, ...).
        """
        _requests(requests, ("user_id", "item"))
        rows = self.prompt_rows(requests["user_id"].tolist(), requests["item"].tolist())
        rows["request"] = np.arange(len(rows))
        modes = ["scoring", "paper"] if self.mode == "both" else [self.mode]
        outputs = []
        for persona, group in rows.groupby("persona", sort=True):  # one adapter load per persona
            if self.loader is None:  # served remotely: the persona's adapter on the server
                self.predictor.use(int(persona))
            else:
                adapter = adapter_path(self.cfg.adapter_dir, int(persona), self.cfg.get("adapter_epoch"))
                self.loader.load(adapter, merge=self.cfg.merge_adapter)
            outputs.append(predict_rows(self.predictor, group.reset_index(drop=True), modes, self.generation))
        out = pd.concat(outputs, ignore_index=True).sort_values(["request", "mode"], kind="stable")
        out = out.rename(columns={"prediction": "rating"}).drop(columns=["request"])
        return out.reset_index(drop=True)

    def rate(self, user_id: int, items: Sequence) -> pd.DataFrame:
        """One user's ratings of ``items`` (item ids or texts of new items), in order."""
        user_id, items = _user_id(user_id), _items(items)
        return self.rate_many(pd.DataFrame({"user_id": [user_id] * len(items), "item": items}))

    # ---------------------------------------------------------------- slates (persona-tune simulate)
    def rate_slate_many(self, requests: pd.DataFrame) -> pd.DataFrame:
        """Scoring-mode ratings of (user_id, item_id) requests, in request order: the rate_many
        columns plus ``p_like`` = p(rating >= 4) = p4 + p5."""
        if self.mode == "paper":
            raise ConfigError("slates are rated in scoring mode (expected rating and p(rating >= 4)); "
                              "this agent was built with mode='paper'")
        _requests(requests, ("user_id", "item_id"))
        out = self.rate_many(pd.DataFrame({"user_id": requests["user_id"].to_numpy(),
                                           "item": requests["item_id"].tolist()}))
        out = out[out["mode"] == "scoring"].reset_index(drop=True)
        out["p_like"] = out["p4"] + out["p5"]
        return out

    def rate_slate(self, user_id: int, items: Sequence) -> pd.DataFrame:
        """One user's slate (item ids or texts of new items, top first): rank (1-based), item_id,
        expected_rating, p_like = p(rating >= 4), p1..p5 and the other prediction columns."""
        user_id, items = _user_id(user_id), _items(items)
        out = self.rate_slate_many(pd.DataFrame({"user_id": [user_id] * len(items), "item_id": items}))
        out.insert(0, "rank", np.arange(1, len(out) + 1))
        return out
