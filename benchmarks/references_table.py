"""The bias baseline, the item-kNN reference and the tuned MF on every test row of one or more run
folders, with bootstrap CIs over users and paired differences (docs/results.md, "Classical references").

Reads each run's eval/baselines/ (run `persona-tune baselines --run RUN` first) and the MF tuning of
references/mf_tuning.json.

    python benchmarks/references_table.py runs/ml1m-before_split runs/ml1m-all_time \\
        --also-rows 2000 --json docs/results/ml1m-references.json

``--also-rows N`` adds each run's numbers on the N rows a cell with eval.max_rows N (eval.seed 0) scores.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd

from persona_tune.evaluation.metrics import metrics_with_ci, paired_rmse_diff
from persona_tune.history import history_mode
from persona_tune.prompts import subsample_per_user
from persona_tune.runfolder import REFERENCE_TUNING, RunFolder

PREDICTORS = ("bias", "knn", "mf")
PAIRS = (("knn", "bias"), ("mf", "bias"), ("mf", "knn"))


def _r(x: float) -> float:
    return round(float(x), 4)


def summarise(run: RunFolder, n_boot: int = 1000, max_rows: int | None = None) -> dict:
    preds = pd.read_parquet(run.baseline_predictions)
    if max_rows:
        test = run.read_ratings("test", columns=["user_id", "item_id"])
        preds = subsample_per_user(test, max_rows, seed=0).merge(preds, on=["user_id", "item_id"], validate="one_to_one")
    missing = [p for p in PREDICTORS if p not in preds]
    if missing:
        raise SystemExit(f"{run.baseline_predictions} has no {', '.join(missing)}: run `persona-tune baselines "
                         f"--run {run.root}` again")
    tuning = json.loads(run.path(REFERENCE_TUNING).read_text())
    out = {"run": run.root.name, "history": history_mode(run), "rows": len(preds),
           "users": int(preds["user_id"].nunique()),
           "mf_tuning": {"chosen": tuning["chosen"], "validation": tuning["validation"],
                         "grid": [{**g, "rmse": _r(g["rmse"])} for g in tuning["grid"]]}}
    for name in PREDICTORS:
        m = metrics_with_ci(preds, name, n_boot=n_boot, seed=0)
        out[name] = {"rmse": _r(m["rmse"]), "ci": [_r(c) for c in m["ci"]["rmse"]], "mae": _r(m["mae"])}
    out["paired"] = {f"{a}-{b}": {k: _r(v) for k, v in paired_rmse_diff(preds, a, b, n_boot=n_boot).items() if k != "n"}
                     for a, b in PAIRS}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=RunFolder)
    parser.add_argument("--also-rows", type=int, default=None, help="also score the rows of eval.max_rows N")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    sizes = [None] + ([args.also_rows] if args.also_rows else [])
    results = [summarise(run, max_rows=rows) for rows in sizes for run in args.runs]
    print("| history | rows | bias | item-kNN | MF | kNN − bias | MF − bias | MF − kNN |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        cells = [f"{r[p]['rmse']:.3f} [{r[p]['ci'][0]:.3f}, {r[p]['ci'][1]:.3f}]" for p in PREDICTORS]
        diffs = [f"{d['diff']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}]" for d in r["paired"].values()]
        print(f"| {r['history']} | {r['rows']} | " + " | ".join(cells + diffs) + " |")
    if args.json:
        args.json.write_text(json.dumps({"references": results}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
