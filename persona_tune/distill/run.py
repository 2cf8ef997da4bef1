"""Distil each user's train ratings into a profile (M_s) and per-rating explanations (M_l).

``--backend offline`` writes deterministic rule-based text from each user's statistics (no LLM).
``--backend openai`` runs the paper's hierarchical self-reflection through any OpenAI-compatible
server (OpenAI, vLLM, llama.cpp, Ollama); every answer is kept in distill/requests.sqlite, so a
re-run after a crash, Ctrl-C or kill -9 resumes without repeating an answered call. ``--batch-out`` /
``--batch-in`` send the same requests through OpenAI Batch files instead (distill/batch.py). Traits
(activity, conformity, diversity) come from the statistics in both cases.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd

from persona_tune.distill import batch, llm, offline
from persona_tune.distill.config import LLM, TRANSPORT_KEYS, DistillConfig
from persona_tune.distill.llm import MEMORY_FIELDS, PROFILE_FIELDS
from persona_tune.distill.traits import compute_traits
from persona_tune.history import History
from persona_tune.errors import ConfigError, DataError
from persona_tune.distill.store import RequestStore
from persona_tune.runfolder import (
    DISTILL_FAILURES,
    DISTILL_REQUESTS,
    ITEMS,
    MEMORIES,
    PROFILES,
    RATINGS_TRAIN,
    TRAITS,
    RunFolder,
    atomic_write_parquet,
    atomic_write_text,
)
from persona_tune.stage import add_config_arguments, config_from_args, validate

log = logging.getLogger(__name__)
PROVENANCE_COLUMNS = ["backend", "model", "prompt_version"]
PROFILE_COLUMNS = [*PROFILE_FIELDS, *PROVENANCE_COLUMNS]
MEMORY_COLUMNS = [*MEMORY_FIELDS, *PROVENANCE_COLUMNS]
TRAIN_COLUMNS = ["user_id", "item_id", "rating", "timestamp"]
ITEM_COLUMNS = ["item_id", "title", "year", "genres", "hist_avg", "text"]
INPUTS = (RATINGS_TRAIN, ITEMS)
OUTPUTS = (PROFILES, MEMORIES, TRAITS)


# ---------------------------------------------------------------- inputs

def _require_columns(df: pd.DataFrame, columns: list[str], path: Path) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise DataError(f"missing column(s) {', '.join(missing)} (see docs/architecture.md, prepare)", path)


def load_inputs(run: RunFolder, users: int | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Train rows (time order per user; first ``users`` user ids if given) with each row's item average
    (``hist_avg``, at the user's cutoff), and the items table."""
    run.require(RATINGS_TRAIN, ITEMS)
    train = run.read_ratings("train")
    items = run.read_items()
    _require_columns(train, TRAIN_COLUMNS, run.ratings_train)
    _require_columns(items, ITEM_COLUMNS, run.items)
    bad = ~train["rating"].isin([1, 2, 3, 4, 5])
    if bad.any():
        row = int(bad.to_numpy().nonzero()[0][0])
        raise DataError(f"rating {train['rating'].iloc[row]!r} is not an integer 1-5", run.ratings_train, row + 1)
    unknown = ~train["item_id"].isin(items["item_id"])
    if unknown.any():
        row = int(unknown.to_numpy().nonzero()[0][0])
        raise DataError(f"item_id {int(train['item_id'].iloc[row])} is not in {run.items}", run.ratings_train, row + 1)
    if items["item_id"].duplicated().any():
        raise DataError(f"duplicate item_id {int(items.loc[items['item_id'].duplicated(), 'item_id'].iloc[0])}", run.items)
    if len(train) == 0:
        raise DataError("no train rows", run.ratings_train)
    if users is not None:
        keep = sorted(train["user_id"].unique())[:users]
        train = train[train["user_id"].isin(keep)]
    train = train[TRAIN_COLUMNS].sort_values(["user_id", "timestamp", "item_id"], kind="mergesort").reset_index(drop=True)
    # Each row's item average as known at its user's cutoff (persona_tune/history.py), for the traits
    # and the offline texts.
    train["hist_avg"] = History.load(run).row_stats(train["user_id"].to_numpy(), train["item_id"].to_numpy())[0]
    return train, items


# ---------------------------------------------------------------- outputs

def write_outputs(run: RunFolder, profiles: pd.DataFrame, memories: pd.DataFrame, traits: pd.DataFrame,
                  failures: list[dict], provenance: dict[str, str]) -> None:
    for df in (profiles, memories):
        for column, value in provenance.items():
            df[column] = value
    profiles = profiles[PROFILE_COLUMNS].sort_values("user_id", kind="mergesort").reset_index(drop=True)
    memories = memories[MEMORY_COLUMNS].sort_values(["user_id", "timestamp", "item_id"], kind="mergesort").reset_index(drop=True)
    for column in ("user_id", "item_id", "rating", "timestamp"):
        memories[column] = memories[column].astype("int64")
    profiles["user_id"] = profiles["user_id"].astype("int64")
    run.stage_dir("distill", create=True)
    atomic_write_parquet(traits, run.path(TRAITS))
    atomic_write_parquet(profiles, run.path(PROFILES))
    atomic_write_parquet(memories, run.path(MEMORIES))
    atomic_write_text(run.path(DISTILL_FAILURES), "".join(json.dumps(f, sort_keys=True) + "\n" for f in failures))


def distill(run: RunFolder, cfg: DistillConfig, dry_run: bool = False, price_per_1k: tuple[float, float] | None = None) -> dict:
    """The stage's core. Returns the summary (also recorded in the manifest)."""
    validate(cfg)  # the one check of the Config (persona_tune/stage.py), before anything is read
    started = time.perf_counter()
    inputs = run.checksums(*INPUTS)
    record = run.stage_record("distill")
    if (not dry_run and record is not None and record.get("inputs") == inputs
            and {k: v for k, v in record["params"].items() if k not in TRANSPORT_KEYS} == cfg.results_params()
            and record["summary"].get("users_failed") == 0 and all(run.path(p).is_file() for p in OUTPUTS)):
        log.info("distill is finished with the same options and inputs: skipped (nothing written)")
        return {**record["summary"], "skipped": True}
    train, items = load_inputs(run, cfg.users)
    traits, cuts = compute_traits(train, items, cfg.trait_cuts)

    if cfg.backend == "offline":
        if dry_run:
            return {"users": int(train["user_id"].nunique()), "calls": 0, "prompt_tokens": 0, "completion_tokens": 0}
        profiles, memories = offline.distill_offline(train, items, traits)
        provenance = {"backend": offline.BACKEND, "model": offline.MODEL, "prompt_version": offline.PROMPT_VERSION}
        failures: list[dict] = []
        summary: dict[str, Any] = {"users_done": len(profiles), "users_failed": 0, "calls": 0, "cached": 0}
    else:
        llm.check_endpoint(cfg)
        if dry_run:
            return llm.dry_run_estimate(train, items, cfg, price_per_1k)
        ingested: dict[str, Any] = {}
        if cfg.batch_in:
            with RequestStore(run.path(DISTILL_REQUESTS)) as store:
                ingested = batch.ingest(store, [Path(p) for p in cfg.batch_in])
        if cfg.batch_out or cfg.batch_in or not llm.endpoint_url(cfg):
            # Answers from the store alone; what is missing goes to Batch files or waits for the next --batch-in.
            replayed = batch.replay(run, train, items, traits, cfg, Path(cfg.batch_out) if cfg.batch_out else None)
            if replayed.tables is None:
                if not (cfg.batch_out or cfg.batch_in):
                    raise llm.no_endpoint_error(replayed.summary["requests_waiting"])
                return {**ingested, **replayed.summary, "waiting": True}
            profiles, memories, failures, provenance, summary = replayed.tables
            summary = {**ingested, **summary}
        else:
            profiles, memories, failures, provenance, summary = llm.distill_llm(run, train, items, traits, cfg)

    write_outputs(run, profiles, memories, traits, failures, provenance)
    summary["memories"] = len(memories)
    summary["seconds"] = round(time.perf_counter() - started, 3)
    run.record_stage("distill", cfg.params(), **provenance, trait_cuts=cuts, summary=summary, inputs=inputs)
    return summary


def run(run: RunFolder, cfg: DistillConfig) -> dict:
    """The `distill` stage (the stage shape): :func:`distill` without a dry run."""
    return distill(run, cfg)


# ---------------------------------------------------------------- CLI

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", required=True, help="run folder written by `persona-tune prepare`")
    groups = add_config_arguments(parser, DistillConfig, skip=("progress",), type_metavars=False)
    groups[LLM].add_argument("--dry-run", action="store_true",
                             help="print the number of calls and a token estimate, then exit")
    groups[LLM].add_argument("--price-per-1k", type=float, nargs="+", default=None, metavar="PRICE",
                             help="with --dry-run: price per 1k prompt tokens [and per 1k completion tokens]")
    add_config_arguments(parser, DistillConfig, only=("progress",))


def main(args: argparse.Namespace) -> int:
    cfg = config_from_args(DistillConfig, args)
    price = None
    if args.price_per_1k:
        if len(args.price_per_1k) > 2:
            raise ConfigError("--price-per-1k takes one price, or a prompt and a completion price")
        price = (args.price_per_1k[0], args.price_per_1k[-1])
    if not args.verbose:
        for noisy in ("httpx", "httpx2", "openai"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    folder = RunFolder(args.run)
    summary = distill(folder, cfg, dry_run=args.dry_run, price_per_1k=price)
    if args.dry_run:
        line = (f"dry run: {summary['users']} users, {summary['calls']} calls, ~{summary['prompt_tokens']:,} prompt + "
                f"~{summary['completion_tokens']:,} completion tokens (estimate: 4 characters per token)")
        if "cost" in summary:
            line += f", ~{summary['cost']:.2f} at the given price"
        print(line + f"; through Batch files: {summary['batch_rounds']} rounds (the longest user's steps)")
        return 0
    return print_result(folder, cfg, summary)


def print_result(folder: RunFolder, cfg: DistillConfig, summary: dict) -> int:
    """What `persona-tune distill` prints of ``run``'s result; the exit code (1 when a user failed)."""
    if summary.get("waiting"):
        print("distill: " + ", ".join(f"{k}={v}" for k, v in summary.items() if k != "waiting"))
        where = (f"round {summary['batch_round']}: {summary['requests_waiting']} request(s) written to "
                 f"{summary['batch_dir']}" if "batch_round" in summary
                 else f"{summary['requests_waiting']} request(s) wait; write them with --batch-out DIR")
        print(f"distill: {where}; at least {summary['rounds_left_at_least']} more round(s) of --batch-out, the Batch "
              "job and --batch-in before the outputs are written", file=sys.stderr)
        return 0
    print("distill: " + ", ".join(f"{k}={v}" for k, v in summary.items()))
    if summary["users_failed"]:
        failures = folder.path(DISTILL_FAILURES)
        first = json.loads(failures.read_text(encoding="utf-8").splitlines()[0])
        print(f"distill: {summary['users_failed']} user(s) failed (first, user {first['user_id']}: {first['reason']}); "
              f"all in {failures}; re-run to retry them (answered calls are not repeated)", file=sys.stderr)
        return 1
    return 0
