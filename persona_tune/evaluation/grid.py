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
of the matrix (only the adapters those cells need are trained), e.g. on a CPU.
"""

from __future__ import annotations

import argparse
import logging

from persona_tune.configgen import parse_overrides, persona_sizes, plan_variants, render_config, template_dir
from persona_tune.errors import ConfigError, PersonaTuneError
from persona_tune.evaluation.run import TAG_OF, evaluate
from persona_tune.runfolder import RunFolder, atomic_write_text

log = logging.getLogger(__name__)

TRAINED_MEMORIES = ("ms", "ms+ml")
PROMPTED_MEMORIES = ("ms", "ms+ml", "ml")


def grid_cells(personas: list[int]) -> tuple[list[str], list[str]]:
    """(training variants, eval variants) of the matrix for these persona ids."""
    train, evals = [], [f"prompted-{TAG_OF[m]}" for m in PROMPTED_MEMORIES]
    for memory in TRAINED_MEMORIES:
        tag = TAG_OF[memory]
        train += [f"persona_{k}-{tag}" for k in personas] + [f"single_min-{tag}", f"single_max-{tag}"]
        evals += [f"single_min-{tag}", f"single_max-{tag}", f"persona-{tag}"]
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
    for cell in cells:
        base, tag = cell.rsplit("-", 1)
        if base == "persona":
            needed += [f"persona_{k}-{tag}" for k in personas]
        elif base != "prompted":
            needed.append(cell)
    return [t for t in train if t in needed], [e for e in evals if e in cells]


def write_grid_configs(run: RunFolder, family: str, overrides: list[str] = ()) -> list[str]:
    """RUN/configs/<variant>-<tag>.yaml for every trained cell (existing files are kept)."""
    templates = template_dir(family)
    parsed = parse_overrides(list(overrides))
    variants = plan_variants(persona_sizes(run))
    names = []
    for memory in TRAINED_MEMORIES:
        for name, spec in variants.items():
            variant = f"{name}-{TAG_OF[memory]}"
            names.append(variant)
            target = run.configs_dir / f"{variant}.yaml"
            if target.exists():
                continue
            template = templates / (f"{name}.yaml" if (templates / f"{name}.yaml").is_file() else "persona_0.yaml")
            settings = {"run_dir": str(run.root), "persona": spec["persona"], "subsample": spec["subsample"],
                        "memory": memory, "output_dir": str(run.adapters_dir / variant)}
            header = f"# {variant}: written by `persona-tune grid` from {family}_persona/{template.stem} ({spec['n_train_rows']} training rows).\n"
            atomic_write_text(target, header + render_config(template, settings, parsed))
    return names


def run_grid(run_dir, family: str, max_steps: int | None = None, mode: str = "scoring",
             eval_overrides: list[str] = (), train_overrides: list[str] = (), n_boot: int = 1000,
             cells: list[str] | None = None, parallel: bool = False) -> dict:
    from persona_tune.evaluation.baselines import run_baselines
    from persona_tune.evaluation.report import write_report
    from persona_tune.train import train

    run = RunFolder(run_dir)
    run.require("ratings_train.parquet", "ratings_test.parquet", "personas/assignments.parquet")
    personas = sorted(persona_sizes(run)["persona"].tolist())
    train_names, eval_names = select_cells(personas, cells)
    run.record_stage("grid", {"family": family, "max_steps": max_steps, "mode": mode, "cells": eval_names,
                              "eval_overrides": list(eval_overrides), "train_overrides": list(train_overrides)})
    write_grid_configs(run, family, train_overrides)
    steps = [f"max_steps_per_epoch={max_steps}"] if max_steps else []
    results = train(run.root, ",".join(train_names), parallel=parallel, overrides=steps) if train_names else []
    failed = [r for r in results if r.status == "failed"]
    if failed:
        raise PersonaTuneError(f"training failed for {', '.join(r.variant for r in failed)}: {failed[0].error}")
    statuses = evaluate(run.root, eval_names, family=family, mode=mode,
                        overrides=[*eval_overrides, f"metrics.n_boot={n_boot}"])
    if not (run.eval_dir / "baselines" / "metrics.json").is_file():
        run_baselines(run.root, n_boot=n_boot)
    table = write_report(run.root)
    return {"trained": {r.variant: r.status for r in results}, "evaluated": statuses, "table": table}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", required=True, help="run folder (after `persona-tune personas`)")
    parser.add_argument("--family", required=True, choices=["smollm2", "tiny", "phi3"], help="model family")
    parser.add_argument("--max-steps", type=int, default=None, help="optimizer steps per epoch cap for training")
    parser.add_argument("--cells", default=None,
                        help="comma list of eval cells to run (default: all), e.g. "
                             "prompted-msml,persona-msml,single_max-msml,single_max-ms")
    parser.add_argument("--parallel", action="store_true",
                        help="train several adapters at once over the GPUs (or CPU cores)")
    parser.add_argument("--mode", default="scoring", choices=["scoring", "paper", "both"], help="eval mode")
    parser.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples for the CIs")
    parser.add_argument("--train-set", dest="train_overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a key of every training config (repeatable)")
    parser.add_argument("--eval-set", dest="eval_overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a key of every eval config (repeatable), e.g. --eval-set max_rows=50")


def main(args: argparse.Namespace) -> int:
    cells = [c.strip() for c in args.cells.split(",") if c.strip()] if args.cells else None
    out = run_grid(args.run, args.family, args.max_steps, args.mode, args.eval_overrides, args.train_overrides,
                   args.n_boot, cells, args.parallel)
    for variant, status in out["trained"].items():
        print(f"train {variant}: {status}")
    for variant, status in out["evaluated"].items():
        print(f"eval  {variant}: {status}")
    print(out["table"])
    return 0
