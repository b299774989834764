"""The pure core stays pure: importing it pulls in no async runtime, no process or file
watching library and none of our I/O modules."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# These must exist; the others are checked once they are written.
REQUIRED = [
    "supervisor.core.model",
    "supervisor.core.graph",
    "supervisor.core.policy",
    "supervisor.core.config",
    "supervisor.core.wire",
]
OPTIONAL = [
    "supervisor.core.submission",
    "supervisor.control.protocol",
    "supervisor.core.queue",
    "supervisor.core.views",
    "ctl.render",
    "ctl.dag",
    "ctl.prometheus",
    "ctl.exitcodes",
]


def source(module: str) -> Path:
    return ROOT.joinpath(*module.split(".")).with_suffix(".py")


PURE = REQUIRED + [m for m in OPTIONAL if source(m).exists()]
FORBIDDEN = [
    "anyio",
    "asyncio",
    "psutil",
    "watchfiles",
    "supervisor.store.directory",
    "supervisor.workers.pool",
    "supervisor.workers.agent",
    "supervisor.workers.attempt",
    "supervisor.engine.loop",
    "supervisor.control.server",
    "supervisor.service.daemon",
]


def test_required_pure_modules_exist() -> None:
    """The pure core's modules are all present."""
    missing = [m for m in REQUIRED if not source(m).exists()]
    assert missing == []


@pytest.mark.parametrize("module", PURE)
def test_pure_module_imports_nothing_impure(module: str) -> None:
    """Importing the module in a fresh interpreter loads none of the forbidden modules."""
    code = (
        "import importlib, json, sys\n"
        f"importlib.import_module({module!r})\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p
        ),
    }
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    loaded = set(json.loads(out.stdout))
    bad = [
        name
        for name in FORBIDDEN
        if name in loaded or any(m.startswith(name + ".") for m in loaded)
    ]
    assert bad == []
