"""`persona-tune simulate`: recs validation, the stage end to end on a synthetic run with the tiny
model, resuming, UserAgent.rate_slate, the Config -> argparse helper, and the reference slates being the
same on every x86 CPU."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from persona_tune.cli import main as cli_main
from persona_tune.errors import ConfigError, DataError
from persona_tune.runfolder import RunFolder
from persona_tune.simulate.recs import validate_recs
from persona_tune.stage import add_config_arguments, config_from_args
from tests.fixtures_runs import make_persona_run

pytestmark = pytest.mark.usefixtures("one_torch_thread")

USERS, ITEMS = [1, 2, 3], [10, 11, 12, 13]


def write_csv(tmp_path: Path, text: str, name: str = "recs.csv") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# ---------------------------------------------------------------- recs validation


def test_valid_recs_csv_and_parquet(tmp_path):
    path = write_csv(tmp_path, "recommender,user_id,item_id,rank,score\nmine,1,11,2,0.5\nmine,1,10,1,0.9\nmine,2,13,1,0.1\n")
    recs = validate_recs(path, USERS, ITEMS)
    assert recs.columns.tolist() == ["recommender", "user_id", "item_id", "rank"]
    assert recs["item_id"].tolist() == [10, 11, 13]  # sorted by recommender, user, rank
    recs.to_parquet(tmp_path / "recs.parquet")
    pd.testing.assert_frame_equal(validate_recs(tmp_path / "recs.parquet", USERS, ITEMS), recs)


@pytest.mark.parametrize("body, message", [
    ("mine,1,10,1\nmine,9,10,2\n", r"recs.csv:3: unknown user 9"),
    ("mine,1,10,1\nmine,1,99,2\n", r"recs.csv:3: unknown item 99"),
    ("mine,1,10,1\nmine,1,11,1\n", r"recs.csv:3: duplicate \(recommender, user, rank\) = \('mine', 1, 1\), first at line 2"),
    ("mine,1,10,1\nmine,1,10,2\n", r"recs.csv:3: duplicate \(recommender, user, item\)"),
    ("mine,1,10,1.5\n", r"recs.csv:2: rank must be an integer >= 1, got '1.5'"),
    ("mine,1,10,first\n", r"recs.csv:2: rank must be an integer >= 1, got 'first'"),
    ("mine,1,10,0\n", r"recs.csv:2: rank must be an integer >= 1, got '0'"),
    ("mine,1,10,1\nmine,x,10,2\n", r"recs.csv:3: user_id must be an integer, got 'x'"),
    (",1,10,1\n", r"recs.csv:2: recommender is empty"),
    ("", r"recs.csv: empty file: no recommendation rows"),
])
def test_bad_recs_csv_one_clear_line(tmp_path, body, message):
    path = write_csv(tmp_path, "recommender,user_id,item_id,rank\n" + body)
    with pytest.raises(DataError, match=message):
        validate_recs(path, USERS, ITEMS)


def test_empty_and_malformed_files(tmp_path):
    with pytest.raises(DataError, match=r"recs.csv: empty file"):
        validate_recs(write_csv(tmp_path, ""), USERS, ITEMS)
    with pytest.raises(DataError, match=r"missing column\(s\) rank"):
        validate_recs(write_csv(tmp_path, "recommender,user_id,item_id\nmine,1,10\n"), USERS, ITEMS)
    with pytest.raises(DataError, match=r"must be .csv or .parquet"):
        validate_recs(write_csv(tmp_path, "x", name="recs.txt"), USERS, ITEMS)
    with pytest.raises(DataError, match=r"no such recs file"):
        validate_recs(tmp_path / "absent.csv", USERS, ITEMS)
    pd.DataFrame({"recommender": ["a", "a"], "user_id": [1, 1], "item_id": [10, 11], "rank": [1, 1]}).to_parquet(
        tmp_path / "dup.parquet")
    with pytest.raises(DataError, match=r"dup.parquet \(row 2\): duplicate"):
        validate_recs(tmp_path / "dup.parquet", USERS, ITEMS)


# ---------------------------------------------------------------- the stage


@pytest.fixture(scope="module")
def sim_run(tmp_path_factory, tiny):
    """A synthetic run (offline distill, hash embeddings, 2 personas) with the tiny family's configs."""
    run = make_persona_run(tmp_path_factory.mktemp("sim"), n_users=6, seed=0, k=2)
    assert cli_main(["configs", "--run", str(run), "--family", "tiny", "--", f"model_dir={tiny / 'model'}"]) == 0
    return run


SMALL = ["--variant", "prompted", "--candidates", "5", "--k", "4", "--n-boot", "50", "--chunk-rows", "40",
         "--no-progress"]


def test_simulate_writes_feedback_and_fidelity_and_resumes(sim_run, capsys):
    assert cli_main(["simulate", "--run", str(sim_run), *SMALL]) == 0
    first = capsys.readouterr().out
    sim = RunFolder(sim_run).simulation("prompted")
    metrics = json.loads(sim.metrics.read_text())
    assert metrics["simulators"] == ["prompted", "classical"]
    assert len(metrics["ranked_recommenders"]) == 8 and all(r.endswith("@heldout") for r in metrics["ranked_recommenders"])
    preds = pd.read_parquet(sim.predictions)
    assert set(preds["simulator"]) == {"prompted", "classical"}
    assert preds["expected_rating"].between(1, 5).all() and preds["p_like"].between(0, 1).all()
    np.testing.assert_allclose(preds[[f"p{r}" for r in range(1, 6)]].sum(axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(preds["p_like"], preds["p4"] + preds["p5"], atol=1e-9)
    heldout = preds[preds["recommender"].str.endswith("@heldout")]
    assert heldout["true_rating"].notna().all()  # re-rankings of held-out items: every row judged
    topk = preds[preds["recommender"] == "popularity"]
    assert topk.groupby(["simulator", "user_id"]).size().eq(4).all()
    probes = pd.read_parquet(sim.probes)
    assert set(probes["kind"]) == {"heldout", "unrated"}
    assert (probes.groupby(["simulator", "user_id", "kind"]).size().unstack()["unrated"]
            == 3 * probes.groupby(["simulator", "user_id", "kind"]).size().unstack()["heldout"]).all()
    for name in ("prompted", "classical"):
        f = metrics["fidelity"][name]
        assert 0 <= f["distribution_w1"]["value"] <= 4
        assert -1 <= f["ranking"]["kendall_tau"]["value"] <= 1
        assert set(f) == {"taste_auc", "watch_1_1", "watch_1_3", "distribution_w1", "ranking"}
        assert set(metrics["feedback"][name]) == set(metrics["recommenders"])
    scored = metrics["timing"]["scored"]
    assert scored > 0 and metrics["timing"]["reused"] == 0
    assert "classical" in first and "scored now" in first

    # A second call finds every pair in parts/ and scores nothing; the results are the same.
    assert cli_main(["simulate", "--run", str(sim_run), *SMALL]) == 0
    again = json.loads(sim.metrics.read_text())
    assert again["timing"]["scored"] == 0 and again["timing"]["reused"] == scored
    assert again["fidelity"] == metrics["fidelity"]


def test_own_recommender_slots_in_beside_the_reference(sim_run, tmp_path):
    train = pd.read_parquet(Path(sim_run) / "ratings_train.parquet")
    user = int(train["user_id"].iloc[0])
    unseen = sorted(set(pd.read_parquet(Path(sim_run) / "items.parquet")["item_id"]) - set(train["item_id"]))[:3]
    path = write_csv(tmp_path, "recommender,user_id,item_id,rank\n" + "".join(
        f"mine,{user},{item},{rank}\n" for rank, item in enumerate(unseen, 1)))
    assert cli_main(["simulate", "--run", str(sim_run), *SMALL, "--recs", str(path), "--name", "mine"]) == 0
    metrics = json.loads(RunFolder(sim_run).simulation("mine").metrics.read_text())
    assert "mine" in metrics["recommenders"] and "popularity" in metrics["recommenders"]
    assert metrics["feedback"]["prompted"]["mine"]["n_rows"] == 3
    assert metrics["feedback"]["classical"]["mine"]["n_rows"] == 3


def test_bad_recs_exit_2_with_one_line_and_nothing_written(sim_run, tmp_path, capsys):
    path = write_csv(tmp_path, "recommender,user_id,item_id,rank\nmine,1,10,1\nmine,1,10,1\n")
    code = cli_main(["simulate", "--run", str(sim_run), *SMALL, "--recs", str(path), "--name", "bad"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "recs.csv:" in err[0]
    assert not RunFolder(sim_run).simulation("bad").root.exists()


def test_rate_slate_is_rate_in_slate_order(sim_run):
    from persona_tune.agent import UserAgent

    agent = UserAgent.from_run(sim_run, variant="prompted", family="tiny", memory="ms+ml")
    user = int(next(iter(agent.prompts.profile)))
    items = agent.item_text.index[:3].tolist()
    slate = agent.rate_slate(user, items)
    assert slate["rank"].tolist() == [1, 2, 3] and slate["item_id"].tolist() == items
    np.testing.assert_allclose(slate["p_like"], slate["p4"] + slate["p5"])
    np.testing.assert_allclose(slate["expected_rating"], agent.rate(user, items)["expected_rating"], atol=1e-6)


# ---------------------------------------------------------------- Config -> argparse


@dataclass
class _Cfg:
    rows: int = field(default=3, metadata={"help": "rows"})
    name: str | None = None
    files: tuple[str, ...] = ()
    flag: bool = True
    rate: float = 0.5
    hidden: tuple[str, ...] = field(default=(), metadata={"cli": False})

    def validate(self):
        if self.rows < 1:
            raise ConfigError("rows must be >= 1")


def test_config_arguments_come_from_the_dataclass():
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, _Cfg)
    cfg = config_from_args(_Cfg, parser.parse_args(["--rows", "5", "--files", "a", "b", "--no-flag"]))
    assert cfg == _Cfg(rows=5, name=None, files=("a", "b"), flag=False, rate=0.5)
    assert config_from_args(_Cfg, parser.parse_args([])) == _Cfg()
    with pytest.raises(SystemExit):
        parser.parse_args(["--hidden", "x"])
    with pytest.raises(ConfigError, match="rows must be"):
        config_from_args(_Cfg, parser.parse_args(["--rows", "0"]))


# The environment of an x86 CPU without AVX-512, for numpy's sorts, OpenBLAS, torch and oneDNN.
AVX2_ONLY = {"NPY_DISABLE_CPU_FEATURES": "AVX512_ICL AVX512_SPR X86_V4", "OPENBLAS_CORETYPE": "Haswell",
             "ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
SLATES = """
import sys
import numpy as np, pandas as pd
from persona_tune.simulate.recommenders import VALIDITY, reference_recs
rng = np.random.default_rng(0)
rows = [(u, i, 4) for u in range(40) for i in rng.choice(300, int(rng.integers(5, 60)), replace=False)]
train = pd.DataFrame(rows, columns=["user_id", "item_id", "rating"])
heldout = pd.DataFrame([(u, i) for u in range(40) for i in range(300, 310)], columns=["user_id", "item_id"])
reference_recs(train, np.arange(320), heldout, names=VALIDITY).to_parquet(sys.argv[1])
"""


def test_reference_slates_are_the_same_without_avx512(tmp_path):
    """Every recommender's slates and held-out orders, here and on an emulated AVX2-only CPU: the same
    items in the same order (float32 ALS and numpy's default sort of popularity ties made them differ)."""
    runs = {}
    for name, env in (("here", {}), ("avx2", AVX2_ONLY)):
        out = tmp_path / f"{name}.parquet"
        done = subprocess.run([sys.executable, "-c", SLATES, str(out)], env={**os.environ, "OMP_NUM_THREADS": "1", **env},
                              capture_output=True, text=True, timeout=300, cwd=Path(__file__).parent.parent)
        assert done.returncode == 0, done.stderr[-2000:]
        runs[name] = pd.read_parquet(out)
    here, avx2 = runs["here"], runs["avx2"]
    assert len(here) == 16 * (40 * 10 + 40 * 10) and here["recommender"].nunique() == 32
    pd.testing.assert_frame_equal(here.drop(columns="score"), avx2.drop(columns="score"))
    pd.testing.assert_series_equal(here["score"], avx2["score"], rtol=1e-6, atol=1e-9)  # float32 item-kNN, BPR


def test_blend_percentiles_break_ties_by_item_order():
    from scipy.stats import rankdata

    from persona_tune.simulate.recommenders import _percentile_rows

    assert _percentile_rows(np.array([[2.0, 1.0, 2.0, 1.0, 2.0]])).tolist() == [[0.5, 0.0, 0.75, 0.25, 1.0]]
    counts = np.random.default_rng(0).integers(0, 5, size=(3, 500)).astype(float)  # popularity-like ties
    ordinal = (rankdata(counts, method="ordinal", axis=1) - 1) / 499  # ties in order of appearance
    np.testing.assert_array_equal(_percentile_rows(counts), ordinal)
