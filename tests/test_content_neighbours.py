"""benchmarks/content_neighbours.py: the similar-item residual feature and its comparison with the
bias baseline on a synthetic run."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from benchmarks.content_neighbours import collab_residuals, load_history, weighted_residuals
from benchmarks.content_neighbours import main as neighbours_main
from persona_tune.history import History
from persona_tune.cli import main as cli_main
from persona_tune.runfolder import RunFolder
from tests.fixtures_runs import make_persona_run, make_prepared_run


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


def test_collab_residuals_weigh_the_neighbours_by_similarity_squared():
    # (item_id, rating, residual, similarity) per neighbour, as CollabIndex.query returns them
    rows = [((11, 4, 1.0, 0.5), (12, 2, -2.0, 1.0)), ()]
    assert collab_residuals(rows) == pytest.approx([(0.25 * 1.0 + 1.0 * -2.0) / 1.25, 0.0])


def test_history_read_as_all_time_is_the_all_time_runs(tmp_path):
    before = RunFolder(make_prepared_run(tmp_path / "a", history="before_split"))
    all_time = History.load(make_prepared_run(tmp_path / "b", history="all_time"))
    read = load_history(before, "all_time")
    assert read.mode == "all_time" and History.load(before).mode == "before_split"
    known = all_time.count[0] > 0
    np.testing.assert_array_equal(read.item_ids[read.count[0] > 0], all_time.item_ids[known])
    np.testing.assert_allclose(read.avg[0][read.count[0] > 0], all_time.avg[0][known])


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
    for name in ("retrieved memory", "text neighbours 10", "rating neighbours 50", "item-kNN reference 50"):
        block = results[name]
        assert block["lo"] <= block["diff"] <= block["hi"], (name, block)
    assert "bias + residual vs bias" in capsys.readouterr().out

