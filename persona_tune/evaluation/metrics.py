"""RMSE, MAE and URR with bootstrap confidence intervals that resample users.

URR (unrelated response rate) is the share of rows whose answer held no rating. Unparsable rows
enter RMSE/MAE by the ``unparsable`` rule: "exclude" (the paper's choice, the default) drops them;
"fill" scores them as ``fill_value`` (a constant, e.g. the global mean rating).

Confidence intervals: percentile bootstrap over users (a user's rows stay together, since rows of
one user are not independent), seeded, ``n_boot`` resamples. A group's CI resamples that group's users.
"""

from __future__ import annotations

import math
from typing import Iterable

import numpy as np
import pandas as pd

from persona_tune.errors import ConfigError

UNPARSABLE_RULES = ("exclude", "fill")
TRAITS = ("activity", "conformity", "diversity")


def _prepared(y_true, y_pred, unparsable: str, fill_value: float | None):
    y_true = np.asarray(y_true, dtype=float)
    y_pred = np.asarray(y_pred, dtype=float)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true has shape {y_true.shape}, y_pred {y_pred.shape}")
    missing = np.isnan(y_pred)
    if unparsable == "exclude":
        keep = ~missing
        return y_true[keep], y_pred[keep], missing
    if unparsable == "fill":
        if fill_value is None or math.isnan(fill_value):
            raise ConfigError("unparsable='fill' needs a fill_value")
        return y_true, np.where(missing, fill_value, y_pred), missing
    raise ConfigError(f"unparsable must be one of {', '.join(UNPARSABLE_RULES)}, got {unparsable!r}")


def point_metrics(y_true, y_pred, unparsable: str = "exclude", fill_value: float | None = None) -> dict:
    """rmse, mae, urr (a fraction), n (rows), n_scored (rows in RMSE/MAE)."""
    t, p, missing = _prepared(y_true, y_pred, unparsable, fill_value)
    n = int(missing.size)
    err = p - t
    return {
        "rmse": float(np.sqrt(np.mean(err**2))) if err.size else math.nan,
        "mae": float(np.mean(np.abs(err))) if err.size else math.nan,
        "urr": float(missing.mean()) if n else math.nan,
        "n": n,
        "n_scored": int(err.size),
    }


def _per_user_sums(df: pd.DataFrame, pred_col: str, unparsable: str, fill_value: float | None) -> pd.DataFrame:
    pred = df[pred_col].to_numpy(dtype=float)
    missing = np.isnan(pred)
    if unparsable == "fill":
        pred = np.where(missing, fill_value, pred)
        scored = np.ones_like(missing)
    else:
        scored = ~missing
    err = np.where(scored, pred - df["rating"].to_numpy(dtype=float), 0.0)
    sums = pd.DataFrame(
        {"user_id": df["user_id"].to_numpy(), "sse": err**2, "sae": np.abs(err),
         "n_scored": scored.astype(float), "n_missing": missing.astype(float), "n": 1.0}
    )
    return sums.groupby("user_id", sort=True).sum()


def bootstrap_ci(
    df: pd.DataFrame,
    pred_col: str,
    *,
    unparsable: str = "exclude",
    fill_value: float | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict:
    """Percentile CIs of rmse, mae, urr, resampling users with replacement. Needs user_id, rating."""
    _prepared([], [], unparsable, fill_value)  # validates the rule
    sums = _per_user_sums(df, pred_col, unparsable, fill_value)
    if sums.empty or n_boot <= 0:
        return {k: [math.nan, math.nan] for k in ("rmse", "mae", "urr")}
    rng = np.random.default_rng(seed)
    n_users = len(sums)
    # How often each user is drawn in each resample: [n_boot, n_users].
    weights = rng.multinomial(n_users, np.full(n_users, 1.0 / n_users), size=n_boot).astype(float)
    totals = weights @ sums[["sse", "sae", "n_scored", "n_missing", "n"]].to_numpy()
    with np.errstate(invalid="ignore", divide="ignore"):
        stats = {
            "rmse": np.sqrt(totals[:, 0] / totals[:, 2]),
            "mae": totals[:, 1] / totals[:, 2],
            "urr": totals[:, 3] / totals[:, 4],
        }
    alpha = (1.0 - level) / 2.0
    return {
        k: [float(np.nanquantile(v, alpha)), float(np.nanquantile(v, 1.0 - alpha))] if np.isfinite(v).any()
        else [math.nan, math.nan]
        for k, v in stats.items()
    }


def metrics_with_ci(df: pd.DataFrame, pred_col: str, **kwargs) -> dict:
    """Point metrics plus ``ci`` (see bootstrap_ci) for one prediction column."""
    point_kwargs = {k: kwargs[k] for k in ("unparsable", "fill_value") if k in kwargs}
    out = point_metrics(df["rating"], df[pred_col], **point_kwargs)
    out["n_users"] = int(df["user_id"].nunique())
    out["ci"] = bootstrap_ci(df, pred_col, **kwargs)
    return out


def grouped_metrics(
    df: pd.DataFrame,
    pred_col: str,
    *,
    profiles: pd.DataFrame | None = None,
    group_cols: Iterable[str] = ("persona",),
    **kwargs,
) -> dict:
    """Metrics overall, per persona (and other ``group_cols``) and per trait level.

    ``profiles`` (distill/profiles.parquet) adds per-level metrics of activity, conformity, diversity.
    Returns {"overall": {...}, "by": {column: {level: {...}}}}.
    """
    result = {"overall": metrics_with_ci(df, pred_col, **kwargs), "by": {}}
    frame = df
    if profiles is not None:
        traits = [t for t in TRAITS if t in profiles.columns]
        frame = df.drop(columns=[t for t in traits if t in df.columns]).merge(
            profiles[["user_id", *traits]], on="user_id", how="left"
        )
        group_cols = [*group_cols, *traits]
    for col in group_cols:
        if col not in frame.columns:
            continue
        result["by"][col] = {
            str(level): metrics_with_ci(group, pred_col, **kwargs)
            for level, group in frame.groupby(col, sort=True)
        }
    return result


def paired_rmse_diff(df: pd.DataFrame, pred_col: str, base_col: str, *, n_boot: int = 1000, seed: int = 0,
                     level: float = 0.95) -> dict:
    """RMSE(pred_col) - RMSE(base_col) on the same rows, with a paired percentile CI: each resample
    draws users with replacement and recomputes both RMSEs on the same drawn rows.

    Rows where either prediction is missing are left out of both. Returns {"diff", "lo", "hi", "n"}.
    """
    rows = df.dropna(subset=[pred_col, base_col])
    truth = rows["rating"].to_numpy(dtype=float)
    sums = pd.DataFrame({
        "user_id": rows["user_id"].to_numpy(),
        "a": (rows[pred_col].to_numpy(dtype=float) - truth) ** 2,
        "b": (rows[base_col].to_numpy(dtype=float) - truth) ** 2,
        "n": 1.0,
    }).groupby("user_id", sort=True).sum().to_numpy()
    if not len(sums):
        return {"diff": math.nan, "lo": math.nan, "hi": math.nan, "n": 0}
    total = sums.sum(0)
    diff = float(np.sqrt(total[0] / total[2]) - np.sqrt(total[1] / total[2]))
    lo = hi = math.nan
    if n_boot > 0:
        rng = np.random.default_rng(seed)
        n_users = len(sums)
        weights = rng.multinomial(n_users, np.full(n_users, 1.0 / n_users), size=n_boot).astype(float)
        t = weights @ sums
        draws = np.sqrt(t[:, 0] / t[:, 2]) - np.sqrt(t[:, 1] / t[:, 2])
        alpha = (1.0 - level) / 2.0
        lo, hi = float(np.quantile(draws, alpha)), float(np.quantile(draws, 1.0 - alpha))
    return {"diff": diff, "lo": lo, "hi": hi, "n": int(total[2])}


def metrics_info(cfg, variant: str, adapter_dir: str | None, per_persona_adapter: bool, *,
                 backend: str | None = None, **extra) -> dict:
    """What a variant's metrics.json says was evaluated (variant_metrics' ``info``): the variant, its memory,
    adapter and model (``cfg``: the eval config, or the frozen-trunk recipe's config), then ``extra``."""
    info = {"variant": variant, "memory": cfg.memory, "adapter_dir": adapter_dir}
    if backend is not None:
        info["backend"] = backend
    info |= {"model_component": cfg.model._component_, "model_dir": str(cfg.model_dir),
             "per_persona_adapter": per_persona_adapter}
    return info | extra


def variant_metrics(predictions: pd.DataFrame, info: dict, *, profiles: pd.DataFrame | None,
                    train_rows_per_persona: dict | None = None, unparsable: str = "exclude",
                    fill_value: float | None = None, n_boot: int = 1000, seed: int = 0) -> dict:
    """An evaluated variant's metrics.json: ``info`` (variant, memory, model...) plus, per mode, the
    prediction's metrics overall, per persona and per trait level (scoring mode: the argmax's too)."""
    kwargs = dict(unparsable=unparsable, fill_value=fill_value, n_boot=n_boot, seed=seed)
    out = {**info, "unparsable_rule": unparsable, "fill_value": fill_value, "modes": {},
           "train_rows": train_rows_per_persona or {}}
    for mode, block in predictions.groupby("mode", sort=True):
        out["modes"][mode] = {"prediction": grouped_metrics(block, "prediction", profiles=profiles, **kwargs)}
        if mode == "scoring":
            out["modes"][mode]["argmax"] = grouped_metrics(block, "argmax_rating", profiles=profiles, **kwargs)
    return out


def train_rows_per_persona(run, personas) -> dict:
    """{persona: training rows of its users} from a run folder (empty without personas)."""
    assignments = run.read_assignments(missing_ok=True)
    if assignments is None:
        return {}
    persona_of = assignments.set_index("user_id")["persona"]
    counts = run.read_ratings("train", columns=["user_id"])["user_id"].map(persona_of).value_counts()
    return {str(p): int(counts.get(p, 0)) for p in personas}


def residual_over_bias(frame: pd.DataFrame, features: np.ndarray, make_model, *, n_folds: int = 5,
                       n_boot: int = 1000, seed: int = 0) -> dict:
    """The bias baseline plus a model of its residual on ``features`` ([n, d], one row per row of
    ``frame``), each user's rows predicted by a model fitted on the other users' (GroupKFold), against
    the bias baseline alone on the same rows: :func:`paired_rmse_diff` of the two.

    ``frame`` has ``user_id``, ``rating`` and ``bias``; ``make_model()`` returns a fresh scikit-learn
    regressor. The sum is clipped to 1-5.
    """
    from sklearn.model_selection import GroupKFold

    residual = frame["rating"].to_numpy(dtype=float) - frame["bias"].to_numpy(dtype=float)
    fitted = np.zeros(len(frame))
    for fit, held in GroupKFold(n_splits=n_folds).split(features, groups=frame["user_id"]):
        fitted[held] = make_model().fit(features[fit], residual[fit]).predict(features[held])
    scored = frame.assign(bias_plus_residual=np.clip(frame["bias"].to_numpy(dtype=float) + fitted, 1, 5))
    return paired_rmse_diff(scored, "bias_plus_residual", "bias", n_boot=n_boot, seed=seed)
