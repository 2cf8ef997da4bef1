"""The names every stage shares: model families, memory modes (with their variant tags and labels), eval modes."""

from __future__ import annotations

from persona_tune.errors import ConfigError

# Model families: configs/<family>_persona/ (stock recipes) and configs/<family>_trunk/ (frozen trunk).
FAMILIES = ("phi3", "smollm2", "tiny")

# What the prompt shows of the user: the profile (M_s), the profile and retrieved memories (M_s+M_l),
# or the retrieved memories only (M_l).
MEMORY_MODES = ("ms", "ms+ml", "ml")
DEFAULT_MEMORY = "ms+ml"
PROFILE_MEMORIES = ("ms", "ms+ml")  # the modes that show the profile
RETRIEVED_MEMORIES = ("ms+ml", "ml")  # the modes that show retrieved memories
# The suffix of a variant name per memory mode (persona_0-msml, prompted-ml) and back.
MEMORY_TAGS = {"ms": "ms", "msml": "ms+ml", "ml": "ml"}
TAG_OF = {mode: tag for tag, mode in MEMORY_TAGS.items()}
MEMORY_LABELS = {"ms": "M_s", "ms+ml": "M_s+M_l", "ml": "M_l"}

# How the eval turns the model's output into a rating (``both`` on the command line runs the two).
EVAL_MODES = ("scoring", "paper")


def check_family(family: str) -> str:
    if family not in FAMILIES:
        raise ConfigError(f"unknown model family {family!r}; choose one of {', '.join(FAMILIES)}")
    return family


def check_memory_mode(memory: str) -> str:
    if memory not in MEMORY_MODES:
        raise ConfigError(f"memory must be one of {', '.join(MEMORY_MODES)}, got {memory!r}")
    return memory


def check_modes(mode: str) -> list[str]:
    """The eval modes of ``mode``: scoring, paper, or both."""
    modes = list(EVAL_MODES) if mode == "both" else [mode]
    if any(m not in EVAL_MODES for m in modes):
        raise ConfigError(f"mode must be scoring, paper or both, got {mode!r}")
    return modes
