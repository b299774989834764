"""A workstream file far over the socket's 1 MiB frame: `orchctl submit` uploads it in
chunks on one connection and the daemon takes it whole, in one creation record, or
refuses it whole with every problem named; a client that goes away mid-upload leaves
nothing behind. Real daemon, real orchctl and client processes."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from supervisor.control.protocol import MAX_REQUEST
from tests.faultkit import last_seq, records
from tests.harness import ROOT, Daemon, assert_no_leftovers

N = 20_000


def big_file(n: int = N, *, ws_id: str = "big", broken: bool = False) -> str:
    """`n` tasks in layers of 200, each depending on two tasks of the layer before; with
    `broken`, four problems scattered through it."""
    out = [f'id = "{ws_id}"']
    for i in range(n):
        layer, k = divmod(i, 200)
        deps = [f"s{(layer - 1) * 200 + k:05d}", f"s{(layer - 1) * 200 + (k + 7) % 200:05d}"]
        deps = deps if layer else []
        tid = f"s{i:05d}"
        extra = ""
        if broken and i == 3:
            deps = ["nowhere"]
        if broken and i == 10_000:
            tid = "s00042"  # a duplicate id
        if broken and i == 15_000:
            extra = "timeout_s = -1\n"
        if broken and i == n - 1:
            extra = 'colour = "blue"\n'
        out.append(
            f'[[tasks]]\nid = "{tid}"\ncommand = ["true", "shard {i}", "/srv/src/mod_{i}.c"]\n'
            f"depends_on = {json.dumps(deps)}\n{extra}"
        )
    return "\n".join(out) + "\n"


def settled(d: Daemon) -> Daemon:
    """Both workers idle: nothing more is recorded until someone asks for something."""
    d.wait_for(
        lambda: sorted(w["state"] for w in d.workers()) == ["idle", "idle"],
        10,
        "both workers idle",
    )
    return d


@pytest.fixture
def drained(tmp_path: Path) -> Iterator[Daemon]:
    """A daemon that starts nothing (drained), with snapshots far apart so that a
    restart replays the log."""
    d = settled(Daemon(tmp_path, {"store": {"snapshot_interval_s": 3600.0}}).start())
    try:
        assert d.ctl("drain").returncode == 0
        yield d
    finally:
        if d.proc is not None and d.proc.poll() is None:
            d.stop()
        assert_no_leftovers()


def test_twenty_thousand_tasks_go_in_whole_in_one_record_and_replay(drained: Daemon) -> None:
    """A 20,000-task file with dependencies, several MB, in one `orchctl submit`: one
    creation record holds all of it, the workers never look unresponsive meanwhile, and
    a daemon killed afterwards replays it whole."""
    d = drained
    text = big_file()
    assert len(text.encode()) > 2 * MAX_REQUEST
    path = d.tmp / "big.toml"
    path.write_text(text)
    before = last_seq(d)
    r = d.ctl("--json", "submit", str(path))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["tasks"] == N
    created = [r for r in records(d.state_dir) if r["seq"] > before and r.get("from") is None]
    assert [(c["entity"], c["id"], len(c["changes"]["tasks"])) for c in created] == [
        ("workstream", "big", N)
    ]
    shown = d.call("ws_show", workstream="big")
    assert len(shown["tasks"]) == N
    assert shown["tasks"][-1]["depends_on"] == ["big/s19799", "big/s19606"]
    assert d.events("worker_unresponsive") == []
    assert d.call("status")["uploads"] == {"open": 0, "bytes": 0}
    entry = json.loads((d.state_dir / "interventions.log").read_text().splitlines()[-1])
    assert entry["method"] == "submit" and entry["params"]["bytes"] == len(text.encode())
    assert "text" not in entry["params"]

    d.kill()
    d.start()
    replayed = d.call("ws_show", workstream="big")
    assert [t["id"] for t in replayed["tasks"]] == [t["id"] for t in shown["tasks"]]
    assert d.call("status")["drain"] is not None


def test_a_big_file_with_problems_is_refused_whole_naming_each(drained: Daemon) -> None:
    """Four problems spread over 20,000 tasks: exit 2, every one named, nothing recorded."""
    d = drained
    path = d.tmp / "broken.toml"
    path.write_text(big_file(broken=True))
    before = last_seq(d)
    r = d.ctl("submit", str(path))
    assert r.returncode == 2
    for problem in (
        "task 's00003': unknown dependency 'nowhere'",
        "task 's00042': duplicate task id (tasks[42], tasks[10000])",
        "task 's15000': `timeout_s` must be > 0, got -1",
        "task 's19999': unknown field `colour`",
    ):
        assert problem in r.stderr, r.stderr[-2000:]
    assert last_seq(d) == before
    assert d.call("ws_list") == []


def test_a_file_over_the_submit_limit_is_refused_before_its_upload(tmp_path: Path) -> None:
    """Over control.max_submit_bytes: exit 2 naming the setting, nothing recorded."""
    d = settled(Daemon(tmp_path, {"control": {"max_submit_bytes": 2 * MAX_REQUEST}}).start())
    try:
        path = tmp_path / "big.toml"
        path.write_text(big_file())
        before = last_seq(d)
        r = d.ctl("submit", str(path))
        assert r.returncode == 2 and "control.max_submit_bytes" in r.stderr, r.stderr
        assert last_seq(d) == before and d.call("ws_list") == []
    finally:
        d.stop()
        assert_no_leftovers()


_HALF_UPLOAD = textwrap.dedent(
    """
    import sys
    from ctl.client import Client
    from supervisor.control.protocol import UPLOAD_CHUNK
    data = open(sys.argv[2], "rb").read()
    c = Client(sys.argv[1])
    c.call("upload_begin", size=len(data))
    for start in range(0, len(data) // 2, UPLOAD_CHUNK):
        c.call("upload_chunk", data=data[start : start + UPLOAD_CHUNK])
    print("half sent", flush=True)
    sys.stdin.read()  # until killed
    """
)


def test_a_client_killed_mid_upload_leaves_nothing_behind(daemon: Daemon) -> None:
    """A real client process killed halfway through an upload: its buffer is released
    with the connection, the log's last seq is unchanged, no workstream appears."""
    d = settled(daemon)
    path = d.tmp / "big.toml"
    path.write_text(big_file())
    before = last_seq(d)
    with subprocess.Popen(
        [sys.executable, "-c", _HALF_UPLOAD, d.socket, str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    ) as client:
        try:
            assert client.stdout is not None
            assert client.stdout.readline().strip() == "half sent"
            held = d.call("status")["uploads"]
            assert held["open"] == 1 and held["bytes"] >= MAX_REQUEST
            client.send_signal(signal.SIGKILL)
            client.wait(10)
        finally:
            if client.poll() is None:
                client.kill()
                client.wait()
    d.wait_for(
        lambda: d.call("status")["uploads"] == {"open": 0, "bytes": 0},
        10,
        "the upload buffer to be released",
    )
    assert last_seq(d) == before and d.call("ws_list") == []
    dropped: list[dict[str, Any]] = []

    def logged() -> bool:
        dropped[:] = [
            json.loads(line)
            for line in d.output.read_text().splitlines()
            if '"upload_dropped"' in line
        ]
        return bool(dropped)

    # The daemon's log reaches orchd.out through a pipe: it may lag the socket a little.
    d.wait_for(logged, 10, "the upload_dropped log line")
    assert [(e["why"], e["size"]) for e in dropped] == [("connection_closed", path.stat().st_size)]


def test_upload_out_of_order_is_refused_clearly(daemon: Daemon) -> None:
    """A chunk without upload_begin, a submit of an incomplete upload and an overflow
    each get an error saying what to do; nothing is recorded."""
    from ctl.client import Client, RemoteError

    d = settled(daemon)
    before = last_seq(d)
    with Client(d.socket) as c:
        with pytest.raises(RemoteError, match="send upload_begin first"):
            c.call("upload_chunk", data=b"x")
        c.call("upload_begin", size=10)
        c.call("upload_chunk", data=b"12345")
        with pytest.raises(RemoteError, match="incomplete: 5 of 10 bytes"):
            c.call("submit", upload=True)
        with pytest.raises(RemoteError, match="no upload on this connection"):
            c.call("submit", upload=True)
        c.call("upload_begin", size=3)
        with pytest.raises(RemoteError, match="overflow"):
            c.call("upload_chunk", data=b"1234")
    assert last_seq(d) == before


def test_a_small_file_that_escapes_past_one_frame_is_uploaded(daemon: Daemon) -> None:
    """A file under the chunk size whose JSON escapes (a control character is six bytes
    there) pass the frame limit still goes in whole: orchctl uploads it."""
    d = settled(daemon)
    pad = "\x01" * 300_000  # refused by TOML, but the daemon must get to say so
    path = d.tmp / "escaped.toml"
    path.write_text(f'# {pad}\nid = "ws-x"\n[[tasks]]\nid = "x"\ncommand = "true"\n')
    r = d.ctl("submit", str(path))
    assert r.returncode == 2 and "not valid TOML" in r.stderr, r.stderr
    path.write_text(
        'id = "ws-y"\n[[tasks]]\nid = "y"\ncommand = "true"\n'
        + f"env = {{ PAD = '{chr(92) * 400_000}' }}\n"
    )
    r = d.ctl("submit", str(path))
    assert r.returncode == 0, r.stderr
    assert d.task("y")["env"]["PAD"] == "\\" * 400_000
