"""Distillation benchmarks: client throughput, store overhead, resume time, calls and tokens per user.

    python benchmarks/bench_distill.py            # everything (about 2-4 minutes on 2 cores)
    python benchmarks/bench_distill.py --json out.json

* throughput: ``ChatClient`` against the fake OpenAI server (a separate process on 127.0.0.1,
  answering at once) with distillation-step-sized requests, at concurrency 1, 8 and 32.
* store: ``RequestStore.put`` / ``get`` per record (realistic 10-item request and answer).
* protocol run: the paper's protocol (200 users with 100-200 ratings, 60:40 split, batches of 10)
  on ../shared/data/ml-1m with DBpedia summaries when present, else on the synthetic generator.
  A full distillation against the fake server, then the same command again (the resume of a
  finished run), timed in process and as a CLI subprocess.
* calls and tokens per user: calls counted; tokens from the dry-run estimate (4 characters per
  token) and from the fake server's usage (same rule), so they are estimates, not a tokenizer's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from persona_tune.distill.client import ChatClient, ClientSettings  # noqa: E402
from persona_tune.distill.reflect import BatchItem, load_prompts, step_messages, step_schema  # noqa: E402
from persona_tune.distill.llm import estimate_plan, plan_batches  # noqa: E402
from persona_tune.distill.run import DistillConfig, distill, load_inputs  # noqa: E402
from persona_tune.distill.store import Answer, RequestStore, request_key  # noqa: E402
from persona_tune.runfolder import PROFILES, RunFolder  # noqa: E402

SHARED = Path(os.environ.get("PERSONA_TUNE_SHARED", REPO.parent / "shared"))


class ServerProcess:
    """The fake OpenAI server in its own process, so it does not share the client's GIL."""

    def __enter__(self) -> str:
        self.proc = subprocess.Popen([sys.executable, "-m", "persona_tune.testing.fake_openai_server", "--port", "0"],
                                     cwd=REPO, stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if not line.startswith("listening on "):
            raise RuntimeError(f"fake server did not start: {line!r}")
        return line.split()[-1]

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def _batch(i: int) -> list[BatchItem]:
    text = ("The movie Heat was released in the year 1995 is of Action, Crime, Thriller genre with historical "
            "average rating of 3.95. SUMMARY: A group of professional bank robbers start to feel the heat from "
            "police when they unknowingly leave a clue at their latest heist. The cast of the movie is as follows: "
            "Al Pacino, Robert De Niro, Val Kilmer.")
    return [BatchItem(1000 * i + k, 1 + (i + k) % 5, f"Heat {i}-{k} (1995)", text) for k in range(10)]


def bench_throughput(url: str, n_requests: int, concurrencies=(1, 8, 32)) -> list[dict]:
    prompts = load_prompts()
    rows = []
    for concurrency in concurrencies:
        async def go():
            client = ChatClient(ClientSettings(base_url=url, model="fake-model", api_key="bench",
                                               timeout=30, concurrency=concurrency))
            try:
                jobs = []
                for i in range(n_requests):
                    batch = _batch(i)
                    messages = step_messages(prompts, f"I am user {concurrency}-{i}.", batch, 400)
                    params = {"temperature": 0.3, "response_format": {
                        "type": "json_schema", "json_schema": {"name": "s", "schema": step_schema(batch)}}}
                    jobs.append(client.chat(messages, params))
                await client.chat(*(step_messages(prompts, "warm-up", _batch(0), 400), {}))
                started = time.perf_counter()
                answers = await asyncio.gather(*jobs)
                return time.perf_counter() - started, answers
            finally:
                await client.close()

        seconds, answers = asyncio.run(go())
        latencies = sorted(a.latency_s for a in answers)
        rows.append({"concurrency": concurrency, "requests": n_requests, "seconds": round(seconds, 3),
                     "req_per_s": round(n_requests / seconds, 1),
                     "p50_ms": round(1000 * statistics.median(latencies), 2),
                     "p95_ms": round(1000 * latencies[int(0.95 * (len(latencies) - 1))], 2)})
        print("throughput", rows[-1], flush=True)
    return rows


def bench_store(n: int) -> dict:
    prompts = load_prompts()
    with tempfile.TemporaryDirectory() as tmp, RequestStore(Path(tmp) / "requests.sqlite") as store:
        records = []
        for i in range(n):
            messages = step_messages(prompts, "I like slow westerns. " * 30, _batch(i), 400)
            params = {"temperature": 0.3, "seed": 0, "attempt": 0}
            records.append((request_key("m", messages, params), {"messages": messages, "params": params}))
        answer = Answer(json.dumps({"explanations": ["I rated X as 4 because " + "y " * 30] * 10,
                                    "profile": "I like " * 300}), "stop", 1500, 1200, 0.5, 0)
        t0 = time.perf_counter()
        keys = [request_key("m", r["messages"], r["params"]) for _, r in records]
        t1 = time.perf_counter()
        for key, request in records:
            store.put(key, model="m", request=request, answer=answer, user_id=1, step=0, attempt=0)
        t2 = time.perf_counter()
        for key in keys:
            assert store.get(key) is not None
        t3 = time.perf_counter()
        size = (Path(tmp) / "requests.sqlite").stat().st_size + (Path(tmp) / "requests.sqlite-wal").stat().st_size
    out = {"records": n, "key_ms": round(1000 * (t1 - t0) / n, 4), "put_ms": round(1000 * (t2 - t1) / n, 4),
           "get_ms": round(1000 * (t3 - t2) / n, 4), "bytes_per_record": size // n}
    print("store", out, flush=True)
    return out


def prepare_protocol_run(root: Path) -> tuple[Path, str]:
    """200 users with 100-200 ratings, 60:40 in time order: real ML-1M if ../shared has it."""
    out = root / "run"
    ml1m = SHARED / "data" / "ml-1m"
    meta = SHARED / "data" / "movie-meta" / "ml1m_dbpedia_abstracts.json"
    if (ml1m / "ratings.partial-users0001-2999.dat").exists():
        cmd = ["prepare", "--dataset", "ml-1m", "--data-dir", str(ml1m),
               "--ratings-file", "ratings.partial-users0001-2999.dat", "--out", str(out)]
        if meta.exists():
            cmd += ["--meta-file", str(meta)]
        source = "ml-1m users 1-2999 (+ DBpedia summaries)" if meta.exists() else "ml-1m users 1-2999"
    else:
        subprocess.run([sys.executable, "-m", "persona_tune.cli", "synth", "--out", str(root / "data")], cwd=REPO, check=True)
        cmd = ["prepare", "--dataset", "synthetic", "--data-dir", str(root / "data"), "--out", str(out)]
        source = "synthetic (persona-tune synth defaults)"
    subprocess.run([sys.executable, "-m", "persona_tune.cli", *cmd], cwd=REPO, check=True, capture_output=True)
    return out, source


def bench_protocol_run(url: str, root: Path) -> dict:
    run, source = prepare_protocol_run(root)
    folder = RunFolder(run)
    cfg = DistillConfig(backend="openai", base_url=url, model="fake-model", concurrency=32, progress=False)
    train, items = load_inputs(folder)
    plan = plan_batches(train, items, cfg.batch_size)
    estimate = estimate_plan(plan, load_prompts(), cfg)
    t0 = time.perf_counter()
    first = distill(folder, cfg)
    t1 = time.perf_counter()
    resumed = distill(folder, cfg)  # finished: skipped from the manifest
    t2 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "persona_tune.cli", "distill", "--run", str(run), "--backend", "openai",
                           "--base-url", url, "--model", "fake-model", "--no-progress"], cwd=REPO, capture_output=True, text=True)
    t3 = time.perf_counter()
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr)
    folder.path(PROFILES).unlink()  # unfinished outputs: every answer replayed from the store
    t4 = time.perf_counter()
    replayed = distill(folder, cfg)
    t5 = time.perf_counter()
    users = train["user_id"].nunique()
    per_user_rows = train.groupby("user_id").size()
    out = {
        "source": source, "users": int(users), "train_rows": len(train),
        "train_rows_per_user": [int(per_user_rows.min()), float(round(per_user_rows.mean(), 1)), int(per_user_rows.max())],
        "calls": first["calls"], "calls_per_user": round(first["calls"] / users, 2),
        "first_run_s": round(t1 - t0, 2), "first_run_req_per_s": round(first["calls"] / (t1 - t0), 1),
        "resume_s_in_process": round(t2 - t1, 3), "resume_cached": resumed["cached"], "resume_calls": resumed["calls"],
        "resume_s_cli": round(t3 - t2, 3),
        "replay_s_in_process": round(t5 - t4, 3), "replay_cached": replayed["cached"], "replay_calls": replayed["calls"],
        "estimate_prompt_tokens_per_user": round(estimate["prompt_tokens"] / users),
        "estimate_completion_tokens_per_user": round(estimate["completion_tokens"] / users),
        "fake_server_prompt_tokens_per_user": round(first["prompt_tokens"] / users),
        "fake_server_completion_tokens_per_user": round(first["completion_tokens"] / users),
    }
    print("protocol run", out, flush=True)
    return out


def machine() -> dict:
    info = {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count()}
    try:
        model = [l for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("model name")]
        info["cpu"] = model[0].split(":", 1)[1].strip() if model else platform.processor()
        info["load_avg_1m"] = os.getloadavg()[0]
    except OSError:
        pass
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=800, help="requests per concurrency level")
    parser.add_argument("--store-records", type=int, default=2000)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    results = {"machine": machine()}
    print("machine", results["machine"], flush=True)
    with ServerProcess() as url:
        results["throughput"] = bench_throughput(url, args.requests)
        results["store"] = bench_store(args.store_records)
        with tempfile.TemporaryDirectory() as tmp:
            results["protocol_run"] = bench_protocol_run(url, Path(tmp))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
