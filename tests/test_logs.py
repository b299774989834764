"""Logging set-up: the journald field mapping and datagram, real delivery to a datagram
socket, the JSON and console outputs and the choice between them."""

from __future__ import annotations

import array
import io
import json
import logging
import os
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from supervisor.service.logs import (
    choose_format,
    configure_logging,
    encode_journal,
    journal_fields,
    journal_name,
    reset_logging,
    stream_is_journal,
)


@pytest.fixture(autouse=True)
def _reset() -> Iterator[None]:
    yield
    reset_logging()


def parse_datagram(data: bytes) -> dict[str, str]:
    """Decode the journald native protocol (both the plain and the length-prefixed form)."""
    fields: dict[str, str] = {}
    pos = 0
    while pos < len(data):
        nl = data.index(b"\n", pos)
        line = data[pos:nl]
        if b"=" in line:
            key, _, value = line.partition(b"=")
            pos = nl + 1
        else:
            key = line
            (size,) = struct.unpack("<Q", data[nl + 1 : nl + 9])
            value = data[nl + 9 : nl + 9 + size]
            assert data[nl + 9 + size : nl + 10 + size] == b"\n"
            pos = nl + 10 + size
        fields[key.decode()] = value.decode()
    return fields


@pytest.fixture
def journal(sock_dir: Path) -> Iterator[tuple[str, socket.socket]]:
    """A datagram socket standing in for journald's."""
    path = str(sock_dir / "journal.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(5)
    try:
        yield path, sock
    finally:
        sock.close()


def test_journal_fields_map_ids_to_upper_case_names() -> None:
    """Context fields become TASK_ID=, WORKSTREAM_ID=, WORKER_ID=; the event name is EVENT=
    and leads MESSAGE=; the level becomes a syslog PRIORITY."""
    fields = dict(
        journal_fields(
            {
                "event": "task_timeout",
                "level": "warning",
                "timestamp": "2024-01-01T00:00:00Z",
                "task_id": "task-001",
                "workstream_id": "ws-1",
                "worker_id": "worker-2",
                "attempt": 3,
            }
        )
    )
    assert fields["TASK_ID"] == "task-001"
    assert fields["WORKSTREAM_ID"] == "ws-1"
    assert fields["WORKER_ID"] == "worker-2"
    assert fields["EVENT"] == "task_timeout"
    assert fields["ATTEMPT"] == "3"
    assert fields["PRIORITY"] == "4"
    assert fields["SYSLOG_IDENTIFIER"] == "orchd"
    assert fields["MESSAGE"].startswith("task_timeout task_id=task-001")
    assert "TIMESTAMP" not in fields and "LEVEL" not in fields


@pytest.mark.parametrize(
    ("key", "name"),
    [
        ("task_id", "TASK_ID"),
        ("exit-code", "EXIT_CODE"),
        ("_private", "PRIVATE"),
        ("2fast", "F_2FAST"),
        ("message", "ORCHD_MESSAGE"),
        ("priority", "ORCHD_PRIORITY"),
        ("x" * 80, "X" * 64),
        ("é", "F_"),
    ],
)
def test_journal_names_are_valid(key: str, name: str) -> None:
    """Field names are made valid for journald and never shadow the record's own fields."""
    assert journal_name(key) == name


def test_priorities_follow_the_level() -> None:
    """debug 7, info 6, warning 4, error 3, critical 2."""
    got = [
        dict(journal_fields({"event": "e", "level": lvl}))["PRIORITY"]
        for lvl in ("debug", "info", "warning", "error", "critical")
    ]
    assert got == ["7", "6", "4", "3", "2"]


def test_encoding_handles_newlines_and_structured_values() -> None:
    """A value with a newline uses the length-prefixed form; a dict is JSON."""
    data = encode_journal(
        journal_fields(
            {
                "event": "boom",
                "level": "error",
                "detail": "line one\nline two",
                "data": {"a": [1]},
                "exception": "Traceback ...\nZeroDivisionError",
            }
        )
    )
    fields = parse_datagram(data)
    assert fields["DETAIL"] == "line one\nline two"
    assert fields["DATA"] == '{"a":[1]}'
    assert fields["MESSAGE"].endswith("\nTraceback ...\nZeroDivisionError")
    assert data.endswith(b"\n")


def test_journald_datagram_reaches_the_socket(journal: tuple[str, socket.socket]) -> None:
    """With the journald format each record arrives as one datagram carrying its fields,
    bound context included; records below the level are not sent."""
    path, sock = journal
    assert configure_logging("info", "journald", io.StringIO(), journal_socket=path) == "journald"
    log = structlog.get_logger().bind(workstream_id="ws-9")
    log.debug("too_quiet")
    log.info("task_started", task_id="task-001", worker_id="worker-1", pid=4242)
    fields = parse_datagram(sock.recv(65536))
    assert fields["EVENT"] == "task_started"
    assert (fields["TASK_ID"], fields["WORKSTREAM_ID"], fields["WORKER_ID"]) == (
        "task-001",
        "ws-9",
        "worker-1",
    )
    assert fields["PID"] == "4242"
    assert fields["PRIORITY"] == "6"


def test_oversized_record_goes_through_a_sealed_memfd(
    journal: tuple[str, socket.socket],
) -> None:
    """A record too big for one datagram is passed as a file descriptor, as journald
    expects, and holds the whole record."""
    path, sock = journal
    configure_logging("info", "journald", io.StringIO(), journal_socket=path)
    structlog.get_logger().info("big_output", task_id="t1", output="x" * 400_000)
    fds = array.array("i")
    _, ancdata, _, _ = sock.recvmsg(1, socket.CMSG_SPACE(fds.itemsize))
    level, kind, raw = ancdata[0]
    assert (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS)
    fds.frombytes(raw[: fds.itemsize])
    try:
        size = os.fstat(fds[0]).st_size
        fields = parse_datagram(os.pread(fds[0], size, 0))
    finally:
        os.close(fds[0])
    assert fields["OUTPUT"] == "x" * 400_000
    assert fields["TASK_ID"] == "t1"


def test_unreachable_journal_falls_back_to_json(journal: tuple[str, socket.socket]) -> None:
    """When the journal goes away after start-up, records are written as JSON lines."""
    path, sock = journal
    out = io.StringIO()
    configure_logging("info", "journald", out, journal_socket=path)
    sock.close()
    os.unlink(path)
    structlog.get_logger().warning("store_write_failed", path="/x")
    record = json.loads(out.getvalue())
    assert (record["event"], record["path"], record["level"]) == (
        "store_write_failed",
        "/x",
        "warning",
    )


def test_missing_journal_socket_means_json(sock_dir: Path) -> None:
    """Asking for journald without its socket gives JSON lines on the stream."""
    out = io.StringIO()
    chosen = configure_logging("info", "journald", out, journal_socket=str(sock_dir / "none"))
    structlog.get_logger().info("started", task_id="t")
    assert chosen == "json"
    assert json.loads(out.getvalue())["task_id"] == "t"


def test_json_lines_carry_time_level_event_and_fields() -> None:
    """JSON output is one object a line, starting with timestamp, level and event."""
    out = io.StringIO()
    assert configure_logging("debug", "json", out) == "json"
    structlog.get_logger().debug("snapshot_written", seq=12)
    structlog.get_logger().info("checkpoint_written", workstream_id="ws-1")
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [r["event"] for r in lines] == ["snapshot_written", "checkpoint_written"]
    assert list(lines[0])[:3] == ["timestamp", "level", "event"]
    assert lines[0]["seq"] == 12


def test_exceptions_are_rendered_in_json() -> None:
    """log.exception puts the traceback text into the record."""
    out = io.StringIO()
    configure_logging("info", "json", out)
    try:
        raise ValueError("bad")
    except ValueError:
        structlog.get_logger().exception("handler_failed")
    record = json.loads(out.getvalue())
    assert "ValueError: bad" in record["exception"]


def test_console_lines_are_readable_and_colourless_off_a_tty() -> None:
    """Console output names the event and its fields, without colour codes when the stream
    is not a terminal."""
    out = io.StringIO()
    configure_logging("info", "console", out)
    structlog.get_logger().info("worker_started", worker_id="worker-1")
    text = out.getvalue()
    assert "worker_started" in text and "worker_id=worker-1" in text
    assert "\x1b[" not in text


def test_reconfiguring_changes_the_level() -> None:
    """A second configure_logging (a reload) applies its level to existing loggers."""
    out = io.StringIO()
    log = structlog.get_logger()
    configure_logging("warning", "json", out)
    log.info("hidden")
    configure_logging("info", "json", out)
    log.info("shown")
    assert [json.loads(x)["event"] for x in out.getvalue().splitlines()] == ["shown"]


def test_stdlib_warnings_are_routed_through_structlog() -> None:
    """A library's logging warning becomes a library_log record; its info does not."""
    out = io.StringIO()
    configure_logging("info", "json", out)
    logging.getLogger("somelib").info("chatter")
    logging.getLogger("somelib").warning("disk %s", "slow")
    (record,) = [json.loads(x) for x in out.getvalue().splitlines()]
    assert (record["event"], record["logger"], record["message"]) == (
        "library_log",
        "somelib",
        "disk slow",
    )


def test_auto_picks_journald_only_for_the_journal_stream(
    tmp_path: Path,
    journal: tuple[str, socket.socket],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """auto chooses journald when JOURNAL_STREAM names the stream's own device and inode,
    and JSON for any other non-terminal stream."""
    path, _ = journal
    with (tmp_path / "stderr").open("w") as stream:
        st = os.fstat(stream.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        assert stream_is_journal(stream)
        assert choose_format("auto", stream, path) == "journald"
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino + 1}")
        assert choose_format("auto", stream, path) == "json"
    monkeypatch.delenv("JOURNAL_STREAM")
    assert choose_format("auto", io.StringIO(), path) == "json"


def test_auto_picks_console_on_a_terminal(journal: tuple[str, socket.socket]) -> None:
    """auto chooses readable lines when the stream is a terminal."""
    master, slave = os.openpty()
    try:
        with os.fdopen(slave, "w", closefd=True) as tty:
            assert choose_format("auto", tty, journal[0]) == "console"
    finally:
        os.close(master)


def test_journal_task_id_is_the_bare_id_beside_its_workstream() -> None:
    """A full task name WS/TASK gives TASK_ID=TASK and WORKSTREAM_ID=WS, so
    `journalctl TASK_ID=compile WORKSTREAM_ID=nightly-42` finds it; MESSAGE keeps it whole."""
    fields = dict(
        journal_fields(
            {"event": "task_completed", "level": "info", "task_id": "nightly-42/compile"}
        )
    )
    assert fields["TASK_ID"] == "compile" and fields["WORKSTREAM_ID"] == "nightly-42"
    assert "task_id=nightly-42/compile" in fields["MESSAGE"]
    both = journal_fields(
        {"event": "e", "task_id": "nightly-42/compile", "workstream_id": "nightly-42"}
    )
    assert [v for k, v in both if k == "WORKSTREAM_ID"] == ["nightly-42"]  # not twice
    assert dict(journal_fields({"event": "e", "task_id": "task-001"}))["TASK_ID"] == "task-001"
