"""Training throughput and peak memory of the LoRA recipes on CPU: tiny model and SmolLM2-135M,
single-device and 2 processes (lora_finetune_distributed on gloo).

    python benchmarks/bench_train.py                       # all four cells, markdown table + JSON
    python benchmarks/bench_train.py --models tiny --nprocs 1 --steps 6

Builds a synthetic run (prepare, offline distill, hash embed, 2 personas), writes the family's
single_max config, then runs torchtune's own recipe classes with the config for ``--steps``
optimizer steps. A forward pre-hook on the model counts the tokens of every batch (padding
included: that is what the CPU computes) and timestamps each step; throughput is measured from
the second step's start to the last step's start, so start-up and the first step are excluded.
Peak memory is each process's peak resident set size (ru_maxrss). Two-process cells run this file
as a worker under torchrun; tokens are summed over ranks.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


# ---------------------------------------------------------------- worker (one training process)


def torchtune_recipe(name: str):
    """Load one of torchtune's recipe files as a module (its recipes folder is not importable)."""
    import importlib.util

    import torchtune

    path = Path(torchtune.__file__).parent.parent / "recipes" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"torchtune_recipe_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def worker(config: Path, overrides: list[str], distributed: bool, result_path: Path) -> None:
    import torch
    from omegaconf import OmegaConf

    cfg = OmegaConf.merge(OmegaConf.load(config), OmegaConf.from_dotlist(overrides))
    if distributed:
        import torch.distributed as dist

        from persona_tune import cpu_distributed

        LoRAFinetuneRecipeDistributed = torchtune_recipe("lora_finetune_distributed").LoRAFinetuneRecipeDistributed

        if cpu_distributed.needs_cpu_patches(dist):
            cpu_distributed.patch_init_process_group(dist)
        dist.init_process_group("cuda:nccl,cpu:gloo")  # the recipe's own call
        recipe = LoRAFinetuneRecipeDistributed(cfg=cfg)
    else:
        LoRAFinetuneRecipeSingleDevice = torchtune_recipe("lora_finetune_single_device").LoRAFinetuneRecipeSingleDevice
        recipe = LoRAFinetuneRecipeSingleDevice(cfg=cfg)
    recipe.setup(cfg=cfg)

    starts: list[float] = []
    tokens: list[int] = []

    def count(module, args, kwargs):
        batch_tokens = kwargs.get("tokens", args[0] if args else None)
        starts.append(time.perf_counter())
        tokens.append(int(batch_tokens.numel()))

    recipe._model.register_forward_pre_hook(count, with_kwargs=True)
    recipe.train()
    n = len(starts)
    if n < 3:
        raise SystemExit(f"need at least 3 steps to time, got {n}")
    measured_tokens = float(sum(tokens[1:-1]))
    seconds = starts[-1] - starts[1]
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    result = {"steps": n, "tokens_per_step_per_rank": tokens[1], "seconds": seconds}
    if distributed:
        import torch.distributed as dist

        sums = torch.tensor([measured_tokens, peak_gib], dtype=torch.float64)
        maxes = torch.tensor([peak_gib, seconds], dtype=torch.float64)
        dist.all_reduce(sums, op=dist.ReduceOp.SUM)
        dist.all_reduce(maxes, op=dist.ReduceOp.MAX)
        measured_tokens, seconds = float(sums[0]), float(maxes[1])
        result.update(peak_rss_gib_per_process=float(maxes[0]), peak_rss_gib_total=float(sums[1]))
        is_rank_zero = dist.get_rank() == 0
    else:
        result.update(peak_rss_gib_per_process=peak_gib, peak_rss_gib_total=peak_gib)
        is_rank_zero = True
    result.update(tokens_per_second=measured_tokens / seconds, seconds=seconds, step_seconds=seconds / (n - 2))
    recipe.cleanup()
    if is_rank_zero:
        result_path.write_text(json.dumps(result))


# ---------------------------------------------------------------- driver


def build_run(base: Path) -> Path:
    from persona_tune import personas
    from persona_tune.distill import run as distill
    from persona_tune.memory import stage as embed
    from persona_tune.runfolder import RunFolder
    from tests.fixtures_runs import make_prepared_run

    run = make_prepared_run(base, n_users=12, seed=0)
    with contextlib.redirect_stdout(sys.stderr):  # stdout is for the results table
        distill.run(RunFolder(run), distill.DistillConfig(backend="offline"))
        embed.run(RunFolder(run), embed.EmbedConfig(backend="hash"))
        personas.run(RunFolder(run), personas.PersonasConfig(k=2))
    return run


def family_config(run: Path, family: str, base: Path) -> Path:
    from persona_tune import configgen
    from persona_tune.configgen import ConfigsConfig
    from persona_tune.runfolder import RunFolder

    if family == "tiny":
        from persona_tune.models.tiny import write_tiny_phi3

        model_dir = write_tiny_phi3(base / "tiny_model") / "model"
    else:
        from persona_tune.models.smollm2 import ensure_smollm2

        model_dir = ensure_smollm2() / "model"
    out = base / family
    out.mkdir()
    # a copy of the run per family, so configs/ holds that family's files
    shutil.copytree(run, out / "run")
    targets = configgen.run(RunFolder(out / "run"), ConfigsConfig(family=family, overrides=[f"model_dir={model_dir}"]))
    return targets["single_max"]


def run_cell(config: Path, family: str, nproc: int, overrides: list[str], base: Path, threads: int | None) -> dict:
    result_path = base / f"result_{family}_{nproc}.json"
    env = dict(os.environ)
    if threads:  # torch's intra-op threads per process (torchrun's default for nproc > 1 is 1)
        env["OMP_NUM_THREADS"] = str(threads)
    worker = [str(Path(__file__).resolve()), "--worker", "--config", str(config), "--result", str(result_path)]
    if nproc == 1:
        cmd = [sys.executable, *worker, "--single", "--", *overrides]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               *worker, "--", *overrides]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"benchmark cell failed: {' '.join(cmd)}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads(result_path.read_text())


def machine() -> str:
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3
    return (f"{cpu}, {os.cpu_count()} cores, {mem_gib:.0f} GiB RAM, {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}, torch {torch.__version__}, load average before: "
            f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="tiny,smollm2")
    parser.add_argument("--nprocs", default="1,2")
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per cell (>= 3)")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--max-seq-len", type=int, default=512)
    parser.add_argument("--threads", type=int, default=None,
                        help="OMP_NUM_THREADS per process (default: torch's, i.e. all cores for 1 process, 1 under torchrun)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--single", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--config", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.config, args.overrides, distributed=not args.single, result_path=args.result)
        return

    header = machine()
    overrides = [f"max_steps_per_epoch={args.steps}", "epochs=1", f"batch_size={args.batch_size}",
                 "gradient_accumulation_steps=1", f"tokenizer.max_seq_len={args.max_seq_len}",
                 "log_peak_memory_stats=False"]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_train.") as tmp:
        base = Path(tmp)
        run = build_run(base / "data")
        for family in args.models.split(","):
            config = family_config(run, family, base)
            for nproc in (int(n) for n in args.nprocs.split(",")):
                result = run_cell(config, family, nproc, overrides + [f"output_dir={base / f'out_{family}_{nproc}'}"], base,
                                  args.threads)
                rows.append({"model": family, "nproc": nproc, **result})
                print(f"{family} x{nproc}: {result['tokens_per_second']:.0f} tokens/s, "
                      f"{result['step_seconds']:.2f} s/step, peak RSS {result['peak_rss_gib_per_process']:.2f} GiB/process",
                      file=sys.stderr)

    print(f"Machine: {header}\n")
    print(f"batch_size {args.batch_size} per process, max_seq_len {args.max_seq_len}, {args.steps} steps, "
          f"OMP_NUM_THREADS {args.threads or 'default'}, "
          "LoRA settings of configs/<model>_persona/single_max.yaml\n")
    print("| model | processes | tokens/s (all processes) | s/step | peak RSS per process (GiB) | peak RSS total (GiB) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['nproc']} | {r['tokens_per_second']:.0f} | {r['step_seconds']:.2f} | "
              f"{r['peak_rss_gib_per_process']:.2f} | {r['peak_rss_gib_total']:.2f} |")
    if args.json:
        args.json.write_text(json.dumps({"machine": header, "args": vars(args) | {"json": str(args.json)}, "rows": rows},
                                        indent=2, default=str))


if __name__ == "__main__":
    main()
