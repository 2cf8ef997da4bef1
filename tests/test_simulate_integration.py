"""`persona-tune simulate` on the real MovieLens-1M files in ../shared/data with the tiny model (prompted,
no adapter): the harness end to end, reference recommenders included. Skips without ../shared;
fails under CI=true."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from persona_tune.cli import main as cli_main
from persona_tune.runfolder import RunFolder
from tests.fixtures_runs import require_shared

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]


def prepare_tiny_run(run, tiny) -> None:
    """30 real ML-1M users through prepare, offline distill, hash embed, one persona, tiny-model configs."""
    data = require_shared("data/ml-1m")
    for argv in (["prepare", "--dataset", "ml-1m", "--data-dir", str(data), "--ratings-file",
                  "ratings.partial-users0001-2999.dat", "--out", str(run), "--n-users", "30", "--seed", "0"],
                 ["distill", "--run", str(run), "--backend", "offline", "--no-progress"],
                 ["embed", "--run", str(run), "--backend", "hash"],
                 ["personas", "--run", str(run), "--k", "1"],
                 ["configs", "--run", str(run), "--family", "tiny", "--", f"model_dir={tiny / 'model'}"]):
        assert cli_main(argv) == 0, argv


def test_simulate_on_ml1m_with_the_tiny_model(tmp_path, tiny):
    run = tmp_path / "run"
    prepare_tiny_run(run, tiny)
    argv = ["simulate", "--run", str(run), "--variant", "prompted", "--users", "4", "--candidates", "8",
            "--n-boot", "100", "--no-progress"]
    assert cli_main(argv) == 0, argv
    sim = RunFolder(run).simulation("prompted")
    metrics = json.loads(sim.metrics.read_text())
    assert metrics["users"] == 4 and len(metrics["ranked_recommenders"]) == 8
    preds = pd.read_parquet(sim.predictions)
    items = set(pd.read_parquet(run / "items.parquet")["item_id"])
    assert set(preds["item_id"]) <= items and preds["expected_rating"].between(1, 5).all()
    # Top-k slates hold items the user has no train row for; re-rankings hold held-out items only.
    train = pd.read_parquet(run / "ratings_train.parquet")
    seen = set(zip(train["user_id"], train["item_id"]))
    topk = preds[~preds["recommender"].str.endswith("@heldout")]
    assert not any((u, i) in seen for u, i in zip(topk["user_id"], topk["item_id"]))
    assert preds[preds["recommender"].str.endswith("@heldout")]["true_rating"].notna().all()
    classical = metrics["fidelity"]["classical"]
    assert classical["taste_auc"]["n_users"] >= 1 and 0 <= classical["distribution_w1"]["value"] < 4
    assert metrics["timing"]["reused"] == 0 and metrics["timing"]["scored"] > 0  # a first run reuses nothing


def test_validity_protocol_on_ml1m_with_the_tiny_model(tmp_path, tiny):
    """`simulate --validity` on real ML-1M rows: 16 recommenders rank 5 users' whole held-out sets, the
    tiny prompted agent (resumable parts) beside the classical simulator and the nulls."""
    run = tmp_path / "run"
    prepare_tiny_run(run, tiny)
    validity = ["simulate", "--run", str(run), "--validity", "--variant", "prompted", "--family", "tiny",
                "--users", "5", "--candidates", "2", "--negatives", "1", "--n-boot", "200", "--no-progress"]
    assert cli_main(validity) == 0
    sim = RunFolder(run).simulation("validity-prompted")
    results = json.loads(sim.validity.read_text())
    test = pd.read_parquet(run / "ratings_test.parquet")
    assert results["users_sampled"] == 5 and len(results["recommenders"]) == 16
    assert results["rows"]["heldout"] == int(test[test["user_id"].isin(
        pd.read_parquet(sim.validity_rows)["user_id"])].shape[0])  # every held-out row
    assert set(results["simulators"]) == {"prompted", "classical", "popularity", "item-blind"}
    assert 0 <= results["n_significant_pairs"] <= 120
    classical = results["simulators"]["classical"]
    assert -1 <= classical["kendall_tau_b"]["value"] <= 1 and classical["fidelity"]["rating_w1"]["value"] < 4
    assert set(results["paired"]) == {"prompted - classical"}
    assert results["timing"]["scored"] == results["rows"]["pairs"]
    # A second call rates nothing again: the agent's scores come from parts/.
    assert cli_main(validity) == 0
    again = json.loads(sim.validity.read_text())
    assert again["timing"]["scored"] == 0 and again["timing"]["reused"] == results["rows"]["pairs"]
    assert again["simulators"]["prompted"]["kendall_tau_b"] == results["simulators"]["prompted"]["kendall_tau_b"]
