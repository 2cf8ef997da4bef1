"""The run folder: one experiment's files, the manifest, and atomic writes.

Every stage reads what earlier stages wrote and adds its own subfolder; it never rewrites another
stage's files. Each stage records its parameters and provenance in ``manifest.json`` through
:meth:`RunFolder.record_stage`. See docs/architecture.md for the file contract.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import hashlib
import json
import logging
import os
import re
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from persona_tune import __version__
from persona_tune.errors import ConfigError, DataError, StageMissingError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()

# The run-folder contract: one constant per file that one stage writes and another reads, relative
# to the run folder (docs/architecture.md has the table: producer, readers, accessor).
MANIFEST = "manifest.json"
RATINGS_TRAIN = "ratings_train.parquet"
RATINGS_TEST = "ratings_test.parquet"
ITEMS = "items.parquet"
USERS = "users.parquet"
HISTORY = "history.parquet"  # every non-test rating of the source log, with timestamps (persona_tune/history.py)
PROFILES = "distill/profiles.parquet"
MEMORIES = "distill/memories.parquet"
TRAITS = "distill/traits.parquet"
DISTILL_FAILURES = "distill/failures.jsonl"
DISTILL_REQUESTS = "distill/requests.sqlite"  # the LLM backend's answers, replayed on a re-run
PROFILE_VECTORS = "memory/profile_vectors.npy"
MEMORY_VECTORS = "memory/memory_vectors.npy"
RETRIEVED = "memory/retrieved.parquet"
EMBEDDINGS_META = "memory/embeddings.json"
PROFILE_IDS = "memory/profile_ids.parquet"
MEMORY_IDS = "memory/memory_ids.parquet"
ITEM_VECTORS = "memory/item_vectors.npy"
ITEM_IDS = "memory/item_ids.parquet"
EMBEDDINGS_CACHE = "memory/embeddings.sqlite"
ASSIGNMENTS = "personas/assignments.parquet"
PERSONAS_SUMMARY = "personas/summary.json"
PERSONAS_SUMMARY_MD = "personas/summary.md"
ELBOW = "personas/elbow.json"
ELBOW_PLOT = "personas/elbow.png"
RESULTS = "eval/results.json"
REPORT = "eval/report.md"
PLOTS = "eval/plots"
TRUNK_CACHE = "trunk_cache"  # the frozen-trunk recipe's activations (configs/*_trunk: trunk_cache.dir)
RATINGS = {"train": RATINGS_TRAIN, "test": RATINGS_TEST}
# What an agent's predictions are built from (the rows, item texts and history, the prompts' profiles,
# memories and retrieved memories, the persona of each user): an eval part's fingerprint and
# eval_inputs.json record their checksums, so changed data is never published as current.
AGENT_INPUTS = (RATINGS_TRAIN, RATINGS_TEST, ITEMS, HISTORY, PROFILES, MEMORIES, RETRIEVED, ASSIGNMENTS)

# File names inside one variant's folder: configs/<variant>.yaml, adapters/<variant>/...,
# eval/<name>/..., simulate/<name>/... (RunFolder.config_file, adapter_dir, eval_variant_dir).
PREDICTIONS = "predictions.parquet"
# The columns of an agent's predictions.parquet (eval/<variant>/, and adapters/<variant>/ of the frozen-trunk
# recipe), in this order (write_predictions): the row, then how it was rated and the ratings read off the
# model (p1..p5: the five rating tokens' probabilities renormalised over the five), then its prompt's length.
PROB_COLUMNS = [f"p{r}" for r in range(1, 6)]
PREDICTION_COLUMNS = ["mode", "raw_text", "parsed_rating", "expected_rating", "argmax_rating", *PROB_COLUMNS,
                      "rating_mass", "prediction"]
PREDICTIONS_LAYOUT = ["persona", "user_id", "item_id", "rating", *PREDICTION_COLUMNS, "n_prompt_tokens"]
METRICS = "metrics.json"
TRAIN_SUMMARY = "train_summary.json"  # written last by `train`: the adapter is complete (check_adapter)
ADAPTER_FILE = "adapter_model.pt"  # torchtune's LoRA weights, adapters/<variant>/epoch_N/
HEAD_FILE = "rating_head.pt"  # the frozen-trunk recipe's rating head, beside adapter_model.pt
TRUNK_SUMMARY = "trunk_summary.json"
TORCHTUNE_CONFIG = "torchtune_config.yaml"  # adapters/<variant>/: the resolved config of the training run
EVAL_INPUTS = "eval_inputs.json"
EVAL_CONFIG = "eval_config.yaml"
EVAL_LOG = "eval.log"
BASELINES = "baselines"  # eval/baselines/: the classical baselines' predictions and metrics
# references/: the kNN and MF references of every test row, fitted once and cached (evaluation/references.py):
# the MF tuning on validation users, one part per history bucket (each with a .json fingerprint), all rows.
REFERENCES_DIR = "references"
REFERENCE_TUNING = f"{REFERENCES_DIR}/mf_tuning.json"
REFERENCE_PARTS = f"{REFERENCES_DIR}/parts"
REFERENCE_PREDICTIONS = f"{REFERENCES_DIR}/predictions.parquet"
SERVING_SPEC = "serving.json"  # serving/<variant>/: the bundle's description (persona-tune serve-export)

# What another machine needs to train and evaluate a run (benchmarks/gpu_run.sh packs it): the stages'
# outputs up to personas and the baselines; no vectors, caches or adapters.
PORTABLE_INPUTS = (MANIFEST, RATINGS_TRAIN, RATINGS_TEST, ITEMS, USERS, HISTORY, PROFILES, MEMORIES, TRAITS, RETRIEVED,
                   EMBEDDINGS_META, "personas", f"eval/{BASELINES}")

# Which stage writes which file, so a missing input names the command that makes it.
PRODUCERS = {
    RATINGS_TRAIN: "prepare",
    RATINGS_TEST: "prepare",
    ITEMS: "prepare",
    USERS: "prepare",
    HISTORY: "prepare",
    PROFILES: "distill",
    MEMORIES: "distill",
    TRAITS: "distill",
    PROFILE_VECTORS: "embed",
    MEMORY_VECTORS: "embed",
    RETRIEVED: "embed",
    EMBEDDINGS_META: "embed",
    PROFILE_IDS: "embed",
    MEMORY_IDS: "embed",
    ITEM_VECTORS: "embed",
    ITEM_IDS: "embed",
    ASSIGNMENTS: "personas",
}


NAME = re.compile(r"^[A-Za-z0-9_-]+$")


def check_name(name: str, what: str = "variant name") -> str:
    """A name that becomes a file or folder name in the run folder: letters, digits, '_' and '-' only.

    The one validator for every name a command takes, so no name can point outside the run folder."""
    if not isinstance(name, str) or not NAME.match(name):
        raise ConfigError(f"invalid {what} {name!r}: use only letters, digits, '_' and '-'")
    return name


# Temporary files of atomic writes: .<name>.tmp<pid>.<random><suffix> beside the target. A writer
# killed by kill -9 leaves its temp behind; the next process's first atomic write into that folder
# removes the temps of processes that no longer exist.
_TEMP = re.compile(r"^\..+\.tmp(\d+)\.[^/]*$")


def _temp_prefix(name: str) -> str:
    return f".{name}.tmp{os.getpid()}."


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


_CLEANED: set[str] = set()  # folders this process has cleaned already (once is enough: its own temps live)


def clean_temp_files(folder: str | os.PathLike, again: bool = False) -> list[Path]:
    """Remove the temp files of dead writers in ``folder`` (see _TEMP), once per process and folder
    unless ``again``; returns what was removed."""
    removed = []
    key = os.path.abspath(folder)
    if key in _CLEANED and not again:
        return removed
    _CLEANED.add(key)
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        match = _TEMP.match(name)
        if match and int(match.group(1)) != os.getpid() and not _alive(int(match.group(1))):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(folder, name))
                removed.append(Path(folder) / name)
    return removed


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` so readers see the old file or the whole new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_temp_files(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path.name), suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` atomically.

    For writers that want a filename (``df.to_parquet``, ``np.save``, ``fig.savefig``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_temp_files(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path.stem), suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_parquet(df, path: str | os.PathLike) -> Path:
    """Write a DataFrame as Parquet atomically, without the pandas index."""
    with atomic_path(path) as tmp:
        df.to_parquet(tmp, index=False)
    return Path(path)


def write_predictions(predictions, path: str | os.PathLike):
    """An agent's predictions.parquet, written atomically: the PREDICTIONS_LAYOUT columns of
    ``predictions``, in that order. Returns the frame written."""
    missing = [c for c in PREDICTIONS_LAYOUT if c not in predictions.columns]
    if missing:
        raise DataError(f"predictions without the column(s) {', '.join(missing)}", path)
    predictions = predictions[PREDICTIONS_LAYOUT]
    atomic_write_parquet(predictions, path)
    return predictions


@contextlib.contextmanager
def file_lock(path: str | os.PathLike, what: str, wait: bool = False) -> Iterator[int]:
    """Hold an exclusive fcntl lock on ``path``; yield its file descriptor (pass it to child processes
    with ``pass_fds`` and the lock lives as long as any of them). Without ``wait``, a held lock is a
    ConfigError naming the holder's pid: ``what`` says what it is doing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            raise ConfigError(f"another process (pid {holder}) is {what} ({path} is locked); "
                              "wait for it to finish or stop it, then re-run") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield fd
    finally:
        os.close(fd)


def adapter_files(adapter: str | os.PathLike) -> dict[str, str]:
    """{path relative to the variant's folder: sha256} of a trained adapter file and its rating head
    (when there is one): what train_summary.json records and check_adapter verifies."""
    adapter = Path(adapter)
    files = [adapter] + [p for p in (adapter.with_name(HEAD_FILE),) if p.is_file()]
    return {str(p.relative_to(adapter.parent.parent)): file_sha256(p) for p in files}


def epoch_adapters(adapter_dir: str | os.PathLike, names: Sequence[str] = (ADAPTER_FILE,)) -> list[Path]:
    """adapter_dir/epoch_<N>/<name> of every epoch N that holds one (the first of ``names`` there), by N:
    torchtune's layout of a training run's checkpoints."""
    found = {}
    for folder in Path(adapter_dir).glob("epoch_*"):
        file = next((folder / n for n in names if (folder / n).is_file()), None)
        if folder.name[6:].isdigit() and file is not None:
            found[int(folder.name[6:])] = file
    return [found[n] for n in sorted(found)]


def last_epoch_adapter(adapter_dir: str | os.PathLike, names: Sequence[str] = (ADAPTER_FILE,),
                       missing_ok: bool = False) -> Path | None:
    """adapter_dir/epoch_<last>/adapter_model.pt (or the first of ``names``), finished or not (check_adapter
    for a usable one). None when no epoch holds one and ``missing_ok``, else StageMissingError."""
    epochs = epoch_adapters(adapter_dir, names)
    if not epochs and not missing_ok:
        raise StageMissingError(f"{adapter_dir} holds no trained epoch (epoch_N/{names[0]}): train it first")
    return epochs[-1] if epochs else None


def check_adapter(adapter_dir: str | os.PathLike, epoch: int | None = None, verify: bool = True) -> Path:
    """The adapter file (epoch_N/adapter_model.pt; N: ``epoch``, else the last) of a FINISHED training
    in ``adapter_dir`` (adapters/<variant>/). Raises StageMissingError when the training did not finish
    (no train_summary.json, the completion marker `train` writes last) and DataError naming the file
    when a file it records is missing or changed since (sha256; skipped without ``verify``)."""
    adapter_dir = Path(adapter_dir)
    run_root = adapter_dir.parent.parent
    if not adapter_dir.is_dir():
        raise StageMissingError(f"{adapter_dir} is missing: train it first (`persona-tune train --run {run_root}`)")
    marker = adapter_dir / TRAIN_SUMMARY
    if not marker.is_file():
        partial = [p.parent.name for p in epoch_adapters(adapter_dir)]
        found = f"; it holds only {', '.join(partial)}" if partial else ""
        raise StageMissingError(
            f"{adapter_dir}: its training did not finish (no {TRAIN_SUMMARY}{found}): run "
            f"`persona-tune train --run {run_root} --personas {adapter_dir.name}` to train it")
    try:
        recorded = json.loads(marker.read_text(encoding="utf-8")).get("files") or {}
    except (ValueError, AttributeError) as e:
        raise DataError(f"unreadable ({e}); retrain with `persona-tune train --run {run_root} --personas "
                        f"{adapter_dir.name} --force`", marker) from None
    if epoch is not None:
        adapter = adapter_dir / f"epoch_{int(epoch)}" / ADAPTER_FILE
    else:
        named = [rel for rel in recorded if Path(rel).name == ADAPTER_FILE]
        adapter = adapter_dir / named[0] if named else last_epoch_adapter(adapter_dir, missing_ok=True)
    if adapter is None or not adapter.is_file():
        raise StageMissingError(f"{adapter or adapter_dir / 'epoch_N' / ADAPTER_FILE} is missing though {marker} "
                                f"exists: retrain with `persona-tune train --run {run_root} --personas "
                                f"{adapter_dir.name} --force`")
    if verify:
        for rel, sha in recorded.items():
            path = adapter_dir / rel
            if not path.is_file() or file_sha256(path) != sha:
                raise DataError(f"{'missing' if not path.is_file() else 'changed'} since its training finished "
                                f"(sha256 recorded in {marker}); retrain with `persona-tune train --run "
                                f"{run_root} --personas {adapter_dir.name} --force`", path)
    return adapter


def load_torch(path: str | os.PathLike, *, weights_only: bool = True, hint: str = "") -> Any:
    """``torch.load`` onto the CPU; a truncated or corrupt file is one DataError naming it (+ ``hint``)."""
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only)
    except FileNotFoundError:
        raise
    except Exception as e:  # RuntimeError (zip), EOFError, OSError(22), UnpicklingError...
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise DataError(f"unreadable, truncated or corrupt ({type(e).__name__}: {reason}){hint}", path) from None


def read_or_discard(path: str | os.PathLike, read: Callable[[Path], Any], what: str = "file") -> Any | None:
    """``read(path)``, or None when ``path`` is missing or corrupt: a corrupt one (a cache shard, a part,
    a resume state: anything the stage recomputes) is named in a warning and removed."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        return read(path)
    except Exception as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        log.warning("%s: unreadable %s (%s): removed, it is recomputed", path, what, reason)
        with contextlib.suppress(OSError):
            path.unlink()
        return None


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def code_version() -> str:
    """The package version, plus the git commit when running from a checkout."""
    here = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()
        return f"{__version__}+g{sha}" if sha else __version__
    except (OSError, subprocess.SubprocessError):
        return __version__


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item"):  # numpy scalars
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _table_reader(relpath: str, doc: str):
    """A RunFolder method that reads ``relpath``: ``(columns=None, missing_ok=False)``; with ``missing_ok``,
    None when the file does not exist, else a missing file names the command that writes it."""

    def read(self: "RunFolder", columns: list[str] | None = None, missing_ok: bool = False):
        return self.read_table(relpath, columns, missing_ok)

    read.__doc__ = doc
    return read


class RunFolder:
    """Paths and manifest of one run folder. Cheap to construct; touches no file until asked."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser().resolve()

    # Files written by `prepare`.
    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST

    @property
    def ratings_train(self) -> Path:
        return self.root / RATINGS_TRAIN

    @property
    def ratings_test(self) -> Path:
        return self.root / RATINGS_TEST

    @property
    def items(self) -> Path:
        return self.root / ITEMS

    @property
    def users(self) -> Path:
        return self.root / USERS

    # One subfolder per later stage.
    def stage_dir(self, stage: str, create: bool = False) -> Path:
        d = self.root / stage
        if create:
            d.mkdir(parents=True, exist_ok=True)
        return d

    @property
    def distill_dir(self) -> Path:
        return self.root / "distill"

    @property
    def memory_dir(self) -> Path:
        return self.root / "memory"

    @property
    def personas_dir(self) -> Path:
        return self.root / "personas"

    @property
    def configs_dir(self) -> Path:
        return self.root / "configs"

    @property
    def adapters_dir(self) -> Path:
        return self.root / "adapters"

    @property
    def eval_dir(self) -> Path:
        return self.root / "eval"

    @property
    def trunk_cache_dir(self) -> Path:
        return self.root / TRUNK_CACHE

    @property
    def simulate_dir(self) -> Path:
        return self.root / "simulate"

    # Per-variant files (names checked, so none points outside the run folder).
    def config_file(self, variant: str) -> Path:
        """configs/<variant>.yaml, written by `configs` (or `grid`), read by `train` and `eval`."""
        return self.configs_dir / f"{check_name(variant)}.yaml"

    def config_relpath(self, variant: str) -> str:
        return f"configs/{check_name(variant)}.yaml"

    def adapter_dir(self, variant: str) -> Path:
        """adapters/<variant>/: the checkpoints, train_summary.json and peft/ of one trained variant."""
        return self.adapters_dir / check_name(variant)

    def train_summary(self, variant: str) -> Path:
        return self.adapter_dir(variant) / TRAIN_SUMMARY

    def eval_variant_dir(self, name: str) -> Path:
        """eval/<name>/: eval_config.yaml, predictions.parquet, metrics.json of one evaluated variant."""
        return self.eval_dir / check_name(name)

    def eval_predictions(self, name: str) -> Path:
        return self.eval_variant_dir(name) / PREDICTIONS

    def eval_metrics(self, name: str) -> Path:
        return self.eval_variant_dir(name) / METRICS

    def eval_prediction_files(self, baselines: bool = True) -> list[Path]:
        """eval/*/predictions.parquet, sorted; without ``baselines``, the agents' only."""
        return [p for p in sorted(self.eval_dir.glob(f"*/{PREDICTIONS}")) if baselines or p.parent.name != BASELINES]

    def eval_metric_files(self) -> list[Path]:
        return sorted(self.eval_dir.glob(f"*/{METRICS}"))

    @property
    def baselines_dir(self) -> Path:
        return self.eval_dir / BASELINES

    @property
    def baseline_predictions(self) -> Path:
        return self.baselines_dir / PREDICTIONS

    @property
    def serving_dir(self) -> Path:
        return self.root / "serving"

    def serving_variant_dir(self, variant: str) -> Path:
        """serving/<variant>/: serving.json and one folder per adapter (PEFT + GGUF), by `serve-export`."""
        return self.serving_dir / check_name(variant)

    def simulation(self, name: str) -> "SimulationFolder":
        """RUN/simulate/<name>/: the files of one `persona-tune simulate` run."""
        return SimulationFolder(self.simulate_dir / name)

    def path(self, relpath: str) -> Path:
        return self.root / relpath

    def exists(self) -> bool:
        return self.manifest_path.is_file()

    def require(self, *relpaths: str) -> None:
        """Raise StageMissingError naming the command to run when an input file is missing."""
        if self.root.exists() and not self.root.is_dir():
            raise StageMissingError(f"{self.root} is a file, not a run folder")
        if not self.root.is_dir():
            raise StageMissingError(
                f"run folder {self.root} does not exist: create it with `persona-tune prepare --out {self.root}`"
            )
        for rel in relpaths:
            stage = PRODUCERS.get(rel, "the stage that writes it")
            flag = "--out" if stage == "prepare" else "--run"
            if not (self.root / rel).exists():
                raise StageMissingError(
                    f"{self.root / rel} is missing: run `persona-tune {stage} {flag} {self.root}` first"
                )
            # The manifest decides what exists: data of a `prepare` that did not finish is not an output.
            if stage == "prepare" and "prepare" not in self.read_manifest().get("stages", {}):
                raise StageMissingError(
                    f"{self.root / rel} is not recorded in {self.manifest_path} (`prepare` did not finish): "
                    f"run `persona-tune prepare {flag} {self.root}` again"
                )

    def require_folder(self) -> None:
        """The run folder must be a folder written by `prepare` (its manifest records prepare)."""
        if self.root.exists() and not self.root.is_dir():
            raise StageMissingError(f"{self.root} is a file, not a run folder")
        if not self.root.is_dir() or "prepare" not in self.read_manifest().get("stages", {}):
            raise StageMissingError(
                f"{self.root} is not a prepared run folder (its manifest.json records no `prepare`): "
                f"run `persona-tune prepare --out {self.root}` first"
            )

    def checksums(self, *relpaths: str) -> dict[str, str]:
        """sha256 of each of ``relpaths`` that exists: what a stage records of the inputs it read."""
        return {rel: file_sha256(self.root / rel) for rel in relpaths if (self.root / rel).is_file()}

    def changed_inputs(self, recorded: dict[str, str] | None, *relpaths: str) -> list[str]:
        """Which of the ``recorded`` input checksums no longer match the files (added or removed too)."""
        if recorded is None:
            return []
        now = self.checksums(*relpaths)
        return sorted(rel for rel in set(recorded) | set(now) if recorded.get(rel) != now.get(rel))

    def read_table(self, relpath: str, columns: list[str] | None = None, missing_ok: bool = False):
        """A Parquet file of the run; with ``missing_ok``, None when it does not exist."""
        import pandas as pd

        if missing_ok and not (self.root / relpath).exists():
            return None
        self.require(relpath)
        return pd.read_parquet(self.root / relpath, columns=columns)

    # Typed readers: each requires its file (a missing one names the command that writes it).
    def read_ratings(self, split: str, columns: list[str] | None = None):
        """ratings_train.parquet (``split="train"``) or ratings_test.parquet (``"test"``)."""
        if split not in RATINGS:
            raise ValueError(f"split must be one of {sorted(RATINGS)}, not {split!r}")
        return self.read_table(RATINGS[split], columns)

    read_items = _table_reader(ITEMS, "items.parquet: one row per item, with its prompt text and history.")
    read_history = _table_reader(HISTORY, "history.parquet: every non-test rating of the source log (persona_tune/history.py).")
    read_users = _table_reader(USERS, "users.parquet: one row per sampled user, with the rating counts.")
    read_profiles = _table_reader(PROFILES, "distill/profiles.parquet: one profile (M_s) and trait levels per user.")
    read_memories = _table_reader(MEMORIES, "distill/memories.parquet: one explanation (M_l) per train (user, item).")
    read_traits = _table_reader(TRAITS, "distill/traits.parquet: the trait values behind the levels.")
    read_retrieved = _table_reader(RETRIEVED, "memory/retrieved.parquet: the memories retrieved for each row.")
    read_assignments = _table_reader(ASSIGNMENTS, "personas/assignments.parquet: user_id -> persona.")

    def read_embeddings_meta(self) -> dict:
        """memory/embeddings.json: the embedding backend, model and dimension."""
        self.require(EMBEDDINGS_META)
        return json.loads((self.root / EMBEDDINGS_META).read_text(encoding="utf-8"))

    def read_vectors(self, relpath: str):
        """One of the memory/*_vectors.npy arrays."""
        import numpy as np

        self.require(relpath)
        return np.load(self.root / relpath)

    # Manifest.
    def read_manifest(self) -> dict:
        if not self.manifest_path.is_file():
            return {"format_version": FORMAT_VERSION, "stages": {}}
        with open(self.manifest_path, encoding="utf-8") as f:
            manifest = json.load(f)
        version = manifest.get("format_version")
        if version != FORMAT_VERSION:
            raise StageMissingError(
                f"{self.manifest_path}: format_version {version!r}, this persona-tune reads {FORMAT_VERSION}; "
                "re-run `persona-tune prepare`"
            )
        return manifest

    @contextlib.contextmanager
    def _manifest_lock(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".manifest.lock", "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def update_manifest(self, **top_level: Any) -> dict:
        """Set top-level manifest keys (``protocol``, ``inputs``, ``counts``...) atomically (URL
        credentials redacted, persona_tune/net.py)."""
        from persona_tune.net import redact

        with self._manifest_lock():
            manifest = self.read_manifest()
            manifest.update(redact(top_level))
            manifest["format_version"] = FORMAT_VERSION
            atomic_write_json(self.manifest_path, manifest)
        return manifest

    def record_stage(self, stage: str, params: dict, **extra: Any) -> dict:
        """Record one stage's parameters and provenance (code version, time, plus ``extra``); a password
        in a URL is recorded as ``***`` (persona_tune/net.py)."""
        from persona_tune.net import redact

        entry = redact({"params": params, "code_version": code_version(), "finished_at": _now(), **extra})
        with self._manifest_lock():
            manifest = self.read_manifest()
            manifest.setdefault("stages", {})[stage] = entry
            manifest["format_version"] = FORMAT_VERSION
            atomic_write_json(self.manifest_path, manifest)
        return entry

    def stage_record(self, stage: str) -> dict | None:
        return self.read_manifest().get("stages", {}).get(stage)


class SimulationFolder:
    """RUN/simulate/<name>/ (persona-tune simulate; docs/simulation.md has the columns)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.name = self.root.name

    @property
    def recs(self) -> Path:  # the validated recs of every recommender, the reference ones included
        return self.root / "recs.parquet"

    @property
    def probes(self) -> Path:  # held-out candidates and sampled unrated items, rated by each simulator
        return self.root / "probes.parquet"

    @property
    def predictions(self) -> Path:  # every recs row rated by each simulator, with the truth where known
        return self.root / PREDICTIONS

    @property
    def metrics(self) -> Path:
        return self.root / METRICS

    @property
    def parts_dir(self) -> Path:  # the agent's scores, chunk by chunk, each with its fingerprint
        return self.root / "parts"

    # `simulate --validity` (persona_tune/simulate/validity.py; read by the report's Simulation section)
    @property
    def validity(self) -> Path:  # agreement and fidelity of each simulator, paired differences
        return self.root / "validity.json"

    @property
    def validity_users(self) -> Path:  # per source (truth, simulator), recommender and user: ndcg, recall
        return self.root / "validity_users.parquet"

    @property
    def validity_rows(self) -> Path:  # every rated row (held-out and unrated), once per simulator
        return self.root / "validity_rows.parquet"

    def exists(self) -> bool:
        return self.metrics.is_file()
