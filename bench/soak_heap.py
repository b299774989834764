"""The daemon's heap during a soak (bench/soak.py `--heap`): a sitecustomize module put on
the daemon's PYTHONPATH turns tracemalloc on from the start and answers a request file
with a look at the heap after a gc: the summed length of every container held by orchd's
objects (`Class.attribute`), and a tracemalloc snapshot to diff against the first look.
"""

from __future__ import annotations

import json
import os
import time
import tracemalloc
from pathlib import Path
from typing import Any

from tests.harness import ROOT


class Heap:
    """The daemon's heap, asked for through a file the daemon's sitecustomize watches."""

    def __init__(self, tmp: Path) -> None:
        self.dir = tmp / "heap"
        self.dir.mkdir()
        (self.dir / "sitecustomize.py").write_text(HEAP_HOOK)
        self.n = 0

    def env(self) -> dict[str, str]:
        path = os.pathsep.join([str(self.dir), str(ROOT), os.environ.get("PYTHONPATH", "")])
        return {"PYTHONPATH": path, "ORCHD_SOAK_HEAP": str(self.dir)}

    def look(self, timeout: float = 300.0) -> dict[str, Any]:
        self.n += 1
        out = self.dir / f"look-{self.n}.json"
        (self.dir / "request").write_text(str(out))
        deadline = time.monotonic() + timeout
        while not out.exists():
            if time.monotonic() > deadline:
                raise AssertionError("the daemon did not answer the heap request")
            time.sleep(0.1)
        doc: dict[str, Any] = json.loads(out.read_text())
        return doc

    @staticmethod
    def grown(first: dict[str, Any], last: dict[str, Any], top: int = 15) -> list[str]:
        a = tracemalloc.Snapshot.load(first["snapshot"])
        b = tracemalloc.Snapshot.load(last["snapshot"])
        return [str(s) for s in b.compare_to(a, "lineno")[:top]]


# Loaded by the daemon's interpreter (PYTHONPATH) when ORCHD_SOAK_HEAP is set: tracemalloc
# from the start, and a thread that answers a request file with a gc'd heap look.
HEAP_HOOK = r"""
import gc, json, os, sys, threading, time, tracemalloc
_dir = os.environ.get("ORCHD_SOAK_HEAP")
# The daemon only (`python -m supervisor …`), not its agents.
if _dir and sys.orig_argv[1:3] == ["-m", "supervisor"]:
    tracemalloc.start(1)
    def _ours(obj):
        return type(obj).__module__.startswith("supervisor")
    def _fields(obj):
        cls = type(obj)
        names = list(getattr(obj, "__dict__", None) or {})
        names += list(getattr(cls, "__struct_fields__", ()))
        for klass in cls.__mro__:
            names += [s for s in getattr(klass, "__slots__", ()) if isinstance(s, str)]
        return names
    def _sizes():
        # From every tracked object of ours, through attributes and containers, to every
        # object of ours reachable (msgspec Structs may be untracked): the summed length of
        # each Class.attribute container.
        out, seen = {}, set()
        todo = [o for o in gc.get_objects() if _ours(o)]
        while todo and len(seen) < 5_000_000:
            obj = todo.pop()
            if id(obj) in seen:
                continue
            seen.add(id(obj))
            for name in _fields(obj):
                try:
                    value = getattr(obj, name)
                except Exception:
                    continue
                if _ours(value):
                    todo.append(value)
                    continue
                if not (isinstance(value, (dict, list, set, tuple)) or hasattr(value, "maxlen")):
                    continue
                try:
                    n = len(value)
                except Exception:
                    continue
                key = f"{type(obj).__name__}.{name}"
                out[key] = out.get(key, 0) + n
                items = value.values() if isinstance(value, dict) else value
                for item in items:
                    if _ours(item):
                        todo.append(item)
                    elif isinstance(item, (list, tuple)):
                        todo.extend(x for x in item if _ours(x))
        return out
    def _watch():
        req = os.path.join(_dir, "request")
        while True:
            time.sleep(0.2)
            try:
                with open(req) as f:
                    target = f.read().strip()
                os.unlink(req)
            except FileNotFoundError:
                continue
            gc.collect()
            snap = target + ".tracemalloc"
            tracemalloc.take_snapshot().dump(snap)
            doc = {"containers": _sizes(), "snapshot": snap,
                   "traced_bytes": tracemalloc.get_traced_memory()[0],
                   "gc_objects": len(gc.get_objects())}
            with open(target + ".tmp", "w") as f:
                json.dump(doc, f)
            os.rename(target + ".tmp", target)
    threading.Thread(target=_watch, daemon=True, name="soak-heap").start()
"""
