"""How much a user's ratings of *similar* items add to the bias baseline on a run's test rows
(docs/results.md: why no agent beats the bias baseline).

For each test row, a feature is the user's residual over the bias baseline on their most similar
training items, weighted by similarity squared:
- `retrieved memory`: the top-1 memory the agents' prompts carry (memory/retrieved.parquet);
- `text neighbours K`: the K most similar of the user's training items by the run's item
  embeddings (memory/item_vectors.npy, MiniLM for the study), the signal a prompt of the user's
  history could hold at best through the text;
- `rating neighbours K`: the same by collaborative similarity: the shrunk Pearson-baseline similarity
  of the items' residuals in every rating of the run's history (all users of the log, before the
  user's cutoff; persona_tune/history.py's CollabIndex, the kNN reference's similarity), a reference
  for what the rows hold beyond the bias baseline at all. (Until issue 24 this similarity came from
  the 200 sampled users' train rows only, where the median item has 3 raters: it found almost nothing.)
The bias baseline plus a linear fit of the residual on each feature, cross-fitted over users
(5 folds), is compared with the bias baseline on the same rows, paired over users. The item-kNN
reference itself (bias + the similarity-weighted mean of the 50 nearest residuals, nothing fitted)
is compared the same way. The bias baseline and the similarity use the run's history mode, or
``--history all_time`` (every non-test rating, whatever the run's mode).

    python benchmarks/content_neighbours.py runs/ml1m --rows-of trunk-nall-prior-single_max-ms
    python benchmarks/content_neighbours.py runs/ml1m --max-rows 2000   # the same rows, without the cell
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.linear_model import LinearRegression
from sklearn.preprocessing import normalize

from persona_tune.evaluation.metrics import paired_rmse_diff, residual_over_bias
from persona_tune.history import HISTORY_MODES, KNN_K, CollabIndex, History
from persona_tune.prompts import subsample_per_user
from persona_tune.runfolder import HISTORY, ITEM_IDS, ITEM_VECTORS, RunFolder

NEIGHBOURS = (10, 50)


def weighted_residuals(test: pd.DataFrame, train: pd.DataFrame, vectors: np.ndarray, index: dict, k: int) -> np.ndarray:
    """Per test row: the user's training residuals on their k nearest items, weights similarity^2."""
    out = np.zeros(len(test))
    by_user = {u: g for u, g in train.groupby("user_id")}
    for n, (user, item) in enumerate(zip(test["user_id"], test["item_id"])):
        if item not in index:
            continue
        mine = by_user[user]
        sims = vectors[mine["item_id"].map(index).to_numpy()] @ vectors[index[item]]
        top = np.argsort(-sims)[:k]
        w = np.maximum(sims[top], 0.0) ** 2
        out[n] = (w * mine["residual"].to_numpy()[top]).sum() / (w.sum() + 1e-9)
    return out


def collab_residuals(neighbours) -> np.ndarray:
    """Per row: its collaborative neighbours' residuals (CollabRows.neighbours), weights similarity^2."""
    out = np.zeros(len(neighbours))
    for n, row in enumerate(neighbours):
        if row:
            sims = np.array([s for *_, s in row])
            resid = np.array([r for _, _, r, _ in row])
            out[n] = (sims ** 2 * resid).sum() / ((sims ** 2).sum() + 1e-9)
    return out


def load_history(run: RunFolder, mode: str | None) -> History:
    """The run's history, or read as ``mode`` (all_time: every history row, whatever the run's mode)."""
    if mode is None or mode == History.load(run).mode:
        return History.load(run)
    rows = run.read_table(HISTORY)
    if mode == "all_time":
        stats = rows.groupby("item_id")["rating"].agg(hist_avg="mean", hist_count="size").reset_index()
        items = run.read_items(columns=["item_id"]).merge(stats, on="item_id", how="outer")
        return History.from_items(items.fillna({"hist_count": 0}), rows)
    return History.before_split(rows, run.read_ratings("test", columns=["user_id", "timestamp"]),
                                run.read_items(columns=["item_id"])["item_id"].to_numpy())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=RunFolder)
    parser.add_argument("--rows-of", default=None, help="score on the rows of this eval cell (default: all test rows)")
    parser.add_argument("--max-rows", type=int, default=None,
                        help="score on the rows a cell with eval.max_rows N (eval.seed 0) scores")
    parser.add_argument("--history", choices=HISTORY_MODES, default=None,
                        help="read the run's history as this mode (default: the run's own)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    run: RunFolder = args.run
    train, test = run.read_ratings("train"), run.read_ratings("test")
    index = CollabIndex(load_history(run, args.history), train)
    train = train.assign(residual=index.train_residual)
    if args.rows_of:
        cell = pd.read_parquet(run.eval_variant_dir(args.rows_of) / "predictions.parquet", columns=["user_id", "item_id"])
        test = test.merge(cell, on=["user_id", "item_id"], validate="one_to_one")
    if args.max_rows:
        test = subsample_per_user(test, args.max_rows, seed=0)
    test = test.reset_index(drop=True)
    collab = index.query(test["user_id"], test["item_id"], k=max(NEIGHBOURS), k_knn=KNN_K)
    test = test.assign(bias=np.clip(collab.bias, 1, 5), knn=np.clip(collab.knn, 1, 5))

    features = {}
    retrieved = run.read_retrieved().query("split == 'test' and rank == 0")
    top1 = test.merge(retrieved, on=["user_id", "item_id"], how="left").merge(
        train[["user_id", "item_id", "residual"]].rename(columns={"item_id": "memory_item_id"}),
        on=["user_id", "memory_item_id"], how="left")
    features["retrieved memory"] = top1["residual"].fillna(0.0).to_numpy()
    ids = pd.read_parquet(run.root / ITEM_IDS)["item_id"]
    text = normalize(np.load(run.root / ITEM_VECTORS))
    text_index = {item: n for n, item in enumerate(ids)}
    for k in NEIGHBOURS:
        features[f"text neighbours {k}"] = weighted_residuals(test, train, text, text_index, k)
        features[f"rating neighbours {k}"] = collab_residuals([row[:k] for row in collab.neighbours])

    truth = test["rating"].to_numpy(float)
    results = {"rows": len(test), "users": int(test["user_id"].nunique()), "history": index.history.mode,
               "bias_rmse": round(float(np.sqrt(np.mean((test["bias"] - truth) ** 2))), 4)}
    knn = paired_rmse_diff(test, "knn", "bias")
    results[f"item-kNN reference {KNN_K}"] = {k: round(v, 4) for k, v in knn.items() if k != "n"}
    print(f"{'item-kNN reference':22s} vs bias: {knn['diff']:+.4f} [{knn['lo']:+.4f}, {knn['hi']:+.4f}]", flush=True)
    for name, x in features.items():
        paired = residual_over_bias(test, x[:, None], LinearRegression)
        results[name] = {k: round(v, 4) for k, v in paired.items() if k != "n"}
        print(f"{name:22s} bias + residual vs bias: {paired['diff']:+.4f} [{paired['lo']:+.4f}, {paired['hi']:+.4f}]",
              flush=True)
    print(json.dumps(results, indent=1))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
