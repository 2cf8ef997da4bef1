"""Collaborative retrieval (persona_tune.history.CollabIndex) over every row of a prepared run.

    python benchmarks/bench_collab.py RUN [--k 5] [--k-knn 50] [--buckets 4]
    python benchmarks/bench_collab.py --all-users DATA_DIR --ratings-file FILE --out FOLDER

For every train and test row of RUN: the user's k most similar own train items and the item-kNN
residual (k_knn neighbours), as the collaborative memory mode computes them for prompts. Prints the
seconds for the history (load and bucketing), the index (bias baseline) and the queries, and the
RMSE of the bias baseline and of item-kNN on the test rows. ``--all-users``: first prepares FOLDER
with every user of the ratings file sampled (any number of ratings, the same 60:40 split), so every
rating of the file is a train or test row: the largest query set the data allows. Run with OMP_NUM_THREADS=1 for a figure comparable to
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from persona_tune.evaluation.metrics import paired_rmse_diff
from persona_tune.history import CollabIndex, History
from persona_tune.runfolder import RunFolder


def bench(run: RunFolder, k: int, k_knn: int, buckets: int | None = None) -> dict:
    start = time.perf_counter()
    history = History.load(run)
    if buckets is not None:  # the same history cut into another number of split-time buckets
        history = History.before_split(history.rows.drop(columns=["first_bucket"]), run.read_ratings("test"),
                                       history.item_ids, n_buckets=buckets)
    t_history = time.perf_counter() - start
    train = run.read_ratings("train", columns=["user_id", "item_id", "rating"])
    test = run.read_ratings("test", columns=["user_id", "item_id", "rating"])
    start = time.perf_counter()
    index = CollabIndex(history, train)
    t_index = time.perf_counter() - start
    start = time.perf_counter()
    on_test = index.query(test["user_id"], test["item_id"], k=k, k_knn=k_knn)
    index.query(train["user_id"], train["item_id"], k=k, k_knn=k_knn)
    t_query = time.perf_counter() - start
    truth = test["rating"].to_numpy(dtype=float)

    def rmse(p: np.ndarray) -> float:
        return round(float(np.sqrt(np.mean((np.clip(p, 1, 5) - truth) ** 2))), 4)

    return {"run": str(run.root), "history": history.mode, "buckets": history.n_buckets, "users": int(
        train["user_id"].nunique()), "rows": len(train) + len(test), "history_rows": len(history.rows),
            "k": k, "k_knn": k_knn, "seconds": {"history": round(t_history, 2), "index": round(t_index, 2),
                                                 "queries": round(t_query, 2),
                                                 "total": round(t_history + t_index + t_query, 2)},
            "test_rmse": {"bias": rmse(on_test.bias), "knn": rmse(on_test.knn)},
            "knn_minus_bias": {k: round(v, 4) if isinstance(v, float) else v for k, v in paired_rmse_diff(
                test.assign(bias=np.clip(on_test.bias, 1, 5), knn=np.clip(on_test.knn, 1, 5)), "knn", "bias").items()}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", nargs="?")
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--k-knn", type=int, default=50)
    ap.add_argument("--buckets", type=int, default=None, help="re-cut a before_split history into this many buckets")
    ap.add_argument("--all-users", default=None, help="prepare every eligible user of this ML-1M folder first")
    ap.add_argument("--ratings-file", default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.all_users:
        from persona_tune.cli import main as cli_main

        extra = ["--ratings-file", args.ratings_file] if args.ratings_file else []
        assert cli_main(["prepare", "--dataset", "ml-1m", "--data-dir", args.all_users, "--out", args.out,
                         "--n-users", "1000000", "--min-ratings", "2", "--max-ratings", "1000000",
                         *extra]) == 0
        args.run = args.out
    if not args.run:
        ap.error("give RUN, or --all-users DATA_DIR --out FOLDER")
    print(json.dumps(bench(RunFolder(args.run), args.k, args.k_knn, args.buckets), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
