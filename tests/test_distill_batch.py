"""Batch distillation: requests out as OpenAI Batch files, answers back in, the same run folder as online."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pandas as pd
import pytest

from persona_tune.cli import main as cli
from persona_tune.distill.run import DistillConfig, distill
from persona_tune.errors import ConfigError, DataError
from persona_tune.runfolder import RunFolder
from persona_tune.testing.batch_runner import answer_file
from persona_tune.testing.fake_openai_server import FakeOpenAIServer
from tests.fixtures_runs import make_prepared_run

OUTPUTS = ("distill/profiles.parquet", "distill/memories.parquet", "distill/traits.parquet", "distill/failures.jsonl")
QUIET = dict(progress=False)


@pytest.fixture(autouse=True)
def no_env_url(monkeypatch):
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)


def _steps(run: Path, batch_size: int) -> list[int]:
    counts = pd.read_parquet(run / "ratings_train.parquet").groupby("user_id").size()
    return [-(-int(n) // batch_size) for n in counts]


def _stored(run: Path) -> dict[str, tuple]:
    db = sqlite3.connect(run / "distill/requests.sqlite")
    try:
        rows = db.execute("SELECT key, user_id, step, attempt, model, request, content, prompt_tokens, "
                          "completion_tokens FROM requests").fetchall()
    finally:
        db.close()
    return {r[0]: r[1:] for r in rows}


def _round(run: Path, batch_dir: Path, cfg: DistillConfig, outputs: list[Path]) -> dict:
    """One round: emit, answer each file offline, ingest. Returns the --batch-out summary."""
    summary = distill(RunFolder(run), DistillConfig(**{**cfg.__dict__, "batch_out": str(batch_dir)}))
    if not summary.get("waiting"):
        return summary
    for path in sorted(batch_dir.glob(f"requests-r{summary['batch_round']:04d}-*.jsonl")):
        out = path.with_name(path.name.replace("requests", "output"))
        answer_file(path, out)
        outputs.append(out)
    ingested = distill(RunFolder(run), DistillConfig(**{**cfg.__dict__, "batch_in": tuple(map(str, outputs[-summary['batch_files']:]))}))
    assert ingested["batch_answers"] == summary["requests_waiting"] and ingested["batch_failed"] == 0
    return summary


def test_batch_round_trip_equals_the_online_run_byte_for_byte(tmp_path):
    online = make_prepared_run(tmp_path / "online", n_users=6, seed=4)
    offline = make_prepared_run(tmp_path / "batch", n_users=6, seed=4)
    cfg = DistillConfig(backend="openai", model="fake-model", batch_size=8, batch_max_lines=4, **QUIET)
    with FakeOpenAIServer() as server:
        distill(RunFolder(online), DistillConfig(**{**cfg.__dict__, "base_url": server.url}))
    steps = _steps(offline, 8)

    batch_dir, outputs, rounds = tmp_path / "batches", [], []
    while True:
        summary = _round(offline, batch_dir, cfg, outputs)
        if not summary.get("waiting"):
            break
        rounds.append(summary)
        assert len(rounds) <= max(steps), "more rounds than the longest chain has steps"
    # One round per step of the longest chain; round r asks the r-th step of every user that has one.
    assert len(rounds) == max(steps) and rounds[0]["rounds_left_at_least"] == max(steps)
    assert [r["requests_waiting"] for r in rounds] == [sum(s > r for s in steps) for r in range(max(steps))]
    first = sorted(batch_dir.glob("requests-r0001-*.jsonl"))
    assert len(first) == -(-len(steps) // 4)  # at most batch_max_lines lines per file, numbered
    line = json.loads(first[0].read_text().splitlines()[0])
    assert set(line) == {"custom_id", "method", "url", "body"} and line["url"] == "/v1/chat/completions"
    assert line["body"]["model"] == "fake-model" and line["body"]["messages"][0]["role"] == "system"
    assert line["body"]["response_format"]["type"] == "json_schema" and "attempt" not in line["body"]

    for name in OUTPUTS:
        assert (offline / name).read_bytes() == (online / name).read_bytes(), name
    assert _stored(offline) == _stored(online)  # the same requests, keys and answers
    # A plain distill afterwards needs no server: it is finished (skipped), or replays every step.
    assert distill(RunFolder(offline), cfg)["skipped"] is True
    (offline / "distill/profiles.parquet").unlink()
    again = distill(RunFolder(offline), cfg)
    assert again["calls"] == 0 and again["cached"] == sum(steps)
    assert (offline / "distill/profiles.parquet").read_bytes() == (online / "distill/profiles.parquet").read_bytes()


def test_failed_lines_stay_unanswered_and_duplicates_are_counted(tmp_path, capsys):
    run = make_prepared_run(tmp_path, n_users=3, seed=1)
    batch_dir = tmp_path / "b"
    args = ["distill", "--run", str(run), "--backend", "openai", "--model", "fake-model", "--no-progress"]
    assert cli([*args, "--batch-out", str(batch_dir)]) == 0
    err = capsys.readouterr().err
    assert "round 1: 3 request(s) written to" in err and "more round(s)" in err
    requests = batch_dir / "requests-r0001-001.jsonl"
    keys = [json.loads(t)["custom_id"] for t in requests.read_text().splitlines()]
    out = tmp_path / "out.jsonl"
    from persona_tune.testing import batch_runner

    lines = [batch_runner.answer_line(json.loads(t), failed=(k == keys[0]))
             for t, k in zip(requests.read_text().splitlines(), keys)]
    out.write_text("".join(json.dumps(x) + "\n" for x in [*lines, lines[1]]))  # one failed, one twice
    summary = distill(RunFolder(run), DistillConfig(backend="openai", model="fake-model", batch_in=(str(out),), **QUIET))
    assert summary["batch_answers"] == 2 and summary["batch_failed"] == 1 and summary["batch_duplicates"] == 1
    assert f"{out}:1: " in summary["batch_first_failure"] and summary["batch_first_duplicate"] == f"{out}:4"
    assert set(_stored(run)) == set(keys[1:])  # the failed request is not cached
    # The next round writes the failed request again (user 1's first step) beside the others' second steps.
    again = distill(RunFolder(run), DistillConfig(backend="openai", model="fake-model", batch_out=str(batch_dir), **QUIET))
    second = [json.loads(t)["custom_id"] for t in (batch_dir / "requests-r0002-001.jsonl").read_text().splitlines()]
    assert keys[0] in second and again["batch_reemitted"] == 1
    # Ingesting the same output file again: every line is a duplicate or a failure, nothing new is stored.
    repeat = distill(RunFolder(run), DistillConfig(backend="openai", model="fake-model", batch_in=(str(out),), **QUIET))
    assert repeat["batch_answers"] == 0 and repeat["batch_duplicates"] == 3


def test_bad_batch_lines_are_refused_with_file_and_line_and_nothing_is_stored(tmp_path, capsys):
    run = make_prepared_run(tmp_path, n_users=2, seed=2)
    batch_dir = tmp_path / "b"
    distill(RunFolder(run), DistillConfig(backend="openai", model="fake-model", batch_out=str(batch_dir), **QUIET))
    requests = batch_dir / "requests-r0001-001.jsonl"
    good = tmp_path / "good.jsonl"
    answer_file(requests, good)
    first = good.read_text().splitlines()[0]
    answer = json.loads(first)
    cases = {
        "not JSON": "{oops",
        "no string `custom_id`": json.dumps({"response": answer["response"]}),
        "was never written by `distill --batch-out`": json.dumps({**answer, "custom_id": "f" * 64}),
        "no `choices` list": json.dumps({**answer, "response": {"status_code": 200, "body": {"text": "hi"}}}),
        "neither `response` nor `error`": json.dumps({"custom_id": answer["custom_id"]}),
        "content is not a string": json.dumps({**answer, "response": {"status_code": 200, "body": {
            "choices": [{"message": {"content": 5}}]}}}),
    }
    for why, bad in cases.items():
        path = tmp_path / "bad.jsonl"
        path.write_text(first + "\n" + bad + "\n")  # a good line first: it must not be stored either
        with pytest.raises(DataError, match=f"{path}:2: .*{why}") as info:
            distill(RunFolder(run), DistillConfig(backend="openai", model="fake-model", batch_in=(str(path),), **QUIET))
        assert why in str(info.value)
        assert not _stored(run)
    # Through the CLI: one line, exit code 2, no traceback.
    assert cli(["distill", "--run", str(run), "--backend", "openai", "--model", "fake-model", "--batch-in",
                str(tmp_path / "missing.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "missing.jsonl: no such Batch output file" in err and "Traceback" not in err


def test_plain_distill_without_a_server_names_what_is_missing(tmp_path):
    run = make_prepared_run(tmp_path, n_users=2, seed=3)
    with pytest.raises(ConfigError, match=r"needs --base-url .* for the 2 request\(s\) not answered yet.*--batch-out"):
        distill(RunFolder(run), DistillConfig(backend="openai", model="fake-model", **QUIET))
    with pytest.raises(ConfigError, match="need --backend openai"):
        DistillConfig(batch_out="x").validate()
