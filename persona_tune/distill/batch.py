"""Batch distillation: the LLM backend's requests as OpenAI Batch files, answered offline.

``distill --batch-out DIR`` walks every user's self-reflection chain on the answers already in
``RUN/distill/requests.sqlite`` and writes the first unanswered request of each user (the chain is
sequential: a step's prompt holds the profile the previous step returned) as one line of the OpenAI
Batch input format::

    {"custom_id": "<the request's cache key>", "method": "POST", "url": "/v1/chat/completions",
     "body": {"model": ..., "messages": [...], "temperature": ..., "seed": ..., "response_format": ...}}

at most ``--batch-max-lines`` (50,000, the OpenAI limit) lines per file, the files numbered
``requests-r<round>-<part>.jsonl``. The same files run through the OpenAI Batch API (half the price
of online calls) or ``vllm run-batch -i FILE -o OUT --model M`` on one's own GPUs.

``distill --batch-in FILE...`` loads Batch output files (one JSON line per request: ``custom_id``,
``response: {status_code, body}``, ``error``) into the request store, as if the answers had come
online. Every file is checked before anything is stored: a line that is not JSON or not the output
format is refused with its file and line, and so is a ``custom_id`` that no ``--batch-out`` of this
run folder wrote (another run's file, or other options). Lines whose request failed (``error``, or a
status other than 200) are counted and reported and their request stays unanswered, so the next
``--batch-out`` writes it again; a second answer to an answered request is counted and skipped (the
first answer stays).

A user with s steps needs s rounds of ``--batch-out``, the Batch job, ``--batch-in`` (more if an
answer fails validation: the retry is a request of its own). ``--dry-run`` reports the rounds.
When ``--batch-out`` finds nothing left to ask, every step is answered and it writes the outputs,
as a plain ``distill`` (which then needs no ``--base-url``) also does.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from persona_tune.distill.config import MAX_LINES, DistillConfig
from persona_tune.distill.llm import Deferred, LLMDistiller, assemble, plan_batches
from persona_tune.distill.reflect import load_prompts
from persona_tune.distill.store import Answer, RequestStore
from persona_tune.errors import DataError
from persona_tune.runfolder import DISTILL_REQUESTS, RunFolder

if TYPE_CHECKING:
    from persona_tune.distill.reflect import BatchItem

log = logging.getLogger(__name__)

BATCH_URL = "/v1/chat/completions"
FILE_PATTERN = "requests-r{round:04d}-{part:03d}.jsonl"


@dataclass
class BatchCollector(LLMDistiller):
    """An LLMDistiller that asks nothing: it replays stored answers and collects each user's first
    unanswered request (the user then waits for the next round)."""

    pending: dict[str, dict] = field(default_factory=dict)  # key -> the request and where it belongs
    steps_left: dict[int, int] = field(default_factory=dict)  # waiting user -> steps from the pending one on

    async def _call(self, key: str, messages: list[dict], params: dict, key_params: dict,
                    user_id: int, step: int, attempt: int):
        self.pending.setdefault(key, {"user_id": user_id, "step": step, "attempt": attempt,
                                      "request": {"messages": messages, "params": key_params}, "body_params": params})
        raise Deferred(key)

    async def distill_user(self, user_id: int, batches: list[list[BatchItem]], bar) -> tuple[str, dict[int, str]]:
        try:
            return await super().distill_user(user_id, batches, bar)
        except Deferred as e:
            self.steps_left[user_id] = len(batches) - self.pending[e.key]["step"]
            raise


def body(model: str, request: dict) -> dict:
    """The chat-completions body of a stored request (its params less the store's attempt number)."""
    params = {k: v for k, v in request["params"].items() if k != "attempt"}
    return {"model": model, "messages": request["messages"], **params}


def write_batch_files(store: RequestStore, collector: BatchCollector, model: str, out_dir: Path,
                      max_lines: int = MAX_LINES) -> dict[str, Any]:
    """Record the collected requests in the store (for --batch-in) and write them as Batch input files."""
    requests = sorted(collector.pending.items(), key=lambda kv: (kv[1]["user_id"], kv[1]["step"], kv[1]["attempt"], kv[0]))
    if not requests:
        return {"round": None, "requests": 0, "files": []}
    round_no = store.last_batch_round() + 1
    already = store.batch_emitted([key for key, _ in requests])
    out_dir.mkdir(parents=True, exist_ok=True)
    files = []
    for part, start in enumerate(range(0, len(requests), max_lines), start=1):
        path = out_dir / FILE_PATTERN.format(round=round_no, part=part)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=out_dir)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                for key, p in requests[start:start + max_lines]:
                    line = {"custom_id": key, "method": "POST", "url": BATCH_URL, "body": body(model, p["request"])}
                    f.write(json.dumps(line, ensure_ascii=False) + "\n")
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        files.append(str(path))
    store.record_batch(round_no, model, [(key, p["user_id"], p["step"], p["attempt"], p["request"]) for key, p in requests])
    if already:
        log.warning("%d of the %d requests were written to Batch files before and have no answer yet: load those "
                    "files' outputs with --batch-in before submitting these again", len(already), len(requests))
    return {"round": round_no, "requests": len(requests), "files": files, "reemitted": len(already)}


@dataclass
class Replayed:
    """The chains replayed from the store: complete when no request is waiting."""

    tables: tuple | None  # (profiles, memories, failures, provenance, summary) when complete
    summary: dict[str, Any]  # when requests are waiting: what waits, and the Batch files written


def replay(run: RunFolder, train: pd.DataFrame, items: pd.DataFrame, traits: pd.DataFrame, cfg: DistillConfig,
           batch_out: Path | None = None) -> Replayed:
    """Every user's chain on stored answers only; the unanswered requests go to Batch files in ``batch_out``."""
    prompts = load_prompts(cfg.prompt_dir)
    plan = plan_batches(train, items, cfg.batch_size)
    with RequestStore(run.path(DISTILL_REQUESTS)) as store:
        # No progress bar: nothing is asked, the walk takes seconds.
        collector = BatchCollector(replace(cfg, progress=False), prompts, store, None, response_format=cfg.response_format)
        results, failures = asyncio.run(collector.run(plan))
        stored = store.totals()
        if not collector.pending:
            return Replayed(assemble(collector, results, failures, stored, train, traits, cfg, prompts), {})
        written = write_batch_files(store, collector, cfg.model, batch_out, cfg.batch_max_lines) if batch_out else {}
    tally = collector.tally
    summary = {"users_done": tally.users_done, "users_failed": tally.users_failed, "users_waiting": tally.users_waiting,
               "requests_waiting": len(collector.pending), "cached": tally.cached,
               "rounds_left_at_least": max(collector.steps_left.values(), default=0)}
    if written:
        summary.update(batch_round=written["round"], batch_files=len(written["files"]),
                       batch_reemitted=written["reemitted"], batch_dir=str(batch_out))
    return Replayed(None, summary)


# ---------------------------------------------------------------- ingesting Batch output files

@dataclass
class Ingested:
    answers: dict[str, tuple[Answer, str]] = field(default_factory=dict)  # key -> (answer, "file:line")
    failed: int = 0
    first_failure: str = ""
    duplicates: int = 0
    first_duplicate: str = ""
    lines: int = 0


def _answer_from_body(response_body: Any, path: Path, line: int) -> Answer:
    if not isinstance(response_body, dict) or not isinstance(response_body.get("choices"), list):
        raise DataError("response.body is not a chat completion (no `choices` list)", path, line)
    choice = response_body["choices"][0] if response_body["choices"] else None
    if choice is not None and not (isinstance(choice, dict) and isinstance(choice.get("message"), dict)):
        raise DataError("response.body.choices[0] has no `message` object", path, line)
    content = choice["message"].get("content") if choice is not None else None
    if content is not None and not isinstance(content, str):
        raise DataError("response.body.choices[0].message.content is not a string", path, line)
    usage = response_body.get("usage") or {}
    if not isinstance(usage, dict):
        raise DataError("response.body.usage is not an object", path, line)
    try:
        prompt_tokens, completion_tokens = int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
    except (TypeError, ValueError):
        raise DataError("response.body.usage token counts are not integers", path, line) from None
    return Answer(content=content, finish_reason=choice.get("finish_reason") if choice is not None else None,
                  prompt_tokens=prompt_tokens, completion_tokens=completion_tokens)


def read_batch_outputs(paths: list[Path], store: RequestStore) -> Ingested:
    """Parse and check Batch output files against the store; raises DataError (file:line) on a bad line."""
    emitted = store.batch_keys()
    answered = set(store.answers())
    got = Ingested()
    for path in paths:
        if not path.is_file():
            raise DataError("no such Batch output file", path)
        with path.open(encoding="utf-8") as f:
            for line_no, text in enumerate(f, start=1):
                if not text.strip():
                    continue
                got.lines += 1
                try:
                    obj = json.loads(text)
                except ValueError as e:
                    raise DataError(f"not JSON ({e})", path, line_no) from None
                if not isinstance(obj, dict) or not isinstance(obj.get("custom_id"), str):
                    raise DataError("not a Batch output line (no string `custom_id`)", path, line_no)
                key = obj["custom_id"]
                if key not in emitted and key not in answered:
                    raise DataError(f"custom_id {key[:16]}... was never written by `distill --batch-out` for this "
                                    f"run folder (a file of another run, or of other distill options?)", path, line_no)
                where = f"{path}:{line_no}"
                response, error = obj.get("response"), obj.get("error")
                if error is None and not isinstance(response, dict):
                    raise DataError("neither `response` nor `error`", path, line_no)
                status = response.get("status_code", 200) if isinstance(response, dict) else None
                failure = None
                if error is not None or status != 200:
                    failure = error.get("message", error) if isinstance(error, dict) else error
                    if error is None:
                        failure = f"HTTP {status}: {json.dumps(response.get('body'))[:200]}"
                else:
                    answer = _answer_from_body(response.get("body"), path, line_no)
                if key in answered or key in got.answers:
                    got.duplicates += 1
                    got.first_duplicate = got.first_duplicate or where
                elif failure is not None:
                    got.failed += 1
                    got.first_failure = got.first_failure or f"{where}: {failure}"
                else:
                    got.answers[key] = (answer, where)
    return got


def ingest(store: RequestStore, paths: list[Path]) -> dict[str, Any]:
    """Load Batch output files into the store (all or nothing); returns the counts."""
    got = read_batch_outputs(paths, store)
    emitted = store.batch_requests(list(got.answers))
    store.put_many([(key, emitted[key], answer) for key, (answer, _) in got.answers.items()])
    summary: dict[str, Any] = {"batch_lines": got.lines, "batch_answers": len(got.answers),
                               "batch_failed": got.failed, "batch_duplicates": got.duplicates}
    if got.failed:
        log.warning("%d Batch line(s) report a failed request (first: %s); they stay unanswered and the next "
                    "--batch-out writes them again", got.failed, got.first_failure)
        summary["batch_first_failure"] = got.first_failure
    if got.duplicates:
        log.warning("%d Batch line(s) answer a request that already has an answer (first: %s); skipped, "
                    "the first answer stays", got.duplicates, got.first_duplicate)
        summary["batch_first_duplicate"] = got.first_duplicate
    return summary
