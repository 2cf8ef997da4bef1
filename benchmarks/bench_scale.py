"""The cost curve: every stage of the pipeline at rising population sizes, on this machine.

    python benchmarks/bench_scale.py --sizes 10 30 100 300 --out /work/runs/scale      # measure (resumable)
    python benchmarks/bench_scale.py --out /work/runs/scale --report docs                 # fit, extrapolate, plot

Per size N: a run folder of N ML-1M users (every user of the ratings file is eligible: --min-ratings 20,
no upper cap, so heavy users are in, as in a real population), then each stage as its own subprocess
(`persona-tune ...` through the CLI), timed on the wall clock, its peak RSS read from ``os.wait4``
(ru_maxrss of the child and every descendant it waited for):

1. prepare      the paper's protocol (chronological 60:40 split) on N sampled users
2. distill      ``--backend offline`` (no LLM; rule-based text); the LLM calls and tokens of the paper's
                self-reflection come from ``distill --backend openai --dry-run`` on the same users
                (calls exact, tokens estimated at 4 characters per token), with the Batch rounds
                (the most steps of any one user: each step's prompt depends on the previous profile)
3. embed        ``--backend local``: the packaged MiniLM (sentence-transformers/all-MiniLM-L6-v2) on CPU
4. personas     KMeans++ on the profile embeddings, K by the elbow
5. train        one trained agent: the frozen-trunk single_max-ms cell on the generated tiny Phi-3 with a
                fixed 200 training rows (grid --path trunk; its eval capped at 50 rows); a fixed cost
6. simulate     the 8 reference recommenders' slates (k=10) and the fidelity probes (10 held-out
                candidates per user, 1 unrated item each) rated by the classical simulator and that
                trained agent, every user of the run

Each stage runs with OMP_NUM_THREADS=1 (one core; the machine is shared). A size's figures go to
OUT/figures/size-N.json stage by stage, so a killed run resumes at the first stage not recorded.
``--report DIR`` fits the growth exponent of each stage (least squares on log seconds against log
users), extrapolates to 10^4, 10^5 and 10^6 users, and writes DIR/results/scale.json and DIR/scale.png.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from persona_tune.variants import Variant

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("PERSONA_TUNE_SHARED", REPO.parent / "shared")).resolve()
STAGES = ("prepare", "distill", "embed", "personas", "train", "simulate")
LABEL = "scale"
AGENT = Variant.of("single_max", "ms", trunk=True, label=LABEL).name
DRY_RUN_MODEL = "gpt-4o-mini"  # only names the model in the dry run's keys; nothing is sent
TARGETS = (10_000, 100_000, 1_000_000)
GNU_TIME = "/usr/bin/time"


def run_stage(argv: list[str], log: Path) -> tuple[float, float, float]:
    """Run one command in a child process: (wall seconds, CPU seconds (user + system), peak RSS in MB),
    each of it and its descendants.

    The command runs under GNU time, which reads ru_maxrss from wait4. Not os.wait4 on our own child:
    a child forked from this (large) process inherits its peak RSS across exec."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO)}
    rss_file = log.with_suffix(".rss")
    started = time.perf_counter()
    with log.open("a") as out:
        out.write(f"\n$ {' '.join(argv)}\n")
        out.flush()
        code = subprocess.call([GNU_TIME, "-f", "%M %U %S", "-o", str(rss_file), *argv], cwd=REPO, env=env,
                               stdout=out, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - started
    if code != 0:
        sys.exit(f"failed (exit {code}): {' '.join(argv)}; see {log}")
    rss_kb, user, system = rss_file.read_text().split()[-3:]
    return seconds, float(user) + float(system), int(rss_kb) / 1024


def tiny_overrides() -> list[str]:
    from persona_tune.demo import model_overrides

    return model_overrides(argparse.Namespace(model="tiny", seed=0))


def stage_commands(run: Path, users: int) -> dict[str, list[str]]:
    cli = [sys.executable, "-m", "persona_tune.cli"]
    data = SHARED / "data"
    tiny = tiny_overrides()
    return {
        "prepare": [*cli, "prepare", "--dataset", "ml-1m", "--data-dir", str(data / "ml-1m"),
                    "--ratings-file", "ratings.partial-users0001-2999.dat",
                    "--meta-file", str(data / "movie-meta" / "ml1m_dbpedia_abstracts.json"),
                    "--min-ratings", "20", "--max-ratings", "100000", "--n-users", str(users), "--seed", "0",
                    "--out", str(run)],
        "distill": [*cli, "distill", "--run", str(run), "--backend", "offline", "--no-progress"],
        "embed": [*cli, "embed", "--run", str(run), "--backend", "local"],
        "personas": [*cli, "personas", "--run", str(run), "--k", "auto"],
        "train": [*cli, "grid", "--run", str(run), "--family", "tiny", "--path", "trunk", "--label", LABEL,
                  "--cells", "single_max-ms", "--train-rows", "200", "--n-boot", "100",
                  "--", "eval.max_rows=50", "num_threads=1", *tiny],
        "simulate": [*cli, "simulate", "--run", str(run), "--variant", AGENT, "--family", "tiny",
                     "--k", "10", "--candidates", "10", "--negatives", "1", "--n-boot", "100", "--num-threads", "1",
                     "--no-progress", "--", *tiny],
    }


def dry_run_figures(run: Path) -> dict:
    """LLM calls, tokens and Batch rounds of the paper's self-reflection on this run's users (nothing is sent)."""
    from persona_tune.distill.llm import plan_batches
    from persona_tune.distill.run import DistillConfig, distill, load_inputs
    from persona_tune.runfolder import RunFolder

    folder = RunFolder(run)
    cfg = DistillConfig(backend="openai", model=DRY_RUN_MODEL, progress=False)
    estimate = distill(folder, cfg, dry_run=True)
    train, items = load_inputs(folder)
    plan = plan_batches(train, items, cfg.batch_size)
    return {"llm_calls": estimate["calls"], "llm_prompt_tokens": estimate["prompt_tokens"],
            "llm_completion_tokens": estimate["completion_tokens"],
            "llm_tokens": estimate["prompt_tokens"] + estimate["completion_tokens"],
            "batch_rounds": max(len(b) for b in plan.values()), "memories": int(len(train))}


def measure(users: int, out: Path) -> dict:
    figures_path = out / "figures" / f"size-{users}.json"
    figures_path.parent.mkdir(parents=True, exist_ok=True)
    figures = json.loads(figures_path.read_text()) if figures_path.is_file() else {"users": users, "stages": {}}
    run = out / f"size-{users}"
    log = out / f"size-{users}.log"
    commands = stage_commands(run, users)

    def save() -> None:
        tmp = figures_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(figures, indent=2) + "\n")
        tmp.replace(figures_path)

    for name in STAGES:
        if name in figures["stages"]:
            continue
        seconds, cpu, rss = run_stage(commands[name], log)
        figures["stages"][name] = {"seconds": round(seconds, 2), "cpu_seconds": round(cpu, 2),
                                   "peak_rss_mb": round(rss, 1), "load_average": round(os.getloadavg()[0], 2)}
        if name == "distill":
            figures.update(dry_run_figures(run))
        if name == "simulate":
            metrics = json.loads((run / "simulate" / AGENT / "metrics.json").read_text())
            figures["simulate_timing"] = metrics.get("timing", {})
        save()
        print(f"{users} users: {name} {seconds:.1f} s wall, {cpu:.1f} s CPU, {rss:.0f} MB", flush=True)
    figures["load_average_end"] = os.getloadavg()[0]
    save()
    return figures


# ---------------------------------------------------------------- fitting and the report

# GPU engines: no GPU was lent to this task, so these are stated assumptions, not measurements.
GPU_ASSUMPTIONS = {
    "embed": {"texts_per_s": 14_200, "source": "sentence-transformers' table for all-MiniLM-L6-v2 on one V100 "
                                               "(sbert.net, pretrained models); item abstracts are longer than its sentences"},
    "simulate": {"rows_per_s": 1_000, "source": "issue 29's target for SmolLM2 agents served by vLLM on one H100 "
                                                "(benchmarks of item 4; not measured here)"},
}


def fit_exponent(users: list[float], values: list[float]) -> tuple[float, float]:
    """(exponent b, log-intercept a) of values ~ exp(a) * users**b, least squares in log-log."""
    x, y = np.log(np.asarray(users, float)), np.log(np.asarray(values, float))
    if len(x) < 2 or np.ptp(x) == 0:
        raise ValueError("need at least two distinct sizes to fit an exponent")
    b, a = np.polyfit(x, y, 1)
    return float(b), float(a)


def extrapolate(fit: tuple[float, float], users: float) -> float:
    b, a = fit
    return math.exp(a) * users**b


def fit_affine(users: list[float], values: list[float]) -> tuple[float, float]:
    """(fixed, per_user) >= 0 of values ~ fixed + per_user * users: non-negative least squares."""
    from scipy.optimize import nnls

    design = np.column_stack([np.ones(len(users)), np.asarray(users, float)])
    (fixed, per_user), _ = nnls(design, np.asarray(values, float))
    return float(fixed), float(per_user)


def report(out: Path, docs: Path) -> dict:
    sizes = sorted((json.loads(p.read_text()) for p in (out / "figures").glob("size-*.json")), key=lambda f: f["users"])
    sizes = [s for s in sizes if all(n in s["stages"] for n in STAGES)]
    if len(sizes) < 2:
        sys.exit(f"need at least two finished sizes in {out / 'figures'}")
    users = [s["users"] for s in sizes]

    def series(name: str, key: str) -> list[float]:
        return [max(s["stages"][name].get(key, s["stages"][name]["seconds"]), 1e-3) for s in sizes]

    cpu_fits = {n: fit_exponent(users, series(n, "cpu_seconds")) for n in STAGES}
    wall_fits = {n: fit_exponent(users, series(n, "seconds")) for n in STAGES}
    local = {n: fit_exponent(users[-2:], series(n, "cpu_seconds")[-2:])[0] for n in STAGES}
    affine = {n: fit_affine(users, series(n, "cpu_seconds")) for n in STAGES}
    rss_fits = {n: fit_affine(users, series(n, "peak_rss_mb")) for n in STAGES}
    calls_fit = fit_affine(users, [s["llm_calls"] for s in sizes])
    tokens_fit = fit_affine(users, [s["llm_tokens"] for s in sizes])
    memories_per_user = sum(s["memories"] for s in sizes) / sum(users)
    rows_per_user = sum(s.get("simulate_timing", {}).get("scored", 0) for s in sizes) / sum(users)
    projection = {}
    for target in TARGETS:
        stages = {n: {"cpu_seconds": round(affine[n][0] + affine[n][1] * target, 1),
                      "cpu_seconds_power_law": round(extrapolate(cpu_fits[n], target), 1),
                      "peak_rss_mb": round(rss_fits[n][0] + rss_fits[n][1] * target, 1)} for n in STAGES}
        calls, tokens = calls_fit[1] * target + calls_fit[0], tokens_fit[1] * target + tokens_fit[0]
        gpu = {"embed_seconds": round(memories_per_user * target / GPU_ASSUMPTIONS["embed"]["texts_per_s"], 1),
               "simulate_agent_seconds": round(rows_per_user * target / GPU_ASSUMPTIONS["simulate"]["rows_per_s"], 1),
               "distill_tokens_per_s_for_24h": round(tokens / 86_400)}
        projection[str(target)] = {
            "stages": stages, "dominant": max(stages, key=lambda n: stages[n]["cpu_seconds"]),
            "llm_calls": round(calls), "llm_tokens": round(tokens), "gpu_estimates": gpu}
    result = {
        "machine": "this project's machine: x86-64, 2 cores shared with other jobs (load average per stage in "
                   "`stages`), no GPU; every stage on 1 thread",
        "command": f"python benchmarks/bench_scale.py --sizes {' '.join(map(str, users))} --out {out}",
        "sizes": [{"users": s["users"], "memories": s["memories"], "stages": s["stages"], "llm_calls": s["llm_calls"],
                   "llm_tokens": s["llm_tokens"], "llm_prompt_tokens": s["llm_prompt_tokens"],
                   "llm_completion_tokens": s["llm_completion_tokens"], "batch_rounds": s["batch_rounds"],
                   "simulate_timing": s.get("simulate_timing", {})} for s in sizes],
        "exponents": {n: round(cpu_fits[n][0], 3) for n in STAGES},
        "exponent_basis": "CPU seconds (user + system) of each stage, least squares of log seconds on log users "
                          "over all sizes; CPU time, not wall time, because other jobs shared the cores",
        "wall_exponents": {n: round(wall_fits[n][0], 3) for n in STAGES},
        "local_exponents": {n: round(local[n], 3) for n in STAGES},
        "affine_cpu_seconds": {n: {"fixed": round(affine[n][0], 2), "per_user": round(affine[n][1], 4)} for n in STAGES},
        "llm_exponents": {"calls": round(fit_exponent(users, [s["llm_calls"] for s in sizes])[0], 3),
                          "tokens": round(fit_exponent(users, [s["llm_tokens"] for s in sizes])[0], 3)},
        "memories_per_user": round(memories_per_user, 2),
        "simulate_rows_per_user": round(rows_per_user, 2),
        "extrapolated": projection,
        "extrapolation_basis": "this machine: fixed + per_user x users (non-negative least squares on CPU seconds; "
                               "cpu_seconds_power_law: the log-log fit, for comparison); gpu_estimates: ESTIMATES "
                               "from the throughputs in gpu_assumptions, no GPU ran",
        "gpu_assumptions": GPU_ASSUMPTIONS,
    }
    (docs / "results").mkdir(parents=True, exist_ok=True)
    (docs / "results" / "scale.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(sizes, affine, cpu_fits, docs / "scale.png")
    return result


def markdown(result: dict) -> str:
    """The tables of docs/scale.md, from scale.json."""
    head = "| users | memories | " + " | ".join(STAGES) + " | LLM calls | LLM tokens | Batch rounds |"
    lines = [head, "|" + "---|" * (len(STAGES) + 5)]
    for s in result["sizes"]:
        cells = [f"{s['stages'][n]['cpu_seconds']:.1f} / {s['stages'][n]['seconds']:.0f} s, "
                 f"{s['stages'][n]['peak_rss_mb']:.0f} MB" for n in STAGES]
        lines.append(f"| {s['users']:,} | {s['memories']:,} | " + " | ".join(cells)
                     + f" | {s['llm_calls']:,} | {s['llm_tokens']:,} | {s['batch_rounds']} |")
    lines.append("| exponent b (CPU) | | " + " | ".join(f"{result['exponents'][n]:.2f}" for n in STAGES)
                 + f" | {result['llm_exponents']['calls']:.2f} | {result['llm_exponents']['tokens']:.2f} | |")
    lines.append("| b, two largest sizes | | " + " | ".join(f"{result['local_exponents'][n]:.2f}" for n in STAGES) + " | | | |")
    lines += ["", "| users | " + " | ".join(STAGES) + " | dominant | LLM calls | LLM tokens | GPU: embed | GPU: agent simulate | "
              "LLM tokens/s for 24 h |", "|" + "---|" * (len(STAGES) + 7)]
    for target, p in result["extrapolated"].items():
        g = p["gpu_estimates"]
        lines.append(f"| {int(target):,} | " + " | ".join(_duration(p["stages"][n]["cpu_seconds"]) for n in STAGES)
                     + f" | {p['dominant']} | {p['llm_calls']:,} | {p['llm_tokens']:.2e} | ~{_duration(g['embed_seconds'])}"
                     f" | ~{_duration(g['simulate_agent_seconds'])} | {g['distill_tokens_per_s_for_24h']:,} |")
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    for unit, size in (("d", 86_400), ("h", 3_600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.0f} s"


def plot(sizes: list[dict], affine: dict, fits: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    users = [s["users"] for s in sizes]
    grid = np.logspace(math.log10(min(users)), 6, 60)
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for i, name in enumerate(STAGES):
        color = f"C{i}"
        ax.plot(users, [max(s["stages"][name].get("cpu_seconds", s["stages"][name]["seconds"]), 1e-3) for s in sizes],
                "o", color=color, label=f"{name} (b={fits[name][0]:.2f})")
        ax.plot(grid, [affine[name][0] + affine[name][1] * g for g in grid], "--", color=color, linewidth=1)
    ax.axvspan(max(users), 1e6, color="0.93")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("users")
    ax.set_ylabel("CPU seconds (1 thread)")
    ax.set_title("Stage cost: measured (dots, b = log-log slope), fixed + per-user fit (dashes; shaded: extrapolated)",
                 fontsize=8)
    ax.legend(fontsize=8)
    ax.grid(True, which="major", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="*", default=[20, 60, 200, 600], help="population sizes (users)")
    ap.add_argument("--out", type=Path, default=Path("/tmp/persona-tune-scale"), help="run folders and figures")
    ap.add_argument("--report", type=Path, default=None,
                    help="docs folder: fit and extrapolate the finished sizes, write results/scale.json and scale.png")
    args = ap.parse_args()
    if args.report is None and not Path(GNU_TIME).is_file():
        sys.exit(f"{GNU_TIME} (GNU time, apt-get install time) is needed to read each stage's peak RSS")
    if args.report is not None:
        result = report(args.out, args.report)
        print(markdown(result))
        return 0
    for users in args.sizes:
        measure(users, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
