"""No task outlives its supervisor unseen, in both containments: a cgroup per attempt and
the process mode (session + subreaper + marker sweep), forced by `workers.containment`.
The real daemon, real agents and real shell tasks; an escapee that leaves with a new
session and a cleared environment (`(setsid env -i sleep … &)`, found by neither the
process group nor the marker), and a task with 200 children in several sessions and
process groups. In every case psutil finds no survivor within kill_grace_s + 1 s.

At the end, the unit under a real systemd (a throwaway one, tests/systemd_box.py): with
Delegate=yes its attempts run in cgroups of their own and `systemctl stop` leaves nothing."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from supervisor.workers import cgroup
from tests.harness import FAST, ROOT, Daemon, assert_no_leftovers, orchd_processes
from tests.systemd_box import SystemdBox, booted, missing

GRACE_S = FAST["tasks"]["kill_grace_s"]
SHUTDOWN_S = FAST["health"]["shutdown_after_s"]


def _cgroup_missing() -> str | None:
    if os.geteuid() != 0:
        return "needs root for a cgroup per attempt outside systemd"
    home = cgroup.own_cgroup()
    if home is None or not os.access(home, os.W_OK):
        return "no writable cgroup v2 hierarchy"
    return None


MODES = [
    pytest.param(
        "cgroup",
        marks=pytest.mark.skipif(_cgroup_missing() is not None, reason=str(_cgroup_missing())),
    ),
    "process",
]


def _daemon(tmp: Path, mode: str, **over: Any) -> Daemon:
    cfg: dict[str, Any] = {"workers": {"count": 2, "containment": mode}}
    for key, value in over.items():
        cfg[key] = value
    return Daemon(tmp, cfg).start()


@pytest.fixture
def stop_after() -> Iterator[list[Daemon]]:
    """Daemons to stop after the test (stopped agents resumed first), then no leftovers."""
    daemons: list[Daemon] = []
    yield daemons
    for proc in orchd_processes():
        try:
            if proc.status() == psutil.STATUS_STOPPED:
                proc.resume()
        except psutil.NoSuchProcess:
            pass
    for d in daemons:
        if d.proc is not None and d.proc.poll() is None:
            d.stop()
    assert_no_leftovers()


def _tag() -> str:
    """A sleep duration no other process has: how an escapee with no marker is found."""
    return f"313.{uuid.uuid4().int % 10**9:09d}"


def _sleepers(tag: str) -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter(["cmdline", "status"]):
        if p.info["cmdline"] == ["sleep", tag] and p.info["status"] != psutil.STATUS_ZOMBIE:
            out.append(p)
    return out


def _escapee_task(task_id: str, tag: str, tmp: Path, **extra: Any) -> str:
    """A task whose first attempt leaves an escapee, then waits; later attempts only wait."""
    once = tmp / f"{task_id}.once"
    command = f"if [ ! -e {once} ]; then touch {once}; (setsid env -i sleep {tag} &); fi; sleep 60"
    fields = "".join(f"\n{k} = {json.dumps(v)}" for k, v in extra.items())
    head = f'id = "ws-{task_id}"\n[[tasks]]\nid = "{task_id}"\n'
    return f"{head}command = {json.dumps(command)}{fields}\n"


def _escapee_up(tag: str) -> list[int]:
    pids: list[int] = []

    def found() -> bool:
        pids[:] = [p.pid for p in _sleepers(tag)]
        return bool(pids)

    Daemon.wait_for(found, 10, f"the escapee sleep {tag}")
    return pids


def _gone_within(pids: list[int], limit_s: float) -> None:
    """Every pid is gone (or a zombie) within limit_s; fails naming the survivors."""
    deadline = time.monotonic() + limit_s
    left = pids
    while True:
        left = [p for p in left if _alive(p)]
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert not left, f"survivors after {limit_s:.1f}s: {left}"


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _in_own_cgroup(d: Daemon, task_id: str) -> None:
    """The task's process is in its attempt's recorded cgroup (containment "cgroup")."""
    t = d.task(task_id)
    a = t["attempts"][-1]
    assert a.get("cgroup"), a
    assert a["cgroup"].endswith("/attempts/" + a["attempt_id"])
    assert cgroup.own_cgroup(pid=t["pid"]) == a["cgroup"]


def _running(d: Daemon, task_id: str) -> dict[str, Any]:
    found: dict[str, Any] = {}

    def check() -> bool:
        found.update(d.task(task_id))
        return found["state"] == "running" and bool(found.get("pid"))

    d.wait_for(check, 15, f"{task_id} to run with a pid")
    return found


@pytest.mark.parametrize("mode", MODES)
def test_escapee_of_a_timed_out_attempt_is_killed(
    mode: str, tmp_path: Path, stop_after: list[Daemon]
) -> None:
    """A timeout kills the attempt and its setsid + env -i escapee."""
    d = _daemon(tmp_path, mode)
    stop_after.append(d)
    tag = _tag()
    d.submit(_escapee_task("late", tag, tmp_path, timeout_s=1.0, max_retries=1))
    _running(d, "late")
    if mode == "cgroup":
        _in_own_cgroup(d, "late")
    pids = _escapee_up(tag)
    t = d.wait_task("late", "failed", timeout=15)
    assert t["attempts"][-1]["failure_kind"] == "timeout"
    _gone_within(pids, GRACE_S + 1.0)
    if mode == "cgroup":
        assert not os.path.exists(t["attempts"][-1]["cgroup"])


@pytest.mark.parametrize("mode", MODES)
def test_escapee_of_a_cancelled_attempt_is_killed(
    mode: str, tmp_path: Path, stop_after: list[Daemon]
) -> None:
    """`orchctl cancel` kills the attempt and its setsid + env -i escapee."""
    d = _daemon(tmp_path, mode)
    stop_after.append(d)
    tag = _tag()
    d.submit(_escapee_task("dropped", tag, tmp_path))
    _running(d, "dropped")
    pids = _escapee_up(tag)
    r = d.ctl("--yes", "cancel", "dropped")
    assert r.returncode == 0, r.stderr
    t = d.wait_task("dropped", "cancelled")
    _gone_within(pids, GRACE_S + 1.0)
    if mode == "cgroup":
        assert not os.path.exists(t["attempts"][-1]["cgroup"])


@pytest.mark.parametrize("mode", MODES)
def test_escapee_of_a_stopped_worker_shut_down_is_killed(
    mode: str, tmp_path: Path, stop_after: list[Daemon]
) -> None:
    """A busy worker left SIGSTOPped is shut down at shutdown_after_s: its attempt and the
    escapee go with it, though the agent cannot help."""
    d = _daemon(tmp_path, mode)
    stop_after.append(d)
    tag = _tag()
    d.submit(_escapee_task("stuck", tag, tmp_path))
    t = _running(d, "stuck")
    pids = _escapee_up(tag)
    agent = next(w for w in d.workers() if w["id"] == t["worker_id"])
    os.kill(agent["pid"], signal.SIGSTOP)
    d.wait_event("worker_shutdown", timeout=SHUTDOWN_S + 10, worker_id=agent["id"])
    _gone_within([*pids, t["pid"], agent["pid"]], GRACE_S + 1.0)
    if mode == "cgroup":
        first = d.task("stuck")["attempts"][0]
        Daemon.wait_for(lambda: not os.path.exists(first["cgroup"]), 2, "its cgroup removed")
    d.ctl("--yes", "cancel", "stuck")
    d.wait_task("stuck", "cancelled")


@pytest.mark.parametrize("agent_state", ["running", "stopped"])
@pytest.mark.parametrize("mode", MODES)
def test_escapee_after_a_daemon_sigkill_and_restart_is_killed(
    mode: str, agent_state: str, tmp_path: Path, stop_after: list[Daemon]
) -> None:
    """The daemon is SIGKILLed while the attempt runs (its agent running, or SIGSTOPped so
    it cannot clean up); after the restart nothing of the attempt is left, old agent
    included, and the task runs again."""
    d = _daemon(tmp_path, mode)
    stop_after.append(d)
    tag = _tag()
    d.submit(_escapee_task("crashed", tag, tmp_path))
    t = _running(d, "crashed")
    pids = _escapee_up(tag)
    agent_pid = next(w["pid"] for w in d.workers() if w["id"] == t["worker_id"])
    if agent_state == "stopped":
        os.kill(agent_pid, signal.SIGSTOP)
    d.kill()
    d.start()
    _gone_within([*pids, t["pid"], agent_pid], GRACE_S + 1.0)
    Daemon.wait_for(
        lambda: len(d.task("crashed")["attempts"]) == 2, 15, "the interrupted attempt to rerun"
    )
    first = d.task("crashed")["attempts"][0]
    assert first["failure_kind"] == "interrupted"
    if mode == "cgroup":
        assert not os.path.exists(first["cgroup"])
    d.ctl("--yes", "cancel", "crashed")
    d.wait_task("crashed", "cancelled")


TIMEOUT_200_S = 5.0
# 5 sessions and 5 process groups of 20 sleeps each (bash's set -m gives each job a group).
_TWO_HUNDRED = (
    "for s in 1 2 3 4 5; do "
    "setsid sh -c 'for i in $(seq 20); do sleep {tag} & done; wait' & done; "
    "bash -c 'set -m; for g in 1 2 3 4 5; do "
    "(for i in $(seq 20); do sleep {tag} & done; wait) & done; wait' & sleep 60"
)


@pytest.mark.parametrize("mode", MODES)
def test_two_hundred_children_in_many_sessions_are_killed_whole_on_timeout(
    mode: str, tmp_path: Path, stop_after: list[Daemon]
) -> None:
    """A task with 200 sleeping children in 5 sessions and 5 process groups is killed
    whole when it times out."""
    d = _daemon(tmp_path, mode)
    stop_after.append(d)
    tag = _tag()
    command = _TWO_HUNDRED.format(tag=tag)
    d.submit(
        f'id = "ws-many"\n[[tasks]]\nid = "many"\ncommand = {json.dumps(command)}\n'
        f"timeout_s = {TIMEOUT_200_S}\nmax_retries = 1\n"
    )
    _running(d, "many")
    kids: list[psutil.Process] = []

    def all_up() -> bool:
        kids[:] = _sleepers(tag)
        return len(kids) == 200

    Daemon.wait_for(all_up, TIMEOUT_200_S, "200 children before the timeout")
    sessions = {os.getsid(p.pid) for p in kids}
    groups = {os.getpgid(p.pid) for p in kids}
    assert len(sessions) >= 6 and len(groups) >= 10, (len(sessions), len(groups))
    t = d.wait_task("many", "failed", timeout=TIMEOUT_200_S + 10)
    assert t["attempts"][-1]["failure_kind"] == "timeout"
    _gone_within([p.pid for p in kids], GRACE_S + 1.0)
    if mode == "cgroup":
        assert not os.path.exists(t["attempts"][-1]["cgroup"])


# --- which containment is in force, and why ---------------------------------------------


@pytest.fixture
def undelegated_unit() -> Iterator[Path]:
    """A cgroup named like a systemd unit's, not delegated: no cgroup may be made under it."""
    if (why := _cgroup_missing()) is not None:
        pytest.skip(why)
    home = cgroup.own_cgroup()
    assert home is not None
    path = Path(home, f"orchd-test-{uuid.uuid4().hex[:10]}.service")
    path.mkdir()
    try:
        yield path
    finally:
        (path / "cgroup.kill").write_text("1")
        cgroup.wait_empty(str(path), 5)
        cgroup.remove_tree(str(path))


def test_cgroup_setting_refuses_to_start_where_no_cgroup_can_be_made(
    tmp_path: Path, undelegated_unit: Path
) -> None:
    """containment = "cgroup" in a unit's cgroup that is not delegated: orchd exits 78 and
    says why and what to change; the state directory is left unlocked."""
    d = Daemon(tmp_path, {"workers": {"count": 1, "containment": "cgroup"}})
    home = cgroup.own_cgroup()
    assert home is not None
    with (
        cgroup.inside(str(undelegated_unit), home),
        pytest.raises(AssertionError, match="orchd exited 78") as err,
    ):
        d.start()
    message = str(err.value)
    assert 'workers.containment is "cgroup"' in message and "Delegate=yes" in message
    assert "not delegated" in message
    assert sorted(p.name for p in undelegated_unit.iterdir() if p.is_dir()) == []
    # Nothing held: the same state directory starts at once with the process containment.
    d2 = Daemon(tmp_path, {"workers": {"count": 1, "containment": "process"}}).start()
    try:
        assert d2.call("status")["containment"]["mode"] == "process"
    finally:
        d2.stop()
    assert_no_leftovers()


def test_auto_falls_back_once_and_says_why(tmp_path: Path, undelegated_unit: Path) -> None:
    """containment = "auto" where no cgroup can be made: one containment_fallback event
    naming the reason, the journal line, and `orchctl status` says "process" and why;
    tasks still run."""
    d = Daemon(tmp_path, {"workers": {"count": 1, "containment": "auto"}})
    home = cgroup.own_cgroup()
    assert home is not None
    with cgroup.inside(str(undelegated_unit), home):
        d.start()
    try:
        status = d.call("status")
        c = status["containment"]
        assert c["mode"] == "process" and c["setting"] == "auto"
        assert "not delegated" in c["reason"]
        human = d.ctl("status").stdout
        assert "containment: process" in human and "not delegated" in human
        d.submit('id = "ws-ok"\n[[tasks]]\nid = "ok"\ncommand = "true"\n')
        t = d.wait_task("ok", "completed")
        assert "cgroup" not in t["attempts"][0]
        events = d.events("containment_fallback")
        assert len(events) == 1 and events[0]["severity"] == "warning"
        assert "not delegated" in events[0]["message"]
    finally:
        d.stop()
    assert_no_leftovers()
    lines = [json.loads(x) for x in d.output.read_text().splitlines() if x.startswith("{")]
    journal = [x for x in lines if x.get("event") == "containment_fallback"]
    assert len(journal) == 1


@pytest.mark.skipif(_cgroup_missing() is not None, reason=str(_cgroup_missing()))
def test_status_and_show_tell_the_cgroup_containment_and_accounting(
    tmp_path: Path, stop_after: list[Daemon]
) -> None:
    """With cgroups: `orchctl status` names the daemon's cgroup, `orchctl show` (and its
    --json) the attempt's cgroup and CPU time; the attempt cgroup is removed at its end
    and every cgroup of the daemon at its stop."""
    d = _daemon(tmp_path, "auto")
    stop_after.append(d)
    c = d.ctl_json("status")["containment"]
    assert c["mode"] == "cgroup" and c["reason"] is None
    assert c["base"].endswith(cgroup.base_name(d.state_dir))
    assert "containment: cgroup per attempt under " + c["base"] in d.ctl("status").stdout
    busy = "python3 -c 'import time\nt=time.process_time()\nwhile time.process_time()-t<0.3: pass'"
    d.submit(f'id = "ws-cpu"\n[[tasks]]\nid = "cpu"\ncommand = {json.dumps(busy)}\n')
    d.wait_task("cpu", "completed")
    a = d.ctl_json("show", "cpu")["attempts"][0]
    assert a["cgroup"] == f"{c['base']}/attempts/{a['attempt_id']}"
    assert a["cpu_s"] >= 0.25
    assert not os.path.exists(a["cgroup"])
    assert "cpu=0." in d.ctl("show", "cpu").stdout
    d.stop()
    assert not os.path.exists(c["base"])


# --- under a real systemd ----------------------------------------------------------------


@pytest.fixture
def box(tmp_path: Path) -> Iterator[SystemdBox]:
    """A booted throwaway systemd with a copy of this checkout at /mnt/src."""
    if (why := missing()) is not None:
        pytest.skip(why)
    with booted(ROOT, tmp_path / "box") as b:
        yield b


def _v2_line(text: str) -> str:
    """The cgroup v2 line (0::) of a /proc/PID/cgroup (a hybrid host lists v1 ones too)."""
    return next(line for line in text.splitlines() if line.startswith("0::"))


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_unit_runs_attempts_in_their_own_cgroups_and_stop_leaves_nothing(
    box: SystemdBox,
) -> None:
    """Installed as the README says, the unit (Delegate=yes) gives the daemon its cgroup:
    the daemon sits in orchd.service/daemon, a task's process (and its setsid + env -i
    escapee) in orchd.service/attempts/<attempt>; `systemctl stop orchd` kills them all
    and no attempt cgroup is left."""
    box.run("/mnt/src/systemd/install.sh", "--enable")
    # The delegation keeps the unit's exposure "OK" (3.6; below 4.0).
    box.run("systemd-analyze", "security", "--threshold=40", "orchd")
    unit = "/sys/fs/cgroup/system.slice/orchd.service"
    tag = _tag()
    command = f"(setsid env -i sleep {tag} &); sleep {tag}"
    (box.root / "ws.toml").write_text(
        f'id = "boxed"\n[[tasks]]\nid = "held"\ncommand = {json.dumps(command)}\n'
    )
    box.run("orchctl", "submit", "/mnt/ws.toml")

    def shown() -> dict[str, Any]:
        out: dict[str, Any] = json.loads(box.run("orchctl", "--json", "show", "held").stdout)
        return out

    deadline = time.monotonic() + 30
    while not ((t := shown())["state"] == "running" and t.get("pid")):
        assert time.monotonic() < deadline, f"the task did not start: {t}"
        time.sleep(0.2)
    attempt = t["attempts"][-1]
    assert attempt["cgroup"] == f"{unit}/attempts/{attempt['attempt_id']}"
    own = _v2_line(box.run("cat", f"/proc/{t['pid']}/cgroup").stdout)
    assert own == f"0::/system.slice/orchd.service/attempts/{attempt['attempt_id']}"
    main_pid = box.run("systemctl", "show", "-P", "MainPID", "orchd").stdout.strip()
    daemon_cg = _v2_line(box.run("cat", f"/proc/{main_pid}/cgroup").stdout)
    assert daemon_cg == "0::/system.slice/orchd.service/daemon"
    status = json.loads(box.run("orchctl", "--json", "status").stdout)
    assert status["containment"]["mode"] == "cgroup"
    assert status["containment"]["base"] == unit
    # The task's sleep and its escapee, as this side (outside the box) sees them.
    sleepers: list[psutil.Process] = []
    deadline = time.monotonic() + 10
    while len(sleepers := _sleepers(tag)) < 2:
        assert time.monotonic() < deadline, "the task's sleep and its escapee did not start"
        time.sleep(0.05)
    for p in sleepers:
        seen = _v2_line(Path(f"/proc/{p.pid}/cgroup").read_text())
        assert seen.endswith(f"/system.slice/orchd.service/attempts/{attempt['attempt_id']}")

    box.run("systemctl", "stop", "orchd")
    assert box.run("systemctl", "is-active", "orchd", check=False).stdout.strip() == "inactive"
    _gone_within([p.pid for p in sleepers], 1.0)
    assert not _sleepers(tag)
    assert not box.exists(f"{unit}/attempts")
    journal = box.run("journalctl", "-u", "orchd", "EVENT=containment", "-o", "cat").stdout
    assert "cgroup" in journal
