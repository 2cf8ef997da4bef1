"""benchmarks/content_neighbours.py: the similar-item residual feature and its comparison with the
bias baseline on a synthetic run."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from benchmarks.content_neighbours import main as neighbours_main
from benchmarks.content_neighbours import weighted_residuals
from persona_tune.cli import main as cli_main
from persona_tune.runfolder import RunFolder
from tests.fixtures_runs import make_persona_run


def test_weighted_residuals_averages_the_nearest_items_by_similarity_squared():
    vectors = np.array([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0], [-1.0, 0.0]])  # items 10, 11, 12, 13
    index = {10: 0, 11: 1, 12: 2, 13: 3}
    train = pd.DataFrame({"user_id": [1, 1, 1], "item_id": [11, 12, 13], "residual": [1.0, -2.0, 5.0]})
    test = pd.DataFrame({"user_id": [1, 1], "item_id": [10, 99]})  # 99: no vector, feature 0
    nearest_two = weighted_residuals(test, train, vectors, index, k=2)
    # item 10's neighbours: 11 (sim 0.6) and 12 (sim 0); 13 (sim -1) is third
    assert nearest_two == pytest.approx([1.0, 0.0])
    all_three = weighted_residuals(test, train, vectors, index, k=3)
    assert all_three[0] == pytest.approx(1.0)  # a negative similarity weighs nothing


def test_script_scores_the_bias_baseline_as_the_baselines_stage_does(tmp_path, capsys):
    run = make_persona_run(tmp_path / "runs", n_users=8, k=2)
    assert cli_main(["baselines", "--run", str(run)]) == 0
    out = tmp_path / "neighbours.json"
    assert neighbours_main([str(run), "--json", str(out)]) == 0
    results = json.loads(out.read_text())
    folder = RunFolder(run)
    test = folder.read_ratings("test")
    baselines = pd.read_parquet(folder.eval_variant_dir("baselines") / "predictions.parquet")
    assert results["rows"] == len(test) == len(baselines)
    bias_rmse = float(np.sqrt(np.mean((np.clip(baselines["bias"], 1, 5) - baselines["rating"]) ** 2)))
    assert results["bias_rmse"] == pytest.approx(bias_rmse, abs=1e-4)
    for name in ("retrieved memory", "text neighbours 10", "rating neighbours 50"):
        block = results[name]
        assert block["lo"] <= block["diff"] <= block["hi"], (name, block)
    assert "bias + residual vs bias" in capsys.readouterr().out

