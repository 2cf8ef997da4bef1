"""`persona-tune report`: `--compare A:B` (two eval cells on the rows both scored) and the learning curve."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from persona_tune.errors import ConfigError
from persona_tune.evaluation.report import (
    calibration_cells,
    cell_comparisons,
    comparisons_table,
    learning_curve_points,
    plot_learning_curve,
    plot_paired,
)
from persona_tune.runfolder import RunFolder


def write_cell(run, name: str, rows: list[tuple[int, int, int, float]], mode: str = "scoring") -> None:
    folder = run / "eval" / name
    folder.mkdir(parents=True)
    pd.DataFrame(rows, columns=["user_id", "item_id", "rating", "prediction"]).assign(mode=mode).to_parquet(
        folder / "predictions.parquet", index=False)


def test_compare_two_cells_on_their_common_rows(tmp_path):
    # A is off by 1 on every row, B by 2 on the rows they share; B also scored a row A did not.
    write_cell(tmp_path, "ref", [(1, 10, 4, 3.0), (1, 11, 2, 3.0), (2, 10, 5, 4.0), (3, 12, 3, 4.0)])
    write_cell(tmp_path, "other", [(1, 10, 4, 2.0), (1, 11, 2, 4.0), (2, 10, 5, 3.0), (3, 12, 3, 5.0), (4, 9, 1, 1.0)])
    [c] = cell_comparisons(RunFolder(tmp_path), ["ref:other"], n_boot=200)
    assert (c["a"], c["b"], c["mode"], c["rows"]) == ("ref", "other", "scoring", 4)
    assert c["diff"] == pytest.approx(1.0 - 2.0)  # RMSE 1 against RMSE 2 on the same 4 rows
    # Every resample has A at 1 and B at 2 on its rows: the paired CI is the point.
    assert c["lo"] == pytest.approx(-1.0) and c["hi"] == pytest.approx(-1.0)
    assert "| ref | other | scoring | 4 | -1.000 [-1.000, -1.000] (A better) |" in comparisons_table([c])


def test_compare_ci_follows_the_users(tmp_path):
    rng = np.random.default_rng(0)
    truth = rng.integers(1, 6, size=200)
    users = np.repeat(np.arange(20), 10)
    a = [(int(u), i, int(t), float(t) + rng.normal(0, 0.5)) for i, (u, t) in enumerate(zip(users, truth))]
    b = [(int(u), i, int(t), float(t) + rng.normal(0, 0.5)) for i, (u, t) in enumerate(zip(users, truth))]
    write_cell(tmp_path, "a", a)
    write_cell(tmp_path, "b", b)
    [c] = cell_comparisons(RunFolder(tmp_path), ["a:b"], n_boot=500)
    assert c["lo"] < c["diff"] < c["hi"] and c["lo"] < 0 < c["hi"]  # two equally good predictors


def test_compare_rejects_unknown_cells_and_bad_pairs(tmp_path):
    write_cell(tmp_path, "ref", [(1, 10, 4, 3.0)])
    with pytest.raises(ConfigError, match="no eval cell 'nope'.*the cells are: ref"):
        cell_comparisons(RunFolder(tmp_path), ["ref:nope"])
    with pytest.raises(ConfigError, match="CELL_A:CELL_B"):
        cell_comparisons(RunFolder(tmp_path), ["ref"])


def test_learning_curve_series_by_cell_label(tmp_path):
    """Cells trunk-n<rows>-<what> fall into one series per <what>, placed by their training rows;
    only series with two sizes are drawn."""
    import json

    def cell(name, rows, rmse):
        folder = tmp_path / "eval" / name
        folder.mkdir(parents=True)
        (folder / "metrics.json").write_text(json.dumps({"trunk": {"variants": {"v": {"train_rows": rows}}}}))
        paired = {b: {"diff": rmse - 1.0, "lo": 0.0, "hi": 0.0} for b in ("global_mean", "user_mean", "item_mean", "bias")}
        return {"name": name, "mode": "scoring", "rows": 2000, "rmse": rmse, "paired": paired}

    cells = [cell("trunk-nall-probe-single_max-ms", 16000, 1.05), cell("trunk-n4000-probe-single_max-ms", 4000, 1.06), cell("trunk-n1000-probe-single_max-ms", 1000, 1.09),
             cell("trunk-n1000-prior-single_max-ms", 1000, 0.96), cell("trunk-n1000-ce-single_max-ms", 1000, 1.09)]
    series = learning_curve_points(RunFolder(tmp_path), cells)
    assert [(n, c["rmse"]) for n, c in series["probe-single_max-ms"]] == [(1000, 1.09), (4000, 1.06), (16000, 1.05)]
    assert set(series) == {"probe-single_max-ms", "prior-single_max-ms", "ce-single_max-ms"}
    assert plot_learning_curve(RunFolder(tmp_path), tmp_path, cells).is_file()
    assert plot_learning_curve(RunFolder(tmp_path), tmp_path / "none", cells[3:]) is None  # no curve, no plot


def test_calibration_draws_a_readable_spread_of_cells():
    few = pd.Series({"b": 1.1, "a": 0.9})
    assert calibration_cells(few) == ["a", "b"]  # all of them, best first
    many = pd.Series({f"cell{i}": 0.9 + i / 100 for i in range(34)})
    drawn = calibration_cells(many, lines=6)
    assert len(drawn) == 6 and drawn[0] == "cell0" and drawn[-1] == "cell33"  # best and worst kept
    assert [many[c] for c in drawn] == sorted(many[c] for c in drawn)


def test_paired_plot_draws_each_cell_against_the_strongest_references(tmp_path, monkeypatch):
    from PIL import Image

    def cell(name, mode, diffs):
        return {"name": name, "mode": mode, "rows": 100, "rmse": 1.0,
                "paired": {b: {"diff": d, "lo": d - 0.01, "hi": d + 0.01} for b, d in diffs.items()}}

    cells = [cell("a", "scoring", {"user_mean": -0.1, "bias": -0.02, "knn": 0.0}),
             cell("b", "scoring", {"user_mean": -0.1, "bias": 0.05, "knn": 0.07}),
             cell("b", "paper", {"user_mean": -0.1, "bias": 0.09})]
    path = plot_paired(tmp_path, cells)
    assert path == tmp_path / "paired.png"
    small = Image.open(path).size
    many = plot_paired(tmp_path / "many", cells * 10)
    assert Image.open(many).size[1] > small[1]  # one row per cell: the figure grows with the cells
    # A cell far behind is drawn at the right edge with its value; the axis stays near 0.
    import matplotlib.pyplot as plt

    far = cells + [cell("prompted", "scoring", {"bias": 1.3, "knn": 1.4})]
    kept = []
    monkeypatch.setattr(plt, "close", kept.append)  # keep the figure to look at its axis
    plot_paired(tmp_path / "far", far)
    monkeypatch.undo()
    ax = kept[0].axes[0]
    assert ax.get_xlim()[1] < 0.3 and {t.get_text() for t in ax.texts} == {"+1.30 →", "+1.40 →"}
    plt.close(kept[0])
    # Only weaker baselines (no bias, kNN or MF): nothing to draw.
    assert plot_paired(tmp_path / "none", [cell("c", "scoring", {"user_mean": -0.1})]) is None
