"""Shared fixtures. Tests that need ../shared skip without it, and fail under CI=true."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.fixtures_runs import REPO, require_shared


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
