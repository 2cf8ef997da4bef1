"""The LLM backend over real HTTP on 127.0.0.1, against the fault-injecting fake server."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from persona_tune.distill.reflect import BatchItem, load_prompts, step_messages, validate_step
from persona_tune.distill.run import DistillConfig, distill
from persona_tune.distill.store import Answer, RequestStore, request_key
from persona_tune.errors import ConfigError
from persona_tune.runfolder import RunFolder
from persona_tune.testing.fake_openai_server import FakeOpenAIServer, Faults
from tests.fixtures_runs import make_prepared_run

REPO = Path(__file__).resolve().parent.parent
BATCH = [BatchItem(10, 4, "Heat (1995)", "x"), BatchItem(11, 2, "Cats (2019)", "y")]
FAST = dict(backoff_base=0.01, backoff_max=0.05, progress=False)


@pytest.fixture
def run(tmp_path) -> Path:
    return make_prepared_run(tmp_path, n_users=12, seed=0)


def _answer(explanations, profile="I like tense crime movies.") -> str:
    return json.dumps({"explanations": explanations, "profile": profile})


def _steps(run: Path, batch_size: int = 10) -> int:
    counts = pd.read_parquet(run / "ratings_train.parquet").groupby("user_id").size()
    return int(sum(-(-n // batch_size) for n in counts))


def _check_complete(run: Path) -> None:
    train = pd.read_parquet(run / "ratings_train.parquet")
    memories = pd.read_parquet(run / "distill/memories.parquet")
    profiles = pd.read_parquet(run / "distill/profiles.parquet")
    assert sorted(profiles["user_id"]) == sorted(train["user_id"].unique())
    assert profiles["profile"].str.strip().astype(bool).all()
    key = ["user_id", "item_id", "rating"]
    pd.testing.assert_frame_equal(memories[key].sort_values(key).reset_index(drop=True),
                                  train[key].sort_values(key).reset_index(drop=True))
    for r in memories.itertuples():
        assert f" as {r.rating} because " in r.explanation
    assert (memories["backend"] == "openai").all() and (memories["model"] == "fake-model").all()
    assert memories["prompt_version"].str.startswith("reflect-v1-").all()


def _store_rows(path: Path) -> int:
    if not path.exists():
        return 0
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return db.execute("SELECT COUNT(*) FROM requests").fetchone()[0]
    except sqlite3.OperationalError:
        return 0
    finally:
        db.close()


def _cli(run: Path, url: str, *extra: str, env: dict | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "persona_tune.cli", "distill", "--run", str(run), "--backend", "openai",
           "--base-url", url, "--model", "fake-model", "--backoff-base", "0.01", "--backoff-max", "0.05",
           "--no-progress", *extra]
    return subprocess.Popen(cmd, cwd=REPO, env={**os.environ, **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


# ------------------------------------------------------------ validation and the store

def test_validation_accepts_a_good_answer_and_names_what_is_wrong():
    good = [{"item_id": 10, "rating": 4, "explanation": "I rated Heat (1995) as 4 because of the heist."},
            {"item_id": 11, "rating": 2, "explanation": "I rated Cats (2019) as 2 because it was odd."}]
    result, reason = validate_step("Sure!\n```json\n" + _answer(good) + "\n```", BATCH, max_words=2000)
    assert reason == "" and result.explanations[11].startswith("I rated Cats") and result.profile
    cases = {
        "": "empty output",
        " ".join(["w"] * 30): "over 20 words (30)",
        '{"explanations": [': "unparsable JSON",
        _answer(good, profile="  "): "empty or missing profile",
        _answer(good[:1]): "no explanation for item(s) [11]",
        _answer(good + [{"item_id": 12, "explanation": "I rated X as 3 because"}]): "not in the batch",
        _answer([good[0], {**good[1], "rating": 3}]): "rating 3 given, the user's rating is 2",
        _answer([good[0], {**good[1], "explanation": "I rated Cats (2019) as 5 because"}]): "states rating 5",
        _answer([good[0], {**good[1], "explanation": "It was odd."}]): "does not state its rating",
    }
    for content, why in cases.items():
        result, reason = validate_step(content, BATCH, max_words=20 if "over 20" in why else 2000)
        assert result is None and why in reason, (content[:40], reason)


def test_store_keys_are_stable_and_rows_survive_reopening(tmp_path):
    messages = [{"role": "user", "content": "hi"}]
    key = request_key("m", messages, {"temperature": 0.3, "attempt": 0})
    assert key == request_key("m", [dict(messages[0])], {"attempt": 0, "temperature": 0.3})
    assert key != request_key("m", messages, {"temperature": 0.3, "attempt": 1})
    assert key != request_key("other", messages, {"temperature": 0.3, "attempt": 0})
    with RequestStore(tmp_path / "s.sqlite") as store:
        store.put(key, model="m", request={"messages": messages}, answer=Answer("out", "stop", 5, 2))
    with RequestStore(tmp_path / "s.sqlite") as store:
        assert store.get(key) == Answer("out", "stop", 5, 2, 0.0, 0)
        assert store.get("0" * 64) is None
        assert store.totals() == {"requests": 1, "prompt_tokens": 5, "completion_tokens": 2}


def test_prompt_dir_overrides_templates_and_changes_the_version(tmp_path):
    default = load_prompts()
    (tmp_path / "step.txt").write_text("PROFILE $profile\nITEMS $items ($n_items)\n")
    custom = load_prompts(tmp_path)
    assert custom.version != default.version and custom.templates["system.txt"] == default.templates["system.txt"]
    messages = step_messages(custom, None, BATCH, 100)
    assert messages[1]["content"].startswith("PROFILE (none yet") and "item_id 11 | rating 2 | Cats (2019)" in messages[1]["content"]
    (tmp_path / "step.txt").write_text("$profile $nope")
    with pytest.raises(ConfigError, match=r"step.txt: bad placeholder"):
        load_prompts(tmp_path)


# ------------------------------------------------------------ faults, failures, fallbacks

def test_thirty_percent_faults_still_complete_with_bounded_retries(run):
    faults = Faults(rate_429=0.06, rate_500=0.06, rate_timeout=0.04, rate_malformed=0.05, rate_overlong=0.05,
                    rate_empty=0.04, timeout_sleep=1.0, seed=3)
    cfg = DistillConfig(backend="openai", model="fake-model", timeout=0.3, max_retries=6, max_attempts=6,
                        concurrency=8, batch_size=3, **FAST)
    with FakeOpenAIServer(faults=faults) as server:
        cfg.base_url = server.url
        summary = distill(RunFolder(run), cfg)
        stats = server.stats()
        _check_complete(run)
        steps = _steps(run, 3)
        assert summary["users_failed"] == 0 and (run / "distill/failures.jsonl").read_text() == ""
        # Faults really happened, of every kind, and every request was retried a bounded number of times.
        assert set(stats["outcomes"]) >= {"ok", "429", "500", "timeout", "malformed", "overlong", "empty"}
        assert stats["max_received_per_key"] <= cfg.max_retries + 1
        assert stats["max_answered_per_key"] == 1
        assert summary["rejected_generations"] == stats["outcomes"]["malformed"] + stats["outcomes"]["overlong"] + stats["outcomes"]["empty"]
        assert stats["answered"] == summary["calls"] == steps + summary["rejected_generations"]
        assert stats["requests"] < 2 * steps
        # A second run of the finished stage is skipped; without its outputs it answers everything from
        # the store. Either way no request reaches the server.
        assert distill(RunFolder(run), cfg)["skipped"] is True
        (run / "distill" / "profiles.parquet").unlink()
        again = distill(RunFolder(run), cfg)
        assert again["calls"] == 0 and again["cached"] == summary["calls"] and server.stats()["requests"] == stats["requests"]


def test_failed_users_are_recorded_and_a_rerun_finishes_them(run):
    cfg = DistillConfig(backend="openai", model="fake-model", max_attempts=1, **FAST)
    with FakeOpenAIServer(faults=Faults(rate_empty=0.25, seed=1)) as server:
        cfg.base_url = server.url
        summary = distill(RunFolder(run), cfg)
        failures = [json.loads(line) for line in (run / "distill/failures.jsonl").read_text().splitlines()]
        assert 0 < len(failures) == summary["users_failed"] < 12
        assert all("empty output" in f["reason"] and "rejected after 1 generations" in f["reason"] for f in failures)
        profiles = pd.read_parquet(run / "distill/profiles.parquet")
        assert len(profiles) == 12 - len(failures) and not set(profiles["user_id"]) & {f["user_id"] for f in failures}
        answered = server.stats()["answered"]
        cfg.max_attempts = 4  # the re-run replays the rejected generations and goes on with attempt 2
        summary = distill(RunFolder(run), cfg)
        assert summary["users_failed"] == 0 and summary["cached"] >= answered
        assert server.stats()["max_answered_per_key"] == 1
        _check_complete(run)


def test_unsupported_response_format_falls_back_to_json_in_text(run):
    cfg = DistillConfig(backend="openai", model="fake-model", users=3, **FAST)
    with FakeOpenAIServer(faults=Faults(refuse_formats="json_schema,json_object")) as server:
        cfg.base_url = server.url
        summary = distill(RunFolder(run), cfg)
        assert summary["response_format"] == "text" and summary["users_done"] == 3
        assert server.stats()["outcomes"]["refused_format"] >= 2


def test_dry_run_counts_calls_and_spends_nothing(run, capsys):
    from persona_tune.cli import main as cli

    with FakeOpenAIServer() as server:
        rc = cli(["distill", "--run", str(run), "--backend", "openai", "--base-url", server.url, "--model",
                  "fake-model", "--batch-size", "4", "--dry-run", "--price-per-1k", "0.0025", "0.01"])
        assert rc == 0 and server.stats()["requests"] == 0
    out = capsys.readouterr().out
    assert f"12 users, {_steps(run, 4)} calls" in out and "prompt" in out and "at the given price" in out
    assert not (run / "distill").exists()


# ------------------------------------------------------------ crash safety and secrets

def test_kill_9_then_resume_loses_nothing_and_repeats_no_answered_call(run):
    store = run / "distill/requests.sqlite"
    steps = _steps(run)
    with FakeOpenAIServer(faults=Faults(hold_after=steps // 2)) as server:
        proc = _cli(run, server.url, "--concurrency", "4")
        deadline = time.monotonic() + 120
        while not (server.stats()["answered"] == steps // 2 and _store_rows(store) == steps // 2):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the run never reached the hold point"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert not (run / "distill/profiles.parquet").exists()
        server.release()
        proc = _cli(run, server.url, "--concurrency", "4")
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        stats = server.stats()
    assert f"cached={steps // 2}" in out and f"calls={steps - steps // 2}" in out
    assert stats["answered"] == steps == _store_rows(store) and stats["max_answered_per_key"] == 1
    _check_complete(run)


def test_api_key_is_sent_but_never_written(run):
    secret = "sk-persona-tune-test-9f8e7d6c5b4a"
    faults = Faults(rate_429=0.2, rate_malformed=0.1, seed=5)
    with FakeOpenAIServer(faults=faults) as server:
        proc = _cli(run, server.url, "-v", "--users", "4", env={"OPENAI_API_KEY": secret})
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        assert secret in server.auth_seen
    assert secret not in out and secret not in err
    written = [p for p in run.rglob("*") if p.is_file()]
    assert run / "distill/requests.sqlite" in written
    for path in written:
        assert secret.encode() not in path.read_bytes(), path


def test_identical_requests_of_two_users_are_asked_once(run):
    train = pd.read_parquet(run / "ratings_train.parquet")
    twin = train[train["user_id"] == train["user_id"].min()].assign(user_id=999)
    pd.concat([train, twin]).to_parquet(run / "ratings_train.parquet", index=False)
    cfg = DistillConfig(backend="openai", model="fake-model", **FAST)
    with FakeOpenAIServer() as server:
        cfg.base_url = server.url
        summary = distill(RunFolder(run), cfg)
        stats = server.stats()
    assert summary["users_done"] == 13 and stats["max_answered_per_key"] == 1
    assert summary["cached"] == len(twin) // 10 + (len(twin) % 10 > 0)  # every step of the twin
    memories = pd.read_parquet(run / "distill/memories.parquet")
    a, b = (memories[memories["user_id"] == u]["explanation"].tolist() for u in (train["user_id"].min(), 999))
    assert a == b


def test_a_wrong_key_stops_the_run_with_one_line_and_is_not_echoed(run):
    wrong = "sk-wrong-key-0123456789"
    with FakeOpenAIServer(faults=Faults(require_key="sk-right")) as server:
        proc = _cli(run, server.url, env={"OPENAI_API_KEY": wrong})
        out, err = proc.communicate(timeout=120)
        stats = server.stats()
    assert proc.returncode == 2 and "HTTP 401" in err and "Traceback" not in err
    assert wrong not in out + err and "Incorrect API key provided: ***" in err
    assert stats["outcomes"]["401"] <= DistillConfig().concurrency  # the requests in flight, not one per user
    assert not (run / "distill/profiles.parquet").exists()


def test_fake_server_embeddings_are_deterministic_unit_vectors():
    import numpy as np
    import openai

    with FakeOpenAIServer(embedding_dim=32) as server:
        client = openai.OpenAI(base_url=server.url, api_key="x", max_retries=0)
        first = client.embeddings.create(model="m", input=["a movie", "another movie"])  # base64 by default
        again = client.embeddings.create(model="m", input="a movie", encoding_format="float")
        small = client.embeddings.create(model="m", input="a movie", dimensions=8)
    a, b = (np.array(d.embedding) for d in first.data)
    assert a.shape == (32,) and np.isclose(np.linalg.norm(a), 1.0) and not np.allclose(a, b)
    assert np.allclose(a, again.data[0].embedding) and len(small.data[0].embedding) == 8


def test_fake_server_hold_caps_admitted_requests_under_concurrency():
    """hold_after=N lets exactly N of many concurrent requests through (the kill -9 test relies on it:
    counting answers already sent let a request received just before the N-th answer through too)."""
    import threading

    import openai

    with FakeOpenAIServer(faults=Faults(hold_after=3, latency=0.2)) as server:
        client = openai.OpenAI(base_url=server.url, api_key="x", max_retries=0, timeout=10)
        results = []

        def ask(i):
            try:
                client.embeddings.create(model="m", input=f"text {i}")
                results.append("ok")
            except openai.APIError:
                results.append("dropped")

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 10
        while server.stats()["outcomes"].get("held", 0) < 5:
            assert time.monotonic() < deadline, server.stats()
            time.sleep(0.02)
        server.release()
        for t in threads:
            t.join(timeout=10)
        stats = server.stats()
    assert stats["answered"] == 3 and stats["outcomes"]["held"] == 5
    assert sorted(results) == ["dropped"] * 5 + ["ok"] * 3
