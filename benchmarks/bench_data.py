"""Benchmarks: the data stage's speed (the timings the tests no longer assert, issue 27).

    python benchmarks/bench_data.py [--repeat 3] [--json OUT]

1. synth: `generate(SynthConfig())`, the default synthetic ML-1M-format dataset (300 users).
2. load: `load_ml1m` of ../shared/data/ml-1m with the partial ratings file (users 1..2999).
3. prepare: the paper's protocol on that log (200 users, writes the run folder).
4. download offline: `download` from a closed local port until the one-line error (no network).

Each step runs ``--repeat`` times; the median and the spread are printed with the load average, since
the machine is shared. Steps 2-3 need ../shared/data (skipped with a note otherwise).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("PERSONA_TUNE_SHARED", REPO.parent / "shared")).resolve()
PARTIAL = "ratings.partial-users0001-2999.dat"


def timed(fn, repeat: int) -> dict:
    seconds = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - start)
    return {"median_s": round(statistics.median(seconds), 3), "min_s": round(min(seconds), 3),
            "max_s": round(max(seconds), 3), "runs": repeat}


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    from persona_tune.data.download import DownloadError, download
    from persona_tune.data.loaders import load_ml1m
    from persona_tune.data.prepare import Protocol, prepare
    from persona_tune.data.synthetic import SynthConfig, generate

    results = {"load_average_before": os.getloadavg()[0]}
    results["synth"] = timed(lambda: generate(SynthConfig()), args.repeat)
    ml1m = SHARED / "data" / "ml-1m"
    if (ml1m / PARTIAL).is_file():
        results["load_ml1m"] = timed(lambda: load_ml1m(ml1m, PARTIAL), args.repeat)
        log = load_ml1m(ml1m, PARTIAL)
        with tempfile.TemporaryDirectory() as tmp:
            results["prepare_ml1m"] = timed(
                lambda: prepare(log, Path(tempfile.mkdtemp(dir=tmp)) / "run", Protocol()), args.repeat)
    else:
        print(f"{ml1m / PARTIAL} is missing: load and prepare skipped", file=sys.stderr)

    def offline():
        with tempfile.TemporaryDirectory() as tmp:
            try:
                download("ml-1m", tmp, url=f"http://127.0.0.1:{closed_port()}/ml-1m.zip", timeout=5)
            except DownloadError:
                return
            raise AssertionError("a closed port downloaded something")

    results["download_offline"] = timed(offline, args.repeat)
    results["load_average_after"] = os.getloadavg()[0]
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
