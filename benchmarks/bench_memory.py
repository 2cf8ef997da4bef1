"""Benchmarks: memory retrieval, the torchtune dataset build, and persona clustering.

    python benchmarks/bench_memory.py [--small RUN] [--large RUN] [--sample 20000] [--json OUT]
    python benchmarks/bench_memory.py --only none --scores RUN [RUN ...]

--small: the paper's 200-user ML-1M run; --large: every user of the partial ML-1M file. A missing
run is built from ../shared/data (prepare, offline distill, hash embed) in a temporary folder.

1. build: samples/s of persona_dataset over all train + test rows (retrieval from stored vectors,
   joining and rendering the prompts, tokenizing each sample with the tiny Phi-3 tokenizer at
   max_seq_len 4096), against torchtune's chat_dataset over the same messages pre-rendered to JSON
   (its load_dataset + tokenizing). On the large run both sides tokenize the same random sample of
   rows; the construction (retrieval and joins over every row) is timed in full.
2. retrieval: retrieve() for every train + test row of the large run with random 384-d vectors
   (MiniLM's width) in place of real embeddings: seconds and peak memory.
3. KMeans++ (K=4, n_init=10, the personas stage's call) on 100,000 x 384 synthetic vectors.
4. --scores: the top-1 cosine of every row of embedded runs, without a threshold (to choose delta).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("PERSONA_TUNE_SHARED", REPO.parent / "shared")).resolve()


def build_run(out: Path, all_users: bool) -> Path:
    from persona_tune.cli import main as cli

    data = SHARED / "data"
    args = [
        "prepare", "--dataset", "ml-1m", "--data-dir", str(data / "ml-1m"),
        "--ratings-file", "ratings.partial-users0001-2999.dat",
        "--meta-file", str(data / "movie-meta" / "ml1m_dbpedia_abstracts.json"), "--out", str(out),
    ]
    if all_users:
        args += ["--min-ratings", "2", "--max-ratings", "100000", "--n-users", "2999"]
    for argv in (args, ["distill", "--run", str(out), "--backend", "offline", "--no-progress"],
                 ["embed", "--run", str(out), "--backend", "hash"]):
        if cli(argv) != 0:
            sys.exit(f"failed: persona-tune {' '.join(argv)}")
    return out


def tiny_tokenizer(tmp: Path):
    from persona_tune.models.tiny import tiny_phi3_tokenizer, write_tiny_phi3

    out = write_tiny_phi3(tmp / "tiny")
    return tiny_phi3_tokenizer(str(out / "tokenizer" / "tokenizer.model"), max_seq_len=4096)


def bench_build(run: Path, tok, tmp: Path, sample: int | None, seed: int = 0) -> dict:
    """persona_dataset (retrieve + render + tokenize) vs chat_dataset over pre-rendered messages."""
    from torchtune.datasets import chat_dataset

    from persona_tune.datasets import persona_dataset
    from persona_tune.memory.stage import EmbedConfig
    from persona_tune.memory.stage import run as embed
    from persona_tune.prompts import load_prompt_rows, render_messages
    from persona_tune.runfolder import RunFolder

    meta = RunFolder(run).read_embeddings_meta()
    t0 = time.perf_counter()
    embed(RunFolder(run), EmbedConfig(backend=meta["backend"], model=meta["model"], k=meta["k"], delta=meta["delta"],
                                      query=meta["query"]))
    t_retrieve = time.perf_counter() - t0
    datasets = [persona_dataset(tok, run_dir=str(run), split=s) for s in ("train", "test")]
    t_construct = time.perf_counter() - t0
    n_total = sum(len(d) for d in datasets)
    rng = np.random.default_rng(seed)
    picks = [(d, i) for d, ds in enumerate(datasets) for i in range(len(ds))]
    if sample is not None and sample < len(picks):
        picks = [picks[j] for j in np.sort(rng.choice(len(picks), size=sample, replace=False))]
    t1 = time.perf_counter()
    ours_tokens = [datasets[d][i]["tokens"] for d, i in picks]
    t_ours_iter = time.perf_counter() - t1

    # The same rows' messages, rendered ahead of time (not timed) for torchtune's chat_dataset.
    path = tmp / f"{run.name}_messages.jsonl"
    rows = {s: load_prompt_rows(run, split=s) for s in ("train", "test")}
    with open(path, "w", encoding="utf-8") as f:
        for d, i in picks:
            r = rows["train" if d == 0 else "test"]
            messages = render_messages(r.parts[i], int(r.rating[i]))
            f.write(json.dumps({"messages": [{"role": m.role, "content": m.text_content} for m in messages]}) + "\n")
    t2 = time.perf_counter()
    theirs = chat_dataset(tok, source="json", data_files=str(path), conversation_style="openai", conversation_column="messages", split="train")
    t_theirs_construct = time.perf_counter() - t2
    theirs_tokens = [theirs[j]["tokens"] for j in range(len(theirs))]
    t_theirs = time.perf_counter() - t2
    same = sum(a == b for a, b in zip(ours_tokens, theirs_tokens))

    # Construction covers every row; on a sample it is charged pro rata to the sampled samples.
    ours_total = t_construct * len(picks) / n_total + t_ours_iter
    return {
        "rows": n_total,
        "tokenized_samples": len(picks),
        "identical_token_sequences": same,
        "retrieve_s": round(t_retrieve, 2),
        "construct_s (retrieve + join + render parts, all rows)": round(t_construct, 2),
        "tokenize_s": round(t_ours_iter, 2),
        "ours_samples_per_s": round(len(picks) / ours_total, 1),
        "chat_dataset_construct_s": round(t_theirs_construct, 2),
        "chat_dataset_samples_per_s": round(len(picks) / t_theirs, 1),
        "time_ratio_ours_over_chat_dataset": round(ours_total / t_theirs, 3),
        "mean_tokens": round(float(np.mean([len(t) for t in ours_tokens])), 1),
        "max_tokens": int(max(len(t) for t in ours_tokens)),
    }


def bench_retrieval(run: Path, dim: int = 384, seed: int = 0) -> dict:
    from persona_tune.memory.embeddings import l2_normalise
    from persona_tune.memory.retrieval import retrieve
    from persona_tune.memory.stage import query_rows
    from persona_tune.runfolder import ITEM_IDS, MEMORY_IDS, PROFILE_IDS, RunFolder

    folder = RunFolder(run)
    rows = query_rows(folder)
    memories = folder.read_table(MEMORY_IDS)
    item_ids = folder.read_table(ITEM_IDS)["item_id"].to_numpy()
    profile_ids = folder.read_table(PROFILE_IDS)["user_id"].to_numpy()
    rng = np.random.default_rng(seed)
    items = l2_normalise(rng.standard_normal((len(item_ids), dim), dtype=np.float32))
    profiles = l2_normalise(rng.standard_normal((len(profile_ids), dim), dtype=np.float32))
    mems = l2_normalise(rng.standard_normal((len(memories), dim), dtype=np.float32))
    out = {"rows": len(rows), "users": int(rows.user_id.nunique()), "memories": len(memories), "dim": dim}
    for query in ("item", "user+item"):
        tracemalloc.start()
        t0 = time.perf_counter()
        got = retrieve(rows, memories, mems, item_ids, items, k=1, delta=-1.0, query=query,
                       profile_ids=profile_ids, profile_vectors=profiles, progress=False)
        seconds = time.perf_counter() - t0
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        out[query] = {"seconds": round(seconds, 2), "retrieved": len(got), "peak_traced_mib": round(peak / 2**20, 1)}
    out["vectors_mib"] = round((items.nbytes + profiles.nbytes + mems.nbytes) / 2**20, 1)
    out["process_max_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return out


def score_distribution(run: Path) -> dict:
    """Top-1 cosine of every row with no threshold, per query form, from the run's stored vectors."""
    from persona_tune.memory.retrieval import retrieve
    from persona_tune.memory.stage import query_rows
    from persona_tune.memory.vectors import load_vectors
    from persona_tune.runfolder import RunFolder

    r = RunFolder(run)
    v, rows = load_vectors(r), query_rows(r)
    out = {"model": v.model, "rows": len(rows)}
    for query in ("item", "user+item"):
        got = retrieve(rows, v.memory_ids, v.memory_vectors, v.item_ids, v.item_vectors, k=1, delta=-1.0,
                       query=query, profile_ids=v.profile_ids, profile_vectors=v.profile_vectors, progress=False)
        s = got["score"].to_numpy()
        out[query] = {"quantiles_1_5_25_50": np.round(np.quantile(s, [0.01, 0.05, 0.25, 0.5]), 3).tolist()} | {
            f"share_at_least_{d}": round(float((s >= d).mean()), 3) for d in (0.3, 0.5, 0.7)
        }
    return out


def bench_kmeans(n: int = 100_000, dim: int = 384, k: int = 4, seed: int = 0) -> dict:
    from persona_tune.memory.embeddings import l2_normalise
    from persona_tune.personas import kmeans

    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((8, dim)).astype(np.float32)
    x = l2_normalise(centres[rng.integers(0, 8, n)] + rng.standard_normal((n, dim), dtype=np.float32))
    t0 = time.perf_counter()
    model = kmeans(x, k, seed=seed, n_init=10)
    return {"n": n, "dim": dim, "k": k, "n_init": 10, "seconds": round(time.perf_counter() - t0, 2),
            "iterations": int(model.n_iter_)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--small", type=Path, help="200-user ML-1M run (built if absent)")
    p.add_argument("--large", type=Path, help="all-users run of the partial ML-1M file (built if absent)")
    p.add_argument("--sample", type=int, default=20_000, help="rows tokenized on the large run")
    p.add_argument("--only", nargs="+", default=["build", "retrieval", "kmeans"],
                   choices=["build", "retrieval", "kmeans", "none"], help="sections to run ('none': only --scores)")
    p.add_argument("--scores", type=Path, nargs="*", default=[],
                   help="embedded runs whose top-1 score distribution to report (for choosing delta)")
    p.add_argument("--kmeans-n", type=int, default=100_000, help="points clustered by the kmeans section")
    p.add_argument("--json", type=Path, help="write the results here too")
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        os.environ.setdefault("HF_DATASETS_CACHE", str(tmp / "hf"))
        results = {"cpu_count": os.cpu_count(), "load_average_at_start": os.getloadavg()}
        need_runs = {"build", "retrieval"} & set(args.only)
        small = args.small or (build_run(tmp / "small", all_users=False) if "build" in args.only else None)
        large = args.large or (build_run(tmp / "large", all_users=True) if need_runs else None)
        if "build" in args.only:
            tok = tiny_tokenizer(tmp)
            results["build_200_users"] = bench_build(small, tok, tmp, sample=None)
            results["build_all_users"] = bench_build(large, tok, tmp, sample=args.sample)
        if "retrieval" in args.only:
            results["retrieval_all_users"] = bench_retrieval(large)
        for run in args.scores:
            results[f"scores {run}"] = score_distribution(run)
        if "kmeans" in args.only:
            results["kmeans"] = bench_kmeans(n=args.kmeans_n)
        results["load_average_at_end"] = os.getloadavg()
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
