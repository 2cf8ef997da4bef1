"""The project's exceptions. The CLI prints any PersonaTuneError as one clear line, no traceback."""

from __future__ import annotations

from typing import Sequence


class PersonaTuneError(Exception):
    """Base class of every error persona-tune raises on purpose."""


class DataError(PersonaTuneError):
    """Bad input data. Names the file and, where known, the 1-based line number."""

    def __init__(self, message: str, path=None, line: int | None = None):
        self.path = str(path) if path is not None else None
        self.line = line
        where = ""
        if self.path is not None:
            where = f"{self.path}:{line}: " if line is not None else f"{self.path}: "
        super().__init__(f"{where}{message}")


class ConfigError(PersonaTuneError):
    """A wrong option, config value or CLI argument."""


class StageMissingError(PersonaTuneError):
    """A stage's input is not in the run folder yet."""


class LLMError(PersonaTuneError):
    """An LLM or embedding endpoint failed or returned something unusable."""


def check_choice(key: str, value: str, choices: Sequence[str]) -> str:
    """``value`` if it is one of ``choices``; otherwise a ConfigError naming ``key`` and the choices."""
    if value not in choices:
        raise ConfigError(f"{key} must be one of {', '.join(choices)}, got {value!r}")
    return value
