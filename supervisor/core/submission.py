"""A workstream file (DESIGN.md §7) turned into the payload of its creation record. Pure: no
I/O, no clock reads; the caller passes the time, the id generator and what already exists.

Every submission is a new workstream, a *run*: an explicit id (`--id`, else the file's
`id`), else `NAME-N` for a file with a `name` (N counts that name's runs, from the state's
`run_numbers`, so a number is never given twice), else a ULID-based id. Task ids are
unique within their workstream: each task is recorded under its full name `WS/TASK`, and
a dependency on a task of the same file is rewritten to that full name.

A bad file is refused as a whole: every problem in it is collected and raised together in
one `WorkstreamFileError`, so an operator fixes the file in one pass and nothing is ever
half-submitted. A dependency cycle is *not* a refusal: the workstream is accepted, the
daemon reports the cycle (`cycle_report`) and the tasks in it wait for an operator.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Iterable, Mapping
from typing import Any, Final

import msgspec

from supervisor.core.config import TasksConfig
from supervisor.core.errors import WorkstreamExists, WorkstreamFileError
from supervisor.core.graph import find_cycles
from supervisor.core.model import Rlimits, Task, Workstream, full_task_id, task_to_builtins
from supervisor.core.placement import Hosts, host_name

# Ids become file names (logs/<task>.log, checkpoints/<ws>_latest.json), so they are kept
# to a safe alphabet: no path separators, no leading dot, bounded length.
ID_PATTERN: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
# A workstream's task logs are logs/<ws>/<task>.log, beside logs/workers/.
RESERVED_WORKSTREAM_IDS: Final = frozenset({"workers"})
_CROCKFORD: Final = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_TOP_LEVEL_KEYS: Final = frozenset({"id", "name", "host", "tasks"})
# A pipeline name leaves room for "-N" within an id's 128 characters.
NAME_PATTERN: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


class TaskSpec(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """One `[[tasks]]` table as written by the operator; None means "use the default"."""

    id: str
    command: list[str] | str
    cwd: str | None = None
    env: dict[str, str] = {}
    timeout_s: float | None = None
    max_retries: int | None = None
    depends_on: list[str] = []
    resources: list[str] = []
    critical: bool = True
    validate: list[str] | str | None = None
    priority: int = 0
    no_retry_exit_codes: list[int] = []
    queue_timeout_s: float | None = None
    rlimits: Rlimits | None = None
    runs_on: str | None = None


_SPEC_FIELDS: Final = {f.name: f for f in msgspec.structs.fields(TaskSpec)}
_REQUIRED: Final = tuple(
    f.name
    for f in _SPEC_FIELDS.values()
    if f.default is msgspec.NODEFAULT and f.default_factory is msgspec.NODEFAULT
)


def new_ulid(now: float, rand: bytes) -> str:
    """A workstream id: "ws-" + a 26-character ULID (48-bit milliseconds, 80 random bits),
    in Crockford base 32 so ids sort by submission time."""
    if len(rand) != 10:
        raise ValueError("a ULID needs exactly 10 random bytes")
    ms = int(now * 1000) & ((1 << 48) - 1)
    value = (ms << 80) | int.from_bytes(rand, "big")
    chars = [_CROCKFORD[(value >> shift) & 31] for shift in range(125, -1, -5)]
    return "ws-" + "".join(chars)


def next_run(
    name: str, run_numbers: Mapping[str, int], existing: Collection[str]
) -> tuple[str, int]:
    """The id and number of the next run of pipeline `name`: one past the highest number it
    was ever given, skipping an id that an explicit `id` took meanwhile."""
    number = run_numbers.get(name, 0) + 1
    while f"{name}-{number}" in existing:
        number += 1
    return f"{name}-{number}", number


def cycle_report(tasks: Iterable[Task]) -> list[list[str]]:
    """The dependency cycles among `tasks` (each a sorted list of task ids); [] for a DAG."""
    task_list = list(tasks)
    return find_cycles([t.id for t in task_list], {t.id: list(t.depends_on) for t in task_list})


def creation_changes(ws: Workstream, tasks: Iterable[Task]) -> dict[str, Any]:
    """The `changes` of the one record that creates a workstream and its tasks."""
    return {
        "workstream": msgspec.to_builtins(ws),
        "tasks": [task_to_builtins(t) for t in tasks],
    }


def decode_document(text: bytes, source: str) -> dict[str, Any]:
    """The TOML of a workstream file as a table (the slow part of a big file: the control
    socket runs it off the engine's loop and hands the result to `parse_workstream`)."""
    try:
        doc: dict[str, Any] = msgspec.toml.decode(text)
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise WorkstreamFileError([f"{source}: not valid TOML: {exc}"]) from None
    return doc


def parse_workstream(
    text: bytes,
    *,
    source: str,
    defaults: TasksConfig,
    known_resources: set[str],
    existing_task_ids: Collection[str],
    new_id: Callable[[], str],
    existing_workstream_ids: Collection[str] = (),
    run_numbers: Mapping[str, int] | None = None,
    explicit_id: str | None = None,
    now: float = 0.0,
    document: dict[str, Any] | None = None,
    hosts: Hosts | None = None,
) -> tuple[Workstream, list[Task]]:
    """Decode and check a workstream file; return the workstream and its tasks (under their
    full names), ready for `creation_changes`. Raises WorkstreamFileError naming every
    problem, each prefixed with `source`, and then WorkstreamExists when the explicit id
    (`explicit_id`, else the file's `id`) is taken. A dependency names a task of this file
    by its id, or one the daemon already has by its full name. `document` is `text`
    already decoded by `decode_document`, when the caller did that. `hosts` are the hosts
    of the settings in force, which `host` and `runs_on` may name (the daemon's own host
    alone when not given)."""
    problems: list[str] = []

    def problem(msg: str) -> None:
        problems.append(f"{source}: {msg}")

    doc = document if document is not None else decode_document(text, source)

    for key in sorted(set(doc) - _TOP_LEVEL_KEYS):
        problem(f"unknown top-level field `{key}` (allowed: id, name, host, tasks)")
    if hosts is None:
        hosts = Hosts()
    pinned = _pinned_host(doc, hosts, problem)

    ws_id: str | None = None
    where_id = "`id`"
    if explicit_id is not None:
        where_id = "--id"
        if not ID_PATTERN.fullmatch(explicit_id):
            problem(f"--id {explicit_id!r} {_ID_RULE}")
        else:
            ws_id = explicit_id
    elif "id" in doc:
        raw_id = doc["id"]
        if not isinstance(raw_id, str):
            problem(f"`id` must be a string, got {_type_name(raw_id)}")
        elif not ID_PATTERN.fullmatch(raw_id):
            problem(f"`id` {raw_id!r} {_ID_RULE}")
        else:
            ws_id = raw_id
    if ws_id in RESERVED_WORKSTREAM_IDS:
        problem(f"{where_id} {ws_id!r} is reserved (logs/{ws_id}/ holds the workers' logs)")
    name: str | None = None
    if "name" in doc:
        raw_name = doc["name"]
        if not isinstance(raw_name, str):
            problem(f"`name` must be a string, got {_type_name(raw_name)}")
        elif not NAME_PATTERN.fullmatch(raw_name):
            problem(
                f"`name` {raw_name!r} is not a valid pipeline name (letters, digits, '.', "
                "'_', '-'; 1-100 characters)"
            )
        else:
            name = raw_name

    raw_tasks = doc.get("tasks")
    decoded: list[tuple[int, str, dict[str, Any]]] = []
    if raw_tasks is None or raw_tasks == []:
        problem("no tasks: a workstream needs at least one [[tasks]] table")
    elif not isinstance(raw_tasks, list):
        problem(f"`tasks` must be an array of tables ([[tasks]]), got {_type_name(raw_tasks)}")
    else:
        for index, table in enumerate(raw_tasks):
            values = _decode_fields(index, table, problem)
            if values is not None:
                decoded.append((index, _where(index, table), values))

    file_ids = _check_ids(decoded, problem)
    for _, where, values in decoded:
        _check_values(where, values, file_ids, existing_task_ids, known_resources, problem)
        _check_placement(where, values.get("runs_on"), pinned, hosts, problem)

    if problems:
        raise WorkstreamFileError(problems)

    if ws_id is not None and ws_id in existing_workstream_ids:
        hint = (
            "pass another `--id`, or none"
            if where_id == "--id"
            else "drop `id` from the file (with `name` set, each submission is numbered: "
            f"{name or 'NAME'}-1, -2, …) or pass `orchctl submit FILE --id OTHER`"
        )
        raise WorkstreamExists(
            f"{source}: workstream {ws_id!r} ({where_id}) exists already; {hint}"
        )
    # Only a file without a single problem gets an id: a refusal spends nothing.
    number: int | None = None
    if ws_id is None and name is not None:
        ws_id, number = next_run(name, run_numbers or {}, existing_workstream_ids)
    if ws_id is None:
        ws_id = new_id()
    tasks = [
        _build_task(index, msgspec.convert(values, TaskSpec), ws_id, file_ids, defaults, pinned)
        for index, _, values in decoded
    ]
    ws = Workstream(
        id=ws_id,
        task_ids=[t.id for t in tasks],
        submitted_at=now,
        source=source,
        name=name,
        number=number,
        host=pinned,
    )
    return ws, tasks


_ID_RULE: Final = "is not a valid id (letters, digits, '.', '_', '-'; 1-128 characters)"


def _type_name(value: object) -> str:
    names = {
        str: "a string",
        bool: "a boolean",
        int: "an integer",
        float: "a float",
        list: "an array",
        dict: "a table",
    }
    return names.get(type(value), type(value).__name__)


def _where(index: int, table: object) -> str:
    tid = table.get("id") if isinstance(table, dict) else None
    return f"task {tid!r}" if isinstance(tid, str) and tid else f"tasks[{index}]"


def _decode_fields(
    index: int, table: object, problem: Callable[[str], None]
) -> dict[str, Any] | None:
    """The fields of one task table that decode to their declared type, each checked on its
    own: msgspec stops at the first error of a struct, and every bad field of every task is
    to be named. None when the entry is not a table at all."""
    where = _where(index, table)
    if not isinstance(table, dict):
        problem(f"{where}: must be a table ([[tasks]]), got {_type_name(table)}")
        return None
    values: dict[str, Any] = {}
    for name in _REQUIRED:
        if name not in table:
            problem(f"{where}: missing required field `{name}`")
    for key, value in table.items():
        field = _SPEC_FIELDS.get(key)
        if field is None:
            problem(f"{where}: unknown field `{key}`")
            continue
        try:
            values[key] = msgspec.convert(value, field.type)
        except msgspec.ValidationError as exc:
            detail = str(exc).replace(" - at `$", f" - at `{key}").replace("$.", "")
            problem(f"{where}: field `{key}`: {detail}")
    return values


def _check_ids(
    decoded: list[tuple[int, str, dict[str, Any]]],
    problem: Callable[[str], None],
) -> set[str]:
    seen: dict[str, list[int]] = {}
    for index, _, values in decoded:
        if "id" in values:
            seen.setdefault(values["id"], []).append(index)
    for tid, indexes in seen.items():
        if not ID_PATTERN.fullmatch(tid):
            problem(f"task {tid!r}: id {_ID_RULE}")
        if len(indexes) > 1:
            places = ", ".join(f"tasks[{i}]" for i in indexes)
            problem(f"task {tid!r}: duplicate task id ({places})")
    return set(seen)


def _empty_command(cmd: list[str] | str) -> bool:
    if isinstance(cmd, str):
        return not cmd.strip()
    return not cmd or not cmd[0].strip()


def _check_values(
    where: str,
    values: dict[str, Any],
    file_ids: set[str],
    existing: Collection[str],
    known_resources: set[str],
    problem: Callable[[str], None],
) -> None:
    """Range and reference checks on the fields that decoded (a bad one was named already)."""
    if "command" in values and _empty_command(values["command"]):
        problem(f"{where}: `command` is empty")
    if values.get("validate") is not None and _empty_command(values["validate"]):
        problem(f"{where}: `validate` is empty (leave it out to skip validation)")
    for name in ("timeout_s", "queue_timeout_s"):
        value = values.get(name)
        if value is not None and value <= 0:
            problem(f"{where}: `{name}` must be > 0, got {value}")
    max_retries = values.get("max_retries")
    if max_retries is not None and max_retries < 0:
        problem(f"{where}: `max_retries` must be >= 0, got {max_retries}")
    cwd = values.get("cwd")
    if cwd is not None and not cwd.startswith("/"):
        # Relative to what? The daemon's directory is not the submitter's: refuse.
        problem(f"{where}: `cwd` must be an absolute path, got {cwd!r}")
    for key in values.get("env", {}):
        if not key or "=" in key or "\0" in key:
            problem(f"{where}: `env` has an invalid variable name {key!r}")
    for code in values.get("no_retry_exit_codes", []):
        if not 0 < code < 256:
            problem(f"{where}: `no_retry_exit_codes` holds {code}, not an exit code (1-255)")
    rlimits = values.get("rlimits")
    if rlimits is not None:
        for name in Rlimits.__struct_fields__:
            value = getattr(rlimits, name)
            if value is not None and value <= 0:
                problem(f"{where}: `rlimits.{name}` must be > 0, got {value}")
    for dep in values.get("depends_on", []):
        if dep not in file_ids and dep not in existing:
            problem(
                f"{where}: unknown dependency {dep!r} (a task of this file by its id, "
                "another workstream's by its full name WS/TASK)"
            )
    for res in values.get("resources", []):
        if res not in known_resources:
            known = ", ".join(sorted(known_resources)) or "none configured"
            base, at, on = res.partition("@")
            hint = (
                f"; a per-host resource is named {base!r}: the task holds its instance on "
                f"the host it runs on (choose the host with `runs_on = {on!r}`)"
                if at and base in known_resources
                else ""
            )
            problem(f"{where}: unknown resource {res!r} (known: {known}){hint}")


def _pinned_host(doc: dict[str, Any], hosts: Hosts, problem: Callable[[str], None]) -> str | None:
    """The file's `host` (the one host the workstream is pinned to), checked."""
    if "host" not in doc:
        return None
    raw = doc["host"]
    if not isinstance(raw, str):
        problem(f"`host` must be a string (a host's name), got {_type_name(raw)}")
        return None
    if hosts.is_host(raw):
        return raw
    on = sorted(host_name(h) for h in hosts.hosts_for(raw))
    if on:
        problem(
            f"`host` {raw!r} is a label (of {', '.join(on)}), not a host: a workstream is "
            "pinned to one host, name it (a task may use a label in `runs_on`)"
        )
    else:
        problem(f"`host` {raw!r} is not a configured host (known: {', '.join(hosts.names)})")
    return None


def _check_placement(
    where: str,
    runs_on: str | None,
    pinned: str | None,
    hosts: Hosts,
    problem: Callable[[str], None],
) -> None:
    """A task's `runs_on` names a host or label, and agrees with the workstream's `host`."""
    if runs_on is None:
        return
    found = hosts.hosts_for(runs_on)
    if not found:
        problem(
            f"{where}: `runs_on` {runs_on!r} names no configured host or label "
            f"(known: {', '.join(hosts.known())})"
        )
    elif pinned is not None and hosts.host_of_name(pinned) not in found:
        problem(
            f"{where}: `runs_on` {runs_on!r} contradicts the workstream's `host` {pinned!r} "
            f"({runs_on!r} is {', '.join(sorted(host_name(h) for h in found))}); "
            "drop `runs_on` (the workstream's tasks all run on its host) or the `host`"
        )


def _build_task(
    index: int,
    spec: TaskSpec,
    ws_id: str,
    file_ids: set[str],
    defaults: TasksConfig,
    pinned: str | None = None,
) -> Task:
    queue_timeout = spec.queue_timeout_s
    if queue_timeout is None and defaults.queue_timeout_s > 0:
        queue_timeout = defaults.queue_timeout_s
    return Task(
        id=full_task_id(ws_id, spec.id),
        workstream_id=ws_id,
        command=spec.command,
        cwd=spec.cwd,
        env=dict(spec.env),
        timeout_s=spec.timeout_s if spec.timeout_s is not None else defaults.timeout_s,
        max_retries=spec.max_retries if spec.max_retries is not None else defaults.max_retries,
        # A repeated entry would count twice in the graph and, for a resource, make the
        # task wait on itself: keep the first of each, in the operator's order.
        # A dependency within the file is on this run's task; one outside it is already a
        # full name (or a task recorded before full names, whose id is its full name).
        depends_on=list(
            dict.fromkeys(full_task_id(ws_id, d) if d in file_ids else d for d in spec.depends_on)
        ),
        resources=list(dict.fromkeys(spec.resources)),
        critical=spec.critical,
        validate=spec.validate,
        priority=spec.priority,
        no_retry_exit_codes=list(spec.no_retry_exit_codes),
        queue_timeout_s=queue_timeout,
        rlimits=spec.rlimits,
        # A pinned workstream's host is where every task of it runs (a `runs_on` given
        # as well was checked to agree with it).
        runs_on=pinned if pinned is not None else spec.runs_on,
        order=index,
    )
