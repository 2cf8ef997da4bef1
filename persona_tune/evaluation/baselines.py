"""Classical rating predictors on exactly the agents' test rows (RUN/eval/baselines/).

What each predictor is fit on (mu = the global mean). "Non-test ratings" are the run's history
(persona_tune/history.py): with the default ``before_split`` history only those before the cutoff of
the row's user count, so mu, hist_avg and hist_count below are those of the user's bucket.
- global_mean: the mean of every non-test rating of the source log, i.e. sum(hist_avg * hist_count) /
  sum(hist_count) over items.parquet (hist_* exclude the sampled users' test rows).
- user_mean: the mean of the user's own train rows.
- item_mean: items.hist_avg (all non-test ratings of the item); mu for an item without any.
- bias: mu + b_u + b_i (Koren's regularised baseline). b_i = n_i (hist_avg_i - mu) / (lambda_i + n_i)
  from the item's non-test ratings (hist_avg, hist_count); b_u = sum over the user's train rows of
  (r - mu - b_i) / (lambda_u + n_u). Defaults lambda_i = 25, lambda_u = 10.
- knn, mf: the item-kNN and tuned matrix-factorisation references of evaluation/references.py, fitted
  on the same information (the run's history and the user's train rows); left out, with a warning,
  for a run prepared before history.parquet existed.
Predictions are clipped to [1, 5].
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import pandas as pd

from persona_tune.errors import DataError
from persona_tune.evaluation.metrics import grouped_metrics
from persona_tune.evaluation.references import REFERENCES, References
from persona_tune.history import BaselineConfig, History
from persona_tune.runfolder import HISTORY, ITEMS, METRICS, PREDICTIONS, RunFolder, atomic_write_json, atomic_write_parquet
from persona_tune.stage import add_config_arguments, config_from_args, validate

log = logging.getLogger(__name__)

BASIC = ("global_mean", "user_mean", "item_mean", "bias")
PREDICTORS = (*BASIC, *REFERENCES)


@dataclass
class BaselinesConfig(BaselineConfig):
    """The `baselines` stage's options: the fit (BaselineConfig) and the bootstrap (CLI generated from them)."""

    n_boot: int = field(default=1000, metadata={"min": 1, "help": "bootstrap resamples (users) for the CIs"})

    def fit(self) -> BaselineConfig:
        return BaselineConfig(**{f.name: getattr(self, f.name) for f in fields(BaselineConfig)})


def global_mean(items: pd.DataFrame) -> float:
    counts = items["hist_count"].to_numpy(dtype=float)
    avg = items["hist_avg"].to_numpy(dtype=float)
    known = counts > 0
    if not known.any():
        raise DataError("no item has a non-test rating (hist_count is 0 everywhere)", path=ITEMS)
    return float((avg[known] * counts[known]).sum() / counts[known].sum())


def item_bias(items: pd.DataFrame, mu: float, lambda_item: float) -> pd.Series:
    n = items["hist_count"].to_numpy(dtype=float)
    avg = np.nan_to_num(items["hist_avg"].to_numpy(dtype=float), nan=mu)
    return pd.Series(n * (avg - mu) / (lambda_item + n), index=items["item_id"].to_numpy())


def bias_terms(train: pd.DataFrame, items: pd.DataFrame, cfg: BaselineConfig) -> tuple[float, pd.Series, pd.Series]:
    """(mu, b_u by user_id, b_i by item_id) of the bias baseline (see the module docstring)."""
    mu = global_mean(items)
    b_i = item_bias(items, mu, cfg.lambda_item)
    resid = train["rating"].to_numpy(dtype=float) - mu - train["item_id"].map(b_i).fillna(0.0).to_numpy()
    grouped = pd.DataFrame({"user_id": train["user_id"].to_numpy(), "resid": resid}).groupby("user_id")["resid"]
    return mu, grouped.sum() / (cfg.lambda_user + grouped.count()), b_i


def bias_predict(mu: float, b_u: pd.Series, b_i: pd.Series, user_ids, item_ids) -> np.ndarray:
    """mu + b_u + b_i for each (user, item), unclipped (unknown users or items get 0 bias)."""
    return (mu + pd.Series(user_ids).map(b_u).fillna(0.0).to_numpy()
            + pd.Series(item_ids).map(b_i).fillna(0.0).to_numpy())


def predict_baselines(
    train: pd.DataFrame, test: pd.DataFrame, items: pd.DataFrame, cfg: BaselineConfig | None = None,
    history: History | None = None,
) -> pd.DataFrame:
    """``test`` with one column per predictor in PREDICTORS (see the module docstring); ``history``: the
    run's (History.load), else all_time from ``items``."""
    cfg = cfg or BaselineConfig()
    history = history or History.from_items(items)
    out = test.copy()
    mu = history.global_mean()[history.bucket_of(out["user_id"].to_numpy())]
    out["global_mean"] = mu

    user_mean = train.groupby("user_id")["rating"].mean()
    out["user_mean"] = out["user_id"].map(user_mean).fillna(pd.Series(mu, index=out.index))

    avg, _ = history.row_stats(out["user_id"].to_numpy(), out["item_id"].to_numpy())
    out["item_mean"] = np.where(np.isnan(avg), mu, avg)

    bias = history.fit_bias(train, cfg.lambda_item, cfg.lambda_user)
    out["bias"] = bias.predict(out["user_id"], out["item_id"])

    for name in BASIC:
        out[name] = out[name].clip(1.0, 5.0)
    return out


def run(run: RunFolder, cfg: BaselinesConfig) -> dict:
    """The `baselines` stage: every classical baseline on the run's test rows
    (eval/baselines/predictions.parquet + metrics.json); returns metrics.json's content."""
    validate(cfg)  # the one check of the Config (persona_tune/stage.py), before anything is read
    fit = cfg.fit()
    train = run.read_ratings("train")
    test = run.read_ratings("test")
    items = run.read_items(columns=["item_id", "hist_avg", "hist_count"])
    history = History.load(run)
    preds = predict_baselines(train, test, items, fit, history)
    names, missing, fitted = list(PREDICTORS), None, None
    if run.path(HISTORY).is_file():
        references = References(run, cfg.seed)
        refs = references.predictions()[["user_id", "item_id", *REFERENCES]]
        preds = preds.merge(refs, on=["user_id", "item_id"], how="left", validate="one_to_one")
        fitted = references.describe()
    else:
        names = list(BASIC)
        missing = (f"no {HISTORY} (the run was prepared before it existed): the kNN and MF references are left "
                   f"out; prepare the data again into a new --out for them")
        log.warning(missing)
    assignments = run.read_assignments(missing_ok=True)
    persona = assignments.set_index("user_id")["persona"] if assignments is not None else None
    preds.insert(0, "persona", preds["user_id"].map(persona).fillna(-1).astype("int64") if persona is not None else -1)
    profiles = run.read_profiles(missing_ok=True)

    out_dir = run.baselines_dir
    columns = ["persona", "user_id", "item_id", "rating", *names]
    atomic_write_parquet(preds[columns], out_dir / PREDICTIONS)
    metrics = {
        "kind": "baselines",
        "global_mean_rating": global_mean(items),
        "history": history.mode,
        "fit": asdict(fit),
        "references": fitted,
        "references_missing": missing,
        "predictors": {
            name: grouped_metrics(preds, name, profiles=profiles, n_boot=cfg.n_boot, seed=cfg.seed) for name in names
        },
    }
    atomic_write_json(out_dir / METRICS, metrics)
    run.record_stage("baselines", {**asdict(fit), "n_boot": cfg.n_boot, "seed": cfg.seed})
    return metrics


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", required=True, help="run folder")
    add_config_arguments(parser, BaselinesConfig, type_metavars=False)


def main(args: argparse.Namespace) -> int:
    folder, cfg = RunFolder(args.run), config_from_args(BaselinesConfig, args)
    return print_result(folder, cfg, run(folder, cfg))


def print_result(folder: RunFolder, cfg: BaselinesConfig, metrics: dict) -> int:
    """What `persona-tune baselines` prints of ``run``'s result; the exit code."""
    for name, block in metrics["predictors"].items():
        m = block["overall"]
        print(f"{name:<12} RMSE {m['rmse']:.3f} [{m['ci']['rmse'][0]:.3f}, {m['ci']['rmse'][1]:.3f}]  "
              f"MAE {m['mae']:.3f} [{m['ci']['mae'][0]:.3f}, {m['ci']['mae'][1]:.3f}]  n={m['n']}")
    return 0
