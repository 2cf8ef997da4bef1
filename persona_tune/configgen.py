"""Write drop-in torchtune configs for each persona and the two single-LoRA baselines of a run.

For every persona k in RUN/personas/assignments.parquet this writes RUN/configs/persona_k.yaml (one
LoRA on that persona's users), plus single_min.yaml and single_max.yaml: one LoRA on all users with
the training data subsampled to the size of the smallest / largest persona's training set, as the
paper does. Each is the chosen family's template (configs/<family>_persona/) with run_dir, persona,
subsample, memory and output_dir (RUN/adapters/<variant>) filled in; `-- key=value` changes any
other key. The files run as they are:
`tune run lora_finetune_single_device --config RUN/configs/persona_0.yaml`.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass, field
from pathlib import Path

from persona_tune.errors import ConfigError, DataError
from persona_tune.names import DEFAULT_MEMORY, FAMILIES, MEMORY_MODES
from persona_tune.overrides import apply_overrides, parse_overrides
from persona_tune.resources import template_dir
from persona_tune.runfolder import ASSIGNMENTS, RATINGS_TRAIN, RunFolder, atomic_write_text, check_name
from persona_tune.stage import add_config_arguments, config_from_args, validate
from persona_tune.variants import PER_PERSONA, Variant

log = logging.getLogger(__name__)

CONFIG_INPUTS = (RATINGS_TRAIN, ASSIGNMENTS)  # what the generated configs depend on


def persona_sizes(run: RunFolder):
    """One row per persona: persona, n_users, n_train_rows (the user's rows in ratings_train)."""
    assignments = run.read_assignments()
    path = run.path(ASSIGNMENTS)
    missing = {"user_id", "persona"} - set(assignments.columns)
    if missing:
        raise DataError(f"missing columns {sorted(missing)}", path)
    if assignments.empty:
        raise DataError("no users assigned to personas", path)
    persona = assignments["persona"]
    if persona.dtype.kind not in "iu":
        values = persona.tolist()
        # point at the first value that is not even an integer written as text (else at row 1)
        row = next((i for i, v in enumerate(values) if not (type(v) is int or str(v).isdigit())), 0)
        raise DataError(f"persona must be an integer id, got {values[row]!r}", path, line=row + 1)
    if (persona < 0).any():
        row = int((persona < 0).to_numpy().argmax())
        raise DataError(f"persona ids must be >= 0, got {persona.iloc[row]}", path, line=row + 1)

    train = run.read_ratings("train", columns=["user_id"])
    rows_per_user = train.groupby("user_id").size()
    assignments = assignments.assign(n_train_rows=assignments["user_id"].map(rows_per_user).fillna(0).astype("int64"))
    sizes = (
        assignments.groupby("persona")
        .agg(n_users=("user_id", "size"), n_train_rows=("n_train_rows", "sum"))
        .reset_index()
        .sort_values("persona")
    )
    empty = sizes[sizes["n_train_rows"] == 0]
    if not empty.empty:
        raise DataError(f"persona {int(empty['persona'].iloc[0])} has no training rows in {RATINGS_TRAIN}", path)
    return sizes


def plan_variants(sizes) -> dict[str, dict]:
    """variant name -> dataset settings (persona, subsample) and the training rows it stands for."""
    variants = {}
    for row in sizes.itertuples():
        persona = Variant(PER_PERSONA).for_persona(int(row.persona)).name
        variants[persona] = {"persona": int(row.persona), "subsample": None, "n_train_rows": int(row.n_train_rows)}
    smallest, largest = int(sizes["n_train_rows"].min()), int(sizes["n_train_rows"].max())
    variants["single_min"] = {"persona": None, "subsample": smallest, "n_train_rows": smallest}
    variants["single_max"] = {"persona": None, "subsample": largest, "n_train_rows": largest}
    for name in variants:
        check_name(name)
    return variants


def render_config(template: Path, settings: dict, overrides: list[str]) -> str:
    """The template with ``settings`` (top-level keys) and then ``overrides`` applied, as YAML text."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    cfg = OmegaConf.load(template)
    for key, value in settings.items():  # dotted keys reach nested ones (e.g. head.init)
        OmegaConf.update(cfg, key, value, merge=True)
    cfg = apply_overrides(cfg, overrides, f"the template {template}")
    try:  # every interpolation must resolve, or the recipe would fail later
        OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as e:
        raise ConfigError(f"config from {template} does not resolve after overrides: {e}") from e
    return OmegaConf.to_yaml(cfg)


def variant_template(templates: Path, name: str) -> Path:
    """The family's template of variant ``name``: persona_0 is the pattern for personas beyond the shipped ones."""
    template = templates / f"{name}.yaml"
    if not template.is_file():
        template = templates / ("persona_0.yaml" if Variant.parse(name).persona is not None else f"{name}.yaml")
    return template


def variant_config_text(run: RunFolder, variant: str, template: Path, spec: dict, memory: str, overrides,
                        settings: dict | None = None) -> str:
    """The config of one trained variant: the template with the contract keys (FIXED_KEYS), other
    ``settings`` (dotted keys allowed) and then ``overrides``."""
    settings = {
        "run_dir": str(run.root),
        "persona": spec["persona"],
        "subsample": spec["subsample"],
        "memory": memory,
        "output_dir": str(run.adapter_dir(variant)),
        **(settings or {}),
    }
    return render_config(template, settings, overrides)


def write_variant_config(run: RunFolder, variant: str, template: Path, spec: dict, memory: str, overrides,
                         header: str) -> Path:
    """Write RUN/configs/<variant>.yaml: ``header`` (comment lines) and :func:`variant_config_text`."""
    target = run.config_file(variant)
    atomic_write_text(target, header + variant_config_text(run, variant, template, spec, memory, overrides))
    log.info("wrote %s", target)
    return target


@dataclass
class ConfigsConfig:
    """The `configs` stage's options (its CLI arguments are generated from them)."""

    family: str = field(default="phi3", metadata={
        "choices": FAMILIES, "help": "model family: phi3 (the paper's Phi-3-mini), smollm2 (CPU-sized), tiny (tests)"})
    memory: str = field(default=DEFAULT_MEMORY, metadata={
        "choices": (DEFAULT_MEMORY, *(m for m in MEMORY_MODES if m != DEFAULT_MEMORY)),  # the default first
        "help": "prompt memory: profile (ms), profile + retrieved explanation (ms+ml), explanation (ml)"})
    force: bool = field(default=False, metadata={"flag": "--force", "help": "overwrite existing configs"})
    overrides: tuple[str, ...] = field(default=(), metadata={
        "positional": True, "metavar": "KEY=VALUE", "aliases": {"--set": ""},
        "help": "config overrides for every generated file, after `--`: -- optimizer.lr=1e-4"})

    def validate(self) -> None:
        parse_overrides(list(self.overrides))


def run(run: RunFolder, cfg: ConfigsConfig) -> dict[str, Path]:
    """The `configs` stage: RUN/configs/<variant>.yaml for every persona and single_min/single_max;
    returns name -> path."""
    validate(cfg)  # the one check of the Config (persona_tune/stage.py), before anything is read
    run.require(*CONFIG_INPUTS)
    family, memory, overrides, force = cfg.family, cfg.memory, list(cfg.overrides), cfg.force
    templates = template_dir(family)
    variants = plan_variants(persona_sizes(run))
    params = {"family": family, "memory": memory, "overrides": list(overrides)}
    inputs = run.checksums(*CONFIG_INPUTS)

    targets = {name: run.config_file(name) for name in variants}
    record = run.stage_record("configs") or {}
    if (record.get("params", {}).get("overrides") == params["overrides"]
            and {k: record["params"].get(k) for k in ("family", "memory")} == {"family": family, "memory": memory}
            and record.get("inputs") == inputs and set(record.get("variants", {})) == set(variants)
            and all(p.is_file() for p in targets.values())):
        log.info("configs in %s are current (same options and inputs): skipped", run.configs_dir)
        return targets
    # Every config is rendered (and its values checked) before anything old is touched.
    texts = {}
    for name, spec in variants.items():
        template = variant_template(templates, name)
        header = (
            f"# {name}: generated by `persona-tune configs` from {family}_persona/{template.stem} "
            f"({spec['n_train_rows']} training rows).\n"
            f"# Run: tune run lora_finetune_single_device --config {targets[name]}\n"
            f"#  or: tune run --nproc_per_node 2 lora_finetune_distributed --config {targets[name]}\n"
        )
        texts[name] = header + variant_config_text(run, name, template, spec, memory, list(overrides))
    existing = [str(p) for p in targets.values() if p.exists()]
    if existing and not force:
        changed = run.changed_inputs(record.get("inputs"), *CONFIG_INPUTS) if record else []
        why = (f"written from other inputs ({', '.join(changed)} changed)" if changed
               else "written with other options" if record else "not recorded in the manifest")
        raise ConfigError(f"{len(existing)} config(s) in {run.configs_dir} were {why}, e.g. {existing[0]}; "
                          "pass --force to rewrite them")
    # Variants an earlier run generated that this plan has not (e.g. persona_2 after fewer personas).
    for stale in sorted(set(record.get("variants", {})) - set(variants)):
        run.config_file(stale).unlink(missing_ok=True)
        log.warning("removed %s: no longer one of the generated variants", run.config_file(stale))

    for name, text in texts.items():
        atomic_write_text(targets[name], text)
        log.info("wrote %s", targets[name])

    run.record_stage(
        "configs",
        {**params, "force": force},
        inputs=inputs,
        variants={name: {**spec, "config": run.config_relpath(name)} for name, spec in variants.items()},
    )
    return targets


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", required=True, type=Path, help="run folder (after `persona-tune personas`)")
    add_config_arguments(parser, ConfigsConfig)


def print_result(folder: RunFolder, cfg: ConfigsConfig, targets: dict[str, Path]) -> int:
    """What `persona-tune configs` prints of ``run``'s result; the exit code."""
    for name, path in targets.items():
        print(f"{name:<12} {path}")
    return 0


def main(args: argparse.Namespace) -> int:
    folder, cfg = RunFolder(args.run), config_from_args(ConfigsConfig, args)
    return print_result(folder, cfg, run(folder, cfg))
