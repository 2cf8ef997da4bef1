"""Retrieve each row's top-k long-term memories (M_l) with FAISS.

Candidates for a row (user u, item i) are u's own train memories, never item i itself, kept when
their cosine similarity is >= delta. Memories exist only for train interactions, so a test row can
only see the past; a train row may see any *other* train memory of the same user (the paper's
setting: all of the user's train memories are in the store during fine-tuning).

Search is exact inner product on L2-normalised vectors (= cosine): ``faiss.knn`` with
METRIC_INNER_PRODUCT, the kernel of ``IndexFlatIP``, run once per user on that user's memories, so
no row ever scores another user's memory and the cost is sum over users of rows x memories.

Query forms:
- ``item``: the query is the row's item vector e(I).
- ``user+item``: the paper's e(U + I), built as normalise(e(M_s) + e(I)). Embedding the two texts
  apart keeps the item from being cut off by the encoder's window (MiniLM reads 256 word pieces, a
  profile alone can fill it) and costs one vector per user and per item instead of one per row.
"""

from __future__ import annotations

import contextlib

import faiss
import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from persona_tune.errors import ConfigError
from persona_tune.memory.embeddings import l2_normalise

QUERY_FORMS = ("item", "user+item")
RETRIEVED_COLUMNS = ["split", "user_id", "item_id", "rank", "memory_item_id", "score"]


def _positions(index_ids: np.ndarray, wanted: np.ndarray, what: str) -> np.ndarray:
    pos = pd.Index(index_ids).get_indexer(wanted)
    if (pos < 0).any():
        missing = np.asarray(wanted)[pos < 0][:5].tolist()
        raise ConfigError(f"no {what} vector for ids {missing} ({int((pos < 0).sum())} missing)")
    return pos


def _user_slices(user_ids: np.ndarray) -> tuple[np.ndarray, dict[int, slice]]:
    """A stable order grouping equal user ids, and each user's slice of that order."""
    order = np.argsort(user_ids, kind="stable")
    sorted_ids = user_ids[order]
    starts = np.flatnonzero(np.r_[True, sorted_ids[1:] != sorted_ids[:-1]]) if len(order) else np.array([], int)
    ends = np.r_[starts[1:], len(order)]
    return order, {int(sorted_ids[s]): slice(s, e) for s, e in zip(starts, ends)}


def retrieve(
    rows: pd.DataFrame,
    memories: pd.DataFrame,
    memory_vectors: np.ndarray,
    item_ids: np.ndarray,
    item_vectors: np.ndarray,
    *,
    k: int = 1,
    delta: float = 0.5,
    query: str = "item",
    profile_ids: np.ndarray | None = None,
    profile_vectors: np.ndarray | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """Top-k memories for every row.

    Args:
        rows: the query rows: split, user_id, item_id.
        memories: user_id, item_id of each memory, aligned with ``memory_vectors``.
        item_ids, item_vectors: e(I) for every item a row can ask about.
        query: "item" or "user+item" (the latter needs profile_ids / profile_vectors; a user without
            a profile vector falls back to the item query).
    Returns:
        DataFrame with RETRIEVED_COLUMNS, one line per (row, rank), rows in input order.
    """
    if query not in QUERY_FORMS:
        raise ConfigError(f"query must be one of {', '.join(QUERY_FORMS)}, got {query!r}")
    if k < 1:
        raise ConfigError(f"k must be >= 1, got {k}")
    if query == "user+item" and (profile_ids is None or profile_vectors is None):
        raise ConfigError("the user+item query needs profile vectors")
    if len(memories) != len(memory_vectors):
        raise ConfigError(f"{len(memories)} memory ids but {len(memory_vectors)} memory vectors")

    row_users = rows["user_id"].to_numpy(np.int64)
    row_items = rows["item_id"].to_numpy(np.int64)
    row_item_pos = _positions(item_ids, row_items, "item")
    mem_users = memories["user_id"].to_numpy(np.int64)
    mem_items = memories["item_id"].to_numpy(np.int64)
    memory_vectors = np.ascontiguousarray(memory_vectors, dtype=np.float32)
    item_vectors = np.asarray(item_vectors, dtype=np.float32)
    profile_pos = pd.Index(profile_ids if profile_ids is not None else []).get_indexer

    row_order, row_slices = _user_slices(row_users)
    mem_order, mem_slices = _user_slices(mem_users)

    out_row, out_rank, out_mem, out_score = [], [], [], []
    with _faiss_threads(1):  # small per-user searches: one thread is ~10x faster than a spinning team
        for user, row_slice in tqdm(row_slices.items(), desc="retrieve", unit="user", disable=not progress):
            mem_slice = mem_slices.get(user)
            if mem_slice is None:
                continue
            row_idx = row_order[row_slice]
            mem_idx = mem_order[mem_slice]
            queries = item_vectors[row_item_pos[row_idx]]
            if query == "user+item":
                (p,) = profile_pos([user])
                if p >= 0:
                    queries = l2_normalise(queries + profile_vectors[p])
            # One extra neighbour: the query item itself may be among a train row's memories.
            kk = min(k + 1, len(mem_idx))
            scores, found = faiss.knn(queries, memory_vectors[mem_idx], kk, metric=faiss.METRIC_INNER_PRODUCT)
            found_items = mem_items[mem_idx][found]
            ok = (found >= 0) & (found_items != row_items[row_idx][:, None]) & (scores >= delta)
            rank = np.cumsum(ok, axis=1) - 1
            ok &= rank < k
            r, c = np.nonzero(ok)
            out_row.append(row_idx[r])
            out_rank.append(rank[r, c])
            out_mem.append(found_items[r, c])
            out_score.append(scores[r, c])

    if out_row:
        which, rank, mem_item, score = (np.concatenate(a) for a in (out_row, out_rank, out_mem, out_score))
    else:
        which = rank = mem_item = np.zeros(0, np.int64)
        score = np.zeros(0, np.float32)
    order = np.lexsort((rank, which))
    which, rank, mem_item, score = which[order], rank[order], mem_item[order], score[order]
    return pd.DataFrame(
        {
            "split": rows["split"].to_numpy()[which].astype(str),
            "user_id": row_users[which],
            "item_id": row_items[which],
            "rank": rank.astype(np.int64),
            "memory_item_id": mem_item.astype(np.int64),
            "score": score.astype(np.float32),
        },
        columns=RETRIEVED_COLUMNS,
    )


@contextlib.contextmanager
def _faiss_threads(n: int):
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)
