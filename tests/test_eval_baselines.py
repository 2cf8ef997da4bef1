"""Classical baselines: a hand computation on a three-item fixture, and the CLI on a prepared run."""

import json
import math
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import mean_squared_error

from persona_tune.cli import main as cli_main
from persona_tune.evaluation.baselines import (
    MF_REGS,
    PREDICTORS,
    BaselineConfig,
    choose_mf_reg,
    predict_baselines,
    run_baselines,
)
from persona_tune.runfolder import RunFolder
from tests.fixtures_runs import make_prepared_run


def _hand_fixture():
    items = pd.DataFrame({"item_id": [10, 11, 12], "hist_avg": [4.0, 2.0, np.nan], "hist_count": [4, 2, 0]})
    train = pd.DataFrame({"user_id": [1, 1, 2], "item_id": [10, 11, 10], "rating": [5, 3, 4]})
    test = pd.DataFrame({"user_id": [1, 2], "item_id": [12, 11], "rating": [4, 1]})
    return train, test, items


def test_baselines_match_hand_computation():
    train, test, items = _hand_fixture()
    cfg = BaselineConfig(lambda_item=2.0, lambda_user=1.0, mf_epochs=50)
    out = predict_baselines(train, test, items, cfg)
    mu = (4 * 4.0 + 2 * 2.0) / 6  # 10/3: every non-test rating, via hist_avg * hist_count
    assert out["global_mean"].tolist() == pytest.approx([mu, mu])
    assert out["user_mean"].tolist() == pytest.approx([4.0, 4.0])
    assert out["item_mean"].tolist() == pytest.approx([mu, 2.0])  # item 12 has no rating -> mu
    # b_10 = 4 (4 - 10/3) / (2 + 4) = 4/9; b_11 = 2 (2 - 10/3) / (2 + 2) = -2/3; b_12 = 0
    # b_u1 = ((5 - 10/3 - 4/9) + (3 - 10/3 + 2/3)) / (1 + 2) = 14/27; b_u2 = (4 - 10/3 - 4/9) / 2 = 1/9
    assert out["bias"].tolist() == pytest.approx([10 / 3 + 14 / 27, 10 / 3 + 1 / 9 - 2 / 3])
    # Item 12 has no train row: q = 0, so MF falls back to the bias baseline; item 11 does not.
    assert out["mf"].iloc[0] == pytest.approx(out["bias"].iloc[0])
    assert out["mf"].iloc[1] != pytest.approx(out["bias"].iloc[1])


def test_mf_is_seeded_and_clipped():
    train, test, items = _hand_fixture()
    a = predict_baselines(train, test, items, BaselineConfig(seed=3, mf_epochs=30))
    b = predict_baselines(train, test, items, BaselineConfig(seed=3, mf_epochs=30))
    pd.testing.assert_frame_equal(a, b)
    assert a[list(PREDICTORS)].to_numpy().min() >= 1.0 and a[list(PREDICTORS)].to_numpy().max() <= 5.0


def test_mf_l2_weight_is_chosen_on_a_validation_slice(tmp_path):
    run = RunFolder(make_prepared_run(tmp_path, n_users=12))
    train, items = run.read_table("ratings_train.parquet"), run.read_table("items.parquet")
    cfg = BaselineConfig(mf_epochs=40)
    chosen = choose_mf_reg(train, items, cfg)
    assert chosen in MF_REGS
    # Choosing is the same as fixing the chosen weight.
    test = run.read_table("ratings_test.parquet")
    pd.testing.assert_frame_equal(predict_baselines(train, test, items, cfg),
                                  predict_baselines(train, test, items, replace(cfg, mf_reg=chosen)))
    metrics = run_baselines(run.root, cfg, n_boot=20)
    assert metrics["fit"]["mf_reg"] == chosen


def test_baselines_cli_writes_contract(tmp_path, capsys):
    run = make_prepared_run(tmp_path, n_users=12)
    assert cli_main(["baselines", "--run", str(run), "--n-boot", "50", "--mf-epochs", "100"]) == 0
    assert "bias" in capsys.readouterr().out
    preds = pd.read_parquet(run / "eval/baselines/predictions.parquet")
    test = pd.read_parquet(run / "ratings_test.parquet")
    assert len(preds) == len(test)
    assert preds[["user_id", "item_id"]].equals(test[["user_id", "item_id"]])
    metrics = json.loads((run / "eval/baselines/metrics.json").read_text())
    for name in PREDICTORS:
        m = metrics["predictors"][name]["overall"]
        assert m["rmse"] == pytest.approx(math.sqrt(mean_squared_error(preds["rating"], preds[name])))
        assert m["urr"] == 0.0 and m["ci"]["rmse"][0] <= m["rmse"] <= m["ci"]["rmse"][1]
    # The bias baseline uses more information than the global mean.
    assert metrics["predictors"]["bias"]["overall"]["rmse"] < metrics["predictors"]["global_mean"]["overall"]["rmse"]
