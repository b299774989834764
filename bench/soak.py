"""A soak: many workstream runs of a realistic mix submitted one after another to the real
daemon, with figures after every tenth of the work, set beside the first tenth's.

Each run (pipeline `soak`, so `soak-1`, `soak-2`, …) is a DAG of TASKS tasks in layers of
200, each task after two of the layer before. In every layer one task holds the shared
resource `git_repo_write` (one holder at a time), one fails its first attempt and passes
its retry (a flaky test), and the rest run `true`. Every FAIL_EVERY-th run also has a
task in its last layer that fails for good (an exit code not worth retrying), so the run
ends failed; the operator's answer follows as `orchctl ws retry-failed WS` (a real
orchctl), the task passes its second run and the run completes.

After each tenth of the runs, on the idle daemon:

- RSS of the daemon (psutil), the state directory's disk use (du) without `archive/`,
  and `archive/` apart (retired work, which grows with history by design);
- `status` latency: the median of 5 socket calls, and of 3 whole `orchctl status`;
- restart → ready, the time from starting `orchd` until it answers on its socket, after a
  SIGKILL (replaying the log after the snapshot) and after a clean stop (SIGTERM, which
  writes a snapshot), each the median of `--restarts` restarts; RSS again once the clean
  start's workers are idle (what the live state costs, without the garbage of a long
  life). `--restart-at ends` restarts only after the first and the last tenth, so that
  the RSS at the end is that of one long life.

At the end, the state after the first tenth (kept aside) and the final state are started
cleanly in turn, three times each, so that both see the same load on a shared machine:
their medians of restart → ready and RSS are the like-with-like comparison.

The timings are the bundled ones (config/orchd.toml) except a short retry back-off. Every
bound on history is set so that the first tenth already reaches it, so that "flat"
compares like with like: 5 backups, a snapshot every 5 s, and, where this tree's config
has the setting (each comes with its own change), short retention (`--keep-finished`,
3 runs; `--keep-finished-s`), log segments and rotation of events and worker logs at
`--file-bytes` (1 MiB). `--set SECTION.KEY=VALUE` passes any other setting.

    python bench/soak.py                      # ORCHD_SOAK_RUNS x ORCHD_SOAK_TASKS (100 x 2,000)
    python bench/soak.py 30 2000              # 60,000 tasks
    python bench/soak.py 20 200 --heap        # plus the daemon's heap: containers and tracemalloc

With `--heap` the daemon runs with tracemalloc on (slower; its figures are not comparable
with a run without it) and, at each tenth, reports the lengths of the containers held by
orchd's objects (`Class.attribute`) and the tracemalloc lines that grew most since the
first tenth. Output: a table, then one JSON line (`{"bench": "soak", …}`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import msgspec
import psutil

from bench.soak_heap import Heap
from ctl.client import Client, RemoteError
from supervisor.core.config import Config
from tests.harness import ROOT, Daemon

LAYER = 200
MIB = 1024 * 1024


# --- the workload ----------------------------------------------------------------------


def run_file(tasks: int, *, fail: bool, flaky_dir: Path) -> str:
    """One run's workstream file: `tasks` tasks in layers of 200 (see the module docstring)."""
    width = min(LAYER, tasks)
    out = ['name = "soak"']
    last_layer = (tasks - 1) // width
    for i in range(tasks):
        layer, k = divmod(i, width)
        lines = [f'[[tasks]]\nid = "t{i}"']
        marker = f'f={flaky_dir}/"$(printf %s "$ORCHD_TASK_ID" | tr / _)"; '
        if k == 2 % width and width > 2:
            # Fails once, passes its retry: the marker file says which attempt this is.
            script = marker + 'if [ -e "$f" ]; then rm "$f"; else : > "$f"; exit 3; fi'
            lines.append("command = " + json.dumps(script))
        elif fail and layer == last_layer and k == width - 1 and i != 0:
            # Fails for good (critical: the run stops dispatching and fails), and passes
            # once the operator has it run again.
            script = marker + 'if [ -e "$f" ]; then rm "$f"; else : > "$f"; exit 2; fi'
            lines.append("command = " + json.dumps(script) + "\nno_retry_exit_codes = [2]")
        else:
            lines.append('command = ["true"]')
        if k == 0:
            lines.append('resources = ["git_repo_write"]')
        if layer:
            a = (layer - 1) * width + k
            b = (layer - 1) * width + (k + 7) % width
            deps = sorted({a, b})
            lines.append("depends_on = [" + ", ".join(f'"t{d}"' for d in deps) + "]")
        lines.append("timeout_s = 120")
        out.append("\n".join(lines))
    return "\n\n".join(out) + "\n"


# --- settings --------------------------------------------------------------------------


def known_setting(dotted: str) -> bool:
    """Whether this tree's config has the setting `section.name` (settings that other
    changes bring, such as `retention.keep_finished`, are passed only where they exist)."""
    section, _, name = dotted.partition(".")
    sub = getattr(Config(), section, None)
    return name in getattr(type(sub), "__struct_fields__", ())


def parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def soak_config(
    *,
    keep_finished: int,
    keep_finished_s: float,
    file_bytes: int = 1024 * 1024,
    snapshot_interval_s: float = 5.0,
    backups_keep: int = 5,
    extra: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The daemon's settings and, apart, those of them that bound history (dotted names).

    Bundled timings (config/orchd.toml) with a short retry back-off. Every bound is set so
    that the first tenth of a soak already reaches it, so that "flat" compares like with
    like: `keep_finished` runs kept, `backups_keep` backups of a snapshot taken every
    `snapshot_interval_s`,
    and `file_bytes` for the log's segments and the rotation of events and worker logs,
    each where this tree's config has the setting. `extra` ({"retention.keep_failed_s":
    60, …}) is passed as given."""
    cfg = tomllib.loads((ROOT / "config" / "orchd.toml").read_text())
    for key in ("state_dir", "socket_path"):
        cfg.pop(key, None)
    cfg["tasks"]["backoff_base_s"] = 0.05
    cfg["tasks"]["backoff_max_s"] = 1.0
    cfg["log"] = {"level": "warning"}
    bounds: dict[str, Any] = {
        "store.backups_keep": backups_keep,
        "store.snapshot_interval_s": snapshot_interval_s,
        "store.segment_bytes": file_bytes,
        "retention.keep_finished": keep_finished,
        "retention.keep_finished_s": keep_finished_s,
        "rotation.events_max_bytes": file_bytes,
        "rotation.events_keep": 2,
        "rotation.worker_log_max_bytes": file_bytes,
        "rotation.worker_logs_keep": 2,
    }
    applied = {k: v for k, v in bounds.items() if known_setting(k)} | (extra or {})
    for dotted, value in applied.items():
        section, _, name = dotted.partition(".")
        cfg.setdefault(section, {})[name] = value
    return cfg, applied


# --- figures ---------------------------------------------------------------------------


def disk_use(path: Path, skip: str | None = None) -> tuple[int, int]:
    """(bytes on disk, files) under `path`, as du counts them; `skip` a top-level entry."""
    total = files = 0
    for root, dirs, names in os.walk(path):
        if skip is not None and Path(root) == path and skip in dirs:
            dirs.remove(skip)
        for name in names:
            try:
                st = os.lstat(os.path.join(root, name))
            except FileNotFoundError:
                continue
            total += st.st_blocks * 512
            files += 1
    return total, files


def rss(d: Daemon) -> int:
    assert d.proc is not None
    return int(psutil.Process(d.proc.pid).memory_info().rss)


def settled_rss(d: Daemon) -> int:
    """RSS once a (re)started daemon's workers are all up and idle."""
    d.wait_for(
        lambda: all(w["state"] in ("idle", "shutdown") for w in d.workers()),
        60,
        "the workers to be idle",
    )
    return rss(d)


def timed_start(d: Daemon, env: dict[str, str]) -> float:
    """Start `d`; seconds until it answers on its socket."""
    t = time.perf_counter()
    d.start(timeout=120, env_extra=env)
    return time.perf_counter() - t


def paired_starts(
    first: Daemon, last: Daemon, n: int, env: dict[str, str] | None = None
) -> dict[str, list[float]]:
    """Clean starts of two stopped daemons taken in turn, `n` of each, so both see the
    same load on a shared machine: seconds to ready and settled RSS (MiB) of each."""
    out: dict[str, list[float]] = {k: [] for k in ("first_s", "last_s", "first_mib", "last_mib")}
    for _ in range(n):
        for d, name in ((first, "first"), (last, "last")):
            out[f"{name}_s"].append(timed_start(d, env or {}))
            out[f"{name}_mib"].append(settled_rss(d) / MIB)
            code = d.stop(timeout=60)
            assert code == 0, f"orchd exited {code} on a clean stop"
    return out


def status_call_ms(d: Daemon, n: int = 5) -> float:
    times = []
    with Client(d.socket, timeout_s=30) as c:
        for _ in range(n):
            t = time.perf_counter()
            c.call("status")
            times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


def orchctl_status_ms(d: Daemon, n: int = 3) -> float:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        r = d.ctl("status")
        times.append(time.perf_counter() - t)
        assert r.returncode == 0, r.stderr
    return statistics.median(times) * 1000


# --- the soak --------------------------------------------------------------------------


class Row(msgspec.Struct):
    runs: int
    tasks_run: int
    seconds: float  # wall time of this tenth's runs
    rss_mib: float  # the long-running daemon, idle after this tenth
    rss_fresh_mib: float | None  # just after the clean restart
    state_mib: float  # state dir without archive/
    state_files: int
    archive_mib: float
    ready_clean_s: float | None  # None: no restart after this tenth
    ready_kill_s: float | None
    status_ms: float  # socket call
    orchctl_status_ms: float  # whole process
    live_workstreams: int
    # Disk use (MiB) of each top-level entry of the state dir; files grouped as "files".
    state_parts: dict[str, float] = {}


COLUMNS = [
    ("tasks run", "tasks_run", "{:,}"),
    ("RSS MiB", "rss_mib", "{:.1f}"),
    ("RSS fresh", "rss_fresh_mib", "{:.1f}"),
    ("state MiB", "state_mib", "{:.1f}"),
    ("files", "state_files", "{:,}"),
    ("archive MiB", "archive_mib", "{:.1f}"),
    ("ready clean s", "ready_clean_s", "{:.2f}"),
    ("ready kill s", "ready_kill_s", "{:.2f}"),
    ("status ms", "status_ms", "{:.1f}"),
    ("orchctl ms", "orchctl_status_ms", "{:.0f}"),
    ("live ws", "live_workstreams", "{}"),
    ("tenth s", "seconds", "{:.0f}"),
]
RATIOS = [
    "rss_mib",
    "rss_fresh_mib",
    "state_mib",
    "ready_clean_s",
    "ready_kill_s",
    "status_ms",
    "orchctl_status_ms",
]


def marks(runs: int) -> list[int]:
    """The run counts after which figures are taken: every tenth of `runs`."""
    return sorted({max(1, round(runs * k / 10)) for k in range(1, 11)})


def wait_run(d: Daemon, ws: str, timeout: float) -> str:
    """The run's final state (a run already retired counts as finished)."""
    deadline = time.monotonic() + timeout
    with Client(d.socket, timeout_s=30) as c:
        while True:
            try:
                state = str(c.call("ws_show", workstream=ws)["state"])
            except RemoteError as exc:
                if exc.code == "not_found":
                    return "retired"
                raise
            if state not in ("pending", "running"):
                return state
            if time.monotonic() > deadline:
                raise AssertionError(f"run {ws} did not finish within {timeout}s")
            time.sleep(0.1)


def one_run(d: Daemon, text: str, timeout: float) -> None:
    with Client(d.socket, timeout_s=60) as c:
        ws = str(c.submit(text, source="soak")["workstream_id"])
    state = wait_run(d, ws, timeout)
    if state == "failed":
        # The operator's answer: run the failed tasks again (they pass the second time).
        r = d.ctl("ws", "retry-failed", ws)
        assert r.returncode == 0, f"orchctl ws retry-failed {ws}: {r.stderr}"
        state = wait_run(d, ws, timeout)
    if state not in ("completed", "retired"):
        raise AssertionError(f"run {ws} ended {state}")


def measure(
    d: Daemon,
    *,
    runs: int,
    tasks_run: int,
    seconds: float,
    restarts: int,
    env: dict[str, str],
) -> Row:
    """The figures of the idle daemon; with `restarts`, that many restarts of each kind
    (SIGKILL first, then clean) and the fresh RSS after the last."""
    rss_live = rss(d)
    status = status_call_ms(d)
    orchctl = orchctl_status_ms(d)
    live = len(d.call("ws_list"))
    kill = [_restart(d, kill=True, env=env) for _ in range(restarts)]
    clean = [_restart(d, kill=False, env=env) for _ in range(restarts)]
    fresh = settled_rss(d) if restarts else None
    state, files = disk_use(d.state_dir, skip="archive")
    archive, _ = disk_use(d.state_dir / "archive")
    parts: dict[str, float] = {}
    for entry in sorted(d.state_dir.iterdir()):
        size = disk_use(entry)[0] if entry.is_dir() else entry.lstat().st_blocks * 512
        parts[entry.name] = round(size / MIB, 3)
    workers = d.state_dir / "logs" / "workers"
    if workers.is_dir():
        parts["logs/workers"] = round(disk_use(workers)[0] / MIB, 3)  # part of "logs"
    return Row(
        runs=runs,
        tasks_run=tasks_run,
        seconds=seconds,
        rss_mib=rss_live / MIB,
        rss_fresh_mib=None if fresh is None else fresh / MIB,
        state_mib=state / MIB,
        state_files=files,
        archive_mib=archive / MIB,
        ready_clean_s=statistics.median(clean) if clean else None,
        ready_kill_s=statistics.median(kill) if kill else None,
        status_ms=status,
        orchctl_status_ms=orchctl,
        live_workstreams=live,
        state_parts=parts,
    )


def _restart(d: Daemon, *, kill: bool, env: dict[str, str]) -> float:
    if kill:
        d.kill()
    else:
        code = d.stop()
        assert code == 0, f"orchd exited {code} on a clean stop"
    return timed_start(d, env)


def soak(
    runs: int,
    tasks: int,
    tmp: Path,
    cfg: dict[str, Any],
    *,
    fail_every: int = 5,
    restarts: int = 1,
    restart_at: str = "every",
    keep_first: Path | None = None,
    heap: bool = False,
    progress: Callable[[Row, dict[str, Any] | None], None] | None = None,
) -> tuple[list[Row], list[dict[str, Any]]]:
    """Run the soak on a fresh daemon under `tmp` with settings `cfg` (`soak_config`);
    the rows and (with `heap`) the heap looks. The daemon is stopped at the end.

    `restart_at` says after which tenths the restarts are measured: "every" tenth, the
    first and last ("ends": the daemon lives from the first tenth to the end, so its RSS at
    the end holds whatever its life kept), or "none". With `keep_first`, the state dir
    after the first tenth is copied there (the daemon stopped cleanly for it), for
    `paired_starts` at the end."""
    flaky = tmp / "flaky"
    flaky.mkdir()
    looker = Heap(tmp) if heap else None
    env = looker.env() if looker else {}
    d = Daemon(tmp, cfg)
    rows: list[Row] = []
    looks: list[dict[str, Any]] = []
    # A run's budget: generous, the machine is shared.
    timeout = 120.0 + tasks * 0.5
    try:
        d.start(timeout=60, env_extra=env)
        todo = marks(runs)
        done = 0
        started = time.perf_counter()
        for mark in todo:
            while done < mark:
                done += 1
                text = run_file(
                    tasks, fail=fail_every > 0 and done % fail_every == 0, flaky_dir=flaky
                )
                one_run(d, text, timeout)
            seconds = time.perf_counter() - started
            look = looker.look() if looker else None
            if look is not None:
                looks.append(look)
            here = restart_at == "every" or (restart_at == "ends" and mark in (todo[0], todo[-1]))
            row = measure(
                d,
                runs=done,
                tasks_run=done * tasks,
                seconds=seconds,
                restarts=restarts if here else 0,
                env=env,
            )
            rows.append(row)
            if keep_first is not None and mark == todo[0]:
                assert d.stop(timeout=60) == 0
                shutil.copytree(d.state_dir, keep_first, symlinks=True)
                d.start(timeout=120, env_extra=env)
            if progress is not None:
                progress(row, look)
            started = time.perf_counter()
    finally:
        if d.proc is not None and d.proc.poll() is None:
            d.stop(timeout=60)
    return rows, looks


def ratios(rows: list[Row]) -> dict[str, float]:
    """The last row's figures over the first row's."""
    first, last = rows[0], rows[-1]
    out = {}
    for key in RATIOS:
        a, b = getattr(first, key), getattr(last, key)
        if a and b is not None:
            out[key] = round(b / a, 3)
    return out


def cell(row: Row, key: str, fmt: str) -> str:
    value = getattr(row, key)
    return "-" if value is None else fmt.format(value)


def table(rows: list[Row]) -> str:
    head = [c[0] for c in COLUMNS]
    body = [[cell(r, key, fmt) for _, key, fmt in COLUMNS] for r in rows]
    r = ratios(rows)
    body.append(
        [
            f"{r[key]:.2f}x" if key in r else ("last/first" if i == 0 else "")
            for i, (_, key, _f) in enumerate(COLUMNS)
        ]
    )
    widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]
    lines = ["  ".join(h.rjust(w) for h, w in zip(head, widths, strict=True))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(b, widths, strict=True)) for b in body]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "runs", type=int, nargs="?", default=int(os.environ.get("ORCHD_SOAK_RUNS", "100"))
    )
    ap.add_argument(
        "tasks", type=int, nargs="?", default=int(os.environ.get("ORCHD_SOAK_TASKS", "2000"))
    )
    ap.add_argument(
        "--fail-every",
        type=int,
        default=5,
        help="every Nth run has a task that fails for good (0: none)",
    )
    ap.add_argument(
        "--keep-finished",
        type=int,
        default=3,
        help="retention.keep_finished, when the config has it",
    )
    ap.add_argument(
        "--keep-finished-s", type=float, default=3600.0, help="retention.keep_finished_s, likewise"
    )
    ap.add_argument(
        "--file-bytes",
        type=int,
        default=1024 * 1024,
        help="store.segment_bytes and the rotation sizes, where the config has them",
    )
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="any other setting, passed as given (e.g. retention.keep_failed_s=60)",
    )
    ap.add_argument(
        "--restarts", type=int, default=1, help="restarts of each kind per tenth (median)"
    )
    ap.add_argument(
        "--restart-at",
        choices=["every", "ends", "none"],
        default="every",
        help="after which tenths restarts are measured (ends: the first and the last)",
    )
    ap.add_argument(
        "--heap", action="store_true", help="tracemalloc and container sizes in the daemon"
    )
    args = ap.parse_args()
    extra = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or "." not in key:
            ap.error(f"--set takes SECTION.KEY=VALUE, got {item!r}")
        extra[key] = parse_value(value)
    cfg, applied = soak_config(
        keep_finished=args.keep_finished,
        keep_finished_s=args.keep_finished_s,
        file_bytes=args.file_bytes,
        extra=extra,
    )

    print(
        f"soak: {args.runs} runs x {args.tasks} tasks = {args.runs * args.tasks:,} tasks",
        flush=True,
    )
    first_look: dict[str, Any] | None = None
    heap_report: list[dict[str, Any]] = []

    def progress(row: Row, look: dict[str, Any] | None) -> None:
        nonlocal first_look
        print("  " + ", ".join(f"{k}={cell(row, key, fmt)}" for k, key, fmt in COLUMNS), flush=True)
        if look is not None:
            first_look = first_look or look
            grown = {
                k: (first_look["containers"].get(k, 0), v)
                for k, v in look["containers"].items()
                if v > 100 and v > 1.3 * first_look["containers"].get(k, 0)
            }
            heap_report.append(
                {
                    "runs": row.runs,
                    "traced_mib": look["traced_bytes"] / MIB,
                    "gc_objects": look["gc_objects"],
                    "grown": grown,
                }
            )
            print(
                f"    heap: traced {look['traced_bytes'] / MIB:.1f} MiB, "
                f"{look['gc_objects']:,} gc objects",
                flush=True,
            )
            for k, (a, b) in sorted(grown.items(), key=lambda kv: -kv[1][1])[:20]:
                print(f"      {k}: {a:,} -> {b:,}", flush=True)

    with tempfile.TemporaryDirectory(prefix="soak-", dir="/tmp") as tmp:
        base = Path(tmp) / "first"
        base.mkdir()
        rows, looks = soak(
            args.runs,
            args.tasks,
            Path(tmp),
            cfg,
            keep_first=base / "state",
            fail_every=args.fail_every,
            restarts=args.restarts,
            restart_at=args.restart_at,
            heap=args.heap,
            progress=progress,
        )
        grown_lines = Heap.grown(looks[0], looks[-1]) if len(looks) > 1 else []
        # Clean starts of the state after the first tenth and of the final state, in turn.
        paired = paired_starts(Daemon(base, cfg), Daemon(Path(tmp), cfg), max(3, args.restarts))
    med = {k: statistics.median(v) for k, v in paired.items()}
    print()
    print(f"bounds in force: {applied}")
    if not any(k.startswith("retention.") for k in applied):
        print("(this tree has no [retention]: every run stays live)")
    print(table(rows))
    print(
        f"\nclean start, in turn, of the first tenth's state and the last: ready "
        f"{med['first_s']:.2f} s vs {med['last_s']:.2f} s ({med['last_s'] / med['first_s']:.2f}x), "
        f"settled RSS {med['first_mib']:.1f} vs {med['last_mib']:.1f} MiB "
        f"({med['last_mib'] / med['first_mib']:.2f}x); medians of {len(paired['first_s'])}"
    )
    first_parts, last_parts = rows[0].state_parts, rows[-1].state_parts
    print("state dir by entry, MiB, first tenth -> last:")
    for name in sorted(set(first_parts) | set(last_parts)):
        print(f"  {name:24} {first_parts.get(name, 0):9.2f} -> {last_parts.get(name, 0):9.2f}")
    if grown_lines:
        print("\ntracemalloc, grown most from the first tenth to the last:")
        for line in grown_lines:
            print("  " + line)
    doc = {
        "bench": "soak",
        "runs": args.runs,
        "tasks_per_run": args.tasks,
        "bounds": applied,
        "heap": args.heap,
        "rows": [msgspec.to_builtins(r) for r in rows],
        "ratios": ratios(rows),
        "paired_starts": paired,
        "paired_ratios": {
            "ready_clean_s": round(med["last_s"] / med["first_s"], 3),
            "rss_fresh_mib": round(med["last_mib"] / med["first_mib"], 3),
        },
    }
    if args.heap:
        doc["heap_report"] = heap_report
        doc["tracemalloc_grown"] = grown_lines
    print(json.dumps(doc))


if __name__ == "__main__":
    main()
