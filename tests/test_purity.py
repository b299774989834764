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
CORE = ROOT / "supervisor" / "core"
# Every module of the core package is pure; so are these modules of the client.
PURE = sorted(f"supervisor.core.{p.stem}" for p in CORE.glob("*.py") if p.stem != "__init__")
PURE += ["ctl.render", "ctl.dag", "ctl.prometheus", "ctl.exitcodes", "ctl.topview"]
# The packages of the I/O side, and the libraries that do I/O or run an event loop.
FORBIDDEN = [
    "anyio",
    "asyncio",
    "psutil",
    "watchfiles",
    "supervisor.failpoints",
    "supervisor.store",
    "supervisor.workers",
    "supervisor.engine",
    "supervisor.control",
    "supervisor.service",
]


def test_the_core_is_all_there() -> None:
    """The decision core's modules are all present (and so are all checked below)."""
    names = {m.rsplit(".", 1)[-1] for m in PURE}
    assert {"model", "graph", "policy", "machine", "runtime", "txn", "config"} <= names


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
