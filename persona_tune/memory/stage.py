"""Embed profiles (M_s) and enriched interactions (M_l), then retrieve the top-k memories of every row.

Reads ratings_train/test, items and distill/{profiles,memories}.parquet; writes memory/: vectors with
their ids, embeddings.json and retrieved.parquet (see docs/architecture.md and
docs/memory-and-personas.md). Vectors are reused when the backend, model and inputs are unchanged
(--force recomputes them); the openai and local backends also cache every vector in
memory/embeddings.sqlite, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from persona_tune.errors import DataError
from persona_tune.memory.embeddings import (
    BACKENDS,
    DEFAULT_BATCH_SIZES,
    DEFAULT_MODELS,
    EmbeddingCache,
    build_embedder,
    embed_texts,
    l2_normalise,
)
from persona_tune.memory.retrieval import QUERY_FORMS, retrieve
from persona_tune.memory.vectors import MemoryVectors, load_vectors, save_vectors
from persona_tune.runfolder import (
    EMBEDDINGS_CACHE,
    EMBEDDINGS_META,
    ITEM_VECTORS,
    ITEMS,
    MEMORIES,
    MEMORY_VECTORS,
    PROFILE_VECTORS,
    PROFILES,
    RATINGS_TEST,
    RATINGS_TRAIN,
    RETRIEVED,
    RunFolder,
    atomic_write_json,
    atomic_write_parquet,
    file_sha256,
)
from persona_tune.stage import add_config_arguments, config_from_args, validate

log = logging.getLogger(__name__)

DEFAULT_DELTA = 0.3
INPUTS = (ITEMS, PROFILES, MEMORIES)


def memory_text_note() -> str:
    return "memory vector = normalise(e(item text) + e(M_l explanation)); profile vector = e(M_s profile)"


def load_memories(run: RunFolder) -> pd.DataFrame:
    """distill/memories.parquet, checked: one memory per (user, item), and only for train rows."""
    path = run.path(MEMORIES)
    memories = run.read_memories(columns=["user_id", "item_id", "explanation"])
    dup = memories.duplicated(["user_id", "item_id"])
    if dup.any():
        first = int(np.flatnonzero(dup.to_numpy())[0])
        raise DataError("duplicate memory for one (user_id, item_id)", path, line=first + 1)
    train = run.read_ratings("train", columns=["user_id", "item_id"])
    inside = pd.MultiIndex.from_frame(memories[["user_id", "item_id"]]).isin(
        pd.MultiIndex.from_frame(train[["user_id", "item_id"]])
    )
    if not inside.all():
        first = int(np.flatnonzero(~inside)[0])
        raise DataError(
            "memory for a (user_id, item_id) that is not a train row (it would leak the test period)",
            path,
            line=first + 1,
        )
    return memories.reset_index(drop=True)


def compute_vectors(
    run: RunFolder, embedder, batch_size: int, cache: EmbeddingCache | None = None
) -> MemoryVectors:
    """Embed items, profiles and memories of a run (pure: writes nothing but the cache)."""
    profiles = run.read_profiles(columns=["user_id", "profile"])
    memories = load_memories(run)
    items = run.read_items(columns=["item_id", "text"])
    rated = pd.concat([query_rows(run)["item_id"], memories["item_id"]]).unique()
    items = items[items["item_id"].isin(rated)].reset_index(drop=True)  # only items a row or memory needs
    item_pos = pd.Index(items["item_id"]).get_indexer(memories["item_id"])
    if (item_pos < 0).any():
        first = int(np.flatnonzero(item_pos < 0)[0])
        raise DataError(
            f"memory item_id {int(memories['item_id'].iloc[first])} is not in {ITEMS}",
            run.path(MEMORIES),
            line=first + 1,
        )

    item_vectors = embed_texts(embedder, items["text"].fillna(""), batch_size, cache, desc="embed items")
    profile_vectors = embed_texts(embedder, profiles["profile"].fillna(""), batch_size, cache, desc="embed profiles")
    explanation_vectors = embed_texts(
        embedder, memories["explanation"].fillna(""), batch_size, cache, desc="embed memories"
    )
    memory_vectors = l2_normalise(item_vectors[item_pos] + explanation_vectors)
    return MemoryVectors(
        model=embedder.name,
        dim=int(item_vectors.shape[1]),
        item_ids=items["item_id"].to_numpy(np.int64),
        item_vectors=item_vectors,
        profile_ids=profiles["user_id"].to_numpy(np.int64),
        profile_vectors=profile_vectors,
        memory_ids=memories[["user_id", "item_id"]].astype("int64"),
        memory_vectors=memory_vectors,
    )


def _input_hashes(run: RunFolder) -> dict[str, str]:
    return {name: file_sha256(run.path(name)) for name in INPUTS}


def warn_missing_users(run: RunFolder, relpath: str, stage: str, consequence: str) -> int:
    """WARNING with counts when ``relpath`` covers fewer users than ratings_train; returns how many miss."""
    users = run.read_ratings("train", columns=["user_id"])["user_id"].nunique()
    covered = run.read_table(relpath, columns=["user_id"])["user_id"].nunique()
    missing = users - covered
    if missing > 0:
        log.warning("%s covers %d of the %d users: %d are missing (`%s` failed for them; see its output and re-run "
                    "it to retry): %s", run.path(relpath), covered, users, missing, stage, consequence)
    return missing


def vectors_are_current(run: RunFolder, backend: str, model: str) -> bool:
    meta_path = run.path(EMBEDDINGS_META)
    if not meta_path.is_file():
        return False
    meta = json.loads(meta_path.read_text())
    files = (ITEM_VECTORS, PROFILE_VECTORS, MEMORY_VECTORS)
    return (
        meta.get("backend") == backend
        and meta.get("model") == model
        and meta.get("inputs") == _input_hashes(run)
        and all(run.path(f).is_file() for f in files)
    )


def query_rows(run: RunFolder) -> pd.DataFrame:
    """Every train and test row: split, user_id, item_id."""
    train = run.read_ratings("train", columns=["user_id", "item_id"]).assign(split="train")
    test = run.read_ratings("test", columns=["user_id", "item_id"]).assign(split="test")
    return pd.concat([train, test], ignore_index=True)[["split", "user_id", "item_id"]]


@dataclass
class EmbedConfig:
    """The `embed` stage's options (its CLI arguments are generated from them)."""

    backend: str = field(default="local", metadata={"choices": BACKENDS, "help": "embedding backend"})
    model: str | None = field(default=None, metadata={"help": f"embedding model (defaults: {DEFAULT_MODELS})"})
    k: int = field(default=1, metadata={"min": 1, "help": "memories retrieved per row (top-k)"})
    delta: float = field(default=DEFAULT_DELTA, metadata={"min": -1.0, "max": 1.0, "help": "minimum cosine similarity"})
    query: str = field(default="user+item", metadata={"choices": QUERY_FORMS, "help": "what the query embeds"})
    batch_size: int | None = field(default=None, metadata={"min": 1, 
        "help": f"texts per request (defaults: {DEFAULT_BATCH_SIZES})"})
    base_url: str | None = field(default=None, metadata={
        "help": "openai backend: endpoint (default $OPENAI_BASE_URL)"})
    api_key_env: str = field(default="OPENAI_API_KEY", metadata={
        "help": "openai backend: environment variable holding the key"})
    timeout: float = field(default=120.0, metadata={"gt": 0, 
        "help": "openai backend: seconds per request in total (connect and whole answer)"})
    device: str = field(default="cpu", metadata={"help": "local backend: torch device"})
    force: bool = field(default=False, metadata={"flag": "--force", "help": "recompute vectors even if current ones exist"})

    def embedder_kwargs(self) -> dict:
        """The backend's own settings (the API key read from ``api_key_env``)."""
        if self.backend == "openai":
            return {"base_url": self.base_url, "api_key": os.environ.get(self.api_key_env), "timeout": self.timeout}
        return {"device": self.device} if self.backend == "local" else {}


def run(run: RunFolder, cfg: EmbedConfig) -> dict:
    """The `embed` stage: vectors and retrieved memories; returns the summary recorded in the manifest."""
    validate(cfg)  # the one check of the Config (persona_tune/stage.py), before anything is read
    backend, k, delta, query, force = cfg.backend, cfg.k, cfg.delta, cfg.query, cfg.force
    model = cfg.model or DEFAULT_MODELS[backend]
    batch_size = cfg.batch_size or DEFAULT_BATCH_SIZES[backend]
    run.require(RATINGS_TRAIN, RATINGS_TEST, ITEMS, PROFILES, MEMORIES)
    params = {"backend": backend, "model": model, "query": query, "k": k, "delta": delta, "batch_size": batch_size}
    inputs = run.checksums(RATINGS_TRAIN, RATINGS_TEST, *INPUTS)
    record = run.stage_record("embed") or {}
    if (not force and {key: record.get("params", {}).get(key) for key in params} == params
            and record.get("inputs") == inputs and run.path(RETRIEVED).is_file()
            and vectors_are_current(run, backend, model)):
        log.info("embed is finished with the same options and inputs: skipped (nothing written)")
        return record["counts"]
    warn_missing_users(run, PROFILES, "distill", "they get no memories and no persona")
    if not force and vectors_are_current(run, backend, model):
        log.info("vectors for %s/%s are up to date in %s; re-running retrieval only", backend, model, run.memory_dir)
        vectors = load_vectors(run)
    else:
        # embeddings.json marks a complete set of vectors: drop it before any vector changes.
        run.path(EMBEDDINGS_META).unlink(missing_ok=True)
        embedder = build_embedder(backend, model, **cfg.embedder_kwargs())
        cache = EmbeddingCache(run.path(EMBEDDINGS_CACHE)) if backend != "hash" else None
        try:
            vectors = compute_vectors(run, embedder, batch_size, cache)
        finally:
            if cache is not None:
                cache.close()
        save_vectors(run, vectors)

    rows = query_rows(run)
    retrieved = retrieve(
        rows, vectors.memory_ids, vectors.memory_vectors, vectors.item_ids, vectors.item_vectors,
        k=k, delta=delta, query=query, profile_ids=vectors.profile_ids, profile_vectors=vectors.profile_vectors,
    )
    atomic_write_parquet(retrieved, run.path(RETRIEVED))

    with_memory = retrieved[retrieved["rank"] == 0].groupby("split").size()
    per_split = rows.groupby("split").size()
    coverage = {s: round(float(with_memory.get(s, 0)) / int(n), 4) for s, n in per_split.items()}
    meta = {
        "backend": backend,
        "model": model,
        "dim": vectors.dim,
        "query": query,
        "k": k,
        "delta": delta,
        "vectors": memory_text_note(),
        "inputs": _input_hashes(run),
    }
    atomic_write_json(run.path(EMBEDDINGS_META), meta)
    summary = {
        "n_items": len(vectors.item_ids),
        "n_profiles": len(vectors.profile_ids),
        "n_memories": len(vectors.memory_ids),
        "n_rows": len(rows),
        "n_retrieved": len(retrieved),
        "fraction_of_rows_with_a_memory": coverage,
        "mean_top1_score": round(float(retrieved.loc[retrieved["rank"] == 0, "score"].mean()), 4)
        if len(retrieved) else None,
    }
    run.record_stage("embed", {k_: v for k_, v in meta.items() if k_ not in ("inputs", "vectors")}
                     | {"batch_size": batch_size}, counts=summary, inputs=inputs)
    log.log(logging.INFO if len(retrieved) else logging.WARNING,
            "retrieved %d memories for %d rows; rows with a memory: %s", len(retrieved), len(rows), coverage)
    return summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", required=True, help="run folder")
    add_config_arguments(parser, EmbedConfig, type_metavars=False)


def print_result(folder: RunFolder, cfg: EmbedConfig, summary: dict) -> int:
    """What `persona-tune embed` prints of ``run``'s result; the exit code."""
    print(json.dumps(summary, indent=2))
    return 0


def main(args: argparse.Namespace) -> int:
    folder, cfg = RunFolder(args.run), config_from_args(EmbedConfig, args)
    return print_result(folder, cfg, run(folder, cfg))
