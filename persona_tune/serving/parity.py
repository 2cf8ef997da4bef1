"""Parity of a served agent with the local path: the same rows rated both ways.

    with llama_cpp_server(run, spec) as url:
        result = measure(run, "trunk-single_max-ms", rows, RemoteOptions(backend="openai", base_url=url))

``llama_cpp_server`` starts llama.cpp's OpenAI-compatible server (``python -m llama_cpp.server``,
PyPI llama-cpp-python[server]) on the bundle's base GGUF with one model alias per adapter (its
LoRA GGUF), and stops it afterwards. ``measure`` rates ``rows`` with ``UserAgent`` locally and through
the server (persona_tune.serving.remote) and reports the largest and mean absolute difference of
the expected rating. The test (tests/test_serving_llamacpp.py) and the benchmark
(benchmarks/bench_serving_parity.py, which writes docs/results/serving-parity.json) use both.
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd

from persona_tune.errors import ConfigError
from persona_tune.runfolder import RunFolder

KV_TYPES = {"f32": 0, "f16": 1}  # ggml types of llama.cpp's KV cache (its default is f16)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_config(run: RunFolder, spec: dict, port: int, n_ctx: int = 2048, threads: int = 1,
                  kv: str = "f32") -> dict:
    """llama_cpp.server's --config_file: the base GGUF once per adapter alias, each with its LoRA."""
    if not spec["base"].get("gguf"):
        raise ConfigError(f"the bundle of {spec['variant']} has no GGUF: export it without --no-gguf")
    base = str(run.path(spec["base"]["gguf"]))
    models = []
    for entry in spec["adapters"]:
        model = {"model": base, "model_alias": entry["model"], "n_ctx": n_ctx, "n_threads": threads,
                 "n_threads_batch": threads, "logits_all": True, "verbose": False,
                 "type_k": KV_TYPES[kv], "type_v": KV_TYPES[kv]}
        if entry.get("gguf"):
            model["lora_path"] = str(run.path(entry["gguf"]))
        models.append(model)
    return {"host": "127.0.0.1", "port": port, "models": models}


def wait_until_serving(url: str, proc: subprocess.Popen, timeout: float, poll: float = 0.3) -> None:
    """Return once ``url``/models answers; ConfigError when ``proc`` exits or ``timeout`` s pass first."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(url + "/models", timeout=5).read()
            return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise ConfigError(f"the server of {url} did not start (exit code {proc.poll()})") from None
            time.sleep(poll)


def stop_server(proc: subprocess.Popen, grace: float) -> None:
    """Terminate ``proc``; kill it if it has not exited after ``grace`` seconds."""
    proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()


@contextlib.contextmanager
def llama_cpp_server(run: RunFolder | str | Path, spec: dict, n_ctx: int = 2048, threads: int = 1, kv: str = "f32",
                     start_timeout: float = 120.0) -> Iterator[str]:
    """A running llama.cpp server for the bundle ``spec``; yields its base URL (…/v1)."""
    run = run if isinstance(run, RunFolder) else RunFolder(run)
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="llama-cpp-") as tmp:
        config = Path(tmp) / "config.json"
        config.write_text(json.dumps(server_config(run, spec, port, n_ctx, threads, kv)))
        log = open(Path(tmp) / "server.log", "w+")
        proc = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--config_file", str(config)],
                                stdout=log, stderr=subprocess.STDOUT, text=True)
        url = f"http://127.0.0.1:{port}/v1"
        try:
            try:
                wait_until_serving(url, proc, start_timeout)
            except ConfigError:
                log.seek(0)
                raise ConfigError(f"llama_cpp.server did not start: {log.read()[-2000:]}") from None
            yield url
        finally:
            stop_server(proc, 30)
            log.close()


def measure(run: RunFolder | str | Path, variant: str, rows: pd.DataFrame, options, cache=None,
            local: pd.DataFrame | None = None) -> dict:
    """Rate ``rows`` (user_id, item_id) locally (unless ``local`` is given) and through ``options``'s
    server; the differences of the expected rating, and both sides' predictions."""
    from persona_tune.agent import UserAgent

    run = run if isinstance(run, RunFolder) else RunFolder(run)
    requests = pd.DataFrame({"user_id": rows["user_id"].to_numpy(), "item": rows["item_id"].tolist()})
    if local is None:
        local = UserAgent.from_run(run.root, variant=variant).rate_many(requests)
    agent = UserAgent.from_run(run.root, variant=variant, remote=options, cache=cache)
    started = time.perf_counter()
    remote = agent.rate_many(requests)
    seconds = time.perf_counter() - started
    diff = np.abs(remote["expected_rating"].to_numpy() - local["expected_rating"].to_numpy())
    return {"rows": int(len(rows)), "max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
            "remote_seconds": seconds, "requests": dict(agent.predictor.requests),
            "prompt_form": agent.predictor.prompt_form, "local": local, "remote": remote}
