"""Shared fixtures. Tests that need ../shared skip without it, and fail under CI=true."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent


def _shared_root() -> Path:
    return Path(os.environ.get("PERSONA_TUNE_SHARED", REPO.parent / "shared")).resolve()


def require_shared(relpath: str = "data") -> Path:
    """Return ../shared/<relpath>; skip when absent, but fail under CI=true where it must exist."""
    path = _shared_root() / relpath
    if not path.exists():
        reason = f"{path} is absent (set PERSONA_TUNE_SHARED or place shared/ beside the repo)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true but {reason}")
        pytest.skip(reason)
    return path


@pytest.fixture
def shared_data() -> Path:
    return require_shared("data")


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for a module (opt in with ``pytest.mark.usefixtures``): on a shared
    2-core machine two threads spin against other jobs (10x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """The tiny Phi-3 kit (OUT/model, OUT/tokenizer), written once per module."""
    from persona_tune.models.tiny import write_tiny_phi3

    return write_tiny_phi3(tmp_path_factory.mktemp("tiny"), seed=0)


@pytest.fixture(scope="session")
def eval_run(tmp_path_factory) -> tuple[Path, Path]:
    """(run folder, tiny model folder) the evaluation tests share, built once per session
    (tests/fixtures_runs.py: build_eval_run)."""
    from tests.fixtures_runs import build_eval_run

    return build_eval_run(tmp_path_factory.mktemp("eval_run"))


@pytest.fixture(scope="session")
def ready_run(tmp_path_factory) -> tuple[Path, Path]:
    """(run folder after personas with tiny configs, tiny model folder) for the training tests, once per session."""
    from tests.fixtures_runs import build_ready_run

    return build_ready_run(tmp_path_factory.getbasetemp())
