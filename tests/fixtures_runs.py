"""Run folders for tests: a small synthetic ML-1M-format log, prepared with the paper's protocol.

Other stages' tests start from ``make_prepared_run(tmp_path)``. It takes well under a second.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from persona_tune.data.loaders import load_ratings
from persona_tune.data.prepare import Protocol, prepare
from persona_tune.data.synthetic import SynthConfig, write_synthetic


def make_prepared_run(root: Path, n_users: int = 12, seed: int = 0) -> Path:
    """Write a synthetic dataset under ``root/data`` and prepare it into ``root/run``; return the run folder.

    Users have 20-60 ratings (median 35) on 150 items; all of them are kept (``n_users`` of them),
    split 60:40 in time order. items.parquet has every item, with texts like the paper's.
    """
    root = Path(root)
    data = write_synthetic(root / "data", SynthConfig(n_users=n_users, n_items=150, seed=seed, median_ratings=35))
    log = load_ratings("synthetic", data)
    counts = log.ratings.groupby("user_id").size()
    protocol = Protocol(min_ratings=int(counts.min()), max_ratings=int(counts.max()), n_users=n_users, seed=seed)
    prepare(log, root / "run", protocol)
    return root / "run"


def make_persona_run(root: Path, n_users: int = 8, seed: int = 0, k: int = 2) -> Path:
    """``make_prepared_run`` taken through offline distillation, hash embeddings and K personas (the CLI)."""
    from persona_tune.cli import main as cli_main

    run = make_prepared_run(root, n_users=n_users, seed=seed)
    for argv in (["distill", "--run", str(run), "--backend", "offline"],
                 ["embed", "--run", str(run), "--backend", "hash"],
                 ["personas", "--run", str(run), "--k", str(k)]):
        assert cli_main(argv) == 0, argv
    return run


def bias_baseline(fit: pd.DataFrame, test: pd.DataFrame, reg: float = 5.0) -> np.ndarray:
    """User+item bias baseline mu + b_i + b_u fitted on ``fit``: b_i the damped mean residual of the
    item, then b_u the damped mean residual of the user after b_i; predictions clipped to 1..5."""
    mu = fit["rating"].mean()
    g = (fit["rating"] - mu).groupby(fit["item_id"])
    b_i = g.sum() / (g.count() + reg)
    g = (fit["rating"] - mu - fit["item_id"].map(b_i)).groupby(fit["user_id"])
    b_u = g.sum() / (g.count() + reg)
    pred = mu + test["item_id"].map(b_i).fillna(0.0) + test["user_id"].map(b_u).fillna(0.0)
    return pred.clip(1, 5).to_numpy()
