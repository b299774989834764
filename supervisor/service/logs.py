"""structlog set-up: readable lines on a terminal, JSON lines elsewhere, and native journald
records (TASK_ID=, WORKSTREAM_ID=, WORKER_ID=, EVENT= …) under systemd, so that
`journalctl -u orchd TASK_ID=task-001` finds a task's story.

The journald side speaks the native protocol itself (one datagram of KEY=value lines to
/run/systemd/journal/socket) rather than pulling in a binding: it is a few lines, and the
field mapping is a pure function (`journal_fields`, `encode_journal`) that tests call
directly. Log calls keep the project's shape: `log.info("snapshot_written", seq=12)`.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import re
import socket
import struct
import sys
from collections.abc import Mapping
from typing import Any, Final, Literal, TextIO

import msgspec
import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

Format = Literal["auto", "console", "json", "journald"]

JOURNAL_SOCKET: Final = "/run/systemd/journal/socket"
IDENTIFIER: Final = "orchd"
# syslog priorities, as journald wants them in PRIORITY=.
PRIORITIES: Final = {
    "debug": 7,
    "info": 6,
    "warning": 4,
    "warn": 4,
    "error": 3,
    "exception": 3,
    "critical": 2,
    "fatal": 2,
}
LEVELS: Final = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}
# Field names journald sets itself or that we set per record; a log field of the same name
# is kept under ORCHD_<NAME> instead of silently doubling the journal's own.
_RESERVED: Final = frozenset(
    {"MESSAGE", "PRIORITY", "SYSLOG_IDENTIFIER", "EVENT", "LEVEL", "TIMESTAMP", "MESSAGE_ID"}
)
# Not worth a journal field: journald stamps its own time; the level is PRIORITY.
_DROPPED: Final = frozenset({"timestamp", "level", "event", "exception"})
_BAD_CHARS: Final = re.compile(r"[^A-Z0-9_]")
_U64: Final = struct.Struct("<Q")
_json: Final = msgspec.json.Encoder(enc_hook=repr)


# --- pure pieces -------------------------------------------------------------------------


def journal_name(key: str) -> str:
    """A log field's journald name: upper case, [A-Z0-9_] only, not starting with '_' or a
    digit (those are journald's trusted/invalid names), at most 64 characters."""
    name = _BAD_CHARS.sub("_", key.upper()).lstrip("_")
    if not name or name[0].isdigit():
        name = "F_" + name
    if name in _RESERVED:
        name = "ORCHD_" + name
    return name[:64]


def _text(value: object) -> str:
    if isinstance(value, str):
        return value
    if value is None or isinstance(value, bool | int | float):
        return str(value)
    return _json.encode(value).decode()


def journal_fields(event_dict: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The journald fields of one log record, in order: MESSAGE (the event name and its
    fields, then any traceback), PRIORITY, SYSLOG_IDENTIFIER, EVENT, then every field."""
    event = str(event_dict.get("event", ""))
    extra = [(k, v) for k, v in event_dict.items() if k not in _DROPPED]
    message = " ".join([event, *(f"{k}={_text(v)}" for k, v in extra)])
    if event_dict.get("exception"):
        message += "\n" + str(event_dict["exception"])
    level = str(event_dict.get("level", "info")).lower()
    fields = [
        ("MESSAGE", message),
        ("PRIORITY", str(PRIORITIES.get(level, 6))),
        ("SYSLOG_IDENTIFIER", IDENTIFIER),
        ("EVENT", event),
    ]
    fields.extend((journal_name(k), _text(v)) for k, v in extra)
    task = event_dict.get("task_id")
    if isinstance(task, str) and "/" in task:
        # A full name WS/TASK: TASK_ID is the id the workstream file gave, next to its
        # WORKSTREAM_ID, so `journalctl TASK_ID=compile WORKSTREAM_ID=nightly-42` finds it
        # (MESSAGE keeps the full name).
        ws, _, bare = task.rpartition("/")
        fields = [(k, bare if k == "TASK_ID" else v) for k, v in fields]
        if "workstream_id" not in event_dict:
            fields.append(("WORKSTREAM_ID", ws))
    return fields


def encode_journal(fields: list[tuple[str, str]]) -> bytes:
    """The native-protocol datagram: `KEY=value\\n`, or for a value holding a newline
    `KEY\\n` + its length as 64-bit little-endian + the value + `\\n`."""
    out = bytearray()
    for key, value in fields:
        data = value.encode("utf-8", "replace")
        if b"\n" in data:
            out += key.encode() + b"\n" + _U64.pack(len(data)) + data + b"\n"
        else:
            out += key.encode() + b"=" + data + b"\n"
    return bytes(out)


def json_line(event_dict: Mapping[str, Any]) -> str:
    """One record as a JSON object on one line (values that are not JSON become repr)."""
    return _json.encode(event_dict).decode()


def _render_json(_: WrappedLogger, __: str, event_dict: EventDict) -> str:
    # Time, level and event name first: the line reads well with `tail` and sorts by time.
    head = {k: event_dict.pop(k) for k in ("timestamp", "level", "event") if k in event_dict}
    return json_line({**head, **event_dict})


def _pass_dict(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    # The journal logger builds its datagram itself, so it can fall back to a JSON line
    # from the same record when the journal cannot take it.
    return event_dict


# --- format choice -------------------------------------------------------------------------


def stream_is_journal(stream: TextIO, environ: Mapping[str, str] | None = None) -> bool:
    """True when systemd connected `stream` to the journal: JOURNAL_STREAM holds the
    "device:inode" of that very file (a child that merely inherited the variable does not)."""
    env = os.environ if environ is None else environ
    value = env.get("JOURNAL_STREAM", "")
    dev, sep, ino = value.partition(":")
    if not sep or not dev.isdigit() or not ino.isdigit():
        return False
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):  # e.g. an io.StringIO has no fileno
        return False
    return (st.st_dev, st.st_ino) == (int(dev), int(ino))


def choose_format(fmt: Format, stream: TextIO, journal_socket: str = JOURNAL_SOCKET) -> str:
    """The format actually used: "auto" picks journald, console on a TTY, else JSON; a
    journald choice without a journal socket falls back to JSON."""
    if fmt == "auto":
        if stream_is_journal(stream):
            fmt = "journald"
        elif _isatty(stream):
            fmt = "console"
        else:
            fmt = "json"
    if fmt == "journald" and not os.path.exists(journal_socket):
        return "json"
    return fmt


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (OSError, ValueError):
        return False


def _colors(stream: TextIO) -> bool:
    env = os.environ
    return _isatty(stream) and "NO_COLOR" not in env and env.get("TERM") != "dumb"


# --- the journal logger ----------------------------------------------------------------------


class JournalLogger:
    """Sends each record as one datagram to journald; a record too big for a datagram goes
    through a sealed memfd (as journald expects); when the journal is unreachable the record
    is written as a JSON line to `fallback` instead of being lost."""

    def __init__(self, path: str, fallback: TextIO) -> None:
        self.path = path
        self.fallback = fallback
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    def msg(self, /, **event_dict: Any) -> None:
        data = encode_journal(journal_fields(event_dict))
        try:
            try:
                self.sock.sendto(data, self.path)
            except OSError as exc:
                if exc.errno not in (errno.EMSGSIZE, errno.ENOBUFS):  # too big for a datagram
                    raise
                self._send_memfd(data)
        except OSError:
            self.fallback.write(json_line(event_dict) + "\n")
            self.fallback.flush()

    def _send_memfd(self, data: bytes) -> None:
        fd = os.memfd_create("orchd-journal", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            seals = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
            rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", fd))]
            self.sock.sendmsg([], rights, 0, self.path)
        finally:
            os.close(fd)

    def close(self) -> None:
        self.sock.close()

    debug = info = warning = warn = error = critical = exception = fatal = log = msg


class JournalLoggerFactory:
    """One JournalLogger shared by every structlog logger (one socket for the process)."""

    def __init__(self, path: str, fallback: TextIO) -> None:
        self.logger = JournalLogger(path, fallback)

    def __call__(self, *args: Any) -> JournalLogger:
        return self.logger


# --- set-up ---------------------------------------------------------------------------------


class _StdlibBridge(logging.Handler):
    """Hands records of libraries using the standard `logging` module to structlog."""

    def emit(self, record: logging.LogRecord) -> None:
        log = structlog.get_logger()
        level = record.levelname.lower()
        log.log(
            LEVELS.get(level, logging.INFO),
            "library_log",
            logger=record.name,
            message=record.getMessage(),
        )


_current: JournalLoggerFactory | None = None


def configure_logging(
    level: str = "info",
    fmt: Format = "auto",
    stream: TextIO | None = None,
    *,
    journal_socket: str = JOURNAL_SOCKET,
) -> str:
    """Set up structlog for the process and return the format in use ("console", "json" or
    "journald"). May be called again (a config reload): the new settings replace the old.

    Loggers are not cached on first use, so a reload's level reaches loggers that modules
    created at import time."""
    global _current
    out = sys.stderr if stream is None else stream
    chosen = choose_format(fmt, out, journal_socket)
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.StackInfoRenderer(),
    ]
    factory: Any
    processors: list[Processor]
    if chosen == "console":
        processors = [
            *shared,
            structlog.processors.TimeStamper(fmt="%Y-%m-%d %H:%M:%S", utc=False),
            structlog.dev.ConsoleRenderer(colors=_colors(out)),
        ]
        factory = structlog.WriteLoggerFactory(file=out)
    elif chosen == "journald":
        processors = [*shared, structlog.processors.format_exc_info, _pass_dict]
        # Keep the socket across reloads: loggers bound earlier still hold it.
        same = _current is not None and _current.logger.path == journal_socket
        factory = _current if same else JournalLoggerFactory(journal_socket, out)
        if same and _current is not None:
            _current.logger.fallback = out
    else:
        processors = [
            *shared,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            _render_json,
        ]
        factory = structlog.WriteLoggerFactory(file=out)
    old, _current = _current, factory if isinstance(factory, JournalLoggerFactory) else None
    if old is factory:
        old = None
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS.get(level, logging.INFO)),
        logger_factory=factory,
        cache_logger_on_first_use=False,
    )
    if old is not None:
        old.logger.close()
    _bridge_stdlib(LEVELS.get(level, logging.INFO))
    return chosen


def _bridge_stdlib(level: int) -> None:
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, _StdlibBridge):
            root.removeHandler(handler)
    root.addHandler(_StdlibBridge())
    # Libraries only get a say from WARNING up (watchfiles reports every change at INFO).
    root.setLevel(max(level, logging.WARNING))


def reset_logging() -> None:
    """Undo `configure_logging` (for tests): structlog defaults, no stdlib bridge."""
    global _current
    structlog.reset_defaults()
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, _StdlibBridge):
            root.removeHandler(handler)
    root.setLevel(logging.WARNING)
    if _current is not None:
        with contextlib.suppress(OSError):
            _current.logger.close()
        _current = None
