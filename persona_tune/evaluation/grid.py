"""Run the paper's experiment matrix (its Table 1) on one run folder, resumably, then report.

Cells, each evaluated on the same test rows:
- prompted base model with M_s, M_s+M_l and M_l (no training);
- theta_single(min), theta_single(max) and theta_persona, each trained and evaluated with M_s and
  with M_s+M_l.
Training configs are written as RUN/configs/<variant>-<ms|msml>.yaml (from the family's templates,
as `persona-tune configs` writes them) and trained by `persona-tune train`'s machinery into
RUN/adapters/<variant>-<ms|msml>/; evaluation runs `tune run persona_eval` per cell
(`persona-tune eval`); then `persona-tune baselines` (if missing) and `persona-tune report`.
Every step skips finished work: existing configs, trained adapters (train_summary.json), current
eval results. `--max-steps N` caps optimizer steps per epoch (a quick CPU pass); `--cells` runs part
of the matrix (only the adapters those cells need are trained), e.g. on a CPU. Arguments after `--`
override config keys: `KEY=VALUE` of every training config, `eval.KEY=VALUE` of every eval config
(`--train-set KEY=VALUE` / `--eval-set KEY=VALUE`: the old spelling, kept for one release).

`--path trunk` runs the same cells on the frozen-trunk recipe (`lora_frozen_trunk`, from the
family's <family>_trunk templates): configs RUN/configs/trunk[-LABEL]-<variant>-<tag>.yaml, adapters
RUN/adapters/trunk[-LABEL]-<variant>-<tag>/, and the cells RUN/eval/trunk[-LABEL]-<cell>/ gathered
from the predictions each training run writes (one trunk pass over the test rows serves every
cell). `--label` names a set of `-- KEY=VALUE` overrides (e.g. a learning-curve point) so that
several sets live side by side. A config whose settings changed is rewritten and its adapter
retrained; the recipe itself resumes a stopped training run.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass, field

import pandas as pd

from persona_tune.configgen import (
    persona_sizes,
    plan_variants,
    variant_config_text,
    variant_template,
    write_variant_config,
)
from persona_tune.errors import ConfigError, PersonaTuneError, StageMissingError
from persona_tune.names import MEMORY_MODES
from persona_tune.resources import template_dir
from persona_tune.runfolder import (
    ASSIGNMENTS,
    EVAL_INPUTS,
    METRICS,
    PREDICTIONS,
    RATINGS_TEST,
    RATINGS_TRAIN,
    TORCHTUNE_CONFIG,
    TRUNK_SUMMARY,
    RunFolder,
    atomic_write_json,
    atomic_write_text,
    check_name,
    write_predictions,
)
from persona_tune.overrides import parse_overrides
from persona_tune.stage import add_config_arguments, config_from_args, require, validate
from persona_tune.variants import PER_PERSONA, Variant, trunk_prefix

log = logging.getLogger(__name__)

PATHS = ("stock", "trunk")
TRAINED_MEMORIES = ("ms", "ms+ml")
PROMPTED_MEMORIES = MEMORY_MODES
EVAL_PREFIX = "eval."  # `-- eval.KEY=VALUE`: a key of the evaluation (the stock path's eval configs)


def grid_cells(personas: list[int]) -> tuple[list[str], list[str]]:
    """(training variants, eval variants) of the matrix for these persona ids."""
    train, evals = [], [Variant.of("prompted", m).name for m in PROMPTED_MEMORIES]
    for memory in TRAINED_MEMORIES:
        train += [Variant.of(PER_PERSONA, memory).for_persona(k).name for k in personas]
        train += [Variant.of(b, memory).name for b in ("single_min", "single_max")]
        evals += [Variant.of(b, memory).name for b in ("single_min", "single_max", "persona")]
    return train, evals


def select_cells(personas: list[int], cells: list[str] | None) -> tuple[list[str], list[str]]:
    """(training variants, eval cells) for the chosen eval cells; None chooses the whole matrix."""
    train, evals = grid_cells(personas)
    if cells is None:
        return train, evals
    unknown = [c for c in cells if c not in evals]
    if unknown:
        raise ConfigError(f"unknown grid cell(s) {', '.join(unknown)}; the cells are: {', '.join(evals)}")
    needed = []
    for cell in map(Variant.parse, cells):
        if cell.per_persona:
            needed += [cell.for_persona(k).name for k in personas]
        elif not cell.base_model:
            needed.append(cell.name)
    return [t for t in train if t in needed], [e for e in evals if e in cells]


def write_grid_configs(run: RunFolder, family: str, overrides: list[str] = ()) -> list[str]:
    """RUN/configs/<variant>-<tag>.yaml for every trained cell (existing files are kept)."""
    templates = template_dir(family)
    parsed = parse_overrides(list(overrides))
    variants = plan_variants(persona_sizes(run))
    names = []
    for memory in TRAINED_MEMORIES:
        for name, spec in variants.items():
            variant = Variant.of(name, memory).name
            names.append(variant)
            if run.config_file(variant).exists():
                continue
            template = variant_template(templates, name)
            header = f"# {variant}: written by `persona-tune grid` from {family}_persona/{template.stem} ({spec['n_train_rows']} training rows).\n"
            write_variant_config(run, variant, template, spec, memory, parsed, header)
    return names


# A `prompted-<tag>` trunk cell is the base model: these settings, and no override of their top-level keys.
UNTRAINED = {"epochs": 0, "head.init": "none", "head.prior": "none"}


def write_trunk_configs(run: RunFolder, family: str, names: list[str], label: str | None, overrides: list[str],
                        train_rows: str | None = None) -> list[str]:
    """RUN/configs/trunk[-LABEL]-<variant>-<tag>.yaml for the frozen-trunk recipe; `prompted-<tag>` is the base model (no training, no head). ``train_rows``: "all" (every
    training row of the variant's users) or N (N rows drawn over all users: persona_k trains on its
    users' share of those N rows, θ_single(max) on all N, θ_single(min) on as many as the smallest
    persona's share, drawn over all users); None: the paper's sizes. A config whose text changed is rewritten and its adapter's
    train_summary.json removed, so `train` redoes it."""
    templates = template_dir(family, "trunk")
    prefix = trunk_prefix(label)
    parsed = parse_overrides(list(overrides))
    sizes = persona_sizes(run)
    variants = plan_variants(sizes)
    total = int(sizes["n_train_rows"].sum())
    smallest = int(sizes["n_train_rows"].min())
    for variant_name, spec in variants.items() if train_rows is not None else ():
        if train_rows == "all":
            spec.update(subsample=None, n_train_rows=total if spec["persona"] is None else spec["n_train_rows"])
        elif variant_name == "single_min":  # as many rows as the smallest persona's share, drawn over all users
            share = round(int(train_rows) * smallest / total)
            spec.update(subsample=share, n_train_rows=share)
        else:  # the trunk recipe draws subsample rows over all users, then the persona's
            share = int(train_rows) if spec["persona"] is None else round(int(train_rows) * spec["n_train_rows"] / total)
            spec.update(subsample=int(train_rows), n_train_rows=share)
    written = []
    for name in names:
        cell = Variant.parse(name)
        base = cell.base
        spec = {"persona": None, "subsample": None, "n_train_rows": 0} if base == "prompted" else variants[base]
        template = templates / (f"{base}.yaml" if (templates / f"{base}.yaml").is_file() else "persona_0.yaml")
        variant = cell.with_prefix(prefix).name
        untrained, cell_overrides = {}, parsed
        if base == "prompted":
            fixed = {key.split(".")[0] for key in UNTRAINED}
            untrained = UNTRAINED
            cell_overrides = [o for o in parsed if o.lstrip("~").partition("=")[0].split(".")[0] not in fixed]
        text = variant_config_text(run, variant, template, spec, cell.memory, cell_overrides, untrained)
        header = (f"# {variant}: written by `persona-tune grid --path trunk` from {family}_trunk/{template.stem}"
                  f" ({spec['n_train_rows']} training rows).\n# Run: tune run lora_frozen_trunk --config "
                  f"{run.config_file(variant)}\n")
        target = run.config_file(variant)
        if not target.is_file() or target.read_text(encoding="utf-8") != header + text:
            if target.is_file():
                log.warning("%s: settings changed, the adapter is retrained", variant)
                run.train_summary(variant).unlink(missing_ok=True)
            atomic_write_text(target, header + text)
        written.append(variant)
    return written


def collect_trunk_cell(run: RunFolder, cell: str, variants: list[str], n_boot: int) -> None:
    """RUN/eval/<cell>/predictions.parquet and metrics.json from the cell's trained variants."""
    from omegaconf import OmegaConf

    from persona_tune.evaluation.metrics import metrics_info, train_rows_per_persona, variant_metrics

    files = [run.adapter_dir(v) / PREDICTIONS for v in variants]
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise StageMissingError(f"{missing[0]} is missing: the trunk recipe writes it when it finishes")
    predictions = pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)
    cfg = OmegaConf.load(run.adapter_dir(variants[0]) / TORCHTUNE_CONFIG)
    summaries = {v: run.adapter_dir(v) / TRUNK_SUMMARY for v in variants}
    info = metrics_info(cfg, cell, str(run.adapter_dir(variants[0])), len(variants) > 1, path="trunk",
                        trunk={"adapted_layers": int(cfg.adapted_layers), "objective": cfg.objective,
                               "head_init": cfg.head.init, "prompt_template": cfg.prompt_template,
                               "state_numbers": bool(cfg.state_numbers), "epochs": int(cfg.epochs),
                               "collab_memories": int(cfg.get("collab_memories", 0) or 0),
                               "head_prior": cfg.head.get("prior", "none"),
                               "lora_attn_modules": list(cfg.model.lora_attn_modules),
                               "variants": {v: json.loads(p.read_text()) for v, p in summaries.items()
                                            if p.is_file()}})
    profiles = run.read_profiles(missing_ok=True)
    personas = sorted(predictions["persona"].unique().tolist())
    metrics = variant_metrics(predictions, info, profiles=profiles,
                              train_rows_per_persona=train_rows_per_persona(run, personas), n_boot=n_boot)
    inputs_file = run.eval_variant_dir(cell) / EVAL_INPUTS  # written last: the cell is complete and current
    inputs_file.unlink(missing_ok=True)
    write_predictions(predictions, run.eval_predictions(cell))
    atomic_write_json(run.eval_metrics(cell), metrics)
    atomic_write_json(inputs_file, {"config": "trunk cell", "adapters": run.checksums(
        *(str(f.relative_to(run.root)) for f in files))})


def require_trained(results: list) -> None:
    """PersonaTuneError naming the variants whose training failed (``results``: train.run's), if any."""
    failed = [r for r in results if r.status == "failed"]
    if failed:
        raise PersonaTuneError(f"training failed for {', '.join(r.variant for r in failed)}: {failed[0].error}")


def run_trunk(run: RunFolder, family: str, personas: list[int], train_names: list[str], eval_names: list[str],
              label: str | None, train_overrides: list[str], n_boot: int, parallel: bool,
              train_rows: str | None = None) -> tuple[list, dict]:
    """Train the trunk variants the cells need, then gather each cell's predictions."""
    from persona_tune import train
    from persona_tune.train import TRUNK_RECIPE, TrainConfig

    prefix = trunk_prefix(label)
    names = list(train_names) + [c for c in eval_names if Variant.parse(c).base == "prompted"]
    variants = write_trunk_configs(run, family, names, label, train_overrides, train_rows)
    results = train.run(run, TrainConfig(personas=",".join(variants), parallel=parallel, recipe=TRUNK_RECIPE)) \
        if variants else []
    require_trained(results)
    statuses = {}
    for cell in (Variant.parse(c).with_prefix(prefix) for c in eval_names):
        members = [cell.for_persona(k).name for k in personas] if cell.per_persona else [cell.name]
        collect_trunk_cell(run, cell.name, members, n_boot)
        statuses[cell.name] = "done"
    return results, statuses


@dataclass
class GridConfig:
    """The `grid` stage's options (its CLI arguments are generated from them)."""

    family: str | None = field(default=None, metadata={
        "required": True, "choices": ("smollm2", "tiny", "phi3"), "help": "model family"})
    max_steps: int | None = field(default=None, metadata={"min": 1, "help": "optimizer steps per epoch cap for training"})
    cells: str | None = field(default=None, metadata={
        "help": "comma list of eval cells to run (default: all), e.g. prompted-msml,persona-msml,single_max-msml,single_max-ms"})
    parallel: bool = field(default=False, metadata={
        "flag": "--parallel", "help": "train several adapters at once over the GPUs (or CPU cores)"})
    mode: str = field(default="scoring", metadata={"choices": ("scoring", "paper", "both"), "help": "eval mode"})
    path: str = field(default="stock", metadata={
        "choices": PATHS, "help": "stock: torchtune's LoRA recipes + persona_eval; trunk: lora_frozen_trunk (top layers "
                                  "on cached lower-layer outputs, a rating head; scoring mode)"})
    label: str | None = field(default=None, metadata={
        "help": "(--path trunk) name for this set of `-- KEY=VALUE` overrides: cells become trunk-LABEL-<cell>"})
    train_rows: str | None = field(default=None, metadata={
        "metavar": "N|all", "help": "(--path trunk) training rows: N drawn over all users (each persona: its users' "
                                    "share of them; single_max: all N; single_min: the smallest persona's share), "
                                    "or all; default: the paper's sizes"})
    n_boot: int = field(default=1000, metadata={"min": 1, "help": "bootstrap resamples for the CIs"})
    overrides: tuple[str, ...] = field(default=(), metadata={
        "positional": True, "metavar": "KEY=VALUE", "aliases": {"--train-set": "", "--eval-set": EVAL_PREFIX},
        "help": "config overrides, after `--`: KEY=VALUE sets a key of every training config, eval.KEY=VALUE one "
                "of the evaluation (stock path: every eval config; trunk path: the training config's eval "
                "section), e.g. -- epochs=2 eval.max_rows=50"})

    def validate(self) -> None:
        train_rows = self.train_rows
        require(train_rows is None or (self.path == "trunk" and (train_rows == "all" or str(train_rows).isdigit())),
                f"--train-rows takes a number of rows or 'all' with --path trunk, got {train_rows!r}")
        if self.label is not None:
            check_name(self.label, "--label")
        require(self.path != "trunk" or self.mode == "scoring",
                "--path trunk evaluates in scoring mode only; use the stock path for paper mode")
        parse_overrides(self.overrides)

    def split_overrides(self) -> tuple[list[str], list[str]]:
        """(training config overrides, eval config overrides): on the stock path the ``eval.KEY`` ones
        go to the eval configs as ``KEY``; on the trunk path every override is the training config's."""
        if self.path == "trunk":
            return list(self.overrides), []
        train, evals = [], []
        for item in self.overrides:
            delete = item.startswith("~")
            key = item[1:] if delete else item
            if key.startswith(EVAL_PREFIX):
                evals.append(("~" if delete else "") + key[len(EVAL_PREFIX):])
            else:
                train.append(item)
        return train, evals

    def cell_list(self) -> list[str] | None:
        return [c.strip() for c in self.cells.split(",") if c.strip()] if self.cells else None


def run(run: RunFolder, cfg: GridConfig) -> dict:
    """The `grid` stage: configs, training and eval of every cell, then the report; returns what ran and the table."""
    from persona_tune import train
    from persona_tune.evaluation import baselines, report
    from persona_tune.evaluation import run as eval_stage
    from persona_tune.evaluation.baselines import BaselinesConfig
    from persona_tune.evaluation.report import ReportConfig
    from persona_tune.train import TrainConfig

    validate(cfg)  # the one check of the Config (persona_tune/stage.py), before anything is read
    family, mode, path, label = cfg.family, cfg.mode, cfg.path, cfg.label
    train_overrides, eval_overrides = cfg.split_overrides()
    run.require(RATINGS_TRAIN, RATINGS_TEST, ASSIGNMENTS)
    personas = sorted(persona_sizes(run)["persona"].tolist())
    train_names, eval_names = select_cells(personas, cfg.cell_list())
    run.record_stage(f"grid/{trunk_prefix(label)}" if path == "trunk" else "grid",
                     {"family": family, "max_steps": cfg.max_steps, "mode": mode, "cells": eval_names, "path": path,
                      "label": label, "eval_overrides": eval_overrides, "train_overrides": train_overrides})
    steps = [f"max_steps_per_epoch={cfg.max_steps}"] if cfg.max_steps else []
    if path == "trunk":
        results, statuses = run_trunk(run, family, personas, train_names, eval_names, label,
                                      [*train_overrides, *steps], cfg.n_boot, cfg.parallel, cfg.train_rows)
    else:
        write_grid_configs(run, family, train_overrides)
        results = train.run(run, TrainConfig(personas=",".join(train_names), parallel=cfg.parallel,
                                             overrides=tuple(steps))) if train_names else []
        require_trained(results)
        statuses = eval_stage.run(run, eval_stage.EvalConfig(
            variants=",".join(eval_names), family=family, mode=mode,
            overrides=(*eval_overrides, f"metrics.n_boot={cfg.n_boot}")))
    if not (run.baselines_dir / METRICS).is_file():
        baselines.run(run, BaselinesConfig(n_boot=cfg.n_boot))
    table = report.run(run, ReportConfig())
    return {"trained": {r.variant: r.status for r in results}, "evaluated": statuses, "table": table}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", required=True, help="run folder (after `persona-tune personas`)")
    add_config_arguments(parser, GridConfig, type_metavars=False)


def main(args: argparse.Namespace) -> int:
    folder, cfg = RunFolder(args.run), config_from_args(GridConfig, args)
    return print_result(folder, cfg, run(folder, cfg))


def print_result(folder: RunFolder, cfg: GridConfig, out: dict) -> int:
    """What `persona-tune grid` prints of ``run``'s result; the exit code."""
    for variant, status in out["trained"].items():
        print(f"train {variant}: {status}")
    for variant, status in out["evaluated"].items():
        print(f"eval  {variant}: {status}")
    print(out["table"])
    return 0
