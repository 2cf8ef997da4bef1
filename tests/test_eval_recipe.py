"""The persona_eval recipe through `tune run` (subprocess), in both modes, resuming per persona."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from persona_tune.evaluation.baselines import global_mean

REPO = Path(__file__).resolve().parent.parent
TUNE = str(Path(sys.executable).with_name("tune"))


def tune_eval(run: Path, tiny: Path, *overrides: str, launcher=(TUNE, "run", "persona_eval"), config="tiny_persona/eval",
              cwd=None):
    cmd = [*launcher, "--config", config, f"run_dir={run}", f"model_dir={tiny / 'model'}",
           "metrics.n_boot=50", "batching.progress=False", "num_threads=1", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd or REPO, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.slow
@pytest.mark.recipe
def test_recipe_both_modes_and_resume(tmp_path_factory, eval_run):
    run, tiny = eval_run
    tune_eval(run, tiny, "mode=both", "max_rows=12", cwd=tmp_path_factory.mktemp("cwd"))
    out = run / "eval" / "persona"
    preds = pd.read_parquet(out / "predictions.parquet")
    metrics = json.loads((out / "metrics.json").read_text())

    test = pd.read_parquet(run / "ratings_test.parquet")
    personas = pd.read_parquet(run / "personas/assignments.parquet").set_index("user_id")["persona"]
    assert set(preds["mode"]) == {"scoring", "paper"} and set(preds["persona"]) == {0, 1}
    for mode, block in preds.groupby("mode"):
        assert not block.duplicated(["user_id", "item_id"]).any()
        merged = block.merge(test, on=["user_id", "item_id"], suffixes=("", "_true"))
        assert len(merged) == len(block) and (merged["rating"] == merged["rating_true"]).all()
        assert (block["persona"] == block["user_id"].map(personas)).all()
    scoring = preds[preds["mode"] == "scoring"]
    np.testing.assert_allclose(scoring[["p1", "p2", "p3", "p4", "p5"]].sum(axis=1), 1.0, atol=1e-6)
    assert scoring["expected_rating"].between(1, 5).all() and scoring["argmax_rating"].isin([1, 2, 3, 4, 5]).all()
    paper = preds[preds["mode"] == "paper"]
    assert paper["raw_text"].map(type).eq(str).all()

    m = metrics["modes"]["scoring"]["prediction"]["overall"]
    assert m["urr"] == 0.0 and m["n"] == len(scoring)
    assert m["rmse"] == pytest.approx(float(np.sqrt(((scoring.expected_rating - scoring.rating) ** 2).mean())))
    urr = metrics["modes"]["paper"]["prediction"]["overall"]["urr"]
    assert urr == pytest.approx(paper["parsed_rating"].isna().mean())
    assert set(metrics["modes"]["scoring"]["prediction"]["by"]) >= {"persona", "activity", "conformity", "diversity"}
    assert set(metrics["train_rows"]) == {"0", "1"}

    # Run again (the recipe file run directly by python): personas with predictions are skipped; the
    # metrics are recomputed, now scoring unparsable answers as the global mean.
    proc = tune_eval(run, tiny, "mode=both", "max_rows=12", "metrics.unparsable=fill", "metrics.fill_value=global_mean",
                     launcher=(sys.executable, "recipes/persona_eval.py"), config="configs/tiny_persona/eval.yaml")
    assert (proc.stderr + proc.stdout).count("predictions exist, skipped") == 2
    assert pd.read_parquet(out / "predictions.parquet").equals(preds)
    filled = json.loads((out / "metrics.json").read_text())
    assert filled["fill_value"] == pytest.approx(global_mean(pd.read_parquet(run / "items.parquet")))
    paper_filled = filled["modes"]["paper"]["prediction"]["overall"]
    assert paper_filled["n_scored"] == len(paper) and paper_filled["urr"] == pytest.approx(urr)
    expected = paper["parsed_rating"].fillna(filled["fill_value"])
    assert paper_filled["mae"] == pytest.approx(float((expected - paper["rating"]).abs().mean()))
