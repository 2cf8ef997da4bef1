"""Personas: the elbow finds known clusters, KMeans++ assignments, one-vs-rest TF-IDF summaries."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from persona_tune.cli import main as cli_main
from persona_tune.errors import ConfigError
from persona_tune.personas import PersonasConfig, distinctive_words, elbow_k, inertia_curve, relabel_by_size
from persona_tune import personas
from persona_tune.runfolder import RunFolder
from tests.fixtures_runs import make_embedded_run


def blobs(k: int, n_per: int = 40, dim: int = 64, seed: int = 0) -> np.ndarray:
    """k well-separated Gaussian clusters of unit-norm vectors, like profile embeddings."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((k, dim))
    x = np.concatenate([c + 0.35 * rng.standard_normal((n_per, dim)) for c in centres])
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("k", [2, 3, 4, 6])
def test_elbow_picks_the_true_number_of_clusters(k):
    inertias = inertia_curve(blobs(k, seed=k), k_max=10, seed=0, n_init=3)
    assert list(inertias) == list(range(1, 11))
    assert elbow_k(inertias) == k


def test_elbow_rule_on_a_known_curve():
    assert elbow_k({1: 100.0, 2: 40.0, 3: 30.0, 4: 25.0, 5: 22.0}) == 2
    assert elbow_k({1: 10.0, 2: 5.0}) == 2  # too few points for a knee: the largest K


def test_relabel_by_size_numbers_largest_first():
    labels = np.array([2, 2, 0, 1, 1, 1, 0, 2, 2])
    assert relabel_by_size(labels).tolist() == [0, 0, 2, 1, 1, 1, 2, 0, 0]


def test_distinctive_words_are_one_vs_rest():
    texts = ["I love westerns cowboys and horses", "cowboys and westerns forever", "romance and love letters",
             "romance novels and love stories"]
    words = distinctive_words(texts, np.array([0, 0, 1, 1]), top_n=3)
    assert {w for w, _ in words[0]} <= {"westerns", "cowboys", "horses", "forever"} and len(words[0]) == 3
    assert words[1][0][0] == "romance"
    assert all(score > 0 for w in words.values() for _, score in w)
    assert "love" not in {w for w, _ in words[0]}  # shared by both clusters: not distinctive


def test_personas_stage_writes_the_contract(tmp_path):
    run = make_embedded_run(tmp_path, n_users=16)
    assert cli_main(["personas", "--run", str(run), "--k", "auto", "--k-max", "6", "--n-init", "2"]) == 0
    r = RunFolder(run)
    out = r.personas_dir
    elbow = json.loads((out / "elbow.json").read_text())
    k = elbow["chosen_k"]
    assert set(elbow["inertia"]) == {str(i) for i in range(1, 7)} and "kneedle" in elbow["rule"]
    assert (out / "elbow.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assignments = r.read_table("personas/assignments.parquet")
    assert list(assignments.columns) == ["user_id", "persona"] and str(assignments.persona.dtype) == "int64"
    profiles = r.read_table("distill/profiles.parquet")
    assert sorted(assignments.user_id) == sorted(profiles.user_id)
    assert set(assignments.persona) == set(range(k))
    summary = json.loads((out / "summary.json").read_text())
    train = r.read_table("ratings_train.parquet").merge(assignments, on="user_id")
    for p in summary["personas"]:
        assert p["size"] == (assignments.persona == p["persona"]).sum()
        assert p["n_train_rows"] == (train.persona == p["persona"]).sum()
    assert sum(p["size"] for p in summary["personas"]) == 16
    assert "| persona | users |" in (out / "summary.md").read_text()
    assert r.stage_record("personas")["chosen_k"] == k

    fixed = personas.run(RunFolder(run), PersonasConfig(k=3, seed=1, n_init=2))
    assert fixed["k"] == 3 and fixed["k_rule"] == "fixed" and not (out / "elbow.json").exists()
    sizes = [p["size"] for p in fixed["personas"]]
    assert sizes == sorted(sizes, reverse=True)
    again = pd.read_parquet(out / "assignments.parquet")
    personas.run(RunFolder(run), PersonasConfig(k=3, seed=1, n_init=2))
    pd.testing.assert_frame_equal(again, pd.read_parquet(out / "assignments.parquet"))  # seeded: same personas
    with pytest.raises(ConfigError, match="between 1 and the number of users"):
        personas.run(RunFolder(run), PersonasConfig(k=99))
