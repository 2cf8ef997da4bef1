"""`persona-tune configs`: the shipped templates and the per-run configs written from them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from omegaconf import OmegaConf

from persona_tune import cli, configgen
from persona_tune.configgen import FAMILIES, ConfigsConfig
from persona_tune.runfolder import check_name
from persona_tune.errors import ConfigError, DataError, StageMissingError
from persona_tune.runfolder import RunFolder, atomic_write_parquet
from tests.fixtures_runs import make_prepared_run, with_personas

REPO = Path(__file__).resolve().parent.parent
VARIANTS = [f"persona_{k}" for k in range(4)] + ["single_min", "single_max"]


def expected_sizes(run: Path) -> dict[int, int]:
    train = pd.read_parquet(run / "ratings_train.parquet")
    personas = pd.read_parquet(run / "personas" / "assignments.parquet")
    merged = train.merge(personas, on="user_id")
    return merged.groupby("persona").size().to_dict()


@pytest.mark.parametrize("family", FAMILIES)
def test_templates_resolve_and_differ_only_in_the_variant(family):
    base = OmegaConf.to_container(OmegaConf.load(REPO / f"configs/{family}_persona/persona_0.yaml"), resolve=True)
    for variant in VARIANTS:
        cfg = OmegaConf.to_container(OmegaConf.load(REPO / f"configs/{family}_persona/{variant}.yaml"), resolve=True)
        persona = int(variant[-1]) if variant.startswith("persona_") else None
        assert cfg["persona"] == persona
        assert cfg["dataset"]["persona"] == persona
        assert cfg["output_dir"] == f"./runs/demo/adapters/{variant}"
        assert (cfg["subsample"] is None) == variant.startswith("persona_")
        differing = {k for k in cfg if cfg[k] != base[k]}
        assert differing <= {"persona", "subsample", "output_dir", "dataset", "checkpointer", "metric_logger"}
        for key in ("model", "optimizer", "tokenizer", "loss", "epochs", "batch_size", "seed"):
            assert cfg[key] == base[key]


def test_phi3_templates_carry_the_papers_hyperparameters():
    cfg = OmegaConf.load(REPO / "configs/phi3_persona/persona_2.yaml")
    assert cfg.model._component_ == "torchtune.models.phi3.lora_phi3_mini"
    assert list(cfg.model.lora_attn_modules) == ["q_proj", "k_proj"]
    assert (cfg.model.apply_lora_to_mlp, cfg.model.lora_rank, cfg.model.lora_alpha, cfg.model.lora_dropout) == (False, 256, 32, 0.1)
    assert cfg.optimizer._component_ == "torch.optim.AdamW" and cfg.optimizer.lr == 3e-4 and cfg.epochs == 2
    assert cfg.loss._component_ == "torchtune.modules.loss.CEWithChunkedOutputLoss"
    assert cfg.metric_logger._component_ == "torchtune.training.metric_logging.DiskLogger"
    assert cfg.checkpointer.model_type == "PHI3_MINI" and cfg.checkpointer.checkpoint_dir == cfg.model_dir
    assert cfg.tokenizer._component_ == "torchtune.models.phi3.phi3_mini_tokenizer"
    assert cfg.dataset._component_ == "persona_tune.datasets.persona_dataset"
    assert (cfg.dataset.persona, cfg.dataset.memory, cfg.dataset.run_dir) == (2, "ms+ml", "./runs/demo")
    # paths follow the top-level keys
    cfg.merge_with_dotlist(["run_dir=/data/run7", "model_dir=/models/phi3"])
    assert cfg.output_dir == "/data/run7/adapters/persona_2"
    assert cfg.tokenizer.path == "/models/phi3/tokenizer.model"
    assert cfg.metric_logger.log_dir == "/data/run7/adapters/persona_2/logs"


def test_templates_pass_torchtune_validation():
    from torchtune import config

    for family in FAMILIES:
        config.validate(OmegaConf.load(REPO / f"configs/{family}_persona/single_max.yaml"))


def test_generate_fills_run_and_sizes(tmp_path):
    run = with_personas(tmp_path, n_personas=3)
    targets = configgen.run(RunFolder(run), ConfigsConfig(family="tiny", memory="ms", overrides=["optimizer.lr=0.002", "batch_size=3"]))
    assert list(targets) == ["persona_0", "persona_1", "persona_2", "single_min", "single_max"]
    sizes = expected_sizes(run)
    for k in range(3):
        cfg = OmegaConf.load(targets[f"persona_{k}"])
        assert (cfg.persona, cfg.subsample, cfg.memory) == (k, None, "ms")
        assert cfg.dataset.persona == k and cfg.dataset.run_dir == str(run.resolve())
        assert cfg.output_dir == str(run.resolve() / "adapters" / f"persona_{k}")
        assert cfg.optimizer.lr == 0.002 and cfg.batch_size == 3
        assert cfg.metric_logger.log_dir == cfg.output_dir + "/logs"  # interpolation kept
    assert OmegaConf.load(targets["single_min"]).subsample == min(sizes.values())
    assert OmegaConf.load(targets["single_max"]).subsample == max(sizes.values())
    assert OmegaConf.load(targets["single_max"]).dataset.persona is None
    record = RunFolder(run).stage_record("configs")
    assert record["params"]["family"] == "tiny"
    assert record["variants"]["single_min"]["n_train_rows"] == min(sizes.values())


def test_more_personas_than_templates(tmp_path):
    run = with_personas(tmp_path, n_personas=6)
    targets = configgen.run(RunFolder(run), ConfigsConfig(family="phi3"))
    cfg = OmegaConf.load(targets["persona_5"])
    assert cfg.persona == 5 and cfg.output_dir.endswith("adapters/persona_5")
    assert cfg.model.lora_rank == 256


def test_no_overwrite_without_force(tmp_path):
    run = with_personas(tmp_path)
    configgen.run(RunFolder(run), ConfigsConfig(family="tiny"))
    with pytest.raises(ConfigError, match="--force"):
        configgen.run(RunFolder(run), ConfigsConfig(family="tiny", overrides=["epochs=5"]))
    configgen.run(RunFolder(run), ConfigsConfig(family="tiny", overrides=["epochs=5"], force=True))
    assert OmegaConf.load(run / "configs" / "persona_0.yaml").epochs == 5


@pytest.mark.parametrize("override", ["epochs", "=3", "../x=1", "output_dir=${nope}"])
def test_bad_overrides_are_refused(tmp_path, override):
    run = with_personas(tmp_path)
    with pytest.raises(ConfigError):
        configgen.run(RunFolder(run), ConfigsConfig(family="tiny", overrides=[override]))
    assert not (run / "configs").exists()


@pytest.mark.parametrize("bad", ["../evil", -1])
def test_bad_persona_ids_name_the_file(tmp_path, bad):
    run = with_personas(tmp_path)
    path = run / "personas" / "assignments.parquet"
    df = pd.read_parquet(path)
    df["persona"] = df["persona"].astype(type(bad))
    df.loc[3, "persona"] = bad
    atomic_write_parquet(df, path)
    with pytest.raises(DataError, match=r"assignments.parquet:4: persona"):
        configgen.run(RunFolder(run), ConfigsConfig(family="tiny"))


def test_variant_names_are_checked():
    for good in ("persona_3", "single-min", "Prompted2"):
        assert check_name(good) == good
    for bad in ("../x", "a/b", "", "persona 1", "x.yaml"):
        with pytest.raises(ConfigError):
            check_name(bad)


def test_missing_personas_stage(tmp_path):
    run = make_prepared_run(tmp_path)
    with pytest.raises(StageMissingError, match="persona-tune personas"):
        configgen.run(RunFolder(run), ConfigsConfig())


def test_cli_writes_configs_that_tune_validates(tmp_path, capsys):
    run = with_personas(tmp_path)
    assert cli.main(["configs", "--run", str(run), "--family", "smollm2", "--set", "max_steps_per_epoch=3"]) == 0
    assert "single_max" in capsys.readouterr().out
    assert cli.main(["configs", "--run", str(run), "--family", "smollm2"]) == 2  # exists, no --force
    assert "--force" in capsys.readouterr().err
    tune = str(Path(sys.executable).with_name("tune"))
    proc = subprocess.run([tune, "validate", str(run / "configs" / "persona_0.yaml")], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Config is well-formed!" in proc.stdout
