"""Cluster users into personas: KMeans++ on their profile (M_s) embeddings, K fixed or by the elbow.

Reads memory/profile_vectors.npy (from `embed`) and distill/profiles.parquet; writes personas/:
assignments.parquet, elbow.json + elbow.png (with --k auto), summary.json + summary.md.

Elbow rule ("kneedle", max distance to the chord): fit K = 1..k_max, scale K and inertia to [0, 1],
and choose the K whose point lies farthest below the straight line from the first to the last point.
Personas are numbered by size, largest first. Distinctive words per persona: mean TF-IDF of a word
over the persona's profiles minus its mean over all other profiles (one-vs-rest), top words kept.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd
from sklearn.cluster import KMeans
from sklearn.feature_extraction.text import TfidfVectorizer

from persona_tune.errors import ConfigError, DataError
from persona_tune.runfolder import (
    ASSIGNMENTS,
    ELBOW,
    ELBOW_PLOT,
    EMBEDDINGS_META,
    PERSONAS_SUMMARY,
    PERSONAS_SUMMARY_MD,
    PROFILE_IDS,
    PROFILE_VECTORS,
    PROFILES,
    RATINGS_TEST,
    RATINGS_TRAIN,
    RunFolder,
    atomic_path,
    atomic_write_json,
    atomic_write_parquet,
    atomic_write_text,
)
from persona_tune.stage import add_config_arguments, config_from_args, require, validate

log = logging.getLogger(__name__)

INPUTS = (RATINGS_TRAIN, RATINGS_TEST, PROFILES, PROFILE_VECTORS, PROFILE_IDS, EMBEDDINGS_META)
ELBOW_RULE = "kneedle: max distance below the chord from K=1 to K=k_max, on K and inertia scaled to [0, 1]"


def kmeans(vectors: np.ndarray, k: int, seed: int = 0, n_init: int = 10) -> KMeans:
    """sklearn KMeans with k-means++ initialisation."""
    return KMeans(n_clusters=k, init="k-means++", n_init=n_init, random_state=seed).fit(vectors)


def inertia_curve(vectors: np.ndarray, k_max: int, seed: int = 0, n_init: int = 10) -> dict[int, float]:
    """KMeans inertia for K = 1..k_max (capped at the number of points)."""
    k_max = min(k_max, len(vectors))
    return {k: float(kmeans(vectors, k, seed, n_init).inertia_) for k in range(1, k_max + 1)}


def elbow_k(inertias: dict[int, float]) -> int:
    """The K farthest below the chord of the scaled inertia curve (see ELBOW_RULE)."""
    ks = np.array(sorted(inertias), dtype=float)
    ys = np.array([inertias[int(k)] for k in ks])
    if len(ks) < 3:
        return int(ks[-1])
    x = (ks - ks[0]) / (ks[-1] - ks[0])
    span = ys[0] - ys[-1]
    y = (ys - ys[-1]) / span if span > 0 else np.zeros_like(ys)
    # The chord runs from (0, 1) to (1, 0): distance below it is proportional to 1 - x - y.
    return int(ks[int(np.argmax(1.0 - x - y))])


def relabel_by_size(labels: np.ndarray) -> np.ndarray:
    """Renumber clusters 0..K-1 by size, largest first (ties: the lower old label first)."""
    sizes = np.bincount(labels)
    order = np.lexsort((np.arange(len(sizes)), -sizes))
    new = np.empty_like(order)
    new[order] = np.arange(len(order))
    return new[labels]


def distinctive_words(texts: list[str], labels: np.ndarray, top_n: int = 10) -> dict[int, list[tuple[str, float]]]:
    """Per cluster: the words whose mean TF-IDF in it most exceeds their mean in the other clusters."""
    vectorizer = TfidfVectorizer(stop_words="english", token_pattern=r"(?u)\b[a-zA-Z][a-zA-Z]+\b")
    try:
        tfidf = vectorizer.fit_transform(texts)
    except ValueError:  # no words at all (empty profiles)
        return {int(c): [] for c in np.unique(labels)}
    words = vectorizer.get_feature_names_out()
    out = {}
    for c in np.unique(labels):
        inside = labels == c
        diff = np.asarray(tfidf[inside].mean(axis=0)).ravel()
        if (~inside).any():
            diff = diff - np.asarray(tfidf[~inside].mean(axis=0)).ravel()
        top = [i for i in np.argsort(-diff, kind="stable")[:top_n] if diff[i] > 0]
        out[int(c)] = [(str(words[i]), round(float(diff[i]), 4)) for i in top]
    return out


def plot_elbow(inertias: dict[int, float], chosen: int, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = sorted(inertias)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(ks, [inertias[k] for k in ks], "o-", color="tab:blue")
    ax.plot([ks[0], ks[-1]], [inertias[ks[0]], inertias[ks[-1]]], "--", color="grey", lw=1, label="chord")
    ax.axvline(chosen, color="tab:red", ls=":", label=f"chosen K = {chosen}")
    ax.set_xlabel("K (personas)")
    ax.set_ylabel("KMeans inertia")
    ax.set_title("Elbow on profile embeddings")
    ax.set_xticks(ks)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def _summary_markdown(summary: dict) -> str:
    lines = [
        f"# Personas (K = {summary['k']}, {summary['k_rule']})",
        "",
        f"{summary['n_users']} users clustered on {summary['embedding_model']} profile embeddings"
        f" (KMeans++, seed {summary['seed']}).",
        "",
        "| persona | users | train rows | test rows | distinctive words (one-vs-rest TF-IDF) |",
        "|---|---|---|---|---|",
    ]
    for p in summary["personas"]:
        words = ", ".join(w for w, _ in p["top_words"]) or "-"
        lines.append(f"| {p['persona']} | {p['size']} | {p['n_train_rows']} | {p['n_test_rows']} | {words} |")
    if summary["unassigned_users"]:
        lines += ["", f"{len(summary['unassigned_users'])} users have no profile vector and no persona."]
    return "\n".join(lines) + "\n"


def load_profile_vectors(run: RunFolder) -> tuple[np.ndarray, np.ndarray]:
    """(user_ids, float32 [n_users, d]): the profile vectors written by `embed`."""
    vectors = run.read_vectors(PROFILE_VECTORS)
    ids = run.read_table(PROFILE_IDS)["user_id"].to_numpy(np.int64)
    if len(ids) != len(vectors):
        raise DataError(
            f"{len(vectors)} vectors but {len(ids)} ids in {run.path(PROFILE_IDS).name}", run.path(PROFILE_VECTORS)
        )
    return ids, vectors


def parse_k(value: str) -> int | str:
    """--k: 'auto' or a whole number."""
    if value == "auto":
        return value
    try:
        return int(value)  # its range: PersonasConfig's metadata (stage.validate)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--k must be 'auto' or an integer, got {value!r}") from None


@dataclass
class PersonasConfig:
    """The `personas` stage's options (its CLI arguments are generated from them)."""

    k: int | str = field(default="auto", metadata={"min": 1, "type": parse_k, "help": "number of personas, or 'auto' for the elbow"})
    k_max: int = field(default=10, metadata={"min": 1, "help": "largest K tried by the elbow"})
    seed: int = field(default=0, metadata={"help": "KMeans seed"})
    n_init: int = field(default=10, metadata={"min": 1, "help": "KMeans restarts per K"})
    top_words: int = field(default=10, metadata={"min": 1, "help": "distinctive words listed per persona"})

    def validate(self) -> None:
        require(self.k == "auto" or (isinstance(self.k, int) and not isinstance(self.k, bool)),
                f"--k must be 'auto' or an integer, got {self.k!r}")
        require(self.k != "auto" or self.k_max >= 2, f"--k-max must be >= 2 with --k auto, got {self.k_max}")


def run(run: RunFolder, cfg: PersonasConfig) -> dict:
    """The `personas` stage: cluster the profile vectors; returns summary.json's content."""
    validate(cfg)  # the one check of the Config (persona_tune/stage.py), before anything is read
    run.require(RATINGS_TRAIN, RATINGS_TEST, PROFILES)
    params = asdict(cfg)
    k, seed, n_init = cfg.k, cfg.seed, cfg.n_init
    inputs = run.checksums(*INPUTS)
    record = run.stage_record("personas") or {}
    if record.get("params") == params and record.get("inputs") == inputs and run.path(PERSONAS_SUMMARY).is_file() \
            and run.path(ASSIGNMENTS).is_file():
        log.info("personas are finished with the same options and inputs: skipped (nothing written)")
        return json.loads(run.path(PERSONAS_SUMMARY).read_text(encoding="utf-8"))
    user_ids, vectors = load_profile_vectors(run)
    from persona_tune.memory.stage import warn_missing_users

    warn_missing_users(run, PROFILE_IDS, "distill", "they get no persona")
    n = len(user_ids)
    if n == 0:
        raise ConfigError(f"{run.path(PROFILE_VECTORS)} holds no profiles: nothing to cluster")
    run.stage_dir("personas", create=True)

    elbow = None
    if k == "auto":
        inertias = inertia_curve(vectors, cfg.k_max, seed, n_init)
        chosen = elbow_k(inertias)
        elbow = {"inertia": {str(key): v for key, v in inertias.items()}, "chosen_k": chosen, "rule": ELBOW_RULE}
        atomic_write_json(run.path(ELBOW), elbow)
        plot_elbow(inertias, chosen, run.path(ELBOW_PLOT))
        k_rule = "elbow"
    else:
        chosen = int(k)
        if not 1 <= chosen <= n:
            raise ConfigError(f"--k must be between 1 and the number of users ({n}), got {chosen}")
        k_rule = "fixed"
        for stale in (ELBOW, ELBOW_PLOT):  # from an earlier --k auto run
            run.path(stale).unlink(missing_ok=True)
    labels = relabel_by_size(kmeans(vectors, chosen, seed, n_init).labels_)
    assignments = pd.DataFrame({"user_id": user_ids.astype("int64"), "persona": labels.astype("int64")})
    assignments = assignments.sort_values("user_id", ignore_index=True)
    atomic_write_parquet(assignments, run.path(ASSIGNMENTS))

    profiles = run.read_profiles(columns=["user_id", "profile"]).set_index("user_id")
    texts = profiles["profile"].reindex(user_ids).fillna("").tolist()
    words = distinctive_words(texts, labels, cfg.top_words)
    train = run.read_ratings("train", columns=["user_id"])
    test = run.read_ratings("test", columns=["user_id"])
    persona_of = assignments.set_index("user_id")["persona"]
    train_rows = train["user_id"].map(persona_of).value_counts()
    test_rows = test["user_id"].map(persona_of).value_counts()
    meta = run.read_embeddings_meta() if run.path(EMBEDDINGS_META).is_file() else {}
    summary = {
        "k": chosen,
        "k_rule": k_rule,
        "seed": seed,
        "n_init": n_init,
        "n_users": n,
        "embedding_model": meta.get("model", "unknown"),
        "unassigned_users": sorted(set(train["user_id"].unique().tolist()) - set(user_ids.tolist())),
        "personas": [
            {
                "persona": p,
                "size": int((labels == p).sum()),
                "n_train_rows": int(train_rows.get(p, 0)),
                "n_test_rows": int(test_rows.get(p, 0)),
                "top_words": words.get(p, []),
            }
            for p in range(chosen)
        ],
    }
    atomic_write_json(run.path(PERSONAS_SUMMARY), summary)
    atomic_write_text(run.path(PERSONAS_SUMMARY_MD), _summary_markdown(summary))
    run.record_stage(
        "personas",
        params,
        inputs=inputs,
        chosen_k=chosen,
        sizes=[p["size"] for p in summary["personas"]],
    )
    log.info("K = %d (%s); persona sizes %s", chosen, k_rule, [p["size"] for p in summary["personas"]])
    return summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", required=True, help="run folder")
    add_config_arguments(parser, PersonasConfig, type_metavars=False)


def print_result(folder: RunFolder, cfg: PersonasConfig, summary: dict) -> int:
    """What `persona-tune personas` prints of ``run``'s result; the exit code."""
    print(_summary_markdown(summary), end="")
    return 0


def main(args: argparse.Namespace) -> int:
    folder, cfg = RunFolder(args.run), config_from_args(PersonasConfig, args)
    return print_result(folder, cfg, run(folder, cfg))
