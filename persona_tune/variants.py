"""Variant names, read and written in one place: ``[PREFIX-]BASE[-TAG]``.

- BASE, the last part before the tag: ``persona_K`` (persona K's adapter), ``persona`` (the eval cell
  of every persona, each with its own adapter), ``single_min``, ``single_max``, ``prompted`` (the
  base model), or any other name a config was written under.
- TAG, optional: the memory mode's tag (``ms``, ``msml``, ``ml``; persona_tune.names.MEMORY_TAGS).
- PREFIX, optional: ``trunk`` or ``trunk-LABEL`` for the frozen-trunk path (`grid --path trunk
  --label LABEL`); a label may hold '-' itself.

``trunk-demo-persona_0-ms`` is persona 0's frozen-trunk adapter of the demo label with the profile
memory. A name is a folder name in the run folder too (runfolder.check_name): letters, digits, '_'
and '-', no empty part.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from persona_tune.errors import ConfigError
from persona_tune.names import MEMORY_TAGS, TAG_OF
from persona_tune.runfolder import check_name

TRUNK = "trunk"
PER_PERSONA = "persona"  # the cell of every persona, each on its own adapter persona_K
_PERSONA_K = re.compile(r"^persona_(\d+)$")


@dataclass(frozen=True)
class Variant:
    base: str
    tag: str | None = None
    prefix: str = ""  # "", "trunk" or "trunk-LABEL" (or what came before the base in another name)

    def __post_init__(self):
        if self.tag is not None and self.tag not in MEMORY_TAGS:
            raise ConfigError(f"invalid memory tag {self.tag!r} of variant {self.base!r}: use one of "
                              f"{', '.join(MEMORY_TAGS)}")
        for what, part in (("base", self.base), ("prefix", self.prefix)):
            if part and "{persona}" not in part:
                check_name(part, f"variant {what}")
        if self.prefix and "" in self.prefix.split("-"):
            raise ConfigError(f"invalid variant prefix {self.prefix!r}: an empty part between '-' (e.g. trunk-demo)")
        if not self.base or "-" in self.base:
            raise ConfigError(f"invalid variant base {self.base!r}: one part without '-' (persona_0, single_max, ...)")

    # ------------------------------------------------------------------ read and write
    @classmethod
    def parse(cls, name: str) -> "Variant":
        """``[PREFIX-]BASE[-TAG]`` (see the module docstring); ConfigError for a name that is not one."""
        check_name(name)
        parts = name.split("-")
        if "" in parts:
            raise ConfigError(f"invalid variant name {name!r}: an empty part between '-' "
                              "(e.g. persona_0-ms, trunk-demo-single_max-ms)")
        tag = parts.pop() if len(parts) > 1 and parts[-1] in MEMORY_TAGS else None
        return cls(parts[-1], tag, "-".join(parts[:-1]))

    @classmethod
    def maybe(cls, name: str) -> "Variant | None":
        """``parse(name)``, or None for a name that is not a variant name (e.g. a hand-written config's)."""
        try:
            return cls.parse(name)
        except ConfigError:
            return None

    @classmethod
    def of(cls, base: str, memory: str | None = None, *, trunk: bool = False, label: str | None = None) -> "Variant":
        """The variant of ``base`` with ``memory``'s tag (a memory mode: ms, ms+ml, ml), on the trunk
        path (with its ``label``) or not."""
        if memory is not None and memory not in TAG_OF:
            raise ConfigError(f"memory must be one of {', '.join(TAG_OF)}, got {memory!r}")
        return cls(base, None if memory is None else TAG_OF[memory], trunk_prefix(label) if trunk else "")

    @property
    def name(self) -> str:
        return "-".join(p for p in (self.prefix, self.base, self.tag) if p)

    def __str__(self) -> str:
        return self.name

    # ------------------------------------------------------------------ what it names
    @property
    def memory(self) -> str | None:
        """The memory mode its tag names (ms, ms+ml, ml), None without a tag."""
        return None if self.tag is None else MEMORY_TAGS[self.tag]

    @property
    def trunk(self) -> bool:
        return self.prefix == TRUNK or self.prefix.startswith(TRUNK + "-")

    @property
    def label(self) -> str | None:
        """The frozen-trunk path's label (`grid --label`), None without one."""
        return self.prefix[len(TRUNK) + 1:] or None if self.trunk else None

    @property
    def label_parts(self) -> list[str]:
        """The label's '-'-separated parts (``n1000-prior`` -> n1000, prior), none without a label."""
        return self.label.split("-") if self.label else []

    @property
    def per_persona(self) -> bool:
        """Whether it stands for one adapter per persona (``persona``: persona_K for every K)."""
        return self.base == PER_PERSONA

    @property
    def persona(self) -> int | None:
        """K of a ``persona_K`` variant, else None."""
        m = _PERSONA_K.match(self.base)
        return int(m.group(1)) if m else None

    @property
    def single(self) -> bool:
        """A ``single_*`` adapter of the stock path (single_min, single_max): one adapter for every user."""
        return self.base.startswith("single_") and not self.prefix

    @property
    def base_model(self) -> bool:
        """The stock path's ``prompted`` cell: the base model, no adapter (the trunk path trains its own
        untrained prompted variant)."""
        return self.base == "prompted" and not self.prefix

    # ------------------------------------------------------------------ related variants
    def with_base(self, base: str) -> "Variant":
        return replace(self, base=base)

    def with_tag(self, tag: str | None) -> "Variant":
        return replace(self, tag=tag)

    def with_prefix(self, prefix: str) -> "Variant":
        return replace(self, prefix=prefix)

    def for_persona(self, k: int | str) -> "Variant":
        """Persona ``k``'s adapter of a per-persona variant (``k`` may be the "{persona}" placeholder)."""
        return self.with_base(f"persona_{k}")


def trunk_prefix(label: str | None) -> str:
    """The frozen-trunk path's name prefix: ``trunk`` or ``trunk-LABEL``."""
    if label:
        check_name(label, "label")
    return f"{TRUNK}-{label}" if label else TRUNK
