"""Serve K persona agents with vLLM on a GPU: parity with the local path, then rows/s at rising concurrency.

    python benchmarks/bench_vllm_serving.py RUN --variants persona-ms,trunk-single_max-ms \\
        --parity-rows 50 --rows 4000 --concurrency 16,64,256,1024 --out docs/results/vllm-serving.json

1. Every adapter of the variants' `persona-tune serve-export` bundles (PEFT, rating head folded into
   ``lm_head``) is served by one ``vllm serve BASE --enable-lora --lora-modules NAME=DIR ...`` with
   ``--max-loras K --max-lora-rank R --max-logprobs 20`` (raw log-probabilities, vLLM's default),
   started here and stopped at the end; the exact command is printed and saved in the JSON.
2. Parity: --parity-rows test rows rated by ``UserAgent`` locally and through vLLM (the remote rater:
   token-id prompts, ``token_id:N`` log-probability keys, the head's terms added client-side);
   max |difference of the expected rating| per variant.
3. Throughput: --rows test rows spread over the users (each through its persona's adapter, all K
   adapters in flight together), prompts built beforehand; rows/s of the requests alone at each
   concurrency. Target: >= 1,000 rows/s for SmolLM2 agents on one H100.

Without a CUDA GPU or without vllm it prints why and writes ``{"status": "not run", "reason": ...}``
to --out, exit code 0, so it can sit in any benchmark list.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

from persona_tune.errors import ConfigError
from persona_tune.serving.parity import free_port, stop_server, wait_until_serving
from persona_tune.variants import Variant


def why_not() -> str | None:
    """None when a CUDA GPU and vllm are here, else the reason to skip."""
    if importlib.util.find_spec("vllm") is None:
        return "vllm is not installed (pip install vllm, on a machine with a CUDA GPU)"
    try:
        import torch

        if not torch.cuda.is_available():
            return "no CUDA GPU visible to torch"
    except Exception as e:  # a broken torch install is a reason too
        return f"torch cannot query CUDA: {e}"
    return None


VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # the values vllm's --max-lora-rank accepts


def vllm_command(run, specs: list[dict], port: int, gpu_memory: float) -> list[str]:
    adapters = [(a["model"], str(run.path(a["peft"]))) for spec in specs for a in spec["adapters"] if a["peft"]]
    ranks = [json.loads((Path(d) / "adapter_config.json").read_text())["r"] for _, d in adapters]
    base = specs[0]["base"]["hf_model_dir"]
    return ["vllm", "serve", base, "--port", str(port), "--enable-lora", "--max-loras", str(max(len(adapters), 1)),
            "--max-lora-rank", str(next(r for r in VLLM_LORA_RANKS if r >= max([8, *ranks]))), "--max-logprobs", "20", "--gpu-memory-utilization",
            str(gpu_memory), "--lora-modules", *[f"{name}={path}" for name, path in adapters]]


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 900.0) -> None:
    try:
        wait_until_serving(url, proc, timeout, poll=2.0)
    except ConfigError:
        raise SystemExit(f"vllm serve did not start (exit {proc.poll()}); see its log") from None


def spread_rows(run, n: int, seed: int = 0) -> pd.DataFrame:
    test = run.read_ratings("test")
    take = test.sample(n=min(n, len(test)), random_state=seed) if n < len(test) else test
    return take[["user_id", "item_id"]].reset_index(drop=True)


def throughput(run, variant: str, rows: pd.DataFrame, url: str, concurrency: list[int]) -> list[dict]:
    """rows/s of the requests alone (prompts and stated numbers built first), per concurrency."""
    from persona_tune.agent import UserAgent
    from persona_tune.serving.remote import RemoteOptions

    out = []
    for c in concurrency:
        agent = UserAgent.from_run(run.root, variant=variant, remote=RemoteOptions(
            backend="openai", base_url=url, concurrency=c, timeout=600))
        rater = agent.predictor
        prompts = agent.prompt_rows(rows["user_id"].tolist(), rows["item_id"].tolist())
        groups = []
        for persona, group in prompts.groupby("persona"):
            entry = rater.use(int(persona))
            groups.append((entry, rater.encode(group["parts"])))  # the head's terms: client arithmetic, not timed
        started = time.perf_counter()
        rater.logprobs(groups)
        seconds = time.perf_counter() - started
        out.append({"concurrency": c, "rows": int(len(rows)), "seconds": round(seconds, 3),
                    "rows_per_s": round(len(rows) / seconds, 1), "requests": dict(rater.requests)})
        print(f"{variant}: concurrency {c}: {len(rows) / seconds:,.0f} rows/s ({rater.requests})", flush=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run")
    ap.add_argument("--variants", required=True, help="comma list of exported variants (serve-export)")
    ap.add_argument("--parity-rows", type=int, default=50)
    ap.add_argument("--rows", type=int, default=4000, help="rows per throughput measurement")
    ap.add_argument("--concurrency", default="16,64,256,1024")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    ap.add_argument("--out", default="docs/results/vllm-serving.json")
    args = ap.parse_args()
    out = Path(args.out)
    reason = why_not()
    if reason:
        print(f"bench_vllm_serving: not run: {reason}")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"status": "not run", "reason": reason,
                                   "command": "python " + shlex.join(sys.argv)}, indent=2) + "\n")
        return 0

    from importlib.metadata import version

    import torch

    from persona_tune.runfolder import RunFolder
    from persona_tune.serving.parity import measure
    from persona_tune.serving.remote import RemoteOptions
    from persona_tune.serving.export import read_serving_spec

    run = RunFolder(args.run)
    variants = [v for v in args.variants.split(",") if v]
    specs = [read_serving_spec(run, v) for v in variants]
    port = free_port()
    cmd = vllm_command(run, specs, port, args.gpu_memory_utilization)
    print(shlex.join(cmd), flush=True)
    log = open(out.with_suffix(".vllm.log"), "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v1"
    result = {"status": "run", "engine": f"vLLM {version('vllm')}", "gpu": torch.cuda.get_device_name(0),
              "command": "python " + shlex.join(sys.argv), "vllm_command": shlex.join(cmd),
              "adapters": sum(len(s["adapters"]) for s in specs), "variants": {}}
    try:
        wait_ready(url, proc)
        parity_rows = spread_rows(run, args.parity_rows, seed=1)
        rows = spread_rows(run, args.rows)
        for variant in variants:
            m = measure(run, variant, parity_rows, RemoteOptions(backend="openai", base_url=url, concurrency=64))
            result["variants"][variant] = {
                "path": "trunk" if Variant.parse(variant).trunk else "stock", "rows": m["rows"],
                "max_abs_diff": m["max_abs_diff"], "mean_abs_diff": m["mean_abs_diff"],
                "throughput": throughput(run, variant, rows, url, [int(c) for c in args.concurrency.split(",")])}
            print(f"{variant}: parity max |diff| {m['max_abs_diff']:.5f} on {m['rows']} rows", flush=True)
    finally:
        stop_server(proc, 60)
        log.close()
    best = max((t["rows_per_s"] for v in result["variants"].values() for t in v["throughput"]), default=None)
    result["best_rows_per_s"] = best
    out.write_text(json.dumps(result, indent=2, default=float) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
