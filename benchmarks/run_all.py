"""Run every benchmark in benchmarks/ at a quick size and print one table (`make bench`).

Each bench_*.py runs as its own process with small settings and writes its results as JSON; the
table shows the numbers docs/benchmarks.md tracks. The quick sizes check that every benchmark works
and give rough numbers; docs/benchmarks.md gives the commands for the full sizes. Ratios (speedups)
are the meaningful figures on a shared machine: both sides are measured in the same process.

    python benchmarks/run_all.py            # all, about 5-10 minutes on 2 cores
    python benchmarks/run_all.py --only eval distill
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

# name -> (script, quick arguments, rows of the table: (label, function of the JSON results)).
BENCHMARKS = {
    "distill": ("bench_distill.py", ["--requests", "100", "--store-records", "300"], [
        ("client req/s at concurrency 32", lambda r: r["throughput"][-1]["req_per_s"]),
        ("store put / get ms per record", lambda r: f"{r['store']['put_ms']} / {r['store']['get_ms']}"),
        ("users distilled (calls)", lambda r: f"{r['protocol_run']['users']} ({r['protocol_run']['calls']})"),
        ("resume of the finished distillation, s in process", lambda r: r["protocol_run"]["resume_s_in_process"]),
        ("replay of every answer from the store, s in process", lambda r: r["protocol_run"]["replay_s_in_process"]),
    ]),
    "eval": ("bench_eval.py", ["--model", "tiny", "--rows", "48", "--users", "6"], [
        ("naive per-row generate, rows/s", lambda r: r["naive_generate"]["rows_per_s"]),
        ("batched scoring speedup vs naive (target >= 5)", lambda r: r["batched_scoring"]["speedup_vs_naive"]),
        ("batched scoring URR", lambda r: r["batched_scoring"]["urr"]),
        ("batched generate speedup vs naive", lambda r: r["batched_generate"]["speedup_vs_naive"]),
        ("batched generate: same text as naive", lambda r: r["batched_generate"]["same_text_as_naive"]),
    ]),
    "memory": ("bench_memory.py", ["--only", "kmeans", "--kmeans-n", "10000"], [
        ("KMeans++ K=4 on 10k x 384, s", lambda r: r["kmeans"]["seconds"]),
    ]),
    "trunk": ("bench_trunk.py", ["--model", "tiny", "--rows", "32", "--test-rows", "32"], [
        ("frozen-trunk epoch tokens/s vs stock (target >= 4)", lambda r: r["ratios"]["epoch_tokens_per_s_vs_stock"]),
        ("extra variant's cost vs stock (target <= 0.3)", lambda r: r["ratios"]["extra_variant_cost_vs_stock"]),
        ("all cells vs one cell (target <= 2)", lambda r: r["ratios"]["all_cells_vs_one_cell"]),
    ]),
    "train": ("bench_train.py", ["--models", "tiny", "--nprocs", "1", "--steps", "3"], [
        ("tiny LoRA, 1 process: tokens/s", lambda r: round(r["rows"][0]["tokens_per_second"])),
        ("tiny LoRA, 1 process: s/step", lambda r: round(r["rows"][0]["step_seconds"], 3)),
    ]),
}


def run_one(name: str, tmp: Path) -> tuple[dict | None, float, str]:
    script, args, _ = BENCHMARKS[name]
    out = tmp / f"{name}.json"
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, str(HERE / script), *args, "--json", str(out)],
                          cwd=HERE.parent, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if proc.returncode != 0 or not out.is_file():
        return None, seconds, (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return json.loads(out.read_text()), seconds, ""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", choices=list(BENCHMARKS), default=list(BENCHMARKS))
    args = parser.parse_args()
    rows, failed = [], []
    with tempfile.TemporaryDirectory(prefix="bench_all.") as tmp:
        for name in args.only:
            print(f"running {BENCHMARKS[name][0]} {' '.join(BENCHMARKS[name][1])} ...", file=sys.stderr, flush=True)
            results, seconds, error = run_one(name, Path(tmp))
            if results is None:
                failed.append(name)
                rows.append((name, "FAILED", error, f"{seconds:.0f}"))
                continue
            for i, (label, value) in enumerate(BENCHMARKS[name][2]):
                rows.append((name, label, str(value(results)), f"{seconds:.0f}" if i == 0 else ""))
    header = ("benchmark", "measure", "value", "wall s")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
