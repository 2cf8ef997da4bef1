"""Evaluate trained variants of a run: one `tune run persona_eval` subprocess per variant.

Variants (comma list):
- ``persona`` : every persona with its own adapter (RUN/adapters/persona_{k}), each on its users;
- ``single_min``, ``single_max`` or any trained variant X: the one adapter RUN/adapters/X for all users;
- ``prompted`` : the base model without an adapter (memory from --memory).
A suffix ``-ms``, ``-msml`` or ``-ml`` (the grid's names, e.g. ``persona-ms``) selects the adapters
trained with that memory mode. The eval config is the family's ``<family>_persona/eval`` template
with the run, the variant, the adapter folder and the training config's model, tokenizer and
memory filled in; it is saved as RUN/eval/<variant>/eval_config.yaml and the recipe's output goes to
eval.log beside it. A variant is skipped when its last evaluation finished with the same
config (runtime-only keys such as num_threads aside) and the same adapters (eval_inputs.json); inside the recipe, finished personas are skipped, so a stopped
run resumes. Adapters trained on inputs that changed since are refused.
Arguments after `--` are config overrides for every variant, e.g. `-- max_rows=50 batching.batch_size=8`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
from dataclasses import dataclass, field

from omegaconf import DictConfig, OmegaConf

from persona_tune.errors import ConfigError, PersonaTuneError, StageMissingError
from persona_tune.evaluation.evalconfig import adapter_variants, build_eval_config, run_family
from persona_tune.names import FAMILIES, TAG_OF
from persona_tune.overrides import parse_overrides
from persona_tune.resources import die_with_parent, tune_executable
from persona_tune.runfolder import (
    ADAPTER_FILE,
    AGENT_INPUTS,
    BASELINES,
    EVAL_CONFIG,
    EVAL_INPUTS,
    EVAL_LOG,
    METRICS,
    PREDICTIONS,
    RATINGS_TEST,
    RunFolder,
    atomic_write_json,
    atomic_write_text,
    check_adapter,
    check_name,
)
from persona_tune.serving.remote import TRANSPORT_FIELDS, RemoteOptions
from persona_tune.stage import add_config_arguments, config_from_args, validate

log = logging.getLogger(__name__)

# Keys that change how fast the recipe runs or what it prints, not its results.
RUNTIME_KEYS = ("num_threads", "batching.progress", *(f"remote.{k}" for k in TRANSPORT_FIELDS))


def check_adapters(run: RunFolder, variants: list[str]) -> dict[str, dict[str, str]]:
    """Every adapter must be trained to the end (runfolder.check_adapter) and current; returns
    variant -> {adapter file: sha256}."""
    from persona_tune.train import TRAIN_INPUTS, stale_inputs

    shared = run.checksums(*TRAIN_INPUTS)
    missing, unfinished, stale, used = [], [], [], {}
    for variant in variants:
        names = adapter_variants(run, variant)
        files = {}
        for n in names:
            if not run.adapter_dir(n).is_dir():
                missing.append(n)
                continue
            try:
                files[n] = check_adapter(run.adapter_dir(n))
            except StageMissingError as e:
                unfinished.append(str(e))
        stale += [f"{n} ({', '.join(changed)} changed)" for n in names if (changed := stale_inputs(run, n, shared))]
        used[variant] = run.checksums(*(str(f.relative_to(run.root)) for f in files.values()))
    if missing:
        raise StageMissingError(f"no trained adapter for {', '.join(sorted(set(missing)))} in {run.adapters_dir}: "
                                f"run `persona-tune train --run {run.root}` first")
    if unfinished:
        raise StageMissingError(unfinished[0] + (f" (and {len(unfinished) - 1} more)" if len(unfinished) > 1 else ""))
    if stale:
        raise StageMissingError(f"adapters trained on inputs that changed since: {', '.join(sorted(set(stale)))}; "
                                f"re-run `persona-tune train --run {run.root}` (it retrains them), then eval")
    return used


def results_key(cfg: DictConfig) -> str:
    """The eval config as YAML without RUNTIME_KEYS: equal keys give equal results."""
    cfg = cfg.copy()
    for key in RUNTIME_KEYS:
        parent, _, leaf = key.rpartition(".")
        node = OmegaConf.select(cfg, parent) if parent else cfg
        if node is not None and leaf in node:
            node.pop(leaf)
    return OmegaConf.to_yaml(cfg)


def evaluate_variant(run: RunFolder, variant: str, cfg: DictConfig, force: bool = False,
                     adapters: dict[str, str] | None = None, env: dict | None = None) -> str:
    """Run the recipe for one variant unless its results are current; returns 'done' or 'skipped'.
    ``adapters``: checksums of the train summaries of the adapters it evaluates; ``env``: the child's
    environment (default: this process's)."""
    out = run.eval_variant_dir(variant)
    config_file = out / EVAL_CONFIG
    text = OmegaConf.to_yaml(cfg)
    metrics = out / METRICS
    inputs = {"config": results_key(cfg), "adapters": adapters or {}, "data": run.checksums(*AGENT_INPUTS)}
    inputs_file = out / EVAL_INPUTS
    # inputs_file is written only after the recipe succeeded (and removed before it starts).
    if (not force and inputs_file.is_file() and json.loads(inputs_file.read_text(encoding="utf-8")) == inputs
            and metrics.is_file()):
        log.info("%s: results are current, skipped", variant)
        return "skipped"
    atomic_write_text(config_file, text)
    # The outputs this evaluation replaces go first: a failed or stopped one leaves no old numbers
    # behind that `report` could publish (the recipe resumes from its fingerprinted parts/).
    for old in (inputs_file, metrics, out / PREDICTIONS):
        old.unlink(missing_ok=True)
    cmd = [tune_executable(), "run", "persona_eval", "--config", str(config_file)]
    log.info("%s: %s", variant, " ".join(cmd))
    with open(out / EVAL_LOG, "w", encoding="utf-8") as logf:
        # The child dies with this process, even by kill -9 (then it writes nothing more).
        proc = subprocess.run(cmd, stdout=logf, stderr=subprocess.STDOUT, env=dict(env or os.environ),
                              preexec_fn=die_with_parent)
    if proc.returncode != 0:
        tail = (out / EVAL_LOG).read_text(encoding="utf-8", errors="replace").splitlines()[-15:]
        raise PersonaTuneError(f"evaluating {variant} failed (exit {proc.returncode}); end of {out / EVAL_LOG}:\n"
                               + "\n".join(tail))
    atomic_write_json(inputs_file, inputs)
    return "done"


def stale_results(run: RunFolder) -> list[str]:
    """Eval variants whose adapters or data (AGENT_INPUTS) changed since they were evaluated (see
    EVAL_INPUTS), or which scored an adapter that is not its finished training's (e.g. epoch_0 of an
    interrupted one)."""
    stale, data = [], None
    for inputs_file in sorted(run.eval_dir.glob(f"*/{EVAL_INPUTS}")):
        inputs = json.loads(inputs_file.read_text(encoding="utf-8"))
        if "data" in inputs:
            data = run.checksums(*AGENT_INPUTS) if data is None else data
            if inputs["data"] != data:
                stale.append(inputs_file.parent.name)
                continue
        recorded = inputs.get("adapters", {})
        if run.checksums(*recorded) != recorded or not all(_finished_adapter(run, rel) for rel in recorded
                                                            if rel.endswith(ADAPTER_FILE)):
            stale.append(inputs_file.parent.name)
    return stale


def unfinished_results(run: RunFolder) -> list[str]:
    """Eval variants with a metrics.json but no eval_inputs.json: their last evaluation failed or was
    stopped, so the numbers are not current (the baselines, written by `baselines`, aside)."""
    return [p.parent.name for p in run.eval_metric_files()
            if p.parent.name != BASELINES and not (p.parent / EVAL_INPUTS).is_file()]


def _finished_adapter(run: RunFolder, rel: str) -> bool:
    path = run.root / rel
    try:
        return check_adapter(path.parent.parent, verify=False) == path
    except PersonaTuneError:
        return False


@dataclass
class EvalConfig(RemoteOptions):
    """The `eval` stage's options (its CLI arguments are generated from them); --backend openai rates
    with the served agents (docs/serving.md)."""

    variants: str = field(default="persona,single_min,single_max", metadata={
        "help": "comma list: persona, single_min, single_max, prompted, any trained variant; "
                "suffix -ms/-msml/-ml for the grid's memory modes"})
    mode: str = field(default="scoring", metadata={
        "choices": ("scoring", "paper", "both"),
        "help": "scoring: probability-weighted rating; paper: generate 4 tokens and parse"})
    family: str | None = field(default=None, metadata={
        "choices": FAMILIES, "help": "model family (default: the one `persona-tune configs` recorded)"})
    memory: str = field(default="ms+ml", metadata={
        "choices": tuple(TAG_OF), "help": "memory mode of `prompted` (adapters use their training memory)"})
    force: bool = field(default=False, metadata={"flag": "--force", "help": "re-run variants whose results are current"})
    overrides: tuple[str, ...] = field(default=(), metadata={
        "positional": True, "metavar": "KEY=VALUE", "help": "eval config overrides, after `--`"})

    def validate(self) -> None:
        super().validate()  # RemoteOptions: a served agent needs an endpoint
        parse_overrides(list(self.overrides))
        if self.backend != "local" and self.mode != "scoring":
            raise ConfigError("--backend openai rates in scoring mode only (the expected rating): use --mode scoring")

    def variant_list(self) -> list[str]:
        return [v.strip() for v in self.variants.split(",") if v.strip()]


def run(run: RunFolder, cfg: EvalConfig) -> dict[str, str]:
    """The `eval` stage: `tune run persona_eval` per variant unless current; variant -> 'done' or 'skipped'.
    With ``cfg.backend`` openai the recipe rates through the server that serves each variant's
    `persona-tune serve-export` bundle."""
    validate(cfg)  # the one check of the Config (persona_tune/stage.py), before anything is read
    run.require(RATINGS_TEST)
    variants = [check_name(v) for v in cfg.variant_list()]
    family = run_family(run, cfg.family)
    adapters = check_adapters(run, variants)
    configs = {v: build_eval_config(run, v, family, cfg.memory, cfg.mode, list(cfg.overrides)) for v in variants}
    env = None
    if cfg.backend != "local":
        from persona_tune.net import redact
        from persona_tune.serving.remote import SECRET_URL_ENV, endpoint
        from persona_tune.serving.export import read_serving_spec

        url = endpoint(cfg)
        remote = {k: v for k, v in cfg.remote_dict().items() if k != "backend"}
        for v, eval_cfg in configs.items():
            read_serving_spec(run, v)  # exported? (names the command if not)
            eval_cfg.backend = cfg.backend
            eval_cfg.remote = remote
            if url and redact(url) != url:  # a password in the URL: never in eval_config.yaml or eval_inputs.json
                eval_cfg.remote.base_url = redact(url)
                env = {**os.environ, SECRET_URL_ENV: url}
    return {v: evaluate_variant(run, v, eval_cfg, cfg.force, adapters[v], env) for v, eval_cfg in configs.items()}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", required=True, help="run folder (after `persona-tune train`)")
    add_config_arguments(parser, EvalConfig, type_metavars=False)


def print_result(folder: RunFolder, cfg: EvalConfig, results: dict[str, str]) -> int:
    """What `persona-tune eval` prints of ``run``'s result; the exit code."""
    for variant, status in results.items():
        print(f"{variant:<16} {status:<8} {folder.eval_metrics(variant)}")
    return 0


def main(args: argparse.Namespace) -> int:
    folder, cfg = RunFolder(args.run), config_from_args(EvalConfig, args)
    return print_result(folder, cfg, run(folder, cfg))
