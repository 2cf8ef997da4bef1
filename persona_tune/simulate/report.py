"""The report's Simulation section: per RUN/simulate/<name>/metrics.json a fidelity table (the agent
and the classical simulator), the recommenders' nDCG with true and simulated relevance, the simulated
feedback of the top-k slates, and a plot of simulated against true nDCG per recommender; per
RUN/simulate/<name>/validity.json the validity protocol's tables (persona_tune.simulate.validity)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from persona_tune.runfolder import METRICS, RunFolder, atomic_path
from persona_tune.simulate import validity


def _num(m: dict | None, digits: int = 3) -> str:
    if not m or m.get("value") is None or not math.isfinite(m["value"]):
        return "n/a"
    lo, hi = m.get("ci", [math.nan, math.nan])
    ci = f" [{lo:.{digits}f}, {hi:.{digits}f}]" if math.isfinite(lo) and math.isfinite(hi) else ""
    return f"{m['value']:.{digits}f}{ci}"


def fidelity_table(metrics: dict) -> str:
    k = next(iter(metrics["fidelity"].values()))["ranking"]["k"]
    lines = [f"| simulator | taste AUC (>=4 vs <=2) | watch acc 1:1 | watch F1 1:1 | watch acc 1:3 | watch F1 1:3 "
             f"| rating W1 (lower is better) | nDCG@{k} Kendall τ | nDCG@{k} Spearman ρ |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, f in metrics["fidelity"].items():
        label = f"{name} (bias baseline)" if name == "classical" else f"{name} (LLM agent)"
        lines.append(f"| {label} | {_num(f['taste_auc'])} (n={f['taste_auc']['n_users']}) | "
                     f"{_num(f['watch_1_1']['accuracy'])} | {_num(f['watch_1_1']['f1'])} | "
                     f"{_num(f['watch_1_3']['accuracy'])} | {_num(f['watch_1_3']['f1'])} | "
                     f"{_num(f['distribution_w1'])} | {_num(f['ranking']['kendall_tau'])} | "
                     f"{_num(f['ranking']['spearman_rho'])} |")
    return "\n".join(lines)


def ranking_table(metrics: dict) -> str:
    sims = list(metrics["fidelity"])
    ranking = {s: metrics["fidelity"][s]["ranking"]["recommenders"] for s in sims}
    names = sorted(ranking[sims[0]], key=lambda r: -ranking[sims[0]][r]["ndcg_true"])
    head = "| recommender (re-ranks held-out items) | true nDCG | " + " | ".join(
        f"{s} nDCG | {s} gap" for s in sims) + " |"
    lines = [head, "|---|---|" + "---|---|" * len(sims)]
    for r in names:
        cells = [f"{ranking[s][r]['ndcg_sim']:.3f} | {ranking[s][r]['gap']:+.3f} "
                 f"[{ranking[s][r]['ci']['gap'][0]:+.3f}, {ranking[s][r]['ci']['gap'][1]:+.3f}]" for s in sims]
        lines.append(f"| {r} | {ranking[sims[0]][r]['ndcg_true']:.3f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def feedback_table(metrics: dict) -> str:
    sims = list(metrics["feedback"])
    ranked = set(metrics.get("ranked_recommenders", []))
    first = metrics["feedback"][sims[0]]
    names = [r for r in sorted(first) if r not in ranked]
    if not names:
        return ""
    lines = ["| recommender | k | " + " | ".join(f"{s} rating@k | {s} like-rate@k" for s in sims)
             + " | rows with truth | real rating (sim: " + ", ".join(sims) + ") | real like-rate |",
             "|---|---|" + "---|---|" * len(sims) + "---|---|---|"]
    for r in names:
        cells = [f"{_num(metrics['feedback'][s][r]['mean_rating'], 2)} | {_num(metrics['feedback'][s][r]['like_rate'], 2)}"
                 for s in sims]
        truth = first[r].get("on_truth")
        if truth:
            sim_on = ", ".join(f"{metrics['feedback'][s][r]['on_truth']['sim_mean_rating']['value']:.2f}" for s in sims)
            tail = (f"{first[r]['n_with_truth']} | {truth['real_mean_rating']['value']:.2f} ({sim_on}) | "
                    f"{truth['real_like_rate']['value']:.2f}")
        else:
            tail = "0 | - | -"
        lines.append(f"| {r} | {first[r]['k']} | " + " | ".join(cells) + f" | {tail} |")
    return "\n".join(lines)


def plot_ndcg(metrics: dict, path: Path) -> Path | None:
    """Simulated against true nDCG@k per re-ranking recommender, one marker per simulator."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 5))
    plotted = False
    for (name, f), marker in zip(metrics["fidelity"].items(), "os^Dv"):
        recs = f["ranking"]["recommenders"]
        if not recs:
            continue
        xs = [v["ndcg_true"] for v in recs.values()]
        ys = [v["ndcg_sim"] for v in recs.values()]
        ax.scatter(xs, ys, marker=marker, label=f"{name} (τ={f['ranking']['kendall_tau']['value']:.2f})")
        for r, x, y in zip(recs, xs, ys):
            ax.annotate(r.replace("@heldout", ""), (x, y), fontsize=6, alpha=0.7)
        plotted = True
    if not plotted:
        plt.close(fig)
        return None
    lo, hi = ax.get_xlim()
    ax.set_xlabel("nDCG@k with the true ratings")
    ax.set_ylabel("nDCG@k with the simulator's expected ratings")
    ax.set_title("Recommenders as the simulators see them")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
    plt.close(fig)
    return path


def simulation_section(run: RunFolder, plots_dir: Path) -> tuple[list[str], dict[str, Path]]:
    """Markdown lines of the Simulation section (empty without RUN/simulate/*/metrics.json or validity.json)
    and its plots."""
    files = sorted(run.simulate_dir.glob(f"*/{METRICS}")) if run.simulate_dir.is_dir() else []
    md, plots = [], {}
    for path in files:
        metrics = json.loads(path.read_text())
        name = metrics["name"]
        md += [f"## Simulation: {name}", "",
               f"`persona-tune simulate` on {metrics['users']} users, {len(metrics['recommenders'])} recommenders "
               f"(RUN/simulate/{name}/). The LLM agent ({metrics['variant']}) and the classical simulator (bias "
               f"baseline with a Gaussian residual, σ = {metrics['classical_model']['sigma']:.2f}) rate the same "
               "rows; [95% CI] from a bootstrap over users. docs/simulation.md says what each metric means.", "",
               fidelity_table(metrics), "", ranking_table(metrics), ""]
        fb = feedback_table(metrics)
        if fb:
            md += ["Simulated feedback on the top-k slates (items the user has no train row for); the real "
                   "values only where the user's held-out rows rate the item:", "", fb, ""]
        plot = plot_ndcg(metrics, plots_dir / f"simulation_{name}.png")
        if plot is not None:
            plots[f"simulation_{name}"] = plot
            md += [f"![simulation {name}]({plot.relative_to(run.eval_dir) if plot.is_relative_to(run.eval_dir) else plot})", ""]
    folders = sorted(p for p in run.simulate_dir.iterdir() if p.is_dir()) if run.simulate_dir.is_dir() else []
    for sim in (run.simulation(p.name) for p in folders):
        if not sim.validity.is_file():
            continue
        results = json.loads(sim.validity.read_text())
        md += [f"## Simulation validity: {results['name']}", "",
               f"`persona-tune simulate --validity` (RUN/simulate/{results['name']}/; docs/simulation.md): do the "
               "simulators order recommenders as the users' held-out ratings do?", "", validity.markdown(results), ""]
    return md, plots
