"""The frozen-trunk recipe: kill-and-resume in process, and the real `tune run` through `persona-tune grid`."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import subprocess
import sys

import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf

from tests.fixtures_runs import REPO
from tests.fixtures_runs import make_persona_run

pytestmark = [pytest.mark.recipe, pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]


def recipe_module():
    # `recipes` is shadowed by torchtune's own package: load the file by path.
    spec = importlib.util.spec_from_file_location("lora_frozen_trunk", REPO / "recipes" / "lora_frozen_trunk.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_cfg(run, tiny, out, **overrides):
    cfg = OmegaConf.load(REPO / "configs" / "tiny_trunk" / "single_max.yaml")
    cfg.run_dir, cfg.model_dir, cfg.output_dir = str(run), str(tiny / "model"), str(out)
    settings = {"subsample": "null", "progress": False, "model.lora_dropout": 0.0, "save_every_n_steps": 1,
                "max_steps_per_epoch": 3, "optimizer.lr": 1e-3, **overrides}
    return OmegaConf.merge(cfg, OmegaConf.from_dotlist([f"{k}={v}" for k, v in settings.items()]))


def train_once(module, cfg, stop_at: int | None = None):
    recipe = module.FrozenTrunkRecipe(cfg)
    recipe.setup(cfg)
    recipe.output_dir.mkdir(parents=True, exist_ok=True)
    recipe.cache_stats = {}
    train = recipe.rows("train")
    recipe.build_cache(train, "train")
    if stop_at is not None:
        log_dict = recipe.metric_logger.log_dict

        def stop(metrics, step):  # a kill right after this optimizer step, before its state is saved
            if step == stop_at:
                raise KeyboardInterrupt
            log_dict(metrics, step)

        recipe.metric_logger.log_dict = stop
    result = recipe.train(train)
    return result, {k: v.detach().clone() for k, v in recipe.trainable.items()}


def test_a_stopped_training_run_resumes_to_the_same_adapter(tiny, tmp_path, caplog):
    module = recipe_module()
    run = make_persona_run(tmp_path, n_users=6, k=2)
    whole, weights = train_once(module, tiny_cfg(run, tiny, tmp_path / "whole"))
    assert whole["steps"] == 6 and whole["head"]["init"] == "closed_form"
    with pytest.raises(KeyboardInterrupt):
        train_once(module, tiny_cfg(run, tiny, tmp_path / "stopped"), stop_at=4)
    state = torch.load(tmp_path / "stopped" / module.STATE_FILE, weights_only=False)
    assert (state["epoch"], state["step"], state["global_step"]) == (1, 0, 3)
    resumed, resumed_weights = train_once(module, tiny_cfg(run, tiny, tmp_path / "stopped"))
    assert resumed["steps"] == 6 and len(resumed["losses"]) == 3  # only the steps after the save ran again
    for name, value in weights.items():
        torch.testing.assert_close(resumed_weights[name], value, rtol=0, atol=0)
    # Another config (here the objective) does not resume from that state: it starts afresh.
    other, other_weights = train_once(module, tiny_cfg(run, tiny, tmp_path / "stopped", objective="ce"))
    assert len(other["losses"]) == 6
    # A corrupt resume state and a truncated trunk-cache shard are named, removed and recomputed.
    (tmp_path / "stopped" / module.STATE_FILE).write_bytes(b"PK\x03\x04 truncated")
    shard = sorted((run / "trunk_cache").rglob("user_*.pt"))[0]
    shard.write_bytes(shard.read_bytes()[:100])
    with caplog.at_level(logging.WARNING):
        again, again_weights = train_once(module, tiny_cfg(run, tiny, tmp_path / "stopped", objective="ce"))
    assert "unreadable training state" in caplog.text and f"{shard}: unreadable trunk-cache shard" in caplog.text
    assert len(again["losses"]) == 6 and shard.stat().st_size > 100
    for name, value in other_weights.items():
        torch.testing.assert_close(again_weights[name], value, rtol=0, atol=0)


def grid(run, tiny, *args, overrides=()) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PERSONA_TUNE_")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "persona_tune.cli", "grid", "--run", str(run), "--family", "tiny", "--path", "trunk",
           "--n-boot", "50", "--max-steps", "2", *args, "--", f"model_dir={tiny / 'model'}", "progress=False",
           *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "deprecated" not in proc.stderr  # the one override syntax
    return proc


def test_grid_trunk_trains_with_tune_run_evaluates_and_invalidates(tiny, tmp_path):
    run = make_persona_run(tmp_path, n_users=6, k=2)
    out = grid(run, tiny, "--cells", "prompted-ms,single_max-ms", overrides=["eval.paper_rows=4"])
    assert "train trunk-single_max-ms: trained" in out.stdout and "eval  trunk-single_max-ms: done" in out.stdout
    adapter = run / "adapters" / "trunk-single_max-ms"
    assert {p.name for p in (adapter / "epoch_1").iterdir()} == {"adapter_model.pt", "rating_head.pt"}
    assert (adapter / "train_summary.json").is_file() and (adapter / "peft" / "adapter_config.json").is_file()
    lora = torch.load(adapter / "epoch_1" / "adapter_model.pt", weights_only=True)
    frozen = [k for k in lora if k.startswith("layers.0.") and "lora_b" in k]
    assert frozen and all(lora[k].abs().max() == 0 for k in frozen)  # the cached layer's LoRA never trains
    assert any(lora[k].abs().max() > 0 for k in lora if k.startswith("layers.1.") and "lora_b" in k)
    summary = json.loads((adapter / "trunk_summary.json").read_text())
    assert summary["split_layer"] == 1 and summary["cache_bytes"] > 0 and summary["steps"] == 4
    preds = pd.read_parquet(run / "eval" / "trunk-single_max-ms" / "predictions.parquet")
    base = pd.read_parquet(run / "eval" / "trunk-prompted-ms" / "predictions.parquet")
    scoring = preds[preds["mode"] == "scoring"]
    assert len(scoring) == len(base[base["mode"] == "scoring"]) and scoring["prediction"].between(1, 5).all()
    paper = preds[preds["mode"] == "paper"]  # the whole model generates; the head rates the first token
    assert 0 < len(paper) <= 6 and paper["raw_text"].str.len().gt(0).all() and summary["paper_rows"] == len(paper)
    cells = json.loads((run / "eval" / "results.json").read_text())["cells"]
    assert {c["name"] for c in cells} == {"trunk-prompted-ms", "trunk-single_max-ms"}
    for cell in cells:
        assert set(cell["paired"]) == {"global_mean", "user_mean", "item_mean", "bias", "knn", "mf"}
        assert all(p["lo"] <= p["diff"] <= p["hi"] for p in cell["paired"].values())
    # The same command again: nothing is retrained and the test rows' trunk outputs are reused.
    again = grid(run, tiny, "--cells", "single_max-ms", overrides=["eval.paper_rows=4"])
    assert "train trunk-single_max-ms: skipped" in again.stdout
    # Another prompt (the paper template, with collaborative memories and a head that reads their
    # numbers) changes the config: it is retrained, on newly computed trunk outputs.
    changed = grid(run, tiny, "--cells", "single_max-ms", overrides=[
        "eval.paper_rows=4", "prompt_template=paper", "collab_memories=3", "head.prior=collab"])
    assert "train trunk-single_max-ms: trained" in changed.stdout
    summary = json.loads((adapter / "trunk_summary.json").read_text())
    assert summary["cache"]["train"]["rows_computed"] >= summary["train_rows"] > 0
    head = torch.load(adapter / "epoch_1" / "rating_head.pt", weights_only=True)
    assert int(head["prior_kind"]) == 2 and head["prior_weight"].shape == (5, 3) and head["prior_weight"].abs().sum() > 0
    assert OmegaConf.load(adapter / "torchtune_config.yaml").collab_memories == 3
    preds = pd.read_parquet(run / "eval" / "trunk-single_max-ms" / "predictions.parquet")
    assert preds.loc[preds["mode"] == "scoring", "prediction"].between(1, 5).all()
