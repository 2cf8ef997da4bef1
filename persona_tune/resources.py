"""Package resources: the configs and recipes folders, the config templates, and the `tune` command.

Standard library only, and no side effect on import: the start-up hook (:mod:`persona_tune._hook`)
and :mod:`persona_tune.cpu_distributed` read :func:`resource_dirs` from here.
"""

from __future__ import annotations

import ctypes
import shutil
import signal
import sys
from pathlib import Path


def resource_dirs() -> tuple[Path | None, Path | None]:
    """Where the configs and recipes folders are: inside an installed wheel, or in a source checkout."""
    package = Path(__file__).resolve().parent
    found = []
    for wheel_name, source_name in (("_configs", "configs"), ("_recipes", "recipes")):
        for candidate in (package / wheel_name, package.parent / source_name):
            if candidate.is_dir():
                found.append(candidate)
                break
        else:
            found.append(None)
    return found[0], found[1]


def template_dir(family: str, kind: str = "persona") -> Path:
    """configs/<family>_<kind>/ (kind: persona, the stock recipes; trunk, lora_frozen_trunk) from the
    installed wheel or the source checkout."""
    from persona_tune.errors import ConfigError
    from persona_tune.names import check_family

    check_family(family)
    configs_dir = resource_dirs()[0]
    if configs_dir is None or not (configs_dir / f"{family}_{kind}").is_dir():
        raise ConfigError(f"the {family}_{kind} config templates are not installed with persona-tune")
    return configs_dir / f"{family}_{kind}"


def eval_template(family: str) -> Path:
    """configs/<family>_persona/eval.yaml: the template of `persona-tune eval`'s configs."""
    from persona_tune.errors import ConfigError
    from persona_tune.names import check_family

    check_family(family)
    configs_dir = resource_dirs()[0]
    path = configs_dir / f"{family}_persona" / "eval.yaml" if configs_dir else None
    if path is None or not path.is_file():
        raise ConfigError(f"the {family}_persona/eval.yaml config is not installed with persona-tune")
    return path


def tune_executable() -> str:
    """The `tune` next to this Python (same venv), else the one on PATH; a ConfigError if neither."""
    beside = Path(sys.executable).with_name("tune")
    if beside.is_file():
        return str(beside)
    found = shutil.which("tune")
    if found is None:
        from persona_tune.errors import ConfigError

        raise ConfigError("the `tune` command (torchtune) is not installed in this environment")
    return found


def die_with_parent() -> None:
    """``preexec_fn`` of every child persona-tune starts (`tune run` from train and eval): in the child,
    before exec, ask for SIGTERM when the parent dies, even by kill -9 (Linux prctl PR_SET_PDEATHSIG).
    The signal follows the thread that started the child, so start children from a thread that lives
    as long as they should."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the process group is still killed on normal exits
        pass
