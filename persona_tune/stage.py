"""The stage shape (issue 15): a Config dataclass, ``run(run: RunFolder, cfg) -> Summary``, and CLI
arguments generated from the Config so no field is listed twice.

    @dataclass
    class Config:
        rows: int = field(default=10, metadata={"help": "rows to score"})
        name: str | None = None
        def validate(self) -> None: ...          # optional; raise ConfigError

    def add_arguments(parser):
        parser.add_argument("--run", required=True)
        add_config_arguments(parser, Config)

    def main(args):
        summary = run(RunFolder(args.run), config_from_args(Config, args))

A field ``foo_bar`` becomes ``--foo-bar``; its type (int, float, str, bool, Optional of those,
tuple/list of those) gives the argparse type; a bool field becomes ``--foo-bar/--no-foo-bar``;
``metadata={"help": ..., "choices": ..., "cli": False}`` adds help, choices, or keeps it off the CLI.
More metadata, for a CLI that predates its Config: ``"group"`` (the argument group's title),
``"flag": "--no-foo"`` (a True-by-default bool set False by that one flag; ``"flag": "--foo"``, a
False-by-default one set True), ``"parse"`` (the CLI
value is a string that ``parse`` turns into the field's value; it raises ConfigError), ``"type"``
(argparse's type callable, for a field of a union type such as ``int | str``), ``"metavar"``, ``"required"``, and for
a tuple field ``"append"`` (a repeatable flag) or ``"positional"`` (the words after ``--``; with
``"aliases": {"--set": "", "--eval-set": "eval."}``, deprecated repeatable flags whose ``KEY=VALUE``
stands for ``-- KEY=VALUE`` with that key prefix). Config-file overrides are one field named
``overrides``, positional, in every command (docs/configuration.md).

Range rules live in the metadata too, and ``validate(cfg)`` checks them for every Config, from the CLI
(``config_from_args``) and from Python (each stage's ``run`` calls it first) alike:
``"min"`` (>=), ``"gt"`` (>), ``"max"`` (<=), ``"lt"`` (<), e.g. ``field(default=8, metadata={"min": 1})``.
A number field without a rule must be >= 0 (counts, sizes, seeds); ``"signed": True`` allows any
value. Every number must be finite, and an int field a whole number; a field with ``"choices"`` must
hold one of them. The generated CLI option only parses the number; ``config_from_args`` then runs the
same ``validate``, so ``persona-tune simulate --n-boot 0`` and ``SimulateConfig(n_boot=0)`` fail alike,
with one line naming the option: ``--n-boot must be >= 1, got 0``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import types
import typing
from typing import Any

from persona_tune.errors import ConfigError, check_choice

log = logging.getLogger(__name__)
_SCALARS = (int, float, str, bool)


def _unwrap(tp) -> tuple[type, bool, bool]:
    """(scalar type, optional, sequence) of a field's annotation."""
    optional = False
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional = len(args) < len(typing.get_args(tp))
        if len(args) != 1:
            raise TypeError(f"unsupported union {tp}")
        tp = args[0]
        origin = typing.get_origin(tp)
    if origin in (tuple, list):
        inner = [a for a in typing.get_args(tp) if a is not Ellipsis]
        return (inner[0] if inner else str), optional, True
    return tp, optional, False


def _number(kind: type):
    """An argparse type that only parses the number: its range is checked by ``validate`` (through
    ``config_from_args``), so the CLI and Python callers get the same one-line error. Not ``kind`` itself:
    cli.build_parser gives every bare int/float option the >= 0 rule while parsing."""
    def parse(text: str):
        return kind(text)

    parse.__name__ = kind.__name__  # argparse names the type in "invalid int value"
    return parse


def _parse_scalar(kind: type, name: str):
    if kind is bool:
        def parse_bool(text: str) -> bool:
            lowered = text.lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise argparse.ArgumentTypeError(f"{name}: expected true/false, got {text!r}")
        return parse_bool
    return kind


def add_config_arguments(parser: argparse.ArgumentParser, config_cls: type, *, skip: tuple[str, ...] = (),
                         only: tuple[str, ...] | None = None, type_metavars: bool = True,
                         groups: dict | None = None) -> dict:
    """One ``--option`` per field of the dataclass ``config_cls`` (see the module docstring), or per
    field of ``only``. Optional fields show their type as metavar (``--users INT``) unless not
    ``type_metavars`` (argparse's ``--users USERS``). Returns the argument groups by title (pass them
    back in ``groups`` to add to them)."""
    hints = typing.get_type_hints(config_cls)
    defaults = config_cls()
    groups = {} if groups is None else groups
    for f in dataclasses.fields(config_cls):
        if f.name in skip or (only is not None and f.name not in only) or not f.metadata.get("cli", True):
            continue
        target = parser
        if "group" in f.metadata:
            target = groups.get(f.metadata["group"]) or groups.setdefault(
                f.metadata["group"], parser.add_argument_group(f.metadata["group"]))
        if "type" in f.metadata:  # its own argparse type, e.g. an int or 'auto'
            kind, optional, sequence = f.metadata["type"], False, False
        elif "parse" in f.metadata:
            kind, optional, sequence = str, True, False
        else:
            kind, optional, sequence = _unwrap(hints[f.name])
        if "type" not in f.metadata and kind not in _SCALARS:
            raise TypeError(f"{config_cls.__name__}.{f.name}: {kind} has no CLI form; set metadata cli=False")
        flag = f.metadata.get("flag", "--" + f.name.replace("_", "-"))
        default = getattr(defaults, f.name)
        kwargs: dict[str, Any] = {"dest": f.name, "default": default, "help": f.metadata.get("help")}
        if "choices" in f.metadata:
            kwargs["choices"] = list(f.metadata["choices"])
        if f.metadata.get("required"):
            kwargs["required"] = True
        if kind is bool and not sequence and not optional:
            kwargs.pop("choices", None)
            if flag.startswith("--no-"):  # sets the field False; argparse keeps the negation in dest no_<name>
                kwargs.update(dest=_negated(f.name), default=False)
                target.add_argument(flag, action="store_true", **kwargs)
            elif "flag" in f.metadata:  # a plain switch: the field is True when the flag is given
                target.add_argument(flag, action="store_true", **kwargs)
            else:
                target.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
            continue
        kwargs["type"] = (kind if "type" in f.metadata else _number(kind) if kind in (int, float)
                          else _parse_scalar(kind, flag))
        if sequence and f.metadata.get("positional"):  # `cmd ... -- a b c`
            kwargs.pop("dest")
            target.add_argument(f.name, nargs="*", metavar=f.metadata.get("metavar"),
                                **{k: v for k, v in kwargs.items() if k != "default"})  # argparse's default: []
            for alias, prefix in f.metadata.get("aliases", {}).items():
                target.add_argument(alias, dest=_alias_dest(alias), action="append", metavar="KEY=VALUE",
                                    help=f"deprecated alias of `-- {prefix}KEY=VALUE` (kept for one release)")
            continue
        if sequence and f.metadata.get("append"):  # a repeatable flag
            kwargs.update(action="append", default=list(default))
        elif sequence:
            kwargs["nargs"] = "+"
        elif optional and type_metavars:
            kwargs["metavar"] = kind.__name__.upper()
        if "metavar" in f.metadata:
            kwargs["metavar"] = f.metadata["metavar"]
        target.add_argument(flag, **kwargs)
    return groups


RANGE_KEYS = ("min", "gt", "max", "lt")
_RANGE_WORDS = {"min": ">=", "gt": ">", "max": "<=", "lt": "<"}


def range_rule(metadata) -> dict:
    """The range rule of a field's metadata: its min/gt/max/lt, {} when signed, else {"min": 0}."""
    rule = {k: metadata[k] for k in RANGE_KEYS if k in metadata}
    return rule if rule or metadata.get("signed") else {"min": 0}


def range_problem(value, rule: dict, kind: type | None = None) -> str | None:
    """What is wrong with number ``value`` under ``rule`` (None when nothing), e.g. "must be >= 1, got 0"."""
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if kind is int and not isinstance(value, int):
        return f"must be a whole number, got {value!r}"
    if isinstance(value, float) and not math.isfinite(value):
        return f"must be a finite number, got {value!r}"
    holds = {"min": lambda b: value >= b, "gt": lambda b: value > b, "max": lambda b: value <= b,
             "lt": lambda b: value < b}
    if not all(holds[k](rule[k]) for k in RANGE_KEYS if k in rule):
        return f"must be {' and '.join(f'{_RANGE_WORDS[k]} {rule[k]}' for k in RANGE_KEYS if k in rule)}, got {value!r}"
    return None


def ranged(kind: type, rule: dict | None = None, **bounds):
    """An argparse type: ``kind`` (int or float), then the range rule (``rule`` or ``bounds``, as in the
    metadata; none given: >= 0). For options outside a Config: ``type=ranged(int, min=1)``."""
    rule = range_rule(bounds) if rule is None else rule

    def parse(text: str):
        value = kind(text)
        problem = range_problem(value, rule, kind)
        if problem:
            raise argparse.ArgumentTypeError(problem)
        return value

    parse.__name__ = kind.__name__  # argparse names the type in "invalid int value"
    return parse


def check_fields(cfg) -> None:
    """Raise ConfigError for the first field of ``cfg`` whose value breaks its type or range rule."""
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        choices = f.metadata.get("choices")
        value = getattr(cfg, f.name)
        for item in (value if isinstance(value, (tuple, list)) else [value]) if choices is not None else ():
            if item is not None:
                check_choice(_option(f), item, choices)
        try:
            kind, _, sequence = _unwrap(hints[f.name])
        except TypeError:  # a union such as int | str: check numbers only
            kind, sequence = None, False
        if kind not in (int, float, None) or kind is bool:
            continue
        if kind is None and not isinstance(value, (int, float)):
            continue
        if value is not None and not sequence and kind is not None and (
                isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ConfigError(f"{_option(f)} must be {'a whole number' if kind is int else 'a number'}, "
                              f"got {value!r}")
        for item in (value if sequence and value is not None else [value]):
            problem = range_problem(item, range_rule(f.metadata), kind)
            if problem:
                raise ConfigError(f"{_option(f)} {problem}")


def _option(f: dataclasses.Field) -> str:
    """How errors name a field: its CLI flag (``--k``)."""
    flag = f.metadata.get("flag", "")
    return flag if flag.startswith("--") and not flag.startswith("--no-") else "--" + f.name.replace("_", "-")


def _negated(name: str) -> str:
    return f"no_{name}"


def _alias_dest(flag: str) -> str:
    return "alias_" + flag.lstrip("-").replace("-", "_")


def _aliased(args: argparse.Namespace, aliases: dict[str, str]) -> list[str]:
    """The values of the deprecated alias flags, as the ``-- KEY=VALUE`` items they stand for."""
    items = []
    for alias, prefix in aliases.items():
        for item in getattr(args, _alias_dest(alias), None) or []:
            new = "~" + prefix + item[1:] if item.startswith("~") else prefix + item
            log.warning("%s %s is deprecated (kept for one release): write `-- %s`", alias, item, new)
            items.append(new)
    return items


def config_from_args(config_cls: type, args: argparse.Namespace, **extra: Any):
    """The Config from parsed arguments (fields absent from ``args`` keep their defaults), validated.
    A positional field's ``"aliases"`` (deprecated flags, e.g. ``{"--set": ""}``) come first in it."""
    values = {}
    for f in dataclasses.fields(config_cls):
        if hasattr(args, f.name):
            values[f.name] = getattr(args, f.name)
            if "parse" in f.metadata and values[f.name] is not None:
                values[f.name] = f.metadata["parse"](values[f.name])
            if f.metadata.get("aliases"):
                values[f.name] = [*_aliased(args, f.metadata["aliases"]), *values[f.name]]
        elif hasattr(args, _negated(f.name)):
            values[f.name] = not getattr(args, _negated(f.name))
    hints = typing.get_type_hints(config_cls)
    for name, value in values.items():
        if isinstance(value, list) and typing.get_origin(_strip_optional(hints[name])) is tuple:
            values[name] = tuple(value)
    cfg = config_cls(**{**values, **extra})
    validate(cfg)
    return cfg


def _strip_optional(tp):
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else tp
    return tp


def validate(cfg) -> None:
    """The one check of every Config, before anything is read or deleted: each field's type and range
    rule (its metadata, see the module docstring), then ``cfg.validate()`` for the rules that tie
    fields together, when the Config defines one. Raises ConfigError."""
    check_fields(cfg)
    check = getattr(cfg, "validate", None)
    if callable(check):
        check()


def require(condition: bool, message: str) -> None:
    """Raise ConfigError(message) unless ``condition``: the one-liner Config.validate methods use."""
    if not condition:
        raise ConfigError(message)


def config_argv(cfg) -> list[str]:
    """The command-line arguments that give ``cfg`` (its fields that differ from the defaults), as
    ``add_config_arguments`` spells them: what an orchestrator logs for a stage it runs."""
    defaults = type(cfg)()
    argv, positional = [], []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if not f.metadata.get("cli", True) or value == getattr(defaults, f.name):
            continue
        flag = f.metadata.get("flag", "--" + f.name.replace("_", "-"))
        if f.metadata.get("positional"):
            positional += list(value)
        elif isinstance(value, bool):
            argv += [flag] if "flag" in f.metadata else [flag if value else "--no-" + f.name.replace("_", "-")]
        elif isinstance(value, (tuple, list)):
            argv += [a for item in value for a in (flag, str(item))] if f.metadata.get("append") \
                else [flag, *map(str, value)]
        else:
            argv += [flag, value if isinstance(value, str) else json.dumps(value) if isinstance(value, dict)
                     else str(value)]
    return argv + (["--", *positional] if positional else [])


def config_dict(cfg) -> dict:
    """A Config as a plain dict (for the manifest and fingerprints)."""
    return dataclasses.asdict(cfg)
