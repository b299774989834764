"""Shared test set-up, kept small: the hypothesis profile, a short socket directory and a
running daemon."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from hypothesis import HealthCheck, settings

from supervisor.workers import proctree
from tests.harness import Daemon, assert_no_leftovers, remove_dead_cgroups

# CI machines are slow and shared: no per-example deadline, fewer examples unless asked.
settings.register_profile("default", deadline=None)
settings.register_profile(
    "ci", deadline=None, max_examples=50, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.fixture(scope="session", autouse=True)
def no_dead_cgroups() -> Iterator[None]:
    """At the end of the session, the cgroups of daemons that were killed and never started
    again are removed (an empty cgroup of a dead daemon is otherwise left on the host)."""
    yield
    remove_dead_cgroups()


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


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    """A real orchd on a temporary state directory with sub-second timings; stopped after
    the test, and none of its agents or task processes may outlive it."""
    d = Daemon(tmp_path).start()
    try:
        yield d
    finally:
        if d.proc is not None and d.proc.poll() is None:
            d.stop()
        assert_no_leftovers()


@pytest.fixture
def no_leftover_processes(request: pytest.FixtureRequest) -> Iterator[None]:
    """After the test: no live child of this process and no live process whose attempt
    marker starts with the test module's MARK (leftovers are killed, then reported)."""
    mark: str = request.module.MARK
    yield

    def live() -> list[psutil.Process]:
        mine = psutil.Process().children(recursive=True)
        marked = proctree.find_marked(mark, prefix=True)
        return [p for p in [*mine, *marked] if proctree.alive(p)]

    deadline = time.monotonic() + 3.0
    while (left := live()) and time.monotonic() < deadline:
        time.sleep(0.02)
    for proc in left:
        proc.kill()
    assert not left, f"processes left behind: {[p.pid for p in left]}"
