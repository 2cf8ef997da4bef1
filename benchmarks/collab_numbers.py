"""How far the collaborative numbers alone go: the closed-form read-out without the language model.

    python benchmarks/collab_numbers.py RUN [--train-rows 1000 4000] [--json-out FILE]

On the study's test rows (eval.max_rows 2000, eval.seed 0: the rows every trunk cell scores) and the
study's training rows (``--train-rows`` drawn over all users with seed 0, as ``grid --train-rows``
draws them), a multinomial logistic regression of the rating on the three numbers that
``head.prior: collab`` reads (persona_tune.evaluation.head.prior_features: the bias expectation, the item-kNN
prediction, the shrunk kNN prediction), with the same L2 choice as the rating head's closed form
(5-fold cross-validation over users), scored by its expected rating. Prints RMSE(read-out) -
RMSE(reference) for the bias baseline and item-kNN, paired over users (95% bootstrap CI). It is the check that a rating head
given these numbers can beat the bias baseline before any trunk pass or LoRA training is spent.
``--into FILE``: add these read-outs to a report's JSON (``persona-tune report --json-out``) as cells
of its ``cells`` list (same keys: name, rows, users, rmse, mae, pearson_r, pred_sd, mode, paired over
every classical baseline and reference of RUN/eval/baselines), creating the file if needed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from persona_tune.evaluation.metrics import paired_rmse_diff
from persona_tune.evaluation.report import baseline_frame, baseline_keys
from persona_tune.history import CollabIndex
from persona_tune.prompts import PromptParts, subsample_per_user
from persona_tune.runfolder import RunFolder, atomic_write_json
from persona_tune.evaluation.head import RatingHead, fit_head_closed_form, prior_features

L2_GRID = (1.0, 10.0, 100.0, 1000.0, 10000.0)  # configs/*_trunk: head.l2_grid


def numbers(index: CollabIndex, rows: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    found = index.query(rows["user_id"], rows["item_id"], k=0)
    parts = [PromptParts(item="", collab_expected=b, collab_residual=r, collab_weight=w)
             for b, r, w in zip(found.bias, found.knn_residual, found.knn_weight)]
    return prior_features(parts, "collab"), found.knn


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run")
    ap.add_argument("--train-rows", type=int, nargs="+", default=[1000, 4000])
    ap.add_argument("--test-rows", type=int, default=2000)
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--json-out", default=None)
    ap.add_argument("--into", default=None, help="a report JSON to add the read-outs to as cells")
    args = ap.parse_args()
    run = RunFolder(args.run)
    index = CollabIndex.load(run)
    test = subsample_per_user(run.read_ratings("test"), args.test_rows, 0).reset_index(drop=True)
    x_test, knn = numbers(index, test)
    test = test.assign(bias=np.clip(x_test[:, 0], 1, 5), knn=np.clip(knn, 1, 5))
    out = {"run": str(run.root), "test_rows": len(test), "cells": {}}
    for n in args.train_rows:
        train = subsample_per_user(run.read_ratings("train"), n, 0).reset_index(drop=True)
        x_train, _ = numbers(index, train)
        # The rating head's closed form with no language-model features (a zero-width feature block).
        head = RatingHead(0, [0, 1, 2, 3, 4], prior="collab")
        fit_head_closed_form(head, torch.zeros(5, 0), np.zeros((len(train), 0), np.float32),
                             train["rating"].to_numpy(), np.zeros((len(train), 6)), train["user_id"].to_numpy(),
                             l2_grid=L2_GRID, priors=x_train)
        with torch.no_grad():
            logits = head(torch.zeros(len(test), 0), torch.zeros(len(test), 5), torch.from_numpy(x_test))
        test[f"readout_{n}"] = torch.softmax(logits.double(), -1).numpy() @ np.arange(1, 6)
        rmse = float(np.sqrt(np.mean((test[f"readout_{n}"] - test["rating"]) ** 2)))
        cell = {"train_rows": len(train), "rmse": round(rmse, 4),
                "paired": {ref: paired_rmse_diff(test, f"readout_{n}", ref, n_boot=args.n_boot)
                           for ref in ("bias", "knn")}}
        out["cells"][f"collab-numbers-n{n}"] = cell
        print(f"numbers only, {len(train)} training rows: RMSE {rmse:.4f}; " + "; ".join(
            f"vs {ref} {p['diff']:+.4f} [{p['lo']:+.4f}, {p['hi']:+.4f}]" for ref, p in cell["paired"].items()))
    for ref in ("bias", "knn"):
        out[f"{ref}_rmse"] = round(float(np.sqrt(np.mean((test[ref] - test["rating"]) ** 2))), 4)
    print(f"bias RMSE {out['bias_rmse']:.4f}, item-kNN RMSE {out['knn_rmse']:.4f} on {len(test)} test rows")
    if args.json_out:
        atomic_write_json(args.json_out, out)
    if args.into:
        add_cells(Path(args.into), run, test, args)
    return 0


def add_cells(path: Path, run: RunFolder, test: pd.DataFrame, args: argparse.Namespace) -> None:
    """The read-outs as cells of a report JSON (replacing earlier ones of the same name)."""
    report = json.loads(path.read_text()) if path.is_file() else {"cells": []}
    base = baseline_frame(run)  # the classical baselines and references, as the report pairs them
    names = baseline_keys(base)
    rows = test.drop(columns=["bias", "knn"]).merge(base[["user_id", "item_id", *names]], on=["user_id", "item_id"])
    for n in args.train_rows:
        pred = rows[f"readout_{n}"]
        error = pred - rows["rating"]
        cell = {"name": f"collab-numbers-n{n}-test{args.test_rows}", "mode": "scoring", "rows": len(rows),
                "users": int(rows["user_id"].nunique()), "rmse": float(np.sqrt(np.mean(error ** 2))),
                "mae": float(np.mean(np.abs(error))), "pearson_r": float(np.corrcoef(pred, rows["rating"])[0, 1]),
                "pred_sd": float(pred.std()),
                "paired": {b: paired_rmse_diff(rows, f"readout_{n}", b, n_boot=args.n_boot) for b in names}}
        report["cells"] = [c for c in report["cells"] if c["name"] != cell["name"]] + [cell]
    atomic_write_json(path, report)


if __name__ == "__main__":
    raise SystemExit(main())
