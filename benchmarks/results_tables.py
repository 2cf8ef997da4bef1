"""Print docs/results.md's tables of the ML-1M study from the file `persona-tune report` writes.

    python benchmarks/results_tables.py docs/results/ml1m-smollm2.json

Three markdown tables: the learning curve (RMSE by training rows, per series), every cell against
the four classical baselines and, where the file has them, the kNN and MF references (paired over
users), and each ablation against its reference (the
report's `comparisons`, from `--compare A:B`).
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

SIZES = {"n250": 250, "n1000": 1000, "n4000": 4000, "nall": 16521}
# Each series: (label, cell name with {n} for the training size). Cells that do not exist are "-".
SERIES = [
    ("θ_single(max), LM alone, closed-form head", "trunk-{n}-probe-single_max-ms"),
    ("θ_single(max), LM alone, + LoRA 2 epochs", "trunk-{n}-single_max-ms"),
    ("θ_persona, LM alone, closed-form head", "trunk-{n}-probe-persona-ms"),
    ("θ_single(max), numbers head, closed form", "trunk-{n}-prior-probe-single_max-ms"),
    ("θ_single(max), numbers head, + LoRA 2 epochs", "trunk-{n}-prior-single_max-ms"),
    ("θ_persona, numbers head, closed form", "trunk-{n}-prior-probe-persona-ms"),
    ("θ_persona, numbers head, + LoRA 2 epochs", "trunk-{n}-prior-persona-ms"),
]
# What each ablation's A changes with respect to its B (the study's --compare pairs).
CHANGES = {
    ("trunk-n1000-prior-single_max-ms", "trunk-n1000-single_max-ms"): "the head also reads the stated numbers",
    ("trunk-n1000-prior-probe-single_max-ms", "trunk-n1000-prior-single_max-ms"): "closed-form head only, no LoRA epochs",
    ("trunk-n1000-prior-persona-ms", "trunk-n1000-prior-single_max-ms"): "θ_persona (4 adapters) instead of θ_single",
    ("trunk-n1000-prior-single_min-ms", "trunk-n1000-prior-single_max-ms"): "θ_single(min): 40 rows, the smallest persona's share",
    ("trunk-n1000-prior-l8-single_max-ms", "trunk-n1000-prior-single_max-ms"): "top 8 layers adapted, not 4",
    ("trunk-n1000-prior-single_max-msml", "trunk-n1000-prior-single_max-ms"): "memory M_s + top-4 M_l, not M_s",
    ("trunk-n1000-single_max-msml", "trunk-n1000-single_max-ms"): "memory M_s + top-4 M_l, not M_s",
    ("trunk-n1000-prior-paper-single_max-ms", "trunk-n1000-prior-single_max-ms"): "the paper's prompt template, not the compact one",
    ("trunk-n1000-paper-single_max-ms", "trunk-n1000-single_max-ms"): "the paper's prompt template, not the compact one",
    ("trunk-n1000-ce-single_max-ms", "trunk-n1000-single_max-ms"): "objective: the paper's cross-entropy, not mse",
    ("trunk-n1000-zerohead-single_max-ms", "trunk-n1000-single_max-ms"): "the head starts at zero, not in closed form",
    ("trunk-n1000-nohead-ce-single_max-ms", "trunk-n1000-single_max-ms"): "no head, cross-entropy (the paper's model)",
    ("trunk-n1000-probe-single_max-ms", "trunk-n1000-single_max-ms"): "closed-form head only, no LoRA epochs",
    ("trunk-n4000-probe-single_max-ms", "trunk-n1000-probe-single_max-ms"): "4,000 training rows, not 1,000",
    ("trunk-n4000-prior-probe-single_max-ms", "trunk-n1000-prior-probe-single_max-ms"): "4,000 training rows, not 1,000",
    ("trunk-nall-probe-single_max-ms", "trunk-n4000-probe-single_max-ms"): "all 16,521 training rows, not 4,000",
    ("trunk-nall-prior-probe-single_max-ms", "trunk-n4000-prior-probe-single_max-ms"): "all 16,521 training rows, not 4,000",
    ("trunk-n4000-prior-single_max-ms", "trunk-n4000-prior-probe-single_max-ms"): "+ 2 LoRA epochs on the closed-form head",
    ("trunk-n4000-single_max-ms", "trunk-n4000-probe-single_max-ms"): "+ 2 LoRA epochs on the closed-form head",
    ("trunk-n1000-prior-probe-persona-ms", "trunk-n1000-prior-probe-single_max-ms"): "θ_persona instead of θ_single",
    ("trunk-nall-prior-probe-persona-ms", "trunk-nall-prior-probe-single_max-ms"): "θ_persona instead of θ_single",
    ("trunk-nall-probe-persona-ms", "trunk-nall-probe-single_max-ms"): "θ_persona instead of θ_single",
    ("trunk-n1000-probe-persona-ms", "trunk-n1000-probe-single_max-ms"): "θ_persona instead of θ_single",
    ("trunk-n4000-probe-persona-ms", "trunk-n4000-probe-single_max-ms"): "θ_persona instead of θ_single",
    ("trunk-nall-prior-single_max-ms", "trunk-nall-prior-probe-single_max-ms"): "+ 2 LoRA epochs on the closed-form head",
    ("trunk-nall-prior-persona-ms", "trunk-nall-prior-single_max-ms"): "θ_persona instead of θ_single",
    ("trunk-nall-single_max-ms", "trunk-nall-probe-single_max-ms"): "+ 2 LoRA epochs on the closed-form head",
    ("trunk-n4000-prior-persona-ms", "trunk-n4000-prior-single_max-ms"): "θ_persona instead of θ_single",
    ("trunk-n1000-l14-single_max-ms", "trunk-n1000-single_max-ms"): "top 14 layers adapted (from layer 16), not 4",
}
BASELINES = ("global_mean", "user_mean", "item_mean", "bias", "knn", "mf")
HEADS = {"global_mean": "global mean", "user_mean": "user mean", "item_mean": "item mean", "bias": "bias",
         "knn": "item-kNN", "mf": "MF"}


def ci(p: dict, better: str = "✓", worse: str = "✗") -> str:
    text = f"{p['diff']:+.3f} [{p['lo']:+.3f}, {p['hi']:+.3f}]"
    return text + (f" {better}" if p["hi"] < 0 else f" {worse}" if p["lo"] > 0 else "")


def train_rows(name: str) -> str:
    if name == "trunk-n1000-prior-single_min-ms":
        return "40"
    size = re.match(r"trunk-(n\d+|nall)-", name)
    return f"{SIZES[size.group(1)]:,}" if size else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path)
    data = json.loads(parser.parse_args().results.read_text())
    scoring = {c["name"]: c for c in data["cells"] if c["mode"] == "scoring"}

    print("| series | " + " | ".join(f"{n:,} rows" for n in SIZES.values()) + " |")
    print("|---|" + "---|" * len(SIZES))
    for label, pattern in SERIES:
        row = [f"{scoring[name]['rmse']:.3f}" if (name := pattern.format(n=n)) in scoring else "-" for n in SIZES]
        print(f"| {label} | " + " | ".join(row) + " |")

    names = [b for b in BASELINES if any(b in c["paired"] for c in data["cells"])]
    print("\n| cell | mode | train rows | test rows | RMSE | r | sd | " + " | ".join(f"− {HEADS[b]}" for b in names) + " |")
    print("|---|---|---|---|---|---|---|" + "---|" * len(names))
    for c in sorted(data["cells"], key=lambda c: (c["mode"] != "scoring", c["rmse"])):
        print(f"| {c['name']} | {c['mode']} | {train_rows(c['name'])} | {c['rows']} | {c['rmse']:.3f} | "
              f"{c['pearson_r']:.2f} | {c['pred_sd']:.2f} | "
              + " | ".join(ci(c["paired"][b]) if b in c["paired"] else "-" for b in names) + " |")

    print("\n| A | what A changes | B | RMSE A | RMSE B | A − B, paired 95% CI |")
    print("|---|---|---|---|---|---|")
    for c in data["comparisons"]:
        if c["mode"] != "scoring":
            continue
        change = CHANGES.get((c["a"], c["b"]), "?")
        print(f"| {c['a']} | {change} | {c['b']} | {scoring[c['a']]['rmse']:.3f} | {scoring[c['b']]['rmse']:.3f} | "
              f"{ci(c, 'A better', 'B better')} |")


if __name__ == "__main__":
    main()
