"""Shared fixtures. Tests that need ../shared skip without it, and fail under CI=true."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

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
