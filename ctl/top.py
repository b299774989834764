"""`orchctl top`: a live view of the daemon on a terminal; a plain print every --interval
seconds when stdout is not a terminal (or TERM=dumb).

A snapshot (status, running and waiting tasks with why each waits, workers, resources)
is asked for every --interval seconds over one connection, and at once (at most every
MIN_GAP_S) when the daemon's event stream, followed on a second connection, says
something happened. rich draws the screen; it is imported here only, inside the
function that draws, so every other command starts without it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import os
import select
import signal
import socket
import sys
import termios
import threading
import time
import tty
from collections import deque
from typing import TYPE_CHECKING, Any

import msgspec

from ctl import topview
from ctl.client import Client, DaemonUnreachable, RemoteError
from ctl.exitcodes import EXIT_FAILED, EXIT_OK, EXIT_UNREACHABLE
from supervisor.control.protocol import EXIT_CODES

if TYPE_CHECKING:
    from rich.console import RenderableType

# Events shown (the newest).
EVENTS_KEPT = 10
# Waiting tasks whose reason is asked for in a snapshot (more than a screen shows).
WHY_LOOKUPS = 30
# A pending task's reason is asked for again after this long even when its dependencies
# look unchanged (the daemon works it out over the task's whole workstream, cycles
# included: not something to ask for every task every second).
PENDING_WHY_TTL_S = 5.0
# Refreshes caused by events come at most this often.
MIN_GAP_S = 0.25
# A broken event stream is followed again after this long.
FOLLOW_RETRY_S = 1.0
# State colours (rich styles), as render.py colours them in tables.
_STYLES = {
    "running": "cyan",
    "busy": "cyan",
    "queued": "blue",
    "pending": "default",
    "idle": "green",
    "unresponsive": "bold red",
    "starting": "yellow",
    "shutdown": "bright_black",
    "critical": "bold red",
    "error": "red",
    "warning": "yellow",
}


class Source:
    """Snapshots over one connection to the daemon, opened again when it breaks."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._client: Client | None = None
        # A pending task's reason: what its dependencies looked like, when, the reason.
        self._pending_why: dict[str, tuple[tuple[str, ...], float, str]] = {}

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def _call(self, method: str, **params: Any) -> Any:
        if self._client is None:
            self._client = Client(self.path, timeout_s=10)
        try:
            return self._client.call(method, **params)
        except (DaemonUnreachable, OSError):
            self.close()
            raise

    def take(self, events: list[dict[str, Any]] | None) -> topview.Snapshot:
        """A snapshot now; `events` None: ask for the last ones too. Raises
        DaemonUnreachable or RemoteError as Client does."""
        snap = topview.Snapshot(taken_at=time.time())
        snap.status = self._call("status")
        for state in ("running", "queued", "pending"):
            snap.tasks += self._call("tasks", state=state)
        states = {t["id"]: t["state"] for t in snap.tasks}
        by_id = {t["id"]: t for t in snap.tasks}
        kept: dict[str, tuple[tuple[str, ...], float, str]] = {}
        for task_id, _ws, state, _ in topview.waiting_rows(snap.tasks, {})[:WHY_LOOKUPS]:
            # A dependency in none of the three lists has ended (completed, failed...).
            seen = tuple(states.get(d, "ended") for d in by_id[task_id].get("depends_on", []))
            cached = self._pending_why.get(task_id)
            if (
                state == "pending"
                and cached is not None
                and cached[0] == seen
                and snap.taken_at - cached[1] < PENDING_WHY_TTL_S
            ):
                snap.why[task_id] = cached[2]
                kept[task_id] = cached
                continue
            with contextlib.suppress(RemoteError):  # it may have moved on meanwhile
                snap.why[task_id] = self._call("deps", task_id=task_id)["why"]
                if state == "pending":
                    kept[task_id] = (seen, snap.taken_at, snap.why[task_id])
        self._pending_why = kept
        snap.workers = self._call("workers")
        snap.resources = self._call("resources")
        snap.events = self._call("events", limit=EVENTS_KEPT) if events is None else events
        return snap

    def snapshot(self, events: list[dict[str, Any]] | None) -> topview.Snapshot:
        """A snapshot now, or one that carries the error."""
        try:
            return self.take(events)
        except DaemonUnreachable as exc:
            return topview.Snapshot(taken_at=time.time(), events=events or [], error=str(exc))
        except (RemoteError, OSError) as exc:
            msg = exc.message if isinstance(exc, RemoteError) else str(exc)
            return topview.Snapshot(taken_at=time.time(), events=events or [], error=msg)


class Follower:
    """Follows the daemon's events on a connection of its own, in a thread; keeps the
    newest and writes a byte to `wake` for each one."""

    def __init__(self, path: str, wake: int) -> None:
        self.path, self.wake = path, wake
        self.recent: deque[dict[str, Any]] = deque(maxlen=EVENTS_KEPT)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._thread = threading.Thread(target=self._run, name="top-events", daemon=True)

    def start(self, first: list[dict[str, Any]]) -> None:
        self.recent.extend(first)
        self._thread.start()

    def events(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self.recent)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                with Client(self.path) as client:
                    with self._lock:
                        self._sock = client.sock
                    if self._stop.is_set():
                        return
                    for ev in client.stream("events", follow=True):
                        with self._lock:
                            self.recent.append(ev)
                        with contextlib.suppress(BlockingIOError):
                            os.write(self.wake, b".")
            except (DaemonUnreachable, RemoteError, OSError, ValueError):
                pass  # gone or dropped: follow again shortly
            finally:
                with self._lock:
                    self._sock = None
            self._stop.wait(FOLLOW_RETRY_S)

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            if self._sock is not None:
                # Wakes the thread from its blocking read.
                with contextlib.suppress(OSError):
                    self._sock.shutdown(socket.SHUT_RDWR)
        self._thread.join(2)


def _style(text: str) -> str:
    return _STYLES.get(text, "")


def _renderable(scr: topview.Screen, colour: bool) -> RenderableType:
    from rich import box
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    parts: list[RenderableType] = [
        Text(scr.header, style="bold" if colour else "", no_wrap=True, overflow="ellipsis")
    ]
    for s in scr.sections:
        table = Table(
            title=f"{s.title} ({len(s.rows) + s.hidden})",
            title_justify="left",
            title_style="bold" if colour else "",
            box=box.SIMPLE_HEAD,
            show_edge=False,
            pad_edge=False,
            header_style="bold" if colour else "",
            expand=False,
        )
        for h in s.headers:
            table.add_column(h.upper(), no_wrap=True, overflow="ellipsis")
        for row in s.rows:
            cells = [
                Text(v, style=_style(v) if colour and i == s.state_col else "")
                for i, v in enumerate(row)
            ]
            table.add_row(*cells)
        if s.more_line:
            table.add_row(Text(f"… {s.hidden} more", style="dim" if colour else ""))
        if not s.rows and not s.hidden:
            table.add_row("-")
        parts.append(table)
    keys = "q quit" + (f"  ·  {scr.notice}" if scr.notice else "")
    parts.append(Text(keys, style="reverse" if colour else "", no_wrap=True, overflow="ellipsis"))
    return Group(*parts)


@contextlib.contextmanager
def _keys(fd: int | None) -> Any:
    """Single keys from the terminal (cbreak: Ctrl-C still interrupts); put back after."""
    if fd is None:
        yield
        return
    old = termios.tcgetattr(fd)
    tty.setcbreak(fd)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, old)


def _live(args: argparse.Namespace, source: Source, first: topview.Snapshot, colour: bool) -> int:
    from rich.console import Console
    from rich.live import Live

    # A size a shell exported (COLUMNS, LINES) goes stale at the first resize, and rich
    # would believe it over the terminal: ask the terminal, at every redraw.
    for name in ("COLUMNS", "LINES"):
        os.environ.pop(name, None)
    console = Console(no_color=not colour, highlight=False)
    key_fd = sys.stdin.fileno() if sys.stdin.isatty() else None
    wake_r, wake_w = os.pipe()
    for fd in (wake_r, wake_w):
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_NONBLOCK)
    follower = Follower(args.socket, wake_w)

    def resized(_signum: int, _frame: object) -> None:
        with contextlib.suppress(BlockingIOError):
            os.write(wake_w, b"r")  # redrawn at the new size at once, like an event

    old_winch = signal.signal(signal.SIGWINCH, resized)
    follower.start(first.events)
    snap, shown = first, 0
    try:
        with (
            _keys(key_fd),
            Live(console=console, screen=True, auto_refresh=False, redirect_stdout=False) as live,
        ):
            due = 0.0
            while True:
                now = time.monotonic()
                if now >= due:
                    if shown:
                        snap = source.snapshot(follower.events())
                    size = console.size
                    scr = topview.screen(snap, time.time(), size.height, size.width)
                    live.update(_renderable(scr, colour), refresh=True)
                    shown += 1
                    if args.count and shown >= args.count:
                        return EXIT_OK
                    last, due = now, now + args.interval
                fds = [wake_r] + ([key_fd] if key_fd is not None else [])
                ready, _, _ = select.select(fds, [], [], max(0.0, due - time.monotonic()))
                if wake_r in ready:
                    with contextlib.suppress(BlockingIOError):
                        os.read(wake_r, 4096)
                    due = min(due, last + MIN_GAP_S)
                if key_fd is not None and key_fd in ready and b"q" in os.read(key_fd, 64).lower():
                    return EXIT_OK
    except KeyboardInterrupt:
        return EXIT_OK
    finally:
        signal.signal(signal.SIGWINCH, old_winch)
        follower.stop()
        source.close()
        os.close(wake_r)
        os.close(wake_w)


def _plain(args: argparse.Namespace, source: Source, first: topview.Snapshot) -> int:
    snap, shown = first, 0
    try:
        while True:
            if shown:
                snap = source.snapshot(None)
            if args.json:
                print(msgspec.json.encode(dataclasses.asdict(snap)).decode(), flush=True)
            else:
                print(topview.plain(topview.screen(snap, time.time())) + "\n", flush=True)
            shown += 1
            if args.count and shown >= args.count:
                return EXIT_OK
            time.sleep(args.interval)
    except KeyboardInterrupt:
        return EXIT_OK
    except BrokenPipeError:  # `orchctl top | head`
        with contextlib.suppress(OSError):
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - no flush error at exit
        return EXIT_OK
    finally:
        source.close()


def run(args: argparse.Namespace) -> int:
    """`orchctl top [--interval S] [-n COUNT]`."""
    if args.interval <= 0:
        print("orchctl: --interval must be > 0 (seconds)", file=sys.stderr)
        return 2
    source = Source(args.socket)
    try:
        first = source.take(None)
    except DaemonUnreachable as exc:
        source.close()
        print(f"orchctl: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except RemoteError as exc:
        source.close()
        print(f"orchctl: {exc.message}", file=sys.stderr)
        return EXIT_CODES.get(exc.code, EXIT_FAILED)
    term = os.environ.get("TERM", "")
    if sys.stdout.isatty() and term not in ("dumb", "") and not args.json:
        colour = "NO_COLOR" not in os.environ
        return _live(args, source, first, colour)
    return _plain(args, source, first)
