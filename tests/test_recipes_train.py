"""Smoke tests of the real `tune run` commands on the tiny model and a prepared+distilled run.

Each `tune run` costs ~10-20 s of imports, so the run folder and the tiny model are built once per
session (``ready_run``) and every run is kept to a few steps on short prompts.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from persona_tune.resources import resource_dirs
from persona_tune.runfolder import last_epoch_adapter
from persona_tune.train import metrics_log, read_metrics
from tests.fixtures_runs import FAST

pytestmark = [pytest.mark.recipe, pytest.mark.slow]

TUNE = str(Path(sys.executable).with_name("tune"))
def tune_run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PERSONA_TUNE_")}
    # One intra-op thread per process: on a shared 2-core CI box torch's default (all cores) made a
    # tiny-model step ~80x slower (docs/benchmarks.md, "Training").
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run([TUNE, "run", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"tune run {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def check_trained(out: Path, steps: int) -> list[dict]:
    """The DiskLogger log has ``steps`` steps with a falling loss, and a LoRA adapter was saved."""
    metrics = read_metrics(metrics_log(out))
    assert [m["step"] for m in metrics] == list(range(1, steps + 1))
    losses = [m["loss"] for m in metrics]
    assert losses[-1] < losses[0], losses
    adapter = last_epoch_adapter(out)
    assert adapter is not None and adapter.parent.name == "epoch_0"
    state = torch.load(adapter, map_location="cpu", weights_only=True)
    assert state and all("lora" in k for k in state), sorted(state)[:5]
    assert any(k.endswith("attn.q_proj.lora_a.weight") for k in state)
    return metrics


def test_single_device_new_config_by_name_with_overrides(ready_run, tmp_path):
    """A persona config dropped into configs/tiny_persona/ runs by name, from another directory,
    and key=value overrides (persona, steps, lr) reach the recipe."""
    run, tiny = ready_run
    name = f"persona_9test{os.getpid()}"
    new_config = resource_dirs()[0] / "tiny_persona" / f"{name}.yaml"
    shutil.copy(resource_dirs()[0] / "tiny_persona" / "persona_0.yaml", new_config)
    out = tmp_path / "out"
    try:
        tune_run(
            ["lora_finetune_single_device", "--config", f"tiny_persona/{name}", f"run_dir={run}",
             f"model_dir={tiny / 'model'}", f"output_dir={out}", "persona=1", "max_steps_per_epoch=4",
             "optimizer.lr=0.02", "dataset.collab_memories=2", *FAST],
            cwd=tmp_path,
        )
    finally:
        new_config.unlink()
    metrics = check_trained(out, steps=4)
    lrs = [m["lr"] for m in metrics]
    assert all(0 <= lr <= 0.02 for lr in lrs) and lrs[0] > 0.015  # cosine decay from the overridden 0.02
    used = OmegaConf.load(out / "torchtune_config.yaml")
    assert (used.dataset.persona, used.dataset.run_dir, used.tokenizer.max_seq_len) == (1, str(run), 384)
    assert used.dataset.collab_memories == 2  # the collaborative memory mode on the stock path


def test_distributed_two_processes_on_generated_config(ready_run, tmp_path):
    """`tune run --nproc_per_node 2 lora_finetune_distributed` on RUN/configs/persona_0.yaml (by path);
    on a CPU-only torch this needs the hook's gloo patches."""
    run, _ = ready_run
    out = tmp_path / "out"
    proc = tune_run(
        ["--nproc_per_node", "2", "lora_finetune_distributed", "--config", str(run / "configs" / "persona_0.yaml"),
         f"output_dir={out}", "max_steps_per_epoch=3", *FAST],
        cwd=tmp_path,
    )
    check_trained(out, steps=3)
    if not torch.distributed.is_nccl_available():
        assert "CPU peak memory allocation" in proc.stdout + proc.stderr  # the patched memory stats


def test_literal_paper_config_by_name_distributed_on_the_tiny_model(ready_run, tmp_path):
    """The README's literal command, `tune run --nproc_per_node 2 lora_finetune_distributed --config
    phi3_persona/persona_0`, from an unrelated directory, with overrides pointing at the tiny model."""
    run, tiny = ready_run
    out = tmp_path / "out"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    tune_run(
        ["--nproc_per_node", "2", "lora_finetune_distributed", "--config", "phi3_persona/persona_0",
         f"run_dir={run}", f"output_dir={out}", f"model_dir={tiny / 'model'}",
         f"tokenizer_path={tiny / 'tokenizer' / 'tokenizer.model'}",
         "model._component_=persona_tune.models.tiny.lora_tiny_phi3", "model.lora_rank=8", "model.lora_alpha=16",
         "model.apply_lora_to_mlp=True", "model.lora_attn_modules=[q_proj,k_proj,v_proj,output_proj]",
         "tokenizer._component_=persona_tune.models.tiny.tiny_phi3_tokenizer",
         "checkpointer.checkpoint_files=[model.safetensors]", "device=cpu", "dtype=fp32",
         "optimizer.fused=False", "optimizer.lr=1e-2", "lr_scheduler.num_warmup_steps=0",
         "gradient_accumulation_steps=1", "batch_size=2", "max_steps_per_epoch=3", *FAST],
        cwd=elsewhere,
    )
    check_trained(out, steps=3)
    used = OmegaConf.load(out / "torchtune_config.yaml")
    assert (used.model.lora_rank, used.dataset.persona, used.dataset.run_dir) == (8, 0, str(run))
