"""Train the LoRA adapters of a run: one `tune run` per variant, then a PEFT export of each.

Each variant (persona_k, single_min, single_max: the configs `persona-tune configs` wrote to
RUN/configs/) runs `tune run lora_finetune_single_device --config RUN/configs/<variant>.yaml`, or with
`--nproc N` `tune run --nproc_per_node N lora_finetune_distributed ...`, one after another, or with
`--parallel` several at once over the available GPUs (on a CPU-only machine: over the cores).
torchtune writes to RUN/adapters/<variant>/; its output goes to train.log there. A variant whose
train_summary.json exists is skipped, so re-running resumes, unless the inputs it records (its
config, the persona assignments, the data and memories) have changed since: then it is retrained;
`--force` retrains the selected variants regardless (e.g. with new overrides). train_summary.json is
written last, so a variant without it is partial, and eval, simulate and the agent refuse it.
Arguments after `--` are passed to every `tune run` as config overrides, checked against each
config first, e.g. `-- optimizer.lr=1e-4 max_steps_per_epoch=10`. The `tune run` children die
with this process, and RUN/.train.lock keeps a second `train` off the same run.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from persona_tune.overrides import apply_overrides, parse_overrides
from persona_tune.errors import ConfigError, PersonaTuneError, StageMissingError
from persona_tune.resources import die_with_parent, tune_executable
from persona_tune.runfolder import (
    ASSIGNMENTS,
    ITEMS,
    MEMORIES,
    PROFILES,
    RATINGS_TRAIN,
    RETRIEVED,
    TORCHTUNE_CONFIG,
    TRAIN_SUMMARY,
    RunFolder,
    adapter_files,
    atomic_write_json,
    check_name,
    file_lock,
    last_epoch_adapter,
)
from persona_tune.stage import add_config_arguments, config_from_args, validate
from persona_tune.variants import PER_PERSONA, Variant

log = logging.getLogger(__name__)

SINGLE_DEVICE_RECIPE = "lora_finetune_single_device"
DISTRIBUTED_RECIPE = "lora_finetune_distributed"
TRUNK_RECIPE = "lora_frozen_trunk"
RESUMING_RECIPES = (TRUNK_RECIPE,)  # recipes that resume from their own state in output_dir
SUMMARY = TRAIN_SUMMARY  # the old name
TRAIN_LOG = "train.log"
_STEP_LINE = re.compile(r"^Step (\d+) \| (.*)$")
_CONTRACT_KEYS = ("output_dir",)  # set by `train` itself: the run folder's file contract
# What a trained adapter depends on besides its config; recorded in train_summary.json.
TRAIN_INPUTS = (RATINGS_TRAIN, ITEMS, ASSIGNMENTS, PROFILES, MEMORIES, RETRIEVED)


@dataclass
class VariantResult:
    variant: str
    status: str  # trained | skipped | failed
    seconds: float = 0.0
    summary: dict = field(default_factory=dict)
    error: str = ""


# ---------------------------------------------------------------- pure helpers


def select_variants(run: RunFolder, spec: str) -> list[str]:
    """'all' -> every variant `persona-tune configs` wrote (personas first); '0,1,single_min' -> persona_0,
    persona_1, single_min. Other files in RUN/configs (e.g. eval-only ones) are trained only by name."""
    if not run.configs_dir.is_dir():
        raise StageMissingError(f"{run.configs_dir} is missing: run `persona-tune configs --run {run.root}` first")
    available = sorted(p.stem for p in run.configs_dir.glob("*.yaml"))
    if spec.strip() == "all":
        generated = (run.stage_record("configs") or {}).get("variants")
        if generated is None:  # configs written by hand: the training variants by their names
            generated = [n for n in available if (v := Variant.maybe(n)) and (v.single or v.persona is not None
                                                                               and not v.prefix)]
        names = sorted(generated, key=lambda n: (_persona_of(n) is None, _natural_key(n)))
    else:
        names = []
        for item in (s.strip() for s in spec.split(",")):
            if not item:
                continue
            name = Variant(PER_PERSONA).for_persona(item).name if item.isdigit() else check_name(item)
            if name not in names:
                names.append(name)
    if not names:
        raise ConfigError(f"no variants selected by {spec!r}; configs in {run.configs_dir}: {', '.join(available) or 'none'}")
    missing = [n for n in names if n not in available]
    if missing:
        raise StageMissingError(
            f"no config for {', '.join(missing)} in {run.configs_dir} (have: {', '.join(available) or 'none'}); "
            f"run `persona-tune configs --run {run.root}`"
        )
    return names


def _persona_of(name: str) -> int | None:
    v = Variant.maybe(name)
    return None if v is None or v.prefix else v.persona


def _natural_key(name: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def check_overrides(overrides: list[str]) -> list[str]:
    """torchtune `key=value` / `~key` overrides; the keys the file contract fixes are refused."""
    return parse_overrides(overrides, fixed=_CONTRACT_KEYS)


def variant_inputs(run: RunFolder, variant: str, shared: dict[str, str] | None = None) -> dict[str, str]:
    """Checksums of what variant's adapter is trained from (``shared``: TRAIN_INPUTS', computed once)."""
    shared = run.checksums(*TRAIN_INPUTS) if shared is None else shared
    return {**shared, **run.checksums(run.config_relpath(variant))}


def stale_inputs(run: RunFolder, variant: str, shared: dict[str, str] | None = None) -> list[str]:
    """The inputs that changed since variant's adapter was trained ([] when current or not trained)."""
    summary_file = run.train_summary(variant)
    if not summary_file.is_file():
        return []
    recorded = json.loads(summary_file.read_text(encoding="utf-8")).get("inputs")
    if recorded is None:  # trained before inputs were recorded: cannot tell
        return []
    now = variant_inputs(run, variant, shared)
    return sorted(rel for rel in set(recorded) | set(now) if recorded.get(rel) != now.get(rel))


# The commands that write each family's base model, for a missing checkpoint_dir.
MODEL_HINTS = {
    "tiny": "write it with `persona-tune tiny-model {parent}`",
    "smollm2": "write it with `persona-tune smollm2`",
}


def check_variant_config(run: RunFolder, variant: str, overrides: list[str]) -> None:
    """Fail before `tune run` starts: overrides must fit the config and the base model must exist."""
    from omegaconf import OmegaConf

    path = run.config_file(variant)
    cfg = apply_overrides(OmegaConf.load(path), overrides, path)
    model_dir = OmegaConf.select(cfg, "checkpointer.checkpoint_dir", default=None, throw_on_resolution_failure=False)
    if model_dir and not Path(model_dir).is_dir():
        component = str(OmegaConf.select(cfg, "model._component_", default="", throw_on_resolution_failure=False))
        family = next((f for f in MODEL_HINTS if f in component), None)
        hint = MODEL_HINTS[family].format(parent=Path(model_dir).parent) if family else "download or convert it there"
        raise StageMissingError(f"{path}: the base model folder {model_dir} does not exist; {hint}")


def tune_command(config: Path, output_dir: Path, recipe: str, nproc: int, overrides: list[str]) -> list[str]:
    cmd = [tune_executable(), "run"]
    if nproc > 1:
        cmd += ["--nproc_per_node", str(nproc)]
    return cmd + [recipe, "--config", str(config), *overrides, f"output_dir={output_dir}"]


def read_metrics(log_file: Path) -> list[dict]:
    """Parse torchtune's DiskLogger file ("Step N | key:value key:value") into one dict per step."""
    rows = []
    for line in Path(log_file).read_text(encoding="utf-8").splitlines():
        match = _STEP_LINE.match(line.strip())
        if not match:
            continue
        row: dict = {"step": int(match.group(1))}
        for pair in match.group(2).split():
            key, _, value = pair.partition(":")
            try:
                row[key] = float(value)
            except ValueError:
                row[key] = value
        rows.append(row)
    return rows


def metrics_log(output_dir: Path, since: float = 0.0) -> Path | None:
    """The newest DiskLogger file of the run that wrote ``output_dir`` (modified after ``since``)."""
    from omegaconf import OmegaConf

    log_dir = output_dir / "logs"
    resolved = output_dir / TORCHTUNE_CONFIG
    if resolved.is_file():
        cfg = OmegaConf.load(resolved)
        log_dir = Path(OmegaConf.select(cfg, "metric_logger.log_dir", default=str(log_dir)))
    logs = [p for p in log_dir.glob("log_*.txt") if p.stat().st_mtime >= since]
    return max(logs, key=lambda p: p.stat().st_mtime) if logs else None


def export_variant_peft(output_dir: Path, adapter: Path) -> Path:
    """Convert the final adapter to PEFT format in output_dir/peft/, from the run's resolved config."""
    from omegaconf import OmegaConf

    from persona_tune.peft_export import export_peft

    cfg = OmegaConf.load(output_dir / TORCHTUNE_CONFIG)
    model = cfg.model
    targets = list(model.lora_attn_modules)
    if model.get("apply_lora_to_mlp", False):
        targets += ["w1", "w2", "w3"]
    if model.get("apply_lora_to_output", False):
        targets += ["output"]
    peft_dir = output_dir / "peft"
    export_peft(
        adapter_path=adapter,
        base_model_dir=Path(cfg.checkpointer.checkpoint_dir),
        out_dir=peft_dir,
        model_family=model_family(cfg.checkpointer.model_type),
        lora_rank=int(model.lora_rank),
        lora_alpha=float(model.lora_alpha),
        target_modules=targets,
    )
    return peft_dir


def model_family(model_type: str) -> str:
    families = {"PHI3_MINI": "phi3", "LLAMA3_2": "llama", "LLAMA3": "llama", "LLAMA2": "llama"}
    if model_type not in families:
        raise ConfigError(f"PEFT export does not support checkpointer.model_type {model_type!r}")
    return families[model_type]


def summarize(variant: str, output_dir: Path, metrics: list[dict], seconds: float, command: list[str],
              adapter: Path, peft_dir: Path) -> dict:
    losses = [m["loss"] for m in metrics if isinstance(m.get("loss"), float)]
    tps = [m["tokens_per_second_per_gpu"] for m in metrics if isinstance(m.get("tokens_per_second_per_gpu"), float)]
    return {
        "variant": variant,
        "steps": len(metrics),
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "losses": losses,
        "mean_trained_tokens_per_second_per_device": sum(tps) / len(tps) if tps else None,
        "seconds": round(seconds, 2),
        "command": command,
        "adapter": str(adapter.relative_to(output_dir.parent.parent)),
        "peft_dir": str(peft_dir.relative_to(output_dir.parent.parent)),
        "log": str((output_dir / TRAIN_LOG).relative_to(output_dir.parent.parent)),
    }


# ---------------------------------------------------------------- running


def _stream(proc: subprocess.Popen, log_file: Path, echo: bool) -> None:
    with open(log_file, "ab") as out:
        for chunk in iter(lambda: proc.stdout.read1(4096), b""):
            out.write(chunk)
            out.flush()
            if echo:
                sys.stdout.buffer.write(chunk)
                sys.stdout.flush()


def train_variant(run: RunFolder, variant: str, recipe: str, nproc: int, overrides: list[str],
                  env: dict | None = None, echo: bool = False, lock_fd: int | None = None,
                  inputs: dict[str, str] | None = None, force: bool = False) -> VariantResult:
    """Run one variant's `tune run`, parse its metrics, export PEFT, write train_summary.json (last:
    the completion marker that runfolder.check_adapter requires). ``force``: start afresh even with a
    recipe that resumes."""
    output_dir = run.adapter_dir(variant)
    inputs = variant_inputs(run, variant) if inputs is None else inputs
    (output_dir / TRAIN_SUMMARY).unlink(missing_ok=True)  # first: until training ends, the adapter is partial
    if output_dir.exists() and (force or recipe not in RESUMING_RECIPES):  # an unfinished attempt: start afresh
        shutil.rmtree(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    command = tune_command(run.config_file(variant), output_dir, recipe, nproc, overrides)
    log_file = output_dir / TRAIN_LOG
    with open(log_file, "a", encoding="utf-8") as f:
        f.write("$ " + " ".join(command) + "\n")
    start = time.time()
    # The child keeps the lock's descriptor, so a re-run sees a live writer even if this process is gone.
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=run.root,
                            preexec_fn=die_with_parent, pass_fds=() if lock_fd is None else (lock_fd,))
    try:
        _stream(proc, log_file, echo)
        code = proc.wait()
    except BaseException:  # Ctrl-C or an error here: do not leave the child training
        proc.terminate()
        proc.wait()
        raise
    seconds = time.time() - start
    if code != 0:
        tail = log_file.read_text(encoding="utf-8", errors="replace").splitlines()[-15:]
        return VariantResult(variant, "failed", seconds, error=f"`tune run` exited with {code}; last lines of {log_file}:\n"
                             + "\n".join(tail))
    adapter = last_epoch_adapter(output_dir, missing_ok=True)  # the adapter after the last epoch
    metrics_file = metrics_log(output_dir, since=start - 1)
    if adapter is None or metrics_file is None:
        tail = log_file.read_text(encoding="utf-8", errors="replace").splitlines()[-5:]
        return VariantResult(variant, "failed", seconds, error=f"`tune run` exited 0 but wrote no adapter or metrics "
                             f"under {output_dir} (did it train any step? check epochs and max_steps_per_epoch); "
                             f"last lines of {log_file}:\n" + "\n".join(tail))
    peft_dir = export_variant_peft(output_dir, adapter)
    summary = summarize(variant, output_dir, read_metrics(metrics_file), seconds, command, adapter, peft_dir)
    summary["inputs"] = inputs
    summary["files"] = adapter_files(adapter)  # what check_adapter verifies before any use
    atomic_write_json(output_dir / TRAIN_SUMMARY, summary)
    return VariantResult(variant, "trained", seconds, summary)


def device_slots(nproc: int, parallel: bool, n_jobs: int) -> list[dict]:
    """One environment per concurrent job: a disjoint set of GPUs, or of CPU threads on a CPU machine."""
    if not parallel or n_jobs <= 1:
        return [dict(os.environ)]
    import torch

    slots = []
    gpus = torch.cuda.device_count()
    if gpus:
        for i in range(min(n_jobs, max(1, gpus // nproc))):
            devices = ",".join(str(d) for d in range(i * nproc, (i + 1) * nproc))
            slots.append({**os.environ, "CUDA_VISIBLE_DEVICES": devices})
    else:
        cores = os.cpu_count() or 1
        n = min(n_jobs, max(1, cores // nproc))
        threads = max(1, cores // (n * nproc))
        slots = [{**os.environ, "OMP_NUM_THREADS": str(threads)} for _ in range(n)]
    return slots


def summary_table(run: RunFolder, results: list[VariantResult]) -> str:
    rows = [("variant", "status", "steps", "first loss", "last loss", "seconds", "adapter")]
    for r in results:
        s = r.summary
        if r.status == "skipped" and run.train_summary(r.variant).is_file():
            s = json.loads(run.train_summary(r.variant).read_text(encoding="utf-8"))
        fmt = lambda x: "-" if x is None else f"{x:.4f}"  # noqa: E731
        rows.append((
            r.variant, r.status, str(s.get("steps", "-")), fmt(s.get("first_loss")), fmt(s.get("last_loss")),
            f"{s.get('seconds', r.seconds):.1f}", s.get("adapter", "-"),
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)


@dataclass
class TrainConfig:
    """The `train` stage's options (its CLI arguments are generated from them)."""

    personas: str = field(default="all", metadata={
        "help": "variants to train: all, or a comma list of persona ids and names (0,1,single_min)"})
    nproc: int = field(default=1, metadata={"min": 1, "help": "processes per variant (>1: lora_finetune_distributed)"})
    parallel: bool = field(default=False, metadata={
        "flag": "--parallel", "help": "train several variants at once over the available GPUs (or CPU cores)"})
    recipe: str | None = field(default=None, metadata={
        "help": f"torchtune recipe (default: {SINGLE_DEVICE_RECIPE}, or {DISTRIBUTED_RECIPE} with --nproc > 1; "
                f"{TRUNK_RECIPE} for configs written by `grid --path trunk`)"})
    overrides: tuple[str, ...] = field(default=(), metadata={
        "positional": True, "metavar": "KEY=VALUE",
        "help": "config overrides for every `tune run`, after `--`: -- optimizer.lr=1e-4"})
    force: bool = field(default=False, metadata={
        "flag": "--force", "help": "retrain the selected variants even if they are trained and current "
                                   "(e.g. with new `-- key=value` overrides)"})
    echo: bool = field(default=False, metadata={"cli": False})  # stream each `tune run`'s output

    def validate(self) -> None:
        check_overrides(list(self.overrides))


def run(run: RunFolder, cfg: TrainConfig) -> list[VariantResult]:
    """The `train` stage: train every selected variant (skipping finished ones unless ``force``); one
    result per variant."""
    validate(cfg)  # the one check of the Config (persona_tune/stage.py), before anything is read
    personas, nproc, parallel, force = cfg.personas, cfg.nproc, cfg.parallel, cfg.force
    recipe = cfg.recipe or (DISTRIBUTED_RECIPE if nproc > 1 else SINGLE_DEVICE_RECIPE)
    overrides = list(cfg.overrides)
    variants = select_variants(run, personas)
    shared = run.checksums(*TRAIN_INPUTS)
    todo = []
    for v in variants:
        if force or not run.train_summary(v).is_file():
            todo.append(v)
        elif changed := stale_inputs(run, v, shared):
            log.warning("%s was trained on other inputs (%s changed): retraining it", v, ", ".join(changed))
            todo.append(v)
    results = {v: VariantResult(v, "skipped") for v in variants if v not in todo}
    if overrides and results:
        log.warning("%s already trained: skipped, so the overrides do not apply to them; `--force` retrains "
                    "them with the overrides", ", ".join(results))
    if not todo:  # all current: touch nothing, the manifest included
        return [results[v] for v in variants]
    for v in todo:
        check_variant_config(run, v, overrides)
    slots = device_slots(nproc, parallel, len(todo))
    free = list(range(len(slots)))
    lock = threading.Condition()

    # A child's PR_SET_PDEATHSIG fires when the pool thread that started it ends, which is only after
    # every job has finished.
    def job(variant: str) -> VariantResult:
        with lock:
            lock.wait_for(lambda: free)
            slot = free.pop()
        try:
            return train_variant(run, variant, recipe, nproc, overrides, slots[slot], cfg.echo and len(slots) == 1,
                                 lock_fd, variant_inputs(run, variant, shared), force)
        except PersonaTuneError as e:  # e.g. the PEFT export refused the adapter: the others still run
            return VariantResult(variant, "failed", error=str(e))
        finally:
            with lock:
                free.append(slot)
                lock.notify()

    from tqdm import tqdm

    with file_lock(run.root / ".train.lock", f"training adapters in {run.adapters_dir}") as lock_fd, \
            concurrent.futures.ThreadPoolExecutor(max_workers=len(slots)) as pool, \
            tqdm(total=len(todo), desc="variants", unit="adapter", disable=not todo) as bar:
        futures = {pool.submit(job, v): v for v in todo}
        for future in concurrent.futures.as_completed(futures):
            result = future.result()
            results[result.variant] = result
            bar.update(1)
            if result.status == "failed":
                log.error("%s failed (details at the end)", result.variant)

    ordered = [results[v] for v in variants]
    previous = (run.stage_record("train") or {}).get("variants", {})
    done = {r.variant: r.summary for r in ordered if r.status == "trained"}
    run.record_stage(
        "train",
        {"personas": personas, "nproc": nproc, "parallel": parallel, "recipe": recipe, "overrides": overrides},
        variants={**previous, **done},
    )
    return ordered


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", required=True, type=Path, help="run folder (after `persona-tune configs`)")
    add_config_arguments(parser, TrainConfig, type_metavars=False)


def print_result(folder: RunFolder, cfg: TrainConfig, results: list[VariantResult]) -> int:
    """What `persona-tune train` prints of ``run``'s result; the exit code (1 when a variant failed)."""
    print(summary_table(folder, results))
    failed = [r for r in results if r.status == "failed"]
    for r in failed:
        print(f"\n{r.variant}: {r.error}", file=sys.stderr)
    return 1 if failed else 0


def main(args: argparse.Namespace) -> int:
    folder, cfg = RunFolder(args.run), config_from_args(TrainConfig, args, echo=args.verbose)
    return print_result(folder, cfg, run(folder, cfg))
