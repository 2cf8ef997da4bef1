"""`persona-tune train`: variant selection, overrides, the `tune run` loop, resume, PEFT export, summary."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
from safetensors.torch import load_file

from persona_tune import cli, train
from persona_tune.errors import ConfigError, StageMissingError
from persona_tune.runfolder import RunFolder
from tests.fixtures_runs import FAST

DISK_LOG = """\
Step 1 | loss:7.125 lr:0.0097 tokens_per_second_per_gpu:9.0 
Step 2 | loss:6.5 lr:0.009 tokens_per_second_per_gpu:37.5 
not a metric line
Step 3 | loss:6.0 lr:0.0 tokens_per_second_per_gpu:40.0 grad_norm:nan 
"""


def configs_run(tmp_path: Path, names: list[str]) -> RunFolder:
    run = RunFolder(tmp_path / "run")
    run.configs_dir.mkdir(parents=True)
    for name in names:
        (run.configs_dir / f"{name}.yaml").write_text("epochs: 1\n")
    return run


def test_read_metrics(tmp_path):
    (tmp_path / "log_1.txt").write_text(DISK_LOG)
    rows = train.read_metrics(tmp_path / "log_1.txt")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[0] == {"step": 1, "loss": 7.125, "lr": 0.0097, "tokens_per_second_per_gpu": 9.0}
    assert rows[2]["grad_norm"] != rows[2]["grad_norm"]  # nan parses as a float


def test_select_variants(tmp_path):
    run = configs_run(tmp_path, ["single_max", "persona_10", "persona_2", "single_min", "persona_0", "prompted"])
    assert train.select_variants(run, "all") == ["persona_0", "persona_2", "persona_10", "single_max", "single_min"]
    run.record_stage("configs", {}, variants={"persona_2": {}, "single_min": {}})  # what `configs` wrote
    assert train.select_variants(run, "all") == ["persona_2", "single_min"]
    assert train.select_variants(run, "prompted") == ["prompted"]
    assert train.select_variants(run, "2, 0,single_min,2") == ["persona_2", "persona_0", "single_min"]
    with pytest.raises(StageMissingError, match="persona_1"):
        train.select_variants(run, "1")
    with pytest.raises(ConfigError, match="invalid variant name"):
        train.select_variants(run, "../single_min")
    with pytest.raises(ConfigError, match="no variants"):
        train.select_variants(run, " , ")
    with pytest.raises(StageMissingError, match="persona-tune configs"):
        train.select_variants(RunFolder(tmp_path / "empty"), "all")


def test_overrides_and_command():
    assert train.check_overrides(["optimizer.lr=1e-4", "~profiler"]) == ["optimizer.lr=1e-4", "~profiler"]
    for bad in (["output_dir=/elsewhere"], ["lr"], ["=1"]):
        with pytest.raises(ConfigError):
            train.check_overrides(bad)
    cmd = train.tune_command(Path("/r/configs/persona_0.yaml"), Path("/r/adapters/persona_0"),
                             train.DISTRIBUTED_RECIPE, 2, ["epochs=1"])
    assert cmd[1:] == ["run", "--nproc_per_node", "2", "lora_finetune_distributed", "--config",
                       "/r/configs/persona_0.yaml", "epochs=1", "output_dir=/r/adapters/persona_0"]
    assert Path(cmd[0]).name == "tune"
    single = train.tune_command(Path("c.yaml"), Path("o"), train.SINGLE_DEVICE_RECIPE, 1, [])
    assert "--nproc_per_node" not in single


def test_cpu_parallel_slots(monkeypatch):
    monkeypatch.setattr("torch.cuda.device_count", lambda: 0)
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    slots = train.device_slots(nproc=2, parallel=True, n_jobs=3)
    assert [s["OMP_NUM_THREADS"] for s in slots] == ["1", "1", "1"]
    assert len(train.device_slots(nproc=1, parallel=False, n_jobs=5)) == 1
    monkeypatch.setattr("torch.cuda.device_count", lambda: 4)
    assert [s["CUDA_VISIBLE_DEVICES"] for s in train.device_slots(2, True, 5)] == ["0,1", "2,3"]


def test_failed_tune_run_is_reported_and_retried(tmp_path, monkeypatch, capsys):
    """A failing `tune` marks the variant failed (log tail shown, exit 1) and leaves no summary."""
    run = configs_run(tmp_path, ["persona_0"])
    fake = tmp_path / "tune"
    fake.write_text("#!/bin/sh\necho \"fake tune: $*\"\necho 'boom: bad config' >&2\nexit 3\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setattr(train, "tune_executable", lambda: str(fake))
    assert cli.main(["train", "--run", str(run.root), "--personas", "0", "--", "epochs=2"]) == 1
    captured = capsys.readouterr()
    assert "boom: bad config" in captured.err and "exited with 3" in captured.err
    assert "persona_0  failed" in captured.out
    log = (run.adapters_dir / "persona_0" / "train.log").read_text()
    assert "epochs=2" in log and f"output_dir={run.adapters_dir / 'persona_0'}" in log
    assert not (run.adapters_dir / "persona_0" / train.SUMMARY).exists()


def test_train_cli_end_to_end_and_resume(capsys, monkeypatch, ready_run):
    """Real `tune run` for single_min on the tiny model; then a re-run skips it."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # see tests/test_recipes_train.py
    run_dir, tiny = ready_run
    args = ["train", "--run", str(run_dir), "--personas", "single_min", "--", "max_steps_per_epoch=3", *FAST]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "single_min  trained  3" in out

    variant_dir = run_dir / "adapters" / "single_min"
    summary = json.loads((variant_dir / train.SUMMARY).read_text())
    assert summary["steps"] == 3 and len(summary["losses"]) == 3
    assert summary["last_loss"] < summary["first_loss"]
    assert summary["adapter"] == "adapters/single_min/epoch_0/adapter_model.pt"
    assert (run_dir / summary["adapter"]).is_file()
    assert "max_steps_per_epoch=3" in summary["command"]
    assert "Step 3 | loss" not in (variant_dir / "train.log").read_text()  # metrics go to DiskLogger...
    assert "single_min" in (variant_dir / "train.log").read_text()  # ...torchtune's output to train.log

    peft = run_dir / summary["peft_dir"]
    config = json.loads((peft / "adapter_config.json").read_text())
    weights = load_file(str(peft / "adapter_model.safetensors"))
    assert config["peft_type"] == "LORA" and "qkv_proj" in config["target_modules"]
    assert any("qkv_proj.lora_A" in k for k in weights)

    stage = RunFolder(run_dir).stage_record("train")
    assert stage["variants"]["single_min"]["steps"] == 3

    assert cli.main(args) == 0  # resume: nothing to do
    out = capsys.readouterr().out
    assert "single_min  skipped  3" in out
