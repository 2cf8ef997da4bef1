"""The vectors under memory/ (items, profiles, memories, with their ids): written by the `embed` stage
(persona_tune/memory/stage.py), read by retrieval, clustering and UserAgent."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from persona_tune.runfolder import (
    ITEM_IDS,
    ITEM_VECTORS,
    MEMORY_IDS,
    MEMORY_VECTORS,
    PROFILE_IDS,
    PROFILE_VECTORS,
    RunFolder,
    atomic_path,
    atomic_write_parquet,
)


@dataclass
class MemoryVectors:
    """Everything retrieval and clustering need, as stored under memory/."""

    model: str
    dim: int
    item_ids: np.ndarray
    item_vectors: np.ndarray
    profile_ids: np.ndarray
    profile_vectors: np.ndarray
    memory_ids: pd.DataFrame  # user_id, item_id
    memory_vectors: np.ndarray


def _save_npy(path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        np.save(tmp, np.ascontiguousarray(array, dtype=np.float32))


def save_vectors(run: RunFolder, vectors: MemoryVectors) -> None:
    run.stage_dir("memory", create=True)
    _save_npy(run.path(ITEM_VECTORS), vectors.item_vectors)
    atomic_write_parquet(pd.DataFrame({"item_id": vectors.item_ids}), run.path(ITEM_IDS))
    _save_npy(run.path(PROFILE_VECTORS), vectors.profile_vectors)
    atomic_write_parquet(pd.DataFrame({"user_id": vectors.profile_ids}), run.path(PROFILE_IDS))
    _save_npy(run.path(MEMORY_VECTORS), vectors.memory_vectors)
    atomic_write_parquet(vectors.memory_ids, run.path(MEMORY_IDS))


def load_vectors(run: RunFolder) -> MemoryVectors:
    meta = run.read_embeddings_meta()
    return MemoryVectors(
        model=meta["model"],
        dim=int(meta["dim"]),
        item_ids=run.read_table(ITEM_IDS)["item_id"].to_numpy(np.int64),
        item_vectors=run.read_vectors(ITEM_VECTORS),
        profile_ids=run.read_table(PROFILE_IDS)["user_id"].to_numpy(np.int64),
        profile_vectors=run.read_vectors(PROFILE_VECTORS),
        memory_ids=run.read_table(MEMORY_IDS),
        memory_vectors=run.read_vectors(MEMORY_VECTORS),
    )
