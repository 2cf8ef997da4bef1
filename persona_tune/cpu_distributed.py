"""Let torchtune's distributed recipes run on a CPU-only torch build (gloo instead of NCCL).

On a torch without NCCL, ``tune run --nproc_per_node N lora_finetune_distributed`` fails three ways:

1. ``init_process_group("cuda:nccl,cpu:gloo")`` -> "Distributed package doesn't have NCCL built in";
2. ``training.get_memory_stats`` raises "Logging memory stats is not supported on CPU devices";
3. ``training.cleanup_before_training`` calls ``torch.cpu.empty_cache``, which does not exist.

A fourth fault is intermittent: the recipe's ``cleanup`` calls ``destroy_process_group`` on every rank
with no barrier, so a rank that has nothing to save tears gloo down while rank 0 is still writing the
checkpoint. One CI run (2026-12-06) had rank 1 die with "terminate called without an active
exception" (SIGABRT) after training had finished; 8 runs here did not reproduce it.

The start-up hook (:mod:`persona_tune._hook`) applies :func:`patch_init_process_group` right after
``torch.distributed`` is imported, and only in a torchtune recipe process (the ``tune`` CLI, or a
script in torchtune's or persona-tune's recipes folder) on a torch without NCCL. The wrapped
``init_process_group`` maps an NCCL backend string to its gloo part and then patches the two
torchtune memory helpers: on CPU, memory stats report the process's peak resident set size, and the
cache clean-up is a ``gc.collect()``. The same patch makes ``destroy_process_group`` of the default
gloo group wait at a barrier first, so all ranks tear down together. Where NCCL exists nothing is
touched.
Set ``PERSONA_TUNE_CPU_DISTRIBUTED=1`` to treat any process as a recipe process (e.g. a recipe
copied out with ``tune cp``), or ``PERSONA_TUNE_NO_TUNE_HOOK=1`` to switch the hook off.
"""

from __future__ import annotations

import functools
import gc
import importlib.util
import logging
import os
import resource
import sys
from pathlib import Path

log = logging.getLogger(__name__)

FORCE_ENV = "PERSONA_TUNE_CPU_DISTRIBUTED"
_MARK = "_persona_tune_cpu_patch"


def recipe_dirs() -> list[Path]:
    """torchtune's recipes folder and persona-tune's, without importing either package."""
    dirs = []
    spec = importlib.util.find_spec("torchtune")
    if spec is not None and spec.origin:
        dirs.append(Path(spec.origin).resolve().parent.parent / "recipes")
    from persona_tune.resources import resource_dirs

    ours = resource_dirs()[1]
    if ours is not None:
        dirs.append(ours)
    return dirs


def is_recipe_process(argv0: str | None = None) -> bool:
    """True in the `tune` CLI and in a process whose main script is a torchtune/persona-tune recipe."""
    if os.environ.get(FORCE_ENV, "").strip() == "1":
        return True
    if argv0 is None:
        argv0 = sys.argv[0] if getattr(sys, "argv", None) else ""
    if not argv0 or argv0 in ("-c", "-m"):
        return False
    script = Path(argv0)
    if script.name == "tune":
        return True
    if script.suffix != ".py":
        return False
    parent = script.resolve().parent
    return any(parent == d for d in recipe_dirs())


def needs_cpu_patches(dist) -> bool:
    """True when ``torch.distributed`` works but has no NCCL (a CPU-only torch build)."""
    return bool(dist.is_available()) and not dist.is_nccl_available()


def cpu_backend(backend):
    """Map an NCCL backend spec to gloo: "cuda:nccl,cpu:gloo" -> "gloo", "nccl" -> "gloo"."""
    if not isinstance(backend, str) or "nccl" not in backend:
        return backend
    for part in backend.split(","):
        device, _, name = part.rpartition(":")
        if device == "cpu" and name != "nccl":
            return name
    return "gloo"


def patch_init_process_group(dist) -> None:
    """Wrap ``dist.init_process_group`` so NCCL requests fall back to gloo and torchtune is patched."""
    original = dist.init_process_group
    if getattr(original, _MARK, False):
        return

    @functools.wraps(original)
    def init_process_group(backend=None, *args, **kwargs):
        if "backend" in kwargs:
            backend = kwargs.pop("backend")
        fallback = cpu_backend(backend)
        if fallback != backend:
            log.info("persona-tune: torch has no NCCL; process group backend %r -> %r", backend, fallback)
            patch_torchtune_memory()
        return original(fallback, *args, **kwargs)

    setattr(init_process_group, _MARK, True)
    dist.init_process_group = init_process_group
    dist.destroy_process_group = barrier_before_destroy(dist, dist.destroy_process_group)


def barrier_before_destroy(dist, original):
    """``destroy_process_group`` that, for the default gloo group, waits for every rank first."""

    @functools.wraps(original)
    def destroy_process_group(group=None, *args, **kwargs):
        if group is None and dist.is_initialized() and dist.get_backend() == "gloo" and dist.get_world_size() > 1:
            try:
                dist.barrier()
            except RuntimeError as err:  # a peer already gone: tear down anyway
                log.warning("persona-tune: barrier before destroy_process_group failed: %s", err)
        return original(group, *args, **kwargs)

    setattr(destroy_process_group, _MARK, True)
    return destroy_process_group


def cpu_memory_stats() -> dict[str, float]:
    """torchtune's memory-stat keys, filled with this process's peak resident set size in GiB."""
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # ru_maxrss is KiB on Linux
    return {"peak_memory_active": peak_gib, "peak_memory_alloc": peak_gib, "peak_memory_reserved": peak_gib}


def patch_torchtune_memory() -> None:
    """CPU-safe ``get_memory_stats`` and ``cleanup_before_training`` in ``torchtune.training``."""
    from torchtune import training
    from torchtune.training import memory
    from torchtune.utils import get_torch_device_namespace

    if getattr(memory.get_memory_stats, _MARK, False):
        return
    original_stats = memory.get_memory_stats
    original_cleanup = memory.cleanup_before_training

    @functools.wraps(original_stats)
    def get_memory_stats(device, reset_stats: bool = True) -> dict:
        if device.type == "cpu":
            return cpu_memory_stats()
        return original_stats(device, reset_stats)

    @functools.wraps(original_cleanup)
    def cleanup_before_training() -> None:
        if hasattr(get_torch_device_namespace(), "empty_cache"):
            return original_cleanup()
        gc.collect()

    for fn in (get_memory_stats, cleanup_before_training):
        setattr(fn, _MARK, True)
    training.get_memory_stats = memory.get_memory_stats = get_memory_stats
    training.cleanup_before_training = memory.cleanup_before_training = cleanup_before_training
