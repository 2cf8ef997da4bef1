"""Evaluate recommenders with the run's user agents: slates in, simulated feedback and fidelity out.

    persona-tune simulate --run RUN --variant persona [--recs FILE ...] [-- KEY=VALUE ...]

Every (user, item) of the recs files (docs/simulation.md has the format) and of the reference
recommenders (persona_tune.simulate.recommenders, unless --no-reference) is rated by the variant's
agent in scoring mode (expected rating and p(rating >= 4), through UserAgent and the eval engine's
shared-prefix batching) and by the classical simulator (the bias baseline as a rater,
persona_tune.simulate.classical). Probe rows measure fidelity: up to --candidates held-out test items
per user (the items the ``@heldout`` recommenders re-rank) and --negatives times as many sampled items
the user never rated. Results go to RUN/simulate/<name>/ (name: --name, else the variant): recs,
probes and predictions (Parquet) and metrics.json. The agent's scores are written in chunks under
parts/ with a fingerprint of the model, adapters and inputs; a re-run scores only the (user, item)
pairs no matching chunk holds, so a stopped run resumes and new recommenders reuse old scores.
Arguments after ``--`` are eval config overrides (as for `persona-tune eval`).

``--validity`` runs the validity protocol instead (persona_tune.simulate.validity): 16 recommenders
rank every sampled user's whole held-out set, and each simulator (the agent, ``--predictions`` files,
the classical simulator, a popularity and an item-blind rater) is judged by how it orders them
against the truth; results in RUN/simulate/<name>/validity.json (name: --name, else
validity-<variant>).
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from persona_tune.errors import ConfigError
from persona_tune.history import History
from persona_tune.names import FAMILIES, MEMORY_MODES
from persona_tune.runfolder import RunFolder, atomic_write_json, atomic_write_parquet
from persona_tune.serving.remote import RemoteOptions
from persona_tune.simulate import fidelity
from persona_tune.simulate.classical import BiasRater
from persona_tune.simulate.fidelity import PROB_COLUMNS
from persona_tune.simulate.recommenders import HELDOUT_SUFFIX, REFERENCE, reference_recs
from persona_tune.simulate.recs import load_recs
from persona_tune.simulate.scoring import make_probes, read_inputs, sample_users, score_with_agent
from persona_tune.overrides import parse_overrides
from persona_tune.stage import add_config_arguments, config_dict, config_from_args, require, validate

log = logging.getLogger(__name__)

CLASSICAL = "classical"  # the simulator name of the bias-baseline rater
FAMILY_CHOICES = FAMILIES


@dataclass
class SimulateConfig(RemoteOptions):
    """`persona-tune simulate`'s options; --backend openai rates with a served agent (docs/serving.md)."""

    variant: str = field(default="persona", metadata={
        "help": "the agents: persona, single_min, single_max, prompted or any trained variant (suffix -ms/-msml/-ml)"})
    recs: tuple[str, ...] = field(default=(), metadata={
        "help": "recs files (CSV or Parquet: recommender, user_id, item_id, rank)"})
    reference: bool = field(default=True, metadata={"help": "add the reference recommenders fit on the train rows"})
    name: str | None = field(default=None, metadata={"help": "output folder RUN/simulate/NAME (None: the variant)"})
    family: str | None = field(default=None, metadata={
        "choices": FAMILY_CHOICES, "help": "model family (None: the one `persona-tune configs` recorded)"})
    memory: str = field(default="ms+ml", metadata={
        "choices": MEMORY_MODES, "help": "memory mode of `prompted` (adapters use their training memory)"})
    k: int = field(default=10, metadata={"min": 1, "help": "slate length of the reference top-k slates and of nDCG@k"})
    candidates: int = field(default=20, metadata={
        "help": "held-out test items per user to probe and re-rank (a seeded sample; 0 = all)"})
    negatives: int = field(default=3, metadata={"help": "unrated items sampled per held-out item (Agent4Rec's 1:3)"})
    users: int | None = field(default=None, metadata={"min": 1, 
        "help": "simulate a seeded sample of this many users (reference slates and probes); None = all"})
    probes: bool = field(default=True, metadata={
        "help": "rate probe rows (held-out candidates and unrated items) for the fidelity metrics"})
    topk: bool = field(default=True, metadata={"help": "reference top-k slates of unseen items (besides @heldout)"})
    like_threshold: float = field(default=0.5, metadata={"gt": 0, "lt": 1, "help": "p_like at which a simulator 'would watch'"})
    chunk_rows: int = field(default=256, metadata={"min": 1, "help": "(user, item) pairs per resumable chunk"})
    n_boot: int = field(default=1000, metadata={"min": 1, "help": "bootstrap resamples of users for the CIs"})
    seed: int = 0
    num_threads: int | None = field(default=None, metadata={"help": "torch threads (None: torch's default)"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})
    validity: bool = field(default=False, metadata={
        "help": "run the validity protocol (docs/simulation.md): recommenders re-rank each user's whole held-out "
                "set; --candidates/--negatives then size the watch check"})
    predictions: tuple[str, ...] = field(default=(), metadata={
        "metavar": "[NAME=]FILE", "help": "--validity: more simulators, from files of p1..p5 per (user_id, item_id) "
                                          "(e.g. an eval predictions.parquet of every test row)"})
    agent: bool = field(default=True, metadata={
        "help": "--validity: rate with the --variant agent (--no-agent: only --predictions, classical and the nulls)"})
    overrides: tuple[str, ...] = field(default=(), metadata={
        "positional": True, "metavar": "KEY=VALUE", "help": "eval config overrides, after `--`"})

    def validate(self) -> None:
        super().validate()  # RemoteOptions: a served agent needs an endpoint
        # The numbers' ranges are in the fields' metadata (persona_tune.stage.validate checks them first).
        require(bool(self.recs) or self.reference or self.validity,
                "nothing to simulate: give --recs FILE or keep --reference")
        require(not (self.validity and self.recs), "--recs is for slates; --validity ranks each user's held-out set "
                "with its own recommenders (give --recs without --validity)")
        require(self.validity or (not self.predictions and self.agent),
                "--predictions and --no-agent belong to --validity")
        for spec in self.predictions:
            require(bool(spec.rpartition("=")[2]), f"--predictions takes [NAME=]FILE, got {spec!r}")
        require(self.name is None or (self.name and "/" not in self.name and not self.name.startswith(".")),
                f"--name must be a plain folder name, got {self.name!r}")
        parse_overrides(self.overrides)

    @property
    def out_name(self) -> str:
        return self.name or (f"validity-{self.variant if self.agent else 'baselines'}" if self.validity else self.variant)


@dataclass
class SimulateSummary:
    name: str
    out_dir: str
    recommenders: list[str]
    recs_rows: int
    probe_rows: int
    pairs: int  # unique (user, item) the agent rates
    scored: int  # of them scored in this call
    reused: int  # of them found in parts/ with the same fingerprint
    seconds: float  # agent scoring time in this call (prompts, retrieval and forward passes; no model load)
    rows_per_s: float | None
    metrics: dict


def run(run: RunFolder, cfg: SimulateConfig) -> SimulateSummary:
    """Rate every recs and probe row with the agent and the classical simulator; write RUN/simulate/<name>/.
    With ``cfg.validity``: the validity protocol (persona_tune.simulate.validity.run; its summary)."""
    validate(cfg)  # ranges (field metadata), then SimulateConfig.validate
    if cfg.validity:
        from persona_tune.simulate import validity

        return validity.run(run, cfg)
    train, test, items, item_ids, train_users = read_inputs(run)

    # 1. Inputs, every check before anything is written.
    recs = load_recs(cfg.recs, train_users, item_ids)
    users = sample_users(test[test["user_id"].isin(train_users)], cfg.users, cfg.seed)
    probes = make_probes(train, test, item_ids, users if cfg.probes else users[:0], cfg.candidates,
                         cfg.negatives, cfg.seed)
    if cfg.reference:
        heldout = probes[probes["kind"] == "heldout"][["user_id", "item_id"]]
        taken = set(recs["recommender"])
        clash = taken & ({*REFERENCE} | {n + HELDOUT_SUFFIX for n in REFERENCE})
        if clash:
            raise ConfigError(f"recommender name(s) {sorted(clash)} are the reference ones'; rename them or pass "
                              "--no-reference")
        ref = reference_recs(train, item_ids, heldout, k=cfg.k, topk=cfg.topk, seed=cfg.seed, users=users)
        recs = pd.concat([recs, ref.drop(columns=["score"])], ignore_index=True)
    truth = test.set_index(["user_id", "item_id"])["rating"]
    recs["true_rating"] = truth.reindex(pd.MultiIndex.from_frame(recs[["user_id", "item_id"]])).to_numpy(float)
    pairs = pd.concat([recs[["user_id", "item_id"]], probes[["user_id", "item_id"]]]).drop_duplicates(ignore_index=True)
    if pairs.empty:
        raise ConfigError("nothing to simulate: no recs rows and no user with held-out rows")

    # 2. Scores: the agent (resumable) and the classical simulator.
    sim = run.simulation(cfg.out_name)
    agent_scores, stats = score_with_agent(run, sim, cfg, pairs)
    classical = BiasRater.fit(train, items, history=History.load(run))
    classical_scores = pd.concat([pairs.reset_index(drop=True),
                                  classical.rate(pairs["user_id"], pairs["item_id"])], axis=1)
    simulators = {cfg.variant: agent_scores, CLASSICAL: classical_scores}

    # 3. Rows rated by each simulator, then the metrics.
    keep = ["user_id", "item_id", "expected_rating", "p_like", *PROB_COLUMNS]
    predictions = pd.concat([recs.merge(s[keep], on=["user_id", "item_id"], how="left").assign(simulator=name)
                             for name, s in simulators.items()], ignore_index=True)
    probe_rows = pd.concat([probes.merge(s[keep], on=["user_id", "item_id"], how="left").assign(simulator=name)
                            for name, s in simulators.items()], ignore_index=True)
    judged = recs.groupby("recommender")["true_rating"].apply(lambda s: bool(s.notna().all()))
    metrics = {
        "variant": cfg.variant, "name": cfg.out_name, "simulators": list(simulators),
        "classical_model": {"kind": "bias baseline + Gaussian residual", "sigma": classical.sigma,
                            "mu": classical.bias.mu.tolist()},  # one per history bucket
        "users": int(len(users)), "recommenders": sorted(recs["recommender"].unique().tolist()),
        "ranked_recommenders": sorted(judged[judged].index.tolist()),
        "timing": {k: v for k, v in stats.items() if k != "fingerprint"},
        "fidelity": {name: fidelity_metrics(probe_rows[probe_rows["simulator"] == name],
                                            predictions[(predictions["simulator"] == name)
                                                        & predictions["recommender"].isin(judged[judged].index)],
                                            cfg)
                     for name in simulators},
        "feedback": {name: fidelity.feedback(predictions[predictions["simulator"] == name], cfg.n_boot, cfg.seed)
                     for name in simulators},
    }
    columns = ["simulator", "recommender", "user_id", "item_id", "rank", "true_rating", "expected_rating", "p_like",
               *PROB_COLUMNS]
    atomic_write_parquet(recs.drop(columns=["true_rating"]), sim.recs)
    atomic_write_parquet(probe_rows, sim.probes)
    atomic_write_parquet(predictions[columns], sim.predictions)
    atomic_write_json(sim.metrics, metrics)
    run.record_stage(f"simulate/{cfg.out_name}", config_dict(cfg),
                     outputs=[str(p.relative_to(run.root)) for p in (sim.recs, sim.probes, sim.predictions, sim.metrics)])
    return SimulateSummary(
        name=cfg.out_name, out_dir=str(sim.root), recommenders=metrics["recommenders"], recs_rows=len(recs),
        probe_rows=len(probes), pairs=len(pairs), scored=stats["scored"], reused=stats["reused"],
        seconds=stats["seconds"], rows_per_s=stats.get("rows_per_s"), metrics=metrics)


def fidelity_metrics(probe_rows: pd.DataFrame, ranked_rows: pd.DataFrame, cfg: SimulateConfig) -> dict:
    heldout = probe_rows[probe_rows["kind"] == "heldout"]
    unrated = probe_rows[probe_rows["kind"] == "unrated"]
    kw = {"n_boot": cfg.n_boot, "seed": cfg.seed}
    return {
        "taste_auc": fidelity.taste_auc(heldout, **kw),
        "watch_1_1": fidelity.watch_check(heldout, unrated, 1, cfg.like_threshold, **kw),
        "watch_1_3": fidelity.watch_check(heldout, unrated, 3, cfg.like_threshold, **kw),
        "distribution_w1": fidelity.distribution_match(heldout, **kw),
        "ranking": fidelity.ranking_agreement(ranked_rows, k=cfg.k, **kw),
    }


# ---------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", required=True, help="run folder (after `persona-tune train`, or configs for prompted)")
    add_config_arguments(parser, SimulateConfig)


def _fmt(m: dict) -> str:
    v, (lo, hi) = m["value"], m["ci"]
    return "n/a" if v is None or not np.isfinite(v) else f"{v:.3f} [{lo:.3f}, {hi:.3f}]"


def summary_lines(metrics: dict) -> list[str]:
    lines = [f"{'simulator':<14} {'taste AUC':<22} {'acc 1:1':<22} {'F1 1:3':<22} {'W1':<22} {'Kendall tau':<22}"]
    for name, f in metrics["fidelity"].items():
        lines.append(f"{name:<14} {_fmt(f['taste_auc']):<22} {_fmt(f['watch_1_1']['accuracy']):<22} "
                     f"{_fmt(f['watch_1_3']['f1']):<22} {_fmt(f['distribution_w1']):<22} "
                     f"{_fmt(f['ranking']['kendall_tau']):<22}")
    return lines


def main(args: argparse.Namespace) -> int:
    folder, cfg = RunFolder(args.run), config_from_args(SimulateConfig, args)
    return print_result(folder, cfg, run(folder, cfg))


def print_result(folder: RunFolder, cfg: SimulateConfig, summary) -> int:
    """What `persona-tune simulate` prints of ``run``'s result; the exit code."""
    if cfg.validity:
        from persona_tune.simulate.validity import summary_lines as validity_lines

        speed = f", {summary.rows_per_s:.1f} rows/s" if summary.rows_per_s else ""
        print(f"{summary.name}: {len(summary.simulators)} simulators on {summary.rows} (user, item) pairs; agent "
              f"{summary.scored} scored now ({summary.seconds:.1f} s{speed}), {summary.reused} reused")
        print("\n".join(validity_lines(summary.results)))
        print(f"wrote {summary.out_dir}/validity.json")
        return 0
    speed = f", {summary.rows_per_s:.1f} rows/s" if summary.rows_per_s else ""
    print(f"{summary.name}: {len(summary.recommenders)} recommenders, {summary.recs_rows} recs rows, "
          f"{summary.probe_rows} probe rows; {summary.pairs} (user, item) pairs, {summary.scored} scored now "
          f"({summary.seconds:.1f} s{speed}), {summary.reused} reused")
    print("\n".join(summary_lines(summary.metrics)))
    print(f"wrote {summary.out_dir}/")
    return 0
