"""Shared test set-up, kept small: a short socket directory and the hypothesis profile."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

# CI machines are slow and shared: no per-example deadline, fewer examples unless asked.
settings.register_profile("default", deadline=None)
settings.register_profile(
    "ci", deadline=None, max_examples=50, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    """A short private directory for AF_UNIX sockets (paths are limited to 107 bytes, which
    pytest's tmp_path can exceed)."""
    path = Path(tempfile.mkdtemp(prefix="orchd-", dir="/tmp"))
    os.chmod(path, 0o700)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
