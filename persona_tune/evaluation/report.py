"""Collect a run's evaluation results into the paper's Table 1 layout, with CIs and plots.

Writes RUN/eval/report.md and RUN/eval/results.json: one row per evaluated variant and mode (base
model, adapter, memories; RMSE, MAE, URR with bootstrap 95% CIs over users), the classical
baselines on the same test rows underneath, and the paper's own Table 1 for reference. Plots in
RUN/eval/plots/: RMSE and MAE against each persona's training-set size (the paper's Figure 3),
the elbow curve of the persona clustering (personas/elbow.png), calibration (mean predicted
rating per true rating) and the training loss of every adapter. A diagnostics table says what each
agent's predictions follow: their mean and spread against the truth's, and their correlation with
the truth, the user mean, the item mean and the bias baseline on the same rows. Prints the table.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from persona_tune.errors import ConfigError, StageMissingError
from persona_tune.evaluation.metrics import metrics_with_ci, paired_rmse_diff
from persona_tune.names import MEMORY_LABELS
from persona_tune.runfolder import (
    ELBOW_PLOT,
    HISTORY,
    METRICS,
    PLOTS,
    REPORT,
    RESULTS,
    TRAIN_SUMMARY,
    RunFolder,
    atomic_path,
    atomic_write_json,
    atomic_write_text,
)
from persona_tune.stage import add_config_arguments, config_from_args, validate
from persona_tune.variants import Variant

# Thakur et al. 2024, Table 1 (their split of ML-1M, 200 users): base, adapter, memories, RMSE, MAE, URR %.
PAPER_TABLE_1 = [
    ("LLaMA-3", "none", "M_s", 1.158, 0.847, 0.0),
    ("LLaMA-3", "none", "M_s+M_l", 1.221, 0.883, 0.0),
    ("LLaMA-3", "none", "M_l", 1.229, 0.888, 0.0),
    ("Phi-3-Mini", "none", "M_s", 1.203, 0.863, 4.23),
    ("Phi-3-Mini", "none", "M_s+M_l", 1.315, 0.952, 2.93),
    ("Phi-3-Mini", "θ_single(max)", "M_s", 1.312, 0.940, 1.30),
    ("Phi-3-Mini", "θ_single(min)", "M_s", 1.180, 0.848, 1.93),
    ("Phi-3-Mini", "θ_single(max)", "M_s+M_l", 1.150, 0.834, 1.15),
    ("Phi-3-Mini", "θ_single(min)", "M_s+M_l", 1.337, 1.042, 3.01),
    ("Phi-3-Mini", "θ_persona", "M_s", 1.292, 0.937, 2.29),
    ("Phi-3-Mini", "θ_persona", "M_s+M_l", 1.171, 0.881, 1.77),
]
BASELINE_NAMES = {"global_mean": "global mean", "user_mean": "user mean (own train rows)",
                  "item_mean": "item mean (all non-test ratings)", "bias": "user+item bias baseline",
                  "knn": "item-kNN with baseline (k = 50)", "mf": "biased MF (SVD, tuned on validation users)"}
REFERENCE_KEYS = ("knn", "mf")  # evaluation/references.py, fitted on the agents' information


def base_model_name(component: str) -> str:
    c = component.lower()
    if "tiny" in c:
        return "tiny Phi-3 (test model)"
    if "smollm2" in c:
        return "SmolLM2-135M-Instruct"
    if "phi3" in c:
        return "Phi-3-Mini"
    return component.rsplit(".", 1)[-1]


def adapter_name(variant: Variant, per_persona: bool) -> str:
    base = variant.with_tag(None).name
    if per_persona or base == "persona":
        return "θ_persona"
    if base == "prompted":
        return "none"
    if base in ("single_min", "single_max"):
        return f"θ_single({base.split('_')[1]})"
    return base


def adapter_label(metrics: dict) -> str:
    """The adapter column: θ_persona / θ_single(min|max) / none, and for the frozen-trunk path its
    adapted layers and head, e.g. "θ_persona (top-4 LoRA + head)"."""
    variant = Variant.parse(metrics["variant"])
    trunk = metrics.get("trunk") if metrics.get("path") == "trunk" else None
    if trunk is None:
        return adapter_name(variant, metrics.get("per_persona_adapter", False))
    cell = Variant(variant.base) if variant.base in ("persona", "prompted", "single_min", "single_max") else variant
    name = adapter_name(cell, metrics.get("per_persona_adapter", False))
    if cell.base_model:
        return name
    parts = [f"top-{trunk['adapted_layers']} LoRA" if trunk.get("epochs", 1) else ""]
    if trunk.get("head_init") not in (None, "none"):
        parts.append("head")
    return f"{name} ({' + '.join(p for p in parts if p) or 'untrained'})"


def _row(metrics: dict) -> dict:
    o = metrics["overall"]
    return {k: o[k] for k in ("rmse", "mae", "urr", "n", "n_scored", "n_users")} | {
        f"{k}_ci": o["ci"][k] for k in ("rmse", "mae", "urr")}


def _agent_rows(run: RunFolder) -> pd.DataFrame | None:
    """The (user_id, item_id) rows any agent variant was evaluated on, or None when there is none."""
    frames = [pd.read_parquet(p, columns=["user_id", "item_id"]) for p in run.eval_prediction_files(baselines=False)]
    return pd.concat(frames).drop_duplicates(ignore_index=True) if frames else None


def references_current(run: RunFolder) -> bool:
    """Whether eval/baselines/ holds this version's kNN and MF references (its metrics.json names how they
    were fitted); baselines written before them have none, or the old hand-written ``mf``."""
    path = run.baselines_dir / METRICS
    return path.is_file() and json.loads(path.read_text()).get("references") is not None


def baseline_frame(run: RunFolder) -> pd.DataFrame | None:
    """eval/baselines/predictions.parquet, with the kNN and MF references taken from references/ (fitted
    once and cached there) when the baselines were written before them and the run has a history."""
    if not run.baseline_predictions.is_file():
        return None
    frame = pd.read_parquet(run.baseline_predictions)
    if not references_current(run):
        frame = frame.drop(columns=[k for k in REFERENCE_KEYS if k in frame])
    missing = [k for k in REFERENCE_KEYS if k not in frame]
    if missing and run.path(HISTORY).is_file():
        from persona_tune.evaluation.references import reference_predictions

        refs = reference_predictions(run)[["user_id", "item_id", *missing]]
        frame = frame.merge(refs, on=["user_id", "item_id"], how="left", validate="one_to_one")
    return frame


def baseline_keys(frame: pd.DataFrame | None) -> list[str]:
    """The baselines of ``frame``, in BASELINE_NAMES' order."""
    return [] if frame is None else [k for k in BASELINE_NAMES if k in frame]


def collect(run: RunFolder) -> dict:
    """Rows of the agents' table and the baselines' table from RUN/eval/*/metrics.json."""
    agents, baselines = [], []
    agent_rows = _agent_rows(run)
    for path in run.eval_metric_files():
        data = json.loads(path.read_text())
        if data.get("kind") == "baselines":
            preds = baseline_frame(run)
            current = references_current(run)
            subset = agent_rows is not None and len(agent_rows) < len(preds)
            if subset:  # the agents ran on a subset (max_rows): score the baselines on exactly those rows
                preds = preds.merge(agent_rows, on=["user_id", "item_id"])
            for name in baseline_keys(preds):
                stored = data["predictors"].get(name) if current or name not in REFERENCE_KEYS else None
                m = stored if stored is not None and not subset else {
                    "overall": metrics_with_ci(preds, name, n_boot=1000, seed=0)}
                baselines.append({"predictor": BASELINE_NAMES.get(name, name), "key": name, **_row(m)})
            continue
        for mode, block in data["modes"].items():
            agents.append({
                "variant": data["variant"], "mode": mode,
                "base_model": base_model_name(data.get("model_component", "")),
                "adapter": adapter_label(data),
                "memories": MEMORY_LABELS.get(data["memory"], data["memory"]),
                "unparsable_rule": data.get("unparsable_rule"), **_row(block["prediction"]),
            })
    keys = list(BASELINE_NAMES)
    baselines.sort(key=lambda r: keys.index(r["key"]) if r["key"] in keys else len(keys))
    adapter_order = {"none": 0, "θ_single(max)": 1, "θ_single(min)": 2, "θ_persona": 4}
    memory_order = {"M_s": 0, "M_s+M_l": 1, "M_l": 2}
    agents.sort(key=lambda r: (r["base_model"], adapter_order.get(r["adapter"], 5),
                               memory_order.get(r["memories"], 3) if r["adapter"] != "none" else 0,
                               memory_order.get(r["memories"], 3), r["mode"]))
    return {"agents": agents, "baselines": baselines}


def _fmt(value, ci, pct=False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    scale = 100.0 if pct else 1.0
    unit = "%" if pct else ""
    digits = 1 if pct else 3
    text = f"{value * scale:.{digits}f}{unit}"
    if ci and not any(c is None or math.isnan(c) for c in ci):
        text += f" [{ci[0] * scale:.{digits}f}, {ci[1] * scale:.{digits}f}]"
    return text


def markdown_table(results: dict) -> str:
    lines = ["| No. | Cell | Base model | Adapter(s) | Memories | Mode | RMSE (↓) | MAE (↓) | URR (↓) | rows |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for i, r in enumerate(results["agents"]):
        lines.append(f"| {i} | {r['variant']} | {r['base_model']} | {r['adapter']} | {r['memories']} | {r['mode']} | "
                     f"{_fmt(r['rmse'], r['rmse_ci'])} | {_fmt(r['mae'], r['mae_ci'])} | "
                     f"{_fmt(r['urr'], r['urr_ci'], pct=True)} | {r['n']} |")
    if results["baselines"]:
        lines += ["", "Classical baselines on the same test rows:", "",
                  "| Predictor | RMSE (↓) | MAE (↓) | rows |", "|---|---|---|---|"]
        for r in results["baselines"]:
            lines.append(f"| {r['predictor']} | {_fmt(r['rmse'], r['rmse_ci'])} | {_fmt(r['mae'], r['mae_ci'])} | {r['n']} |")
    return "\n".join(lines)


DIAGNOSTIC_BASELINES = ("user_mean", "item_mean", "bias")


def diagnostics(run: RunFolder) -> list[dict]:
    """Per agent variant and mode: prediction mean/sd vs the truth's, and Pearson r with the truth and baselines."""
    base = baseline_frame(run)
    if base is not None:
        base = base[["user_id", "item_id", *DIAGNOSTIC_BASELINES]]
    rows = []
    for path in run.eval_prediction_files(baselines=False):
        preds = pd.read_parquet(path, columns=["user_id", "item_id", "rating", "mode", "prediction"])
        if base is not None:
            preds = preds.merge(base, on=["user_id", "item_id"], how="left")
        for mode, group in preds.dropna(subset=["prediction"]).groupby("mode", sort=True):
            row = {"variant": path.parent.name, "mode": mode, "n": len(group),
                   "mean_prediction": group["prediction"].mean(), "mean_rating": group["rating"].mean(),
                   "sd_prediction": group["prediction"].std(), "sd_rating": group["rating"].std(),
                   "r_rating": _pearson(group["prediction"], group["rating"])}
            for name in DIAGNOSTIC_BASELINES:
                row[f"r_{name}"] = _pearson(group["prediction"], group[name]) if name in group else float("nan")
            rows.append({k: None if isinstance(v, float) and math.isnan(v) else v for k, v in row.items()})
    return rows


def _pearson(a: pd.Series, b: pd.Series) -> float:
    if len(a) < 3 or a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(a.corr(b))


def diagnostics_table(rows: list[dict]) -> str:
    def num(x: float) -> str:
        return "-" if x is None or math.isnan(x) else f"{x:.2f}"

    lines = ["| Variant | Mode | rows | mean pred (truth) | sd pred (truth) | r truth | r user mean | r item mean | r bias |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['mode']} | {r['n']} | {num(r['mean_prediction'])} ({num(r['mean_rating'])}) "
                     f"| {num(r['sd_prediction'])} ({num(r['sd_rating'])}) | {num(r['r_rating'])} | "
                     f"{num(r['r_user_mean'])} | {num(r['r_item_mean'])} | {num(r['r_bias'])} |")
    return "\n".join(lines)


def paired_cells(run: RunFolder, n_boot: int = 1000, seed: int = 0) -> list[dict]:
    """Per agent cell and mode, on its own rows: RMSE, MAE, Pearson r with the truth, sd of the
    predictions, and RMSE(agent) - RMSE(baseline) for each classical baseline and reference (bias,
    kNN, MF) with a paired bootstrap CI over users (both RMSEs on the same resampled rows)."""
    base = baseline_frame(run)
    if base is None:
        return []
    names = baseline_keys(base)
    base = base[["user_id", "item_id", *names]]
    cells = []
    for path in run.eval_prediction_files(baselines=False):
        preds = pd.read_parquet(path, columns=["user_id", "item_id", "rating", "mode", "prediction"])
        for mode, group in preds.groupby("mode", sort=True):
            rows = group.merge(base, on=["user_id", "item_id"], how="inner").dropna(subset=["prediction"])
            if rows.empty:
                continue
            err = rows["prediction"] - rows["rating"]
            cells.append({
                "name": path.parent.name, "mode": mode, "rows": int(len(rows)), "users": int(rows["user_id"].nunique()),
                "rmse": float(np.sqrt(np.mean(err ** 2))), "mae": float(np.mean(np.abs(err))),
                "pearson_r": _finite(_pearson(rows["prediction"], rows["rating"])),
                "pred_sd": _finite(float(rows["prediction"].std())),
                "paired": {b: paired_rmse_diff(rows, "prediction", b, n_boot=n_boot, seed=seed) for b in names},
            })
    return cells


def cell_comparisons(run: RunFolder, pairs: list[str], n_boot: int = 1000, seed: int = 0) -> list[dict]:
    """RMSE(A) − RMSE(B) for each "A:B" pair of eval cells, per mode both have, on the rows both scored,
    with a paired bootstrap CI over users (an ablation against its reference on the same rows)."""
    cells = {p.parent.name: p for p in run.eval_prediction_files(baselines=False)}
    out = []
    for pair in pairs:
        a, sep, b = pair.partition(":")
        if not sep or not a or not b:
            raise ConfigError(f"--compare takes CELL_A:CELL_B, got {pair!r}")
        unknown = [c for c in (a, b) if c not in cells]
        if unknown:
            raise ConfigError(f"--compare {pair}: no eval cell {unknown[0]!r} in {run.eval_dir}; "
                              f"the cells are: {', '.join(sorted(cells))}")
        keys = ["user_id", "item_id", "mode"]
        both = pd.read_parquet(cells[a], columns=[*keys, "rating", "prediction"]).merge(
            pd.read_parquet(cells[b], columns=[*keys, "prediction"]), on=keys, suffixes=("_a", "_b"))
        for mode, rows in both.groupby("mode", sort=True):
            diff = paired_rmse_diff(rows, "prediction_a", "prediction_b", n_boot=n_boot, seed=seed)
            out.append({"a": a, "b": b, "mode": mode, "rows": diff.pop("n"), **diff})
    return out


def comparisons_table(comparisons: list[dict]) -> str:
    lines = ["| A | B | Mode | rows | RMSE(A) − RMSE(B) [95% CI] |", "|---|---|---|---|---|"]
    for c in comparisons:
        mark = " (A better)" if c["hi"] < 0 else (" (B better)" if c["lo"] > 0 else "")
        lines.append(f"| {c['a']} | {c['b']} | {c['mode']} | {c['rows']} | "
                     f"{c['diff']:+.3f} [{c['lo']:+.3f}, {c['hi']:+.3f}]{mark} |")
    return "\n".join(lines)


def _finite(x: float) -> float | None:
    return None if x is None or math.isnan(x) else x


SHORT_NAMES = {"global_mean": "global mean", "user_mean": "user mean", "item_mean": "item mean",
               "bias": "bias baseline", "knn": "item-kNN", "mf": "MF"}


def references_note(run: RunFolder) -> str:
    """One sentence on what the kNN and MF references were fitted with, or why they are absent."""
    if not run.path(HISTORY).is_file():
        return (f"No kNN or MF reference: the run has no {HISTORY} (prepared before it existed; prepare the data "
                "again into a new --out for them).")
    from persona_tune.evaluation.references import References

    d = References(run).describe()
    mf = d["mf"]
    return (f"The references see what the agents see (history `{d['history']}`, {d['buckets']} bucket(s); "
            f"evaluation/references.py): item-kNN with baseline, k = {d['knn_k']}, shrunk Pearson-baseline "
            f"similarity; biased MF (scikit-surprise SVD) with {mf['n_factors']} factors, reg {mf['reg']:g}, "
            f"{mf['n_epochs']} epochs, chosen from factors {d['mf_grid']['n_factors']} x reg {d['mf_grid']['reg']} "
            f"on validation rows: {d['mf_validation']}.")


def paired_table(cells: list[dict]) -> str:
    def diff(d: dict) -> str:
        mark = " ✓" if d["hi"] < 0 else (" ✗" if d["lo"] > 0 else "")
        return f"{d['diff']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}]{mark}"

    names = [b for b in BASELINE_NAMES if any(b in c["paired"] for c in cells)]
    head = " | ".join(f"− {SHORT_NAMES.get(b, b)}" for b in names)
    lines = [f"| Cell | Mode | rows | RMSE | r | sd | {head} |", "|---|---|---|---|---|---|" + "---|" * len(names)]
    for c in cells:
        r = "-" if c["pearson_r"] is None else f"{c['pearson_r']:.2f}"
        sd = "-" if c["pred_sd"] is None else f"{c['pred_sd']:.2f}"
        lines.append(f"| {c['name']} | {c['mode']} | {c['rows']} | {c['rmse']:.3f} | {r} | {sd} | "
                     + " | ".join(diff(c["paired"][b]) if b in c["paired"] else "-" for b in names) + " |")
    return "\n".join(lines)


def paper_table() -> str:
    lines = ["| No. | Base model | Adapter(s) | Memories | RMSE | MAE | URR |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {i} | {b} | {a} | {m} | {r:.3f} | {e:.3f} | {u:.2f}% |" for i, (b, a, m, r, e, u) in enumerate(PAPER_TABLE_1)]
    return "\n".join(lines)


# ---------------------------------------------------------------- plots


def _savefig(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, bbox_inches="tight", format="png")


def plot_training_size(run: RunFolder, out: Path) -> Path | None:
    """RMSE and MAE of each persona adapter against its training-set size (the paper's Figure 3)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = []
    for path in run.eval_metric_files():
        data = json.loads(path.read_text())
        if not data.get("per_persona_adapter") or not data.get("train_rows"):
            continue
        for mode, block in data["modes"].items():
            by = block["prediction"]["by"].get("persona", {})
            pts = sorted((data["train_rows"][p], m["rmse"], m["mae"], p) for p, m in by.items() if p in data["train_rows"])
            if pts:
                series.append((f"{data['variant']} [{mode}]", pts))
    if not series:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for label, pts in series:
        x = [p[0] for p in pts]
        for ax, idx in ((axes[0], 1), (axes[1], 2)):
            ax.plot(x, [p[idx] for p in pts], marker="o", label=label)
            for p in pts:
                ax.annotate(f"P{p[3]}", (p[0], p[idx]), textcoords="offset points", xytext=(3, 3), fontsize=7)
    for ax, name in zip(axes, ("RMSE", "MAE")):
        ax.set_xlabel("training rows of the persona's adapter")
        ax.set_ylabel(f"{name} on the persona's test rows")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("Error by training-set size per persona (cf. the paper's Figure 3)")
    _savefig(fig, out / "training_size.png")
    plt.close(fig)
    return out / "training_size.png"


def learning_curve_points(run: RunFolder, cells: list[dict]) -> dict[str, list[tuple[int, dict]]]:
    """Frozen-trunk cells in series by what they are, each point (training rows, paired cell), e.g.
    "single_max-ms" for trunk-n250-, trunk-n1000-, trunk-nall-... (the label's n<rows> or nall part names
    no series); the variants' training rows place the point."""
    by_name = {c["name"]: c for c in cells if c["mode"] == "scoring"}
    series: dict[str, list[tuple[int, dict]]] = {}
    for path in sorted(run.eval_dir.glob("trunk*/metrics.json")):
        data = json.loads(path.read_text())
        name = path.parent.name
        trunk = data.get("trunk") or {}
        rows = sum(v.get("train_rows", 0) for v in trunk.get("variants", {}).values())
        if name not in by_name or not rows:
            continue
        variant = Variant.parse(name)
        series_label = [p for p in variant.label_parts if not re.fullmatch(r"n(\d+|all)", p)]
        key = variant.with_prefix("-".join(series_label)).name if variant.trunk else name
        series.setdefault(key, []).append((rows, by_name[name]))
    return {k: sorted(v, key=lambda p: p[0]) for k, v in series.items()}


def plot_learning_curve(run: RunFolder, out: Path, cells: list[dict]) -> Path | None:
    """RMSE against training rows for the frozen-trunk cells, with the classical baselines on the same
    rows (the paper's Figure 3 at this scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Curves only: a series needs two training sizes (single-size ablations are in the tables).
    series = {k: v for k, v in learning_curve_points(run, cells).items() if len({p[0] for p in v}) >= 2}
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(9.5, 4.5))
    for key, pts in series.items():
        ax.plot([p[0] for p in pts], [p[1]["rmse"] for p in pts], marker="o", label=key)
    reference = next(iter(series.values()))[0][1]
    for name, style, color in (("global_mean", ":", "grey"), ("user_mean", "--", "grey"), ("item_mean", "-.", "grey"),
                               ("bias", "-", "grey"), ("knn", "--", "black"), ("mf", "-", "black")):
        if name in reference["paired"]:
            value = reference["rmse"] - reference["paired"][name]["diff"]
            ax.axhline(value, color=color, linestyle=style, linewidth=1, label=SHORT_NAMES[name])
    ax.set_xscale("log")
    ax.set_xlabel("training rows")
    ax.set_ylabel(f"RMSE on the same {reference['rows']} test rows")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: never over a point
    ax.set_title("Frozen-trunk agents: learning curve")
    _savefig(fig, out / "learning_curve.png")
    plt.close(fig)
    return out / "learning_curve.png"


PAIRED_PLOT_AGAINST = ("bias", "knn", "mf")  # the strongest baselines: the ones an agent must beat
PAIRED_PLOT_RIGHT = 0.25  # RMSE: a cell further behind is drawn at the edge with its value (keeps 0 readable)


def plot_paired(out: Path, cells: list[dict]) -> Path | None:
    """RMSE(agent) − RMSE(reference) with its paired 95% CI, per cell and mode, against the bias
    baseline and the kNN and MF references (a forest plot: left of 0, the agent is better). Cells
    sorted by their difference from the bias baseline. A cell more than PAIRED_PLOT_RIGHT behind is drawn
    at that edge, labelled with its difference, so the differences near 0 stay readable."""
    against = [b for b in PAIRED_PLOT_AGAINST if any(b in c["paired"] for c in cells)]
    if not against:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first = against[0]
    ranked = sorted(cells, key=lambda c: c["paired"].get(first, {}).get("diff", np.inf), reverse=True)
    fig, ax = plt.subplots(figsize=(9.5, 1.2 + 0.32 * len(ranked)))
    offsets = np.linspace(-0.22, 0.22, len(against)) if len(against) > 1 else [0.0]
    for name, offset, marker in zip(against, offsets, "osD"):
        pts = [(y + offset, c["paired"][name]) for y, c in enumerate(ranked) if name in c["paired"]]
        diff = np.array([d["diff"] for _, d in pts])
        err = np.array([[d["diff"] - d["lo"] for _, d in pts], [d["hi"] - d["diff"] for _, d in pts]])
        line = ax.errorbar(diff, [y for y, _ in pts], xerr=err, fmt=marker, markersize=4, capsize=2, linewidth=1,
                           label=f"− {SHORT_NAMES[name]}")
        for y, d in pts:
            if d["diff"] > PAIRED_PLOT_RIGHT:
                ax.annotate(f"{d['diff']:+.2f} →", (PAIRED_PLOT_RIGHT, y), ha="right", va="center", fontsize=6,
                            color=line[0].get_color())
    lows = [d["lo"] for c in ranked for b, d in c["paired"].items() if b in against]
    his = [d["hi"] for c in ranked for b, d in c["paired"].items() if b in against]
    margin = 0.05 * (min(max(his), PAIRED_PLOT_RIGHT) - min(min(lows), 0))
    ax.set_xlim(min(min(lows), 0) - margin, min(max(his), PAIRED_PLOT_RIGHT) + margin)
    ax.axvline(0, color="black", linewidth=1)
    modes = {c["mode"] for c in ranked}
    ax.set_yticks(range(len(ranked)), [c["name"] + (f" [{c['mode']}]" if len(modes) > 1 else "") for c in ranked],
               fontsize=7)
    ax.set_xlabel("RMSE(agent) − RMSE(reference), paired 95% CI over users (left of 0: the agent is better)")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title("Agents against the bias baseline and the classical references, on each cell's rows")
    _savefig(fig, out / "paired.png")
    plt.close(fig)
    return out / "paired.png"


CALIBRATION_LINES = 6


def calibration_cells(rmse: pd.Series, lines: int = CALIBRATION_LINES) -> list[str]:
    """The cells the calibration plot draws: all of them up to ``lines``, else ``lines`` evenly spaced
    in RMSE rank, the best and the worst included, best first."""
    ranked = rmse.sort_values()
    if len(ranked) <= lines:
        return list(ranked.index)
    return list(ranked.index[np.unique(np.linspace(0, len(ranked) - 1, lines).round().astype(int))])


def plot_calibration(run: RunFolder, out: Path) -> Path | None:
    """Mean predicted rating (and its spread) per true rating, per variant and mode, next to the bias
    baseline. Beyond CALIBRATION_LINES cells it draws that many, evenly spaced in RMSE rank from the
    best to the worst, so the picture stays readable."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frames = []
    for path in run.eval_prediction_files(baselines=False):
        df = pd.read_parquet(path, columns=["rating", "prediction", "mode"])
        df["label"] = path.parent.name + " [" + df["mode"] + "]"
        frames.append(df)
    baseline = run.baseline_predictions
    if baseline.is_file():
        b = pd.read_parquet(baseline, columns=["rating", "bias"]).rename(columns={"bias": "prediction"})
        b["label"] = "bias baseline"
        frames.append(b)
    if not frames:
        return None
    data = pd.concat(frames, ignore_index=True).dropna(subset=["prediction"])
    rmse = ((data["prediction"] - data["rating"]) ** 2).groupby(data["label"]).mean() ** 0.5
    rows = data.groupby("label").size()
    agents = rmse.drop("bias baseline", errors="ignore")
    cells = calibration_cells(agents)
    title = "Calibration"
    if len(cells) < len(agents):
        title += f": {len(cells)} of {len(agents)} cells, best to worst RMSE"
    fig, ax = plt.subplots(figsize=(8.5, 5))
    ax.plot([1, 5], [1, 5], color="grey", linestyle="--", label="perfect")
    for label in [*(["bias baseline"] if "bias baseline" in rmse else []), *cells]:
        group = data[data["label"] == label]
        stats = group.groupby("rating")["prediction"].agg(["mean", "std"])
        ax.errorbar(stats.index, stats["mean"], yerr=stats["std"].fillna(0), marker="o", capsize=3,
                    label=f"{label} (RMSE {rmse[label]:.3f} on {rows[label]} rows)")
    ax.set_xlabel("true rating")
    ax.set_ylabel("predicted rating (mean ± sd)")
    ax.set_xlim(0.5, 5.5)
    ax.set_ylim(0.5, 5.5)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title(title)
    _savefig(fig, out / "calibration.png")
    plt.close(fig)
    return out / "calibration.png"


def plot_training_curves(run: RunFolder, out: Path) -> Path | None:
    """Training loss per optimizer step of every trained adapter (raw, and a running mean)."""
    curves = {}
    for path in sorted(run.adapters_dir.glob(f"*/{TRAIN_SUMMARY}")):
        losses = json.loads(path.read_text()).get("losses") or []
        if losses:
            curves[path.parent.name] = pd.Series(losses, index=range(1, len(losses) + 1), dtype=float)
    if not curves:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (name, loss) in enumerate(curves.items()):
        color = f"C{i % 10}"
        window = max(1, len(loss) // 6)
        ax.plot(loss.index, loss.values, color=color, alpha=0.25, linewidth=0.8)
        ax.plot(loss.index, loss.rolling(window, min_periods=1).mean(), color=color, label=f"{name} (mean of {window})")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (mean CE over the assistant turn's tokens)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("Training curves")
    _savefig(fig, out / "training_curves.png")
    plt.close(fig)
    return out / "training_curves.png"


def copy_elbow(run: RunFolder, out: Path) -> Path | None:
    src = run.path(ELBOW_PLOT)
    if not src.is_file():
        return None
    with atomic_path(out / src.name) as tmp:
        shutil.copyfile(src, tmp)
    return out / src.name


@dataclass
class ReportConfig:
    """The `report` stage's options (its CLI arguments are generated from them)."""

    json_out: str | None = field(default=None, metadata={
        "help": "also write results.json here (e.g. docs/results/ml1m-smollm2.json)"})
    compare: tuple[str, ...] = field(default=(), metadata={
        "flag": "--compare", "append": True, "metavar": "CELL_A:CELL_B",
        "help": "also compare two eval cells on the rows both scored, paired over users (repeatable)"})


def run(run: RunFolder, cfg: ReportConfig) -> str:
    """The `report` stage: report.md, results.json and plots/ from RUN/eval (and a copy of results.json
    to ``json_out``); returns the markdown table. ``compare``: "A:B" pairs of cells compared on their
    common rows."""
    validate(cfg)  # the one check of the Config (persona_tune/stage.py), before anything is read
    if not run.eval_dir.is_dir() or not run.eval_metric_files():
        raise StageMissingError(f"no results in {run.eval_dir}: run `persona-tune eval --run {run.root}` "
                                f"and/or `persona-tune baselines --run {run.root}` first")
    from persona_tune.evaluation.run import stale_results, unfinished_results

    if unfinished := unfinished_results(run):  # never publish numbers of a failed or stopped evaluation
        raise StageMissingError(f"the evaluation of {', '.join(unfinished)} in {run.eval_dir} did not finish "
                                f"(metrics.json without eval_inputs.json): re-run `persona-tune eval --run "
                                f"{run.root} --variants {','.join(unfinished)}` (or the `grid` that made them)")
    if stale := stale_results(run):  # never publish numbers of adapters or data that changed since
        raise StageMissingError(f"the results of {', '.join(stale)} in {run.eval_dir} come from adapters or data "
                                f"that changed since: re-run `persona-tune eval --run {run.root} --variants {','.join(stale)}`")
    comparisons = cell_comparisons(run, list(cfg.compare))  # bad pairs fail before anything is written
    results = collect(run)
    plots_dir = run.path(PLOTS)
    plots = {name: fn(run, plots_dir) for name, fn in
             (("training_size", plot_training_size), ("elbow", copy_elbow), ("calibration", plot_calibration),
              ("training_curves", plot_training_curves))}
    paired = paired_cells(run)
    plots["learning_curve"] = plot_learning_curve(run, plots_dir, paired)
    plots["paired"] = plot_paired(plots_dir, paired)
    plots = {k: str(v.relative_to(run.eval_dir)) for k, v in plots.items() if v is not None}
    table = markdown_table(results)
    signal = diagnostics(run)
    rule = {r["unparsable_rule"] for r in results["agents"]} - {None}
    md = [f"# Results: {run.root.name}", "",
          "RMSE, MAE and URR on the run's test rows; [95% CI] from a bootstrap over users. "
          f"Unparsable answers: {', '.join(sorted(rule)) or 'n/a'} (paper mode only; scoring mode always rates).", "",
          table, ""]
    if signal:
        md += ["## What the predictions follow", "",
               "Pearson r of each agent's predictions with the truth and with the baselines' predictions on the "
               "same rows. An agent that reads the user's average from M_s follows the user mean; one that reads "
               "the item's historical average follows the item mean.", "", diagnostics_table(signal), ""]
    if paired:
        md += ["## Paired comparisons with the classical baselines and references", "",
               "RMSE(agent) − RMSE(baseline) on each cell's own rows, with a 95% CI from a paired bootstrap over "
               "users (both RMSEs on the same resampled rows). ✓: the agent is better (CI below 0); ✗: worse. "
               + references_note(run), "", paired_table(paired), ""]
    if comparisons:
        md += ["## Paired comparisons between cells", "",
               "RMSE(A) − RMSE(B) on the rows both cells scored, with a 95% CI from a paired bootstrap over users.",
               "", comparisons_table(comparisons), ""]
    from persona_tune.simulate.report import simulation_section  # the Simulation section (issue 13)

    simulation_md, simulation_plots = simulation_section(run, plots_dir)
    md += simulation_md
    md += ["## The paper's Table 1 (Thakur et al. 2024; its own split, for reference)", "", paper_table(), ""]
    if plots:
        md += ["## Plots", ""] + [f"![{k}]({v})" for k, v in plots.items()] + [""]
    plots |= {k: str(v.relative_to(run.eval_dir)) for k, v in simulation_plots.items()}
    atomic_write_text(run.path(REPORT), "\n".join(md))
    atomic_write_json(run.path(RESULTS), {
        **results, "cells": paired, "comparisons": comparisons, "plots": plots, "diagnostics": signal,
        "paper_table_1": [dict(zip(("base_model", "adapter", "memories", "rmse", "mae", "urr_percent"), r))
                          for r in PAPER_TABLE_1]})
    if cfg.json_out is not None:
        atomic_write_text(cfg.json_out, run.path(RESULTS).read_text(encoding="utf-8"))
    run.record_stage("report", {}, outputs=[REPORT, RESULTS, *[str((run.eval_dir / p).relative_to(run.root)) for p in plots.values()]])
    return table


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", required=True, help="run folder (after `persona-tune eval` / `baselines`)")
    add_config_arguments(parser, ReportConfig, type_metavars=False)


def print_result(folder: RunFolder, cfg: ReportConfig, table: str) -> int:
    """What `persona-tune report` prints of ``run``'s result; the exit code."""
    print(table)
    print(f"\nwrote {folder.path(REPORT)} and {folder.path(RESULTS).name}")
    return 0


def main(args: argparse.Namespace) -> int:
    folder, cfg = RunFolder(args.run), config_from_args(ReportConfig, args)
    return print_result(folder, cfg, run(folder, cfg))
