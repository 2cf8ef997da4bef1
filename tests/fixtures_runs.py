"""Run folders for tests: a small synthetic ML-1M-format log, prepared with the paper's protocol.

Other stages' tests start from ``make_prepared_run(tmp_path)``. It takes well under a second.
The later stages' run folders build on it; conftest.py shares the costly ones (``eval_run``,
``ready_run``) as session fixtures. ``require_shared`` finds the data sets in ../shared.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from persona_tune.data.loaders import load_ratings
from persona_tune.data.prepare import Protocol, prepare
from persona_tune.data.synthetic import SynthConfig, write_synthetic
from persona_tune.runfolder import ASSIGNMENTS, RunFolder, atomic_write_parquet

REPO = Path(__file__).resolve().parent.parent  # the checkout


def _shared_root() -> Path:
    return Path(os.environ.get("PERSONA_TUNE_SHARED", REPO.parent / "shared")).resolve()


def require_shared(relpath: str = "data") -> Path:
    """Return ../shared/<relpath>; skip when absent, but fail under CI=true where it must exist."""
    path = _shared_root() / relpath
    if not path.exists():
        reason = f"{path} is absent (set PERSONA_TUNE_SHARED or place shared/ beside the repo)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true but {reason}")
        pytest.skip(reason)
    return path


# LoRA settings of the stand-in adapters (write_adapter) on the tiny model.
LORA = dict(lora_attn_modules=["q_proj", "k_proj"], lora_rank=8, lora_alpha=16)
# Short prompts (the dataset drops memories and trims the profile to fit) keep each training step cheap.
FAST = ["tokenizer.max_seq_len=384", "epochs=1"]


def make_prepared_run(root: Path, n_users: int = 12, seed: int = 0, history: str = "all_time") -> Path:
    """Write a synthetic dataset under ``root/data`` and prepare it into ``root/run``; return the run folder.

    Users have 20-60 ratings (median 35) on 150 items; all of them are kept (``n_users`` of them),
    split 60:40 in time order. items.parquet has every item, with texts like the paper's. ``history``:
    the history mode (all_time keeps the fixtures' numbers as they were before the option existed).
    """
    root = Path(root)
    data = write_synthetic(root / "data", SynthConfig(n_users=n_users, n_items=150, seed=seed, median_ratings=35))
    log = load_ratings("synthetic", data)
    counts = log.ratings.groupby("user_id").size()
    protocol = Protocol(min_ratings=int(counts.min()), max_ratings=int(counts.max()), n_users=n_users, seed=seed,
                        history=history)
    prepare(log, root / "run", protocol)
    return root / "run"


def make_distilled_run(root, n_users: int = 12, seed: int = 0, history: str = "all_time"):
    """A prepared synthetic run, distilled with the offline backend (no LLM)."""
    from persona_tune.distill.run import DistillConfig, distill

    run = make_prepared_run(root, n_users=n_users, seed=seed, history=history)
    distill(RunFolder(run), DistillConfig(backend="offline", progress=False))
    return run


def make_embedded_run(root, n_users: int = 12, seed: int = 0, **embed_kwargs):
    """``make_distilled_run`` with hash embeddings and retrieval (``embed_kwargs``: EmbedConfig's fields)."""
    from persona_tune.memory import stage as embed

    run = make_distilled_run(root, n_users, seed)
    embed.run(RunFolder(run), embed.EmbedConfig(**({"backend": "hash"} | embed_kwargs)))
    return run


def with_personas(root: Path, n_personas: int = 2) -> Path:
    """A prepared run with users assigned round-robin to personas (configgen needs nothing else)."""
    run = make_prepared_run(root)
    users = RunFolder(run).read_users(columns=["user_id"])["user_id"].sort_values().to_numpy()
    assignments = pd.DataFrame({"user_id": users, "persona": [i % n_personas for i in range(len(users))]})
    atomic_write_parquet(assignments.astype("int64"), RunFolder(run).path(ASSIGNMENTS))
    return run


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


def write_adapter(path: Path, seed: int, scale: float = 0.3, model_cfg=None) -> Path:
    """A LoRA adapter in torchtune's adapter_model.pt layout, for ``model_cfg`` (default: LORA on the tiny model),
    in ``path`` (an epoch_N folder), with the completion marker `train` writes last beside epoch_N (the
    train_summary.json that runfolder.check_adapter requires)."""
    import torch
    from torchtune import config
    from torchtune.modules.peft import get_adapter_params

    from persona_tune.models.tiny import lora_tiny_phi3

    torch.manual_seed(seed)
    model = config.instantiate(model_cfg) if model_cfg is not None else lora_tiny_phi3(**LORA)
    state = {name: torch.randn_like(p) * scale for name, p in get_adapter_params(model).items()}
    path.mkdir(parents=True, exist_ok=True)
    torch.save(state, path / "adapter_model.pt")
    write_train_marker(path / "adapter_model.pt")
    return path / "adapter_model.pt"


def write_train_marker(adapter: Path) -> Path:
    """adapters/<variant>/train_summary.json recording ``adapter`` (and a rating head beside it), as a
    finished `train` leaves it."""
    from persona_tune.runfolder import TRAIN_SUMMARY, adapter_files, atomic_write_json

    adapter = Path(adapter)
    return atomic_write_json(adapter.parent.parent / TRAIN_SUMMARY, {"files": adapter_files(adapter)})


def build_eval_run(root: Path) -> tuple[Path, Path]:
    """(run folder, tiny model folder): ``make_persona_run`` (K=2) with the tiny family's training configs
    (`persona-tune configs --family tiny`) and stand-in adapters in RUN/adapters/persona_{0,1}/epoch_1/."""
    from omegaconf import OmegaConf

    from persona_tune.cli import main as cli_main
    from persona_tune.models.tiny import write_tiny_phi3

    run = make_persona_run(root, n_users=8, seed=0, k=2)
    tiny = write_tiny_phi3(root / "tiny", seed=0)
    assert cli_main(["configs", "--run", str(run), "--family", "tiny", "--", f"model_dir={tiny / 'model'}"]) == 0
    model_cfg = OmegaConf.load(RunFolder(run).config_file("persona_0")).model  # what training would use
    for k in (0, 1):
        write_adapter(RunFolder(run).adapter_dir(f"persona_{k}") / "epoch_1", seed=k, model_cfg=model_cfg)
    return run, tiny


def build_ready_run(base: Path) -> tuple[Path, Path]:
    """(run folder after prepare, distill, embed, personas and tiny configs; tiny model folder).

    Built once under ``base``; later callers reuse it.
    """
    from persona_tune import cli
    from persona_tune import configgen
    from persona_tune.configgen import ConfigsConfig
    from persona_tune.models.tiny import write_tiny_phi3

    run, tiny, done = base / "ready" / "run", base / "tiny", base / "ready.done"
    if done.exists():
        return run, tiny
    make_prepared_run(base / "ready", n_users=12, seed=0)
    for argv in (["distill", "--backend", "offline"], ["embed", "--backend", "hash"], ["personas", "--k", "2"]):
        assert cli.main([argv[0], "--run", str(run), *argv[1:]]) == 0, argv
    write_tiny_phi3(tiny, seed=0)
    configgen.run(RunFolder(run), ConfigsConfig(family="tiny", overrides=[f"model_dir={tiny / 'model'}"]))
    done.touch()
    return run, tiny
