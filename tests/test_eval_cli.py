"""`persona-tune eval` (one `tune run persona_eval` per variant), `baselines`, `report`, and the grid's plan."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from omegaconf import OmegaConf

from persona_tune.cli import main as cli_main
from persona_tune.errors import ConfigError
from persona_tune.evaluation.grid import grid_cells, select_cells, write_grid_configs
from persona_tune.evaluation.run import adapter_variants, build_eval_config
from persona_tune.variants import Variant
from persona_tune.models.tiny import write_tiny_phi3
from persona_tune.runfolder import RunFolder
from tests.fixtures_runs import make_persona_run, write_adapter

OPTS = ["--", "max_rows=4", "metrics.n_boot=50", "num_threads=1", "batching.progress=False"]


@pytest.mark.slow
@pytest.mark.recipe
def test_eval_baselines_report(capsys, monkeypatch, eval_run):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    run, _ = eval_run
    write_adapter(run / "adapters" / "single_max" / "epoch_0", seed=5,
                  model_cfg=OmegaConf.load(run / "configs" / "single_max.yaml").model)
    variants = "persona,single_max,prompted"
    assert cli_main(["eval", "--run", str(run), "--variants", variants, "--family", "tiny", *OPTS]) == 0
    assert "skipped" not in capsys.readouterr().out
    assert cli_main(["eval", "--run", str(run), "--variants", variants, "--family", "tiny", *OPTS]) == 0
    assert capsys.readouterr().out.count("skipped") == 3  # results are current

    preds = {v: pd.read_parquet(run / "eval" / v / "predictions.parquet") for v in variants.split(",")}
    assert preds["prompted"][["user_id", "item_id"]].equals(preds["single_max"][["user_id", "item_id"]])
    assert not preds["prompted"]["p1"].equals(preds["single_max"]["p1"])  # the adapter changes the model
    saved = OmegaConf.load(run / "eval" / "persona" / "eval_config.yaml")
    assert saved.adapter_dir.endswith("adapters/persona_{persona}") and saved.model == OmegaConf.merge(
        OmegaConf.load(run / "configs" / "persona_0.yaml").model, {"lora_dropout": 0.0})

    assert cli_main(["baselines", "--run", str(run), "--n-boot", "50"]) == 0
    assert cli_main(["report", "--run", str(run), "--compare", "single_max:prompted"]) == 0
    printed = capsys.readouterr().out
    results = json.loads((run / "eval" / "results.json").read_text())
    [comparison] = [c for c in results["comparisons"] if c["mode"] == "scoring"]
    assert (comparison["a"], comparison["b"], comparison["rows"]) == ("single_max", "prompted", 8)
    assert comparison["lo"] <= comparison["diff"] <= comparison["hi"]
    assert "## Paired comparisons between cells" in (run / "eval" / "report.md").read_text()
    assert cli_main(["report", "--run", str(run), "--compare", "single_max:nope"]) == 2  # one clear line
    adapters = {r["adapter"] for r in results["agents"]}
    assert {"θ_persona", "θ_single(max)", "none"} <= adapters
    assert [b["key"] for b in results["baselines"]] == ["global_mean", "user_mean", "item_mean", "bias", "knn", "mf"]
    assert all(set(c["paired"]) == {"global_mean", "user_mean", "item_mean", "bias", "knn", "mf"} for c in results["cells"])
    assert {b["n"] for b in results["baselines"]} == {r["n"] for r in results["agents"]} == {8}  # the same rows
    assert len(results["paper_table_1"]) == 11
    report = (run / "eval" / "report.md").read_text()
    assert "θ_persona" in report and "user+item bias baseline" in report and "1.171" in report  # the paper's row 10
    assert "| RMSE (↓)" in printed
    for name in ("training_size", "calibration", "paired"):
        assert (run / "eval" / results["plots"][name]).stat().st_size > 1000
    for row in results["agents"]:
        lo, hi = row["rmse_ci"]
        assert lo <= row["rmse"] <= hi


def test_variant_names_and_eval_config(eval_run):
    run, _ = eval_run
    cfg = build_eval_config(RunFolder(run), "prompted-ml", "tiny", "ms+ml", "both")
    assert cfg.adapter_dir is None and cfg.memory == "ml" and cfg.mode == "both"
    assert cfg.output_dir == str(run / "eval" / "prompted-ml")
    from persona_tune.errors import StageMissingError

    with pytest.raises(StageMissingError, match="persona_0-ms.yaml"):
        build_eval_config(RunFolder(run), "persona-ms", "tiny", "ms+ml", "scoring")


def test_grid_plan_and_configs(eval_run):
    run, tiny = eval_run
    train, evals = grid_cells([0, 1])
    assert evals == ["prompted-ms", "prompted-msml", "prompted-ml", "single_min-ms", "single_max-ms", "persona-ms",
                     "single_min-msml", "single_max-msml", "persona-msml"]
    names = write_grid_configs(RunFolder(run), "tiny", [f"model_dir={tiny / 'model'}"])
    assert sorted(names) == sorted(train)
    base = {n: OmegaConf.load(run / "configs" / f"{n}.yaml") for n in ("persona_0", "single_min", "single_max")}
    for name in names:
        cfg = OmegaConf.load(run / "configs" / f"{name}.yaml")
        variant = Variant.parse(name)
        assert cfg.memory == variant.memory
        assert cfg.output_dir == str(run / "adapters" / name)
        if variant.base in base:
            assert cfg.subsample == base[variant.base].subsample and cfg.persona == base[variant.base].persona
    # --cells: only the adapters the chosen cells need; unknown cells are named with the valid ones.
    assert select_cells([0, 1], ["prompted-msml", "persona-msml", "single_max-ms"]) == (
        ["single_max-ms", "persona_0-msml", "persona_1-msml"], ["prompted-msml", "single_max-ms", "persona-msml"])
    assert select_cells([0, 1], ["prompted-ms"]) == ([], ["prompted-ms"])
    assert select_cells([0, 1], None) == (train, evals)
    with pytest.raises(ConfigError, match="unknown grid cell.*persona-xx.*the cells are: prompted-ms"):
        select_cells([0, 1], ["persona-xx"])
    # The eval config of a grid cell takes its adapters and memory from the cell's training config.
    cfg = build_eval_config(RunFolder(run), "persona-ms", "tiny", "ms+ml", "scoring")
    assert cfg.memory == "ms" and cfg.adapter_dir == str(run / "adapters" / "persona_{persona}-ms")


@pytest.mark.slow
@pytest.mark.recipe
def test_grid_cells_end_to_end(tmp_path, capsys, monkeypatch):
    """`persona-tune grid --cells`: trains only the adapters the cells need, evaluates them, reports; resumes."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    run = make_persona_run(tmp_path, n_users=6, seed=1, k=2)
    tiny = write_tiny_phi3(tmp_path / "tiny", seed=0)
    argv = ["grid", "--run", str(run), "--family", "tiny", "--cells", "prompted-msml,single_max-ms",
            "--max-steps", "1", "--n-boot", "20", "--", f"model_dir={tiny / 'model'}",
            "eval.max_rows=2", "eval.num_threads=1", "eval.batching.progress=False"]
    assert cli_main(argv) == 0
    assert sorted(p.name for p in (run / "adapters").iterdir()) == ["single_max-ms"]
    assert sorted(p.parent.name for p in (run / "eval").glob("*/metrics.json")) == [
        "baselines", "prompted-msml", "single_max-ms"]
    results = json.loads((run / "eval" / "results.json").read_text())
    assert {(r["adapter"], r["memories"]) for r in results["agents"]} == {("none", "M_s+M_l"), ("θ_single(max)", "M_s")}
    assert (run / "eval" / results["plots"]["training_curves"]).stat().st_size > 1000
    first = capsys.readouterr().out
    assert "train single_max-ms: trained" in first and "eval  prompted-msml: done" in first and "θ_single(max)" in first
    assert cli_main(argv) == 0  # everything is done: nothing is trained or evaluated again
    second = capsys.readouterr().out
    assert "train single_max-ms: skipped" in second and "eval  prompted-msml: skipped" in second
    assert "eval  single_max-ms: skipped" in second


def test_trunk_grid_configs_sizes_and_the_untrained_base(eval_run):
    """`grid --path trunk --train-rows N`: each variant's rows; the prompted cell ignores training and head
    overrides; a trunk persona cell's eval config points at its per-persona adapters."""
    from persona_tune.evaluation.grid import write_trunk_configs
    from persona_tune.configgen import persona_sizes

    run, tiny = eval_run
    sizes = persona_sizes(RunFolder(run)).set_index("persona")["n_train_rows"]
    total = int(sizes.sum())
    names = write_trunk_configs(RunFolder(run), "tiny", ["prompted-ms", "persona_0-ms", "single_min-ms", "single_max-ms"],
                                "t", [f"model_dir={tiny / 'model'}", "head.prior=stated", "epochs=3"], "60")
    assert names == ["trunk-t-prompted-ms", "trunk-t-persona_0-ms", "trunk-t-single_min-ms", "trunk-t-single_max-ms"]
    cfgs = {n: OmegaConf.load(run / "configs" / f"{n}.yaml") for n in names}
    assert (cfgs["trunk-t-single_max-ms"].subsample, cfgs["trunk-t-single_max-ms"].persona) == (60, None)
    assert cfgs["trunk-t-single_min-ms"].subsample == round(60 * int(sizes.min()) / total) < 60
    assert (cfgs["trunk-t-persona_0-ms"].subsample, cfgs["trunk-t-persona_0-ms"].persona) == (60, 0)
    assert cfgs["trunk-t-single_max-ms"].head.prior == "stated" and cfgs["trunk-t-single_max-ms"].epochs == 3
    prompted = cfgs["trunk-t-prompted-ms"]
    assert (prompted.epochs, prompted.head.init, prompted.head.prior) == (0, "none", "none")
    assert prompted.model_dir == str(tiny / "model")  # the other overrides still apply
    cfg = build_eval_config(RunFolder(run), "trunk-t-persona-ms", "tiny", "ms+ml", "scoring")
    assert cfg.adapter_dir == str(run / "adapters" / "trunk-t-persona_{persona}-ms") and cfg.memory == "ms"
    assert adapter_variants(RunFolder(run), "trunk-t-persona-ms") == [f"trunk-t-persona_{k}-ms" for k in sizes.index]
    assert adapter_variants(RunFolder(run), "trunk-t-single_max-ms") == ["trunk-t-single_max-ms"]
