"""Config-file overrides, torchtune's ``key=value`` / ``~key``: checked and applied in one place for the
configs `configs` and `grid` write, the runs `train` starts, and the eval configs of `eval`, `simulate`
and UserAgent."""

from __future__ import annotations

import re

from persona_tune.errors import ConfigError

# Keys `configs` and `train` fill in from the run folder's file contract: never overridden.
FIXED_KEYS = ("run_dir", "persona", "subsample", "memory", "output_dir")
# Training keys that must be whole numbers >= 1 (a wrong value otherwise fails only after the model loads).
POSITIVE_INT_KEYS = ("epochs", "batch_size", "gradient_accumulation_steps", "max_steps_per_epoch")
# Range rules of config keys by their last name (the rule format of persona_tune/stage.py), checked on
# every config `configs` writes and `train` runs, before anything old is deleted.
KEY_RANGES = {
    "lora_rank": {"min": 1}, "lora_alpha": {"gt": 0}, "lora_dropout": {"min": 0, "lt": 1},
    "lr": {"gt": 0}, "weight_decay": {"min": 0}, "num_warmup_steps": {"min": 0}, "clip_grad_norm": {"gt": 0},
    "max_seq_len": {"min": 1}, "log_every_n_steps": {"min": 1}, "adapted_layers": {"min": 1},
    "trees_per_step": {"min": 1}, "rows_per_tree": {"min": 1}, "token_budget": {"min": 1},
    "max_new_tokens": {"min": 1}, "temperature": {"min": 0},
}


def check_key_ranges(cfg, source) -> None:
    """Raise ConfigError naming the first key of ``cfg`` whose value breaks its KEY_RANGES rule."""
    from omegaconf import OmegaConf

    from persona_tune.stage import range_problem

    for key in _leaf_keys(cfg):
        rule = KEY_RANGES.get(key.rpartition(".")[2])
        if rule is None:
            continue
        value = OmegaConf.select(cfg, key, default=None, throw_on_missing=False, throw_on_resolution_failure=False)
        problem = range_problem(value, rule)
        if problem:
            raise ConfigError(f"{key} {problem} (in {source})")


def parse_overrides(overrides, fixed: tuple[str, ...] = ()) -> list[str]:
    """Check the syntax of torchtune's ``key=value`` / ``~key`` overrides (the words after ``--`` of every
    command, docs/configuration.md) before anything is written; ``fixed``: keys the run folder's file
    contract sets, refused. Returns them as a list."""
    for item in overrides:
        key, sep, _ = (item[1:], "=", "") if item.startswith("~") else item.partition("=")
        if not sep or not re.match(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*$", key):
            raise ConfigError(f"invalid override {item!r}: expected key=value (or ~key), e.g. optimizer.lr=1e-4")
        if key in fixed:
            raise ConfigError(f"{key} is fixed by the run folder (RUN/adapters/<variant>); it cannot be overridden")
    return list(overrides)


def _leaf_keys(cfg, prefix: str = "") -> list[str]:
    from omegaconf import DictConfig

    keys = []
    for key in cfg.keys():
        path = f"{prefix}{key}"
        keys.append(path)
        value = cfg._get_node(key)
        if isinstance(value, DictConfig) and not value._is_none():
            keys += _leaf_keys(value, f"{path}.")
    return keys


def apply_overrides(cfg, overrides: list[str], source) -> "DictConfig":  # noqa: F821
    """``cfg`` with the ``key=value`` / ``~key`` overrides applied (torchtune's syntax), checked first:
    the key must exist in ``cfg`` (else the error names the closest one), must not be a FIXED_KEY,
    and the value must have the type of the value it replaces. ``source`` names the config in errors."""
    import difflib

    from omegaconf import OmegaConf

    cfg = cfg.copy()
    known = _leaf_keys(cfg)
    for item in parse_overrides(overrides, FIXED_KEYS):
        delete = item.startswith("~")
        key, _, text = (item[1:], "", "") if delete else item.partition("=")
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise ConfigError(f"unknown config key {key!r} in {item!r} (not in {source}){hint}")
        if delete:
            parent, _, leaf = key.rpartition(".")
            node = OmegaConf.select(cfg, parent) if parent else cfg
            node.pop(leaf)
            known = _leaf_keys(cfg)
            continue
        value = OmegaConf.from_dotlist([item]) if text else OmegaConf.create()
        new = OmegaConf.select(value, key, default=None)
        old = OmegaConf.select(cfg, key, default=None, throw_on_missing=False, throw_on_resolution_failure=False)
        # The frozen-trunk recipe (configs with adapted_layers) also runs 0 epochs: the closed-form head alone.
        least = 0 if key == "epochs" and "adapted_layers" in cfg else 1
        if _type_mismatch(old, new) or (key.rpartition(".")[2] in POSITIVE_INT_KEYS and new is not None
                                        and not (type(new) is int and new >= least)):
            want = f"a whole number >= {least}" if key.rpartition(".")[2] in POSITIVE_INT_KEYS else type(old).__name__
            raise ConfigError(f"{key} must be {want}, got {text!r} (in {item!r})")
        cfg = OmegaConf.merge(cfg, value)
    check_key_ranges(cfg, source)
    return cfg


def _type_mismatch(old, new) -> bool:
    """A value must keep its type: a number stays a number (an int may replace a float), a bool a bool."""
    if old is None or new is None or isinstance(old, str) and not isinstance(new, (bool,)):
        return False
    if isinstance(old, bool) or isinstance(new, bool):
        return type(old) is not type(new)
    if isinstance(old, float):
        return not isinstance(new, (int, float))
    if isinstance(old, int):
        return type(new) is not int
    return False
