"""orchctl's operator commands end to end: dependencies, workstream retry/resume/rollback,
revalidation, analysis, diagnosis, logs, metrics and completion, against the real orchd."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.harness import ROOT, Daemon


def ws_file(ws_id: str, *tasks: dict[str, Any]) -> str:
    out = [f'id = "{ws_id}"']
    for t in tasks:
        out.append("[[tasks]]")
        out.extend(f"{k} = {json.dumps(v)}" for k, v in t.items())
    return "\n".join(out) + "\n"


def seq_of(r: subprocess.CompletedProcess[str]) -> int:
    """The seq a changing command printed (human output: `ok (seq N): ...`)."""
    assert r.returncode == 0, r.stderr
    return int(r.stdout.split("seq ", 1)[1].split(")", 1)[0])


def test_deps_dag_and_dep_remove_break_a_cycle(daemon: Daemon) -> None:
    """A cycle is shown by deps and dag; removing one edge lets the workstream finish, and
    the removal is a transition with an event naming what is left of the cycle."""
    daemon.submit(
        ws_file(
            "ws-cyc",
            {"id": "a", "command": "true", "depends_on": ["b"]},
            {"id": "b", "command": "true", "depends_on": ["a"]},
            {"id": "c", "command": "true", "depends_on": ["a"]},
        )
    )
    d = daemon.ctl_json("deps", "a")
    assert d["unmet"] == 1 and d["depends_on"] == [
        {"id": "ws-cyc/b", "state": "pending", "satisfied": False}
    ]
    assert [x["id"] for x in d["dependents"]] == ["ws-cyc/b", "ws-cyc/c"] and "cycle" in d["why"]
    assert "CYCLE" in daemon.ctl("dag", "ws-cyc").stdout
    dot = daemon.ctl("dag", "ws-cyc", "--format", "dot").stdout
    assert dot.startswith('digraph "ws-cyc"') and "color=red" in dot
    assert daemon.ctl("dep", "remove", "--from", "a", "--to", "c").returncode == 3
    assert daemon.ctl("dep", "remove", "--from", "zz", "--to", "a").returncode == 3
    seq = seq_of(daemon.ctl("dep", "remove", "--from", "a", "--to", "b"))
    assert seq > 1
    daemon.wait_ws("ws-cyc", "completed")
    ev = daemon.wait_event("dependency_removed", task_id="ws-cyc/a")
    assert ev["data"]["cycles_left"] == [] and ev["tasks"] == ["ws-cyc/a", "ws-cyc/b"]
    assert daemon.ctl("dep", "remove", "--from", "b", "--to", "a").returncode == 5
    assert "waits" not in daemon.ctl_json("deps", "c")["why"]


def test_ws_analyze_retry_failed_resume_and_mark_merged(daemon: Daemon, tmp_path: Path) -> None:
    """A critical failure is analysed with the commands to run; retry-failed, resume from a
    task (downstream included, completed ones too) and mark-merged work, and a merged
    workstream refuses further changes."""
    flag, runs = tmp_path / "flag", tmp_path / "runs"
    daemon.submit(
        ws_file(
            "ws-fix",
            {"id": "first", "command": f"echo x >> {runs}"},
            {
                "id": "second",
                "command": f"test -f {flag}",
                "max_retries": 1,
                "depends_on": ["first"],
            },
        )
    )
    daemon.wait_ws("ws-fix", "failed")
    a = daemon.ctl_json("ws", "analyze", "ws-fix")
    assert a["next"] == ["orchctl ws retry ws-fix"] and not a["all_failed"]
    assert any("orchctl retry ws-fix/second" in f["commands"] for f in a["findings"])
    assert "partial failure" in daemon.ctl("ws", "analyze", "ws-fix").stdout
    assert daemon.ctl("ws", "mark-merged", "ws-fix").returncode == 5
    flag.touch()
    seq_of(daemon.ctl("ws", "retry-failed", "ws-fix"))
    daemon.wait_ws("ws-fix", "completed")
    assert runs.read_text().count("x") == 1
    assert daemon.ctl("ws", "retry-failed", "ws-fix").returncode == 5
    r = daemon.ctl_json("--yes", "ws", "resume", "ws-fix", "--from-task", "first")
    assert r["reset"] == ["ws-fix/first", "ws-fix/second"] and r["state"] == "running"
    daemon.wait_ws("ws-fix", "completed")
    assert runs.read_text().count("x") == 2
    seq_of(daemon.ctl("ws", "mark-merged", "ws-fix"))
    for args in (("retry",), ("retry-failed",), ("rollback", "--to-checkpoint", "latest")):
        assert daemon.ctl("ws", args[0], "ws-fix", *args[1:]).returncode == 5
    assert daemon.ctl("--yes", "ws", "retry", "nope").returncode == 3


def test_ws_retry_refused_while_running_then_reruns_everything(
    daemon: Daemon, tmp_path: Path
) -> None:
    """ws retry is refused while a task runs; afterwards every task runs again."""
    runs = tmp_path / "runs"
    daemon.submit(
        ws_file(
            "ws-all",
            {"id": "one", "command": f"echo 1 >> {runs}"},
            {"id": "slow", "command": "sleep 30"},
        )
    )
    daemon.wait_task("slow", "running")
    assert daemon.ctl("--yes", "ws", "retry", "ws-all").returncode == 5
    daemon.ctl("--yes", "cancel", "slow")
    daemon.wait_ws("ws-all", "completed")
    assert runs.read_text().count("1") == 1
    r = daemon.ctl_json("--yes", "ws", "retry", "ws-all")
    assert set(r["reset"]) == {"ws-all/one", "ws-all/slow"} and r["seq"] > 0
    daemon.wait_task("slow", "running")
    daemon.wait_for(lambda: runs.read_text().count("1") == 2, 10, "one to run again")
    daemon.ctl("--yes", "cancel", "slow")
    daemon.wait_ws("ws-all", "completed")


def _checkpoints(d: Daemon, ws: str, pred: Any) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []

    def check() -> bool:
        found[:] = [c for c in d.ctl_json("ws", "checkpoints", ws) if pred(c)]
        return bool(found)

    d.wait_for(check, 10, f"a checkpoint of {ws}")
    return found


def test_rollback_restores_failed_task_and_stops_running_one(daemon: Daemon) -> None:
    """Rollback to a checkpoint taken while a task ran puts the since-failed task back to
    pending with its old retry count and reopens the workstream; a running task is stopped
    and goes back to pending; completed tasks stay completed; bad checkpoints are refused."""
    daemon.submit(
        ws_file(
            "ws-rb",
            {"id": "done", "command": "true"},
            {"id": "bad", "command": "sleep 0.6; exit 1", "max_retries": 1, "depends_on": ["done"]},
        )
    )
    daemon.wait_ws("ws-rb", "failed")
    cp = _checkpoints(daemon, "ws-rb", lambda c: c["failed"] == 0 and c["completed"] == 1)[-1]
    assert daemon.ctl("ws", "rollback", "ws-rb", "--to-checkpoint", "999999").returncode == 3
    assert daemon.ctl("ws", "rollback", "ws-rb", "--to-checkpoint", "soon").returncode == 2
    r = daemon.ctl_json("--yes", "ws", "rollback", "ws-rb", "--to-checkpoint", str(cp["seq"]))
    assert (
        r["restored"] == ["ws-rb/bad"] and r["checkpoint_seq"] == cp["seq"] and r["seq"] > cp["seq"]
    )
    assert r["state"] == "running" and r["kept_completed"] == []
    ev = daemon.wait_event("workstream_rolled_back", workstream_id="ws-rb")
    assert ev["data"]["checkpoint_seq"] == cp["seq"]
    daemon.wait_for(lambda: len(daemon.task("bad")["attempts"]) == 2, 10, "bad to run again")
    assert daemon.task("done")["state"] == "completed"
    daemon.wait_ws("ws-rb", "failed")

    daemon.submit(ws_file("ws-run", {"id": "long", "command": "sleep 30"}), "run.toml")
    daemon.wait_task("long", "running")
    _checkpoints(daemon, "ws-run", lambda c: c["pending"] == 1)
    r = daemon.ctl_json("--yes", "ws", "rollback", "ws-run", "--to-checkpoint", "latest")
    assert r["stopping"] == ["ws-run/long"]
    daemon.wait_for(
        lambda: daemon.task("long")["attempts"][0].get("failure_kind") == "interrupted",
        10,
        "the running attempt to be stopped",
    )
    assert daemon.task("long")["retry_count"] == 0
    daemon.wait_task("long", "running")
    daemon.ctl("--yes", "cancel", "long")
    daemon.wait_task("long", "cancelled")


def test_revalidate_runs_only_the_validation_step(daemon: Daemon, tmp_path: Path) -> None:
    """After a validation failure, revalidate re-runs only the validate command: the task
    completes without its command running again; other states are refused."""
    runs, flag = tmp_path / "runs", tmp_path / "flag"
    daemon.submit(
        ws_file(
            "ws-val",
            {
                "id": "build",
                "command": f"echo ran >> {runs}",
                "validate": f"test -f {flag}",
                "max_retries": 1,
            },
            {"id": "plain", "command": "true"},
        )
    )
    t = daemon.wait_task("build", "failed")
    assert t["failure_kind"] == "validation"
    assert daemon.ctl("revalidate", "plain").returncode == 5
    assert daemon.ctl("revalidate", "ghost").returncode == 3
    dbg = daemon.ctl("debug", "build")
    assert dbg.returncode == 0 and "orchctl revalidate ws-val/build" in dbg.stdout
    flag.touch()
    seq_of(daemon.ctl("revalidate", "build"))
    t = daemon.wait_task("build", "completed")
    assert runs.read_text() == "ran\n" and not t.get("revalidate")
    daemon.wait_ws("ws-val", "completed")


def test_debug_interventions_metrics_and_log_follow(daemon: Daemon) -> None:
    """debug suggests a longer timeout for a timed-out task; interventions lists the
    operator's actions; metrics come as JSON or Prometheus text; logs -f streams new lines."""
    daemon.submit(
        ws_file(
            "ws-misc",
            {"id": "slowpoke", "command": "sleep 5", "timeout_s": 0.3, "max_retries": 1},
            {
                "id": "talker",
                "command": "for i in 1 2 3; do echo line$i; sleep 0.2; done; sleep 30",
            },
        )
    )
    daemon.wait_task("slowpoke", "failed")
    d = daemon.ctl_json("debug", "slowpoke")
    assert ["retry", "ws-misc/slowpoke", "--timeout", "0.6"] in [a["argv"] for a in d["actions"]]
    assert "orchctl retry ws-misc/slowpoke --timeout 0.6" in daemon.ctl("debug", "slowpoke").stdout
    proc = subprocess.Popen(
        [sys.executable, "-m", "ctl", "--socket", daemon.socket, "logs", "talker", "-f"],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        assert proc.stdout is not None
        seen = []
        for line in proc.stdout:
            seen.append(line.strip())
            if line.strip() == "line3":
                break
        assert {"line1", "line2", "line3"} <= set(seen)
    finally:
        proc.terminate()
        proc.wait(5)
        if proc.stdout is not None:
            proc.stdout.close()
    daemon.ctl("--yes", "cancel", "talker")
    assert daemon.ctl("logs", "ghost", "-f").returncode == 3
    done = daemon.ctl_json("interventions", "-n", "5")
    assert done[-1]["method"] == "cancel" and done[-1]["params"]["task_id"] == "talker"
    assert "cancel" in daemon.ctl("interventions").stdout
    m = daemon.ctl_json("metrics")
    assert m["tasks_by_state"]["failed"] == 1 and m["timeouts"] >= 1
    prom = daemon.ctl("metrics", "--prometheus").stdout
    assert 'orchd_tasks{state="failed"} 1' in prom and "# TYPE orchd_timeouts_total counter" in prom


def test_completion_scripts_and_daemon_down(tmp_path: Path) -> None:
    """completion works without a daemon; the bash script completes subcommands and
    options; commands needing the daemon exit 7 when it is not running."""

    def ctl(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "ctl", "--socket", str(tmp_path / "none.sock"), *args],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=30,
        )

    script = ctl("completion", "bash").stdout
    (tmp_path / "c.bash").write_text(script)

    def complete(*words: str) -> list[str]:
        cmd = (
            f"source {tmp_path / 'c.bash'}; COMP_WORDS=(orchctl {' '.join(words)}); "
            f'COMP_CWORD={len(words)}; _orchctl_complete; echo "${{COMPREPLY[@]}}"'
        )
        out = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=10)
        return out.stdout.split()

    assert {"rollback", "retry-failed", "analyze"} <= set(complete("ws", "''"))
    assert complete("ws", "rollback", "x", "--to") == ["--to-checkpoint"]
    assert "revalidate" in complete("rev")
    assert "compdef _orchctl orchctl" in ctl("completion", "zsh").stdout
    assert "complete -c orchctl" in ctl("completion", "fish").stdout
    assert ctl("completion", "tcsh").returncode == 2
    for args in (("deps", "a"), ("ws", "analyze", "w"), ("metrics",), ("logs", "t", "-f")):
        assert ctl(*args).returncode == 7
