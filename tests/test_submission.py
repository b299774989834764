"""Workstream files: decoding with defaults, refusals that list every problem at once,
generated ids, cycles reported rather than refused, and the bundled example."""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from supervisor.core.config import TasksConfig
from supervisor.core.errors import WorkstreamExists, WorkstreamFileError
from supervisor.core.model import State, Task, Transition, Workstream
from supervisor.core.submission import (
    creation_changes,
    cycle_report,
    new_ulid,
    next_run,
    parse_workstream,
)
from supervisor.service.reload import load_config

ROOT = Path(__file__).resolve().parent.parent
DEFAULTS = TasksConfig(timeout_s=120.0, max_retries=5, queue_timeout_s=0.0)


def ids(*values: str) -> Callable[[], str]:
    """An id generator handing out `values` in turn (and recording each call)."""
    pending = list(values)
    return lambda: pending.pop(0)


def parse(
    text: str,
    *,
    existing: set[str] | None = None,
    defaults: TasksConfig = DEFAULTS,
    resources: set[str] | None = None,
    **kw: object,
) -> tuple[Workstream, list[Task]]:
    return parse_workstream(
        text.encode(),
        source="ws.toml",
        defaults=defaults,
        known_resources={"git_repo_write"} if resources is None else resources,
        existing_task_ids=existing or set(),
        new_id=ids("ws-generated"),
        **kw,  # type: ignore[arg-type]
    )


def problems_of(text: str, **kw: object) -> list[str]:
    with pytest.raises(WorkstreamFileError) as err:
        parse(text, **kw)  # type: ignore[arg-type]
    assert all(p.startswith("ws.toml: ") for p in err.value.problems)
    return err.value.problems


def test_defaults_fill_what_a_task_leaves_out() -> None:
    """timeout_s and max_retries come from [tasks] when a task does not set them."""
    ws, tasks = parse(
        'id = "ws-1"\n[[tasks]]\nid = "a"\ncommand = ["make"]\n'
        '[[tasks]]\nid = "b"\ncommand = "make test"\ntimeout_s = 5\n'
        'max_retries = 0\ndepends_on = ["a"]\n'
    )
    a, b = tasks
    assert (a.timeout_s, a.max_retries, a.queue_timeout_s) == (120.0, 5, None)
    assert (b.timeout_s, b.max_retries, b.depends_on) == (5.0, 0, ["ws-1/a"])
    assert (a.workstream_id, a.order, b.order) == ("ws-1", 0, 1)
    assert ws.task_ids == ["ws-1/a", "ws-1/b"]


def test_queue_timeout_default_applies_when_configured() -> None:
    """A configured queue_timeout_s reaches tasks that do not set their own."""
    _, (task,) = parse(
        '[[tasks]]\nid = "a"\ncommand = "x"\n', defaults=TasksConfig(queue_timeout_s=30.0)
    )
    assert task.queue_timeout_s == 30.0


def test_every_field_of_section_7_is_accepted() -> None:
    """The file of DESIGN.md §7, with every optional field, decodes into one task."""
    _, (task,) = parse("""
id = "ws-build-001"
[[tasks]]
id = "task-001"
command = ["make", "build"]
timeout_s = 600
max_retries = 3
depends_on = []
resources = ["git_repo_write"]
critical = true
validate = ["make", "test"]
cwd = "/srv/builds/app"
env = { KEY = "value" }
priority = 0
no_retry_exit_codes = [2]
rlimits = { memory_mb = 4096, cpu_s = 1200 }
""")
    assert task.validate == ["make", "test"]
    assert task.env == {"KEY": "value"}
    assert task.rlimits is not None and task.rlimits.memory_mb == 4096
    assert task.no_retry_exit_codes == [2]


def test_missing_id_is_generated_only_for_an_accepted_file() -> None:
    """Without an id the generator names the workstream; a refused file spends none."""
    calls: list[str] = []

    def gen() -> str:
        calls.append("x")
        return "ws-new"

    with pytest.raises(WorkstreamFileError):
        parse_workstream(
            b"[[tasks]]\nid = 'a'\n",
            source="f",
            defaults=DEFAULTS,
            known_resources=set(),
            existing_task_ids=set(),
            new_id=gen,
        )
    assert calls == []
    ws, tasks = parse_workstream(
        b"[[tasks]]\nid = 'a'\ncommand = 'x'\n",
        source="f",
        defaults=DEFAULTS,
        known_resources=set(),
        existing_task_ids=set(),
        new_id=gen,
        now=7.5,
    )
    assert (ws.id, tasks[0].workstream_id, ws.submitted_at, ws.source) == (
        "ws-new",
        "ws-new",
        7.5,
        "f",
    )


BAD_FILE = """
owner = "me"
[[tasks]]
id = "a"
command = ["make", 3]
colour = "red"
timeout_s = 0
[[tasks]]
id = "a"
command = ""
max_retries = -1
depends_on = ["ghost"]
resources = ["gpu"]
[[tasks]]
command = "ok"
env = { A = 1 }
[[tasks]]
id = "old"
command = "x"
timeout_s = "soon"
[[tasks]]
id = "c"
command = []
validate = ""
cwd = "relative/dir"
no_retry_exit_codes = [0]
rlimits = { memory_mb = 0 }
"""


def test_every_problem_is_listed_at_once() -> None:
    """A bad file is refused with each of its problems named, across all tasks."""
    found = "\n".join(problems_of(BAD_FILE, existing={"old"}))
    expected = [
        r"unknown top-level field `owner`",
        r"task 'a': unknown field `colour`",
        r"task 'a': field `command`: Expected `str`, got `int`",
        r"task 'a': `timeout_s` must be > 0",
        r"task 'a': duplicate task id \(tasks\[0\], tasks\[1\]\)",
        r"task 'a': `command` is empty",
        r"task 'a': `max_retries` must be >= 0",
        r"task 'a': unknown dependency 'ghost'",
        r"task 'a': unknown resource 'gpu'",
        r"tasks\[2\]: missing required field `id`",
        r"tasks\[2\]: field `env`: Expected `str`, got `int`",
        r"task 'old': field `timeout_s`: Expected `float.*got `str`",
        r"task 'c': `command` is empty",
        r"task 'c': `validate` is empty",
        r"task 'c': `cwd` must be an absolute path",
        r"task 'c': `no_retry_exit_codes` holds 0",
        r"task 'c': `rlimits.memory_mb` must be > 0",
    ]
    missing = [e for e in expected if not re.search(e, found)]
    assert missing == []


def test_unknown_field_is_named_with_its_task() -> None:
    """An unknown field is reported with the id of the task it sits in."""
    (problem,) = problems_of('[[tasks]]\nid = "build"\ncommand = "x"\ntimeot_s = 5\n')
    assert problem == "ws.toml: task 'build': unknown field `timeot_s`"


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("", "no tasks"),
        ("tasks = []\n", "no tasks"),
        ("tasks = 3\n", "`tasks` must be an array of tables"),
        ("tasks = [1]\n", "tasks[0]: must be a table"),
        ('id = 5\n[[tasks]]\nid = "a"\ncommand = "x"\n', "`id` must be a string"),
        ('id = "../etc"\n[[tasks]]\nid = "a"\ncommand = "x"\n', "is not a valid id"),
        ('[[tasks]]\nid = "a/b"\ncommand = "x"\n', "is not a valid id"),
        ('[[tasks]]\nid = "a"\ncommand = "x"\nenv = { "A=B" = "1" }\n', "invalid variable"),
        ('[[tasks]]\nid = "a"\ncommand = "x"\nqueue_timeout_s = -3\n', "`queue_timeout_s`"),
        ('[[tasks]]\nid = "a"\ncommand = "x"\ncritical = "yes"\n', "field `critical`"),
        ('[[tasks]]\nid = "a"\ncommand = "x"\nrlimits = { stack = 1 }\n', "`stack`"),
        ("[[tasks]\n", "not valid TOML"),
    ],
)
def test_single_problems_are_named(text: str, needle: str) -> None:
    """Each kind of bad value is refused with a message saying what is wrong."""
    assert any(needle in p for p in problems_of(text))


def test_refused_workstream_id_that_exists() -> None:
    """Naming a workstream id the daemon already has is refused (WorkstreamExists, not a
    problem of the file), with the way out: drop `id`, or pass --id."""
    with pytest.raises(WorkstreamExists) as err:
        parse(
            'id = "ws-1"\n[[tasks]]\nid = "a"\ncommand = "x"\n',
            existing_workstream_ids={"ws-1"},
        )
    assert "workstream 'ws-1' (`id`) exists already" in str(err.value)
    assert "drop `id` from the file" in str(err.value) and "--id" in str(err.value)


def test_file_problems_come_before_an_existing_id() -> None:
    """A bad file with a taken id is refused for its problems (exit 2), not its id."""
    problems = problems_of('id = "ws-1"\n[[tasks]]\nid = "a"\n', existing_workstream_ids={"ws-1"})
    assert problems == ["ws.toml: task 'a': missing required field `command`"]


NAMED = 'name = "nightly"\n[[tasks]]\nid = "compile"\ncommand = "x"\n'


def test_named_file_is_numbered_per_name_from_the_run_counter() -> None:
    """A file with `name` becomes run NAME-N, N one past the counter of that name."""
    ws, (task,) = parse(NAMED, run_numbers={"nightly": 41, "release": 7})
    assert (ws.id, ws.name, ws.number) == ("nightly-42", "nightly", 42)
    assert task.id == "nightly-42/compile" and task.name == "compile"
    first, _ = parse(NAMED)
    assert first.id == "nightly-1"


def test_run_number_skips_an_id_taken_explicitly() -> None:
    """NAME-N already used by an explicit id is passed over, never given twice."""
    ws, _ = parse(NAMED, run_numbers={"nightly": 2}, existing_workstream_ids={"nightly-3"})
    assert (ws.id, ws.number) == ("nightly-4", 4)


def test_next_run_is_pure_and_counts_past_gaps() -> None:
    """next_run depends only on the counter and the ids that exist."""
    assert next_run("nightly", {}, ()) == ("nightly-1", 1)
    assert next_run("nightly", {"nightly": 9}, {"nightly-1"}) == ("nightly-10", 10)


def test_explicit_id_beats_the_name_and_the_files_id() -> None:
    """--id (explicit_id) is the workstream's id; the file's name is still recorded."""
    ws, (task,) = parse('id = "f"\n' + NAMED, explicit_id="hotfix-1")
    assert (ws.id, ws.name, ws.number) == ("hotfix-1", "nightly", None)
    assert task.id == "hotfix-1/compile"
    with pytest.raises(WorkstreamExists, match=r"\(--id\) exists already"):
        parse(NAMED, explicit_id="x", existing_workstream_ids={"x"})


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ('name = 3\n[[tasks]]\nid = "a"\ncommand = "x"\n', "`name` must be a string"),
        ('name = "a/b"\n[[tasks]]\nid = "a"\ncommand = "x"\n', "not a valid pipeline name"),
        ('name = "' + "n" * 101 + '"\n[[tasks]]\nid = "a"\ncommand = "x"\n', "1-100"),
        ('id = "workers"\n[[tasks]]\nid = "a"\ncommand = "x"\n', "is reserved"),
    ],
)
def test_bad_names_are_refused(text: str, needle: str) -> None:
    """A pipeline name is an id-like word short enough to take a run number."""
    assert any(needle in p for p in problems_of(text))


def test_dependencies_within_the_file_become_full_names() -> None:
    """depends_on on a task of the same file names this run's task; one on another
    workstream's task keeps its full name."""
    _, (a, b) = parse(
        'id = "r-2"\n[[tasks]]\nid = "a"\ncommand = "x"\n'
        '[[tasks]]\nid = "b"\ncommand = "x"\ndepends_on = ["a", "r-1/a"]\n',
        existing={"r-1/a"},
    )
    assert (a.id, b.depends_on) == ("r-2/a", ["r-2/a", "r-1/a"])


def test_not_utf8_is_refused() -> None:
    """Bytes that are not UTF-8 are a refusal, not a crash."""
    with pytest.raises(WorkstreamFileError, match="not valid TOML"):
        parse_workstream(
            b"\xff\xfe",
            source="ws.toml",
            defaults=DEFAULTS,
            known_resources=set(),
            existing_task_ids=set(),
            new_id=ids("x"),
        )


def test_dependency_on_an_existing_task_is_allowed() -> None:
    """A task may depend on a task the daemon already has."""
    _, (task,) = parse('[[tasks]]\nid = "b"\ncommand = "x"\ndepends_on = ["a"]\n', existing={"a"})
    assert task.depends_on == ["a"]


def test_repeated_entries_are_kept_once() -> None:
    """A dependency or resource listed twice counts once."""
    _, (_, task) = parse(
        '[[tasks]]\nid = "a"\ncommand = "x"\n[[tasks]]\nid = "b"\n'
        'command = "x"\ndepends_on = ["a", "a"]\n'
        'resources = ["git_repo_write", "git_repo_write"]\n'
    )
    assert (task.depends_on, task.resources) == (["ws-generated/a"], ["git_repo_write"])


def test_cycle_is_accepted_and_reported() -> None:
    """A dependency cycle is not a refusal; cycle_report names the tasks in it."""
    _, tasks = parse(
        '[[tasks]]\nid = "a"\ncommand = "x"\ndepends_on = ["c"]\n'
        '[[tasks]]\nid = "b"\ncommand = "x"\ndepends_on = ["a"]\n'
        '[[tasks]]\nid = "c"\ncommand = "x"\ndepends_on = ["b"]\n'
        '[[tasks]]\nid = "d"\ncommand = "x"\ndepends_on = ["d"]\n'
        '[[tasks]]\nid = "e"\ncommand = "x"\n'
    )
    w = "ws-generated/"
    assert sorted(cycle_report(tasks)) == [[w + "a", w + "b", w + "c"], [w + "d"]]


def test_result_is_a_legal_creation_record() -> None:
    """The parsed workstream applies to the state as one creation record."""
    ws, tasks = parse(
        '[[tasks]]\nid = "a"\ncommand = "x"\n[[tasks]]\nid = "b"\n'
        'command = "y"\ndepends_on = ["a"]\n'
    )
    state = State()
    state.apply(
        Transition(
            seq=1,
            ts=0.0,
            entity="workstream",
            id="ws-generated",
            to="pending",
            cause="submit",
            changes=creation_changes(ws, tasks),
        )
    )  # type: ignore[arg-type]
    assert state.data.workstreams["ws-generated"].task_ids == ["ws-generated/a", "ws-generated/b"]
    assert state.data.tasks["ws-generated/b"].timeout_s == 120.0
    assert state.graph.unmet == {"ws-generated/a": 0, "ws-generated/b": 1}


def test_new_ulid_layout() -> None:
    """A ULID id is "ws-" + 26 Crockford characters, time first, so ids sort by time."""
    first = new_ulid(1_700_000_000.0, bytes(10))
    later = new_ulid(1_700_000_000.001, b"\xff" * 10)
    assert re.fullmatch(r"ws-[0-9A-HJKMNP-TV-Z]{26}", first)
    assert first < later
    assert new_ulid(0.0, bytes(10)) == "ws-" + "0" * 26
    assert new_ulid(1_700_000_000.0, b"\x01" * 10) != first
    with pytest.raises(ValueError):
        new_ulid(0.0, b"short")


def topological(tasks: list[Task]) -> list[Task]:
    done: set[str] = set()
    order: list[Task] = []
    while len(order) < len(tasks):
        for t in tasks:
            if t.id not in done and all(d in done for d in t.depends_on):
                order.append(t)
                done.add(t.id)
    return order


def run(cmd: list[str] | str, env: dict[str, str]) -> int:
    argv = ["/bin/sh", "-c", cmd] if isinstance(cmd, str) else cmd
    return subprocess.run(argv, env=env, capture_output=True, timeout=30).returncode


def test_bundled_example_is_accepted_and_its_commands_work(tmp_path: Path) -> None:
    """config/examples/build.toml is a diamond accepted with the bundled config, and its
    commands and validations succeed when run in dependency order."""
    cfg = load_config(ROOT / "config" / "orchd.toml")
    text = (ROOT / "config" / "examples" / "build.toml").read_bytes()
    ws, tasks = parse_workstream(
        text,
        source="build.toml",
        defaults=cfg.tasks,
        known_resources=set(cfg.resources),
        existing_task_ids=set(),
        new_id=lambda: new_ulid(1.0, os.urandom(10)),
    )
    w = f"{ws.id}/"
    assert {t.id: t.depends_on for t in tasks} == {
        w + "fetch": [],
        w + "compile": [w + "fetch"],
        w + "lint": [w + "fetch"],
        w + "package": [w + "compile", w + "lint"],
    }
    assert cycle_report(tasks) == []
    assert (ws.id, ws.name) == ("nightly-1", "nightly")
    for task in topological(tasks):
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "TMPDIR": str(tmp_path),
            "ORCHD_TASK_ID": task.id,
            **task.env,
        }
        assert run(task.command, env) == 0, task.id
        if task.validate is not None:
            assert run(task.validate, env) == 0, task.id
    assert (tmp_path / "orchd-example" / "nightly-1" / "app.tar").stat().st_size > 0
