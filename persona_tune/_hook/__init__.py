"""Start-up hook that plugs persona-tune's configs and recipes into torchtune's CLI.

torchtune has no plugin mechanism: `tune ls`, `tune cp` and `tune run` only know the names in the
hard-coded list ``torchtune._recipe_registry._ALL_RECIPES``. The one-line ``persona_tune_tune_hook.pth``
(installed at the top of site-packages) imports this module at interpreter start-up. It imports
nothing heavy: it only puts a meta-path finder in front of ``sys.meta_path`` that waits for two
modules and runs a callback right after each has executed:

* ``torchtune._recipe_registry``: append a ``Config(name, absolute_path)`` for every
  ``configs/<family>/<name>.yaml`` to the LoRA fine-tuning recipes (``eval*.yaml`` go to our
  ``persona_eval`` recipe instead, ``configs/*_trunk/`` to ``lora_frozen_trunk``), and a ``Recipe`` for every ``recipes/*.py``. torchtune joins
  ``file_path`` under its own folder; pathlib keeps an absolute path as it is.
* ``torch``: in a torchtune recipe process, silence known-harmless third-party messages
  (:mod:`persona_tune.noise`), before torchao can print them.
* ``torch.distributed``: in a torchtune recipe process on a machine without NCCL, apply the CPU
  patches of :mod:`persona_tune.cpu_distributed`.

Set ``PERSONA_TUNE_NO_TUNE_HOOK=1`` to switch all of it off.
"""

from __future__ import annotations

import os
import sys

# Start-up cost matters (this runs in every Python process of the environment): only os and sys
# are imported here; pathlib and the rest only inside the callbacks.

DISABLE_ENV = "PERSONA_TUNE_NO_TUNE_HOOK"

# Our configs go to these torchtune recipes (one file serves both).
LORA_RECIPES = ("lora_finetune_single_device", "lora_finetune_distributed")
# A config whose file name starts with this prefix belongs to the recipe named here.
PREFIX_RECIPES = {"eval": "persona_eval"}
# A config in a folder whose name ends with this suffix belongs to the recipe named here.
FOLDER_RECIPES = {"_trunk": "lora_frozen_trunk"}


def disabled() -> bool:
    return os.environ.get(DISABLE_ENV, "").strip().lower() not in ("", "0", "false", "no")


def persona_configs(configs_dir: Path | None) -> dict[str, list[tuple[str, Path]]]:  # noqa: F821
    """recipe name -> [(config name, absolute path)] for every configs/<family>/<name>.yaml."""
    by_recipe: dict[str, list[tuple[str, Path]]] = {}
    if configs_dir is None:
        return by_recipe
    for path in sorted(configs_dir.glob("*/*.yaml")):
        name = f"{path.parent.name}/{path.stem}"
        recipes = ([r for prefix, r in PREFIX_RECIPES.items() if path.stem.startswith(prefix)]
                   or [r for suffix, r in FOLDER_RECIPES.items() if path.parent.name.endswith(suffix)]
                   or LORA_RECIPES)
        for recipe in recipes:
            by_recipe.setdefault(recipe, []).append((name, path.resolve()))
    return by_recipe


def register(registry) -> None:
    """Add our configs and recipes to ``torchtune._recipe_registry`` (idempotent)."""
    from persona_tune.resources import resource_dirs

    configs_dir, recipes_dir = resource_dirs()
    by_recipe = persona_configs(configs_dir)
    recipes = {recipe.name: recipe for recipe in registry._ALL_RECIPES}
    if recipes_dir is not None:
        for path in sorted(recipes_dir.glob("*.py")):
            if path.stem.startswith("_") or path.stem in recipes:
                continue
            recipe = registry.Recipe(
                name=path.stem, file_path=str(path.resolve()), configs=[], supports_distributed=False
            )
            registry._ALL_RECIPES.append(recipe)
            recipes[recipe.name] = recipe
    for recipe_name, configs in by_recipe.items():
        recipe = recipes.get(recipe_name)
        if recipe is None:  # e.g. eval configs present but recipes/persona_eval.py not (yet)
            continue
        known = {config.name for config in recipe.configs}
        for name, path in configs:
            if name not in known:
                recipe.configs.append(registry.Config(name=name, file_path=str(path)))


def _on_torch(module) -> None:
    from persona_tune import cpu_distributed

    if cpu_distributed.is_recipe_process():  # before torchtune imports torchao, which imports torch first
        from persona_tune.noise import silence_known_noise

        silence_known_noise()


def _on_torch_distributed(module) -> None:
    from persona_tune import cpu_distributed

    if cpu_distributed.is_recipe_process() and cpu_distributed.needs_cpu_patches(module):
        cpu_distributed.patch_init_process_group(module)


def _on_tune_run(module) -> None:
    """`tune run RECIPE --config X`: an X that is neither a config name nor a file is one line and exit
    status 2 (torchtune would start the recipe and fail in it with a FileNotFoundError traceback)."""
    original = module.Run._get_config

    def _get_config(self, config_str, specific_recipe):
        config = original(self, config_str, specific_recipe)
        if config is None and not os.path.isfile(config_str):
            print(f"tune run: error: config {config_str!r} does not exist: neither a file nor a config name "
                  "(`tune ls` lists the names)", file=sys.stderr)
            sys.exit(2)
        return config

    module.Run._get_config = _get_config


class _PostExecLoader:
    """Runs the wrapped loader, then a callback on the fresh module; delegates everything else."""

    def __init__(self, loader, callback):
        self._loader = loader
        self._callback = callback

    def __getattr__(self, name):
        return getattr(self._loader, name)

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        module.__loader__ = self._loader
        if getattr(module, "__spec__", None) is not None:
            module.__spec__.loader = self._loader
        try:
            self._callback(module)
        except Exception as e:  # never break the import of torch or torchtune
            print(f"persona-tune hook: {module.__name__}: {type(e).__name__}: {e}", file=sys.stderr)


class PostImportFinder:
    """Meta-path finder that calls ``hooks[name](module)`` once, right after module ``name`` executes."""

    def __init__(self, hooks):
        self.hooks = dict(hooks)

    def find_spec(self, fullname, path=None, target=None):
        callback = self.hooks.get(fullname)
        if callback is None:
            return None
        del self.hooks[fullname]
        for finder in sys.meta_path:
            find_spec = getattr(finder, "find_spec", None)
            if finder is self or find_spec is None:
                continue
            spec = find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _PostExecLoader(spec.loader, callback)
        return spec


def install() -> PostImportFinder | None:
    """Put the finder on ``sys.meta_path`` (once), unless switched off; return it."""
    if disabled():
        return None
    for finder in sys.meta_path:
        if isinstance(finder, PostImportFinder):
            return finder
    hooks = {"torchtune._recipe_registry": register, "torch": _on_torch, "torch.distributed": _on_torch_distributed,
             "torchtune._cli.run": _on_tune_run}
    # A module imported before the hook (e.g. via PYTHONSTARTUP) is handled right away.
    for name in [n for n in hooks if n in sys.modules]:
        hooks.pop(name)(sys.modules[name])
    finder = PostImportFinder(hooks)
    sys.meta_path.insert(0, finder)
    return finder


install()
