"""Classical baselines: a hand computation on a three-item fixture, and the CLI on a prepared run
(with the kNN and MF references of evaluation/references.py, tested in test_eval_references.py)."""

import json
import math

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import mean_squared_error

from persona_tune.cli import main as cli_main
from persona_tune.evaluation import baselines
from persona_tune.evaluation.baselines import BASIC, PREDICTORS, BaselineConfig, BaselinesConfig, predict_baselines
from persona_tune.runfolder import HISTORY, REFERENCE_PREDICTIONS, RunFolder
from tests.fixtures_runs import make_prepared_run


def _hand_fixture():
    items = pd.DataFrame({"item_id": [10, 11, 12], "hist_avg": [4.0, 2.0, np.nan], "hist_count": [4, 2, 0]})
    train = pd.DataFrame({"user_id": [1, 1, 2], "item_id": [10, 11, 10], "rating": [5, 3, 4]})
    test = pd.DataFrame({"user_id": [1, 2], "item_id": [12, 11], "rating": [4, 1]})
    return train, test, items


def test_baselines_match_hand_computation():
    train, test, items = _hand_fixture()
    cfg = BaselineConfig(lambda_item=2.0, lambda_user=1.0)
    out = predict_baselines(train, test, items, cfg)
    mu = (4 * 4.0 + 2 * 2.0) / 6  # 10/3: every non-test rating, via hist_avg * hist_count
    assert out["global_mean"].tolist() == pytest.approx([mu, mu])
    assert out["user_mean"].tolist() == pytest.approx([4.0, 4.0])
    assert out["item_mean"].tolist() == pytest.approx([mu, 2.0])  # item 12 has no rating -> mu
    # b_10 = 4 (4 - 10/3) / (2 + 4) = 4/9; b_11 = 2 (2 - 10/3) / (2 + 2) = -2/3; b_12 = 0
    # b_u1 = ((5 - 10/3 - 4/9) + (3 - 10/3 + 2/3)) / (1 + 2) = 14/27; b_u2 = (4 - 10/3 - 4/9) / 2 = 1/9
    assert out["bias"].tolist() == pytest.approx([10 / 3 + 14 / 27, 10 / 3 + 1 / 9 - 2 / 3])
    assert list(out.columns) == ["user_id", "item_id", "rating", *BASIC]


def test_baselines_are_clipped():
    train, test, items = _hand_fixture()
    train = train.assign(rating=[5, 5, 5])
    test = test.assign(item_id=[10, 10])
    out = predict_baselines(train, test, items, BaselineConfig(lambda_item=0.0, lambda_user=0.0))
    assert out[list(BASIC)].to_numpy().min() >= 1.0 and out[list(BASIC)].to_numpy().max() == 5.0


def test_a_run_without_history_leaves_the_references_out_with_a_warning(tmp_path, caplog):
    run = RunFolder(make_prepared_run(tmp_path, n_users=12))
    run.path(HISTORY).unlink()  # a run prepared before history.parquet existed
    metrics = baselines.run(run, BaselinesConfig(n_boot=20))
    assert list(metrics["predictors"]) == list(BASIC)
    assert "no history.parquet" in metrics["references_missing"] and "no history.parquet" in caplog.text
    assert not run.path(REFERENCE_PREDICTIONS).exists()
    # The report of such a run pairs its cells with the four baselines only, never an old `mf` column.
    from persona_tune.evaluation.report import paired_cells, references_note

    preds = pd.read_parquet(run.baseline_predictions)
    preds.assign(mf=3.0).to_parquet(run.baseline_predictions, index=False)
    cell = run.eval_variant_dir("agent")
    cell.mkdir(parents=True)
    preds[["user_id", "item_id", "rating"]].assign(mode="scoring", prediction=3.5).to_parquet(
        cell / "predictions.parquet", index=False)
    [c] = paired_cells(run, n_boot=20)
    assert list(c["paired"]) == list(BASIC)
    assert references_note(run).startswith("No kNN or MF reference")


def test_baselines_cli_writes_contract(tmp_path, capsys):
    run = make_prepared_run(tmp_path, n_users=12)
    assert cli_main(["baselines", "--run", str(run), "--n-boot", "50"]) == 0
    printed = capsys.readouterr().out
    assert all(f"{name} " in printed for name in PREDICTORS)
    preds = pd.read_parquet(run / "eval/baselines/predictions.parquet")
    test = pd.read_parquet(run / "ratings_test.parquet")
    assert len(preds) == len(test)
    assert preds[["user_id", "item_id"]].equals(test[["user_id", "item_id"]])
    metrics = json.loads((run / "eval/baselines/metrics.json").read_text())
    assert set(metrics["predictors"]) == set(PREDICTORS) and PREDICTORS == (*BASIC, "knn", "mf")
    assert metrics["references"]["mf"]["n_factors"] > 0 and metrics["references_missing"] is None
    # The references' own cache holds the same predictions.
    refs = pd.read_parquet(run / REFERENCE_PREDICTIONS)
    np.testing.assert_array_equal(refs[["knn", "mf"]].to_numpy(), preds[["knn", "mf"]].to_numpy())
    for name in PREDICTORS:
        m = metrics["predictors"][name]["overall"]
        assert m["rmse"] == pytest.approx(math.sqrt(mean_squared_error(preds["rating"], preds[name])))
        assert m["urr"] == 0.0 and m["ci"]["rmse"][0] <= m["rmse"] <= m["ci"]["rmse"][1]
    # The bias baseline uses more information than the global mean.
    assert metrics["predictors"]["bias"]["overall"]["rmse"] < metrics["predictors"]["global_mean"]["overall"]["rmse"]
    # The removed hand-written MF's options are gone: one clear line, not a traceback.
    with pytest.raises(SystemExit) as exit_:
        cli_main(["baselines", "--run", str(run), "--mf-epochs", "100"])
    assert exit_.value.code == 2 and "unrecognized arguments: --mf-epochs" in capsys.readouterr().err
