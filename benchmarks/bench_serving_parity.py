"""Served agents against the local path: the same real rows rated by `UserAgent` and by llama.cpp's
server on the `persona-tune serve-export` bundle, for each base GGUF type.

    python benchmarks/bench_serving_parity.py RUN --variants trunk-single_max-ms,single_max-ms \\
        --rows 50 --gguf-types f32,f16,q4_1 --out docs/results/serving-parity.json

For each variant: RUN's test rows (a seeded sample of --rows, spread over users) are rated locally
once; then for each GGUF type the variant is exported (`serve-export --gguf-type T`), llama.cpp's
server starts on the base GGUF with each adapter's LoRA GGUF (one thread, KV cache --kv), and the
remote rater (persona_tune.serving.remote) rates the same rows. The JSON holds, per variant, its
training path (stock or trunk), whether it has a rating head, and per base type the largest and
mean |difference of the expected rating|; the variant's ``max_abs_diff`` is the f32 base's (else
the first type's). Requests are not cached, so the timings are the server's.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pandas as pd

from persona_tune.agent import UserAgent
from persona_tune.runfolder import RunFolder, atomic_write_json
from persona_tune.serving.parity import llama_cpp_server, measure
from persona_tune.serving.remote import RemoteOptions
from persona_tune.serving.export import read_serving_spec
from persona_tune.serving.stage import ServeExportConfig, run as serve_export
from persona_tune.variants import Variant


def sample_rows(run: RunFolder, n: int, seed: int = 0) -> pd.DataFrame:
    """n test rows: users in a seeded order, up to 3 rows of each, so the rows span many users."""
    test = run.read_ratings("test")
    rng = np.random.default_rng(seed)
    users = rng.permutation(np.sort(test["user_id"].unique()))
    per_user = test.sort_values(["user_id", "timestamp", "item_id"]).groupby("user_id")
    picked = []
    for user in users:
        rows = per_user.get_group(user)
        picked.append(rows.iloc[rng.permutation(len(rows))[:3]])
        if sum(map(len, picked)) >= n:
            break
    return pd.concat(picked).head(n).reset_index(drop=True)[["user_id", "item_id", "rating"]]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run")
    ap.add_argument("--variants", required=True, help="comma list of trained variants")
    ap.add_argument("--rows", type=int, default=50)
    ap.add_argument("--gguf-types", default="f32,f16,q4_1")
    ap.add_argument("--kv", default="f32", choices=("f32", "f16"), help="llama.cpp's KV cache type")
    ap.add_argument("--threads", type=int, default=1, help="llama.cpp server threads")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="docs/results/serving-parity.json")
    args = ap.parse_args()
    run = RunFolder(args.run)
    rows = sample_rows(run, args.rows, args.seed)
    requests = pd.DataFrame({"user_id": rows["user_id"], "item": rows["item_id"].tolist()})
    types = [t for t in args.gguf_types.split(",") if t]
    result = {"engine": f"llama.cpp (llama-cpp-python {version('llama-cpp-python')}, python -m llama_cpp.server)",
              "rows": int(len(rows)), "users": int(rows["user_id"].nunique()), "run": str(run.root),
              "kv_cache": args.kv, "server_threads": args.threads, "machine": platform.machine(),
              "command": "python " + " ".join(sys.argv), "variants": {}}
    for variant in [v for v in args.variants.split(",") if v]:
        started = time.perf_counter()
        local = UserAgent.from_run(run.root, variant=variant).rate_many(requests)
        local_seconds = time.perf_counter() - started
        entry = {"local_seconds": round(local_seconds, 2), "by_base": {}}
        for kind in types:
            serve_export(run, ServeExportConfig(variant=variant, gguf_type=kind, peft=False))
            spec = read_serving_spec(run, variant)
            with llama_cpp_server(run, spec, threads=args.threads, kv=args.kv) as url:
                m = measure(run, variant, rows, RemoteOptions(backend="openai", base_url=url, concurrency=1),
                            local=local)
            entry["by_base"][kind] = {"max_abs_diff": m["max_abs_diff"], "mean_abs_diff": m["mean_abs_diff"],
                                      "remote_seconds": round(m["remote_seconds"], 2), "requests": m["requests"]}
            print(f"{variant} [{kind}] max |diff| {m['max_abs_diff']:.5f}  mean {m['mean_abs_diff']:.5f}  "
                  f"({m['remote_seconds']:.0f} s, {m['requests']})", flush=True)
        heads = [a["head"] is not None for a in spec["adapters"]]
        entry["path"] = "trunk" if Variant.parse(variant).trunk else "stock"
        entry["head"] = bool(any(heads))
        entry["head_prior"] = next((a["head"]["prior"] for a in spec["adapters"] if a["head"]), None)
        entry["adapters"] = len(spec["adapters"])
        base_kind = "f32" if "f32" in types else types[0]
        entry["max_abs_diff"] = entry["by_base"][base_kind]["max_abs_diff"]
        entry["max_abs_diff_base"] = base_kind
        result["variants"][variant] = entry
        result["model"] = Path(spec["base"]["hf_model_dir"]).parent.name
    atomic_write_json(Path(args.out), result)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
