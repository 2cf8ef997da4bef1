"""`persona-tune simulate` against `persona-tune eval` on the same (user, item) rows and the same model.

    python benchmarks/bench_simulate.py RUN --variant prompted --family tiny --rows 200 [-- KEY=VALUE ...]

1. `persona-tune eval --variants V -- max_rows=N` scores about N test rows (per persona) and records
   each persona's scoring time (eval/V/parts/persona_*.json: prompts built beforehand, no model load).
2. Those very rows become one recommender's slates (rank = order in the eval output) and
   `persona-tune simulate --recs FILE --no-reference --no-probes` scores them with the same model;
   its time covers prompt building with on-the-fly memory retrieval and the forward passes, no model load.
Prints rows/s of both and the ratio eval/simulate (the target: <= 1.2). Both use one process; set
OMP_NUM_THREADS / --num-threads as you like, the same for both.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys

import pandas as pd

from persona_tune.cli import main as cli_main
from persona_tune.runfolder import RunFolder


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run")
    ap.add_argument("--variant", default="prompted")
    ap.add_argument("--family", default=None)
    ap.add_argument("--rows", type=int, default=200, help="eval max_rows (about this many rows per persona)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    run = RunFolder(args.run)
    family = ["--family", args.family] if args.family else []
    eval_dir = run.eval_dir / args.variant
    shutil.rmtree(eval_dir, ignore_errors=True)
    code = cli_main(["eval", "--run", str(run.root), "--variants", args.variant, "--mode", "scoring", *family, "--",
                     f"max_rows={args.rows}", f"num_threads={args.threads}", "batching.progress=false",
                     *args.overrides])
    if code:
        return code
    stamps = [json.loads(p.read_text()) for p in sorted((eval_dir / "parts").glob("persona_*.json"))]
    eval_rows, eval_s = sum(s["rows"] for s in stamps), sum(s["seconds"] for s in stamps)

    preds = pd.read_parquet(run.eval_predictions(args.variant))
    preds = preds[preds["mode"] == "scoring"]
    recs = preds[["user_id", "item_id"]].assign(recommender="eval-rows")
    recs["rank"] = recs.groupby("user_id").cumcount() + 1
    recs_file = run.root / "bench_simulate_recs.parquet"
    recs.to_parquet(recs_file, index=False)
    name = f"bench-{args.variant}"
    shutil.rmtree(run.simulation(name).root, ignore_errors=True)
    code = cli_main(["simulate", "--run", str(run.root), "--variant", args.variant, *family, "--recs", str(recs_file),
                     "--no-reference", "--no-probes", "--name", name, "--n-boot", "1", "--no-progress",
                     "--num-threads", str(args.threads), "--", *args.overrides])
    if code:
        return code
    timing = json.loads(run.simulation(name).metrics.read_text())["timing"]
    sim_rows, sim_s = timing["scored"], timing["seconds"]
    print(f"\nrows: eval {eval_rows}, simulate {sim_rows} (the same (user, item) pairs)")
    print(f"eval     {eval_rows / eval_s:8.2f} rows/s  ({eval_s:.1f} s)")
    print(f"simulate {sim_rows / sim_s:8.2f} rows/s  ({sim_s:.1f} s)")
    print(f"eval/simulate rows/s ratio: {(eval_rows / eval_s) / (sim_rows / sim_s):.2f}x  (target <= 1.2x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
