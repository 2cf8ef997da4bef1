"""The durable request store: one SQLite row per answered request, so re-runs repeat no call.

The key is the sha256 of (model, messages, parameters); parameters include the attempt number, so a
retried generation is a request of its own. Rows are committed one by one in WAL mode: after Ctrl-C
or ``kill -9`` every answer received before the kill is on disk. Answers are stored as received,
valid or not; validity is recomputed when they are read back. The API key is never stored.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS requests (
    key               TEXT PRIMARY KEY,
    user_id           INTEGER,
    step              INTEGER,
    attempt           INTEGER,
    model             TEXT NOT NULL,
    request           TEXT NOT NULL,  -- JSON: messages and parameters
    content           TEXT,           -- the answer's text, as received
    finish_reason     TEXT,
    prompt_tokens     INTEGER,
    completion_tokens INTEGER,
    latency_s         REAL,
    transport_retries INTEGER,
    created_at        REAL
)
"""


def request_key(model: str, messages: list[dict], params: dict) -> str:
    blob = json.dumps({"model": model, "messages": messages, "params": params}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Answer:
    content: str | None
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    latency_s: float = 0.0
    transport_retries: int = 0


class RequestStore:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: committed rows survive a process kill
        self._db.execute("PRAGMA busy_timeout=10000")
        self._db.execute(SCHEMA)

    def get(self, key: str) -> Answer | None:
        row = self._db.execute(
            "SELECT content, finish_reason, prompt_tokens, completion_tokens, latency_s, transport_retries "
            "FROM requests WHERE key = ?", (key,),
        ).fetchone()
        return Answer(*row) if row else None

    def answers(self) -> dict[str, Answer]:
        """Every stored answer by key, in one query (a re-run looks keys up here, not row by row)."""
        rows = self._db.execute(
            "SELECT key, content, finish_reason, prompt_tokens, completion_tokens, latency_s, transport_retries "
            "FROM requests"
        )
        return {row[0]: Answer(*row[1:]) for row in rows}

    def put(self, key: str, *, model: str, request: dict, answer: Answer,
            user_id: int | None = None, step: int | None = None, attempt: int | None = None) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO requests VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (key, user_id, step, attempt, model, json.dumps(request, ensure_ascii=False), answer.content,
             answer.finish_reason, answer.prompt_tokens, answer.completion_tokens, answer.latency_s,
             answer.transport_retries, time.time()),
        )

    def totals(self) -> dict[str, Any]:
        n, prompt, completion = self._db.execute(
            "SELECT COUNT(*), COALESCE(SUM(prompt_tokens), 0), COALESCE(SUM(completion_tokens), 0) FROM requests"
        ).fetchone()
        return {"requests": n, "prompt_tokens": prompt, "completion_tokens": completion}

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> "RequestStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
