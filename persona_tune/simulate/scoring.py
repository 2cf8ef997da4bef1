"""The simulators' inputs and the agent's scores of (user, item) pairs, resumable: what the `simulate`
stage (persona_tune/simulate/run.py) and the validity protocol (validity.py) share.

The agent's scores are written in chunks under RUN/simulate/<name>/parts/ with a fingerprint of the
model, adapters and inputs; a later call scores only the pairs no matching chunk holds.
"""

from __future__ import annotations

import hashlib
import json
import time

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from persona_tune.errors import ConfigError
from persona_tune.runfolder import (
    ASSIGNMENTS,
    EMBEDDINGS_META,
    ITEMS,
    MEMORIES,
    PROFILES,
    RATINGS_TEST,
    RATINGS_TRAIN,
    PROB_COLUMNS,
    RunFolder,
    SimulationFolder,
    atomic_write_json,
    atomic_write_parquet,
    file_sha256,
    read_or_discard,
)
from persona_tune.serving.remote import TRANSPORT_FIELDS, RemoteOptions

REMOTE_REQUESTS = "requests.sqlite"  # --backend openai: the served agent's answers (resumable)
SCORE_COLUMNS = ["user_id", "item_id", "persona", "expected_rating", "p_like", *PROB_COLUMNS, "rating_mass",
                 "n_prompt_tokens"]


# ---------------------------------------------------------------- inputs


def sample_users(test: pd.DataFrame, n: int | None, seed: int) -> np.ndarray:
    users = np.sort(test["user_id"].unique())
    if n is None or n >= len(users):
        return users
    return np.sort(np.random.default_rng(seed).choice(users, size=n, replace=False))


def make_probes(train: pd.DataFrame, test: pd.DataFrame, item_ids: np.ndarray, users: np.ndarray,
                candidates: int, negatives: int, seed: int) -> pd.DataFrame:
    """user_id, item_id, kind ('heldout' | 'unrated'), slot (sampling order per user and kind), true_rating."""
    rng = np.random.default_rng(seed)
    rated = pd.concat([train[["user_id", "item_id"]], test[["user_id", "item_id"]]])
    rated_by = rated.groupby("user_id")["item_id"].agg(set)
    test_by = {u: g for u, g in test.groupby("user_id", sort=True)}
    frames = []
    for user in users:
        held = test_by.get(user)
        if held is None or held.empty:
            continue
        take = len(held) if candidates == 0 else min(candidates, len(held))
        held = held.iloc[rng.permutation(len(held))[:take]]
        frames.append(pd.DataFrame({"user_id": user, "item_id": held["item_id"].to_numpy(), "kind": "heldout",
                                    "slot": np.arange(take), "true_rating": held["rating"].to_numpy(float)}))
        pool = np.setdiff1d(item_ids, np.fromiter(rated_by.get(user, set()), dtype=np.int64))
        n_neg = min(negatives * take, len(pool))
        if n_neg:
            frames.append(pd.DataFrame({"user_id": user, "item_id": rng.choice(pool, size=n_neg, replace=False),
                                        "kind": "unrated", "slot": np.arange(n_neg), "true_rating": np.nan}))
    if not frames:
        return pd.DataFrame({"user_id": pd.Series(dtype="int64"), "item_id": pd.Series(dtype="int64"),
                             "kind": pd.Series(dtype=object), "slot": pd.Series(dtype="int64"),
                             "true_rating": pd.Series(dtype=float)})
    return pd.concat(frames, ignore_index=True).astype({"user_id": "int64", "item_id": "int64", "slot": "int64"})


def read_inputs(run: RunFolder) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, np.ndarray, np.ndarray]:
    """(train, test, items, sorted item ids, sorted ids of users with train rows): what a simulation reads."""
    run.require(RATINGS_TRAIN, RATINGS_TEST, ITEMS)
    train = run.read_ratings("train")
    items = run.read_items(columns=["item_id", "hist_avg", "hist_count"])
    return (train, run.read_ratings("test"), items, np.sort(items["item_id"].to_numpy()),
            np.sort(train["user_id"].unique()))


# ---------------------------------------------------------------- the agent's scores, resumable


def agent_fingerprint(run: RunFolder, eval_cfg, remote: RemoteOptions | None = None) -> str:
    """What an agent's scores depend on: the eval config (model, adapters, memory) and the input files;
    with a served agent (``remote``, backend openai), also the server and its bundle."""
    from omegaconf import OmegaConf

    from persona_tune.evaluation.loading import adapter_path

    spec = OmegaConf.to_container(eval_cfg, resolve=True)
    for key in ("output_dir", "max_rows", "personas", "metrics", "batching", "mode", "split", "num_threads"):
        spec.pop(key, None)
    adapters = {}
    adapter_dir = eval_cfg.adapter_dir
    if adapter_dir:
        personas = ([-1] if "{persona}" not in str(adapter_dir)
                    else sorted(run.read_assignments(columns=["persona"])["persona"].unique().tolist()))
        for p in personas:
            path = adapter_path(adapter_dir, int(p), eval_cfg.get("adapter_epoch"))
            adapters[str(p)] = file_sha256(path)
    spec["adapter_sha256"] = adapters
    if remote is not None and remote.backend != "local":
        from persona_tune.runfolder import SERVING_SPEC

        spec["served"] = {k: v for k, v in remote.remote_dict().items() if k not in TRANSPORT_FIELDS}
        spec["served"]["bundle"] = file_sha256(run.serving_variant_dir(eval_cfg.variant) / SERVING_SPEC) \
            if (run.serving_variant_dir(eval_cfg.variant) / SERVING_SPEC).is_file() else None
    spec["inputs"] = {f: file_sha256(run.path(f)) for f in (ITEMS, RATINGS_TRAIN, PROFILES, MEMORIES,
                                                                EMBEDDINGS_META, ASSIGNMENTS)
                      if run.path(f).is_file()}
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()


def read_parts(sim: SimulationFolder, fingerprint: str) -> pd.DataFrame:
    frames = []
    for stamp in sorted(sim.parts_dir.glob("part_*.json")):
        part = stamp.with_suffix(".parquet")
        try:
            ok = json.loads(stamp.read_text())["fingerprint"] == fingerprint
        except (OSError, ValueError, KeyError):
            ok = False
        frame = read_or_discard(part, pd.read_parquet, "agent scores part") if ok else None
        if frame is not None:  # a corrupt part is named, removed and scored again
            frames.append(frame)
    if not frames:
        return pd.DataFrame(columns=SCORE_COLUMNS)
    return pd.concat(frames, ignore_index=True).drop_duplicates(["user_id", "item_id"], keep="last")


def chunks_of(pairs: pd.DataFrame, size: int) -> list[pd.DataFrame]:
    """Pairs sorted by persona and user, cut into chunks of about ``size`` at user boundaries."""
    out, current, n = [], [], 0
    for _, g in pairs.groupby(["persona", "user_id"], sort=True):
        current.append(g)
        n += len(g)
        if n >= size:
            out.append(pd.concat(current, ignore_index=True))
            current, n = [], 0
    if current:
        out.append(pd.concat(current, ignore_index=True))
    return out


def score_with_agent(run: RunFolder, sim: SimulationFolder, cfg, pairs: pd.DataFrame) -> tuple[pd.DataFrame, dict]:
    """The agent's scores of ``pairs`` (user_id, item_id): from matching parts, the rest scored now.
    ``cfg``: a validated SimulateConfig (persona_tune/simulate/run.py)."""
    from persona_tune.evaluation.evalconfig import build_eval_config, run_family

    eval_cfg = build_eval_config(run, cfg.variant, run_family(run, cfg.family), cfg.memory, "scoring",
                                 list(cfg.overrides))
    fingerprint = agent_fingerprint(run, eval_cfg, cfg)
    have = read_parts(sim, fingerprint)
    key = pd.MultiIndex.from_frame(pairs[["user_id", "item_id"]])
    done = key.isin(pd.MultiIndex.from_frame(have[["user_id", "item_id"]])) if len(have) else np.zeros(len(pairs), bool)
    todo = pairs[~done]
    stats = {"fingerprint": fingerprint, "reused": int(done.sum()), "scored": int(len(todo)), "seconds": 0.0}
    if len(todo):
        stats.update(_score_missing(run, sim, cfg, eval_cfg, fingerprint, todo))
    scores = read_parts(sim, fingerprint)
    out = pairs[["user_id", "item_id"]].merge(scores, on=["user_id", "item_id"], how="left", validate="one_to_one")
    if out["expected_rating"].isna().any():  # cannot happen unless parts/ changed underneath us
        raise ConfigError(f"{sim.parts_dir}: scores missing after scoring; delete the folder and re-run")
    return out, stats


def _score_missing(run, sim, cfg, eval_cfg, fingerprint, todo) -> dict:
    import torch

    from persona_tune.agent import UserAgent

    threads = torch.get_num_threads()
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    try:
        agent = UserAgent(eval_cfg, mode="scoring", remote=cfg, cache=sim.root / REMOTE_REQUESTS)
        todo = todo.assign(persona=[agent.persona(int(u)) for u in todo["user_id"]])
        start_index = len(list(sim.parts_dir.glob("part_*.parquet"))) if sim.parts_dir.is_dir() else 0
        seconds, before = 0.0, dict(agent.predictor.stats.as_dict())
        bar = tqdm(total=len(todo), desc=f"simulate {cfg.out_name}", unit="row", disable=not cfg.progress)
        for n, chunk in enumerate(chunks_of(todo, cfg.chunk_rows)):
            started = time.perf_counter()
            rated = agent.rate_slate_many(chunk[["user_id", "item_id"]])
            elapsed = time.perf_counter() - started
            seconds += elapsed
            part = sim.parts_dir / f"part_{start_index + n:05d}.parquet"
            atomic_write_parquet(rated[SCORE_COLUMNS], part)
            atomic_write_json(part.with_suffix(".json"), {"fingerprint": fingerprint, "rows": len(chunk),
                                                          "seconds": elapsed})
            bar.update(len(chunk))
        bar.close()
        after = agent.predictor.stats.as_dict()
        counters = {k: after[k] - before.get(k, 0) for k in ("rows", "forward_passes", "tokens_processed", "prompt_tokens")}
        return {"seconds": seconds, "rows_per_s": len(todo) / seconds if seconds else None, "predictor": counters}
    finally:
        torch.set_num_threads(threads)
