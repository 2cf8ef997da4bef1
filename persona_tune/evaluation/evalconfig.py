"""The eval config of a variant (the `persona_eval` recipe's config): the family's ``<family>_persona/eval``
template with the run, the variant, its adapter folder and its training config's model, tokenizer and
memory filled in (persona_tune/evaluation/run.py's docstring has the variants). `eval` writes it
for the recipe; `simulate`, `serve-export` and UserAgent build the same one."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from persona_tune.errors import ConfigError, StageMissingError
from persona_tune.overrides import apply_overrides
from persona_tune.resources import eval_template
from persona_tune.runfolder import RunFolder
from persona_tune.variants import Variant


def run_family(run: RunFolder, family: str | None) -> str:
    """--family, else the family `persona-tune configs` (or the grid) recorded in the manifest."""
    if family:
        return family
    stages = run.read_manifest().get("stages", {})
    for name in ("grid", *sorted(n for n in stages if n.startswith("grid/")), "configs"):
        family = (stages.get(name) or {}).get("params", {}).get("family")
        if family:
            return family
    if not run.configs_dir.is_dir():
        raise StageMissingError(f"nothing to evaluate in {run.root} yet: run `persona-tune configs --run {run.root}` "
                                f"and `persona-tune train --run {run.root}` first (or pass --family for `prompted`)")
    raise ConfigError("cannot tell the model family from the manifest; pass --family phi3|smollm2|tiny")


def build_eval_config(run: RunFolder, variant: str, family: str, memory: str, mode: str,
                      overrides: list[str] = ()) -> DictConfig:
    """The eval config of one variant (see the module docstring)."""
    v = Variant.parse(variant)
    cfg = OmegaConf.load(eval_template(family))
    cfg.run_dir = str(run.root)
    cfg.variant = variant
    cfg.mode = mode
    if v.base_model:
        cfg.adapter_dir = None
        cfg.memory = v.memory or memory
        # The base model the run trains on: from any of its training configs (else the template's).
        candidates = [run.config_file(v.for_persona(0).name), run.config_file("persona_0"),
                      *sorted(run.configs_dir.glob("*.yaml"))]
        train_file = next((p for p in candidates if p.is_file()), None)
        if train_file is not None:
            _copy_model(cfg, OmegaConf.load(train_file))
    else:
        train_name = v.for_persona(0).name if v.per_persona else variant
        train_file = run.config_file(train_name)
        if not train_file.is_file():
            raise StageMissingError(f"{train_file} is missing: write it with `persona-tune configs` (or `grid`) and train it")
        train_cfg = OmegaConf.load(train_file)
        cfg.adapter_dir = str(run.adapters_dir / (v.for_persona("{persona}").name if v.per_persona else variant))
        cfg.memory = train_cfg.memory
        for key in ("prompt_template", "state_numbers", "collab_memories"):  # top level (trunk configs) or the dataset's
            value = train_cfg.get(key, train_cfg.get("dataset", {}).get(key))
            if value is not None:
                cfg[key] = value
        _copy_model(cfg, train_cfg)
    cfg = apply_overrides(cfg, list(overrides), eval_template(family))
    cfg.output_dir = str(run.eval_variant_dir(variant))
    return cfg


def _copy_model(cfg: DictConfig, train_cfg: DictConfig) -> None:
    """An adapter fits only the model it was trained with: take model, tokenizer and weights from training."""
    for key in ("model_dir", "tokenizer_path"):
        if key in train_cfg:
            cfg[key] = train_cfg[key]
    cfg.model = OmegaConf.merge(train_cfg.model, {"lora_dropout": 0.0})
    cfg.tokenizer = train_cfg.tokenizer
    for key in ("checkpoint_dir", "checkpoint_files", "model_type"):
        cfg.checkpointer[key] = train_cfg.checkpointer[key]


def adapter_variants(run: RunFolder, variant: str) -> list[str]:
    """The trained variants (RUN/adapters/<name>) that ``variant`` evaluates."""
    v = Variant.parse(variant)
    if v.base_model:
        return []
    if v.per_persona:
        personas = sorted(run.read_assignments(columns=["persona"])["persona"].unique())
        return [v.for_persona(int(k)).name for k in personas]
    return [variant]
