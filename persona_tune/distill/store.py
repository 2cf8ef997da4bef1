"""The durable request store: one SQLite row per answered request, so re-runs repeat no call.

The key is the sha256 of (model, messages, parameters); parameters include the attempt number, so a
retried generation is a request of its own. Rows are committed one by one in WAL mode: after Ctrl-C
or ``kill -9`` every answer received before the kill is on disk. Answers are stored as received,
valid or not; validity is recomputed when they are read back. The API key is never stored.
``batch_requests`` remembers what ``distill --batch-out`` wrote, so ``--batch-in`` knows each answer's
request (distill/batch.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from persona_tune.errors import DataError

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
);
CREATE TABLE IF NOT EXISTS batch_requests (  -- requests written to Batch files by `distill --batch-out`
    key        TEXT PRIMARY KEY,
    user_id    INTEGER,
    step       INTEGER,
    attempt    INTEGER,
    model      TEXT NOT NULL,
    request    TEXT NOT NULL,  -- JSON: messages and parameters, as in `requests`
    round      INTEGER NOT NULL,
    emitted_at REAL
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
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: committed rows survive a process kill
            self._db.execute("PRAGMA busy_timeout=10000")
            self._db.executescript(SCHEMA)
        except sqlite3.DatabaseError as e:  # never deleted: it holds answers already paid for
            self._db.close()
            raise DataError(f"not a readable request store ({e}); it holds the answers already paid for, so it "
                            "is not replaced: restore it from a backup, or move it aside to start a new one "
                            "(every request is then sent again)", self.path) from None

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

    def put_many(self, rows: list[tuple[str, dict, Answer]]) -> None:
        """Store answers to Batch requests (key, the batch_requests row as a dict, answer) in one transaction."""
        now = time.time()
        with self._transaction():
            self._db.executemany(
                "INSERT OR REPLACE INTO requests VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                [(key, r["user_id"], r["step"], r["attempt"], r["model"], r["request"], a.content, a.finish_reason,
                  a.prompt_tokens, a.completion_tokens, a.latency_s, a.transport_retries, now) for key, r, a in rows],
            )

    def record_batch(self, round_no: int, model: str, rows: list[tuple[str, int, int, int, dict]]) -> None:
        """Remember the requests written to Batch files: (key, user_id, step, attempt, request)."""
        now = time.time()
        with self._transaction():
            self._db.executemany(
                "INSERT OR REPLACE INTO batch_requests VALUES (?,?,?,?,?,?,?,?)",
                [(key, user_id, step, attempt, model, json.dumps(request, ensure_ascii=False), round_no, now)
                 for key, user_id, step, attempt, request in rows],
            )

    def last_batch_round(self) -> int:
        return int(self._db.execute("SELECT COALESCE(MAX(round), 0) FROM batch_requests").fetchone()[0])

    def batch_keys(self) -> set[str]:
        return {row[0] for row in self._db.execute("SELECT key FROM batch_requests")}

    def batch_emitted(self, keys: list[str]) -> set[str]:
        """The ones of ``keys`` already written to a Batch file."""
        return set(keys) & self.batch_keys()

    def batch_requests(self, keys: list[str]) -> dict[str, dict]:
        wanted = set(keys)
        rows = self._db.execute("SELECT key, user_id, step, attempt, model, request FROM batch_requests")
        return {r[0]: dict(zip(("user_id", "step", "attempt", "model", "request"), r[1:])) for r in rows if r[0] in wanted}

    @contextlib.contextmanager
    def _transaction(self):
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

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
