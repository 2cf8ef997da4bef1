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
a tuple field ``"append"`` (a repeatable flag) or ``"positional"`` (the words after ``--``).
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any

from persona_tune.errors import ConfigError

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
        kwargs["type"] = kind if "type" in f.metadata else _parse_scalar(kind, flag)
        if sequence and f.metadata.get("positional"):  # `cmd ... -- a b c`
            kwargs.pop("dest")
            target.add_argument(f.name, nargs="*", metavar=f.metadata.get("metavar"),
                                **{k: v for k, v in kwargs.items() if k != "default"})  # argparse's default: []
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


def _negated(name: str) -> str:
    return f"no_{name}"


def config_from_args(config_cls: type, args: argparse.Namespace, **extra: Any):
    """The Config from parsed arguments (fields absent from ``args`` keep their defaults), validated."""
    values = {}
    for f in dataclasses.fields(config_cls):
        if hasattr(args, f.name):
            values[f.name] = getattr(args, f.name)
            if "parse" in f.metadata and values[f.name] is not None:
                values[f.name] = f.metadata["parse"](values[f.name])
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
    """Call ``cfg.validate()`` when the Config defines one (it raises ConfigError)."""
    check = getattr(cfg, "validate", None)
    if callable(check):
        check()


def require(condition: bool, message: str) -> None:
    """Raise ConfigError(message) unless ``condition``: the one-liner Config.validate methods use."""
    if not condition:
        raise ConfigError(message)


def config_dict(cfg) -> dict:
    """A Config as a plain dict (for the manifest and fingerprints)."""
    return dataclasses.asdict(cfg)
