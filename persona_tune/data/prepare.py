"""Apply the paper's protocol to a rating log and write a run folder's data files.

Keeps the users whose number of ratings lies in [--min-ratings, --max-ratings], samples --n-users
of them (seeded; all of them, with a warning, when fewer are eligible), splits each user's ratings
in time order (ties broken by item id) into the first floor(train_frac * n) for training and the
rest for test, keeps every rating of the source log that is not a test row of a sampled user as the
history (history.parquet), computes each item's historical average from it (``--history``: only the
ratings before a user's split time, or all of them; persona_tune/history.py), and renders each item's
text as in the paper's prompts. Writes ratings_train / ratings_test / items / users / history
(.parquet) and manifest.json (docs/architecture.md).
"""

from __future__ import annotations

import argparse
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from persona_tune.data.loaders import DUPLICATE_POLICIES, RatingLog, load_ratings
from persona_tune.data.metadata import DEFAULT_SUMMARY_WORDS, attach_metadata, load_metadata, render_items
from persona_tune.data.split import split_chronological
from persona_tune.errors import ConfigError
from persona_tune.history import DEFAULT_HISTORY, HISTORY_MODES, N_BUCKETS, History, check_history_mode, history_rows
from persona_tune.runfolder import HISTORY, RunFolder, atomic_write_parquet, file_sha256
from persona_tune.stage import add_config_arguments, config_from_args, validate

log = logging.getLogger(__name__)

TIE_RULE = "sort each user's ratings by (timestamp, item_id); n_train = floor(train_frac * n)"
ITEMS_RULE = "every item of the source item table"


@dataclass(frozen=True)
class Protocol:
    """The paper's protocol: 200 users with 100-200 ratings each, chronological 60:40 split."""

    min_ratings: int = 100
    max_ratings: int = 200
    n_users: int = 200
    seed: int = 0
    train_frac: float = 0.6
    history: str = DEFAULT_HISTORY  # what "other users' ratings" of a row are: persona_tune/history.py

    def check(self) -> None:
        check_history_mode(self.history)
        if not 0 < self.train_frac < 1:
            raise ConfigError(f"--train-frac must be in (0, 1), got {self.train_frac}")
        if self.min_ratings < 2 or self.max_ratings < self.min_ratings:
            raise ConfigError(f"need 2 <= --min-ratings <= --max-ratings, got {self.min_ratings}, {self.max_ratings}")
        if self.n_users < 1:
            raise ConfigError(f"--n-users must be >= 1, got {self.n_users}")
        if math.floor(self.train_frac * self.min_ratings + 1e-9) < 1:
            raise ConfigError("--train-frac * --min-ratings must leave every user at least one train row")


def sample_users(ratings: pd.DataFrame, protocol: Protocol) -> tuple[np.ndarray, int]:
    """Return the sampled user ids (sorted) and the number of eligible users."""
    counts = ratings.groupby("user_id").size()
    eligible = np.sort(counts[(counts >= protocol.min_ratings) & (counts <= protocol.max_ratings)].index.to_numpy())
    if len(eligible) == 0:
        raise ConfigError(
            f"no user has {protocol.min_ratings}-{protocol.max_ratings} ratings "
            f"(counts range {int(counts.min())}-{int(counts.max())}); change --min-ratings/--max-ratings"
        )
    if len(eligible) <= protocol.n_users:
        if len(eligible) < protocol.n_users:
            log.warning("only %d users have %d-%d ratings (asked for %d): taking all of them",
                        len(eligible), protocol.min_ratings, protocol.max_ratings, protocol.n_users)
        return eligible, len(eligible)
    rng = np.random.default_rng(protocol.seed)
    return np.sort(rng.choice(eligible, size=protocol.n_users, replace=False)), len(eligible)


def historical_stats(ratings: pd.DataFrame, test: pd.DataFrame) -> pd.DataFrame:
    """Per item: mean and count of every source rating that is not one of the test rows."""
    key = ["user_id", "item_id"]
    merged = ratings[key + ["rating"]].merge(test[key].assign(_test=True), on=key, how="left")
    hist = merged[merged["_test"].isna()]
    stats = hist.groupby("item_id")["rating"].agg(hist_avg="mean", hist_count="size").reset_index()
    return stats


HIST_AVG_RULES = {
    "all_time": "all source ratings except the sampled users' test rows",
    "before_split": f"items.parquet: the history before the latest of {N_BUCKETS} split-time cutoffs; per row: "
                    "the history before the cutoff of the row's user (persona_tune/history.py)",
}


def build_items(log_: RatingLog, test: pd.DataFrame, noun: str = "movie", history: str = "all_time",
                rows: pd.DataFrame | None = None) -> pd.DataFrame:
    """The items table. ``history`` all_time: hist_avg / hist_count from every non-test rating;
    before_split: from those before the latest bucket cutoff (``rows``: history_rows)."""
    if history == "all_time":
        stats = historical_stats(log_.ratings, test)
    else:
        hist = History.before_split(rows, test, log_.items["item_id"].to_numpy())
        stats = hist.bucket_stats(hist.n_buckets - 1)
    return render_items(log_.items, stats, noun)


def _check_not_overwriting_other_stages(run: RunFolder, proto: dict, inputs: dict, force: bool) -> None:
    """Refuse to change the data under later stages' outputs (re-running with the same inputs is fine)."""
    if force or not run.exists():
        return
    manifest = run.read_manifest()
    later = sorted(s for s in manifest.get("stages", {}) if s != "prepare")
    if later and (manifest.get("protocol") != proto or manifest.get("inputs") != inputs):
        raise ConfigError(
            f"{run.root} already holds stages {', '.join(later)} built on another protocol or input; "
            "use a new --out, or --force to overwrite the data under them"
        )


def _out_folder(out: str | Path) -> RunFolder:
    run = RunFolder(out)
    if run.root.exists() and not run.root.is_dir():
        raise ConfigError(f"--out {run.root} is a file; give a folder for the run")
    return run


def prepare(log_: RatingLog, out: str | Path, protocol: Protocol = Protocol(), *, duplicates: str = "error",
            extra_inputs: dict[str, str] | None = None, item_noun: str = "movie",
            meta_params: dict | None = None, force: bool = False) -> RunFolder:
    """Apply ``protocol`` to ``log_`` and write the `prepare` files of the run folder ``out``."""
    protocol.check()
    run = _out_folder(out)
    proto = {"dataset": log_.dataset, **asdict(protocol), "tie_rule": TIE_RULE, "duplicates": duplicates,
             "items": ITEMS_RULE, "hist_avg": HIST_AVG_RULES[protocol.history]}
    if protocol.history == "before_split":
        proto["history_buckets"] = N_BUCKETS
    inputs = {**log_.inputs, **(extra_inputs or {})}
    _check_not_overwriting_other_stages(run, proto, inputs, force)
    params = {**proto, "meta": meta_params or None, "item_noun": item_noun}
    manifest = run.read_manifest()
    outputs = (run.ratings_train, run.ratings_test, run.items, run.users, run.path(HISTORY))
    if ((manifest["stages"].get("prepare") or {}).get("params") == params and manifest.get("inputs") == inputs
            and all(p.is_file() for p in outputs)):
        log.info("%s is prepared with the same protocol and inputs: skipped", run.root)
        return run
    for path in outputs:  # temporary files of a prepare that was killed
        for leftover in run.root.glob(f".{path.stem}.*{path.suffix}"):
            leftover.unlink()
    users, n_eligible = sample_users(log_.ratings, protocol)
    train, test = split_chronological(log_.ratings, users, protocol.train_frac)
    rows = history_rows(log_.ratings, test)
    items = build_items(log_, test, item_noun, protocol.history, rows)
    per_user = pd.DataFrame({"user_id": users.astype("int64")})
    per_user["n_train"] = per_user["user_id"].map(train.groupby("user_id").size()).fillna(0).astype("int64")
    per_user["n_test"] = per_user["user_id"].map(test.groupby("user_id").size()).fillna(0).astype("int64")
    per_user["n_ratings"] = per_user["n_train"] + per_user["n_test"]
    per_user = per_user[["user_id", "n_ratings", "n_train", "n_test"]]

    run.root.mkdir(parents=True, exist_ok=True)
    atomic_write_parquet(train, run.ratings_train)
    atomic_write_parquet(test, run.ratings_test)
    atomic_write_parquet(items, run.items)
    atomic_write_parquet(per_user, run.users)
    atomic_write_parquet(rows, run.path(HISTORY))

    counts = {
        "source_ratings": len(log_.ratings), "source_users": int(log_.ratings["user_id"].nunique()),
        "source_items": len(log_.items), "eligible_users": n_eligible, "users": len(users),
        "train_rows": len(train), "test_rows": len(test), "items": len(items),
        "items_in_split": int(pd.concat([train["item_id"], test["item_id"]]).nunique()),
        "history_rows": len(rows),
    }
    run.update_manifest(protocol=proto, inputs=inputs, counts=counts)
    run.record_stage("prepare", params, counts=counts)
    log.info("prepared %s: %d users (%d eligible), %d train / %d test rows, %d items",
             run.root, len(users), n_eligible, len(train), len(test), len(items))
    return run


_D = Protocol()
DATASETS = ("ml-1m", "ml-100k", "synthetic", "generic")


@dataclass
class PrepareConfig:
    """The `prepare` stage's options: the input log and the protocol (its CLI arguments are generated from them)."""

    dataset: str | None = field(default=None, metadata={
        "required": True, "choices": DATASETS,
        "help": "input format (synthetic = the ML-1M-format output of `persona-tune synth`)"})
    data_dir: Path | None = field(default=None, metadata={"type": Path, "help": "folder of the dataset's files"})
    ratings_file: str | None = field(default=None, metadata={
        "help": "ratings file name in --data-dir or a path (e.g. ratings.partial-users0001-2999.dat; required for generic)"})
    items_file: str | None = field(default=None, metadata={
        "help": "generic only: item table (CSV/TSV/Parquet) with item, title, year, genres, summary, cast columns "
                "(mapped by --columns)"})
    columns: str | None = field(default=None, metadata={
        "help": "generic only: column mapping, e.g. user=uid,item=iid,rating=stars,timestamp=ts"})
    meta_file: Path | None = field(default=None, metadata={
        "type": Path, "help": "item metadata (summary, cast): JSON {item_id: abstract or {summary, cast}} such as "
                              "ml1m_dbpedia_abstracts.json, or CSV/Parquet with item_id, summary, cast"})
    summary_words: int = field(default=DEFAULT_SUMMARY_WORDS, metadata={
        "help": "truncate summaries to this many words (0: no limit)"})
    min_ratings: int = field(default=_D.min_ratings, metadata={"min": 1, "help": "keep users with at least this many ratings"})
    max_ratings: int = field(default=_D.max_ratings, metadata={"min": 1, "help": "... and at most this many"})
    n_users: int = field(default=_D.n_users, metadata={"min": 1, "help": "users to sample among the eligible ones"})
    seed: int = field(default=_D.seed, metadata={"help": "seed of the user sample"})
    train_frac: float = field(default=_D.train_frac, metadata={"gt": 0, "lt": 1,
        "help": "share of each user's ratings (oldest first) for training"})
    duplicates: str = field(default="error", metadata={
        "choices": DUPLICATE_POLICIES,
        "help": "duplicate (user, item) ratings: fail, or keep the one with the latest timestamp"})
    force: bool = field(default=False, metadata={
        "flag": "--force", "help": "overwrite the data of a run folder whose later stages used another protocol or input"})
    item_noun: str = field(default="movie", metadata={
        "help": "the noun of item texts ('The movie X was released ...')"})
    history: str = field(default=DEFAULT_HISTORY, metadata={
        "choices": HISTORY_MODES,
        "help": "other users' ratings of a row: only those before its user's split time (before_split), or "
                "all non-test ones (all_time, the published cells' definition)"})

    def validate(self) -> None:
        if self.dataset != "generic" and (self.items_file or self.columns):
            raise ConfigError("--items-file and --columns apply to --dataset generic only")

    def protocol(self) -> Protocol:
        return Protocol(min_ratings=self.min_ratings, max_ratings=self.max_ratings, n_users=self.n_users,
                        seed=self.seed, train_frac=self.train_frac, history=self.history)


_INPUT_FIELDS = ("dataset", "data_dir", "ratings_file", "items_file", "columns", "meta_file", "summary_words")


def run(run: RunFolder, cfg: PrepareConfig) -> dict:
    """The `prepare` stage: load the log, apply the protocol, write the run folder; returns the manifest's counts."""
    validate(cfg)  # the one check of the Config (persona_tune/stage.py), before anything is read
    _out_folder(run.root)  # before loading a large log
    log_ = load_ratings(cfg.dataset, cfg.data_dir, ratings_file=cfg.ratings_file, items_file=cfg.items_file,
                        columns=cfg.columns, duplicates=cfg.duplicates)
    extra, meta_params = {}, None
    if cfg.meta_file is not None:
        meta = load_metadata(cfg.meta_file, summary_words=cfg.summary_words)
        log_.items = attach_metadata(log_.items, meta, cfg.meta_file)
        extra[str(cfg.meta_file.resolve())] = file_sha256(cfg.meta_file)
        meta_params = {"file": str(cfg.meta_file), "summary_words": cfg.summary_words}
    folder = prepare(log_, run.root, cfg.protocol(), duplicates=cfg.duplicates, extra_inputs=extra,
                     item_noun=cfg.item_noun, meta_params=meta_params, force=cfg.force)
    return folder.read_manifest()["counts"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, PrepareConfig, only=_INPUT_FIELDS, type_metavars=False)
    parser.add_argument("--out", required=True, type=Path, help="run folder to write")
    add_config_arguments(parser, PrepareConfig, skip=_INPUT_FIELDS, type_metavars=False)


def print_result(folder: RunFolder, cfg: PrepareConfig, c: dict) -> int:
    """What `persona-tune prepare` prints of ``run``'s result; the exit code."""
    print(f"{folder.root}: {c['users']} users ({c['eligible_users']} eligible), "
          f"{c['train_rows']} train / {c['test_rows']} test rows, {c['items']} items")
    return 0


def main(args: argparse.Namespace) -> int:
    folder, cfg = RunFolder(args.out), config_from_args(PrepareConfig, args)
    return print_result(folder, cfg, run(folder, cfg))
