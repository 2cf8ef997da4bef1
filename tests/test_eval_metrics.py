"""Metrics agree with sklearn; bootstrap CIs are reproducible and bracket the point estimate."""

import math

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import mean_absolute_error, mean_squared_error

from persona_tune.errors import ConfigError
from persona_tune.evaluation.metrics import bootstrap_ci, grouped_metrics, metrics_with_ci, point_metrics


def _frame(seed=0, n_users=30, missing=0.1):
    rng = np.random.default_rng(seed)
    users = np.repeat(np.arange(n_users), rng.integers(3, 12, n_users))
    rating = rng.integers(1, 6, users.size)
    pred = np.clip(rating + rng.normal(0, 1, users.size), 1, 5)
    pred[rng.random(users.size) < missing] = np.nan
    return pd.DataFrame({"user_id": users, "rating": rating, "pred": pred, "persona": users % 3})


def test_point_metrics_match_sklearn_excluding_unparsable():
    df = _frame()
    ok = df["pred"].notna()
    m = point_metrics(df["rating"], df["pred"])
    assert m["rmse"] == pytest.approx(math.sqrt(mean_squared_error(df.rating[ok], df.pred[ok])))
    assert m["mae"] == pytest.approx(mean_absolute_error(df.rating[ok], df.pred[ok]))
    assert m["urr"] == pytest.approx(1 - ok.mean())
    assert (m["n"], m["n_scored"]) == (len(df), int(ok.sum()))


def test_point_metrics_fill_rule():
    df = _frame()
    filled = df["pred"].fillna(3.0)
    m = point_metrics(df["rating"], df["pred"], unparsable="fill", fill_value=3.0)
    assert m["rmse"] == pytest.approx(math.sqrt(mean_squared_error(df.rating, filled)))
    assert m["mae"] == pytest.approx(mean_absolute_error(df.rating, filled))
    assert m["n_scored"] == len(df)
    with pytest.raises(ConfigError):
        point_metrics(df["rating"], df["pred"], unparsable="fill")
    with pytest.raises(ConfigError):
        point_metrics(df["rating"], df["pred"], unparsable="drop")


def test_bootstrap_reproducible_and_brackets_estimate():
    df = _frame(seed=1)
    a = bootstrap_ci(df, "pred", n_boot=300, seed=7)
    b = bootstrap_ci(df, "pred", n_boot=300, seed=7)
    c = bootstrap_ci(df, "pred", n_boot=300, seed=8)
    assert a == b and a != c
    m = point_metrics(df["rating"], df["pred"])
    for k in ("rmse", "mae", "urr"):
        lo, hi = a[k]
        assert lo <= m[k] <= hi and lo < hi


def test_bootstrap_resamples_users_not_rows():
    # One user with all the error: resampling users gives a far wider RMSE interval than a user-free view.
    df = pd.DataFrame({"user_id": [0] * 50 + list(range(1, 51)), "rating": [1] * 100})
    df["pred"] = [5.0] * 50 + [1.0] * 50
    lo, hi = bootstrap_ci(df, "pred", n_boot=500, seed=0)["rmse"]
    assert lo == 0.0 and hi > 3.3  # a row bootstrap would give about 2.6-3.0


def test_grouped_metrics_by_persona_and_traits():
    df = _frame(seed=2)
    profiles = pd.DataFrame({"user_id": np.arange(30), "activity": ["low", "high"] * 15,
                             "conformity": "medium", "diversity": ["low", "medium", "high"] * 10})
    out = grouped_metrics(df, "pred", profiles=profiles, n_boot=50, seed=0)
    assert out["overall"]["n"] == len(df)
    assert set(out["by"]) == {"persona", "activity", "conformity", "diversity"}
    for level, m in out["by"]["persona"].items():
        sub = df[(df.persona == int(level)) & df.pred.notna()]
        assert m["rmse"] == pytest.approx(math.sqrt(mean_squared_error(sub.rating, sub.pred)))
    assert sum(m["n"] for m in out["by"]["activity"].values()) == len(df)
    assert metrics_with_ci(df, "pred", n_boot=10)["n_users"] == 30
