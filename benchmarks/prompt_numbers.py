"""How far the numbers already in the prompt go: RMSE of rules that read them, on a run's test rows.

The offline profile (M_s) states the user's average rating and how far above or below the item's
historical average the user rates; the item text states the item's historical average (as known at
the cutoff of the row's user under the run's history mode). A rule that
adds the two is what a fine-tuned agent would have to learn to reach the bias baseline.

    python benchmarks/prompt_numbers.py runs/ml1m-cpu [--rows eval/persona-msml/predictions.parquet]
"""

from __future__ import annotations

import argparse
import re

import numpy as np
import pandas as pd

from persona_tune.history import History
from persona_tune.runfolder import RunFolder

AVERAGE = re.compile(r"([\d.]+) stars on average")
OFFSET = re.compile(r"I rate ([\d.]+) stars (higher|lower) than other viewers")


def stated_numbers(profiles: pd.DataFrame) -> pd.DataFrame:
    """user_id, stated_average, stated_offset parsed from the profile text (NaN where not stated)."""
    def number(pattern: re.Pattern, text: str, signed: bool = False) -> float:
        m = pattern.search(text)
        if not m:
            return float("nan")
        value = float(m.group(1))
        return -value if signed and m.group(2) == "lower" else value

    return pd.DataFrame({
        "user_id": profiles["user_id"],
        "stated_average": [number(AVERAGE, t) for t in profiles["profile"]],
        "stated_offset": [number(OFFSET, t, signed=True) for t in profiles["profile"]],
    })


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run")
    parser.add_argument("--rows", default=None, help="score only the rows of this predictions file (relative to RUN)")
    args = parser.parse_args()
    run = RunFolder(args.run)
    test = run.read_ratings("test")
    if args.rows:
        rows = pd.read_parquet(run.root / args.rows, columns=["user_id", "item_id"]).drop_duplicates()
        test = test.merge(rows, on=["user_id", "item_id"])
    data = test.merge(stated_numbers(run.read_profiles()), on="user_id")
    # The item average each prompt states: at the cutoff of the row's user (persona_tune/history.py).
    data["hist_avg"] = History.load(run).row_stats(data["user_id"].to_numpy(), data["item_id"].to_numpy())[0]
    mu = float(data["hist_avg"].mean())
    rules = {
        "the user's stated average": data["stated_average"],
        "the item's historical average": data["hist_avg"].fillna(mu),
        "item historical average + the user's stated offset": (data["hist_avg"].fillna(mu) + data["stated_offset"]),
    }
    print(f"{len(data)} test rows, {data['user_id'].nunique()} users")
    for name, pred in rules.items():
        pred = pred.clip(1, 5)
        rmse = float(np.sqrt(((pred - data["rating"]) ** 2).mean()))
        mae = float((pred - data["rating"]).abs().mean())
        print(f"{name:<55} RMSE {rmse:.3f}  MAE {mae:.3f}")


if __name__ == "__main__":
    main()
