"""The CLI dispatcher and the run folder's manifest and atomic writes."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import pytest

from persona_tune import cli
from persona_tune.errors import StageMissingError
from persona_tune.runfolder import FORMAT_VERSION, RunFolder, atomic_path, atomic_write_json


@pytest.mark.parametrize("command", sorted(cli.COMMANDS))
def test_every_subcommand_has_a_useful_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: persona-tune {command}")
    description = out.split("\n\n")[1]
    assert len(description.split()) >= 4, f"{command} --help has no description: {description!r}"
    assert "--" in out.split("\n\n", 2)[2], f"{command} --help lists no options"


def test_top_level_help_lists_commands_in_pipeline_order(capsys):
    assert cli.main([]) == 0
    out = capsys.readouterr().out
    positions = [out.index(f"  {name} ") for name in ("prepare", "distill", "embed", "personas", "train", "report")]
    assert positions == sorted(positions)


def test_unknown_command_exits_2(capsys):
    assert cli.main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err


def test_errors_print_one_line_without_traceback(tmp_path):
    missing = tmp_path / "nope"
    proc = subprocess.run(
        [sys.executable, "-m", "persona_tune.cli", "personas", "--run", str(missing)],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "persona-tune personas: error:" in proc.stderr
    assert str(missing) in proc.stderr


def test_record_stage_keeps_other_stages_and_format_version(tmp_path):
    run = RunFolder(tmp_path / "run")
    run.update_manifest(protocol={"n_users": 3})
    run.record_stage("prepare", {"seed": 1})
    run.record_stage("distill", {"backend": "offline"}, backend="offline")
    manifest = json.loads(run.manifest_path.read_text())
    assert manifest["format_version"] == FORMAT_VERSION
    assert manifest["protocol"] == {"n_users": 3}
    assert manifest["stages"]["prepare"]["params"] == {"seed": 1}
    assert manifest["stages"]["distill"]["backend"] == "offline"
    assert "code_version" in manifest["stages"]["distill"]


def test_wrong_format_version_is_a_clear_error(tmp_path):
    run = RunFolder(tmp_path)
    atomic_write_json(run.manifest_path, {"format_version": 999, "stages": {}})
    with pytest.raises(StageMissingError, match="format_version 999"):
        run.read_manifest()


def test_require_names_the_command_that_makes_the_file(tmp_path):
    run = RunFolder(tmp_path)
    with pytest.raises(StageMissingError, match="persona-tune distill"):
        run.require("distill/profiles.parquet")


def test_atomic_path_leaves_old_file_on_failure_and_uses_umask_mode(tmp_path):
    target = tmp_path / "table.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("boom")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["table.txt"]
    with atomic_path(target) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new"
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask


def test_last_epoch_adapter_is_the_highest_epoch_that_holds_one(tmp_path):
    from persona_tune.runfolder import ADAPTER_FILE, epoch_adapters, last_epoch_adapter

    for n in (0, 2, 10):
        (tmp_path / f"epoch_{n}").mkdir()
        (tmp_path / f"epoch_{n}" / ADAPTER_FILE).write_bytes(b"x")
    (tmp_path / "epoch_11").mkdir()  # a checkpoint being written: no adapter yet
    (tmp_path / "epoch_x").mkdir()
    (tmp_path / "epoch_x" / ADAPTER_FILE).write_bytes(b"x")
    assert [p.parent.name for p in epoch_adapters(tmp_path)] == ["epoch_0", "epoch_2", "epoch_10"]  # by number
    assert last_epoch_adapter(tmp_path) == tmp_path / "epoch_10" / ADAPTER_FILE
    (tmp_path / "epoch_12").mkdir()
    (tmp_path / "epoch_12" / "adapter_model.safetensors").write_bytes(b"x")
    assert last_epoch_adapter(tmp_path, (ADAPTER_FILE, "adapter_model.safetensors")).parent.name == "epoch_12"


def test_no_epoch_is_one_clear_error(tmp_path):
    from persona_tune.runfolder import last_epoch_adapter

    (tmp_path / "epoch_0").mkdir()  # an epoch folder without its adapter
    with pytest.raises(StageMissingError) as e:
        last_epoch_adapter(tmp_path)
    assert str(e.value) == f"{tmp_path} holds no trained epoch (epoch_N/adapter_model.pt): train it first"
    assert last_epoch_adapter(tmp_path, missing_ok=True) is None
    assert last_epoch_adapter(tmp_path / "missing", missing_ok=True) is None
